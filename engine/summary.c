/*
** summary.c: what the monitor needs from C (issue 4): CRC-32C for
** TensorBoard's record framing, fast histograms of a tensor, and PNG
** encoding for `keel plot`.
**
** PNG goes through stb_image_write (Debian's libstb-dev, public domain),
** compiled here with STB_IMAGE_WRITE_STATIC so that none of its symbols
** leave libkeel, and with zlib (already a dependency) doing the deflate:
** it compresses better and faster than stb's own.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include "keel_impl.h"

/* {====================================================================
** CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)
** ===================================================================== */

/* Table for one byte at a time, precomputed so that no mutable global is
** needed (a lazily filled table would race between contexts on threads). */
static const uint32_t crc32c_table[256] = {
  0x00000000u, 0xf26b8303u, 0xe13b70f7u, 0x1350f3f4u, 0xc79a971fu, 0x35f1141cu,
  0x26a1e7e8u, 0xd4ca64ebu, 0x8ad958cfu, 0x78b2dbccu, 0x6be22838u, 0x9989ab3bu,
  0x4d43cfd0u, 0xbf284cd3u, 0xac78bf27u, 0x5e133c24u, 0x105ec76fu, 0xe235446cu,
  0xf165b798u, 0x030e349bu, 0xd7c45070u, 0x25afd373u, 0x36ff2087u, 0xc494a384u,
  0x9a879fa0u, 0x68ec1ca3u, 0x7bbcef57u, 0x89d76c54u, 0x5d1d08bfu, 0xaf768bbcu,
  0xbc267848u, 0x4e4dfb4bu, 0x20bd8edeu, 0xd2d60dddu, 0xc186fe29u, 0x33ed7d2au,
  0xe72719c1u, 0x154c9ac2u, 0x061c6936u, 0xf477ea35u, 0xaa64d611u, 0x580f5512u,
  0x4b5fa6e6u, 0xb93425e5u, 0x6dfe410eu, 0x9f95c20du, 0x8cc531f9u, 0x7eaeb2fau,
  0x30e349b1u, 0xc288cab2u, 0xd1d83946u, 0x23b3ba45u, 0xf779deaeu, 0x05125dadu,
  0x1642ae59u, 0xe4292d5au, 0xba3a117eu, 0x4851927du, 0x5b016189u, 0xa96ae28au,
  0x7da08661u, 0x8fcb0562u, 0x9c9bf696u, 0x6ef07595u, 0x417b1dbcu, 0xb3109ebfu,
  0xa0406d4bu, 0x522bee48u, 0x86e18aa3u, 0x748a09a0u, 0x67dafa54u, 0x95b17957u,
  0xcba24573u, 0x39c9c670u, 0x2a993584u, 0xd8f2b687u, 0x0c38d26cu, 0xfe53516fu,
  0xed03a29bu, 0x1f682198u, 0x5125dad3u, 0xa34e59d0u, 0xb01eaa24u, 0x42752927u,
  0x96bf4dccu, 0x64d4cecfu, 0x77843d3bu, 0x85efbe38u, 0xdbfc821cu, 0x2997011fu,
  0x3ac7f2ebu, 0xc8ac71e8u, 0x1c661503u, 0xee0d9600u, 0xfd5d65f4u, 0x0f36e6f7u,
  0x61c69362u, 0x93ad1061u, 0x80fde395u, 0x72966096u, 0xa65c047du, 0x5437877eu,
  0x4767748au, 0xb50cf789u, 0xeb1fcbadu, 0x197448aeu, 0x0a24bb5au, 0xf84f3859u,
  0x2c855cb2u, 0xdeeedfb1u, 0xcdbe2c45u, 0x3fd5af46u, 0x7198540du, 0x83f3d70eu,
  0x90a324fau, 0x62c8a7f9u, 0xb602c312u, 0x44694011u, 0x5739b3e5u, 0xa55230e6u,
  0xfb410cc2u, 0x092a8fc1u, 0x1a7a7c35u, 0xe811ff36u, 0x3cdb9bddu, 0xceb018deu,
  0xdde0eb2au, 0x2f8b6829u, 0x82f63b78u, 0x709db87bu, 0x63cd4b8fu, 0x91a6c88cu,
  0x456cac67u, 0xb7072f64u, 0xa457dc90u, 0x563c5f93u, 0x082f63b7u, 0xfa44e0b4u,
  0xe9141340u, 0x1b7f9043u, 0xcfb5f4a8u, 0x3dde77abu, 0x2e8e845fu, 0xdce5075cu,
  0x92a8fc17u, 0x60c37f14u, 0x73938ce0u, 0x81f80fe3u, 0x55326b08u, 0xa759e80bu,
  0xb4091bffu, 0x466298fcu, 0x1871a4d8u, 0xea1a27dbu, 0xf94ad42fu, 0x0b21572cu,
  0xdfeb33c7u, 0x2d80b0c4u, 0x3ed04330u, 0xccbbc033u, 0xa24bb5a6u, 0x502036a5u,
  0x4370c551u, 0xb11b4652u, 0x65d122b9u, 0x97baa1bau, 0x84ea524eu, 0x7681d14du,
  0x2892ed69u, 0xdaf96e6au, 0xc9a99d9eu, 0x3bc21e9du, 0xef087a76u, 0x1d63f975u,
  0x0e330a81u, 0xfc588982u, 0xb21572c9u, 0x407ef1cau, 0x532e023eu, 0xa145813du,
  0x758fe5d6u, 0x87e466d5u, 0x94b49521u, 0x66df1622u, 0x38cc2a06u, 0xcaa7a905u,
  0xd9f75af1u, 0x2b9cd9f2u, 0xff56bd19u, 0x0d3d3e1au, 0x1e6dcdeeu, 0xec064eedu,
  0xc38d26c4u, 0x31e6a5c7u, 0x22b65633u, 0xd0ddd530u, 0x0417b1dbu, 0xf67c32d8u,
  0xe52cc12cu, 0x1747422fu, 0x49547e0bu, 0xbb3ffd08u, 0xa86f0efcu, 0x5a048dffu,
  0x8ecee914u, 0x7ca56a17u, 0x6ff599e3u, 0x9d9e1ae0u, 0xd3d3e1abu, 0x21b862a8u,
  0x32e8915cu, 0xc083125fu, 0x144976b4u, 0xe622f5b7u, 0xf5720643u, 0x07198540u,
  0x590ab964u, 0xab613a67u, 0xb831c993u, 0x4a5a4a90u, 0x9e902e7bu, 0x6cfbad78u,
  0x7fab5e8cu, 0x8dc0dd8fu, 0xe330a81au, 0x115b2b19u, 0x020bd8edu, 0xf0605beeu,
  0x24aa3f05u, 0xd6c1bc06u, 0xc5914ff2u, 0x37faccf1u, 0x69e9f0d5u, 0x9b8273d6u,
  0x88d28022u, 0x7ab90321u, 0xae7367cau, 0x5c18e4c9u, 0x4f48173du, 0xbd23943eu,
  0xf36e6f75u, 0x0105ec76u, 0x12551f82u, 0xe03e9c81u, 0x34f4f86au, 0xc69f7b69u,
  0xd5cf889du, 0x27a40b9eu, 0x79b737bau, 0x8bdcb4b9u, 0x988c474du, 0x6ae7c44eu,
  0xbe2da0a5u, 0x4c4623a6u, 0x5f16d052u, 0xad7d5351u,
};

