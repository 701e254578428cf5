-- bench/loader.lua: images per second of keel.data.DataLoader (engine/loader.c).
--
-- Iterates whole epochs of synthetic datasets and does nothing else with
-- the batches, so this is the most the loader can feed a training loop:
--   loader_mnist_b64/_b128   60000x1x28x28, to_float + normalize
--   loader_cifar_b64/_b128   10000x3x32x32, random_crop(32, padding 4) +
--                            random_hflip + to_float + normalize (per channel)
-- shuffled, prefetch = 2 (the default: a background thread assembles
-- batches). Informational: loader_mnist_b64_noprefetch (prefetch = 0, all
-- on the calling thread).
-- Target: >= 20x the CNN's training throughput (bench/train.lua cnn,
-- about 2,000-2,400 img/s on the 2-core machine), i.e. >= 48,000 img/s.
--
-- Timed with the wall clock (bench/.build/benchlib.so, built by
-- bench/run.sh); without it, with os.clock, the CPU time of both threads,
-- which understates the rate.
--
--   tools/build.sh release && lua5.4 bench/loader.lua
-- env: BENCH_LOADER_REPS=3, BENCH_SCALE (scales the dataset sizes), KEEL_CPATH

package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
local B = require "common"
local keel = require "keel"
local data = require "keel.data_loader"
local T = data.transforms

local now, clock_name = B.clock("wall")
local reps = B.env_int("BENCH_LOADER_REPS", 3)
local TARGET = 20 * 2400

local function synthetic(n, shape)
  local full = {n}
  for _, s in ipairs(shape) do full[#full + 1] = s end
  local x = keel.rand(full) * 255
  local y = keel.arange(1, n + 1):to("int64")   -- label values do not matter here
  return {x = x, y = y, n = n}
end

local function measure(name, ds, opts)
  local loader = data.DataLoader(ds, opts)
  for _ in loader:batches() do end            -- warm-up epoch (first touch of the buffers)
  local rates = {}
  for _ = 1, reps do
    collectgarbage()
    local t0, n = now(), 0
    for xb in loader:batches() do n = n + xb.shape[1] end
    rates[#rates + 1] = n / (now() - t0)
  end
  loader:close()
  local v = B.median(rates)
  B.note("%s: %s img/s (%s clock)", name, B.spread(rates), clock_name)
  B.result(name, v, "img/s")
  return v
end

local checks = {}
local mnist = synthetic(B.scaled(60000), {1, 28, 28})
local mnist_tf = {T.to_float(), T.normalize(0.1307, 0.3081)}
for _, bs in ipairs{64, 128} do
  local name = "loader_mnist_b" .. bs
  checks[name] = measure(name, mnist, {batch_size = bs, shuffle = true, seed = 1, transforms = mnist_tf})
end
measure("loader_mnist_b64_noprefetch", mnist,
        {batch_size = 64, shuffle = true, seed = 1, prefetch = 0, transforms = mnist_tf})
mnist = nil
collectgarbage()

local cifar = synthetic(B.scaled(10000), {3, 32, 32})
local cifar_tf = {T.random_crop(32, {padding = 4}), T.random_hflip(), T.to_float(),
                  T.normalize({0.4914, 0.4822, 0.4465}, {0.2470, 0.2435, 0.2616})}
for _, bs in ipairs{64, 128} do
  local name = "loader_cifar_b" .. bs
  checks[name] = measure(name, cifar, {batch_size = bs, shuffle = true, seed = 1, transforms = cifar_tf})
end

for _, name in ipairs{"loader_mnist_b64", "loader_mnist_b128", "loader_cifar_b64", "loader_cifar_b128"} do
  local v = checks[name]
  B.note("target %-24s %10s >= %d (20x the CNN's ~2400 img/s)  %s", name, B.fmt(v), TARGET,
         v >= TARGET and "PASS" or "MISS")
end
