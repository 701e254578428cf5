/*
** backend_cpu_attn.c: the CPU kernels of fused scaled-dot-product
** attention (engine/attention.c has the op; kl_sdpa_args in keel_impl.h
** the layouts). This file is the specification kernels/attention.cu
** follows.
**
** Forward walks a tile of query rows against tiles of keys: one GEMM
** gives the tile's scores, an online softmax keeps each row's running
** maximum m and sum l (in double), rescales the output rows already
** accumulated when m grows, and a second GEMM adds the tile's weights
** times its values. Only out and the row logsumexp m + log l survive.
**
** Backward recomputes each tile's weights from the logsumexp, P =
** exp(s - lse), and runs the flash-attention recurrence with
**   D_i = sum_d dO_id O_id,  dS = P * (dP - D),  dP = dO V^T (dropped),
** as five GEMMs per tile pair (S, dV, dP, dQ, dK), accumulating dQ, dK and
** dV in place. Nothing the size of the score matrix is ever allocated:
** each worker (Threads, at the end) holds its tiles and one head's keys
** (and, in backward, values) transposed, O(BQ*BK + S*(E+Ev)).
**
** Speed on the CPU comes from three things, each measured with
** bench/attention.lua: the row work between the products runs in
** per-dtype loops with the causal bound, bias row and dropout test hoisted
** out (float32 4 lanes at a time, with an exp of its own); the products
** take plain operands, which keeps OpenBLAS on its small-matrix kernels
** (transpose below); and the heads (the rows, in forward) are split over
** worker threads, since tile products are too small for OpenBLAS's own.
**
** Every product goes through kl_cpu_gemm, so a reduced matmul precision
** rounds its float32 operands as matmul's do: q and k for the scores, the
** (dropped) weights and v for the output, and likewise in backward (the
** weights' gradient is scaled before it is rounded).
**
** A fully masked row (every score -inf) has l == 0: its output is NaN
** (softmax of nothing, as the composed softmax gives) and its lse -inf;
** backward treats its weights and their gradients as 0, so the NaN
** reaches no other row and no key.
*/
#include <math.h>
#include <pthread.h>
#include <string.h>
#include <cblas.h>
#include "keel_impl.h"

/* Tile sizes: BQ query rows against BK keys; a score tile is BQ*BK. */
#define BQ 64
#define BK 128

/* {======================================================================
** The dropout mask: counter-based, as kernels/norm.cu's dropout
** ======================================================================= */

static uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* The seed goes through the mixer once (nearby seeds give unrelated
** masks), then element idx takes the idx-th step of a splitmix64 stream:
** 53 bits as a uniform in [0, 1), dropped below p. The kernels mix the
** seed once per call (drop_key) and draw through drop_keyed. */
static uint64_t drop_key(uint64_t seed) { return mix64(seed ^ 0x8CB92BA72F3D8DD7ull); }

static inline int drop_keyed(uint64_t key, uint64_t idx, double p) {
  uint64_t z = mix64(key + (idx + 1) * 0x9E3779B97F4A7C15ull);
  return (double)(z >> 11) * (1.0 / 9007199254740992.0) < p;
}

int kl_sdpa_drop(uint64_t seed, uint64_t idx, double p) { return drop_keyed(drop_key(seed), idx, p); }

/* }====================================================================== */

/* {======================================================================
** Row kernels, one set per dtype
**
** The tile drivers below are written once; what they do to each row of a
** score tile goes through a row_ops table picked by dtype, so the inner
** loops have no dtype, mask or bias tests in them. float32 runs 4 lanes
** at a time (GCC/Clang vector types) with an exp of its own, since libm's
** expf is one call per element and no compiler vectorizes it at -O2;
** float64 stays on libm's exp (the agreement with the composed path to
** ~1e-12 depends on it).
** ======================================================================= */

