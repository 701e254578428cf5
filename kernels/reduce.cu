/*
** reduce.cu: reductions (sum, mean, prod, max/min with arg positions) and
** p-norms over any set of dimensions, as the CPU's reduce and norm slots
** (engine/backend_cpu.c) define them:
** - every dtype accumulates in double (the CPU does too), so float32 sums
**   of millions of elements agree with the CPU to float32 rounding;
** - max/min keep the first NaN, else the first extreme (ties: the lowest
**   position); positions count in row-major order over the reduced dims;
** - an empty reduction gives 0 (sum, norm), 1 (prod), NaN (mean), -inf /
**   +inf (max / min, which the engine refuses before).
**
** One plan serves every case. Kept dims (outputs) and reduced dims are
** each merged where contiguous (two kc_geoms; their offsets divide in 32
** bits when the counts allow, common.cuh); a block holds a tile of outputs and, for
** each, a power-of-two team of threads that walk the reduced elements:
** - "inner" (a reduced dim has the smallest stride: rows): the team is
**   threadIdx.x, so a warp reads consecutive elements of a row;
** - "outer" (a kept dim has the smallest stride: columns): the outputs are
**   threadIdx.x, so a warp reads consecutive columns, the team is
**   threadIdx.y.
** When the outputs alone cannot fill the GPU (a full reduction, a few long
** rows or columns), the reduced range is split over gridDim.y (common.cuh
** kc_chan_split, the output tiles as its channels): each split
** writes a partial (value, position) to scratch and a second kernel
** combines them in split order. Results never depend on timing (no
** atomics); they do depend on the launch shape, as any parallel sum does.
*/
#include <math.h>
#include "common.cuh"

/* {======================================================================
** Operators: an accumulator (value, position), a step per element, an
** associative combine, and a finish applied once per output.
** ======================================================================= */

enum { OP_SUM, OP_PROD, OP_MAX, OP_MIN, OP_ABS, OP_SQ, OP_POW, OP_ABSMAX };
enum { FIN_NONE, FIN_MEAN, FIN_SQRT, FIN_ROOT };

#define NO_POS INT64_MAX        /* a team member that saw no element */
#define RED_THREADS 256

typedef struct racc {
  double v;
  int64_t pos;
} racc;

template <int OP> struct rop;

template <> struct rop<OP_SUM> {
  __device__ static racc init() { return {0.0, NO_POS}; }
  __device__ static void step(racc &a, double x, double, int64_t) { a.v += x; }
  __device__ static racc comb(racc a, racc b) { a.v += b.v; return a; }
};
template <> struct rop<OP_PROD> {
  __device__ static racc init() { return {1.0, NO_POS}; }
  __device__ static void step(racc &a, double x, double, int64_t) { a.v *= x; }
  __device__ static racc comb(racc a, racc b) { a.v *= b.v; return a; }
};
template <> struct rop<OP_ABS> {
  __device__ static racc init() { return {0.0, NO_POS}; }
  __device__ static void step(racc &a, double x, double, int64_t) { a.v += fabs(x); }
  __device__ static racc comb(racc a, racc b) { a.v += b.v; return a; }
};
template <> struct rop<OP_SQ> {
  __device__ static racc init() { return {0.0, NO_POS}; }
  __device__ static void step(racc &a, double x, double, int64_t) { a.v += x * x; }
  __device__ static racc comb(racc a, racc b) { a.v += b.v; return a; }
};
template <> struct rop<OP_POW> {
  __device__ static racc init() { return {0.0, NO_POS}; }
  __device__ static void step(racc &a, double x, double p, int64_t) { a.v += pow(fabs(x), p); }
  __device__ static racc comb(racc a, racc b) { a.v += b.v; return a; }
};
/* the inf-norm: the largest |x|, NaN as soon as one is seen */
template <> struct rop<OP_ABSMAX> {
  __device__ static racc init() { return {0.0, NO_POS}; }
  __device__ static void step(racc &a, double x, double, int64_t) {
    double ax = fabs(x);
    if (a.v == a.v && (ax > a.v || ax != ax)) a.v = ax;
  }
  __device__ static racc comb(racc a, racc b) {
    if (a.v != a.v) return a;
    if (b.v != b.v || b.v > a.v) return b;
    return a;
  }
};

/* max/min: a member's elements come in increasing position, so "the
** first NaN, else the first strict extreme" is the CPU's sequential rule;
** comb keeps it across members: NaN wins, then the extreme, ties and
** NaN pairs go to the lower position. */
template <bool MAX>
__device__ __forceinline__ bool beats(double x, double v) { return MAX ? x > v : x < v; }

