/*
** shape.c: views. Each returns a new handle on the same storage with a
** new geometry, recorded on the tape so gradients flow back through it.
*/
#include <string.h>
#include "keel_impl.h"

/* Alias of a with the given geometry, recorded as op when a needs grad. */
static keel_status make_view(keel_ctx *ctx, keel_tensor *a, int op, int ndim, const int64_t *shape,
                             const int64_t *stride, int64_t offset, keel_tensor **out, kl_node **node) {
  keel_status st = kl_alias(ctx, a, ndim, shape, stride, offset, out);
  if (node) *node = NULL;
  if (st) return st;
  if (kl_needs_grad(ctx, 1, &a)) {
    kl_node *n = kl_record(ctx, op, 1, &a, *out);
    if (!n) {
      kl_release(out);
      return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", kl_ops[op].name);
    }
    if (node) *node = n;
  }
  return KEEL_OK;
}

/* Resolves one -1 and checks the element count. */
static keel_status infer_shape(keel_ctx *ctx, const char *fn, const keel_tensor *a, int ndim,
                               const int64_t *in, int64_t *shape) {
  int infer = -1;
  int64_t known = 1;
  char b1[128], b2[128];
  if (ndim < 0 || ndim > KEEL_MAX_DIMS)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %d dimensions given, at most %d supported", fn, ndim, KEEL_MAX_DIMS);
  for (int i = 0; i < ndim; i++) {
    shape[i] = in[i];
    if (in[i] == -1) {
      if (infer >= 0) return kl_error(ctx, KEEL_ERR_SHAPE, "%s: only one dimension can be -1", fn);
      infer = i;
    } else if (in[i] < 0) {
      return kl_error(ctx, KEEL_ERR_SHAPE, "%s: invalid size %lld", fn, (long long)in[i]);
    } else {
      known *= in[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || a->numel % known)
      return kl_error(ctx, KEEL_ERR_SHAPE, "%s: shape %s is invalid for %lld elements", fn,
                      kl_shape_str(b1, sizeof b1, ndim, in), (long long)a->numel);
    shape[infer] = a->numel / known;
    known *= shape[infer];
  }
  if (known != a->numel)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: shape %s is invalid for a tensor of shape %s (%lld elements)",
                    fn, kl_shape_str(b1, sizeof b1, ndim, in), kl_shape_str(b2, sizeof b2, a->ndim, a->shape),
                    (long long)a->numel);
  return KEEL_OK;
}

/*
** Strides that give the new shape over a's memory without copying, when
** they exist: a's dims are split into runs that are contiguous with each
** other, and each run must map onto whole dims of the new shape.
*/
static int view_strides(const keel_tensor *a, int ndim, const int64_t *shape, int64_t *stride) {
  int64_t oshape[KEEL_MAX_DIMS], ostride[KEEL_MAX_DIMS];
  int ond = a->ndim, vd = ndim - 1;
  int64_t base, tnum = 1, vnum = 1;
  if (a->numel == 0 || ond == 0) {
    kl_contiguous_strides(ndim, shape, stride);
    return 1;
  }
  memcpy(oshape, a->shape, sizeof oshape);
  memcpy(ostride, a->stride, sizeof ostride);
  base = ostride[ond - 1];
  for (int td = ond - 1; td >= 0; td--) {
    tnum *= oshape[td];
    if (td == 0 || (oshape[td - 1] != 1 && ostride[td - 1] != tnum * base)) {
      while (vd >= 0 && (vnum < tnum || shape[vd] == 1)) {
        stride[vd] = vnum * base;
        vnum *= shape[vd];
        vd--;
      }
      if (vnum != tnum) return 0;
      if (td > 0) {
        base = ostride[td - 1];
        tnum = 1;
        vnum = 1;
      }
    }
  }
  return vd == -1;
}

keel_status keel_view(keel_ctx *ctx, keel_tensor *a, int ndim, const int64_t *shape_in,
                      keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS], stride[KEEL_MAX_DIMS];
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "view", a))) return st;
  if ((st = infer_shape(ctx, "view", a, ndim, shape_in, shape))) return st;
  if (!view_strides(a, ndim, shape, stride)) {
    char b1[128], b2[128];
    return kl_error(ctx, KEEL_ERR_SHAPE,
                    "view: shape %s is not compatible with the strides of this %s tensor; "
                    "use reshape (which copies) or contiguous() first",
                    kl_shape_str(b1, sizeof b1, ndim, shape), kl_shape_str(b2, sizeof b2, a->ndim, a->shape));
  }
  return make_view(ctx, a, KL_OP_VIEW, ndim, shape, stride, a->offset, out, NULL);
}

