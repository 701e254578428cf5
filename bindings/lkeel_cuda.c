/*
** lkeel_cuda.c: keel.core._cuda, the C half of keel.cuda (bindings/keel/
** cuda.lua): availability and its reason, devices, the caching
** allocator's statistics, synchronize, and loading a given plugin.
** Device ordinals are CUDA's, 0-based (as in "cuda:0"), not Lua indices.
*/
#include <string.h>
#include "lkeel.h"

static int c_is_available(lua_State *L) {
  char why[1024];
  int ok = keel_cuda_available(lk_S(L)->ctx, why, sizeof why);
  lua_pushboolean(L, ok);
  if (ok) return 1;
  lua_pushstring(L, why);
  return 2;
}

static int c_why_unavailable(lua_State *L) {
  char why[1024];
  if (keel_cuda_available(lk_S(L)->ctx, why, sizeof why)) lua_pushnil(L);
  else lua_pushstring(L, why);
  return 1;
}

static int c_device_count(lua_State *L) {
  lua_pushinteger(L, keel_cuda_device_count(lk_S(L)->ctx));
  return 1;
}

static int c_get_device_name(lua_State *L) {
  lk_state *S = lk_S(L);
  char name[256];
  lua_Integer i = luaL_optinteger(L, 1, 0);
  if (i < 0 || i > 1024) return luaL_error(L, "get_device_name: device %I out of range (ordinals start at 0)", i);
  lk_check_as(L, S, keel_cuda_device_name(S->ctx, (int)i, name, sizeof name), "get_device_name");
  lua_pushstring(L, name);
  return 1;
}

static int c_memory_stats(lua_State *L) {
  keel_cuda_memory_stats m;
  keel_cuda_memory_stats_get(lk_S(L)->ctx, &m);
  lua_createtable(L, 0, 11);
  lk_setint(L, "allocated_bytes", m.allocated_bytes);
  lk_setint(L, "reserved_bytes", m.reserved_bytes);
  lk_setint(L, "peak_allocated_bytes", m.peak_allocated_bytes);
  lk_setint(L, "peak_reserved_bytes", m.peak_reserved_bytes);
  lk_setint(L, "allocs", m.allocs);
  lk_setint(L, "frees", m.frees);
  lk_setint(L, "device_mallocs", m.device_mallocs);
  lk_setint(L, "device_frees", m.device_frees);
  lk_setint(L, "cache_flushes", m.cache_flushes);
  lk_setint(L, "h2d_copies", m.h2d_copies);
  lk_setint(L, "d2h_copies", m.d2h_copies);
  return 1;
}

static int c_empty_cache(lua_State *L) {
  keel_cuda_empty_cache(lk_S(L)->ctx);
  return 0;
}

static int c_synchronize(lua_State *L) {
  lk_state *S = lk_S(L);
  lk_check_as(L, S, keel_cuda_synchronize(S->ctx), "synchronize");
  return 0;
}

static int c_mem_get_info(lua_State *L) {
  lk_state *S = lk_S(L);
  size_t f, t;
  lk_check_as(L, S, keel_cuda_mem_get_info(S->ctx, &f, &t), "mem_get_info");
  lua_pushinteger(L, (lua_Integer)f);
  lua_pushinteger(L, (lua_Integer)t);
  return 2;
}

static int c_load(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *path = luaL_optstring(L, 1, NULL);
  lk_check_as(L, S, keel_cuda_load(S->ctx, path), "load");
  return 0;
}

/* keel.cuda.is_built() -> whether a plugin file is where keel looks first
** (keel_cuda_plugin_find; not opened), and its path. */
static int c_is_built(lua_State *L) {
  char path[4096];
  if (!keel_cuda_plugin_find(path, sizeof path)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushboolean(L, 1);
  lua_pushstring(L, path);
  return 2;
}

static int c_plugin(lua_State *L) {
  keel_ctx *ctx = lk_S(L)->ctx;
  const char *p = keel_cuda_plugin_path(ctx);
  if (!p) { lua_pushnil(L); return 1; }
  lua_pushstring(L, p);
  lua_pushstring(L, keel_cuda_plugin_description(ctx));
  return 2;
}

void lk_open_cuda(lua_State *L, int state, int mt) {
  static const luaL_Reg fns[] = {
    {"is_available", c_is_available}, {"why_unavailable", c_why_unavailable},
    {"device_count", c_device_count}, {"get_device_name", c_get_device_name},
    {"memory_stats", c_memory_stats}, {"empty_cache", c_empty_cache},
    {"synchronize", c_synchronize}, {"mem_get_info", c_mem_get_info},
    {"load", c_load}, {"plugin", c_plugin}, {"is_built", c_is_built},
    {NULL, NULL},
  };
  lk_register(L, state, mt, fns);
}