template <bool MAX> struct rext {
  __device__ static racc init() { return {MAX ? -INFINITY : INFINITY, NO_POS}; }
  __device__ static void step(racc &a, double x, double, int64_t r) {
    if (a.v == a.v && (a.pos == NO_POS || beats<MAX>(x, a.v) || x != x)) { a.v = x; a.pos = r; }
  }
  __device__ static racc comb(racc a, racc b) {
    bool an = a.v != a.v, bn = b.v != b.v;
    if (an || bn) {
      if (an && bn) return a.pos <= b.pos ? a : b;
      return an ? a : b;
    }
    if (beats<MAX>(b.v, a.v)) return b;
    if (beats<MAX>(a.v, b.v)) return a;
    return a.pos <= b.pos ? a : b;
  }
};
template <> struct rop<OP_MAX> : rext<true> {};
template <> struct rop<OP_MIN> : rext<false> {};

/* }====================================================================== */

/* {======================================================================
** The plan
** ======================================================================= */

typedef struct rplan {
  kc_geom kept;                               /* the outputs: operands a, out, idx (stride 0 without) */
  kc_geom red;                                /* the reduced elements of one output in a */
  bool kept32, red32;                         /* kc_index32 of M, R: 32-bit index division */
  int inner;                                  /* the team walks threadIdx.x */
  int fin;                                    /* FIN_* */
  int64_t M, R;                               /* outputs, reduced elements per output */
  int64_t S, chunk;                           /* splits of the reduced range, elements each */
  double p;                                   /* norm order (OP_POW, FIN_ROOT) */
  int64_t base;                               /* added to positions (index base) */
} rplan;

/* Offsets of output m in a, out and idx. */
__device__ __forceinline__ void kept_offsets(const rplan &P, int64_t m, int64_t *off) {
  kc_offsets_sel<3>(P.kept, P.kept32, m, off);
}

/* Offset in a of reduced element r (several reduced dims). */
__device__ __forceinline__ int64_t red_offset(const rplan &P, int64_t r) {
  int64_t off[1];
  kc_offsets_sel<1>(P.red, P.red32, r, off);
  return off[0];
}

template <typename T>
__device__ __forceinline__ void put(const rplan &P, int64_t m, racc a, T *out, int64_t *idx) {
  int64_t off[3];
  double v = a.v;
  kept_offsets(P, m, off);
  switch (P.fin) {
    case FIN_MEAN: v = v / (double)P.R; break;       /* R == 0: 0/0, NaN as the CPU */
    case FIN_SQRT: v = sqrt(v); break;
    case FIN_ROOT: v = pow(v, 1.0 / P.p); break;
    default: break;
  }
  out[off[1]] = (T)v;
  if (idx) idx[off[2]] = (a.pos == NO_POS ? 0 : a.pos) + P.base;
}

/* }====================================================================== */

/* {======================================================================
** Kernels
** ======================================================================= */

/* ONE: a single reduced dim (no division per element). */
template <typename T, int OP, bool ONE>
__global__ void reduce_kernel(rplan P, const T *a, T *out, int64_t *idx, racc *part) {
  KC_SHARED(racc, sm, [RED_THREADS]);
  int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
  int lane = P.inner ? tx : ty, nl = P.inner ? blockDim.x : blockDim.y;   /* along the reduced range */
  int slot = P.inner ? ty : tx, ns = P.inner ? blockDim.y : blockDim.x;   /* output within the tile */
  int me = ty * bx + tx;
  int64_t tiles = (P.M + ns - 1) / ns;
  for (int64_t s = blockIdx.y; s < P.S; s += gridDim.y) {
    int64_t r0 = s * P.chunk, r1 = r0 + P.chunk < P.R ? r0 + P.chunk : P.R;
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
      int64_t m = t * ns + slot;
      racc acc = rop<OP>::init();
      if (m < P.M) {
        int64_t off[3];
        kept_offsets(P, m, off);
        const T *row = a + off[0];
        if (ONE) {
          int64_t st = P.red.ndim ? P.red.st[0][0] : 0;
          for (int64_t r = r0 + lane; r < r1; r += nl) rop<OP>::step(acc, (double)row[r * st], P.p, r);
        } else {
          for (int64_t r = r0 + lane; r < r1; r += nl) rop<OP>::step(acc, (double)row[red_offset(P, r)], P.p, r);
        }
      }
      sm[me] = acc;
      __syncthreads();
      for (int o = nl >> 1; o > 0; o >>= 1) {
        if (lane < o) sm[me] = rop<OP>::comb(sm[me], sm[P.inner ? me + o : me + o * bx]);
        __syncthreads();
      }
      if (lane == 0 && m < P.M) {
        if (P.S == 1) put<T>(P, m, sm[me], out, idx);
        else part[s * P.M + m] = sm[me];
      }
      __syncthreads();          /* sm is rewritten by the next tile */
    }
  }
}

