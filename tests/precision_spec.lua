--
-- tests/precision_spec.lua: the float32 matmul precision and
-- keel.amp.autocast on the CPU (engine/gemm.c). A reduced precision must
-- give exactly the product of operands rounded to the format: the
-- references round in Lua (bit manipulation through string.pack) and
-- multiply at full precision.
--
local H = require "helper"
local keel = H.keel
local F = keel.nn.functional

-- {====================================================================
-- Reference rounding of a float32 value (round to nearest even)
-- =====================================================================

local function bits(x) return (string.unpack("<I4", string.pack("<f", x))) end
local function float(u) return (string.unpack("<f", string.pack("<I4", u & 0xffffffff))) end

local function keep_bits(x, dropped)
  local u = bits(x)
  if u & 0x7f800000 == 0x7f800000 then return x end
  u = u + ((1 << (dropped - 1)) - 1) + ((u >> dropped) & 1)
  return float(u & ~((1 << dropped) - 1))
end

local ROUND = {
  highest = function(x) return float(bits(x)) end,
  tf32 = function(x) return keep_bits(x, 13) end,
  bfloat16 = function(x) return keep_bits(x, 16) end,
  float16 = function(x)
    local a = math.abs(x)
    if a ~= a or a == math.huge then return x end
    if a >= 65520 then return x < 0 and -math.huge or math.huge end
    if a < 2 ^ -14 then
      local q = a * 2 ^ 24
      local r = math.floor(q + 0.5)
      if r - q == 0.5 and r % 2 == 1 then r = r - 1 end   -- ties to even
      return (x < 0 and -r or r) * 2 ^ -24
    end
    return keep_bits(x, 13)
  end,
}

-- t rounded elementwise (a new float32 tensor, no graph).
local function rounded(t, p)
  local flat = H.flat(t:detach():totable())
  for i, v in ipairs(flat) do flat[i] = ROUND[p](v) end
  return keel.tensor(flat, {dtype = "float32"}):reshape(t.shape)
end

local function same(actual, expected, msg)
  H.assert_close(actual, expected:totable(), {atol = 0, rtol = 1e-6}, msg)
end

-- }====================================================================

