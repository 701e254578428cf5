/*
** common.cuh: what the plugin's .cu files share: the per-context state,
** error helpers, launch geometry, strided indexing and block reductions.
** Internal to the plugin (hidden symbols); the engine sees keel_cuda.h only.
**
** Every .cu file of kernels/ also compiles as plain C++ against the CUDA
** simulator of kernels/sim/ (libkeel_cuda_sim.so: the same kernels run on
** the CPU, one block at a time, so the test suite checks them on machines
** without a GPU). What that asks of kernel code:
** - launch through KC_LAUNCH, never <<< >>>;
** - shared memory through KC_SHARED (at kernel scope, a constant size) and
**   KC_DYN_SMEM, never a bare __shared__ (the simulator rejects it); never
**   read before this block wrote it (the simulator fills both with 0xFF
**   bytes at each block's start, so a test sees NaN/-1);
** - warp intrinsics from this list: __shfl_sync, __shfl_down_sync,
**   __shfl_xor_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp;
**   all 32 lanes of a warp call them (no early return before one);
** - atomicAdd (int, unsigned, unsigned long long, float, double),
**   atomicMax/atomicMin (int, unsigned, long long), atomicCAS (int,
**   unsigned long long), atomicExch;
** - cuBLAS: the functions kernels/sim/cublas_v2.h declares.
*/
#ifndef KEEL_CUDA_COMMON_CUH
#define KEEL_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cublas_v2.h>
#include <stdint.h>
#include "keel_cuda.h"

#define KC_STR_(x) #x
#define KC_STR(x) KC_STR_(x)
#define KC_HIDDEN __attribute__((visibility("hidden")))

