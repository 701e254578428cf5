/*
** device.c: the device layer. Opens the CUDA plugin (kernels/keel_cuda.h)
** on first use and says why when it cannot; the context's caching device
** allocator; moving data between devices (kl_transfer, keel_to_device;
** keel_tensor_set_data is in tensor.c, beside the storage); the check that an op's inputs share a device;
** the default device of the creation functions.
**
** The plugin is per context (its own kc_state: stream, cuBLAS handle), so
** two contexts stay independent; dlopen counts references, so the library
** itself is mapped once. It is opened with RTLD_NODELETE: the CUDA runtime
** registers exit handlers and threads that must not outlive its code.
*/
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "keel_impl.h"
#include "keel_cuda.h"

_Static_assert(KEEL_CUDA_ABI_VERSION > 0, "ABI versions start at 1");

typedef struct kl_dblock {      /* a cached device block (the record lives on the host) */
  struct kl_dblock *next;
  void *ptr;
  size_t size;
} kl_dblock;

enum { KL_CUDA_UNTRIED = 0, KL_CUDA_READY, KL_CUDA_FAILED };

struct kl_cuda {
  int state;                    /* KL_CUDA_* */
  char why[768];                /* FAILED: one line */
  char path[PATH_MAX];          /* the plugin opened (READY) or last tried */
  void *dl;
  const keel_cuda_table *pl;
  kc_state *s;
  int n_devices;
  kl_dblock *cache[KL_CACHE_CLASSES];
  kl_dblock *spare;             /* unused records */
  keel_cuda_memory_stats mem;
  int batch_open;               /* an optimizer batch is open (kl_cuda_defer) */
};

/* {======================================================================
** Devices by name, the default device, the same-device check
** ======================================================================= */

const char *keel_device_name(keel_device dev) {
  return dev == KEEL_CPU ? "cpu" : dev == KEEL_CUDA ? "cuda" : "?";
}

keel_device keel_set_default_device(keel_ctx *ctx, keel_device dev) {
  keel_device old = ctx->default_device;
  if (dev == KEEL_CPU || dev == KEEL_CUDA) ctx->default_device = dev;
  return old;
}

keel_device keel_get_default_device(const keel_ctx *ctx) { return ctx->default_device; }

keel_status kl_check_device(keel_ctx *ctx, const char *fn, const keel_tensor *a, const keel_tensor *b) {
  if (!b || a->storage->device == b->storage->device) return KEEL_OK;
  return kl_error(ctx, KEEL_ERR_DEVICE,
                  "%s: expected all tensors on one device, got %s and %s (move one with to(\"%s\"))", fn,
                  keel_device_name(a->storage->device), keel_device_name(b->storage->device),
                  keel_device_name(a->storage->device));
}

/* }====================================================================== */

/* {======================================================================
** Opening the plugin
** ======================================================================= */

static struct kl_cuda *cuda_of(keel_ctx *ctx) {
  if (!ctx->cuda) {
    ctx->cuda = (struct kl_cuda *)kl_malloc(ctx, sizeof *ctx->cuda);
    if (ctx->cuda) memset(ctx->cuda, 0, sizeof *ctx->cuda);
  }
  return ctx->cuda;
}

static int fail(struct kl_cuda *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct kl_cuda *c, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->why, sizeof c->why, fmt, ap);
  va_end(ap);
  c->state = KL_CUDA_FAILED;
  if (c->s) { c->pl->close(c->s); c->s = NULL; }
  if (c->dl) { dlclose(c->dl); c->dl = NULL; }
  c->pl = NULL;
  return 0;
}

/* The directory of the file that holds this code: libkeel.so, the Lua
** module core.so, or the program that linked libkeel.a. */
static int engine_dir(char *dir, size_t n) {
  Dl_info info;
  char real[PATH_MAX];
  char *slash;
  if (!dladdr((void *)&keel_cuda_available, &info) || !info.dli_fname || !info.dli_fname[0]) return 0;
  if (!realpath(info.dli_fname, real)) {
    /* the main program may be named as it was run: ask the kernel */
    ssize_t k = readlink("/proc/self/exe", real, sizeof real - 1);
    if (k <= 0) return 0;
    real[k] = '\0';
  }
  slash = strrchr(real, '/');
  if (!slash) return 0;
  *slash = '\0';
  return snprintf(dir, n, "%s", real) < (int)n;
}

