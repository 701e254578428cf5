/*
** loss.cu: the losses (kl_backend slots ploss, closs, bce and their
** backward; engine/backend_cpu_act.c is the specification, loss.c the
** caller). Operands are contiguous, of one float dtype.
**
** Reductions ("mean", "sum") are deterministic: each block sums its part
** in double into scratch, then one block adds the parts in a fixed order
** and writes the scalar. Per-element values are computed in double for
** the pointwise losses (plain arithmetic, memory bound), in the dtype's
** own precision where an exp or a log is involved.
**
** Class losses see x as [n, c, inner]; sample s = (b, j) reads its
** classes at b*c*inner + k*inner + j. With inner == 1 a group of L lanes
** (a power of two up to a warp, or a whole block for long rows) takes a
** sample; with inner > 1 one thread takes a sample and neighbouring
** threads read neighbouring j. Class-index targets arrive as int64 values
** the way the engine has them (loss.c checks them before any kernel runs):
** a value equal to the ignore index is ignored, any other is its class
** plus the index base (cl_class), so a device target needs no rebased copy.
** Cross entropy finds the max m, then s = sum exp(x - m) (the rules of
** softmax.cu for special values), z = m + log(s) in double; smoothing and
** probability targets need sums of w_k t_k (m - x_k), which have no
** cancellation for logits of any size.
*/
#include <math.h>
#include "common.cuh"
#include "keel_impl.h"   /* the KL_OP_* codes of the pointwise losses */

#define LS_PARTS 1024           /* most blocks of a reducing launch */
#define LS_ROW_THREADS 128      /* block size of the group kernels */
#define LS_BLOCK_THREADS 256    /* one block per sample */


static unsigned ls_grid(int64_t units, int64_t per_block, int64_t cap) {
  int64_t b = (units + per_block - 1) / per_block;
  if (cap > KC_MAX_BLOCKS) cap = KC_MAX_BLOCKS;   /* the simulator's small grids check the loops */
  return (unsigned)(b < 1 ? 1 : b > cap ? cap : b);
}

/* {======================================================================
** Reduction tail: parts[2*nparts] (value, weight) summed in order by one
** block; out[0] = total / divisor (the weight sum when div_by_w), and
** dv (device, may be NULL) gets the divisor a "mean" used.
** ======================================================================= */

template <typename T>
__global__ void ls_finish(T *out, double *dv, const double *parts, int nparts, int red, int div_by_w,
                          double div) {
  KC_SHARED(double, buf, [32]);
  double v = 0, w = 0;
  /* each thread sums a fixed stride of parts: the same order every run */
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) {
    v += parts[2 * i];
    w += parts[2 * i + 1];
  }
  v = kc_block_sum(v, buf);
  w = kc_block_sum(w, buf);
  if (threadIdx.x == 0) {
    double d = div_by_w ? w : div;
    if (red == KEEL_REDUCTION_MEAN) v = v / d;
    out[0] = (T)v;
    if (dv) *dv = d;
  }
}

/* The block's (v, w) into parts[2*blockIdx.x]. */
__device__ __forceinline__ void ls_store_part(double *parts, double v, double w, double *buf) {
  v = kc_block_sum(v, buf);
  w = kc_block_sum(w, buf);
  if (threadIdx.x == 0) {
    parts[2 * blockIdx.x] = v;
    parts[2 * blockIdx.x + 1] = w;
  }
}

/* Scratch for the parts, zeroed (a capped grid leaves some unwritten). */
static int ls_parts(kc_state *s, unsigned nb, double **parts) {
  void *p;
  int e = kc_scratch(s, sizeof(double) * (2 * (size_t)nb + 1), &p);
  if (e) return e;
  *parts = (double *)p;
  return kc_check_cuda(cudaMemsetAsync(p, 0, sizeof(double) * 2 * (size_t)nb, s->stream));
}

/* }====================================================================== */

/* {======================================================================
** Pointwise losses of d = x - y (KL_OP_MSE_LOSS .. KL_OP_HUBER_LOSS, in
** that order in the engine's op table). p: beta or delta.
** ======================================================================= */

enum { LS_MSE, LS_L1, LS_SMOOTH_L1, LS_HUBER };

