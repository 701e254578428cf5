-- tests/cuda_loss_spec.lua: the softmax and loss kernels of the CUDA
-- plugin (kernels/softmax.cu: softmax, log_softmax and their backward;
-- kernels/loss.cu: mse, l1, smooth_l1, huber, cross_entropy, nll_loss,
-- binary_cross_entropy_with_logits and their backward) against the CPU
-- backend, which is their specification. Forward and input gradients,
-- float32 and float64, every reduction; softmax over every dim of a 3-D
-- tensor and rows of 1, 2, 31, 33, 1000 and 5000 (each kernel shape:
-- short rows sharing a warp, a warp per row, a block per row, a thread per
-- column); class losses on [n, c] and [n, c, d1, d2] inputs with weights,
-- smoothing, ignore_index and probability targets; empty tensors;
-- logits of +-1e4; NaN and infinities as on the CPU. Without a GPU (or the
-- simulator plugin) every test is a visible skip.
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local F = keel.nn.functional
local gpu_it = H.gpu_it(it, pending)

local FLOATS = {"float32", "float64"}
local REDS = {"none", "mean", "sum"}
local inf, nan = math.huge, 0 / 0

local function input(shape, dtype, seed, lo, hi, grad)
  return D.input(shape, {dtype = dtype, seed = seed, lo = lo, hi = hi, grad = grad})
end

-- int64 class indices (1-based, as Lua sees them) for ns samples of c classes.
local function classes(shape, c, seed, ignore)
  local n = H.numel(shape)
  local r = H.rng(seed or 5)
  local v = {}
  for i = 1, n do
    v[i] = math.floor(r() * c) + 1
    if ignore and i % 3 == 0 then v[i] = ignore end
  end
  if n == 0 then return keel.zeros(shape, {dtype = "int64"}) end
  return keel.tensor(H.nest(v, shape), {dtype = "int64"})
end

-- A tensor from a nested table of values (NaN, inf allowed).
local function tensor(rows, dtype, grad)
  local t = keel.tensor(rows, {dtype = dtype})
  if grad then t:requires_grad_(true) end
  return t
end

