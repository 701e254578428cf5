/*
** optim.cu: the optimizer's entries on the device, as the CPU kernels of
** engine/backend_cpu_optim.c define them:
** - grad_stats: statistics of a gradient split into nunits equal runs,
**   optionally seen through the clip x -> clamp(x * a[u], -v[u], v[u]),
**   with sum |x|^pw and the parameter's sum of squares in the same pass;
** - grad_scale_: that clip, in place;
** - optim_update: one SGD / Adam / AdamW / RMSprop / Adagrad update of one
**   parameter, the clip applied to each gradient element as it is read,
**   the non-finite policy, the sum of squares of the changes and, per
**   unit, of the new parameter (the next statistics pass need not read
**   the parameter again for its norm);
**
** Work is cut into items: a run of one unit (a chunk of it when the units
** are few and long), one block per item at a time. A block thus never
** crosses a unit, so the unit's scale and bound are read once per item and
** no element pays a division to find its unit. Chunk lengths are multiples
** of 8 elements, so when a unit's length is a multiple of the vector width
** and the pointers are 16-byte aligned every item loads and stores whole
** 16-byte packs. Blocks are as wide as their chunks need (32 to 256
** threads), so many short units (AGC over a conv weight's output
** channels) do not leave most threads idle.
**
** Reductions are deterministic: each item writes its partial sums to
** device scratch, a second kernel adds a unit's partials in chunk order
** (sums in double, counts in unsigned 64-bit), and one asynchronous copy
** brings the unit records to pinned host scratch before the single sync.
** The sums are not the CPU's bits (another order), only its values to
** rounding; counts and the max are exact.
**
** The update formulas repeat the CPU's operation by operation, in the
** parameter's dtype with the constants rounded to it. Products go through
** __fmul_rn/__dmul_rn so that nvcc cannot fuse them into an FMA with the
** following addition: square roots and divisions are IEEE by default, so
** a CUDA update gives the CPU's bits.
*/
#include <math.h>
#include <string.h>
#include "common.cuh"

/* {======================================================================
** Items and units
** ======================================================================= */

/* Fewest elements worth a chunk of their own. */
#define ITEM_MIN 4096
/* Blocks per multiprocessor to aim for. */
#define ITEMS_PER_SM 8

typedef struct plan {
  int64_t nunits, len;          /* units of len elements */
  int64_t nchunk, clen;         /* chunks per unit, elements per chunk (a multiple of 8) */
  int64_t items;                /* nunits * nchunk */
  int threads;                  /* per block: fewer for short chunks (many small AGC units) */
} plan;

static void make_plan(const kc_state *s, int64_t nunits, int64_t len, plan *pl) {
  int64_t target = (int64_t)(s->sm_count > 0 ? s->sm_count : 16) * ITEMS_PER_SM;
  int64_t per = (target + nunits - 1) / nunits, want = (len + ITEM_MIN - 1) / ITEM_MIN;
  int64_t nc = want < per ? want : per, clen;
  if (nc < 1) nc = 1;
  clen = (len + nc - 1) / nc;
  clen = (clen + 7) & ~(int64_t)7;
  if (clen < 8) clen = 8;
  pl->nunits = nunits;
  pl->len = len;
  pl->clen = clen;
  pl->nchunk = (len + clen - 1) / clen;
  if (pl->nchunk < 1) pl->nchunk = 1;
  pl->items = nunits * pl->nchunk;
  /* about 4 elements a thread at least, whole warps */
  pl->threads = (int)((clen / 4 + 31) & ~(int64_t)31);
  if (pl->threads < 32) pl->threads = 32;
  if (pl->threads > KC_THREADS) pl->threads = KC_THREADS;
}

/* Item k's unit and element range [*b, *e). */
__device__ __forceinline__ int64_t item_range(const plan &pl, int64_t k, int64_t *b, int64_t *e) {
  int64_t u = k / pl.nchunk, c = k - u * pl.nchunk, end = (u + 1) * pl.len;
  *b = u * pl.len + c * pl.clen;
  *e = *b + pl.clen < end ? *b + pl.clen : end;
  return u;
}

/* Scale and bound of the units: device arrays (nunits > 1) or one value
** passed by value (a single unit, or the same for all). */
typedef struct unitp {
  const double *a, *v;
  double a0, v0;
} unitp;

__device__ __forceinline__ double unit_a(const unitp &q, int64_t u) { return q.a ? q.a[u] : q.a0; }
__device__ __forceinline__ double unit_v(const unitp &q, int64_t u) { return q.v ? q.v[u] : q.v0; }

/* 16 bytes of T: one vector load or store. */
template <typename T>
struct alignas(16) kpack {
  T x[16 / sizeof(T)];
};


/* Scratch for the per-unit a and v (nunits > 1): device arrays filled
** from the host ones; q gets what the kernels read. dev: nunits * 2
** doubles of device scratch, or NULL when not needed. The engine's arrays
** are pageable memory: the copies go through stage.cu's pinned ring, so
** that they neither hold the host until the queue has drained nor need
** the arrays to outlive the call. */
static int units_to_device(kc_state *s, int64_t nunits, const double *a, const double *v, double *dev,
                           unitp *q) {
  int rc;
  q->a = q->v = NULL;
  q->a0 = a ? a[0] : 1.0;
  q->v0 = v ? v[0] : INFINITY;
  if (nunits <= 1) return KC_OK;
  if (a) {
    if ((rc = kc_stage_h2d(s, dev, a, sizeof(double) * (size_t)nunits))) return rc;
    q->a = dev;
  }
  if (v) {
    if ((rc = kc_stage_h2d(s, dev + nunits, v, sizeof(double) * (size_t)nunits))) return rc;
    q->v = dev + nunits;
  }
  return KC_OK;
}

/* }====================================================================== */

/* {======================================================================
** Statistics
** ======================================================================= */

/* One item's or one unit's statistics. */
typedef struct gstat {
  double sum, sumsq, sabs, mx, wsq, pw;
  unsigned long long nan, inf, zeros;
} gstat;

/* A thread's running statistics. */
typedef struct sacc {
  double sum, sq, ab, mx, wq, pw;
  unsigned long long nan, inf, zeros;
} sacc;

__device__ __forceinline__ void sacc_zero(sacc &A) {
  A.sum = A.sq = A.ab = A.mx = A.wq = A.pw = 0;
  A.nan = A.inf = A.zeros = 0;
}

/* Element x seen through the clip in its own dtype (as the update sees
** it), then counted: NaN and Inf apart, the rest summed. */
template <typename T>
__device__ __forceinline__ void stat_elem(sacc &A, T x, T ca, T lo, T hi, double pw) {
  T t = x * ca;
  double y = (double)(t < lo ? lo : t > hi ? hi : t);
  if (y != y) { A.nan++; return; }
  if (y - y != 0) { A.inf++; return; }
  A.zeros += y == 0;
  A.sum += y;
  y = fabs(y);
  A.sq += y * y;
  A.ab += y;
  A.mx = y > A.mx ? y : A.mx;
  if (pw > 0) A.pw += pow(y, pw);
}

template <typename W>
__device__ __forceinline__ void stat_w(sacc &A, W w) {
  double y = (double)w;
  A.wq += y * y;
}

/* The block's totals of A, valid in thread 0. sh: __shared__ double[9][32]. */
__device__ __forceinline__ void sacc_block(sacc &A, double (*sh)[32]) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  double v[9] = {A.sum, A.sq, A.ab, A.wq, A.pw, (double)A.nan, (double)A.inf, (double)A.zeros, A.mx};
  for (int j = 0; j < 8; j++) v[j] = kc_warp_sum(v[j]);
  v[8] = kc_warp_max(v[8]);
  __syncthreads();              /* sh may still be read by the last item */
  if (lane == 0)
    for (int j = 0; j < 9; j++) sh[j][warp] = v[j];
  __syncthreads();
  if (warp == 0) {
    for (int j = 0; j < 9; j++) v[j] = lane < nw ? sh[j][lane] : 0;
    for (int j = 0; j < 8; j++) v[j] = kc_warp_sum(v[j]);
    v[8] = kc_warp_max(v[8]);
  }
  /* counts of a block are below 2^53: exact in double */
  A.sum = v[0]; A.sq = v[1]; A.ab = v[2]; A.wq = v[3]; A.pw = v[4];
  A.nan = (unsigned long long)v[5]; A.inf = (unsigned long long)v[6]; A.zeros = (unsigned long long)v[7];
  A.mx = v[8];
}

__device__ __forceinline__ void sacc_store(const sacc &A, gstat *o) {
  o->sum = A.sum; o->sumsq = A.sq; o->sabs = A.ab; o->mx = A.mx; o->wsq = A.wq; o->pw = A.pw;
  o->nan = A.nan; o->inf = A.inf; o->zeros = A.zeros;
}

