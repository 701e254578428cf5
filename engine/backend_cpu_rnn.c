/*
** backend_cpu_rnn.c: CPU kernels of the recurrent cells and layers
** (rnn.c). BLAS does the matrix products; the gate nonlinearities and
** their derivatives run in one fused loop per step.
**
** Forward: the input projection x W_ih^T of every step is one GEMM (the
** steps do not depend on each other there); then each step adds
** h W_hh^T with one GEMM and applies its gates. Backward walks the steps
** in reverse for the gate gradients dG (one GEMM per step carries dh to
** the step before), then dx, dW_ih and dW_hh are one GEMM each over all
** steps at once and the bias gradients are column sums of dG. Under a
** reduced matmul precision W_hh is rounded once per call, not per step
** (step_weight).
**
** The workspace made by forward and read by backward holds, with
** S = B*H elements per state and every region indexed by time t:
**   hp  [T, B, H]   the state each step starts from (h0 at the first step)
**   RNN   hn [T, B, H]   the state each step ends with
**   LSTM  c  [T, B, H]   the cell state each step ends with; c0 [B, H];
**         g  [T, B, 4H]  activated gates i, f, g, o; tc [T, B, H] tanh(c)
**   GRU   g  [T, B, 4H]  r, z, n and W_hn h + b_hn
** Step s runs time t = s, or T-1-s in reverse; out is always by time.
*/
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "keel_impl.h"

static int64_t n_gates(int mode) {
  return mode == KEEL_RNN_LSTM ? 4 : mode == KEEL_RNN_GRU ? 3 : 1;
}

kl_rnn_ws kl_rnn_ws_layout(const kl_rnn_args *a) {
  int64_t TS = a->T * a->B * a->H;
  kl_rnn_ws w;
  memset(&w, 0, sizeof w);
  w.total = TS;                                  /* hp */
  if (a->mode == KEEL_RNN_LSTM) {
    w.c = w.total;  w.total += TS;
    w.c0 = w.total; w.total += a->B * a->H;
    w.g = w.total;  w.total += 4 * TS;
    w.tc = w.total; w.total += TS;
  } else if (a->mode == KEEL_RNN_GRU) {
    w.g = w.total;  w.total += 4 * TS;
  } else {
    w.hn = w.total; w.total += TS;
  }
  return w;
}

/* C = op(A) op(B) + beta C, row-major, in dt (the matmul precision
** applies: gemm.c); any size may be 0. Needs st and a done label. */
#define GEMM(...) do { if ((st = kl_cpu_gemm(ctx, __VA_ARGS__))) goto done; } while (0)
/* The per-step products by W_hh: GEMM with W_hh (operand b) as
** step_weight gave it, rounded already when wh_ready says so. */
#define GEMM_WH(...) do { if ((st = kl_cpu_gemm_ex(ctx, wh_ready, __VA_ARGS__))) goto done; } while (0)

/* W_hh [GH, H] as every step multiplies by it. Under a reduced matmul
** precision a float32 W_hh would be rounded again by each step's product
** (T times per call, the same values): it is rounded once here into *keep
** (released by the caller), *wh points there and *ready says so to
** kl_cpu_gemm_ex. Otherwise *wh is W_hh itself, *keep NULL, *ready 0. */
static keel_status step_weight(keel_ctx *ctx, const kl_rnn_args *a, int64_t GH, const char **wh,
                               keel_tensor **keep, unsigned *ready) {
  int64_t n = GH * a->H;
  keel_status st;
  *wh = (const char *)kl_data(a->w_hh);
  *keep = NULL;
  *ready = 0;
  if (a->w_hh->dtype != KEEL_F32 || ctx->gemm_prec == KEEL_MATMUL_HIGHEST || n == 0) return KEEL_OK;
  if ((st = kl_new(ctx, KEEL_F32, KEEL_CPU, 1, &n, keep))) return st;
  kl_round_matrix(ctx->gemm_prec, (float *)kl_data(*keep), (const float *)*wh, GH, a->H, a->H);
  *wh = (const char *)kl_data(*keep);
  *ready = KL_GEMM_B_ROUNDED;
  return KEEL_OK;
}

