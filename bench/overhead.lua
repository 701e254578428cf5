-- bench/overhead.lua: per-op cost of tiny tensors from Lua, in microseconds.
--
-- Every case runs a loop of N ops; the value is elapsed / N, median over
-- repetitions (cases are interleaved within each repetition). Each sample
-- starts from a fully collected heap and ends with a full collection (timed),
-- so it pays for exactly its own garbage, finalizers included. The tensors
-- are 4 elements (float32), so the numbers are binding + dispatch +
-- allocation + GC cost, not arithmetic. Loop overhead is included in
-- every case (see lua_empty_loop; it is ~0.01 us).
--
-- Baselines that show what the binding costs:
--   lua_empty_loop   for i = 1, N do end
--   lua_call         a Lua function call f(a, b) returning a
--   c_call           a C function checking two userdata args (benchlib.noop)
--   c_newud          a C function returning a new userdata with __gc
-- keel cases (names match bench/overhead_torch.py's, prefixed torch_):
--   add              local c = a + b                     a, b: {4}
--   add_close        local c <close> = a + b  (freed at once, not by the GC)
--   add_scalar       local c = a + 1
--   add_grad         local c = a + b with a.requires_grad (records a node)
--   relu             local c = a:relu()
--   sum              local c = a:sum()
--   matmul           local y = x:matmul(w)               x: {4,4}, w: {4,4}
--   linear_fwd_bwd   y = x:matmul(w) + bias; l = y:sum(); l:backward();
--                    w.grad = nil; bias.grad = nil       (w, bias require grad)
--
-- Timed with the calling thread's CPU time by default (BENCH_CLOCK=wall
-- for the wall clock): on a shared 2-core machine it leaves out the time
-- other processes hold the core; on an idle machine the two agree.
--
-- env: BENCH_OVH_REPS=5, BENCH_OVH_N=300000 (cheap ops), BENCH_OVH_N_LINEAR=30000,
--      BENCH_SCALE, KEEL_CPATH

package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
local B = require "common"
local keel = require "keel"

local reps = B.env_int("BENCH_OVH_REPS", 5)
local N = B.scaled(B.env_int("BENCH_OVH_N", 300000))
local NL = B.scaled(B.env_int("BENCH_OVH_N_LINEAR", 30000))
local now, clock = B.clock("thread")
local lib = B.lib

keel.manual_seed(1)
local a, b = keel.randn { 4 }, keel.randn { 4 }
local ag = keel.randn { 4 }
ag.requires_grad = true
local x, w = keel.randn { 4, 4 }, keel.randn { 4, 4 }
local wl, bias = keel.randn { 4, 4 }, keel.randn { 4 }
wl.requires_grad = true
bias.requires_grad = true

local function f(p, q) return p end

local cases = {
  { "lua_empty_loop", N, function(n)
      local t0 = now()
      for _ = 1, n do end
      return now() - t0
    end },
  { "lua_call", N, function(n)
      local t0 = now()
      for _ = 1, n do local c = f(a, b) end
      return now() - t0
    end },
}
if lib then
  local noop, newud = lib.noop, lib.newud
  cases[#cases + 1] = { "c_call", N, function(n)
      local t0 = now()
      for _ = 1, n do noop(a, b) end
      return now() - t0
    end }
  cases[#cases + 1] = { "c_newud", N, function(n)
      local t0 = now()
      for _ = 1, n do local c = newud() end
      return now() - t0
    end }
end
for _, c in ipairs {
  { "add", N, function(n)
      local t0 = now()
      for _ = 1, n do local c = a + b end
      return now() - t0
    end },
  { "add_close", N, function(n)
      local t0 = now()
      for _ = 1, n do local c <close> = a + b end
      return now() - t0
    end },
  { "add_scalar", N, function(n)
      local t0 = now()
      for _ = 1, n do local c = a + 1 end
      return now() - t0
    end },
  { "add_grad", N, function(n)
      local t0 = now()
      for _ = 1, n do local c = ag + b end
      return now() - t0
    end },
  { "relu", N, function(n)
      local t0 = now()
      for _ = 1, n do local c = a:relu() end
      return now() - t0
    end },
  { "sum", N, function(n)
      local t0 = now()
      for _ = 1, n do local c = a:sum() end
      return now() - t0
    end },
  { "matmul", N, function(n)
      local t0 = now()
      for _ = 1, n do local y = x:matmul(w) end
      return now() - t0
    end },
  { "linear_fwd_bwd", NL, function(n)
      local t0 = now()
      for _ = 1, n do
        local y = x:matmul(wl) + bias
        local l = y:sum()
        l:backward()
        wl.grad = nil
        bias.grad = nil
      end
      return now() - t0
    end },
} do cases[#cases + 1] = c end

B.note("overhead: keel.core from %s; %d reps of %d ops (%d for linear_fwd_bwd); %s clock",
       B.keel_cpath, reps, N, NL, clock)

-- warmup: every case once at a tenth of its count
for _, c in ipairs(cases) do c[3](math.max(1, c[2] // 10)) end
collectgarbage()

-- Each sample pays for its own garbage: a full collection before it (not
-- timed) so that it inherits none from the case before, and one at its end
-- (timed) so that what its loop left behind is collected and finalized on
-- its bill. One full collection of this small heap is ~0.1 ms, noise
-- against a sample's ~100+ ms.
local function sample(c)
  collectgarbage()
  local loop = c[3](c[2])
  local t1 = now()
  collectgarbage()
  local tail = now() - t1
  return loop + tail
end

local samples = {}
for _, c in ipairs(cases) do samples[c[1]] = {} end
for r = 1, reps do
  for _, c in ipairs(cases) do
    samples[c[1]][r] = sample(c) / c[2] * 1e6
  end
end

for _, c in ipairs(cases) do
  B.note("overhead_%-15s us/op: %s", c[1], B.spread(samples[c[1]]))
end
for _, c in ipairs(cases) do
  B.result("overhead_" .. c[1], B.median(samples[c[1]]), "us")
end
