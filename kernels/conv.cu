/*
** conv.cu: conv2d and the 2-D pools (max, average, adaptive average) on
** the device. The specification is the CPU backend (engine/backend_cpu_conv.c,
** geometry from engine/conv.c): dense NCHW operands, float32 and float64,
** fresh outputs every element of which is written here.
**
** conv2d lowers images to a column matrix (im2col into kc_scratch, a
** chunk of images at a time so the scratch stays under COL_MAX_BYTES) and
** multiplies with cuBLAS. Forward keeps one [C*kh*kw, oh*ow] block per
** image, so a strided-batched GEMM (weights at stride 0) writes NCHW
** output directly. Backward:
** - gw sums over the images of a chunk, so there the columns are laid out
**   [C*kh*kw, nb*oh*ow] (the CPU's layout) and gout is transposed to
**   [oc, nb*oh*ow]: one GEMM per group with a long inner dimension;
** - gx goes through per-image dcol = W^T gout (strided-batched) and a
**   gather col2im: each input pixel sums its taps in a fixed order (the
**   CPU's), so the result is deterministic without atomics;
** - gb is one block per output channel, or per (channel, slice of its
**   n*P elements) with an ordered second pass when channels are few.
** A 1x1, stride-1, unpadded kernel skips im2col: x already is the column
** matrix.
**
** Pool backward passes are gathers too (one thread per input pixel that
** visits the outputs whose window can hold it, in the CPU's order), so
** they add in the same order as the CPU's scatter and need no atomics.
**
** The window kernels index with int when the tensors allow it (geo<I>):
** a GPU divides 32-bit integers several times faster than 64-bit ones.
*/
#include "common.cuh"

/* The most bytes one chunk of im2col (and transposed gout) may take. The
** simulator's is small, so the tests' modest sizes run several chunks. */
#ifdef KEEL_CUDA_SIM
#define COL_MAX_BYTES ((int64_t)64 << 10)
#else
#define COL_MAX_BYTES ((int64_t)256 << 20)
#endif
#define INT_LIMIT ((int64_t)0x7fffffff)

/* Row-major products through kc_gemm (gemm.cu: the matmul precision
** applies); callers keep sizes under 2^31 and k > 0. */
template <typename T>
static int rm_gemm(kc_state *s, int ta, int tb, int64_t m, int64_t n, int64_t k, const T *A, int64_t lda,
                   int64_t sA, const T *B, int64_t ldb, int64_t sB, T beta, T *C, int64_t ldc, int64_t sC,
                   int64_t batch) {
  return kc_gemm(s, kc_dtype_of<T>::v, ta, tb, m, n, k, A, lda, sA, B, ldb, sB, (double)beta, C, ldc, sC, batch);
}

/* {======================================================================
** conv2d kernels
** ======================================================================= */

/*
** The window geometry in the index type I of a launch: int when every
** offset the kernel forms (and the grid loop's last step) stays under
** 2^31, which spares the GPU 64-bit divisions; int64_t otherwise.
*/
template <typename I>
struct geo {
  I c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
};

template <typename I>
static geo<I> geo_of(const kc_win2d *g) {
  geo<I> q;
  q.c = (I)g->c; q.h = (I)g->h; q.w = (I)g->w; q.oh = (I)g->oh; q.ow = (I)g->ow;
  q.kh = (I)g->k[0]; q.kw = (I)g->k[1]; q.sh = (I)g->s[0]; q.sw = (I)g->s[1];
  q.ph = (I)g->pad[0]; q.pw = (I)g->pad[1]; q.dh = (I)g->dil[0]; q.dw = (I)g->dil[1];
  return q;
}

/* int indices suffice when no offset reaches 2^30 (the grid loop adds at
** most KC_MAX_BLOCKS*KC_THREADS < 2^28 past the end). */
#define SMALL_INDEX(n) ((n) < ((int64_t)1 << 30))

#define GRID_LOOP(I, t, n) for (I t = (I)(blockIdx.x * blockDim.x + threadIdx.x); t < (n); t += (I)(gridDim.x * blockDim.x))

