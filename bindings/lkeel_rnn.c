/*
** lkeel_rnn.c: the recurrent cells and layers and fused attention in
** keel.core._nn (keel.nn.functional; keel/nn/rnn.lua builds the modules
** and F.scaled_dot_product_attention on them).
**
**   h = F.rnn_tanh_cell(x, h, w_ih, w_hh [, b_ih [, b_hh]])   (also rnn_relu_cell, gru_cell)
**   h, c = F.lstm_cell(x, h, c, w_ih, w_hh [, b_ih [, b_hh]])
**   out, h_n = F.rnn_tanh_layer(x, h0, w_ih, w_hh [, b_ih [, b_hh [, reverse]]])
**                                                    (also rnn_relu_layer, gru_layer)
**   out, h_n, c_n = F.lstm_layer(x, h0, c0, w_ih, w_hh [, b_ih [, b_hh [, reverse]]])
**
** x is [B, I] for a cell, [T, B, I] for a layer (one layer, one
** direction); states may be nil (zeros), biases nil (none).
**
**   out = F._sdpa(q, k, v, bias, is_causal, scale, dropout_p)
**
** fused attention (keel_sdpa): bias nil or a float tensor added to the
** scores; scale and dropout_p numbers (keel/nn/rnn.lua gives defaults).
*/
#include "lkeel.h"

/* The tensor at i, or NULL for nil/none. */
static keel_tensor *opt_tensor(lua_State *L, int i, const char *fn) {
  return lua_isnoneornil(L, i) ? NULL : lk_check_tensor(L, i, fn);
}

static int cell(lua_State *L, keel_rnn_mode mode, const char *fn) {
  lk_state *S = lk_S(L);
  int lstm = mode == KEEL_RNN_LSTM, k = lstm ? 4 : 3;
  keel_tensor *x = lk_check_tensor(L, 1, fn), *h = opt_tensor(L, 2, fn);
  keel_tensor *c = lstm ? opt_tensor(L, 3, fn) : NULL;
  keel_tensor *w_ih = lk_check_tensor(L, k, fn), *w_hh = lk_check_tensor(L, k + 1, fn);
  keel_tensor *b_ih = opt_tensor(L, k + 2, fn), *b_hh = opt_tensor(L, k + 3, fn);
  keel_tensor *ho = NULL, *co = NULL;
  lk_check(L, S, keel_rnn_cell(S->ctx, mode, x, h, c, w_ih, w_hh, b_ih, b_hh, &ho, lstm ? &co : NULL));
  lk_push(L, S, ho);
  if (!lstm) return 1;
  lk_push(L, S, co);
  return 2;
}

static int layer(lua_State *L, keel_rnn_mode mode, const char *fn) {
  lk_state *S = lk_S(L);
  int lstm = mode == KEEL_RNN_LSTM, k = lstm ? 4 : 3;
  keel_tensor *x = lk_check_tensor(L, 1, fn), *h0 = opt_tensor(L, 2, fn);
  keel_tensor *c0 = lstm ? opt_tensor(L, 3, fn) : NULL;
  keel_tensor *w_ih = lk_check_tensor(L, k, fn), *w_hh = lk_check_tensor(L, k + 1, fn);
  keel_tensor *b_ih = opt_tensor(L, k + 2, fn), *b_hh = opt_tensor(L, k + 3, fn);
  int reverse = lua_toboolean(L, k + 4);
  keel_tensor *out = NULL, *h_n = NULL, *c_n = NULL;
  lk_check(L, S, keel_rnn_layer(S->ctx, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, &out, &h_n,
                                lstm ? &c_n : NULL));
  lk_push(L, S, out);
  lk_push(L, S, h_n);
  if (!lstm) return 2;
  lk_push(L, S, c_n);
  return 3;
}

static int l_rnn_tanh_cell(lua_State *L) { return cell(L, KEEL_RNN_TANH, "rnn_tanh_cell"); }
static int l_rnn_relu_cell(lua_State *L) { return cell(L, KEEL_RNN_RELU, "rnn_relu_cell"); }
static int l_lstm_cell(lua_State *L) { return cell(L, KEEL_RNN_LSTM, "lstm_cell"); }
static int l_gru_cell(lua_State *L) { return cell(L, KEEL_RNN_GRU, "gru_cell"); }
static int l_rnn_tanh_layer(lua_State *L) { return layer(L, KEEL_RNN_TANH, "rnn_tanh_layer"); }
static int l_rnn_relu_layer(lua_State *L) { return layer(L, KEEL_RNN_RELU, "rnn_relu_layer"); }
static int l_lstm_layer(lua_State *L) { return layer(L, KEEL_RNN_LSTM, "lstm_layer"); }
static int l_gru_layer(lua_State *L) { return layer(L, KEEL_RNN_GRU, "gru_layer"); }

static int l_sdpa(lua_State *L) {
  const char *fn = "scaled_dot_product_attention";
  lk_state *S = lk_S(L);
  keel_tensor *q = lk_check_tensor(L, 1, fn), *k = lk_check_tensor(L, 2, fn), *v = lk_check_tensor(L, 3, fn);
  keel_tensor *bias = opt_tensor(L, 4, fn), *out = NULL;
  int causal = lua_toboolean(L, 5);
  double scale = luaL_checknumber(L, 6), p = luaL_checknumber(L, 7);
  lk_check(L, S, keel_sdpa(S->ctx, q, k, v, bias, causal, scale, p, &out));
  lk_push(L, S, out);
  return 1;
}

static const luaL_Reg rnn_fns[] = {
  {"rnn_tanh_cell", l_rnn_tanh_cell}, {"rnn_relu_cell", l_rnn_relu_cell},
  {"lstm_cell", l_lstm_cell}, {"gru_cell", l_gru_cell},
  {"rnn_tanh_layer", l_rnn_tanh_layer}, {"rnn_relu_layer", l_rnn_relu_layer},
  {"lstm_layer", l_lstm_layer}, {"gru_layer", l_gru_layer},
  {"_sdpa", l_sdpa},
  {NULL, NULL},
};

void lk_open_rnn(lua_State *L, int state, int mt) {
  lk_register(L, state, mt, rnn_fns);
}
