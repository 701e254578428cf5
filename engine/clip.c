/*
** clip.c: gradient statistics and clipping.
**
** A clip chain is a list of transforms applied in order. Every transform
** either clamps elements (value) or multiplies them by a non-negative
** factor (per tensor, per AGC unit, or global), and those compose: after
** any prefix of the chain, element g of a unit has become
**     clamp(g * a, -v, v)
** for one scale a and bound v per unit. So the chain only ever computes
** (a, v) per unit from statistics, and the optimizer's update loop applies
** them as it reads each gradient element.
**
** The statistics pass (kl_clip_stats) reads every gradient once. A norm
** transform reuses those statistics, scaled along with the data (a scale
** c multiplies the sum of squares by c^2, the max by c, ...), so the
** common chains cost nothing more. A second pass happens only when a
** norm transform follows a value clamp that actually clamped something.
**
** Thresholds: the value bound, max norms, the AGC factor, the percentile
** and the z threshold may change every step (keel_optim_set_clip_threshold).
**
** Evaluating a chain changes no adaptive state (percentile history, ZClip
** EMA): kl_clip_eval computes what the state would become and
** kl_clip_commit makes it so, once the optimizer applies the step. A step
** that is prepared and then cancelled leaves the chain exactly as it was.
*/
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "keel_impl.h"
#include "keel_cuda.h"

/* torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6), at most 1. */
#define TORCH_EPS 1e-6

/* {======================================================================
** Chains and their adaptive state
** ======================================================================= */

typedef struct clip_item {
  keel_clip_spec spec;
  /* percentile: the last norms, oldest first, in a ring of cap entries
  ** (grown on demand when the window is unbounded), and the same values
  ** sorted. zscore: the warm-up norms (ring unused beyond them). */
  double *ring, *sorted;
  int64_t n, head, cap;
  double mean, var;
  int initialized;
  /* what the last kl_clip_eval would make of the state: the norm it saw
  ** and the zscore EMA after it; kl_clip_commit makes it so */
  int pending;
  double p_norm, p_mean, p_var;
  int p_init;
} clip_item;

struct kl_clip_chain {
  keel_ctx *ctx;
  int n;
  clip_item *items;
};

static const char *clip_names[KEEL_CLIP_KIND_COUNT] = {
  "value", "norm", "global_norm", "agc", "percentile", "zscore"
};

void keel_clip_spec_default(keel_clip_kind kind, keel_clip_spec *s) {
  memset(s, 0, sizeof *s);
  s->kind = kind;
  s->p = 2;
  switch (kind) {
    case KEEL_CLIP_VALUE: s->threshold = 1; break;
    case KEEL_CLIP_NORM: case KEEL_CLIP_GLOBAL_NORM: s->threshold = 1; break;
    case KEEL_CLIP_AGC: s->threshold = 0.01; s->eps = 1e-3; break;
    case KEEL_CLIP_PERCENTILE: s->threshold = 10; break;
    case KEEL_CLIP_ZSCORE:
      s->threshold = 2.5; s->eps = 1e-6; s->alpha = 0.97; s->window = 25; break;
    default: break;
  }
}

static keel_status check_threshold(keel_ctx *ctx, int i, keel_clip_kind kind, double t) {
  const char *name = clip_names[kind];
  if (t != t) return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (%s): threshold is NaN", i + 1, name);
  switch (kind) {
    case KEEL_CLIP_PERCENTILE:
      if (t < 0 || t > 100)
        return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (percentile): p must be in [0, 100], got %g",
                        i + 1, t);
      break;
    case KEEL_CLIP_ZSCORE:
      if (!(t > 0))
        return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (zscore): z must be > 0, got %g", i + 1, t);
      break;
    default:
      if (t < 0)
        return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (%s): threshold must be >= 0, got %g", i + 1,
                        name, t);
  }
  return KEEL_OK;
}

static keel_status check_spec(keel_ctx *ctx, int i, const keel_clip_spec *s) {
  keel_status st;
  if ((unsigned)s->kind >= KEEL_CLIP_KIND_COUNT)
    return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d: unknown kind %d", i + 1, (int)s->kind);
  if ((st = check_threshold(ctx, i, s->kind, s->threshold))) return st;
  if ((s->kind == KEEL_CLIP_NORM || s->kind == KEEL_CLIP_GLOBAL_NORM) && !(s->p > 0))
    return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (%s): norm order p must be > 0 or inf, got %g",
                    i + 1, clip_names[s->kind], s->p);
  if ((s->kind == KEEL_CLIP_AGC || s->kind == KEEL_CLIP_ZSCORE) && !(s->eps >= 0))
    return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (%s): eps must be >= 0, got %g", i + 1,
                    clip_names[s->kind], s->eps);
  if (s->kind == KEEL_CLIP_ZSCORE) {
    if (!(s->alpha >= 0 && s->alpha < 1))
      return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (zscore): alpha must be in [0, 1), got %g", i + 1,
                      s->alpha);
    if (!(s->max_norm >= 0))
      return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (zscore): max_norm must be >= 0, got %g", i + 1,
                      s->max_norm);
    if (s->mode != 0 && s->mode != 1)
      return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (zscore): mode must be 0 (adaptive) or 1 (mean)",
                      i + 1);
  }
  if ((s->kind == KEEL_CLIP_ZSCORE || s->kind == KEEL_CLIP_PERCENTILE) && s->window < 0)
    return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d (%s): %s must be >= 0", i + 1, clip_names[s->kind],
                    s->kind == KEEL_CLIP_ZSCORE ? "warmup" : "history");
  return KEEL_OK;
}

static void item_free(keel_ctx *ctx, clip_item *it) {
  kl_free(ctx, it->ring, sizeof(double) * (size_t)it->cap);
  kl_free(ctx, it->sorted, sizeof(double) * (size_t)it->cap);
  it->ring = it->sorted = NULL;
  it->n = it->head = it->cap = 0;
}

