/*
** lkeel_optim.c: the optimizer and clipping functions of keel.core._optim,
** which bindings/keel/optim.lua and clip.lua wrap.
**
** An optimizer is a full userdata (metatable "keel.Optim") owning a
** keel_optim; __gc and __close free it. Hyper-parameters live in the Lua
** param_groups tables: prepare() reads them all (a dozen fields per group)
** and hands them to the engine before the statistics pass, so a change
** made by a schedule or by hand is seen at the next step.
**
** A step is prepare (statistics, decisions, nothing changes), then apply
** or cancel; optim.lua runs the on_grad hooks and the guard in between.
** The report is one table that prepare makes and apply/cancel update.
** prepare also sets the step's loss scale (keel.amp's fused unscale):
** every prepare says whether there is one, so none outlives its step.
*/
#include <math.h>
#include <string.h>
#include "lkeel.h"

#define LK_OPTIM_MT "keel.Optim"

typedef struct lk_optim { keel_optim *o; } lk_optim;

static keel_optim *check_optim(lua_State *L, int i) {
  lk_optim *u = (lk_optim *)luaL_checkudata(L, i, LK_OPTIM_MT);
  if (!u->o) luaL_error(L, "optim: the optimizer was closed");
  return u->o;
}

static int optim_gc(lua_State *L) {
  lk_optim *u = (lk_optim *)luaL_checkudata(L, 1, LK_OPTIM_MT);
  keel_optim_free(u->o);
  u->o = NULL;
  return 0;
}

/* {======================================================================
** Tables <-> engine structs
** ======================================================================= */

static const char *kind_keys[KEEL_OPTIM_KIND_COUNT] = {"sgd", "adam", "adamw", "rmsprop", "adagrad"};

