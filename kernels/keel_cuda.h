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

#define KEEL_CUDA_ABI_VERSION 6
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

/* defer_results modes. */
enum { KC_DEFER_WAIT = 0, KC_DEFER_ON = 1, KC_DEFER_LATER = 2, KC_DEFER_FLUSH = 3 };

/* An optimizer step decided on the device (decide below): the clip chain
** (global and per-tensor L2 norms first, then value bounds: transforms
** that need no host state and no second pass) and the "skip" policy,
** evaluated as engine/clip.c and engine/optim.c evaluate them on the host,
** operation for operation, so that both decide alike to the bit. */
enum { KC_DECIDE_VALUE = 0, KC_DECIDE_NORM = 1, KC_DECIDE_GLOBAL_NORM = 2 };
#define KC_DECIDE_MAX 8
typedef struct kc_decide {
  int nitems;                   /* transforms, at most KC_DECIDE_MAX */
  int kind[KC_DECIDE_MAX];      /* KC_DECIDE_* */
  double threshold[KC_DECIDE_MAX];
  int skip_nonfinite;           /* NaN/Inf in any gradient: the step changes nothing */
  int64_t ntensors;             /* the statistics calls of the batch (one unit each) */
} kc_decide;
/* What the device decided, with the batch's host results. */
typedef struct kc_decision {
  double total_sumsq;           /* sum of the gradients' squares (finite elements) */
  double nonfinite;             /* NaN and Inf elements */
  double coef;                  /* the product of the global norm factors */
  double skip, clipped;         /* 1 or 0 */
} kc_decision;

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

/* Mirrors of the engine's argument structures (engine/keel_impl.h has
** the originals and their meaning; backend_cuda.c copies field by field,
** so the engine's layout may change without touching the plugin). */
typedef struct kc_win2d {
  int64_t n, c, h, w;            /* input [n, c, h, w] */
  int64_t oc, oh, ow;            /* output [n, oc, oh, ow] */
  int64_t k[2], s[2], pad[2], dil[2];   /* {h, w}: size, stride, top/left padding, dilation */
  int64_t groups;                /* conv2d */
  int64_t divisor;               /* avg_pool2d divisor_override, 0 for none */
  int32_t count_include_pad, adaptive, index_base;
} kc_win2d;

/* Class-index targets (not probs) are int64, read as the engine got
** them: a value equal to ignore_index (KC_NO_IGNORE: none) is ignored,
** any other is class value - index_base (the engine checked the range). */
#define KC_NO_IGNORE KEEL_NO_IGNORE
typedef struct kc_closs {
  int64_t n, c, inner;
  double smoothing;
  int64_t index_base;            /* 0 or 1 */
  int64_t ignore_index;          /* or KC_NO_IGNORE */
  int32_t reduction;             /* keel_reduction */
  int32_t logits;                /* x holds logits (cross entropy), else log-probabilities */
  int32_t probs;                 /* target holds probabilities shaped like x */
} kc_closs;

/* One recurrent layer, all steps (the layouts of engine/rnn.c and
** backend_cpu_rnn.c): x [T, B, In], out [T, B, H], h0/c0 [B, H], w_ih
** [G*H, In], w_hh [G*H, H], b_* [G*H] (G = 1, 4 or 3 gates). ws holds what
** forward keeps for backward, laid out as the CPU backend lays it out.
** Absent tensors are NULL; backward fills the non-NULL d* (adding into
** none: they arrive zeroed). ws_at: where each region of ws starts, in
** elements (the engine's kl_rnn_ws_layout: the one description of it). */
typedef struct kc_rnn_ws {
  int64_t hp, hn, c, c0, g, tc, total;
} kc_rnn_ws;
typedef struct kc_rnn {
  int32_t mode, reverse;         /* keel_rnn_mode; steps run t = T-1 .. 0 */
  int64_t T, B, In, H;
  const kc_view *x, *h0, *c0, *w_ih, *w_hh, *b_ih, *b_hh;
  const kc_view *out, *ws;       /* forward writes, backward reads */
  kc_rnn_ws ws_at;               /* ws's regions */
  const kc_view *gout;
  const kc_view *dx, *dh0, *dc0, *dw_ih, *dw_hh, *db_ih, *db_hh;
} kc_rnn;