/* Room for cap norms, keeping the contents in order (head back at 0). */
static keel_status item_reserve(keel_ctx *ctx, clip_item *it, int64_t cap) {
  double *ring, *sorted;
  if (cap <= it->cap) return KEEL_OK;
  ring = (double *)kl_malloc(ctx, sizeof(double) * (size_t)cap);
  sorted = (double *)kl_malloc(ctx, sizeof(double) * (size_t)cap);
  if (!ring || !sorted) {
    kl_free(ctx, ring, sizeof(double) * (size_t)cap);
    kl_free(ctx, sorted, sizeof(double) * (size_t)cap);
    return kl_error(ctx, KEEL_ERR_NOMEM, "clip: out of memory for the norm history");
  }
  for (int64_t j = 0; j < it->n; j++) ring[j] = it->ring[(it->head + j) % it->cap];
  if (it->n) memcpy(sorted, it->sorted, sizeof(double) * (size_t)it->n);
  kl_free(ctx, it->ring, sizeof(double) * (size_t)it->cap);
  kl_free(ctx, it->sorted, sizeof(double) * (size_t)it->cap);
  it->ring = ring;
  it->sorted = sorted;
  it->head = 0;
  it->cap = cap;
  return KEEL_OK;
}

keel_status kl_clip_chain_new(keel_ctx *ctx, int n, const keel_clip_spec *specs, kl_clip_chain **out) {
  kl_clip_chain *c;
  keel_status st;
  *out = NULL;
  if (n < 0) return kl_error(ctx, KEEL_ERR_ARG, "clip: negative number of transforms");
  for (int i = 0; i < n; i++)
    if ((st = check_spec(ctx, i, &specs[i]))) return st;
  c = (kl_clip_chain *)kl_malloc(ctx, sizeof *c);
  if (!c) return kl_error(ctx, KEEL_ERR_NOMEM, "clip: out of memory");
  c->ctx = ctx;
  c->n = n;
  c->items = n ? (clip_item *)kl_malloc(ctx, sizeof(clip_item) * (size_t)n) : NULL;
  if (n && !c->items) { kl_free(ctx, c, sizeof *c); return kl_error(ctx, KEEL_ERR_NOMEM, "clip: out of memory"); }
  for (int i = 0; i < n; i++) {
    clip_item *it = &c->items[i];
    memset(it, 0, sizeof *it);
    it->spec = specs[i];
    /* a bounded window (or the z-score warm-up) is allocated once */
    if ((specs[i].kind == KEEL_CLIP_PERCENTILE || specs[i].kind == KEEL_CLIP_ZSCORE) && specs[i].window > 0 &&
        (st = item_reserve(ctx, it, specs[i].window))) {
      kl_clip_chain_free(c);
      return st;
    }
  }
  *out = c;
  return KEEL_OK;
}

void kl_clip_chain_free(kl_clip_chain *c) {
  if (!c) return;
  for (int i = 0; i < c->n; i++) item_free(c->ctx, &c->items[i]);
  kl_free(c->ctx, c->items, sizeof(clip_item) * (size_t)c->n);
  kl_free(c->ctx, c, sizeof *c);
}

keel_status kl_clip_chain_threshold(keel_ctx *ctx, kl_clip_chain *c, int i, double t) {
  keel_status st;
  if (!c || i < 0 || i >= c->n)
    return kl_error(ctx, KEEL_ERR_INDEX, "clip: no transform %d (the chain has %d)", i + 1, c ? c->n : 0);
  if ((st = check_threshold(ctx, i, c->items[i].spec.kind, t))) return st;
  c->items[i].spec.threshold = t;
  return KEEL_OK;
}

/* Moves the ring's contents to the front of a fresh array (oldest first). */
static keel_status item_linearize(keel_ctx *ctx, clip_item *it) {
  double *lin;
  if (it->head == 0) return KEEL_OK;
  lin = (double *)kl_malloc(ctx, sizeof(double) * (size_t)it->cap);
  if (!lin) return kl_error(ctx, KEEL_ERR_NOMEM, "clip: out of memory");
  for (int64_t j = 0; j < it->n; j++) lin[j] = it->ring[(it->head + j) % it->cap];
  kl_free(ctx, it->ring, sizeof(double) * (size_t)it->cap);
  it->ring = lin;
  it->head = 0;
  return KEEL_OK;
}

keel_status kl_clip_chain_get_state(keel_ctx *ctx, kl_clip_chain *c, int i, keel_clip_state *s) {
  clip_item *it;
  keel_status st;
  if (!c || i < 0 || i >= c->n)
    return kl_error(ctx, KEEL_ERR_INDEX, "clip: no transform %d (the chain has %d)", i + 1, c ? c->n : 0);
  it = &c->items[i];
  if ((st = item_linearize(ctx, it))) return st;
  memset(s, 0, sizeof *s);
  s->n_history = it->n;
  s->history = it->ring;
  s->mean = it->mean;
  s->var = it->var;
  s->initialized = it->initialized;
  return KEEL_OK;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

keel_status kl_clip_chain_set_state(keel_ctx *ctx, kl_clip_chain *c, int i, const keel_clip_state *s) {
  clip_item *it;
  int64_t n, keep;
  keel_status st;
  if (!c || i < 0 || i >= c->n)
    return kl_error(ctx, KEEL_ERR_INDEX, "clip: no transform %d (the chain has %d)", i + 1, c ? c->n : 0);
  it = &c->items[i];
  n = s->n_history;
  if (n < 0 || (n > 0 && !s->history)) return kl_error(ctx, KEEL_ERR_ARG, "clip: bad history");
  for (int64_t j = 0; j < n; j++)
    if (!isfinite(s->history[j]))
      return kl_error(ctx, KEEL_ERR_ARG, "clip: transform %d: history entry %lld is not finite", i + 1,
                      (long long)j + 1);
  /* a bounded window keeps the newest entries */
  keep = it->spec.window > 0 && n > it->spec.window ? it->spec.window : n;
  if ((st = item_reserve(ctx, it, keep))) return st;
  it->head = 0;
  it->n = keep;
  for (int64_t j = 0; j < keep; j++) it->ring[j] = s->history[n - keep + j];
  if (keep) {
    memcpy(it->sorted, it->ring, sizeof(double) * (size_t)keep);
    qsort(it->sorted, (size_t)keep, sizeof(double), cmp_double);
  }
  it->mean = s->mean;
  it->var = s->var;
  it->initialized = s->initialized != 0;
  it->pending = 0;
  return KEEL_OK;
}

/* Appends x, dropping the oldest entry of a full bounded window; room was
** reserved beforehand, so this cannot fail. */
static void history_push(clip_item *it, double x) {
  int64_t lo = 0, hi;
  if (it->spec.window > 0 && it->n == it->spec.window) {
    double old = it->ring[it->head];
    /* remove one occurrence of old from sorted */
    lo = 0; hi = it->n - 1;
    while (lo < hi) {
      int64_t mid = lo + (hi - lo) / 2;
      if (it->sorted[mid] < old) lo = mid + 1; else hi = mid;
    }
    memmove(it->sorted + lo, it->sorted + lo + 1, sizeof(double) * (size_t)(it->n - lo - 1));
    it->head = (it->head + 1) % it->cap;
    it->n--;
  }
  it->ring[(it->head + it->n) % it->cap] = x;
  /* insert x into sorted, after equal values */
  lo = 0; hi = it->n;
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (it->sorted[mid] <= x) lo = mid + 1; else hi = mid;
  }
  memmove(it->sorted + lo + 1, it->sorted + lo, sizeof(double) * (size_t)(it->n - lo));
  it->sorted[lo] = x;
  it->n++;
}

