--
-- tests/cuda_precision_spec.lua: the float32 matmul precision (autocast)
-- on CUDA agrees with the CPU's. Both round the operands of every product
-- to the format and sum in float32, so a GPU product that ignored the
-- setting (full float32) would differ from the CPU's by the rounding,
-- far outside the tolerance: bfloat16 keeps 8 significant bits.
--
local H = require "helper"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local D = require "devcheck"
local F = keel.nn.functional
local gpu_it = H.gpu_it(it, pending)

-- products of values in [-2, 2] over k terms: float32 summation order only
local TOL = {atol = 1e-4, rtol = 1e-4}

local function under(p, fn)
  local prev = keel.set_float32_matmul_precision(p)
  local ok, err = pcall(fn)
  keel.set_float32_matmul_precision(prev)
  if not ok then error(err, 0) end
end

describe("matmul precision on CUDA", function()
  for _, p in ipairs {"tf32", "bfloat16", "float16"} do
    gpu_it(p .. ": matmul, batched and transposed, forward and gradients", function()
      under(p, function()
        D.check(function(a, b) return keel.matmul(a, b) end,
                {D.input({7, 33}, {seed = 1}), D.input({33, 5}, {seed = 2})}, {tol = TOL})
        D.check(function(a, b) return keel.matmul(a:transpose(2, 3), b) end,
                {D.input({3, 17, 6}, {seed = 3}), D.input({17, 4}, {seed = 4})}, {tol = TOL})
      end)
    end)

    gpu_it(p .. ": conv2d and linear", function()
      under(p, function()
        D.check(function(x, w, b) return F.conv2d(x, w, b, {padding = 1}) end,
                {D.input({2, 3, 7, 6}, {seed = 5}), D.input({4, 3, 3, 3}, {seed = 6}), D.input({4}, {seed = 7})},
                {tol = TOL})
        D.check(function(x, w) return F.linear(x, w) end,
                {D.input({5, 40}, {seed = 8}), D.input({9, 40}, {seed = 9})}, {tol = TOL})
      end)
    end)
  end

  gpu_it("the GPU product is really rounded: bfloat16 differs from full precision", function()
    local a, b = D.input({4, 64}, {seed = 11, grad = false}), D.input({64, 3}, {seed = 12, grad = false})
    local full = keel.matmul(a:cuda(), b:cuda()):cpu()
    local r
    under("bfloat16", function() r = keel.matmul(a:cuda(), b:cuda()):cpu() end)
    assert.is_true((r - full):abs():max():item() > 1e-3)
  end)

  gpu_it("float16 overflows on the device as on the CPU", function()
    local a = keel.tensor({{70000, 1}}):cuda()
    local b = keel.tensor({{1}, {1}}):cuda()
    under("float16", function()
      assert.are.equal(math.huge, keel.matmul(a, b):cpu():totable()[1][1])
    end)
  end)

  gpu_it("an LSTM under autocast agrees with the CPU's", function()
    keel.manual_seed(5)
    local cpu = keel.nn.LSTM(6, 8)
    local dev = keel.nn.LSTM(6, 8)
    for i, p in ipairs(dev:parameters()) do p:set_data(cpu:parameters()[i]:detach():clone()) end
    dev:to("cuda")
    local x = D.input({4, 3, 6}, {seed = 13, grad = false})
    local yc, yd
    under("bfloat16", function()
      yc = cpu(x)
      yd = dev(x:cuda())
    end)
    H.assert_close(yd:cpu(), yc:totable(), TOL)
  end)
end)