/* KC_LAUNCH(grid, block, smem, stream, kernel)(args...): kernel may be a
** template instance with commas (it is the variadic part). */
#ifdef KEEL_CUDA_SIM
#define KC_LAUNCH(grid, block, smem, stream, ...) kcsim::launch((grid), (block), (smem), (stream), __VA_ARGS__)
#else
#define KC_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif
/* extern __shared__ T name[] */
#ifdef KEEL_CUDA_SIM
#define KC_DYN_SMEM(T, name) T *name = (T *)kcsim::dynamic_smem()
#else
#define KC_DYN_SMEM(T, name) extern __shared__ unsigned char kc_dyn_smem_[]; T *name = (T *)kc_dyn_smem_
#endif
/* KC_SHARED(T, name, [dims]...): `__shared__ T name[dims]...` (no dims: a
** scalar), e.g. KC_SHARED(double, sh, [9][32]). On the simulator a
** function-local static, filled with 0xFF bytes when the first thread of
** each block reaches it (kcsim::smem_fresh): a GPU's shared memory holds
** garbage when a block starts, a static would hold the last block's
** values, and a kernel reading it before writing would pass there. */
#ifdef KEEL_CUDA_SIM
#define KC_SHARED(T, name, ...) \
  static T name __VA_ARGS__; \
  static uint64_t kc_fresh_##name##_ = 0; \
  kcsim::smem_fresh(&name, sizeof name, &kc_fresh_##name##_)
#else
#define KC_SHARED(T, name, ...) __shared__ T name __VA_ARGS__
#endif

struct kc_state {
  int device;
  cudaStream_t stream;
  cublasHandle_t cublas;        /* NULL until kc_cublas */
  int sm_count;                 /* multiprocessors, for launch sizing */
  int gemm_prec;                /* keel_matmul_precision (set_gemm_precision) */
  /* Device scratch (kc_scratch) and pinned host scratch (kc_host_scratch):
  ** grown on demand, kept until close, so entries that need a temporary
  ** buffer or a small host result never allocate per call. */
  void *scratch;
  size_t scratch_size;
  void *host;
  size_t host_size;
  struct kc_pending *pending;   /* optim.cu: deferred host results, NULL until used */
  struct kc_stage *stage;       /* stage.cu: pinned ring of host-to-device copies, NULL until used */
  int stage_off;                /* stage.cu: no ring could be had; copies wait */
};

/* A CUDA status as a plugin code (clearing the runtime's sticky slot). */
KC_HIDDEN int kc_check_cuda(cudaError_t e);
/* The code of the last launch (cudaGetLastError). */
#define KC_LAUNCHED() kc_check_cuda(cudaGetLastError())
/* The state's cuBLAS handle, created on first use and bound to its stream. */
KC_HIDDEN int kc_cublas(kc_state *s, cublasHandle_t *h);
/* The cuBLAS compute type of a product of dtype dt (KEEL_F32 or KEEL_F64)
** under the state's matmul precision; use it with cublasGemmEx and
** cublasGemmStridedBatchedEx. */
static inline cublasComputeType_t kc_compute_type(const kc_state *s, int dt) {
  if (dt == KEEL_F64) return CUBLAS_COMPUTE_64F;
  switch (s->gemm_prec) {
    case KEEL_MATMUL_TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case KEEL_MATMUL_BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    case KEEL_MATMUL_F16: return CUBLAS_COMPUTE_32F_FAST_16F;
    default: return CUBLAS_COMPUTE_32F;
  }
}
/* The keel_dtype of a kernel's element type. */
template <typename T> struct kc_dtype_of;
template <> struct kc_dtype_of<float> { static const int v = KEEL_F32; };
template <> struct kc_dtype_of<double> { static const int v = KEEL_F64; };

/* Row-major C[m,n] = op(A)[m,k] op(B)[k,n] + beta C (op: transposed when
** ta/tb) over batch matrices at element strides sA, sB, sC (0 reuses one
** matrix), dtype dt (KEEL_F32, KEEL_F64), under the state's matmul
** precision (gemm.cu). Sizes and leading dimensions must fit an int. With
** k == 0 C becomes beta C for beta 0 or 1 (cuBLAS would leave it to its
** own reading of beta), as the CPU's kl_cpu_gemm does. */
KC_HIDDEN int kc_gemm(kc_state *s, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, const void *A,
                      int64_t lda, int64_t sA, const void *B, int64_t ldb, int64_t sB, double beta, void *C,
                      int64_t ldc, int64_t sC, int64_t batch);
/* At least n bytes of device (host: pinned) scratch, 256-byte aligned.
** One buffer each per state: a caller uses it until it returns, and must
** not call another entry that uses it meanwhile. Growing the device buffer
** waits for queued work (the old one may be in use). */
KC_HIDDEN int kc_scratch(kc_state *s, size_t n, void **p);
KC_HIDDEN int kc_host_scratch(kc_state *s, size_t n, void **p);
KC_HIDDEN int kc_grow(kc_state *s, void **buf, size_t *size, size_t n, int pinned);   /* runtime.cu: buffer growth */
/* Queued work done (after an async D2H into host scratch). */
KC_HIDDEN int kc_sync(kc_state *s);

/* Launch geometry: a grid-stride loop over n elements. Kernels must be
** correct for any grid (the simulator caps grids to check that). */
#define KC_THREADS 256
#ifndef KC_MAX_BLOCKS
#define KC_MAX_BLOCKS (65535 * 8)
#endif
static inline unsigned kc_blocks(int64_t n) {
  int64_t b = (n + KC_THREADS - 1) / KC_THREADS;
  /* enough blocks to fill any current GPU; the loop covers the rest */
  return (unsigned)(b < 1 ? 1 : b > KC_MAX_BLOCKS ? KC_MAX_BLOCKS : b);
}
#define KC_GRID_LOOP(i, n) \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

/* kc_blocks capped at 16 blocks per SM: a grid-stride loop needs no more
** blocks than keep every SM busy (8 blocks of 256 threads fill one); more
** only costs block scheduling. */
static inline unsigned kc_blocks_sm(const kc_state *s, int64_t n) {
  unsigned b = kc_blocks(n), cap = (unsigned)(s->sm_count > 0 ? s->sm_count : 1) * 16u;
  return b < cap ? b : cap;
}
/* n blocks (one per item of a block-per-item kernel that loops over the
** rest), within 1 .. KC_MAX_BLOCKS. */
static inline unsigned kc_grid_x(int64_t n) {
  return (unsigned)(n < 1 ? 1 : n > KC_MAX_BLOCKS ? KC_MAX_BLOCKS : n);
}
/* n within 1 .. 65535: a grid's y or z size. */
static inline unsigned kc_grid_yz(int64_t n) { return (unsigned)(n < 1 ? 1 : n > 65535 ? 65535 : n); }

/* Bytes per element of a dtype the kernels move (0: none of them). */
static inline int kc_elem_size(int dt) {
  return dt == KEEL_F32 ? 4 : dt == KEEL_F64 || dt == KEEL_I64 ? 8 : 0;
}
static inline int kc_is_float(int dt) { return dt == KEEL_F32 || dt == KEEL_F64; }
static inline bool kc_aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }
/* n rounded up to 256 bytes (the alignment kc_scratch promises each region). */
static inline int64_t kc_align256(int64_t n) { return (n + 255) & ~(int64_t)255; }
/* v is dense in row-major order. */
static inline int kc_contiguous(const kc_view *v) {
  int64_t want = 1;
  for (int d = v->ndim - 1; d >= 0; d--) {
    if (v->shape[d] != 1 && v->stride[d] != want) return 0;
    want *= v->shape[d];
  }
  return 1;
}
/* x has out's shape (ndim and sizes), dtype dt when dt >= 0, and data
** when out has elements. */
static inline int kc_same_shape(const kc_view *out, const kc_view *x, int dt) {
  if (!x || (!x->data && out->numel > 0) || x->ndim != out->ndim || (dt >= 0 && x->dtype != dt)) return 0;
  for (int d = 0; d < out->ndim; d++)
    if (x->shape[d] != out->shape[d]) return 0;
  return 1;
}

