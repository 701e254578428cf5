/*
** optim.c: the optimizers (SGD, Adam, AdamW, RMSprop, Adagrad) as one
** multi-tensor object: parameter groups, per-parameter state, the clip
** chain and the non-finite policy, and the step.
**
** A step (keel_optim_step) is all or nothing, and comes in two halves.
** keel_optim_prepare collects the parameters that have a gradient (the
** gradients are retained until the step is applied or dropped), makes sure
** every state buffer they need exists (allocation is the only thing that
** can fail; a buffer is not visible until an update marks it valid), reads
** every gradient and its parameter once for statistics (clip.c), decides
** the non-finite policy, and lets the clip chain turn the statistics into
** a scale and bound per unit, keeping the chain's new adaptive state
** aside. Nothing visible has changed then: a caller (the Lua step, its
** hooks and guard) can look and decide. keel_optim_apply runs one update
** per parameter (the backend's optim_update, which clips each gradient
** element as it reads it and sums the squares of the changes it makes)
** and commits the counters, step counts and adaptive clip state; from its
** update pass on nothing can fail. keel_optim_cancel records the step as
** cancelled instead.
**
** Parameters may live on any device, one group mixing them: every pass
** runs per parameter on its own device's backend, and only host numbers
** (statistics, clip factors) meet. State lives with its parameter: made
** on its device, moved there at the next step when the parameter moved
** (model:to keeps the handle), loaded there by keel_optim_set_state.
**
** Loss scaling rides on the clip chain's per-unit scale: the statistics
** pass reports the gradient times the loss scale's inverse (clip.c), every
** unit's scale starts at that inverse, and the update pass applies it with
** the clip factors as it reads each element. An overflow (NaN/Inf in the
** unscaled gradient) is the scaler's to handle: a skip of its own kind.
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "keel_impl.h"
#include "keel_cuda.h"

#define MAX_STATE 3

typedef struct oparam {
  keel_tensor *p;               /* retained */
  int group;
  int64_t step;                 /* PyTorch's state["step"] */
  keel_tensor *state[MAX_STATE];
  unsigned valid;               /* bit k: state[k] holds data (else fresh or absent) */
  /* The parameter's sums of squares per unit (wsq_n units; 0: none) as its
  ** last update wrote them (the update pass sums them as it writes, so
  ** they may still be on their way from the device: upd_pending), and the
  ** storage generation and version that update left. While the parameter
  ** still has them, the next statistics pass takes these sums instead of
  ** reading the parameter a second time; any write in between (an
  ** in-place op, copy_, a new storage) bumps the version and they go. */
  double *wsq;
  int64_t wsq_cap, wsq_n;
  uint64_t wgen, wver;
} oparam;

struct keel_optim {
  keel_ctx *ctx;
  keel_optim_kind kind;
  oparam *params;
  int np, cap_p;
  keel_optim_hparams *groups;
  int ng, cap_g;
  kl_clip_chain *clip;
  keel_nonfinite nonfinite;
  keel_loss_scale ls;           /* enabled 0: none */
  int64_t step_count;
  keel_optim_counters counters;
  keel_grad_stats *last;        /* cap_p records */
  keel_update_stats *upd;       /* cap_p records */
  double lr_scale;
  kl_clip_work work;
  /* scratch of a step: active parameter indices, their gradients
  ** (contiguous: maybe copies; retained while m > 0), the parameters and
  ** their sums of squares when known (oparam.wsq, else NULL) */
  int *act;
  keel_tensor **ag, **ap;
  const double **wk;
  int cap_act;
  int m;
  /* the prepared step: what apply will do, and the report of prepare;
  ** stale: something it was decided under changed (apply refuses it,
  ** cancel still records it) */
  int prepared, stale;
  int decision;
  keel_step_report prep;
  /* upd's update_sumsq of device parameters is still on its way
  ** (KL_DEFER_LATER): resolve_updates waits for it */
  int upd_pending;
  /* Steps decided on the device (keel_optim_set_deferred_report): step_device
  ** queues the statistics, the decision and the updates and returns;
  ** resolve_step later runs the host's decision over the statistics that
  ** came back (the same as the device's, to the bit), commits the step
  ** counts and counters, and keeps the report. dneed and ddsq (cap_act
  ** each, like act) hold what it needs of each update until then. */
  int deferred;                 /* opted in */
  int dpend, dm;                /* a step awaits resolve_step; its active parameters */
  unsigned *dneed;              /* the state buffers each update made valid */
  double *ddsq;                 /* each update's sum of squared changes, as it arrives */
  double *dwk;                  /* the known sums of squares the statistics take (wk points here:
                                ** the step's own update overwrites oparam.wsq before they are read) */
  kc_decision dec;              /* what the device decided */
  keel_step_report last_rep;    /* the last step's report (keel_optim_last_report) */
};

/* What a prepared step does when applied. */
enum { DO_APPLY, DO_SKIP, DO_REFUSE, DO_NO_GRAD, DO_OVERFLOW };

