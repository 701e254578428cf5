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
/* The RNG state (4 words), for checkpoints and exact resume. */
KEEL_API void keel_rng_get_state(const keel_ctx *ctx, uint64_t state[4]);
KEEL_API keel_status keel_rng_set_state(keel_ctx *ctx, const uint64_t state[4]);
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
/* Address of element 0 (a device address for a CUDA tensor). Writing
** through it bypasses autograd, and also the host copy of the values that
** a small int64 tensor moved to CUDA keeps for the index checks: write
** such tensors with keel's functions. */
KEEL_API void *keel_tensor_data(const keel_tensor *t);
/* True when both views share one storage. */
KEEL_API int keel_tensor_same_storage(const keel_tensor *a, const keel_tensor *b);

/* Element access; idx has ndim entries, 0-based. These and the two below
** read CUDA tensors too (copying what they read to the host). */
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
/* keel_backward, then, once every .grad is committed, fn(ud, t) for each
** tensor whose .grad the pass changed (leaves and retain_grad tensors), in
** the order they first received a gradient: post-accumulate-grad hooks.
** fn is not called when the pass fails. */
typedef void (*keel_commit_fn)(void *ud, keel_tensor *t);
KEEL_API keel_status keel_backward_observe(keel_ctx *ctx, keel_tensor *root, keel_tensor *grad,
                                           int retain_graph, keel_commit_fn fn, void *ud);

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
/* conv2d and 2-D pools over x: [N, C, H, W], or one unbatched [C, H, W]
** sample as in torch. Window sizes are pairs {height, width}; a NULL pair
** takes the default: stride 1 (pools: the kernel size), padding 0,
** dilation 1. Padding is zeros (conv2d) or ignored cells (pools). */
#define KEEL_PADDING_SAME (-1)  /* padding {SAME, SAME}: torch's "same" (stride 1) */
/* w: [out_channels, in_channels/groups, kH, kW]; b: [out_channels] or NULL. */
KEEL_API keel_status keel_conv2d(keel_ctx *ctx, keel_tensor *x, keel_tensor *w, keel_tensor *b,
                                 const int64_t *stride, const int64_t *padding,
                                 const int64_t *dilation, int64_t groups, keel_tensor **out);
/* indices (optional, may be NULL): i64 position h*W + w of each maximum in
** its [H, W] plane (the index base applies), as torch's return_indices.
** Ties go to the first position, NaN propagates. */
KEEL_API keel_status keel_max_pool2d(keel_ctx *ctx, keel_tensor *x, const int64_t *kernel,
                                     const int64_t *stride, const int64_t *padding,
                                     const int64_t *dilation, int ceil_mode, keel_tensor **out,
                                     keel_tensor **indices);
/* divisor_override: 0 for none. */
KEEL_API keel_status keel_avg_pool2d(keel_ctx *ctx, keel_tensor *x, const int64_t *kernel,
                                     const int64_t *stride, const int64_t *padding, int ceil_mode,
                                     int count_include_pad, int64_t divisor_override,
                                     keel_tensor **out);
/* out_hw: the output {height, width}; windows as torch's. */
KEEL_API keel_status keel_adaptive_avg_pool2d(keel_ctx *ctx, keel_tensor *x, const int64_t *out_hw,
                                              keel_tensor **out);
/* @api:norm (batch/layer/group norm, dropout, embedding) */
/* Batch normalisation of x [N, C, ...] per channel. weight, bias,
** running_mean, running_var: C elements each, or NULL (the running stats
** both or neither). training: normalise with the batch statistics (biased
** variance) and, when running stats are given, update them in place,
** outside autograd: r = (1 - momentum) r + momentum s, with the unbiased
** variance (PyTorch's convention; momentum in [0, 1]; a host that wants
** the cumulative average passes 1 / batches seen). Not training:
** normalise with the running stats. */
KEEL_API keel_status keel_batch_norm(keel_ctx *ctx, keel_tensor *x, keel_tensor *weight, keel_tensor *bias,
                                     keel_tensor *running_mean, keel_tensor *running_var, int training,
                                     double momentum, double eps, keel_tensor **out);
/* Normalises over the last normalized_ndim dims of x; weight and bias
** (or NULL) have exactly those dims. */
KEEL_API keel_status keel_layer_norm(keel_ctx *ctx, keel_tensor *x, int normalized_ndim, keel_tensor *weight,
                                     keel_tensor *bias, double eps, keel_tensor **out);
/* x [N, C, ...]: statistics per sample over each group of C/groups
** channels; weight, bias [C] or NULL. */
KEEL_API keel_status keel_group_norm(keel_ctx *ctx, keel_tensor *x, int64_t groups, keel_tensor *weight,
                                     keel_tensor *bias, double eps, keel_tensor **out);
/* training: zeroes each element with probability p, drawn from the
** context's RNG (keel_manual_seed fixes the mask), and scales the others
** by 1/(1-p). Not training, or p == 0: returns x itself. */
KEEL_API keel_status keel_dropout(keel_ctx *ctx, keel_tensor *x, double p, int training, keel_tensor **out);
/* Rows of weight [V, D] at indices (int64, or float with whole values; in
** the context's index base): out has shape indices.shape + [D]. The row
** padding_idx (index base, or negative from the end; KEEL_NO_PADDING for
** none) gets no gradient. */
#define KEEL_NO_PADDING INT64_MIN
KEEL_API keel_status keel_embedding(keel_ctx *ctx, keel_tensor *weight, keel_tensor *indices,
                                    int64_t padding_idx, keel_tensor **out);
/* @api:act (activations, softmax, losses) */
/* Activations; relu, sigmoid and tanh are keel_unary ops. gelu: exact
** (erf) form, or the tanh approximation when tanh_approx != 0. softplus:
** log(1 + exp(beta x)) / beta, and x where beta x > threshold. */
KEEL_API keel_status keel_leaky_relu(keel_ctx *ctx, keel_tensor *a, double negative_slope,
                                     keel_tensor **out);
KEEL_API keel_status keel_elu(keel_ctx *ctx, keel_tensor *a, double alpha, keel_tensor **out);
KEEL_API keel_status keel_gelu(keel_ctx *ctx, keel_tensor *a, int tanh_approx, keel_tensor **out);
KEEL_API keel_status keel_silu(keel_ctx *ctx, keel_tensor *a, keel_tensor **out);
KEEL_API keel_status keel_softplus(keel_ctx *ctx, keel_tensor *a, double beta, double threshold,
                                   keel_tensor **out);
/* Over dimension dim, max-subtracted: finite for any finite input. */
KEEL_API keel_status keel_softmax(keel_ctx *ctx, keel_tensor *a, int dim, keel_tensor **out);
KEEL_API keel_status keel_log_softmax(keel_ctx *ctx, keel_tensor *a, int dim, keel_tensor **out);

