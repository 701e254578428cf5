/*
** tensor.c: storage, tensor handles, geometry helpers, element access and
** the creation functions.
*/
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "keel_impl.h"

size_t kl_dtype_size[KEEL_DTYPE_COUNT] = {4, 8, 8};

const char *keel_dtype_name(keel_dtype dt) {
  static const char *names[KEEL_DTYPE_COUNT] = {"float32", "float64", "int64"};
  return (unsigned)dt < KEEL_DTYPE_COUNT ? names[dt] : "?";
}
size_t keel_dtype_size(keel_dtype dt) {
  return (unsigned)dt < KEEL_DTYPE_COUNT ? kl_dtype_size[dt] : 0;
}

/* {======================================================================
** Storage and handles
** ======================================================================= */

static kl_storage *storage_new(keel_ctx *ctx, keel_device dev, size_t nbytes) {
  const kl_backend *be = kl_backend_for(ctx, dev);
  kl_storage *s;
  if (!be) return NULL;
  s = (kl_storage *)kl_spare_get(ctx, &ctx->spare_storages, &ctx->n_spare_storages, sizeof *s);
  if (!s) return NULL;
  s->refcount = 1;
  s->ctx = ctx;
  s->device = dev;
  s->nbytes = nbytes;
  s->version = 0;
  s->gen = ++ctx->storage_gen;
  s->shadow = NULL;
  s->data = be->alloc(ctx, nbytes ? nbytes : 1);
  if (!s->data) { kl_spare_put(ctx, &ctx->spare_storages, &ctx->n_spare_storages, s, sizeof *s); return NULL; }
  kl_ctx_ref(ctx);
  return s;
}

static void storage_release(kl_storage *s) {
  keel_ctx *ctx;
  if (!s || --s->refcount > 0) return;
  ctx = s->ctx;
  keel_tensor_release(s->shadow);
  kl_backend_for(ctx, s->device)->free(ctx, s->data, s->nbytes ? s->nbytes : 1);
  kl_spare_put(ctx, &ctx->spare_storages, &ctx->n_spare_storages, s, sizeof *s);
  kl_ctx_unref(ctx);
}

static keel_tensor *handle_new(keel_ctx *ctx, kl_storage *s) {
  keel_tensor *t = (keel_tensor *)kl_spare_get(ctx, &ctx->spare_tensors, &ctx->n_spare_tensors, sizeof *t);
  if (!t) return NULL;
  memset(t, 0, sizeof *t);
  t->refcount = 1;
  t->ctx = ctx;
  t->storage = s;
  s->refcount++;
  kl_ctx_ref(ctx);
  ctx->mem.live_tensors++;
  return t;
}

keel_tensor *keel_tensor_retain(keel_tensor *t) {
  if (t) t->refcount++;
  return t;
}

void keel_tensor_release(keel_tensor *t) {
  keel_ctx *ctx;
  if (!t || --t->refcount > 0) return;
  ctx = t->ctx;
  if (t->grad_fn) {
    if (t->grad_fn->retained == t) t->grad_fn->retained = NULL;
    kl_node_unref(t->grad_fn);
  }
  keel_tensor_release(t->grad);
  kl_hooks_free(ctx, t->hooks);
  storage_release(t->storage);
  ctx->mem.live_tensors--;
  kl_spare_put(ctx, &ctx->spare_tensors, &ctx->n_spare_tensors, t, sizeof *t);
  kl_ctx_unref(ctx);
}

void kl_release(keel_tensor **p) {
  keel_tensor_release(*p);
  *p = NULL;
}

int64_t kl_numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
}

void kl_contiguous_strides(int ndim, const int64_t *shape, int64_t *stride) {
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    stride[i] = s;
    s *= shape[i] > 0 ? shape[i] : 1;
  }
}

int kl_is_contiguous(const keel_tensor *t) {
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] == 1) continue;
    if (t->stride[i] != s) return 0;
    s *= t->shape[i];
  }
  return 1;
}