/* The block's threads add elements [b, e) of g (and the squares of w's:
** NULL, none) into A: one element at a time, or (_vec: b and e on
** 16-byte packs, w of g's dtype) a pack at a time. */
template <typename T, typename W>
__device__ __forceinline__ void stat_span(sacc &A, const T *g, const W *w, int64_t b, int64_t e, T ca, T lo, T hi,
                                          double pw) {
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
    stat_elem(A, g[i], ca, lo, hi, pw);
    if (w) stat_w(A, w[i]);
  }
}
template <typename T>
__device__ __forceinline__ void stat_span_vec(sacc &A, const T *g, const T *w, int64_t b, int64_t e, T ca, T lo,
                                              T hi, double pw) {
  const int N = 16 / sizeof(T);
  int64_t nv = (e - b) / N;
  for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
    kpack<T> x = *(const kpack<T> *)(g + b + j * N);
    for (int l = 0; l < N; l++) stat_elem(A, x.x[l], ca, lo, hi, pw);
    if (w) {
      kpack<T> y = *(const kpack<T> *)(w + b + j * N);
      for (int l = 0; l < N; l++) stat_w(A, y.x[l]);
    }
  }
}

/* Any layout: one element at a time; w (NULL: none) of its own dtype. */
template <typename T, typename W>
__global__ void stats_kernel(const T *g, const W *w, plan pl, unitp q, double pw, gstat *part) {
  KC_SHARED(double, sh, [9][32]);
  for (int64_t k = blockIdx.x; k < pl.items; k += gridDim.x) {
    int64_t b, e, u = item_range(pl, k, &b, &e);
    T ca = (T)unit_a(q, u), hi = (T)unit_v(q, u), lo = -hi;
    sacc A;
    sacc_zero(A);
    stat_span(A, g, w, b, e, ca, lo, hi, pw);
    sacc_block(A, sh);
    if (threadIdx.x == 0) sacc_store(A, &part[k]);
  }
}

/* Aligned units of whole packs, w (NULL: none) of g's dtype. */
template <typename T>
__global__ void stats_vec_kernel(const T *g, const T *w, plan pl, unitp q, double pw, gstat *part) {
  KC_SHARED(double, sh, [9][32]);
  for (int64_t k = blockIdx.x; k < pl.items; k += gridDim.x) {
    int64_t b, e, u = item_range(pl, k, &b, &e);
    T ca = (T)unit_a(q, u), hi = (T)unit_v(q, u), lo = -hi;
    sacc A;
    sacc_zero(A);
    stat_span_vec(A, g, w, b, e, ca, lo, hi, pw);
    sacc_block(A, sh);
    if (threadIdx.x == 0) sacc_store(A, &part[k]);
  }
}

/* One unit's statistics from its chunks' partials, added by the block in
** a fixed order (each thread a fixed stride, then the block's tree). */
__device__ __forceinline__ void unit_total(const gstat *part, int64_t nchunk, gstat *out, double (*sh)[32]) {
  sacc A;
  sacc_zero(A);
  for (int64_t c = threadIdx.x; c < nchunk; c += blockDim.x) {
    const gstat *p = &part[c];
    A.sum += p->sum; A.sq += p->sumsq; A.ab += p->sabs; A.wq += p->wsq; A.pw += p->pw;
    A.mx = p->mx > A.mx ? p->mx : A.mx;
    A.nan += p->nan; A.inf += p->inf; A.zeros += p->zeros;
  }
  sacc_block(A, sh);
  if (threadIdx.x == 0) sacc_store(A, out);
}

/* Unit totals: the partials of each unit's chunks, in chunk order. */
__global__ void stats_final_kernel(const gstat *part, plan pl, gstat *out) {
  KC_SHARED(double, sh, [9][32]);
  for (int64_t u = blockIdx.x; u < pl.nunits; u += gridDim.x) {
    unit_total(part + u * pl.nchunk, pl.nchunk, &out[u], sh);
  }
}

template <typename T>
static int stats_launch(kc_state *s, const kc_view *g, const kc_view *w, const plan &pl, const unitp &q, double pw,
                        gstat *part) {
  const int N = 16 / sizeof(T);
  unsigned nb = kc_grid_x(pl.items);
  const T *gp = (const T *)g->data;
  if (pl.len % N == 0 && kc_aligned16(gp) && (!w || (w->dtype == g->dtype && kc_aligned16(w->data))))
    KC_LAUNCH(nb, pl.threads, 0, s->stream, stats_vec_kernel<T>)(gp, w ? (const T *)w->data : (const T *)NULL, pl,
                                                                 q, pw, part);
  else if (w && w->dtype == KEEL_F32)
    KC_LAUNCH(nb, pl.threads, 0, s->stream, stats_kernel<T, float>)(gp, (const float *)w->data, pl, q, pw, part);
  else
    KC_LAUNCH(nb, pl.threads, 0, s->stream, stats_kernel<T, double>)(gp, w ? (const double *)w->data : NULL, pl, q,
                                                                     pw, part);
  return KC_LAUNCHED();
}

/* {======================================================================
** Deferred host results (defer_results in keel_cuda.h): each result that
** is not to be waited for at once is copied down into a pinned arena, and
** a record says where its values go; pend_flush waits once and writes
** them all.
** ======================================================================= */

enum { PEND_STATS, PEND_UPD, PEND_DEC };

typedef struct pend_rec {
  int kind;
  size_t off;                   /* in the arena */
  int64_t nunits, len;          /* PEND_STATS, PEND_UPD */
  int has_w;
  keel_grad_stats *st;
  double *spow, *dsq, *wsq;
  kc_decision *dec;             /* PEND_DEC */
} pend_rec;

struct kc_batch;

struct kc_pending {
  int on;                       /* a batch is open (KC_DEFER_ON) */
  char *arena;                  /* pinned */
  size_t cap, used;
  pend_rec *recs;
  int n, nrec;
  struct kc_batch *batch;       /* the queued calls of the open batch */
  int err;                      /* an error of a flush that no caller has seen yet */
  cudaEvent_t copied;           /* recorded after the last copy of results (results_ready) */
};

static void write_stats(const gstat *h, int64_t nunits, int64_t len, int has_w, keel_grad_stats *st, double *spow) {
  for (int64_t u = 0; u < nunits; u++) {
    keel_grad_stats *r = &st[u];
    r->numel = len;
    r->nan = (int64_t)h[u].nan;
    r->inf = (int64_t)h[u].inf;
    r->zeros = (int64_t)h[u].zeros;
    r->sum = h[u].sum;
    r->sumsq = h[u].sumsq;
    r->sum_abs = h[u].sabs;
    r->max_abs = h[u].mx;
    r->w_sumsq = has_w ? h[u].wsq : 0;
    if (spow) spow[u] = h[u].pw;
  }
}

/* Writes every record's values (their copies have completed). */
static void pend_write(kc_state *s) {
  struct kc_pending *P = s->pending;
  for (int i = 0; i < P->n; i++) {
    const pend_rec *r = &P->recs[i];
    const char *h = P->arena + r->off;
    if (r->kind == PEND_STATS) {
      write_stats((const gstat *)h, r->nunits, r->len, r->has_w, r->st, r->spow);
    } else if (r->kind == PEND_DEC) {
      const double *q = (const double *)h;
      r->dec->total_sumsq = q[0];
      r->dec->nonfinite = q[1];
      r->dec->coef = q[2];
      r->dec->skip = q[3];
      r->dec->clipped = q[4];
    } else {
      /* per unit (changes, new squares): the changes' total in unit
      ** order, the squares per unit */
      const double *q = (const double *)h;
      double d = 0;
      for (int64_t u = 0; u < r->nunits; u++) {
        d += q[2 * u];
        if (r->wsq) r->wsq[u] = q[2 * u + 1];
      }
      if (r->dsq) *r->dsq = d;
    }
  }
  P->n = 0;
  P->used = 0;
}

/* Waits for the queued copies and writes every record's values. */
static int pend_flush(kc_state *s) {
  struct kc_pending *P = s->pending;
  int rc;
  if (!P || P->n == 0) return KC_OK;
  if ((rc = kc_sync(s))) {
    P->n = 0;   /* nothing to write: the copies failed */
    P->used = 0;
    return rc;
  }
  pend_write(s);
  return KC_OK;
}

