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
  keel_memory_stats mem;
  /* Freed storage blocks, by size class: big temporaries would otherwise
  ** return to the kernel and page-fault again on the next step. */
  kl_block *cache[KL_CACHE_CLASSES];
  size_t cache_limit;
  /* Small records reused instead of freed: a tiny op would otherwise
  ** spend a fifth of its time in malloc and free. */
  void *spare_tensors, *spare_storages;
  int n_spare_tensors, n_spare_storages;
};

KEEL_INTERNAL keel_status kl_error(keel_ctx *ctx, keel_status st, const char *fmt, ...);
KEEL_INTERNAL void *kl_malloc(keel_ctx *ctx, size_t n);   /* small structs */
/* Records of one fixed size from a spare list (see keel_ctx). */
KEEL_INTERNAL void *kl_spare_get(keel_ctx *ctx, void **list, int *count, size_t n);
KEEL_INTERNAL void kl_spare_put(keel_ctx *ctx, void **list, int *count, void *p, size_t n);
KEEL_INTERNAL void kl_free(keel_ctx *ctx, void *p, size_t n);
KEEL_INTERNAL void kl_ctx_ref(keel_ctx *ctx);
KEEL_INTERNAL void kl_ctx_unref(keel_ctx *ctx);
KEEL_INTERNAL uint64_t kl_rng_next(keel_ctx *ctx);
KEEL_INTERNAL double kl_rng_uniform(keel_ctx *ctx);       /* [0, 1) */
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

#define KL_MAX_SAVED 4
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
  /* @ops:norm */
  /* @ops:act */
  /* @ops:rnn */
  KL_OP_COUNT
};
KEEL_INTERNAL const kl_op_info kl_ops[];

/* True when an op on these inputs must be recorded. */
KEEL_INTERNAL int kl_needs_grad(const keel_ctx *ctx, int n, keel_tensor *const *in);
/* Records out as produced by op from in[0..n-1]; returns the node so the
** caller can fill saved tensors and params, or NULL on allocation failure. */
KEEL_INTERNAL kl_node *kl_record(keel_ctx *ctx, int op, int n, keel_tensor *const *in,
                                 keel_tensor *out);
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
/* @backward:norm */
/* @backward:act */
/* @backward:rnn */

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
  keel_status (*gather)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, int dim,
                        const keel_tensor *index);
  /* out += scatter(src) along dim (out already holds the base values). */
  keel_status (*scatter_add)(keel_ctx *ctx, keel_tensor *out, int dim,
                             const keel_tensor *index, const keel_tensor *src);
  keel_status (*index_select)(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a,
                              int dim, const keel_tensor *index);
  /* @slots:conv */
  /* @slots:norm */
  /* @slots:act */
  /* @slots:rnn */
  /* @slots:optim */
};

KEEL_INTERNAL const kl_backend kl_cpu_backend;
KEEL_INTERNAL const kl_backend *kl_backend_for(keel_ctx *ctx, keel_device dev);

/* }==================================================================== */

#endif
