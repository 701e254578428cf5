/*
** norm.c: batch, layer and group normalisation, dropout and embedding,
** with their backward rules.
**
** The three normalisations share one shape and one pair of kernels: the
** input is seen as x [N, C, L] (L = the product of the trailing dims), the
** affine parameters are per channel C, and the statistics are taken either
** per channel over N and L (batch norm, "groups" 0) or per (n, group of
** C/groups channels) over those channels and L (group norm; layer norm is
** group norm with one group over [M, K, 1]). Their backward is one fused
** kernel, not a chain of engine ops.
*/
#include <math.h>
#include <string.h>
#include "keel_impl.h"

#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

static const kl_backend *backend(keel_ctx *ctx, const keel_tensor *t) {
  return kl_backend_for(ctx, t->storage->device);
}

/* t's values as a contiguous tensor of dtype dt, outside the graph: t
** itself (retained) when it already is one. */
static keel_status dense(keel_ctx *ctx, keel_tensor *t, keel_dtype dt, keel_tensor **out) {
  keel_status st;
  if (t->dtype == dt && kl_is_contiguous(t)) {
    *out = keel_tensor_retain(t);
    return KEEL_OK;
  }
  if ((st = kl_new(ctx, dt, t->storage->device, t->ndim, t->shape, out))) return st;
  if ((st = backend(ctx, t)->copy(ctx, *out, t))) kl_release(out);
  return st;
}

/* A fresh contiguous copy (never t itself): saved statistics must not
** alias a buffer that a later step changes in place. */
static keel_status fresh(keel_ctx *ctx, keel_tensor *t, keel_dtype dt, keel_tensor **out) {
  keel_status st;
  if ((st = kl_new(ctx, dt, t->storage->device, t->ndim, t->shape, out))) return st;
  if ((st = backend(ctx, t)->copy(ctx, *out, t))) kl_release(out);
  return st;
}

/* A contiguous tensor seen with another shape of the same size. */
static keel_status reshaped(keel_ctx *ctx, const keel_tensor *t, int ndim, const int64_t *shape,
                            keel_tensor **out) {
  int64_t stride[KEEL_MAX_DIMS];
  kl_contiguous_strides(ndim, shape, stride);
  return kl_alias(ctx, t, ndim, shape, stride, t->offset, out);
}

/* An optional per-channel tensor (weight, bias, running stats): float,
** on x's device, with exactly count elements. */
static keel_status check_param(keel_ctx *ctx, const char *fn, const char *what, const keel_tensor *x,
                               const keel_tensor *p, int64_t count) {
  keel_status st;
  char b1[128];
  if (!p) return KEEL_OK;
  if ((st = kl_check_same_ctx(ctx, fn, p))) return st;
  if (p->dtype != KEEL_F32 && p->dtype != KEEL_F64)
    return kl_error(ctx, KEEL_ERR_TYPE, "%s: %s must be a float32 or float64 tensor, got %s", fn, what,
                    keel_dtype_name(p->dtype));
  if (p->storage->device != x->storage->device)
    return kl_error(ctx, KEEL_ERR_DEVICE, "%s: %s is on %s, the input on %s; expected one device", fn, what,
                    keel_device_name(p->storage->device), keel_device_name(x->storage->device));
  if (p->numel != count)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %s has shape %s (%lld elements), expected %lld elements", fn, what,
                    kl_shape_str(b1, sizeof b1, p->ndim, p->shape), (long long)p->numel, (long long)count);
  return KEEL_OK;
}

/* {======================================================================
** Normalisation core
** ======================================================================= */

typedef struct norm_spec {
  int op;               /* KL_OP_BATCH_NORM, KL_OP_LAYER_NORM, KL_OP_GROUP_NORM */
  int64_t N, C, L;      /* x seen as [N, C, L] */
  int64_t groups;       /* 0: per-channel statistics (batch norm) */
  int batch_stats;      /* statistics come from x (else mean/rstd are given) */
} norm_spec;