uint32_t keel_crc32c(uint32_t crc, const void *data, size_t n) {
  const unsigned char *p = (const unsigned char *)data;
  crc = ~crc;
  while (n--) crc = crc32c_table[(crc ^ *p++) & 0xffu] ^ (crc >> 8);
  return ~crc;
}

/* TFRecord stores CRCs masked, because a CRC of data that itself holds
** CRCs is weak: rotate right by 15 bits and add a constant. */
uint32_t keel_crc32c_mask(uint32_t crc) {
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

/* }==================================================================== */

/* {====================================================================
** Histograms
** ===================================================================== */

/*
** The monitor histograms every weight and gradient of a model, so these
** loops are written for speed: a moments pass with independent
** accumulators and no NaN branches (a non-finite element makes the sums
** non-finite, and only then is the data read again element by element),
** and a bucket pass that counts integers in four interleaved
** sub-histograms (runs of one bucket would otherwise serialise on one
** counter).
*/

typedef struct moments {
  int64_t n, nan, inf;
  double min, max, sum, sumsq;
} moments;

/* Element by element: counts NaN and Inf and skips them. */
#define MOMENTS_CAREFUL(T)                                                    \
  static void moments_careful_##T(const T *p, int64_t m, moments *r) {        \
    int64_t k, n = 0, nan = 0, inf = 0;                                       \
    double mn = INFINITY, mx = -INFINITY, sum = 0, sq = 0;                    \
    for (k = 0; k < m; k++) {                                                 \
      double x = (double)p[k];                                                \
      if (x != x) { nan++; continue; }                                        \
      if (x == INFINITY || x == -INFINITY) { inf++; continue; }               \
      if (x < mn) mn = x;                                                     \
      if (x > mx) mx = x;                                                     \
      sum += x;                                                               \
      sq += x * x;                                                            \
      n++;                                                                    \
    }                                                                         \
    r->n = n; r->nan = nan; r->inf = inf;                                     \
    r->min = mn; r->max = mx; r->sum = sum; r->sumsq = sq;                    \
  }

