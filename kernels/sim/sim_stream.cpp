/*
** sim_stream.cpp: streams, events, and when queued work runs.
**
** By default work runs when it is queued (a launch, an async copy or
** memset, a cuBLAS call), so every stream is always idle and every event
** complete: simple, and it hides every mistake in how the host waits for
** the device. KEEL_CUDA_SIM_ASYNC=1 plays a device that is always behind
** instead: work waits in its stream's queue, in order, until the host
** waits for it (cudaStreamSynchronize, cudaEventSynchronize, a stream
** waiting on an event, cudaDeviceSynchronize, cudaFree, cudaFreeHost, a
** copy into pageable memory), or asks about it too often. A query of
** unfinished work (cudaEventQuery, cudaStreamQuery) answers
** cudaErrorNotReady; only a host that keeps asking (POLLS times in a row)
** sees the device catch up, so code that polls in a loop ends, and code
** that looks once and moves on finds its work still queued when it comes
** round again. With it:
** - a copy from page-locked memory reads its source when it runs: a host
**   that writes the buffer again before the copy has run sends the new
**   bytes (on a GPU: sometimes);
** - a copy into page-locked memory fills it with 0xFF bytes when queued
**   and writes it when it runs: a host that reads it before waiting reads
**   NaN / -1 (on a GPU: sometimes the old contents);
** - a copy from pageable memory takes its bytes at once and one into
**   pageable memory waits, as CUDA's do;
** - a kernel's failure (a trap, a deadlock) is the error of the wait that
**   ran it, as an asynchronous error on a GPU.
** Streams created non-blocking (keel's) are not waited for by cudaMemcpy
** and cudaMemset, which run on the legacy stream; blocking ones are.
**
** Lock order: the queue lock, then the scheduler's (a queued launch runs
** under it), then the memory lock. Nothing takes the queue lock while
** holding another.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <utility>

#include "kcsim.h"
#include "sim_internal.h"

/* queries of unfinished work answered "not ready" before it is run */
#define POLLS 64

struct kcsim_stream {
  unsigned flags;
  unsigned polls;               /* cudaStreamQuery calls since work was last run */
  std::deque<std::function<cudaError_t()>> queue;   /* work not yet run, oldest first */
  cudaError_t err;              /* the first failure since the last wait: that wait's result */
};
struct kcsim_event {
  double t;                     /* seconds, CLOCK_MONOTONIC, when its last record ran */
  int recorded;
  uint64_t rec, done;           /* records queued, records run: pending while done < rec */
  unsigned polls;               /* cudaEventQuery calls while pending */
  kcsim_stream *stream;         /* of the last record */
};

