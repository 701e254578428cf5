/*
** act.cu: the pointwise activations leaky_relu, elu, gelu (erf and tanh
** forms), silu and softplus, forward (act) and backward (act_backward),
** as engine/backend_cpu_act.c defines them. op is the engine's KL_OP_*
** code (engine/keel_impl.h, included for the enum only) and p the node's
** parameters: leaky_relu p[0] slope, elu p[0] alpha, gelu p[0] != 0 for
** the tanh form, softplus p[0] beta and p[1] threshold.
**
** The CPU computes both dtypes in double. Here float64 does too, with the
** CPU's formulas; float32 computes in float, as PyTorch does (double
** arithmetic would cost a float32 activation its speed on most GPUs), and
** so may differ from the CPU by a few float ulps. Where a float formula
** could overflow where the double one does not (softplus with a large
** threshold), float32 uses an equivalent form that cannot.
**
** The ops pass contiguous operands; a strided view still works (a slower
** loop), so a change on the engine's side cannot corrupt memory.
*/
#include "common.cuh"
#include "keel_impl.h"

/* {======================================================================
** The functions, per compute type
** ======================================================================= */

#define ACT_SQRT1_2 0.70710678118654752440       /* 1/sqrt(2) */
#define ACT_SQRT_2_OVER_PI 0.79788456080286535588 /* sqrt(2/pi) */
#define ACT_INV_SQRT_2PI 0.39894228040143267794   /* 1/sqrt(2 pi) */
#define ACT_GELU_C 0.044715

/* The logistic function; exp only ever sees a non-positive argument. */
template <typename T>
__device__ __forceinline__ T act_sigm(T x) {
  if (x >= 0) return (T)1 / ((T)1 + kc_exp(-x));
  T e = kc_exp(x);
  return e / ((T)1 + e);
}

/* log(1 + exp(x)): the CPU's expression in double; in float the form
** max(x, 0) + log1p(exp(-|x|)), which expf cannot overflow. */
__device__ __forceinline__ double act_log1pexp(double x) { return kc_log1p(kc_exp(x)); }
__device__ __forceinline__ float act_log1pexp(float x) {
  return (x > 0 ? x : 0.0f) + log1pf(expf(-fabsf(x)));
}

/* Parameters in the compute type, made on the host. */
template <typename T>
struct act_par {
  T p0, p1;
};

template <int OP, typename T>
__device__ __forceinline__ T act_value(T x, act_par<T> p) {
  switch (OP) {
    case KL_OP_LEAKY_RELU: return x > 0 ? x : x * p.p0;
    case KL_OP_ELU: return x > 0 ? x : p.p0 * kc_expm1(x);
    case KL_OP_GELU:
      if (p.p0 != 0)
        return (T)0.5 * x * ((T)1 + kc_tanh((T)ACT_SQRT_2_OVER_PI * (x + (T)ACT_GELU_C * x * x * x)));
      /* 1 + erf(z) == erfc(-z), without the cancellation for x << 0 */
      return (T)0.5 * x * kc_erfc(-x * (T)ACT_SQRT1_2);
    case KL_OP_SILU: return x * act_sigm(x);
    default: {  /* softplus: p0 beta, p1 threshold (linear above it) */
      T bx = p.p0 * x;
      return bx > p.p1 ? x : act_log1pexp(bx) / p.p0;
    }
  }
}

/* d act / d x */
template <int OP, typename T>
__device__ __forceinline__ T act_slope(T x, act_par<T> p) {
  switch (OP) {
    case KL_OP_LEAKY_RELU: return x > 0 ? (T)1 : p.p0;
    case KL_OP_ELU: return x > 0 ? (T)1 : p.p0 * kc_exp(x);
    case KL_OP_GELU:
      if (p.p0 != 0) {
        T x2 = x * x, t = kc_tanh((T)ACT_SQRT_2_OVER_PI * (x + (T)ACT_GELU_C * x2 * x));
        return (T)0.5 * ((T)1 + t) +
               (T)0.5 * x * ((T)1 - t * t) * (T)ACT_SQRT_2_OVER_PI * ((T)1 + (T)3 * (T)ACT_GELU_C * x2);
      }
      return (T)0.5 * kc_erfc(-x * (T)ACT_SQRT1_2) + x * (T)ACT_INV_SQRT_2PI * kc_exp((T)-0.5 * x * x);
    case KL_OP_SILU: {
      T s = act_sigm(x);
      return s * ((T)1 + x * ((T)1 - s));
    }
    default: {
      T bx = p.p0 * x;
      return bx > p.p1 ? (T)1 : act_sigm(bx);
    }
  }
}

/* }====================================================================== */

/* {======================================================================
** Kernels: dense (16-byte vectors when aligned) and strided
** ======================================================================= */