/* 16 bytes of T: one vector load or store (float4, double2, longlong2). */
template <typename T>
struct alignas(16) kc_vec16 {
  T v[16 / sizeof(T)];
};
/* Dense loops of fewer elements than this take no vectors: they would be
** all tail and launch overhead. */
#define KC_VEC_MIN 1024
/* Elements of a dense loop over n done as kc_vec16 (n rounded down to
** whole vectors): 0 unless n is large enough and every pointer (NULL: not
** streamed) is 16-byte aligned. */
template <typename T>
static inline int64_t kc_vec_count(int64_t n, const void *a, const void *b, const void *c) {
  if (n < KC_VEC_MIN || !kc_aligned16(a) || (b && !kc_aligned16(b)) || (c && !kc_aligned16(c))) return 0;
  return n / (int64_t)(16 / sizeof(T));
}

/* {======================================================================
** The float or double library function by argument type, as <tgmath.h>
** picks it on the CPU (spelled out: the simulator's C++ need not overload
** the C names).
** ======================================================================= */

__device__ __forceinline__ float kc_exp(float x) { return expf(x); }
__device__ __forceinline__ double kc_exp(double x) { return exp(x); }
__device__ __forceinline__ float kc_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double kc_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float kc_log(float x) { return logf(x); }
__device__ __forceinline__ double kc_log(double x) { return log(x); }
__device__ __forceinline__ float kc_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double kc_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float kc_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double kc_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float kc_fabs(float x) { return fabsf(x); }
__device__ __forceinline__ double kc_fabs(double x) { return fabs(x); }
__device__ __forceinline__ float kc_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double kc_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float kc_erfc(float x) { return erfcf(x); }
__device__ __forceinline__ double kc_erfc(double x) { return erfc(x); }
__device__ __forceinline__ float kc_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double kc_pow(double x, double y) { return pow(x, y); }

/* }====================================================================== */

/* {======================================================================
** Counter-based dropout draws (norm.cu's dropout, attention.cu's weights;
** engine/backend_cpu_attn.c draws the same on the CPU): the seed goes
** through the splitmix64 finalizer once (nearby seeds give unrelated
** streams), then draw i is the finalizer of the stream's i-th step, as a
** uniform in [0, 1) with 53 bits.
** ======================================================================= */

static __host__ __device__ __forceinline__ uint64_t kc_mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static __host__ __device__ __forceinline__ uint64_t kc_drop_key(uint64_t seed) {
  return kc_mix64(seed ^ 0x8CB92BA72F3D8DD7ull);
}
__device__ __forceinline__ double kc_drop_u(uint64_t key, uint64_t i) {
  return (double)(kc_mix64(key + (i + 1) * 0x9E3779B97F4A7C15ull) >> 11) * (1.0 / 9007199254740992.0);
}

