/*
** attention.cu: fused scaled-dot-product attention, the CUDA side of
** engine/backend_cpu_attn.c (the specification: same masks, same dropout
** draws, same rounding of the products' operands under a reduced matmul
** precision, same treatment of fully masked rows).
**
** Forward (flash-attention 2 style): a block owns FQ query rows (four
** warps, FQ/4 rows each) and walks the keys in tiles of 32 through shared
** memory. Lane j of a warp scores key j of the tile against each of its
** rows, the warp keeps the row's running max and sum (online softmax), and
** the output row is accumulated in registers, lane d owning dims d, d+32,
** ... The K tile and then the V tile share one buffer. Out: the output and
** the row logsumexp.
**
** Backward, deterministic (no atomics): a small kernel makes D_i = sum_d
** dO_id O_id (a warp per row); one kernel over key blocks accumulates dK
** and dV in registers while walking all query rows through shared memory
** (lane d owns dims, scores are warp sums); one kernel over query blocks,
** shaped like forward, accumulates dQ and writes d(bias) per element. Both
** recompute the weights from the logsumexp.
**
** Shared memory stays within the 48 KiB every device gives without
** opting in: forward (FQ*E + 32*max(E,Ev)) elements, the dQ kernel
** (GQ*(E+Ev) + 32*max(E,Ev)), the dK/dV kernel 16*(E+Ev) + 32. With FQ = 16
** and GQ = 8 that caps head sizes at 256 (float) and 128 (double):
** KC_SDPA_MAX_HEAD_* in keel_cuda.h, which the engine checks.
**
** Lane j reads row j of a shared tile at column (e + j) mod E, so the 32
** lanes hit 32 banks when E is a multiple of 32 (no padding needed).
*/
#include <math.h>
#include <string.h>
#include "common.cuh"
#include "keel_round.h"

#define NW 4                    /* warps per block */
#define FQ 16                   /* forward: query rows per block */
#define GQ 8                    /* dQ kernel: query rows per block */
#define TK 32                   /* keys per tile (one per lane) */
#define KW 2                    /* dK/dV kernel: keys per warp */
#define RT 16                   /* dK/dV kernel: query rows per shared tile */

/* {======================================================================
** Geometry, masks, rounding
** ======================================================================= */

typedef struct sdpa_geo {
  int64_t B, L, S, E, Ev;
  double scale, p, keep;        /* keep: a kept weight's scale 1/(1-p) */
  uint64_t key;                 /* the mixed dropout seed */
  int causal, prec;             /* prec: keel_matmul_precision (float only) */
  int nbd;                      /* leading dims of the bias view */
  int64_t bshape[KC_MAX_DIMS], bstride[KC_MAX_DIMS];
  int64_t brs, bcs;             /* bias row, column strides */
} sdpa_geo;

/* The dropout scale of weight (b, i, j): 0 or 1/(1-p) (1 without dropout),
** drawn as kl_sdpa_drop does. */
__device__ __forceinline__ double keep_of(const sdpa_geo &g, int64_t b, int64_t i, int64_t j) {
  if (g.p <= 0) return 1;
  return kc_drop_u(g.key, (uint64_t)((b * g.L + i) * g.S + j)) < g.p ? 0.0 : g.keep;
}

/* Offset of batch b's [L, S] plane in the bias view. */
__device__ __forceinline__ int64_t bias_plane(const sdpa_geo &g, int64_t b) {
  int64_t off = 0;
  for (int d = g.nbd - 1; d >= 0; d--) {
    int64_t q = b / g.bshape[d];
    off += (b - q * g.bshape[d]) * g.bstride[d];
    b = q;
  }
  return off;
}

/* The operand rounding of a product under a reduced precision, as the
** CPU's (engine/gemm.c) through the one definition of keel_round.h; float
** only. */
__device__ __forceinline__ float rnd(float x, int prec) { return kl_round_to_precision(x, prec); }
__device__ __forceinline__ double rnd(double x, int) { return x; }

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

/* The score of (i, j) from its product qk: scaled, biased, masked. */
template <typename T>
__device__ __forceinline__ T score(const sdpa_geo &g, const T *bias, T qk, int64_t i, int64_t j) {
  if (j >= g.S || (g.causal && j > i)) return (T)-INFINITY;
  T s = qk * (T)g.scale;
  if (bias) s += bias[i * g.brs + j * g.bcs];
  return s;
}

