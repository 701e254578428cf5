/*
** keel.h: the whole public C API of the keel engine.
**
** A C host needs nothing else (no Lua). A minimal session:
**
**   keel_ctx *ctx;  keel_tensor *w, *x, *y, *loss;
**   keel_ctx_new(&ctx, NULL, NULL);                 // default allocator
**   int64_t ws[2] = {4, 3}, xs[2] = {8, 4};
**   keel_randn(ctx, KEEL_F32, 2, ws, &w);
**   keel_set_requires_grad(ctx, w, 1);
**   keel_randn(ctx, KEEL_F32, 2, xs, &x);
**   keel_matmul(ctx, x, w, &y);                     // y = x @ w, recorded on the tape
**   keel_reduce(ctx, KEEL_RED_SUM, y, 0, NULL, 0, &loss, NULL);
**   if (keel_backward(ctx, loss, NULL, 0) != KEEL_OK)
**     fprintf(stderr, "%s\n", keel_last_error(ctx));
**   // keel_tensor_grad(w) now holds d loss / d w
**   keel_tensor_release(loss); ... keel_ctx_free(ctx);
**
** Rules that hold everywhere:
** - Every function that can fail returns keel_status; on failure the
**   message is in keel_last_error(ctx) and no output was produced.
** - Functions named keel_<op>(ctx, ..., keel_tensor **out) return a NEW
**   reference in *out; release it with keel_tensor_release().
** - Inputs are borrowed: the engine retains what it keeps.
** - Dimensions are 0-based here (the Lua binding converts). Index VALUES
**   (gather, index_select, argmax results) use the context's index base,
**   0 by default, 1 in the Lua binding (keel_set_index_base).
** - Nothing aborts or exits; there is no global mutable state. Two
**   contexts are fully independent; a tensor belongs to one context.
*/
#ifndef KEEL_H
#define KEEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define KEEL_API __declspec(dllexport)
#else
#define KEEL_API __attribute__((visibility("default")))
#endif

#define KEEL_VERSION "0.1.0"
#define KEEL_MAX_DIMS 8
/* "no particular dimension": squeeze every size-1 dim, argmax over all. */
#define KEEL_DIM_NONE (-0x7fff)

/* {====================================================================
** Types
** ===================================================================== */

typedef struct keel_ctx keel_ctx;
typedef struct keel_tensor keel_tensor;

typedef enum keel_status {
  KEEL_OK = 0,
  KEEL_ERR_ARG,       /* bad argument value (dimension, option, ...) */
  KEEL_ERR_SHAPE,     /* shapes that do not fit together */
  KEEL_ERR_TYPE,      /* dtype not supported by this operation */
  KEEL_ERR_INDEX,     /* index out of range */
  KEEL_ERR_NOMEM,     /* allocation failed */
  KEEL_ERR_DEVICE,    /* device not available, or mixed devices */
  KEEL_ERR_STATE,     /* misuse of autograd state (freed graph, ...) */
  KEEL_ERR_CALLBACK,  /* a host callback (hook) reported an error */
  KEEL_ERR_IO
} keel_status;

typedef enum keel_dtype {
  KEEL_F32 = 0,
  KEEL_F64,
  KEEL_I64,           /* indices and labels; not every math op takes it */
  KEEL_DTYPE_COUNT
} keel_dtype;

typedef enum keel_device { KEEL_CPU = 0, KEEL_CUDA } keel_device;

/* realloc-shaped allocator, as lua_Alloc: nsize == 0 frees. */
typedef void *(*keel_alloc_fn)(void *ud, void *ptr, size_t osize, size_t nsize);

/* }==================================================================== */

/* {====================================================================
** Context
** ===================================================================== */

/* alloc == NULL selects malloc/free. */
KEEL_API keel_status keel_ctx_new(keel_ctx **out, keel_alloc_fn alloc, void *ud);
/* Frees the context once every tensor of it has been released. */
KEEL_API void keel_ctx_free(keel_ctx *ctx);
KEEL_API const char *keel_last_error(const keel_ctx *ctx);
KEEL_API keel_status keel_last_status(const keel_ctx *ctx);
KEEL_API const char *keel_status_name(keel_status st);
KEEL_API const char *keel_dtype_name(keel_dtype dt);
KEEL_API size_t keel_dtype_size(keel_dtype dt);

