/*
** keel_impl.h: private structures of the engine. Never installed.
**
** Names: kl_ for internals shared between engine files (hidden from the
** shared library by KEEL_INTERNAL), file-local statics otherwise.
*/
#ifndef KEEL_IMPL_H
#define KEEL_IMPL_H

#include <stdarg.h>
#include "keel.h"

#if defined(__GNUC__)
#define KEEL_INTERNAL __attribute__((visibility("hidden"))) extern
#else
#define KEEL_INTERNAL extern
#endif

/* For bugs only, never for input checking: input errors are statuses. */
#ifdef KEEL_DEBUG
#include <assert.h>
#define KEEL_ASSERT(c) assert(c)
#else
#define KEEL_ASSERT(c) ((void)0)
#endif

typedef struct kl_node kl_node;
typedef struct kl_hook kl_hook;
typedef struct kl_backend kl_backend;

/* {====================================================================
** Context and memory
** ===================================================================== */

/* Four classes per power of two from 256 B: 96 classes reach 4 GiB. */
#define KL_CACHE_CLASSES 96
/* Freed tensor handles and storage records kept for reuse. */
#define KL_SPARE_MAX 256

typedef struct kl_block { struct kl_block *next; size_t size; } kl_block;

struct keel_ctx {
  keel_alloc_fn alloc;
  void *alloc_ud;
  keel_status status;
  char err[1024];
  uint64_t rng[4];              /* xoshiro256** state */
  int grad_enabled;
  int index_base;
  int refcount;                 /* 1 for the host + 1 per live storage/tensor */
  int closed;                   /* keel_ctx_free was called */
  uint64_t next_hook_id;
  unsigned mark;                /* generation counter for graph walks */
  /* @ctx:anomaly */
  /* Anomaly detection (anomaly.c). anomaly is the keel_anomaly_mode, 0 when
  ** off: the only field the hot paths (kl_record, backward) read. One
  ** event slot: the first event waits here until the host takes it. */
  int anomaly;
  int anomaly_full;             /* also gather input statistics */
  int anomaly_pending;
  keel_anomaly_event anomaly_event;
  keel_memory_stats mem;
  /* Freed storage blocks, by size class: big temporaries would otherwise
  ** return to the kernel and page-fault again on the next step. */
  kl_block *cache[KL_CACHE_CLASSES];
  size_t cache_limit;
  /* Small records reused instead of freed: a tiny op would otherwise
  ** spend a fifth of its time in malloc and free. */
  void *spare_tensors, *spare_storages;
  int n_spare_tensors, n_spare_storages;
  uint64_t storage_gen;         /* the last kl_storage.gen handed out */
  /* @ctx:precision */
  int gemm_prec;                /* keel_matmul_precision of the products made now */
  /* @ctx:cuda */
  keel_device default_device;   /* of the public creation functions */
  struct kl_cuda *cuda;         /* device.c: NULL until CUDA is first asked for */
};

KEEL_INTERNAL keel_status kl_error(keel_ctx *ctx, keel_status st, const char *fmt, ...);
/* The context's error, kept across work whose own errors must not show
** (cleanup after a failure, a best-effort check inside a successful op). */
typedef struct kl_err_saved { keel_status status; char err[sizeof(((keel_ctx *)0)->err)]; } kl_err_saved;
KEEL_INTERNAL void kl_err_save(const keel_ctx *ctx, kl_err_saved *s);
KEEL_INTERNAL void kl_err_restore(keel_ctx *ctx, const kl_err_saved *s);
KEEL_INTERNAL void *kl_malloc(keel_ctx *ctx, size_t n);   /* small structs */
/* Records of one fixed size from a spare list (see keel_ctx). */
KEEL_INTERNAL void *kl_spare_get(keel_ctx *ctx, void **list, int *count, size_t n);
KEEL_INTERNAL void kl_spare_put(keel_ctx *ctx, void **list, int *count, void *p, size_t n);
KEEL_INTERNAL void kl_free(keel_ctx *ctx, void *p, size_t n);
KEEL_INTERNAL void kl_ctx_ref(keel_ctx *ctx);
KEEL_INTERNAL void kl_ctx_unref(keel_ctx *ctx);
KEEL_INTERNAL uint64_t kl_rng_next(keel_ctx *ctx);
KEEL_INTERNAL double kl_rng_uniform(keel_ctx *ctx);       /* [0, 1) */
/* The allocation size class of n bytes (KL_CACHE_CLASSES or more: too big
** to cache) and its rounded size; the CPU and device caches share it. */
KEEL_INTERNAL int kl_size_class(size_t n, size_t *rounded);
KEEL_INTERNAL void *kl_cpu_alloc(keel_ctx *ctx, size_t nbytes);
KEEL_INTERNAL void kl_cpu_free(keel_ctx *ctx, void *p, size_t nbytes);

/* }==================================================================== */

/* {====================================================================
** Storage and tensors
** ===================================================================== */

typedef struct kl_storage {
  int refcount;
  keel_ctx *ctx;
  keel_device device;
  size_t nbytes;
  void *data;
  uint64_t version;             /* bumped by in-place writes */
  /* Never the same for two storages of a context, though their records
  ** are recycled: (gen, version) names contents, so a cache of values
  ** derived from them (the optimizer's weight norms) need not retain it. */
  uint64_t gen;
  /* A small int64 tensor uploaded with keel_to_device keeps a private host
  ** copy of its values (contiguous, the storage's layout), valid while
  ** version == shadow_version: index and target checks read it instead of
  ** waiting for the device to send the values back (kl_host_values). */
  keel_tensor *shadow;
  uint64_t shadow_version;
} kl_storage;

struct kl_hook {
  kl_hook *next;
  uint64_t id;
  keel_hook_fn fn;
  void *ud;
  void (*free_ud)(void *ud);
};

struct keel_tensor {
  int refcount;
  keel_ctx *ctx;
  kl_storage *storage;
  keel_dtype dtype;
  int ndim;
  int64_t shape[KEEL_MAX_DIMS];
  int64_t stride[KEEL_MAX_DIMS];
  int64_t offset;
  int64_t numel;
  int requires_grad;            /* leaf flag; non-leaf: grad_fn != NULL */
  int retains_grad;
  keel_tensor *grad;
  kl_node *grad_fn;             /* owned reference */
  kl_hook *hooks;               /* leaf hooks (non-leaf ones live on grad_fn) */
};

