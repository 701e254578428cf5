/*
** test_engine.c: a Lua-free test of the public C API (engine/keel.h only).
**
** Prints one line per check and ends with "N passed, N failed"; the exit
** status is non-zero when a check failed.
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel.h"

static int n_pass, n_fail;

static void check(int ok, const char *what, const char *detail) {
  if (ok) {
    n_pass++;
    printf("ok   %s\n", what);
  } else {
    n_fail++;
    printf("FAIL %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  }
}

#define CHECK(cond, what) check((cond) != 0, (what), NULL)
#define CHECK_OK(ctx, expr, what) do { \
    keel_status st_ = (expr); \
    check(st_ == KEEL_OK, (what), st_ == KEEL_OK ? NULL : keel_last_error(ctx)); \
  } while (0)

static int near(double a, double b, double tol) { return fabs(a - b) <= tol; }

/* {====================================================================
** A counting allocator (lua_Alloc shaped)
** ===================================================================== */

typedef struct counter {
  long blocks;        /* live blocks */
  long long bytes;    /* live bytes, from osize/nsize */
  long total_allocs;
  int fail_after;     /* > 0: the n-th allocation from now fails */
  int fail_more;      /* and this many after it (storage allocations retry once) */
} counter;

static void *counting_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  counter *c = (counter *)ud;
  if (nsize == 0) {
    if (ptr) {
      c->blocks--;
      c->bytes -= (long long)osize;
      free(ptr);
    }
    return NULL;
  }
  if (c->fail_after > 0 && --c->fail_after == 0) {
    if (c->fail_more > 0) {
      c->fail_more--;
      c->fail_after = 1;
    }
    return NULL;
  }
  if (!ptr) {
    void *p = malloc(nsize);
    if (p) {
      c->blocks++;
      c->bytes += (long long)nsize;
      c->total_allocs++;
    }
    return p;
  } else {
    void *p = realloc(ptr, nsize);
    if (p) c->bytes += (long long)nsize - (long long)osize;
    return p;
  }
}

/* }==================================================================== */

static keel_tensor *from(keel_ctx *ctx, keel_dtype dt, int ndim, const int64_t *shape,
                         const double *data) {
  keel_tensor *t = NULL;
  if (keel_from_doubles(ctx, dt, ndim, shape, data, &t) != KEEL_OK) {
    printf("FAIL keel_from_doubles: %s\n", keel_last_error(ctx));
    n_fail++;
    return NULL;
  }
  return t;
}

static int read_all(keel_ctx *ctx, const keel_tensor *t, double *dst, int64_t n) {
  return keel_tensor_read(ctx, t, dst, n) == KEEL_OK;
}

static int same_values(const double *a, const double *b, int n, double tol) {
  for (int i = 0; i < n; i++)
    if (!near(a[i], b[i], tol)) return 0;
  return 1;
}

/* {====================================================================
** Checks
** ===================================================================== */

static void test_basics(void) {
  CHECK(strcmp(keel_dtype_name(KEEL_F32), "float32") == 0, "dtype name float32");
  CHECK(strcmp(keel_dtype_name(KEEL_F64), "float64") == 0, "dtype name float64");
  CHECK(strcmp(keel_dtype_name(KEEL_I64), "int64") == 0, "dtype name int64");
  CHECK(keel_dtype_size(KEEL_F32) == 4 && keel_dtype_size(KEEL_F64) == 8 &&
        keel_dtype_size(KEEL_I64) == 8, "dtype sizes");
  CHECK(keel_status_name(KEEL_OK) != NULL && keel_status_name(KEEL_ERR_SHAPE) != NULL,
        "status names");
  CHECK(keel_op_count() > 0, "op table is not empty");
  {
    int found = 0;
    for (int i = 0; i < keel_op_count(); i++)
      if (keel_op_name(i) && strcmp(keel_op_name(i), "matmul") == 0) found = 1;
    CHECK(found, "op table lists matmul");
  }
}