/*
** Columns of nb images: one thread per (image, channel, output pixel)
** writes the kh*kw taps of that pixel, zero over the padding. Row
** r = (c, ki, kj), column p of image i is at col[i*img_st + r*row_st + p]:
** (rows*P, P) gives per-image blocks, (P, nb*P) the CPU's [rows, nb*P].
*/
template <typename T, typename I>
__global__ void im2col_kernel(T *col, const T *x, geo<I> g, I nb, I img_st, I row_st) {
  I P = g.oh * g.ow, total = nb * g.c * P, kk = g.kh * g.kw;
  GRID_LOOP(I, t, total) {
    I p = t % P, q = t / P, c = q % g.c, i = q / g.c;
    I oh = p / g.ow, ow = p - oh * g.ow;
    I h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
    const T *xp = x + (i * g.c + c) * g.h * g.w;
    T *d = col + i * img_st + c * kk * row_st + p;
    for (I ki = 0; ki < g.kh; ki++) {
      I ih = h0 + ki * g.dh;
      bool hin = ih >= 0 && ih < g.h;
      for (I kj = 0; kj < g.kw; kj++, d += row_st) {
        I iw = w0 + kj * g.dw;
        *d = hin && iw >= 0 && iw < g.w ? xp[ih * g.w + iw] : (T)0;
      }
    }
  }
}

/*
** gx of nb images from per-image dcol blocks [rows, P]: each input pixel
** sums the taps that read it, ki then kj, as the CPU's col2im adds them.
*/
template <typename T, typename I>
__global__ void col2im_kernel(T *gx, const T *col, geo<I> g, I nb) {
  I P = g.oh * g.ow, kk = g.kh * g.kw, total = nb * g.c * g.h * g.w;
  GRID_LOOP(I, t, total) {
    I iw = t % g.w, q = t / g.w, ih = q % g.h;
    q /= g.h;
    I c = q % g.c, i = q / g.c;
    const T *cp = col + (i * g.c + c) * kk * P;
    T sum = 0;
    for (I ki = 0; ki < g.kh; ki++) {
      I th = ih + g.ph - ki * g.dh, oh;
      if (th < 0) break;   /* th falls as ki grows */
      oh = th / g.sh;
      if (th != oh * g.sh || oh >= g.oh) continue;
      for (I kj = 0; kj < g.kw; kj++) {
        I tw = iw + g.pw - kj * g.dw, ow;
        if (tw < 0) break;
        ow = tw / g.sw;
        if (tw != ow * g.sw || ow >= g.ow) continue;
        sum += cp[(ki * g.kw + kj) * P + oh * g.ow + ow];
      }
    }
    gx[t] = sum;
  }
}

/* The loops below divide in I: uint32_t when small (kc_index32 of the
** launch's total: the same for every thread), else int64_t. */

/* out [nb, oc, P] = bias[o] (the GEMM then adds onto it, as the CPU does). */
template <typename T, typename I>
__device__ __forceinline__ void bias_fill_loop(T *out, const T *b, int64_t total, I oc, I P) {
  KC_GRID_LOOP(t, total) out[t] = b[((I)t / P) % oc];
}
template <typename T>
__global__ void bias_fill_kernel(T *out, const T *b, int64_t total, int64_t oc, int64_t P, bool small) {
  if (small) bias_fill_loop<T, uint32_t>(out, b, total, (uint32_t)oc, (uint32_t)P);
  else bias_fill_loop<T, int64_t>(out, b, total, oc, P);
}

/* dst [R, nb*P] from src [nb, R, P] (the source offset formed in int64). */
template <typename T, typename I>
__device__ __forceinline__ void transpose_loop(T *dst, const T *src, int64_t total, int64_t R, I L, I P) {
  KC_GRID_LOOP(t, total) {
    I r = (I)t / L, j = (I)t - r * L, i = j / P, p = j - i * P;
    dst[t] = src[((int64_t)i * R + r) * P + p];
  }
}
template <typename T>
__global__ void transpose_kernel(T *dst, const T *src, int64_t nb, int64_t R, int64_t P, bool small) {
  int64_t total = R * nb * P;
  if (small) transpose_loop<T, uint32_t>(dst, src, total, R, (uint32_t)(nb * P), (uint32_t)P);
  else transpose_loop<T, int64_t>(dst, src, total, R, nb * P, P);
}

/* gb[o] = sum of gout[n, o, :] over images and pixels, in double: a block
** per (unit of channels, slice of its n*P elements) (common.cuh
** kc_chan_split; 1x1 maps take the column block, kc_chan_block). One
** slice writes gb; more write partials, which bias_grad_finish adds in
** slice order. */
template <typename T>
__global__ void bias_grad_kernel(T *gb, double *part, const T *gout, int64_t n, int64_t oc, int64_t P,
                                 kc_split sp) {
  KC_SHARED(double, buf, [KC_THREADS]);
  bool cols = P == 1;
  int64_t units = kc_chan_units(cols, oc);
  for (int64_t sl = blockIdx.y; sl < sp.S; sl += gridDim.y) {
    int64_t j0, j1;
    kc_split_range(sp, sl, n * P, &j0, &j1);
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
      int64_t o = kc_chan_at(cols, u);
      double s = 0;
      auto add = [&](int64_t i) { s += (double)gout[i]; };
      kc_chan_visit(oc, P, o, j0, j1, add);
      s = kc_chan_sum(cols, s, buf);
      if (kc_chan_lead(cols) && o < oc) {
        if (sp.S == 1) gb[o] = (T)s;
        else part[sl * oc + o] = s;
      }
    }
  }
}

