/*
** backend_cpu.c: the CPU backend. Plain C loops over strided tensors and
** OpenBLAS for matrix products (kl_cpu_gemm, gemm.c).
**
** Every elementwise kernel walks its operands with row_loop(): dimensions
** that are contiguous in every operand are merged, so the inner callback
** sees the longest possible run and usually unit or zero strides, which
** the per-dtype loops below specialise for.
*/
#include <string.h>
#include <tgmath.h>
#include "keel_impl.h"

/* {======================================================================
** N-d iteration
** ======================================================================= */

#define MAXOP 4

typedef struct nd_rows {
  int ndim, nop;
  int64_t shape[KEEL_MAX_DIMS];
  int64_t stride[MAXOP][KEEL_MAX_DIMS];   /* in elements */
  char *base[MAXOP];
  size_t es[MAXOP];
} nd_rows;

typedef void (*row_fn)(void *arg, int64_t n, char **p, const int64_t *s);

/* All operands share ops[0]'s shape. */
static void rows_init(nd_rows *r, int nop, const keel_tensor *const *ops) {
  const keel_tensor *o = ops[0];
  int nd = 0;
  r->nop = nop;
  for (int k = 0; k < nop; k++) {
    r->base[k] = (char *)kl_data(ops[k]);
    r->es[k] = kl_dtype_size[ops[k]->dtype];
  }
  /* drop size-1 dims, merge dims contiguous in every operand */
  for (int i = 0; i < o->ndim; i++) {
    if (o->shape[i] == 1) continue;
    if (nd > 0) {
      int merge = 1;
      for (int k = 0; k < nop; k++)
        if (r->stride[k][nd - 1] != ops[k]->stride[i] * o->shape[i]) { merge = 0; break; }
      if (merge) {
        r->shape[nd - 1] *= o->shape[i];
        for (int k = 0; k < nop; k++) r->stride[k][nd - 1] = ops[k]->stride[i];
        continue;
      }
    }
    r->shape[nd] = o->shape[i];
    for (int k = 0; k < nop; k++) r->stride[k][nd] = ops[k]->stride[i];
    nd++;
  }
  if (nd == 0) {  /* scalar or all-ones shape: one row of one element */
    r->shape[0] = 1;
    for (int k = 0; k < nop; k++) r->stride[k][0] = 0;
    nd = 1;
  }
  r->ndim = nd;
}

static void rows_run(const nd_rows *r, int64_t total, row_fn fn, void *arg) {
  int64_t idx[KEEL_MAX_DIMS] = {0};
  int last = r->ndim - 1;
  int64_t n = r->shape[last];
  char *p[MAXOP];
  int64_t s[MAXOP];
  if (total == 0) return;
  for (int k = 0; k < r->nop; k++) s[k] = r->stride[k][last];
  for (;;) {
    for (int k = 0; k < r->nop; k++) {
      int64_t off = 0;
      for (int i = 0; i < last; i++) off += idx[i] * r->stride[k][i];
      p[k] = r->base[k] + off * (int64_t)r->es[k];
    }
    fn(arg, n, p, s);
    {
      int i = last - 1;
      for (; i >= 0; i--) {
        if (++idx[i] < r->shape[i]) break;
        idx[i] = 0;
      }
      if (i < 0) return;
    }
  }
}

static void run_ops(int nop, const keel_tensor *const *ops, row_fn fn, void *arg) {
  nd_rows r;
  rows_init(&r, nop, ops);
  rows_run(&r, ops[0]->numel, fn, arg);
}

/* }====================================================================== */

/* {======================================================================
** Copy and fill
** ======================================================================= */

