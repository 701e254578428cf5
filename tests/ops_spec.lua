-- ops_spec.lua: elementwise math, broadcasting, dtype promotion, in-place
-- ops, matmul in every torch.matmul form, cat/stack/gather/scatter_add/
-- index_select.
local H = require "helper"
local keel = H.keel
local close = H.assert_close

local function f64(d) return keel.tensor(d, { dtype = "float64" }) end
local function i64(d) return keel.tensor(d, { dtype = "int64" }) end

local A = { { 1, 2, 3 }, { 4, 5, 6 } }
local B = { { 0.5, -1, 2 }, { 3, 0.25, -4 } }

local binary = {
  add = function(x, y) return x + y end,
  sub = function(x, y) return x - y end,
  mul = function(x, y) return x * y end,
  div = function(x, y) return x / y end,
  pow = function(x, y) return x ^ y end,
  maximum = function(x, y) return math.max(x, y) end,
  minimum = function(x, y) return math.min(x, y) end,
}
local binary_names = { "add", "sub", "mul", "div", "pow", "maximum", "minimum" }

local function sigmoid(x) return 1 / (1 + math.exp(-x)) end
local function tanh(x)
  local e = math.exp(2 * x)
  return (e - 1) / (e + 1)
end
local function sign(x) if x > 0 then return 1 elseif x < 0 then return -1 else return 0 end end

local unary = {
  neg = function(x) return -x end,
  exp = math.exp,
  log = math.log,
  sqrt = math.sqrt,
  abs = math.abs,
  relu = function(x) return x > 0 and x or 0 end,
  sigmoid = sigmoid,
  tanh = tanh,
  sign = sign,
}
local unary_names = { "neg", "exp", "log", "sqrt", "abs", "relu", "sigmoid", "tanh", "sign" }
local positive_only = { log = true, sqrt = true }

describe("binary elementwise ops", function()
  for _, name in ipairs(binary_names) do
    local fn = binary[name]
    it(name .. " as a method and a keel function (float64)", function()
      local a, b = f64(A), f64(B)
      local expected = H.ref_binary(A, B, fn)
      close(a[name](a, b), expected)
      close(keel[name](a, b), expected)
      assert.are.equal("float64", a[name](a, b).dtype)
    end)

    it(name .. " in float32", function()
      local a, b = keel.tensor(A), keel.tensor(B)
      local r = a[name](a, b)
      assert.are.equal("float32", r.dtype)
      close(r, H.ref_binary(A, B, fn), 1e-5)
    end)

    it(name .. " with a scalar on the right", function()
      local a = f64(A)
      close(a[name](a, 2), H.ref_binary(A, 2, fn))
      close(a[name](a, -0.5), H.ref_binary(A, -0.5, fn))
      close(keel[name](a, 3), H.ref_binary(A, 3, fn))
    end)
  end

  it("operators + - * / ^ and unary minus", function()
    local a, b = f64(A), f64(B)
    close(a + b, H.ref_binary(A, B, binary.add))
    close(a - b, H.ref_binary(A, B, binary.sub))
    close(a * b, H.ref_binary(A, B, binary.mul))
    close(a / b, H.ref_binary(A, B, binary.div))
    close(a ^ b, H.ref_binary(A, B, binary.pow))
    close(-b, H.ref_unary(B, unary.neg))
    close(-(-a), A)
  end)

  it("operators with a scalar on either side", function()
    local a = f64(A)
    close(a + 2, H.ref_binary(A, 2, binary.add))
    close(2 + a, H.ref_binary(2, A, binary.add))
    close(a - 2, H.ref_binary(A, 2, binary.sub))
    close(10 - a, H.ref_binary(10, A, binary.sub))
    close(a * 3, H.ref_binary(A, 3, binary.mul))
    close(3 * a, H.ref_binary(3, A, binary.mul))
    close(a / 4, H.ref_binary(A, 4, binary.div))
    close(12 / a, H.ref_binary(12, A, binary.div))
    close(a ^ 2, H.ref_binary(A, 2, binary.pow))
    close(2 ^ a, H.ref_binary(2, A, binary.pow))
    close(a ^ 0.5, H.ref_binary(A, 0.5, binary.pow))
  end)

  it("division by zero gives inf, 0/0 gives nan", function()
    local r = f64({ 1, -1, 0 }) / f64({ 0, 0, 0 })
    local v = H.flat(r)
    assert.are.equal(math.huge, v[1])
    assert.are.equal(-math.huge, v[2])
    assert.is_true(v[3] ~= v[3])
  end)
end)

