/*
** linalg.c: matmul (torch.matmul semantics), cat/stack, and the index ops
** gather, scatter_add and index_select, with their backward rules.
*/
#include <math.h>
#include <string.h>
#include "keel_impl.h"

#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

static const kl_backend *backend(keel_ctx *ctx, const keel_tensor *t) {
  return kl_backend_for(ctx, t->storage->device);
}

/* {======================================================================
** matmul
** ======================================================================= */

/*
** t has shape [*batch, R, C]; returns a 3-D alias [prod(batch), R, C] whose
** batch stride is one number (0 when broadcast), copying when the batch
** dims cannot be folded into one stride.
*/
static keel_status fold_batch(keel_ctx *ctx, keel_tensor *t, keel_tensor **out) {
  int nb = t->ndim - 2;
  int64_t B = 1, bstride = 0, shape[3], stride[3], span = 1;
  int ok = 1, first = 1, zero = 0;
  for (int i = 0; i < nb; i++) B *= t->shape[i];
  /* the non-1 batch dims must all be broadcast (stride 0) or form one
  ** chain where each outer dim steps over the inner ones */
  for (int i = nb - 1; i >= 0 && ok; i--) {
    if (t->shape[i] == 1) continue;
    if (first) {
      bstride = t->stride[i];
      zero = bstride == 0;
      first = 0;
    } else if (zero ? t->stride[i] != 0 : t->stride[i] != bstride * span) {
      ok = 0;
    }
    span *= t->shape[i];
  }
  if (!ok) {
    keel_tensor *c;
    keel_status st = kl_new_like(ctx, t, t->dtype, &c);
    if (st) return st;
    if ((st = backend(ctx, t)->copy(ctx, c, t))) { keel_tensor_release(c); return st; }
    st = fold_batch(ctx, c, out);
    keel_tensor_release(c);
    return st;
  }
  shape[0] = B;
  shape[1] = t->shape[nb];
  shape[2] = t->shape[nb + 1];
  stride[0] = bstride;
  stride[1] = t->stride[nb];
  stride[2] = t->stride[nb + 1];
  return kl_alias(ctx, t, 3, shape, stride, t->offset, out);
}

/* Both operands have at least 2 dims and one float dtype. */
static keel_status mm_core(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, const keel_tensor *oa,
                           const keel_tensor *ob, keel_tensor **out) {
  int nba = a->ndim - 2, nbb = b->ndim - 2, nb;
  int64_t bshape[KEEL_MAX_DIMS], eshape[KEEL_MAX_DIMS], oshape[KEEL_MAX_DIMS];
  int64_t M = a->shape[a->ndim - 2], K = a->shape[a->ndim - 1], N = b->shape[b->ndim - 1];
  keel_tensor *ea = NULL, *eb = NULL, *a3 = NULL, *b3 = NULL, *o = NULL, *o3 = NULL;
  keel_status st;
  char b1[128], b2[128];
  *out = NULL;
  if (b->shape[b->ndim - 2] != K)
    return kl_error(ctx, KEEL_ERR_SHAPE, "matmul: shapes %s and %s do not align (%lld ~= %lld)",
                    kl_shape_str(b1, sizeof b1, oa->ndim, oa->shape), kl_shape_str(b2, sizeof b2, ob->ndim, ob->shape),
                    (long long)K, (long long)b->shape[b->ndim - 2]);
  if (M > 0x7fffffff || N > 0x7fffffff || K > 0x7fffffff)
    return kl_error(ctx, KEEL_ERR_SHAPE, "matmul: matrix dimensions above 2^31 are not supported");
  if ((st = kl_broadcast_shape(ctx, "matmul", nba, a->shape, nbb, b->shape, &nb, bshape))) return st;
  /* expanded (non-recorded) views of the operands, then 3-D folds */
  memcpy(eshape, bshape, sizeof(int64_t) * (size_t)nb);
  eshape[nb] = M; eshape[nb + 1] = K;
  TRY(kl_broadcast_to(ctx, a, nb + 2, eshape, &ea));
  eshape[nb] = K; eshape[nb + 1] = N;
  TRY(kl_broadcast_to(ctx, b, nb + 2, eshape, &eb));
  TRY(fold_batch(ctx, ea, &a3));
  TRY(fold_batch(ctx, eb, &b3));
  memcpy(oshape, bshape, sizeof(int64_t) * (size_t)nb);
  oshape[nb] = M; oshape[nb + 1] = N;
  TRY(kl_new(ctx, a->dtype, a->storage->device, nb + 2, oshape, &o));
  {
    int64_t s3[3] = {a3->shape[0], M, N}, st3[3] = {M * N, N, 1};
    TRY(kl_alias(ctx, o, 3, s3, st3, 0, &o3));
  }
  TRY(backend(ctx, a)->matmul(ctx, o3, a3, b3));
  {
    keel_tensor *in[2] = {a, b};
    if (kl_needs_grad(ctx, 2, in)) {
      kl_node *n = kl_record(ctx, KL_OP_MATMUL, 2, in, o);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "matmul: out of memory"); goto done; }
      if (KL_NEEDS(n, 1)) TRY(kl_save(ctx, n, 0, a));
      if (KL_NEEDS(n, 0)) TRY(kl_save(ctx, n, 1, b));
    }
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(ea);
  keel_tensor_release(eb);
  keel_tensor_release(a3);
  keel_tensor_release(b3);
  keel_tensor_release(o3);
  keel_tensor_release(o);
  return st;
}

