/*
** elementwise.cu: the pointwise entries binary, unary, clamp and where
** (the kl_backend slots of the same names, engine/keel_impl.h). The CPU
** backend (engine/backend_cpu.c) is the specification: float32 computes
** in float and float64 in double, with the same expressions, so NaN and
** infinities come out as they do there (maximum/minimum propagate NaN,
** sign(NaN) is 0, clamp keeps NaN, comparisons write 1/0 in the operands'
** dtype); int64 has no div or pow and only neg/abs/relu/sign as unary ops.
**
** Each entry picks one of three shapes of loop:
** - dense: every operand contiguous over the same elements (after merging
**   dims), or a broadcast operand that is one element (all strides 0): no
**   index arithmetic, and 16-byte vector loads/stores when the pointers
**   allow (float4, double2, longlong2 worth of elements per thread);
** - general: kc_geom merges what it can and kc_offsets_sel finds each
**   operand's element (broadcast by stride 0, any views, strided output),
**   dividing in 32 bits when the launch allows (common.cuh).
** The op is a template parameter, so each loop is specialised per op.
*/
#include "common.cuh"

/* {======================================================================
** Binary
** ======================================================================= */

/* x op y for the float dtypes, as BINARY_FLOAT_OPS of backend_cpu.c */
template <int OP, typename T>
__device__ __forceinline__ T bin_f(T x, T y) {
  switch (OP) {
    case KEEL_BIN_ADD: return x + y;
    case KEEL_BIN_SUB: return x - y;
    case KEEL_BIN_MUL: return x * y;
    case KEEL_BIN_DIV: return x / y;
    case KEEL_BIN_POW: return kc_pow(x, y);
    case KEEL_BIN_MAXIMUM: return (x > y || x != x) ? x : y;
    case KEEL_BIN_MINIMUM: return (x < y || x != x) ? x : y;
    case KEEL_BIN_EQ: return (T)(x == y);
    case KEEL_BIN_NE: return (T)(x != y);
    case KEEL_BIN_LT: return (T)(x < y);
    case KEEL_BIN_LE: return (T)(x <= y);
    case KEEL_BIN_GT: return (T)(x > y);
    default: return (T)(x >= y);
  }
}

/* int64: wrapping add/sub/mul (done unsigned: signed overflow is undefined) */
template <int OP>
__device__ __forceinline__ int64_t bin_i(int64_t x, int64_t y) {
  switch (OP) {
    case KEEL_BIN_ADD: return (int64_t)((uint64_t)x + (uint64_t)y);
    case KEEL_BIN_SUB: return (int64_t)((uint64_t)x - (uint64_t)y);
    case KEEL_BIN_MUL: return (int64_t)((uint64_t)x * (uint64_t)y);
    case KEEL_BIN_MAXIMUM: return x > y ? x : y;
    case KEEL_BIN_MINIMUM: return x < y ? x : y;
    case KEEL_BIN_EQ: return x == y;
    case KEEL_BIN_NE: return x != y;
    case KEEL_BIN_LT: return x < y;
    case KEEL_BIN_LE: return x <= y;
    case KEEL_BIN_GT: return x > y;
    default: return x >= y;
  }
}

template <int OP, typename T> struct bin_op {
  __device__ static T go(T x, T y) { return bin_f<OP, T>(x, y); }
};
template <int OP> struct bin_op<OP, int64_t> {
  __device__ static int64_t go(int64_t x, int64_t y) { return bin_i<OP>(x, y); }
};