/* Keys a block of query rows ending before i1 sees. */
__device__ __forceinline__ int64_t key_end(const sdpa_geo &g, int64_t i1) {
  return g.causal && i1 < g.S ? i1 : g.S;
}

/* rows x cols of dense src into shared dst, rounded; rows past nrows (of
** src; may exceed rows) as zeros. A tile is at most 32 x 256 elements
** (KC_SDPA_MAX_HEAD_*), so int indices, and the present rows end at one
** element index: no division per element. */
template <typename T>
__device__ __forceinline__ void load_tile(T *dst, const T *src, int64_t nrows, int rows, int cols, int prec) {
  int n = rows * cols, present = (nrows < rows ? (int)nrows : rows) * cols;
  for (int x = threadIdx.x; x < n; x += blockDim.x) dst[x] = x < present ? rnd(src[x], prec) : (T)0;
}

/* dot(a[0..n), b[0..n)) read from lane's rotation (see the top). */
template <typename T>
__device__ __forceinline__ T rot_dot(const T *a, const T *b, int64_t n, int lane) {
  T s = 0;
  int64_t e = n ? lane % n : 0;
  for (int64_t c = 0; c < n; c++) {
    s += a[e] * b[e];
    if (++e == n) e = 0;
  }
  return s;
}

/* The warp's largest x, NaN skipped (NaN only when every lane has NaN):
** the same value in every lane, which the row's warp-uniform branches
** need. kc_warp_max keeps a lane's own NaN, so lanes would disagree and
** split the warp before its next full-mask shuffle. A NaN score still
** makes the row NaN, through the sum, as the CPU's kernel does. */
template <typename T>
__device__ __forceinline__ T warp_max_skipnan(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = (w > v || v != v) ? w : v;
  }
  return v;
}

/* acc[rr] (a row of width W, lane + 32c its column c) += sum over the
** tile's TK rows jj of coef_jj * tile[jj]: coef is one value per lane
** (lane jj holds row jj's), spread by shuffles. The forward's P V and the
** dQ kernel's dS K. */
template <int R, int NC, typename T>
__device__ __forceinline__ void add_tile(T (&acc)[R][NC], const T (&coef)[R], const T *tile, int64_t W, int lane) {
  #pragma unroll
  for (int rr = 0; rr < R; rr++)
    #pragma unroll
    for (int jj = 0; jj < TK; jj++) {
      T cj = __shfl_sync(0xffffffffu, coef[rr], jj);
      if (cj == 0) continue;
      #pragma unroll
      for (int c = 0; c < NC; c++) {
        int64_t d = lane + 32 * c;
        if (d < W) acc[rr][c] += cj * tile[jj * W + d];
      }
    }
}

/* }====================================================================== */

/* {======================================================================
** Forward
** ======================================================================= */