typedef struct row_ops {
  /* x[c] = x[c] * scale + bias[c * bcs] (bias may be NULL), c < n */
  void (*prep)(void *x, int64_t n, double scale, const void *bias, int64_t bcs);
  /* the largest x[c] (NaN skipped), -inf when none */
  double (*max)(const void *x, int64_t n);
  /* x[c] = exp(x[c] - m); the sum of the results */
  double (*exps)(void *x, int64_t n, double m);
  /* x[c] *= a */
  void (*scal)(void *x, int64_t n, double a);
  /* sum of a[c] * b[c] */
  double (*dot)(const void *a, const void *b, int64_t n);
  /* g = p != 0 ? p (ds - D) : 0 (a masked weight, or a fully masked row
  ** whose D is NaN, passes nothing on); db[c] = g when db, ds[c] = g scale */
  void (*dsc)(void *ds, const void *p, int64_t n, double D, double scale, void *db);
} row_ops;

/* ---- float64: plain loops over libm */

static void prep_f64(void *xv, int64_t n, double scale, const void *bias, int64_t bcs) {
  double *x = (double *)xv;
  const double *b = (const double *)bias;
  if (b)
    for (int64_t c = 0; c < n; c++) x[c] = x[c] * scale + b[c * bcs];
  else
    for (int64_t c = 0; c < n; c++) x[c] *= scale;
}

static double max_f64(const void *xv, int64_t n) {
  const double *x = (const double *)xv;
  double m = -INFINITY;
  for (int64_t c = 0; c < n; c++) if (x[c] > m) m = x[c];
  return m;
}

static double exps_f64(void *xv, int64_t n, double m) {
  double *x = (double *)xv, sum = 0;
  for (int64_t c = 0; c < n; c++) sum += (x[c] = exp(x[c] - m));
  return sum;
}

static void scal_f64(void *xv, int64_t n, double a) {
  double *x = (double *)xv;
  for (int64_t c = 0; c < n; c++) x[c] *= a;
}

static double dot_f64(const void *av, const void *bv, int64_t n) {
  const double *a = (const double *)av, *b = (const double *)bv;
  double d = 0;
  for (int64_t c = 0; c < n; c++) d += a[c] * b[c];
  return d;
}

static void dsc_f64(void *dsv, const void *pv, int64_t n, double D, double scale, void *dbv) {
  double *ds = (double *)dsv, *db = (double *)dbv;
  const double *p = (const double *)pv;
  for (int64_t c = 0; c < n; c++) {
    double g = p[c] != 0 ? p[c] * (ds[c] - D) : 0;
    if (db) db[c] = g;
    ds[c] = g * scale;
  }
}

static const row_ops ops_f64 = {prep_f64, max_f64, exps_f64, scal_f64, dot_f64, dsc_f64};

/* ---- float32: 4 lanes, scalar tails through the same formulas */

/* exp of a float: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so
** n ln2 is exact), exp(r) by its Taylor series to r^7 (truncation below
** 1e-8 relative), times 2^n built in the exponent bits. Within 1.2 ulp of
** the true exp over [-87, 0.5]; below -87 it gives 0 (libm gives
** subnormals down to -104: weights below 2^-125 of the row's largest),
** -inf gives exactly 0 (a masked score's weight), NaN stays NaN, above 88
** +inf. n comes out of the rounding constant's low bits (t = x log2e +
** 1.5 2^23), not from a float-to-int conversion, which NaN would make
** undefined. */
#define EXP_LO (-87.0f)
#define EXP_HI 88.0f
#define EXP_SHIFT 12582912.0f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693145751953125f
#define LN2_LO 1.42860682030941723212e-6f

static inline float exp_poly(float r) {
  float p = 1.0f / 5040 * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

static inline float exp_f32(float x) {
  float t, n, y;
  int32_t e, ts, ss;
  const float shift = EXP_SHIFT;
  if (x != x) return x;
  if (x < EXP_LO) return 0;
  if (x > EXP_HI) return INFINITY;
  t = x * LOG2E + shift;
  n = t - shift;
  memcpy(&ts, &t, sizeof ts);
  memcpy(&ss, &shift, sizeof ss);
  e = (ts - ss + 127) * (1 << 23);
  memcpy(&y, &e, sizeof y);
  return exp_poly((x - n * LN2_HI) - n * LN2_LO) * y;
}

#if defined(__GNUC__)
#define VEC 4
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));

