/*
** lkeel_tensor.c: the keel.Tensor userdata. Metamethods (arithmetic,
** indexing, length, __gc and __close), and the methods: metadata, views,
** math, reductions, autograd and hooks.
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lkeel.h"

#define OP_UV lua_upvalueindex(3)   /* op code of table-registered methods */

static keel_tensor *self(lua_State *L, const char *fn) { return lk_check_tensor(L, 1, fn); }

/* Makes the call (which sets out), raises its error or pushes out. */
#define RET(call) do { \
    keel_status st_ = (call); \
    lk_check(L, S, st_); \
    lk_push(L, S, out); \
    return 1; \
  } while (0)

/* {======================================================================
** Lifetime
** ======================================================================= */

static int t_gc(lua_State *L) {
  lk_tensor *u = (lk_tensor *)lua_touserdata(L, 1);
  if (u && u->t) {
    keel_tensor_release(u->t);
    u->t = NULL;
  }
  return 0;
}

/* }====================================================================== */

/* {======================================================================
** Metadata
** ======================================================================= */

static void push_shape(lua_State *L, keel_tensor *t) {
  int nd = keel_tensor_ndim(t);
  const int64_t *s = keel_tensor_shape(t);
  lua_createtable(L, nd, 0);
  for (int i = 0; i < nd; i++) {
    lua_pushinteger(L, (lua_Integer)s[i]);
    lua_rawseti(L, -2, i + 1);
  }
}

/* A dimension argument as an index into shape/strides. */
static int dim_index(lua_State *L, int i, const char *fn, keel_tensor *t) {
  int d = lk_check_dim(L, i, fn), nd = keel_tensor_ndim(t);
  if (d < 0) d += nd;
  if (d < 0 || d >= nd)
    luaL_error(L, "%s: dimension %I out of range (tensor has %d dimensions)", fn, lua_tointeger(L, i), nd);
  return d;
}

static int t_size(lua_State *L) {
  keel_tensor *t = self(L, "size");
  if (lua_isnoneornil(L, 2)) { push_shape(L, t); return 1; }
  lua_pushinteger(L, (lua_Integer)keel_tensor_shape(t)[dim_index(L, 2, "size", t)]);
  return 1;
}

static int t_stride(lua_State *L) {
  keel_tensor *t = self(L, "stride");
  int nd = keel_tensor_ndim(t);
  const int64_t *s = keel_tensor_strides(t);
  if (!lua_isnoneornil(L, 2)) {
    lua_pushinteger(L, (lua_Integer)s[dim_index(L, 2, "stride", t)]);
    return 1;
  }
  lua_createtable(L, nd, 0);
  for (int i = 0; i < nd; i++) {
    lua_pushinteger(L, (lua_Integer)s[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int t_dim(lua_State *L) { lua_pushinteger(L, keel_tensor_ndim(self(L, "dim"))); return 1; }
static int t_numel(lua_State *L) { lua_pushinteger(L, (lua_Integer)keel_tensor_numel(self(L, "numel"))); return 1; }
static int t_storage_offset(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)keel_tensor_offset(self(L, "storage_offset")));
  return 1;
}
static int t_is_contiguous(lua_State *L) {
  lua_pushboolean(L, keel_tensor_is_contiguous(self(L, "is_contiguous")));
  return 1;
}

static void push_value(lua_State *L, keel_tensor *t, double v) {
  if (keel_tensor_dtype(t) == KEEL_I64) lua_pushinteger(L, (lua_Integer)v);
  else lua_pushnumber(L, v);
}

static int t_item(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "item");
  double v;
  lk_check(L, S, keel_item(S->ctx, t, &v));
  push_value(L, t, v);
  return 1;
}

static void build_table(lua_State *L, keel_tensor *t, const double *buf, int depth, int64_t *k) {
  const int64_t *shape = keel_tensor_shape(t);
  int nd = keel_tensor_ndim(t);
  if (depth == nd) { push_value(L, t, buf[(*k)++]); return; }
  lua_createtable(L, (int)shape[depth], 0);
  for (int64_t i = 0; i < shape[depth]; i++) {
    build_table(L, t, buf, depth + 1, k);
    lua_rawseti(L, -2, i + 1);
  }
}

static int t_totable(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "totable");
  int64_t n = keel_tensor_numel(t), k = 0;
  double *buf = (double *)lua_newuserdatauv(L, sizeof(double) * (size_t)(n ? n : 1), 0);
  lk_check(L, S, keel_tensor_read(S->ctx, t, buf, n));
  build_table(L, t, buf, 0, &k);
  return 1;
}

/* Integer indices from i on (1-based, negative from the end) into idx. */
static void element_index(lua_State *L, keel_tensor *t, int i, int count, const char *fn, int64_t *idx) {
  int nd = keel_tensor_ndim(t);
  const int64_t *shape = keel_tensor_shape(t);
  if (count != nd) luaL_error(L, "%s: expected %d indices for a %d-dimensional tensor, got %d", fn, nd, nd, count);
  for (int k = 0; k < nd; k++) {
    int isint;
    lua_Integer v = lua_tointegerx(L, i + k, &isint);
    if (!isint) luaL_error(L, "%s: index %d must be an integer, got %s", fn, k + 1, luaL_typename(L, i + k));
    if (v < 0) v += shape[k] + 1;
    if (v < 1 || v > shape[k])
      luaL_error(L, "%s: index %I out of range for dimension %d of size %I", fn, lua_tointeger(L, i + k), k + 1,
                 (lua_Integer)shape[k]);
    idx[k] = v - 1;
  }
}