template <int OP>
__device__ __forceinline__ double pl_value(double d, double p) {
  double a = fabs(d);
  if (OP == LS_MSE) return d * d;
  if (OP == LS_L1) return a;
  if (OP == LS_SMOOTH_L1) return a < p ? 0.5 * d * d / p : a - 0.5 * p;
  return a < p ? 0.5 * d * d : p * (a - 0.5 * p);
}

template <int OP>
__device__ __forceinline__ double pl_slope(double d, double p) {
  double sg = (d > 0) - (d < 0);
  if (OP == LS_MSE) return 2 * d;
  if (OP == LS_L1) return sg;
  if (OP == LS_SMOOTH_L1) return fabs(d) < p ? d / p : sg;
  return fabs(d) < p ? d : p * sg;
}

template <typename T, int OP>
__global__ void pl_none(T *out, const T *x, const T *y, int64_t n, double p) {
  KC_GRID_LOOP(i, n) out[i] = (T)pl_value<OP>((double)x[i] - (double)y[i], p);
}

template <typename T, int OP>
__global__ void pl_reduce(double *parts, const T *x, const T *y, int64_t n, double p) {
  KC_SHARED(double, buf, [32]);
  double acc = 0;
  KC_GRID_LOOP(i, n) acc += pl_value<OP>((double)x[i] - (double)y[i], p);
  ls_store_part(parts, acc, 0, buf);
}

template <typename T, int OP>
__global__ void pl_backward(T *gx, const T *g, const T *x, const T *y, int64_t n, double p, int red) {
  double g0 = 0;
  if (red != KEEL_REDUCTION_NONE) g0 = (double)g[0];
  if (red == KEEL_REDUCTION_MEAN) g0 /= (double)n;
  KC_GRID_LOOP(i, n) {
    double gi = red == KEEL_REDUCTION_NONE ? (double)g[i] : g0;
    gx[i] = (T)(gi * pl_slope<OP>((double)x[i] - (double)y[i], p));
  }
}

template <typename T, int OP>
static int pl_forward_op(kc_state *s, T *o, const T *x, const T *y, int64_t n, double p, int red) {
  if (red == KEEL_REDUCTION_NONE) {
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, pl_none<T, OP>)(o, x, y, n, p);
    return KC_LAUNCHED();
  }
  unsigned nb = ls_grid(n, KC_THREADS, LS_PARTS);
  double *parts;
  int e = ls_parts(s, nb, &parts);
  if (e) return e;
  if (n > 0) {
    KC_LAUNCH(nb, KC_THREADS, 0, s->stream, pl_reduce<T, OP>)(parts, x, y, n, p);
    if ((e = KC_LAUNCHED())) return e;
  }
  /* mean of nothing: 0/0, NaN as on the CPU */
  KC_LAUNCH(1, KC_THREADS, 0, s->stream, ls_finish<T>)(o, (double *)NULL, parts, (int)nb, red, 0, (double)n);
  return KC_LAUNCHED();
}

template <typename T>
static int pl_forward(kc_state *s, int op, T *o, const T *x, const T *y, int64_t n, double p, int red) {
  switch (op - KL_OP_MSE_LOSS) {
    case LS_MSE: return pl_forward_op<T, LS_MSE>(s, o, x, y, n, p, red);
    case LS_L1: return pl_forward_op<T, LS_L1>(s, o, x, y, n, p, red);
    case LS_SMOOTH_L1: return pl_forward_op<T, LS_SMOOTH_L1>(s, o, x, y, n, p, red);
    case LS_HUBER: return pl_forward_op<T, LS_HUBER>(s, o, x, y, n, p, red);
    default: return KC_ERR_ARG;
  }
}

template <typename T>
static int pl_back(kc_state *s, int op, T *gx, const T *g, const T *x, const T *y, int64_t n, double p, int red) {
  unsigned nb = kc_blocks(n);
  switch (op - KL_OP_MSE_LOSS) {
    case LS_MSE: KC_LAUNCH(nb, KC_THREADS, 0, s->stream, pl_backward<T, LS_MSE>)(gx, g, x, y, n, p, red); break;
    case LS_L1: KC_LAUNCH(nb, KC_THREADS, 0, s->stream, pl_backward<T, LS_L1>)(gx, g, x, y, n, p, red); break;
    case LS_SMOOTH_L1:
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, pl_backward<T, LS_SMOOTH_L1>)(gx, g, x, y, n, p, red);
      break;
    case LS_HUBER: KC_LAUNCH(nb, KC_THREADS, 0, s->stream, pl_backward<T, LS_HUBER>)(gx, g, x, y, n, p, red); break;
    default: return KC_ERR_ARG;
  }
  return KC_LAUNCHED();
}