KEEL_INTERNAL size_t kl_dtype_size[KEEL_DTYPE_COUNT];

/* t's values on the host: t itself on the CPU; for a device tensor, a view
** of its storage's valid host copy (kl_storage.shadow), else a download
** (which waits for the device). *out is a new reference. */
KEEL_INTERNAL keel_status kl_host_values(keel_ctx *ctx, const keel_tensor *t, keel_tensor **out);
/* h (a CPU index tensor the op has checked) copied to the CUDA device as
** int64 for the kernels, once per op; the copy keeps h's values as its
** host copy, so that checking it again (backward's ops) downloads nothing. */
KEEL_INTERNAL keel_status kl_upload_index(keel_ctx *ctx, const keel_tensor *h, keel_tensor **out);
/* New contiguous tensor, uninitialised. */
KEEL_INTERNAL keel_status kl_new(keel_ctx *ctx, keel_dtype dt, keel_device dev, int ndim,
                                 const int64_t *shape, keel_tensor **out);
KEEL_INTERNAL keel_status kl_new_like(keel_ctx *ctx, const keel_tensor *a, keel_dtype dt,
                                      keel_tensor **out);
/* New handle on a's storage with the given geometry; no autograd. */
KEEL_INTERNAL keel_status kl_alias(keel_ctx *ctx, const keel_tensor *a, int ndim,
                                   const int64_t *shape, const int64_t *stride,
                                   int64_t offset, keel_tensor **out);
KEEL_INTERNAL int64_t kl_numel(int ndim, const int64_t *shape);
KEEL_INTERNAL void kl_contiguous_strides(int ndim, const int64_t *shape, int64_t *stride);
KEEL_INTERNAL int kl_is_contiguous(const keel_tensor *t);
KEEL_INTERNAL char *kl_shape_str(char *buf, size_t n, int ndim, const int64_t *shape);
KEEL_INTERNAL keel_status kl_check_dim(keel_ctx *ctx, const char *fn, int dim, int ndim,
                                       int *norm);
KEEL_INTERNAL keel_status kl_check_same_ctx(keel_ctx *ctx, const char *fn,
                                            const keel_tensor *t);
KEEL_INTERNAL keel_status kl_check_float(keel_ctx *ctx, const char *fn,
                                         const keel_tensor *t);
KEEL_INTERNAL keel_status kl_check_writable(keel_ctx *ctx, const char *fn,
                                            const keel_tensor *t);
KEEL_INTERNAL void *kl_data(const keel_tensor *t);  /* address of element 0 */
KEEL_INTERNAL double kl_load(const void *p, keel_dtype dt);
KEEL_INTERNAL void kl_store(void *p, keel_dtype dt, double v);
/* Fills *view (a stack value, never released) with a seen through the
** target shape; for kernels that only read geometry. */
KEEL_INTERNAL void kl_broadcast_view(const keel_tensor *a, int ndim, const int64_t *shape,
                                     keel_tensor *view);
/* Expanded view of a (no autograd) with the target shape. */
KEEL_INTERNAL keel_status kl_broadcast_to(keel_ctx *ctx, const keel_tensor *a, int ndim,
                                          const int64_t *shape, keel_tensor **out);
KEEL_INTERNAL keel_status kl_broadcast_shape(keel_ctx *ctx, const char *fn, int na,
                                             const int64_t *sa, int nb, const int64_t *sb,
                                             int *nout, int64_t *sout);
KEEL_INTERNAL keel_dtype kl_promote(keel_dtype a, keel_dtype b);
/* Sums g over broadcast dimensions to get the given shape (no autograd). */
KEEL_INTERNAL keel_status kl_sum_to_shape(keel_ctx *ctx, keel_tensor *g, int ndim,
                                          const int64_t *shape, keel_tensor **out);
/* Releases *p and sets it to NULL. */
KEEL_INTERNAL void kl_release(keel_tensor **p);

/* }==================================================================== */

/* {====================================================================
** Autograd tape
** ===================================================================== */

/* One input of a node: where its gradient goes. */
typedef struct kl_edge {
  kl_node *fn;                  /* producer of the input, or NULL */
  keel_tensor *leaf;            /* leaf input that requires grad, or NULL */
  keel_dtype dtype;
  int ndim;
  int64_t shape[KEEL_MAX_DIMS];
} kl_edge;

#define KL_MAX_SAVED 6
#define KL_MAX_IPARAMS (2 * KEEL_MAX_DIMS + 2)

typedef keel_status (*kl_backward_fn)(keel_ctx *ctx, kl_node *n, keel_tensor *gout,
                                      keel_tensor **gin);

struct kl_node {
  int refcount;
  keel_ctx *ctx;
  int op;                       /* index in the op table (ops.c) */
  int freed;                    /* saved tensors dropped after backward */
  int n_in;
  kl_edge *in;                  /* n_in entries */
  keel_tensor *saved[KL_MAX_SAVED];
  uint64_t saved_version[KL_MAX_SAVED];
  double fparam[4];
  int64_t iparam[KL_MAX_IPARAMS];
  keel_dtype out_dtype;
  int out_ndim;
  int64_t out_shape[KEEL_MAX_DIMS];
  kl_hook *hooks;               /* hooks of the output tensor */
  keel_tensor *retained;        /* non-owning: output tensor with retain_grad */
  /* backward bookkeeping */
  unsigned mark;
  int deps;
  keel_tensor *pending;
  kl_node *next_dead;           /* free list while unreferencing */
  /* @node:anomaly */
  /* Set only while anomaly detection is on (anomaly.c). */
  uint32_t an_site;             /* creation site, interned by the host (keel_anomaly_stamp) */
  uint16_t an_absent;           /* bit i: input i was NULL (not described in events) */
  uint8_t an_state;             /* KL_AN_UNKNOWN, KL_AN_FINITE or KL_AN_NONFINITE: the output's values */
  uint8_t an_unstamped;         /* recorded in anomaly mode, site not given yet */
  uint8_t an_gstate;            /* backward: pending's values (KL_AN_*) */
  uint8_t gemm_prec;            /* ctx->gemm_prec when recorded: backward runs with it */
};

typedef struct kl_op_info {
  const char *name;
  kl_backward_fn backward;
} kl_op_info;