template <typename T>
__global__ void bias_grad_finish(T *gb, const double *part, int64_t oc, int64_t S) {
  KC_GRID_LOOP(o, oc) {
    double s = 0;
    for (int64_t k = 0; k < S; k++) s += part[k * oc + o];
    gb[o] = (T)s;
  }
}

template <typename T>
static int launch_bias_fill(kc_state *s, T *out, const T *b, int64_t total, int64_t oc, int64_t P) {
  KC_LAUNCH(kc_blocks(total), KC_THREADS, 0, s->stream, bias_fill_kernel<T>)(out, b, total, oc, P, kc_index32(total));
  return KC_LAUNCHED();
}

template <typename T>
static int launch_transpose(kc_state *s, T *dst, const T *src, int64_t nb, int64_t R, int64_t P) {
  int64_t total = R * nb * P;
  KC_LAUNCH(kc_blocks(total), KC_THREADS, 0, s->stream, transpose_kernel<T>)(dst, src, nb, R, P, kc_index32(total));
  return KC_LAUNCHED();
}

/* Columns of m images (x: the first one's pixels); see im2col_kernel. */
template <typename T>
static int launch_im2col(kc_state *s, const kc_win2d *g, T *col, const T *x, int64_t m, int64_t img_st,
                         int64_t row_st) {
  int64_t P = g->oh * g->ow, n = m * g->c * P;
  if (SMALL_INDEX(n * g->k[0] * g->k[1]) && SMALL_INDEX(m * g->c * g->h * g->w))
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, im2col_kernel<T, int>)(col, x, geo_of<int>(g), (int)m,
                                                                             (int)img_st, (int)row_st);
  else
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, im2col_kernel<T, int64_t>)(col, x, geo_of<int64_t>(g), m,
                                                                                 img_st, row_st);
  return KC_LAUNCHED();
}

template <typename T>
static int launch_col2im(kc_state *s, const kc_win2d *g, T *gx, const T *col, int64_t m) {
  int64_t n = m * g->c * g->h * g->w;
  if (SMALL_INDEX(n) && SMALL_INDEX(m * g->c * g->k[0] * g->k[1] * g->oh * g->ow))
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, col2im_kernel<T, int>)(gx, col, geo_of<int>(g), (int)m);
  else
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, col2im_kernel<T, int64_t>)(gx, col, geo_of<int64_t>(g), m);
  return KC_LAUNCHED();
}

/* }====================================================================== */

/* {======================================================================
** conv2d entries
** ======================================================================= */

static int is_direct(const kc_win2d *g) {
  return g->k[0] == 1 && g->k[1] == 1 && g->s[0] == 1 && g->s[1] == 1 && g->pad[0] == 0 && g->pad[1] == 0;
}

/* Images per chunk: as many as per_image bytes each allow within
** COL_MAX_BYTES (at least one), with nb*P a valid GEMM dimension. */
static int64_t chunk_of(const kc_win2d *g, int64_t per_image) {
  int64_t P = g->oh * g->ow, nb = per_image > 0 ? COL_MAX_BYTES / per_image : g->n;
  if (nb > g->n) nb = g->n;
  if (P > 0 && nb > INT_LIMIT / P) nb = INT_LIMIT / P;
  if (nb > INT_LIMIT) nb = INT_LIMIT;
  return nb < 1 ? 1 : nb;
}

static int check_geom(const kc_win2d *g) {
  int64_t P = g->oh * g->ow, rows = g->c * g->k[0] * g->k[1];
  if (g->groups < 1 || g->c % g->groups || g->oc % g->groups) return KC_ERR_ARG;
  /* cuBLAS takes int dimensions */
  if (P > INT_LIMIT || rows > INT_LIMIT || g->oc > INT_LIMIT) return KC_ERR_ARG;
  return KC_OK;
}

