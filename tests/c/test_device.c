/*
** test_device.c: the device layer in C, on any machine: plugin loading and
** its error messages, and, through the stand-in plugin (tests/plugin/
** fake_cuda.c, host memory behind poisoned addresses), the CUDA backend's
** dispatch, the caching allocator, copies between devices, to_device's
** gradient, set_data and the default device. Called from test_engine.c's
** main with its check function; like it, it uses engine/keel.h only (the
** engine refuses to open a plugin while a CUDA vtable slot is unset, so
** loading the stand-in checks that too). The simulator's device-memory
** bounds are checked through its plugin table too (kernels/keel_cuda.h).
*/
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keel.h"
#include "keel_cuda.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define TD_ASAN 1
#endif

typedef void (*check_fn)(int ok, const char *what, const char *detail);
void keel_test_device(check_fn check);

static check_fn check_;
#define CHECK(cond, what) check_((cond) != 0, (what), NULL)
#define CHECK_OK(ctx, expr, what) do { \
    keel_status st_ = (expr); \
    check_(st_ == KEEL_OK, (what), st_ == KEEL_OK ? NULL : keel_last_error(ctx)); \
  } while (0)
/* a failure with status st whose message holds text */
#define CHECK_ERR(ctx, expr, st, text, what) do { \
    keel_status st_ = (expr); \
    check_(st_ == (st) && strstr(keel_last_error(ctx), (text)) != NULL, (what), keel_last_error(ctx)); \
  } while (0)

static char lib_dir[4200];

/* build/<cfg>/bin/keel_ctest -> build/<cfg>/lib */
static int find_lib_dir(void) {
  char exe[4000];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  char *slash;
  if (n <= 0) return 0;
  exe[n] = '\0';
  if (!(slash = strrchr(exe, '/'))) return 0;
  *slash = '\0';
  snprintf(lib_dir, sizeof lib_dir, "%s/../lib", exe);
  return 1;
}

static void lib_path(char *buf, size_t n, const char *name) {
  if (snprintf(buf, n, "%s/%s", lib_dir, name) >= (int)n) buf[0] = '\0';
}

/* A new CUDA tensor filled with v. */
static keel_status cuda_full(keel_ctx *ctx, int64_t n, double v, keel_tensor **out) {
  keel_device prev = keel_set_default_device(ctx, KEEL_CUDA);
  keel_status st = keel_full(ctx, KEEL_F32, 1, &n, v, out);
  keel_set_default_device(ctx, prev);
  return st;
}

/* {======================================================================
** Loading, and why not
** ======================================================================= */

static void test_loading(const char *fake) {
  char path[4400], why[1024];
  keel_ctx *ctx;

  keel_ctx_new(&ctx, NULL, NULL);
  CHECK_ERR(ctx, keel_cuda_load(ctx, "/nonexistent/libkeel_cuda.so"), KEEL_ERR_DEVICE, "cannot load the CUDA plugin",
            "device: a missing plugin file is named");
  CHECK(strstr(keel_last_error(ctx), "No such file") != NULL, "device: ... with the loader's reason");
  lib_path(path, sizeof path, "libkeel.so");
  CHECK_ERR(ctx, keel_cuda_load(ctx, path), KEEL_ERR_DEVICE, "is not a keel CUDA plugin",
            "device: a library that is no plugin is refused");
  CHECK(!keel_cuda_available(ctx, why, sizeof why) && strstr(why, "is not a keel CUDA plugin"),
        "device: is_available keeps the last reason");
  CHECK(keel_cuda_device_count(ctx) == 0, "device: no device counted then");
  {
    int64_t s = 2;
    keel_tensor *t = NULL;
    keel_set_default_device(ctx, KEEL_CUDA);
    CHECK_ERR(ctx, keel_zeros(ctx, KEEL_F32, 1, &s, &t), KEEL_ERR_DEVICE, "CUDA is not available: ",
              "device: a CUDA default device fails at the first creation, saying why");
    CHECK(t == NULL, "device: ... and makes nothing");
    keel_set_default_device(ctx, KEEL_CPU);
  }
  CHECK_OK(ctx, keel_cuda_load(ctx, fake), "device: a later load of a good plugin works");
  CHECK(keel_cuda_plugin_path(ctx) && !strcmp(keel_cuda_plugin_path(ctx), fake), "device: its path is kept");
  CHECK_ERR(ctx, keel_cuda_load(ctx, "/other/libkeel_cuda.so"), KEEL_ERR_DEVICE, "already in use",
            "device: a second plugin is refused");
  keel_ctx_free(ctx);

  setenv("KEEL_FAKE_CUDA_NO_DRIVER", "1", 1);
  keel_ctx_new(&ctx, NULL, NULL);
  CHECK_ERR(ctx, keel_cuda_load(ctx, fake), KEEL_ERR_DEVICE, "no CUDA driver is installed",
            "device: no driver is said so");
  keel_ctx_free(ctx);
  unsetenv("KEEL_FAKE_CUDA_NO_DRIVER");

  setenv("KEEL_FAKE_CUDA_DEVICES", "0", 1);
  keel_ctx_new(&ctx, NULL, NULL);
  CHECK_ERR(ctx, keel_cuda_load(ctx, fake), KEEL_ERR_DEVICE, "no CUDA device", "device: no device is said so");
  keel_ctx_free(ctx);
  unsetenv("KEEL_FAKE_CUDA_DEVICES");

  /* KEEL_CUDA_PLUGIN, read by the first use */
  setenv("KEEL_CUDA_PLUGIN", "/nonexistent/x.so", 1);
  keel_ctx_new(&ctx, NULL, NULL);
  CHECK(!keel_cuda_available(ctx, why, sizeof why) && strstr(why, "(from KEEL_CUDA_PLUGIN)"),
        "device: KEEL_CUDA_PLUGIN's failure names the variable");
  keel_ctx_free(ctx);
  setenv("KEEL_CUDA_PLUGIN", fake, 1);
  keel_ctx_new(&ctx, NULL, NULL);
  CHECK(keel_cuda_available(ctx, why, sizeof why) && keel_cuda_device_count(ctx) == 1,
        "device: KEEL_CUDA_PLUGIN opens the plugin on first use");
  keel_ctx_free(ctx);
  unsetenv("KEEL_CUDA_PLUGIN");
}