keel_status keel_matmul(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, keel_tensor **out) {
  keel_tensor *ca = NULL, *cb = NULL, *a2 = NULL, *b2 = NULL, *r = NULL;
  keel_dtype dt;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "matmul", a)) || (st = kl_check_same_ctx(ctx, "matmul", b))) return st;
  if ((st = kl_check_device(ctx, "matmul", a, b))) return st;
  if (a->ndim == 0 || b->ndim == 0)
    return kl_error(ctx, KEEL_ERR_SHAPE, "matmul: both arguments need at least one dimension (got %dd and %dd)",
                    a->ndim, b->ndim);
  if ((st = kl_check_float(ctx, "matmul", a)) || (st = kl_check_float(ctx, "matmul", b))) return st;
  dt = kl_promote(a->dtype, b->dtype);
  TRY(keel_to_dtype(ctx, a, dt, &ca));
  TRY(keel_to_dtype(ctx, b, dt, &cb));
  if (ca->ndim == 1) TRY(keel_unsqueeze(ctx, ca, 0, &a2));
  else a2 = keel_tensor_retain(ca);
  if (cb->ndim == 1) TRY(keel_unsqueeze(ctx, cb, 1, &b2));
  else b2 = keel_tensor_retain(cb);
  TRY(mm_core(ctx, a2, b2, a, b, &r));
  if (a->ndim == 1 || b->ndim == 1) {
    /* drop the dims the 1-D operands gained */
    int64_t shape[KEEL_MAX_DIMS];
    int nd = 0;
    for (int i = 0; i < r->ndim; i++) {
      if (a->ndim == 1 && i == r->ndim - 2) continue;
      if (b->ndim == 1 && i == r->ndim - 1) continue;
      shape[nd++] = r->shape[i];
    }
    TRY(keel_reshape(ctx, r, nd, shape, out));
  } else {
    *out = r;
    r = NULL;
  }
done:
  keel_tensor_release(ca);
  keel_tensor_release(cb);
  keel_tensor_release(a2);
  keel_tensor_release(b2);
  keel_tensor_release(r);
  return st;
}

