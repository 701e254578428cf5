/*
** backend_cpu_norm.c: CPU kernels of norm.c: normalisation statistics,
** normalisation forward and its fused backward, dropout masks and
** embedding rows.
**
** The normalisation kernels see x as [N, C, L] (contiguous). Elements are
** converted to double a block at a time, so the math is written once for
** float32 and float64, accumulates in double, and always sums in the same
** order: results do not depend on alignment or threads.
*/
#include <math.h>
#include <string.h>
#include "keel_impl.h"

#define BLOCK 1024

static void load(double *dst, const keel_tensor *t, int64_t off, int64_t n) {
  if (t->dtype == KEEL_F32) {
    const float *s = (const float *)kl_data(t) + off;
    for (int64_t i = 0; i < n; i++) dst[i] = s[i];
  } else {
    memcpy(dst, (const double *)kl_data(t) + off, sizeof(double) * (size_t)n);
  }
}

static void store(keel_tensor *t, int64_t off, const double *src, int64_t n) {
  if (t->dtype == KEEL_F32) {
    float *d = (float *)kl_data(t) + off;
    for (int64_t i = 0; i < n; i++) d[i] = (float)src[i];
  } else {
    memcpy((double *)kl_data(t) + off, src, sizeof(double) * (size_t)n);
  }
}

/* n doubles of scratch, each set to v. */
static double *scratch(keel_ctx *ctx, int64_t n, double v) {
  double *p = (double *)kl_malloc(ctx, sizeof(double) * (size_t)(n > 0 ? n : 1));
  if (p) for (int64_t i = 0; i < n; i++) p[i] = v;
  return p;
}

static void scratch_free(keel_ctx *ctx, double *p, int64_t n) {
  kl_free(ctx, p, sizeof(double) * (size_t)(n > 0 ? n : 1));
}

/* The values of t ([n] entries) as scratch, or n copies of dflt when t is
** NULL. */
static double *scratch_of(keel_ctx *ctx, const keel_tensor *t, int64_t n, double dflt) {
  double *p = scratch(ctx, n, dflt);
  if (p && t) load(p, t, 0, n);
  return p;
}

/* {======================================================================
** Walking [N, C, L] in runs that share one statistic
**
** A run is a stretch of consecutive elements with one statistics index s.
** Usually it also has one channel c (a piece of one (n, c) row of L). When
** L == 1 and statistics are per group (layer norm, group norm of [N, C]),
** a run spans the channels of one group instead, so the channel steps
** along the run (chan_step 1): otherwise every element would be a run.
** ======================================================================= */

typedef struct walk {
  int64_t C, L, Cg, groups;
  int chan_step;        /* 1: the channel advances with each element of a run */
  int64_t n, c, l;      /* position of the next element */
  int64_t g, cg;        /* its group, and channel within the group */
} walk;

static void walk_init(walk *w, const keel_tensor *x, int64_t groups) {
  w->C = x->shape[1];
  w->L = x->shape[2];
  w->groups = groups;
  w->Cg = groups ? w->C / groups : 0;
  w->chan_step = groups && w->L == 1;
  w->n = w->c = w->l = w->g = w->cg = 0;
}

/* Length of the run starting at the current position, at most left. */
static int64_t walk_run(const walk *w, int64_t left) {
  int64_t r = w->chan_step ? w->Cg - w->cg : w->L - w->l;
  return r < left ? r : left;
}

/* Statistics index of the current run. */
static int64_t walk_stat(const walk *w) {
  return w->groups ? w->n * w->groups + w->g : w->c;
}

static void next_channel(walk *w, int64_t k) {
  w->c += k;
  if (w->groups && (w->cg += k) == w->Cg) { w->cg = 0; w->g++; }
  if (w->c == w->C) { w->c = 0; w->g = 0; w->n++; }
}

static void walk_advance(walk *w, int64_t k) {
  if (w->chan_step) {
    next_channel(w, k);
  } else if ((w->l += k) == w->L) {
    w->l = 0;
    next_channel(w, 1);
  }
}