/* The sorted history as history_push(it, x) would leave it, without
** changing it: the removed entry (the oldest, when the window is full)
** sits at rem in it->sorted (-1: none), x goes in at ins of the array
** without it, and element k is read through these indices. */
typedef struct virt_sorted {
  const double *s;
  int64_t n, rem, ins;
  double x;
} virt_sorted;

static void virt_init(virt_sorted *vs, const clip_item *it, double x) {
  int64_t lo = 0, hi = it->n, ub;
  vs->s = it->sorted;
  vs->x = x;
  vs->rem = -1;
  if (it->spec.window > 0 && it->n == it->spec.window) {
    double old = it->ring[it->head];
    int64_t l = 0, h = it->n - 1;
    while (l < h) {   /* the occurrence history_push removes */
      int64_t mid = l + (h - l) / 2;
      if (it->sorted[mid] < old) l = mid + 1; else h = mid;
    }
    vs->rem = l;
  }
  while (lo < hi) {   /* entries <= x */
    int64_t mid = lo + (hi - lo) / 2;
    if (it->sorted[mid] <= x) lo = mid + 1; else hi = mid;
  }
  ub = lo;
  vs->ins = vs->rem >= 0 && vs->rem < ub ? ub - 1 : ub;
  vs->n = it->n - (vs->rem >= 0) + 1;
}

static double virt_at(const virt_sorted *vs, int64_t k) {
  int64_t j;
  if (k == vs->ins) return vs->x;
  j = k < vs->ins ? k : k - 1;             /* index in the array without x */
  return vs->s[vs->rem >= 0 && j >= vs->rem ? j + 1 : j];
}

/* numpy.percentile(history, q) with the default "linear" method, step by
** step as numpy 1.24 computes it (index (n - 1) q, then _lerp). */
static double percentile(const virt_sorted *vs, double q) {
  int64_t n = vs->n;
  double vi = (double)(n - 1) * (q / 100), prev, gamma, a, b, d, r;
  int64_t ip, in;
  if (vi >= (double)(n - 1)) return virt_at(vs, n - 1);
  if (vi < 0) return virt_at(vs, 0);
  prev = floor(vi);
  ip = (int64_t)prev;
  in = ip + 1;
  gamma = vi - prev;
  a = virt_at(vs, ip);
  b = virt_at(vs, in);
  d = b - a;
  r = a + d * gamma;
  if (gamma >= 0.5) r = b - d * (1 - gamma);
  return r;
}

/* }====================================================================== */

/* {======================================================================
** Work space of one step
** ======================================================================= */

void kl_clip_work_free(keel_ctx *ctx, kl_clip_work *w) {
  kl_free(ctx, w->u0, sizeof(int64_t) * (size_t)(w->cap_m + 1));
  kl_free(ctx, w->ts, sizeof(keel_grad_stats) * (size_t)w->cap_m);
  kl_free(ctx, w->a, sizeof(double) * (size_t)w->cap_u);
  kl_free(ctx, w->v, sizeof(double) * (size_t)w->cap_u);
  kl_free(ctx, w->spow, sizeof(double) * (size_t)w->cap_u);
  kl_free(ctx, w->wsq, sizeof(double) * (size_t)w->cap_u);
  kl_free(ctx, w->us, sizeof(keel_grad_stats) * (size_t)w->cap_u);
  memset(w, 0, sizeof *w);
}

static keel_status work_reserve(keel_ctx *ctx, kl_clip_work *w, int m, int64_t nu) {
  if (m > w->cap_m) {
    int cap = m > 2 * w->cap_m ? m : 2 * w->cap_m;
    int64_t *u0 = (int64_t *)kl_malloc(ctx, sizeof(int64_t) * (size_t)(cap + 1));
    keel_grad_stats *ts = (keel_grad_stats *)kl_malloc(ctx, sizeof(keel_grad_stats) * (size_t)cap);
    if (!u0 || !ts) {
      kl_free(ctx, u0, sizeof(int64_t) * (size_t)(cap + 1));
      kl_free(ctx, ts, sizeof(keel_grad_stats) * (size_t)cap);
      return kl_error(ctx, KEEL_ERR_NOMEM, "clip: out of memory");
    }
    kl_free(ctx, w->u0, sizeof(int64_t) * (size_t)(w->cap_m + 1));
    kl_free(ctx, w->ts, sizeof(keel_grad_stats) * (size_t)w->cap_m);
    w->u0 = u0;
    w->ts = ts;
    w->cap_m = cap;
  }
  if (nu > w->cap_u) {
    int64_t cap = nu > 2 * w->cap_u ? nu : 2 * w->cap_u;
    double *a = (double *)kl_malloc(ctx, sizeof(double) * (size_t)cap);
    double *v = (double *)kl_malloc(ctx, sizeof(double) * (size_t)cap);
    double *sp = (double *)kl_malloc(ctx, sizeof(double) * (size_t)cap);
    double *wq = (double *)kl_malloc(ctx, sizeof(double) * (size_t)cap);
    keel_grad_stats *us = (keel_grad_stats *)kl_malloc(ctx, sizeof(keel_grad_stats) * (size_t)cap);
    if (!a || !v || !sp || !wq || !us) {
      kl_free(ctx, a, sizeof(double) * (size_t)cap);
      kl_free(ctx, v, sizeof(double) * (size_t)cap);
      kl_free(ctx, sp, sizeof(double) * (size_t)cap);
      kl_free(ctx, wq, sizeof(double) * (size_t)cap);
      kl_free(ctx, us, sizeof(keel_grad_stats) * (size_t)cap);
      return kl_error(ctx, KEEL_ERR_NOMEM, "clip: out of memory");
    }
    kl_free(ctx, w->a, sizeof(double) * (size_t)w->cap_u);
    kl_free(ctx, w->v, sizeof(double) * (size_t)w->cap_u);
    kl_free(ctx, w->spow, sizeof(double) * (size_t)w->cap_u);
    kl_free(ctx, w->wsq, sizeof(double) * (size_t)w->cap_u);
    kl_free(ctx, w->us, sizeof(keel_grad_stats) * (size_t)w->cap_u);
    w->a = a; w->v = v; w->spow = sp; w->wsq = wq; w->us = us;
    w->cap_u = cap;
  }
  return KEEL_OK;
}

