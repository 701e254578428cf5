/*
** lkeel_autograd.c: keel.core._autograd, the C half of keel.autograd
** (bindings/keel/autograd.lua): anomaly mode, creation sites and the
** hand-over of anomaly events to Lua; Tensor:register_post_accumulate_grad_hook.
**
** Creation sites. While anomaly detection is on, lk_push stamps each new
** tape node with a site: the first Lua frame outside keel's own Lua files
** (the user's line that called the op, or their module's forward), plus
** the module scope that keel.autograd tracks. Sites are interned here, so
** a node carries a uint32 and the table grows with the number of distinct
** call sites, never with the number of ops. Full mode interns the whole
** traceback instead (debugging: costlier, and as many sites as call paths).
**
** Raising in forward. An event found in forward is raised as a Lua error
** in error mode, but not from inside lk_push: a binding that pushes
** several results (rnn: out, h_n, c_n) would leak the ones not pushed
** yet. Instead a one-shot return hook raises it as the binding returns
** (its C frame is gone then, its results belong to Lua), so the error
** comes from the op's call, caught by the pcall around it as any error of
** the op would be. The previous hook is put back first.
*/
#include <stdlib.h>
#include <string.h>
#include "lkeel.h"

#define LK_ANOMALY_KEY "keel.anomaly"

typedef struct site_slot {
  uint32_t hash, id, scope;
  int line;
  char *src;                   /* NULL: empty slot */
} site_slot;

typedef struct lk_anomaly {
  lk_state *S;
  site_slot *slots;
  uint32_t cap, used;          /* open addressing, power-of-two capacity */
  uint32_t n_sites;            /* ids handed out (both modes) */
  uint32_t scope;              /* current module scope (keel.autograd), 0: none */
  int full;
  char *skip;                  /* source prefix of keel's own Lua files, or NULL */
  size_t skip_len;
  int sites_ref;               /* id -> {where =, scope =, traceback =} */
  int tb_ref;                  /* full mode: key string -> id */
  int handler_ref;             /* keel.autograd's event handler */
  /* a forward error waiting for the caller's next instruction */
  int raise_ref, raise_depth;
  lua_Hook old_hook;
  int old_mask, old_count;
} lk_anomaly;

static lk_anomaly *get_anomaly(lua_State *L) {
  lk_anomaly *A;
  lua_getfield(L, LUA_REGISTRYINDEX, LK_ANOMALY_KEY);
  A = (lk_anomaly *)lua_touserdata(L, -1);
  lua_pop(L, 1);
  return A;
}

static int anomaly_gc(lua_State *L) {
  lk_anomaly *A = (lk_anomaly *)lua_touserdata(L, 1);
  if (A->slots) {
    for (uint32_t i = 0; i < A->cap; i++) free(A->slots[i].src);
    free(A->slots);
    A->slots = NULL;
  }
  free(A->skip);
  A->skip = NULL;
  if (A->S && A->S->an == A) {
    A->S->an = NULL;
    A->S->anomaly = 0;
  }
  return 0;
}

/* {======================================================================
** Sites
** ======================================================================= */

static uint32_t hash_site(const char *s, int line, uint32_t scope) {
  uint32_t h = 2166136261u;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
  h = (h ^ (uint32_t)line) * 16777619u;
  h = (h ^ scope) * 16777619u;
  return h;
}

static int grow_slots(lk_anomaly *A) {
  uint32_t nc = A->cap ? A->cap * 2 : 64;
  site_slot *ns = (site_slot *)calloc(nc, sizeof *ns);
  if (!ns) return 0;
  for (uint32_t i = 0; i < A->cap; i++) {
    site_slot *o = &A->slots[i];
    uint32_t j;
    if (!o->src) continue;
    for (j = o->hash & (nc - 1); ns[j].src; j = (j + 1) & (nc - 1)) {}
    ns[j] = *o;
  }
  free(A->slots);
  A->slots = ns;
  A->cap = nc;
  return 1;
}

