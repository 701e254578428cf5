/*
** lkeel_conv.c: keel.core._nn.conv2d, max_pool2d, avg_pool2d and
** adaptive_avg_pool2d (keel.nn.functional in Lua).
**
** Sizes are an integer or a pair {h, w}; options are a trailing table
** whose unknown keys are errors, so a typo (strides=2) is not silently
** ignored.
*/
#include <string.h>
#include "lkeel.h"

/* An integer or a pair {h, w} at index i into v. */
static void check_pair(lua_State *L, int i, const char *fn, const char *what, int64_t *v) {
  int isint;
  if (lua_type(L, i) == LUA_TNUMBER) {
    lua_Integer n = lua_tointegerx(L, i, &isint);
    if (!isint) luaL_error(L, "%s: %s must be an integer, got %s", fn, what, lua_tostring(L, i));
    v[0] = v[1] = (int64_t)n;
    return;
  }
  if (!lua_istable(L, i) || luaL_len(L, i) != 2)
    luaL_error(L, "%s: %s must be an integer or a pair {h, w}, got %s", fn, what,
               lua_istable(L, i) ? "a table without 2 entries" : luaL_typename(L, i));
  for (int k = 0; k < 2; k++) {
    lua_Integer n;
    lua_geti(L, i, k + 1);
    n = lua_tointegerx(L, -1, &isint);
    if (!isint) luaL_error(L, "%s: %s must hold integers, entry %d is %s", fn, what, k + 1, luaL_typename(L, -1));
    v[k] = (int64_t)n;
    lua_pop(L, 1);
  }
}

/* The options table at index i (or nil): raises on a key not in known. */
static void check_opts(lua_State *L, int i, const char *fn, const char *const *known) {
  if (lua_isnoneornil(L, i)) return;
  if (!lua_istable(L, i)) luaL_error(L, "%s: options must be a table, got %s", fn, luaL_typename(L, i));
  lua_pushnil(L);
  while (lua_next(L, i)) {
    int ok = 0;
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TSTRING)
      for (const char *const *k = known; *k; k++)
        if (!strcmp(lua_tostring(L, -1), *k)) { ok = 1; break; }
    if (!ok) {
      luaL_Buffer b;
      luaL_buffinit(L, &b);
      for (const char *const *k = known; *k; k++) {
        luaL_addstring(&b, k == known ? "" : ", ");
        luaL_addstring(&b, *k);
      }
      luaL_pushresult(&b);
      luaL_error(L, "%s: unknown option %s (expected one of: %s)", fn,
                 lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2), lua_tostring(L, -1));
    }
  }
}

/* opts[key] as a pair into v; 0 when the table or the key is absent. */
static int opt_pair(lua_State *L, int i, const char *key, const char *fn, int64_t *v) {
  if (!lua_istable(L, i)) return 0;
  if (lua_getfield(L, i, key) == LUA_TNIL) { lua_pop(L, 1); return 0; }
  check_pair(L, lua_gettop(L), fn, key, v);
  lua_pop(L, 1);
  return 1;
}

