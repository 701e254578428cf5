/*
** index.cu: the indexing entries: gather, scatter_add, index_select,
** embedding and its backward (the kl_backend slots of those names;
** engine/backend_cpu.c and backend_cpu_norm.c are the reference).
**
** Indices arrive as int64 device views counted from base (the engine's
** index base, 0 or 1) and range-checked by the engine, so no kernel here
** checks a bound: each subtracts base as it reads, so the engine hands
** over the caller's own device index, with no rebased copy. gather and
** index_select copy elements (any dtype: float32, float64, int64); the
** scatters add with
** atomics, so when an index repeats, the floating-point sum may come out
** in another order than the CPU's (equal up to rounding).
**
** Both "take" entries share one kernel: out[i] = a[offset(i) + (idx[j(i)] -
** base) * a.stride[dim]], where the geometry (common.cuh kc_geom) walks out, the
** index (index_select's 1-D index is seen as a view shaped like out, stride
** 0 off dim) and a with its stride at dim set to 0. Dense rows (embedding,
** index_select of contiguous tensors) take a row kernel with vector loads.
*/
#include "common.cuh"

/* {======================================================================
** Device helpers
** ======================================================================= */

/* Kernels and device helpers have internal linkage: template kernels of
** other files with the same name must not merge with these at link time. */
namespace {

/* *p += v, atomically; int64 through the unsigned 64-bit add (two's
** complement: the same bits as a signed add). */
__device__ __forceinline__ void add_to(float *p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void add_to(double *p, double v) { atomicAdd(p, v); }
__device__ __forceinline__ void add_to(int64_t *p, int64_t v) {
  atomicAdd((unsigned long long *)p, (unsigned long long)v);
}

/* VW elements moved as one aligned load/store (16 bytes: one vector
** instruction on the device). */
template <typename T, int VW> struct alignas(sizeof(T) * VW) vec {
  T v[VW];
};

/* }====================================================================== */

/* {======================================================================
** Kernels
** ======================================================================= */

/* Operands of g: 0 out, 1 index, 2 a (stride 0 at dim); sd: a's stride at dim. */
template <typename T>
__global__ void take_kernel(T *out, const T *a, const int64_t *idx, int64_t base, kc_geom g, int64_t sd, bool small,
                            int64_t n) {
  KC_GRID_LOOP(i, n) {
    int64_t off[3];
    kc_offsets_sel<3>(g, small, i, off);
    out[off[0]] = a[off[2] + (idx[off[1]] - base) * sd];
  }
}

/*
** Dense rows: out [outer, nsel, inner] = a [outer, V, inner] rows idx[j]
** (idx stride is, values from base), inner counted in vectors of VW
** elements. I: the type
** the output index divides in (uint32_t when kc_index32 allows).
*/
template <typename T, int VW, typename I>
__global__ void rows_kernel(vec<T, VW> *out, const vec<T, VW> *a, const int64_t *idx, int64_t is, int64_t base,
                            int64_t outer, int64_t nsel, int64_t V, int64_t inner) {
  int64_t n = outer * nsel * inner;
  I in = (I)inner, ns = (I)nsel;
  KC_GRID_LOOP(i, n) {
    I t = (I)i / in, k = (I)i - t * in;
    I o = outer == 1 ? 0 : t / ns, j = t - o * ns;   /* embedding: outer 1, one division */
    out[i] = a[((int64_t)o * V + idx[j * is] - base) * inner + k];
  }
}

/* Operands of g (index's shape): 0 index, 1 src, 2 out (stride 0 at dim). */
template <typename T>
__global__ void scatter_kernel(T *out, const T *src, const int64_t *idx, int64_t base, kc_geom g, int64_t sd,
                               bool small, int64_t n) {
  KC_GRID_LOOP(i, n) {
    int64_t off[3];
    kc_offsets_sel<3>(g, small, i, off);
    add_to(out + off[2] + (idx[off[0]] - base) * sd, src[off[1]]);
  }
}

/* gw [V, D] += gout [n, D] rows at idx (from base), except row pad
** (0-based); I as rows_kernel. */
template <typename T, typename I>
__global__ void embedding_backward_kernel(T *gw, const T *gout, const int64_t *idx, int64_t base, int64_t D,
                                          int64_t pad, int64_t n) {
  I d = (I)D;
  KC_GRID_LOOP(i, n) {
    I r = (I)i / d;
    int64_t row = idx[r] - base;
    if (row != pad) add_to(gw + row * D + ((I)i - r * d), gout[i]);
  }
}

}  // namespace

/* }====================================================================== */

/* {======================================================================
** Launchers
** ======================================================================= */

/* Strided take through the geometry of (out, index view, a with stride 0 at dim). */
static int take(kc_state *s, const kc_view *out, const kc_view *a, int dim, const kc_view *iv, const int64_t *idx,
                int64_t base) {
  kc_view az = *a;
  const kc_view *ops[3] = {out, iv, &az};
  kc_geom g;
  int64_t n = out->numel, sd = a->stride[dim];
  unsigned nb = kc_blocks(n);
  bool small = kc_index32(n);
  az.stride[dim] = 0;
  kc_make_geom(&g, 3, ops);
  switch (out->dtype) {
    case KEEL_F32:
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, take_kernel<float>)((float *)out->data, (const float *)a->data, idx,
                                                                  base, g, sd, small, n);
      break;
    case KEEL_F64:
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, take_kernel<double>)((double *)out->data, (const double *)a->data,
                                                                   idx, base, g, sd, small, n);
      break;
    case KEEL_I64:
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, take_kernel<int64_t>)((int64_t *)out->data, (const int64_t *)a->data,
                                                                    idx, base, g, sd, small, n);
      break;
    default: return KC_ERR_DTYPE;
  }
  return KC_LAUNCHED();
}