/* AGC's units (Optax unitwise_norm, in PyTorch's layout where the output
** dimension comes first): a tensor with at most one dimension of size
** above 1 is one unit; otherwise each index of dimension 0 is a unit. */
int64_t kl_clip_agc_units(const keel_tensor *t) {
  int big = 0;
  for (int i = 0; i < t->ndim; i++) big += t->shape[i] != 1;
  if (big <= 1 || t->numel == 0) return 1;
  return t->shape[0];
}

static int chain_has(const kl_clip_chain *c, keel_clip_kind kind) {
  for (int i = 0; c && i < c->n; i++)
    if (c->items[i].spec.kind == kind) return 1;
  return 0;
}

int64_t kl_clip_units(const kl_clip_chain *c, const keel_tensor *g) {
  return chain_has(c, KEEL_CLIP_AGC) ? kl_clip_agc_units(g) : 1;
}

static int is_plain_p(double p) { return p == 1 || p == 2 || isinf(p); }

/* The norm order the first norm transform needs beyond 1, 2 and inf. */
static double first_general_p(const kl_clip_chain *c) {
  for (int i = 0; c && i < c->n; i++) {
    const keel_clip_spec *s = &c->items[i].spec;
    if ((s->kind == KEEL_CLIP_NORM || s->kind == KEEL_CLIP_GLOBAL_NORM) && !is_plain_p(s->p)) return s->p;
  }
  return 0;
}

static void stats_add(keel_grad_stats *acc, const keel_grad_stats *s) {
  acc->numel += s->numel;
  acc->nan += s->nan;
  acc->inf += s->inf;
  acc->zeros += s->zeros;
  acc->sum += s->sum;
  acc->sumsq += s->sumsq;
  acc->sum_abs += s->sum_abs;
  acc->max_abs = s->max_abs > acc->max_abs ? s->max_abs : acc->max_abs;
  acc->w_sumsq += s->w_sumsq;
}

/* Whether x is a power of two: then g * x is exact for every g whose
** product stays normal, and the statistics of g * x are those of g scaled
** (sums of squares by x^2, the others by x), to the bit. */
static int is_pow2(double x) {
  int e;
  return x > 0 && isfinite(x) && frexp(x, &e) == 0.5;
}

/* Statistics of units [u0, u0 + n) of gradient g seen through the loss
** scale's unscale, g * gs, as torch's unscale_ computes it (in the
** gradient's dtype). A power of two takes the fast pass over the raw
** values and scales its results, unless some |g| * gs leaves the dtype's
** range (those elements become Inf and must be counted): then, as for any
** other scale or a general norm order, the elementwise pass with a = gs
** (a and v of the units hold gs and +inf). A device gradient always takes
** the elementwise pass: its results are deferred (kl_clip_stats), so none
** may be read on the way. */
static keel_status unscaled_stats(keel_ctx *ctx, kl_clip_work *w, keel_tensor *g, keel_tensor *p, int64_t u0,
                                  int64_t n, double gs) {
  const kl_backend *be = kl_backend_for(ctx, g->storage->device);
  double big = g->dtype == KEEL_F32 ? FLT_MAX : DBL_MAX;
  double *spow = w->pw > 0 ? w->spow + u0 : NULL;
  int exact = gs == 1 || (is_pow2(gs) && !(w->pw > 0) &&
                          (g->dtype != KEEL_F32 || (gs >= FLT_MIN && gs <= FLT_MAX)));   /* (float)gs == gs */
  keel_status st;
  if (g->storage->device != KEEL_CPU)
    return be->grad_stats(ctx, g, n, gs == 1 ? NULL : w->a + u0, gs == 1 ? NULL : w->v + u0, w->pw, w->us + u0, spow,
                          p);
  if (exact) {
    if ((st = be->grad_stats(ctx, g, n, NULL, NULL, w->pw, w->us + u0, spow, p))) return st;
    if (gs == 1) return KEEL_OK;
    for (int64_t u = u0; u < u0 + n; u++)
      if (!(w->us[u].max_abs * gs <= big)) exact = 0;
    if (exact) {
      for (int64_t u = u0; u < u0 + n; u++) {
        keel_grad_stats *s = &w->us[u];
        s->sum *= gs;
        s->sumsq *= gs * gs;
        s->sum_abs *= gs;
        s->max_abs *= gs;
      }
      return KEEL_OK;
    }
  }
  return be->grad_stats(ctx, g, n, w->a + u0, w->v + u0, w->pw, w->us + u0, spow, p);
}