/* out[j] = sum over rows of A[row][j], accumulated in double. */
static keel_status colsum(keel_ctx *ctx, keel_dtype dt, const char *A, int64_t rows, int64_t cols,
                          keel_tensor *out) {
  keel_tensor *acc;
  double *s;
  keel_status st = kl_new(ctx, KEEL_F64, KEEL_CPU, 1, &cols, &acc);
  if (st) return st;
  s = (double *)kl_data(acc);
  memset(s, 0, sizeof(double) * (size_t)cols);
  if (dt == KEEL_F32) {
    for (int64_t r = 0; r < rows; r++) {
      const float *row = (const float *)A + r * cols;
      for (int64_t j = 0; j < cols; j++) s[j] += row[j];
    }
    for (int64_t j = 0; j < cols; j++) ((float *)kl_data(out))[j] = (float)s[j];
  } else {
    for (int64_t r = 0; r < rows; r++) {
      const double *row = (const double *)A + r * cols;
      for (int64_t j = 0; j < cols; j++) s[j] += row[j];
    }
    memcpy(kl_data(out), s, sizeof(double) * (size_t)cols);
  }
  keel_tensor_release(acc);
  return KEEL_OK;
}

/* {======================================================================
** Gate nonlinearities over arrays, in place. The exp and tanh calls of
** libm (glibc's tanhf goes through expm1f) took a quarter of a char-LSTM
** training step; float uses a Cephes-style exp (degree-6 polynomial after
** range reduction, within 2 ulp of expf), four at a time with SSE2 where
** it is there, and the same formulas one at a time elsewhere. float64
** keeps libm (the gradient checks run in float64).
**   sigmoid(x) = 1 / (1 + e^-x)
**   tanh(x)    = sign(x) (1 - e^-2|x|) / (1 + e^-2|x|), or for |x| < 1/8,
**                where 1 - e^-2|x| cancels, the odd Taylor polynomial to
**                x^9 (the first omitted term is below 2e-10 |x|)
** Both stay within a few ulp of the exact values and pass NaN through.
** ======================================================================= */

#define EXP_HI 88.0f            /* e^x stays finite in float below this */
#define EXP_LO -87.0f           /* and normal above this */
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f     /* ln 2 split in two for the reduction */
#define LN2_LO -2.12194440e-4f
#define TANH_SMALL 0.125f

/* p(r) ~ e^r on [-ln2/2, ln2/2] */
#define EXP_POLY(r, MUL, ADD, C) \
  ADD(MUL(ADD(MUL(ADD(MUL(ADD(MUL(ADD(MUL(ADD(MUL(C(1.9875691500e-4f), r), C(1.3981999507e-3f)), r), \
  C(8.3334519073e-3f)), r), C(4.1665795894e-2f)), r), C(1.6666665459e-1f)), r), C(5.0000001201e-1f)), \
  MUL(r, r)), ADD(r, C(1.0f)))
#define TANH_POLY(x, x2, MUL, ADD, C) \
  ADD(x, MUL(MUL(x, x2), ADD(C(-1.0f / 3), MUL(x2, ADD(C(2.0f / 15), MUL(x2, ADD(C(-17.0f / 315), \
  MUL(x2, C(62.0f / 2835)))))))))
#define SMUL(a, b) ((a) * (b))
#define SADD(a, b) ((a) + (b))
#define SCONST(c) (c)

/* e^x for x in [EXP_LO, EXP_HI] (clamped), NaN passed through */
static float exp_f32(float x) {
  float k, r, s;
  uint32_t e;
  if (x > EXP_HI) x = EXP_HI;
  if (x < EXP_LO) x = EXP_LO;
  k = nearbyintf(x * LOG2E);
  r = x - k * LN2_HI;
  r = r - k * LN2_LO;
  e = (uint32_t)((int32_t)(x == x ? k : 0) + 127) << 23;   /* 2^k */
  memcpy(&s, &e, sizeof s);
  return EXP_POLY(r, SMUL, SADD, SCONST) * s;
}