namespace kcsim {

static std::recursive_mutex qlock;
static kcsim_stream legacy;     /* NULL, cudaStreamLegacy, cudaStreamPerThread */
static std::set<kcsim_stream *> *streams;   /* every stream made, for a device-wide wait */
static std::map<uintptr_t, size_t> *pinned; /* page-locked host blocks: base -> size */
static int async_mode = -1;

int sim_async(void) {
  if (async_mode < 0) {
    const char *e = getenv("KEEL_CUDA_SIM_ASYNC");
    async_mode = e && *e && strcmp(e, "0") != 0;
  }
  return async_mode;
}

int sim_set_async(int on) {
  std::lock_guard<std::recursive_mutex> hold(qlock);
  int prev = sim_async();
  if (prev && !on) (void)sim_wait_device();   /* nothing left queued behind the switch */
  async_mode = on < 0 ? -1 : on != 0;
  return prev;
}

static kcsim_stream *queue_of(cudaStream_t st) {
  return st == NULL || st == cudaStreamLegacy || st == cudaStreamPerThread ? &legacy : st;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Runs q's work, oldest first, until done() says enough or none is left;
** a failure is kept for the stream's next wait. (under qlock) */
template <typename Done>
static void run_queue(kcsim_stream *q, Done done) {
  while (!q->queue.empty() && !done()) {
    std::function<cudaError_t()> w = std::move(q->queue.front());
    q->queue.pop_front();
    cudaError_t e = w();
    if (e != cudaSuccess && q->err == cudaSuccess) q->err = e;
  }
}

/* The stream's kept failure, forgotten once reported. (under qlock) */
static cudaError_t take_error(kcsim_stream *q) {
  cudaError_t e = q->err;
  q->err = cudaSuccess;
  return e;
}

static int pending(const kcsim_event *ev) { return ev->done < ev->rec; }

cudaError_t sim_enqueue(cudaStream_t st, std::function<cudaError_t()> work) {
  if (!sim_async()) return work();
  std::lock_guard<std::recursive_mutex> hold(qlock);
  try {
    queue_of(st)->queue.push_back(std::move(work));
  } catch (...) {
    return cudaErrorMemoryAllocation;
  }
  return cudaSuccess;
}

/* Runs all of q's work; its kept failure. (under qlock) */
static cudaError_t drain(kcsim_stream *q) {
  run_queue(q, [] { return false; });
  return take_error(q);
}

/* The legacy stream's work, then every stream's (or only the blocking
** ones'); the first failure. */
static cudaError_t drain_all(bool blocking_only) {
  if (!sim_async()) return cudaSuccess;
  std::lock_guard<std::recursive_mutex> hold(qlock);
  cudaError_t e = drain(&legacy);
  if (streams)
    for (kcsim_stream *q : *streams)
      if (!blocking_only || !(q->flags & cudaStreamNonBlocking)) {
        cudaError_t e2 = drain(q);
        if (e == cudaSuccess) e = e2;
      }
  return e;
}

cudaError_t sim_wait_stream(cudaStream_t st) {
  if (!sim_async()) return cudaSuccess;
  std::lock_guard<std::recursive_mutex> hold(qlock);
  return drain(queue_of(st));
}

cudaError_t sim_wait_device(void) { return drain_all(false); }
cudaError_t sim_wait_legacy(void) { return drain_all(true); }

int sim_pinned_add(void *p, size_t n) {
  std::lock_guard<std::recursive_mutex> hold(qlock);
  try {
    if (!pinned) pinned = new std::map<uintptr_t, size_t>();
    (*pinned)[(uintptr_t)p] = n ? n : 1;
  } catch (...) {
    return 0;
  }
  return 1;
}

void sim_pinned_remove(void *p) {
  std::lock_guard<std::recursive_mutex> hold(qlock);
  if (pinned) pinned->erase((uintptr_t)p);
}

int sim_is_pinned(const void *p, size_t n) {
  std::lock_guard<std::recursive_mutex> hold(qlock);
  if (!pinned) return 0;
  uintptr_t a = (uintptr_t)p;
  auto it = pinned->upper_bound(a);
  if (it == pinned->begin()) return 0;
  --it;
  return a >= it->first && a + n <= it->first + it->second;
}

}  // namespace kcsim

using namespace kcsim;

/* {======================================================================
** Streams and events
** ======================================================================= */

extern "C" {

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *st, unsigned flags) {
  std::lock_guard<std::recursive_mutex> hold(qlock);
  *st = new (std::nothrow) kcsim_stream();
  if (!*st) return sim_fail(cudaErrorMemoryAllocation);
  (*st)->flags = flags;
  (*st)->err = cudaSuccess;
  try {
    if (!streams) streams = new std::set<kcsim_stream *>();
    streams->insert(*st);
  } catch (...) {
    delete *st;
    *st = NULL;
    return sim_fail(cudaErrorMemoryAllocation);
  }
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *st) { return cudaStreamCreateWithFlags(st, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t st) {
  if (queue_of(st) == &legacy) return sim_fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> hold(qlock);
  /* CUDA lets queued work finish after the call returns: it runs now */
  (void)sim_wait_stream(st);
  if (streams) streams->erase(st);
  delete st;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t st) {
  sim_stats.waits++;
  return sim_fail(sim_wait_stream(st));
}

cudaError_t cudaStreamQuery(cudaStream_t st) {
  std::lock_guard<std::recursive_mutex> hold(qlock);
  kcsim_stream *q = queue_of(st);
  if (q->queue.empty()) return sim_fail(take_error(q));
  if (++q->polls >= POLLS) {
    q->polls = 0;
    run_queue(q, [] { return false; });
  }
  return sim_fail(cudaErrorNotReady);
}

cudaError_t cudaStreamWaitEvent(cudaStream_t st, cudaEvent_t ev, unsigned flags) {
  (void)flags;
  if (!ev) return sim_fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> hold(qlock);
  kcsim_stream *q = queue_of(st), *from = ev->stream;
  if (!pending(ev) || from == q) return cudaSuccess;   /* done, or in order anyway */
  uint64_t r = ev->rec;
  /* when st reaches this point, ev's stream runs up to the record */
  return sim_fail(sim_enqueue(st, [ev, r, from]() {
    run_queue(from, [ev, r] { return ev->done >= r; });
    return cudaSuccess;
  }));
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *ev, unsigned flags) {
  (void)flags;
  *ev = new (std::nothrow) kcsim_event();
  return *ev ? cudaSuccess : sim_fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaEventCreate(cudaEvent_t *ev) { return cudaEventCreateWithFlags(ev, 0); }

cudaError_t cudaEventRecord(cudaEvent_t ev, cudaStream_t st) {
  if (!ev) return sim_fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> hold(qlock);
  uint64_t r = ++ev->rec;
  ev->recorded = 1;
  ev->polls = 0;
  ev->stream = queue_of(st);
  return sim_fail(sim_enqueue(st, [ev, r]() {
    if (ev->done < r) {
      ev->done = r;
      ev->t = now();
    }
    return cudaSuccess;
  }));
}

cudaError_t cudaEventSynchronize(cudaEvent_t ev) {
  if (!ev) return sim_fail(cudaErrorInvalidResourceHandle);
  sim_stats.waits++;
  std::lock_guard<std::recursive_mutex> hold(qlock);
  if (!pending(ev)) return cudaSuccess;
  uint64_t r = ev->rec;
  run_queue(ev->stream, [ev, r] { return ev->done >= r; });
  return sim_fail(take_error(ev->stream));
}

cudaError_t cudaEventQuery(cudaEvent_t ev) {
  if (!ev) return sim_fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> hold(qlock);
  if (!pending(ev)) return cudaSuccess;
  if (++ev->polls >= POLLS) {
    /* a host polling in a loop: the device catches up (a failure on the
    ** way is the next wait's to report) */
    uint64_t r = ev->rec;
    run_queue(ev->stream, [ev, r] { return ev->done >= r; });
  }
  return sim_fail(cudaErrorNotReady);
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
  if (!a || !b) return sim_fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> hold(qlock);
  if (!a->recorded || !b->recorded) return sim_fail(cudaErrorInvalidResourceHandle);
  if (pending(a) || pending(b)) return sim_fail(cudaErrorNotReady);
  *ms = (float)((b->t - a->t) * 1e3);
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t ev) {
  if (!ev) return cudaSuccess;
  std::lock_guard<std::recursive_mutex> hold(qlock);
  /* a record still queued refers to it: run up to it first */
  if (pending(ev)) {
    uint64_t r = ev->rec;
    run_queue(ev->stream, [ev, r] { return ev->done >= r; });
  }
  delete ev;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  sim_stats.waits++;
  return sim_fail(sim_wait_device());
}

}  // extern "C"

/* }====================================================================== */