static int ls_float(const kc_view *v, int dt) {
  return v && v->dtype == dt && kc_is_float(dt);
}

static int kc_ploss(kc_state *s, int op, const kc_view *out, const kc_view *x, const kc_view *y, double p,
                    int red) {
  if (!out || !x || !y || y->numel != x->numel) return KC_ERR_ARG;
  if (!ls_float(x, x->dtype) || !ls_float(y, x->dtype) || !ls_float(out, x->dtype)) return KC_ERR_DTYPE;
  if (red == KEEL_REDUCTION_NONE && x->numel == 0) return KC_OK;
  if (x->dtype == KEEL_F32)
    return pl_forward(s, op, (float *)out->data, (const float *)x->data, (const float *)y->data, x->numel, p, red);
  return pl_forward(s, op, (double *)out->data, (const double *)x->data, (const double *)y->data, x->numel, p, red);
}

static int kc_ploss_backward(kc_state *s, int op, const kc_view *gx, const kc_view *gout, const kc_view *x,
                             const kc_view *y, double p, int red) {
  if (!gout || !x || !y || y->numel != x->numel) return KC_ERR_ARG;
  if (!ls_float(x, x->dtype) || !ls_float(y, x->dtype) || !ls_float(gout, x->dtype)) return KC_ERR_DTYPE;
  if (!gx || x->numel == 0) return KC_OK;
  if (!ls_float(gx, x->dtype)) return KC_ERR_DTYPE;
  if (x->dtype == KEEL_F32)
    return pl_back(s, op, (float *)gx->data, (const float *)gout->data, (const float *)x->data,
                   (const float *)y->data, x->numel, p, red);
  return pl_back(s, op, (double *)gx->data, (const double *)gout->data, (const double *)x->data,
                 (const double *)y->data, x->numel, p, red);
}

/* }====================================================================== */

/* {======================================================================
** Binary cross entropy from logits:
**   l = w ((1 - y) x + (1 + (pw - 1) y) softplus(-x))
** ======================================================================= */

/* log(1 + exp(-x)) for every x */
template <typename T>
__device__ __forceinline__ T bce_softplus_neg(T x) {
  return (x < 0 ? -x : (T)0) + kc_log1p(kc_exp(-kc_fabs(x)));
}
template <typename T>
__device__ __forceinline__ T bce_sigm(T x) {
  if (x >= 0) return (T)1 / ((T)1 + kc_exp(-x));
  T e = kc_exp(x);
  return e / ((T)1 + e);
}

template <typename T>
__device__ __forceinline__ T bce_value(const T *x, const T *y, const T *w, const T *pw, int64_t i) {
  T xi = x[i], yi = y[i];
  T lw = pw ? (T)1 + (pw[i] - (T)1) * yi : (T)1;
  return (((T)1 - yi) * xi + lw * bce_softplus_neg(xi)) * (w ? w[i] : (T)1);
}

template <typename T>
__global__ void bce_none(T *out, const T *x, const T *y, const T *w, const T *pw, int64_t n) {
  KC_GRID_LOOP(i, n) out[i] = bce_value(x, y, w, pw, i);
}

template <typename T>
__global__ void bce_reduce(double *parts, const T *x, const T *y, const T *w, const T *pw, int64_t n) {
  KC_SHARED(double, buf, [32]);
  double acc = 0;
  KC_GRID_LOOP(i, n) acc += (double)bce_value(x, y, w, pw, i);
  ls_store_part(parts, acc, 0, buf);
}

/* d/dx = w ((1 - y) - lw sigmoid(-x)); d/dy = w (-x + (pw - 1) softplus(-x)) */
template <typename T>
__global__ void bce_backward(T *gx, T *gy, const T *g, const T *x, const T *y, const T *w, const T *pw,
                             int64_t n, int red) {
  double g0 = 0;
  if (red != KEEL_REDUCTION_NONE) g0 = (double)g[0];
  if (red == KEEL_REDUCTION_MEAN) g0 /= (double)n;
  KC_GRID_LOOP(i, n) {
    T xi = x[i], yi = y[i];
    T gi = (T)(red == KEEL_REDUCTION_NONE ? (double)g[i] : g0) * (w ? w[i] : (T)1);
    T pwi = pw ? pw[i] : (T)1;
    if (gx) gx[i] = gi * (((T)1 - yi) - ((T)1 + (pwi - (T)1) * yi) * bce_sigm(-xi));
    if (gy) gy[i] = gi * (-xi + (pwi - (T)1) * bce_softplus_neg(xi));
  }
}

