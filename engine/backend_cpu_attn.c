/*
** backend_cpu_attn.c: the CPU kernels of fused scaled-dot-product
** attention (engine/attention.c has the op; kl_sdpa_args in keel_impl.h
** the layouts). This file is the specification kernels/attention.cu
** follows.
**
** Forward walks a tile of query rows against tiles of keys: one GEMM
** gives the tile's scores, an online softmax keeps each row's running
** maximum m and sum l (in double), rescales the output rows already
** accumulated when m grows, and a second GEMM adds the tile's weights
** times its values. Only out and the row logsumexp m + log l survive.
**
** Backward recomputes each tile's weights from the logsumexp, P =
** exp(s - lse), and runs the flash-attention recurrence with
**   D_i = sum_d dO_id O_id,  dS = P * (dP - D),  dP = dO V^T (dropped),
** as five GEMMs per tile pair (S, dV, dP, dQ, dK), accumulating dQ, dK and
** dV in place. Nothing the size of the score matrix is ever allocated.
**
** Every product goes through kl_cpu_gemm, so a reduced matmul precision
** rounds its float32 operands as matmul's do: q and k for the scores, the
** (dropped) weights and v for the output, and likewise in backward (the
** weights' gradient is scaled before it is rounded).
**
** A fully masked row (every score -inf) has l == 0: its output is NaN
** (softmax of nothing, as the composed softmax gives) and its lse -inf;
** backward treats its weights and their gradients as 0, so the NaN
** reaches no other row and no key.
*/
#include <math.h>
#include <string.h>
#include "keel_impl.h"

/* Tile sizes: BQ query rows against BK keys; a score tile is BQ*BK. */
#define BQ 64
#define BK 128

/* {======================================================================
** The dropout mask: counter-based, as kernels/norm.cu's dropout
** ======================================================================= */

static uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* The seed goes through the mixer once (nearby seeds give unrelated
** masks), then element idx takes the idx-th step of a splitmix64 stream:
** 53 bits as a uniform in [0, 1), dropped below p. */
int kl_sdpa_drop(uint64_t seed, uint64_t idx, double p) {
  uint64_t key = mix64(seed ^ 0x8CB92BA72F3D8DD7ull);
  uint64_t z = mix64(key + (idx + 1) * 0x9E3779B97F4A7C15ull);
  return (double)(z >> 11) * (1.0 / 9007199254740992.0) < p;
}

/* }====================================================================== */

/* {======================================================================
** Shared pieces
** ======================================================================= */