static void test_creation(void) {
  counter c = {0};
  keel_ctx *ctx = NULL;
  keel_tensor *z = NULL, *o = NULL, *a = NULL, *e = NULL;
  int64_t shape[2] = {2, 3};
  double buf[6];
  CHECK_OK(ctx, keel_ctx_new(&ctx, counting_alloc, &c), "ctx with a custom allocator");
  if (!ctx) return;
  CHECK(c.blocks > 0, "the custom allocator is used for the context");
  CHECK_OK(ctx, keel_zeros(ctx, KEEL_F32, 2, shape, &z), "zeros 2x3");
  CHECK(z && keel_tensor_ndim(z) == 2 && keel_tensor_shape(z)[0] == 2 &&
        keel_tensor_shape(z)[1] == 3 && keel_tensor_numel(z) == 6, "zeros shape");
  CHECK(z && keel_tensor_strides(z)[0] == 3 && keel_tensor_strides(z)[1] == 1 &&
        keel_tensor_is_contiguous(z) && keel_tensor_offset(z) == 0, "zeros strides");
  CHECK(z && keel_tensor_dtype(z) == KEEL_F32 && keel_tensor_device(z) == KEEL_CPU,
        "zeros dtype/device");
  CHECK(z && keel_tensor_ctx(z) == ctx, "tensor knows its context");
  CHECK_OK(ctx, keel_full(ctx, KEEL_F64, 2, shape, 2.5, &o), "full");
  CHECK(o && read_all(ctx, o, buf, 6) && buf[0] == 2.5 && buf[5] == 2.5, "full values");
  CHECK_OK(ctx, keel_arange(ctx, KEEL_F64, 1, 4, 0.5, &a), "arange");
  CHECK(a && keel_tensor_numel(a) == 6 && read_all(ctx, a, buf, 6) && buf[0] == 1 &&
        buf[5] == 3.5, "arange values");
  CHECK_OK(ctx, keel_eye(ctx, KEEL_F32, 2, 3, &e), "eye");
  CHECK(e && read_all(ctx, e, buf, 6) && buf[0] == 1 && buf[1] == 0 && buf[4] == 1 &&
        buf[5] == 0, "eye values");
  {
    int64_t idx[2] = {1, 2};
    double v = 0;
    CHECK_OK(ctx, keel_tensor_set(ctx, z, idx, 7.0), "set element");
    CHECK(keel_tensor_get(ctx, z, idx, &v) == KEEL_OK && v == 7.0, "get element");
    idx[1] = 3;
    CHECK(keel_tensor_get(ctx, z, idx, &v) == KEEL_ERR_INDEX, "get out of range is KEEL_ERR_INDEX");
    CHECK(strstr(keel_last_error(ctx), "get") != NULL, "get error names the function");
  }
  {
    int64_t neg[2] = {2, -1};
    keel_tensor *bad = (keel_tensor *)0x1;
    keel_status st = keel_zeros(ctx, KEEL_F32, 2, neg, &bad);
    CHECK(st != KEEL_OK && bad == NULL, "negative size fails and produces no tensor");
    CHECK(strstr(keel_last_error(ctx), "negative") != NULL, "negative size message");
  }
  keel_tensor_release(z);
  keel_tensor_release(o);
  keel_tensor_release(a);
  keel_tensor_release(e);
  keel_ctx_free(ctx);
  CHECK(c.blocks == 0, "every block freed after keel_ctx_free");
  CHECK(c.bytes == 0, "every byte freed after keel_ctx_free");
}

/* loss = sum(x @ w): d/dw = x^T @ ones, d/dx = ones @ w^T */
static void test_matmul_backward(void) {
  counter c = {0};
  keel_ctx *ctx = NULL;
  keel_tensor *x, *w, *y = NULL, *loss = NULL, *gw, *gx;
  int64_t xs[2] = {2, 3}, ws[2] = {3, 2};
  double xd[6] = {1, 2, 3, 4, 5, 6};
  double wd[6] = {1, -1, 0.5, 2, -2, 0};
  double buf[6], v = 0;
  keel_ctx_new(&ctx, counting_alloc, &c);
  if (!ctx) { check(0, "ctx", NULL); return; }
  x = from(ctx, KEEL_F64, 2, xs, xd);
  w = from(ctx, KEEL_F64, 2, ws, wd);
  if (!x || !w) return;
  CHECK_OK(ctx, keel_set_requires_grad(ctx, x, 1), "requires_grad x");
  CHECK_OK(ctx, keel_set_requires_grad(ctx, w, 1), "requires_grad w");
  CHECK_OK(ctx, keel_matmul(ctx, x, w, &y), "matmul");
  {
    /* y = [[1-... ]]: row0 = [1*1+2*0.5+3*-2, 1*-1+2*2+3*0] = [-4, 3]
    **                 row1 = [4+2.5-12, -4+10+0] = [-5.5, 6] */
    double ey[4] = {-4, 3, -5.5, 6};
    CHECK(y && keel_tensor_shape(y)[0] == 2 && keel_tensor_shape(y)[1] == 2 &&
          read_all(ctx, y, buf, 4) && same_values(buf, ey, 4, 1e-12), "matmul values");
    CHECK(y && keel_grad_fn_name(y) && strcmp(keel_grad_fn_name(y), "matmul") == 0,
          "grad_fn of matmul output");
    CHECK(!keel_is_leaf(y) && keel_requires_grad(y) && keel_is_leaf(x), "leaf flags");
  }
  CHECK_OK(ctx, keel_reduce(ctx, KEEL_RED_SUM, y, 0, NULL, 0, &loss, NULL), "sum");
  CHECK(loss && keel_item(ctx, loss, &v) == KEEL_OK && v == -0.5, "sum value");
  CHECK_OK(ctx, keel_backward(ctx, loss, NULL, 0), "backward");
  gw = keel_tensor_grad(w);
  gx = keel_tensor_grad(x);
  {
    /* dL/dw[k][j] = sum_i x[i][k] = column sums of x: [5, 7, 9] per column */
    double egw[6] = {5, 5, 7, 7, 9, 9};
    /* dL/dx[i][k] = sum_j w[k][j] = [0, 2.5, -2] per row */
    double egx[6] = {0, 2.5, -2, 0, 2.5, -2};
    CHECK(gw && read_all(ctx, gw, buf, 6) && same_values(buf, egw, 6, 1e-12), "grad of w");
    CHECK(gx && read_all(ctx, gx, buf, 6) && same_values(buf, egx, 6, 1e-12), "grad of x");
  }
  /* a second backward without retain_graph is refused */
  {
    keel_status st = keel_backward(ctx, loss, NULL, 0);
    CHECK(st == KEEL_ERR_STATE, "second backward is KEEL_ERR_STATE");
    CHECK(strstr(keel_last_error(ctx), "retain_graph") != NULL, "message names retain_graph");
  }
  /* accumulation */
  {
    keel_tensor *y2 = NULL, *l2 = NULL;
    double egw[6] = {10, 10, 14, 14, 18, 18};
    keel_matmul(ctx, x, w, &y2);
    keel_reduce(ctx, KEEL_RED_SUM, y2, 0, NULL, 0, &l2, NULL);
    CHECK_OK(ctx, keel_backward(ctx, l2, NULL, 0), "backward again on a new graph");
    gw = keel_tensor_grad(w);
    CHECK(gw && read_all(ctx, gw, buf, 6) && same_values(buf, egw, 6, 1e-12),
          "gradients accumulate");
    CHECK_OK(ctx, keel_set_grad(ctx, w, NULL), "clear grad");
    CHECK(keel_tensor_grad(w) == NULL, "grad cleared");
    keel_tensor_release(y2);
    keel_tensor_release(l2);
  }
  keel_tensor_release(y);
  keel_tensor_release(loss);
  keel_tensor_release(x);
  keel_tensor_release(w);
  keel_ctx_free(ctx);
  CHECK(c.blocks == 0 && c.bytes == 0, "matmul/backward: everything freed");
}

