-- keel.nn.init: PyTorch's parameter initialisers (torch.nn.init), same
-- names, same formulas. Each one fills its tensor in place without
-- recording (a parameter that requires grad is fine) and returns it.
-- Random values come from keel's generator (keel.manual_seed).
--
--   nn.init.kaiming_uniform_(w, {a = math.sqrt(5)})   -- nn.Linear's default
--   nn.init.xavier_normal_(w, nn.init.calculate_gain("tanh"))
--   nn.init.orthogonal_(w)

local keel = require "keel"

local is_tensor = keel.is_tensor
local no_grad = keel.no_grad

local init = {}

local function check_float(who, t)
  if not is_tensor(t) then
    error(who .. ": argument #1: expected a keel.Tensor, got " .. type(t), 3)
  end
  if t.dtype ~= "float32" and t.dtype ~= "float64" then
    error(who .. ": tensor has dtype " .. t.dtype .. ", expected float32 or float64", 3)
  end
end

local function check_number(who, name, v)
  if type(v) ~= "number" then
    error(("%s: %s: expected a number, got %s"):format(who, name, type(v)), 3)
  end
end

-- The gain of an initialiser as a number, or from {gain = ...}; default 1.
local function gain_arg(who, g)
  if type(g) == "table" then g = g.gain end
  if g == nil then return 1 end
  check_number(who, "gain", g)
  return g
end

---------------------------------------------------------------------------
-- Gains and fans
---------------------------------------------------------------------------

local LINEAR = {
  linear = true, conv1d = true, conv2d = true, conv3d = true, conv_transpose1d = true,
  conv_transpose2d = true, conv_transpose3d = true, sigmoid = true,
}

-- calculate_gain(nonlinearity [, param]): the recommended scale for the
-- standard deviation after that nonlinearity (param: leaky_relu's slope,
-- default 0.01).
function init.calculate_gain(nonlinearity, param)
  if LINEAR[nonlinearity] then return 1 end
  if nonlinearity == "tanh" then return 5.0 / 3 end
  if nonlinearity == "relu" then return math.sqrt(2.0) end
  if nonlinearity == "leaky_relu" then
    local slope = param
    if slope == nil then slope = 0.01 end
    if type(slope) ~= "number" then
      error("calculate_gain: negative_slope " .. tostring(slope) .. " is not a valid number", 2)
    end
    return math.sqrt(2.0 / (1 + slope * slope))
  end
  if nonlinearity == "selu" then return 3.0 / 4 end
  error("calculate_gain: unsupported nonlinearity " .. tostring(nonlinearity), 2)
end

local function fans(who, t)
  local nd = t:dim()
  if nd < 2 then
    error(("%s: fan in and fan out can not be computed for a tensor with %d dimension%s, expected at least 2"):format(
      who, nd, nd == 1 and "" or "s"), 3)
  end
  local shape = t.shape
  local receptive = 1
  for i = 3, nd do receptive = receptive * shape[i] end
  return shape[2] * receptive, shape[1] * receptive
end

-- _calculate_fan_in_and_fan_out(t): for a weight [out, in, k1, k2, ...],
-- fan_in = in * k1 * k2 * ..., fan_out = out * k1 * k2 * ...
function init._calculate_fan_in_and_fan_out(t)
  if not is_tensor(t) then
    error("_calculate_fan_in_and_fan_out: argument #1: expected a keel.Tensor, got " .. type(t), 2)
  end
  return fans("_calculate_fan_in_and_fan_out", t)
end

---------------------------------------------------------------------------
-- Plain fills
---------------------------------------------------------------------------

function init.uniform_(t, a, b)
  check_float("uniform_", t)
  a, b = a or 0, b or 1
  check_number("uniform_", "a", a); check_number("uniform_", "b", b)
  no_grad(function() t:uniform_(a, b) end)
  return t
end

function init.normal_(t, mean, std)
  check_float("normal_", t)
  mean, std = mean or 0, std or 1
  check_number("normal_", "mean", mean); check_number("normal_", "std", std)
  no_grad(function() t:normal_(mean, std) end)
  return t
end

function init.constant_(t, val)
  check_float("constant_", t)
  check_number("constant_", "val", val)
  no_grad(function() t:fill_(val) end)
  return t
end

function init.zeros_(t)
  check_float("zeros_", t)
  no_grad(function() t:fill_(0) end)
  return t
end

function init.ones_(t)
  check_float("ones_", t)
  no_grad(function() t:fill_(1) end)
  return t
end

---------------------------------------------------------------------------
-- Xavier / Glorot (Glorot & Bengio 2010) and Kaiming / He (He et al. 2015)
---------------------------------------------------------------------------

