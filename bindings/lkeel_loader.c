/*
** lkeel_loader.c: the data loader in keel.core._data (keel.data.DataLoader
** in Lua, bindings/keel/data_loader.lua, checks the options first).
**
**   ld = _data.loader_new(x, y_or_nil, {batch_size=, shuffle=, drop_last=, seed=,
**                         prefetch=, transforms = {{kind = "to_float", scale =},
**                         {kind = "normalize", mean = {..}, std = {..}},
**                         {kind = "random_crop", size = {h, w}, padding =},
**                         {kind = "random_hflip", p =}}})
**   xb, yb, i = ld:next()        nil at the end of the epoch (then the next epoch)
**   ld:state() -> {epoch=, cursor=, seed=};  ld:set_state(t);  ld:num_batches()
**   ld:close()                   joins the thread; also __gc and __close
*/
#include <string.h>
#include "lkeel.h"

#define LK_LOADER_MT "keel.Loader"

typedef struct lk_loader { keel_loader *ld; } lk_loader;

static keel_loader *check_loader(lua_State *L, const char *fn) {
  lk_loader *u = (lk_loader *)luaL_checkudata(L, 1, LK_LOADER_MT);
  if (!u->ld) luaL_error(L, "%s: the DataLoader is closed", fn);
  return u->ld;
}

