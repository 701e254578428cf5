/*
** loss.c: the losses, each one op with a fused C forward and backward:
** mse, l1, smooth_l1 and huber (pointwise), cross entropy from logits and
** nll from log-probabilities (class losses), and binary cross entropy
** from logits. Semantics follow PyTorch, including "mean" with class
** weights (divided by the summed weights of the kept targets) and label
** smoothing with weights. Kernels: backend_cpu_act.c.
**
** Class-index targets may be int64 or whole-valued floats (Lua numbers);
** they use the context's index base, and a target equal to ignore_index
** (KEEL_NO_IGNORE: none) contributes nothing. The op checks them on the
** host, then hands the backend int64 targets with the base and ignored
** value they use (kl_closs): the CUDA backend gets an int64 device target
** as the caller gave it (no copy to the host and back), others a copy
** converted to 0-based with -1 for ignored ones.
*/
#include <math.h>
#include <string.h>
#include "keel_impl.h"

#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

static const kl_backend *backend(keel_ctx *ctx, const keel_tensor *t) {
  return kl_backend_for(ctx, t->storage->device);
}

static keel_status check_reduction(keel_ctx *ctx, const char *fn, keel_reduction red) {
  if (red == KEEL_REDUCTION_NONE || red == KEEL_REDUCTION_MEAN || red == KEEL_REDUCTION_SUM) return KEEL_OK;
  return kl_error(ctx, KEEL_ERR_ARG, "%s: unknown reduction %d, expected none, mean or sum", fn, (int)red);
}

static int same_shape(const keel_tensor *a, const keel_tensor *b) {
  return a->ndim == b->ndim && !memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim);
}

#define same_device kl_check_device

/* The float dtype both operands are computed in. */
static keel_status loss_dtype(keel_ctx *ctx, const char *fn, const keel_tensor *x, const keel_tensor *y,
                              keel_dtype *dt) {
  keel_status st;
  if ((st = kl_check_float(ctx, fn, x))) return st;
  *dt = kl_promote(x->dtype, y->dtype);
  return KEEL_OK;
}

static keel_status shapes_match(keel_ctx *ctx, const char *fn, const keel_tensor *x, const keel_tensor *y) {
  char b1[128], b2[128];
  if (same_shape(x, y)) return KEEL_OK;
  return kl_error(ctx, KEEL_ERR_SHAPE, "%s: target has shape %s, input has shape %s; expected the same shape",
                  fn, kl_shape_str(b1, sizeof b1, y->ndim, y->shape), kl_shape_str(b2, sizeof b2, x->ndim, x->shape));
}

/* Weights enter as constants: PyTorch gives them no gradient either. */
static keel_status check_constant(keel_ctx *ctx, const char *fn, const char *what, const keel_tensor *t) {
  if (t && ctx->grad_enabled && (t->requires_grad || t->grad_fn))
    return kl_error(ctx, KEEL_ERR_ARG, "%s: %s requires grad, but the loss is not differentiable in it; "
                    "pass %s:detach()", fn, what, what);
  return KEEL_OK;
}

/* 0-d output for mean/sum, else the given shape. */
static keel_status loss_out(keel_ctx *ctx, keel_dtype dt, const keel_tensor *like, keel_reduction red, int ndim,
                            const int64_t *shape, keel_tensor **out) {
  if (red != KEEL_REDUCTION_NONE) return kl_new(ctx, dt, like->storage->device, 0, NULL, out);
  return kl_new(ctx, dt, like->storage->device, ndim, shape, out);
}

/* {======================================================================
** Pointwise losses
** ======================================================================= */

static keel_status pointwise_loss(keel_ctx *ctx, int op, keel_tensor *x, keel_tensor *y, double p,
                                  keel_reduction red, keel_tensor **out) {
  const char *fn = kl_ops[op].name;
  keel_tensor *xs = NULL, *ys = NULL, *o = NULL;
  keel_dtype dt;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, x)) || (st = kl_check_same_ctx(ctx, fn, y))) return st;
  if ((st = check_reduction(ctx, fn, red)) || (st = loss_dtype(ctx, fn, x, y, &dt))) return st;
  if ((st = shapes_match(ctx, fn, x, y)) || (st = same_device(ctx, fn, x, y))) return st;
  TRY(kl_act_dense(ctx, x, dt, &xs));
  TRY(kl_act_dense(ctx, y, dt, &ys));
  TRY(loss_out(ctx, dt, x, red, x->ndim, x->shape, &o));
  TRY(backend(ctx, x)->ploss(ctx, op, o, xs, ys, p, (int)red));
  {
    keel_tensor *in[2] = {x, y};
    if (kl_needs_grad(ctx, 2, in)) {
      kl_node *n = kl_record(ctx, op, 2, in, o);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
      n->fparam[0] = p;
      n->iparam[0] = red;
      TRY(kl_save(ctx, n, 0, xs));
      TRY(kl_save(ctx, n, 1, ys));
    }
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(xs);
  keel_tensor_release(ys);
  keel_tensor_release(o);
  return st;
}

