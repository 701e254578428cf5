--
-- tests/attention_spec.lua: the fused scaled-dot-product attention op
-- (keel_sdpa, F.scaled_dot_product_attention without need_weights) on the
-- CPU: float64 gradient checks, agreement with the composed path
-- (need_weights = true) over odd shapes, fully masked rows, dropout masks,
-- matmul precision, argument errors.
--
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local F = nn.functional

local function sdpa(q, k, v, opts) return F.scaled_dot_product_attention(q, k, v, opts) end

local function composed(q, k, v, opts)
  local o = {}
  for key, val in pairs(opts or {}) do o[key] = val end
  o.need_weights = true
  return (sdpa(q, k, v, o))
end

local function leaf(shape, seed, dtype)
  local t = H.t64(shape, -1, 1, seed)
  if dtype and dtype ~= "float64" then t = t:detach():to(dtype):requires_grad_(true) end
  return t
end

local function maxdiff(a, b) return (a - b):abs():max():item() end
local function nan_count(t) return t:ne(t):to("float64"):sum():item() end

-- fused and composed: same output and same input gradients
local function agree(q, k, v, opts, tol, extra)
  local inputs = { q, k, v }
  if extra then inputs[4] = extra end
  local function run(f)
    for _, x in ipairs(inputs) do x.grad = nil end
    local out = f(q, k, v, opts)
    local r = keel.tensor(H.nest(H.values(out:numel(), -1, 1, 7), out.shape), { dtype = out.dtype })
    ;(out * r):sum():backward()
    local g = {}
    for i, x in ipairs(inputs) do g[i] = x.grad end
    return out, g
  end
  local o1, g1 = run(sdpa)
  local o2, g2 = run(composed)
  H.assert_shape(o1, o2.shape, "output")
  H.assert_close(o1:reshape { -1 }, o2:reshape { -1 }:totable(), tol, "output")
  for i = 1, #inputs do
    H.assert_close(g1[i]:reshape { -1 }, g2[i]:reshape { -1 }:totable(), tol, "grad of input " .. i)
  end
end

describe("fused attention gradients (float64 central differences)", function()
  local q, k, v = { 2, 3, 4 }, { 2, 5, 4 }, { 2, 5, 3 }
  it("plain, causal (L < S and L > S)", function()
    H.gradcheck(function(a, b, c) return sdpa(a, b, c) end, { leaf(q, 1), leaf(k, 2), leaf(v, 3) })
    H.gradcheck(function(a, b, c) return sdpa(a, b, c, { is_causal = true }) end,
      { leaf(q, 4), leaf(k, 5), leaf(v, 6) })
    H.gradcheck(function(a, b, c) return sdpa(a, b, c, { is_causal = true, scale = 0.7 }) end,
      { leaf({ 6, 2 }, 7), leaf({ 4, 2 }, 8), leaf({ 4, 3 }, 9) })
  end)

  it("a learnable bias, broadcast, and a boolean mask", function()
    H.gradcheck(function(a, b, c, m) return sdpa(a, b, c, { attn_mask = m }) end,
      { leaf(q, 10), leaf(k, 11), leaf(v, 12), leaf({ 3, 5 }, 13) })
    H.gradcheck(function(a, b, c, m) return sdpa(a, b, c, { attn_mask = m }) end,
      { leaf({ 2, 2, 3, 4 }, 14), leaf({ 2, 2, 5, 4 }, 15), leaf({ 2, 2, 5, 3 }, 16), leaf({ 2, 1, 3, 5 }, 17) })
    local mask = keel.tensor({ { 1, 0, 1, 1, 0 }, { 0, 1, 1, 0, 1 }, { 1, 1, 1, 1, 1 } }, { dtype = "int64" })
    H.gradcheck(function(a, b, c) return sdpa(a, b, c, { attn_mask = mask }) end,
      { leaf(q, 18), leaf(k, 19), leaf(v, 20) })
  end)

  it("broadcast batch dims of q, k and v", function()
    H.gradcheck(function(a, b, c) return sdpa(a, b, c, { is_causal = true }) end,
      { leaf({ 2, 1, 3, 4 }, 21), leaf({ 1, 2, 5, 4 }, 22), leaf({ 5, 3 }, 23) })
  end)

  it("dropout with a fixed seed (reseeded before each evaluation)", function()
    H.gradcheck(function(a, b, c, m)
      keel.manual_seed(77)
      return sdpa(a, b, c, { dropout_p = 0.4, attn_mask = m })
    end, { leaf(q, 24), leaf(k, 25), leaf(v, 26), leaf({ 3, 5 }, 27) })
    H.gradcheck(function(a, b, c)
      keel.manual_seed(78)
      return sdpa(a, b, c, { dropout_p = 0.3, is_causal = true })
    end, { leaf(q, 28), leaf(k, 29), leaf(v, 30) })
  end)
end)

