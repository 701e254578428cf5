/*
** loader.c: the data loader (keel_loader_*, documented in keel.h): batches
** of dataset rows in a seeded per-epoch order, per-sample transforms in C,
** and a background thread that prepares the next batches while the caller
** trains.
**
** Threads. The context (allocator, storage cache, error buffer, reference
** counts) is NOT thread-safe, so the prefetch thread never calls into it:
** every buffer it writes (the batch tensors of the slots, the per-sample
** scratch) and the order it reads are allocated on the caller's thread, and
** the thread only reads x, y and the order and writes into the data of the
** slot tensors. A slot's tensor goes to the caller as it is (no copy) and the
** caller's thread allocates its replacement. Hand-over is under one mutex
** and condition variable; a reset (new epoch, set_state) waits until the
** thread is out of its fill before it changes the order. Errors the thread
** meets are kept as text in the slot and reported by keel_loader_next.
** The caller must not resize or write x or y while a loader reads them.
**
** Device datasets. When x and y live on a CUDA device the rows are not
** copied on the host: the order and the random draws are made here as for
** the CPU (same streams, so the same batches), and each batch is gathered
** on the device by index_select with the batch's rows, the transforms run
** as device ops (to_float and normalize as float32 multiply, subtract and
** divide, exactly the CPU loop's arithmetic; random_crop as one gather
** from the zero-padded batch; random_hflip as a select between the batch
** and its reversed copy). There is no prefetch thread (it could not call
** the context); the device queue already runs the gathers asynchronously.
*/
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include "keel_impl.h"

#define MAX_PREFETCH 64
#define MAX_TRANSFORMS 32

enum { SLOT_FREE = 0, SLOT_FILLING, SLOT_READY };

typedef struct kl_slot {
  keel_tensor *x, *y;   /* full-batch buffers (y NULL without labels) */
  int64_t batch;        /* the batch filled in, -1 when free */
  int state;
  int failed;
  char err[256];
} kl_slot;

struct keel_loader {
  keel_ctx *ctx;
  keel_tensor *x, *y;               /* contiguous, retained */
  const char *xdata, *ydata;
  int64_t n, bs, nb;
  size_t xrow, yrow;                /* bytes of one row */
  int sndim;                        /* sample shape of x (rank without N) */
  int64_t sshape[KEEL_MAX_DIMS];
  int ondim;                        /* sample shape after the transforms */
  int64_t oshape[KEEL_MAX_DIMS];
  int64_t onumel;
  int shuffle, drop_last;
  uint64_t seed;
  int64_t epoch, cursor;            /* cursor: next batch for the caller */
  int64_t *order;
  int ntf;
  keel_transform *tf;
  float *scratch[2];                /* used by the one filler (thread or caller) */
  size_t scratch_n;                 /* floats in each */
  int nslots;
  kl_slot *slots;
  int threaded;
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int64_t next_fill;                /* next batch for the thread */
  int stop, busy;
  uint64_t gen;                     /* bumped by every reset */
  keel_device dev;                  /* x's and y's device */
  keel_tensor **tfa, **tfb;         /* device datasets: per-transform float32 operands */
};

/* {====================================================================
** RNG (splitmix64, documented in keel.h)
** ===================================================================== */

static uint64_t rng_start(uint64_t seed, int64_t epoch, int64_t pos) {
  return seed * UINT64_C(0x9E3779B97F4A7C15) + (uint64_t)epoch * UINT64_C(0xBF58476D1CE4E5B9) +
         (uint64_t)(pos + 1) * UINT64_C(0x94D049BB133111EB);
}

static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += UINT64_C(0x9E3779B97F4A7C15));
  z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
  return z ^ (z >> 31);
}

static int64_t rng_int(uint64_t *s, int64_t n) { return (int64_t)((rng_next(s) >> 11) % (uint64_t)n); }
static double rng_unit(uint64_t *s) { return (double)(rng_next(s) >> 11) * 0x1p-53; }

static void make_order(keel_loader *ld) {
  int64_t i;
  for (i = 0; i < ld->n; i++) ld->order[i] = i;
  if (ld->shuffle) {
    uint64_t s = rng_start(ld->seed, ld->epoch, -1);
    for (i = ld->n - 1; i >= 1; i--) {
      int64_t j = rng_int(&s, i + 1), t = ld->order[i];
      ld->order[i] = ld->order[j];
      ld->order[j] = t;
    }
  }
}

/* }==================================================================== */

/* {====================================================================
** Transforms and batch assembly (run by the thread: no context calls)
** ===================================================================== */

/* Channels, height, width of a sample shape (see keel.h). */
static void chw(int ndim, const int64_t *shape, int64_t *c, int64_t *h, int64_t *w) {
  int64_t n = kl_numel(ndim, shape);
  if (ndim == 3) { *c = shape[0]; *h = shape[1]; *w = shape[2]; }
  else if (ndim == 2) { *c = 1; *h = shape[0]; *w = shape[1]; }
  else { *c = 1; *h = 1; *w = n; }
}