keel_status keel_mse_loss(keel_ctx *ctx, keel_tensor *input, keel_tensor *target, keel_reduction red,
                          keel_tensor **out) {
  return pointwise_loss(ctx, KL_OP_MSE_LOSS, input, target, 0, red, out);
}

keel_status keel_l1_loss(keel_ctx *ctx, keel_tensor *input, keel_tensor *target, keel_reduction red,
                         keel_tensor **out) {
  return pointwise_loss(ctx, KL_OP_L1_LOSS, input, target, 0, red, out);
}

keel_status keel_smooth_l1_loss(keel_ctx *ctx, keel_tensor *input, keel_tensor *target, double beta,
                                keel_reduction red, keel_tensor **out) {
  *out = NULL;
  if (!(beta >= 0) || isinf(beta))
    return kl_error(ctx, KEEL_ERR_ARG, "smooth_l1_loss: beta must be >= 0 and finite, got %g", beta);
  return pointwise_loss(ctx, KL_OP_SMOOTH_L1_LOSS, input, target, beta, red, out);
}

keel_status keel_huber_loss(keel_ctx *ctx, keel_tensor *input, keel_tensor *target, double delta,
                            keel_reduction red, keel_tensor **out) {
  *out = NULL;
  if (!(delta > 0) || isinf(delta))
    return kl_error(ctx, KEEL_ERR_ARG, "huber_loss: delta must be > 0 and finite, got %g", delta);
  return pointwise_loss(ctx, KL_OP_HUBER_LOSS, input, target, delta, red, out);
}

