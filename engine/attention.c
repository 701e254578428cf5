/*
** attention.c: fused scaled-dot-product attention (keel_sdpa in keel.h)
** and its backward rule.
**
** Why an op and not matmul + softmax + matmul: the composed form keeps the
** [..., L, S] scores and weights for backward (twice the size of the score
** matrix per head), while this op keeps only the output and one
** logsumexp per query row, and backward recomputes the weights tile by
** tile (the flash-attention scheme; backend_cpu_attn.c explains it).
**
** Node layout:
**   inputs  0 q, 1 k, 2 v, 3 bias (absent: NULL)
**   saved   0 q, 1 k, 2 v (broadcast to the batch shape, contiguous),
**           3 out, 4 lse [B, L], 5 the bias seen as [batch..., L, S]
**   iparam  0 causal, 1 B, 2 L, 3 S, 4 E, 5 Ev, 6 the dropout seed
**   fparam  0 scale, 1 dropout p
** Gradients of broadcast inputs come out at the batch shape; autograd sums
** them to the inputs' shapes.
**
** Dropout draws one seed from the context's RNG per call; the kernels
** derive each weight's keep decision from (seed, index), so backward
** replays the mask from the seed alone and both backends drop the same
** weights.
**
** On CUDA, head sizes above the kernels' limit (keel_cuda.h) run a
** composed path of recorded device ops instead (same masks, same
** results; it materialises the scores, and a fully masked row's NaN
** reaches the gradients there as in any composed softmax).
*/
#include <math.h>
#include <string.h>
#include "keel_impl.h"
#include "keel_cuda.h"

#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

static const char *const FN = "scaled_dot_product_attention";

/* t broadcast to shape (ndim dims) and contiguous: t itself (retained)
** when it already is, else a copy outside the graph. */
static keel_status dense_as(keel_ctx *ctx, keel_tensor *t, int ndim, const int64_t *shape, keel_tensor **out) {
  keel_tensor *view = NULL;
  keel_status st;
  *out = NULL;
  if (t->ndim == ndim && !memcmp(t->shape, shape, sizeof(int64_t) * (size_t)ndim) && kl_is_contiguous(t)) {
    *out = keel_tensor_retain(t);
    return KEEL_OK;
  }
  if ((st = kl_broadcast_to(ctx, t, ndim, shape, &view))) return st;
  if ((st = kl_new(ctx, t->dtype, t->storage->device, ndim, shape, out)) == KEEL_OK &&
      (st = kl_backend_for(ctx, t->storage->device)->copy(ctx, *out, view)))
    kl_release(out);
  keel_tensor_release(view);
  return st;
}

/* The largest head size (E or Ev) the device's fused kernels take. */
static int64_t head_limit(keel_device dev, keel_dtype dt) {
  if (dev != KEEL_CUDA) return INT64_MAX;
  return dt == KEEL_F64 ? KC_SDPA_MAX_HEAD_F64 : KC_SDPA_MAX_HEAD_F32;
}

/* {======================================================================
** The composed path (CUDA head sizes above the kernels' limit)
** ======================================================================= */

/* A CPU tensor filled by the same rules the kernels apply, moved to dev:
** the causal mask [L, S] (0 or -inf) when drop == 0, else the dropout
** scales [batch..., L, S] (0 or 1/(1-p)). */
static keel_status host_mask(keel_ctx *ctx, const kl_sdpa_args *a, int drop, int ndim, const int64_t *shape,
                             keel_device dev, keel_dtype dt, keel_tensor **out) {
  keel_tensor *h = NULL;
  keel_status st;
  double keep = a->p < 1 ? 1.0 / (1.0 - a->p) : 0.0;
  *out = NULL;
  if ((st = kl_new(ctx, KEEL_F64, KEEL_CPU, ndim, shape, &h))) return st;
  {
    double *m = (double *)kl_data(h);
    int64_t n = h->numel;
    for (int64_t x = 0; x < n; x++) {
      int64_t j = x % a->S, i = (x / a->S) % a->L;
      if (drop) m[x] = kl_sdpa_drop(a->seed, (uint64_t)x, a->p) ? 0.0 : keep;
      else m[x] = j > i ? -INFINITY : 0.0;
    }
  }
  st = kl_transfer(ctx, h, dev, dt, out);
  keel_tensor_release(h);
  return st;
}

