/*
** sim_cublas.cpp: the cuBLAS subset of cublas_v2.h on the CPU, with the
** column-major semantics and argument checks of NVIDIA's documentation.
** Products accumulate in double whatever the dtype (the tests compare
** with the CPU backend's BLAS within float32 tolerance); the FAST compute
** types round float32 operands to TF32, bfloat16 or float16 first, as
** tensor cores do (and as engine/gemm.c does on the CPU). As in reference
** BLAS, beta == 0 means C's old contents are never read (a NaN there does
** not leak), and alpha == 0 (or k == 0) means A and B are never read.
** Under KEEL_CUDA_SIM_ASYNC the gemms are queued on the handle's stream
** (sim_stream.cpp); the level 1 and 2 calls wait for it and run at once.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <new>
#include <vector>

#include "kcsim.h"
#include "cublas_v2.h"
#include "sim_internal.h"
#include "keel_round.h"

using kcsim::sim_async;
using kcsim::sim_enqueue;
using kcsim::sim_set_launch_error;
using kcsim::sim_wait_stream;

struct kcsim_cublas {
  cudaStream_t stream;
  cublasMath_t math;
};

using kcsim::sim_is_device;

/* {======================================================================
** Handles
** ======================================================================= */

extern "C" {

cublasStatus_t cublasCreate(cublasHandle_t *h) {
  int n = 0;
  *h = NULL;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    return CUBLAS_STATUS_NOT_INITIALIZED;
  }
  *h = new (std::nothrow) kcsim_cublas();
  return *h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}

cublasStatus_t cublasDestroy(cublasHandle_t h) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t st) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = st;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t *st) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  *st = h->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t h, cublasMath_t *mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  *mode = h->math;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  /* device pointer mode is not simulated: say so rather than misread */
  return mode == CUBLAS_POINTER_MODE_HOST ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED;
}

cublasStatus_t cublasGetPointerMode(cublasHandle_t h, cublasPointerMode_t *mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  *mode = CUBLAS_POINTER_MODE_HOST;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *ws, size_t n) {
  (void)ws, (void)n;
  return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

const char *cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char *cublasGetStatusString(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "license error";
  }
  return "unknown error";
}

}  // extern "C"

/* }====================================================================== */

/* {======================================================================
** GEMM
** ======================================================================= */

static int bad_op(cublasOperation_t t) { return t != CUBLAS_OP_N && t != CUBLAS_OP_T && t != CUBLAS_OP_C; }
static int imax1(int a) { return a > 1 ? a : 1; }

/* [p, p + extent elements) is device memory (a GPU would fault otherwise) */
template <typename T>
static int on_device(const T *p, int64_t extent) {
  return extent <= 0 || sim_is_device(p, (size_t)extent * sizeof(T));
}

/* The reduced formats of the FAST compute types (and of the TF32 math
** mode): tensor cores round each float32 operand to the format before
** multiplying, as engine/gemm.c does on the CPU: keel_round.h, whose
** KEEL_MATMUL_* codes name the formats here too (HIGHEST: no rounding). */
static double rounded(float x, int r) { return kl_round_to_precision(x, r); }
static double rounded(double x, int r) {
  (void)r;
  return x;
}

template <typename T>
static cublasStatus_t gemm_run(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, double alpha,
                               const T *A, int lda, long long sa, const T *B, int ldb, long long sb, double beta, T *C,
                               int ldc, long long sc, int batch, int rnd);