template <typename T, int VW>
static int launch_rows(kc_state *s, void *out, const void *a, const int64_t *idx, int64_t is, int64_t base,
                       int64_t outer, int64_t nsel, int64_t V, int64_t inner) {
  int64_t n = outer * nsel * (inner / VW);
  if (kc_index32(n))
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, rows_kernel<T, VW, uint32_t>)(
        (vec<T, VW> *)out, (const vec<T, VW> *)a, idx, is, base, outer, nsel, V, inner / VW);
  else
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, rows_kernel<T, VW, int64_t>)(
        (vec<T, VW> *)out, (const vec<T, VW> *)a, idx, is, base, outer, nsel, V, inner / VW);
  return KC_LAUNCHED();
}

/* Dense row take (see rows_kernel), 16-byte vectors when the row length
** and both addresses allow them. */
static int rows(kc_state *s, int dtype, void *out, const void *a, const int64_t *idx, int64_t is, int64_t base,
                int64_t outer, int64_t nsel, int64_t V, int64_t inner) {
  int es = kc_elem_size(dtype);
  int vw = 16 / (es ? es : 1);
  int vec_ok = inner % vw == 0 && kc_aligned16(out) && kc_aligned16(a);
  switch (dtype) {
    case KEEL_F32:
      return vec_ok ? launch_rows<float, 4>(s, out, a, idx, is, base, outer, nsel, V, inner)
                    : launch_rows<float, 1>(s, out, a, idx, is, base, outer, nsel, V, inner);
    case KEEL_F64:
      return vec_ok ? launch_rows<double, 2>(s, out, a, idx, is, base, outer, nsel, V, inner)
                    : launch_rows<double, 1>(s, out, a, idx, is, base, outer, nsel, V, inner);
    case KEEL_I64:
      return vec_ok ? launch_rows<int64_t, 2>(s, out, a, idx, is, base, outer, nsel, V, inner)
                    : launch_rows<int64_t, 1>(s, out, a, idx, is, base, outer, nsel, V, inner);
    default: return KC_ERR_DTYPE;
  }
}

