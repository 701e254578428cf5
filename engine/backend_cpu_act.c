/*
** backend_cpu_act.c: CPU kernels of the activations, softmax and the
** losses (the ops are in activation.c and loss.c).
**
** The ops hand every kernel contiguous float32 or float64 tensors of one
** dtype. Kernels compute in double, so one text serves both dtypes and a
** float32 result is the rounding of a more exact value. Each body is an
** always-inline function taking an f32 flag; the entry point calls it
** with a constant, so the compiler emits one specialised loop per dtype.
** Sums run in a fixed order: results are the same bits run to run.
*/
#include <math.h>
#include "keel_impl.h"

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

#define SQRT1_2 0.70710678118654752440       /* 1/sqrt(2) */
#define SQRT_2_OVER_PI 0.79788456080286535588 /* sqrt(2/pi) */
#define INV_SQRT_2PI 0.39894228040143267794   /* 1/sqrt(2 pi) */
#define GELU_C 0.044715

INLINE double ld(const void *p, int f32, int64_t i) {
  return f32 ? (double)((const float *)p)[i] : ((const double *)p)[i];
}

INLINE void st(void *p, int f32, int64_t i, double v) {
  if (f32) ((float *)p)[i] = (float)v;
  else ((double *)p)[i] = v;
}

static keel_status check_float(keel_ctx *ctx, const char *fn, const keel_tensor *t) {
  if (t->dtype == KEEL_F32 || t->dtype == KEEL_F64) return KEEL_OK;
  return kl_error(ctx, KEEL_ERR_TYPE, "%s: kernel needs float32 or float64 data, got %s", fn,
                  keel_dtype_name(t->dtype));
}

/* The logistic function; exp only ever sees a non-positive argument. */
static inline double sigm(double x) {
  double e;
  if (x >= 0) return 1 / (1 + exp(-x));
  e = exp(x);
  return e / (1 + e);
}

/* log(1 + exp(-x)), exact for every x: max(-x, 0) + log1p(exp(-|x|)). */
static inline double softplus_neg(double x) {
  return (x < 0 ? -x : 0) + log1p(exp(-fabs(x)));
}

/* Splits shape around dim: [outer, n, inner] (a 0-d tensor is [1, 1, 1]). */
static void split_dim(const keel_tensor *t, int dim, int64_t *outer, int64_t *n, int64_t *inner) {
  *outer = *inner = 1;
  *n = t->ndim ? t->shape[dim] : 1;
  for (int i = 0; i < dim; i++) *outer *= t->shape[i];
  for (int i = dim + 1; i < t->ndim; i++) *inner *= t->shape[i];
}

/* {======================================================================
** Pointwise activations. p: the op's parameters (node fparam).
** ======================================================================= */

INLINE double act_value(int op, double x, const double *p) {
  switch (op) {
    case KL_OP_LEAKY_RELU: return x > 0 ? x : x * p[0];
    case KL_OP_ELU: return x > 0 ? x : p[0] * expm1(x);
    case KL_OP_GELU:
      if (p[0] != 0) return 0.5 * x * (1 + tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x)));
      /* 1 + erf(z) == erfc(-z), without the cancellation for x << 0 */
      return 0.5 * x * erfc(-x * SQRT1_2);
    case KL_OP_SILU: return x * sigm(x);
    default: {  /* softplus: p[0] beta, p[1] threshold (linear above it) */
      double bx = p[0] * x;
      return bx > p[1] ? x : log1p(exp(bx)) / p[0];
    }
  }
}

/* d act / d x */
INLINE double act_slope(int op, double x, const double *p) {
  switch (op) {
    case KL_OP_LEAKY_RELU: return x > 0 ? 1 : p[0];
    case KL_OP_ELU: return x > 0 ? 1 : p[0] * exp(x);
    case KL_OP_GELU:
      if (p[0] != 0) {
        double x2 = x * x, t = tanh(SQRT_2_OVER_PI * (x + GELU_C * x2 * x));
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_C * x2);
      }
      return 0.5 * erfc(-x * SQRT1_2) + x * INV_SQRT_2PI * exp(-0.5 * x * x);
    case KL_OP_SILU: {
      double s = sigm(x);
      return s * (1 + x * (1 - s));
    }
    default: {
      double bx = p[0] * x;
      return bx > p[1] ? 1 : sigm(bx);
    }
  }
}