/*
** Normalises x with weight/bias (either may be NULL; numel C) and records
** the op. Statistics come from x when spec->batch_stats, else mean and rstd
** (given, [C]) are used. var (optional, [S]) receives the biased variance.
** mean/rstd, when computed here, are returned through *mean_out.
*/
static keel_status norm_core(keel_ctx *ctx, const norm_spec *spec, keel_tensor *x, keel_tensor *weight,
                             keel_tensor *bias, double eps, keel_tensor *given_mean, keel_tensor *given_rstd,
                             keel_tensor *var, keel_tensor **mean_out, keel_tensor **out) {
  const char *fn = kl_ops[spec->op].name;
  int64_t s3[3] = {spec->N, spec->C, spec->L}, sc = spec->C;
  int64_t S = spec->groups ? spec->N * spec->groups : spec->C;
  keel_tensor *xd = NULL, *x3 = NULL, *wd = NULL, *w1 = NULL, *bd = NULL, *b1 = NULL;
  keel_tensor *y = NULL, *y3 = NULL, *mean = NULL, *rstd = NULL;
  keel_status st = KEEL_OK;
  *out = NULL;
  if (mean_out) *mean_out = NULL;
  TRY(dense(ctx, x, x->dtype, &xd));
  TRY(reshaped(ctx, xd, 3, s3, &x3));
  if (weight) {
    TRY(dense(ctx, weight, x->dtype, &wd));
    TRY(reshaped(ctx, wd, 1, &sc, &w1));
  }
  if (bias) {
    TRY(dense(ctx, bias, x->dtype, &bd));
    TRY(reshaped(ctx, bd, 1, &sc, &b1));
  }
  TRY(kl_new(ctx, x->dtype, x->storage->device, x->ndim, x->shape, &y));
  TRY(reshaped(ctx, y, 3, s3, &y3));
  if (spec->batch_stats) {
    TRY(kl_new(ctx, x->dtype, x->storage->device, 1, &S, &mean));
    TRY(kl_new(ctx, x->dtype, x->storage->device, 1, &S, &rstd));
    TRY(backend(ctx, x)->norm_stats(ctx, mean, rstd, var, x3, spec->groups, eps));
  } else {
    mean = keel_tensor_retain(given_mean);
    rstd = keel_tensor_retain(given_rstd);
  }
  TRY(backend(ctx, x)->norm_forward(ctx, y3, x3, mean, rstd, w1, b1, spec->groups));
  {
    keel_tensor *in[3] = {x, weight, bias};
    if (kl_needs_grad(ctx, 3, in)) {
      kl_node *n = kl_record(ctx, spec->op, 3, in, y);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
      n->iparam[0] = spec->groups;
      n->iparam[1] = spec->batch_stats;
      n->iparam[2] = spec->N;
      n->iparam[3] = spec->C;
      n->iparam[4] = spec->L;
      TRY(kl_save(ctx, n, 0, x3));
      if (w1) TRY(kl_save(ctx, n, 1, w1));
      TRY(kl_save(ctx, n, 2, mean));
      TRY(kl_save(ctx, n, 3, rstd));
    }
  }
  *out = y;
  y = NULL;
  if (mean_out) { *mean_out = mean; mean = NULL; }
done:
  keel_tensor_release(xd);
  keel_tensor_release(x3);
  keel_tensor_release(wd);
  keel_tensor_release(w1);
  keel_tensor_release(bd);
  keel_tensor_release(b1);
  keel_tensor_release(y);
  keel_tensor_release(y3);
  keel_tensor_release(mean);
  keel_tensor_release(rstd);
  return st;
}