describe("fused attention agrees with the composed path", function()
  local cases = {
    -- q, k, v shapes, options
    { { 2, 3, 5, 7 }, { 2, 3, 9, 7 }, { 2, 3, 9, 4 }, {} },
    { { 1, 70, 3 }, { 1, 130, 3 }, { 1, 130, 5 }, { is_causal = true } },
    { { 2, 130, 5 }, { 2, 70, 5 }, { 2, 70, 6 }, { is_causal = true } },
    { { 3, 9, 1 }, { 3, 11, 1 }, { 3, 11, 1 }, { scale = 2.5 } },
    { { 2, 65, 33 }, { 2, 129, 33 }, { 2, 129, 17 }, {} },
  }
  for _, dtype in ipairs { "float64", "float32" } do
    local tol = dtype == "float64" and { atol = 1e-12, rtol = 1e-10 } or { atol = 1e-5, rtol = 1e-4 }
    it("odd shapes, causal, tiles not multiples (" .. dtype .. ")", function()
      for n, c in ipairs(cases) do
        agree(leaf(c[1], 100 + n, dtype), leaf(c[2], 120 + n, dtype), leaf(c[3], 140 + n, dtype), c[4], tol)
      end
    end)
    it("bias [L, S] and [B, 1, L, S], learnable (" .. dtype .. ")", function()
      local q, k, v = leaf({ 2, 3, 6, 4 }, 1, dtype), leaf({ 2, 3, 7, 4 }, 2, dtype), leaf({ 2, 3, 7, 5 }, 3, dtype)
      local b1 = leaf({ 6, 7 }, 4, dtype)
      agree(q, k, v, { attn_mask = b1 }, tol, b1)
      local b2 = leaf({ 2, 1, 6, 7 }, 5, dtype)
      agree(q, k, v, { attn_mask = b2 }, tol, b2)
    end)
    it("int64 boolean masks (" .. dtype .. ")", function()
      local q, k, v = leaf({ 2, 4, 3 }, 6, dtype), leaf({ 2, 6, 3 }, 7, dtype), leaf({ 2, 6, 2 }, 8, dtype)
      local vals = H.values(2 * 4 * 6, -1, 1, 9)
      for i = 1, #vals do vals[i] = vals[i] > -0.5 and 1 or 0 end
      for i = 1, 6 do vals[i] = 1 end   -- no fully masked rows here
      agree(q, k, v, { attn_mask = keel.tensor(H.nest(vals, { 2, 4, 6 }), { dtype = "int64" }) }, tol)
    end)
  end
end)

