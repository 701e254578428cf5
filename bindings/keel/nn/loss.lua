-- keel.nn.loss: loss modules over the engine's fused loss ops, and the
-- short names nn.cross_entropy, nn.mse_loss, ... for nn.functional's.
--
--   nn.MSELoss{reduction = "mean"}          loss(input, target)
--   nn.L1Loss{reduction}
--   nn.SmoothL1Loss{beta = 1, reduction}    0.5 d^2 / beta below beta, |d| - beta/2 above
--   nn.HuberLoss{delta = 1, reduction}      0.5 d^2 below delta, delta (|d| - delta/2) above
--   nn.CrossEntropyLoss{weight, ignore_index, label_smoothing = 0, reduction}
--   nn.NLLLoss{weight, ignore_index, reduction}
--   nn.BCEWithLogitsLoss{weight, pos_weight, reduction}
--
-- reduction is "mean" (default), "sum" or "none". Class labels are 1-based.
-- ignore_index has no default (nil ignores nothing): PyTorch's -100 only
-- makes sense for 0-based labels. weight and pos_weight are buffers, as in
-- PyTorch: in state_dict() and converted by to().
local keel = require "keel"

return function(nn)
  local F = nn.functional
  local is_tensor = keel.is_tensor

  for _, name in ipairs{"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "cross_entropy",
                        "nll_loss", "binary_cross_entropy_with_logits"} do
    nn[name] = F[name]
  end

  local REDUCTIONS = {mean = true, sum = true, none = true}

  -- Checks opts (levels: 1 here, 2 init, 3 the class call, 4 the user) and
  -- sets self.reduction.
  local function setup(self, opts, known)
    local who = self.__name
    if opts == nil then opts = {} end
    if type(opts) ~= "table" then
      error(("%s: options: expected a table, got %s"):format(who, type(opts)), 4)
    end
    for k in pairs(opts) do
      if k ~= "reduction" and not known[k] then
        local names = {"reduction"}
        for n in pairs(known) do names[#names + 1] = n end
        table.sort(names)
        error(("%s: unknown option '%s' (expected %s)"):format(who, tostring(k), table.concat(names, ", ")), 4)
      end
    end
    local r = opts.reduction or "mean"
    if not REDUCTIONS[r] then
      error(("%s: reduction must be \"mean\", \"sum\" or \"none\", got %s"):format(who,
        type(r) == "string" and ('"' .. r .. '"') or type(r)), 4)
    end
    self.reduction = r
    for _, k in ipairs{"weight", "pos_weight"} do
      if known[k] and opts[k] ~= nil and not is_tensor(opts[k]) then
        error(("%s: %s: expected a keel.Tensor, got %s"):format(who, k, type(opts[k])), 4)
      end
    end
    for _, k in ipairs{"beta", "delta", "label_smoothing"} do
      if known[k] and opts[k] ~= nil and type(opts[k]) ~= "number" then
        error(("%s: %s: expected a number, got %s"):format(who, k, type(opts[k])), 4)
      end
    end
    if known.ignore_index and opts.ignore_index ~= nil and math.type(opts.ignore_index) ~= "integer" then
      error(("%s: ignore_index: expected an integer, got %s"):format(who, tostring(opts.ignore_index)), 4)
    end
    return opts
  end

  local function repr(self, fields)
    local parts = {}
    for _, k in ipairs(fields) do
      local v = self[k]
      if v ~= nil and not is_tensor(v) then parts[#parts + 1] = ("%s=%s"):format(k, tostring(v)) end
    end
    parts[#parts + 1] = ("reduction='%s'"):format(self.reduction)
    return table.concat(parts, ", ")
  end

  local function loss_class(name)
    local cls = nn.Module:extend(name)
    nn[name] = cls
    return cls
  end

  local MSELoss = loss_class("MSELoss")
  function MSELoss:init(opts) setup(self, opts, {}) end
  function MSELoss:forward(input, target) return F.mse_loss(input, target, self.reduction) end
  function MSELoss:extra_repr() return repr(self, {}) end

  local L1Loss = loss_class("L1Loss")
  function L1Loss:init(opts) setup(self, opts, {}) end
  function L1Loss:forward(input, target) return F.l1_loss(input, target, self.reduction) end
  function L1Loss:extra_repr() return repr(self, {}) end

  local SmoothL1Loss = loss_class("SmoothL1Loss")
  function SmoothL1Loss:init(opts)
    opts = setup(self, opts, {beta = true})
    self.beta = opts.beta or 1.0
    if self.beta < 0 then error("SmoothL1Loss: beta must be >= 0, got " .. self.beta, 3) end
  end
  function SmoothL1Loss:forward(input, target)
    return F.smooth_l1_loss(input, target, {beta = self.beta, reduction = self.reduction})
  end
  function SmoothL1Loss:extra_repr() return repr(self, {"beta"}) end

  local HuberLoss = loss_class("HuberLoss")
  function HuberLoss:init(opts)
    opts = setup(self, opts, {delta = true})
    self.delta = opts.delta or 1.0
    if not (self.delta > 0) then error("HuberLoss: delta must be > 0, got " .. self.delta, 3) end
  end
  function HuberLoss:forward(input, target)
    return F.huber_loss(input, target, {delta = self.delta, reduction = self.reduction})
  end
  function HuberLoss:extra_repr() return repr(self, {"delta"}) end

  local CrossEntropyLoss = loss_class("CrossEntropyLoss")
  function CrossEntropyLoss:init(opts)
    opts = setup(self, opts, {weight = true, ignore_index = true, label_smoothing = true})
    self.weight = opts.weight
    self.ignore_index = opts.ignore_index
    self.label_smoothing = opts.label_smoothing or 0.0
    if not (self.label_smoothing >= 0 and self.label_smoothing <= 1) then
      error("CrossEntropyLoss: label_smoothing must be in [0, 1], got " .. self.label_smoothing, 3)
    end
  end
  function CrossEntropyLoss:forward(input, target)
    return F.cross_entropy(input, target, {weight = self.weight, ignore_index = self.ignore_index,
                                           label_smoothing = self.label_smoothing, reduction = self.reduction})
  end
  function CrossEntropyLoss:extra_repr() return repr(self, {"ignore_index", "label_smoothing"}) end

  local NLLLoss = loss_class("NLLLoss")
  function NLLLoss:init(opts)
    opts = setup(self, opts, {weight = true, ignore_index = true})
    self.weight = opts.weight
    self.ignore_index = opts.ignore_index
  end
  function NLLLoss:forward(input, target)
    return F.nll_loss(input, target, {weight = self.weight, ignore_index = self.ignore_index,
                                      reduction = self.reduction})
  end
  function NLLLoss:extra_repr() return repr(self, {"ignore_index"}) end

  local BCEWithLogitsLoss = loss_class("BCEWithLogitsLoss")
  function BCEWithLogitsLoss:init(opts)
    opts = setup(self, opts, {weight = true, pos_weight = true})
    self.weight = opts.weight
    self.pos_weight = opts.pos_weight
  end
  function BCEWithLogitsLoss:forward(input, target)
    return F.binary_cross_entropy_with_logits(input, target, {weight = self.weight, pos_weight = self.pos_weight,
                                                              reduction = self.reduction})
  end
  function BCEWithLogitsLoss:extra_repr() return repr(self, {}) end
end