/* One backward for the three normalisations: grads of x, weight, bias. */
static keel_status norm_backward(keel_ctx *ctx, kl_node *n, keel_tensor *gout, keel_tensor **gin) {
  keel_tensor *x3 = n->saved[0], *w1 = n->saved[1], *mean = n->saved[2], *rstd = n->saved[3];
  int64_t s3[3] = {n->iparam[2], n->iparam[3], n->iparam[4]}, C = n->iparam[3];
  keel_tensor *g = NULL, *g3 = NULL, *gx = NULL, *gx3 = NULL, *gw = NULL, *gw1 = NULL, *gb = NULL, *gb1 = NULL;
  keel_status st = KEEL_OK;
  TRY(dense(ctx, gout, x3->dtype, &g));
  TRY(reshaped(ctx, g, 3, s3, &g3));
  if (KL_NEEDS(n, 0)) {
    TRY(kl_new(ctx, x3->dtype, x3->storage->device, n->in[0].ndim, n->in[0].shape, &gx));
    TRY(reshaped(ctx, gx, 3, s3, &gx3));
  }
  /* weight and bias grads take their input's shape (layer norm: the
  ** normalized shape), seen as [C] by the kernel */
  if (n->n_in > 1 && KL_NEEDS(n, 1)) {
    TRY(kl_new(ctx, x3->dtype, x3->storage->device, n->in[1].ndim, n->in[1].shape, &gw));
    TRY(reshaped(ctx, gw, 1, &C, &gw1));
  }
  if (n->n_in > 2 && KL_NEEDS(n, 2)) {
    TRY(kl_new(ctx, x3->dtype, x3->storage->device, n->in[2].ndim, n->in[2].shape, &gb));
    TRY(reshaped(ctx, gb, 1, &C, &gb1));
  }
  TRY(backend(ctx, x3)->norm_backward(ctx, gx3, gw1, gb1, g3, x3, mean, rstd, w1, n->iparam[0],
                                      (int)n->iparam[1]));
  gin[0] = gx;
  if (n->n_in > 1) gin[1] = gw;
  if (n->n_in > 2) gin[2] = gb;
  gx = gw = gb = NULL;
done:
  keel_tensor_release(g);
  keel_tensor_release(g3);
  keel_tensor_release(gx);
  keel_tensor_release(gx3);
  keel_tensor_release(gw);
  keel_tensor_release(gw1);
  keel_tensor_release(gb);
  keel_tensor_release(gb1);
  return st;
}

KL_BACKWARD(kl_batch_norm_backward) { return norm_backward(ctx, n, gout, gin); }
KL_BACKWARD(kl_layer_norm_backward) { return norm_backward(ctx, n, gout, gin); }
KL_BACKWARD(kl_group_norm_backward) { return norm_backward(ctx, n, gout, gin); }

static keel_status check_input(keel_ctx *ctx, const char *fn, const keel_tensor *x, int min_ndim) {
  keel_status st;
  if ((st = kl_check_same_ctx(ctx, fn, x)) || (st = kl_check_float(ctx, fn, x))) return st;
  if (x->ndim < min_ndim)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: expected an input of at least %d dimensions%s, got %d", fn,
                    min_ndim, min_ndim == 2 ? " [N, C, ...]" : "", x->ndim);
  return KEEL_OK;
}

