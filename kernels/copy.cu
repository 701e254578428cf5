/*
** copy.cu: the generic kernels every device op leans on: a strided copy
** that converts dtypes (float32, float64, int64 in any pair) and a strided
** fill. Conversions are those of the CPU backend (engine/backend_cpu.c):
** float32 <-> float64 directly, anything to or from int64 through double,
** so a CPU and a CUDA copy give the same bits.
*/
#include "common.cuh"

/* {======================================================================
** Geometry: dimensions merged where both operands are contiguous across
** them, size-1 dimensions dropped; a dense copy ends up one-dimensional.
** ======================================================================= */

typedef struct geom {
  int ndim;
  int64_t shape[KC_MAX_DIMS];
  int64_t ds[KC_MAX_DIMS];      /* destination strides */
  int64_t ss[KC_MAX_DIMS];      /* source strides (unused by fill) */
} geom;

static void make_geom(geom *g, const kc_view *dst, const kc_view *src) {
  int n = 0;
  for (int d = 0; d < dst->ndim; d++) {
    int64_t sz = dst->shape[d], a = dst->stride[d], b = src ? src->stride[d] : 0;
    if (sz == 1) continue;
    /* merge with the previous (outer) dim when it steps over this one exactly */
    if (n > 0 && g->ds[n - 1] == a * sz && g->ss[n - 1] == b * sz) {
      g->shape[n - 1] *= sz;
      g->ds[n - 1] = a;
      g->ss[n - 1] = b;
      continue;
    }
    g->shape[n] = sz;
    g->ds[n] = a;
    g->ss[n] = b;
    n++;
  }
  g->ndim = n;
}

/* }====================================================================== */

/* {======================================================================
** Kernels
** ======================================================================= */

template <typename D, typename S> struct cvt {
  __device__ static D go(S x) { return (D)x; }
};
/* int64 on either side goes through double, as kl_load/kl_store do */
template <> struct cvt<float, int64_t> {
  __device__ static float go(int64_t x) { return (float)(double)x; }
};
template <> struct cvt<int64_t, float> {
  __device__ static int64_t go(float x) { return (int64_t)(double)x; }
};

__device__ static inline void offsets(const geom &g, int64_t i, int64_t *od, int64_t *os) {
  int64_t a = 0, b = 0;
  for (int d = g.ndim - 1; d >= 0; d--) {
    int64_t k = i % g.shape[d];
    i /= g.shape[d];
    a += k * g.ds[d];
    b += k * g.ss[d];
  }
  *od = a;
  *os = b;
}

template <typename D, typename S>
__global__ void copy_kernel(D *dst, const S *src, geom g, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t od, os;
    offsets(g, i, &od, &os);
    dst[od] = cvt<D, S>::go(src[os]);
  }
}

/* dense operands: no index arithmetic */
template <typename D, typename S>
__global__ void copy_dense_kernel(D *dst, const S *src, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = cvt<D, S>::go(src[i]);
}

template <typename D>
__global__ void fill_kernel(D *dst, D v, geom g, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t od, os;
    offsets(g, i, &od, &os);
    dst[od] = v;
  }
}

/* }====================================================================== */

/* {======================================================================
** Launchers
** ======================================================================= */

template <typename D, typename S>
static int launch_copy(kc_state *s, const kc_view *dst, const kc_view *src, const geom *g) {
  int64_t n = dst->numel;
  unsigned nb = kc_blocks(n);
  if (g->ndim <= 1 && (g->ndim == 0 || (g->ds[0] == 1 && g->ss[0] == 1)))
    KC_LAUNCH(nb, KC_THREADS, 0, s->stream, copy_dense_kernel<D, S>)((D *)dst->data, (const S *)src->data, n);
  else
    KC_LAUNCH(nb, KC_THREADS, 0, s->stream, copy_kernel<D, S>)((D *)dst->data, (const S *)src->data, *g, n);
  return kc_check_cuda(cudaGetLastError());
}

template <typename D>
static int copy_from(kc_state *s, const kc_view *dst, const kc_view *src, const geom *g) {
  switch (src->dtype) {
    case KEEL_F32: return launch_copy<D, float>(s, dst, src, g);
    case KEEL_F64: return launch_copy<D, double>(s, dst, src, g);
    case KEEL_I64: return launch_copy<D, int64_t>(s, dst, src, g);
    default: return KC_ERR_DTYPE;
  }
}

static int elem_size(int dt) {
  return dt == KEEL_F32 ? 4 : dt == KEEL_F64 || dt == KEEL_I64 ? 8 : 0;
}

int kc_copy(kc_state *s, const kc_view *dst, const kc_view *src) {
  geom g;
  if (!dst || !src || dst->ndim != src->ndim || dst->ndim < 0 || dst->ndim > KC_MAX_DIMS) return KC_ERR_ARG;
  for (int d = 0; d < dst->ndim; d++)
    if (dst->shape[d] != src->shape[d]) return KC_ERR_ARG;
  if (!elem_size(dst->dtype) || !elem_size(src->dtype)) return KC_ERR_DTYPE;
  if (dst->numel == 0) return KC_OK;
  make_geom(&g, dst, src);
  /* same dtype, both dense: the copy engine does it */
  if (dst->dtype == src->dtype && (g.ndim == 0 || (g.ndim == 1 && g.ds[0] == 1 && g.ss[0] == 1)))
    return kc_check_cuda(cudaMemcpyAsync(dst->data, src->data, (size_t)dst->numel * elem_size(dst->dtype),
                                         cudaMemcpyDeviceToDevice, s->stream));
  switch (dst->dtype) {
    case KEEL_F32: return copy_from<float>(s, dst, src, &g);
    case KEEL_F64: return copy_from<double>(s, dst, src, &g);
    case KEEL_I64: return copy_from<int64_t>(s, dst, src, &g);
    default: return KC_ERR_DTYPE;
  }
}

template <typename D>
static int launch_fill(kc_state *s, const kc_view *dst, D v, const geom *g) {
  KC_LAUNCH(kc_blocks(dst->numel), KC_THREADS, 0, s->stream, fill_kernel<D>)((D *)dst->data, v, *g, dst->numel);
  return kc_check_cuda(cudaGetLastError());
}

int kc_fill(kc_state *s, const kc_view *dst, double v) {
  geom g;
  if (!dst || dst->ndim < 0 || dst->ndim > KC_MAX_DIMS) return KC_ERR_ARG;
  if (dst->numel == 0) return KC_OK;
  make_geom(&g, dst, NULL);
  /* +0 is all zero bits in every dtype: a memset does it */
  if (v == 0 && !signbit(v) && (g.ndim == 0 || (g.ndim == 1 && g.ds[0] == 1)) && elem_size(dst->dtype))
    return kc_check_cuda(cudaMemsetAsync(dst->data, 0, (size_t)dst->numel * elem_size(dst->dtype), s->stream));
  switch (dst->dtype) {
    case KEEL_F32: return launch_fill<float>(s, dst, (float)v, &g);
    case KEEL_F64: return launch_fill<double>(s, dst, v, &g);
    case KEEL_I64: return launch_fill<int64_t>(s, dst, (int64_t)v, &g);
    default: return KC_ERR_DTYPE;
  }
}

/* }====================================================================== */