/* Statistics of the m gradients g (contiguous) for a step under chain c
** (NULL: none) and loss-scale inverse gs (1: none): units, the statistics
** of g * gs, its global L2 norm and non-finite count; every unit's scale a
** starts at gs, so that the clip chain and the update see the unscaled
** gradient too. The parameters p (NULL: none; else contiguous, of the
** gradients' shapes and dtypes) are read in the same pass, for their sums
** of squares (AGC's weight norms, the optimizer's statistics), unless
** wk[k] has them already (the optimizer's update pass summed them). */
keel_status kl_clip_stats(keel_ctx *ctx, const kl_clip_chain *c, kl_clip_work *w, int m,
                          keel_tensor *const *g, keel_tensor *const *p, const double *const *wk, double gs) {
  int dev = 0;
  keel_status st, st2;
  for (int k = 0; k < m; k++)
    if (g[k]->storage->device != KEEL_CPU) dev = 1;
  /* Device gradients: every statistics pass is queued first and the host
  ** waits once for all of them (kl_cuda_defer); unscaled_stats reads no
  ** device result on the way. */
  if (dev && (st = kl_cuda_defer(ctx, "clip", KL_DEFER_ON))) return st;
  st = kl_clip_stats_begin(ctx, c, w, m, g, p, wk, gs);
  if (dev && (st2 = kl_cuda_defer(ctx, "clip", KL_DEFER_WAIT)) && !st) st = st2;
  if (st) return st;
  kl_clip_stats_end(w, wk);
  return KEEL_OK;
}

keel_status kl_clip_stats_begin(keel_ctx *ctx, const kl_clip_chain *c, kl_clip_work *w, int m,
                                keel_tensor *const *g, keel_tensor *const *p, const double *const *wk, double gs) {
  int agc = chain_has(c, KEEL_CLIP_AGC);
  int64_t nu = 0;
  keel_status st = KEEL_OK;
  for (int k = 0; k < m; k++) nu += agc ? kl_clip_agc_units(g[k]) : 1;
  if ((st = work_reserve(ctx, w, m, nu))) return st;
  w->m = m;
  w->nu = nu;
  w->pw = first_general_p(c);
  w->nonfinite = 0;
  w->coef = 1;
  w->clipped = 0;
  nu = 0;
  for (int k = 0; k < m && !st; k++) {
    int64_t n = agc ? kl_clip_agc_units(g[k]) : 1;
    w->u0[k] = nu;
    for (int64_t u = nu; u < nu + n; u++) { w->a[u] = gs; w->v[u] = INFINITY; w->spow[u] = 0; w->wsq[u] = 0; }
    st = unscaled_stats(ctx, w, g[k], p && !(wk && wk[k]) ? p[k] : NULL, nu, n, gs);
    nu += n;
  }
  w->u0[m] = nu;
  return st;
}

void kl_clip_stats_end(kl_clip_work *w, const double *const *wk) {
  double sumsq = 0;
  w->nonfinite = 0;
  for (int k = 0; k < w->m; k++) {
    keel_grad_stats *ts = &w->ts[k];
    memset(ts, 0, sizeof *ts);
    for (int64_t u = w->u0[k]; u < w->u0[k + 1]; u++) {
      if (wk && wk[k]) w->us[u].w_sumsq = wk[k][u - w->u0[k]];
      stats_add(ts, &w->us[u]);
      w->wsq[u] = w->us[u].w_sumsq;
    }
    sumsq += ts->sumsq;
    w->nonfinite += ts->nan + ts->inf;
  }
  w->grad_norm = sqrt(sumsq);
}

int kl_clip_device_chain(const kl_clip_chain *c, kc_decide *q) {
  int seen_value = 0;
  memset(q, 0, sizeof *q);
  if (c && c->n > KC_DECIDE_MAX) return 0;
  for (int i = 0; c && i < c->n; i++) {
    const keel_clip_spec *s = &c->items[i].spec;
    switch (s->kind) {
      case KEEL_CLIP_VALUE:
        seen_value = 1;
        q->kind[i] = KC_DECIDE_VALUE;
        break;
      case KEEL_CLIP_NORM: case KEEL_CLIP_GLOBAL_NORM:
        /* L2 only (the statistics' sums of squares), and not after a clamp
        ** (one that clamped would need a second statistics pass) */
        if (s->p != 2 || seen_value) return 0;
        q->kind[i] = s->kind == KEEL_CLIP_NORM ? KC_DECIDE_NORM : KC_DECIDE_GLOBAL_NORM;
        break;
      default:
        return 0;   /* AGC's units, percentile's and ZClip's history */
    }
    q->threshold[i] = s->threshold;
  }
  q->nitems = c ? c->n : 0;
  return 1;
}

/* }====================================================================== */

/* {======================================================================
** Evaluating a chain
** ======================================================================= */

/* Norm of order p of units [u0, u1) from their statistics. */
static double units_norm(const kl_clip_work *w, int64_t u0, int64_t u1, double p) {
  double s = 0;
  if (isinf(p)) {
    for (int64_t u = u0; u < u1; u++) s = w->us[u].max_abs > s ? w->us[u].max_abs : s;
    return s;
  }
  for (int64_t u = u0; u < u1; u++) s += p == 2 ? w->us[u].sumsq : p == 1 ? w->us[u].sum_abs : w->spow[u];
  return p == 2 ? sqrt(s) : p == 1 ? s : pow(s, 1 / p);
}

/* Multiplies units [u0, u1) by c (>= 0), data and statistics alike. */
static void units_scale(kl_clip_work *w, int64_t u0, int64_t u1, double c) {
  double cp = w->pw > 0 ? pow(c, w->pw) : 0;
  if (c == 1) return;
  for (int64_t u = u0; u < u1; u++) {
    if (w->us[u].max_abs > 0) w->clipped = 1;
    w->a[u] *= c;
    w->v[u] *= c;
    w->us[u].sumsq *= c * c;
    w->us[u].sum_abs *= c;
    w->us[u].max_abs *= c;
    w->spow[u] *= cp;
  }
}

/* The factor torch.nn.utils.clip_grad_norm_ applies. */
static double torch_coef(double max_norm, double total) {
  double c = max_norm / (total + TORCH_EPS);
  return c < 1 ? c : 1;
}

