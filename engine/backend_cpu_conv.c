/*
** backend_cpu_conv.c: CPU kernels of conv2d and the 2-D pools. Tensors
** arrive dense (conv.c makes them so) and NCHW; the geometry is a kl_win2d.
**
** conv2d lowers a chunk of samples to a matrix with im2col: one row per
** (input channel, kernel tap), one column per output pixel of the chunk,
** so [C*kh*kw, chunk*oh*ow]. Per group, out = W col is one GEMM. Backward
** takes dW += dY col^T (im2col again rather than keeping col from forward:
** it is kh*kw times the input) and dcol = W^T dY, which col2im adds back
** onto dX. A chunk holds enough samples for the GEMMs to see COL_MIN
** columns: a chunk of one sample reads and writes the NCHW tensors in
** place, a longer one goes through a [channels, columns] scratch. A 1x1
** kernel with stride 1 and no padding needs no im2col: x already is col.
**
** Scratch comes from kl_new, whose freed blocks the context caches, so a
** training loop does not return to malloc every step.
**
** im2col only moves bytes; loops that do arithmetic are written once per
** element type with a T-parameterised body, as in backend_cpu.c (float and
** double are the dtypes conv.c lets through).
*/
#include <limits.h>
#include <math.h>
#include <string.h>
#include "keel_impl.h"

#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

/* Columns a GEMM should see at least (more samples per chunk below it),
** and the most bytes an im2col chunk may take (fewer samples above it). */
#define COL_MIN 256
#define COL_MAX_BYTES ((int64_t)8 << 20)

/* {======================================================================
** Helpers
** ======================================================================= */

static keel_status scratch(keel_ctx *ctx, keel_dtype dt, int64_t n, keel_tensor **out) {
  return kl_new(ctx, dt, KEEL_CPU, 1, &n, out);
}

/* Output columns [lo, hi) whose input column iw0 + ow*s lies in [0, w). */
static void col_range(int64_t iw0, int64_t s, int64_t w, int64_t ow, int64_t *lo, int64_t *hi) {
  int64_t a = iw0 >= 0 ? 0 : (-iw0 + s - 1) / s;
  int64_t b = w - 1 - iw0 >= 0 ? (w - 1 - iw0) / s + 1 : 0;
  if (a > ow) a = ow;
  if (b > ow) b = ow;
  if (b < a) b = a;
  *lo = a;
  *hi = b;
}

/* Samples per chunk: enough for COL_MIN columns, within COL_MAX_BYTES. */
static int64_t chunk_of(const kl_win2d *g, size_t es, int direct) {
  int64_t p = g->oh * g->ow, rows = g->c * g->k[0] * g->k[1], b;
  if (direct || p == 0) return 1;
  b = (COL_MIN + p - 1) / p;
  if (b > g->n) b = g->n;
  while (b > 1 && rows * b * p * (int64_t)es > COL_MAX_BYTES) b--;
  return b < 1 ? 1 : b;
}

/* }====================================================================== */

/* {======================================================================
** Runs of elements. The rows im2col moves are short (a feature map's
** width), so these avoid a libc call per row: constant-size memcpy
** becomes plain vector moves, and the 4-way unrolled loops over restrict
** pointers are vectorised at -O2 (straight-line SLP).
** ======================================================================= */

/* n bytes (a multiple of 4) from s to d, which do not overlap. */
static inline void copy_run(char *restrict d, const char *restrict s, size_t n) {
  if (n >= 16) {
    size_t i = 0;
    for (; i + 16 < n; i += 16) memcpy(d + i, s + i, 16);
    memcpy(d + n - 16, s + n - 16, 16);   /* the last block may overlap the one before */
  } else if (n >= 8) {
    memcpy(d, s, 8);
    memcpy(d + n - 8, s + n - 8, 8);
  } else if (n == 4) {
    memcpy(d, s, 4);
  }
}