static int t_get(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "get");
  int64_t idx[KEEL_MAX_DIMS];
  double v;
  element_index(L, t, 2, lua_gettop(L) - 1, "get", idx);
  lk_check(L, S, keel_tensor_get(S->ctx, t, idx, &v));
  push_value(L, t, v);
  return 1;
}

static int t_set(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "set");
  int top = lua_gettop(L);
  int64_t idx[KEEL_MAX_DIMS];
  element_index(L, t, 2, top - 2, "set", idx);
  lk_check(L, S, keel_tensor_set(S->ctx, t, idx, luaL_checknumber(L, top)));
  lua_settop(L, 1);
  return 1;
}

/* }====================================================================== */

/* {======================================================================
** Indexing metamethods and properties
** ======================================================================= */

/* t[i]: 1-based along the first dimension, negative from the end. */
static int64_t first_dim_index(lua_State *L, keel_tensor *t, lua_Integer i, const char *fn) {
  int64_t n;
  if (keel_tensor_ndim(t) == 0) luaL_error(L, "%s: cannot index a 0-dimensional tensor (use item())", fn);
  n = keel_tensor_shape(t)[0];
  if (i < 0) i += n + 1;
  if (i < 1 || i > n) {
    lua_Integer shown = i < 1 ? i - n - 1 : i;   /* as the user wrote it */
    luaL_error(L, "%s: index %I out of range for dimension 1 of size %I", fn, shown, (lua_Integer)n);
  }
  return (int64_t)(i - 1);
}

static int t_index(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = lk_to(L, 1);
  const char *k;
  if (lua_type(L, 2) == LUA_TNUMBER) {
    int isint;
    lua_Integer i = lua_tointegerx(L, 2, &isint);
    keel_tensor *out;
    if (!t) return luaL_error(L, "index: tensor is closed");
    if (!isint) return luaL_error(L, "index: expected an integer index, got %s", lua_tostring(L, 2));
    if (keel_tensor_ndim(t) == 1) {
      int64_t idx = first_dim_index(L, t, i, "index");
      double v;
      lk_check(L, S, keel_tensor_get(S->ctx, t, &idx, &v));
      push_value(L, t, v);
      return 1;
    }
    RET(keel_select(S->ctx, t, 0, first_dim_index(L, t, i, "index"), &out));
  }
  /* methods first: they are the common case */
  lua_pushvalue(L, 2);
  if (lua_rawget(L, OP_UV) != LUA_TNIL) return 1;
  k = lua_tostring(L, 2);
  if (!k) return 0;
  if (!t) {
    if (!strcmp(k, "is_closed")) { lua_pushboolean(L, 1); return 1; }
    return luaL_error(L, "index: tensor is closed (reading field '%s')", k);
  }
  if (!strcmp(k, "shape")) { push_shape(L, t); return 1; }
  if (!strcmp(k, "grad")) { lk_push(L, S, keel_tensor_retain(keel_tensor_grad(t))); return 1; }
  if (!strcmp(k, "requires_grad")) { lua_pushboolean(L, keel_requires_grad(t)); return 1; }
  if (!strcmp(k, "dtype")) { lua_pushstring(L, keel_dtype_name(keel_tensor_dtype(t))); return 1; }
  if (!strcmp(k, "device")) { lua_pushstring(L, keel_device_name(keel_tensor_device(t))); return 1; }
  if (!strcmp(k, "is_cuda")) { lua_pushboolean(L, keel_tensor_device(t) == KEEL_CUDA); return 1; }
  if (!strcmp(k, "ndim")) { lua_pushinteger(L, keel_tensor_ndim(t)); return 1; }
  if (!strcmp(k, "is_leaf")) { lua_pushboolean(L, keel_is_leaf(t)); return 1; }
  if (!strcmp(k, "is_closed")) { lua_pushboolean(L, 0); return 1; }
  if (!strcmp(k, "grad_fn")) {
    const char *name = keel_grad_fn_name(t);
    if (name) lua_pushstring(L, name); else lua_pushnil(L);
    return 1;
  }
  return 0;
}

static int t_newindex(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = lk_check_tensor(L, 1, "newindex");
  const char *k;
  if (lua_type(L, 2) == LUA_TNUMBER) {
    int isint;
    lua_Integer i = lua_tointegerx(L, 2, &isint);
    int64_t idx;
    if (!isint) return luaL_error(L, "newindex: expected an integer index, got %s", lua_tostring(L, 2));
    idx = first_dim_index(L, t, i, "newindex");
    if (keel_tensor_ndim(t) == 1) {
      if (lua_type(L, 3) != LUA_TNUMBER)
        return luaL_error(L, "newindex: expected a number for an element, got %s", luaL_typename(L, 3));
      lk_check(L, S, keel_tensor_set(S->ctx, t, &idx, lua_tonumber(L, 3)));
    } else {
      keel_tensor *slice, *src = lk_to(L, 3);
      keel_status st;
      lk_check(L, S, keel_select(S->ctx, t, 0, idx, &slice));
      if (src) st = keel_copy_(S->ctx, slice, src);
      else if (lua_type(L, 3) == LUA_TNUMBER) st = keel_fill_(S->ctx, slice, lua_tonumber(L, 3));
      else {
        keel_tensor_release(slice);
        return luaL_error(L, "newindex: expected a number or a keel.Tensor, got %s", luaL_typename(L, 3));
      }
      keel_tensor_release(slice);
      lk_check(L, S, st);
    }
    return 0;
  }
  k = luaL_checkstring(L, 2);
  if (!strcmp(k, "requires_grad")) {
    lk_check(L, S, keel_set_requires_grad(S->ctx, t, lua_toboolean(L, 3)));
    return 0;
  }
  if (!strcmp(k, "grad")) {
    keel_tensor *g = NULL;
    if (!lua_isnil(L, 3)) g = lk_check_tensor(L, 3, "grad");
    lk_check(L, S, keel_set_grad(S->ctx, t, g));
    return 0;
  }
  return luaL_error(L, "newindex: cannot set field '%s' of a keel.Tensor", k);
}