static int check_ndim(const kc_view *t) { return t && t->ndim >= 0 && t->ndim <= KC_MAX_DIMS; }

/* }====================================================================== */

/* {======================================================================
** Entries
** ======================================================================= */

static int gather(kc_state *s, const kc_view *out, const kc_view *a, int dim, const kc_view *index, int64_t base) {
  if (!check_ndim(out) || !check_ndim(a) || !check_ndim(index)) return KC_ERR_ARG;
  if (out->ndim != a->ndim || index->ndim != a->ndim || dim < 0 || dim >= a->ndim) return KC_ERR_ARG;
  if (index->dtype != KEEL_I64 || out->dtype != a->dtype) return KC_ERR_DTYPE;
  if (!kc_elem_size(out->dtype)) return KC_ERR_DTYPE;
  for (int d = 0; d < out->ndim; d++)
    if (out->shape[d] != index->shape[d]) return KC_ERR_ARG;
  if (out->numel == 0) return KC_OK;
  return take(s, out, a, dim, index, (const int64_t *)index->data, base);
}

static int index_select(kc_state *s, const kc_view *out, const kc_view *a, int dim, const kc_view *index,
                        int64_t base) {
  kc_view iv;
  int64_t nsel = index ? index->numel : 0;
  if (!check_ndim(out) || !check_ndim(a) || !check_ndim(index) || index->ndim > 1) return KC_ERR_ARG;
  if (out->ndim != a->ndim || dim < 0 || dim >= a->ndim || out->shape[dim] != nsel) return KC_ERR_ARG;
  if (index->dtype != KEEL_I64 || out->dtype != a->dtype) return KC_ERR_DTYPE;
  if (!kc_elem_size(out->dtype)) return KC_ERR_DTYPE;
  if (out->numel == 0) return KC_OK;
  /* the index seen through out's shape: it moves along dim only */
  iv = *out;
  iv.data = index->data;
  iv.dtype = KEEL_I64;
  for (int d = 0; d < out->ndim; d++) iv.stride[d] = 0;
  iv.stride[dim] = index->ndim == 1 ? index->stride[0] : 0;
  if (kc_contiguous(out) && kc_contiguous(a)) {
    int64_t outer = 1, inner = 1;
    for (int d = 0; d < dim; d++) outer *= a->shape[d];
    for (int d = dim + 1; d < a->ndim; d++) inner *= a->shape[d];
    return rows(s, out->dtype, out->data, a->data, (const int64_t *)index->data, iv.stride[dim], base, outer, nsel,
                a->shape[dim], inner);
  }
  return take(s, out, a, dim, &iv, (const int64_t *)index->data, base);
}

static int scatter_add(kc_state *s, const kc_view *out, int dim, const kc_view *index, const kc_view *src,
                       int64_t base) {
  kc_view oz;
  kc_geom g;
  int64_t n, sd;
  unsigned nb;
  bool small;
  const int64_t *ix;
  if (!check_ndim(out) || !check_ndim(index) || !check_ndim(src)) return KC_ERR_ARG;
  if (index->ndim != out->ndim || src->ndim != out->ndim || dim < 0 || dim >= out->ndim) return KC_ERR_ARG;
  if (index->dtype != KEEL_I64 || src->dtype != out->dtype) return KC_ERR_DTYPE;
  if (!kc_elem_size(out->dtype)) return KC_ERR_DTYPE;
  n = index->numel;
  if (n == 0) return KC_OK;
  oz = *out;
  sd = out->stride[dim];
  oz.stride[dim] = 0;
  {
    const kc_view *ops[3] = {index, src, &oz};
    kc_make_geom(&g, 3, ops);
  }
  nb = kc_blocks(n);
  small = kc_index32(n);
  ix = (const int64_t *)index->data;
  switch (out->dtype) {
    case KEEL_F32:
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, scatter_kernel<float>)((float *)out->data, (const float *)src->data, ix,
                                                                     base, g, sd, small, n);
      break;
    case KEEL_F64:
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, scatter_kernel<double>)((double *)out->data, (const double *)src->data,
                                                                      ix, base, g, sd, small, n);
      break;
    case KEEL_I64:
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, scatter_kernel<int64_t>)((int64_t *)out->data,
                                                                       (const int64_t *)src->data, ix, base, g, sd,
                                                                       small, n);
      break;
    default: return KC_ERR_DTYPE;
  }
  return KC_LAUNCHED();
}