/* }====================================================================== */

/* {======================================================================
** Strided geometry: up to KC_GEOM_OPS operands of one shape, dimensions
** merged where every operand is contiguous across them, size-1 dims
** dropped; passed to kernels by value.
** ======================================================================= */

#define KC_GEOM_OPS 4
typedef struct kc_geom {
  int ndim;
  int64_t shape[KC_MAX_DIMS];
  int64_t st[KC_GEOM_OPS][KC_MAX_DIMS];   /* element strides per operand */
} kc_geom;

/* Operands v[0..n-1] (NULL: stride 0 everywhere) seen through v[0]'s shape. */
static inline void kc_make_geom(kc_geom *g, int n, const kc_view *const *v) {
  int nd = 0;
  const kc_view *o = v[0];
  for (int d = 0; d < o->ndim; d++) {
    int64_t sz = o->shape[d];
    int merge = nd > 0;
    if (sz == 1) continue;
    for (int k = 0; k < n && merge; k++) {
      int64_t a = v[k] ? v[k]->stride[d] : 0;
      if (g->st[k][nd - 1] != a * sz) merge = 0;
    }
    if (merge) {
      g->shape[nd - 1] *= sz;
      for (int k = 0; k < n; k++) g->st[k][nd - 1] = v[k] ? v[k]->stride[d] : 0;
      continue;
    }
    g->shape[nd] = sz;
    for (int k = 0; k < n; k++) g->st[k][nd] = v[k] ? v[k]->stride[d] : 0;
    nd++;
  }
  for (int k = n; k < KC_GEOM_OPS; k++)
    for (int d = 0; d < nd; d++) g->st[k][d] = 0;
  g->ndim = nd;
}

/* True when every one of the n operands is dense over the geometry (one
** merged dimension of stride 1, or a single element). */
static inline int kc_geom_dense(const kc_geom *g, int n) {
  if (g->ndim == 0) return 1;
  if (g->ndim != 1) return 0;
  for (int k = 0; k < n; k++)
    if (g->st[k][0] != 1) return 0;
  return 1;
}

/* Offsets of linear element i for operands 0..N-1. */
template <int N>
__device__ __forceinline__ void kc_offsets(const kc_geom &g, int64_t i, int64_t *off) {
  for (int k = 0; k < N; k++) off[k] = 0;
  for (int d = g.ndim - 1; d >= 0; d--) {
    int64_t q = i / g.shape[d], r = i - q * g.shape[d];
    i = q;
    for (int k = 0; k < N; k++) off[k] += r * g.st[k][d];
  }
}

/*
** 32-bit index paths. A 64-bit integer division is a long software
** sequence on a GPU, several times the cost of a 32-bit one, and strided
** loops do one per merged dimension per element. When a launch's element
** count is below KC_INDEX32_LIMIT, every linear index and every size of
** its geometry fits 32 bits, so kc_offsets32 divides in uint32 (offsets
** still add up in int64: strides times coordinates can exceed 32 bits,
** and a 64-bit multiply-add is cheap). The choice is the same for the
** whole launch, so the branch on it never diverges. The simulator builds
** with a small limit, so the tests' sizes take both paths.
*/
#ifndef KC_INDEX32_LIMIT
#define KC_INDEX32_LIMIT ((int64_t)1 << 32)
#endif
static inline bool kc_index32(int64_t n) { return n < (int64_t)KC_INDEX32_LIMIT; }

template <int N>
__device__ __forceinline__ void kc_offsets32(const kc_geom &g, uint32_t u, int64_t *off) {
  for (int k = 0; k < N; k++) off[k] = 0;
  for (int d = g.ndim - 1; d >= 0; d--) {
    uint32_t sz = (uint32_t)g.shape[d], q = u / sz, r = u - q * sz;
    u = q;
    for (int k = 0; k < N; k++) off[k] += (int64_t)r * g.st[k][d];
  }
}
/* kc_offsets, or kc_offsets32 when small (kc_index32 of the launch's n). */
template <int N>
__device__ __forceinline__ void kc_offsets_sel(const kc_geom &g, bool small, int64_t i, int64_t *off) {
  if (small) kc_offsets32<N>(g, (uint32_t)i, off);
  else kc_offsets<N>(g, i, off);
}