static lua_Integer int_field(lua_State *L, int t, const char *k, lua_Integer def) {
  lua_Integer v;
  int isnum;
  if (lua_getfield(L, t, k) == LUA_TNIL) { lua_pop(L, 1); return def; }
  v = lua_tointegerx(L, -1, &isnum);
  if (!isnum) luaL_error(L, "DataLoader: %s must be an integer, got %s", k, lk_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

static double num_field(lua_State *L, int t, const char *k, double def) {
  double v;
  if (lua_getfield(L, t, k) == LUA_TNIL) { lua_pop(L, 1); return def; }
  if (!lua_isnumber(L, -1))
    luaL_error(L, "DataLoader: transform field %s must be a number, got %s", k, lk_typename(L, -1));
  v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

/* A number or a list of numbers at field k of table t into v; the count. */
static int num_list(lua_State *L, int t, const char *k, double *v) {
  int n, i;
  lua_getfield(L, t, k);
  if (lua_isnumber(L, -1)) {
    v[0] = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return 1;
  }
  if (!lua_istable(L, -1))
    luaL_error(L, "normalize: %s must be a number or a list of numbers, got %s", k, lk_typename(L, -1));
  n = (int)luaL_len(L, -1);
  if (n < 1 || n > KEEL_LOADER_MAX_CH)
    luaL_error(L, "normalize: %s has %d values, expected 1..%d", k, n, KEEL_LOADER_MAX_CH);
  for (i = 0; i < n; i++) {
    lua_geti(L, -1, i + 1);
    if (!lua_isnumber(L, -1)) luaL_error(L, "normalize: %s[%d] is not a number", k, i + 1);
    v[i] = lua_tonumber(L, -1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return n;
}

static void read_transform(lua_State *L, int t, keel_transform *tf) {
  const char *kind;
  memset(tf, 0, sizeof *tf);
  if (lua_getfield(L, t, "kind") != LUA_TSTRING) luaL_error(L, "DataLoader: transform without a kind");
  kind = lua_tostring(L, -1);
  if (!strcmp(kind, "to_float")) {
    tf->kind = KEEL_TF_TO_FLOAT;
    tf->scale = num_field(L, t, "scale", 1.0 / 255);
  } else if (!strcmp(kind, "normalize")) {
    int nm, ns;
    tf->kind = KEEL_TF_NORMALIZE;
    nm = num_list(L, t, "mean", tf->mean);
    ns = num_list(L, t, "std", tf->std);
    if (nm != ns) luaL_error(L, "normalize: %d means and %d stds, expected as many", nm, ns);
    tf->nch = nm;
  } else if (!strcmp(kind, "random_crop")) {
    tf->kind = KEEL_TF_RANDOM_CROP;
    tf->size_h = int_field(L, t, "size_h", 0);
    tf->size_w = int_field(L, t, "size_w", 0);
    tf->padding = int_field(L, t, "padding", 0);
  } else if (!strcmp(kind, "random_hflip")) {
    tf->kind = KEEL_TF_RANDOM_HFLIP;
    tf->p = num_field(L, t, "p", 0.5);
  } else {
    luaL_error(L, "DataLoader: unknown transform '%s'", kind);
  }
  lua_pop(L, 1);
}

static int l_loader_new(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "DataLoader");
  keel_tensor *y = lua_isnoneornil(L, 2) ? NULL : lk_check_tensor(L, 2, "DataLoader");
  keel_transform tfs[32];
  keel_loader_opts o;
  lk_loader *u;
  keel_status st;
  int i, n = 0;
  luaL_checktype(L, 3, LUA_TTABLE);
  memset(&o, 0, sizeof o);
  o.batch_size = int_field(L, 3, "batch_size", 64);
  o.prefetch = (int)int_field(L, 3, "prefetch", 2);
  o.seed = (uint64_t)int_field(L, 3, "seed", 0);
  lua_getfield(L, 3, "shuffle");
  o.shuffle = lua_toboolean(L, -1);
  lua_getfield(L, 3, "drop_last");
  o.drop_last = lua_toboolean(L, -1);
  lua_pop(L, 2);
  if (lua_getfield(L, 3, "transforms") == LUA_TTABLE) {
    n = (int)luaL_len(L, -1);
    if (n > 32) luaL_error(L, "DataLoader: %d transforms, expected at most 32", n);
    for (i = 0; i < n; i++) {
      if (lua_geti(L, -1, i + 1) != LUA_TTABLE) luaL_error(L, "DataLoader: transforms[%d] is not a transform", i + 1);
      read_transform(L, lua_gettop(L), &tfs[i]);
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  o.ntransforms = n;
  o.transforms = tfs;
  u = (lk_loader *)lua_newuserdatauv(L, sizeof *u, 0);
  u->ld = NULL;
  luaL_setmetatable(L, LK_LOADER_MT);
  st = keel_loader_new(S->ctx, x, y, &o, &u->ld);
  lk_check(L, S, st);
  return 1;
}

static int l_next(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_loader *ld = check_loader(L, "next");
  keel_tensor *xb, *yb;
  int64_t i;
  lk_check(L, S, keel_loader_next(S->ctx, ld, &xb, &yb, &i));
  if (!xb) { lua_pushnil(L); return 1; }
  lk_push(L, S, xb);
  lk_push(L, S, yb);
  lua_pushinteger(L, (lua_Integer)i + 1);
  return 3;
}

static int l_state(lua_State *L) {
  keel_loader *ld = check_loader(L, "state");
  int64_t e, c;
  uint64_t s;
  keel_loader_get_state(ld, &e, &c, &s);
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)e);
  lua_setfield(L, -2, "epoch");
  lua_pushinteger(L, (lua_Integer)c);
  lua_setfield(L, -2, "cursor");
  lua_pushinteger(L, (lua_Integer)s);
  lua_setfield(L, -2, "seed");
  return 1;
}

static int l_set_state(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_loader *ld = check_loader(L, "set_state");
  int64_t e, c;
  uint64_t s;
  keel_loader_get_state(ld, &e, &c, &s);
  luaL_checktype(L, 2, LUA_TTABLE);
  e = int_field(L, 2, "epoch", e);
  c = int_field(L, 2, "cursor", c);
  s = (uint64_t)int_field(L, 2, "seed", (lua_Integer)s);
  lk_check(L, S, keel_loader_set_state(S->ctx, ld, e, c, s));
  return 0;
}

static int l_num_batches(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)keel_loader_num_batches(check_loader(L, "num_batches")));
  return 1;
}

static int l_close(lua_State *L) {
  lk_loader *u = (lk_loader *)luaL_checkudata(L, 1, LK_LOADER_MT);
  keel_loader_free(u->ld);
  u->ld = NULL;
  return 0;
}

static int l_closed(lua_State *L) {
  lk_loader *u = (lk_loader *)luaL_checkudata(L, 1, LK_LOADER_MT);
  lua_pushboolean(L, u->ld == NULL);
  return 1;
}

static const luaL_Reg loader_methods[] = {
  {"next", l_next}, {"state", l_state}, {"set_state", l_set_state},
  {"num_batches", l_num_batches}, {"close", l_close}, {"is_closed", l_closed}, {NULL, NULL}};
static const luaL_Reg loader_meta[] = {{"__gc", l_close}, {"__close", l_close}, {NULL, NULL}};
static const luaL_Reg data_fns[] = {{"loader_new", l_loader_new}, {NULL, NULL}};

void lk_open_loader(lua_State *L, int state, int mt) {
  luaL_newmetatable(L, LK_LOADER_MT);
  lk_register(L, state, mt, loader_meta);
  lua_newtable(L);
  lk_register(L, state, mt, loader_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  lk_register(L, state, mt, data_fns);
}
