/*
** kcsim.h: the CUDA device language for the CPU simulator. Every .cu file
** of kernels/ is compiled as C++ with this header forced in front
** (g++ -x c++ -DKEEL_CUDA_SIM -include kernels/sim/kcsim.h, kernels/cuda.mk),
** and runs its kernels on the CPU: one emulated thread per CUDA thread,
** each a coroutine with its own stack (sim_sched.cpp).
**
** How kernels run (what kernel code may rely on, and what it may not):
** - A launch runs at once, synchronously, on the calling OS thread (with
**   KEEL_CUDA_SIM_ASYNC=1: when the host waits for its stream, on the
**   waiting thread; sim_stream.cpp); its
**   blocks run one after another (x fastest, then y, z), and the threads
**   of a block run one at a time, each until it finishes or waits at a
**   barrier. So shared memory (KC_SHARED) is a function-local `static`
**   (exactly one block uses it at a time); launches from several OS
**   threads take turns (one lock).
** - __syncthreads releases when every thread of the block that has not
**   finished waits at it, at the same call site (file:line); a warp op
**   (shuffle, vote, __syncwarp) releases when every unfinished lane of its
**   mask waits at a warp op. Anything else (some lanes at __syncthreads,
**   others of their warp at a shuffle; __syncthreads at two sites) is a
**   deadlock on a GPU or undefined: the launch stops and fails with
**   cudaErrorLaunchFailure, the message naming the launch and the sites.
** - A shuffle that reads a lane outside its group, or one that has
**   finished, gets all-ones bits (NaN, -1): a GPU gives garbage there.
** - Shared memory starts each block as 0xFF bytes, as new device memory
**   does, so reading before writing shows up as NaN/-1 in tests (a GPU
**   gives garbage, or the previous block's values): the dynamic buffer
**   (KC_DYN_SMEM) is filled when the block starts, a KC_SHARED array when
**   the block's first thread reaches its declaration. A bare `__shared__`
**   does not compile here (it would keep the previous block's contents):
**   kernel code declares shared memory with KC_SHARED (common.cuh).
** - Atomics are plain read-modify-writes (no two threads ever overlap).
** - __activemask() gives the lanes of the warp not finished yet when it
**   is called (a lane that ran to its end before this one asked is not
**   in it, converged or not): the simulator cannot see divergence, so use
**   explicit masks.
** - __CUDA_ARCH__ and __CUDACC__ are not defined: code behind them (inline
**   PTX, arch-specific paths) is not what the simulator runs.
** - Each emulated thread has a 64 KiB stack (256 KiB under ASan;
**   KEEL_CUDA_SIM_STACK=bytes changes it): no large local arrays.
** - KEEL_CUDA_SIM_ORDER=reverse|shuffle[:seed] changes the order in which
**   the blocks of a grid run, and the threads of a block between two
**   barriers (default: forward, x fastest). Correct kernels give the same
**   results in every order; one that reads what another thread or block
**   writes without a barrier between (a race on a GPU) gives different
**   ones, so running the suite in another order finds races a GPU would
**   have, and the forward order hides.
** Built with -DKC_MAX_BLOCKS=7, so every grid-stride loop goes round, and
** -DKC_INDEX32_LIMIT=4096, so modest sizes take the 64-bit index paths.
**
** tests/sim/test_sim.cu (build/<cfg>/bin/kcsim_test, run by tools/test.sh)
** pins these promises down with small kernels: a change here that breaks
** one fails there.
*/
#ifndef KCSIM_H
#define KCSIM_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime.h"

#define KCSIM_API __attribute__((visibility("hidden")))

/* {======================================================================
** Qualifiers
** ======================================================================= */

#define __global__
#define __device__
#define __host__
#define __constant__
/* Shared memory is declared with KC_SHARED (kernels/common.cuh), which
** fills it with 0xFF bytes at each block's first use; a bare __shared__
** would keep the previous block's contents, so it does not compile. */
#define __shared__ _Pragma("GCC error \"bare __shared__: declare shared memory with KC_SHARED(T, name, [dims]) (kernels/common.cuh)\"")
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __device_builtin__

/* }====================================================================== */

/* {======================================================================
** Built-in variables and launch geometry
** ======================================================================= */

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  operator uint3() const { return uint3{x, y, z}; }
};