/* sites[id] = {where = "file:line", scope = scope, traceback = tb at -1 or nil} */
static void new_site_info(lua_State *L, lk_anomaly *A, uint32_t id, const lua_Debug *ar, int has_tb) {
  int tb = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, A->sites_ref);
  lua_createtable(L, 0, 3);
  lua_pushfstring(L, "%s:%d", ar->short_src, ar->currentline);
  lua_setfield(L, -2, "where");
  lua_pushinteger(L, A->scope);
  lua_setfield(L, -2, "scope");
  if (has_tb) {
    lua_pushvalue(L, tb);
    lua_setfield(L, -2, "traceback");
  }
  lua_rawseti(L, -2, id);
  lua_pop(L, 1);
}

static uint32_t intern(lua_State *L, lk_anomaly *A, const lua_Debug *ar, int level) {
  uint32_t h, j, id;
  if (A->full) {
    /* key: scope and the whole traceback from the site down */
    lua_rawgeti(L, LUA_REGISTRYINDEX, A->tb_ref);
    luaL_traceback(L, L, NULL, level);
    lua_pushfstring(L, "%d|%s", (int)A->scope, lua_tostring(L, -1));
    if (lua_rawget(L, -3) == LUA_TNUMBER) {
      id = (uint32_t)lua_tointeger(L, -1);
      lua_pop(L, 3);
      return id;
    }
    lua_pop(L, 1);
    id = ++A->n_sites;
    lua_pushfstring(L, "%d|%s", (int)A->scope, lua_tostring(L, -1));
    lua_pushinteger(L, id);
    lua_rawset(L, -4);
    new_site_info(L, A, id, ar, 1);
    lua_pop(L, 2);
    return id;
  }
  h = hash_site(ar->source, ar->currentline, A->scope);
  if (A->cap) {
    for (j = h & (A->cap - 1); A->slots[j].src; j = (j + 1) & (A->cap - 1)) {
      site_slot *s = &A->slots[j];
      if (s->hash == h && s->line == ar->currentline && s->scope == A->scope && !strcmp(s->src, ar->source))
        return s->id;
    }
  }
  if ((A->used + 1) * 2 > A->cap && !grow_slots(A)) return 0;
  for (j = h & (A->cap - 1); A->slots[j].src; j = (j + 1) & (A->cap - 1)) {}
  {
    size_t n = strlen(ar->source) + 1;
    char *copy = (char *)malloc(n);
    if (!copy) return 0;
    memcpy(copy, ar->source, n);
    id = ++A->n_sites;
    A->slots[j].hash = h;
    A->slots[j].line = ar->currentline;
    A->slots[j].scope = A->scope;
    A->slots[j].id = id;
    A->slots[j].src = copy;
    A->used++;
  }
  new_site_info(L, A, id, ar, 0);
  return id;
}

/* The site of the op being pushed: the first Lua frame outside keel's own
** Lua files, else the first Lua frame; 0 when there is none. */
static uint32_t current_site(lua_State *L, lk_anomaly *A) {
  lua_Debug ar, first;
  int level, first_level = -1;
  for (level = 0; lua_getstack(L, level, &ar); level++) {
    if (!lua_getinfo(L, "Sl", &ar) || ar.currentline <= 0) continue;   /* C, or no line info */
    if (first_level < 0) { first = ar; first_level = level; }
    if (A->skip && !strncmp(ar.source, A->skip, A->skip_len)) continue;
    return intern(L, A, &ar, level);
  }
  return first_level < 0 ? 0 : intern(L, A, &first, first_level);
}

/* }====================================================================== */

/* {======================================================================
** Events
** ======================================================================= */

