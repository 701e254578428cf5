/*
** context.c: the keel_ctx (allocator, error slot, RNG, grad mode) and the
** caching allocator behind tensor storage.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "keel_impl.h"

static void *default_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud; (void)osize;
  if (nsize == 0) { free(ptr); return NULL; }
  return realloc(ptr, nsize);
}

keel_status keel_ctx_new(keel_ctx **out, keel_alloc_fn alloc, void *ud) {
  keel_ctx *ctx;
  *out = NULL;
  if (!alloc) alloc = default_alloc;
  ctx = (keel_ctx *)alloc(ud, NULL, 0, sizeof *ctx);
  if (!ctx) return KEEL_ERR_NOMEM;
  memset(ctx, 0, sizeof *ctx);
  ctx->alloc = alloc;
  ctx->alloc_ud = ud;
  ctx->grad_enabled = 1;
  ctx->refcount = 1;
  ctx->next_hook_id = 1;
  ctx->cache_limit = (size_t)256 << 20;
  keel_manual_seed(ctx, 0x6b65656cULL);
  *out = ctx;
  return KEEL_OK;
}

static void cache_drain(keel_ctx *ctx) {
  for (int c = 0; c < KL_CACHE_CLASSES; c++) {
    kl_block *b = ctx->cache[c];
    while (b) {
      kl_block *next = b->next;
      ctx->mem.cached_bytes -= b->size;
      ctx->alloc(ctx->alloc_ud, b, b->size, 0);
      b = next;
    }
    ctx->cache[c] = NULL;
  }
}

static void spare_drain(keel_ctx *ctx, void **list, int *count, size_t n) {
  while (*list) {
    void *next = *(void **)*list;
    ctx->alloc(ctx->alloc_ud, *list, n, 0);
    *list = next;
  }
  *count = 0;
}

static void ctx_destroy(keel_ctx *ctx) {
  kl_cuda_shutdown(ctx);
  cache_drain(ctx);
  spare_drain(ctx, &ctx->spare_tensors, &ctx->n_spare_tensors, sizeof(keel_tensor));
  spare_drain(ctx, &ctx->spare_storages, &ctx->n_spare_storages, sizeof(kl_storage));
  ctx->alloc(ctx->alloc_ud, ctx, sizeof *ctx, 0);
}

void kl_ctx_ref(keel_ctx *ctx) { ctx->refcount++; }

void kl_ctx_unref(keel_ctx *ctx) {
  if (--ctx->refcount == 0) ctx_destroy(ctx);
}

void keel_ctx_free(keel_ctx *ctx) {
  if (!ctx || ctx->closed) return;
  ctx->closed = 1;
  kl_ctx_unref(ctx);
}

keel_status kl_error(keel_ctx *ctx, keel_status st, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
  va_end(ap);
  ctx->status = st;
  return st;
}

const char *keel_last_error(const keel_ctx *ctx) { return ctx->err; }
keel_status keel_last_status(const keel_ctx *ctx) { return ctx->status; }

void kl_err_save(const keel_ctx *ctx, kl_err_saved *s) {
  s->status = ctx->status;
  memcpy(s->err, ctx->err, sizeof s->err);
}

void kl_err_restore(keel_ctx *ctx, const kl_err_saved *s) {
  ctx->status = s->status;
  memcpy(ctx->err, s->err, sizeof s->err);
}

const char *keel_status_name(keel_status st) {
  static const char *names[] = {"ok", "bad argument", "shape mismatch", "unsupported dtype",
                                "index out of range", "out of memory", "device error",
                                "autograd state", "callback error", "i/o error"};
  return (unsigned)st < sizeof names / sizeof names[0] ? names[st] : "unknown status";
}

int keel_set_grad_enabled(keel_ctx *ctx, int enabled) {
  int old = ctx->grad_enabled;
  ctx->grad_enabled = enabled != 0;
  return old;
}
int keel_is_grad_enabled(const keel_ctx *ctx) { return ctx->grad_enabled; }
void keel_set_index_base(keel_ctx *ctx, int base) { ctx->index_base = base ? 1 : 0; }
int keel_index_base(const keel_ctx *ctx) { return ctx->index_base; }

/* {======================================================================
** Small allocations (tensor handles, nodes) go straight to the host's
** allocator. Storage goes through a size-class cache.
** ======================================================================= */

void *kl_malloc(keel_ctx *ctx, size_t n) { return ctx->alloc(ctx->alloc_ud, NULL, 0, n); }
void kl_free(keel_ctx *ctx, void *p, size_t n) {
  if (p) ctx->alloc(ctx->alloc_ud, p, n, 0);
}

/*
** Size classes: four per power of two from 256 bytes up, so a rounded
** block wastes at most 25%. Blocks under 256 bytes use class 0.
*/
int kl_size_class(size_t n, size_t *rounded) {
  size_t base = 256;
  int c = 0;
  if (n <= base) { *rounded = base; return 0; }
  while (base * 2 < n) { base *= 2; c += 4; }
  for (int q = 1; q <= 4; q++) {
    size_t s = base + base / 4 * q;
    if (n <= s) { *rounded = s; return c + q; }
  }
  *rounded = base * 2;
  return c + 4;
}

