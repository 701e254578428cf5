/*
** benchlib.c: the Lua module `benchlib`, helpers for the keel benchmarks.
**
**   benchlib.now()        monotonic wall-clock time in seconds (a float).
**                         os.clock() is CPU time summed over threads, which
**                         is wrong once OpenBLAS runs 2 threads.
**   benchlib.thread_cpu() CPU time of the calling thread in seconds (user +
**                         system, page faults included): for single-threaded
**                         benchmarks on a shared machine, it does not count
**                         the time other processes hold the core.
**   benchlib.noop(a, b)   a C function that checks it got two userdata and
**                         returns nothing: the floor of a Lua->C call.
**   benchlib.newud()      a fresh 16-byte userdata with a __gc metamethod:
**                         the floor of "return a new tensor handle".
**
** Build: gcc -O2 -shared -fPIC -I/usr/include/lua5.4 benchlib.c -o benchlib.so
*/
#define _POSIX_C_SOURCE 200809L
#include <time.h>
#include <lua.h>
#include <lauxlib.h>

static int b_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
  return 1;
}

static int b_thread_cpu(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
  return 1;
}

static int b_noop(lua_State *L) {
  luaL_checktype(L, 1, LUA_TUSERDATA);
  luaL_checktype(L, 2, LUA_TUSERDATA);
  return 0;
}

static int ud_gc(lua_State *L) {
  void **p = (void **)lua_touserdata(L, 1);
  p[0] = NULL;
  return 0;
}

static int b_newud(lua_State *L) {
  void **p = (void **)lua_newuserdatauv(L, 2 * sizeof(void *), 0);
  p[0] = p[1] = NULL;
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_setmetatable(L, -2);
  return 1;
}

int luaopen_benchlib(lua_State *L);
int luaopen_benchlib(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, b_now);
  lua_setfield(L, -2, "now");
  lua_pushcfunction(L, b_thread_cpu);
  lua_setfield(L, -2, "thread_cpu");
  lua_pushcfunction(L, b_noop);
  lua_setfield(L, -2, "noop");
  /* newud's metatable, with a __gc as a tensor handle has */
  lua_newtable(L);
  lua_pushcfunction(L, ud_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcclosure(L, b_newud, 1);
  lua_setfield(L, -2, "newud");
  return 1;
}