static void push_event(lua_State *L, const keel_anomaly_event *ev, uint32_t site) {
  lua_createtable(L, 0, 12);
  lua_pushstring(L, ev->backward ? "backward" : "forward");
  lua_setfield(L, -2, "phase");
  lua_pushstring(L, keel_op_name(ev->op));
  lua_setfield(L, -2, "op");
  lua_pushstring(L, ev->cause == KEEL_ANOMALY_INPUT ? "input" : "op");
  lua_setfield(L, -2, "cause");
  if (ev->input >= 0) lk_setint(L, "input", ev->input + 1);
  if (site) lk_setint(L, "site", site);
  lk_setint(L, "nan", ev->nan);
  lk_setint(L, "inf", ev->inf);
  lk_setint(L, "numel", ev->numel);
  lua_createtable(L, ev->n_in, 0);
  for (int k = 0; k < ev->n_in; k++) {
    lua_createtable(L, ev->in_ndim[k], 0);
    for (int d = 0; d < ev->in_ndim[k]; d++) {
      lua_pushinteger(L, (lua_Integer)ev->in_shape[k][d]);
      lua_rawseti(L, -2, d + 1);
    }
    lua_rawseti(L, -2, k + 1);
  }
  lua_setfield(L, -2, "shapes");
  lua_createtable(L, ev->n_in, 0);
  for (int k = 0; k < ev->n_in; k++) {
    lua_pushinteger(L, ev->in_index[k] + 1);
    lua_rawseti(L, -2, k + 1);
  }
  lua_setfield(L, -2, "inputs");
  if (ev->has_stats) {
    if (ev->backward) {
      lua_createtable(L, 0, 2);
      lk_setnum(L, "min", ev->grad_min);
      lk_setnum(L, "max", ev->grad_max);
      lua_setfield(L, -2, "grad_stats");
    } else {
      lua_createtable(L, ev->n_in, 0);
      for (int k = 0; k < ev->n_in; k++) {
        lua_createtable(L, 0, 3);
        lk_setnum(L, "min", ev->in_min[k]);
        lk_setnum(L, "max", ev->in_max[k]);
        lk_setint(L, "nonfinite", ev->in_nonfinite[k]);
        lua_rawseti(L, -2, k + 1);
      }
      lua_setfield(L, -2, "stats");
    }
  }
}

/* Takes the pending event and calls the Lua handler with it. Returns 1
** with a message on the stack when it is to be raised. */
static int deliver(lua_State *L, lk_state *S, lk_anomaly *A, uint32_t fallback) {
  keel_anomaly_event ev;
  int base;
  if (!keel_anomaly_take(S->ctx, &ev)) return 0;
  if (A->handler_ref == LUA_NOREF) return 0;
  luaL_checkstack(L, 8, "anomaly");
  lua_pushcfunction(L, lk_traceback);
  base = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, A->handler_ref);
  push_event(L, &ev, ev.site ? ev.site : fallback);
  if (lua_pcall(L, 1, 1, base) != LUA_OK || lua_type(L, -1) == LUA_TSTRING) {
    lua_remove(L, base);
    return 1;
  }
  lua_pop(L, 2);
  return 0;
}

int lk_anomaly_deliver(lua_State *L, lk_state *S) {
  return S->an ? deliver(L, S, S->an, 0) : 0;
}

/* Frames on L's stack (the running function included). */
static int stack_depth(lua_State *L) {
  lua_Debug ar;
  int lo = 0, hi = 1;
  while (lua_getstack(L, hi, &ar)) { lo = hi; hi *= 2; }
  while (lo + 1 < hi) {   /* level lo exists, hi does not */
    int mid = (lo + hi) / 2;
    if (lua_getstack(L, mid, &ar)) lo = mid; else hi = mid;
  }
  return lo + 1;
}

