-- loss_spec.lua: the losses. Values and gradients against PyTorch for every
-- loss and option combination (tests/fixtures/act_ref.lua, from
-- act_ref.py), numerical stability, PyTorch's semantics spelt out on small
-- cases, the loss modules and aliases, and error messages. Gradient checks
-- are in tests/cases/act.lua (run by autograd_spec.lua).
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local F = nn.functional
local close = H.assert_close

local REF = dofile("tests/fixtures/act_ref.lua")

local function f64(d, rg) return keel.tensor(d, { dtype = "float64", requires_grad = rg }) end
local function i64(d) return keel.tensor(d, { dtype = "int64" }) end

-- {======================================================================
-- Fixture driver (shared shape with act_spec.lua): rebuilds the inputs
-- act_ref.py used from the same formula.
-- =======================================================================

local function val(k, seed, lo, hi)
  return lo + (hi - lo) * (((k * 7919 + seed * 104729) % 10007) / 10007)
end

-- target_dtype: the dtype of class-index targets ("int64" or a float one)
local function build(spec, dtype, requires_grad, target_dtype)
  local v = {}
  for k = 0, H.numel(spec.shape) - 1 do
    if spec.classes then
      v[k + 1] = (k * 3 + spec.seed) % spec.classes + 1
      if spec.ignore and k % spec.ignore[1] == 0 then v[k + 1] = spec.ignore[2] end
    else
      v[k + 1] = val(k, spec.seed, spec.lo, spec.hi)
    end
  end
  if spec.classes then return keel.tensor(H.nest(v, spec.shape), { dtype = target_dtype }) end
  return keel.tensor(H.nest(v, spec.shape), { dtype = dtype, requires_grad = requires_grad })
end

local TOL = { float64 = { atol = 1e-11, rtol = 1e-10 }, float32 = { atol = 5e-6, rtol = 5e-5 } }

local function check_case(c, dtype, target_dtype)
  local xs = {}
  for i, s in ipairs(c.inputs) do xs[i] = build(s, dtype, c.grad[i] ~= nil, target_dtype) end
  local opts = {}
  for k, v in pairs(c.opts) do opts[k] = type(v) == "table" and build(v, dtype, false) or v end
  local out = F[c.fn](xs[1], xs[2], opts)
  local what = c.label .. " (" .. dtype .. ", " .. target_dtype .. " targets)"
  assert.are.equal(dtype, out.dtype)
  close(out, H.nest(c.out, c.shape), TOL[dtype], what .. " values")
  local r = {}
  for k = 0, #c.out - 1 do r[k + 1] = val(k, 99, 0.5, 1.5) end
  (out * keel.tensor(H.nest(r, c.shape), { dtype = dtype })):sum():backward()
  for i, g in pairs(c.grad) do
    close(xs[i].grad, H.nest(g, c.inputs[i].shape), TOL[dtype], what .. " grad " .. i)
  end
end

-- }======================================================================

describe("losses match PyTorch", function()
  for _, c in ipairs(REF.losses) do
    it(c.label, function()
      check_case(c, "float64", "int64")
      check_case(c, "float32", "float32")
    end)
  end
end)