describe("unary elementwise ops", function()
  local X = { { -1.5, -0.25, 0 }, { 0.75, 2, 3.5 } }
  local P = { { 0.25, 0.5, 1 }, { 2, 4, 9 } }
  for _, name in ipairs(unary_names) do
    local fn = unary[name]
    local data = positive_only[name] and P or X
    it(name .. " (float64, method and keel function)", function()
      local x = f64(data)
      local expected = H.ref_unary(data, fn)
      close(x[name](x), expected, 1e-12)
      close(keel[name](x), expected, 1e-12)
      assert.are.equal("float64", x[name](x).dtype)
    end)
    it(name .. " (float32)", function()
      local x = keel.tensor(data)
      local r = x[name](x)
      assert.are.equal("float32", r.dtype)
      close(r, H.ref_unary(data, fn), 1e-6)
    end)
  end

  it("log of 0 is -inf, sqrt of -1 is nan", function()
    assert.are.equal(-math.huge, f64({ 0 }):log()[1])
    local v = f64({ -1 }):sqrt()[1]
    assert.is_true(v ~= v)
  end)

  it("sigmoid and tanh saturate without overflow", function()
    close(f64({ -800, 800 }):sigmoid(), { 0, 1 })
    close(f64({ -800, 800 }):tanh(), { -1, 1 })
    close(keel.tensor({ -100, 100 }):sigmoid(), { 0, 1 })
  end)

  it("clamp with both bounds and with either bound nil", function()
    local x = f64({ -3, -1, 0, 1, 3 })
    close(x:clamp(-2, 2), { -2, -1, 0, 1, 2 })
    close(x:clamp(nil, 0.5), { -3, -1, 0, 0.5, 0.5 })
    close(x:clamp(-0.5, nil), { -0.5, -0.5, 0, 1, 3 })
    close(x:clamp(-0.5), { -0.5, -0.5, 0, 1, 3 })
    close(keel.clamp(x, 0, 1), { 0, 0, 0, 1, 1 })
  end)

  it("sign of int64 and abs/neg of int64 stay int64", function()
    local i = i64({ -3, 0, 5 })
    local n = -i
    assert.are.equal("int64", n.dtype)
    assert.are.same({ 3, 0, -5 }, n:totable())
    assert.are.same({ 3, 0, 5 }, i:abs():totable())
    assert.are.same({ -1, 0, 1 }, i:sign():totable())
  end)
end)

