/*
** sim_internal.h: what the simulator's own files share (not kernel code):
** the launch error slot, the per-kernel shared memory limit, counters.
*/
#ifndef KCSIM_INTERNAL_H
#define KCSIM_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <functional>

#include "cuda_runtime.h"

/* KCSIM_ASAN: built with AddressSanitizer (gcc says __SANITIZE_ADDRESS__,
** clang __has_feature); its interface comes with it */
#if defined(__SANITIZE_ADDRESS__)
#define KCSIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KCSIM_ASAN 1
#endif
#endif
#ifdef KCSIM_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define KCSIM_SMEM_DEFAULT (48 * 1024)
#define KCSIM_SMEM_OPTIN (227 * 1024)   /* an H100's opt-in maximum per block */

namespace kcsim {

/* Counters since the library was loaded (reported by KEEL_CUDA_SIM_STATS). */
struct stats {
  uint64_t launches, blocks, threads;
  /* host waits (stream, event, device synchronize) and copies by kind */
  uint64_t waits, h2d, d2h, d2d;
};
extern KCSIM_API stats sim_stats;
/* KEEL_CUDA_SIM_STATS=2: launches counted per launch site too, printed at
** exit busiest first (where a step's launches go, without a profiler). */
KCSIM_API void sim_count_site(const char *file, int line);
KCSIM_API void sim_print_sites(void);

/* The runtime's last-error slot takes a launch (or copy) failure; the
** message is what cudaGetErrorString gives for that code until the next
** failure. */
KCSIM_API void sim_set_launch_error(cudaError_t code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Dynamic shared memory a launch of kernel may use (cudaFuncSetAttribute). */
KCSIM_API size_t sim_smem_limit(const void *kernel);
/* Whether [p, p+n) lies in the bytes in use of one device allocation (all
** of it, unless kcsim_mem_in_use said less). */
KCSIM_API int sim_is_device(const void *p, size_t n);

/* The runtime's failure: kept as the last error, returned. */
KCSIM_API cudaError_t sim_fail(cudaError_t e);

/* When queued work runs (sim_stream.cpp). sim_enqueue runs work at once,
** returning its result, unless KEEL_CUDA_SIM_ASYNC is set (sim_async());
** then it queues it on st and a later wait runs it and reports its
** failure. The waits run a stream's queue, every stream's (an implicit
** device synchronization), or the legacy stream's and the blocking
** streams' (cudaMemcpy, cudaMemset), and return the first failure. */
KCSIM_API int sim_async(void);
/* Switches it (the self-test, tests/sim/): 1 on, 0 off (queued work run
** first), -1 what the environment says again; returns the mode before. */
KCSIM_API int sim_set_async(int on);
KCSIM_API cudaError_t sim_enqueue(cudaStream_t st, std::function<cudaError_t()> work);
KCSIM_API cudaError_t sim_wait_stream(cudaStream_t st);
KCSIM_API cudaError_t sim_wait_device(void);
KCSIM_API cudaError_t sim_wait_legacy(void);
/* Page-locked host memory (cudaMallocHost): async copies treat it apart. */
KCSIM_API int sim_pinned_add(void *p, size_t n);
KCSIM_API void sim_pinned_remove(void *p);
KCSIM_API int sim_is_pinned(const void *p, size_t n);

/* The order of the launches from now on, as KEEL_CUDA_SIM_ORDER gives it
** (forward, reverse, shuffle[:seed]); NULL: what the environment says
** again. -1 (order unchanged) for anything else. For the simulator's
** self-test (tests/sim/), which runs one kernel in several orders. */
KCSIM_API int sim_set_order(const char *order);

}  // namespace kcsim

#endif