/* Second pass: the splits' partials of each output, combined in order. */
template <typename T, int OP>
__global__ void reduce_finish(rplan P, T *out, int64_t *idx, const racc *part) {
  KC_GRID_LOOP(m, P.M) {
    racc a = part[m];
    for (int64_t s = 1; s < P.S; s++) a = rop<OP>::comb(a, part[s * P.M + m]);
    put<T>(P, m, a, out, idx);
  }
}

/* }====================================================================== */

/* {======================================================================
** Launchers
** ======================================================================= */

static int elem_ok(int dt) { return dt == KEEL_F32 || dt == KEEL_F64 || dt == KEEL_I64; }

/* Builds the plan's geometry; KC_ERR_ARG when the views disagree. The
** kept dims of (a, out, idx) and the reduced dims of a become two views,
** each merged by kc_make_geom. */
static int make_plan(rplan *P, const kc_view *out, const kc_view *idx, const kc_view *a, const int *reduce) {
  int64_t kmin = INT64_MAX, rmin = INT64_MAX;
  kc_view ka, ko, ki, ra;
  if (!a || !out || !reduce || a->ndim != out->ndim || a->ndim < 0 || a->ndim > KC_MAX_DIMS) return KC_ERR_ARG;
  if (idx && (idx->ndim != a->ndim || idx->dtype != KEEL_I64)) return KC_ERR_ARG;
  ka.ndim = ra.ndim = 0;
  P->M = P->R = 1;
  for (int d = 0; d < a->ndim; d++) {
    int64_t sz = a->shape[d];
    if (out->shape[d] != (reduce[d] ? 1 : sz) || (idx && idx->shape[d] != out->shape[d])) return KC_ERR_ARG;
    if (reduce[d]) {
      P->R *= sz;
      ra.shape[ra.ndim] = sz;
      ra.stride[ra.ndim++] = a->stride[d];
    } else {
      P->M *= sz;
      ka.shape[ka.ndim] = sz;
      ka.stride[ka.ndim] = a->stride[d];
      ko.stride[ka.ndim] = out->stride[d];
      ki.stride[ka.ndim++] = idx ? idx->stride[d] : 0;
    }
  }
  {
    const kc_view *kv[3] = {&ka, &ko, &ki}, *rv = &ra;
    kc_make_geom(&P->kept, 3, kv);
    kc_make_geom(&P->red, 1, &rv);
  }
  P->kept32 = kc_index32(P->M);
  P->red32 = kc_index32(P->R);
  for (int d = 0; d < P->kept.ndim; d++) {
    int64_t v = P->kept.st[0][d] < 0 ? -P->kept.st[0][d] : P->kept.st[0][d];
    if (v < kmin) kmin = v;
  }
  for (int d = 0; d < P->red.ndim; d++) {
    int64_t v = P->red.st[0][d] < 0 ? -P->red.st[0][d] : P->red.st[0][d];
    if (v < rmin) rmin = v;
  }
  /* rows when the reduced elements are the closer ones in memory */
  P->inner = P->kept.ndim == 0 || (rmin != INT64_MAX && rmin < kmin);
  return KC_OK;
}