/* out [n, D] = weight [V, D] rows idx [n] - base; all contiguous. */
static int embedding(kc_state *s, const kc_view *out, const kc_view *weight, const kc_view *idx, int64_t base) {
  if (!check_ndim(out) || !check_ndim(weight) || !check_ndim(idx)) return KC_ERR_ARG;
  if (out->ndim != 2 || weight->ndim != 2 || out->shape[1] != weight->shape[1] || out->shape[0] != idx->numel)
    return KC_ERR_ARG;
  if (idx->dtype != KEEL_I64 || out->dtype != weight->dtype) return KC_ERR_DTYPE;
  if (!kc_elem_size(out->dtype)) return KC_ERR_DTYPE;
  if (out->numel == 0) return KC_OK;
  if (!kc_contiguous(out) || !kc_contiguous(weight) || !kc_contiguous(idx)) return KC_ERR_ARG;
  return rows(s, out->dtype, out->data, weight->data, (const int64_t *)idx->data, 1, base, 1, idx->numel,
              weight->shape[0], weight->shape[1]);
}

template <typename T>
static int launch_emb_back(kc_state *s, const kc_view *gw, const kc_view *gout, const kc_view *idx, int64_t base,
                           int64_t D, int64_t pad, int64_t n) {
  T *w = (T *)gw->data;
  const T *g = (const T *)gout->data;
  const int64_t *ix = (const int64_t *)idx->data;
  if (kc_index32(n))
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, embedding_backward_kernel<T, uint32_t>)(w, g, ix, base, D, pad, n);
  else
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, embedding_backward_kernel<T, int64_t>)(w, g, ix, base, D, pad, n);
  return KC_LAUNCHED();
}

/* gw [V, D] += gout [n, D] rows at idx - base, skipping row pad (0-based, -1: none). */
static int embedding_backward(kc_state *s, const kc_view *gw, const kc_view *gout, const kc_view *idx, int64_t base,
                              int64_t pad) {
  int64_t n, D;
  if (!check_ndim(gw) || !check_ndim(gout) || !check_ndim(idx)) return KC_ERR_ARG;
  if (gw->ndim != 2 || gout->ndim != 2 || gout->shape[1] != gw->shape[1] || gout->shape[0] != idx->numel)
    return KC_ERR_ARG;
  if (idx->dtype != KEEL_I64 || gout->dtype != gw->dtype) return KC_ERR_DTYPE;
  D = gw->shape[1];
  n = gout->numel;
  if (n == 0) return KC_OK;
  if (!kc_contiguous(gw) || !kc_contiguous(gout) || !kc_contiguous(idx)) return KC_ERR_ARG;
  switch (gw->dtype) {
    case KEEL_F32: return launch_emb_back<float>(s, gw, gout, idx, base, D, pad, n);
    case KEEL_F64: return launch_emb_back<double>(s, gw, gout, idx, base, D, pad, n);
    default: return KC_ERR_DTYPE;   /* the CPU slot takes float32 and float64 */
  }
}

/* }====================================================================== */

void kc_register_index(keel_cuda_table *t) {
  t->gather = gather;
  t->scatter_add = scatter_add;
  t->index_select = index_select;
  t->embedding = embedding;
  t->embedding_backward = embedding_backward;
}
