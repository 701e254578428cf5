-- reduce_spec.lua: sum mean prod max min amax amin argmax argmin var std
-- norm over all dims, one dim, several dims, negative dims, keepdim.
local H = require "helper"
local keel = H.keel
local close = H.assert_close
local red = H.red

local SHAPE = { 2, 3, 4 }
local DATA = H.nest(H.values(24, -3, 3, 77, 0.05), SHAPE)  -- distinct, no zeros
local function X() return keel.tensor(DATA, { dtype = "float64" }) end

-- dims argument forms and their keepdim variants
local DIMS = { 1, 2, 3, -1, -2, { 1, 3 }, { 2, 3 }, { -1, 1 }, { 1, 2, 3 } }
local function dstr(d)
  if type(d) == "table" then
    local p = {}
    for i, v in ipairs(d) do p[i] = tostring(v) end
    return "{" .. table.concat(p, ",") .. "}"
  end
  return tostring(d)
end

describe("sum / mean / prod", function()
  local ops = { sum = red.sum, mean = red.mean, prod = red.prod }
  for _, name in ipairs({ "sum", "mean", "prod" }) do
    it(name .. " over everything gives a 0-d tensor", function()
      local r = X()[name](X())
      assert.are.equal(0, r:dim())
      close(r, (H.ref_reduce(DATA, nil, ops[name])), 1e-12)
    end)
    for _, d in ipairs(DIMS) do
      it(name .. "(" .. dstr(d) .. ") with and without keepdim", function()
        local x = X()
        local e, s = H.ref_reduce(DATA, d, ops[name], false)
        local r = x[name](x, d)
        H.assert_shape(r, s)
        close(r, e, 1e-12)
        local ek, sk = H.ref_reduce(DATA, d, ops[name], true)
        local rk = x[name](x, d, true)
        H.assert_shape(rk, sk)
        close(rk, ek, 1e-12)
        local rf = x[name](x, d, false)
        H.assert_shape(rf, s)
      end)
    end
  end

  it("sum of a small hand example", function()
    local x = keel.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
    close(x:sum(), 21)
    close(x:sum(1), { 5, 7, 9 })
    close(x:sum(2), { 6, 15 })
    close(x:sum(2, true), { { 6 }, { 15 } })
    close(x:mean(1), { 2.5, 3.5, 4.5 })
    close(x:prod(2), { 6, 120 })
    close(x:prod(), 720)
  end)

  it("float32 sum of many elements stays accurate", function()
    local n = 100000
    local s = keel.ones({ n }):mul(0.1):sum():item()
    assert.is_true(math.abs(s - 10000) < 0.5, "sum " .. s)
    local m = keel.ones({ n }):mean():item()
    assert.is_true(math.abs(m - 1) < 1e-6, "mean " .. m)
  end)

  it("reduces non-contiguous tensors", function()
    local x = X()
    local t = x:transpose(1, 3)  -- [4,3,2]
    local e = H.ref_reduce(t:contiguous():totable(), 2, red.sum)
    close(t:sum(2), e, 1e-12)
    close(x:narrow(3, 2, 2):sum(), (H.ref_reduce(x:narrow(3, 2, 2):totable(), nil, red.sum)), 1e-12)
  end)

  it("sum of int64 is exact", function()
    local i = keel.tensor({ 3000000000, 5, -2 }, { dtype = "int64" })
    assert.are.equal(3000000003, i:sum():item())
  end)
end)

describe("max / min / amax / amin", function()
  it("max() and min() of everything are 0-d", function()
    local x = X()
    local mx, mn = x:max(), x:min()
    assert.are.equal(0, mx:dim())
    assert.are.equal(0, mn:dim())
    assert.are.equal(H.ref_reduce(DATA, nil, red.max), mx:item())
    assert.are.equal(H.ref_reduce(DATA, nil, red.min), mn:item())
  end)

  for _, d in ipairs({ 1, 2, 3, -1, -3 }) do
    it("max(" .. d .. ") / min(" .. d .. ") give values and 1-based int64 indices", function()
      local x = X()
      for _, which in ipairs({ "max", "min" }) do
        local v, i = x[which](x, d)
        local ev, s = H.ref_reduce(DATA, d, red[which])
        local ei = H.ref_reduce(DATA, d, red["arg" .. which])
        H.assert_shape(v, s)
        H.assert_shape(i, s)
        close(v, ev)
        assert.are.equal("int64", i.dtype)
        assert.are.same(ei, i:totable(), which .. " indices")
        local vk, ik = x[which](x, d, true)
        local evk, sk = H.ref_reduce(DATA, d, red[which], true)
        H.assert_shape(vk, sk)
        H.assert_shape(ik, sk)
        close(vk, evk)
        assert.are.same((H.ref_reduce(DATA, d, red["arg" .. which], true)), ik:totable())
      end
    end)
  end

  it("max(dim) on a hand example", function()
    local x = keel.tensor({ { 1, 9, 3 }, { 7, 2, 8 } })
    local v, i = x:max(2)
    close(v, { 9, 8 })
    assert.are.same({ 2, 3 }, i:totable())
    local v1, i1 = x:min(1)
    close(v1, { 1, 2, 3 })
    assert.are.same({ 1, 2, 1 }, i1:totable())
  end)

  for _, d in ipairs({ 1, 2, -1, { 1, 3 }, { 2, 3 }, { 1, 2, 3 } }) do
    it("amax / amin(" .. dstr(d) .. ")", function()
      local x = X()
      local e, s = H.ref_reduce(DATA, d, red.max)
      local r = x:amax(d)
      H.assert_shape(r, s)
      close(r, e)
      local e2 = H.ref_reduce(DATA, d, red.min)
      close(x:amin(d), e2)
    end)
  end

  it("max of float32 with negative values only", function()
    local x = keel.tensor({ -5, -2, -7 })
    assert.are.equal(-2, x:max():item())
    assert.are.equal(-7, x:min():item())
  end)
end)

