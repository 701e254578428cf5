/*
** gemm.c: the CPU's matrix products and the float32 matmul precision
** (keel_set_matmul_precision in keel.h).
**
** A reduced precision rounds the float32 operands of each product to the
** format and multiplies the rounded copies in float32: what tensor cores
** do with cuBLAS's FAST compute types, so a CPU run shows the numbers a
** GPU run under autocast gives (overflow of float16 included), and the
** device specs can compare the two. It is slower on the CPU (a rounded
** copy of both operands per product), never faster: the CPU has no
** half-precision GEMM to gain from.
*/
#include <math.h>
#include <string.h>
#include <cblas.h>
#include "keel_impl.h"

keel_matmul_precision keel_set_matmul_precision(keel_ctx *ctx, keel_matmul_precision p) {
  keel_matmul_precision old = (keel_matmul_precision)ctx->gemm_prec;
  if ((int)p >= 0 && p < KEEL_MATMUL_PRECISION_COUNT) ctx->gemm_prec = (int)p;
  return old;
}

keel_matmul_precision keel_get_matmul_precision(const keel_ctx *ctx) {
  return (keel_matmul_precision)ctx->gemm_prec;
}

/* Keeps the top mantissa bits of a finite float (round to nearest even on
** the dropped ones): 13 dropped for TF32 and float16, 16 for bfloat16. A
** carry may reach the exponent, and past the largest float gives Inf, as
** the conversion does. */
static float keep_bits(float x, int dropped) {
  uint32_t u, half = (1u << (dropped - 1)) - 1;
  memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;   /* Inf, NaN */
  u += half + ((u >> dropped) & 1u);
  u &= ~((1u << dropped) - 1u);
  memcpy(&x, &u, sizeof x);
  return x;
}

/* float16: 10 mantissa bits down to 2^-14, then steps of 2^-24 (its
** subnormals), and magnitudes from 65520 up round to Inf. */
static float to_f16(float x) {
  float a = fabsf(x);
  if (!(a < INFINITY)) return x;
  if (a >= 65520.0f) return copysignf(INFINITY, x);
  if (a < 0x1p-14f) return copysignf(nearbyintf(a * 0x1p24f) * 0x1p-24f, x);
  return keep_bits(x, 13);
}

float kl_round_to_precision(float x, int p) {
  switch (p) {
    case KEEL_MATMUL_TF32: return keep_bits(x, 13);
    case KEEL_MATMUL_BF16: return keep_bits(x, 16);
    case KEEL_MATMUL_F16: return to_f16(x);
    default: return x;
  }
}

/* A rows x cols matrix stored with leading dimension ld, rounded into a
** fresh dense block (ld = cols); NULL when out of memory. */
static float *rounded(keel_ctx *ctx, const float *a, int64_t rows, int64_t cols, int64_t ld, int p) {
  float *r = (float *)kl_cpu_alloc(ctx, sizeof(float) * (size_t)(rows * cols));
  if (!r) return NULL;
  for (int64_t i = 0; i < rows; i++)
    for (int64_t j = 0; j < cols; j++) r[i * cols + j] = kl_round_to_precision(a[i * ld + j], p);
  return r;
}

keel_status kl_cpu_gemm(keel_ctx *ctx, keel_dtype dt, int ta, int tb, int64_t m, int64_t n, int64_t k,
                        const void *a, int64_t lda, const void *b, int64_t ldb, double beta, void *c,
                        int64_t ldc) {
  CBLAS_TRANSPOSE A = ta ? CblasTrans : CblasNoTrans, B = tb ? CblasTrans : CblasNoTrans;
  size_t es = kl_dtype_size[dt];
  if (m == 0 || n == 0) return KEEL_OK;
  if (k == 0) {   /* BLAS would reject the leading dimensions: C = beta C */
    for (int64_t i = 0; i < m; i++) {
      char *row = (char *)c + i * ldc * (int64_t)es;
      if (beta == 0) memset(row, 0, (size_t)n * es);
      else if (beta != 1)
        for (int64_t j = 0; j < n; j++) kl_store(row + j * (int64_t)es, dt, beta * kl_load(row + j * (int64_t)es, dt));
    }
    return KEEL_OK;
  }
  if (dt == KEEL_F64) {
    cblas_dgemm(CblasRowMajor, A, B, (int)m, (int)n, (int)k, 1.0, (const double *)a, (int)lda,
                (const double *)b, (int)ldb, beta, (double *)c, (int)ldc);
    return KEEL_OK;
  }
  if (ctx->gemm_prec != KEEL_MATMUL_HIGHEST) {
    /* op(A) is m x k: stored k x m when transposed; likewise B */
    int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
    float *ra = rounded(ctx, (const float *)a, ar, ac, lda, ctx->gemm_prec);
    float *rb = ra ? rounded(ctx, (const float *)b, br, bc, ldb, ctx->gemm_prec) : NULL;
    if (!rb) {
      if (ra) kl_cpu_free(ctx, ra, sizeof(float) * (size_t)(ar * ac));
      return kl_error(ctx, KEEL_ERR_NOMEM, "matmul: out of memory (rounded operands)");
    }
    cblas_sgemm(CblasRowMajor, A, B, (int)m, (int)n, (int)k, 1.0f, ra, (int)ac, rb, (int)bc, (float)beta,
                (float *)c, (int)ldc);
    kl_cpu_free(ctx, ra, sizeof(float) * (size_t)(ar * ac));
    kl_cpu_free(ctx, rb, sizeof(float) * (size_t)(br * bc));
    return KEEL_OK;
  }
  cblas_sgemm(CblasRowMajor, A, B, (int)m, (int)n, (int)k, 1.0f, (const float *)a, (int)lda, (const float *)b,
              (int)ldb, (float)beta, (float *)c, (int)ldc);
  return KEEL_OK;
}