describe("comparisons", function()
  local a = { 1, 2, 3, 4 }
  local b = { 4, 2, 1, 4 }
  local cmp = {
    eq = function(x, y) return x == y and 1 or 0 end,
    ne = function(x, y) return x ~= y and 1 or 0 end,
    lt = function(x, y) return x < y and 1 or 0 end,
    le = function(x, y) return x <= y and 1 or 0 end,
    gt = function(x, y) return x > y and 1 or 0 end,
    ge = function(x, y) return x >= y and 1 or 0 end,
  }
  for _, name in ipairs({ "eq", "ne", "lt", "le", "gt", "ge" }) do
    it(name .. " gives 1/0 in the promoted dtype", function()
      local ta, tb = keel.tensor(a), keel.tensor(b)
      local r = ta[name](ta, tb)
      assert.are.equal("float32", r.dtype)
      close(r, H.ref_binary(a, b, cmp[name]))
      close(keel[name](ta, tb), H.ref_binary(a, b, cmp[name]))
      local r64 = ta[name](ta, f64(b))
      assert.are.equal("float64", r64.dtype)
      close(r64, H.ref_binary(a, b, cmp[name]))
      local ri = i64(a)[name](i64(a), i64(b))
      assert.are.equal("int64", ri.dtype)
      assert.are.same(H.ref_binary(a, b, cmp[name]), ri:totable())
      close(ta[name](ta, 2), H.ref_binary(a, 2, cmp[name]))
    end)
  end

  it("comparisons broadcast", function()
    local r = keel.tensor({ { 1 }, { 3 } }):lt(keel.tensor({ 0, 2, 4 }))
    close(r, { { 0, 1, 1 }, { 0, 0, 1 } })
  end)
end)

describe("where", function()
  it("selects elementwise", function()
    local cond = keel.tensor({ { 1, 0, 1 }, { 0, 1, 0 } })
    local a = f64({ { 1, 2, 3 }, { 4, 5, 6 } })
    local b = f64({ { -1, -2, -3 }, { -4, -5, -6 } })
    close(keel.where(cond, a, b), { { 1, -2, 3 }, { -4, 5, -6 } })
  end)

  it("broadcasts condition and branches", function()
    local a = f64({ { 1, 2, 3 }, { 4, 5, 6 } })
    local cond = a:gt(3)
    local zero = f64({ 0 })
    close(keel.where(cond, a, zero), { { 0, 0, 0 }, { 4, 5, 6 } })
    local c1 = keel.tensor({ 1, 0, 1 })
    close(keel.where(c1, a, f64({ { 10 }, { 20 } })), { { 1, 10, 3 }, { 4, 20, 6 } })
  end)
end)

describe("broadcasting", function()
  it("[3,1] + [4] -> [3,4]", function()
    local a = f64({ { 1 }, { 2 }, { 3 } })
    local b = f64({ 10, 20, 30, 40 })
    local r = a + b
    H.assert_shape(r, { 3, 4 })
    close(r, { { 11, 21, 31, 41 }, { 12, 22, 32, 42 }, { 13, 23, 33, 43 } })
    close(b + a, r:totable())
  end)

  it("[2,1,3] * [5,1] -> [2,5,3]", function()
    local ad = H.nest(H.values(6, -2, 2, 11), { 2, 1, 3 })
    local bd = H.nest(H.values(5, -2, 2, 12), { 5, 1 })
    local r = f64(ad) * f64(bd)
    H.assert_shape(r, { 2, 5, 3 })
    close(r, (H.ref_binary(ad, bd, binary.mul)))
  end)

  it("every binary op broadcasts", function()
    local ad = H.nest(H.values(6, 0.5, 2, 13), { 2, 1, 3 })
    local bd = H.nest(H.values(4, 0.5, 2, 14), { 4, 1 })
    for _, name in ipairs(binary_names) do
      local a, b = f64(ad), f64(bd)
      close(a[name](a, b), (H.ref_binary(ad, bd, binary[name])), nil, name)
      close(b[name](b, a), (H.ref_binary(bd, ad, binary[name])), nil, name .. " swapped")
    end
  end)

  it("broadcasts against 0-d tensors and size-1 tensors", function()
    local a = f64({ { 1, 2 }, { 3, 4 } })
    close(a * keel.tensor(2, { dtype = "float64" }), { { 2, 4 }, { 6, 8 } })
    close(a - f64({ 1 }), { { 0, 1 }, { 2, 3 } })
    close(f64({ { 1 } }) + f64({ 5, 6, 7 }), { { 6, 7, 8 } })
  end)

  it("broadcasts non-contiguous operands", function()
    local a = f64({ { 1, 2, 3 }, { 4, 5, 6 } }):t()          -- [3,2]
    local b = f64({ { 10, 20, 30 } }):t()                     -- [3,1]
    close(a + b, { { 11, 14 }, { 22, 25 }, { 33, 36 } })
    local n = f64({ 1, 2, 3, 4, 5, 6 }):narrow(1, 2, 3)       -- {2,3,4}
    close(n * f64({ { 1 }, { 2 } }), { { 2, 3, 4 }, { 4, 6, 8 } })
  end)
end)

