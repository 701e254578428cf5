--
-- tests/cuda_sim_spec.lua: the CUDA simulator (kernels/sim/,
-- build/<cfg>/lib/libkeel_cuda_sim.so) seen through keel. tools/test.sh runs
-- every tests/cuda_*_spec.lua a second time with KEEL_CUDA_PLUGIN naming it;
-- this file checks the simulator itself there: copies and fills of large
-- strided tensors that cross many blocks of the capped grid, the allocator
-- over its recorded device memory, and its settings (no device, a small
-- device memory) in fresh processes. Elsewhere: on a real GPU the generic
-- cases run (the "[gpu]" skips without one), the simulator-only ones skip.
--
local H = require "helper"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local gpu_it = H.gpu_it(it, pending)

local function on_sim()
  if not H.gpu() then return false end
  local _, desc = keel.cuda.plugin()
  return desc ~= nil and desc:find("simulator", 1, true) ~= nil
end
local function sim_it(name, fn)
  if on_sim() then it(name, fn) else pending(name .. " (the CUDA simulator is not the plugin in use)") end
end

-- A CPU tensor of n distinct values shaped `shape`.
local function ramp(shape, dtype)
  local n = H.numel(shape)
  return keel.arange(0, n, 1, {dtype = dtype or "float64"}):reshape(shape)
end

describe("CUDA copies and fills across many blocks", function()
  gpu_it("a permuted 3-D view copies exactly, every dtype", function()
    for _, dt in ipairs {"float32", "float64", "int64"} do
      local h = ramp({37, 29, 23}, dt)
      local d = h:cuda()
      local p = d:permute{3, 1, 2}:contiguous()
      assert.are.same(h:permute{3, 1, 2}:contiguous():totable(), p:cpu():totable())
    end
  end)

  gpu_it("casts between dtypes through strided views give the CPU's values", function()
    local h = (ramp({41, 53}) * 0.37 - 300)
    local d = h:cuda()
    assert.are.same(h:t():float():totable(), d:t():float():cpu():totable())
    assert.are.same(h:t():long():totable(), d:t():long():cpu():totable())
    assert.are.same(h:narrow(2, 3, 40):float():totable(), d:narrow(2, 3, 40):float():cpu():totable())
  end)

  gpu_it("a broadcast (stride 0) source fills every row", function()
    local row = ramp({1, 333}, "float32")
    local d = row:cuda():expand{257, 333}:contiguous()
    assert.are.same(row:expand{257, 333}:contiguous():totable(), d:cpu():totable())
  end)

  gpu_it("fill of a strided view touches only the view", function()
    for _, dt in ipairs {"float32", "float64", "int64"} do
      local d = keel.zeros({61, 67}, {dtype = dt, device = "cuda"})
      d:t():narrow(1, 5, 50):fill_(7)
      local h = keel.zeros({61, 67}, {dtype = dt})
      h:t():narrow(1, 5, 50):fill_(7)
      assert.are.same(h:totable(), d:cpu():totable())
      d:fill_(-2.5)
      assert.is_true((d:cpu():double() + 2.5):abs():max():item() <= (dt == "int64" and 0.5 or 0))
    end
  end)

  gpu_it("empty tensors copy and fill without a launch failing", function()
    local d = keel.zeros({0, 5}, {device = "cuda"})
    d:fill_(3)
    assert.are.same({5, 0}, d:t():contiguous().shape)
    assert.are.equal(0, d:cpu():numel())
  end)
end)

