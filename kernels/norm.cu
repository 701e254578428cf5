/*
** norm.cu: batch, layer and group normalisation (statistics, forward, the
** fused backward) and dropout masks, as the CPU kernels of
** engine/backend_cpu_norm.c define them.
**
** x is [N, C, L] (contiguous), statistics per (n, group) when groups > 0
** (mean/rstd [N*groups]: the elements of one are a contiguous run of
** C/groups*L) or per channel when groups == 0 (batch norm: N runs of L).
** One block owns one statistic (whole warps, as few as hold its elements)
** and does all its passes, in double, the CPU's way: mean first, then
** squared deviations (no cancellation); batch norm over runs of one
** ([N, C] inputs) takes common.cuh's column block, a block serving up to
** 32 neighbouring channels, so a warp's loads are neighbours in memory. Few
** statistics over long runs (batch norm with few channels, layer/group
** norm with few samples) split each over blocks instead (kc_chan_split),
** with ordered second passes.
** Per-channel weight gradients of layer/group norm cross statistics, so
** they are column sums: partial sums over slices of N in scratch, then
** one block per unit of neighbouring channels adds them in a fixed
** order. Nothing uses atomics, so results repeat exactly.
**
** Dropout draws element i from splitmix64 of (seed, i): a counter-based
** generator, no state on the device; the engine passes a fresh seed from
** keel's RNG per mask.
*/
#include <math.h>
#include "common.cuh"

#define NT 256

/* {======================================================================
** Walking the elements of one statistic
** ======================================================================= */

typedef struct nshape {
  int64_t N, C, L, groups, Cg;  /* Cg: channels per group (groups > 0) */
  int64_t S;                    /* statistics */
  double m;                     /* elements behind each */
} nshape;

static nshape shape_of(const kc_view *x, int64_t groups) {
  nshape g;
  g.N = x->shape[0];
  g.C = x->shape[1];
  g.L = x->shape[2];
  g.groups = groups;
  g.Cg = groups ? g.C / groups : 1;
  g.S = groups ? g.N * groups : g.C;
  g.m = groups ? (double)(g.Cg * g.L) : (double)(g.N * g.L);
  return g;
}

/* Elements behind each statistic: a run of C/groups*L, or N runs of L. */
__host__ __device__ __forceinline__ int64_t stat_len(const nshape &g) { return g.groups ? g.Cg * g.L : g.N * g.L; }
/* Batch norm over runs of one: per-channel sums in columns (common.cuh). */
__host__ __device__ __forceinline__ bool is_cols(const nshape &g) { return !g.groups && g.L == 1; }

/* Calls f(offset in x, channel) for this thread's share of elements
** [j0, j1) of statistic s (group: its run in order; batch norm: n-major,
** kc_chan_visit, nothing for a column thread past the last channel).
** Runs of a block or more go row by row, shorter ones step the channel by
** the block size's quotient and remainder: no division per element. */
template <typename F>
__device__ __forceinline__ void visit(const nshape &g, int64_t s, int64_t j0, int64_t j1, F &f) {
  int64_t tid = threadIdx.x, bd = blockDim.x;
  if (g.groups) {
    int64_t c0 = (s % g.groups) * g.Cg, o = s * g.Cg * g.L;
    if (g.L == 1) {
      for (int64_t j = j0 + tid; j < j1; j += bd) f(o + j, c0 + j);
    } else if (g.L >= bd) {
      for (int64_t k = j0 / g.L; k * g.L < j1; k++) {
        int64_t r0 = k * g.L, lo = j0 > r0 ? j0 - r0 : 0, hi = j1 - r0 < g.L ? j1 - r0 : g.L;
        for (int64_t l = lo + tid; l < hi; l += bd) f(o + r0 + l, c0 + k);
      }
    } else if (j0 + tid < j1) {
      int64_t j = j0 + tid, k = j / g.L, l = j - k * g.L, q = bd / g.L, r = bd - q * g.L;
      for (; j < j1; j += bd) {
        f(o + j, c0 + k);
        k += q;
        l += r;
        if (l >= g.L) {
          l -= g.L;
          k++;
        }
      }
    }
  } else {
    auto h = [&](int64_t i) { f(i, s); };
    kc_chan_visit(g.C, g.L, s, j0, j1, h);
  }
}

typedef struct dpair { double x, y; } dpair;