/* }====================================================================== */

/* {======================================================================
** Through the stand-in plugin
** ======================================================================= */

static int same_bits(keel_ctx *ctx, keel_tensor *a, keel_tensor *b) {
  int64_t n = keel_tensor_numel(a);
  double *x = (double *)malloc(sizeof(double) * (size_t)(n ? n : 1));
  double *y = (double *)malloc(sizeof(double) * (size_t)(n ? n : 1));
  int ok = x && y && n == keel_tensor_numel(b) && keel_tensor_read(ctx, a, x, n) == KEEL_OK &&
           keel_tensor_read(ctx, b, y, n) == KEEL_OK && !memcmp(x, y, sizeof(double) * (size_t)n);
  free(x);
  free(y);
  return ok;
}

static void test_copies(keel_ctx *ctx) {
  static const keel_dtype dts[3] = {KEEL_F32, KEEL_F64, KEEL_I64};
  double data[6] = {1.5, -2.25, 3e10, -0.0, 7, 1.0 / 3};
  int64_t shape[2] = {2, 3};
  keel_cuda_memory_stats m0, m1;
  keel_cuda_memory_stats_get(ctx, &m0);
  for (int k = 0; k < 3; k++) {
    keel_tensor *h = NULL, *d = NULL, *back = NULL, *ht = NULL, *dt = NULL, *dtc = NULL, *tb = NULL;
    char what[128];
    keel_from_doubles(ctx, dts[k], 2, shape, data, &h);
    snprintf(what, sizeof what, "device: %s round trip is bit-exact", keel_dtype_name(dts[k]));
    CHECK(keel_to_device(ctx, h, KEEL_CUDA, 0, &d) == KEEL_OK && keel_tensor_device(d) == KEEL_CUDA &&
          keel_to_device(ctx, d, KEEL_CPU, 0, &back) == KEEL_OK && keel_tensor_device(back) == KEEL_CPU &&
          !memcmp(keel_tensor_data(h), keel_tensor_data(back), 6 * keel_dtype_size(dts[k])), what);
    CHECK(d && ((uintptr_t)keel_tensor_data(d) >> 62) == 1, "device: the data is behind a device address");
    /* strided: a transposed view, moved and read */
    keel_transpose(ctx, h, 0, 1, &ht);
    keel_to_device(ctx, ht, KEEL_CUDA, 0, &dt);
    snprintf(what, sizeof what, "device: %s strided copy to the device", keel_dtype_name(dts[k]));
    CHECK(dt && same_bits(ctx, dt, ht), what);
    /* and strided on the device: a device view made contiguous there */
    keel_tensor_release(ht); ht = NULL;
    keel_transpose(ctx, d, 0, 1, &ht);
    keel_contiguous(ctx, ht, &dtc);
    keel_transpose(ctx, h, 0, 1, &tb);
    snprintf(what, sizeof what, "device: %s strided copy on the device", keel_dtype_name(dts[k]));
    CHECK(dtc && keel_tensor_device(dtc) == KEEL_CUDA && same_bits(ctx, dtc, tb), what);
    keel_tensor_release(h); keel_tensor_release(d); keel_tensor_release(back);
    keel_tensor_release(ht); keel_tensor_release(dt); keel_tensor_release(dtc); keel_tensor_release(tb);
  }
  keel_cuda_memory_stats_get(ctx, &m1);
  CHECK(m1.allocs > m0.allocs && m1.allocated_bytes == m0.allocated_bytes,
        "device: every device block is given back to the cache");
  {
    /* casts on the device, as the CPU casts */
    keel_tensor *h, *d, *c = NULL, *hc = NULL;
    keel_from_doubles(ctx, KEEL_F64, 2, shape, data, &h);
    keel_to_device(ctx, h, KEEL_CUDA, 0, &d);
    CHECK_OK(ctx, keel_to_dtype(ctx, d, KEEL_F32, &c), "device: cast on the device");
    keel_to_dtype(ctx, h, KEEL_F32, &hc);
    CHECK(c && keel_tensor_device(c) == KEEL_CUDA && same_bits(ctx, c, hc), "device: ... gives the CPU's values");
    keel_tensor_release(c); keel_tensor_release(hc);
    c = hc = NULL;
    keel_to_dtype(ctx, d, KEEL_I64, &c);
    keel_to_dtype(ctx, h, KEEL_I64, &hc);
    CHECK(c && same_bits(ctx, c, hc), "device: float64 -> int64 on the device gives the CPU's values");
    keel_tensor_release(c); keel_tensor_release(hc); keel_tensor_release(h); keel_tensor_release(d);
  }
  {
    /* fill, element access, copy_ across devices with broadcasting */
    keel_tensor *d = NULL, *row;
    int64_t idx[2] = {1, 2}, one = 3;
    double v = 0, r[6];
    double rowv[3] = {4, 5, 6};
    keel_set_default_device(ctx, KEEL_CUDA);
    CHECK_OK(ctx, keel_empty(ctx, KEEL_F32, 2, shape, &d), "device: empty on the default device");
    keel_set_default_device(ctx, KEEL_CPU);
    CHECK_OK(ctx, keel_fill_(ctx, d, 2.5), "device: fill_ on the device");
    CHECK(keel_tensor_get(ctx, d, idx, &v) == KEEL_OK && v == 2.5, "device: get reads a device element");
    CHECK(keel_tensor_set(ctx, d, idx, -1) == KEEL_OK && keel_tensor_get(ctx, d, idx, &v) == KEEL_OK && v == -1,
          "device: set writes one");
    keel_from_doubles(ctx, KEEL_F64, 1, &one, rowv, &row);
    CHECK_OK(ctx, keel_copy_(ctx, d, row), "device: copy_ from the CPU, broadcast");
    CHECK(keel_tensor_read(ctx, d, r, 6) == KEEL_OK && r[0] == 4 && r[5] == 6, "device: ... holds the values");
    keel_tensor_release(row);
    keel_tensor_release(d);
  }
}

