/*
** overhead_c.c: the engine-only half of bench/overhead.lua. The same tiny
** ops through keel's C API (libkeel.a), no Lua: the difference between
** overhead_<op> and overhead_engine_<op> is what the Lua binding costs
** (argument checks, userdata, GC), the rest is the engine (handles,
** storage, broadcasting, dispatch, autograd).
**
**   overhead_c [reps [n]]   prints RESULT name=overhead_engine_<op> ... unit=us
*/
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "keel.h"

/* BENCH_CLOCK=wall: monotonic; else (default) this thread's CPU time, as
** bench/overhead.lua */
static clockid_t clk = CLOCK_THREAD_CPUTIME_ID;

static double now(void) {
  struct timespec ts;
  clock_gettime(clk, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static keel_ctx *ctx;
static keel_tensor *a, *b, *x, *w, *wl, *bias;

static void check(keel_status st) {
  if (st != KEEL_OK) {
    fprintf(stderr, "overhead_c: %s\n", keel_last_error(ctx));
    exit(1);
  }
}

static void op_add(void) {
  keel_tensor *c;
  check(keel_binary(ctx, KEEL_BIN_ADD, a, b, &c));
  keel_tensor_release(c);
}

static void op_add_scalar(void) {
  keel_tensor *c;
  check(keel_binary_scalar(ctx, KEEL_BIN_ADD, a, 1.0, 0, &c));
  keel_tensor_release(c);
}

static void op_relu(void) {
  keel_tensor *c;
  check(keel_unary(ctx, KEEL_UN_RELU, a, &c));
  keel_tensor_release(c);
}

static void op_sum(void) {
  keel_tensor *c;
  check(keel_reduce(ctx, KEEL_RED_SUM, a, 0, NULL, 0, &c, NULL));
  keel_tensor_release(c);
}

static void op_matmul(void) {
  keel_tensor *c;
  check(keel_matmul(ctx, x, w, &c));
  keel_tensor_release(c);
}

static void op_linear(void) {
  keel_tensor *h, *y, *l;
  check(keel_matmul(ctx, x, wl, &h));
  check(keel_binary(ctx, KEEL_BIN_ADD, h, bias, &y));
  check(keel_reduce(ctx, KEEL_RED_SUM, y, 0, NULL, 0, &l, NULL));
  check(keel_backward(ctx, l, NULL, 0));
  check(keel_set_grad(ctx, wl, NULL));
  check(keel_set_grad(ctx, bias, NULL));
  keel_tensor_release(l);
  keel_tensor_release(y);
  keel_tensor_release(h);
}

typedef struct bcase { const char *name; void (*fn)(void); int div; } bcase;

int main(int argc, char **argv) {
  int reps = argc > 1 ? atoi(argv[1]) : 5;
  long n = argc > 2 ? atol(argv[2]) : 300000;
  int64_t s4[1] = {4}, s44[2] = {4, 4};
  static const bcase cases[] = {
    {"add", op_add, 1}, {"add_scalar", op_add_scalar, 1}, {"relu", op_relu, 1},
    {"sum", op_sum, 1}, {"matmul", op_matmul, 1}, {"linear_fwd_bwd", op_linear, 10},
  };
  enum { NC = sizeof cases / sizeof cases[0] };
  double t[NC][64];
  const char *ce = getenv("BENCH_CLOCK");
  if (ce && !strcmp(ce, "wall")) clk = CLOCK_MONOTONIC;
  if (reps < 1 || reps > 64 || n < 10) { fprintf(stderr, "usage: overhead_c [reps<=64 [n]]\n"); return 2; }
  check(keel_ctx_new(&ctx, NULL, NULL));
  keel_manual_seed(ctx, 1);
  check(keel_randn(ctx, KEEL_F32, 1, s4, &a));
  check(keel_randn(ctx, KEEL_F32, 1, s4, &b));
  check(keel_randn(ctx, KEEL_F32, 2, s44, &x));
  check(keel_randn(ctx, KEEL_F32, 2, s44, &w));
  check(keel_randn(ctx, KEEL_F32, 2, s44, &wl));
  check(keel_randn(ctx, KEEL_F32, 1, s4, &bias));
  check(keel_set_requires_grad(ctx, wl, 1));
  check(keel_set_requires_grad(ctx, bias, 1));
  for (int c = 0; c < NC; c++)  /* warmup */
    for (long i = 0; i < n / 10 / cases[c].div; i++) cases[c].fn();
  for (int r = 0; r < reps; r++)
    for (int c = 0; c < NC; c++) {
      long m = n / cases[c].div;
      double t0 = now();
      for (long i = 0; i < m; i++) cases[c].fn();
      t[c][r] = (now() - t0) / (double)m * 1e6;
    }
  for (int c = 0; c < NC; c++) {
    qsort(t[c], (size_t)reps, sizeof(double), cmp);
    printf("RESULT name=overhead_engine_%s value=%.4g unit=us\n", cases[c].name, t[c][reps / 2]);
  }
  keel_tensor_release(a); keel_tensor_release(b); keel_tensor_release(x);
  keel_tensor_release(w); keel_tensor_release(wl); keel_tensor_release(bias);
  keel_ctx_free(ctx);
  return 0;
}