/* Fused attention (the layouts of engine/keel_impl.h's kl_sdpa_args):
** q [B, L, E], k [B, S, E], v [B, S, Ev], out and gout [B, L, Ev], lse
** [B, L], dq/dk/dv like q/k/v, dense; bias NULL or a view [batch..., L, S]
** whose leading dims multiply to B (zero strides where it broadcasts);
** dbias NULL or dense [B, L, S]. Backward writes the non-NULL outputs
** whole. Head sizes (E, Ev) up to the limits below; the engine composes
** the op from other entries above them. */
#define KC_SDPA_MAX_HEAD_F32 256
#define KC_SDPA_MAX_HEAD_F64 128
typedef struct kc_sdpa {
  int64_t B, L, S, E, Ev;
  double scale, p;               /* dropout probability (0: none) */
  uint64_t seed;                 /* of the dropout mask (engine/backend_cpu_attn.c's kl_sdpa_drop) */
  int32_t causal;
  const kc_view *q, *k, *v, *bias, *out, *lse, *gout;
  const kc_view *dq, *dk, *dv, *dbias;
} kc_sdpa;
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
  /* Optional: NULL in a plugin that has no use for it (the GPU build).
  ** The engine's cache hands out blocks larger than asked for (a size
  ** class, up to 25% more) and keeps returned blocks for reuse, so a
  ** kernel that runs past a tensor's end, or uses a tensor the engine has
  ** freed, reaches memory that is still allocated: no fault, only stale
  ** values read and writes into what the next tensor gets. Through this
  ** entry the engine says, for each block it hands out (fresh from malloc
  ** or from its cache) and each block it takes back into its cache, how
  ** many leading bytes of it are in use: used = the tensor's bytes on
  ** hand-out, 0 on return; p and block are the address and size malloc
  ** gave. A checking plugin (the CPU simulator) makes [p + used, p +
  ** block) unusable, so that a kernel or copy reaching there is reported.
  ** A block given back with free needs no call (free ends what this set).
  ** Narrowing a block may cut off memory that queued optimizer work still
  ** reads: an open batch is launched first (as free does; defer_results).
  ** An error means p or block is not what malloc gave: an engine bug. */
  int (*mem_in_use)(kc_state *s, void *p, size_t used, size_t block);

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
  ** (NULL or int64) gets arg positions (keel_redop MAX/MIN, one dim)
  ** counted from index_base (the engine's: 1 from Lua). */
  int (*reduce)(kc_state *s, int op, const kc_view *out, const kc_view *idx, const kc_view *a,
                const int *reduce, int index_base);
  int (*norm)(kc_state *s, const kc_view *out, const kc_view *a, const int *reduce, double p);
  /* out[b] = a[b] @ b[b], 3-D operands of equal batch (stride 0 allowed
  ** on the batch dim); cuBLAS, its handle made on first use. */
  int (*matmul)(kc_state *s, const kc_view *out, const kc_view *a, const kc_view *b);
  /* index: an int64 device view of any strides (zero ones included),
  ** its values counted from base (the engine's index base: 0, or 1 from
  ** Lua) and range-checked by the engine; the kernels subtract base, so
  ** the engine hands over the caller's own device index, no copy. */
  int (*gather)(kc_state *s, const kc_view *out, const kc_view *a, int dim, const kc_view *index, int64_t base);
  int (*scatter_add)(kc_state *s, const kc_view *out, int dim, const kc_view *index, const kc_view *src,
                     int64_t base);
  int (*index_select)(kc_state *s, const kc_view *out, const kc_view *a, int dim, const kc_view *index,
                      int64_t base);
  /* contiguous operands; act: the engine's KL_OP_* code with its params p[4] */
  int (*act)(kc_state *s, int op, const kc_view *out, const kc_view *a, const double *p);
  int (*act_backward)(kc_state *s, int op, const kc_view *gin, const kc_view *gout, const kc_view *a,
                      const double *p);
  int (*softmax)(kc_state *s, int log_out, const kc_view *out, const kc_view *a, int dim);
  int (*softmax_backward)(kc_state *s, int log_out, const kc_view *gin, const kc_view *gout,
                          const kc_view *y, int dim);
  /* Losses (contiguous, one float dtype). ploss: pointwise loss op
  ** (KL_OP_MSE_LOSS .. KL_OP_HUBER_LOSS) with beta/delta p, red a
  ** keel_reduction (out: a scalar unless NONE); closs: class loss over x
  ** [n, c, inner] (lse: float64 [n*inner], cross entropy only, NULL
  ** otherwise; div: float64 [1] that forward sets to the "mean" divisor
  ** and backward reads, both on the device, so neither waits for the
  ** host); bce: w, pw NULL or shaped like x. Backward outputs NULL when
  ** not needed. Class-index targets: contiguous int64 [n*inner], read
  ** through q's index_base and ignore_index (kc_closs). */
  int (*ploss)(kc_state *s, int op, const kc_view *out, const kc_view *x, const kc_view *y, double p, int red);
  int (*ploss_backward)(kc_state *s, int op, const kc_view *gx, const kc_view *gout, const kc_view *x,
                        const kc_view *y, double p, int red);
  int (*closs)(kc_state *s, const struct kc_closs *q, const kc_view *out, const kc_view *lse, const kc_view *div,
               const kc_view *x, const kc_view *target, const kc_view *weight);
  int (*closs_backward)(kc_state *s, const struct kc_closs *q, const kc_view *gx, const kc_view *gt,
                        const kc_view *gout, const kc_view *x, const kc_view *target, const kc_view *weight,
                        const kc_view *lse, const kc_view *div);
  int (*bce)(kc_state *s, const kc_view *out, const kc_view *x, const kc_view *y, const kc_view *w,
             const kc_view *pw, int red);
  int (*bce_backward)(kc_state *s, const kc_view *gx, const kc_view *gy, const kc_view *gout, const kc_view *x,
                      const kc_view *y, const kc_view *w, const kc_view *pw, int red);

  /* Convolution and pools: dense NCHW operands, fresh outputs; b, idx and
  ** any of gx, gw, gb may be NULL; avg_pool2d also does the adaptive pool
  ** (g->adaptive). idx: int64 flat positions in each input plane, plus
  ** g->index_base. */
  int (*conv2d)(kc_state *s, const struct kc_win2d *g, const kc_view *out, const kc_view *x, const kc_view *w,
                const kc_view *b);
  int (*conv2d_backward)(kc_state *s, const struct kc_win2d *g, const kc_view *gout, const kc_view *x,
                         const kc_view *w, const kc_view *gx, const kc_view *gw, const kc_view *gb);
  int (*max_pool2d)(kc_state *s, const struct kc_win2d *g, const kc_view *out, const kc_view *idx,
                    const kc_view *x);
  int (*max_pool2d_backward)(kc_state *s, const struct kc_win2d *g, const kc_view *gx, const kc_view *gout,
                             const kc_view *idx);
  int (*avg_pool2d)(kc_state *s, const struct kc_win2d *g, const kc_view *out, const kc_view *x);
  int (*avg_pool2d_backward)(kc_state *s, const struct kc_win2d *g, const kc_view *gx, const kc_view *gout);

  /* Normalisation over x [N, C, L] as the kl_backend slots say (groups >
  ** 0: per (n, group), mean/rstd [N*groups]; 0: batch norm, per channel). */
  int (*norm_stats)(kc_state *s, const kc_view *mean, const kc_view *rstd, const kc_view *var, const kc_view *x,
                    int64_t groups, double eps);
  int (*norm_forward)(kc_state *s, const kc_view *y, const kc_view *x, const kc_view *mean, const kc_view *rstd,
                      const kc_view *weight, const kc_view *bias, int64_t groups);
  int (*norm_backward)(kc_state *s, const kc_view *gx, const kc_view *gw, const kc_view *gb, const kc_view *gy,
                       const kc_view *x, const kc_view *mean, const kc_view *rstd, const kc_view *weight,
                       int64_t groups, int stats_of_x);
  /* mask (contiguous) = 0 with probability p, else 1/(1-p): element i
  ** draws from a counter-based generator keyed by (seed, i), so a launch
  ** needs no RNG state on the device (the engine takes seed from the
  ** context's RNG). */
  int (*dropout_mask)(kc_state *s, const kc_view *mask, double p, uint64_t seed);
  /* idx: contiguous int64, row = value - base (checked by the engine);
  ** pad: the 0-based row that gets no gradient, -1 for none. */
  int (*embedding)(kc_state *s, const kc_view *out, const kc_view *weight, const kc_view *idx, int64_t base);
  int (*embedding_backward)(kc_state *s, const kc_view *gw, const kc_view *gout, const kc_view *idx, int64_t base,
                            int64_t pad);

  /* Recurrent layers: a whole layer (all steps) per call; see kc_rnn. */
  int (*rnn_forward)(kc_state *s, const struct kc_rnn *a);
  int (*rnn_backward)(kc_state *s, const struct kc_rnn *a);

  /* Attention: forward writes out and lse, backward the gradients; see
  ** kc_sdpa. The products follow set_gemm_precision. */
  int (*sdpa_forward)(kc_state *s, const struct kc_sdpa *a);
  int (*sdpa_backward)(kc_state *s, const struct kc_sdpa *a);
  /* Optimizer, as the kl_backend slots of the same names (engine/keel_impl.h).
  ** a, v (nunits each) and st, spow, dsq are host arrays; an entry that
  ** fills a host result returns when it is there. state: nstate views
  ** (NULL where the optimizer keeps none), in keel_optim_state_names order.
  ** optim_update's wsq (nunits doubles; NULL: not wanted) gets each unit's
  ** sum of squares of the updated parameter, summed as the update writes
  ** it: the engine keeps it for the next statistics pass (engine/optim.c). */
  int (*grad_stats)(kc_state *s, const kc_view *g, int64_t nunits, const double *a, const double *v, double pw,
                    keel_grad_stats *st, double *spow, const kc_view *w);
  int (*grad_scale_)(kc_state *s, const kc_view *g, int64_t nunits, const double *a, const double *v);
  int (*optim_update)(kc_state *s, int kind, const keel_optim_hparams *h, int64_t step, const kc_view *p,
                      const kc_view *g, const kc_view *const *state, int nstate, unsigned fresh, int64_t nunits,
                      const double *a, const double *v, int nf, double *dsq, double *wsq);

  /* Batches of optimizer work with deferred host results. Between
  ** defer_results(s, KC_DEFER_ON) and the call that closes the batch
  ** (KC_DEFER_WAIT or KC_DEFER_LATER) the engine calls only grad_stats and
  ** optim_update (and error_string, error_kind); they check their
  ** arguments, return, and are queued: closing the batch runs them as a few
  ** multi-tensor launches (one descriptor upload, one copy of all host
  ** results). st, spow, dsq and wsq must stay valid, and are not to be read,
  ** until the results are written:
  ** - KC_DEFER_WAIT closes the batch, waits once and writes them;
  ** - KC_DEFER_LATER closes it and returns at once; results_wait waits and
  **   writes them, as does the closing KC_DEFER_WAIT of a later batch (its
  **   one wait writes both; close drops them unwritten).
  ** A launch error of the batch is the closing call's. Should the engine
  ** call any other entry while a batch is open, it first calls
  ** defer_results(s, KC_DEFER_FLUSH), which launches what is queued (its
  ** error, if any, kept for the closing call) so that stream order stays
  ** call order; the plugin's own memcpy, synchronize and free do so too.
  ** Batches do not nest. */
  int (*defer_results)(kc_state *s, int mode);
  int (*results_wait)(kc_state *s);

  /* The keel_matmul_precision of the float32 products that follow
  ** (matmul, conv2d, rnn): the engine sets it before each such call. */
  int (*set_gemm_precision)(kc_state *s, int prec);

  /* A step decided on the device, so that the host need not wait for the
  ** statistics. Inside an open batch, after the step's ntensors
  ** grad_stats calls (one unit each, no a or v): decide queues a kernel
  ** that turns their statistics into each tensor's scale a and bound v
  ** and the skip flag (kc_decide); the next ntensors optim_update calls
  ** of the batch (tensor i: the i-th, a and v NULL) read them from device
  ** memory, and change nothing when the step is skipped (dsq and wsq
  ** then get 0). out is written with the batch's other host results.
  ** results_ready writes the results of closed batches when their copy
  ** has completed and returns 1, else returns 0 at once (no wait). */
  int (*decide)(kc_state *s, const kc_decide *q, kc_decision *out);
  int (*results_ready)(kc_state *s);
} keel_cuda_table;

typedef const keel_cuda_table *(*keel_cuda_plugin_fn)(int abi_version);

#ifdef __cplusplus
}
#endif

#endif
