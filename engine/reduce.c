/*
** reduce.c: sum, mean, prod, max/min (values, indices, amax), argmax,
** var/std (composed from the others), p-norms, and their backward rules.
**
** Kernels always produce the keepdim shape; without keepdim the result is
** a view of it with the reduced dimensions dropped. A node keeps the
** reduced-dimension mask in iparam so backward can restore that shape.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "keel_impl.h"

#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

static const char *red_name[KEEL_REDOP_COUNT] = {"sum", "mean", "max", "min", "prod"};

/* Fills mask from dims (all when ndims == 0) and the keepdim shape. */
static keel_status reduce_dims(keel_ctx *ctx, const char *fn, const keel_tensor *a, int ndims,
                               const int *dims, int *mask, int64_t *kshape, int64_t *count) {
  memset(mask, 0, sizeof(int) * KEEL_MAX_DIMS);
  if (ndims < 0 || ndims > KEEL_MAX_DIMS) return kl_error(ctx, KEEL_ERR_ARG, "%s: bad number of dimensions", fn);
  if (ndims == 0 || !dims) {
    for (int i = 0; i < a->ndim; i++) mask[i] = 1;
  } else {
    for (int i = 0; i < ndims; i++) {
      int d;
      keel_status st = kl_check_dim(ctx, fn, dims[i], a->ndim, &d);
      if (st) return st;
      if (mask[d]) return kl_error(ctx, KEEL_ERR_ARG, "%s: dimension %d given twice", fn, d + ctx->index_base);
      mask[d] = 1;
    }
  }
  *count = 1;
  for (int i = 0; i < a->ndim; i++) {
    kshape[i] = mask[i] ? 1 : a->shape[i];
    if (mask[i]) *count *= a->shape[i];
  }
  return KEEL_OK;
}

/* Drops the reduced dims of a keepdim-shaped result (a view). */
static keel_status squeeze_mask(keel_ctx *ctx, keel_tensor *k, const int *mask, keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS], stride[KEEL_MAX_DIMS];
  int nd = 0;
  for (int i = 0; i < k->ndim; i++) {
    if (mask[i]) continue;
    shape[nd] = k->shape[i];
    stride[nd] = k->stride[i];
    nd++;
  }
  return kl_alias(ctx, k, nd, shape, stride, k->offset, out);
}

