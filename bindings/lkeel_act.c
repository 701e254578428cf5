/*
** lkeel_act.c: activations, softmax and losses in keel.core._nn (which
** keel.nn.functional copies), plus the tensor methods softmax and
** log_softmax.
**
** Options come as a trailing table, with PyTorch's names:
**   cross_entropy(logits, target, {weight =, ignore_index =,
**                                  label_smoothing =, reduction =})
** An unknown key is an error (a misspelt option would otherwise be
** silently ignored). Simple cases have short forms: a number for the one
** parameter (leaky_relu(x, 0.2)), a string for the reduction
** (mse_loss(a, b, "sum")) or for gelu's approximation.
** ignore_index has no default: nil ignores nothing. PyTorch's -100 is a
** sentinel for 0-based labels; any integer works here, in or out of range.
*/
#include <string.h>
#include "lkeel.h"

/* {======================================================================
** Options
** ======================================================================= */

/* Raises an error for a key of the table at i that is not in known. */
static void check_keys(lua_State *L, int i, const char *fn, const char *const *known) {
  lua_pushnil(L);
  while (lua_next(L, i)) {
    int ok = 0;
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TSTRING) {
      const char *k = lua_tostring(L, -1);
      for (int j = 0; known[j]; j++) if (!strcmp(k, known[j])) ok = 1;
      if (!ok) {
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        for (int j = 0; known[j]; j++) {
          if (j) luaL_addstring(&b, ", ");
          luaL_addstring(&b, known[j]);
        }
        luaL_pushresult(&b);
        luaL_error(L, "%s: unknown option '%s' (expected %s)", fn, k, lua_tostring(L, -1));
      }
    } else {
      luaL_error(L, "%s: options must be named (got a %s key)", fn, luaL_typename(L, -1));
    }
  }
}

/* Options table at i (nil when absent); a non-table is an error. */
static int opts_at(lua_State *L, int i, const char *fn, const char *const *known) {
  if (lua_isnoneornil(L, i)) return 0;
  if (!lua_istable(L, i) || lk_to(L, i))
    luaL_error(L, "%s: argument #%d: expected an options table, got %s", fn, i, lk_typename(L, i));
  check_keys(L, i, fn, known);
  return 1;
}

