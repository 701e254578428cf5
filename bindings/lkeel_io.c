/*
** lkeel_io.c: safetensors for Lua (keel.core._io; keel.io wraps it).
**
**   save(path, {name = tensor, ...} [, {key = "value", ...}])
**   load(path) -> {name = tensor, ...}, {key = "value", ...}
*/
#include <string.h>
#include "lkeel.h"

/* Scratch arrays owned by a userdata on the stack, so that an error
** anywhere frees them with the rest of the call. */
static void *scratch(lua_State *L, size_t n) {
  return lua_newuserdatauv(L, n ? n : 1, 0);
}

static int l_save(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *path = luaL_checkstring(L, 1);
  int n = 0, nm = 0, k;
  const char **names, **keys, **values;
  keel_tensor **ts;
  luaL_checktype(L, 2, LUA_TTABLE);
  if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
  lua_settop(L, 3);
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    if (n >= (1 << 24)) return luaL_error(L, "save: too many tensors");
    n++;
    lua_pop(L, 1);
  }
  if (!lua_isnil(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      if (nm >= (1 << 24)) return luaL_error(L, "save: too many metadata entries");
      nm++;
      lua_pop(L, 1);
    }
  }
  names = (const char **)scratch(L, (size_t)n * sizeof *names);     /* 4 */
  ts = (keel_tensor **)scratch(L, (size_t)n * sizeof *ts);          /* 5 */
  keys = (const char **)scratch(L, (size_t)nm * sizeof *keys);      /* 6 */
  values = (const char **)scratch(L, (size_t)nm * sizeof *values);  /* 7 */
  k = 0;
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    if (lua_type(L, -2) != LUA_TSTRING)
      return luaL_error(L, "save: tensor names must be strings, got a %s key", luaL_typename(L, -2));
    if (k >= n) return luaL_error(L, "save: the tensor table changed during the call");
    names[k] = lua_tostring(L, -2);
    if (strlen(names[k]) != lua_rawlen(L, -2)) return luaL_error(L, "save: tensor name '%s' contains a NUL byte", names[k]);
    ts[k] = lk_to(L, -1);
    if (!ts[k]) {
      if (lua_type(L, -1) == LUA_TUSERDATA && !strcmp(lk_typename(L, -1), "closed keel.Tensor"))
        return luaL_error(L, "save: tensor '%s' is closed", names[k]);
      return luaL_error(L, "save: entry '%s' is a %s, expected a keel.Tensor", names[k], luaL_typename(L, -1));
    }
    k++;
    lua_pop(L, 1);
  }
  n = k;
  k = 0;
  if (!lua_isnil(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
        return luaL_error(L, "save: metadata must map strings to strings, got %s = %s", luaL_typename(L, -2),
                          luaL_typename(L, -1));
      if (k >= nm) return luaL_error(L, "save: the metadata table changed during the call");
      keys[k] = lua_tostring(L, -2);
      values[k] = lua_tostring(L, -1);
      if (strlen(keys[k]) != lua_rawlen(L, -2) || strlen(values[k]) != lua_rawlen(L, -1))
        return luaL_error(L, "save: metadata entry '%s' contains a NUL byte", keys[k]);
      k++;
      lua_pop(L, 1);
    }
  }
  lk_check(L, S, keel_safetensors_save(S->ctx, path, n, names, ts, k, keys, values));
  return 0;
}

static int l_load(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *path = luaL_checkstring(L, 1);
  keel_safetensors *st;
  int n, nm;
  lk_check(L, S, keel_safetensors_load(S->ctx, path, &st));
  n = keel_safetensors_count(st);
  nm = keel_safetensors_metadata_count(st);
  /* push everything before anything can raise: retain first */
  for (int i = 0; i < n; i++) keel_tensor_retain(keel_safetensors_tensor(st, i));
  if (!lua_checkstack(L, 8)) {
    for (int i = 0; i < n; i++) keel_tensor_release(keel_safetensors_tensor(st, i));
    keel_safetensors_free(st);
    return luaL_error(L, "load: out of Lua stack");
  }
  /* Tensors go into a table that owns them as they are pushed; a memory
  ** error part-way leaks only the references not yet pushed. */
  lua_createtable(L, 0, n);
  for (int i = 0; i < n; i++) {
    lua_pushstring(L, keel_safetensors_name(st, i));
    lk_push(L, S, keel_safetensors_tensor(st, i));
    lua_rawset(L, -3);
  }
  lua_createtable(L, 0, nm);
  for (int i = 0; i < nm; i++) {
    lua_pushstring(L, keel_safetensors_metadata_value(st, i));
    lua_setfield(L, -2, keel_safetensors_metadata_key(st, i));
  }
  keel_safetensors_free(st);
  return 2;
}

static const luaL_Reg io_fns[] = {
  {"save", l_save},
  {"load", l_load},
  {NULL, NULL},
};

void lk_open_io(lua_State *L, int state, int mt) { lk_register(L, state, mt, io_fns); }
