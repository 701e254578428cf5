/*
** copy.cu: the generic kernels every device op leans on: a strided copy
** that converts dtypes (float32, float64, int64 in any pair) and a strided
** fill. Conversions are those of the CPU backend (engine/backend_cpu.c):
** float32 <-> float64 directly, anything to or from int64 through double,
** so a CPU and a CUDA copy give the same bits. Strided operands go
** through kc_geom (dims merged where both are contiguous across them) with
** 32-bit index division when the launch allows (common.cuh).
*/
#include "common.cuh"

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

template <typename D, typename S>
__global__ void copy_kernel(D *dst, const S *src, kc_geom g, bool small, int64_t n) {
  KC_GRID_LOOP(i, n) {
    int64_t off[2];
    kc_offsets_sel<2>(g, small, i, off);
    dst[off[0]] = cvt<D, S>::go(src[off[1]]);
  }
}

/* dense operands: no index arithmetic */
template <typename D, typename S>
__global__ void copy_dense_kernel(D *dst, const S *src, int64_t n) {
  KC_GRID_LOOP(i, n) dst[i] = cvt<D, S>::go(src[i]);
}

template <typename D>
__global__ void fill_kernel(D *dst, D v, kc_geom g, bool small, int64_t n) {
  KC_GRID_LOOP(i, n) {
    int64_t off[1];
    kc_offsets_sel<1>(g, small, i, off);
    dst[off[0]] = v;
  }
}

/* }====================================================================== */

/* {======================================================================
** Launchers
** ======================================================================= */

template <typename D, typename S>
static int launch_copy(kc_state *s, const kc_view *dst, const kc_view *src, const kc_geom *g) {
  int64_t n = dst->numel;
  unsigned nb = kc_blocks(n);
  if (kc_geom_dense(g, 2))
    KC_LAUNCH(nb, KC_THREADS, 0, s->stream, copy_dense_kernel<D, S>)((D *)dst->data, (const S *)src->data, n);
  else
    KC_LAUNCH(nb, KC_THREADS, 0, s->stream, copy_kernel<D, S>)((D *)dst->data, (const S *)src->data, *g,
                                                               kc_index32(n), n);
  return KC_LAUNCHED();
}

template <typename D>
static int copy_from(kc_state *s, const kc_view *dst, const kc_view *src, const kc_geom *g) {
  switch (src->dtype) {
    case KEEL_F32: return launch_copy<D, float>(s, dst, src, g);
    case KEEL_F64: return launch_copy<D, double>(s, dst, src, g);
    case KEEL_I64: return launch_copy<D, int64_t>(s, dst, src, g);
    default: return KC_ERR_DTYPE;
  }
}

int kc_copy(kc_state *s, const kc_view *dst, const kc_view *src) {
  const kc_view *v[2] = {dst, src};
  kc_geom g;
  if (!dst || !src || dst->ndim != src->ndim || dst->ndim < 0 || dst->ndim > KC_MAX_DIMS) return KC_ERR_ARG;
  for (int d = 0; d < dst->ndim; d++)
    if (dst->shape[d] != src->shape[d]) return KC_ERR_ARG;
  if (!kc_elem_size(dst->dtype) || !kc_elem_size(src->dtype)) return KC_ERR_DTYPE;
  if (dst->numel == 0) return KC_OK;
  kc_make_geom(&g, 2, v);
  /* same dtype, both dense: the copy engine does it */
  if (dst->dtype == src->dtype && kc_geom_dense(&g, 2))
    return kc_check_cuda(cudaMemcpyAsync(dst->data, src->data, (size_t)dst->numel * kc_elem_size(dst->dtype),
                                         cudaMemcpyDeviceToDevice, s->stream));
  switch (dst->dtype) {
    case KEEL_F32: return copy_from<float>(s, dst, src, &g);
    case KEEL_F64: return copy_from<double>(s, dst, src, &g);
    case KEEL_I64: return copy_from<int64_t>(s, dst, src, &g);
    default: return KC_ERR_DTYPE;
  }
}

template <typename D>
static int launch_fill(kc_state *s, const kc_view *dst, D v, const kc_geom *g) {
  int64_t n = dst->numel;
  KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, fill_kernel<D>)((D *)dst->data, v, *g, kc_index32(n), n);
  return KC_LAUNCHED();
}

int kc_fill(kc_state *s, const kc_view *dst, double v) {
  kc_geom g;
  if (!dst || dst->ndim < 0 || dst->ndim > KC_MAX_DIMS) return KC_ERR_ARG;
  if (dst->numel == 0) return KC_OK;
  kc_make_geom(&g, 1, &dst);
  /* +0 is all zero bits in every dtype: a memset does it */
  if (v == 0 && !signbit(v) && kc_geom_dense(&g, 1) && kc_elem_size(dst->dtype))
    return kc_check_cuda(cudaMemsetAsync(dst->data, 0, (size_t)dst->numel * kc_elem_size(dst->dtype), s->stream));
  switch (dst->dtype) {
    case KEEL_F32: return launch_fill<float>(s, dst, (float)v, &g);
    case KEEL_F64: return launch_fill<double>(s, dst, v, &g);
    case KEEL_I64: return launch_fill<int64_t>(s, dst, (int64_t)v, &g);
    default: return KC_ERR_DTYPE;
  }
}

/* }====================================================================== */