/* dA = dC B^T, dB = A^T dC; the tape sums broadcast batch dims away. */
KL_BACKWARD(kl_matmul_backward) {
  keel_tensor *t = NULL;
  keel_status st = KEEL_OK;
  if (KL_NEEDS(n, 0)) {
    keel_tensor *b = n->saved[1];
    TRY(keel_transpose(ctx, b, b->ndim - 2, b->ndim - 1, &t));
    TRY(keel_matmul(ctx, gout, t, &gin[0]));
    kl_release(&t);
  }
  if (KL_NEEDS(n, 1)) {
    keel_tensor *a = n->saved[0];
    TRY(keel_transpose(ctx, a, a->ndim - 2, a->ndim - 1, &t));
    TRY(keel_matmul(ctx, t, gout, &gin[1]));
  }
done:
  keel_tensor_release(t);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** cat and stack
** ======================================================================= */

keel_status keel_cat(keel_ctx *ctx, int n, keel_tensor *const *ts, int dim, keel_tensor **out) {
  int64_t shape[KEEL_MAX_DIMS];
  int d;
  keel_dtype dt;
  keel_tensor *o = NULL;
  keel_status st;
  char b1[128], b2[128];
  *out = NULL;
  if (n <= 0) return kl_error(ctx, KEEL_ERR_ARG, "cat: expected a non-empty list of tensors");
  for (int i = 0; i < n; i++) if ((st = kl_check_same_ctx(ctx, "cat", ts[i]))) return st;
  if ((st = kl_check_dim(ctx, "cat", dim, ts[0]->ndim, &d))) return st;
  memcpy(shape, ts[0]->shape, sizeof shape);
  dt = ts[0]->dtype;
  shape[d] = 0;
  for (int i = 0; i < n; i++) {
    const keel_tensor *t = ts[i];
    if ((st = kl_check_device(ctx, "cat", ts[0], t))) return st;
    if (t->ndim != ts[0]->ndim)
      return kl_error(ctx, KEEL_ERR_SHAPE, "cat: tensor %d has %d dimensions, tensor %d has %d",
                      i + ctx->index_base, t->ndim, ctx->index_base, ts[0]->ndim);
    for (int j = 0; j < t->ndim; j++)
      if (j != d && t->shape[j] != ts[0]->shape[j])
        return kl_error(ctx, KEEL_ERR_SHAPE,
                        "cat: shapes %s and %s differ outside dimension %d (tensor %d)",
                        kl_shape_str(b1, sizeof b1, ts[0]->ndim, ts[0]->shape),
                        kl_shape_str(b2, sizeof b2, t->ndim, t->shape), d + ctx->index_base, i + ctx->index_base);
    shape[d] += t->shape[d];
    dt = kl_promote(dt, t->dtype);
  }
  if ((st = kl_new(ctx, dt, ts[0]->storage->device, ts[0]->ndim, shape, &o))) return st;
  {
    int64_t off = 0;
    for (int i = 0; i < n && !st; i++) {
      keel_tensor *slot;
      int64_t sshape[KEEL_MAX_DIMS];
      memcpy(sshape, shape, sizeof sshape);
      sshape[d] = ts[i]->shape[d];
      if ((st = kl_alias(ctx, o, o->ndim, sshape, o->stride, off * o->stride[d], &slot))) break;
      st = backend(ctx, o)->copy(ctx, slot, ts[i]);
      keel_tensor_release(slot);
      off += ts[i]->shape[d];
    }
  }
  if (!st && kl_needs_grad(ctx, n, ts)) {
    kl_node *node = kl_record(ctx, KL_OP_CAT, n, ts, o);
    if (!node) st = kl_error(ctx, KEEL_ERR_NOMEM, "cat: out of memory");
    else node->iparam[0] = d;
  }
  if (st) { keel_tensor_release(o); return st; }
  *out = o;
  return KEEL_OK;
}

KL_BACKWARD(kl_cat_backward) {
  int d = (int)n->iparam[0];
  int64_t off = 0;
  for (int i = 0; i < n->n_in; i++) {
    int64_t len = n->in[i].shape[d];
    if (KL_NEEDS(n, i)) {
      keel_status st = keel_narrow(ctx, gout, d, off, len, &gin[i]);
      if (st) return st;
    }
    off += len;
  }
  return KEEL_OK;
}

keel_status keel_stack(keel_ctx *ctx, int n, keel_tensor *const *ts, int dim, keel_tensor **out) {
  keel_tensor *local[16], **u = local;
  keel_status st = KEEL_OK;
  int made = 0, d;
  *out = NULL;
  if (n <= 0) return kl_error(ctx, KEEL_ERR_ARG, "stack: expected a non-empty list of tensors");
  for (int i = 0; i < n; i++) if ((st = kl_check_same_ctx(ctx, "stack", ts[i]))) return st;
  if ((st = kl_check_dim(ctx, "stack", dim, ts[0]->ndim + 1, &d))) return st;
  for (int i = 1; i < n; i++)
    if (ts[i]->ndim != ts[0]->ndim || memcmp(ts[i]->shape, ts[0]->shape, sizeof(int64_t) * (size_t)ts[0]->ndim)) {
      char b1[128], b2[128];
      return kl_error(ctx, KEEL_ERR_SHAPE, "stack: all tensors need one shape; tensor %d has %s, tensor %d has %s",
                      ctx->index_base, kl_shape_str(b1, sizeof b1, ts[0]->ndim, ts[0]->shape), i + ctx->index_base,
                      kl_shape_str(b2, sizeof b2, ts[i]->ndim, ts[i]->shape));
    }
  if (n > 16) {
    u = (keel_tensor **)kl_malloc(ctx, sizeof *u * (size_t)n);
    if (!u) return kl_error(ctx, KEEL_ERR_NOMEM, "stack: out of memory");
  }
  for (; made < n; made++)
    if ((st = keel_unsqueeze(ctx, ts[made], d, &u[made]))) break;
  if (!st) st = keel_cat(ctx, n, u, d, out);
  for (int i = 0; i < made; i++) keel_tensor_release(u[i]);
  if (u != local) kl_free(ctx, u, sizeof *u * (size_t)n);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** gather, scatter_add, index_select
** ======================================================================= */

/*
** The index as a contiguous int64 tensor with every value inside
** [base, base + limit). Float index tensors with whole values are
** accepted, since Lua numbers make them easily.
*/
static keel_status index_on_host(keel_ctx *ctx, const char *fn, keel_tensor *index, int64_t limit,
                                 keel_tensor **out) {
  keel_tensor *c = NULL;
  keel_status st;
  int64_t base = ctx->index_base;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, index))) return st;
  if (index->dtype != KEEL_I64) {
    double *vals;
    int64_t *dst;
    if ((st = kl_new(ctx, KEEL_I64, KEEL_CPU, index->ndim, index->shape, &c))) return st;
    vals = (double *)kl_malloc(ctx, sizeof(double) * (size_t)(index->numel ? index->numel : 1));
    if (!vals) { keel_tensor_release(c); return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); }
    keel_tensor_read(ctx, index, vals, index->numel);
    dst = (int64_t *)kl_data(c);
    for (int64_t i = 0; i < index->numel; i++) {
      if (vals[i] != floor(vals[i]) || fabs(vals[i]) > 9e15) {
        double bad = vals[i];
        kl_free(ctx, vals, sizeof(double) * (size_t)(index->numel ? index->numel : 1));
        keel_tensor_release(c);
        return kl_error(ctx, KEEL_ERR_TYPE, "%s: index values must be whole numbers, got %g", fn, bad);
      }
      dst[i] = (int64_t)vals[i];
    }
    kl_free(ctx, vals, sizeof(double) * (size_t)(index->numel ? index->numel : 1));
  } else if ((st = keel_contiguous(ctx, index, &c))) {
    return st;
  }
  {
    const int64_t *v = (const int64_t *)kl_data(c);
    for (int64_t i = 0; i < c->numel; i++)
      if (v[i] < base || v[i] >= base + limit) {
        long long bad = (long long)v[i];
        keel_tensor_release(c);
        return kl_error(ctx, KEEL_ERR_INDEX, "%s: index %lld out of range (expected %lld..%lld)", fn,
                        bad, (long long)base, (long long)(base + limit - 1));
      }
  }
  *out = c;
  return KEEL_OK;
}