template <typename T>
static int bce_forward(kc_state *s, T *o, const T *x, const T *y, const T *w, const T *pw, int64_t n, int red) {
  if (red == KEEL_REDUCTION_NONE) {
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, bce_none<T>)(o, x, y, w, pw, n);
    return KC_LAUNCHED();
  }
  unsigned nb = ls_grid(n, KC_THREADS, LS_PARTS);
  double *parts;
  int e = ls_parts(s, nb, &parts);
  if (e) return e;
  if (n > 0) {
    KC_LAUNCH(nb, KC_THREADS, 0, s->stream, bce_reduce<T>)(parts, x, y, w, pw, n);
    if ((e = KC_LAUNCHED())) return e;
  }
  KC_LAUNCH(1, KC_THREADS, 0, s->stream, ls_finish<T>)(o, (double *)NULL, parts, (int)nb, red, 0, (double)n);
  return KC_LAUNCHED();
}

#define LS_PTR(T, v) ((v) ? (T *)(v)->data : (T *)NULL)

static int kc_bce(kc_state *s, const kc_view *out, const kc_view *x, const kc_view *y, const kc_view *w,
                  const kc_view *pw, int red) {
  int dt;
  if (!out || !x || !y || y->numel != x->numel || (w && w->numel != x->numel) || (pw && pw->numel != x->numel))
    return KC_ERR_ARG;
  dt = x->dtype;
  if (!ls_float(x, dt) || !ls_float(y, dt) || !ls_float(out, dt) || (w && !ls_float(w, dt)) ||
      (pw && !ls_float(pw, dt)))
    return KC_ERR_DTYPE;
  if (red == KEEL_REDUCTION_NONE && x->numel == 0) return KC_OK;
  if (dt == KEEL_F32)
    return bce_forward(s, (float *)out->data, LS_PTR(const float, x), LS_PTR(const float, y), LS_PTR(const float, w),
                       LS_PTR(const float, pw), x->numel, red);
  return bce_forward(s, (double *)out->data, LS_PTR(const double, x), LS_PTR(const double, y),
                     LS_PTR(const double, w), LS_PTR(const double, pw), x->numel, red);
}

static int kc_bce_backward(kc_state *s, const kc_view *gx, const kc_view *gy, const kc_view *gout, const kc_view *x,
                           const kc_view *y, const kc_view *w, const kc_view *pw, int red) {
  int dt;
  if (!gout || !x || !y || y->numel != x->numel || (w && w->numel != x->numel) || (pw && pw->numel != x->numel))
    return KC_ERR_ARG;
  dt = x->dtype;
  if (!ls_float(x, dt) || !ls_float(y, dt) || !ls_float(gout, dt) || (w && !ls_float(w, dt)) ||
      (pw && !ls_float(pw, dt)) || (gx && !ls_float(gx, dt)) || (gy && !ls_float(gy, dt)))
    return KC_ERR_DTYPE;
  if ((!gx && !gy) || x->numel == 0) return KC_OK;
  if (dt == KEEL_F32)
    KC_LAUNCH(kc_blocks(x->numel), KC_THREADS, 0, s->stream, bce_backward<float>)
    (LS_PTR(float, gx), LS_PTR(float, gy), LS_PTR(const float, gout), LS_PTR(const float, x), LS_PTR(const float, y),
     LS_PTR(const float, w), LS_PTR(const float, pw), x->numel, red);
  else
    KC_LAUNCH(kc_blocks(x->numel), KC_THREADS, 0, s->stream, bce_backward<double>)
    (LS_PTR(double, gx), LS_PTR(double, gy), LS_PTR(const double, gout), LS_PTR(const double, x),
     LS_PTR(const double, y), LS_PTR(const double, w), LS_PTR(const double, pw), x->numel, red);
  return KC_LAUNCHED();
}

/* }====================================================================== */

/* {======================================================================
** Class losses: cross entropy (logits) and nll (log-probabilities)
** ======================================================================= */

