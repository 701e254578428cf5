/*
** blas.cu: the matmul entry, out[b] = a[b] @ b[b] through cuBLAS (the
** kl_backend matmul slot; engine/backend_cpu.c cpu_matmul is the
** reference).
**
** keel tensors are row-major, cuBLAS is column-major. A row-major matrix X
** with row stride ld (column stride 1) is, read column-major with that ld,
** X^T; one with row stride 1 and column stride ld is X itself. So every
** operand whose inner strides have a 1 is read in place, transposed or
** not, and the product is formed as C^T = B^T A^T (column-major C^T is
** row-major C). Only an operand with neither inner stride 1 (a strided
** narrow of both dims, a broadcast inside a matrix) is first copied to
** contiguous scratch, and only an output of that kind (the engine never
** passes one: it hands a fresh [B, M, N]) is computed in scratch and
** copied out.
**
** float32 products run in the compute type of the context's matmul
** precision (kc_compute_type: full fp32 by default, as PyTorch's
** allow_tf32 = False; KEEL_MATMUL_TF32 picks CUBLAS_COMPUTE_32F_FAST_TF32,
** the tensor-core path that is several times faster on an H100), so
** every product goes through cublasGemmEx / cublasGemmStridedBatchedEx.
*/
#include "common.cuh"

/* {======================================================================
** Operand layouts
** ======================================================================= */

/* How cuBLAS reads one operand's [rows, cols] matrices: column-major
** storage of X (trans = 0) or of X^T (trans = 1), leading dimension ld;
** bs: the batch stride (0 when broadcast). */
typedef struct mat {
  const void *p;
  int trans;
  int64_t ld;
  int64_t bs;
} mat;

static int64_t max1(int64_t x) { return x > 1 ? x : 1; }

/* Whether t's last two dims (rows x cols) can be read in place; fills m.
** A single row or column leaves one stride free, as in the CPU backend. */
static int mat_layout(const kc_view *t, int64_t rows, int64_t cols, mat *m) {
  int64_t rs = t->stride[1], cs = t->stride[2];
  if (rs > 0x7fffffff || cs > 0x7fffffff) return 0;   /* cuBLAS takes an int ld */
  m->p = t->data;
  m->bs = t->shape[0] > 1 ? t->stride[0] : 0;
  /* row-major: column-major storage of X^T (cols x rows), ld = rs */
  if (cs == 1 || cols == 1) {
    int64_t ld = rows == 1 ? max1(cols) : rs;
    if (ld >= max1(cols)) {
      m->trans = 1;
      m->ld = ld;
      return 1;
    }
  }
  /* column-major: storage of X (rows x cols), ld = cs */
  if (rs == 1 || rows == 1) {
    int64_t ld = cols == 1 ? max1(rows) : cs;
    if (ld >= max1(rows)) {
      m->trans = 0;
      m->ld = ld;
      return 1;
    }
  }
  return 0;
}

/* A dense [B', rows, cols] copy of t at q (B' = 1 when t broadcasts its
** batch), described in m. */
static int dense_copy(kc_state *s, const kc_view *t, void *q, mat *m) {
  kc_view d = *t;
  int64_t rows = t->shape[1], cols = t->shape[2];
  if (t->stride[0] == 0) d.shape[0] = 1;
  d.data = q;
  d.numel = d.shape[0] * rows * cols;
  d.stride[2] = 1;
  d.stride[1] = cols;
  d.stride[0] = rows * cols;
  {
    kc_view src = *t;
    src.shape[0] = d.shape[0];
    src.numel = d.numel;
    int r = kc_copy(s, &d, &src);
    if (r) return r;
  }
  m->p = q;
  m->trans = 1;
  m->ld = max1(cols);
  m->bs = d.shape[0] > 1 ? rows * cols : 0;
  return KC_OK;
}

/* }====================================================================== */

/* {======================================================================
** The product
** ======================================================================= */