/*
** The index the backend of device dev reads, for an index on any device
** (max/min hand these ops device positions whatever the data's device).
** Its values are checked on the host, so a device index comes over once
** (not at all while it still has the values it was uploaded with:
** kl_host_values). The kernels read values counted from the index base
** and any strides, so an int64 index already on dev goes to them as it
** is: nothing is copied, and autograd saves it for backward, whose ops
** check it again from the same host copy. Any other index is the checked
** copy (the CPU backend's always), uploaded once when dev is CUDA
** (keeping its host copy, so that backward's check downloads nothing).
*/
static keel_status index_tensor(keel_ctx *ctx, const char *fn, keel_tensor *index, int64_t limit,
                                keel_device dev, keel_tensor **out) {
  keel_tensor *h = NULL, *c = NULL;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, index)) || (st = kl_host_values(ctx, index, &h))) return st;
  st = index_on_host(ctx, fn, h, limit, &c);
  keel_tensor_release(h);
  if (st) return st;
  if (dev == KEEL_CPU)
    *out = keel_tensor_retain(c);
  else if (index->storage->device == dev && index->dtype == KEEL_I64)
    *out = keel_tensor_retain(index);
  else
    st = kl_upload_index(ctx, c, out);
  keel_tensor_release(c);
  return st;
}