static void copy_row(void *arg, int64_t n, char **p, const int64_t *s) {
  const keel_tensor *const *t = (const keel_tensor *const *)arg;
  keel_dtype dd = t[0]->dtype, sd = t[1]->dtype;
  if (dd == sd && s[0] == 1 && s[1] == 1) {
    memcpy(p[0], p[1], (size_t)n * kl_dtype_size[dd]);
    return;
  }
  if (dd == KEEL_F32 && sd == KEEL_F32) {
    float *o = (float *)p[0]; const float *a = (const float *)p[1];
    for (int64_t i = 0; i < n; i++) o[i * s[0]] = a[i * s[1]];
  } else if (dd == KEEL_F32 && sd == KEEL_F64) {
    float *o = (float *)p[0]; const double *a = (const double *)p[1];
    for (int64_t i = 0; i < n; i++) o[i * s[0]] = (float)a[i * s[1]];
  } else if (dd == KEEL_F64 && sd == KEEL_F32) {
    double *o = (double *)p[0]; const float *a = (const float *)p[1];
    for (int64_t i = 0; i < n; i++) o[i * s[0]] = a[i * s[1]];
  } else {
    size_t de = kl_dtype_size[dd], se = kl_dtype_size[sd];
    for (int64_t i = 0; i < n; i++)
      kl_store(p[0] + i * s[0] * (int64_t)de, dd, kl_load(p[1] + i * s[1] * (int64_t)se, sd));
  }
}

static keel_status cpu_copy(keel_ctx *ctx, keel_tensor *dst, const keel_tensor *src) {
  const keel_tensor *ops[2] = {dst, src};
  (void)ctx;
  run_ops(2, ops, copy_row, (void *)ops);
  return KEEL_OK;
}

static void fill_row(void *arg, int64_t n, char **p, const int64_t *s) {
  const keel_tensor *t = (const keel_tensor *)((void **)arg)[0];
  double v = *(const double *)((void **)arg)[1];
  switch (t->dtype) {
    case KEEL_F32: {
      float *o = (float *)p[0], x = (float)v;
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = x;
      break;
    }
    case KEEL_F64: {
      double *o = (double *)p[0];
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = v;
      break;
    }
    default: {
      int64_t *o = (int64_t *)p[0], x = (int64_t)v;
      for (int64_t i = 0; i < n; i++) o[i * s[0]] = x;
      break;
    }
  }
}

static keel_status cpu_fill(keel_ctx *ctx, keel_tensor *dst, double v) {
  void *arg[2] = {dst, &v};
  const keel_tensor *ops[1] = {dst};
  (void)ctx;
  run_ops(1, ops, fill_row, arg);
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Elementwise binary and unary. The loops are written once per element
** type; <tgmath.h> picks the float or double function for the same text.
** ======================================================================= */

/* Expression of x and y for each binary op. */
#define BINARY_FLOAT_OPS(X) \
  X(KEEL_BIN_ADD, x + y) X(KEEL_BIN_SUB, x - y) X(KEEL_BIN_MUL, x * y) X(KEEL_BIN_DIV, x / y) \
  X(KEEL_BIN_POW, pow(x, y)) \
  X(KEEL_BIN_MAXIMUM, (x > y || x != x) ? x : y) X(KEEL_BIN_MINIMUM, (x < y || x != x) ? x : y) \
  X(KEEL_BIN_EQ, x == y) X(KEEL_BIN_NE, x != y) X(KEEL_BIN_LT, x < y) X(KEEL_BIN_LE, x <= y) \
  X(KEEL_BIN_GT, x > y) X(KEEL_BIN_GE, x >= y)

#define BINARY_INT_OPS(X) \
  X(KEEL_BIN_ADD, x + y) X(KEEL_BIN_SUB, x - y) X(KEEL_BIN_MUL, x * y) \
  X(KEEL_BIN_MAXIMUM, x > y ? x : y) X(KEEL_BIN_MINIMUM, x < y ? x : y) \
  X(KEEL_BIN_EQ, x == y) X(KEEL_BIN_NE, x != y) X(KEEL_BIN_LT, x < y) X(KEEL_BIN_LE, x <= y) \
  X(KEEL_BIN_GT, x > y) X(KEEL_BIN_GE, x >= y)

/* The common stride patterns get their own loop so they vectorise. */
#define BINARY_LOOP(T, EXPR) do { \
    T *o = (T *)p[0]; const T *A = (const T *)p[1], *B = (const T *)p[2]; \
    if (s[0] == 1 && s[1] == 1 && s[2] == 1) { \
      for (int64_t i = 0; i < n; i++) { T x = A[i], y = B[i]; o[i] = (T)(EXPR); } \
    } else if (s[0] == 1 && s[1] == 1 && s[2] == 0) { \
      const T y = B[0]; \
      for (int64_t i = 0; i < n; i++) { T x = A[i]; o[i] = (T)(EXPR); } \
    } else if (s[0] == 1 && s[1] == 0 && s[2] == 1) { \
      const T x = A[0]; \
      for (int64_t i = 0; i < n; i++) { T y = B[i]; o[i] = (T)(EXPR); } \
    } else { \
      for (int64_t i = 0; i < n; i++) { T x = A[i * s[1]], y = B[i * s[2]]; o[i * s[0]] = (T)(EXPR); } \
    } \
  } while (0)