/* Shapes the keepdim result, records it as op and saves what backward needs. */
static keel_status finish(keel_ctx *ctx, keel_tensor *a, keel_tensor *k, const int *mask, int keepdim,
                          int op, double scale, keel_tensor *saved_extra, keel_tensor **out) {
  keel_tensor *o = k;
  keel_status st = KEEL_OK;
  if (!keepdim) {
    if ((st = squeeze_mask(ctx, k, mask, &o))) return st;
  } else {
    keel_tensor_retain(o);
  }
  if (op >= 0 && kl_needs_grad(ctx, 1, &a)) {
    kl_node *n = kl_record(ctx, op, 1, &a, o);
    if (!n) { keel_tensor_release(o); return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", kl_ops[op].name); }
    for (int i = 0; i < a->ndim; i++) n->iparam[i] = mask[i];
    n->fparam[0] = scale;
    if (op == KL_OP_PROD || op == KL_OP_AMAX || op == KL_OP_NORM) st = kl_save(ctx, n, 0, a);
    if (!st && (op == KL_OP_AMAX || op == KL_OP_NORM)) st = kl_save(ctx, n, 1, k);
    if (!st && op == KL_OP_MAX_DIM) st = kl_save(ctx, n, 2, saved_extra);
    if (st) { keel_tensor_release(o); return st; }
  }
  *out = o;
  return KEEL_OK;
}

keel_status keel_reduce(keel_ctx *ctx, keel_redop op, keel_tensor *a, int ndims, const int *dims,
                        int keepdim, keel_tensor **out, keel_tensor **indices) {
  const char *fn = (unsigned)op < KEEL_REDOP_COUNT ? red_name[op] : "reduce";
  int mask[KEEL_MAX_DIMS], nred = 0, node_op;
  int64_t kshape[KEEL_MAX_DIMS], count;
  keel_tensor *k = NULL, *idx = NULL;
  keel_dtype odt;
  keel_status st;
  *out = NULL;
  if (indices) *indices = NULL;
  if ((unsigned)op >= KEEL_REDOP_COUNT) return kl_error(ctx, KEEL_ERR_ARG, "reduce: unknown op %d", (int)op);
  if ((st = kl_check_same_ctx(ctx, fn, a))) return st;
  if ((st = reduce_dims(ctx, fn, a, ndims, dims, mask, kshape, &count))) return st;
  for (int i = 0; i < a->ndim; i++) nred += mask[i];
  if (op == KEEL_RED_MEAN && (st = kl_check_float(ctx, fn, a))) return st;
  if ((op == KEEL_RED_MAX || op == KEEL_RED_MIN) && count == 0)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: cannot reduce over an empty dimension", fn);
  if (indices && (op == KEEL_RED_MAX || op == KEEL_RED_MIN) && nred != 1 && a->ndim > 0)
    return kl_error(ctx, KEEL_ERR_ARG, "%s: indices need exactly one reduced dimension", fn);
  odt = a->dtype;
  if ((st = kl_new(ctx, odt, a->storage->device, a->ndim, kshape, &k))) return st;
  if (indices && (op == KEEL_RED_MAX || op == KEEL_RED_MIN) &&
      (st = kl_new(ctx, KEEL_I64, a->storage->device, a->ndim, kshape, &idx)))
    goto done;
  if ((st = kl_backend_for(ctx, a->storage->device)->reduce(ctx, op, k, idx, a, mask))) goto done;
  switch (op) {
    case KEEL_RED_SUM: node_op = KL_OP_SUM; break;
    case KEEL_RED_MEAN: node_op = KL_OP_SUM; break;
    case KEEL_RED_PROD: node_op = KL_OP_PROD; break;
    default: node_op = idx ? KL_OP_MAX_DIM : KL_OP_AMAX; break;
  }
  if (a->dtype == KEEL_I64) node_op = -1;
  if ((st = finish(ctx, a, k, mask, keepdim, node_op, op == KEEL_RED_MEAN ? 1.0 / (double)count : 1.0, idx, out)))
    goto done;
  if (idx) {
    if (keepdim) *indices = keel_tensor_retain(idx);
    else if ((st = squeeze_mask(ctx, idx, mask, indices))) { kl_release(out); goto done; }
  }
done:
  keel_tensor_release(k);
  keel_tensor_release(idx);
  return st;
}

static keel_status arg_extreme(keel_ctx *ctx, const char *fn, keel_redop op, keel_tensor *a, int dim,
                               int keepdim, keel_tensor **out) {
  keel_tensor *flat = NULL, *vals = NULL;
  keel_status st;
  int old = keel_set_grad_enabled(ctx, 0);
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, a))) goto done;
  if (a->numel == 0) { st = kl_error(ctx, KEEL_ERR_SHAPE, "%s: cannot take it of an empty tensor", fn); goto done; }
  if (dim == KEEL_DIM_NONE) {
    int64_t n = a->numel;
    int zero = 0;
    TRY(keel_reshape(ctx, a, 1, &n, &flat));
    TRY(keel_reduce(ctx, op, flat, 1, &zero, 0, &vals, out));
  } else if (a->ndim == 0) {
    int d;
    TRY(kl_check_dim(ctx, fn, dim, 1, &d));
    TRY(kl_new(ctx, KEEL_I64, a->storage->device, 0, NULL, out));
    TRY(kl_backend_for(ctx, a->storage->device)->fill(ctx, *out, (double)ctx->index_base));
  } else {
    TRY(keel_reduce(ctx, op, a, 1, &dim, keepdim, &vals, out));
  }
done:
  keel_set_grad_enabled(ctx, old);
  keel_tensor_release(flat);
  keel_tensor_release(vals);
  return st;
}

keel_status keel_argmax(keel_ctx *ctx, keel_tensor *a, int dim, int keepdim, keel_tensor **out) {
  return arg_extreme(ctx, "argmax", KEEL_RED_MAX, a, dim, keepdim, out);
}
keel_status keel_argmin(keel_ctx *ctx, keel_tensor *a, int dim, int keepdim, keel_tensor **out) {
  return arg_extreme(ctx, "argmin", KEEL_RED_MIN, a, dim, keepdim, out);
}

