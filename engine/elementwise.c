/*
** elementwise.c: binary and unary math with broadcasting, clamp, where,
** dtype casts and copies, the in-place variants, and their backward rules.
**
** Backward rules are written with the engine's own ops (autograd runs
** them with grad mode off); reducing a gradient over broadcast dimensions
** and casting it back to the input's dtype is done once, by the tape.
*/
#include <math.h>
#include <stdio.h>
#include <string.h>
#include "keel_impl.h"

static const char *binop_name[KEEL_BINOP_COUNT] = {
  "add", "sub", "mul", "div", "pow", "maximum", "minimum",
  "eq", "ne", "lt", "le", "gt", "ge",
};
static const int binop_node[KEEL_BINOP_COUNT] = {
  KL_OP_ADD, KL_OP_SUB, KL_OP_MUL, KL_OP_DIV, KL_OP_POW, KL_OP_MAXIMUM, KL_OP_MINIMUM,
  -1, -1, -1, -1, -1, -1,
};
static const char *unop_name[KEEL_UNOP_COUNT] = {
  "neg", "exp", "log", "sqrt", "abs", "relu", "sigmoid", "tanh", "sign",
};
static const int unop_node[KEEL_UNOP_COUNT] = {
  KL_OP_NEG, KL_OP_EXP, KL_OP_LOG, KL_OP_SQRT, KL_OP_ABS, KL_OP_RELU, KL_OP_SIGMOID,
  KL_OP_TANH, -1,
};

static const kl_backend *backend(keel_ctx *ctx, const keel_tensor *t) {
  return kl_backend_for(ctx, t->storage->device);
}

#define same_device kl_check_device

/*
** t seen with dtype dt through the broadcast shape, in *view (a stack
** value). When the dtype differs, a converted copy is made and returned in
** *owned for the caller to release.
*/
static keel_status operand(keel_ctx *ctx, keel_tensor *t, keel_dtype dt, int ndim, const int64_t *shape,
                           keel_tensor *view, keel_tensor **owned) {
  keel_status st;
  *owned = NULL;
  if (t->dtype != dt) {
    if ((st = kl_new_like(ctx, t, dt, owned))) return st;
    if ((st = backend(ctx, t)->copy(ctx, *owned, t))) { kl_release(owned); return st; }
    t = *owned;
  }
  kl_broadcast_view(t, ndim, shape, view);
  return KEEL_OK;
}

/* A 0-d tensor on dev: a number taking part in an op on dev's tensors. */
static keel_status scalar_tensor(keel_ctx *ctx, keel_dtype dt, keel_device dev, double s, keel_tensor **out) {
  keel_status st;
  if (dev != KEEL_CPU) return kl_full(ctx, dt, dev, 0, NULL, s, out);
  if ((st = kl_new(ctx, dt, KEEL_CPU, 0, NULL, out))) return st;
  kl_store(kl_data(*out), dt, s);
  return KEEL_OK;
}

/* {======================================================================
** Binary
** ======================================================================= */

static keel_dtype binary_dtype(keel_binop op, keel_dtype a, keel_dtype b) {
  keel_dtype dt = kl_promote(a, b);
  if (dt == KEEL_I64 && op == KEEL_BIN_DIV) dt = KEEL_F32;  /* true division, as torch */
  return dt;
}

