/*
** common.cuh: what the plugin's .cu files share: the per-context state,
** error helpers and the launchers of the generic kernels. Internal to the
** plugin (hidden symbols); the engine sees keel_cuda.h only.
*/
#ifndef KEEL_CUDA_COMMON_CUH
#define KEEL_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cublas_v2.h>
#include "keel_cuda.h"

#define KC_STR_(x) #x
#define KC_STR(x) KC_STR_(x)
#define KC_HIDDEN __attribute__((visibility("hidden")))

struct kc_state {
  int device;
  cudaStream_t stream;
  cublasHandle_t cublas;        /* NULL until kc_cublas */
};

/* A CUDA status as a plugin code (clearing the runtime's sticky slot). */
KC_HIDDEN int kc_check_cuda(cudaError_t e);
/* The state's cuBLAS handle, created on first use and bound to its stream. */
KC_HIDDEN int kc_cublas(kc_state *s, cublasHandle_t *h);

/* Launch geometry: a grid-stride loop over n elements. */
#define KC_THREADS 256
static inline unsigned kc_blocks(int64_t n) {
  int64_t b = (n + KC_THREADS - 1) / KC_THREADS;
  /* enough blocks to fill any current GPU; the loop covers the rest */
  return (unsigned)(b < 1 ? 1 : b > 65535 * 8 ? 65535 * 8 : b);
}

/* copy.cu */
KC_HIDDEN int kc_copy(kc_state *s, const kc_view *dst, const kc_view *src);
KC_HIDDEN int kc_fill(kc_state *s, const kc_view *dst, double v);

#endif
