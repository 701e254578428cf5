-- keel.nn.norm: BatchNorm1d, BatchNorm2d, LayerNorm, GroupNorm, Dropout and
-- Embedding, over the engine's fused ops (nn.functional.batch_norm,
-- layer_norm, group_norm, dropout, embedding; C forward and backward).
-- Defaults, state_dict names and initialisation follow PyTorch.
local keel = require "keel"

return function(nn)
  local F = nn.functional
  local init = nn.init

  -- Levels: 1 this helper, 2 the init method, 3 the class call, 4 the user.
  local function options(who, opts)
    if opts ~= nil and type(opts) ~= "table" then
      error(who .. ": options: expected a table, got " .. type(opts), 4)
    end
    return opts or {}
  end

  local function check_size(who, name, v)
    if math.type(v) ~= "integer" or v < 1 then
      error(("%s: %s: expected a positive integer, got %s"):format(who, name, tostring(v)), 4)
    end
  end

  local function check_eps(who, v)
    if type(v) ~= "number" or not (v >= 0) then
      error(("%s: eps: expected a number >= 0, got %s"):format(who, tostring(v)), 4)
    end
  end

  local function default(v, d)
    if v == nil then return d end
    return v
  end

  local function shape_str(s)
    local p = {}
    for i, v in ipairs(s) do p[i] = tostring(v) end
    return "{" .. table.concat(p, ", ") .. "}"
  end

  ---------------------------------------------------------------------------
  -- Batch norm
  ---------------------------------------------------------------------------

  -- The shared base of BatchNorm1d and BatchNorm2d:
  -- (num_features [, {eps = 1e-5, momentum = 0.1, affine = true,
  -- track_running_stats = true, dtype = "float32"}]). momentum = false
  -- selects the cumulative moving average (PyTorch's momentum=None; a Lua
  -- table cannot hold nil). Parameters weight, bias; buffers running_mean,
  -- running_var, num_batches_tracked (int64, 0-d), as in PyTorch's state_dict.
  local BatchNorm = nn.Module:extend("_BatchNorm")
  nn._BatchNorm = BatchNorm

  function BatchNorm:init(num_features, opts)
    local who = self.__name
    check_size(who, "num_features", num_features)
    opts = options(who, opts)
    local momentum = default(opts.momentum, 0.1)
    if momentum ~= false and (type(momentum) ~= "number" or not (momentum >= 0 and momentum <= 1)) then
      error(("%s: momentum: expected a number in [0, 1] or false (cumulative average), got %s"):format(
        who, tostring(momentum)), 3)
    end
    self.num_features = num_features
    self.eps = default(opts.eps, 1e-5)
    check_eps(who, self.eps)
    self.momentum = momentum
    self.affine = default(opts.affine, true)
    self.track_running_stats = default(opts.track_running_stats, true)
    local o = {dtype = opts.dtype}
    if self.affine then
      self.weight = nn.Parameter(keel.empty({num_features}, o))
      self.bias = nn.Parameter(keel.empty({num_features}, o))
    end
    if self.track_running_stats then
      self.running_mean = keel.zeros({num_features}, o)
      self.running_var = keel.ones({num_features}, o)
      self.num_batches_tracked = keel.zeros({}, {dtype = "int64"})
    end
    self:reset_parameters()
  end

  function BatchNorm:reset_running_stats()
    if self.track_running_stats then
      keel.no_grad(function()
        self.running_mean:zero_()
        self.running_var:fill_(1)
        self.num_batches_tracked:zero_()
      end)
    end
  end

  function BatchNorm:reset_parameters()
    self:reset_running_stats()
    if self.affine then
      init.ones_(self.weight)
      init.zeros_(self.bias)
    end
  end

  function BatchNorm:forward(x)
    if not keel.is_tensor(x) then
      error(("%s: expected a keel.Tensor, got %s"):format(self.__name, type(x)), 3)
    end
    self:_check_input_dim(x)
    if x.shape[2] ~= self.num_features then
      error(("%s: expected %d channels (dimension 2 of the input), got input of shape %s"):format(
        self.__name, self.num_features, shape_str(x.shape)), 3)
    end
    local factor = self.momentum or 0.0
    if self.training and self.track_running_stats then
      self.num_batches_tracked:add_(1)
      if self.momentum == false then factor = 1.0 / self.num_batches_tracked:item() end
    end
    -- statistics of the batch while training, or when there are no buffers
    local batch_stats = self.training or (self.running_mean == nil and self.running_var == nil)
    local rm, rv
    if not self.training or self.track_running_stats then rm, rv = self.running_mean, self.running_var end
    return F.batch_norm(x, rm, rv, self.weight, self.bias, batch_stats, factor, self.eps)
  end

  function BatchNorm:extra_repr()
    return ("%d, eps=%s, momentum=%s, affine=%s, track_running_stats=%s"):format(self.num_features,
      tostring(self.eps), self.momentum == false and "false" or tostring(self.momentum), tostring(self.affine),
      tostring(self.track_running_stats))
  end

  -- nn.BatchNorm1d(C, opts): input [N, C] or [N, C, L].
  local BatchNorm1d = BatchNorm:extend("BatchNorm1d")
  nn.BatchNorm1d = BatchNorm1d
  function BatchNorm1d:_check_input_dim(x)
    local d = x:dim()
    if d ~= 2 and d ~= 3 then
      error(("BatchNorm1d: expected 2D or 3D input ([N, C] or [N, C, L]), got %dD input"):format(d), 4)
    end
  end

  -- nn.BatchNorm2d(C, opts): input [N, C, H, W].
  local BatchNorm2d = BatchNorm:extend("BatchNorm2d")
  nn.BatchNorm2d = BatchNorm2d
  function BatchNorm2d:_check_input_dim(x)
    local d = x:dim()
    if d ~= 4 then
      error(("BatchNorm2d: expected 4D input ([N, C, H, W]), got %dD input"):format(d), 4)
    end
  end

  ---------------------------------------------------------------------------
  -- Layer norm and group norm
  ---------------------------------------------------------------------------

  -- nn.LayerNorm(normalized_shape (size or table) [, {eps = 1e-5,
  -- elementwise_affine = true, dtype}]): normalises over the last dims,
  -- which must equal normalized_shape; weight (ones) and bias (zeros) have
  -- that shape.
  local LayerNorm = nn.Module:extend("LayerNorm")
  nn.LayerNorm = LayerNorm

  function LayerNorm:init(normalized_shape, opts)
    local shape = normalized_shape
    if type(shape) == "number" then shape = {shape} end
    if type(shape) ~= "table" or #shape == 0 then
      error("LayerNorm: normalized_shape: expected a size or a non-empty table of sizes, got " ..
        tostring(normalized_shape), 3)
    end
    for i = 1, #shape do check_size("LayerNorm", "normalized_shape[" .. i .. "]", shape[i]) end
    opts = options("LayerNorm", opts)
    self.normalized_shape = {table.unpack(shape)}
    self.eps = default(opts.eps, 1e-5)
    check_eps("LayerNorm", self.eps)
    self.elementwise_affine = default(opts.elementwise_affine, true)
    if self.elementwise_affine then
      self.weight = nn.Parameter(keel.empty(self.normalized_shape, {dtype = opts.dtype}))
      self.bias = nn.Parameter(keel.empty(self.normalized_shape, {dtype = opts.dtype}))
    end
    self:reset_parameters()
  end

  function LayerNorm:reset_parameters()
    if self.elementwise_affine then
      init.ones_(self.weight)
      init.zeros_(self.bias)
    end
  end

  function LayerNorm:forward(x)
    return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
  end

  function LayerNorm:extra_repr()
    return ("%s, eps=%s, elementwise_affine=%s"):format(shape_str(self.normalized_shape), tostring(self.eps),
      tostring(self.elementwise_affine))
  end

  -- nn.GroupNorm(num_groups, num_channels [, {eps = 1e-5, affine = true,
  -- dtype}]): input [N, C, ...]; statistics per sample and group of
  -- C/num_groups channels; weight (ones) and bias (zeros) per channel.
  local GroupNorm = nn.Module:extend("GroupNorm")
  nn.GroupNorm = GroupNorm

  function GroupNorm:init(num_groups, num_channels, opts)
    check_size("GroupNorm", "num_groups", num_groups)
    check_size("GroupNorm", "num_channels", num_channels)
    if num_channels % num_groups ~= 0 then
      error(("GroupNorm: num_channels (%d) must be divisible by num_groups (%d)"):format(num_channels, num_groups), 3)
    end
    opts = options("GroupNorm", opts)
    self.num_groups, self.num_channels = num_groups, num_channels
    self.eps = default(opts.eps, 1e-5)
    check_eps("GroupNorm", self.eps)
    self.affine = default(opts.affine, true)
    if self.affine then
      self.weight = nn.Parameter(keel.empty({num_channels}, {dtype = opts.dtype}))
      self.bias = nn.Parameter(keel.empty({num_channels}, {dtype = opts.dtype}))
    end
    self:reset_parameters()
  end

  function GroupNorm:reset_parameters()
    if self.affine then
      init.ones_(self.weight)
      init.zeros_(self.bias)
    end
  end

  function GroupNorm:forward(x)
    return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
  end

  function GroupNorm:extra_repr()
    return ("%d, %d, eps=%s, affine=%s"):format(self.num_groups, self.num_channels, tostring(self.eps),
      tostring(self.affine))
  end

  ---------------------------------------------------------------------------
  -- Dropout
  ---------------------------------------------------------------------------

  -- nn.Dropout([p = 0.5]): while training, zeroes elements with probability
  -- p (from keel's RNG: keel.manual_seed fixes the masks) and scales the
  -- others by 1/(1-p); the identity in eval mode.
  local Dropout = nn.Module:extend("Dropout")
  nn.Dropout = Dropout

  function Dropout:init(p)
    p = default(p, 0.5)
    if type(p) ~= "number" or not (p >= 0 and p <= 1) then
      error(("Dropout: dropout probability has to be between 0 and 1, got %s"):format(tostring(p)), 3)
    end
    self.p = p
  end

  function Dropout:forward(x) return F.dropout(x, self.p, self.training) end

  function Dropout:extra_repr() return ("p=%s"):format(tostring(self.p)) end

  ---------------------------------------------------------------------------
  -- Embedding
  ---------------------------------------------------------------------------

  -- nn.Embedding(num_embeddings, embedding_dim [, {padding_idx, dtype}]):
  -- a lookup table weight [num, dim], initialised N(0, 1) as PyTorch; input
  -- indices are 1-based (int64 tensors, whole-valued float tensors or a
  -- list), output input.shape + {dim}. padding_idx (1-based, or negative
  -- from the end) names a row that stays zero-initialised and gets no
  -- gradient.
  local Embedding = nn.Module:extend("Embedding")
  nn.Embedding = Embedding

  local function padding_arg(who, padding_idx, num)
    if padding_idx == nil then return nil end
    if math.type(padding_idx) ~= "integer" then
      error(("%s: padding_idx: expected an integer, got %s"):format(who, tostring(padding_idx)), 4)
    end
    local p = padding_idx < 0 and num + padding_idx + 1 or padding_idx
    if p < 1 or p > num then
      error(("%s: padding_idx must be within num_embeddings (1..%d or -%d..-1), got %d"):format(
        who, num, num, padding_idx), 4)
    end
    return p
  end

  function Embedding:init(num_embeddings, embedding_dim, opts)
    check_size("Embedding", "num_embeddings", num_embeddings)
    check_size("Embedding", "embedding_dim", embedding_dim)
    opts = options("Embedding", opts)
    self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
    self.padding_idx = padding_arg("Embedding", opts.padding_idx, num_embeddings)
    self.weight = nn.Parameter(keel.empty({num_embeddings, embedding_dim}, {dtype = opts.dtype}))
    self:reset_parameters()
  end

  function Embedding:reset_parameters()
    init.normal_(self.weight)
    self:_fill_padding_idx_with_zero()
  end

  function Embedding:_fill_padding_idx_with_zero()
    if self.padding_idx then
      keel.no_grad(function() self.weight:select(1, self.padding_idx):fill_(0) end)
    end
  end

  function Embedding:forward(input)
    return F.embedding(input, self.weight, self.padding_idx)
  end

  function Embedding:extra_repr()
    local s = ("%d, %d"):format(self.num_embeddings, self.embedding_dim)
    if self.padding_idx then s = s .. ", padding_idx=" .. self.padding_idx end
    return s
  end

  -- nn.Embedding.from_pretrained(weight [, {freeze = true, padding_idx}]):
  -- an Embedding holding a copy of weight [num, dim].
  function Embedding.from_pretrained(weight, opts)
    if not keel.is_tensor(weight) or weight:dim() ~= 2 then
      error("Embedding.from_pretrained: weight: expected a 2-D keel.Tensor", 2)
    end
    opts = opts or {}
    local num, dim = weight.shape[1], weight.shape[2]
    local e = Embedding(num, dim, {padding_idx = opts.padding_idx, dtype = weight.dtype})
    keel.no_grad(function() e.weight:copy_(weight) end)
    e.weight.requires_grad = opts.freeze == false
    return e
  end
end
