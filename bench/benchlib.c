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
**   benchlib.memcpy_time(nbytes, reps)
**                         median wall time in seconds of one memcpy of
**                         nbytes between two buffers touched beforehand:
**                         the memory-traffic peer of bandwidth-bound steps.
**
** Build: gcc -O2 -shared -fPIC -I/usr/include/lua5.4 benchlib.c -o benchlib.so
*/
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <string.h>
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

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static int b_memcpy_time(lua_State *L) {
  size_t n = (size_t)luaL_checkinteger(L, 1);
  int reps = (int)luaL_optinteger(L, 2, 5);
  char *a, *b;
  double *t;
  if (reps < 1 || reps > 1000) return luaL_error(L, "memcpy_time: reps must be 1..1000");
  a = (char *)malloc(n);
  b = (char *)malloc(n);
  t = (double *)malloc(sizeof(double) * (size_t)reps);
  if (!a || !b || !t) { free(a); free(b); free(t); return luaL_error(L, "memcpy_time: out of memory"); }
  memset(a, 1, n);
  memset(b, 2, n);
  for (int i = 0; i < reps; i++) {
    double t0 = now_s();
    memcpy(b, a, n);
    t[i] = now_s() - t0;
    a[i % n] = b[(i * 7) % n];   /* keep the copies observable */
  }
  qsort(t, (size_t)reps, sizeof(double), cmp_double);
  lua_pushnumber(L, t[reps / 2]);
  free(a); free(b); free(t);
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
  lua_pushcfunction(L, b_memcpy_time);
  lua_setfield(L, -2, "memcpy_time");
  /* newud's metatable, with a __gc as a tensor handle has */
  lua_newtable(L);
  lua_pushcfunction(L, ud_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcclosure(L, b_newud, 1);
  lua_setfield(L, -2, "newud");
  return 1;
}