describe("fully masked rows", function()
  it("give NaN in that row only, and gradients that stay finite elsewhere", function()
    local q, k, v = leaf({ 3, 4 }, 1), leaf({ 5, 4 }, 2), leaf({ 5, 2 }, 3)
    local m = keel.tensor({ { 1, 1, 0, 1, 0 }, { 0, 0, 0, 0, 0 }, { 0, 1, 1, 1, 1 } }, { dtype = "int64" })
    local out = sdpa(q, k, v, { attn_mask = m })
    local ref = composed(q, k, v, { attn_mask = m })
    -- the composed path gives NaN for that row too
    assert.are.equal(2, nan_count(out))
    assert.are.equal(2, nan_count(ref))
    assert.are.equal(2, nan_count(out:narrow(1, 2, 1)))
    H.assert_close(out:narrow(1, 1, 1):reshape { -1 }, ref:narrow(1, 1, 1):reshape { -1 }:totable(), 1e-12)
    H.assert_close(out:narrow(1, 3, 1):reshape { -1 }, ref:narrow(1, 3, 1):reshape { -1 }:totable(), 1e-12)
    -- a loss over the other rows: finite gradients, none from the masked row
    local loss = (out:narrow(1, 1, 1) * 0.7):sum() + (out:narrow(1, 3, 1) * -1.3):sum()
    loss:backward()
    for i, x in ipairs { q, k, v } do
      assert.are.equal(0, nan_count(x.grad), "NaN in the gradient of input " .. i)
      assert.is_true(x.grad:abs():max():item() > 0)
    end
    H.assert_close(q.grad:narrow(1, 2, 1):reshape { -1 }, { 0, 0, 0, 0 }, 0)
    -- the same gradients as the composed path over the other rows (where
    -- the composed path's masked row would spread NaN: not compared)
    local qg, kg, vg = q.grad, k.grad, v.grad
    q.grad, k.grad, v.grad = nil, nil, nil
    local m2 = keel.tensor({ { 1, 1, 0, 1, 0 }, { 0, 1, 1, 1, 1 } }, { dtype = "int64" })
    local q2 = q:detach():index_select(1, keel.tensor({ 1, 3 }, { dtype = "int64" })):requires_grad_(true)
    local ref2 = composed(q2, k, v, { attn_mask = m2 })
    ;((ref2:narrow(1, 1, 1) * 0.7):sum() + (ref2:narrow(1, 2, 1) * -1.3):sum()):backward()
    H.assert_close(kg:reshape { -1 }, k.grad:reshape { -1 }:totable(), 1e-12, "dk")
    H.assert_close(vg:reshape { -1 }, v.grad:reshape { -1 }:totable(), 1e-12, "dv")
    -- even a NaN upstream gradient in the masked row leaves the keys' finite
    k.grad, v.grad = nil, nil
    sdpa(q, k, v, { attn_mask = m }):sum():backward()
    assert.are.equal(0, nan_count(k.grad))
    assert.are.equal(0, nan_count(v.grad))
  end)
end)

describe("fused attention dropout", function()
  it("keeps about 1 - p of the weights and scales them by 1/(1-p)", function()
    -- v = identity columns: out[i, j] is the dropped weight of (i, j)
    local L, S, p = 64, 64, 0.3
    local q = keel.zeros({ 4, L, 8 }, { dtype = "float64" })
    local v = keel.eye(S, { dtype = "float64" }):reshape { 1, S, S }:expand { 4, S, S }
    keel.manual_seed(3)
    local out = sdpa(q, q:narrow(2, 1, S), v, { dropout_p = p })
    local kept = out:ne(0):to("float64"):mean():item()
    assert.is_true(math.abs(kept - (1 - p)) < 0.02, "keep rate " .. kept)
    local nz = out:ne(0)
    local vals = keel.where(nz, out, keel.full({}, 1 / (S * (1 - p)), { dtype = "float64" }))
    H.assert_all(vals, 1 / (S * (1 - p)), 1e-12)
  end)

  it("repeats with manual_seed and changes without", function()
    local q, k, v = leaf({ 2, 5, 3 }, 1), leaf({ 2, 6, 3 }, 2), leaf({ 2, 6, 4 }, 3)
    keel.manual_seed(11)
    local a = sdpa(q, k, v, { dropout_p = 0.5 })
    local b = sdpa(q, k, v, { dropout_p = 0.5 })
    keel.manual_seed(11)
    local c = sdpa(q, k, v, { dropout_p = 0.5 })
    assert.are.equal(0, maxdiff(a, c))
    assert.is_true(maxdiff(a, b) > 1e-3)
  end)

  it("p = 1 gives zeros, p = 0 the plain op", function()
    local q, k, v = leaf({ 2, 5, 3 }, 1), leaf({ 2, 6, 3 }, 2), leaf({ 2, 6, 4 }, 3)
    H.assert_all(sdpa(q, k, v, { dropout_p = 1 }), 0)
    assert.are.equal(0, maxdiff(sdpa(q, k, v, { dropout_p = 0 }), sdpa(q, k, v)))
  end)
end)

describe("fused attention under the matmul precision", function()
  it("rounds its operands: autocast changes the result, as it changes the composed one", function()
    local q = keel.randn({ 2, 16, 8 })
    local k, v = keel.randn({ 2, 20, 8 }), keel.randn({ 2, 20, 8 })
    local full = sdpa(q, k, v)
    for _, prec in ipairs { "bfloat16", "float16" } do
      local low, low_c
      keel.amp.autocast(prec, function()
        low = sdpa(q, k, v)
        low_c = composed(q, k, v)
      end)
      assert.is_true(maxdiff(low, full) > 1e-4, prec .. " changed nothing")
      assert.is_true(maxdiff(low, low_c) < 2e-2, prec .. ": fused and composed differ by " .. maxdiff(low, low_c))
    end
  end)
end)

describe("fused attention arguments", function()
  local function err(f, msg) H.assert_error_match(f, msg) end
  it("names the function, the argument and what was expected", function()
    local q = keel.zeros({ 2, 3, 4 })
    err(function() sdpa(q, keel.zeros({ 2, 5, 3 }), keel.zeros({ 2, 5, 4 })) end,
      "scaled_dot_product_attention: query %[2,3,4%] and key %[2,5,3%] differ in the last dimension")
    err(function() sdpa(q, keel.zeros({ 3, 5, 4 }), keel.zeros({ 3, 5, 4 })) end,
      "scaled_dot_product_attention: shapes")
    err(function() sdpa(q, q:to("float64"), q) end,
      "scaled_dot_product_attention: key has dtype float64, the query float32; expected one dtype")
    err(function() sdpa(keel.zeros({ 2, 3, 4 }, { dtype = "int64" }), q, q) end,
      "scaled_dot_product_attention: query has dtype int64, expected float32 or float64")
    err(function() sdpa(q, q, q, { dropout_p = -0.1 }) end,
      "scaled_dot_product_attention: dropout_p: expected a number in %[0, 1%], got %-0.1")
    err(function() sdpa(q, q, q, { attn_mask = keel.zeros({ 4, 3 }) }) end,
      "scaled_dot_product_attention: bias %(attn_mask%) has shape %[4,3%], expected one that broadcasts to %[2,3,3%]")
    err(function() F._sdpa(q, q, q, nil, false, 1, 2) end,
      "scaled_dot_product_attention: dropout_p must be in %[0, 1%], got 2")
    err(function() F._sdpa(keel.zeros({4}), q, q, nil, false, 1, 0) end,
      "scaled_dot_product_attention: query has shape %[4%], expected at least 2 dimensions")
    err(function() F._sdpa(q, q, q, keel.zeros({3, 3}, { dtype = "int64" }), false, 1, 0) end,
      "scaled_dot_product_attention: bias %(attn_mask%) has dtype int64, expected a float dtype")
    err(function() sdpa(q, q, q, { scale = math.huge }) end,
      "scaled_dot_product_attention: scale must be finite, got inf")
    local long = keel.zeros({ 0, 2 ^ 31 + 1, 4 })   -- no elements, a length past int32
    err(function() sdpa(long, long, long) end, "scaled_dot_product_attention: sizes above 2%^31 are not supported")
  end)
end)

describe("fused attention on worker threads", function()
  it("gives the same bits under OPENBLAS_NUM_THREADS=1 and 2 (a child process)", function()
    -- sizes past the one-thread threshold, several heads and row tiles
    local outs = H.run_keel([[
      local keel = require "keel"
      local F = keel.nn.functional
      keel.manual_seed(3)
      local q = keel.randn({4, 200, 32}, {requires_grad = true})
      local k = keel.randn({4, 150, 32}, {requires_grad = true})
      local v = keel.randn({4, 150, 16}, {requires_grad = true})
      local o = F.scaled_dot_product_attention(q, k, v, {is_causal = true, dropout_p = 0.1});
      (o * o):sum():backward()
      local parts = {}
      for _, t in ipairs{o, q.grad, k.grad, v.grad} do
        parts[#parts + 1] = string.format("%a", t:to("float64"):abs():sum():item())
      end
      io.write(table.concat(parts, " "))
    ]], {"OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 ", "OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 "})
    if not outs then pending("KEEL_BIN is not set (tools/test.sh sets it)") return end
    assert.is_truthy(outs[1]:match("^0x"), outs[1])
    assert.equals(outs[1], outs[2])
  end)
end)
