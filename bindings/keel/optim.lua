-- keel.optim: optimizers (SGD, Adam, AdamW, RMSprop, Adagrad) and
-- learning-rate schedules (keel.optim.schedule).
--
--   local opt = optim.AdamW(model:parameters(), {lr = 1e-3, weight_decay = 0.01,
--                                               clip = keel.clip.global_norm(1.0),
--                                               nonfinite = "skip"})
--   local r = opt:step()  --> {applied = true, grad_norm = 3.2, clip_coef = 0.31, clipped = true,
--                         --    lr = 1e-3, step = 1, nonfinite = 0, n_updated = 4,
--                         --    top_param = 3, top_share = 0.82, loss = nil}
--
-- The step runs in C over every parameter at once (optim.c). Options and
-- their defaults are PyTorch 1.13's; `params` is a list of tensors, a
-- single tensor, or a list of groups {params = {...}, lr = ..., ...}.
-- opt.param_groups[i] are plain tables: a change (lr, momentum, betas,
-- ...) is seen at the next step. Optimizer-level options:
--   clip      a keel.clip transform or chain (default none)
--   nonfinite "error" (default: raise, nothing changes), "skip" (the step
--             is not applied), "zero" (NaN/Inf elements count as 0),
--             "keep" (those elements, parameter and state, stay as they were)
--
-- opt:step([closure | loss]), in this order:
--   1. statistics pass in C over every gradient and its weight; the clip
--      chain and the non-finite policy are decided; nothing changes yet
--   2. on_grad hooks (require("keel.hooks").grad[p], from model:on_grad):
--      for each parameter p with a gradient, in parameter order, each
--      entry's fn(name, p.grad, stats), stats = {norm, max_abs, mean, std,
--      rms, nonfinite, nan, inf, zeros, numel, weight_norm, update_ratio
--      (of p's last applied update; nil before), step (the step this
--      gradient is for: opt.step_count + 1)}; mean, std (population) and
--      rms over the finite elements. A hook returning a tensor (p's shape
--      and dtype) replaces p.grad (later hooks see it and its statistics;
--      the pass of step 1 is rerun once). A hook's error aborts the step
--      with nothing changed and carries the hook's traceback.
--   3. guard: opt._guard:_decide(opt, r, loss) -> "apply" | "skip"
--   4. the update pass in C (lr times opt.lr_scale; it also measures each
--      update's size), or the cancelled step: r.applied = false,
--      r.reason = "guard"
--   5. require("keel.hooks").emit("step", opt, r, loss)
-- loss: the closure's result, a number or a one-element tensor (recorded
-- as r.loss, a number). r.reason: nil (applied), "nonfinite", "no_grad",
-- "guard" or "overflow" (a keel.amp.GradScaler step whose unscaled
-- gradient held NaN/Inf: skipped, the scaler backs off; such a step also
-- has r.scale, the loss scale it ran under, and r.overflow);
-- r.lr = param_groups[1].lr * opt.lr_scale; r.top_param is the
-- index of the parameter with the largest share r.top_share of the global
-- sum of squares (nil when all gradients are 0).
-- Steps the device decides: when no on_grad hook watches the optimizer's
-- parameters, there is no guard and no GradScaler, every parameter taking
-- part is on CUDA, the clip chain is empty or L2 norms (norm, global_norm
-- with p = 2) followed by value bounds, and nonfinite is not "error", the
-- statistics, the clip factors, the skip and the update all run on the
-- device and step() returns without waiting for it. The report r then
-- fills itself on first access (reading it, pairs(r), a "step" listener
-- that reads it: that waits for the step if it is not done yet); so do
-- opt.counters, the step counts, grad_stats(), state_dict() and the next
-- step. Parameters, state, reports and counters are those of the host's
-- decision, to the bit.
-- opt.lr_scale (default 1; a number >= 0) multiplies every group's lr at
-- apply time without touching param_groups, so schedules keep working
-- under it; it is not part of state_dict (its owner, the guard, saves it).
-- opt.counters: steps, skipped (non-finite policy), cancelled (guard),
-- errors, no_grad, nonfinite_steps, nonfinite_elements, clipped, overflow
-- (loss-scale overflows; not in nonfinite_steps).

local keel = require "keel"
local core = require "keel.core"
local clip = require "keel.clip"
local hooks = require "keel.hooks"
local C = core._optim

local optim = {}

local api = clip._api

