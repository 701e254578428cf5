/*
** sim_runtime.cpp: the CUDA runtime subset of cuda_runtime.h on the CPU.
** One device, "keel CUDA simulator (CPU)", reported as compute 9.0 with a
** few multiprocessors. Device memory is host memory, 256-byte aligned,
** filled with 0xFF bytes when allocated (NaN as float, -1 as int64), and
** recorded, so that cudaFree of an unknown pointer and a copy whose device
** side is not device memory fail (cudaErrorInvalidValue), as on a GPU.
** Each allocation also records how many of its bytes are in use
** (kcsim_mem_in_use, which keel's caching allocator calls: it rounds
** tensors up and keeps freed blocks): the rest is refilled with 0xFF,
** poisoned under AddressSanitizer (a kernel touching it is reported where
** it does), and out of bounds for copies and memsets.
** Streams and events: sim_stream.cpp (work runs when queued, or with
** KEEL_CUDA_SIM_ASYNC=1 when the host waits for it).
**
** Environment (read when asked):
**   KEEL_CUDA_SIM_DEVICES=0    no device (cudaErrorNoDevice)
**   KEEL_CUDA_SIM_MEMORY=n     device memory in bytes (default 8 GiB):
**                              a larger total in use is cudaErrorMemoryAllocation
**   KEEL_CUDA_SIM_SMS=n        multiprocessors reported (default 4)
**   KEEL_CUDA_SIM_QUIET=1      no "kcsim:" line on stderr for a failed launch
**   KEEL_CUDA_SIM_STATS=1      launches, blocks and threads run, host waits
**                              and copies by direction, at exit
**   KEEL_CUDA_SIM_STATS=2      also the launches per launch site (file:line),
**                              busiest first
**   KEEL_CUDA_SIM_ASYNC=1      queued work runs when the host waits for it
**                              (sim_stream.cpp)
**   KEEL_CUDA_SIM_ORDER=...    the order of blocks and threads (kcsim.h)
*/
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "kcsim.h"
#include "sim_internal.h"