/* index must have a's ndim and fit inside ref outside dim (inside a at dim). */
static keel_status check_index_shape(keel_ctx *ctx, const char *fn, const keel_tensor *a, int d,
                                     const keel_tensor *index, const keel_tensor *src) {
  char b1[128], b2[128];
  if (index->ndim != a->ndim)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: index has %d dimensions, input has %d", fn, index->ndim, a->ndim);
  for (int i = 0; i < a->ndim; i++) {
    if ((i != d && index->shape[i] > a->shape[i]) || (src && index->shape[i] > src->shape[i]))
      return kl_error(ctx, KEEL_ERR_SHAPE, "%s: index of shape %s does not fit %s of shape %s at dimension %d", fn,
                      kl_shape_str(b1, sizeof b1, index->ndim, index->shape), src && index->shape[i] > src->shape[i] ? "source" : "input",
                      src && index->shape[i] > src->shape[i] ? kl_shape_str(b2, sizeof b2, src->ndim, src->shape)
                                                             : kl_shape_str(b2, sizeof b2, a->ndim, a->shape),
                      i + ctx->index_base);
  }
  return KEEL_OK;
}

keel_status keel_gather(keel_ctx *ctx, keel_tensor *a, int dim, keel_tensor *index, keel_tensor **out) {
  keel_tensor *idx = NULL, *o = NULL;
  int d;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "gather", a))) return st;
  if ((st = kl_check_dim(ctx, "gather", dim, a->ndim, &d))) return st;
  if ((st = check_index_shape(ctx, "gather", a, d, index, NULL))) return st;
  if ((st = index_tensor(ctx, "gather", index, a->shape[d], a->storage->device, &idx))) return st;
  TRY(kl_new(ctx, a->dtype, a->storage->device, idx->ndim, idx->shape, &o));
  TRY(backend(ctx, a)->gather(ctx, o, a, d, idx));
  if (kl_needs_grad(ctx, 1, &a)) {
    kl_node *n = kl_record(ctx, KL_OP_GATHER, 1, &a, o);
    if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "gather: out of memory"); goto done; }
    n->iparam[0] = d;
    TRY(kl_save(ctx, n, 0, idx));
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(idx);
  keel_tensor_release(o);
  return st;
}

keel_status keel_scatter_add(keel_ctx *ctx, keel_tensor *a, int dim, keel_tensor *index, keel_tensor *src,
                             keel_tensor **out) {
  keel_tensor *idx = NULL, *o = NULL, *s = NULL;
  int d;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "scatter_add", a)) || (st = kl_check_same_ctx(ctx, "scatter_add", src))) return st;
  if ((st = kl_check_device(ctx, "scatter_add", a, src))) return st;
  if ((st = kl_check_dim(ctx, "scatter_add", dim, a->ndim, &d))) return st;
  if (src->ndim != a->ndim)
    return kl_error(ctx, KEEL_ERR_SHAPE, "scatter_add: source has %d dimensions, input has %d", src->ndim, a->ndim);
  if ((st = check_index_shape(ctx, "scatter_add", a, d, index, src))) return st;
  if ((st = index_tensor(ctx, "scatter_add", index, a->shape[d], a->storage->device, &idx))) return st;
  TRY(kl_new(ctx, a->dtype, a->storage->device, a->ndim, a->shape, &o));
  TRY(backend(ctx, a)->copy(ctx, o, a));
  TRY(keel_to_dtype(ctx, src, a->dtype, &s));
  TRY(backend(ctx, a)->scatter_add(ctx, o, d, idx, s));
  {
    keel_tensor *in[2] = {a, src};
    if (kl_needs_grad(ctx, 2, in)) {
      kl_node *n = kl_record(ctx, KL_OP_SCATTER_ADD, 2, in, o);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "scatter_add: out of memory"); goto done; }
      n->iparam[0] = d;
      TRY(kl_save(ctx, n, 0, idx));
    }
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(idx);
  keel_tensor_release(s);
  keel_tensor_release(o);
  return st;
}