describe("loss semantics", function()
  it("cross_entropy is log_softmax + nll in one op", function()
    local x = H.t64({ 4, 3 }, -2, 2, 41)
    local t = i64 { 1, 3, 2, 3 }
    local ce = F.cross_entropy(x, t)
    assert.are.equal("cross_entropy", ce.grad_fn)
    close(ce, F.nll_loss(x:log_softmax(2), t):item(), 1e-14)
  end)

  it("mean with weights divides by the summed weights of kept targets", function()
    local x = f64 { { 0.0, 1.0, 2.0 }, { 1.0, 0.0, -1.0 }, { 0.5, 0.5, 0.5 } }
    local w = f64 { 2, 3, 5 }
    local t = i64 { 3, 1, 2 }
    local lp = x:log_softmax(2):totable()
    local num = -(5 * lp[1][3] + 2 * lp[2][1] + 3 * lp[3][2])
    close(F.cross_entropy(x, t, { weight = w }), num / 10, 1e-14)
    close(F.cross_entropy(x, t, { weight = w, reduction = "sum" }), num, 1e-14)
    -- the second target ignored: its weight leaves the divisor too
    close(F.cross_entropy(x, t, { weight = w, ignore_index = 1 }), (num + 2 * lp[2][1]) / 8, 1e-14)
    close(F.cross_entropy(x, t, { weight = w, ignore_index = 1, reduction = "none" }),
      { -5 * lp[1][3], 0, -3 * lp[3][2] }, 1e-14)
  end)

  it("label smoothing mixes in the uniform distribution, weighted like the targets", function()
    local x = f64 { { 0.0, 1.0, 2.0 }, { 1.0, 0.0, -1.0 } }
    local w = f64 { 2, 3, 5 }
    local t = i64 { 3, 1 }
    local e = 0.3
    local lp = x:log_softmax(2):totable()
    local nll = -(5 * lp[1][3] + 2 * lp[2][1])
    local smooth = 0
    for i = 1, 2 do for c = 1, 3 do smooth = smooth - ({ 2, 3, 5 })[c] * lp[i][c] end end
    close(F.cross_entropy(x, t, { weight = w, label_smoothing = e }), ((1 - e) * nll + e / 3 * smooth) / 7, 1e-14)
  end)

  it("class targets may be int64 or whole floats (1-based); ignore_index may be any integer", function()
    local x = H.t64({ 3, 4 }, -2, 2, 42, { requires_grad = false })
    local a = F.cross_entropy(x, i64 { 4, 1, 2 }):item()
    close(F.cross_entropy(x, keel.tensor { 4, 1, 2 }), a, 1e-14)
    close(F.cross_entropy(x, keel.tensor({ 4, 1, 2 }, { dtype = "float64" })), a, 1e-14)
    local kept = F.cross_entropy(x:narrow(1, 2, 2), i64 { 1, 2 }):item()
    close(F.cross_entropy(x, i64 { -100, 1, 2 }, { ignore_index = -100 }), kept, 1e-14)
    close(F.cross_entropy(x, i64 { 0, 1, 2 }, { ignore_index = 0 }), kept, 1e-14)
  end)

  it("all targets ignored: mean is NaN (0 / 0, as PyTorch), gradient 0", function()
    local x = H.t64({ 2, 3 }, -1, 1, 43)
    local l = F.cross_entropy(x, i64 { 2, 2 }, { ignore_index = 2 })
    assert.is_true(l:item() ~= l:item())
    l:backward()
    close(x.grad, { { 0, 0, 0 }, { 0, 0, 0 } }, 0)
  end)

  it("reduction none keeps the sample shape", function()
    local x = H.t64({ 2, 4, 3, 5 }, -1, 1, 44, { requires_grad = false })
    local t = keel.ones({ 2, 3, 5 }, { dtype = "int64" })
    H.assert_shape(F.cross_entropy(x, t, { reduction = "none" }), { 2, 3, 5 })
    H.assert_shape(F.nll_loss(x, t, "none"), { 2, 3, 5 })
    H.assert_shape(F.cross_entropy(x, x:softmax(2), { reduction = "none" }), { 2, 3, 5 })
    H.assert_shape(F.cross_entropy(x:select(1, 1):select(2, 1):select(2, 1), keel.tensor(2), "none"), {})
    H.assert_shape(F.mse_loss(x, x, "none"), { 2, 4, 3, 5 })
    H.assert_shape(F.mse_loss(x, x), {})
  end)

  it("smooth_l1 and huber differ by the factor beta = delta", function()
    local x = H.t64({ 10 }, -3, 3, 45, { requires_grad = false })
    local y = H.t64({ 10 }, -3, 3, 46, { requires_grad = false })
    local s = F.smooth_l1_loss(x, y, { beta = 0.7, reduction = "none" })
    close(F.huber_loss(x, y, { delta = 0.7, reduction = "none" }), (s * 0.7):totable(), 1e-14)
    close(F.smooth_l1_loss(x, y, { beta = 0 }), F.l1_loss(x, y):item(), 1e-14)
  end)

  it("gradients flow to the target of the regression losses", function()
    for _, fn in ipairs { "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy_with_logits" } do
      local x, y = H.t64({ 3 }, -1, 1, 47), H.t64({ 3 }, 0.1, 0.9, 48)
      F[fn](x, y):backward()
      assert.is_not_nil(y.grad, fn)
      if fn ~= "binary_cross_entropy_with_logits" then close(y.grad, (-x.grad):totable(), 1e-15) end
    end
  end)

  it("promote mixed float dtypes and keep float32", function()
    local a = keel.tensor { 1, 2 }
    local b = keel.tensor({ 1.5, 2.5 }, { dtype = "float64" })
    assert.are.equal("float64", F.mse_loss(a, b).dtype)
    assert.are.equal("float32", F.mse_loss(a, a).dtype)
    assert.are.equal("float32", F.cross_entropy(keel.tensor { { 1, 2 } }, keel.tensor { 1 }).dtype)
  end)
end)

