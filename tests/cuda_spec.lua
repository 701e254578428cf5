--
-- tests/cuda_spec.lua: keel.cuda as this machine has it. Without a GPU:
-- CUDA is unavailable with a reason that names the cause, and every CUDA
-- request fails with it, never crashes (in this process, with KEEL_DEVICE,
-- and with KEEL_CUDA_PLUGIN pointing at a missing file or at a library
-- that is no plugin). With one: the device cases of device_cases.lua, run
-- on the GPU (skipped, visibly, elsewhere: tools/test.sh counts them).
--
local H = require "helper"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local gpu_it = H.gpu_it(it, pending)

-- The reasons device.c gives, one of which must be the cause.
local CAUSES = {"was not found", "cannot load the CUDA plugin", "is not a keel CUDA plugin", "has ABI version",
                "no CUDA driver is installed", "is too old", "no CUDA device", "CUDA initialisation failed",
                "cannot open CUDA device"}

local function names_a_cause(why)
  for _, c in ipairs(CAUSES) do if why:find(c, 1, true) then return true end end
  return false
end

local function err_match(f, text)
  local ok, e = pcall(f)
  assert.is_false(ok, "expected an error containing " .. text)
  assert.is_truthy(tostring(e):find(text, 1, true), "error was: " .. tostring(e))
  return tostring(e)
end

-- Runs Lua code in a fresh keel process with extra environment settings;
-- returns its output (stdout and stderr). The keel executable carries its
-- own Lua, and finds the plugin beside itself.
local function run(env, code)
  return H.run_keel(code, {env .. " "}, true)[1]
end