static double num_field(lua_State *L, int t, const char *k, const char *who, int gi, double def) {
  double v = def;
  int ty = lua_getfield(L, t, k);
  if (ty == LUA_TNUMBER) v = lua_tonumber(L, -1);
  else if (ty != LUA_TNIL)
    luaL_error(L, "%s: group %d: %s must be a number, got %s", who, gi, k, luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

static int bool_field(lua_State *L, int t, const char *k, const char *who, int gi, int def) {
  int v = def, ty = lua_getfield(L, t, k);
  if (ty == LUA_TBOOLEAN) v = lua_toboolean(L, -1);
  else if (ty != LUA_TNIL)
    luaL_error(L, "%s: group %d: %s must be a boolean, got %s", who, gi, k, luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

/* Hyper-parameters from the table at t over the defaults of kind. */
static void read_hparams(lua_State *L, int t, keel_optim_kind kind, int gi, keel_optim_hparams *h) {
  const char *who = keel_optim_kind_name(kind);
  keel_optim_hparams_default(kind, h);
  t = lua_absindex(L, t);
  h->lr = num_field(L, t, "lr", who, gi, h->lr);
  h->weight_decay = num_field(L, t, "weight_decay", who, gi, h->weight_decay);
  h->momentum = num_field(L, t, "momentum", who, gi, h->momentum);
  h->dampening = num_field(L, t, "dampening", who, gi, h->dampening);
  h->alpha = num_field(L, t, "alpha", who, gi, h->alpha);
  h->eps = num_field(L, t, "eps", who, gi, h->eps);
  h->lr_decay = num_field(L, t, "lr_decay", who, gi, h->lr_decay);
  h->initial_accumulator_value = num_field(L, t, "initial_accumulator_value", who, gi, h->initial_accumulator_value);
  h->nesterov = bool_field(L, t, "nesterov", who, gi, h->nesterov);
  h->amsgrad = bool_field(L, t, "amsgrad", who, gi, h->amsgrad);
  h->centered = bool_field(L, t, "centered", who, gi, h->centered);
  h->maximize = bool_field(L, t, "maximize", who, gi, h->maximize);
  if (lua_getfield(L, t, "betas") != LUA_TNIL) {
    int ok = lua_istable(L, -1);
    if (ok) {
      ok = lua_geti(L, -1, 1) == LUA_TNUMBER && lua_geti(L, -2, 2) == LUA_TNUMBER;
      if (ok) { h->beta1 = lua_tonumber(L, -2); h->beta2 = lua_tonumber(L, -1); }
      lua_pop(L, 2);
    }
    if (!ok) luaL_error(L, "%s: group %d: betas must be a table of two numbers {beta1, beta2}", who, gi);
  }
  lua_pop(L, 1);
}

/* The tensors of the list at i (each must be a tensor). */
static keel_tensor **tensor_list(lua_State *L, int i, const char *fn, const char *what, int *n) {
  keel_tensor **ts;
  int len;
  luaL_checktype(L, i, LUA_TTABLE);
  len = (int)luaL_len(L, i);
  ts = (keel_tensor **)lua_newuserdatauv(L, sizeof *ts * (size_t)(len ? len : 1), 0);  /* GC-owned */
  for (int k = 0; k < len; k++) {
    lua_geti(L, i, k + 1);
    ts[k] = lk_to(L, -1);
    if (!ts[k]) luaL_error(L, "%s: %s %d is not a keel.Tensor (got %s)", fn, what, k + 1, lk_typename(L, -1));
    lua_pop(L, 1);   /* still referenced by the list */
  }
  *n = len;
  return ts;
}


static void push_stats(lua_State *L, const keel_grad_stats *s, int nrec) {
  lua_createtable(L, 0, nrec);
  lk_setint(L, "numel", s->numel);
  lk_setint(L, "nan", s->nan);
  lk_setint(L, "inf", s->inf);
  lk_setint(L, "zeros", s->zeros);
  lk_setnum(L, "sum", s->sum);
  lk_setnum(L, "sumsq", s->sumsq);
  lk_setnum(L, "sum_abs", s->sum_abs);
  lk_setnum(L, "max_abs", s->max_abs);
  lk_setnum(L, "norm", sqrt(s->sumsq));
}

/* ||dw|| / ||w before||: 0 for no change, inf for a change of a zero weight. */
static double update_ratio(const keel_update_stats *u) {
  if (u->update_sumsq == 0) return 0;
  return u->w_sumsq > 0 ? sqrt(u->update_sumsq) / sqrt(u->w_sumsq) : INFINITY;
}

/* }====================================================================== */

/* {======================================================================
** Optimizer functions
** ======================================================================= */

static int l_new(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *k = luaL_checkstring(L, 1);
  int kind = -1;
  lk_optim *u;
  for (int i = 0; i < KEEL_OPTIM_KIND_COUNT; i++)
    if (!strcmp(k, kind_keys[i])) kind = i;
  if (kind < 0) return luaL_error(L, "optim: unknown optimizer '%s'", k);
  u = (lk_optim *)lua_newuserdatauv(L, sizeof *u, 0);
  u->o = NULL;
  luaL_setmetatable(L, LK_OPTIM_MT);
  lk_check(L, S, keel_optim_new(S->ctx, (keel_optim_kind)kind, &u->o));
  return 1;
}

static int l_add_group(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  keel_optim_hparams h;
  int n, g;
  keel_tensor **ts = tensor_list(L, 2, keel_optim_kind_name(keel_optim_get_kind(o)), "parameter", &n);
  luaL_checktype(L, 3, LUA_TTABLE);
  read_hparams(L, 3, keel_optim_get_kind(o), keel_optim_group_count(o) + 1, &h);
  lk_check(L, S, keel_optim_add_group(o, n, ts, &h, &g));
  lua_pushinteger(L, g + 1);
  return 1;
}

static int l_set_group(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  int g = (int)luaL_checkinteger(L, 2);
  keel_optim_hparams h;
  luaL_checktype(L, 3, LUA_TTABLE);
  read_hparams(L, 3, keel_optim_get_kind(o), g, &h);
  lk_check(L, S, keel_optim_set_hparams(o, g - 1, &h));
  return 0;
}

static keel_clip_kind clip_kind(lua_State *L, const char *k, int i) {
  static const char *names[] = {"value", "norm", "global_norm", "agc", "percentile", "zscore", NULL};
  for (int j = 0; names[j]; j++)
    if (!strcmp(k, names[j])) return (keel_clip_kind)j;
  luaL_error(L, "clip: transform %d: unknown kind '%s'", i, k);
  return KEEL_CLIP_VALUE;
}

/* set_clip(h, {{kind=, threshold=, p=, eps=, alpha=, max_norm=, window=, mode=}, ...}) */
static int l_set_clip(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  int n;
  keel_clip_spec *specs;
  luaL_checktype(L, 2, LUA_TTABLE);
  n = (int)luaL_len(L, 2);
  specs = (keel_clip_spec *)lua_newuserdatauv(L, sizeof *specs * (size_t)(n ? n : 1), 0);
  for (int i = 0; i < n; i++) {
    keel_clip_spec *s = &specs[i];
    int t;
    lua_geti(L, 2, i + 1);
    t = lua_gettop(L);
    luaL_checktype(L, t, LUA_TTABLE);
    lua_getfield(L, t, "kind");
    keel_clip_spec_default(clip_kind(L, luaL_checkstring(L, -1), i + 1), s);
    lua_pop(L, 1);
#define F(name, field) \
    if (lua_getfield(L, t, name) == LUA_TNUMBER) s->field = lua_tonumber(L, -1); \
    lua_pop(L, 1);
    F("threshold", threshold) F("p", p) F("eps", eps) F("alpha", alpha) F("max_norm", max_norm)
#undef F
    if (lua_getfield(L, t, "window") == LUA_TNUMBER) s->window = (int64_t)lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (lua_getfield(L, t, "mode") == LUA_TNUMBER) s->mode = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    lua_pop(L, 1);
  }
  lk_check(L, S, keel_optim_set_clip(o, n, specs));
  return 0;
}

static int l_set_clip_threshold(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  int i = (int)luaL_checkinteger(L, 2);
  lk_check(L, S, keel_optim_set_clip_threshold(o, i - 1, luaL_checknumber(L, 3)));
  return 0;
}

static int l_set_nonfinite(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  static const char *names[] = {"error", "skip", "zero", "keep", NULL};
  int p = luaL_checkoption(L, 2, NULL, names);
  lk_check(L, S, keel_optim_set_nonfinite(o, (keel_nonfinite)p));
  return 0;
}

/* step(h, groups): pushes every group's hyper-parameters, steps, and
** returns the report table. */
/* Writes r into the table on top of the stack (every field: a table
** from prepare is updated in place by apply or cancel). */
static void fill_report(lua_State *L, const keel_step_report *r) {
  lua_pushboolean(L, r->applied); lua_setfield(L, -2, "applied");
  if (r->reason) lua_pushstring(L, r->reason); else lua_pushnil(L);
  lua_setfield(L, -2, "reason");
  lk_setnum(L, "grad_norm", r->grad_norm);
  lk_setnum(L, "clip_coef", r->clip_coef);
  lua_pushboolean(L, r->clipped); lua_setfield(L, -2, "clipped");
  lk_setint(L, "nonfinite", r->nonfinite);
  lk_setint(L, "step", r->step);
  lk_setint(L, "n_updated", r->n_updated);
  if (r->top_param >= 0) lua_pushinteger(L, r->top_param + 1); else lua_pushnil(L);
  lua_setfield(L, -2, "top_param");
  lk_setnum(L, "top_share", r->top_share);
}

/* Every group's hyper-parameters from the param_groups table at idx. */
static void push_groups(lua_State *L, lk_state *S, keel_optim *o, int idx) {
  int ng = keel_optim_group_count(o);
  luaL_checktype(L, idx, LUA_TTABLE);
  if ((int)luaL_len(L, idx) != ng)
    luaL_error(L, "%s.step: param_groups has %d groups, the optimizer %d (use add_param_group)",
               keel_optim_kind_name(keel_optim_get_kind(o)), (int)luaL_len(L, idx), ng);
  for (int g = 0; g < ng; g++) {
    keel_optim_hparams h;
    if (lua_geti(L, idx, g + 1) != LUA_TTABLE)
      luaL_error(L, "%s.step: param_groups[%d] is not a table", keel_optim_kind_name(keel_optim_get_kind(o)), g + 1);
    read_hparams(L, -1, keel_optim_get_kind(o), g + 1, &h);
    lua_pop(L, 1);
    lk_check(L, S, keel_optim_set_hparams(o, g, &h));
  }
}

/* step_deferred(h, groups, lr_scale): the whole step (no hooks, guard or
** loss scale: the caller knows) with deferred reports on. Returns the
** report table and false, or, when the device decided the step and its
** report is pending, an empty table and true (last_report fills it). */
static int l_step_deferred(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  keel_step_report r;
  keel_loss_scale ls;
  keel_status st;
  double scale = luaL_checknumber(L, 3);
  int pending;
  memset(&ls, 0, sizeof ls);
  push_groups(L, S, o, 2);
  lk_check(L, S, keel_optim_set_loss_scale(o, &ls));
  lk_check(L, S, keel_optim_set_lr_scale(o, scale));
  keel_optim_set_deferred_report(o, 1);
  st = keel_optim_step(o, &r);
  keel_optim_set_deferred_report(o, 0);
  pending = !st && keel_optim_report_pending(o);
  lua_createtable(L, 0, 14);
  if (!pending) fill_report(L, &r);
  lk_check(L, S, st);
  lua_pushboolean(L, pending);
  return 2;
}

/* last_report(h, t): the last step's report written into t (resolving a
** pending one: this may wait for the device); returns t. */
static int l_last_report(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  keel_step_report r;
  keel_status st;
  luaL_checktype(L, 2, LUA_TTABLE);
  st = keel_optim_last_report(o, &r);
  lua_settop(L, 2);
  fill_report(L, &r);
  lk_check(L, S, st);
  return 1;
}

/* prepare(h, groups [, inv_scale, found_inf]): pushes every group's
** hyper-parameters and the loss scale (inv_scale nil: none), prepares the
** step and returns the report table (applied = false). */
static int l_prepare(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  keel_step_report r;
  keel_loss_scale ls;
  memset(&ls, 0, sizeof ls);
  if (!lua_isnoneornil(L, 3)) {
    ls.enabled = 1;
    ls.inv_scale = luaL_checknumber(L, 3);
    ls.found_inf = lua_toboolean(L, 4);
  }
  push_groups(L, S, o, 2);
  lk_check(L, S, keel_optim_set_loss_scale(o, &ls));
  lk_check(L, S, keel_optim_prepare(o, &r));
  lua_createtable(L, 0, 14);
  fill_report(L, &r);
  return 1;
}

/* apply(h, lr_scale, report): applies the prepared step with lr times
** lr_scale and updates the report; raises the error policy's error. */
static int l_apply(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  keel_step_report r;
  keel_status st;
  double scale = luaL_checknumber(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  if ((st = keel_optim_set_lr_scale(o, scale))) {
    keel_optim_discard(o);   /* a bad scale aborts the step before anything */
    lk_check(L, S, st);
  }
  st = keel_optim_apply(o, &r);
  lua_settop(L, 3);
  fill_report(L, &r);
  lk_check(L, S, st);
  return 1;
}

/* cancel(h, report): records the prepared step as cancelled; the report
** keeps what prepare measured (grad_norm, nonfinite, top_param, ...). */
static int l_cancel(lua_State *L) {
  keel_optim *o = check_optim(L, 1);
  keel_step_report r;
  luaL_checktype(L, 2, LUA_TTABLE);
  keel_optim_cancel(o, &r);
  lua_settop(L, 2);
  lua_pushboolean(L, 0); lua_setfield(L, 2, "applied");
  lua_pushstring(L, r.reason); lua_setfield(L, 2, "reason");
  lk_setnum(L, "clip_coef", 1);
  lua_pushboolean(L, 0); lua_setfield(L, 2, "clipped");
  lk_setint(L, "n_updated", 0);
  lk_setint(L, "step", r.step);
  return 1;
}

/* discard(h): drops the prepared step, recording nothing. */
static int l_discard(lua_State *L) {
  keel_optim_discard(check_optim(L, 1));
  return 0;
}

/* param_stats(h, i, step [, grad]): the on_grad hooks' statistics of
** parameter i, from the last prepare or (grad given) computed afresh:
** {norm, max_abs, mean, std, rms, nonfinite, nan, inf, zeros, numel,
** weight_norm, update_ratio (nil before the first update), step}. Mean,
** std (population) and rms are over the finite elements. */
static int l_param_stats(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  int i = (int)luaL_checkinteger(L, 2) - 1;
  lua_Integer step = luaL_checkinteger(L, 3);
  keel_grad_stats fresh;
  const keel_grad_stats *s;
  const keel_update_stats *u;
  double nf, mean = 0, var = 0, rms = 0;
  if (i < 0 || i >= keel_optim_param_count(o))
    return luaL_error(L, "optim: no parameter %d", i + 1);
  if (!lua_isnoneornil(L, 4)) {
    keel_tensor *g = lk_to(L, 4);
    if (!g) return luaL_error(L, "optim: gradient must be a keel.Tensor, got %s", lk_typename(L, 4));
    lk_check(L, S, keel_optim_param_stats(o, i, g, &fresh));
    s = &fresh;
  } else {
    s = &keel_optim_last_stats(o)[i];
  }
  lk_check(L, S, keel_optim_last_updates(o, &u));
  u += i;
  nf = (double)(s->numel - s->nan - s->inf);
  if (nf > 0) {
    mean = s->sum / nf;
    var = s->sumsq / nf - mean * mean;
    rms = sqrt(s->sumsq / nf);
  }
  lua_createtable(L, 0, 13);
  lk_setnum(L, "norm", sqrt(s->sumsq));
  lk_setnum(L, "max_abs", s->max_abs);
  lk_setnum(L, "mean", mean);
  lk_setnum(L, "std", var > 0 ? sqrt(var) : 0);
  lk_setnum(L, "rms", rms);
  lk_setint(L, "nonfinite", s->nan + s->inf);
  lk_setint(L, "nan", s->nan);
  lk_setint(L, "inf", s->inf);
  lk_setint(L, "zeros", s->zeros);
  lk_setint(L, "numel", s->numel);
  lk_setnum(L, "weight_norm", sqrt(s->w_sumsq));
  if (u->step > 0) lk_setnum(L, "update_ratio", update_ratio(u));
  lk_setint(L, "step", step);
  return 1;
}

static int l_zero_grad(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  lk_check(L, S, keel_optim_zero_grad(o, lua_isnone(L, 2) ? 1 : lua_toboolean(L, 2)));
  return 0;
}

static int l_step_count(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)keel_optim_step_count(check_optim(L, 1)));
  return 1;
}

#define COUNTERS(X) X(steps) X(skipped) X(cancelled) X(errors) X(no_grad) X(nonfinite_steps) \
  X(nonfinite_elements) X(clipped) X(overflow)

static int l_counters(lua_State *L) {
  keel_optim_counters c;
  keel_optim_get_counters(check_optim(L, 1), &c);
  lua_createtable(L, 0, 9);
#define X(f) lk_setint(L, #f, c.f);
  COUNTERS(X)
#undef X
  return 1;
}

static int l_set_counters(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  keel_optim_counters c;
  memset(&c, 0, sizeof c);
  luaL_checktype(L, 2, LUA_TTABLE);
#define X(f) if (lua_getfield(L, 2, #f) == LUA_TNUMBER) c.f = (int64_t)lua_tointeger(L, -1); lua_pop(L, 1);
  COUNTERS(X)
#undef X
  keel_optim_set_counters(o, &c);
  lk_check(L, S, keel_optim_set_step_count(o, (int64_t)luaL_checkinteger(L, 3)));
  return 0;
}

static int l_params(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  int n = keel_optim_param_count(o);
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lk_push(L, S, keel_tensor_retain(keel_optim_param(o, i, NULL)));
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/* get_state(h, i) -> {step=, <name>=clone, ...} or nil when it has none */
static int l_get_state(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  int i = (int)luaL_checkinteger(L, 2) - 1, n, any = 0;
  const char *const *names;
  n = keel_optim_state_names(keel_optim_get_kind(o), &names);
  lua_newtable(L);
  for (int k = 0; k < n; k++) {
    keel_tensor *t, *c;
    keel_status st;
    lk_check(L, S, keel_optim_get_state(o, i, names[k], &t));
    if (!t) continue;
    st = keel_clone(S->ctx, t, &c);
    keel_tensor_release(t);
    lk_check(L, S, st);
    lk_push(L, S, c);
    lua_setfield(L, -2, names[k]);
    any = 1;
  }
  if (keel_optim_get_kind(o) != KEEL_OPTIM_SGD && (any || keel_optim_get_param_step(o, i) > 0)) {
    lk_setint(L, "step", keel_optim_get_param_step(o, i));
    any = 1;
  }
  if (!any) lua_pushnil(L);
  return 1;
}

/* set_state(h, i, t): t's buffers are copied in, missing ones dropped */
static int l_set_state(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  int i = (int)luaL_checkinteger(L, 2) - 1, n;
  const char *const *names;
  n = keel_optim_state_names(keel_optim_get_kind(o), &names);
  if (lua_isnil(L, 3)) {
    for (int k = 0; k < n; k++) lk_check(L, S, keel_optim_set_state(o, i, names[k], NULL));
    lk_check(L, S, keel_optim_set_param_step(o, i, 0));
    return 0;
  }
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, 3)) {
    int known = lua_type(L, -2) == LUA_TSTRING && !strcmp(lua_tostring(L, -2), "step");
    for (int k = 0; k < n && !known; k++)
      known = lua_type(L, -2) == LUA_TSTRING && !strcmp(lua_tostring(L, -2), names[k]);
    if (!known)
      return luaL_error(L, "load_state_dict: state of parameter %d: unknown entry '%s' for %s", i + 1,
                        lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2),
                        keel_optim_kind_name(keel_optim_get_kind(o)));
    lua_pop(L, 1);
  }
  for (int k = 0; k < n; k++) {
    keel_tensor *t = NULL;
    if (lua_getfield(L, 3, names[k]) != LUA_TNIL) {
      t = lk_to(L, -1);
      if (!t)
        return luaL_error(L, "load_state_dict: state '%s' of parameter %d must be a keel.Tensor, got %s", names[k],
                          i + 1, lk_typename(L, -1));
    }
    lk_check(L, S, keel_optim_set_state(o, i, names[k], t));
    lua_pop(L, 1);
  }
  if (lua_getfield(L, 3, "step") != LUA_TNIL && !lua_isinteger(L, -1) &&
      !(lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) == floor(lua_tonumber(L, -1))))
    return luaL_error(L, "load_state_dict: step of parameter %d must be an integer", i + 1);
  lk_check(L, S, keel_optim_set_param_step(o, i, (int64_t)lua_tonumber(L, -1)));
  lua_pop(L, 1);
  return 0;
}

