/*
** elementwise_peer.c: the peers of bench/elementwise.lua, as the Lua module
** `elementwise_peer`. Plain single-threaded C loops o[i] = a[i] + b[i] on
** float32, compiled with -O2 like the engine:
**
**   elementwise_peer.setup(n)          allocates and fills a, b, o (touched)
**   elementwise_peer.prealloc(iters)   `iters` adds into the preallocated o
**   elementwise_peer.fresh(iters)      `iters` adds, each into a freshly
**                                      malloc'd output, freed after (what an
**                                      engine without a cache pays)
**   elementwise_peer.inplace(iters)    `iters` in-place adds d[i] += b[i], the
**                                      peer of keel's d:add_(b) (no write-
**                                      allocate traffic for a separate output)
** The caller times the calls, with the same clock as the keel side.
*/
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>

static float *a, *b, *o, *d;
static int64_t N;
static volatile float sink;

/* noinline: one loop body for both variants, as a library would have */
__attribute__((noinline)) static void add(float *out, const float *x, const float *y, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = x[i] + y[i];
}

__attribute__((noinline)) static void add_inplace(float *x, const float *y, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

static int l_setup(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  size_t bytes;
  luaL_argcheck(L, n > 0, 1, "size out of range");
  bytes = (size_t)n * sizeof(float);
  free(a); free(b); free(o); free(d);
  a = malloc(bytes); b = malloc(bytes); o = malloc(bytes); d = malloc(bytes);
  if (!a || !b || !o || !d) return luaL_error(L, "elementwise_peer.setup: out of memory");
  for (int64_t i = 0; i < n; i++) { a[i] = (float)(i % 1000) * 1e-3f; b[i] = 1.0f - a[i]; }
  memset(o, 0, bytes);
  memcpy(d, a, bytes);
  N = n;
  return 0;
}

static int l_prealloc(lua_State *L) {
  lua_Integer iters = luaL_optinteger(L, 1, 1);
  if (!o) return luaL_error(L, "elementwise_peer: call setup(n) first");
  for (lua_Integer k = 0; k < iters; k++) add(o, a, b, N);
  sink = o[N / 2];
  return 0;
}

static int l_fresh(lua_State *L) {
  lua_Integer iters = luaL_optinteger(L, 1, 1);
  if (!o) return luaL_error(L, "elementwise_peer: call setup(n) first");
  for (lua_Integer k = 0; k < iters; k++) {
    float *out = malloc((size_t)N * sizeof(float));
    if (!out) return luaL_error(L, "elementwise_peer.fresh: out of memory");
    add(out, a, b, N);
    sink = out[(k * 7919) % N];
    free(out);
  }
  return 0;
}

static int l_inplace(lua_State *L) {
  lua_Integer iters = luaL_optinteger(L, 1, 1);
  if (!d) return luaL_error(L, "elementwise_peer: call setup(n) first");
  for (lua_Integer k = 0; k < iters; k++) add_inplace(d, b, N);
  sink = d[N / 3];
  return 0;
}

int luaopen_elementwise_peer(lua_State *L);
int luaopen_elementwise_peer(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"setup", l_setup}, {"prealloc", l_prealloc}, {"fresh", l_fresh}, {"inplace", l_inplace}, {NULL, NULL}
  };
  luaL_newlib(L, fns);
  return 1;
}
