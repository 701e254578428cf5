/*
** rnn.cu: recurrent layers (tanh/relu RNN, LSTM, GRU), one direction, all
** steps per call: the CUDA side of engine/backend_cpu_rnn.c, which is the
** specification (same workspace layout, same formulas, same order of the
** bias additions).
**
** Forward: the input projection x W_ih^T of every step is one GEMM into
** the workspace; then each step is one GEMM (h W_hh^T) and ONE fused
** pointwise kernel that applies the gates, writes h into out and into the
** workspace slot the next step starts from (so no per-step copy), and keeps
** what backward reads. Backward mirrors it: per step one fused kernel for
** the gate gradients (it also adds the step's output gradient into dh) and
** one GEMM that carries dh to the step before; then dx, dW_ih and dW_hh are
** one GEMM each over all steps and the bias gradients are column sums
** accumulated in double, as the CPU does.
**
** Workspace (kc_rnn.ws; kc_rnn.ws_at says where each region starts: the
** engine's kl_rnn_ws_layout, the one place that orders them), S = B*H
** elements per state, regions by time t:
**   hp  [T, B, H]   the state each step starts from
**   RNN   hn [T, B, H]
**   LSTM  c [T, B, H], c0 [B, H], g [T, B, 4H] (i, f, g, o), tc [T, B, H]
**   GRU   g [T, B, 4H] (r, z, n, W_hn h + b_hn)
** Step s runs time t = s, or T-1-s in reverse.
*/
#include "common.cuh"

/* {======================================================================
** Layout and helpers
** ======================================================================= */

static int64_t n_gates(int mode) {
  return mode == KEEL_RNN_LSTM ? 4 : mode == KEEL_RNN_GRU ? 3 : 1;
}

/* the CPU's logistic expression (backend_cpu_rnn.c), in R */
template <typename R>
__device__ __forceinline__ R sigm(R x) { return (R)1 / ((R)1 + kc_exp(-x)); }

/* dst[i] = src ? src[i] : 0 */
template <typename R>
__global__ void set_kernel(R *dst, const R *src, int64_t n) {
  KC_GRID_LOOP(i, n) dst[i] = src ? src[i] : (R)0;
}

/* out[j] = sum of A[r][j] over rows r, in double (colsum() of the CPU).
** 32 columns per block, the rows split among its 8 warps. */
#define CS_WARPS (KC_THREADS / 32)
template <typename R>
__global__ void colsum_kernel(R *out, const R *A, int64_t rows, int64_t cols) {
  KC_SHARED(double, part, [CS_WARPS][33]);
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  for (int64_t c0 = (int64_t)blockIdx.x * 32; c0 < cols; c0 += (int64_t)gridDim.x * 32) {
    int64_t c = c0 + lane;
    double s = 0;
    if (c < cols)
      for (int64_t r = w; r < rows; r += CS_WARPS) s += (double)A[r * cols + c];
    part[w][lane] = s;
    __syncthreads();
    if (w == 0 && c < cols) {
      double t = 0;
      for (int q = 0; q < CS_WARPS; q++) t += part[q][lane];
      out[c] = (R)t;
    }
    __syncthreads();               /* part is reused by the next chunk */
  }
}

/* C = op(A) op(B) + beta C, row-major (gemm() of the CPU), through
** kc_gemm (the matmul precision applies). Any size may be 0. */
template <typename R>
static int gemm(kc_state *s, int ta, int tb, int64_t M, int64_t N, int64_t K, const R *A, int64_t lda, const R *B,
                int64_t ldb, R beta, R *C, int64_t ldc) {
  return kc_gemm(s, kc_dtype_of<R>::v, ta, tb, M, N, K, A, lda, 0, B, ldb, 0, (double)beta, C, ldc, 0, 1);
}

template <typename R>
static int set_state(kc_state *s, R *dst, const kc_view *src, int64_t n) {
  if (n == 0) return KC_OK;
  KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, set_kernel<R>)(dst, src ? (const R *)src->data : NULL, n);
  return KC_LAUNCHED();
}