/* The op table (ops.c): one entry per differentiable op. */
enum {
  KL_OP_ADD, KL_OP_SUB, KL_OP_MUL, KL_OP_DIV, KL_OP_POW, KL_OP_MAXIMUM, KL_OP_MINIMUM,
  KL_OP_NEG, KL_OP_EXP, KL_OP_LOG, KL_OP_SQRT, KL_OP_ABS, KL_OP_RELU, KL_OP_SIGMOID,
  KL_OP_TANH, KL_OP_CLAMP, KL_OP_WHERE, KL_OP_CAST,
  KL_OP_VIEW, KL_OP_PERMUTE, KL_OP_NARROW, KL_OP_SELECT, KL_OP_EXPAND, KL_OP_COPY,
  KL_OP_SUM, KL_OP_PROD, KL_OP_AMAX, KL_OP_MAX_DIM, KL_OP_NORM,
  KL_OP_MATMUL, KL_OP_CAT, KL_OP_GATHER, KL_OP_SCATTER_ADD, KL_OP_INDEX_SELECT,
  /* @ops:conv */
  KL_OP_CONV2D, KL_OP_MAX_POOL2D, KL_OP_AVG_POOL2D, KL_OP_ADAPTIVE_AVG_POOL2D,
  /* @ops:norm */
  KL_OP_BATCH_NORM, KL_OP_LAYER_NORM, KL_OP_GROUP_NORM, KL_OP_DROPOUT, KL_OP_EMBEDDING,
  /* @ops:act */
  KL_OP_LEAKY_RELU, KL_OP_ELU, KL_OP_GELU, KL_OP_SILU, KL_OP_SOFTPLUS, KL_OP_SOFTMAX,
  KL_OP_LOG_SOFTMAX, KL_OP_MSE_LOSS, KL_OP_L1_LOSS, KL_OP_SMOOTH_L1_LOSS, KL_OP_HUBER_LOSS,
  KL_OP_CROSS_ENTROPY, KL_OP_NLL_LOSS, KL_OP_BCE_WITH_LOGITS,
  /* @ops:rnn */
  /* in keel_rnn_mode order: rnn.c adds the mode to the first of each four */
  KL_OP_RNN_TANH_CELL, KL_OP_RNN_RELU_CELL, KL_OP_LSTM_CELL, KL_OP_GRU_CELL,
  KL_OP_RNN_TANH_LAYER, KL_OP_RNN_RELU_LAYER, KL_OP_LSTM_LAYER, KL_OP_GRU_LAYER,
  /* @ops:attn */
  KL_OP_SDPA,
  /* @ops:cuda */
  KL_OP_TO_DEVICE,
  KL_OP_COUNT
};
KEEL_INTERNAL const kl_op_info kl_ops[];

/* True when an op on these inputs must be recorded. */
KEEL_INTERNAL int kl_needs_grad(const keel_ctx *ctx, int n, keel_tensor *const *in);
/* Records out as produced by op from in[0..n-1]; returns the node so the
** caller can fill saved tensors and params, or NULL on allocation failure. */
KEEL_INTERNAL kl_node *kl_record(keel_ctx *ctx, int op, int n, keel_tensor *const *in,
                                 keel_tensor *out);
/* Anomaly mode (anomaly.c): kl_record calls the first for every node it
** makes (out already holds the op's values); backward calls the second for
** each input gradient gi that node n produced from g (*g_state: what is
** known of g; reshaped: gi was summed or cast to fit its input), which
** sets *gi_state and fails (error mode) when gi is the first non-finite
** gradient made from a finite g. */
enum { KL_AN_UNKNOWN, KL_AN_FINITE, KL_AN_NONFINITE };
KEEL_INTERNAL void kl_anomaly_record(keel_ctx *ctx, kl_node *node, int n, keel_tensor *const *in,
                                     const keel_tensor *out);
KEEL_INTERNAL keel_status kl_anomaly_grad(keel_ctx *ctx, kl_node *n, const keel_tensor *g, int *g_state,
                                          const keel_tensor *gi, int i, int reshaped, int *gi_state);
/* Saves t (retained, as an alias outside the graph) in slot i of n. */
KEEL_INTERNAL keel_status kl_save(keel_ctx *ctx, kl_node *n, int i, keel_tensor *t);
KEEL_INTERNAL void kl_node_unref(kl_node *n);
KEEL_INTERNAL void kl_hooks_free(keel_ctx *ctx, kl_hook *h);

#define KL_NEEDS(n, i) ((n)->in[i].fn != NULL || (n)->in[i].leaf != NULL)

/* Backward rules, one per op, defined beside their forward. */
#define KL_BACKWARD(name) \
  KEEL_INTERNAL keel_status name(keel_ctx *ctx, kl_node *n, keel_tensor *gout, keel_tensor **gin)
KL_BACKWARD(kl_add_backward);     KL_BACKWARD(kl_sub_backward);
KL_BACKWARD(kl_mul_backward);     KL_BACKWARD(kl_div_backward);
KL_BACKWARD(kl_pow_backward);     KL_BACKWARD(kl_maximum_backward);
KL_BACKWARD(kl_minimum_backward); KL_BACKWARD(kl_neg_backward);
KL_BACKWARD(kl_exp_backward);     KL_BACKWARD(kl_log_backward);
KL_BACKWARD(kl_sqrt_backward);    KL_BACKWARD(kl_abs_backward);
KL_BACKWARD(kl_relu_backward);    KL_BACKWARD(kl_sigmoid_backward);
KL_BACKWARD(kl_tanh_backward);    KL_BACKWARD(kl_clamp_backward);
KL_BACKWARD(kl_where_backward);   KL_BACKWARD(kl_cast_backward);
KL_BACKWARD(kl_view_backward);    KL_BACKWARD(kl_permute_backward);
KL_BACKWARD(kl_narrow_backward);  KL_BACKWARD(kl_select_backward);
KL_BACKWARD(kl_expand_backward);  KL_BACKWARD(kl_copy_backward);
KL_BACKWARD(kl_sum_backward);     KL_BACKWARD(kl_prod_backward);
KL_BACKWARD(kl_amax_backward);    KL_BACKWARD(kl_max_dim_backward);
KL_BACKWARD(kl_norm_backward);    KL_BACKWARD(kl_matmul_backward);
KL_BACKWARD(kl_cat_backward);     KL_BACKWARD(kl_gather_backward);
KL_BACKWARD(kl_scatter_add_backward); KL_BACKWARD(kl_index_select_backward);
/* @backward:conv */
KL_BACKWARD(kl_conv2d_backward);     KL_BACKWARD(kl_max_pool2d_backward);
KL_BACKWARD(kl_avg_pool2d_backward); KL_BACKWARD(kl_adaptive_avg_pool2d_backward);
/* A 2-D sliding window over NCHW input (conv2d, pools): conv.c fills it,
** the backend kernels (backend_cpu_conv.c) read it. Pairs are {h, w}. */
typedef struct kl_win2d {
  int64_t n, c, h, w;           /* input [n, c, h, w] */
  int64_t oc, oh, ow;           /* output [n, oc, oh, ow] */
  int64_t k[2], s[2], pad[2], dil[2];  /* size, stride, top/left padding, dilation */
  int64_t groups;               /* conv2d */
  int64_t divisor;              /* avg_pool2d divisor_override, 0 for none */
  int count_include_pad, adaptive;   /* avg pools */
  int index_base;               /* max_pool2d indices */
} kl_win2d;
KEEL_INTERNAL keel_status kl_cpu_conv2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out,
                                        const keel_tensor *x, const keel_tensor *w,
                                        const keel_tensor *b);