static inline void zero_run(char *d, size_t n) {
  if (n >= 16) {
    size_t i = 0;
    for (; i + 16 < n; i += 16) memset(d + i, 0, 16);
    memset(d + n - 16, 0, 16);
  } else if (n >= 8) {
    memset(d, 0, 8);
    memset(d + n - 8, 0, 8);
  } else if (n == 4) {
    memset(d, 0, 4);
  }
}

/* d[i] += s[i], i < n. */
static void add_run_f32(float *restrict d, const float *restrict s, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    d[i] += s[i]; d[i + 1] += s[i + 1]; d[i + 2] += s[i + 2]; d[i + 3] += s[i + 3];
  }
  for (; i < n; i++) d[i] += s[i];
}

static void add_run_f64(double *restrict d, const double *restrict s, int64_t n) {
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) { d[i] += s[i]; d[i + 1] += s[i + 1]; }
  for (; i < n; i++) d[i] += s[i];
}

static void fill_run_f32(float *restrict d, float v, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) { d[i] = v; d[i + 1] = v; d[i + 2] = v; d[i + 3] = v; }
  for (; i < n; i++) d[i] = v;
}

static void fill_run_f64(double *restrict d, double v, int64_t n) {
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) { d[i] = v; d[i + 1] = v; }
  for (; i < n; i++) d[i] = v;
}

/* }====================================================================== */

/* {======================================================================
** im2col / col2im for one sample: x is [C, H, W]; col row r = (c, i, j)
** starts at col + r*ld and holds the oh*ow values tap (i, j) of channel c
** sees, zero where the window hangs over the padding.
** ======================================================================= */

static void im2col(const kl_win2d *g, keel_dtype dt, const void *x, void *col, int64_t ld) {
  size_t es = kl_dtype_size[dt];
  const char *X = (const char *)x;
  char *D = (char *)col;
  for (int64_t c = 0; c < g->c; c++)
    for (int64_t i = 0; i < g->k[0]; i++)
      for (int64_t j = 0; j < g->k[1]; j++) {
        char *row = D + ((c * g->k[0] + i) * g->k[1] + j) * ld * (int64_t)es;
        int64_t iw0 = j * g->dil[1] - g->pad[1], lo, hi;
        col_range(iw0, g->s[1], g->w, g->ow, &lo, &hi);
        for (int64_t oh = 0; oh < g->oh; oh++, row += g->ow * (int64_t)es) {
          int64_t ih = oh * g->s[0] - g->pad[0] + i * g->dil[0];
          const char *src;
          if (ih < 0 || ih >= g->h) { zero_run(row, (size_t)g->ow * es); continue; }
          src = X + (c * g->h + ih) * g->w * (int64_t)es;
          if (lo > 0) zero_run(row, (size_t)lo * es);
          if (g->s[1] == 1) {
            copy_run(row + lo * (int64_t)es, src + (iw0 + lo) * (int64_t)es, (size_t)(hi - lo) * es);
          } else if (dt == KEEL_F32) {
            float *d = (float *)row;
            const float *q = (const float *)src;
            for (int64_t ow = lo; ow < hi; ow++) d[ow] = q[iw0 + ow * g->s[1]];
          } else {
            double *d = (double *)row;
            const double *q = (const double *)src;
            for (int64_t ow = lo; ow < hi; ow++) d[ow] = q[iw0 + ow * g->s[1]];
          }
          if (hi < g->ow) zero_run(row + hi * (int64_t)es, (size_t)(g->ow - hi) * es);
        }
      }
}

/* x += the columns, each value summed onto the input pixel it came from. */
#define COL2IM(T, ADD_RUN) do { \
    T *X = (T *)x; \
    const T *D = (const T *)col; \
    for (int64_t c = 0; c < g->c; c++) \
      for (int64_t i = 0; i < g->k[0]; i++) \
        for (int64_t j = 0; j < g->k[1]; j++) { \
          const T *row = D + ((c * g->k[0] + i) * g->k[1] + j) * ld; \
          int64_t iw0 = j * g->dil[1] - g->pad[1], lo, hi; \
          col_range(iw0, g->s[1], g->w, g->ow, &lo, &hi); \
          for (int64_t oh = 0; oh < g->oh; oh++, row += g->ow) { \
            int64_t ih = oh * g->s[0] - g->pad[0] + i * g->dil[0]; \
            T *dst; \
            if (ih < 0 || ih >= g->h) continue; \
            dst = X + (c * g->h + ih) * g->w; \
            if (g->s[1] == 1) { \
              ADD_RUN(dst + iw0 + lo, row + lo, hi - lo); \
            } else { \
              for (int64_t ow = lo; ow < hi; ow++) dst[iw0 + ow * g->s[1]] += row[ow]; \
            } \
          } \
        } \
  } while (0)