describe("float32 matmul precision", function()
  after_each(function() keel.set_float32_matmul_precision("highest") end)

  it("defaults to highest and names the previous setting", function()
    assert.are.equal("highest", keel.get_float32_matmul_precision())
    assert.are.equal("highest", keel.set_float32_matmul_precision("medium"))
    assert.are.equal("bfloat16", keel.get_float32_matmul_precision())
    assert.are.equal("bfloat16", keel.set_float32_matmul_precision("high"))
    assert.are.equal("tf32", keel.set_float32_matmul_precision("float16"))
    assert.are.equal("float16", keel.get_float32_matmul_precision())
    H.assert_error_match(function() keel.set_float32_matmul_precision("fp8") end,
                         "set_float32_matmul_precision: argument #1: expected")
  end)

  it("rounds the operands of matmul to each format, and only float32 ones", function()
    local a = H.t64({5, 7}, -3, 3, 11):float()
    local b = H.t64({7, 4}, -3, 3, 12):float()
    for _, p in ipairs {"tf32", "bfloat16", "float16"} do
      keel.set_float32_matmul_precision(p)
      local got = keel.matmul(a, b)
      keel.set_float32_matmul_precision("highest")
      local want = keel.matmul(rounded(a, p), rounded(b, p))
      same(got, want, p)
      -- the rounding is visible: bfloat16 keeps 8 significant bits
      if p == "bfloat16" then
        assert.is_true((got - keel.matmul(a, b)):abs():max():item() > 1e-4)
      end
    end
    -- float64 never changes
    local a64, b64 = a:double(), b:double()
    local full = keel.matmul(a64, b64)
    keel.set_float32_matmul_precision("bfloat16")
    H.assert_close(keel.matmul(a64, b64), full:totable(), {atol = 0, rtol = 0})
  end)

  it("rounds transposed, batched and broadcast operands the same way", function()
    local a = H.t64({3, 6, 5}, -2, 2, 21):float():transpose(2, 3)   -- [3, 5, 6], a transposed view
    local b = H.t64({6, 4}, -2, 2, 22):float()                      -- broadcast over the batch
    assert.is_false(a:is_contiguous())
    keel.set_float32_matmul_precision("bfloat16")
    local got = keel.matmul(a, b)
    keel.set_float32_matmul_precision("highest")
    same(got, keel.matmul(rounded(a, "bfloat16"), rounded(b, "bfloat16")))
  end)

  it("float16 overflows past 65504 and keeps its subnormal steps", function()
    local a = keel.tensor({{70000, 1}, {3e-6, 1}})
    local b = keel.tensor({{1, 0}, {0, 1}})
    keel.set_float32_matmul_precision("float16")
    local r = keel.matmul(a, b):totable()
    assert.are.equal(math.huge, r[1][1])
    assert.are.equal(ROUND.float16(3e-6), r[2][1])
    assert.are_not.equal(3e-6, r[2][1])
    keel.set_float32_matmul_precision("bfloat16")
    assert.are.equal(ROUND.bfloat16(70000), keel.matmul(a, b):totable()[1][1])   -- float32's range
  end)

  it("applies to linear and conv2d, forward and backward", function()
    local x = H.t64({2, 3, 6, 5}, -1, 1, 31, {dtype = "float32"})
    local w = H.t64({4, 3, 3, 3}, -1, 1, 32, {dtype = "float32"})
    keel.set_float32_matmul_precision("bfloat16")
    local y = F.conv2d(x, w, nil, {padding = 1})
    y:sum():backward()
    keel.set_float32_matmul_precision("highest")
    local xr = rounded(x, "bfloat16"):requires_grad_(true)
    local wr = rounded(w, "bfloat16"):requires_grad_(true)
    local yr = F.conv2d(xr, wr, nil, {padding = 1})
    yr:sum():backward()   -- upstream ones: exact in every format
    same(y, yr, "conv2d forward")
    same(x.grad, xr.grad, "conv2d grad x")
    same(w.grad, wr.grad, "conv2d grad w")

    local xi = H.t64({3, 8}, -1, 1, 33):float()
    local lw = H.t64({5, 8}, -1, 1, 34):float()
    keel.set_float32_matmul_precision("tf32")
    local ly = F.linear(xi, lw)
    keel.set_float32_matmul_precision("highest")
    same(ly, F.linear(rounded(xi, "tf32"), rounded(lw, "tf32")), "linear")
  end)

  it("backward runs each product with the precision of its forward", function()
    local x = keel.tensor({{1.0001, 2.0002}})
    local w = keel.tensor({{1}, {1}}, {requires_grad = true})
    local y
    keel.amp.autocast("bfloat16", function() y = keel.matmul(x, w) end)
    assert.are.equal("highest", keel.get_float32_matmul_precision())
    y:sum():backward()   -- after the scope: still bfloat16 for this node
    H.assert_close(w.grad, {{ROUND.bfloat16(1.0001)}, {ROUND.bfloat16(2.0002)}}, {atol = 0, rtol = 0})
    -- and a product recorded outside a scope, backward run inside one, stays full precision
    local w2 = keel.tensor({{1}, {1}}, {requires_grad = true})
    local y2 = keel.matmul(x, w2)
    keel.amp.autocast("bfloat16", function() y2:sum():backward() end)
    H.assert_close(w2.grad, {{1.0001}, {2.0002}}, {atol = 0, rtol = 1e-7})
  end)
end)