-- {======================================================================
-- Optimizers
-- =======================================================================

local KINDS = {
  sgd = {name = "SGD", defaults = {lr = false, momentum = 0, dampening = 0, weight_decay = 0,
                                   nesterov = false, maximize = false}},
  adam = {name = "Adam", defaults = {lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 0,
                                     amsgrad = false, maximize = false}},
  adamw = {name = "AdamW", defaults = {lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 1e-2,
                                       amsgrad = false, maximize = false}},
  rmsprop = {name = "RMSprop", defaults = {lr = 1e-2, alpha = 0.99, eps = 1e-8, weight_decay = 0, momentum = 0,
                                           centered = false, maximize = false}},
  adagrad = {name = "Adagrad", defaults = {lr = 1e-2, lr_decay = 0, weight_decay = 0,
                                           initial_accumulator_value = 0, eps = 1e-10, maximize = false}},
}
-- keys a group may carry besides the hyper-parameters
local GROUP_EXTRA = {params = true, initial_lr = true, max_lr = true, min_lr = true, max_momentum = true,
                     base_momentum = true, name = true}

local Optimizer = {}
local methods = {}
Optimizer.__name = "keel.Optimizer"
Optimizer.__index = function(self, k)
  if k == "step_count" then return C.step_count(rawget(self, "_h")) end
  if k == "counters" then return C.counters(rawget(self, "_h")) end
  return methods[k]
end
Optimizer.__tostring = function(self)
  local np = 0
  for _, g in ipairs(self.param_groups) do np = np + #g.params end
  return ("keel.optim.%s (%d group%s, %d parameter%s, %d step%s)"):format(self.name, #self.param_groups,
    #self.param_groups == 1 and "" or "s", np, np == 1 and "" or "s", self.step_count,
    self.step_count == 1 and "" or "s")
end

local function copy_value(v)
  if type(v) == "table" then return {table.unpack(v)} end
  return v
end

local function is_param_list(t)
  return type(t) == "table" and (#t == 0 or core.is_tensor(t[1]))
end

-- The groups a constructor's first argument describes.
local function groups_of(name, params)
  if core.is_tensor(params) then return {{params = {params}}} end
  if type(params) ~= "table" then
    error(("%s: argument #1: expected a list of parameters or of parameter groups, got %s"):format(name,
      type(params)), 0)
  end
  if #params == 0 then
    if next(params) ~= nil then
      error(("%s: argument #1: expected a list (1, 2, ...) of parameters or groups, got a table with other keys"):
        format(name), 0)
    end
    error(("%s: optimizer got an empty parameter list"):format(name), 0)
  end
  if is_param_list(params) then return {{params = params}} end
  for i, g in ipairs(params) do
    if type(g) ~= "table" or g.params == nil then
      error(("%s: argument #1: element %d is neither a tensor nor a group {params = ...}"):format(name, i), 0)
    end
  end
  return params
end

function methods:add_param_group(group)
  local kind = KINDS[self.kind]
  if type(group) ~= "table" or group.params == nil then
    error(("%s.add_param_group: expected a table {params = {...}, ...}"):format(self.name), 0)
  end
  if core.is_tensor(group.params) then group.params = {group.params} end
  if type(group.params) ~= "table" then
    error(("%s.add_param_group: params must be a tensor or a list of tensors"):format(self.name), 0)
  end
  for k in pairs(group) do
    if kind.defaults[k] == nil and not GROUP_EXTRA[k] then
      error(("%s: unknown option '%s' in parameter group %d"):format(self.name, tostring(k),
        #self.param_groups + 1), 0)
    end
  end
  for k, v in pairs(self.defaults) do
    if group[k] == nil then group[k] = copy_value(v) end
  end
  if not group.lr then
    error(("%s: lr is required (in the options or in every group)"):format(self.name), 0)
  end
  C.add_group(self._h, group.params, group)
  self.param_groups[#self.param_groups + 1] = group
  return group
end

-- The dynamic thresholds of the current chain, resolved for the next step.
local function push_thresholds(self)
  local dyn = rawget(self, "_dyn")
  if not dyn then return end
  local step = C.step_count(self._h)
  for _, d in ipairs(dyn) do
    C.set_clip_threshold(self._h, d.index, clip._resolve(d.threshold, step, self.name .. ".step: clip"))
  end
end

-- Replaces the clip chain (nil for none); adaptive state starts afresh.
function methods:set_clip(spec)
  local items = clip._flatten(spec)
  local specs, dyn = {}, {}
  local step = C.step_count(self._h)
  for i, t in ipairs(items) do
    local s = {kind = t.kind, p = t.p, eps = t.eps, alpha = t.alpha, window = t.window, mode = t.mode,
               max_norm = t.max_norm}
    if type(t.threshold) == "number" then
      s.threshold = t.threshold
    else
      dyn[#dyn + 1] = {index = i, threshold = t.threshold}
      s.threshold = clip._resolve(t.threshold, step, self.name .. ": clip")
    end
    specs[i] = s
  end
  C.set_clip(self._h, specs)
  self.clip = spec
  self._dyn = #dyn > 0 and dyn or nil
end

function methods:set_nonfinite(policy)
  if policy ~= "error" and policy ~= "skip" and policy ~= "zero" and policy ~= "keep" then
    error(("%s: nonfinite must be \"error\", \"skip\", \"zero\" or \"keep\", got %s"):format(self.name,
      tostring(policy)), 0)
  end
  C.set_nonfinite(self._h, policy)
  self.nonfinite = policy
end

-- A loss as the report records it: a number, or nil.
local function loss_value(self, v, from_closure)
  if type(v) == "number" or v == nil then return v end
  if core.is_tensor(v) then
    if v:numel() ~= 1 then
      if from_closure then return nil end
      error(("%s.step: argument #1: the loss must have one element, got %d"):format(self.name, v:numel()), 0)
    end
    return v:item()
  end
  if from_closure then return nil end
  error(("%s.step: argument #1: expected a closure, a loss (number or one-element tensor) or nothing, got %s")
    :format(self.name, type(v)), 0)
end

local function same_shape(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

-- The loss scale of a keel.amp step (nil: none) as prepare takes it.
local function prepare(self, amp)
  if amp then return C.prepare(self._h, self.param_groups, amp.inv, amp.found_inf) end
  return C.prepare(self._h, self.param_groups)
end

-- Step 2: the on_grad hooks of this optimizer's parameters. Returns the
-- report of a rerun prepare when a hook replaced a gradient, else r.
local function run_grad_hooks(self, r, reg, amp)
  local h, name = self._h, self.name
  local step = C.step_count(h) + 1
  local index, replaced = 0, false
  for _, g in ipairs(self.param_groups) do
    for _, p in ipairs(g.params) do
      index = index + 1
      local list = reg[p]
      local grad = list and #list > 0 and p.requires_grad and p.grad
      if grad then
        local stats = C.param_stats(h, index, step)
        -- a hook may remove itself (or others) while the list is walked
        for _, e in ipairs(table.move(list, 1, #list, 1, {})) do
          local ok, ret = xpcall(e.fn, debug.traceback, e.name, grad, stats)
          if not ok then
            C.discard(h)
            if type(ret) ~= "string" then error(ret, 0) end
            error(("%s.step: on_grad hook for '%s' failed: %s"):format(name, tostring(e.name), ret), 0)
          end
          if ret ~= nil then
            if not core.is_tensor(ret) or ret.dtype ~= grad.dtype or not same_shape(ret.shape, grad.shape) then
              C.discard(h)
              local what = core.is_tensor(ret) and ("a %s tensor of shape {%s}"):format(ret.dtype,
                table.concat(ret.shape, ",")) or type(ret)
              error(("%s.step: on_grad hook for '%s' returned %s; expected nil or a %s tensor of shape {%s}")
                :format(name, tostring(e.name), what, grad.dtype, table.concat(grad.shape, ",")), 0)
            end
            p.grad = ret
            grad = ret
            replaced = true
            stats = C.param_stats(h, index, step, ret)
          end
        end
      end
    end
  end
  if replaced then return prepare(self, amp) end
  return r
end

-- opt.lr_scale, checked (nil counts as 1).
local function lr_scale(self)
  local scale = rawget(self, "lr_scale")
  if scale == nil then return 1 end
  if type(scale) ~= "number" or not (scale >= 0 and scale < math.huge) then
    error(("%s.step: lr_scale must be a finite number >= 0, got %s"):format(self.name, tostring(scale)), 0)
  end
  return scale
end

-- Reports of steps the device decided (CUDA: no hooks, guard or amp; C
-- falls back to the host's step where the chain, the policy or the
-- devices need it): the step returns without waiting, and the report's
-- fields are filled from C on first access (which may wait for the
-- device), by the __index and __pairs below, which then go. pending_of
-- maps such a table to its optimizer; an optimizer's next step fills the
-- last one first (C keeps only the last step's report).
local pending_of = setmetatable({}, {__mode = "k"})

local function resolve_report(t)
  local self = pending_of[t]
  if not self then return end
  pending_of[t] = nil
  setmetatable(t, nil)
  if rawget(self, "_pending") == t then self._pending = nil end
  C.last_report(self._h, t)
end

local lazy_report = {
  __index = function(t, k)
    resolve_report(t)
    return rawget(t, k)
  end,
  __pairs = function(t)
    resolve_report(t)
    return next, t, nil
  end,
}

-- Whether an on_grad hook watches one of this optimizer's parameters.
local function has_grad_hooks(self)
  local reg = hooks.grad
  if next(reg) == nil then return false end
  for _, g in ipairs(self.param_groups) do
    for _, p in ipairs(g.params) do
      local list = reg[p]
      if list and #list > 0 then return true end
    end
  end
  return false
end

-- One step (the order is in this file's header). arg: a closure (called
-- first, with grad on, as PyTorch's step(closure); its result is the
-- loss), a loss (number or one-element tensor), or nothing. amp (keel.amp's
-- GradScaler only): {scale =, inv =, found_inf =}, the loss scale the
-- gradients carry; the C step unscales them as it reads them.
local function step(self, arg, amp)
  local h, loss = self._h, nil
  if type(arg) == "function" then
    loss = loss_value(self, keel.enable_grad(arg), true)
  elseif arg ~= nil then
    loss = loss_value(self, arg, false)
  end
  local scale = lr_scale(self)
  local last = rawget(self, "_pending")
  if last then resolve_report(last) end
  push_thresholds(self)
  if not amp and not rawget(self, "_guard") and not has_grad_hooks(self) then
    local r, pending = C.step_deferred(h, self.param_groups, scale)
    r.lr = self.param_groups[1].lr * scale
    r.loss = loss
    if pending then
      pending_of[r] = self
      self._pending = r
      setmetatable(r, lazy_report)
    end
    hooks.emit("step", self, r, loss)
    return r
  end
  local r = prepare(self, amp)
  local reg = hooks.grad
  if next(reg) ~= nil then r = run_grad_hooks(self, r, reg, amp) end
  if amp then
    r.scale = amp.scale
    r.overflow = r.reason == "overflow"
  end
  local guard = rawget(self, "_guard")
  local action = "apply"
  if guard then
    r.lr = self.param_groups[1].lr * scale
    r.loss = loss
    local ok, res = pcall(guard._decide, guard, self, r, loss)
    if not ok then C.discard(h); error(res, 0) end
    action = res
    ok, scale = pcall(lr_scale, self)   -- the guard may back off
    if not ok then C.discard(h); error(scale, 0) end
  end
  if action == "skip" then
    C.cancel(h, r)
    r.reason = "guard"
  elseif action == "apply" then
    C.apply(h, scale, r)
  else
    C.discard(h)
    error(("%s.step: the guard's _decide returned %s, expected \"apply\" or \"skip\""):format(self.name,
      tostring(action)), 0)
  end
  r.lr = self.param_groups[1].lr * scale
  r.loss = loss
  if amp then r.overflow = r.reason == "overflow" end
  hooks.emit("step", self, r, loss)
  return r
end

function methods:step(arg) return step(self, arg, nil) end

-- keel.amp.GradScaler's step (see there).
function methods:_amp_step(arg, amp) return step(self, arg, amp) end

-- keel.amp's explicit unscale: every .grad times inv in place; returns
-- the NaN/Inf count of the results and the number of gradients.
function methods:_unscale_grads(inv) return C.unscale(self._h, inv) end

-- keel.amp: whether a step would see some gradient.
function methods:_any_grad() return C.any_grad(self._h) end

-- Sets every parameter's .grad to nil (or fills it with zeros when
-- opts.set_to_none is false).
function methods:zero_grad(opts)
  local to_none = true
  if type(opts) == "table" and opts.set_to_none == false then to_none = false end
  C.zero_grad(self._h, to_none)
end

-- Statistics of each parameter at the last step, in parameter order:
-- {{numel, nan, inf, zeros, sum, sumsq, sum_abs, max_abs, norm, w_sumsq,
--   weight_norm, update_sumsq, update_ratio}, ...}. The gradient's sums
-- run over its finite elements (numel 0: no gradient at that step);
-- w_sumsq and weight_norm are the weight's before the step;
-- update_sumsq = ||w_after - w_before||^2 and update_ratio =
-- ||w_after - w_before|| / ||w_before|| of the parameter's last applied
-- update (nil before its first; inf when a zero weight moved).
function methods:grad_stats() return C.last_stats(self._h) end

-- All parameters, in order (groups one after the other).
function methods:parameters() return C.params(self._h) end

local STATEFUL = {percentile = true, zscore = true}

-- A snapshot: state tensors are copies, so later steps do not change it.
function methods:state_dict()
  local h = self._h
  local sd = {kind = self.kind, state = {}, param_groups = {}, step_count = C.step_count(h),
              counters = C.counters(h), nonfinite = self.nonfinite, clip = {}}
  local index = 0
  for gi, g in ipairs(self.param_groups) do
    local out = {}
    for k, v in pairs(g) do
      if k ~= "params" then out[k] = copy_value(v) end
    end
    out.params = {}
    for j = 1, #g.params do
      index = index + 1
      out.params[j] = index
      sd.state[index] = C.get_state(h, index)
    end
    sd.param_groups[gi] = out
  end
  for i, t in ipairs(clip._flatten(self.clip)) do
    if STATEFUL[t.kind] then sd.clip[i] = C.get_clip_state(h, i) end
  end
  return sd
end

-- Restores a state_dict of an optimizer of the same kind and shape; the
-- next steps are those the saved optimizer would have taken. Everything is
-- checked before anything changes.
function methods:load_state_dict(sd)
  local name, h = self.name .. ".load_state_dict", self._h
  if type(sd) ~= "table" or type(sd.param_groups) ~= "table" or type(sd.state) ~= "table" then
    error(name .. ": expected a table from state_dict()", 0)
  end
  if sd.kind ~= nil and sd.kind ~= self.kind then
    error(("%s: the state dict is for %s, not %s"):format(name, KINDS[sd.kind] and KINDS[sd.kind].name or
      tostring(sd.kind), self.name), 0)
  end
  if #sd.param_groups ~= #self.param_groups then
    error(("%s: loaded state dict has %d parameter groups, the optimizer %d"):format(name, #sd.param_groups,
      #self.param_groups), 0)
  end
  local params, index = C.params(h), 0
  for gi, g in ipairs(self.param_groups) do
    local sg = sd.param_groups[gi]
    if type(sg) ~= "table" or type(sg.params) ~= "table" or #sg.params ~= #g.params then
      error(("%s: parameter group %d of the state dict has %s parameters, the optimizer's %d"):format(name, gi,
        type(sg) == "table" and type(sg.params) == "table" and tostring(#sg.params) or "no", #g.params), 0)
    end
    for _ = 1, #g.params do
      index = index + 1
      local st = sd.state[index]
      if st ~= nil then
        if type(st) ~= "table" then error(("%s: state of parameter %d is not a table"):format(name, index), 0) end
        local shape, keys = params[index].shape, {}
        for k in pairs(st) do keys[#keys + 1] = tostring(k) end
        table.sort(keys)
        for _, k in ipairs(keys) do
          local t = st[k]
          if core.is_tensor(t) then
            local ts = t.shape
            local same = #ts == #shape
            for d = 1, #ts do same = same and ts[d] == shape[d] end
            if not same then
              error(("%s: state '%s' of parameter %d has shape {%s}, the parameter {%s}"):format(name, k, index,
                table.concat(ts, ","), table.concat(shape, ",")), 0)
            end
          end
        end
      end
    end
  end
  local items = clip._flatten(self.clip)
  for i, cs in pairs(sd.clip or {}) do
    if not (items[i] and STATEFUL[items[i].kind]) then
      error(("%s: the state dict has state for clip transform %d, which this optimizer's chain lacks"):format(
        name, i), 0)
    end
    if type(cs) ~= "table" then error(("%s: clip state %d is not a table"):format(name, i), 0) end
  end
  -- the saved hyper-parameters must be valid (the engine checks them)
  for gi, g in ipairs(self.param_groups) do
    local merged = {}
    for k, v in pairs(g) do merged[k] = v end
    for k, v in pairs(sd.param_groups[gi]) do
      if k ~= "params" then merged[k] = v end
    end
    local ok, err = pcall(C.set_group, h, gi, merged)
    if not ok then
      for gj, g2 in ipairs(self.param_groups) do pcall(C.set_group, h, gj, g2) end
      error(name .. ": " .. tostring(err):gsub("^[^\n]-:%d+: ", "", 1), 0)
    end
  end
  -- apply
  index = 0
  for gi, g in ipairs(self.param_groups) do
    for k, v in pairs(sd.param_groups[gi]) do
      if k ~= "params" then g[k] = copy_value(v) end
    end
    for _ = 1, #g.params do
      index = index + 1
      C.set_state(h, index, sd.state[index])
    end
  end
  for i, t in ipairs(items) do
    if STATEFUL[t.kind] then
      C.set_clip_state(h, i, (sd.clip or {})[i] or {history = {}, mean = 0, var = 0, initialized = false})
    end
  end
  C.set_counters(h, sd.counters or {}, sd.step_count or 0)
  if sd.nonfinite then self:set_nonfinite(sd.nonfinite) end
end

local OPTIONS_EXTRA = {clip = true, nonfinite = true}

local function new(kind, params, opts)
  local K = KINDS[kind]
  opts = opts or {}
  if type(opts) ~= "table" then error(("%s: argument #2: options must be a table, got %s"):format(K.name,
    type(opts)), 0) end
  for k in pairs(opts) do
    if K.defaults[k] == nil and not OPTIONS_EXTRA[k] then
      error(("%s: unknown option '%s'"):format(K.name, tostring(k)), 0)
    end
  end
  local defaults = {}
  for k, v in pairs(K.defaults) do
    if opts[k] ~= nil then defaults[k] = copy_value(opts[k]) elseif v ~= false or k ~= "lr" then
      defaults[k] = copy_value(v)
    end
  end
  local self = setmetatable({_h = C.new(kind), kind = kind, name = K.name, defaults = defaults,
                             param_groups = {}, lr_scale = 1}, Optimizer)
  for _, g in ipairs(groups_of(K.name, params)) do methods.add_param_group(self, g) end
  self:set_clip(opts.clip)
  self:set_nonfinite(opts.nonfinite or "error")
  return self
end

optim.SGD = api(function(params, opts) return new("sgd", params, opts) end)
optim.Adam = api(function(params, opts) return new("adam", params, opts) end)
optim.AdamW = api(function(params, opts) return new("adamw", params, opts) end)
optim.RMSprop = api(function(params, opts) return new("rmsprop", params, opts) end)
optim.Adagrad = api(function(params, opts) return new("adagrad", params, opts) end)
-- public methods: errors point at the caller
for _, k in ipairs{"add_param_group", "set_clip", "set_nonfinite", "step", "zero_grad", "grad_stats",
                   "parameters", "state_dict", "load_state_dict"} do
  methods[k] = api(methods[k])
end
optim.Optimizer = methods

-- }======================================================================

-- {======================================================================
-- Schedules
--
-- A schedule sets opt.param_groups[i].lr from the group's base lr
-- (group.initial_lr, recorded when the first schedule is made, as
-- PyTorch) and a step count s. By default s counts the optimizer's
-- APPLIED steps since the schedule was made (opt.step_count), so a skipped
-- step does not advance it; {count = "calls"} counts sched:step() calls,
-- as PyTorch. Made with opt = nil and {base = b}, a schedule only computes
-- values: sched:value(s) (usable as a clip threshold).
--
-- Formulas (b: base lr, s: step):
--   step        b * gamma ^ floor(s / step_size)                      (StepLR)
--   multistep   b * gamma ^ #{milestones <= s}                        (MultiStepLR)
--   exponential b * gamma ^ s                                         (ExponentialLR)
--   linear      b * (start + (end - start) * min(s, total) / total)   (LinearLR)
--   lambda      b * fn(s)                                             (LambdaLR)
--   cosine      s < warmup: b * (start_factor + (1 - start_factor) * s / warmup)
--               then t = s - warmup, over T = total - warmup:
--               min_lr + (b - min_lr) * (1 + cos(pi * min(t, T) / T)) / 2
--               with restarts = {period = T0, mult = Tm}: SGDR (CosineAnnealingWarmRestarts)
--   one_cycle   OneCycleLR (phases, cos/linear annealing, momentum cycling); past
--               total it holds the value at total, where PyTorch raises
--   plateau     ReduceLROnPlateau; sched:step(metric)
--   chain       {s1, s2, ...}: each one's result is the next one's base
--               (a product of factors for the multiplicative ones, as ChainedScheduler)
--   sequential  {s1, s2, ...} with milestones: s_k runs from 0 again at each
--               milestone (SequentialLR)
-- =======================================================================

local schedule = {}
optim.schedule = schedule

local Sched = {}
Sched.__index = Sched
Sched.__name = "keel.optim.schedule"
Sched.__tostring = function(s) return ("keel.optim.schedule.%s (step %d)"):format(s.kind, s.last_epoch) end

local function serror(kind, msg) error(("schedule.%s: %s"):format(kind, msg), 0) end

local function check_opt(kind, opt)
  if opt ~= nil and getmetatable(opt) ~= Optimizer then
    serror(kind, "argument #1: expected an optimizer (or nil for a value schedule), got " .. type(opt))
  end
end

local function num_opt(kind, opts, k, def, cond, what)
  local v = opts[k]
  if v == nil then v = def end
  if type(v) ~= "number" or (cond and not cond(v)) then
    serror(kind, ("%s must be %s, got %s"):format(k, what or "a number", tostring(v)))
  end
  return v
end

local function int_opt(kind, opts, k, def, min)
  local v = opts[k]
  if v == nil then v = def end
  if math.type(v) ~= "integer" or v < min then
    serror(kind, ("%s must be an integer >= %d, got %s"):format(k, min, tostring(v)))
  end
  return v
end

local function check_keys(kind, opts, allowed)
  for k in pairs(opts) do
    if not allowed[k] and k ~= "count" and k ~= "base" then
      serror(kind, ("unknown option '%s'"):format(tostring(k)))
    end
  end
end

-- The base lr of group gi (recorded as initial_lr the first time).
local function base_lr(self, gi)
  if not self.opt then return self.base end
  local g = self.opt.param_groups[gi]
  if g.initial_lr == nil then g.initial_lr = g.lr end
  return g.initial_lr
end

local function apply(self)
  local lrs = {}
  if self.opt then
    for gi, g in ipairs(self.opt.param_groups) do
      local lr = self:lr_at(base_lr(self, gi), self.last_epoch, gi)
      g.lr = lr
      lrs[gi] = lr
      if self.set_momentum then self:set_momentum(g, gi, self.last_epoch) end
    end
  else
    lrs[1] = self:lr_at(self.base, self.last_epoch, 1)
  end
  self._last_lr = lrs
  return lrs
end

-- A new schedule of kind over opt; lr_at(self, base, s, gi) is its formula.
local function make(kind, opt, opts, fields)
  check_opt(kind, opt)
  opts = opts or {}
  if type(opts) ~= "table" then serror(kind, "options must be a table") end
  local count = opts.count or "steps"
  if count ~= "steps" and count ~= "calls" then
    serror(kind, "count must be \"steps\" (applied optimizer steps) or \"calls\"")
  end
  local self = setmetatable(fields, Sched)
  self.kind, self.opt, self.count, self.last_epoch = kind, opt, count, 0
  if opt == nil then
    self.base = num_opt(kind, opts, "base", 1.0)
  else
    self.start = opt.step_count
    for gi in ipairs(opt.param_groups) do base_lr(self, gi) end
  end
  return self
end

-- Advances to the current step and sets the lrs; returns them.
function Sched:step()
  if self.kind == "plateau" then serror("plateau", "step(metric) needs the metric") end
  if not self.opt then serror(self.kind, "a value schedule (no optimizer) has no step(); use value(s)") end
  if self.count == "calls" then
    self.last_epoch = self.last_epoch + 1
  else
    self.last_epoch = self.opt.step_count - self.start
  end
  return apply(self)
end

function Sched:get_last_lr() return {table.unpack(self._last_lr or {})} end

-- The value at step s for the base given at creation (value schedules) or
-- the first group's base.
function Sched:value(s)
  if type(s) ~= "number" then serror(self.kind, ("value(s): expected a step number, got %s"):format(type(s))) end
  if math.type(s) ~= "integer" then s = math.floor(s) end
  if not self.lr_at then serror(self.kind, "has no closed form (value(s) needs one)") end
  return self:lr_at(self.opt and base_lr(self, 1) or self.base, s, 1)
end

local SAVED = {"last_epoch", "start", "count", "best", "num_bad_epochs", "cooldown_counter", "mode_worse"}

function Sched:state_dict()
  local sd = {kind = self.kind, _last_lr = self:get_last_lr()}
  for _, k in ipairs(SAVED) do sd[k] = self[k] end
  if self.subs then
    sd.subs = {}
    for i, s in ipairs(self.subs) do sd.subs[i] = s:state_dict() end
  end
  return sd
end

function Sched:load_state_dict(sd)
  if type(sd) ~= "table" or sd.kind ~= self.kind then
    serror(self.kind, ("load_state_dict: expected a state dict of a %s schedule"):format(self.kind))
  end
  for _, k in ipairs(SAVED) do
    if sd[k] ~= nil then self[k] = sd[k] end
  end
  if self.subs and sd.subs then
    for i, s in ipairs(self.subs) do s:load_state_dict(sd.subs[i]) end
  end
  self._last_lr = {table.unpack(sd._last_lr or {})}
end

local function finish(self)
  apply(self)
  return self
end

function schedule.step(opt, opts)
  opts = opts or {}
  check_keys("step", opts, {step_size = true, gamma = true})
  local s = make("step", opt, opts, {
    step_size = int_opt("step", opts, "step_size", nil, 1),
    gamma = num_opt("step", opts, "gamma", 0.1),
    lr_at = function(self, b, s) return b * self.gamma ^ (s // self.step_size) end,
  })
  return finish(s)
end

function schedule.multistep(opt, opts)
  opts = opts or {}
  check_keys("multistep", opts, {milestones = true, gamma = true})
  local ms = opts.milestones
  if type(ms) ~= "table" then serror("multistep", "milestones must be a list of integers") end
  local sorted = {}
  for i, m in ipairs(ms) do
    if math.type(m) ~= "integer" then serror("multistep", ("milestone %d is not an integer"):format(i)) end
    sorted[i] = m
  end
  table.sort(sorted)
  return finish(make("multistep", opt, opts, {
    milestones = sorted, gamma = num_opt("multistep", opts, "gamma", 0.1),
    lr_at = function(self, b, s)
      local k = 0
      for _, m in ipairs(self.milestones) do if m <= s then k = k + 1 end end
      return b * self.gamma ^ k
    end,
  }))
end

function schedule.exponential(opt, opts)
  opts = opts or {}
  check_keys("exponential", opts, {gamma = true})
  return finish(make("exponential", opt, opts, {
    gamma = num_opt("exponential", opts, "gamma", nil),
    lr_at = function(self, b, s) return b * self.gamma ^ s end,
  }))
end

function schedule.linear(opt, opts)
  opts = opts or {}
  check_keys("linear", opts, {start_factor = true, end_factor = true, total = true})
  local sf = num_opt("linear", opts, "start_factor", 1 / 3, function(v) return v > 0 and v <= 1 end,
    "in (0, 1]")
  local ef = num_opt("linear", opts, "end_factor", 1.0, function(v) return v >= 0 and v <= 1 end, "in [0, 1]")
  return finish(make("linear", opt, opts, {
    start_factor = sf, end_factor = ef, total = int_opt("linear", opts, "total", 5, 1),
    lr_at = function(self, b, s)
      return b * (self.start_factor + (self.end_factor - self.start_factor) * math.min(self.total, s) / self.total)
    end,
  }))
end

-- fn (or a list of one fn per group) maps the step to a factor.
function schedule.lambda(opt, fn, opts)
  opts = opts or {}
  check_keys("lambda", opts, {})
  local fns = fn
  if type(fn) == "function" then fns = nil
  elseif type(fn) ~= "table" then serror("lambda", "argument #2: expected a function of the step") end
  return finish(make("lambda", opt, opts, {
    fn = fns == nil and fn or nil, fns = fns,
    lr_at = function(self, b, s, gi)
      local f = self.fn or self.fns[gi]
      if type(f) ~= "function" then serror("lambda", ("no function for group %d"):format(gi)) end
      local v = f(s)
      if type(v) ~= "number" then serror("lambda", ("the function returned %s at step %d"):format(type(v), s)) end
      return b * v
    end,
  }))
end

function schedule.cosine(opt, opts)
  opts = opts or {}
  check_keys("cosine", opts, {warmup = true, total = true, min_lr = true, restarts = true, start_factor = true})
  local warmup = int_opt("cosine", opts, "warmup", 0, 0)
  local r = opts.restarts
  local period, mult
  if r ~= nil then
    if type(r) ~= "table" then serror("cosine", "restarts must be a table {period = T0, mult = 1}") end
    period = int_opt("cosine", r, "period", nil, 1)
    mult = int_opt("cosine", r, "mult", 1, 1)
  end
  local total = opts.total
  if r == nil then
    total = int_opt("cosine", opts, "total", nil, 1)
    if total <= warmup then serror("cosine", ("total (%d) must exceed warmup (%d)"):format(total, warmup)) end
  end
  return finish(make("cosine", opt, opts, {
    warmup = warmup, total = total, min_lr = num_opt("cosine", opts, "min_lr", 0),
    start_factor = num_opt("cosine", opts, "start_factor", 0, function(v) return v >= 0 and v <= 1 end, "in [0, 1]"),
    period = period, mult = mult,
    lr_at = function(self, b, s)
      if s < self.warmup then
        return b * (self.start_factor + (1 - self.start_factor) * s / self.warmup)
      end
      local t, T = s - self.warmup, nil
      if self.period then
        T = self.period
        while t >= T do t = t - T; T = T * self.mult end
      else
        T = self.total - self.warmup
        if t > T then t = T end
      end
      return self.min_lr + (b - self.min_lr) * (1 + math.cos(math.pi * t / T)) / 2
    end,
  }))
end

local function per_group(kind, v, n, what)
  if type(v) == "number" then
    local t = {}
    for i = 1, n do t[i] = v end
    return t
  end
  if type(v) ~= "table" or #v ~= n then
    serror(kind, ("%s must be a number or a list of %d numbers"):format(what, n))
  end
  return v
end

function schedule.one_cycle(opt, opts)
  opts = opts or {}
  check_keys("one_cycle", opts, {max_lr = true, total = true, epochs = true, steps_per_epoch = true,
                                 pct_start = true, anneal = true, cycle_momentum = true, base_momentum = true,
                                 max_momentum = true, div_factor = true, final_div_factor = true,
                                 three_phase = true})
  local total = opts.total
  if total == nil then
    if opts.epochs == nil or opts.steps_per_epoch == nil then
      serror("one_cycle", "total (or epochs and steps_per_epoch) is required")
    end
    total = int_opt("one_cycle", opts, "epochs", nil, 1) * int_opt("one_cycle", opts, "steps_per_epoch", nil, 1)
  end
  if math.type(total) ~= "integer" or total < 1 then serror("one_cycle", "total must be an integer >= 1") end
  local pct = num_opt("one_cycle", opts, "pct_start", 0.3, function(v) return v >= 0 and v <= 1 end, "in [0, 1]")
  local anneal = opts.anneal or "cos"
  if anneal ~= "cos" and anneal ~= "linear" then serror("one_cycle", "anneal must be \"cos\" or \"linear\"") end
  local div = num_opt("one_cycle", opts, "div_factor", 25.0)
  local fdiv = num_opt("one_cycle", opts, "final_div_factor", 1e4)
  local ngroups = opt and #opt.param_groups or 1
  if opts.max_lr == nil then serror("one_cycle", "max_lr is required") end
  local max_lrs = per_group("one_cycle", opts.max_lr, ngroups, "max_lr")
  local phases
  if opts.three_phase then
    phases = {{pct * total - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"},
              {2 * pct * total - 2, "max_lr", "initial_lr", "base_momentum", "max_momentum"},
              {total - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"}}
  else
    phases = {{pct * total - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"},
              {total - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"}}
  end
  local cycle = opts.cycle_momentum ~= false
  local self = {total = total, phases = phases, anneal = anneal, cycle = cycle, groups = {}}
  local base_m = per_group("one_cycle", opts.base_momentum or 0.85, ngroups, "base_momentum")
  local max_m = per_group("one_cycle", opts.max_momentum or 0.95, ngroups, "max_momentum")
  for gi = 1, ngroups do
    local initial = max_lrs[gi] / div
    self.groups[gi] = {initial_lr = initial, max_lr = max_lrs[gi], min_lr = initial / fdiv,
                       base_momentum = base_m[gi], max_momentum = max_m[gi]}
  end
  if opt and cycle then
    local g1 = opt.param_groups[1]
    if g1.betas == nil and g1.momentum == nil then
      serror("one_cycle", ("%s has no momentum to cycle (cycle_momentum = false)"):format(opt.name))
    end
    for gi, g in ipairs(opt.param_groups) do
      if g.betas then g.betas = {max_m[gi], g.betas[2]} else g.momentum = max_m[gi] end
    end
  end
  if opt then
    for gi, g in ipairs(opt.param_groups) do g.initial_lr = self.groups[gi].initial_lr end
  end
  local function anneal_fn(a, b, p)
    if anneal == "cos" then return b + (a - b) / 2.0 * (math.cos(math.pi * p) + 1) end
    return (b - a) * p + a
  end
  -- the phase and fraction of step s (held at the end past total)
  local function where(s)
    if s > total then s = total end
    local start = 0
    for i, ph in ipairs(phases) do
      if s <= ph[1] or i == #phases then
        return ph, (s - start) / (ph[1] - start)
      end
      start = ph[1]
    end
  end
  self.lr_at = function(sch, _, s, gi)
    local G = sch.groups[gi] or sch.groups[1]
    local ph, p = where(s)
    return anneal_fn(G[ph[2]], G[ph[3]], p)
  end
  if cycle and opt then
    self.set_momentum = function(sch, g, gi, s)
      local G = sch.groups[gi]
      local ph, p = where(s)
      local m = anneal_fn(G[ph[4]], G[ph[5]], p)
      if g.betas then g.betas = {m, g.betas[2]} else g.momentum = m end
    end
  end
  return finish(make("one_cycle", opt, opts, self))
end

function schedule.plateau(opt, opts)
  opts = opts or {}
  check_keys("plateau", opts, {mode = true, factor = true, patience = true, threshold = true,
                               threshold_mode = true, cooldown = true, min_lr = true, eps = true})
  if opt == nil then serror("plateau", "needs an optimizer") end
  local mode = opts.mode or "min"
  if mode ~= "min" and mode ~= "max" then serror("plateau", "mode must be \"min\" or \"max\"") end
  local tmode = opts.threshold_mode or "rel"
  if tmode ~= "rel" and tmode ~= "abs" then serror("plateau", "threshold_mode must be \"rel\" or \"abs\"") end
  local factor = num_opt("plateau", opts, "factor", 0.1, function(v) return v < 1 end, "< 1")
  local self = make("plateau", opt, opts, {
    mode = mode, threshold_mode = tmode, factor = factor,
    patience = int_opt("plateau", opts, "patience", 10, 0),
    threshold = num_opt("plateau", opts, "threshold", 1e-4),
    cooldown = int_opt("plateau", opts, "cooldown", 0, 0),
    min_lrs = per_group("plateau", opts.min_lr or 0, #opt.param_groups, "min_lr"),
    eps = num_opt("plateau", opts, "eps", 1e-8),
    cooldown_counter = 0, num_bad_epochs = 0,
  })
  self.mode_worse = mode == "min" and math.huge or -math.huge
  self.best = self.mode_worse
  self.step = api(function(sch, metric)
    if type(metric) ~= "number" then
      serror("plateau", ("step(metric): expected a number, got %s"):format(type(metric)))
    end
    sch.last_epoch = sch.last_epoch + 1
    local better
    if sch.mode == "min" and sch.threshold_mode == "rel" then better = metric < sch.best * (1 - sch.threshold)
    elseif sch.mode == "min" then better = metric < sch.best - sch.threshold
    elseif sch.threshold_mode == "rel" then better = metric > sch.best * (sch.threshold + 1)
    else better = metric > sch.best + sch.threshold end
    if better then
      sch.best = metric
      sch.num_bad_epochs = 0
    else
      sch.num_bad_epochs = sch.num_bad_epochs + 1
    end
    if sch.cooldown_counter > 0 then
      sch.cooldown_counter = sch.cooldown_counter - 1
      sch.num_bad_epochs = 0
    end
    if sch.num_bad_epochs > sch.patience then
      for gi, g in ipairs(sch.opt.param_groups) do
        local old = g.lr
        local new_lr = math.max(old * sch.factor, sch.min_lrs[gi] or 0)
        if old - new_lr > sch.eps then g.lr = new_lr end
      end
      sch.cooldown_counter = sch.cooldown
      sch.num_bad_epochs = 0
    end
    local lrs = {}
    for gi, g in ipairs(sch.opt.param_groups) do lrs[gi] = g.lr end
    sch._last_lr = lrs
    return lrs
  end)
  local lrs = {}
  for gi, g in ipairs(opt.param_groups) do lrs[gi] = g.lr end
  self._last_lr = lrs
  return self
end

local function check_subs(kind, opt, subs)
  if type(subs) ~= "table" or #subs == 0 then serror(kind, "expected a list of schedules") end
  for i, s in ipairs(subs) do
    if getmetatable(s) ~= Sched or not s.lr_at then
      serror(kind, ("element %d is not a schedule with a closed form (plateau cannot be composed)"):format(i))
    end
    if s.opt ~= opt then serror(kind, ("schedule %d belongs to another optimizer"):format(i)) end
  end
end

-- chain(opt, {s1, s2, ...}) or chain{s1, s2, ...} (the optimizer of s1).
function schedule.chain(opt, subs, opts)
  if subs == nil and getmetatable(opt) ~= Optimizer then opt, subs = opt and opt[1] and opt[1].opt, opt end
  check_subs("chain", opt, subs)
  return finish(make("chain", opt, opts, {
    subs = {table.unpack(subs)},
    lr_at = function(self, b, s, gi)
      for _, sub in ipairs(self.subs) do b = sub:lr_at(b, s, gi) end
      return b
    end,
  }))
end

-- sequential(opt, {s1, s2, ...}, {milestones = {m1, ...}})
function schedule.sequential(opt, subs, opts)
  opts = opts or {}
  check_subs("sequential", opt, subs)
  local ms = opts.milestones
  if type(ms) ~= "table" or #ms ~= #subs - 1 then
    serror("sequential", ("milestones must list %d steps (one fewer than the schedules)"):format(#subs - 1))
  end
  for i = 1, #ms do
    if math.type(ms[i]) ~= "integer" or (i > 1 and ms[i] < ms[i - 1]) then
      serror("sequential", "milestones must be increasing integers")
    end
  end
  local o = {}
  for k, v in pairs(opts) do if k ~= "milestones" then o[k] = v end end
  return finish(make("sequential", opt, o, {
    subs = {table.unpack(subs)}, milestones = {table.unpack(ms)},
    lr_at = function(self, b, s, gi)
      local idx, start = 1, 0
      for i, m in ipairs(self.milestones) do
        if s >= m then idx, start = i + 1, m end
      end
      return self.subs[idx]:lr_at(b, s - start, gi)
    end,
  }))
end

-- public functions and methods: errors point at the caller
for k, f in pairs(schedule) do
  schedule[k] = api(function(opt, ...)
    if k ~= "chain" then check_opt(k, opt) end
    return f(opt, ...)
  end)
end
for _, k in ipairs{"step", "get_last_lr", "value", "state_dict", "load_state_dict"} do Sched[k] = api(Sched[k]) end

-- }======================================================================

return optim
