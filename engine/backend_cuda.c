/*
** backend_cuda.c: the CUDA backend's vtable. Each slot describes its
** tensors as kc_views and calls the plugin (kernels/keel_cuda.h); a slot
** whose kernel the plugin does not have yet fails with KEEL_ERR_DEVICE
** "<op>: no CUDA kernel yet", so an op on CUDA tensors is an error, never
** a crash. Every slot of kl_backend is set here: tests/c/test_device.c
** checks that none is NULL, so a slot added to kl_backend without a CUDA
** entry fails the test instead of crashing a GPU run.
**
** Ops check that their inputs share a device (kl_check_device); the slots
** check again that every tensor they hand the plugin is a CUDA one, since
** a host address read as a device address would poison the CUDA context
** for the rest of the process.
*/
#include <string.h>
#include "keel_impl.h"
#include "keel_cuda.h"

/* {======================================================================
** Helpers
** ======================================================================= */

static const char *const binop_names[KEEL_BINOP_COUNT] = {
  "add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
};
static const char *const unop_names[KEEL_UNOP_COUNT] = {
  "neg", "exp", "log", "sqrt", "abs", "relu", "sigmoid", "tanh", "sign",
};
static const char *const redop_names[KEEL_REDOP_COUNT] = {"sum", "mean", "max", "min", "prod"};

static const char *name_of(const char *const *names, int n, int i, const char *other) {
  return i >= 0 && i < n ? names[i] : other;
}

static keel_status no_kernel(keel_ctx *ctx, const char *op) {
  return kl_error(ctx, KEEL_ERR_DEVICE, "%s: no CUDA kernel yet", op);
}

/* The view of t (NULL for none). */
static const kc_view *view(const keel_tensor *t, kc_view *v) {
  if (!t) return NULL;
  v->data = kl_data(t);
  v->dtype = (int32_t)t->dtype;
  v->ndim = t->ndim;
  v->numel = t->numel;
  for (int i = 0; i < t->ndim; i++) {
    v->shape[i] = t->shape[i];
    v->stride[i] = t->stride[i];
  }
  return v;
}

/* Every non-NULL tensor of the list (NULL-terminated) is a CUDA tensor. */
static keel_status on_gpu(keel_ctx *ctx, const char *fn, const keel_tensor *t, ...) {
  va_list ap;
  keel_status st = KEEL_OK;
  va_start(ap, t);
  for (; t && !st; t = va_arg(ap, const keel_tensor *)) {
    if (t == (const keel_tensor *)1) continue;   /* an optional tensor that is absent */
    if (t->storage->device != KEEL_CUDA)
      st = kl_error(ctx, KEEL_ERR_DEVICE, "%s: a %s tensor reached the CUDA backend (expected all on cuda)", fn,
                    keel_device_name(t->storage->device));
  }
  va_end(ap);
  return st;
}
/* optional arguments of on_gpu: absent ones must not end the list */
#define OPT(t) ((t) ? (t) : (const keel_tensor *)1)

static keel_status done(keel_ctx *ctx, const char *fn, int code) {
  if (code == KC_OK) return KEEL_OK;
  return kl_cuda_error(ctx, fn, code);
}

#define PL (kl_cuda_table(ctx))
#define ST (kl_cuda_state(ctx))

/* }====================================================================== */

/* {======================================================================
** Memory, copy, fill
** ======================================================================= */

static keel_status cuda_copy(keel_ctx *ctx, keel_tensor *dst, const keel_tensor *src) {
  kc_view vd, vs;
  keel_status st = on_gpu(ctx, "copy", dst, src, NULL);
  if (st) return st;
  return done(ctx, "copy", PL->copy(ST, view(dst, &vd), view(src, &vs)));
}

static keel_status cuda_fill(keel_ctx *ctx, keel_tensor *dst, double v) {
  kc_view vd;
  keel_status st = on_gpu(ctx, "fill", dst, NULL);
  if (st) return st;
  return done(ctx, "fill", PL->fill(ST, view(dst, &vd), v));
}

/* }====================================================================== */

/* {======================================================================
** Slots with a plugin entry point: called when the plugin has the kernel
** ======================================================================= */