/* n bytes of the arena at *off; a full arena is flushed (one wait) before
** it grows, since queued copies may still land in it.
**
** The arena is the optimizer's own pinned buffer, not stage.cu's ring:
** the ring is for uploads, whose bytes are free again once their copy has
** run, while these are results coming down, which must stay put after the
** copy until pend_write hands them to the engine (at the next wait, or
** when a report is read, perhaps a step later). */
static int pend_region(kc_state *s, size_t n, size_t *off) {
  struct kc_pending *P = s->pending;
  int rc;
  n = (n + 15) & ~(size_t)15;
  if (P->used + n > P->cap) {
    void *arena = P->arena;
    /* room for twice what was wanted at once (what is outstanding and n,
    ** counted before the flush empties it), so that the next time (the
    ** statistics and the update of one step) fits without a wait */
    size_t want = 2 * (P->used + n);
    if ((rc = pend_flush(s))) return rc;
    rc = kc_grow(s, &arena, &P->cap, want, 1);
    P->arena = (char *)arena;
    if (rc) return rc;
  }
  *off = P->used;
  P->used += n;
  return KC_OK;
}

static int pend_record(kc_state *s, pend_rec **rec) {
  struct kc_pending *P = s->pending;
  if (P->n == P->nrec) {
    int nr = P->nrec ? 2 * P->nrec : 64;
    pend_rec *r = (pend_rec *)realloc(P->recs, sizeof *r * (size_t)nr);
    if (!r) return KC_ERR_NOMEM;
    P->recs = r;
    P->nrec = nr;
  }
  *rec = &P->recs[P->n++];
  memset(*rec, 0, sizeof **rec);
  return KC_OK;
}

/* Room for n bytes of results and one record for them. */
static int pend_reserve(kc_state *s, size_t n, pend_rec **rec, void **host) {
  size_t off;
  int rc;
  if ((rc = pend_region(s, n, &off))) return rc;
  if ((rc = pend_record(s, rec))) {
    s->pending->used = off;   /* the region back: it was the last one taken */
    return rc;
  }
  (*rec)->off = off;
  *host = s->pending->arena + off;
  return KC_OK;
}

static int deferring(const kc_state *s) { return s->pending && s->pending->on; }

/* Marks the result copies queued so far: results_ready asks this event
** whether they have all landed. */
static int pend_mark(kc_state *s) {
  struct kc_pending *P = s->pending;
  int rc;
  if (!P->copied && (rc = kc_check_cuda(cudaEventCreateWithFlags(&P->copied, cudaEventDisableTiming)))) return rc;
  return kc_check_cuda(cudaEventRecord(P->copied, s->stream));
}

/* Multi-tensor batches (below). */
static int batch_launch(kc_state *s);
static int queue_stats(kc_state *s, const kc_view *g, int64_t nunits, int64_t len, const double *a, const double *v,
                       double pw, keel_grad_stats *st, double *spow, const kc_view *w);

/* }====================================================================== */

static int grad_stats(kc_state *s, const kc_view *g, int64_t nunits, const double *a, const double *v, double pw,
                      keel_grad_stats *st, double *spow, const kc_view *w) {
  plan pl;
  unitp q;
  int64_t len, ndev;
  size_t off_part, off_res, total;
  char *dev;
  gstat *hres, *part, *res;
  int rc;
  if (!g || (nunits > 0 && !st)) return KC_ERR_ARG;
  if (nunits <= 0) return KC_OK;
  if (!kc_is_float(g->dtype) || (w && !kc_is_float(w->dtype))) return KC_ERR_DTYPE;
  if (!kc_contiguous(g) || (w && (!kc_contiguous(w) || w->numel != g->numel))) return KC_ERR_ARG;
  len = g->numel / nunits;
  if (len == 0) {
    for (int64_t u = 0; u < nunits; u++) {
      memset(&st[u], 0, sizeof st[u]);
      if (spow) spow[u] = 0;
    }
    return KC_OK;
  }
  if (deferring(s)) {
    if (!w || w->dtype == g->dtype) return queue_stats(s, g, nunits, len, a, v, pw, st, spow, w);
    /* a parameter of another dtype: the single-tensor path, after what is
    ** queued (stream order is call order) */
    if ((rc = batch_launch(s))) return rc;
  }
  make_plan(s, nunits, len, &pl);
  /* device scratch: a and v, the partials, the unit totals */
  ndev = nunits > 1 && (a || v) ? 2 * nunits : 0;
  off_part = (size_t)kc_align256(ndev * (int64_t)sizeof(double));
  off_res = off_part + (size_t)kc_align256(pl.items * (int64_t)sizeof(gstat));
  total = off_res + (pl.nchunk > 1 ? (size_t)nunits * sizeof(gstat) : 0);
  if ((rc = kc_scratch(s, total, (void **)&dev))) return rc;
  if (deferring(s)) {
    pend_rec *rec;
    if ((rc = pend_reserve(s, (size_t)nunits * sizeof(gstat), &rec, (void **)&hres))) return rc;
    rec->kind = PEND_STATS;
    rec->nunits = nunits;
    rec->len = len;
    rec->has_w = w != NULL;
    rec->st = st;
    rec->spow = spow;
  } else if ((rc = kc_host_scratch(s, (size_t)nunits * sizeof(gstat), (void **)&hres))) {
    return rc;
  }
  part = (gstat *)(dev + off_part);
  res = pl.nchunk > 1 ? (gstat *)(dev + off_res) : part;
  if ((rc = units_to_device(s, nunits, a, v, (double *)dev, &q))) return rc;
  if (!spow) pw = 0;
  rc = g->dtype == KEEL_F32 ? stats_launch<float>(s, g, w, pl, q, pw, part)
                            : stats_launch<double>(s, g, w, pl, q, pw, part);
  if (rc) return rc;
  if (pl.nchunk > 1) {
    /* a warp per unit when the chunks are few */
    int th = pl.nchunk <= 32 ? 32 : KC_THREADS;
    KC_LAUNCH(kc_grid_x(nunits), th, 0, s->stream, stats_final_kernel)(part, pl, res);
    if ((rc = KC_LAUNCHED())) return rc;
  }
  if ((rc = kc_check_cuda(cudaMemcpyAsync(hres, res, (size_t)nunits * sizeof(gstat), cudaMemcpyDeviceToHost,
                                          s->stream))))
    return rc;
  if (deferring(s)) return pend_mark(s);   /* written by the closing defer_results */
  if ((rc = kc_sync(s))) return rc;
  write_stats(hres, nunits, len, w != NULL, st, spow);
  return KC_OK;
}

/* }====================================================================== */

/* {======================================================================
** In-place clipping: g = clamp(g * a[u], -v[u], v[u]); NaN stays NaN.
** ======================================================================= */

template <typename T>
__device__ __forceinline__ T clip1(T x, T ca, T lo, T hi) {
  T t = x * ca;
  return t < lo ? lo : t > hi ? hi : t;
}

template <typename T>
__global__ void scale_kernel(T *g, plan pl, unitp q) {
  for (int64_t k = blockIdx.x; k < pl.items; k += gridDim.x) {
    int64_t b, e, u = item_range(pl, k, &b, &e);
    T ca = (T)unit_a(q, u), hi = (T)unit_v(q, u), lo = -hi;
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) g[i] = clip1(g[i], ca, lo, hi);
  }
}

template <typename T>
__global__ void scale_vec_kernel(T *g, plan pl, unitp q) {
  const int N = 16 / sizeof(T);
  for (int64_t k = blockIdx.x; k < pl.items; k += gridDim.x) {
    int64_t b, e, u = item_range(pl, k, &b, &e), nv = (e - b) / N;
    T ca = (T)unit_a(q, u), hi = (T)unit_v(q, u), lo = -hi;
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
      kpack<T> *p = (kpack<T> *)(g + b + j * N), x = *p;
      for (int l = 0; l < N; l++) x.x[l] = clip1(x.x[l], ca, lo, hi);
      *p = x;
    }
  }
}

template <typename T>
static int scale_launch(kc_state *s, const kc_view *g, const plan &pl, const unitp &q) {
  unsigned nb = kc_grid_x(pl.items);
  T *gp = (T *)g->data;
  if (pl.len % (16 / (int64_t)sizeof(T)) == 0 && kc_aligned16(gp))
    KC_LAUNCH(nb, pl.threads, 0, s->stream, scale_vec_kernel<T>)(gp, pl, q);
  else
    KC_LAUNCH(nb, pl.threads, 0, s->stream, scale_kernel<T>)(gp, pl, q);
  return KC_LAUNCHED();
}

