-- tensor_spec.lua: creation, RNG, metadata, element access, views, copies,
-- dtype conversion, printing and <close>.
local H = require "helper"
local keel = H.keel
local close = H.assert_close

local function range(n, start)
  local t = {}
  for i = 1, n do t[i] = (start or 0) + i - 1 end
  return t
end

describe("creation", function()
  it("keel.tensor from nested tables", function()
    local t = keel.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
    H.assert_shape(t, { 2, 3 })
    assert.are.equal("float32", t.dtype)
    assert.are.same({ { 1, 2, 3 }, { 4, 5, 6 } }, t:totable())
  end)

  it("keel.tensor from a flat list and from 3-D tables", function()
    close(keel.tensor({ 1.5, -2, 3 }), { 1.5, -2, 3 })
    local d = { { { 1, 2 }, { 3, 4 } }, { { 5, 6 }, { 7, 8 } }, { { 9, 10 }, { 11, 12 } } }
    local t = keel.tensor(d)
    H.assert_shape(t, { 3, 2, 2 })
    assert.are.same(d, t:totable())
  end)

  it("keel.tensor from a tensor: a detached copy in its dtype unless opts names one", function()
    local src = keel.tensor({ 1, 2, 3 }, { dtype = "int64" })
    local same = keel.tensor(src, { requires_grad = false })
    assert.are.equal("int64", same.dtype)
    local f = keel.tensor(src, { dtype = "float64" })
    assert.are.equal("float64", f.dtype)
    same:add_(1)
    assert.are.same({ 1, 2, 3 }, src:totable())
    local w = keel.tensor({ 0.5 }, { requires_grad = true })
    local c = keel.tensor(w * 2)
    assert.is_false(c.requires_grad)
    assert.are.same({ 1 }, c:totable())
  end)

  it("keel.tensor from a number is 0-d", function()
    local t = keel.tensor(3.5)
    assert.are.equal(0, t:dim())
    assert.are.same({}, t.shape)
    assert.are.equal(1, t:numel())
    assert.are.equal(3.5, t:item())
    assert.are.equal(3.5, t:totable())
  end)

  it("keel.tensor with dtype and requires_grad options", function()
    local a = keel.tensor({ 1.25, 2 }, { dtype = "float64" })
    assert.are.equal("float64", a.dtype)
    close(a, { 1.25, 2 })
    local b = keel.tensor({ 1, 2, 3 }, { dtype = "int64" })
    assert.are.equal("int64", b.dtype)
    assert.are.same({ 1, 2, 3 }, b:totable())
    local c = keel.tensor({ 1, 2 }, { requires_grad = true })
    assert.is_true(c.requires_grad)
    assert.is_true(c.is_leaf)
    local d = keel.tensor({ 1, 2 })
    assert.is_false(d.requires_grad)
  end)

  it("float64 keeps full precision, float32 rounds", function()
    local x = 0.1
    assert.are.equal(x, keel.tensor({ x }, { dtype = "float64" })[1])
    local f = keel.tensor({ x })[1]
    assert.are_not.equal(x, f)
    assert.is_true(math.abs(f - x) < 1e-8)
  end)

  it("int64 holds integers beyond 2^24 exactly", function()
    local t = keel.tensor({ 16777217, -3 }, { dtype = "int64" })
    assert.are.equal(16777217, t[1])
    assert.are.equal(-3, t[2])
  end)

  it("accepts every documented dtype alias", function()
    local aliases = {
      float32 = "float32", f32 = "float32", float = "float32",
      float64 = "float64", f64 = "float64", double = "float64",
      int64 = "int64", i64 = "int64", long = "int64",
    }
    for alias, canon in pairs(aliases) do
      assert.are.equal(canon, keel.zeros({ 2 }, { dtype = alias }).dtype, alias)
      assert.are.equal(canon, keel.tensor({ 1 }, { dtype = alias }).dtype, alias)
    end
  end)

  it("zeros / ones / empty with a shape table", function()
    local z = keel.zeros({ 2, 3 })
    H.assert_shape(z, { 2, 3 })
    assert.are.equal("float32", z.dtype)
    H.assert_all(z, 0)
    local o = keel.ones({ 3, 1, 2 })
    H.assert_shape(o, { 3, 1, 2 })
    H.assert_all(o, 1)
    local e = keel.empty({ 4, 5 })
    H.assert_shape(e, { 4, 5 })
    assert.are.equal(20, e:numel())
  end)

  it("zeros / ones / empty with plain size arguments", function()
    H.assert_shape(keel.zeros(2, 3), { 2, 3 })
    H.assert_shape(keel.ones(4), { 4 })
    H.assert_all(keel.ones(4), 1)
    H.assert_shape(keel.empty(2, 2, 2), { 2, 2, 2 })
  end)

  it("creation with dtype options", function()
    assert.are.equal("float64", keel.zeros({ 2 }, { dtype = "float64" }).dtype)
    assert.are.equal("int64", keel.ones({ 2 }, { dtype = "int64" }).dtype)
    assert.are.equal("float64", keel.empty({ 2 }, { dtype = "float64" }).dtype)
    local r = keel.zeros({ 2 }, { requires_grad = true })
    assert.is_true(r.requires_grad)
  end)

  it("zero-size dimensions", function()
    local t = keel.zeros({ 0, 3 })
    H.assert_shape(t, { 0, 3 })
    assert.are.equal(0, t:numel())
  end)

  it("full", function()
    local t = keel.full({ 2, 2 }, 7)
    H.assert_shape(t, { 2, 2 })
    close(t, { { 7, 7 }, { 7, 7 } })
    local d = keel.full({ 3 }, -0.5, { dtype = "float64" })
    assert.are.equal("float64", d.dtype)
    close(d, { -0.5, -0.5, -0.5 })
  end)

  it("arange", function()
    close(keel.arange(5), { 0, 1, 2, 3, 4 })
    close(keel.arange(2, 5), { 2, 3, 4 })
    close(keel.arange(0, 1, 0.25), { 0, 0.25, 0.5, 0.75 })
    close(keel.arange(2, 11, 3), { 2, 5, 8 })
    close(keel.arange(5, 0, -2), { 5, 3, 1 })
    close(keel.arange(1, 2.5, 0.5), { 1, 1.5, 2 })
  end)

  it("arange with options", function()
    local t = keel.arange(0, 4, 1, { dtype = "float64" })
    assert.are.equal("float64", t.dtype)
    close(t, { 0, 1, 2, 3 })
  end)

  it("linspace includes both ends", function()
    close(keel.linspace(0, 1, 5), { 0, 0.25, 0.5, 0.75, 1 })
    close(keel.linspace(-1, 1, 3), { -1, 0, 1 })
    close(keel.linspace(2, 2, 1), { 2 })
    close(keel.linspace(10, 0, 3), { 10, 5, 0 })
  end)

  it("eye", function()
    close(keel.eye(3), { { 1, 0, 0 }, { 0, 1, 0 }, { 0, 0, 1 } })
    close(keel.eye(2, 3), { { 1, 0, 0 }, { 0, 1, 0 } })
    close(keel.eye(3, 2), { { 1, 0 }, { 0, 1 }, { 0, 0 } })
  end)

  it("rand / randn shapes and dtypes", function()
    local r = keel.rand({ 3, 4 })
    H.assert_shape(r, { 3, 4 })
    assert.are.equal("float32", r.dtype)
    local n = keel.randn(2, 5)
    H.assert_shape(n, { 2, 5 })
    assert.are.equal("float64", keel.rand({ 2 }, { dtype = "float64" }).dtype)
    assert.are.equal("float64", keel.randn({ 2 }, { dtype = "float64" }).dtype)
  end)

  it("*_like functions copy shape and dtype", function()
    local t = keel.zeros({ 2, 3 }, { dtype = "float64" })
    local cases = {
      zeros_like = keel.zeros_like(t),
      ones_like = keel.ones_like(t),
      full_like = keel.full_like(t, 2.5),
      rand_like = keel.rand_like(t),
      randn_like = keel.randn_like(t),
    }
    for name, x in pairs(cases) do
      H.assert_shape(x, { 2, 3 }, name)
      assert.are.equal("float64", x.dtype, name)
    end
    H.assert_all(cases.zeros_like, 0)
    H.assert_all(cases.ones_like, 1)
    H.assert_all(cases.full_like, 2.5)
    local r = cases.rand_like
    for _, v in ipairs(H.flat(r)) do assert.is_true(v >= 0 and v < 1) end
  end)
end)

