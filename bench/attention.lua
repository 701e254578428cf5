-- bench/attention.lua: fused scaled-dot-product attention (keel_sdpa, the
-- default of F.scaled_dot_product_attention) against the composed path
-- (need_weights = true: matmul, softmax, matmul with the [..., L, S]
-- weights materialised) on the CPU.
--
-- Cases: q, k, v [BH, L, E] float32 with requires_grad, L = S, full or
-- causal, for two shapes (BH=32 L=256, BH=8 L=1024; E=64), each as
--   infer  forward only, under keel.no_grad
--   train  forward + backward of out:sum()
-- Each case runs in a child process of its own, since the engine's peak
-- memory only grows: there the fused path runs first, its peak is the
-- peak bytes above the live bytes before its first step, and the
-- composed peak likewise (the larger, so its own).
-- Samples alternate fused, composed, fused, ...; per case it prints
--   RESULT name=attention_<case>_fused_ms     (median)
--   RESULT name=attention_<case>_composed_ms  (median)
--   RESULT name=attention_<case>_ratio        median of the per-pair
--          ratios fused/composed (< 1: the fused path is faster)
--   RESULT name=attention_<case>_{fused,composed}_peak_mib
-- with <case> = <full|causal>_<infer|train>_bh<BH>_l<L>.
--
-- env: BENCH_ATTN_SHAPES="32x256 8x1024" (BHxL list), BENCH_ATTN_E=64,
--      BENCH_ATTN_REPS=7, BENCH_ATTN_MODES="infer train",
--      BENCH_ATTN_MASKS="full causal", BENCH_SCALE (scales the reps),
--      KEEL_CPATH, OPENBLAS_NUM_THREADS
--      BENCH_ATTN_CASE=<mask>:<mode>:<BH>:<L> runs one case in-process.

package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
local B = require "common"

local E = B.env_int("BENCH_ATTN_E", 64)
local reps = B.scaled(B.env_int("BENCH_ATTN_REPS", 7))

local function words(s) local t = {} for w in s:gmatch("%S+") do t[#t + 1] = w end return t end

local function run_case(mask, mode, BH, L)
  local keel = require "keel"
  local F = keel.nn.functional
  local now, clock = B.clock("wall")
  local tag = ("%s_%s_bh%d_l%d"):format(mask, mode, BH, L)
  local causal = mask == "causal"
  B.note("attention %s: BH=%d L=S=%d E=%d float32, %s; %s clock", tag, BH, L, E,
         mode == "train" and "forward+backward" or "forward only (no_grad)", clock)

  keel.manual_seed(1)
  local q = keel.randn({BH, L, E}):requires_grad_(true)
  local k = keel.randn({BH, L, E}):requires_grad_(true)
  local v = keel.randn({BH, L, E}):requires_grad_(true)

  local step
  if mode == "train" then
    step = function(opts)
      q.grad, k.grad, v.grad = nil, nil, nil
      local out = F.scaled_dot_product_attention(q, k, v, opts)
      out:sum():backward()
    end
  else
    step = function(opts)
      keel.no_grad(function() return F.scaled_dot_product_attention(q, k, v, opts) end)
    end
  end
  local fused = {is_causal = causal}
  local composed = {is_causal = causal, need_weights = true}

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
    collectgarbage()
    local t0 = now()
    step(fused)
    local t1 = now()
    collectgarbage()
    local t2 = now()
    step(composed)
    local t3 = now()
    tf[r], tc[r], ratio[r] = (t1 - t0) * 1e3, (t3 - t2) * 1e3, (t1 - t0) / (t3 - t2)
  end
  B.note("%s fused ms: %s", tag, B.spread(tf))
  B.note("%s composed ms: %s", tag, B.spread(tc))
  B.result("attention_" .. tag .. "_fused_ms", B.median(tf), "ms")
  B.result("attention_" .. tag .. "_composed_ms", B.median(tc), "ms")
  B.result("attention_" .. tag .. "_ratio", B.median(ratio), "x")
  if pc > pf then
    B.result("attention_" .. tag .. "_fused_peak_mib", pf / 2 ^ 20, "MiB")
    B.result("attention_" .. tag .. "_composed_peak_mib", pc / 2 ^ 20, "MiB")
  else
    B.note("%s: peak memory not separable (composed %.1f MiB <= fused %.1f MiB)", tag, pc / 2 ^ 20, pf / 2 ^ 20)
  end
end

local one = os.getenv("BENCH_ATTN_CASE")
if one and one ~= "" then
  local mask, mode, bh, l = one:match("^(%a+):(%a+):(%d+):(%d+)$")
  if not mask or (mask ~= "full" and mask ~= "causal") or (mode ~= "infer" and mode ~= "train") then
    error("bench/attention.lua: BENCH_ATTN_CASE must be <full|causal>:<infer|train>:<BH>:<L>, got " .. one, 0)
  end
  run_case(mask, mode, tonumber(bh), tonumber(l))
  return
end

-- the parent: one child per case, its lines passed through
local lua = arg[-1] or "lua5.4"
local function shq(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
B.note("attention: keel.core from %s", B.keel_cpath)
for _, shape in ipairs(words(os.getenv("BENCH_ATTN_SHAPES") or "32x256 8x1024")) do
  local bh, l = shape:match("^(%d+)x(%d+)$")
  if not bh then error("bench/attention.lua: BENCH_ATTN_SHAPES entries are BHxL, got " .. shape, 0) end
  for _, mode in ipairs(words(os.getenv("BENCH_ATTN_MODES") or "infer train")) do
    for _, mask in ipairs(words(os.getenv("BENCH_ATTN_MASKS") or "full causal")) do
      local cmd = ("BENCH_ATTN_CASE=%s %s %s"):format(shq(("%s:%s:%s:%s"):format(mask, mode, bh, l)),
                                                    shq(lua), shq(arg[0]))
      local p = assert(io.popen(cmd, "r"))
      for line in p:lines() do io.write(line, "\n") end
      io.flush()
      local ok, how, code = p:close()
      if not ok then error(("bench/attention.lua: case %s %s %s failed (%s %s)"):format(shape, mode, mask,
                                                                                        tostring(how), tostring(code)), 0) end
    end
  end
end
