/*
** conv.c: conv2d and the 2-D pools (max, average, adaptive average):
** argument and shape rules, the autograd record and the backward rules.
** The kernels (im2col + GEMM, window loops) are in backend_cpu_conv.c.
**
** Tensors are NCHW. A 3-D input is an unbatched CHW sample, as in torch:
** it runs as a batch of one through differentiable (un)squeeze views.
**
** Every op fills a kl_win2d (the geometry every kernel reads) and keeps
** the parameters backward needs in the node's iparam, in the order of
** put_win/get_win below; the input and output sizes come from the node.
*/
#include <string.h>
#include "keel_impl.h"

#define TRY(call) do { if ((st = (call)) != KEEL_OK) goto done; } while (0)

static const kl_backend *backend(keel_ctx *ctx, const keel_tensor *t) {
  return kl_backend_for(ctx, t->storage->device);
}

/* a itself (retained) when dense, else a dense copy outside the graph:
** kernels index raw NCHW memory. */
static keel_status dense(keel_ctx *ctx, const keel_tensor *a, keel_tensor **out) {
  keel_status st;
  if (kl_is_contiguous(a)) { *out = keel_tensor_retain((keel_tensor *)a); return KEEL_OK; }
  if ((st = kl_new_like(ctx, a, a->dtype, out))) return st;
  if ((st = backend(ctx, a)->copy(ctx, *out, a))) kl_release(out);
  return st;
}

/* iparam layout shared by the four ops. */
enum { P_KH, P_KW, P_SH, P_SW, P_PH, P_PW, P_DH, P_DW, P_GROUPS, P_DIVISOR, P_INCPAD,
       P_ADAPTIVE, P_BASE, P_COUNT };
_Static_assert(P_COUNT <= KL_MAX_IPARAMS, "conv: window parameters do not fit in a node's iparam");

static void put_win(kl_node *n, const kl_win2d *g) {
  int64_t *p = n->iparam;
  p[P_KH] = g->k[0]; p[P_KW] = g->k[1]; p[P_SH] = g->s[0]; p[P_SW] = g->s[1];
  p[P_PH] = g->pad[0]; p[P_PW] = g->pad[1]; p[P_DH] = g->dil[0]; p[P_DW] = g->dil[1];
  p[P_GROUPS] = g->groups; p[P_DIVISOR] = g->divisor; p[P_INCPAD] = g->count_include_pad;
  p[P_ADAPTIVE] = g->adaptive; p[P_BASE] = g->index_base;
}

/* The geometry of node n, whose input 0 is [N, C, H, W]. */
static void get_win(const kl_node *n, kl_win2d *g) {
  const int64_t *p = n->iparam, *in = n->in[0].shape;
  memset(g, 0, sizeof *g);
  g->n = in[0]; g->c = in[1]; g->h = in[2]; g->w = in[3];
  g->oc = n->out_shape[1]; g->oh = n->out_shape[2]; g->ow = n->out_shape[3];
  g->k[0] = p[P_KH]; g->k[1] = p[P_KW]; g->s[0] = p[P_SH]; g->s[1] = p[P_SW];
  g->pad[0] = p[P_PH]; g->pad[1] = p[P_PW]; g->dil[0] = p[P_DH]; g->dil[1] = p[P_DW];
  g->groups = p[P_GROUPS]; g->divisor = p[P_DIVISOR]; g->count_include_pad = (int)p[P_INCPAD];
  g->adaptive = (int)p[P_ADAPTIVE]; g->index_base = (int)p[P_BASE];
}

static keel_status check_input(keel_ctx *ctx, const char *fn, const keel_tensor *x) {
  keel_status st;
  char b[128];
  if ((st = kl_check_same_ctx(ctx, fn, x))) return st;
  if (x->ndim != 3 && x->ndim != 4)
    return kl_error(ctx, KEEL_ERR_SHAPE,
                    "%s: input of shape %s, expected a 3-D [C, H, W] or 4-D [N, C, H, W] tensor", fn,
                    kl_shape_str(b, sizeof b, x->ndim, x->shape));
  return kl_check_float(ctx, fn, x);
}