static void col2im(const kl_win2d *g, keel_dtype dt, const void *col, int64_t ld, void *x) {
  if (dt == KEEL_F32) COL2IM(float, add_run_f32);
  else COL2IM(double, add_run_f64);
}

/* }====================================================================== */

/* {======================================================================
** conv2d
** ======================================================================= */

/* rows [oc, ld] of dst, the first n columns of each set to bias[o] (or 0). */
static void fill_bias(keel_dtype dt, void *dst, const void *bias, int64_t oc, int64_t n, int64_t ld) {
  for (int64_t o = 0; o < oc; o++) {
    if (dt == KEEL_F32) fill_run_f32((float *)dst + o * ld, bias ? ((const float *)bias)[o] : 0.0f, n);
    else fill_run_f64((double *)dst + o * ld, bias ? ((const double *)bias)[o] : 0.0, n);
  }
}

static int is_direct(const kl_win2d *g) {
  return g->k[0] == 1 && g->k[1] == 1 && g->s[0] == 1 && g->s[1] == 1 && g->pad[0] == 0 && g->pad[1] == 0;
}

static keel_status too_big(keel_ctx *ctx, const kl_win2d *g, int64_t cols) {
  int64_t rows = g->c * g->k[0] * g->k[1];
  if (rows > INT_MAX || cols > INT_MAX || g->oc > INT_MAX)
    return kl_error(ctx, KEEL_ERR_SHAPE, "conv2d: matrix dimensions above 2^31 are not supported");
  return KEEL_OK;
}

keel_status kl_cpu_conv2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, const keel_tensor *x,
                          const keel_tensor *w, const keel_tensor *b) {
  keel_dtype dt = out->dtype;
  size_t es = kl_dtype_size[dt];
  int direct = is_direct(g);
  int64_t P = g->oh * g->ow, og = g->oc / g->groups, kg = g->c / g->groups * g->k[0] * g->k[1];
  int64_t chw = g->c * g->h * g->w, B = chunk_of(g, es, direct);
  keel_tensor *col = NULL, *tmp = NULL;
  char *px = (char *)kl_data(x), *po = (char *)kl_data(out);
  const char *pw = (const char *)kl_data(w);
  const void *pb = b ? kl_data(b) : NULL;
  keel_status st = KEEL_OK;
  if (g->n == 0 || g->oc == 0 || P == 0) return KEEL_OK;
  TRY(too_big(ctx, g, B * P));
  if (!direct) TRY(scratch(ctx, dt, g->c * g->k[0] * g->k[1] * B * P, &col));
  if (B > 1) TRY(scratch(ctx, dt, g->oc * B * P, &tmp));
  for (int64_t n0 = 0; n0 < g->n; n0 += B) {
    int64_t nb = g->n - n0 < B ? g->n - n0 : B, L = nb * P;
    const char *cp;
    char *dst = nb == 1 ? po + n0 * g->oc * P * (int64_t)es : (char *)kl_data(tmp);
    if (direct) {
      cp = px + n0 * chw * (int64_t)es;
    } else {
      for (int64_t i = 0; i < nb; i++)
        im2col(g, dt, px + (n0 + i) * chw * (int64_t)es, (char *)kl_data(col) + i * P * (int64_t)es, L);
      cp = (const char *)kl_data(col);
    }
    /* bias first, then accumulate the product onto it */
    fill_bias(dt, dst, pb, g->oc, L, L);
    for (int64_t k = 0; k < g->groups; k++)
      TRY(kl_cpu_gemm(ctx, dt, 0, 0, og, L, kg, pw + k * og * kg * (int64_t)es, kg, cp + k * kg * L * (int64_t)es, L, 1.0,
           dst + k * og * L * (int64_t)es, L));
    if (nb > 1)  /* [oc, nb*P] back to [nb, oc, P] */
      for (int64_t i = 0; i < nb; i++)
        for (int64_t o = 0; o < g->oc; o++)
          memcpy(po + ((n0 + i) * g->oc + o) * P * (int64_t)es, dst + (o * L + i * P) * (int64_t)es,
                 (size_t)P * es);
  }
done:
  keel_tensor_release(col);
  keel_tensor_release(tmp);
  return st;
}

