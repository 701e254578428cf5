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

/* optim.c keeps at most this many state buffers per parameter */
#define KL_OPTIM_MAX_STATE 3

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

/* The name of op code op (KL_OP_*), or other. */
static const char *op_name(int op, const char *other) {
  return op >= 0 && op < KL_OP_COUNT ? kl_ops[op].name : other;
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

/* Index tensors reach the slots below as the ops hand them (linalg.c,
** loss.c, norm.c): int64, already on the device (often the caller's own
** tensor, checked on the host), with values counted from a base that the
** kernels subtract. on_gpu checks them like the other operands. */

/* The context's matmul precision, handed to the plugin before a product
** (one store there: cheaper than tracking what it last saw). */
static keel_status gemm_precision(keel_ctx *ctx, const char *fn) {
  if (!PL->set_gemm_precision) return ctx->gemm_prec ? no_kernel(ctx, fn) : KEEL_OK;
  return done(ctx, fn, PL->set_gemm_precision(ST, ctx->gemm_prec));
}

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
  return done(ctx, fn, PL->reduce(ST, op, view(out, &vo), view(idx, &vi), view(a, &va), reduce, ctx->index_base));
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
  if ((st = on_gpu(ctx, "matmul", out, a, b, NULL)) || (st = gemm_precision(ctx, "matmul"))) return st;
  return done(ctx, "matmul", PL->matmul(ST, view(out, &vo), view(a, &va), view(b, &vb)));
}

static keel_status cuda_gather(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, int dim,
                               const keel_tensor *index) {
  kc_view vo, va, vi;
  keel_status st;
  if (!PL->gather) return no_kernel(ctx, "gather");
  if ((st = on_gpu(ctx, "gather", out, a, index, NULL))) return st;
  return done(ctx, "gather", PL->gather(ST, view(out, &vo), view(a, &va), dim, view(index, &vi), ctx->index_base));
}

static keel_status cuda_scatter_add(keel_ctx *ctx, keel_tensor *out, int dim, const keel_tensor *index,
                                    const keel_tensor *src) {
  kc_view vo, vi, vs;
  keel_status st;
  if (!PL->scatter_add) return no_kernel(ctx, "scatter_add");
  if ((st = on_gpu(ctx, "scatter_add", out, index, src, NULL))) return st;
  return done(ctx, "scatter_add",
              PL->scatter_add(ST, view(out, &vo), dim, view(index, &vi), view(src, &vs), ctx->index_base));
}

static keel_status cuda_index_select(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, int dim,
                                     const keel_tensor *index) {
  kc_view vo, va, vi;
  keel_status st;
  if (!PL->index_select) return no_kernel(ctx, "index_select");
  if ((st = on_gpu(ctx, "index_select", out, a, index, NULL))) return st;
  return done(ctx, "index_select",
              PL->index_select(ST, view(out, &vo), view(a, &va), dim, view(index, &vi), ctx->index_base));
}

static keel_status cuda_act(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *a, const double *p) {
  const char *fn = op_name(op, "activation");
  kc_view vo, va;
  keel_status st;
  if (!PL->act) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, a, NULL))) return st;
  return done(ctx, fn, PL->act(ST, op, view(out, &vo), view(a, &va), p));
}