template <typename R>
static int colsum(kc_state *s, R *out, const R *A, int64_t rows, int64_t cols) {
  int64_t nb = (cols + 31) / 32;
  if (cols == 0) return KC_OK;
  KC_LAUNCH(kc_grid_x(nb), KC_THREADS, 0, s->stream, colsum_kernel<R>)(
      out, A, rows, cols);
  return KC_LAUNCHED();
}

/* }====================================================================== */

/* {======================================================================
** Fused step kernels, one thread per (b, j) of the B x H state. Each
** thread owns column j of every gate of row b, so the in-place updates
** of the gate rows never race.
** ======================================================================= */

/* pre [B, H]: x W_ih^T + h W_hh^T in, the new h out (also to ho, and to
** hn2, the next step's start, when given). */
template <typename R>
__global__ void rnn_fwd_kernel(R *pre, R *ho, R *hn2, const R *bi, const R *bh, int64_t B, int64_t H, int relu) {
  KC_GRID_LOOP(k, B * H) {
    int64_t j = k % H;
    R v = pre[k];
    if (bi) v += bi[j];
    if (bh) v += bh[j];
    v = relu ? (v < (R)0 ? (R)0 : v) : kc_tanh(v);   /* NaN stays NaN */
    pre[k] = v;
    ho[k] = v;
    if (hn2) hn2[k] = v;
  }
}

/* g [B, 4H]: x W_ih^T + h W_hh^T in, activated i, f, g, o out; cp the
** cell state before; cn, tc: c after and tanh(c); ho (hn2, cend when
** given) the new h (and c_n). */
template <typename R>
__global__ void lstm_fwd_kernel(R *g, const R *cp, R *cn, R *tc, R *ho, R *hn2, R *cend, const R *bi,
                                const R *bh, int64_t B, int64_t H) {
  KC_GRID_LOOP(k, B * H) {
    int64_t b = k / H, j = k - b * H;
    R *gr = g + b * 4 * H;
    R p[4];
    for (int q = 0; q < 4; q++) {
      R v = gr[q * H + j];
      if (bi) v += bi[q * H + j];
      if (bh) v += bh[q * H + j];
      p[q] = v;
    }
    R vi = sigm(p[0]), vf = sigm(p[1]), vg = kc_tanh(p[2]), vo = sigm(p[3]);
    R c = vf * cp[k] + vi * vg;
    R t = kc_tanh(c);
    R h = vo * t;
    gr[j] = vi; gr[H + j] = vf; gr[2 * H + j] = vg; gr[3 * H + j] = vo;
    cn[k] = c;
    tc[k] = t;
    ho[k] = h;
    if (hn2) hn2[k] = h;
    if (cend) cend[k] = c;
  }
}

/* g [B, 4H]: x W_ih^T in the first 3H in; r, z, n, W_hn h + b_hn out;
** gh [B, 3H]: h W_hh^T; hp the state before; ho (hn2) the new h. */
template <typename R>
__global__ void gru_fwd_kernel(R *g, const R *gh, const R *hp, R *ho, R *hn2, const R *bi, const R *bh,
                               int64_t B, int64_t H) {
  KC_GRID_LOOP(k, B * H) {
    int64_t b = k / H, j = k - b * H;
    R *gr = g + b * 4 * H;
    const R *sr = gh + b * 3 * H;
    R xi[3], sh[3];
    for (int q = 0; q < 3; q++) {
      xi[q] = gr[q * H + j];
      sh[q] = sr[q * H + j];
      if (bi) xi[q] += bi[q * H + j];
      if (bh) sh[q] += bh[q * H + j];
    }
    R r = sigm(xi[0] + sh[0]), z = sigm(xi[1] + sh[1]);
    R n = kc_tanh(xi[2] + r * sh[2]);
    R h = ((R)1 - z) * n + z * hp[k];
    gr[j] = r; gr[H + j] = z; gr[2 * H + j] = n; gr[3 * H + j] = sh[2];
    ho[k] = h;
    if (hn2) hn2[k] = h;
  }
}