static int grad_scale_(kc_state *s, const kc_view *g, int64_t nunits, const double *a, const double *v) {
  plan pl;
  unitp q;
  double *dev = NULL;
  int64_t len;
  int rc;
  if (!g) return KC_ERR_ARG;
  if (!kc_is_float(g->dtype)) return KC_ERR_DTYPE;
  if (!kc_contiguous(g)) return KC_ERR_ARG;
  if (nunits <= 0 || (len = g->numel / nunits) == 0) return KC_OK;
  make_plan(s, nunits, len, &pl);
  if (nunits > 1 && (a || v) && (rc = kc_scratch(s, sizeof(double) * 2 * (size_t)nunits, (void **)&dev))) return rc;
  if ((rc = units_to_device(s, nunits, a, v, dev, &q))) return rc;
  return g->dtype == KEEL_F32 ? scale_launch<float>(s, g, pl, q) : scale_launch<double>(s, g, pl, q);
}

/* }====================================================================== */

/* {======================================================================
** Optimizer updates. Each kind's element function follows its CPU body
** (backend_cpu_optim.c: SGD_BODY, ADAM_BODY, RMSPROP_BODY, ADAGRAD_BODY)
** operation for operation; comments there give PyTorch's statements.
** ======================================================================= */

/* Products that the compiler may not fuse with a neighbouring add. */
#ifdef KEEL_CUDA_SIM
__device__ __forceinline__ float om(float a, float b) { return a * b; }
__device__ __forceinline__ double om(double a, double b) { return a * b; }
#else
__device__ __forceinline__ float om(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double om(double a, double b) { return __dmul_rn(a, b); }
#endif

/* The constants of one step in the element type (FILL_CONSTS). */
template <typename T>
struct kconsts {
  T wd, decay, mom, omd, nlr, b1, omb1, b2, omb2, bc2s, eps, nss, alpha, oma, nclr, one, mone;
};

typedef struct oflags {
  int maximize, l2, momentum, nesterov, fresh, amsgrad, decoupled, centered;
  int masked, keep;             /* nf: ZERO or KEEP; KEEP */
} oflags;

/* Template kinds: Adam and AdamW share one (f.decoupled tells them apart). */
enum { UK_SGD, UK_ADAM, UK_RMSPROP, UK_ADAGRAD };

/* Which state buffers kind K reads and writes under f. */
template <int K>
__device__ __forceinline__ void uses(const oflags &f, bool *u0, bool *u1, bool *u2) {
  *u0 = K != UK_SGD || f.momentum;
  *u1 = K == UK_ADAM || (K == UK_RMSPROP && f.momentum);
  *u2 = (K == UK_ADAM && f.amsgrad) || (K == UK_RMSPROP && f.centered);
}

/* One element: p and the state in place, from raw gradient value gx;
** returns the square of the change made to p. */
template <typename T, int K>
__device__ __forceinline__ double upd_elem(T &p, T gx, T &s0, T &s1, T &s2, T ca, T lo, T hi,
                                           const kconsts<T> &k, const oflags &f) {
  T p0 = p, d, np;
  if (f.masked && gx - gx != 0) {
    if (f.keep) {
      if (K == UK_SGD && f.momentum && f.fresh) s0 = 0;
      return 0;
    }
    gx = 0;
  }
  d = clip1(gx, ca, lo, hi);
  if (f.maximize) d = -d;
  if (f.l2) d = d + om(k.wd, p0);
  if (K == UK_SGD) {
    if (f.momentum) {
      T b = f.fresh ? d : om(s0, k.mom) + om(k.omd, d);
      s0 = b;
      d = f.nesterov ? d + om(k.mom, b) : b;
    }
    np = p0 + om(k.nlr, d);
  } else if (K == UK_ADAM) {
    T pp = f.decoupled ? om(p0, k.decay) : p0;
    T m = om(s0, k.b1) + om(k.omb1, d);
    T v = om(s1, k.b2) + om(om(k.omb2, d), d);
    s0 = m;
    s1 = v;
    if (f.amsgrad) {
      T x = s2;
      v = (x > v) | (x != x) ? x : v;   /* torch.maximum: NaN wins */
      s2 = v;
    }
    T den = sqrt(v) / k.bc2s + k.eps;
    np = pp + om(k.nss, m) / den;
  } else if (K == UK_RMSPROP) {
    T sq = om(s0, k.alpha) + om(om(k.oma, d), d), avg;
    s0 = sq;
    if (f.centered) {
      T ga = om(s2, k.alpha) + om(k.oma, d);
      s2 = ga;
      avg = sqrt(sq + om(om(k.mone, ga), ga));
    } else {
      avg = sqrt(sq);
    }
    avg = avg + k.eps;
    if (f.momentum) {
      T b = om(s1, k.mom) + om(k.one, d) / avg;
      s1 = b;
      np = p0 + om(k.nlr, b);
    } else {
      np = p0 + om(k.nlr, d) / avg;
    }
  } else {
    T sm = s0 + om(om(k.one, d), d);
    s0 = sm;
    np = p0 + om(k.nclr, d) / (sqrt(sm) + k.eps);
  }
  p = np;
  {
    double c = (double)(T)(np - p0);
    return c * c;
  }
}

typedef struct upd_args {
  void *p;
  const void *g;
  void *s[3];
  int vec;
} upd_args;

/* As FILL_CONSTS: every hyper-parameter rounded to T, the step-dependent
** ones computed in double first. */
template <typename T>
static void fill_consts(kconsts<T> *k, const keel_optim_hparams *h, int64_t step) {
  double bc1 = 1 - pow(h->beta1, (double)step), bc2 = 1 - pow(h->beta2, (double)step);
  k->wd = (T)h->weight_decay;
  k->decay = (T)(1 - h->lr * h->weight_decay);
  k->mom = (T)h->momentum;
  k->omd = (T)(1 - h->dampening);
  k->nlr = (T)-h->lr;
  k->b1 = (T)h->beta1;
  k->omb1 = (T)(1 - h->beta1);
  k->b2 = (T)h->beta2;
  k->omb2 = (T)(1 - h->beta2);
  k->bc2s = (T)sqrt(bc2);
  k->nss = (T)-(h->lr / bc1);
  k->eps = (T)h->eps;
  k->alpha = (T)h->alpha;
  k->oma = (T)(1 - h->alpha);
  k->nclr = (T)-(h->lr / (1 + (double)(step - 1) * h->lr_decay));
  k->one = (T)1;
  k->mone = (T)-1;
}

static int queue_update(kc_state *s, int kind, const keel_optim_hparams *h, int64_t step, int dtype,
                        const upd_args *A, const oflags *f, int64_t nunits, int64_t len, const double *a,
                        const double *v, double *dsq, double *wsq);
static int defer_results(kc_state *s, int mode);

static int optim_update(kc_state *s, int kind, const keel_optim_hparams *h, int64_t step, const kc_view *p,
                        const kc_view *g, const kc_view *const *state, int nstate, unsigned fresh, int64_t nunits,
                        const double *a, const double *v, int nf, double *dsq, double *wsq) {
  oflags f;
  upd_args A;
  bool need[3];
  int64_t len, vw;
  int rc;
  if (dsq) *dsq = 0;
  if (!p || !g || !h || nstate < 0 || (nstate > 0 && !state)) return KC_ERR_ARG;
  if ((unsigned)kind >= KEEL_OPTIM_KIND_COUNT) return KC_ERR_ARG;
  if (!kc_is_float(p->dtype) || g->dtype != p->dtype) return KC_ERR_DTYPE;
  if (!kc_contiguous(p) || !kc_contiguous(g) || g->numel != p->numel) return KC_ERR_ARG;
  memset(&f, 0, sizeof f);
  f.maximize = h->maximize != 0;
  f.l2 = h->weight_decay != 0 && kind != KEEL_OPTIM_ADAMW;
  f.momentum = h->momentum != 0;
  f.nesterov = h->nesterov != 0;
  f.fresh = (fresh & 1u) != 0;
  f.amsgrad = h->amsgrad != 0 && (kind == KEEL_OPTIM_ADAM || kind == KEEL_OPTIM_ADAMW);
  f.decoupled = kind == KEEL_OPTIM_ADAMW;
  f.centered = h->centered != 0;
  f.masked = nf == KEEL_NONFINITE_ZERO || nf == KEEL_NONFINITE_KEEP;
  f.keep = nf == KEEL_NONFINITE_KEEP;
  /* the state buffers this update reads and writes (as uses<K>) */
  need[0] = kind != KEEL_OPTIM_SGD || f.momentum;
  need[1] = kind == KEEL_OPTIM_ADAM || kind == KEEL_OPTIM_ADAMW || (kind == KEEL_OPTIM_RMSPROP && f.momentum);
  need[2] = ((kind == KEEL_OPTIM_ADAM || kind == KEEL_OPTIM_ADAMW) && f.amsgrad) ||
            (kind == KEEL_OPTIM_RMSPROP && f.centered);
  vw = 16 / (p->dtype == KEEL_F32 ? 4 : 8);
  A.p = p->data;
  A.g = g->data;
  A.vec = kc_aligned16(p->data) && kc_aligned16(g->data);
  for (int j = 0; j < 3; j++) {
    const kc_view *t = j < nstate ? state[j] : NULL;
    A.s[j] = NULL;
    if (!need[j]) continue;
    if (!t) return KC_ERR_ARG;
    if (t->dtype != p->dtype) return KC_ERR_DTYPE;
    if (!kc_contiguous(t) || t->numel != p->numel) return KC_ERR_ARG;
    A.s[j] = t->data;
    A.vec = A.vec && kc_aligned16(t->data);
  }
  if (nunits <= 0) return KC_OK;
  if ((len = p->numel / nunits) == 0) {
    for (int64_t u = 0; wsq && u < nunits; u++) wsq[u] = 0;
    return KC_OK;
  }
  A.vec = A.vec && len % vw == 0;
  /* every update the engine makes is batched while deferring; one outside
  ** a batch runs as a batch of its own (the same kernels, so the same sums) */
  if (deferring(s)) return queue_update(s, kind, h, step, p->dtype, &A, &f, nunits, len, a, v, dsq, wsq);
  if ((rc = defer_results(s, KC_DEFER_ON))) return rc;
  rc = queue_update(s, kind, h, step, p->dtype, &A, &f, nunits, len, a, v, dsq, wsq);
  {
    int rc2 = defer_results(s, KC_DEFER_WAIT);
    return rc ? rc : rc2;
  }
}

/* }====================================================================== */

/* {======================================================================
** Multi-tensor batches. While results are deferred (defer_results in
** keel_cuda.h), grad_stats and optim_update do not launch: each call is
** queued as a descriptor (its pointers, unit sizes, a/v factors, update
** constants and flags). Closing or flushing the batch launches them all,
** per class (the statistics, or one update kind, of one dtype) one kernel
** over the chunks of every tensor of the class and one that adds each
** unit's chunk partials in chunk order, as multi_tensor_apply does: a
** block finds its tensor by a binary search over the descriptors' first
** items. The descriptor table and the a/v factors go up in one copy
** through stage.cu's pinned ring, and the unit results of every class
** come back in one copy into the results arena. Blocks are KC_THREADS
** wide whatever the tensor, so a tensor's sums do not depend on what else
** is batched.
** ======================================================================= */

/* Elements per chunk at most (a multiple of 8). */
#define MT_CHUNK 16384

enum { MT_STATS, MT_UPDATE };

/* One queued call as the kernels read it. */
typedef struct mt_desc {
  const void *g, *w;            /* w: the parameter of a statistics call (NULL: none) */
  void *p, *s[3];               /* an update's parameter and state */
  int64_t len, clen, nchunk;    /* units of len elements, chunks of clen, nchunk per unit */
  int64_t item0, unit0;         /* the call's first item and unit in its launch */
  int64_t ia, iv;               /* a[u] is AV[ia + u] (ia >= 0) else a0; v likewise */
  double a0, v0;
  double pw;                    /* statistics: the order of sum |x|^pw (0: none) */
  kconsts<double> k;            /* update constants in double: (T)k.x is FILL_CONSTS' value */
  oflags f;
  int32_t vec;                  /* whole 16-byte packs: aligned, len a multiple of the width */
  int64_t dk;                   /* an update of a decided step: its tensor in the decision (-1: none) */
} mt_desc;

/* One queued call on the host: its class, its descriptor, where its
** results go. */
typedef struct mt_call {
  int op, dtype, kind;          /* MT_*, keel_dtype, UK_* (0 for statistics) */
  int64_t nunits, av;           /* av: its a and v (nunits each) in the queue's av, -1: none */
  int has_a, has_v;
  keel_grad_stats *st;          /* statistics */
  double *spow;
  double *dsq, *wsq;            /* update */
  mt_desc d;
} mt_call;

struct kc_batch {
  mt_call *calls;
  int n, cap;
  double *av;                   /* host copies of the calls' a and v */
  int64_t nav, cap_av;
  void *dev;                    /* device: descriptors, a/v, partials, unit results */
  size_t dev_size;
  char *up;                     /* host: descriptors, a/v and decision indices, as uploaded */
  size_t up_cap;
  int err;                      /* the first error of a flush the engine did not see */
  /* a step decided on the device (decide): its chain, where its record
  ** goes, the statistics calls queued so far and the updates that read it */
  int has_dec, multi_unit;
  kc_decide dec;
  kc_decision *dec_out;
  int64_t nstats, ndecided;
};

/* The last descriptor whose first item (unit) is at most k. */
__device__ __forceinline__ int mt_find(const mt_desc *D, int n, int64_t k, int by_unit) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if ((by_unit ? D[mid].unit0 : D[mid].item0) <= k) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/* Item k of descriptor d: its unit and element range [*b, *e). */
__device__ __forceinline__ int64_t mt_range(const mt_desc &d, int64_t k, int64_t *b, int64_t *e) {
  int64_t kk = k - d.item0, u = kk / d.nchunk, c = kk - u * d.nchunk, end = (u + 1) * d.len;
  *b = u * d.len + c * d.clen;
  *e = *b + d.clen < end ? *b + d.clen : end;
  return u;
}

template <typename T>
__device__ __forceinline__ void mt_unit(const mt_desc &d, const double *AV, int64_t u, T *ca, T *lo, T *hi) {
  *ca = (T)(d.ia >= 0 ? AV[d.ia + u] : d.a0);
  *hi = (T)(d.iv >= 0 ? AV[d.iv + u] : d.v0);
  *lo = -*hi;
}

template <typename T>
__global__ void mt_stats_kernel(const mt_desc *D, int nd, const double *AV, int64_t items, gstat *part) {
  KC_SHARED(double, sh, [9][32]);
  for (int64_t k = blockIdx.x; k < items; k += gridDim.x) {
    const mt_desc &d = D[mt_find(D, nd, k, 0)];
    int64_t b, e, u = mt_range(d, k, &b, &e);
    const T *g = (const T *)d.g, *w = (const T *)d.w;
    double pw = d.pw;
    T ca, lo, hi;
    sacc A;
    mt_unit(d, AV, u, &ca, &lo, &hi);
    sacc_zero(A);
    if (d.vec) stat_span_vec(A, g, w, b, e, ca, lo, hi, pw);
    else stat_span(A, g, w, b, e, ca, lo, hi, pw);
    sacc_block(A, sh);
    if (threadIdx.x == 0) sacc_store(A, &part[k]);
  }
}

/* Unit u's totals: its chunks' partials in chunk order. */
__global__ void mt_stats_final_kernel(const mt_desc *D, int nd, int64_t units, const gstat *part, gstat *out) {
  KC_SHARED(double, sh, [9][32]);
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const mt_desc &d = D[mt_find(D, nd, u, 1)];
    int64_t base = d.item0 + (u - d.unit0) * d.nchunk;
    unit_total(part + base, d.nchunk, &out[u], sh);
  }
}