static void crop(const float *src, float *dst, int64_t c, int64_t h, int64_t w,
                 const keel_transform *t, int64_t top, int64_t left) {
  int64_t ch, i, p = t->padding, sh = t->size_h, sw = t->size_w;
  /* the columns j of the window whose source column left + j - p is inside */
  int64_t j0 = p - left > 0 ? p - left : 0;
  int64_t j1 = w + p - left < sw ? w + p - left : sw;
  for (ch = 0; ch < c; ch++)
    for (i = 0; i < sh; i++) {
      float *d = dst + (ch * sh + i) * sw;
      int64_t si = top + i - p;
      if (si < 0 || si >= h || j1 <= j0) {
        memset(d, 0, (size_t)sw * sizeof *d);
        continue;
      }
      if (j0 > 0) memset(d, 0, (size_t)j0 * sizeof *d);
      memcpy(d + j0, src + (ch * h + si) * w + (left + j0 - p), (size_t)(j1 - j0) * sizeof *d);
      if (j1 < sw) memset(d + j1, 0, (size_t)(sw - j1) * sizeof *d);
    }
}

/* Runs the pipeline on one sample; returns the buffer holding the result. */
static float *transform_sample(keel_loader *ld, const char *row, int64_t pos, int64_t epoch) {
  float *cur = ld->scratch[0], *other = ld->scratch[1];
  int64_t c, h, w, i, k, numel = kl_numel(ld->sndim, ld->sshape);
  uint64_t s = rng_start(ld->seed, epoch, pos);
  int ti;
  chw(ld->sndim, ld->sshape, &c, &h, &w);
  memcpy(cur, row, ld->xrow);
  for (ti = 0; ti < ld->ntf; ti++) {
    const keel_transform *t = &ld->tf[ti];
    switch (t->kind) {
    case KEEL_TF_TO_FLOAT: {
      float sc = (float)t->scale;
      for (i = 0; i < numel; i++) cur[i] *= sc;
      break;
    }
    case KEEL_TF_NORMALIZE: {
      int64_t hw = h * w;
      for (k = 0; k < c; k++) {
        float m = (float)t->mean[t->nch == 1 ? 0 : k], sd = (float)t->std[t->nch == 1 ? 0 : k];
        float *p = cur + k * hw;
        for (i = 0; i < hw; i++) p[i] = (p[i] - m) / sd;
      }
      break;
    }
    case KEEL_TF_RANDOM_CROP: {
      int64_t top = rng_int(&s, h + 2 * t->padding - t->size_h + 1);
      int64_t left = rng_int(&s, w + 2 * t->padding - t->size_w + 1);
      float *tmp;
      crop(cur, other, c, h, w, t, top, left);
      h = t->size_h;
      w = t->size_w;
      numel = c * h * w;
      tmp = cur; cur = other; other = tmp;
      break;
    }
    case KEEL_TF_RANDOM_HFLIP:
      if (rng_unit(&s) < t->p)
        for (k = 0; k < c * h; k++) {
          float *r = cur + k * w;
          for (i = 0; i < w / 2; i++) {
            float v = r[i];
            r[i] = r[w - 1 - i];
            r[w - 1 - i] = v;
          }
        }
      break;
    }
  }
  return cur;
}

/* Fills slot sl with batch b of the given epoch. Thread-safe with respect
** to the context: touches only preallocated memory. */
static void fill(keel_loader *ld, kl_slot *sl, int64_t b, int64_t epoch) {
  int64_t start = b * ld->bs, cnt = ld->n - start < ld->bs ? ld->n - start : ld->bs, k;
  char *xd = (char *)keel_tensor_data(sl->x);
  char *yd = sl->y ? (char *)keel_tensor_data(sl->y) : NULL;
  size_t obytes = (size_t)ld->onumel * keel_dtype_size(keel_tensor_dtype(ld->x));
  sl->failed = 0;
  for (k = 0; k < cnt; k++) {
    int64_t row = ld->order[start + k];
    if (row < 0 || row >= ld->n) {   /* cannot happen: the order is a permutation */
      sl->failed = 1;
      snprintf(sl->err, sizeof sl->err, "DataLoader: row %lld out of range in batch %lld",
               (long long)row, (long long)b + 1);
      return;
    }
    if (ld->ntf == 0) memcpy(xd + (size_t)k * obytes, ld->xdata + (size_t)row * ld->xrow, obytes);
    else memcpy(xd + (size_t)k * obytes,
                transform_sample(ld, ld->xdata + (size_t)row * ld->xrow, start + k, epoch), obytes);
    if (yd) memcpy(yd + (size_t)k * ld->yrow, ld->ydata + (size_t)row * ld->yrow, ld->yrow);
  }
}

static void *worker(void *arg) {
  keel_loader *ld = (keel_loader *)arg;
  pthread_mutex_lock(&ld->mu);
  for (;;) {
    int64_t b, epoch;
    uint64_t gen;
    kl_slot *sl;
    while (!ld->stop && !(ld->next_fill < ld->nb && ld->next_fill < ld->cursor + ld->nslots))
      pthread_cond_wait(&ld->cv, &ld->mu);
    if (ld->stop) break;
    b = ld->next_fill++;
    sl = &ld->slots[b % ld->nslots];   /* free: batches below cursor were taken */
    sl->state = SLOT_FILLING;
    sl->batch = b;
    epoch = ld->epoch;
    gen = ld->gen;
    ld->busy = 1;
    pthread_mutex_unlock(&ld->mu);
    fill(ld, sl, b, epoch);
    pthread_mutex_lock(&ld->mu);
    ld->busy = 0;
    sl->state = gen == ld->gen ? SLOT_READY : SLOT_FREE;
    pthread_cond_broadcast(&ld->cv);
  }
  pthread_mutex_unlock(&ld->mu);
  return NULL;
}

