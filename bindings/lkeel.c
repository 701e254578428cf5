/*
** lkeel.c: the keel.core Lua module. One engine context per Lua state,
** owned by a userdata in the registry; module-level functions (creation,
** grad mode, joining, memory) and the helpers the other binding files use.
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lkeel.h"

#define LK_STATE_KEY "keel.state"
#define LK_MT_KEY "keel.Tensor"

/* Engine bytes reported to Lua's GC at once: small enough that garbage
** tensors die promptly, large enough that a tiny op never pays for a step. */
#define LK_GC_BATCH (256 * 1024)
/* What a handle costs beside its data, as far as the GC should know. */
#define LK_HANDLE_COST 256
/* Floor of the live-bytes ceiling that forces a full collection. */
#define LK_GC_FLOOR ((size_t)64 << 20)

/* {======================================================================
** Shared helpers
** ======================================================================= */

void lk_check(lua_State *L, lk_state *S, keel_status st) {
  if (st == KEEL_OK) return;
  if (st == KEEL_ERR_CALLBACK && S->hook_error_ref != LUA_NOREF) {
    /* re-raise what the hook raised, traceback included */
    lua_rawgeti(L, LUA_REGISTRYINDEX, S->hook_error_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, S->hook_error_ref);
    S->hook_error_ref = LUA_NOREF;
    lua_error(L);
  }
  /* prefixed with the caller's position, like luaL_error */
  luaL_where(L, 1);
  lua_pushstring(L, keel_last_error(S->ctx));
  lua_concat(L, 2);
  lua_error(L);
}

void lk_check_as(lua_State *L, lk_state *S, keel_status st, const char *fn) {
  const char *msg, *colon;
  if (st == KEEL_OK) return;
  msg = keel_last_error(S->ctx);
  colon = strchr(msg, ':');
  /* the engine names the function it implements; the user called fn */
  if (st != KEEL_ERR_CALLBACK && colon && !memchr(msg, ' ', (size_t)(colon - msg)) &&
      (strlen(fn) != (size_t)(colon - msg) || strncmp(msg, fn, (size_t)(colon - msg)))) {
    luaL_where(L, 1);
    lua_pushfstring(L, "%s%s", fn, colon);
    lua_concat(L, 2);
    lua_error(L);
  }
  lk_check(L, S, st);
}

void lk_push(lua_State *L, lk_state *S, keel_tensor *t) {
  lk_tensor *u;
  if (!t) { lua_pushnil(L); return; }
  u = (lk_tensor *)lua_newuserdatauv(L, sizeof *u, 0);
  u->t = t;
  lua_pushvalue(L, LK_MT_UV);
  lua_setmetatable(L, -2);
  if (S->anomaly) lk_anomaly_pushed(L, S, t);
  /* The GC sees only the small userdata: tell it about the engine memory
  ** so that dropped tensors are collected at the pace they are made. */
  S->gc_debt += (size_t)keel_tensor_numel(t) * keel_dtype_size(keel_tensor_dtype(t)) + LK_HANDLE_COST;
  if (S->gc_debt >= LK_GC_BATCH) {
    keel_memory_stats m;
    int kb = (int)(S->gc_debt / 1024);
    S->gc_debt = 0;
    lua_gc(L, LUA_GCSTEP, kb);
    /* Backstop for a host that runs the generational collector: there,
    ** tensors that outlive a minor collection wait for a major one, which
    ** Lua's own (small) heap never triggers. */
    keel_cuda_memory_stats cm;
    size_t live;
    keel_memory_stats_get(S->ctx, &m);
    keel_cuda_memory_stats_get(S->ctx, &cm);   /* device memory must not wait for the GC either */
    live = m.live_bytes + cm.allocated_bytes;
    if (live > S->gc_ceiling) {
      lua_gc(L, LUA_GCCOLLECT);
      keel_memory_stats_get(S->ctx, &m);
      keel_cuda_memory_stats_get(S->ctx, &cm);
      live = m.live_bytes + cm.allocated_bytes;
      S->gc_ceiling = 2 * live > LK_GC_FLOOR ? 2 * live : LK_GC_FLOOR;
    }
  }
}

keel_tensor *lk_to(lua_State *L, int i) {
  lk_tensor *u = (lk_tensor *)lua_touserdata(L, i);
  int same;
  if (!u || !lua_getmetatable(L, i)) return NULL;
  same = lua_rawequal(L, -1, LK_MT_UV);
  lua_pop(L, 1);
  return same ? u->t : NULL;
}