static float sigmoid_1(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

static float tanh_1(float x) {
  float a = fabsf(x), t;
  if (a < TANH_SMALL) return TANH_POLY(x, x * x, SMUL, SADD, SCONST);
  t = exp_f32(-2.0f * a);
  return copysignf((1.0f - t) / (1.0f + t), x);
}

#if defined(__SSE2__)
#include <emmintrin.h>
#define VMUL(a, b) _mm_mul_ps(a, b)
#define VADD(a, b) _mm_add_ps(a, b)
#define VCONST(c) _mm_set1_ps(c)

/* Four exp_f32 at once. MAXPS/MINPS return their second operand when one
** is NaN, so NaN survives the clamp and the polynomial. */
static __m128 exp_4(__m128 x) {
  __m128 k, r, s;
  __m128i ki;
  x = _mm_min_ps(_mm_set1_ps(EXP_HI), x);
  x = _mm_max_ps(_mm_set1_ps(EXP_LO), x);
  ki = _mm_cvtps_epi32(_mm_mul_ps(x, _mm_set1_ps(LOG2E)));   /* rounds to nearest */
  k = _mm_cvtepi32_ps(ki);
  r = _mm_sub_ps(x, _mm_mul_ps(k, _mm_set1_ps(LN2_HI)));
  r = _mm_sub_ps(r, _mm_mul_ps(k, _mm_set1_ps(LN2_LO)));
  s = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(ki, _mm_set1_epi32(127)), 23));
  return _mm_mul_ps(EXP_POLY(r, VMUL, VADD, VCONST), s);
}
#endif

static void sigmoid_f32(float *x, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128 one = _mm_set1_ps(1.0f), zero = _mm_setzero_ps();
  for (; i + 4 <= n; i += 4) {
    __m128 e = exp_4(_mm_sub_ps(zero, _mm_loadu_ps(x + i)));
    _mm_storeu_ps(x + i, _mm_div_ps(one, _mm_add_ps(one, e)));
  }
#endif
  for (; i < n; i++) x[i] = sigmoid_1(x[i]);
}

static void tanh_f32(float *x, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128 one = _mm_set1_ps(1.0f), sign = _mm_set1_ps(-0.0f), small = _mm_set1_ps(TANH_SMALL);
  for (; i + 4 <= n; i += 4) {
    __m128 v = _mm_loadu_ps(x + i);
    __m128 a = _mm_andnot_ps(sign, v);
    __m128 t = exp_4(_mm_mul_ps(a, _mm_set1_ps(-2.0f)));
    __m128 big = _mm_div_ps(_mm_sub_ps(one, t), _mm_add_ps(one, t));
    __m128 v2 = _mm_mul_ps(v, v);
    __m128 poly = TANH_POLY(v, v2, VMUL, VADD, VCONST);
    __m128 use_poly = _mm_cmplt_ps(a, small);           /* false for NaN: big is NaN */
    big = _mm_or_ps(big, _mm_and_ps(sign, v));          /* sign of x (big >= 0) */
    _mm_storeu_ps(x + i, _mm_or_ps(_mm_and_ps(use_poly, poly), _mm_andnot_ps(use_poly, big)));
  }
#endif
  for (; i < n; i++) x[i] = tanh_1(x[i]);
}

static void sigmoid_f64(double *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] = 1.0 / (1.0 + exp(-x[i]));
}

static void tanh_f64(double *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] = tanh(x[i]);
}

/* }====================================================================== */

/* {======================================================================
** One step of each cell, forward and backward. R is float or double, SIG
** and TANH the in-place array functions of that type. Pointers are char *
** into contiguous rows (B rows of the widths named in the comments).
** ======================================================================= */

/* v[0..n) += b[0..n) when b is given */
#define ADD_BIAS(R, v, b, n) do { \
    if (b) { const R *b_ = (const R *)(b); for (int64_t j_ = 0; j_ < (n); j_++) (v)[j_] += b_[j_]; } \
  } while (0)