/* Moves to (epoch, cursor, seed): drops prepared batches, makes the order. */
static void reset(keel_loader *ld, int64_t epoch, int64_t cursor, uint64_t seed) {
  int i;
  if (ld->threaded) {
    pthread_mutex_lock(&ld->mu);
    ld->gen++;
    while (ld->busy) pthread_cond_wait(&ld->cv, &ld->mu);
  }
  for (i = 0; i < ld->nslots; i++) {
    ld->slots[i].state = SLOT_FREE;
    ld->slots[i].batch = -1;
  }
  ld->epoch = epoch;
  ld->cursor = cursor;
  ld->seed = seed;
  ld->next_fill = cursor;
  make_order(ld);
  if (ld->threaded) {
    pthread_cond_broadcast(&ld->cv);
    pthread_mutex_unlock(&ld->mu);
  }
}

/* }==================================================================== */

/* {====================================================================
** Device datasets (caller's thread: the work is context ops)
** ===================================================================== */

/* A float32 tensor [n] (or [n, 1, 1] when rank3) of values v on dev. */
static keel_status dev_values(keel_ctx *ctx, keel_device dev, int n, const double *v, int rank3,
                              keel_tensor **out) {
  int64_t shape[3] = {n, 1, 1};
  keel_tensor *h = NULL;
  keel_status st;
  int i;
  *out = NULL;
  if ((st = kl_new(ctx, KEEL_F32, KEEL_CPU, rank3 ? 3 : 1, shape, &h)) != KEEL_OK) return st;
  for (i = 0; i < n; i++) ((float *)keel_tensor_data(h))[i] = (float)v[i];
  st = keel_to_device(ctx, h, dev, 0, out);
  keel_tensor_release(h);
  return st;
}

/* The operands of the elementwise transforms, made once on the device. */
static keel_status dev_operands(keel_loader *ld) {
  keel_ctx *ctx = ld->ctx;
  keel_status st;
  int ti;
  if (ld->ntf == 0) return KEEL_OK;
  ld->tfa = (keel_tensor **)kl_malloc(ctx, (size_t)ld->ntf * sizeof *ld->tfa);
  ld->tfb = (keel_tensor **)kl_malloc(ctx, (size_t)ld->ntf * sizeof *ld->tfb);
  if (!ld->tfa || !ld->tfb) return KEEL_ERR_NOMEM;
  memset(ld->tfa, 0, (size_t)ld->ntf * sizeof *ld->tfa);
  memset(ld->tfb, 0, (size_t)ld->ntf * sizeof *ld->tfb);
  for (ti = 0; ti < ld->ntf; ti++) {
    const keel_transform *t = &ld->tf[ti];
    if (t->kind == KEEL_TF_TO_FLOAT) {
      if ((st = dev_values(ctx, ld->dev, 1, &t->scale, 0, &ld->tfa[ti])) != KEEL_OK) return st;
    } else if (t->kind == KEEL_TF_NORMALIZE) {
      /* per channel [C, 1, 1] against [B, C, H, W]; one value broadcasts as [1] */
      int rank3 = t->nch > 1;
      if ((st = dev_values(ctx, ld->dev, t->nch, t->mean, rank3, &ld->tfa[ti])) != KEEL_OK ||
          (st = dev_values(ctx, ld->dev, t->nch, t->std, rank3, &ld->tfb[ti])) != KEEL_OK)
        return st;
    }
  }
  return KEEL_OK;
}

/* A CPU int64 tensor [n] for index ops, counted from the index base. */
static keel_status host_index(keel_ctx *ctx, int64_t n, keel_tensor **out, int64_t **data) {
  keel_status st = kl_new(ctx, KEEL_I64, KEEL_CPU, 1, &n, out);
  if (st == KEEL_OK) *data = (int64_t *)keel_tensor_data(*out);
  return st;
}

/* *x (a batch [B, ...sample]) replaced by r (consumed); returns st. */
static keel_status replace(keel_tensor **x, keel_tensor *r, keel_status st) {
  if (st != KEEL_OK) return st;
  keel_tensor_release(*x);
  *x = r;
  return KEEL_OK;
}