KEEL_API void keel_manual_seed(keel_ctx *ctx, uint64_t seed);
/* Returns the previous mode. */
KEEL_API int keel_set_grad_enabled(keel_ctx *ctx, int enabled);
KEEL_API int keel_is_grad_enabled(const keel_ctx *ctx);
KEEL_API void keel_set_index_base(keel_ctx *ctx, int base);  /* 0 or 1 */
KEEL_API int keel_index_base(const keel_ctx *ctx);

typedef struct keel_memory_stats {
  size_t live_bytes;     /* bytes held by live storages */
  size_t peak_bytes;
  size_t cached_bytes;   /* freed blocks kept for reuse */
  size_t live_tensors;   /* tensor handles alive */
  uint64_t allocs;       /* storage allocations requested */
  uint64_t cache_hits;   /* of which served from the cache */
} keel_memory_stats;
KEEL_API void keel_memory_stats_get(const keel_ctx *ctx, keel_memory_stats *out);
/* Returns cached blocks to the allocator. */
KEEL_API void keel_memory_trim(keel_ctx *ctx);

/* }==================================================================== */

/* {====================================================================
** Tensor handles and introspection
** ===================================================================== */

KEEL_API keel_tensor *keel_tensor_retain(keel_tensor *t);
KEEL_API void keel_tensor_release(keel_tensor *t);

KEEL_API keel_ctx *keel_tensor_ctx(const keel_tensor *t);
KEEL_API int keel_tensor_ndim(const keel_tensor *t);
KEEL_API const int64_t *keel_tensor_shape(const keel_tensor *t);
KEEL_API const int64_t *keel_tensor_strides(const keel_tensor *t);  /* elements */
KEEL_API int64_t keel_tensor_offset(const keel_tensor *t);          /* elements */
KEEL_API int64_t keel_tensor_numel(const keel_tensor *t);
KEEL_API keel_dtype keel_tensor_dtype(const keel_tensor *t);
KEEL_API keel_device keel_tensor_device(const keel_tensor *t);
KEEL_API int keel_tensor_is_contiguous(const keel_tensor *t);
/* Address of element 0 (CPU tensors). Writing through it bypasses autograd. */
KEEL_API void *keel_tensor_data(const keel_tensor *t);
/* True when both views share one storage. */
KEEL_API int keel_tensor_same_storage(const keel_tensor *a, const keel_tensor *b);

/* Element access; idx has ndim entries, 0-based. */
KEEL_API keel_status keel_tensor_get(keel_ctx *ctx, const keel_tensor *t,
                                     const int64_t *idx, double *v);
KEEL_API keel_status keel_tensor_set(keel_ctx *ctx, keel_tensor *t,
                                     const int64_t *idx, double v);
/* The value of a one-element tensor. */
KEEL_API keel_status keel_item(keel_ctx *ctx, const keel_tensor *t, double *v);
/* Copies all elements, row-major, converted to double. */
KEEL_API keel_status keel_tensor_read(keel_ctx *ctx, const keel_tensor *t,
                                      double *dst, int64_t n);

/* }==================================================================== */

/* {====================================================================
** Creation
** ===================================================================== */

KEEL_API keel_status keel_empty(keel_ctx *ctx, keel_dtype dt, int ndim,
                                const int64_t *shape, keel_tensor **out);
KEEL_API keel_status keel_zeros(keel_ctx *ctx, keel_dtype dt, int ndim,
                                const int64_t *shape, keel_tensor **out);
KEEL_API keel_status keel_ones(keel_ctx *ctx, keel_dtype dt, int ndim,
                               const int64_t *shape, keel_tensor **out);
KEEL_API keel_status keel_full(keel_ctx *ctx, keel_dtype dt, int ndim,
                               const int64_t *shape, double value, keel_tensor **out);
/* Values from data (row-major doubles), converted to dt. */
KEEL_API keel_status keel_from_doubles(keel_ctx *ctx, keel_dtype dt, int ndim,
                                       const int64_t *shape, const double *data,
                                       keel_tensor **out);
