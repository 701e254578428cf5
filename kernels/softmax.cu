/*
** softmax.cu: softmax and log_softmax over one dimension of a contiguous
** tensor, and their backward from the saved output y (the kl_backend
** slots softmax and softmax_backward; engine/backend_cpu_act.c is the
** specification).
**
** The tensor is seen as [outer, n, inner] around dim. Three shapes of
** kernel:
** - inner == 1, n <= 1024: a group of L lanes (a power of two up to a
**   warp) per row, the row held in registers (K values a lane), so it is
**   read once; short rows share a warp.
** - inner == 1, n > 1024: one block per row, reading it twice (a running
**   max and sum, then the output).
** - inner > 1: one thread per (outer, inner) column walking the dim; the
**   threads of a warp take neighbouring columns, so loads coalesce.
**
** float32 is computed in float (expf), float64 in double. Special values
** follow the CPU's single-pass running sum (online_add there):
** - log_softmax: NaN anywhere makes the row NaN; a single +inf gives -inf
**   elsewhere and NaN at itself, two or more make the row NaN; a row of
**   -inf is NaN.
** - softmax: NaN, +inf or a row of -inf make the row NaN.
** Each kernel keeps the row's max m (NaN ignored) and s = sum of exp(x - m)
** in which -inf adds 0 and an x equal to m adds exactly 1 (so a +inf max
** counts its copies); finish() then applies the rules above, and the
** output is (x - m) - log(s), which stays exact for logits of any size.
*/
#include <math.h>
#include "common.cuh"

#define SM_WARP_MAX 1024        /* longest row of the register kernels */
#define SM_ROW_THREADS 128      /* block size of the register kernels */
#define SM_BLOCK_THREADS 512    /* block per row */

/* One term of s for x under max m (see the header). */
template <typename T>
__device__ __forceinline__ T sm_term(T x, T m) {
  return x == (T)-INFINITY ? (T)0 : x == m ? (T)1 : kc_exp(x - m);
}

/* s once the row is summed: the CPU's rules for a +inf max. */
template <typename T>
__device__ __forceinline__ T sm_finish(int log_out, T m, T s) {
  if (m == (T)INFINITY && !(log_out && s == (T)1)) return (T)NAN;
  return s;
}

/* Running max and sum after one more x, as online_add of the CPU. */
template <typename T>
__device__ __forceinline__ void sm_online(T x, T &m, T &s) {
  if (x > m) {
    s = s * kc_exp(m - x) + (T)1;
    m = x;
  } else if (x != (T)-INFINITY) {
    s += x == m ? (T)1 : kc_exp(x - m);
  }
}

/* The scale of a partial sum kept under max m when the max is M. */
template <typename T>
__device__ __forceinline__ T sm_rescale(T s, T m, T M) {
  return m == M ? s : s * kc_exp(m - M);
}

/* {======================================================================
** Forward
** ======================================================================= */

/* Rows of n <= K*L elements, L lanes a row; lane l holds l, l+L, ... */
template <typename T, int K, int L>
__global__ void sm_rows_reg(T *out, const T *a, int64_t rows, int n, int log_out) {
  const int rpb = blockDim.x / L;
  const int sub = threadIdx.x / L, lane = threadIdx.x % L;
  /* base is uniform over the block: every lane runs every iteration */
  for (int64_t base = (int64_t)blockIdx.x * rpb; base < rows; base += (int64_t)gridDim.x * rpb) {
    int64_t row = base + sub;
    int nr = row < rows ? n : 0;
    const T *x = a + row * n;
    T v[K], m = (T)-INFINITY, s = 0;
#pragma unroll
    for (int k = 0; k < K; k++) {
      int c = lane + k * L;
      v[k] = c < nr ? x[c] : (T)-INFINITY;
      if (v[k] > m) m = v[k];
    }
    m = kc_warp_max<L>(m);
#pragma unroll
    for (int k = 0; k < K; k++) {
      if (log_out) s += sm_term(v[k], m);
      else if (lane + k * L < nr) {
        v[k] = kc_exp(v[k] - m);
        s += v[k];
      }
    }
    s = sm_finish(log_out, m, kc_warp_sum<L>(s));
    T *o = out + row * n;
    if (log_out) {
      T ls = kc_log(s);
#pragma unroll
      for (int k = 0; k < K; k++) {
        int c = lane + k * L;
        if (c < nr) o[c] = (v[k] - m) - ls;
      }
    } else {
      T inv = (T)1 / s;
#pragma unroll
      for (int k = 0; k < K; k++) {
        int c = lane + k * L;
        if (c < nr) o[c] = v[k] * inv;
      }
    }
  }
}

