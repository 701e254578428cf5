-- norm_spec.lua: batch/layer/group norm, dropout and embedding (functional
-- ops and modules): values and gradients against PyTorch (reference numbers
-- in tests/fixtures/norm_ref.lua, from tests/fixtures/norm_ref.py), running
-- statistics, dropout statistics, module state, and every error path.
-- Gradient checks are in tests/cases/norm.lua (run by autograd_spec.lua).
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local F = nn.functional
local close = H.assert_close
local T = H.t64
local REF = dofile("tests/fixtures/norm_ref.lua")

local TOL64 = { atol = 1e-10, rtol = 1e-10 }
local TOL32 = { atol = 2e-5, rtol = 2e-5 }

-- Inputs rebuilt exactly as the fixture script makes them.
local function X(shape, lo, hi, seed, dtype)
  return T(shape, lo, hi, seed, { dtype = dtype })
end
local function C(shape, lo, hi, seed, dtype)  -- constants: no grad
  return T(shape, lo, hi, seed, { dtype = dtype, requires_grad = false })
end
local function i64(d) return keel.tensor(d, { dtype = "int64" }) end

local function check_grads(ref, y, gy_seed, named, tol)
  y:backward(C(y.shape, -1, 1, gy_seed))
  for name, t in pairs(named) do close(t.grad, ref[name], tol, name) end
end

describe("batch_norm against PyTorch", function()
  it("training [N,C] with affine: output, grads, running stats", function()
    local ref = REF.bn_2d
    local x, w, b = X({ 4, 3 }, -2, 2, 1), X({ 3 }, 0.5, 1.5, 2), X({ 3 }, -0.5, 0.5, 3)
    local rm, rv = keel.zeros({ 3 }, { dtype = "float64" }), keel.ones({ 3 }, { dtype = "float64" })
    local y = F.batch_norm(x, rm, rv, w, b, true, 0.1, 1e-5)
    close(y, ref.y, TOL64)
    close(rm, ref.running_mean, TOL64)
    close(rv, ref.running_var, TOL64)
    assert.are.equal("batch_norm", y.grad_fn)
    check_grads(ref, y, 4, { gx = x, gw = w, gb = b }, TOL64)
  end)

  it("training [N,C,L] without affine, momentum 0.3", function()
    local ref = REF.bn_3d
    local x = X({ 3, 2, 5 }, -1, 3, 5)
    local rm, rv = keel.zeros({ 2 }, { dtype = "float64" }), keel.ones({ 2 }, { dtype = "float64" })
    local y = F.batch_norm(x, rm, rv, nil, nil, true, 0.3, 1e-5)
    close(y, ref.y, TOL64)
    close(rm, ref.running_mean, TOL64)
    close(rv, ref.running_var, TOL64)
    check_grads(ref, y, 6, { gx = x }, TOL64)
  end)

  it("training [N,C,H,W] with affine, no running stats, eps 1e-3", function()
    local ref = REF.bn_4d
    local x, w, b = X({ 2, 3, 4, 4 }, -2, 2, 7), X({ 3 }, 0.5, 1.5, 8), X({ 3 }, -0.5, 0.5, 9)
    local y = F.batch_norm(x, nil, nil, w, b, true, 0.1, 1e-3)
    close(y, ref.y, TOL64)
    check_grads(ref, y, 10, { gx = x, gw = w, gb = b }, TOL64)
  end)

  it("eval [N,C,H,W] with running stats: output and grads", function()
    local ref = REF.bn_eval
    local x, w, b = X({ 2, 3, 4, 4 }, -2, 2, 7), X({ 3 }, 0.5, 1.5, 8), X({ 3 }, -0.5, 0.5, 9)
    local rm, rv = C({ 3 }, -0.5, 0.5, 11), C({ 3 }, 0.5, 2, 12)
    local y = F.batch_norm(x, rm, rv, w, b, false)
    close(y, ref.y, TOL64)
    close(rm, H.flat(C({ 3 }, -0.5, 0.5, 11)), 0, "running_mean unchanged in eval")
    check_grads(ref, y, 13, { gx = x, gw = w, gb = b }, TOL64)
  end)

  it("float32: output close to the float64 reference", function()
    local x = C({ 2, 3, 4, 4 }, -2, 2, 7, "float32")
    local w, b = C({ 3 }, 0.5, 1.5, 8, "float32"), C({ 3 }, -0.5, 0.5, 9, "float32")
    local y = F.batch_norm(x, nil, nil, w, b, true, 0.1, 1e-3)
    assert.are.equal("float32", y.dtype)
    close(y, REF.bn_4d.y, TOL32)
    local rm, rv = C({ 3 }, -0.5, 0.5, 11, "float32"), C({ 3 }, 0.5, 2, 12, "float32")
    close(F.batch_norm(x, rm, rv, w, b, false), REF.bn_eval.y, TOL32)
  end)

  it("float32 gradients close to the float64 reference", function()
    local ref = REF.bn_2d
    local x = X({ 4, 3 }, -2, 2, 1, "float32")
    local w, b = X({ 3 }, 0.5, 1.5, 2, "float32"), X({ 3 }, -0.5, 0.5, 3, "float32")
    local y = F.batch_norm(x, nil, nil, w, b, true)
    y:backward(C({ 4, 3 }, -1, 1, 4, "float32"))
    close(x.grad, ref.gx, TOL32)
    close(w.grad, ref.gw, TOL32)
    close(b.grad, ref.gb, TOL32)
  end)

  for _, case in ipairs({ { "bn_module", 0.1 }, { "bn_module_cma", false } }) do
    local name, momentum = case[1], case[2]
    it(("BatchNorm2d over 3 training steps, then eval (momentum %s)"):format(tostring(momentum)), function()
      local ref = REF[name]
      local m = nn.BatchNorm2d(3, { momentum = momentum, dtype = "float64" })
      local y
      for step = 0, 2 do y = m(C({ 2, 3, 3, 3 }, -1, 2, 20 + step)) end
      close(y, ref.y_train3, TOL64)
      close(m.running_mean, ref.running_mean, TOL64)
      close(m.running_var, ref.running_var, TOL64)
      assert.are.equal(ref.num_batches_tracked, m.num_batches_tracked:item())
      assert.are.equal("int64", m.num_batches_tracked.dtype)
      m:eval()
      close(m(C({ 2, 3, 3, 3 }, -1, 2, 23)), ref.y_eval, TOL64)
      assert.are.equal(3, m.num_batches_tracked:item())
    end)
  end

  it("functional running stats: cumulative average with factor 1/k", function()
    local rm, rv = keel.zeros({ 3 }, { dtype = "float64" }), keel.ones({ 3 }, { dtype = "float64" })
    local xs = {}
    for k = 1, 3 do
      xs[k] = C({ 2, 3, 3, 3 }, -1, 2, 20 + k - 1)
      F.batch_norm(xs[k], rm, rv, nil, nil, true, 1 / k)
    end
    close(rm, REF.bn_module_cma.running_mean, TOL64)
    close(rv, REF.bn_module_cma.running_var, TOL64)
  end)
end)

