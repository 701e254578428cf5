/*
** fake_cuda.c: a stand-in for the CUDA plugin (kernels/keel_cuda.h) that
** keeps "device" memory in host memory, so that the device layer (plugin
** loading, dispatch, the caching allocator, copies between devices, to(),
** model:to, errors) runs in the tests on machines without a GPU.
**
** Its device addresses are poisoned: the host address with bit 62 set,
** which is no valid address on x86-64 or AArch64. The engine must never
** dereference a device address; if it does, it faults here at once
** (valgrind and ASan report it) instead of passing silently.
**
** Kernels: copy, fill, and binary for add/sub/mul on float32/float64 (to
** exercise a plugin slot); every other op slot is NULL, so the engine's
** "no CUDA kernel yet" path is exercised too. Settings, from the
** environment when a state is opened or the devices are counted:
**   KEEL_FAKE_CUDA_DEVICES=n   devices seen (default 1; 0: "no device")
**   KEEL_FAKE_CUDA_NO_DRIVER=1 no driver at all
**   KEEL_FAKE_CUDA_MEMORY=n    device memory in bytes (default 1 GiB)
*/
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "keel_cuda.h"

#define POISON ((uintptr_t)1 << 62)

/* codes in the CUDA numbering the real plugin uses */
enum { E_OOM = 2, E_NO_DRIVER = 35, E_NO_DEVICE = 100, E_BAD_ADDRESS = 700 };

struct kc_state {
  size_t limit, used;
  long blocks;
};

static void *host(const void *dev) { return (void *)((uintptr_t)dev ^ POISON); }
static void *dev(void *h) { return (void *)((uintptr_t)h ^ POISON); }
static int is_dev(const void *p) { return ((uintptr_t)p & POISON) != 0; }

static long env_long(const char *name, long def) {
  const char *s = getenv(name);
  return s && *s ? strtol(s, NULL, 10) : def;
}

static int device_count(int *n) {
  *n = 0;
  if (env_long("KEEL_FAKE_CUDA_NO_DRIVER", 0)) return E_NO_DRIVER;
  *n = (int)env_long("KEEL_FAKE_CUDA_DEVICES", 1);
  return *n > 0 ? KC_OK : E_NO_DEVICE;
}

static int device_name(int device, char *buf, size_t n) {
  if (device < 0) return E_NO_DEVICE;
  snprintf(buf, n, "keel fake GPU %d (host memory)", device);
  return KC_OK;
}

static int versions(int *runtime, int *driver) {
  *runtime = 13000;
  *driver = env_long("KEEL_FAKE_CUDA_NO_DRIVER", 0) ? 0 : 13000;
  return KC_OK;
}

static const char *error_string(int code) {
  switch (code) {
    case KC_OK: return "no error";
    case E_OOM: return "out of memory (fake)";
    case E_NO_DRIVER: return "CUDA driver version is insufficient for CUDA runtime version (fake)";
    case E_NO_DEVICE: return "no CUDA-capable device is detected (fake)";
    case E_BAD_ADDRESS: return "an illegal memory access was encountered (fake: a host address reached the device)";
    case KC_ERR_ARG: return "bad argument to a CUDA plugin call";
    case KC_ERR_DTYPE: return "dtype not supported by this CUDA kernel";
    case KC_ERR_NOT_IMPLEMENTED: return "not implemented in the CUDA plugin";
    case KC_ERR_NOMEM: return "out of host memory in the CUDA plugin";
    default: return "unknown error (fake)";
  }
}

static int error_kind(int code) {
  return code == E_OOM ? KC_KIND_OOM : code == E_NO_DRIVER ? KC_KIND_NO_DRIVER
       : code == E_NO_DEVICE ? KC_KIND_NO_DEVICE : KC_KIND_OTHER;
}

static int state_open(int device, kc_state **out) {
  int n;
  int code = device_count(&n);
  *out = NULL;
  if (code) return code;
  if (device >= n) return E_NO_DEVICE;
  if (!(*out = (kc_state *)calloc(1, sizeof **out))) return KC_ERR_NOMEM;
  (*out)->limit = (size_t)env_long("KEEL_FAKE_CUDA_MEMORY", 1L << 30);
  return KC_OK;
}

/* Leaked device blocks stay leaked host blocks: valgrind and ASan name them. */
static void state_close(kc_state *s) { free(s); }

static int mem_info(kc_state *s, size_t *free_bytes, size_t *total_bytes) {
  *total_bytes = s->limit;
  *free_bytes = s->limit - s->used;
  return KC_OK;
}

static int synchronize(kc_state *s) { (void)s; return KC_OK; }

/* Each block carries its size in a header, so that free can count. */
static int dmalloc(kc_state *s, void **p, size_t n) {
  size_t *h;
  *p = NULL;
  if (n > s->limit - s->used) return E_OOM;
  if (!(h = (size_t *)malloc(sizeof(size_t) * 2 + n))) return E_OOM;
  h[0] = n;
  s->used += n;
  s->blocks++;
  *p = dev(h + 2);
  return KC_OK;
}

static int dfree(kc_state *s, void *p) {
  size_t *h;
  if (!p) return KC_OK;
  if (!is_dev(p)) return E_BAD_ADDRESS;
  h = (size_t *)host(p) - 2;
  s->used -= h[0];
  s->blocks--;
  free(h);
  return KC_OK;
}

