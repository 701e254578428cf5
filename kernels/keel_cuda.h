/*
** keel_cuda.h: the ABI between the engine and its CUDA plugin.
**
** The CUDA backend is a plugin, libkeel_cuda.so, that the engine opens with
** dlopen on first use (engine/device.c). libkeel, the Lua module and the
** keel executable never link a CUDA library, so one build runs with or
** without a GPU, and a CPU-only run (valgrind, ASan) never touches CUDA.
**
** The plugin exports one C symbol, KEEL_CUDA_PLUGIN_SYMBOL, a function
** that returns its table of entry points (or NULL when it was built for
** another ABI version). The engine and the plugin are built from one tree,
** so the rule is simple: any change to this file bumps
** KEEL_CUDA_ABI_VERSION, and the engine refuses a plugin of another
** version (or another table size) with a message that says to rebuild.
**
** This header is C, and compiles as C++ (the .cu files of kernels/ include
** it through nvcc).
** It uses the engine's public enums (keel_dtype, keel_binop, ...) so that
** op codes mean the same on both sides.
**
** Conventions of every entry point:
** - The return value is a status code: KC_OK (0) or an error code. A
**   positive code is a cudaError_t; KC_CUBLAS_BASE + s is a cublasStatus_t
**   s; negative codes are the plugin's own (KC_ERR_*). error_string turns
**   any code into a message and error_kind classifies it. Nothing here
**   keeps a "last error": two engine contexts never see each other's.
** - Per-context state (current device, stream, the cuBLAS handle, created
**   lazily) lives in a kc_state that open() makes and close() frees; the
**   plugin has no mutable globals of its own.
** - Tensors are passed as kc_view: a device address of element 0, a dtype,
**   a shape and element strides (0 for broadcast dimensions). Kernels see
**   operands of the dtype their slot documents; the engine converts.
** - Memory entry points are raw (one cudaMalloc per call): the engine's
**   caching allocator (device.c) decides when to call them.
** - Work is queued on the state's stream; memcpy_d2h and synchronize wait
**   for it. An error of an asynchronous kernel may surface at a later call.
*/
#ifndef KEEL_CUDA_H
#define KEEL_CUDA_H

#include <stddef.h>
#include <stdint.h>
#include "keel.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KEEL_CUDA_ABI_VERSION 1
#define KEEL_CUDA_PLUGIN_SYMBOL "keel_cuda_plugin"
/* The file name the engine looks for (device.c gives the places). */
#define KEEL_CUDA_PLUGIN_FILE "libkeel_cuda.so"
#define KC_MAX_DIMS KEEL_MAX_DIMS

/* Status codes (see above). */
#define KC_OK 0
#define KC_ERR_ARG (-1)          /* a bad argument: a bug on the engine's side */
#define KC_ERR_DTYPE (-2)        /* a dtype this kernel does not handle */
#define KC_ERR_NOT_IMPLEMENTED (-3)
#define KC_ERR_NOMEM (-4)        /* host memory (the plugin's own records) */
#define KC_CUBLAS_BASE 100000

/* What an error code means for the engine (error_kind). */
enum {
  KC_KIND_OTHER = 0,
  KC_KIND_OOM,                   /* device out of memory: free the cache and retry */
  KC_KIND_NO_DRIVER,             /* no usable driver (none installed, or too old) */
  KC_KIND_NO_DEVICE              /* a driver, but no (visible) device */
};

/* A strided view of device memory. */
typedef struct kc_view {
  void *data;                    /* device address of element 0 */
  int32_t dtype;                 /* keel_dtype */
  int32_t ndim;
  int64_t numel;
  int64_t shape[KC_MAX_DIMS];
  int64_t stride[KC_MAX_DIMS];   /* in elements */
} kc_view;

typedef struct kc_state kc_state;