static void test_allocator(keel_ctx *ctx) {
  keel_cuda_memory_stats a, b, c;
  int64_t n = 1000;
  keel_tensor *t, *u;
  keel_cuda_empty_cache(ctx);
  keel_cuda_memory_stats_get(ctx, &a);
  cuda_full(ctx, n, 1, &t);
  keel_cuda_memory_stats_get(ctx, &b);
  CHECK(b.device_mallocs == a.device_mallocs + 1 && b.allocated_bytes >= a.allocated_bytes + 4000,
        "device: a first block comes from the device");
  keel_tensor_release(t);
  cuda_full(ctx, n, 2, &u);
  keel_cuda_memory_stats_get(ctx, &c);
  CHECK(c.device_mallocs == b.device_mallocs && c.allocs == b.allocs + 1,
        "device: the same size again is served from the cache (no cudaMalloc)");
  CHECK(c.peak_allocated_bytes >= c.allocated_bytes && c.reserved_bytes >= c.allocated_bytes,
        "device: peak and reserved bound what is allocated");
  keel_tensor_release(u);
  keel_cuda_empty_cache(ctx);
  keel_cuda_memory_stats_get(ctx, &c);
  CHECK(c.reserved_bytes == c.allocated_bytes && c.device_frees > b.device_frees,
        "device: empty_cache gives the cached blocks back");
}

static void test_oom(const char *fake) {
  keel_ctx *ctx;
  keel_tensor *t = NULL, *u = NULL;
  keel_cuda_memory_stats m;
  int64_t a = 10000, b = 12000, huge = 1 << 20;   /* float32: 40 KB, 48 KB, 4 MB */
  setenv("KEEL_FAKE_CUDA_MEMORY", "65536", 1);
  keel_ctx_new(&ctx, NULL, NULL);
  keel_cuda_load(ctx, fake);
  unsetenv("KEEL_FAKE_CUDA_MEMORY");
  cuda_full(ctx, a, 0, &t);
  keel_tensor_release(t);   /* cached: 40 KB of 64 held */
  CHECK_OK(ctx, cuda_full(ctx, b, 0, &u), "device: an allocation the cache blocks succeeds");
  keel_cuda_memory_stats_get(ctx, &m);
  CHECK(m.cache_flushes == 1, "device: ... after emptying the cache once");
  t = NULL;
  CHECK_ERR(ctx, cuda_full(ctx, huge, 0, &t), KEEL_ERR_NOMEM, "CUDA could not allocate",
            "device: device out of memory is KEEL_ERR_NOMEM with the CUDA message");
  CHECK(t == NULL, "device: ... and makes nothing");
  keel_tensor_release(u);
  keel_ctx_free(ctx);
}