describe("dtype promotion", function()
  it("float32 with float64 gives float64", function()
    local a = keel.tensor({ 1.5, 2 })
    local b = f64({ 0.25, 4 })
    local r = a + b
    assert.are.equal("float64", r.dtype)
    close(r, { 1.75, 6 })
    assert.are.equal("float64", (b * a).dtype)
    assert.are.equal("float64", keel.maximum(a, b).dtype)
  end)

  it("int64 with int64 stays int64 and exact", function()
    local a = i64({ 3000000000, -7, 5 })
    local b = i64({ 2, 3, -4 })
    local s = a + b
    assert.are.equal("int64", s.dtype)
    assert.are.same({ 3000000002, -4, 1 }, s:totable())
    assert.are.same({ 6000000000, -21, -20 }, (a * b):totable())
    assert.are.same({ 2999999998, -10, 9 }, (a - b):totable())
    assert.are.equal("int64", keel.maximum(a, b).dtype)
    assert.are.same({ 3000000000, 3, 5 }, keel.maximum(a, b):totable())
  end)

  it("int64 with a float promotes to that float", function()
    local i = i64({ 1, 2 })
    local r32 = i + keel.tensor({ 0.5, 0.5 })
    assert.are.equal("float32", r32.dtype)
    close(r32, { 1.5, 2.5 })
    local r64 = f64({ 0.25, 0.25 }) * i
    assert.are.equal("float64", r64.dtype)
    close(r64, { 0.25, 0.5 })
  end)
end)

describe("in-place ops", function()
  it("add_ sub_ mul_ div_ with tensors and scalars", function()
    local a = f64(A)
    a:add_(f64(B))
    close(a, H.ref_binary(A, B, binary.add))
    a = f64(A)
    a:sub_(1)
    close(a, H.ref_binary(A, 1, binary.sub))
    a = f64(A)
    a:mul_(f64(B))
    close(a, H.ref_binary(A, B, binary.mul))
    a = f64(A)
    a:div_(2)
    close(a, H.ref_binary(A, 2, binary.div))
    a = f64(A)
    a:add_(2):mul_(3)
    close(a, H.ref_unary(A, function(x) return (x + 2) * 3 end))
  end)

  it("in-place ops broadcast the argument", function()
    local a = f64(A)
    a:add_(f64({ 10, 20, 30 }))
    close(a, { { 11, 22, 33 }, { 14, 25, 36 } })
    a:mul_(f64({ { 1 }, { -1 } }))
    close(a, { { 11, 22, 33 }, { -14, -25, -36 } })
  end)

  it("clamp_", function()
    local a = f64({ -2, 0.5, 3 })
    a:clamp_(0, 1)
    close(a, { 0, 0.5, 1 })
    local b = f64({ -2, 0.5, 3 })
    b:clamp_(nil, 0)
    close(b, { -2, 0, 0 })
  end)

  it("in-place ops write through views", function()
    local a = f64(A)
    a:select(2, 2):mul_(10)
    close(a, { { 1, 20, 3 }, { 4, 50, 6 } })
    a:t():narrow(1, 3, 1):add_(1)
    close(a, { { 1, 20, 4 }, { 4, 50, 7 } })
  end)

  it("are refused on tensors that require grad, allowed under no_grad", function()
    local x = keel.ones({ 3 }, { requires_grad = true })
    for _, op in ipairs({ "add_", "sub_", "mul_", "div_" }) do
      H.assert_error(function() x[op](x, 1) end, op)
    end
    H.assert_error(function() x:clamp_(0, 1) end, "clamp_")
    H.assert_error(function() x:fill_(2) end, "fill_")
    H.assert_error(function() x:zero_() end)
    H.assert_error(function() x:copy_(keel.zeros({ 3 })) end, "copy_")
    close(x, { 1, 1, 1 })
    keel.no_grad(function() x:add_(1) end)
    close(x, { 2, 2, 2 })
    assert.is_true(x.requires_grad)
  end)

  it("are refused on non-leaf results that require grad", function()
    local x = keel.ones({ 3 }, { requires_grad = true })
    local y = x * 2
    H.assert_error(function() y:add_(1) end, "add_")
  end)
end)