/*
** out[i] (rows of one group at a time) = W_k col_i, batched over images,
** or over groups when there are more groups than images (depthwise).
** cs: the stride between images' column blocks.
*/
template <typename T>
static int conv_gemms(kc_state *s, const kc_win2d *g, int64_t nb, const T *w, const T *cp, int64_t cs,
                      T beta, T *o) {
  int64_t P = g->oh * g->ow, og = g->oc / g->groups, kg = g->c / g->groups * g->k[0] * g->k[1];
  int st = KC_OK;
  if (g->groups == 1) return rm_gemm<T>(s, 0, 0, g->oc, P, kg, w, kg, 0, cp, P, cs, beta, o, P, g->oc * P, nb);
  if (nb >= g->groups) {
    for (int64_t k = 0; k < g->groups && !st; k++)
      st = rm_gemm<T>(s, 0, 0, og, P, kg, w + k * og * kg, kg, 0, cp + k * kg * P, P, cs, beta, o + k * og * P, P,
                      g->oc * P, nb);
  } else {
    for (int64_t i = 0; i < nb && !st; i++)
      st = rm_gemm<T>(s, 0, 0, og, P, kg, w, kg, og * kg, cp + i * cs, P, kg * P, beta, o + i * g->oc * P, P,
                      og * P, g->groups);
  }
  return st;
}

template <typename T>
static int conv_fwd(kc_state *s, const kc_win2d *g, T *out, const T *x, const T *w, const T *b) {
  int64_t P = g->oh * g->ow, rows = g->c * g->k[0] * g->k[1], chw = g->c * g->h * g->w;
  int direct = is_direct(g);
  int64_t nb = direct ? chunk_of(g, 0) : chunk_of(g, rows * P * (int64_t)sizeof(T));
  T *col = NULL;
  int st;
  if (g->n == 0 || g->oc == 0 || P == 0) return KC_OK;
  if (rows == 0) {  /* no input channels: the bias alone */
    int64_t n = g->n * g->oc * P;
    if (!b) return kc_check_cuda(cudaMemsetAsync(out, 0, (size_t)n * sizeof(T), s->stream));
    return launch_bias_fill<T>(s, out, b, n, g->oc, P);
  }
  if (!direct && (st = kc_scratch(s, (size_t)(nb * rows * P) * sizeof(T), (void **)&col))) return st;
  for (int64_t n0 = 0; n0 < g->n; n0 += nb) {
    int64_t m = g->n - n0 < nb ? g->n - n0 : nb;
    T *o = out + n0 * g->oc * P;
    const T *cp = x + n0 * chw;
    int64_t cs = chw;
    if (b) {
      int64_t n = m * g->oc * P;
      if ((st = launch_bias_fill<T>(s, o, b, n, g->oc, P))) return st;
    }
    if (!direct) {
      if ((st = launch_im2col<T>(s, g, col, cp, m, rows * P, P))) return st;
      cp = col;
      cs = rows * P;
    }
    if ((st = conv_gemms<T>(s, g, m, w, cp, cs, b ? (T)1 : (T)0, o))) return st;
  }
  return KC_OK;
}

/* dcol_i (or gx_i when direct) = W^T gout_i per group, over nb images. */
template <typename T>
static int dcol_gemms(kc_state *s, const kc_win2d *g, int64_t nb, const T *w, const T *gp, T *dst,
                      int64_t ds) {
  int64_t P = g->oh * g->ow, og = g->oc / g->groups, kg = g->c / g->groups * g->k[0] * g->k[1];
  int st = KC_OK;
  if (g->groups == 1) return rm_gemm<T>(s, 1, 0, kg, P, g->oc, w, kg, 0, gp, P, g->oc * P, (T)0, dst, P, ds, nb);
  if (nb >= g->groups) {
    for (int64_t k = 0; k < g->groups && !st; k++)
      st = rm_gemm<T>(s, 1, 0, kg, P, og, w + k * og * kg, kg, 0, gp + k * og * P, P, g->oc * P, (T)0,
                      dst + k * kg * P, P, ds, nb);
  } else {
    for (int64_t i = 0; i < nb && !st; i++)
      st = rm_gemm<T>(s, 1, 0, kg, P, og, w, kg, og * kg, gp + i * g->oc * P, P, og * P, (T)0, dst + i * ds, P,
                      kg * P, g->groups);
  }
  return st;
}