keel_status keel_binary(keel_ctx *ctx, keel_binop op, keel_tensor *a, keel_tensor *b,
                        keel_tensor **out) {
  const char *fn = (unsigned)op < KEEL_BINOP_COUNT ? binop_name[op] : "binary";
  int ndim;
  int64_t shape[KEEL_MAX_DIMS];
  keel_tensor va, vb, *ca = NULL, *cb = NULL, *o = NULL;
  keel_dtype dt;
  keel_status st;
  *out = NULL;
  if ((unsigned)op >= KEEL_BINOP_COUNT) return kl_error(ctx, KEEL_ERR_ARG, "binary: unknown op %d", (int)op);
  if ((st = kl_check_same_ctx(ctx, fn, a)) || (st = kl_check_same_ctx(ctx, fn, b))) return st;
  if ((st = same_device(ctx, fn, a, b))) return st;
  dt = binary_dtype(op, a->dtype, b->dtype);
  if (dt == KEEL_I64 && op == KEEL_BIN_POW)
    return kl_error(ctx, KEEL_ERR_TYPE, "pow: expected float tensors, got int64; convert with :float()");
  if ((st = kl_broadcast_shape(ctx, fn, a->ndim, a->shape, b->ndim, b->shape, &ndim, shape))) return st;
  if ((st = kl_new(ctx, dt, a->storage->device, ndim, shape, &o))) return st;
  if ((st = operand(ctx, a, dt, ndim, shape, &va, &ca)) || (st = operand(ctx, b, dt, ndim, shape, &vb, &cb)))
    goto fail;
  if ((st = backend(ctx, a)->binary(ctx, op, o, &va, &vb))) goto fail;
  if (binop_node[op] >= 0) {
    keel_tensor *in[2] = {a, b};
    if (kl_needs_grad(ctx, 2, in)) {
      kl_node *n = kl_record(ctx, binop_node[op], 2, in, o);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto fail; }
      if (op != KEEL_BIN_ADD && op != KEEL_BIN_SUB) {
        if ((st = kl_save(ctx, n, 0, a)) || (st = kl_save(ctx, n, 1, b))) goto fail;
        if (op == KEEL_BIN_POW && (st = kl_save(ctx, n, 2, o))) goto fail;
      }
    }
  }
  keel_tensor_release(ca);
  keel_tensor_release(cb);
  *out = o;
  return KEEL_OK;
fail:
  keel_tensor_release(ca);
  keel_tensor_release(cb);
  keel_tensor_release(o);
  return st;
}

keel_status keel_binary_scalar(keel_ctx *ctx, keel_binop op, keel_tensor *a, double s,
                               int scalar_first, keel_tensor **out) {
  keel_tensor *sc;
  keel_dtype dt = a->dtype;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "binary", a))) return st;
  /* a Lua number keeps the tensor's dtype, except a fraction with int64 */
  if (dt == KEEL_I64 && s != floor(s)) dt = KEEL_F32;
  if ((st = scalar_tensor(ctx, dt, a->storage->device, s, &sc))) return st;
  st = scalar_first ? keel_binary(ctx, op, sc, a, out) : keel_binary(ctx, op, a, sc, out);
  keel_tensor_release(sc);
  return st;
}

keel_status keel_add(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, keel_tensor **out) {
  return keel_binary(ctx, KEEL_BIN_ADD, a, b, out);
}
keel_status keel_sub(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, keel_tensor **out) {
  return keel_binary(ctx, KEEL_BIN_SUB, a, b, out);
}
keel_status keel_mul(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, keel_tensor **out) {
  return keel_binary(ctx, KEEL_BIN_MUL, a, b, out);
}
keel_status keel_div(keel_ctx *ctx, keel_tensor *a, keel_tensor *b, keel_tensor **out) {
  return keel_binary(ctx, KEEL_BIN_DIV, a, b, out);
}

/* }====================================================================== */

/* {======================================================================
** Unary, clamp, where
** ======================================================================= */

keel_status keel_unary(keel_ctx *ctx, keel_unop op, keel_tensor *a, keel_tensor **out) {
  const char *fn = (unsigned)op < KEEL_UNOP_COUNT ? unop_name[op] : "unary";
  keel_tensor *o;
  keel_status st;
  *out = NULL;
  if ((unsigned)op >= KEEL_UNOP_COUNT) return kl_error(ctx, KEEL_ERR_ARG, "unary: unknown op %d", (int)op);
  if ((st = kl_check_same_ctx(ctx, fn, a))) return st;
  if (a->dtype == KEEL_I64 && op != KEEL_UN_NEG && op != KEEL_UN_ABS && op != KEEL_UN_RELU &&
      op != KEEL_UN_SIGN)
    return kl_error(ctx, KEEL_ERR_TYPE, "%s: expected a float tensor, got int64; convert with :float()", fn);
  if ((st = kl_new_like(ctx, a, a->dtype, &o))) return st;
  if ((st = backend(ctx, a)->unary(ctx, op, o, a))) { keel_tensor_release(o); return st; }
  if (unop_node[op] >= 0 && kl_needs_grad(ctx, 1, &a)) {
    kl_node *n = kl_record(ctx, unop_node[op], 1, &a, o);
    if (!n) { keel_tensor_release(o); return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); }
    /* exp, sqrt, relu, sigmoid, tanh differentiate through their output */
    switch (op) {
      case KEEL_UN_LOG: case KEEL_UN_ABS: st = kl_save(ctx, n, 0, a); break;
      case KEEL_UN_NEG: break;
      default: st = kl_save(ctx, n, 0, o); break;
    }
    if (st) { keel_tensor_release(o); return st; }
  }
  *out = o;
  return KEEL_OK;
}

