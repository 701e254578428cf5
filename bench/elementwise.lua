-- bench/elementwise.lua: memory-bound elementwise throughput, keel vs plain C.
--
-- `local c = a + b` on float32 tensors of n = 16M elements (64 MiB each),
-- counted as 3 * 4 * n bytes moved per op, in GB/s (1e9 bytes/s). Peers
-- (bench/elementwise_peer.c, single thread, -O2, same process):
--   prealloc  o[i] = a[i] + b[i] into a preallocated, already-touched o
--   fresh     the same loop into a freshly malloc'd o each op (freed after):
--             what an engine pays with no allocation cache
-- Extra pair (informational): keel `d:add_(b)` in place, no allocation,
-- versus the C loop d[i] += b[i]: the engine's kernel without its
-- allocation cost. (In place moves less memory than a + b into a separate
-- output, which also pays write-allocate reads: compare it only with its
-- own peer.)
--
-- Samples are interleaved prealloc, fresh, keel, c_inplace, keel_inplace
-- per repetition; ratios are medians of per-repetition ratios.
--
-- Timed with the calling thread's CPU time by default (user + system, so
-- page faults count; BENCH_CLOCK=wall for the wall clock).
--
-- env: BENCH_EW_N (default 16777216), BENCH_EW_REPS=7, BENCH_EW_ITERS=4,
--      BENCH_SCALE, KEEL_CPATH

package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
local B = require "common"
local keel = require "keel"
local peer = require "elementwise_peer"

local n = B.env_int("BENCH_EW_N", 16 * 1024 * 1024)
local reps = B.env_int("BENCH_EW_REPS", 7)
local iters = B.scaled(B.env_int("BENCH_EW_ITERS", 4))
local now, clock = B.clock("thread")   -- single-threaded on both sides
local bytes = 3.0 * 4 * n

B.note("elementwise: keel.core from %s; n = %d float32, %d ops per sample; %s clock", B.keel_cpath, n,
       iters, clock)

local function peer_sample(fn, k)
  local t0 = now()
  fn(k)
  return now() - t0
end

peer.setup(n)
keel.manual_seed(1)
local a, b = keel.rand { n }, keel.rand { n }
local d = a:clone()

local function keel_add(k)
  local t0 = now()
  for _ = 1, k do
    local c = a + b
  end
  return now() - t0
end

local function keel_add_(k)
  local t0 = now()
  for _ = 1, k do d:add_(b) end
  return now() - t0
end

-- warmup: page faults of the first outputs, engine cache, CPU clocks
peer_sample(peer.prealloc, iters); peer_sample(peer.fresh, iters); keel_add(iters)
peer_sample(peer.inplace, iters); keel_add_(iters)
local st0 = keel.memory_stats()

local g = { prealloc = {}, fresh = {}, keel = {}, c_inplace = {}, inplace = {} }
local r_pre, r_fresh, r_inpl = {}, {}, {}
for r = 1, reps do
  g.prealloc[r] = bytes * iters / peer_sample(peer.prealloc, iters) * 1e-9
  g.fresh[r] = bytes * iters / peer_sample(peer.fresh, iters) * 1e-9
  g.keel[r] = bytes * iters / keel_add(iters) * 1e-9
  g.c_inplace[r] = bytes * iters / peer_sample(peer.inplace, iters) * 1e-9
  g.inplace[r] = bytes * iters / keel_add_(iters) * 1e-9
  r_pre[r] = g.keel[r] / g.prealloc[r]
  r_fresh[r] = g.keel[r] / g.fresh[r]
  r_inpl[r] = g.inplace[r] / g.c_inplace[r]
end
local st1 = keel.memory_stats()

for _, k in ipairs { "prealloc", "fresh", "keel", "c_inplace", "inplace" } do
  B.note("add_16M %-9s GB/s: %s", k, B.spread(g[k]))
end
B.note("keel during the timed reps: %d storage allocs, %d served from the cache; peak %.0f MiB",
       st1.allocs - st0.allocs, st1.cache_hits - st0.cache_hits, st1.peak_bytes / 2 ^ 20)
B.result("add_16M_c_prealloc", B.median(g.prealloc), "GB/s")
B.result("add_16M_c_fresh", B.median(g.fresh), "GB/s")
B.result("add_16M_keel", B.median(g.keel), "GB/s")
B.result("add_16M_c_inplace", B.median(g.c_inplace), "GB/s")
B.result("add_16M_keel_inplace", B.median(g.inplace), "GB/s")
B.result("add_16M_ratio", B.median(r_pre), "x_c_prealloc")
B.result("add_16M_ratio_fresh", B.median(r_fresh), "x_c_fresh")
B.result("add_16M_inplace_ratio", B.median(r_inpl), "x_c_inplace")
