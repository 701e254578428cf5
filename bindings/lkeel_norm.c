/*
** lkeel_norm.c: keel.core._nn functions of the norm area: batch_norm,
** layer_norm, group_norm, dropout and embedding. Argument orders follow
** PyTorch's torch.nn.functional; nil stands for None.
*/
#include <stdio.h>
#include "lkeel.h"

/* A tensor at i, or NULL for nil/none. */
static keel_tensor *opt_tensor(lua_State *L, int i, const char *fn) {
  return lua_isnoneornil(L, i) ? NULL : lk_check_tensor(L, i, fn);
}

static double opt_number(lua_State *L, int i, const char *fn, const char *what, double def) {
  if (lua_isnoneornil(L, i)) return def;
  if (lua_type(L, i) != LUA_TNUMBER)
    luaL_error(L, "%s: argument #%d (%s): expected a number, got %s", fn, i, what, lk_typename(L, i));
  return lua_tonumber(L, i);
}

static int opt_bool(lua_State *L, int i, const char *fn, const char *what, int def) {
  if (lua_isnoneornil(L, i)) return def;
  if (lua_type(L, i) != LUA_TBOOLEAN)
    luaL_error(L, "%s: argument #%d (%s): expected a boolean, got %s", fn, i, what, lk_typename(L, i));
  return lua_toboolean(L, i);
}

static lua_Integer check_int(lua_State *L, int i, const char *fn, const char *what) {
  int isint;
  lua_Integer v = lua_tointegerx(L, i, &isint);
  if (!isint) luaL_error(L, "%s: argument #%d (%s): expected an integer, got %s", fn, i, what, lk_typename(L, i));
  return v;
}

/* batch_norm(x, running_mean, running_var, weight, bias, training=false,
** momentum=0.1, eps=1e-5) */
static int l_batch_norm(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *fn = "batch_norm";
  keel_tensor *x = lk_check_tensor(L, 1, fn), *out;
  keel_tensor *rm = opt_tensor(L, 2, fn), *rv = opt_tensor(L, 3, fn);
  keel_tensor *w = opt_tensor(L, 4, fn), *b = opt_tensor(L, 5, fn);
  int training = opt_bool(L, 6, fn, "training", 0);
  double momentum = opt_number(L, 7, fn, "momentum", 0.1);
  double eps = opt_number(L, 8, fn, "eps", 1e-5);
  lk_check(L, S, keel_batch_norm(S->ctx, x, w, b, rm, rv, training, momentum, eps, &out));
  lk_push(L, S, out);
  return 1;
}

/* "[2,3,4]", as the engine writes shapes in its messages. */
static const char *shape_str(char *buf, size_t n, int nd, const int64_t *shape) {
  size_t k = (size_t)snprintf(buf, n, "[");
  for (int i = 0; i < nd && k < n; i++)
    k += (size_t)snprintf(buf + k, n - k, i ? ",%lld" : "%lld", (long long)shape[i]);
  if (k < n) snprintf(buf + k, n - k, "]");
  return buf;
}

/* layer_norm(x, normalized_shape (table or number), weight, bias, eps=1e-5) */
static int l_layer_norm(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *fn = "layer_norm";
  keel_tensor *x = lk_check_tensor(L, 1, fn), *out;
  int64_t shape[KEEL_MAX_DIMS];
  int nd, xnd = keel_tensor_ndim(x);
  const int64_t *xs = keel_tensor_shape(x);
  keel_tensor *w, *b;
  double eps;
  if (lua_type(L, 2) == LUA_TNUMBER) {
    shape[0] = check_int(L, 2, fn, "normalized_shape");
    nd = 1;
  } else if (lua_istable(L, 2) && !lk_to(L, 2)) {
    nd = lk_check_shape(L, 2, fn, shape, NULL);
  } else {
    return luaL_error(L, "%s: argument #2 (normalized_shape): expected a size or a table of sizes, got %s", fn,
                      lk_typename(L, 2));
  }
  w = opt_tensor(L, 3, fn);
  b = opt_tensor(L, 4, fn);
  eps = opt_number(L, 5, fn, "eps", 1e-5);
  /* the engine takes a number of trailing dims (and rejects a bad count):
  ** check that their sizes match */
  if (nd >= 1 && nd <= xnd) {
    int ok = 1;
    for (int i = 0; ok && i < nd; i++) ok = shape[i] == xs[xnd - nd + i];
    if (!ok) {
      char b1[160], b2[160];
      return luaL_error(L, "%s: normalized_shape %s does not match the last dimensions of the input of shape %s", fn,
                        shape_str(b1, sizeof b1, nd, shape), shape_str(b2, sizeof b2, xnd, xs));
    }
  }
  lk_check(L, S, keel_layer_norm(S->ctx, x, nd, w, b, eps, &out));
  lk_push(L, S, out);
  return 1;
}