static double num_field(lua_State *L, int i, const char *fn, const char *key, double def) {
  double v = def;
  int t = lua_getfield(L, i, key);
  if (t == LUA_TNUMBER) v = lua_tonumber(L, -1);
  else if (t != LUA_TNIL) luaL_error(L, "%s: option %s must be a number, got %s", fn, key, luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

/* Borrowed: the options table keeps the tensor alive during the call. */
static keel_tensor *tensor_field(lua_State *L, int i, const char *fn, const char *key) {
  keel_tensor *t = NULL;
  if (lua_getfield(L, i, key) != LUA_TNIL) {
    t = lk_to(L, -1);
    if (!t) luaL_error(L, "%s: option %s must be a keel.Tensor, got %s", fn, key, lk_typename(L, -1));
  }
  lua_pop(L, 1);
  return t;
}

static keel_reduction to_reduction(lua_State *L, int i, const char *fn) {
  const char *s = lua_type(L, i) == LUA_TSTRING ? lua_tostring(L, i) : NULL;
  if (s && !strcmp(s, "mean")) return KEEL_REDUCTION_MEAN;
  if (s && !strcmp(s, "sum")) return KEEL_REDUCTION_SUM;
  if (s && !strcmp(s, "none")) return KEEL_REDUCTION_NONE;
  if (s) luaL_error(L, "%s: reduction must be \"mean\", \"sum\" or \"none\", got \"%s\"", fn, s);
  luaL_error(L, "%s: reduction must be \"mean\", \"sum\" or \"none\", got %s", fn, luaL_typename(L, i));
  return KEEL_REDUCTION_MEAN;
}

/* opts.reduction of the table at i (0: no table), default "mean". */
static keel_reduction reduction_field(lua_State *L, int i, const char *fn) {
  keel_reduction r = KEEL_REDUCTION_MEAN;
  if (!i) return r;
  if (lua_getfield(L, i, "reduction") != LUA_TNIL) r = to_reduction(L, lua_gettop(L), fn);
  lua_pop(L, 1);
  return r;
}

static int64_t ignore_field(lua_State *L, int i, const char *fn) {
  int64_t v = KEEL_NO_IGNORE;
  if (lua_getfield(L, i, "ignore_index") != LUA_TNIL) {
    int isint;
    lua_Integer k = lua_tointegerx(L, -1, &isint);
    if (!isint) luaL_error(L, "%s: option ignore_index must be an integer, got %s", fn, luaL_typename(L, -1));
    if ((int64_t)k == KEEL_NO_IGNORE) luaL_error(L, "%s: option ignore_index is out of range", fn);
    v = (int64_t)k;
  }
  lua_pop(L, 1);
  return v;
}

/* A number at i, or field key of a table at i, or def when nil. */
static double num_or_field(lua_State *L, int i, const char *fn, const char *key, const char *const *known,
                           double def) {
  if (lua_type(L, i) == LUA_TNUMBER) return lua_tonumber(L, i);
  if (!opts_at(L, i, fn, known)) return def;
  return num_field(L, i, fn, key, def);
}

/* }====================================================================== */

/* {======================================================================
** Activations
** ======================================================================= */

#define RET(call) do { \
    keel_tensor *out_; \
    keel_status st_ = (call); \
    lk_check(L, S, st_); \
    lk_push(L, S, out_); \
    return 1; \
  } while (0)

static int l_leaky_relu(lua_State *L) {
  static const char *const known[] = {"negative_slope", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "leaky_relu");
  double slope = num_or_field(L, 2, "leaky_relu", "negative_slope", known, 0.01);
  RET(keel_leaky_relu(S->ctx, x, slope, &out_));
}

static int l_elu(lua_State *L) {
  static const char *const known[] = {"alpha", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "elu");
  double alpha = num_or_field(L, 2, "elu", "alpha", known, 1.0);
  RET(keel_elu(S->ctx, x, alpha, &out_));
}

static int gelu_mode(lua_State *L, int i) {
  const char *s = lua_tostring(L, i);
  if (lua_type(L, i) == LUA_TSTRING && !strcmp(s, "tanh")) return 1;
  if (lua_type(L, i) == LUA_TSTRING && !strcmp(s, "none")) return 0;
  if (lua_type(L, i) == LUA_TSTRING) luaL_error(L, "gelu: approximate must be \"none\" or \"tanh\", got \"%s\"", s);
  luaL_error(L, "gelu: approximate must be \"none\" or \"tanh\", got %s", luaL_typename(L, i));
  return 0;
}

static int l_gelu(lua_State *L) {
  static const char *const known[] = {"approximate", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "gelu");
  int approx = 0;
  if (lua_type(L, 2) == LUA_TSTRING) {
    approx = gelu_mode(L, 2);
  } else if (opts_at(L, 2, "gelu", known)) {
    if (lua_getfield(L, 2, "approximate") != LUA_TNIL) approx = gelu_mode(L, lua_gettop(L));
    lua_pop(L, 1);
  }
  RET(keel_gelu(S->ctx, x, approx, &out_));
}

static int l_silu(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "silu");
  RET(keel_silu(S->ctx, x, &out_));
}

/* softplus(x [, beta [, threshold]]) or softplus(x, {beta =, threshold =}) */
static int l_softplus(lua_State *L) {
  static const char *const known[] = {"beta", "threshold", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "softplus");
  double beta = 1, threshold = 20;
  if (lua_type(L, 2) == LUA_TNUMBER) {
    beta = lua_tonumber(L, 2);
    threshold = luaL_optnumber(L, 3, 20);
  } else if (opts_at(L, 2, "softplus", known)) {
    beta = num_field(L, 2, "softplus", "beta", 1);
    threshold = num_field(L, 2, "softplus", "threshold", 20);
  }
  RET(keel_softplus(S->ctx, x, beta, threshold, &out_));
}

/* dim defaults to the last one (PyTorch's implicit choice is deprecated). */
static int l_softmax(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "softmax");
  RET(keel_softmax(S->ctx, x, lk_opt_dim(L, 2, "softmax", -1), &out_));
}

static int l_log_softmax(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "log_softmax");
  RET(keel_log_softmax(S->ctx, x, lk_opt_dim(L, 2, "log_softmax", -1), &out_));
}

/* }====================================================================== */

/* {======================================================================
** Losses
** ======================================================================= */

/* The reduction of a loss's trailing argument: a string or opts.reduction. */
static keel_reduction trailing_reduction(lua_State *L, int i, const char *fn, const char *const *known) {
  if (lua_type(L, i) == LUA_TSTRING) return to_reduction(L, i, fn);
  return reduction_field(L, opts_at(L, i, fn, known) ? i : 0, fn);
}

static int l_mse_loss(lua_State *L) {
  static const char *const known[] = {"reduction", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "mse_loss"), *y = lk_check_tensor(L, 2, "mse_loss");
  keel_reduction r = trailing_reduction(L, 3, "mse_loss", known);
  RET(keel_mse_loss(S->ctx, x, y, r, &out_));
}