template <typename T>
__device__ __forceinline__ double ld(const T *p, int64_t i, double dflt) { return p ? (double)p[i] : dflt; }

/* }====================================================================== */

/* {======================================================================
** Statistics and forward
** ======================================================================= */

/* Blocks loop over units (common.cuh): a statistic, or with columns up to
** blockDim.x neighbouring channels; s may then be past the last one. */
template <typename T>
__global__ void stats_kernel(nshape g, T *mean, T *rstd, T *var, const T *x, double eps) {
  KC_SHARED(double, buf, [NT]);
  bool cols = is_cols(g);
  int64_t units = kc_chan_units(cols, g.S);
  for (int64_t un = blockIdx.x; un < units; un += gridDim.x) {
    int64_t s = kc_chan_at(cols, un);
    double acc = 0, mu, v;
    auto sum = [&](int64_t i, int64_t) { acc += (double)x[i]; };
    visit(g, s, 0, stat_len(g), sum);
    mu = kc_chan_sum(cols, acc, buf) / g.m;
    acc = 0;
    auto dev = [&](int64_t i, int64_t) { double d = (double)x[i] - mu; acc += d * d; };
    visit(g, s, 0, stat_len(g), dev);
    v = kc_chan_sum(cols, acc, buf) / g.m;         /* biased variance */
    if (kc_chan_lead(cols) && s < g.S) {
      mean[s] = (T)mu;
      rstd[s] = (T)(1.0 / sqrt(v + eps));
      if (var) var[s] = (T)v;
    }
  }
}

/*
** Few statistics over long runs (batch norm with few channels, layer or
** group norm with few samples): each statistic's elements split into
** slices (kc_chan_split, gridDim.y). Pass 1 sums x per slice; pass 2
** rebuilds the mean from pass 1's partials (in slice order: the same bits
** in every block) and sums squared deviations; split_stats_finish adds
** those per statistic. Two passes over x, as the one-block kernel: no
** cancellation. Partials of slice k, statistic s: part[k * S + s].
*/
__device__ __forceinline__ double split_mean(const nshape &g, const double *sums, int64_t slices, int64_t s) {
  double a = 0;
  for (int64_t k = 0; k < slices; k++) a += sums[k * g.S + s];
  return a / g.m;
}

/* sums NULL: pass 1 (sum x); else pass 2 (sum (x - mean)^2). */
template <typename T>
__global__ void split_stats_part(nshape g, kc_split sp, double *part, const double *sums, const T *x) {
  KC_SHARED(double, buf, [NT]);
  bool cols = is_cols(g);
  int64_t units = kc_chan_units(cols, g.S);
  for (int64_t sl = blockIdx.y; sl < sp.S; sl += gridDim.y) {
    int64_t j0, j1;
    kc_split_range(sp, sl, stat_len(g), &j0, &j1);
    for (int64_t un = blockIdx.x; un < units; un += gridDim.x) {
      int64_t s = kc_chan_at(cols, un);
      bool live = s < g.S;
      double acc = 0, mu = sums && live ? split_mean(g, sums, sp.S, s) : 0.0;
      auto add = [&](int64_t i, int64_t) {
        double d = (double)x[i] - mu;
        acc += sums ? d * d : d;
      };
      visit(g, s, j0, j1, add);
      acc = kc_chan_sum(cols, acc, buf);
      if (kc_chan_lead(cols) && live) part[sl * g.S + s] = acc;
    }
  }
}

template <typename T>
__global__ void split_stats_finish(nshape g, kc_split sp, const double *sums, const double *sq, T *mean, T *rstd,
                                   T *var, double eps) {
  KC_GRID_LOOP(s, g.S) {
    double mu = split_mean(g, sums, sp.S, s), v = 0;
    for (int64_t k = 0; k < sp.S; k++) v += sq[k * g.S + s];
    v /= g.m;                                      /* biased variance */
    mean[s] = (T)mu;
    rstd[s] = (T)(1.0 / sqrt(v + eps));
    if (var) var[s] = (T)v;
  }
}