describe("loss stability", function()
  it("bce_with_logits is finite at logits of +-100 (and +-1e4)", function()
    for _, dt in ipairs { "float32", "float64" } do
      local x = keel.tensor({ 100, -100, 100, -100, 1e4, -1e4 }, { dtype = dt, requires_grad = true })
      local y = keel.tensor({ 0, 1, 1, 0, 0, 1 }, { dtype = dt })
      local l = F.binary_cross_entropy_with_logits(x, y, "none")
      close(l, { 100, 100, 0, 0, 1e4, 1e4 }, { atol = 1e-30, rtol = 1e-7 })
      l:sum():backward()
      close(x.grad, { 1, -1, 0, 0, 1, -1 }, { atol = 1e-30, rtol = 1e-7 })
      local pw = keel.tensor({ 3, 3, 3, 3, 3, 3 }, { dtype = dt })
      close(F.binary_cross_entropy_with_logits(x, y, { pos_weight = pw, reduction = "none" }),
        { 100, 300, 0, 0, 1e4, 3e4 }, { atol = 1e-30, rtol = 1e-7 })
    end
  end)

  it("cross_entropy is finite for huge and -inf logits", function()
    for _, dt in ipairs { "float32", "float64" } do
      local x = keel.tensor({ { 1000, 0, -1000 }, { 0, 1000, 0 }, { 0, -math.huge, 0 } }, { dtype = dt, requires_grad = true })
      local l = F.cross_entropy(x, keel.tensor { 2, 2, 1 }, { reduction = "none" })
      close(l, { 1000, 0, math.log(2) }, 1e-6)
      l:sum():backward()
      close(x.grad, { { 1, -1, 0 }, { 0, 0, 0 }, { -0.5, 0, 0.5 } }, 1e-6)
      close(F.cross_entropy(x, keel.tensor { 1, 2, 3 }, { label_smoothing = 0 }), (0 + 0 + math.log(2)) / 3, 1e-6)
    end
  end)
end)