static void test_ops(keel_ctx *ctx) {
  int64_t s = 3;
  double x[3] = {1, 2, 3}, y[3] = {10, 20, 30}, r[3];
  keel_tensor *hx, *hy, *dx, *dy, *out = NULL;
  keel_from_doubles(ctx, KEEL_F32, 1, &s, x, &hx);
  keel_from_doubles(ctx, KEEL_F32, 1, &s, y, &hy);
  keel_to_device(ctx, hx, KEEL_CUDA, 0, &dx);
  keel_to_device(ctx, hy, KEEL_CUDA, 0, &dy);
  CHECK_ERR(ctx, keel_add(ctx, hx, dy, &out), KEEL_ERR_DEVICE, "add: expected all tensors on one device, got cpu and cuda",
            "device: mixing devices in add names both");
  CHECK_ERR(ctx, keel_matmul(ctx, dx, hy, &out), KEEL_ERR_DEVICE, "got cuda and cpu",
            "device: mixing devices in matmul names both");
  {
    keel_tensor *ts[2] = {hx, dy};
    CHECK_ERR(ctx, keel_cat(ctx, 2, ts, 0, &out), KEEL_ERR_DEVICE, "cat: expected all tensors on one device",
              "device: mixing devices in cat");
  }
  CHECK_ERR(ctx, keel_where(ctx, hx, dx, dy, &out), KEEL_ERR_DEVICE, "where:", "device: mixing devices in where");
  CHECK(out == NULL, "device: failed ops make nothing");
  CHECK_OK(ctx, keel_add(ctx, dx, dy, &out), "device: add runs the plugin's kernel");
  CHECK(out && keel_tensor_device(out) == KEEL_CUDA && keel_tensor_read(ctx, out, r, 3) == KEEL_OK && r[0] == 11 &&
        r[2] == 33, "device: ... with the right values");
  keel_tensor_release(out); out = NULL;
  CHECK_OK(ctx, keel_binary_scalar(ctx, KEEL_BIN_MUL, dx, 2, 0, &out), "device: a number joins on the device");
  CHECK(out && keel_tensor_read(ctx, out, r, 3) == KEEL_OK && r[1] == 4, "device: ... x * 2");
  keel_tensor_release(out); out = NULL;
  CHECK_ERR(ctx, keel_unary(ctx, KEEL_UN_EXP, dx, &out), KEEL_ERR_DEVICE, "exp: no CUDA kernel yet",
            "device: an op without a kernel says so");
  {
    int64_t col[2] = {3, 1}, row[2] = {1, 3};
    keel_tensor *a = NULL, *b = NULL;
    keel_view(ctx, dx, 2, col, &a);
    keel_view(ctx, dy, 2, row, &b);
    CHECK_ERR(ctx, keel_matmul(ctx, a, b, &out), KEEL_ERR_DEVICE, "matmul: no CUDA kernel yet",
              "device: matmul without a kernel says so");
    keel_tensor_release(a);
    keel_tensor_release(b);
  }
  CHECK_ERR(ctx, keel_reduce(ctx, KEEL_RED_SUM, dx, 0, NULL, 0, &out, NULL), KEEL_ERR_DEVICE, "sum: no CUDA kernel yet",
            "device: sum without a kernel says so");
  keel_tensor_release(hx); keel_tensor_release(hy); keel_tensor_release(dx); keel_tensor_release(dy);
}

static void test_autograd(keel_ctx *ctx) {
  int64_t s = 4;
  double ones[4] = {1, 2, 3, 4}, g[4];
  keel_tensor *x, *y = NULL, *z1, *z2, *l1, *l2, *l;
  keel_from_doubles(ctx, KEEL_F64, 1, &s, ones, &x);
  keel_set_requires_grad(ctx, x, 1);
  CHECK_OK(ctx, keel_to_device(ctx, x, KEEL_CUDA, 0, &y), "device: to_device records");
  CHECK(y && keel_grad_fn_name(y) && !strcmp(keel_grad_fn_name(y), "to_device"), "device: ... as to_device");
  /* y feeds two branches: its gradient is accumulated on the device */
  keel_to_device(ctx, y, KEEL_CPU, 0, &z1);
  keel_to_device(ctx, y, KEEL_CPU, 0, &z2);
  keel_reduce(ctx, KEEL_RED_SUM, z1, 0, NULL, 0, &l1, NULL);
  keel_binary_scalar(ctx, KEEL_BIN_MUL, z2, 3, 0, &l);
  keel_reduce(ctx, KEEL_RED_SUM, l, 0, NULL, 0, &l2, NULL);
  keel_tensor_release(l);
  keel_add(ctx, l1, l2, &l);
  CHECK_OK(ctx, keel_backward(ctx, l, NULL, 0), "device: backward through cpu -> cuda -> cpu");
  CHECK(keel_tensor_grad(x) && keel_tensor_device(keel_tensor_grad(x)) == KEEL_CPU &&
        keel_tensor_read(ctx, keel_tensor_grad(x), g, 4) == KEEL_OK && g[0] == 4 && g[3] == 4,
        "device: the gradient comes back to the CPU input (1 + 3 = 4)");
  keel_tensor_release(l); keel_tensor_release(l1); keel_tensor_release(l2);
  keel_tensor_release(z1); keel_tensor_release(z2); keel_tensor_release(y);
  {
    /* set_data: the same handle on another device */
    keel_tensor *d = NULL, *gd;
    keel_to_device(ctx, x, KEEL_CUDA, 0, &d);
    CHECK_ERR(ctx, keel_tensor_set_data(ctx, x, d), KEEL_ERR_STATE, "move or clear .grad first",
              "device: set_data refuses to leave .grad behind");
    keel_to_device(ctx, keel_tensor_grad(x), KEEL_CUDA, 0, &gd);
    CHECK_ERR(ctx, keel_set_grad(ctx, x, gd), KEEL_ERR_DEVICE, "gradient on cuda assigned to a tensor on cpu",
              "device: a .grad on another device is refused");
    keel_set_grad(ctx, x, NULL);
    CHECK_OK(ctx, keel_tensor_set_data(ctx, x, d), "device: set_data moves a leaf in place");
    CHECK(keel_tensor_device(x) == KEEL_CUDA && keel_requires_grad(x), "device: ... keeping requires_grad");
    CHECK_OK(ctx, keel_set_grad(ctx, x, gd), "device: its .grad can follow");
    keel_tensor_release(d);
    keel_tensor_release(gd);
  }
  keel_tensor_release(x);
}

