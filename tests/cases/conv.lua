-- Gradient checks of conv2d and the 2-D pools (loaded by autograd_spec.lua):
-- float64 central differences over every element of every input. Shapes
-- are small; each case still reaches a distinct path of the kernels
-- (strides, padding, dilation, groups, 1x1, "same", ceil_mode, ...).
local env = ...
local T = env.T
local F = require("keel.core")._nn

local function conv(opts, no_bias)
  if no_bias then
    return function(x, w) return F.conv2d(x, w, nil, opts) end
  end
  return function(x, w, b) return F.conv2d(x, w, b, opts) end
end

local function xwb(xs, ws, seed, no_bias)
  return function()
    local t = { T(xs, -1, 1, seed), T(ws, -1, 1, seed + 1) }
    if not no_bias then t[3] = T({ ws[1] }, -1, 1, seed + 2) end
    return t
  end
end

local function pool(f, k, opts)
  return function(x) return f(x, k, opts) end
end

local function one(xs, seed)
  return function() return { T(xs, -1, 1, seed) } end
end

return {
  conv2d = {
    { "basic with bias", conv({}), xwb({ 2, 2, 5, 5 }, { 3, 2, 3, 3 }, 301) },
    { "stride 2, padding 1", conv({ stride = 2, padding = 1 }), xwb({ 1, 2, 6, 5 }, { 2, 2, 3, 3 }, 304) },
    { "dilation 2", conv({ dilation = 2, padding = 1 }), xwb({ 1, 2, 7, 7 }, { 2, 2, 3, 3 }, 307) },
    { "groups 2, no bias", conv({ groups = 2, padding = 1 }, true), xwb({ 2, 4, 4, 4 }, { 4, 2, 3, 3 }, 310, true) },
    { "non-square kernel, stride/padding/dilation pairs",
      conv({ stride = { 2, 1 }, padding = { 1, 0 }, dilation = { 1, 2 } }), xwb({ 1, 2, 6, 7 }, { 3, 2, 2, 3 }, 313) },
    { "1x1", conv({}), xwb({ 2, 3, 3, 3 }, { 2, 3, 1, 1 }, 316) },
    { "1x1 stride 2", conv({ stride = 2 }), xwb({ 1, 2, 5, 4 }, { 2, 2, 1, 1 }, 319) },
    { "padding same, even kernel", conv({ padding = "same" }), xwb({ 1, 2, 5, 4 }, { 2, 2, 4, 3 }, 322) },
    { "depthwise", conv({ groups = 3 }), xwb({ 1, 3, 4, 4 }, { 3, 1, 2, 2 }, 325) },
    { "several samples per GEMM", conv({ padding = 1 }), xwb({ 9, 1, 3, 3 }, { 2, 1, 3, 3 }, 328) },
    { "unbatched CHW input", conv({}), xwb({ 2, 4, 4 }, { 2, 2, 3, 3 }, 331) },
    { "only the weight requires grad", function(w)
        local x = T({ 2, 2, 4, 4 }, -1, 1, 334, { requires_grad = false })
        return F.conv2d(x, w, nil, { padding = 1 })
      end, function() return { T({ 3, 2, 3, 3 }, -1, 1, 335) } end },
    { "only the input requires grad", function(x)
        local w = T({ 3, 2, 3, 3 }, -1, 1, 336, { requires_grad = false })
        return F.conv2d(x, w, nil, { stride = 2 })
      end, function() return { T({ 2, 2, 5, 5 }, -1, 1, 337) } end },
    { "stacked convolutions", function(x, w1, w2)
        return F.conv2d(F.conv2d(x, w1, nil, { padding = 1 }):tanh(), w2, nil, { stride = 2 })
      end, function() return { T({ 1, 2, 5, 5 }, -1, 1, 338), T({ 3, 2, 3, 3 }, -1, 1, 339), T({ 2, 3, 2, 2 }, -1, 1, 340) } end },
  },
  max_pool2d = {
    { "kernel 2", pool(F.max_pool2d, 2), one({ 2, 2, 4, 4 }, 350) },
    { "kernel 3, stride 2, padding 1", pool(F.max_pool2d, 3, { stride = 2, padding = 1 }), one({ 1, 2, 5, 5 }, 351) },
    { "ceil_mode", pool(F.max_pool2d, 3, { stride = 2, ceil_mode = true }), one({ 1, 1, 6, 6 }, 352) },
    { "non-square with dilation",
      pool(F.max_pool2d, { 3, 2 }, { stride = { 2, 1 }, padding = { 1, 0 }, dilation = { 2, 1 } }), one({ 1, 2, 7, 5 }, 353) },
    { "overlapping windows", pool(F.max_pool2d, 3, { stride = 1 }), one({ 1, 1, 5, 5 }, 354) },
    { "unbatched CHW input", pool(F.max_pool2d, 2, { stride = 1 }), one({ 2, 3, 4 }, 355) },
  },
  avg_pool2d = {
    { "kernel 2", pool(F.avg_pool2d, 2), one({ 2, 2, 4, 4 }, 360) },
    { "kernel 3, stride 2, padding 1", pool(F.avg_pool2d, 3, { stride = 2, padding = 1 }), one({ 1, 2, 5, 5 }, 361) },
    { "count_include_pad false", pool(F.avg_pool2d, 3, { stride = 2, padding = 1, count_include_pad = false }),
      one({ 1, 2, 5, 5 }, 362) },
    { "ceil_mode, count_include_pad false",
      pool(F.avg_pool2d, 3, { stride = 2, padding = 1, ceil_mode = true, count_include_pad = false }), one({ 1, 1, 6, 6 }, 363) },
    { "non-square", pool(F.avg_pool2d, { 3, 2 }, { stride = { 1, 2 }, padding = { 1, 1 } }), one({ 1, 2, 5, 4 }, 364) },
    { "divisor_override", pool(F.avg_pool2d, 2, { padding = 1, divisor_override = 3 }), one({ 1, 1, 4, 4 }, 365) },
  },
  adaptive_avg_pool2d = {
    { "7x5 to 3x2", function(x) return F.adaptive_avg_pool2d(x, { 3, 2 }) end, one({ 1, 2, 7, 5 }, 370) },
    { "larger than the input", function(x) return F.adaptive_avg_pool2d(x, { 5, 4 }) end, one({ 1, 1, 3, 3 }, 371) },
    { "global", function(x) return F.adaptive_avg_pool2d(x, 1) end, one({ 2, 2, 3, 4 }, 372) },
    { "unbatched CHW input", function(x) return F.adaptive_avg_pool2d(x, { 2, 3 }) end, one({ 2, 5, 4 }, 373) },
  },
}