namespace kcsim {

/* The emulated thread running now and its block (sim_sched.cpp). */
struct geometry {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern KCSIM_API geometry g;

typedef void (*body_fn)(void *ctx);
/* Runs a whole grid of body(ctx) (the kernel with its arguments), now or
** when its stream runs it (KEEL_CUDA_SIM_ASYNC); then drop(ctx) frees
** ctx, which the launch owns from the call on. */
KCSIM_API void run(dim3 grid, dim3 block, size_t smem, cudaStream_t st, body_fn body, void *ctx, void (*drop)(void *),
                   const void *kernel, const char *file, int line);
KCSIM_API void *dynamic_smem();
/* Static shared memory (KC_SHARED): a function-local static, and beside
** it the serial of the block that last filled it; the first thread of a
** block to reach the declaration fills it with 0xFF bytes, so a kernel
** that reads it before writing sees NaN/-1 rather than what the previous
** block left. block_serial: the block running now (never 0, so a fresh
** `seen` of 0 always fills). */
extern KCSIM_API uint64_t block_serial;
static inline void smem_fresh(void *p, size_t n, uint64_t *seen) {
  if (*seen != block_serial) {
    memset(p, 0xFF, n);
    *seen = block_serial;
  }
}

/* Barrier and warp primitives; file/line name the call site in reports. */
KCSIM_API int syncthreads(int pred, int mode, const char *file, int line);
struct warp_result {
  uint64_t value;
  unsigned ballot;
};
/* lane deposits v, reads lane src (-1: itself); ballot of pred over mask */
KCSIM_API warp_result warp_op(unsigned mask, uint64_t v, int src, int pred, const char *file, int line);
KCSIM_API unsigned active_mask();
/* stops the launch with cudaErrorAssert/LaunchFailure (__trap, failed assert) */
KCSIM_API void trap(const char *why, const char *file, int line);

/* kcsim::launch(grid, block, smem, stream, kernel)(args...), what
** KC_LAUNCH expands to: the arguments are converted to the kernel's
** parameter types once, as a launch copies them (into a heap tuple, as the
** launch may run after the caller has returned), and every emulated thread
** calls the kernel with its own copies. file/line: the launch site. */
template <typename... P>
struct launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const char *file;
  int line;

  template <typename... A>
  void operator()(A &&...a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    call(std::index_sequence_for<P...>(), std::forward<A>(a)...);
  }

 private:
  typedef std::tuple<void (*)(P...), typename std::decay<P>::type...> tuple_t;
  template <size_t... I>
  static void body(void *ctx) {
    tuple_t *t = (tuple_t *)ctx;
    std::get<0>(*t)(std::get<I + 1>(*t)...);
  }
  static void drop(void *ctx) { delete (tuple_t *)ctx; }
  template <size_t... I, typename... A>
  void call(std::index_sequence<I...>, A &&...a) const {
    tuple_t *t = new (std::nothrow) tuple_t(kernel, (typename std::decay<P>::type)(std::forward<A>(a))...);
    run(grid, block, smem, stream, &launcher::template body<I...>, t, &launcher::drop, (const void *)kernel, file,
        line);
  }
};

template <typename... P>
launcher<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t st, void (*kernel)(P...),
                      const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  return launcher<P...>{kernel, grid, block, smem, st, file, line};
}

}  // namespace kcsim

#define threadIdx (kcsim::g.thread_idx)
#define blockIdx (kcsim::g.block_idx)
#define blockDim (kcsim::g.block_dim)
#define gridDim (kcsim::g.grid_dim)
static constexpr int warpSize = 32;

/* }====================================================================== */

/* {======================================================================
** Vector types (CUDA's alignments: a float4 or double2 load is 16 bytes)
** ======================================================================= */

#define KCSIM_VEC1(T, N, A) \
  struct __attribute__((aligned(A))) N##1 { T x; }; \
  static inline N##1 make_##N##1(T x) { return N##1{x}; }
#define KCSIM_VEC2(T, N, A) \
  struct __attribute__((aligned(A))) N##2 { T x, y; }; \
  static inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define KCSIM_VEC3(T, N) \
  struct N##3 { T x, y, z; }; \
  static inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define KCSIM_VEC4(T, N, A) \
  struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
  static inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
#define KCSIM_VECS(T, N, A1, A2, A4) KCSIM_VEC1(T, N, A1) KCSIM_VEC2(T, N, A2) KCSIM_VEC3(T, N) KCSIM_VEC4(T, N, A4)

KCSIM_VECS(signed char, char, 1, 2, 4)
KCSIM_VECS(unsigned char, uchar, 1, 2, 4)
KCSIM_VECS(short, short, 2, 4, 8)
KCSIM_VECS(unsigned short, ushort, 2, 4, 8)
KCSIM_VECS(int, int, 4, 8, 16)
KCSIM_VEC1(unsigned, uint, 4) KCSIM_VEC2(unsigned, uint, 8) KCSIM_VEC4(unsigned, uint, 16)   /* uint3: above */
KCSIM_VECS(long, long, 8, 16, 16)
KCSIM_VECS(unsigned long, ulong, 8, 16, 16)
KCSIM_VECS(long long, longlong, 8, 16, 16)
KCSIM_VECS(unsigned long long, ulonglong, 8, 16, 16)
KCSIM_VECS(float, float, 4, 8, 16)
KCSIM_VECS(double, double, 8, 16, 16)
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