/* g [B, 4H]: x W_ih^T + h W_hh^T in, activated i, f, g, o out;
** cp, cn, tc, ho [B, H]: c before, c after, tanh(c after), h after. */
#define LSTM_FWD(R, SIG, TANH) do { \
    const R *cp_ = (const R *)cp; \
    R *cn_ = (R *)cn, *tc_ = (R *)tc, *ho_ = (R *)ho; \
    for (int64_t b = 0; b < B; b++) { \
      R *gr = (R *)g + b * 4 * H, *cr = cn_ + b * H, *tr = tc_ + b * H, *hr = ho_ + b * H; \
      const R *pr = cp_ + b * H; \
      ADD_BIAS(R, gr, bi, 4 * H); \
      ADD_BIAS(R, gr, bh, 4 * H); \
      SIG(gr, 2 * H); \
      TANH(gr + 2 * H, H); \
      SIG(gr + 3 * H, H); \
      for (int64_t j = 0; j < H; j++) tr[j] = cr[j] = gr[H + j] * pr[j] + gr[j] * gr[2 * H + j]; \
      TANH(tr, H); \
      for (int64_t j = 0; j < H; j++) hr[j] = gr[3 * H + j] * tr[j]; \
    } \
  } while (0)

/* g [B, 4H]: x W_ih^T in the first 3H in; r, z, n, W_hn h + b_hn out;
** gh [B, 3H]: h W_hh^T (scratch); hp, ho [B, H]: h before and after. */
#define GRU_FWD(R, SIG, TANH) do { \
    const R *hp_ = (const R *)hp; \
    R *ho_ = (R *)ho; \
    for (int64_t b = 0; b < B; b++) { \
      R *gr = (R *)g + b * 4 * H, *sr = (R *)gh + b * 3 * H, *hr = ho_ + b * H; \
      const R *pr = hp_ + b * H; \
      ADD_BIAS(R, gr, bi, 3 * H); \
      ADD_BIAS(R, sr, bh, 3 * H); \
      for (int64_t j = 0; j < 2 * H; j++) gr[j] += sr[j]; \
      SIG(gr, 2 * H); \
      for (int64_t j = 0; j < H; j++) { \
        gr[3 * H + j] = sr[2 * H + j]; \
        gr[2 * H + j] += gr[j] * sr[2 * H + j]; \
      } \
      TANH(gr + 2 * H, H); \
      for (int64_t j = 0; j < H; j++) hr[j] = ((R)1 - gr[H + j]) * gr[2 * H + j] + gr[H + j] * pr[j]; \
    } \
  } while (0)

/* pre [B, H]: x W_ih^T + h W_hh^T in, the new h out. */
#define RNN_FWD(R, TANH) do { \
    R *p_ = (R *)pre; \
    for (int64_t b = 0; b < B; b++) { \
      ADD_BIAS(R, p_ + b * H, bi, H); \
      ADD_BIAS(R, p_ + b * H, bh, H); \
    } \
    if (relu) { \
      for (int64_t k = 0; k < B * H; k++) if (p_[k] < 0) p_[k] = 0; \
    } else { \
      TANH(p_, B * H); \
    } \
  } while (0)

/* dh [B, H]: gradient of h after the step (in); dc [B, H]: of c after
** (in), of c before (out); dg [B, 4H]: of the gate pre-activations. */
#define LSTM_BWD(R) do { \
    const R *tc_ = (const R *)tc, *cp_ = (const R *)cp, *dh_ = (const R *)dh; \
    R *dc_ = (R *)dc; \
    for (int64_t b = 0; b < B; b++) { \
      const R *gr = (const R *)g + b * 4 * H; \
      R *d = (R *)dg + b * 4 * H; \
      for (int64_t j = 0; j < H; j++) { \
        int64_t k = b * H + j; \
        R vi = gr[j], vf = gr[H + j], vg = gr[2 * H + j], vo = gr[3 * H + j], tv = tc_[k]; \
        R dhv = dh_[k], dcv = dc_[k] + dhv * vo * ((R)1 - tv * tv); \
        d[j] = dcv * vg * vi * ((R)1 - vi); \
        d[H + j] = dcv * cp_[k] * vf * ((R)1 - vf); \
        d[2 * H + j] = dcv * vi * ((R)1 - vg * vg); \
        d[3 * H + j] = dhv * tv * vo * ((R)1 - vo); \
        dc_[k] = dcv * vf; \
      } \
    } \
  } while (0)