static int t_len(lua_State *L) {
  keel_tensor *t = self(L, "len");
  if (keel_tensor_ndim(t) == 0) return luaL_error(L, "len: a 0-dimensional tensor has no length");
  lua_pushinteger(L, (lua_Integer)keel_tensor_shape(t)[0]);
  return 1;
}

/* }====================================================================== */

/* {======================================================================
** Views and copies
** ======================================================================= */

static int t_view_like(lua_State *L, const char *fn,
                       keel_status (*f)(keel_ctx *, keel_tensor *, int, const int64_t *, keel_tensor **)) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, fn), *out;
  int64_t shape[KEEL_MAX_DIMS];
  int nd = lk_check_shape(L, 2, fn, shape, NULL);
  RET(f(S->ctx, t, nd, shape, &out));
}

static int t_view(lua_State *L) { return t_view_like(L, "view", keel_view); }
static int t_reshape(lua_State *L) { return t_view_like(L, "reshape", keel_reshape); }
static int t_expand(lua_State *L) { return t_view_like(L, "expand", keel_expand); }

static int t_transpose(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "transpose"), *out;
  int a = lk_check_dim(L, 2, "transpose"), b = lk_check_dim(L, 3, "transpose");
  RET(keel_transpose(S->ctx, t, a, b, &out));
}

static int t_t(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "t"), *out;
  int nd = keel_tensor_ndim(t);
  if (nd > 2) return luaL_error(L, "t: expected a tensor with at most 2 dimensions, got %d (use transpose)", nd);
  if (nd < 2) RET(keel_view(S->ctx, t, nd, keel_tensor_shape(t), &out));
  RET(keel_transpose(S->ctx, t, 0, 1, &out));
}

static int t_permute(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "permute"), *out;
  int perm[KEEL_MAX_DIMS], n, nd = keel_tensor_ndim(t);
  n = lua_istable(L, 2) ? lk_opt_dims(L, 2, "permute", perm) : 0;
  if (!lua_istable(L, 2)) {
    n = lua_gettop(L) - 1;
    if (n > KEEL_MAX_DIMS) return luaL_error(L, "permute: too many dimensions");
    for (int i = 0; i < n; i++) perm[i] = lk_check_dim(L, i + 2, "permute");
  }
  if (n != nd) return luaL_error(L, "permute: expected %d dimensions, got %d", nd, n);
  RET(keel_permute(S->ctx, t, perm, &out));
}

static int t_narrow(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "narrow"), *out;
  int d = lk_check_dim(L, 2, "narrow");
  lua_Integer start = luaL_checkinteger(L, 3), len = luaL_checkinteger(L, 4);
  int dd = d < 0 ? d + keel_tensor_ndim(t) : d;
  if (start < 0 && dd >= 0 && dd < keel_tensor_ndim(t)) start += keel_tensor_shape(t)[dd] + 1;
  if (start < 1) return luaL_error(L, "narrow: start %I is out of range (starts are 1-based)", start);
  RET(keel_narrow(S->ctx, t, d, start - 1, len, &out));
}

static int t_select(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "select"), *out;
  int d = lk_check_dim(L, 2, "select");
  lua_Integer i = luaL_checkinteger(L, 3);
  int dd = d < 0 ? d + keel_tensor_ndim(t) : d;
  if (i < 0 && dd >= 0 && dd < keel_tensor_ndim(t)) i += keel_tensor_shape(t)[dd] + 1;
  if (i < 1) return luaL_error(L, "select: index %I out of range (indices are 1-based)", i);
  RET(keel_select(S->ctx, t, d, i - 1, &out));
}

static int t_squeeze(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "squeeze"), *out;
  RET(keel_squeeze(S->ctx, t, lk_opt_dim(L, 2, "squeeze", KEEL_DIM_NONE), &out));
}

static int t_unsqueeze(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "unsqueeze"), *out;
  RET(keel_unsqueeze(S->ctx, t, lk_check_dim(L, 2, "unsqueeze"), &out));
}

static int t_contiguous(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "contiguous"), *out;
  RET(keel_contiguous(S->ctx, t, &out));
}

static int t_clone(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "clone"), *out;
  RET(keel_clone(S->ctx, t, &out));
}

static int t_detach(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "detach"), *out;
  RET(keel_detach(S->ctx, t, &out));
}

/* Pushes out, or the tensor argument itself (self) when out is t: a
** conversion that changes nothing returns its receiver, as torch does. */
static int push_same(lua_State *L, lk_state *S, keel_tensor *t, keel_tensor *out) {
  if (out == t) {
    keel_tensor_release(out);
    lua_settop(L, 1);
    return 1;
  }
  lk_push(L, S, out);
  return 1;
}