static int h2d(kc_state *s, void *d, const void *h, size_t n) {
  (void)s;
  if (!is_dev(d) || is_dev(h)) return E_BAD_ADDRESS;
  memcpy(host(d), h, n);
  return KC_OK;
}

static int d2h(kc_state *s, void *h, const void *d, size_t n) {
  (void)s;
  if (!is_dev(d) || is_dev(h)) return E_BAD_ADDRESS;
  memcpy(h, host(d), n);
  return KC_OK;
}

static int d2d(kc_state *s, void *d, const void *src, size_t n) {
  (void)s;
  if (!is_dev(d) || !is_dev(src)) return E_BAD_ADDRESS;
  memmove(host(d), host(src), n);
  return KC_OK;
}

/* {======================================================================
** Kernels, element by element: the CPU backend's conversions (int64
** through double), so results match bit for bit
** ======================================================================= */

static size_t esize(int dt) { return dt == KEEL_F32 ? 4 : 8; }

static double load(const char *p, int dt) {
  return dt == KEEL_F32 ? *(const float *)p : dt == KEEL_F64 ? *(const double *)p : (double)*(const int64_t *)p;
}

static void store(char *p, int dt, double v) {
  if (dt == KEEL_F32) *(float *)p = (float)v;
  else if (dt == KEEL_F64) *(double *)p = v;
  else *(int64_t *)p = (int64_t)v;
}

/* Offset (bytes) of element k of v, row-major. */
static int64_t offset(const kc_view *v, int64_t k) {
  int64_t off = 0;
  for (int d = v->ndim - 1; d >= 0; d--) {
    off += (k % v->shape[d]) * v->stride[d];
    k /= v->shape[d];
  }
  return off * (int64_t)esize(v->dtype);
}

static int check(const kc_view *v) {
  if (!v || v->ndim < 0 || v->ndim > KC_MAX_DIMS) return KC_ERR_ARG;
  if (v->dtype != KEEL_F32 && v->dtype != KEEL_F64 && v->dtype != KEEL_I64) return KC_ERR_DTYPE;
  return v->numel == 0 || is_dev(v->data) ? KC_OK : E_BAD_ADDRESS;
}

static int copy(kc_state *s, const kc_view *dst, const kc_view *src) {
  int code;
  (void)s;
  if ((code = check(dst)) || (code = check(src))) return code;
  if (dst->ndim != src->ndim) return KC_ERR_ARG;
  for (int64_t k = 0; k < dst->numel; k++) {
    const char *a = (const char *)host(src->data) + offset(src, k);
    char *o = (char *)host(dst->data) + offset(dst, k);
    if (dst->dtype == src->dtype) memcpy(o, a, esize(dst->dtype));
    else store(o, dst->dtype, load(a, src->dtype));
  }
  return KC_OK;
}

static int fill(kc_state *s, const kc_view *dst, double v) {
  int code;
  (void)s;
  if ((code = check(dst))) return code;
  for (int64_t k = 0; k < dst->numel; k++) store((char *)host(dst->data) + offset(dst, k), dst->dtype, v);
  return KC_OK;
}

static int binary(kc_state *s, int op, const kc_view *out, const kc_view *a, const kc_view *b) {
  int code;
  (void)s;
  if ((code = check(out)) || (code = check(a)) || (code = check(b))) return code;
  if (op != KEEL_BIN_ADD && op != KEEL_BIN_SUB && op != KEEL_BIN_MUL) return KC_ERR_NOT_IMPLEMENTED;
  if (out->dtype == KEEL_I64) return KC_ERR_DTYPE;
  for (int64_t k = 0; k < out->numel; k++) {
    double x = load((const char *)host(a->data) + offset(a, k), a->dtype);
    double y = load((const char *)host(b->data) + offset(b, k), b->dtype);
    double r;
    if (out->dtype == KEEL_F32) {   /* float arithmetic, as the CPU does it */
      float fx = (float)x, fy = (float)y;
      r = op == KEEL_BIN_ADD ? fx + fy : op == KEEL_BIN_SUB ? fx - fy : fx * fy;
    } else {
      r = op == KEEL_BIN_ADD ? x + y : op == KEEL_BIN_SUB ? x - y : x * y;
    }
    store((char *)host(out->data) + offset(out, k), out->dtype, r);
  }
  return KC_OK;
}

/* }====================================================================== */

__attribute__((visibility("default"))) const keel_cuda_table *keel_cuda_plugin(int abi_version);

const keel_cuda_table *keel_cuda_plugin(int abi_version) {
  static const keel_cuda_table table = {
    .abi_version = KEEL_CUDA_ABI_VERSION,
    .size = (int32_t)sizeof(keel_cuda_table),
    .description = "keel fake CUDA plugin (host memory, for tests)",
    .device_count = device_count,
    .device_name = device_name,
    .versions = versions,
    .error_string = error_string,
    .error_kind = error_kind,
    .open = state_open,
    .close = state_close,
    .mem_info = mem_info,
    .synchronize = synchronize,
    .malloc = dmalloc,
    .free = dfree,
    .memcpy_h2d = h2d,
    .memcpy_d2h = d2h,
    .memcpy_d2d = d2d,
    .copy = copy,
    .fill = fill,
    .binary = binary,
  };
  (void)abi_version;
  return &table;
}