/* dh [B, H]: gradient of h after (in), its part through z * h before
** (out); dgi, dgh [B, 3H]: of x W_ih^T + b_ih and of h W_hh^T + b_hh. */
#define GRU_BWD(R) do { \
    const R *hp_ = (const R *)hp; \
    R *dh_ = (R *)dh; \
    for (int64_t b = 0; b < B; b++) { \
      const R *gr = (const R *)g + b * 4 * H; \
      R *di = (R *)dgi + b * 3 * H, *ds = (R *)dgh + b * 3 * H; \
      for (int64_t j = 0; j < H; j++) { \
        int64_t k = b * H + j; \
        R r = gr[j], z = gr[H + j], nn = gr[2 * H + j], sn = gr[3 * H + j], dhv = dh_[k]; \
        R dn = dhv * ((R)1 - z) * ((R)1 - nn * nn); \
        R dr = dn * sn * r * ((R)1 - r), dz = dhv * (hp_[k] - nn) * z * ((R)1 - z); \
        di[j] = dr; di[H + j] = dz; di[2 * H + j] = dn; \
        ds[j] = dr; ds[H + j] = dz; ds[2 * H + j] = dn * r; \
        dh_[k] = dhv * z; \
      } \
    } \
  } while (0)

/* hn [B, H]: the step's output; dg [B, H]: of the pre-activation. */
#define RNN_BWD(R) do { \
    const R *h_ = (const R *)hn, *dh_ = (const R *)dh; \
    R *d = (R *)dg; \
    for (int64_t k = 0; k < B * H; k++) { \
      R v = h_[k]; \
      d[k] = dh_[k] * (relu ? (v > 0 ? (R)1 : (R)0) : (R)1 - v * v); \
    } \
  } while (0)

/* dst += src over n elements. */
static void add_into(keel_dtype dt, char *dst, const char *src, int64_t n) {
  if (dt == KEEL_F32) {
    float *d = (float *)dst;
    const float *s = (const float *)src;
    for (int64_t i = 0; i < n; i++) d[i] += s[i];
  } else {
    double *d = (double *)dst;
    const double *s = (const double *)src;
    for (int64_t i = 0; i < n; i++) d[i] += s[i];
  }
}

/* }====================================================================== */

/* {======================================================================
** Forward and backward over the steps
** ======================================================================= */

