/*
** backend_cpu_optim.c: CPU kernels of the optimizers and of clipping.
**
** - kl_cpu_grad_stats: the statistics pass (one read of a gradient and,
**   for the optimizer, of its parameter in the same loop).
** - kl_cpu_optim_update: one optimizer update of one parameter, with the
**   clip chain's scale and clamp bound applied to each gradient element as
**   it is read: clipping costs no pass of its own; the same loop sums the
**   squares of the changes it makes (the update's norm) and of the values
**   it writes (the next step's weight norm, so that its statistics need
**   not read the parameter).
** - kl_cpu_grad_scale_: in-place clipping for the standalone functions.
**
** Update formulas follow PyTorch 1.13's single-tensor code operation by
** operation, in the parameter's dtype with the hyper-parameters rounded to
** it, so float64 trajectories agree to the last bits or so (PyTorch fuses
** a + alpha * b into one FMA on its vector path; we round twice).
**
** Vector loops: GCC/Clang vector types (4 floats or 2 doubles) where the
** target has SSE2 or NEON, because -O2 keeps errno semantics for sqrt and
** then never vectorizes a loop with a square root in it. Each update body
** is written once against a lane type L (a scalar or a vector) and a few
** helpers that _Generic picks by type; the tail of a unit, and units with
** non-finite elements, run the same body on scalars. Lanes and scalars
** round alike (no FMA either way), so the results do not depend on which
** elements took the vector path.
**
** On x86-64 the statistics and the updates also exist for 8 floats or 4
** doubles at a time (AVX2, compiled for that target alone and chosen at
** run time, KEEL_SIMD=sse2 forbids it): both passes are bound by their
** arithmetic more than by memory with 16-byte vectors. The wider paths
** compute the same operations in the same order (no FMA: the target is
** avx2 only), and every sum goes through the same 8 lanes by position, so
** parameters, state and statistics have the same bits on either path.
*/
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "keel_impl.h"

/* {======================================================================
** Lane helpers
** ======================================================================= */

static inline float ld_f32(const float *p) { return *p; }
static inline double ld_f64(const double *p) { return *p; }
static inline void st_f32(float *p, float v) { *p = v; }
static inline void st_f64(double *p, double v) { *p = v; }
static inline float sel_f32(int m, float a, float b) { return m ? a : b; }
static inline double sel_f64(int m, double a, double b) { return m ? a : b; }

/* KEEL_NO_VECTOR builds the scalar loops only (to test them). */
#if defined(__GNUC__) && (defined(__SSE2__) || defined(__aarch64__)) && !defined(KEEL_NO_VECTOR)
#define KL_VECTOR 1
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x2 __attribute__((vector_size(16)));
typedef int32_t m32x4 __attribute__((vector_size(16)));
typedef int64_t m64x2 __attribute__((vector_size(16)));

#if defined(__SSE2__)
#include <emmintrin.h>
static inline f32x4 sqrt_f32x4(f32x4 x) { return (f32x4)_mm_sqrt_ps((__m128)x); }
static inline f64x2 sqrt_f64x2(f64x2 x) { return (f64x2)_mm_sqrt_pd((__m128d)x); }
/* For finite lanes only (the statistics' fast path). */
static inline f64x2 max_f64x2(f64x2 a, f64x2 b) { return (f64x2)_mm_max_pd((__m128d)a, (__m128d)b); }
static inline f32x4 max_f32x4(f32x4 a, f32x4 b) { return (f32x4)_mm_max_ps((__m128)a, (__m128)b); }
/* float lanes 0-1 and 2-3 as doubles */
static inline f64x2 lo_f64x2(f32x4 v) { return (f64x2)_mm_cvtps_pd((__m128)v); }
static inline f64x2 hi_f64x2(f32x4 v) { return (f64x2)_mm_cvtps_pd(_mm_movehl_ps((__m128)v, (__m128)v)); }
#else
#include <arm_neon.h>
static inline f32x4 sqrt_f32x4(f32x4 x) { return (f32x4)vsqrtq_f32((float32x4_t)x); }
static inline f64x2 sqrt_f64x2(f64x2 x) { return (f64x2)vsqrtq_f64((float64x2_t)x); }
static inline f64x2 max_f64x2(f64x2 a, f64x2 b) { return (f64x2)vmaxq_f64((float64x2_t)a, (float64x2_t)b); }
static inline f32x4 max_f32x4(f32x4 a, f32x4 b) { return (f32x4)vmaxq_f32((float32x4_t)a, (float32x4_t)b); }
static inline f64x2 lo_f64x2(f32x4 v) { return (f64x2)vcvt_f64_f32(vget_low_f32((float32x4_t)v)); }
static inline f64x2 hi_f64x2(f32x4 v) { return (f64x2)vcvt_high_f64_f32((float32x4_t)v); }
#endif

static inline f32x4 ld_f32x4(const float *p) { f32x4 v; memcpy(&v, p, sizeof v); return v; }
static inline f64x2 ld_f64x2(const double *p) { f64x2 v; memcpy(&v, p, sizeof v); return v; }
static inline void st_f32x4(float *p, f32x4 v) { memcpy(p, &v, sizeof v); }
static inline void st_f64x2(double *p, f64x2 v) { memcpy(p, &v, sizeof v); }
/* Comparisons of vectors give lanes of all ones or zeros. */
static inline f32x4 sel_f32x4(m32x4 m, f32x4 a, f32x4 b) {
  return (f32x4)((m & (m32x4)a) | (~m & (m32x4)b));
}
static inline f64x2 sel_f64x2(m64x2 m, f64x2 a, f64x2 b) {
  return (f64x2)((m & (m64x2)a) | (~m & (m64x2)b));
}

/* {------------------------------------------------------------------
** AVX2 lanes: helpers compiled for that target only, called only from
** functions compiled for it (AVX2_FN) after use_avx2() said yes.
** ------------------------------------------------------------------- */
#if defined(__x86_64__) && !defined(KEEL_NO_AVX2)
#define KL_AVX2 1
#define AVX2_FN __attribute__((target("avx2")))
#include <immintrin.h>
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int32_t m32x8 __attribute__((vector_size(32)));
typedef int64_t m64x4 __attribute__((vector_size(32)));