describe("keel.amp.autocast", function()
  after_each(function() keel.set_float32_matmul_precision("highest") end)

  it("sets the precision for a function and returns its results", function()
    local seen, a, b = nil, nil, nil
    a, b = keel.amp.autocast("float16", function(u, v)
      seen = keel.get_float32_matmul_precision()
      return u + v, "x"
    end, 1, 2)
    assert.are.equal("float16", seen)
    assert.are.equal(3, a)
    assert.are.equal("x", b)
    assert.are.equal("highest", keel.get_float32_matmul_precision())
    keel.amp.autocast(nil, function() seen = keel.get_float32_matmul_precision() end)
    assert.are.equal("bfloat16", seen)   -- the default
  end)

  it("restores on error, and nests", function()
    local ok, err = pcall(keel.amp.autocast, "float16", function() error("boom", 0) end)
    assert.is_false(ok)
    assert.are.equal("boom", err)
    assert.are.equal("highest", keel.get_float32_matmul_precision())
    keel.amp.autocast("bfloat16", function()
      keel.amp.autocast("tf32", function() assert.are.equal("tf32", keel.get_float32_matmul_precision()) end)
      assert.are.equal("bfloat16", keel.get_float32_matmul_precision())
    end)
    assert.are.equal("highest", keel.get_float32_matmul_precision())
  end)

  it("works as a to-be-closed variable, and can be disabled", function()
    do
      local ac <close> = keel.amp.autocast({dtype = "float16"})
      assert.are.equal("float16", keel.get_float32_matmul_precision())
      assert.is_truthy(tostring(ac):find("float16", 1, true))
    end
    assert.are.equal("highest", keel.get_float32_matmul_precision())
    keel.amp.autocast({dtype = "float16", enabled = false}, function()
      assert.are.equal("highest", keel.get_float32_matmul_precision())
    end)
    local s = keel.amp.autocast("bfloat16")
    s:exit()
    s:exit()   -- once only
    assert.are.equal("highest", keel.get_float32_matmul_precision())
  end)

  it("rejects bad arguments with the function's name", function()
    H.assert_error_match(function() keel.amp.autocast("int8") end, "autocast: dtype must be")
    H.assert_error_match(function() keel.amp.autocast({dtyp = "float16"}) end, "autocast: unknown option \"dtyp\"")
    H.assert_error_match(function() keel.amp.autocast(3) end, "autocast: argument #1")
    H.assert_error_match(function() keel.amp.autocast("float16", 5) end, "autocast: argument #2")
    assert.are.equal("highest", keel.get_float32_matmul_precision())
  end)

  it("float16 autocast with a GradScaler trains where the products overflow unscaled", function()
    -- a linear model whose float16 products stay finite; the scaler's
    -- scale makes the gradient products overflow first, then backs off
    keel.manual_seed(3)
    local model = keel.nn.Linear(4, 1)
    local opt = keel.optim.SGD(model:parameters(), {lr = 0.05})
    local scaler = keel.amp.GradScaler({init_scale = 2 ^ 20})
    local x = keel.randn{16, 4}
    local y = x:sum(2, true)
    local first, last, skipped = nil, nil, 0
    for _ = 1, 60 do
      opt:zero_grad()
      local loss = keel.amp.autocast("float16", function() return F.mse_loss(model(x), y) end)
      scaler:scale(loss):backward()
      local r = scaler:step(opt)
      if r and r.reason == "overflow" then skipped = skipped + 1 end
      scaler:update()
      first = first or loss:item()
      last = loss:item()
    end
    assert.is_true(skipped >= 1, "expected the huge initial scale to overflow in float16")
    assert.is_true(scaler:get_scale() < 2 ^ 20)
    assert.is_true(last < first / 10, ("loss %g -> %g"):format(first, last))
  end)
end)