/* Four lanes; falls back to the careful pass when the sums are not finite
** (a NaN or Inf element, or a float64 sum of squares that overflows;
** float32 squares summed in double cannot overflow). */
#define MOMENTS_FAST(T)                                                       \
  static void moments_##T(const T *p, int64_t m, moments *r) {                \
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0, q0 = 0, q1 = 0, q2 = 0, q3 = 0;    \
    double mn0 = INFINITY, mn1 = INFINITY, mx0 = -INFINITY, mx1 = -INFINITY;  \
    int64_t k = 0;                                                            \
    for (; k + 4 <= m; k += 4) {                                              \
      double a = (double)p[k], b = (double)p[k + 1];                          \
      double c = (double)p[k + 2], d = (double)p[k + 3];                      \
      s0 += a; s1 += b; s2 += c; s3 += d;                                     \
      q0 += a * a; q1 += b * b; q2 += c * c; q3 += d * d;                     \
      mn0 = a < mn0 ? a : mn0; mn1 = b < mn1 ? b : mn1;                       \
      mn0 = c < mn0 ? c : mn0; mn1 = d < mn1 ? d : mn1;                       \
      mx0 = a > mx0 ? a : mx0; mx1 = b > mx1 ? b : mx1;                       \
      mx0 = c > mx0 ? c : mx0; mx1 = d > mx1 ? d : mx1;                       \
    }                                                                         \
    for (; k < m; k++) {                                                      \
      double a = (double)p[k];                                                \
      s0 += a; q0 += a * a;                                                   \
      mn0 = a < mn0 ? a : mn0; mx0 = a > mx0 ? a : mx0;                       \
    }                                                                         \
    r->sum = (s0 + s1) + (s2 + s3);                                           \
    r->sumsq = (q0 + q1) + (q2 + q3);                                         \
    if (!isfinite(r->sum) || !isfinite(r->sumsq)) {                           \
      moments_careful_##T(p, m, r);                                           \
      return;                                                                 \
    }                                                                         \
    r->n = m; r->nan = 0; r->inf = 0;                                         \
    r->min = mn0 < mn1 ? mn0 : mn1;                                           \
    r->max = mx0 > mx1 ? mx0 : mx1;                                           \
  }

MOMENTS_CAREFUL(float)
MOMENTS_CAREFUL(double)
MOMENTS_CAREFUL(int64_t)
MOMENTS_FAST(double)

#if defined(__SSE2__) && !defined(KEEL_NO_VECTOR)
#include <emmintrin.h>
/* float32 with SSE2: min and max in float lanes (exact), sums in double
** lanes; the same fallback as MOMENTS_FAST. */
static void moments_float(const float *p, int64_t m, moments *r) {
  __m128d s0 = _mm_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
  __m128 mn = _mm_set1_ps(INFINITY), mx = _mm_set1_ps(-INFINITY);
  double sv[2], qv[2];
  float mnv[4], mxv[4];
  double sum = 0, sq = 0, lo, hi;
  int64_t k = 0;
  for (; k + 4 <= m; k += 4) {
    __m128 x = _mm_loadu_ps(p + k);
    __m128d a = _mm_cvtps_pd(x), b = _mm_cvtps_pd(_mm_movehl_ps(x, x));
    s0 = _mm_add_pd(s0, a);
    s1 = _mm_add_pd(s1, b);
    q0 = _mm_add_pd(q0, _mm_mul_pd(a, a));
    q1 = _mm_add_pd(q1, _mm_mul_pd(b, b));
    mn = _mm_min_ps(mn, x);
    mx = _mm_max_ps(mx, x);
  }
  _mm_storeu_pd(sv, _mm_add_pd(s0, s1));
  _mm_storeu_pd(qv, _mm_add_pd(q0, q1));
  _mm_storeu_ps(mnv, mn);
  _mm_storeu_ps(mxv, mx);
  sum = sv[0] + sv[1];
  sq = qv[0] + qv[1];
  lo = fmin(fmin(mnv[0], mnv[1]), fmin(mnv[2], mnv[3]));
  hi = fmax(fmax(mxv[0], mxv[1]), fmax(mxv[2], mxv[3]));
  for (; k < m; k++) {
    double a = (double)p[k];
    sum += a;
    sq += a * a;
    lo = a < lo ? a : lo;
    hi = a > hi ? a : hi;
  }
  if (!isfinite(sum) || !isfinite(sq)) {
    moments_careful_float(p, m, r);
    return;
  }
  r->n = m; r->nan = 0; r->inf = 0;
  r->sum = sum; r->sumsq = sq; r->min = lo; r->max = hi;
}
#else
MOMENTS_FAST(float)
#endif