keel_status keel_clamp(keel_ctx *ctx, keel_tensor *a, double lo, double hi, keel_tensor **out) {
  keel_tensor *o;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "clamp", a))) return st;
  if (isnan(lo) || isnan(hi) || lo > hi)
    return kl_error(ctx, KEEL_ERR_ARG, "clamp: expected min <= max, got %g and %g", lo, hi);
  if ((st = kl_new_like(ctx, a, a->dtype, &o))) return st;
  if ((st = backend(ctx, a)->clamp(ctx, o, a, lo, hi))) { keel_tensor_release(o); return st; }
  if (kl_needs_grad(ctx, 1, &a)) {
    kl_node *n = kl_record(ctx, KL_OP_CLAMP, 1, &a, o);
    if (!n || kl_save(ctx, n, 0, a)) {
      keel_tensor_release(o);
      return kl_error(ctx, KEEL_ERR_NOMEM, "clamp: out of memory");
    }
    n->fparam[0] = lo;
    n->fparam[1] = hi;
  }
  *out = o;
  return KEEL_OK;
}

keel_status keel_where(keel_ctx *ctx, keel_tensor *cond, keel_tensor *a, keel_tensor *b,
                       keel_tensor **out) {
  int n1, ndim;
  int64_t s1[KEEL_MAX_DIMS], shape[KEEL_MAX_DIMS];
  keel_tensor vc, va, vb, *ca = NULL, *cb = NULL, *o = NULL;
  keel_dtype dt;
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "where", cond)) || (st = kl_check_same_ctx(ctx, "where", a)) ||
      (st = kl_check_same_ctx(ctx, "where", b)))
    return st;
  if ((st = same_device(ctx, "where", a, b)) || (st = same_device(ctx, "where", a, cond))) return st;
  if ((st = kl_broadcast_shape(ctx, "where", cond->ndim, cond->shape, a->ndim, a->shape, &n1, s1)) ||
      (st = kl_broadcast_shape(ctx, "where", n1, s1, b->ndim, b->shape, &ndim, shape)))
    return st;
  dt = kl_promote(a->dtype, b->dtype);
  if ((st = kl_new(ctx, dt, a->storage->device, ndim, shape, &o))) return st;
  kl_broadcast_view(cond, ndim, shape, &vc);
  if ((st = operand(ctx, a, dt, ndim, shape, &va, &ca)) || (st = operand(ctx, b, dt, ndim, shape, &vb, &cb)) ||
      (st = backend(ctx, a)->where(ctx, o, &vc, &va, &vb)))
    goto fail;
  {
    keel_tensor *in[3] = {cond, a, b};
    if (kl_needs_grad(ctx, 3, in)) {
      kl_node *n = kl_record(ctx, KL_OP_WHERE, 3, in, o);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "where: out of memory"); goto fail; }
      if ((st = kl_save(ctx, n, 0, cond))) goto fail;
    }
  }
  keel_tensor_release(ca);
  keel_tensor_release(cb);
  *out = o;
  return KEEL_OK;
fail:
  keel_tensor_release(ca);
  keel_tensor_release(cb);
  keel_tensor_release(o);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Casts and copies
** ======================================================================= */

/* A contiguous copy of a with dtype dt, recorded as op when a needs grad. */
static keel_status copy_as(keel_ctx *ctx, keel_tensor *a, keel_dtype dt, int op, keel_tensor **out) {
  keel_tensor *o;
  keel_status st;
  *out = NULL;
  if ((st = kl_new_like(ctx, a, dt, &o))) return st;
  if ((st = backend(ctx, a)->copy(ctx, o, a))) { keel_tensor_release(o); return st; }
  if (dt != KEEL_I64 && kl_needs_grad(ctx, 1, &a) && !kl_record(ctx, op, 1, &a, o)) {
    keel_tensor_release(o);
    return kl_error(ctx, KEEL_ERR_NOMEM, "copy: out of memory");
  }
  *out = o;
  return KEEL_OK;
}