describe("the CUDA simulator", function()
  sim_it("names itself", function()
    local path, desc = keel.cuda.plugin()
    assert.is_truthy(path:find("libkeel_cuda_sim.so", 1, true), path)
    assert.is_truthy(desc:find("keel CUDA plugin", 1, true), desc)
    assert.is_truthy(keel.cuda.get_device_name(0):find("simulator", 1, true))
    local free, total = keel.cuda.mem_get_info()
    assert.is_true(total > 0 and free <= total)
  end)

  sim_it("device memory goes through the caching allocator", function()
    collectgarbage()
    collectgarbage()
    keel.cuda.synchronize()
    keel.cuda.empty_cache()
    local before = keel.cuda.memory_stats()
    local free0 = keel.cuda.mem_get_info()
    local big = keel.zeros({1024, 1024}, {device = "cuda"})
    local mid = keel.cuda.memory_stats()
    assert.is_true(mid.device_mallocs > before.device_mallocs)
    assert.is_true(mid.allocated_bytes >= before.allocated_bytes + 4 * 1024 * 1024)
    local free1 = keel.cuda.mem_get_info()
    assert.is_true(free1 <= free0 - 4 * 1024 * 1024, ("free %.0f then %.0f"):format(free0, free1))
    big = nil
    collectgarbage()
    collectgarbage()
    keel.cuda.empty_cache()
    local after = keel.cuda.memory_stats()
    assert.is_true(after.device_frees > before.device_frees)
    assert.is_true(keel.cuda.mem_get_info() >= free0)
  end)

  describe("in a fresh process", function()
    local BIN, PLUGIN = os.getenv("KEEL_BIN"), os.getenv("KEEL_CUDA_PLUGIN")
    local function run(env, code)
      return H.run_keel(code, {("%s KEEL_CUDA_PLUGIN=%q "):format(env, PLUGIN)}, true)[1]
    end
    local function proc_it(name, fn)
      if BIN and PLUGIN and on_sim() then it(name, fn) else pending(name .. " (needs KEEL_BIN and the simulator)") end
    end

    proc_it("KEEL_CUDA_SIM_STATS=2: the launches per launch site, busiest first", function()
      local out = run("KEEL_CUDA_SIM_STATS=2", [[
        local a = keel.ones({1000}, {device = "cuda"})
        for _ = 1, 3 do a = a + a end
        print(a:sum():item())]])
      local total = tonumber(out:match("kcsim: (%d+) launches, "))
      local counts, sum = {}, 0
      for n in out:gmatch("kcsim: +(%d+) launches at [%w_]+%.cu:%d+\n") do
        counts[#counts + 1] = tonumber(n)
        sum = sum + tonumber(n)
      end
      assert.is_truthy(total, out)
      assert.are.equal(total, sum, out)                -- every launch has its site
      assert.is_true(#counts >= 2, out)                -- the additions' and the sum's
      for i = 2, #counts do assert.is_true(counts[i - 1] >= counts[i], out) end
    end)

    proc_it("KEEL_CUDA_SIM_ORDER with a typo: one warning naming the choices, then the forward order", function()
      local out = run("KEEL_CUDA_SIM_ORDER=sideways", [[
        local a = keel.ones({1000}, {device = "cuda"})
        for _ = 1, 3 do a = a + a end
        print(a:sum():item())]])
      local _, warnings = out:gsub("KEEL_CUDA_SIM_ORDER=sideways: expected forward, reverse or shuffle%[:seed%]", "")
      assert.are.equal(1, warnings, out)
      assert.is_truthy(out:find("\n8000%.?0*\n") or out:find("^8000"), out)
    end)

    proc_it("KEEL_CUDA_SIM_DEVICES=0: CUDA unavailable, the reason says no device", function()
      local out = run("KEEL_CUDA_SIM_DEVICES=0", "print(keel.cuda.is_available())")
      assert.is_truthy(out:find("false\tno CUDA device", 1, true), out)
    end)

    proc_it("KEEL_CUDA_SIM_MEMORY: an allocation over it fails with out of memory, recoverably", function()
      local out = run("KEEL_CUDA_SIM_MEMORY=1000000", [[
        local ok, e = pcall(keel.zeros, {1000, 1000}, {device = "cuda"})
        print(ok, e)
        local small = keel.ones({10}, {device = "cuda"})
        print(small:cpu():sum():item())]])
      assert.is_truthy(out:find("false\t", 1, true), out)
      assert.is_truthy(out:find("out of memory", 1, true), out)
      assert.is_truthy(out:find("\n10%.?0*\n") or out:find("\n10\n"), out)
    end)
  end)
end)