/* The uncommon path of the bucket loops: a value outside [lo, hi] (NaN
** and Inf were counted by the moments pass and are not counted again). */
#define OUTSIDE(x)                                                            \
  do {                                                                        \
    if ((x) != (x) || (x) == INFINITY || (x) == -INFINITY) break;             \
    if ((x) < lo) below++; else above++;                                      \
  } while (0)

/* Uniform buckets over [lo, hi]; hi itself (and rounding just below it)
** goes to the last bucket. c: 4 * nbins counters, zeroed. */
#define BIN_UNIFORM(T)                                                        \
  static void bin_uniform_##T(const T *p, int64_t m, double lo, double hi,    \
                              double scale, int nbins, int64_t *c,            \
                              int64_t *pbelow, int64_t *pabove) {             \
    int64_t k, below = 0, above = 0;                                          \
    for (k = 0; k < m; k++) {                                                 \
      double x = (double)p[k];                                                \
      int64_t b;                                                              \
      if (!(x >= lo && x <= hi)) { OUTSIDE(x); continue; }                    \
      b = (int64_t)((x - lo) * scale);                                        \
      if (b >= nbins) b = nbins - 1;                                          \
      c[(k & 3) * nbins + b]++;                                               \
    }                                                                         \
    *pbelow = below; *pabove = above;                                         \
  }

/* Given edges e[0..nbins] (strictly increasing): e[i] <= x < e[i+1], the
** last bucket closed; a binary search per element. */
#define BIN_EDGES(T)                                                          \
  static void bin_edges_##T(const T *p, int64_t m, const double *e,           \
                            int nbins, int64_t *c,                            \
                            int64_t *pbelow, int64_t *pabove) {               \
    int64_t k, below = 0, above = 0;                                          \
    double lo = e[0], hi = e[nbins];                                          \
    for (k = 0; k < m; k++) {                                                 \
      double x = (double)p[k];                                                \
      int a = 0, z = nbins;                                                   \
      if (!(x >= lo && x <= hi)) { OUTSIDE(x); continue; }                    \
      if (x == hi) { c[(k & 3) * nbins + nbins - 1]++; continue; }            \
      while (z - a > 1) {   /* e[a] <= x < e[z] */                            \
        int mid = (a + z) / 2;                                                \
        if (x < e[mid]) z = mid; else a = mid;                                \
      }                                                                       \
      c[(k & 3) * nbins + a]++;                                               \
    }                                                                         \
    *pbelow = below; *pabove = above;                                         \
  }

/* Uniform buckets when every value is known finite and inside [lo, hi]
** (the moments say so): no range test, four independent counters. */
#define BIN_UNIFORM_INSIDE(T)                                                 \
  static void bin_uniform_inside_##T(const T *p, int64_t m, double lo,        \
                                     double scale, int nbins, int64_t *c) {   \
    int64_t *c0 = c, *c1 = c + nbins, *c2 = c + 2 * nbins, *c3 = c + 3 * nbins; \
    int64_t k = 0, top = nbins - 1;                                           \
    for (; k + 4 <= m; k += 4) {                                              \
      int64_t b0 = (int64_t)(((double)p[k] - lo) * scale);                    \
      int64_t b1 = (int64_t)(((double)p[k + 1] - lo) * scale);                \
      int64_t b2 = (int64_t)(((double)p[k + 2] - lo) * scale);                \
      int64_t b3 = (int64_t)(((double)p[k + 3] - lo) * scale);                \
      c0[b0 < top ? b0 : top]++;                                              \
      c1[b1 < top ? b1 : top]++;                                              \
      c2[b2 < top ? b2 : top]++;                                              \
      c3[b3 < top ? b3 : top]++;                                              \
    }                                                                         \
    for (; k < m; k++) {                                                      \
      int64_t b = (int64_t)(((double)p[k] - lo) * scale);                     \
      c0[b < top ? b : top]++;                                                \
    }                                                                         \
  }