static int l_l1_loss(lua_State *L) {
  static const char *const known[] = {"reduction", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "l1_loss"), *y = lk_check_tensor(L, 2, "l1_loss");
  keel_reduction r = trailing_reduction(L, 3, "l1_loss", known);
  RET(keel_l1_loss(S->ctx, x, y, r, &out_));
}

static int l_smooth_l1_loss(lua_State *L) {
  static const char *const known[] = {"beta", "reduction", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "smooth_l1_loss"), *y = lk_check_tensor(L, 2, "smooth_l1_loss");
  keel_reduction r = trailing_reduction(L, 3, "smooth_l1_loss", known);
  double beta = lua_istable(L, 3) ? num_field(L, 3, "smooth_l1_loss", "beta", 1.0) : 1.0;
  RET(keel_smooth_l1_loss(S->ctx, x, y, beta, r, &out_));
}

static int l_huber_loss(lua_State *L) {
  static const char *const known[] = {"delta", "reduction", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "huber_loss"), *y = lk_check_tensor(L, 2, "huber_loss");
  keel_reduction r = trailing_reduction(L, 3, "huber_loss", known);
  double delta = lua_istable(L, 3) ? num_field(L, 3, "huber_loss", "delta", 1.0) : 1.0;
  RET(keel_huber_loss(S->ctx, x, y, delta, r, &out_));
}

static int l_cross_entropy(lua_State *L) {
  static const char *const known[] = {"weight", "ignore_index", "label_smoothing", "reduction", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "cross_entropy"), *t = lk_check_tensor(L, 2, "cross_entropy");
  keel_tensor *w = NULL;
  int64_t ignore = KEEL_NO_IGNORE;
  double smoothing = 0;
  keel_reduction r = trailing_reduction(L, 3, "cross_entropy", known);
  if (lua_istable(L, 3)) {
    w = tensor_field(L, 3, "cross_entropy", "weight");
    ignore = ignore_field(L, 3, "cross_entropy");
    smoothing = num_field(L, 3, "cross_entropy", "label_smoothing", 0);
  }
  RET(keel_cross_entropy(S->ctx, x, t, w, ignore, smoothing, r, &out_));
}

static int l_nll_loss(lua_State *L) {
  static const char *const known[] = {"weight", "ignore_index", "reduction", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, "nll_loss"), *t = lk_check_tensor(L, 2, "nll_loss");
  keel_tensor *w = NULL;
  int64_t ignore = KEEL_NO_IGNORE;
  keel_reduction r = trailing_reduction(L, 3, "nll_loss", known);
  if (lua_istable(L, 3)) {
    w = tensor_field(L, 3, "nll_loss", "weight");
    ignore = ignore_field(L, 3, "nll_loss");
  }
  RET(keel_nll_loss(S->ctx, x, t, w, ignore, r, &out_));
}

static int l_bce_with_logits(lua_State *L) {
  static const char *const fn = "binary_cross_entropy_with_logits";
  static const char *const known[] = {"weight", "pos_weight", "reduction", NULL};
  lk_state *S = lk_S(L);
  keel_tensor *x = lk_check_tensor(L, 1, fn), *y = lk_check_tensor(L, 2, fn);
  keel_tensor *w = NULL, *pw = NULL;
  keel_reduction r = trailing_reduction(L, 3, fn, known);
  if (lua_istable(L, 3)) {
    w = tensor_field(L, 3, fn, "weight");
    pw = tensor_field(L, 3, fn, "pos_weight");
  }
  RET(keel_binary_cross_entropy_with_logits(S->ctx, x, y, w, pw, r, &out_));
}

/* }====================================================================== */

static const luaL_Reg nn_fns[] = {
  {"leaky_relu", l_leaky_relu}, {"elu", l_elu}, {"gelu", l_gelu}, {"silu", l_silu},
  {"softplus", l_softplus}, {"softmax", l_softmax}, {"log_softmax", l_log_softmax},
  {"mse_loss", l_mse_loss}, {"l1_loss", l_l1_loss}, {"smooth_l1_loss", l_smooth_l1_loss},
  {"huber_loss", l_huber_loss}, {"cross_entropy", l_cross_entropy}, {"nll_loss", l_nll_loss},
  {"binary_cross_entropy_with_logits", l_bce_with_logits},
  {NULL, NULL},
};

static const luaL_Reg tensor_methods[] = {
  {"softmax", l_softmax}, {"log_softmax", l_log_softmax},
  {NULL, NULL},
};

void lk_open_act(lua_State *L, int state, int mt) {
  lk_register(L, state, mt, nn_fns);
  /* t:softmax(dim), t:log_softmax(dim): into the Tensor method table */
  lua_getfield(L, mt, "__methods");
  lk_register(L, state, mt, tensor_methods);
  lua_pop(L, 1);
}