static keel_status check_shape(keel_ctx *ctx, const char *fn, int ndim, const int64_t *shape) {
  int64_t n = 1;
  if (ndim < 0 || ndim > KEEL_MAX_DIMS)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %d dimensions given, at most %d supported", fn,
                    ndim, KEEL_MAX_DIMS);
  /* the product of the non-zero sizes is bounded too: strides are computed
  ** from it even when another dimension makes the tensor empty */
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0)
      return kl_error(ctx, KEEL_ERR_SHAPE, "%s: size %lld of dimension %d is negative", fn,
                      (long long)shape[i], i + ctx->index_base);
    if (shape[i] > 0 && n > ((int64_t)1 << 48) / shape[i])
      return kl_error(ctx, KEEL_ERR_NOMEM, "%s: shape too large", fn);
    if (shape[i] > 0) n *= shape[i];
  }
  return KEEL_OK;
}

keel_status kl_new(keel_ctx *ctx, keel_dtype dt, keel_device dev, int ndim,
                   const int64_t *shape, keel_tensor **out) {
  keel_status st = check_shape(ctx, "tensor", ndim, shape);
  int64_t n;
  kl_storage *s;
  keel_tensor *t;
  *out = NULL;
  if (st) return st;
  if ((unsigned)dt >= KEEL_DTYPE_COUNT) return kl_error(ctx, KEEL_ERR_TYPE, "tensor: unknown dtype %d", (int)dt);
  if (!kl_backend_for(ctx, dev)) {
    if (dev == KEEL_CUDA) return kl_error(ctx, KEEL_ERR_DEVICE, "tensor: CUDA is not available: %s", kl_cuda_why(ctx));
    return kl_error(ctx, KEEL_ERR_DEVICE, "tensor: unknown device %d", (int)dev);
  }
  n = kl_numel(ndim, shape);
  /* the device allocator names its own failure: start from a clean slot */
  if (dev != KEEL_CPU) ctx->status = KEEL_OK;
  s = storage_new(ctx, dev, (size_t)n * kl_dtype_size[dt]);
  if (!s) {
    if (dev != KEEL_CPU && ctx->status != KEEL_OK) return ctx->status;
    return kl_error(ctx, KEEL_ERR_NOMEM, "tensor: out of memory allocating %lld bytes",
                    (long long)(n * (int64_t)kl_dtype_size[dt]));
  }
  t = handle_new(ctx, s);
  storage_release(s);
  if (!t) return kl_error(ctx, KEEL_ERR_NOMEM, "tensor: out of memory");
  t->dtype = dt;
  t->ndim = ndim;
  if (ndim) memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
  kl_contiguous_strides(ndim, shape, t->stride);
  t->numel = n;
  *out = t;
  return KEEL_OK;
}

keel_status kl_new_like(keel_ctx *ctx, const keel_tensor *a, keel_dtype dt, keel_tensor **out) {
  return kl_new(ctx, dt, a->storage->device, a->ndim, a->shape, out);
}

keel_status kl_alias(keel_ctx *ctx, const keel_tensor *a, int ndim, const int64_t *shape,
                     const int64_t *stride, int64_t offset, keel_tensor **out) {
  keel_tensor *t = handle_new(ctx, a->storage);
  *out = NULL;
  if (!t) return kl_error(ctx, KEEL_ERR_NOMEM, "view: out of memory");
  t->dtype = a->dtype;
  t->ndim = ndim;
  if (ndim) {
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    memcpy(t->stride, stride, sizeof(int64_t) * (size_t)ndim);
  }
  t->offset = offset;
  t->numel = kl_numel(ndim, shape);
  *out = t;
  return KEEL_OK;
}

