-- init_spec.lua: keel.nn.init against PyTorch's torch.nn.init. The
-- reference numbers (gains, fans, sample statistics of torch's own
-- initialisers on the same shapes) come from tests/fixtures/init_ref.py:
--   /usr/bin/python3 tests/fixtures/init_ref.py > tests/fixtures/init_ref.lua
-- Distributions are compared through their formulas and torch's samples:
-- sample std within 3% (relative), mean within 6 standard errors, uniform
-- samples inside the exact bound and reaching close to it.
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local init = nn.init
local REF = require "fixtures.init_ref"

local SHAPE = {256, 1024}
local CONV = {64, 32, 3, 3}
local sqrt = math.sqrt

local function stats(t)
  local d = t:detach():double()
  return {std = d:std():item(), mean = d:mean():item(), maxabs = d:abs():max():item(), n = d:numel()}
end

local function within(actual, expected, rel, what)
  assert.is_true(math.abs(actual - expected) <= rel * math.abs(expected),
    ("%s: %.6g, expected %.6g (within %g%%)"):format(what, actual, expected, rel * 100))
end

-- Checks the sample of t: std (formula and torch's sample), mean, and for
-- a uniform distribution the bound.
local function check(name, t, want)
  local s = stats(t)
  local ref = REF.stats[name]
  within(s.std, want.std, 0.03, name .. " std vs formula")
  within(s.std, ref.std, 0.03, name .. " std vs torch")
  within(ref.std, want.std, 0.03, name .. " torch's std vs formula")
  local mean = want.mean or 0
  assert.is_true(math.abs(s.mean - mean) <= 6 * want.std / math.sqrt(s.n) + 1e-12,
    ("%s: mean %.6g, expected %.6g"):format(name, s.mean, mean))
  if want.bound then
    assert.is_true(s.maxabs <= want.bound, ("%s: max |x| %.9g above bound %.9g"):format(name, s.maxabs, want.bound))
    assert.is_true(ref.maxabs <= want.bound, name .. ": torch's sample above the bound")
    assert.is_true(s.maxabs >= 0.99 * want.bound, name .. ": sample does not reach the bound")
  end
end

describe("nn.init.calculate_gain", function()
  it("equals torch's gains exactly", function()
    for _, g in ipairs(REF.gains) do
      assert.are.equal(g[3], init.calculate_gain(g[1], g[2]), g[1] .. " " .. tostring(g[2]))
    end
  end)

  it("rejects unknown nonlinearities and bad slopes", function()
    H.assert_error(function() init.calculate_gain("swish") end, "calculate_gain: unsupported nonlinearity swish")
    H.assert_error(function() init.calculate_gain("leaky_relu", "x") end,
      "calculate_gain: negative_slope x is not a valid number")
  end)
end)

describe("nn.init._calculate_fan_in_and_fan_out", function()
  it("equals torch's fans", function()
    for _, f in ipairs(REF.fans) do
      local fi, fo = init._calculate_fan_in_and_fan_out(keel.empty(f[1]))
      assert.are.same({f[2], f[3]}, {fi, fo})
    end
  end)

  it("needs at least 2 dimensions", function()
    H.assert_error(function() init._calculate_fan_in_and_fan_out(keel.empty{3}) end,
      "_calculate_fan_in_and_fan_out: fan in and fan out can not be computed for a tensor with 1 dimension, expected at least 2")
    H.assert_error(function() init.xavier_uniform_(keel.empty{3}) end,
      "xavier_uniform_: fan in and fan out can not be computed")
    H.assert_error(function() init._calculate_fan_in_and_fan_out(3) end,
      "_calculate_fan_in_and_fan_out: argument #1: expected a keel.Tensor, got number")
  end)
end)

describe("nn.init distributions match PyTorch's", function()
  setup(function() keel.manual_seed(1234) end)

  it("xavier_uniform_, xavier_normal_", function()
    local std = sqrt(2 / (256 + 1024))
    check("xavier_uniform", init.xavier_uniform_(keel.empty(SHAPE)), {std = std, bound = sqrt(3) * std})
    local g = init.calculate_gain("tanh")
    check("xavier_uniform_gain", init.xavier_uniform_(keel.empty(SHAPE), g),
      {std = g * std, bound = sqrt(3) * g * std})
    check("xavier_normal", init.xavier_normal_(keel.empty(SHAPE)), {std = std})
    local cstd = 2 * sqrt(2 / (32 * 9 + 64 * 9))
    check("xavier_normal_gain", init.xavier_normal_(keel.empty(CONV), {gain = 2}), {std = cstd})
  end)

  it("kaiming_uniform_, kaiming_normal_", function()
    local fan_in, fan_out = 1024, 256
    local s = sqrt(2) / sqrt(fan_in)
    check("kaiming_uniform", init.kaiming_uniform_(keel.empty(SHAPE)), {std = s, bound = sqrt(3) * s})
    local s5 = sqrt(2 / 6) / sqrt(32 * 9)
    check("kaiming_uniform_sqrt5", init.kaiming_uniform_(keel.empty(CONV), {a = sqrt(5)}),
      {std = s5, bound = sqrt(3) * s5})
    local so = sqrt(2) / sqrt(fan_out)
    check("kaiming_uniform_fan_out_relu",
      init.kaiming_uniform_(keel.empty(SHAPE), {mode = "fan_out", nonlinearity = "relu"}),
      {std = so, bound = sqrt(3) * so})
    check("kaiming_normal", init.kaiming_normal_(keel.empty(SHAPE)), {std = s})
    check("kaiming_normal_fan_out", init.kaiming_normal_(keel.empty(CONV), {mode = "fan_out"}),
      {std = sqrt(2) / sqrt(64 * 9)})
    check("kaiming_normal_leaky", init.kaiming_normal_(keel.empty(SHAPE), {a = 0.2}),
      {std = sqrt(2 / 1.04) / sqrt(fan_in)})
  end)

  it("normal_, uniform_", function()
    check("normal", init.normal_(keel.empty(SHAPE), 0.5, 2), {std = 2, mean = 0.5})
    local t = init.uniform_(keel.empty(SHAPE), -3, 1)
    check("uniform", t, {std = 4 / sqrt(12), mean = -1})
    assert.is_true(t:min():item() >= -3 and t:max():item() <= 1)
    local u = init.uniform_(keel.empty{1000})
    assert.is_true(u:min():item() >= 0 and u:max():item() <= 1)
    local n = init.normal_(keel.empty{20000})
    within(stats(n).std, 1, 0.03, "normal_ default std")
  end)

  it("nn.Linear's default weight and bias", function()
    local l = nn.Linear(1024, 256)
    local bound = 1 / sqrt(1024)
    local s = stats(l.weight)
    within(s.std, bound / sqrt(3), 0.03, "Linear weight std")
    within(s.std, REF.linear.weight.std, 0.03, "Linear weight std vs torch")
    assert.is_true(s.maxabs <= bound and REF.linear.weight.maxabs <= bound)
    assert.is_true(s.maxabs >= 0.99 * bound)
    local lb = nn.Linear(64, 4096)
    local b = stats(lb.bias)
    within(b.std, 0.125 / sqrt(3), 0.03, "Linear bias std")
    within(b.std, REF.linear.bias.std, 0.03, "Linear bias std vs torch")
    assert.is_true(b.maxabs <= 0.125 and REF.linear.bias.maxabs <= 0.125)
  end)
end)

describe("nn.init.orthogonal_", function()
  it("gives orthonormal rows (rows <= cols), torch's entry scale", function()
    keel.manual_seed(7)
    local w = init.orthogonal_(keel.empty(SHAPE))
    local err = (w:matmul(w:t()) - keel.eye(256)):abs():max():item()
    assert.is_true(err <= 1e-5, "W W^T - I: " .. err)
    check("orthogonal", w, {std = 1 / sqrt(1024)})
  end)

  it("gives orthonormal columns (rows > cols), scaled by the gain", function()
    local w = init.orthogonal_(keel.empty{1024, 256}, 0.5)
    local err = (w:t():matmul(w) - keel.eye(256) * 0.25):abs():max():item()
    assert.is_true(err <= 1e-5, "W^T W - I/4: " .. err)
    check("orthogonal_gain", w, {std = 0.5 / sqrt(1024)})
  end)

  it("flattens the trailing dims and works in float64", function()
    local w = init.orthogonal_(keel.empty({4, 2, 3}, {dtype = "float64"}), {gain = 2})
    local m = w:reshape{4, 6}
    H.assert_close(m:matmul(m:t()), (keel.eye(4, 4, {dtype = "float64"}) * 4):totable(), 1e-12)
    local sq = init.orthogonal_(keel.empty{5, 5})
    H.assert_close(sq:matmul(sq:t()), keel.eye(5):totable(), 1e-6)
  end)

  it("needs at least 2 dimensions", function()
    H.assert_error(function() init.orthogonal_(keel.empty{4}) end,
      "orthogonal_: tensor has 1 dimension, expected at least 2")
  end)

  -- A Haar-distributed orthogonal matrix has entries symmetric about 0
  -- (PyTorch's sign correction of Q is there to get this).
  it("has no sign bias (each entry is symmetric about 0)", function()
    keel.manual_seed(99)
    local pos = 0
    local trials = 400
    for _ = 1, trials do
      if init.orthogonal_(keel.empty{3, 3})[1][1] > 0 then pos = pos + 1 end
    end
    assert.is_true(math.abs(pos - trials / 2) <= 4 * math.sqrt(trials / 4), "positive " .. pos)
  end)
end)

describe("nn.init fills in place without recording", function()
  it("works on parameters that require grad and returns the tensor", function()
    local p = nn.Parameter(keel.empty{8, 8})
    for _, fn in ipairs{
      function(t) return init.xavier_uniform_(t) end, function(t) return init.xavier_normal_(t) end,
      function(t) return init.kaiming_uniform_(t) end, function(t) return init.kaiming_normal_(t) end,
      function(t) return init.orthogonal_(t) end, function(t) return init.normal_(t) end,
      function(t) return init.uniform_(t) end, function(t) return init.constant_(t, 3) end,
      function(t) return init.zeros_(t) end, function(t) return init.ones_(t) end,
    } do
      assert.are.equal(p, fn(p))
      assert.is_true(p.is_leaf)
      assert.is_nil(p.grad_fn)
      assert.is_true(p.requires_grad)
    end
    H.assert_all(p, 1)
    H.assert_all(init.constant_(keel.empty({3}, {dtype = "float64"}), -2.5), -2.5)
    H.assert_all(init.zeros_(keel.ones{3}), 0)
  end)

  it("leaves zero-element tensors alone", function()
    local t = keel.empty{0, 3}
    assert.are.equal(t, init.kaiming_uniform_(t))
    assert.are.equal(t, init.kaiming_normal_(t))
    assert.are.equal(t, init.orthogonal_(t))
  end)

  it("checks its arguments", function()
    H.assert_error(function() init.uniform_(3) end, "uniform_: argument #1: expected a keel.Tensor, got number")
    H.assert_error(function() init.normal_(keel.zeros({2}, {dtype = "int64"})) end,
      "normal_: tensor has dtype int64, expected float32 or float64")
    H.assert_error(function() init.uniform_(keel.empty{2}, "a") end, "uniform_: a: expected a number, got string")
    H.assert_error(function() init.normal_(keel.empty{2}, 0, {}) end, "normal_: std: expected a number, got table")
    H.assert_error(function() init.constant_(keel.empty{2}) end, "constant_: val: expected a number, got nil")
    H.assert_error(function() init.xavier_normal_(keel.empty{2, 2}, "big") end,
      "xavier_normal_: gain: expected a number, got string")
    H.assert_error(function() init.kaiming_uniform_(keel.empty{2, 2}, {mode = "fan_avg"}) end,
      "kaiming_uniform_: mode fan_avg is not supported, expected fan_in or fan_out")
    H.assert_error(function() init.kaiming_normal_(keel.empty{2, 2}, {nonlinearity = "swish"}) end,
      "kaiming_normal_: unsupported nonlinearity swish")
    H.assert_error(function() init.kaiming_normal_(keel.empty{2, 2}, 0.1) end,
      "kaiming_normal_: argument #2: expected an options table {a=, mode=, nonlinearity=}, got number")
  end)
end)