void lk_setnum(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

void lk_setint(lua_State *L, const char *k, int64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

int lk_traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

const char *lk_typename(lua_State *L, int i) {
  if (lua_type(L, i) == LUA_TUSERDATA && lua_getmetatable(L, i)) {
    int same = lua_rawequal(L, -1, LK_MT_UV);
    lua_pop(L, 1);
    if (same) return "closed keel.Tensor";
  }
  return luaL_typename(L, i);
}

keel_tensor *lk_check_tensor(lua_State *L, int i, const char *fn) {
  keel_tensor *t = lk_to(L, i);
  if (t) return t;
  if (lua_type(L, i) == LUA_TUSERDATA && lua_getmetatable(L, i)) {
    int same = lua_rawequal(L, -1, LK_MT_UV);
    lua_pop(L, 1);
    if (same) luaL_error(L, "%s: argument #%d: tensor is closed", fn, i);
  }
  luaL_error(L, "%s: argument #%d: expected a keel.Tensor, got %s", fn, i, luaL_typename(L, i));
  return NULL;
}

static int to_dim(lua_State *L, int i, const char *fn, lua_Integer d) {
  if (d == 0) luaL_error(L, "%s: argument #%d: dimension 0 is invalid (dimensions are 1-based)", fn, i);
  if (d > 64 || d < -64) luaL_error(L, "%s: argument #%d: dimension %I out of range", fn, i, (lua_Integer)d);
  return d > 0 ? (int)d - 1 : (int)d;
}

int lk_check_dim(lua_State *L, int i, const char *fn) {
  int isint;
  lua_Integer d = lua_tointegerx(L, i, &isint);
  if (!isint) luaL_error(L, "%s: argument #%d: expected a dimension (integer), got %s", fn, i, luaL_typename(L, i));
  return to_dim(L, i, fn, d);
}

int lk_opt_dim(lua_State *L, int i, const char *fn, int def) {
  return lua_isnoneornil(L, i) ? def : lk_check_dim(L, i, fn);
}

int lk_opt_dims(lua_State *L, int i, const char *fn, int *dims) {
  int n = 0;
  if (lua_isnoneornil(L, i)) return 0;
  if (lua_type(L, i) == LUA_TNUMBER) {
    dims[0] = lk_check_dim(L, i, fn);
    return 1;
  }
  if (!lua_istable(L, i))
    luaL_error(L, "%s: argument #%d: expected a dimension or a table of dimensions, got %s", fn, i, luaL_typename(L, i));
  n = (int)luaL_len(L, i);
  if (n > KEEL_MAX_DIMS) luaL_error(L, "%s: argument #%d: too many dimensions", fn, i);
  for (int k = 0; k < n; k++) {
    int isint;
    lua_Integer d;
    lua_geti(L, i, k + 1);
    d = lua_tointegerx(L, -1, &isint);
    if (!isint) luaL_error(L, "%s: argument #%d: dimension %d is not an integer", fn, i, k + 1);
    dims[k] = to_dim(L, i, fn, d);
    lua_pop(L, 1);
  }
  return n;
}

static int64_t shape_entry(lua_State *L, int idx, const char *fn, int argi, int k) {
  int isint;
  lua_Integer v = lua_tointegerx(L, idx, &isint);
  if (!isint)
    luaL_error(L, "%s: argument #%d: size %d of the shape must be an integer, got %s", fn, argi, k + 1,
               luaL_typename(L, idx));
  if (v < 0 && v != -1) luaL_error(L, "%s: argument #%d: size %d of the shape is negative (%d)", fn, argi, k + 1, (int)v);
  return (int64_t)v;
}

int lk_check_shape(lua_State *L, int i, const char *fn, int64_t *shape, int *next) {
  int n = 0;
  if (lua_istable(L, i) && !lk_to(L, i)) {
    n = (int)luaL_len(L, i);
    if (n > KEEL_MAX_DIMS) luaL_error(L, "%s: argument #%d: %d dimensions, at most %d", fn, i, n, KEEL_MAX_DIMS);
    for (int k = 0; k < n; k++) {
      lua_geti(L, i, k + 1);
      shape[k] = shape_entry(L, -1, fn, i, k);
      lua_pop(L, 1);
    }
    if (next) *next = i + 1;
    return n;
  }
  while (lua_type(L, i + n) == LUA_TNUMBER) {
    if (n >= KEEL_MAX_DIMS) luaL_error(L, "%s: too many dimensions (at most %d)", fn, KEEL_MAX_DIMS);
    shape[n] = shape_entry(L, i + n, fn, i + n, n);
    n++;
  }
  if (n == 0 && !lua_istable(L, i))
    luaL_error(L, "%s: argument #%d: expected a shape (table or integers), got %s", fn, i, luaL_typename(L, i));
  if (next) *next = i + n;
  return n;
}

keel_dtype lk_check_dtype(lua_State *L, int i, const char *fn) {
  static const char *names[] = {"float32", "float64", "int64", "f32", "f64", "i64",
                                "float", "double", "long", NULL};
  static const keel_dtype vals[] = {KEEL_F32, KEEL_F64, KEEL_I64, KEEL_F32, KEEL_F64, KEEL_I64,
                                    KEEL_F32, KEEL_F64, KEEL_I64};
  const char *s = lua_tostring(L, i);
  if (s)
    for (int k = 0; names[k]; k++)
      if (!strcmp(s, names[k])) return vals[k];
  luaL_error(L, "%s: unknown dtype %s%s%s (expected \"float32\", \"float64\" or \"int64\")", fn,
             s ? "\"" : "", s ? s : luaL_typename(L, i), s ? "\"" : "");
  return KEEL_F32;
}

keel_dtype lk_opt_dtype_field(lua_State *L, int i, const char *fn, keel_dtype def) {
  keel_dtype dt = def;
  if (!lua_istable(L, i)) return def;
  if (lua_getfield(L, i, "dtype") != LUA_TNIL) dt = lk_check_dtype(L, -1, fn);
  lua_pop(L, 1);
  return dt;
}

int lk_to_device(const char *s, keel_device *dev) {
  if (!s) return -1;
  if (!strcmp(s, "cpu")) { *dev = KEEL_CPU; return 0; }
  if (!strcmp(s, "cuda") || !strcmp(s, "cuda:0")) { *dev = KEEL_CUDA; return 0; }
  if (!strncmp(s, "cuda:", 5) && s[5] >= '0' && s[5] <= '9') return 1;   /* another GPU: refused */
  return -1;
}

keel_device lk_check_device(lua_State *L, int i, const char *fn) {
  keel_device dev = KEEL_CPU;
  const char *s = lua_type(L, i) == LUA_TSTRING ? lua_tostring(L, i) : NULL;
  int r = lk_to_device(s, &dev);
  if (r == 1)
    luaL_error(L, "%s: device \"%s\": keel uses one GPU per process, \"cuda\" or \"cuda:0\" "
               "(choose which with CUDA_VISIBLE_DEVICES)", fn, s);
  if (r < 0)
    luaL_error(L, "%s: unknown device %s%s%s (expected \"cpu\", \"cuda\" or \"cuda:0\")", fn, s ? "\"" : "",
               s ? s : luaL_typename(L, i), s ? "\"" : "");
  return dev;
}

/* }====================================================================== */

/* {======================================================================
** Creation
** ======================================================================= */

/* Applies opts.requires_grad of the table at i to the tensor on top. */
static void apply_requires_grad(lua_State *L, lk_state *S, int i) {
  int on;
  if (!lua_istable(L, i)) return;
  lua_getfield(L, i, "requires_grad");
  on = lua_toboolean(L, -1);
  lua_pop(L, 1);
  if (on) lk_check(L, S, keel_set_requires_grad(S->ctx, lk_to(L, -1), 1));
}

/* Makes opts.device of the table at i (if any) the context's default
** device for one creation; returns the device to restore afterwards
** (with bit 8 set when opts named one). */
static int push_device(lua_State *L, lk_state *S, int i, const char *fn) {
  int prev = (int)keel_get_default_device(S->ctx);
  if (lua_istable(L, i)) {
    if (lua_getfield(L, i, "device") != LUA_TNIL) {
      keel_set_default_device(S->ctx, lk_check_device(L, -1, fn));
      prev |= 0x100;
    }
    lua_pop(L, 1);
  }
  return prev;
}

/* Ends a creation begun with push_device: restores, then raises or pushes.
** A device error on the default device that KEEL_DEVICE chose says so:
** the script may not mention a device anywhere. */
static void pop_device(lua_State *L, lk_state *S, int prev, keel_status st, const char *fn, keel_tensor *t) {
  keel_set_default_device(S->ctx, (keel_device)(prev & 0xff));
  if (st == KEEL_ERR_DEVICE && !(prev & 0x100) && S->device_env[0]) {
    const char *msg = keel_last_error(S->ctx), *colon = strchr(msg, ':');
    luaL_where(L, 1);
    lua_pushfstring(L, "%s%s (the default device, from KEEL_DEVICE=%s)", fn, colon ? colon : msg, S->device_env);
    lua_concat(L, 2);
    lua_error(L);
  }
  lk_check_as(L, S, st, fn);
  lk_push(L, S, t);
}

typedef keel_status (*shape_ctor)(keel_ctx *, keel_dtype, int, const int64_t *, keel_tensor **);

static int create(lua_State *L, const char *fn, shape_ctor ctor) {
  lk_state *S = lk_S(L);
  int64_t shape[KEEL_MAX_DIMS];
  int next, nd = lk_check_shape(L, 1, fn, shape, &next);
  keel_dtype dt = lk_opt_dtype_field(L, next, fn, KEEL_F32);
  int prev = push_device(L, S, next, fn);
  keel_tensor *t = NULL;
  keel_status st = ctor(S->ctx, dt, nd, shape, &t);
  pop_device(L, S, prev, st, fn, t);
  apply_requires_grad(L, S, next);
  return 1;
}

static int l_zeros(lua_State *L) { return create(L, "zeros", keel_zeros); }
static int l_ones(lua_State *L) { return create(L, "ones", keel_ones); }
static int l_empty(lua_State *L) { return create(L, "empty", keel_zeros); }
static int l_rand(lua_State *L) { return create(L, "rand", keel_rand); }
static int l_randn(lua_State *L) { return create(L, "randn", keel_randn); }

static int l_full(lua_State *L) {
  lk_state *S = lk_S(L);
  int64_t shape[KEEL_MAX_DIMS];
  int next, nd = lk_check_shape(L, 1, "full", shape, &next);
  double v = luaL_checknumber(L, next);
  keel_dtype dt = lk_opt_dtype_field(L, next + 1, "full", KEEL_F32);
  int prev = push_device(L, S, next + 1, "full");
  keel_tensor *t = NULL;
  keel_status st = keel_full(S->ctx, dt, nd, shape, v, &t);
  pop_device(L, S, prev, st, "full", t);
  apply_requires_grad(L, S, next + 1);
  return 1;
}

static int l_arange(lua_State *L) {
  lk_state *S = lk_S(L);
  int nnum = 0;
  double a[3];
  keel_tensor *t = NULL;
  keel_dtype dt = KEEL_F32;
  int prev;
  keel_status st;
  while (nnum < 3 && lua_type(L, nnum + 1) == LUA_TNUMBER) { a[nnum] = lua_tonumber(L, nnum + 1); nnum++; }
  if (nnum == 0) return luaL_error(L, "arange: expected arange([start,] stop [, step])");
  dt = lk_opt_dtype_field(L, nnum + 1, "arange", dt);
  prev = push_device(L, S, nnum + 1, "arange");
  if (nnum == 1) st = keel_arange(S->ctx, dt, 0, a[0], 1, &t);
  else st = keel_arange(S->ctx, dt, a[0], a[1], nnum == 3 ? a[2] : 1, &t);
  pop_device(L, S, prev, st, "arange", t);
  apply_requires_grad(L, S, nnum + 1);
  return 1;
}

static int l_linspace(lua_State *L) {
  lk_state *S = lk_S(L);
  double a = luaL_checknumber(L, 1), b = luaL_checknumber(L, 2);
  lua_Integer n = luaL_checkinteger(L, 3);
  keel_dtype dt = lk_opt_dtype_field(L, 4, "linspace", KEEL_F32);
  int prev = push_device(L, S, 4, "linspace");
  keel_tensor *t = NULL;
  keel_status st = keel_linspace(S->ctx, dt, a, b, n, &t);
  pop_device(L, S, prev, st, "linspace", t);
  return 1;
}

static int l_eye(lua_State *L) {
  lk_state *S = lk_S(L);
  lua_Integer n = luaL_checkinteger(L, 1);
  lua_Integer m = lua_type(L, 2) == LUA_TNUMBER ? luaL_checkinteger(L, 2) : n;
  int opt = lua_type(L, 2) == LUA_TNUMBER ? 3 : 2;
  keel_tensor *t = NULL;
  keel_dtype dt;
  int prev;
  keel_status st;
  if (n < 0 || m < 0) return luaL_error(L, "eye: sizes must be >= 0");
  dt = lk_opt_dtype_field(L, opt, "eye", KEEL_F32);
  prev = push_device(L, S, opt, "eye");
  st = keel_eye(S->ctx, dt, n, m, &t);
  pop_device(L, S, prev, st, "eye", t);
  return 1;
}

/* Shape of nested tables: descends first elements. */
static int data_shape(lua_State *L, int i, int64_t *shape) {
  int nd = 0;
  lua_pushvalue(L, i);
  while (lua_istable(L, -1) && !lk_to(L, -1)) {
    if (nd >= KEEL_MAX_DIMS) luaL_error(L, "tensor: data nested deeper than %d levels", KEEL_MAX_DIMS);
    shape[nd++] = (int64_t)luaL_len(L, -1);
    if (shape[nd - 1] == 0) break;
    lua_geti(L, -1, 1);
    lua_remove(L, -2);
  }
  lua_pop(L, 1);
  return nd;
}

/* Flattens the table at the top into buf, checking it is rectangular. */
static void data_fill(lua_State *L, int depth, int nd, const int64_t *shape, double *buf, int64_t *k) {
  if (depth == nd) {
    int t = lua_type(L, -1);
    if (t == LUA_TNUMBER) buf[(*k)++] = lua_tonumber(L, -1);
    else if (t == LUA_TBOOLEAN) buf[(*k)++] = lua_toboolean(L, -1);
    else luaL_error(L, "tensor: expected a number at depth %d, got %s", depth, luaL_typename(L, -1));
    return;
  }
  if (!lua_istable(L, -1) || (int64_t)luaL_len(L, -1) != shape[depth])
    luaL_error(L, "tensor: ragged data (expected %d elements at depth %d)", (int)shape[depth], depth + 1);
  for (int64_t j = 1; j <= shape[depth]; j++) {
    lua_geti(L, -1, j);
    data_fill(L, depth + 1, nd, shape, buf, k);
    lua_pop(L, 1);
  }
}

static int l_tensor(lua_State *L) {
  lk_state *S = lk_S(L);
  int64_t shape[KEEL_MAX_DIMS], n, k = 0;
  keel_dtype dt = lk_opt_dtype_field(L, 2, "tensor", KEEL_F32);
  keel_tensor *t, *src = lk_to(L, 1);
  double *buf;
  int nd;
  if (src) {  /* a copy outside any graph: on opts.device, in opts.dtype, else src's own */
    keel_tensor *d, *m;
    keel_device dev = keel_tensor_device(src);
    keel_status st;
    dt = lk_opt_dtype_field(L, 2, "tensor", keel_tensor_dtype(src));
    if (lua_istable(L, 2)) {
      if (lua_getfield(L, 2, "device") != LUA_TNIL) dev = lk_check_device(L, -1, "tensor");
      lua_pop(L, 1);
    }
    lk_check(L, S, keel_detach(S->ctx, src, &d));
    /* one copy for a change of device or dtype: the transfer is the copy;
    ** a dtype change too converts where the data lands */
    if (dev != keel_tensor_device(d))
      st = keel_to_device(S->ctx, d, dev, 1, &m);
    else
      st = keel_tensor_dtype(d) == dt ? keel_clone(S->ctx, d, &m) : keel_to_dtype(S->ctx, d, dt, &m);
    keel_tensor_release(d);
    lk_check_as(L, S, st, "tensor");
    if (keel_tensor_dtype(m) != dt) {
      st = keel_to_dtype(S->ctx, m, dt, &t);
      keel_tensor_release(m);
      lk_check_as(L, S, st, "tensor");
    } else {
      t = m;
    }
    lk_push(L, S, t);
    apply_requires_grad(L, S, 2);
    return 1;
  }
  if (lua_type(L, 1) != LUA_TNUMBER && lua_type(L, 1) != LUA_TBOOLEAN && !lua_istable(L, 1))
    return luaL_error(L, "tensor: argument #1: expected a number or a (nested) table of numbers, got %s",
                      luaL_typename(L, 1));
  nd = data_shape(L, 1, shape);
  n = 1;
  for (int i = 0; i < nd; i++) n *= shape[i];
  buf = (double *)lua_newuserdatauv(L, sizeof(double) * (size_t)(n ? n : 1), 0);  /* GC-owned scratch */
  lua_pushvalue(L, 1);
  data_fill(L, 0, nd, shape, buf, &k);
  lua_pop(L, 1);
  {
    int prev = push_device(L, S, 2, "tensor");
    keel_status st = keel_from_doubles(S->ctx, dt, nd, shape, buf, &t);
    lua_pop(L, 1);   /* buf */
    pop_device(L, S, prev, st, "tensor", t);
  }
  apply_requires_grad(L, S, 2);
  return 1;
}

/* keel.get_rng_state() -> 4 integers in a table (lossless: Lua integers
** are 64-bit); keel.set_rng_state(t) restores them. */
static int l_get_rng_state(lua_State *L) {
  uint64_t st[4];
  keel_rng_get_state(lk_S(L)->ctx, st);
  lua_createtable(L, 4, 0);
  for (int i = 0; i < 4; i++) {
    lua_pushinteger(L, (lua_Integer)st[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int l_set_rng_state(lua_State *L) {
  lk_state *S = lk_S(L);
  uint64_t st[4];
  luaL_checktype(L, 1, LUA_TTABLE);
  for (int i = 0; i < 4; i++) {
    int isint;
    lua_geti(L, 1, i + 1);
    st[i] = (uint64_t)lua_tointegerx(L, -1, &isint);
    if (!isint) return luaL_error(L, "set_rng_state: entry %d must be an integer (from get_rng_state)", i + 1);
    lua_pop(L, 1);
  }
  lk_check(L, S, keel_rng_set_state(S->ctx, st));
  return 0;
}

static int l_manual_seed(lua_State *L) {
  keel_manual_seed(lk_S(L)->ctx, (uint64_t)luaL_checkinteger(L, 1));
  return 0;
}

/* }====================================================================== */

/* {======================================================================
** Joining and multi-tensor functions
** ======================================================================= */

static int join(lua_State *L, const char *fn,
                keel_status (*f)(keel_ctx *, int, keel_tensor *const *, int, keel_tensor **)) {
  lk_state *S = lk_S(L);
  keel_tensor *local[32], **ts = local, *out;
  int n, dim;
  keel_status st;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = (int)luaL_len(L, 1);
  dim = lk_opt_dim(L, 2, fn, 0);
  if (n > 32) ts = (keel_tensor **)lua_newuserdatauv(L, sizeof *ts * (size_t)n, 0);
  for (int i = 0; i < n; i++) {
    lua_geti(L, 1, i + 1);
    ts[i] = lk_to(L, -1);
    if (!ts[i]) luaL_error(L, "%s: element %d of the list is not a keel.Tensor (got %s)", fn, i + 1, lk_typename(L, -1));
    lua_pop(L, 1);  /* still referenced by the list */
  }
  st = f(S->ctx, n, ts, dim, &out);
  lk_check(L, S, st);
  lk_push(L, S, out);
  return 1;
}

static int l_cat(lua_State *L) { return join(L, "cat", keel_cat); }
static int l_stack(lua_State *L) { return join(L, "stack", keel_stack); }

/* A tensor for argument i, making a 0-d one of dtype like on device dev
** from a number: the operands' device, not the default one (where(c, 0,
** x) on CPU tensors must work while CUDA is the default, and on CUDA ones
** while the CPU is). A made one is pushed: Lua owns it, so an error
** raised after it (the other operand, the op) leaks nothing. */
static keel_tensor *operand(lua_State *L, lk_state *S, int i, const char *fn, keel_dtype like, keel_device dev) {
  keel_tensor *t = lk_to(L, i);
  if (t) return t;
  if (lua_type(L, i) == LUA_TNUMBER) {
    keel_device prev = keel_set_default_device(S->ctx, dev);
    keel_status st = keel_full(S->ctx, like, 0, NULL, lua_tonumber(L, i), &t);
    keel_set_default_device(S->ctx, prev);
    lk_check(L, S, st);
    lk_push(L, S, t);
    return t;
  }
  return lk_check_tensor(L, i, fn);
}

static int l_where(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *c = lk_check_tensor(L, 1, "where"), *a, *b, *out;
  keel_tensor *ta = lk_to(L, 2), *tb = lk_to(L, 3);
  keel_dtype like = ta ? keel_tensor_dtype(ta) : tb ? keel_tensor_dtype(tb) : KEEL_F32;
  keel_device dev = keel_tensor_device(ta ? ta : tb ? tb : c);
  a = operand(L, S, 2, "where", like, dev);
  b = operand(L, S, 3, "where", like, dev);
  lk_check(L, S, keel_where(S->ctx, c, a, b, &out));
  lk_push(L, S, out);
  return 1;
}

/* }====================================================================== */

/* {======================================================================
** Grad mode, memory, introspection
** ======================================================================= */

static int l_set_grad_enabled(lua_State *L) {
  lua_pushboolean(L, keel_set_grad_enabled(lk_S(L)->ctx, lua_toboolean(L, 1)));
  return 1;
}

static int l_is_grad_enabled(lua_State *L) {
  lua_pushboolean(L, keel_is_grad_enabled(lk_S(L)->ctx));
  return 1;
}

static int l_memory_stats(lua_State *L) {
  keel_memory_stats m;
  keel_memory_stats_get(lk_S(L)->ctx, &m);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)m.live_bytes); lua_setfield(L, -2, "live_bytes");
  lua_pushinteger(L, (lua_Integer)m.peak_bytes); lua_setfield(L, -2, "peak_bytes");
  lua_pushinteger(L, (lua_Integer)m.cached_bytes); lua_setfield(L, -2, "cached_bytes");
  lua_pushinteger(L, (lua_Integer)m.live_tensors); lua_setfield(L, -2, "live_tensors");
  lua_pushinteger(L, (lua_Integer)m.allocs); lua_setfield(L, -2, "allocs");
  lua_pushinteger(L, (lua_Integer)m.cache_hits); lua_setfield(L, -2, "cache_hits");
  return 1;
}

static int l_memory_trim(lua_State *L) {
  keel_memory_trim(lk_S(L)->ctx);
  return 0;
}

/* keel.set_default_device(dev) -> the previous one: the device of the
** creation functions (KEEL_DEVICE sets it when keel loads). */
static int l_set_default_device(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_device prev = keel_set_default_device(S->ctx, lk_check_device(L, 1, "set_default_device"));
  lua_pushstring(L, keel_device_name(prev));
  return 1;
}

/* keel.set_float32_matmul_precision(p) -> the previous one. Names: keel's
** format names, and torch's ("high": TF32, "medium": bfloat16). */
static const char *const precision_names[] = {"highest", "tf32", "bfloat16", "float16", "high", "medium", NULL};
static const keel_matmul_precision precision_values[] = {KEEL_MATMUL_HIGHEST, KEEL_MATMUL_TF32, KEEL_MATMUL_BF16,
                                                         KEEL_MATMUL_F16, KEEL_MATMUL_TF32, KEEL_MATMUL_BF16};

static int l_set_matmul_precision(lua_State *L) {
  lk_state *S = lk_S(L);
  const char *name = luaL_checkstring(L, 1);
  for (int i = 0; precision_names[i]; i++)
    if (strcmp(name, precision_names[i]) == 0) {
      keel_matmul_precision prev = keel_set_matmul_precision(S->ctx, precision_values[i]);
      lua_pushstring(L, precision_names[prev]);
      return 1;
    }
  return luaL_error(L, "set_float32_matmul_precision: argument #1: expected \"highest\", \"tf32\" (\"high\"), "
                       "\"bfloat16\" (\"medium\") or \"float16\", got \"%s\"", name);
}

static int l_get_matmul_precision(lua_State *L) {
  lua_pushstring(L, precision_names[keel_get_matmul_precision(lk_S(L)->ctx)]);
  return 1;
}

static int l_get_default_device(lua_State *L) {
  lua_pushstring(L, keel_device_name(keel_get_default_device(lk_S(L)->ctx)));
  return 1;
}

static int l_ops(lua_State *L) {
  int n = keel_op_count();
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_pushstring(L, keel_op_name(i));
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int l_is_tensor(lua_State *L) {
  lua_pushboolean(L, lk_to(L, 1) != NULL);
  return 1;
}

/* }====================================================================== */

void lk_register(lua_State *L, int state, int mt, const luaL_Reg *fns) {
  for (; fns->name; fns++) {
    lua_pushvalue(L, state);
    lua_pushvalue(L, mt);
    lua_pushcclosure(L, fns->func, LK_NUPVALUES);
    lua_setfield(L, -2, fns->name);
  }
}

static int state_gc(lua_State *L) {
  lk_state *S = (lk_state *)lua_touserdata(L, 1);
  if (S->ctx) keel_ctx_free(S->ctx);  /* freed for real once its tensors are */
  S->ctx = NULL;
  return 0;
}

static const luaL_Reg module_fns[] = {
  {"tensor", l_tensor}, {"zeros", l_zeros}, {"ones", l_ones}, {"empty", l_empty},
  {"full", l_full}, {"arange", l_arange}, {"linspace", l_linspace}, {"eye", l_eye},
  {"rand", l_rand}, {"randn", l_randn}, {"manual_seed", l_manual_seed},
  {"get_rng_state", l_get_rng_state}, {"set_rng_state", l_set_rng_state},
  {"cat", l_cat}, {"stack", l_stack}, {"where", l_where},
  {"set_grad_enabled", l_set_grad_enabled}, {"is_grad_enabled", l_is_grad_enabled},
  {"memory_stats", l_memory_stats}, {"memory_trim", l_memory_trim},
  {"set_default_device", l_set_default_device}, {"get_default_device", l_get_default_device},
  {"set_float32_matmul_precision", l_set_matmul_precision}, {"get_float32_matmul_precision", l_get_matmul_precision},
  {"ops", l_ops}, {"is_tensor", l_is_tensor},
  {NULL, NULL},
};

#if defined(__GNUC__)
__attribute__((visibility("default")))
#endif
int luaopen_keel_core(lua_State *L);

int luaopen_keel_core(lua_State *L) {
  lk_state *S;
  keel_ctx *ctx;
  int state_i, mt_i;
  const char *env;
  keel_device dev = KEEL_CPU;
  /* one context per Lua state, shared by every require */
  if (lua_getfield(L, LUA_REGISTRYINDEX, LK_STATE_KEY) != LUA_TNIL) {
    lua_getfield(L, LUA_REGISTRYINDEX, "keel.module");
    return 1;
  }
  lua_pop(L, 1);
  /* checked before anything is made: a typo must not pass for "cpu" */
  env = getenv("KEEL_DEVICE");
  if (env && *env && lk_to_device(env, &dev) != 0)
    return luaL_error(L, "keel: KEEL_DEVICE=%s: expected cpu, cuda or cuda:0", env);
  if (keel_ctx_new(&ctx, NULL, NULL) != KEEL_OK) return luaL_error(L, "keel: cannot create a context (out of memory)");
  /* CUDA's availability is not checked here: the first tensor made says why it is not */
  keel_set_default_device(ctx, dev);
  keel_set_index_base(ctx, 1);
  S = (lk_state *)lua_newuserdatauv(L, sizeof *S, 0);
  memset(S, 0, sizeof *S);
  S->ctx = ctx;
  S->hook_error_ref = LUA_NOREF;
  S->gc_ceiling = LK_GC_FLOOR;
  if (dev != KEEL_CPU) snprintf(S->device_env, sizeof S->device_env, "%s", env);
  /* lua.c starts Lua in generational mode; the incremental collector is
  ** the one whose pace follows the engine memory reported in lk_push. */
  lua_gc(L, LUA_GCINC, 0, 0, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  S->main = lua_tothread(L, -1);
  lua_pop(L, 1);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, state_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, LK_STATE_KEY);      /* state */

  luaL_newmetatable(L, LK_MT_KEY);                         /* state mt */
  lua_newtable(L);                                         /* state mt module */
  lua_pushvalue(L, -3);
  lua_pushvalue(L, -3);
  luaL_setfuncs(L, module_fns, LK_NUPVALUES);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "_mt");                              /* the Tensor metatable */
  lua_pushliteral(L, KEEL_VERSION);
  lua_setfield(L, -2, "version");
  lk_open_tensor(L);                                       /* fills mt, adds module.Tensor */
  state_i = lua_absindex(L, -3);
  mt_i = lua_absindex(L, -2);
  (void)state_i; (void)mt_i;
  /* functional nn ops: keel.core._nn (keel.nn.functional in Lua) */
  lua_newtable(L);                                         /* state mt module nn */
  /* @open:conv */
  lk_open_conv(L, state_i, mt_i);
  /* @open:norm */
  lk_open_norm(L, state_i, mt_i);
  /* @open:act */
  lk_open_act(L, state_i, mt_i);
  /* @open:rnn */
  lk_open_rnn(L, state_i, mt_i);
  lua_setfield(L, -2, "_nn");
  /* optimizers and clipping: keel.core._optim */
  lua_newtable(L);
  /* @open:optim */
  lk_open_optim(L, state_i, mt_i);
  lua_setfield(L, -2, "_optim");
  /* datasets, loader, transforms: keel.core._data */
  lua_newtable(L);
  /* @open:data */
  lk_open_loader(L, state_i, mt_i);
  lk_open_dataset(L, state_i, mt_i);
  lua_setfield(L, -2, "_data");
  /* safetensors and checkpoints: keel.core._io */
  lua_newtable(L);
  /* @open:io */
  lk_open_io(L, state_i, mt_i);
  lua_setfield(L, -2, "_io");
  /* anomaly detection, post-accumulate hooks: keel.core._autograd */
  lua_newtable(L);
  /* @open:autograd */
  lk_open_autograd(L, state_i, mt_i);
  lua_setfield(L, -2, "_autograd");
  /* monitor: histograms, CRC32C, terminal, PNG: keel.core._summary */
  lua_newtable(L);
  /* @open:summary */
  lk_open_summary(L, state_i, mt_i);
  lua_setfield(L, -2, "_summary");
  /* CUDA devices and memory: keel.core._cuda (keel.cuda in Lua) */
  lua_newtable(L);
  /* @open:cuda */
  lk_open_cuda(L, state_i, mt_i);
  lua_setfield(L, -2, "_cuda");
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, "keel.module");
  return 1;
}