/* }====================================================================== */

/* {======================================================================
** Reductions within groups of G lanes of a warp (G a power of two, at
** most 32; 32 by default: the whole warp) and within a block (blockDim.x
** a multiple of 32, at most 1024). Every lane of the warp (every thread
** of the block) calls them, and every lane gets the result. The order is
** fixed: a butterfly over lane distances G/2, G/4, .. 1, then (block) the
** same over the warps' results, so a result never depends on timing. The
** max and min take NaN-free inputs: a NaN compares false, so lanes would
** disagree (callers skip NaN as they build their own value).
** ======================================================================= */

template <int G = 32, typename T>
__device__ __forceinline__ T kc_warp_sum(T v) {
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "lane group: a power of two up to 32");
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <int G = 32, typename T>
__device__ __forceinline__ T kc_warp_max(T v) {
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "lane group: a power of two up to 32");
  for (int o = G / 2; o > 0; o >>= 1) {
    T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
template <int G = 32, typename T>
__device__ __forceinline__ T kc_warp_min(T v) {
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "lane group: a power of two up to 32");
  for (int o = G / 2; o > 0; o >>= 1) {
    T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}

/* The block's sum, returned to every thread. buf: __shared__ T[32] of the
** caller (a block may reduce several times with one buffer). */
template <typename T>
__device__ __forceinline__ T kc_block_sum(T v, T *buf) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = kc_warp_sum(v);
  __syncthreads();              /* buf may still be read by a previous call */
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  v = lane < nw ? buf[lane] : (T)0;
  return kc_warp_sum(v);
}
template <typename T>
__device__ __forceinline__ T kc_block_max(T v, T *buf, T lowest) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = kc_warp_max(v);
  __syncthreads();
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  v = lane < nw ? buf[lane] : lowest;
  return kc_warp_max(v);
}

/* Kernels templated on their lane-group width: G lanes (kc_warp_*), or
** G == 0 the whole block (kc_block_*, through buf). */
template <int G, typename T>
__device__ __forceinline__ T kc_group_sum(T v, T *buf) {
  if constexpr (G == 0) return kc_block_sum(v, buf);
  else return kc_warp_sum<G>(v);
}
template <int G, typename T>
__device__ __forceinline__ T kc_group_max(T v, T *buf, T lowest) {
  if constexpr (G == 0) return kc_block_max(v, buf, lowest);
  else return kc_warp_max<G>(v);
}

/* }====================================================================== */

/* {======================================================================
** Per-channel sums over [N, C, L] (batch-norm statistics and backward,
** conv bias gradients, the second pass of layer/group norm's weight
** gradients): channel c's N*L elements are N runs of L, C*L
** apart. One block per channel leaves most of a GPU idle when channels
** are few and runs are long, so the N*L range splits into S slices of
** chunk elements (gridDim.y); each block writes a partial, and a second
** pass adds the S partials of a channel in slice order: deterministic, no
** atomics, and S == 1 (enough channels) is the one-block-per-channel
** kernel as it was.
**
** Runs of one (L == 1: [N, C] inputs, 1x1 maps) would have a block's
** threads read one channel's elements C apart, a separate memory
** transaction each. There the block is 2-D ("columns"): threadIdx.x
** takes one of blockDim.x neighbouring channels (a power of two up to a
** warp), threadIdx.y walks the rows, so a warp reads 32 neighbouring
** addresses of a row, and a block serves blockDim.x channels (a "unit").
** Otherwise a unit is one channel and the block is 1-D. Kernels loop
** over units (kc_chan_units, kc_chan_at), visit (kc_chan_visit), sum
** (kc_chan_sum) and let kc_chan_lead write; a thread whose channel is
** past C (the last unit of columns) visits nothing but still sums. A
** kernel that calls kc_chan_visit with L == 1 must run in columns.
** ======================================================================= */