/* random_crop of a batch [B, c, h, w] (any sample rank 2 or 3, viewed so):
** one gather from the zero-padded batch, windows at tops[k], lefts[k]. */
static keel_status dev_crop(keel_ctx *ctx, keel_loader *ld, const keel_transform *t,
                            keel_tensor **x, int64_t cnt, int64_t c, int64_t h, int64_t w,
                            const int64_t *tops, const int64_t *lefts) {
  int64_t p = t->padding, hp = h + 2 * p, wp = w + 2 * p, sh = t->size_h, sw = t->size_w;
  int64_t shape[KEEL_MAX_DIMS], flat[2], k, ch, i, j, *id, base = ctx->index_base;
  keel_tensor *pad = NULL, *v1 = NULL, *v2 = NULL, *v3 = NULL, *src = NULL, *index = NULL,
              *g = NULL;
  int ndim = keel_tensor_ndim(*x);
  keel_status st;
  shape[0] = cnt; shape[1] = c; shape[2] = hp; shape[3] = wp;
  if (p > 0) {
    /* the padded batch: zeros, the batch copied into its middle */
    int64_t in[4] = {cnt, c, h, w};
    if ((st = kl_new(ctx, KEEL_F32, ld->dev, 4, shape, &pad)) != KEEL_OK ||
        (st = keel_fill_(ctx, pad, 0)) != KEEL_OK || (st = keel_narrow(ctx, pad, 2, p, h, &v1)) != KEEL_OK ||
        (st = keel_narrow(ctx, v1, 3, p, w, &v2)) != KEEL_OK ||
        (st = keel_view(ctx, *x, 4, in, &v3)) != KEEL_OK || (st = keel_copy_(ctx, v2, v3)) != KEEL_OK)
      goto done;
  } else {
    pad = keel_tensor_retain(*x);
  }
  flat[0] = cnt;
  flat[1] = c * hp * wp;
  if ((st = keel_view(ctx, pad, 2, flat, &src)) != KEEL_OK) goto done;
  flat[1] = c * sh * sw;
  if ((st = kl_new(ctx, KEEL_I64, KEEL_CPU, 2, flat, &index)) != KEEL_OK) goto done;
  id = (int64_t *)keel_tensor_data(index);
  for (k = 0; k < cnt; k++)
    for (ch = 0; ch < c; ch++)
      for (i = 0; i < sh; i++)
        for (j = 0; j < sw; j++)
          *id++ = base + (ch * hp + tops[k] + i) * wp + lefts[k] + j;
  if ((st = keel_gather(ctx, src, 1, index, &g)) != KEEL_OK) goto done;
  memcpy(shape + 1, keel_tensor_shape(*x) + 1, (size_t)(ndim - 1) * sizeof *shape);
  shape[ndim - 2] = sh;
  shape[ndim - 1] = sw;
  {
    keel_tensor *r = NULL;
    st = replace(x, r, keel_view(ctx, g, ndim, shape, &r));
  }
done:
  keel_tensor_release(g);
  keel_tensor_release(index);
  keel_tensor_release(src);
  keel_tensor_release(v3);
  keel_tensor_release(v2);
  keel_tensor_release(v1);
  keel_tensor_release(pad);
  return st;
}

/* random_hflip of the samples k with flip[k]: the batch reversed along its
** last dim, then a select per sample (none or all: no select). */
static keel_status dev_hflip(keel_ctx *ctx, keel_loader *ld, keel_tensor **x, int64_t cnt,
                             const unsigned char *flip) {
  int64_t w = keel_tensor_shape(*x)[keel_tensor_ndim(*x) - 1], shape[KEEL_MAX_DIMS], i, nflip = 0,
          *id;
  keel_tensor *rev = NULL, *f = NULL, *hc = NULL, *cond = NULL, *r = NULL;
  int ndim = keel_tensor_ndim(*x), d;
  keel_status st;
  for (i = 0; i < cnt; i++) nflip += flip[i];
  if (nflip == 0) return KEEL_OK;
  if ((st = host_index(ctx, w, &rev, &id)) != KEEL_OK) return st;
  for (i = 0; i < w; i++) id[i] = ctx->index_base + w - 1 - i;
  if ((st = keel_index_select(ctx, *x, ndim - 1, rev, &f)) != KEEL_OK) goto done;
  if (nflip == cnt) {
    st = replace(x, f, KEEL_OK);
    f = NULL;
    goto done;
  }
  shape[0] = cnt;
  for (d = 1; d < ndim; d++) shape[d] = 1;
  if ((st = kl_new(ctx, KEEL_F32, KEEL_CPU, ndim, shape, &hc)) != KEEL_OK) goto done;
  for (i = 0; i < cnt; i++) ((float *)keel_tensor_data(hc))[i] = flip[i] ? 1.0f : 0.0f;
  if ((st = keel_to_device(ctx, hc, ld->dev, 0, &cond)) != KEEL_OK) goto done;
  st = replace(x, r, keel_where(ctx, cond, f, *x, &r));
done:
  keel_tensor_release(cond);
  keel_tensor_release(hc);
  keel_tensor_release(f);
  keel_tensor_release(rev);
  return st;
}