/* Two non-negative/positive ints given as a pair; NULL gives def. */
static keel_status pair(keel_ctx *ctx, const char *fn, const char *what, const int64_t *v,
                        int64_t def, int64_t min, int64_t *out) {
  out[0] = v ? v[0] : def;
  out[1] = v ? v[1] : def;
  if (out[0] < min || out[1] < min)
    return kl_error(ctx, KEEL_ERR_ARG, "%s: %s must be %s, got (%lld, %lld)", fn, what,
                    min > 0 ? "positive" : "non-negative", (long long)out[0], (long long)out[1]);
  return KEEL_OK;
}

/*
** Runs op on x made 4-D: a 3-D input goes in as unsqueeze(x, 0) and the
** outputs come back squeezed, both as recorded views.
*/
typedef keel_status (*op4_fn)(keel_ctx *ctx, keel_tensor *x, void *arg, keel_tensor **out,
                              keel_tensor **idx);

static keel_status batched(keel_ctx *ctx, keel_tensor *x, op4_fn f, void *arg, keel_tensor **out,
                           keel_tensor **idx) {
  keel_tensor *x4 = NULL, *o4 = NULL, *i4 = NULL;
  keel_status st;
  if (x->ndim == 4) return f(ctx, x, arg, out, idx);
  TRY(keel_unsqueeze(ctx, x, 0, &x4));
  TRY(f(ctx, x4, arg, &o4, idx ? &i4 : NULL));
  TRY(keel_squeeze(ctx, o4, 0, out));
  if (idx && (st = keel_squeeze(ctx, i4, 0, idx))) { kl_release(out); goto done; }
done:
  keel_tensor_release(x4);
  keel_tensor_release(o4);
  keel_tensor_release(i4);
  return st;
}

/* {======================================================================
** conv2d
** ======================================================================= */

typedef struct conv_arg { keel_tensor *w, *b; kl_win2d g; int same; } conv_arg;

