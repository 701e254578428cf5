-- keel.nn.linear: Linear, Identity, Flatten, Unflatten. Linear is built
-- from matmul, transpose and add, whose forward and backward kernels are
-- the engine's (and gradient-checked with the engine's ops).
local keel = require "keel"

return function(nn)
  local F = nn.functional
  local init = nn.init

  local function opt_dtype(who, opts)
    if opts ~= nil and type(opts) ~= "table" then
      error(who .. ": options: expected a table, got " .. type(opts), 4)
    end
    return {dtype = opts and opts.dtype or nil}
  end

  local function check_size(who, name, v)
    if math.type(v) ~= "integer" or v < 0 then
      error(("%s: %s: expected a non-negative integer, got %s"):format(who, name, tostring(v)), 4)
    end
  end

  -- nn.Linear(in_features, out_features [, {bias = true, dtype = "float32"}]):
  -- y = x @ weight^T + bias for x [..., in_features]; weight [out, in], bias [out].
  local Linear = nn.Module:extend("Linear")
  nn.Linear = Linear

  function Linear:init(in_features, out_features, opts)
    check_size("Linear", "in_features", in_features)
    check_size("Linear", "out_features", out_features)
    local o = opt_dtype("Linear", opts)
    self.in_features, self.out_features = in_features, out_features
    self.weight = nn.Parameter(keel.empty({out_features, in_features}, o))
    if not (opts and opts.bias == false) then
      self.bias = nn.Parameter(keel.empty({out_features}, o))
    end
    self:reset_parameters()
  end

  -- PyTorch's default: kaiming_uniform_ with a = sqrt(5), which is
  -- U(-1/sqrt(in), 1/sqrt(in)), and the same bound for the bias.
  function Linear:reset_parameters()
    init.kaiming_uniform_(self.weight, {a = math.sqrt(5)})
    if self.bias then
      local fan_in = self.in_features
      local bound = fan_in > 0 and 1 / math.sqrt(fan_in) or 0
      init.uniform_(self.bias, -bound, bound)
    end
  end

  function Linear:forward(x) return F.linear(x, self.weight, self.bias) end

  function Linear:extra_repr()
    return ("in_features=%d, out_features=%d, bias=%s"):format(
      self.in_features, self.out_features, tostring(self.bias ~= nil))
  end

  -- nn.Identity(): returns its input (arguments to the constructor are ignored).
  local Identity = nn.Module:extend("Identity")
  nn.Identity = Identity
  function Identity:forward(x) return x end

  -- nn.Flatten([start_dim = 2 [, end_dim = -1]]): merges dims start..end
  -- (1-based: the default keeps the batch dimension, as PyTorch's 1).
  local Flatten = nn.Module:extend("Flatten")
  nn.Flatten = Flatten

  function Flatten:init(start_dim, end_dim)
    self.start_dim, self.end_dim = start_dim or 2, end_dim or -1
    if math.type(self.start_dim) ~= "integer" or math.type(self.end_dim) ~= "integer" then
      error("Flatten: start_dim and end_dim: expected integers", 3)
    end
  end

  function Flatten:forward(x) return x:flatten(self.start_dim, self.end_dim) end

  function Flatten:extra_repr()
    return ("start_dim=%d, end_dim=%d"):format(self.start_dim, self.end_dim)
  end

  -- nn.Unflatten(dim, sizes): splits dimension dim (1-based, negative from
  -- the end) into sizes, e.g. Unflatten(2, {4, 4}) maps [N, 16] to [N, 4, 4].
  local Unflatten = nn.Module:extend("Unflatten")
  nn.Unflatten = Unflatten

  function Unflatten:init(dim, sizes)
    if math.type(dim) ~= "integer" then
      error("Unflatten: dim: expected an integer, got " .. tostring(dim), 3)
    end
    if type(sizes) ~= "table" or #sizes == 0 then
      error("Unflatten: sizes: expected a non-empty list of sizes, got " .. type(sizes), 3)
    end
    self.dim, self.sizes = dim, sizes
  end

  function Unflatten:forward(x)
    local shape, nd = x.shape, x:dim()
    local d = self.dim < 0 and self.dim + nd + 1 or self.dim
    if d < 1 or d > nd then
      error(("Unflatten: dimension %d out of range for %d dimensions"):format(self.dim, nd), 2)
    end
    local out = {}
    for i = 1, d - 1 do out[#out + 1] = shape[i] end
    for _, s in ipairs(self.sizes) do out[#out + 1] = s end
    for i = d + 1, nd do out[#out + 1] = shape[i] end
    return x:reshape(out)
  end

  function Unflatten:extra_repr()
    local p = {}
    for i, s in ipairs(self.sizes) do p[i] = tostring(s) end
    return ("dim=%d, unflattened_size={%s}"):format(self.dim, table.concat(p, ", "))
  end
end