#define CASE_F32(OP, EXPR) case OP: BINARY_LOOP(float, EXPR); break;
#define CASE_F64(OP, EXPR) case OP: BINARY_LOOP(double, EXPR); break;
#define CASE_I64(OP, EXPR) case OP: BINARY_LOOP(int64_t, EXPR); break;

static void binary_row(void *arg, int64_t n, char **p, const int64_t *s) {
  const int *a = (const int *)arg;  /* {op, dtype} */
  switch (a[1]) {
    case KEEL_F32: switch (a[0]) { BINARY_FLOAT_OPS(CASE_F32) default: break; } break;
    case KEEL_F64: switch (a[0]) { BINARY_FLOAT_OPS(CASE_F64) default: break; } break;
    default: switch (a[0]) { BINARY_INT_OPS(CASE_I64) default: break; } break;
  }
}

static keel_status cpu_binary(keel_ctx *ctx, keel_binop op, keel_tensor *out,
                              const keel_tensor *a, const keel_tensor *b) {
  int arg[2] = {(int)op, (int)out->dtype};
  const keel_tensor *ops[3] = {out, a, b};
  if (out->dtype == KEEL_I64 && (op == KEEL_BIN_DIV || op == KEEL_BIN_POW))
    return kl_error(ctx, KEEL_ERR_TYPE, "%s: not defined for int64 tensors",
                    op == KEEL_BIN_DIV ? "div" : "pow");
  run_ops(3, ops, binary_row, arg);
  return KEEL_OK;
}

#define UNARY_FLOAT_OPS(X) \
  X(KEEL_UN_NEG, -x) X(KEEL_UN_EXP, exp(x)) X(KEEL_UN_LOG, log(x)) X(KEEL_UN_SQRT, sqrt(x)) \
  X(KEEL_UN_ABS, fabs(x)) X(KEEL_UN_RELU, x <= 0 ? 0 : x) \
  X(KEEL_UN_SIGMOID, 1 / (1 + exp(-x))) X(KEEL_UN_TANH, tanh(x)) \
  X(KEEL_UN_SIGN, (x > 0) - (x < 0))

#define UNARY_INT_OPS(X) \
  X(KEEL_UN_NEG, -x) X(KEEL_UN_ABS, x < 0 ? -x : x) X(KEEL_UN_RELU, x <= 0 ? 0 : x) \
  X(KEEL_UN_SIGN, (x > 0) - (x < 0))

#define UNARY_LOOP(T, EXPR) do { \
    T *o = (T *)p[0]; const T *A = (const T *)p[1]; \
    if (s[0] == 1 && s[1] == 1) { for (int64_t i = 0; i < n; i++) { T x = A[i]; o[i] = (T)(EXPR); } } \
    else { for (int64_t i = 0; i < n; i++) { T x = A[i * s[1]]; o[i * s[0]] = (T)(EXPR); } } \
  } while (0)

#define UCASE_F32(OP, EXPR) case OP: UNARY_LOOP(float, EXPR); break;
#define UCASE_F64(OP, EXPR) case OP: UNARY_LOOP(double, EXPR); break;
#define UCASE_I64(OP, EXPR) case OP: UNARY_LOOP(int64_t, EXPR); break;