keel_status keel_to_dtype(keel_ctx *ctx, keel_tensor *a, keel_dtype dt, keel_tensor **out) {
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "to", a))) return st;
  if ((unsigned)dt >= KEEL_DTYPE_COUNT) return kl_error(ctx, KEEL_ERR_TYPE, "to: unknown dtype %d", (int)dt);
  if (dt == a->dtype) { *out = keel_tensor_retain(a); return KEEL_OK; }
  return copy_as(ctx, a, dt, KL_OP_CAST, out);
}

keel_status keel_contiguous(keel_ctx *ctx, keel_tensor *a, keel_tensor **out) {
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "contiguous", a))) return st;
  if (kl_is_contiguous(a)) { *out = keel_tensor_retain(a); return KEEL_OK; }
  return copy_as(ctx, a, a->dtype, KL_OP_COPY, out);
}

keel_status keel_clone(keel_ctx *ctx, keel_tensor *a, keel_tensor **out) {
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "clone", a))) return st;
  return copy_as(ctx, a, a->dtype, KL_OP_COPY, out);
}

keel_status keel_detach(keel_ctx *ctx, keel_tensor *a, keel_tensor **out) {
  keel_status st;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "detach", a))) return st;
  return kl_alias(ctx, a, a->ndim, a->shape, a->stride, a->offset, out);
}

/* }====================================================================== */

/* {======================================================================
** In place. Not recorded on the tape, so refused where autograd would
** need the old values.
** ======================================================================= */

/* src viewed with dst's shape and dtype; copied first when it shares
** memory with dst in another layout (the write would race the read). */
static keel_status inplace_operand(keel_ctx *ctx, const char *fn, keel_tensor *dst, keel_tensor *src,
                                   keel_tensor *view, keel_tensor **owned) {
  int ndim;
  int64_t shape[KEEL_MAX_DIMS];
  keel_tensor *tmp = NULL;
  keel_status st;
  char b1[128], b2[128];
  *owned = NULL;
  if ((st = kl_check_same_ctx(ctx, fn, src)) || (st = same_device(ctx, fn, dst, src))) return st;
  if ((st = kl_broadcast_shape(ctx, fn, dst->ndim, dst->shape, src->ndim, src->shape, &ndim, shape)))
    return st;
  if (ndim != dst->ndim || memcmp(shape, dst->shape, sizeof(int64_t) * (size_t)ndim))
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: shape %s cannot be broadcast to the destination's %s", fn,
                    kl_shape_str(b1, sizeof b1, src->ndim, src->shape),
                    kl_shape_str(b2, sizeof b2, dst->ndim, dst->shape));
  if (src->storage == dst->storage &&
      !(src->offset == dst->offset && src->ndim == dst->ndim &&
        !memcmp(src->stride, dst->stride, sizeof(int64_t) * (size_t)dst->ndim))) {
    if ((st = kl_new_like(ctx, src, src->dtype, &tmp))) return st;
    if ((st = backend(ctx, src)->copy(ctx, tmp, src))) { keel_tensor_release(tmp); return st; }
    src = tmp;
  }
  st = operand(ctx, src, dst->dtype, dst->ndim, dst->shape, view, owned);
  if (!st && tmp && !*owned) *owned = tmp;   /* the view points into tmp: keep it */
  else keel_tensor_release(tmp);
  return st;
}

keel_status keel_binary_(keel_ctx *ctx, keel_binop op, keel_tensor *a, keel_tensor *b) {
  char fn[16];
  keel_tensor vb, *owned;
  keel_status st;
  if ((unsigned)op >= KEEL_BINOP_COUNT) return kl_error(ctx, KEEL_ERR_ARG, "binary_: unknown op %d", (int)op);
  snprintf(fn, sizeof fn, "%s_", binop_name[op]);
  if ((st = kl_check_same_ctx(ctx, fn, a)) || (st = kl_check_writable(ctx, fn, a))) return st;
  if (a->dtype == KEEL_I64 && (op == KEEL_BIN_DIV || op == KEEL_BIN_POW))
    return kl_error(ctx, KEEL_ERR_TYPE, "%s: not defined for int64 tensors; convert with :float()", fn);
  if ((st = inplace_operand(ctx, fn, a, b, &vb, &owned))) return st;
  st = backend(ctx, a)->binary(ctx, op, a, a, &vb);
  keel_tensor_release(owned);
  a->storage->version++;
  return st;
}