/* gb[o] = sum of gout over samples and pixels: per row in the element
** type, across rows in double. */
static void bias_grad(const kl_win2d *g, keel_dtype dt, const void *gout, void *gb) {
  int64_t P = g->oh * g->ow;
  for (int64_t o = 0; o < g->oc; o++) {
    double s = 0;
    for (int64_t n = 0; n < g->n; n++) {
      int64_t off = (n * g->oc + o) * P;
      if (dt == KEEL_F32) {
        const float *r = (const float *)gout + off;
        float part = 0;
        for (int64_t p = 0; p < P; p++) part += r[p];
        s += part;
      } else {
        const double *r = (const double *)gout + off;
        for (int64_t p = 0; p < P; p++) s += r[p];
      }
    }
    if (dt == KEEL_F32) ((float *)gb)[o] = (float)s;
    else ((double *)gb)[o] = s;
  }
}

keel_status kl_cpu_conv2d_backward(keel_ctx *ctx, const kl_win2d *g, const keel_tensor *gout,
                                   const keel_tensor *x, const keel_tensor *w, keel_tensor *gx,
                                   keel_tensor *gw, keel_tensor *gb) {
  keel_dtype dt = gout->dtype;
  size_t es = kl_dtype_size[dt];
  int direct = is_direct(g);
  int64_t P = g->oh * g->ow, og = g->oc / g->groups, kg = g->c / g->groups * g->k[0] * g->k[1];
  int64_t chw = g->c * g->h * g->w, rows = g->c * g->k[0] * g->k[1], B = chunk_of(g, es, direct);
  keel_tensor *col = NULL, *dcol = NULL, *gt = NULL;
  const char *pg = (const char *)kl_data(gout);
  keel_status st = KEEL_OK;
  if (gb) bias_grad(g, dt, pg, kl_data(gb));
  if (gx && !direct) memset(kl_data(gx), 0, (size_t)(g->n * chw) * es);
  if (gw) memset(kl_data(gw), 0, (size_t)(g->oc * kg) * es);
  if ((!gx && !gw) || g->n == 0 || P == 0 || g->oc == 0) {
    if (gx && direct) memset(kl_data(gx), 0, (size_t)(g->n * chw) * es);
    return KEEL_OK;
  }
  TRY(too_big(ctx, g, B * P));
  if (gw && !direct) TRY(scratch(ctx, dt, rows * B * P, &col));
  if (gx && !direct) TRY(scratch(ctx, dt, rows * B * P, &dcol));
  if (B > 1) TRY(scratch(ctx, dt, g->oc * B * P, &gt));
  for (int64_t n0 = 0; n0 < g->n; n0 += B) {
    int64_t nb = g->n - n0 < B ? g->n - n0 : B, L = nb * P;
    const char *gp;
    if (nb == 1) {
      gp = pg + n0 * g->oc * P * (int64_t)es;
    } else {  /* [nb, oc, P] to [oc, nb*P] */
      char *t = (char *)kl_data(gt);
      for (int64_t i = 0; i < nb; i++)
        for (int64_t o = 0; o < g->oc; o++)
          memcpy(t + (o * L + i * P) * (int64_t)es, pg + ((n0 + i) * g->oc + o) * P * (int64_t)es,
                 (size_t)P * es);
      gp = t;
    }
    if (gw) {
      const char *cp;
      if (direct) {
        cp = (const char *)kl_data(x) + n0 * chw * (int64_t)es;
      } else {
        for (int64_t i = 0; i < nb; i++)
          im2col(g, dt, (const char *)kl_data(x) + (n0 + i) * chw * (int64_t)es,
                 (char *)kl_data(col) + i * P * (int64_t)es, L);
        cp = (const char *)kl_data(col);
      }
      for (int64_t k = 0; k < g->groups; k++)
        TRY(kl_cpu_gemm(ctx, dt, 0, 1, og, kg, L, gp + k * og * L * (int64_t)es, L, cp + k * kg * L * (int64_t)es, L, 1.0,
             (char *)kl_data(gw) + k * og * kg * (int64_t)es, kg));
    }
    if (gx) {
      char *dst = direct ? (char *)kl_data(gx) + n0 * chw * (int64_t)es : (char *)kl_data(dcol);
      for (int64_t k = 0; k < g->groups; k++)
        TRY(kl_cpu_gemm(ctx, dt, 1, 0, kg, L, og, (const char *)kl_data(w) + k * og * kg * (int64_t)es, kg,
             gp + k * og * L * (int64_t)es, L, 0.0, dst + k * kg * L * (int64_t)es, L));
      if (!direct)
        for (int64_t i = 0; i < nb; i++)
          col2im(g, dt, (const char *)kl_data(dcol) + i * P * (int64_t)es, L,
                 (char *)kl_data(gx) + (n0 + i) * chw * (int64_t)es);
    }
  }
done:
  keel_tensor_release(col);
  keel_tensor_release(dcol);
  keel_tensor_release(gt);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Pools. A plane is one (sample, channel) pair; planes are independent.
** ======================================================================= */

/*
** max: torch's CPU kernel, window clipped to the input, NaN wins (the
** last NaN), ties go to the first position in row-major order. idx holds
** the flat position h*W + w in the plane, plus the index base.
**
** The comparisons on real data are coin flips, so the scan selects
** without branching (the index through a mask, the value as max); a
** window holding a NaN, which that scan cannot rank, is scanned again
** with torch's exact rule.
*/
#define MAXPOOL(T) do { \
    const T *X = (const T *)kl_data(x); \
    T *O = (T *)kl_data(out); \
    for (int64_t pl = 0; pl < planes; pl++) { \
      const T *xp = X + pl * g->h * g->w; \
      T *op = O + pl * g->oh * g->ow; \
      int64_t *ip = IX ? IX + pl * g->oh * g->ow : NULL; \
      for (int64_t oh = 0; oh < g->oh; oh++) { \
        int64_t h0 = oh * g->s[0] - g->pad[0], h1 = h0 + (g->k[0] - 1) * g->dil[0] + 1; \
        if (h1 > g->h) h1 = g->h; \
        while (h0 < 0) h0 += g->dil[0]; \
        for (int64_t ow = 0; ow < g->ow; ow++) { \
          int64_t w0 = ow * g->s[1] - g->pad[1], w1 = w0 + (g->k[1] - 1) * g->dil[1] + 1, best; \
          T m = -INFINITY; \
          int nan = 0; \
          if (w1 > g->w) w1 = g->w; \
          while (w0 < 0) w0 += g->dil[1]; \
          best = h0 * g->w + w0; \
          for (int64_t ih = h0; ih < h1; ih += g->dil[0]) \
            for (int64_t iw = w0; iw < w1; iw += g->dil[1]) { \
              int64_t at = ih * g->w + iw; \
              T v = xp[at]; \
              int64_t gt = v > m; \
              best ^= (best ^ at) & -gt; \
              m = v > m ? v : m; \
              nan |= v != v; \
            } \
          if (nan) \
            for (int64_t ih = h0; ih < h1; ih += g->dil[0]) \
              for (int64_t iw = w0; iw < w1; iw += g->dil[1]) { \
                T v = xp[ih * g->w + iw]; \
                if (v != v) { m = v; best = ih * g->w + iw; } \
              } \
          op[oh * g->ow + ow] = m; \
          if (ip) ip[oh * g->ow + ow] = best + g->index_base; \
        } \
      } \
    } \
  } while (0)