/* }====================================================================== */

/* {======================================================================
** Barriers, warp shuffles and votes
** ======================================================================= */

#define __syncthreads() ((void)kcsim::syncthreads(1, 0, __FILE__, __LINE__))
#define __syncthreads_count(p) kcsim::syncthreads((p) != 0, 1, __FILE__, __LINE__)
#define __syncthreads_and(p) kcsim::syncthreads((p) != 0, 2, __FILE__, __LINE__)
#define __syncthreads_or(p) kcsim::syncthreads((p) != 0, 3, __FILE__, __LINE__)
#define __syncwarp(...) ((void)kcsim::warp_op(kcsim::mask_or_all(__VA_ARGS__ + 0), 0, -1, 0, __FILE__, __LINE__))
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)
#define __threadfence_system() ((void)0)
#define __trap() kcsim::trap("__trap()", __FILE__, __LINE__)
#define __activemask() kcsim::active_mask()

namespace kcsim {
static inline unsigned mask_or_all(unsigned m) { return m ? m : 0xffffffffu; }
static inline unsigned lane() {
  unsigned t = g.thread_idx.x + g.block_dim.x * (g.thread_idx.y + g.block_dim.y * g.thread_idx.z);
  return t & 31;
}
template <typename T>
static inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move 4- or 8-byte values");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof v);
  return b;
}
template <typename T>
static inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof v);
  return v;
}
/* width: a power of two up to 32; segments of width lanes */
template <typename T>
static inline T shfl(unsigned mask, T v, int src_lane, int width, const char *f, int l) {
  int ln = (int)lane();
  int src = (ln & ~(width - 1)) + (src_lane & (width - 1));
  return from_bits<T>(warp_op(mask, to_bits(v), src, 0, f, l).value);
}
template <typename T>
static inline T shfl_down(unsigned mask, T v, unsigned d, int width, const char *f, int l) {
  int ln = (int)lane();
  int src = (ln & (width - 1)) + (int)d < width ? ln + (int)d : -1;
  return from_bits<T>(warp_op(mask, to_bits(v), src, 0, f, l).value);
}
template <typename T>
static inline T shfl_up(unsigned mask, T v, unsigned d, int width, const char *f, int l) {
  int ln = (int)lane();
  int src = (ln & (width - 1)) >= (int)d ? ln - (int)d : -1;
  return from_bits<T>(warp_op(mask, to_bits(v), src, 0, f, l).value);
}
template <typename T>
static inline T shfl_xor(unsigned mask, T v, int m, int width, const char *f, int l) {
  int ln = (int)lane();
  int src = ln ^ m;
  /* later segments are out of reach: the lane's own value */
  if (src >= ((ln / width) + 1) * width) src = -1;
  return from_bits<T>(warp_op(mask, to_bits(v), src, 0, f, l).value);
}
}  // namespace kcsim

/* the optional width argument, 32 when absent */
#define KCSIM_W_(w, ...) w
#define __shfl_sync(m, v, s, ...) kcsim::shfl((m), (v), (s), KCSIM_W_(__VA_ARGS__ __VA_OPT__(,) 32), __FILE__, __LINE__)
#define __shfl_down_sync(m, v, d, ...) kcsim::shfl_down((m), (v), (d), KCSIM_W_(__VA_ARGS__ __VA_OPT__(,) 32), __FILE__, __LINE__)
#define __shfl_up_sync(m, v, d, ...) kcsim::shfl_up((m), (v), (d), KCSIM_W_(__VA_ARGS__ __VA_OPT__(,) 32), __FILE__, __LINE__)
#define __shfl_xor_sync(m, v, x, ...) kcsim::shfl_xor((m), (v), (x), KCSIM_W_(__VA_ARGS__ __VA_OPT__(,) 32), __FILE__, __LINE__)
#define __ballot_sync(m, p) (kcsim::warp_op((m), 0, -1, (p) != 0, __FILE__, __LINE__).ballot)
#define __any_sync(m, p) (kcsim::warp_op((m), 0, -1, (p) != 0, __FILE__, __LINE__).ballot != 0)
#define __all_sync(m, p) kcsim::all_of((m), (p) != 0, __FILE__, __LINE__)

namespace kcsim {
static inline int all_of(unsigned m, int p, const char *f, int l) {
  /* all: no participating lane votes false */
  return warp_op(m, 0, -1, !p, f, l).ballot == 0;
}
}  // namespace kcsim

/* }====================================================================== */

/* {======================================================================
** Atomics (plain read-modify-write: emulated threads never overlap)
** ======================================================================= */