static keel_status check_eps(keel_ctx *ctx, const char *fn, double eps) {
  if (!(eps >= 0) || isinf(eps)) return kl_error(ctx, KEEL_ERR_ARG, "%s: eps must be finite and >= 0, got %g", fn, eps);
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Batch norm
** ======================================================================= */

/* r = (1 - m) r + m s, written into the buffer r through the backend:
** buffers are not on the tape, and the write bumps their version. */
static keel_status update_running(keel_ctx *ctx, keel_tensor *r, keel_tensor *s, double m) {
  keel_tensor *a = NULL, *b = NULL, *c = NULL;
  keel_status st = KEEL_OK;
  TRY(keel_binary_scalar(ctx, KEEL_BIN_MUL, r, 1.0 - m, 0, &a));
  TRY(keel_binary_scalar(ctx, KEEL_BIN_MUL, s, m, 0, &b));
  TRY(keel_add(ctx, a, b, &c));
  TRY(backend(ctx, r)->copy(ctx, r, c));
  r->storage->version++;
done:
  keel_tensor_release(a);
  keel_tensor_release(b);
  keel_tensor_release(c);
  return st;
}

keel_status keel_batch_norm(keel_ctx *ctx, keel_tensor *x, keel_tensor *weight, keel_tensor *bias,
                            keel_tensor *running_mean, keel_tensor *running_var, int training,
                            double momentum, double eps, keel_tensor **out) {
  const char *fn = "batch_norm";
  norm_spec spec = {KL_OP_BATCH_NORM, 0, 0, 1, 0, training != 0};
  keel_tensor *mean = NULL, *rstd = NULL, *var = NULL, *t = NULL, *u = NULL;
  int old_mode = keel_is_grad_enabled(ctx);
  keel_status st;
  char b1[128];
  *out = NULL;
  if ((st = check_input(ctx, fn, x, 2))) return st;
  spec.N = x->shape[0];
  spec.C = x->shape[1];
  for (int i = 2; i < x->ndim; i++) spec.L *= x->shape[i];
  if ((st = check_param(ctx, fn, "weight", x, weight, spec.C)) || (st = check_param(ctx, fn, "bias", x, bias, spec.C)) ||
      (st = check_param(ctx, fn, "running_mean", x, running_mean, spec.C)) ||
      (st = check_param(ctx, fn, "running_var", x, running_var, spec.C)) || (st = check_eps(ctx, fn, eps)))
    return st;
  if ((running_mean == NULL) != (running_var == NULL))
    return kl_error(ctx, KEEL_ERR_ARG, "%s: running_mean and running_var must be given together", fn);
  if (!training && !running_mean)
    return kl_error(ctx, KEEL_ERR_ARG, "%s: running_mean and running_var are required when not training", fn);
  if ((running_mean && (running_mean->requires_grad || running_mean->grad_fn)) ||
      (running_var && (running_var->requires_grad || running_var->grad_fn)))
    return kl_error(ctx, KEEL_ERR_ARG, "%s: running_mean and running_var must not require grad (they are buffers)", fn);
  if (training && running_mean && !(momentum >= 0 && momentum <= 1))
    return kl_error(ctx, KEEL_ERR_ARG, "%s: momentum must be in [0, 1], got %g", fn, momentum);
  if (training && spec.N * spec.L <= 1)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: expected more than 1 value per channel when training, got input of shape %s",
                    fn, kl_shape_str(b1, sizeof b1, x->ndim, x->shape));
  if (!training) {
    /* statistics from the buffers, copied: they may change in place later */
    keel_set_grad_enabled(ctx, 0);
    st = fresh(ctx, running_mean, x->dtype, &mean);
    if (!st) st = fresh(ctx, running_var, x->dtype, &t);
    if (!st) st = keel_binary_scalar(ctx, KEEL_BIN_ADD, t, eps, 0, &u);
    if (!st) { kl_release(&t); st = keel_unary(ctx, KEEL_UN_SQRT, u, &t); }
    if (!st) st = keel_binary_scalar(ctx, KEEL_BIN_DIV, t, 1.0, 1, &rstd);
    keel_set_grad_enabled(ctx, old_mode);
    if (st) goto done;
  } else if (running_mean) {
    TRY(kl_new(ctx, x->dtype, x->storage->device, 1, &spec.C, &var));
  }
  TRY(norm_core(ctx, &spec, x, weight, bias, eps, mean, rstd, var, training ? &mean : NULL, out));
  if (training && running_mean) {
    double count = (double)(spec.N * spec.L);
    keel_set_grad_enabled(ctx, 0);
    st = update_running(ctx, running_mean, mean, momentum);
    kl_release(&t);
    if (!st) st = keel_binary_scalar(ctx, KEEL_BIN_MUL, var, count / (count - 1), 0, &t);  /* unbiased */
    if (!st) st = update_running(ctx, running_var, t, momentum);
    keel_set_grad_enabled(ctx, old_mode);
    if (st) kl_release(out);
  }
done:
  keel_tensor_release(mean);
  keel_tensor_release(rstd);
  keel_tensor_release(var);
  keel_tensor_release(t);
  keel_tensor_release(u);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Layer norm and group norm
** ======================================================================= */

keel_status keel_layer_norm(keel_ctx *ctx, keel_tensor *x, int normalized_ndim, keel_tensor *weight,
                            keel_tensor *bias, double eps, keel_tensor **out) {
  const char *fn = "layer_norm";
  norm_spec spec = {KL_OP_LAYER_NORM, 1, 1, 1, 1, 1};
  int lead;
  keel_status st;
  char b1[128], b2[128];
  *out = NULL;
  if ((st = check_input(ctx, fn, x, 1))) return st;
  if (normalized_ndim < 1 || normalized_ndim > x->ndim)
    return kl_error(ctx, KEEL_ERR_ARG, "%s: the normalized shape must have 1 to %d dimensions for an input of shape %s, got %d",
                    fn, x->ndim, kl_shape_str(b1, sizeof b1, x->ndim, x->shape), normalized_ndim);
  lead = x->ndim - normalized_ndim;
  for (int i = 0; i < lead; i++) spec.N *= x->shape[i];
  for (int i = lead; i < x->ndim; i++) spec.C *= x->shape[i];
  /* weight and bias have exactly the normalized shape */
  for (int k = 0; k < 2; k++) {
    keel_tensor *p = k ? bias : weight;
    if (!p) continue;
    if ((st = check_param(ctx, fn, k ? "bias" : "weight", x, p, spec.C))) return st;
    if (p->ndim != normalized_ndim || memcmp(p->shape, x->shape + lead, sizeof(int64_t) * (size_t)normalized_ndim))
      return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %s has shape %s, expected the normalized shape %s", fn, k ? "bias" : "weight",
                      kl_shape_str(b1, sizeof b1, p->ndim, p->shape),
                      kl_shape_str(b2, sizeof b2, normalized_ndim, x->shape + lead));
  }
  if ((st = check_eps(ctx, fn, eps))) return st;
  return norm_core(ctx, &spec, x, weight, bias, eps, NULL, NULL, NULL, NULL, out);
}