/* The return hook: raises when the binding that armed it returns (its
** frame is gone by then, everything it pushed is owned by Lua). */
static void raise_hook(lua_State *L, lua_Debug *ar) {
  lk_anomaly *A = get_anomaly(L);
  if (!A || A->raise_ref == LUA_NOREF) return;
  if (ar->event != LUA_HOOKRET || stack_depth(L) != A->raise_depth) return;   /* a nested call */
  lua_sethook(L, A->old_hook, A->old_mask, A->old_count);
  lua_rawgeti(L, LUA_REGISTRYINDEX, A->raise_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, A->raise_ref);
  A->raise_ref = LUA_NOREF;
  lua_error(L);
}

/* The message at -1 is raised when the running C function returns. */
static void raise_after_return(lua_State *L, lk_anomaly *A) {
  if (A->raise_ref != LUA_NOREF) {
    if (lua_gethook(L) == raise_hook) {   /* one is on its way already */
      lua_pop(L, 1);
      return;
    }
    /* its hook was replaced (a debugger, the REPL's Ctrl-C) or its thread
    ** ended: drop it */
    luaL_unref(L, LUA_REGISTRYINDEX, A->raise_ref);
  }
  A->raise_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  A->raise_depth = stack_depth(L);
  A->old_hook = lua_gethook(L);
  A->old_mask = lua_gethookmask(L);
  A->old_count = lua_gethookcount(L);
  lua_sethook(L, raise_hook, LUA_MASKRET, 0);
}

void lk_anomaly_pushed(lua_State *L, lk_state *S, keel_tensor *t) {
  lk_anomaly *A = S->an;
  uint32_t site = 0;
  int need = keel_anomaly_unstamped(t), pending = keel_anomaly_pending(S->ctx);
  if (!A || (!need && !pending)) return;
  site = current_site(L, A);
  if (need) keel_anomaly_stamp(S->ctx, t, site);   /* out of memory: the site stays unknown */
  if (pending && deliver(L, S, A, site)) raise_after_return(L, A);
}

/* }====================================================================== */

/* {======================================================================
** keel.core._autograd
** ======================================================================= */

static lk_anomaly *A_of(lua_State *L) {
  lk_anomaly *A = lk_S(L)->an;
  if (!A) luaL_error(L, "autograd: the binding state is closed");
  return A;
}

/* set_mode("off" | "error" | "warn" | "record", full) */
static int l_set_mode(lua_State *L) {
  static const char *names[] = {"off", "error", "warn", "record", NULL};
  lk_state *S = lk_S(L);
  lk_anomaly *A = A_of(L);
  int mode = luaL_checkoption(L, 1, NULL, names);
  A->full = lua_toboolean(L, 2);
  keel_anomaly_set_mode(S->ctx, (keel_anomaly_mode)mode, A->full);
  S->anomaly = mode != KEEL_ANOMALY_OFF;
  return 0;
}

static int l_get_mode(lua_State *L) {
  static const char *names[] = {"off", "error", "warn", "record"};
  lua_pushstring(L, names[keel_anomaly_get_mode(lk_S(L)->ctx)]);
  lua_pushboolean(L, A_of(L)->full);
  return 2;
}

static int l_set_scope(lua_State *L) {
  A_of(L)->scope = (uint32_t)luaL_checkinteger(L, 1);
  return 0;
}

static int l_set_handler(lua_State *L) {
  lk_anomaly *A = A_of(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, A->handler_ref);
  A->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* Frames whose source starts with prefix (keel's own Lua files) are not
** creation sites. */
static int l_set_skip(lua_State *L) {
  lk_anomaly *A = A_of(L);
  size_t n;
  const char *s = luaL_optlstring(L, 1, NULL, &n);
  char *copy = NULL;
  if (s && n) {
    copy = (char *)malloc(n + 1);
    if (!copy) return luaL_error(L, "autograd: out of memory");
    memcpy(copy, s, n + 1);
  }
  free(A->skip);
  A->skip = copy;
  A->skip_len = copy ? n : 0;
  return 0;
}

static int l_sites(lua_State *L) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, A_of(L)->sites_ref);
  return 1;
}

static int l_site_count(lua_State *L) {
  lua_pushinteger(L, A_of(L)->n_sites);
  return 1;
}