template <typename T>
static int conv_bwd(kc_state *s, const kc_win2d *g, const T *gout, const T *x, const T *w, T *gx, T *gw, T *gb) {
  int64_t P = g->oh * g->ow, rows = g->c * g->k[0] * g->k[1], chw = g->c * g->h * g->w;
  int64_t og = g->oc / g->groups, kg = g->c / g->groups * g->k[0] * g->k[1];
  int direct = is_direct(g);
  int64_t per = ((gx && !direct) || gw ? rows * P : 0) + (gw ? g->oc * P : 0);
  int64_t nb = chunk_of(g, per * (int64_t)sizeof(T)), colsz;
  char *scr = NULL;
  T *col, *gt;
  int st;
  if (gb && g->oc > 0) {
    /* few channels over many images: slices (the scratch is free again
    ** once bias_grad_finish has run, before the columns reuse it) */
    bool cols = P == 1;
    dim3 block = kc_chan_block(cols, g->oc, g->n * P, KC_THREADS);
    int64_t units = kc_chan_units_of(cols, g->oc, block);
    kc_split sp = kc_chan_split(s, units, g->n * P, kc_chan_team(cols, block));
    double *part = NULL;
    if (sp.S > 1 && (st = kc_scratch(s, sizeof(double) * (size_t)(sp.S * g->oc), (void **)&part))) return st;
    dim3 grid(kc_grid_x(units), (unsigned)sp.S);
    KC_LAUNCH(grid, block, 0, s->stream, bias_grad_kernel<T>)(gb, part, gout, g->n, g->oc, P, sp);
    if ((st = KC_LAUNCHED())) return st;
    if (sp.S > 1) {
      KC_LAUNCH(kc_blocks(g->oc), KC_THREADS, 0, s->stream, bias_grad_finish<T>)(gb, part, g->oc, sp.S);
      if ((st = KC_LAUNCHED())) return st;
    }
  }
  if (!gx && !gw) return KC_OK;
  if (g->n == 0 || g->oc == 0 || P == 0 || rows == 0) {  /* nothing to multiply: zeros */
    if (gx && g->n * chw > 0 && (st = kc_check_cuda(cudaMemsetAsync(gx, 0, (size_t)(g->n * chw) * sizeof(T), s->stream))))
      return st;
    if (gw && g->oc * kg > 0)
      return kc_check_cuda(cudaMemsetAsync(gw, 0, (size_t)(g->oc * kg) * sizeof(T), s->stream));
    return KC_OK;
  }
  colsz = kc_align256(nb * rows * P * (int64_t)sizeof(T));
  if ((st = kc_scratch(s, (size_t)(colsz + nb * g->oc * P * (int64_t)sizeof(T)), (void **)&scr))) return st;
  col = (T *)scr;
  gt = (T *)(scr + colsz);
  for (int64_t n0 = 0; n0 < g->n; n0 += nb) {
    int64_t m = g->n - n0 < nb ? g->n - n0 : nb, L = m * P;
    const T *gp = gout + n0 * g->oc * P, *xp = x ? x + n0 * chw : NULL;
    if (gw) {
      const T *gtp = gp, *cp = xp;
      if (m > 1) {  /* [m, oc, P] to [oc, m*P] */
        if ((st = launch_transpose<T>(s, gt, gp, m, g->oc, P))) return st;
        gtp = gt;
      }
      if (!direct) {
        if ((st = launch_im2col<T>(s, g, col, xp, m, P, L))) return st;
        cp = col;
      } else if (m > 1) {
        if ((st = launch_transpose<T>(s, col, xp, m, g->c, P))) return st;
        cp = col;
      }
      for (int64_t k = 0; k < g->groups && !st; k++)
        st = rm_gemm<T>(s, 0, 1, og, kg, L, gtp + k * og * L, L, 0, cp + k * kg * L, L, 0, n0 == 0 ? (T)0 : (T)1,
                        gw + k * og * kg, kg, 0, 1);
      if (st) return st;
    }
    if (gx) {
      T *dst = direct ? gx + n0 * chw : col;
      if ((st = dcol_gemms<T>(s, g, m, w, gp, dst, rows * P))) return st;
      if (!direct) {
        if ((st = launch_col2im<T>(s, g, gx + n0 * chw, col, m))) return st;
      }
    }
  }
  return KC_OK;
}

static int cv_conv2d(kc_state *s, const kc_win2d *g, const kc_view *out, const kc_view *x, const kc_view *w,
                     const kc_view *b) {
  int st;
  if (!g || !out || !x || !w) return KC_ERR_ARG;
  if (x->dtype != out->dtype || w->dtype != out->dtype || (b && b->dtype != out->dtype)) return KC_ERR_DTYPE;
  if ((st = check_geom(g))) return st;
  switch (out->dtype) {
    case KEEL_F32:
      return conv_fwd<float>(s, g, (float *)out->data, (const float *)x->data, (const float *)w->data,
                             b ? (const float *)b->data : NULL);
    case KEEL_F64:
      return conv_fwd<double>(s, g, (double *)out->data, (const double *)x->data, (const double *)w->data,
                              b ? (const double *)b->data : NULL);
    default: return KC_ERR_DTYPE;
  }
}

template <typename T>
static T *ptr(const kc_view *v) { return v ? (T *)v->data : NULL; }