static keel_status cuda_binary(keel_ctx *ctx, keel_binop op, keel_tensor *out, const keel_tensor *a,
                               const keel_tensor *b) {
  const char *fn = name_of(binop_names, KEEL_BINOP_COUNT, op, "binary");
  kc_view vo, va, vb;
  keel_status st;
  if (!PL->binary) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, a, b, NULL))) return st;
  return done(ctx, fn, PL->binary(ST, op, view(out, &vo), view(a, &va), view(b, &vb)));
}

static keel_status cuda_unary(keel_ctx *ctx, keel_unop op, keel_tensor *out, const keel_tensor *a) {
  const char *fn = name_of(unop_names, KEEL_UNOP_COUNT, op, "unary");
  kc_view vo, va;
  keel_status st;
  if (!PL->unary) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, a, NULL))) return st;
  return done(ctx, fn, PL->unary(ST, op, view(out, &vo), view(a, &va)));
}

static keel_status cuda_clamp(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, double lo, double hi) {
  kc_view vo, va;
  keel_status st;
  if (!PL->clamp) return no_kernel(ctx, "clamp");
  if ((st = on_gpu(ctx, "clamp", out, a, NULL))) return st;
  return done(ctx, "clamp", PL->clamp(ST, view(out, &vo), view(a, &va), lo, hi));
}

static keel_status cuda_where(keel_ctx *ctx, keel_tensor *out, const keel_tensor *c, const keel_tensor *a,
                              const keel_tensor *b) {
  kc_view vo, vc, va, vb;
  keel_status st;
  if (!PL->where) return no_kernel(ctx, "where");
  if ((st = on_gpu(ctx, "where", out, c, a, b, NULL))) return st;
  return done(ctx, "where", PL->where(ST, view(out, &vo), view(c, &vc), view(a, &va), view(b, &vb)));
}

static keel_status cuda_reduce(keel_ctx *ctx, keel_redop op, keel_tensor *out, keel_tensor *idx,
                               const keel_tensor *a, const int *reduce) {
  const char *fn = name_of(redop_names, KEEL_REDOP_COUNT, op, "reduce");
  kc_view vo, vi, va;
  keel_status st;
  if (!PL->reduce) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, OPT(idx), a, NULL))) return st;
  return done(ctx, fn, PL->reduce(ST, op, view(out, &vo), view(idx, &vi), view(a, &va), reduce));
}

static keel_status cuda_norm(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, const int *reduce, double p) {
  kc_view vo, va;
  keel_status st;
  if (!PL->norm) return no_kernel(ctx, "norm");
  if ((st = on_gpu(ctx, "norm", out, a, NULL))) return st;
  return done(ctx, "norm", PL->norm(ST, view(out, &vo), view(a, &va), reduce, p));
}

static keel_status cuda_matmul(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, const keel_tensor *b) {
  kc_view vo, va, vb;
  keel_status st;
  if (!PL->matmul) return no_kernel(ctx, "matmul");
  if ((st = on_gpu(ctx, "matmul", out, a, b, NULL))) return st;
  return done(ctx, "matmul", PL->matmul(ST, view(out, &vo), view(a, &va), view(b, &vb)));
}

static keel_status cuda_gather(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, int dim,
                               const keel_tensor *index) {
  kc_view vo, va, vi;
  keel_status st;
  if (!PL->gather) return no_kernel(ctx, "gather");
  if ((st = on_gpu(ctx, "gather", out, a, index, NULL))) return st;
  return done(ctx, "gather", PL->gather(ST, view(out, &vo), view(a, &va), dim, view(index, &vi)));
}

static keel_status cuda_scatter_add(keel_ctx *ctx, keel_tensor *out, int dim, const keel_tensor *index,
                                    const keel_tensor *src) {
  kc_view vo, vi, vs;
  keel_status st;
  if (!PL->scatter_add) return no_kernel(ctx, "scatter_add");
  if ((st = on_gpu(ctx, "scatter_add", out, index, src, NULL))) return st;
  return done(ctx, "scatter_add", PL->scatter_add(ST, view(out, &vo), dim, view(index, &vi), view(src, &vs)));
}

static keel_status cuda_index_select(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, int dim,
                                     const keel_tensor *index) {
  kc_view vo, va, vi;
  keel_status st;
  if (!PL->index_select) return no_kernel(ctx, "index_select");
  if ((st = on_gpu(ctx, "index_select", out, a, index, NULL))) return st;
  return done(ctx, "index_select", PL->index_select(ST, view(out, &vo), view(a, &va), dim, view(index, &vi)));
}

