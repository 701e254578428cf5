-- Gradcheck cases of the act area (loaded by tests/autograd_spec.lua): one
-- entry per op name, each a list of {label, fn, inputs-builder [, opts]}.
-- Inputs stay away from kinks (0 for leaky_relu/elu/l1, |d| = beta or
-- delta for smooth_l1/huber, beta x = threshold for softplus).
local env = ...
local T, i64, keel = env.T, env.i64, env.keel
local F = require("keel.core")._nn

local function f64(d, rg)
  return keel.tensor(d, { dtype = "float64", requires_grad = rg ~= false })
end
local function const(d) return f64(d, false) end

-- differences x - y on both sides of 0.5, 1 and 2, none near them
local X = { { 0.1, -0.3, 1.4, -2.9 }, { 0.75, -0.6, 2.6, 0.05 }, { -1.2, 1.7, -0.2, 3.5 } }
local Y = { { 0.0, 0.0, 0.0, 0.0 }, { 0.0, 0.2, 0.3, -0.15 }, { 0.4, -0.1, 0.15, 0.6 } }
local function xy() return { f64(X), f64(Y) } end

local function pointwise(fn, extra)
  local list = {}
  for _, red in ipairs { "mean", "sum", "none" } do
    local label = fn .. " " .. red .. (extra and (" " .. extra.label) or "")
    list[#list + 1] = { label, function(x, y)
      local o = { reduction = red }
      if extra then for k, v in pairs(extra.opts) do o[k] = v end end
      return F[fn](x, y, o)
    end, xy }
  end
  return list
end