/* One block per row (long rows). */
template <typename T>
__global__ void sm_rows_block(T *out, const T *a, int64_t rows, int64_t n, int log_out) {
  KC_SHARED(T, buf, [32]);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T *x = a + row * n;
    T *o = out + row * n;
    T m = (T)-INFINITY, s = 0, M, inv, ls;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) sm_online(x[c], m, s);
    M = kc_block_max(m, buf, (T)-INFINITY);
    s = sm_finish(log_out, M, kc_block_sum(sm_rescale(s, m, M), buf));
    if (log_out) {
      ls = kc_log(s);
      for (int64_t c = threadIdx.x; c < n; c += blockDim.x) o[c] = (x[c] - M) - ls;
    } else {
      inv = (T)1 / s;
      for (int64_t c = threadIdx.x; c < n; c += blockDim.x) o[c] = kc_exp(x[c] - M) * inv;
    }
  }
}

/* One thread per column of [outer, n, inner]. */
template <typename T>
__global__ void sm_cols(T *out, const T *a, int64_t outer, int64_t n, int64_t inner, int log_out) {
  KC_GRID_LOOP(col, outer * inner) {
    int64_t b = col / inner, j = col - b * inner;
    const T *x = a + b * n * inner + j;
    T *o = out + b * n * inner + j;
    T m = (T)-INFINITY, s = 0;
    for (int64_t i = 0; i < n; i++) sm_online(x[i * inner], m, s);
    s = sm_finish(log_out, m, s);
    if (log_out) {
      T ls = kc_log(s);
      for (int64_t i = 0; i < n; i++) o[i * inner] = (x[i * inner] - m) - ls;
    } else {
      T inv = (T)1 / s;
      for (int64_t i = 0; i < n; i++) o[i * inner] = kc_exp(x[i * inner] - m) * inv;
    }
  }
}

/* }====================================================================== */

/* {======================================================================
** Backward: softmax gin = y (g - sum(g y)); log_softmax gin = g - exp(y) sum(g)
** ======================================================================= */

template <typename T, int K, int L>
__global__ void smb_rows_reg(T *gin, const T *gout, const T *y, int64_t rows, int n, int log_out) {
  const int rpb = blockDim.x / L;
  const int sub = threadIdx.x / L, lane = threadIdx.x % L;
  for (int64_t base = (int64_t)blockIdx.x * rpb; base < rows; base += (int64_t)gridDim.x * rpb) {
    int64_t row = base + sub;
    int nr = row < rows ? n : 0;
    const T *gr = gout + row * n, *yr = y + row * n;
    T gv[K], yv[K], dot = 0;
#pragma unroll
    for (int k = 0; k < K; k++) {
      int c = lane + k * L;
      gv[k] = c < nr ? gr[c] : (T)0;
      yv[k] = c < nr ? yr[c] : (T)0;
      dot += log_out ? gv[k] : gv[k] * yv[k];
    }
    dot = kc_warp_sum<L>(dot);
    T *o = gin + row * n;
#pragma unroll
    for (int k = 0; k < K; k++) {
      int c = lane + k * L;
      if (c < nr) o[c] = log_out ? gv[k] - kc_exp(yv[k]) * dot : yv[k] * (gv[k] - dot);
    }
  }
}

template <typename T>
__global__ void smb_rows_block(T *gin, const T *gout, const T *y, int64_t rows, int64_t n, int log_out) {
  KC_SHARED(T, buf, [32]);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T *gr = gout + row * n, *yr = y + row * n;
    T *o = gin + row * n;
    T dot = 0;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) dot += log_out ? gr[c] : gr[c] * yr[c];
    dot = kc_block_sum(dot, buf);
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
      o[c] = log_out ? gr[c] - kc_exp(yr[c]) * dot : yr[c] * (gr[c] - dot);
  }
}

