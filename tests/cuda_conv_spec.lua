--
-- tests/cuda_conv_spec.lua: the CUDA kernels of kernels/conv.cu (conv2d,
-- max_pool2d, avg_pool2d, adaptive_avg_pool2d, forward and backward)
-- against the CPU backend, through tests/devcheck.lua: float32 and
-- float64, odd sizes over many blocks, batches of 1 and 3, several images
-- per im2col chunk, groups and depthwise, the direct 1x1 path, empty
-- batches, non-contiguous and broadcast inputs, NaN/Inf and ties in the
-- max pool, and a small CNN end to end. Skipped, visibly, without CUDA.
--
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local F = keel.nn.functional
local gpu_it = H.gpu_it(it, pending)

local DTYPES = {"float32", "float64"}

-- conv sums C*kh*kw products in another order than the CPU's BLAS
local CONV_TOL = {float32 = {atol = 1e-4, rtol = 1e-4}, float64 = {atol = 1e-11, rtol = 1e-10}}

-- A CPU input from explicit values (NaN, Inf, ties), requiring grad.
local function from(vals, shape, dtype)
  local t = keel.tensor(vals, {dtype = dtype, device = "cpu"}):reshape(shape)
  t:requires_grad_(true)
  return t
end

-- Values of D.input, rounded to multiples of 1/2: many ties.
local function ties(shape, dtype, seed)
  local v = H.values(H.numel(shape), -2, 2, seed or 5)
  for i = 1, #v do v[i] = math.floor(v[i] * 2) / 2 end
  return from(v, shape, dtype)
end

local function inp(shape, dtype, seed, grad)
  return D.input(shape, {dtype = dtype, seed = seed, grad = grad})
end