static int cv_conv2d_backward(kc_state *s, const kc_win2d *g, const kc_view *gout, const kc_view *x,
                              const kc_view *w, const kc_view *gx, const kc_view *gw, const kc_view *gb) {
  int st, dt;
  if (!g || !gout || (gw && !x) || (gx && !w)) return KC_ERR_ARG;
  dt = gout->dtype;
  if ((x && x->dtype != dt) || (w && w->dtype != dt) || (gx && gx->dtype != dt) || (gw && gw->dtype != dt) ||
      (gb && gb->dtype != dt))
    return KC_ERR_DTYPE;
  if ((st = check_geom(g))) return st;
  switch (dt) {
    case KEEL_F32:
      return conv_bwd<float>(s, g, ptr<float>(gout), ptr<float>(x), ptr<float>(w), ptr<float>(gx), ptr<float>(gw),
                             ptr<float>(gb));
    case KEEL_F64:
      return conv_bwd<double>(s, g, ptr<double>(gout), ptr<double>(x), ptr<double>(w), ptr<double>(gx),
                              ptr<double>(gw), ptr<double>(gb));
    default: return KC_ERR_DTYPE;
  }
}

/* }====================================================================== */

/* {======================================================================
** Pools. A plane is one (sample, channel) pair. Forward: one thread per
** output; backward: one thread per input pixel.
** ======================================================================= */

/*
** max: the window clipped to the input, ties to the first position in
** row-major order, NaN wins (the last NaN) — torch's CPU rule, as
** backend_cpu_conv.c. Once m is NaN, v > m is false, so only a later NaN
** replaces it. idx: flat h*W + w in the plane, plus the index base.
*/
template <typename T, typename I>
__global__ void max_pool_kernel(T *out, int64_t *idx, const T *x, geo<I> g, I total, int base) {
  GRID_LOOP(I, t, total) {
    I ow = t % g.ow, q = t / g.ow, oh = q % g.oh, pl = q / g.oh;
    const T *xp = x + pl * g.h * g.w;
    I h0 = oh * g.sh - g.ph, h1 = h0 + (g.kh - 1) * g.dh + 1;
    I w0 = ow * g.sw - g.pw, w1 = w0 + (g.kw - 1) * g.dw + 1, best;
    T m = (T)-INFINITY;
    if (h1 > g.h) h1 = g.h;
    if (w1 > g.w) w1 = g.w;
    while (h0 < 0) h0 += g.dh;
    while (w0 < 0) w0 += g.dw;
    best = h0 * g.w + w0;
    for (I ih = h0; ih < h1; ih += g.dh)
      for (I iw = w0; iw < w1; iw += g.dw) {
        I at = ih * g.w + iw;
        T v = xp[at];
        if (v > m || v != v) { m = v; best = at; }
      }
    out[t] = m;
    if (idx) idx[t] = (int64_t)best + base;
  }
}

/*
** gx at each input pixel: the sum of gout over the outputs whose index
** names it, in increasing output order (the CPU's scatter order). An
** output's index lies on its window's tap lattice, so the candidates are
** the outputs with a tap on this pixel: ki from the last down gives oh
** increasing.
*/
template <typename T, typename I>
__global__ void max_pool_back_kernel(T *gx, const T *gout, const int64_t *idx, geo<I> g, I total, int base) {
  I po = g.oh * g.ow;
  GRID_LOOP(I, t, total) {
    I iw = t % g.w, q = t / g.w, ih = q % g.h, pl = q / g.h;
    int64_t pos = (int64_t)(ih * g.w + iw) + base;
    const T *gp = gout + pl * po;
    const int64_t *ip = idx + pl * po;
    T sum = 0;
    for (I ki = g.kh - 1; ki >= 0; ki--) {
      I th = ih + g.ph - ki * g.dh, oh;
      if (th < 0) continue;
      oh = th / g.sh;
      if (oh >= g.oh) break;   /* oh grows as ki falls */
      if (th != oh * g.sh) continue;
      for (I kj = g.kw - 1; kj >= 0; kj--) {
        I tw = iw + g.pw - kj * g.dw, ow;
        if (tw < 0) continue;
        ow = tw / g.sw;
        if (ow >= g.ow) break;
        if (tw != ow * g.sw) continue;
        if (ip[oh * g.ow + ow] == pos) sum += gp[oh * g.ow + ow];
      }
    }
    gx[t] = sum;
  }
}

