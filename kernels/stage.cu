/*
** stage.cu: host-to-device copies that do not wait for the device.
**
** cudaMemcpyAsync from pageable memory stages through a driver buffer and,
** past a small size, holds the host until the copy has run, which on a
** busy stream means until every queued kernel has run: a training step
** that uploads its batch and targets would drain the queue each time.
** Here the bytes go into a pinned ring first (a host memcpy), the copy
** from there is queued, and the caller may reuse its buffer at once. A
** region of the ring is written again only after the copy that last read
** it has run (an event per copy, waited for only when the ring comes round
** to it before the copy has run). Copies larger than half the ring take
** the plain synchronous road, which costs nothing extra for them: the
** host would copy them twice here.
*/
#include <stdlib.h>
#include <string.h>
#include "common.cuh"

#define ST_RING (16u << 20)   /* bytes of pinned memory, allocated at first use */
#define ST_SLOTS 64           /* copies in flight */

struct kc_stage {
  char *ring;
  size_t size;                 /* bytes of ring (ST_RING or more) */
  size_t head;                 /* where the next copy's bytes go */
  struct {
    size_t lo, hi;             /* ring bytes the copy reads */
    cudaEvent_t done;          /* recorded after it on the stream */
  } slot[ST_SLOTS];
  int first, count;            /* copies not yet known to have run, oldest first */
};

static int st_init(kc_state *s) {
  struct kc_stage *g = (struct kc_stage *)calloc(1, sizeof *g);
  void *ring = NULL;
  int e;
  if (!g) return KC_ERR_NOMEM;
  if ((e = kc_grow(s, &ring, &g->size, ST_RING, 1))) {
    free(g);
    return e;
  }
  g->ring = (char *)ring;
  for (int i = 0; i < ST_SLOTS; i++) {
    if ((e = kc_check_cuda(cudaEventCreateWithFlags(&g->slot[i].done, cudaEventDisableTiming)))) {
      while (i-- > 0) cudaEventDestroy(g->slot[i].done);
      cudaFreeHost(g->ring);
      free(g);
      return e;
    }
  }
  s->stage = g;
  return KC_OK;
}

/* Forgets the copies up to and including the k-th oldest, waiting for it
** (the stream runs them in order, so the older ones have run too). */
static int st_retire(struct kc_stage *g, int k) {
  int e = kc_check_cuda(cudaEventSynchronize(g->slot[(g->first + k) % ST_SLOTS].done));
  g->first = (g->first + k + 1) % ST_SLOTS;
  g->count -= k + 1;
  return e;
}

/* Forgets the copies that have run, oldest first, without waiting: a
** step's few uploads (a batch, the optimizer's descriptor tables) come
** round to a slot long after its copy ran, and need not wait for it. */
static void st_reap(struct kc_stage *g) {
  while (g->count > 0) {
    cudaError_t e = cudaEventQuery(g->slot[g->first].done);
    if (e != cudaSuccess) {
      /* not run yet: not an error, so the runtime's last error is cleared
      ** of it; a real error stays for the next wait to report */
      if (e == cudaErrorNotReady) (void)cudaGetLastError();
      return;
    }
    g->first = (g->first + 1) % ST_SLOTS;
    g->count--;
  }
}

/* Room for n bytes at [*lo, *lo + n): the newest copy still reading any of
** them is waited for. */
static int st_reserve(struct kc_stage *g, size_t n, size_t *lo) {
  size_t a = g->head + n <= g->size ? g->head : 0;
  int e, newest = -1;
  st_reap(g);
  if (g->count == ST_SLOTS && (e = st_retire(g, 0))) return e;
  for (int k = 0; k < g->count; k++) {
    int i = (g->first + k) % ST_SLOTS;
    if (g->slot[i].lo < a + n && a < g->slot[i].hi) newest = k;
  }
  if (newest >= 0 && (e = st_retire(g, newest))) return e;
  *lo = a;
  return KC_OK;
}

int kc_stage_h2d(kc_state *s, void *dst, const void *src, size_t n) {
  struct kc_stage *g;
  size_t lo;
  int e, i;
  if (!n) return KC_OK;
  if (!s->stage && !s->stage_off && st_init(s) != KC_OK) s->stage_off = 1;   /* no pinned memory: never again */
  if (!s->stage || n > s->stage->size / 2) {
    /* the synchronous road */
    e = kc_check_cuda(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s->stream));
    return e ? e : kc_sync(s);
  }
  g = s->stage;
  if ((e = st_reserve(g, n, &lo))) return e;
  memcpy(g->ring + lo, src, n);
  if ((e = kc_check_cuda(cudaMemcpyAsync(dst, g->ring + lo, n, cudaMemcpyHostToDevice, s->stream)))) return e;
  i = (g->first + g->count) % ST_SLOTS;
  g->slot[i].lo = lo;
  g->slot[i].hi = lo + n;
  if ((e = kc_check_cuda(cudaEventRecord(g->slot[i].done, s->stream)))) {
    /* without its event the copy cannot be tracked: wait for it here */
    int e2 = kc_sync(s);
    return e2 ? e2 : e;
  }
  g->count++;
  g->head = lo + n;
  return KC_OK;
}

void kc_stage_close(kc_state *s) {
  struct kc_stage *g = s->stage;
  if (!g) return;
  /* the caller has synchronized the stream: no copy reads the ring now */
  for (int i = 0; i < ST_SLOTS; i++) cudaEventDestroy(g->slot[i].done);
  cudaFreeHost(g->ring);
  free(g);
  s->stage = NULL;
}