static void test_errors(void) {
  counter c = {0};
  keel_ctx *ctx = NULL;
  keel_tensor *a = NULL, *b = NULL, *out = NULL;
  int64_t as[2] = {64, 784}, bs[2] = {128, 10};
  keel_ctx_new(&ctx, counting_alloc, &c);
  if (!ctx) { check(0, "ctx", NULL); return; }
  keel_zeros(ctx, KEEL_F32, 2, as, &a);
  keel_zeros(ctx, KEEL_F32, 2, bs, &b);
  {
    keel_status st = keel_matmul(ctx, a, b, &out);
    CHECK(st == KEEL_ERR_SHAPE, "matmul shape mismatch is KEEL_ERR_SHAPE");
    CHECK(keel_last_status(ctx) == KEEL_ERR_SHAPE, "last_status is KEEL_ERR_SHAPE");
    CHECK(out == NULL, "no output on error");
    CHECK(strstr(keel_last_error(ctx), "matmul") != NULL, "message names matmul");
    CHECK(strstr(keel_last_error(ctx), "784") != NULL && strstr(keel_last_error(ctx), "128"),
          "message gives both sizes");
    printf("     (message: %s)\n", keel_last_error(ctx));
  }
  {
    int64_t s3[1] = {4};
    keel_tensor *v = NULL;
    keel_zeros(ctx, KEEL_F32, 1, s3, &v);
    CHECK(keel_add(ctx, a, v, &out) == KEEL_ERR_SHAPE && out == NULL,
          "broadcast mismatch is KEEL_ERR_SHAPE");
    CHECK(keel_narrow(ctx, a, 5, 0, 1, &out) == KEEL_ERR_INDEX, "bad dim is KEEL_ERR_INDEX");
    CHECK(keel_narrow(ctx, a, 1, 780, 10, &out) != KEEL_OK && out == NULL,
          "narrow past the end fails");
    keel_tensor_release(v);
  }
  {
    int64_t is[1] = {2};
    double id[2] = {1, 2};
    keel_tensor *i = from(ctx, KEEL_I64, 1, is, id);
    CHECK(keel_unary(ctx, KEEL_UN_EXP, i, &out) == KEEL_ERR_TYPE, "exp of int64 is KEEL_ERR_TYPE");
    CHECK(keel_set_requires_grad(ctx, i, 1) == KEEL_ERR_TYPE, "requires_grad on int64 refused");
    keel_tensor_release(i);
  }
  {
    keel_tensor *t = NULL;
    int64_t s[1] = {3};
    keel_ones(ctx, KEEL_F32, 1, s, &t);
    CHECK(keel_backward(ctx, t, NULL, 0) == KEEL_ERR_STATE,
          "backward on a tensor without grad is KEEL_ERR_STATE");
    keel_set_requires_grad(ctx, t, 1);
    CHECK(keel_binary_scalar_(ctx, KEEL_BIN_ADD, t, 1.0) == KEEL_ERR_STATE,
          "in-place on a tensor requiring grad is refused");
    {
      int old = keel_set_grad_enabled(ctx, 0);
      CHECK(keel_binary_scalar_(ctx, KEEL_BIN_ADD, t, 1.0) == KEEL_OK,
            "in-place allowed with grad mode off");
      keel_set_grad_enabled(ctx, old);
    }
    keel_tensor_release(t);
  }
  keel_tensor_release(a);
  keel_tensor_release(b);
  keel_ctx_free(ctx);
  CHECK(c.blocks == 0 && c.bytes == 0, "errors: everything freed");
}