/*
** relu on contiguous float32, branch-free: random signs make the obvious
** `x <= 0 ? 0 : x` a coin-flip branch, 40x slower than this masking, which
** also keeps NaN (the comparison is false, so the mask keeps every bit).
*/
static void relu_f32(int64_t n, float *o, const float *x) {
  for (int64_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &x[i], 4);
    u &= (uint32_t)0 - (uint32_t)!(x[i] < 0.0f);
    memcpy(&o[i], &u, 4);
  }
}

static void relu_f64(int64_t n, double *o, const double *x) {
  for (int64_t i = 0; i < n; i++) {
    uint64_t u;
    memcpy(&u, &x[i], 8);
    u &= (uint64_t)0 - (uint64_t)!(x[i] < 0.0);
    memcpy(&o[i], &u, 8);
  }
}

static void unary_row(void *arg, int64_t n, char **p, const int64_t *s) {
  const int *a = (const int *)arg;
  if (a[0] == KEEL_UN_RELU && s[0] == 1 && s[1] == 1 && a[1] != KEEL_I64) {
    if (a[1] == KEEL_F32) relu_f32(n, (float *)p[0], (const float *)p[1]);
    else relu_f64(n, (double *)p[0], (const double *)p[1]);
    return;
  }
  switch (a[1]) {
    case KEEL_F32: switch (a[0]) { UNARY_FLOAT_OPS(UCASE_F32) default: break; } break;
    case KEEL_F64: switch (a[0]) { UNARY_FLOAT_OPS(UCASE_F64) default: break; } break;
    default: switch (a[0]) { UNARY_INT_OPS(UCASE_I64) default: break; } break;
  }
}

static keel_status cpu_unary(keel_ctx *ctx, keel_unop op, keel_tensor *out, const keel_tensor *a) {
  int arg[2] = {(int)op, (int)out->dtype};
  const keel_tensor *ops[2] = {out, a};
  (void)ctx;
  run_ops(2, ops, unary_row, arg);
  return KEEL_OK;
}

typedef struct clamp_arg { keel_dtype dt; double lo, hi; } clamp_arg;

static void clamp_row(void *arg, int64_t n, char **p, const int64_t *s) {
  const clamp_arg *c = (const clamp_arg *)arg;
  /* NaN stays NaN, as torch.clamp */
  switch (c->dt) {
    case KEEL_F32: { float lo = (float)c->lo, hi = (float)c->hi;
      UNARY_LOOP(float, x < lo ? lo : x > hi ? hi : x); break; }
    case KEEL_F64: { double lo = c->lo, hi = c->hi;
      UNARY_LOOP(double, x < lo ? lo : x > hi ? hi : x); break; }
    default: { double lo = c->lo, hi = c->hi;
      UNARY_LOOP(int64_t, (double)x < lo ? (int64_t)ceil(lo) : (double)x > hi ? (int64_t)floor(hi) : x);
      break; }
  }
}

static keel_status cpu_clamp(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, double lo,
                             double hi) {
  clamp_arg c = {out->dtype, lo, hi};
  const keel_tensor *ops[2] = {out, a};
  (void)ctx;
  run_ops(2, ops, clamp_row, &c);
  return KEEL_OK;
}

static void where_row(void *arg, int64_t n, char **p, const int64_t *s) {
  const keel_tensor *const *t = (const keel_tensor *const *)arg;
  keel_dtype cd = t[1]->dtype, dt = t[0]->dtype;
  size_t ce = kl_dtype_size[cd], es = kl_dtype_size[dt];
  for (int64_t i = 0; i < n; i++) {
    int c = kl_load(p[1] + i * s[1] * (int64_t)ce, cd) != 0;
    memcpy(p[0] + i * s[0] * (int64_t)es, (c ? p[2] + i * s[2] * (int64_t)es : p[3] + i * s[3] * (int64_t)es), es);
  }
}