static keel_status conv4(keel_ctx *ctx, keel_tensor *x, void *varg, keel_tensor **out,
                         keel_tensor **unused) {
  conv_arg *a = (conv_arg *)varg;
  kl_win2d *g = &a->g;
  keel_tensor *w = a->w, *b = a->b, *xd = NULL, *wd = NULL, *bd = NULL, *o = NULL;
  keel_tensor *in[3] = {x, w, b};
  int64_t eh, ew, pbh, pbw, shape[4];
  keel_status st = KEEL_OK;
  (void)unused;
  g->n = x->shape[0]; g->c = x->shape[1]; g->h = x->shape[2]; g->w = x->shape[3];
  g->oc = w->shape[0];
  g->k[0] = w->shape[2]; g->k[1] = w->shape[3];
  if (g->c % g->groups)
    return kl_error(ctx, KEEL_ERR_SHAPE, "conv2d: input channels (%lld) must be divisible by groups (%lld)",
                    (long long)g->c, (long long)g->groups);
  if (g->oc % g->groups)
    return kl_error(ctx, KEEL_ERR_SHAPE, "conv2d: output channels (%lld) must be divisible by groups (%lld)",
                    (long long)g->oc, (long long)g->groups);
  if (g->c != w->shape[1] * g->groups)
    return kl_error(ctx, KEEL_ERR_SHAPE, "conv2d: input has %lld channels, weight expects %lld (groups=%lld)",
                    (long long)g->c, (long long)(w->shape[1] * g->groups), (long long)g->groups);
  eh = g->dil[0] * (g->k[0] - 1) + 1;
  ew = g->dil[1] * (g->k[1] - 1) + 1;
  if (a->same) {  /* torch: the odd pixel of padding goes to the bottom/right */
    g->pad[0] = (eh - 1) / 2; g->pad[1] = (ew - 1) / 2;
    pbh = eh - 1 - g->pad[0]; pbw = ew - 1 - g->pad[1];
  } else {
    pbh = g->pad[0]; pbw = g->pad[1];
  }
  if (eh > g->h + g->pad[0] + pbh || ew > g->w + g->pad[1] + pbw)
    return kl_error(ctx, KEEL_ERR_SHAPE,
                    "conv2d: kernel (%lld, %lld) (dilated: (%lld, %lld)) is larger than the padded input "
                    "(%lld, %lld)", (long long)g->k[0], (long long)g->k[1], (long long)eh, (long long)ew,
                    (long long)(g->h + g->pad[0] + pbh), (long long)(g->w + g->pad[1] + pbw));
  g->oh = (g->h + g->pad[0] + pbh - eh) / g->s[0] + 1;
  g->ow = (g->w + g->pad[1] + pbw - ew) / g->s[1] + 1;
  shape[0] = g->n; shape[1] = g->oc; shape[2] = g->oh; shape[3] = g->ow;
  TRY(dense(ctx, x, &xd));
  TRY(dense(ctx, w, &wd));
  if (b) TRY(dense(ctx, b, &bd));
  TRY(kl_new(ctx, x->dtype, x->storage->device, 4, shape, &o));
  TRY(backend(ctx, x)->conv2d(ctx, g, o, xd, wd, bd));
  if (kl_needs_grad(ctx, b ? 3 : 2, in)) {
    kl_node *n = kl_record(ctx, KL_OP_CONV2D, b ? 3 : 2, in, o);
    if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "conv2d: out of memory"); goto done; }
    put_win(n, g);
    if (KL_NEEDS(n, 1)) TRY(kl_save(ctx, n, 0, x));
    if (KL_NEEDS(n, 0)) TRY(kl_save(ctx, n, 1, w));
  }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(xd);
  keel_tensor_release(wd);
  keel_tensor_release(bd);
  keel_tensor_release(o);
  return st;
}

keel_status keel_conv2d(keel_ctx *ctx, keel_tensor *x, keel_tensor *w, keel_tensor *b,
                        const int64_t *stride, const int64_t *padding, const int64_t *dilation,
                        int64_t groups, keel_tensor **out) {
  conv_arg a;
  keel_status st;
  char b1[128];
  *out = NULL;
  memset(&a, 0, sizeof a);
  if ((st = check_input(ctx, "conv2d", x))) return st;
  if ((st = kl_check_same_ctx(ctx, "conv2d", w))) return st;
  if (b && (st = kl_check_same_ctx(ctx, "conv2d", b))) return st;
  if (w->ndim != 4)
    return kl_error(ctx, KEEL_ERR_SHAPE,
                    "conv2d: weight of shape %s, expected 4-D [out_channels, in_channels/groups, kH, kW]",
                    kl_shape_str(b1, sizeof b1, w->ndim, w->shape));
  if (w->shape[2] < 1 || w->shape[3] < 1)
    return kl_error(ctx, KEEL_ERR_SHAPE, "conv2d: weight of shape %s has an empty kernel",
                    kl_shape_str(b1, sizeof b1, w->ndim, w->shape));
  if ((st = kl_check_device(ctx, "conv2d", x, w)) || (st = kl_check_device(ctx, "conv2d", x, b))) return st;
  if (w->dtype != x->dtype)
    return kl_error(ctx, KEEL_ERR_TYPE, "conv2d: input is %s but weight is %s, expected the same dtype",
                    keel_dtype_name(x->dtype), keel_dtype_name(w->dtype));
  if (b && b->dtype != x->dtype)
    return kl_error(ctx, KEEL_ERR_TYPE, "conv2d: input is %s but bias is %s, expected the same dtype",
                    keel_dtype_name(x->dtype), keel_dtype_name(b->dtype));
  if (b && (b->ndim != 1 || b->shape[0] != w->shape[0]))
    return kl_error(ctx, KEEL_ERR_SHAPE, "conv2d: bias of shape %s, expected [%lld] (out_channels)",
                    kl_shape_str(b1, sizeof b1, b->ndim, b->shape), (long long)w->shape[0]);
  if (groups < 1) return kl_error(ctx, KEEL_ERR_ARG, "conv2d: groups must be positive, got %lld", (long long)groups);
  if ((st = pair(ctx, "conv2d", "stride", stride, 1, 1, a.g.s))) return st;
  if ((st = pair(ctx, "conv2d", "dilation", dilation, 1, 1, a.g.dil))) return st;
  if (padding && padding[0] == KEEL_PADDING_SAME && padding[1] == KEEL_PADDING_SAME) {
    if (a.g.s[0] != 1 || a.g.s[1] != 1)
      return kl_error(ctx, KEEL_ERR_ARG, "conv2d: padding \"same\" needs stride 1, got (%lld, %lld)",
                      (long long)a.g.s[0], (long long)a.g.s[1]);
    a.same = 1;
  } else if ((st = pair(ctx, "conv2d", "padding", padding, 0, 0, a.g.pad))) {
    return st;
  }
  a.g.groups = groups;
  a.w = w;
  a.b = b;
  return batched(ctx, x, conv4, &a, out, NULL);
}

