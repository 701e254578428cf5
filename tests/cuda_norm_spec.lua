--
-- tests/cuda_norm_spec.lua: the CUDA normalisation and dropout kernels
-- (kernels/norm.cu) against the CPU, through the Lua API: batch norm
-- (train with running statistics, eval), layer norm and group norm,
-- forward and backward (input, weight and bias gradients), float32 and
-- float64, odd sizes, with and without affine parameters, modules moved to
-- the device. Dropout masks come from another generator on the device, so
-- they are checked by their statistics, not against the CPU.
--
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local nn = keel.nn
local F = nn.functional
local gpu_it = H.gpu_it(it, pending)

local FLOATS = {"float32", "float64"}

describe("cuda batch_norm", function()
  for _, dt in ipairs(FLOATS) do
    -- [N, C], [N, C, L] with L below and above a block, [N, C, H, W]
    for _, shape in ipairs({{37, 5}, {9, 7, 3}, {3, 4, 301}, {4, 3, 5, 7}}) do
      local name = table.concat(shape, "x")
      gpu_it("training with affine and running stats, " .. name .. " " .. dt, function()
        D.check_batch_norm_train(shape, dt, 11)
      end)
      gpu_it("training without affine, no running stats, " .. name .. " " .. dt, function()
        D.check(function(a) return F.batch_norm(a, nil, nil, nil, nil, true, 0.1, 1e-3) end,
                {D.input(shape, dt, {seed = 21})})
      end)
      gpu_it("eval with running stats: output and grads, " .. name .. " " .. dt, function()
        local C = shape[2]
        D.check(function(a, ww, bb, m, v) return F.batch_norm(a, m, v, ww, bb, false) end,
                {D.input(shape, dt, {seed = 31}), D.input({C}, dt, {seed = 32}), D.input({C}, dt, {seed = 33}),
                 D.input({C}, dt, {grad = false, seed = 34}),
                 D.input({C}, dt, {grad = false, lo = 0.5, hi = 2, seed = 35})})
      end)
    end
    -- few channels over long runs: each channel splits over blocks with
    -- ordered partials (kc_chan_split): runs of 1, below a block (index
    -- division) and past one (slices ending mid-row)
    for _, shape in ipairs({{5000, 1}, {50, 2, 37}, {9, 2, 601}}) do
      local name = table.concat(shape, "x")
      gpu_it("channels split over blocks, " .. name .. " " .. dt, function()
        local C = shape[2]
        local function bn(a, ww, bb, m, v)
          local y = F.batch_norm(a, m, v, ww, bb, true, 0.1, 1e-5)
          return {y, m * 1, v * 1}
        end
        local ins = {D.input(shape, dt, {seed = 41}), D.input({C}, dt, {lo = 0.5, hi = 1.5, seed = 42}),
                     D.input({C}, dt, {seed = 43}), D.input({C}, dt, {grad = false, seed = 44}),
                     D.input({C}, dt, {grad = false, lo = 0.5, hi = 2, seed = 45})}
        D.check(bn, ins)
        -- eval, input gradient only: no sums needed
        D.check(function(a, m, v) return F.batch_norm(a, m, v, nil, nil, false) end,
                {D.input(shape, dt, {seed = 46}), ins[4], ins[5]})
        -- the same result twice, to the bit: no atomics, a fixed order
        local xd = D.input(shape, dt, {seed = 47, grad = false}):to("cuda")
        local y1 = F.batch_norm(xd, nil, nil, nil, nil, true):cpu():totable()
        local y2 = F.batch_norm(xd, nil, nil, nil, nil, true):cpu():totable()
        assert.same(y1, y2)
      end)
    end
    gpu_it("a large batch: [2049, 3] and [64, 3, 1025], " .. dt, function()
      D.check(function(a) return F.batch_norm(a, nil, nil, nil, nil, true) end, {D.input({2049, 3}, dt)})
      D.check(function(a) return F.batch_norm(a, nil, nil, nil, nil, true) end, {D.input({64, 3, 1025}, dt)})
    end)
  end
  gpu_it("nn.BatchNorm2d on the device: 3 training steps, then eval", function()
    local mc = nn.BatchNorm2d(3, {dtype = "float64"})
    local md = nn.BatchNorm2d(3, {dtype = "float64"}):to("cuda")
    for step = 1, 3 do
      local x = D.input({2, 3, 5, 4}, "float64", {grad = false, seed = 40 + step})
      H.assert_close(md(x:to("cuda")):cpu(), mc(x):totable(), D.tol.float64, "train step " .. step)
    end
    H.assert_close(md.running_mean:cpu(), mc.running_mean:totable(), D.tol.float64, "running_mean")
    H.assert_close(md.running_var:cpu(), mc.running_var:totable(), D.tol.float64, "running_var")
    mc:eval()
    md:eval()
    local x = D.input({2, 3, 5, 4}, "float64", {grad = false, seed = 50})
    H.assert_close(md(x:to("cuda")):cpu(), mc(x):totable(), D.tol.float64, "eval")
  end)
  gpu_it("nn.BatchNorm1d on [N, C] float32", function()
    local mc, md = nn.BatchNorm1d(6), nn.BatchNorm1d(6):to("cuda")
    local x = D.input({33, 6}, "float32", {grad = false})
    H.assert_close(md(x:to("cuda")):cpu(), mc(x):totable(), D.tol.float32, "train")
    H.assert_close(md.running_var:cpu(), mc.running_var:totable(), D.tol.float32, "running_var")
  end)
end)

