-- act_spec.lua: activations and softmax. Values and gradients against
-- PyTorch (tests/fixtures/act_ref.lua, from act_ref.py), numerical
-- stability, the modules, tensor methods and aliases, and error messages.
-- Gradient checks are in tests/cases/act.lua (run by autograd_spec.lua).
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local F = nn.functional
local close = H.assert_close

local REF = dofile("tests/fixtures/act_ref.lua")

-- {======================================================================
-- Fixture driver (shared shape with loss_spec.lua): rebuilds the inputs
-- act_ref.py used from the same formula.
-- =======================================================================

local function val(k, seed, lo, hi)
  return lo + (hi - lo) * (((k * 7919 + seed * 104729) % 10007) / 10007)
end

local function build(spec, dtype, requires_grad)
  local v = {}
  for k = 0, H.numel(spec.shape) - 1 do v[k + 1] = val(k, spec.seed, spec.lo, spec.hi) end
  return keel.tensor(H.nest(v, spec.shape), { dtype = dtype, requires_grad = requires_grad })
end

local TOL = { float64 = { atol = 1e-11, rtol = 1e-10 }, float32 = { atol = 2e-6, rtol = 2e-5 } }

local function check_case(c, dtype)
  local xs = {}
  for i, s in ipairs(c.inputs) do xs[i] = build(s, dtype, c.grad[i] ~= nil) end
  local out
  if c.dim then
    out = F[c.fn](xs[1], c.dim)
  else
    out = F[c.fn](xs[1], c.opts)
  end
  assert.are.equal(dtype, out.dtype)
  close(out, H.nest(c.out, c.shape), TOL[dtype], c.label .. " (" .. dtype .. ") values")
  local r = {}
  for k = 0, #c.out - 1 do r[k + 1] = val(k, 99, 0.5, 1.5) end
  (out * keel.tensor(H.nest(r, c.shape), { dtype = dtype })):sum():backward()
  for i, g in pairs(c.grad) do
    close(xs[i].grad, H.nest(g, c.inputs[i].shape), TOL[dtype], c.label .. " (" .. dtype .. ") grad " .. i)
  end
end

-- }======================================================================

describe("activations match PyTorch", function()
  for _, c in ipairs(REF.activations) do
    for _, dtype in ipairs { "float64", "float32" } do
      it(c.label .. " " .. dtype, function() check_case(c, dtype) end)
    end
  end
end)

describe("softmax / log_softmax", function()
  it("are stable for large inputs", function()
    for _, dt in ipairs { "float32", "float64" } do
      local x = keel.tensor({ { 1000, 0 }, { -1000, -1000 }, { 0, -1000 } }, { dtype = dt })
      close(F.softmax(x, 2), { { 1, 0 }, { 0.5, 0.5 }, { 1, 0 } }, 0)
      close(F.log_softmax(x, 2), { { 0, -1000 }, { -math.log(2), -math.log(2) }, { 0, -1000 } }, 1e-6)
    end
    local big = keel.tensor({ 1e4, 1e4 + 1, 1e4 - 1 }, { dtype = "float64" })
    local lse = 1e4 + math.log(1 + math.exp(1) + math.exp(-1))
    close(big:log_softmax(1), { 1e4 - lse, 1e4 + 1 - lse, 1e4 - 1 - lse }, 1e-9)
    close(big:softmax(1):sum(), 1, 1e-15)
  end)

  it("treat -inf as probability 0", function()
    local x = keel.tensor({ 0, -math.huge, 1 }, { dtype = "float64" })
    local e = math.exp(1)
    close(x:softmax(1), { 1 / (1 + e), 0, e / (1 + e) }, 1e-15)
    local l = x:log_softmax(1):totable()
    assert.are.equal(-math.huge, l[2])
    close(l[1], -math.log(1 + e), 1e-15)
  end)

  it("propagate NaN to the whole slice, as PyTorch", function()
    local x = keel.tensor({ { 1, 0 / 0, 2 }, { 1, 2, 3 } }, { dtype = "float64" })
    for _, fn in ipairs { "softmax", "log_softmax" } do
      local y = x[fn](x, 2):totable()
      for j = 1, 3 do assert.is_true(y[1][j] ~= y[1][j], fn .. " keeps NaN") end
      assert.is_true(y[2][1] == y[2][1], fn .. " leaves other rows alone")
    end
  end)

  it("give finite gradients for large inputs", function()
    local x = keel.tensor({ { 1000, 0, -1000 } }, { dtype = "float64", requires_grad = true })
    local y = F.log_softmax(x, 2)
    y:backward(keel.tensor({ { 1, 2, 3 } }, { dtype = "float64" }))
    -- g - softmax(x) sum(g) = {1 - 6, 2, 3}
    close(x.grad, { { -5, 2, 3 } }, 1e-12)
    x.grad = nil
    F.softmax(x, 2):backward(keel.tensor({ { 1, 2, 3 } }, { dtype = "float64" }))
    close(x.grad, { { 0, 0, 0 } }, 1e-12)
  end)

  it("default to the last dimension, and a 0-d input gives 1 (log: 0)", function()
    local x = H.t64({ 2, 3 }, -1, 1, 1, { requires_grad = false })
    close(F.softmax(x), F.softmax(x, 2):totable(), 0)
    close(F.log_softmax(x), x:log_softmax(-1):totable(), 0)
    close(F.softmax(keel.tensor(3.5)), 1, 0)
    close(F.log_softmax(keel.tensor(3.5), 1), 0, 0)
  end)

  it("are tensor methods with functional forms, recorded by name", function()
    local x = H.t64({ 2, 3 }, -1, 1, 2)
    assert.are.equal("softmax", x:softmax(1).grad_fn)
    assert.are.equal("log_softmax", x:log_softmax(2).grad_fn)
    close(keel.softmax(x, 1), x:softmax(1):detach():totable(), 0)
    close(keel.log_softmax(x, 2), x:log_softmax(2):detach():totable(), 0)
  end)

  it("work on strided views", function()
    local x = H.t64({ 3, 4 }, -2, 2, 3, { requires_grad = false })
    close(x:t():softmax(1), x:softmax(2):t():contiguous():totable(), 1e-15)
  end)
end)