keel_status keel_group_norm(keel_ctx *ctx, keel_tensor *x, int64_t groups, keel_tensor *weight,
                            keel_tensor *bias, double eps, keel_tensor **out) {
  const char *fn = "group_norm";
  norm_spec spec = {KL_OP_GROUP_NORM, 0, 0, 1, 0, 1};
  keel_status st;
  *out = NULL;
  if ((st = check_input(ctx, fn, x, 2))) return st;
  spec.N = x->shape[0];
  spec.C = x->shape[1];
  for (int i = 2; i < x->ndim; i++) spec.L *= x->shape[i];
  if (groups < 1) return kl_error(ctx, KEEL_ERR_ARG, "%s: number of groups must be >= 1, got %lld", fn, (long long)groups);
  if (spec.C % groups)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %lld channels cannot be split into %lld groups (not divisible)", fn,
                    (long long)spec.C, (long long)groups);
  spec.groups = groups;
  if ((st = check_param(ctx, fn, "weight", x, weight, spec.C)) || (st = check_param(ctx, fn, "bias", x, bias, spec.C)) ||
      (st = check_eps(ctx, fn, eps)))
    return st;
  return norm_core(ctx, &spec, x, weight, bias, eps, NULL, NULL, NULL, NULL, out);
}

/* }====================================================================== */

/* {======================================================================
** Dropout
** ======================================================================= */

