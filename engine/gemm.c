/*
** gemm.c: the CPU's matrix products and the float32 matmul precision
** (keel_set_matmul_precision in keel.h).
**
** A reduced precision rounds the float32 operands of each product to the
** format and multiplies the rounded copies in float32: what tensor cores
** do with cuBLAS's FAST compute types, so a CPU run shows the numbers a
** GPU run under autocast gives (overflow of float16 included), and the
** device specs can compare the two. It is slower on the CPU (a rounded
** copy of each operand per product), never faster: the CPU has no
** half-precision GEMM to gain from. A caller that multiplies by the same
** matrix many times (the recurrent layers' W_hh, once per step) rounds it
** once (kl_round_matrix) and passes it as ready (kl_cpu_gemm_ex). The
** rounding itself is keel_round.h's, shared with the CUDA kernels and the
** simulator.
*/
#include <math.h>
#include <string.h>
#include <cblas.h>
#include "keel_impl.h"
#include "keel_round.h"

keel_matmul_precision keel_set_matmul_precision(keel_ctx *ctx, keel_matmul_precision p) {
  keel_matmul_precision old = (keel_matmul_precision)ctx->gemm_prec;
  if ((int)p >= 0 && p < KEEL_MATMUL_PRECISION_COUNT) ctx->gemm_prec = (int)p;
  return old;
}

keel_matmul_precision keel_get_matmul_precision(const keel_ctx *ctx) {
  return (keel_matmul_precision)ctx->gemm_prec;
}

void kl_round_matrix(int p, float *dst, const float *src, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < rows; i++)
    for (int64_t j = 0; j < cols; j++) dst[i * cols + j] = kl_round_to_precision(src[i * ld + j], p);
}

/* A rows x cols matrix stored with leading dimension ld, rounded into a
** fresh dense block (ld = cols); NULL when out of memory. */
static float *rounded(keel_ctx *ctx, const float *a, int64_t rows, int64_t cols, int64_t ld, int p) {
  float *r = (float *)kl_cpu_alloc(ctx, sizeof(float) * (size_t)(rows * cols));
  if (r) kl_round_matrix(p, r, a, rows, cols, ld);
  return r;
}

keel_status kl_cpu_gemm(keel_ctx *ctx, keel_dtype dt, int ta, int tb, int64_t m, int64_t n, int64_t k,
                        const void *a, int64_t lda, const void *b, int64_t ldb, double beta, void *c,
                        int64_t ldc) {
  return kl_cpu_gemm_ex(ctx, 0, dt, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

keel_status kl_cpu_gemm_ex(keel_ctx *ctx, unsigned ready, keel_dtype dt, int ta, int tb, int64_t m, int64_t n,
                           int64_t k, const void *a, int64_t lda, const void *b, int64_t ldb, double beta, void *c,
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
    /* op(A) is m x k: stored k x m when transposed; likewise B. An operand
    ** the caller rounded already (ready) is used in place. */
    int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
    float *ra = NULL, *rb = NULL;
    if (!(ready & KL_GEMM_A_ROUNDED)) {
      if (!(ra = rounded(ctx, (const float *)a, ar, ac, lda, ctx->gemm_prec))) goto nomem;
      a = ra;
      lda = ac;
    }
    if (!(ready & KL_GEMM_B_ROUNDED)) {
      if (!(rb = rounded(ctx, (const float *)b, br, bc, ldb, ctx->gemm_prec))) goto nomem;
      b = rb;
      ldb = bc;
    }
    cblas_sgemm(CblasRowMajor, A, B, (int)m, (int)n, (int)k, 1.0f, (const float *)a, (int)lda, (const float *)b,
                (int)ldb, (float)beta, (float *)c, (int)ldc);
    if (ra) kl_cpu_free(ctx, ra, sizeof(float) * (size_t)(ar * ac));
    if (rb) kl_cpu_free(ctx, rb, sizeof(float) * (size_t)(br * bc));
    return KEEL_OK;
  nomem:
    if (ra) kl_cpu_free(ctx, ra, sizeof(float) * (size_t)(ar * ac));
    return kl_error(ctx, KEEL_ERR_NOMEM, "matmul: out of memory (rounded operands)");
  }
  cblas_sgemm(CblasRowMajor, A, B, (int)m, (int)n, (int)k, 1.0f, (const float *)a, (int)lda, (const float *)b,
              (int)ldb, (float)beta, (float *)c, (int)ldc);
  return KEEL_OK;
}