/* Element access by dtype; called with a constant f64 so that the
** compiler makes one loop per dtype. */
static inline double ld(const void *p, int64_t i, int f64) {
  return f64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
/* float32 takes expf: double exp costs several times more per weight */
static inline double exp_(double x, int f64) { return f64 ? exp(x) : (double)expf((float)x); }
static inline void st(void *p, int64_t i, double v, int f64) {
  if (f64) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}

typedef struct tile_ctx {
  const kl_sdpa_args *a;
  int f64;
  size_t es;                    /* element size */
  const char *bias;             /* element (0, 0) of batch b's bias, or NULL */
  int64_t brs, bcs;             /* bias row and column strides */
  double keep;                  /* 1/(1-p): a kept weight's scale */
} tile_ctx;

/* The offset of batch b's [L, S] plane of the bias view (leading dims
** unravelled over its shape, broadcast ones with stride 0). */
static int64_t bias_offset(const keel_tensor *bias, int64_t b) {
  int64_t off = 0;
  for (int d = bias->ndim - 3; d >= 0; d--) {
    int64_t q = b / bias->shape[d];
    off += (b - q * bias->shape[d]) * bias->stride[d];
    b = q;
  }
  return off;
}

static void tile_batch(tile_ctx *t, int64_t b) {
  const keel_tensor *bias = t->a->bias;
  t->bias = NULL;
  if (!bias) return;
  t->bias = (const char *)kl_data(bias) + bias_offset(bias, b) * (int64_t)t->es;
  t->brs = bias->stride[bias->ndim - 2];
  t->bcs = bias->stride[bias->ndim - 1];
}

/* The score of (i, j) from its product qk: scaled, biased, masked. */
static inline double score(const tile_ctx *t, double qk, int64_t i, int64_t j) {
  double s = qk * t->a->scale;
  if (t->a->causal && j > i) return -INFINITY;
  if (t->bias) s += ld(t->bias, i * t->brs + j * t->bcs, t->f64);
  return s;
}

/* The dropout scale of weight (b, i, j): 0 or 1/(1-p). */
static inline double keep_of(const tile_ctx *t, int64_t b, int64_t i, int64_t j) {
  const kl_sdpa_args *a = t->a;
  if (a->p <= 0) return 1;
  return kl_sdpa_drop(a->seed, (uint64_t)((b * a->L + i) * a->S + j), a->p) ? 0 : t->keep;
}

/* The last key a tile of rows [i0, i1) sees, plus one. */
static int64_t key_end(const kl_sdpa_args *a, int64_t i1) {
  if (a->causal && i1 < a->S) return i1;
  return a->S;
}

/* }====================================================================== */

/* {======================================================================
** Forward
** ======================================================================= */

/* Rows [i0, i0+nr) of batch b: st is the score tile, o the output rows
** (dense [nr, Ev]), m and l the running statistics. */
static inline keel_status fwd_rows(keel_ctx *ctx, tile_ctx *t, int64_t b, int64_t i0, int64_t nr, void *sc,
                                   double *m, double *l, int f64) {
  const kl_sdpa_args *a = t->a;
  size_t es = t->es;
  int64_t E = a->E, Ev = a->Ev, S = a->S;
  const char *q = (const char *)kl_data(a->q) + (b * a->L + i0) * E * (int64_t)es;
  const char *k = (const char *)kl_data(a->k) + b * S * E * (int64_t)es;
  const char *v = (const char *)kl_data(a->v) + b * S * Ev * (int64_t)es;
  char *o = (char *)kl_data(a->out) + (b * a->L + i0) * Ev * (int64_t)es;
  int64_t jend = key_end(a, i0 + nr);
  keel_status s;
  memset(o, 0, (size_t)(nr * Ev) * es);
  for (int64_t r = 0; r < nr; r++) { m[r] = -INFINITY; l[r] = 0; }
  for (int64_t j0 = 0; j0 < jend; j0 += BK) {
    int64_t nj = jend - j0 < BK ? jend - j0 : BK;
    if ((s = kl_cpu_gemm(ctx, a->q->dtype, 0, 1, nr, nj, E, q, E, k + j0 * E * (int64_t)es, E, 0.0, sc, nj)))
      return s;
    for (int64_t r = 0; r < nr; r++) {
      int64_t i = i0 + r;
      double mt = -INFINITY, mn, alpha, sum = 0;
      for (int64_t c = 0; c < nj; c++) {
        double x = score(t, ld(sc, r * nj + c, f64), i, j0 + c);
        st(sc, r * nj + c, x, f64);
        if (x > mt) mt = x;
      }
      mn = mt > m[r] ? mt : m[r];
      if (mn == -INFINITY) {    /* nothing seen yet: weights 0, nothing to rescale */
        for (int64_t c = 0; c < nj; c++) st(sc, r * nj + c, 0, f64);
        continue;
      }
      alpha = exp_(m[r] - mn, f64);   /* 0 when m was -inf */
      for (int64_t c = 0; c < nj; c++) {
        double p = exp_(ld(sc, r * nj + c, f64) - mn, f64);
        sum += p;
        st(sc, r * nj + c, p * keep_of(t, b, i, j0 + c), f64);
      }
      l[r] = l[r] * alpha + sum;
      m[r] = mn;
      if (alpha != 1)
        for (int64_t d = 0; d < Ev; d++) st(o, r * Ev + d, ld(o, r * Ev + d, f64) * alpha, f64);
    }
    if ((s = kl_cpu_gemm(ctx, a->q->dtype, 0, 0, nr, Ev, nj, sc, nj, v + j0 * Ev * (int64_t)es, Ev, 1.0, o, Ev)))
      return s;
  }
  for (int64_t r = 0; r < nr; r++) {
    int64_t row = b * a->L + i0 + r;
    if (l[r] == 0) {
      for (int64_t d = 0; d < Ev; d++) st(o, r * Ev + d, NAN, f64);
      st(kl_data(a->lse), row, -INFINITY, f64);
      continue;
    }
    for (int64_t d = 0; d < Ev; d++) st(o, r * Ev + d, ld(o, r * Ev + d, f64) / l[r], f64);
    st(kl_data(a->lse), row, m[r] + log(l[r]), f64);
  }
  return KEEL_OK;
}

keel_status kl_cpu_sdpa_forward(keel_ctx *ctx, const kl_sdpa_args *a) {
  tile_ctx t;
  size_t sc_bytes;
  void *sc;
  double ml[2 * BQ];
  keel_status s = KEEL_OK;
  int f64 = a->q->dtype == KEEL_F64;
  t.a = a;
  t.f64 = f64;
  t.es = kl_dtype_size[a->q->dtype];
  t.keep = a->p < 1 ? 1.0 / (1.0 - a->p) : 0.0;
  sc_bytes = t.es * BQ * BK;
  if (!(sc = kl_cpu_alloc(ctx, sc_bytes))) return kl_error(ctx, KEEL_ERR_NOMEM, "scaled_dot_product_attention: out of memory");
  for (int64_t b = 0; b < a->B && !s; b++) {
    tile_batch(&t, b);
    for (int64_t i0 = 0; i0 < a->L && !s; i0 += BQ) {
      int64_t nr = a->L - i0 < BQ ? a->L - i0 : BQ;
      s = f64 ? fwd_rows(ctx, &t, b, i0, nr, sc, ml, ml + BQ, 1) : fwd_rows(ctx, &t, b, i0, nr, sc, ml, ml + BQ, 0);
    }
  }
  kl_cpu_free(ctx, sc, sc_bytes);
  return s;
}

/* }====================================================================== */

/* {======================================================================
** Backward
** ======================================================================= */

typedef struct bwd_bufs {
  void *p, *pd, *ds;            /* tiles: weights, dropped weights, dP then dS */
  double D[BQ];
} bwd_bufs;

static inline keel_status bwd_rows(keel_ctx *ctx, tile_ctx *t, int64_t b, int64_t i0, int64_t nr, bwd_bufs *w,
                                   int f64) {
  const kl_sdpa_args *a = t->a;
  keel_dtype dt = a->q->dtype;
  int64_t es = (int64_t)t->es, E = a->E, Ev = a->Ev, S = a->S, L = a->L;
  const char *q = (const char *)kl_data(a->q) + (b * L + i0) * E * es;
  const char *k = (const char *)kl_data(a->k) + b * S * E * es;
  const char *v = (const char *)kl_data(a->v) + b * S * Ev * es;
  const char *o = (const char *)kl_data(a->out) + (b * L + i0) * Ev * es;
  const char *go = (const char *)kl_data(a->gout) + (b * L + i0) * Ev * es;
  const void *lse = kl_data(a->lse);
  char *dq = a->dq ? (char *)kl_data(a->dq) + (b * L + i0) * E * es : NULL;
  char *dk = a->dk ? (char *)kl_data(a->dk) + b * S * E * es : NULL;
  char *dv = a->dv ? (char *)kl_data(a->dv) + b * S * Ev * es : NULL;
  char *db = a->dbias ? (char *)kl_data(a->dbias) + (b * L + i0) * S * es : NULL;
  int64_t jend = key_end(a, i0 + nr);
  keel_status s;
  for (int64_t r = 0; r < nr; r++) {
    double d = 0;
    for (int64_t c = 0; c < Ev; c++) d += ld(go, r * Ev + c, f64) * ld(o, r * Ev + c, f64);
    w->D[r] = d;
  }
  /* the keys a causal tile skips get no gradient from it */
  if (db && jend < S)
    for (int64_t r = 0; r < nr; r++)
      for (int64_t j = jend; j < S; j++) st(db, r * S + j, 0, f64);
  for (int64_t j0 = 0; j0 < jend; j0 += BK) {
    int64_t nj = jend - j0 < BK ? jend - j0 : BK;
    if ((s = kl_cpu_gemm(ctx, dt, 0, 1, nr, nj, E, q, E, k + j0 * E * es, E, 0.0, w->p, nj))) return s;
    for (int64_t r = 0; r < nr; r++) {
      int64_t i = i0 + r;
      double m = ld(lse, b * L + i, f64);
      for (int64_t c = 0; c < nj; c++) {
        double p = m == -INFINITY ? 0 : exp_(score(t, ld(w->p, r * nj + c, f64), i, j0 + c) - m, f64);
        st(w->p, r * nj + c, p, f64);
        st(w->pd, r * nj + c, p * keep_of(t, b, i, j0 + c), f64);
      }
    }
    /* dV_j += Pd^T dO */
    if (dv && (s = kl_cpu_gemm(ctx, dt, 1, 0, nj, Ev, nr, w->pd, nj, go, Ev, 1.0, dv + j0 * Ev * es, Ev))) return s;
    if (!dq && !dk && !db) continue;
    /* dP = (dO V_j^T) * keep, dS = P (dP - D) */
    if ((s = kl_cpu_gemm(ctx, dt, 0, 1, nr, nj, Ev, go, Ev, v + j0 * Ev * es, Ev, 0.0, w->ds, nj))) return s;
    for (int64_t r = 0; r < nr; r++) {
      int64_t i = i0 + r;
      for (int64_t c = 0; c < nj; c++) {
        double p = ld(w->p, r * nj + c, f64), g = 0;
        /* p == 0: masked, or a fully masked row (whose D is NaN) */
        if (p != 0) g = p * (ld(w->ds, r * nj + c, f64) * keep_of(t, b, i, j0 + c) - w->D[r]);
        if (db) st(db, r * S + j0 + c, g, f64);
        st(w->ds, r * nj + c, g * a->scale, f64);
      }
    }
    if (dq && (s = kl_cpu_gemm(ctx, dt, 0, 0, nr, E, nj, w->ds, nj, k + j0 * E * es, E, 1.0, dq, E))) return s;
    if (dk && (s = kl_cpu_gemm(ctx, dt, 1, 0, nj, E, nr, w->ds, nj, q, E, 1.0, dk + j0 * E * es, E))) return s;
  }
  return KEEL_OK;
}

keel_status kl_cpu_sdpa_backward(keel_ctx *ctx, const kl_sdpa_args *a) {
  tile_ctx t;
  bwd_bufs w;
  size_t tb;
  keel_status s = KEEL_OK;
  int f64 = a->q->dtype == KEEL_F64;
  t.a = a;
  t.f64 = f64;
  t.es = kl_dtype_size[a->q->dtype];
  t.keep = a->p < 1 ? 1.0 / (1.0 - a->p) : 0.0;
  tb = t.es * BQ * BK;
  w.p = kl_cpu_alloc(ctx, tb);
  w.pd = kl_cpu_alloc(ctx, tb);
  w.ds = kl_cpu_alloc(ctx, tb);
  if (!w.p || !w.pd || !w.ds) {
    s = kl_error(ctx, KEEL_ERR_NOMEM, "scaled_dot_product_attention backward: out of memory");
    goto done;
  }
  if (a->dq) memset(kl_data(a->dq), 0, t.es * (size_t)a->dq->numel);
  if (a->dk) memset(kl_data(a->dk), 0, t.es * (size_t)a->dk->numel);
  if (a->dv) memset(kl_data(a->dv), 0, t.es * (size_t)a->dv->numel);
  for (int64_t b = 0; b < a->B && !s; b++) {
    tile_batch(&t, b);
    for (int64_t i0 = 0; i0 < a->L && !s; i0 += BQ) {
      int64_t nr = a->L - i0 < BQ ? a->L - i0 : BQ;
      s = f64 ? bwd_rows(ctx, &t, b, i0, nr, &w, 1) : bwd_rows(ctx, &t, b, i0, nr, &w, 0);
    }
  }
done:
  if (w.p) kl_cpu_free(ctx, w.p, tb);
  if (w.pd) kl_cpu_free(ctx, w.pd, tb);
  if (w.ds) kl_cpu_free(ctx, w.ds, tb);
  return s;
}

/* }====================================================================== */