describe("layer_norm and group_norm against PyTorch", function()
  it("layer_norm over the last dim", function()
    local ref = REF.ln_1
    local x, w, b = X({ 3, 4 }, -2, 2, 30), X({ 4 }, 0.5, 1.5, 31), X({ 4 }, -0.5, 0.5, 32)
    local y = F.layer_norm(x, 4, w, b, 1e-5)
    close(y, ref.y, TOL64)
    assert.are.equal("layer_norm", y.grad_fn)
    check_grads(ref, y, 33, { gx = x, gw = w, gb = b }, TOL64)
  end)

  it("layer_norm over the last two dims", function()
    local ref = REF.ln_2
    local x, w, b = X({ 2, 3, 4 }, -2, 2, 34), X({ 3, 4 }, 0.5, 1.5, 35), X({ 3, 4 }, -0.5, 0.5, 36)
    local y = F.layer_norm(x, { 3, 4 }, w, b)
    close(y, ref.y, TOL64)
    check_grads(ref, y, 37, { gx = x, gw = w, gb = b }, TOL64)
    H.assert_shape(w.grad, { 3, 4 })
  end)

  it("group_norm, 3 groups with affine", function()
    local ref = REF.gn_3d
    local x, w, b = X({ 2, 6, 5 }, -2, 2, 40), X({ 6 }, 0.5, 1.5, 41), X({ 6 }, -0.5, 0.5, 42)
    local y = F.group_norm(x, 3, w, b, 1e-5)
    close(y, ref.y, TOL64)
    assert.are.equal("group_norm", y.grad_fn)
    check_grads(ref, y, 43, { gx = x, gw = w, gb = b }, TOL64)
  end)

  it("group_norm [N,C,H,W], 2 groups, no affine", function()
    local ref = REF.gn_4d
    local x = X({ 2, 4, 2, 3 }, -2, 2, 44)
    local y = F.group_norm(x, 2)
    close(y, ref.y, TOL64)
    check_grads(ref, y, 45, { gx = x }, TOL64)
  end)

  it("float32 outputs", function()
    close(F.layer_norm(C({ 2, 3, 4 }, -2, 2, 34, "float32"), { 3, 4 }, C({ 3, 4 }, 0.5, 1.5, 35, "float32"),
      C({ 3, 4 }, -0.5, 0.5, 36, "float32")), REF.ln_2.y, TOL32)
    close(F.group_norm(C({ 2, 6, 5 }, -2, 2, 40, "float32"), 3, C({ 6 }, 0.5, 1.5, 41, "float32"),
      C({ 6 }, -0.5, 0.5, 42, "float32")), REF.gn_3d.y, TOL32)
  end)
end)