template <typename T>
static inline T atomicAdd(T *p, T v) {
  T o = *p;
  *p = o + v;
  return o;
}
template <typename T>
static inline T atomicSub(T *p, T v) {
  T o = *p;
  *p = o - v;
  return o;
}
template <typename T>
static inline T atomicExch(T *p, T v) {
  T o = *p;
  *p = v;
  return o;
}
template <typename T>
static inline T atomicMax(T *p, T v) {
  T o = *p;
  *p = v > o ? v : o;
  return o;
}
template <typename T>
static inline T atomicMin(T *p, T v) {
  T o = *p;
  *p = v < o ? v : o;
  return o;
}
template <typename T>
static inline T atomicCAS(T *p, T cmp, T v) {
  T o = *p;
  if (o == cmp) *p = v;
  return o;
}
template <typename T>
static inline T atomicAnd(T *p, T v) {
  T o = *p;
  *p = o & v;
  return o;
}
template <typename T>
static inline T atomicOr(T *p, T v) {
  T o = *p;
  *p = o | v;
  return o;
}
template <typename T>
static inline T atomicXor(T *p, T v) {
  T o = *p;
  *p = o ^ v;
  return o;
}
static inline unsigned atomicInc(unsigned *p, unsigned v) {
  unsigned o = *p;
  *p = o >= v ? 0 : o + 1;
  return o;
}
static inline unsigned atomicDec(unsigned *p, unsigned v) {
  unsigned o = *p;
  *p = (o == 0 || o > v) ? v : o - 1;
  return o;
}

/* }====================================================================== */

/* {======================================================================
** Math and bit intrinsics
** ======================================================================= */

/* CUDA's min/max: one overload set for any two arithmetic types (the
** common type, as nvcc's overloads give); std::min/max are untouched. */
template <typename A, typename B,
          typename = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
static inline typename std::common_type<A, B>::type min(A a, B b) {
  typedef typename std::common_type<A, B>::type T;
  if (std::is_floating_point<T>::value) return (T)fmin((double)a, (double)b);
  return (T)a < (T)b ? (T)a : (T)b;
}
template <typename A, typename B,
          typename = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
static inline typename std::common_type<A, B>::type max(A a, B b) {
  typedef typename std::common_type<A, B>::type T;
  if (std::is_floating_point<T>::value) return (T)fmax((double)a, (double)b);
  return (T)a > (T)b ? (T)a : (T)b;
}

static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
/* glibc declares these names itself (its internal aliases): macros */
#define __expf(x) expf(x)
#define __exp10f(x) exp10f(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __log10f(x) log10f(x)
#define __powf(x, y) powf((x), (y))
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __sincosf(x, s, c) sincosf((x), (s), (c))
#define __tanhf(x) tanhf(x)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline double __drcp_rn(double x) { return 1.0 / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline double __dsqrt_rn(double x) { return sqrt(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }   /* NaN -> 0 */
static inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
static inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752); }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
static inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
static inline int __double2int_rn(double x) { return (int)nearbyint(x); }
static inline long long __double2ll_rn(double x) { return (long long)nearbyint(x); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline float __uint2float_rn(unsigned x) { return (float)x; }
static inline double __ll2double_rn(long long x) { return (double)x; }
static inline float __ll2float_rn(long long x) { return (float)x; }

static inline float __int_as_float(int x) { return kcsim::from_bits<float>((uint32_t)x); }
static inline int __float_as_int(float x) { return (int)(uint32_t)kcsim::to_bits(x); }
static inline float __uint_as_float(unsigned x) { return kcsim::from_bits<float>(x); }
static inline unsigned __float_as_uint(float x) { return (unsigned)kcsim::to_bits(x); }
static inline long long __double_as_longlong(double x) { return (long long)kcsim::to_bits(x); }
static inline double __longlong_as_double(long long x) { return kcsim::from_bits<double>((uint64_t)x); }
static inline int __double2hiint(double x) { return (int)(kcsim::to_bits(x) >> 32); }
static inline int __double2loint(double x) { return (int)(uint32_t)kcsim::to_bits(x); }
static inline double __hiloint2double(int hi, int lo) {
  return kcsim::from_bits<double>(((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo);
}

template <typename T>
static inline T __ldg(const T *p) { return *p; }
template <typename T>
static inline T __ldcs(const T *p) { return *p; }
template <typename T>
static inline void __stcs(T *p, T v) { *p = v; }

static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
static inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
static inline int __mul24(int a, int b) { return a * b; }
static inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }
static inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  s &= 31;
  return s ? (hi << s) | (lo >> (32 - s)) : hi;
}
static inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  s &= 31;
  return s ? (lo >> s) | (hi << (32 - s)) : lo;
}

/* }====================================================================== */

#endif
