/*
** test_sim.cu: a self-test of the CUDA simulator (kernels/sim/). Small
** kernels pin down what kcsim.h promises kernel code: the order in which
** blocks and threads run (KEEL_CUDA_SIM_ORDER, switched here through
** kcsim::sim_set_order), what a race and a barrier give in each order,
** the launch failures the scheduler reports, shuffles and votes, shared
** memory that starts each block as 0xFF bytes, grid-stride loops that go
** round, work held in its stream until the host waits (KEEL_CUDA_SIM_ASYNC,
** switched through kcsim::sim_set_async). The specs test the real kernels on the simulator; this tests the
** simulator, so that a change to it that breaks a promise fails here and
** not as a kernel bug that the specs no longer see.
**
** Compiled exactly like the kernels' .cu files (g++ -x c++ -include kcsim.h with
** kernels/cuda.mk's SIMFLAGS) and linked with the simulator's own objects
** (the plugin's symbols are hidden) into build/<cfg>/bin/kcsim_test, which
** tools/test.sh runs. Prints one line per check and ends with
** "N passed, N failed"; the exit status is non-zero when a check failed.
** Tests that do not choose an order run in the environment's, and every
** test waits before it looks (cudaDeviceSynchronize), so it passes with
** launches run when the host waits too (KEEL_CUDA_SIM_ASYNC).
*/
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "common.cuh"
#include "sim_internal.h"

static int n_pass, n_fail;

/* One check: a line "ok ..." or "FAIL ...: detail". */
static void check(bool ok, const char *what, const char *fmt = NULL, ...) __attribute__((format(printf, 3, 4)));
static void check(bool ok, const char *what, const char *fmt, ...) {
  if (ok) {
    n_pass++;
    printf("ok   %s\n", what);
    return;
  }
  n_fail++;
  printf("FAIL %s", what);
  if (fmt) {
    va_list ap;
    va_start(ap, fmt);
    printf(": ");
    vprintf(fmt, ap);
    va_end(ap);
  }
  printf("\n");
}

/* {======================================================================
** Device buffers and launches
** ======================================================================= */

/* n elements of device memory, zeroed; a test cannot go on without it */
template <typename T>
static T *dev_zeros(size_t n) {
  void *p = NULL;
  if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess || cudaMemset(p, 0, n * sizeof(T)) != cudaSuccess) {
    printf("FAIL cudaMalloc of %zu bytes\n%d passed, %d failed\n", n * sizeof(T), n_pass, n_fail + 1);
    exit(1);
  }
  return (T *)p;
}

template <typename T>
static std::vector<T> fetch(const T *d, size_t n) {
  std::vector<T> h(n);
  cudaError_t e = cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) check(false, "cudaMemcpy to the host", "%s", cudaGetErrorString(e));
  return h;
}

/* Waits for the launches so far; the first failure among them. A launch
** may run at once or when the host waits (KEEL_CUDA_SIM_ASYNC): its
** failure is then the launch error or the wait's, as on a GPU. */
static cudaError_t finish(void) {
  cudaError_t w = cudaDeviceSynchronize(), l = cudaGetLastError();
  return w != cudaSuccess ? w : l;
}

/* the launches so far succeeded */
static void launched(const char *what) {
  cudaError_t e = finish();
  check(e == cudaSuccess, what, "launch failed: %s", cudaGetErrorString(e));
}

/* e (from finish) is code, and its message holds each of the
** NULL-terminated strings that follow */
static void failed_with(const char *what, cudaError_t e, cudaError_t code, ...) {
  const char *msg = cudaGetErrorString(e);
  va_list ap;
  const char *s;
  char missing[256] = "";
  va_start(ap, code);
  while ((s = va_arg(ap, const char *)) != NULL)
    if (!strstr(msg, s) && !missing[0]) snprintf(missing, sizeof missing, "%s", s);
  va_end(ap);
  check(e == code && !missing[0], what, "got %s (%s)%s%s", cudaGetErrorName(e), msg,
        missing[0] ? ", expected it to name " : "", missing);
  check(cudaGetLastError() == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess,
        "the failure is reported once");
}

static void set_order(const char *order) {
  if (kcsim::sim_set_order(order) != 0) check(false, "sim_set_order", "%s rejected", order);
}

/* "test_sim.cu:<line>": how the scheduler names a site */
static const char *site(int line) {
  static char buf[4][32];
  static int k;
  k = (k + 1) % 4;
  snprintf(buf[k], sizeof buf[k], "test_sim.cu:%d", line);
  return buf[k];
}

/* The lines of the barriers, shuffles and traps the kernels below reach,
** for the failure reports (emulated threads share the host's memory).
** AT(x), on the line of the call it marks. */
static int line_a, line_b, line_launch;
#define AT(x) (x = __LINE__)