BIN_UNIFORM(float)
BIN_UNIFORM(double)
BIN_UNIFORM(int64_t)
BIN_UNIFORM_INSIDE(float)
BIN_UNIFORM_INSIDE(double)
BIN_UNIFORM_INSIDE(int64_t)
BIN_EDGES(float)
BIN_EDGES(double)
BIN_EDGES(int64_t)
#undef OUTSIDE

keel_status keel_histogram_compute(keel_ctx *ctx, keel_tensor *t, int nbins, const double *edges, double lo,
                                   double hi, double *counts, keel_histogram *out) {
  const char *fn = "histogram";
  keel_tensor *c = NULL;
  keel_status st;
  moments mo;
  int64_t *cnt, below = 0, above = 0, m;
  size_t csize;
  const void *d;
  int i, k;
  if (!t || !out || !counts) return kl_error(ctx, KEEL_ERR_ARG, "%s: NULL argument", fn);
  if ((st = kl_check_same_ctx(ctx, fn, t))) return st;
  if (nbins < 1 || nbins > (1 << 24))
    return kl_error(ctx, KEEL_ERR_ARG, "%s: bins must be in 1..16777216, got %d", fn, nbins);
  if (edges) {
    for (i = 0; i <= nbins; i++) {
      if (!isfinite(edges[i]))
        return kl_error(ctx, KEEL_ERR_ARG, "%s: edge %d is not finite", fn, i + 1);
      if (i > 0 && !(edges[i] > edges[i - 1]))
        return kl_error(ctx, KEEL_ERR_ARG, "%s: edges must increase strictly (edge %d is %g, edge %d is %g)", fn,
                        i, edges[i - 1], i + 1, edges[i]);
    }
  } else if (!isfinite(lo) || !isfinite(hi)) {
    return kl_error(ctx, KEEL_ERR_ARG, "%s: the range must be finite", fn);
  }
  csize = sizeof(int64_t) * 4 * (size_t)nbins;
  if (!(cnt = (int64_t *)kl_malloc(ctx, csize))) return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn);
  if (!kl_is_contiguous(t) || t->storage->device != KEEL_CPU) {
    /* a device tensor is binned on the host (one copy, every hist_every steps) */
    if ((st = t->storage->device != KEEL_CPU ? kl_transfer(ctx, t, KEEL_CPU, t->dtype, &c) : keel_contiguous(ctx, t, &c))) {
      kl_free(ctx, cnt, csize);
      return st;
    }
    t = c;
  }
  memset(cnt, 0, csize);
  memset(out, 0, sizeof *out);
  d = kl_data(t);
  m = t->numel;
  if (t->dtype == KEEL_F32) moments_float((const float *)d, m, &mo);
  else if (t->dtype == KEEL_F64) moments_double((const double *)d, m, &mo);
  else moments_careful_int64_t((const int64_t *)d, m, &mo);
  if (edges) {
    lo = edges[0];
    hi = edges[nbins];
    if (t->dtype == KEEL_F32) bin_edges_float((const float *)d, m, edges, nbins, cnt, &below, &above);
    else if (t->dtype == KEEL_F64) bin_edges_double((const double *)d, m, edges, nbins, cnt, &below, &above);
    else bin_edges_int64_t((const int64_t *)d, m, edges, nbins, cnt, &below, &above);
  } else {
    double scale;
    if (!(lo < hi)) {   /* no range given: the data's own */
      lo = mo.n ? mo.min : 0.0;
      hi = mo.n ? mo.max : 0.0;
    }
    scale = nbins / (hi - lo);
    if (!(lo < hi)) {
      cnt[0] = mo.n;   /* every finite value equal (or none): one full bucket */
    } else {
      if (!isfinite(scale)) scale = 0;   /* a range so wide it overflows: all in bucket 1 */
      if (mo.nan == 0 && mo.inf == 0 && lo <= mo.min && mo.max <= hi) {
        if (t->dtype == KEEL_F32) bin_uniform_inside_float((const float *)d, m, lo, scale, nbins, cnt);
        else if (t->dtype == KEEL_F64) bin_uniform_inside_double((const double *)d, m, lo, scale, nbins, cnt);
        else bin_uniform_inside_int64_t((const int64_t *)d, m, lo, scale, nbins, cnt);
      } else if (t->dtype == KEEL_F32) {
        bin_uniform_float((const float *)d, m, lo, hi, scale, nbins, cnt, &below, &above);
      } else if (t->dtype == KEEL_F64) {
        bin_uniform_double((const double *)d, m, lo, hi, scale, nbins, cnt, &below, &above);
      } else {
        bin_uniform_int64_t((const int64_t *)d, m, lo, hi, scale, nbins, cnt, &below, &above);
      }
    }
  }
  for (i = 0; i < nbins; i++) {
    int64_t sum = 0;
    for (k = 0; k < 4; k++) sum += cnt[(size_t)k * (size_t)nbins + (size_t)i];
    counts[i] = (double)sum;
  }
  kl_free(ctx, cnt, csize);
  out->count = mo.n;
  out->nan = mo.nan;
  out->inf = mo.inf;
  out->below = below;
  out->above = above;
  out->min = mo.n ? mo.min : 0.0;
  out->max = mo.n ? mo.max : 0.0;
  out->sum = mo.sum;
  out->sumsq = mo.sumsq;
  out->lo = lo;
  out->hi = hi;
  keel_tensor_release(c);
  return KEEL_OK;
}