/* y = (x - mean) rstd w + b over [N, C*L]: threadIdx.x and blockIdx.x
** walk a row, threadIdx.y and blockIdx.y walk n (rows shorter than a
** block share it: forward_t's block is blockDim.x = C*L rounded up to a
** power of two, rows of them). The channel of element j and the group of
** channel c divide in I (uint32_t when kc_index32 of C*L allows). */
template <typename T, typename I>
__global__ void forward_kernel(nshape g, T *y, const T *x, const T *mean, const T *rstd, const T *w,
                               const T *b) {
  int64_t CL = g.C * g.L;
  I L = (I)g.L, Cg = (I)g.Cg;
  for (int64_t n = blockIdx.y * (int64_t)blockDim.y + threadIdx.y; n < g.N; n += (int64_t)gridDim.y * blockDim.y) {
    const T *xr = x + n * CL;
    T *yr = y + n * CL;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < CL; j += (int64_t)gridDim.x * blockDim.x) {
      I c = g.L == 1 ? (I)j : (I)j / L;
      int64_t s = g.groups ? n * g.groups + (int64_t)(c / Cg) : (int64_t)c;
      double u = ld(mean, s, 0.0), rs = ld(rstd, s, 1.0);
      yr[j] = (T)(((double)xr[j] - u) * rs * ld(w, c, 1.0) + ld(b, c, 0.0));
    }
  }
}

/* }====================================================================== */

/* {======================================================================
** Backward. With xhat = (x - mean) rstd and per statistic
**   A = sum dy w,  B = sum dy w xhat   (m elements)
**   dx = rstd (dy w - A/m - xhat B/m)  (statistics of x), rstd w dy (given)
**   dw[c] = sum dy xhat,  db[c] = sum dy
** ======================================================================= */

template <typename T>
__global__ void backward_kernel(nshape g, T *gx, T *gw, T *gb, const T *gy, const T *x, const T *mean,
                                const T *rstd, const T *w, int stats_of_x) {
  KC_SHARED(double, buf, [NT]);
  bool cols = is_cols(g);
  int64_t units = kc_chan_units(cols, g.S);
  for (int64_t un = blockIdx.x; un < units; un += gridDim.x) {
    int64_t s = kc_chan_at(cols, un);
    bool live = s < g.S;
    double u = live ? ld(mean, s, 0.0) : 0.0, rs = live ? ld(rstd, s, 1.0) : 1.0, a = 0, b = 0, A, B;
    /* batch norm: w is one value, sum dy and dy xhat (also dw, db);
    ** groups: dy w and dy w xhat */
    auto pass1 = [&](int64_t i, int64_t c) {
      double dy = (double)gy[i], xh = ((double)x[i] - u) * rs, wc = g.groups ? ld(w, c, 1.0) : 1.0;
      a += dy * wc;
      b += dy * wc * xh;
    };
    if (stats_of_x || (!g.groups && (gw || gb))) {
      visit(g, s, 0, stat_len(g), pass1);
      a = kc_chan_sum(cols, a, buf);
      b = kc_chan_sum(cols, b, buf);
    }
    if (!live) continue;        /* a column past the last channel: its sums are done */
    if (!g.groups) {
      if (kc_chan_lead(cols)) {
        if (gw) gw[s] = (T)b;
        if (gb) gb[s] = (T)a;
      }
      A = a * ld(w, s, 1.0);
      B = b * ld(w, s, 1.0);
    } else {
      A = a;
      B = b;
    }
    if (gx) {
      double am = stats_of_x ? A / g.m : 0, bm = stats_of_x ? B / g.m : 0;
      auto pass2 = [&](int64_t i, int64_t c) {
        double xh = ((double)x[i] - u) * rs;
        gx[i] = (T)(rs * ((double)gy[i] * ld(w, c, 1.0) - am - xh * bm));
      };
      visit(g, s, 0, stat_len(g), pass2);
    }
  }
}

