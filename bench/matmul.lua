-- bench/matmul.lua: square float32 sgemm throughput, keel vs OpenBLAS direct.
--
-- keel side: what a user's `local c = a:matmul(b)` costs from Lua, fresh
-- output included (the engine recycles freed blocks through its cache).
-- Peer: cblas_sgemm from C (bench/blas_direct.c) into a preallocated C,
-- loaded as a Lua module into the same process, so both use one OpenBLAS
-- with one thread pool and the same OPENBLAS_NUM_THREADS.
--
-- Per size: one warmup sample of each, then R repetitions interleaved
-- peer, keel, peer, keel, ...; each sample runs enough products to last
-- ~BENCH_MATMUL_SAMPLE_S seconds. The ratio is the median of the per-pair
-- ratios keel/peer (pairs are adjacent in time, so drift cancels).
--
-- env: BENCH_MATMUL_SIZES="256,512,1024,2048", BENCH_MATMUL_REPS=9,
--      BENCH_MATMUL_SAMPLE_S=0.15, BENCH_SCALE, KEEL_CPATH, OPENBLAS_NUM_THREADS

package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
local B = require "common"
local keel = require "keel"
local peer = require "blas_direct"

local sizes = {}
for s in (os.getenv("BENCH_MATMUL_SIZES") or "256,512,1024,2048"):gmatch("%d+") do
  sizes[#sizes + 1] = tonumber(s)
end
local reps = B.env_int("BENCH_MATMUL_REPS", 9)
local sample_s = (tonumber(os.getenv("BENCH_MATMUL_SAMPLE_S") or "") or 0.15) * B.scale
local threads = peer.threads()
local now, clock = B.clock("wall")   -- 2-thread runs need the wall clock

B.note("matmul: keel.core from %s; OpenBLAS %s; %d thread(s); %s clock", B.keel_cpath, peer.config(),
       threads, clock)

local function peer_sample(iters)
  local t0 = now()
  peer.run(iters)
  return now() - t0
end

local function keel_sample(a, b, iters)
  local t0 = now()
  for _ = 1, iters do
    local c = a:matmul(b)
  end
  return now() - t0
end

for _, n in ipairs(sizes) do
  local flop = 2.0 * n * n * n
  peer.setup(n)
  keel.manual_seed(1)
  local a, b = keel.randn { n, n }, keel.randn { n, n }
  -- calibrate on the peer: a sample lasts ~sample_s
  local t1 = peer_sample(1)               -- also warms the thread pool
  t1 = math.min(t1, peer_sample(1))
  local iters = math.max(1, math.floor(sample_s / t1 + 0.5))
  -- warmup both sides (first-touch page faults, engine cache)
  peer_sample(iters)
  keel_sample(a, b, iters)
  local st0 = keel.memory_stats()

  local gp, gk, ratio = {}, {}, {}
  for r = 1, reps do
    local tp = peer_sample(iters)
    local tk = keel_sample(a, b, iters)
    gp[r] = flop * iters / tp * 1e-9
    gk[r] = flop * iters / tk * 1e-9
    ratio[r] = gk[r] / gp[r]
  end
  local st1 = keel.memory_stats()
  local tag = ("matmul_%d_t%d"):format(n, threads)
  B.note("%s: %d products per sample; openblas %s; keel %s GFLOP/s; ratio %s", tag, iters,
         B.spread(gp), B.spread(gk), B.spread(ratio))
  B.note("%s: keel allocs %d, cache hits %d during the timed reps", tag,
         st1.allocs - st0.allocs, st1.cache_hits - st0.cache_hits)
  B.result(tag .. "_openblas", B.median(gp), "GFLOP/s")
  B.result(tag .. "_keel", B.median(gk), "GFLOP/s")
  B.result(tag .. "_ratio", B.median(ratio), "x_openblas")
  a, b = nil, nil
  collectgarbage()
  collectgarbage()
  keel.memory_trim()
end