INLINE void act_body(int op, void *o, const void *a, int64_t n, const double *p, int f32) {
  for (int64_t i = 0; i < n; i++) st(o, f32, i, act_value(op, ld(a, f32, i), p));
}

INLINE void act_backward_body(int op, void *gin, const void *g, const void *a, int64_t n,
                              const double *p, int f32) {
  for (int64_t i = 0; i < n; i++) st(gin, f32, i, ld(g, f32, i) * act_slope(op, ld(a, f32, i), p));
}

keel_status kl_cpu_act(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *a, const double *p) {
  keel_status s = check_float(ctx, kl_ops[op].name, a);
  if (s) return s;
  if (a->dtype == KEEL_F32) act_body(op, kl_data(out), kl_data(a), a->numel, p, 1);
  else act_body(op, kl_data(out), kl_data(a), a->numel, p, 0);
  return KEEL_OK;
}

keel_status kl_cpu_act_backward(keel_ctx *ctx, int op, keel_tensor *gin, const keel_tensor *gout,
                                const keel_tensor *a, const double *p) {
  keel_status s = check_float(ctx, kl_ops[op].name, a);
  if (s) return s;
  if (a->dtype == KEEL_F32) act_backward_body(op, kl_data(gin), kl_data(gout), kl_data(a), a->numel, p, 1);
  else act_backward_body(op, kl_data(gin), kl_data(gout), kl_data(a), a->numel, p, 0);
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Softmax and log-softmax over the middle dimension of [outer, n, inner].
** Nothing overflows: exp only sees x - max <= 0. log_softmax reads the
** row once for a running max and a sum rescaled whenever the max moves,
** then writes x - logsumexp. softmax takes the max first so that it can
** store each exp as it sums them: one exp per element either way (exp is
** what these loops spend their time in).
** ======================================================================= */

/* Running max m and sum s of exp(x - m) after one more x. */
static inline void online_add(double x, double *m, double *s) {
  if (x > *m) {
    *s = *s * exp(*m - x) + 1;
    *m = x;
  } else if (x != -INFINITY) {   /* -inf adds nothing (and -inf - -inf is NaN) */
    *s += exp(x - *m);
  }
}

INLINE void softmax_body(int log_out, void *o, const void *a, int64_t outer, int64_t n, int64_t inner,
                         int f32) {
  for (int64_t b = 0; b < outer; b++)
    for (int64_t j = 0; j < inner; j++) {
      int64_t base = b * n * inner + j;
      double m = -INFINITY, s = 0;
      if (log_out) {
        double lse;
        for (int64_t i = 0; i < n; i++) online_add(ld(a, f32, base + i * inner), &m, &s);
        lse = m + log(s);
        for (int64_t i = 0; i < n; i++) st(o, f32, base + i * inner, ld(a, f32, base + i * inner) - lse);
      } else {
        double inv;
        for (int64_t i = 0; i < n; i++) {
          double x = ld(a, f32, base + i * inner);
          if (x > m || x != x) m = x;   /* a NaN wins: the row becomes NaN */
        }
        for (int64_t i = 0; i < n; i++) {
          double e = exp(ld(a, f32, base + i * inner) - m);
          s += e;
          st(o, f32, base + i * inner, e);
        }
        inv = 1 / s;
        for (int64_t i = 0; i < n; i++) st(o, f32, base + i * inner, ld(o, f32, base + i * inner) * inv);
      }
    }
}

/* softmax: gin = y (g - sum(g y)); log_softmax: gin = g - exp(y) sum(g). */
INLINE void softmax_backward_body(int log_out, void *gin, const void *g, const void *y, int64_t outer,
                                  int64_t n, int64_t inner, int f32) {
  for (int64_t b = 0; b < outer; b++)
    for (int64_t j = 0; j < inner; j++) {
      int64_t base = b * n * inner + j;
      double dot = 0;
      for (int64_t i = 0; i < n; i++) {
        int64_t k = base + i * inner;
        dot += log_out ? ld(g, f32, k) : ld(g, f32, k) * ld(y, f32, k);
      }
      for (int64_t i = 0; i < n; i++) {
        int64_t k = base + i * inner;
        double gk = ld(g, f32, k), yk = ld(y, f32, k);
        st(gin, f32, k, log_out ? gk - exp(yk) * dot : yk * (gk - dot));
      }
    }
}

keel_status kl_cpu_softmax(keel_ctx *ctx, int log_out, keel_tensor *out, const keel_tensor *a, int dim) {
  int64_t outer, n, inner;
  keel_status s = check_float(ctx, log_out ? "log_softmax" : "softmax", a);
  if (s) return s;
  split_dim(a, dim, &outer, &n, &inner);
  if (a->dtype == KEEL_F32) softmax_body(log_out, kl_data(out), kl_data(a), outer, n, inner, 1);
  else softmax_body(log_out, kl_data(out), kl_data(a), outer, n, inner, 0);
  return KEEL_OK;
}

keel_status kl_cpu_softmax_backward(keel_ctx *ctx, int log_out, keel_tensor *gin, const keel_tensor *gout,
                                    const keel_tensor *y, int dim) {
  int64_t outer, n, inner;
  keel_status s = check_float(ctx, log_out ? "log_softmax" : "softmax", y);
  if (s) return s;
  split_dim(y, dim, &outer, &n, &inner);
  if (y->dtype == KEEL_F32)
    softmax_backward_body(log_out, kl_data(gin), kl_data(gout), kl_data(y), outer, n, inner, 1);
  else
    softmax_backward_body(log_out, kl_data(gin), kl_data(gout), kl_data(y), outer, n, inner, 0);
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Pointwise losses of d = x - y. p: beta (smooth_l1) or delta (huber).
** PyTorch's two differ by a factor: smooth_l1 = huber / beta for
** |d| < beta, and |d| - beta/2 against delta (|d| - delta/2) beyond.
** ======================================================================= */

INLINE double ploss_value(int op, double d, double p) {
  double a = fabs(d);
  switch (op) {
    case KL_OP_MSE_LOSS: return d * d;
    case KL_OP_L1_LOSS: return a;
    case KL_OP_SMOOTH_L1_LOSS: return a < p ? 0.5 * d * d / p : a - 0.5 * p;  /* beta 0: l1 */
    default: return a < p ? 0.5 * d * d : p * (a - 0.5 * p);
  }
}

INLINE double ploss_slope(int op, double d, double p) {
  double sg = (d > 0) - (d < 0);
  switch (op) {
    case KL_OP_MSE_LOSS: return 2 * d;
    case KL_OP_L1_LOSS: return sg;
    case KL_OP_SMOOTH_L1_LOSS: return fabs(d) < p ? d / p : sg;
    default: return fabs(d) < p ? d : p * sg;
  }
}

INLINE void ploss_body(int op, void *o, const void *x, const void *y, int64_t n, double p, int red, int f32) {
  double sum = 0;
  for (int64_t i = 0; i < n; i++) {
    double l = ploss_value(op, ld(x, f32, i) - ld(y, f32, i), p);
    if (red == KEEL_REDUCTION_NONE) st(o, f32, i, l);
    else sum += l;
  }
  if (red == KEEL_REDUCTION_SUM) st(o, f32, 0, sum);
  else if (red == KEEL_REDUCTION_MEAN) st(o, f32, 0, sum / (double)n);
}

INLINE void ploss_backward_body(int op, void *gx, const void *g, const void *x, const void *y, int64_t n,
                                double p, int red, int f32) {
  double g0 = red == KEEL_REDUCTION_NONE ? 0 : ld(g, f32, 0);
  if (red == KEEL_REDUCTION_MEAN) g0 /= (double)n;
  for (int64_t i = 0; i < n; i++) {
    double gi = red == KEEL_REDUCTION_NONE ? ld(g, f32, i) : g0;
    st(gx, f32, i, gi * ploss_slope(op, ld(x, f32, i) - ld(y, f32, i), p));
  }
}

keel_status kl_cpu_ploss(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *x, const keel_tensor *y,
                         double p, int red) {
  keel_status s = check_float(ctx, kl_ops[op].name, x);
  if (s) return s;
  if (x->dtype == KEEL_F32) ploss_body(op, kl_data(out), kl_data(x), kl_data(y), x->numel, p, red, 1);
  else ploss_body(op, kl_data(out), kl_data(x), kl_data(y), x->numel, p, red, 0);
  return KEEL_OK;
}

keel_status kl_cpu_ploss_backward(keel_ctx *ctx, int op, keel_tensor *gx, const keel_tensor *gout,
                                  const keel_tensor *x, const keel_tensor *y, double p, int red) {
  keel_status s = check_float(ctx, kl_ops[op].name, x);
  if (s) return s;
  if (x->dtype == KEEL_F32)
    ploss_backward_body(op, kl_data(gx), kl_data(gout), kl_data(x), kl_data(y), x->numel, p, red, 1);
  else
    ploss_backward_body(op, kl_data(gx), kl_data(gout), kl_data(x), kl_data(y), x->numel, p, red, 0);
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Class losses: cross entropy from logits (log-softmax fused in) and NLL
** from log-probabilities. Sample s = (b, j) reads classes c at
** b*C*inner + c*inner + j. Index targets are 0-based, -1 when ignored.
**
** With weights w, smoothing e and z = logsumexp(x) (0 for NLL), a sample
** with target y loses (1-e) w_y (z - x_y) + (e/C) sum_c w_c (z - x_c),
** and "mean" divides the total by the summed w_y of the kept samples,
** as PyTorch does. Its gradient is
**   (1-e) w_y (p - onehot(y)) + (e/C) (p sum_c w_c - w),  p = softmax(x).
** Probability targets t lose -sum_c w_c t'_c (x_c - z) with
** t' = (1-e) t + e/C; "mean" divides by the number of samples.
** ======================================================================= */

/* logsumexp of one sample's classes, in one pass. */
INLINE double sample_lse(const void *x, int64_t base, int64_t c, int64_t inner, int f32) {
  double m = -INFINITY, s = 0;
  for (int64_t k = 0; k < c; k++) online_add(ld(x, f32, base + k * inner), &m, &s);
  return m + log(s);
}

INLINE void closs_body(const kl_closs *q, void *out, double *lse, double *wsum, const void *x,
                       const int64_t *t, const void *tp, const void *w, int f32) {
  int64_t C = q->c, inner = q->inner;
  double e = q->smoothing, total = 0, W = 0;
  for (int64_t b = 0; b < q->n; b++)
    for (int64_t j = 0; j < inner; j++) {
      int64_t s = b * inner + j, base = b * C * inner + j;
      double z = q->logits ? sample_lse(x, base, C, inner, f32) : 0, l = 0;
      if (lse) lse[s] = z;
      if (q->probs) {
        for (int64_t k = 0; k < C; k++) {
          int64_t at = base + k * inner;
          double tk = (1 - e) * ld(tp, f32, at) + e / (double)C;
          l -= (w ? ld(w, f32, k) : 1) * tk * (ld(x, f32, at) - z);
        }
      } else if (t[s] >= 0) {
        int64_t y = t[s];
        double wy = w ? ld(w, f32, y) : 1;
        l = (1 - e) * wy * (z - ld(x, f32, base + y * inner));
        if (e > 0) {
          double sm = 0;
          for (int64_t k = 0; k < C; k++) sm += (w ? ld(w, f32, k) : 1) * (z - ld(x, f32, base + k * inner));
          l += e / (double)C * sm;
        }
        W += wy;
      }
      if (q->reduction == KEEL_REDUCTION_NONE) st(out, f32, s, l);
      else total += l;
    }
  if (q->probs) W = (double)(q->n * inner);
  if (q->reduction == KEEL_REDUCTION_SUM) st(out, f32, 0, total);
  else if (q->reduction == KEEL_REDUCTION_MEAN) st(out, f32, 0, total / W);
  *wsum = W;
}

INLINE void closs_backward_body(const kl_closs *q, void *gx, void *gt, const void *g, const void *x,
                                const int64_t *t, const void *tp, const void *w, const double *lse,
                                double wsum, int f32) {
  int64_t C = q->c, inner = q->inner;
  double e = q->smoothing, g0 = 0, sw = 0;
  if (q->reduction != KEEL_REDUCTION_NONE) g0 = ld(g, f32, 0);
  if (q->reduction == KEEL_REDUCTION_MEAN) g0 /= wsum;
  for (int64_t k = 0; k < C; k++) sw += w ? ld(w, f32, k) : 1;
  for (int64_t b = 0; b < q->n; b++)
    for (int64_t j = 0; j < inner; j++) {
      int64_t s = b * inner + j, base = b * C * inner + j;
      double gs = q->reduction == KEEL_REDUCTION_NONE ? ld(g, f32, s) : g0;
      double z = q->logits ? lse[s] : 0;
      if (q->probs) {
        double swt = 0;
        for (int64_t k = 0; k < C; k++)
          swt += (w ? ld(w, f32, k) : 1) * ((1 - e) * ld(tp, f32, base + k * inner) + e / (double)C);
        for (int64_t k = 0; k < C; k++) {
          int64_t at = base + k * inner;
          double wk = w ? ld(w, f32, k) : 1, lp = ld(x, f32, at) - z;
          double tk = (1 - e) * ld(tp, f32, at) + e / (double)C;
          if (gx) st(gx, f32, at, gs * (exp(lp) * swt - wk * tk));
          if (gt) st(gt, f32, at, -gs * (1 - e) * wk * lp);
        }
      } else if (t[s] < 0) {
        if (gx) for (int64_t k = 0; k < C; k++) st(gx, f32, base + k * inner, 0);
      } else if (!q->logits) {
        int64_t y = t[s];
        double wy = w ? ld(w, f32, y) : 1;
        if (gx) for (int64_t k = 0; k < C; k++) st(gx, f32, base + k * inner, k == y ? -wy * gs : 0);
      } else if (gx) {
        int64_t y = t[s];
        double wy = w ? ld(w, f32, y) : 1;
        for (int64_t k = 0; k < C; k++) {
          int64_t at = base + k * inner;
          double p = exp(ld(x, f32, at) - z);
          double d = (1 - e) * wy * (p - (k == y)) + (e > 0 ? e / (double)C * (p * sw - (w ? ld(w, f32, k) : 1)) : 0);
          st(gx, f32, at, gs * d);
        }
      }
    }
}

keel_status kl_cpu_closs(keel_ctx *ctx, const kl_closs *q, keel_tensor *out, keel_tensor *aux,
                         const keel_tensor *x, const keel_tensor *target, const keel_tensor *weight) {
  const int64_t *t = q->probs ? NULL : (const int64_t *)kl_data(target);
  const void *tp = q->probs ? kl_data(target) : NULL, *w = weight ? kl_data(weight) : NULL;
  double *z = (double *)kl_data(aux), *wsum = z + (q->logits ? q->n * q->inner : 0);
  keel_status s = check_float(ctx, q->logits ? "cross_entropy" : "nll_loss", x);
  if (s) return s;
  if (!q->logits) z = NULL;
  if (x->dtype == KEEL_F32) closs_body(q, kl_data(out), z, wsum, kl_data(x), t, tp, w, 1);
  else closs_body(q, kl_data(out), z, wsum, kl_data(x), t, tp, w, 0);
  return KEEL_OK;
}

keel_status kl_cpu_closs_backward(keel_ctx *ctx, const kl_closs *q, keel_tensor *gx, keel_tensor *gt,
                                  const keel_tensor *gout, const keel_tensor *x, const keel_tensor *target,
                                  const keel_tensor *weight, const keel_tensor *aux) {
  const int64_t *t = q->probs ? NULL : (const int64_t *)kl_data(target);
  const void *tp = q->probs ? kl_data(target) : NULL, *w = weight ? kl_data(weight) : NULL;
  const double *z = (const double *)kl_data(aux), wsum = z[q->logits ? q->n * q->inner : 0];
  void *pgx = gx ? kl_data(gx) : NULL, *pgt = gt ? kl_data(gt) : NULL;
  keel_status s = check_float(ctx, q->logits ? "cross_entropy" : "nll_loss", x);
  if (s) return s;
  if (x->dtype == KEEL_F32) closs_backward_body(q, pgx, pgt, kl_data(gout), kl_data(x), t, tp, w, z, wsum, 1);
  else closs_backward_body(q, pgx, pgt, kl_data(gout), kl_data(x), t, tp, w, z, wsum, 0);
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Binary cross entropy from logits, in the log-sum-exp form:
**   l = w ((1 - y) x + (1 + (pw - 1) y) softplus(-x))
** which stays finite for any x. w and pw (optional) have x's shape.
** ======================================================================= */

INLINE void bce_body(void *o, const void *x, const void *y, const void *w, const void *pw, int64_t n, int red,
                     int f32) {
  double sum = 0;
  for (int64_t i = 0; i < n; i++) {
    double xi = ld(x, f32, i), yi = ld(y, f32, i);
    double lw = pw ? 1 + (ld(pw, f32, i) - 1) * yi : 1;
    double l = ((1 - yi) * xi + lw * softplus_neg(xi)) * (w ? ld(w, f32, i) : 1);
    if (red == KEEL_REDUCTION_NONE) st(o, f32, i, l);
    else sum += l;
  }
  if (red == KEEL_REDUCTION_SUM) st(o, f32, 0, sum);
  else if (red == KEEL_REDUCTION_MEAN) st(o, f32, 0, sum / (double)n);
}

/* d/dx = w ((1 - y) - lw sigmoid(-x)); d/dy = w (-x + (pw - 1) softplus(-x)). */
INLINE void bce_backward_body(void *gx, void *gy, const void *g, const void *x, const void *y, const void *w,
                              const void *pw, int64_t n, int red, int f32) {
  double g0 = red == KEEL_REDUCTION_NONE ? 0 : ld(g, f32, 0);
  if (red == KEEL_REDUCTION_MEAN) g0 /= (double)n;
  for (int64_t i = 0; i < n; i++) {
    double xi = ld(x, f32, i), yi = ld(y, f32, i);
    double gi = (red == KEEL_REDUCTION_NONE ? ld(g, f32, i) : g0) * (w ? ld(w, f32, i) : 1);
    double pwi = pw ? ld(pw, f32, i) : 1;
    if (gx) st(gx, f32, i, gi * ((1 - yi) - (1 + (pwi - 1) * yi) * sigm(-xi)));
    if (gy) st(gy, f32, i, gi * (-xi + (pwi - 1) * softplus_neg(xi)));
  }
}

keel_status kl_cpu_bce(keel_ctx *ctx, keel_tensor *out, const keel_tensor *x, const keel_tensor *y,
                       const keel_tensor *w, const keel_tensor *pw, int red) {
  const void *pwd = w ? kl_data(w) : NULL, *ppd = pw ? kl_data(pw) : NULL;
  keel_status s = check_float(ctx, "binary_cross_entropy_with_logits", x);
  if (s) return s;
  if (x->dtype == KEEL_F32) bce_body(kl_data(out), kl_data(x), kl_data(y), pwd, ppd, x->numel, red, 1);
  else bce_body(kl_data(out), kl_data(x), kl_data(y), pwd, ppd, x->numel, red, 0);
  return KEEL_OK;
}

keel_status kl_cpu_bce_backward(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gy, const keel_tensor *gout,
                                const keel_tensor *x, const keel_tensor *y, const keel_tensor *w,
                                const keel_tensor *pw, int red) {
  const void *pwd = w ? kl_data(w) : NULL, *ppd = pw ? kl_data(pw) : NULL;
  void *pgx = gx ? kl_data(gx) : NULL, *pgy = gy ? kl_data(gy) : NULL;
  keel_status s = check_float(ctx, "binary_cross_entropy_with_logits", x);
  if (s) return s;
  if (x->dtype == KEEL_F32)
    bce_backward_body(pgx, pgy, kl_data(gout), kl_data(x), kl_data(y), pwd, ppd, x->numel, red, 1);
  else
    bce_backward_body(pgx, pgy, kl_data(gout), kl_data(x), kl_data(y), pwd, ppd, x->numel, red, 0);
  return KEEL_OK;
}

/* }====================================================================== */