/*
** Backward over split statistics (those of split_stats_part):
** split_back_part sums A and B of each slice; split_back_apply adds a
** statistic's partials in slice order (the same in every block), writes
** batch norm's dw, db (slice 0) and dx over its slice.
*/
template <typename T>
__global__ void split_back_part(nshape g, kc_split sp, dpair *part, const T *gy, const T *x, const T *mean,
                                const T *rstd, const T *w) {
  KC_SHARED(double, buf, [NT]);
  bool cols = is_cols(g);
  int64_t units = kc_chan_units(cols, g.S);
  for (int64_t sl = blockIdx.y; sl < sp.S; sl += gridDim.y) {
    int64_t j0, j1;
    kc_split_range(sp, sl, stat_len(g), &j0, &j1);
    for (int64_t un = blockIdx.x; un < units; un += gridDim.x) {
      int64_t s = kc_chan_at(cols, un);
      bool live = s < g.S;
      double u = live ? ld(mean, s, 0.0) : 0.0, rs = live ? ld(rstd, s, 1.0) : 1.0, a = 0, b = 0;
      auto add = [&](int64_t i, int64_t c) {
        double dy = (double)gy[i] * (g.groups ? ld(w, c, 1.0) : 1.0);
        a += dy;
        b += dy * (((double)x[i] - u) * rs);
      };
      visit(g, s, j0, j1, add);
      a = kc_chan_sum(cols, a, buf);
      b = kc_chan_sum(cols, b, buf);
      if (kc_chan_lead(cols) && live) part[sl * g.S + s] = dpair{a, b};
    }
  }
}

/* part NULL: the sums are not needed (no batch-norm dw, db; given statistics). */
template <typename T>
__global__ void split_back_apply(nshape g, kc_split sp, const dpair *part, T *gx, T *gw, T *gb, const T *gy,
                                 const T *x, const T *mean, const T *rstd, const T *w, int stats_of_x) {
  bool cols = is_cols(g);
  int64_t units = kc_chan_units(cols, g.S);
  for (int64_t sl = blockIdx.y; sl < sp.S; sl += gridDim.y) {
    int64_t j0, j1;
    kc_split_range(sp, sl, stat_len(g), &j0, &j1);
    for (int64_t un = blockIdx.x; un < units; un += gridDim.x) {
      int64_t s = kc_chan_at(cols, un);
      if (s >= g.S) continue;   /* no barrier below: a column past the last channel may leave */
      double a = 0, b = 0, ws = g.groups ? 1.0 : ld(w, s, 1.0);
      if (part)
        for (int64_t k = 0; k < sp.S; k++) {
          dpair v = part[k * g.S + s];
          a += v.x;
          b += v.y;
        }
      if (!g.groups && sl == 0 && kc_chan_lead(cols)) {
        if (gw) gw[s] = (T)b;
        if (gb) gb[s] = (T)a;
      }
      if (gx) {
        double u = ld(mean, s, 0.0), rs = ld(rstd, s, 1.0);
        double am = stats_of_x ? a * ws / g.m : 0, bm = stats_of_x ? b * ws / g.m : 0;
        auto put = [&](int64_t i, int64_t c) {
          double xh = ((double)x[i] - u) * rs;
          gx[i] = (T)(rs * ((double)gy[i] * ld(w, c, 1.0) - am - xh * bm));
        };
        visit(g, s, j0, j1, put);
      }
    }
  }
}

/* Group/layer norm dw, db, first pass: column j of [N, C*L] summed over
** the slice of n of blockIdx.y: part[y][j] = {sum dy xhat, sum dy}. */
template <typename T>
__global__ void wgrad_part(nshape g, dpair *part, int64_t slices, int64_t per, const T *gy, const T *x,
                           const T *mean, const T *rstd) {
  int64_t CL = g.C * g.L;
  for (int64_t sl = blockIdx.y; sl < slices; sl += gridDim.y) {
    int64_t n0 = sl * per, n1 = n0 + per < g.N ? n0 + per : g.N;
    KC_GRID_LOOP(j, CL) {
      int64_t c = g.L == 1 ? j : j / g.L, gi = c / g.Cg;
      double sdyx = 0, sdy = 0;
      for (int64_t n = n0; n < n1; n++) {
        int64_t s = n * g.groups + gi, i = n * CL + j;
        double dy = (double)gy[i];
        sdyx += dy * ((double)x[i] - ld(mean, s, 0.0)) * ld(rstd, s, 1.0);
        sdy += dy;
      }
      part[sl * CL + j] = dpair{sdyx, sdy};
    }
  }
}