/* }====================================================================== */

/* {======================================================================
** Order of blocks and threads
** ======================================================================= */

/* Thread 0 of each block takes the next slot of *next and writes its
** block's linear index there (x fastest): the order the blocks ran in. */
__global__ void block_order(int *next, int *seq) {
  if (threadIdx.x == 0) {
    int k = atomicAdd(next, 1);
    seq[k] = (int)(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
  }
}

/* Each thread takes the next slot of next[0] and writes its index there,
** then after a barrier the next slot of next[1]: the order the threads
** ran in, before and after the barrier. */
__global__ void thread_order(int *next, int *seq) {
  int t = (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  int nt = (int)(blockDim.x * blockDim.y * blockDim.z);
  seq[atomicAdd(&next[0], 1)] = t;
  __syncthreads();
  seq[nt + atomicAdd(&next[1], 1)] = t;
}

static bool is_permutation(const std::vector<int> &v, size_t off, size_t n) {
  std::vector<char> seen(n, 0);
  for (size_t k = 0; k < n; k++) {
    int x = v[off + k];
    if (x < 0 || (size_t)x >= n || seen[x]) return false;
    seen[x] = 1;
  }
  return true;
}

static void test_block_order(void) {
  const dim3 grid(3, 2, 4);
  const int nb = 3 * 2 * 4;
  int *next = dev_zeros<int>(1), *seq = dev_zeros<int>(nb);
  std::vector<int> fwd, rev;
  int moved = 0;

  set_order("forward");
  KC_LAUNCH(grid, dim3(4), 0, 0, block_order)(next, seq);
  launched("block order: forward launch");
  fwd = fetch(seq, nb);
  bool ok = true;
  for (int k = 0; k < nb; k++) ok = ok && fwd[k] == k;
  check(ok, "forward: blocks run in linear order, x fastest, then y, z", "second block ran: %d", fwd[1]);

  set_order("reverse");
  cudaMemset(next, 0, sizeof(int));
  KC_LAUNCH(grid, dim3(4), 0, 0, block_order)(next, seq);
  launched("block order: reverse launch");
  rev = fetch(seq, nb);
  ok = true;
  for (int k = 0; k < nb; k++) ok = ok && rev[k] == nb - 1 - k;
  check(ok, "reverse: blocks run in reverse linear order, block 0 last", "first block ran: %d", rev[0]);

  for (int seed = 1; seed <= 4; seed++) {
    char order[32];
    snprintf(order, sizeof order, "shuffle:%d", seed);
    set_order(order);
    cudaMemset(next, 0, sizeof(int));
    KC_LAUNCH(grid, dim3(4), 0, 0, block_order)(next, seq);
    launched("block order: shuffled launch");
    std::vector<int> sh = fetch(seq, nb);
    check(is_permutation(sh, 0, nb), "shuffle: every block of a 3x2x4 grid runs exactly once", "%s", order);
    if (sh != fwd && sh != rev) moved++;
  }
  check(moved > 0, "shuffle: some seed's block order is neither forward nor reverse");
  cudaFree(next);
  cudaFree(seq);
}

/* The order a block of 8x4x2 threads ran in under order, before and
** after a barrier (thread_order's seq, 2 * 64 entries). */
static std::vector<int> thread_order_in(const char *order, int *next, int *seq, int nt) {
  char what[64];
  set_order(order);
  cudaMemset(next, 0, 2 * sizeof(int));
  KC_LAUNCH(dim3(1), dim3(8, 4, 2), 0, 0, thread_order)(next, seq);
  snprintf(what, sizeof what, "thread order: %s launch", order);
  launched(what);
  return fetch(seq, 2 * nt);
}

static void test_thread_order(void) {
  const int nt = 8 * 4 * 2;
  int *next = dev_zeros<int>(2), *seq = dev_zeros<int>(2 * nt);

  std::vector<int> v = thread_order_in("forward", next, seq, nt);
  bool ok = true;
  for (int k = 0; k < 2 * nt; k++) ok = ok && v[k] == k % nt;
  check(ok, "forward: a block's threads run in linear order, before and after a barrier");

  v = thread_order_in("reverse", next, seq, nt);
  ok = true;
  for (int k = 0; k < 2 * nt; k++) ok = ok && v[k] == nt - 1 - k % nt;
  check(ok, "reverse: a block's threads run in reverse linear order, before and after a barrier");

  v = thread_order_in("shuffle:7", next, seq, nt);
  check(is_permutation(v, 0, nt) && is_permutation(v, nt, nt), "shuffle: every thread runs once in each round");
  bool same = true, linear = true;
  for (int k = 0; k < nt; k++) {
    same = same && v[k] == v[nt + k];
    linear = linear && v[k] == k;
  }
  check(!linear && !same, "shuffle: a new order in each round between barriers, not the linear one");
  cudaFree(next);
  cudaFree(seq);
}

/* Thread t writes s[t], then reads s[t + 1]: a race without the barrier
** (the neighbour may not have written yet), none with it. */
template <bool BARRIER>
__global__ void neighbour(int *out) {
  KC_SHARED(int, s, [64]);
  int t = (int)threadIdx.x;
  s[t] = t + 1;
  if (BARRIER) __syncthreads();
  out[t] = t + 1 < (int)blockDim.x ? s[t + 1] : 0;
}

static void test_race(void) {
  const int nt = 64;
  int *out = dev_zeros<int>(nt);
  const char *orders[] = {"forward", "reverse", "shuffle:1", "shuffle:2", "shuffle:3"};
  std::vector<int> got[5];

  for (int k = 0; k < 5; k++) {
    set_order(orders[k]);
    KC_LAUNCH(dim3(1), dim3(nt), 0, 0, neighbour<false>)(out);
    launched("race: launch");
    got[k] = fetch(out, nt);
  }
  bool fwd_fresh = true, rev_written = true, mixed_fresh = false, mixed_written = false;
  for (int t = 0; t + 1 < nt; t++) {
    fwd_fresh = fwd_fresh && got[0][t] == -1;
    rev_written = rev_written && got[1][t] == t + 2;
    mixed_fresh = mixed_fresh || got[2][t] == -1;
    mixed_written = mixed_written || got[2][t] == t + 2;
  }
  check(fwd_fresh, "race, forward: each thread reads its neighbour's slot before the neighbour wrote it (0xFF)",
        "thread 0 read %d", got[0][0]);
  check(rev_written, "race, reverse: each thread reads its neighbour's slot after the neighbour wrote it",
        "thread 0 read %d", got[1][0]);
  check(got[0] != got[1], "race: forward and reverse order give different results");
  check(mixed_fresh && mixed_written, "race, shuffle: some threads read before their neighbour wrote, some after");

  for (int k = 0; k < 5; k++) {
    set_order(orders[k]);
    KC_LAUNCH(dim3(1), dim3(nt), 0, 0, neighbour<true>)(out);
    launched("barrier: launch");
    got[k] = fetch(out, nt);
  }
  bool ok = true;
  for (int t = 0; t < nt; t++) ok = ok && got[0][t] == (t + 1 < nt ? t + 2 : 0);
  check(ok, "barrier, forward: every thread reads what its neighbour wrote");
  for (int k = 1; k < 5; k++) {
    char what[96];
    snprintf(what, sizeof what, "barrier, %s: the same results as forward", orders[k]);
    check(got[k] == got[0], what);
  }
  cudaFree(out);
}

/* }====================================================================== */

/* {======================================================================
** Failure reports
** ======================================================================= */

/* the two halves of the block at two different barriers */
__global__ void divergent(int *out) {
  if (threadIdx.x < 16) {
    AT(line_a), __syncthreads();
  } else {
    AT(line_b), __syncthreads();
  }
  out[threadIdx.x] = 1;
}

/* the first half of the warp at a shuffle, the second at a barrier */
__global__ void warp_vs_block(int *out) {
  int v = (int)threadIdx.x;
  if (threadIdx.x < 16) {
    AT(line_a), v = __shfl_sync(0xffffffffu, v, 0);
  } else {
    AT(line_b), __syncthreads();
  }
  out[threadIdx.x] = v;
}

/* Two warp ops whose masks each name a lane waiting at the other: neither
** can go (on a GPU: undefined, a hang). */
__global__ void crossed_masks(int *out) {
  int v = (int)threadIdx.x;
  if (threadIdx.x < 16) {
    AT(line_a), v = __shfl_sync(0xffffffffu, v, 0);
  } else {
    v = __shfl_sync(0xffff0001u, v, 0);
  }
  out[threadIdx.x] = v;
}

/* thread 37 of block (1,1,0) traps while the rest of its block waits at
** a barrier */
__global__ void trapping(int *out) {
  if (blockIdx.x == 1 && blockIdx.y == 1 && threadIdx.x == 37) {
    AT(line_a), __trap();
  }
  __syncthreads();
  out[threadIdx.x] = 1;
}

static void test_failures(void) {
  int *out = dev_zeros<int>(64);
  char buf[128];
  cudaError_t e;

  /* the sites are known once the kernel ran: after finish() */
  AT(line_launch), KC_LAUNCH(dim3(2), dim3(32), 0, 0, divergent)(out);
  e = finish();
  snprintf(buf, sizeof buf, "launched at %s", site(line_launch));
  failed_with("divergent __syncthreads: the launch fails naming the launch and both barriers", e,
              cudaErrorLaunchFailure, "divergent __syncthreads", buf, site(line_a), site(line_b), (char *)NULL);

  AT(line_launch), KC_LAUNCH(dim3(1), dim3(32), 0, 0, warp_vs_block)(out);
  e = finish();
  snprintf(buf, sizeof buf, "launched at %s", site(line_launch));
  failed_with("a warp op waiting for lanes at __syncthreads: the launch fails naming both sites", e,
              cudaErrorLaunchFailure, buf, "waits at a warp op", site(line_a), "waits at __syncthreads", site(line_b),
              (char *)NULL);

  AT(line_launch), KC_LAUNCH(dim3(1), dim3(32), 0, 0, crossed_masks)(out);
  e = finish();
  snprintf(buf, sizeof buf, "launched at %s", site(line_launch));
  failed_with("a warp op waiting for lanes that never reach one with its mask: the launch fails naming it", e,
              cudaErrorLaunchFailure, buf, "waits at a warp op", site(line_a), "mask 0xffffffff", "never reach one",
              (char *)NULL);

  KC_LAUNCH(dim3(3, 2), dim3(64), 0, 0, trapping)(out);
  e = finish();
  failed_with("__trap: the launch fails naming the site, the thread and the block", e, cudaErrorLaunchFailure,
              "__trap()", site(line_a), "thread (37,0,0) of block (1,1,0)", (char *)NULL);

  KC_LAUNCH(dim3(1), dim3(2048), 0, 0, divergent)(out);
  failed_with("a block of 2048 threads: invalid configuration", finish(), cudaErrorInvalidConfiguration,
              "invalid launch configuration", (char *)NULL);
  KC_LAUNCH(dim3(1), dim3(32), KCSIM_SMEM_DEFAULT + 1, 0, divergent)(out);
  failed_with("dynamic shared memory past the limit: invalid value", finish(), cudaErrorInvalidValue,
              "dynamic shared memory", (char *)NULL);

  /* the threads stopped mid-kernel are dropped: the next launch runs */
  KC_LAUNCH(dim3(1), dim3(64), 0, 0, neighbour<true>)(out);
  launched("after the failures, a launch succeeds");
  std::vector<int> got = fetch(out, 64);
  bool ok = true;
  for (int t = 0; t < 64; t++) ok = ok && got[t] == (t + 1 < 64 ? t + 2 : 0);
  check(ok, "after the failures, a kernel with a barrier gives its results");
  cudaFree(out);
}

/* }====================================================================== */

/* {======================================================================
** Warp shuffles and votes, block votes
** ======================================================================= */

enum {
  SH_IDX, SH_DOWN, SH_UP, SH_XOR, SH_DOWN_W8, SH_IDX_W8, SH_OUTSIDE, SH_BALLOT, SH_ANY, SH_ANY0, SH_ALL,
  SH_ALL0, SH_BALLOT_PART, SH_N
};

/* one warp; out[k][lane] for each case k above */
__global__ void shuffles(int *out) {
  const unsigned full = 0xffffffffu;
  int l = (int)threadIdx.x;
  int *o = out;
  o[SH_IDX * 32 + l] = __shfl_sync(full, l * 10, (l + 3) & 31);
  o[SH_DOWN * 32 + l] = __shfl_down_sync(full, l, 5);
  o[SH_UP * 32 + l] = __shfl_up_sync(full, l, 2);
  o[SH_XOR * 32 + l] = __shfl_xor_sync(full, l, 6);
  o[SH_DOWN_W8 * 32 + l] = __shfl_down_sync(full, l, 1, 8);
  o[SH_IDX_W8 * 32 + l] = __shfl_sync(full, l, 3, 8);
  /* each half reads a lane of the other half, which is not in its group */
  if (l < 16) o[SH_OUTSIDE * 32 + l] = __shfl_sync(0x0000ffffu, l, l + 16);
  else o[SH_OUTSIDE * 32 + l] = __shfl_sync(0xffff0000u, l, l - 16);
  o[SH_BALLOT * 32 + l] = (int)__ballot_sync(full, l % 3 == 0);
  o[SH_ANY * 32 + l] = __any_sync(full, l == 17);
  o[SH_ANY0 * 32 + l] = __any_sync(full, 0);
  o[SH_ALL * 32 + l] = __all_sync(full, l < 32);
  o[SH_ALL0 * 32 + l] = __all_sync(full, l != 9);
  if (l < 8) o[SH_BALLOT_PART * 32 + l] = (int)__ballot_sync(0x000000ffu, 1);
  else o[SH_BALLOT_PART * 32 + l] = (int)__ballot_sync(0xffffff00u, l & 1);
}

static int expected_shuffle(int k, int l) {
  unsigned b = 0;
  switch (k) {
    case SH_IDX: return ((l + 3) & 31) * 10;
    case SH_DOWN: return l + 5 < 32 ? l + 5 : l;
    case SH_UP: return l >= 2 ? l - 2 : l;
    case SH_XOR: return l ^ 6;
    case SH_DOWN_W8: return (l & 7) + 1 < 8 ? l + 1 : l;
    case SH_IDX_W8: return (l & ~7) + 3;
    case SH_OUTSIDE: return -1;
    case SH_BALLOT:
      for (int i = 0; i < 32; i += 3) b |= 1u << i;
      return (int)b;
    case SH_ANY: return 1;
    case SH_ANY0: return 0;
    case SH_ALL: return 1;
    case SH_ALL0: return 0;
    case SH_BALLOT_PART: return l < 8 ? 0xff : (int)0xaaaaaa00u;
  }
  return 0;
}

/* lanes 24.. finish at once; the rest read 8 lanes down, then ask which
** lanes are unfinished (the simulator's answer: the lanes not finished
** yet, so lanes of the warp that ran on to their end are missing too) */
__global__ void shfl_finished(int *out) {
  int l = (int)threadIdx.x;
  if (l >= 24) return;
  out[l] = __shfl_down_sync(0xffffffffu, l, 8);
  out[32 + l] = (int)__activemask();
}

/* a block of 20 threads: a warp of 20 lanes */
__global__ void shfl_short(int *out) {
  int l = (int)threadIdx.x;
  out[l] = __shfl_down_sync(0xffffffffu, l, 4);
}

/* eight-byte values go through whole */
__global__ void shfl_double(double *out) {
  double v = 1.0 / (threadIdx.x + 3);
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 1);
}

/* 100 threads (a short last warp); the last 10 finish first */
__global__ void block_votes(int *out) {
  int t = (int)threadIdx.x, n = 100;
  out[0 * n + t] = __syncthreads_count(t % 3 == 0);
  out[1 * n + t] = __syncthreads_and(t < 100);
  out[2 * n + t] = __syncthreads_and(t != 42);
  out[3 * n + t] = __syncthreads_or(t == 99);
  out[4 * n + t] = __syncthreads_or(0);
  if (t >= 90) return;
  out[5 * n + t] = __syncthreads_count(1);
  out[6 * n + t] = __syncthreads_and(t < 90);
}

static void test_shuffles(void) {
  int *out = dev_zeros<int>(SH_N * 32);
  static const char *names[SH_N] = {
    "__shfl_sync reads the source lane", "__shfl_down_sync: lanes past the end keep their value",
    "__shfl_up_sync: lanes before the start keep their value", "__shfl_xor_sync reads lane ^ mask",
    "__shfl_down_sync, width 8: stays within its 8 lanes", "__shfl_sync, width 8: lane 3 of its 8",
    "a shuffle reading a lane outside its group gets all-ones bits", "__ballot_sync: the lanes voting true",
    "__any_sync: one lane true", "__any_sync: none true", "__all_sync: all true", "__all_sync: one false",
    "__ballot_sync within a partial mask: that mask's lanes only"};
  KC_LAUNCH(dim3(1), dim3(32), 0, 0, shuffles)(out);
  launched("shuffles: launch");
  std::vector<int> got = fetch(out, SH_N * 32);
  for (int k = 0; k < SH_N; k++) {
    int bad = -1;
    for (int l = 0; l < 32 && bad < 0; l++)
      if (got[k * 32 + l] != expected_shuffle(k, l)) bad = l;
    check(bad < 0, names[k], "lane %d got 0x%x, expected 0x%x", bad, bad < 0 ? 0 : got[k * 32 + bad],
          bad < 0 ? 0 : expected_shuffle(k, bad));
  }
  cudaFree(out);

  out = dev_zeros<int>(64);
  KC_LAUNCH(dim3(1), dim3(32), 0, 0, shfl_finished)(out);
  launched("a warp op with finished lanes in its mask goes on without them");
  got = fetch(out, 64);
  bool ok = true;
  int bad = -1;
  for (int l = 0; l < 24; l++) {
    ok = ok && got[l] == (l < 16 ? l + 8 : -1);
    unsigned m = (unsigned)got[32 + l];
    if (bad < 0 && ((m & 0xff000000u) || !(m >> l & 1u))) bad = l;
  }
  check(ok, "a shuffle reading a finished lane gets all-ones bits, the others their source");
  check(bad < 0, "__activemask: the lane itself, never a finished lane", "lane %d got 0x%08x", bad, bad < 0 ? 0 : (unsigned)got[32 + bad]);

  KC_LAUNCH(dim3(1), dim3(20), 0, 0, shfl_short)(out);
  launched("shuffle in a warp of 20 lanes: launch");
  got = fetch(out, 20);
  ok = true;
  for (int l = 0; l < 20; l++) ok = ok && got[l] == (l < 16 ? l + 4 : -1);
  check(ok, "a shuffle reading a lane past the block gets all-ones bits");
  cudaFree(out);

  double *d = dev_zeros<double>(32);
  KC_LAUNCH(dim3(1), dim3(32), 0, 0, shfl_double)(d);
  launched("double shuffle: launch");
  std::vector<double> dv = fetch(d, 32);
  ok = true;
  for (int l = 0; l < 32; l++) ok = ok && dv[l] == 1.0 / ((l ^ 1) + 3);
  check(ok, "a double goes through a shuffle bit for bit");
  cudaFree(d);

  out = dev_zeros<int>(7 * 100);
  KC_LAUNCH(dim3(1), dim3(100), 0, 0, block_votes)(out);
  launched("block votes: launch");
  got = fetch(out, 7 * 100);
  static const struct { const char *what; int want, n; } votes[7] = {
    {"__syncthreads_count: the threads voting true", 34, 100},
    {"__syncthreads_and: all true", 1, 100},
    {"__syncthreads_and: one false", 0, 100},
    {"__syncthreads_or: one true", 1, 100},
    {"__syncthreads_or: none true", 0, 100},
    {"__syncthreads_count: finished threads do not vote", 90, 90},
    {"__syncthreads_and: finished threads do not vote", 1, 90},
  };
  for (int k = 0; k < 7; k++) {
    int bad = -1;
    for (int t = 0; t < votes[k].n && bad < 0; t++)
      if (got[k * 100 + t] != votes[k].want) bad = t;
    check(bad < 0, votes[k].what, "thread %d got %d", bad, bad < 0 ? 0 : got[k * 100 + bad]);
  }
  cudaFree(out);
}

/* }====================================================================== */

/* {======================================================================
** Shared memory starts each block as 0xFF bytes
** ======================================================================= */

enum { SM_WORDS = 10 };   /* 8 of the array, 2 of the double */

/* Thread 0 copies out the static shared memory as the block found it,
** then every thread writes it (what the next block must not see). */
__global__ void smem_static(unsigned *out) {
  KC_SHARED(unsigned, s, [8]);
  KC_SHARED(double, d);
  unsigned *o = out + blockIdx.x * SM_WORDS;
  if (threadIdx.x == 0) {
    for (int i = 0; i < 8; i++) o[i] = s[i];
    o[8] = (unsigned)__double2loint(d);
    o[9] = (unsigned)__double2hiint(d);
  }
  __syncthreads();
  s[threadIdx.x % 8] = blockIdx.x;
  d = blockIdx.x;
}

/* The same with the dynamic buffer (64 bytes). */
__global__ void smem_dynamic(unsigned *out) {
  KC_DYN_SMEM(unsigned, s);
  unsigned *o = out + blockIdx.x * 16;
  if (threadIdx.x == 0)
    for (int i = 0; i < 16; i++) o[i] = s[i];
  __syncthreads();
  s[threadIdx.x % 16] = blockIdx.x;
}

/* Thread 0 writes, the others reach the declaration after it (in the
** forward order): the block's first filling is its only one. */
__global__ void smem_kept(int *out) {
  KC_SHARED(int, s, [1]);
  if (threadIdx.x == 0) s[0] = 7 + (int)blockIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[0];
}

static bool all_ones(const std::vector<unsigned> &v) {
  for (unsigned x : v)
    if (x != 0xffffffffu) return false;
  return true;
}

static void test_shared(void) {
  const int nb = 3;
  unsigned *out = dev_zeros<unsigned>(nb * 16);
  for (int launch = 1; launch <= 2; launch++) {
    KC_LAUNCH(dim3(nb), dim3(32), 0, 0, smem_static)(out);
    launched("static shared memory: launch");
    check(all_ones(fetch(out, nb * SM_WORDS)),
          launch == 1 ? "KC_SHARED: an array and a scalar start each block as 0xFF bytes"
                      : "KC_SHARED: and each block of the next launch");
  }
  for (int launch = 1; launch <= 2; launch++) {
    KC_LAUNCH(dim3(nb), dim3(32), 64, 0, smem_dynamic)(out);
    launched("dynamic shared memory: launch");
    check(all_ones(fetch(out, nb * 16)),
          launch == 1 ? "KC_DYN_SMEM: starts each block as 0xFF bytes" : "KC_DYN_SMEM: and each block of the next launch");
  }
  cudaFree(out);

  int *kept = dev_zeros<int>(nb * 32);
  const char *orders[] = {"forward", "reverse"};
  for (int k = 0; k < 2; k++) {
    set_order(orders[k]);
    KC_LAUNCH(dim3(nb), dim3(32), 0, 0, smem_kept)(kept);
    launched("shared memory written by one thread: launch");
    std::vector<int> got = fetch(kept, nb * 32);
    bool ok = true;
    for (int i = 0; i < nb * 32; i++) ok = ok && got[i] == 7 + i / 32;
    char what[128];
    snprintf(what, sizeof what, "KC_SHARED, %s: filled once per block, not again as later threads reach it",
             orders[k]);
    check(ok, what, "thread 1 of block 0 read %d", got[1]);
  }
  cudaFree(kept);
}

/* }====================================================================== */

/* {======================================================================
** Grid-stride loops go round (kernels/cuda.mk: -DKC_MAX_BLOCKS=7)
** ======================================================================= */

__global__ void stride_count(int64_t n, int *hits, int *rounds) {
  int r = 0;
  KC_GRID_LOOP(i, n) {
    hits[i]++;
    r++;
  }
  rounds[blockIdx.x * blockDim.x + threadIdx.x] = r;
}

static void test_grid_stride(void) {
  const int64_t n = 10 * 7 * KC_THREADS + 5;
  unsigned nb = kc_blocks(n);
  check(nb == 7, "kc_blocks caps a grid at KC_MAX_BLOCKS = 7", "got %u", nb);
  int *hits = dev_zeros<int>((size_t)n), *rounds = dev_zeros<int>((size_t)nb * KC_THREADS);
  KC_LAUNCH(dim3(nb), dim3(KC_THREADS), 0, 0, stride_count)(n, hits, rounds);
  launched("grid-stride loop: launch");
  std::vector<int> h = fetch(hits, (size_t)n), r = fetch(rounds, (size_t)nb * KC_THREADS);
  bool once = true;
  int most = 0;
  for (int64_t i = 0; i < n; i++) once = once && h[i] == 1;
  for (int x : r) most = x > most ? x : most;
  check(once, "KC_GRID_LOOP: every element exactly once");
  check(most == 11, "KC_GRID_LOOP: threads go round (11 times for 10 grids and 5 elements)", "most: %d", most);
  cudaFree(hits);
  cudaFree(rounds);
}

/* }====================================================================== */

/* {======================================================================
** Work held until the host waits (KEEL_CUDA_SIM_ASYNC, sim_stream.cpp)
** ======================================================================= */

__global__ void set_int(int *p, int v) { p[0] = v; }
__global__ void copy_int(int *dst, const int *src) { dst[0] = src[0]; }
__global__ void trap_now(void) { __trap(); }

static int peek(const int *d) { return d[0]; }   /* device memory is host memory here */

static void test_async(void) {
  cudaStream_t st, st2, blocking;
  cudaEvent_t ev;
  int *d = dev_zeros<int>(4), *pinned = NULL, pageable[1];
  int prev = kcsim::sim_set_async(1);
  if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess ||
      cudaStreamCreateWithFlags(&st2, cudaStreamNonBlocking) != cudaSuccess ||
      cudaStreamCreateWithFlags(&blocking, cudaStreamDefault) != cudaSuccess || cudaEventCreate(&ev) != cudaSuccess ||
      cudaMallocHost((void **)&pinned, sizeof(int)) != cudaSuccess) {
    check(false, "async: streams, an event and page-locked memory");
    return;
  }

  /* a launch waits in its stream until the host waits for it */
  KC_LAUNCH(dim3(1), dim3(1), 0, st, set_int)(d, 1);
  check(cudaGetLastError() == cudaSuccess && peek(d) == 0, "async: a launch has not run when it returns",
        "d[0] = %d", peek(d));
  check(cudaStreamQuery(st) == cudaErrorNotReady, "async: the stream is busy");
  (void)cudaGetLastError();
  check(cudaStreamSynchronize(st) == cudaSuccess && peek(d) == 1, "async: the stream's wait runs it");
  check(cudaStreamQuery(st) == cudaSuccess, "async: then the stream is idle");

  /* events: not ready when asked once; ready after a wait, or after the
  ** host keeps asking */
  KC_LAUNCH(dim3(1), dim3(1), 0, st, set_int)(d, 2);
  cudaEventRecord(ev, st);
  check(cudaEventQuery(ev) == cudaErrorNotReady && peek(d) == 1, "async: an event behind a launch is not ready");
  (void)cudaGetLastError();
  check(cudaEventSynchronize(ev) == cudaSuccess && peek(d) == 2 && cudaEventQuery(ev) == cudaSuccess,
        "async: its wait runs the work before it");
  KC_LAUNCH(dim3(1), dim3(1), 0, st, set_int)(d, 3);
  cudaEventRecord(ev, st);
  int polls = 0;
  while (cudaEventQuery(ev) == cudaErrorNotReady && polls < 1000) polls++;
  (void)cudaGetLastError();
  check(polls > 1 && polls < 1000 && peek(d) == 3, "async: a host polling in a loop sees the device catch up",
        "%d polls, d[0] = %d", polls, peek(d));

  /* copies: from page-locked memory the source is read when the copy runs,
  ** from pageable memory when it is queued */
  *pinned = 10;
  cudaMemcpyAsync(d, pinned, sizeof(int), cudaMemcpyHostToDevice, st);
  *pinned = 11;
  cudaStreamSynchronize(st);
  check(peek(d) == 11, "async: a copy from page-locked memory reads it when it runs", "d[0] = %d", peek(d));
  pageable[0] = 20;
  cudaMemcpyAsync(d, pageable, sizeof(int), cudaMemcpyHostToDevice, st);
  pageable[0] = 21;
  cudaStreamSynchronize(st);
  check(peek(d) == 20, "async: a copy from pageable memory takes its bytes at once", "d[0] = %d", peek(d));
  /* into page-locked memory: poisoned until it runs; into pageable: there
  ** when the call returns */
  *pinned = 5;
  cudaMemcpyAsync(pinned, d, sizeof(int), cudaMemcpyDeviceToHost, st);
  check(*pinned == -1, "async: a copy into page-locked memory reads -1 before the wait", "%d", *pinned);
  cudaStreamSynchronize(st);
  check(*pinned == 20, "async: and its value after", "%d", *pinned);
  KC_LAUNCH(dim3(1), dim3(1), 0, st, set_int)(d, 30);
  pageable[0] = 0;
  cudaMemcpyAsync(pageable, d, sizeof(int), cudaMemcpyDeviceToHost, st);
  check(pageable[0] == 30, "async: a copy into pageable memory waits for the work before it", "%d", pageable[0]);

  /* streams: one waits for another's event; cudaMemcpy (the legacy
  ** stream) waits for blocking streams, not for non-blocking ones */
  KC_LAUNCH(dim3(1), dim3(1), 0, st, set_int)(d, 40);
  cudaEventRecord(ev, st);
  cudaStreamWaitEvent(st2, ev, 0);
  KC_LAUNCH(dim3(1), dim3(1), 0, st2, copy_int)(d + 1, d);
  cudaStreamSynchronize(st2);
  check(peek(d + 1) == 40, "async: a stream waiting on an event runs after the work before the record",
        "d[1] = %d", peek(d + 1));
  KC_LAUNCH(dim3(1), dim3(1), 0, st, set_int)(d + 2, 50);
  KC_LAUNCH(dim3(1), dim3(1), 0, blocking, set_int)(d + 3, 60);
  int got[4] = {0, 0, 0, 0};
  cudaMemcpy(got, d, sizeof got, cudaMemcpyDeviceToHost);
  check(got[2] == 0 && got[3] == 60, "async: cudaMemcpy waits for a blocking stream, not a non-blocking one",
        "d[2] = %d, d[3] = %d", got[2], got[3]);
  cudaStreamSynchronize(st);

  /* a kernel's failure is the error of the wait that runs it */
  KC_LAUNCH(dim3(1), dim3(1), 0, st, trap_now)();
  cudaError_t at_launch = cudaGetLastError(), at_wait = cudaStreamSynchronize(st);
  check(at_launch == cudaSuccess && at_wait == cudaErrorLaunchFailure,
        "async: a trap is reported by the wait, not the launch", "launch %s, wait %s", cudaGetErrorName(at_launch),
        cudaGetErrorName(at_wait));
  (void)cudaGetLastError();
  check(cudaStreamSynchronize(st) == cudaSuccess, "async: once");

  /* off again: what is queued runs at the switch, then work runs at once */
  KC_LAUNCH(dim3(1), dim3(1), 0, st, set_int)(d, 70);
  kcsim::sim_set_async(0);
  check(peek(d) == 70, "async off: the queued work ran at the switch", "d[0] = %d", peek(d));
  KC_LAUNCH(dim3(1), dim3(1), 0, st, set_int)(d, 71);
  cudaEventRecord(ev, st);
  check(peek(d) == 71 && cudaEventQuery(ev) == cudaSuccess, "async off: a launch runs when it is queued");

  kcsim::sim_set_async(prev);
  cudaEventDestroy(ev);
  cudaStreamDestroy(st);
  cudaStreamDestroy(st2);
  cudaStreamDestroy(blocking);
  cudaFreeHost(pinned);
  cudaFree(d);
}

/* }====================================================================== */

int main(void) {
  /* the failures below are expected: no "kcsim:" line for each on stderr */
  setenv("KEEL_CUDA_SIM_QUIET", "1", 1);
  check(kcsim::sim_set_order("sideways") == -1, "sim_set_order rejects an unknown order");
  test_block_order();
  test_thread_order();
  test_race();
  set_order(NULL);   /* the rest in the environment's order: they must pass in any */
  test_failures();
  test_shuffles();
  test_shared();
  set_order(NULL);
  test_grid_stride();
  test_async();
  printf("%d passed, %d failed\n", n_pass, n_fail);
  return n_fail ? 1 : 0;
}