/* Target of the loss with respect to y is minus that with respect to x. */
KL_BACKWARD(kl_ploss_backward) {
  keel_tensor *x = n->saved[0], *y = n->saved[1], *g = NULL, *gx = NULL;
  keel_status st = KEEL_OK;
  TRY(kl_act_dense(ctx, gout, x->dtype, &g));
  TRY(kl_new_like(ctx, x, x->dtype, &gx));
  TRY(backend(ctx, x)->ploss_backward(ctx, n->op, gx, g, x, y, n->fparam[0], (int)n->iparam[0]));
  if (KL_NEEDS(n, 1)) TRY(keel_unary(ctx, KEEL_UN_NEG, gx, &gin[1]));
  if (KL_NEEDS(n, 0)) { gin[0] = gx; gx = NULL; }
done:
  keel_tensor_release(g);
  keel_tensor_release(gx);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Class losses: cross entropy and nll
** ======================================================================= */

/*
** target for the backend of device dev, each value checked (on the host:
** kl_host_values) to be whole and inside [base, base + c) unless it equals
** ignore; q gets the base and ignored value of what *out holds. An int64
** target on a CUDA dev goes as the caller gave it (contiguous: a device
** copy when strided), with the context's base and ignore; otherwise a
** contiguous 0-based copy with -1 for ignored targets, uploaded once
** when dev is CUDA (backward reuses it).
*/
static keel_status class_targets(keel_ctx *ctx, const char *fn, keel_tensor *target, int64_t c, int64_t ignore,
                                 keel_device dev, kl_closs *q, keel_tensor **out) {
  int64_t base = ctx->index_base, n = target->numel;
  double *vals = NULL;
  int64_t *dst;
  keel_status st = KEEL_OK;
  keel_tensor *host = NULL, *conv = NULL, *given = target;
  *out = NULL;
  q->index_base = 0;
  q->ignore_index = -1;
  if ((st = kl_host_values(ctx, target, &host))) return st;
  target = host;
  if ((st = kl_new(ctx, KEEL_I64, KEEL_CPU, target->ndim, target->shape, &conv))) goto done;
  dst = (int64_t *)kl_data(conv);
  if (target->dtype == KEEL_I64) {
    keel_tensor *c2 = NULL;
    if ((st = kl_act_dense(ctx, target, KEEL_I64, &c2))) goto done;
    memcpy(dst, kl_data(c2), sizeof(int64_t) * (size_t)n);
    keel_tensor_release(c2);
  } else {
    vals = (double *)kl_malloc(ctx, sizeof(double) * (size_t)(n ? n : 1));
    if (!vals) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
    if ((st = keel_tensor_read(ctx, target, vals, n))) goto done;
    for (int64_t i = 0; i < n; i++) {
      if (vals[i] != floor(vals[i]) || fabs(vals[i]) > 9e15) {
        st = kl_error(ctx, KEEL_ERR_TYPE, "%s: target %g is not a class index (expected whole numbers)", fn,
                      vals[i]);
        goto done;
      }
      dst[i] = (int64_t)vals[i];
    }
  }
  for (int64_t i = 0; i < n; i++) {
    if (ignore != KEEL_NO_IGNORE && dst[i] == ignore) { dst[i] = -1; continue; }
    if (dst[i] < base || dst[i] >= base + c) {
      st = kl_error(ctx, KEEL_ERR_INDEX, "%s: target %lld out of range for %lld classes (expected %lld..%lld)",
                    fn, (long long)dst[i], (long long)c, (long long)base, (long long)(base + c - 1));
      goto done;
    }
    dst[i] -= base;
  }
  if (dev == KEEL_CPU) {
    *out = conv;
    conv = NULL;
  } else if (given->storage->device == dev && given->dtype == KEEL_I64) {
    if ((st = keel_contiguous(ctx, given, out))) goto done;
    q->index_base = base;
    q->ignore_index = ignore;
  } else {
    st = kl_transfer(ctx, conv, dev, KEEL_I64, out);
  }
done:
  if (vals) kl_free(ctx, vals, sizeof(double) * (size_t)(n ? n : 1));
  keel_tensor_release(host);
  keel_tensor_release(conv);
  if (st) kl_release(out);
  return st;
}

static keel_status class_loss(keel_ctx *ctx, int op, keel_tensor *x, keel_tensor *target, keel_tensor *weight,
                              int64_t ignore, double smoothing, keel_reduction red, keel_tensor **out) {
  const char *fn = kl_ops[op].name;
  const char *what = op == KL_OP_CROSS_ENTROPY ? "logits" : "input";
  int64_t oshape[KEEL_MAX_DIMS];
  int ond = 0;
  kl_closs q;
  keel_tensor *xs = NULL, *ts = NULL, *ws = NULL, *aux = NULL, *o = NULL;
  keel_dtype dt;
  keel_status st;
  char b1[128], b2[128], b3[128];
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, x)) || (st = kl_check_same_ctx(ctx, fn, target))) return st;
  if (weight && (st = kl_check_same_ctx(ctx, fn, weight))) return st;
  if ((st = check_reduction(ctx, fn, red)) || (st = kl_check_float(ctx, fn, x))) return st;
  if ((st = same_device(ctx, fn, x, target)) || (weight && (st = same_device(ctx, fn, x, weight)))) return st;
  if (x->ndim == 0)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %s must have a class dimension, got a 0-dimensional tensor", fn, what);
  memset(&q, 0, sizeof q);
  q.logits = op == KL_OP_CROSS_ENTROPY;
  q.c = x->shape[x->ndim == 1 ? 0 : 1];
  q.n = x->ndim == 1 ? 1 : x->shape[0];
  q.inner = 1;
  for (int i = 2; i < x->ndim; i++) q.inner *= x->shape[i];
  q.reduction = (int)red;
  q.smoothing = smoothing;
  if (q.c == 0) return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %s have 0 classes", fn, what);
  if (!(smoothing >= 0 && smoothing <= 1))
    return kl_error(ctx, KEEL_ERR_ARG, "%s: label_smoothing must be in [0, 1], got %g", fn, smoothing);
  /* the shape without the class dimension: per-sample losses, index targets */
  for (int i = 0; i < x->ndim; i++)
    if (i != (x->ndim == 1 ? 0 : 1)) oshape[ond++] = x->shape[i];
  q.probs = q.logits && target->dtype != KEEL_I64 && same_shape(x, target);
  if (!q.probs && (target->ndim != ond || memcmp(target->shape, oshape, sizeof(int64_t) * (size_t)ond))) {
    if (q.logits)
      return kl_error(ctx, KEEL_ERR_SHAPE,
                      "%s: target has shape %s, expected %s (class indices) or the logits' shape %s (probabilities)",
                      fn, kl_shape_str(b1, sizeof b1, target->ndim, target->shape), kl_shape_str(b2, sizeof b2, ond, oshape),
                      kl_shape_str(b3, sizeof b3, x->ndim, x->shape));
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: target has shape %s, expected %s for input of shape %s", fn,
                    kl_shape_str(b1, sizeof b1, target->ndim, target->shape), kl_shape_str(b2, sizeof b2, ond, oshape),
                    kl_shape_str(b3, sizeof b3, x->ndim, x->shape));
  }
  if (q.probs && ignore != KEEL_NO_IGNORE)
    return kl_error(ctx, KEEL_ERR_ARG, "%s: ignore_index cannot be used with probability targets", fn);
  if (weight) {
    if ((st = kl_check_float(ctx, fn, weight))) return st;
    if (weight->ndim != 1 || weight->shape[0] != q.c)
      return kl_error(ctx, KEEL_ERR_SHAPE, "%s: weight has shape %s, expected [%lld] (one per class)", fn,
                      kl_shape_str(b1, sizeof b1, weight->ndim, weight->shape), (long long)q.c);
    if ((st = check_constant(ctx, fn, "weight", weight))) return st;
  }
  dt = x->dtype;
  if (q.probs) {
    dt = kl_promote(dt, target->dtype);
    TRY(kl_act_dense(ctx, target, dt, &ts));
  } else {
    TRY(class_targets(ctx, fn, target, q.c, ignore, x->storage->device, &q, &ts));
  }
  TRY(kl_act_dense(ctx, x, dt, &xs));
  if (weight) TRY(kl_act_dense(ctx, weight, dt, &ws));
  TRY(kl_new(ctx, KEEL_F64, x->storage->device, 1, &(int64_t){(q.logits ? q.n * q.inner : 0) + 1}, &aux));
  TRY(loss_out(ctx, dt, x, red, ond, oshape, &o));
  TRY(backend(ctx, x)->closs(ctx, &q, o, aux, xs, ts, ws));
  {
    keel_tensor *in[2] = {x, target};
    int nin = q.probs ? 2 : 1;   /* class indices get no gradient */
    if (kl_needs_grad(ctx, nin, in)) {
      kl_node *n = kl_record(ctx, op, nin, in, o);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
      n->iparam[0] = q.n;
      n->iparam[1] = q.c;
      n->iparam[2] = q.inner;
      n->iparam[3] = q.reduction;
      n->iparam[4] = q.probs;
      n->iparam[5] = q.index_base;   /* how ts holds its classes */
      n->iparam[6] = q.ignore_index;
      n->fparam[0] = q.smoothing;
      TRY(kl_save(ctx, n, 0, xs));
      TRY(kl_save(ctx, n, 1, ts));
      if (ws) TRY(kl_save(ctx, n, 2, ws));
      TRY(kl_save(ctx, n, 3, aux));
    }
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(xs);
  keel_tensor_release(ts);
  keel_tensor_release(ws);
  keel_tensor_release(aux);
  keel_tensor_release(o);
  return st;
}