describe("pointwise activations", function()
  it("are stable at the extremes", function()
    local x = keel.tensor({ -1000, -40, 0, 40, 1000 }, { dtype = "float64", requires_grad = true })
    close(F.silu(x), { 0, -40 * math.exp(-40) / (1 + math.exp(-40)), 0, 40 / (1 + math.exp(-40)), 1000 }, 1e-15)
    close(F.gelu(x), { 0, 0, 0, 40, 1000 }, 1e-15)
    close(F.elu(x), { -1, math.exp(-40) - 1, 0, 40, 1000 }, 1e-15)
    close(F.softplus(x), { 0, math.log(1 + math.exp(-40)), math.log(2), 40, 1000 }, 1e-15)
    for _, fn in ipairs { "silu", "gelu", "elu", "softplus", "leaky_relu" } do
      x.grad = nil
      F[fn](x):sum():backward()
      for _, g in ipairs(x.grad:totable()) do
        assert.is_true(g == g and g > -1e300 and g < 1e300, fn .. " gives a non-finite gradient")
      end
    end
  end)

  it("gelu's exact form stays accurate far below 0 (erfc, not 1 + erf)", function()
    local y = F.gelu(keel.tensor({ -10 }, { dtype = "float64" })):totable()[1]
    -- 0.5 x erfc(-x / sqrt 2) at x = -10 is -7.6e-23
    assert.is_true(y < -7e-23 and y > -8e-23, "gelu(-10) = " .. y)
  end)

  it("keep the dtype and record their op names", function()
    for _, fn in ipairs { "leaky_relu", "elu", "gelu", "silu", "softplus" } do
      local x = keel.tensor({ -1, 2 }, { requires_grad = true })
      local y = F[fn](x)
      assert.are.equal("float32", y.dtype)
      assert.are.equal(fn, y.grad_fn)
    end
  end)

  it("have positional and table options", function()
    local x = keel.tensor({ -2, 3 }, { dtype = "float64" })
    close(F.leaky_relu(x, 0.2), { -0.4, 3 }, 1e-15)
    close(F.leaky_relu(x, { negative_slope = 0.2 }), { -0.4, 3 }, 1e-15)
    close(F.elu(x, 2), F.elu(x, { alpha = 2 }):totable(), 0)
    close(F.gelu(x, "tanh"), F.gelu(x, { approximate = "tanh" }):totable(), 0)
    close(F.gelu(x, "none"), F.gelu(x):totable(), 0)
    close(F.softplus(x, 2, 1), F.softplus(x, { beta = 2, threshold = 1 }):totable(), 0)
    close(F.softplus(x, 2, 1), { math.log(1 + math.exp(-4)) / 2, 3 }, 1e-15)
  end)

  it("relu, sigmoid and tanh have functional aliases", function()
    local x = H.t64({ 4 }, -2, 2, 4, { requires_grad = false })
    close(F.relu(x), x:relu():totable(), 0)
    close(F.sigmoid(x), x:sigmoid():totable(), 0)
    close(F.tanh(x), x:tanh():totable(), 0)
    H.assert_error(function() F.relu(3) end, "relu: argument #1: expected a keel.Tensor, got number")
  end)
end)