static const char *kind_names[KEEL_OPTIM_KIND_COUNT] = {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad"};

/* The device's update sizes written into upd (one wait), before they are
** read or their memory moves; fn names the call that waits, whose error
** a late CUDA error becomes. */
static keel_status resolve_updates(keel_optim *o, const char *fn) {
  char name[64];
  if (!o->upd_pending) return KEEL_OK;
  o->upd_pending = 0;
  snprintf(name, sizeof name, "%s.%s", kind_names[o->kind], fn);
  return kl_cuda_results_wait(o->ctx, name);
}

static keel_status resolve_step(keel_optim *o, const char *fn);
static void settle(const keel_optim *o, const char *fn);

static const char *const sgd_state[] = {"momentum_buffer"};
static const char *const adam_state[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
static const char *const rmsprop_state[] = {"square_avg", "momentum_buffer", "grad_avg"};
static const char *const adagrad_state[] = {"sum"};

const char *keel_optim_kind_name(keel_optim_kind kind) {
  return (unsigned)kind < KEEL_OPTIM_KIND_COUNT ? kind_names[kind] : "unknown";
}

int keel_optim_state_names(keel_optim_kind kind, const char *const **names) {
  switch (kind) {
    case KEEL_OPTIM_SGD: *names = sgd_state; return 1;
    case KEEL_OPTIM_ADAM: case KEEL_OPTIM_ADAMW: *names = adam_state; return 3;
    case KEEL_OPTIM_RMSPROP: *names = rmsprop_state; return 3;
    case KEEL_OPTIM_ADAGRAD: *names = adagrad_state; return 1;
    default: *names = NULL; return 0;
  }
}

void keel_optim_hparams_default(keel_optim_kind kind, keel_optim_hparams *h) {
  memset(h, 0, sizeof *h);
  switch (kind) {
    case KEEL_OPTIM_SGD: h->lr = 0.01; break;
    case KEEL_OPTIM_ADAM: case KEEL_OPTIM_ADAMW:
      h->lr = 1e-3; h->beta1 = 0.9; h->beta2 = 0.999; h->eps = 1e-8;
      h->weight_decay = kind == KEEL_OPTIM_ADAMW ? 1e-2 : 0;
      break;
    case KEEL_OPTIM_RMSPROP: h->lr = 1e-2; h->alpha = 0.99; h->eps = 1e-8; break;
    case KEEL_OPTIM_ADAGRAD: h->lr = 1e-2; h->eps = 1e-10; break;
    default: break;
  }
}

/* {======================================================================
** Creation, groups and hyper-parameters
** ======================================================================= */

keel_status keel_optim_new(keel_ctx *ctx, keel_optim_kind kind, keel_optim **out) {
  keel_optim *o;
  *out = NULL;
  if ((unsigned)kind >= KEEL_OPTIM_KIND_COUNT)
    return kl_error(ctx, KEEL_ERR_ARG, "optim: unknown optimizer kind %d", (int)kind);
  o = (keel_optim *)kl_malloc(ctx, sizeof *o);
  if (!o) return kl_error(ctx, KEEL_ERR_NOMEM, "optim: out of memory");
  memset(o, 0, sizeof *o);
  o->ctx = ctx;
  o->kind = kind;
  o->nonfinite = KEEL_NONFINITE_ERROR;
  o->ls.inv_scale = 1;
  o->lr_scale = 1;
  kl_ctx_ref(ctx);
  *out = o;
  return KEEL_OK;
}

static void scratch_free(keel_optim *o) {
  keel_ctx *ctx = o->ctx;
  kl_free(ctx, o->act, sizeof(int) * (size_t)o->cap_act);
  kl_free(ctx, o->ag, sizeof(keel_tensor *) * (size_t)o->cap_act);
  kl_free(ctx, o->ap, sizeof(keel_tensor *) * (size_t)o->cap_act);
  kl_free(ctx, o->wk, sizeof(double *) * (size_t)o->cap_act);
  kl_free(ctx, o->dneed, sizeof(unsigned) * (size_t)o->cap_act);
  kl_free(ctx, o->ddsq, sizeof(double) * (size_t)o->cap_act);
  kl_free(ctx, o->dwk, sizeof(double) * (size_t)o->cap_act);
  o->act = NULL; o->ag = o->ap = NULL; o->wk = NULL; o->dneed = NULL; o->ddsq = o->dwk = NULL; o->cap_act = 0;
}

void keel_optim_free(keel_optim *o) {
  keel_ctx *ctx;
  if (!o) return;
  ctx = o->ctx;
  keel_optim_discard(o);
  (void)resolve_step(o, "free");
  (void)resolve_updates(o, "free");   /* the plugin writes into upd: not after it is gone */
  for (int i = 0; i < o->np; i++) {
    keel_tensor_release(o->params[i].p);
    for (int k = 0; k < MAX_STATE; k++) keel_tensor_release(o->params[i].state[k]);
    kl_free(ctx, o->params[i].wsq, sizeof(double) * (size_t)o->params[i].wsq_cap);
  }
  kl_free(ctx, o->params, sizeof(oparam) * (size_t)o->cap_p);
  kl_free(ctx, o->last, sizeof(keel_grad_stats) * (size_t)o->cap_p);
  kl_free(ctx, o->upd, sizeof(keel_update_stats) * (size_t)o->cap_p);
  kl_free(ctx, o->groups, sizeof(keel_optim_hparams) * (size_t)o->cap_g);
  kl_clip_chain_free(o->clip);
  kl_clip_work_free(ctx, &o->work);
  scratch_free(o);
  kl_free(ctx, o, sizeof *o);
  kl_ctx_unref(ctx);
}

#define NEED(cond, what) \
  if (!(cond)) return kl_error(ctx, KEEL_ERR_ARG, "%s: group %d: %s", kind_names[kind], gi, what)
#define NEED_GE0(x, name) \
  if (!((x) >= 0)) return kl_error(ctx, KEEL_ERR_ARG, "%s: group %d: %s must be >= 0, got %g", \
                                   kind_names[kind], gi, name, (x))

/* PyTorch's checks, with its messages' content. gi is for messages. */
static keel_status check_hparams(keel_ctx *ctx, keel_optim_kind kind, int gi, const keel_optim_hparams *h) {
  NEED_GE0(h->lr, "lr");
  NEED_GE0(h->weight_decay, "weight_decay");
  switch (kind) {
    case KEEL_OPTIM_SGD:
      NEED_GE0(h->momentum, "momentum");
      NEED(h->dampening == h->dampening, "dampening is NaN");
      NEED(!h->nesterov || (h->momentum > 0 && h->dampening == 0),
           "nesterov momentum requires a momentum and zero dampening");
      break;
    case KEEL_OPTIM_ADAM: case KEEL_OPTIM_ADAMW:
      NEED_GE0(h->eps, "eps");
      if (!(h->beta1 >= 0 && h->beta1 < 1) || !(h->beta2 >= 0 && h->beta2 < 1))
        return kl_error(ctx, KEEL_ERR_ARG, "%s: group %d: betas must be in [0, 1), got (%g, %g)", kind_names[kind],
                        gi, h->beta1, h->beta2);
      break;
    case KEEL_OPTIM_RMSPROP:
      NEED_GE0(h->eps, "eps");
      NEED_GE0(h->momentum, "momentum");
      NEED_GE0(h->alpha, "alpha");
      break;
    default:
      NEED_GE0(h->eps, "eps");
      NEED_GE0(h->lr_decay, "lr_decay");
      NEED_GE0(h->initial_accumulator_value, "initial_accumulator_value");
      break;
  }
  return KEEL_OK;
}

static int cmp_ptr(const void *a, const void *b) {
  uintptr_t x = (uintptr_t)*(void *const *)a, y = (uintptr_t)*(void *const *)b;
  return (x > y) - (x < y);
}

/* The elements [lo, hi) of its storage a tensor spans (strides >= 0). */
static void span_of(const keel_tensor *t, int64_t *lo, int64_t *hi) {
  int64_t last = t->offset;
  for (int d = 0; d < t->ndim; d++) last += (t->shape[d] - 1) * t->stride[d];
  *lo = t->offset;
  *hi = t->numel ? last + 1 : t->offset;
}

/* By storage, then by first element. */
static int cmp_span(const void *a, const void *b) {
  const keel_tensor *x = *(keel_tensor *const *)a, *y = *(keel_tensor *const *)b;
  uintptr_t sx = (uintptr_t)x->storage, sy = (uintptr_t)y->storage;
  if (sx != sy) return (sx > sy) - (sx < sy);
  return (x->offset > y->offset) - (x->offset < y->offset);
}

/* PyTorch's "some parameters appear in more than one parameter group",
** and also two parameters that are views of the same memory: each would
** get its own update of the shared elements (twice on the CPU, in a race
** inside one multi-tensor launch on CUDA), which is never what is meant. */
static keel_status check_unique(keel_optim *o, int n, keel_tensor *const *params) {
  keel_ctx *ctx = o->ctx;
  int total = o->np + n, dup = 0, overlap = 0;
  size_t bytes = sizeof(keel_tensor *) * (size_t)(total ? total : 1);
  keel_tensor **all = (keel_tensor **)kl_malloc(ctx, bytes);
  if (!all) return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", kind_names[o->kind]);
  for (int i = 0; i < o->np; i++) all[i] = o->params[i].p;
  for (int i = 0; i < n; i++) all[o->np + i] = params[i];
  qsort(all, (size_t)total, sizeof *all, cmp_ptr);
  for (int i = 1; i < total && !dup; i++) dup = all[i] == all[i - 1];
  if (!dup) {
    int64_t end = 0;
    const kl_storage *prev = NULL;
    qsort(all, (size_t)total, sizeof *all, cmp_span);
    for (int i = 0; i < total && !overlap; i++) {
      int64_t lo, hi;
      span_of(all[i], &lo, &hi);
      if (lo == hi) continue;
      overlap = all[i]->storage == prev && lo < end;
      if (all[i]->storage != prev || hi > end) end = hi;
      prev = all[i]->storage;
    }
  }
  kl_free(ctx, all, bytes);
  if (dup)
    return kl_error(ctx, KEEL_ERR_ARG, "%s: some parameters appear more than once (in one group or in several)",
                    kind_names[o->kind]);
  if (overlap)
    return kl_error(ctx, KEEL_ERR_ARG,
                    "%s: two parameters are views of the same memory (each would get its own update of it); "
                    "pass the tensor they view instead", kind_names[o->kind]);
  return KEEL_OK;
}

static keel_status new_state(keel_optim *o, oparam *op, int k, double fill) {
  keel_status st = kl_new_like(o->ctx, op->p, op->p->dtype, &op->state[k]);
  if (!st) st = kl_backend_for(o->ctx, op->p->storage->device)->fill(o->ctx, op->state[k], fill);
  if (st) kl_release(&op->state[k]);
  return st;
}

keel_status keel_optim_add_group(keel_optim *o, int n, keel_tensor *const *params, const keel_optim_hparams *h,
                                 int *group) {
  keel_ctx *ctx = o->ctx;
  const char *kn = kind_names[o->kind];
  keel_status st;
  int gi = o->ng + ctx->index_base;
  if (n < 0 || (n > 0 && !params)) return kl_error(ctx, KEEL_ERR_ARG, "%s: bad parameter list", kn);
  if ((st = check_hparams(ctx, o->kind, gi, h))) return st;
  for (int i = 0; i < n; i++) {
    keel_tensor *p = params[i];
    int pi = i + ctx->index_base;
    if (!p) return kl_error(ctx, KEEL_ERR_ARG, "%s: group %d: parameter %d is NULL", kn, gi, pi);
    if ((st = kl_check_same_ctx(ctx, kn, p))) return st;
    if (p->dtype != KEEL_F32 && p->dtype != KEEL_F64)
      return kl_error(ctx, KEEL_ERR_TYPE, "%s: group %d: parameter %d is %s, expected float32 or float64", kn, gi,
                      pi, keel_dtype_name(p->dtype));
    if (p->grad_fn)
      return kl_error(ctx, KEEL_ERR_ARG, "%s: group %d: parameter %d is not a leaf tensor (can't optimize it)", kn,
                      gi, pi);
    if (!kl_is_contiguous(p))
      return kl_error(ctx, KEEL_ERR_ARG, "%s: group %d: parameter %d is not contiguous", kn, gi, pi);
    /* any device, and a group may mix them: every update is per parameter,
    ** on its device's backend, and only host numbers cross devices */
  }
  if ((st = check_unique(o, n, params))) return st;
  if ((st = resolve_step(o, "add_param_group"))) return st;
  if ((st = resolve_updates(o, "add_param_group"))) return st;   /* upd may move */
  /* room for the group and its parameters */
  if (o->ng == o->cap_g) {
    int cap = o->cap_g ? 2 * o->cap_g : 4;
    keel_optim_hparams *g = (keel_optim_hparams *)kl_malloc(ctx, sizeof *g * (size_t)cap);
    if (!g) return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", kn);
    if (o->ng) memcpy(g, o->groups, sizeof *g * (size_t)o->ng);
    kl_free(ctx, o->groups, sizeof *g * (size_t)o->cap_g);
    o->groups = g;
    o->cap_g = cap;
  }
  if (o->np + n > o->cap_p) {
    int cap = o->np + n > 2 * o->cap_p ? o->np + n : 2 * o->cap_p;
    oparam *p = (oparam *)kl_malloc(ctx, sizeof *p * (size_t)cap);
    keel_grad_stats *last = (keel_grad_stats *)kl_malloc(ctx, sizeof *last * (size_t)cap);
    keel_update_stats *upd = (keel_update_stats *)kl_malloc(ctx, sizeof *upd * (size_t)cap);
    if (!p || !last || !upd) {
      kl_free(ctx, p, sizeof *p * (size_t)cap);
      kl_free(ctx, last, sizeof *last * (size_t)cap);
      kl_free(ctx, upd, sizeof *upd * (size_t)cap);
      return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", kn);
    }
    if (o->np) {
      memcpy(p, o->params, sizeof *p * (size_t)o->np);
      memcpy(last, o->last, sizeof *last * (size_t)o->np);
      memcpy(upd, o->upd, sizeof *upd * (size_t)o->np);
    }
    kl_free(ctx, o->params, sizeof *p * (size_t)o->cap_p);
    kl_free(ctx, o->last, sizeof *last * (size_t)o->cap_p);
    kl_free(ctx, o->upd, sizeof *upd * (size_t)o->cap_p);
    o->params = p;
    o->last = last;
    o->upd = upd;
    o->cap_p = cap;
  }
  for (int i = 0; i < n; i++) {
    oparam *op = &o->params[o->np + i];
    memset(op, 0, sizeof *op);
    op->p = params[i];
    op->group = o->ng;
    memset(&o->last[o->np + i], 0, sizeof o->last[0]);
    memset(&o->upd[o->np + i], 0, sizeof o->upd[0]);
    /* Adagrad's state exists from the start, as PyTorch's */
    if (o->kind == KEEL_OPTIM_ADAGRAD) {
      if ((st = new_state(o, op, 0, h->initial_accumulator_value))) {
        for (int j = 0; j < i; j++) kl_release(&o->params[o->np + j].state[0]);
        return st;
      }
      op->valid = 1;
    }
  }
  o->stale = 1;   /* a prepared step knows the parameters of its time only */
  for (int i = 0; i < n; i++) keel_tensor_retain(params[i]);
  o->np += n;
  o->groups[o->ng] = *h;
  if (group) *group = o->ng;
  o->ng++;
  return KEEL_OK;
}

int keel_optim_group_count(const keel_optim *o) { return o->ng; }
keel_optim_kind keel_optim_get_kind(const keel_optim *o) { return o->kind; }

static keel_status check_group(const keel_optim *o, int group) {
  if (group < 0 || group >= o->ng)
    return kl_error(o->ctx, KEEL_ERR_INDEX, "%s: no parameter group %d (there are %d)", kind_names[o->kind],
                    group + o->ctx->index_base, o->ng);
  return KEEL_OK;
}

keel_status keel_optim_set_hparams(keel_optim *o, int group, const keel_optim_hparams *h) {
  keel_status st;
  if ((st = check_group(o, group))) return st;
  if ((st = check_hparams(o->ctx, o->kind, group + o->ctx->index_base, h))) return st;
  o->groups[group] = *h;
  return KEEL_OK;
}

keel_status keel_optim_get_hparams(const keel_optim *o, int group, keel_optim_hparams *h) {
  keel_status st;
  if ((st = check_group(o, group))) return st;
  *h = o->groups[group];
  return KEEL_OK;
}

keel_status keel_optim_set_lr(keel_optim *o, int group, double lr) {
  keel_optim_hparams h;
  keel_status st;
  if ((st = check_group(o, group))) return st;
  h = o->groups[group];
  h.lr = lr;
  return keel_optim_set_hparams(o, group, &h);
}

keel_status keel_optim_set_clip(keel_optim *o, int n, const keel_clip_spec *specs) {
  kl_clip_chain *c = NULL;
  keel_status st;
  if ((st = resolve_step(o, "set_clip"))) return st;   /* it is judged under the chain it ran with */
  if (n > 0 && (st = kl_clip_chain_new(o->ctx, n, specs, &c))) return st;
  o->stale = 1;   /* a prepared step's clip decisions belong to the old chain */
  kl_clip_chain_free(o->clip);
  o->clip = c;
  return KEEL_OK;
}

keel_status keel_optim_set_clip_threshold(keel_optim *o, int i, double threshold) {
  keel_status st = resolve_step(o, "set_clip_threshold");
  return st ? st : kl_clip_chain_threshold(o->ctx, o->clip, i, threshold);
}

keel_status keel_optim_set_nonfinite(keel_optim *o, keel_nonfinite policy) {
  keel_status st;
  if ((st = resolve_step(o, "set_nonfinite"))) return st;
  if ((unsigned)policy > KEEL_NONFINITE_KEEP)
    return kl_error(o->ctx, KEEL_ERR_ARG, "%s: unknown non-finite policy %d", kind_names[o->kind], (int)policy);
  o->nonfinite = policy;
  return KEEL_OK;
}

keel_status keel_optim_set_loss_scale(keel_optim *o, const keel_loss_scale *ls) {
  keel_status st;
  if ((st = resolve_step(o, "set_loss_scale"))) return st;
  if (!ls || !ls->enabled) {
    memset(&o->ls, 0, sizeof o->ls);
    o->ls.inv_scale = 1;
    return KEEL_OK;
  }
  if (!(ls->inv_scale > 0))
    return kl_error(o->ctx, KEEL_ERR_ARG, "%s: the loss scale's inverse must be > 0, got %g", kind_names[o->kind],
                    ls->inv_scale);
  o->ls.enabled = 1;
  o->ls.inv_scale = ls->inv_scale;
  o->ls.found_inf = ls->found_inf != 0;
  return KEEL_OK;
}

void keel_optim_get_loss_scale(const keel_optim *o, keel_loss_scale *ls) { *ls = o->ls; }

/* x rounded to float; beyond its range +-inf (a plain cast is undefined there). */
static float to_f32(double x) {
  if (x >= 0x1.ffffffp+127) return INFINITY;
  if (x <= -0x1.ffffffp+127) return -INFINITY;
  return (float)x;
}

/* As torch's _amp_update_scale_ kernels: the scale lives in a float, the
** factors are doubles, the product is rounded to float when stored. */
void keel_loss_scale_update(double *scale, int64_t *growth_tracker, int found_inf, double growth_factor,
                            double backoff_factor, int64_t growth_interval) {
  float s = to_f32(*scale);
  if (found_inf) {
    s = to_f32((double)s * backoff_factor);
    *growth_tracker = 0;
  } else {
    int64_t successful = *growth_tracker + 1;
    if (successful == growth_interval) {
      float ns = to_f32((double)s * growth_factor);
      if (isfinite(ns)) s = ns;
      *growth_tracker = 0;
    } else {
      *growth_tracker = successful;
    }
  }
  *scale = (double)s;
}

/* }====================================================================== */

/* {======================================================================
** The step
** ======================================================================= */

/* Which state buffers a parameter needs under h: bit k for state[k]. */
static unsigned needed_state(keel_optim_kind kind, const keel_optim_hparams *h) {
  switch (kind) {
    case KEEL_OPTIM_SGD: return h->momentum != 0 ? 1u : 0u;
    case KEEL_OPTIM_ADAM: case KEEL_OPTIM_ADAMW: return h->amsgrad ? 7u : 3u;
    case KEEL_OPTIM_RMSPROP: return 1u | (h->momentum > 0 ? 2u : 0u) | (h->centered ? 4u : 0u);
    default: return 1u;
  }
}

static keel_status scratch_reserve(keel_optim *o, int n) {
  keel_ctx *ctx = o->ctx;
  int *act;
  keel_tensor **ag, **ap;
  const double **wk;
  unsigned *dneed;
  double *ddsq, *dwk;
  if (n <= o->cap_act) return KEEL_OK;
  act = (int *)kl_malloc(ctx, sizeof(int) * (size_t)n);
  ag = (keel_tensor **)kl_malloc(ctx, sizeof(keel_tensor *) * (size_t)n);
  ap = (keel_tensor **)kl_malloc(ctx, sizeof(keel_tensor *) * (size_t)n);
  wk = (const double **)kl_malloc(ctx, sizeof(double *) * (size_t)n);
  dneed = (unsigned *)kl_malloc(ctx, sizeof(unsigned) * (size_t)n);
  ddsq = (double *)kl_malloc(ctx, sizeof(double) * (size_t)n);
  dwk = (double *)kl_malloc(ctx, sizeof(double) * (size_t)n);
  if (!act || !ag || !ap || !wk || !dneed || !ddsq || !dwk) {
    kl_free(ctx, dneed, sizeof(unsigned) * (size_t)n);
    kl_free(ctx, ddsq, sizeof(double) * (size_t)n);
    kl_free(ctx, dwk, sizeof(double) * (size_t)n);
    kl_free(ctx, act, sizeof(int) * (size_t)n);
    kl_free(ctx, ag, sizeof(keel_tensor *) * (size_t)n);
    kl_free(ctx, ap, sizeof(keel_tensor *) * (size_t)n);
    kl_free(ctx, wk, sizeof(double *) * (size_t)n);
    return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", kind_names[o->kind]);
  }
  scratch_free(o);
  o->act = act; o->ag = ag; o->ap = ap; o->wk = wk; o->dneed = dneed; o->ddsq = ddsq; o->dwk = dwk;
  o->cap_act = n;
  return KEEL_OK;
}

/* The message of the error policy: counts, and the first culprit. */
static keel_status nonfinite_error(keel_optim *o, int m) {
  keel_ctx *ctx = o->ctx;
  const kl_clip_work *w = &o->work;
  int nbad = 0, first = -1;
  char shape[128];
  for (int k = 0; k < m; k++)
    if (w->ts[k].nan + w->ts[k].inf) { nbad++; if (first < 0) first = k; }
  {
    const oparam *op = &o->params[o->act[first]];
    const keel_grad_stats *s = &w->ts[first];
    kl_shape_str(shape, sizeof shape, op->p->ndim, op->p->shape);
    return kl_error(ctx, KEEL_ERR_ARG,
                    "%s.step: non-finite gradient in %d parameter%s; first: parameter %d (group %d, shape %s) has "
                    "%lld NaN and %lld Inf of %lld elements; nothing was updated (nonfinite = \"error\"; "
                    "\"skip\", \"zero\" or \"keep\" go on)",
                    kind_names[o->kind], nbad, nbad == 1 ? "" : "s", o->act[first] + ctx->index_base,
                    op->group + ctx->index_base, shape, (long long)s->nan, (long long)s->inf,
                    (long long)s->numel);
  }
}

static void release_grads(keel_optim *o) {
  for (int k = 0; k < o->m; k++) keel_tensor_release(o->ag[k]);
  o->m = 0;
}

void keel_optim_discard(keel_optim *o) {
  release_grads(o);
  kl_clip_discard(o->clip);
  o->prepared = 0;
  o->stale = 0;
}

/* State follows its parameter: a buffer made while the parameter was on
** another device (the model moved after some steps: keel_tensor_set_data
** keeps the handle the optimizer holds) is copied to the parameter's
** device. The values are the same; only where they live changes. */
static keel_status follow_param(keel_optim *o, oparam *op) {
  keel_status st;
  for (int j = 0; j < MAX_STATE; j++) {
    keel_tensor *t = op->state[j], *moved;
    if (!t || t->storage->device == op->p->storage->device) continue;
    if ((st = kl_transfer(o->ctx, t, op->p->storage->device, op->p->dtype, &moved))) return st;
    keel_tensor_release(t);
    op->state[j] = moved;
  }
  return KEEL_OK;
}

/* Every state buffer the active parameters need under the current
** hyper-parameters exists on the parameter's device (zeros, not yet
** valid): allocation is the only step of an update that can fail, so it
** happens first. */
static keel_status ensure_state(keel_optim *o) {
  keel_status st;
  for (int k = 0; k < o->m; k++) {
    oparam *op = &o->params[o->act[k]];
    unsigned need = needed_state(o->kind, &o->groups[op->group]);
    if ((st = follow_param(o, op))) return st;
    for (int j = 0; j < MAX_STATE; j++)
      if ((need >> j & 1u) && !op->state[j] && (st = new_state(o, op, j, 0))) return st;
  }
  return KEEL_OK;
}

/* Room in every active parameter's oparam.wsq for its units of this step
** (one each when one, else as the work's units; before the update pass,
** which cannot fail). An array the device may still write into is not
** moved before that is done. */
static keel_status wsq_reserve(keel_optim *o, int one) {
  keel_ctx *ctx = o->ctx;
  const kl_clip_work *w = &o->work;
  keel_status st;
  for (int k = 0; k < o->m; k++) {
    oparam *op = &o->params[o->act[k]];
    int64_t n = one ? 1 : w->u0[k + 1] - w->u0[k];
    double *q;
    if (n <= op->wsq_cap) continue;
    if ((st = resolve_updates(o, "step"))) return st;
    if (!(q = (double *)kl_malloc(ctx, sizeof(double) * (size_t)n)))
      return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", kind_names[o->kind]);
    kl_free(ctx, op->wsq, sizeof(double) * (size_t)op->wsq_cap);
    op->wsq = q;
    op->wsq_cap = n;
    op->wsq_n = 0;
  }
  return KEEL_OK;
}

/* The sums of squares of parameter op as its last update left them, when
** nothing has written to it since and the units are n: else NULL. */
static const double *wsq_known(const oparam *op, int64_t n) {
  const kl_storage *s = op->p->storage;
  if (op->wsq_n != n || op->wgen != s->gen || op->wver != s->version) return NULL;
  return op->wsq;
}

/* The parameters that take part (a gradient and requires_grad) into act,
** their gradients made contiguous (retained) into ag, the parameters into
** ap; o->m of them. */
static keel_status collect(keel_optim *o) {
  keel_ctx *ctx = o->ctx;
  const char *kn = kind_names[o->kind];
  keel_status st;
  if ((st = scratch_reserve(o, o->np))) return st;
  for (int i = 0; i < o->np; i++) {
    oparam *op = &o->params[i];
    keel_tensor *g = op->p->grad;
    if (!op->p->requires_grad || !g) continue;
    if (g->dtype != op->p->dtype || g->ndim != op->p->ndim ||
        memcmp(g->shape, op->p->shape, sizeof(int64_t) * (size_t)g->ndim))
      return kl_error(ctx, KEEL_ERR_SHAPE, "%s.step: gradient of parameter %d does not match it in shape or dtype",
                      kn, i + ctx->index_base);
    if (g->storage->device != op->p->storage->device)
      return kl_error(ctx, KEEL_ERR_DEVICE, "%s.step: gradient of parameter %d is on another device", kn,
                      i + ctx->index_base);
    if (!kl_is_contiguous(g)) {
      keel_tensor *c;
      if ((st = keel_contiguous(ctx, g, &c))) return st;
      g = c;
    } else {
      keel_tensor_retain(g);
    }
    o->act[o->m] = i;
    o->ag[o->m] = g;
    o->ap[o->m] = op->p;
    o->m++;
  }
  return KEEL_OK;
}

/* The host's decision over the statistics of the m active parameters (in
** o->work, totalled): the report's measures, the non-finite policy and
** the loss scaler's overflow, then the clip chain (g: the gradients, for
** a second statistics pass; NULL where the chain needs none). Sets
** o->decision. */
static keel_status judge(keel_optim *o, int m, keel_tensor *const *g, keel_step_report *rep) {
  kl_clip_work *w = &o->work;
  double total = 0, top = 0;
  keel_status st;
  for (int i = 0; i < o->np; i++) memset(&o->last[i], 0, sizeof o->last[i]);
  for (int k = 0; k < m; k++) {
    o->last[o->act[k]] = w->ts[k];
    total += w->ts[k].sumsq;
    if (w->ts[k].sumsq > top) { top = w->ts[k].sumsq; rep->top_param = o->act[k]; }
  }
  /* an overflowed total leaves the overflowed parameter on top, with all of it */
  rep->top_share = !(total > 0) ? 0 : isinf(total) ? (isinf(top) ? 1 : 0) : top / total;
  if (!(total > 0)) rep->top_param = -1;
  rep->grad_norm = w->grad_norm;
  rep->nonfinite = w->nonfinite;
  rep->n_updated = m;
  if (w->nonfinite &&
      (o->ls.enabled || o->nonfinite == KEEL_NONFINITE_ERROR || o->nonfinite == KEEL_NONFINITE_SKIP)) {
    int64_t nan = 0;
    for (int k = 0; k < m; k++) nan += w->ts[k].nan;
    rep->grad_norm = nan ? NAN : INFINITY;   /* as torch's total norm */
  }
  if (o->ls.enabled && (w->nonfinite || o->ls.found_inf)) {
    rep->reason = "overflow";   /* the loss scaler's skip, whatever the policy */
    o->decision = DO_OVERFLOW;
    return KEEL_OK;
  }
  if (w->nonfinite && (o->nonfinite == KEEL_NONFINITE_ERROR || o->nonfinite == KEEL_NONFINITE_SKIP)) {
    rep->reason = "nonfinite";
    o->decision = o->nonfinite == KEEL_NONFINITE_ERROR ? DO_REFUSE : DO_SKIP;
    return KEEL_OK;
  }
  if ((st = kl_clip_eval(o->ctx, o->clip, w, g))) return st;
  o->decision = DO_APPLY;
  rep->clip_coef = w->coef;
  rep->clipped = w->clipped;
  return KEEL_OK;
}

static void report_init(const keel_optim *o, keel_step_report *rep) {
  memset(rep, 0, sizeof *rep);
  rep->clip_coef = 1;
  rep->step = o->step_count;
  rep->top_param = -1;
}

/* The update of active parameter k (its group's hyper-parameters at the
** step's lr scale, the state buffers they need, non-finite policy nf) on
** its device's backend, over nu units with factors a and v (NULL: none);
** the change's sum of squares to *usq, the new parameter's per unit to
** oparam.wsq, which then stand for what this update leaves. *need gets
** the state buffers it makes valid (commit_param). Both paths of the
** step, the host-decided and the device-decided, update through here. */
static keel_status update_param(keel_optim *o, int k, int64_t nu, const double *a, const double *v,
                                keel_nonfinite nf, double *usq, unsigned *need) {
  oparam *op = &o->params[o->act[k]];
  keel_optim_hparams h = o->groups[op->group];
  keel_tensor *state[MAX_STATE] = {NULL, NULL, NULL};
  keel_status st;
  *need = needed_state(o->kind, &h);
  h.lr *= o->lr_scale;
  for (int j = 0; j < MAX_STATE; j++)
    if (*need >> j & 1u) state[j] = op->state[j];
  op->wsq_n = 0;
  st = kl_backend_for(o->ctx, op->p->storage->device)
           ->optim_update(o->ctx, o->kind, &h, op->step + 1, op->p, o->ag[k], state, (~op->valid) & *need, nu, a,
                          v, nf, usq, op->wsq);
  if (st) return st;
  /* the sums are of what the update left (it bumped the version) */
  op->wsq_n = nu;
  op->wgen = op->p->storage->gen;
  op->wver = op->p->storage->version;
  return KEEL_OK;
}

/* Active parameter k's part of an applied step: its step count, the state
** its update made valid, its update record (the update's own size is
** written there by the update, or by the caller). */
static void commit_param(keel_optim *o, int k, unsigned need) {
  oparam *op = &o->params[o->act[k]];
  keel_update_stats *us = &o->upd[o->act[k]];
  op->step++;
  op->valid |= need;
  us->step = o->step_count + 1;
  us->w_sumsq = o->work.ts[k].w_sumsq;
}

static void count_nonfinite(keel_optim *o);

/* An applied step's bookkeeping: the clip chain's adaptive state, the step
** count and the counters (the caller has made the updates). */
static void commit_applied(keel_optim *o, keel_step_report *rep) {
  kl_clip_commit(o->clip);
  o->step_count++;
  o->counters.steps++;
  if (o->work.clipped) o->counters.clipped++;
  rep->applied = 1;
  rep->step = o->step_count;
}

/* The pending device-decided step made final: its results are in (they
** normally are by now: the next step, or a read, comes long after; if not,
** this waits), the host decides over its statistics as prepare would,
** and the step counts, counters and update records become what the
** device did. fn names the call that resolves, whose error a late CUDA
** error becomes. */
static keel_status resolve_step(keel_optim *o, const char *fn) {
  keel_ctx *ctx = o->ctx;
  kl_clip_work *w = &o->work;
  keel_step_report rep;
  keel_status st;
  char name[64];
  int ready, m = o->dm;
  if (!o->dpend) return KEEL_OK;
  o->dpend = 0;
  snprintf(name, sizeof name, "%s.%s", kind_names[o->kind], fn);
  st = kl_cuda_results_ready(ctx, name, &ready);
  if (!st && !ready) st = kl_cuda_results_wait(ctx, name);
  o->upd_pending = 0;
  report_init(o, &rep);
  if (!st) {
    kl_clip_stats_end(w, o->wk);
    st = judge(o, m, NULL, &rep);
  }
  if (!st && (o->decision == DO_SKIP) != (o->dec.skip != 0))
    st = kl_error(ctx, KEEL_ERR_STATE, "%s: the device and the host decided the step differently", name);
  if (st) {
    /* what the device did is unknown: no sums of squares to trust */
    for (int k = 0; k < m; k++) o->params[o->act[k]].wsq_n = 0;
    rep.reason = "error";
    rep.n_updated = 0;
    o->last_rep = rep;
    return st;
  }
  o->prep = rep;
  if (o->dec.skip != 0) {
    count_nonfinite(o);
    o->counters.skipped++;
    rep.n_updated = 0;
    for (int k = 0; k < m; k++) o->params[o->act[k]].wsq_n = 0;   /* the kernels wrote 0 */
  } else {
    for (int k = 0; k < m; k++) {
      commit_param(o, k, o->dneed[k]);
      o->upd[o->act[k]].update_sumsq = o->ddsq[k];
    }
    count_nonfinite(o);
    commit_applied(o, &rep);
  }
  o->last_rep = rep;
  return KEEL_OK;
}

/* For the getters that take a const optimizer: a pending report is a
** value not yet read, not a change of the optimizer (its error is the
** context's, and the report's). */
static void settle(const keel_optim *o, const char *fn) {
  if (o->dpend) (void)resolve_step((keel_optim *)o, fn);
}

/* Whether the step can be decided on the device (see keel.h's
** keel_optim_set_deferred_report): q gets the chain. Looks only at
** the parameters' devices, not their gradients' contents. */
static int device_decidable(const keel_optim *o, kc_decide *q) {
  int any = 0;
  if (!o->deferred || o->ls.enabled || o->nonfinite == KEEL_NONFINITE_ERROR) return 0;
  if (!kl_cuda_can_decide(o->ctx) || !kl_clip_device_chain(o->clip, q)) return 0;
  for (int i = 0; i < o->np; i++) {
    const keel_tensor *p = o->params[i].p;
    if (!p->requires_grad || !p->grad) continue;
    if (p->storage->device != KEEL_CUDA || p->grad->storage->device != KEEL_CUDA) return 0;
    any |= p->numel > 0;
  }
  q->skip_nonfinite = o->nonfinite == KEEL_NONFINITE_SKIP;
  return any;
}

/* The whole step on the device, nothing waited for: statistics, the
** decision (clip factors, skip) and the updates in one batch. The update
** constants take the step counts as if applied; resolve_step commits
** them, or not when the device skipped (before the next step's updates
** read them). Empty parameters have no device work (the plugin skips them
** in both passes alike). */
static keel_status step_device(keel_optim *o, kc_decide *q, keel_step_report *r) {
  keel_ctx *ctx = o->ctx;
  const char *kn = kind_names[o->kind];
  kl_clip_work *w = &o->work;
  keel_status st, st2;
  int64_t n = 0;
  /* the known sums are the last update's: on the host once it is resolved */
  if ((st = resolve_updates(o, "step"))) return st;
  for (int k = 0; k < o->m; k++) {
    const double *known = wsq_known(&o->params[o->act[k]], 1);
    o->wk[k] = NULL;
    if (known) {
      o->dwk[k] = known[0];
      o->wk[k] = &o->dwk[k];
    }
    n += o->ap[k]->numel > 0;
  }
  q->ntensors = n;
  if ((st = ensure_state(o)) || (st = wsq_reserve(o, 1))) return st;   /* before the batch: these may wait */
  if ((st = kl_cuda_defer(ctx, kn, KL_DEFER_ON))) return st;
  st = kl_clip_stats_begin(ctx, o->clip, w, o->m, o->ag, o->ap, o->wk, 1);
  if (!st) st = kl_cuda_decide(ctx, kn, q, &o->dec);
  for (int k = 0; k < o->m && !st; k++) {
    /* "zero" and "keep" change nothing where every element is finite, so
    ** the update may apply them without knowing; "skip" stops it whole.
    ** The commit waits for resolve_step: the device may yet skip. */
    keel_nonfinite nf = o->nonfinite == KEEL_NONFINITE_SKIP ? KEEL_NONFINITE_ERROR : o->nonfinite;
    o->ddsq[k] = 0;
    st = update_param(o, k, 1, NULL, NULL, nf, &o->ddsq[k], &o->dneed[k]);
  }
  /* a queued call that failed its checks fails the batch whole: nothing runs */
  st2 = kl_cuda_defer(ctx, kn, st ? KL_DEFER_WAIT : KL_DEFER_LATER);
  if (!st) st = st2;
  if (st) {
    for (int k = 0; k < o->m; k++) o->params[o->act[k]].wsq_n = 0;
    return st;
  }
  o->dpend = 1;
  o->dm = o->m;
  o->upd_pending = 1;
  report_init(o, r);
  r->reason = "pending";
  return KEEL_OK;
}

keel_status keel_optim_prepare(keel_optim *o, keel_step_report *r) {
  keel_ctx *ctx = o->ctx;
  keel_step_report rep;
  keel_status st = KEEL_OK;
  kl_clip_work *w = &o->work;
  keel_optim_discard(o);
  report_init(o, &rep);
  if ((st = resolve_step(o, "step"))) goto out;   /* the last step's report and step counts */
  if ((st = collect(o))) goto out;
  for (int i = 0; i < o->np; i++) memset(&o->last[i], 0, sizeof o->last[i]);
  if (o->m == 0) {
    o->decision = DO_NO_GRAD;
    rep.reason = "no_grad";
    goto out;
  }
  if ((st = ensure_state(o))) goto out;
  /* a parameter whose last update summed its squares is not read again;
  ** those sums are there once the statistics pass has waited (a device
  ** parameter's gradient is on the device: that pass waits) */
  for (int k = 0; k < o->m; k++)
    o->wk[k] = wsq_known(&o->params[o->act[k]], kl_clip_units(o->clip, o->ag[k]));
  if ((st = kl_clip_stats(ctx, o->clip, w, o->m, o->ag, o->ap, o->wk, o->ls.enabled ? o->ls.inv_scale : 1)))
    goto out;
  st = judge(o, o->m, o->ag, &rep);
out:
  /* the last step's device update sizes: written by the statistics
  ** pass's wait when it had device gradients (no wait of their own), else
  ** waited for here */
  {
    keel_status st2 = resolve_updates(o, "step");
    if (!st) st = st2;
  }
  if (st) {
    keel_optim_discard(o);
  } else {
    o->prepared = 1;
    o->prep = rep;
  }
  if (r) *r = rep;
  return st;
}

/* The non-finite counters of a step that saw NaN/Inf, whatever became of
** it; a loss-scale overflow is not such trouble (counters.overflow). */
static void count_nonfinite(keel_optim *o) {
  if (o->prep.nonfinite && o->decision != DO_OVERFLOW) {
    o->counters.nonfinite_steps++;
    o->counters.nonfinite_elements += o->prep.nonfinite;
  }
}

keel_status keel_optim_apply(keel_optim *o, keel_step_report *r) {
  keel_ctx *ctx = o->ctx;
  keel_step_report rep;
  keel_status st = KEEL_OK;
  kl_clip_work *w = &o->work;
  if (!o->prepared || o->stale) {
    memset(&rep, 0, sizeof rep);
    rep.clip_coef = 1;
    rep.step = o->step_count;
    rep.top_param = -1;
    if (r) *r = rep;
    st = kl_error(ctx, KEEL_ERR_ARG,
                  o->prepared ? "%s.apply: the prepared step is stale (add_group, set_clip or set_clip_state "
                                "since prepare): prepare again or cancel"
                              : "%s.apply: no prepared step (prepare first)", kind_names[o->kind]);
    keel_optim_discard(o);
    return st;
  }
  rep = o->prep;
  switch (o->decision) {
    case DO_NO_GRAD:
      o->counters.no_grad++;
      break;
    case DO_SKIP:
      count_nonfinite(o);
      o->counters.skipped++;
      rep.n_updated = 0;
      break;
    case DO_OVERFLOW:
      o->counters.overflow++;
      rep.n_updated = 0;
      break;
    case DO_REFUSE:
      count_nonfinite(o);
      o->counters.errors++;
      rep.n_updated = 0;
      st = nonfinite_error(o, o->m);
      break;
    default:
      /* the hyper-parameters may have changed since prepare */
      if ((st = ensure_state(o)) || (st = wsq_reserve(o, 0))) {
        rep.n_updated = 0;
        break;
      }
      count_nonfinite(o);
      /* the update pass: nothing fails from here on. Device updates run
      ** as one batch (kl_cuda_defer) whose sizes arrive later: the step
      ** does not wait for them (resolve_updates does, when they are read) */
      if ((st = kl_cuda_defer(ctx, kind_names[o->kind], KL_DEFER_ON))) {
        rep.n_updated = 0;
        break;
      }
      for (int k = 0; k < o->m; k++) {
        keel_nonfinite nf = w->ts[k].nan + w->ts[k].inf ? o->nonfinite : KEEL_NONFINITE_ERROR;
        int64_t u0 = w->u0[k], nu = w->u0[k + 1] - u0;
        unsigned need;
        st = update_param(o, k, nu, w->a + u0, w->v + u0, nf, &o->upd[o->act[k]].update_sumsq, &need);
        if (st) break;   /* a backend that cannot fail after its checks; kept for safety */
        if (o->params[o->act[k]].p->storage->device != KEEL_CPU) o->upd_pending = 1;
        commit_param(o, k, need);
      }
      {
        keel_status st2 = kl_cuda_defer(ctx, kind_names[o->kind], KL_DEFER_LATER);
        if (!st) st = st2;
      }
      if (st) break;
      commit_applied(o, &rep);
      break;
  }
  keel_optim_discard(o);
  o->last_rep = rep;
  if (r) *r = rep;
  return st;
}

void keel_optim_cancel(keel_optim *o, keel_step_report *r) {
  keel_step_report rep;
  if (o->prepared) {
    rep = o->prep;
    count_nonfinite(o);
  } else {
    memset(&rep, 0, sizeof rep);
    rep.step = o->step_count;
    rep.top_param = -1;
  }
  o->counters.cancelled++;
  rep.applied = 0;
  rep.reason = "cancelled";
  rep.clip_coef = 1;
  rep.clipped = 0;
  rep.n_updated = 0;
  keel_optim_discard(o);
  o->last_rep = rep;
  if (r) *r = rep;
}

keel_status keel_optim_step(keel_optim *o, keel_step_report *r) {
  keel_step_report rep;
  keel_status st;
  kc_decide q;
  if (device_decidable(o, &q)) {
    keel_optim_discard(o);
    if ((st = resolve_step(o, "step"))) return st;
    if (!(st = collect(o))) st = step_device(o, &q, &rep);
    keel_optim_discard(o);
    if (st) report_init(o, &rep);
    if (r) *r = rep;
    return st;
  }
  st = keel_optim_prepare(o, r);
  return st ? st : keel_optim_apply(o, r);
}

void keel_optim_set_deferred_report(keel_optim *o, int on) { o->deferred = on != 0; }

int keel_optim_report_pending(const keel_optim *o) { return o->dpend; }

keel_status keel_optim_last_report(keel_optim *o, keel_step_report *r) {
  keel_status st = resolve_step(o, "report");
  *r = o->last_rep;
  return st;
}

keel_status keel_optim_set_lr_scale(keel_optim *o, double scale) {
  if (!(scale >= 0) || isinf(scale))
    return kl_error(o->ctx, KEEL_ERR_ARG, "%s: lr_scale must be a finite number >= 0, got %g", kind_names[o->kind],
                    scale);
  o->lr_scale = scale;
  return KEEL_OK;
}

double keel_optim_get_lr_scale(const keel_optim *o) { return o->lr_scale; }

keel_status keel_optim_zero_grad(keel_optim *o, int set_to_none) {
  keel_status st;
  for (int i = 0; i < o->np; i++) {
    keel_tensor *p = o->params[i].p, *g = p->grad;
    if (!g) continue;
    if (set_to_none) {
      kl_release(&p->grad);
    } else {
      if ((st = kl_backend_for(o->ctx, g->storage->device)->fill(o->ctx, g, 0.0))) return st;
      g->storage->version++;
    }
  }
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Introspection and state
** ======================================================================= */

int64_t keel_optim_step_count(const keel_optim *o) {
  settle(o, "step_count");
  return o->step_count;
}
void keel_optim_get_counters(const keel_optim *o, keel_optim_counters *c) {
  settle(o, "counters");
  *c = o->counters;
}
void keel_optim_set_counters(keel_optim *o, const keel_optim_counters *c) {
  settle(o, "set_counters");
  o->counters = *c;
}
int keel_optim_param_count(const keel_optim *o) { return o->np; }
const keel_grad_stats *keel_optim_last_stats(const keel_optim *o) {
  settle(o, "last_stats");
  return o->last;
}
keel_status keel_optim_last_updates(keel_optim *o, const keel_update_stats **out) {
  keel_status st = resolve_step(o, "last_updates");
  *out = o->upd;
  if (st) return st;
  return resolve_updates(o, "last_updates");
}

static keel_status check_param(const keel_optim *o, int i);

keel_status keel_optim_param_stats(const keel_optim *o, int i, keel_tensor *g, keel_grad_stats *out) {
  keel_ctx *ctx = o->ctx;
  keel_tensor *p, *c = NULL;
  keel_status st;
  memset(out, 0, sizeof *out);
  if ((st = check_param(o, i))) return st;
  settle(o, "param_stats");
  p = o->params[i].p;
  if (!g) g = p->grad;
  if (!g) return KEEL_OK;
  if ((st = kl_check_same_ctx(ctx, "param_stats", g))) return st;
  if (g->dtype != p->dtype || g->ndim != p->ndim || memcmp(g->shape, p->shape, sizeof(int64_t) * (size_t)g->ndim))
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: gradient for parameter %d does not match it in shape or dtype",
                    kind_names[o->kind], i + ctx->index_base);
  if ((st = keel_contiguous(ctx, g, &c))) return st;
  if (o->ls.enabled && o->ls.inv_scale != 1) {
    /* the unscaled view, element by element (a hook's gradient: not the hot path) */
    double a = o->ls.inv_scale, v = INFINITY;
    st = kl_backend_for(ctx, c->storage->device)->grad_stats(ctx, c, 1, &a, &v, 0, out, NULL, p);
  } else {
    st = kl_backend_for(ctx, c->storage->device)->grad_stats(ctx, c, 1, NULL, NULL, 0, out, NULL, p);
  }
  keel_tensor_release(c);
  return st;
}

keel_tensor *keel_optim_param(const keel_optim *o, int i, int *group) {
  if (i < 0 || i >= o->np) return NULL;
  if (group) *group = o->params[i].group;
  return o->params[i].p;
}

keel_status keel_optim_set_step_count(keel_optim *o, int64_t n) {
  keel_status st;
  if ((st = resolve_step(o, "set_step_count"))) return st;
  if (n < 0) return kl_error(o->ctx, KEEL_ERR_ARG, "%s: step count must be >= 0", kind_names[o->kind]);
  o->step_count = n;
  return KEEL_OK;
}

static keel_status check_param(const keel_optim *o, int i) {
  if (i < 0 || i >= o->np)
    return kl_error(o->ctx, KEEL_ERR_INDEX, "%s: no parameter %d (there are %d)", kind_names[o->kind],
                    i + o->ctx->index_base, o->np);
  return KEEL_OK;
}

static int state_index(keel_optim_kind kind, const char *name) {
  const char *const *names;
  int n = keel_optim_state_names(kind, &names);
  for (int k = 0; k < n; k++)
    if (name && !strcmp(name, names[k])) return k;
  return -1;
}

static keel_status unknown_state(const keel_optim *o, const char *name) {
  const char *const *names;
  int n = keel_optim_state_names(o->kind, &names);
  char list[160] = "";
  for (int k = 0; k < n; k++) {
    strncat(list, k ? ", " : "", sizeof list - strlen(list) - 1);
    strncat(list, names[k], sizeof list - strlen(list) - 1);
  }
  return kl_error(o->ctx, KEEL_ERR_ARG, "%s: no state named '%s' (expected one of: %s)", kind_names[o->kind],
                  name ? name : "(null)", list);
}

keel_status keel_optim_get_state(const keel_optim *o, int i, const char *name, keel_tensor **out) {
  keel_status st;
  int k;
  *out = NULL;
  if ((st = check_param(o, i))) return st;
  if ((k = state_index(o->kind, name)) < 0) return unknown_state(o, name);
  settle(o, "get_state");
  if (o->params[i].state[k] && (o->params[i].valid >> k & 1u)) *out = keel_tensor_retain(o->params[i].state[k]);
  return KEEL_OK;
}

keel_status keel_optim_set_state(keel_optim *o, int i, const char *name, keel_tensor *src) {
  keel_ctx *ctx = o->ctx;
  oparam *op;
  keel_status st;
  int k;
  char b1[128], b2[128];
  if ((st = check_param(o, i))) return st;
  if ((k = state_index(o->kind, name)) < 0) return unknown_state(o, name);
  if ((st = resolve_step(o, "set_state"))) return st;
  op = &o->params[i];
  if (!src) {
    kl_release(&op->state[k]);
    op->valid &= ~(1u << k);
    return KEEL_OK;
  }
  if ((st = kl_check_same_ctx(ctx, "load_state_dict", src))) return st;
  if (src->ndim != op->p->ndim || memcmp(src->shape, op->p->shape, sizeof(int64_t) * (size_t)src->ndim))
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: state '%s' of parameter %d has shape %s, the parameter %s",
                    kind_names[o->kind], name, i + ctx->index_base, kl_shape_str(b1, sizeof b1, src->ndim, src->shape),
                    kl_shape_str(b2, sizeof b2, op->p->ndim, op->p->shape));
  if (src->dtype != KEEL_F32 && src->dtype != KEEL_F64)
    return kl_error(ctx, KEEL_ERR_TYPE, "%s: state '%s' of parameter %d is %s, expected a float tensor",
                    kind_names[o->kind], name, i + ctx->index_base, keel_dtype_name(src->dtype));
  /* loaded state goes to the parameter's device, whatever src's */
  if (!op->state[k] || op->state[k]->storage->device != op->p->storage->device) {
    keel_tensor *t;
    if ((st = kl_new_like(ctx, op->p, op->p->dtype, &t))) return st;
    keel_tensor_release(op->state[k]);
    op->state[k] = t;
  }
  if (src->storage->device != op->p->storage->device) {
    keel_tensor *t;
    if ((st = kl_transfer(ctx, src, op->p->storage->device, op->p->dtype, &t))) return st;
    st = kl_backend_for(ctx, op->p->storage->device)->copy(ctx, op->state[k], t);
    keel_tensor_release(t);
  } else {
    st = kl_backend_for(ctx, op->p->storage->device)->copy(ctx, op->state[k], src);
  }
  if (st) return st;
  op->state[k]->storage->version++;
  op->valid |= 1u << k;
  return KEEL_OK;
}

int64_t keel_optim_get_param_step(const keel_optim *o, int i) {
  settle(o, "get_param_step");
  return i >= 0 && i < o->np ? o->params[i].step : 0;
}

keel_status keel_optim_set_param_step(keel_optim *o, int i, int64_t step) {
  keel_status st;
  if ((st = check_param(o, i))) return st;
  if ((st = resolve_step(o, "set_param_step"))) return st;
  if (step < 0) return kl_error(o->ctx, KEEL_ERR_ARG, "%s: step must be >= 0", kind_names[o->kind]);
  o->params[i].step = step;
  return KEEL_OK;
}

keel_status keel_optim_get_clip_state(const keel_optim *o, int i, keel_clip_state *s) {
  settle(o, "get_clip_state");
  return kl_clip_chain_get_state(o->ctx, o->clip, i, s);
}

keel_status keel_optim_set_clip_state(keel_optim *o, int i, const keel_clip_state *s) {
  keel_status st = resolve_step(o, "set_clip_state");
  if (st) return st;
  st = kl_clip_chain_set_state(o->ctx, o->clip, i, s);
  if (!st) o->stale = 1;   /* a prepared step's decisions came from the replaced state */
  return st;
}

/* }====================================================================== */