/* to(target [, opts]): target is a dtype name, a device ("cpu", "cuda",
** "cuda:0") or a tensor (its dtype and device); opts.copy makes a new
** tensor even when nothing changes. Differentiable either way. */
static int t_to(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "to"), *out, *mid, *other = lk_to(L, 2);
  keel_dtype dt = keel_tensor_dtype(t);
  keel_device dev = keel_tensor_device(t);
  int copy = 0;
  keel_status st;
  if (lua_istable(L, 3)) {
    lua_getfield(L, 3, "copy");
    copy = lua_toboolean(L, -1);
    lua_pop(L, 1);
  }
  if (other) {
    dt = keel_tensor_dtype(other);
    dev = keel_tensor_device(other);
  } else if (lua_type(L, 2) == LUA_TSTRING && lk_to_device(lua_tostring(L, 2), &dev) >= 0) {
    dev = lk_check_device(L, 2, "to");   /* raises for another GPU */
  } else if (lua_type(L, 2) == LUA_TSTRING) {
    dt = lk_check_dtype(L, 2, "to");
  } else {
    return luaL_error(L, "to: argument #1: expected a dtype, a device or a tensor, got %s", lk_typename(L, 2));
  }
  /* the device first: a dtype change then runs where the data ends up */
  lk_check(L, S, keel_to_device(S->ctx, t, dev, copy && dt == keel_tensor_dtype(t), &mid));
  st = dt == keel_tensor_dtype(mid) ? KEEL_OK : keel_to_dtype(S->ctx, mid, dt, &out);
  if (dt == keel_tensor_dtype(mid)) out = mid;
  else keel_tensor_release(mid);
  lk_check(L, S, st);
  return push_same(L, S, t, out);
}

/* cpu(), cuda(): to() with the device in OP_UV */
static int t_to_device(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_device dev = (keel_device)lua_tointeger(L, OP_UV);
  keel_tensor *t = self(L, keel_device_name(dev)), *out;
  lk_check_as(L, S, keel_to_device(S->ctx, t, dev, 0, &out), keel_device_name(dev));
  return push_same(L, S, t, out);
}

/* set_data(src): t takes src's data in place (device, dtype; same shape). */
static int t_set_data(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "set_data"), *src = lk_check_tensor(L, 2, "set_data");
  lk_check(L, S, keel_tensor_set_data(S->ctx, t, src));
  lua_settop(L, 1);
  return 1;
}

static int t_cast(lua_State *L) {   /* float(), double(), long(): dtype in OP_UV */
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "to"), *out;
  RET(keel_to_dtype(S->ctx, t, (keel_dtype)lua_tointeger(L, OP_UV), &out));
}

/* }====================================================================== */

/* {======================================================================
** Elementwise
** ======================================================================= */

/* a op b where either may be a number. */
static int binary(lua_State *L, keel_binop op, const char *fn) {
  lk_state *S = lk_S(L);
  keel_tensor *a = lk_to(L, 1), *b = lk_to(L, 2), *out;
  if (a && b) RET(keel_binary(S->ctx, op, a, b, &out));
  if (a && lua_type(L, 2) == LUA_TNUMBER)
    RET(keel_binary_scalar(S->ctx, op, a, lua_tonumber(L, 2), 0, &out));
  if (b && lua_type(L, 1) == LUA_TNUMBER)
    RET(keel_binary_scalar(S->ctx, op, b, lua_tonumber(L, 1), 1, &out));
  if (!a && !b && lua_type(L, 1) == LUA_TUSERDATA) lk_check_tensor(L, 1, fn);
  return luaL_error(L, "%s: expected keel.Tensor or number operands, got %s and %s", fn, lk_typename(L, 1),
                    lk_typename(L, 2));
}

static const char *binop_names[KEEL_BINOP_COUNT] = {"add", "sub", "mul", "div", "pow", "maximum", "minimum",
                                                   "eq", "ne", "lt", "le", "gt", "ge"};

static int t_binary(lua_State *L) {
  keel_binop op = (keel_binop)lua_tointeger(L, OP_UV);
  return binary(L, op, binop_names[op]);
}

static int mm_add(lua_State *L) { return binary(L, KEEL_BIN_ADD, "add"); }
static int mm_sub(lua_State *L) { return binary(L, KEEL_BIN_SUB, "sub"); }
static int mm_mul(lua_State *L) { return binary(L, KEEL_BIN_MUL, "mul"); }
static int mm_div(lua_State *L) { return binary(L, KEEL_BIN_DIV, "div"); }
static int mm_pow(lua_State *L) { return binary(L, KEEL_BIN_POW, "pow"); }

static int t_binary_inplace(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_binop op = (keel_binop)lua_tointeger(L, OP_UV);
  keel_tensor *a = self(L, binop_names[op]), *b = lk_to(L, 2);
  if (b) lk_check(L, S, keel_binary_(S->ctx, op, a, b));
  else if (lua_type(L, 2) == LUA_TNUMBER) lk_check(L, S, keel_binary_scalar_(S->ctx, op, a, lua_tonumber(L, 2)));
  else return luaL_error(L, "%s_: argument #1: expected a keel.Tensor or a number, got %s", binop_names[op],
                         lk_typename(L, 2));
  lua_settop(L, 1);
  return 1;
}

static int t_unary(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "unary"), *out;
  RET(keel_unary(S->ctx, (keel_unop)lua_tointeger(L, OP_UV), t, &out));
}

static int mm_unm(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "neg"), *out;
  RET(keel_unary(S->ctx, KEEL_UN_NEG, t, &out));
}

static void clamp_bounds(lua_State *L, int i, double *lo, double *hi) {
  *lo = lua_isnoneornil(L, i) ? -INFINITY : luaL_checknumber(L, i);
  *hi = lua_isnoneornil(L, i + 1) ? INFINITY : luaL_checknumber(L, i + 1);
}