keel_status keel_tensor_set_data(keel_ctx *ctx, keel_tensor *t, keel_tensor *src) {
  keel_status st;
  char b1[128], b2[128];
  if ((st = kl_check_same_ctx(ctx, "set_data", t)) || (st = kl_check_same_ctx(ctx, "set_data", src))) return st;
  if (t->grad_fn)
    return kl_error(ctx, KEEL_ERR_STATE, "set_data: only a leaf tensor's data can be replaced (this one was made by %s)",
                    kl_ops[t->grad_fn->op].name);
  if (t->ndim != src->ndim || memcmp(t->shape, src->shape, sizeof(int64_t) * (size_t)t->ndim))
    return kl_error(ctx, KEEL_ERR_SHAPE, "set_data: new data has shape %s, the tensor has shape %s",
                    kl_shape_str(b1, sizeof b1, src->ndim, src->shape), kl_shape_str(b2, sizeof b2, t->ndim, t->shape));
  if (t->grad && (t->grad->storage->device != src->storage->device || t->grad->dtype != src->dtype))
    return kl_error(ctx, KEEL_ERR_STATE,
                    "set_data: the tensor's .grad is %s on %s, the new data %s on %s; move or clear .grad first",
                    keel_dtype_name(t->grad->dtype), keel_device_name(t->grad->storage->device),
                    keel_dtype_name(src->dtype), keel_device_name(src->storage->device));
  /* retain first: src may be a view of t's own storage */
  src->storage->refcount++;
  storage_release(t->storage);
  t->storage = src->storage;
  t->dtype = src->dtype;
  memcpy(t->stride, src->stride, sizeof t->stride);
  t->offset = src->offset;
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Introspection and checks
** ======================================================================= */

keel_ctx *keel_tensor_ctx(const keel_tensor *t) { return t->ctx; }
int keel_tensor_ndim(const keel_tensor *t) { return t->ndim; }
const int64_t *keel_tensor_shape(const keel_tensor *t) { return t->shape; }
const int64_t *keel_tensor_strides(const keel_tensor *t) { return t->stride; }
int64_t keel_tensor_offset(const keel_tensor *t) { return t->offset; }
int64_t keel_tensor_numel(const keel_tensor *t) { return t->numel; }
keel_dtype keel_tensor_dtype(const keel_tensor *t) { return t->dtype; }
keel_device keel_tensor_device(const keel_tensor *t) { return t->storage->device; }
int keel_tensor_is_contiguous(const keel_tensor *t) { return kl_is_contiguous(t); }
int keel_tensor_same_storage(const keel_tensor *a, const keel_tensor *b) {
  return a->storage == b->storage;
}

void *kl_data(const keel_tensor *t) {
  return (char *)t->storage->data + t->offset * (int64_t)kl_dtype_size[t->dtype];
}
void *keel_tensor_data(const keel_tensor *t) { return kl_data(t); }

char *kl_shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
  size_t k = 0;
  k += (size_t)snprintf(buf + k, n - k, "[");
  for (int i = 0; i < ndim && k < n; i++)
    k += (size_t)snprintf(buf + k, n - k, i ? ",%lld" : "%lld", (long long)shape[i]);
  if (k < n) snprintf(buf + k, n - k, "]");
  return buf;
}

keel_status kl_check_dim(keel_ctx *ctx, const char *fn, int dim, int ndim, int *norm) {
  int d = dim < 0 ? dim + ndim : dim;
  if (d < 0 || d >= ndim) {
    int b = ctx->index_base;
    if (ndim == 0)
      return kl_error(ctx, KEEL_ERR_INDEX, "%s: dimension %d out of range (tensor has no dimensions)",
                      fn, dim < 0 ? dim : dim + b);
    return kl_error(ctx, KEEL_ERR_INDEX, "%s: dimension %d out of range (expected %d..%d or -%d..-1)",
                    fn, dim < 0 ? dim : dim + b, b, ndim - 1 + b, ndim);
  }
  *norm = d;
  return KEEL_OK;
}

keel_status kl_check_same_ctx(keel_ctx *ctx, const char *fn, const keel_tensor *t) {
  if (!t) return kl_error(ctx, KEEL_ERR_ARG, "%s: tensor argument is NULL", fn);
  if (t->ctx != ctx) return kl_error(ctx, KEEL_ERR_ARG, "%s: tensor belongs to another context", fn);
  return KEEL_OK;
}

keel_status kl_check_float(keel_ctx *ctx, const char *fn, const keel_tensor *t) {
  if (t->dtype == KEEL_F32 || t->dtype == KEEL_F64) return KEEL_OK;
  return kl_error(ctx, KEEL_ERR_TYPE, "%s: expected a float32 or float64 tensor, got %s", fn,
                  keel_dtype_name(t->dtype));
}

keel_status kl_check_writable(keel_ctx *ctx, const char *fn, const keel_tensor *t) {
  if (ctx->grad_enabled && (t->requires_grad || t->grad_fn))
    return kl_error(ctx, KEEL_ERR_STATE,
                    "%s: in-place change of a tensor that requires grad; "
                    "do it under no_grad or on a detached tensor", fn);
  for (int i = 0; i < t->ndim; i++)
    if (t->stride[i] == 0 && t->shape[i] > 1)
      return kl_error(ctx, KEEL_ERR_ARG,
                      "%s: cannot write into an expanded tensor (elements share memory); "
                      "use contiguous() first", fn);
  return KEEL_OK;
}