/*
** The window of output o along one axis, [*a, *b), and its divisor part:
** backend_cpu_conv.c's avg_window (fixed windows clipped first to the
** padded input, whose size is the count_include_pad divisor, then to the
** input; adaptive ones [floor(o*in/out), ceil((o+1)*in/out))).
*/
__device__ __forceinline__ int64_t avg_window(const kc_win2d &g, int axis, int64_t o, int64_t *a, int64_t *b) {
  int64_t in = axis ? g.w : g.h, out = axis ? g.ow : g.oh, s, e, span;
  if (g.adaptive) {
    *a = o * in / out;
    *b = ((o + 1) * in + out - 1) / out;
    return *b - *a;
  }
  s = o * g.s[axis] - g.pad[axis];
  e = s + g.k[axis];
  if (e > in + g.pad[axis]) e = in + g.pad[axis];
  span = e - s;
  if (s < 0) s = 0;
  if (e > in) e = in;
  *a = s;
  *b = e;
  return g.count_include_pad ? span : e - s;
}

template <typename T>
__global__ void avg_pool_kernel(T *out, const T *x, kc_win2d g, int64_t total) {
  KC_GRID_LOOP(t, total) {
    int64_t ow = t % g.ow, q = t / g.ow, oh = q % g.oh, pl = q / g.oh, h0, h1, w0, w1;
    int64_t dh = avg_window(g, 0, oh, &h0, &h1), dw = avg_window(g, 1, ow, &w0, &w1);
    const T *xp = x + pl * g.h * g.w;
    double s = 0, div;
    if (h0 >= h1 || w0 >= w1) { out[t] = 0; continue; }
    div = g.divisor ? (double)g.divisor : (double)(dh * dw);
    for (int64_t ih = h0; ih < h1; ih++)
      for (int64_t iw = w0; iw < w1; iw++) s += xp[ih * g.w + iw];
    out[t] = (T)(s / div);
  }
}

/* Outputs [*lo, *hi] along one axis whose window may hold input i. */
__device__ __forceinline__ void avg_range(const kc_win2d &g, int axis, int64_t i, int64_t *lo, int64_t *hi) {
  int64_t in = axis ? g.w : g.h, out = axis ? g.ow : g.oh, a, b;
  if (g.adaptive) {
    a = i * out / in;
    b = ((i + 1) * out + in - 1) / in - 1;
  } else {
    int64_t k = g.k[axis], s = g.s[axis], num = i + g.pad[axis] - k + 1;
    a = num > 0 ? (num + s - 1) / s : 0;
    b = (i + g.pad[axis]) / s;
  }
  *lo = a < 0 ? 0 : a;
  *hi = b > out - 1 ? out - 1 : b;
}

/* gx: each input pixel sums (T)(gout / divisor) of the windows holding
** it, oh then ow increasing, as the CPU's scatter adds them. */
template <typename T>
__global__ void avg_pool_back_kernel(T *gx, const T *gout, kc_win2d g, int64_t total) {
  KC_GRID_LOOP(t, total) {
    int64_t iw = t % g.w, q = t / g.w, ih = q % g.h, pl = q / g.h, ohl, ohh, owl, owh;
    const T *gp = gout + pl * g.oh * g.ow;
    T sum = 0;
    avg_range(g, 0, ih, &ohl, &ohh);
    avg_range(g, 1, iw, &owl, &owh);
    for (int64_t oh = ohl; oh <= ohh; oh++) {
      int64_t h0, h1, dh = avg_window(g, 0, oh, &h0, &h1);
      if (ih < h0 || ih >= h1) continue;
      for (int64_t ow = owl; ow <= owh; ow++) {
        int64_t w0, w1, dw = avg_window(g, 1, ow, &w0, &w1);
        double div;
        if (iw < w0 || iw >= w1) continue;
        div = g.divisor ? (double)g.divisor : (double)(dh * dw);
        sum += (T)(gp[oh * g.ow + ow] / div);
      }
    }
    gx[t] = sum;
  }
}

static int pool_dtype(const kc_view *a, const kc_view *b) {
  if (a->dtype != b->dtype) return KC_ERR_DTYPE;
  return kc_is_float(a->dtype) ? KC_OK : KC_ERR_DTYPE;
}

template <typename T>
static int launch_max_pool(kc_state *s, const kc_win2d *g, const kc_view *out, const kc_view *idx,
                           const kc_view *x) {
  int64_t n = g->n * g->c * g->oh * g->ow;
  int64_t *ip = idx ? (int64_t *)idx->data : NULL;
  if (SMALL_INDEX(n) && SMALL_INDEX(g->n * g->c * g->h * g->w))
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, max_pool_kernel<T, int>)(
        (T *)out->data, ip, (const T *)x->data, geo_of<int>(g), (int)n, g->index_base);
  else
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, max_pool_kernel<T, int64_t>)(
        (T *)out->data, ip, (const T *)x->data, geo_of<int64_t>(g), n, g->index_base);
  return KC_LAUNCHED();
}