/* Slots of the CUDA vtable left NULL. Every field of kl_backend is a
** pointer (the name, then functions); a slot added to kl_backend without a
** CUDA entry would crash the first op that reaches it on a GPU, so the
** plugin is refused instead, at once and on any machine (the C test loads
** the stand-in plugin). */
static int unset_slots(void) {
  const void *const *w = (const void *const *)(const void *)&kl_cuda_backend;
  int n = 0;
  for (size_t i = 0; i < sizeof kl_cuda_backend / sizeof(void *); i++) n += w[i] == NULL;
  return n;
}
_Static_assert(sizeof(kl_backend) % sizeof(void *) == 0, "kl_backend holds pointers only");

static int plugin_open(struct kl_cuda *c, const char *path, const char *origin) {
  keel_cuda_plugin_fn entry;
  const keel_cuda_table *pl;
  int code, n = 0;
  snprintf(c->path, sizeof c->path, "%s", path);
  dlerror();
  c->dl = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (!c->dl) {
    const char *e = dlerror();
    return fail(c, "cannot load the CUDA plugin %s%s: %s", path, origin, e ? e : "dlopen failed");
  }
  /* dlsym returns an object pointer; POSIX guarantees it converts */
  *(void **)(&entry) = dlsym(c->dl, KEEL_CUDA_PLUGIN_SYMBOL);
  if (!entry) return fail(c, "%s%s is not a keel CUDA plugin (it has no symbol %s)", path, origin,
                          KEEL_CUDA_PLUGIN_SYMBOL);
  pl = entry(KEEL_CUDA_ABI_VERSION);
  if (!pl) return fail(c, "the CUDA plugin %s%s returned no table", path, origin);
  if (pl->abi_version != KEEL_CUDA_ABI_VERSION || pl->size != (int32_t)sizeof *pl)
    return fail(c, "the CUDA plugin %s%s has ABI version %d (table of %d bytes), this keel expects %d (%d bytes): "
                "rebuild them together", path, origin, (int)pl->abi_version, (int)pl->size,
                KEEL_CUDA_ABI_VERSION, (int)sizeof *pl);
  c->pl = pl;
  if ((n = unset_slots()) != 0)
    return fail(c, "internal error: %d slot%s of the CUDA backend %s unset (engine/backend_cuda.c)", n,
                n == 1 ? "" : "s", n == 1 ? "is" : "are");
  code = pl->device_count(&n);
  if (code != KC_OK || n <= 0) {
    int rt = 0, drv = 0, kind = code == KC_OK ? KC_KIND_NO_DEVICE : pl->error_kind(code);
    const char *msg = code == KC_OK ? "no device" : pl->error_string(code);
    pl->versions(&rt, &drv);
    if (kind == KC_KIND_NO_DRIVER && drv == 0)
      return fail(c, "no CUDA driver is installed (cudaGetDeviceCount: %s)", msg);
    if (kind == KC_KIND_NO_DRIVER)
      return fail(c, "the CUDA driver (version %d.%d) is too old for the plugin's runtime %d.%d (%s)",
                  drv / 1000, drv % 1000 / 10, rt / 1000, rt % 1000 / 10, msg);
    if (kind == KC_KIND_NO_DEVICE) return fail(c, "no CUDA device (cudaGetDeviceCount: %s)", msg);
    return fail(c, "CUDA initialisation failed (cudaGetDeviceCount: %s)", msg);
  }
  c->n_devices = n;
  if ((code = pl->open(0, &c->s)) != KC_OK) {
    c->s = NULL;
    return fail(c, "cannot open CUDA device 0 of %d: %s", n, pl->error_string(code));
  }
  c->state = KL_CUDA_READY;
  c->why[0] = '\0';
  return 1;
}

