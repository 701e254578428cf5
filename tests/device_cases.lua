--
-- tests/device_cases.lua: the CUDA device cases, written once and run
-- twice: by tests/device_spec.lua against the stand-in plugin (host memory,
-- any machine) and by tests/cuda_spec.lua on a real GPU (skipped, visibly,
-- without one). They use only what every CUDA plugin has (copies, fill,
-- the allocator, to(), model:to) plus add, which the stand-in implements
-- too; op kernels are checked where they are written.
--
--   require("device_cases")(label, it_fn, describe)
--   it_fn(name, fn): `it` where the device is there, a visible skip elsewhere
--   describe: busted's (it lives in the spec's environment, not in _G)
--
local H = require "helper"
local assert = require "luassert"
local keel = H.keel
local nn = keel.nn

local function err_match(f, pattern)
  local ok, e = pcall(f)
  assert.is_false(ok, "expected an error matching " .. pattern)
  assert.is_truthy(tostring(e):find(pattern), "error was: " .. tostring(e))
end

return function(label, it_gpu, describe)
  describe(label, function()
    it_gpu("round trip cpu -> cuda -> cpu is bit-exact for every dtype", function()
      local data = {{1.5, -2.25, 1 / 3}, {-0.0, 3e38, 7}}
      for _, dt in ipairs {"float32", "float64"} do
        local h = keel.tensor(data, {dtype = dt})
        local d = h:cuda()
        assert.are.equal("cuda", d.device)
        assert.is_true(d.is_cuda)
        assert.are.equal(dt, d.dtype)
        local back = d:cpu()
        assert.are.equal("cpu", back.device)
        assert.are.same(h:totable(), back:totable())
        assert.are.equal(-math.huge, 1 / back:totable()[2][1])   -- -0 stays -0
      end
      local i = keel.tensor({{-3, 0, 9007199254740991}, {4, 5, -6}}, {dtype = "int64"})
      assert.are.same(i:totable(), i:to("cuda"):to("cpu"):totable())
    end)

    it_gpu("strided copies: a view to the device, and a view on the device", function()
      local t = keel.arange(0, 12):reshape{3, 4}
      assert.are.same(t:t():totable(), t:t():cuda():cpu():totable())
      local d = t:cuda()
      local c = d:t():contiguous()
      assert.are.equal("cuda", c.device)
      assert.are.same(t:t():totable(), c:cpu():totable())
      assert.are.same(t:narrow(2, 2, 2):totable(), d:narrow(2, 2, 2):cpu():totable())
    end)

    it_gpu("casts on the device give the CPU's values", function()
      local h = keel.tensor({1.75, -2.5, 3e9, 1 / 3}, {dtype = "float64"})
      local d = h:cuda()
      assert.are.same(h:float():totable(), d:float():cpu():totable())
      assert.are.same(h:long():totable(), d:long():cpu():totable())
      assert.are.equal("cuda", d:float().device)
    end)

    it_gpu("fill_, zero_, copy_ across devices, item and indexing", function()
      local d = keel.zeros({2, 3}, {device = "cuda"})
      d:fill_(2.5)
      assert.are.same({{2.5, 2.5, 2.5}, {2.5, 2.5, 2.5}}, d:totable())
      d:copy_(keel.tensor{1, 2, 3})                       -- broadcast from the CPU
      assert.are.same({{1, 2, 3}, {1, 2, 3}}, d:cpu():totable())
      local h = keel.zeros{2, 3}
      h:copy_(d)                                           -- and back
      assert.are.same({{1, 2, 3}, {1, 2, 3}}, h:totable())
      d:zero_()
      assert.are.same({0, 0, 0}, d[1]:cpu():totable())
      assert.are.equal(4, keel.tensor(4):cuda():item())
      local v = keel.tensor{5, 6, 7}:cuda()
      assert.are.equal(6, v[2])
      v[3] = 9
      assert.are.same({5, 6, 9}, v:cpu():totable())
    end)

    it_gpu("the caching allocator reuses a freed block (no cudaMalloc) and counts", function()
      collectgarbage(); collectgarbage()
      keel.cuda.empty_cache()
      local m0 = keel.cuda.memory_stats()
      assert.are.equal(m0.allocated_bytes, m0.reserved_bytes)
      local a = keel.zeros({1000}, {device = "cuda"})
      local m1 = keel.cuda.memory_stats()
      assert.are.equal(m0.device_mallocs + 1, m1.device_mallocs)
      assert.is_true(m1.allocated_bytes >= m0.allocated_bytes + 4000)
      assert.is_true(m1.peak_allocated_bytes >= m1.allocated_bytes)
      assert.is_true(m1.reserved_bytes >= m1.allocated_bytes)
      a = nil
      collectgarbage(); collectgarbage()
      local m2 = keel.cuda.memory_stats()
      assert.are.equal(m0.allocated_bytes, m2.allocated_bytes)
      local b = keel.ones({1000}, {device = "cuda"})
      local m3 = keel.cuda.memory_stats()
      assert.are.equal(m2.device_mallocs, m3.device_mallocs)
      assert.are.equal(m2.allocs + 1, m3.allocs)
      assert.are.equal(1, b[1000])
      b = nil
      collectgarbage(); collectgarbage()
      keel.cuda.empty_cache()
      local m4 = keel.cuda.memory_stats()
      assert.are.equal(m4.allocated_bytes, m4.reserved_bytes)
      assert.is_true(m4.device_frees > m3.device_frees)
    end)

    it_gpu("mixing devices in one op is a clear error naming both", function()
      local c, g = keel.ones{2}, keel.ones{2}:cuda()
      err_match(function() return c + g end, "add: expected all tensors on one device, got cpu and cuda")
      err_match(function() return g:matmul(keel.ones{2, 2}) end, "matmul: .*got cuda and cpu")
      err_match(function() return keel.cat({c, g}) end, "cat: expected all tensors on one device")
      err_match(function() return keel.nn.functional.mse_loss(g, c) end, "mse_loss: .*got cuda and cpu")
    end)

    it_gpu("to() is differentiable: the gradient comes back to the input's device", function()
      local x = keel.tensor({1, 2, 3}, {dtype = "float64", requires_grad = true})
      local y = x:cuda()
      assert.are.equal("to_device", y.grad_fn)
      local z = y:cpu()
      ;(z * z):sum():backward()
      assert.are.equal("cpu", x.grad.device)
      assert.are.same({2, 4, 6}, x.grad:totable())
      -- a CUDA leaf gets a CUDA gradient
      local w = keel.tensor({1, 2}, {dtype = "float64"}):cuda():requires_grad_()
      ;(w:cpu() * 3):sum():backward()
      assert.are.equal("cuda", w.grad.device)
      assert.are.same({3, 3}, w.grad:cpu():totable())
    end)

    it_gpu("model:to('cuda') moves parameters, grads and buffers in place", function()
      local m = nn.Sequential{nn.Linear(3, 2), nn.BatchNorm1d(2)}
      m(keel.randn{4, 3}):sum():backward()
      local w, rm = m[1].weight, m[2].running_mean
      local wv, gv = w:totable(), w.grad:totable()
      local params = m:parameters()
      assert.are.equal(m, m:to("cuda"))
      assert.is_true(rawequal(w, m[1].weight))
      assert.is_true(rawequal(rm, m[2].running_mean))
      assert.are.equal("cuda", w.device)
      assert.are.equal("cuda", rm.device)
      assert.are.equal("cuda", w.grad.device)
      assert.is_true(nn.is_parameter(w) and w.requires_grad and w.is_leaf)
      for i, p in ipairs(m:parameters()) do assert.is_true(rawequal(params[i], p)) end
      assert.are.same(wv, w:cpu():totable())
      assert.are.same(gv, w.grad:cpu():totable())
      m:cpu()
      assert.is_true(rawequal(w, m[1].weight))
      assert.are.equal("cpu", w.device)
      assert.are.same(wv, w:totable())
      m:to("cuda:0")
      assert.are.equal("cuda", m[1].bias.device)
      m:to{device = "cpu", dtype = "float64"}        -- a dtype change makes new parameters
      assert.are.equal("float64", m[1].weight.dtype)
      assert.are.equal("cpu", m[1].weight.device)
    end)

    it_gpu("factories take opts.device and the default device", function()
      assert.are.equal("cuda", keel.ones({2}, {device = "cuda"}).device)
      assert.are.equal("cuda", keel.full({2}, 3, {device = "cuda"}).device)
      assert.are.equal("cuda", keel.tensor({1, 2}, {device = "cuda"}).device)
      assert.are.equal("cuda", keel.arange(0, 4, 1, {device = "cuda"}).device)
      assert.are.equal("cuda", keel.eye(2, {device = "cuda"}).device)
      assert.are.equal("cpu", keel.tensor(keel.ones{2}:cuda(), {device = "cpu"}).device)
      -- a tensor source keeps its dtype unless opts names one, and the copy is its own
      local ids = keel.tensor({3, 1, 2}, {dtype = "int64"})
      local up = keel.tensor(ids, {device = "cuda"})
      assert.are.equal("int64", up.dtype)
      assert.are.equal("cuda", up.device)
      local f64 = keel.tensor(ids, {device = "cuda", dtype = "float64"})
      assert.are.equal("float64", f64.dtype)
      assert.are.same({3, 1, 2}, f64:cpu():totable())
      local back = keel.tensor(up, {device = "cpu"})
      up:fill_(7)   -- (the stand-in plugin of device_spec has no int64 add)
      assert.are.same({3, 1, 2}, back:totable())
      assert.are.same({3, 1, 2}, ids:totable())
      keel.manual_seed(11)
      local c = keel.randn{3, 4}
      local prev = keel.set_default_device("cuda")
      assert.are.equal("cpu", prev)
      keel.manual_seed(11)
      local g = keel.randn{3, 4}
      assert.are.equal("cuda", keel.get_default_device())
      keel.set_default_device(prev)
      assert.are.equal("cuda", g.device)
      assert.are.same(c:totable(), g:cpu():totable())   -- same seed, same numbers
    end)

    it_gpu("printing shows the device and the values", function()
      local s = tostring(keel.tensor{{1, 2}, {3, 4}}:cuda())
      assert.is_truthy(s:find("[keel.Tensor float32 cuda 2x2]", 1, true), s)
      assert.is_truthy(s:find("[[1., 2.],", 1, true), s)
    end)

    it_gpu("set_data moves a tensor in place and refuses to strand its .grad", function()
      local p = keel.tensor({1, 2}, {requires_grad = true})
      ;(p * 2):sum():backward()
      err_match(function() p:set_data(p:detach():cuda()) end, "set_data: the tensor's .grad is float32 on cpu")
      p.grad = nil
      p:set_data(p:detach():cuda())
      assert.are.equal("cuda", p.device)
      assert.is_true(p.requires_grad)
      err_match(function() p.grad = keel.ones{2} end, "grad: gradient on cpu assigned to a tensor on cuda")
    end)
  end)
end