static keel_status cpu_where(keel_ctx *ctx, keel_tensor *out, const keel_tensor *c,
                             const keel_tensor *a, const keel_tensor *b) {
  const keel_tensor *ops[4] = {out, c, a, b};
  (void)ctx;
  run_ops(4, ops, where_row, (void *)ops);
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Reductions. Accumulation is in double, in a fixed order, so results do
** not depend on threads or alignment.
** ======================================================================= */

typedef struct reducer {
  int nk, nr;                              /* kept / reduced dims */
  int64_t kshape[KEEL_MAX_DIMS], kstride[KEEL_MAX_DIMS], ostride[KEEL_MAX_DIMS];
  int64_t rshape[KEEL_MAX_DIMS], rstride[KEEL_MAX_DIMS];
  int64_t rcount;
} reducer;

static void reducer_init(reducer *R, const keel_tensor *a, const keel_tensor *out, const int *reduce) {
  R->nk = R->nr = 0;
  R->rcount = 1;
  for (int i = 0; i < a->ndim; i++) {
    if (reduce[i]) {
      if (a->shape[i] == 1) continue;
      /* merge with the previous reduced dim when contiguous */
      if (R->nr > 0 && R->rstride[R->nr - 1] == a->stride[i] * a->shape[i]) {
        R->rshape[R->nr - 1] *= a->shape[i];
        R->rstride[R->nr - 1] = a->stride[i];
      } else {
        R->rshape[R->nr] = a->shape[i];
        R->rstride[R->nr] = a->stride[i];
        R->nr++;
      }
      R->rcount *= a->shape[i];
    } else {
      R->kshape[R->nk] = a->shape[i];
      R->kstride[R->nk] = a->stride[i];
      R->ostride[R->nk] = out->stride[i];
      R->nk++;
    }
  }
}

/* Visits the reduced elements of one output position in a fixed order. */
typedef struct acc {
  int op;            /* KEEL_RED_* or -1 for norm */
  double p;          /* norm order */
  double v;          /* running value */
  int64_t arg;       /* position of the extreme, in reduced-element order */
  int64_t k;         /* elements seen */
} acc;

static void acc_init(acc *A, int op, double p) {
  A->op = op; A->p = p; A->k = 0; A->arg = 0;
  A->v = op == KEEL_RED_PROD ? 1.0 : op == KEEL_RED_MAX ? -INFINITY : op == KEEL_RED_MIN ? INFINITY : 0.0;
}

static void acc_row(acc *A, const char *base, int64_t n, int64_t stride, keel_dtype dt) {
  size_t es = kl_dtype_size[dt];
  if (A->op == KEEL_RED_SUM || A->op == KEEL_RED_MEAN) {
    if (dt == KEEL_F32 && stride == 1) {
      const float *x = (const float *)base;
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) { s0 += x[i]; s1 += x[i + 1]; s2 += x[i + 2]; s3 += x[i + 3]; }
      for (; i < n; i++) s0 += x[i];
      A->v += (s0 + s1) + (s2 + s3);
    } else if (dt == KEEL_F64 && stride == 1) {
      const double *x = (const double *)base;
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) { s0 += x[i]; s1 += x[i + 1]; s2 += x[i + 2]; s3 += x[i + 3]; }
      for (; i < n; i++) s0 += x[i];
      A->v += (s0 + s1) + (s2 + s3);
    } else {
      for (int64_t i = 0; i < n; i++) A->v += kl_load(base + i * stride * (int64_t)es, dt);
    }
    A->k += n;
    return;
  }
  for (int64_t i = 0; i < n; i++, A->k++) {
    double x = kl_load(base + i * stride * (int64_t)es, dt);
    switch (A->op) {
      case KEEL_RED_PROD: A->v *= x; break;
      case KEEL_RED_MAX:
        if (A->v == A->v && (x > A->v || x != x)) { A->v = x; A->arg = A->k; }
        break;
      case KEEL_RED_MIN:
        if (A->v == A->v && (x < A->v || x != x)) { A->v = x; A->arg = A->k; }
        break;
      default: {  /* norm */
        double ax = fabs(x);
        if (isinf(A->p)) { if (ax > A->v || ax != ax) A->v = A->v != A->v ? A->v : ax; }
        else if (A->p == 2) A->v += ax * ax;
        else if (A->p == 1) A->v += ax;
        else A->v += pow(ax, A->p);
      }
    }
  }
}

