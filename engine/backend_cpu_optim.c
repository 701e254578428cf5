/*
** backend_cpu_optim.c: CPU kernels of the optimizers and of clipping.
**
** - kl_cpu_grad_stats: the statistics pass (one read of a gradient).
** - kl_cpu_optim_update: one optimizer update of one parameter, with the
**   clip chain's scale and clamp bound applied to each gradient element as
**   it is read: clipping costs no pass of its own.
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
*/
#include <math.h>
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
/* float lanes 0-1 and 2-3 as doubles */
static inline f64x2 lo_f64x2(f32x4 v) { return (f64x2)_mm_cvtps_pd((__m128)v); }
static inline f64x2 hi_f64x2(f32x4 v) { return (f64x2)_mm_cvtps_pd(_mm_movehl_ps((__m128)v, (__m128)v)); }
#else
#include <arm_neon.h>
static inline f32x4 sqrt_f32x4(f32x4 x) { return (f32x4)vsqrtq_f32((float32x4_t)x); }
static inline f64x2 sqrt_f64x2(f64x2 x) { return (f64x2)vsqrtq_f64((float64x2_t)x); }
static inline f64x2 max_f64x2(f64x2 a, f64x2 b) { return (f64x2)vmaxq_f64((float64x2_t)a, (float64x2_t)b); }
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

#define LD(L, p) _Generic((L){0}, float: ld_f32, double: ld_f64, f32x4: ld_f32x4, f64x2: ld_f64x2)(p)
#define ST(p, v) _Generic((v), float: st_f32, double: st_f64, f32x4: st_f32x4, f64x2: st_f64x2)(p, v)
#define SQRT(x) _Generic((x), float: sqrtf, double: sqrt, f32x4: sqrt_f32x4, f64x2: sqrt_f64x2)(x)
#define SEL(m, a, b) _Generic((a), float: sel_f32, double: sel_f64, f32x4: sel_f32x4, f64x2: sel_f64x2)(m, a, b)
#else
#define KL_VECTOR 0
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
** STATS_BLOCK elements it falls in; lanes are added pairwise, blocks in
** order. The order depends on nothing but the element's position, so a
** threaded version that sums blocks in parallel and adds them in order
** gets the same bits.
** ======================================================================= */

#define STATS_BLOCK 4096

typedef struct stats_acc {
  double sq, ab, mx, pw;
  int64_t nan, inf;
} stats_acc;

/* One block, fast: no masking. The sums come out non-finite when an
** element was, and the caller then redoes the block carefully. Lanes are
** kept in registers: vector pairs (l, l+1) where the target has vectors. */
static void stats_block_fast(const void *px, keel_dtype dt, int64_t n, stats_acc *out) {
  double s[8] = {0}, b[8] = {0}, m[8] = {0};
  int64_t j = 0;
#if KL_VECTOR
  const m64x2 nosign = {INT64_MAX, INT64_MAX};
  const f64x2 zero = {0, 0};
  f64x2 s0 = zero, s1 = zero, s2 = zero, s3 = zero, b0 = zero, b1 = zero, b2 = zero, b3 = zero;
  f64x2 m0 = zero, m1 = zero, m2 = zero, m3 = zero;
  /* lanes (2l, 2l+1) of element pair l of each group of 8 */
#define LANE(y, S, B, M) do { \
    f64x2 ay_ = (f64x2)((m64x2)(y) & nosign); \
    S += (y) * (y); B += ay_; M = max_f64x2(ay_, M); \
  } while (0)
  if (dt == KEEL_F32) {
    const float *x = (const float *)px;
    for (; j + 8 <= n; j += 8) {
      f32x4 h0 = ld_f32x4(x + j), h1 = ld_f32x4(x + j + 4);
      LANE(lo_f64x2(h0), s0, b0, m0);
      LANE(hi_f64x2(h0), s1, b1, m1);
      LANE(lo_f64x2(h1), s2, b2, m2);
      LANE(hi_f64x2(h1), s3, b3, m3);
    }
  } else {
    const double *x = (const double *)px;
    for (; j + 8 <= n; j += 8) {
      LANE(ld_f64x2(x + j), s0, b0, m0);
      LANE(ld_f64x2(x + j + 2), s1, b1, m1);
      LANE(ld_f64x2(x + j + 4), s2, b2, m2);
      LANE(ld_f64x2(x + j + 6), s3, b3, m3);
    }
  }