/* Second pass: part is [slices, C, L], and channel c's sum is a
** per-channel sum (common.cuh): a block per unit of channels, columns
** when L == 1 (layer norm: a warp reads neighbouring channels of a slice). */
template <typename T>
__global__ void wgrad_finish(nshape g, T *gw, T *gb, const dpair *part, int64_t slices) {
  KC_SHARED(double, buf, [NT]);
  bool cols = g.L == 1;
  int64_t units = kc_chan_units(cols, g.C);
  for (int64_t un = blockIdx.x; un < units; un += gridDim.x) {
    int64_t c = kc_chan_at(cols, un);
    double a = 0, b = 0;
    auto add = [&](int64_t i) {
      dpair v = part[i];
      a += v.x;
      b += v.y;
    };
    kc_chan_visit(g.C, g.L, c, 0, slices * g.L, add);
    a = kc_chan_sum(cols, a, buf);
    b = kc_chan_sum(cols, b, buf);
    if (kc_chan_lead(cols) && c < g.C) {
      if (gw) gw[c] = (T)a;
      if (gb) gb[c] = (T)b;
    }
  }
}

/* }====================================================================== */

/* {======================================================================
** Dropout
** ======================================================================= */

template <typename T>
__global__ void dropout_kernel(T *mask, int64_t n, double p, T scale, uint64_t key) {
  KC_GRID_LOOP(i, n) mask[i] = kc_drop_u(key, (uint64_t)i) < p ? (T)0 : scale;
}

/* }====================================================================== */

/* {======================================================================
** Entries
** ======================================================================= */

/* Same dtype as x and at least n elements (NULL passes). */
static int check_vec(const kc_view *v, const kc_view *x, int64_t n) {
  if (!v) return KC_OK;
  if (v->dtype != x->dtype) return KC_ERR_DTYPE;
  return v->numel >= n ? KC_OK : KC_ERR_ARG;
}

static int check_x(const kc_view *x, int64_t groups) {
  if (!x || x->ndim != 3 || groups < 0) return KC_ERR_ARG;
  if (!kc_is_float(x->dtype)) return KC_ERR_DTYPE;
  if (groups && x->shape[1] % groups) return KC_ERR_ARG;
  return KC_OK;
}

template <typename T>
static int stats_t(kc_state *s, const nshape &g, const kc_view *mean, const kc_view *rstd, const kc_view *var,
                   const kc_view *x, double eps) {
  bool cols = is_cols(g);
  dim3 block = kc_chan_block(cols, g.S, stat_len(g), NT);
  int64_t units = kc_chan_units_of(cols, g.S, block);
  kc_split sp = kc_chan_split(s, units, stat_len(g), kc_chan_team(cols, block));
  if (sp.S > 1) {   /* few statistics: slices */
    dim3 grid(kc_grid_x(units), (unsigned)sp.S);
    double *sums;
    int e;
    if ((e = kc_scratch(s, 2 * sizeof(double) * (size_t)(sp.S * g.S), (void **)&sums))) return e;
    KC_LAUNCH(grid, block, 0, s->stream, split_stats_part<T>)(g, sp, sums, NULL, (const T *)x->data);
    if ((e = KC_LAUNCHED())) return e;
    KC_LAUNCH(grid, block, 0, s->stream, split_stats_part<T>)(g, sp, sums + sp.S * g.S, sums, (const T *)x->data);
    if ((e = KC_LAUNCHED())) return e;
    KC_LAUNCH(kc_blocks(g.S), KC_THREADS, 0, s->stream, split_stats_finish<T>)(
        g, sp, sums, sums + sp.S * g.S, (T *)mean->data, (T *)rstd->data, var ? (T *)var->data : NULL, eps);
    return KC_LAUNCHED();
  }
  KC_LAUNCH(kc_grid_x(units), block, 0, s->stream, stats_kernel<T>)(g, (T *)mean->data, (T *)rstd->data,
                                                                    var ? (T *)var->data : NULL, (const T *)x->data,
                                                                    eps);
  return KC_LAUNCHED();
}

static int norm_stats(kc_state *s, const kc_view *mean, const kc_view *rstd, const kc_view *var, const kc_view *x,
                      int64_t groups, double eps) {
  nshape g;
  int e;
  if ((e = check_x(x, groups))) return e;
  g = shape_of(x, groups);
  if (!mean || !rstd) return KC_ERR_ARG;
  if ((e = check_vec(mean, x, g.S)) || (e = check_vec(rstd, x, g.S)) || (e = check_vec(var, x, g.S))) return e;
  if (g.S == 0) return KC_OK;
  /* no elements behind each statistic: 0/0, NaN, as the CPU */
  if (x->dtype == KEEL_F32) return stats_t<float>(s, g, mean, rstd, var, x, eps);
  return stats_t<double>(s, g, mean, rstd, var, x, eps);
}

#define DATA(T, v) ((v) ? (T *)(v)->data : (T *)NULL)

