/*
** rnn.c: recurrent cells and layers as PyTorch defines them (Elman RNN
** with tanh or relu, LSTM, GRU), and their backward rule.
**
** One op runs a whole step (a cell) or a whole sequence (a layer, one
** direction). The kernels (backend_cpu_rnn.c) do the matrix products with
** BLAS and the gate nonlinearities, forward and backward, in one fused
** pass per step: a step is one tape node, not a dozen elementwise ones.
**
** Why a layer is an op and not a Lua loop over cell ops: the loop would
** cut the input sequence into steps with select(), and the gradient of
** each select is a zero tensor of the whole sequence's size, so T steps
** cost O(T^2) memory traffic in backward. A layer op takes the sequence
** whole: the input projection of all steps is one GEMM, and in backward
** dx and the weight gradients are one GEMM each over all steps.
**
** A cell is a layer of one step: both share the kernels and one node
** layout,
**   inputs  0 x, 1 h0, 2 c0 (LSTM), 3 w_ih, 4 w_hh, 5 b_ih, 6 b_hh
**           (h0, c0 and the biases may be absent: zeros, no bias)
**   saved   0 x (contiguous), 1 w_ih, 2 w_hh (contiguous), 3 the
**           kernel's workspace (gate activations and states of each step)
**   iparam  0 mode, 1 T, 2 B, 3 I, 4 H, 5 reverse
**
** A tape node has one output, so the LSTM's two results are planes of one
** tensor, handed out as (recorded) select/narrow views:
**   layer   RNN, GRU [T, B, H]    LSTM [T + 1, B, H]: h of each step, then c_n
**   cell    RNN, GRU [B, H]       LSTM [2, B, H]: h', c'
** Planes rather than [B, 2H] columns, so that h and c are contiguous views
** that the next step reads without a copy. Were (h', c') two ops sharing
** saved activations instead, backward would need their two gradients at
** once, which a tape that runs one node at a time cannot give.
*/
#include <stdio.h>
#include <string.h>
#include "keel_impl.h"

#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

static const int n_gates[KEEL_RNN_MODE_COUNT] = {1, 1, 4, 3};
static const char *cell_name[KEEL_RNN_MODE_COUNT] = {
  "rnn_tanh_cell", "rnn_relu_cell", "lstm_cell", "gru_cell",
};
static const char *layer_name[KEEL_RNN_MODE_COUNT] = {
  "rnn_tanh_layer", "rnn_relu_layer", "lstm_layer", "gru_layer",
};
/* how the shapes read, for error messages */
static const char *gate_str[KEEL_RNN_MODE_COUNT] = {"", "", "4*", "3*"};

/* t itself (retained) when contiguous, else a contiguous copy outside the
** graph: the node records the caller's tensor, the kernel reads this. */
static keel_status dense(keel_ctx *ctx, keel_tensor *t, keel_tensor **out) {
  keel_status st;
  *out = NULL;
  if (!t) return KEEL_OK;
  if (kl_is_contiguous(t)) { *out = keel_tensor_retain(t); return KEEL_OK; }
  if ((st = kl_new_like(ctx, t, t->dtype, out))) return st;
  if ((st = kl_backend_for(ctx, t->storage->device)->copy(ctx, *out, t))) kl_release(out);
  return st;
}

/* t (when given) must have the given shape, dtype and device. */
static keel_status check_arg(keel_ctx *ctx, const char *fn, const char *what, const keel_tensor *t,
                             const keel_tensor *x, int ndim, const int64_t *shape, const char *meaning) {
  char b1[128], b2[128];
  keel_status st;
  if (!t) return KEEL_OK;
  if ((st = kl_check_same_ctx(ctx, fn, t))) return st;
  if (t->dtype != x->dtype)
    return kl_error(ctx, KEEL_ERR_TYPE, "%s: %s has dtype %s, expected %s (the input's)", fn, what,
                    keel_dtype_name(t->dtype), keel_dtype_name(x->dtype));
  if (t->storage->device != x->storage->device)
    return kl_error(ctx, KEEL_ERR_DEVICE, "%s: %s is on %s, the input on %s; expected one device", fn, what,
                    keel_device_name(t->storage->device), keel_device_name(x->storage->device));
  if (t->ndim != ndim || memcmp(t->shape, shape, sizeof(int64_t) * (size_t)ndim))
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: %s has shape %s, expected %s (%s)", fn, what,
                    kl_shape_str(b1, sizeof b1, t->ndim, t->shape), kl_shape_str(b2, sizeof b2, ndim, shape),
                    meaning);
  return KEEL_OK;
}