/* The arguments every class-loss kernel takes, by value. */
template <typename T>
struct cl_args {
  const T *x, *tp, *w;          /* tp: probability targets (probs), w: class weights or NULL */
  const int64_t *t;             /* class indices (not probs), counted from tbase */
  int64_t tbase, tignore;       /* index base; the ignored value (KC_NO_IGNORE: none) */
  int64_t n, c, inner, ns;      /* ns = n * inner samples */
  double e;                     /* label smoothing */
  int logits, probs, red;
};

/* Sample smp's 0-based class, or -1 when its target is ignored. */
template <typename T>
__device__ __forceinline__ int64_t cl_class(const cl_args<T> &q, int64_t smp) {
  int64_t y = q.t[smp];
  return y == q.tignore ? -1 : y - q.tbase;
}

/* Where sample smp's classes start. */
template <typename T>
__device__ __forceinline__ int64_t cl_base(const cl_args<T> &q, int64_t smp) {
  int64_t b = smp / q.inner;
  return b * q.c * q.inner + (smp - b * q.inner);
}

/* The group layout: lanes per sample G, samples per block, this lane's
** sample slot and lane. */
#define CL_GROUP(L)                                       \
  const int G = (L) ? (L) : (int)blockDim.x;              \
  const int spb = (L) ? (int)blockDim.x / (L) : 1;        \
  const int sub = (L) ? (int)threadIdx.x / (L) : 0;       \
  const int lane = (L) ? (int)threadIdx.x % (L) : (int)threadIdx.x

/* Forward: per-sample loss into out (none) or the block's parts; lse (may
** be NULL) gets z. */
template <typename T, int L>
__global__ void cl_forward(cl_args<T> q, T *out, double *lse, double *parts) {
  KC_SHARED(T, bt, [32]);
  KC_SHARED(double, bd, [32]);
  CL_GROUP(L);
  const int64_t C = q.c, inner = q.inner;
  double acc = 0, accw = 0;
  /* s0 is uniform over the block: every lane runs every iteration */
  for (int64_t s0 = (int64_t)blockIdx.x * spb; s0 < q.ns; s0 += (int64_t)gridDim.x * spb) {
    int64_t smp = s0 + sub;
    int64_t nc = smp < q.ns ? C : 0;
    int64_t base = nc ? cl_base(q, smp) : 0;
    const T *x = q.x + base;
    T m = (T)-INFINITY, sx = 0;
    double a1 = 0, a2 = 0, sw = 0, z = 0;
    if (q.logits) {
      for (int64_t k = lane; k < nc; k += G) {
        T v = x[k * inner];
        if (v > m) m = v;
      }
      m = kc_group_max<L>(m, bt, (T)-INFINITY);
      for (int64_t k = lane; k < nc; k += G) {
        T v = x[k * inner];
        double wk = q.w ? (double)q.w[k] : 1;
        sx += v == (T)-INFINITY ? (T)0 : v == m ? (T)1 : kc_exp(v - m);
        if (q.probs) {
          double tk = (1 - q.e) * (double)q.tp[base + k * inner] + q.e / (double)C;
          a1 += wk * tk * ((double)m - (double)v);
          a2 += wk * tk;
        } else if (q.e > 0) {
          a1 += wk * ((double)m - (double)v);
          sw += wk;
        }
      }
      sx = kc_group_sum<L>(sx, bt);
      if (q.probs) {
        a1 = kc_group_sum<L>(a1, bd);
        a2 = kc_group_sum<L>(a2, bd);
      } else if (q.e > 0) {
        a1 = kc_group_sum<L>(a1, bd);
        sw = kc_group_sum<L>(sw, bd);
      }
      /* a +inf max counts its copies: one is a finite sum, more are NaN */
      if (m == (T)INFINITY && sx != (T)1) sx = (T)NAN;
      z = (double)m + log((double)sx);
    }
    if (lane == 0 && nc) {
      double l = 0, wy = 0;
      if (q.probs) {
        l = a1 + (z - (double)m) * a2;
      } else {
        int64_t y = cl_class(q, smp);
        if (y >= 0) {
          wy = q.w ? (double)q.w[y] : 1;
          l = (1 - q.e) * wy * (z - (double)x[y * inner]);
          if (q.e > 0) l += q.e / (double)C * (a1 + (z - (double)m) * sw);
        }
      }
      if (lse) lse[smp] = z;
      if (q.red == KEEL_REDUCTION_NONE) out[smp] = (T)l;
      acc += l;
      accw += wy;
    }
  }
  if (q.red != KEEL_REDUCTION_NONE) ls_store_part(parts, acc, accw, bd);
}