/* The places the header describes before the linker's path: where a
** plugin file is (1, its path in path; from KEEL_CUDA_PLUGIN, *from says
** so), else 0 with the directories looked in, as the user would find them
** (no ".."), in tried. */
static int plugin_locate(char *path, size_t n, const char **from, char *tried, size_t tn) {
  static const char *const rel[] = {"", "/../lib", "/../../lib"};
  char dir[PATH_MAX], cand[PATH_MAX], real[PATH_MAX];
  const char *env = getenv("KEEL_CUDA_PLUGIN");
  size_t k = 0;
  *from = "";
  tried[0] = '\0';
  if (env && env[0]) {
    *from = " (from KEEL_CUDA_PLUGIN)";
    return snprintf(path, n, "%s", env) < (int)n;
  }
  if (!engine_dir(dir, sizeof dir)) return 0;
  for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
    if (snprintf(cand, sizeof cand, "%s%s/" KEEL_CUDA_PLUGIN_FILE, dir, rel[i]) >= (int)sizeof cand) continue;
    if (access(cand, F_OK) == 0) return snprintf(path, n, "%s", realpath(cand, real) ? real : cand) < (int)n;
    snprintf(cand, sizeof cand, "%s%s", dir, rel[i]);
    if (k < tn) k += (size_t)snprintf(tried + k, tn - k, "%s%s", k ? ", " : "", realpath(cand, real) ? real : cand);
  }
  return 0;
}

int keel_cuda_plugin_find(char *path, size_t n) {
  char tried[8];
  const char *from;
  /* KEEL_CUDA_PLUGIN is taken as given by the loader (to say why it fails) */
  return plugin_locate(path, n, &from, tried, sizeof tried) && access(path, F_OK) == 0;
}