namespace kcsim {

stats sim_stats;

static thread_local cudaError_t last_error = cudaSuccess;
static std::mutex mem_lock;
struct dblock {
  size_t size;                  /* as allocated */
  size_t used;                  /* the leading bytes in use (kcsim_mem_in_use; size until then) */
};
static std::map<uintptr_t, dblock> *blocks;   /* device allocations by base */
static std::map<const void *, int> *smem_limits;
static size_t in_use;
static int device;
static char detail[1100];
static cudaError_t detail_code;

static cudaError_t fail(cudaError_t e) {
  if (e == cudaSuccess) return e;
  last_error = e;
  /* an older explanation of the same code is not this failure's */
  if (e == detail_code) detail_code = cudaSuccess;
  return e;
}

/* a queued failure was explained when it ran: its wait keeps that */
cudaError_t sim_fail(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}

static long long env_ll(const char *name, long long def) {
  const char *s = getenv(name);
  return s && *s ? strtoll(s, NULL, 10) : def;
}

static size_t total_memory(void) {
  long long m = env_ll("KEEL_CUDA_SIM_MEMORY", 8LL << 30);
  return m > 0 ? (size_t)m : (size_t)(8LL << 30);
}

static int devices(void) { return (int)env_ll("KEEL_CUDA_SIM_DEVICES", 1); }

static void print_stats(void) {
  fprintf(stderr, "kcsim: %llu launches, %llu blocks, %llu threads, %llu waits, %llu h2d, %llu d2h, %llu d2d\n",
          (unsigned long long)sim_stats.launches, (unsigned long long)sim_stats.blocks,
          (unsigned long long)sim_stats.threads, (unsigned long long)sim_stats.waits,
          (unsigned long long)sim_stats.h2d, (unsigned long long)sim_stats.d2h, (unsigned long long)sim_stats.d2d);
  sim_print_sites();
}

__attribute__((constructor)) static void init(void) {
  if (env_ll("KEEL_CUDA_SIM_STATS", 0)) atexit(print_stats);
}

void sim_set_launch_error(cudaError_t code, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  snprintf(detail, sizeof detail, "%s (simulator: %s)", cudaGetErrorName(code), msg);
  detail_code = code;
  last_error = code;
  if (!env_ll("KEEL_CUDA_SIM_QUIET", 0)) fprintf(stderr, "kcsim: %s\n", msg);
}

size_t sim_smem_limit(const void *kernel) {
  std::lock_guard<std::mutex> hold(mem_lock);
  if (smem_limits) {
    auto it = smem_limits->find(kernel);
    if (it != smem_limits->end()) return (size_t)it->second;
  }
  return KCSIM_SMEM_DEFAULT;
}

/* the allocation holding p (under mem_lock), or end() */
static std::map<uintptr_t, dblock>::iterator holder(const void *p) {
  uintptr_t a = (uintptr_t)p;
  auto it = blocks->upper_bound(a);
  if (it == blocks->begin()) return blocks->end();
  --it;
  return a < it->first + it->second.size ? it : blocks->end();
}

/* Whether p is in any allocation, its unused bytes included. */
static int in_allocation(const void *p) {
  std::lock_guard<std::mutex> hold(mem_lock);
  return blocks && holder(p) != blocks->end();
}

int sim_is_device(const void *p, size_t n) {
  std::lock_guard<std::mutex> hold(mem_lock);
  if (!blocks) return 0;
  auto it = holder(p);
  return it != blocks->end() && n <= it->second.used && (uintptr_t)p - it->first <= it->second.used - n;
}

/* cudaSuccess when [p, p+n) lies in the bytes in use of one allocation;
** else cudaErrorInvalidValue, explained (cudaGetErrorString) in terms of
** what fn's side of the call (what) reached. */
static cudaError_t check_device_range(const char *fn, const char *what, const void *p, size_t n) {
  uintptr_t a = (uintptr_t)p;
  size_t off, size, used;
  {
    std::lock_guard<std::mutex> hold(mem_lock);
    auto it = blocks ? holder(p) : std::map<uintptr_t, dblock>::iterator();
    if (!blocks || it == blocks->end()) {
      sim_set_launch_error(cudaErrorInvalidValue, "%s: the %s %p is not device memory", fn, what, p);
      return cudaErrorInvalidValue;
    }
    off = a - it->first;
    size = it->second.size;
    used = it->second.used;
  }
  if (n <= used && off <= used - n) return cudaSuccess;
  if (n > size || off > size - n)
    sim_set_launch_error(cudaErrorInvalidValue,
                         "%s: the %s, %zu bytes at offset %zu of a device allocation of %zu, runs past its end", fn,
                         what, n, off, size);
  else if (used == 0)
    sim_set_launch_error(cudaErrorInvalidValue,
                         "%s: the %s, %zu bytes at offset %zu of a device block of %zu, is in a block not in use "
                         "(freed into keel's cache)", fn, what, n, off, size);
  else
    sim_set_launch_error(cudaErrorInvalidValue,
                         "%s: the %s, %zu bytes at offset %zu of a device block of %zu, runs past the %zu bytes in "
                         "use (the rest is the caching allocator's rounding)", fn, what, n, off, size, used);
  return cudaErrorInvalidValue;
}

}  // namespace kcsim

using namespace kcsim;

/* {======================================================================
** Errors
** ======================================================================= */

extern "C" {

const char *cudaGetErrorName(cudaError_t e) {
  switch (e) {
#define N(x) case x: return #x;
    N(cudaSuccess) N(cudaErrorInvalidValue) N(cudaErrorMemoryAllocation) N(cudaErrorInitializationError)
    N(cudaErrorInvalidConfiguration) N(cudaErrorInvalidPitchValue) N(cudaErrorInvalidSymbol)
    N(cudaErrorInvalidDevicePointer) N(cudaErrorInvalidMemcpyDirection) N(cudaErrorInsufficientDriver)
    N(cudaErrorCallRequiresNewerDriver) N(cudaErrorDevicesUnavailable) N(cudaErrorInvalidDeviceFunction)
    N(cudaErrorNoDevice) N(cudaErrorInvalidDevice) N(cudaErrorInvalidResourceHandle) N(cudaErrorNotReady)
    N(cudaErrorIllegalAddress) N(cudaErrorLaunchOutOfResources) N(cudaErrorLaunchTimeout) N(cudaErrorAssert)
    N(cudaErrorLaunchFailure) N(cudaErrorNotSupported) N(cudaErrorSystemDriverMismatch)
    N(cudaErrorCompatNotSupportedOnDevice) N(cudaErrorUnknown)
#undef N
  }
  return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t e) {
  /* a failed launch: the simulator's explanation */
  if (e == detail_code && e != cudaSuccess && detail[0]) return detail;
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
  }
}

cudaError_t cudaGetLastError(void) {
  cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return last_error; }

/* }====================================================================== */

/* {======================================================================
** Devices
** ======================================================================= */

cudaError_t cudaGetDeviceCount(int *n) {
  int d = devices();
  *n = d > 0 ? d : 0;
  return d > 0 ? cudaSuccess : fail(cudaErrorNoDevice);
}