describe("matmul", function()
  local function check(a, b, tol)
    local expected, shape = H.ref_matmul(a, b)
    local r = a:matmul(b)
    H.assert_shape(r, shape)
    close(r, expected, tol)
    close(keel.matmul(a, b), expected, tol)
    return r
  end
  local seed = 100
  local function M(shape, dtype)
    seed = seed + 1
    return keel.tensor(H.nest(H.values(H.numel(shape), -2, 2, seed), shape),
                       { dtype = dtype or "float64" })
  end

  it("1-D . 1-D is a 0-d dot product", function()
    local r = f64({ 1, 2, 3 }):matmul(f64({ 4, -5, 6 }))
    assert.are.equal(0, r:dim())
    assert.are.equal(12, r:item())
  end)

  it("2-D . 1-D", function()
    local r = f64({ { 1, 2, 3 }, { 4, 5, 6 } }):matmul(f64({ 1, 0, -1 }))
    close(r, { -2, -2 })
    check(M({ 4, 3 }), M({ 3 }))
  end)

  it("1-D . 2-D", function()
    local r = f64({ 1, -1 }):matmul(f64({ { 1, 2, 3 }, { 4, 5, 6 } }))
    close(r, { -3, -3, -3 })
    check(M({ 3 }), M({ 3, 5 }))
  end)

  it("2-D . 2-D", function()
    local r = f64({ { 1, 2 }, { 3, 4 } }):matmul(f64({ { 5, 6 }, { 7, 8 } }))
    close(r, { { 19, 22 }, { 43, 50 } })
    check(M({ 2, 3 }), M({ 3, 4 }))
    check(M({ 5, 1 }), M({ 1, 6 }))
    check(M({ 1, 7 }), M({ 7, 1 }))
  end)

  it("2-D . 2-D in float32 against float64", function()
    local a, b = M({ 6, 5 }, "float32"), M({ 5, 7 }, "float32")
    local r = a:matmul(b)
    assert.are.equal("float32", r.dtype)
    close(r, (H.ref_matmul(a, b)), { atol = 1e-5, rtol = 1e-5 })
  end)

  it("batched 3-D . 3-D", function()
    check(M({ 2, 2, 3 }), M({ 2, 3, 4 }))
    check(M({ 3, 1, 2 }), M({ 3, 2, 1 }))
  end)

  it("broadcast batch 3-D . 2-D and 2-D . 3-D", function()
    check(M({ 2, 3, 4 }), M({ 4, 2 }))
    check(M({ 3, 4 }), M({ 2, 4, 2 }))
  end)

  it("broadcast batch 4-D . 3-D", function()
    check(M({ 2, 1, 2, 3 }), M({ 3, 3, 2 }))
    check(M({ 2, 3, 2, 3 }), M({ 1, 3, 2 }))
  end)

  it("1-D with batched operands", function()
    check(M({ 3 }), M({ 2, 3, 4 }))
    check(M({ 2, 2, 3 }), M({ 3 }))
  end)

  it("transposed and non-contiguous operands", function()
    check(M({ 3, 2 }):t(), M({ 3, 4 }))
    check(M({ 2, 3 }), M({ 4, 3 }):t())
    check(M({ 3, 2 }):t(), M({ 4, 3 }):t())
    check(M({ 4, 6 }):narrow(2, 2, 3), M({ 5, 3 }):narrow(1, 2, 3))
    check(M({ 2, 4, 3 }):transpose(2, 3), M({ 2, 4, 5 }))
    check(M({ 3, 2, 4 }):permute(2, 1, 3), M({ 2, 5, 4 }):transpose(-1, -2))
    check(M({ 3, 4 }):unsqueeze(1):expand({ 2, 3, 4 }), M({ 2, 4, 2 }))
    check(M({ 5 }):narrow(1, 2, 3), M({ 6, 4 }):narrow(1, 3, 3))
    check(M({ 3, 6 }):select(2, 2), M({ 3, 3 }):t())
  end)

  it("mixed float32/float64 promotes", function()
    local r = M({ 2, 3 }, "float32"):matmul(M({ 3, 2 }))
    assert.are.equal("float64", r.dtype)
  end)

  it("mm is matmul", function()
    local a, b = M({ 2, 3 }), M({ 3, 2 })
    close(a:mm(b), (H.ref_matmul(a, b)))
  end)

  it("larger float32 product (BLAS path) matches the Lua reference", function()
    local a, b = M({ 17, 33 }, "float32"), M({ 33, 9 }, "float32")
    close(a:matmul(b), (H.ref_matmul(a, b)), { atol = 1e-4, rtol = 1e-5 })
    local c = M({ 33, 17 }, "float32"):t()
    close(c:matmul(b), (H.ref_matmul(c, b)), { atol = 1e-4, rtol = 1e-5 })
  end)
end)