/* ZClip (Kumar et al. 2025), as its reference implementation
** (github.com/bluorion-com/ZClip, zclip.py, mode "zscore"): the first
** `warmup` norms only fill a buffer (and are capped by max_norm when
** given); their mean and population variance start the EMA. Then
**   z = (norm - mean) / (std + eps);  when z > z_thr the norm is clipped
**   to mean + z_thr * std / (z / z_thr) (mode 0) or to mean (mode 1),
**   capped by max_norm; the EMA is updated with the clipped value:
**   mean = alpha mean + (1 - alpha) x;  var = alpha var + (1 - alpha)(x - mean)^2
** (var uses the new mean, as the reference does). */
/* Here the state after the step goes to it->p_* (kl_clip_commit). The
** warm-up statistics run over the buffer with norm appended, in the
** order the buffer holds them. */
static double zscore_coef(clip_item *it, double norm) {
  const keel_clip_spec *s = &it->spec;
  double clip_val = 0, eff, x, std, z, mean;
  int spike = 0;
  it->p_init = it->initialized;
  it->p_mean = it->mean;
  it->p_var = it->var;
  if (!it->initialized) {
    int64_t warm = s->window > 0 ? s->window : 1, n = it->n + 1;
    double sum = 0, var = 0;
    if (n >= warm) {
      for (int64_t j = 0; j < it->n; j++) sum += it->ring[j];
      sum += norm;
      mean = sum / (double)n;
      for (int64_t j = 0; j < it->n; j++) var += (it->ring[j] - mean) * (it->ring[j] - mean);
      var += (norm - mean) * (norm - mean);
      it->p_mean = mean;
      it->p_var = var / (double)n;
      it->p_init = 1;
    }
    return s->max_norm > 0 ? torch_coef(s->max_norm, norm) : 1;
  }
  std = pow(it->var, 0.5);
  z = (norm - it->mean) / (std + s->eps);
  if (z > s->threshold) {
    spike = 1;
    clip_val = s->mode == 1 ? it->mean : it->mean + (s->threshold * std) / (z / s->threshold);
  }
  eff = spike ? clip_val : norm;
  if (s->max_norm > 0 && s->max_norm < eff) eff = s->max_norm;
  x = spike ? clip_val : norm;
  mean = s->alpha * it->mean + (1 - s->alpha) * x;
  it->p_mean = mean;
  it->p_var = s->alpha * it->var + (1 - s->alpha) * (x - mean) * (x - mean);
  return norm > eff ? eff / (norm + TORCH_EPS) : 1;
}

/* Recomputes the unit statistics of the current view (after a clamp that
** changed data), with spow for order pw when it is not 1, 2 or inf. */
static keel_status restat(keel_ctx *ctx, kl_clip_work *w, keel_tensor *const *g, double pw) {
  keel_status st;
  if (!g) return kl_error(ctx, KEEL_ERR_STATE, "clip: a second statistics pass without the gradients");
  w->pw = is_plain_p(pw) ? 0 : pw;
  for (int k = 0; k < w->m; k++) {
    const kl_backend *be = kl_backend_for(ctx, g[k]->storage->device);
    int64_t u0 = w->u0[k], n = w->u0[k + 1] - u0;
    if ((st = be->grad_stats(ctx, g[k], n, w->a + u0, w->v + u0, w->pw, w->us + u0,
                             w->pw > 0 ? w->spow + u0 : NULL, NULL)))
      return st;
  }
  return KEEL_OK;
}

/* Runs chain c over the statistics of kl_clip_stats, leaving the scale and
** bound of every unit in w->a, w->v, and w->coef (product of the global
** factors) and w->clipped. The adaptive state does not change: what it
** would become is kept aside for kl_clip_commit. Room for the history is
** made first (capacity only: nothing a reader sees). */
keel_status kl_clip_eval(keel_ctx *ctx, kl_clip_chain *c, kl_clip_work *w, keel_tensor *const *g) {
  int valid = 1;
  keel_status st;
  if (!c) return KEEL_OK;
  for (int i = 0; i < c->n; i++) c->items[i].pending = 0;
  /* room for one more norm in every unbounded history, before any change */
  for (int i = 0; i < c->n; i++) {
    clip_item *it = &c->items[i];
    if (it->spec.kind == KEEL_CLIP_PERCENTILE && it->spec.window == 0 && it->n == it->cap &&
        (st = item_reserve(ctx, it, it->cap ? 2 * it->cap : 64)))
      return st;
    if (it->spec.kind == KEEL_CLIP_ZSCORE && it->spec.window == 0 && !it->cap &&
        (st = item_reserve(ctx, it, 1)))
      return st;
  }
  for (int i = 0; i < c->n; i++) {
    clip_item *it = &c->items[i];
    const keel_clip_spec *s = &it->spec;
    double t = s->threshold, p = s->kind == KEEL_CLIP_NORM || s->kind == KEEL_CLIP_GLOBAL_NORM ? s->p : 2;
    if (s->kind == KEEL_CLIP_VALUE) {
      /* after a clamp the max is still exact, the sums are not */
      for (int64_t u = 0; u < w->nu; u++) {
        if (w->us[u].max_abs > t) { valid = 0; w->clipped = 1; w->us[u].max_abs = t; }
        if (t < w->v[u]) w->v[u] = t;
      }
      continue;
    }
    /* a norm transform: the statistics must describe the current view */
    if ((!valid && !isinf(p)) || (!is_plain_p(p) && w->pw != p)) {
      if ((st = restat(ctx, w, g, p))) return st;
      valid = 1;
    }
    switch (s->kind) {
      case KEEL_CLIP_NORM:
        for (int k = 0; k < w->m; k++)
          units_scale(w, w->u0[k], w->u0[k + 1], torch_coef(t, units_norm(w, w->u0[k], w->u0[k + 1], p)));
        break;
      case KEEL_CLIP_AGC:
        /* Optax adaptive_grad_clip: max_norm = clipping * max(|w|_unit, eps);
        ** a unit with |g| < max_norm is kept, else scaled by
        ** max_norm / max(|g|, 1e-6). */
        for (int64_t u = 0; u < w->nu; u++) {
          double gn = sqrt(w->us[u].sumsq), pn = sqrt(w->wsq[u]);
          double mx = t * (pn > s->eps ? pn : s->eps);
          if (!(gn < mx)) units_scale(w, u, u + 1, mx / (gn > 1e-6 ? gn : 1e-6));
        }
        break;
      default: {
        double norm = units_norm(w, 0, w->nu, p), coef;
        if (s->kind == KEEL_CLIP_GLOBAL_NORM) {
          coef = torch_coef(t, norm);
        } else if (s->kind == KEEL_CLIP_PERCENTILE) {
          /* AutoClip (Seetharaman et al. 2020, github.com/pseeth/autoclip):
          ** the current norm joins the history first, then the clip
          ** value is np.percentile(history, p) and clip_grad_norm_ uses it. */
          virt_sorted vs;
          virt_init(&vs, it, norm);
          coef = torch_coef(percentile(&vs, t), norm);
        } else {
          coef = zscore_coef(it, norm);
        }
        if (s->kind != KEEL_CLIP_GLOBAL_NORM) {
          it->pending = 1;
          it->p_norm = norm;
        }
        units_scale(w, 0, w->nu, coef);
        w->coef *= coef;
        break;
      }
    }
  }
  return KEEL_OK;
}