/*
** The 2x2, stride 2 window of most CNNs as a comparison tree over the
** four taps a b / c d: ties keep the earlier tap (a < b < c < d in
** row-major order), as the scan does. Windows with a NaN fall back to the
** scan's rule.
*/
#define MAXPOOL_2X2(T) do { \
    const T *X = (const T *)kl_data(x); \
    T *O = (T *)kl_data(out); \
    for (int64_t pl = 0; pl < planes; pl++) { \
      const T *xp = X + pl * g->h * g->w; \
      T *op = O + pl * g->oh * g->ow; \
      int64_t *ip = IX ? IX + pl * g->oh * g->ow : NULL; \
      for (int64_t oh = 0; oh < g->oh; oh++) { \
        const T *r0 = xp + 2 * oh * g->w, *r1 = r0 + g->w; \
        for (int64_t ow = 0; ow < g->ow; ow++) { \
          T a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1]; \
          int64_t at = 2 * oh * g->w + 2 * ow, iab = at, icd = at + g->w, gt; \
          T ab = b > a ? b : a, cd = d > c ? d : c, m; \
          iab += b > a; \
          icd += d > c; \
          gt = cd > ab; \
          m = cd > ab ? cd : ab; \
          iab ^= (iab ^ icd) & -gt; \
          if (a != a || b != b || c != c || d != d) {  /* the last NaN wins */ \
            if (d != d) { m = d; iab = at + g->w + 1; } \
            else if (c != c) { m = c; iab = at + g->w; } \
            else if (b != b) { m = b; iab = at + 1; } \
            else { m = a; iab = at; } \
          } \
          op[oh * g->ow + ow] = m; \
          if (ip) ip[oh * g->ow + ow] = iab + g->index_base; \
        } \
      } \
    } \
  } while (0)