template <typename T>
__device__ __forceinline__ kconsts<T> kcast(const kconsts<double> &k) {
  kconsts<T> r;
  r.wd = (T)k.wd; r.decay = (T)k.decay; r.mom = (T)k.mom; r.omd = (T)k.omd; r.nlr = (T)k.nlr;
  r.b1 = (T)k.b1; r.omb1 = (T)k.omb1; r.b2 = (T)k.b2; r.omb2 = (T)k.omb2; r.bc2s = (T)k.bc2s;
  r.eps = (T)k.eps; r.nss = (T)k.nss; r.alpha = (T)k.alpha; r.oma = (T)k.oma; r.nclr = (T)k.nclr;
  r.one = (T)k.one; r.mone = (T)k.mone;
  return r;
}

/* A decided step as the update kernels read it: per tensor scale a and
** bound v, and the decision record (out[3]: skip). */
typedef struct mt_dec {
  const double *a, *v, *out;
} mt_dec;

__device__ __forceinline__ double dec_coef(double max_norm, double total) {
  double c = max_norm / (total + 1e-6);   /* clip.c's torch_coef */
  return c < 1 ? c : 1;
}

/* Tensor k's scale, bound, sum of squares and max after a norm item's
** factor c (units_scale's order). Returns whether that clipped it. */
__device__ __forceinline__ int dec_scale(double *A, double *V, double *SQ, double *MX, int64_t k, double c) {
  int clipped = MX[k] > 0;
  A[k] *= c;
  V[k] *= c;
  SQ[k] *= c * c;
  MX[k] *= c;
  return clipped;
}