template <typename T, int OP>
static int launch(kc_state *s, rplan *P, const kc_view *out, const kc_view *idx, const kc_view *a) {
  int64_t along = P->inner ? P->R : P->M;       /* what threadIdx.x covers */
  int bx = 32, by, nl, ns;
  int64_t tiles;
  unsigned gx;
  kc_split sp;
  racc *part = NULL;
  while (bx < RED_THREADS && bx < along) bx <<= 1;
  by = RED_THREADS / bx;
  nl = P->inner ? bx : by;
  ns = P->inner ? by : bx;
  tiles = (P->M + ns - 1) / ns;
  /* too few tiles to fill the GPU: split the reduced range (tiles are
  ** kc_chan_split's channels, a team of nl threads walks each output) */
  sp = kc_chan_split(s, tiles, P->R, nl);
  P->S = sp.S;
  P->chunk = sp.chunk;
  if (P->S > 1) {
    int e = kc_scratch(s, sizeof(racc) * (size_t)(P->S * P->M), (void **)&part);
    if (e) return e;
  }
  gx = kc_grid_x(tiles);
  dim3 grid(gx, (unsigned)P->S), block((unsigned)bx, (unsigned)by);
  T *o = (T *)out->data;
  int64_t *ix = idx ? (int64_t *)idx->data : NULL;
  if (P->red.ndim <= 1)
    KC_LAUNCH(grid, block, 0, s->stream, reduce_kernel<T, OP, true>)(*P, (const T *)a->data, o, ix, part);
  else
    KC_LAUNCH(grid, block, 0, s->stream, reduce_kernel<T, OP, false>)(*P, (const T *)a->data, o, ix, part);
  if (P->S > 1) {
    int e = KC_LAUNCHED();
    if (e) return e;
    KC_LAUNCH(kc_blocks(P->M), KC_THREADS, 0, s->stream, reduce_finish<T, OP>)(*P, o, ix, part);
  }
  return KC_LAUNCHED();
}

template <typename T>
static int launch_op(kc_state *s, int op, rplan *P, const kc_view *out, const kc_view *idx, const kc_view *a) {
  switch (op) {
    case OP_SUM: return launch<T, OP_SUM>(s, P, out, idx, a);
    case OP_PROD: return launch<T, OP_PROD>(s, P, out, idx, a);
    case OP_MAX: return launch<T, OP_MAX>(s, P, out, idx, a);
    case OP_MIN: return launch<T, OP_MIN>(s, P, out, idx, a);
    case OP_ABS: return launch<T, OP_ABS>(s, P, out, idx, a);
    case OP_SQ: return launch<T, OP_SQ>(s, P, out, idx, a);
    case OP_POW: return launch<T, OP_POW>(s, P, out, idx, a);
    case OP_ABSMAX: return launch<T, OP_ABSMAX>(s, P, out, idx, a);
    default: return KC_ERR_ARG;
  }
}

static int run(kc_state *s, int op, rplan *P, const kc_view *out, const kc_view *idx, const kc_view *a) {
  if (out->dtype != a->dtype) return KC_ERR_ARG;
  if (P->M == 0) return KC_OK;
  switch (a->dtype) {
    case KEEL_F32: return launch_op<float>(s, op, P, out, idx, a);
    case KEEL_F64: return launch_op<double>(s, op, P, out, idx, a);
    case KEEL_I64: return launch_op<int64_t>(s, op, P, out, idx, a);
    default: return KC_ERR_DTYPE;
  }
}

/* op: a keel_redop; positions in idx count from index_base. */
static int reduce(kc_state *s, int op, const kc_view *out, const kc_view *idx, const kc_view *a, const int *red,
                  int index_base) {
  rplan P;
  int e, kind;
  if (!elem_ok(a ? a->dtype : -1)) return a ? KC_ERR_DTYPE : KC_ERR_ARG;
  if ((e = make_plan(&P, out, idx, a, red))) return e;
  P.p = 0;
  P.base = index_base;
  P.fin = op == KEEL_RED_MEAN ? FIN_MEAN : FIN_NONE;
  switch (op) {
    case KEEL_RED_SUM: case KEEL_RED_MEAN: kind = OP_SUM; break;
    case KEEL_RED_PROD: kind = OP_PROD; break;
    case KEEL_RED_MAX: kind = OP_MAX; break;
    case KEEL_RED_MIN: kind = OP_MIN; break;
    default: return KC_ERR_ARG;
  }
  if (idx && kind != OP_MAX && kind != OP_MIN) return KC_ERR_ARG;
  return run(s, kind, &P, out, idx, a);
}

static int norm(kc_state *s, const kc_view *out, const kc_view *a, const int *red, double p) {
  rplan P;
  int e, kind;
  if (!elem_ok(a ? a->dtype : -1)) return a ? KC_ERR_DTYPE : KC_ERR_ARG;
  if ((e = make_plan(&P, out, NULL, a, red))) return e;
  P.p = p;
  P.base = 0;
  if (isinf(p)) { kind = OP_ABSMAX; P.fin = FIN_NONE; }
  else if (p == 2) { kind = OP_SQ; P.fin = FIN_SQRT; }
  else if (p == 1) { kind = OP_ABS; P.fin = FIN_NONE; }
  else { kind = OP_POW; P.fin = FIN_ROOT; }
  return run(s, kind, &P, out, NULL, a);
}

/* }====================================================================== */

void kc_register_reduce(keel_cuda_table *t) {
  t->reduce = reduce;
  t->norm = norm;
}