keel_status kl_cpu_rnn_forward(keel_ctx *ctx, kl_rnn_args *a) {
  keel_dtype dt = a->x->dtype;
  int64_t es = (int64_t)kl_dtype_size[dt];
  int64_t T = a->T, B = a->B, In = a->In, H = a->H, S = B * H, GH = n_gates(a->mode) * H;
  int lstm = a->mode == KEEL_RNN_LSTM, gru = a->mode == KEEL_RNN_GRU, relu = a->mode == KEEL_RNN_RELU;
  kl_rnn_ws w = kl_rnn_ws_layout(a);
  keel_tensor *ws = NULL, *scratch = NULL;
  char *W, *O = (char *)kl_data(a->out);
  const char *X = (const char *)kl_data(a->x), *Wi = (const char *)kl_data(a->w_ih);
  const char *Wh;
  const char *bi = a->b_ih ? (const char *)kl_data(a->b_ih) : NULL;
  const char *bh = a->b_hh ? (const char *)kl_data(a->b_hh) : NULL;
  keel_tensor *whr = NULL;
  unsigned wh_ready;
  int64_t t_prev = 0;
  keel_status st;
  a->ws = NULL;
  if ((st = step_weight(ctx, a, GH, &Wh, &whr, &wh_ready))) return st;
  if ((st = kl_new(ctx, dt, KEEL_CPU, 1, &w.total, &ws))) goto done;
  if (gru) {
    int64_t n = B * GH;
    if ((st = kl_new(ctx, dt, KEEL_CPU, 1, &n, &scratch))) goto done;
  }
  W = (char *)kl_data(ws);
  /* x W_ih^T for every step: into the gates (row stride 4H), or the states */
  if (lstm || gru) GEMM(dt, 0, 1, T * B, GH, In, X, In, Wi, In, 0, W + w.g * es, 4 * H);
  else GEMM(dt, 0, 1, T * B, H, In, X, In, Wi, In, 0, W + w.hn * es, H);
  if (lstm) {
    if (a->c0) memcpy(W + w.c0 * es, kl_data(a->c0), (size_t)(S * es));
    else memset(W + w.c0 * es, 0, (size_t)(S * es));
  }
  for (int64_t s = 0; s < T; s++) {
    int64_t t = a->reverse ? T - 1 - s : s;
    char *hp = W + (w.hp + t * S) * es, *ho = O + t * S * es;
    if (s > 0) memcpy(hp, O + t_prev * S * es, (size_t)(S * es));
    else if (a->h0) memcpy(hp, kl_data(a->h0), (size_t)(S * es));
    else memset(hp, 0, (size_t)(S * es));
    if (lstm) {
      char *g = W + (w.g + t * B * 4 * H) * es;
      const char *cp = s == 0 ? W + w.c0 * es : W + (w.c + t_prev * S) * es;
      char *cn = W + (w.c + t * S) * es, *tc = W + (w.tc + t * S) * es;
      GEMM_WH(dt, 0, 1, B, GH, H, hp, H, Wh, H, 1.0, g, 4 * H);
      if (dt == KEEL_F32) LSTM_FWD(float, sigmoid_f32, tanh_f32); else LSTM_FWD(double, sigmoid_f64, tanh_f64);
    } else if (gru) {
      char *g = W + (w.g + t * B * 4 * H) * es, *gh = (char *)kl_data(scratch);
      GEMM_WH(dt, 0, 1, B, GH, H, hp, H, Wh, H, 0.0, gh, GH);
      if (dt == KEEL_F32) GRU_FWD(float, sigmoid_f32, tanh_f32); else GRU_FWD(double, sigmoid_f64, tanh_f64);
    } else {
      char *pre = W + (w.hn + t * S) * es;
      GEMM_WH(dt, 0, 1, B, H, H, hp, H, Wh, H, 1.0, pre, H);
      if (dt == KEEL_F32) RNN_FWD(float, tanh_f32); else RNN_FWD(double, tanh_f64);
      memcpy(ho, pre, (size_t)(S * es));
    }
    t_prev = t;
  }
  if (lstm) memcpy(O + T * S * es, W + (w.c + t_prev * S) * es, (size_t)(S * es));  /* c_n */
  keel_tensor_release(scratch);
  keel_tensor_release(whr);
  a->ws = ws;
  return KEEL_OK;
done:
  keel_tensor_release(scratch);
  keel_tensor_release(whr);
  keel_tensor_release(ws);
  return st;
}