-- {====================================================================
-- The CPU's recurrent layers (engine/backend_cpu_rnn.c) under a reduced
-- precision: W_hh is rounded once per layer call and every step's
-- product uses that copy (the other operands are rounded per product).
-- =====================================================================

describe("recurrent layers under a reduced precision", function()
  after_each(function() keel.set_float32_matmul_precision("highest") end)

  local GATES = {lstm = 4, gru = 3, rnn_tanh = 1}
  local T, B, I, HS = 5, 3, 4, 6

  local function leaf(shape, seed, lo, hi)
    return H.t64(shape, lo or -1, hi or 1, seed, {dtype = "float32"})
  end

  -- the inputs of mode's layer op: x, h0, c0 (lstm; else false), wi, wh, bi, bh
  local function inputs(mode)
    local G = GATES[mode]
    return {leaf({T, B, I}, 1), leaf({B, HS}, 2), mode == "lstm" and leaf({B, HS}, 3) or false,
            leaf({G * HS, I}, 4, -0.6, 0.6), leaf({G * HS, HS}, 5, -0.6, 0.6), leaf({G * HS}, 6, -0.5, 0.5),
            leaf({G * HS}, 7, -0.5, 0.5)}
  end

  -- runs mode's layer on inp under precision p, forward and backward;
  -- returns the results and the gradients of every input
  local function run(mode, inp, p)
    local x, h0, c0, wi, wh, bi, bh = table.unpack(inp, 1, 7)
    local res
    keel.amp.autocast(p, function()
      if mode == "lstm" then
        res = {F.lstm_layer(x, h0, c0, wi, wh, bi, bh)}
      else
        res = {F[mode .. "_layer"](x, h0, wi, wh, bi, bh)}
      end
      local loss
      for k, y in ipairs(res) do
        local r = keel.tensor(H.nest(H.values(H.numel(y.shape), -1, 1, 50 + k), y.shape), {dtype = "float32"})
        local term = (y * r):sum()
        loss = loss and loss + term or term
      end
      loss:backward()
    end)
    local grads = {}
    for k, t in ipairs(inp) do if t then grads[#grads + 1] = t.grad:totable() end end
    return res, grads
  end

  -- the same leaves, fresh (no gradients), w_hh replaced by f(w_hh)
  local function again(inp, f)
    local o = {}
    for k, t in ipairs(inp) do
      o[k] = t and (k == 5 and f(t) or t:detach():clone()):requires_grad_(true)
    end
    return o
  end

  local function exact(a, b, msg)
    H.assert_close(a, type(b) == "table" and b or b:totable(), {atol = 0, rtol = 0}, msg)
  end

  it("give the bits of a W_hh rounded beforehand, forward and backward", function()
    for _, mode in ipairs {"lstm", "gru", "rnn_tanh"} do
      for _, p in ipairs {"bfloat16", "tf32", "float16"} do
        local inp = inputs(mode)
        local res, grads = run(mode, inp, p)
        local pre = again(inp, function(w) return rounded(w, p) end)
        local res2, grads2 = run(mode, pre, p)
        for k = 1, #res do exact(res[k], res2[k], mode .. " " .. p .. " result " .. k) end
        for k = 1, #grads do exact(grads[k], grads2[k], mode .. " " .. p .. " grad " .. k) end
        -- and the rounding is there: full precision differs
        local full = run(mode, again(inp, function(w) return w:detach():clone() end), "highest")
        if p == "bfloat16" then
          assert.is_true((full[1] - res[1]):abs():max():item() > 1e-4, mode .. ": bfloat16 had no effect")
        end
      end
    end
  end)

  it("a layer gives the bits of a loop over its cells (W_hh rounded per call either way)", function()
    -- x and W_ih are multiples of 1/8, so x W_ih^T is exact whichever way
    -- BLAS sums it (all steps in one product, or one step per call)
    local function dyadic(t)
      local v = H.flat(t:detach():totable())
      for k = 1, #v do v[k] = math.floor(v[k] * 8 + 0.5) / 8 end
      return keel.tensor(v, {dtype = "float32"}):reshape(t.shape)
    end
    for _, mode in ipairs {"lstm", "gru"} do
      local inp = inputs(mode)
      local x, h0, c0, wi, wh, bi, bh = dyadic(inp[1]), inp[2]:detach(), inp[3] and inp[3]:detach(),
                                        dyadic(inp[4]), inp[5]:detach(), inp[6]:detach(), inp[7]:detach()
      keel.set_float32_matmul_precision("bfloat16")
      local out = mode == "lstm" and F.lstm_layer(x, h0, c0, wi, wh, bi, bh) or F.gru_layer(x, h0, wi, wh, bi, bh)
      local h, c = h0, c0
      for t = 1, T do
        if mode == "lstm" then h, c = F.lstm_cell(x[t], h, c, wi, wh, bi, bh)
        else h = F.gru_cell(x[t], h, wi, wh, bi, bh) end
        exact(out[t], h, mode .. " step " .. t)
      end
    end
  end)

  it("an LSTM step multiplies by W_hh in its layout (against composed ops)", function()
    local x, h0, c0, wi, wh, bi, bh = table.unpack(inputs("lstm"), 1, 7)
    local function composed()
      local g = keel.matmul(x[1], wi:t()) + keel.matmul(h0, wh:t()) + bi + bh
      local i, f = g:narrow(2, 1, HS):sigmoid(), g:narrow(2, HS + 1, HS):sigmoid()
      local gg, o = g:narrow(2, 2 * HS + 1, HS):tanh(), g:narrow(2, 3 * HS + 1, HS):sigmoid()
      local cn = f * c0 + i * gg
      return o * cn:tanh()
    end
    keel.set_float32_matmul_precision("bfloat16")
    local _, hn = F.lstm_layer(x:narrow(1, 1, 1), h0, c0, wi, wh, bi, bh)
    local want = composed()
    keel.set_float32_matmul_precision("highest")
    H.assert_close(hn, want:totable(), {atol = 1e-5, rtol = 1e-5})
    -- the tolerance tells the formats apart
    local gap = (composed() - want):abs():max():item()
    assert.is_true(gap > 1e-4, ("bfloat16 vs full precision: %g"):format(gap))
  end)
end)

-- }====================================================================
