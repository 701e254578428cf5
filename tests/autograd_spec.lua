-- autograd_spec.lua: a float64 central-difference gradient check for every
-- op of the engine's op table (keel.ops()), plus the autograd API:
-- requires_grad, leaves, accumulation, explicit gradients, retain_graph,
-- no_grad, detach, hooks, retain_grad and in-place modification checks.
local H = require "helper"
local keel = H.keel
local close = H.assert_close
local gc = H.gradcheck
local T = H.t64

local function f64(d, rg)
  return keel.tensor(d, { dtype = "float64", requires_grad = rg == nil and true or rg })
end
local function i64(d) return keel.tensor(d, { dtype = "int64" }) end

--
-- One entry per op name of keel.ops(); each entry is a list of cases
-- {name, fn, inputs-builder, opts}. The spec fails if keel.ops() names an op
-- that is missing here, so a new op cannot skip its gradient check.
--
local CASES = {
  add = {
    { "a + b", function(a, b) return a + b end, function() return { T({ 2, 3 }, -1, 1, 1), T({ 2, 3 }, -1, 1, 2) } end },
    { "a + scalar, scalar + a", function(a) return (a + 2) * (3 + a) end, function() return { T({ 4 }, -1, 1, 3) } end },
    { "keel.add broadcast [3,1]+[4]", function(a, b) return keel.add(a, b) end, function() return { T({ 3, 1 }, -1, 1, 4), T({ 4 }, -1, 1, 5) } end },
    { "same tensor twice", function(a) return a + a end, function() return { T({ 3 }, -1, 1, 6) } end },
  },
  sub = {
    { "a - b", function(a, b) return a - b end, function() return { T({ 2, 3 }, -1, 1, 7), T({ 2, 3 }, -1, 1, 8) } end },
    { "scalar - a, a - scalar", function(a) return (1 - a) * (a - 0.5) end, function() return { T({ 5 }, -1, 1, 9) } end },
    { "broadcast [2,1,3] - [4,1]", function(a, b) return a:sub(b) end, function() return { T({ 2, 1, 3 }, -1, 1, 10), T({ 4, 1 }, -1, 1, 11) } end },
  },
  mul = {
    { "a * b", function(a, b) return a * b end, function() return { T({ 2, 3 }, -1, 1, 12), T({ 2, 3 }, -1, 1, 13) } end },
    { "a * scalar", function(a) return 2.5 * a * -3 end, function() return { T({ 4 }, -1, 1, 14) } end },
    { "broadcast [2,1,3] * [5,1]", function(a, b) return a * b end, function() return { T({ 2, 1, 3 }, -1, 1, 15), T({ 5, 1 }, -1, 1, 16) } end },
    { "a * a", function(a) return a * a end, function() return { T({ 3 }, -1, 1, 17) } end },
  },
  div = {
    { "a / b", function(a, b) return a / b end, function() return { T({ 2, 3 }, -1, 1, 18), T({ 2, 3 }, 0.5, 2, 19) } end },
    { "scalar / a, a / scalar", function(a) return (2 / a) + a / 4 end, function() return { T({ 4 }, 0.5, 2, 20) } end },
    { "broadcast [3] / [2,1]", function(a, b) return a:div(b) end, function() return { T({ 3 }, -1, 1, 21), T({ 2, 1 }, 0.5, 2, 22) } end },
  },
  pow = {
    { "a ^ b", function(a, b) return a ^ b end, function() return { T({ 2, 3 }, 0.5, 2, 23), T({ 2, 3 }, -1.5, 1.5, 24) } end },
    { "a ^ 3, a ^ 0.5, a ^ -1", function(a) return a ^ 3 + a ^ 0.5 + a ^ -1 end, function() return { T({ 4 }, 0.5, 2, 25) } end },
    { "2 ^ a", function(a) return 2 ^ a end, function() return { T({ 4 }, -1, 1, 26) } end },
    { "pow broadcast", function(a, b) return a:pow(b) end, function() return { T({ 2, 1 }, 0.5, 2, 27), T({ 3 }, -1, 1, 28) } end },
  },
  maximum = {
    { "maximum(a, b)", function(a, b) return keel.maximum(a, b) end,
      function() return { f64({ { 1, -2, 3 }, { 0.5, 4, -1 } }), f64({ { 0, 1, 2.5 }, { 2, 3, -3 } }) } end },
    { "maximum broadcast", function(a, b) return a:maximum(b) end,
      function() return { f64({ { -1 }, { 0.3 } }), f64({ -0.5, 0.1, 0.7 }) } end },
  },
  minimum = {
    { "minimum(a, b)", function(a, b) return keel.minimum(a, b) end,
      function() return { f64({ { 1, -2, 3 }, { 0.5, 4, -1 } }), f64({ { 0, 1, 2.5 }, { 2, 3, -3 } }) } end },
    { "minimum broadcast", function(a, b) return a:minimum(b) end,
      function() return { f64({ { -1 }, { 0.3 } }), f64({ -0.5, 0.1, 0.7 }) } end },
  },
  neg = {
    { "-a", function(a) return -a end, function() return { T({ 2, 3 }, -1, 1, 29) } end },
    { "a:neg()", function(a) return a:neg() * a end, function() return { T({ 3 }, -1, 1, 30) } end },
  },
  exp = { { "exp", function(a) return a:exp() end, function() return { T({ 2, 3 }, -2, 2, 31) } end } },
  log = { { "log", function(a) return keel.log(a) end, function() return { T({ 2, 3 }, 0.2, 3, 32) } end } },
  sqrt = { { "sqrt", function(a) return a:sqrt() end, function() return { T({ 2, 3 }, 0.2, 3, 33) } end } },
  abs = { { "abs", function(a) return a:abs() end, function() return { T({ 2, 4 }, -2, 2, 34, { away = 0.1 }) } end } },
  relu = { { "relu", function(a) return a:relu() end, function() return { T({ 2, 4 }, -2, 2, 35, { away = 0.1 }) } end } },
  sigmoid = { { "sigmoid", function(a) return a:sigmoid() end, function() return { T({ 2, 3 }, -3, 3, 36) } end } },
  tanh = { { "tanh", function(a) return a:tanh() end, function() return { T({ 2, 3 }, -2, 2, 37) } end } },
  clamp = {
    { "clamp(lo, hi)", function(a) return a:clamp(-0.5, 0.5) end,
      function() return { f64({ -1, -0.3, 0.1, 0.45, 0.8, -0.6 }) } end },
    { "clamp(nil, hi)", function(a) return a:clamp(nil, 0.2) end, function() return { f64({ -1, 0.1, 0.7 }) } end },
    { "clamp(lo, nil)", function(a) return keel.clamp(a, 0.2, nil) end, function() return { f64({ -1, 0.1, 0.7 }) } end },
  },
  where = {
    { "where(cond, a, b)", function(a, b)
        return keel.where(keel.tensor({ { 1, 0, 1 }, { 0, 0, 1 } }), a, b)
      end, function() return { T({ 2, 3 }, -1, 1, 38), T({ 2, 3 }, -1, 1, 39) } end },
    { "where broadcast", function(a, b)
        return keel.where(keel.tensor({ 1, 0, 1 }), a, b)
      end, function() return { T({ 2, 3 }, -1, 1, 40), T({ 2, 1 }, -1, 1, 41) } end },
    { "where(a > 0, a, a*b)", function(a, b) return keel.where(a:gt(0), a, a * b) end,
      function() return { T({ 5 }, -1, 1, 42, { away = 0.05 }), T({ 5 }, -1, 1, 43) } end },
  },
  cast = {
    -- through float32: values are rounded, so a coarse step and tolerance
    { "float():double()", function(a) return a:float():double() * a end,
      function() return { T({ 4 }, -1, 1, 44) } end, { eps = 1e-3, atol = 1e-3, rtol = 1e-3 } },
    { "to(float32):to(float64)", function(a) return a:to("float32"):to("float64") end,
      function() return { T({ 2, 2 }, -1, 1, 45) } end, { eps = 1e-3, atol = 1e-3, rtol = 1e-3 } },
    { "float32 + float64 promotion", function(a, b) return a:float() + b end,
      function() return { T({ 3 }, -1, 1, 46), T({ 3 }, -1, 1, 47) } end, { eps = 1e-3, atol = 1e-3, rtol = 1e-3 } },
  },
  view = {
    { "view", function(a) return a:view({ 3, 2 }) * keel.tensor({ { 1, 2 }, { 3, 4 }, { 5, 6 } }, { dtype = "float64" }) end,
      function() return { T({ 2, 3 }, -1, 1, 48) } end },
    { "view -1", function(a) return a:view(-1) end, function() return { T({ 2, 3 }, -1, 1, 49) } end },
    { "reshape (contiguous)", function(a) return a:reshape({ 6, 1 }) end, function() return { T({ 3, 2 }, -1, 1, 50) } end },
    { "reshape (copying)", function(a) return a:t():reshape({ 6 }) end, function() return { T({ 3, 2 }, -1, 1, 51) } end },
    { "squeeze / unsqueeze", function(a) return a:squeeze():unsqueeze(1):unsqueeze(-1) end,
      function() return { T({ 1, 3, 1 }, -1, 1, 52) } end },
    { "squeeze(dim)", function(a) return a:squeeze(2) end, function() return { T({ 2, 1, 3 }, -1, 1, 53) } end },
    { "flatten", function(a) return a:flatten(2) end, function() return { T({ 2, 2, 3 }, -1, 1, 54) } end },
  },
  permute = {
    { "transpose", function(a) return a:transpose(1, 2) end, function() return { T({ 2, 3 }, -1, 1, 55) } end },
    { "t", function(a) return a:t() end, function() return { T({ 3, 2 }, -1, 1, 56) } end },
    { "permute", function(a) return a:permute(3, 1, 2) end, function() return { T({ 2, 3, 2 }, -1, 1, 57) } end },
    { "transpose of transpose", function(a) return a:transpose(1, 3):transpose(2, 3) end,
      function() return { T({ 2, 3, 2 }, -1, 1, 58) } end },
  },
  narrow = {
    { "narrow dim 2", function(a) return a:narrow(2, 2, 2) end, function() return { T({ 3, 4 }, -1, 1, 59) } end },
    { "narrow dim 1", function(a) return a:narrow(1, 2, 1) end, function() return { T({ 3, 2 }, -1, 1, 60) } end },
    { "overlapping narrows", function(a) return a:narrow(1, 1, 3) * a:narrow(1, 2, 3) end,
      function() return { T({ 4 }, -1, 1, 61) } end },
  },
  select = {
    { "select", function(a) return a:select(2, 3) end, function() return { T({ 2, 4 }, -1, 1, 62) } end },
    { "t[i] row", function(a) return a[2] end, function() return { T({ 3, 2 }, -1, 1, 63) } end },
    { "select negative", function(a) return a:select(-1, 1) * a:select(-1, 2) end,
      function() return { T({ 3, 2 }, -1, 1, 64) } end },
  },
  expand = {
    { "expand", function(a) return a:expand({ 3, 4 }) end, function() return { T({ 3, 1 }, -1, 1, 65) } end },
    { "expand new dims", function(a) return a:expand({ 2, 2, 3 }) end, function() return { T({ 3 }, -1, 1, 66) } end },
    { "expand_as", function(a, b) return a:expand_as(b) * b end,
      function() return { T({ 1, 3 }, -1, 1, 67), T({ 2, 3 }, -1, 1, 68) } end },
  },
  copy = {
    { "contiguous of a transpose", function(a) return a:t():contiguous() end,
      function() return { T({ 2, 3 }, -1, 1, 69) } end },
    { "clone", function(a) return a:clone() * a end, function() return { T({ 4 }, -1, 1, 70) } end },
    { "contiguous of an expand", function(a) return a:expand({ 2, 3 }):contiguous() end,
      function() return { T({ 3 }, -1, 1, 71) } end },
  },
  sum = {
    { "sum()", function(a) return a:sum() end, function() return { T({ 2, 3 }, -1, 1, 72) } end },
    { "sum(dim)", function(a) return a:sum(2) end, function() return { T({ 2, 3 }, -1, 1, 73) } end },
    { "sum(dims, keepdim)", function(a) return a:sum({ 1, 3 }, true) end, function() return { T({ 2, 3, 2 }, -1, 1, 74) } end },
    { "sum(-1)", function(a) return a:sum(-1) end, function() return { T({ 2, 3 }, -1, 1, 75) } end },
    { "mean()", function(a) return a:mean() end, function() return { T({ 2, 3 }, -1, 1, 76) } end },
    { "mean(dim, keepdim)", function(a) return a:mean(1, true) end, function() return { T({ 3, 2 }, -1, 1, 77) } end },
  },
  prod = {
    { "prod()", function(a) return a:prod() end, function() return { T({ 2, 3 }, 0.5, 1.5, 78) } end },
    { "prod(dim)", function(a) return a:prod(2) end, function() return { T({ 3, 3 }, -1.5, 1.5, 79, { away = 0.2 }) } end },
    { "prod(dim, keepdim)", function(a) return a:prod(1, true) end, function() return { T({ 2, 3 }, -1.5, 1.5, 80, { away = 0.2 }) } end },
  },
  amax = {
    { "max()", function(a) return a:max() end, function() return { T({ 2, 3 }, -1, 1, 81) } end },
    { "min()", function(a) return a:min() end, function() return { T({ 2, 3 }, -1, 1, 82) } end },
    { "amax(dim)", function(a) return a:amax(2) end, function() return { T({ 3, 4 }, -1, 1, 83) } end },
    { "amin(dims)", function(a) return a:amin({ 1, 3 }) end, function() return { T({ 2, 3, 2 }, -1, 1, 84) } end },
  },
  max_dim = {
    { "max(dim) values", function(a) local v = a:max(2) return v end, function() return { T({ 3, 4 }, -1, 1, 85) } end },
    { "min(dim, keepdim) values", function(a) local v = a:min(1, true) return v end,
      function() return { T({ 3, 4 }, -1, 1, 86) } end },
    { "max(-1) of 3-D", function(a) local v = a:max(-1) return v end, function() return { T({ 2, 2, 3 }, -1, 1, 87) } end },
  },
  norm = {
    { "norm() p=2", function(a) return a:norm() end, function() return { T({ 2, 3 }, -1, 1, 88) } end },
    { "norm(1)", function(a) return a:norm(1) end, function() return { T({ 2, 3 }, -1, 1, 89, { away = 0.1 }) } end },
    { "norm(inf)", function(a) return a:norm(math.huge) end, function() return { T({ 2, 3 }, -1, 1, 90) } end },
    { "norm(3)", function(a) return a:norm(3) end, function() return { T({ 2, 3 }, -1, 1, 91, { away = 0.1 }) } end },
    { "norm(2, dim, keepdim)", function(a) return a:norm(2, 2, true) end, function() return { T({ 3, 3 }, -1, 1, 92) } end },
    { "norm(1, dims)", function(a) return a:norm(1, { 1, 3 }) end, function() return { T({ 2, 2, 2 }, -1, 1, 93, { away = 0.1 }) } end },
    { "norm(inf, dim)", function(a) return a:norm(math.huge, 1) end, function() return { T({ 3, 2 }, -1, 1, 94) } end },
  },
  matmul = {
    { "1-D . 1-D", function(a, b) return a:matmul(b) end, function() return { T({ 3 }, -1, 1, 95), T({ 3 }, -1, 1, 96) } end },
    { "2-D . 1-D", function(a, b) return a:matmul(b) end, function() return { T({ 2, 3 }, -1, 1, 97), T({ 3 }, -1, 1, 98) } end },
    { "1-D . 2-D", function(a, b) return a:matmul(b) end, function() return { T({ 3 }, -1, 1, 99), T({ 3, 2 }, -1, 1, 100) } end },
    { "2-D . 2-D", function(a, b) return keel.matmul(a, b) end, function() return { T({ 2, 3 }, -1, 1, 101), T({ 3, 4 }, -1, 1, 102) } end },
    { "3-D . 3-D", function(a, b) return a:matmul(b) end, function() return { T({ 2, 2, 3 }, -1, 1, 103), T({ 2, 3, 2 }, -1, 1, 104) } end },
    { "3-D . 2-D broadcast", function(a, b) return a:matmul(b) end, function() return { T({ 2, 2, 3 }, -1, 1, 105), T({ 3, 2 }, -1, 1, 106) } end },
    { "2-D . 3-D broadcast", function(a, b) return a:matmul(b) end, function() return { T({ 2, 3 }, -1, 1, 107), T({ 2, 3, 2 }, -1, 1, 108) } end },
    { "4-D . 3-D broadcast", function(a, b) return a:matmul(b) end, function() return { T({ 2, 1, 2, 3 }, -1, 1, 109), T({ 2, 3, 2 }, -1, 1, 110) } end },
    { "1-D . 3-D", function(a, b) return a:matmul(b) end, function() return { T({ 3 }, -1, 1, 111), T({ 2, 3, 2 }, -1, 1, 112) } end },
    { "transposed operands", function(a, b) return a:t():matmul(b:t()) end, function() return { T({ 3, 2 }, -1, 1, 113), T({ 4, 3 }, -1, 1, 114) } end },
    { "a . a^T", function(a) return a:matmul(a:t()) end, function() return { T({ 2, 3 }, -1, 1, 115) } end },
  },
  cat = {
    { "cat dim 1", function(a, b) return keel.cat({ a, b }, 1) end, function() return { T({ 2, 3 }, -1, 1, 116), T({ 1, 3 }, -1, 1, 117) } end },
    { "cat dim -1 three inputs", function(a, b, c) return keel.cat({ a, b, c }, -1) end,
      function() return { T({ 2, 1 }, -1, 1, 118), T({ 2, 2 }, -1, 1, 119), T({ 2, 3 }, -1, 1, 120) } end },
    { "cat same tensor twice", function(a) return keel.cat({ a, a * 2 }, 1) end, function() return { T({ 3 }, -1, 1, 121) } end },
    { "stack", function(a, b) return keel.stack({ a, b }, 2) end, function() return { T({ 2, 3 }, -1, 1, 122), T({ 2, 3 }, -1, 1, 123) } end },
  },
  gather = {
    { "gather dim 2", function(a) return a:gather(2, i64({ { 3, 1, 3 }, { 2, 2, 1 } })) end,
      function() return { T({ 2, 3 }, -1, 1, 124) } end },
    { "gather dim 1", function(a) return a:gather(1, i64({ { 2, 1 }, { 2, 2 }, { 1, 1 } })) end,
      function() return { T({ 2, 2 }, -1, 1, 125) } end },
  },
  scatter_add = {
    { "scatter_add dim 1 (base and src)", function(a, s)
        return a:scatter_add(1, i64({ { 1, 2, 1 }, { 2, 1, 1 } }), s)
      end, function() return { T({ 2, 3 }, -1, 1, 126), T({ 2, 3 }, -1, 1, 127) } end },
    { "scatter_add dim 2 repeated", function(a, s)
        return keel.scatter_add(a, 2, i64({ { 3, 3 }, { 1, 2 } }), s)
      end, function() return { T({ 2, 3 }, -1, 1, 128), T({ 2, 2 }, -1, 1, 129) } end },
  },
  index_select = {
    { "index_select dim 1 repeated", function(a) return a:index_select(1, i64({ 3, 1, 3 })) end,
      function() return { T({ 3, 2 }, -1, 1, 130) } end },
    { "index_select dim 2", function(a) return a:index_select(2, i64({ 2, 1 })) end,
      function() return { T({ 2, 3 }, -1, 1, 131) } end },
  },
}