static keel_status cuda_act_backward(keel_ctx *ctx, int op, keel_tensor *gin, const keel_tensor *gout,
                                     const keel_tensor *a, const double *p) {
  const char *fn = op_name(op, "activation");
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
** Slots whose kernels take engine structures (mirrored in keel_cuda.h)
** ======================================================================= */

static const kc_win2d *win(const kl_win2d *g, kc_win2d *w) {
  w->n = g->n; w->c = g->c; w->h = g->h; w->w = g->w;
  w->oc = g->oc; w->oh = g->oh; w->ow = g->ow;
  for (int i = 0; i < 2; i++) {
    w->k[i] = g->k[i]; w->s[i] = g->s[i]; w->pad[i] = g->pad[i]; w->dil[i] = g->dil[i];
  }
  w->groups = g->groups;
  w->divisor = g->divisor;
  w->count_include_pad = g->count_include_pad;
  w->adaptive = g->adaptive;
  w->index_base = g->index_base;
  return w;
}

static keel_status cuda_conv2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, const keel_tensor *x,
                               const keel_tensor *w, const keel_tensor *b) {
  kc_win2d kw;
  kc_view vo, vx, vw, vb;
  keel_status st;
  if (!PL->conv2d) return no_kernel(ctx, "conv2d");
  if ((st = on_gpu(ctx, "conv2d", out, x, w, OPT(b), NULL)) || (st = gemm_precision(ctx, "conv2d"))) return st;
  return done(ctx, "conv2d", PL->conv2d(ST, win(g, &kw), view(out, &vo), view(x, &vx), view(w, &vw), view(b, &vb)));
}
static keel_status cuda_conv2d_backward(keel_ctx *ctx, const kl_win2d *g, const keel_tensor *gout,
                                        const keel_tensor *x, const keel_tensor *w, keel_tensor *gx,
                                        keel_tensor *gw, keel_tensor *gb) {
  kc_win2d kw;
  kc_view vg, vx, vw, vgx, vgw, vgb;
  keel_status st;
  if (!PL->conv2d_backward) return no_kernel(ctx, "conv2d backward");
  if ((st = on_gpu(ctx, "conv2d backward", gout, x, w, OPT(gx), OPT(gw), OPT(gb), NULL)) ||
      (st = gemm_precision(ctx, "conv2d backward")))
    return st;
  return done(ctx, "conv2d backward",
              PL->conv2d_backward(ST, win(g, &kw), view(gout, &vg), view(x, &vx), view(w, &vw), view(gx, &vgx),
                                  view(gw, &vgw), view(gb, &vgb)));
}
static keel_status cuda_max_pool2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, keel_tensor *idx,
                                   const keel_tensor *x) {
  kc_win2d kw;
  kc_view vo, vi, vx;
  keel_status st;
  if (!PL->max_pool2d) return no_kernel(ctx, "max_pool2d");
  if ((st = on_gpu(ctx, "max_pool2d", out, OPT(idx), x, NULL))) return st;
  return done(ctx, "max_pool2d", PL->max_pool2d(ST, win(g, &kw), view(out, &vo), view(idx, &vi), view(x, &vx)));
}
static keel_status cuda_max_pool2d_backward(keel_ctx *ctx, const kl_win2d *g, keel_tensor *gx,
                                            const keel_tensor *gout, const keel_tensor *idx) {
  kc_win2d kw;
  kc_view vgx, vg, vi;
  keel_status st;
  if (!PL->max_pool2d_backward) return no_kernel(ctx, "max_pool2d backward");
  if ((st = on_gpu(ctx, "max_pool2d backward", gx, gout, idx, NULL))) return st;
  return done(ctx, "max_pool2d backward",
              PL->max_pool2d_backward(ST, win(g, &kw), view(gx, &vgx), view(gout, &vg), view(idx, &vi)));
}
static keel_status cuda_avg_pool2d(keel_ctx *ctx, const kl_win2d *g, keel_tensor *out, const keel_tensor *x) {
  const char *fn = g && g->adaptive ? "adaptive_avg_pool2d" : "avg_pool2d";
  kc_win2d kw;
  kc_view vo, vx;
  keel_status st;
  if (!PL->avg_pool2d) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, x, NULL))) return st;
  return done(ctx, fn, PL->avg_pool2d(ST, win(g, &kw), view(out, &vo), view(x, &vx)));
}
static keel_status cuda_avg_pool2d_backward(keel_ctx *ctx, const kl_win2d *g, keel_tensor *gx,
                                            const keel_tensor *gout) {
  const char *fn = g && g->adaptive ? "adaptive_avg_pool2d backward" : "avg_pool2d backward";
  kc_win2d kw;
  kc_view vgx, vg;
  keel_status st;
  if (!PL->avg_pool2d_backward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, gx, gout, NULL))) return st;
  return done(ctx, fn, PL->avg_pool2d_backward(ST, win(g, &kw), view(gx, &vgx), view(gout, &vg)));
}