static int t_clamp(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "clamp"), *out;
  double lo, hi;
  clamp_bounds(L, 2, &lo, &hi);
  RET(keel_clamp(S->ctx, t, lo, hi, &out));
}

static int t_clamp_(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "clamp_");
  double lo, hi;
  clamp_bounds(L, 2, &lo, &hi);
  lk_check(L, S, keel_clamp_(S->ctx, t, lo, hi));
  lua_settop(L, 1);
  return 1;
}

static int t_fill_(lua_State *L) {
  lk_state *S = lk_S(L);
  lk_check(L, S, keel_fill_(S->ctx, self(L, "fill_"), luaL_checknumber(L, 2)));
  lua_settop(L, 1);
  return 1;
}

static int t_zero_(lua_State *L) {
  lk_state *S = lk_S(L);
  lk_check(L, S, keel_fill_(S->ctx, self(L, "zero_"), 0.0));
  lua_settop(L, 1);
  return 1;
}

static int t_copy_(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "copy_");
  lk_check(L, S, keel_copy_(S->ctx, t, lk_check_tensor(L, 2, "copy_")));
  lua_settop(L, 1);
  return 1;
}

static int t_uniform_(lua_State *L) {
  lk_state *S = lk_S(L);
  lk_check(L, S, keel_uniform_(S->ctx, self(L, "uniform_"), luaL_optnumber(L, 2, 0), luaL_optnumber(L, 3, 1)));
  lua_settop(L, 1);
  return 1;
}

static int t_normal_(lua_State *L) {
  lk_state *S = lk_S(L);
  lk_check(L, S, keel_normal_(S->ctx, self(L, "normal_"), luaL_optnumber(L, 2, 0), luaL_optnumber(L, 3, 1)));
  lua_settop(L, 1);
  return 1;
}

/* }====================================================================== */

/* {======================================================================
** Reductions
** ======================================================================= */

static int t_reduce(lua_State *L) {  /* sum, mean, prod */
  lk_state *S = lk_S(L);
  static const char *names[] = {"sum", "mean", "max", "min", "prod"};
  keel_redop op = (keel_redop)lua_tointeger(L, OP_UV);
  keel_tensor *t = self(L, names[op]), *out;
  int dims[KEEL_MAX_DIMS], nd = lk_opt_dims(L, 2, names[op], dims);
  RET(keel_reduce(S->ctx, op, t, nd, dims, lua_toboolean(L, 3), &out, NULL));
}

/* max() / max(dim [, keepdim]) -> values, indices / max(other) elementwise */
static int t_extreme(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_redop op = (keel_redop)lua_tointeger(L, OP_UV);
  const char *fn = op == KEEL_RED_MAX ? "max" : "min";
  keel_tensor *t = self(L, fn), *out, *idx;
  int d;
  if (lk_to(L, 2)) return binary(L, op == KEEL_RED_MAX ? KEEL_BIN_MAXIMUM : KEEL_BIN_MINIMUM, fn);
  if (lua_isnoneornil(L, 2)) RET(keel_reduce(S->ctx, op, t, 0, NULL, 0, &out, NULL));
  d = lk_check_dim(L, 2, fn);
  lk_check(L, S, keel_reduce(S->ctx, op, t, 1, &d, lua_toboolean(L, 3), &out, &idx));
  lk_push(L, S, out);
  lk_push(L, S, idx);
  return 2;
}

static int t_amax(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_redop op = (keel_redop)lua_tointeger(L, OP_UV);
  const char *fn = op == KEEL_RED_MAX ? "amax" : "amin";
  keel_tensor *t = self(L, fn), *out;
  int dims[KEEL_MAX_DIMS], nd = lk_opt_dims(L, 2, fn, dims);
  keel_status st = keel_reduce(S->ctx, op, t, nd, dims, lua_toboolean(L, 3), &out, NULL);
  lk_check_as(L, S, st, fn);
  lk_push(L, S, out);
  return 1;
}

static int t_argmax(lua_State *L) {
  lk_state *S = lk_S(L);
  int is_max = lua_tointeger(L, OP_UV) == KEEL_RED_MAX;
  const char *fn = is_max ? "argmax" : "argmin";
  keel_tensor *t = self(L, fn), *out;
  int d = lk_opt_dim(L, 2, fn, KEEL_DIM_NONE), keep = lua_toboolean(L, 3);
  RET((is_max ? keel_argmax : keel_argmin)(S->ctx, t, d, keep, &out));
}

/* var([dims [, opts | keepdim]]); opts: keepdim, correction, unbiased */
static int t_var(lua_State *L) {
  lk_state *S = lk_S(L);
  int is_std = (int)lua_tointeger(L, OP_UV);
  const char *fn = is_std ? "std" : "var";
  keel_tensor *t = self(L, fn), *out;
  int dims[KEEL_MAX_DIMS], nd = lk_opt_dims(L, 2, fn, dims), keep = 0, corr = 1;
  if (lua_istable(L, 3)) {
    lua_getfield(L, 3, "keepdim");
    keep = lua_toboolean(L, -1);
    lua_getfield(L, 3, "correction");
    if (!lua_isnil(L, -1)) corr = (int)luaL_checkinteger(L, -1);
    lua_getfield(L, 3, "unbiased");
    if (lua_isboolean(L, -1)) corr = lua_toboolean(L, -1);
    lua_pop(L, 3);
  } else {
    keep = lua_toboolean(L, 3);
  }
  RET((is_std ? keel_std : keel_var)(S->ctx, t, nd, dims, corr, keep, &out));
}