describe("cat and stack", function()
  it("cat along the first, last and negative dimension", function()
    local a = f64({ { 1, 2, 3 }, { 4, 5, 6 } })
    local b = f64({ { 7, 8, 9 } })
    close(keel.cat({ a, b }, 1), { { 1, 2, 3 }, { 4, 5, 6 }, { 7, 8, 9 } })
    local c = f64({ { 10, 11 }, { 12, 13 } })
    close(keel.cat({ a, c }, 2), { { 1, 2, 3, 10, 11 }, { 4, 5, 6, 12, 13 } })
    close(keel.cat({ a, c }, -1), { { 1, 2, 3, 10, 11 }, { 4, 5, 6, 12, 13 } })
    close(keel.cat({ a, b, a }, 1):select(1, 5), { 4, 5, 6 })
  end)

  it("cat of 1-D, of one tensor and of non-contiguous views", function()
    close(keel.cat({ f64({ 1, 2 }), f64({ 3 }), f64({ 4, 5, 6 }) }, 1), { 1, 2, 3, 4, 5, 6 })
    close(keel.cat({ f64({ 1, 2 }) }, 1), { 1, 2 })
    local a = f64({ { 1, 2 }, { 3, 4 } })
    close(keel.cat({ a:t(), a }, 1), { { 1, 3 }, { 2, 4 }, { 1, 2 }, { 3, 4 } })
  end)

  it("cat does not alias its inputs", function()
    local a = f64({ 1, 2 })
    local r = keel.cat({ a, a }, 1)
    r[1] = 100
    assert.are.equal(1, a[1])
  end)

  it("stack inserts a new dimension", function()
    local a = f64({ { 1, 2, 3 }, { 4, 5, 6 } })
    local b = f64({ { 7, 8, 9 }, { 10, 11, 12 } })
    local s1 = keel.stack({ a, b }, 1)
    H.assert_shape(s1, { 2, 2, 3 })
    close(s1, { { { 1, 2, 3 }, { 4, 5, 6 } }, { { 7, 8, 9 }, { 10, 11, 12 } } })
    local s2 = keel.stack({ a, b }, 2)
    H.assert_shape(s2, { 2, 2, 3 })
    close(s2, { { { 1, 2, 3 }, { 7, 8, 9 } }, { { 4, 5, 6 }, { 10, 11, 12 } } })
    local s3 = keel.stack({ a, b }, 3)
    H.assert_shape(s3, { 2, 3, 2 })
    close(s3, { { { 1, 7 }, { 2, 8 }, { 3, 9 } }, { { 4, 10 }, { 5, 11 }, { 6, 12 } } })
    close(keel.stack({ a, b }, -1), s3:totable())
    close(keel.stack({ f64({ 1, 2 }), f64({ 3, 4 }), f64({ 5, 6 }) }, 1),
          { { 1, 2 }, { 3, 4 }, { 5, 6 } })
  end)
end)