describe("loss modules", function()
  local x = H.t64({ 4, 3 }, -2, 2, 51, { requires_grad = false })
  local y = H.t64({ 4, 3 }, 0, 1, 52, { requires_grad = false })
  local t = i64 { 3, 1, 2, 2 }
  local w = f64 { 0.5, 2, 1 }

  it("compute their functional forms", function()
    close(nn.MSELoss()(x, y), F.mse_loss(x, y):item(), 0)
    close(nn.MSELoss { reduction = "sum" }(x, y), F.mse_loss(x, y, "sum"):item(), 0)
    close(nn.L1Loss { reduction = "none" }(x, y), F.l1_loss(x, y, "none"):totable(), 0)
    close(nn.SmoothL1Loss { beta = 0.5 }(x, y), F.smooth_l1_loss(x, y, { beta = 0.5 }):item(), 0)
    close(nn.HuberLoss { delta = 0.5 }(x, y), F.huber_loss(x, y, { delta = 0.5 }):item(), 0)
    close(nn.CrossEntropyLoss { weight = w, ignore_index = 1, label_smoothing = 0.1 }(x, t),
      F.cross_entropy(x, t, { weight = w, ignore_index = 1, label_smoothing = 0.1 }):item(), 0)
    close(nn.NLLLoss { weight = w, reduction = "sum" }(x, t), F.nll_loss(x, t, { weight = w, reduction = "sum" }):item(), 0)
    close(nn.BCEWithLogitsLoss { pos_weight = w }(x, y),
      F.binary_cross_entropy_with_logits(x, y, { pos_weight = w }):item(), 0)
  end)

  it("keep weight and pos_weight as buffers, converted by to()", function()
    local m = nn.CrossEntropyLoss { weight = keel.tensor { 1, 2, 3 } }
    assert.are.equal(0, #m:parameters())
    local sd = m:state_dict()
    close(sd.weight, { 1, 2, 3 }, 0)
    m:to("float64")
    assert.are.equal("float64", m.weight.dtype)
    local b = nn.BCEWithLogitsLoss { weight = keel.tensor { 1 }, pos_weight = keel.tensor { 2 } }
    local names = {}
    for name in b:named_buffers() do names[#names + 1] = name end
    assert.are.same({ "weight", "pos_weight" }, names)
    assert.are.same({}, (function() local n = {} for k in pairs(nn.MSELoss():state_dict()) do n[#n + 1] = k end return n end)())
  end)

  it("print like PyTorch's", function()
    assert.are.equal("MSELoss(reduction='mean')", tostring(nn.MSELoss()))
    assert.are.equal("SmoothL1Loss(beta=0.5, reduction='sum')", tostring(nn.SmoothL1Loss { beta = 0.5, reduction = "sum" }))
    assert.are.equal("HuberLoss(delta=1.0, reduction='mean')", tostring(nn.HuberLoss()))
    assert.are.equal("CrossEntropyLoss(ignore_index=1, label_smoothing=0.1, reduction='mean')",
      tostring(nn.CrossEntropyLoss { ignore_index = 1, label_smoothing = 0.1 }))
    assert.are.equal("CrossEntropyLoss(label_smoothing=0.0, reduction='mean')", tostring(nn.CrossEntropyLoss()))
  end)

  it("check their options", function()
    H.assert_error(function() nn.CrossEntropyLoss { reduction = "avg" } end,
      'CrossEntropyLoss: reduction must be "mean", "sum" or "none", got "avg"')
    H.assert_error(function() nn.CrossEntropyLoss { ignore_idx = 1 } end,
      "CrossEntropyLoss: unknown option 'ignore_idx' (expected ignore_index, label_smoothing, reduction, weight)")
    H.assert_error(function() nn.CrossEntropyLoss { label_smoothing = 2 } end,
      "CrossEntropyLoss: label_smoothing must be in [0, 1], got 2")
    H.assert_error(function() nn.CrossEntropyLoss { ignore_index = 1.5 } end,
      "CrossEntropyLoss: ignore_index: expected an integer, got 1.5")
    H.assert_error(function() nn.NLLLoss { weight = { 1, 2 } } end, "NLLLoss: weight: expected a keel.Tensor, got table")
    H.assert_error(function() nn.MSELoss { beta = 1 } end, "MSELoss: unknown option 'beta' (expected reduction)")
    H.assert_error(function() nn.HuberLoss { delta = 0 } end, "HuberLoss: delta must be > 0, got 0")
    H.assert_error(function() nn.SmoothL1Loss { beta = -1 } end, "SmoothL1Loss: beta must be >= 0, got -1")
    H.assert_error(function() nn.L1Loss("sum") end, "L1Loss: options: expected a table, got string")
  end)

  it("nn.cross_entropy and friends are nn.functional's; the DESIGN.md loop trains", function()
    for _, name in ipairs { "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "cross_entropy", "nll_loss",
                            "binary_cross_entropy_with_logits" } do
      assert.are.equal(F[name], nn[name], name)
    end
    keel.manual_seed(3)
    local model = nn.Sequential { nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3) }
    local xb = keel.randn { 16, 4 }
    local yb = keel.tensor { 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1 }
    local first, last
    for _ = 1, 30 do
      model:zero_grad()
      local loss = nn.cross_entropy(model(xb), yb)
      loss:backward()
      keel.no_grad(function()
        for _, p in ipairs(model:parameters()) do p:sub_(p.grad * 0.5) end
      end)
      first = first or loss:item()
      last = loss:item()
    end
    assert.is_true(last < first * 0.8, ("loss went from %g to %g"):format(first, last))
  end)
end)

describe("loss errors", function()
  local x = keel.zeros { 4, 10 }

  it("name a bad class label and the valid range", function()
    H.assert_error(function() F.cross_entropy(x, keel.tensor { 1, 2, 11, 3 }) end,
      "cross_entropy: target 11 out of range for 10 classes (expected 1..10)")
    H.assert_error(function() F.cross_entropy(x, i64 { 0, 2, 1, 3 }) end,
      "cross_entropy: target 0 out of range for 10 classes (expected 1..10)")
    H.assert_error(function() F.nll_loss(x, i64 { 1, 2, 3, -1 }, { ignore_index = 0 }) end,
      "nll_loss: target -1 out of range for 10 classes (expected 1..10)")
    H.assert_error(function() F.cross_entropy(x, keel.tensor { 1, 2.5, 1, 1 }) end,
      "cross_entropy: target 2.5 is not a class index (expected whole numbers)")
  end)

  it("name shape mismatches", function()
    H.assert_error(function() F.cross_entropy(x, keel.tensor { 1, 2, 3 }) end,
      "cross_entropy: target has shape [3], expected [4] (class indices) or the logits' shape [4,10] (probabilities)")
    H.assert_error(function() F.nll_loss(x, keel.zeros { 4, 10 }) end,
      "nll_loss: target has shape [4,10], expected [4] for input of shape [4,10]")
    H.assert_error(function() F.cross_entropy(x, keel.ones({ 4 }), { weight = keel.ones { 3 } }) end,
      "cross_entropy: weight has shape [3], expected [10] (one per class)")
    H.assert_error(function() F.cross_entropy(keel.tensor(1), keel.tensor(1)) end,
      "cross_entropy: logits must have a class dimension, got a 0-dimensional tensor")
    H.assert_error(function() F.mse_loss(keel.zeros { 3 }, keel.zeros { 3, 1 }) end,
      "mse_loss: target has shape [3,1], input has shape [3]; expected the same shape")
    H.assert_error(function() F.binary_cross_entropy_with_logits(keel.zeros { 4, 3 }, keel.zeros { 4, 3 },
      { weight = keel.ones { 5 } }) end,
      "binary_cross_entropy_with_logits: weight of shape [5] cannot be broadcast to the input's shape [4,3]")
    H.assert_error(function() F.binary_cross_entropy_with_logits(keel.zeros { 4, 3 }, keel.zeros { 4, 3 },
      { pos_weight = keel.ones { 4 } }) end,
      "binary_cross_entropy_with_logits: pos_weight of shape [4] cannot be broadcast to the input's shape [4,3]")
  end)

  it("name bad options", function()
    local t = keel.ones { 4 }
    H.assert_error(function() F.cross_entropy(x, t, { reduction = "avg" }) end,
      'cross_entropy: reduction must be "mean", "sum" or "none", got "avg"')
    H.assert_error(function() F.mse_loss(x, x, 1) end, "mse_loss: argument #3: expected an options table, got number")
    H.assert_error(function() F.l1_loss(x, x, { reduction = 2 }) end,
      'l1_loss: reduction must be "mean", "sum" or "none", got number')
    H.assert_error(function() F.cross_entropy(x, t, { ignore_idx = 3 }) end,
      "cross_entropy: unknown option 'ignore_idx' (expected weight, ignore_index, label_smoothing, reduction)")
    H.assert_error(function() F.cross_entropy(x, t, { ignore_index = 1.5 }) end,
      "cross_entropy: option ignore_index must be an integer, got number")
    H.assert_error(function() F.cross_entropy(x, t, { label_smoothing = 1.5 }) end,
      "cross_entropy: label_smoothing must be in [0, 1], got 1.5")
    H.assert_error(function() F.cross_entropy(x, t, { weight = { 1 } }) end,
      "cross_entropy: option weight must be a keel.Tensor, got table")
    H.assert_error(function() F.cross_entropy(x, keel.zeros { 4, 10 }, { ignore_index = 1 }) end,
      "cross_entropy: ignore_index cannot be used with probability targets")
    H.assert_error(function() F.smooth_l1_loss(x, x, { beta = -1 }) end,
      "smooth_l1_loss: beta must be >= 0 and finite, got -1")
    H.assert_error(function() F.huber_loss(x, x, { delta = 0 }) end, "huber_loss: delta must be > 0 and finite, got 0")
    H.assert_error(function() F.huber_loss(x, x, { delta = "1" }) end, "huber_loss: option delta must be a number, got string")
  end)

  it("refuse weights that require grad, and integer inputs", function()
    local w = keel.ones({ 10 }, { requires_grad = true })
    H.assert_error(function() F.cross_entropy(x, keel.ones { 4 }, { weight = w }) end,
      "cross_entropy: weight requires grad, but the loss is not differentiable in it; pass weight:detach()")
    local pw = keel.ones({ 3 }, { requires_grad = true })
    H.assert_error(function() F.binary_cross_entropy_with_logits(keel.zeros { 2, 3 }, keel.zeros { 2, 3 }, { pos_weight = pw }) end,
      "binary_cross_entropy_with_logits: pos_weight requires grad")
    keel.no_grad(function() F.cross_entropy(x, keel.ones { 4 }, { weight = w }) end)
    H.assert_error(function() F.cross_entropy(i64 { { 1, 2 } }, i64 { 1 }) end,
      "cross_entropy: expected a float32 or float64 tensor, got int64")
    H.assert_error(function() F.mse_loss(i64 { 1 }, i64 { 1 }) end, "mse_loss: expected a float32 or float64 tensor, got int64")
    H.assert_error(function() F.mse_loss(x, 1) end, "mse_loss: argument #2: expected a keel.Tensor, got number")
  end)
end)

describe("memory", function()
  it("losses and activations leave no tensor behind, on success and on error", function()
    local function live()
      collectgarbage()
      collectgarbage()
      return keel.memory_stats().live_tensors
    end
    local before = live()
    do
      local x = H.t64({ 3, 4 }, -1, 1, 61)
      local y = H.t64({ 3, 4 }, 0, 1, 62)
      local t = keel.tensor { 1, 4, 2 }
      local w = f64 { 1, 2, 3, 4 }
      local results = {
        F.mse_loss(x, y), F.l1_loss(x:t(), y:t()), F.smooth_l1_loss(x, y, { beta = 0.5 }),
        F.huber_loss(x, y, "sum"),
        F.cross_entropy(x, t, { weight = w, label_smoothing = 0.1, ignore_index = 4 }),
        F.cross_entropy(x, y, { reduction = "none" }):sum(),
        F.nll_loss(x:log_softmax(2), t, { weight = w }),
        F.binary_cross_entropy_with_logits(x, y, { weight = w, pos_weight = w }),
        F.gelu(x):sum(), F.softplus(x:t()):sum(), F.softmax(x:t(), 1):sum(), F.log_softmax(x, 1):sum(),
      }
      for _, l in ipairs(results) do l:backward() end
      local bad = {
        function() return F.cross_entropy(x, keel.tensor { 1, 9, 2 }) end,
        function() return F.cross_entropy(x, keel.tensor { 1, 1.5, 2 }) end,
        function() return F.nll_loss(x, i64 { 1, 2 }) end,
        function() return F.cross_entropy(x, t, { weight = f64 { 1, 2 } }) end,
        function() return F.cross_entropy(x, y, { ignore_index = 1 }) end,
        function() return F.binary_cross_entropy_with_logits(x, y, { weight = f64 { 1, 2 } }) end,
        function() return F.mse_loss(x, y:t()) end,
        function() return F.softmax(x, 5) end,
      }
      for i, fn in ipairs(bad) do assert.is_false(pcall(fn), "case " .. i .. " should fail") end
    end
    assert.are.equal(before, live())
  end)
end)