/* The transforms on a device batch x [cnt, ...] of the samples at epoch
** positions start.. (the random draws are the CPU loader's, per sample). */
static keel_status dev_transforms(keel_ctx *ctx, keel_loader *ld, keel_tensor **x, int64_t start,
                                  int64_t cnt, int64_t epoch) {
  uint64_t *s = NULL;
  int64_t *tops = NULL, *lefts = NULL, k, c, h, w;
  unsigned char *flip = NULL;
  size_t n = (size_t)(cnt ? cnt : 1);
  keel_status st = KEEL_OK;
  int ti;
  s = (uint64_t *)kl_malloc(ctx, n * sizeof *s);
  tops = (int64_t *)kl_malloc(ctx, n * sizeof *tops);
  lefts = (int64_t *)kl_malloc(ctx, n * sizeof *lefts);
  flip = (unsigned char *)kl_malloc(ctx, n);
  if (!s || !tops || !lefts || !flip) {
    st = kl_error(ctx, KEEL_ERR_NOMEM, "DataLoader: out of memory");
    goto done;
  }
  for (k = 0; k < cnt; k++) s[k] = rng_start(ld->seed, epoch, start + k);
  for (ti = 0; ti < ld->ntf && st == KEEL_OK; ti++) {
    const keel_transform *t = &ld->tf[ti];
    keel_tensor *r = NULL;
    chw(keel_tensor_ndim(*x) - 1, keel_tensor_shape(*x) + 1, &c, &h, &w);
    switch (t->kind) {
    case KEEL_TF_TO_FLOAT:
      st = replace(x, r, keel_mul(ctx, *x, ld->tfa[ti], &r));
      break;
    case KEEL_TF_NORMALIZE:
      if ((st = replace(x, r, keel_sub(ctx, *x, ld->tfa[ti], &r))) == KEEL_OK)
        st = replace(x, r, keel_div(ctx, *x, ld->tfb[ti], &r));
      break;
    case KEEL_TF_RANDOM_CROP:
      for (k = 0; k < cnt; k++) {
        tops[k] = rng_int(&s[k], h + 2 * t->padding - t->size_h + 1);
        lefts[k] = rng_int(&s[k], w + 2 * t->padding - t->size_w + 1);
      }
      st = dev_crop(ctx, ld, t, x, cnt, c, h, w, tops, lefts);
      break;
    case KEEL_TF_RANDOM_HFLIP:
      for (k = 0; k < cnt; k++) flip[k] = rng_unit(&s[k]) < t->p;
      st = dev_hflip(ctx, ld, x, cnt, flip);
      break;
    }
  }
done:
  kl_free(ctx, flip, n);
  kl_free(ctx, lefts, n * sizeof *lefts);
  kl_free(ctx, tops, n * sizeof *tops);
  kl_free(ctx, s, n * sizeof *s);
  return st;
}

/* Batch b of the current epoch gathered on the device. */
static keel_status dev_batch(keel_ctx *ctx, keel_loader *ld, int64_t b, keel_tensor **xb,
                             keel_tensor **yb) {
  int64_t start = b * ld->bs, cnt = ld->n - start < ld->bs ? ld->n - start : ld->bs, k, *id;
  keel_tensor *hindex = NULL, *index = NULL, *x = NULL, *y = NULL;
  int grad = keel_set_grad_enabled(ctx, 0);   /* a batch is data, never part of a graph */
  keel_status st;
  if ((st = host_index(ctx, cnt, &hindex, &id)) != KEEL_OK) goto done;
  for (k = 0; k < cnt; k++) id[k] = ld->order[start + k] + ctx->index_base;
  /* uploaded once with its host copy: x's and y's selects check the values
  ** from that copy and share the device index (one transfer per batch) */
  if ((st = kl_upload_index(ctx, hindex, &index)) != KEEL_OK) goto done;
  if ((st = keel_index_select(ctx, ld->x, 0, index, &x)) != KEEL_OK) goto done;
  if (ld->y && (st = keel_index_select(ctx, ld->y, 0, index, &y)) != KEEL_OK) goto done;
  if (ld->ntf && (st = dev_transforms(ctx, ld, &x, start, cnt, ld->epoch)) != KEEL_OK) goto done;
  *xb = x;
  *yb = y;
  x = y = NULL;
done:
  keel_set_grad_enabled(ctx, grad);
  keel_tensor_release(hindex);
  keel_tensor_release(index);
  keel_tensor_release(x);
  keel_tensor_release(y);
  return st;
}

/* }==================================================================== */

/* {====================================================================
** API
** ===================================================================== */

static keel_status check_transform(keel_ctx *ctx, const keel_transform *t, int *ndim,
                                   int64_t *shape) {
  int64_t c, h, w;
  int k;
  chw(*ndim, shape, &c, &h, &w);
  switch (t->kind) {
  case KEEL_TF_TO_FLOAT:
    if (!isfinite(t->scale))
      return kl_error(ctx, KEEL_ERR_ARG, "to_float: scale must be a finite number");
    return KEEL_OK;
  case KEEL_TF_NORMALIZE:
    if (t->nch < 1 || t->nch > KEEL_LOADER_MAX_CH || (t->nch != 1 && t->nch != c))
      return kl_error(ctx, KEEL_ERR_ARG,
                      "normalize: %d mean/std values for %lld channels, expected 1 or %lld",
                      t->nch, (long long)c, (long long)c);
    for (k = 0; k < t->nch; k++)
      if (!isfinite(t->mean[k]) || !isfinite(t->std[k]) || t->std[k] == 0)
        return kl_error(ctx, KEEL_ERR_ARG,
                        "normalize: channel %d: mean and std must be finite and std non-zero", k + 1);
    return KEEL_OK;
  case KEEL_TF_RANDOM_CROP:
    if (*ndim != 2 && *ndim != 3)
      return kl_error(ctx, KEEL_ERR_SHAPE,
                      "random_crop: samples have %d dims, expected [C, H, W] or [H, W]", *ndim);
    if (t->size_h < 1 || t->size_w < 1 || t->padding < 0)
      return kl_error(ctx, KEEL_ERR_ARG,
                      "random_crop: size must be >= 1 and padding >= 0");
    if (t->size_h > h + 2 * t->padding || t->size_w > w + 2 * t->padding)
      return kl_error(ctx, KEEL_ERR_ARG,
                      "random_crop: size %lldx%lld larger than the padded %lldx%lld sample",
                      (long long)t->size_h, (long long)t->size_w, (long long)(h + 2 * t->padding),
                      (long long)(w + 2 * t->padding));
    shape[*ndim - 2] = t->size_h;
    shape[*ndim - 1] = t->size_w;
    return KEEL_OK;
  case KEEL_TF_RANDOM_HFLIP:
    if (*ndim != 2 && *ndim != 3)
      return kl_error(ctx, KEEL_ERR_SHAPE,
                      "random_hflip: samples have %d dims, expected [C, H, W] or [H, W]", *ndim);
    if (!(t->p >= 0 && t->p <= 1))
      return kl_error(ctx, KEEL_ERR_ARG, "random_hflip: p must be in [0, 1]");
    return KEEL_OK;
  }
  return kl_error(ctx, KEEL_ERR_ARG, "DataLoader: unknown transform kind %d", (int)t->kind);
}

