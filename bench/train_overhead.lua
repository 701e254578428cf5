-- bench/train_overhead.lua: what issue 4's telemetry costs per training
-- step, on DESIGN.md's MNIST CNN (the model of scripts/mnist.lua; synthetic
-- data, batch 64, Adam with global-norm clipping 1.0, as bench/train.lua).
-- (bench/overhead.lua is the per-op binding overhead benchmark.)
--
-- Settings, each timed against the baseline in the same process:
--   baseline          nothing attached
--   monitor_every1    keel.monitor.log(dir, {every = 1, hist_every = 1}):
--                     every step recorded, histograms of every weight and
--                     gradient at every step                  target <= 1.10
--   monitor_every10   keel.monitor.log(dir) with its defaults (every = 10,
--                     histograms every 100)
--   anomaly           keel.autograd.detect_anomaly(true) (cheap mode)
--                                                             target <= 1.05
--   guard             keel.guard(opt, {}) attached
--   all               monitor_every1 + anomaly + guard
-- A setting that fails to attach is skipped with a note.
--
-- Rounds interleave the settings (their order rotates each round); each
-- block starts from a collected heap, runs a warm-up step and times N steps.
-- The ratio of a setting is the median over rounds of its time per step
-- divided by the baseline's in the same round.
--
-- Prints RESULT name=overhead_<setting> value=<ratio> unit=x.
-- env: BENCH_SCALE (steps per block), BENCH_OVH_ROUNDS (7), BENCH_OVH_STEPS (8),
--      BENCH_CLOCK (default: thread CPU time with OPENBLAS_NUM_THREADS=1, else wall)
package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
local B = require "common"
local keel = require "keel"
local nn, optim, clip = keel.nn, keel.optim, keel.clip

local rounds = B.env_int("BENCH_OVH_ROUNDS", 7)
local steps = B.scaled(B.env_int("BENCH_OVH_STEPS", 8))
-- one BLAS thread: the thread's CPU time (leaves out the time other
-- processes hold the core on a shared machine); more: the wall clock
local threads = os.getenv("OPENBLAS_NUM_THREADS")
local now, clock_name = B.clock(threads == "1" and "thread" or "wall")
local batch = 64

keel.manual_seed(0)
local model = nn.Sequential {
  nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
  nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
  nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10),
}
local opt = optim.Adam(model:parameters(), {lr = 1e-3, clip = clip.global_norm(1.0)})
local x = keel.randn{batch, 1, 28, 28}
local y = (keel.rand{batch} * 10):long():clamp(0, 9) + 1

-- opt:step(loss) hands the loss to the monitor and the guard
local function train_step()
  local loss = nn.cross_entropy(model(x), y)
  opt:zero_grad()
  loss:backward()
  opt:step(loss)
end

local tmp = os.tmpname()
os.remove(tmp)
local function monitor_on(opts)
  return function()
    local m = keel.monitor.log(tmp, opts)
    return function() m:close() end
  end
end

local function anomaly_on()
  keel.autograd.detect_anomaly(true)
  return function() keel.autograd.detect_anomaly(false) end
end

local function guard_on()
  local g = keel.guard(opt, {})
  return function() g:remove() end
end

local settings = {
  {name = "baseline", on = function() return function() end end},
  {name = "monitor_every1", on = monitor_on({every = 1, hist_every = 1}), target = 1.10},
  {name = "monitor_every10", on = monitor_on({})},
  {name = "anomaly", on = anomaly_on, target = 1.05},
  {name = "guard", on = guard_on},
  {name = "all",
   on = function()
     local offs = {monitor_on({every = 1, hist_every = 1})(), anomaly_on(), guard_on()}
     return function() for i = #offs, 1, -1 do offs[i]() end end
   end},
}

local active = {}
for _, s in ipairs(settings) do
  -- one trial run: a setting that fails to attach is skipped, not fatal
  local ok, err = pcall(function() local off = s.on() train_step() off() end)
  if ok then active[#active + 1] = s else B.note("skipped %s: %s", s.name, tostring(err)) end
end

B.note("MNIST CNN, batch %d, %d rounds x %d steps per setting, threads %s, clock %s", batch, rounds, steps,
  threads or "?", clock_name)

local per = {}
for _, s in ipairs(active) do per[s.name] = {} end
for r = 1, rounds do
  for k = 0, #active - 1 do
    local s = active[(r + k - 1) % #active + 1]   -- rotate the order each round
    local off = s.on()
    train_step()   -- warm-up: first record, file creation, caches
    collectgarbage()
    local t0 = now()
    for _ = 1, steps do train_step() end
    local dt = (now() - t0) / steps
    off()
    per[s.name][r] = dt
  end
end
os.execute("rm -rf '" .. tmp .. "'")

B.note("baseline: %s ms/step", B.spread((function()
  local ms = {}
  for i, v in ipairs(per.baseline) do ms[i] = v * 1000 end
  return ms
end)()))
for _, s in ipairs(active) do
  if s.name ~= "baseline" then
    local ratios = {}
    for r = 1, rounds do ratios[r] = per[s.name][r] / per.baseline[r] end
    local med = B.median(ratios)
    B.note("%s: ratio %s", s.name, B.spread(ratios))
    if s.target then
      B.note("target overhead_%s %.3f <= %.2f %s", s.name, med, s.target, med <= s.target and "PASS" or "MISS")
    end
    B.result("overhead_" .. s.name, med, "x")
  end
end