static void test_default_device(keel_ctx *ctx) {
  int64_t s[2] = {3, 4};
  keel_tensor *c = NULL, *d = NULL, *e = NULL;
  keel_manual_seed(ctx, 7);
  keel_randn(ctx, KEEL_F32, 2, s, &c);
  keel_manual_seed(ctx, 7);
  CHECK(keel_set_default_device(ctx, KEEL_CUDA) == KEEL_CPU, "device: set_default_device returns the old one");
  CHECK_OK(ctx, keel_randn(ctx, KEEL_F32, 2, s, &d), "device: randn on the default device");
  CHECK(d && keel_tensor_device(d) == KEEL_CUDA && same_bits(ctx, c, d),
        "device: ... the same numbers as on the CPU from the same seed");
  CHECK_OK(ctx, keel_arange(ctx, KEEL_I64, 0, 5, 1, &e), "device: arange on the default device");
  CHECK(e && keel_tensor_device(e) == KEEL_CUDA, "device: ... lands there");
  keel_set_default_device(ctx, KEEL_CPU);
  keel_tensor_release(c); keel_tensor_release(d); keel_tensor_release(e);
}

/* }====================================================================== */

/* A counting allocator: every host block the engine takes is given back. */
static long live_blocks;
static void *counting_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud; (void)osize;
  if (nsize == 0) {
    if (ptr) { live_blocks--; free(ptr); }
    return NULL;
  }
  if (!ptr) {
    void *p = malloc(nsize);
    if (p) live_blocks++;
    return p;
  }
  return realloc(ptr, nsize);
}

/* {======================================================================
** Index tensors read where they are, on the CUDA simulator
** ======================================================================= */

/* The tensors of one side (CPU or CUDA) of idx_step. */
enum { IDX_X, IDX_W, IDX_T, IDX_TN, IDX_IDS, IDX_GI, IDX_SEL, IDX_N };

/* *acc += sum(t), releasing t (a NULL *acc starts the sum). */
static keel_status idx_add_sum(keel_ctx *ctx, keel_tensor **acc, keel_tensor *t) {
  keel_tensor *s = NULL, *a = NULL;
  keel_status st = t ? keel_reduce(ctx, KEEL_RED_SUM, t, 0, NULL, 0, &s, NULL) : KEEL_ERR_ARG;
  keel_tensor_release(t);
  if (st) return st;
  if (!*acc) { *acc = s; return KEEL_OK; }
  st = keel_add(ctx, *acc, s, &a);
  keel_tensor_release(s);
  keel_tensor_release(*acc);
  *acc = a;
  return st;
}

/* One step's index ops on v (IDX_*) at the context's index base (ignore:
** the ignored target value): cross entropy with and without an ignored
** target, embedding, gather and index_select, summed; then backward. */
static keel_status idx_step(keel_ctx *ctx, keel_tensor **v, int64_t ignore, double *loss) {
  keel_tensor *acc = NULL, *t = NULL;
  keel_status st;
  if ((st = keel_cross_entropy(ctx, v[IDX_X], v[IDX_T], NULL, ignore, 0.1, KEEL_REDUCTION_MEAN, &t)) ||
      (st = idx_add_sum(ctx, &acc, t)))
    goto done;
  if ((st = keel_cross_entropy(ctx, v[IDX_X], v[IDX_TN], NULL, KEEL_NO_IGNORE, 0, KEEL_REDUCTION_SUM, &t)) ||
      (st = idx_add_sum(ctx, &acc, t)))
    goto done;
  if ((st = keel_embedding(ctx, v[IDX_W], v[IDX_IDS], KEEL_NO_PADDING, &t)) || (st = idx_add_sum(ctx, &acc, t)))
    goto done;
  if ((st = keel_gather(ctx, v[IDX_X], 1, v[IDX_GI], &t)) || (st = idx_add_sum(ctx, &acc, t))) goto done;
  if ((st = keel_index_select(ctx, v[IDX_X], 0, v[IDX_SEL], &t)) || (st = idx_add_sum(ctx, &acc, t))) goto done;
  if ((st = keel_backward(ctx, acc, NULL, 0))) goto done;
  st = keel_tensor_read(ctx, acc, loss, 1);
done:
  keel_tensor_release(acc);
  return st;
}