keel_dtype kl_promote(keel_dtype a, keel_dtype b) {
  if (a == b) return a;
  if (a == KEEL_F64 || b == KEEL_F64) return KEEL_F64;
  return KEEL_F32;  /* f32 with i64 */
}

keel_status kl_broadcast_shape(keel_ctx *ctx, const char *fn, int na, const int64_t *sa, int nb,
                               const int64_t *sb, int *nout, int64_t *sout) {
  int n = na > nb ? na : nb;
  for (int i = 0; i < n; i++) {
    int64_t x = i < n - na ? 1 : sa[i - (n - na)];
    int64_t y = i < n - nb ? 1 : sb[i - (n - nb)];
    if (x != y && x != 1 && y != 1) {
      char b1[128], b2[128];
      return kl_error(ctx, KEEL_ERR_SHAPE,
                      "%s: shapes %s and %s cannot be broadcast (size %lld vs %lld at dimension %d)",
                      fn, kl_shape_str(b1, sizeof b1, na, sa), kl_shape_str(b2, sizeof b2, nb, sb),
                      (long long)x, (long long)y, i + ctx->index_base);
    }
    sout[i] = x == 1 ? y : x;
  }
  *nout = n;
  return KEEL_OK;
}

void kl_broadcast_view(const keel_tensor *a, int ndim, const int64_t *shape, keel_tensor *view) {
  int lead = ndim - a->ndim;
  *view = *a;
  view->refcount = 0;
  view->grad = NULL;
  view->grad_fn = NULL;
  view->hooks = NULL;
  view->ndim = ndim;
  for (int i = 0; i < ndim; i++) {
    view->shape[i] = shape[i];
    view->stride[i] = i < lead ? 0 : a->shape[i - lead] == 1 && shape[i] != 1 ? 0 : a->stride[i - lead];
  }
  view->numel = kl_numel(ndim, shape);
}

keel_status kl_broadcast_to(keel_ctx *ctx, const keel_tensor *a, int ndim, const int64_t *shape,
                            keel_tensor **out) {
  int64_t stride[KEEL_MAX_DIMS];
  int lead = ndim - a->ndim;
  for (int i = 0; i < ndim; i++) {
    if (i < lead) { stride[i] = 0; continue; }
    stride[i] = a->shape[i - lead] == 1 && shape[i] != 1 ? 0 : a->stride[i - lead];
  }
  return kl_alias(ctx, a, ndim, shape, stride, a->offset, out);
}

double kl_load(const void *p, keel_dtype dt) {
  switch (dt) {
    case KEEL_F32: return *(const float *)p;
    case KEEL_F64: return *(const double *)p;
    default: return (double)*(const int64_t *)p;
  }
}

void kl_store(void *p, keel_dtype dt, double v) {
  switch (dt) {
    case KEEL_F32: *(float *)p = (float)v; break;
    case KEEL_F64: *(double *)p = v; break;
    default: *(int64_t *)p = (int64_t)v; break;
  }
}

/* }====================================================================== */

/* {======================================================================
** Element access
** ======================================================================= */

/* The element's offset in its storage (elements). */
static keel_status elem_offset(keel_ctx *ctx, const char *fn, const keel_tensor *t,
                               const int64_t *idx, int64_t *off_out) {
  int64_t off = t->offset;
  for (int i = 0; i < t->ndim; i++) {
    if (idx[i] < 0 || idx[i] >= t->shape[i])
      return kl_error(ctx, KEEL_ERR_INDEX, "%s: index %lld out of range for dimension %d of size %lld",
                      fn, (long long)(idx[i] + ctx->index_base), i + ctx->index_base,
                      (long long)t->shape[i]);
    off += idx[i] * t->stride[i];
  }
  *off_out = off;
  return KEEL_OK;
}