/* The decision (kc_decide) from the statistics of the step's n tensors
** (res[idx[k]]) in clip.c's order, to the host's bits: the totals as
** kl_clip_stats adds them, then the chain as kl_clip_eval runs it, each
** scale applied as units_scale applies it. Only the sums the host adds in
** sequence are one thread's (thread 0: the totals, and each global norm
** item's sum of squares); a value bound, a per-tensor norm item and the
** scaling by a global factor are per tensor. Thread t owns tensors t,
** t + blockDim.x, ... throughout, so items of those kinds need no barrier
** between them; a global norm item takes two (its sum reads every
** tensor's squares; its factor then goes to every thread). The clipped
** flag is the block's OR. W: 5n doubles of work (a, v, the running sums
** of squares and max, the non-finite counts). out: total, nonfinite,
** coef, skip, clipped. One block. */
__global__ void mt_decide_kernel(const gstat *res, const int64_t *idx, kc_decide q, double *W, double *out) {
  KC_SHARED(double, bcast);   /* thread 0's number for all: the non-finite count, then each global factor */
  /* the chain, copied at constant indices: a parameter indexed by a
  ** variable would be copied to local memory (a stack frame) */
  KC_SHARED(double, thr, [KC_DECIDE_MAX]);
  KC_SHARED(int, kind, [KC_DECIDE_MAX]);
  int64_t n = q.ntensors;
  double *A = W, *V = W + n, *SQ = W + 2 * n, *MX = W + 3 * n, *NF = W + 4 * n;
  double total = 0, nf = 0, coef = 1;
  int clipped = 0, skip;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const gstat &g = res[idx[k]];
    A[k] = 1;
    V[k] = INFINITY;
    SQ[k] = g.sumsq;
    MX[k] = g.mx;
    NF[k] = (double)(g.nan + g.inf);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < KC_DECIDE_MAX; i++) {
      thr[i] = q.threshold[i];
      kind[i] = q.kind[i];
    }
    for (int64_t k = 0; k < n; k++) {
      total += SQ[k];
      nf += NF[k];
    }
    bcast = nf;
  }
  __syncthreads();
  skip = q.skip_nonfinite && bcast > 0;
  for (int i = 0; i < q.nitems && !skip; i++) {
    double t = thr[i], c;
    if (kind[i] == KC_DECIDE_VALUE) {
      for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
        if (MX[k] > t) { clipped = 1; MX[k] = t; }
        if (t < V[k]) V[k] = t;
      }
    } else if (kind[i] == KC_DECIDE_NORM) {
      /* one tensor's sum: 0 + its squares, as the host adds it */
      for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
        double s = 0;
        s += SQ[k];
        c = dec_coef(t, sqrt(s));
        if (c != 1) clipped |= dec_scale(A, V, SQ, MX, k, c);
      }
    } else {
      __syncthreads();   /* the squares as the items before left them */
      if (threadIdx.x == 0) {
        double s = 0;
        for (int64_t k = 0; k < n; k++) s += SQ[k];
        bcast = dec_coef(t, sqrt(s));
      }
      __syncthreads();
      c = bcast;
      if (c != 1)
        for (int64_t k = threadIdx.x; k < n; k += blockDim.x) clipped |= dec_scale(A, V, SQ, MX, k, c);
      coef *= c;
    }
  }
  clipped = __syncthreads_or(clipped);
  if (threadIdx.x == 0) {
    out[0] = total;
    out[1] = nf;
    out[2] = coef;
    out[3] = skip ? 1 : 0;
    out[4] = clipped ? 1 : 0;
  }
}

/* part[2k], part[2k+1]: item k's sum of squared changes and of the new
** parameter's squares. */
template <typename T, int K>
__global__ void mt_update_kernel(const mt_desc *D, int nd, const double *AV, int64_t items, double *part,
                                 mt_dec dec) {
  const int N = 16 / sizeof(T);
  KC_SHARED(double, sh, [32]);
  for (int64_t k = blockIdx.x; k < items; k += gridDim.x) {
    const mt_desc &d = D[mt_find(D, nd, k, 0)];
    int64_t b, e, u = mt_range(d, k, &b, &e);
    const oflags f = d.f;
    const kconsts<T> kc = kcast<T>(d.k);
    T *P = (T *)d.p, *S0 = (T *)d.s[0], *S1 = (T *)d.s[1], *S2 = (T *)d.s[2];
    const T *G = (const T *)d.g;
    T ca, lo, hi;
    double acc = 0, wq = 0;
    bool u0, u1, u2;
    uses<K>(f, &u0, &u1, &u2);
    mt_unit(d, AV, u, &ca, &lo, &hi);
    if (d.dk >= 0) {
      /* a decided step: skipped (every item alike), or this tensor's
      ** scale and bound as the decision kernel left them */
      if (dec.out[3] != 0) {
        if (threadIdx.x == 0) part[2 * k] = part[2 * k + 1] = 0;
        continue;
      }
      ca = (T)dec.a[d.dk];
      hi = (T)dec.v[d.dk];
      lo = -hi;
    }
    if (d.vec) {
      int64_t nv = (e - b) / N;
      for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
        int64_t i = b + j * N;
        kpack<T> p = *(const kpack<T> *)(P + i), g = *(const kpack<T> *)(G + i), s0, s1, s2;
        if (u0) s0 = *(const kpack<T> *)(S0 + i);
        if (u1) s1 = *(const kpack<T> *)(S1 + i);
        if (u2) s2 = *(const kpack<T> *)(S2 + i);
        for (int l = 0; l < N; l++) {
          acc += upd_elem<T, K>(p.x[l], g.x[l], s0.x[l], s1.x[l], s2.x[l], ca, lo, hi, kc, f);
          wq += (double)p.x[l] * (double)p.x[l];
        }
        *(kpack<T> *)(P + i) = p;
        if (u0) *(kpack<T> *)(S0 + i) = s0;
        if (u1) *(kpack<T> *)(S1 + i) = s1;
        if (u2) *(kpack<T> *)(S2 + i) = s2;
      }
    } else {
      for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
        T p = P[i], s0 = u0 ? S0[i] : (T)0, s1 = u1 ? S1[i] : (T)0, s2 = u2 ? S2[i] : (T)0;
        acc += upd_elem<T, K>(p, G[i], s0, s1, s2, ca, lo, hi, kc, f);
        wq += (double)p * (double)p;
        P[i] = p;
        if (u0) S0[i] = s0;
        if (u1) S1[i] = s1;
        if (u2) S2[i] = s2;
      }
    }
    acc = kc_block_sum(acc, sh);
    wq = kc_block_sum(wq, sh);
    if (threadIdx.x == 0) {
      part[2 * k] = acc;
      part[2 * k + 1] = wq;
    }
  }
}

/* Unit u's pair: its chunks' pairs in chunk order. */
__global__ void mt_pair_final_kernel(const mt_desc *D, int nd, int64_t units, const double *part, double *out) {
  KC_SHARED(double, sh, [32]);
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const mt_desc &d = D[mt_find(D, nd, u, 1)];
    int64_t base = d.item0 + (u - d.unit0) * d.nchunk;
    double x = 0, y = 0;
    for (int64_t c = threadIdx.x; c < d.nchunk; c += blockDim.x) {
      x += part[2 * (base + c)];
      y += part[2 * (base + c) + 1];
    }
    x = kc_block_sum(x, sh);
    y = kc_block_sum(y, sh);
    if (threadIdx.x == 0) {
      out[2 * u] = x;
      out[2 * u + 1] = y;
    }
  }
}

/* Only while deferring: s->pending exists. */
static int batch_get(kc_state *s, struct kc_batch **out) {
  struct kc_pending *P = s->pending;
  if (!P->batch && !(P->batch = (struct kc_batch *)calloc(1, sizeof *P->batch))) return KC_ERR_NOMEM;
  *out = P->batch;
  return KC_OK;
}

/* Room for one more call and for 2 * nunits factors. */
static int batch_room(struct kc_batch *B, int64_t nunits) {
  if (B->n == B->cap) {
    int cap = B->cap ? 2 * B->cap : 64;
    mt_call *c = (mt_call *)realloc(B->calls, sizeof *c * (size_t)cap);
    if (!c) return KC_ERR_NOMEM;
    B->calls = c;
    B->cap = cap;
  }
  if (B->nav + 2 * nunits > B->cap_av) {
    int64_t cap = B->cap_av ? 2 * B->cap_av : 1024;
    double *a;
    while (cap < B->nav + 2 * nunits) cap *= 2;
    if (!(a = (double *)realloc(B->av, sizeof *a * (size_t)cap))) return KC_ERR_NOMEM;
    B->av = a;
    B->cap_av = cap;
  }
  return KC_OK;
}