static inline f32x4 splat(float x) { f32x4 v = {x, x, x, x}; return v; }
static inline f32x4 ld4(const float *p) { f32x4 v; memcpy(&v, p, sizeof v); return v; }
static inline void st4(float *p, f32x4 v) { memcpy(p, &v, sizeof v); }
/* lanes of a where m is all ones, of b where it is 0 */
static inline f32x4 sel4(i32x4 m, f32x4 a, f32x4 b) { return (f32x4)((m & (i32x4)a) | (~m & (i32x4)b)); }

/* exp_f32 lane by lane (the same operations, so the same bits) */
static inline f32x4 exp4(f32x4 x) {
  const f32x4 shift = splat(EXP_SHIFT);
  i32x4 under = x < splat(EXP_LO), over = x > splat(EXP_HI);
  f32x4 xc = sel4(over, splat(EXP_HI), sel4(under, splat(EXP_LO), x));
  f32x4 t = xc * LOG2E + shift, n = t - shift;
  f32x4 r = (xc - n * LN2_HI) - n * LN2_LO;
  f32x4 p = splat(1.0f / 5040) * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  p = p * (f32x4)(((u32x4)t - (u32x4)shift + 127) << 23);   /* unsigned: a NaN lane's bits wrap */
  return sel4(over, splat(INFINITY), sel4(under, splat(0), p));   /* NaN lanes compare false: stay NaN */
}
static inline float hsum4(f32x4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }
#else
#define VEC 1   /* no vector types: the scalar tails do everything */
#endif

/* the lanes' share of n: elements [0, body) go 4 at a time */
#define BODY(n) ((n) - (n) % VEC)

static void prep_f32(void *xv, int64_t n, double scale, const void *bias, int64_t bcs) {
  float *x = (float *)xv, s = (float)scale;
  const float *b = (const float *)bias;
  int64_t c = 0;
  if (b && bcs != 1) {
    for (; c < n; c++) x[c] = x[c] * s + b[c * bcs];
    return;
  }
#if VEC > 1
  for (; c < BODY(n); c += VEC) {
    f32x4 v = ld4(x + c) * s;
    st4(x + c, b ? v + ld4(b + c) : v);
  }
#endif
  for (; c < n; c++) x[c] = b ? x[c] * s + b[c] : x[c] * s;
}

static double max_f32(const void *xv, int64_t n) {
  const float *x = (const float *)xv;
  float m = -INFINITY;
  int64_t c = 0;
#if VEC > 1
  if (n >= VEC) {
    f32x4 mv = splat(-INFINITY);
    for (; c < BODY(n); c += VEC) {
      f32x4 v = ld4(x + c);
      mv = sel4(v > mv, v, mv);
    }
    for (int i = 0; i < VEC; i++) if (mv[i] > m) m = mv[i];
  }
#endif
  for (; c < n; c++) if (x[c] > m) m = x[c];
  return m;
}

static double exps_f32(void *xv, int64_t n, double md) {
  float *x = (float *)xv, m = (float)md, sum = 0;
  int64_t c = 0;
#if VEC > 1
  f32x4 sv = splat(0);
  for (; c < BODY(n); c += VEC) {
    f32x4 p = exp4(ld4(x + c) - m);
    st4(x + c, p);
    sv += p;
  }
  sum = hsum4(sv);
#endif
  for (; c < n; c++) sum += (x[c] = exp_f32(x[c] - m));
  return sum;
}

static void scal_f32(void *xv, int64_t n, double ad) {
  float *x = (float *)xv, a = (float)ad;
  int64_t c = 0;
#if VEC > 1
  for (; c < BODY(n); c += VEC) st4(x + c, ld4(x + c) * a);
#endif
  for (; c < n; c++) x[c] *= a;
}

/* D is a difference's subtrahend in dS: summed in double, as float64 */
static double dot_f32(const void *av, const void *bv, int64_t n) {
  const float *a = (const float *)av, *b = (const float *)bv;
  double d = 0;
  for (int64_t c = 0; c < n; c++) d += (double)a[c] * b[c];
  return d;
}