template <int OP, typename T>
__global__ void act_dense(T *o, const T *a, int64_t nv, int64_t n, act_par<T> p) {
  constexpr int V = 16 / sizeof(T);
  KC_GRID_LOOP(i, nv) {
    kc_vec16<T> va = ((const kc_vec16<T> *)a)[i], vo;
    for (int k = 0; k < V; k++) vo.v[k] = act_value<OP, T>(va.v[k], p);
    ((kc_vec16<T> *)o)[i] = vo;
  }
  for (int64_t i = nv * V + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    o[i] = act_value<OP, T>(a[i], p);
}

template <int OP, typename T>
__global__ void act_strided(T *o, const T *a, kc_geom g, bool small, int64_t n, act_par<T> p) {
  KC_GRID_LOOP(i, n) {
    int64_t off[2];
    kc_offsets_sel<2>(g, small, i, off);
    o[off[0]] = act_value<OP, T>(a[off[1]], p);
  }
}

/* gin = gout * act'(a) */
template <int OP, typename T>
__global__ void act_back_dense(T *gin, const T *g, const T *a, int64_t nv, int64_t n, act_par<T> p) {
  constexpr int V = 16 / sizeof(T);
  KC_GRID_LOOP(i, nv) {
    kc_vec16<T> vg = ((const kc_vec16<T> *)g)[i], va = ((const kc_vec16<T> *)a)[i], vo;
    for (int k = 0; k < V; k++) vo.v[k] = vg.v[k] * act_slope<OP, T>(va.v[k], p);
    ((kc_vec16<T> *)gin)[i] = vo;
  }
  for (int64_t i = nv * V + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    gin[i] = g[i] * act_slope<OP, T>(a[i], p);
}

template <int OP, typename T>
__global__ void act_back_strided(T *gin, const T *g, const T *a, kc_geom geo, bool small, int64_t n,
                                 act_par<T> p) {
  KC_GRID_LOOP(i, n) {
    int64_t off[3];
    kc_offsets_sel<3>(geo, small, i, off);
    gin[off[0]] = g[off[1]] * act_slope<OP, T>(a[off[2]], p);
  }
}

/* }====================================================================== */

/* {======================================================================
** Launchers
** ======================================================================= */

template <int OP, typename T>
static int act_launch(kc_state *s, bool back, const kc_view *o, const kc_view *g, const kc_view *a,
                      act_par<T> p) {
  const kc_view *v[3] = {o, back ? g : a, a};
  int nops = back ? 3 : 2;
  kc_geom geo;
  int64_t n = o->numel;
  T *po = (T *)o->data;
  const T *pg = (const T *)(back ? g->data : NULL), *pa = (const T *)a->data;
  kc_make_geom(&geo, nops, v);
  if (kc_geom_dense(&geo, nops)) {
    int64_t nv = kc_vec_count<T>(n, po, pa, back ? pg : NULL);
    unsigned nb = kc_blocks_sm(s, nv ? nv : n);
    if (back) KC_LAUNCH(nb, KC_THREADS, 0, s->stream, act_back_dense<OP, T>)(po, pg, pa, nv, n, p);
    else KC_LAUNCH(nb, KC_THREADS, 0, s->stream, act_dense<OP, T>)(po, pa, nv, n, p);
  } else {
    unsigned nb = kc_blocks_sm(s, n);
    if (back) KC_LAUNCH(nb, KC_THREADS, 0, s->stream, act_back_strided<OP, T>)(po, pg, pa, geo, kc_index32(n), n, p);
    else KC_LAUNCH(nb, KC_THREADS, 0, s->stream, act_strided<OP, T>)(po, pa, geo, kc_index32(n), n, p);
  }
  return KC_LAUNCHED();
}

template <typename T>
static int act_by_op(kc_state *s, int op, bool back, const kc_view *o, const kc_view *g, const kc_view *a,
                     const double *p) {
  act_par<T> q = {p ? (T)p[0] : (T)0, p ? (T)p[1] : (T)0};
  switch (op) {
    case KL_OP_LEAKY_RELU: return act_launch<KL_OP_LEAKY_RELU, T>(s, back, o, g, a, q);
    case KL_OP_ELU: return act_launch<KL_OP_ELU, T>(s, back, o, g, a, q);
    case KL_OP_GELU: return act_launch<KL_OP_GELU, T>(s, back, o, g, a, q);
    case KL_OP_SILU: return act_launch<KL_OP_SILU, T>(s, back, o, g, a, q);
    case KL_OP_SOFTPLUS:
      /* beta 0 would divide by zero; the op refuses it before */
      if (!p || p[0] == 0) return KC_ERR_ARG;
      return act_launch<KL_OP_SOFTPLUS, T>(s, back, o, g, a, q);
    default: return KC_ERR_ARG;
  }
}

static int act_entry(kc_state *s, int op, bool back, const kc_view *o, const kc_view *g, const kc_view *a,
                     const double *p) {
  if (!o || o->ndim < 0 || o->ndim > KC_MAX_DIMS || (!o->data && o->numel > 0) || !kc_same_shape(o, a, o->dtype) ||
      (back && !kc_same_shape(o, g, o->dtype)))
    return KC_ERR_ARG;
  if (o->dtype != KEEL_F32 && o->dtype != KEEL_F64) return KC_ERR_DTYPE;
  if (op != KL_OP_LEAKY_RELU && op != KL_OP_ELU && op != KL_OP_GELU && op != KL_OP_SILU && op != KL_OP_SOFTPLUS)
    return KC_ERR_ARG;
  if (o->numel == 0) return KC_OK;
  if (o->dtype == KEEL_F32) return act_by_op<float>(s, op, back, o, g, a, p);
  return act_by_op<double>(s, op, back, o, g, a, p);
}

static int act_forward(kc_state *s, int op, const kc_view *out, const kc_view *a, const double *p) {
  return act_entry(s, op, false, out, NULL, a, p);
}

static int act_backward(kc_state *s, int op, const kc_view *gin, const kc_view *gout, const kc_view *a,
                        const double *p) {
  return act_entry(s, op, true, gin, gout, a, p);
}

/* }====================================================================== */

void kc_register_act(keel_cuda_table *t) {
  t->act = act_forward;
  t->act_backward = act_backward;
}