static void test_two_contexts(void) {
  keel_ctx *c1 = NULL, *c2 = NULL;
  keel_tensor *r1 = NULL, *r2 = NULL, *r3 = NULL;
  int64_t s[1] = {8};
  double b1[8], b2[8], b3[8];
  keel_ctx_new(&c1, NULL, NULL);
  keel_ctx_new(&c2, NULL, NULL);
  if (!c1 || !c2) { check(0, "two contexts", NULL); return; }
  /* same seed, then seeding one must not change the other's stream */
  keel_manual_seed(c1, 5);
  keel_manual_seed(c2, 5);
  keel_rand(c1, KEEL_F64, 1, s, &r1);
  keel_manual_seed(c1, 99);               /* reseed c1 only */
  keel_rand(c2, KEEL_F64, 1, s, &r2);
  CHECK(r1 && r2 && read_all(c1, r1, b1, 8) && read_all(c2, r2, b2, 8) &&
        same_values(b1, b2, 8, 0), "seeding one context does not change the other");
  keel_manual_seed(c2, 5);
  keel_rand(c2, KEEL_F64, 1, s, &r3);
  CHECK(r3 && read_all(c2, r3, b3, 8) && same_values(b1, b3, 8, 0), "same seed, same numbers");
  {
    int any_outside = 0;
    for (int i = 0; i < 8; i++) if (b1[i] < 0 || b1[i] >= 1) any_outside = 1;
    CHECK(!any_outside, "rand in [0, 1)");
  }
  /* grad mode */
  keel_set_grad_enabled(c1, 0);
  CHECK(!keel_is_grad_enabled(c1) && keel_is_grad_enabled(c2), "grad mode is per context");
  {
    keel_tensor *x = NULL, *y = NULL, *x2 = NULL, *y2 = NULL;
    keel_ones(c1, KEEL_F32, 1, s, &x);
    keel_set_requires_grad(c1, x, 1);
    keel_unary(c1, KEEL_UN_EXP, x, &y);
    CHECK(y && !keel_requires_grad(y), "no recording while grad mode is off");
    keel_ones(c2, KEEL_F32, 1, s, &x2);
    keel_set_requires_grad(c2, x2, 1);
    keel_unary(c2, KEEL_UN_EXP, x2, &y2);
    CHECK(y2 && keel_requires_grad(y2), "the other context still records");
    {
      keel_tensor *bad = NULL;
      keel_status st = keel_add(c1, x, x2, &bad);
      CHECK(st != KEEL_OK && bad == NULL, "mixing tensors of two contexts fails");
    }
    keel_tensor_release(x);
    keel_tensor_release(y);
    keel_tensor_release(x2);
    keel_tensor_release(y2);
  }
  CHECK(keel_set_grad_enabled(c1, 1) == 0, "set_grad_enabled returns the previous mode");
  /* errors are per context */
  {
    keel_tensor *bad = NULL;
    int64_t neg[1] = {-1};
    keel_zeros(c1, KEEL_F32, 1, neg, &bad);
    CHECK(keel_last_status(c2) == KEEL_OK || strstr(keel_last_error(c2), "negative") == NULL,
          "an error in one context is not reported in the other");
  }
  keel_tensor_release(r1);
  keel_tensor_release(r2);
  keel_tensor_release(r3);
  keel_ctx_free(c1);
  keel_ctx_free(c2);
}

/* {====================================================================
** Hooks
** ===================================================================== */

typedef struct hook_state {
  int calls;
  double seen0;
  double scale;
  int fail;
  int freed;
} hook_state;

static keel_status scale_hook(keel_ctx *ctx, void *ud, keel_tensor *grad, keel_tensor **replace) {
  hook_state *h = (hook_state *)ud;
  int64_t idx[1] = {0};
  h->calls++;
  keel_tensor_get(ctx, grad, idx, &h->seen0);
  if (h->fail) return KEEL_ERR_CALLBACK;
  if (h->scale != 1.0) return keel_binary_scalar(ctx, KEEL_BIN_MUL, grad, h->scale, 0, replace);
  return KEEL_OK;
}

static void free_state(void *ud) { ((hook_state *)ud)->freed++; }

static void test_hooks(void) {
  counter c = {0};
  keel_ctx *ctx = NULL;
  keel_tensor *x, *y = NULL, *loss = NULL;
  int64_t s[1] = {3};
  double xd[3] = {1, 2, 3}, buf[3];
  hook_state hs = {0, 0, 10.0, 0, 0};
  uint64_t id = 0;
  keel_ctx_new(&ctx, counting_alloc, &c);
  if (!ctx) { check(0, "ctx", NULL); return; }
  x = from(ctx, KEEL_F64, 1, s, xd);
  keel_set_requires_grad(ctx, x, 1);
  CHECK_OK(ctx, keel_register_hook(ctx, x, scale_hook, &hs, free_state, &id), "register hook");
  keel_binary(ctx, KEEL_BIN_MUL, x, x, &y);              /* y = x*x, dy/dx = 2x */
  keel_reduce(ctx, KEEL_RED_SUM, y, 0, NULL, 0, &loss, NULL);
  CHECK_OK(ctx, keel_backward(ctx, loss, NULL, 0), "backward with a hook");
  CHECK(hs.calls == 1 && hs.seen0 == 2.0, "hook called once with the gradient");
  {
    double e[3] = {20, 40, 60};
    CHECK(keel_tensor_grad(x) && read_all(ctx, keel_tensor_grad(x), buf, 3) &&
          same_values(buf, e, 3, 1e-12), "hook replacement becomes .grad");
  }
  keel_tensor_release(y);
  keel_tensor_release(loss);
  /* a failing hook aborts backward and leaves .grad as it was */
  hs.fail = 1;
  keel_binary(ctx, KEEL_BIN_MUL, x, x, &y);
  keel_reduce(ctx, KEEL_RED_SUM, y, 0, NULL, 0, &loss, NULL);
  {
    keel_status st = keel_backward(ctx, loss, NULL, 0);
    double e[3] = {20, 40, 60};
    CHECK(st != KEEL_OK, "failing hook makes backward fail");
    CHECK(keel_tensor_grad(x) && read_all(ctx, keel_tensor_grad(x), buf, 3) &&
          same_values(buf, e, 3, 0), ".grad unchanged after a failing hook");
  }
  keel_tensor_release(y);
  keel_tensor_release(loss);
  CHECK(keel_remove_hook(ctx, x, id) == 1, "remove hook");
  CHECK(hs.freed == 1, "free_ud called on removal");
  CHECK(keel_remove_hook(ctx, x, id) == 0, "removing twice returns 0");
  hs.fail = 0;
  keel_set_grad(ctx, x, NULL);
  keel_binary(ctx, KEEL_BIN_MUL, x, x, &y);
  keel_reduce(ctx, KEEL_RED_SUM, y, 0, NULL, 0, &loss, NULL);
  {
    int before = hs.calls;
    double e[3] = {2, 4, 6};
    keel_backward(ctx, loss, NULL, 0);
    CHECK(hs.calls == before, "removed hook not called");
    CHECK(keel_tensor_grad(x) && read_all(ctx, keel_tensor_grad(x), buf, 3) &&
          same_values(buf, e, 3, 1e-12), "plain gradient after removal");
  }
  keel_tensor_release(y);
  keel_tensor_release(loss);
  /* a hook still registered when its tensor dies is freed with it */
  {
    hook_state h2 = {0, 0, 1.0, 0, 0};
    keel_register_hook(ctx, x, scale_hook, &h2, free_state, NULL);
    keel_tensor_release(x);
    CHECK(h2.freed == 1, "free_ud called when the tensor dies");
  }
  keel_ctx_free(ctx);
  CHECK(c.blocks == 0 && c.bytes == 0, "hooks: everything freed");
}