/* Losses (PyTorch semantics). NONE keeps one loss per element (sample). */
typedef enum keel_reduction {
  KEEL_REDUCTION_NONE = 0, KEEL_REDUCTION_MEAN, KEEL_REDUCTION_SUM
} keel_reduction;
/* input and target of one shape; gradients flow to both. */
KEEL_API keel_status keel_mse_loss(keel_ctx *ctx, keel_tensor *input, keel_tensor *target,
                                   keel_reduction red, keel_tensor **out);
KEEL_API keel_status keel_l1_loss(keel_ctx *ctx, keel_tensor *input, keel_tensor *target,
                                  keel_reduction red, keel_tensor **out);
/* |d| < beta: 0.5 d^2 / beta, else |d| - 0.5 beta (beta >= 0; 0 gives l1). */
KEEL_API keel_status keel_smooth_l1_loss(keel_ctx *ctx, keel_tensor *input, keel_tensor *target,
                                         double beta, keel_reduction red, keel_tensor **out);
/* |d| < delta: 0.5 d^2, else delta (|d| - 0.5 delta) (delta > 0). */
KEEL_API keel_status keel_huber_loss(keel_ctx *ctx, keel_tensor *input, keel_tensor *target,
                                     double delta, keel_reduction red, keel_tensor **out);
/* ignore_index value meaning "ignore nothing". */
#define KEEL_NO_IGNORE INT64_MIN
/*
** logits [N, C, d1...] (or [C]); target: class indices [N, d1...] (int64,
** or whole floats; values in index base .. index base + C - 1), or
** probabilities with the logits' shape (float). weight: [C] or NULL, a
** constant. "mean" divides by the summed weights of the targets that are
** not ignored (by N d1... for probability targets). label_smoothing in
** [0, 1] mixes in the uniform distribution, weighted as PyTorch does.
*/
KEEL_API keel_status keel_cross_entropy(keel_ctx *ctx, keel_tensor *logits, keel_tensor *target,
                                        keel_tensor *weight, int64_t ignore_index,
                                        double label_smoothing, keel_reduction red,
                                        keel_tensor **out);
/* As cross_entropy on log-probabilities, class-index targets only. */
KEEL_API keel_status keel_nll_loss(keel_ctx *ctx, keel_tensor *log_probs, keel_tensor *target,
                                   keel_tensor *weight, int64_t ignore_index, keel_reduction red,
                                   keel_tensor **out);
/* weight and pos_weight (NULL or broadcastable to input) are constants. */
KEEL_API keel_status keel_binary_cross_entropy_with_logits(keel_ctx *ctx, keel_tensor *input,
                                                           keel_tensor *target, keel_tensor *weight,
                                                           keel_tensor *pos_weight,
                                                           keel_reduction red, keel_tensor **out);
/* @api:rnn (recurrent cells, attention) */
/*
** Recurrent cells and layers, as PyTorch's RNNCell, LSTMCell, GRUCell and
** one layer, one direction of nn.RNN, nn.LSTM, nn.GRU. With G gates per
** mode (1; LSTM 4: i, f, g, o; GRU 3: r, z, n, where n = tanh(W_in x +
** b_in + r * (W_hn h + b_hn))): w_ih [G*H, I], w_hh [G*H, H], b_ih and
** b_hh [G*H] or NULL (no bias); h, c [B, H] or NULL (zeros). One float
** dtype throughout. c, c_out, c0 and c_n are for KEEL_RNN_LSTM only.
*/
typedef enum keel_rnn_mode {
  KEEL_RNN_TANH = 0, KEEL_RNN_RELU, KEEL_RNN_LSTM, KEEL_RNN_GRU, KEEL_RNN_MODE_COUNT
} keel_rnn_mode;
/* One step: x [B, I] -> h_out [B, H] (and c_out). */
KEEL_API keel_status keel_rnn_cell(keel_ctx *ctx, keel_rnn_mode mode, keel_tensor *x,
                                   keel_tensor *h, keel_tensor *c, keel_tensor *w_ih,
                                   keel_tensor *w_hh, keel_tensor *b_ih, keel_tensor *b_hh,
                                   keel_tensor **h_out, keel_tensor **c_out);
/* A sequence: x [T, B, I] -> out [T, B, H] (every step's h, in time
** order) and h_n [B, H] (and c_n), the state after the last step; h_n and
** c_n may be NULL. reverse runs the steps from t = T-1 down to 0. */
KEEL_API keel_status keel_rnn_layer(keel_ctx *ctx, keel_rnn_mode mode, keel_tensor *x,
                                    keel_tensor *h0, keel_tensor *c0, keel_tensor *w_ih,
                                    keel_tensor *w_hh, keel_tensor *b_ih, keel_tensor *b_hh,
                                    int reverse, keel_tensor **out, keel_tensor **h_n,
                                    keel_tensor **c_n);
/*
** Scaled dot-product attention, fused: out = softmax(q k^T * scale + bias
** + causal) v, as torch.nn.functional.scaled_dot_product_attention. q [...,
** L, E], k [..., S, E], v [..., S, Ev]: the leading (batch, head) dims
** broadcast together; one float dtype. bias: NULL, or a float tensor
** broadcastable to [..., L, S] added to the scaled scores (-inf masks a
** position; gradients flow to it). is_causal masks key j > query i
** (top-left aligned, also when L != S). dropout_p in [0, 1] drops weights
** with a counter-based mask keyed by a seed drawn from the context's RNG
** (keel_manual_seed repeats it; CPU and CUDA draw the same mask). The
** score matrix is never stored: forward keeps out and the row
** logsumexp, backward recomputes the weights tile by tile. A row whose
** positions are all masked gives NaN (softmax of nothing) and no
** gradient to anything. The products follow the matmul precision.
*/
KEEL_API keel_status keel_sdpa(keel_ctx *ctx, keel_tensor *q, keel_tensor *k, keel_tensor *v,
                               keel_tensor *bias, int is_causal, double scale, double dropout_p,
                               keel_tensor **out);