/*
** Dense operands; SA/SB: a/b is one element broadcast (read once). nv
** vectors of V elements first (vec: all pointers 16-byte aligned), then
** elements nv*V .. n-1 one per thread.
*/
template <int OP, typename T, bool SA, bool SB>
__global__ void binary_dense(T *o, const T *a, const T *b, int64_t nv, int64_t n) {
  constexpr int V = 16 / sizeof(T);
  const T x0 = SA ? a[0] : T(0), y0 = SB ? b[0] : T(0);
  KC_GRID_LOOP(i, nv) {
    kc_vec16<T> va, vb, vo;
    if (!SA) va = ((const kc_vec16<T> *)a)[i];
    if (!SB) vb = ((const kc_vec16<T> *)b)[i];
    for (int k = 0; k < V; k++) vo.v[k] = bin_op<OP, T>::go(SA ? x0 : va.v[k], SB ? y0 : vb.v[k]);
    ((kc_vec16<T> *)o)[i] = vo;
  }
  for (int64_t i = nv * V + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    o[i] = bin_op<OP, T>::go(SA ? x0 : a[i], SB ? y0 : b[i]);
}

template <int OP, typename T>
__global__ void binary_strided(T *o, const T *a, const T *b, kc_geom g, bool small, int64_t n) {
  KC_GRID_LOOP(i, n) {
    int64_t off[3];
    kc_offsets_sel<3>(g, small, i, off);
    o[off[0]] = bin_op<OP, T>::go(a[off[1]], b[off[2]]);
  }
}

/* Which loop a geometry of n operands (operand 0 the output) allows:
** 0 general, else dense with the operands of zero stride as mask bits
** (bit k: operand k is one broadcast element). */
static int dense_kind(const kc_geom *g, int nops) {
  int mask = 1 << 30;              /* "dense" with no broadcast operand */
  if (g->ndim == 0) return mask;   /* one element */
  if (g->ndim != 1 || g->st[0][0] != 1) return 0;
  for (int k = 1; k < nops; k++) {
    if (g->st[k][0] == 0) mask |= 1 << k;
    else if (g->st[k][0] != 1) return 0;
  }
  return mask;
}

template <int OP, typename T>
static int binary_launch(kc_state *s, const kc_view *out, const kc_view *a, const kc_view *b) {
  const kc_view *v[3] = {out, a, b};
  kc_geom g;
  int64_t n = out->numel;
  T *po = (T *)out->data;
  const T *pa = (const T *)a->data, *pb = (const T *)b->data;
  kc_make_geom(&g, 3, v);
  int kind = dense_kind(&g, 3);
  bool sa = (kind & 2) != 0, sb = (kind & 4) != 0;
  if (kind && !(sa && sb)) {
    int64_t nv = kc_vec_count<T>(n, po, sa ? NULL : pa, sb ? NULL : pb);
    unsigned nb = kc_blocks_sm(s, nv ? nv : n);
    if (sa)
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, binary_dense<OP, T, true, false>)(po, pa, pb, nv, n);
    else if (sb)
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, binary_dense<OP, T, false, true>)(po, pa, pb, nv, n);
    else
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, binary_dense<OP, T, false, false>)(po, pa, pb, nv, n);
  } else {
    /* both inputs one element (the output may be long): the general loop */
    bool small = kc_index32(n);
    KC_LAUNCH(kc_blocks_sm(s, n), KC_THREADS, 0, s->stream, binary_strided<OP, T>)(po, pa, pb, g, small, n);
  }
  return KC_LAUNCHED();
}

template <typename T>
static int binary_float(kc_state *s, int op, const kc_view *o, const kc_view *a, const kc_view *b) {
  switch (op) {
    case KEEL_BIN_ADD: return binary_launch<KEEL_BIN_ADD, T>(s, o, a, b);
    case KEEL_BIN_SUB: return binary_launch<KEEL_BIN_SUB, T>(s, o, a, b);
    case KEEL_BIN_MUL: return binary_launch<KEEL_BIN_MUL, T>(s, o, a, b);
    case KEEL_BIN_DIV: return binary_launch<KEEL_BIN_DIV, T>(s, o, a, b);
    case KEEL_BIN_POW: return binary_launch<KEEL_BIN_POW, T>(s, o, a, b);
    case KEEL_BIN_MAXIMUM: return binary_launch<KEEL_BIN_MAXIMUM, T>(s, o, a, b);
    case KEEL_BIN_MINIMUM: return binary_launch<KEEL_BIN_MINIMUM, T>(s, o, a, b);
    case KEEL_BIN_EQ: return binary_launch<KEEL_BIN_EQ, T>(s, o, a, b);
    case KEEL_BIN_NE: return binary_launch<KEEL_BIN_NE, T>(s, o, a, b);
    case KEEL_BIN_LT: return binary_launch<KEEL_BIN_LT, T>(s, o, a, b);
    case KEEL_BIN_LE: return binary_launch<KEEL_BIN_LE, T>(s, o, a, b);
    case KEEL_BIN_GT: return binary_launch<KEEL_BIN_GT, T>(s, o, a, b);
    case KEEL_BIN_GE: return binary_launch<KEEL_BIN_GE, T>(s, o, a, b);
    default: return KC_ERR_ARG;
  }
}