/* Composed from mean, sub, mul and sum, so its gradient comes for free. */
keel_status keel_var(keel_ctx *ctx, keel_tensor *a, int ndims, const int *dims, int correction,
                     int keepdim, keel_tensor **out) {
  int mask[KEEL_MAX_DIMS];
  int64_t kshape[KEEL_MAX_DIMS], count;
  keel_tensor *m = NULL, *d = NULL, *sq = NULL, *s = NULL;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "var", a)) || (st = kl_check_float(ctx, "var", a))) return st;
  if ((st = reduce_dims(ctx, "var", a, ndims, dims, mask, kshape, &count))) return st;
  if (correction < 0) return kl_error(ctx, KEEL_ERR_ARG, "var: correction must be >= 0, got %d", correction);
  TRY(keel_reduce(ctx, KEEL_RED_MEAN, a, ndims, dims, 1, &m, NULL));
  TRY(keel_sub(ctx, a, m, &d));
  TRY(keel_mul(ctx, d, d, &sq));
  TRY(keel_reduce(ctx, KEEL_RED_SUM, sq, ndims, dims, keepdim, &s, NULL));
  /* count - correction <= 0 gives inf or nan, as torch */
  TRY(keel_binary_scalar(ctx, KEEL_BIN_DIV, s, (double)(count - correction), 0, out));
done:
  keel_tensor_release(m);
  keel_tensor_release(d);
  keel_tensor_release(sq);
  keel_tensor_release(s);
  return st;
}

keel_status keel_std(keel_ctx *ctx, keel_tensor *a, int ndims, const int *dims, int correction,
                     int keepdim, keel_tensor **out) {
  keel_tensor *v;
  keel_status st = keel_var(ctx, a, ndims, dims, correction, keepdim, &v);
  *out = NULL;
  if (st) return st;
  st = keel_unary(ctx, KEEL_UN_SQRT, v, out);
  keel_tensor_release(v);
  return st;
}

keel_status keel_norm(keel_ctx *ctx, keel_tensor *a, double p, int ndims, const int *dims, int keepdim,
                      keel_tensor **out) {
  int mask[KEEL_MAX_DIMS];
  int64_t kshape[KEEL_MAX_DIMS], count;
  keel_tensor *k = NULL;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "norm", a)) || (st = kl_check_float(ctx, "norm", a))) return st;
  if (!(p > 0)) return kl_error(ctx, KEEL_ERR_ARG, "norm: p must be > 0 (or inf), got %g", p);
  if ((st = reduce_dims(ctx, "norm", a, ndims, dims, mask, kshape, &count))) return st;
  if ((st = kl_new(ctx, a->dtype, a->storage->device, a->ndim, kshape, &k))) return st;
  if (!(st = kl_backend_for(ctx, a->storage->device)->norm(ctx, k, a, mask, p))) {
    st = finish(ctx, a, k, mask, keepdim, KL_OP_NORM, p, NULL, out);
  }
  keel_tensor_release(k);
  return st;
}

keel_status kl_sum_to_shape(keel_ctx *ctx, keel_tensor *g, int ndim, const int64_t *shape,
                            keel_tensor **out) {
  int dims[KEEL_MAX_DIMS], nd = 0, lead = g->ndim - ndim;
  keel_tensor *s;
  keel_status st;
  char b1[128], b2[128];
  *out = NULL;
  if (lead < 0)
    return kl_error(ctx, KEEL_ERR_SHAPE, "backward: gradient of shape %s cannot be reduced to %s",
                    kl_shape_str(b1, sizeof b1, g->ndim, g->shape), kl_shape_str(b2, sizeof b2, ndim, shape));
  for (int i = 0; i < g->ndim; i++) {
    if (i < lead || (shape[i - lead] == 1 && g->shape[i] != 1)) dims[nd++] = i;
    else if (shape[i - lead] != g->shape[i])
      return kl_error(ctx, KEEL_ERR_SHAPE, "backward: gradient of shape %s does not match input shape %s",
                      kl_shape_str(b1, sizeof b1, g->ndim, g->shape), kl_shape_str(b2, sizeof b2, ndim, shape));
  }
  if (nd == 0) return keel_reshape(ctx, g, ndim, shape, out);
  if ((st = keel_reduce(ctx, KEEL_RED_SUM, g, nd, dims, 1, &s, NULL))) return st;
  st = keel_reshape(ctx, s, ndim, shape, out);
  keel_tensor_release(s);
  return st;
}

/* {======================================================================
** Backward rules
** ======================================================================= */