/* Number of statistics, and of elements behind each. */
static void stat_shape(const keel_tensor *x, int64_t groups, int64_t *S, double *m) {
  int64_t N = x->shape[0], C = x->shape[1], L = x->shape[2];
  *S = groups ? N * groups : C;
  *m = groups ? (double)(C / groups * L) : (double)(N * L);
}

/* }====================================================================== */

/* {======================================================================
** Normalisation
** ======================================================================= */

keel_status kl_cpu_norm_stats(keel_ctx *ctx, keel_tensor *mean, keel_tensor *rstd, keel_tensor *var,
                              const keel_tensor *x, int64_t groups, double eps) {
  int64_t S, total = x->numel;
  double m, buf[BLOCK], *sum, *sq;
  walk w;
  stat_shape(x, groups, &S, &m);
  sum = scratch(ctx, S, 0.0);
  sq = scratch(ctx, S, 0.0);
  if (!sum || !sq) {
    scratch_free(ctx, sum, S);
    scratch_free(ctx, sq, S);
    return kl_error(ctx, KEEL_ERR_NOMEM, "norm: out of memory");
  }
  /* two passes (mean, then squared deviations): no cancellation */
  for (int pass = 0; pass < 2; pass++) {
    walk_init(&w, x, groups);
    for (int64_t off = 0; off < total; off += BLOCK) {
      int64_t len = total - off < BLOCK ? total - off : BLOCK;
      load(buf, x, off, len);
      for (int64_t j = 0; j < len;) {
        int64_t run = walk_run(&w, len - j), s = walk_stat(&w);
        double acc = 0;
        if (pass == 0) {
          for (int64_t k = 0; k < run; k++) acc += buf[j + k];
          sum[s] += acc;
        } else {
          double mu = sum[s];
          for (int64_t k = 0; k < run; k++) acc += (buf[j + k] - mu) * (buf[j + k] - mu);
          sq[s] += acc;
        }
        j += run;
        walk_advance(&w, run);
      }
    }
    if (pass == 0)
      for (int64_t s = 0; s < S; s++) sum[s] /= m;
  }
  for (int64_t s = 0; s < S; s++) sq[s] /= m;             /* biased variance */
  if (var) store(var, 0, sq, S);
  for (int64_t s = 0; s < S; s++) sq[s] = 1.0 / sqrt(sq[s] + eps);
  store(mean, 0, sum, S);
  store(rstd, 0, sq, S);
  scratch_free(ctx, sum, S);
  scratch_free(ctx, sq, S);
  return KEEL_OK;
}

keel_status kl_cpu_norm_forward(keel_ctx *ctx, keel_tensor *y, const keel_tensor *x, const keel_tensor *mean,
                                const keel_tensor *rstd, const keel_tensor *weight, const keel_tensor *bias,
                                int64_t groups) {
  int64_t S, C = x->shape[1], total = x->numel;
  double m, buf[BLOCK], *mu, *r, *wv, *bv;
  keel_status st = KEEL_OK;
  walk w;
  stat_shape(x, groups, &S, &m);
  mu = scratch_of(ctx, mean, S, 0.0);
  r = scratch_of(ctx, rstd, S, 1.0);
  wv = scratch_of(ctx, weight, C, 1.0);
  bv = scratch_of(ctx, bias, C, 0.0);
  if (!mu || !r || !wv || !bv) { st = kl_error(ctx, KEEL_ERR_NOMEM, "norm: out of memory"); goto done; }
  walk_init(&w, x, groups);
  for (int64_t off = 0; off < total; off += BLOCK) {
    int64_t len = total - off < BLOCK ? total - off : BLOCK;
    load(buf, x, off, len);
    for (int64_t j = 0; j < len;) {
      int64_t run = walk_run(&w, len - j), s = walk_stat(&w);
      double u = mu[s], rs = r[s];
      const double *wc = wv + w.c, *bc = bv + w.c;
      if (w.chan_step) {
        for (int64_t k = 0; k < run; k++) buf[j + k] = (buf[j + k] - u) * rs * wc[k] + bc[k];
      } else {
        double a = rs * wc[0], b = bc[0];
        for (int64_t k = 0; k < run; k++) buf[j + k] = (buf[j + k] - u) * a + b;
      }
      j += run;
      walk_advance(&w, run);
    }
    store(y, off, buf, len);
  }
done:
  scratch_free(ctx, mu, S);
  scratch_free(ctx, r, S);
  scratch_free(ctx, wv, C);
  scratch_free(ctx, bv, C);
  return st;
}