/* C[b] = alpha op(A[b]) op(B[b]) + beta C[b], b < batch; rnd: KEEL_MATMUL_* */
template <typename T>
static cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           double alpha, const T *A, int lda, long long sa, const T *B, int ldb, long long sb,
                           double beta, T *C, int ldc, long long sc, int batch, int rnd = KEEL_MATMUL_HIGHEST) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bad_op(ta) || bad_op(tb) || m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < imax1(ta == CUBLAS_OP_N ? m : k) || ldb < imax1(tb == CUBLAS_OP_N ? k : n) || ldc < imax1(m))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  {
    /* every operand in device memory in use, checked at the call: a queued
    ** product's operands may be given back to keel's cache before it runs,
    ** which stream order makes safe */
    int use_ab = alpha != 0 && k > 0;
    int64_t ea = ta == CUBLAS_OP_N ? (int64_t)(k - 1) * lda + m : (int64_t)(m - 1) * lda + k;
    int64_t eb = tb == CUBLAS_OP_N ? (int64_t)(n - 1) * ldb + k : (int64_t)(k - 1) * ldb + n;
    int64_t ec = (int64_t)(n - 1) * ldc + m;
    for (int b = 0; b < batch; b++)
      if (!on_device(C + b * sc, ec) || (use_ab && (!on_device(A + b * sa, ea) || !on_device(B + b * sb, eb))))
        return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  if (sim_async()) {
    /* the product computed when the stream runs it (alpha and beta were
    ** read already: host pointer mode) */
    cudaError_t e = sim_enqueue(h->stream, [=]() {
      cublasStatus_t r = gemm_run(ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch, rnd);
      if (r == CUBLAS_STATUS_SUCCESS) return cudaSuccess;
      sim_set_launch_error(cudaErrorLaunchFailure, "cuBLAS gemm failed when it ran: %s", cublasGetStatusName(r));
      return cudaErrorLaunchFailure;
    });
    return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
  }
  return gemm_run(ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch, rnd);
}