/* a and b (float64) agree within tol. */
static int idx_close(keel_ctx *ctx, const keel_tensor *a, const keel_tensor *b, double tol) {
  double x[16], y[16];
  int64_t n = a && b ? keel_tensor_numel(a) : 0;
  if (n <= 0 || n > 16 || n != keel_tensor_numel(b) || keel_tensor_read(ctx, a, x, n) || keel_tensor_read(ctx, b, y, n))
    return 0;
  for (int64_t i = 0; i < n; i++)
    if (!(fabs(x[i] - y[i]) <= tol)) return 0;
  return 1;
}

/* At index base b, the CUDA backend reads the uploaded index tensors
** where they are (base and ignored value passed to the kernels): a step
** makes no host-device copy, and agrees with the CPU's. */
static void test_index_in_place(const char *sim, int b) {
  static const double xv[12] = {0.5, -1, 2, 0, 1.5, -0.5, 3, 1, -2, 0.25, 0.75, -1.25};
  static const double wv[10] = {1, 2, -1, 0.5, 0, 3, -2, 1, 0.5, -0.5};
  /* 0-based values; t's second entry is the ignored one (set below) */
  static const double tv[4] = {2, 0, 1, 0}, tnv[4] = {1, 2, 0, 2}, idsv[6] = {4, 0, 2, 2, 1, 3};
  static const double giv[4] = {2, 0, 1, 1}, selv[3] = {3, 1, 3};
  const double *vals[IDX_N] = {xv, wv, tv, tnv, idsv, giv, selv};
  static const int64_t shapes[IDX_N][2] = {{4, 3}, {5, 2}, {4, 0}, {4, 0}, {2, 3}, {4, 1}, {3, 0}};
  keel_tensor *h[IDX_N] = {NULL}, *d[IDX_N] = {NULL};
  keel_cuda_memory_stats m0, m1;
  int64_t ignore = 1 + b;   /* a valid class: the kernels must test for it before rebasing */
  double lh = 0, ld = 0, shifted[6];
  char what[160];
  keel_ctx *ctx;
  int ok = 1;
  keel_ctx_new(&ctx, NULL, NULL);
  keel_set_index_base(ctx, b);
  if (keel_cuda_load(ctx, sim) != KEEL_OK) {
    check_(0, "device: the CUDA simulator loads", keel_last_error(ctx));
    keel_ctx_free(ctx);
    return;
  }
  for (int i = 0; i < IDX_N; i++) {
    int nd = shapes[i][1] ? 2 : 1;
    int64_t n = shapes[i][0] * (shapes[i][1] ? shapes[i][1] : 1);
    const double *src = vals[i];
    if (i >= IDX_T) {   /* index values count from the base */
      for (int64_t k = 0; k < n; k++) shifted[k] = src[k] + b;
      if (i == IDX_T) shifted[1] = (double)ignore;
      src = shifted;
    }
    ok = ok && keel_from_doubles(ctx, i >= IDX_T ? KEEL_I64 : KEEL_F64, nd, shapes[i], src, &h[i]) == KEEL_OK &&
         keel_to_device(ctx, h[i], KEEL_CUDA, 0, &d[i]) == KEEL_OK;
  }
  ok = ok && keel_set_requires_grad(ctx, h[IDX_X], 1) == KEEL_OK && keel_set_requires_grad(ctx, h[IDX_W], 1) == KEEL_OK &&
       keel_set_requires_grad(ctx, d[IDX_X], 1) == KEEL_OK && keel_set_requires_grad(ctx, d[IDX_W], 1) == KEEL_OK;
  snprintf(what, sizeof what, "device: index base %d: the index ops run on the CPU and the simulator", b);
  keel_cuda_memory_stats_get(ctx, &m0);
  ok = ok && idx_step(ctx, h, ignore, &lh) == KEEL_OK && idx_step(ctx, d, ignore, &ld) == KEEL_OK;
  keel_cuda_memory_stats_get(ctx, &m1);
  check_(ok, what, ok ? NULL : keel_last_error(ctx));
  if (ok) {
    /* the one download: the loss read at the end of the device step */
    snprintf(what, sizeof what, "device: index base %d: a step uploads no index and downloads only the loss", b);
    CHECK(m1.h2d_copies == m0.h2d_copies && m1.d2h_copies == m0.d2h_copies + 1, what);
    snprintf(what, sizeof what, "device: index base %d: loss and gradients agree with the CPU's", b);
    CHECK(fabs(lh - ld) <= 1e-12 &&
          idx_close(ctx, keel_tensor_grad(h[IDX_X]), keel_tensor_grad(d[IDX_X]), 1e-12) &&
          idx_close(ctx, keel_tensor_grad(h[IDX_W]), keel_tensor_grad(d[IDX_W]), 1e-12), what);
  }
  for (int i = 0; i < IDX_N; i++) {
    keel_tensor_release(h[i]);
    keel_tensor_release(d[i]);
  }
  keel_ctx_free(ctx);
}