static int l_get_clip_state(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  keel_clip_state s;
  lk_check(L, S, keel_optim_get_clip_state(o, (int)luaL_checkinteger(L, 2) - 1, &s));
  lua_createtable(L, 0, 4);
  lua_createtable(L, (int)s.n_history, 0);
  for (int64_t j = 0; j < s.n_history; j++) {
    lua_pushnumber(L, s.history[j]);
    lua_rawseti(L, -2, (lua_Integer)j + 1);
  }
  lua_setfield(L, -2, "history");
  lk_setnum(L, "mean", s.mean);
  lk_setnum(L, "var", s.var);
  lua_pushboolean(L, s.initialized);
  lua_setfield(L, -2, "initialized");
  return 1;
}

static int l_set_clip_state(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  int i = (int)luaL_checkinteger(L, 2) - 1;
  keel_clip_state s;
  int64_t n = 0;
  double *h;
  luaL_checktype(L, 3, LUA_TTABLE);
  memset(&s, 0, sizeof s);
  if (lua_getfield(L, 3, "history") == LUA_TTABLE) n = (int64_t)luaL_len(L, -1);
  h = (double *)lua_newuserdatauv(L, sizeof(double) * (size_t)(n ? n : 1), 0);
  for (int64_t j = 0; j < n; j++) {
    if (lua_geti(L, -2, (lua_Integer)j + 1) != LUA_TNUMBER)
      return luaL_error(L, "load_state_dict: clip transform %d: history entry %d is not a number", i + 1, (int)j + 1);
    h[j] = lua_tonumber(L, -1);
    lua_pop(L, 1);
  }
  s.n_history = n;
  s.history = h;
  s.mean = (lua_getfield(L, 3, "mean"), lua_tonumber(L, -1));
  s.var = (lua_getfield(L, 3, "var"), lua_tonumber(L, -1));
  s.initialized = (lua_getfield(L, 3, "initialized"), lua_toboolean(L, -1));
  lk_check(L, S, keel_optim_set_clip_state(o, i, &s));
  return 0;
}