describe("argmax / argmin", function()
  it("over the flattened tensor, 1-based", function()
    local x = X()
    local flat = H.flat(DATA)
    local a = x:argmax()
    assert.are.equal("int64", a.dtype)
    assert.are.equal(red.argmax(flat), a:item())
    assert.are.equal(red.argmin(flat), x:argmin():item())
    assert.are.equal(3, keel.tensor({ 1, 5, 9, 2 }):argmax():item())
    assert.are.equal(1, keel.tensor({ 1, 5, 9, 2 }):argmin():item())
  end)

  for _, d in ipairs({ 1, 2, 3, -1 }) do
    it("along dim " .. d .. " with and without keepdim", function()
      local x = X()
      local e, s = H.ref_reduce(DATA, d, red.argmax)
      local r = x:argmax(d)
      H.assert_shape(r, s)
      assert.are.same(e, r:totable())
      local ek, sk = H.ref_reduce(DATA, d, red.argmin, true)
      local rk = x:argmin(d, true)
      H.assert_shape(rk, sk)
      assert.are.same(ek, rk:totable())
    end)
  end
end)

describe("var / std", function()
  for _, corr in ipairs({ 0, 1 }) do
    it("over everything, correction " .. corr, function()
      local x = X()
      local opts = { correction = corr }
      close(x:var(nil, opts), (H.ref_reduce(DATA, nil, red.var(corr))), 1e-12)
      close(x:std(nil, opts), (H.ref_reduce(DATA, nil, red.std(corr))), 1e-12)
      close(x:var({ 1, 2, 3 }, opts), (H.ref_reduce(DATA, nil, red.var(corr))), 1e-12)
    end)
    for _, d in ipairs({ 1, 2, -1, { 1, 3 }, { 2, 3 } }) do
      it("var/std(" .. dstr(d) .. ") correction " .. corr, function()
        local x = X()
        local e, s = H.ref_reduce(DATA, d, red.var(corr))
        local r = x:var(d, { correction = corr })
        H.assert_shape(r, s)
        close(r, e, 1e-12)
        local ek, sk = H.ref_reduce(DATA, d, red.std(corr), true)
        local rk = x:std(d, { correction = corr, keepdim = true })
        H.assert_shape(rk, sk)
        close(rk, ek, 1e-12)
      end)
    end
  end

  it("correction defaults to 1", function()
    local x = keel.tensor({ 1, 2, 3, 4 }, { dtype = "float64" })
    close(x:var(), 5 / 3)
    close(x:var(1), 5 / 3)
    close(x:std(), math.sqrt(5 / 3))
    close(x:var(1, { correction = 0 }), 1.25)
    close(x:std(nil, { correction = 0 }), math.sqrt(1.25))
  end)

  it("keepdim option", function()
    local x = keel.tensor({ { 1, 3 }, { 5, 9 } }, { dtype = "float64" })
    local r = x:var(2, { keepdim = true })
    H.assert_shape(r, { 2, 1 })
    close(r, { { 2 }, { 8 } })
  end)
end)

describe("norm", function()
  local ps = { 1, 2, math.huge, 3 }
  local function pname(p) return p == math.huge and "inf" or tostring(p) end
  for _, p in ipairs(ps) do
    it("p=" .. pname(p) .. " over everything", function()
      local x = X()
      local r = x:norm(p)
      assert.are.equal(0, r:dim())
      close(r, (H.ref_reduce(DATA, nil, red.norm(p))), 1e-12)
    end)
    for _, d in ipairs({ 1, 2, -1, { 1, 3 } }) do
      it("p=" .. pname(p) .. " over " .. dstr(d) .. " with and without keepdim", function()
        local x = X()
        local e, s = H.ref_reduce(DATA, d, red.norm(p))
        local r = x:norm(p, d)
        H.assert_shape(r, s)
        close(r, e, 1e-12)
        local ek, sk = H.ref_reduce(DATA, d, red.norm(p), true)
        local rk = x:norm(p, d, true)
        H.assert_shape(rk, sk)
        close(rk, ek, 1e-12)
      end)
    end
  end

  it("defaults to the 2-norm of everything", function()
    close(keel.tensor({ { 3, 0 }, { 0, -4 } }, { dtype = "float64" }):norm(), 5)
    close(keel.tensor({ 3, -4 }):norm(1), 7)
    close(keel.tensor({ 3, -4 }):norm(math.huge), 4)
  end)
end)