/* Backward: gx (may be NULL), gt (probs, may be NULL) from the saved z. */
template <typename T, int L>
__global__ void cl_backward(cl_args<T> q, T *gx, T *gt, const T *g, const double *lse, const double *div) {
  KC_SHARED(double, bd, [32]);
  CL_GROUP(L);
  const int64_t C = q.c, inner = q.inner;
  const double e = q.e, eC = q.e / (double)C;
  double g0 = 0, sw = 0;
  if (q.red != KEEL_REDUCTION_NONE) g0 = (double)g[0];
  if (q.red == KEEL_REDUCTION_MEAN) g0 /= *div;
  /* smoothing's class-weight sum: once per block, its threads sharing the
  ** classes (a fixed order, so every block gets the same bits); the
  ** condition is the same for the whole block, so all reach the sum */
  if (e > 0 && q.logits && !q.probs) {
    if (q.w) {
      for (int64_t k = threadIdx.x; k < C; k += blockDim.x) sw += (double)q.w[k];
      sw = kc_block_sum(sw, bd);
    } else {
      sw = (double)C;
    }
  }
  for (int64_t s0 = (int64_t)blockIdx.x * spb; s0 < q.ns; s0 += (int64_t)gridDim.x * spb) {
    int64_t smp = s0 + sub;
    int64_t nc = smp < q.ns ? C : 0;
    int64_t base = nc ? cl_base(q, smp) : 0;
    const T *x = q.x + base;
    double gs = nc && q.red == KEEL_REDUCTION_NONE ? (double)g[smp] : g0;
    double z = nc && q.logits ? lse[smp] : 0;
    if (q.probs) {
      double swt = 0;
      for (int64_t k = lane; k < nc; k += G)
        swt += (q.w ? (double)q.w[k] : 1) * ((1 - e) * (double)q.tp[base + k * inner] + eC);
      swt = kc_group_sum<L>(swt, bd);
      for (int64_t k = lane; k < nc; k += G) {
        int64_t at = k * inner;
        double wk = q.w ? (double)q.w[k] : 1, lp = (double)x[at] - z;
        double tk = (1 - e) * (double)q.tp[base + at] + eC;
        if (gx) gx[base + at] = (T)(gs * ((double)kc_exp((T)lp) * swt - wk * tk));
        if (gt) gt[base + at] = (T)(-gs * (1 - e) * wk * lp);
      }
      continue;
    }
    if (!gx) continue;
    int64_t y = nc ? cl_class(q, smp) : -1;
    if (y < 0) {
      for (int64_t k = lane; k < nc; k += G) gx[base + k * inner] = (T)0;
    } else if (!q.logits) {
      double wy = q.w ? (double)q.w[y] : 1;
      for (int64_t k = lane; k < nc; k += G) gx[base + k * inner] = (T)(k == y ? -wy * gs : 0);
    } else {
      double wy = q.w ? (double)q.w[y] : 1;
      for (int64_t k = lane; k < nc; k += G) {
        int64_t at = k * inner;
        double p = (double)kc_exp((T)((double)x[at] - z));
        double d = (1 - e) * wy * (p - (k == y));
        if (e > 0) d += eC * (p * sw - (q.w ? (double)q.w[k] : 1));
        gx[base + at] = (T)(gs * d);
      }
    }
  }
}

/* Lanes per sample: 1 when classes are strided (inner > 1), else the
** class count's power of two up to a warp, 0 (a block) past CL_WARP_MAX. */
#define CL_WARP_MAX 1024
static int cl_lanes(int64_t c, int64_t inner) {
  int p = 1;
  if (inner > 1) return 1;
  if (c > CL_WARP_MAX) return 0;
  while (p < c && p < 32) p <<= 1;
  return p;
}

template <typename T, int L>
static int cl_launch_fwd(kc_state *s, const cl_args<T> &q, T *out, double *lse, double *parts, unsigned nb) {
  int threads = L ? LS_ROW_THREADS : LS_BLOCK_THREADS;
  KC_LAUNCH(nb, threads, 0, s->stream, cl_forward<T, L>)(q, out, lse, parts);
  return KC_LAUNCHED();
}