#undef LANE
  s[0] = s0[0]; s[1] = s0[1]; s[2] = s1[0]; s[3] = s1[1]; s[4] = s2[0]; s[5] = s2[1]; s[6] = s3[0]; s[7] = s3[1];
  b[0] = b0[0]; b[1] = b0[1]; b[2] = b1[0]; b[3] = b1[1]; b[4] = b2[0]; b[5] = b2[1]; b[6] = b3[0]; b[7] = b3[1];
  m[0] = m0[0]; m[1] = m0[1]; m[2] = m1[0]; m[3] = m1[1]; m[4] = m2[0]; m[5] = m2[1]; m[6] = m3[0]; m[7] = m3[1];
#endif
  for (; j < n; j++) {
    int l = (int)(j & 7);
    double y = dt == KEEL_F32 ? ((const float *)px)[j] : ((const double *)px)[j], ay = fabs(y);
    s[l] += y * y; b[l] += ay; m[l] = ay > m[l] ? ay : m[l];
  }
  out->sq = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  out->ab = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
  out->mx = 0;
  for (int l = 0; l < 8; l++) out->mx = m[l] > out->mx ? m[l] : out->mx;
}

/* One block with everything: the prefix transform clamp(x * a, -v, v)
** computed in the element type (as the update will see it), NaN/Inf
** counted and left out of the sums, and the optional p-th power sum. */
static void stats_block_full(const void *px, keel_dtype dt, int64_t n, double a, double v, double pw,
                             stats_acc *out) {
  double s[8] = {0}, b[8] = {0}, m[8] = {0}, q[8] = {0};
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
    y = fabs(y);
    s[l] += y * y; b[l] += y; m[l] = y > m[l] ? y : m[l];
    if (pw > 0) q[l] += pow(y, pw);
  }
  out->sq = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  out->ab = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
  out->pw = ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
  out->mx = 0;
  for (int l = 0; l < 8; l++) out->mx = m[l] > out->mx ? m[l] : out->mx;
}

/* Sum of squares of one block of w (the parameter, for AGC). */
static double sumsq_block(const void *pw, keel_dtype dt, int64_t n) {
  stats_acc t;
  stats_block_fast(pw, dt, n, &t);
  return t.sq;
}

keel_status kl_cpu_grad_stats(keel_ctx *ctx, const keel_tensor *g, int64_t nunits, const double *a,
                              const double *v, double pw, keel_grad_stats *st, double *spow,
                              const keel_tensor *w, double *wsq) {
  size_t es = kl_dtype_size[g->dtype];
  const char *base = (const char *)kl_data(g);
  const char *wbase = w ? (const char *)kl_data(w) : NULL;
  int64_t len = nunits > 0 ? g->numel / nunits : 0;
  (void)ctx;
  for (int64_t u = 0; u < nunits; u++) {
    double au = a ? a[u] : 1.0, vu = v ? v[u] : INFINITY;
    int plain = au == 1.0 && isinf(vu) && !spow;
    keel_grad_stats *r = &st[u];
    double psum = 0, wsum = 0;
    memset(r, 0, sizeof *r);
    r->numel = len;
    for (int64_t j0 = 0; j0 < len; j0 += STATS_BLOCK) {
      int64_t n = len - j0 < STATS_BLOCK ? len - j0 : STATS_BLOCK;
      const char *px = base + (size_t)(u * len + j0) * es;
      stats_acc t = {0, 0, 0, 0, 0, 0};
      if (plain) stats_block_fast(px, g->dtype, n, &t);
      if (!plain || !isfinite(t.sq) || !isfinite(t.ab)) {
        memset(&t, 0, sizeof t);
        stats_block_full(px, g->dtype, n, au, vu, spow ? pw : 0, &t);
      }
      r->sumsq += t.sq;
      r->sum_abs += t.ab;
      r->max_abs = t.mx > r->max_abs ? t.mx : r->max_abs;
      r->nan += t.nan;
      r->inf += t.inf;
      psum += t.pw;
      if (wbase) wsum += sumsq_block(wbase + (size_t)(u * len + j0) * es, w->dtype, n);
    }
    if (spow) spow[u] = psum;
    if (wsq) wsq[u] = wsum;
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
** ======================================================================= */

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
    ST(P + i, p_ + BC(L, k->nlr) * d_); \
  }

/* Adam/AdamW: param.mul_(1 - lr * weight_decay) (AdamW);
** exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1);
** exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2);
** torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq) (amsgrad);
** denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps);
** param.addcdiv_(exp_avg, denom, value=-step_size) */
#define ADAM_BODY(L, x) { \
    L p_ = LD(L, P + i), d_ = (x); \
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
    ST(P + i, p_ + BC(L, k->nss) * m_ / den_); \
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
      ST(P + i, p_ + BC(L, k->nlr) * b_); \
    } else { \
      ST(P + i, p_ + BC(L, k->nlr) * d_ / avg_); \
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
    ST(P + i, p_ + BC(L, k->nclr) * d_ / std_); \
  }

