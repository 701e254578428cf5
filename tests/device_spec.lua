--
-- tests/device_spec.lua: the device layer on any machine, through the
-- stand-in CUDA plugin (build/<cfg>/lib/libkeel_fakecuda.so: host memory
-- behind device addresses that fault if the engine ever reads them). The
-- same cases as on a GPU (device_cases.lua), plus what only the stand-in
-- shows: an op whose kernel is missing fails with a clear error.
--
local H = require "helper"
local keel = H.keel
-- The subject is the CPU/device boundary, through a plugin with copies and
-- add only: the CPU side is the CPU whatever KEEL_DEVICE says (under
-- KEEL_DEVICE=cuda the default-device tensors would land on the stand-in,
-- which cannot compute them; the default-device path itself is a case of
-- device_cases.lua, with set_default_device).
H.cpu_default(teardown)

local core = package.searchpath("keel.core", package.cpath)
local fake = core and core:gsub("/lua/keel/[^/]*$", "/lib/libkeel_fakecuda.so")
local loaded, load_err = false, "keel.core not found on package.cpath"
if fake then loaded, load_err = pcall(keel.cuda.load, fake) end

describe("the stand-in CUDA plugin", function()
  it("loads (keel.cuda.load)", function()
    assert.is_true(loaded, load_err)
    local ok = keel.cuda.is_available()
    assert.is_true(ok)
    local path, desc = keel.cuda.plugin()
    assert.are.equal(fake, path)
    assert.is_truthy(desc:find("fake", 1, true))
    assert.are.equal(1, keel.cuda.device_count())
    assert.is_truthy(keel.cuda.get_device_name(0):find("fake", 1, true))
    local free, total = keel.cuda.mem_get_info()
    assert.is_true(free <= total and total > 0)
    keel.cuda.synchronize()
  end)

  it("refuses a second plugin once one is open", function()
    local ok, e = pcall(keel.cuda.load, "/other/libkeel_cuda.so")
    assert.is_false(ok)
    assert.is_truthy(tostring(e):find("load: the CUDA plugin .* is already in use"), e)
  end)

  it("an op without a CUDA kernel fails with a clear error, never a crash", function()
    local d = keel.ones({2, 2}, {device = "cuda"})
    for _, case in ipairs {
      {function() return d:exp() end, "exp: no CUDA kernel yet"},
      {function() return d:sum() end, "sum: no CUDA kernel yet"},
      {function() return d:matmul(d) end, "matmul: no CUDA kernel yet"},
      {function() return d:relu() end, "relu: no CUDA kernel yet"},
      {function() return keel.nn.functional.softmax(d, 2) end, "softmax: no CUDA kernel yet"},
      {function() return keel.nn.functional.mse_loss(d, d) end, "mse_loss: no CUDA kernel yet"},
      {function() return keel.nn.Linear(2, 2):to("cuda")(d) end, "no CUDA kernel yet"},
    } do
      local ok, e = pcall(case[1])
      assert.is_false(ok)
      assert.is_truthy(tostring(e):find(case[2], 1, true), "error was: " .. tostring(e))
    end
    assert.are.same({{1, 1}, {1, 1}}, (d + d * 0):cpu():totable())   -- add, mul: the stand-in has them
  end)

  -- the stand-in has no optimizer kernels: a step fails cleanly (the state
  -- moving with its parameter is tests/cuda_optim_spec.lua's, on the simulator)
  it("an optimizer step after model:to('cuda') fails cleanly where the plugin has no optimizer kernel", function()
    local m = keel.nn.Linear(2, 1)
    local opt = keel.optim.SGD(m:parameters(), {lr = 0.1, momentum = 0.9})
    m(keel.ones{1, 2}):sum():backward()
    opt:step()                       -- momentum buffers on the CPU
    m:to("cuda")
    local ok, e = pcall(function() opt:step() end)
    assert.is_false(ok)
    assert.is_truthy(tostring(e):find("no CUDA kernel yet", 1, true), e)
  end)
end)

require("device_cases")("device cases through the stand-in plugin",
  function(name, fn) if loaded then it(name, fn) else pending(name .. " (stand-in plugin not loaded)") end end,
  describe)