/* Freeing the context before the tensors: the tensors stay usable and the
** memory goes back when the last one is released. */
static void test_ctx_outlived(void) {
  counter c = {0};
  keel_ctx *ctx = NULL;
  keel_tensor *t = NULL;
  int64_t s[1] = {1000};
  double v = 0;
  keel_ctx_new(&ctx, counting_alloc, &c);
  if (!ctx) { check(0, "ctx", NULL); return; }
  keel_full(ctx, KEEL_F32, 1, s, 3.0, &t);
  keel_ctx_free(ctx);
  CHECK(c.blocks > 0, "context kept alive by a live tensor");
  {
    int64_t idx[1] = {999};
    CHECK(keel_tensor_get(ctx, t, idx, &v) == KEEL_OK && v == 3.0, "tensor usable after ctx_free");
  }
  keel_tensor_release(t);
  CHECK(c.blocks == 0 && c.bytes == 0, "last release frees everything");
}

/* Allocation failure is a status, never a crash. */
static void test_nomem(void) {
  counter c = {0};
  keel_ctx *ctx = NULL;
  keel_tensor *t = (keel_tensor *)0x1;
  int64_t s[2] = {256, 256};
  keel_status st;
  keel_ctx_new(&ctx, counting_alloc, &c);
  if (!ctx) { check(0, "ctx", NULL); return; }
  c.fail_after = 1;  /* the next allocation fails */
  st = keel_zeros(ctx, KEEL_F32, 2, s, &t);
  c.fail_after = 0;
  CHECK(st == KEEL_ERR_NOMEM && t == NULL, "failed allocation gives KEEL_ERR_NOMEM");
  st = keel_zeros(ctx, KEEL_F32, 2, s, &t);
  CHECK(st == KEEL_OK && t != NULL, "the next allocation works");
  keel_tensor_release(t);
  keel_ctx_free(ctx);
  CHECK(c.blocks == 0 && c.bytes == 0, "nomem: everything freed");
}


/* A reduced matmul precision rounds copies of the operands (gemm.c): a
** failed allocation of those is KEEL_ERR_NOMEM with its message, never a
** crash or a leak, and the product under bfloat16 is the product of the
** rounded values. Each try gets a fresh context (the block cache would
** otherwise serve later tries). */
static void test_matmul_precision(void) {
  int64_t sa[2] = {64, 64}, sb[2] = {64, 1};
  static double va[64 * 64], vb[64];
  int seen_nomem = 0, worked = 0, leaks = 0;
  for (int i = 0; i < 64; i++) vb[i] = 1;
  va[0] = 1.0001;
  va[65] = 70000;
  for (int n = 1; n < 60 && !worked; n++) {
    counter c = {0};
    keel_ctx *ctx = NULL;
    keel_tensor *a, *b, *out = NULL;
    keel_status st;
    keel_ctx_new(&ctx, counting_alloc, &c);
    if (!ctx) { check(0, "ctx", NULL); return; }
    a = from(ctx, KEEL_F32, 2, sa, va);
    b = from(ctx, KEEL_F32, 2, sb, vb);
    if (n == 1)
      CHECK(keel_set_matmul_precision(ctx, KEEL_MATMUL_BF16) == KEEL_MATMUL_HIGHEST, "precision: previous is highest");
    else
      keel_set_matmul_precision(ctx, KEEL_MATMUL_BF16);
    c.fail_after = n;
    c.fail_more = 1;   /* past the allocator's one retry */
    st = keel_matmul(ctx, a, b, &out);
    c.fail_after = c.fail_more = 0;
    if (st == KEEL_ERR_NOMEM && strstr(keel_last_error(ctx), "rounded operands")) seen_nomem = 1;
    if (st == KEEL_OK) {
      int64_t i0[2] = {0, 0}, i1[2] = {1, 0};
      double v = 0;
      worked = 1;
      keel_tensor_get(ctx, out, i0, &v);
      CHECK(v == 1.0, "precision: bfloat16 rounds 1.0001 to 1");
      keel_tensor_get(ctx, out, i1, &v);
      CHECK(v == 70144.0, "precision: bfloat16 rounds 70000 to 70144");
    } else if (st != KEEL_ERR_NOMEM || out) {
      check(0, "precision: a failed allocation gives KEEL_ERR_NOMEM and no result", keel_last_error(ctx));
      worked = 1;
    }
    keel_tensor_release(out);
    keel_tensor_release(a);
    keel_tensor_release(b);
    keel_ctx_free(ctx);
    if (c.blocks || c.bytes) leaks = 1;
  }
  CHECK(worked && seen_nomem, "precision: allocation failures of the rounded operands are KEEL_ERR_NOMEM");
  CHECK(!leaks, "precision: everything freed after every failure");
}

