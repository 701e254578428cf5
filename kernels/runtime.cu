/*
** runtime.cu: the CUDA plugin's runtime side (kernels/keel_cuda.h): device
** queries, per-context state (device, stream, lazy cuBLAS handle), raw
** memory and copies between host and device, error codes and messages,
** and the exported table. Kernels live in their own files (copy.cu, ...)
** and are reached through kc_* launchers declared in common.cuh.
**
** No function here aborts or exits, and nothing keeps mutable globals: the
** CUDA runtime's own process state (primary contexts) is shared by design,
** everything of ours is in the kc_state an engine context owns.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <new>

#include "common.cuh"

#ifndef KC_TARGETS
#define KC_TARGETS "?"
#endif

/* {======================================================================
** Errors
** ======================================================================= */

static int from_cuda(cudaError_t e) {
  if (e == cudaSuccess) return KC_OK;
  /* a failed call leaves the error in the runtime's per-thread slot too:
  ** clear it, the code we return is the report */
  (void)cudaGetLastError();
  return (int)e;
}

int kc_check_cuda(cudaError_t e) { return from_cuda(e); }

static const char *cublas_message(int s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "cuBLAS: not initialized (cublasCreate failed: no device or driver?)";
    case CUBLAS_STATUS_ALLOC_FAILED: return "cuBLAS: resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "cuBLAS: invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "cuBLAS: feature absent on this device architecture";
    case CUBLAS_STATUS_MAPPING_ERROR: return "cuBLAS: mapping error";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "cuBLAS: kernel execution failed";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "cuBLAS: internal error";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "cuBLAS: not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "cuBLAS: license error";
    default: return "cuBLAS: unknown status";
  }
}

static const char *error_string(int code) {
  if (code == KC_OK) return "no error";
  if (code == KC_ERR_ARG) return "bad argument to a CUDA plugin call";
  if (code == KC_ERR_DTYPE) return "dtype not supported by this CUDA kernel";
  if (code == KC_ERR_NOT_IMPLEMENTED) return "not implemented in the CUDA plugin";
  if (code == KC_ERR_NOMEM) return "out of host memory in the CUDA plugin";
  if (code >= KC_CUBLAS_BASE) return cublas_message(code - KC_CUBLAS_BASE);
  if (code > 0) return cudaGetErrorString((cudaError_t)code);
  return "unknown CUDA plugin error";
}

static int error_kind(int code) {
  switch (code) {
    case cudaErrorMemoryAllocation: return KC_KIND_OOM;
    case cudaErrorInsufficientDriver:
#if CUDART_VERSION >= 12000
    case cudaErrorCallRequiresNewerDriver:
#endif
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
      return KC_KIND_NO_DRIVER;
    case cudaErrorNoDevice:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
      return KC_KIND_NO_DEVICE;
    default:
      if (code == KC_CUBLAS_BASE + CUBLAS_STATUS_ALLOC_FAILED) return KC_KIND_OOM;
      return KC_KIND_OTHER;
  }
}

/* }====================================================================== */

/* {======================================================================
** Devices
** ======================================================================= */

static int device_count(int *n) {
  int c = 0;
  cudaError_t e = cudaGetDeviceCount(&c);
  *n = 0;
  if (e != cudaSuccess) return from_cuda(e);
  *n = c;
  return c > 0 ? KC_OK : (int)cudaErrorNoDevice;
}

static int device_name(int device, char *buf, size_t n) {
  cudaDeviceProp p;
  cudaError_t e = cudaGetDeviceProperties(&p, device);
  if (e != cudaSuccess) return from_cuda(e);
  if (n) snprintf(buf, n, "%s", p.name);
  return KC_OK;
}

static int versions(int *runtime, int *driver) {
  cudaError_t e;
  *runtime = 0;
  *driver = 0;
  if ((e = cudaRuntimeGetVersion(runtime)) != cudaSuccess) return from_cuda(e);
  /* 0 with success when no driver is installed */
  if ((e = cudaDriverGetVersion(driver)) != cudaSuccess) return from_cuda(e);
  return KC_OK;
}

/* }====================================================================== */

/* {======================================================================
** Per-context state
** ======================================================================= */