/* Full-batch buffers for slot sl, allocated through the context. */
static keel_status slot_buffers(keel_loader *ld, keel_tensor **x, keel_tensor **y) {
  int64_t shape[KEEL_MAX_DIMS];
  keel_status st;
  shape[0] = ld->bs;
  memcpy(shape + 1, ld->oshape, (size_t)ld->ondim * sizeof *shape);
  *x = *y = NULL;
  st = kl_new(ld->ctx, keel_tensor_dtype(ld->x), KEEL_CPU, ld->ondim + 1, shape, x);
  if (st != KEEL_OK || !ld->y) return st;
  memcpy(shape + 1, keel_tensor_shape(ld->y) + 1, (size_t)(keel_tensor_ndim(ld->y) - 1) * sizeof *shape);
  st = kl_new(ld->ctx, keel_tensor_dtype(ld->y), KEEL_CPU, keel_tensor_ndim(ld->y), shape, y);
  if (st != KEEL_OK) {
    keel_tensor_release(*x);
    *x = NULL;
  }
  return st;
}

void keel_loader_free(keel_loader *ld) {
  keel_ctx *ctx;
  int i;
  if (!ld) return;
  ctx = ld->ctx;
  if (ld->threaded) {
    pthread_mutex_lock(&ld->mu);
    ld->stop = 1;
    pthread_cond_broadcast(&ld->cv);
    pthread_mutex_unlock(&ld->mu);
    pthread_join(ld->thread, NULL);
    pthread_cond_destroy(&ld->cv);
    pthread_mutex_destroy(&ld->mu);
  }
  if (ld->slots) {
    for (i = 0; i < ld->nslots; i++) {
      keel_tensor_release(ld->slots[i].x);
      keel_tensor_release(ld->slots[i].y);
    }
    kl_free(ctx, ld->slots, (size_t)ld->nslots * sizeof *ld->slots);
  }
  kl_free(ctx, ld->scratch[0], ld->scratch_n * sizeof(float));
  kl_free(ctx, ld->scratch[1], ld->scratch_n * sizeof(float));
  kl_free(ctx, ld->order, (size_t)ld->n * sizeof *ld->order);
  for (i = 0; i < ld->ntf; i++) {
    if (ld->tfa) keel_tensor_release(ld->tfa[i]);
    if (ld->tfb) keel_tensor_release(ld->tfb[i]);
  }
  kl_free(ctx, ld->tfa, (size_t)ld->ntf * sizeof *ld->tfa);
  kl_free(ctx, ld->tfb, (size_t)ld->ntf * sizeof *ld->tfb);
  kl_free(ctx, ld->tf, (size_t)ld->ntf * sizeof *ld->tf);
  keel_tensor_release(ld->x);
  keel_tensor_release(ld->y);
  kl_free(ctx, ld, sizeof *ld);
  kl_ctx_unref(ctx);   /* last: the releases above may drop the context's other refs */
}