describe("embedding against PyTorch", function()
  it("output and weight gradient with repeated indices and padding_idx", function()
    local ref = REF.emb
    local w = X({ 5, 3 }, -1, 1, 50)
    local y = F.embedding(i64(ref.indices), w, ref.padding_idx)
    close(y, ref.y, TOL64)
    assert.are.equal("embedding", y.grad_fn)
    check_grads(ref, y, 51, { gw = w }, TOL64)
    -- the padding row is used by the output but gets exactly nothing
    close(w.grad:select(1, ref.padding_idx), { 0, 0, 0 }, 0)
  end)

  it("shape indices.shape + {D}; float, 0-d and list indices", function()
    local w = C({ 4, 2 }, -1, 1, 55)
    H.assert_shape(F.embedding(i64({ { { 1 }, { 2 } } }), w), { 1, 2, 1, 2 })
    close(F.embedding(keel.tensor({ 4, 1 }), w), { w:totable()[4], w:totable()[1] }, 0)
    close(F.embedding({ 2, 2 }, w), { w:totable()[2], w:totable()[2] }, 0)
    local y0 = F.embedding(keel.tensor(3, { dtype = "int64" }), w)
    close(y0, w:totable()[3], 0)
  end)

  it("float32 weight, non-contiguous weight, and a non-contiguous gradient", function()
    local w = keel.tensor({ { 1, 2, 3 }, { 4, 5, 6 } }, { dtype = "float32" })
    close(F.embedding({ 2, 1 }, w), { { 4, 5, 6 }, { 1, 2, 3 } }, 0)
    local wt = w:t()   -- [3, 2]
    close(F.embedding({ 3 }, wt), { { 3, 6 } }, 0)
    local p = keel.zeros({ 3, 2 }, { dtype = "float64", requires_grad = true })
    local y = F.embedding({ 1, 3, 1 }, p)           -- [3, 2]
    y:t():backward(keel.tensor({ { 1, 2, 3 }, { 4, 5, 6 } }, { dtype = "float64" }))
    close(p.grad, { { 4, 10 }, { 0, 0 }, { 2, 5 } }, 0)
  end)
end)

describe("dropout", function()
  it("zeroes about a fraction p and scales the rest by exactly 1/(1-p)", function()
    keel.manual_seed(2024)
    for _, p in ipairs({ 0.1, 0.5, 0.8 }) do
      local n = 40000
      local y = F.dropout(keel.ones({ n }), p, true)
      local zeros = y:eq(0):sum():item()
      assert.is_true(math.abs(zeros / n - p) < 0.015, ("p=%g: zeroed fraction %g"):format(p, zeros / n))
      local scale = 1 / (1 - p)
      local kept = y:ne(0)
      -- every kept value is the float32 scale; the mean stays near 1
      local dev = ((y - kept * scale):abs()):max():item()
      assert.is_true(dev <= 1e-6 * scale, "scale off by " .. dev)
      assert.is_true(math.abs(y:mean():item() - 1) < 0.05)
    end
  end)

  it("float64 keeps the scale to the last bit", function()
    local y = F.dropout(keel.ones({ 1000 }, { dtype = "float64" }), 0.3, true)
    for _, v in ipairs(y:totable()) do assert.is_true(v == 0 or v == 1 / 0.7) end
  end)

  it("is deterministic under manual_seed and differs between seeds", function()
    local x = keel.ones({ 200 })
    keel.manual_seed(5)
    local a = F.dropout(x, 0.5):totable()
    keel.manual_seed(5)
    local b = F.dropout(x, 0.5):totable()
    keel.manual_seed(6)
    local c = F.dropout(x, 0.5):totable()
    assert.are.same(a, b)
    assert.are_not.same(a, c)
  end)

  it("identity in eval and for p = 0; zeros for p = 1", function()
    local x = C({ 3, 4 }, -1, 1, 60)
    assert.are.same(x:totable(), F.dropout(x, 0.5, false):totable())
    assert.are.same(x:totable(), F.dropout(x, 0, true):totable())
    H.assert_all(F.dropout(x, 1, true), 0)
  end)

  it("backward multiplies by the same mask", function()
    local x = keel.ones({ 50 }, { dtype = "float64", requires_grad = true })
    local y = F.dropout(x, 0.4)
    assert.are.equal("dropout", y.grad_fn)
    y:sum():backward()
    close(x.grad, y:detach():totable(), 0)
  end)

  it("nn.Dropout follows train() / eval()", function()
    local d = nn.Dropout(0.5)
    local x = keel.ones({ 100 })
    assert.is_true(d(x):eq(0):sum():item() > 0)
    d:eval()
    H.assert_all(d(x), 1)
    assert.are.equal("Dropout(p=0.5)", tostring(d))
    assert.are.equal(0.5, nn.Dropout().p)
  end)
end)