static int t_norm(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "norm"), *out;
  double p = 2;
  int dims[KEEL_MAX_DIMS], nd;
  if (lua_type(L, 2) == LUA_TSTRING) {
    const char *s = lua_tostring(L, 2);
    if (!strcmp(s, "inf")) p = INFINITY;
    else if (!strcmp(s, "fro")) p = 2;
    else return luaL_error(L, "norm: unknown order \"%s\" (expected a number, \"inf\" or \"fro\")", s);
  } else if (!lua_isnoneornil(L, 2)) {
    p = luaL_checknumber(L, 2);
  }
  nd = lk_opt_dims(L, 3, "norm", dims);
  RET(keel_norm(S->ctx, t, p, nd, dims, lua_toboolean(L, 4), &out));
}

/* }====================================================================== */

/* {======================================================================
** Linear algebra and indexing
** ======================================================================= */

static int t_matmul(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *a = lk_check_tensor(L, 1, "matmul"), *b = lk_check_tensor(L, 2, "matmul"), *out;
  RET(keel_matmul(S->ctx, a, b, &out));
}

/* An index argument: a tensor, or a Lua table of integers. */
static keel_tensor *index_arg(lua_State *L, lk_state *S, int i, const char *fn, int *owned) {
  keel_tensor *t = lk_to(L, i);
  *owned = 0;
  if (t) return t;
  if (lua_istable(L, i)) {
    int64_t n = (int64_t)luaL_len(L, i);
    double *buf = (double *)lua_newuserdatauv(L, sizeof(double) * (size_t)(n ? n : 1), 0);
    for (int64_t k = 0; k < n; k++) {
      lua_geti(L, i, k + 1);
      buf[k] = luaL_checknumber(L, -1);
      lua_pop(L, 1);
    }
    lk_check(L, S, keel_from_doubles(S->ctx, KEEL_I64, 1, &n, buf, &t));
    lua_pop(L, 1);
    *owned = 1;
    return t;
  }
  luaL_error(L, "%s: argument #%d: expected an index tensor or a table of integers, got %s", fn, i, lk_typename(L, i));
  return NULL;
}

static int t_gather(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "gather"), *out;
  int d = lk_check_dim(L, 2, "gather");
  keel_tensor *idx = lk_check_tensor(L, 3, "gather");
  RET(keel_gather(S->ctx, t, d, idx, &out));
}

static int t_scatter_add(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "scatter_add"), *out;
  int d = lk_check_dim(L, 2, "scatter_add");
  keel_tensor *idx = lk_check_tensor(L, 3, "scatter_add"), *src = lk_check_tensor(L, 4, "scatter_add");
  RET(keel_scatter_add(S->ctx, t, d, idx, src, &out));
}

static int t_index_select(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "index_select"), *out;
  int d = lk_check_dim(L, 2, "index_select"), own;
  keel_tensor *idx = index_arg(L, S, 3, "index_select", &own);
  keel_status st = keel_index_select(S->ctx, t, d, idx, &out);
  if (own) keel_tensor_release(idx);
  RET(st);
}

/* }====================================================================== */

/* {======================================================================
** Autograd
** ======================================================================= */

/* Post-accumulate-grad hooks: keel.autograd keeps, in the registry table
** "keel.post_hooks", engine handle (light userdata) -> list of {fn = f}
** with list.owner the tensor userdata. After a successful pass the engine
** names each tensor it committed; its list, if any, goes on the stack. */
typedef struct post_ud { lua_State *L; int tab, n; } post_ud;

static void post_collect(void *ud, keel_tensor *t) {
  post_ud *p = (post_ud *)ud;
  /* no allocation, nothing that can raise: the engine is still running */
  if (!lua_checkstack(p->L, 4)) return;
  if (lua_rawgetp(p->L, p->tab, t) == LUA_TTABLE) p->n++;
  else lua_pop(p->L, 1);
}