-- Areas beyond the core keep their cases in tests/cases/<area>.lua: a file
-- that returns a table of the same shape, given the helpers used here.
do
  local ls = io.popen("ls tests/cases/*.lua 2>/dev/null")
  for path in ls:lines() do
    local chunk = assert(loadfile(path))
    for op, list in pairs(chunk({ T = T, i64 = i64, H = H, keel = keel })) do
      assert(CASES[op] == nil, path .. " redefines the cases of " .. op)
      CASES[op] = list
    end
  end
  ls:close()
end

local names = {}
for name in pairs(CASES) do names[#names + 1] = name end
table.sort(names)

describe("keel.ops()", function()
  it("lists names, and every name has gradcheck cases", function()
    local ops = keel.ops()
    assert.are.equal("table", type(ops))
    assert.is_true(#ops > 0)
    local missing = {}
    for _, name in ipairs(ops) do
      assert.are.equal("string", type(name))
      if not CASES[name] then missing[#missing + 1] = name end
    end
    assert.are.same({}, missing, "ops without a gradcheck: " .. table.concat(missing, ", "))
  end)

  it("contains at least the ops this spec knows", function()
    local have = {}
    for _, name in ipairs(keel.ops()) do have[name] = true end
    for _, name in ipairs(names) do
      assert.is_true(have[name] == true, "keel.ops() lacks " .. name)
    end
  end)
end)

describe("gradcheck", function()
  for _, opname in ipairs(names) do
    describe(opname, function()
      for _, case in ipairs(CASES[opname]) do
        local label, fn, build, opts = case[1], case[2], case[3], case[4] or {}
        it(label, function()
          local o = {}
          for k, v in pairs(opts) do o[k] = v end
          o.name = opname .. " / " .. label
          assert.is_true(gc(fn, build(), o))
        end)
      end
    end)
  end
end)

describe("gradcheck of composites", function()
  it("mean / var / std", function()
    gc(function(a) return a:mean(2) end, { T({ 3, 4 }, -1, 1, 201) })
    gc(function(a) return a:var() end, { T({ 2, 3 }, -1, 1, 202) })
    gc(function(a) return a:var(2, { correction = 0 }) end, { T({ 3, 4 }, -1, 1, 203) })
    gc(function(a) return a:std() end, { T({ 2, 3 }, -1, 1, 204) })
    gc(function(a) return a:std(1, { keepdim = true }) end, { T({ 3, 2 }, -1, 1, 205) })
  end)

  it("views of views", function()
    gc(function(a) return a:t():narrow(1, 2, 2):select(2, 1) end, { T({ 2, 4 }, -1, 1, 206) })
    gc(function(a) return a:permute(2, 3, 1):reshape({ 3, 4 }):narrow(2, 2, 2) end,
       { T({ 2, 3, 2 }, -1, 1, 207) })
    gc(function(a) return a:unsqueeze(1):expand({ 2, 3, 2 }):transpose(1, 3) * 1.5 end,
       { T({ 3, 2 }, -1, 1, 208) })
    gc(function(a) return a:view(2, 3):t():contiguous():view(-1):narrow(1, 2, 4) end,
       { T({ 6 }, -1, 1, 209) })
  end)

  it("0-d inputs", function()
    gc(function(s, a) return s * a + s:exp() end,
       { keel.tensor(0.7, { dtype = "float64", requires_grad = true }), T({ 3 }, -1, 1, 223) })
    gc(function(s) return s:expand({ 2, 3 }) * keel.tensor({ 1, 2, 3 }, { dtype = "float64" }) end,
       { keel.tensor(-0.3, { dtype = "float64", requires_grad = true }) })
  end)

  it("broadcasting chains", function()
    gc(function(a, b, c) return (a * b + c) / (b * b + 1) end,
       { T({ 2, 1, 3 }, -1, 1, 210), T({ 4, 1 }, -1, 1, 211), T({ 3 }, -1, 1, 212) })
    gc(function(a, b) return keel.maximum(a, b):sum(1) end,
       { T({ 3, 1 }, -1, 1, 213), T({ 1, 4 }, -1, 1, 214) })
  end)

  it("an MLP-like expression", function()
    gc(function(x, w1, b1, w2)
      local h = (x:matmul(w1) + b1):tanh()
      local o = h:matmul(w2):sigmoid()
      return (o - 0.5):pow(2):mean()
    end, { T({ 4, 3 }, -1, 1, 215), T({ 3, 5 }, -1, 1, 216), T({ 5 }, -1, 1, 217), T({ 5, 2 }, -1, 1, 218) })
  end)

  it("softmax built from ops", function()
    gc(function(x)
      local m = x:max(2, true)
      local e = (x - m:detach()):exp()
      return e / e:sum(2, true)
    end, { T({ 2, 4 }, -2, 2, 219) })
  end)

  it("log-sum-exp and normalisation", function()
    gc(function(x)
      return (x - x:mean(-1, true)) / (x:var(-1, { keepdim = true, correction = 0 }) + 1e-3):sqrt()
    end, { T({ 2, 5 }, -1, 1, 220) })
    gc(function(x) return x:exp():sum(1):log() end, { T({ 3, 2 }, -1, 1, 221) })
  end)

  it("fan-out: one tensor used by many ops", function()
    gc(function(a)
      return a:sum() * a + a:t():t() * a:exp() - a:narrow(1, 1, 1):expand({ 3, 2 })
    end, { T({ 3, 2 }, -1, 1, 222) })
  end)
end)

describe("autograd API", function()
  it("requires_grad, is_leaf and grad_fn", function()
    local a = f64({ 1, 2, 3 })
    local b = f64({ 4, 5, 6 }, false)
    assert.is_true(a.requires_grad)
    assert.is_true(a.is_leaf)
    assert.is_nil(a.grad_fn)
    local c = a * b
    assert.is_true(c.requires_grad)
    assert.is_false(c.is_leaf)
    assert.are.equal("mul", c.grad_fn)
    assert.are.equal("add", (a + b).grad_fn)
    assert.are.equal("sub", (a - b).grad_fn)
    assert.are.equal("exp", a:exp().grad_fn)
    assert.are.equal("matmul", a:view(1, 3):matmul(b:view(3, 1)).grad_fn)
    assert.are.equal("sum", a:sum().grad_fn)
    local d = b * 2
    assert.is_false(d.requires_grad)
    assert.is_true(d.is_leaf)
    assert.is_nil(d.grad_fn)
  end)

  it("grad_fn names are names from keel.ops()", function()
    local have = {}
    for _, n in ipairs(keel.ops()) do have[n] = true end
    local a = f64({ { 1, 2 }, { 3, 4 } })
    for _, t in ipairs({ a:t(), a:view(4), a:narrow(1, 1, 1), a:select(1, 1), a:sum(1),
                         a:relu(), a:clamp(0, 1), a:max(), a:norm(), a:float(),
                         keel.cat({ a, a }, 1) }) do
      assert.is_true(have[t.grad_fn] == true, tostring(t.grad_fn))
    end
  end)

  it("backward of a scalar fills .grad with hand values", function()
    local x = f64({ 1, 2, 3 })
    local w = f64({ 0.5, -1, 2 })
    local y = (x * w):sum() + (x * x):sum()
    y:backward()
    close(x.grad, { 0.5 + 2, -1 + 4, 2 + 6 })
    close(w.grad, { 1, 2, 3 })
    assert.is_false(x.grad.requires_grad)
  end)

  it("gradients accumulate across backward calls", function()
    local x = f64({ 1, 2 })
    ;(x * 3):sum():backward()
    close(x.grad, { 3, 3 })
    ;(x * x):sum():backward()
    close(x.grad, { 5, 7 })
  end)

  it("t.grad = nil clears, t.grad = tensor sets", function()
    local x = f64({ 1, 2 })
    x:sum():backward()
    close(x.grad, { 1, 1 })
    x.grad = nil
    assert.is_nil(x.grad)
    x:sum():backward()
    close(x.grad, { 1, 1 })
    x.grad = keel.tensor({ 10, 20 }, { dtype = "float64" })
    x:sum():backward()
    close(x.grad, { 11, 21 })
  end)

  it("backward(grad) with an explicit gradient for non-scalar roots", function()
    local x = f64({ { 1, 2 }, { 3, 4 } })
    local y = x * x
    y:backward(keel.tensor({ { 1, 0 }, { 0.5, -1 } }, { dtype = "float64" }))
    close(x.grad, { { 2, 0 }, { 3, -8 } })
  end)

  it("implicit gradient on a non-scalar root is an error", function()
    local x = f64({ 1, 2 })
    local y = x * 2
    H.assert_error(function() y:backward() end, "backward")
    assert.is_nil(x.grad)
  end)

  it("a one-element non-0-d root takes an implicit gradient", function()
    local x = f64({ 2 })
    local y = (x * x):view({ 1, 1 })
    y:backward()
    close(x.grad, { 4 })
  end)

  it("second backward without retain_graph errors, with it works and accumulates", function()
    local x = f64({ 1, 2 })
    local y = (x:exp() * x):sum()
    y:backward(nil, { retain_graph = true })
    local g1 = H.flat(x.grad)
    y:backward()
    local expect = {}
    for i, v in ipairs({ 1, 2 }) do expect[i] = 2 * (math.exp(v) * (v + 1)) end
    close(x.grad, expect, 1e-12)
    assert.are.equal(2 * g1[1], x.grad[1])
    H.assert_error(function() y:backward() end, "retain_graph")
  end)

  it("retain_graph with an explicit gradient", function()
    local x = f64({ 1, 2 })
    local y = x * x
    local g = keel.tensor({ 1, 1 }, { dtype = "float64" })
    y:backward(g, { retain_graph = true })
    y:backward(g, { retain_graph = true })
    close(x.grad, { 4, 8 })
    y:backward(g)
    close(x.grad, { 6, 12 })
    H.assert_error(function() y:backward(g) end, "retain_graph")
  end)

  it("the graph is freed by default", function()
    local x = f64({ 1, 2 })
    local y = (x * x):sum()
    y:backward()
    local err = H.assert_error(function() y:backward() end, "retain_graph")
    assert.is_truthy(err:find("backward", 1, true))
    close(x.grad, { 2, 4 })
  end)

  it("no_grad: results do not require grad; nesting; return values", function()
    local x = f64({ 1, 2 })
    assert.is_true(keel.is_grad_enabled())
    local y, extra = keel.no_grad(function(a, k)
      assert.is_false(keel.is_grad_enabled())
      local inner = keel.no_grad(function() return a * 3 end)
      assert.is_false(keel.is_grad_enabled())
      assert.is_false(inner.requires_grad)
      return a * k, "extra"
    end, x, 2)
    assert.is_true(keel.is_grad_enabled())
    assert.is_false(y.requires_grad)
    assert.is_nil(y.grad_fn)
    assert.are.equal("extra", extra)
    close(y, { 2, 4 })
  end)

  it("no_grad restores the mode after an error inside", function()
    local ok, err = pcall(keel.no_grad, function() error("inner failure") end)
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("inner failure", 1, true))
    assert.is_true(keel.is_grad_enabled())
    local x = f64({ 1 })
    assert.is_true((x * 2).requires_grad)
  end)

  it("no_grad keeps a disabled mode disabled", function()
    local prev = keel.set_grad_enabled(false)
    assert.is_true(prev)
    keel.no_grad(function() end)
    assert.is_false(keel.is_grad_enabled())
    pcall(keel.no_grad, function() error("x") end)
    assert.is_false(keel.is_grad_enabled())
    assert.is_false(keel.set_grad_enabled(true))
    assert.is_true(keel.is_grad_enabled())
  end)

  it("set_grad_enabled(false) stops recording", function()
    local x = f64({ 1, 2 })
    local prev = keel.set_grad_enabled(false)
    local y = x * 2
    keel.set_grad_enabled(prev)
    assert.is_false(y.requires_grad)
    assert.is_true((x * 2).requires_grad)
  end)

  it("detach cuts the graph", function()
    local x = f64({ 1, 2 })
    local y = x * x
    local z = (y:detach() * x):sum()
    z:backward()
    close(x.grad, { 1, 4 })  -- y treated as a constant
  end)

  it("requires_grad on a non-leaf cannot be turned off", function()
    local x = f64({ 1, 2 })
    local y = x * 2
    H.assert_error(function() y.requires_grad = false end, "requires_grad")
  end)

  it("non-leaf tensors have no .grad unless retain_grad", function()
    local x = f64({ 1, 2 })
    local y = x * 3
    local z = y * y
    local w = x * 4
    y:retain_grad()
    ;(z:sum() + w:sum()):backward()
    close(y.grad, { 6, 12 })
    assert.is_nil(w.grad)
    close(x.grad, { 18 * 1 + 4, 18 * 2 + 4 })
  end)
end)

describe("hooks", function()
  it("a hook on a leaf sees the gradient", function()
    local x = f64({ 1, 2, 3 })
    local seen
    x:register_hook(function(g) seen = H.flat(g) end)
    ;(x * x):sum():backward()
    assert.are.same({ 2, 4, 6 }, seen)
    close(x.grad, { 2, 4, 6 })
  end)

  it("a hook returning a tensor replaces the gradient", function()
    local x = f64({ 1, 2, 3 })
    x:register_hook(function(g) return g * 10 end)
    x:sum():backward()
    close(x.grad, { 10, 10, 10 })
  end)

  it("a hook returning nil keeps it", function()
    local x = f64({ 1, 2 })
    local calls = 0
    x:register_hook(function() calls = calls + 1 end)
    ;(x * 5):sum():backward()
    assert.are.equal(1, calls)
    close(x.grad, { 5, 5 })
  end)

  it("a hook on a non-leaf changes what flows to its inputs", function()
    local x = f64({ 1, 2 })
    local y = x * 2
    local seen
    y:register_hook(function(g)
      seen = H.flat(g)
      return g * 0.5
    end)
    ;(y * y):sum():backward()
    assert.are.same({ 4, 8 }, seen)          -- 2*y
    close(x.grad, { 4, 8 })                   -- 0.5 * 2y * 2
    assert.is_nil(y.grad)
  end)

  it("h:remove() removes a hook", function()
    local x = f64({ 1, 2 })
    local calls = 0
    local h = x:register_hook(function(g) calls = calls + 1; return g * 100 end)
    x:sum():backward()
    assert.are.equal(1, calls)
    close(x.grad, { 100, 100 })
    h:remove()
    x.grad = nil
    x:sum():backward()
    assert.are.equal(1, calls)
    close(x.grad, { 1, 1 })
  end)

  it("several hooks run in registration order, each sees the previous result", function()
    local x = f64({ 1 })
    local order = {}
    x:register_hook(function(g) order[#order + 1] = "a"; return g + 1 end)
    x:register_hook(function(g) order[#order + 1] = ("b:%g"):format(g[1]); return g * 2 end)
    x:sum():backward()
    assert.are.same({ "a", "b:2" }, order)
    close(x.grad, { 4 })
  end)

  it("a hook that errors makes backward raise and leaves .grad unchanged", function()
    local x = f64({ 1, 2 })
    local w = f64({ 3, 4 })
    ;(x * w):sum():backward()
    close(x.grad, { 3, 4 })
    close(w.grad, { 1, 2 })
    local h = x:register_hook(function() error("hook exploded") end)
    local y = (x * w):sum()
    H.assert_error(function() y:backward() end, "hook exploded")
    close(x.grad, { 3, 4 })
    close(w.grad, { 1, 2 })
    h:remove()
    ;(x * w):sum():backward()
    close(x.grad, { 6, 8 })
  end)

  it("an erroring hook on a non-leaf leaves every .grad unchanged", function()
    local x = f64({ 1, 2 })
    local y = x * 3
    y:register_hook(function() error("non-leaf hook failed") end)
    H.assert_error(function() (y:sum() + x:sum()):backward() end, "non-leaf hook failed")
    assert.is_nil(x.grad)
  end)

  it("a hook is called once with the total gradient of a tensor used twice", function()
    local x = f64({ 1, 2 })
    local calls, seen = 0, nil
    x:register_hook(function(g) calls = calls + 1; seen = H.flat(g) end)
    ;(x * 2 + x * 3):sum():backward()
    assert.are.equal(1, calls)
    assert.are.same({ 5, 5 }, seen)
    local y = x * 1
    local c2 = 0
    y:register_hook(function(g) c2 = c2 + 1; seen = H.flat(g) end)
    x.grad = nil
    ;(y * 2 + y * 3):sum():backward()
    assert.are.equal(1, c2)
    assert.are.same({ 5, 5 }, seen)
    close(x.grad, { 5, 5 })
  end)

  it("a hook returning another dtype is converted to the tensor's dtype", function()
    local x = f64({ 1, 2 })
    x:register_hook(function(g) return (g * 3):float() end)
    x:sum():backward()
    assert.are.equal("float64", x.grad.dtype)
    close(x.grad, { 3, 3 })
  end)

  it("a hook returning a wrongly shaped tensor is an error", function()
    local x = f64({ 1, 2 })
    x:register_hook(function() return keel.ones({ 3 }, { dtype = "float64" }) end)
    H.assert_error(function() x:sum():backward() end)
    assert.is_nil(x.grad)
  end)
end)

describe("in-place modification of saved tensors", function()
  it("is detected at backward", function()
    local x = f64({ 1, 2, 3 })
    local s = keel.tensor({ 1, 2, 3 }, { dtype = "float64" })
    local y = (x * s):sum()   -- saves s for the gradient of x
    s:mul_(2)
    H.assert_error(function() y:backward() end, "modified")
  end)

  it("is detected through a view of the saved tensor", function()
    local x = f64({ 1, 2, 3 })
    local y = x:exp()
    local z = (y * y):sum()  -- saves y
    keel.no_grad(function() y:narrow(1, 2, 1):fill_(0) end)
    H.assert_error(function() z:backward() end, "modified")
  end)

  it("an untouched graph still works after unrelated in-place ops", function()
    local x = f64({ 1, 2 })
    local c = keel.tensor({ 5, 6 }, { dtype = "float64" })
    local other = c:clone()
    local y = (x * c):sum()
    other:add_(1)
    y:backward()
    close(x.grad, { 5, 6 })
  end)
end)