static int l_site_of(lua_State *L) {
  keel_tensor *t = lk_check_tensor(L, 1, "site_of");
  uint32_t id = keel_anomaly_site(t);
  if (id) lua_pushinteger(L, id); else lua_pushnil(L);
  return 1;
}

/* Delivers a pending event now (keel.autograd.anomaly()); never raises:
** an error due in mode "error" belongs to the op's call. */
static int l_flush(lua_State *L) {
  if (lk_anomaly_deliver(L, lk_S(L))) lua_pop(L, 1);
  return 0;
}

/* The engine handle of a tensor, as a light userdata: the key under which
** post-accumulate-grad hooks are found after backward. */
static int l_ptr(lua_State *L) {
  lua_pushlightuserdata(L, lk_check_tensor(L, 1, "autograd"));
  return 1;
}

/* set_post_hooks(t): the table t_backward reads (see lkeel_tensor.c). */
static int l_set_post_hooks(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, "keel.post_hooks");
  return 0;
}

static int l_count_nonfinite(lua_State *L) {
  lk_state *S = lk_S(L);
  int64_t nan, inf;
  lk_check(L, S, keel_count_nonfinite(S->ctx, lk_check_tensor(L, 1, "count_nonfinite"), &nan, &inf));
  lua_pushinteger(L, (lua_Integer)nan);
  lua_pushinteger(L, (lua_Integer)inf);
  return 2;
}

/* Tensor:register_post_accumulate_grad_hook(fn): checked here, kept by
** keel.autograd (a registry of Lua tables, with keel.hooks handles). */
static int t_register_post_hook(lua_State *L) {
  static const char *fn = "register_post_accumulate_grad_hook";
  keel_tensor *t = lk_check_tensor(L, 1, fn);
  if (lua_type(L, 2) != LUA_TFUNCTION)
    return luaL_error(L, "%s: argument #1: expected a function, got %s", fn, luaL_typename(L, 2));
  if (!keel_is_leaf(t) || !keel_requires_grad(t))
    return luaL_error(L, "%s: expected a leaf tensor that requires grad, got %s", fn,
                      keel_is_leaf(t) ? "a tensor that does not require grad" : "a non-leaf tensor");
  lua_settop(L, 2);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "keel.autograd");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "_register_post_hook");
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_call(L, 2, 1);
  return 1;
}

static const luaL_Reg fns[] = {
  {"set_mode", l_set_mode}, {"get_mode", l_get_mode}, {"set_scope", l_set_scope},
  {"set_handler", l_set_handler}, {"set_skip", l_set_skip}, {"sites", l_sites},
  {"site_count", l_site_count}, {"site_of", l_site_of}, {"flush", l_flush}, {"ptr", l_ptr},
  {"count_nonfinite", l_count_nonfinite}, {"set_post_hooks", l_set_post_hooks},
  {NULL, NULL},
};

void lk_open_autograd(lua_State *L, int state, int mt) {
  lk_state *S = (lk_state *)lua_touserdata(L, state);
  lk_anomaly *A = (lk_anomaly *)lua_newuserdatauv(L, sizeof *A, 0);
  memset(A, 0, sizeof *A);
  A->S = S;
  A->handler_ref = A->raise_ref = LUA_NOREF;
  lua_newtable(L);
  A->sites_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_newtable(L);
  A->tb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, anomaly_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_setfield(L, LUA_REGISTRYINDEX, LK_ANOMALY_KEY);
  S->an = A;
  lk_register(L, state, mt, fns);
  /* the Tensor method */
  lua_getfield(L, mt, "__methods");
  lua_pushvalue(L, state);
  lua_pushvalue(L, mt);
  lua_pushcclosure(L, t_register_post_hook, LK_NUPVALUES);
  lua_setfield(L, -2, "register_post_accumulate_grad_hook");
  lua_pop(L, 1);
}

/* }====================================================================== */