/* gemm's product, its arguments and operands checked */
template <typename T>
static cublasStatus_t gemm_run(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, double alpha,
                               const T *A, int lda, long long sa, const T *B, int ldb, long long sb, double beta, T *C,
                               int ldc, long long sc, int batch, int rnd) {
  int use_ab = alpha != 0 && k > 0;
  std::vector<double> ap, acc;
  try {
    if (use_ab) ap.resize((size_t)m * k);
    acc.resize((size_t)m);
  } catch (...) {
    return CUBLAS_STATUS_ALLOC_FAILED;
  }
  for (int b = 0; b < batch; b++) {
    const T *a = A + b * sa, *bb = B + b * sb;
    T *c = C + b * sc;
    if (use_ab) {
      /* op(A) packed column-major m x k, in double */
      for (int l = 0; l < k; l++)
        for (int i = 0; i < m; i++)
          ap[(size_t)l * m + i] = rounded(ta == CUBLAS_OP_N ? a[i + (int64_t)l * lda] : a[l + (int64_t)i * lda], rnd);
    }
    for (int j = 0; j < n; j++) {
      T *cj = c + (int64_t)j * ldc;
      for (int i = 0; i < m; i++) acc[i] = 0;
      if (use_ab) {
        for (int l = 0; l < k; l++) {
          double x = rounded(tb == CUBLAS_OP_N ? bb[l + (int64_t)j * ldb] : bb[j + (int64_t)l * ldb], rnd);
          const double *al = &ap[(size_t)l * m];
          for (int i = 0; i < m; i++) acc[i] += al[i] * x;
        }
      }
      for (int i = 0; i < m; i++) {
        double v = use_ab ? alpha * acc[i] : 0.0;
        if (beta != 0) v += beta * (double)cj[i];
        cj[i] = (T)v;
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

static int ex_type(cudaDataType at, cudaDataType bt, cudaDataType ct, cublasComputeType_t compute) {
  if (at != bt || at != ct) return -1;
  if (at == CUDA_R_32F && (compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_FAST_TF32 ||
                           compute == CUBLAS_COMPUTE_32F_FAST_16F || compute == CUBLAS_COMPUTE_32F_FAST_16BF))
    return 0;
  if (at == CUDA_R_64F && compute == CUBLAS_COMPUTE_64F) return 1;
  return -1;
}

static int math_round(cublasHandle_t h) {
  return h && h->math == CUBLAS_TF32_TENSOR_OP_MATH ? KEEL_MATMUL_TF32 : KEEL_MATMUL_HIGHEST;
}

/* the rounding of float32 operands: the compute type's, else the math mode's */
static int ex_round(cublasHandle_t h, cublasComputeType_t compute) {
  switch (compute) {
    case CUBLAS_COMPUTE_32F_FAST_TF32: return KEEL_MATMUL_TF32;
    case CUBLAS_COMPUTE_32F_FAST_16BF: return KEEL_MATMUL_BF16;
    case CUBLAS_COMPUTE_32F_FAST_16F: return KEEL_MATMUL_F16;
    case CUBLAS_COMPUTE_32F: return math_round(h);
    default: return KEEL_MATMUL_HIGHEST;
  }
}

extern "C" {

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc) {
  return gemm<float>(h, ta, tb, m, n, k, *alpha, A, lda, 0, B, ldb, 0, *beta, C, ldc, 0, 1, math_round(h));
}

cublasStatus_t cublasDgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const double *alpha, const double *A, int lda, const double *B, int ldb,
                           const double *beta, double *C, int ldc) {
  return gemm<double>(h, ta, tb, m, n, k, *alpha, A, lda, 0, B, ldb, 0, *beta, C, ldc, 0, 1);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                         int k, const float *alpha, const float *A, int lda, long long sa,
                                         const float *B, int ldb, long long sb, const float *beta, float *C, int ldc,
                                         long long sc, int batch) {
  return gemm<float>(h, ta, tb, m, n, k, *alpha, A, lda, sa, B, ldb, sb, *beta, C, ldc, sc, batch, math_round(h));
}

cublasStatus_t cublasDgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                         int k, const double *alpha, const double *A, int lda, long long sa,
                                         const double *B, int ldb, long long sb, const double *beta, double *C,
                                         int ldc, long long sc, int batch) {
  return gemm<double>(h, ta, tb, m, n, k, *alpha, A, lda, sa, B, ldb, sb, *beta, C, ldc, sc, batch);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void *alpha, const void *A, cudaDataType at, int lda,
                                          long long sa, const void *B, cudaDataType bt, int ldb, long long sb,
                                          const void *beta, void *C, cudaDataType ct, int ldc, long long sc,
                                          int batch, cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  (void)algo;
  switch (ex_type(at, bt, ct, compute)) {
    case 0:
      return gemm<float>(h, ta, tb, m, n, k, *(const float *)alpha, (const float *)A, lda, sa, (const float *)B, ldb,
                         sb, *(const float *)beta, (float *)C, ldc, sc, batch, ex_round(h, compute));
    case 1:
      return gemm<double>(h, ta, tb, m, n, k, *(const double *)alpha, (const double *)A, lda, sa, (const double *)B,
                          ldb, sb, *(const double *)beta, (double *)C, ldc, sc, batch);
    default: return h ? CUBLAS_STATUS_NOT_SUPPORTED : CUBLAS_STATUS_NOT_INITIALIZED;
  }
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B,
                            cudaDataType bt, int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, alpha, A, at, lda, 0, B, bt, ldb, 0, beta, C, ct, ldc, 0, 1,
                                    compute, algo);
}

}  // extern "C"

/* }====================================================================== */

/* {======================================================================
** Level 1 and 2, geam
** ======================================================================= */

/* element i of a vector of n with increment inc (negative: from the end) */
static inline int64_t at(int i, int n, int inc) { return inc > 0 ? (int64_t)i * inc : (int64_t)(n - 1 - i) * -inc; }