AVX2_FN static inline f32x8 ld_f32x8(const float *p) { f32x8 v; memcpy(&v, p, sizeof v); return v; }
AVX2_FN static inline f64x4 ld_f64x4(const double *p) { f64x4 v; memcpy(&v, p, sizeof v); return v; }
AVX2_FN static inline void st_f32x8(float *p, f32x8 v) { memcpy(p, &v, sizeof v); }
AVX2_FN static inline void st_f64x4(double *p, f64x4 v) { memcpy(p, &v, sizeof v); }
AVX2_FN static inline f32x8 sqrt_f32x8(f32x8 x) { return (f32x8)_mm256_sqrt_ps((__m256)x); }
AVX2_FN static inline f64x4 sqrt_f64x4(f64x4 x) { return (f64x4)_mm256_sqrt_pd((__m256d)x); }
AVX2_FN static inline f32x8 sel_f32x8(m32x8 m, f32x8 a, f32x8 b) {
  return (f32x8)((m & (m32x8)a) | (~m & (m32x8)b));
}
AVX2_FN static inline f64x4 sel_f64x4(m64x4 m, f64x4 a, f64x4 b) {
  return (f64x4)((m & (m64x4)a) | (~m & (m64x4)b));
}
AVX2_FN static inline f32x8 max_f32x8(f32x8 a, f32x8 b) { return (f32x8)_mm256_max_ps((__m256)a, (__m256)b); }
AVX2_FN static inline f64x4 max_f64x4(f64x4 a, f64x4 b) { return (f64x4)_mm256_max_pd((__m256d)a, (__m256d)b); }
/* float lanes 0-3 and 4-7 as doubles */
AVX2_FN static inline f64x4 lo_f64x4(f32x8 v) { return (f64x4)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)v)); }
AVX2_FN static inline f64x4 hi_f64x4(f32x8 v) { return (f64x4)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)v, 1)); }

#define LD_AVX2 , f32x8: ld_f32x8, f64x4: ld_f64x4
#define ST_AVX2 , f32x8: st_f32x8, f64x4: st_f64x4
#define SQRT_AVX2 , f32x8: sqrt_f32x8, f64x4: sqrt_f64x4
#define SEL_AVX2 , f32x8: sel_f32x8, f64x4: sel_f64x4

/* Whether this CPU runs the AVX2 paths: probed once per process (the CPU
** does not change; KEEL_SIMD=sse2 is read then too). */
static pthread_once_t simd_once = PTHREAD_ONCE_INIT;
static int simd_avx2;

static void simd_probe(void) {
  const char *e = getenv("KEEL_SIMD");
  __builtin_cpu_init();
  simd_avx2 = __builtin_cpu_supports("avx2") && !(e && strcmp(e, "sse2") == 0);
}

static int use_avx2(void) {
  pthread_once(&simd_once, simd_probe);
  return simd_avx2;
}
#else
#define KL_AVX2 0
#define LD_AVX2
#define ST_AVX2
#define SQRT_AVX2
#define SEL_AVX2
#endif
/* }------------------------------------------------------------------ */

#define LD(L, p) _Generic((L){0}, float: ld_f32, double: ld_f64, f32x4: ld_f32x4, f64x2: ld_f64x2 LD_AVX2)(p)
#define ST(p, v) _Generic((v), float: st_f32, double: st_f64, f32x4: st_f32x4, f64x2: st_f64x2 ST_AVX2)(p, v)
#define SQRT(x) _Generic((x), float: sqrtf, double: sqrt, f32x4: sqrt_f32x4, f64x2: sqrt_f64x2 SQRT_AVX2)(x)
#define SEL(m, a, b) \
  _Generic((a), float: sel_f32, double: sel_f64, f32x4: sel_f32x4, f64x2: sel_f64x2 SEL_AVX2)(m, a, b)
#else
#define KL_VECTOR 0
#define KL_AVX2 0
#define LD(L, p) _Generic((L){0}, float: ld_f32, double: ld_f64)(p)
#define ST(p, v) _Generic((v), float: st_f32, double: st_f64)(p, v)
#define SQRT(x) _Generic((x), float: sqrtf, double: sqrt)(x)
#define SEL(m, a, b) _Generic((a), float: sel_f32, double: sel_f64)(m, a, b)
#endif

/* s (of the element type) in every lane of L. */
#define BC(L, s) ((L){0} + (s))
/* torch.maximum: NaN wins. */
#define MAXN(a, b) SEL(((a) > (b)) | ((a) != (a)), (a), (b))
/* The clip chain's transform of one gradient value: clamp(g * a, lo, hi). */
#define CLIPPED(L, g) SEL((g) * BC(L, ca) < BC(L, lo), BC(L, lo), \
                          SEL((g) * BC(L, ca) > BC(L, hi), BC(L, hi), (g) * BC(L, ca)))

/* Runs BODY for elements [i0, i1): W at a time with the vector type V while
** they last, then one at a time with the scalar type T. BODY sees the lane
** type as L and the first element as i. */
#if KL_VECTOR
#define RUN_LANES(T, V, W, i0, i1, BODY) do { \
    int64_t i_ = (i0); \
    for (; i_ + (W) <= (i1); i_ += (W)) { typedef V L; const int64_t i = i_; BODY } \
    for (; i_ < (i1); i_++) { typedef T L; const int64_t i = i_; BODY } \
  } while (0)
#else
#define RUN_LANES(T, V, W, i0, i1, BODY) do { \
    for (int64_t i_ = (i0); i_ < (i1); i_++) { typedef T L; const int64_t i = i_; BODY } \
  } while (0)
#endif

/* }====================================================================== */