/* start, start+step, ... up to but excluding end (as torch.arange). */
KEEL_API keel_status keel_arange(keel_ctx *ctx, keel_dtype dt, double start,
                                 double end, double step, keel_tensor **out);
KEEL_API keel_status keel_linspace(keel_ctx *ctx, keel_dtype dt, double start,
                                   double end, int64_t n, keel_tensor **out);
KEEL_API keel_status keel_eye(keel_ctx *ctx, keel_dtype dt, int64_t n, int64_t m,
                              keel_tensor **out);
/* Uniform [lo, hi) and normal(mean, std), from the context's RNG. */
KEEL_API keel_status keel_rand(keel_ctx *ctx, keel_dtype dt, int ndim,
                               const int64_t *shape, keel_tensor **out);
KEEL_API keel_status keel_randn(keel_ctx *ctx, keel_dtype dt, int ndim,
                                const int64_t *shape, keel_tensor **out);
KEEL_API keel_status keel_uniform_(keel_ctx *ctx, keel_tensor *t, double lo, double hi);
KEEL_API keel_status keel_normal_(keel_ctx *ctx, keel_tensor *t, double mean, double std);

/* }==================================================================== */

/* {====================================================================
** Views (share storage; differentiable)
** ===================================================================== */

/* One entry of shape may be -1 (inferred). view fails when the strides do
** not allow it; reshape copies in that case. */
KEEL_API keel_status keel_view(keel_ctx *ctx, keel_tensor *a, int ndim,
                               const int64_t *shape, keel_tensor **out);
KEEL_API keel_status keel_reshape(keel_ctx *ctx, keel_tensor *a, int ndim,
                                  const int64_t *shape, keel_tensor **out);
KEEL_API keel_status keel_transpose(keel_ctx *ctx, keel_tensor *a, int d0, int d1,
                                    keel_tensor **out);
KEEL_API keel_status keel_permute(keel_ctx *ctx, keel_tensor *a, const int *perm,
                                  keel_tensor **out);
KEEL_API keel_status keel_narrow(keel_ctx *ctx, keel_tensor *a, int dim,
                                 int64_t start, int64_t length, keel_tensor **out);
/* Removes dimension dim, taking index i (0-based). */
KEEL_API keel_status keel_select(keel_ctx *ctx, keel_tensor *a, int dim, int64_t i,
                                 keel_tensor **out);
/* dim == KEEL_DIM_NONE squeezes every size-1 dimension. */
KEEL_API keel_status keel_squeeze(keel_ctx *ctx, keel_tensor *a, int dim,
                                  keel_tensor **out);
KEEL_API keel_status keel_unsqueeze(keel_ctx *ctx, keel_tensor *a, int dim,
                                    keel_tensor **out);
/* -1 in shape keeps that size. */
KEEL_API keel_status keel_expand(keel_ctx *ctx, keel_tensor *a, int ndim,
                                 const int64_t *shape, keel_tensor **out);
/* Returns a (retained) when already contiguous, else a contiguous copy. */
KEEL_API keel_status keel_contiguous(keel_ctx *ctx, keel_tensor *a, keel_tensor **out);
KEEL_API keel_status keel_clone(keel_ctx *ctx, keel_tensor *a, keel_tensor **out);
KEEL_API keel_status keel_to_dtype(keel_ctx *ctx, keel_tensor *a, keel_dtype dt,
                                   keel_tensor **out);
/* A tensor sharing a's storage, outside the graph. */
KEEL_API keel_status keel_detach(keel_ctx *ctx, keel_tensor *a, keel_tensor **out);

/* }==================================================================== */

/* {====================================================================
** Elementwise (NumPy broadcasting, dtype promotion f32 < f64; i64 with a
** float promotes to that float)
** ===================================================================== */

typedef enum keel_binop {
  KEEL_BIN_ADD = 0, KEEL_BIN_SUB, KEEL_BIN_MUL, KEEL_BIN_DIV, KEEL_BIN_POW,
  KEEL_BIN_MAXIMUM, KEEL_BIN_MINIMUM,
  /* comparisons give 1/0 in the promoted dtype; not differentiable */
  KEEL_BIN_EQ, KEEL_BIN_NE, KEEL_BIN_LT, KEEL_BIN_LE, KEEL_BIN_GT, KEEL_BIN_GE,
  KEEL_BINOP_COUNT
} keel_binop;