-- {======================================================================
-- conv2d
-- =======================================================================

-- name, x shape, w shape, opts, bias?
local CONV = {
  {"3x3 with bias, batch 3, odd size", {3, 3, 7, 9}, {4, 3, 3, 3}, {}, true},
  {"stride 2, padding 1, batch 1", {1, 3, 9, 11}, {5, 3, 3, 3}, {stride = 2, padding = 1}, true},
  {"padding 2", {3, 2, 6, 5}, {3, 2, 3, 3}, {padding = 2}, true},
  {"dilation 2", {2, 2, 9, 8}, {3, 2, 3, 3}, {dilation = 2, padding = 2}, true},
  {"stride/padding/dilation pairs, non-square kernel", {3, 2, 8, 9}, {3, 2, 2, 3},
   {stride = {2, 1}, padding = {1, 0}, dilation = {1, 2}}, true},
  {"groups 2, no bias", {3, 4, 7, 7}, {6, 2, 3, 3}, {groups = 2, padding = 1}, false},
  {"groups 2, batch 1 (batched over groups)", {1, 4, 7, 7}, {6, 2, 3, 3}, {groups = 2, padding = 1}, true},
  {"depthwise, batch 3", {3, 4, 9, 7}, {8, 1, 3, 3}, {groups = 4, padding = 1}, true},
  {"depthwise stride 2, batch 1", {1, 5, 9, 7}, {5, 1, 3, 3}, {groups = 5, padding = 1, stride = 2}, false},
  {"1x1 (no im2col), batch 3", {3, 5, 7, 9}, {4, 5, 1, 1}, {}, true},
  {"1x1 (no im2col), batch 1, no bias", {1, 5, 7, 9}, {4, 5, 1, 1}, {}, false},
  {"1x1 groups 3 (no im2col)", {3, 6, 5, 5}, {9, 2, 1, 1}, {groups = 3}, true},
  {"1x1 stride 2", {3, 3, 7, 8}, {4, 3, 1, 1}, {stride = 2}, true},
  {"1x1 padding 1", {2, 3, 5, 4}, {4, 3, 1, 1}, {padding = 1}, true},
  {"padding same, even kernel", {2, 2, 7, 6}, {3, 2, 4, 3}, {padding = "same"}, true},
  {"many blocks", {3, 5, 23, 21}, {7, 5, 3, 3}, {padding = 1}, true},
  {"kernel as large as the padded input", {3, 2, 3, 4}, {3, 2, 5, 6}, {padding = 1}, true},
  {"many images per chunk, tiny maps", {9, 2, 3, 3}, {3, 2, 3, 3}, {padding = 1}, true},
  -- the simulator's im2col chunks are 64 KiB: these run several chunks of several images
  {"several chunks of several images", {9, 2, 12, 12}, {3, 2, 3, 3}, {padding = 1}, true},
  {"several chunks, groups 2", {7, 4, 11, 12}, {4, 2, 3, 3}, {padding = 1, groups = 2}, true},
  {"1x1 (no im2col), several chunks", {9, 4, 16, 16}, {3, 4, 1, 1}, {}, true},
  -- few output channels over many images: the bias gradient splits each
  -- channel over blocks (kc_chan_split), maps below and above a block;
  -- totals past the simulator's 32-bit index limit (4096) take the
  -- 64-bit bias fill and transposes
  {"bias gradient split: 2 channels, 64 images", {64, 2, 10, 10}, {2, 2, 3, 3}, {padding = 1}, true},
  {"bias gradient split: 1 channel, maps past a block", {6, 1, 20, 20}, {1, 1, 3, 3}, {padding = 1}, true},
  {"1x1, chunks past the 32-bit index limit", {16, 8, 16, 16}, {8, 8, 1, 1}, {}, true},
  -- 1x1 output maps: the bias gradient sums columns (kc_chan_block),
  -- one and a half units of 32 channels whole, and 3 channels split
  {"1x1 output maps, 40 channels: bias gradient in columns", {5, 3, 3, 3}, {40, 3, 3, 3}, {}, true},
  {"1x1 output maps, 300 images: column bias gradient split", {300, 2, 2, 2}, {3, 2, 2, 2}, {}, true},
}

describe("cuda conv2d", function()
  for _, dtype in ipairs(DTYPES) do
    for k, c in ipairs(CONV) do
      local name, xs, ws, opts, bias = c[1], c[2], c[3], c[4], c[5]
      gpu_it(name .. " (" .. dtype .. ")", function()
        local ins = {inp(xs, dtype, 10 + k), inp(ws, dtype, 40 + k)}
        if bias then ins[3] = inp({ws[1]}, dtype, 70 + k) end
        D.check(function(x, w, b) return F.conv2d(x, w, b, opts) end, ins, {tol = CONV_TOL[dtype]})
      end)
    end

    gpu_it("unbatched CHW input (" .. dtype .. ")", function()
      D.check(function(x, w, b) return F.conv2d(x, w, b, {padding = 1}) end,
              {inp({3, 6, 7}, dtype, 1), inp({2, 3, 3, 3}, dtype, 2), inp({2}, dtype, 3)}, {tol = CONV_TOL[dtype]})
    end)

    -- inputs without requires_grad travel too, and get no gradient
    gpu_it("only the weight requires grad (" .. dtype .. ")", function()
      local x = inp({3, 2, 6, 7}, dtype, 4, false)
      D.check(function(x, w) return F.conv2d(x, w, nil, {padding = 1}) end, {x, inp({3, 2, 3, 3}, dtype, 5)},
              {tol = CONV_TOL[dtype]})
      D.check(function(x, w) return F.conv2d(x, w) end, {x, inp({3, 2, 1, 1}, dtype, 6)}, {tol = CONV_TOL[dtype]})
    end)

    gpu_it("only the input requires grad (" .. dtype .. ")", function()
      local w = inp({3, 2, 3, 3}, dtype, 7, false)
      D.check(function(x, w) return F.conv2d(x, w, nil, {stride = 2}) end, {inp({3, 2, 7, 8}, dtype, 8), w},
              {tol = CONV_TOL[dtype]})
      D.check(function(x, w) return F.conv2d(x, w) end, {inp({3, 2, 7, 8}, dtype, 8), inp({4, 2, 1, 1}, dtype, 9, false)},
              {tol = CONV_TOL[dtype]})
    end)

    gpu_it("only the bias requires grad (" .. dtype .. ")", function()
      local x, w = inp({3, 2, 6, 7}, dtype, 9, false), inp({3, 2, 3, 3}, dtype, 10, false)
      D.check(function(x, w, b) return F.conv2d(x, w, b) end, {x, w, inp({3}, dtype, 11)}, {tol = CONV_TOL[dtype]})
    end)

    gpu_it("non-contiguous input and weight (" .. dtype .. ")", function()
      D.check(function(x, w, b) return F.conv2d(x:transpose(3, 4), w:transpose(3, 4), b, {padding = 1}) end,
              {inp({3, 3, 9, 7}, dtype, 12), inp({4, 3, 2, 3}, dtype, 13), inp({4}, dtype, 14)},
              {tol = CONV_TOL[dtype]})
    end)

    gpu_it("broadcast (expanded) input (" .. dtype .. ")", function()
      D.check(function(x, w) return F.conv2d(x:expand({3, 2, 6, 7}), w, nil, {padding = 1}) end,
              {inp({1, 2, 6, 7}, dtype, 15), inp({3, 2, 3, 3}, dtype, 16)}, {tol = CONV_TOL[dtype]})
    end)

    gpu_it("empty batch (" .. dtype .. ")", function()
      D.check(function(x, w, b) return F.conv2d(x, w, b, {padding = 1}) end,
              {inp({0, 3, 5, 5}, dtype, 17), inp({4, 3, 3, 3}, dtype, 18), inp({4}, dtype, 19)})
      D.check(function(x, w, b) return F.conv2d(x, w, b) end,
              {inp({0, 3, 5, 5}, dtype, 17), inp({4, 3, 1, 1}, dtype, 18), inp({4}, dtype, 19)})
    end)

    gpu_it("NaN and Inf propagate (" .. dtype .. ")", function()
      local v = H.values(2 * 2 * 5 * 6, -1, 1, 20)
      v[3], v[40] = 0 / 0, math.huge
      local x = from(v, {2, 2, 5, 6}, dtype)
      D.check(function(x, w) return F.conv2d(x, w, nil, {padding = 1}) end, {x, inp({2, 2, 3, 3}, dtype, 21)},
              {tol = CONV_TOL[dtype], backward = false})
    end)
  end
end)

-- }======================================================================