static int binary_int(kc_state *s, int op, const kc_view *o, const kc_view *a, const kc_view *b) {
  switch (op) {
    case KEEL_BIN_ADD: return binary_launch<KEEL_BIN_ADD, int64_t>(s, o, a, b);
    case KEEL_BIN_SUB: return binary_launch<KEEL_BIN_SUB, int64_t>(s, o, a, b);
    case KEEL_BIN_MUL: return binary_launch<KEEL_BIN_MUL, int64_t>(s, o, a, b);
    case KEEL_BIN_DIV: case KEEL_BIN_POW: return KC_ERR_DTYPE;   /* the CPU refuses them too */
    case KEEL_BIN_MAXIMUM: return binary_launch<KEEL_BIN_MAXIMUM, int64_t>(s, o, a, b);
    case KEEL_BIN_MINIMUM: return binary_launch<KEEL_BIN_MINIMUM, int64_t>(s, o, a, b);
    case KEEL_BIN_EQ: return binary_launch<KEEL_BIN_EQ, int64_t>(s, o, a, b);
    case KEEL_BIN_NE: return binary_launch<KEEL_BIN_NE, int64_t>(s, o, a, b);
    case KEEL_BIN_LT: return binary_launch<KEEL_BIN_LT, int64_t>(s, o, a, b);
    case KEEL_BIN_LE: return binary_launch<KEEL_BIN_LE, int64_t>(s, o, a, b);
    case KEEL_BIN_GT: return binary_launch<KEEL_BIN_GT, int64_t>(s, o, a, b);
    case KEEL_BIN_GE: return binary_launch<KEEL_BIN_GE, int64_t>(s, o, a, b);
    default: return KC_ERR_ARG;
  }
}

static int check_out(const kc_view *out) {
  return out && out->ndim >= 0 && out->ndim <= KC_MAX_DIMS && (out->data || out->numel == 0);
}

static int ew_binary(kc_state *s, int op, const kc_view *out, const kc_view *a, const kc_view *b) {
  if (!check_out(out) || !kc_same_shape(out, a, out->dtype) || !kc_same_shape(out, b, out->dtype)) return KC_ERR_ARG;
  if (op < 0 || op >= KEEL_BINOP_COUNT) return KC_ERR_ARG;
  switch (out->dtype) {
    case KEEL_F32: return out->numel == 0 ? KC_OK : binary_float<float>(s, op, out, a, b);
    case KEEL_F64: return out->numel == 0 ? KC_OK : binary_float<double>(s, op, out, a, b);
    case KEEL_I64:
      if (op == KEEL_BIN_DIV || op == KEEL_BIN_POW) return KC_ERR_DTYPE;
      if (out->numel == 0) return KC_OK;
      return binary_int(s, op, out, a, b);
    default: return KC_ERR_DTYPE;
  }
}

/* }====================================================================== */

/* {======================================================================
** Unary and clamp: one functor per op, shared loops
** ======================================================================= */

/* f(x) as UNARY_FLOAT_OPS / UNARY_INT_OPS of backend_cpu.c */
template <int OP, typename T>
struct un_op {
  __device__ static T go(T x) {
    switch (OP) {
      case KEEL_UN_NEG: return -x;
      case KEEL_UN_EXP: return kc_exp(x);
      case KEEL_UN_LOG: return kc_log(x);
      case KEEL_UN_SQRT: return kc_sqrt(x);
      case KEEL_UN_ABS: return kc_fabs(x);
      case KEEL_UN_RELU: return x < 0 ? (T)0 : x;     /* NaN stays NaN */
      case KEEL_UN_SIGMOID: return (T)1 / ((T)1 + kc_exp(-x));
      case KEEL_UN_TANH: return kc_tanh(x);
      default: return (T)((x > 0) - (x < 0));        /* sign; NaN gives 0 */
    }
  }
};
template <int OP>
struct un_op<OP, int64_t> {
  __device__ static int64_t go(int64_t x) {
    switch (OP) {
      case KEEL_UN_NEG: return (int64_t)(0 - (uint64_t)x);
      case KEEL_UN_ABS: return x < 0 ? (int64_t)(0 - (uint64_t)x) : x;
      case KEEL_UN_RELU: return x <= 0 ? 0 : x;
      default: return (x > 0) - (x < 0);
    }
  }
};

/* x clamped to [lo, hi]; NaN stays NaN (as torch.clamp and the CPU) */
template <typename T>
struct clamp_op {
  T lo, hi;
  __device__ T go(T x) const { return x < lo ? lo : x > hi ? hi : x; }
};
/* int64 compares in double and clamps to the integers inside [lo, hi] */
template <>
struct clamp_op<int64_t> {
  double lo, hi;
  int64_t ilo, ihi;   /* ceil(lo), floor(hi), made on the host */
  __device__ int64_t go(int64_t x) const { return (double)x < lo ? ilo : (double)x > hi ? ihi : x; }
};