template <typename T>
__global__ void smb_cols(T *gin, const T *gout, const T *y, int64_t outer, int64_t n, int64_t inner,
                         int log_out) {
  KC_GRID_LOOP(col, outer * inner) {
    int64_t b = col / inner, j = col - b * inner, at = b * n * inner + j;
    T dot = 0;
    for (int64_t i = 0; i < n; i++) {
      int64_t k = at + i * inner;
      dot += log_out ? gout[k] : gout[k] * y[k];
    }
    for (int64_t i = 0; i < n; i++) {
      int64_t k = at + i * inner;
      gin[k] = log_out ? gout[k] - kc_exp(y[k]) * dot : y[k] * (gout[k] - dot);
    }
  }
}

/* }====================================================================== */

/* {======================================================================
** Launchers
** ======================================================================= */

static unsigned sm_grid(int64_t units, int64_t per_block) {
  return kc_grid_x((units + per_block - 1) / per_block);
}

/* [outer, n, inner] around dim (a 0-d tensor is [1, 1, 1]). */
static int sm_split(const kc_view *a, int dim, int64_t *outer, int64_t *n, int64_t *inner) {
  *outer = *inner = 1;
  *n = 1;
  if (a->ndim == 0) return dim == 0 || dim == -1 ? KC_OK : KC_ERR_ARG;
  if (dim < 0 || dim >= a->ndim) return KC_ERR_ARG;
  *n = a->shape[dim];
  for (int i = 0; i < dim; i++) *outer *= a->shape[i];
  for (int i = dim + 1; i < a->ndim; i++) *inner *= a->shape[i];
  return KC_OK;
}

static int sm_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

/* The register kernel for rows of n <= SM_WARP_MAX. */
template <typename T, int K, int L>
static void sm_fwd_reg(kc_state *s, int log_out, T *o, const T *a, int64_t rows, int n) {
  KC_LAUNCH(sm_grid(rows, SM_ROW_THREADS / L), SM_ROW_THREADS, 0, s->stream, sm_rows_reg<T, K, L>)
  (o, a, rows, n, log_out);
}
template <typename T, int K, int L>
static void sm_bwd_reg(kc_state *s, int log_out, T *gin, const T *g, const T *y, int64_t rows, int n) {
  KC_LAUNCH(sm_grid(rows, SM_ROW_THREADS / L), SM_ROW_THREADS, 0, s->stream, smb_rows_reg<T, K, L>)
  (gin, g, y, rows, n, log_out);
}

template <typename T>
static int sm_forward(kc_state *s, int log_out, T *o, const T *a, int64_t outer, int64_t n, int64_t inner) {
  if (inner > 1) {
    KC_LAUNCH(kc_blocks(outer * inner), KC_THREADS, 0, s->stream, sm_cols<T>)(o, a, outer, n, inner, log_out);
  } else if (n > SM_WARP_MAX) {
    KC_LAUNCH(sm_grid(outer, 1), SM_BLOCK_THREADS, 0, s->stream, sm_rows_block<T>)(o, a, outer, n, log_out);
  } else {
    int m = (int)n;
    switch (sm_pow2(n)) {
      case 1: sm_fwd_reg<T, 1, 1>(s, log_out, o, a, outer, m); break;
      case 2: sm_fwd_reg<T, 1, 2>(s, log_out, o, a, outer, m); break;
      case 4: sm_fwd_reg<T, 1, 4>(s, log_out, o, a, outer, m); break;
      case 8: sm_fwd_reg<T, 1, 8>(s, log_out, o, a, outer, m); break;
      case 16: sm_fwd_reg<T, 1, 16>(s, log_out, o, a, outer, m); break;
      case 32: sm_fwd_reg<T, 1, 32>(s, log_out, o, a, outer, m); break;
      case 64: sm_fwd_reg<T, 2, 32>(s, log_out, o, a, outer, m); break;
      case 128: sm_fwd_reg<T, 4, 32>(s, log_out, o, a, outer, m); break;
      case 256: sm_fwd_reg<T, 8, 32>(s, log_out, o, a, outer, m); break;
      case 512: sm_fwd_reg<T, 16, 32>(s, log_out, o, a, outer, m); break;
      default: sm_fwd_reg<T, 32, 32>(s, log_out, o, a, outer, m); break;
    }
  }
  return KC_LAUNCHED();
}