template <typename T, int L>
static int cl_launch_bwd(kc_state *s, const cl_args<T> &q, T *gx, T *gt, const T *g, const double *lse,
                         const double *div) {
  int threads = L ? LS_ROW_THREADS : LS_BLOCK_THREADS;
  unsigned nb = ls_grid(q.ns, L ? LS_ROW_THREADS / L : 1, KC_MAX_BLOCKS);
  KC_LAUNCH(nb, threads, 0, s->stream, cl_backward<T, L>)(q, gx, gt, g, lse, div);
  return KC_LAUNCHED();
}

/* The kernel for q's lane count. */
template <typename T>
static int cl_fwd(kc_state *s, const cl_args<T> &q, T *out, double *lse, double *parts, unsigned nb) {
  switch (cl_lanes(q.c, q.inner)) {
    case 0: return cl_launch_fwd<T, 0>(s, q, out, lse, parts, nb);
    case 1: return cl_launch_fwd<T, 1>(s, q, out, lse, parts, nb);
    case 2: return cl_launch_fwd<T, 2>(s, q, out, lse, parts, nb);
    case 4: return cl_launch_fwd<T, 4>(s, q, out, lse, parts, nb);
    case 8: return cl_launch_fwd<T, 8>(s, q, out, lse, parts, nb);
    case 16: return cl_launch_fwd<T, 16>(s, q, out, lse, parts, nb);
    default: return cl_launch_fwd<T, 32>(s, q, out, lse, parts, nb);
  }
}

template <typename T>
static int cl_bwd(kc_state *s, const cl_args<T> &q, T *gx, T *gt, const T *g, const double *lse,
                  const double *div) {
  switch (cl_lanes(q.c, q.inner)) {
    case 0: return cl_launch_bwd<T, 0>(s, q, gx, gt, g, lse, div);
    case 1: return cl_launch_bwd<T, 1>(s, q, gx, gt, g, lse, div);
    case 2: return cl_launch_bwd<T, 2>(s, q, gx, gt, g, lse, div);
    case 4: return cl_launch_bwd<T, 4>(s, q, gx, gt, g, lse, div);
    case 8: return cl_launch_bwd<T, 8>(s, q, gx, gt, g, lse, div);
    case 16: return cl_launch_bwd<T, 16>(s, q, gx, gt, g, lse, div);
    default: return cl_launch_bwd<T, 32>(s, q, gx, gt, g, lse, div);
  }
}

template <typename T>
static void cl_fill_args(cl_args<T> *a, const kc_closs *q, const kc_view *x, const kc_view *target,
                         const kc_view *weight) {
  a->x = (const T *)x->data;
  a->tp = q->probs ? (const T *)target->data : NULL;
  a->t = q->probs ? NULL : (const int64_t *)target->data;
  a->tbase = q->index_base;
  a->tignore = q->ignore_index;
  a->w = weight ? (const T *)weight->data : NULL;
  a->n = q->n;
  a->c = q->c;
  a->inner = q->inner;
  a->ns = q->n * q->inner;
  a->e = q->smoothing;
  a->logits = q->logits;
  a->probs = q->probs;
  a->red = q->reduction;
}

/*
** One pass over the samples, then (unless "none") the ordered tail, which
** also leaves the divisor of "mean" in div for backward: nothing comes
** back to the host, so nothing waits.
*/
template <typename T>
static int cl_forward_entry(kc_state *s, const kc_closs *q, const kc_view *out, const kc_view *lse,
                            const kc_view *div, const kc_view *x, const kc_view *target, const kc_view *weight) {
  cl_args<T> a;
  int e, L = cl_lanes(q->c, q->inner);
  unsigned nb;
  double *parts = NULL;
  cl_fill_args(&a, q, x, target, weight);
  nb = ls_grid(a.ns, L ? LS_ROW_THREADS / L : 1, q->reduction == KEEL_REDUCTION_NONE ? KC_MAX_BLOCKS : LS_PARTS);
  if (q->reduction != KEEL_REDUCTION_NONE) {
    if ((e = ls_parts(s, nb, &parts))) return e;
  } else if (a.ns == 0) {
    return KC_OK;
  }
  if (a.ns > 0 && (e = cl_fwd<T>(s, a, (T *)out->data, lse ? (double *)lse->data : NULL, parts, nb))) return e;
  if (q->reduction == KEEL_REDUCTION_NONE) return KC_OK;
  KC_LAUNCH(1, KC_THREADS, 0, s->stream, ls_finish<T>)((T *)out->data, LS_PTR(double, div), parts, (int)nb,
                                                         q->reduction, !q->probs, (double)a.ns);
  return KC_LAUNCHED();
}