describe("keel.cuda without a GPU", function()
  local ok, why = H.gpu()
  if ok then
    pending("this machine has a GPU (" .. keel.cuda.get_device_name(0) .. ")")
    return
  end

  it("is_available() is false with a reason naming the cause", function()
    local a, w = keel.cuda.is_available()
    assert.is_false(a)
    assert.are.equal("string", type(w))
    assert.is_true(names_a_cause(w), "reason: " .. w)
    assert.are.equal(w, keel.cuda.why_unavailable())
    assert.are.equal(0, keel.cuda.device_count())
    assert.is_nil(keel.cuda.plugin())
  end)

  it("the reason matches the build: a built plugin is found and fails later", function()
    if keel.cuda.is_built() then
      assert.is_nil(why:find("was not found", 1, true), why)
    else
      assert.is_truthy(why:find("was not found", 1, true), why)
    end
  end)

  it("moving a tensor to cuda raises the reason", function()
    local t = keel.ones{2}
    err_match(function() return t:cuda() end, "cuda: CUDA is not available: " .. why)
    err_match(function() return t:to("cuda") end, "to: CUDA is not available: " .. why)
    err_match(function() return t:to("cuda:0") end, "to: CUDA is not available")
    err_match(function() return t:to("cuda:1") end, "keel uses one GPU per process")
    assert.are.equal(t, t:cpu())
    assert.are.equal(t, t:to("cpu"))
  end)

  it("factories with device = 'cuda' raise the reason", function()
    err_match(function() return keel.zeros({2}, {device = "cuda"}) end, "zeros: CUDA is not available: " .. why)
    err_match(function() return keel.randn({2}, {device = "cuda"}) end, "randn: CUDA is not available")
    err_match(function() return keel.tensor({1, 2}, {device = "cuda"}) end, "tensor: CUDA is not available")
    err_match(function() return keel.arange(0, 3, 1, {device = "cuda"}) end, "arange: CUDA is not available")
    err_match(function() return keel.zeros({2}, {device = "tpu"}) end, 'zeros: unknown device "tpu"')
    -- a failed creation leaves the default device as it was
    assert.are.equal("cpu", keel.get_default_device())
    assert.are.equal("cpu", keel.zeros{2}.device)
  end)

  it("model:to('cuda') raises the reason and leaves the model on the CPU", function()
    local m = keel.nn.Linear(2, 2)
    local w = m.weight
    err_match(function() m:to("cuda") end, "CUDA is not available")
    assert.is_true(rawequal(w, m.weight))
    assert.are.equal("cpu", w.device)
    err_match(function() m:to("gpu") end, "to: unknown device or dtype gpu")
  end)

  it("device queries raise the reason; memory_stats are zeros", function()
    err_match(function() return keel.cuda.get_device_name(0) end, "get_device_name: CUDA is not available")
    err_match(function() keel.cuda.synchronize() end, "synchronize: CUDA is not available")
    err_match(function() keel.cuda.mem_get_info() end, "mem_get_info: CUDA is not available")
    local m = keel.cuda.memory_stats()
    for _, k in ipairs {"allocated_bytes", "reserved_bytes", "peak_allocated_bytes", "peak_reserved_bytes",
                        "allocs", "frees", "device_mallocs", "device_frees", "cache_flushes"} do
      assert.are.equal(0, m[k], k)
    end
    keel.cuda.empty_cache()   -- harmless
  end)

  describe("in a fresh process", function()
    if not os.getenv("KEEL_BIN") then
      pending("KEEL_BIN is not set (tools/test.sh sets it)")
      return
    end

    it("KEEL_DEVICE=cuda loads, then the first tensor says why CUDA is unavailable", function()
      local out = run("KEEL_DEVICE=cuda",
        "print(keel.get_default_device()); local ok, e = pcall(keel.zeros, {2}); print(ok, e)")
      assert.is_truthy(out:find("^cuda\n"), out)
      assert.is_truthy(out:find("false\tzeros: CUDA is not available: ", 1, true), out)
      assert.is_truthy(out:find("(the default device, from KEEL_DEVICE=cuda)", 1, true), out)
      assert.is_true(names_a_cause(out), out)
    end)

    it("is_built() names the plugin file keel would open, without opening it", function()
      local out = run("KEEL_CUDA_PLUGIN=/nonexistent/libkeel_cuda.so",
        "print(keel.cuda.is_built()); print(keel.cuda.plugin())")
      assert.are.equal("false\nnil\n", out)
      local here = os.getenv("KEEL_BIN"):gsub("/bin/keel$", "/lib/libkeel_cuda.so")
      local f = io.open(here, "rb")
      if f then   -- a CUDA build: found beside the executable, under the keel executable too
        f:close()
        out = run("KEEL_CUDA_PLUGIN=", "print(keel.cuda.is_built())")
        assert.is_truthy(out:find("^true\t.*/libkeel_cuda%.so\n$"), out)
      end
    end)

    it("KEEL_DEVICE with an unknown value is refused when keel loads", function()
      local out = run("KEEL_DEVICE=tpu", "print('loaded')")
      assert.is_truthy(out:find("KEEL_DEVICE=tpu: expected cpu, cuda or cuda:0", 1, true), out)
    end)

    it("KEEL_CUDA_PLUGIN naming a missing file gives that reason", function()
      local out = run("KEEL_CUDA_PLUGIN=/nonexistent/libkeel_cuda.so", "print(keel.cuda.why_unavailable())")
      assert.is_truthy(out:find("cannot load the CUDA plugin /nonexistent/libkeel_cuda.so (from KEEL_CUDA_PLUGIN)",
                                1, true), out)
      assert.is_truthy(out:find("No such file", 1, true), out)
    end)

    it("KEEL_CUDA_PLUGIN naming a library that is no plugin gives that reason", function()
      local lib = package.searchpath("keel.core", package.cpath)
      local out = run("KEEL_CUDA_PLUGIN=" .. lib, "print(keel.cuda.why_unavailable()); print(pcall(keel.ones{1}.cuda, keel.ones{1}))")
      assert.is_truthy(out:find("is not a keel CUDA plugin (it has no symbol keel_cuda_plugin)", 1, true), out)
      assert.is_truthy(out:find("false\tcuda: CUDA is not available: ", 1, true), out)
    end)
  end)
end)

describe("keel.cuda with a GPU", function()
  gpu_it("names its devices and reports their memory", function()
    assert.is_true(keel.cuda.device_count() >= 1)
    assert.are.equal("string", type(keel.cuda.get_device_name(0)))
    local free, total = keel.cuda.mem_get_info()
    assert.is_true(total > 0 and free <= total)
    local path, desc = keel.cuda.plugin()
    assert.is_truthy(path:find("libkeel_cuda", 1, true))   -- libkeel_cuda.so, or the simulator's
    assert.is_truthy(desc:find("keel CUDA plugin", 1, true))
    keel.cuda.synchronize()
  end)
end)

require("device_cases")("CUDA device cases on the GPU", gpu_it, describe)