describe("gather, scatter_add, index_select", function()
  local a
  before_each(function() a = f64({ { 1, 2, 3 }, { 4, 5, 6 } }) end)

  it("gather along the last dimension with 1-based indices", function()
    local r = a:gather(2, i64({ { 3, 1 }, { 2, 2 } }))
    close(r, { { 3, 1 }, { 5, 5 } })
    assert.are.equal("float64", r.dtype)
    close(keel.gather(a, -1, i64({ { 1 }, { 3 } })), { { 1 }, { 6 } })
  end)

  it("gather along the first dimension", function()
    close(a:gather(1, i64({ { 2, 1, 2 } })), { { 4, 2, 6 } })
    close(a:gather(1, i64({ { 2, 2, 1 }, { 1, 1, 2 } })), { { 4, 5, 3 }, { 1, 2, 6 } })
  end)

  it("gather from a non-contiguous tensor", function()
    close(a:t():gather(2, i64({ { 2 }, { 1 }, { 2 } })), { { 4 }, { 2 }, { 6 } })
  end)

  it("scatter_add along the first dimension (out of place)", function()
    local base = f64({ { 0, 0, 0 }, { 0, 0, 0 } })
    local idx = i64({ { 1, 2, 1 }, { 2, 1, 1 } })
    local src = f64({ { 1, 2, 3 }, { 4, 5, 6 } })
    close(base:scatter_add(1, idx, src), { { 1, 5, 9 }, { 4, 2, 0 } })
    close(base, { { 0, 0, 0 }, { 0, 0, 0 } })
    local ones = f64({ { 1, 1, 1 }, { 1, 1, 1 } })
    close(keel.scatter_add(ones, 1, idx, src), { { 2, 6, 10 }, { 5, 3, 1 } })
  end)

  it("scatter_add along the last dimension with repeated indices", function()
    local base = f64({ { 0, 0, 0 }, { 0, 0, 0 } })
    local idx = i64({ { 3, 3 }, { 1, 2 } })
    local src = f64({ { 1, 2 }, { 3, 4 } })
    close(base:scatter_add(2, idx, src), { { 0, 0, 3 }, { 3, 4, 0 } })
    close(base:scatter_add(-1, idx, src), { { 0, 0, 3 }, { 3, 4, 0 } })
  end)

  it("index_select with 1-based (repeated) indices", function()
    local x = f64({ { 1, 2 }, { 3, 4 }, { 5, 6 } })
    close(x:index_select(1, i64({ 3, 1, 3 })), { { 5, 6 }, { 1, 2 }, { 5, 6 } })
    close(x:index_select(2, i64({ 2 })), { { 2 }, { 4 }, { 6 } })
    close(keel.index_select(x, -1, i64({ 2, 1 })), { { 2, 1 }, { 4, 3 }, { 6, 5 } })
    close(x:t():index_select(1, i64({ 2 })), { { 2, 4, 6 } })
  end)

  it("index_select result does not alias", function()
    local x = f64({ 1, 2, 3 })
    local r = x:index_select(1, i64({ 1 }))
    r[1] = 50
    assert.are.equal(1, x[1])
  end)
end)