/* A new call of class (op, dtype, kind) with its chunking and factors
** (the engine's a and v are copied: they need not outlive the call). */
static int batch_add(kc_state *s, int op, int dtype, int kind, int64_t nunits, int64_t len, const double *a,
                     const double *v, mt_call **out) {
  struct kc_batch *B;
  mt_call *c;
  int64_t nc;
  int rc;
  if ((rc = batch_get(s, &B)) || (rc = batch_room(B, nunits))) return rc;
  c = &B->calls[B->n++];
  memset(c, 0, sizeof *c);
  c->op = op;
  c->dtype = dtype;
  c->kind = kind;
  c->nunits = nunits;
  c->d.len = len;
  nc = (len + MT_CHUNK - 1) / MT_CHUNK;
  c->d.clen = (((len + nc - 1) / nc) + 7) & ~(int64_t)7;
  c->d.nchunk = (len + c->d.clen - 1) / c->d.clen;
  c->d.a0 = a ? a[0] : 1.0;
  c->d.v0 = v ? v[0] : INFINITY;
  c->av = -1;
  c->d.dk = -1;
  if (nunits > 1 && (a || v)) {
    c->av = B->nav;
    c->has_a = a != NULL;
    c->has_v = v != NULL;
    if (a) memcpy(B->av + B->nav, a, sizeof(double) * (size_t)nunits);
    if (v) memcpy(B->av + B->nav + nunits, v, sizeof(double) * (size_t)nunits);
    B->nav += 2 * nunits;
  }
  *out = c;
  return KC_OK;
}

/* The classes, in launch order. */
#define MT_CLASSES 10
static int class_of(const mt_call *c) {
  int d = c->dtype == KEEL_F64;
  return c->op == MT_STATS ? d : 2 + 4 * d + c->kind;
}

/* Room for n bytes of upload in B->up (host memory: stage.cu's ring
** copies it into pinned memory and queues the copy). */
static int up_room(struct kc_batch *B, size_t n) {
  char *q;
  if (n <= B->up_cap) return KC_OK;
  n += n / 2;
  if (!(q = (char *)realloc(B->up, n))) return KC_ERR_NOMEM;
  B->up = q;
  B->up_cap = n;
  return KC_OK;
}

/* Launches the queued calls (see above); their results are queued for
** the host as pending records. The queue is empty afterwards, launched
** or not. */
static int batch_launch(kc_state *s) {
  struct kc_batch *B = s->pending ? s->pending->batch : NULL;
  int64_t items[MT_CLASSES] = {0}, units[MT_CLASSES] = {0}, maxch[MT_CLASSES] = {0};
  int first[MT_CLASSES], count[MT_CLASSES] = {0};
  size_t off_av, off_idx, up, off_work = 0, off_dec = 0, off_part[MT_CLASSES], off_res[MT_CLASSES], res0, total,
      nres, hoff;
  int64_t nt = B && B->has_dec ? B->dec.ntensors : 0;
  mt_desc *D;
  mt_call **order = NULL;
  char *dev, *host;
  int rc = KC_OK, n;
  if (!B || B->n == 0) return KC_OK;
  n = B->n;
  if (!(order = (mt_call **)malloc(sizeof *order * (size_t)n))) {
    rc = KC_ERR_NOMEM;
    goto out;
  }
  /* descriptors grouped by class, queue order within a class */
  for (int i = 0; i < n; i++) count[class_of(&B->calls[i])]++;
  for (int c = 0, k = 0; c < MT_CLASSES; c++) {
    first[c] = k;
    k += count[c];
    count[c] = 0;
  }
  for (int i = 0; i < n; i++) {
    mt_call *c = &B->calls[i];
    int cl = class_of(c);
    order[first[cl] + count[cl]++] = c;
    c->d.item0 = items[cl];
    c->d.unit0 = units[cl];
    c->d.ia = c->has_a ? c->av : -1;
    c->d.iv = c->has_v ? c->av + c->nunits : -1;
    items[cl] += c->nunits * c->d.nchunk;
    units[cl] += c->nunits;
    if (c->d.nchunk > maxch[cl]) maxch[cl] = c->d.nchunk;
  }
  /* device layout: descriptors, a/v, then per class partials; the unit
  ** results of all classes together at the end (one copy down) */
  off_av = (size_t)kc_align256((int64_t)(sizeof(mt_desc) * (size_t)n));
  /* a decided step: where each tensor's statistics land (in gstat
  ** records from the first statistics class's results), uploaded with the
  ** descriptors; the decision's work space; its record with the results */
  off_idx = off_av + (size_t)kc_align256(B->nav * (int64_t)sizeof(double));
  up = off_idx + (size_t)nt * sizeof(int64_t);
  total = (size_t)kc_align256((int64_t)up);
  if (nt) {
    off_work = total;
    total += (size_t)kc_align256(5 * nt * (int64_t)sizeof(double));
  }
  for (int c = 0; c < MT_CLASSES; c++) {
    off_part[c] = total;
    total += (size_t)kc_align256(items[c] * (int64_t)(c < 2 ? sizeof(gstat) : 2 * sizeof(double)));
  }
  res0 = total;
  for (int c = 0; c < MT_CLASSES; c++) {
    off_res[c] = total;
    total += (size_t)units[c] * (c < 2 ? sizeof(gstat) : 2 * sizeof(double));
  }
  if (nt) {
    off_dec = total;
    total += 5 * sizeof(double);
  }
  nres = total - res0;
  if (nt && (B->multi_unit || B->nstats != nt || B->ndecided != nt)) {
    rc = KC_ERR_ARG;   /* decide's contract: one unit per tensor, every tensor updated */
    goto out;
  }
  if ((rc = kc_grow(s, &B->dev, &B->dev_size, total, 0)) || (rc = up_room(B, up))) goto out;
  dev = (char *)B->dev;
  host = B->up;
  D = (mt_desc *)host;
  for (int i = 0; i < n; i++) D[i] = order[i]->d;
  memcpy(host + off_av, B->av, (size_t)B->nav * sizeof(double));
  if (nt) {
    int64_t *idx = (int64_t *)(host + off_idx), j = 0;
    for (int i = 0; i < B->n; i++) {
      const mt_call *c = &B->calls[i];
      if (c->op == MT_STATS)
        idx[j++] = (int64_t)((off_res[class_of(c)] - off_res[0]) / sizeof(gstat)) + c->d.unit0;
    }
  }
  /* one upload through the pinned ring: B->up is free again on return */
  if ((rc = kc_stage_h2d(s, dev, host, up))) goto out;
  for (int c = 0; c < MT_CLASSES; c++) {
    const mt_desc *dd = (const mt_desc *)dev + first[c];
    const double *av = (const double *)(dev + off_av);
    unsigned nb = kc_grid_x(items[c]), nf = kc_grid_x(units[c]);
    int th = maxch[c] <= 32 ? 32 : KC_THREADS;
    if (c == 2 && nt) {
      /* the statistics are in: the decision, before any update reads it */
      KC_LAUNCH(1, KC_THREADS, 0, s->stream, mt_decide_kernel)((const gstat *)(dev + off_res[0]),
                                                       (const int64_t *)(dev + off_idx), B->dec,
                                                       (double *)(dev + off_work), (double *)(dev + off_dec));
      if ((rc = KC_LAUNCHED())) goto out;
    }
    if (!count[c]) continue;
    if (c < 2) {
      gstat *part = (gstat *)(dev + off_part[c]), *res = (gstat *)(dev + off_res[c]);
      if (c == 0) KC_LAUNCH(nb, KC_THREADS, 0, s->stream, mt_stats_kernel<float>)(dd, count[c], av, items[c], part);
      else KC_LAUNCH(nb, KC_THREADS, 0, s->stream, mt_stats_kernel<double>)(dd, count[c], av, items[c], part);
      if ((rc = KC_LAUNCHED())) goto out;
      KC_LAUNCH(nf, th, 0, s->stream, mt_stats_final_kernel)(dd, count[c], units[c], part, res);
    } else {
      double *part = (double *)(dev + off_part[c]), *res = (double *)(dev + off_res[c]);
      mt_dec md;
      md.a = (const double *)(dev + off_work);
      md.v = md.a + nt;
      md.out = (const double *)(dev + off_dec);
      switch (c - 2) {
#define MT_UPD(i, T, K) \
  case i: KC_LAUNCH(nb, KC_THREADS, 0, s->stream, mt_update_kernel<T, K>)(dd, count[c], av, items[c], part, md); break
        MT_UPD(0, float, UK_SGD); MT_UPD(1, float, UK_ADAM); MT_UPD(2, float, UK_RMSPROP); MT_UPD(3, float, UK_ADAGRAD);
        MT_UPD(4, double, UK_SGD); MT_UPD(5, double, UK_ADAM); MT_UPD(6, double, UK_RMSPROP);
        MT_UPD(7, double, UK_ADAGRAD);
#undef MT_UPD
      }
      if ((rc = KC_LAUNCHED())) goto out;
      KC_LAUNCH(nf, th, 0, s->stream, mt_pair_final_kernel)(dd, count[c], units[c], part, res);
    }
    if ((rc = KC_LAUNCHED())) goto out;
  }
  /* one copy of every unit result, then a record per call */
  if ((rc = pend_region(s, nres, &hoff))) goto out;
  host = s->pending->arena + hoff;
  if ((rc = kc_check_cuda(cudaMemcpyAsync(host, dev + res0, nres, cudaMemcpyDeviceToHost, s->stream))) ||
      (rc = pend_mark(s)))
    goto out;
  if (nt) {
    pend_rec *r;
    if ((rc = pend_record(s, &r))) goto out;
    r->kind = PEND_DEC;
    r->off = hoff + (off_dec - res0);
    r->dec = B->dec_out;
  }
  for (int i = 0; i < n && !rc; i++) {
    const mt_call *c = order[i];
    int cl = class_of(c);
    pend_rec *r;
    if ((rc = pend_record(s, &r))) break;
    r->nunits = c->nunits;
    r->len = c->d.len;
    if (c->op == MT_STATS) {
      r->kind = PEND_STATS;
      r->off = hoff + (off_res[cl] - res0) + (size_t)c->d.unit0 * sizeof(gstat);
      r->has_w = c->d.w != NULL;
      r->st = c->st;
      r->spow = c->spow;
    } else {
      r->kind = PEND_UPD;
      r->off = hoff + (off_res[cl] - res0) + (size_t)c->d.unit0 * 2 * sizeof(double);
      r->dsq = c->dsq;
      r->wsq = c->wsq;
    }
  }
out:
  free(order);
  B->n = 0;
  B->nav = 0;
  B->has_dec = B->multi_unit = 0;
  B->nstats = B->ndecided = 0;
  return rc;
}