/* Makes the adaptive state what the last kl_clip_eval computed (room was
** made there, so this cannot fail); a second call does nothing. */
void kl_clip_commit(kl_clip_chain *c) {
  for (int i = 0; c && i < c->n; i++) {
    clip_item *it = &c->items[i];
    if (!it->pending) continue;
    it->pending = 0;
    if (it->spec.kind == KEEL_CLIP_PERCENTILE) {
      history_push(it, it->p_norm);
    } else if (!it->initialized) {
      if (it->p_init) {   /* warm-up done: the buffer is spent */
        it->n = 0;
        it->initialized = 1;
      } else {
        it->ring[it->n++] = it->p_norm;
      }
      it->mean = it->p_mean;
      it->var = it->p_var;
    } else {
      it->mean = it->p_mean;
      it->var = it->p_var;
    }
  }
}

/* Drops what kl_clip_eval kept aside. */
void kl_clip_discard(kl_clip_chain *c) {
  for (int i = 0; c && i < c->n; i++) c->items[i].pending = 0;
}

/* }====================================================================== */

/* {======================================================================
** Standalone: statistics and in-place clipping of .grad
** ======================================================================= */

keel_status keel_grad_stats_compute(keel_ctx *ctx, int n, keel_tensor *const *ts, keel_grad_stats *out) {
  keel_status st;
  for (int k = 0; k < n; k++) {
    keel_tensor *t = ts[k], *c = NULL;
    memset(&out[k], 0, sizeof out[k]);
    if (!t) continue;
    if ((st = kl_check_same_ctx(ctx, "grad_stats", t)) || (st = kl_check_float(ctx, "grad_stats", t)))
      return st;
    if ((st = keel_contiguous(ctx, t, &c))) return st;
    st = kl_backend_for(ctx, c->storage->device)->grad_stats(ctx, c, 1, NULL, NULL, 0, &out[k], NULL, NULL);
    keel_tensor_release(c);
    if (st) return st;
  }
  return KEEL_OK;
}

/* The .grad of each parameter that has one: g[k] contiguous (a copy when
** orig[k] is not, and grads_apply copies the result back), par[k] its
** parameter. */
typedef struct grads {
  int m;
  keel_tensor **g, **orig, **par;
} grads;

static void grads_free(keel_ctx *ctx, grads *G, int n) {
  for (int k = 0; k < G->m; k++)
    if (G->g[k] != G->orig[k]) keel_tensor_release(G->g[k]);
  kl_free(ctx, G->g, sizeof(keel_tensor *) * (size_t)(n ? n : 1));
  kl_free(ctx, G->orig, sizeof(keel_tensor *) * (size_t)(n ? n : 1));
  kl_free(ctx, G->par, sizeof(keel_tensor *) * (size_t)(n ? n : 1));
}

static keel_status grads_collect(keel_ctx *ctx, const char *fn, int n, keel_tensor *const *params, grads *G) {
  keel_status st;
  size_t sz = sizeof(keel_tensor *) * (size_t)(n ? n : 1);
  G->m = 0;
  G->g = (keel_tensor **)kl_malloc(ctx, sz);
  G->orig = (keel_tensor **)kl_malloc(ctx, sz);
  G->par = (keel_tensor **)kl_malloc(ctx, sz);
  if (!G->g || !G->orig || !G->par) {
    grads_free(ctx, G, n);
    return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn);
  }
  for (int k = 0; k < n; k++) {
    keel_tensor *p = params[k], *g;
    if (!p) { grads_free(ctx, G, n); return kl_error(ctx, KEEL_ERR_ARG, "%s: parameter %d is NULL", fn, k + 1); }
    if ((st = kl_check_same_ctx(ctx, fn, p))) { grads_free(ctx, G, n); return st; }
    if (!(g = p->grad)) continue;
    if (g->dtype != KEEL_F32 && g->dtype != KEEL_F64) {
      grads_free(ctx, G, n);
      return kl_error(ctx, KEEL_ERR_TYPE, "%s: gradient of parameter %d is %s, expected float32 or float64", fn,
                      k + 1, keel_dtype_name(g->dtype));
    }
    G->orig[G->m] = g;
    G->par[G->m] = p;
    if (kl_is_contiguous(g)) {
      G->g[G->m++] = g;
    } else {
      keel_tensor *c;
      if ((st = keel_contiguous(ctx, g, &c))) { grads_free(ctx, G, n); return st; }
      G->g[G->m++] = c;
    }
  }
  return KEEL_OK;
}

/* Scales/clamps every unit of gradient k and writes copies back. */
static keel_status grads_apply(keel_ctx *ctx, grads *G, int k, int64_t nunits, const double *a, const double *v) {
  const kl_backend *be = kl_backend_for(ctx, G->g[k]->storage->device);
  keel_status st = be->grad_scale_(ctx, G->g[k], nunits, a, v);
  if (!st && G->g[k] != G->orig[k]) {
    st = be->copy(ctx, G->orig[k], G->g[k]);
    G->orig[k]->storage->version++;
  }
  return st;
}