static int state_open(int device, kc_state **out) {
  kc_state *s;
  cudaError_t e;
  *out = NULL;
  if ((e = cudaSetDevice(device)) != cudaSuccess) return from_cuda(e);
  /* cudaFree(0) creates the primary context now, so that its errors (no
  ** device memory, a device in exclusive mode) show here */
  if ((e = cudaFree(0)) != cudaSuccess) return from_cuda(e);
  s = new (std::nothrow) kc_state();
  if (!s) return KC_ERR_NOMEM;
  s->device = device;
  s->cublas = NULL;
  s->gemm_prec = KEEL_MATMUL_HIGHEST;
  s->scratch = s->host = NULL;
  s->pending = NULL;
  s->scratch_size = s->host_size = 0;
  if ((e = cudaDeviceGetAttribute(&s->sm_count, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) {
    delete s;
    return from_cuda(e);
  }
  /* a non-blocking stream: no implicit sync with the legacy stream */
  if ((e = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking)) != cudaSuccess) {
    delete s;
    return from_cuda(e);
  }
  *out = s;
  return KC_OK;
}

static void state_close(kc_state *s) {
  if (!s) return;
  cudaSetDevice(s->device);
  cudaStreamSynchronize(s->stream);
  if (s->cublas) cublasDestroy(s->cublas);
  kc_optim_close(s);
  kc_stage_close(s);
  if (s->scratch) cudaFree(s->scratch);
  if (s->host) cudaFreeHost(s->host);
  cudaStreamDestroy(s->stream);
  (void)cudaGetLastError();
  delete s;
}

/* The cuBLAS handle, made on first use: creating one costs tens of
** milliseconds and device memory that a run without matmul never needs. */
int kc_cublas(kc_state *s, cublasHandle_t *h) {
  if (!s->cublas) {
    cublasStatus_t st = cublasCreate(&s->cublas);
    if (st != CUBLAS_STATUS_SUCCESS) {
      s->cublas = NULL;
      return KC_CUBLAS_BASE + (int)st;
    }
    st = cublasSetStream(s->cublas, s->stream);
    if (st != CUBLAS_STATUS_SUCCESS) return KC_CUBLAS_BASE + (int)st;
  }
  *h = s->cublas;
  return KC_OK;
}

/* Scratch grows to the next power of two over n, so a run settles after
** a few calls. */
static size_t grown(size_t n) {
  size_t m = 4096;
  while (m < n) m <<= 1;
  return m;
}

/* The one way a buffer of ours grows (the scratch below, the optimizer's
** device batch space and results arena, the staging ring): at least n
** bytes in *buf, device memory or pinned host memory. The old buffer may
** still be read or written by queued kernels and copies, so it is freed
** only once the stream has finished (a wait, only when there is one to
** replace); its contents do not carry over. On failure *buf is the old
** buffer (the wait failed) or NULL with *size 0. */
int kc_grow(kc_state *s, void **buf, size_t *size, size_t n, int pinned) {
  size_t m = grown(n);
  void *q = NULL;
  cudaError_t e;
  if (n <= *size) return KC_OK;
  if (*buf) {
    if ((e = cudaStreamSynchronize(s->stream)) != cudaSuccess) return from_cuda(e);
    if (pinned) cudaFreeHost(*buf);
    else cudaFree(*buf);
    *buf = NULL;
    *size = 0;
  }
  e = pinned ? cudaMallocHost(&q, m) : cudaMalloc(&q, m);
  if (e != cudaSuccess) return from_cuda(e);
  *buf = q;
  *size = m;
  return KC_OK;
}

int kc_scratch(kc_state *s, size_t n, void **p) {
  int rc = kc_grow(s, &s->scratch, &s->scratch_size, n, 0);
  *p = s->scratch;
#ifdef KEEL_CUDA_SIM
  /* the simulator cuts the buffer to this request (see mem_in_use below):
  ** a kernel reaching past what its op asked for is reported */
  if (rc == KC_OK && s->scratch) rc = from_cuda(kcsim_mem_in_use(s->stream, s->scratch, n, s->scratch_size));
#endif
  return rc;
}

int kc_host_scratch(kc_state *s, size_t n, void **p) {
  int rc = kc_grow(s, &s->host, &s->host_size, n, 1);
  *p = s->host;
  return rc;
}

int kc_sync(kc_state *s) { return from_cuda(cudaStreamSynchronize(s->stream)); }

static int mem_info(kc_state *s, size_t *free_bytes, size_t *total_bytes) {
  cudaError_t e;
  *free_bytes = *total_bytes = 0;
  if ((e = cudaSetDevice(s->device)) != cudaSuccess) return from_cuda(e);
  return from_cuda(cudaMemGetInfo(free_bytes, total_bytes));
}

static int set_gemm_precision(kc_state *s, int prec) {
  if (prec < 0 || prec >= KEEL_MATMUL_PRECISION_COUNT) return KC_ERR_ARG;
  s->gemm_prec = prec;
  return KC_OK;
}

static int synchronize(kc_state *s) {
  kc_optim_flush(s);   /* queued optimizer work first (keel_cuda.h: defer_results) */
  return from_cuda(cudaStreamSynchronize(s->stream));
}

/* }====================================================================== */

/* {======================================================================
** Memory
** ======================================================================= */

static int dev_malloc(kc_state *s, void **p, size_t nbytes) {
  cudaError_t e;
  *p = NULL;
  if ((e = cudaSetDevice(s->device)) != cudaSuccess) return from_cuda(e);
  return from_cuda(cudaMalloc(p, nbytes ? nbytes : 1));
}

static int dev_free(kc_state *s, void *p) {
  kc_optim_flush(s);
  /* cudaFree synchronizes the device: the block may still be in use by
  ** queued work, which must finish first anyway */
  return p ? from_cuda(cudaFree(p)) : KC_OK;
}

/* Both directions are ordered on the stream (an open optimizer batch is
** launched first). H2D returns once src may be reused (stage.cu: without
** waiting for the device), D2H when the data has arrived. */
static int memcpy_h2d(kc_state *s, void *dst, const void *src, size_t n) {
  if (!n) return KC_OK;
  kc_optim_flush(s);
  return kc_stage_h2d(s, dst, src, n);
}

static int memcpy_d2h(kc_state *s, void *dst, const void *src, size_t n) {
  cudaError_t e;
  if (!n) return KC_OK;
  kc_optim_flush(s);
  e = cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, s->stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(s->stream);
  return from_cuda(e);
}

static int memcpy_d2d(kc_state *s, void *dst, const void *src, size_t n) {
  if (!n) return KC_OK;
  kc_optim_flush(s);
  return from_cuda(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s->stream));
}