/*
** Checks the arguments, runs the kernel and records the node. *o gets
** the output described at the top of the file.
*/
static keel_status rnn_run(keel_ctx *ctx, keel_rnn_mode mode, int cell, keel_tensor *x, keel_tensor *h0,
                           keel_tensor *c0, keel_tensor *w_ih, keel_tensor *w_hh, keel_tensor *b_ih,
                           keel_tensor *b_hh, int reverse, keel_tensor **o) {
  const char *fn;
  int64_t T, B, I, H, G, s[3];
  char b1[128], b2[128];
  const kl_backend *be;
  kl_rnn_args a;
  keel_tensor *xd = NULL, *h0d = NULL, *c0d = NULL, *wi = NULL, *wh = NULL, *bi = NULL, *bh = NULL;
  keel_tensor *out = NULL, *ws = NULL;
  keel_status st;
  *o = NULL;
  if ((unsigned)mode >= KEEL_RNN_MODE_COUNT)
    return kl_error(ctx, KEEL_ERR_ARG, "%s: unknown recurrent mode %d", cell ? "rnn_cell" : "rnn_layer", (int)mode);
  fn = cell ? cell_name[mode] : layer_name[mode];
  G = n_gates[mode];
  if (!x || !w_ih || !w_hh)
    return kl_error(ctx, KEEL_ERR_ARG, "%s: %s is required", fn, !x ? "the input" : !w_ih ? "weight_ih" : "weight_hh");
  if ((st = kl_check_same_ctx(ctx, fn, x)) || (st = kl_check_float(ctx, fn, x))) return st;
  if (x->ndim != (cell ? 2 : 3))
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: input has shape %s, expected %s", fn,
                    kl_shape_str(b1, sizeof b1, x->ndim, x->shape),
                    cell ? "2 dimensions [batch, input_size]" : "3 dimensions [seq_len, batch, input_size]");
  T = cell ? 1 : x->shape[0];
  B = x->shape[x->ndim - 2];
  I = x->shape[x->ndim - 1];
  if (T < 1) return kl_error(ctx, KEEL_ERR_SHAPE, "%s: input has no time steps, expected at least one", fn);
  if ((st = kl_check_same_ctx(ctx, fn, w_hh))) return st;
  if (w_hh->ndim != 2 || w_hh->shape[1] < 1 || w_hh->shape[0] != G * w_hh->shape[1])
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: weight_hh has shape %s, expected [%shidden_size, hidden_size]", fn,
                    kl_shape_str(b1, sizeof b1, w_hh->ndim, w_hh->shape), gate_str[mode]);
  H = w_hh->shape[1];
  s[0] = G * H; s[1] = I;
  snprintf(b2, sizeof b2, "[%shidden_size, input_size]", gate_str[mode]);
  if ((st = check_arg(ctx, fn, "weight_ih", w_ih, x, 2, s, b2))) return st;
  snprintf(b2, sizeof b2, "[%shidden_size, hidden_size]", gate_str[mode]);
  if ((st = check_arg(ctx, fn, "weight_hh", w_hh, x, 2, w_hh->shape, b2))) return st;  /* dtype, device */
  snprintf(b2, sizeof b2, "[%shidden_size]", gate_str[mode]);
  if ((st = check_arg(ctx, fn, "bias_ih", b_ih, x, 1, s, b2))) return st;
  if ((st = check_arg(ctx, fn, "bias_hh", b_hh, x, 1, s, b2))) return st;
  s[0] = B; s[1] = H;
  if ((st = check_arg(ctx, fn, cell ? "h" : "h0", h0, x, 2, s, "[batch, hidden_size]"))) return st;
  if (c0 && mode != KEEL_RNN_LSTM)
    return kl_error(ctx, KEEL_ERR_ARG, "%s: got a cell state, but only an LSTM has one", fn);
  if ((st = check_arg(ctx, fn, cell ? "c" : "c0", c0, x, 2, s, "[batch, hidden_size]"))) return st;
  /* BLAS takes int sizes */
  if (T * B > 0x7fffffff || G * H > 0x7fffffff || I > 0x7fffffff)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: sizes above 2^31 are not supported", fn);
  be = kl_backend_for(ctx, x->storage->device);
  if (!be->rnn_forward || !be->rnn_backward)
    return kl_error(ctx, KEEL_ERR_DEVICE, "%s: not available on the %s backend", fn, be->name);

  TRY(dense(ctx, x, &xd));
  TRY(dense(ctx, h0, &h0d));
  TRY(dense(ctx, c0, &c0d));
  TRY(dense(ctx, w_ih, &wi));
  TRY(dense(ctx, w_hh, &wh));
  TRY(dense(ctx, b_ih, &bi));
  TRY(dense(ctx, b_hh, &bh));
  {
    int64_t os[3];
    int nd = 0;
    if (cell) {
      if (mode == KEEL_RNN_LSTM) os[nd++] = 2;
    } else {
      os[nd++] = mode == KEEL_RNN_LSTM ? T + 1 : T;
    }
    os[nd++] = B;
    os[nd++] = H;
    TRY(kl_new(ctx, x->dtype, x->storage->device, nd, os, &out));
  }
  memset(&a, 0, sizeof a);
  a.mode = (int)mode;
  a.reverse = reverse != 0;
  a.T = T; a.B = B; a.In = I; a.H = H;
  a.x = xd; a.h0 = h0d; a.c0 = c0d; a.w_ih = wi; a.w_hh = wh; a.b_ih = bi; a.b_hh = bh;
  a.out = out;
  TRY(be->rnn_forward(ctx, &a));
  ws = a.ws;
  {
    keel_tensor *in[7] = {x, h0, c0, w_ih, w_hh, b_ih, b_hh};
    if (kl_needs_grad(ctx, 7, in)) {
      int op = (cell ? KL_OP_RNN_TANH_CELL : KL_OP_RNN_TANH_LAYER) + (int)mode;
      kl_node *n = kl_record(ctx, op, 7, in, out);
      if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", fn); goto done; }
      n->iparam[0] = mode;
      n->iparam[1] = T; n->iparam[2] = B; n->iparam[3] = I; n->iparam[4] = H;
      n->iparam[5] = a.reverse;
      TRY(kl_save(ctx, n, 0, xd));
      TRY(kl_save(ctx, n, 1, wi));
      TRY(kl_save(ctx, n, 2, wh));
      TRY(kl_save(ctx, n, 3, ws));
    }
  }
  *o = out;
  out = NULL;
