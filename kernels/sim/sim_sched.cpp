/*
** sim_sched.cpp: how the simulator runs a grid (kcsim.h says what kernel
** code sees). Each emulated CUDA thread runs on a fiber, a coroutine with
** its own mmap'd stack (guard page below it); the scheduler runs the
** blocks one after another, and within a block resumes every runnable
** thread in turn until it finishes or waits at a barrier, then releases
** the barriers whose participants have all arrived. A fiber whose thread
** has finished takes the next thread on the same stack, so a kernel
** without barriers uses one stack, however large its blocks.
**
** Context switches: a hand-written x86-64 switch (callee-saved registers,
** MXCSR/x87 control word, rsp: no syscall, ~10 ns); ucontext elsewhere.
** Under AddressSanitizer every switch is announced to it
** (__sanitizer_start/finish_switch_fiber) so it tracks the right stack.
**
** Everything here is process state behind one lock: a launch holds it
** from the first block to the last, so launches from several OS threads
** take turns and shared memory statics (KC_SHARED) are never shared by
** two blocks.
*/
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <mutex>
#include <new>

#include "kcsim.h"
#include "sim_internal.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#ifndef KCSIM_STACK
#ifdef KCSIM_ASAN
#define KCSIM_STACK (256 * 1024)
#else
#define KCSIM_STACK (64 * 1024)
#endif
#endif

