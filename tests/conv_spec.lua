-- conv_spec.lua: conv2d, max_pool2d, avg_pool2d and adaptive_avg_pool2d
-- against PyTorch's numbers (tests/fixtures/conv_ref.lua, float32 and
-- float64), their error paths, and the modules Conv2d, MaxPool2d,
-- AvgPool2d, AdaptiveAvgPool2d. Gradient checks are in tests/cases/conv.lua.
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local F = nn.functional
local REF = dofile("tests/fixtures/conv_ref.lua")
local err = H.assert_error

local TOL = {
  float64 = { atol = 1e-10, rtol = 1e-10 },
  float32 = { atol = 2e-5, rtol = 1e-5 },
}

-- The fixture's input: H.values(numel, -1, 1, seed), optionally rounded
-- down to a multiple of 1/2.
local function make(shape, seed, dtype, q)
  local v = H.values(H.numel(shape), -1, 1, seed)
  if q then
    for i = 1, #v do v[i] = math.floor(v[i] * 2) / 2 end
  end
  return keel.tensor(H.nest(v, shape), { dtype = dtype, requires_grad = true })
end

-- sum(y * R) with the fixture's R, backward.
local function backward_loss(y)
  local r = keel.tensor(H.nest(H.values(H.numel(y.shape), -1, 1, 99), y.shape), { dtype = y.dtype })
  ;(y * r):sum():backward()
end

local function copy(t)
  local o = {}
  for k, v in pairs(t or {}) do o[k] = v end
  return o
end

