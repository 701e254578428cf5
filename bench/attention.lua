-- bench/attention.lua: fused scaled-dot-product attention (keel_sdpa, the
-- default of F.scaled_dot_product_attention) against the composed path
-- (need_weights = true: matmul, softmax, matmul with the [..., L, S]
-- weights materialised) on the CPU, forward + backward.
--
-- Shapes: q, k, v [BH, L, E] float32 with requires_grad, causal or not.
-- Samples alternate fused, composed, fused, ...; the ratio is the median
-- of per-pair ratios composed/fused (> 1: fused is faster).
-- Peak memory: the engine's peak bytes above the live bytes before the
-- first step of each path; the fused path runs first, since the peak only
-- grows (the composed figure is then its own, being the larger).
--
-- env: BENCH_ATTN_BH=32, BENCH_ATTN_L=256, BENCH_ATTN_E=64,
--      BENCH_ATTN_REPS=7, BENCH_SCALE, KEEL_CPATH, OPENBLAS_NUM_THREADS

package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
local B = require "common"
local keel = require "keel"
local F = keel.nn.functional

local BH = B.env_int("BENCH_ATTN_BH", 32)
local L = B.env_int("BENCH_ATTN_L", 256)
local E = B.env_int("BENCH_ATTN_E", 64)
local reps = B.env_int("BENCH_ATTN_REPS", 7)
local now, clock = B.clock("wall")

B.note("attention: keel.core from %s; BH=%d L=S=%d E=%d float32, forward+backward; %s clock",
       B.keel_cpath, BH, L, E, clock)

keel.manual_seed(1)
local q = keel.randn({BH, L, E}):requires_grad_(true)
local k = keel.randn({BH, L, E}):requires_grad_(true)
local v = keel.randn({BH, L, E}):requires_grad_(true)

local function step(opts)
  q.grad, k.grad, v.grad = nil, nil, nil
  local out = F.scaled_dot_product_attention(q, k, v, opts)
  out:sum():backward()
end

for _, causal in ipairs {false, true} do
  local tag = causal and "causal" or "full"
  local fused = {is_causal = causal}
  local composed = {is_causal = causal, need_weights = true}
  -- peak memory of one step each (fused first: see the top)
  collectgarbage()
  local live0 = keel.memory_stats().live_bytes
  step(fused)
  local pf = keel.memory_stats().peak_bytes - live0
  collectgarbage()
  live0 = keel.memory_stats().live_bytes
  step(composed)
  local pc = keel.memory_stats().peak_bytes - live0
  local tf, tc, ratio = {}, {}, {}
  for r = 1, reps do
    local t0 = now()
    step(fused)
    local t1 = now()
    step(composed)
    local t2 = now()
    tf[r], tc[r], ratio[r] = t1 - t0, t2 - t1, (t2 - t1) / (t1 - t0)
  end
  B.note("%s fused ms: %s", tag, B.spread((function() local t = {} for i, x in ipairs(tf) do t[i] = x * 1e3 end return t end)()))
  B.note("%s composed ms: %s", tag, B.spread((function() local t = {} for i, x in ipairs(tc) do t[i] = x * 1e3 end return t end)()))
  B.result("attention_" .. tag .. "_fused_ms", B.median(tf) * 1e3, "ms")
  B.result("attention_" .. tag .. "_composed_ms", B.median(tc) * 1e3, "ms")
  B.result("attention_" .. tag .. "_speedup", B.median(ratio), "x")
  if pc > pf then
    B.result("attention_" .. tag .. "_fused_peak_mib", pf / 2 ^ 20, "MiB")
    B.result("attention_" .. tag .. "_composed_peak_mib", pc / 2 ^ 20, "MiB")
  else
    B.note("%s: peak memory not separable (composed %.1f MiB <= fused %.1f MiB)", tag, pc / 2 ^ 20, pf / 2 ^ 20)
  end
end