template <typename T, int NC>
__global__ void fwd_kernel(sdpa_geo g, const T *q, const T *k, const T *v, const T *bias, T *out, T *lse,
                           int64_t nblk) {
  KC_DYN_SMEM(T, sm);
  int64_t E = g.E, Ev = g.Ev, L = g.L, S = g.S;
  T *qs = sm, *kv = sm + FQ * E;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t tiles = (L + FQ - 1) / FQ;
  for (int64_t blk = blockIdx.x; blk < nblk; blk += gridDim.x) {
    int64_t b = blk / tiles, i0 = (blk - b * tiles) * FQ;
    int64_t i1 = i0 + FQ < L ? i0 + FQ : L, jend = key_end(g, i1);
    const T *bb = bias ? bias + bias_plane(g, b) : NULL;
    T acc[FQ / NW][NC], m[FQ / NW], l[FQ / NW], pr[FQ / NW];
    #pragma unroll
    for (int rr = 0; rr < FQ / NW; rr++) {
      m[rr] = (T)-INFINITY;
      l[rr] = 0;
      #pragma unroll
      for (int c = 0; c < NC; c++) acc[rr][c] = 0;
    }
    __syncthreads();            /* the previous block's readers are done */
    load_tile(qs, q + (b * L + i0) * E, i1 - i0, FQ, E, g.prec);
    for (int64_t j0 = 0; j0 < jend; j0 += TK) {
      int64_t j = j0 + lane;
      __syncthreads();
      load_tile(kv, k + (b * S + j0) * E, S - j0, TK, E, g.prec);
      __syncthreads();
      #pragma unroll
      for (int rr = 0; rr < FQ / NW; rr++) {
        int r = warp * (FQ / NW) + rr;
        int64_t i = i0 + r;
        T x = i < L ? score(g, bb, rot_dot(qs + r * E, kv + lane * E, E, lane), i, j) : (T)-INFINITY;
        T mn = warp_max_skipnan(x);
        mn = mn > m[rr] ? mn : m[rr];
        pr[rr] = 0;
        if (mn == (T)-INFINITY) continue;   /* warp-uniform: nothing seen yet */
        T alpha = exp_(m[rr] - mn), p = exp_(x - mn);
        l[rr] = l[rr] * alpha + kc_warp_sum(p);
        m[rr] = mn;
        #pragma unroll
        for (int c = 0; c < NC; c++) acc[rr][c] *= alpha;
        pr[rr] = rnd((T)(p * (T)keep_of(g, b, i, j)), g.prec);
      }
      __syncthreads();
      load_tile(kv, v + (b * S + j0) * Ev, S - j0, TK, Ev, g.prec);
      __syncthreads();
      add_tile<FQ / NW, NC>(acc, pr, kv, Ev, lane);
    }
    #pragma unroll
    for (int rr = 0; rr < FQ / NW; rr++) {
      int64_t i = i0 + warp * (FQ / NW) + rr;
      if (i >= L) continue;
      #pragma unroll
      for (int c = 0; c < NC; c++) {
        int64_t d = lane + 32 * c;
        if (d < Ev) out[(b * L + i) * Ev + d] = l[rr] == 0 ? (T)NAN : acc[rr][c] / l[rr];
      }
      if (lane == 0) lse[b * L + i] = l[rr] == 0 ? (T)-INFINITY : m[rr] + log_(l[rr]);
    }
  }
}

/* }====================================================================== */

/* {======================================================================
** Backward
** ======================================================================= */

/* D[r] = sum_d gout[r, d] out[r, d] over n rows of Ev (at most 256): a
** warp per row, so a row's reads coalesce. Lane l sums d = l, l + 32, ...
** in order and kc_warp_sum adds the lanes in a fixed pattern: the same
** bits on every run. The row loop is warp-uniform (the full-mask shuffle
** needs all 32 lanes; blocks are whole warps). */
template <typename T>
__global__ void rowdot_kernel(T *D, const T *gout, const T *out, int64_t n, int Ev) {
  int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  for (int64_t r = (int64_t)blockIdx.x * wpb + (threadIdx.x >> 5); r < n; r += (int64_t)gridDim.x * wpb) {
    const T *go = gout + r * Ev, *o = out + r * Ev;
    T s = 0;
    for (int d = lane; d < Ev; d += 32) s += go[d] * o[d];
    s = kc_warp_sum(s);
    if (lane == 0) D[r] = s;
  }
}