keel_status keel_cross_entropy(keel_ctx *ctx, keel_tensor *logits, keel_tensor *target, keel_tensor *weight,
                               int64_t ignore_index, double label_smoothing, keel_reduction red,
                               keel_tensor **out) {
  return class_loss(ctx, KL_OP_CROSS_ENTROPY, logits, target, weight, ignore_index, label_smoothing, red, out);
}

keel_status keel_nll_loss(keel_ctx *ctx, keel_tensor *log_probs, keel_tensor *target, keel_tensor *weight,
                          int64_t ignore_index, keel_reduction red, keel_tensor **out) {
  return class_loss(ctx, KL_OP_NLL_LOSS, log_probs, target, weight, ignore_index, 0, red, out);
}

KL_BACKWARD(kl_closs_backward) {
  keel_tensor *x = n->saved[0], *t = n->saved[1], *g = NULL, *gx = NULL, *gt = NULL;
  keel_status st = KEEL_OK;
  kl_closs q;
  memset(&q, 0, sizeof q);
  q.n = n->iparam[0];
  q.c = n->iparam[1];
  q.inner = n->iparam[2];
  q.reduction = (int)n->iparam[3];
  q.probs = (int)n->iparam[4];
  q.index_base = n->iparam[5];
  q.ignore_index = n->iparam[6];
  q.logits = n->op == KL_OP_CROSS_ENTROPY;
  q.smoothing = n->fparam[0];
  TRY(kl_act_dense(ctx, gout, x->dtype, &g));
  if (KL_NEEDS(n, 0)) TRY(kl_new_like(ctx, x, x->dtype, &gx));
  if (q.probs && KL_NEEDS(n, 1)) TRY(kl_new_like(ctx, t, t->dtype, &gt));
  TRY(backend(ctx, x)->closs_backward(ctx, &q, gx, gt, g, x, t, n->saved[2], n->saved[3]));
  gin[0] = gx;
  gx = NULL;
  if (q.probs) { gin[1] = gt; gt = NULL; }
done:
  keel_tensor_release(g);
  keel_tensor_release(gx);
  keel_tensor_release(gt);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Binary cross entropy with logits
** ======================================================================= */

/* w broadcast to x's shape, as a contiguous tensor of dtype dt. */
static keel_status broadcast_weight(keel_ctx *ctx, const char *fn, const char *what, keel_tensor *w,
                                    const keel_tensor *x, keel_dtype dt, keel_tensor **out) {
  int nd;
  int64_t shape[KEEL_MAX_DIMS];
  keel_tensor *v = NULL;
  keel_status st;
  char b1[128], b2[128];
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, w)) || (st = kl_check_float(ctx, fn, w))) return st;
  if ((st = same_device(ctx, fn, x, w)) || (st = check_constant(ctx, fn, what, w))) return st;
  if (kl_broadcast_shape(ctx, fn, x->ndim, x->shape, w->ndim, w->shape, &nd, shape) || nd != x->ndim ||
      memcmp(shape, x->shape, sizeof(int64_t) * (size_t)nd))
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %s of shape %s cannot be broadcast to the input's shape %s", fn, what,
                    kl_shape_str(b1, sizeof b1, w->ndim, w->shape), kl_shape_str(b2, sizeof b2, x->ndim, x->shape));
  if ((st = kl_broadcast_to(ctx, w, x->ndim, x->shape, &v))) return st;
  st = kl_act_dense(ctx, v, dt, out);
  keel_tensor_release(v);
  return st;
}

