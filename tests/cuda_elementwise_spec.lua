-- tests/cuda_elementwise_spec.lua: the pointwise kernels of the CUDA
-- plugin (kernels/elementwise.cu: binary, unary, clamp, where;
-- kernels/act.cu: leaky_relu, elu, gelu, silu, softplus and their
-- backward) against the CPU backend, which is their specification. Every
-- op, forward and input gradients, float32 and float64 (int64 where the
-- CPU takes it), sizes 0, 1, 31, 257 and 100003 (past one block, and past
-- one grid of the simulator; odd, so vector loops leave a tail), through
-- the three loops of a kernel: dense (aligned: vectors; misaligned:
-- scalars), one broadcast element (a number operand), and strided
-- (transposed, narrowed, broadcast rows and columns, strided outputs of
-- in-place ops). NaN and infinities come out as on the CPU. Without a GPU
-- (or the simulator plugin) every test is a visible skip.
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local F = keel.nn.functional
local gpu_it = H.gpu_it(it, pending)

local FLOATS = {"float32", "float64"}
local BINOPS = {"add", "sub", "mul", "div", "pow", "maximum", "minimum"}
local CMPS = {"eq", "ne", "lt", "le", "gt", "ge"}
local UNOPS = {"neg", "exp", "log", "sqrt", "abs", "relu", "sigmoid", "tanh", "sign"}
local SIZES = {0, 1, 31, 257}
local BIG = 100003

local function input(shape, dtype, seed, lo, hi, grad)
  return D.input(shape, {dtype = dtype, seed = seed, lo = lo, hi = hi, grad = grad})
end

-- Inputs for a binary op (pow: a positive base, so gradients are finite).
local function bin_inputs(op, sa, sb, dtype)
  local lo = op == "pow" and 0.2 or -2
  return input(sa, dtype, 3, lo, 2), input(sb, dtype, 4, op == "div" and 0.5 or -2, 2)
end

local function binf(op) return function(a, b) return a[op](a, b) end end

-- A tensor of given values (NaN, infinities welcome) on the CPU.
local function vals(t, dtype, grad)
  local x = keel.tensor(t, {dtype = dtype, device = "cpu"})
  if grad then x:requires_grad_(true) end
  return x
end

local NAN, INF = 0 / 0, math.huge
local SPECIAL = {NAN, INF, -INF, 0, -0.0, 1, -1, 2.5, -3.5, 1e-30}