static keel_status cuda_norm_stats(keel_ctx *ctx, keel_tensor *mean, keel_tensor *rstd, keel_tensor *var,
                                   const keel_tensor *x, int64_t groups, double eps) {
  const char *fn = groups ? "layer_norm/group_norm" : "batch_norm";
  kc_view vm, vr, vv, vx;
  keel_status st;
  if (!PL->norm_stats) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, mean, rstd, OPT(var), x, NULL))) return st;
  return done(ctx, fn, PL->norm_stats(ST, view(mean, &vm), view(rstd, &vr), view(var, &vv), view(x, &vx), groups, eps));
}
static keel_status cuda_norm_forward(keel_ctx *ctx, keel_tensor *y, const keel_tensor *x, const keel_tensor *mean,
                                     const keel_tensor *rstd, const keel_tensor *weight, const keel_tensor *bias,
                                     int64_t groups) {
  const char *fn = groups ? "layer_norm/group_norm" : "batch_norm";
  kc_view vy, vx, vm, vr, vw, vb;
  keel_status st;
  if (!PL->norm_forward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, y, x, mean, rstd, OPT(weight), OPT(bias), NULL))) return st;
  return done(ctx, fn, PL->norm_forward(ST, view(y, &vy), view(x, &vx), view(mean, &vm), view(rstd, &vr),
                                        view(weight, &vw), view(bias, &vb), groups));
}
static keel_status cuda_norm_backward(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gw, keel_tensor *gb,
                                      const keel_tensor *gy, const keel_tensor *x, const keel_tensor *mean,
                                      const keel_tensor *rstd, const keel_tensor *weight, int64_t groups,
                                      int stats_of_x) {
  const char *fn = groups ? "layer_norm/group_norm backward" : "batch_norm backward";
  kc_view vgx, vgw, vgb, vgy, vx, vm, vr, vw;
  keel_status st;
  if (!PL->norm_backward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, OPT(gx), OPT(gw), OPT(gb), gy, x, mean, rstd, OPT(weight), NULL))) return st;
  return done(ctx, fn, PL->norm_backward(ST, view(gx, &vgx), view(gw, &vgw), view(gb, &vgb), view(gy, &vgy),
                                         view(x, &vx), view(mean, &vm), view(rstd, &vr), view(weight, &vw), groups,
                                         stats_of_x));
}
static keel_status cuda_dropout_mask(keel_ctx *ctx, keel_tensor *mask, double p) {
  kc_view vm;
  keel_status st;
  if (!PL->dropout_mask) return no_kernel(ctx, "dropout");
  if ((st = on_gpu(ctx, "dropout", mask, NULL))) return st;
  /* one draw of the context's RNG per mask: seeding keel seeds dropout */
  return done(ctx, "dropout", PL->dropout_mask(ST, view(mask, &vm), p, kl_rng_next(ctx)));
}
static keel_status cuda_embedding(keel_ctx *ctx, keel_tensor *out, const keel_tensor *weight,
                                  const keel_tensor *idx, int64_t base) {
  kc_view vo, vw, vi;
  keel_status st;
  if (!PL->embedding) return no_kernel(ctx, "embedding");
  if ((st = on_gpu(ctx, "embedding", out, weight, idx, NULL))) return st;
  return done(ctx, "embedding", PL->embedding(ST, view(out, &vo), view(weight, &vw), view(idx, &vi), base));
}
static keel_status cuda_embedding_backward(keel_ctx *ctx, keel_tensor *gw, const keel_tensor *gout,
                                           const keel_tensor *idx, int64_t base, int64_t pad) {
  kc_view vw, vg, vi;
  keel_status st;
  if (!PL->embedding_backward) return no_kernel(ctx, "embedding backward");
  if ((st = on_gpu(ctx, "embedding backward", gw, gout, idx, NULL))) return st;
  return done(ctx, "embedding backward",
              PL->embedding_backward(ST, view(gw, &vw), view(gout, &vg), view(idx, &vi), base, pad));
}