static cudaError_t check_device(int d) {
  int n = devices();
  if (n <= 0) return fail(cudaErrorNoDevice);
  return d >= 0 && d < n ? cudaSuccess : fail(cudaErrorInvalidDevice);
}

cudaError_t cudaSetDevice(int d) {
  cudaError_t e = check_device(d);
  if (e == cudaSuccess) device = d;
  return e;
}

cudaError_t cudaGetDevice(int *d) {
  *d = device;
  return cudaSuccess;
}

static int sms(void) {
  long long n = env_ll("KEEL_CUDA_SIM_SMS", 4);
  return n > 0 && n < 100000 ? (int)n : 4;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d) {
  cudaError_t e = check_device(d);
  if (e != cudaSuccess) return e;
  memset(p, 0, sizeof *p);
  snprintf(p->name, sizeof p->name, "keel CUDA simulator (CPU)");
  p->totalGlobalMem = total_memory();
  p->sharedMemPerBlock = KCSIM_SMEM_DEFAULT;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->memPitch = (size_t)1 << 31;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 0x7fffffff;
  p->maxGridSize[1] = p->maxGridSize[2] = 65535;
  p->clockRate = 1000000;
  p->totalConstMem = 65536;
  p->major = 9;
  p->minor = 0;
  p->textureAlignment = 512;
  p->multiProcessorCount = sms();
  p->concurrentKernels = 1;
  p->memoryClockRate = 1000000;
  p->memoryBusWidth = 64;
  p->l2CacheSize = 1 << 20;
  p->maxThreadsPerMultiProcessor = 2048;
  p->sharedMemPerMultiprocessor = 228 * 1024;
  p->regsPerMultiprocessor = 65536;
  p->sharedMemPerBlockOptin = KCSIM_SMEM_OPTIN;
  p->maxBlocksPerMultiProcessor = 32;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d) {
  cudaDeviceProp p;
  cudaError_t e = cudaGetDeviceProperties(&p, d);
  if (e != cudaSuccess) return e;
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *v = p.maxThreadsDim[0]; break;
    case cudaDevAttrMaxBlockDimY: *v = p.maxThreadsDim[1]; break;
    case cudaDevAttrMaxBlockDimZ: *v = p.maxThreadsDim[2]; break;
    case cudaDevAttrMaxGridDimX: *v = p.maxGridSize[0]; break;
    case cudaDevAttrMaxGridDimY: *v = p.maxGridSize[1]; break;
    case cudaDevAttrMaxGridDimZ: *v = p.maxGridSize[2]; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = (int)p.sharedMemPerBlock; break;
    case cudaDevAttrTotalConstantMemory: *v = (int)p.totalConstMem; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *v = p.regsPerBlock; break;
    case cudaDevAttrClockRate: *v = p.clockRate; break;
    case cudaDevAttrMultiProcessorCount: *v = p.multiProcessorCount; break;
    case cudaDevAttrL2CacheSize: *v = p.l2CacheSize; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *v = p.maxThreadsPerMultiProcessor; break;
    case cudaDevAttrComputeCapabilityMajor: *v = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = p.minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = (int)p.sharedMemPerMultiprocessor; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *v = p.regsPerMultiprocessor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = (int)p.sharedMemPerBlockOptin; break;
    default: return fail(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int *v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaDeviceReset(void) { return cudaSuccess; }

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
  std::lock_guard<std::mutex> hold(mem_lock);
  size_t t = total_memory();
  *total_bytes = t;
  *free_bytes = in_use < t ? t - in_use : 0;
  return cudaSuccess;
}

/* }====================================================================== */

/* {======================================================================
** Memory
** ======================================================================= */

cudaError_t cudaMalloc(void **p, size_t n) {
  std::lock_guard<std::mutex> hold(mem_lock);
  size_t rounded = (n + 255) / 256 * 256;
  void *q;
  *p = NULL;
  if (devices() <= 0) return fail(cudaErrorNoDevice);
  if (!blocks && !(blocks = new (std::nothrow) std::map<uintptr_t, dblock>())) return fail(cudaErrorMemoryAllocation);
  if (rounded < n || in_use + rounded > total_memory()) return fail(cudaErrorMemoryAllocation);
  /* the exact size for the sanitizers' bounds, 256-aligned base */
  if (posix_memalign(&q, 256, n ? n : 1) != 0) return fail(cudaErrorMemoryAllocation);
  memset(q, 0xFF, n);
  try {
    size_t m = n ? n : 1;
    (*blocks)[(uintptr_t)q] = dblock{m, m};
  } catch (...) {
    free(q);
    return fail(cudaErrorMemoryAllocation);
  }
  in_use += rounded;
  *p = q;
  return cudaSuccess;
}

cudaError_t cudaFree(void *p) {
  /* as on a GPU, an implicit device synchronization: queued work may use p */
  cudaError_t e = sim_wait_device();
  if (e != cudaSuccess) return fail(e);
  std::lock_guard<std::mutex> hold(mem_lock);
  if (!p) return cudaSuccess;
  if (!blocks) return fail(cudaErrorInvalidValue);
  auto it = blocks->find((uintptr_t)p);
  if (it == blocks->end()) return fail(cudaErrorInvalidValue);
  in_use -= (it->second.size + 255) / 256 * 256;
#ifdef KCSIM_ASAN
  /* malloc's memory again before free sees it */
  ASAN_UNPOISON_MEMORY_REGION(p, it->second.size);
#endif
  blocks->erase(it);
  free(p);
  return cudaSuccess;
}

/* The record changes now (the calls that follow are checked against it);
** the memory in stream order, as the engine's reuse of a cached block is
** (with KEEL_CUDA_SIM_ASYNC, work queued before may still read it). */
cudaError_t kcsim_mem_in_use(cudaStream_t st, void *p, size_t used, size_t block) {
  size_t size;
  {
    std::lock_guard<std::mutex> hold(mem_lock);
    auto it = blocks ? blocks->find((uintptr_t)p) : std::map<uintptr_t, dblock>::iterator();
    size = blocks && it != blocks->end() ? it->second.size : 0;
    if (size && size == block && used <= block) it->second.used = used;
  }
  if (size && size == block && used <= block)
    return fail(sim_enqueue(st, [p, used, block]() {
#ifdef KCSIM_ASAN
      /* writable for the fill, then poisoned but for the bytes in use */
      ASAN_UNPOISON_MEMORY_REGION(p, block);
#endif
      /* what is not in use reads as new memory does: a freed block's old
      ** values do not survive into its next tensor */
      memset((char *)p + used, 0xFF, block - used);
#ifdef KCSIM_ASAN
      ASAN_POISON_MEMORY_REGION((char *)p + used, block - used);
#endif
      return cudaSuccess;
    }));
  if (!size)
    sim_set_launch_error(cudaErrorInvalidValue, "kcsim_mem_in_use: %p is not the start of a device allocation", p);
  else if (size != block)
    sim_set_launch_error(cudaErrorInvalidValue,
                         "kcsim_mem_in_use: a block of %zu bytes, but the allocation at %p has %zu", block, p, size);
  else
    sim_set_launch_error(cudaErrorInvalidValue, "kcsim_mem_in_use: %zu bytes in use of a block of %zu", used, block);
  return cudaErrorInvalidValue;
}

/* Page-locked memory is resident from the start: touched here, so that a
** process's RSS shows what a real run holds (not pages that fill in as a
** staging ring goes round for the first time). */
cudaError_t cudaMallocHost(void **p, size_t n) {
  *p = malloc(n ? n : 1);
  if (!*p) return fail(cudaErrorMemoryAllocation);
  memset(*p, 0, n);
  if (!sim_pinned_add(*p, n)) {   /* async copies need to know it */
    free(*p);
    *p = NULL;
    return fail(cudaErrorMemoryAllocation);
  }
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags) {
  (void)flags;
  return cudaMallocHost(p, n);
}

cudaError_t cudaFreeHost(void *p) {
  cudaError_t e = sim_wait_device();   /* synchronizes, as CUDA's */
  sim_pinned_remove(p);
  free(p);
  return fail(e);
}

/* A host side that is device memory (any of it). */
static cudaError_t host_side(const char *what, const void *p) {
  if (!in_allocation(p)) return cudaSuccess;
  sim_set_launch_error(cudaErrorInvalidValue, "cudaMemcpy: the %s %p is device memory, the copy's kind says host",
                       what, p);
  return cudaErrorInvalidValue;
}

/* The device side of a copy must be device memory in use, the host side
** not device memory. A failure sets its explanation (last_error too). */
static cudaError_t check_copy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
  static const char *const fn = "cudaMemcpy";
  cudaError_t e;
  switch (kind) {
    case cudaMemcpyHostToHost:
      return (e = host_side("destination", dst)) ? e : host_side("source", src);
    case cudaMemcpyHostToDevice:
      return (e = check_device_range(fn, "destination", dst, n)) ? e : host_side("source", src);
    case cudaMemcpyDeviceToHost:
      return (e = check_device_range(fn, "source", src, n)) ? e : host_side("destination", dst);
    case cudaMemcpyDeviceToDevice:
      return (e = check_device_range(fn, "destination", dst, n)) ? e : check_device_range(fn, "source", src, n);
    case cudaMemcpyDefault: return cudaSuccess;
    default: return fail(cudaErrorInvalidMemcpyDirection);
  }
}