/* Another device's element: a 0-d alias of it, copied or filled there. */
static keel_status device_elem(keel_ctx *ctx, const keel_tensor *t, int64_t off, int set, double *v) {
  keel_tensor *e, *h = NULL;
  keel_status st = kl_alias(ctx, t, 0, NULL, NULL, off, &e);
  if (st) return st;
  if (set) st = kl_backend_for(ctx, t->storage->device)->fill(ctx, e, *v);
  else if (!(st = kl_transfer(ctx, e, KEEL_CPU, t->dtype, &h))) *v = kl_load(kl_data(h), t->dtype);
  keel_tensor_release(h);
  keel_tensor_release(e);
  return st;
}

keel_status keel_tensor_get(keel_ctx *ctx, const keel_tensor *t, const int64_t *idx, double *v) {
  int64_t off;
  keel_status st = elem_offset(ctx, "get", t, idx, &off);
  if (st) return st;
  if (t->storage->device != KEEL_CPU) return device_elem(ctx, t, off, 0, v);
  *v = kl_load((char *)t->storage->data + off * (int64_t)kl_dtype_size[t->dtype], t->dtype);
  return KEEL_OK;
}

keel_status keel_tensor_set(keel_ctx *ctx, keel_tensor *t, const int64_t *idx, double v) {
  int64_t off;
  keel_status st = kl_check_writable(ctx, "set", t);
  if (st) return st;
  if ((st = elem_offset(ctx, "set", t, idx, &off))) return st;
  if (t->storage->device != KEEL_CPU) st = device_elem(ctx, t, off, 1, &v);
  else kl_store((char *)t->storage->data + off * (int64_t)kl_dtype_size[t->dtype], t->dtype, v);
  t->storage->version++;
  return st;
}

keel_status keel_item(keel_ctx *ctx, const keel_tensor *t, double *v) {
  int64_t idx[KEEL_MAX_DIMS] = {0};
  if (t->numel != 1)
    return kl_error(ctx, KEEL_ERR_SHAPE, "item: expected a tensor with one element, got %lld",
                    (long long)t->numel);
  return keel_tensor_get(ctx, t, idx, v);
}