static keel_status cuda_act(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *a, const double *p) {
  const char *fn = op >= 0 && op < KL_OP_COUNT ? kl_ops[op].name : "activation";
  kc_view vo, va;
  keel_status st;
  if (!PL->act) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, a, NULL))) return st;
  return done(ctx, fn, PL->act(ST, op, view(out, &vo), view(a, &va), p));
}

static keel_status cuda_act_backward(keel_ctx *ctx, int op, keel_tensor *gin, const keel_tensor *gout,
                                     const keel_tensor *a, const double *p) {
  const char *fn = op >= 0 && op < KL_OP_COUNT ? kl_ops[op].name : "activation";
  kc_view vg, vo, va;
  keel_status st;
  if (!PL->act_backward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, gin, gout, a, NULL))) return st;
  return done(ctx, fn, PL->act_backward(ST, op, view(gin, &vg), view(gout, &vo), view(a, &va), p));
}

static keel_status cuda_softmax(keel_ctx *ctx, int log_out, keel_tensor *out, const keel_tensor *a, int dim) {
  const char *fn = log_out ? "log_softmax" : "softmax";
  kc_view vo, va;
  keel_status st;
  if (!PL->softmax) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, a, NULL))) return st;
  return done(ctx, fn, PL->softmax(ST, log_out, view(out, &vo), view(a, &va), dim));
}

static keel_status cuda_softmax_backward(keel_ctx *ctx, int log_out, keel_tensor *gin, const keel_tensor *gout,
                                         const keel_tensor *y, int dim) {
  const char *fn = log_out ? "log_softmax" : "softmax";
  kc_view vg, vo, vy;
  keel_status st;
  if (!PL->softmax_backward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, gin, gout, y, NULL))) return st;
  return done(ctx, fn, PL->softmax_backward(ST, log_out, view(gin, &vg), view(gout, &vo), view(y, &vy), dim));
}

/* }====================================================================== */

/* {======================================================================
** Slots whose kernels take engine structures: no ABI entry yet (see the
** end of kernels/keel_cuda.h)
** ======================================================================= */