/*
** With xhat = (x - mean) rstd, y = xhat w + b and statistics over sets of
** m elements, for each set s:
**   A = sum dy w,  B = sum dy w xhat
**   dx = rstd (dy w - A / m - xhat B / m)     (statistics from x)
**   dx = rstd dy w                            (given statistics)
** and per channel dw = sum dy xhat, db = sum dy. Two passes over x and dy.
*/
keel_status kl_cpu_norm_backward(keel_ctx *ctx, keel_tensor *gx, keel_tensor *gw, keel_tensor *gb,
                                 const keel_tensor *gy, const keel_tensor *x, const keel_tensor *mean,
                                 const keel_tensor *rstd, const keel_tensor *weight, int64_t groups,
                                 int stats_of_x) {
  int64_t S, C = x->shape[1], total = x->numel;
  double m, xb[BLOCK], dyb[BLOCK], *mu, *r, *wv, *A, *B, *dw, *db;
  keel_status st = KEEL_OK;
  walk w;
  stat_shape(x, groups, &S, &m);
  mu = scratch_of(ctx, mean, S, 0.0);
  r = scratch_of(ctx, rstd, S, 1.0);
  wv = scratch_of(ctx, weight, C, 1.0);
  A = scratch(ctx, S, 0.0);
  B = scratch(ctx, S, 0.0);
  dw = scratch(ctx, C, 0.0);
  db = scratch(ctx, C, 0.0);
  if (!mu || !r || !wv || !A || !B || !dw || !db) { st = kl_error(ctx, KEEL_ERR_NOMEM, "norm: out of memory"); goto done; }
  walk_init(&w, x, groups);
  for (int64_t off = 0; off < total; off += BLOCK) {
    int64_t len = total - off < BLOCK ? total - off : BLOCK;
    load(xb, x, off, len);
    load(dyb, gy, off, len);
    for (int64_t j = 0; j < len;) {
      int64_t run = walk_run(&w, len - j), s = walk_stat(&w);
      double u = mu[s], rs = r[s];
      if (w.chan_step) {
        const double *wc = wv + w.c;
        double *dwc = dw + w.c, *dbc = db + w.c, a = 0, b = 0;
        for (int64_t k = 0; k < run; k++) {
          double dy = dyb[j + k], xh = (xb[j + k] - u) * rs;
          a += dy * wc[k];
          b += dy * wc[k] * xh;
          dwc[k] += dy * xh;
          dbc[k] += dy;
        }
        A[s] += a;
        B[s] += b;
      } else {
        double sdy = 0, sdyx = 0;
        for (int64_t k = 0; k < run; k++) {
          double xh = (xb[j + k] - u) * rs;
          sdy += dyb[j + k];
          sdyx += dyb[j + k] * xh;
        }
        A[s] += sdy * wv[w.c];
        B[s] += sdyx * wv[w.c];
        dw[w.c] += sdyx;
        db[w.c] += sdy;
      }
      j += run;
      walk_advance(&w, run);
    }
  }
  if (gx) {
    walk_init(&w, x, groups);
    for (int64_t off = 0; off < total; off += BLOCK) {
      int64_t len = total - off < BLOCK ? total - off : BLOCK;
      load(xb, x, off, len);
      load(dyb, gy, off, len);
      for (int64_t j = 0; j < len;) {
        int64_t run = walk_run(&w, len - j), s = walk_stat(&w);
        double u = mu[s], rs = r[s];
        double a = stats_of_x ? A[s] / m : 0, b = stats_of_x ? B[s] / m : 0;
        const double *wc = wv + w.c;
        if (w.chan_step) {
          for (int64_t k = 0; k < run; k++) {
            double xh = (xb[j + k] - u) * rs;
            xb[j + k] = rs * (dyb[j + k] * wc[k] - a - xh * b);
          }
        } else if (stats_of_x) {
          for (int64_t k = 0; k < run; k++) {
            double xh = (xb[j + k] - u) * rs;
            xb[j + k] = rs * (dyb[j + k] * wc[0] - a - xh * b);
          }
        } else {
          for (int64_t k = 0; k < run; k++) xb[j + k] = rs * wc[0] * dyb[j + k];
        }
        j += run;
        walk_advance(&w, run);
      }
      store(gx, off, xb, len);
    }
  }
  if (gw) store(gw, 0, dw, C);
  if (gb) store(gb, 0, db, C);
done:
  scratch_free(ctx, mu, S);
  scratch_free(ctx, r, S);
  scratch_free(ctx, wv, C);
  scratch_free(ctx, A, S);
  scratch_free(ctx, B, S);
  scratch_free(ctx, dw, C);
  scratch_free(ctx, db, C);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Dropout and embedding
** ======================================================================= */

/* One draw per element in row-major order, so a seed fixes the mask. */
keel_status kl_cpu_dropout_mask(keel_ctx *ctx, keel_tensor *mask, double p) {
  double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  int64_t n = mask->numel;
  if (mask->dtype == KEEL_F32) {
    float *o = (float *)kl_data(mask), v = (float)scale;
    for (int64_t i = 0; i < n; i++) o[i] = kl_rng_uniform(ctx) < p ? 0.0f : v;
  } else {
    double *o = (double *)kl_data(mask);
    for (int64_t i = 0; i < n; i++) o[i] = kl_rng_uniform(ctx) < p ? 0.0 : scale;
  }
  return KEEL_OK;
}

/* out [n, D] = rows idx - base (checked) of weight [V, D]. */
keel_status kl_cpu_embedding(keel_ctx *ctx, keel_tensor *out, const keel_tensor *weight, const keel_tensor *idx,
                             int64_t base) {
  size_t row = kl_dtype_size[weight->dtype] * (size_t)weight->shape[1];
  const int64_t *ix = (const int64_t *)kl_data(idx);
  const char *w = (const char *)kl_data(weight);
  char *o = (char *)kl_data(out);
  (void)ctx;
  for (int64_t i = 0; i < idx->numel; i++) memcpy(o + (size_t)i * row, w + (size_t)(ix[i] - base) * row, row);
  return KEEL_OK;
}

/* gw [V, D] += rows of gout [n, D] at idx - base, except at row pad (0-based, -1: none). */
keel_status kl_cpu_embedding_backward(keel_ctx *ctx, keel_tensor *gw, const keel_tensor *gout, const keel_tensor *idx,
                                      int64_t base, int64_t pad) {
  int64_t D = gw->shape[1];
  const int64_t *ix = (const int64_t *)kl_data(idx);
  (void)ctx;
  for (int64_t i = 0; i < idx->numel; i++) {
    int64_t r = ix[i] - base;
    if (r == pad) continue;
    if (gw->dtype == KEEL_F32) {
      float *d = (float *)kl_data(gw) + r * D;
      const float *g = (const float *)kl_data(gout) + i * D;
      for (int64_t k = 0; k < D; k++) d[k] += g[k];
    } else {
      double *d = (double *)kl_data(gw) + r * D;
      const double *g = (const double *)kl_data(gout) + i * D;
      for (int64_t k = 0; k < D; k++) d[k] += g[k];
    }
  }
  return KEEL_OK;
}

/* }====================================================================== */