/* last_stats(h): per parameter, the statistics of the last prepare and
** the last applied update (update_sumsq, update_ratio: nil before it). */
static int l_last_stats(lua_State *L) {
  keel_optim *o = check_optim(L, 1);
  int n = keel_optim_param_count(o);
  const keel_grad_stats *s = keel_optim_last_stats(o);
  const keel_update_stats *u;
  lk_check(L, lk_S(L), keel_optim_last_updates(o, &u));
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    push_stats(L, &s[i], 13);
    lk_setnum(L, "w_sumsq", s[i].w_sumsq);
    lk_setnum(L, "weight_norm", sqrt(s[i].w_sumsq));
    if (u[i].step > 0) {
      lk_setnum(L, "update_sumsq", u[i].update_sumsq);
      lk_setnum(L, "update_ratio", update_ratio(&u[i]));
    }
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/* any_grad(h): whether some parameter that requires grad has a .grad
** (a step would see a gradient). */
static int l_any_grad(lua_State *L) {
  keel_optim *o = check_optim(L, 1);
  int n = keel_optim_param_count(o), any = 0;
  for (int i = 0; i < n && !any; i++) {
    keel_tensor *p = keel_optim_param(o, i, NULL);
    any = keel_requires_grad(p) && keel_tensor_grad(p) != NULL;
  }
  lua_pushboolean(L, any);
  return 1;
}

/* }====================================================================== */

/* {======================================================================
** Loss scaling (keel.amp)
** ======================================================================= */

/* unscale(h, inv_scale) -> nonfinite, ngrads: every .grad of the
** optimizer's parameters times inv_scale in place (GradScaler.unscale_). */
static int l_unscale(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_optim *o = check_optim(L, 1);
  double inv = luaL_checknumber(L, 2);
  int n = keel_optim_param_count(o), ng = 0;
  int64_t bad = 0;
  keel_tensor **ps = (keel_tensor **)lua_newuserdatauv(L, sizeof *ps * (size_t)(n ? n : 1), 0);
  for (int i = 0; i < n; i++) ps[i] = keel_optim_param(o, i, NULL);
  lk_check(L, S, keel_grad_unscale(S->ctx, n, ps, inv, &bad, &ng));
  lua_pushinteger(L, (lua_Integer)bad);
  lua_pushinteger(L, ng);
  return 2;
}

/* scale_update(scale, tracker, found_inf, growth, backoff, interval) ->
** scale, tracker (keel_loss_scale_update). */
static int l_scale_update(lua_State *L) {
  double scale = luaL_checknumber(L, 1);
  int64_t tracker = (int64_t)luaL_checkinteger(L, 2);
  keel_loss_scale_update(&scale, &tracker, lua_toboolean(L, 3), luaL_checknumber(L, 4), luaL_checknumber(L, 5),
                         (int64_t)luaL_checkinteger(L, 6));
  lua_pushnumber(L, scale);
  lua_pushinteger(L, (lua_Integer)tracker);
  return 2;
}

/* f32(x): x rounded to float32 (the scale's dtype in torch); beyond its
** range, +-inf (a plain cast would be undefined there). */
static int l_f32(lua_State *L) {
  double x = luaL_checknumber(L, 1);
  lua_pushnumber(L, x >= 0x1.ffffffp+127 ? HUGE_VAL : x <= -0x1.ffffffp+127 ? -HUGE_VAL : (double)(float)x);
  return 1;
}

/* }====================================================================== */

/* {======================================================================
** Standalone clipping and statistics
** ======================================================================= */

static int l_grad_stats(lua_State *L) {
  lk_state *S = lk_S(L);
  int n;
  keel_tensor **ts = tensor_list(L, 1, "grad_stats", "tensor", &n);
  keel_grad_stats *st = (keel_grad_stats *)lua_newuserdatauv(L, sizeof *st * (size_t)(n ? n : 1), 0);
  lk_check(L, S, keel_grad_stats_compute(S->ctx, n, ts, st));
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    push_stats(L, &st[i], 9);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int l_clip_grad_norm(lua_State *L) {
  lk_state *S = lk_S(L);
  int n;
  keel_tensor **ts = tensor_list(L, 1, "clip_grad_norm_", "parameter", &n);
  double total;
  lk_check(L, S, keel_clip_grad_norm(S->ctx, n, ts, luaL_checknumber(L, 2), luaL_optnumber(L, 3, 2),
                                     lua_toboolean(L, 4), &total));
  lua_pushnumber(L, total);
  return 1;
}

static int l_clip_grad_value(lua_State *L) {
  lk_state *S = lk_S(L);
  int n;
  keel_tensor **ts = tensor_list(L, 1, "clip_grad_value_", "parameter", &n);
  lk_check(L, S, keel_clip_grad_value(S->ctx, n, ts, luaL_checknumber(L, 2)));
  return 0;
}

static int l_clip_grad_agc(lua_State *L) {
  lk_state *S = lk_S(L);
  int n;
  keel_tensor **ts = tensor_list(L, 1, "agc_", "parameter", &n);
  lk_check(L, S, keel_clip_grad_agc(S->ctx, n, ts, luaL_checknumber(L, 2), luaL_optnumber(L, 3, 1e-3)));
  return 0;
}

/* }====================================================================== */

static const luaL_Reg optim_fns[] = {
  {"new", l_new}, {"add_group", l_add_group}, {"set_group", l_set_group},
  {"set_clip", l_set_clip}, {"set_clip_threshold", l_set_clip_threshold},
  {"set_nonfinite", l_set_nonfinite}, {"prepare", l_prepare}, {"apply", l_apply},
  {"step_deferred", l_step_deferred}, {"last_report", l_last_report}, {"cancel", l_cancel},
  {"discard", l_discard}, {"param_stats", l_param_stats}, {"zero_grad", l_zero_grad},
  {"step_count", l_step_count}, {"counters", l_counters}, {"set_counters", l_set_counters},
  {"params", l_params}, {"get_state", l_get_state}, {"set_state", l_set_state},
  {"get_clip_state", l_get_clip_state}, {"set_clip_state", l_set_clip_state},
  {"last_stats", l_last_stats}, {"grad_stats", l_grad_stats},
  {"clip_grad_norm", l_clip_grad_norm}, {"clip_grad_value", l_clip_grad_value},
  {"clip_grad_agc", l_clip_grad_agc}, {"any_grad", l_any_grad}, {"unscale", l_unscale},
  {"scale_update", l_scale_update}, {"f32", l_f32},
  {NULL, NULL},
};

void lk_open_optim(lua_State *L, int state, int mt) {
  if (luaL_newmetatable(L, LK_OPTIM_MT)) {
    lua_pushcfunction(L, optim_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, optim_gc);
    lua_setfield(L, -2, "__close");
    lua_pushliteral(L, "keel.Optim");
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
  lk_register(L, state, mt, optim_fns);
}