keel_status keel_clip_grad_norm(keel_ctx *ctx, int n, keel_tensor *const *params, double max_norm, double p,
                                int error_if_nonfinite, double *total) {
  grads G;
  keel_status st;
  double sum = 0, tot;
  int64_t nan = 0, inf = 0;
  if (total) *total = 0;
  if (!(p > 0)) return kl_error(ctx, KEEL_ERR_ARG, "clip_grad_norm_: norm type must be > 0 or inf, got %g", p);
  if (max_norm != max_norm) return kl_error(ctx, KEEL_ERR_ARG, "clip_grad_norm_: max_norm is NaN");
  if ((st = grads_collect(ctx, "clip_grad_norm_", n, params, &G))) return st;
  for (int k = 0; k < G.m; k++) {
    keel_grad_stats s;
    double sp = 0;
    st = kl_backend_for(ctx, G.g[k]->storage->device)->grad_stats(ctx, G.g[k], 1, NULL, NULL,
                                                                  is_plain_p(p) ? 0 : p, &s,
                                                                  is_plain_p(p) ? NULL : &sp, NULL);
    if (st) goto done;
    nan += s.nan;
    inf += s.inf;
    if (isinf(p)) sum = s.max_abs > sum ? s.max_abs : sum;
    else sum += p == 2 ? s.sumsq : p == 1 ? s.sum_abs : sp;
  }
  /* torch: a NaN anywhere makes the total NaN, an Inf makes it Inf */
  tot = isinf(p) ? sum : p == 2 ? sqrt(sum) : p == 1 ? sum : pow(sum, 1 / p);
  if (inf) tot = INFINITY;
  if (nan) tot = NAN;
  if (error_if_nonfinite && !isfinite(tot)) {
    st = kl_error(ctx, KEEL_ERR_ARG,
                  "clip_grad_norm_: the total norm of order %g of the gradients is non-finite (%g), so it cannot "
                  "be clipped; gradients unchanged", p, tot);
    goto done;
  }
  if (G.m > 0) {
    double c = max_norm / (tot + TORCH_EPS), inf_v = INFINITY;
    if (!(c >= 1))   /* NaN scales too, as torch */
      for (int k = 0; k < G.m && !st; k++) st = grads_apply(ctx, &G, k, 1, &c, &inf_v);
  }
  if (!st && total) *total = tot;
done:
  grads_free(ctx, &G, n);
  return st;
}

keel_status keel_clip_grad_value(keel_ctx *ctx, int n, keel_tensor *const *params, double clip_value) {
  grads G;
  keel_status st;
  double one = 1;
  if (!(clip_value >= 0))
    return kl_error(ctx, KEEL_ERR_ARG, "clip_grad_value_: clip_value must be >= 0, got %g", clip_value);
  if ((st = grads_collect(ctx, "clip_grad_value_", n, params, &G))) return st;
  for (int k = 0; k < G.m && !st; k++) st = grads_apply(ctx, &G, k, 1, &one, &clip_value);
  grads_free(ctx, &G, n);
  return st;
}

/* torch's _amp_foreach_non_finite_check_and_unscale_ (with the check on
** the unscaled values, which also catches a finite value that overflows
** when a scale below 1 is undone): the in-place product (a pass that
** writes), then the count (a pass that reads). */
keel_status keel_grad_unscale(keel_ctx *ctx, int n, keel_tensor *const *params, double inv_scale,
                              int64_t *nonfinite, int *ngrads) {
  grads G;
  keel_status st = KEEL_OK;
  double inf_v = INFINITY;
  int64_t bad = 0;
  if (nonfinite) *nonfinite = 0;
  if (ngrads) *ngrads = 0;
  if (!(inv_scale > 0))
    return kl_error(ctx, KEEL_ERR_ARG, "unscale_: the inverse scale must be > 0, got %g", inv_scale);
  if ((st = grads_collect(ctx, "unscale_", n, params, &G))) return st;
  for (int k = 0; k < G.m && !st; k++) {
    keel_grad_stats s;
    if ((st = grads_apply(ctx, &G, k, 1, &inv_scale, &inf_v))) break;
    st = kl_backend_for(ctx, G.g[k]->storage->device)->grad_stats(ctx, G.g[k], 1, NULL, NULL, 0, &s, NULL, NULL);
    if (!st) bad += s.nan + s.inf;
  }
  if (!st) {
    if (nonfinite) *nonfinite = bad;
    if (ngrads) *ngrads = G.m;
  }
  grads_free(ctx, &G, n);
  return st;
}

keel_status keel_clip_grad_agc(keel_ctx *ctx, int n, keel_tensor *const *params, double clipping, double eps) {
  grads G;
  keel_status st;
  kl_clip_work w;
  keel_clip_spec spec;
  kl_clip_chain *chain = NULL;
  keel_tensor **pc = NULL;
  memset(&w, 0, sizeof w);
  if (!(clipping >= 0)) return kl_error(ctx, KEEL_ERR_ARG, "agc_: clipping must be >= 0, got %g", clipping);
  if (!(eps >= 0)) return kl_error(ctx, KEEL_ERR_ARG, "agc_: eps must be >= 0, got %g", eps);
  keel_clip_spec_default(KEEL_CLIP_AGC, &spec);
  spec.threshold = clipping;
  spec.eps = eps;
  if ((st = kl_clip_chain_new(ctx, 1, &spec, &chain))) return st;
  if ((st = grads_collect(ctx, "agc_", n, params, &G))) { kl_clip_chain_free(chain); return st; }
  pc = (keel_tensor **)kl_malloc(ctx, sizeof(keel_tensor *) * (size_t)(G.m ? G.m : 1));
  if (!pc) { st = kl_error(ctx, KEEL_ERR_NOMEM, "agc_: out of memory"); goto done; }
  for (int k = 0; k < G.m; k++) pc[k] = NULL;
  for (int k = 0; k < G.m && !st; k++) {
    if (G.par[k]->dtype != G.g[k]->dtype)
      st = kl_error(ctx, KEEL_ERR_TYPE, "agc_: parameter %d and its gradient differ in dtype", k + 1);
    else
      st = keel_contiguous(ctx, G.par[k], &pc[k]);
  }
  if (!st) st = kl_clip_stats(ctx, chain, &w, G.m, G.g, pc, NULL, 1);
  if (!st) st = kl_clip_eval(ctx, chain, &w, G.g);
  for (int k = 0; k < G.m && !st; k++)
    st = grads_apply(ctx, &G, k, w.u0[k + 1] - w.u0[k], w.a + w.u0[k], w.v + w.u0[k]);
done:
  if (pc) {
    for (int k = 0; k < G.m; k++) keel_tensor_release(pc[k]);
    kl_free(ctx, pc, sizeof(keel_tensor *) * (size_t)(G.m ? G.m : 1));
  }
  kl_clip_work_free(ctx, &w);
  kl_clip_chain_free(chain);
  grads_free(ctx, &G, n);
  return st;
}

/* }====================================================================== */