describe("autograd and buffers", function()
  it("running-stat updates are not recorded and do not trip the in-place check", function()
    local x = X({ 4, 3 }, -2, 2, 70)
    local m = nn.BatchNorm1d(3, { dtype = "float64" })
    local y1 = m(x)
    local y2 = m(x * 2)                        -- updates the buffers again
    assert.is_false(m.running_mean.requires_grad)
    assert.is_nil(m.running_mean.grad_fn)
    ;(y1:sum() + y2:sum()):backward()         -- graph of y1 still valid
    assert.is_not_nil(x.grad)
    assert.is_not_nil(m.weight.grad)
  end)

  it("an eval output stays differentiable after a later training step", function()
    local m = nn.BatchNorm1d(3, { dtype = "float64" })
    local x = X({ 4, 3 }, -2, 2, 71)
    m:eval()
    local y = m(x)
    m:train()
    m(x * 3)                                   -- changes running_mean in place
    y:sum():backward()
    assert.is_not_nil(x.grad)
  end)

  it("the running-stat write bumps the buffer's version", function()
    local rm, rv = keel.zeros({ 3 }, { dtype = "float64" }), keel.ones({ 3 }, { dtype = "float64" })
    local a = keel.ones({ 3 }, { dtype = "float64", requires_grad = true })
    local z = a * rm                           -- saves rm for backward
    F.batch_norm(X({ 4, 3 }, -2, 2, 72), rm, rv, nil, nil, true)
    H.assert_error(function() z:sum():backward() end, "modified in place")
  end)

  it("weight and bias in another float dtype get gradients in their dtype", function()
    local x = X({ 4, 3 }, -2, 2, 73)
    local w = keel.ones({ 3 }, { requires_grad = true })
    local b = keel.zeros({ 3 }, { requires_grad = true })
    local y = F.batch_norm(x, nil, nil, w, b, true)
    assert.are.equal("float64", y.dtype)
    y:sum():backward()
    assert.are.equal("float32", w.grad.dtype)
    close(b.grad, { 4, 4, 4 }, 1e-6)
  end)

  it("no graph under no_grad; grads only where asked", function()
    local x = X({ 2, 4 }, -2, 2, 74)
    keel.no_grad(function() assert.is_nil(F.layer_norm(x, 4).grad_fn) end)
    local w = keel.ones({ 4 }, { dtype = "float64", requires_grad = true })
    local xc = C({ 2, 4 }, -2, 2, 74)
    F.layer_norm(xc, 4, w):sum():backward()
    assert.is_not_nil(w.grad)
    assert.is_nil(xc.grad)
  end)
end)

-- Reference normalisation composed from keel's own ops.
local function composed(x, dims, eps)
  local m = x:mean(dims, true)
  local v = x:var(dims, { correction = 0, keepdim = true })
  return (x - m) / (v + eps):sqrt()
end

describe("large shapes (kernel blocks and runs)", function()
  it("layer_norm over 3000 features and batch_norm with long rows match composed ops", function()
    local x = C({ 3, 3000 }, -3, 5, 80)
    close(F.layer_norm(x, 3000), composed(x, 2, 1e-5):totable(), 1e-9)
    local xb = C({ 3, 2, 1500 }, -3, 5, 81)
    close(F.batch_norm(xb, nil, nil, nil, nil, true), composed(xb, { 1, 3 }, 1e-5):totable(), 1e-9)
    local xg = C({ 2, 6, 700 }, -3, 5, 82)
    local ref = composed(xg:view(2, 3, 1400), 3, 1e-5):view(2, 6, 700)
    close(F.group_norm(xg, 3), ref:totable(), 1e-9)
    local x2 = C({ 3, 2400 }, -3, 5, 84)    -- [N, C]: runs span a group's channels
    local w2, b2 = C({ 2400 }, 0.5, 1.5, 85), C({ 2400 }, -1, 1, 86)
    local ref2 = composed(x2:view(3, 4, 600), 3, 1e-5):view(3, 2400) * w2 + b2
    close(F.group_norm(x2, 4, w2, b2), ref2:totable(), 1e-9)
  end)

  it("gradients over long rows match the gradients of the composed ops", function()
    local x, w, b = X({ 2, 2100 }, -3, 5, 87), X({ 2100 }, 0.5, 1.5, 88), X({ 2100 }, -1, 1, 89)
    local gy = C({ 2, 2100 }, -1, 1, 90)
    F.layer_norm(x, 2100, w, b):backward(gy)
    local gx, gw, gb = x.grad, w.grad, b.grad
    x.grad, w.grad, b.grad = nil, nil, nil
    ;(composed(x, 2, 1e-5) * w + b):backward(gy)
    close(gx, x.grad:totable(), 1e-9)
    close(gw, w.grad:totable(), 1e-9)
    close(gb, b.grad:totable(), 1e-9)
    local xb = X({ 3, 2, 1100 }, -3, 5, 91)
    local gyb = C({ 3, 2, 1100 }, -1, 1, 92)
    F.batch_norm(xb, nil, nil, nil, nil, true):backward(gyb)
    local gxb = xb.grad
    xb.grad = nil
    composed(xb, { 1, 3 }, 1e-5):backward(gyb)
    close(gxb, xb.grad:totable(), 1e-9)
  end)

  it("non-contiguous inputs give the contiguous result", function()
    local x = C({ 5, 4, 3 }, -2, 2, 83)
    local xt = x:transpose(1, 3):contiguous():transpose(1, 3)
    assert.is_false(xt:is_contiguous())
    close(F.batch_norm(xt, nil, nil, nil, nil, true), F.batch_norm(x, nil, nil, nil, nil, true):totable(), 1e-12)
    close(F.group_norm(xt, 2), F.group_norm(x, 2):totable(), 1e-12)
    close(F.layer_norm(xt, { 4, 3 }), F.layer_norm(x, { 4, 3 }):totable(), 1e-12)
  end)

  it("empty batches pass through", function()
    H.assert_shape(F.layer_norm(keel.zeros({ 0, 4 }), 4), { 0, 4 })
    H.assert_shape(F.group_norm(keel.zeros({ 0, 4, 2 }), 2), { 0, 4, 2 })
    H.assert_shape(F.embedding(keel.zeros({ 0 }, { dtype = "int64" }), keel.ones({ 3, 2 })), { 0, 2 })
  end)
end)