KEEL_INTERNAL keel_status kl_cpu_conv2d_backward(keel_ctx *ctx, const kl_win2d *g,
                                                 const keel_tensor *gout, const keel_tensor *x,
                                                 const keel_tensor *w, keel_tensor *gx,
                                                 keel_tensor *gw, keel_tensor *gb);
KEEL_INTERNAL keel_status kl_cpu_max_pool2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out,
                                            keel_tensor *idx, const keel_tensor *x);
KEEL_INTERNAL keel_status kl_cpu_max_pool2d_backward(keel_ctx *ctx, const kl_win2d *g,
                                                     keel_tensor *gx, const keel_tensor *gout,
                                                     const keel_tensor *idx);
KEEL_INTERNAL keel_status kl_cpu_avg_pool2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out,
                                            const keel_tensor *x);
KEEL_INTERNAL keel_status kl_cpu_avg_pool2d_backward(keel_ctx *ctx, const kl_win2d *g,
                                                     keel_tensor *gx, const keel_tensor *gout);
/* @backward:norm */
KL_BACKWARD(kl_batch_norm_backward); KL_BACKWARD(kl_layer_norm_backward);
KL_BACKWARD(kl_group_norm_backward); KL_BACKWARD(kl_dropout_backward);
KL_BACKWARD(kl_embedding_backward);
/* CPU kernels of the norm area (backend_cpu_norm.c); see the slots. */
KEEL_INTERNAL keel_status kl_cpu_norm_stats(keel_ctx *ctx, keel_tensor *mean, keel_tensor *rstd, keel_tensor *var,
                                            const keel_tensor *x, int64_t groups, double eps);
KEEL_INTERNAL keel_status kl_cpu_norm_forward(keel_ctx *ctx, keel_tensor *y, const keel_tensor *x,
                                              const keel_tensor *mean, const keel_tensor *rstd,
                                              const keel_tensor *weight, const keel_tensor *bias, int64_t groups);
KEEL_INTERNAL keel_status kl_cpu_norm_backward(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gw, keel_tensor *gb,
                                               const keel_tensor *gy, const keel_tensor *x, const keel_tensor *mean,
                                               const keel_tensor *rstd, const keel_tensor *weight, int64_t groups,
                                               int stats_of_x);
KEEL_INTERNAL keel_status kl_cpu_dropout_mask(keel_ctx *ctx, keel_tensor *mask, double p);
KEEL_INTERNAL keel_status kl_cpu_embedding(keel_ctx *ctx, keel_tensor *out, const keel_tensor *weight,
                                           const keel_tensor *idx, int64_t base);
KEEL_INTERNAL keel_status kl_cpu_embedding_backward(keel_ctx *ctx, keel_tensor *gw, const keel_tensor *gout,
                                                    const keel_tensor *idx, int64_t base, int64_t pad);
/* @backward:act */
KL_BACKWARD(kl_act_backward);     KL_BACKWARD(kl_softmax_backward);
KL_BACKWARD(kl_ploss_backward);   KL_BACKWARD(kl_closs_backward);
KL_BACKWARD(kl_bce_backward);
/* a (retained) when contiguous with dtype dt, else such a copy; no autograd */
KEEL_INTERNAL keel_status kl_act_dense(keel_ctx *ctx, keel_tensor *a, keel_dtype dt, keel_tensor **out);
/* A class loss (cross entropy, nll): input seen as [n, c, inner]. Its
** aux tensor (float64, contiguous, on the input's device) holds nl + 1
** values, nl = logits ? n * inner : 0: each sample's logsumexp, then the
** divisor of a "mean" (the kept targets' weight sum, or the sample count
** for probability targets). Forward writes them and backward reads them
** on the device, so the loss never waits for the device to give the
** divisor to the host. */
typedef struct kl_closs {
  int64_t n, c, inner;
  double smoothing;
  /* class-index targets (int64): a value equal to ignore_index
  ** (KEEL_NO_IGNORE: none) is ignored, any other is class value -
  ** index_base. The CPU backend always gets loss.c's converted copy
  ** (base 0, ignore -1); the CUDA one may get the caller's own tensor
  ** (the context's base, the caller's ignore_index). */
  int64_t index_base, ignore_index;
  int reduction;      /* keel_reduction */
  int logits;         /* input holds logits (cross entropy), else log-probabilities */
  int probs;          /* target holds probabilities shaped like the input */
} kl_closs;
/* CPU kernels of the act area (backend_cpu_act.c); slots below. */
KEEL_INTERNAL keel_status kl_cpu_act(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *a,
                                     const double *p);
KEEL_INTERNAL keel_status kl_cpu_act_backward(keel_ctx *ctx, int op, keel_tensor *gin,
                                              const keel_tensor *gout, const keel_tensor *a,
                                              const double *p);
KEEL_INTERNAL keel_status kl_cpu_softmax(keel_ctx *ctx, int log_out, keel_tensor *out,
                                         const keel_tensor *a, int dim);
KEEL_INTERNAL keel_status kl_cpu_softmax_backward(keel_ctx *ctx, int log_out, keel_tensor *gin,
                                                  const keel_tensor *gout, const keel_tensor *y, int dim);
KEEL_INTERNAL keel_status kl_cpu_ploss(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *x,
                                       const keel_tensor *y, double p, int red);