static keel_status composed(keel_ctx *ctx, const kl_sdpa_args *a, keel_tensor *q, keel_tensor *k, keel_tensor *v,
                            keel_tensor *bias, int nb, const int64_t *full, keel_tensor **out) {
  keel_device dev = q->storage->device;
  keel_tensor *kt = NULL, *s = NULL, *t = NULL, *m = NULL, *w = NULL;
  int64_t ls[2];
  keel_status st;
  *out = NULL;
  TRY(keel_transpose(ctx, k, -2, -1, &kt));
  TRY(keel_matmul(ctx, q, kt, &t));
  TRY(keel_binary_scalar(ctx, KEEL_BIN_MUL, t, a->scale, 0, &s));
  kl_release(&t);
  if (a->causal) {
    ls[0] = a->L; ls[1] = a->S;
    TRY(host_mask(ctx, a, 0, 2, ls, dev, q->dtype, &m));
    TRY(keel_add(ctx, s, m, &t));
    kl_release(&m);
    keel_tensor_release(s); s = t; t = NULL;
  }
  if (bias) {
    TRY(keel_add(ctx, s, bias, &t));
    keel_tensor_release(s); s = t; t = NULL;
  }
  TRY(keel_softmax(ctx, s, -1, &w));
  if (a->p > 0) {
    TRY(host_mask(ctx, a, 1, nb + 2, full, dev, q->dtype, &m));
    TRY(keel_mul(ctx, w, m, &t));
    keel_tensor_release(w); w = t; t = NULL;
  }
  st = keel_matmul(ctx, w, v, out);
done:
  keel_tensor_release(kt);
  keel_tensor_release(s);
  keel_tensor_release(t);
  keel_tensor_release(m);
  keel_tensor_release(w);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** The op
** ======================================================================= */

static keel_status check_input(keel_ctx *ctx, const char *what, const keel_tensor *t, const keel_tensor *q) {
  char b[128];
  keel_status st;
  if (!t) return kl_error(ctx, KEEL_ERR_ARG, "%s: %s is required", FN, what);
  if ((st = kl_check_same_ctx(ctx, FN, t))) return st;
  if (t->dtype != KEEL_F32 && t->dtype != KEEL_F64)
    return kl_error(ctx, KEEL_ERR_TYPE, "%s: %s has dtype %s, expected float32 or float64", FN, what,
                    keel_dtype_name(t->dtype));
  if (t->ndim < 2)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %s has shape %s, expected at least 2 dimensions", FN, what,
                    kl_shape_str(b, sizeof b, t->ndim, t->shape));
  if (q && t->dtype != q->dtype)
    return kl_error(ctx, KEEL_ERR_TYPE, "%s: %s has dtype %s, the query %s; expected one dtype", FN, what,
                    keel_dtype_name(t->dtype), keel_dtype_name(q->dtype));
  if (q && t->storage->device != q->storage->device)
    return kl_error(ctx, KEEL_ERR_DEVICE, "%s: %s is on %s, the query on %s; expected one device", FN, what,
                    keel_device_name(t->storage->device), keel_device_name(q->storage->device));
  return KEEL_OK;
}