/* {======================================================================
** Statistics. Element j of a unit goes to lane j % 8 of the block of
** STATS_BLOCK elements it falls in; each lane is summed in the order of
** its elements, lanes are added pairwise, blocks in order. The order
** depends on nothing but the element's position, so a threaded version
** that sums blocks in parallel and adds them in order gets the same bits,
** and so do the scalar, SSE2 and AVX2 loops. Counts (NaN, Inf, zeros) and
** the max are exact in any order, so they are kept however is cheapest.
**
** The optimizer's pass reads each gradient block and the same block of
** the parameter in one loop (two streams, one pass): the weight's sum of
** squares costs no pass of its own.
** ======================================================================= */

#define STATS_BLOCK 4096

typedef struct stats_acc {
  double sq, ab, sm, mx, pw, wq;
  int64_t nan, inf, zeros;
} stats_acc;

/* The one order in which every path adds its 8 lanes. */
static double lanes8(const double *s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* Per-lane sums of a fast block: squares, |x|, x and the weight's
** squares, with the max |x| and the count of zeros. */
typedef struct lanes {
  double s[8], b[8], u[8], q[8], mx;
  int64_t z;
} lanes;

#if KL_VECTOR
/* Lane update of the SSE2 loop: the pair y holds lanes of the same
** positions in S (squares), B (|x|) and U (x). */
#define GL2(y, S, B, U) do { \
    f64x2 y_ = (y), a_ = (f64x2)((m64x2)y_ & nosign); \
    S += y_ * y_; B += a_; U += y_; \
  } while (0)
#define WL2(y, Q) do { f64x2 y_ = (y); Q += y_ * y_; } while (0)

/* The vector part of a fast block: groups of 8 elements from the start of
** g (and of w when W_ is 1). Written as a macro so that the loop with and
** the loop without the weight are each straight-line code (-O2 does not
** unswitch loops). */
#define FAST_SSE(W_) do { \
    if (dt == KEEL_F32) { \
      const float *x = (const float *)pg, *w = (const float *)pwt; \
      const m32x4 nosign32 = {INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX}; \
      const f32x4 zf = {0, 0, 0, 0}; \
      f32x4 mf = zf; \
      m32x4 zc = {0, 0, 0, 0}; \
      for (; j + 8 <= n; j += 8) { \
        f32x4 h0 = ld_f32x4(x + j), h1 = ld_f32x4(x + j + 4); \
        mf = max_f32x4(mf, max_f32x4((f32x4)((m32x4)h0 & nosign32), (f32x4)((m32x4)h1 & nosign32))); \
        zc += (h0 == zf) + (h1 == zf); \
        GL2(lo_f64x2(h0), s0, b0, u0); GL2(hi_f64x2(h0), s1, b1, u1); \
        GL2(lo_f64x2(h1), s2, b2, u2); GL2(hi_f64x2(h1), s3, b3, u3); \
        if (W_) { \
          f32x4 v0 = ld_f32x4(w + j), v1 = ld_f32x4(w + j + 4); \
          WL2(lo_f64x2(v0), q0); WL2(hi_f64x2(v0), q1); WL2(lo_f64x2(v1), q2); WL2(hi_f64x2(v1), q3); \
        } \
      } \
      for (int l = 0; l < 4; l++) { out->mx = (double)mf[l] > out->mx ? (double)mf[l] : out->mx; out->z -= zc[l]; } \
    } else { \
      const double *x = (const double *)pg, *w = (const double *)pwt; \
      const f64x2 zd = {0, 0}; \
      f64x2 md = zd; \
      m64x2 zc = {0, 0}; \
      for (; j + 8 <= n; j += 8) { \
        f64x2 y0 = ld_f64x2(x + j), y1 = ld_f64x2(x + j + 2), y2 = ld_f64x2(x + j + 4), y3 = ld_f64x2(x + j + 6); \
        md = max_f64x2(md, max_f64x2(max_f64x2((f64x2)((m64x2)y0 & nosign), (f64x2)((m64x2)y1 & nosign)), \
                                     max_f64x2((f64x2)((m64x2)y2 & nosign), (f64x2)((m64x2)y3 & nosign)))); \
        zc += ((y0 == zd) + (y1 == zd)) + ((y2 == zd) + (y3 == zd)); \
        GL2(y0, s0, b0, u0); GL2(y1, s1, b1, u1); GL2(y2, s2, b2, u2); GL2(y3, s3, b3, u3); \
        if (W_) { \
          WL2(ld_f64x2(w + j), q0); WL2(ld_f64x2(w + j + 2), q1); \
          WL2(ld_f64x2(w + j + 4), q2); WL2(ld_f64x2(w + j + 6), q3); \
        } \
      } \
      for (int l = 0; l < 2; l++) { out->mx = md[l] > out->mx ? md[l] : out->mx; out->z -= zc[l]; } \
    } \
  } while (0)

/* Lanes 2l, 2l+1 of four pairs into d[0..7]. */
static void unpack2(double *d, f64x2 a, f64x2 b, f64x2 c, f64x2 e) {
  d[0] = a[0]; d[1] = a[1]; d[2] = b[0]; d[3] = b[1]; d[4] = c[0]; d[5] = c[1]; d[6] = e[0]; d[7] = e[1];
}

/* Fills out from the first n & ~7 elements; returns how many it took. */
static int64_t fast_sse(const void *pg, const void *pwt, keel_dtype dt, int64_t n, lanes *out) {
  const m64x2 nosign = {INT64_MAX, INT64_MAX};
  const f64x2 zero = {0, 0};
  f64x2 s0 = zero, s1 = zero, s2 = zero, s3 = zero, b0 = zero, b1 = zero, b2 = zero, b3 = zero;
  f64x2 u0 = zero, u1 = zero, u2 = zero, u3 = zero, q0 = zero, q1 = zero, q2 = zero, q3 = zero;
  int64_t j = 0;
  if (pwt) FAST_SSE(1); else FAST_SSE(0);
  unpack2(out->s, s0, s1, s2, s3);
  unpack2(out->b, b0, b1, b2, b3);
  unpack2(out->u, u0, u1, u2, u3);
  unpack2(out->q, q0, q1, q2, q3);
  return j;
}
#endif

