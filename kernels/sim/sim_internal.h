/*
** sim_internal.h: what the simulator's own files share (not kernel code):
** the launch error slot, the per-kernel shared memory limit, counters.
*/
#ifndef KCSIM_INTERNAL_H
#define KCSIM_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "cuda_runtime.h"

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

}  // namespace kcsim

#endif