describe("random numbers", function()
  it("same seed gives the same numbers", function()
    keel.manual_seed(42)
    local a = H.flat(keel.rand({ 16 }))
    local b = H.flat(keel.randn({ 16 }))
    keel.manual_seed(42)
    local c = H.flat(keel.rand({ 16 }))
    local d = H.flat(keel.randn({ 16 }))
    assert.are.same(a, c)
    assert.are.same(b, d)
  end)

  it("the stream advances and different seeds differ", function()
    keel.manual_seed(1)
    local a = H.flat(keel.rand({ 8 }))
    local b = H.flat(keel.rand({ 8 }))
    assert.are_not.same(a, b)
    keel.manual_seed(2)
    local c = H.flat(keel.rand({ 8 }))
    assert.are_not.same(a, c)
  end)

  it("rand is uniform in [0, 1)", function()
    keel.manual_seed(123)
    local v = H.flat(keel.rand({ 10000 }, { dtype = "float64" }))
    local lo, hi, s = math.huge, -math.huge, 0
    for _, x in ipairs(v) do
      if x < lo then lo = x end
      if x > hi then hi = x end
      s = s + x
    end
    assert.is_true(lo >= 0, "min " .. lo)
    assert.is_true(hi < 1, "max " .. hi)
    assert.is_true(lo < 0.01 and hi > 0.99, "range covered")
    assert.is_true(math.abs(s / #v - 0.5) < 0.02, "mean " .. s / #v)
    -- a fair share of every tenth of the interval
    local bins = {}
    for _, x in ipairs(v) do
      local b = math.floor(x * 10) + 1
      bins[b] = (bins[b] or 0) + 1
    end
    for b = 1, 10 do assert.is_true(bins[b] > 800 and bins[b] < 1200, "bin " .. b) end
  end)

  it("float32 rand stays below 1", function()
    keel.manual_seed(7)
    local v = H.flat(keel.rand({ 10000 }))
    for _, x in ipairs(v) do assert.is_true(x >= 0 and x < 1) end
  end)

  it("randn has mean 0 and std 1", function()
    keel.manual_seed(321)
    local v = H.flat(keel.randn({ 10000 }, { dtype = "float64" }))
    local s, s2 = 0, 0
    for _, x in ipairs(v) do s = s + x; s2 = s2 + x * x end
    local mean = s / #v
    local std = math.sqrt(s2 / #v - mean * mean)
    assert.is_true(math.abs(mean) < 0.05, "mean " .. mean)
    assert.is_true(math.abs(std - 1) < 0.05, "std " .. std)
    local beyond = 0
    for _, x in ipairs(v) do if math.abs(x) > 1.96 then beyond = beyond + 1 end end
    assert.is_true(beyond > 350 and beyond < 650, "tails " .. beyond)  -- ~5%
  end)

  it("rand_like / randn_like use the same seeded stream", function()
    local t = keel.zeros({ 6 })
    keel.manual_seed(9)
    local a = H.flat(keel.rand_like(t))
    keel.manual_seed(9)
    local b = H.flat(keel.rand_like(t))
    assert.are.same(a, b)
  end)
end)

describe("metadata", function()
  it("shape, size, dim, numel, #, strides", function()
    local t = keel.zeros({ 2, 3, 4 })
    assert.are.same({ 2, 3, 4 }, t.shape)
    assert.are.same({ 2, 3, 4 }, t:size())
    assert.are.equal(2, t:size(1))
    assert.are.equal(3, t:size(2))
    assert.are.equal(4, t:size(-1))
    assert.are.equal(3, t:size(-2))
    assert.are.equal(3, t:dim())
    assert.are.equal(3, t.ndim)
    assert.are.equal(24, t:numel())
    assert.are.equal(2, #t)
    assert.are.same({ 12, 4, 1 }, t:stride())
    assert.are.equal(4, t:stride(2))
    assert.are.equal(1, t:stride(-1))
    assert.are.equal(0, t:storage_offset())
    assert.is_true(t:is_contiguous())
  end)

  it("dtype, device and autograd fields", function()
    local t = keel.ones({ 2 })
    assert.are.equal("float32", t.dtype)
    -- the default device (KEEL_DEVICE may make it CUDA), unless asked
    assert.are.equal(keel.get_default_device(), t.device)
    assert.are.equal("cpu", keel.ones({ 2 }, { device = "cpu" }).device)
    assert.is_false(t.requires_grad)
    assert.is_nil(t.grad)
    assert.is_true(t.is_leaf)
    assert.is_nil(t.grad_fn)
  end)

  it("requires_grad is settable", function()
    local t = keel.ones({ 2 })
    t.requires_grad = true
    assert.is_true(t.requires_grad)
    t.requires_grad = false
    assert.is_false(t.requires_grad)
    t:requires_grad_()
    assert.is_true(t.requires_grad)
    t:requires_grad_(false)
    assert.is_false(t.requires_grad)
  end)

  it("# is the size of the first dimension", function()
    assert.are.equal(5, #keel.zeros({ 5 }))
    assert.are.equal(3, #keel.zeros({ 3, 7 }))
  end)

  it("item", function()
    assert.are.equal(4, keel.tensor({ { 4 } }):item())
    assert.are.equal(-2.5, keel.tensor({ -2.5 }, { dtype = "float64" }):item())
  end)

  it("totable round trips", function()
    local d = { { { 1, 2, 3 }, { 4, 5, 6 } }, { { 7, 8, 9 }, { 10, 11, 12 } } }
    local t = keel.tensor(d, { dtype = "float64" })
    assert.are.same(d, t:totable())
    assert.are.same(d, keel.tensor(t:totable()):totable())
    local v = H.values(12, -5, 5, 3)
    local u = keel.tensor(H.nest(v, { 3, 4 }), { dtype = "float64" })
    assert.are.same(v, H.flat(u:totable()))
  end)
end)

describe("element access", function()
  local t
  before_each(function()
    t = keel.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
  end)

  it("get and set are 1-based", function()
    assert.are.equal(1, t:get(1, 1))
    assert.are.equal(6, t:get(2, 3))
    assert.are.equal(2, t:get(1, 2))
    t:set(2, 3, 9)
    assert.are.equal(9, t:get(2, 3))
    close(t, { { 1, 2, 3 }, { 4, 5, 9 } })
  end)

  it("get on a 0-d tensor", function()
    assert.are.equal(7, keel.tensor(7):get())
  end)

  it("t[i] on a 1-D tensor is a number; negative counts from the end", function()
    local v = keel.tensor({ 10, 20, 30 })
    assert.are.equal("number", type(v[1]))
    assert.are.equal(10, v[1])
    assert.are.equal(30, v[3])
    assert.are.equal(30, v[-1])
    assert.are.equal(10, v[-3])
  end)

  it("t[i] = v sets an element of a 1-D tensor", function()
    local v = keel.tensor({ 10, 20, 30 })
    v[2] = 5
    v[-1] = 7
    close(v, { 10, 5, 7 })
  end)

  it("t[i] on a 2-D tensor is a row view", function()
    local row = t[2]
    assert.is_true(H.is_tensor(row))
    close(row, { 4, 5, 6 })
    close(t[-1], { 4, 5, 6 })
    row[1] = 40
    assert.are.equal(40, t:get(2, 1))
    assert.are.equal(3, t[1][3])
  end)

  it("t[i] = number fills a slice, t[i] = tensor copies one", function()
    t[1] = 0
    close(t, { { 0, 0, 0 }, { 4, 5, 6 } })
    t[2] = keel.tensor({ 7, 8, 9 })
    close(t, { { 0, 0, 0 }, { 7, 8, 9 } })
  end)

  it("element access on int64 and float64", function()
    local i = keel.tensor({ 1, 2 }, { dtype = "int64" })
    i:set(2, 12345678901)
    assert.are.equal(12345678901, i:get(2))
    local d = keel.zeros({ 2 }, { dtype = "float64" })
    d:set(1, 1 / 3)
    assert.are.equal(1 / 3, d:get(1))
  end)
end)

describe("views", function()
  local base
  before_each(function()
    base = keel.arange(0, 6):view({ 2, 3 }):contiguous()
  end)

  it("view with a table, plain arguments and -1", function()
    local a = keel.arange(0, 6)
    close(a:view({ 3, 2 }), { { 0, 1 }, { 2, 3 }, { 4, 5 } })
    close(a:view(2, 3), { { 0, 1, 2 }, { 3, 4, 5 } })
    H.assert_shape(a:view({ -1, 2 }), { 3, 2 })
    H.assert_shape(a:view({ 3, -1 }), { 3, 2 })
    H.assert_shape(a:view(1, -1, 1), { 1, 6, 1 })
    H.assert_shape(a:view({ 2, 3 }):view(-1), { 6 })
  end)

  it("view shares storage", function()
    local a = keel.zeros({ 6 })
    local v = a:view({ 2, 3 })
    v:set(2, 1, 100)
    assert.are.equal(100, a[4])
    a[1] = -1
    assert.are.equal(-1, v:get(1, 1))
  end)

  it("reshape views contiguous tensors and copies otherwise", function()
    local a = keel.zeros({ 6 })
    local r = a:reshape({ 3, 2 })
    r:set(3, 2, 5)
    assert.are.equal(5, a[6])
    local t = base:t()
    local c = t:reshape({ 6 })
    close(c, { 0, 3, 1, 4, 2, 5 })
    c[1] = 99
    assert.are.equal(0, base:get(1, 1))
    H.assert_shape(base:reshape(-1), { 6 })
    H.assert_shape(base:reshape(3, -1), { 3, 2 })
  end)

  it("transpose and t", function()
    local t = base:transpose(1, 2)
    H.assert_shape(t, { 3, 2 })
    assert.are.same({ 1, 3 }, t:stride())
    assert.is_false(t:is_contiguous())
    close(t, { { 0, 3 }, { 1, 4 }, { 2, 5 } })
    close(base:t(), { { 0, 3 }, { 1, 4 }, { 2, 5 } })
    close(base:transpose(-1, -2), { { 0, 3 }, { 1, 4 }, { 2, 5 } })
    t:set(3, 1, 42)
    assert.are.equal(42, base:get(1, 3))
    local u = base:t()
    u:set(1, 2, 7)
    assert.are.equal(7, base:get(2, 1))
  end)

  it("permute", function()
    local x = keel.arange(0, 24):view({ 2, 3, 4 })
    local p = x:permute(3, 1, 2)
    H.assert_shape(p, { 4, 2, 3 })
    assert.are.same({ 1, 12, 4 }, p:stride())
    for i = 1, 2 do
      for j = 1, 3 do
        for k = 1, 4 do
          assert.are.equal(x:get(i, j, k), p:get(k, i, j))
        end
      end
    end
    p:set(4, 2, 3, -1)
    assert.are.equal(-1, x:get(2, 3, 4))
    -- the identity permutation keeps contiguity
    assert.is_true(x:permute(1, 2, 3):is_contiguous())
    H.assert_shape(x:permute(2, 3, 1), { 3, 4, 2 })
  end)

  it("narrow", function()
    local x = keel.arange(0, 12):view({ 3, 4 })
    local n = x:narrow(2, 2, 2)
    H.assert_shape(n, { 3, 2 })
    close(n, { { 1, 2 }, { 5, 6 }, { 9, 10 } })
    assert.are.same({ 4, 1 }, n:stride())
    assert.are.equal(1, n:storage_offset())
    assert.is_false(n:is_contiguous())
    local r = x:narrow(1, 2, 2)
    close(r, { { 4, 5, 6, 7 }, { 8, 9, 10, 11 } })
    assert.are.equal(4, r:storage_offset())
    assert.is_true(r:is_contiguous())
    n:set(3, 2, 100)
    assert.are.equal(100, x:get(3, 3))
    close(x:narrow(-1, 4, 1), { { 3 }, { 7 }, { 11 } })
  end)

  it("select", function()
    local x = keel.arange(0, 12):view({ 3, 4 })
    local r = x:select(1, 2)
    H.assert_shape(r, { 4 })
    close(r, { 4, 5, 6, 7 })
    local c = x:select(2, 3)
    H.assert_shape(c, { 3 })
    close(c, { 2, 6, 10 })
    assert.are.same({ 4 }, c:stride())
    assert.are.equal(2, c:storage_offset())
    c[2] = -6
    assert.are.equal(-6, x:get(2, 3))
    close(x:select(-1, 4), { 3, 7, 11 })
    local s = x:select(1, 1):select(1, 2)
    assert.are.equal(0, s:dim())
    assert.are.equal(1, s:item())
  end)

  it("squeeze and unsqueeze", function()
    local x = keel.zeros({ 1, 3, 1, 2 })
    H.assert_shape(x:squeeze(), { 3, 2 })
    H.assert_shape(x:squeeze(1), { 3, 1, 2 })
    H.assert_shape(x:squeeze(3), { 1, 3, 2 })
    H.assert_shape(x:squeeze(-2), { 1, 3, 2 })
    local v = keel.tensor({ 1, 2, 3 })
    H.assert_shape(v:unsqueeze(1), { 1, 3 })
    H.assert_shape(v:unsqueeze(2), { 3, 1 })
    H.assert_shape(v:unsqueeze(-1), { 3, 1 })
    close(v:unsqueeze(2), { { 1 }, { 2 }, { 3 } })
    local u = v:unsqueeze(1)
    u:set(1, 2, 20)
    assert.are.equal(20, v[2])
    local s = x:squeeze()
    s:set(3, 2, 8)
    assert.are.equal(8, x:get(1, 3, 1, 2))
  end)

  it("expand and expand_as", function()
    local c = keel.tensor({ { 1 }, { 2 }, { 3 } })
    local e = c:expand({ 3, 4 })
    H.assert_shape(e, { 3, 4 })
    close(e, { { 1, 1, 1, 1 }, { 2, 2, 2, 2 }, { 3, 3, 3, 3 } })
    assert.are.same({ 1, 0 }, e:stride())
    H.assert_shape(c:expand({ -1, 2 }), { 3, 2 })
    H.assert_shape(c:expand(2, 3, 5), { 2, 3, 5 })
    local r = keel.tensor({ 1, 2, 3 })
    local e2 = r:expand({ 2, 3 })
    close(e2, { { 1, 2, 3 }, { 1, 2, 3 } })
    assert.are.same({ 0, 1 }, e2:stride())
    r[2] = 20
    assert.are.equal(20, e2:get(2, 2))
    local other = keel.zeros({ 4, 3 })
    local ea = r:expand_as(other)
    H.assert_shape(ea, { 4, 3 })
    close(ea:select(1, 4), { 1, 20, 3 })
  end)

  it("flatten", function()
    local x = keel.arange(0, 24):view({ 2, 3, 4 })
    H.assert_shape(x:flatten(), { 24 })
    H.assert_shape(x:flatten(2), { 2, 12 })
    H.assert_shape(x:flatten(1, 2), { 6, 4 })
    H.assert_shape(x:flatten(2, 3), { 2, 12 })
    H.assert_shape(x:flatten(-2, -1), { 2, 12 })
    close(x:flatten(), range(24))
    local f = x:flatten()
    f[24] = -5
    assert.are.equal(-5, x:get(2, 3, 4))
    -- a non-contiguous tensor flattens in logical order
    close(x:transpose(1, 3):flatten(), (function()
      local out = {}
      for k = 1, 4 do for j = 1, 3 do for i = 1, 2 do out[#out + 1] = x:get(i, j, k) end end end
      return out
    end)())
  end)

  it("contiguous", function()
    local t = base:t()
    local c = t:contiguous()
    assert.is_true(c:is_contiguous())
    assert.are.same({ 2, 1 }, c:stride())
    close(c, { { 0, 3 }, { 1, 4 }, { 2, 5 } })
    c:set(1, 1, 50)
    assert.are.equal(0, base:get(1, 1))
    -- already contiguous: same storage
    local same = base:contiguous()
    same:set(1, 1, 77)
    assert.are.equal(77, base:get(1, 1))
  end)

  it("views of views keep values and storage", function()
    local x = keel.arange(0, 24):view({ 2, 3, 4 })
    local v = x:transpose(1, 3):narrow(1, 2, 2):select(3, 2)  -- [2,3] over x[2][j][k]
    H.assert_shape(v, { 2, 3 })
    for a = 1, 2 do
      for b = 1, 3 do
        assert.are.equal(x:get(2, b, a + 1), v:get(a, b))
      end
    end
    v:set(2, 3, 1000)
    assert.are.equal(1000, x:get(2, 3, 3))
    local w = x:select(1, 2):t():unsqueeze(1):expand({ 2, 4, 3 })
    assert.are.equal(x:get(2, 1, 4), w:get(2, 4, 1))
  end)

  it("is_contiguous of various views", function()
    local x = keel.zeros({ 3, 4 })
    assert.is_true(x:is_contiguous())
    assert.is_false(x:t():is_contiguous())
    assert.is_true(x:t():t():is_contiguous())
    assert.is_true(x:narrow(1, 2, 1):is_contiguous())
    assert.is_false(x:narrow(2, 1, 2):is_contiguous())
    assert.is_true(x:select(1, 3):is_contiguous())
    assert.is_false(x:select(2, 3):is_contiguous())
    assert.is_true(x:unsqueeze(1):is_contiguous())
  end)
end)

describe("copies and in-place fills", function()
  it("clone owns its storage", function()
    local a = keel.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = "float64" })
    local c = a:clone()
    assert.are.equal("float64", c.dtype)
    close(c, { { 1, 2 }, { 3, 4 } })
    c:set(1, 1, 9)
    assert.are.equal(1, a:get(1, 1))
    local ct = a:t():clone()
    close(ct, { { 1, 3 }, { 2, 4 } })
  end)

  it("detach shares storage and leaves the graph", function()
    local a = keel.tensor({ 1, 2, 3 }, { requires_grad = true })
    local b = a * 2
    local d = b:detach()
    assert.is_false(d.requires_grad)
    assert.is_true(d.is_leaf)
    assert.is_nil(d.grad_fn)
    close(d, { 2, 4, 6 })
    local ad = a:detach()
    ad[1] = 10
    assert.are.equal(10, a[1])
  end)

  it("copy_ converts and writes in place", function()
    local dst = keel.zeros({ 2, 2 })
    local src = keel.tensor({ { 1.5, 2.5 }, { 3.5, 4.5 } }, { dtype = "float64" })
    dst:copy_(src)
    assert.are.equal("float32", dst.dtype)
    close(dst, { { 1.5, 2.5 }, { 3.5, 4.5 } })
    -- into a view
    local big = keel.zeros({ 3, 3 })
    big:narrow(2, 2, 2):narrow(1, 1, 2):copy_(src)
    close(big, { { 0, 1.5, 2.5 }, { 0, 3.5, 4.5 }, { 0, 0, 0 } })
    -- from a non-contiguous source
    local t = keel.zeros({ 2, 2 })
    t:copy_(src:t())
    close(t, { { 1.5, 3.5 }, { 2.5, 4.5 } })
  end)

  it("fill_ and zero_", function()
    local t = keel.ones({ 2, 3 })
    t:fill_(3.25)
    H.assert_all(t, 3.25)
    t:zero_()
    H.assert_all(t, 0)
    local x = keel.ones({ 3, 3 })
    x:select(2, 2):fill_(5)
    close(x, { { 1, 5, 1 }, { 1, 5, 1 }, { 1, 5, 1 } })
    x:narrow(1, 3, 1):zero_()
    close(x, { { 1, 5, 1 }, { 1, 5, 1 }, { 0, 0, 0 } })
  end)
end)

describe("dtype conversion", function()
  it("to, float, double, long", function()
    local a = keel.tensor({ 1.5, -2.5, 3 })
    local d = a:to("float64")
    assert.are.equal("float64", d.dtype)
    close(d, { 1.5, -2.5, 3 })
    assert.are.equal("float64", a:double().dtype)
    assert.are.equal("float32", d:float().dtype)
    local l = a:long()
    assert.are.equal("int64", l.dtype)
    assert.are.same({ 1, -2, 3 }, l:totable())  -- truncation toward zero
    assert.are.equal("int64", a:to("int64").dtype)
    assert.are.equal("float32", l:float().dtype)
    close(l:double(), { 1, -2, 3 })
  end)

  it("conversion copies (does not alias)", function()
    local a = keel.tensor({ 1, 2 })
    local d = a:double()
    d[1] = 5
    assert.are.equal(1, a[1])
  end)

  it("float64 -> float32 rounds to nearest float", function()
    local x = 1 + 2 ^ -30
    local f = keel.tensor({ x }, { dtype = "float64" }):float()
    assert.are.equal(1, f[1])
  end)
end)

describe("tostring", function()
  it("has a header with dtype, device and shape, and values", function()
    local s = tostring(keel.tensor({ { 1, 2, 3 }, { 4, 5, 6 } }))
    assert.is_truthy(s:find("keel.Tensor", 1, true), s)
    assert.is_truthy(s:find("float32", 1, true) or s:find("f32", 1, true), s)
    assert.is_truthy(s:find(" " .. keel.get_default_device() .. " ", 1, true), s)
    assert.is_truthy(s:find("2x3", 1, true), s)
    for _, v in ipairs({ "1", "4", "6" }) do assert.is_truthy(s:find(v, 1, true), s) end
    local c = tostring(keel.tensor({ 1, 2 }, { device = "cpu" }))
    assert.is_truthy(c:find(" cpu ", 1, true), c)
  end)

  it("names float64 and int64", function()
    local s = tostring(keel.zeros({ 2 }, { dtype = "float64" }))
    assert.is_truthy(s:find("float64", 1, true) or s:find("f64", 1, true), s)
    local i = tostring(keel.tensor({ 12345 }, { dtype = "int64" }))
    assert.is_truthy(i:find("int64", 1, true) or i:find("i64", 1, true), i)
    assert.is_truthy(i:find("12345", 1, true), i)
  end)

  it("prints values in logical order for views, and nan / inf", function()
    local s = tostring(keel.tensor({ { 1, 2 }, { 3, 4 } }):t())
    local body = s:gsub("^[^\n]*\n", "")   -- drop the header line
    assert.is_truthy(body:find("1.-3.-2.-4"), s)
    local n = tostring(keel.tensor({ 0 / 0, 1 / 0, -1 / 0 }))
    assert.is_truthy(n:find("nan", 1, true), n)
    assert.is_truthy(n:find("-inf", 1, true), n)
  end)

  it("prints 0-d tensors", function()
    local s = tostring(keel.tensor(2.5))
    assert.is_truthy(s:find("keel.Tensor", 1, true), s)
    assert.is_truthy(s:find("2.5", 1, true), s)
  end)

  it("elides big tensors", function()
    local s = tostring(keel.arange(0, 100000))
    assert.is_truthy(s:find("...", 1, true), s:sub(1, 200))
    assert.is_truthy(s:find("100000", 1, true), s:sub(1, 200))
    assert.is_true(#s < 4000, "length " .. #s)
    local m = tostring(keel.zeros({ 500, 500 }))
    assert.is_truthy(m:find("...", 1, true))
    assert.is_truthy(m:find("500x500", 1, true))
    assert.is_true(#m < 4000, "length " .. #m)
  end)
end)

describe("<close> and memory stats", function()
  it("memory_stats has every documented field", function()
    local s = keel.memory_stats()
    for _, k in ipairs({ "live_bytes", "peak_bytes", "cached_bytes", "live_tensors", "allocs",
                         "cache_hits" }) do
      assert.are.equal("number", type(s[k]), k)
      assert.is_true(s[k] >= 0, k)
    end
    assert.is_true(s.peak_bytes >= s.live_bytes)
  end)

  -- Deltas of live_bytes are only meaningful while the GC cannot free
  -- tensors of earlier tests behind our back.
  local function without_gc(fn)
    collectgarbage("collect")
    collectgarbage("stop")
    local ok, e = pcall(fn)
    collectgarbage("restart")
    if not ok then error(e, 0) end
  end

  it("a new tensor counts in live_bytes and live_tensors", function()
    without_gc(function()
      local before = keel.memory_stats()
      -- live_bytes counts host memory: the tensor is pinned to the CPU
      local t = keel.zeros({ 1000, 100 }, { device = "cpu" })  -- 400 kB
      local after = keel.memory_stats()
      assert.is_true(after.live_bytes - before.live_bytes >= 400000)
      assert.is_true(after.live_tensors >= before.live_tensors + 1)
      assert.is_true(after.allocs >= before.allocs + 1)
      assert.are.equal(100000, t:numel())
    end)
  end)

  it("<close> frees the memory at scope exit", function()
    without_gc(function()
      local before = H.live_bytes()
      local mid
      do
        local t <close> = keel.zeros({ 1024, 1024 }, { device = "cpu" })  -- 4 MB of host memory
        mid = H.live_bytes()
        assert.are.equal(1024, #t)
      end
      local after = H.live_bytes()
      assert.is_true(mid - before >= 4 * 1024 * 1024, "allocated")
      assert.is_true(mid - after >= 4 * 1024 * 1024, "freed: before " .. before .. " mid " .. mid
                     .. " after " .. after)
    end)
  end)

  it("<close> lowers live_tensors", function()
    without_gc(function()
      local before = keel.memory_stats().live_tensors
      do
        local t <close> = keel.ones({ 8 })
        assert.are.equal(before + 1, keel.memory_stats().live_tensors)
      end
      assert.are.equal(before, keel.memory_stats().live_tensors)
    end)
  end)

  it("a closed tensor raises 'closed' when used", function()
    local outer
    do
      local t <close> = keel.ones({ 3 })
      outer = t
    end
    H.assert_error(function() return outer:sum() end, "closed")
    H.assert_error(function() return outer + 1 end, "closed")
    H.assert_error(function() return keel.ones({ 3 }) + outer end, "closed")
    H.assert_error(function() return outer:totable() end, "closed")
    H.assert_error(function() return outer[1] end, "closed")
    -- tostring never crashes
    local ok, s = pcall(tostring, outer)
    assert.is_true(not ok and tostring(s):find("closed", 1, true) ~= nil
                   or ok and type(s) == "string")
  end)

  it("closing a view leaves the base alive", function()
    local base = keel.tensor({ 1, 2, 3, 4 })
    do
      local v <close> = base:view({ 2, 2 })
      v:set(1, 1, 10)
    end
    close(base, { 10, 2, 3, 4 })
    assert.are.equal(20, (base * 2)[1])
  end)

  it("memory_trim empties the cache", function()
    do local t <close> = keel.zeros({ 256, 256 }) end
    keel.memory_trim()
    assert.are.equal(0, keel.memory_stats().cached_bytes)
  end)
end)