keel_status kl_cpu_rnn_backward(keel_ctx *ctx, kl_rnn_args *a) {
  keel_dtype dt = a->x->dtype;
  int64_t es = (int64_t)kl_dtype_size[dt];
  int64_t T = a->T, B = a->B, In = a->In, H = a->H, S = B * H, GH = n_gates(a->mode) * H;
  int lstm = a->mode == KEEL_RNN_LSTM, gru = a->mode == KEEL_RNN_GRU, relu = a->mode == KEEL_RNN_RELU;
  kl_rnn_ws w = kl_rnn_ws_layout(a);
  const char *W = (const char *)kl_data(a->ws), *GO = (const char *)kl_data(a->gout);
  const char *X = (const char *)kl_data(a->x), *Wi = (const char *)kl_data(a->w_ih);
  const char *Wh;
  keel_tensor *tgi = NULL, *tgh = NULL, *tdh = NULL, *tdc = NULL, *whr = NULL;
  char *dGi, *dGh, *dh, *dc = NULL;
  int64_t n = T * B * GH;
  unsigned wh_ready;
  keel_status st;
  if ((st = step_weight(ctx, a, GH, &Wh, &whr, &wh_ready))) goto done;
  if ((st = kl_new(ctx, dt, KEEL_CPU, 1, &n, &tgi))) goto done;
  if (gru && (st = kl_new(ctx, dt, KEEL_CPU, 1, &n, &tgh))) goto done;
  if ((st = kl_new(ctx, dt, KEEL_CPU, 1, &S, &tdh))) goto done;
  if (lstm && (st = kl_new(ctx, dt, KEEL_CPU, 1, &S, &tdc))) goto done;
  dGi = (char *)kl_data(tgi);
  dGh = gru ? (char *)kl_data(tgh) : dGi;
  dh = (char *)kl_data(tdh);
  memset(dh, 0, (size_t)(S * es));
  if (lstm) {
    dc = (char *)kl_data(tdc);
    memcpy(dc, GO + T * S * es, (size_t)(S * es));  /* gradient of c_n */
  }
  for (int64_t s = T - 1; s >= 0; s--) {
    int64_t t = a->reverse ? T - 1 - s : s;
    int64_t t_prev = a->reverse ? t + 1 : t - 1;     /* time of step s - 1 */
    add_into(dt, dh, GO + t * S * es, S);
    if (lstm) {
      const char *g = W + (w.g + t * B * 4 * H) * es, *tc = W + (w.tc + t * S) * es;
      const char *cp = s == 0 ? W + w.c0 * es : W + (w.c + t_prev * S) * es;
      char *dg = dGi + t * B * GH * es;
      if (dt == KEEL_F32) LSTM_BWD(float); else LSTM_BWD(double);
    } else if (gru) {
      const char *g = W + (w.g + t * B * 4 * H) * es, *hp = W + (w.hp + t * S) * es;
      char *dgi = dGi + t * B * GH * es, *dgh = dGh + t * B * GH * es;
      if (dt == KEEL_F32) GRU_BWD(float); else GRU_BWD(double);
    } else {
      const char *hn = W + (w.hn + t * S) * es;
      char *dg = dGi + t * B * GH * es;
      if (dt == KEEL_F32) RNN_BWD(float); else RNN_BWD(double);
    }
    /* dh of the state the step started from: through W_hh (and, for a
    ** GRU, the z * h term already in dh) */
    if (s > 0 || a->dh0)
      GEMM_WH(dt, 0, 0, B, H, GH, dGh + t * B * GH * es, GH, Wh, H, gru ? 1.0 : 0.0, dh, H);
  }
  if (a->dh0) memcpy(kl_data(a->dh0), dh, (size_t)(S * es));
  if (a->dc0) memcpy(kl_data(a->dc0), dc, (size_t)(S * es));
  if (a->dw_hh) GEMM(dt, 1, 0, GH, H, T * B, dGh, GH, W + w.hp * es, H, 0.0, kl_data(a->dw_hh), H);
  if (a->dw_ih) GEMM(dt, 1, 0, GH, In, T * B, dGi, GH, X, In, 0.0, kl_data(a->dw_ih), In);
  if (a->dx) GEMM(dt, 0, 0, T * B, In, GH, dGi, GH, Wi, In, 0.0, kl_data(a->dx), In);
  if (a->db_ih && (st = colsum(ctx, dt, dGi, T * B, GH, a->db_ih))) goto done;
  if (a->db_hh) {
    if (!gru && a->db_ih) memcpy(kl_data(a->db_hh), kl_data(a->db_ih), (size_t)(GH * es));  /* same sum */
    else if ((st = colsum(ctx, dt, dGh, T * B, GH, a->db_hh))) goto done;
  }
done:
  keel_tensor_release(tgi);
  keel_tensor_release(tgh);
  keel_tensor_release(tdh);
  keel_tensor_release(tdc);
  keel_tensor_release(whr);
  return st;
}

/* }====================================================================== */