/* group_norm(x, groups, weight, bias, eps=1e-5) */
static int l_group_norm(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *fn = "group_norm";
  keel_tensor *x = lk_check_tensor(L, 1, fn), *out;
  lua_Integer groups = check_int(L, 2, fn, "groups");
  keel_tensor *w = opt_tensor(L, 3, fn), *b = opt_tensor(L, 4, fn);
  double eps = opt_number(L, 5, fn, "eps", 1e-5);
  lk_check(L, S, keel_group_norm(S->ctx, x, (int64_t)groups, w, b, eps, &out));
  lk_push(L, S, out);
  return 1;
}

/* dropout(x, p=0.5, training=true) */
static int l_dropout(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *fn = "dropout";
  keel_tensor *x = lk_check_tensor(L, 1, fn), *out;
  double p = opt_number(L, 2, fn, "p", 0.5);
  int training = opt_bool(L, 3, fn, "training", 1);
  lk_check(L, S, keel_dropout(S->ctx, x, p, training, &out));
  lk_push(L, S, out);
  return 1;
}

/* embedding(indices (tensor or table of integers), weight, padding_idx=nil) */
static int l_embedding(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *fn = "embedding";
  keel_tensor *idx = lk_to(L, 1), *w, *out;
  int64_t pad = KEEL_NO_PADDING;
  int owned = 0;
  keel_status st;
  if (!idx && !lua_istable(L, 1))
    return luaL_error(L, "%s: argument #1 (indices): expected an index tensor or a table of integers, got %s", fn,
                      lk_typename(L, 1));
  w = lk_check_tensor(L, 2, fn);
  if (!lua_isnoneornil(L, 3)) pad = (int64_t)check_int(L, 3, fn, "padding_idx");
  if (!idx) {  /* a flat Lua list of indices */
    int64_t n = (int64_t)luaL_len(L, 1);
    double *buf = (double *)lua_newuserdatauv(L, sizeof(double) * (size_t)(n ? n : 1), 0);
    for (int64_t k = 0; k < n; k++) {
      lua_geti(L, 1, k + 1);
      if (lua_type(L, -1) != LUA_TNUMBER)
        return luaL_error(L, "%s: argument #1 (indices): element %I is not a number", fn, (lua_Integer)(k + 1));
      buf[k] = lua_tonumber(L, -1);
      lua_pop(L, 1);
    }
    lk_check(L, S, keel_from_doubles(S->ctx, KEEL_F64, 1, &n, buf, &idx));
    lua_pop(L, 1);
    owned = 1;
  }
  st = keel_embedding(S->ctx, w, idx, pad, &out);
  if (owned) keel_tensor_release(idx);
  lk_check(L, S, st);
  lk_push(L, S, out);
  return 1;
}

static const luaL_Reg norm_fns[] = {
  {"batch_norm", l_batch_norm}, {"layer_norm", l_layer_norm}, {"group_norm", l_group_norm},
  {"dropout", l_dropout}, {"embedding", l_embedding},
  {NULL, NULL},
};

void lk_open_norm(lua_State *L, int state, int mt) {
  lk_register(L, state, mt, norm_fns);
}