/* {====================================================================
** Optimizers: hand-computed steps, the statistics pass, prepare/cancel
** ===================================================================== */

/* A float64 vector parameter with a gradient (both from values). */
static keel_tensor *param_with_grad(keel_ctx *ctx, int n, const double *w, const double *g) {
  int64_t s[1];
  keel_tensor *p, *gt;
  s[0] = n;
  p = from(ctx, KEEL_F64, 1, s, w);
  if (!p) return NULL;
  keel_set_requires_grad(ctx, p, 1);
  if (g) {
    gt = from(ctx, KEEL_F64, 1, s, g);
    keel_set_grad(ctx, p, gt);
    keel_tensor_release(gt);
  }
  return p;
}

static void set_grad_values(keel_ctx *ctx, keel_tensor *p, int n, const double *g) {
  int64_t s[1];
  keel_tensor *gt;
  s[0] = n;
  gt = from(ctx, KEEL_F64, 1, s, g);
  keel_set_grad(ctx, p, gt);
  keel_tensor_release(gt);
}

/* SGD with momentum 0.9, lr 0.1, two steps worked by hand:
** buf1 = g1, p1 = p0 - 0.1 buf1; buf2 = 0.9 buf1 + g2, p2 = p1 - 0.1 buf2. */
static void test_optim_sgd(void) {
  keel_ctx *ctx = NULL;
  keel_optim *o = NULL;
  keel_optim_hparams h;
  keel_step_report r;
  keel_tensor *p;
  double w0[2] = {1.0, -2.0}, g1[2] = {0.5, 1.0}, g2[2] = {1.0, -1.0}, got[2];
  const keel_update_stats *u;
  keel_ctx_new(&ctx, NULL, NULL);
  p = param_with_grad(ctx, 2, w0, g1);
  CHECK_OK(ctx, keel_optim_new(ctx, KEEL_OPTIM_SGD, &o), "optim: SGD created");
  keel_optim_hparams_default(KEEL_OPTIM_SGD, &h);
  h.lr = 0.1;
  h.momentum = 0.9;
  CHECK_OK(ctx, keel_optim_add_group(o, 1, &p, &h, NULL), "optim: add_group");
  CHECK_OK(ctx, keel_optim_step(o, &r), "optim: SGD step 1");
  read_all(ctx, p, got, 2);
  CHECK(near(got[0], 1.0 - 0.1 * 0.5, 1e-15) && near(got[1], -2.0 - 0.1 * 1.0, 1e-15), "SGD step 1 by hand");
  CHECK(r.applied && r.step == 1 && r.n_updated == 1 && near(r.grad_norm, sqrt(1.25), 1e-15),
        "SGD step 1 report");
  CHECK_OK(ctx, keel_optim_last_updates(o, &u), "optim: last_updates");
  CHECK(u[0].step == 1 && near(u[0].update_sumsq, 0.05 * 0.05 + 0.1 * 0.1, 1e-16) && u[0].w_sumsq == 5.0,
        "SGD step 1 update size and weight before it");
  set_grad_values(ctx, p, 2, g2);
  CHECK_OK(ctx, keel_optim_step(o, &r), "optim: SGD step 2");
  read_all(ctx, p, got, 2);
  {
    double b0 = 0.9 * 0.5 + 1.0, b1 = 0.9 * 1.0 - 1.0;
    CHECK(near(got[0], 0.95 - 0.1 * b0, 1e-15) && near(got[1], -2.1 - 0.1 * b1, 1e-15), "SGD momentum step 2 by hand");
  }
  /* lr_scale multiplies lr at apply time; the group's lr stays */
  CHECK_OK(ctx, keel_optim_set_lr_scale(o, 0.0), "optim: lr_scale 0");
  CHECK(keel_optim_set_lr_scale(o, -1.0) == KEEL_ERR_ARG && keel_optim_get_lr_scale(o) == 0.0,
        "optim: negative lr_scale refused");
  {
    double before[2];
    read_all(ctx, p, before, 2);
    CHECK_OK(ctx, keel_optim_step(o, &r), "optim: step with lr_scale 0");
    read_all(ctx, p, got, 2);
    keel_optim_get_hparams(o, 0, &h);
    CHECK(got[0] == before[0] && got[1] == before[1] && h.lr == 0.1 && keel_optim_step_count(o) == 3,
          "lr_scale 0: parameters unchanged, lr kept, step counted");
  }
  keel_tensor_release(p);
  keel_optim_free(o);
  keel_ctx_free(ctx);
}