static int opt_bool(lua_State *L, int i, const char *key, int def) {
  int v = def;
  if (!lua_istable(L, i)) return def;
  if (lua_getfield(L, i, key) != LUA_TNIL) v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

static int64_t opt_int(lua_State *L, int i, const char *key, const char *fn, int64_t def) {
  int64_t v = def;
  if (!lua_istable(L, i)) return def;
  if (lua_getfield(L, i, key) != LUA_TNIL) {
    int isint;
    lua_Integer n = lua_tointegerx(L, -1, &isint);
    if (!isint) luaL_error(L, "%s: %s must be an integer, got %s", fn, key, luaL_typename(L, -1));
    v = (int64_t)n;
  }
  lua_pop(L, 1);
  return v;
}

/* conv2d(x, w, b|nil, {stride=, padding= n|{h,w}|"same"|"valid", dilation=, groups=}) */
static int l_conv2d(lua_State *L) {
  static const char *const known[] = {"stride", "padding", "dilation", "groups", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "conv2d"), *w = lk_check_tensor(L, 2, "conv2d"), *b = NULL, *out;
  int64_t stride[2] = {1, 1}, padding[2] = {0, 0}, dilation[2] = {1, 1}, groups;
  if (!lua_isnoneornil(L, 3) && !(lua_isboolean(L, 3) && !lua_toboolean(L, 3)))
    b = lk_check_tensor(L, 3, "conv2d");
  check_opts(L, 4, "conv2d", known);
  opt_pair(L, 4, "stride", "conv2d", stride);
  opt_pair(L, 4, "dilation", "conv2d", dilation);
  groups = opt_int(L, 4, "groups", "conv2d", 1);
  if (lua_istable(L, 4) && lua_getfield(L, 4, "padding") != LUA_TNIL) {
    if (lua_type(L, -1) == LUA_TSTRING) {
      const char *p = lua_tostring(L, -1);
      if (!strcmp(p, "same")) padding[0] = padding[1] = KEEL_PADDING_SAME;
      else if (strcmp(p, "valid"))
        return luaL_error(L, "conv2d: padding must be an integer, a pair {h, w}, \"same\" or \"valid\", got \"%s\"", p);
    } else {
      check_pair(L, lua_gettop(L), "conv2d", "padding", padding);
      if (padding[0] < 0 || padding[1] < 0)
        return luaL_error(L, "conv2d: padding must be non-negative, got (%d, %d)", (int)padding[0], (int)padding[1]);
    }
  }
  lk_check(L, S, keel_conv2d(S->ctx, x, w, b, stride, padding, dilation, groups, &out));
  lk_push(L, S, out);
  return 1;
}

/* max_pool2d(x, kernel, {stride=, padding=, dilation=, ceil_mode=, return_indices=}) */
static int l_max_pool2d(lua_State *L) {
  static const char *const known[] = {"stride", "padding", "dilation", "ceil_mode", "return_indices", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "max_pool2d"), *out, *idx = NULL;
  int64_t kernel[2], stride[2], padding[2] = {0, 0}, dilation[2] = {1, 1};
  int has_stride, want_idx;
  check_pair(L, 2, "max_pool2d", "kernel size", kernel);
  check_opts(L, 3, "max_pool2d", known);
  has_stride = opt_pair(L, 3, "stride", "max_pool2d", stride);
  opt_pair(L, 3, "padding", "max_pool2d", padding);
  opt_pair(L, 3, "dilation", "max_pool2d", dilation);
  want_idx = opt_bool(L, 3, "return_indices", 0);
  lk_check(L, S, keel_max_pool2d(S->ctx, x, kernel, has_stride ? stride : NULL, padding, dilation,
                                 opt_bool(L, 3, "ceil_mode", 0), &out, want_idx ? &idx : NULL));
  lk_push(L, S, out);
  if (!want_idx) return 1;
  lk_push(L, S, idx);
  return 2;
}

/* avg_pool2d(x, kernel, {stride=, padding=, ceil_mode=, count_include_pad=, divisor_override=}) */
static int l_avg_pool2d(lua_State *L) {
  static const char *const known[] = {"stride", "padding", "ceil_mode", "count_include_pad", "divisor_override",
                                      NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "avg_pool2d"), *out;
  int64_t kernel[2], stride[2], padding[2] = {0, 0}, div;
  int has_stride;
  check_pair(L, 2, "avg_pool2d", "kernel size", kernel);
  check_opts(L, 3, "avg_pool2d", known);
  has_stride = opt_pair(L, 3, "stride", "avg_pool2d", stride);
  opt_pair(L, 3, "padding", "avg_pool2d", padding);
  div = opt_int(L, 3, "divisor_override", "avg_pool2d", 0);
  if (lua_istable(L, 3) && div == 0 && lua_getfield(L, 3, "divisor_override") != LUA_TNIL)
    return luaL_error(L, "avg_pool2d: divisor_override must not be zero");
  lk_check(L, S, keel_avg_pool2d(S->ctx, x, kernel, has_stride ? stride : NULL, padding,
                                 opt_bool(L, 3, "ceil_mode", 0), opt_bool(L, 3, "count_include_pad", 1), div,
                                 &out));
  lk_push(L, S, out);
  return 1;
}

/* adaptive_avg_pool2d(x, size): size n or {h, w}; a nil/false entry keeps
** that input size (torch's None). */
static int l_adaptive_avg_pool2d(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "adaptive_avg_pool2d"), *out;
  int64_t size[2];
  if (lua_istable(L, 2)) {
    int nd = keel_tensor_ndim(x);
    const int64_t *shape = keel_tensor_shape(x);
    for (int k = 0; k < 2; k++) {
      int isint;
      lua_geti(L, 2, k + 1);
      if (!lua_toboolean(L, -1)) {
        if (nd < 2) return luaL_error(L, "adaptive_avg_pool2d: a kept size needs an input with spatial dims");
        size[k] = shape[nd - 2 + k];
      } else {
        lua_Integer n = lua_tointegerx(L, -1, &isint);
        if (!isint)
          return luaL_error(L, "adaptive_avg_pool2d: output size must hold integers, entry %d is %s", k + 1,
                            luaL_typename(L, -1));
        size[k] = (int64_t)n;
      }
      lua_pop(L, 1);
    }
    lua_geti(L, 2, 3);
    if (!lua_isnil(L, -1)) return luaL_error(L, "adaptive_avg_pool2d: output size must be a pair {h, w}");
    lua_pop(L, 1);
  } else {
    check_pair(L, 2, "adaptive_avg_pool2d", "output size", size);
  }
  lk_check(L, S, keel_adaptive_avg_pool2d(S->ctx, x, size, &out));
  lk_push(L, S, out);
  return 1;
}

void lk_open_conv(lua_State *L, int state, int mt) {
  static const luaL_Reg fns[] = {
    {"conv2d", l_conv2d},
    {"max_pool2d", l_max_pool2d},
    {"avg_pool2d", l_avg_pool2d},
    {"adaptive_avg_pool2d", l_adaptive_avg_pool2d},
    {NULL, NULL},
  };
  lk_register(L, state, mt, fns);
}