describe("CUDA binary kernels", function()
  for _, dt in ipairs(FLOATS) do
    for _, op in ipairs(BINOPS) do
      gpu_it(("%s %s, dense sizes 0, 1, 31, 257"):format(op, dt), function()
        for _, n in ipairs(SIZES) do
          local a, b = bin_inputs(op, {n}, {n}, dt)
          D.check(binf(op), {a, b})
        end
      end)
      gpu_it(("%s %s: broadcast rows, columns and a number"):format(op, dt), function()
        local a, b = bin_inputs(op, {5, 1, 37}, {1, 6, 37}, dt)
        D.check(binf(op), {a, b})
        a, b = bin_inputs(op, {33, 9}, {9}, dt)
        D.check(binf(op), {a, b})
        a, b = bin_inputs(op, {33, 1}, {33, 9}, dt)
        D.check(binf(op), {a, b})
        -- a number on either side: the one-element fast path
        local x = input({300}, dt, 5, 0.2, 2)
        D.check(function(t) return t[op](t, 1.5) end, {x})
        D.check(function(t)
          local s = keel.tensor(1.5, {dtype = dt, device = t.device})
          return s[op](s, t)
        end, {x})
        -- two one-element operands, a 0-d result
        a, b = bin_inputs(op, {}, {}, dt)
        D.check(binf(op), {a, b})
      end)
      gpu_it(("%s %s: transposed and narrowed operands"):format(op, dt), function()
        local a, b = bin_inputs(op, {40, 23}, {23, 40}, dt)
        D.check(function(x, y) return x[op](x, y:t()) end, {a, b})
        D.check(function(x, y) return x:narrow(2, 3, 17)[op](x:narrow(2, 3, 17), y:t():narrow(2, 2, 17)) end, {a, b})
      end)
    end
  end

  gpu_it("large dense operands: vector loops with a tail, f32 and f64", function()
    for _, dt in ipairs(FLOATS) do
      for _, op in ipairs({"add", "mul", "maximum", "pow"}) do
        local a, b = bin_inputs(op, {BIG}, {BIG}, dt)
        D.check(binf(op), {a, b}, {backward = op == "add"})
      end
      local a = input({BIG}, dt, 8)
      D.check(function(x) return x * 3 - 1 end, {a})
      D.check(function(x) return 2 / (x + 5) end, {a})
    end
  end)

  gpu_it("large strided operands: transposed and broadcast, more elements than a grid", function()
    for _, dt in ipairs(FLOATS) do
      local a, b = bin_inputs("sub", {317, 331}, {331, 317}, dt)
      D.check(function(x, y) return x - y:t() end, {a, b}, {backward = false})
      D.check(function(x, y) return x:t():maximum(y:narrow(2, 1, 1)) end, {a, b}, {backward = false})
      D.check(function(x) return x:t():tanh() end, {a}, {backward = false})
      local c = input({317, 1}, dt, 6, -1, 1, false):gt(0)
      D.check(function(cc, x, y) return keel.where(cc, x, y:t()) end, {c, a, b}, {backward = false})
    end
  end)

  gpu_it("misaligned dense operands (no vector loads) give the same results", function()
    for _, dt in ipairs(FLOATS) do
      local a, b = bin_inputs("mul", {4101}, {4101}, dt)
      D.check(function(x, y) return x:narrow(1, 2, 4099) * y:narrow(1, 1, 4099) end, {a, b})
      D.check(function(x, y) return x:narrow(1, 2, 4099) + y:narrow(1, 2, 4099) end, {a, b})
      D.check(function(x) return x:narrow(1, 2, 4099) - 0.25 end, {a})
    end
  end)

  gpu_it("comparisons write 1/0 in the operands' dtype (f32, f64, int64; ties, NaN)", function()
    for _, dt in ipairs({"float32", "float64", "int64"}) do
      local a = keel.tensor({1, 2, 3, 4, 5, -1, 0, 7, 7, -3, 2}, {dtype = dt, device = "cpu"})
      local b = keel.tensor({1, 3, 2, 4, 6, -1, 1, 7, 6, -3, 3}, {dtype = dt, device = "cpu"})
      for _, op in ipairs(CMPS) do
        D.check(binf(op), {a, b}, {backward = false})
        D.check(function(x) return x[op](x, 2) end, {a}, {backward = false})
        D.check(function(x, y) return x:reshape({11, 1})[op](x:reshape({11, 1}), y) end, {a, b}, {backward = false})
      end
      local big = input({257}, "float64", 9, -3, 3, false):to(dt)
      for _, op in ipairs(CMPS) do D.check(function(x) return x[op](x, x:narrow(1, 1, 1)) end, {big}, {backward = false}) end
    end
    local x = vals(SPECIAL, "float32")
    local y = vals({1, INF, INF, -0.0, 0, NAN, -1, 2.5, 0, NAN}, "float32")
    for _, op in ipairs(CMPS) do D.check(binf(op), {x, y}, {backward = false}) end
  end)

  gpu_it("int64: add, sub, mul, maximum, minimum; div is true division; pow refused", function()
    for _, n in ipairs({0, 1, 31, 257}) do
      local a = input({n}, "float64", 10, -50, 50, false):to("int64")
      local b = input({n}, "float64", 11, -50, 50, false):to("int64")
      for _, op in ipairs({"add", "sub", "mul", "maximum", "minimum"}) do
        D.check(binf(op), {a, b}, {backward = false})
        D.check(function(x) return x[op](x, 3) end, {a}, {backward = false})
      end
      D.check(binf("div"), {a, b:abs() + 1}, {backward = false})
    end
    local a = keel.tensor({1, 2, 3}, {dtype = "int64"}):to("cuda")
    H.assert_error_match(function() return a:pow(a) end, "pow: expected float")
  end)

  gpu_it("maximum and minimum propagate NaN from either side; arithmetic with infinities", function()
    for _, dt in ipairs(FLOATS) do
      local x = vals(SPECIAL, dt)
      local y = vals({1, NAN, INF, -0.0, 0, NAN, -INF, -2.5, 3.5, 0}, dt)
      for _, op in ipairs(BINOPS) do
        D.check(binf(op), {x, y}, {backward = false})
        D.check(binf(op), {y, x}, {backward = false})
      end
    end
  end)

  gpu_it("in place: add_, sub_, mul_, div_ with tensors, broadcast rows and numbers", function()
    for _, dt in ipairs(FLOATS) do
      local a = input({31, 9}, dt, 12, -2, 2, false)
      local b = input({31, 9}, dt, 13, 0.5, 2, false)
      local r = input({9}, dt, 14, 0.5, 2, false)
      for _, op in ipairs({"add", "sub", "mul", "div"}) do
        local m = op .. "_"
        D.check(function(x, y) local c = x:clone(); c[m](c, y); return c end, {a, b})
        D.check(function(x, y) local c = x:clone(); c[m](c, y); return c end, {a, r})
        D.check(function(x) local c = x:clone(); c[m](c, 0.75); return c end, {a})
        -- a strided destination: the transpose of a clone
        D.check(function(x, y) local c = x:clone(); c:t()[m](c:t(), y:t()); return c end, {a, b})
      end
    end
    local i = input({40}, "float64", 15, -9, 9, false):to("int64")
    D.check(function(x) local c = x:clone(); c:add_(3); c:mul_(x); return c end, {i})
  end)
end)