/* Tries the places the header describes, in order. */
static int plugin_search(struct kl_cuda *c) {
  char path[PATH_MAX], tried[3 * PATH_MAX / 2];
  const char *from;
  if (plugin_locate(path, sizeof path, &from, tried, sizeof tried)) return plugin_open(c, path, from);
  /* the dynamic linker's path (LD_LIBRARY_PATH, ld.so.cache) */
  dlerror();
  c->dl = dlopen(KEEL_CUDA_PLUGIN_FILE, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (c->dl) {
    dlclose(c->dl);   /* NODELETE: still mapped; plugin_open opens it again by name */
    c->dl = NULL;
    return plugin_open(c, KEEL_CUDA_PLUGIN_FILE, " (from the library path)");
  }
  snprintf(c->path, sizeof c->path, "%s", KEEL_CUDA_PLUGIN_FILE);
  return fail(c, "the CUDA plugin " KEEL_CUDA_PLUGIN_FILE " was not found (looked in %s and the library path; "
              "keel builds it when nvcc is found at build time, or set KEEL_CUDA_PLUGIN)",
              tried[0] ? tried : "the engine's directory");
}

int kl_cuda_ready(keel_ctx *ctx) {
  struct kl_cuda *c = ctx->cuda;
  if (c && c->state == KL_CUDA_READY) return 1;
  if (c && c->state == KL_CUDA_FAILED) return 0;
  if (!(c = cuda_of(ctx))) return 0;
  return plugin_search(c);
}

const char *kl_cuda_why(const keel_ctx *ctx) {
  if (!ctx->cuda) return "out of memory";
  return ctx->cuda->state == KL_CUDA_READY ? "" : ctx->cuda->why;
}

int keel_cuda_available(keel_ctx *ctx, char *why, size_t n) {
  int ok = kl_cuda_ready(ctx);
  if (why && n) snprintf(why, n, "%s", ok ? "" : kl_cuda_why(ctx));
  return ok;
}

keel_status keel_cuda_load(keel_ctx *ctx, const char *path) {
  struct kl_cuda *c = cuda_of(ctx);
  if (!c) return kl_error(ctx, KEEL_ERR_NOMEM, "cuda_load: out of memory");
  if (c->state == KL_CUDA_READY) {
    if (!path || !strcmp(path, c->path)) return KEEL_OK;
    return kl_error(ctx, KEEL_ERR_DEVICE, "cuda_load: the CUDA plugin %s is already in use; cannot load %s",
                    c->path, path);
  }
  c->state = KL_CUDA_UNTRIED;
  if (path ? plugin_open(c, path, "") : plugin_search(c)) return KEEL_OK;
  return kl_error(ctx, KEEL_ERR_DEVICE, "cuda_load: %s", c->why);
}

const char *keel_cuda_plugin_path(const keel_ctx *ctx) {
  return ctx->cuda && ctx->cuda->state == KL_CUDA_READY ? ctx->cuda->path : NULL;
}

const char *keel_cuda_plugin_description(const keel_ctx *ctx) {
  return ctx->cuda && ctx->cuda->state == KL_CUDA_READY ? ctx->cuda->pl->description : NULL;
}

int keel_cuda_device_count(keel_ctx *ctx) { return kl_cuda_ready(ctx) ? ctx->cuda->n_devices : 0; }

/* A CUDA request on a context where CUDA is unavailable. */
static keel_status unavailable(keel_ctx *ctx, const char *fn) {
  return kl_error(ctx, KEEL_ERR_DEVICE, "%s: CUDA is not available: %s", fn, kl_cuda_why(ctx));
}

static keel_status plugin_error(keel_ctx *ctx, const char *fn, int code) {
  const keel_cuda_table *pl = ctx->cuda->pl;
  return kl_error(ctx, pl->error_kind(code) == KC_KIND_OOM ? KEEL_ERR_NOMEM : KEEL_ERR_DEVICE, "%s: CUDA error: %s",
                  fn, pl->error_string(code));
}

keel_status kl_cuda_error(keel_ctx *ctx, const char *fn, int code) { return plugin_error(ctx, fn, code); }
const keel_cuda_table *kl_cuda_table(const keel_ctx *ctx) { return ctx->cuda->pl; }
/* Any call but the queued ones launches an open batch first, so that the
** stream runs work in call order (its error is kept for the closing call). */
kc_state *kl_cuda_state(const keel_ctx *ctx) {
  struct kl_cuda *c = ctx->cuda;
  if (c->batch_open) c->pl->defer_results(c->s, KC_DEFER_FLUSH);
  return c->s;
}
kc_state *kl_cuda_batch_state(const keel_ctx *ctx) { return ctx->cuda->s; }

_Static_assert((int)KL_DEFER_WAIT == (int)KC_DEFER_WAIT && (int)KL_DEFER_ON == (int)KC_DEFER_ON &&
                   (int)KL_DEFER_LATER == (int)KC_DEFER_LATER,
               "the engine's defer modes are the plugin's");

keel_status kl_cuda_defer(keel_ctx *ctx, const char *fn, int mode) {
  struct kl_cuda *c = ctx->cuda;
  int code;
  if (!c || c->state != KL_CUDA_READY || !c->pl->defer_results) return KEEL_OK;
  c->batch_open = mode == KL_DEFER_ON;
  if ((code = c->pl->defer_results(c->s, mode)) != KC_OK) {
    c->batch_open = 0;
    return plugin_error(ctx, fn, code);
  }
  return KEEL_OK;
}

int kl_cuda_can_decide(const keel_ctx *ctx) {
  const struct kl_cuda *c = ctx->cuda;
  return c && c->state == KL_CUDA_READY && c->pl->defer_results && c->pl->decide && c->pl->results_ready;
}

keel_status kl_cuda_decide(keel_ctx *ctx, const char *fn, const kc_decide *q, kc_decision *out) {
  struct kl_cuda *c = ctx->cuda;
  int code;
  if (!kl_cuda_can_decide(ctx)) return kl_error(ctx, KEEL_ERR_DEVICE, "%s: the CUDA plugin cannot decide steps", fn);
  if ((code = c->pl->decide(c->s, q, out)) != KC_OK) return plugin_error(ctx, fn, code);
  return KEEL_OK;
}

keel_status kl_cuda_results_ready(keel_ctx *ctx, const char *fn, int *ready) {
  struct kl_cuda *c = ctx->cuda;
  int code;
  *ready = 1;
  if (!c || c->state != KL_CUDA_READY) return KEEL_OK;
  if (!c->pl->results_ready) {
    *ready = 0;
    return KEEL_OK;
  }
  if ((code = c->pl->results_ready(c->s)) < 0) return plugin_error(ctx, fn, code);
  *ready = code == 1;
  return KEEL_OK;
}

keel_status kl_cuda_results_wait(keel_ctx *ctx, const char *fn) {
  struct kl_cuda *c = ctx->cuda;
  int code;
  if (!c || c->state != KL_CUDA_READY || !c->pl->results_wait) return KEEL_OK;
  if ((code = c->pl->results_wait(c->s)) != KC_OK) return plugin_error(ctx, fn, code);
  return KEEL_OK;
}

keel_status keel_cuda_device_name(keel_ctx *ctx, int device, char *buf, size_t n) {
  int code;
  if (n) buf[0] = '\0';
  if (!kl_cuda_ready(ctx)) return unavailable(ctx, "cuda_device_name");
  if (device < 0 || device >= ctx->cuda->n_devices)
    return kl_error(ctx, KEEL_ERR_INDEX, "cuda_device_name: device %d out of range (CUDA sees %d device%s, 0..%d)",
                    device, ctx->cuda->n_devices, ctx->cuda->n_devices == 1 ? "" : "s", ctx->cuda->n_devices - 1);
  if ((code = ctx->cuda->pl->device_name(device, buf, n)) != KC_OK) return plugin_error(ctx, "cuda_device_name", code);
  return KEEL_OK;
}

keel_status keel_cuda_synchronize(keel_ctx *ctx) {
  int code;
  if (!kl_cuda_ready(ctx)) return unavailable(ctx, "cuda_synchronize");
  if ((code = ctx->cuda->pl->synchronize(ctx->cuda->s)) != KC_OK) return plugin_error(ctx, "cuda_synchronize", code);
  return KEEL_OK;
}

keel_status keel_cuda_mem_get_info(keel_ctx *ctx, size_t *free_bytes, size_t *total_bytes) {
  int code;
  *free_bytes = *total_bytes = 0;
  if (!kl_cuda_ready(ctx)) return unavailable(ctx, "cuda_mem_get_info");
  if ((code = ctx->cuda->pl->mem_info(ctx->cuda->s, free_bytes, total_bytes)) != KC_OK)
    return plugin_error(ctx, "cuda_mem_get_info", code);
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** The caching allocator. Blocks are rounded to the CPU cache's size
** classes (at most 25% waste) and kept per class when freed; the records
** that remember them live in host memory (device memory is not ours to
** write a list into). Nothing is given back until empty_cache, a failed
** allocation (which then retries once) or the context's end. A plugin
** with mem_in_use (the simulator) hears how much of each block is in use,
** so that the rounding and the cached blocks are not silently usable.
** ======================================================================= */

static void device_free(struct kl_cuda *c, void *p, size_t size) {
  c->pl->free(c->s, p);   /* an error here leaves nothing to do */
  c->mem.reserved_bytes -= size;
  c->mem.device_frees++;
}

static void cache_release(keel_ctx *ctx) {
  struct kl_cuda *c = ctx->cuda;
  for (int k = 0; k < KL_CACHE_CLASSES; k++) {
    while (c->cache[k]) {
      kl_dblock *b = c->cache[k];
      c->cache[k] = b->next;
      device_free(c, b->ptr, b->size);
      b->next = c->spare;
      c->spare = b;
    }
  }
}

void *kl_cuda_alloc(keel_ctx *ctx, size_t nbytes) {
  struct kl_cuda *c = ctx->cuda;
  size_t rounded;
  int k = kl_size_class(nbytes, &rounded), code;
  void *p = NULL;
  c->mem.allocs++;
  if (k < KL_CACHE_CLASSES && c->cache[k]) {
    kl_dblock *b = c->cache[k];
    c->cache[k] = b->next;
    p = b->ptr;
    b->next = c->spare;
    c->spare = b;
  } else {
    code = c->pl->malloc(c->s, &p, rounded);
    if (code != KC_OK && c->pl->error_kind(code) == KC_KIND_OOM) {
      c->mem.cache_flushes++;
      cache_release(ctx);
      code = c->pl->malloc(c->s, &p, rounded);
    }
    if (code != KC_OK) {
      kl_error(ctx, c->pl->error_kind(code) == KC_KIND_OOM ? KEEL_ERR_NOMEM : KEEL_ERR_DEVICE,
               "tensor: CUDA could not allocate %zu bytes: %s (%zu bytes in use, %zu reserved)", rounded,
               c->pl->error_string(code), c->mem.allocated_bytes, c->mem.reserved_bytes);
      return NULL;
    }
    c->mem.device_mallocs++;
    c->mem.reserved_bytes += rounded;
    if (c->mem.reserved_bytes > c->mem.peak_reserved_bytes) c->mem.peak_reserved_bytes = c->mem.reserved_bytes;
  }
  if (c->pl->mem_in_use && (code = c->pl->mem_in_use(c->s, p, nbytes, rounded)) != KC_OK) {
    /* the plugin does not know the block as malloc gave it: a bug */
    kl_error(ctx, KEEL_ERR_DEVICE, "tensor: the CUDA plugin refused the bounds of a %zu-byte block: %s", rounded,
             c->pl->error_string(code));
    device_free(c, p, rounded);
    return NULL;
  }
  c->mem.allocated_bytes += rounded;
  if (c->mem.allocated_bytes > c->mem.peak_allocated_bytes) c->mem.peak_allocated_bytes = c->mem.allocated_bytes;
  return p;
}

void kl_cuda_free(keel_ctx *ctx, void *p, size_t nbytes) {
  struct kl_cuda *c = ctx->cuda;
  size_t rounded;
  int k = kl_size_class(nbytes, &rounded);
  kl_dblock *b;
  if (!p) return;
  c->mem.frees++;
  c->mem.allocated_bytes -= rounded;
  b = c->spare;
  if (b) c->spare = b->next;
  else b = (kl_dblock *)kl_malloc(ctx, sizeof *b);
  if (k >= KL_CACHE_CLASSES || !b || ctx->closed) {
    /* too big to class, no record, or the context is going away */
    if (b) { b->next = c->spare; c->spare = b; }
    device_free(c, p, rounded);
    return;
  }
  /* cached: none of it in use. free has no error to return; a refusal
  ** (an engine bug) recurs, reported, when the block is handed out again */
  if (c->pl->mem_in_use) c->pl->mem_in_use(c->s, p, 0, rounded);
  b->ptr = p;
  b->size = rounded;
  b->next = c->cache[k];
  c->cache[k] = b;
}

void keel_cuda_memory_stats_get(const keel_ctx *ctx, keel_cuda_memory_stats *out) {
  if (ctx->cuda) *out = ctx->cuda->mem;
  else memset(out, 0, sizeof *out);
}

void keel_cuda_empty_cache(keel_ctx *ctx) {
  if (ctx->cuda && ctx->cuda->state == KL_CUDA_READY) cache_release(ctx);
}

void kl_cuda_shutdown(keel_ctx *ctx) {
  struct kl_cuda *c = ctx->cuda;
  if (!c) return;
  if (c->state == KL_CUDA_READY) {
    cache_release(ctx);
    c->pl->close(c->s);
    dlclose(c->dl);
  }
  while (c->spare) {
    kl_dblock *b = c->spare;
    c->spare = b->next;
    kl_free(ctx, b, sizeof *b);
  }
  kl_free(ctx, c, sizeof *c);
  ctx->cuda = NULL;
}

/* }====================================================================== */

/* {======================================================================
** Moving data between devices
** ======================================================================= */

/* src itself when it is dense with dtype dt, else a dense copy on its own
** device; *owned tells the caller to release it. */
static keel_status dense_as(keel_ctx *ctx, const keel_tensor *src, keel_dtype dt, const keel_tensor **out,
                            keel_tensor **owned) {
  keel_status st;
  *owned = NULL;
  *out = src;
  if (src->dtype == dt && kl_is_contiguous(src)) return KEEL_OK;
  if ((st = kl_new(ctx, dt, src->storage->device, src->ndim, src->shape, owned))) return st;
  if ((st = kl_backend_for(ctx, src->storage->device)->copy(ctx, *owned, src))) { kl_release(owned); return st; }
  *out = *owned;
  return KEEL_OK;
}

keel_status kl_transfer(keel_ctx *ctx, const keel_tensor *src, keel_device dev, keel_dtype dt, keel_tensor **out) {
  keel_device from = src->storage->device;
  const keel_tensor *d;
  keel_tensor *tmp, *o;
  keel_status st;
  int code;
  *out = NULL;
  if ((st = kl_new(ctx, dt, dev, src->ndim, src->shape, &o))) return st;
  if (from == dev) {
    if ((st = kl_backend_for(ctx, dev)->copy(ctx, o, src))) goto fail;
    *out = o;
    return KEEL_OK;
  }
  /* across devices: dense on the source side in the target dtype, then one
  ** contiguous copy (the host side converts; the device side never sees
  ** host strides) */
  if ((st = dense_as(ctx, src, dt, &d, &tmp))) goto fail;
  if (o->numel == 0) {
    code = KC_OK;
  } else if (dev == KEEL_CUDA) {
    ctx->cuda->mem.h2d_copies++;
    code = ctx->cuda->pl->memcpy_h2d(ctx->cuda->s, kl_data(o), kl_data(d), (size_t)o->numel * kl_dtype_size[dt]);
  } else {
    ctx->cuda->mem.d2h_copies++;
    code = ctx->cuda->pl->memcpy_d2h(ctx->cuda->s, kl_data(o), kl_data(d), (size_t)o->numel * kl_dtype_size[dt]);
  }
  keel_tensor_release(tmp);
  if (code != KC_OK) { st = plugin_error(ctx, "to", code); goto fail; }
  *out = o;
  return KEEL_OK;
fail:
  keel_tensor_release(o);
  return st;
}

/* Index tensors (class targets, token ids) are typically uploaded every
** step and then checked on the host by the op that reads them; keeping
** the values they were uploaded with saves that op a download, which
** would wait for all the work queued before it. Small ones only: the copy
** is host memory held as long as the device tensor. */
#define SHADOW_MAX_NUMEL ((int64_t)1 << 20)
static void keep_shadow(keel_ctx *ctx, const keel_tensor *src, keel_tensor *o) {
  kl_err_saved saved;
  keel_tensor *h = NULL;
  /* o is new and contiguous: a contiguous copy of src has its layout */
  if (src->storage->device != KEEL_CPU || o->numel > SHADOW_MAX_NUMEL) return;
  kl_err_save(ctx, &saved);
  if (kl_transfer(ctx, src, KEEL_CPU, KEEL_I64, &h) == KEEL_OK) {
    o->storage->shadow = h;
    o->storage->shadow_version = o->storage->version;
  }
  kl_err_restore(ctx, &saved);   /* without the copy, checks download: no error */
}

keel_status kl_upload_index(keel_ctx *ctx, const keel_tensor *h, keel_tensor **out) {
  keel_status st = kl_transfer(ctx, h, KEEL_CUDA, KEEL_I64, out);
  if (!st && h->dtype == KEEL_I64) keep_shadow(ctx, h, *out);
  return st;
}

keel_status kl_host_values(keel_ctx *ctx, const keel_tensor *t, keel_tensor **out) {
  const kl_storage *s = t->storage;
  if (s->device == KEEL_CPU) {
    *out = keel_tensor_retain((keel_tensor *)t);
    return KEEL_OK;
  }
  keel_status st;
  if (s->shadow && s->version == s->shadow_version)
    return kl_alias(ctx, s->shadow, t->ndim, t->shape, t->stride, t->offset, out);
  if ((st = kl_transfer(ctx, t, KEEL_CPU, t->dtype, out))) return st;
  /* a small int64 tensor that is its whole storage (an index made on the
  ** device: argmax, a computed target): the download becomes its host
  ** copy, so the next check of the same values (backward's) need not wait */
  if (t->dtype == KEEL_I64 && t->offset == 0 && kl_is_contiguous(t) && t->numel <= SHADOW_MAX_NUMEL &&
      (size_t)t->numel * sizeof(int64_t) == s->nbytes) {
    kl_storage *w = t->storage;
    keel_tensor_release(w->shadow);
    w->shadow = keel_tensor_retain(*out);
    w->shadow_version = w->version;
  }
  return KEEL_OK;
}

keel_status keel_to_device(keel_ctx *ctx, keel_tensor *a, keel_device dev, int copy, keel_tensor **out) {
  keel_status st;
  keel_tensor *o;
  *out = NULL;
  if ((st = kl_check_same_ctx(ctx, "to", a))) return st;
  if (dev != KEEL_CPU && dev != KEEL_CUDA) return kl_error(ctx, KEEL_ERR_ARG, "to: unknown device %d", (int)dev);
  if (dev == KEEL_CUDA && !kl_cuda_ready(ctx)) return unavailable(ctx, "to");
  if (dev == a->storage->device && !copy) { *out = keel_tensor_retain(a); return KEEL_OK; }
  if ((st = kl_transfer(ctx, a, dev, a->dtype, &o))) return st;
  if (dev == KEEL_CUDA && a->dtype == KEEL_I64) keep_shadow(ctx, a, o);
  if (kl_needs_grad(ctx, 1, &a)) {
    kl_node *n = kl_record(ctx, KL_OP_TO_DEVICE, 1, &a, o);
    if (!n) { keel_tensor_release(o); return kl_error(ctx, KEEL_ERR_NOMEM, "to: out of memory"); }
    n->iparam[0] = a->storage->device;
  }
  *out = o;
  return KEEL_OK;
}

/* The gradient goes back where the input lives (a copy even on the same
** device: backward may write into what it is handed). */
KL_BACKWARD(kl_to_device_backward) {
  return keel_to_device(ctx, gout, (keel_device)n->iparam[0], 1, &gin[0]);
}

/* }====================================================================== */