static void acc_position(const reducer *R, const char *base, acc *A, keel_dtype dt) {
  int64_t idx[KEEL_MAX_DIMS] = {0};
  int last = R->nr - 1;
  size_t es = kl_dtype_size[dt];
  if (R->nr == 0) { acc_row(A, base, 1, 1, dt); return; }
  for (;;) {
    int64_t off = 0;
    for (int i = 0; i < last; i++) off += idx[i] * R->rstride[i];
    acc_row(A, base + off * (int64_t)es, R->rshape[last], R->rstride[last], dt);
    {
      int i = last - 1;
      for (; i >= 0; i--) {
        if (++idx[i] < R->rshape[i]) break;
        idx[i] = 0;
      }
      if (i < 0) return;
    }
  }
}

static keel_status reduce_common(keel_ctx *ctx, int op, double p, keel_tensor *out, keel_tensor *idxt,
                                 const keel_tensor *a, const int *reduce) {
  reducer R;
  int64_t kidx[KEEL_MAX_DIMS] = {0};
  int64_t total = out->numel;
  const char *abase = (const char *)kl_data(a);
  char *obase = (char *)kl_data(out);
  char *ibase = idxt ? (char *)kl_data(idxt) : NULL;
  size_t aes = kl_dtype_size[a->dtype], oes = kl_dtype_size[out->dtype];
  (void)ctx;
  reducer_init(&R, a, out, reduce);
  for (int64_t pos = 0; pos < total; pos++) {
    int64_t aoff = 0, ooff = 0;
    acc A;
    for (int i = 0; i < R.nk; i++) { aoff += kidx[i] * R.kstride[i]; ooff += kidx[i] * R.ostride[i]; }
    acc_init(&A, op, p);
    if (a->numel > 0) acc_position(&R, abase + aoff * (int64_t)aes, &A, a->dtype);
    if (op == KEEL_RED_MEAN) A.v = R.rcount ? A.v / (double)R.rcount : NAN;
    if (op < 0 && !isinf(p)) A.v = p == 2 ? sqrt(A.v) : p == 1 ? A.v : pow(A.v, 1.0 / p);
    kl_store(obase + ooff * (int64_t)oes, out->dtype, A.v);
    if (ibase) *(int64_t *)(ibase + ooff * 8) = A.arg + ctx->index_base;
    for (int i = R.nk - 1; i >= 0; i--) {
      if (++kidx[i] < R.kshape[i]) break;
      kidx[i] = 0;
    }
  }
  return KEEL_OK;
}

static keel_status cpu_reduce(keel_ctx *ctx, keel_redop op, keel_tensor *out, keel_tensor *idx,
                              const keel_tensor *a, const int *reduce) {
  return reduce_common(ctx, (int)op, 0, out, idx, a, reduce);
}

static keel_status cpu_norm(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, const int *reduce,
                            double p) {
  return reduce_common(ctx, -1, p, out, NULL, a, reduce);
}

/* }====================================================================== */

/* {======================================================================
** Matrix product through BLAS
** ======================================================================= */

/* How BLAS reads the last two dims of t (rows x cols), *tr set when
** transposed: 0 when it can't. */
static int gemm_layout(const keel_tensor *t, int64_t rows, int64_t cols, int *tr, int64_t *ld) {
  int64_t rs = t->stride[1], cs = t->stride[2];
  if (cols == 1 && rs >= 1) cs = 1;          /* single column: stride irrelevant */
  if (rows == 1) rs = cols > 0 ? cols : 1;   /* single row */
  if (cs == 1 && rs >= (cols > 1 ? cols : 1)) { *tr = 0; *ld = rs; return 1; }
  if (rs == 1 && cs >= (rows > 1 ? rows : 1)) { *tr = 1; *ld = cs; return 1; }
  return 0;
}