keel_status keel_index_select(keel_ctx *ctx, keel_tensor *a, int dim, keel_tensor *index, keel_tensor **out) {
  keel_tensor *idx = NULL, *o = NULL;
  int64_t shape[KEEL_MAX_DIMS];
  int d;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "index_select", a))) return st;
  if ((st = kl_check_dim(ctx, "index_select", dim, a->ndim, &d))) return st;
  if (index->ndim > 1)
    return kl_error(ctx, KEEL_ERR_SHAPE, "index_select: index must be 1-D, got %d dimensions", index->ndim);
  if ((st = index_tensor(ctx, "index_select", index, a->shape[d], a->storage->device, &idx))) return st;
  memcpy(shape, a->shape, sizeof shape);
  shape[d] = idx->numel;
  if (idx->ndim == 0) {  /* a 0-d index selects one slice, keeping the dim */
    int64_t one = 1;
    keel_tensor *v;
    TRY(keel_view(ctx, idx, 1, &one, &v));
    keel_tensor_release(idx);
    idx = v;
  }
  TRY(kl_new(ctx, a->dtype, a->storage->device, a->ndim, shape, &o));
  TRY(backend(ctx, a)->index_select(ctx, o, a, d, idx));
  if (kl_needs_grad(ctx, 1, &a)) {
    kl_node *n = kl_record(ctx, KL_OP_INDEX_SELECT, 1, &a, o);
    if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "index_select: out of memory"); goto done; }
    n->iparam[0] = d;
    TRY(kl_save(ctx, n, 0, idx));
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(idx);
  keel_tensor_release(o);
  return st;
}

KL_BACKWARD(kl_gather_backward) {
  kl_edge *e = &n->in[0];
  keel_tensor *z = NULL;
  keel_status st = KEEL_OK;
  TRY(kl_full(ctx, gout->dtype, gout->storage->device, e->ndim, e->shape, 0.0, &z));
  TRY(keel_scatter_add(ctx, z, (int)n->iparam[0], n->saved[0], gout, &gin[0]));
done:
  keel_tensor_release(z);
  return st;
}

KL_BACKWARD(kl_scatter_add_backward) {
  keel_tensor *idx = n->saved[0], *g = NULL, *z = NULL, *slot = NULL;
  kl_edge *e = &n->in[1];
  keel_status st = KEEL_OK;
  if (KL_NEEDS(n, 0)) gin[0] = keel_tensor_retain(gout);
  if (!KL_NEEDS(n, 1)) return KEEL_OK;
  TRY(keel_gather(ctx, gout, (int)n->iparam[0], idx, &g));
  if (!memcmp(g->shape, e->shape, sizeof(int64_t) * (size_t)e->ndim)) {
    gin[1] = g;
    return KEEL_OK;
  }
  /* source larger than the index: the rest of it received nothing */
  TRY(kl_full(ctx, gout->dtype, gout->storage->device, e->ndim, e->shape, 0.0, &z));
  TRY(kl_alias(ctx, z, g->ndim, g->shape, z->stride, 0, &slot));
  TRY(backend(ctx, z)->copy(ctx, slot, g));
  gin[1] = z;
  z = NULL;
done:
  keel_tensor_release(g);
  keel_tensor_release(z);
  keel_tensor_release(slot);
  return st;
}

KL_BACKWARD(kl_index_select_backward) {
  kl_edge *e = &n->in[0];
  int d = (int)n->iparam[0];
  int64_t shape[KEEL_MAX_DIMS];
  keel_tensor *z = NULL, *v = NULL, *ex = NULL;
  keel_status st = KEEL_OK;
  for (int i = 0; i < e->ndim; i++) shape[i] = i == d ? n->saved[0]->numel : 1;
  TRY(kl_full(ctx, gout->dtype, gout->storage->device, e->ndim, e->shape, 0.0, &z));
  TRY(keel_reshape(ctx, n->saved[0], e->ndim, shape, &v));
  TRY(keel_expand(ctx, v, gout->ndim, gout->shape, &ex));
  TRY(keel_scatter_add(ctx, z, d, ex, gout, &gin[0]));
done:
  keel_tensor_release(z);
  keel_tensor_release(v);
  keel_tensor_release(ex);
  return st;
}

/* }====================================================================== */
