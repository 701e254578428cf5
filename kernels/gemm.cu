/*
** gemm.cu: the plugin's one road to cuBLAS's matrix product. Every product
** (matmul, conv2d, the recurrent layers) goes through kc_gemm so that the
** engine's matmul precision (keel.h: keel_set_matmul_precision, the
** autocast of keel.amp) reaches all of them as a cuBLAS compute type.
*/
#include "common.cuh"

/* C = 0 for the batch matrices of an empty sum (k == 0). */
template <typename T>
__global__ void zero_kernel(T *c, int64_t m, int64_t n, int64_t ldc, int64_t sc, int64_t batch) {
  KC_GRID_LOOP(i, batch * m * n) {
    int64_t b = i / (m * n), j = i - b * (m * n), r = j / n;
    c[b * sc + r * ldc + (j - r * n)] = (T)0;
  }
}

int kc_gemm(kc_state *s, int dt, int ta, int tb, int64_t m, int64_t n, int64_t k, const void *A, int64_t lda,
            int64_t sA, const void *B, int64_t ldb, int64_t sB, double beta, void *C, int64_t ldc, int64_t sC,
            int64_t batch) {
  cublasHandle_t h;
  cublasStatus_t st;
  cudaDataType_t ty;
  cublasComputeType_t ct;
  float one_f = 1.0f, beta_f = (float)beta;
  double one_d = 1.0;
  const void *al, *be;
  int e;
  if (m == 0 || n == 0 || batch == 0) return KC_OK;
  if (k == 0) {
    if (beta == 1) return KC_OK;
    if (beta != 0) return KC_ERR_ARG;
    if (dt == KEEL_F32)
      KC_LAUNCH(kc_blocks(batch * m * n), KC_THREADS, 0, s->stream, zero_kernel<float>)((float *)C, m, n, ldc, sC, batch);
    else if (dt == KEEL_F64)
      KC_LAUNCH(kc_blocks(batch * m * n), KC_THREADS, 0, s->stream, zero_kernel<double>)((double *)C, m, n, ldc, sC,
                                                                                          batch);
    else
      return KC_ERR_DTYPE;
    return KC_LAUNCHED();
  }
  if (k < 0 || m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || lda > INT32_MAX || ldb > INT32_MAX ||
      ldc > INT32_MAX || batch > INT32_MAX)
    return KC_ERR_ARG;
  if (dt == KEEL_F32) {
    ty = CUDA_R_32F;
    al = &one_f;
    be = &beta_f;
  } else if (dt == KEEL_F64) {
    ty = CUDA_R_64F;
    al = &one_d;
    be = &beta;
  } else {
    return KC_ERR_DTYPE;
  }
  ct = kc_compute_type(s, dt);
  if ((e = kc_cublas(s, &h))) return e;
  /* column-major cuBLAS computes C^T = op(B)^T op(A)^T from the same memory */
  if (batch == 1)
    st = cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m, (int)k, al,
                      B, ty, (int)ldb, A, ty, (int)lda, be, C, ty, (int)ldc, ct, CUBLAS_GEMM_DEFAULT);
  else
    st = cublasGemmStridedBatchedEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n,
                                    (int)m, (int)k, al, B, ty, (int)ldb, (long long)sB, A, ty, (int)lda,
                                    (long long)sA, be, C, ty, (int)ldc, (long long)sC, (int)batch, ct,
                                    CUBLAS_GEMM_DEFAULT);
  return st == CUBLAS_STATUS_SUCCESS ? KC_OK : KC_CUBLAS_BASE + (int)st;
}