KL_BACKWARD(kl_conv2d_backward) {
  kl_win2d g;
  keel_tensor *gd = NULL, *xd = NULL, *wd = NULL, *gx = NULL, *gw = NULL, *gb = NULL;
  int need_x = KL_NEEDS(n, 0), need_w = KL_NEEDS(n, 1), need_b = n->n_in > 2 && KL_NEEDS(n, 2);
  keel_status st = KEEL_OK;
  get_win(n, &g);
  TRY(dense(ctx, gout, &gd));
  if (need_w) TRY(dense(ctx, n->saved[0], &xd));
  if (need_x) TRY(dense(ctx, n->saved[1], &wd));
  if (need_x) TRY(kl_new(ctx, gout->dtype, gout->storage->device, 4, n->in[0].shape, &gx));
  if (need_w) TRY(kl_new(ctx, gout->dtype, gout->storage->device, 4, n->in[1].shape, &gw));
  if (need_b) TRY(kl_new(ctx, gout->dtype, gout->storage->device, 1, n->in[2].shape, &gb));
  TRY(backend(ctx, gout)->conv2d_backward(ctx, &g, gd, xd, wd, gx, gw, gb));
  gin[0] = gx; gin[1] = gw;
  if (n->n_in > 2) gin[2] = gb;
  gx = gw = gb = NULL;
done:
  keel_tensor_release(gd);
  keel_tensor_release(xd);
  keel_tensor_release(wd);
  keel_tensor_release(gx);
  keel_tensor_release(gw);
  keel_tensor_release(gb);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Pools
** ======================================================================= */

/* torch's pooling_output_shape: with ceil_mode the last window may hang
** over the bottom/right edge but must start inside the (left-padded) input. */
static int64_t pool_out(int64_t in, int64_t k, int64_t pad, int64_t s, int64_t d, int ceil_mode) {
  int64_t num = in + 2 * pad - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t o = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;   /* floor division */
  if (ceil_mode && (o - 1) * s >= in + pad) o--;
  return o;
}

/* Checks the window and fills g's window fields and output size. */
static keel_status pool_geom(keel_ctx *ctx, const char *fn, const keel_tensor *x, const int64_t *kernel,
                             const int64_t *stride, const int64_t *padding, const int64_t *dilation,
                             int ceil_mode, kl_win2d *g) {
  keel_status st;
  int64_t h = x->shape[x->ndim - 2], w = x->shape[x->ndim - 1];
  if (!kernel) return kl_error(ctx, KEEL_ERR_ARG, "%s: kernel size is required", fn);
  if ((st = pair(ctx, fn, "kernel size", kernel, 1, 1, g->k))) return st;
  if ((st = pair(ctx, fn, "stride", stride ? stride : kernel, 1, 1, g->s))) return st;
  if ((st = pair(ctx, fn, "padding", padding, 0, 0, g->pad))) return st;
  if ((st = pair(ctx, fn, "dilation", dilation, 1, 1, g->dil))) return st;
  if (g->pad[0] > g->k[0] / 2 || g->pad[1] > g->k[1] / 2)
    return kl_error(ctx, KEEL_ERR_ARG,
                    "%s: padding (%lld, %lld) must be at most half of the kernel size (%lld, %lld)", fn,
                    (long long)g->pad[0], (long long)g->pad[1], (long long)g->k[0], (long long)g->k[1]);
  if (h < 1 || w < 1)
    return kl_error(ctx, KEEL_ERR_SHAPE, "%s: input has an empty spatial size (%lld, %lld)", fn,
                    (long long)h, (long long)w);
  g->oh = pool_out(h, g->k[0], g->pad[0], g->s[0], g->dil[0], ceil_mode);
  g->ow = pool_out(w, g->k[1], g->pad[1], g->s[1], g->dil[1], ceil_mode);
  if (g->oh < 1 || g->ow < 1)
    return kl_error(ctx, KEEL_ERR_SHAPE,
                    "%s: output size (%lld, %lld) is too small: input (%lld, %lld) with kernel (%lld, %lld), "
                    "padding (%lld, %lld), dilation (%lld, %lld)", fn, (long long)g->oh, (long long)g->ow,
                    (long long)h, (long long)w, (long long)g->k[0], (long long)g->k[1], (long long)g->pad[0],
                    (long long)g->pad[1], (long long)g->dil[0], (long long)g->dil[1]);
  return KEEL_OK;
}

typedef struct pool_arg { kl_win2d g; int op; } pool_arg;

/* Shared by the three pools: out [N, C, oh, ow] (+ i64 indices for max). */
static keel_status pool4(keel_ctx *ctx, keel_tensor *x, void *varg, keel_tensor **out, keel_tensor **idx) {
  pool_arg *a = (pool_arg *)varg;
  kl_win2d *g = &a->g;
  keel_tensor *xd = NULL, *o = NULL, *ix = NULL;
  int64_t shape[4];
  int rec = kl_needs_grad(ctx, 1, &x);
  keel_status st = KEEL_OK;
  g->n = x->shape[0]; g->c = x->shape[1]; g->h = x->shape[2]; g->w = x->shape[3];
  g->oc = g->c;
  shape[0] = g->n; shape[1] = g->c; shape[2] = g->oh; shape[3] = g->ow;
  TRY(dense(ctx, x, &xd));
  TRY(kl_new(ctx, x->dtype, x->storage->device, 4, shape, &o));
  if (a->op == KL_OP_MAX_POOL2D) {
    if (idx || rec) TRY(kl_new(ctx, KEEL_I64, x->storage->device, 4, shape, &ix));
    TRY(backend(ctx, x)->max_pool2d(ctx, g, o, ix, xd));
  } else {
    TRY(backend(ctx, x)->avg_pool2d(ctx, g, o, xd));
  }
  if (rec) {
    kl_node *n = kl_record(ctx, a->op, 1, &x, o);
    if (!n) { st = kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory", kl_ops[a->op].name); goto done; }
    put_win(n, g);
    if (ix) TRY(kl_save(ctx, n, 0, ix));
  }
  if (idx) { *idx = ix; ix = NULL; }
  *out = o;
  o = NULL;
done:
  keel_tensor_release(xd);
  keel_tensor_release(o);
  keel_tensor_release(ix);
  return st;
}

keel_status keel_max_pool2d(keel_ctx *ctx, keel_tensor *x, const int64_t *kernel, const int64_t *stride,
                            const int64_t *padding, const int64_t *dilation, int ceil_mode,
                            keel_tensor **out, keel_tensor **indices) {
  pool_arg a;
  keel_status st;
  *out = NULL;
  if (indices) *indices = NULL;
  memset(&a, 0, sizeof a);
  if ((st = check_input(ctx, "max_pool2d", x))) return st;
  if ((st = pool_geom(ctx, "max_pool2d", x, kernel, stride, padding, dilation, ceil_mode, &a.g))) return st;
  a.op = KL_OP_MAX_POOL2D;
  a.g.index_base = ctx->index_base;
  return batched(ctx, x, pool4, &a, out, indices);
}

keel_status keel_avg_pool2d(keel_ctx *ctx, keel_tensor *x, const int64_t *kernel, const int64_t *stride,
                            const int64_t *padding, int ceil_mode, int count_include_pad,
                            int64_t divisor_override, keel_tensor **out) {
  pool_arg a;
  keel_status st;
  *out = NULL;
  memset(&a, 0, sizeof a);
  if ((st = check_input(ctx, "avg_pool2d", x))) return st;
  if ((st = pool_geom(ctx, "avg_pool2d", x, kernel, stride, padding, NULL, ceil_mode, &a.g))) return st;
  if (divisor_override < 0)
    return kl_error(ctx, KEEL_ERR_ARG, "avg_pool2d: divisor_override must be positive (or 0 for none), got %lld",
                    (long long)divisor_override);
  a.op = KL_OP_AVG_POOL2D;
  a.g.count_include_pad = count_include_pad != 0;
  a.g.divisor = divisor_override;
  return batched(ctx, x, pool4, &a, out, NULL);
}

keel_status keel_adaptive_avg_pool2d(keel_ctx *ctx, keel_tensor *x, const int64_t *out_hw,
                                     keel_tensor **out) {
  pool_arg a;
  keel_status st;
  int64_t h, w, size[2];
  *out = NULL;
  memset(&a, 0, sizeof a);
  if ((st = check_input(ctx, "adaptive_avg_pool2d", x))) return st;
  if (!out_hw) return kl_error(ctx, KEEL_ERR_ARG, "adaptive_avg_pool2d: output size is required");
  if ((st = pair(ctx, "adaptive_avg_pool2d", "output size", out_hw, 1, 1, size))) return st;
  h = x->shape[x->ndim - 2];
  w = x->shape[x->ndim - 1];
  if (h < 1 || w < 1)
    return kl_error(ctx, KEEL_ERR_SHAPE, "adaptive_avg_pool2d: input has an empty spatial size (%lld, %lld)",
                    (long long)h, (long long)w);
  a.op = KL_OP_ADAPTIVE_AVG_POOL2D;
  a.g.oh = size[0];
  a.g.ow = size[1];
  a.g.adaptive = 1;
  return batched(ctx, x, pool4, &a, out, NULL);
}

/* A fresh gradient of input 0's shape, filled by the pool's backward kernel. */
static keel_status pool_backward(keel_ctx *ctx, kl_node *n, keel_tensor *gout, keel_tensor **gin) {
  kl_win2d g;
  keel_tensor *gd = NULL, *gx = NULL;
  keel_status st = KEEL_OK;
  get_win(n, &g);
  TRY(dense(ctx, gout, &gd));
  TRY(kl_new(ctx, gout->dtype, gout->storage->device, 4, n->in[0].shape, &gx));
  if (n->op == KL_OP_MAX_POOL2D) TRY(backend(ctx, gout)->max_pool2d_backward(ctx, &g, gx, gd, n->saved[0]));
  else TRY(backend(ctx, gout)->avg_pool2d_backward(ctx, &g, gx, gd));
  gin[0] = gx;
  gx = NULL;
done:
  keel_tensor_release(gd);
  keel_tensor_release(gx);
  return st;
}

KL_BACKWARD(kl_max_pool2d_backward) { return pool_backward(ctx, n, gout, gin); }
KL_BACKWARD(kl_avg_pool2d_backward) { return pool_backward(ctx, n, gout, gin); }
KL_BACKWARD(kl_adaptive_avg_pool2d_backward) { return pool_backward(ctx, n, gout, gin); }

/* }====================================================================== */