describe("conv2d against PyTorch", function()
  for _, dtype in ipairs { "float64", "float32" } do
    for _, c in ipairs(REF.conv2d) do
      it(c.name .. " (" .. dtype .. ")", function()
        local x, w = make(c.x[1], c.x[2], dtype), make(c.w[1], c.w[2], dtype)
        local b = c.b and make(c.b[1], c.b[2], dtype) or nil
        local y = F.conv2d(x, w, b, c.opts)
        H.assert_shape(y, c.y_shape)
        assert.are.equal(dtype, y.dtype)
        -- an unbatched input runs as a batch of one, squeezed by a view
        assert.are.equal(#c.x[1] == 4 and "conv2d" or "view", y.grad_fn)
        local tol = TOL[dtype]
        H.assert_close(H.flat(y), c.y, tol, "y")
        backward_loss(y)
        H.assert_close(H.flat(x.grad), c.gx, tol, "grad x")
        H.assert_close(H.flat(w.grad), c.gw, tol, "grad w")
        if b then H.assert_close(H.flat(b.grad), c.gb, tol, "grad b") end
      end)
    end
  end
end)

describe("max_pool2d against PyTorch", function()
  for _, dtype in ipairs { "float64", "float32" } do
    for _, c in ipairs(REF.max_pool2d) do
      it(c.name .. " (" .. dtype .. ")", function()
        local x = make(c.x[1], c.x[2], dtype, c.x[3])
        local o = copy(c.opts)
        o.return_indices = true
        local y, idx = F.max_pool2d(x, c.kernel, o)
        H.assert_shape(y, c.y_shape)
        H.assert_shape(idx, c.y_shape)
        assert.are.equal("int64", idx.dtype)
        assert.are.same(c.indices, H.flat(idx))
        H.assert_close(H.flat(y), c.y, TOL[dtype], "y")
        backward_loss(y)
        H.assert_close(H.flat(x.grad), c.gx, TOL[dtype], "grad x")
      end)
    end
  end
end)

describe("avg_pool2d against PyTorch", function()
  for _, dtype in ipairs { "float64", "float32" } do
    for _, c in ipairs(REF.avg_pool2d) do
      it(c.name .. " (" .. dtype .. ")", function()
        local x = make(c.x[1], c.x[2], dtype)
        local y = F.avg_pool2d(x, c.kernel, c.opts)
        H.assert_shape(y, c.y_shape)
        H.assert_close(H.flat(y), c.y, TOL[dtype], "y")
        backward_loss(y)
        H.assert_close(H.flat(x.grad), c.gx, TOL[dtype], "grad x")
      end)
    end
  end
end)

describe("adaptive_avg_pool2d against PyTorch", function()
  for _, dtype in ipairs { "float64", "float32" } do
    for _, c in ipairs(REF.adaptive_avg_pool2d) do
      it(c.name .. " (" .. dtype .. ")", function()
        local x = make(c.x[1], c.x[2], dtype)
        local y = F.adaptive_avg_pool2d(x, c.size)
        H.assert_shape(y, c.y_shape)
        H.assert_close(H.flat(y), c.y, TOL[dtype], "y")
        backward_loss(y)
        H.assert_close(H.flat(x.grad), c.gx, TOL[dtype], "grad x")
      end)
    end
  end
end)

describe("conv2d and pools: behaviour", function()
  it("a non-contiguous input gives the same result as its contiguous copy", function()
    local x = H.t64({ 2, 3, 6, 5 }, -1, 1, 401, { requires_grad = false })
    local xt = x:transpose(3, 4):contiguous():transpose(3, 4)   -- same values, other strides
    assert.is_false(xt:is_contiguous())
    local w = H.t64({ 4, 3, 3, 2 }, -1, 1, 402, { requires_grad = false })
    H.assert_close(F.conv2d(xt, w, nil, { padding = 1 }), F.conv2d(x, w, nil, { padding = 1 }):totable())
    H.assert_close(F.max_pool2d(xt, 2), F.max_pool2d(x, 2):totable())
    H.assert_close(F.avg_pool2d(xt, 3, { stride = 1 }), F.avg_pool2d(x, 3, { stride = 1 }):totable())
    -- a non-contiguous weight too
    local wt = w:transpose(3, 4):contiguous():transpose(3, 4)
    H.assert_close(F.conv2d(x, wt, nil), F.conv2d(x, w, nil):totable())
  end)

  it("records nothing without grad, and names its grad_fn", function()
    local x = H.t64({ 1, 2, 4, 4 }, -1, 1, 403)
    local w = H.t64({ 2, 2, 3, 3 }, -1, 1, 404)
    local y = keel.no_grad(function() return F.conv2d(x, w) end)
    assert.is_nil(y.grad_fn)
    assert.is_false(y.requires_grad)
    assert.are.equal("conv2d", F.conv2d(x, w).grad_fn)
    assert.are.equal("max_pool2d", F.max_pool2d(x, 2).grad_fn)
    assert.are.equal("avg_pool2d", F.avg_pool2d(x, 2).grad_fn)
    assert.are.equal("adaptive_avg_pool2d", F.adaptive_avg_pool2d(x, 1).grad_fn)
    -- an unbatched input goes through views
    local y3 = F.conv2d(x:select(1, 1), w)
    H.assert_shape(y3, { 2, 2, 2 })
    assert.is_true(y3.requires_grad)
  end)

  it("max_pool2d: ties go to the first position, NaN propagates", function()
    local x = keel.ones({ 1, 1, 4, 4 })
    local y, idx = F.max_pool2d(x, 2, { return_indices = true })
    assert.are.same({ 1, 3, 9, 11 }, H.flat(idx))
    H.assert_all(y, 1)
    local v = H.values(16, -1, 1, 405)
    v[6] = 0 / 0      -- (2, 2)
    local xn = keel.tensor(H.nest(v, { 1, 1, 4, 4 }), { requires_grad = true })
    local yn, idn = F.max_pool2d(xn, 2, { return_indices = true })
    local fy = H.flat(yn)
    assert.is_true(fy[1] ~= fy[1])
    assert.are.equal(6, H.flat(idn)[1])
    yn:sum():backward()
    assert.are.equal(1, H.flat(xn.grad)[6])
    -- the 2x2 window ranks its taps a b / c d: a tie of b and c keeps b,
    -- and of two NaNs the later one (d) wins; the general scan agrees
    local t = keel.tensor({ { { { 0, 1, 0 / 0, 2 }, { 1, 0, 3, 0 / 0 } } } })
    for _, o in ipairs { {}, { stride = { 2, 1 } } } do
      o.return_indices = true
      local ty, ti = F.max_pool2d(t, 2, o)
      local fy, fi = H.flat(ty), H.flat(ti)
      assert.are.equal(1, fy[1])
      assert.are.equal(2, fi[1])
      assert.is_true(fy[#fy] ~= fy[#fy])
      assert.are.equal(8, fi[#fi])
    end
  end)

  it("max_pool2d returns indices only when asked, in the input's rank", function()
    local x = H.t64({ 2, 4, 4 }, -1, 1, 406, { requires_grad = false })
    local a, b = F.max_pool2d(x, 2)
    assert.is_nil(b)
    H.assert_shape(a, { 2, 2, 2 })
    local y, idx = F.max_pool2d(x, 2, { return_indices = true })
    H.assert_shape(idx, { 2, 2, 2 })
    H.assert_close(y, a:totable())
  end)

  it("an empty batch gives an empty output", function()
    local x = keel.zeros({ 0, 2, 5, 5 }, { requires_grad = true })
    local w = keel.ones({ 3, 2, 3, 3 }, { requires_grad = true })
    local y = F.conv2d(x, w, keel.ones({ 3 }))
    H.assert_shape(y, { 0, 3, 3, 3 })
    y:sum():backward()
    H.assert_shape(x.grad, { 0, 2, 5, 5 })
    H.assert_all(w.grad, 0)
    H.assert_shape(F.max_pool2d(x, 2), { 0, 2, 2, 2 })
    H.assert_shape(F.avg_pool2d(x, 2), { 0, 2, 2, 2 })
  end)

  it("accumulates gradients over calls and works in float32 and float64", function()
    for _, dt in ipairs { "float32", "float64" } do
      local x = keel.ones({ 1, 1, 3, 3 }, { dtype = dt })
      local w = keel.ones({ 1, 1, 2, 2 }, { dtype = dt, requires_grad = true })
      F.conv2d(x, w):sum():backward()
      F.conv2d(x, w):sum():backward()
      assert.are.equal(dt, w.grad.dtype)
      H.assert_all(w.grad, 8)
    end
  end)

  it("keeps memory flat over repeated steps", function()
    local x = keel.randn({ 8, 3, 12, 12 })
    local w = keel.randn({ 6, 3, 3, 3 }, { requires_grad = true })
    local function step()
      local y = F.max_pool2d(F.conv2d(x, w, nil, { padding = 1 }), 2)
      y:sum():backward()
      w.grad = nil
    end
    for _ = 1, 3 do step() end
    collectgarbage()
    local before = H.live_bytes()
    for _ = 1, 20 do step() end
    collectgarbage()
    assert.is_true(H.live_bytes() <= before, "live bytes grew from " .. before .. " to " .. H.live_bytes())
  end)
end)

describe("conv2d and pools: errors", function()
  local x = keel.zeros({ 1, 3, 5, 5 })
  local w = keel.zeros({ 4, 3, 3, 3 })

  it("conv2d: shapes", function()
    err(function() F.conv2d(keel.zeros({ 3, 5 }), w) end,
        "conv2d: input of shape [3,5], expected a 3-D [C, H, W] or 4-D [N, C, H, W] tensor")
    err(function() F.conv2d(x, keel.zeros({ 4, 3, 3 })) end,
        "conv2d: weight of shape [4,3,3], expected 4-D [out_channels, in_channels/groups, kH, kW]")
    err(function() F.conv2d(x, keel.zeros({ 4, 1, 3, 3 })) end,
        "conv2d: input has 3 channels, weight expects 1 (groups=1)")
    err(function() F.conv2d(x, keel.zeros({ 4, 1, 3, 3 }), nil, { groups = 2 }) end,
        "conv2d: input channels (3) must be divisible by groups (2)")
    err(function() F.conv2d(keel.zeros({ 1, 4, 5, 5 }), keel.zeros({ 3, 2, 3, 3 }), nil, { groups = 2 }) end,
        "conv2d: output channels (3) must be divisible by groups (2)")
    err(function() F.conv2d(keel.zeros({ 1, 4, 5, 5 }), keel.zeros({ 4, 1, 3, 3 }), nil, { groups = 2 }) end,
        "conv2d: input has 4 channels, weight expects 2 (groups=2)")
    err(function() F.conv2d(keel.zeros({ 1, 3, 2, 2 }), w) end,
        "conv2d: kernel (3, 3) (dilated: (3, 3)) is larger than the padded input (2, 2)")
    err(function() F.conv2d(keel.zeros({ 1, 3, 4, 4 }), w, nil, { dilation = 2 }) end,
        "conv2d: kernel (3, 3) (dilated: (5, 5)) is larger than the padded input (4, 4)")
    err(function() F.conv2d(x, w, keel.zeros({ 3 })) end, "conv2d: bias of shape [3], expected [4] (out_channels)")
    err(function() F.conv2d(x, keel.zeros({ 4, 3, 0, 3 })) end, "conv2d: weight of shape [4,3,0,3] has an empty kernel")
  end)

  it("conv2d: options", function()
    err(function() F.conv2d(x, w, nil, { stride = 0 }) end, "conv2d: stride must be positive, got (0, 0)")
    err(function() F.conv2d(x, w, nil, { stride = { 1, -1 } }) end, "conv2d: stride must be positive, got (1, -1)")
    err(function() F.conv2d(x, w, nil, { dilation = 0 }) end, "conv2d: dilation must be positive, got (0, 0)")
    err(function() F.conv2d(x, w, nil, { padding = -1 }) end, "conv2d: padding must be non-negative, got (-1, -1)")
    err(function() F.conv2d(x, w, nil, { groups = 0 }) end, "conv2d: groups must be positive, got 0")
    err(function() F.conv2d(x, w, nil, { padding = "same", stride = 2 }) end,
        "conv2d: padding \"same\" needs stride 1, got (2, 2)")
    err(function() F.conv2d(x, w, nil, { padding = "full" }) end,
        "conv2d: padding must be an integer, a pair {h, w}, \"same\" or \"valid\", got \"full\"")
    err(function() F.conv2d(x, w, nil, { stride = { 1, 2, 3 } }) end,
        "conv2d: stride must be an integer or a pair {h, w}, got a table without 2 entries")
    err(function() F.conv2d(x, w, nil, { stride = 1.5 }) end, "conv2d: stride must be an integer, got 1.5")
    err(function() F.conv2d(x, w, nil, { strides = 2 }) end,
        "conv2d: unknown option strides (expected one of: stride, padding, dilation, groups)")
    err(function() F.conv2d(x, w, nil, 2) end, "conv2d: options must be a table, got number")
    err(function() F.conv2d(x, "w") end, "conv2d: argument #2: expected a keel.Tensor, got string")
  end)

  it("conv2d: dtypes", function()
    err(function() F.conv2d(x, keel.zeros({ 4, 3, 3, 3 }, { dtype = "float64" })) end,
        "conv2d: input is float32 but weight is float64, expected the same dtype")
    err(function() F.conv2d(x, w, keel.zeros({ 4 }, { dtype = "float64" })) end,
        "conv2d: input is float32 but bias is float64, expected the same dtype")
    err(function() F.conv2d(keel.zeros({ 1, 3, 5, 5 }, { dtype = "int64" }), w) end,
        "conv2d: expected a float32 or float64 tensor, got int64")
  end)

  it("pools", function()
    err(function() F.max_pool2d(keel.zeros({ 5, 5 }), 2) end,
        "max_pool2d: input of shape [5,5], expected a 3-D [C, H, W] or 4-D [N, C, H, W] tensor")
    err(function() F.max_pool2d(x, 0) end, "max_pool2d: kernel size must be positive, got (0, 0)")
    err(function() F.max_pool2d(x, 2, { stride = 0 }) end, "max_pool2d: stride must be positive, got (0, 0)")
    err(function() F.max_pool2d(x, 2, { dilation = { 1, 0 } }) end, "max_pool2d: dilation must be positive, got (1, 0)")
    err(function() F.max_pool2d(x, 3, { padding = 2 }) end,
        "max_pool2d: padding (2, 2) must be at most half of the kernel size (3, 3)")
    err(function() F.max_pool2d(keel.zeros({ 1, 1, 2, 2 }), 3) end, "max_pool2d: output size (0, 0) is too small")
    err(function() F.max_pool2d(x, 2, { padding = -1 }) end, "max_pool2d: padding must be non-negative, got (-1, -1)")
    err(function() F.max_pool2d(x, 2, { indices = true }) end, "max_pool2d: unknown option indices")
    err(function() F.max_pool2d(keel.zeros({ 1, 1, 4, 4 }, { dtype = "int64" }), 2) end,
        "max_pool2d: expected a float32 or float64 tensor, got int64")
    err(function() F.max_pool2d(x) end, "max_pool2d: kernel size must be an integer or a pair {h, w}, got no value")
    err(function() F.avg_pool2d(x, 3, { padding = 2 }) end,
        "avg_pool2d: padding (2, 2) must be at most half of the kernel size (3, 3)")
    err(function() F.avg_pool2d(x, 2, { divisor_override = 0 }) end, "avg_pool2d: divisor_override must not be zero")
    err(function() F.avg_pool2d(x, 2, { divisor_override = -2 }) end,
        "avg_pool2d: divisor_override must be positive (or 0 for none), got -2")
    err(function() F.avg_pool2d(x, 2, { dilation = 2 }) end, "avg_pool2d: unknown option dilation")
    err(function() F.avg_pool2d(keel.zeros({ 1, 1, 1, 1 }), 2) end, "avg_pool2d: output size (0, 0) is too small")
    err(function() F.adaptive_avg_pool2d(x, { 0, 2 }) end,
        "adaptive_avg_pool2d: output size must be positive, got (0, 2)")
    err(function() F.adaptive_avg_pool2d(x, { 1, 2, 3 }) end, "adaptive_avg_pool2d: output size must be a pair {h, w}")
    err(function() F.adaptive_avg_pool2d(x, "big") end,
        "adaptive_avg_pool2d: output size must be an integer or a pair {h, w}, got string")
    err(function() F.adaptive_avg_pool2d(keel.zeros({ 1, 0, 4 }), 2) end,
        "adaptive_avg_pool2d: input has an empty spatial size (0, 4)")
  end)
end)

-- PyTorch's extra_repr with keel's spelling: pairs as {h, w}, lower-case booleans.
local function keel_repr(s)
  return (s:gsub("%((%d+), (%d+)%)", "{%1, %2}"):gsub("False", "false"):gsub("True", "true"))
end

describe("nn.Conv2d", function()
  it("has PyTorch's shapes and default init bounds", function()
    keel.manual_seed(3)
    local m = nn.Conv2d(4, 64, 3)
    H.assert_shape(m.weight, { 64, 4, 3, 3 })
    H.assert_shape(m.bias, { 64 })
    assert.is_true(nn.is_parameter(m.weight) and nn.is_parameter(m.bias))
    -- kaiming_uniform_(a = sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias too
    local bound = 1 / math.sqrt(4 * 9)
    local function check(t, n)
      local v = H.flat(t)
      local maxabs, mean = 0, 0
      for _, e in ipairs(v) do
        assert.is_true(math.abs(e) <= bound, "value " .. e .. " beyond " .. bound)
        maxabs = math.max(maxabs, math.abs(e))
        mean = mean + e / #v
      end
      assert.is_true(maxabs > 0.9 * bound, "values do not fill the range")
      assert.is_true(math.abs(mean) < 0.2 * bound, "mean " .. mean)
      assert.are.equal(n, #v)
    end
    check(m.weight, 64 * 4 * 9)
    check(m.bias, 64)
    -- fan_in counts in_channels / groups
    local g = nn.Conv2d(4, 8, { 3, 5 }, { groups = 2, bias = false })
    H.assert_shape(g.weight, { 8, 2, 3, 5 })
    assert.is_nil(g.bias)
    local gb = 1 / math.sqrt(2 * 15)
    for _, e in ipairs(H.flat(g.weight)) do assert.is_true(math.abs(e) <= gb) end
  end)

  it("forward equals the functional form", function()
    local m = nn.Conv2d(3, 5, { 3, 2 }, { stride = { 2, 1 }, padding = 1, dilation = { 1, 2 } })
    local x = keel.randn({ 2, 3, 9, 8 })
    local y = m(x)
    H.assert_shape(y, { 2, 5, 5, 8 })
    H.assert_close(y, F.conv2d(x, m.weight, m.bias, { stride = { 2, 1 }, padding = 1, dilation = { 1, 2 } }):totable())
    local same = nn.Conv2d(3, 2, 4, { padding = "same" })
    H.assert_shape(same(x), { 2, 2, 9, 8 })
    local valid = nn.Conv2d(3, 2, 4, { padding = "valid" })
    H.assert_shape(valid(x), { 2, 2, 6, 5 })
    local d = nn.Conv2d(3, 2, 3, { dtype = "float64" })
    assert.are.equal("float64", d.weight.dtype)
    assert.are.equal("float64", d.bias.dtype)
  end)

  it("names its parameters and has PyTorch's repr", function()
    local m = nn.Conv2d(1, 32, 3)
    local names = {}
    for name in m:named_parameters() do names[#names + 1] = name end
    assert.are.same({ "weight", "bias" }, names)
    assert.are.equal(keel_repr(REF.repr.conv_default), m:extra_repr())
    assert.are.equal("Conv2d(" .. keel_repr(REF.repr.conv_default) .. ")", tostring(m))
    local full = nn.Conv2d(4, 8, { 3, 5 }, { stride = 2, padding = { 1, 2 }, dilation = 2, groups = 2, bias = false })
    assert.are.equal(keel_repr(REF.repr.conv_full), full:extra_repr())
    assert.are.equal(keel_repr(REF.repr.conv_same), nn.Conv2d(3, 3, 3, { padding = "same" }):extra_repr())
  end)

  it("rejects bad arguments", function()
    err(function() nn.Conv2d(3, 4, 3, { groups = 2 }) end, "Conv2d: in_channels (3) must be divisible by groups (2)")
    err(function() nn.Conv2d(4, 3, 3, { groups = 2 }) end, "Conv2d: out_channels (3) must be divisible by groups (2)")
    err(function() nn.Conv2d(3, 4, 0) end, "Conv2d: kernel_size must be positive, got {0, 0}")
    err(function() nn.Conv2d(3, 4, "3") end, "Conv2d: kernel_size: expected an integer or a pair {h, w} of integers")
    err(function() nn.Conv2d(3, 4, 3, { padding_mode = "reflect" }) end,
        "Conv2d: padding_mode reflect is not supported, expected \"zeros\"")
    err(function() nn.Conv2d(3, 4, 3, { padding = "same", stride = 2 }) end,
        "Conv2d: padding \"same\" needs stride 1, got {2, 2}")
    err(function() nn.Conv2d(3, 4, 3, { kernel = 2 }) end, "Conv2d: unknown option kernel")
    err(function() nn.Conv2d(0, 4, 3) end, "Conv2d: in_channels: expected an integer >= 1, got 0")
  end)
end)

describe("nn pools", function()
  it("MaxPool2d", function()
    local m = nn.MaxPool2d(2)
    assert.are.equal(keel_repr(REF.repr.maxpool), m:extra_repr())
    local full = nn.MaxPool2d({ 3, 2 }, { stride = 1, padding = 1, dilation = { 1, 2 }, ceil_mode = true })
    assert.are.equal(keel_repr(REF.repr.maxpool_full), full:extra_repr())
    local x = keel.randn({ 2, 3, 6, 6 })
    H.assert_close(m(x), F.max_pool2d(x, 2):totable())
    local y, idx = nn.MaxPool2d(2, { return_indices = true })(x)
    H.assert_shape(y, { 2, 3, 3, 3 })
    H.assert_shape(idx, { 2, 3, 3, 3 })
    assert.are.equal(0, #m:parameters())
    err(function() nn.MaxPool2d(0) end, "MaxPool2d: kernel_size must be positive, got {0, 0}")
    err(function() nn.MaxPool2d(2, { strides = 1 }) end, "MaxPool2d: unknown option strides")
  end)

  it("AvgPool2d", function()
    local m = nn.AvgPool2d(3, { stride = 2, padding = 1 })
    assert.are.equal(keel_repr(REF.repr.avgpool), m:extra_repr())
    local x = keel.randn({ 1, 2, 7, 7 })
    H.assert_close(m(x), F.avg_pool2d(x, 3, { stride = 2, padding = 1 }):totable())
    local e = nn.AvgPool2d(3, { stride = 2, padding = 1, count_include_pad = false, divisor_override = 2 })
    H.assert_close(e(x), F.avg_pool2d(x, 3, { stride = 2, padding = 1, divisor_override = 2 }):totable())
    err(function() nn.AvgPool2d(2, { divisor_override = 0 }) end, "AvgPool2d: divisor_override: expected an integer >= 1")
  end)

  it("AdaptiveAvgPool2d", function()
    assert.are.equal(keel_repr(REF.repr.adaptive), nn.AdaptiveAvgPool2d({ 5, 7 }):extra_repr())
    assert.are.equal(keel_repr(REF.repr.adaptive_int), nn.AdaptiveAvgPool2d(1):extra_repr())
    local x = keel.randn({ 2, 3, 7, 6 })
    H.assert_shape(nn.AdaptiveAvgPool2d(1)(x), { 2, 3, 1, 1 })
    H.assert_shape(nn.AdaptiveAvgPool2d({ false, 2 })(x), { 2, 3, 7, 2 })
    assert.are.equal("output_size={nil, 2}", nn.AdaptiveAvgPool2d({ false, 2 }):extra_repr())
    err(function() nn.AdaptiveAvgPool2d(0) end, "AdaptiveAvgPool2d: output_size: expected a positive integer")
  end)

  it("a small CNN in Sequential trains", function()
    keel.manual_seed(7)
    local Relu = nn.Module:extend("Relu")
    function Relu:forward(x) return x:relu() end
    local function net()
      return nn.Sequential {
        nn.Conv2d(1, 4, 3), Relu(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, { padding = 1 }), Relu(), nn.AdaptiveAvgPool2d(1),
      }
    end
    local model, teacher = net(), net()
    assert.is_truthy(tostring(model):find("(1): Conv2d(1, 4, kernel_size={3, 3}, stride={1, 1})", 1, true))
    assert.is_truthy(tostring(model):find("(3): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=false)", 1, true))
    local sd = model:state_dict()
    local keys = {}
    for k in pairs(sd) do keys[#keys + 1] = k end
    assert.are.same({ "1.weight", "1.bias", "4.weight", "4.bias" }, keys)
    local x = keel.randn({ 8, 1, 10, 10 })
    local target = keel.no_grad(function() return teacher(x) end)
    local first, last
    for i = 1, 30 do
      local d = model(x) - target
      local loss = (d * d):mean()
      if i == 1 then first = loss:item() end
      last = loss:item()
      model:zero_grad()
      loss:backward()
      keel.no_grad(function()
        for _, p in ipairs(model:parameters()) do p:sub_(p.grad * 0.2) end
      end)
    end
    assert.is_true(last < 0.5 * first, ("loss went from %g to %g"):format(first, last))
    model:double()
    H.assert_shape(model(keel.randn({ 2, 1, 10, 10 }, { dtype = "float64" })), { 2, 6, 1, 1 })
  end)
end)