template <typename T>
static int forward_t(kc_state *s, const nshape &g, const kc_view *y, const kc_view *x, const kc_view *mean,
                     const kc_view *rstd, const kc_view *w, const kc_view *b) {
  int64_t CL = g.C * g.L;
  unsigned bx = 1;
  /* a row of C*L elements, rounded up to a power of two, across x; as
  ** many rows as the block then holds across y (short rows of layer and
  ** group norm would leave most of a block of one row idle) */
  while (bx < NT && (int64_t)bx < CL) bx <<= 1;
  dim3 block(bx, NT / bx), grid(kc_grid_x((CL + bx - 1) / bx), kc_grid_yz((g.N + NT / bx - 1) / (NT / bx)));
  if (kc_index32(CL))
    KC_LAUNCH(grid, block, 0, s->stream, forward_kernel<T, uint32_t>)(
        g, (T *)y->data, (const T *)x->data, DATA(const T, mean), DATA(const T, rstd), DATA(const T, w),
        DATA(const T, b));
  else
    KC_LAUNCH(grid, block, 0, s->stream, forward_kernel<T, int64_t>)(
        g, (T *)y->data, (const T *)x->data, DATA(const T, mean), DATA(const T, rstd), DATA(const T, w),
        DATA(const T, b));
  return KC_LAUNCHED();
}

static int norm_forward(kc_state *s, const kc_view *y, const kc_view *x, const kc_view *mean, const kc_view *rstd,
                        const kc_view *weight, const kc_view *bias, int64_t groups) {
  nshape g;
  int e;
  if ((e = check_x(x, groups))) return e;
  g = shape_of(x, groups);
  if (!y || y->numel != x->numel) return KC_ERR_ARG;
  if ((e = check_vec(y, x, 0)) || (e = check_vec(mean, x, g.S)) || (e = check_vec(rstd, x, g.S)) ||
      (e = check_vec(weight, x, g.C)) || (e = check_vec(bias, x, g.C)))
    return e;
  if (x->numel == 0) return KC_OK;
  if (x->dtype == KEEL_F32) return forward_t<float>(s, g, y, x, mean, rstd, weight, bias);
  return forward_t<double>(s, g, y, x, mean, rstd, weight, bias);
}

template <typename T>
static int backward_t(kc_state *s, const nshape &g, const kc_view *gx, const kc_view *gw, const kc_view *gb,
                      const kc_view *gy, const kc_view *x, const kc_view *mean, const kc_view *rstd,
                      const kc_view *w, int stats_of_x) {
  int e;
  bool cols = is_cols(g);
  dim3 block = kc_chan_block(cols, g.S, stat_len(g), NT);
  int64_t units = kc_chan_units_of(cols, g.S, block);
  kc_split sp = kc_chan_split(s, units, stat_len(g), kc_chan_team(cols, block));
  if (sp.S > 1 && (gx || !g.groups)) {   /* few statistics: slices */
    dim3 grid(kc_grid_x(units), (unsigned)sp.S);
    dpair *part = NULL;
    if (stats_of_x || (!g.groups && (gw || gb))) {
      if ((e = kc_scratch(s, sizeof(dpair) * (size_t)(sp.S * g.S), (void **)&part))) return e;
      KC_LAUNCH(grid, block, 0, s->stream, split_back_part<T>)(g, sp, part, (const T *)gy->data, (const T *)x->data,
                                                             DATA(const T, mean), DATA(const T, rstd),
                                                             DATA(const T, w));
      if ((e = KC_LAUNCHED())) return e;
    }
    KC_LAUNCH(grid, block, 0, s->stream, split_back_apply<T>)(g, sp, part, DATA(T, gx), g.groups ? NULL : DATA(T, gw),
                                                            g.groups ? NULL : DATA(T, gb), (const T *)gy->data,
                                                            (const T *)x->data, DATA(const T, mean),
                                                            DATA(const T, rstd), DATA(const T, w), stats_of_x);
    if ((e = KC_LAUNCHED())) return e;
  } else if (gx || !g.groups) {
    KC_LAUNCH(kc_grid_x(units), block, 0, s->stream, backward_kernel<T>)(
        g, DATA(T, gx), g.groups ? NULL : DATA(T, gw), g.groups ? NULL : DATA(T, gb), (const T *)gy->data,
        (const T *)x->data, DATA(const T, mean), DATA(const T, rstd), DATA(const T, w), stats_of_x);
    if ((e = KC_LAUNCHED())) return e;
  }
  if (g.groups && (gw || gb)) {
    int64_t CL = g.C * g.L, cols = kc_blocks(CL), target = (int64_t)(s->sm_count > 0 ? s->sm_count : 1) * 4;
    int64_t slices = (target + cols - 1) / cols, per;
    dpair *part;
    /* each slice adds at least 8 rows */
    if (slices > (g.N + 7) / 8) slices = (g.N + 7) / 8;
    if (slices > 65535) slices = 65535;
    if (slices < 1) slices = 1;
    per = (g.N + slices - 1) / slices;
    slices = g.N > 0 ? (g.N + per - 1) / per : 1;
    if ((e = kc_scratch(s, sizeof(dpair) * (size_t)(slices * CL), (void **)&part))) return e;
    if (CL > 0) {
      dim3 grid((unsigned)cols, (unsigned)slices);
      KC_LAUNCH(grid, KC_THREADS, 0, s->stream, wgrad_part<T>)(g, part, slices, per, (const T *)gy->data,
                                                              (const T *)x->data, DATA(const T, mean),
                                                              DATA(const T, rstd));
      if ((e = KC_LAUNCHED())) return e;
    }
    if (g.N == 0 || g.L == 0) {
      /* no rows: the sums are zero */
      if (gw && (e = kc_fill(s, gw, 0.0))) return e;
      if (gb && (e = kc_fill(s, gb, 0.0))) return e;
      return KC_OK;
    }
    dim3 block = kc_chan_block(g.L == 1, g.C, slices * g.L, NT);
    KC_LAUNCH(kc_grid_x(kc_chan_units_of(g.L == 1, g.C, block)), block, 0, s->stream, wgrad_finish<T>)(
        g, DATA(T, gw), DATA(T, gb), part, slices);
    return KC_LAUNCHED();
  }
  return KC_OK;
}