keel_status keel_dropout(keel_ctx *ctx, keel_tensor *x, double p, int training, keel_tensor **out) {
  const char *fn = "dropout";
  keel_tensor *mask = NULL, *y = NULL;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, x)) || (st = kl_check_float(ctx, fn, x))) return st;
  if (!(p >= 0 && p <= 1)) return kl_error(ctx, KEEL_ERR_ARG, "%s: probability must be in [0, 1], got %g", fn, p);
  if (!training || p == 0) {  /* identity, as torch: the input itself */
    *out = keel_tensor_retain(x);
    return KEEL_OK;
  }
  /* the mask holds 0 or 1/(1-p): forward and backward are one multiply */
  TRY(kl_new(ctx, x->dtype, x->storage->device, x->ndim, x->shape, &mask));
  TRY(backend(ctx, x)->dropout_mask(ctx, mask, p));
  TRY(kl_new(ctx, x->dtype, x->storage->device, x->ndim, x->shape, &y));
  TRY(backend(ctx, x)->binary(ctx, KEEL_BIN_MUL, y, x, mask));
  if (kl_needs_grad(ctx, 1, &x)) {
    kl_node *n = kl_record(ctx, KL_OP_DROPOUT, 1, &x, y);
    if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
    TRY(kl_save(ctx, n, 0, mask));
  }
  *out = y;
  y = NULL;
done:
  keel_tensor_release(mask);
  keel_tensor_release(y);
  return st;
}

KL_BACKWARD(kl_dropout_backward) {
  return keel_mul(ctx, gout, n->saved[0], &gin[0]);
}

/* }====================================================================== */

/* {======================================================================
** Embedding
** ======================================================================= */

/*
** indices checked against [base, base + V) and handed over, for the
** backend of device dev, as contiguous int64 values counted from *obase.
** Float indices with whole values are accepted (Lua numbers make them).
** The values are checked on the host (kl_host_values: no download while an
** uploaded tensor keeps its host copy). The kernels subtract the base, so
** int64 indices already on the CUDA device go as they are (a contiguous
** device copy when strided): nothing is uploaded. Others become a 0-based
** host copy, uploaded once when dev is CUDA; backward reuses what forward
** handed over.
*/
static keel_status embedding_indices(keel_ctx *ctx, const char *fn, keel_tensor *indices, int64_t V,
                                     keel_device dev, keel_tensor **out, int64_t *obase) {
  int64_t base = ctx->index_base, *dst;
  keel_tensor *c = NULL, *f = NULL, *host = NULL, *given = indices;
  keel_status st;
  *out = NULL;
  *obase = 0;
  if ((st = kl_host_values(ctx, indices, &host))) return st;
  indices = host;
  TRY(kl_new(ctx, KEEL_I64, KEEL_CPU, indices->ndim, indices->shape, &c));
  dst = (int64_t *)kl_data(c);
  if (indices->dtype == KEEL_I64) {
    TRY(backend(ctx, indices)->copy(ctx, c, indices));
  } else {
    const double *v;
    TRY(dense(ctx, indices, KEEL_F64, &f));
    v = (const double *)kl_data(f);
    for (int64_t i = 0; i < c->numel; i++) {
      if (v[i] != floor(v[i]) || fabs(v[i]) > 9e15) {
        st = kl_error(ctx, KEEL_ERR_TYPE, "%s: index values must be whole numbers, got %g", fn, v[i]);
        goto done;
      }
      dst[i] = (int64_t)v[i];
    }
  }
  for (int64_t i = 0; i < c->numel; i++) {
    if (dst[i] < base || dst[i] >= base + V) {
      st = kl_error(ctx, KEEL_ERR_INDEX, "%s: index %lld out of range (expected %lld..%lld for %lld embeddings)", fn,
                    (long long)dst[i], (long long)base, (long long)(base + V - 1), (long long)V);
      goto done;
    }
    dst[i] -= base;
  }
  if (dev == KEEL_CPU) {
    *out = c;
    c = NULL;
  } else if (given->storage->device == dev && given->dtype == KEEL_I64) {
    TRY(keel_contiguous(ctx, given, out));
    *obase = base;
  } else {
    TRY(kl_transfer(ctx, c, dev, KEEL_I64, out));
  }
done:
  keel_tensor_release(c);
  keel_tensor_release(f);
  keel_tensor_release(host);
  return st;
}