keel_status kl_cpu_max_pool2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, keel_tensor *idx,
                              const keel_tensor *x) {
  int64_t planes = g->n * g->c;
  int64_t *IX = idx ? (int64_t *)kl_data(idx) : NULL;
  int two = g->k[0] == 2 && g->k[1] == 2 && g->s[0] == 2 && g->s[1] == 2 && g->pad[0] == 0 &&
            g->pad[1] == 0 && g->dil[0] == 1 && g->dil[1] == 1 && 2 * g->oh <= g->h && 2 * g->ow <= g->w;
  (void)ctx;
  if (two && out->dtype == KEEL_F32) MAXPOOL_2X2(float);
  else if (two) MAXPOOL_2X2(double);
  else if (out->dtype == KEEL_F32) MAXPOOL(float);
  else MAXPOOL(double);
  return KEEL_OK;
}

#define MAXPOOL_BACK(T) do { \
    T *G = (T *)kl_data(gx); \
    const T *D = (const T *)kl_data(gout); \
    for (int64_t pl = 0; pl < planes; pl++) \
      for (int64_t k = 0; k < po; k++) { \
        int64_t at = IX[pl * po + k] - g->index_base; \
        if (at >= 0 && at < pi) G[pl * pi + at] += D[pl * po + k]; \
      } \
  } while (0)

keel_status kl_cpu_max_pool2d_backward(keel_ctx *ctx, const kl_win2d *g, keel_tensor *gx,
                                       const keel_tensor *gout, const keel_tensor *idx) {
  int64_t planes = g->n * g->c, pi = g->h * g->w, po = g->oh * g->ow;
  const int64_t *IX = (const int64_t *)kl_data(idx);
  (void)ctx;
  memset(kl_data(gx), 0, (size_t)(planes * pi) * kl_dtype_size[gx->dtype]);
  if (gx->dtype == KEEL_F32) MAXPOOL_BACK(float);
  else MAXPOOL_BACK(double);
  return KEEL_OK;
}