template <typename T>
static int sm_backward(kc_state *s, int log_out, T *gin, const T *g, const T *y, int64_t outer, int64_t n,
                       int64_t inner) {
  if (inner > 1) {
    KC_LAUNCH(kc_blocks(outer * inner), KC_THREADS, 0, s->stream, smb_cols<T>)(gin, g, y, outer, n, inner, log_out);
  } else if (n > SM_WARP_MAX) {
    KC_LAUNCH(sm_grid(outer, 1), SM_BLOCK_THREADS, 0, s->stream, smb_rows_block<T>)(gin, g, y, outer, n, log_out);
  } else {
    int m = (int)n;
    switch (sm_pow2(n)) {
      case 1: sm_bwd_reg<T, 1, 1>(s, log_out, gin, g, y, outer, m); break;
      case 2: sm_bwd_reg<T, 1, 2>(s, log_out, gin, g, y, outer, m); break;
      case 4: sm_bwd_reg<T, 1, 4>(s, log_out, gin, g, y, outer, m); break;
      case 8: sm_bwd_reg<T, 1, 8>(s, log_out, gin, g, y, outer, m); break;
      case 16: sm_bwd_reg<T, 1, 16>(s, log_out, gin, g, y, outer, m); break;
      case 32: sm_bwd_reg<T, 1, 32>(s, log_out, gin, g, y, outer, m); break;
      case 64: sm_bwd_reg<T, 2, 32>(s, log_out, gin, g, y, outer, m); break;
      case 128: sm_bwd_reg<T, 4, 32>(s, log_out, gin, g, y, outer, m); break;
      case 256: sm_bwd_reg<T, 8, 32>(s, log_out, gin, g, y, outer, m); break;
      case 512: sm_bwd_reg<T, 16, 32>(s, log_out, gin, g, y, outer, m); break;
      default: sm_bwd_reg<T, 32, 32>(s, log_out, gin, g, y, outer, m); break;
    }
  }
  return KC_LAUNCHED();
}

static int kc_softmax(kc_state *s, int log_out, const kc_view *out, const kc_view *a, int dim) {
  int64_t outer, n, inner;
  int e;
  if (!out || !a || out->numel != a->numel) return KC_ERR_ARG;
  if ((e = sm_split(a, dim, &outer, &n, &inner))) return e;
  if (out->dtype != a->dtype) return KC_ERR_DTYPE;
  if (a->numel == 0) return KC_OK;
  switch (a->dtype) {
    case KEEL_F32: return sm_forward(s, log_out, (float *)out->data, (const float *)a->data, outer, n, inner);
    case KEEL_F64: return sm_forward(s, log_out, (double *)out->data, (const double *)a->data, outer, n, inner);
    default: return KC_ERR_DTYPE;
  }
}

static int kc_softmax_backward(kc_state *s, int log_out, const kc_view *gin, const kc_view *gout,
                               const kc_view *y, int dim) {
  int64_t outer, n, inner;
  int e;
  if (!gin || !gout || !y || gin->numel != y->numel || gout->numel != y->numel) return KC_ERR_ARG;
  if ((e = sm_split(y, dim, &outer, &n, &inner))) return e;
  if (gin->dtype != y->dtype || gout->dtype != y->dtype) return KC_ERR_DTYPE;
  if (y->numel == 0) return KC_OK;
  switch (y->dtype) {
    case KEEL_F32:
      return sm_backward(s, log_out, (float *)gin->data, (const float *)gout->data, (const float *)y->data, outer,
                         n, inner);
    case KEEL_F64:
      return sm_backward(s, log_out, (double *)gin->data, (const double *)gout->data, (const double *)y->data,
                         outer, n, inner);
    default: return KC_ERR_DTYPE;
  }
}

/* }====================================================================== */

void kc_register_softmax(keel_cuda_table *t) {
  t->softmax = kc_softmax;
  t->softmax_backward = kc_softmax_backward;
}