describe("activation modules", function()
  local x = H.t64({ 2, 5 }, -3, 3, 5, { requires_grad = false })

  it("compute their functional forms", function()
    close(nn.ReLU()(x), x:relu():totable(), 0)
    close(nn.Sigmoid()(x), x:sigmoid():totable(), 0)
    close(nn.Tanh()(x), x:tanh():totable(), 0)
    close(nn.SiLU()(x), F.silu(x):totable(), 0)
    close(nn.LeakyReLU()(x), F.leaky_relu(x, 0.01):totable(), 0)
    close(nn.LeakyReLU(0.3)(x), F.leaky_relu(x, 0.3):totable(), 0)
    close(nn.LeakyReLU { negative_slope = 0.3 }(x), F.leaky_relu(x, 0.3):totable(), 0)
    close(nn.ELU()(x), F.elu(x):totable(), 0)
    close(nn.ELU(0.5)(x), F.elu(x, 0.5):totable(), 0)
    close(nn.GELU()(x), F.gelu(x):totable(), 0)
    close(nn.GELU { approximate = "tanh" }(x), F.gelu(x, "tanh"):totable(), 0)
    close(nn.GELU("tanh")(x), F.gelu(x, "tanh"):totable(), 0)
    close(nn.Softplus { beta = 2, threshold = 3 }(x), F.softplus(x, 2, 3):totable(), 0)
    close(nn.Softmax(1)(x), x:softmax(1):totable(), 0)
    close(nn.Softmax()(x), x:softmax(2):totable(), 0)
    close(nn.LogSoftmax(-2)(x), x:log_softmax(1):totable(), 0)
    close(nn.LogSoftmax()(x), x:log_softmax(2):totable(), 0)
  end)

  it("print like PyTorch's", function()
    assert.are.equal("ReLU()", tostring(nn.ReLU()))
    assert.are.equal("LeakyReLU(negative_slope=0.2)", tostring(nn.LeakyReLU(0.2)))
    assert.are.equal("ELU(alpha=1.0)", tostring(nn.ELU()))
    assert.are.equal("GELU(approximate='tanh')", tostring(nn.GELU("tanh")))
    assert.are.equal("Softplus(beta=1.0, threshold=20.0)", tostring(nn.Softplus()))
    assert.are.equal("Softmax(dim=-1)", tostring(nn.Softmax()))
    assert.are.equal("LogSoftmax(dim=2)", tostring(nn.LogSoftmax(2)))
  end)

  it("have no parameters and work in a Sequential with backward", function()
    local model = nn.Sequential { nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3), nn.LogSoftmax(2) }
    assert.are.equal(4, #model:parameters())
    assert.are.equal(0, #nn.GELU():parameters())
    local y = model(x:float())
    assert.are.same({ 2, 3 }, y.shape)
    y:sum():backward()
    assert.is_not_nil(model[1].weight.grad)
  end)

  it("check their arguments", function()
    H.assert_error(function() nn.Softmax(0) end, "Softmax: dim: expected a nonzero integer")
    H.assert_error(function() nn.LogSoftmax(1.5) end, "LogSoftmax: dim: expected a nonzero integer")
    H.assert_error(function() nn.GELU("fast") end, 'GELU: approximate must be "none" or "tanh", got fast')
    H.assert_error(function() nn.GELU { approx = "tanh" } end, "GELU: unknown option 'approx' (expected approximate)")
    H.assert_error(function() nn.LeakyReLU("x") end, "LeakyReLU: negative_slope: expected a number, got string")
    H.assert_error(function() nn.Softplus { beta = 0 } end, "Softplus: beta must not be 0")
  end)
end)

describe("activation errors", function()
  local x = keel.tensor({ { 1, 2 }, { 3, 4 } })

  it("name the function and the problem", function()
    H.assert_error(function() F.softmax(x, 3) end, "softmax: dimension 3 out of range (expected 1..2 or -2..-1)")
    H.assert_error(function() x:log_softmax(0) end, "log_softmax: argument #2: dimension 0 is invalid")
    H.assert_error(function() F.softmax(keel.tensor({ 1, 2 }, { dtype = "int64" }), 1) end,
      "softmax: expected a float32 or float64 tensor, got int64")
    H.assert_error(function() F.gelu(keel.tensor({ 1 }, { dtype = "int64" })) end,
      "gelu: expected a float32 or float64 tensor, got int64")
    H.assert_error(function() F.gelu(x, "fast") end, 'gelu: approximate must be "none" or "tanh", got "fast"')
    H.assert_error(function() F.gelu(x, { approximate = true }) end,
      'gelu: approximate must be "none" or "tanh", got boolean')
    H.assert_error(function() F.softplus(x, 0) end, "softplus: beta must be a nonzero finite number, got 0")
    H.assert_error(function() F.leaky_relu(x, { slope = 0.1 }) end,
      "leaky_relu: unknown option 'slope' (expected negative_slope)")
    H.assert_error(function() F.elu(x, { alpha = "big" }) end, "elu: option alpha must be a number, got string")
    H.assert_error(function() F.elu(x, true) end, "elu: argument #2: expected an options table, got boolean")
    H.assert_error(function() F.silu("x") end, "silu: argument #1: expected a keel.Tensor, got string")
  end)
end)