-- {======================================================================
-- Softmax and log_softmax
-- =======================================================================

describe("cuda softmax", function()
  for _, dt in ipairs(FLOATS) do
    for _, fn in ipairs({"softmax", "log_softmax"}) do
      local f = F[fn]

      -- rows of 1, 2 and 31 share a warp; 33 and 1000: a warp per row in
      -- registers; 5000: a block per row
      for _, n in ipairs({1, 2, 31, 33, 1000, 5000}) do
        gpu_it(("%s over rows of %d (%s)"):format(fn, n, dt), function()
          local rows = n <= 2 and 300 or 7
          -- softmax values are small: an absolute tolerance would hide
          -- errors (gradients cancel, so they keep the default)
          local tol = dt == "float32" and {atol = 1e-8, rtol = 1e-4} or nil
          D.check(function(x) return f(x, 2) end, {input({rows, n}, dt, n)}, {tol = tol, grad_tol = D.tol[dt]})
        end)
      end

      gpu_it(("%s over every dim of a 3-D tensor (%s)"):format(fn, dt), function()
        for d = 1, 3 do
          D.check(function(x) return f(x, d) end, {input({4, 5, 6}, dt, 10 + d)})
          D.check(function(x) return f(x, d) end, {input({3, 37, 41}, dt, 20 + d)})
        end
        D.check(function(x) return f(x, -1) end, {input({2, 3, 1200}, dt, 30)})
        D.check(function(x) return f(x, 2) end, {input({2, 1300, 3}, dt, 31)})
      end)

      gpu_it(("%s of a non-contiguous input, 0-d and empty tensors (%s)"):format(fn, dt), function()
        D.check(function(x) return f(x:transpose(1, 2), 2) end, {input({37, 5}, dt, 40)})
        D.check(function(x) return f(x:transpose(1, 2), 1) end, {input({37, 5}, dt, 41)})
        D.check(function(x) return f(x, 1) end, {input({}, dt, 42)})
        D.check(function(x) return f(x, 2) end, {input({0, 5}, dt, 43)})
        D.check(function(x) return f(x, 2) end, {input({5, 0}, dt, 44)})
      end)

      gpu_it(("%s of logits of +-1e4: no overflow (%s)"):format(fn, dt), function()
        for _, n in ipairs({31, 1000, 5000}) do
          local _, r = D.check(function(x) return f(x, 2) end, {input({3, n}, dt, 50 + n, -1e4, 1e4)})
          local v = H.flat(r[1]:cpu():totable())
          for i = 1, #v do assert.is_true(v[i] == v[i] and v[i] > -inf and v[i] < inf, "finite") end
        end
        D.check(function(x) return f(x, 1) end, {input({40, 3}, dt, 53, -1e4, 1e4)})
      end)

      gpu_it(("%s: NaN and infinities as on the CPU (%s)"):format(fn, dt), function()
        local rows = {{1, 2, nan, 3}, {1, inf, 2, -inf}, {inf, inf, 1, 2}, {-inf, -inf, -inf, -inf},
                      {-inf, 0, 1, -inf}, {1e30, -1e30, 0, 5}}
        -- short rows (a warp), the same rows as columns (a thread each)
        D.check(function(x) return f(x, 2) end, {tensor(rows, dt)}, {backward = false})
        D.check(function(x) return f(x:transpose(1, 2):contiguous(), 1) end, {tensor(rows, dt)}, {backward = false})
        -- long rows (a block each): the values padded with zeros
        local long = {}
        for i, r in ipairs(rows) do
          long[i] = {}
          for k = 1, 2000 do long[i][k] = r[k] or (r[1] == -inf and -inf or 0) end
        end
        D.check(function(x) return f(x, 2) end, {tensor(long, dt)}, {backward = false})
        D.check(function(x) return f(x:transpose(1, 2):contiguous(), 1) end, {tensor(long, dt)}, {backward = false})
      end)
    end
  end
end)

-- }======================================================================

-- {======================================================================
-- Pointwise losses
-- =======================================================================

describe("cuda pointwise losses", function()
  local LOSSES = {
    {"mse_loss", function(r) return r end},
    {"l1_loss", function(r) return r end},
    {"smooth_l1_loss", function(r) return {beta = 0.5, reduction = r} end},
    {"smooth_l1_loss", function(r) return {beta = 0, reduction = r} end},
    {"huber_loss", function(r) return {delta = 0.7, reduction = r} end},
  }
  for _, dt in ipairs(FLOATS) do
    for _, l in ipairs(LOSSES) do
      local name, opt = l[1], l[2]
      gpu_it(("%s, every reduction, sizes 0..3001 (%s)"):format(name, dt), function()
        for _, red in ipairs(REDS) do
          for _, shape in ipairs({{0}, {1}, {31}, {3001}, {7, 0}, {3, 5, 7}}) do
            D.check(function(x, y) return F[name](x, y, opt(red)) end,
                    {input(shape, dt, 1), input(shape, dt, 2)})
          end
        end
        -- non-contiguous operands, big values
        D.check(function(x, y) return F[name](x:transpose(1, 2), y, opt("sum")) end,
                {input({9, 33}, dt, 3, -1e3, 1e3), input({33, 9}, dt, 4, -1e3, 1e3)})
      end)
    end
  end
end)

-- }======================================================================