template <int OP, typename T>
struct un_fn {
  __device__ T go(T x) const { return un_op<OP, T>::go(x); }
};

template <typename T, typename F>
__global__ void map_dense(T *o, const T *a, int64_t nv, int64_t n, F f) {
  constexpr int V = 16 / sizeof(T);
  KC_GRID_LOOP(i, nv) {
    kc_vec16<T> va = ((const kc_vec16<T> *)a)[i], vo;
    for (int k = 0; k < V; k++) vo.v[k] = f.go(va.v[k]);
    ((kc_vec16<T> *)o)[i] = vo;
  }
  for (int64_t i = nv * V + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    o[i] = f.go(a[i]);
}

template <typename T, typename F>
__global__ void map_strided(T *o, const T *a, kc_geom g, bool small, int64_t n, F f) {
  KC_GRID_LOOP(i, n) {
    int64_t off[2];
    kc_offsets_sel<2>(g, small, i, off);
    o[off[0]] = f.go(a[off[1]]);
  }
}

template <typename T, typename F>
static int map_launch(kc_state *s, const kc_view *out, const kc_view *a, F f) {
  const kc_view *v[2] = {out, a};
  kc_geom g;
  int64_t n = out->numel;
  T *po = (T *)out->data;
  const T *pa = (const T *)a->data;
  if (n == 0) return KC_OK;
  kc_make_geom(&g, 2, v);
  int kind = dense_kind(&g, 2);
  if (kind && !(kind & 2)) {
    int64_t nv = kc_vec_count<T>(n, po, pa, NULL);
    KC_LAUNCH(kc_blocks_sm(s, nv ? nv : n), KC_THREADS, 0, s->stream, map_dense<T, F>)(po, pa, nv, n, f);
  } else {
    KC_LAUNCH(kc_blocks_sm(s, n), KC_THREADS, 0, s->stream, map_strided<T, F>)(po, pa, g, kc_index32(n), n, f);
  }
  return KC_LAUNCHED();
}

template <typename T>
static int unary_float(kc_state *s, int op, const kc_view *o, const kc_view *a) {
  switch (op) {
    case KEEL_UN_NEG: return map_launch<T>(s, o, a, un_fn<KEEL_UN_NEG, T>());
    case KEEL_UN_EXP: return map_launch<T>(s, o, a, un_fn<KEEL_UN_EXP, T>());
    case KEEL_UN_LOG: return map_launch<T>(s, o, a, un_fn<KEEL_UN_LOG, T>());
    case KEEL_UN_SQRT: return map_launch<T>(s, o, a, un_fn<KEEL_UN_SQRT, T>());
    case KEEL_UN_ABS: return map_launch<T>(s, o, a, un_fn<KEEL_UN_ABS, T>());
    case KEEL_UN_RELU: return map_launch<T>(s, o, a, un_fn<KEEL_UN_RELU, T>());
    case KEEL_UN_SIGMOID: return map_launch<T>(s, o, a, un_fn<KEEL_UN_SIGMOID, T>());
    case KEEL_UN_TANH: return map_launch<T>(s, o, a, un_fn<KEEL_UN_TANH, T>());
    case KEEL_UN_SIGN: return map_launch<T>(s, o, a, un_fn<KEEL_UN_SIGN, T>());
    default: return KC_ERR_ARG;
  }
}

static int unary_int(kc_state *s, int op, const kc_view *o, const kc_view *a) {
  switch (op) {
    case KEEL_UN_NEG: return map_launch<int64_t>(s, o, a, un_fn<KEEL_UN_NEG, int64_t>());
    case KEEL_UN_ABS: return map_launch<int64_t>(s, o, a, un_fn<KEEL_UN_ABS, int64_t>());
    case KEEL_UN_RELU: return map_launch<int64_t>(s, o, a, un_fn<KEEL_UN_RELU, int64_t>());
    case KEEL_UN_SIGN: return map_launch<int64_t>(s, o, a, un_fn<KEEL_UN_SIGN, int64_t>());
    default: return KC_ERR_DTYPE;   /* the ops refuse int64 for the others */
  }
}

static int ew_unary(kc_state *s, int op, const kc_view *out, const kc_view *a) {
  if (!check_out(out) || !kc_same_shape(out, a, out->dtype)) return KC_ERR_ARG;
  if (op < 0 || op >= KEEL_UNOP_COUNT) return KC_ERR_ARG;
  switch (out->dtype) {
    case KEEL_F32: return unary_float<float>(s, op, out, a);
    case KEEL_F64: return unary_float<double>(s, op, out, a);
    case KEEL_I64: return unary_int(s, op, out, a);
    default: return KC_ERR_DTYPE;
  }
}

static int ew_clamp(kc_state *s, const kc_view *out, const kc_view *a, double lo, double hi) {
  if (!check_out(out) || !kc_same_shape(out, a, out->dtype)) return KC_ERR_ARG;
  switch (out->dtype) {
    case KEEL_F32: {
      clamp_op<float> f = {(float)lo, (float)hi};
      return map_launch<float>(s, out, a, f);
    }
    case KEEL_F64: {
      clamp_op<double> f = {lo, hi};
      return map_launch<double>(s, out, a, f);
    }
    case KEEL_I64: {
      /* an infinite bound never fires: its integer value is never used */
      clamp_op<int64_t> f = {lo, hi, isfinite(lo) ? (int64_t)ceil(lo) : 0,
                             isfinite(hi) ? (int64_t)floor(hi) : 0};
      return map_launch<int64_t>(s, out, a, f);
    }
    default: return KC_ERR_DTYPE;
  }
}

/* }====================================================================== */

/* {======================================================================
** Where: out = c != 0 ? a : b. c has any dtype (a NaN counts as true, as
** the CPU's c != 0); out, a, b share one, moved as raw bits of its size.
** ======================================================================= */

template <typename C, typename U>
__global__ void where_dense(U *o, const C *c, const U *a, const U *b, int64_t n) {
  KC_GRID_LOOP(i, n) o[i] = c[i] != (C)0 ? a[i] : b[i];
}

template <typename C, typename U>
__global__ void where_strided(U *o, const C *c, const U *a, const U *b, kc_geom g, bool small, int64_t n) {
  KC_GRID_LOOP(i, n) {
    int64_t off[4];
    kc_offsets_sel<4>(g, small, i, off);
    o[off[0]] = c[off[1]] != (C)0 ? a[off[2]] : b[off[3]];
  }
}

template <typename C, typename U>
static int where_launch(kc_state *s, const kc_view *out, const kc_view *c, const kc_view *a,
                        const kc_view *b) {
  const kc_view *v[4] = {out, c, a, b};
  kc_geom g;
  int64_t n = out->numel;
  kc_make_geom(&g, 4, v);
  if (kc_geom_dense(&g, 4))
    KC_LAUNCH(kc_blocks_sm(s, n), KC_THREADS, 0, s->stream, where_dense<C, U>)(
        (U *)out->data, (const C *)c->data, (const U *)a->data, (const U *)b->data, n);
  else
    KC_LAUNCH(kc_blocks_sm(s, n), KC_THREADS, 0, s->stream, where_strided<C, U>)(
        (U *)out->data, (const C *)c->data, (const U *)a->data, (const U *)b->data, g, kc_index32(n), n);
  return KC_LAUNCHED();
}

template <typename U>
static int where_by_cond(kc_state *s, const kc_view *out, const kc_view *c, const kc_view *a,
                         const kc_view *b) {
  switch (c->dtype) {
    case KEEL_F32: return where_launch<float, U>(s, out, c, a, b);
    case KEEL_F64: return where_launch<double, U>(s, out, c, a, b);
    case KEEL_I64: return where_launch<int64_t, U>(s, out, c, a, b);
    default: return KC_ERR_DTYPE;
  }
}

static int ew_where(kc_state *s, const kc_view *out, const kc_view *c, const kc_view *a, const kc_view *b) {
  if (!check_out(out) || !kc_same_shape(out, c, -1) || !kc_same_shape(out, a, out->dtype) ||
      !kc_same_shape(out, b, out->dtype))
    return KC_ERR_ARG;
  if (c->dtype != KEEL_F32 && c->dtype != KEEL_F64 && c->dtype != KEEL_I64) return KC_ERR_DTYPE;
  if (out->dtype != KEEL_F32 && out->dtype != KEEL_F64 && out->dtype != KEEL_I64) return KC_ERR_DTYPE;
  if (out->numel == 0) return KC_OK;
  if (out->dtype == KEEL_F32) return where_by_cond<uint32_t>(s, out, c, a, b);
  return where_by_cond<uint64_t>(s, out, c, a, b);
}

/* }====================================================================== */

void kc_register_elementwise(keel_cuda_table *t) {
  t->binary = ew_binary;
  t->unary = ew_unary;
  t->clamp = ew_clamp;
  t->where = ew_where;
}