#if KL_AVX2
/* The same with 4 lanes a vector: lo holds lanes 0-3, hi lanes 4-7. */
#define GL4(y, S, B, U) do { \
    f64x4 y_ = (y), a_ = (f64x4)((m64x4)y_ & nosign); \
    S += y_ * y_; B += a_; U += y_; \
  } while (0)
#define WL4(y, Q) do { f64x4 y_ = (y); Q += y_ * y_; } while (0)

#define FAST_AVX2(W_) do { \
    if (dt == KEEL_F32) { \
      const float *x = (const float *)pg, *w = (const float *)pwt; \
      const m32x8 nosign32 = {INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX}; \
      const f32x8 zf = {0, 0, 0, 0, 0, 0, 0, 0}; \
      f32x8 mf = zf; \
      m32x8 zc = {0, 0, 0, 0, 0, 0, 0, 0}; \
      for (; j + 8 <= n; j += 8) { \
        f32x8 h = ld_f32x8(x + j); \
        mf = max_f32x8(mf, (f32x8)((m32x8)h & nosign32)); \
        zc += h == zf; \
        GL4(lo_f64x4(h), s0, b0, u0); GL4(hi_f64x4(h), s1, b1, u1); \
        if (W_) { f32x8 v = ld_f32x8(w + j); WL4(lo_f64x4(v), q0); WL4(hi_f64x4(v), q1); } \
      } \
      for (int l = 0; l < 8; l++) { out->mx = (double)mf[l] > out->mx ? (double)mf[l] : out->mx; out->z -= zc[l]; } \
    } else { \
      const double *x = (const double *)pg, *w = (const double *)pwt; \
      const f64x4 zd = {0, 0, 0, 0}; \
      f64x4 md = zd; \
      m64x4 zc = {0, 0, 0, 0}; \
      for (; j + 8 <= n; j += 8) { \
        f64x4 y0 = ld_f64x4(x + j), y1 = ld_f64x4(x + j + 4); \
        md = max_f64x4(md, max_f64x4((f64x4)((m64x4)y0 & nosign), (f64x4)((m64x4)y1 & nosign))); \
        zc += (y0 == zd) + (y1 == zd); \
        GL4(y0, s0, b0, u0); GL4(y1, s1, b1, u1); \
        if (W_) { WL4(ld_f64x4(w + j), q0); WL4(ld_f64x4(w + j + 4), q1); } \
      } \
      for (int l = 0; l < 4; l++) { out->mx = md[l] > out->mx ? md[l] : out->mx; out->z -= zc[l]; } \
    } \
  } while (0)

AVX2_FN static void unpack4(double *d, f64x4 lo, f64x4 hi) {
  for (int l = 0; l < 4; l++) { d[l] = lo[l]; d[4 + l] = hi[l]; }
}

AVX2_FN static int64_t fast_avx2(const void *pg, const void *pwt, keel_dtype dt, int64_t n, lanes *out) {
  const m64x4 nosign = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
  const f64x4 zero = {0, 0, 0, 0};
  f64x4 s0 = zero, s1 = zero, b0 = zero, b1 = zero, u0 = zero, u1 = zero, q0 = zero, q1 = zero;
  int64_t j = 0;
  if (pwt) FAST_AVX2(1); else FAST_AVX2(0);
  unpack4(out->s, s0, s1);
  unpack4(out->b, b0, b1);
  unpack4(out->u, u0, u1);
  unpack4(out->q, q0, q1);
  return j;
}
#endif

/* One block, fast: no masking. The sums come out non-finite when an
** element was, and the caller then redoes the gradient's block carefully
** (the weight's sum, NaN or not, is kept: it is only reported). pwt (may
** be NULL) is the same block of the weight, of the same dtype. */
static void stats_block_fast(const void *pg, const void *pwt, keel_dtype dt, int64_t n, stats_acc *out) {
  lanes ln;
  int64_t j = 0;
  memset(&ln, 0, sizeof ln);
#if KL_AVX2
  if (use_avx2()) j = fast_avx2(pg, pwt, dt, n, &ln);
  else j = fast_sse(pg, pwt, dt, n, &ln);
#elif KL_VECTOR
  j = fast_sse(pg, pwt, dt, n, &ln);
#endif
  for (; j < n; j++) {
    int l = (int)(j & 7);
    double y = dt == KEEL_F32 ? ((const float *)pg)[j] : ((const double *)pg)[j], ay = fabs(y);
    ln.s[l] += y * y; ln.b[l] += ay; ln.u[l] += y; ln.mx = ay > ln.mx ? ay : ln.mx; ln.z += y == 0;
    if (pwt) {
      double wy = dt == KEEL_F32 ? ((const float *)pwt)[j] : ((const double *)pwt)[j];
      ln.q[l] += wy * wy;
    }
  }
  out->sq = lanes8(ln.s);
  out->ab = lanes8(ln.b);
  out->sm = lanes8(ln.u);
  out->wq = lanes8(ln.q);
  out->mx = ln.mx;
  out->zeros = ln.z;
}

/* One block with everything: the prefix transform clamp(x * a, -v, v)
** computed in the element type (as the update will see it), NaN/Inf
** counted and left out of the sums, and the optional p-th power sum. */
static void stats_block_full(const void *px, keel_dtype dt, int64_t n, double a, double v, double pw,
                             stats_acc *out) {
  double s[8] = {0}, b[8] = {0}, u[8] = {0}, m[8] = {0}, q[8] = {0};
  for (int64_t j = 0; j < n; j++) {
    double y;
    int l = (int)(j & 7);
    if (dt == KEEL_F32) {
      float x = ((const float *)px)[j] * (float)a, fv = (float)v;
      y = x < -fv ? -fv : x > fv ? fv : x;
    } else {
      double x = ((const double *)px)[j] * a;
      y = x < -v ? -v : x > v ? v : x;
    }
    if (y != y) { out->nan++; continue; }
    if (isinf(y)) { out->inf++; continue; }
    out->zeros += y == 0;
    u[l] += y;
    y = fabs(y);
    s[l] += y * y; b[l] += y; m[l] = y > m[l] ? y : m[l];
    if (pw > 0) q[l] += pow(y, pw);
  }
  out->sq = lanes8(s);
  out->ab = lanes8(b);
  out->sm = lanes8(u);
  out->pw = lanes8(q);
  out->mx = 0;
  for (int l = 0; l < 8; l++) out->mx = m[l] > out->mx ? m[l] : out->mx;
}

