/*
** anomaly.c: anomaly detection. Names the first op that makes NaN or Inf,
** in forward (kl_anomaly_record, called by kl_record) and in backward
** (kl_anomaly_grad, called for each input gradient a node produces).
**
** Cost: off, one branch per recorded op. On, one scan of each recorded
** output, right after the op wrote it (still in cache), and of each
** gradient backward makes. The scan tests the exponent bits as integers:
** all ones is Inf or NaN. That needs no floating-point reassociation, so
** it vectorises without -ffast-math, and it cannot trap. Everything else
** (telling NaN from Inf, scanning leaf inputs, statistics) happens only on
** the rare path, once an output is non-finite.
**
** Scans that cannot find anything are skipped: an op that only selects,
** moves or negates values (views, relu, max pool, cat, ...) has a finite
** output when its inputs are known finite, and a backward that only masks
** or moves its gradient (relu, views, ...) gives finite input gradients
** for a gradient known finite. The known states live in the nodes
** (an_state for the output, an_gstate for the gradient arriving there).
*/
#include <math.h>
#include <string.h>
#include "keel_impl.h"

/* {======================================================================
** Scans
** ======================================================================= */

#define F32_EXP 0x7f800000u
#define F64_EXP_HI 0x7ff00000u   /* exponent bits of a double's high word */

#if defined(__GNUC__)
typedef uint32_t v4u __attribute__((vector_size(16)));

/*
** Non-finite elements among n 32-bit words at p, each word masked with m
** and compared with c (lane pattern of period 4). 16 words per iteration,
** four accumulators; a comparison yields -1 per true lane.
*/
static int64_t count_words(const uint32_t *p, int64_t n, v4u m, v4u c) {
  int64_t total = 0, i = 0;
  while (n - i >= 16) {
    /* bounded so the 32-bit lanes cannot wrap: 2^28 iterations at most */
    int64_t stop = i + ((n - i) / 16 < ((int64_t)1 << 28) ? (n - i) / 16 : ((int64_t)1 << 28)) * 16;
    v4u a0 = {0, 0, 0, 0}, a1 = a0, a2 = a0, a3 = a0;
    for (; i < stop; i += 16) {
      v4u x0, x1, x2, x3;
      memcpy(&x0, p + i, 16);
      memcpy(&x1, p + i + 4, 16);
      memcpy(&x2, p + i + 8, 16);
      memcpy(&x3, p + i + 12, 16);
      a0 -= (v4u)((x0 & m) == c);
      a1 -= (v4u)((x1 & m) == c);
      a2 -= (v4u)((x2 & m) == c);
      a3 -= (v4u)((x3 & m) == c);
    }
    a0 += a1 + a2 + a3;
    total += (int64_t)a0[0] + a0[1] + a0[2] + a0[3];
  }
  for (; i < n; i++) total += (p[i] & m[i & 3]) == c[i & 3];
  return total;
}

static int64_t count_f32(const void *data, int64_t n) {
  v4u m = {F32_EXP, F32_EXP, F32_EXP, F32_EXP};
  return count_words((const uint32_t *)data, n, m, m);
}

/* Doubles as pairs of words: only the high (odd, little-endian) word is
** tested; the low lanes compare 0 with 1, never equal. */
static int64_t count_f64(const void *data, int64_t n) {
  v4u m = {0, F64_EXP_HI, 0, F64_EXP_HI}, c = {1, F64_EXP_HI, 1, F64_EXP_HI};
  return count_words((const uint32_t *)data, 2 * n, m, c);
}
#else
static int64_t count_f32(const void *data, int64_t n) {
  const uint32_t *p = (const uint32_t *)data;
  int64_t total = 0;
  for (int64_t i = 0; i < n; i++) total += (p[i] & F32_EXP) == F32_EXP;
  return total;
}

static int64_t count_f64(const void *data, int64_t n) {
  const uint64_t *p = (const uint64_t *)data;
  int64_t total = 0;
  for (int64_t i = 0; i < n; i++) total += (p[i] >> 32 & F64_EXP_HI) == F64_EXP_HI;
  return total;
}
#endif

static int is_float(const keel_tensor *t) {
  return t->dtype == KEEL_F32 || t->dtype == KEEL_F64;
}

/*
** Visits every element of t in row-major order; dims of stride 0 are
** visited once when `unique` (enough to know whether any is non-finite).
** fn returns nonzero to stop.
*/
typedef int (*visit_fn)(void *ud, double v);