KEEL_INTERNAL keel_status kl_cpu_ploss_backward(keel_ctx *ctx, int op, keel_tensor *gx,
                                                const keel_tensor *gout, const keel_tensor *x,
                                                const keel_tensor *y, double p, int red);
KEEL_INTERNAL keel_status kl_cpu_closs(keel_ctx *ctx, const kl_closs *q, keel_tensor *out,
                                       keel_tensor *aux, const keel_tensor *x,
                                       const keel_tensor *target, const keel_tensor *weight);
KEEL_INTERNAL keel_status kl_cpu_closs_backward(keel_ctx *ctx, const kl_closs *q, keel_tensor *gx,
                                                keel_tensor *gt, const keel_tensor *gout,
                                                const keel_tensor *x, const keel_tensor *target,
                                                const keel_tensor *weight, const keel_tensor *aux);
KEEL_INTERNAL keel_status kl_cpu_bce(keel_ctx *ctx, keel_tensor *out, const keel_tensor *x,
                                     const keel_tensor *y, const keel_tensor *w,
                                     const keel_tensor *pw, int red);
KEEL_INTERNAL keel_status kl_cpu_bce_backward(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gy,
                                              const keel_tensor *gout, const keel_tensor *x,
                                              const keel_tensor *y, const keel_tensor *w,
                                              const keel_tensor *pw, int red);
/* @backward:rnn */
KL_BACKWARD(kl_rnn_backward);
/* Arguments of the recurrent kernels (rnn.c and backend_cpu_rnn.c give the
** layouts). Tensors are contiguous, of one float dtype; optional ones NULL. */
typedef struct kl_rnn_args {
  int mode, reverse;                    /* keel_rnn_mode; steps run t = T-1 .. 0 */
  int64_t T, B, In, H;                  /* steps, batch, input and hidden sizes */
  const keel_tensor *x, *h0, *c0, *w_ih, *w_hh, *b_ih, *b_hh;
  keel_tensor *out;                     /* forward fills it */
  keel_tensor *ws;                      /* forward makes it, backward reads it */
  const keel_tensor *gout;              /* backward: gradient of out */
  keel_tensor *dx, *dh0, *dc0, *dw_ih, *dw_hh, *db_ih, *db_hh;  /* backward fills the non-NULL */
} kl_rnn_args;
KEEL_INTERNAL keel_status kl_cpu_rnn_forward(keel_ctx *ctx, kl_rnn_args *a);
KEEL_INTERNAL keel_status kl_cpu_rnn_backward(keel_ctx *ctx, kl_rnn_args *a);
/* The workspace forward makes: where each region starts and the total, in
** elements (backend_cpu_rnn.c describes the regions; one a mode lacks
** starts at 0). The one layout: the CUDA backend allocates total elements
** on the device and hands these offsets to the plugin's kernels. */
typedef struct kl_rnn_ws { int64_t hp, hn, c, c0, g, tc, total; } kl_rnn_ws;
KEEL_INTERNAL kl_rnn_ws kl_rnn_ws_layout(const kl_rnn_args *a);

/* @backward:attn */
KL_BACKWARD(kl_sdpa_backward);
/* Arguments of the attention kernels (attention.c; backend_cpu_attn.c is
** the specification). B is the product of the batch dims; q [B, L, E],
** k [B, S, E], v [B, S, Ev], out and gout [B, L, Ev], lse [B, L] (the
** row logsumexp of the scaled, biased, masked scores; -inf for a fully
** masked row), dq/dk/dv shaped like q/k/v: contiguous, one float dtype.
** bias (or NULL) is a view [batch..., L, S] (zero strides where it
** broadcasts; its leading dims multiply to B); dbias (or NULL) is dense
** [B, L, S] and gets dL/d(score) of every element. Dropout keeps element
** (b, i, j) unless kl_sdpa_drop says otherwise. Backward outputs arrive
** uninitialised and are written whole; NULL ones are not wanted. */
typedef struct kl_sdpa_args {
  int64_t B, L, S, E, Ev;
  double scale, p;
  uint64_t seed;
  int causal;
  const keel_tensor *q, *k, *v, *bias;
  keel_tensor *out, *lse;               /* forward fills them */
  const keel_tensor *gout;
  keel_tensor *dq, *dk, *dv, *dbias;
} kl_sdpa_args;
KEEL_INTERNAL keel_status kl_cpu_sdpa_forward(keel_ctx *ctx, const kl_sdpa_args *a);
KEEL_INTERNAL keel_status kl_cpu_sdpa_backward(keel_ctx *ctx, const kl_sdpa_args *a);
/* The dropout decision for score element idx = (b*L + i)*S + j under
** seed: 1 when dropped with probability p (kernels/attention.cu draws the
** same, so both devices drop the same weights). */
KEEL_INTERNAL int kl_sdpa_drop(uint64_t seed, uint64_t idx, double p);

/* }==================================================================== */

/* {====================================================================
** Backends: one vtable per device. Ops check shapes and dtypes, then call
** one of these; kernels see tensors of one dtype with matching shapes
** (inputs already broadcast to the output by stride-0 views).
** ===================================================================== */