/* @api:optim (optimizers, clipping) */
/* @api:data (dataset readers, data loader, transforms) */
/* Data loader (engine/loader.c): batches of the rows of x [N, ...] and y
** [N, ...] (y may be NULL) in a per-epoch order, with per-sample
** transforms, prepared ahead by a background thread.
**
** Order: epoch e visits the rows in the identity order, or when shuffle is
** on in a Fisher-Yates permutation drawn from the stream rng(seed, e, -1);
** it does not use the context's RNG. The random transforms of the sample at
** position pos (0-based, in epoch order) draw from the stream rng(seed, e,
** pos), in pipeline order, so results never depend on thread timing.
**
** rng(seed, epoch, pos): splitmix64. The state starts at
**   seed*0x9E3779B97F4A7C15 + epoch*0xBF58476D1CE4E5B9 + (pos+1)*0x94D049BB133111EB
** (mod 2^64); each draw adds 0x9E3779B97F4A7C15 to it and returns
**   z = (s ^ (s >> 30)) * 0xBF58476D1CE4E5B9;  z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
**   z ^ (z >> 31).
** An integer in [0, n) is (draw >> 11) % n; a number in [0, 1) is
** (draw >> 11) * 2^-53. Fisher-Yates: for i = N-1 down to 1, j = int in
** [0, i], swap order[i] and order[j].
**
** Transforms (x must be float32 when there are any) see one sample [C, H, W]
** ([H, W] and other ranks count as one channel; crop and flip need 2 or 3
** dims):
**   TO_FLOAT     v * scale
**   NORMALIZE    (v - mean[c]) / std[c], nch = 1 or C (at most KEEL_LOADER_MAX_CH)
**   RANDOM_CROP  a size_h x size_w window of the sample zero-padded by padding
**                on each side; top = int in [0, H + 2p - size_h], then left =
**                int in [0, W + 2p - size_w]
**   RANDOM_HFLIP reverses the last dim when the draw in [0, 1) is < p
**
** x and y on one device. On a CUDA device the batches are gathered there
** (index_select of the batch's rows; the transforms as device ops) and
** equal the CPU loader's for the same data and options, value for value;
** prefetch has no effect there (no thread: the device queue runs the
** gathers while the caller works).
*/
#define KEEL_LOADER_MAX_CH 16
typedef enum keel_transform_kind {
  KEEL_TF_TO_FLOAT = 0, KEEL_TF_NORMALIZE, KEEL_TF_RANDOM_CROP, KEEL_TF_RANDOM_HFLIP
} keel_transform_kind;
typedef struct keel_transform {
  keel_transform_kind kind;
  double scale;                                            /* TO_FLOAT */
  int nch;                                                 /* NORMALIZE */
  double mean[KEEL_LOADER_MAX_CH], std[KEEL_LOADER_MAX_CH];
  int64_t size_h, size_w, padding;                         /* RANDOM_CROP */
  double p;                                                /* RANDOM_HFLIP */
} keel_transform;
typedef struct keel_loader_opts {
  int64_t batch_size;        /* >= 1 */
  int shuffle, drop_last;
  uint64_t seed;
  int prefetch;              /* batches prepared ahead by a thread; 0: no thread */
  int ntransforms;           /* copied at creation */
  const keel_transform *transforms;
} keel_loader_opts;
typedef struct keel_loader keel_loader;
/* Retains x and y; starts at epoch 1, batch 0. */
KEEL_API keel_status keel_loader_new(keel_ctx *ctx, keel_tensor *x, keel_tensor *y,
                                     const keel_loader_opts *opts, keel_loader **out);
/* Joins the thread and releases everything. NULL is a no-op. */
KEEL_API void keel_loader_free(keel_loader *ld);
KEEL_API int64_t keel_loader_num_batches(const keel_loader *ld);
/* The next batch of the epoch (new references; *yb NULL without y) and
** its 0-based index. At the end of the epoch, *xb = NULL and the loader
** moves to batch 0 of the next epoch. */
KEEL_API keel_status keel_loader_next(keel_ctx *ctx, keel_loader *ld, keel_tensor **xb,
                                      keel_tensor **yb, int64_t *index);
/* Position: epoch (>= 1), cursor (batches already taken in it), seed. */
KEEL_API void keel_loader_get_state(const keel_loader *ld, int64_t *epoch, int64_t *cursor,
                                    uint64_t *seed);
KEEL_API keel_status keel_loader_set_state(keel_ctx *ctx, keel_loader *ld, int64_t epoch,
                                           int64_t cursor, uint64_t seed);

/* Dataset readers (dataset.c, dataset_image.c). Each *_mem form parses a
** buffer (name is for messages, may be NULL); the path forms read the file.
** Input is checked throughout: bad or truncated data is KEEL_ERR_IO.
** IDX (MNIST): raw or gzip; ubyte/byte/short/float give F32, int/double
** F64, with the file's shape and values. CIFAR-10 binary: images F32
** [N, 3, 32, 32] (0..255), labels I64 [N] (0..9 plus the index base).
** CSV: numbers only, F64 [rows, cols]; header != 0 skips the first line.
** Images (PNG, JPEG, BMP): F32 [channels, H, W] (0..255), channels 1 or 3;
** h = w = 0 keeps the image's size, else bilinear resize to h x w;
** keel_read_images stacks [N, C, H, W] (h = w = 0: all must match the first).
** keel_encode_bytes: I64 [n] of map[byte]; a byte mapped < 0 is an error. */
KEEL_API keel_status keel_read_idx(keel_ctx *ctx, const char *path, keel_tensor **out);
KEEL_API keel_status keel_read_idx_mem(keel_ctx *ctx, const void *data, size_t n, const char *name,
                                       keel_tensor **out);
KEEL_API keel_status keel_read_cifar10(keel_ctx *ctx, const char *const *paths, int npaths,
                                       keel_tensor **images, keel_tensor **labels);
KEEL_API keel_status keel_read_cifar10_mem(keel_ctx *ctx, const void *data, size_t n,
                                           const char *name, keel_tensor **images,
                                           keel_tensor **labels);
KEEL_API keel_status keel_read_csv(keel_ctx *ctx, const char *path, int delimiter, int header,
                                   keel_tensor **out);
KEEL_API keel_status keel_read_csv_mem(keel_ctx *ctx, const void *data, size_t n, const char *name,
                                       int delimiter, int header, keel_tensor **out);
KEEL_API keel_status keel_decode_image(keel_ctx *ctx, const void *data, size_t n, const char *name,
                                       int channels, int h, int w, keel_tensor **out);
KEEL_API keel_status keel_read_image(keel_ctx *ctx, const char *path, int channels, int h, int w,
                                     keel_tensor **out);
KEEL_API keel_status keel_read_images(keel_ctx *ctx, const char *const *paths, int npaths,
                                      int channels, int h, int w, keel_tensor **out);
KEEL_API keel_status keel_encode_bytes(keel_ctx *ctx, const void *data, size_t n,
                                       const int64_t map[256], keel_tensor **out);
/* @api:io (safetensors, checkpoints) */
/* safetensors files (https://huggingface.co/docs/safetensors): tensors by
** name plus string metadata. Saving writes F32/F64/I64 little-endian, in
** the reference writer's order (I64, F64, F32; by name within a dtype), to
** <path>.tmp.<pid>, syncs it, renames it over path and syncs the directory:
** on failure the temporary file is removed and path is untouched.
** Non-contiguous tensors are written contiguous. Names must be unique,
** valid UTF-8 and not "__metadata__"; meta_keys/meta_values (n_meta
** pairs, may be NULL when n_meta is 0) become "__metadata__". */
typedef struct keel_safetensors keel_safetensors;
KEEL_API keel_status keel_safetensors_save(keel_ctx *ctx, const char *path, int n,
                                           const char *const *names, keel_tensor *const *tensors,
                                           int n_meta, const char *const *meta_keys,
                                           const char *const *meta_values);
/* Reads and checks a whole file: header length <= 100 MiB and inside the
** file, strict JSON of the schema, known dtypes, sizes that match shapes,
** tensors that tile the data exactly, unique names. F16/BF16 load as
** float32, I32/I16/I8/U8/BOOL as int64. *out is freed with
** keel_safetensors_free; entries are sorted by name. */
KEEL_API keel_status keel_safetensors_load(keel_ctx *ctx, const char *path, keel_safetensors **out);
/* The same from memory (size bytes at buf). */
KEEL_API keel_status keel_safetensors_load_buffer(keel_ctx *ctx, const void *buf, size_t size,
                                                  keel_safetensors **out);