/* gout (reduced shape) viewed in the keepdim shape, then expanded. */
static keel_status expand_back(keel_ctx *ctx, kl_node *n, keel_tensor *gout, keel_tensor **out) {
  kl_edge *e = &n->in[0];
  int64_t kshape[KEEL_MAX_DIMS];
  keel_tensor *k;
  keel_status st;
  for (int i = 0; i < e->ndim; i++) kshape[i] = n->iparam[i] ? 1 : e->shape[i];
  if ((st = keel_reshape(ctx, gout, e->ndim, kshape, &k))) return st;
  st = keel_expand(ctx, k, e->ndim, e->shape, out);
  keel_tensor_release(k);
  return st;
}

KL_BACKWARD(kl_sum_backward) {
  keel_tensor *x = NULL;
  keel_status st = expand_back(ctx, n, gout, &x);
  if (st) return st;
  if (n->fparam[0] == 1.0) { gin[0] = x; return KEEL_OK; }
  st = keel_binary_scalar(ctx, KEEL_BIN_MUL, x, n->fparam[0], 0, &gin[0]);
  keel_tensor_release(x);
  return st;
}

/*
** d prod / d a_i = product of the other elements. Computed exactly (no
** division, so zeros are handled) with prefix and suffix products over
** each reduced slice, laid out as rows by permuting the reduced dims last.
*/
KL_BACKWARD(kl_prod_backward) {
  keel_tensor *a = n->saved[0];
  int perm[KEEL_MAX_DIMS], inv[KEEL_MAX_DIMS], np = 0;
  int64_t rows = 1, len = 1;
  keel_tensor *pa = NULL, *ca = NULL, *other = NULL, *back = NULL, *g = NULL;
  double *buf = NULL;
  keel_status st = KEEL_OK;
  for (int i = 0; i < a->ndim; i++) if (!n->iparam[i]) { perm[np++] = i; rows *= a->shape[i]; }
  for (int i = 0; i < a->ndim; i++) if (n->iparam[i]) { perm[np++] = i; len *= a->shape[i]; }
  for (int i = 0; i < a->ndim; i++) inv[perm[i]] = i;
  TRY(keel_permute(ctx, a, perm, &pa));
  TRY(keel_to_dtype(ctx, pa, KEEL_F64, &ca));
  TRY(keel_contiguous(ctx, ca, &other));
  kl_release(&ca);
  if (other->storage->device != KEEL_CPU) {
    /* the scans below run on the host: a device slice comes over once */
    keel_tensor *h = NULL;
    TRY(keel_to_device(ctx, other, KEEL_CPU, 0, &h));
    keel_tensor_release(other);
    other = h;
  }
  TRY(keel_clone(ctx, other, &ca));  /* exclusive products, written below */
  buf = (double *)malloc(sizeof(double) * (size_t)(len > 0 ? len : 1));
  if (!buf) { st = kl_error(ctx, KEEL_ERR_NOMEM, "prod: out of memory"); goto done; }
  {
    const double *src = (const double *)kl_data(other);
    double *dst = (double *)kl_data(ca);
    for (int64_t r = 0; r < rows; r++) {
      const double *x = src + r * len;
      double *y = dst + r * len, acc = 1.0;
      for (int64_t i = 0; i < len; i++) { buf[i] = acc; acc *= x[i]; }
      acc = 1.0;
      for (int64_t i = len - 1; i >= 0; i--) { y[i] = buf[i] * acc; acc *= x[i]; }
    }
  }
  TRY(keel_permute(ctx, ca, inv, &back));            /* back to a's layout */
  if (a->storage->device != KEEL_CPU) {
    keel_tensor *d = NULL;
    TRY(keel_to_device(ctx, back, a->storage->device, 0, &d));
    keel_tensor_release(back);
    back = d;
  }
  TRY(expand_back(ctx, n, gout, &g));
  TRY(keel_mul(ctx, g, back, &gin[0]));
done:
  free(buf);
  keel_tensor_release(pa);
  keel_tensor_release(ca);
  keel_tensor_release(other);
  keel_tensor_release(back);
  keel_tensor_release(g);
  return st;
}

/* Even split among the positions equal to the extreme (torch.amax). */
KL_BACKWARD(kl_amax_backward) {
  keel_tensor *eq = NULL, *cnt = NULL, *g = NULL, *t = NULL;
  int dims[KEEL_MAX_DIMS], nd = 0;
  keel_status st = KEEL_OK;
  for (int i = 0; i < n->in[0].ndim; i++) if (n->iparam[i]) dims[nd++] = i;
  TRY(keel_binary(ctx, KEEL_BIN_EQ, n->saved[0], n->saved[1], &eq));
  TRY(keel_reduce(ctx, KEEL_RED_SUM, eq, nd, dims, 1, &cnt, NULL));
  TRY(expand_back(ctx, n, gout, &g));
  TRY(keel_div(ctx, g, cnt, &t));
  TRY(keel_mul(ctx, t, eq, &gin[0]));
done:
  keel_tensor_release(eq);
  keel_tensor_release(cnt);
  keel_tensor_release(g);
  keel_tensor_release(t);
  return st;
}