keel_status keel_embedding(keel_ctx *ctx, keel_tensor *weight, keel_tensor *indices, int64_t padding_idx,
                           keel_tensor **out) {
  const char *fn = "embedding";
  int64_t V, D, pad = -1, base, shape[KEEL_MAX_DIMS], s2[2];
  keel_tensor *idx = NULL, *wd = NULL, *y = NULL, *y2 = NULL;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, weight)) || (st = kl_check_float(ctx, fn, weight))) return st;
  if (weight->ndim != 2)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: weight must be 2-D [num_embeddings, embedding_dim], got %d dimensions", fn,
                    weight->ndim);
  V = weight->shape[0];
  D = weight->shape[1];
  if (padding_idx != KEEL_NO_PADDING) {
    pad = padding_idx < 0 ? V + padding_idx : padding_idx - ctx->index_base;
    if (pad < 0 || pad >= V)
      return kl_error(ctx, KEEL_ERR_INDEX, "%s: padding_idx %lld out of range (expected %lld..%lld, or -%lld..-1 from the end)",
                      fn, (long long)padding_idx, (long long)ctx->index_base, (long long)(ctx->index_base + V - 1),
                      (long long)V);
  }
  if ((st = kl_check_same_ctx(ctx, fn, indices))) return st;
  if (indices->ndim + 1 > KEEL_MAX_DIMS)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: indices have %d dimensions, at most %d allowed", fn, indices->ndim,
                    KEEL_MAX_DIMS - 1);
  if ((st = embedding_indices(ctx, fn, indices, V, weight->storage->device, &idx, &base))) return st;
  memcpy(shape, indices->shape, sizeof(int64_t) * (size_t)indices->ndim);
  shape[indices->ndim] = D;
  s2[0] = idx->numel;
  s2[1] = D;
  TRY(dense(ctx, weight, weight->dtype, &wd));
  TRY(kl_new(ctx, weight->dtype, weight->storage->device, indices->ndim + 1, shape, &y));
  TRY(reshaped(ctx, y, 2, s2, &y2));
  TRY(backend(ctx, weight)->embedding(ctx, y2, wd, idx, base));
  if (kl_needs_grad(ctx, 1, &weight)) {
    kl_node *n = kl_record(ctx, KL_OP_EMBEDDING, 1, &weight, y);
    if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
    n->iparam[0] = pad;
    n->iparam[1] = base;   /* idx's values count from it */
    TRY(kl_save(ctx, n, 0, idx));
  }
  *out = y;
  y = NULL;
done:
  keel_tensor_release(idx);
  keel_tensor_release(wd);
  keel_tensor_release(y);
  keel_tensor_release(y2);
  return st;
}

/* Rows of the weight gradient receive the output gradients at their
** indices, summed over repeats; the padding row receives nothing. */
KL_BACKWARD(kl_embedding_backward) {
  keel_tensor *idx = n->saved[0], *g = NULL, *g2 = NULL, *gw = NULL;
  int64_t s2[2] = {idx->numel, n->in[0].shape[1]};
  keel_status st = KEEL_OK;
  TRY(dense(ctx, gout, gout->dtype, &g));
  TRY(reshaped(ctx, g, 2, s2, &g2));
  TRY(kl_full(ctx, gout->dtype, gout->storage->device, 2, n->in[0].shape, 0.0, &gw));
  TRY(backend(ctx, g)->embedding_backward(ctx, gw, g2, idx, n->iparam[1], n->iparam[0]));
  gin[0] = gw;
  gw = NULL;
done:
  keel_tensor_release(g);
  keel_tensor_release(g2);
  keel_tensor_release(gw);
  return st;
}

/* }====================================================================== */