/* dK, dV: a block owns NW*KW keys, a warp KW of them in registers. */
template <typename T, int NC>
__global__ void dkdv_kernel(sdpa_geo g, const T *q, const T *k, const T *v, const T *bias, const T *gout,
                            const T *lse, const T *D, T *dk, T *dv, int64_t nblk) {
  KC_DYN_SMEM(T, sm);
  int64_t E = g.E, Ev = g.Ev, L = g.L, S = g.S;
  T *qs = sm, *gs = sm + RT * E, *ls = gs + RT * Ev, *ds = ls + RT;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t tiles = (S + NW * KW - 1) / (NW * KW);
  for (int64_t blk = blockIdx.x; blk < nblk; blk += gridDim.x) {
    int64_t b = blk / tiles, jb = (blk - b * tiles) * (NW * KW);
    const T *bb = bias ? bias + bias_plane(g, b) : NULL;
    T kr[KW][NC], vr[KW][NC], ak[KW][NC], av[KW][NC];
    #pragma unroll
    for (int kk = 0; kk < KW; kk++) {
      int64_t j = jb + warp * KW + kk;
      #pragma unroll
      for (int c = 0; c < NC; c++) {
        int64_t d = lane + 32 * c;
        kr[kk][c] = j < S && d < E ? rnd(k[(b * S + j) * E + d], g.prec) : (T)0;
        vr[kk][c] = j < S && d < Ev ? rnd(v[(b * S + j) * Ev + d], g.prec) : (T)0;
        ak[kk][c] = av[kk][c] = 0;
      }
    }
    /* rows above the block's first key see none of its keys when causal */
    for (int64_t it0 = g.causal ? jb : 0; it0 < L; it0 += RT) {
      int64_t nr = L - it0 < RT ? L - it0 : RT;
      __syncthreads();
      load_tile(qs, q + (b * L + it0) * E, nr, RT, E, g.prec);
      load_tile(gs, gout + (b * L + it0) * Ev, nr, RT, Ev, g.prec);
      for (int x = threadIdx.x; x < RT; x += blockDim.x) {
        ls[x] = x < nr ? lse[b * L + it0 + x] : (T)-INFINITY;
        ds[x] = x < nr ? D[b * L + it0 + x] : (T)0;
      }
      __syncthreads();
      for (int r = 0; r < nr; r++) {
        int64_t i = it0 + r;
        T li = ls[r];
        if (li == (T)-INFINITY) continue;   /* a fully masked row: no gradient */
        #pragma unroll
        for (int kk = 0; kk < KW; kk++) {
          int64_t j = jb + warp * KW + kk;
          T s = 0, dp = 0, p, kp;
          if (j >= S || (g.causal && j > i)) continue;   /* warp-uniform */
          #pragma unroll
          for (int c = 0; c < NC; c++) {
            int64_t d = lane + 32 * c;
            if (d < E) s += kr[kk][c] * qs[r * E + d];
            if (d < Ev) dp += vr[kk][c] * gs[r * Ev + d];
          }
          s = kc_warp_sum(s);
          p = exp_(score(g, bb, s, i, j) - li);
          if (p == 0) continue;
          dp = kc_warp_sum(dp);
          kp = (T)keep_of(g, b, i, j);
          {
            T pd = rnd((T)(p * kp), g.prec), dsr = rnd((T)(p * (dp * kp - ds[r]) * (T)g.scale), g.prec);
            #pragma unroll
            for (int c = 0; c < NC; c++) {
              int64_t d = lane + 32 * c;
              if (d < Ev) av[kk][c] += pd * gs[r * Ev + d];
              if (d < E) ak[kk][c] += dsr * qs[r * E + d];
            }
          }
        }
      }
    }
    #pragma unroll
    for (int kk = 0; kk < KW; kk++) {
      int64_t j = jb + warp * KW + kk;
      if (j >= S) continue;
      #pragma unroll
      for (int c = 0; c < NC; c++) {
        int64_t d = lane + 32 * c;
        if (dk && d < E) dk[(b * S + j) * E + d] = ak[kk][c];
        if (dv && d < Ev) dv[(b * S + j) * Ev + d] = av[kk][c];
      }
    }
  }
}