/* One statistics pass: counts, sums over finite elements, the weight. */
static void test_optim_stats(void) {
  keel_ctx *ctx = NULL;
  keel_optim *o = NULL;
  keel_optim_hparams h;
  keel_step_report r;
  keel_optim_counters c;
  keel_tensor *p, *q;
  double w[4] = {1, 2, 2, 0}, g[4] = {3, 0, -4, NAN}, w2[2] = {1, 1}, g2[2] = {1, 1};
  const keel_grad_stats *s;
  keel_status st;
  keel_ctx_new(&ctx, NULL, NULL);
  p = param_with_grad(ctx, 4, w, g);
  q = param_with_grad(ctx, 2, w2, g2);
  keel_optim_new(ctx, KEEL_OPTIM_ADAM, &o);
  keel_optim_hparams_default(KEEL_OPTIM_ADAM, &h);
  {
    keel_tensor *ps[2];
    ps[0] = p;
    ps[1] = q;
    keel_optim_add_group(o, 2, ps, &h, NULL);
  }
  CHECK(keel_optim_apply(o, &r) == KEEL_ERR_ARG, "apply with nothing prepared is refused");
  CHECK_OK(ctx, keel_optim_prepare(o, &r), "prepare with a NaN (error policy) does not fail");
  CHECK(!r.applied && r.reason && strcmp(r.reason, "nonfinite") == 0 && r.nonfinite == 1 && r.n_updated == 2,
        "prepare reports the non-finite step it would refuse");
  s = keel_optim_last_stats(o);
  CHECK(s[0].numel == 4 && s[0].nan == 1 && s[0].inf == 0 && s[0].zeros == 1, "stats: counts");
  CHECK(s[0].sum == -1 && s[0].sumsq == 25 && s[0].sum_abs == 7 && s[0].max_abs == 4, "stats: finite sums");
  CHECK(s[0].w_sumsq == 9 && s[1].w_sumsq == 2 && s[1].sumsq == 2, "stats: the weight's sum of squares");
  CHECK(r.top_param == 0 && near(r.top_share, 25.0 / 27.0, 1e-15), "prepare: top parameter and share");
  keel_optim_get_counters(o, &c);
  CHECK(c.errors == 0 && c.nonfinite_steps == 0, "prepare counts nothing");
  st = keel_optim_apply(o, &r);
  keel_optim_get_counters(o, &c);
  CHECK(st == KEEL_ERR_ARG && strstr(keel_last_error(ctx), "non-finite gradient") && c.errors == 1 &&
        c.nonfinite_steps == 1 && c.nonfinite_elements == 1 && keel_optim_step_count(o) == 0,
        "apply refuses the non-finite step (error policy) and counts it");
  CHECK(keel_optim_apply(o, &r) == KEEL_ERR_ARG, "a prepared step is applied once");
  {
    keel_grad_stats one;
    CHECK_OK(ctx, keel_optim_param_stats(o, 1, NULL, &one), "param_stats of a parameter");
    CHECK(one.numel == 2 && one.sumsq == 2 && one.w_sumsq == 2, "param_stats: gradient and weight");
    CHECK(keel_optim_param_stats(o, 0, keel_tensor_grad(q), &one) == KEEL_ERR_SHAPE,
          "param_stats: a gradient of another shape is refused");
  }
  keel_tensor_release(p);
  keel_tensor_release(q);
  keel_optim_free(o);
  keel_ctx_free(ctx);
}

/* Deferred reports on the CPU: nothing to defer, the report is complete on
** return; keel_optim_last_report gives the last step's, whichever way it
** ended (applied, skipped, cancelled). */
static void test_optim_deferred_cpu(void) {
  keel_ctx *ctx = NULL;
  keel_optim *o = NULL;
  keel_optim_hparams h;
  keel_step_report r, last;
  keel_tensor *p;
  double w[3] = {0.5, -1.5, 2.0}, g[3] = {0.1, 0.2, -0.3}, bad[3] = {0.1, NAN, 0.3};
  keel_ctx_new(&ctx, NULL, NULL);
  p = param_with_grad(ctx, 3, w, g);
  keel_optim_new(ctx, KEEL_OPTIM_ADAM, &o);
  keel_optim_hparams_default(KEEL_OPTIM_ADAM, &h);
  keel_optim_add_group(o, 1, &p, &h, NULL);
  keel_optim_set_nonfinite(o, KEEL_NONFINITE_SKIP);
  keel_optim_set_deferred_report(o, 1);
  CHECK_OK(ctx, keel_optim_step(o, &r), "deferred step on the CPU");
  CHECK(!keel_optim_report_pending(o) && r.applied && r.step == 1 && r.reason == NULL,
        "a CPU step's report is complete on return");
  CHECK_OK(ctx, keel_optim_last_report(o, &last), "last_report");
  CHECK(last.applied == r.applied && last.step == r.step && last.grad_norm == r.grad_norm,
        "last_report is the step's report");
  set_grad_values(ctx, p, 3, bad);
  CHECK_OK(ctx, keel_optim_step(o, &r), "a skipped deferred step on the CPU");
  CHECK_OK(ctx, keel_optim_last_report(o, &last), "last_report of a skipped step");
  CHECK(!last.applied && last.reason && strcmp(last.reason, "nonfinite") == 0 && last.step == 1 &&
        keel_optim_get_param_step(o, 0) == 1, "the skipped step's report; the step count stays");
  CHECK_OK(ctx, keel_optim_prepare(o, &r), "prepare");
  keel_optim_cancel(o, &r);
  CHECK_OK(ctx, keel_optim_last_report(o, &last), "last_report of a cancelled step");
  CHECK(last.reason && strcmp(last.reason, "cancelled") == 0, "last_report: cancelled");
  keel_tensor_release(p);
  keel_optim_free(o);
  keel_ctx_free(ctx);
}