keel_status keel_binary_cross_entropy_with_logits(keel_ctx *ctx, keel_tensor *input, keel_tensor *target,
                                                  keel_tensor *weight, keel_tensor *pos_weight,
                                                  keel_reduction red, keel_tensor **out) {
  const char *fn = "binary_cross_entropy_with_logits";
  keel_tensor *xs = NULL, *ys = NULL, *ws = NULL, *ps = NULL, *o = NULL;
  keel_dtype dt;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, input)) || (st = kl_check_same_ctx(ctx, fn, target))) return st;
  if ((st = check_reduction(ctx, fn, red)) || (st = loss_dtype(ctx, fn, input, target, &dt))) return st;
  if ((st = shapes_match(ctx, fn, input, target)) || (st = same_device(ctx, fn, input, target))) return st;
  if (weight) TRY(broadcast_weight(ctx, fn, "weight", weight, input, dt, &ws));
  if (pos_weight) TRY(broadcast_weight(ctx, fn, "pos_weight", pos_weight, input, dt, &ps));
  TRY(kl_act_dense(ctx, input, dt, &xs));
  TRY(kl_act_dense(ctx, target, dt, &ys));
  TRY(loss_out(ctx, dt, input, red, input->ndim, input->shape, &o));
  TRY(backend(ctx, input)->bce(ctx, o, xs, ys, ws, ps, (int)red));
  {
    keel_tensor *in[2] = {input, target};
    if (kl_needs_grad(ctx, 2, in)) {
      kl_node *n = kl_record(ctx, KL_OP_BCE_WITH_LOGITS, 2, in, o);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
      n->iparam[0] = red;
      TRY(kl_save(ctx, n, 0, xs));
      TRY(kl_save(ctx, n, 1, ys));
      if (ws) TRY(kl_save(ctx, n, 2, ws));
      if (ps) TRY(kl_save(ctx, n, 3, ps));
    }
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(xs);
  keel_tensor_release(ys);
  keel_tensor_release(ws);
  keel_tensor_release(ps);
  keel_tensor_release(o);
  return st;
}

KL_BACKWARD(kl_bce_backward) {
  keel_tensor *x = n->saved[0], *g = NULL, *gx = NULL, *gy = NULL;
  keel_status st = KEEL_OK;
  TRY(kl_act_dense(ctx, gout, x->dtype, &g));
  if (KL_NEEDS(n, 0)) TRY(kl_new_like(ctx, x, x->dtype, &gx));
  if (KL_NEEDS(n, 1)) TRY(kl_new_like(ctx, x, x->dtype, &gy));
  TRY(backend(ctx, x)->bce_backward(ctx, gx, gy, g, x, n->saved[1], n->saved[2], n->saved[3], (int)n->iparam[0]));
  gin[0] = gx;
  gin[1] = gy;
  gx = gy = NULL;
done:
  keel_tensor_release(g);
  keel_tensor_release(gx);
  keel_tensor_release(gy);
  return st;
}

/* }====================================================================== */