keel_status keel_tensor_read(keel_ctx *ctx, const keel_tensor *t, double *dst, int64_t n) {
  int64_t idx[KEEL_MAX_DIMS] = {0};
  size_t es = kl_dtype_size[t->dtype];
  if (n < t->numel)
    return kl_error(ctx, KEEL_ERR_ARG, "read: buffer holds %lld values, tensor has %lld",
                    (long long)n, (long long)t->numel);
  if (t->storage->device != KEEL_CPU) {   /* one copy to the host, then read that */
    keel_tensor *h;
    keel_status st = kl_transfer(ctx, t, KEEL_CPU, t->dtype, &h);
    if (st) return st;
    st = keel_tensor_read(ctx, h, dst, n);
    keel_tensor_release(h);
    return st;
  }
  for (int64_t k = 0; k < t->numel; k++) {
    int64_t off = t->offset;
    for (int i = 0; i < t->ndim; i++) off += idx[i] * t->stride[i];
    dst[k] = kl_load((char *)t->storage->data + off * (int64_t)es, t->dtype);
    for (int i = t->ndim - 1; i >= 0; i--) {
      if (++idx[i] < t->shape[i]) break;
      idx[i] = 0;
    }
  }
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Creation, on the context's default device. Values that are computed
** (data, ranges) are made on the host and copied once.
** ======================================================================= */

keel_status kl_full(keel_ctx *ctx, keel_dtype dt, keel_device dev, int ndim, const int64_t *shape, double v,
                    keel_tensor **out) {
  keel_status st = kl_new(ctx, dt, dev, ndim, shape, out);
  if (st) return st;
  if ((st = kl_backend_for(ctx, dev)->fill(ctx, *out, v))) kl_release(out);
  return st;
}

/* Hands back host tensor *t on the default device (releasing the host one).
** An int64 tensor goes up as an index does (kl_upload_index): it keeps the
** values it was made with, so that a class target or token id made on a
** CUDA default device is checked without a download, as one moved there
** with to("cuda") is. */
static keel_status to_default(keel_ctx *ctx, keel_tensor **t) {
  keel_tensor *d;
  keel_status st;
  if (ctx->default_device == KEEL_CPU) return KEEL_OK;
  if (ctx->default_device == KEEL_CUDA && (*t)->dtype == KEEL_I64)
    st = kl_upload_index(ctx, *t, &d);
  else
    st = kl_transfer(ctx, *t, ctx->default_device, (*t)->dtype, &d);
  kl_release(t);
  if (st) return st;
  *t = d;
  return KEEL_OK;
}

/* A new host tensor, or a failure that names the default device when it
** is the one that cannot be used (before any host work is done). */
static keel_status host_new(keel_ctx *ctx, keel_dtype dt, int ndim, const int64_t *shape, keel_tensor **out) {
  if (ctx->default_device != KEEL_CPU && !kl_backend_for(ctx, ctx->default_device)) {
    *out = NULL;
    return kl_new(ctx, dt, ctx->default_device, ndim, shape, out);   /* fails, saying why */
  }
  return kl_new(ctx, dt, KEEL_CPU, ndim, shape, out);
}

keel_status keel_empty(keel_ctx *ctx, keel_dtype dt, int ndim, const int64_t *shape,
                       keel_tensor **out) {
  return kl_new(ctx, dt, ctx->default_device, ndim, shape, out);
}

keel_status keel_full(keel_ctx *ctx, keel_dtype dt, int ndim, const int64_t *shape, double value,
                      keel_tensor **out) {
  return kl_full(ctx, dt, ctx->default_device, ndim, shape, value, out);
}

keel_status keel_zeros(keel_ctx *ctx, keel_dtype dt, int ndim, const int64_t *shape,
                       keel_tensor **out) {
  return keel_full(ctx, dt, ndim, shape, 0.0, out);
}

keel_status keel_ones(keel_ctx *ctx, keel_dtype dt, int ndim, const int64_t *shape,
                      keel_tensor **out) {
  return keel_full(ctx, dt, ndim, shape, 1.0, out);
}

keel_status keel_from_doubles(keel_ctx *ctx, keel_dtype dt, int ndim, const int64_t *shape,
                              const double *data, keel_tensor **out) {
  keel_status st = host_new(ctx, dt, ndim, shape, out);
  char *p;
  if (st) return st;
  p = (char *)kl_data(*out);
  for (int64_t i = 0; i < (*out)->numel; i++)
    kl_store(p + i * (int64_t)kl_dtype_size[dt], dt, data[i]);
  return to_default(ctx, out);
}

keel_status keel_arange(keel_ctx *ctx, keel_dtype dt, double start, double end, double step,
                        keel_tensor **out) {
  double count;
  int64_t n;
  keel_status st;
  char *p;
  *out = NULL;
  if (step == 0 || !isfinite(start) || !isfinite(end) || !isfinite(step))
    return kl_error(ctx, KEEL_ERR_ARG, "arange: step must be non-zero and bounds finite");
  count = ceil((end - start) / step);
  if (count > 1e12) return kl_error(ctx, KEEL_ERR_ARG, "arange: too many elements");
  n = count > 0 ? (int64_t)count : 0;
  if ((st = host_new(ctx, dt, 1, &n, out))) return st;
  p = (char *)kl_data(*out);
  for (int64_t i = 0; i < n; i++) kl_store(p + i * (int64_t)kl_dtype_size[dt], dt, start + (double)i * step);
  return to_default(ctx, out);
}

keel_status keel_linspace(keel_ctx *ctx, keel_dtype dt, double start, double end, int64_t n,
                          keel_tensor **out) {
  keel_status st;
  char *p;
  *out = NULL;
  if (n < 0) return kl_error(ctx, KEEL_ERR_ARG, "linspace: number of points must be >= 0, got %lld", (long long)n);
  if ((st = host_new(ctx, dt, 1, &n, out))) return st;
  p = (char *)kl_data(*out);
  for (int64_t i = 0; i < n; i++) {
    /* symmetric formula, as torch: exact at both ends */
    double v = n == 1 ? start
             : i < n / 2 ? start + (end - start) / (double)(n - 1) * (double)i
                         : end - (end - start) / (double)(n - 1) * (double)(n - 1 - i);
    kl_store(p + i * (int64_t)kl_dtype_size[dt], dt, v);
  }
  return to_default(ctx, out);
}

keel_status keel_eye(keel_ctx *ctx, keel_dtype dt, int64_t n, int64_t m, keel_tensor **out) {
  int64_t shape[2] = {n, m < 0 ? n : m};
  keel_status st = host_new(ctx, dt, 2, shape, out);
  char *p;
  if (st) return st;
  if ((st = kl_cpu_backend.fill(ctx, *out, 0.0))) { kl_release(out); return st; }
  p = (char *)kl_data(*out);
  for (int64_t i = 0; i < shape[0] && i < shape[1]; i++)
    kl_store(p + (i * shape[1] + i) * (int64_t)kl_dtype_size[dt], dt, 1.0);
  return to_default(ctx, out);
}

/* }====================================================================== */

/* {======================================================================
** Random fills: generated in order on the host so that a seed gives the
** same numbers on every device and thread count.
** ======================================================================= */

static keel_status random_fill(keel_ctx *ctx, const char *fn, keel_tensor *t, int normal,
                               double a, double b) {
  int64_t idx[KEEL_MAX_DIMS] = {0};
  size_t es = kl_dtype_size[t->dtype];
  keel_status st = kl_check_float(ctx, fn, t);
  double spare = 0;
  int have_spare = 0;
  if (st) return st;
  if ((st = kl_check_writable(ctx, fn, t))) return st;
  if (t->storage->device != KEEL_CPU) {
    /* drawn on the host in the same order, then copied: the same numbers
    ** as a CPU tensor from the same seed */
    keel_tensor *h, *d;
    if ((st = kl_new(ctx, t->dtype, KEEL_CPU, t->ndim, t->shape, &h))) return st;
    if (!(st = random_fill(ctx, fn, h, normal, a, b)) &&
        !(st = kl_transfer(ctx, h, t->storage->device, t->dtype, &d))) {
      st = kl_backend_for(ctx, t->storage->device)->copy(ctx, t, d);
      keel_tensor_release(d);
    }
    keel_tensor_release(h);
    if (!st) t->storage->version++;
    return st;
  }
  for (int64_t k = 0; k < t->numel; k++) {
    int64_t off = t->offset;
    double v;
    for (int i = 0; i < t->ndim; i++) off += idx[i] * t->stride[i];
    if (!normal) {
      v = a + (b - a) * kl_rng_uniform(ctx);
    } else if (have_spare) {
      v = a + b * spare;
      have_spare = 0;
    } else {
      /* Marsaglia polar method: two normals per accepted pair */
      double u, w, s;
      do {
        u = 2.0 * kl_rng_uniform(ctx) - 1.0;
        w = 2.0 * kl_rng_uniform(ctx) - 1.0;
        s = u * u + w * w;
      } while (s >= 1.0 || s == 0.0);
      s = sqrt(-2.0 * log(s) / s);
      spare = w * s;
      have_spare = 1;
      v = a + b * u * s;
    }
    kl_store((char *)t->storage->data + off * (int64_t)es, t->dtype, v);
    for (int i = t->ndim - 1; i >= 0; i--) {
      if (++idx[i] < t->shape[i]) break;
      idx[i] = 0;
    }
  }
  t->storage->version++;
  return KEEL_OK;
}

keel_status keel_uniform_(keel_ctx *ctx, keel_tensor *t, double lo, double hi) {
  if (!(lo <= hi)) return kl_error(ctx, KEEL_ERR_ARG, "uniform_: expected lo <= hi, got %g and %g", lo, hi);
  return random_fill(ctx, "uniform_", t, 0, lo, hi);
}

keel_status keel_normal_(keel_ctx *ctx, keel_tensor *t, double mean, double std) {
  if (!(std >= 0)) return kl_error(ctx, KEEL_ERR_ARG, "normal_: std must be >= 0, got %g", std);
  return random_fill(ctx, "normal_", t, 1, mean, std);
}

keel_status keel_rand(keel_ctx *ctx, keel_dtype dt, int ndim, const int64_t *shape,
                      keel_tensor **out) {
  keel_status st = kl_new(ctx, dt, ctx->default_device, ndim, shape, out);
  if (st) return st;
  if ((st = random_fill(ctx, "rand", *out, 0, 0.0, 1.0))) kl_release(out);
  return st;
}

keel_status keel_randn(keel_ctx *ctx, keel_dtype dt, int ndim, const int64_t *shape,
                       keel_tensor **out) {
  keel_status st = kl_new(ctx, dt, ctx->default_device, ndim, shape, out);
  if (st) return st;
  if ((st = random_fill(ctx, "randn", *out, 1, 0.0, 1.0))) kl_release(out);
  return st;
}

/* }====================================================================== */