KEEL_API void keel_safetensors_free(keel_safetensors *st);
KEEL_API int keel_safetensors_count(const keel_safetensors *st);
/* Entry i (0-based): its name, its tensor (borrowed: retain it to keep it
** after keel_safetensors_free), and the dtype named in the file ("F16"...).
** Out of range: NULL. */
KEEL_API const char *keel_safetensors_name(const keel_safetensors *st, int i);
KEEL_API keel_tensor *keel_safetensors_tensor(const keel_safetensors *st, int i);
KEEL_API const char *keel_safetensors_dtype(const keel_safetensors *st, int i);
/* Metadata pairs, sorted by key. */
KEEL_API int keel_safetensors_metadata_count(const keel_safetensors *st);
KEEL_API const char *keel_safetensors_metadata_key(const keel_safetensors *st, int i);
KEEL_API const char *keel_safetensors_metadata_value(const keel_safetensors *st, int i);

/*
** Optimizers and gradient clipping (optim.c, clip.c).
**
** keel_optim_step makes two passes over memory. The statistics pass reads
** every gradient, and its parameter in the same loop (unless the last
** update summed the parameter's squares as it wrote them and nothing
** wrote to it since), once and fills a keel_grad_stats per parameter
** (sums in double, in a fixed order, so the
** norm has the same bits on any thread count; max |g|; NaN/Inf/zero
** counts; the weight's sum of squares). The clip chain turns those into
** one scale (and clamp bound) per tensor or per AGC unit, and the update
** pass applies them inside the optimizer's own loop: clipping never costs
** a pass of its own, and .grad is left as backward made it. The update
** pass also sums the squares of the changes it makes (keel_update_stats).
** Update formulas are PyTorch 1.13's single-tensor (foreach=False) ones.
**
** A step can be taken in two halves, so that a caller can look at the
** statistics and decide: keel_optim_prepare runs the statistics pass and
** decides clipping and the non-finite policy while changing nothing
** (parameters, state, step counts, counters, adaptive clip state);
** keel_optim_apply then runs the update pass and commits, or
** keel_optim_cancel records a cancelled step and changes nothing else.
** keel_optim_step is prepare followed by apply.
**
** Loss scaling (mixed precision; keel.amp.GradScaler drives it, a C host
** may too). With a loss scale set, the step reads every gradient element
** as g * inv_scale: statistics, the non-finite check, every clip transform
** and the update see the unscaled gradient, while .grad keeps the scaled
** values. The unscale costs no pass of its own: it is the starting value
** of the per-unit scale that the clip chain multiplies and the update pass
** applies, so it works on any backend that implements the optim slots.
** A step whose unscaled gradient holds NaN or Inf, or that is told
** found_inf (keel_grad_unscale found one before), is an overflow: it is
** skipped whatever the non-finite policy (reason "overflow",
** counters.overflow; the non-finite counters are left to real trouble).
** The results are those of unscaling .grad in place first
** (keel_grad_unscale, torch's GradScaler.unscale_) and stepping on that,
** to the bit when inv_scale is a power of two (the statistics then scale
** exactly; elements whose unscaled value is subnormal excepted); other
** scales take a scalar statistics pass (exact) and round the unscale and
** a clip factor once together in the update instead of twice.
*/

typedef struct keel_optim keel_optim;

typedef enum keel_optim_kind {
  KEEL_OPTIM_SGD = 0, KEEL_OPTIM_ADAM, KEEL_OPTIM_ADAMW, KEEL_OPTIM_RMSPROP,
  KEEL_OPTIM_ADAGRAD,
  KEEL_OPTIM_KIND_COUNT
} keel_optim_kind;

/* Hyper-parameters of one parameter group; an optimizer ignores the fields
** it has no use for. keel_optim_hparams_default gives PyTorch's defaults
** (SGD's lr, required in PyTorch, defaults to 0.01 here). */
typedef struct keel_optim_hparams {
  double lr;
  double weight_decay;      /* L2 term added to the gradient; AdamW: decoupled */
  double momentum;          /* SGD, RMSprop */
  double dampening;         /* SGD */
  double beta1, beta2;      /* Adam, AdamW */
  double alpha;             /* RMSprop smoothing constant */
  double eps;               /* Adam, AdamW, RMSprop, Adagrad */
  double lr_decay;          /* Adagrad */
  double initial_accumulator_value;  /* Adagrad: fills "sum" when it is created */
  int nesterov;             /* SGD */
  int amsgrad;              /* Adam, AdamW */
  int centered;             /* RMSprop */
  int maximize;             /* ascend instead of descend */
} keel_optim_hparams;

typedef enum keel_clip_kind {
  KEEL_CLIP_VALUE = 0,      /* clamp every element to [-threshold, threshold] */
  KEEL_CLIP_NORM,           /* each tensor alone to p-norm <= threshold */
  KEEL_CLIP_GLOBAL_NORM,    /* all tensors together (torch clip_grad_norm_) */
  KEEL_CLIP_AGC,            /* unit-wise adaptive clipping (Optax adaptive_grad_clip) */
  KEEL_CLIP_PERCENTILE,     /* AutoClip: global norm to a percentile of past norms */
  KEEL_CLIP_ZSCORE,         /* ZClip: z-score of the global norm against EMA statistics */
  KEEL_CLIP_KIND_COUNT
} keel_clip_kind;

/* One transform of a clip chain. keel_clip_spec_default fills the
** defaults of a kind; every field is then taken as it is. */
typedef struct keel_clip_spec {
  keel_clip_kind kind;
  double threshold;   /* value: bound; norm, global_norm: max norm; agc: clipping
                      ** factor; percentile: p in [0, 100]; zscore: z threshold */
  double p;           /* norm, global_norm: norm order > 0, or INFINITY (2) */
  double eps;         /* agc: floor of the weight norm (1e-3); zscore: added to the std (1e-6) */
  double alpha;       /* zscore: EMA factor (0.97) */
  double max_norm;    /* zscore: also cap the global norm at this, 0 for no cap (0) */
  int64_t window;     /* percentile: norms kept, 0 for all (0); zscore: warm-up steps (25) */
  int mode;           /* zscore: 0 adaptive threshold, 1 clip to the EMA mean (0) */
} keel_clip_spec;

/* What a step does with NaN/Inf gradient elements. */
typedef enum keel_nonfinite {
  KEEL_NONFINITE_ERROR = 0, /* fail with KEEL_ERR_ARG; nothing changes */
  KEEL_NONFINITE_SKIP,      /* skip the whole step; nothing changes */
  KEEL_NONFINITE_ZERO,      /* treat those elements as 0 */
  KEEL_NONFINITE_KEEP       /* leave those elements (parameter and state) as they were */
} keel_nonfinite;