static void batch_free(struct kc_batch *B) {
  if (!B) return;
  if (B->dev) cudaFree(B->dev);
  free(B->up);
  free(B->calls);
  free(B->av);
  free(B);
}

/* }====================================================================== */

static int queue_stats(kc_state *s, const kc_view *g, int64_t nunits, int64_t len, const double *a, const double *v,
                       double pw, keel_grad_stats *st, double *spow, const kc_view *w) {
  int64_t N = 16 / (g->dtype == KEEL_F32 ? 4 : 8);
  mt_call *c;
  int rc;
  if ((rc = batch_add(s, MT_STATS, g->dtype, 0, nunits, len, a, v, &c))) return rc;
  c->d.g = g->data;
  c->d.w = w ? w->data : NULL;
  c->d.pw = spow ? pw : 0;
  c->d.vec = len % N == 0 && kc_aligned16(g->data) && (!w || kc_aligned16(w->data));
  c->st = st;
  c->spow = spow;
  s->pending->batch->nstats++;
  if (nunits != 1 || a || v) s->pending->batch->multi_unit = 1;
  return KC_OK;
}

static int queue_update(kc_state *s, int kind, const keel_optim_hparams *h, int64_t step, int dtype,
                        const upd_args *A, const oflags *f, int64_t nunits, int64_t len, const double *a,
                        const double *v, double *dsq, double *wsq) {
  int uk = kind == KEEL_OPTIM_SGD ? UK_SGD : kind == KEEL_OPTIM_RMSPROP ? UK_RMSPROP
           : kind == KEEL_OPTIM_ADAGRAD ? UK_ADAGRAD : UK_ADAM;
  struct kc_batch *B;
  mt_call *c;
  int rc;
  if ((rc = batch_get(s, &B))) return rc;
  /* after decide, the i-th update is tensor i's: one unit, a and v from the device */
  if (B->has_dec && (B->ndecided >= B->dec.ntensors || nunits != 1 || a || v)) return KC_ERR_ARG;
  if ((rc = batch_add(s, MT_UPDATE, dtype, uk, nunits, len, a, v, &c))) return rc;
  c->d.g = A->g;
  c->d.p = A->p;
  for (int j = 0; j < 3; j++) c->d.s[j] = A->s[j];
  c->d.vec = A->vec;
  c->d.f = *f;
  fill_consts(&c->d.k, h, step);
  c->dsq = dsq;
  c->wsq = wsq;
  if (B->has_dec) c->d.dk = B->ndecided++;
  return KC_OK;
}

/* The queued calls launched, whatever the mode; errors of earlier
** flushes first (they were not reported to anyone). */
static int batch_close(kc_state *s) {
  struct kc_pending *P = s->pending;
  int rc = batch_launch(s), err = P->err;
  P->err = KC_OK;
  return err ? err : rc;
}

static int defer_results(kc_state *s, int mode) {
  struct kc_pending *P;
  int rc;
  if (mode < KC_DEFER_WAIT || mode > KC_DEFER_FLUSH) return KC_ERR_ARG;
  if (!s->pending) {
    if (mode != KC_DEFER_ON) return KC_OK;
    if (!(s->pending = (struct kc_pending *)calloc(1, sizeof *s->pending))) return KC_ERR_NOMEM;
  }
  P = s->pending;
  switch (mode) {
    case KC_DEFER_ON:
      /* results of a batch closed with LATER stay pending: the closing
      ** wait of this one writes them too (their places are still valid:
      ** the contract), so a step waits once */
      if (P->on && (rc = batch_close(s))) return rc;
      P->on = 1;
      return KC_OK;
    case KC_DEFER_FLUSH:
      /* something other than grad_stats or optim_update is about to run:
      ** what is queued goes first, so that stream order is call order */
      if (P->on && (rc = batch_launch(s)) && !P->err) P->err = rc;
      return KC_OK;
    case KC_DEFER_LATER:
      P->on = 0;
      return batch_close(s);
    default:
      P->on = 0;
      rc = batch_close(s);
      if (rc) {
        pend_flush(s);
        return rc;
      }
      return pend_flush(s);
  }
}

static int decide(kc_state *s, const kc_decide *q, kc_decision *out) {
  struct kc_batch *B;
  int rc;
  if (!q || !out || q->nitems < 0 || q->nitems > KC_DECIDE_MAX || q->ntensors < 1) return KC_ERR_ARG;
  for (int i = 0; i < q->nitems; i++)
    if (q->kind[i] < KC_DECIDE_VALUE || q->kind[i] > KC_DECIDE_GLOBAL_NORM) return KC_ERR_ARG;
  if (!deferring(s)) return KC_ERR_ARG;   /* only inside a batch, after its statistics */
  if ((rc = batch_get(s, &B))) return rc;
  if (B->has_dec || B->nstats != q->ntensors || B->multi_unit) return KC_ERR_ARG;
  B->has_dec = 1;
  B->dec = *q;
  B->dec_out = out;
  B->ndecided = 0;
  return KC_OK;
}

static int results_ready(kc_state *s) {
  struct kc_pending *P = s->pending;
  cudaError_t e;
  if (!P || P->n == 0) return 1;
  if (P->on || !P->copied) return 0;   /* an open batch: results_wait launches it */
  e = cudaEventQuery(P->copied);
  if (e == cudaErrorNotReady) {
    (void)cudaGetLastError();   /* not an error: clear it */
    return 0;
  }
  if (e != cudaSuccess) {
    /* not ready as far as this says: results_wait, which follows, syncs
    ** and reports the error (a CUDA code here would read as "ready") */
    (void)kc_check_cuda(e);
    return 0;
  }
  pend_write(s);
  return 1;
}

static int results_wait(kc_state *s) {
  struct kc_pending *P = s->pending;
  int rc;
  if (!P) return KC_OK;
  if (P->on && (rc = batch_launch(s)) && !P->err) P->err = rc;
  return pend_flush(s);
}

void kc_optim_flush(kc_state *s) { defer_results(s, KC_DEFER_FLUSH); }

void kc_optim_close(kc_state *s) {
  struct kc_pending *P = s->pending;
  if (!P) return;
  batch_free(P->batch);
  if (P->copied) cudaEventDestroy(P->copied);
  if (P->arena) cudaFreeHost(P->arena);
  free(P->recs);
  free(P);
  s->pending = NULL;
}

/* }====================================================================== */

void kc_register_optim(keel_cuda_table *t) {
  t->grad_stats = grad_stats;
  t->grad_scale_ = grad_scale_;
  t->optim_update = optim_update;
  t->defer_results = defer_results;
  t->results_wait = results_wait;
  t->decide = decide;
  t->results_ready = results_ready;
}