/* One unit [i0, i1) of kind with the body for it. Without non-finite
** elements: vector lanes. With them (masked): scalars, where "zero" reads
** such an element as 0 and "keep" leaves its parameter and state alone
** (a fresh SGD momentum buffer gets 0 there). */
#define UNIT(T, V, W, BODY) do { \
    if (!masked) { \
      RUN_LANES(T, V, W, i0, i1, BODY(L, CLIPPED(L, LD(L, G + i)))); \
    } else { \
      for (int64_t i = i0; i < i1; i++) { \
        typedef T L; \
        T gx = G[i]; \
        if (gx - gx != 0) { \
          if (nf == KEEL_NONFINITE_KEEP) { \
            if (kind == KEEL_OPTIM_SGD && f->momentum && f->fresh) S0[i] = 0; \
            continue; \
          } \
          gx = 0; \
        } \
        BODY(L, CLIPPED(L, gx)) \
      } \
    } \
  } while (0)

#define UPDATE(T, V, W) do { \
    T *P = (T *)kl_data(p), *S0 = NULL, *S1 = NULL, *S2 = NULL; \
    const T *G = (const T *)kl_data(g); \
    if (state[0]) S0 = (T *)kl_data(state[0]); \
    if (state[1]) S1 = (T *)kl_data(state[1]); \
    if (state[2]) S2 = (T *)kl_data(state[2]); \
    for (int64_t u = 0; u < nunits; u++) { \
      T ca = a ? (T)a[u] : (T)1, hi = v ? (T)v[u] : (T)INFINITY, lo = -hi; \
      int64_t i0 = u * len, i1 = i0 + len; \
      switch (kind) { \
        case KEEL_OPTIM_SGD: UNIT(T, V, W, SGD_BODY); break; \
        case KEEL_OPTIM_ADAM: case KEEL_OPTIM_ADAMW: UNIT(T, V, W, ADAM_BODY); break; \
        case KEEL_OPTIM_RMSPROP: UNIT(T, V, W, RMSPROP_BODY); break; \
        default: UNIT(T, V, W, ADAGRAD_BODY); break; \
      } \
    } \
  } while (0)

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
                                const double *a, const double *v, keel_nonfinite nf) {
  int64_t len = nunits > 0 ? p->numel / nunits : 0;
  int masked = nf == KEEL_NONFINITE_ZERO || nf == KEEL_NONFINITE_KEEP;
  flags fl = {0, 0, 0, 0, 0, 0, 0, 0}, *f = &fl;
  (void)ctx;
  fl.maximize = h->maximize != 0;
  fl.l2 = h->weight_decay != 0 && kind != KEEL_OPTIM_ADAMW;
  fl.momentum = h->momentum != 0;
  fl.nesterov = h->nesterov != 0;
  fl.fresh = (fresh & 1u) != 0;
  fl.amsgrad = h->amsgrad != 0 && (kind == KEEL_OPTIM_ADAM || kind == KEEL_OPTIM_ADAMW);
  fl.decoupled = kind == KEEL_OPTIM_ADAMW;
  fl.centered = h->centered != 0;
  if (p->dtype == KEEL_F32) {
    consts_f32 kk, *k = &kk;
    FILL_CONSTS(k, float);
#if KL_VECTOR
    UPDATE(float, f32x4, 4);
#else
    UPDATE(float, float, 1);
#endif
  } else {
    consts_f64 kk, *k = &kk;
    FILL_CONSTS(k, double);
#if KL_VECTOR
    UPDATE(double, f64x2, 2);
#else
    UPDATE(double, double, 1);
#endif
  }
  p->storage->version++;
  return KEEL_OK;
}

/* }====================================================================== */