/* Statistics of one tensor (or one AGC unit) from a single pass. Sums run
** over finite elements only; non-finite ones are counted. The mean is
** sum / (numel - nan - inf). */
typedef struct keel_grad_stats {
  int64_t numel;
  int64_t nan, inf;         /* NaN and +-Inf elements */
  int64_t zeros;            /* elements equal to 0 */
  double sum;               /* sum of x */
  double sumsq;             /* sum of squares, accumulated in double */
  double sum_abs;           /* sum of |x| */
  double max_abs;           /* max |x| */
  double w_sumsq;           /* the parameter's sum of squares, every element (optimizer
                            ** statistics; 0 where no parameter was read) */
} keel_grad_stats;

/* The last applied update of one parameter. update_sumsq / w_sumsq is
** the squared update-to-weight ratio. */
typedef struct keel_update_stats {
  int64_t step;             /* the optimizer's step count after that update; 0: never updated */
  double update_sumsq;      /* sum of squares of (after - before), each change taken in the
                            ** parameter's dtype and summed in double */
  double w_sumsq;           /* sum of squares of the parameter before the update */
} keel_update_stats;

typedef struct keel_step_report {
  int applied;              /* parameters were updated */
  const char *reason;       /* why not: "nonfinite", "overflow" (loss scaling), "no_grad",
                            ** "cancelled"; NULL when applied (after prepare: why it
                            ** would not be) */
  double grad_norm;         /* global L2 norm before clipping (NaN/Inf when the
                            ** gradient is non-finite and the step is skipped or refused) */
  double clip_coef;         /* product of the global scale factors (1: none) */
  int clipped;              /* some transform changed some gradient element */
  int64_t nonfinite;        /* NaN/Inf gradient elements seen */
  int64_t step;             /* applied steps so far, this one included */
  int n_updated;            /* parameters updated (after prepare: with a gradient) */
  int top_param;            /* parameter with the largest sum of squares (its share of
                            ** the global one); -1 when that is 0 */
  double top_share;         /* that share, 0..1 */
} keel_step_report;

typedef struct keel_optim_counters {
  int64_t steps;            /* applied */
  int64_t skipped;          /* not applied: non-finite gradient (skip policy) */
  int64_t cancelled;        /* not applied: cancelled after prepare (keel_optim_cancel) */
  int64_t errors;           /* refused: non-finite gradient (error policy) */
  int64_t no_grad;          /* not applied: no parameter had a gradient */
  int64_t nonfinite_steps;  /* steps that saw a NaN/Inf gradient, whatever the policy */
  int64_t nonfinite_elements;
  int64_t clipped;          /* applied steps in which clipping changed something */
  int64_t overflow;         /* not applied: loss-scale overflow (keel_optim_set_loss_scale) */
} keel_optim_counters;

/* The loss scale of the next steps (keel_optim_set_loss_scale). */
typedef struct keel_loss_scale {
  int enabled;              /* 0: no loss scaling (the default; the fields below are ignored) */
  double inv_scale;         /* 1 / scale as the scaler rounds it (float32 in torch); > 0 */
  int found_inf;            /* an overflow was already found (by keel_grad_unscale) */
} keel_loss_scale;

/* Adaptive state of one clip transform (percentile, zscore). */
typedef struct keel_clip_state {
  int64_t n_history;        /* percentile: norms kept; zscore: warm-up norms so far */
  const double *history;    /* oldest first (borrowed when read, copied when set) */
  double mean, var;         /* zscore EMA */
  int initialized;          /* zscore: warm-up done */
} keel_clip_state;

KEEL_API const char *keel_optim_kind_name(keel_optim_kind kind);
KEEL_API void keel_optim_hparams_default(keel_optim_kind kind, keel_optim_hparams *h);
KEEL_API void keel_clip_spec_default(keel_clip_kind kind, keel_clip_spec *spec);

KEEL_API keel_status keel_optim_new(keel_ctx *ctx, keel_optim_kind kind, keel_optim **out);
KEEL_API void keel_optim_free(keel_optim *opt);
KEEL_API keel_optim_kind keel_optim_get_kind(const keel_optim *opt);
/* Adds n parameters (retained: float32/float64, CPU, contiguous, each in
** one group at most) with their hyper-parameters; *group (may be NULL)
** gets the group's index. Adagrad creates its state here, as PyTorch. */
KEEL_API keel_status keel_optim_add_group(keel_optim *opt, int n, keel_tensor *const *params,
                                          const keel_optim_hparams *h, int *group);
KEEL_API int keel_optim_group_count(const keel_optim *opt);
/* Hyper-parameters may change between any two steps (schedules do). */
KEEL_API keel_status keel_optim_set_hparams(keel_optim *opt, int group, const keel_optim_hparams *h);
KEEL_API keel_status keel_optim_get_hparams(const keel_optim *opt, int group, keel_optim_hparams *h);
KEEL_API keel_status keel_optim_set_lr(keel_optim *opt, int group, double lr);
/* The clip chain, applied in order (n == 0: none). Resets adaptive state. */
KEEL_API keel_status keel_optim_set_clip(keel_optim *opt, int n, const keel_clip_spec *specs);
/* Changes transform i's threshold and keeps its adaptive state. */
KEEL_API keel_status keel_optim_set_clip_threshold(keel_optim *opt, int i, double threshold);
KEEL_API keel_status keel_optim_set_nonfinite(keel_optim *opt, keel_nonfinite policy);
/* Loss scaling (see above), from the next prepare on; ls == NULL turns it
** off. A prepared step keeps the scale it was prepared with. */
KEEL_API keel_status keel_optim_set_loss_scale(keel_optim *opt, const keel_loss_scale *ls);
KEEL_API void keel_optim_get_loss_scale(const keel_optim *opt, keel_loss_scale *ls);
/* The dynamic loss scale's update, torch's _amp_update_scale_: the scale
** is float32 (the product is taken in double and rounded). found_inf:
** scale * backoff_factor, tracker 0; else tracker + 1, and when that
** equals growth_interval, scale * growth_factor (kept only when finite)
** and tracker 0. */
KEEL_API void keel_loss_scale_update(double *scale, int64_t *growth_tracker, int found_inf,
                                     double growth_factor, double backoff_factor,
                                     int64_t growth_interval);