/* }====================================================================== */

/* {======================================================================
** Device-memory bounds on the CUDA simulator (keel_cuda.h: mem_in_use)
** ======================================================================= */

/* Whether bytes [lo, hi) of the simulator's device block p are marked not
** in use: poisoned under ASan, else filled with 0xFF (device memory is
** host memory there). */
static int sim_unusable(const unsigned char *p, size_t lo, size_t hi) {
  for (size_t i = lo; i < hi; i++) {
#ifdef TD_ASAN
    if (!__asan_address_is_poisoned(p + i)) return 0;
#else
    if (p[i] != 0xFF) return 0;
#endif
  }
  return 1;
}

/* Whether the n floats at p are usable and hold v. */
static int sim_holds(const unsigned char *p, size_t n, float v) {
#ifdef TD_ASAN
  if (__asan_region_is_poisoned((void *)p, n * sizeof v)) return 0;
#endif
  for (size_t i = 0; i < n; i++) {
    float x;
    memcpy(&x, p + i * sizeof x, sizeof x);
    if (x != v) return 0;
  }
  return 1;
}

/* The engine tells the simulator what of each block is in use: a tensor's
** rounding and a block back in the cache are unusable, though allocated.
** The memory is read here directly (the simulator's device memory is the
** host's), after a wait: under KEEL_CUDA_SIM_ASYNC the fills and the
** marking run in stream order. */
static void test_sim_bounds(const char *sim) {
  int64_t whole = 80, part = 75;   /* float32: 320 bytes (a size class's own size), 300 (rounded to 320) */
  keel_cuda_memory_stats m0, m1;
  keel_tensor *a = NULL, *b = NULL;
  unsigned char *p = NULL;
  keel_ctx *ctx;
  keel_ctx_new(&ctx, NULL, NULL);
  if (keel_cuda_load(ctx, sim) != KEEL_OK) {
    check_(0, "device: the CUDA simulator loads", keel_last_error(ctx));
    keel_ctx_free(ctx);
    return;
  }
  CHECK_OK(ctx, cuda_full(ctx, whole, 0, &a), "device: (simulator) a 320-byte tensor of zeros");
  if (a) {
    p = (unsigned char *)keel_tensor_data(a);
    keel_cuda_synchronize(ctx);
    CHECK(sim_holds(p, (size_t)whole, 0), "device: (simulator) ... fills its whole block");
    keel_tensor_release(a);
    keel_cuda_synchronize(ctx);
    CHECK(sim_unusable(p, 0, 320), "device: (simulator) a block freed into the cache is unusable");
  }
  keel_cuda_memory_stats_get(ctx, &m0);
  CHECK_OK(ctx, cuda_full(ctx, part, 1, &b), "device: (simulator) a 300-byte tensor of ones");
  keel_cuda_memory_stats_get(ctx, &m1);
  if (p && b) {
    CHECK(keel_tensor_data(b) == p && m1.device_mallocs == m0.device_mallocs &&
          m1.allocated_bytes == m0.allocated_bytes + 320,
          "device: (simulator) ... gets the cached 320-byte block");
    keel_cuda_synchronize(ctx);
    CHECK(sim_holds(p, (size_t)part, 1), "device: (simulator) ... its 300 bytes are in use");
    CHECK(sim_unusable(p, 300, 320), "device: (simulator) ... the 20 bytes of rounding are not");
  }
  keel_tensor_release(b);
  keel_ctx_free(ctx);
}

/* A code of the plugin whose message holds text. */
static int sim_refused(const keel_cuda_table *pl, int code, const char *text) {
  return code != KC_OK && strstr(pl->error_string(code), text) != NULL;
}