/* dQ and d(bias): a block owns GQ query rows, as forward. */
template <typename T, int NC>
__global__ void dq_kernel(sdpa_geo g, const T *q, const T *k, const T *v, const T *bias, const T *gout,
                          const T *lse, const T *D, T *dq, T *dbias, int64_t nblk) {
  KC_DYN_SMEM(T, sm);
  int64_t E = g.E, Ev = g.Ev, L = g.L, S = g.S;
  T *qs = sm, *gs = sm + GQ * E, *kv = gs + GQ * Ev;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t tiles = (L + GQ - 1) / GQ;
  for (int64_t blk = blockIdx.x; blk < nblk; blk += gridDim.x) {
    int64_t b = blk / tiles, i0 = (blk - b * tiles) * GQ;
    int64_t i1 = i0 + GQ < L ? i0 + GQ : L, jend = key_end(g, i1);
    const T *bb = bias ? bias + bias_plane(g, b) : NULL;
    T acc[GQ / NW][NC], pr[GQ / NW], dsr[GQ / NW];
    #pragma unroll
    for (int rr = 0; rr < GQ / NW; rr++)
      #pragma unroll
      for (int c = 0; c < NC; c++) acc[rr][c] = 0;
    __syncthreads();
    load_tile(qs, q + (b * L + i0) * E, i1 - i0, GQ, E, g.prec);
    load_tile(gs, gout + (b * L + i0) * Ev, i1 - i0, GQ, Ev, g.prec);
    for (int64_t j0 = 0; j0 < jend; j0 += TK) {
      int64_t j = j0 + lane;
      __syncthreads();
      load_tile(kv, k + (b * S + j0) * E, S - j0, TK, E, g.prec);
      __syncthreads();
      #pragma unroll
      for (int rr = 0; rr < GQ / NW; rr++) {
        int r = warp * (GQ / NW) + rr;
        int64_t i = i0 + r;
        T li = i < L ? lse[b * L + i] : (T)-INFINITY;
        pr[rr] = li == (T)-INFINITY ? (T)0 : exp_(score(g, bb, rot_dot(qs + r * E, kv + lane * E, E, lane), i, j) - li);
      }
      __syncthreads();
      load_tile(kv, v + (b * S + j0) * Ev, S - j0, TK, Ev, g.prec);
      __syncthreads();
      #pragma unroll
      for (int rr = 0; rr < GQ / NW; rr++) {
        int r = warp * (GQ / NW) + rr;
        int64_t i = i0 + r;
        T gsc = 0;
        if (pr[rr] != 0) {
          T kp = (T)keep_of(g, b, i, j);
          gsc = pr[rr] * (rot_dot(gs + r * Ev, kv + lane * Ev, Ev, lane) * kp - D[b * L + i]);
        }
        if (dbias && i < L && j < jend) dbias[(b * L + i) * S + j] = gsc;
        dsr[rr] = rnd((T)(gsc * (T)g.scale), g.prec);
      }
      if (!dq) continue;
      __syncthreads();
      load_tile(kv, k + (b * S + j0) * E, S - j0, TK, E, g.prec);
      __syncthreads();
      add_tile<GQ / NW, NC>(acc, dsr, kv, E, lane);
    }
    #pragma unroll
    for (int rr = 0; rr < GQ / NW; rr++) {
      int64_t i = i0 + warp * (GQ / NW) + rr;
      if (i >= L) continue;
      /* keys a causal block never visits get no gradient */
      if (dbias)
        for (int64_t j = jend + lane; j < S; j += 32) dbias[(b * L + i) * S + j] = 0;
      if (dq)
        #pragma unroll
        for (int c = 0; c < NC; c++) {
          int64_t d = lane + 32 * c;
          if (d < E) dq[(b * L + i) * E + d] = acc[rr][c];
        }
    }
  }
}

/* }====================================================================== */

/* {======================================================================
** Entries
** ======================================================================= */

static int64_t max_(int64_t a, int64_t b) { return a > b ? a : b; }

static int check(const kc_sdpa *a) {
  int dt;
  int64_t lim;
  if (!a || !a->q || !a->k || !a->v) return KC_ERR_ARG;
  dt = a->q->dtype;
  if (dt != KEEL_F32 && dt != KEEL_F64) return KC_ERR_DTYPE;
  lim = dt == KEEL_F64 ? KC_SDPA_MAX_HEAD_F64 : KC_SDPA_MAX_HEAD_F32;
  if (a->E > lim || a->Ev > lim) return KC_ERR_NOT_IMPLEMENTED;
  if (a->bias && a->bias->ndim < 2) return KC_ERR_ARG;
  return KC_OK;
}

static sdpa_geo geo_of(const kc_state *s, const kc_sdpa *a) {
  sdpa_geo g;
  memset(&g, 0, sizeof g);
  g.B = a->B; g.L = a->L; g.S = a->S; g.E = a->E; g.Ev = a->Ev;
  g.scale = a->scale; g.p = a->p; g.keep = a->p < 1 ? 1.0 / (1.0 - a->p) : 0.0;
  g.key = kc_drop_key(a->seed);
  g.causal = a->causal;
  g.prec = a->q->dtype == KEEL_F32 ? s->gemm_prec : KEEL_MATMUL_HIGHEST;
  if (a->bias) {
    g.nbd = a->bias->ndim - 2;
    for (int d = 0; d < g.nbd; d++) {
      g.bshape[d] = a->bias->shape[d];
      g.bstride[d] = a->bias->stride[d];
    }
    g.brs = a->bias->stride[g.nbd];
    g.bcs = a->bias->stride[g.nbd + 1];
  }
  return g;
}

/* The register width (dims per lane) a head size needs. */
#define BY_WIDTH(n, CALL) \
  ((n) <= 32 ? CALL(1) : (n) <= 64 ? CALL(2) : (n) <= 128 ? CALL(4) : CALL(8))