keel_status kl_cpu_grad_stats(keel_ctx *ctx, const keel_tensor *g, int64_t nunits, const double *a,
                              const double *v, double pw, keel_grad_stats *st, double *spow,
                              const keel_tensor *w) {
  size_t es = kl_dtype_size[g->dtype], wes = w ? kl_dtype_size[w->dtype] : 0;
  const char *base = (const char *)kl_data(g);
  const char *wbase = w ? (const char *)kl_data(w) : NULL;
  int64_t len = nunits > 0 ? g->numel / nunits : 0;
  (void)ctx;
  for (int64_t u = 0; u < nunits; u++) {
    double au = a ? a[u] : 1.0, vu = v ? v[u] : INFINITY;
    int plain = au == 1.0 && isinf(vu) && !spow;
    keel_grad_stats *r = &st[u];
    double psum = 0;
    memset(r, 0, sizeof *r);
    r->numel = len;
    for (int64_t j0 = 0; j0 < len; j0 += STATS_BLOCK) {
      int64_t n = len - j0 < STATS_BLOCK ? len - j0 : STATS_BLOCK;
      const char *px = base + (size_t)(u * len + j0) * es;
      const char *pwx = wbase ? wbase + (size_t)(u * len + j0) * wes : NULL;
      int fused = plain && pwx && w->dtype == g->dtype;
      stats_acc t = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      double wq = 0;
      if (plain) stats_block_fast(px, fused ? pwx : NULL, g->dtype, n, &t);
      if (fused) {
        wq = t.wq;
      } else if (pwx) {
        stats_acc tw = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        stats_block_fast(pwx, NULL, w->dtype, n, &tw);
        wq = tw.sq;
      }
      if (!plain || !isfinite(t.sq) || !isfinite(t.ab)) {
        memset(&t, 0, sizeof t);
        stats_block_full(px, g->dtype, n, au, vu, spow ? pw : 0, &t);
      }
      r->sumsq += t.sq;
      r->sum_abs += t.ab;
      r->sum += t.sm;
      r->max_abs = t.mx > r->max_abs ? t.mx : r->max_abs;
      r->nan += t.nan;
      r->inf += t.inf;
      r->zeros += t.zeros;
      r->w_sumsq += wq;
      psum += t.pw;
    }
    if (spow) spow[u] = psum;
  }
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** In-place clipping: g = clamp(g * a, -v, v) per unit; NaN stays NaN, as
** torch's mul_ and clamp_.
** ======================================================================= */

#define SCALE_LOOP(T, V, W) do { \
    T *G = (T *)kl_data(g); \
    for (int64_t u = 0; u < nunits; u++) { \
      T ca = (T)a[u], hi = (T)v[u], lo = -hi; \
      RUN_LANES(T, V, W, u * len, (u + 1) * len, { ST(G + i, CLIPPED(L, LD(L, G + i))); }); \
    } \
  } while (0)