keel_status keel_reshape(keel_ctx *ctx, keel_tensor *a, int ndim, const int64_t *shape_in,
                         keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS], stride[KEEL_MAX_DIMS];
  keel_tensor *c;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "reshape", a))) return st;
  if ((st = infer_shape(ctx, "reshape", a, ndim, shape_in, shape))) return st;
  if (view_strides(a, ndim, shape, stride))
    return make_view(ctx, a, KL_OP_VIEW, ndim, shape, stride, a->offset, out, NULL);
  if ((st = keel_contiguous(ctx, a, &c))) return st;
  st = keel_view(ctx, c, ndim, shape, out);
  keel_tensor_release(c);
  return st;
}

keel_status keel_permute(keel_ctx *ctx, keel_tensor *a, const int *perm, keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS], stride[KEEL_MAX_DIMS];
  int seen[KEEL_MAX_DIMS] = {0}, p[KEEL_MAX_DIMS];
  kl_node *n;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "permute", a))) return st;
  for (int i = 0; i < a->ndim; i++) {
    if ((st = kl_check_dim(ctx, "permute", perm[i], a->ndim, &p[i]))) return st;
    if (seen[p[i]]++)
      return kl_error(ctx, KEEL_ERR_ARG, "permute: dimension %d appears twice", p[i] + ctx->index_base);
    shape[i] = a->shape[p[i]];
    stride[i] = a->stride[p[i]];
  }
  if ((st = make_view(ctx, a, KL_OP_PERMUTE, a->ndim, shape, stride, a->offset, out, &n))) return st;
  if (n) for (int i = 0; i < a->ndim; i++) n->iparam[i] = p[i];
  return KEEL_OK;
}

keel_status keel_transpose(keel_ctx *ctx, keel_tensor *a, int d0, int d1, keel_tensor **out) {
  int perm[KEEL_MAX_DIMS], x, y;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "transpose", a))) return st;
  if ((st = kl_check_dim(ctx, "transpose", d0, a->ndim, &x)) ||
      (st = kl_check_dim(ctx, "transpose", d1, a->ndim, &y)))
    return st;
  for (int i = 0; i < a->ndim; i++) perm[i] = i;
  perm[x] = y;
  perm[y] = x;
  return keel_permute(ctx, a, perm, out);
}

keel_status keel_narrow(keel_ctx *ctx, keel_tensor *a, int dim, int64_t start, int64_t length,
                        keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS];
  int d;
  kl_node *n;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "narrow", a))) return st;
  if ((st = kl_check_dim(ctx, "narrow", dim, a->ndim, &d))) return st;
  if (start < 0 || length < 0 || start > a->shape[d] || length > a->shape[d] - start)
    return kl_error(ctx, KEEL_ERR_INDEX,
                    "narrow: start %lld and length %lld exceed dimension %d of size %lld",
                    (long long)(start + ctx->index_base), (long long)length, d + ctx->index_base,
                    (long long)a->shape[d]);
  memcpy(shape, a->shape, sizeof shape);
  shape[d] = length;
  if ((st = make_view(ctx, a, KL_OP_NARROW, a->ndim, shape, a->stride,
                      a->offset + start * a->stride[d], out, &n)))
    return st;
  if (n) { n->iparam[0] = d; n->iparam[1] = start; }
  return KEEL_OK;
}

keel_status keel_select(keel_ctx *ctx, keel_tensor *a, int dim, int64_t i, keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS], stride[KEEL_MAX_DIMS];
  int d, k = 0;
  kl_node *n;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "select", a))) return st;
  if ((st = kl_check_dim(ctx, "select", dim, a->ndim, &d))) return st;
  if (i < 0 || i >= a->shape[d])
    return kl_error(ctx, KEEL_ERR_INDEX, "select: index %lld out of range for dimension %d of size %lld",
                    (long long)(i + ctx->index_base), d + ctx->index_base, (long long)a->shape[d]);
  for (int j = 0; j < a->ndim; j++) {
    if (j == d) continue;
    shape[k] = a->shape[j];
    stride[k] = a->stride[j];
    k++;
  }
  if ((st = make_view(ctx, a, KL_OP_SELECT, k, shape, stride, a->offset + i * a->stride[d], out, &n)))
    return st;
  if (n) { n->iparam[0] = d; n->iparam[1] = i; }
  return KEEL_OK;
}

keel_status keel_squeeze(keel_ctx *ctx, keel_tensor *a, int dim, keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS], stride[KEEL_MAX_DIMS];
  int d = -1, k = 0;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "squeeze", a))) return st;
  if (dim != KEEL_DIM_NONE) {
    if ((st = kl_check_dim(ctx, "squeeze", dim, a->ndim, &d))) return st;
  }
  for (int j = 0; j < a->ndim; j++) {
    if (a->shape[j] == 1 && (d < 0 || j == d)) continue;
    shape[k] = a->shape[j];
    stride[k] = a->stride[j];
    k++;
  }
  return make_view(ctx, a, KL_OP_VIEW, k, shape, stride, a->offset, out, NULL);
}