/* Row-major out [B, M, N] (row stride ldc, batch stride sc) = a @ b
** through kc_gemm (gemm.cu: the matmul precision applies). */
static int product(kc_state *s, int dt, int64_t B, int64_t M, int64_t N, int64_t K, const mat *a, const mat *b, void *out,
                   int64_t ldc, int64_t sc) {
  const int64_t chunk = (int64_t)1 << 30, es = dt == KEEL_F32 ? 4 : 8;
  /* a dense stack of row-major A matrices times one B: one tall product */
  if (B > 1 && b->bs == 0 && a->trans && a->bs == M * a->ld && sc == M * ldc && M * B <= 0x7fffffff) {
    M *= B;
    B = 1;
  }
  for (int64_t i = 0; i < B; i += chunk) {
    int64_t nb = B - i < chunk ? B - i : chunk;
    const char *pa = (const char *)a->p + i * a->bs * es;
    const char *pb = (const char *)b->p + i * b->bs * es;
    char *po = (char *)out + i * sc * es;
    /* kc_gemm is row-major: op(a) is a as stored when a is row-major (trans 1) */
    int r = kc_gemm(s, dt, !a->trans, !b->trans, M, N, K, pa, a->ld, a->bs, pb, b->ld, b->bs, 0.0, po, ldc, sc, nb);
    if (r) return r;
  }
  return KC_OK;
}

static int matmul(kc_state *s, const kc_view *out, const kc_view *a, const kc_view *b) {
  int64_t B, M, N, K, es, need = 0, at = 0;
  mat ma, mb;
  int fa, fb, fo, r;
  char *scratch = NULL;
  void *po;
  int64_t ldc, sc;
  if (!out || !a || !b || out->ndim != 3 || a->ndim != 3 || b->ndim != 3) return KC_ERR_ARG;
  if (out->dtype != a->dtype || out->dtype != b->dtype) return KC_ERR_DTYPE;
  if (out->dtype != KEEL_F32 && out->dtype != KEEL_F64) return KC_ERR_DTYPE;   /* the CPU takes floats only */
  B = out->shape[0];
  M = out->shape[1];
  N = out->shape[2];
  K = a->shape[2];
  if (a->shape[0] != B || b->shape[0] != B || a->shape[1] != M || b->shape[1] != K || b->shape[2] != N)
    return KC_ERR_ARG;
  if (M > 0x7fffffff || N > 0x7fffffff || K > 0x7fffffff) return KC_ERR_ARG;
  if (B == 0 || M == 0 || N == 0) return KC_OK;
  if (K == 0) return kc_fill(s, out, 0.0);
  es = out->dtype == KEEL_F32 ? 4 : 8;
  fa = mat_layout(a, M, K, &ma);
  fb = mat_layout(b, K, N, &mb);
  /* the output must be row-major with distinct batches (col stride 1) */
  ldc = M == 1 ? N : out->stride[1];
  sc = B == 1 ? M * ldc : out->stride[0];
  fo = (out->stride[2] == 1 || N == 1) && ldc >= N && ldc <= 0x7fffffff && (B == 1 || sc >= M * ldc);
  if (!fa) need += kc_align256((a->stride[0] == 0 ? 1 : B) * M * K * es);
  if (!fb) need += kc_align256((b->stride[0] == 0 ? 1 : B) * K * N * es);
  if (!fo) need += kc_align256(B * M * N * es);
  if (need) {
    void *q;
    if ((r = kc_scratch(s, (size_t)need, &q))) return r;
    scratch = (char *)q;
  }
  if (!fa) {
    if ((r = dense_copy(s, a, scratch + at, &ma))) return r;
    at += kc_align256((a->stride[0] == 0 ? 1 : B) * M * K * es);
  }
  if (!fb) {
    if ((r = dense_copy(s, b, scratch + at, &mb))) return r;
    at += kc_align256((b->stride[0] == 0 ? 1 : B) * K * N * es);
  }
  if (fo) {
    po = out->data;
  } else {
    po = scratch + at;
    ldc = N;
    sc = M * N;
  }
  r = product(s, out->dtype, B, M, N, K, &ma, &mb, po, ldc, sc);
  if (r || fo) return r;
  {
    kc_view t = *out;
    t.data = po;
    t.stride[0] = M * N;
    t.stride[1] = N;
    t.stride[2] = 1;
    return kc_copy(s, out, &t);
  }
}

/* }====================================================================== */

void kc_register_blas(keel_cuda_table *t) { t->matmul = matmul; }