struct kl_backend {
  const char *name;
  void *(*alloc)(keel_ctx *ctx, size_t nbytes);
  void (*free)(keel_ctx *ctx, void *p, size_t nbytes);
  /* dst = src, any strides, converting dtype. */
  keel_status (*copy)(keel_ctx *ctx, keel_tensor *dst, const keel_tensor *src);
  keel_status (*fill)(keel_ctx *ctx, keel_tensor *dst, double v);
  keel_status (*binary)(keel_ctx *ctx, keel_binop op, keel_tensor *out,
                        const keel_tensor *a, const keel_tensor *b);
  /* p0, p1: clamp bounds */
  keel_status (*unary)(keel_ctx *ctx, keel_unop op, keel_tensor *out,
                       const keel_tensor *a);
  keel_status (*clamp)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a,
                       double lo, double hi);
  keel_status (*where)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *c,
                       const keel_tensor *a, const keel_tensor *b);
  /* out has a's ndim with reduced dims of size 1 (reduce[d] != 0);
  ** idx (optional) receives arg positions for MAX/MIN over one dim. */
  keel_status (*reduce)(keel_ctx *ctx, keel_redop op, keel_tensor *out, keel_tensor *idx,
                        const keel_tensor *a, const int *reduce);
  keel_status (*norm)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a,
                      const int *reduce, double p);
  /* out[b] = op(a[b]) @ op(b[b]) with 3-D operands of equal batch (stride 0
  ** allowed on the batch dim). */
  keel_status (*matmul)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a,
                        const keel_tensor *b);
  /* index: int64 of any strides, on a's device, its values counted from
  ** the context's index base (checked by the op) */
  keel_status (*gather)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, int dim,
                        const keel_tensor *index);
  /* out += scatter(src) along dim (out already holds the base values). */
  keel_status (*scatter_add)(keel_ctx *ctx, keel_tensor *out, int dim,
                             const keel_tensor *index, const keel_tensor *src);
  keel_status (*index_select)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a,
                              int dim, const keel_tensor *index);
  /* @slots:conv */
  /* conv2d and pools (conv.c): dense NCHW operands, fresh outputs. b, idx
  ** (max_pool2d) and any of gx, gw, gb may be NULL; avg_pool2d also does
  ** the adaptive pool (g->adaptive). */
  keel_status (*conv2d)(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, const keel_tensor *x,
                        const keel_tensor *w, const keel_tensor *b);
  keel_status (*conv2d_backward)(keel_ctx *ctx, const kl_win2d *g, const keel_tensor *gout,
                                 const keel_tensor *x, const keel_tensor *w, keel_tensor *gx,
                                 keel_tensor *gw, keel_tensor *gb);
  keel_status (*max_pool2d)(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, keel_tensor *idx,
                            const keel_tensor *x);
  keel_status (*max_pool2d_backward)(keel_ctx *ctx, const kl_win2d *g, keel_tensor *gx,
                                     const keel_tensor *gout, const keel_tensor *idx);
  keel_status (*avg_pool2d)(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out,
                            const keel_tensor *x);
  keel_status (*avg_pool2d_backward)(keel_ctx *ctx, const kl_win2d *g, keel_tensor *gx,
                                     const keel_tensor *gout);
  /* @slots:norm */
  /* Normalisation over x [N, C, L] (contiguous; y, gy, gx alike), with
  ** per-channel weight/bias/gw/gb [C] (contiguous, or NULL). groups > 0:
  ** statistics per (n, group of C/groups channels), mean/rstd [N*groups]
  ** (group and layer norm); groups == 0: per channel over N and L,
  ** mean/rstd [C] (batch norm). var (optional) gets the biased variance. */
  keel_status (*norm_stats)(keel_ctx *ctx, keel_tensor *mean, keel_tensor *rstd, keel_tensor *var,
                            const keel_tensor *x, int64_t groups, double eps);
  keel_status (*norm_forward)(keel_ctx *ctx, keel_tensor *y, const keel_tensor *x, const keel_tensor *mean,
                              const keel_tensor *rstd, const keel_tensor *weight, const keel_tensor *bias,
                              int64_t groups);
  /* Fused backward; stats_of_x: mean/rstd were computed from x (else they
  ** were given, as batch norm's running stats in eval). */
  keel_status (*norm_backward)(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gw, keel_tensor *gb,
                               const keel_tensor *gy, const keel_tensor *x, const keel_tensor *mean,
                               const keel_tensor *rstd, const keel_tensor *weight, int64_t groups,
                               int stats_of_x);
  /* mask (contiguous) = 0 with probability p, else 1/(1-p), from the context RNG */
  keel_status (*dropout_mask)(keel_ctx *ctx, keel_tensor *mask, double p);
  /* out [n, D] = weight [V, D] rows idx - base (int64 [n] on the weight's
  ** device, checked); all contiguous */
  keel_status (*embedding)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *weight, const keel_tensor *idx,
                           int64_t base);
  /* gw [V, D] += gout [n, D] rows at idx - base, skipping row pad (0-based, -1: none) */
  keel_status (*embedding_backward)(keel_ctx *ctx, keel_tensor *gw, const keel_tensor *gout,
                                    const keel_tensor *idx, int64_t base, int64_t pad);
  /* @slots:act */
  /* Contiguous tensors of one float dtype. act: pointwise activation op
  ** (KL_OP_*) with the node's parameters p; softmax over dim (log_out: log);
  ** ploss: pointwise loss op with beta/delta p; closs: class loss, also
  ** writing each sample's logsumexp (float64, cross entropy only) and the
  ** "mean" divisor; bce: w, pw NULL or shaped like x. gx/gy/gt NULL: not needed. */
  keel_status (*act)(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *a, const double *p);
  keel_status (*act_backward)(keel_ctx *ctx, int op, keel_tensor *gin, const keel_tensor *gout,
                              const keel_tensor *a, const double *p);
  keel_status (*softmax)(keel_ctx *ctx, int log_out, keel_tensor *out, const keel_tensor *a, int dim);
  keel_status (*softmax_backward)(keel_ctx *ctx, int log_out, keel_tensor *gin,
                                  const keel_tensor *gout, const keel_tensor *y, int dim);
  keel_status (*ploss)(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *x,
                       const keel_tensor *y, double p, int red);
  keel_status (*ploss_backward)(keel_ctx *ctx, int op, keel_tensor *gx, const keel_tensor *gout,
                                const keel_tensor *x, const keel_tensor *y, double p, int red);
  keel_status (*closs)(keel_ctx *ctx, const kl_closs *q, keel_tensor *out, keel_tensor *aux,
                       const keel_tensor *x, const keel_tensor *target, const keel_tensor *weight);
  keel_status (*closs_backward)(keel_ctx *ctx, const kl_closs *q, keel_tensor *gx, keel_tensor *gt,
                                const keel_tensor *gout, const keel_tensor *x,
                                const keel_tensor *target, const keel_tensor *weight,
                                const keel_tensor *aux);
  keel_status (*bce)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *x, const keel_tensor *y,
                     const keel_tensor *w, const keel_tensor *pw, int red);
  keel_status (*bce_backward)(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gy,
                              const keel_tensor *gout, const keel_tensor *x, const keel_tensor *y,
                              const keel_tensor *w, const keel_tensor *pw, int red);
  /* @slots:rnn */
  keel_status (*rnn_forward)(keel_ctx *ctx, kl_rnn_args *a);
  keel_status (*rnn_backward)(keel_ctx *ctx, kl_rnn_args *a);
  /* @slots:attn */
  keel_status (*sdpa_forward)(keel_ctx *ctx, const kl_sdpa_args *a);
  keel_status (*sdpa_backward)(keel_ctx *ctx, const kl_sdpa_args *a);
  /* @slots:optim */
  /* Statistics of contiguous g split into nunits equal runs (st[u]), seen
  ** through x -> clamp(x * a[u], -v[u], v[u]) when a != NULL; spow[u] gets
  ** sum |x|^pw when spow != NULL; st[u].w_sumsq the sum of squares of the
  ** same elements of w (contiguous, same shape: the parameter) when w !=
  ** NULL, read in the same loop as g when a == NULL. */
  keel_status (*grad_stats)(keel_ctx *ctx, const keel_tensor *g, int64_t nunits, const double *a,
                            const double *v, double pw, keel_grad_stats *st, double *spow,
                            const keel_tensor *w);
  /* g = clamp(g * a[u], -v[u], v[u]) in place (contiguous g). */
  keel_status (*grad_scale_)(keel_ctx *ctx, keel_tensor *g, int64_t nunits, const double *a,
                             const double *v);
  /* One update of contiguous p from g (same shape and dtype) with step
  ** (already incremented) and state buffers as optim.c lays them out; bit
  ** 0 of fresh: SGD's momentum buffer is new. Gradient elements of unit u
  ** are clipped to clamp(g * a[u], -v[u], v[u]); nf is ZERO or KEEP when g
  ** has non-finite elements, anything else when it has none. *dsq (may be
  ** NULL) gets the sum of squares of the changes made to p, wsq[u] (may be
  ** NULL) unit u's sum of squares of p after the update (elements a "keep"
  ** left alone included). A device backend may write both later (see
  ** kl_cuda_defer). */
  keel_status (*optim_update)(keel_ctx *ctx, keel_optim_kind kind, const keel_optim_hparams *h,
                              int64_t step, keel_tensor *p, const keel_tensor *g,
                              keel_tensor *const *state, unsigned fresh, int64_t nunits,
                              const double *a, const double *v, keel_nonfinite nf, double *dsq,
                              double *wsq);
};