template <typename T>
static int forward_t(kc_state *s, const kc_sdpa *a) {
  sdpa_geo g = geo_of(s, a);
  int64_t nblk = a->B * ((a->L + FQ - 1) / FQ);
  size_t smem = sizeof(T) * (size_t)(FQ * a->E + TK * max_(a->E, a->Ev));
  const T *bias = a->bias ? (const T *)a->bias->data : NULL;
  if (nblk == 0) return KC_OK;
#define FWD(NCV)                                                                                            \
  (KC_LAUNCH(kc_grid_x(nblk), NW * 32, smem, s->stream, fwd_kernel<T, NCV>)(                                  \
       g, (const T *)a->q->data, (const T *)a->k->data, (const T *)a->v->data, bias, (T *)a->out->data,     \
       (T *)a->lse->data, nblk), 0)
  BY_WIDTH(a->Ev, FWD);
#undef FWD
  return KC_LAUNCHED();
}

template <typename T>
static int backward_t(kc_state *s, const kc_sdpa *a) {
  sdpa_geo g = geo_of(s, a);
  int64_t rows = a->B * a->L;
  const T *bias = a->bias ? (const T *)a->bias->data : NULL;
  T *D = NULL;
  int e;
  if (rows == 0) {
    if (a->dk || a->dv) {       /* no rows: keys get zero gradients */
      if (a->dk && (e = kc_fill(s, a->dk, 0))) return e;
      if (a->dv && (e = kc_fill(s, a->dv, 0))) return e;
    }
    return KC_OK;
  }
  if ((e = kc_scratch(s, sizeof(T) * (size_t)rows, (void **)&D))) return e;
  KC_LAUNCH(kc_blocks_sm(s, rows * 32), KC_THREADS, 0, s->stream, rowdot_kernel<T>)(
      D, (const T *)a->gout->data, (const T *)a->out->data, rows, (int)a->Ev);   /* a warp per row */
  if ((e = KC_LAUNCHED())) return e;
  if (a->dk || a->dv) {
    int64_t nblk = a->B * ((a->S + NW * KW - 1) / (NW * KW));
    size_t smem = sizeof(T) * (size_t)(RT * (a->E + a->Ev) + 2 * RT);
    if (nblk > 0) {
#define DKDV(NCV)                                                                                               \
  (KC_LAUNCH(kc_grid_x(nblk), NW * 32, smem, s->stream, dkdv_kernel<T, NCV>)(                                     \
       g, (const T *)a->q->data, (const T *)a->k->data, (const T *)a->v->data, bias, (const T *)a->gout->data, \
       (const T *)a->lse->data, D, a->dk ? (T *)a->dk->data : NULL, a->dv ? (T *)a->dv->data : NULL, nblk),    \
   0)
      BY_WIDTH(max_(a->E, a->Ev), DKDV);
#undef DKDV
      if ((e = KC_LAUNCHED())) return e;
    }
  }
  if (a->dq || a->dbias) {
    int64_t nblk = a->B * ((a->L + GQ - 1) / GQ);
    size_t smem = sizeof(T) * (size_t)(GQ * (a->E + a->Ev) + TK * max_(a->E, a->Ev));
#define DQ(NCV)                                                                                                 \
  (KC_LAUNCH(kc_grid_x(nblk), NW * 32, smem, s->stream, dq_kernel<T, NCV>)(                                       \
       g, (const T *)a->q->data, (const T *)a->k->data, (const T *)a->v->data, bias, (const T *)a->gout->data, \
       (const T *)a->lse->data, D, a->dq ? (T *)a->dq->data : NULL, a->dbias ? (T *)a->dbias->data : NULL,     \
       nblk),                                                                                                   \
   0)
    BY_WIDTH(a->E, DQ);
#undef DQ
    if ((e = KC_LAUNCHED())) return e;
  }
  return KC_OK;
}

static int sdpa_forward(kc_state *s, const kc_sdpa *a) {
  int e = check(a);
  if (e) return e;
  if (!a->out || !a->lse) return KC_ERR_ARG;
  return a->q->dtype == KEEL_F32 ? forward_t<float>(s, a) : forward_t<double>(s, a);
}

static int sdpa_backward(kc_state *s, const kc_sdpa *a) {
  int e = check(a);
  if (e) return e;
  if (!a->out || !a->lse || !a->gout) return KC_ERR_ARG;
  return a->q->dtype == KEEL_F32 ? backward_t<float>(s, a) : backward_t<double>(s, a);
}

/* }====================================================================== */

void kc_register_attention(keel_cuda_table *t) {
  t->sdpa_forward = sdpa_forward;
  t->sdpa_backward = sdpa_backward;
}