typedef struct keel_cuda_table {
  int32_t abi_version;           /* KEEL_CUDA_ABI_VERSION the plugin was built with */
  int32_t size;                  /* sizeof(keel_cuda_table) as the plugin was built */
  const char *description;       /* one line: version, CUDA runtime, targets */

  /* {== Runtime and devices: no state needed ==} */
  int (*device_count)(int *n);   /* an error (often KC_KIND_NO_DRIVER) when there is no driver */
  int (*device_name)(int device, char *buf, size_t n);
  int (*versions)(int *runtime, int *driver);   /* as cudaRuntimeGetVersion, cudaDriverGetVersion */
  const char *(*error_string)(int code);        /* static text; never NULL */
  int (*error_kind)(int code);                  /* KC_KIND_* */

  /* {== Per-context state ==} */
  int (*open)(int device, kc_state **out);      /* selects the device, makes a stream */
  void (*close)(kc_state *s);                   /* waits for queued work first */
  int (*mem_info)(kc_state *s, size_t *free_bytes, size_t *total_bytes);
  int (*synchronize)(kc_state *s);

  /* {== Memory (raw: the engine caches) ==} */
  int (*malloc)(kc_state *s, void **p, size_t nbytes);
  int (*free)(kc_state *s, void *p);
  int (*memcpy_h2d)(kc_state *s, void *dst, const void *src, size_t nbytes);  /* returns when src may be reused */
  int (*memcpy_d2h)(kc_state *s, void *dst, const void *src, size_t nbytes);  /* returns when dst holds the data */
  int (*memcpy_d2d)(kc_state *s, void *dst, const void *src, size_t nbytes);

  /* {== Generic kernels (every dtype, any strides) ==} */
  /* dst = src converted to dst's dtype; same shape (src may broadcast
  ** through zero strides); dst does not overlap src. */
  int (*copy)(kc_state *s, const kc_view *dst, const kc_view *src);
  int (*fill)(kc_state *s, const kc_view *dst, double v);

  /* {== Op kernels ==}
  ** NULL until written: the engine then answers "<op>: no CUDA kernel yet"
  ** (engine/backend_cuda.c). Semantics are those of the kl_backend slot of
  ** the same name in engine/keel_impl.h; operands share one dtype and the
  ** output's shape (inputs broadcast by zero strides) unless said. */
  int (*binary)(kc_state *s, int op, const kc_view *out, const kc_view *a, const kc_view *b);  /* keel_binop */
  int (*unary)(kc_state *s, int op, const kc_view *out, const kc_view *a);                     /* keel_unop */
  int (*clamp)(kc_state *s, const kc_view *out, const kc_view *a, double lo, double hi);
  int (*where)(kc_state *s, const kc_view *out, const kc_view *c, const kc_view *a, const kc_view *b);
  /* out has a's ndim with reduced dims of size 1 (reduce[d] != 0); idx
  ** (NULL or int64) gets arg positions (keel_redop MAX/MIN, one dim). */
  int (*reduce)(kc_state *s, int op, const kc_view *out, const kc_view *idx, const kc_view *a,
                const int *reduce);
  int (*norm)(kc_state *s, const kc_view *out, const kc_view *a, const int *reduce, double p);
  /* out[b] = a[b] @ b[b], 3-D operands of equal batch (stride 0 allowed
  ** on the batch dim); cuBLAS, its handle made on first use. */
  int (*matmul)(kc_state *s, const kc_view *out, const kc_view *a, const kc_view *b);
  /* index: int64, 0-based, checked by the engine */
  int (*gather)(kc_state *s, const kc_view *out, const kc_view *a, int dim, const kc_view *index);
  int (*scatter_add)(kc_state *s, const kc_view *out, int dim, const kc_view *index, const kc_view *src);
  int (*index_select)(kc_state *s, const kc_view *out, const kc_view *a, int dim, const kc_view *index);
  /* contiguous operands; act: the engine's KL_OP_* code with its params p[4] */
  int (*act)(kc_state *s, int op, const kc_view *out, const kc_view *a, const double *p);
  int (*act_backward)(kc_state *s, int op, const kc_view *gin, const kc_view *gout, const kc_view *a,
                      const double *p);
  int (*softmax)(kc_state *s, int log_out, const kc_view *out, const kc_view *a, int dim);
  int (*softmax_backward)(kc_state *s, int log_out, const kc_view *gin, const kc_view *gout,
                          const kc_view *y, int dim);
  /* Convolution, pooling, normalisation, losses, dropout, embedding,
  ** recurrent cells and the fused optimizer step take engine structures
  ** (kl_win2d, kl_closs, kl_rnn_args, keel_optim_hparams): the version that
  ** adds their kernels adds mirrors of those structures here with the
  ** slots, and bumps KEEL_CUDA_ABI_VERSION. */
} keel_cuda_table;

typedef const keel_cuda_table *(*keel_cuda_plugin_fn)(int abi_version);

#ifdef __cplusplus
}
#endif

#endif