keel_status kl_cpu_grad_scale_(keel_ctx *ctx, keel_tensor *g, int64_t nunits, const double *a,
                               const double *v) {
  int64_t len = nunits > 0 ? g->numel / nunits : 0;
  (void)ctx;
#if KL_VECTOR
  if (g->dtype == KEEL_F32) SCALE_LOOP(float, f32x4, 4);
  else SCALE_LOOP(double, f64x2, 2);
#else
  if (g->dtype == KEEL_F32) SCALE_LOOP(float, float, 1);
  else SCALE_LOOP(double, double, 1);
#endif
  g->storage->version++;
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Optimizer updates. Each body reads gradient value x of element i and
** updates the parameter P and the state buffers; k holds the constants in
** the element type, f the flags. Comments give PyTorch's statements.
**
** Every body ends with PUT, which stores the new parameter value and adds
** the square of the change (new - old, in the element type, then squared
** in double) to the accumulator acc: the update's sum of squares comes out
** of the update loop itself. The squares go through 8 lanes by position in
** the block, exactly as the statistics do, so the sum has the same bits
** whichever loop (scalar, SSE2, AVX2, masked) ran. PUT also adds the
** square of the new value to wacc (same lanes, same order), so the
** parameter's sum of squares after the update comes out of the loop too:
** the next step's statistics need not read the parameter (optim.c).
** ======================================================================= */

/* Accumulators of squared changes. A vector body covers W consecutive
** lanes and adds to its own slot (dacc2 / dacc4, lanes in order); a
** scalar adds to the double of its lane. */
static inline void dsq_f32(double *a, float d) { *a += (double)d * (double)d; }
static inline void dsq_f64(double *a, double d) { *a += d * d; }
#if KL_VECTOR
typedef struct dacc2 { f64x2 v0, v1; } dacc2;
static inline void dsq_f32x4(dacc2 *a, f32x4 d) {
  f64x2 lo = lo_f64x2(d), hi = hi_f64x2(d);
  a->v0 += lo * lo;
  a->v1 += hi * hi;
}
static inline void dsq_f64x2(dacc2 *a, f64x2 d) { a->v0 += d * d; }
/* lanes of the slots: f32x4 slot q holds lanes 4q..4q+3, f64x2 slot q
** lanes 2q, 2q+1 */
static void gather_f32x4(double *d, const dacc2 *va) {
  for (int q = 0; q < 2; q++) {
    d[4 * q] = va[q].v0[0]; d[4 * q + 1] = va[q].v0[1]; d[4 * q + 2] = va[q].v1[0]; d[4 * q + 3] = va[q].v1[1];
  }
}
static void gather_f64x2(double *d, const dacc2 *va) {
  for (int q = 0; q < 4; q++) { d[2 * q] = va[q].v0[0]; d[2 * q + 1] = va[q].v0[1]; }
}
#endif
#if KL_AVX2
typedef struct dacc4 { f64x4 v0, v1; } dacc4;
AVX2_FN static inline void dsq_f32x8(dacc4 *a, f32x8 d) {
  f64x4 lo = lo_f64x4(d), hi = hi_f64x4(d);
  a->v0 += lo * lo;
  a->v1 += hi * hi;
}
AVX2_FN static inline void dsq_f64x4(dacc4 *a, f64x4 d) { a->v0 += d * d; }
/* f32x8 slot 0 holds lanes 0-3 and 4-7, f64x4 slot q lanes 4q..4q+3 */
AVX2_FN static void gather_f32x8(double *d, const dacc4 *va) {
  for (int l = 0; l < 4; l++) { d[l] = va[0].v0[l]; d[4 + l] = va[0].v1[l]; }
}
AVX2_FN static void gather_f64x4(double *d, const dacc4 *va) {
  for (int l = 0; l < 4; l++) { d[l] = va[0].v0[l]; d[4 + l] = va[1].v0[l]; }
}
#define DSQ_AVX2 , f32x8: dsq_f32x8, f64x4: dsq_f64x4
#define GATHER_AVX2 , f32x8: gather_f32x8, f64x4: gather_f64x4
#else
#define DSQ_AVX2
#define GATHER_AVX2
#endif

#if KL_VECTOR
#define DSQ_TO(a, d) _Generic((d), float: dsq_f32, double: dsq_f64, f32x4: dsq_f32x4, f64x2: dsq_f64x2 DSQ_AVX2)(a, d)
#define GATHER(V, d, va) _Generic((V){0}, f32x4: gather_f32x4, f64x2: gather_f64x2 GATHER_AVX2)(d, va)
#else
#define DSQ_TO(a, d) _Generic((d), float: dsq_f32, double: dsq_f64)(a, d)
#define GATHER(V, d, va) ((void)(va), memset(d, 0, sizeof(double) * 8))
#endif

/* Stores the new value n of element i, whose old value was o. */
#define PUT(L, o, n) do { L n_ = (n); ST(P + i, n_); DSQ_TO(acc, n_ - (o)); DSQ_TO(wacc, n_); } while (0)

/* Runs BODY for elements [i0, i1) of one block: 8 at a time, as 8 / W
** vectors of type V (slot q of va for the one at i0 + 8m + qW), while
** they last, then one at a time with the scalar type T (tacc[l] for the
** element in lane l). BODY sees the lane type as L, the first element as
** i and its accumulators as acc (changes) and wacc (new values; wa and
** wtacc as va and tacc). */
#if KL_VECTOR
/* (variadic: BODY arrives expanded, commas and all) */
#define VSLOT(V, W, q, ...) { \
    typedef V L; const int64_t i = i_ + (q) * (W); __typeof__(&va[0]) acc = &va[q], wacc = &wa[q]; __VA_ARGS__ }
#define RUN_LANES8(T, V, W, i0, i1, BODY) do { \
    int64_t i_ = (i0); \
    for (; i_ + 8 <= (i1); i_ += 8) { \
      VSLOT(V, W, 0, BODY) \
      if (8 / (W) > 1) VSLOT(V, W, 1, BODY) \
      if (8 / (W) > 2) { VSLOT(V, W, 2, BODY) VSLOT(V, W, 3, BODY) } \
    } \
    for (; i_ < (i1); i_++) { \
      typedef T L; const int64_t i = i_; double *acc = &tacc[(i_ - (i0)) & 7], *wacc = &wtacc[(i_ - (i0)) & 7]; \
      BODY \
    } \
  } while (0)
#else
#define RUN_LANES8(T, V, W, i0, i1, BODY) do { \
    for (int64_t i_ = (i0); i_ < (i1); i_++) { \
      typedef T L; const int64_t i = i_; double *acc = &tacc[(i_ - (i0)) & 7], *wacc = &wtacc[(i_ - (i0)) & 7]; \
      BODY \
    } \
  } while (0)
#endif

typedef struct flags {
  int maximize, l2, momentum, nesterov, fresh, amsgrad, decoupled, centered;
} flags;

/* Constants, in the element type T, named after what they multiply. */
#define CONSTS(T) struct { T wd, decay, mom, omd, nlr, b1, omb1, b2, omb2, bc2s, eps, nss, alpha, oma, nclr, one, mone; }

typedef CONSTS(float) consts_f32;
typedef CONSTS(double) consts_f64;

/* grad = -grad if maximize; grad = grad.add(param, alpha=weight_decay) */
#define GRAD_IN(L, d, p) do { \
    if (f->maximize) d = -d; \
    if (f->l2) d = d + BC(L, k->wd) * p; \
  } while (0)

/* SGD: buf.mul_(momentum).add_(d_p, alpha=1 - dampening) (buf = d_p the
** first time); d_p = d_p.add(buf, alpha=momentum) if nesterov else buf;
** param.add_(d_p, alpha=-lr) */
#define SGD_BODY(L, x) { \
    L p_ = LD(L, P + i), d_ = (x); \
    GRAD_IN(L, d_, p_); \
    if (f->momentum) { \
      L b_ = f->fresh ? d_ : LD(L, S0 + i) * BC(L, k->mom) + BC(L, k->omd) * d_; \
      ST(S0 + i, b_); \
      d_ = f->nesterov ? d_ + BC(L, k->mom) * b_ : b_; \
    } \
    PUT(L, p_, p_ + BC(L, k->nlr) * d_); \
  }