-- {======================================================================
-- Pools
-- =======================================================================

local function maxpool(k, opts)
  return function(x)
    local o = {return_indices = true}
    for key, v in pairs(opts or {}) do o[key] = v end
    local y, idx = F.max_pool2d(x, k, o)
    return {y, idx}
  end
end

local function avgpool(k, opts) return function(x) return F.avg_pool2d(x, k, opts) end end
local function adaptive(size) return function(x) return F.adaptive_avg_pool2d(x, size) end end

-- name, f, x shape
local POOLS = {
  {"max 2x2, odd size, batch 3", maxpool(2), {3, 3, 7, 9}},
  {"max 2x2, batch 1", maxpool(2), {1, 2, 8, 6}},
  {"max 3x3 stride 2 padding 1 (overlapping)", maxpool(3, {stride = 2, padding = 1}), {3, 2, 9, 11}},
  {"max 3x3 stride 2 ceil_mode", maxpool(3, {stride = 2, ceil_mode = true}), {3, 2, 8, 10}},
  {"max dilation 2 padding 1", maxpool(3, {stride = 1, padding = 1, dilation = 2}), {2, 2, 9, 8}},
  {"max non-square, stride 1", maxpool({2, 3}, {stride = 1, padding = {1, 1}}), {3, 2, 6, 7}},
  {"max many blocks", maxpool(3, {stride = 2, padding = 1}), {3, 5, 33, 31}},
  {"avg 2x2", avgpool(2), {3, 3, 7, 9}},
  {"avg 3x3 stride 2 padding 1, count_include_pad", avgpool(3, {stride = 2, padding = 1}), {3, 2, 9, 11}},
  {"avg 3x3 stride 2 padding 1, without count_include_pad",
   avgpool(3, {stride = 2, padding = 1, count_include_pad = false}), {1, 2, 9, 11}},
  {"avg ceil_mode, count_include_pad", avgpool(3, {stride = 2, padding = 1, ceil_mode = true}), {3, 2, 8, 10}},
  {"avg ceil_mode, without count_include_pad",
   avgpool(2, {stride = 2, ceil_mode = true, count_include_pad = false}), {3, 2, 7, 9}},
  {"avg divisor_override", avgpool(3, {stride = 2, padding = 1, divisor_override = 5}), {3, 2, 9, 8}},
  {"avg stride 1 (overlapping), non-square", avgpool({3, 2}, {stride = 1, padding = {1, 1}}), {2, 3, 7, 6}},
  {"avg many blocks", avgpool(3, {stride = 2, padding = 1}), {3, 5, 33, 31}},
  {"adaptive to 1x1", adaptive(1), {3, 4, 7, 9}},
  {"adaptive to 3x4 from 7x10 (not divisible)", adaptive({3, 4}), {3, 2, 7, 10}},
  {"adaptive to 5x6 from 7x9", adaptive({5, 6}), {1, 2, 7, 9}},
  {"adaptive to a larger size (windows overlap)", adaptive({5, 7}), {3, 2, 3, 4}},
  {"adaptive identity", adaptive({6, 5}), {2, 2, 6, 5}},
}

describe("cuda pools", function()
  for _, dtype in ipairs(DTYPES) do
    for k, c in ipairs(POOLS) do
      gpu_it(c[1] .. " (" .. dtype .. ")", function()
        D.check(c[2], {inp(c[3], dtype, 100 + k)})
      end)
    end

    gpu_it("max with ties: the first position wins (" .. dtype .. ")", function()
      D.check(maxpool(2), {ties({3, 2, 8, 9}, dtype, 1)})
      D.check(maxpool(3, {stride = 1, padding = 1}), {ties({2, 2, 7, 6}, dtype, 2)})
    end)

    gpu_it("max with NaN and -Inf: NaN wins, the last one (" .. dtype .. ")", function()
      local shape = {2, 2, 6, 7}
      local v = H.values(H.numel(shape), -1, 1, 30)
      v[1], v[9], v[16], v[30] = 0 / 0, 0 / 0, -math.huge, math.huge
      for i = 43, 56 do v[i] = -math.huge end   -- whole windows of -Inf
      v[60] = 0 / 0
      D.check(maxpool(2), {from(v, shape, dtype)})
      D.check(maxpool(3, {stride = 2, padding = 1}), {from(v, shape, dtype)})
    end)

    gpu_it("avg with NaN and Inf (" .. dtype .. ")", function()
      local shape = {1, 2, 6, 7}
      local v = H.values(H.numel(shape), -1, 1, 31)
      v[2], v[20] = 0 / 0, math.huge
      D.check(avgpool(3, {stride = 2, padding = 1}), {from(v, shape, dtype)}, {backward = false})
      D.check(adaptive({2, 3}), {from(v, shape, dtype)}, {backward = false})
    end)

    gpu_it("non-contiguous and broadcast inputs (" .. dtype .. ")", function()
      D.check(function(x) return maxpool(2)(x:transpose(3, 4)) end, {inp({3, 2, 9, 7}, dtype, 32)})
      D.check(function(x) return F.avg_pool2d(x:expand({3, 2, 7, 9}), 3, {stride = 2, padding = 1}) end,
              {inp({1, 2, 7, 9}, dtype, 33)})
    end)

    gpu_it("unbatched CHW and empty batches (" .. dtype .. ")", function()
      D.check(maxpool(2), {inp({3, 7, 9}, dtype, 34)})
      D.check(maxpool(2), {inp({0, 3, 7, 9}, dtype, 35)})
      D.check(avgpool(3, {stride = 2, padding = 1}), {inp({0, 2, 7, 9}, dtype, 36)})
      D.check(adaptive({2, 2}), {inp({0, 2, 7, 9}, dtype, 37)})
    end)

    gpu_it("modules MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (" .. dtype .. ")", function()
      local m = keel.nn.MaxPool2d(3, {stride = 2, padding = 1})
      local a = keel.nn.AvgPool2d(2, {count_include_pad = false})
      local ad = keel.nn.AdaptiveAvgPool2d({3, false})
      D.check(function(x) return ad(a(m(x))) end, {inp({3, 3, 13, 15}, dtype, 38)})
    end)
  end
end)

-- }======================================================================