/* dh = dh_in (NULL: 0) + go, the gradient of the step's h; hn the h;
** dg [B, H] of the pre-activation. */
template <typename R>
__global__ void rnn_bwd_kernel(R *dg, const R *hn, const R *dh_in, const R *go, int64_t n, int relu) {
  KC_GRID_LOOP(k, n) {
    R v = hn[k], d = (dh_in ? dh_in[k] : (R)0) + go[k];
    dg[k] = d * (relu ? (v > (R)0 ? (R)1 : (R)0) : (R)1 - v * v);
  }
}

/* dc_in: the gradient of c after (in), dc_out: of c before (out; may be
** dc_in); dg [B, 4H] of the gate pre-activations. */
template <typename R>
__global__ void lstm_bwd_kernel(R *dg, R *dc_out, const R *dc_in, const R *g, const R *tc, const R *cp,
                                const R *dh_in, const R *go, int64_t B, int64_t H) {
  KC_GRID_LOOP(k, B * H) {
    int64_t b = k / H, j = k - b * H;
    const R *gr = g + b * 4 * H;
    R *d = dg + b * 4 * H;
    R vi = gr[j], vf = gr[H + j], vg = gr[2 * H + j], vo = gr[3 * H + j], tv = tc[k];
    R dhv = (dh_in ? dh_in[k] : (R)0) + go[k];
    R dcv = dc_in[k] + dhv * vo * ((R)1 - tv * tv);
    d[j] = dcv * vg * vi * ((R)1 - vi);
    d[H + j] = dcv * cp[k] * vf * ((R)1 - vf);
    d[2 * H + j] = dcv * vi * ((R)1 - vg * vg);
    d[3 * H + j] = dhv * tv * vo * ((R)1 - vo);
    dc_out[k] = dcv * vf;
  }
}

/* dgi, dgh [B, 3H]: of x W_ih^T + b_ih and of h W_hh^T + b_hh; dh_out
** gets the part of dh through z * h before. */
template <typename R>
__global__ void gru_bwd_kernel(R *dgi, R *dgh, R *dh_out, const R *g, const R *hp, const R *dh_in, const R *go,
                               int64_t B, int64_t H) {
  KC_GRID_LOOP(k, B * H) {
    int64_t b = k / H, j = k - b * H;
    const R *gr = g + b * 4 * H;
    R *di = dgi + b * 3 * H, *ds = dgh + b * 3 * H;
    R r = gr[j], z = gr[H + j], nn = gr[2 * H + j], sn = gr[3 * H + j];
    R dhv = (dh_in ? dh_in[k] : (R)0) + go[k];
    R dn = dhv * ((R)1 - z) * ((R)1 - nn * nn);
    R dr = dn * sn * r * ((R)1 - r), dz = dhv * (hp[k] - nn) * z * ((R)1 - z);
    di[j] = dr; di[H + j] = dz; di[2 * H + j] = dn;
    ds[j] = dr; ds[H + j] = dz; ds[2 * H + j] = dn * r;
    dh_out[k] = dhv * z;
  }
}

/* }====================================================================== */

/* {======================================================================
** Entries
** ======================================================================= */

#define TRY(call) do { if ((rc = (call)) != KC_OK) return rc; } while (0)

/* v (when given) is a dense tensor of n elements of dtype dt. */
static int check(const kc_view *v, int dt, int64_t n, int required) {
  if (!v) return required ? KC_ERR_ARG : KC_OK;
  if (v->dtype != dt) return KC_ERR_DTYPE;
  if (v->numel != n) return KC_ERR_ARG;
  if (n == 0) return KC_OK;            /* the strides of an empty tensor mean nothing */
  return kc_contiguous(v) ? KC_OK : KC_ERR_ARG;
}