#ifdef KEEL_CUDA_SIM
/* keel_cuda.h's optional mem_in_use: the simulator makes the block's
** unused bytes unusable (kernels/sim/sim_runtime.cpp: poisoned for
** AddressSanitizer, else 0xFF), so that a kernel or copy reaching past a
** tensor's end, or into a block the engine has cached, is reported. A GPU
** has nothing to check with: the GPU build leaves the slot NULL. A block
** going back to the cache (used 0) first launches queued optimizer work,
** as dev_free does: it may still read what is cut off. A block handed
** out only widens, so the batch is left as a GPU run leaves it. */
static int mem_in_use(kc_state *s, void *p, size_t used, size_t block) {
  if (used == 0) kc_optim_flush(s);
  return from_cuda(kcsim_mem_in_use(s->stream, p, used, block));
}
#endif

/* }====================================================================== */

/* {======================================================================
** The table
** ======================================================================= */

static keel_cuda_table make_table(void) {
  keel_cuda_table t;
  memset(&t, 0, sizeof t);
  t.abi_version = KEEL_CUDA_ABI_VERSION;
  t.size = (int32_t)sizeof t;
#ifdef KEEL_CUDA_SIM
  /* kernels/sim/: the same kernels on the CPU, no GPU involved */
  t.description = "keel CUDA plugin (ABI " KC_STR(KEEL_CUDA_ABI_VERSION) ", CPU simulator kernels/sim, built by g++ " KC_STR(
      __GNUC__) "." KC_STR(__GNUC_MINOR__) ": not a GPU)";
#else
  t.description = "keel CUDA plugin (ABI " KC_STR(KEEL_CUDA_ABI_VERSION) ", built by nvcc " KC_STR(__CUDACC_VER_MAJOR__) "." KC_STR(
      __CUDACC_VER_MINOR__) " for " KC_TARGETS ")";
#endif
  t.device_count = device_count;
  t.device_name = device_name;
  t.versions = versions;
  t.error_string = error_string;
  t.error_kind = error_kind;
  t.open = state_open;
  t.close = state_close;
  t.mem_info = mem_info;
  t.synchronize = synchronize;
  t.malloc = dev_malloc;
  t.free = dev_free;
  t.memcpy_h2d = memcpy_h2d;
  t.memcpy_d2h = memcpy_d2h;
  t.memcpy_d2d = memcpy_d2d;
#ifdef KEEL_CUDA_SIM
  t.mem_in_use = mem_in_use;
#endif
  t.copy = kc_copy;
  t.fill = kc_fill;
  t.set_gemm_precision = set_gemm_precision;
  /* op kernels: each family sets its slots (common.cuh lists them) */
  kc_register_elementwise(&t);
  kc_register_act(&t);
  kc_register_reduce(&t);
  kc_register_softmax(&t);
  kc_register_loss(&t);
  kc_register_blas(&t);
  kc_register_index(&t);
  kc_register_conv(&t);
  kc_register_norm(&t);
  kc_register_rnn(&t);
  kc_register_attention(&t);
  kc_register_optim(&t);
  return t;
}

/* The table is returned whatever version the engine asks for: the engine
** reads abi_version (the first field, which never moves) and size, and
** names both versions when they differ. Immutable once built; the C++
** runtime guards the function-local static (thread-safe). */
extern "C" __attribute__((visibility("default"))) const keel_cuda_table *keel_cuda_plugin(int abi_version) {
  static const keel_cuda_table table = make_table();
  (void)abi_version;
  return &table;
}

/* }====================================================================== */