static void count_copy(cudaMemcpyKind kind) {
  if (kind == cudaMemcpyHostToDevice) sim_stats.h2d++;
  else if (kind == cudaMemcpyDeviceToHost) sim_stats.d2h++;
  else if (kind == cudaMemcpyDeviceToDevice) sim_stats.d2d++;
}

/* On the legacy stream: after its work and that of blocking streams. */
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
  cudaError_t e;
  if (!n) return cudaSuccess;
  if ((e = check_copy(dst, src, n, kind)) != cudaSuccess) return e;
  if ((e = sim_wait_legacy()) != cudaSuccess) return fail(e);
  memmove(dst, src, n);
  count_copy(kind);
  return cudaSuccess;
}

/* Queued (sim_stream.cpp says what each kind of host memory sees). */
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t st) {
  cudaError_t e;
  if (!n) return cudaSuccess;
  if ((e = check_copy(dst, src, n, kind)) != cudaSuccess) return e;
  count_copy(kind);
  if (!sim_async()) {
    memmove(dst, src, n);
    return cudaSuccess;
  }
  int from_host = !in_allocation(src), to_host = !in_allocation(dst);
  if (to_host && !sim_is_pinned(dst, n)) {
    /* into pageable memory: returns when the data is there */
    if ((e = sim_wait_stream(st)) != cudaSuccess) return fail(e);
    memmove(dst, src, n);
    return cudaSuccess;
  }
  if (from_host && !sim_is_pinned(src, n)) {
    /* from pageable memory: the bytes are taken now */
    std::shared_ptr<std::vector<unsigned char>> copy;
    try {
      copy = std::make_shared<std::vector<unsigned char>>((const unsigned char *)src, (const unsigned char *)src + n);
    } catch (...) {
      return fail(cudaErrorMemoryAllocation);
    }
    return fail(sim_enqueue(st, [dst, copy]() {
      memcpy(dst, copy->data(), copy->size());
      return cudaSuccess;
    }));
  }
  /* into page-locked memory: not to be read before the copy has run */
  if (to_host) memset(dst, 0xFF, n);
  return fail(sim_enqueue(st, [dst, src, n]() {
    memmove(dst, src, n);
    return cudaSuccess;
  }));
}

cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t st) {
  if (width > dpitch || width > spitch) return fail(cudaErrorInvalidPitchValue);
  for (size_t r = 0; r < height; r++) {
    cudaError_t e = cudaMemcpyAsync((char *)dst + r * dpitch, (const char *)src + r * spitch, width, kind, st);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t cudaMemset(void *p, int v, size_t n) {
  cudaError_t e;
  if (!n) return cudaSuccess;
  if ((e = check_device_range("cudaMemset", "destination", p, n)) != cudaSuccess) return e;
  if ((e = sim_wait_legacy()) != cudaSuccess) return fail(e);
  memset(p, v, n);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t st) {
  cudaError_t e;
  if (!n) return cudaSuccess;
  if ((e = check_device_range("cudaMemsetAsync", "destination", p, n)) != cudaSuccess) return e;
  return fail(sim_enqueue(st, [p, v, n]() {
    memset(p, v, n);
    return cudaSuccess;
  }));
}

/* }====================================================================== */

/* {======================================================================
** Kernel attributes
** ======================================================================= */

cudaError_t kcsim_func_set_attribute(const void *func, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> hold(mem_lock);
  if (!func) return fail(cudaErrorInvalidDeviceFunction);
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue);
  if (value < 0 || value > KCSIM_SMEM_OPTIN) return fail(cudaErrorInvalidValue);
  if (!smem_limits && !(smem_limits = new (std::nothrow) std::map<const void *, int>()))
    return fail(cudaErrorMemoryAllocation);
  (*smem_limits)[func] = value > KCSIM_SMEM_DEFAULT ? value : KCSIM_SMEM_DEFAULT;
  return cudaSuccess;
}

cudaError_t kcsim_occupancy(int *blocks_out, const void *func, int block_size, size_t smem) {
  (void)func;
  if (block_size <= 0 || block_size > 1024) return fail(cudaErrorInvalidValue);
  int b = 2048 / block_size;
  if (smem) {
    int by_smem = (int)((228 * 1024) / smem);
    if (by_smem < b) b = by_smem;
  }
  *blocks_out = b < 1 ? 0 : b > 32 ? 32 : b;
  return cudaSuccess;
}

}  // extern "C"

/* }====================================================================== */