describe("modules", function()
  it("BatchNorm state_dict keys and defaults follow PyTorch", function()
    local m = nn.BatchNorm2d(4)
    local keys = {}
    for k in pairs(m:state_dict()) do keys[#keys + 1] = k end
    assert.are.same({ "weight", "bias", "running_mean", "running_var", "num_batches_tracked" }, keys)
    H.assert_all(m.weight, 1)
    H.assert_all(m.bias, 0)
    H.assert_all(m.running_mean, 0)
    H.assert_all(m.running_var, 1)
    assert.are.equal(0, m.num_batches_tracked:item())
    assert.are.same({}, m.num_batches_tracked.shape)
    assert.are.equal(2, #m:parameters())
    assert.are.equal(3, #m:buffers())
    assert.are.equal("BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=true, track_running_stats=true)", tostring(m))

    local seq = nn.Sequential { nn.Linear(3, 4), nn.BatchNorm1d(4) }
    local sk = {}
    for k in pairs(seq:state_dict()) do sk[#sk + 1] = k end
    assert.are.same({ "1.weight", "1.bias", "2.weight", "2.bias", "2.running_mean", "2.running_var",
      "2.num_batches_tracked" }, sk)
  end)

  it("BatchNorm without affine or running stats", function()
    local m = nn.BatchNorm1d(3, { affine = false, track_running_stats = false })
    assert.is_nil(m.weight)
    assert.is_nil(m.running_mean)
    local n = 0
    for _ in pairs(m:state_dict()) do n = n + 1 end
    assert.are.equal(0, n)
    m:eval()                                   -- batch statistics even in eval
    local y = m(C({ 4, 3, 2 }, -2, 2, 90, "float32"))
    close(y:mean({ 1, 3 }), { 0, 0, 0 }, 1e-6)
  end)

  it("BatchNorm state round-trips through load_state_dict", function()
    local a = nn.BatchNorm1d(3)
    a(C({ 5, 3 }, -2, 2, 91, "float32"))
    local b = nn.BatchNorm1d(3)
    b:load_state_dict(a:state_dict())
    close(b.running_mean, a.running_mean:totable(), 0)
    assert.are.equal(1, b.num_batches_tracked:item())
  end)

  it("BatchNorm checks input rank and channels", function()
    H.assert_error(function() nn.BatchNorm1d(3)(keel.zeros({ 2, 3, 4, 5 })) end,
      "BatchNorm1d: expected 2D or 3D input ([N, C] or [N, C, L]), got 4D input")
    H.assert_error(function() nn.BatchNorm2d(3)(keel.zeros({ 2, 3 })) end,
      "BatchNorm2d: expected 4D input ([N, C, H, W]), got 2D input")
    H.assert_error(function() nn.BatchNorm2d(3)(keel.zeros({ 2, 4, 2, 2 })) end,
      "BatchNorm2d: expected 3 channels (dimension 2 of the input), got input of shape {2, 4, 2, 2}")
    H.assert_error(function() nn.BatchNorm2d(3)("x") end, "BatchNorm2d: expected a keel.Tensor, got string")
    H.assert_error(function() nn.BatchNorm1d(0) end, "BatchNorm1d: num_features: expected a positive integer, got 0")
    H.assert_error(function() nn.BatchNorm1d(3, { momentum = 2 }) end,
      "BatchNorm1d: momentum: expected a number in [0, 1] or false (cumulative average), got 2")
    H.assert_error(function() nn.BatchNorm1d(3, { eps = -1 }) end, "BatchNorm1d: eps: expected a number >= 0, got -1")
    H.assert_error(function() nn.BatchNorm1d(3, 5) end, "BatchNorm1d: options: expected a table, got number")
  end)

  it("BatchNorm: train/eval switch statistics; to(float64) keeps the counter int64", function()
    local m = nn.BatchNorm1d(2)
    local x = C({ 6, 2 }, -2, 2, 92, "float32")
    m(x)
    m:eval()
    local y = m(x)
    local rm, rv = m.running_mean:totable(), m.running_var:totable()
    local xv = x:totable()
    for i = 1, 6 do
      for c = 1, 2 do
        assert.is_true(math.abs(y:get(i, c) - (xv[i][c] - rm[c]) / math.sqrt(rv[c] + 1e-5)) < 1e-5)
      end
    end
    m:to("float64")
    assert.are.equal("float64", m.running_mean.dtype)
    assert.are.equal("int64", m.num_batches_tracked.dtype)
    H.assert_shape(m(x:double()), { 6, 2 })
  end)

  it("LayerNorm and GroupNorm defaults, shapes and printing", function()
    local ln = nn.LayerNorm({ 3, 4 })
    H.assert_shape(ln.weight, { 3, 4 })
    H.assert_all(ln.weight, 1)
    H.assert_all(ln.bias, 0)
    local x = C({ 2, 3, 4 }, -2, 2, 93, "float32")
    close(ln(x), composed(x, { 2, 3 }, 1e-5):totable(), 1e-5)
    assert.are.equal("LayerNorm({3, 4}, eps=1e-05, elementwise_affine=true)", tostring(ln))
    assert.is_nil(nn.LayerNorm(4, { elementwise_affine = false }).weight)
    local keys = {}
    for k in pairs(nn.LayerNorm(4):state_dict()) do keys[#keys + 1] = k end
    assert.are.same({ "weight", "bias" }, keys)

    local gn = nn.GroupNorm(2, 4)
    H.assert_shape(gn.weight, { 4 })
    H.assert_all(gn.weight, 1)
    assert.are.equal("GroupNorm(2, 4, eps=1e-05, affine=true)", tostring(gn))
    H.assert_shape(gn(keel.randn({ 2, 4, 3, 3 })), { 2, 4, 3, 3 })
    assert.is_nil(nn.GroupNorm(2, 4, { affine = false }).weight)
    H.assert_error(function() nn.GroupNorm(3, 4) end, "GroupNorm: num_channels (4) must be divisible by num_groups (3)")
    H.assert_error(function() nn.LayerNorm({}) end,
      "LayerNorm: normalized_shape: expected a size or a non-empty table of sizes")
    H.assert_error(function() nn.LayerNorm(4)(keel.zeros({ 2, 3 })) end,
      "layer_norm: normalized_shape [4] does not match the last dimensions of the input of shape [2,3]")
  end)

  it("Embedding: N(0, 1) init with the padding row zeroed", function()
    keel.manual_seed(11)
    local e = nn.Embedding(1000, 20, { padding_idx = 7 })
    local w = e.weight
    H.assert_shape(w, { 1000, 20 })
    assert.is_true(w.requires_grad)
    H.assert_all(w:select(1, 7), 0)
    local mean, std = w:mean():item(), w:std():item()
    assert.is_true(math.abs(mean) < 0.02, "mean " .. mean)
    assert.is_true(math.abs(std - 1) < 0.02, "std " .. std)
    assert.are.equal("Embedding(1000, 20, padding_idx=7)", tostring(e))
    assert.are.equal(1000, nn.Embedding(1000, 2, { padding_idx = -1 }).padding_idx)
    local keys = {}
    for k in pairs(e:state_dict()) do keys[#keys + 1] = k end
    assert.are.same({ "weight" }, keys)
  end)

  it("Embedding forward/backward; from_pretrained", function()
    local e = nn.Embedding(4, 2, { padding_idx = 1, dtype = "float64" })
    local y = e(i64({ { 1, 2 }, { 2, 4 } }))
    H.assert_shape(y, { 2, 2, 2 })
    y:sum():backward()
    close(e.weight.grad, { { 0, 0 }, { 2, 2 }, { 0, 0 }, { 1, 1 } }, 0)

    local p = nn.Embedding.from_pretrained(keel.tensor({ { 1, 2 }, { 3, 4 } }))
    assert.is_false(p.weight.requires_grad)
    close(p({ 2 }), { { 3, 4 } }, 0)
    assert.is_true(nn.Embedding.from_pretrained(keel.ones({ 2, 2 }), { freeze = false }).weight.requires_grad)
    H.assert_error(function() nn.Embedding(4, 2, { padding_idx = 5 }) end,
      "Embedding: padding_idx must be within num_embeddings (1..4 or -4..-1), got 5")
    H.assert_error(function() nn.Embedding(4, 2, { padding_idx = 0 }) end, "Embedding: padding_idx must be within")
    H.assert_error(function() nn.Embedding(4, 2, { padding_idx = 1.5 }) end,
      "Embedding: padding_idx: expected an integer, got 1.5")
    H.assert_error(function() nn.Embedding.from_pretrained(keel.ones({ 2 })) end,
      "Embedding.from_pretrained: weight: expected a 2-D keel.Tensor")
  end)

  it("Dropout checks p", function()
    H.assert_error(function() nn.Dropout(1.5) end, "Dropout: dropout probability has to be between 0 and 1, got 1.5")
    H.assert_error(function() nn.Dropout("a") end, "Dropout: dropout probability has to be between 0 and 1, got a")
  end)
end)

describe("errors", function()
  local x = keel.zeros({ 4, 3 })
  local rm, rv = keel.zeros({ 3 }), keel.ones({ 3 })

  it("batch_norm", function()
    H.assert_error(function() F.batch_norm(keel.zeros({ 3 }), nil, nil, nil, nil, true) end,
      "batch_norm: expected an input of at least 2 dimensions [N, C, ...], got 1")
    H.assert_error(function() F.batch_norm(keel.zeros({ 4, 3 }, { dtype = "int64" }), rm, rv) end,
      "batch_norm: expected a float32 or float64 tensor, got int64")
    H.assert_error(function() F.batch_norm(x, rm, rv, keel.ones({ 4 })) end,
      "batch_norm: weight has shape [4] (4 elements), expected 3 elements")
    H.assert_error(function() F.batch_norm(x, rm, rv, nil, keel.ones({ 3 }, { dtype = "int64" })) end,
      "batch_norm: bias must be a float32 or float64 tensor, got int64")
    H.assert_error(function() F.batch_norm(x, keel.zeros({ 2 }), rv) end,
      "batch_norm: running_mean has shape [2] (2 elements), expected 3 elements")
    H.assert_error(function() F.batch_norm(x, rm, nil, nil, nil, true) end,
      "batch_norm: running_mean and running_var must be given together")
    H.assert_error(function() F.batch_norm(x, nil, nil, nil, nil, false) end,
      "batch_norm: running_mean and running_var are required when not training")
    H.assert_error(function() F.batch_norm(x, keel.zeros({ 3 }, { requires_grad = true }), rv, nil, nil, true) end,
      "batch_norm: running_mean and running_var must not require grad (they are buffers)")
    H.assert_error(function() F.batch_norm(x, rm, rv, nil, nil, true, 1.5) end,
      "batch_norm: momentum must be in [0, 1], got 1.5")
    H.assert_error(function() F.batch_norm(x, rm, rv, nil, nil, true, 0 / 0) end, "batch_norm: momentum must be in [0, 1]")
    H.assert_error(function() F.batch_norm(keel.zeros({ 1, 3 }), nil, nil, nil, nil, true) end,
      "batch_norm: expected more than 1 value per channel when training, got input of shape [1,3]")
    H.assert_error(function() F.batch_norm(x, rm, rv, nil, nil, true, 0.1, -1) end,
      "batch_norm: eps must be finite and >= 0, got -1")
    H.assert_error(function() F.batch_norm("x") end, "batch_norm: argument #1: expected a keel.Tensor, got string")
    H.assert_error(function() F.batch_norm(x, 1) end, "batch_norm: argument #2: expected a keel.Tensor, got number")
    H.assert_error(function() F.batch_norm(x, rm, rv, nil, nil, 1) end,
      "batch_norm: argument #6 (training): expected a boolean, got number")
    H.assert_error(function() F.batch_norm(x, rm, rv, nil, nil, true, "a") end,
      "batch_norm: argument #7 (momentum): expected a number, got string")
    -- the failed calls left the buffers untouched
    H.assert_all(rm, 0)
    H.assert_all(rv, 1)
  end)

  it("layer_norm", function()
    H.assert_error(function() F.layer_norm(x, { 3, 3 }) end,
      "layer_norm: normalized_shape [3,3] does not match the last dimensions of the input of shape [4,3]")
    H.assert_error(function() F.layer_norm(x, {}) end,
      "layer_norm: the normalized shape must have 1 to 2 dimensions for an input of shape [4,3], got 0")
    H.assert_error(function() F.layer_norm(x, 3, keel.ones({ 1, 3 })) end,
      "layer_norm: weight has shape [1,3], expected the normalized shape [3]")
    H.assert_error(function() F.layer_norm(x, 3, nil, keel.ones({ 4 })) end,
      "layer_norm: bias has shape [4] (4 elements), expected 3 elements")
    H.assert_error(function() F.layer_norm(x, 3, nil, nil, -0.5) end, "layer_norm: eps must be finite and >= 0, got -0.5")
    H.assert_error(function() F.layer_norm(x, "3") end,
      "layer_norm: argument #2 (normalized_shape): expected a size or a table of sizes, got string")
    H.assert_error(function() F.layer_norm(x, 2.5) end,
      "layer_norm: argument #2 (normalized_shape): expected an integer, got number")
    H.assert_error(function() F.layer_norm(keel.zeros({ 3 }, { dtype = "int64" }), 3) end,
      "layer_norm: expected a float32 or float64 tensor, got int64")
    H.assert_error(function() F.layer_norm(keel.tensor(1.0), 1) end,
      "layer_norm: expected an input of at least 1 dimensions, got 0")
  end)

  it("group_norm", function()
    local g = keel.zeros({ 2, 6, 3 })
    H.assert_error(function() F.group_norm(g, 4) end,
      "group_norm: 6 channels cannot be split into 4 groups (not divisible)")
    H.assert_error(function() F.group_norm(g, 0) end, "group_norm: number of groups must be >= 1, got 0")
    H.assert_error(function() F.group_norm(keel.zeros({ 6 }), 2) end,
      "group_norm: expected an input of at least 2 dimensions [N, C, ...], got 1")
    H.assert_error(function() F.group_norm(g, 2, keel.ones({ 3 })) end,
      "group_norm: weight has shape [3] (3 elements), expected 6 elements")
    H.assert_error(function() F.group_norm(g, 2, nil, nil, 1 / 0) end, "group_norm: eps must be finite and >= 0, got inf")
    H.assert_error(function() F.group_norm(g, 1.5) end, "group_norm: argument #2 (groups): expected an integer, got number")
  end)

  it("dropout", function()
    H.assert_error(function() F.dropout(x, -0.1) end, "dropout: probability must be in [0, 1], got -0.1")
    H.assert_error(function() F.dropout(x, 1.5) end, "dropout: probability must be in [0, 1], got 1.5")
    H.assert_error(function() F.dropout(x, 0 / 0) end, "dropout: probability must be in [0, 1]")
    H.assert_error(function() F.dropout(keel.zeros({ 2 }, { dtype = "int64" }), 0.5) end,
      "dropout: expected a float32 or float64 tensor, got int64")
    H.assert_error(function() F.dropout(x, "a") end, "dropout: argument #2 (p): expected a number, got string")
    H.assert_error(function() F.dropout(x, 0.5, 1) end, "dropout: argument #3 (training): expected a boolean, got number")
  end)

  it("embedding", function()
    local w = keel.ones({ 5, 2 })
    H.assert_error(function() F.embedding({ 1, 6 }, w) end,
      "embedding: index 6 out of range (expected 1..5 for 5 embeddings)")
    H.assert_error(function() F.embedding(i64({ { 2, 0 } }), w) end,
      "embedding: index 0 out of range (expected 1..5 for 5 embeddings)")
    H.assert_error(function() F.embedding(keel.tensor({ 1.5 }), w) end,
      "embedding: index values must be whole numbers, got 1.5")
    H.assert_error(function() F.embedding({ 1 }, keel.ones({ 5 })) end,
      "embedding: weight must be 2-D [num_embeddings, embedding_dim], got 1 dimensions")
    H.assert_error(function() F.embedding({ 1 }, keel.ones({ 5, 2 }, { dtype = "int64" })) end,
      "embedding: expected a float32 or float64 tensor, got int64")
    H.assert_error(function() F.embedding({ 1 }, w, 6) end,
      "embedding: padding_idx 6 out of range (expected 1..5, or -5..-1 from the end)")
    H.assert_error(function() F.embedding({ 1 }, w, -6) end, "embedding: padding_idx -6 out of range")
    H.assert_error(function() F.embedding({ 1 }, w, 0) end, "embedding: padding_idx 0 out of range")
    H.assert_error(function() F.embedding(keel.zeros({ 1, 1, 1, 1, 1, 1, 1, 1 }, { dtype = "int64" }), w) end,
      "embedding: indices have 8 dimensions, at most 7 allowed")
    H.assert_error(function() F.embedding("a", w) end,
      "embedding: argument #1 (indices): expected an index tensor or a table of integers, got string")
    H.assert_error(function() F.embedding({ 1, "a" }, w) end, "embedding: argument #1 (indices): element 2 is not a number")
    H.assert_error(function() F.embedding({ 1 }, w, 1.5) end,
      "embedding: argument #3 (padding_idx): expected an integer, got number")
  end)
end)