static void *cpu_alloc(keel_ctx *ctx, size_t nbytes) {
  size_t rounded;
  int c = kl_size_class(nbytes, &rounded);
  void *p;
  ctx->mem.allocs++;
  if (c < KL_CACHE_CLASSES && ctx->cache[c]) {
    kl_block *b = ctx->cache[c];
    ctx->cache[c] = b->next;
    ctx->mem.cached_bytes -= b->size;
    ctx->mem.cache_hits++;
    p = b;
  } else {
    p = ctx->alloc(ctx->alloc_ud, NULL, 0, rounded);
    if (!p) {  /* give the cache back and try once more */
      cache_drain(ctx);
      p = ctx->alloc(ctx->alloc_ud, NULL, 0, rounded);
      if (!p) return NULL;
    }
  }
  ctx->mem.live_bytes += rounded;
  if (ctx->mem.live_bytes > ctx->mem.peak_bytes) ctx->mem.peak_bytes = ctx->mem.live_bytes;
  return p;
}

static void cpu_free(keel_ctx *ctx, void *p, size_t nbytes) {
  size_t rounded;
  int c = kl_size_class(nbytes, &rounded);
  if (!p) return;
  ctx->mem.live_bytes -= rounded;
  if (c < KL_CACHE_CLASSES && !ctx->closed &&
      ctx->mem.cached_bytes + rounded <= ctx->cache_limit) {
    kl_block *b = (kl_block *)p;
    b->size = rounded;
    b->next = ctx->cache[c];
    ctx->cache[c] = b;
    ctx->mem.cached_bytes += rounded;
  } else {
    ctx->alloc(ctx->alloc_ud, p, rounded, 0);
  }
}

void *kl_spare_get(keel_ctx *ctx, void **list, int *count, size_t n) {
  void *p = *list;
  if (!p) return kl_malloc(ctx, n);
  *list = *(void **)p;
  (*count)--;
  return p;
}

void kl_spare_put(keel_ctx *ctx, void **list, int *count, void *p, size_t n) {
  if (*count >= KL_SPARE_MAX || ctx->closed) {
    kl_free(ctx, p, n);
    return;
  }
  *(void **)p = *list;
  *list = p;
  (*count)++;
}

void keel_memory_trim(keel_ctx *ctx) {
  cache_drain(ctx);
  spare_drain(ctx, &ctx->spare_tensors, &ctx->n_spare_tensors, sizeof(keel_tensor));
  spare_drain(ctx, &ctx->spare_storages, &ctx->n_spare_storages, sizeof(kl_storage));
}

void keel_memory_stats_get(const keel_ctx *ctx, keel_memory_stats *out) { *out = ctx->mem; }

/* }====================================================================== */

/* {======================================================================
** RNG: xoshiro256** seeded through splitmix64, one stream per context.
** ======================================================================= */

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void keel_manual_seed(keel_ctx *ctx, uint64_t seed) {
  uint64_t x = seed;
  for (int i = 0; i < 4; i++) ctx->rng[i] = splitmix64(&x);
}

void keel_rng_get_state(const keel_ctx *ctx, uint64_t state[4]) {
  for (int i = 0; i < 4; i++) state[i] = ctx->rng[i];
}

keel_status keel_rng_set_state(keel_ctx *ctx, const uint64_t state[4]) {
  if (!(state[0] | state[1] | state[2] | state[3]))
    return kl_error(ctx, KEEL_ERR_ARG, "rng_set_state: an all-zero state is invalid for xoshiro256**");
  for (int i = 0; i < 4; i++) ctx->rng[i] = state[i];
  return KEEL_OK;
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t kl_rng_next(keel_ctx *ctx) {
  uint64_t *s = ctx->rng;
  uint64_t result = rotl(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double kl_rng_uniform(keel_ctx *ctx) {
  return (double)(kl_rng_next(ctx) >> 11) * (1.0 / 9007199254740992.0);
}

/* }====================================================================== */

/* {======================================================================
** Backend registry
** ======================================================================= */

const kl_backend *kl_backend_for(keel_ctx *ctx, keel_device dev) {
  if (dev == KEEL_CPU) return &kl_cpu_backend;
  /* the first CUDA request opens the plugin (device.c); later ones read a flag */
  if (dev == KEEL_CUDA && kl_cuda_ready(ctx)) return &kl_cuda_backend;
  return NULL;
}

/* The CPU backend's allocation entry points live here beside the cache. */
void *kl_cpu_alloc(keel_ctx *ctx, size_t nbytes) { return cpu_alloc(ctx, nbytes); }
void kl_cpu_free(keel_ctx *ctx, void *p, size_t nbytes) { cpu_free(ctx, p, nbytes); }

/* }====================================================================== */