keel_status keel_loader_new(keel_ctx *ctx, keel_tensor *x, keel_tensor *y,
                            const keel_loader_opts *o, keel_loader **out) {
  keel_loader *ld;
  keel_status st;
  int64_t shape[KEEL_MAX_DIMS], maxn;
  int ndim, i;
  *out = NULL;
  if (!x) return kl_error(ctx, KEEL_ERR_ARG, "DataLoader: dataset has no x tensor");
  if ((st = kl_check_same_ctx(ctx, "DataLoader", x)) != KEEL_OK) return st;
  if (y && (st = kl_check_same_ctx(ctx, "DataLoader", y)) != KEEL_OK) return st;
  if (y && keel_tensor_device(y) != keel_tensor_device(x))
    return kl_error(ctx, KEEL_ERR_DEVICE, "DataLoader: x is on %s and y on %s, expected one device",
                    keel_device_name(keel_tensor_device(x)), keel_device_name(keel_tensor_device(y)));
  if (keel_tensor_ndim(x) < 1)
    return kl_error(ctx, KEEL_ERR_SHAPE, "DataLoader: x is a scalar, expected [N, ...]");
  if (y && (keel_tensor_ndim(y) < 1 || keel_tensor_shape(y)[0] != keel_tensor_shape(x)[0]))
    return kl_error(ctx, KEEL_ERR_SHAPE, "DataLoader: y has %lld rows, expected %lld (as x)",
                    keel_tensor_ndim(y) < 1 ? 0LL : (long long)keel_tensor_shape(y)[0],
                    (long long)keel_tensor_shape(x)[0]);
  if (o->batch_size < 1)
    return kl_error(ctx, KEEL_ERR_ARG, "DataLoader: batch_size %lld, expected >= 1",
                    (long long)o->batch_size);
  if (o->prefetch < 0 || o->prefetch > MAX_PREFETCH)
    return kl_error(ctx, KEEL_ERR_ARG, "DataLoader: prefetch %d, expected 0..%d", o->prefetch,
                    MAX_PREFETCH);
  if (o->ntransforms < 0 || o->ntransforms > MAX_TRANSFORMS || (o->ntransforms && !o->transforms))
    return kl_error(ctx, KEEL_ERR_ARG, "DataLoader: %d transforms, expected 0..%d",
                    o->ntransforms, MAX_TRANSFORMS);
  if (o->ntransforms && keel_tensor_dtype(x) != KEEL_F32)
    return kl_error(ctx, KEEL_ERR_TYPE, "DataLoader: transforms need float32 x, got %s",
                    keel_dtype_name(keel_tensor_dtype(x)));
  ndim = keel_tensor_ndim(x) - 1;
  memcpy(shape, keel_tensor_shape(x) + 1, (size_t)ndim * sizeof *shape);
  maxn = kl_numel(ndim, shape);
  for (i = 0; i < o->ntransforms; i++) {
    if ((st = check_transform(ctx, &o->transforms[i], &ndim, shape)) != KEEL_OK) return st;
    if (kl_numel(ndim, shape) > maxn) maxn = kl_numel(ndim, shape);
  }

  ld = (keel_loader *)kl_malloc(ctx, sizeof *ld);
  if (!ld) return kl_error(ctx, KEEL_ERR_NOMEM, "DataLoader: out of memory");
  memset(ld, 0, sizeof *ld);
  kl_ctx_ref(ctx);
  ld->ctx = ctx;
  ld->n = keel_tensor_shape(x)[0];
  ld->bs = o->batch_size;
  ld->nb = o->drop_last ? ld->n / ld->bs : (ld->n + ld->bs - 1) / ld->bs;
  ld->shuffle = o->shuffle != 0;
  ld->drop_last = o->drop_last != 0;
  ld->ondim = ndim;
  memcpy(ld->oshape, shape, (size_t)ndim * sizeof *shape);
  ld->onumel = kl_numel(ndim, shape);
  ld->sndim = keel_tensor_ndim(x) - 1;
  memcpy(ld->sshape, keel_tensor_shape(x) + 1, (size_t)ld->sndim * sizeof *shape);
  ld->dev = keel_tensor_device(x);
  ld->nslots = ld->dev != KEEL_CPU ? 0 : o->prefetch > 0 ? o->prefetch : 1;
  if ((st = keel_contiguous(ctx, x, &ld->x)) != KEEL_OK) goto fail;
  if (y && (st = keel_contiguous(ctx, y, &ld->y)) != KEEL_OK) goto fail;
  ld->xdata = (const char *)keel_tensor_data(ld->x);
  ld->ydata = ld->y ? (const char *)keel_tensor_data(ld->y) : NULL;
  ld->xrow = (size_t)kl_numel(ld->sndim, ld->sshape) * keel_dtype_size(keel_tensor_dtype(x));
  ld->yrow = ld->y ? (size_t)(keel_tensor_numel(ld->y) / (ld->n ? ld->n : 1)) *
                         keel_dtype_size(keel_tensor_dtype(ld->y))
                   : 0;
  st = KEEL_ERR_NOMEM;
  ld->order = (int64_t *)kl_malloc(ctx, (size_t)(ld->n ? ld->n : 1) * sizeof *ld->order);
  if (!ld->order) goto fail;
  if (o->ntransforms) {
    ld->tf = (keel_transform *)kl_malloc(ctx, (size_t)o->ntransforms * sizeof *ld->tf);
    if (!ld->tf) goto fail;
    memcpy(ld->tf, o->transforms, (size_t)o->ntransforms * sizeof *ld->tf);
    ld->ntf = o->ntransforms;
  }
  if (ld->dev != KEEL_CPU) {   /* no host buffers, no thread: batches are device ops */
    if ((st = dev_operands(ld)) != KEEL_OK) goto fail;
    reset(ld, 1, 0, o->seed);
    *out = ld;
    return KEEL_OK;
  }
  if (o->ntransforms) {
    ld->scratch_n = (size_t)(maxn ? maxn : 1);
    ld->scratch[0] = (float *)kl_malloc(ctx, ld->scratch_n * sizeof(float));
    ld->scratch[1] = (float *)kl_malloc(ctx, ld->scratch_n * sizeof(float));
    if (!ld->scratch[0] || !ld->scratch[1]) goto fail;
  }
  ld->slots = (kl_slot *)kl_malloc(ctx, (size_t)ld->nslots * sizeof *ld->slots);
  if (!ld->slots) goto fail;
  memset(ld->slots, 0, (size_t)ld->nslots * sizeof *ld->slots);
  for (i = 0; i < ld->nslots; i++)
    if ((st = slot_buffers(ld, &ld->slots[i].x, &ld->slots[i].y)) != KEEL_OK) goto fail;
  reset(ld, 1, 0, o->seed);
  if (o->prefetch > 0) {
    pthread_mutex_init(&ld->mu, NULL);
    pthread_cond_init(&ld->cv, NULL);
    if (pthread_create(&ld->thread, NULL, worker, ld) != 0) {
      pthread_cond_destroy(&ld->cv);
      pthread_mutex_destroy(&ld->mu);
      st = kl_error(ctx, KEEL_ERR_STATE, "DataLoader: could not start the prefetch thread");
      goto fail;
    }
    ld->threaded = 1;
  }
  *out = ld;
  return KEEL_OK;
fail:
  keel_loader_free(ld);
  return st == KEEL_ERR_NOMEM ? kl_error(ctx, st, "DataLoader: out of memory") : st;
}