-- {======================================================================
-- A small CNN: conv-relu-pool-conv-relu-adaptive pool-linear
-- =======================================================================

describe("cuda small CNN", function()
  for _, dtype in ipairs(DTYPES) do
    for _, n in ipairs {1, 3} do
      gpu_it(("forward and backward, batch %d (%s)"):format(n, dtype), function()
        local function net(x, w1, b1, w2, w3, b3)
          local h = F.max_pool2d(F.conv2d(x, w1, b1, {padding = 1}):relu(), 2)
          h = F.adaptive_avg_pool2d(F.conv2d(h, w2, nil, {stride = 2, padding = 1}):relu(), {2, 2})
          return F.linear(h:reshape({n, 6 * 2 * 2}), w3, b3)
        end
        local ins = {inp({n, 3, 15, 13}, dtype, 50), inp({4, 3, 3, 3}, dtype, 51, nil),
                     inp({4}, dtype, 52), inp({6, 4, 3, 3}, dtype, 53), inp({5, 24}, dtype, 54),
                     inp({5}, dtype, 55)}
        local tol = dtype == "float32" and {atol = 5e-4, rtol = 5e-4} or CONV_TOL.float64
        D.check(net, ins, {tol = tol})
      end)
    end

    gpu_it("nn.Conv2d module moved to the device matches the CPU (" .. dtype .. ")", function()
      local conv = keel.nn.Conv2d(3, 4, 3, {stride = 2, padding = 1, dtype = dtype})
      local x = inp({3, 3, 9, 8}, dtype, 56, false)
      local y = conv(x)
      y:backward(keel.ones(y.shape, {dtype = dtype}))
      local gw, gb = conv.weight.grad:clone(), conv.bias.grad:clone()
      conv:zero_grad()
      conv:to("cuda")
      local yd = conv(x:to("cuda"))
      D.same_device(yd, "cuda")
      yd:backward(keel.ones(y.shape, {dtype = dtype, device = "cuda"}))
      local tol = CONV_TOL[dtype]
      H.assert_close(yd:cpu(), y:totable(), tol, "output")
      H.assert_close(conv.weight.grad:cpu(), gw:totable(), tol, "weight grad")
      H.assert_close(conv.bias.grad:cpu(), gb:totable(), tol, "bias grad")
    end)
  end
end)

-- }======================================================================