static void visit(const keel_tensor *t, int unique, visit_fn fn, void *ud) {
  int64_t shape[KEEL_MAX_DIMS], stride[KEEL_MAX_DIMS], idx[KEEL_MAX_DIMS];
  int nd = 0;
  const char *base = (const char *)kl_data(t);
  size_t es = kl_dtype_size[t->dtype];
  int64_t count = 1;
  for (int d = 0; d < t->ndim; d++) {
    if (t->shape[d] == 0) return;
    if (t->shape[d] == 1 || (unique && t->stride[d] == 0)) continue;
    shape[nd] = t->shape[d];
    stride[nd] = t->stride[d];
    idx[nd] = 0;
    count *= shape[nd];
    nd++;
  }
  for (int64_t k = 0; k < count; k++) {
    int64_t off = 0;
    for (int d = 0; d < nd; d++) off += idx[d] * stride[d];
    if (fn(ud, kl_load(base + off * (int64_t)es, t->dtype))) return;
    for (int d = nd - 1; d >= 0; d--) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
}

static int any_bad(void *ud, double v) {
  if (isfinite(v)) return 0;
  *(int *)ud = 1;
  return 1;
}

/* A device tensor's NaN/Inf count from its backend's statistics kernel
** (one small copy back per call: anomaly mode trades speed for the
** answer, on every device). A backend that cannot say counts as finite,
** and its error message is not kept: the op being checked succeeded. */
static int device_nonfinite(const keel_tensor *t) {
  keel_ctx *ctx = t->ctx;
  keel_tensor *c = NULL;
  keel_grad_stats s;
  kl_err_saved saved;
  int bad = 0;
  kl_err_save(ctx, &saved);
  if (keel_contiguous(ctx, (keel_tensor *)t, &c) == KEEL_OK &&
      kl_backend_for(ctx, c->storage->device)->grad_stats(ctx, c, 1, NULL, NULL, 0, &s, NULL, NULL) == KEEL_OK)
    bad = s.nan + s.inf > 0;
  keel_tensor_release(c);
  kl_err_restore(ctx, &saved);
  return bad;
}

/* Nonzero when t holds NaN or Inf: the fast scan. */
static int has_nonfinite(const keel_tensor *t) {
  if (!is_float(t) || t->numel == 0) return 0;
  if (t->storage->device != KEEL_CPU) return device_nonfinite(t);
  if (kl_is_contiguous(t))
    return (t->dtype == KEEL_F32 ? count_f32(kl_data(t), t->numel) : count_f64(kl_data(t), t->numel)) != 0;
  {
    int bad = 0;
    visit(t, 1, any_bad, &bad);
    return bad;
  }
}

typedef struct tally { int64_t nan, inf; double lo, hi; } tally;

static int add_tally(void *ud, double v) {
  tally *s = (tally *)ud;
  if (isnan(v)) s->nan++;
  else if (isinf(v)) s->inf++;
  else {
    if (v < s->lo) s->lo = v;
    if (v > s->hi) s->hi = v;
  }
  return 0;
}

/* The rare path: NaN and Inf counts, finite range (every element). */
static tally count_all(const keel_tensor *t) {
  tally s = {0, 0, INFINITY, -INFINITY};
  if (is_float(t) && t->storage->device == KEEL_CPU) {
    visit(t, 0, add_tally, &s);
  } else if (is_float(t)) {
    /* a device tensor comes over once (events are rare); a failed copy
    ** counts nothing and leaves no error behind (as device_nonfinite) */
    keel_ctx *ctx = t->ctx;
    keel_tensor *h = NULL;
    kl_err_saved saved;
    kl_err_save(ctx, &saved);
    if (kl_transfer(ctx, t, KEEL_CPU, t->dtype, &h) == KEEL_OK) visit(h, 0, add_tally, &s);
    keel_tensor_release(h);
    kl_err_restore(ctx, &saved);
  }
  if (s.lo > s.hi) s.lo = s.hi = NAN;   /* no finite element */
  return s;
}

keel_status keel_count_nonfinite(keel_ctx *ctx, const keel_tensor *t, int64_t *nan, int64_t *inf) {
  tally s;
  keel_status st;
  if ((st = kl_check_same_ctx(ctx, "count_nonfinite", t))) return st;
  s = count_all(t);
  if (nan) *nan = s.nan;
  if (inf) *inf = s.inf;
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Forward and backward checks
** ======================================================================= */

/* Ops whose output shares its input's storage: they cannot make a NaN. */
static int is_view_op(int op) {
  return op == KL_OP_VIEW || op == KL_OP_PERMUTE || op == KL_OP_NARROW || op == KL_OP_SELECT ||
         op == KL_OP_EXPAND;
}

/* Ops whose output is finite whenever their inputs are: they only select,
** move or negate values (relu, max pool: the largest of finite values).
** Their output is not scanned when every input is known finite. */
static int keeps_finite(int op) {
  switch (op) {
    case KL_OP_RELU: case KL_OP_NEG: case KL_OP_ABS: case KL_OP_WHERE: case KL_OP_COPY:
    case KL_OP_CAT: case KL_OP_GATHER: case KL_OP_INDEX_SELECT: case KL_OP_EMBEDDING:
    case KL_OP_MAX_POOL2D: case KL_OP_AMAX: case KL_OP_MAX_DIM:
      return 1;
    default:
      return is_view_op(op);
  }
}

/* Ops whose backward turns a finite gradient into finite input gradients
** whatever the forward values were: it masks, moves or negates it. (Not
** expand, pools or index ops: their backward sums.) */
static int backward_keeps_finite(int op) {
  switch (op) {
    case KL_OP_RELU: case KL_OP_NEG: case KL_OP_VIEW: case KL_OP_PERMUTE: case KL_OP_NARROW:
    case KL_OP_SELECT: case KL_OP_COPY: case KL_OP_CAT: case KL_OP_WHERE: case KL_OP_CLAMP:
      return 1;
    default:
      return 0;
  }
}

static int known_finite(const keel_tensor *t) {
  return t->grad_fn && t->grad_fn->an_state == KL_AN_FINITE;
}

static void event_begin(keel_ctx *ctx, int backward, int op) {
  keel_anomaly_event *ev = &ctx->anomaly_event;
  memset(ev, 0, sizeof *ev);
  ev->backward = backward;
  ev->op = op;
  ev->input = -1;
  ev->has_stats = ctx->anomaly_full;
}

static void event_input(keel_anomaly_event *ev, int index, int ndim, const int64_t *shape) {
  int k = ev->n_in;
  if (k >= KEEL_ANOMALY_MAX_IN) return;
  ev->in_index[k] = index;
  ev->in_ndim[k] = ndim;
  memcpy(ev->in_shape[k], shape, sizeof(int64_t) * (size_t)ndim);
  ev->in_min[k] = ev->in_max[k] = NAN;
  ev->n_in++;
}

void kl_anomaly_record(keel_ctx *ctx, kl_node *node, int n, keel_tensor *const *in,
                       const keel_tensor *out) {
  keel_anomaly_event *ev;
  int bad_input = -1;
  tally s;
  node->an_unstamped = 1;
  for (int i = 0; i < n && i < 16; i++)
    if (!in[i]) node->an_absent |= (uint16_t)(1u << i);
  if (keeps_finite(node->op)) {
    int all = 1;
    for (int i = 0; i < n && all; i++)
      if (in[i] && is_float(in[i]) && !known_finite(in[i])) all = 0;
    if (all) {
      node->an_state = KL_AN_FINITE;
      return;
    }
    /* a view of something not known finite: unknown until needed */
    if (is_view_op(node->op)) return;
  }
  if (!has_nonfinite(out)) {
    node->an_state = KL_AN_FINITE;
    return;
  }
  node->an_state = KL_AN_NONFINITE;
  if (ctx->anomaly_pending) return;   /* the slot keeps the first event */
  /* The rare path. An input that a checked op found non-finite: that op
  ** was named, or had such an input itself; nothing more to say. */
  for (int i = 0; i < n; i++)
    if (in[i] && in[i]->grad_fn && in[i]->grad_fn->an_state == KL_AN_NONFINITE) return;
  /* An input not known finite (a parameter, data, a view of one, or an op
  ** from before detection began) that holds NaN/Inf: name that. */
  for (int i = 0; i < n; i++) {
    keel_tensor *t = in[i];
    if (!t || !is_float(t) || known_finite(t) || !has_nonfinite(t)) continue;
    if (t->grad_fn) t->grad_fn->an_state = KL_AN_NONFINITE;
    if (bad_input < 0) bad_input = i;
  }
  event_begin(ctx, 0, node->op);
  ev = &ctx->anomaly_event;
  ev->cause = bad_input >= 0 ? KEEL_ANOMALY_INPUT : KEEL_ANOMALY_OP;
  ev->input = bad_input;
  for (int i = 0; i < n; i++) {
    if (!in[i] || ev->n_in >= KEEL_ANOMALY_MAX_IN) continue;
    event_input(ev, i, in[i]->ndim, in[i]->shape);
    if (ev->has_stats) {
      tally ts = count_all(in[i]);
      ev->in_min[ev->n_in - 1] = ts.lo;
      ev->in_max[ev->n_in - 1] = ts.hi;
      ev->in_nonfinite[ev->n_in - 1] = ts.nan + ts.inf;
    }
  }
  s = count_all(out);
  ev->nan = s.nan;
  ev->inf = s.inf;
  ev->numel = out->numel;
  ctx->anomaly_pending = 1;
}

keel_status kl_anomaly_grad(keel_ctx *ctx, kl_node *n, const keel_tensor *g, int *g_state,
                            const keel_tensor *gi, int i, int reshaped, int *gi_state) {
  keel_anomaly_event *ev;
  tally s;
  *gi_state = KL_AN_UNKNOWN;
  if (!is_float(gi)) return KEEL_OK;
  if (*g_state == KL_AN_FINITE && !reshaped && backward_keeps_finite(n->op)) {
    *gi_state = KL_AN_FINITE;
    return KEEL_OK;
  }
  if (!has_nonfinite(gi)) {
    *gi_state = KL_AN_FINITE;
    return KEEL_OK;
  }
  *gi_state = KL_AN_NONFINITE;
  /* a node whose forward values were already non-finite: forward named it */
  if (ctx->anomaly_pending || n->an_state == KL_AN_NONFINITE) return KEEL_OK;
  /* the rare path: g is scanned even when said finite, so that a wrong
  ** guess could only hide an event, never blame the wrong op */
  if (*g_state == KL_AN_NONFINITE || has_nonfinite(g)) {
    *g_state = KL_AN_NONFINITE;
    return KEEL_OK;   /* came in that way */
  }
  event_begin(ctx, 1, n->op);
  ev = &ctx->anomaly_event;
  ev->cause = KEEL_ANOMALY_OP;
  ev->site = n->an_site;
  ev->input = i;
  for (int k = 0; k < n->n_in; k++) {
    if (k < 16 && (n->an_absent >> k & 1)) continue;
    event_input(ev, k, n->in[k].ndim, n->in[k].shape);
  }
  if (ev->has_stats) {
    tally gs = count_all(g);
    ev->grad_min = gs.lo;
    ev->grad_max = gs.hi;
  }
  s = count_all(gi);
  ev->nan = s.nan;
  ev->inf = s.inf;
  ev->numel = gi->numel;
  ctx->anomaly_pending = 1;
  if (ctx->anomaly == KEEL_ANOMALY_ERROR)
    return kl_error(ctx, KEEL_ERR_ARG,
                    "anomaly: backward: %s produced %lld Inf, %lld NaN in the gradient of its input %d "
                    "from a finite gradient", kl_ops[n->op].name, (long long)s.inf, (long long)s.nan,
                    i + ctx->index_base);
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** API
** ======================================================================= */

void keel_anomaly_set_mode(keel_ctx *ctx, keel_anomaly_mode mode, int full) {
  ctx->anomaly = (unsigned)mode <= KEEL_ANOMALY_RECORD ? (int)mode : KEEL_ANOMALY_ERROR;
  ctx->anomaly_full = full != 0;
}

keel_anomaly_mode keel_anomaly_get_mode(const keel_ctx *ctx) { return (keel_anomaly_mode)ctx->anomaly; }

int keel_anomaly_pending(const keel_ctx *ctx) { return ctx->anomaly_pending; }

int keel_anomaly_take(keel_ctx *ctx, keel_anomaly_event *ev) {
  if (!ctx->anomaly_pending) return 0;
  *ev = ctx->anomaly_event;
  ctx->anomaly_pending = 0;
  return 1;
}

int keel_anomaly_unstamped(const keel_tensor *t) { return t->grad_fn && t->grad_fn->an_unstamped; }

uint32_t keel_anomaly_site(const keel_tensor *t) { return t->grad_fn ? t->grad_fn->an_site : 0; }

/* Usually one node (the op just pushed); a host call that chains several
** ops leaves a few more behind it. Each node is stamped once. */
keel_status keel_anomaly_stamp(keel_ctx *ctx, keel_tensor *t, uint32_t site) {
  kl_node *local[32], **stack = local;
  int n = 0, cap = 32;
  keel_status st = KEEL_OK;
  if (!t->grad_fn || !t->grad_fn->an_unstamped) return KEEL_OK;
  t->grad_fn->an_unstamped = 0;
  stack[n++] = t->grad_fn;
  while (n) {
    kl_node *node = stack[--n];
    node->an_site = site;
    for (int i = 0; i < node->n_in; i++) {
      kl_node *c = node->in[i].fn;
      if (!c || !c->an_unstamped) continue;
      c->an_unstamped = 0;
      if (n == cap) {
        kl_node **bigger = (kl_node **)kl_malloc(ctx, sizeof *bigger * (size_t)cap * 2);
        if (!bigger) { st = kl_error(ctx, KEEL_ERR_NOMEM, "anomaly: out of memory"); goto out; }
        memcpy(bigger, stack, sizeof *stack * (size_t)n);
        if (stack != local) kl_free(ctx, stack, sizeof *stack * (size_t)cap);
        stack = bigger;
        cap *= 2;
      }
      stack[n++] = c;
    }
  }
out:
  if (stack != local) kl_free(ctx, stack, sizeof *stack * (size_t)cap);
  return st;
}

/* }====================================================================== */