static keel_status cuda_ploss(keel_ctx *ctx, int op, keel_tensor *out, const keel_tensor *x, const keel_tensor *y,
                              double p, int red) {
  const char *fn = op_name(op, "loss");
  kc_view vo, vx, vy;
  keel_status st;
  if (!PL->ploss) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, x, y, NULL))) return st;
  return done(ctx, fn, PL->ploss(ST, op, view(out, &vo), view(x, &vx), view(y, &vy), p, red));
}
static keel_status cuda_ploss_backward(keel_ctx *ctx, int op, keel_tensor *gx, const keel_tensor *gout,
                                       const keel_tensor *x, const keel_tensor *y, double p, int red) {
  const char *fn = op_name(op, "loss");
  kc_view vgx, vg, vx, vy;
  keel_status st;
  if (!PL->ploss_backward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, gx, gout, x, y, NULL))) return st;
  return done(ctx, fn, PL->ploss_backward(ST, op, view(gx, &vgx), view(gout, &vg), view(x, &vx), view(y, &vy), p, red));
}
static const kc_closs *closs_args(const kl_closs *q, kc_closs *c) {
  c->n = q->n; c->c = q->c; c->inner = q->inner;
  c->smoothing = q->smoothing;
  c->index_base = q->index_base;
  c->ignore_index = q->ignore_index;
  c->reduction = q->reduction;
  c->logits = q->logits;
  c->probs = q->probs;
  return c;
}
/* aux's two parts (kl_closs): the logsumexps (NULL without logits), the divisor. */
static void closs_aux(const kl_closs *q, const keel_tensor *aux, kc_view *lse, kc_view *div,
                      const kc_view **plse) {
  int64_t nl = q->logits ? q->n * q->inner : 0;
  view(aux, lse);
  *div = *lse;
  lse->shape[0] = lse->numel = nl;
  div->shape[0] = div->numel = 1;
  div->data = (double *)div->data + nl;
  *plse = q->logits ? lse : NULL;
}
static keel_status cuda_closs(keel_ctx *ctx, const kl_closs *q, keel_tensor *out, keel_tensor *aux,
                              const keel_tensor *x, const keel_tensor *target, const keel_tensor *weight) {
  const char *fn = q->logits ? "cross_entropy" : "nll_loss";
  kc_closs c;
  kc_view vo, vl, vd, vx, vt, vw;
  const kc_view *pl;
  keel_status st;
  if (!PL->closs) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, aux, x, target, OPT(weight), NULL))) return st;
  closs_aux(q, aux, &vl, &vd, &pl);
  return done(ctx, fn, PL->closs(ST, closs_args(q, &c), view(out, &vo), pl, &vd, view(x, &vx), view(target, &vt),
                                 view(weight, &vw)));
}
static keel_status cuda_closs_backward(keel_ctx *ctx, const kl_closs *q, keel_tensor *gx, keel_tensor *gt,
                                       const keel_tensor *gout, const keel_tensor *x, const keel_tensor *target,
                                       const keel_tensor *weight, const keel_tensor *aux) {
  const char *fn = q->logits ? "cross_entropy backward" : "nll_loss backward";
  kc_closs c;
  kc_view vgx, vgt, vg, vx, vt, vw, vl, vd;
  const kc_view *pl;
  keel_status st;
  if (!PL->closs_backward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, OPT(gx), OPT(gt), gout, x, target, OPT(weight), aux, NULL))) return st;
  closs_aux(q, aux, &vl, &vd, &pl);
  return done(ctx, fn, PL->closs_backward(ST, closs_args(q, &c), view(gx, &vgx), view(gt, &vgt), view(gout, &vg),
                                          view(x, &vx), view(target, &vt), view(weight, &vw), pl, &vd));
}
static keel_status cuda_bce(keel_ctx *ctx, keel_tensor *out, const keel_tensor *x, const keel_tensor *y,
                            const keel_tensor *w, const keel_tensor *pw, int red) {
  const char *fn = "binary_cross_entropy_with_logits";
  kc_view vo, vx, vy, vw, vp;
  keel_status st;
  if (!PL->bce) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, out, x, y, OPT(w), OPT(pw), NULL))) return st;
  return done(ctx, fn, PL->bce(ST, view(out, &vo), view(x, &vx), view(y, &vy), view(w, &vw), view(pw, &vp), red));
}
static keel_status cuda_bce_backward(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gy, const keel_tensor *gout,
                                     const keel_tensor *x, const keel_tensor *y, const keel_tensor *w,
                                     const keel_tensor *pw, int red) {
  const char *fn = "binary_cross_entropy_with_logits backward";
  kc_view vgx, vgy, vg, vx, vy, vw, vp;
  keel_status st;
  if (!PL->bce_backward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, OPT(gx), OPT(gy), gout, x, y, OPT(w), OPT(pw), NULL))) return st;
  return done(ctx, fn, PL->bce_backward(ST, view(gx, &vgx), view(gy, &vgy), view(gout, &vg), view(x, &vx),
                                        view(y, &vy), view(w, &vw), view(pw, &vp), red));
}

/* @region:rnn (the rnn helper's) */
static const char *const rnn_names[KEEL_RNN_MODE_COUNT] = {"rnn_tanh", "rnn_relu", "lstm", "gru"};
static const char *const rnn_bwd_names[KEEL_RNN_MODE_COUNT] = {
  "rnn_tanh backward", "rnn_relu backward", "lstm backward", "gru backward",
};