/*
** The window of output o along one axis: [*a, *b) in the input, and the
** divisor it contributes. Fixed windows follow torch's avg_pool2d: the
** window is first clipped to the padded input (its size then is the
** count_include_pad divisor), then to the input. Adaptive windows are
** [floor(o*in/out), ceil((o+1)*in/out)).
*/
static int64_t avg_window(const kl_win2d *g, int axis, int64_t o, int64_t *a, int64_t *b) {
  int64_t in = axis ? g->w : g->h, out = axis ? g->ow : g->oh, s, e, span;
  if (g->adaptive) {
    *a = o * in / out;
    *b = ((o + 1) * in + out - 1) / out;
    return *b - *a;
  }
  s = o * g->s[axis] - g->pad[axis];
  e = s + g->k[axis];
  if (e > in + g->pad[axis]) e = in + g->pad[axis];
  span = e - s;
  if (s < 0) s = 0;
  if (e > in) e = in;
  *a = s;
  *b = e;
  return g->count_include_pad ? span : e - s;
}

/* Window and divisor of output (oh, ow); 0 when the window is empty. */
static double avg_cell(const kl_win2d *g, int64_t oh, int64_t ow, int64_t *h0, int64_t *h1, int64_t *w0,
                       int64_t *w1) {
  int64_t dh = avg_window(g, 0, oh, h0, h1), dw = avg_window(g, 1, ow, w0, w1);
  if (*h0 >= *h1 || *w0 >= *w1) return 0;
  return g->divisor ? (double)g->divisor : (double)(dh * dw);
}

#define AVGPOOL(T) do { \
    const T *X = (const T *)kl_data(x); \
    T *O = (T *)kl_data(out); \
    for (int64_t pl = 0; pl < planes; pl++) { \
      const T *xp = X + pl * g->h * g->w; \
      T *op = O + pl * g->oh * g->ow; \
      for (int64_t oh = 0; oh < g->oh; oh++) \
        for (int64_t ow = 0; ow < g->ow; ow++) { \
          int64_t h0, h1, w0, w1; \
          double div = avg_cell(g, oh, ow, &h0, &h1, &w0, &w1), s = 0; \
          if (div == 0) { op[oh * g->ow + ow] = 0; continue; } \
          for (int64_t ih = h0; ih < h1; ih++) \
            for (int64_t iw = w0; iw < w1; iw++) s += xp[ih * g->w + iw]; \
          op[oh * g->ow + ow] = (T)(s / div); \
        } \
    } \
  } while (0)

keel_status kl_cpu_avg_pool2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, const keel_tensor *x) {
  int64_t planes = g->n * g->c;
  (void)ctx;
  if (out->dtype == KEEL_F32) AVGPOOL(float);
  else AVGPOOL(double);
  return KEEL_OK;
}

#define AVGPOOL_BACK(T) do { \
    T *G = (T *)kl_data(gx); \
    const T *D = (const T *)kl_data(gout); \
    for (int64_t pl = 0; pl < planes; pl++) { \
      T *gp = G + pl * g->h * g->w; \
      const T *dp = D + pl * g->oh * g->ow; \
      for (int64_t oh = 0; oh < g->oh; oh++) \
        for (int64_t ow = 0; ow < g->ow; ow++) { \
          int64_t h0, h1, w0, w1; \
          double div = avg_cell(g, oh, ow, &h0, &h1, &w0, &w1); \
          T v; \
          if (div == 0) continue; \
          v = (T)(dp[oh * g->ow + ow] / div); \
          for (int64_t ih = h0; ih < h1; ih++) \
            for (int64_t iw = w0; iw < w1; iw++) gp[ih * g->w + iw] += v; \
        } \
    } \
  } while (0)

keel_status kl_cpu_avg_pool2d_backward(keel_ctx *ctx, const kl_win2d *g, keel_tensor *gx,
                                       const keel_tensor *gout) {
  int64_t planes = g->n * g->c;
  (void)ctx;
  memset(kl_data(gx), 0, (size_t)(planes * g->h * g->w) * kl_dtype_size[gx->dtype]);
  if (gx->dtype == KEEL_F32) AVGPOOL_BACK(float);
  else AVGPOOL_BACK(double);
  return KEEL_OK;
}

/* }====================================================================== */