/* }==================================================================== */

/* {====================================================================
** PNG
** ===================================================================== */

/* zlib's deflate for stb_image_write; the buffer must come from malloc
** (stb frees it with free). */
static unsigned char *zlib_compress_for_stb(unsigned char *data, int len, int *out_len, int quality) {
  uLongf n = compressBound((uLong)len);
  unsigned char *buf = (unsigned char *)malloc(n ? n : 1);
  (void)quality;
  if (!buf) return NULL;
  if (compress2(buf, &n, data, (uLong)len, 6) != Z_OK) {
    free(buf);
    return NULL;
  }
  *out_len = (int)n;
  return buf;
}

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wmissing-prototypes"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-variable"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#endif
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#define STBI_WRITE_NO_STDIO
#define STBIW_ZLIB_COMPRESS zlib_compress_for_stb
#define STBIW_ASSERT(x) ((void)0)   /* never abort the host */
#include <stb/stb_image_write.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
/* GCC reports stb's static declarations that have no definition in this
** configuration (the HDR writer) at the end of the file, after the pop. */
#pragma GCC diagnostic ignored "-Wunused-function"
#endif

typedef struct png_sink {
  keel_png_write_fn fn;
  void *ud;
  int failed;
} png_sink;

static void png_sink_write(void *ud, void *data, int size) {
  png_sink *s = (png_sink *)ud;
  if (s->failed || size <= 0) return;
  if (s->fn(s->ud, data, (size_t)size)) s->failed = 1;
}

keel_status keel_png_encode(keel_ctx *ctx, int w, int h, int comp, const unsigned char *pixels,
                            keel_png_write_fn fn, void *ud) {
  png_sink s;
  if (!pixels || !fn) return kl_error(ctx, KEEL_ERR_ARG, "png_encode: NULL argument");
  if (w < 1 || h < 1 || w > 16384 || h > 16384)
    return kl_error(ctx, KEEL_ERR_ARG, "png_encode: size %dx%d, expected 1..16384 on each side", w, h);
  if (comp < 1 || comp > 4)
    return kl_error(ctx, KEEL_ERR_ARG, "png_encode: %d channels, expected 1..4", comp);
  s.fn = fn;
  s.ud = ud;
  s.failed = 0;
  if (!stbi_write_png_to_func(png_sink_write, &s, w, h, comp, pixels, w * comp))
    return kl_error(ctx, KEEL_ERR_NOMEM, "png_encode: out of memory");
  if (s.failed) return kl_error(ctx, KEEL_ERR_IO, "png_encode: the writer failed");
  return KEEL_OK;
}

/* }==================================================================== */