/* The plugin's view of the arguments: v holds the 17 views (the kc_rnn
** fields point into it); the workspace's layout is the CPU backend's. */
static const kc_rnn *rnn_args(const kl_rnn_args *a, kc_rnn *r, kc_view *v) {
  kl_rnn_ws w = kl_rnn_ws_layout(a);
  r->ws_at.hp = w.hp; r->ws_at.hn = w.hn; r->ws_at.c = w.c; r->ws_at.c0 = w.c0;
  r->ws_at.g = w.g; r->ws_at.tc = w.tc; r->ws_at.total = w.total;
  r->mode = a->mode;
  r->reverse = a->reverse;
  r->T = a->T; r->B = a->B; r->In = a->In; r->H = a->H;
  r->x = view(a->x, &v[0]);
  r->h0 = view(a->h0, &v[1]);
  r->c0 = view(a->c0, &v[2]);
  r->w_ih = view(a->w_ih, &v[3]);
  r->w_hh = view(a->w_hh, &v[4]);
  r->b_ih = view(a->b_ih, &v[5]);
  r->b_hh = view(a->b_hh, &v[6]);
  r->out = view(a->out, &v[7]);
  r->ws = view(a->ws, &v[8]);
  r->gout = view(a->gout, &v[9]);
  r->dx = view(a->dx, &v[10]);
  r->dh0 = view(a->dh0, &v[11]);
  r->dc0 = view(a->dc0, &v[12]);
  r->dw_ih = view(a->dw_ih, &v[13]);
  r->dw_hh = view(a->dw_hh, &v[14]);
  r->db_ih = view(a->db_ih, &v[15]);
  r->db_hh = view(a->db_hh, &v[16]);
  return r;
}

/* Makes a->ws on the device (the CPU backend's layout, which backward
** reads), then runs the layer; a->ws stays NULL on error. */
static keel_status cuda_rnn_forward(keel_ctx *ctx, kl_rnn_args *a) {
  const char *fn = name_of(rnn_names, KEEL_RNN_MODE_COUNT, a->mode, "rnn");
  kc_rnn r;
  kc_view v[17];
  keel_tensor *ws = NULL;
  int64_t n;
  keel_status st;
  a->ws = NULL;
  if (!PL->rnn_forward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, a->x, OPT(a->h0), OPT(a->c0), a->w_ih, a->w_hh, OPT(a->b_ih), OPT(a->b_hh), a->out,
                   NULL)) ||
      (st = gemm_precision(ctx, fn)))
    return st;
  n = kl_rnn_ws_layout(a).total;
  if ((st = kl_new(ctx, a->x->dtype, a->x->storage->device, 1, &n, &ws))) return st;
  a->ws = ws;
  st = done(ctx, fn, PL->rnn_forward(ST, rnn_args(a, &r, v)));
  if (st) {
    a->ws = NULL;
    keel_tensor_release(ws);
  }
  return st;
}
static keel_status cuda_rnn_backward(keel_ctx *ctx, kl_rnn_args *a) {
  const char *fn = name_of(rnn_bwd_names, KEEL_RNN_MODE_COUNT, a->mode, "rnn backward");
  kc_rnn r;
  kc_view v[17];
  keel_status st;
  if (!PL->rnn_backward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, a->x, a->w_ih, a->w_hh, a->ws, a->gout, OPT(a->dx), OPT(a->dh0),
                   OPT(a->dc0), OPT(a->dw_ih), OPT(a->dw_hh), OPT(a->db_ih), OPT(a->db_hh), NULL)) ||
      (st = gemm_precision(ctx, fn)))
    return st;
  return done(ctx, fn, PL->rnn_backward(ST, rnn_args(a, &r, v)));
}
/* @endregion:rnn */