static keel_status cuda_conv2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, const keel_tensor *x,
                               const keel_tensor *w, const keel_tensor *b) {
  (void)g; (void)out; (void)x; (void)w; (void)b;
  return no_kernel(ctx, "conv2d");
}
static keel_status cuda_conv2d_backward(keel_ctx *ctx, const kl_win2d *g, const keel_tensor *gout,
                                        const keel_tensor *x, const keel_tensor *w, keel_tensor *gx,
                                        keel_tensor *gw, keel_tensor *gb) {
  (void)g; (void)gout; (void)x; (void)w; (void)gx; (void)gw; (void)gb;
  return no_kernel(ctx, "conv2d backward");
}
static keel_status cuda_max_pool2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, keel_tensor *idx,
                                   const keel_tensor *x) {
  (void)g; (void)out; (void)idx; (void)x;
  return no_kernel(ctx, "max_pool2d");
}
static keel_status cuda_max_pool2d_backward(keel_ctx *ctx, const kl_win2d *g, keel_tensor *gx,
                                            const keel_tensor *gout, const keel_tensor *idx) {
  (void)g; (void)gx; (void)gout; (void)idx;
  return no_kernel(ctx, "max_pool2d backward");
}
static keel_status cuda_avg_pool2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, const keel_tensor *x) {
  (void)out; (void)x;
  return no_kernel(ctx, g && g->adaptive ? "adaptive_avg_pool2d" : "avg_pool2d");
}
static keel_status cuda_avg_pool2d_backward(keel_ctx *ctx, const kl_win2d *g, keel_tensor *gx,
                                            const keel_tensor *gout) {
  (void)gx; (void)gout;
  return no_kernel(ctx, g && g->adaptive ? "adaptive_avg_pool2d backward" : "avg_pool2d backward");
}
static keel_status cuda_norm_stats(keel_ctx *ctx, keel_tensor *mean, keel_tensor *rstd, keel_tensor *var,
                                   const keel_tensor *x, int64_t groups, double eps) {
  (void)mean; (void)rstd; (void)var; (void)x; (void)eps;
  return no_kernel(ctx, groups ? "layer_norm/group_norm" : "batch_norm");
}
static keel_status cuda_norm_forward(keel_ctx *ctx, keel_tensor *y, const keel_tensor *x, const keel_tensor *mean,
                                     const keel_tensor *rstd, const keel_tensor *weight, const keel_tensor *bias,
                                     int64_t groups) {
  (void)y; (void)x; (void)mean; (void)rstd; (void)weight; (void)bias;
  return no_kernel(ctx, groups ? "layer_norm/group_norm" : "batch_norm");
}
static keel_status cuda_norm_backward(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gw, keel_tensor *gb,
                                      const keel_tensor *gy, const keel_tensor *x, const keel_tensor *mean,
                                      const keel_tensor *rstd, const keel_tensor *weight, int64_t groups,
                                      int stats_of_x) {
  (void)gx; (void)gw; (void)gb; (void)gy; (void)x; (void)mean; (void)rstd; (void)weight; (void)stats_of_x;
  return no_kernel(ctx, groups ? "layer_norm/group_norm backward" : "batch_norm backward");
}
static keel_status cuda_dropout_mask(keel_ctx *ctx, keel_tensor *mask, double p) {
  (void)mask; (void)p;
  return no_kernel(ctx, "dropout");
}
static keel_status cuda_embedding(keel_ctx *ctx, keel_tensor *out, const keel_tensor *weight,
                                  const keel_tensor *idx) {
  (void)out; (void)weight; (void)idx;
  return no_kernel(ctx, "embedding");
}
static keel_status cuda_embedding_backward(keel_ctx *ctx, keel_tensor *gw, const keel_tensor *gout,
                                           const keel_tensor *idx, int64_t pad) {
  (void)gw; (void)gout; (void)idx; (void)pad;
  return no_kernel(ctx, "embedding backward");
}
static keel_status cuda_ploss(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *x, const keel_tensor *y,
                              double p, int red) {
  (void)out; (void)x; (void)y; (void)p; (void)red;
  return no_kernel(ctx, op >= 0 && op < KL_OP_COUNT ? kl_ops[op].name : "loss");
}
static keel_status cuda_ploss_backward(keel_ctx *ctx, int op, keel_tensor *gx, const keel_tensor *gout,
                                       const keel_tensor *x, const keel_tensor *y, double p, int red) {
  (void)gx; (void)gout; (void)x; (void)y; (void)p; (void)red;
  return no_kernel(ctx, op >= 0 && op < KL_OP_COUNT ? kl_ops[op].name : "loss");
}
static keel_status cuda_closs(keel_ctx *ctx, const kl_closs *q, keel_tensor *out, keel_tensor *lse, double *wsum,
                              const keel_tensor *x, const keel_tensor *target, const keel_tensor *weight) {
  (void)out; (void)lse; (void)wsum; (void)x; (void)target; (void)weight;
  return no_kernel(ctx, q && q->logits ? "cross_entropy" : "nll_loss");
}
static keel_status cuda_closs_backward(keel_ctx *ctx, const kl_closs *q, keel_tensor *gx, keel_tensor *gt,
                                       const keel_tensor *gout, const keel_tensor *x, const keel_tensor *target,
                                       const keel_tensor *weight, const keel_tensor *lse, double wsum) {
  (void)gx; (void)gt; (void)gout; (void)x; (void)target; (void)weight; (void)lse; (void)wsum;
  return no_kernel(ctx, q && q->logits ? "cross_entropy backward" : "nll_loss backward");
}
static keel_status cuda_bce(keel_ctx *ctx, keel_tensor *out, const keel_tensor *x, const keel_tensor *y,
                            const keel_tensor *w, const keel_tensor *pw, int red) {
  (void)out; (void)x; (void)y; (void)w; (void)pw; (void)red;
  return no_kernel(ctx, "binary_cross_entropy_with_logits");
}
static keel_status cuda_bce_backward(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gy, const keel_tensor *gout,
                                     const keel_tensor *x, const keel_tensor *y, const keel_tensor *w,
                                     const keel_tensor *pw, int red) {
  (void)gx; (void)gy; (void)gout; (void)x; (void)y; (void)w; (void)pw; (void)red;
  return no_kernel(ctx, "binary_cross_entropy_with_logits backward");
}
static keel_status cuda_rnn_forward(keel_ctx *ctx, kl_rnn_args *a) {
  (void)a;
  return no_kernel(ctx, "rnn");
}
static keel_status cuda_rnn_backward(keel_ctx *ctx, kl_rnn_args *a) {
  (void)a;
  return no_kernel(ctx, "rnn backward");
}
static keel_status cuda_grad_stats(keel_ctx *ctx, const keel_tensor *g, int64_t nunits, const double *a,
                                   const double *v, double pw, keel_grad_stats *st, double *spow,
                                   const keel_tensor *w) {
  (void)g; (void)nunits; (void)a; (void)v; (void)pw; (void)st; (void)spow; (void)w;
  return no_kernel(ctx, "grad_stats");
}
static keel_status cuda_grad_scale_(keel_ctx *ctx, keel_tensor *g, int64_t nunits, const double *a,
                                    const double *v) {
  (void)g; (void)nunits; (void)a; (void)v;
  return no_kernel(ctx, "clip");
}
static keel_status cuda_optim_update(keel_ctx *ctx, keel_optim_kind kind, const keel_optim_hparams *h,
                                     int64_t step, keel_tensor *p, const keel_tensor *g,
                                     keel_tensor *const *state, unsigned fresh, int64_t nunits,
                                     const double *a, const double *v, keel_nonfinite nf, double *dsq) {
  const char *const *names;
  int ns = keel_optim_state_names(kind, &names);
  (void)h; (void)step; (void)g; (void)fresh; (void)nunits; (void)a; (void)v; (void)nf; (void)dsq;
  /* state made while the parameter was on the CPU (the model moved after
  ** the optimizer was built) must not reach a kernel */
  for (int k = 0; k < ns; k++)
    if (state[k] && state[k]->storage->device != p->storage->device)
      return kl_error(ctx, KEEL_ERR_DEVICE,
                      "%s.step: state %s is on %s, its parameter on %s; build the optimizer after moving the model",
                      keel_optim_kind_name(kind), names[k], keel_device_name(state[k]->storage->device),
                      keel_device_name(p->storage->device));
  return no_kernel(ctx, "optimizer step");
}