-- {======================================================================
-- Binary cross entropy with logits
-- =======================================================================

describe("cuda binary_cross_entropy_with_logits", function()
  local bce = F.binary_cross_entropy_with_logits
  for _, dt in ipairs(FLOATS) do
    gpu_it(("every reduction, weight and pos_weight (%s)"):format(dt), function()
      for _, red in ipairs(REDS) do
        for _, shape in ipairs({{0, 4}, {1, 1}, {37, 29}}) do
          local c = shape[2]
          local x, y = input(shape, dt, 1, -3, 3), input(shape, dt, 2, 0, 1)
          D.check(function(a, b) return bce(a, b, {reduction = red}) end, {x, y})
          local w, pw = input(shape, dt, 3, 0.5, 2, false), input({c}, dt, 4, 0.5, 3, false)
          D.check(function(a, b) return bce(a, b, {weight = w:to(a.device), reduction = red}) end, {x, y})
          D.check(function(a, b) return bce(a, b, {pos_weight = pw:to(a.device), reduction = red}) end, {x, y})
          D.check(function(a, b)
            return bce(a, b, {weight = w:to(a.device), pos_weight = pw:to(a.device), reduction = red})
          end, {x, y})
        end
      end
    end)

    gpu_it(("logits of +-1e4 stay finite, big sizes (%s)"):format(dt), function()
      local _, r = D.check(function(a, b) return bce(a, b, {reduction = "none"}) end,
                           {input({5001}, dt, 5, -1e4, 1e4), input({5001}, dt, 6, 0, 1)})
      for _, v in ipairs(r[1]:cpu():totable()) do assert.is_true(v == v and v < inf, "finite") end
      D.check(function(a, b) return bce(a, b) end, {input({100003}, dt, 7, -1e4, 1e4), input({100003}, dt, 8, 0, 1)})
    end)
  end
end)

-- }======================================================================