/* One step over every parameter that requires grad and has a .grad (the
** others are skipped, as PyTorch). r may be NULL. A step that is not
** applied (skip policy, no gradient at all) returns KEEL_OK with
** r->applied == 0; the error policy returns KEEL_ERR_ARG. Either way no
** parameter, state or step count changes. Same as prepare, then apply;
** with deferred reports on, see below. */
KEEL_API keel_status keel_optim_step(keel_optim *opt, keel_step_report *r);
/* Deferred step reports (off by default). With on, a keel_optim_step
** whose parameters that take part are all on the CUDA device, whose clip
** chain is empty or made of L2 norms ("norm", "global_norm", p = 2)
** followed by "value" bounds, whose non-finite policy is not "error" and
** which has no loss scale, is decided on the device: the clip factors and
** the skip ("skip" policy) are computed there from the statistics, exactly
** as the host computes them, and the step returns without waiting for the
** device. Its report is then pending: *r gets reason "pending", applied
** 0 and the current step count only. The step is resolved (its results
** read, the report completed, the step counts and counters committed;
** a skipped step advances none of them) by keel_optim_last_report, by the
** next step, and by every call that depends on it: step_count, counters,
** last_stats, last_updates, param_stats, get/set_state, get/set_param_step,
** add_group, the clip and policy setters, free. Other steps (and every
** step with deferred reports off) are complete on return, as before. A
** device error that surfaces at resolution is the resolving call's (the
** getters without a status leave it in the context). */
KEEL_API void keel_optim_set_deferred_report(keel_optim *opt, int on);
/* 1 while the last step's report is pending. */
KEEL_API int keel_optim_report_pending(const keel_optim *opt);
/* The last step's report (keel_optim_step, apply or cancel), resolved
** first when it is pending. */
KEEL_API keel_status keel_optim_last_report(keel_optim *opt, keel_step_report *r);
/* The first half of a step: collects the gradients (retained until apply,
** cancel or discard), runs the statistics pass (keel_optim_last_stats),
** evaluates the clip chain and the non-finite policy, and fills r with
** what apply would do (applied = 0; reason NULL: it would update,
** "nonfinite": skip or error policy, "no_grad"). Changes no parameter,
** state, step count, counter or adaptive clip state; fails only on bad
** gradients or memory. A second prepare replaces the first. */
KEEL_API keel_status keel_optim_prepare(keel_optim *opt, keel_step_report *r);
/* Carries out the prepared step with the hyper-parameters now set (lr
** times the lr scale): the update pass, adaptive clip state, step counts
** and counters; or records the skip, the no-gradient step or (error
** policy) the refusal, which returns KEEL_ERR_ARG as keel_optim_step
** does. KEEL_ERR_ARG also when nothing is prepared, or when the prepared
** step is stale (add_group, set_clip or set_clip_state since prepare: a
** rollback; cancel it instead). */
KEEL_API keel_status keel_optim_apply(keel_optim *opt, keel_step_report *r);
/* Drops the prepared step (stale or not) and counts it in
** counters.cancelled (and the non-finite counters when it saw NaN/Inf);
** nothing else changes. r (may be NULL) gets prepare's report with
** applied 0, reason "cancelled", clip_coef 1, clipped 0, n_updated 0.
** Works with nothing prepared too. */
KEEL_API void keel_optim_cancel(keel_optim *opt, keel_step_report *r);
/* Drops the prepared step without recording anything. */
KEEL_API void keel_optim_discard(keel_optim *opt);
/* Multiplies every group's lr at apply time (default 1), without touching
** the groups: a back-off that schedules do not undo. Must be >= 0 and
** finite. */
KEEL_API keel_status keel_optim_set_lr_scale(keel_optim *opt, double scale);
KEEL_API double keel_optim_get_lr_scale(const keel_optim *opt);
/* Sets every parameter's .grad to NULL (set_to_none), or fills it with 0. */
KEEL_API keel_status keel_optim_zero_grad(keel_optim *opt, int set_to_none);

KEEL_API int64_t keel_optim_step_count(const keel_optim *opt);
KEEL_API void keel_optim_get_counters(const keel_optim *opt, keel_optim_counters *c);
/* For load_state_dict. */
KEEL_API void keel_optim_set_counters(keel_optim *opt, const keel_optim_counters *c);

/* Parameters in the order they were added (groups one after another). */
KEEL_API int keel_optim_param_count(const keel_optim *opt);
/* Borrowed; *group (may be NULL) gets its group. NULL when i is out of range. */
KEEL_API keel_tensor *keel_optim_param(const keel_optim *opt, int i, int *group);
/* Statistics of each parameter's gradient (and weight) at the last prepare
** that got that far (param_count records; numel 0 for parameters without
** a gradient). */
KEEL_API const keel_grad_stats *keel_optim_last_stats(const keel_optim *opt);
/* Each parameter's last applied update (param_count records) in *out.
** A device update's sizes arrive lazily: the step does not wait for them,
** and this call (or the next step, or anything that would move them)
** does; a device error that surfaces then is this call's error. *out is
** valid until the next step, add_group or free. */
KEEL_API keel_status keel_optim_last_updates(keel_optim *opt, const keel_update_stats **out);
/* The statistics the step's pass gives parameter i for gradient g (NULL:
** its .grad; none gives a zero record): for a gradient a hook replaced.
** Seen through the loss scale when one is set, as the step sees it. */
KEEL_API keel_status keel_optim_param_stats(const keel_optim *opt, int i, keel_tensor *g,
                                            keel_grad_stats *out);

/* Per-parameter state, named as in PyTorch's state_dict: "momentum_buffer"
** (SGD, RMSprop), "exp_avg", "exp_avg_sq", "max_exp_avg_sq" (Adam, AdamW),
** "square_avg", "grad_avg" (RMSprop), "sum" (Adagrad), and the step count
** (SGD has none). Returns the number of buffer names of kind. */
KEEL_API int keel_optim_state_names(keel_optim_kind kind, const char *const **names);
/* A new reference to the live buffer (clone it for a snapshot); NULL when
** the parameter has none yet. */
KEEL_API keel_status keel_optim_get_state(const keel_optim *opt, int i, const char *name,
                                          keel_tensor **out);
/* Copies src in (same shape; dtype converted); src == NULL drops the buffer. */
KEEL_API keel_status keel_optim_set_state(keel_optim *opt, int i, const char *name,
                                          keel_tensor *src);
KEEL_API int64_t keel_optim_get_param_step(const keel_optim *opt, int i);
KEEL_API keel_status keel_optim_set_param_step(keel_optim *opt, int i, int64_t step);
KEEL_API keel_status keel_optim_set_step_count(keel_optim *opt, int64_t n);
KEEL_API keel_status keel_optim_get_clip_state(const keel_optim *opt, int i, keel_clip_state *s);
KEEL_API keel_status keel_optim_set_clip_state(keel_optim *opt, int i, const keel_clip_state *s);

/* Statistics of n tensors (NULL entries give zero records). */
KEEL_API keel_status keel_grad_stats_compute(keel_ctx *ctx, int n, keel_tensor *const *ts,
                                             keel_grad_stats *out);
/* Standalone clipping of the .grad of n parameters, in place (parameters
** without .grad are skipped). keel_clip_grad_norm is torch.nn.utils.
** clip_grad_norm_: *total (may be NULL) gets the total p-norm, and the
** scale is max_norm / (total + 1e-6) when below 1; with error_if_nonfinite
** a NaN/Inf total is an error and nothing changes. */
KEEL_API keel_status keel_clip_grad_norm(keel_ctx *ctx, int n, keel_tensor *const *params,
                                         double max_norm, double p, int error_if_nonfinite,
                                         double *total);
KEEL_API keel_status keel_clip_grad_value(keel_ctx *ctx, int n, keel_tensor *const *params,
                                          double clip_value);