static void dsc_f32(void *dsv, const void *pv, int64_t n, double Dd, double scaled, void *dbv) {
  float *ds = (float *)dsv, *db = (float *)dbv, D = (float)Dd, scale = (float)scaled;
  const float *p = (const float *)pv;
  int64_t c = 0;
#if VEC > 1
  for (; c < BODY(n); c += VEC) {
    f32x4 pc = ld4(p + c);
    f32x4 g = sel4(pc != splat(0), pc * (ld4(ds + c) - D), splat(0));
    if (db) st4(db + c, g);
    st4(ds + c, g * scale);
  }
#endif
  for (; c < n; c++) {
    float g = p[c] != 0 ? p[c] * (ds[c] - D) : 0;
    if (db) db[c] = g;
    ds[c] = g * scale;
  }
}

static const row_ops ops_f32 = {prep_f32, max_f32, exps_f32, scal_f32, dot_f32, dsc_f32};

/* }====================================================================== */

/* {======================================================================
** Shared pieces of the drivers
** ======================================================================= */

typedef struct tile_ctx {
  const kl_sdpa_args *a;
  const row_ops *ops;
  int64_t es;                   /* element size */
  const char *bias;             /* element (0, 0) of batch b's bias, or NULL */
  int64_t brs, bcs;             /* bias row and column strides */
  uint64_t key;                 /* the mixed dropout seed (drop_key) */
  double keep;                  /* 1/(1-p): a kept weight's scale */
} tile_ctx;

static void tile_init(tile_ctx *t, const kl_sdpa_args *a) {
  t->a = a;
  t->ops = a->q->dtype == KEEL_F64 ? &ops_f64 : &ops_f32;
  t->es = (int64_t)kl_dtype_size[a->q->dtype];
  t->bias = NULL;
  t->brs = t->bcs = 0;
  t->key = drop_key(a->seed);
  t->keep = a->p < 1 ? 1.0 / (1.0 - a->p) : 0.0;
}

/* The offset of batch b's [L, S] plane of the bias view (leading dims
** unravelled over its shape, broadcast ones with stride 0). */
static int64_t bias_offset(const keel_tensor *bias, int64_t b) {
  int64_t off = 0;
  for (int d = bias->ndim - 3; d >= 0; d--) {
    int64_t q = b / bias->shape[d];
    off += (b - q * bias->shape[d]) * bias->stride[d];
    b = q;
  }
  return off;
}

static void tile_batch(tile_ctx *t, int64_t b) {
  const keel_tensor *bias = t->a->bias;
  t->bias = NULL;
  if (!bias) return;
  t->bias = (const char *)kl_data(bias) + bias_offset(bias, b) * t->es;
  t->brs = bias->stride[bias->ndim - 2];
  t->bcs = bias->stride[bias->ndim - 1];
}

/* Row i's bias from key j0 on, or NULL. */
static const void *bias_row(const tile_ctx *t, int64_t i, int64_t j0) {
  return t->bias ? t->bias + (i * t->brs + j0 * t->bcs) * t->es : NULL;
}

/* How many of the nj keys from j0 row i sees: under the causal mask keys
** j > i are -inf, so their weights are 0 and only a prefix is worked on. */
static int64_t visible(const kl_sdpa_args *a, int64_t i, int64_t j0, int64_t nj) {
  int64_t n;
  if (!a->causal) return nj;
  n = i + 1 - j0;
  return n < 0 ? 0 : n < nj ? n : nj;
}

/* Row tiles per head. */
static int64_t row_tiles(const kl_sdpa_args *a) { return (a->L + BQ - 1) / BQ; }

/* The last key a tile of rows [i0, i1) sees, plus one. */
static int64_t key_end(const kl_sdpa_args *a, int64_t i1) {
  if (a->causal && i1 < a->S) return i1;
  return a->S;
}

/* Dropout of weights (b, i, j0 + c), c < n, in place: 0 or x/(1-p). */
static void drop_row(const tile_ctx *t, int64_t b, int64_t i, int64_t j0, void *x, int64_t n) {
  const kl_sdpa_args *a = t->a;
  uint64_t idx = (uint64_t)((b * a->L + i) * a->S + j0);
  if (t->es == 8) {
    double *d = (double *)x;
    for (int64_t c = 0; c < n; c++) d[c] = drop_keyed(t->key, idx + (uint64_t)c, a->p) ? 0 : d[c] * t->keep;
  } else {
    float *f = (float *)x;
    for (int64_t c = 0; c < n; c++) f[c] = drop_keyed(t->key, idx + (uint64_t)c, a->p) ? 0 : (float)(f[c] * t->keep);
  }
}

