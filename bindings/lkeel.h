/*
** lkeel.h: what the binding files share. The only longjmp in keel starts
** here: engine calls return a status, and lk_check turns a failure into a
** Lua error after the engine has returned.
**
** Every binding function is a closure with two upvalues: the binding state
** (full userdata holding the engine context) and the Tensor metatable.
*/
#ifndef LKEEL_H
#define LKEEL_H

#include <lua.h>
#include <lauxlib.h>
#include "keel.h"

#if defined(__GNUC__)
#define LK_INTERNAL __attribute__((visibility("hidden"))) extern
#else
#define LK_INTERNAL extern
#endif

#define LK_STATE_UV lua_upvalueindex(1)
#define LK_MT_UV lua_upvalueindex(2)
#define LK_NUPVALUES 2

typedef struct lk_state {
  keel_ctx *ctx;
  lua_State *main;      /* for registry refs released outside a call */
  lua_State *running;   /* thread inside keel_backward, for hooks */
  size_t gc_debt;       /* engine bytes allocated since the last GC step */
  size_t gc_ceiling;    /* engine live bytes that force a full collection */
  int hook_error_ref;   /* error value raised by a hook, or LUA_NOREF */
  int anomaly;          /* anomaly detection on: lk_push stamps sites (lkeel_autograd.c) */
  char device_env[16];  /* KEEL_DEVICE when it set the default device (for error messages), else "" */
  struct lk_anomaly *an;
} lk_state;

typedef struct lk_tensor { keel_tensor *t; } lk_tensor;

static inline lk_state *lk_S(lua_State *L) {
  return (lk_state *)lua_touserdata(L, LK_STATE_UV);
}

/* Raises the context's error when st is not OK. */
LK_INTERNAL void lk_check(lua_State *L, lk_state *S, keel_status st);
/* Same, naming fn (what the user called) instead of the engine function. */
LK_INTERNAL void lk_check_as(lua_State *L, lk_state *S, keel_status st, const char *fn);
/* Pushes a userdata owning the reference t (NULL pushes nil). */
LK_INTERNAL void lk_push(lua_State *L, lk_state *S, keel_tensor *t);
/* The tensor at index i, or NULL when it is no tensor. */
LK_INTERNAL keel_tensor *lk_to(lua_State *L, int i);
/* The tensor at index i, or an error naming fn and the argument. */
LK_INTERNAL keel_tensor *lk_check_tensor(lua_State *L, int i, const char *fn);
/* A Lua dimension (1-based, or negative from the end) as 0-based/negative. */
LK_INTERNAL int lk_check_dim(lua_State *L, int i, const char *fn);
LK_INTERNAL int lk_opt_dim(lua_State *L, int i, const char *fn, int def);
/* Shape from a table at i or integers from i on; returns ndim. *next gets
** the first index after the shape. */
LK_INTERNAL int lk_check_shape(lua_State *L, int i, const char *fn, int64_t *shape, int *next);
/* Dims from a number or a table at i (none when nil); returns the count. */
LK_INTERNAL int lk_opt_dims(lua_State *L, int i, const char *fn, int *dims);
LK_INTERNAL keel_dtype lk_check_dtype(lua_State *L, int i, const char *fn);
/* opts.dtype of the table at i, else def. */
LK_INTERNAL keel_dtype lk_opt_dtype_field(lua_State *L, int i, const char *fn, keel_dtype def);
/* A device name: "cpu", "cuda" or "cuda:0" (one GPU per process: choose
** it with CUDA_VISIBLE_DEVICES). lk_to_device returns -1 for a string that
** is no device; lk_check_device raises, naming fn. */
LK_INTERNAL int lk_to_device(const char *s, keel_device *dev);
LK_INTERNAL keel_device lk_check_device(lua_State *L, int i, const char *fn);
LK_INTERNAL const char *lk_typename(lua_State *L, int i);
/* t[k] = v for the table on top of the stack. */
LK_INTERNAL void lk_setnum(lua_State *L, const char *k, double v);
LK_INTERNAL void lk_setint(lua_State *L, const char *k, int64_t v);
/* A message handler for lua_pcall: the error with a traceback (an error
** that is no string says what it is). */
LK_INTERNAL int lk_traceback(lua_State *L);

LK_INTERNAL void lk_open_tensor(lua_State *L);   /* methods into the table at -1 */
/* Registers fns into the table at -1, each a closure over the state and
** the Tensor metatable found at the absolute stack indices given. */
LK_INTERNAL void lk_register(lua_State *L, int state, int mt, const luaL_Reg *fns);
/* Each nn/optim area: void lk_open_<area>(lua_State *L, int state, int mt)
** adds its functions to the table at -1 (keel.core._nn, or keel.core._optim
** for optim) with lk_register. */
/* @open-decl:conv */
LK_INTERNAL void lk_open_conv(lua_State *L, int state, int mt);
/* @open-decl:norm */
LK_INTERNAL void lk_open_norm(lua_State *L, int state, int mt);
/* @open-decl:act */
LK_INTERNAL void lk_open_act(lua_State *L, int state, int mt);
/* @open-decl:rnn */
LK_INTERNAL void lk_open_rnn(lua_State *L, int state, int mt);
/* @open-decl:optim */
/* @open-decl:data */
LK_INTERNAL void lk_open_loader(lua_State *L, int state, int mt);
LK_INTERNAL void lk_open_dataset(lua_State *L, int state, int mt);
/* @open-decl:io */
LK_INTERNAL void lk_open_io(lua_State *L, int state, int mt);
/* @open-decl:autograd */
LK_INTERNAL void lk_open_autograd(lua_State *L, int state, int mt);
/* Anomaly mode, from lk_push with t (owned by the userdata at -1): stamps
** the creation site on t's new nodes and hands a pending event to Lua. */
LK_INTERNAL void lk_anomaly_pushed(lua_State *L, lk_state *S, keel_tensor *t);
/* Hands a pending event to Lua (site 0: the caller's); returns 1 with the
** error message on the stack when the mode says to raise it. */
LK_INTERNAL int lk_anomaly_deliver(lua_State *L, lk_state *S);
/* @open-decl:summary */
LK_INTERNAL void lk_open_summary(lua_State *L, int state, int mt);
/* @open-decl:cuda */
LK_INTERNAL void lk_open_cuda(lua_State *L, int state, int mt);
LK_INTERNAL void lk_open_optim(lua_State *L, int state, int mt);

#endif