int64_t keel_loader_num_batches(const keel_loader *ld) { return ld->nb; }

void keel_loader_get_state(const keel_loader *ld, int64_t *epoch, int64_t *cursor,
                           uint64_t *seed) {
  *epoch = ld->epoch;
  *cursor = ld->cursor;
  *seed = ld->seed;
}

keel_status keel_loader_set_state(keel_ctx *ctx, keel_loader *ld, int64_t epoch, int64_t cursor,
                                  uint64_t seed) {
  if (epoch < 1)
    return kl_error(ctx, KEEL_ERR_ARG, "DataLoader: epoch %lld, expected >= 1", (long long)epoch);
  if (cursor < 0 || cursor > ld->nb)
    return kl_error(ctx, KEEL_ERR_ARG, "DataLoader: cursor %lld, expected 0..%lld",
                    (long long)cursor, (long long)ld->nb);
  reset(ld, epoch, cursor, seed);
  return KEEL_OK;
}

keel_status keel_loader_next(keel_ctx *ctx, keel_loader *ld, keel_tensor **xb, keel_tensor **yb,
                             int64_t *index) {
  int64_t b, cnt;
  kl_slot *sl;
  keel_tensor *nx = NULL, *ny = NULL, *ox, *oy;
  keel_status st;
  *xb = NULL;
  if (yb) *yb = NULL;
  if (ld->cursor >= ld->nb) {
    reset(ld, ld->epoch + 1, 0, ld->seed);
    return KEEL_OK;
  }
  b = ld->cursor;
  if (ld->dev != KEEL_CPU) {
    if ((st = dev_batch(ctx, ld, b, xb, &ny)) != KEEL_OK) return st;
    ld->cursor++;
    if (yb) *yb = ny;
    else keel_tensor_release(ny);
    if (index) *index = b;
    return KEEL_OK;
  }
  sl = &ld->slots[b % ld->nslots];
  if (ld->threaded) {
    pthread_mutex_lock(&ld->mu);
    while (!(sl->state == SLOT_READY && sl->batch == b)) pthread_cond_wait(&ld->cv, &ld->mu);
    /* the thread leaves this slot alone until the cursor moves past b */
    pthread_mutex_unlock(&ld->mu);
  } else {
    fill(ld, sl, b, ld->epoch);
  }
  if (sl->failed) {
    st = kl_error(ctx, KEEL_ERR_STATE, "%s", sl->err);
    reset(ld, ld->epoch, ld->cursor, ld->seed);   /* the batch is prepared again */
    return st;
  }
  /* replacements first: on failure nothing is consumed */
  if ((st = slot_buffers(ld, &nx, &ny)) != KEEL_OK) return st;
  ox = sl->x;
  oy = sl->y;
  if (ld->threaded) pthread_mutex_lock(&ld->mu);
  sl->x = nx;
  sl->y = ny;
  sl->state = SLOT_FREE;
  sl->batch = -1;
  ld->cursor++;
  if (ld->threaded) {
    pthread_cond_broadcast(&ld->cv);
    pthread_mutex_unlock(&ld->mu);
  }
  cnt = ld->n - b * ld->bs < ld->bs ? ld->n - b * ld->bs : ld->bs;
  if (cnt < ld->bs) {   /* the last, partial batch */
    keel_tensor *vx = NULL, *vy = NULL;
    st = keel_narrow(ctx, ox, 0, 0, cnt, &vx);
    if (st == KEEL_OK && oy) st = keel_narrow(ctx, oy, 0, 0, cnt, &vy);
    keel_tensor_release(ox);
    keel_tensor_release(oy);
    if (st != KEEL_OK) {
      keel_tensor_release(vx);
      return st;
    }
    ox = vx;
    oy = vy;
  }
  *xb = ox;
  if (yb) *yb = oy;
  else keel_tensor_release(oy);
  if (index) *index = b;
  return KEEL_OK;
}

/* }==================================================================== */