-- {======================================================================
-- Class losses
-- =======================================================================

describe("cuda cross_entropy and nll_loss", function()
  local ce, nll = F.cross_entropy, F.nll_loss
  for _, dt in ipairs(FLOATS) do
    -- c = 1, 5, 31: several samples a warp; 1000: a warp a sample; 5000: a block
    for _, c in ipairs({1, 5, 31, 1000, 5000}) do
      gpu_it(("cross_entropy over %d classes, every reduction and option (%s)"):format(c, dt), function()
        local n = c >= 1000 and 6 or 67
        local x, t = input({n, c}, dt, c), classes({n}, c, c)
        local w = input({c}, dt, c + 1, 0.2, 2, false)
        for _, red in ipairs(REDS) do
          D.check(function(a, b) return ce(a, b, {reduction = red}) end, {x, t})
          D.check(function(a, b) return ce(a, b, {weight = w:to(a.device), reduction = red}) end, {x, t})
          D.check(function(a, b) return ce(a, b, {label_smoothing = 0.1, reduction = red}) end, {x, t})
          D.check(function(a, b)
            return ce(a, b, {weight = w:to(a.device), label_smoothing = 0.2, ignore_index = 1, reduction = red})
          end, {x, classes({n}, c, c + 2, 1)})
        end
      end)
    end

    gpu_it(("cross_entropy on [n, c, d1, d2] and 1-D inputs (%s)"):format(dt), function()
      local x, t = input({3, 4, 5, 2}, dt, 1), classes({3, 5, 2}, 4, 2)
      local w = input({4}, dt, 3, 0.2, 2, false)
      for _, red in ipairs(REDS) do
        D.check(function(a, b) return ce(a, b, {reduction = red}) end, {x, t})
        D.check(function(a, b)
          return ce(a, b, {weight = w:to(a.device), label_smoothing = 0.3, ignore_index = 2, reduction = red})
        end, {x, classes({3, 5, 2}, 4, 4, 2)})
      end
      D.check(function(a, b) return ce(a, b) end, {input({7}, dt, 5), keel.tensor(3, {dtype = "int64"})})
      D.check(function(a, b) return ce(a:permute({1, 3, 2}), b) end, {input({3, 6, 4}, dt, 6), classes({3, 6}, 4, 7)})
    end)

    gpu_it(("cross_entropy with probability targets (%s)"):format(dt), function()
      for _, shape in ipairs({{9, 5}, {4, 1000}, {2, 3, 4, 5}, {3, 2000}}) do
        local c = shape[2]
        local x, p = input(shape, dt, 1), input(shape, dt, 2, 0, 1)
        local w = input({c}, dt, 3, 0.2, 2, false)
        for _, red in ipairs(REDS) do
          D.check(function(a, b) return ce(a, b, {reduction = red}) end, {x, p})
          D.check(function(a, b)
            return ce(a, b, {weight = w:to(a.device), label_smoothing = 0.15, reduction = red})
          end, {x, p})
        end
      end
    end)

    gpu_it(("nll_loss, every reduction, weights and ignore_index (%s)"):format(dt), function()
      for _, shape in ipairs({{67, 5}, {5, 1200}, {3, 4, 5, 2}}) do
        local c = shape[2]
        local ts = {shape[1]}
        for i = 3, #shape do ts[#ts + 1] = shape[i] end
        local x, t = input(shape, dt, 1, -5, 0), classes(ts, c, 3)
        local w = input({c}, dt, 4, 0.2, 2, false)
        for _, red in ipairs(REDS) do
          D.check(function(a, b) return nll(a, b, {reduction = red}) end, {x, t})
          D.check(function(a, b)
            return nll(a, b, {weight = w:to(a.device), ignore_index = 2, reduction = red})
          end, {x, classes(ts, c, 5, 2)})
        end
      end
    end)

    gpu_it(("class losses: logits of +-1e4, empty batches (%s)"):format(dt), function()
      for _, c in ipairs({5, 1000, 3000}) do
        local x, t = input({6, c}, dt, c, -1e4, 1e4), classes({6}, c, 9)
        local _, r = D.check(function(a, b) return ce(a, b, {reduction = "none", label_smoothing = 0.1}) end, {x, t})
        for _, v in ipairs(r[1]:cpu():totable()) do assert.is_true(v == v and v < inf, "finite") end
        D.check(function(a, b) return ce(a, b) end, {x, input({6, c}, dt, 10, 0, 1)})
      end
      D.check(function(a, b) return ce(a, b, {reduction = "none"}) end, {input({3, 5, 0}, dt, 1), classes({3, 0}, 5)})
      for _, red in ipairs(REDS) do
        D.check(function(a, b) return ce(a, b, {reduction = red}) end, {input({0, 5}, dt, 1), classes({0}, 5)})
        D.check(function(a, b) return nll(a, b, {reduction = red}) end, {input({0, 5}, dt, 1), classes({0}, 5)})
      end
    end)

    gpu_it(("cross_entropy: NaN and infinities as on the CPU (%s)"):format(dt), function()
      local rows = {{1, 2, nan, 3}, {1, inf, 2, -inf}, {inf, inf, 1, 2}, {-inf, -inf, -inf, -inf},
                    {-inf, 0, 1, -inf}, {1e30, -1e30, 0, 5}}
      local t = keel.tensor({1, 2, 3, 4, 1, 2}, {dtype = "int64"})
      for _, red in ipairs(REDS) do
        D.check(function(a, b) return ce(a, b, {reduction = red}) end, {tensor(rows, dt), t}, {backward = false})
        D.check(function(a, b) return ce(a, b, {reduction = red, label_smoothing = 0.1}) end,
                {tensor(rows, dt), t}, {backward = false})
      end
    end)
  end

  gpu_it("an out-of-range target fails as on the CPU", function()
    local x = input({4, 3}, "float32", 1)
    for _, bad in ipairs({0, 4, -7}) do
      local t = keel.tensor({1, 2, bad, 3}, {dtype = "int64"})
      local ok1, e1 = pcall(ce, x, t)
      local ok2, e2 = pcall(ce, x:detach():to("cuda"), t:to("cuda"))
      assert.is_false(ok1)
      assert.is_false(ok2, "cuda accepted target " .. bad)
      assert.are.equal(tostring(e1), tostring(e2))
    end
  end)
end)

-- }======================================================================