describe("CUDA unary kernels", function()
  for _, dt in ipairs(FLOATS) do
    for _, op in ipairs(UNOPS) do
      gpu_it(("%s %s: dense sizes, transposed, narrowed"):format(op, dt), function()
        local pos = op == "log" or op == "sqrt"
        local lo = pos and 0.1 or -3
        for _, n in ipairs(SIZES) do
          D.check(function(x) return x[op](x) end, {input({n}, dt, 20, lo, 3)})
        end
        local m = input({37, 21}, dt, 21, lo, 3)
        D.check(function(x) return x:t()[op](x:t()) end, {m})
        D.check(function(x) return x:narrow(2, 4, 11)[op](x:narrow(2, 4, 11)) end, {m})
      end)
    end
    gpu_it(("unary %s: NaN, infinities, negative zero, out-of-domain inputs"):format(dt), function()
      local x = vals(SPECIAL, dt)
      for _, op in ipairs(UNOPS) do D.check(function(t) return t[op](t) end, {x}, {backward = false}) end
      local neg = vals({-1, -0.5, -INF, 0, -0.0}, dt)
      D.check(function(t) return t:log() end, {neg}, {backward = false})
      D.check(function(t) return t:sqrt() end, {neg}, {backward = false})
    end)
  end

  gpu_it("large unary operands (vector loop and tail)", function()
    for _, dt in ipairs(FLOATS) do
      local x = input({BIG}, dt, 22)
      D.check(function(t) return t:exp() end, {x}, {backward = false})
      D.check(function(t) return t:tanh() end, {x})
      D.check(function(t) return t:relu() end, {x}, {backward = false})
    end
  end)

  gpu_it("int64: neg, abs, relu, sign; float-only ops refused", function()
    for _, n in ipairs({0, 1, 31, 257}) do
      local a = input({n}, "float64", 23, -9, 9, false):to("int64")
      for _, op in ipairs({"neg", "abs", "relu", "sign"}) do
        D.check(function(x) return x[op](x) end, {a})
      end
    end
    local a = keel.tensor({1, -2, 3}, {dtype = "int64"}):to("cuda")
    H.assert_error_match(function() return a:exp() end, "exp: expected a float")
  end)
end)

describe("CUDA clamp", function()
  for _, dt in ipairs(FLOATS) do
    gpu_it(("clamp %s: both bounds, one-sided, in place, strided"):format(dt), function()
      for _, n in ipairs(SIZES) do
        local x = input({n}, dt, 30, -3, 3)
        D.check(function(t) return t:clamp(-1, 1.5) end, {x})
        D.check(function(t) return t:clamp(-0.5) end, {x})
        D.check(function(t) return t:clamp(nil, 0.25) end, {x})
      end
      local m = input({33, 17}, dt, 31, -3, 3)
      D.check(function(t) return t:t():clamp(-1, 1) end, {m})
      D.check(function(t) local c = t:detach():clone(); c:clamp_(-1, 0.5); return c end, {m}, {backward = false})
      D.check(function(t) local c = t:detach():clone(); c:t():clamp_(0); return c end, {m}, {backward = false})
      D.check(function(t) return t:clamp(0.1, 0.1) end, {m})
      D.check(function(t) return t:clamp(-1, 1) end, {vals(SPECIAL, dt)}, {backward = false})
      D.check(function(t) return t:clamp(-1, 1) end, {input({BIG}, dt, 32, -3, 3)})
    end)
  end
  gpu_it("clamp int64 with fractional and infinite bounds", function()
    local a = input({257}, "float64", 33, -9, 9, false):to("int64")
    D.check(function(t) return t:clamp(-2.5, 3.5) end, {a})
    D.check(function(t) return t:clamp(-2) end, {a})
    D.check(function(t) return t:clamp(nil, 4.9) end, {a})
    D.check(function(t) local c = t:clone(); c:clamp_(-1.1, 1.1); return c end, {a})
  end)
end)