/* Adam/AdamW: param.mul_(1 - lr * weight_decay) (AdamW);
** exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1);
** exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2);
** torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq) (amsgrad);
** denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps);
** param.addcdiv_(exp_avg, denom, value=-step_size) */
#define ADAM_BODY(L, x) { \
    L p0_ = LD(L, P + i), p_ = p0_, d_ = (x); \
    GRAD_IN(L, d_, p_); \
    if (f->decoupled) p_ = p_ * BC(L, k->decay); \
    L m_ = LD(L, S0 + i) * BC(L, k->b1) + BC(L, k->omb1) * d_; \
    L s_ = LD(L, S1 + i) * BC(L, k->b2) + BC(L, k->omb2) * d_ * d_; \
    ST(S0 + i, m_); \
    ST(S1 + i, s_); \
    if (f->amsgrad) { \
      L x_ = LD(L, S2 + i); \
      s_ = MAXN(x_, s_); \
      ST(S2 + i, s_); \
    } \
    L den_ = SQRT(s_) / BC(L, k->bc2s) + BC(L, k->eps); \
    PUT(L, p0_, p_ + BC(L, k->nss) * m_ / den_); \
  }

/* RMSprop: square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha);
** centered: grad_avg.mul_(alpha).add_(grad, alpha=1 - alpha),
**   avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
** else avg = square_avg.sqrt(); avg = avg.add_(eps);
** momentum: buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
** else param.addcdiv_(grad, avg, value=-lr) */
#define RMSPROP_BODY(L, x) { \
    L p_ = LD(L, P + i), d_ = (x), avg_; \
    GRAD_IN(L, d_, p_); \
    L s_ = LD(L, S0 + i) * BC(L, k->alpha) + BC(L, k->oma) * d_ * d_; \
    ST(S0 + i, s_); \
    if (f->centered) { \
      L g_ = LD(L, S2 + i) * BC(L, k->alpha) + BC(L, k->oma) * d_; \
      ST(S2 + i, g_); \
      avg_ = SQRT(s_ + BC(L, k->mone) * g_ * g_); \
    } else { \
      avg_ = SQRT(s_); \
    } \
    avg_ = avg_ + BC(L, k->eps); \
    if (f->momentum) { \
      L b_ = LD(L, S1 + i) * BC(L, k->mom) + BC(L, k->one) * d_ / avg_; \
      ST(S1 + i, b_); \
      PUT(L, p_, p_ + BC(L, k->nlr) * b_); \
    } else { \
      PUT(L, p_, p_ + BC(L, k->nlr) * d_ / avg_); \
    } \
  }

/* Adagrad: state_sum.addcmul_(grad, grad, value=1);
** std = state_sum.sqrt().add_(eps); param.addcdiv_(grad, std, value=-clr) */
#define ADAGRAD_BODY(L, x) { \
    L p_ = LD(L, P + i), d_ = (x); \
    GRAD_IN(L, d_, p_); \
    L s_ = LD(L, S0 + i) + BC(L, k->one) * d_ * d_; \
    ST(S0 + i, s_); \
    L std_ = SQRT(s_) + BC(L, k->eps); \
    PUT(L, p_, p_ + BC(L, k->nclr) * d_ / std_); \
  }

/* One block [i0, i1) of a unit of kind with the body for it. Without
** non-finite elements: vector lanes. With them (masked): scalars, where
** "zero" reads such an element as 0 and "keep" leaves its parameter and
** state alone (a fresh SGD momentum buffer gets 0 there; the change is 0,
** the kept value still counts in the parameter's sum of squares). */
#define UNIT(T, V, W, BODY) do { \
    if (!masked) { \
      RUN_LANES8(T, V, W, i0, i1, BODY(L, CLIPPED(L, LD(L, G + i)))); \
    } else { \
      for (int64_t i = i0; i < i1; i++) { \
        typedef T L; \
        double *acc = &tacc[(i - i0) & 7], *wacc = &wtacc[(i - i0) & 7]; \
        T gx = G[i]; \
        if (gx - gx != 0) { \
          if (nf == KEEL_NONFINITE_KEEP) { \
            if (kind == KEEL_OPTIM_SGD && f->momentum && f->fresh) S0[i] = 0; \
            DSQ_TO(wacc, P[i]); \
            continue; \
          } \
          gx = 0; \
        } \
        BODY(L, CLIPPED(L, gx)) \
      } \
    } \
  } while (0)

/* What one parameter's update needs, for the loops below. */
typedef struct upd_job {
  keel_optim_kind kind;
  const flags *f;
  keel_tensor *p;
  const keel_tensor *g;
  keel_tensor *const *state;
  int64_t nunits, len;
  const double *a, *v;
  keel_nonfinite nf;
  int masked;
  double *wsq;                  /* nunits (NULL: not wanted): the new parameter's sums of squares */
} upd_job;