/* @region:attn */
/* The plugin's view of the arguments (v: 11 views, the kc_sdpa fields
** point into it). */
static const kc_sdpa *sdpa_args(const kl_sdpa_args *a, kc_sdpa *r, kc_view *v) {
  r->B = a->B; r->L = a->L; r->S = a->S; r->E = a->E; r->Ev = a->Ev;
  r->scale = a->scale; r->p = a->p; r->seed = a->seed; r->causal = a->causal;
  r->q = view(a->q, &v[0]);
  r->k = view(a->k, &v[1]);
  r->v = view(a->v, &v[2]);
  r->bias = view(a->bias, &v[3]);
  r->out = view(a->out, &v[4]);
  r->lse = view(a->lse, &v[5]);
  r->gout = view(a->gout, &v[6]);
  r->dq = view(a->dq, &v[7]);
  r->dk = view(a->dk, &v[8]);
  r->dv = view(a->dv, &v[9]);
  r->dbias = view(a->dbias, &v[10]);
  return r;
}
static keel_status cuda_sdpa_forward(keel_ctx *ctx, const kl_sdpa_args *a) {
  const char *fn = "scaled_dot_product_attention";
  kc_sdpa r;
  kc_view v[11];
  keel_status st;
  if (!PL->sdpa_forward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, a->q, a->k, a->v, OPT(a->bias), a->out, a->lse, NULL)) ||
      (st = gemm_precision(ctx, fn)))
    return st;
  return done(ctx, fn, PL->sdpa_forward(ST, sdpa_args(a, &r, v)));
}
static keel_status cuda_sdpa_backward(keel_ctx *ctx, const kl_sdpa_args *a) {
  const char *fn = "scaled_dot_product_attention backward";
  kc_sdpa r;
  kc_view v[11];
  keel_status st;
  if (!PL->sdpa_backward) return no_kernel(ctx, fn);
  if ((st = on_gpu(ctx, fn, a->q, a->k, a->v, OPT(a->bias), a->out, a->lse, a->gout, OPT(a->dq), OPT(a->dk),
                   OPT(a->dv), OPT(a->dbias), NULL)) ||
      (st = gemm_precision(ctx, fn)))
    return st;
  return done(ctx, fn, PL->sdpa_backward(ST, sdpa_args(a, &r, v)));
}
/* @endregion:attn */

static keel_status cuda_grad_stats(keel_ctx *ctx, const keel_tensor *g, int64_t nunits, const double *a,
                                   const double *v, double pw, keel_grad_stats *st, double *spow,
                                   const keel_tensor *w) {
  kc_view vg, vw;
  keel_status s;
  if (!PL->grad_stats) return no_kernel(ctx, "grad_stats");
  if ((s = on_gpu(ctx, "grad_stats", g, OPT(w), NULL))) return s;
  /* queued while an optimizer batch is open (kl_cuda_defer) */
  return done(ctx, "grad_stats",
              PL->grad_stats(kl_cuda_batch_state(ctx), view(g, &vg), nunits, a, v, pw, st, spow, view(w, &vw)));
}
static keel_status cuda_grad_scale_(keel_ctx *ctx, keel_tensor *g, int64_t nunits, const double *a,
                                    const double *v) {
  kc_view vg;
  keel_status s;
  if (!PL->grad_scale_) return no_kernel(ctx, "clip");
  if ((s = on_gpu(ctx, "clip", g, NULL))) return s;
  if ((s = done(ctx, "clip", PL->grad_scale_(ST, view(g, &vg), nunits, a, v)))) return s;
  g->storage->version++;   /* an in-place write, as the CPU slot counts it */
  return KEEL_OK;
}
static keel_status cuda_optim_update(keel_ctx *ctx, keel_optim_kind kind, const keel_optim_hparams *h,
                                     int64_t step, keel_tensor *p, const keel_tensor *g,
                                     keel_tensor *const *state, unsigned fresh, int64_t nunits,
                                     const double *a, const double *v, keel_nonfinite nf, double *dsq,
                                     double *wsq) {
  const char *const *names;
  int ns = keel_optim_state_names(kind, &names);
  kc_view vp, vg, vs[KL_OPTIM_MAX_STATE];
  const kc_view *sv[KL_OPTIM_MAX_STATE];
  keel_status st;
  const char *fn = keel_optim_kind_name(kind);
  if (!PL->optim_update) return no_kernel(ctx, "optimizer step");
  /* optim.c moves state to its parameter's device first (and passes
  ** KL_OPTIM_MAX_STATE slots): this is the usual last check */
  if ((st = on_gpu(ctx, fn, p, g, OPT(state[0]), OPT(state[1]), OPT(state[2]), NULL))) return st;
  if (ns > KL_OPTIM_MAX_STATE) return kl_error(ctx, KEEL_ERR_STATE, "%s.step: too many state buffers", fn);
  for (int k = 0; k < ns; k++) sv[k] = view(state[k], &vs[k]);
  if ((st = done(ctx, fn, PL->optim_update(kl_cuda_batch_state(ctx), kind, h, step, view(p, &vp), view(g, &vg), sv,
                                           ns, fresh, nunits, a, v, nf, dsq, wsq))))
    return st;
  p->storage->version++;   /* an in-place write, as the CPU slot counts it */
  return KEEL_OK;
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
  /* @slots:attn */
  .sdpa_forward = cuda_sdpa_forward,
  .sdpa_backward = cuda_sdpa_backward,
  /* @slots:optim */
  .grad_stats = cuda_grad_stats,
  .grad_scale_ = cuda_grad_scale_,
  .optim_update = cuda_optim_update,
};