namespace kcsim {

geometry g;
uint64_t block_serial = 1;

/* {======================================================================
** Fibers
** ======================================================================= */

#if defined(__x86_64__)
/* kcsim_switch(save, to): saves the callee-saved state on this stack,
** stores rsp in *save, continues on the stack `to` (as saved by an
** earlier switch, or laid out by fiber_init). kcsim_fiber_start is where
** a new fiber begins: entry (r13) called with arg (r12). */
extern "C" void kcsim_switch(void **save, void *to);
extern "C" void kcsim_fiber_start(void);
asm(".text\n"
    ".globl kcsim_switch\n"
    ".hidden kcsim_switch\n"
    ".type kcsim_switch,@function\n"
    "kcsim_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size kcsim_switch, .-kcsim_switch\n"
    ".globl kcsim_fiber_start\n"
    ".hidden kcsim_fiber_start\n"
    ".type kcsim_fiber_start,@function\n"
    "kcsim_fiber_start:\n"
    "  movq %r12, %rdi\n"
    "  callq *%r13\n"
    "  ud2\n"
    ".size kcsim_fiber_start, .-kcsim_fiber_start\n");
#endif

struct thread_rec;

struct fiber {
  fiber *next_free;
  char *stack;                  /* lowest usable byte (above the guard page) */
  size_t size;
#if defined(__x86_64__)
  void *sp;
#else
  ucontext_t uc;
#endif
  thread_rec *thr;              /* the thread it runs now */
#ifdef KCSIM_ASAN
  void *fake;
#endif
};

enum { T_READY, T_WAIT_BLOCK, T_WAIT_WARP, T_DONE };

struct thread_rec {
  uint3 idx;
  int state;
  fiber *fib;                   /* NULL until started */
  /* __syncthreads */
  const char *file;
  int line, pred;
  /* warp op */
  unsigned mask;
  uint64_t value, result;
  int src, vote;
  unsigned ballot;
  const char *wfile;
  int wline;
};

/* the state of the launch in progress (under the lock) */
static std::mutex lock;
static fiber *free_fibers;
static int n_fibers;
static size_t stack_size;
static thread_rec *cur;
static fiber *cur_fiber;
#if defined(__x86_64__)
static void *sched_sp;
#else
static ucontext_t sched_uc;
#endif
#ifdef KCSIM_ASAN
static const void *sched_bottom;
static size_t sched_size;
#endif
static body_fn cur_body;
static void *cur_ctx;
static int block_result;        /* __syncthreads_count/and/or of the last release: */
static int block_voters;        /* votes true, of that many threads */
static thread_rec threads[1024];
static unsigned char *smem_buf;
static size_t smem_cap, smem_size;
/* a failure stops the launch: its code and message */
static cudaError_t fail_code;
static char fail_msg[1024];
/* KEEL_CUDA_SIM_ORDER: how blocks and threads take turns (kcsim.h) */
enum { ORDER_FORWARD, ORDER_REVERSE, ORDER_SHUFFLE };
static int order_mode = -1;
static uint64_t order_seed, rng;
static unsigned short turn[1024];   /* the threads of a block, in the order of this round */

static void to_scheduler(void);

static void fiber_main(void *arg) {
  fiber *f = (fiber *)arg;
#ifdef KCSIM_ASAN
  __sanitizer_finish_switch_fiber(f->fake, &sched_bottom, &sched_size);
#endif
  for (;;) {
    cur_body(cur_ctx);
    f->thr->state = T_DONE;
    to_scheduler();             /* comes back with another thread */
  }
}

#if !defined(__x86_64__)
static void fiber_main_uc(unsigned hi, unsigned lo) {
  fiber_main((void *)(((uintptr_t)hi << 32) | lo));
}
#endif

static size_t page_size(void) {
  long p = sysconf(_SC_PAGESIZE);
  return p > 0 ? (size_t)p : 4096;
}

static fiber *fiber_new(void) {
  size_t pg = page_size(), sz = (stack_size + pg - 1) / pg * pg;
  char *m = (char *)mmap(NULL, sz + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  fiber *f;
  if (m == MAP_FAILED) return NULL;
  mprotect(m, pg, PROT_NONE);   /* guard: an overflow faults */
  f = new (std::nothrow) fiber();
  if (!f) {
    munmap(m, sz + pg);
    return NULL;
  }
  f->stack = m + pg;
  f->size = sz;
#if defined(__x86_64__)
  {
    uint64_t *sp = (uint64_t *)(f->stack + sz) - 10;   /* 16-aligned: see kcsim_switch */
    sp[0] = 0x1F80 | ((uint64_t)0x037F << 32);         /* default MXCSR, x87 control word */
    sp[1] = sp[2] = 0;                                 /* r15, r14 */
    sp[3] = (uint64_t)(uintptr_t)&fiber_main;          /* r13: entry */
    sp[4] = (uint64_t)(uintptr_t)f;                    /* r12: its argument */
    sp[5] = sp[6] = 0;                                 /* rbx, rbp */
    sp[7] = (uint64_t)(uintptr_t)&kcsim_fiber_start;   /* ret */
    sp[8] = sp[9] = 0;
    f->sp = sp;
  }
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = sz;
  f->uc.uc_link = NULL;
  makecontext(&f->uc, (void (*)(void))fiber_main_uc, 2, (unsigned)((uintptr_t)f >> 32), (unsigned)(uintptr_t)f);
#endif
  n_fibers++;
  return f;
}

/* the scheduler continues fiber f (its thread becomes current) */
static void resume(fiber *f) {
  cur_fiber = f;
  cur = f->thr;
  g.thread_idx = cur->idx;
#ifdef KCSIM_ASAN
  void *fake = NULL;
  __sanitizer_start_switch_fiber(&fake, f->stack, f->size);
#endif
#if defined(__x86_64__)
  kcsim_switch(&sched_sp, f->sp);
#else
  swapcontext(&sched_uc, &f->uc);
#endif
#ifdef KCSIM_ASAN
  __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
  cur = NULL;
  cur_fiber = NULL;
}

/* a fiber gives control back (waiting, or done with its thread) */
static void to_scheduler(void) {
  fiber *f = cur_fiber;
#ifdef KCSIM_ASAN
  __sanitizer_start_switch_fiber(&f->fake, sched_bottom, sched_size);
#endif
#if defined(__x86_64__)
  kcsim_switch(&f->sp, sched_sp);
#else
  swapcontext(&f->uc, &sched_uc);
#endif
#ifdef KCSIM_ASAN
  __sanitizer_finish_switch_fiber(f->fake, &sched_bottom, &sched_size);
#endif
}

/* A fiber left waiting at a barrier when a launch failed: its stack is
** reset (the frames on it are dropped, never resumed). */
static void fiber_reset(fiber *f) {
#ifdef KCSIM_ASAN
  ASAN_UNPOISON_MEMORY_REGION(f->stack, f->size);
  f->fake = NULL;
#endif
  /* a fresh layout at the same address */
#if defined(__x86_64__)
  uint64_t *sp = (uint64_t *)(f->stack + f->size) - 10;
  sp[0] = 0x1F80 | ((uint64_t)0x037F << 32);
  sp[1] = sp[2] = 0;
  sp[3] = (uint64_t)(uintptr_t)&fiber_main;
  sp[4] = (uint64_t)(uintptr_t)f;
  sp[5] = sp[6] = 0;
  sp[7] = (uint64_t)(uintptr_t)&kcsim_fiber_start;
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = f->size;
  f->uc.uc_link = NULL;
  makecontext(&f->uc, (void (*)(void))fiber_main_uc, 2, (unsigned)((uintptr_t)f >> 32), (unsigned)(uintptr_t)f);
#endif
}

/* }====================================================================== */

/* {======================================================================
** Failures
** ======================================================================= */

static void failf(cudaError_t code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void failf(cudaError_t code, const char *fmt, ...) {
  va_list ap;
  if (fail_code != cudaSuccess) return;   /* the first one is the report */
  fail_code = code;
  va_start(ap, fmt);
  vsnprintf(fail_msg, sizeof fail_msg, fmt, ap);
  va_end(ap);
}

/* }====================================================================== */

/* {======================================================================
** Barriers (called on a fiber)
** ======================================================================= */

int syncthreads(int pred, int mode, const char *file, int line) {
  thread_rec *t = cur;
  t->state = T_WAIT_BLOCK;
  t->file = file;
  t->line = line;
  t->pred = pred;
  to_scheduler();
  switch (mode) {
    case 1: return block_result;
    case 2: return block_result == block_voters ? 1 : 0;
    case 3: return block_result != 0;
    default: return 0;
  }
}

warp_result warp_op(unsigned mask, uint64_t v, int src, int pred, const char *file, int line) {
  thread_rec *t = cur;
  warp_result r;
  t->state = T_WAIT_WARP;
  t->mask = mask;
  t->value = v;
  t->src = src;
  t->vote = pred;
  t->wfile = file;
  t->wline = line;
  to_scheduler();
  r.value = t->result;
  r.ballot = t->ballot;
  return r;
}

unsigned active_mask() {
  /* the unfinished lanes of the warp: the simulator cannot see divergence */
  unsigned nt = g.block_dim.x * g.block_dim.y * g.block_dim.z;
  unsigned me = g.thread_idx.x + g.block_dim.x * (g.thread_idx.y + g.block_dim.y * g.thread_idx.z);
  unsigned base = me & ~31u, m = 0;
  for (unsigned l = 0; l < 32 && base + l < nt; l++)
    if (threads[base + l].state != T_DONE) m |= 1u << l;
  return m;
}

void trap(const char *why, const char *file, int line) {
  failf(cudaErrorLaunchFailure, "%s at %s:%d, thread (%u,%u,%u) of block (%u,%u,%u)", why, file, line,
        g.thread_idx.x, g.thread_idx.y, g.thread_idx.z, g.block_idx.x, g.block_idx.y, g.block_idx.z);
  /* wait forever: the scheduler sees the failure and drops this fiber */
  cur->state = T_WAIT_BLOCK;
  cur->file = "__trap";
  cur->line = 0;
  for (;;) to_scheduler();
}

/* }====================================================================== */

/* {======================================================================
** Blocks
** ======================================================================= */

static const char *site_base(const char *f) {
  const char *s = strrchr(f, '/');
  return s ? s + 1 : f;
}

/* Releases the warp groups whose lanes have all arrived; returns how many. */
static int release_warps(unsigned nt) {
  int released = 0;
  for (unsigned base = 0; base < nt; base += 32) {
    unsigned nl = nt - base < 32 ? nt - base : 32;
    unsigned waiting = 0, live = 0;
    for (unsigned l = 0; l < nl; l++) {
      int st = threads[base + l].state;
      if (st != T_DONE) live |= 1u << l;
      if (st == T_WAIT_WARP) waiting |= 1u << l;
    }
    while (waiting) {
      unsigned first = (unsigned)__builtin_ctz(waiting);
      unsigned mask = threads[base + first].mask;
      /* the group: waiting lanes with this mask; it goes when every
      ** unfinished lane of the mask waits at a warp op */
      unsigned group = 0;
      for (unsigned l = 0; l < nl; l++)
        if ((waiting >> l & 1u) && threads[base + l].mask == mask) group |= 1u << l;
      waiting &= ~group;
      if ((live & mask) & ~group) continue;
      unsigned ballot = 0;
      for (unsigned l = 0; l < nl; l++)
        if ((group >> l & 1u) && threads[base + l].vote) ballot |= 1u << l;
      for (unsigned l = 0; l < nl; l++) {
        if (!(group >> l & 1u)) continue;
        thread_rec *t = &threads[base + l];
        int s = t->src < 0 ? (int)l : t->src;
        t->result = s >= 0 && s < 32 && (group >> s & 1u) ? threads[base + s].value : ~(uint64_t)0;
        t->ballot = ballot & mask;
        t->state = T_READY;
      }
      released++;
    }
  }
  return released;
}

/* Explains why no barrier can be released. */
static void deadlock(unsigned nt, const char *file, int line) {
  const thread_rec *a = NULL, *w = NULL, *b2 = NULL;
  for (unsigned i = 0; i < nt; i++) {
    const thread_rec *t = &threads[i];
    if (t->state == T_WAIT_BLOCK) {
      if (!a) a = t;
      else if (!b2 && (t->line != a->line || strcmp(t->file, a->file) != 0)) b2 = t;
    }
    if (t->state == T_WAIT_WARP && !w) w = t;
  }
  if (w && a)
    failf(cudaErrorLaunchFailure,
          "deadlock in the kernel launched at %s:%d, block (%u,%u,%u): thread (%u,%u,%u) waits at a warp op "
          "(%s:%d, mask 0x%08x) while thread (%u,%u,%u) waits at __syncthreads (%s:%d)",
          site_base(file), line, g.block_idx.x, g.block_idx.y, g.block_idx.z, w->idx.x, w->idx.y, w->idx.z,
          site_base(w->wfile), w->wline, w->mask, a->idx.x, a->idx.y, a->idx.z, site_base(a->file), a->line);
  else if (w)
    failf(cudaErrorLaunchFailure,
          "deadlock in the kernel launched at %s:%d, block (%u,%u,%u): thread (%u,%u,%u) waits at a warp op "
          "(%s:%d, mask 0x%08x) for lanes that never reach one",
          site_base(file), line, g.block_idx.x, g.block_idx.y, g.block_idx.z, w->idx.x, w->idx.y, w->idx.z,
          site_base(w->wfile), w->wline, w->mask);
  else if (a && b2)
    failf(cudaErrorLaunchFailure,
          "divergent __syncthreads in the kernel launched at %s:%d, block (%u,%u,%u): thread (%u,%u,%u) at %s:%d, "
          "thread (%u,%u,%u) at %s:%d",
          site_base(file), line, g.block_idx.x, g.block_idx.y, g.block_idx.z, a->idx.x, a->idx.y, a->idx.z,
          site_base(a->file), a->line, b2->idx.x, b2->idx.y, b2->idx.z, site_base(b2->file), b2->line);
  else
    failf(cudaErrorLaunchFailure, "deadlock in the kernel launched at %s:%d", site_base(file), line);
}

static fiber *take_fiber(void) {
  fiber *f = free_fibers;
  if (f) {
    free_fibers = f->next_free;
    return f;
  }
  return fiber_new();
}

static void give_fiber(fiber *f) {
  f->next_free = free_fibers;
  free_fibers = f;
}

static uint64_t next_random(void) {   /* xorshift64* */
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return rng * 0x2545F4914F6CDD1DULL;
}

/* Sets order_mode and order_seed from a KEEL_CUDA_SIM_ORDER value (NULL
** or empty: forward); -1, and nothing changed, for anything else. */
static int order_parse(const char *e) {
  int mode;
  uint64_t seed = 0x9E3779B97F4A7C15ULL;
  if (!e || !*e || strcmp(e, "forward") == 0) {
    mode = ORDER_FORWARD;
  } else if (strcmp(e, "reverse") == 0) {
    mode = ORDER_REVERSE;
  } else if (strncmp(e, "shuffle", 7) == 0 && (e[7] == 0 || e[7] == ':')) {
    mode = ORDER_SHUFFLE;
    if (e[7] == ':') seed ^= strtoull(e + 8, NULL, 0) * 0xBF58476D1CE4E5B9ULL;
  } else {
    return -1;
  }
  order_mode = mode;
  order_seed = seed;
  return 0;
}

static void order_init(void) {
  static int warned;
  const char *e = getenv("KEEL_CUDA_SIM_ORDER");
  if (order_parse(e) == 0) return;
  order_parse(NULL);
  /* a typo must not quietly test the default order */
  if (!warned++)
    fprintf(stderr, "kcsim: KEEL_CUDA_SIM_ORDER=%s: expected forward, reverse or shuffle[:seed]; using forward\n",
            e);
}

int sim_set_order(const char *order) {
  std::lock_guard<std::mutex> hold(lock);
  if (!order) {
    order_init();
    return 0;
  }
  return order_parse(order);
}

/* turn[0..nt) for a block's threads: linear or reversed once per block
** (first), shuffled again for every round between barriers */
static void order_threads(unsigned nt, int first) {
  if (first)
    for (unsigned k = 0; k < nt; k++)
      turn[k] = (unsigned short)(order_mode == ORDER_REVERSE ? nt - 1 - k : k);
  if (order_mode == ORDER_SHUFFLE)
    for (unsigned k = nt; k > 1; k--) {
      unsigned j = (unsigned)(next_random() % k);
      unsigned short t = turn[k - 1];
      turn[k - 1] = turn[j];
      turn[j] = t;
    }
}

static uint64_t gcd64(uint64_t a, uint64_t b) {
  while (b) {
    uint64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

/* Runs one block; 0 when it failed (fail_code says why). */
static int run_block(unsigned nt, const char *file, int line) {
  unsigned bx = g.block_dim.x, by = g.block_dim.y;
  unsigned live = nt;
  for (unsigned i = 0; i < nt; i++) {
    thread_rec *t = &threads[i];
    t->idx.x = i % bx;
    t->idx.y = i / bx % by;
    t->idx.z = i / (bx * by);
    t->state = T_READY;
    t->fib = NULL;
  }
  if (smem_size) memset(smem_buf, 0xFF, smem_size);
  block_serial++;               /* KC_SHARED arrays are filled again at first use */
  for (int round = 0;; round++) {
    order_threads(nt, round == 0);
    for (unsigned k = 0; k < nt && fail_code == cudaSuccess; k++) {
      thread_rec *t = &threads[turn[k]];
      if (t->state != T_READY) continue;
      if (!t->fib) {
        fiber *f = take_fiber();
        if (!f) {
          failf(cudaErrorMemoryAllocation, "no memory for the stack of an emulated thread (%d made)", n_fibers);
          break;
        }
        f->thr = t;
        t->fib = f;
      }
      resume(t->fib);
      if (t->state == T_DONE) {
        give_fiber(t->fib);
        t->fib = NULL;
        live--;
      }
    }
    if (fail_code != cudaSuccess || live == 0) break;
    if (release_warps(nt)) continue;
    /* every unfinished thread waits: at one __syncthreads? */
    const thread_rec *first = NULL;
    int ok = 1, count = 0, voters = 0;
    for (unsigned i = 0; i < nt && ok; i++) {
      const thread_rec *t = &threads[i];
      if (t->state == T_DONE) continue;
      if (t->state != T_WAIT_BLOCK) ok = 0;
      else if (!first) first = t;
      else if (t->line != first->line || strcmp(t->file, first->file) != 0) ok = 0;
    }
    if (!ok) {
      deadlock(nt, file, line);
      break;
    }
    for (unsigned i = 0; i < nt; i++) {
      thread_rec *t = &threads[i];
      if (t->state == T_DONE) continue;
      count += t->pred != 0;
      voters++;
      t->state = T_READY;
    }
    block_result = count;
    block_voters = voters;
  }
  if (fail_code != cudaSuccess) {
    /* fibers stopped mid-kernel are reset, never resumed */
    for (unsigned i = 0; i < nt; i++) {
      thread_rec *t = &threads[i];
      if (t->fib) {
        fiber_reset(t->fib);
        give_fiber(t->fib);
        t->fib = NULL;
      }
    }
    return 0;
  }
  return 1;
}

void *dynamic_smem() { return smem_buf; }

/* }====================================================================== */

/* {======================================================================
** Launches
** ======================================================================= */

/* Launch sites and their counts (KEEL_CUDA_SIM_STATS=2): a small open
** table keyed by the site's file pointer and line (string literals of
** __FILE__ are one pointer per file). Sites past its size go uncounted. */
#define SITES 1024
static struct site { const char *file; int line; uint64_t n; } sites[SITES];
static int sites_on = -1;

void sim_count_site(const char *file, int line) {
  if (sites_on < 0) {
    const char *e = getenv("KEEL_CUDA_SIM_STATS");
    sites_on = e && atoi(e) >= 2;
  }
  if (!sites_on) return;
  size_t h = ((uintptr_t)file * 31u + (unsigned)line) % SITES;
  for (int k = 0; k < SITES; k++, h = (h + 1) % SITES) {
    if (!sites[h].file) { sites[h].file = file; sites[h].line = line; }
    if (sites[h].file == file && sites[h].line == line) { sites[h].n++; return; }
  }
}

static int by_count(const void *a, const void *b) {
  uint64_t x = ((const struct site *)a)->n, y = ((const struct site *)b)->n;
  return x < y ? 1 : x > y ? -1 : 0;
}

void sim_print_sites(void) {
  if (sites_on != 1) return;
  qsort(sites, SITES, sizeof sites[0], by_count);
  for (int k = 0; k < SITES && sites[k].n; k++)
    fprintf(stderr, "kcsim: %8llu launches at %s:%d\n", (unsigned long long)sites[k].n, site_base(sites[k].file),
            sites[k].line);
}

static size_t stack_bytes(void) {
  const char *e = getenv("KEEL_CUDA_SIM_STACK");
  long v = e && *e ? strtol(e, NULL, 10) : 0;
  return v >= 16384 ? (size_t)v : (size_t)KCSIM_STACK;
}

/* Runs a launch's blocks (now, or when its stream runs it); its failure
** is the launch error, and the result. */
static cudaError_t execute(dim3 grid, dim3 block, size_t smem, body_fn body, void *ctx, const char *file, int line) {
  std::lock_guard<std::mutex> hold(lock);
  unsigned nt = block.x * block.y * block.z;
  if (!stack_size) stack_size = stack_bytes();
  if (smem > smem_cap) {
    unsigned char *p = (unsigned char *)realloc(smem_buf, smem);
    if (!p) {
      sim_set_launch_error(cudaErrorMemoryAllocation, "no host memory for %zu bytes of shared memory", smem);
      return cudaErrorMemoryAllocation;
    }
    smem_buf = p;
    smem_cap = smem;
  }
  smem_size = smem;
  cur_body = body;
  cur_ctx = ctx;
  fail_code = cudaSuccess;
  g.block_dim = block;
  g.grid_dim = grid;
  if (order_mode < 0) order_init();
  /* the sequence starts from the seed and the launch site (its file's
  ** name, not address), so a failing order is the same in a rerun of one
  ** spec as in the whole suite */
  rng = order_seed;
  for (const char *p = site_base(file); *p; p++) rng = (rng ^ (unsigned char)*p) * 0x100000001B3ULL;
  rng = (rng ^ (uint64_t)line) * 0x94D049BB133111EBULL;
  if (!rng) rng = 1;
  /* blocks in linear order (x fastest), reversed, or through the
  ** permutation b -> (a*b + c) mod n, a prime to n */
  uint64_t nb = (uint64_t)grid.x * grid.y * grid.z, a = 1, c = 0;
  if (order_mode == ORDER_SHUFFLE && nb > 1) {
    a = next_random() % nb | 1;
    while (gcd64(a, nb) != 1) a = a + 1 < nb ? a + 1 : 1;
    c = next_random() % nb;
  }
  for (uint64_t k = 0; k < nb; k++) {
    uint64_t b = order_mode == ORDER_REVERSE ? nb - 1 - k
               : order_mode == ORDER_SHUFFLE ? (uint64_t)(((unsigned __int128)a * k + c) % nb) : k;
    g.block_idx = uint3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / ((uint64_t)grid.x * grid.y))};
    if (!run_block(nt, file, line)) {
      sim_set_launch_error(fail_code, "%s", fail_msg);
      return fail_code;
    }
    sim_stats.blocks++;
    sim_stats.threads += nt;
  }
  return cudaSuccess;
}

/* A launch: its configuration is checked now (an error of the launch
** itself, as on a GPU); the grid runs when its stream gets to it. */
void run(dim3 grid, dim3 block, size_t smem, cudaStream_t st, body_fn body, void *ctx, void (*drop)(void *),
         const void *kernel, const char *file, int line) {
  size_t smem_max = sim_smem_limit(kernel);
  sim_count_site(file, line);
  if (!ctx) {
    sim_set_launch_error(cudaErrorMemoryAllocation, "no host memory for the arguments of the launch at %s:%d",
                         site_base(file), line);
    return;
  }
  if (!block.x || !block.y || !block.z || !grid.x || !grid.y || !grid.z || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || (uint64_t)block.x * block.y * block.z > 1024 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 0x7fffffffu) {
    sim_set_launch_error(cudaErrorInvalidConfiguration,
                         "invalid launch configuration at %s:%d: grid (%u,%u,%u), block (%u,%u,%u)", site_base(file),
                         line, grid.x, grid.y, grid.z, block.x, block.y, block.z);
    drop(ctx);
    return;
  }
  if (smem > smem_max) {
    sim_set_launch_error(cudaErrorInvalidValue,
                         "launch at %s:%d asks for %zu bytes of dynamic shared memory, the limit is %zu "
                         "(cudaFuncSetAttribute raises it)",
                         site_base(file), line, smem, smem_max);
    drop(ctx);
    return;
  }
  sim_stats.launches++;
  cudaError_t e = sim_enqueue(st, [=]() {
    cudaError_t r = execute(grid, block, smem, body, ctx, file, line);
    drop(ctx);
    return r;
  });
  /* run at once (its failure is the launch error already), or queued */
  if (e == cudaErrorMemoryAllocation && sim_async()) {
    sim_set_launch_error(e, "no host memory to queue the launch at %s:%d", site_base(file), line);
    drop(ctx);
  }
}

}  // namespace kcsim

/* }====================================================================== */