describe("cuda layer_norm", function()
  for _, dt in ipairs(FLOATS) do
    -- normalized over the last dim (short and longer than a block) or the last two
    for _, c in ipairs({{{6, 7}, 7}, {{5, 1000}, 1000}, {{3, 5, 77}, {5, 77}}, {{4, 3}, 3}}) do
      local shape, ns = c[1], c[2]
      local name = table.concat(shape, "x")
      gpu_it("with affine, " .. name .. " " .. dt, function()
        local wshape = type(ns) == "table" and ns or {ns}
        D.check(function(a, w, b) return F.layer_norm(a, ns, w, b, 1e-5) end,
                {D.input(shape, dt, {seed = 61}), D.input(wshape, dt, {lo = 0.5, hi = 1.5, seed = 62}),
                 D.input(wshape, dt, {seed = 63})})
      end)
      gpu_it("without affine, " .. name .. " " .. dt, function()
        D.check(function(a) return F.layer_norm(a, ns) end, {D.input(shape, dt, {seed = 64})})
      end)
    end
    -- few rows, long ones: each row's statistics split over blocks (kc_chan_split)
    gpu_it("few long rows split over blocks: [2, 5000] and [3, 4, 700], " .. dt, function()
      D.check(function(a, w, b) return F.layer_norm(a, 5000, w, b) end,
              {D.input({2, 5000}, dt, {seed = 65}), D.input({5000}, dt, {lo = 0.5, hi = 1.5, seed = 66}),
               D.input({5000}, dt, {seed = 67})})
      D.check(function(a) return F.layer_norm(a, {4, 700}) end, {D.input({3, 4, 700}, dt, {seed = 68})})
    end)
    gpu_it("many rows: [3001, 24], " .. dt, function()
      D.check(function(a, w, b) return F.layer_norm(a, 24, w, b) end,
              {D.input({3001, 24}, dt), D.input({24}, dt, {seed = 2}), D.input({24}, dt, {seed = 3})})
    end)
  end
  gpu_it("nn.LayerNorm module on the device", function()
    local mc, md = nn.LayerNorm(10), nn.LayerNorm(10):to("cuda")
    local x = D.input({4, 3, 10}, "float32", {grad = false})
    H.assert_close(md(x:to("cuda")):cpu(), mc(x):totable(), D.tol.float32)
  end)
end)

describe("cuda group_norm", function()
  for _, dt in ipairs(FLOATS) do
    for _, c in ipairs({{{2, 6, 5}, 3}, {{3, 4, 7, 9}, 2}, {{2, 8, 300}, 4}, {{5, 6}, 3}, {{2, 6, 11}, 1}, {{2, 6, 11}, 6}}) do
      local shape, g = c[1], c[2]
      local name = table.concat(shape, "x") .. " groups " .. g
      gpu_it("with affine, " .. name .. " " .. dt, function()
        local C = shape[2]
        D.check(function(a, w, b) return F.group_norm(a, g, w, b, 1e-5) end,
                {D.input(shape, dt, {seed = 71}), D.input({C}, dt, {lo = 0.5, hi = 1.5, seed = 72}),
                 D.input({C}, dt, {seed = 73})})
      end)
      gpu_it("without affine, " .. name .. " " .. dt, function()
        D.check(function(a) return F.group_norm(a, g) end, {D.input(shape, dt, {seed = 74})})
      end)
    end
    -- few samples, long groups: statistics split over blocks, runs below
    -- a block (index division) and past one (slices ending mid-row)
    for _, c in ipairs({{{2, 12, 200}, 2}, {{2, 6, 700}, 3}}) do
      local shape, g = c[1], c[2]
      gpu_it(("few long groups split over blocks: %s groups %d, %s"):format(table.concat(shape, "x"), g, dt),
             function()
        local C = shape[2]
        D.check(function(a, w, b) return F.group_norm(a, g, w, b, 1e-5) end,
                {D.input(shape, dt, {seed = 75}), D.input({C}, dt, {lo = 0.5, hi = 1.5, seed = 76}),
                 D.input({C}, dt, {seed = 77})})
        D.check(function(a) return F.group_norm(a, g) end, {D.input(shape, dt, {seed = 78})})
      end)
    end
    gpu_it("a large batch splits the weight gradients: [300, 4, 3], " .. dt, function()
      D.check(function(a, w, b) return F.group_norm(a, 2, w, b) end,
              {D.input({300, 4, 3}, dt), D.input({4}, dt, {seed = 5}), D.input({4}, dt, {seed = 6})})
    end)
  end
  gpu_it("nn.GroupNorm module on the device", function()
    local mc, md = nn.GroupNorm(2, 6), nn.GroupNorm(2, 6):to("cuda")
    local x = D.input({3, 6, 4, 5}, "float32", {grad = false})
    H.assert_close(md(x:to("cuda")):cpu(), mc(x):totable(), D.tol.float32)
  end)
end)