done:
  keel_tensor_release(xd);
  keel_tensor_release(h0d);
  keel_tensor_release(c0d);
  keel_tensor_release(wi);
  keel_tensor_release(wh);
  keel_tensor_release(bi);
  keel_tensor_release(bh);
  keel_tensor_release(ws);
  keel_tensor_release(out);
  return st;
}

keel_status keel_rnn_cell(keel_ctx *ctx, keel_rnn_mode mode, keel_tensor *x, keel_tensor *h,
                          keel_tensor *c, keel_tensor *w_ih, keel_tensor *w_hh, keel_tensor *b_ih,
                          keel_tensor *b_hh, keel_tensor **h_out, keel_tensor **c_out) {
  keel_tensor *o = NULL;
  keel_status st;
  *h_out = NULL;
  if (c_out) *c_out = NULL;
  if (mode == KEEL_RNN_LSTM && !c_out)
    return kl_error(ctx, KEEL_ERR_ARG, "lstm_cell: c_out is required (the new cell state)");
  if ((st = rnn_run(ctx, mode, 1, x, h, c, w_ih, w_hh, b_ih, b_hh, 0, &o))) return st;
  if (mode != KEEL_RNN_LSTM) { *h_out = o; return KEEL_OK; }
  if ((st = keel_select(ctx, o, 0, 0, h_out)) == KEEL_OK && (st = keel_select(ctx, o, 0, 1, c_out)))
    kl_release(h_out);
  keel_tensor_release(o);
  return st;
}