/* The update of J with lane type V (W elements) and vector accumulators
** ACC; the sum of squared changes goes to dsum, block by block, and each
** unit's sum of the new squares to J->wsq. */
#define UPDATE(T, V, W, ACC) do { \
    const flags *f = J->f; \
    keel_optim_kind kind = J->kind; \
    keel_nonfinite nf = J->nf; \
    int masked = J->masked; \
    int64_t len = J->len; \
    T *P = (T *)kl_data(J->p), *S0 = NULL, *S1 = NULL, *S2 = NULL; \
    const T *G = (const T *)kl_data(J->g); \
    if (J->state[0]) S0 = (T *)kl_data(J->state[0]); \
    if (J->state[1]) S1 = (T *)kl_data(J->state[1]); \
    if (J->state[2]) S2 = (T *)kl_data(J->state[2]); \
    (void)nf; \
    for (int64_t u = 0; u < J->nunits; u++) { \
      T ca = J->a ? (T)J->a[u] : (T)1, hi = J->v ? (T)J->v[u] : (T)INFINITY, lo = -hi; \
      int64_t end = (u + 1) * len; \
      double wsum = 0; \
      for (int64_t i0 = u * len; i0 < end; i0 += STATS_BLOCK) { \
        int64_t i1 = end - i0 < STATS_BLOCK ? end : i0 + STATS_BLOCK; \
        ACC va[4], wa[4]; \
        double tacc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, wtacc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, d[8]; \
        memset(va, 0, sizeof va); \
        memset(wa, 0, sizeof wa); \
        switch (kind) { \
          case KEEL_OPTIM_SGD: UNIT(T, V, W, SGD_BODY); break; \
          case KEEL_OPTIM_ADAM: case KEEL_OPTIM_ADAMW: UNIT(T, V, W, ADAM_BODY); break; \
          case KEEL_OPTIM_RMSPROP: UNIT(T, V, W, RMSPROP_BODY); break; \
          default: UNIT(T, V, W, ADAGRAD_BODY); break; \
        } \
        GATHER(V, d, va); \
        for (int l = 0; l < 8; l++) d[l] += tacc[l]; \
        dsum += lanes8(d); \
        GATHER(V, d, wa); \
        for (int l = 0; l < 8; l++) d[l] += wtacc[l]; \
        wsum += lanes8(d); \
      } \
      if (J->wsq) J->wsq[u] = wsum; \
    } \
  } while (0)

#if KL_VECTOR
static double update_f32(const upd_job *J, const consts_f32 *k) {
  double dsum = 0;
  UPDATE(float, f32x4, 4, dacc2);
  return dsum;
}
static double update_f64(const upd_job *J, const consts_f64 *k) {
  double dsum = 0;
  UPDATE(double, f64x2, 2, dacc2);
  return dsum;
}
#else
static double update_f32(const upd_job *J, const consts_f32 *k) {
  double dsum = 0;
  UPDATE(float, float, 1, double);
  return dsum;
}
static double update_f64(const upd_job *J, const consts_f64 *k) {
  double dsum = 0;
  UPDATE(double, double, 1, double);
  return dsum;
}
#endif
#if KL_AVX2
AVX2_FN static double update_f32_avx2(const upd_job *J, const consts_f32 *k) {
  double dsum = 0;
  UPDATE(float, f32x8, 8, dacc4);
  return dsum;
}
AVX2_FN static double update_f64_avx2(const upd_job *J, const consts_f64 *k) {
  double dsum = 0;
  UPDATE(double, f64x4, 4, dacc4);
  return dsum;
}
#endif

/* The constants of one step in the element type: every hyper-parameter
** rounded to it, and the step-dependent ones computed in double first, as
** PyTorch computes them in Python floats. */
#define FILL_CONSTS(k, T) do { \
    double bc1 = 1 - pow(h->beta1, (double)step), bc2 = 1 - pow(h->beta2, (double)step); \
    (k)->wd = (T)h->weight_decay; \
    (k)->decay = (T)(1 - h->lr * h->weight_decay); \
    (k)->mom = (T)h->momentum; \
    (k)->omd = (T)(1 - h->dampening); \
    (k)->nlr = (T)-h->lr; \
    (k)->b1 = (T)h->beta1; \
    (k)->omb1 = (T)(1 - h->beta1); \
    (k)->b2 = (T)h->beta2; \
    (k)->omb2 = (T)(1 - h->beta2); \
    (k)->bc2s = (T)sqrt(bc2); \
    (k)->nss = (T)-(h->lr / bc1); \
    (k)->eps = (T)h->eps; \
    (k)->alpha = (T)h->alpha; \
    (k)->oma = (T)(1 - h->alpha); \
    (k)->nclr = (T)-(h->lr / (1 + (double)(step - 1) * h->lr_decay)); \
    (k)->one = (T)1; \
    (k)->mone = (T)-1; \
  } while (0)

keel_status kl_cpu_optim_update(keel_ctx *ctx, keel_optim_kind kind, const keel_optim_hparams *h,
                                int64_t step, keel_tensor *p, const keel_tensor *g,
                                keel_tensor *const *state, unsigned fresh, int64_t nunits,
                                const double *a, const double *v, keel_nonfinite nf, double *dsq,
                                double *wsq) {
  flags fl = {0, 0, 0, 0, 0, 0, 0, 0};
  upd_job J;
  double dsum;
  (void)ctx;
  fl.maximize = h->maximize != 0;
  fl.l2 = h->weight_decay != 0 && kind != KEEL_OPTIM_ADAMW;
  fl.momentum = h->momentum != 0;
  fl.nesterov = h->nesterov != 0;
  fl.fresh = (fresh & 1u) != 0;
  fl.amsgrad = h->amsgrad != 0 && (kind == KEEL_OPTIM_ADAM || kind == KEEL_OPTIM_ADAMW);
  fl.decoupled = kind == KEEL_OPTIM_ADAMW;
  fl.centered = h->centered != 0;
  J.kind = kind;
  J.f = &fl;
  J.p = p;
  J.g = g;
  J.state = state;
  J.nunits = nunits;
  J.len = nunits > 0 ? p->numel / nunits : 0;
  J.a = a;
  J.v = v;
  J.nf = nf;
  J.masked = nf == KEEL_NONFINITE_ZERO || nf == KEEL_NONFINITE_KEEP;
  J.wsq = wsq;
  if (p->dtype == KEEL_F32) {
    consts_f32 k;
    FILL_CONSTS(&k, float);
#if KL_AVX2
    dsum = use_avx2() ? update_f32_avx2(&J, &k) : update_f32(&J, &k);
#else
    dsum = update_f32(&J, &k);
#endif
  } else {
    consts_f64 k;
    FILL_CONSTS(&k, double);
#if KL_AVX2
    dsum = use_avx2() ? update_f64_avx2(&J, &k) : update_f64(&J, &k);
#else
    dsum = update_f64(&J, &k);
#endif
  }
  if (dsq) *dsq = dsum;
  p->storage->version++;
  return KEEL_OK;
}

/* }====================================================================== */