/* A contiguous copy of t, for operands BLAS cannot read in place. */
static keel_status dense_copy(keel_ctx *ctx, const keel_tensor *t, keel_tensor **out) {
  keel_status st = kl_new_like(ctx, t, t->dtype, out);
  if (st) return st;
  return cpu_copy(ctx, *out, t);
}

static keel_status cpu_matmul(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a,
                              const keel_tensor *b) {
  int64_t B = out->shape[0], M = out->shape[1], N = out->shape[2], K = a->shape[2];
  int ta, tb;
  int64_t lda, ldb;
  size_t es = kl_dtype_size[out->dtype];
  keel_tensor *ca = NULL, *cb = NULL;
  keel_status st = KEEL_OK;
  char *pa, *pb, *po = (char *)kl_data(out);
  if (M == 0 || N == 0 || B == 0) return KEEL_OK;
  if (K == 0) return cpu_fill(ctx, out, 0.0);
  if (!gemm_layout(a, M, K, &ta, &lda)) {
    if ((st = dense_copy(ctx, a, &ca))) return st;
    a = ca;
    gemm_layout(a, M, K, &ta, &lda);
  }
  if (!gemm_layout(b, K, N, &tb, &ldb)) {
    if ((st = dense_copy(ctx, b, &cb))) { keel_tensor_release(ca); return st; }
    b = cb;
    gemm_layout(b, K, N, &tb, &ldb);
  }
  pa = (char *)kl_data(a);
  pb = (char *)kl_data(b);
  /* a contiguous stack of A matrices times one B: one tall product */
  if (!ta && B > 1 && b->stride[0] == 0 && a->stride[0] == M * lda) {
    M *= B;
    B = 1;
  }
  for (int64_t i = 0; i < B; i++) {
    char *xa = pa + i * a->stride[0] * (int64_t)es, *xb = pb + i * b->stride[0] * (int64_t)es;
    char *xo = po + i * M * N * (int64_t)es;
    if ((st = kl_cpu_gemm(ctx, out->dtype, ta, tb, M, N, K, xa, lda, xb, ldb, 0.0,
                          xo, N)))
      break;
  }
  keel_tensor_release(ca);
  keel_tensor_release(cb);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Indexing kernels. Index values were range-checked by the op layer.
** ======================================================================= */

/* Calls fn for every element position of shape (row-major). */
#define FOR_EACH_INDEX(ndim, shape, idx, BODY) do { \
    int64_t idx[KEEL_MAX_DIMS] = {0}; \
    int64_t total_ = kl_numel(ndim, shape); \
    for (int64_t k_ = 0; k_ < total_; k_++) { \
      BODY \
      for (int i_ = (ndim) - 1; i_ >= 0; i_--) { if (++idx[i_] < (shape)[i_]) break; idx[i_] = 0; } \
    } \
  } while (0)

static int64_t offset_of(const keel_tensor *t, const int64_t *idx) {
  int64_t off = 0;
  for (int i = 0; i < t->ndim; i++) off += idx[i] * t->stride[i];
  return off;
}

static keel_status cpu_gather(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, int dim,
                              const keel_tensor *index) {
  size_t es = kl_dtype_size[a->dtype];
  char *pa = (char *)kl_data(a), *po = (char *)kl_data(out);
  const int64_t *pi = (const int64_t *)kl_data(index);
  int base = ctx->index_base;
  FOR_EACH_INDEX(out->ndim, out->shape, idx, {
    int64_t src[KEEL_MAX_DIMS];
    memcpy(src, idx, sizeof src);
    src[dim] = pi[offset_of(index, idx)] - base;
    memcpy(po + offset_of(out, idx) * (int64_t)es, pa + offset_of(a, src) * (int64_t)es, es);
  });
  return KEEL_OK;
}