/* Loss scaling's explicit unscale (torch's GradScaler.unscale_): every
** .grad of the n parameters (those without one are skipped) times
** inv_scale in place, in the gradient's dtype; *nonfinite (may be NULL)
** gets the NaN/Inf elements of the results, *ngrads (may be NULL) how
** many gradients there were. */
KEEL_API keel_status keel_grad_unscale(keel_ctx *ctx, int n, keel_tensor *const *params, double inv_scale,
                                       int64_t *nonfinite, int *ngrads);
/* Optax adaptive_grad_clip(clipping, eps) on each parameter's .grad. */
KEEL_API keel_status keel_clip_grad_agc(keel_ctx *ctx, int n, keel_tensor *const *params,
                                        double clipping, double eps);

/* }==================================================================== */

/* @api:anomaly */
/* {====================================================================
** Anomaly detection: which op made the first NaN or Inf
**
** While a mode is set, every op recorded on the tape checks its output
** (one vectorised scan, ops that only make views excepted) and keeps a
** finite flag in its node. The first op whose output holds NaN or Inf
** while its inputs are finite fills the context's event slot (inputs
** that are not op outputs, such as parameters and data, are scanned only
** then). Backward scans each input gradient a node produces; the first
** non-finite one made from a finite incoming gradient fills the slot, and
** in KEEL_ANOMALY_ERROR mode fails the pass (KEEL_ERR_ARG) before any
** .grad changes. The slot keeps its first event until the host takes it.
** Off, the cost is one branch per recorded op.
** ===================================================================== */

typedef enum keel_anomaly_mode {
  KEEL_ANOMALY_OFF = 0,
  KEEL_ANOMALY_ERROR,   /* backward fails at the event; forward only records (the host raises) */
  KEEL_ANOMALY_WARN,    /* record; the host warns */
  KEEL_ANOMALY_RECORD
} keel_anomaly_mode;

typedef enum keel_anomaly_cause {
  KEEL_ANOMALY_OP = 0,  /* the op made NaN/Inf from finite values */
  KEEL_ANOMALY_INPUT    /* forward: input `input` is no op output and already held NaN/Inf */
} keel_anomaly_cause;

#define KEEL_ANOMALY_MAX_IN 8

typedef struct keel_anomaly_event {
  int backward;                 /* 0: forward, 1: backward */
  keel_anomaly_cause cause;
  int op;                       /* index in the op table: keel_op_name(op) */
  uint32_t site;                /* the node's site (keel_anomaly_stamp); 0: not stamped yet */
  int input;                    /* 0-based: backward, the input whose gradient went
                                ** non-finite; KEEL_ANOMALY_INPUT, the non-finite input */
  int n_in;                     /* inputs described below (the op's present inputs, at most
                                ** KEEL_ANOMALY_MAX_IN) */
  int in_index[KEEL_ANOMALY_MAX_IN];          /* 0-based position of each among the op's inputs */
  int in_ndim[KEEL_ANOMALY_MAX_IN];
  int64_t in_shape[KEEL_ANOMALY_MAX_IN][KEEL_MAX_DIMS];
  int64_t nan, inf, numel;      /* of the output (forward) or of that gradient (backward) */
  /* full mode only (has_stats): finite minimum and maximum, non-finite count.
  ** Forward: of each input above; backward: in_* of the incoming gradient. */
  int has_stats;
  double in_min[KEEL_ANOMALY_MAX_IN], in_max[KEEL_ANOMALY_MAX_IN];
  int64_t in_nonfinite[KEEL_ANOMALY_MAX_IN];
  double grad_min, grad_max;    /* backward: the incoming gradient */
} keel_anomaly_event;

/* full: also gather statistics (min, max) of the inputs of an event. */
KEEL_API void keel_anomaly_set_mode(keel_ctx *ctx, keel_anomaly_mode mode, int full);
KEEL_API keel_anomaly_mode keel_anomaly_get_mode(const keel_ctx *ctx);
KEEL_API int keel_anomaly_pending(const keel_ctx *ctx);
/* Moves the pending event into *ev and empties the slot; 0 when none. */
KEEL_API int keel_anomaly_take(keel_ctx *ctx, keel_anomaly_event *ev);
/* 1 when t was made by an op recorded in anomaly mode whose site is not
** stamped yet. */
KEEL_API int keel_anomaly_unstamped(const keel_tensor *t);
/* Gives site to t's node and to every unstamped node behind it (ops run
** inside one host call), so a backward event can name where it was made. */
KEEL_API keel_status keel_anomaly_stamp(keel_ctx *ctx, keel_tensor *t, uint32_t site);
/* t's node's site (0: none or not stamped); for tests. */
KEEL_API uint32_t keel_anomaly_site(const keel_tensor *t);
/* Counts NaN and Inf elements of a float tensor (0 for int64). */
KEEL_API keel_status keel_count_nonfinite(keel_ctx *ctx, const keel_tensor *t, int64_t *nan,
                                          int64_t *inf);

/* }==================================================================== */


/* @api:summary */
/* Monitoring helpers (summary.c): TensorBoard's record checksums, tensor
** histograms, PNG for plots. */

/* CRC-32C (Castagnoli) of n bytes, continuing from crc (0 to start):
** keel_crc32c(0, "123456789", 9) == 0xE3069283. */
KEEL_API uint32_t keel_crc32c(uint32_t crc, const void *data, size_t n);
/* The masked CRC that TFRecord files store: ((crc >> 15) | (crc << 17)) +
** 0xa282ead8. */
KEEL_API uint32_t keel_crc32c_mask(uint32_t crc);

typedef struct keel_histogram {
  int64_t count;            /* finite elements (binned, below or above) */
  int64_t nan, inf;         /* non-finite elements, skipped */
  int64_t below, above;     /* finite elements outside [lo, hi], not in counts */
  double min, max;          /* of the finite elements (0 when there are none) */
  double sum, sumsq;        /* of the finite elements, accumulated in double */
  double lo, hi;            /* the range binned */
} keel_histogram;

/* Histogram of t's elements (float32, float64 or int64; CPU) into
** counts[nbins]. The data is read twice, a moments loop then a bucket loop
** (two lean loops run faster than one that does both):
** - edges != NULL: nbins + 1 strictly increasing finite edges; bucket i
**   holds edges[i] <= x < edges[i+1], the last bucket also x == edges[nbins];
** - edges == NULL and lo < hi: nbins uniform buckets over [lo, hi];
** - edges == NULL and lo >= hi: uniform over the data's [min, max]; when
**   every finite value is equal, counts[0] holds them.
** NaN and Inf elements are counted in out and otherwise skipped. */
KEEL_API keel_status keel_histogram_compute(keel_ctx *ctx, keel_tensor *t, int nbins, const double *edges,
                                            double lo, double hi, double *counts, keel_histogram *out);