/* The regions this mode uses lie inside the workspace (the engine places
** them; a mismatch must not reach memory). */
static int check_regions(const kc_rnn *a) {
  const kc_rnn_ws &w = a->ws_at;
  int64_t S = a->B * a->H, TS = a->T * S;
  int lstm = a->mode == KEEL_RNN_LSTM, gated = lstm || a->mode == KEEL_RNN_GRU;
  const int64_t at[6] = {w.hp, w.hn, w.c, w.c0, w.g, w.tc};
  const int64_t len[6] = {TS, gated ? 0 : TS, lstm ? TS : 0, lstm ? S : 0, gated ? 4 * TS : 0, lstm ? TS : 0};
  for (int k = 0; k < 6; k++)
    if (len[k] && (at[k] < 0 || at[k] > w.total - len[k])) return KC_ERR_ARG;
  return KC_OK;
}

/* The arguments both directions share; *dt gets the dtype. */
static int check_common(const kc_rnn *a, int *dt) {
  int64_t T = a->T, B = a->B, In = a->In, H = a->H, GH = n_gates(a->mode) * H;
  int rc;
  if (!a->x) return KC_ERR_ARG;
  *dt = a->x->dtype;
  if (*dt != KEEL_F32 && *dt != KEEL_F64) return KC_ERR_DTYPE;
  if (a->mode < 0 || a->mode >= KEEL_RNN_MODE_COUNT || T < 1 || B < 0 || In < 0 || H < 1) return KC_ERR_ARG;
  if (a->c0 && a->mode != KEEL_RNN_LSTM) return KC_ERR_ARG;
  TRY(check(a->x, *dt, T * B * In, 1));
  TRY(check(a->w_ih, *dt, GH * In, 1));
  TRY(check(a->w_hh, *dt, GH * H, 1));
  TRY(check(a->ws, *dt, a->ws_at.total, 1));
  return check_regions(a);
}

template <typename R>
static int forward_t(kc_state *s, const kc_rnn *a) {
  int64_t T = a->T, B = a->B, In = a->In, H = a->H, S = B * H, GH = n_gates(a->mode) * H;
  int lstm = a->mode == KEEL_RNN_LSTM, gru = a->mode == KEEL_RNN_GRU, relu = a->mode == KEEL_RNN_RELU;
  const kc_rnn_ws &w = a->ws_at;
  R *W = (R *)a->ws->data, *O = (R *)a->out->data, *gh = NULL;
  const R *X = (const R *)a->x->data, *Wi = (const R *)a->w_ih->data, *Wh = (const R *)a->w_hh->data;
  const R *bi = a->b_ih ? (const R *)a->b_ih->data : NULL, *bh = a->b_hh ? (const R *)a->b_hh->data : NULL;
  unsigned nb = kc_blocks(S);
  int rc;
  if (gru && S > 0) {
    void *p;
    TRY(kc_scratch(s, (size_t)(B * GH) * sizeof(R), &p));
    gh = (R *)p;
  }
  /* x W_ih^T for every step: into the gates (row stride 4H), or the states */
  if (lstm || gru) TRY(gemm<R>(s, 0, 1, T * B, GH, In, X, In, Wi, In, 0, W + w.g, 4 * H));
  else TRY(gemm<R>(s, 0, 1, T * B, H, In, X, In, Wi, In, 0, W + w.hn, H));
  if (lstm) TRY(set_state<R>(s, W + w.c0, a->c0, S));
  TRY(set_state<R>(s, W + w.hp + (a->reverse ? T - 1 : 0) * S, a->h0, S));
  if (S == 0) return KC_OK;
  for (int64_t st = 0; st < T; st++) {
    int64_t t = a->reverse ? T - 1 - st : st, t_prev = a->reverse ? t + 1 : t - 1;
    int last = st == T - 1;
    R *hp = W + w.hp + t * S, *ho = O + t * S;
    /* the next step starts from this one's h */
    R *hn2 = last ? NULL : W + w.hp + (a->reverse ? t - 1 : t + 1) * S;
    if (lstm) {
      R *g = W + w.g + t * B * 4 * H;
      const R *cp = st == 0 ? W + w.c0 : W + w.c + t_prev * S;
      TRY(gemm<R>(s, 0, 1, B, GH, H, hp, H, Wh, H, 1, g, 4 * H));
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, lstm_fwd_kernel<R>)(g, cp, W + w.c + t * S, W + w.tc + t * S, ho, hn2,
                                                                  last ? O + T * S : NULL, bi, bh, B, H);
    } else if (gru) {
      R *g = W + w.g + t * B * 4 * H;
      TRY(gemm<R>(s, 0, 1, B, GH, H, hp, H, Wh, H, 0, gh, GH));
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, gru_fwd_kernel<R>)(g, gh, hp, ho, hn2, bi, bh, B, H);
    } else {
      R *pre = W + w.hn + t * S;
      TRY(gemm<R>(s, 0, 1, B, H, H, hp, H, Wh, H, 1, pre, H));
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, rnn_fwd_kernel<R>)(pre, ho, hn2, bi, bh, B, H, relu);
    }
    TRY(KC_LAUNCHED());
  }
  return KC_OK;
}