static keel_status cpu_scatter_add(keel_ctx *ctx, keel_tensor *out, int dim, const keel_tensor *index,
                                   const keel_tensor *src) {
  size_t es = kl_dtype_size[out->dtype];
  char *po = (char *)kl_data(out), *ps = (char *)kl_data(src);
  const int64_t *pi = (const int64_t *)kl_data(index);
  int base = ctx->index_base;
  FOR_EACH_INDEX(index->ndim, index->shape, idx, {
    int64_t dst[KEEL_MAX_DIMS];
    char *q;
    memcpy(dst, idx, sizeof dst);
    dst[dim] = pi[offset_of(index, idx)] - base;
    q = po + offset_of(out, dst) * (int64_t)es;
    kl_store(q, out->dtype, kl_load(q, out->dtype) + kl_load(ps + offset_of(src, idx) * (int64_t)es, src->dtype));
  });
  return KEEL_OK;
}

static keel_status cpu_index_select(keel_ctx *ctx, keel_tensor *out, const keel_tensor *a, int dim,
                                    const keel_tensor *index) {
  size_t es = kl_dtype_size[a->dtype];
  char *pa = (char *)kl_data(a), *po = (char *)kl_data(out);
  const int64_t *pi = (const int64_t *)kl_data(index);
  int base = ctx->index_base;
  FOR_EACH_INDEX(out->ndim, out->shape, idx, {
    int64_t src[KEEL_MAX_DIMS];
    memcpy(src, idx, sizeof src);
    src[dim] = pi[idx[dim] * index->stride[0]] - base;
    memcpy(po + offset_of(out, idx) * (int64_t)es, pa + offset_of(a, src) * (int64_t)es, es);
  });
  return KEEL_OK;
}

/* }====================================================================== */

const kl_backend kl_cpu_backend = {
  .name = "cpu",
  .alloc = kl_cpu_alloc,
  .free = kl_cpu_free,
  .copy = cpu_copy,
  .fill = cpu_fill,
  .binary = cpu_binary,
  .unary = cpu_unary,
  .clamp = cpu_clamp,
  .where = cpu_where,
  .reduce = cpu_reduce,
  .norm = cpu_norm,
  .matmul = cpu_matmul,
  .gather = cpu_gather,
  .scatter_add = cpu_scatter_add,
  .index_select = cpu_index_select,
  /* kernels of the nn areas live in backend_cpu_<area>.c */
  /* @init:conv */
  .conv2d = kl_cpu_conv2d,
  .conv2d_backward = kl_cpu_conv2d_backward,
  .max_pool2d = kl_cpu_max_pool2d,
  .max_pool2d_backward = kl_cpu_max_pool2d_backward,
  .avg_pool2d = kl_cpu_avg_pool2d,
  .avg_pool2d_backward = kl_cpu_avg_pool2d_backward,
  /* @init:norm */
  .norm_stats = kl_cpu_norm_stats,
  .norm_forward = kl_cpu_norm_forward,
  .norm_backward = kl_cpu_norm_backward,
  .dropout_mask = kl_cpu_dropout_mask,
  .embedding = kl_cpu_embedding,
  .embedding_backward = kl_cpu_embedding_backward,
  /* @init:act */
  .act = kl_cpu_act, .act_backward = kl_cpu_act_backward,
  .softmax = kl_cpu_softmax, .softmax_backward = kl_cpu_softmax_backward,
  .ploss = kl_cpu_ploss, .ploss_backward = kl_cpu_ploss_backward,
  .closs = kl_cpu_closs, .closs_backward = kl_cpu_closs_backward,
  .bce = kl_cpu_bce, .bce_backward = kl_cpu_bce_backward,
  /* @init:rnn */
  .rnn_forward = kl_cpu_rnn_forward,
  .rnn_backward = kl_cpu_rnn_backward,
  /* @init:attn */
  .sdpa_forward = kl_cpu_sdpa_forward,
  .sdpa_backward = kl_cpu_sdpa_backward,
  /* @init:optim */
  .grad_stats = kl_cpu_grad_stats,
  .grad_scale_ = kl_cpu_grad_scale_,
  .optim_update = kl_cpu_optim_update,
};
