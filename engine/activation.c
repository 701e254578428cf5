/*
** activation.c: pointwise activations (leaky_relu, elu, gelu, silu,
** softplus) and softmax / log_softmax over one dimension, with their
** backward rules. relu, sigmoid and tanh are unary ops (elementwise.c).
**
** Each op gives its kernel a contiguous input (a copy, outside autograd,
** when the input is a strided view) and saves what the backward kernel
** needs: the input for the pointwise activations, the output for softmax
** and log_softmax, whose gradients are cheapest in terms of it.
*/
#include <math.h>
#include "keel_impl.h"

#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

static const kl_backend *backend(keel_ctx *ctx, const keel_tensor *t) {
  return kl_backend_for(ctx, t->storage->device);
}

keel_status kl_act_dense(keel_ctx *ctx, keel_tensor *a, keel_dtype dt, keel_tensor **out) {
  keel_status st;
  *out = NULL;
  if (a->dtype == dt && kl_is_contiguous(a)) {
    *out = keel_tensor_retain(a);
    return KEEL_OK;
  }
  if ((st = kl_new_like(ctx, a, dt, out))) return st;
  if ((st = backend(ctx, a)->copy(ctx, *out, a))) kl_release(out);
  return st;
}

/* {======================================================================
** Pointwise activations
** ======================================================================= */

/* p[0..1]: the op's parameters, kept in the node for backward. */
static keel_status activation(keel_ctx *ctx, int op, keel_tensor *a, double p0, double p1, keel_tensor **out) {
  const char *fn = kl_ops[op].name;
  keel_tensor *x = NULL, *o = NULL;
  keel_status st;
  double p[2] = {p0, p1};
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, a)) || (st = kl_check_float(ctx, fn, a))) return st;
  TRY(kl_act_dense(ctx, a, a->dtype, &x));
  TRY(kl_new_like(ctx, a, a->dtype, &o));
  TRY(backend(ctx, a)->act(ctx, op, o, x, p));
  if (kl_needs_grad(ctx, 1, &a)) {
    kl_node *n = kl_record(ctx, op, 1, &a, o);
    if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
    n->fparam[0] = p0;
    n->fparam[1] = p1;
    TRY(kl_save(ctx, n, 0, x));
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(x);
  keel_tensor_release(o);
  return st;
}

keel_status keel_leaky_relu(keel_ctx *ctx, keel_tensor *a, double negative_slope, keel_tensor **out) {
  return activation(ctx, KL_OP_LEAKY_RELU, a, negative_slope, 0, out);
}

keel_status keel_elu(keel_ctx *ctx, keel_tensor *a, double alpha, keel_tensor **out) {
  return activation(ctx, KL_OP_ELU, a, alpha, 0, out);
}

keel_status keel_gelu(keel_ctx *ctx, keel_tensor *a, int tanh_approx, keel_tensor **out) {
  return activation(ctx, KL_OP_GELU, a, tanh_approx ? 1 : 0, 0, out);
}

keel_status keel_silu(keel_ctx *ctx, keel_tensor *a, keel_tensor **out) {
  return activation(ctx, KL_OP_SILU, a, 0, 0, out);
}

keel_status keel_softplus(keel_ctx *ctx, keel_tensor *a, double beta, double threshold, keel_tensor **out) {
  *out = NULL;
  if (!(beta != 0) || !isfinite(beta))
    return kl_error(ctx, KEEL_ERR_ARG, "softplus: beta must be a nonzero finite number, got %g", beta);
  if (isnan(threshold)) return kl_error(ctx, KEEL_ERR_ARG, "softplus: threshold is NaN");
  return activation(ctx, KL_OP_SOFTPLUS, a, beta, threshold, out);
}

KL_BACKWARD(kl_act_backward) {
  keel_tensor *x = n->saved[0], *g = NULL;
  keel_status st = KEEL_OK;
  if (!KL_NEEDS(n, 0)) return KEEL_OK;
  TRY(kl_act_dense(ctx, gout, x->dtype, &g));
  TRY(kl_new_like(ctx, x, x->dtype, &gin[0]));
  if ((st = backend(ctx, x)->act_backward(ctx, n->op, gin[0], g, x, n->fparam))) kl_release(&gin[0]);
done:
  keel_tensor_release(g);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Softmax and log-softmax. A 0-d input counts as one element along
** dimension 0 (or -1), as in PyTorch.
** ======================================================================= */

static keel_status softmax_op(keel_ctx *ctx, int log_out, keel_tensor *a, int dim, keel_tensor **out) {
  const char *fn = log_out ? "log_softmax" : "softmax";
  int op = log_out ? KL_OP_LOG_SOFTMAX : KL_OP_SOFTMAX, d;
  keel_tensor *x = NULL, *o = NULL;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, a)) || (st = kl_check_float(ctx, fn, a))) return st;
  if ((st = kl_check_dim(ctx, fn, dim, a->ndim ? a->ndim : 1, &d))) return st;
  TRY(kl_act_dense(ctx, a, a->dtype, &x));
  TRY(kl_new_like(ctx, a, a->dtype, &o));
  TRY(backend(ctx, a)->softmax(ctx, log_out, o, x, d));
  if (kl_needs_grad(ctx, 1, &a)) {
    kl_node *n = kl_record(ctx, op, 1, &a, o);
    if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
    n->iparam[0] = d;
    TRY(kl_save(ctx, n, 0, o));
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(x);
  keel_tensor_release(o);
  return st;
}

keel_status keel_softmax(keel_ctx *ctx, keel_tensor *a, int dim, keel_tensor **out) {
  return softmax_op(ctx, 0, a, dim, out);
}

keel_status keel_log_softmax(keel_ctx *ctx, keel_tensor *a, int dim, keel_tensor **out) {
  return softmax_op(ctx, 1, a, dim, out);
}

KL_BACKWARD(kl_softmax_backward) {
  keel_tensor *y = n->saved[0], *g = NULL;
  keel_status st = KEEL_OK;
  if (!KL_NEEDS(n, 0)) return KEEL_OK;
  TRY(kl_act_dense(ctx, gout, y->dtype, &g));
  TRY(kl_new_like(ctx, y, y->dtype, &gin[0]));
  if ((st = backend(ctx, y)->softmax_backward(ctx, n->op == KL_OP_LOG_SOFTMAX, gin[0], g, y, (int)n->iparam[0])))
    kl_release(&gin[0]);
done:
  keel_tensor_release(g);
  return st;
}

/* }====================================================================== */