static int cv_max_pool2d(kc_state *s, const kc_win2d *g, const kc_view *out, const kc_view *idx,
                         const kc_view *x) {
  int st;
  if (!g || !out || !x) return KC_ERR_ARG;
  if ((st = pool_dtype(out, x))) return st;
  if (idx && idx->dtype != KEEL_I64) return KC_ERR_DTYPE;
  if (g->n * g->c * g->oh * g->ow == 0) return KC_OK;
  if (out->dtype == KEEL_F32) return launch_max_pool<float>(s, g, out, idx, x);
  return launch_max_pool<double>(s, g, out, idx, x);
}

template <typename T>
static int launch_max_pool_back(kc_state *s, const kc_win2d *g, const kc_view *gx, const kc_view *gout,
                                const kc_view *idx) {
  int64_t n = g->n * g->c * g->h * g->w;
  if (SMALL_INDEX(n) && SMALL_INDEX(g->n * g->c * g->oh * g->ow))
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, max_pool_back_kernel<T, int>)(
        (T *)gx->data, (const T *)gout->data, (const int64_t *)idx->data, geo_of<int>(g), (int)n, g->index_base);
  else
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, max_pool_back_kernel<T, int64_t>)(
        (T *)gx->data, (const T *)gout->data, (const int64_t *)idx->data, geo_of<int64_t>(g), n, g->index_base);
  return KC_LAUNCHED();
}

static int cv_max_pool2d_backward(kc_state *s, const kc_win2d *g, const kc_view *gx, const kc_view *gout,
                                  const kc_view *idx) {
  int64_t n = g ? g->n * g->c * g->h * g->w : 0;
  int st;
  if (!g || !gx || !gout || !idx) return KC_ERR_ARG;
  if ((st = pool_dtype(gx, gout))) return st;
  if (idx->dtype != KEEL_I64) return KC_ERR_DTYPE;
  if (n == 0) return KC_OK;
  if (g->oh * g->ow == 0)
    return kc_check_cuda(cudaMemsetAsync(gx->data, 0, (size_t)n * kc_elem_size(gx->dtype), s->stream));
  if (gx->dtype == KEEL_F32) return launch_max_pool_back<float>(s, g, gx, gout, idx);
  return launch_max_pool_back<double>(s, g, gx, gout, idx);
}

static int cv_avg_pool2d(kc_state *s, const kc_win2d *g, const kc_view *out, const kc_view *x) {
  int64_t n = g ? g->n * g->c * g->oh * g->ow : 0;
  int st;
  if (!g || !out || !x) return KC_ERR_ARG;
  if ((st = pool_dtype(out, x))) return st;
  if (n == 0) return KC_OK;
  if (g->adaptive && (g->h < 1 || g->w < 1)) return KC_ERR_ARG;
  if (out->dtype == KEEL_F32)
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, avg_pool_kernel<float>)((float *)out->data,
                                                                               (const float *)x->data, *g, n);
  else
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, avg_pool_kernel<double>)((double *)out->data,
                                                                                (const double *)x->data, *g, n);
  return KC_LAUNCHED();
}

static int cv_avg_pool2d_backward(kc_state *s, const kc_win2d *g, const kc_view *gx, const kc_view *gout) {
  int64_t n = g ? g->n * g->c * g->h * g->w : 0;
  int st;
  if (!g || !gx || !gout) return KC_ERR_ARG;
  if ((st = pool_dtype(gx, gout))) return st;
  if (n == 0) return KC_OK;
  if (g->oh * g->ow == 0)
    return kc_check_cuda(cudaMemsetAsync(gx->data, 0, (size_t)n * kc_elem_size(gx->dtype), s->stream));
  if (gx->dtype == KEEL_F32)
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, avg_pool_back_kernel<float>)(
        (float *)gx->data, (const float *)gout->data, *g, n);
  else
    KC_LAUNCH(kc_blocks(n), KC_THREADS, 0, s->stream, avg_pool_back_kernel<double>)(
        (double *)gx->data, (const double *)gout->data, *g, n);
  return KC_LAUNCHED();
}

/* }====================================================================== */

void kc_register_conv(keel_cuda_table *t) {
  t->conv2d = cv_conv2d;
  t->conv2d_backward = cv_conv2d_backward;
  t->max_pool2d = cv_max_pool2d;
  t->max_pool2d_backward = cv_max_pool2d_backward;
  t->avg_pool2d = cv_avg_pool2d;
  t->avg_pool2d_backward = cv_avg_pool2d_backward;
}