template <typename T>
static cublasStatus_t gemv(cublasHandle_t h, cublasOperation_t t, int m, int n, double alpha, const T *A, int lda,
                           const T *x, int incx, double beta, T *y, int incy) {
  if (h) (void)sim_wait_stream(h->stream);   /* level 1 and 2 run in order, at once */
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bad_op(t) || m < 0 || n < 0 || lda < imax1(m) || incx == 0 || incy == 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  int ly = t == CUBLAS_OP_N ? m : n, lx = t == CUBLAS_OP_N ? n : m;
  std::vector<double> acc((size_t)ly, 0.0);
  if (alpha != 0) {
    for (int j = 0; j < n; j++)
      for (int i = 0; i < m; i++) {
        double a = (double)A[i + (int64_t)j * lda];
        if (t == CUBLAS_OP_N) acc[i] += a * (double)x[at(j, lx, incx)];
        else acc[j] += a * (double)x[at(i, lx, incx)];
      }
  }
  for (int i = 0; i < ly; i++) {
    T *yi = &y[at(i, ly, incy)];
    double v = alpha != 0 ? alpha * acc[i] : 0.0;
    if (beta != 0) v += beta * (double)*yi;
    *yi = (T)v;
  }
  return CUBLAS_STATUS_SUCCESS;
}

/* C = alpha op(A) + beta op(B); C may be A or B (computed aside first) */
template <typename T>
static cublasStatus_t geam(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, double alpha,
                           const T *A, int lda, double beta, const T *B, int ldb, T *C, int ldc) {
  if (h) (void)sim_wait_stream(h->stream);   /* level 1 and 2 run in order, at once */
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bad_op(ta) || bad_op(tb) || m < 0 || n < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < imax1(ta == CUBLAS_OP_N ? m : n) || ldb < imax1(tb == CUBLAS_OP_N ? m : n) || ldc < imax1(m))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  std::vector<double> out((size_t)m * n);
  for (int j = 0; j < n; j++)
    for (int i = 0; i < m; i++) {
      double v = 0;
      if (alpha != 0) v += alpha * (double)(ta == CUBLAS_OP_N ? A[i + (int64_t)j * lda] : A[j + (int64_t)i * lda]);
      if (beta != 0) v += beta * (double)(tb == CUBLAS_OP_N ? B[i + (int64_t)j * ldb] : B[j + (int64_t)i * ldb]);
      out[(size_t)j * m + i] = v;
    }
  for (int j = 0; j < n; j++)
    for (int i = 0; i < m; i++) C[i + (int64_t)j * ldc] = (T)out[(size_t)j * m + i];
  return CUBLAS_STATUS_SUCCESS;
}

template <typename T>
static cublasStatus_t axpy(cublasHandle_t h, int n, double alpha, const T *x, int incx, T *y, int incy) {
  if (h) (void)sim_wait_stream(h->stream);   /* level 1 and 2 run in order, at once */
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (n <= 0 || alpha == 0) return CUBLAS_STATUS_SUCCESS;
  for (int i = 0; i < n; i++) y[at(i, n, incy)] = (T)((double)y[at(i, n, incy)] + alpha * (double)x[at(i, n, incx)]);
  return CUBLAS_STATUS_SUCCESS;
}

template <typename T>
static cublasStatus_t scal(cublasHandle_t h, int n, double alpha, T *x, int incx) {
  if (h) (void)sim_wait_stream(h->stream);   /* level 1 and 2 run in order, at once */
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (n <= 0 || incx <= 0) return CUBLAS_STATUS_SUCCESS;
  for (int i = 0; i < n; i++) x[(int64_t)i * incx] = (T)(alpha * (double)x[(int64_t)i * incx]);
  return CUBLAS_STATUS_SUCCESS;
}

template <typename T>
static cublasStatus_t dot(cublasHandle_t h, int n, const T *x, int incx, const T *y, int incy, T *r) {
  if (h) (void)sim_wait_stream(h->stream);   /* level 1 and 2 run in order, at once */
  double s = 0;
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  for (int i = 0; i < n; i++) s += (double)x[at(i, n, incx)] * (double)y[at(i, n, incy)];
  *r = (T)s;
  return CUBLAS_STATUS_SUCCESS;
}

