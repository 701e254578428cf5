-- keel.nn.act: activation modules over the engine's ops, and the Lua-side
-- functional forms.
--
--   nn.ReLU(), nn.Sigmoid(), nn.Tanh()      x:relu(), x:sigmoid(), x:tanh()
--   nn.LeakyReLU([negative_slope = 0.01])   F.leaky_relu
--   nn.ELU([alpha = 1])                     F.elu
--   nn.GELU([{approximate = "none"|"tanh"}]) F.gelu (exact erf form by default)
--   nn.SiLU()                               F.silu
--   nn.Softplus([{beta = 1, threshold = 20}]) F.softplus
--   nn.Softmax([dim = -1]), nn.LogSoftmax([dim = -1])   F.softmax, F.log_softmax
--
-- Dimensions are 1-based. Softmax and LogSoftmax without a dimension use the
-- last one: PyTorch's implicit choice (dim 0 for 0-, 1- and 3-d inputs, else
-- 1) is deprecated there and a frequent bug, so keel does not copy it.
-- No inplace option: the ops always make a new tensor.
local keel = require "keel"

return function(nn)
  local F = nn.functional
  local is_tensor = keel.is_tensor

  -- Levels: 1 this helper, 2 its caller, 3 the user.
  local function tensor_arg(who, x)
    if not is_tensor(x) then
      error(("%s: argument #1: expected a keel.Tensor, got %s"):format(who, type(x)), 3)
    end
  end

  -- relu, sigmoid and tanh are tensor methods; these make F complete.
  function F.relu(x) tensor_arg("relu", x); return x:relu() end
  function F.sigmoid(x) tensor_arg("sigmoid", x); return x:sigmoid() end
  function F.tanh(x) tensor_arg("tanh", x); return x:tanh() end

  -- Levels: 1 this helper, 2 the init method, 3 the class call, 4 the user.
  local function options(who, opts, known)
    if opts == nil then return {} end
    if type(opts) ~= "table" then
      error(("%s: options: expected a table, got %s"):format(who, type(opts)), 4)
    end
    for k in pairs(opts) do
      if not known[k] then
        local names = {}
        for n in pairs(known) do names[#names + 1] = n end
        table.sort(names)
        error(("%s: unknown option '%s' (expected %s)"):format(who, tostring(k),
          table.concat(names, ", ")), 4)
      end
    end
    return opts
  end

  local function number_arg(who, name, v, default)
    if v == nil then return default end
    if type(v) ~= "number" then
      error(("%s: %s: expected a number, got %s"):format(who, name, type(v)), 4)
    end
    return v
  end

  local function dim_arg(who, v)
    if v == nil then return -1 end
    if math.type(v) ~= "integer" or v == 0 then
      error(("%s: dim: expected a nonzero integer (1-based, or negative from the end), got %s")
        :format(who, tostring(v)), 4)
    end
    return v
  end

  -- A module class with no parameters and the given forward.
  local function simple(name, forward)
    local cls = nn.Module:extend(name)
    cls.forward = forward
    nn[name] = cls
    return cls
  end

  simple("ReLU", function(_, x) return x:relu() end)
  simple("Sigmoid", function(_, x) return x:sigmoid() end)
  simple("Tanh", function(_, x) return x:tanh() end)
  simple("SiLU", function(_, x) return F.silu(x) end)

  local LeakyReLU = simple("LeakyReLU", function(self, x) return F.leaky_relu(x, self.negative_slope) end)
  function LeakyReLU:init(negative_slope)
    if type(negative_slope) == "table" then
      negative_slope = options("LeakyReLU", negative_slope, {negative_slope = true}).negative_slope
    end
    self.negative_slope = number_arg("LeakyReLU", "negative_slope", negative_slope, 0.01)
  end
  function LeakyReLU:extra_repr() return ("negative_slope=%s"):format(self.negative_slope) end

  local ELU = simple("ELU", function(self, x) return F.elu(x, self.alpha) end)
  function ELU:init(alpha)
    if type(alpha) == "table" then alpha = options("ELU", alpha, {alpha = true}).alpha end
    self.alpha = number_arg("ELU", "alpha", alpha, 1.0)
  end
  function ELU:extra_repr() return ("alpha=%s"):format(self.alpha) end

  local GELU = simple("GELU", function(self, x) return F.gelu(x, self.approximate) end)
  function GELU:init(opts)
    if type(opts) == "string" then opts = {approximate = opts} end
    opts = options("GELU", opts, {approximate = true})
    local a = opts.approximate or "none"
    if a ~= "none" and a ~= "tanh" then
      error(("GELU: approximate must be \"none\" or \"tanh\", got %s"):format(tostring(a)), 3)
    end
    self.approximate = a
  end
  function GELU:extra_repr() return ("approximate='%s'"):format(self.approximate) end

  local Softplus = simple("Softplus", function(self, x) return F.softplus(x, self.beta, self.threshold) end)
  function Softplus:init(opts)
    opts = options("Softplus", opts, {beta = true, threshold = true})
    self.beta = number_arg("Softplus", "beta", opts.beta, 1.0)
    self.threshold = number_arg("Softplus", "threshold", opts.threshold, 20.0)
    if self.beta == 0 then error("Softplus: beta must not be 0", 3) end
  end
  function Softplus:extra_repr() return ("beta=%s, threshold=%s"):format(self.beta, self.threshold) end

  local Softmax = simple("Softmax", function(self, x) return F.softmax(x, self.dim) end)
  function Softmax:init(dim) self.dim = dim_arg("Softmax", dim) end
  function Softmax:extra_repr() return ("dim=%d"):format(self.dim) end

  local LogSoftmax = simple("LogSoftmax", function(self, x) return F.log_softmax(x, self.dim) end)
  function LogSoftmax:init(dim) self.dim = dim_arg("LogSoftmax", dim) end
  function LogSoftmax:extra_repr() return ("dim=%d"):format(self.dim) end
end