/* t = x^T for x [nr, nj]. A head's keys and values are transposed once
** so that the products against them (scores, dP) take plain operands:
** OpenBLAS 0.3.21 runs a row-major A B^T of a 64 x 128 tile through its
** general driver, which wakes its own threads (whose spinning then
** competes with the workers, see Threads below), while A B and A^T B go
** to its small-matrix kernels on the calling thread. */
static void transpose(char *t, const char *x, int64_t nr, int64_t nj, int64_t es) {
  if (es == 8) {
    double *td = (double *)t;
    const double *xd = (const double *)x;
    for (int64_t r = 0; r < nr; r++)
      for (int64_t c = 0; c < nj; c++) td[c * nr + r] = xd[r * nj + c];
  } else {
    float *tf = (float *)t;
    const float *xf = (const float *)x;
    for (int64_t r = 0; r < nr; r++)
      for (int64_t c = 0; c < nj; c++) tf[c * nr + r] = xf[r * nj + c];
  }
}

static double ld(const void *p, int64_t i, int64_t es) {
  return es == 8 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static void st(void *p, int64_t i, double v, int64_t es) {
  if (es == 8) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}

/* }====================================================================== */

/* {======================================================================
** Forward
** ======================================================================= */

/* Rows [i0, i0+nr) of batch b: kt its keys transposed, sc the score
** tile, m and l the rows' running statistics. */
static keel_status fwd_rows(keel_ctx *ctx, const tile_ctx *t, int64_t b, int64_t i0, int64_t nr, const char *kt,
                            char *sc, double *m, double *l) {
  const kl_sdpa_args *a = t->a;
  const row_ops *ops = t->ops;
  int64_t es = t->es, E = a->E, Ev = a->Ev, S = a->S;
  const char *q = (const char *)kl_data(a->q) + (b * a->L + i0) * E * es;
  const char *v = (const char *)kl_data(a->v) + b * S * Ev * es;
  char *o = (char *)kl_data(a->out) + (b * a->L + i0) * Ev * es;
  int64_t jend = key_end(a, i0 + nr);
  keel_status s;
  memset(o, 0, (size_t)(nr * Ev * es));
  for (int64_t r = 0; r < nr; r++) { m[r] = -INFINITY; l[r] = 0; }
  for (int64_t j0 = 0; j0 < jend; j0 += BK) {
    int64_t nj = jend - j0 < BK ? jend - j0 : BK;
    if ((s = kl_cpu_gemm(ctx, a->q->dtype, 0, 0, nr, nj, E, q, E, kt + j0 * es, S, 0.0, sc, nj))) return s;
    for (int64_t r = 0; r < nr; r++) {
      int64_t i = i0 + r, nv = visible(a, i, j0, nj);
      char *x = sc + r * nj * es;
      double mn, alpha, sum;
      memset(x + nv * es, 0, (size_t)((nj - nv) * es));
      if (nv == 0) continue;    /* all masked here: m, l and the row stand */
      ops->prep(x, nv, a->scale, bias_row(t, i, j0), t->bcs);
      mn = ops->max(x, nv);
      if (m[r] > mn) mn = m[r];
      if (mn == -INFINITY) {    /* nothing seen yet: weights 0, nothing to rescale */
        memset(x, 0, (size_t)(nv * es));
        continue;
      }
      alpha = exp(m[r] - mn);   /* 0 when m was -inf */
      sum = ops->exps(x, nv, mn);
      if (a->p > 0) drop_row(t, b, i, j0, x, nv);
      l[r] = l[r] * alpha + sum;
      m[r] = mn;
      if (alpha != 1) ops->scal(o + r * Ev * es, Ev, alpha);
    }
    if ((s = kl_cpu_gemm(ctx, a->q->dtype, 0, 0, nr, Ev, nj, sc, nj, v + j0 * Ev * es, Ev, 1.0, o, Ev))) return s;
  }
  for (int64_t r = 0; r < nr; r++) {
    int64_t row = b * a->L + i0 + r;
    if (l[r] == 0) {
      for (int64_t d = 0; d < Ev; d++) st(o, r * Ev + d, NAN, es);
      st(kl_data(a->lse), row, -INFINITY, es);
      continue;
    }
    ops->scal(o + r * Ev * es, Ev, 1 / l[r]);
    st(kl_data(a->lse), row, m[r] + log(l[r]), es);
  }
  return KEEL_OK;
}

/* Row tiles [t0, t1) of all heads' (b * row_tiles + i0 / BQ: rows are
** independent in forward, so a head may be split between workers); buf
** holds the score tile, then the head's keys transposed [E, S]
** (fwd_bytes). */
static size_t fwd_bytes(const kl_sdpa_args *a) {
  return kl_dtype_size[a->q->dtype] * (size_t)(BQ * BK + a->E * a->S);
}

static keel_status fwd_tiles(keel_ctx *ctx, const kl_sdpa_args *a, int64_t t0, int64_t t1, char *buf) {
  tile_ctx t;
  double ml[2 * BQ];
  keel_status s = KEEL_OK;
  char *sc = buf, *kt;
  int64_t rt = row_tiles(a), b = -1;
  tile_init(&t, a);
  kt = buf + t.es * BQ * BK;
  for (int64_t x = t0; x < t1 && !s; x++) {
    int64_t i0 = x % rt * BQ;
    if (x / rt != b) {
      b = x / rt;
      tile_batch(&t, b);
      transpose(kt, (const char *)kl_data(a->k) + b * a->S * a->E * t.es, a->S, a->E, t.es);
    }
    s = fwd_rows(ctx, &t, b, i0, a->L - i0 < BQ ? a->L - i0 : BQ, kt, sc, ml, ml + BQ);
  }
  return s;
}

/* }====================================================================== */

/* {======================================================================
** Backward
** ======================================================================= */

typedef struct bwd_bufs {
  char *p, *pd, *ds;            /* tiles: weights, dropped weights, dP then dS */
  char *kt, *vt;                /* the head's keys [E, S] and values [Ev, S] transposed */
  double D[BQ];
} bwd_bufs;

static keel_status bwd_rows(keel_ctx *ctx, const tile_ctx *t, int64_t b, int64_t i0, int64_t nr, bwd_bufs *w) {
  const kl_sdpa_args *a = t->a;
  const row_ops *ops = t->ops;
  keel_dtype dt = a->q->dtype;
  int64_t es = t->es, E = a->E, Ev = a->Ev, S = a->S, L = a->L;
  const char *q = (const char *)kl_data(a->q) + (b * L + i0) * E * es;
  const char *k = (const char *)kl_data(a->k) + b * S * E * es;
  const char *o = (const char *)kl_data(a->out) + (b * L + i0) * Ev * es;
  const char *go = (const char *)kl_data(a->gout) + (b * L + i0) * Ev * es;
  const void *lse = kl_data(a->lse);
  char *dq = a->dq ? (char *)kl_data(a->dq) + (b * L + i0) * E * es : NULL;
  char *dk = a->dk ? (char *)kl_data(a->dk) + b * S * E * es : NULL;
  char *dv = a->dv ? (char *)kl_data(a->dv) + b * S * Ev * es : NULL;
  char *db = a->dbias ? (char *)kl_data(a->dbias) + (b * L + i0) * S * es : NULL;
  int64_t jend = key_end(a, i0 + nr);
  keel_status s;
  for (int64_t r = 0; r < nr; r++) w->D[r] = ops->dot(go + r * Ev * es, o + r * Ev * es, Ev);
  /* the keys a causal tile skips get no gradient from it */
  if (db && jend < S)
    for (int64_t r = 0; r < nr; r++) memset(db + (r * S + jend) * es, 0, (size_t)((S - jend) * es));
  for (int64_t j0 = 0; j0 < jend; j0 += BK) {
    int64_t nj = jend - j0 < BK ? jend - j0 : BK;
    /* without dropout the dropped weights are the weights */
    char *pd = a->p > 0 ? w->pd : w->p;
    if ((s = kl_cpu_gemm(ctx, dt, 0, 0, nr, nj, E, q, E, w->kt + j0 * es, S, 0.0, w->p, nj))) return s;
    for (int64_t r = 0; r < nr; r++) {
      int64_t i = i0 + r, nv = visible(a, i, j0, nj);
      double m = ld(lse, b * L + i, es);
      char *x = w->p + r * nj * es;
      if (m == -INFINITY) nv = 0;   /* a fully masked row: weights 0 */
      memset(x + nv * es, 0, (size_t)((nj - nv) * es));
      if (nv > 0) {
        ops->prep(x, nv, a->scale, bias_row(t, i, j0), t->bcs);
        ops->exps(x, nv, m);
      }
      if (a->p > 0) {
        memcpy(pd + r * nj * es, x, (size_t)(nj * es));
        drop_row(t, b, i, j0, pd + r * nj * es, nv);
      }
    }
    /* dV_j += Pd^T dO */
    if (dv && (s = kl_cpu_gemm(ctx, dt, 1, 0, nj, Ev, nr, pd, nj, go, Ev, 1.0, dv + j0 * Ev * es, Ev))) return s;
    if (!dq && !dk && !db) continue;
    /* dP = (dO V_j^T) * keep, dS = P (dP - D) */
    if ((s = kl_cpu_gemm(ctx, dt, 0, 0, nr, nj, Ev, go, Ev, w->vt + j0 * es, S, 0.0, w->ds, nj))) return s;
    for (int64_t r = 0; r < nr; r++) {
      char *x = w->ds + r * nj * es;
      /* past the visible keys p == 0 and dS is 0 whatever dP is */
      if (a->p > 0) drop_row(t, b, i0 + r, j0, x, visible(a, i0 + r, j0, nj));
      ops->dsc(x, w->p + r * nj * es, nj, w->D[r], a->scale, db ? db + (r * S + j0) * es : NULL);
    }
    if (dq && (s = kl_cpu_gemm(ctx, dt, 0, 0, nr, E, nj, w->ds, nj, k + j0 * E * es, E, 1.0, dq, E))) return s;
    if (dk && (s = kl_cpu_gemm(ctx, dt, 1, 0, nj, E, nr, w->ds, nj, q, E, 1.0, dk + j0 * E * es, E))) return s;
  }
  return KEEL_OK;
}

/* Heads [b0, b1); buf holds the tiles p, dS (and pd under dropout),
** then kt and vt (bwd_bytes). */
static size_t bwd_bytes(const kl_sdpa_args *a) {
  return kl_dtype_size[a->q->dtype] * (size_t)((a->p > 0 ? 3 : 2) * BQ * BK + (a->E + a->Ev) * a->S);
}

static keel_status bwd_heads(keel_ctx *ctx, const kl_sdpa_args *a, int64_t b0, int64_t b1, char *buf) {
  tile_ctx t;
  bwd_bufs w;
  keel_status s = KEEL_OK;
  int64_t tb;
  tile_init(&t, a);
  tb = t.es * BQ * BK;
  w.p = buf;
  w.ds = buf + tb;
  w.pd = a->p > 0 ? buf + 2 * tb : NULL;
  w.kt = buf + (a->p > 0 ? 3 : 2) * tb;
  w.vt = w.kt + a->E * a->S * t.es;
  for (int64_t b = b0; b < b1 && !s; b++) {
    tile_batch(&t, b);
    transpose(w.kt, (const char *)kl_data(a->k) + b * a->S * a->E * t.es, a->S, a->E, t.es);
    transpose(w.vt, (const char *)kl_data(a->v) + b * a->S * a->Ev * t.es, a->S, a->Ev, t.es);
    for (int64_t i0 = 0; i0 < a->L && !s; i0 += BQ)
      s = bwd_rows(ctx, &t, b, i0, a->L - i0 < BQ ? a->L - i0 : BQ, &w);
  }
  return s;
}

/* }====================================================================== */

/* {======================================================================
** Threads: the heads split over workers
**
** The engine has no thread pool, and the tiles' products are too small
** for OpenBLAS to spread well (most run on the calling thread, and the
** exps between them always do), so the kernels start their own workers
** for a call: each takes a contiguous range of heads with tiles of its
** own. Heads share nothing they write (dq, dk, dv, dbias, out and lse
** rows are per head), and each head runs exactly as it would alone, so
** the results do not depend on the number of workers.
**
** Workers touch no context state: kl_cpu_gemm at the highest precision
** (float64 always is) neither allocates nor fails, so a reduced matmul
** precision, whose rounded copies are allocated from the context, runs on
** the calling thread alone. As many workers as OpenBLAS has threads
** (OPENBLAS_NUM_THREADS: one per core unless set; one per process under
** MPI), at most one per head, and one for a call too small to gain.
** ======================================================================= */

#define MAX_WORKERS 64

typedef struct attn_job {
  keel_ctx *ctx;
  const kl_sdpa_args *a;
  int backward;
  int64_t b0, b1;               /* its heads (backward) or row tiles (forward) */
  char *buf;                    /* its tiles */
  keel_status s;
} attn_job;

static void *job_run(void *p) {
  attn_job *j = (attn_job *)p;
  j->s = j->backward ? bwd_heads(j->ctx, j->a, j->b0, j->b1, j->buf) : fwd_tiles(j->ctx, j->a, j->b0, j->b1, j->buf);
  return NULL;
}

/* units: what the workers split (heads, or row tiles in forward) */
static int workers(const keel_ctx *ctx, const kl_sdpa_args *a, int64_t units) {
  int n = openblas_get_num_threads();
  if (a->q->dtype != KEEL_F64 && ctx->gemm_prec != KEEL_MATMUL_HIGHEST) return 1;
  /* a thread costs tens of microseconds: below ~2^16 multiply-adds, one */
  if ((double)a->B * (double)a->L * (double)a->S * (double)(a->E + a->Ev) < 65536.0) return 1;
  if (n > MAX_WORKERS) n = MAX_WORKERS;
  if (n > units) n = (int)units;
  return n < 1 ? 1 : n;
}

static keel_status run_jobs(keel_ctx *ctx, const kl_sdpa_args *a, int backward, size_t tb) {
  attn_job jobs[MAX_WORKERS];
  pthread_t th[MAX_WORKERS];
  int started[MAX_WORKERS];
  int64_t units = backward ? a->B : a->B * row_tiles(a);
  int n = workers(ctx, a, units);
  size_t bytes = tb * (size_t)n;
  char *buf = (char *)kl_cpu_alloc(ctx, bytes);
  keel_status s = KEEL_OK;
  if (!buf)
    return kl_error(ctx, KEEL_ERR_NOMEM, "scaled_dot_product_attention%s: out of memory", backward ? " backward" : "");
  for (int w = 0; w < n; w++) {
    jobs[w].ctx = ctx;
    jobs[w].a = a;
    jobs[w].backward = backward;
    jobs[w].b0 = units * w / n;
    jobs[w].b1 = units * (w + 1) / n;
    jobs[w].buf = buf + tb * (size_t)w;
    jobs[w].s = KEEL_OK;
  }
  /* a worker that cannot start runs on this thread after the others */
  for (int w = 1; w < n; w++) started[w] = pthread_create(&th[w], NULL, job_run, &jobs[w]) == 0;
  job_run(&jobs[0]);
  for (int w = 1; w < n; w++) {
    if (started[w]) pthread_join(th[w], NULL);
    else job_run(&jobs[w]);
  }
  for (int w = 0; w < n && !s; w++) s = jobs[w].s;
  kl_cpu_free(ctx, buf, bytes);
  return s;
}

keel_status kl_cpu_sdpa_forward(keel_ctx *ctx, const kl_sdpa_args *a) {
  return run_jobs(ctx, a, 0, fwd_bytes(a));
}

keel_status kl_cpu_sdpa_backward(keel_ctx *ctx, const kl_sdpa_args *a) {
  size_t es = kl_dtype_size[a->q->dtype];
  if (a->dq) memset(kl_data(a->dq), 0, es * (size_t)a->dq->numel);
  if (a->dk) memset(kl_data(a->dk), 0, es * (size_t)a->dk->numel);
  if (a->dv) memset(kl_data(a->dv), 0, es * (size_t)a->dv->numel);
  return run_jobs(ctx, a, 1, bwd_bytes(a));
}

/* }====================================================================== */