/* The simulator's copies and memsets stay within the bytes in use, and
** say so when they do not (its plugin table, as the engine calls it). */
static void test_sim_copy_bounds(const char *sim) {
  static const char *const past = "runs past the 300 bytes in use";
  void *dl = dlopen(sim, RTLD_NOW | RTLD_LOCAL);
  keel_cuda_plugin_fn entry = NULL;
  const keel_cuda_table *pl = NULL;
  kc_state *s = NULL;
  unsigned char host[320], *d = NULL;
  int code;
  if (dl) *(void **)(&entry) = dlsym(dl, KEEL_CUDA_PLUGIN_SYMBOL);
  if (entry) pl = entry(KEEL_CUDA_ABI_VERSION);
  if (!pl || pl->abi_version != KEEL_CUDA_ABI_VERSION || !pl->mem_in_use) {
    check_(0, "device: the CUDA simulator's table has mem_in_use", dl ? sim : dlerror());
    if (dl) dlclose(dl);
    return;
  }
  setenv("KEEL_CUDA_SIM_QUIET", "1", 1);   /* the refusals below are meant */
  if (pl->open(0, &s) != KC_OK || pl->malloc(s, (void **)&d, 320) != KC_OK) {
    check_(0, "device: the CUDA simulator opens and allocates", NULL);
  } else {
    memset(host, 7, sizeof host);
    CHECK(pl->mem_in_use(s, d, 300, 320) == KC_OK, "device: (simulator) mem_in_use takes a block's bounds");
    CHECK(pl->memcpy_h2d(s, d, host, 300) == KC_OK && pl->memcpy_d2h(s, host, d, 300) == KC_OK &&
          pl->memcpy_d2d(s, d + 150, d, 150) == KC_OK,
          "device: (simulator) copies within the bytes in use work");
    code = pl->memcpy_d2h(s, host, d, 320);
    CHECK(sim_refused(pl, code, past), "device: (simulator) a download past the bytes in use is refused, saying so");
    code = pl->memcpy_h2d(s, d + 296, host, 8);
    CHECK(sim_refused(pl, code, past), "device: (simulator) ... an upload");
    code = pl->memcpy_d2d(s, d, d + 200, 120);
    CHECK(sim_refused(pl, code, "source") && sim_refused(pl, code, past), "device: (simulator) ... a device copy's source");
    code = pl->memcpy_d2h(s, host, d, 321);
    CHECK(sim_refused(pl, code, "runs past its end"), "device: (simulator) ... past the allocation, said as such");
    CHECK(pl->mem_in_use(s, d, 0, 320) == KC_OK, "device: (simulator) a block can be marked not in use");
    code = pl->memcpy_d2h(s, host, d, 4);
    CHECK(sim_refused(pl, code, "not in use"), "device: (simulator) ... then no copy reads it");
    code = pl->mem_in_use(s, d + 8, 0, 312);
    CHECK(sim_refused(pl, code, "not the start of a device allocation"),
          "device: (simulator) mem_in_use of a pointer inside a block is refused");
    code = pl->mem_in_use(s, d, 0, 256);
    CHECK(sim_refused(pl, code, "the allocation at"), "device: (simulator) ... and of a wrong block size");
    code = pl->mem_in_use(s, d, 321, 320);
    CHECK(sim_refused(pl, code, "321 bytes in use of a block of 320"), "device: (simulator) ... and more in use than it has");
    CHECK(pl->free(s, d) == KC_OK, "device: (simulator) a block not in use is freed");
  }
  if (s) pl->close(s);
  unsetenv("KEEL_CUDA_SIM_QUIET");
  dlclose(dl);
}

/* }====================================================================== */

void keel_test_device(check_fn check) {
  char fake[4400];
  keel_ctx *ctx;
  check_ = check;
  if (!find_lib_dir()) { check(1, "device: plugin tests skipped (no /proc/self/exe)", NULL); return; }
  lib_path(fake, sizeof fake, "libkeel_fakecuda.so");
  if (access(fake, R_OK) != 0) {
    check(0, "device: the stand-in plugin libkeel_fakecuda.so is built beside libkeel", fake);
    return;
  }
  test_loading(fake);
  test_oom(fake);
  {
    char sim[4400];
    lib_path(sim, sizeof sim, "libkeel_cuda_sim.so");
    test_index_in_place(sim, 0);
    test_index_in_place(sim, 1);
    test_sim_bounds(sim);
    test_sim_copy_bounds(sim);
  }
  keel_ctx_new(&ctx, counting_alloc, NULL);
  CHECK_OK(ctx, keel_cuda_load(ctx, fake), "device: the stand-in plugin loads (every CUDA vtable slot is set)");
  {
    char name[128] = "";
    CHECK(keel_cuda_device_name(ctx, 0, name, sizeof name) == KEEL_OK && strstr(name, "fake"),
          "device: device 0 has a name");
    CHECK_ERR(ctx, keel_cuda_device_name(ctx, 3, name, sizeof name), KEEL_ERR_INDEX, "out of range",
              "device: device 3 does not exist");
  }
  test_copies(ctx);
  test_allocator(ctx);
  test_ops(ctx);
  test_autograd(ctx);
  test_default_device(ctx);
  CHECK_OK(ctx, keel_cuda_synchronize(ctx), "device: synchronize");
  {
    size_t f = 0, t = 0;
    keel_cuda_empty_cache(ctx);
    CHECK(keel_cuda_mem_get_info(ctx, &f, &t) == KEEL_OK && f == t, "device: every device byte is given back");
  }
  keel_ctx_free(ctx);
  CHECK(live_blocks == 0, "device: every host block is given back");
}