typedef enum keel_unop {
  KEEL_UN_NEG = 0, KEEL_UN_EXP, KEEL_UN_LOG, KEEL_UN_SQRT, KEEL_UN_ABS,
  KEEL_UN_RELU, KEEL_UN_SIGMOID, KEEL_UN_TANH, KEEL_UN_SIGN,
  KEEL_UNOP_COUNT
} keel_unop;

KEEL_API keel_status keel_binary(keel_ctx *ctx, keel_binop op, keel_tensor *a,
                                 keel_tensor *b, keel_tensor **out);
/* a op s, or s op a when scalar_first. */
KEEL_API keel_status keel_binary_scalar(keel_ctx *ctx, keel_binop op, keel_tensor *a,
                                        double s, int scalar_first, keel_tensor **out);
KEEL_API keel_status keel_unary(keel_ctx *ctx, keel_unop op, keel_tensor *a,
                                keel_tensor **out);
/* Either bound may be -INFINITY/INFINITY for none. */
KEEL_API keel_status keel_clamp(keel_ctx *ctx, keel_tensor *a, double lo, double hi,
                                keel_tensor **out);
/* cond != 0 ? a : b, all three broadcast together. */
KEEL_API keel_status keel_where(keel_ctx *ctx, keel_tensor *cond, keel_tensor *a,
                                keel_tensor *b, keel_tensor **out);

KEEL_API keel_status keel_add(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, keel_tensor **out);
KEEL_API keel_status keel_sub(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, keel_tensor **out);
KEEL_API keel_status keel_mul(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, keel_tensor **out);
KEEL_API keel_status keel_div(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, keel_tensor **out);

/* In place, not recorded by autograd: refused on a tensor that requires
** grad while grad mode is on. b broadcasts to a's shape. */
KEEL_API keel_status keel_binary_(keel_ctx *ctx, keel_binop op, keel_tensor *a,
                                  keel_tensor *b);
KEEL_API keel_status keel_binary_scalar_(keel_ctx *ctx, keel_binop op, keel_tensor *a,
                                         double s);
KEEL_API keel_status keel_fill_(keel_ctx *ctx, keel_tensor *a, double v);
KEEL_API keel_status keel_copy_(keel_ctx *ctx, keel_tensor *dst, keel_tensor *src);
KEEL_API keel_status keel_clamp_(keel_ctx *ctx, keel_tensor *a, double lo, double hi);

/* }==================================================================== */

/* {====================================================================
** Reductions. dims == NULL (ndims == 0) reduces every dimension.
** ===================================================================== */

typedef enum keel_redop {
  KEEL_RED_SUM = 0, KEEL_RED_MEAN, KEEL_RED_MAX, KEEL_RED_MIN, KEEL_RED_PROD,
  KEEL_REDOP_COUNT
} keel_redop;

/* indices (optional, MAX/MIN over exactly one dim): i64 positions. */
KEEL_API keel_status keel_reduce(keel_ctx *ctx, keel_redop op, keel_tensor *a,
                                 int ndims, const int *dims, int keepdim,
                                 keel_tensor **out, keel_tensor **indices);
/* dim == KEEL_DIM_NONE: over the flattened tensor. */
KEEL_API keel_status keel_argmax(keel_ctx *ctx, keel_tensor *a, int dim, int keepdim,
                                 keel_tensor **out);
KEEL_API keel_status keel_argmin(keel_ctx *ctx, keel_tensor *a, int dim, int keepdim,
                                 keel_tensor **out);
/* correction: 1 for the unbiased estimate (torch default), 0 for biased. */
KEEL_API keel_status keel_var(keel_ctx *ctx, keel_tensor *a, int ndims, const int *dims,
                              int correction, int keepdim, keel_tensor **out);
KEEL_API keel_status keel_std(keel_ctx *ctx, keel_tensor *a, int ndims, const int *dims,
                              int correction, int keepdim, keel_tensor **out);