describe("cuda dropout", function()
  -- A binomial count's bound: 6 standard deviations.
  local function within(zeros, n, p)
    return math.abs(zeros - n * p) <= 6 * math.sqrt(n * p * (1 - p)) + 1
  end

  for _, dt in ipairs(FLOATS) do
    gpu_it("zeroes a fraction p, scales the rest by exactly 1/(1-p), " .. dt, function()
      keel.manual_seed(2024)
      local n = 100003
      for _, p in ipairs({0.1, 0.5, 0.8}) do
        local y = F.dropout(keel.ones({n}, {dtype = dt, device = "cuda"}), p, true)
        D.same_device(y, "cuda")
        local scale = dt == "float32" and keel.tensor({1 / (1 - p)}):item() or 1 / (1 - p)
        local zeros = 0
        for _, v in ipairs(y:cpu():totable()) do
          if v == 0 then zeros = zeros + 1
          elseif v ~= scale then H.fail(("p=%g: kept value %.17g, expected %.17g"):format(p, v, scale)) end
        end
        assert.is_true(within(zeros, n, p), ("p=%g: %d zeros of %d"):format(p, zeros, n))
      end
    end)
  end

  gpu_it("the mask has no pattern: halves, odd/even positions and runs", function()
    keel.manual_seed(9)
    local n = 40000
    local y = F.dropout(keel.ones({n}, {device = "cuda"}), 0.5, true):cpu():totable()
    local z = {0, 0, 0, 0}
    local same = 0
    for i, v in ipairs(y) do
      if v == 0 then
        local k = (i <= n / 2 and 1 or 2)
        z[k] = z[k] + 1
        z[3 + i % 2] = z[3 + i % 2] + 1
      end
      if i > 1 and (v == 0) == (y[i - 1] == 0) then same = same + 1 end
    end
    for k = 1, 4 do assert.is_true(within(z[k], n / 2, 0.5), "part " .. k .. ": " .. z[k]) end
    -- neighbours agree half the time
    assert.is_true(within(same, n - 1, 0.5), "equal neighbours: " .. same)
  end)

  gpu_it("manual_seed repeats the mask; the next call and another seed differ", function()
    local x = keel.ones({5000}, {device = "cuda"})
    keel.manual_seed(5)
    local a = F.dropout(x, 0.5):cpu():totable()
    local a2 = F.dropout(x, 0.5):cpu():totable()
    keel.manual_seed(5)
    local b = F.dropout(x, 0.5):cpu():totable()
    keel.manual_seed(6)
    local c = F.dropout(x, 0.5):cpu():totable()
    assert.are.same(a, b)
    assert.are_not.same(a, a2)
    assert.are_not.same(a, c)
  end)

  gpu_it("p = 0 is the identity, p = 1 gives zeros, eval is the identity", function()
    local x = D.input({7, 9}, "float64", {grad = false}):to("cuda")
    assert.are.same(x:cpu():totable(), F.dropout(x, 0, true):cpu():totable())
    assert.are.same(x:cpu():totable(), F.dropout(x, 0.5, false):cpu():totable())
    H.assert_all(F.dropout(x, 1, true):cpu(), 0)
  end)

  gpu_it("empty input, and backward multiplies by the same mask", function()
    local e = F.dropout(keel.ones({0, 3}, {device = "cuda"}), 0.5, true)
    H.assert_shape(e, {0, 3})
    local x = keel.ones({1000}, {dtype = "float64", device = "cuda", requires_grad = true})
    local y = F.dropout(x, 0.4)
    y:sum():backward()
    assert.are.same(y:cpu():totable(), x.grad:cpu():totable())
  end)

  gpu_it("nn.Dropout on the device follows train() / eval()", function()
    local d = nn.Dropout(0.5)
    local x = keel.ones({2000}, {device = "cuda"})
    local y = d(x):cpu()
    local zeros = 0
    for _, v in ipairs(y:totable()) do if v == 0 then zeros = zeros + 1 end end
    assert.is_true(within(zeros, 2000, 0.5))
    d:eval()
    assert.are.same(x:cpu():totable(), d(x):cpu():totable())
  end)
end)