KEEL_INTERNAL const kl_backend kl_cpu_backend;
/* CPU GEMM of every backend_cpu*.c file: C[m,n] = op(A)[m,k] op(B)[k,n] +
** beta C, row-major, float32 or float64. Under a reduced matmul precision
** (ctx->gemm_prec) float32 operands are rounded copies (see keel.h). */
KEEL_INTERNAL keel_status kl_cpu_gemm(keel_ctx *ctx, keel_dtype dt, int ta, int tb, int64_t m, int64_t n,
                                      int64_t k, const void *a, int64_t lda, const void *b, int64_t ldb,
                                      double beta, void *c, int64_t ldc);
/* kl_cpu_gemm where the caller rounded an operand to ctx's matmul
** precision already (kl_round_matrix; the rounding of keel_round.h): bit
** KL_GEMM_A_ROUNDED (B) of ready says a (b) is used as it is. Same
** results as kl_cpu_gemm; a loop-invariant operand is rounded once. */
#define KL_GEMM_A_ROUNDED 1u
#define KL_GEMM_B_ROUNDED 2u
KEEL_INTERNAL keel_status kl_cpu_gemm_ex(keel_ctx *ctx, unsigned ready, keel_dtype dt, int ta, int tb, int64_t m,
                                         int64_t n, int64_t k, const void *a, int64_t lda, const void *b,
                                         int64_t ldb, double beta, void *c, int64_t ldc);
/* dst[i*cols + j] = src[i*ld + j] rounded to precision p (KEEL_MATMUL_*). */
KEEL_INTERNAL void kl_round_matrix(int p, float *dst, const float *src, int64_t rows, int64_t cols, int64_t ld);
/* NULL when dev cannot be used (CUDA: see kl_cuda_ready). */
KEEL_INTERNAL const kl_backend *kl_backend_for(keel_ctx *ctx, keel_device dev);

/* @decl:cuda: the device layer (device.c) and the CUDA backend
** (backend_cuda.c), which calls the plugin (kernels/keel_cuda.h). */
KEEL_INTERNAL const kl_backend kl_cuda_backend;
/* Opens the plugin on first use; 1 when CUDA tensors can be made. */
KEEL_INTERNAL int kl_cuda_ready(keel_ctx *ctx);
/* Why CUDA is unavailable (one line), after kl_cuda_ready said 0. */
KEEL_INTERNAL const char *kl_cuda_why(const keel_ctx *ctx);
KEEL_INTERNAL void kl_cuda_shutdown(keel_ctx *ctx);       /* context teardown */
/* The open plugin's table and this context's plugin state (after
** kl_cuda_ready said 1), and a plugin status code as the context's error,
** naming fn (KEEL_ERR_NOMEM for device memory, else KEEL_ERR_DEVICE). */
KEEL_INTERNAL const struct keel_cuda_table *kl_cuda_table(const keel_ctx *ctx);
KEEL_INTERNAL struct kc_state *kl_cuda_state(const keel_ctx *ctx);
KEEL_INTERNAL keel_status kl_cuda_error(keel_ctx *ctx, const char *fn, int code);
/* Optimizer batches (keel_cuda.h's defer_results). Between KL_DEFER_ON
** and KL_DEFER_WAIT or _LATER the CUDA backend's grad_stats and
** optim_update calls are queued and run as a few multi-tensor launches
** when the batch closes; their host results arrive at WAIT (one wait for
** all), or with LATER at kl_cuda_results_wait or at the closing WAIT of
** a later batch (one wait for both). Any other plugin call through kl_cuda_state launches an open
** batch first. No-ops without CUDA. kl_cuda_batch_state: the state for
** grad_stats and optim_update, which queue. */
enum { KL_DEFER_WAIT = 0, KL_DEFER_ON = 1, KL_DEFER_LATER = 2 };
KEEL_INTERNAL keel_status kl_cuda_defer(keel_ctx *ctx, const char *fn, int mode);
KEEL_INTERNAL keel_status kl_cuda_results_wait(keel_ctx *ctx, const char *fn);
/* A step decided on the device (keel_cuda.h's decide and results_ready):
** whether the plugin can; the decision, inside an open batch after the
** step's statistics; the results of closed batches written when their
** copy is done (*ready 1; else 0 and nothing written: no wait). */
struct kc_decide;
struct kc_decision;
KEEL_INTERNAL int kl_cuda_can_decide(const keel_ctx *ctx);
KEEL_INTERNAL keel_status kl_cuda_decide(keel_ctx *ctx, const char *fn, const struct kc_decide *q,
                                         struct kc_decision *out);