/* The simulator's minimum is small, so the tests' modest sizes split. */
#ifdef KEEL_CUDA_SIM
#define KC_SPLIT_MIN 2
#else
#define KC_SPLIT_MIN 16
#endif

typedef struct kc_split {
  int64_t S, chunk;             /* slices, elements per slice (the last may be short) */
} kc_split;

/* Slices for C independent sums (channels, units, a reduction's output
** tiles) of n elements each, each sum walked by bd threads of a block:
** enough blocks for about 4 per SM, every thread still walking at least
** KC_SPLIT_MIN elements of its slice. */
static inline kc_split kc_chan_split(const kc_state *s, int64_t C, int64_t n, int bd) {
  int64_t target = (int64_t)(s->sm_count > 0 ? s->sm_count : 1) * 4, most = n / ((int64_t)bd * KC_SPLIT_MIN);
  int64_t S = C < target ? (target + C - 1) / C : 1;
  kc_split p;
  if (S > most) S = most;
  if (S > 65535) S = 65535;
  if (S < 1) S = 1;
  p.chunk = S > 1 ? (n + S - 1) / S : (n > 0 ? n : 1);
  p.S = S > 1 ? (n + p.chunk - 1) / p.chunk : 1;
  return p;
}

/* The block for per-channel sums of C channels of n elements each, at
** most bd threads (a power of two, 32 or more): columns (cols: L == 1)
** take the fewest neighbouring channels, a power of two up to 32, that
** hold C (so few channels leave few lanes idle); otherwise the fewest
** whole warps, a power of two, that hold n (short channels would leave
** most of a full block idle). */
static inline dim3 kc_chan_block(bool cols, int64_t C, int64_t n, int bd) {
  unsigned b = cols ? 1u : 32u;
  if (!cols) {
    while ((int)b < bd && (int64_t)b < n) b <<= 1;
    return dim3(b);
  }
  while (b < 32 && (int64_t)b < C) b <<= 1;
  return dim3(b, (unsigned)bd / b);
}
/* Units of C channels under block b (host side; kc_chan_units on the device). */
static inline int64_t kc_chan_units_of(bool cols, int64_t C, dim3 b) {
  return cols ? (C + b.x - 1) / b.x : C;
}
/* Threads of block b that walk one channel's elements (kc_chan_split's bd). */
static inline int kc_chan_team(bool cols, dim3 b) { return (int)(cols ? b.y : b.x); }

__device__ __forceinline__ int64_t kc_chan_units(bool cols, int64_t C) {
  return cols ? (C + blockDim.x - 1) / blockDim.x : C;
}
/* This thread's channel in unit u (may be >= C with columns). */
__device__ __forceinline__ int64_t kc_chan_at(bool cols, int64_t u) {
  return cols ? u * blockDim.x + threadIdx.x : u;
}
/* The thread that writes its channel's result. */
__device__ __forceinline__ bool kc_chan_lead(bool cols) { return (cols ? threadIdx.y : threadIdx.x) == 0; }