/* prepare then cancel: parameters, state, counters, step counts and the
** adaptive clip state are byte for byte as before (cancelled + 1). */
static void test_optim_cancel(void) {
  counter cnt = {0};
  keel_ctx *ctx = NULL;
  keel_optim *o = NULL;
  keel_optim_hparams h;
  keel_clip_spec spec[2];
  keel_step_report r;
  keel_optim_counters c0, c1;
  keel_clip_state cs;
  keel_tensor *p;
  double w[3] = {0.5, -1.5, 2.0}, g[3] = {0.1, 0.2, -0.3}, big[3] = {30, -20, 10};
  double pw0[3], pw1[3], m0[3], m1[3], v0[3], v1[3], hist0[8], hist1[8], mean0, var0;
  int64_t n0, n1;
  keel_ctx_new(&ctx, counting_alloc, &cnt);
  p = param_with_grad(ctx, 3, w, g);
  keel_optim_new(ctx, KEEL_OPTIM_ADAM, &o);
  keel_optim_hparams_default(KEEL_OPTIM_ADAM, &h);
  h.lr = 0.01;
  keel_optim_add_group(o, 1, &p, &h, NULL);
  keel_clip_spec_default(KEEL_CLIP_PERCENTILE, &spec[0]);
  spec[0].threshold = 50;
  spec[0].window = 3;
  keel_clip_spec_default(KEEL_CLIP_ZSCORE, &spec[1]);
  spec[1].window = 2;
  CHECK_OK(ctx, keel_optim_set_clip(o, 2, spec), "cancel: clip chain set");
  for (int t = 0; t < 4; t++) keel_optim_step(o, NULL);
  set_grad_values(ctx, p, 3, big);
#define SNAP(PW, M, V, HIST, N) do { \
    keel_tensor *s_; \
    read_all(ctx, p, PW, 3); \
    keel_optim_get_state(o, 0, "exp_avg", &s_); read_all(ctx, s_, M, 3); keel_tensor_release(s_); \
    keel_optim_get_state(o, 0, "exp_avg_sq", &s_); read_all(ctx, s_, V, 3); keel_tensor_release(s_); \
    keel_optim_get_clip_state(o, 0, &cs); N = cs.n_history; \
    memcpy(HIST, cs.history, sizeof(double) * (size_t)cs.n_history); \
  } while (0)
  SNAP(pw0, m0, v0, hist0, n0);
  keel_optim_get_clip_state(o, 1, &cs);
  mean0 = cs.mean;
  var0 = cs.var;
  keel_optim_get_counters(o, &c0);
  CHECK_OK(ctx, keel_optim_prepare(o, &r), "cancel: prepare");
  CHECK(r.clipped && r.clip_coef < 1, "cancel: the prepared step would clip");
  keel_optim_cancel(o, &r);
  SNAP(pw1, m1, v1, hist1, n1);
  keel_optim_get_counters(o, &c1);
  CHECK(!memcmp(pw0, pw1, sizeof pw0) && !memcmp(m0, m1, sizeof m0) && !memcmp(v0, v1, sizeof v0),
        "cancel: parameter and state byte-identical");
  CHECK(n0 == 3 && n1 == n0 && !memcmp(hist0, hist1, sizeof(double) * 3), "cancel: percentile history identical");
  keel_optim_get_clip_state(o, 1, &cs);
  CHECK(!memcmp(&mean0, &cs.mean, sizeof mean0) && !memcmp(&var0, &cs.var, sizeof var0) && cs.initialized,
        "cancel: zscore EMA identical");
  CHECK(c1.cancelled == c0.cancelled + 1 && c1.steps == c0.steps && c1.skipped == c0.skipped &&
        c1.clipped == c0.clipped && keel_optim_step_count(o) == 4 && keel_optim_get_param_step(o, 0) == 4,
        "cancel: counted as cancelled, nothing else");
  CHECK(!r.applied && r.reason && strcmp(r.reason, "cancelled") == 0, "cancel: report");
  /* the same step applied now moves the history as a plain step would */
  CHECK_OK(ctx, keel_optim_step(o, &r), "cancel: the step afterwards");
  keel_optim_get_clip_state(o, 0, &cs);
  CHECK(cs.n_history == 3 && cs.history[2] == r.grad_norm, "the applied step commits its norm to the history");
  /* a rollback between the halves makes the prepared step stale */
  {
    keel_clip_state saved;
    double h3[3];
    int64_t steps = keel_optim_step_count(o);
    keel_optim_get_clip_state(o, 0, &saved);
    memcpy(h3, saved.history, sizeof h3);
    saved.history = h3;
    keel_optim_prepare(o, NULL);
    keel_optim_set_clip_state(o, 0, &saved);
    CHECK(keel_optim_apply(o, &r) == KEEL_ERR_ARG && strstr(keel_last_error(ctx), "stale") &&
          keel_optim_step_count(o) == steps, "apply refuses a step prepared before a rollback");
    keel_optim_get_counters(o, &c0);
    keel_optim_prepare(o, NULL);
    keel_optim_set_clip_state(o, 0, &saved);
    keel_optim_cancel(o, &r);
    keel_optim_get_counters(o, &c1);
    CHECK(c1.cancelled == c0.cancelled + 1 && keel_optim_step_count(o) == steps, "cancel takes a stale step");
  }
  keel_tensor_release(p);
  keel_optim_free(o);
  keel_ctx_free(ctx);
  CHECK(cnt.blocks == 0 && cnt.bytes == 0, "optim: everything freed");
#undef SNAP
}

/* }==================================================================== */

/* tests/c/test_device.c */
void keel_test_device(void (*check_fn)(int ok, const char *what, const char *detail));
/* tests/c/test_round.c */
void keel_test_round(void (*check_fn)(int ok, const char *what, const char *detail));

int main(void) {
  test_basics();
  test_creation();
  test_matmul_backward();
  test_errors();
  test_two_contexts();
  test_hooks();
  test_ctx_outlived();
  test_nomem();
  test_matmul_precision();
  test_optim_sgd();
  test_optim_stats();
  test_optim_deferred_cpu();
  test_optim_cancel();
  keel_test_device(check);
  keel_test_round(check);
  printf("%d passed, %d failed\n", n_pass, n_fail);
  return n_fail ? 1 : 0;
}