/* p > 0, or INFINITY for max |x|. */
KEEL_API keel_status keel_norm(keel_ctx *ctx, keel_tensor *a, double p, int ndims,
                               const int *dims, int keepdim, keel_tensor **out);

/* }==================================================================== */

/* {====================================================================
** Linear algebra, joining and indexing
** ===================================================================== */

/* torch.matmul semantics: 1-D operands, batch broadcasting. */
KEEL_API keel_status keel_matmul(keel_ctx *ctx, keel_tensor *a, keel_tensor *b,
                                 keel_tensor **out);
KEEL_API keel_status keel_cat(keel_ctx *ctx, int n, keel_tensor *const *ts, int dim,
                              keel_tensor **out);
KEEL_API keel_status keel_stack(keel_ctx *ctx, int n, keel_tensor *const *ts, int dim,
                                keel_tensor **out);
/* out[i][j] = a[index[i][j]][j] for dim 0, and so on (torch.gather). */
KEEL_API keel_status keel_gather(keel_ctx *ctx, keel_tensor *a, int dim,
                                 keel_tensor *index, keel_tensor **out);
/* out = a, then out[index[i][j]][j] += src[i][j] for dim 0 (out of place). */
KEEL_API keel_status keel_scatter_add(keel_ctx *ctx, keel_tensor *a, int dim,
                                      keel_tensor *index, keel_tensor *src,
                                      keel_tensor **out);
/* index: 1-D. */
KEEL_API keel_status keel_index_select(keel_ctx *ctx, keel_tensor *a, int dim,
                                       keel_tensor *index, keel_tensor **out);

/* }==================================================================== */

/* {====================================================================
** Autograd
** ===================================================================== */

KEEL_API keel_status keel_set_requires_grad(keel_ctx *ctx, keel_tensor *t, int on);
KEEL_API int keel_requires_grad(const keel_tensor *t);
KEEL_API int keel_is_leaf(const keel_tensor *t);
/* Borrowed; NULL when none. */
KEEL_API keel_tensor *keel_tensor_grad(const keel_tensor *t);
/* g may be NULL to clear. */
KEEL_API keel_status keel_set_grad(keel_ctx *ctx, keel_tensor *t, keel_tensor *g);
/* Name of the op that made t ("add", "matmul", ...), NULL for a leaf. */
KEEL_API const char *keel_grad_fn_name(const keel_tensor *t);
/* Keeps .grad on a non-leaf tensor after backward. */
KEEL_API keel_status keel_retain_grad(keel_ctx *ctx, keel_tensor *t);

/* grad: NULL for a one-element root (seeded with 1), else root's shape.
** Without retain_graph the graph's saved tensors are freed afterwards. */
KEEL_API keel_status keel_backward(keel_ctx *ctx, keel_tensor *root, keel_tensor *grad,
                                   int retain_graph);

/* A gradient hook: called with the gradient flowing into t; set *replace
** to a new reference to substitute it (or leave NULL). A non-OK return
** aborts the backward pass before any .grad is changed. */
typedef keel_status (*keel_hook_fn)(keel_ctx *ctx, void *ud, keel_tensor *grad,
                                    keel_tensor **replace);
/* free_ud (may be NULL) is called once, when the hook is removed or t dies. */
KEEL_API keel_status keel_register_hook(keel_ctx *ctx, keel_tensor *t, keel_hook_fn fn,
                                        void *ud, void (*free_ud)(void *ud),
                                        uint64_t *id);
/* Returns 1 when a hook was removed. */
KEEL_API int keel_remove_hook(keel_ctx *ctx, keel_tensor *t, uint64_t id);

/* Names of every differentiable op in the engine's op table. */
KEEL_API int keel_op_count(void);
KEEL_API const char *keel_op_name(int i);

/* }==================================================================== */

/* {====================================================================
** Neural-network functional ops and optimizers. Each area adds its
** declarations after its own marker (keep markers in place).
** ===================================================================== */

/* @api:conv (conv2d, pooling) */
/* @api:norm (batch/layer/group norm, dropout, embedding) */
/* @api:act (activations, softmax, losses) */
/* @api:rnn (recurrent cells, attention) */
/* @api:optim (optimizers, clipping) */

/* }==================================================================== */

#ifdef __cplusplus
}
#endif

#endif