static int rnn_forward(kc_state *s, const kc_rnn *a) {
  int64_t S, GH;
  int dt, rc;
  if (!a) return KC_ERR_ARG;
  TRY(check_common(a, &dt));
  S = a->B * a->H;
  GH = n_gates(a->mode) * a->H;
  TRY(check(a->out, dt, (a->mode == KEEL_RNN_LSTM ? a->T + 1 : a->T) * S, 1));
  TRY(check(a->h0, dt, S, 0));
  TRY(check(a->c0, dt, S, 0));
  TRY(check(a->b_ih, dt, GH, 0));
  TRY(check(a->b_hh, dt, GH, 0));
  return dt == KEEL_F32 ? forward_t<float>(s, a) : forward_t<double>(s, a);
}

template <typename R>
static int backward_t(kc_state *s, const kc_rnn *a) {
  int64_t T = a->T, B = a->B, In = a->In, H = a->H, S = B * H, GH = n_gates(a->mode) * H;
  int lstm = a->mode == KEEL_RNN_LSTM, gru = a->mode == KEEL_RNN_GRU, relu = a->mode == KEEL_RNN_RELU;
  const kc_rnn_ws &w = a->ws_at;
  const R *W = (const R *)a->ws->data, *GO = (const R *)a->gout->data;
  const R *X = (const R *)a->x->data, *Wi = (const R *)a->w_ih->data, *Wh = (const R *)a->w_hh->data;
  int64_t n = T * B * GH;
  R *dGi, *dGh, *dh, *dc = NULL;
  unsigned nb = kc_blocks(S);
  void *p;
  int rc;
  /* scratch: dG (the GRU: of both products), dh, dc */
  TRY(kc_scratch(s, (size_t)((gru ? 2 : 1) * n + 2 * S) * sizeof(R), &p));
  dGi = (R *)p;
  dGh = gru ? dGi + n : dGi;
  dh = dGi + (gru ? 2 : 1) * n;
  if (lstm) dc = dh + S;
  for (int64_t st = T - 1; st >= 0 && S > 0; st--) {
    int64_t t = a->reverse ? T - 1 - st : st, t_prev = a->reverse ? t + 1 : t - 1;
    int first = st == T - 1;
    const R *dh_in = first ? NULL : dh, *go = GO + t * S;
    if (lstm) {
      const R *cp = st == 0 ? W + w.c0 : W + w.c + t_prev * S;
      /* the gradient of c_n seeds dc */
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, lstm_bwd_kernel<R>)(dGi + t * B * GH, dc, first ? GO + T * S : dc,
                                                                  W + w.g + t * B * 4 * H, W + w.tc + t * S, cp,
                                                                  dh_in, go, B, H);
    } else if (gru) {
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, gru_bwd_kernel<R>)(dGi + t * B * GH, dGh + t * B * GH, dh,
                                                                 W + w.g + t * B * 4 * H, W + w.hp + t * S, dh_in,
                                                                 go, B, H);
    } else {
      KC_LAUNCH(nb, KC_THREADS, 0, s->stream, rnn_bwd_kernel<R>)(dGi + t * B * GH, W + w.hn + t * S, dh_in, go, S,
                                                                 relu);
    }
    TRY(KC_LAUNCHED());
    /* dh of the state the step started from: through W_hh (and, for a
    ** GRU, the z * h term the kernel left in dh) */
    if (st > 0 || a->dh0) TRY(gemm<R>(s, 0, 0, B, H, GH, dGh + t * B * GH, GH, Wh, H, gru ? 1 : 0, dh, H));
  }
  if (S > 0 && a->dh0) TRY(kc_check_cuda(cudaMemcpyAsync(a->dh0->data, dh, (size_t)S * sizeof(R),
                                                         cudaMemcpyDeviceToDevice, s->stream)));
  if (S > 0 && a->dc0) TRY(kc_check_cuda(cudaMemcpyAsync(a->dc0->data, dc, (size_t)S * sizeof(R),
                                                         cudaMemcpyDeviceToDevice, s->stream)));
  if (a->dw_hh) TRY(gemm<R>(s, 1, 0, GH, H, T * B, dGh, GH, W + w.hp, H, 0, (R *)a->dw_hh->data, H));
  if (a->dw_ih) TRY(gemm<R>(s, 1, 0, GH, In, T * B, dGi, GH, X, In, 0, (R *)a->dw_ih->data, In));
  if (a->dx) TRY(gemm<R>(s, 0, 0, T * B, In, GH, dGi, GH, Wi, In, 0, (R *)a->dx->data, In));
  if (a->db_ih) TRY(colsum<R>(s, (R *)a->db_ih->data, dGi, T * B, GH));
  if (a->db_hh) {
    if (!gru && a->db_ih)           /* the same sum */
      TRY(kc_check_cuda(cudaMemcpyAsync(a->db_hh->data, a->db_ih->data, (size_t)GH * sizeof(R),
                                        cudaMemcpyDeviceToDevice, s->stream)));
    else TRY(colsum<R>(s, (R *)a->db_hh->data, dGh, T * B, GH));
  }
  return KC_OK;
}

static int rnn_backward(kc_state *s, const kc_rnn *a) {
  int64_t S, GH;
  int dt, rc;
  if (!a) return KC_ERR_ARG;
  TRY(check_common(a, &dt));
  S = a->B * a->H;
  GH = n_gates(a->mode) * a->H;
  TRY(check(a->gout, dt, (a->mode == KEEL_RNN_LSTM ? a->T + 1 : a->T) * S, 1));
  TRY(check(a->dx, dt, a->T * a->B * a->In, 0));
  TRY(check(a->dh0, dt, S, 0));
  TRY(check(a->dc0, dt, S, 0));
  if (a->dc0 && a->mode != KEEL_RNN_LSTM) return KC_ERR_ARG;
  TRY(check(a->dw_ih, dt, GH * a->In, 0));
  TRY(check(a->dw_hh, dt, GH * a->H, 0));
  TRY(check(a->db_ih, dt, GH, 0));
  TRY(check(a->db_hh, dt, GH, 0));
  return dt == KEEL_F32 ? backward_t<float>(s, a) : backward_t<double>(s, a);
}

/* }====================================================================== */

void kc_register_rnn(keel_cuda_table *t) {
  t->rnn_forward = rnn_forward;
  t->rnn_backward = rnn_backward;
}