keel_status keel_sdpa(keel_ctx *ctx, keel_tensor *q, keel_tensor *k, keel_tensor *v, keel_tensor *bias,
                      int is_causal, double scale, double dropout_p, keel_tensor **out) {
  int nb = 0, n1;
  int64_t batch[KEEL_MAX_DIMS], full[KEEL_MAX_DIMS], B = 1, L, S, E, Ev;
  char b1[128], b2[128];
  const kl_backend *be;
  kl_sdpa_args a;
  keel_tensor *qd = NULL, *kd = NULL, *vd = NULL, *bc = NULL, *bv = NULL, *o = NULL, *lse = NULL;
  keel_status st;
  *out = NULL;
  if ((st = check_input(ctx, "query", q, NULL)) || (st = check_input(ctx, "key", k, q)) ||
      (st = check_input(ctx, "value", v, q)))
    return st;
  L = q->shape[q->ndim - 2]; E = q->shape[q->ndim - 1];
  S = k->shape[k->ndim - 2]; Ev = v->shape[v->ndim - 1];
  if (k->shape[k->ndim - 1] != E)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: query %s and key %s differ in the last dimension (embedding size)",
                    FN, kl_shape_str(b1, sizeof b1, q->ndim, q->shape), kl_shape_str(b2, sizeof b2, k->ndim, k->shape));
  if (v->shape[v->ndim - 2] != S)
    return kl_error(ctx, KEEL_ERR_SHAPE,
                    "%s: key %s and value %s differ in the sequence dimension (second to last)", FN,
                    kl_shape_str(b1, sizeof b1, k->ndim, k->shape), kl_shape_str(b2, sizeof b2, v->ndim, v->shape));
  if ((st = kl_broadcast_shape(ctx, FN, q->ndim - 2, q->shape, k->ndim - 2, k->shape, &n1, batch)) ||
      (st = kl_broadcast_shape(ctx, FN, n1, batch, v->ndim - 2, v->shape, &nb, batch)))
    return st;
  if (nb + 2 > KEEL_MAX_DIMS)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: more than %d dimensions", FN, KEEL_MAX_DIMS);
  for (int d = 0; d < nb; d++) { B *= batch[d]; full[d] = batch[d]; }
  full[nb] = L; full[nb + 1] = S;
  if (!(dropout_p >= 0 && dropout_p <= 1))
    return kl_error(ctx, KEEL_ERR_ARG, "%s: dropout_p must be in [0, 1], got %g", FN, dropout_p);
  if (!isfinite(scale)) return kl_error(ctx, KEEL_ERR_ARG, "%s: scale must be finite, got %g", FN, scale);
  if (L > 0x7fffffff || S > 0x7fffffff || E > 0x7fffffff || Ev > 0x7fffffff)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: sizes above 2^31 are not supported", FN);
  if (bias) {
    int nd;
    int64_t bs[KEEL_MAX_DIMS];
    if ((st = kl_check_same_ctx(ctx, FN, bias))) return st;
    if (bias->dtype != KEEL_F32 && bias->dtype != KEEL_F64)
      return kl_error(ctx, KEEL_ERR_TYPE, "%s: bias (attn_mask) has dtype %s, expected a float dtype", FN,
                      keel_dtype_name(bias->dtype));
    if (bias->storage->device != q->storage->device)
      return kl_error(ctx, KEEL_ERR_DEVICE, "%s: bias (attn_mask) is on %s, the query on %s; expected one device",
                      FN, keel_device_name(bias->storage->device), keel_device_name(q->storage->device));
    if (kl_broadcast_shape(ctx, FN, bias->ndim, bias->shape, nb + 2, full, &nd, bs) != KEEL_OK || nd != nb + 2 ||
        memcmp(bs, full, sizeof(int64_t) * (size_t)nd))
      return kl_error(ctx, KEEL_ERR_SHAPE, "%s: bias (attn_mask) has shape %s, expected one that broadcasts to %s",
                      FN, kl_shape_str(b1, sizeof b1, bias->ndim, bias->shape),
                      kl_shape_str(b2, sizeof b2, nb + 2, full));
  }
  be = kl_backend_for(ctx, q->storage->device);
  if (!be || !be->sdpa_forward || !be->sdpa_backward)
    return kl_error(ctx, KEEL_ERR_DEVICE, "%s: not available on the %s backend", FN,
                    keel_device_name(q->storage->device));

  memset(&a, 0, sizeof a);
  a.B = B; a.L = L; a.S = S; a.E = E; a.Ev = Ev;
  a.scale = scale; a.p = dropout_p; a.causal = is_causal != 0;
  /* one draw per call, whatever the device: seeding keel repeats the mask */
  a.seed = dropout_p > 0 ? kl_rng_next(ctx) : 0;
  /* a bias of the other float dtype: a recorded cast, so gradients reach it */
  if (bias && bias->dtype != q->dtype) TRY(keel_to_dtype(ctx, bias, q->dtype, &bc));
  else if (bias) bc = keel_tensor_retain(bias);

  if (E > head_limit(q->storage->device, q->dtype) || Ev > head_limit(q->storage->device, q->dtype)) {
    st = composed(ctx, &a, q, k, v, bc, nb, full, out);
    goto done;
  }

  {
    int64_t s[KEEL_MAX_DIMS];
    memcpy(s, batch, sizeof(int64_t) * (size_t)nb);
    s[nb] = L; s[nb + 1] = E;
    TRY(dense_as(ctx, q, nb + 2, s, &qd));
    s[nb] = S;
    TRY(dense_as(ctx, k, nb + 2, s, &kd));
    s[nb + 1] = Ev;
    TRY(dense_as(ctx, v, nb + 2, s, &vd));
    s[nb] = L;
    TRY(kl_new(ctx, q->dtype, q->storage->device, nb + 2, s, &o));
    s[0] = B; s[1] = L;
    TRY(kl_new(ctx, q->dtype, q->storage->device, 2, s, &lse));
  }
  if (bc) TRY(kl_broadcast_to(ctx, bc, nb + 2, full, &bv));
  a.q = qd; a.k = kd; a.v = vd; a.bias = bv;
  a.out = o; a.lse = lse;
  TRY(be->sdpa_forward(ctx, &a));
  {
    keel_tensor *in[4] = {q, k, v, bc};
    if (kl_needs_grad(ctx, 4, in)) {
      kl_node *n = kl_record(ctx, KL_OP_SDPA, 4, in, o);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", FN); goto done; }
      n->iparam[0] = a.causal;
      n->iparam[1] = B; n->iparam[2] = L; n->iparam[3] = S; n->iparam[4] = E; n->iparam[5] = Ev;
      memcpy(&n->iparam[6], &a.seed, sizeof a.seed);
      n->fparam[0] = scale;
      n->fparam[1] = dropout_p;
      TRY(kl_save(ctx, n, 0, qd));
      TRY(kl_save(ctx, n, 1, kd));
      TRY(kl_save(ctx, n, 2, vd));
      TRY(kl_save(ctx, n, 3, o));
      TRY(kl_save(ctx, n, 4, lse));
      if (bv) TRY(kl_save(ctx, n, 5, bv));
    }
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(qd);
  keel_tensor_release(kd);
  keel_tensor_release(vd);
  keel_tensor_release(bc);
  keel_tensor_release(bv);
  keel_tensor_release(o);
  keel_tensor_release(lse);
  return st;
}