/* Calls each list's hooks in order: fn(owner). The lists are the n values
** on top of the stack. */
static void post_run(lua_State *L, int n) {
  int first = lua_gettop(L) - n + 1;
  lua_pushcfunction(L, lk_traceback);
  for (int k = 0; k < n; k++) {
    int list = first + k, m;
    /* a snapshot: a hook that removes itself or adds another does not
    ** change this pass */
    m = (int)lua_rawlen(L, list);
    lua_createtable(L, m, 0);
    for (int j = 1; j <= m; j++) {
      lua_rawgeti(L, list, j);
      lua_rawseti(L, -2, j);
    }
    for (int j = 1; j <= m; j++) {
      lua_rawgeti(L, -1, j);
      lua_getfield(L, -1, "fn");
      lua_getfield(L, list, "owner");
      if (lua_pcall(L, 1, 0, first + n) != LUA_OK) {
        lua_pushfstring(L, "post_accumulate_grad hook: %s", lua_tostring(L, -1));
        lua_error(L);
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_settop(L, first - 1);
}

static int t_backward(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "backward"), *g = lk_to(L, 2);
  int retain = 0, opts = (g || lua_isnil(L, 2)) ? 3 : 2;
  keel_status st;
  lua_State *prev = S->running;
  post_ud post = {L, 0, 0};
  if (!g && !lua_isnoneornil(L, 2) && !lua_istable(L, 2))
    return luaL_error(L, "backward: argument #1: expected a gradient tensor or an options table, got %s",
                      lk_typename(L, 2));
  if (lua_istable(L, opts)) {
    lua_getfield(L, opts, "retain_graph");
    retain = lua_toboolean(L, -1);
    lua_pop(L, 1);
  }
  lua_settop(L, 3);
  if (lua_getfield(L, LUA_REGISTRYINDEX, "keel.post_hooks") == LUA_TTABLE) {
    lua_pushnil(L);
    if (lua_next(L, -2)) {   /* some hook is registered */
      lua_pop(L, 2);
      post.tab = lua_gettop(L);
    }
  }
  if (!post.tab) lua_pop(L, 1);
  S->running = L;
  st = post.tab ? keel_backward_observe(S->ctx, t, g, retain, post_collect, &post)
                : keel_backward(S->ctx, t, g, retain);
  S->running = prev;
  /* anomaly mode: the event names the op; in error mode it is the error */
  if (S->anomaly && keel_anomaly_pending(S->ctx) && lk_anomaly_deliver(L, S)) lua_error(L);
  lk_check(L, S, st);
  if (post.n) post_run(L, post.n);
  return 0;
}

static int t_requires_grad_(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "requires_grad_");
  lk_check(L, S, keel_set_requires_grad(S->ctx, t, lua_isnone(L, 2) ? 1 : lua_toboolean(L, 2)));
  lua_settop(L, 1);
  return 1;
}

static int t_retain_grad(lua_State *L) {
  lk_state *S = lk_S(L);
  lk_check(L, S, keel_retain_grad(S->ctx, self(L, "retain_grad")));
  return 0;
}

typedef struct hook_ud { lk_state *S; int ref; } hook_ud;

/* Runs a Lua hook: any error is caught here and handed back to the binding
** through the state, so no longjmp crosses the engine. */
static keel_status hook_call(keel_ctx *ctx, void *ud, keel_tensor *grad, keel_tensor **replace) {
  hook_ud *h = (hook_ud *)ud;
  lua_State *L = h->S->running ? h->S->running : h->S->main;
  int top = lua_gettop(L), base;
  keel_tensor *r;
  (void)ctx;
  if (!lua_checkstack(L, 8)) return KEEL_ERR_NOMEM;
  lua_pushcfunction(L, lk_traceback);
  base = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->ref);
  /* a userdata for the gradient needs the Tensor metatable: it is the
  ** metatable of any tensor userdata, kept in the registry */
  {
    lk_tensor *u = (lk_tensor *)lua_newuserdatauv(L, sizeof *u, 0);
    u->t = keel_tensor_retain(grad);
    luaL_setmetatable(L, "keel.Tensor");
  }
  if (lua_pcall(L, 1, 1, base) != LUA_OK) {
    if (h->S->hook_error_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, h->S->hook_error_ref);
    h->S->hook_error_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, top);
    return KEEL_ERR_CALLBACK;
  }
  if (!lua_isnil(L, -1)) {
    lk_tensor *u = (lk_tensor *)luaL_testudata(L, -1, "keel.Tensor");
    if (!u || !u->t) {
      lua_pushfstring(L, "hook: must return a keel.Tensor or nil, got %s", luaL_typename(L, -1));
      if (h->S->hook_error_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, h->S->hook_error_ref);
      h->S->hook_error_ref = luaL_ref(L, LUA_REGISTRYINDEX);
      lua_settop(L, top);
      return KEEL_ERR_CALLBACK;
    }
    r = u->t;
    *replace = keel_tensor_retain(r);
  }
  lua_settop(L, top);
  return KEEL_OK;
}

static void hook_free(void *ud) {
  hook_ud *h = (hook_ud *)ud;
  luaL_unref(h->S->main, LUA_REGISTRYINDEX, h->ref);
  free(h);
}

/* The handle returned by register_hook: {tensor, id} with :remove(). */
static int handle_remove(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t;
  lua_Integer id;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "id");
  id = lua_tointeger(L, -1);
  lua_getfield(L, 1, "tensor");
  t = lk_to(L, -1);
  lua_pushboolean(L, t && id && keel_remove_hook(S->ctx, t, (uint64_t)id));
  lua_pushnil(L);
  lua_setfield(L, 1, "tensor");  /* removing twice is harmless */
  return 1;
}

static int t_register_hook(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = self(L, "register_hook");
  hook_ud *h;
  uint64_t id;
  keel_status st;
  luaL_checktype(L, 2, LUA_TFUNCTION);
  h = (hook_ud *)malloc(sizeof *h);
  if (!h) return luaL_error(L, "register_hook: out of memory");
  h->S = S;
  lua_pushvalue(L, 2);
  h->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  st = keel_register_hook(S->ctx, t, hook_call, h, hook_free, &id);
  if (st) { hook_free(h); lk_check(L, S, st); }
  lua_createtable(L, 0, 3);
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "tensor");
  lua_pushinteger(L, (lua_Integer)id);
  lua_setfield(L, -2, "id");
  lua_pushvalue(L, LK_STATE_UV);
  lua_pushvalue(L, LK_MT_UV);
  lua_pushcclosure(L, handle_remove, LK_NUPVALUES);
  lua_setfield(L, -2, "remove");
  return 1;
}

/* }====================================================================== */