keel_status keel_unsqueeze(keel_ctx *ctx, keel_tensor *a, int dim, keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS], stride[KEEL_MAX_DIMS];
  int d, k = 0;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "unsqueeze", a))) return st;
  if (a->ndim >= KEEL_MAX_DIMS)
    return kl_error(ctx, KEEL_ERR_SHAPE, "unsqueeze: tensor already has %d dimensions", KEEL_MAX_DIMS);
  if ((st = kl_check_dim(ctx, "unsqueeze", dim, a->ndim + 1, &d))) return st;
  for (int j = 0; j <= a->ndim; j++) {
    if (j == d) {
      shape[j] = 1;
      stride[j] = j < a->ndim ? a->stride[k] * a->shape[k] : 1;
      continue;
    }
    shape[j] = a->shape[k];
    stride[j] = a->stride[k];
    k++;
  }
  return make_view(ctx, a, KL_OP_VIEW, a->ndim + 1, shape, stride, a->offset, out, NULL);
}

keel_status keel_expand(keel_ctx *ctx, keel_tensor *a, int ndim, const int64_t *shape_in,
                        keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS], stride[KEEL_MAX_DIMS];
  int lead = ndim - a->ndim;
  char b1[128], b2[128];
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "expand", a))) return st;
  if (ndim > KEEL_MAX_DIMS || lead < 0)
    return kl_error(ctx, KEEL_ERR_SHAPE, "expand: cannot expand a %d-dimensional tensor to %d dimensions",
                    a->ndim, ndim);
  for (int i = 0; i < ndim; i++) {
    int64_t want = shape_in[i];
    if (i < lead) {
      if (want < 0) return kl_error(ctx, KEEL_ERR_SHAPE, "expand: -1 is not allowed for a new leading dimension");
      shape[i] = want;
      stride[i] = 0;
      continue;
    }
    {
      int64_t have = a->shape[i - lead];
      if (want == -1) want = have;
      if (want != have && have != 1)
        return kl_error(ctx, KEEL_ERR_SHAPE,
                        "expand: cannot expand shape %s to %s (size %lld at dimension %d is not 1)",
                        kl_shape_str(b1, sizeof b1, a->ndim, a->shape), kl_shape_str(b2, sizeof b2, ndim, shape_in),
                        (long long)have, i + ctx->index_base);
      if (want < 0) return kl_error(ctx, KEEL_ERR_SHAPE, "expand: invalid size %lld", (long long)want);
      shape[i] = want;
      stride[i] = want == have ? a->stride[i - lead] : 0;
    }
  }
  return make_view(ctx, a, KL_OP_EXPAND, ndim, shape, stride, a->offset, out, NULL);
}

/* {======================================================================
** Backward rules
** ======================================================================= */

KL_BACKWARD(kl_view_backward) {
  kl_edge *e = &n->in[0];
  return keel_reshape(ctx, gout, e->ndim, e->shape, &gin[0]);
}

KL_BACKWARD(kl_permute_backward) {
  int inv[KEEL_MAX_DIMS];
  for (int i = 0; i < n->in[0].ndim; i++) inv[n->iparam[i]] = i;
  return keel_permute(ctx, gout, inv, &gin[0]);
}

/* Zeros of the input's shape with gout written into the slice the view
** took (narrow or select). */
static keel_status embed(keel_ctx *ctx, kl_node *n, keel_tensor *gout, keel_tensor **gin, int select) {
  kl_edge *e = &n->in[0];
  keel_tensor *z, *slot;
  keel_status st = kl_full(ctx, gout->dtype, gout->storage->device, e->ndim, e->shape, 0.0, &z);
  if (st) return st;
  st = select ? keel_select(ctx, z, (int)n->iparam[0], n->iparam[1], &slot)
              : keel_narrow(ctx, z, (int)n->iparam[0], n->iparam[1], gout->shape[n->iparam[0]], &slot);
  if (!st) {
    st = kl_backend_for(ctx, z->storage->device)->copy(ctx, slot, gout);
    keel_tensor_release(slot);
  }
  if (st) { keel_tensor_release(z); return st; }
  gin[0] = z;
  return KEEL_OK;
}

KL_BACKWARD(kl_narrow_backward) { return embed(ctx, n, gout, gin, 0); }
KL_BACKWARD(kl_select_backward) { return embed(ctx, n, gout, gin, 1); }

/* The tape sums the gradient over the expanded dimensions. */
KL_BACKWARD(kl_expand_backward) { (void)ctx; (void)n; gin[0] = keel_tensor_retain(gout); return KEEL_OK; }

/* }====================================================================== */