keel_status keel_binary_scalar_(keel_ctx *ctx, keel_binop op, keel_tensor *a, double s) {
  keel_tensor *sc;
  keel_status st;
  if ((st = kl_check_same_ctx(ctx, "binary_", a))) return st;
  if ((st = scalar_tensor(ctx, a->dtype, a->storage->device, s, &sc))) return st;
  st = keel_binary_(ctx, op, a, sc);
  keel_tensor_release(sc);
  return st;
}

keel_status keel_fill_(keel_ctx *ctx, keel_tensor *a, double v) {
  keel_status st;
  if ((st = kl_check_same_ctx(ctx, "fill_", a)) || (st = kl_check_writable(ctx, "fill_", a))) return st;
  st = backend(ctx, a)->fill(ctx, a, v);
  a->storage->version++;
  return st;
}

keel_status keel_copy_(keel_ctx *ctx, keel_tensor *dst, keel_tensor *src) {
  keel_tensor v, *owned, *moved = NULL;
  keel_status st;
  if ((st = kl_check_same_ctx(ctx, "copy_", dst)) || (st = kl_check_writable(ctx, "copy_", dst))) return st;
  if ((st = kl_check_same_ctx(ctx, "copy_", src))) return st;
  /* from another device: brought over first (in dst's dtype), so that the
  ** copy itself runs on one device, broadcasting included */
  if (src->storage->device != dst->storage->device) {
    if ((st = kl_transfer(ctx, src, dst->storage->device, dst->dtype, &moved))) return st;
    src = moved;
  }
  /* v points into moved (or owned): both live until the copy is done */
  st = inplace_operand(ctx, "copy_", dst, src, &v, &owned);
  if (!st) st = backend(ctx, dst)->copy(ctx, dst, &v);
  keel_tensor_release(moved);
  keel_tensor_release(owned);
  /* a failed copy may have written part of dst: its contents changed */
  dst->storage->version++;
  return st;
}