/* Columns: the sum over the threads of the block that share threadIdx.x,
** to each of them. In order: a butterfly within each warp over the lane
** distances 16, 8, .. blockDim.x (which keep the channel), then the
** warps' results in warp order. buf: __shared__ T of one per thread. */
template <typename T>
__device__ __forceinline__ T kc_col_sum(T v, T *buf) {
  int bx = blockDim.x, t = threadIdx.y * bx + threadIdx.x, lane = t & 31, nw = (bx * blockDim.y + 31) >> 5;
  for (int o = 16; o >= bx; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();              /* buf may still be read by a previous call */
  if (lane < bx) buf[(t >> 5) * bx + lane] = v;
  __syncthreads();
  v = 0;
  for (int w = 0; w < nw; w++) v += buf[w * bx + (int)threadIdx.x];
  return v;
}
/* A channel's sum to its threads: kc_col_sum or kc_block_sum (buf: one
** T per thread of the block). */
template <typename T>
__device__ __forceinline__ T kc_chan_sum(bool cols, T v, T *buf) {
  return cols ? kc_col_sum(v, buf) : kc_block_sum(v, buf);
}

/* f(offset) for this thread's share of elements [j0, j1) of channel c
** (element j = n*L + l lies at n*C*L + c*L + l). Runs at least a block
** long go row by row (coalesced); shorter ones step through n and l by
** the block size's quotient and remainder (no division per element);
** runs of one are columns (threadIdx.y walks the rows). */
template <typename F>
__device__ __forceinline__ void kc_chan_visit(int64_t C, int64_t L, int64_t c, int64_t j0, int64_t j1, F &f) {
  int64_t tid = threadIdx.x, bd = blockDim.x, CL = C * L;
  if (L == 1) {
    if (c < C)
      for (int64_t j = j0 + threadIdx.y; j < j1; j += blockDim.y) f(j * C + c);
  } else if (L >= bd) {
    for (int64_t n = j0 / L; n * L < j1; n++) {
      int64_t r0 = n * L, lo = j0 > r0 ? j0 - r0 : 0, hi = j1 - r0 < L ? j1 - r0 : L, base = n * CL + c * L;
      for (int64_t l = lo + tid; l < hi; l += bd) f(base + l);
    }
  } else if (j0 + tid < j1) {
    /* bd = q L + r: each step moves q runs and r elements (carry one run
    ** when l passes L); off tracks n*CL + c*L + l */
    int64_t j = j0 + tid, n = j / L, l = j - n * L, q = bd / L, r = bd - q * L;
    int64_t off = n * CL + c * L + l, step = q * CL + r, carry = CL - L;
    for (; j < j1; j += bd) {
      f(off);
      off += step;
      l += r;
      if (l >= L) {
        l -= L;
        off += carry;
      }
    }
  }
}

/* Slice sl's range [*j0, *j1) of n elements. */
__device__ __forceinline__ void kc_split_range(const kc_split &p, int64_t sl, int64_t n, int64_t *j0, int64_t *j1) {
  *j0 = sl * p.chunk;
  *j1 = *j0 + p.chunk < n ? *j0 + p.chunk : n;
}

/* }====================================================================== */

/* {======================================================================
** The families of entries, one .cu file each: each sets its slots of the
** table (runtime.cu calls them all).
** ======================================================================= */

/* copy.cu */
KC_HIDDEN int kc_copy(kc_state *s, const kc_view *dst, const kc_view *src);
KC_HIDDEN int kc_fill(kc_state *s, const kc_view *dst, double v);
KC_HIDDEN void kc_register_elementwise(keel_cuda_table *t);   /* elementwise.cu, act.cu */
KC_HIDDEN void kc_register_act(keel_cuda_table *t);
KC_HIDDEN void kc_register_reduce(keel_cuda_table *t);        /* reduce.cu: reduce, norm */
KC_HIDDEN void kc_register_softmax(keel_cuda_table *t);       /* softmax.cu */
KC_HIDDEN void kc_register_loss(keel_cuda_table *t);          /* loss.cu */
KC_HIDDEN void kc_register_blas(keel_cuda_table *t);          /* blas.cu: matmul */
KC_HIDDEN void kc_register_index(keel_cuda_table *t);         /* index.cu: gather, scatter, embedding */
KC_HIDDEN void kc_register_conv(keel_cuda_table *t);          /* conv.cu: conv2d, pools */
KC_HIDDEN void kc_register_norm(keel_cuda_table *t);          /* norm.cu, dropout */
KC_HIDDEN void kc_register_rnn(keel_cuda_table *t);           /* rnn.cu */
KC_HIDDEN void kc_register_attention(keel_cuda_table *t);     /* attention.cu */
KC_HIDDEN void kc_register_optim(keel_cuda_table *t);         /* optim.cu */
KC_HIDDEN void kc_optim_close(kc_state *s);                   /* optim.cu: frees s->pending */
KC_HIDDEN void kc_optim_flush(kc_state *s);                   /* optim.cu: launches an open batch */
/* stage.cu: a host-to-device copy that returns once src may be reused,
** without waiting for the stream; close frees the ring (stream idle). */
KC_HIDDEN int kc_stage_h2d(kc_state *s, void *dst, const void *src, size_t n);
KC_HIDDEN void kc_stage_close(kc_state *s);

/* }====================================================================== */

#endif