static int cl_check(const kc_closs *q, const kc_view *x, const kc_view *target, const kc_view *weight) {
  int dt = x ? x->dtype : -1;
  if (!q || !x || !target || q->n < 0 || q->c < 1 || q->inner < 0 || x->numel != q->n * q->c * q->inner)
    return KC_ERR_ARG;
  if (!ls_float(x, dt) || (weight && !ls_float(weight, dt))) return KC_ERR_DTYPE;
  if (weight && weight->numel != q->c) return KC_ERR_ARG;
  if (q->probs ? !ls_float(target, dt) : target->dtype != KEEL_I64) return KC_ERR_DTYPE;
  if (q->probs ? target->numel != x->numel : target->numel != q->n * q->inner) return KC_ERR_ARG;
  if (!q->probs && target->numel > 1 && !kc_contiguous(target)) return KC_ERR_ARG;   /* read as t[smp] */
  return KC_OK;
}

/* lse (logits only) and div: float64, contiguous enough for their numel. */
static int cl_check_aux(const kc_closs *q, const kc_view *lse, const kc_view *div) {
  if (q->logits ? !lse || lse->numel != q->n * q->inner : lse != NULL) return KC_ERR_ARG;
  if (!div || div->numel != 1) return KC_ERR_ARG;
  if ((lse && lse->dtype != KEEL_F64) || div->dtype != KEEL_F64) return KC_ERR_DTYPE;
  return KC_OK;
}

static int kc_closs_fwd(kc_state *s, const kc_closs *q, const kc_view *out, const kc_view *lse, const kc_view *div,
                        const kc_view *x, const kc_view *target, const kc_view *weight) {
  int e = cl_check(q, x, target, weight);
  if (!e) e = cl_check_aux(q, lse, div);
  if (e) return e;
  if (!out) return KC_ERR_ARG;
  if (!ls_float(out, x->dtype)) return KC_ERR_DTYPE;
  if (x->dtype == KEEL_F32) return cl_forward_entry<float>(s, q, out, lse, div, x, target, weight);
  return cl_forward_entry<double>(s, q, out, lse, div, x, target, weight);
}

static int kc_closs_backward(kc_state *s, const kc_closs *q, const kc_view *gx, const kc_view *gt,
                             const kc_view *gout, const kc_view *x, const kc_view *target, const kc_view *weight,
                             const kc_view *lse, const kc_view *div) {
  int e = cl_check(q, x, target, weight);
  int dt;
  if (!e) e = cl_check_aux(q, lse, div);
  if (e) return e;
  dt = x->dtype;
  if (!gout) return KC_ERR_ARG;
  if (!ls_float(gout, dt) || (gx && !ls_float(gx, dt)) || (gt && !ls_float(gt, dt))) return KC_ERR_DTYPE;
  if (!q->probs) gt = NULL;
  if ((!gx && !gt) || x->numel == 0) return KC_OK;
  if (dt == KEEL_F32) {
    cl_args<float> a;
    cl_fill_args(&a, q, x, target, weight);
    return cl_bwd<float>(s, a, LS_PTR(float, gx), LS_PTR(float, gt), (const float *)gout->data,
                         LS_PTR(const double, lse), (const double *)div->data);
  }
  cl_args<double> a;
  cl_fill_args(&a, q, x, target, weight);
  return cl_bwd<double>(s, a, LS_PTR(double, gx), LS_PTR(double, gt), (const double *)gout->data,
                        LS_PTR(const double, lse), (const double *)div->data);
}

/* }====================================================================== */

void kc_register_loss(keel_cuda_table *t) {
  t->ploss = kc_ploss;
  t->ploss_backward = kc_ploss_backward;
  t->closs = kc_closs_fwd;
  t->closs_backward = kc_closs_backward;
  t->bce = kc_bce;
  t->bce_backward = kc_bce_backward;
}