describe("CUDA where", function()
  gpu_it("where: broadcast condition of every dtype, gradients to both branches", function()
    for _, dt in ipairs(FLOATS) do
      for _, cdt in ipairs({"float32", "float64", "int64"}) do
        local c = input({31, 1}, "float64", 40, -1, 1, false):gt(0):to(cdt)
        local a = input({31, 7}, dt, 41)
        local b = input({7}, dt, 42)
        D.check(function(cc, x, y) return keel.where(cc, x, y) end, {c, a, b})
        D.check(function(cc, x, y) return keel.where(cc:t(), x:t(), y:reshape({7, 1})) end, {c, a, b})
      end
      for _, n in ipairs(SIZES) do
        local c = input({n}, dt, 43, -1, 1, false):gt(0)
        D.check(function(cc, x, y) return keel.where(cc, x, y) end, {c, input({n}, dt, 44), input({n}, dt, 45)})
      end
      local c = input({BIG}, dt, 46, -1, 1, false):gt(0)
      D.check(function(cc, x, y) return keel.where(cc, x, y) end, {c, input({BIG}, dt, 47), input({BIG}, dt, 48)},
              {backward = false})
    end
  end)
  gpu_it("where: a NaN condition counts as true; int64 branches", function()
    local c = vals({NAN, 0, 1, -0.0, INF}, "float64")
    local a = vals({1, 2, 3, 4, 5}, "float32", true)
    local b = vals({-1, -2, -3, -4, -5}, "float32", true)
    D.check(function(cc, x, y) return keel.where(cc, x, y) end, {c, a, b})
    local ia = keel.tensor({1, 2, 3, 4, 5}, {dtype = "int64", device = "cpu"})
    D.check(function(cc, x, y) return keel.where(cc, x, y) end, {c, ia, ia:neg()})
  end)
end)

describe("CUDA activations (act, act_backward)", function()
  local ACTS = {
    {"leaky_relu", function(x) return F.leaky_relu(x, 0.2) end},
    {"leaky_relu default", function(x) return F.leaky_relu(x) end},
    {"elu", function(x) return F.elu(x, 1.3) end},
    {"gelu", function(x) return F.gelu(x) end},
    {"gelu tanh", function(x) return F.gelu(x, "tanh") end},
    {"silu", function(x) return F.silu(x) end},
    {"softplus", function(x) return F.softplus(x) end},
    {"softplus beta 2 threshold 1", function(x) return F.softplus(x, 2, 1) end},
    {"softplus beta -1.5", function(x) return F.softplus(x, -1.5, 3) end},
  }
  for _, dt in ipairs(FLOATS) do
    for _, a in ipairs(ACTS) do
      local name, f = a[1], a[2]
      gpu_it(("%s %s: sizes, wide range, non-contiguous input"):format(name, dt), function()
        for _, n in ipairs(SIZES) do D.check(f, {input({n}, dt, 50, -4, 4)}) end
        D.check(f, {input({257}, dt, 51, -30, 30)})
        local m = input({29, 13}, dt, 52, -4, 4)
        D.check(function(x) return f(x:t()) end, {m})
        D.check(f, {vals(SPECIAL, dt)}, {backward = false})
      end)
    end
    gpu_it(("activations %s on %d elements (vector loop and tail)"):format(dt, BIG), function()
      for _, a in ipairs({ACTS[1], ACTS[4], ACTS[6]}) do D.check(a[2], {input({BIG}, dt, 53, -4, 4)}) end
      -- misaligned: a narrowed input is copied dense by the op, a narrowed gradient is not
      local x = input({BIG + 1}, dt, 54, -4, 4)
      D.check(function(t) return F.gelu(t:narrow(1, 2, BIG)) end, {x})
    end)
  end
end)

describe("CUDA strided copies (kernels/copy.cu)", function()
  -- sizes on both sides of the simulator's 32-bit index limit (4096)
  for _, n in ipairs({30, 130}) do
    for _, dt in ipairs(FLOATS) do
      gpu_it(("transposed, narrowed and converted, [%d, 50] %s"):format(n, dt), function()
        D.check(function(a) return a:t():contiguous() end, {input({n, 50}, dt, 50)})
        D.check(function(a) return a:narrow(2, 3, 40):permute(2, 1):contiguous() end, {input({n, 50}, dt, 51)})
        local other = dt == "float32" and "float64" or "float32"
        D.check(function(a) return a:t():to(other) end, {input({n, 50}, dt, 52)}, {tol = D.tol.float32})
        D.check(function(a) return a:t():to("int64") end, {input({n, 50}, dt, 53, -9, 9, false)},
                {backward = false})
      end)
    end
  end
end)

describe("CUDA pointwise errors", function()
  gpu_it("an unsupported dtype or op is an error, never a crash", function()
    local a = keel.tensor({1, 2, 3}, {dtype = "int64"}):to("cuda")
    H.assert_error_match(function() return F.gelu(a) end, "float")
    H.assert_error_match(function() return a:sqrt() end, "sqrt: expected a float")
  end)
end)