/* All of the gradient to the recorded position (torch.max(dim)). */
KL_BACKWARD(kl_max_dim_backward) {
  kl_edge *e = &n->in[0];
  int dim = 0;
  int64_t kshape[KEEL_MAX_DIMS];
  keel_tensor *z = NULL, *k = NULL;
  keel_status st = KEEL_OK;
  for (int i = 0; i < e->ndim; i++) {
    kshape[i] = n->iparam[i] ? 1 : e->shape[i];
    if (n->iparam[i]) dim = i;
  }
  TRY(kl_full(ctx, gout->dtype, gout->storage->device, e->ndim, e->shape, 0.0, &z));
  TRY(keel_reshape(ctx, gout, e->ndim, kshape, &k));
  TRY(keel_scatter_add(ctx, z, dim, n->saved[2], k, &gin[0]));
done:
  keel_tensor_release(z);
  keel_tensor_release(k);
  return st;
}

KL_BACKWARD(kl_norm_backward) {
  double p = n->fparam[0];
  keel_tensor *a = n->saved[0], *nk = n->saved[1];
  keel_tensor *g = NULL, *t1 = NULL, *t2 = NULL, *t3 = NULL, *zero = NULL, *mask = NULL, *cnt = NULL;
  int dims[KEEL_MAX_DIMS], nd = 0;
  keel_status st = KEEL_OK;
  for (int i = 0; i < n->in[0].ndim; i++) if (n->iparam[i]) dims[nd++] = i;
  TRY(expand_back(ctx, n, gout, &g));
  TRY(kl_full(ctx, gout->dtype, gout->storage->device, 0, NULL, 0.0, &zero));
  if (isinf(p)) {          /* like amax over |a|, with the sign of a */
    TRY(keel_unary(ctx, KEEL_UN_ABS, a, &t1));
    TRY(keel_binary(ctx, KEEL_BIN_EQ, t1, nk, &mask));
    TRY(keel_reduce(ctx, KEEL_RED_SUM, mask, nd, dims, 1, &cnt, NULL));
    kl_release(&t1);
    TRY(keel_unary(ctx, KEEL_UN_SIGN, a, &t1));
    TRY(keel_mul(ctx, t1, mask, &t2));
    TRY(keel_div(ctx, t2, cnt, &t3));
    TRY(keel_mul(ctx, g, t3, &gin[0]));
  } else if (p == 1) {
    TRY(keel_unary(ctx, KEEL_UN_SIGN, a, &t1));
    TRY(keel_mul(ctx, g, t1, &gin[0]));
  } else {
    /* g sign(a) |a|^(p-1) / norm^(p-1); 0 where the norm is 0 */
    if (p == 2) {
      TRY(keel_div(ctx, a, nk, &t1));
    } else {
      TRY(keel_unary(ctx, KEEL_UN_ABS, a, &t2));
      TRY(keel_binary_scalar(ctx, KEEL_BIN_POW, t2, p - 1, 0, &t3));
      kl_release(&t2);
      TRY(keel_unary(ctx, KEEL_UN_SIGN, a, &t2));
      TRY(keel_mul(ctx, t3, t2, &t1));
      kl_release(&t2);
      kl_release(&t3);
      TRY(keel_binary_scalar(ctx, KEEL_BIN_POW, nk, p - 1, 0, &t2));
      TRY(keel_div(ctx, t1, t2, &t3));
      kl_release(&t1);
      t1 = t3;
      t3 = NULL;
      kl_release(&t2);
    }
    TRY(keel_mul(ctx, g, t1, &t2));
    TRY(keel_binary_scalar(ctx, KEEL_BIN_EQ, nk, 0.0, 0, &mask));
    TRY(keel_where(ctx, mask, zero, t2, &gin[0]));
  }
done:
  keel_tensor_release(g);
  keel_tensor_release(t1);
  keel_tensor_release(t2);
  keel_tensor_release(t3);
  keel_tensor_release(zero);
  keel_tensor_release(mask);
  keel_tensor_release(cnt);
  return st;
}

/* }====================================================================== */