keel_status keel_clamp_(keel_ctx *ctx, keel_tensor *a, double lo, double hi) {
  keel_status st;
  if ((st = kl_check_same_ctx(ctx, "clamp_", a)) || (st = kl_check_writable(ctx, "clamp_", a))) return st;
  if (isnan(lo) || isnan(hi) || lo > hi)
    return kl_error(ctx, KEEL_ERR_ARG, "clamp_: expected min <= max, got %g and %g", lo, hi);
  st = backend(ctx, a)->clamp(ctx, a, a, lo, hi);
  a->storage->version++;
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Backward rules
** ======================================================================= */

/* Rules chain several ops; the first failure jumps to the cleanup. */
#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

KL_BACKWARD(kl_add_backward) {
  (void)ctx;
  if (KL_NEEDS(n, 0)) gin[0] = keel_tensor_retain(gout);
  if (KL_NEEDS(n, 1)) gin[1] = keel_tensor_retain(gout);
  return KEEL_OK;
}

KL_BACKWARD(kl_sub_backward) {
  if (KL_NEEDS(n, 0)) gin[0] = keel_tensor_retain(gout);
  if (KL_NEEDS(n, 1)) return keel_unary(ctx, KEEL_UN_NEG, gout, &gin[1]);
  return KEEL_OK;
}

KL_BACKWARD(kl_mul_backward) {
  keel_status st = KEEL_OK;
  if (KL_NEEDS(n, 0)) TRY(keel_mul(ctx, gout, n->saved[1], &gin[0]));
  if (KL_NEEDS(n, 1)) TRY(keel_mul(ctx, gout, n->saved[0], &gin[1]));
done:
  return st;
}

KL_BACKWARD(kl_div_backward) {
  keel_tensor *t = NULL, *u = NULL;
  keel_status st = KEEL_OK;
  TRY(keel_div(ctx, gout, n->saved[1], &t));           /* g / b */
  if (KL_NEEDS(n, 1)) {                                  /* -g a / b^2 */
    TRY(keel_mul(ctx, t, n->saved[0], &u));
    TRY(keel_div(ctx, u, n->saved[1], &gin[1]));
    kl_release(&u);
    TRY(keel_unary(ctx, KEEL_UN_NEG, gin[1], &u));
    keel_tensor_release(gin[1]);
    gin[1] = u;
    u = NULL;
  }
  if (KL_NEEDS(n, 0)) { gin[0] = t; t = NULL; }
done:
  keel_tensor_release(t);
  keel_tensor_release(u);
  return st;
}

/* d(a^b)/da = b a^(b-1) (0 where b == 0); d/db = a^b log a (0 where a == 0). */
KL_BACKWARD(kl_pow_backward) {
  keel_tensor *a = n->saved[0], *b = n->saved[1], *out = n->saved[2];
  keel_tensor *t1 = NULL, *t2 = NULL, *t3 = NULL, *zero = NULL, *mask = NULL;
  keel_status st = KEEL_OK;
  TRY(scalar_tensor(ctx, gout->dtype, gout->storage->device, 0.0, &zero));
  if (KL_NEEDS(n, 0)) {
    TRY(keel_binary_scalar(ctx, KEEL_BIN_SUB, b, 1.0, 0, &t1));   /* b - 1 */
    TRY(keel_binary(ctx, KEEL_BIN_POW, a, t1, &t2));             /* a^(b-1) */
    kl_release(&t1);
    TRY(keel_mul(ctx, t2, b, &t1));
    kl_release(&t2);
    TRY(keel_mul(ctx, t1, gout, &t2));
    kl_release(&t1);
    TRY(keel_binary_scalar(ctx, KEEL_BIN_EQ, b, 0.0, 0, &mask));
    TRY(keel_where(ctx, mask, zero, t2, &gin[0]));
    kl_release(&t2);
    kl_release(&mask);
  }
  if (KL_NEEDS(n, 1)) {
    TRY(keel_unary(ctx, KEEL_UN_LOG, a, &t1));
    TRY(keel_mul(ctx, t1, out, &t2));
    TRY(keel_mul(ctx, t2, gout, &t3));
    TRY(keel_binary_scalar(ctx, KEEL_BIN_EQ, a, 0.0, 0, &mask));
    TRY(keel_where(ctx, mask, zero, t3, &gin[1]));
  }
done:
  keel_tensor_release(t1);
  keel_tensor_release(t2);
  keel_tensor_release(t3);
  keel_tensor_release(zero);
  keel_tensor_release(mask);
  return st;
}

/* The gradient goes to the larger (smaller) input; ties split it evenly. */
static keel_status extremum_backward(keel_ctx *ctx, kl_node *n, keel_tensor *gout, keel_tensor **gin,
                                     keel_binop win) {
  keel_tensor *w = NULL, *eq = NULL, *half = NULL, *m = NULL;
  keel_status st = KEEL_OK;
  TRY(keel_binary(ctx, KEEL_BIN_EQ, n->saved[0], n->saved[1], &eq));
  TRY(keel_binary_scalar(ctx, KEEL_BIN_MUL, eq, 0.5, 0, &half));
  for (int i = 0; i < 2; i++) {
    if (!KL_NEEDS(n, i)) continue;
    TRY(keel_binary(ctx, win, n->saved[i], n->saved[1 - i], &w));   /* this side wins */
    TRY(keel_add(ctx, w, half, &m));
    TRY(keel_mul(ctx, gout, m, &gin[i]));
    kl_release(&w);
    kl_release(&m);
  }
done:
  keel_tensor_release(w);
  keel_tensor_release(eq);
  keel_tensor_release(half);
  keel_tensor_release(m);
  return st;
}

KL_BACKWARD(kl_maximum_backward) { return extremum_backward(ctx, n, gout, gin, KEEL_BIN_GT); }
KL_BACKWARD(kl_minimum_backward) { return extremum_backward(ctx, n, gout, gin, KEEL_BIN_LT); }

KL_BACKWARD(kl_neg_backward) { (void)n; return keel_unary(ctx, KEEL_UN_NEG, gout, &gin[0]); }
KL_BACKWARD(kl_exp_backward) { return keel_mul(ctx, gout, n->saved[0], &gin[0]); }
KL_BACKWARD(kl_log_backward) { return keel_div(ctx, gout, n->saved[0], &gin[0]); }

KL_BACKWARD(kl_sqrt_backward) {   /* g / (2 sqrt a) */
  keel_tensor *t = NULL;
  keel_status st = KEEL_OK;
  TRY(keel_div(ctx, gout, n->saved[0], &t));
  TRY(keel_binary_scalar(ctx, KEEL_BIN_MUL, t, 0.5, 0, &gin[0]));
done:
  keel_tensor_release(t);
  return st;
}

KL_BACKWARD(kl_abs_backward) {
  keel_tensor *s = NULL;
  keel_status st = KEEL_OK;
  TRY(keel_unary(ctx, KEEL_UN_SIGN, n->saved[0], &s));
  TRY(keel_mul(ctx, gout, s, &gin[0]));
done:
  keel_tensor_release(s);
  return st;
}

KL_BACKWARD(kl_relu_backward) {
  keel_tensor *m = NULL;
  keel_status st = KEEL_OK;
  TRY(keel_binary_scalar(ctx, KEEL_BIN_GT, n->saved[0], 0.0, 0, &m));
  TRY(keel_mul(ctx, gout, m, &gin[0]));
done:
  keel_tensor_release(m);
  return st;
}

KL_BACKWARD(kl_sigmoid_backward) {   /* g s (1 - s) */
  keel_tensor *t = NULL, *u = NULL;
  keel_status st = KEEL_OK;
  TRY(keel_binary_scalar(ctx, KEEL_BIN_SUB, n->saved[0], 1.0, 1, &t));
  TRY(keel_mul(ctx, t, n->saved[0], &u));
  TRY(keel_mul(ctx, gout, u, &gin[0]));
done:
  keel_tensor_release(t);
  keel_tensor_release(u);
  return st;
}

KL_BACKWARD(kl_tanh_backward) {   /* g (1 - t^2) */
  keel_tensor *t = NULL, *u = NULL;
  keel_status st = KEEL_OK;
  TRY(keel_mul(ctx, n->saved[0], n->saved[0], &t));
  TRY(keel_binary_scalar(ctx, KEEL_BIN_SUB, t, 1.0, 1, &u));
  TRY(keel_mul(ctx, gout, u, &gin[0]));
done:
  keel_tensor_release(t);
  keel_tensor_release(u);
  return st;
}

KL_BACKWARD(kl_clamp_backward) {   /* g where lo <= a <= hi */
  keel_tensor *m1 = NULL, *m2 = NULL, *m = NULL;
  keel_status st = KEEL_OK;
  TRY(keel_binary_scalar(ctx, KEEL_BIN_GE, n->saved[0], n->fparam[0], 0, &m1));
  TRY(keel_binary_scalar(ctx, KEEL_BIN_LE, n->saved[0], n->fparam[1], 0, &m2));
  TRY(keel_mul(ctx, m1, m2, &m));
  TRY(keel_mul(ctx, gout, m, &gin[0]));
done:
  keel_tensor_release(m1);
  keel_tensor_release(m2);
  keel_tensor_release(m);
  return st;
}

KL_BACKWARD(kl_where_backward) {
  keel_tensor *zero = NULL;
  keel_status st = KEEL_OK;
  TRY(scalar_tensor(ctx, gout->dtype, gout->storage->device, 0.0, &zero));
  if (KL_NEEDS(n, 1)) TRY(keel_where(ctx, n->saved[0], gout, zero, &gin[1]));
  if (KL_NEEDS(n, 2)) TRY(keel_where(ctx, n->saved[0], zero, gout, &gin[2]));
done:
  keel_tensor_release(zero);
  return st;
}

/* The tape casts the gradient back to the input's dtype. */
KL_BACKWARD(kl_cast_backward) { (void)ctx; (void)n; gin[0] = keel_tensor_retain(gout); return KEEL_OK; }
KL_BACKWARD(kl_copy_backward) { (void)ctx; (void)n; gin[0] = keel_tensor_retain(gout); return KEEL_OK; }

/* }====================================================================== */