/* }====================================================================== */

const kl_backend kl_cuda_backend = {
  .name = "cuda",
  .alloc = kl_cuda_alloc,
  .free = kl_cuda_free,
  .copy = cuda_copy,
  .fill = cuda_fill,
  .binary = cuda_binary,
  .unary = cuda_unary,
  .clamp = cuda_clamp,
  .where = cuda_where,
  .reduce = cuda_reduce,
  .norm = cuda_norm,
  .matmul = cuda_matmul,
  .gather = cuda_gather,
  .scatter_add = cuda_scatter_add,
  .index_select = cuda_index_select,
  /* @slots:conv */
  .conv2d = cuda_conv2d,
  .conv2d_backward = cuda_conv2d_backward,
  .max_pool2d = cuda_max_pool2d,
  .max_pool2d_backward = cuda_max_pool2d_backward,
  .avg_pool2d = cuda_avg_pool2d,
  .avg_pool2d_backward = cuda_avg_pool2d_backward,
  /* @slots:norm */
  .norm_stats = cuda_norm_stats,
  .norm_forward = cuda_norm_forward,
  .norm_backward = cuda_norm_backward,
  .dropout_mask = cuda_dropout_mask,
  .embedding = cuda_embedding,
  .embedding_backward = cuda_embedding_backward,
  /* @slots:act */
  .act = cuda_act,
  .act_backward = cuda_act_backward,
  .softmax = cuda_softmax,
  .softmax_backward = cuda_softmax_backward,
  .ploss = cuda_ploss,
  .ploss_backward = cuda_ploss_backward,
  .closs = cuda_closs,
  .closs_backward = cuda_closs_backward,
  .bce = cuda_bce,
  .bce_backward = cuda_bce_backward,
  /* @slots:rnn */
  .rnn_forward = cuda_rnn_forward,
  .rnn_backward = cuda_rnn_backward,
  /* @slots:optim */
  .grad_stats = cuda_grad_stats,
  .grad_scale_ = cuda_grad_scale_,
  .optim_update = cuda_optim_update,
};