-- xavier_uniform_(t [, gain]): U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)).
function init.xavier_uniform_(t, gain)
  check_float("xavier_uniform_", t)
  gain = gain_arg("xavier_uniform_", gain)
  local fan_in, fan_out = fans("xavier_uniform_", t)
  local std = gain * math.sqrt(2.0 / (fan_in + fan_out))
  local a = math.sqrt(3.0) * std
  no_grad(function() t:uniform_(-a, a) end)
  return t
end

-- xavier_normal_(t [, gain]): N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out)).
function init.xavier_normal_(t, gain)
  check_float("xavier_normal_", t)
  gain = gain_arg("xavier_normal_", gain)
  local fan_in, fan_out = fans("xavier_normal_", t)
  local std = gain * math.sqrt(2.0 / (fan_in + fan_out))
  no_grad(function() t:normal_(0, std) end)
  return t
end

-- std = gain / sqrt(fan) for kaiming_*; opts a (leaky_relu's slope,
-- default 0), mode ("fan_in" keeps the forward variance, "fan_out" the
-- backward one), nonlinearity (default "leaky_relu").
local function kaiming_std(who, t, opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error(who .. ": argument #2: expected an options table {a=, mode=, nonlinearity=}, got " .. type(opts), 3)
  end
  local a = opts.a or 0
  local mode = opts.mode or "fan_in"
  local nonlinearity = opts.nonlinearity or "leaky_relu"
  if mode ~= "fan_in" and mode ~= "fan_out" then
    error(("%s: mode %s is not supported, expected fan_in or fan_out"):format(who, tostring(mode)), 3)
  end
  local fan_in, fan_out = fans(who, t)
  local fan = mode == "fan_in" and fan_in or fan_out
  local ok, gain = pcall(init.calculate_gain, nonlinearity, a)
  if not ok then error(who .. ": " .. tostring(gain):gsub("^.-calculate_gain: ", ""), 3) end
  return gain / math.sqrt(fan)
end

-- kaiming_uniform_(t [, opts]): U(-bound, bound), bound = sqrt(3) * gain / sqrt(fan).
function init.kaiming_uniform_(t, opts)
  check_float("kaiming_uniform_", t)
  if t:numel() == 0 then return t end
  local bound = math.sqrt(3.0) * kaiming_std("kaiming_uniform_", t, opts)
  no_grad(function() t:uniform_(-bound, bound) end)
  return t
end

-- kaiming_normal_(t [, opts]): N(0, std^2), std = gain / sqrt(fan).
function init.kaiming_normal_(t, opts)
  check_float("kaiming_normal_", t)
  if t:numel() == 0 then return t end
  local std = kaiming_std("kaiming_normal_", t, opts)
  no_grad(function() t:normal_(0, std) end)
  return t
end

---------------------------------------------------------------------------
-- Orthogonal (Saxe et al. 2013)
---------------------------------------------------------------------------

-- orthogonal_(t [, gain]): t viewed as [rows, cols] (cols = the product of
-- the other dims) becomes gain * a random matrix with orthonormal rows
-- (rows <= cols) or columns (rows > cols), uniformly distributed (Haar).
-- PyTorch takes the QR factorisation of a normal matrix and flips the
-- signs of Q's columns so that R's diagonal is positive; Gram-Schmidt
-- gives that same Q directly. Classical Gram-Schmidt applied twice
-- ("CGS2") keeps the columns orthogonal to float64 precision; each step is
-- two matrix-vector products in the engine.
function init.orthogonal_(t, gain)
  check_float("orthogonal_", t)
  gain = gain_arg("orthogonal_", gain)
  if t:dim() < 2 then
    error(("orthogonal_: tensor has %d dimension%s, expected at least 2"):format(
      t:dim(), t:dim() == 1 and "" or "s"), 2)
  end
  if t:numel() == 0 then return t end
  local rows = t.shape[1]
  local cols = t:numel() // rows
  -- n vectors of length m (n <= m), as the rows of g.
  local n, m = math.min(rows, cols), math.max(rows, cols)
  no_grad(function()
    local g = keel.randn({n, m}, {dtype = "float64"})
    local q = keel.zeros({n, m}, {dtype = "float64"})
    for j = 1, n do
      local v = g[j]
      if j > 1 then
        local p = q:narrow(1, 1, j - 1)
        for _ = 1, 2 do v = v - p:matmul(v):matmul(p) end
      end
      q[j]:copy_(v / v:norm():item())
    end
    -- q's rows are orthonormal: they are the rows of the result when
    -- rows <= cols, its columns otherwise.
    local w = rows <= cols and q or q:t()
    t:copy_(w:reshape(t.shape))
    if gain ~= 1 then t:mul_(gain) end
  end)
  return t
end

return init