/* dq, dk, dv at the batch shape (autograd sums broadcast ones), d(bias)
** at [batch..., L, S] (summed likewise to the bias's shape). */
KL_BACKWARD(kl_sdpa_backward) {
  kl_sdpa_args a;
  keel_tensor *g = NULL, *gd = NULL;
  const keel_tensor *q = n->saved[0];
  const kl_backend *be = kl_backend_for(ctx, q->storage->device);
  int nb = n->out_ndim - 2;
  int64_t s[KEEL_MAX_DIMS];
  keel_status st = KEEL_OK;
  memset(&a, 0, sizeof a);
  a.causal = (int)n->iparam[0];
  a.B = n->iparam[1]; a.L = n->iparam[2]; a.S = n->iparam[3]; a.E = n->iparam[4]; a.Ev = n->iparam[5];
  memcpy(&a.seed, &n->iparam[6], sizeof a.seed);
  a.scale = n->fparam[0];
  a.p = n->fparam[1];
  a.q = q; a.k = n->saved[1]; a.v = n->saved[2];
  a.out = n->saved[3]; a.lse = n->saved[4]; a.bias = n->saved[5];
  if (gout->dtype != q->dtype) TRY(keel_to_dtype(ctx, gout, q->dtype, &g));
  else g = keel_tensor_retain(gout);
  TRY(dense_as(ctx, g, n->out_ndim, n->out_shape, &gd));
  a.gout = gd;
  memcpy(s, n->out_shape, sizeof(int64_t) * (size_t)nb);
  {
    /* each input's gradient: [batch..., rows, cols] */
    const int64_t rc[4][2] = {{a.L, a.E}, {a.S, a.E}, {a.S, a.Ev}, {a.L, a.S}};
    keel_tensor **dst[4] = {&a.dq, &a.dk, &a.dv, &a.dbias};
    for (int i = 0; i < 4; i++) {
      if (!KL_NEEDS(n, i)) continue;
      s[nb] = rc[i][0];
      s[nb + 1] = rc[i][1];
      TRY(kl_new(ctx, q->dtype, q->storage->device, nb + 2, s, &gin[i]));
      *dst[i] = gin[i];
    }
  }
  st = be->sdpa_backward(ctx, &a);
done:
  if (st) for (int i = 0; i < 4; i++) kl_release(&gin[i]);
  keel_tensor_release(g);
  keel_tensor_release(gd);
  return st;
}

/* }====================================================================== */