keel_status keel_rnn_layer(keel_ctx *ctx, keel_rnn_mode mode, keel_tensor *x, keel_tensor *h0,
                           keel_tensor *c0, keel_tensor *w_ih, keel_tensor *w_hh, keel_tensor *b_ih,
                           keel_tensor *b_hh, int reverse, keel_tensor **out, keel_tensor **h_n,
                           keel_tensor **c_n) {
  keel_tensor *o = NULL;
  int64_t T;
  keel_status st;
  *out = NULL;
  if (h_n) *h_n = NULL;
  if (c_n) *c_n = NULL;
  if ((st = rnn_run(ctx, mode, 0, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, &o))) return st;
  T = x->shape[0];
  /* the last step's h: time T-1, or 0 when running backwards */
  if (mode == KEEL_RNN_LSTM) {
    TRY(keel_narrow(ctx, o, 0, 0, T, out));
    if (c_n) TRY(keel_select(ctx, o, 0, T, c_n));
  } else {
    *out = keel_tensor_retain(o);
  }
  if (h_n) TRY(keel_select(ctx, o, 0, reverse ? 0 : T - 1, h_n));
done:
  if (st) {
    kl_release(out);
    if (h_n) kl_release(h_n);
    if (c_n) kl_release(c_n);
  }
  keel_tensor_release(o);
  return st;
}

/* The gradients of the inputs that need one, from the kernel. */
KL_BACKWARD(kl_rnn_backward) {
  kl_rnn_args a;
  keel_tensor *g = NULL, *gd = NULL;
  keel_tensor **slot[7];
  const kl_backend *be = kl_backend_for(ctx, n->saved[0]->storage->device);
  keel_status st = KEEL_OK;
  memset(&a, 0, sizeof a);
  a.mode = (int)n->iparam[0];
  a.T = n->iparam[1]; a.B = n->iparam[2]; a.In = n->iparam[3]; a.H = n->iparam[4];
  a.reverse = (int)n->iparam[5];
  a.x = n->saved[0]; a.w_ih = n->saved[1]; a.w_hh = n->saved[2]; a.ws = n->saved[3];
  slot[0] = &a.dx; slot[1] = &a.dh0; slot[2] = &a.dc0; slot[3] = &a.dw_ih;
  slot[4] = &a.dw_hh; slot[5] = &a.db_ih; slot[6] = &a.db_hh;
  if (gout->dtype != a.x->dtype) TRY(keel_to_dtype(ctx, gout, a.x->dtype, &g));
  else g = keel_tensor_retain(gout);
  TRY(dense(ctx, g, &gd));
  a.gout = gd;
  for (int i = 0; i < 7; i++) {
    if (!KL_NEEDS(n, i)) continue;
    TRY(kl_new(ctx, a.x->dtype, a.x->storage->device, n->in[i].ndim, n->in[i].shape, &gin[i]));
    *slot[i] = gin[i];
  }
  st = be->rnn_backward(ctx, &a);
done:
  if (st) for (int i = 0; i < 7; i++) kl_release(&gin[i]);
  keel_tensor_release(g);
  keel_tensor_release(gd);
  return st;
}