/* Receives encoded bytes; returns nonzero to report a failure. */
typedef int (*keel_png_write_fn)(void *ud, const void *data, size_t n);
/* Encodes w x h pixels (comp bytes each: 1 gray, 2 gray+alpha, 3 RGB,
** 4 RGBA; rows top to bottom, no padding) as a PNG and hands the bytes to
** fn (stb_image_write, deflated by zlib). */
KEEL_API keel_status keel_png_encode(keel_ctx *ctx, int w, int h, int comp, const unsigned char *pixels,
                                     keel_png_write_fn fn, void *ud);

/* @api:cuda */
/* {====================================================================
** Devices and CUDA
**
** The CUDA backend is a plugin, libkeel_cuda.so, opened with dlopen the
** first time a context needs it (nothing here links CUDA). It is looked
** for at $KEEL_CUDA_PLUGIN when set, else beside the library, module or
** program that holds the engine (its directory, then ../lib and
** ../../lib from it), else on the dynamic linker's search path. When it
** cannot be used, every CUDA request fails with KEEL_ERR_DEVICE and a
** one-line reason (plugin not found, not a plugin, no CUDA driver, no
** device, ...). One GPU per context: device 0 of what CUDA sees (choose
** it with CUDA_VISIBLE_DEVICES).
**
** Device memory goes through a caching allocator per context: freed
** blocks are kept by size class and reused, and are returned to the
** device by keel_cuda_empty_cache, when an allocation fails (then it is
** retried once), and when the context is freed.
** ===================================================================== */

KEEL_API const char *keel_device_name(keel_device dev);   /* "cpu", "cuda" */
/* The device of the creation functions (keel_empty, keel_zeros, keel_ones,
** keel_full, keel_from_doubles, keel_arange, keel_linspace, keel_eye,
** keel_rand, keel_randn): KEEL_CPU until set. Setting KEEL_CUDA checks
** nothing; the first creation reports why CUDA is unavailable. Random
** values are drawn on the host either way (a seed gives the same numbers
** on every device). Returns the previous device. */
KEEL_API keel_device keel_set_default_device(keel_ctx *ctx, keel_device dev);
KEEL_API keel_device keel_get_default_device(const keel_ctx *ctx);

/* Precision of float32 matrix products (matmul, linear, conv2d, recurrent
** layers) on every device, torch.set_float32_matmul_precision's idea plus
** the reduced formats of autocast: the operands of each product are
** rounded to the format (round to nearest even; float16 also to its range,
** so magnitudes over 65504 become Inf), the products are summed in
** float32, and results stay float32 tensors (float32 master weights, no
** half-precision tensors anywhere). On CUDA the rounding is the tensor
** cores' (cuBLAS compute types 32F_FAST_TF32, _FAST_16BF, _FAST_16F); on
** the CPU keel rounds copies of the operands, so both devices give the
** same numbers within float32 summation order. float64 is never affected.
** Backward runs each node with the precision its forward ran with.
** Returns the previous setting. */
typedef enum keel_matmul_precision {
  KEEL_MATMUL_HIGHEST = 0,      /* float32 operands as they are */
  KEEL_MATMUL_TF32,             /* TensorFloat-32: 10 mantissa bits, float32's range */
  KEEL_MATMUL_BF16,             /* bfloat16: 7 mantissa bits, float32's range */
  KEEL_MATMUL_F16,              /* float16: 10 mantissa bits, at most 65504 */
  KEEL_MATMUL_PRECISION_COUNT
} keel_matmul_precision;
KEEL_API keel_matmul_precision keel_set_matmul_precision(keel_ctx *ctx, keel_matmul_precision p);
KEEL_API keel_matmul_precision keel_get_matmul_precision(const keel_ctx *ctx);

/* 1 when CUDA tensors can be made (opens the plugin on first call); else
** 0, with the reason in why (may be NULL). */
KEEL_API int keel_cuda_available(keel_ctx *ctx, char *why, size_t n);
/* Opens the plugin at path (NULL: the search above) now. After a failed
** attempt it tries again; once one is open, asking for another fails. */
KEEL_API keel_status keel_cuda_load(keel_ctx *ctx, const char *path);
/* Whether a plugin file is where the search above looks first
** ($KEEL_CUDA_PLUGIN, else beside the engine), without opening it: 1 with
** its path in path (n bytes), else 0. A CUDA build on a machine without a
** GPU says 1; the linker's path is not searched (that needs dlopen). */
KEEL_API int keel_cuda_plugin_find(char *path, size_t n);
/* The open plugin's path and description; NULL when none is open. */
KEEL_API const char *keel_cuda_plugin_path(const keel_ctx *ctx);
KEEL_API const char *keel_cuda_plugin_description(const keel_ctx *ctx);
/* Devices CUDA sees; 0 when unavailable. */
KEEL_API int keel_cuda_device_count(keel_ctx *ctx);
KEEL_API keel_status keel_cuda_device_name(keel_ctx *ctx, int device, char *buf, size_t n);
/* Waits for the work queued on the context's stream. */
KEEL_API keel_status keel_cuda_synchronize(keel_ctx *ctx);
/* Free and total memory of the device, as the driver reports them. */
KEEL_API keel_status keel_cuda_mem_get_info(keel_ctx *ctx, size_t *free_bytes, size_t *total_bytes);

typedef struct keel_cuda_memory_stats {
  size_t allocated_bytes;       /* held by live storages (rounded to the cache's size classes) */
  size_t reserved_bytes;        /* obtained from the device and not given back: allocated + cached */
  size_t peak_allocated_bytes;
  size_t peak_reserved_bytes;
  uint64_t allocs;              /* allocation requests */
  uint64_t frees;
  uint64_t device_mallocs;      /* requests the cache could not serve (one cudaMalloc each) */
  uint64_t device_frees;        /* blocks given back to the device */
  uint64_t cache_flushes;       /* failed device allocations that emptied the cache and retried */
  uint64_t h2d_copies;          /* host-to-device copies (these do not wait for the device) */
  uint64_t d2h_copies;          /* device-to-host copies: each waits for the work queued before it */
} keel_cuda_memory_stats;
/* All zero while the plugin is not open (does not open it). */
KEEL_API void keel_cuda_memory_stats_get(const keel_ctx *ctx, keel_cuda_memory_stats *out);
/* Returns the cached (unused) device blocks to the device. */
KEEL_API void keel_cuda_empty_cache(keel_ctx *ctx);

/* a on device dev (same dtype, contiguous): differentiable, the gradient
** goes back to a's device. The same device returns a itself (retained)
** unless copy is set, which always makes a new tensor. */
KEEL_API keel_status keel_to_device(keel_ctx *ctx, keel_tensor *a, keel_device dev, int copy,
                                    keel_tensor **out);
/* Makes leaf tensor t use src's data (storage, dtype, strides; shapes must
** be equal) in place: every holder of the handle t (an optimizer, hooks)
** sees the moved data, as torch's `t.data = src`. Fails when t's .grad
** would then differ from t in device or dtype: move or clear it first. */
KEEL_API keel_status keel_tensor_set_data(keel_ctx *ctx, keel_tensor *t, keel_tensor *src);

/* }==================================================================== */

#ifdef __cplusplus
}
#endif

#endif