template <typename T>
static cublasStatus_t nrm2(cublasHandle_t h, int n, const T *x, int incx, T *r) {
  if (h) (void)sim_wait_stream(h->stream);   /* level 1 and 2 run in order, at once */
  double s = 0;
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (incx > 0)
    for (int i = 0; i < n; i++) s += (double)x[(int64_t)i * incx] * (double)x[(int64_t)i * incx];
  *r = (T)sqrt(s);
  return CUBLAS_STATUS_SUCCESS;
}

template <typename T>
static cublasStatus_t asum(cublasHandle_t h, int n, const T *x, int incx, T *r) {
  if (h) (void)sim_wait_stream(h->stream);   /* level 1 and 2 run in order, at once */
  double s = 0;
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (incx > 0)
    for (int i = 0; i < n; i++) s += fabs((double)x[(int64_t)i * incx]);
  *r = (T)s;
  return CUBLAS_STATUS_SUCCESS;
}

extern "C" {

cublasStatus_t cublasSgemv(cublasHandle_t h, cublasOperation_t t, int m, int n, const float *alpha, const float *A,
                           int lda, const float *x, int incx, const float *beta, float *y, int incy) {
  return gemv<float>(h, t, m, n, *alpha, A, lda, x, incx, *beta, y, incy);
}
cublasStatus_t cublasDgemv(cublasHandle_t h, cublasOperation_t t, int m, int n, const double *alpha, const double *A,
                           int lda, const double *x, int incx, const double *beta, double *y, int incy) {
  return gemv<double>(h, t, m, n, *alpha, A, lda, x, incx, *beta, y, incy);
}
cublasStatus_t cublasSgeam(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                           const float *alpha, const float *A, int lda, const float *beta, const float *B, int ldb,
                           float *C, int ldc) {
  return geam<float>(h, ta, tb, m, n, *alpha, A, lda, *beta, B, ldb, C, ldc);
}
cublasStatus_t cublasDgeam(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                           const double *alpha, const double *A, int lda, const double *beta, const double *B,
                           int ldb, double *C, int ldc) {
  return geam<double>(h, ta, tb, m, n, *alpha, A, lda, *beta, B, ldb, C, ldc);
}
cublasStatus_t cublasSaxpy(cublasHandle_t h, int n, const float *alpha, const float *x, int incx, float *y, int incy) {
  return axpy<float>(h, n, *alpha, x, incx, y, incy);
}
cublasStatus_t cublasDaxpy(cublasHandle_t h, int n, const double *alpha, const double *x, int incx, double *y,
                           int incy) {
  return axpy<double>(h, n, *alpha, x, incx, y, incy);
}
cublasStatus_t cublasSscal(cublasHandle_t h, int n, const float *alpha, float *x, int incx) {
  return scal<float>(h, n, *alpha, x, incx);
}
cublasStatus_t cublasDscal(cublasHandle_t h, int n, const double *alpha, double *x, int incx) {
  return scal<double>(h, n, *alpha, x, incx);
}
cublasStatus_t cublasSdot(cublasHandle_t h, int n, const float *x, int incx, const float *y, int incy, float *r) {
  return dot<float>(h, n, x, incx, y, incy, r);
}
cublasStatus_t cublasDdot(cublasHandle_t h, int n, const double *x, int incx, const double *y, int incy, double *r) {
  return dot<double>(h, n, x, incx, y, incy, r);
}
cublasStatus_t cublasSnrm2(cublasHandle_t h, int n, const float *x, int incx, float *r) {
  return nrm2<float>(h, n, x, incx, r);
}
cublasStatus_t cublasDnrm2(cublasHandle_t h, int n, const double *x, int incx, double *r) {
  return nrm2<double>(h, n, x, incx, r);
}
cublasStatus_t cublasSasum(cublasHandle_t h, int n, const float *x, int incx, float *r) {
  return asum<float>(h, n, x, incx, r);
}
cublasStatus_t cublasDasum(cublasHandle_t h, int n, const double *x, int incx, double *r) {
  return asum<double>(h, n, x, incx, r);
}

}  // extern "C"

/* }====================================================================== */