static int norm_backward(kc_state *s, const kc_view *gx, const kc_view *gw, const kc_view *gb, const kc_view *gy,
                         const kc_view *x, const kc_view *mean, const kc_view *rstd, const kc_view *weight,
                         int64_t groups, int stats_of_x) {
  nshape g;
  int e;
  if ((e = check_x(x, groups))) return e;
  g = shape_of(x, groups);
  if (!gy || gy->numel != x->numel || (gx && gx->numel != x->numel)) return KC_ERR_ARG;
  if ((e = check_vec(gy, x, 0)) || (e = check_vec(gx, x, 0)) || (e = check_vec(gw, x, g.C)) ||
      (e = check_vec(gb, x, g.C)) || (e = check_vec(mean, x, g.S)) || (e = check_vec(rstd, x, g.S)) ||
      (e = check_vec(weight, x, g.C)))
    return e;
  if (x->dtype == KEEL_F32) return backward_t<float>(s, g, gx, gw, gb, gy, x, mean, rstd, weight, stats_of_x);
  return backward_t<double>(s, g, gx, gw, gb, gy, x, mean, rstd, weight, stats_of_x);
}

static int dropout_mask(kc_state *s, const kc_view *mask, double p, uint64_t seed) {
  double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  /* the seed goes through the mixer once, so nearby seeds give unrelated streams */
  uint64_t key;
  if (!mask) return KC_ERR_ARG;
  if (mask->numel == 0) return KC_OK;
  key = kc_drop_key(seed);
  switch (mask->dtype) {
    case KEEL_F32:
      KC_LAUNCH(kc_blocks(mask->numel), KC_THREADS, 0, s->stream, dropout_kernel<float>)(
          (float *)mask->data, mask->numel, p, (float)scale, key);
      return KC_LAUNCHED();
    case KEEL_F64:
      KC_LAUNCH(kc_blocks(mask->numel), KC_THREADS, 0, s->stream, dropout_kernel<double>)(
          (double *)mask->data, mask->numel, p, scale, key);
      return KC_LAUNCHED();
    default: return KC_ERR_DTYPE;
  }
}

/* }====================================================================== */

void kc_register_norm(keel_cuda_table *t) {
  t->norm_stats = norm_stats;
  t->norm_forward = norm_forward;
  t->norm_backward = norm_backward;
  t->dropout_mask = dropout_mask;
}