KEEL_INTERNAL keel_status kl_cuda_results_ready(keel_ctx *ctx, const char *fn, int *ready);
KEEL_INTERNAL struct kc_state *kl_cuda_batch_state(const keel_ctx *ctx);
/* The context's caching device allocator. alloc sets the context's error
** (naming fn) and returns NULL on failure. */
KEEL_INTERNAL void *kl_cuda_alloc(keel_ctx *ctx, size_t nbytes);
KEEL_INTERNAL void kl_cuda_free(keel_ctx *ctx, void *p, size_t nbytes);
/* Fails with KEEL_ERR_DEVICE naming fn and both devices when b (may be
** NULL) is not on a's device. Every op with several tensor inputs calls it. */
KEEL_INTERNAL keel_status kl_check_device(keel_ctx *ctx, const char *fn, const keel_tensor *a,
                                          const keel_tensor *b);
/* A new contiguous tensor on dev with dtype dt holding src's values (any
** devices, any strides); not recorded. */
KEEL_INTERNAL keel_status kl_transfer(keel_ctx *ctx, const keel_tensor *src, keel_device dev,
                                      keel_dtype dt, keel_tensor **out);
/* A new tensor on dev filled with v; not recorded. */
KEEL_INTERNAL keel_status kl_full(keel_ctx *ctx, keel_dtype dt, keel_device dev, int ndim,
                                  const int64_t *shape, double v, keel_tensor **out);
KL_BACKWARD(kl_to_device_backward);

/* @decl:optim: the optimizer area's CPU kernels (backend_cpu_optim.c) and
** the clip chain that optim.c runs (clip.c). */
KEEL_INTERNAL keel_status kl_cpu_grad_stats(keel_ctx *ctx, const keel_tensor *g, int64_t nunits,
                                            const double *a, const double *v, double pw,
                                            keel_grad_stats *st, double *spow, const keel_tensor *w);
KEEL_INTERNAL keel_status kl_cpu_grad_scale_(keel_ctx *ctx, keel_tensor *g, int64_t nunits,
                                             const double *a, const double *v);
KEEL_INTERNAL keel_status kl_cpu_optim_update(keel_ctx *ctx, keel_optim_kind kind,
                                              const keel_optim_hparams *h, int64_t step,
                                              keel_tensor *p, const keel_tensor *g,
                                              keel_tensor *const *state, unsigned fresh,
                                              int64_t nunits, const double *a, const double *v,
                                              keel_nonfinite nf, double *dsq, double *wsq);

typedef struct kl_clip_chain kl_clip_chain;
/* One step's clip work: units (one per tensor, or per AGC unit), each
** unit's scale a and bound v, its statistics, and the outcome. */
typedef struct kl_clip_work {
  int m, cap_m;                 /* tensors */
  int64_t nu, cap_u;            /* units */
  int64_t *u0;                  /* m + 1: first unit of each tensor */
  double *a, *v;                /* per unit */
  keel_grad_stats *us;          /* per unit: statistics of the current view */
  double *spow, *wsq;           /* per unit: sum |x|^pw, sum of the parameter's squares */
  double pw;                    /* order of spow (0: none) */
  keel_grad_stats *ts;          /* per tensor: statistics of g * gs (the unscaled gradient) */
  double grad_norm, coef;
  int clipped;
  int64_t nonfinite;
} kl_clip_work;
KEEL_INTERNAL keel_status kl_clip_chain_new(keel_ctx *ctx, int n, const keel_clip_spec *specs,
                                            kl_clip_chain **out);
KEEL_INTERNAL void kl_clip_chain_free(kl_clip_chain *c);
KEEL_INTERNAL keel_status kl_clip_chain_threshold(keel_ctx *ctx, kl_clip_chain *c, int i, double t);
KEEL_INTERNAL keel_status kl_clip_chain_get_state(keel_ctx *ctx, kl_clip_chain *c, int i,
                                                  keel_clip_state *s);
KEEL_INTERNAL keel_status kl_clip_chain_set_state(keel_ctx *ctx, kl_clip_chain *c, int i,
                                                  const keel_clip_state *s);
/* gs: the loss scale's inverse (1: none); every unit's scale a starts at it.
** wk (NULL: none): wk[k] non-NULL holds parameter k's sums of squares per
** unit, known already (p[k] is then not read); read after the pass waits. */
KEEL_INTERNAL keel_status kl_clip_stats(keel_ctx *ctx, const kl_clip_chain *c, kl_clip_work *w, int m,
                                        keel_tensor *const *g, keel_tensor *const *p,
                                        const double *const *wk, double gs);
/* kl_clip_stats in halves, for a caller that manages the CUDA batch:
** begin queues the statistics (device results arrive when the batch's
** results are written), end totals them once they are there. */
KEEL_INTERNAL keel_status kl_clip_stats_begin(keel_ctx *ctx, const kl_clip_chain *c, kl_clip_work *w, int m,
                                              keel_tensor *const *g, keel_tensor *const *p,
                                              const double *const *wk, double gs);
KEEL_INTERNAL void kl_clip_stats_end(kl_clip_work *w, const double *const *wk);
/* 1 when chain c can be decided on the device (keel_cuda.h's kc_decide,
** filled in q but for its ntensors and skip_nonfinite), else 0. */
KEEL_INTERNAL int kl_clip_device_chain(const kl_clip_chain *c, struct kc_decide *q);
/* The units chain c splits gradient g into (AGC's, else 1). */
KEEL_INTERNAL int64_t kl_clip_units(const kl_clip_chain *c, const keel_tensor *g);
/* g may be NULL when the chain needs no second statistics pass. */
KEEL_INTERNAL keel_status kl_clip_eval(keel_ctx *ctx, kl_clip_chain *c, kl_clip_work *w,
                                       keel_tensor *const *g);
/* kl_clip_eval changes no adaptive state; commit makes it what the last
** eval computed (cannot fail), discard drops that. */
KEEL_INTERNAL void kl_clip_commit(kl_clip_chain *c);
KEEL_INTERNAL void kl_clip_discard(kl_clip_chain *c);
KEEL_INTERNAL void kl_clip_work_free(keel_ctx *ctx, kl_clip_work *w);
KEEL_INTERNAL int64_t kl_clip_agc_units(const keel_tensor *t);

/* }==================================================================== */

#endif