static const luaL_Reg methods[] = {
  {"size", t_size}, {"stride", t_stride}, {"dim", t_dim}, {"numel", t_numel},
  {"storage_offset", t_storage_offset}, {"is_contiguous", t_is_contiguous},
  {"item", t_item}, {"totable", t_totable}, {"get", t_get}, {"set", t_set},
  {"view", t_view}, {"reshape", t_reshape}, {"expand", t_expand}, {"transpose", t_transpose},
  {"t", t_t}, {"permute", t_permute}, {"narrow", t_narrow}, {"select", t_select},
  {"squeeze", t_squeeze}, {"unsqueeze", t_unsqueeze}, {"contiguous", t_contiguous},
  {"clone", t_clone}, {"detach", t_detach}, {"to", t_to}, {"set_data", t_set_data},
  {"clamp", t_clamp}, {"clamp_", t_clamp_}, {"fill_", t_fill_}, {"zero_", t_zero_},
  {"copy_", t_copy_}, {"uniform_", t_uniform_}, {"normal_", t_normal_},
  {"norm", t_norm},
  {"matmul", t_matmul}, {"mm", t_matmul}, {"gather", t_gather}, {"scatter_add", t_scatter_add},
  {"index_select", t_index_select},
  {"backward", t_backward}, {"requires_grad_", t_requires_grad_}, {"retain_grad", t_retain_grad},
  {"register_hook", t_register_hook},
  {NULL, NULL},
};

static const luaL_Reg metamethods[] = {
  {"__newindex", t_newindex}, {"__len", t_len},
  {"__gc", t_gc}, {"__close", t_gc},
  {"__add", mm_add}, {"__sub", mm_sub}, {"__mul", mm_mul}, {"__div", mm_div},
  {"__pow", mm_pow}, {"__unm", mm_unm},
  {NULL, NULL},
};

/* Registers f under name in the table at -1 with an op code upvalue. */
static void reg_op(lua_State *L, int state, int mt, const char *name, lua_CFunction f, lua_Integer op) {
  lua_pushvalue(L, state);
  lua_pushvalue(L, mt);
  lua_pushinteger(L, op);
  lua_pushcclosure(L, f, LK_NUPVALUES + 1);
  lua_setfield(L, -2, name);
}

/* Stack on entry: state, mt, module. Fills mt and sets module.Tensor. */
void lk_open_tensor(lua_State *L) {
  int module = lua_gettop(L), mt = module - 1, state = module - 2;
  static const struct { const char *name; keel_unop op; } unops[] = {
    {"neg", KEEL_UN_NEG}, {"exp", KEEL_UN_EXP}, {"log", KEEL_UN_LOG}, {"sqrt", KEEL_UN_SQRT},
    {"abs", KEEL_UN_ABS}, {"relu", KEEL_UN_RELU}, {"sigmoid", KEEL_UN_SIGMOID}, {"tanh", KEEL_UN_TANH},
    {"sign", KEEL_UN_SIGN},
  };
  lua_newtable(L);  /* methods */
  lua_pushvalue(L, state);
  lua_pushvalue(L, mt);
  luaL_setfuncs(L, methods, LK_NUPVALUES);
  for (int op = 0; op < KEEL_BINOP_COUNT; op++) {
    char name[16];
    reg_op(L, state, mt, binop_names[op], t_binary, op);
    if (op <= KEEL_BIN_DIV) {
      snprintf(name, sizeof name, "%s_", binop_names[op]);
      reg_op(L, state, mt, name, t_binary_inplace, op);
    }
  }
  for (size_t i = 0; i < sizeof unops / sizeof unops[0]; i++)
    reg_op(L, state, mt, unops[i].name, t_unary, unops[i].op);
  reg_op(L, state, mt, "sum", t_reduce, KEEL_RED_SUM);
  reg_op(L, state, mt, "mean", t_reduce, KEEL_RED_MEAN);
  reg_op(L, state, mt, "prod", t_reduce, KEEL_RED_PROD);
  reg_op(L, state, mt, "max", t_extreme, KEEL_RED_MAX);
  reg_op(L, state, mt, "min", t_extreme, KEEL_RED_MIN);
  reg_op(L, state, mt, "amax", t_amax, KEEL_RED_MAX);
  reg_op(L, state, mt, "amin", t_amax, KEEL_RED_MIN);
  reg_op(L, state, mt, "argmax", t_argmax, KEEL_RED_MAX);
  reg_op(L, state, mt, "argmin", t_argmax, KEEL_RED_MIN);
  reg_op(L, state, mt, "var", t_var, 0);
  reg_op(L, state, mt, "std", t_var, 1);
  reg_op(L, state, mt, "float", t_cast, KEEL_F32);
  reg_op(L, state, mt, "double", t_cast, KEEL_F64);
  reg_op(L, state, mt, "long", t_cast, KEEL_I64);
  reg_op(L, state, mt, "cpu", t_to_device, KEEL_CPU);
  reg_op(L, state, mt, "cuda", t_to_device, KEEL_CUDA);
  lua_pushvalue(L, -1);
  lua_setfield(L, mt, "__methods");
  /* __index finds methods through an upvalue: no lookup of the table */
  lua_pushvalue(L, state);
  lua_pushvalue(L, mt);
  lua_pushvalue(L, -3);
  lua_pushcclosure(L, t_index, LK_NUPVALUES + 1);
  lua_setfield(L, mt, "__index");
  lua_setfield(L, module, "Tensor");
  lua_pushvalue(L, mt);
  lua_pushvalue(L, state);
  lua_pushvalue(L, mt);
  luaL_setfuncs(L, metamethods, LK_NUPVALUES);
  lua_pop(L, 1);
  lua_pushliteral(L, "keel.Tensor");
  lua_setfield(L, mt, "__name");
  /* matmul as a module function too */
  lua_pushvalue(L, state);
  lua_pushvalue(L, mt);
  lua_pushcclosure(L, t_matmul, LK_NUPVALUES);
  lua_setfield(L, module, "matmul");
}