local function concat(...)
  local out = {}
  for _, l in ipairs { ... } do for _, c in ipairs(l) do out[#out + 1] = c end end
  return out
end

-- class targets (float Lua numbers and int64)
local TGT = { 2, 5, 1, 3, 5, 4 }
local function logits() return { T({ 6, 5 }, -3, 3, 501) } end

local function ce_cases(fn)
  local list = {}
  for _, red in ipairs { "mean", "sum", "none" } do
    list[#list + 1] = { fn .. " " .. red, function(x)
      return F[fn](x, keel.tensor(TGT), { reduction = red })
    end, logits }
    list[#list + 1] = { fn .. " weight, int64 targets, " .. red, function(x)
      return F[fn](x, i64(TGT), { weight = const { 0.5, 1.5, 2, 0.25, 1 }, reduction = red })
    end, logits }
    list[#list + 1] = { fn .. " ignore_index 5 + weight " .. red, function(x)
      return F[fn](x, i64(TGT), { weight = const { 0.5, 1.5, 2, 0.25, 1 }, ignore_index = 5, reduction = red })
    end, logits }
    list[#list + 1] = { fn .. " ignore_index 0 (outside 1..C) " .. red, function(x)
      return F[fn](x, i64 { 2, 0, 1, 0, 5, 4 }, { ignore_index = 0, reduction = red })
    end, logits }
    list[#list + 1] = { fn .. " [N,C,d1,d2] weight ignore_index " .. red, function(x)
      local t = i64 { { { 1, 3 }, { 4, 2 }, { 2, 2 } }, { { 3, 1 }, { 4, 4 }, { 1, 3 } } }
      return F[fn](x, t, { weight = const { 1, 2, 0.5, 1.5 }, ignore_index = 3, reduction = red })
    end, function() return { T({ 2, 4, 3, 2 }, -3, 3, 502) } end }
  end
  list[#list + 1] = { fn .. " unbatched [C]", function(x)
    return F[fn](x, keel.tensor(3), { reduction = "none" })
  end, function() return { T({ 5 }, -3, 3, 503) } end }
  list[#list + 1] = { fn .. " strided input (transposed)", function(x)
    return F[fn](x:t(), keel.tensor(TGT))
  end, function() return { T({ 5, 6 }, -3, 3, 504) } end }
  return list
end

local ce = ce_cases("cross_entropy")
for _, red in ipairs { "mean", "sum", "none" } do
  ce[#ce + 1] = { "cross_entropy label_smoothing " .. red, function(x)
    return F.cross_entropy(x, keel.tensor(TGT), { label_smoothing = 0.1, reduction = red })
  end, logits }
  ce[#ce + 1] = { "cross_entropy label_smoothing weight ignore_index " .. red, function(x)
    return F.cross_entropy(x, i64(TGT), { label_smoothing = 0.25, weight = const { 0.5, 1.5, 2, 0.25, 1 },
                                          ignore_index = 1, reduction = red })
  end, logits }
  ce[#ce + 1] = { "cross_entropy probability targets " .. red, function(x, p)
    return F.cross_entropy(x, p, { reduction = red })
  end, function() return { T({ 6, 5 }, -3, 3, 505), T({ 6, 5 }, 0, 1, 506) } end }
  ce[#ce + 1] = { "cross_entropy probability targets [N,C,d] weight label_smoothing " .. red, function(x, p)
    return F.cross_entropy(x, p, { weight = const { 0.5, 1.5, 2 }, label_smoothing = 0.2, reduction = red })
  end, function() return { T({ 2, 3, 4 }, -3, 3, 507), T({ 2, 3, 4 }, 0, 1, 508) } end }
end

local bce = {}
for _, red in ipairs { "mean", "sum", "none" } do
  local function mk(label, opts)
    bce[#bce + 1] = { "bce_with_logits " .. label .. red, function(x, y)
      local o = { reduction = red }
      for k, v in pairs(opts()) do o[k] = v end
      return F.binary_cross_entropy_with_logits(x, y, o)
    end, function() return { T({ 4, 3 }, -5, 5, 509), T({ 4, 3 }, 0, 1, 510) } end }
  end
  mk("", function() return {} end)
  mk("weight [4,3] ", function() return { weight = T({ 4, 3 }, 0.2, 2, 511, { requires_grad = false }) } end)
  mk("pos_weight [3] ", function() return { pos_weight = const { 0.5, 2, 3 } } end)
  mk("weight [4,1] pos_weight [3] ", function()
    return { weight = const { { 1 }, { 0.5 }, { 2 }, { 1.5 } }, pos_weight = const { 0.5, 2, 3 } }
  end)
end

local function softmax_cases(fn)
  local list = {}
  for _, d in ipairs { 1, 2, 3, -1, -2 } do
    list[#list + 1] = { fn .. " [2,3,4] dim " .. d, function(x) return F[fn](x, d) end,
      function() return { T({ 2, 3, 4 }, -3, 3, 520 + d) } end }
  end
  list[#list + 1] = { fn .. " method, default last dim", function(x) return x[fn](x) end,
    function() return { T({ 3, 5 }, -3, 3, 527) } end }
  list[#list + 1] = { fn .. " strided (transposed) input", function(x) return F[fn](x:t(), 1) end,
    function() return { T({ 4, 3 }, -3, 3, 528) } end }
  list[#list + 1] = { fn .. " 1-d", function(x) return F[fn](x, 1) end,
    function() return { T({ 6 }, -5, 5, 529) } end }
  return list
end

return {
  leaky_relu = {
    { "leaky_relu default slope", function(x) return F.leaky_relu(x) end,
      function() return { T({ 3, 4 }, -2, 2, 530, { away = 0.1 }) } end },
    { "leaky_relu slope 0.2", function(x) return F.leaky_relu(x, 0.2) end,
      function() return { T({ 2, 3, 2 }, -2, 2, 531, { away = 0.1 }) } end },
    { "leaky_relu {negative_slope = -0.5}", function(x) return F.leaky_relu(x, { negative_slope = -0.5 }) end,
      function() return { T({ 6 }, -2, 2, 532, { away = 0.1 }) } end },
  },
  elu = {
    { "elu default alpha", function(x) return F.elu(x) end,
      function() return { T({ 3, 4 }, -3, 3, 533, { away = 0.1 }) } end },
    { "elu alpha 0.5", function(x) return F.elu(x, { alpha = 0.5 }) end,
      function() return { T({ 3, 4 }, -3, 3, 534, { away = 0.1 }) } end },
  },
  gelu = {
    { "gelu exact", function(x) return F.gelu(x) end, function() return { T({ 3, 4 }, -5, 5, 535) } end },
    { "gelu tanh", function(x) return F.gelu(x, { approximate = "tanh" }) end,
      function() return { T({ 3, 4 }, -5, 5, 536) } end },
  },
  silu = {
    { "silu", function(x) return F.silu(x) end, function() return { T({ 3, 4 }, -8, 8, 537) } end },
  },
  softplus = {
    { "softplus default", function(x) return F.softplus(x) end, function() return { T({ 3, 4 }, -8, 8, 538) } end },
    { "softplus beta 2 threshold 5 (both sides)", function(x) return F.softplus(x, { beta = 2, threshold = 5 }) end,
      function() return { f64 { -3, -1, 0.5, 2, 3, 4.5 } } end },
  },
  softmax = softmax_cases("softmax"),
  log_softmax = softmax_cases("log_softmax"),
  mse_loss = concat(pointwise("mse_loss"), {
    { "mse_loss strided input", function(x, y) return F.mse_loss(x:t(), y) end,
      function() return { T({ 4, 3 }, -1, 1, 540), T({ 3, 4 }, -1, 1, 541) } end },
  }),
  l1_loss = pointwise("l1_loss"),
  smooth_l1_loss = concat(pointwise("smooth_l1_loss"),
    pointwise("smooth_l1_loss", { label = "beta 0.5", opts = { beta = 0.5 } }),
    pointwise("smooth_l1_loss", { label = "beta 2", opts = { beta = 2 } }),
    pointwise("smooth_l1_loss", { label = "beta 0 (l1)", opts = { beta = 0 } })),
  huber_loss = concat(pointwise("huber_loss"),
    pointwise("huber_loss", { label = "delta 0.5", opts = { delta = 0.5 } }),
    pointwise("huber_loss", { label = "delta 2", opts = { delta = 2 } })),
  cross_entropy = ce,
  nll_loss = ce_cases("nll_loss"),
  binary_cross_entropy_with_logits = bce,
}
