/*
** blas_direct.c: the peer of bench/matmul.lua. OpenBLAS cblas_sgemm called
** directly from C on square float32 matrices, row-major, C = A * B with
** alpha = 1, beta = 0, into a preallocated C -- the best a C user gets from
** the same library keel calls.
**
** Built two ways by bench/run.sh:
**  - as the Lua module `blas_direct` (default), so that bench/matmul.lua can
**    interleave peer and keel repetitions in one process, on one OpenBLAS
**    instance with one thread pool:
**      blas_direct.setup(n)     allocates and fills A, B, C (n x n, malloc)
**      blas_direct.run(iters)   `iters` sgemm calls (the caller times them,
**                               with the same clock as the keel side)
**      blas_direct.threads()    -> openblas_get_num_threads()
**      blas_direct.config()     -> openblas_get_config()
**  - with -DBLAS_DIRECT_MAIN as a standalone program:
**      blas_direct N [reps [iters]]  prints the median GFLOP/s.
*/
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cblas.h>

/* declared by OpenBLAS's cblas.h; repeated in case another cblas.h is used */
extern int openblas_get_num_threads(void);
extern char *openblas_get_config(void);

static float *A, *B, *C;
static int N;

#ifdef BLAS_DIRECT_MAIN
static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
#endif

static int setup(int n) {
  size_t bytes = (size_t)n * (size_t)n * sizeof(float);
  uint64_t s = 0x9e3779b97f4a7c15ull;
  free(A); free(B); free(C);
  A = malloc(bytes); B = malloc(bytes); C = malloc(bytes);
  if (!A || !B || !C) return -1;
  for (size_t i = 0; i < (size_t)n * (size_t)n; i++) {
    s ^= s << 13; s ^= s >> 7; s ^= s << 17;   /* xorshift, uniform-ish in [-1, 1) */
    A[i] = (float)((double)(s >> 40) / (double)(1ull << 23) - 1.0);
    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
    B[i] = (float)((double)(s >> 40) / (double)(1ull << 23) - 1.0);
  }
  memset(C, 0, bytes);   /* touch every page before timing */
  N = n;
  return 0;
}

static void run(int iters) {
  for (int i = 0; i < iters; i++)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, N, N, 1.0f, A, N, B, N, 0.0f, C, N);
}

#ifdef BLAS_DIRECT_MAIN

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 1024, reps = argc > 2 ? atoi(argv[2]) : 7;
  int iters = argc > 3 ? atoi(argv[3]) : 1;
  double t[256];
  if (n <= 0 || reps <= 0 || reps > 256 || iters <= 0 || setup(n)) {
    fprintf(stderr, "usage: blas_direct N [reps<=256 [iters]]\n");
    return 1;
  }
  run(1);  /* warmup: thread pool, page faults, caches */
  for (int r = 0; r < reps; r++) {
    double t0 = now();
    run(iters);
    t[r] = (now() - t0) / iters;
  }
  qsort(t, (size_t)reps, sizeof t[0], cmp);
  printf("RESULT name=blas_direct_%d_t%d value=%.2f unit=GFLOP/s\n", n, openblas_get_num_threads(),
         2.0 * n * n * (double)n / t[reps / 2] * 1e-9);
  return 0;
}

#else

#include <lua.h>
#include <lauxlib.h>

static int l_setup(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n > 0 && n <= 32768, 1, "size out of range");
  if (setup((int)n)) return luaL_error(L, "blas_direct.setup: out of memory");
  return 0;
}

static int l_run(lua_State *L) {
  lua_Integer iters = luaL_optinteger(L, 1, 1);
  if (!A) return luaL_error(L, "blas_direct.run: call setup(n) first");
  run((int)iters);
  return 0;
}

static int l_threads(lua_State *L) {
  lua_pushinteger(L, openblas_get_num_threads());
  return 1;
}

static int l_config(lua_State *L) {
  lua_pushstring(L, openblas_get_config());
  return 1;
}

int luaopen_blas_direct(lua_State *L);
int luaopen_blas_direct(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"setup", l_setup}, {"run", l_run}, {"threads", l_threads}, {"config", l_config}, {NULL, NULL}
  };
  luaL_newlib(L, fns);
  return 1;
}

#endif
