/*
** autograd.c: the define-by-run tape. Each op that sees an input requiring
** grad records a node (kl_record) owned by its output; backward walks the
** nodes reachable from the root in topological order and calls each op's
** backward rule (ops.c's table) with grad mode off.
**
** Leaf gradients are staged and committed only when the whole pass has
** succeeded, so an error (or a failing hook) never leaves .grad half
** updated.
**
** Anomaly mode (anomaly.c) adds one check to kl_record and one to each
** input gradient a backward rule makes; off, each is a single branch.
*/
#include <stdlib.h>
#include <string.h>
#include "keel_impl.h"

/* {======================================================================
** Recording
** ======================================================================= */

int kl_needs_grad(const keel_ctx *ctx, int n, keel_tensor *const *in) {
  if (!ctx->grad_enabled) return 0;
  for (int i = 0; i < n; i++)
    if (in[i] && (in[i]->requires_grad || in[i]->grad_fn)) return 1;
  return 0;
}

kl_node *kl_record(keel_ctx *ctx, int op, int n, keel_tensor *const *in, keel_tensor *out) {
  kl_node *node = (kl_node *)kl_malloc(ctx, sizeof *node);
  if (!node) return NULL;
  memset(node, 0, sizeof *node);
  node->in = (kl_edge *)kl_malloc(ctx, sizeof(kl_edge) * (size_t)(n ? n : 1));
  if (!node->in) { kl_free(ctx, node, sizeof *node); return NULL; }
  memset(node->in, 0, sizeof(kl_edge) * (size_t)(n ? n : 1));
  node->refcount = 1;
  node->ctx = ctx;
  node->op = op;
  node->n_in = n;
  for (int i = 0; i < n; i++) {
    kl_edge *e = &node->in[i];
    keel_tensor *t = in[i];
    if (!t) continue;
    e->dtype = t->dtype;
    e->ndim = t->ndim;
    memcpy(e->shape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
    if (t->grad_fn) {
      e->fn = t->grad_fn;
      e->fn->refcount++;
    } else if (t->requires_grad) {
      e->leaf = keel_tensor_retain(t);
    }
  }
  node->out_dtype = out->dtype;
  node->out_ndim = out->ndim;
  node->gemm_prec = (uint8_t)ctx->gemm_prec;
  memcpy(node->out_shape, out->shape, sizeof(int64_t) * (size_t)out->ndim);
  kl_ctx_ref(ctx);
  out->grad_fn = node;
  if (ctx->anomaly) kl_anomaly_record(ctx, node, n, in, out);
  return node;
}

keel_status kl_save(keel_ctx *ctx, kl_node *n, int i, keel_tensor *t) {
  keel_tensor *alias;
  keel_status st = kl_alias(ctx, t, t->ndim, t->shape, t->stride, t->offset, &alias);
  if (st) return st;
  alias->dtype = t->dtype;
  n->saved[i] = alias;
  n->saved_version[i] = t->storage->version;
  return KEEL_OK;
}

void kl_hooks_free(keel_ctx *ctx, kl_hook *h) {
  while (h) {
    kl_hook *next = h->next;
    if (h->free_ud) h->free_ud(h->ud);
    kl_free(ctx, h, sizeof *h);
    h = next;
  }
}

static void node_drop_saved(kl_node *n) {
  for (int i = 0; i < KL_MAX_SAVED; i++) kl_release(&n->saved[i]);
  n->freed = 1;
}

/*
** Unreferencing a node may free a long chain of producers: iterate with an
** explicit list instead of recursing, so a 100,000-op graph cannot
** overflow the C stack.
*/
void kl_node_unref(kl_node *n) {
  kl_node *stack;
  if (!n || --n->refcount > 0) return;
  n->next_dead = NULL;
  stack = n;
  while (stack) {
    kl_node *cur = stack;
    keel_ctx *ctx = cur->ctx;
    stack = cur->next_dead;
    for (int i = 0; i < cur->n_in; i++) {
      kl_edge *e = &cur->in[i];
      keel_tensor_release(e->leaf);
      if (e->fn && --e->fn->refcount == 0) {
        e->fn->next_dead = stack;
        stack = e->fn;
      }
    }
    for (int i = 0; i < KL_MAX_SAVED; i++) keel_tensor_release(cur->saved[i]);
    keel_tensor_release(cur->pending);
    kl_hooks_free(ctx, cur->hooks);
    kl_free(ctx, cur->in, sizeof(kl_edge) * (size_t)(cur->n_in ? cur->n_in : 1));
    kl_free(ctx, cur, sizeof *cur);
    kl_ctx_unref(ctx);
  }
}

/* }====================================================================== */

/* {======================================================================
** Tensor-level autograd API
** ======================================================================= */

keel_status keel_set_requires_grad(keel_ctx *ctx, keel_tensor *t, int on) {
  if (t->grad_fn) {
    if (on) return KEEL_OK;
    return kl_error(ctx, KEEL_ERR_STATE,
                    "requires_grad: cannot turn it off on a non-leaf tensor; use detach()");
  }
  if (on && t->dtype == KEEL_I64)
    return kl_error(ctx, KEEL_ERR_TYPE, "requires_grad: only float tensors can require grad, got int64");
  t->requires_grad = on != 0;
  return KEEL_OK;
}

int keel_requires_grad(const keel_tensor *t) { return t->requires_grad || t->grad_fn != NULL; }
int keel_is_leaf(const keel_tensor *t) { return t->grad_fn == NULL; }
keel_tensor *keel_tensor_grad(const keel_tensor *t) { return t->grad; }

keel_status keel_set_grad(keel_ctx *ctx, keel_tensor *t, keel_tensor *g) {
  if (g) {
    char b1[128], b2[128];
    if (g->ctx != ctx) return kl_error(ctx, KEEL_ERR_ARG, "grad: tensor belongs to another context");
    if (g->ndim != t->ndim || memcmp(g->shape, t->shape, sizeof(int64_t) * (size_t)t->ndim))
      return kl_error(ctx, KEEL_ERR_SHAPE, "grad: gradient of shape %s assigned to a tensor of shape %s",
                      kl_shape_str(b1, sizeof b1, g->ndim, g->shape),
                      kl_shape_str(b2, sizeof b2, t->ndim, t->shape));
    if (g->dtype != t->dtype)
      return kl_error(ctx, KEEL_ERR_TYPE, "grad: gradient dtype %s differs from tensor dtype %s",
                      keel_dtype_name(g->dtype), keel_dtype_name(t->dtype));
    if (g->storage->device != t->storage->device)
      return kl_error(ctx, KEEL_ERR_DEVICE, "grad: gradient on %s assigned to a tensor on %s",
                      keel_device_name(g->storage->device), keel_device_name(t->storage->device));
    keel_tensor_retain(g);
  }
  keel_tensor_release(t->grad);
  t->grad = g;
  return KEEL_OK;
}

const char *keel_grad_fn_name(const keel_tensor *t) {
  return t->grad_fn ? kl_ops[t->grad_fn->op].name : NULL;
}

keel_status keel_retain_grad(keel_ctx *ctx, keel_tensor *t) {
  (void)ctx;
  if (t->grad_fn) t->grad_fn->retained = t;
  return KEEL_OK;
}

keel_status keel_register_hook(keel_ctx *ctx, keel_tensor *t, keel_hook_fn fn, void *ud,
                               void (*free_ud)(void *), uint64_t *id) {
  kl_hook *h, **list;
  if (!keel_requires_grad(t))
    return kl_error(ctx, KEEL_ERR_STATE, "register_hook: tensor does not require grad");
  h = (kl_hook *)kl_malloc(ctx, sizeof *h);
  if (!h) return kl_error(ctx, KEEL_ERR_NOMEM, "register_hook: out of memory");
  h->id = ctx->next_hook_id++;
  h->fn = fn;
  h->ud = ud;
  h->free_ud = free_ud;
  h->next = NULL;
  /* append: hooks run in registration order */
  list = t->grad_fn ? &t->grad_fn->hooks : &t->hooks;
  while (*list) list = &(*list)->next;
  *list = h;
  if (id) *id = h->id;
  return KEEL_OK;
}

int keel_remove_hook(keel_ctx *ctx, keel_tensor *t, uint64_t id) {
  kl_hook **list = t->grad_fn ? &t->grad_fn->hooks : &t->hooks;
  (void)ctx;
  for (; *list; list = &(*list)->next) {
    kl_hook *h = *list;
    if (h->id != id) continue;
    *list = h->next;
    h->next = NULL;
    kl_hooks_free(ctx, h);
    return 1;
  }
  return 0;
}

/* }====================================================================== */

/* {======================================================================
** Backward
** ======================================================================= */

typedef struct stage { keel_tensor *target; keel_tensor *grad; kl_hook *hooks; } stage;

typedef struct pass {
  keel_ctx *ctx;
  kl_node **order; int n_order, cap_order;
  kl_node **ready; int n_ready, cap_ready;
  stage *st; int n_st, cap_st;
} pass;

static int grow(void **p, int *cap, int need, size_t elem) {
  void *q;
  int nc;
  if (need <= *cap) return 1;
  nc = *cap ? *cap * 2 : 64;
  while (nc < need) nc *= 2;
  q = realloc(*p, (size_t)nc * elem);
  if (!q) return 0;
  *p = q;
  *cap = nc;
  return 1;
}

static keel_status nomem(keel_ctx *ctx) {
  return kl_error(ctx, KEEL_ERR_NOMEM, "backward: out of memory");
}

/* Runs hooks in order; each may replace *g. */
static keel_status run_hooks(keel_ctx *ctx, kl_hook *h, keel_tensor **g) {
  for (; h; h = h->next) {
    keel_tensor *rep = NULL;
    keel_status st = h->fn(ctx, h->ud, *g, &rep);
    if (st) {
      keel_tensor_release(rep);
      if (ctx->status != st || !ctx->err[0]) kl_error(ctx, st, "backward: hook failed");
      return st;
    }
    if (rep) {
      if (rep->ndim != (*g)->ndim ||
          memcmp(rep->shape, (*g)->shape, sizeof(int64_t) * (size_t)rep->ndim)) {
        char b1[128], b2[128];
        kl_error(ctx, KEEL_ERR_SHAPE, "hook: returned a gradient of shape %s, expected %s",
                 kl_shape_str(b1, sizeof b1, rep->ndim, rep->shape),
                 kl_shape_str(b2, sizeof b2, (*g)->ndim, (*g)->shape));
        keel_tensor_release(rep);
        return KEEL_ERR_SHAPE;
      }
      if (rep->dtype != (*g)->dtype) {
        keel_tensor *c;
        keel_status s2 = keel_to_dtype(ctx, rep, (*g)->dtype, &c);
        keel_tensor_release(rep);
        if (s2) return s2;
        rep = c;
      }
      keel_tensor_release(*g);
      *g = rep;
    }
  }
  return KEEL_OK;
}

/* *acc += g out of place (acc may alias other gradients). Consumes g. */
static keel_status accumulate(keel_ctx *ctx, keel_tensor **acc, keel_tensor *g) {
  keel_tensor *sum;
  keel_status st;
  if (!*acc) { *acc = g; return KEEL_OK; }
  st = keel_add(ctx, *acc, g, &sum);
  keel_tensor_release(g);
  if (st) return st;
  keel_tensor_release(*acc);
  *acc = sum;
  return KEEL_OK;
}

static keel_status stage_add(pass *p, keel_tensor *target, kl_hook *hooks, keel_tensor *g) {
  for (int i = 0; i < p->n_st; i++)
    if (p->st[i].target == target) return accumulate(p->ctx, &p->st[i].grad, g);
  if (!grow((void **)&p->st, &p->cap_st, p->n_st + 1, sizeof(stage))) {
    keel_tensor_release(g);
    return nomem(p->ctx);
  }
  p->st[p->n_st].target = target;
  p->st[p->n_st].grad = g;
  p->st[p->n_st].hooks = hooks;
  p->n_st++;
  return KEEL_OK;
}

/* Brings g to the dtype and shape the edge expects. Consumes g. */
static keel_status fit_to_edge(keel_ctx *ctx, const kl_edge *e, keel_tensor *g, keel_tensor **out) {
  keel_status st = KEEL_OK;
  *out = NULL;
  if (g->ndim != e->ndim || memcmp(g->shape, e->shape, sizeof(int64_t) * (size_t)e->ndim)) {
    keel_tensor *r;
    st = kl_sum_to_shape(ctx, g, e->ndim, e->shape, &r);
    keel_tensor_release(g);
    if (st) return st;
    g = r;
  }
  if (g->dtype != e->dtype) {
    keel_tensor *c;
    st = keel_to_dtype(ctx, g, e->dtype, &c);
    keel_tensor_release(g);
    if (st) return st;
    g = c;
  }
  *out = g;
  return KEEL_OK;
}

/* Collects the nodes reachable from root and counts, for each, how many
** edges of the reachable graph point at it. */
static keel_status collect(pass *p, kl_node *root) {
  keel_ctx *ctx = p->ctx;
  unsigned mark = ++ctx->mark;
  kl_node **stack = NULL;
  int n_stack = 0, cap_stack = 0;
  root->mark = mark;
  root->deps = 0;
  if (!grow((void **)&stack, &cap_stack, 1, sizeof *stack)) return nomem(ctx);
  stack[n_stack++] = root;
  while (n_stack) {
    kl_node *n = stack[--n_stack];
    if (!grow((void **)&p->order, &p->cap_order, p->n_order + 1, sizeof(kl_node *))) {
      free(stack);
      return nomem(ctx);
    }
    p->order[p->n_order++] = n;
    for (int i = 0; i < n->n_in; i++) {
      kl_node *c = n->in[i].fn;
      if (!c) continue;
      if (c->mark != mark) {
        c->mark = mark;
        c->deps = 0;
        if (!grow((void **)&stack, &cap_stack, n_stack + 1, sizeof *stack)) {
          free(stack);
          return nomem(ctx);
        }
        stack[n_stack++] = c;
      }
      c->deps++;
    }
  }
  free(stack);
  return KEEL_OK;
}

static keel_status check_saved(keel_ctx *ctx, kl_node *n) {
  if (n->freed)
    return kl_error(ctx, KEEL_ERR_STATE,
                    "backward: the graph through '%s' was already freed by an earlier backward; "
                    "pass retain_graph=true to the first call", kl_ops[n->op].name);
  for (int i = 0; i < KL_MAX_SAVED; i++)
    if (n->saved[i] && n->saved[i]->storage->version != n->saved_version[i])
      return kl_error(ctx, KEEL_ERR_STATE,
                      "backward: a tensor saved by '%s' was modified in place after it was used; "
                      "clone it before changing it", kl_ops[n->op].name);
  return KEEL_OK;
}

static keel_status run_node(pass *p, kl_node *n, int retain) {
  keel_ctx *ctx = p->ctx;
  keel_tensor *gin[64];
  keel_tensor **gv = gin;
  keel_tensor *g = n->pending;
  keel_status st = KEEL_OK;
  int g_state = n->an_gstate;   /* anomaly mode: what is known of g's values */
  n->pending = NULL;
  if (g) {
    if ((st = check_saved(ctx, n))) goto done;
    if (n->hooks) {
      if ((st = run_hooks(ctx, n->hooks, &g))) goto done;
      g_state = KL_AN_UNKNOWN;
    }
    if (n->retained) {
      if ((st = stage_add(p, n->retained, NULL, keel_tensor_retain(g)))) goto done;
    }
    if (n->n_in > 64) {
      gv = (keel_tensor **)calloc((size_t)n->n_in, sizeof *gv);
      if (!gv) { st = nomem(ctx); goto done; }
    } else {
      memset(gin, 0, sizeof(keel_tensor *) * (size_t)n->n_in);
    }
    {
      /* a product in backward rounds as its forward did (keel.h) */
      int prec = ctx->gemm_prec;
      ctx->gemm_prec = n->gemm_prec;
      st = kl_ops[n->op].backward(ctx, n, g, gv);
      ctx->gemm_prec = prec;
    }
    for (int i = 0; i < n->n_in; i++) {
      kl_edge *e = &n->in[i];
      keel_tensor *gi = gv[i];
      gv[i] = NULL;
      if (!gi) continue;
      if (st || (!e->fn && !e->leaf)) { keel_tensor_release(gi); continue; }
      {
        keel_tensor *before = gi;
        int gi_state = KL_AN_UNKNOWN;
        if ((st = fit_to_edge(ctx, e, gi, &gi))) continue;
        if (ctx->anomaly && (st = kl_anomaly_grad(ctx, n, g, &g_state, gi, i, gi != before, &gi_state))) {
          keel_tensor_release(gi);
          continue;
        }
        if (e->fn) {
          /* a sum of several gradients is not known to be finite */
          e->fn->an_gstate = (uint8_t)(e->fn->pending ? KL_AN_UNKNOWN : gi_state);
          st = accumulate(ctx, &e->fn->pending, gi);
        } else {
          st = stage_add(p, e->leaf, e->leaf->hooks, gi);
        }
      }
    }
    if (gv != gin) free(gv);
  }
done:
  keel_tensor_release(g);
  if (st) return st;
  for (int i = 0; i < n->n_in; i++) {
    kl_node *c = n->in[i].fn;
    if (c && --c->deps == 0) {
      if (!grow((void **)&p->ready, &p->cap_ready, p->n_ready + 1, sizeof(kl_node *)))
        return nomem(ctx);
      p->ready[p->n_ready++] = c;
    }
  }
  if (!retain) node_drop_saved(n);
  return KEEL_OK;
}

/* Writes staged gradients into .grad: in place when the existing grad is
** ours to change, else a fresh exclusive tensor. */
static keel_status commit(pass *p) {
  keel_ctx *ctx = p->ctx;
  keel_status st;
  for (int i = 0; i < p->n_st; i++)
    if (p->st[i].hooks && (st = run_hooks(ctx, p->st[i].hooks, &p->st[i].grad))) return st;
  for (int i = 0; i < p->n_st; i++) {
    keel_tensor *t = p->st[i].target, *g = p->st[i].grad, *old = t->grad;
    if (old && old->dtype == g->dtype && kl_is_contiguous(old) && old->storage->device == g->storage->device) {
      if ((st = kl_backend_for(ctx, old->storage->device)->binary(ctx, KEEL_BIN_ADD, old, old, g)))
        return st;
      old->storage->version++;
      continue;
    }
    if (old) {
      keel_tensor *sum;
      if ((st = keel_add(ctx, old, g, &sum))) return st;
      keel_tensor_release(t->grad);
      t->grad = sum;
      continue;
    }
    if (g->refcount == 1 && g->storage->refcount == 1 && kl_is_contiguous(g) && !g->grad_fn) {
      t->grad = keel_tensor_retain(g);
    } else {
      keel_tensor *c;
      if ((st = keel_clone(ctx, g, &c))) return st;
      t->grad = c;
    }
  }
  return KEEL_OK;
}

keel_status keel_backward(keel_ctx *ctx, keel_tensor *root, keel_tensor *grad, int retain_graph) {
  return keel_backward_observe(ctx, root, grad, retain_graph, NULL, NULL);
}

keel_status keel_backward_observe(keel_ctx *ctx, keel_tensor *root, keel_tensor *grad, int retain_graph,
                                  keel_commit_fn fn, void *ud) {
  pass p;
  keel_tensor *seed = NULL;
  keel_status st = KEEL_OK;
  int old_mode;
  if ((st = kl_check_same_ctx(ctx, "backward", root))) return st;
  if (!keel_requires_grad(root))
    return kl_error(ctx, KEEL_ERR_STATE,
                    "backward: tensor does not require grad (no input of it has requires_grad set)");
  if (grad) {
    char b1[128], b2[128];
    if ((st = kl_check_same_ctx(ctx, "backward", grad)) || (st = kl_check_device(ctx, "backward", root, grad)))
      return st;
    if (grad->ndim != root->ndim || memcmp(grad->shape, root->shape, sizeof(int64_t) * (size_t)root->ndim))
      return kl_error(ctx, KEEL_ERR_SHAPE, "backward: gradient has shape %s, tensor has shape %s",
                      kl_shape_str(b1, sizeof b1, grad->ndim, grad->shape),
                      kl_shape_str(b2, sizeof b2, root->ndim, root->shape));
  } else if (root->numel != 1) {
    char b1[128];
    return kl_error(ctx, KEEL_ERR_SHAPE,
                    "backward: gradient can be implicit only for a one-element tensor, got shape %s; "
                    "pass a gradient", kl_shape_str(b1, sizeof b1, root->ndim, root->shape));
  }
  memset(&p, 0, sizeof p);
  p.ctx = ctx;
  old_mode = keel_set_grad_enabled(ctx, 0);
  if (grad) {
    st = grad->dtype == root->dtype ? keel_clone(ctx, grad, &seed) : keel_to_dtype(ctx, grad, root->dtype, &seed);
  } else {
    st = kl_new_like(ctx, root, root->dtype, &seed);
    if (!st) st = kl_backend_for(ctx, seed->storage->device)->fill(ctx, seed, 1.0);
  }
  if (st) goto out;
  if (!root->grad_fn) {  /* a leaf: its gradient is the seed */
    st = stage_add(&p, root, root->hooks, seed);
    seed = NULL;
    if (!st) st = commit(&p);
    goto committed;
  }
  if ((st = collect(&p, root->grad_fn))) goto out;
  root->grad_fn->pending = seed;
  root->grad_fn->an_gstate = KL_AN_UNKNOWN;
  seed = NULL;
  if (!grow((void **)&p.ready, &p.cap_ready, 1, sizeof(kl_node *))) { st = nomem(ctx); goto out; }
  p.ready[p.n_ready++] = root->grad_fn;
  while (p.n_ready) {
    kl_node *n = p.ready[--p.n_ready];
    if ((st = run_node(&p, n, retain_graph))) break;
  }
  if (!st) st = commit(&p);
committed:
  /* every .grad is in place: post-accumulate-grad hooks may read them */
  if (!st && fn)
    for (int i = 0; i < p.n_st; i++) fn(ud, p.st[i].target);
out:
  /* on failure, drop whatever is still in flight */
  for (int i = 0; i < p.n_order; i++) kl_release(&p.order[i]->pending);
  for (int i = 0; i < p.n_st; i++) keel_tensor_release(p.st[i].grad);
  keel_tensor_release(seed);
  free(p.order);
  free(p.ready);
  free(p.st);
  keel_set_grad_enabled(ctx, old_mode);
  return st;
}

/* }====================================================================== */
