-- keel.amp: mixed precision. autocast (below) runs float32 products in
-- bfloat16/float16/TF32 for a scope. GradScaler is dynamic loss scaling with
-- PyTorch's torch.cuda.amp.GradScaler semantics (1.13), on any device.
--
--   local scaler = keel.amp.GradScaler()   -- init_scale 2^16, growth x2 every 2000 clean steps, backoff x0.5
--   for xb, yb in loader:batches() do
--     opt:zero_grad()
--     local loss = nn.cross_entropy(model(xb), yb)
--     scaler:scale(loss):backward()         -- gradients carry the scale
--     local r = scaler:step(opt, loss)      -- unscaled inside the fused C step; skipped on overflow
--     scaler:update()                       -- back-off on overflow, growth after growth_interval clean steps
--   end
--
-- The common path costs no pass of its own: scaler:step(opt) hands the
-- scale's inverse to the optimizer's C step, which reads every gradient
-- element as g * inv in its statistics pass and in its update pass (the
-- inverse is the starting value of the per-unit factor that clipping
-- multiplies). Norms, clipping decisions, the report's grad_norm, the
-- on_grad hooks' statistics and the guard all see the unscaled gradient;
-- .grad keeps the scaled values. The parameters and optimizer state come
-- out as PyTorch's scale -> backward -> unscale_ -> clip_grad_norm_ ->
-- step -> update sequence makes them (to the bit when the scale is a power
-- of two, as it stays with the default factors; see keel.h).
--
-- scaler:unscale_(opt) is the explicit path, for a user who wants to read
-- or clip the gradients himself: it unscales every .grad in place (one
-- pass, as PyTorch's) and records whether any is NaN/Inf; the next
-- scaler:step(opt) then steps on them as they are. Once per optimizer
-- between updates, before step (PyTorch's errors otherwise).
--
-- An overflow (NaN/Inf in an unscaled gradient, or found by unscale_) skips
-- the step, whatever the optimizer's non-finite policy: r.applied = false,
-- r.reason = "overflow", r.overflow = true, opt.counters.overflow. It is
-- the scaler's business: a keel.guard does not count it as an event (no lr
-- back-off, no retry, nothing enters its spike windows) and reports "N
-- overflow skips" in its summary. Every scaler step's report has r.scale,
-- the scale the gradients carried (keel.monitor logs it).
--
-- Differences from PyTorch, on purpose: the NaN/Inf check looks at the
-- unscaled values (PyTorch's kernel checks the scaled ones, so a finite
-- gradient that overflows when a scale below 1 is undone reaches its
-- optimizer); and any NaN/Inf a scaler step sees is an overflow skip, even
-- one made after unscale_ by the user's own code (PyTorch would apply it).

local core = require "keel.core"
local api = require("keel.clip")._api
local C = core._optim

local amp = {}

-- {======================================================================
-- autocast: reduced-precision float32 products for a scope
--
--   keel.amp.autocast("bfloat16", function() loss = loss_fn(model(x), y) end)
--   do local ac <close> = keel.amp.autocast("float16") ... end   -- to scope end
--   keel.amp.autocast({dtype = "float16", enabled = use_amp}, fn, ...)
--
-- Inside, the float32 products of matmul, linear, conv2d and the recurrent
-- layers round their operands to dtype ("bfloat16", the default; "float16";
-- "tf32") and sum in float32 (keel.set_float32_matmul_precision, keel.h):
-- tensor-core speed on a GPU, with every tensor staying float32, so the
-- master weights, the optimizer and everything outside the products keep
-- full precision and no op needs a half-precision kernel. Backward runs
-- each product with the precision its forward ran with, so calling
-- loss:backward() after the scope is right (as PyTorch advises).
-- bfloat16 is the default because it keeps float32's range: float16's
-- overflows past 65504 (Inf in the product), which is what a GradScaler is
-- for. The scope ends on return and on error; nesting restores in order.
-- }======================================================================

local DTYPES = {bfloat16 = true, float16 = true, tf32 = true, highest = true}

local Autocast = {}
Autocast.__index = Autocast

function Autocast:__close() self:exit() end
function Autocast:__tostring()
  return ("keel.amp.autocast(%s%s)"):format(self.dtype, self.enabled and "" or ", disabled")
end
-- Restores the precision the scope found (once).
function Autocast:exit()
  if self._open then
    self._open = false
    core.set_float32_matmul_precision(self._prev)
  end
end

function amp.autocast(spec, fn, ...)
  local dtype, enabled = "bfloat16", true
  if type(spec) == "table" then
    for k in pairs(spec) do
      if k ~= "dtype" and k ~= "enabled" then
        error(("autocast: unknown option %q (dtype, enabled)"):format(tostring(k)), 2)
      end
    end
    dtype = spec.dtype or dtype
    if spec.enabled ~= nil then enabled = not not spec.enabled end
  elseif type(spec) == "string" then
    dtype = spec
  elseif spec ~= nil then
    error("autocast: argument #1: expected a dtype name or an options table, got " .. type(spec), 2)
  end
  if type(dtype) ~= "string" or not DTYPES[dtype] then
    error(("autocast: dtype must be \"bfloat16\", \"float16\" or \"tf32\", got %s"):format(tostring(dtype)), 2)
  end
  if fn ~= nil and type(fn) ~= "function" then
    error("autocast: argument #2: expected a function, got " .. type(fn), 2)
  end
  local prev = enabled and core.set_float32_matmul_precision(dtype) or core.get_float32_matmul_precision()
  local scope = setmetatable({dtype = dtype, enabled = enabled, _prev = prev, _open = true}, Autocast)
  if fn == nil then return scope end
  local s <close> = scope
  return fn(...)
end

local READY, UNSCALED, STEPPED = "ready", "unscaled", "stepped"

local GradScaler = {}
GradScaler.__index = GradScaler
GradScaler.__name = "keel.amp.GradScaler"

local KNOWN = {init_scale = true, growth_factor = true, backoff_factor = true, growth_interval = true,
               enabled = true}

local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end

local function num_opt(opts, k, def, ok, what)
  local v = opts[k]
  if v == nil then return def end
  if type(v) ~= "number" or not finite(v) or not ok(v) then
    error(("GradScaler: option '%s': expected %s, got %s"):format(k, what, tostring(v)), 0)
  end
  return v
end

local function int_opt(opts, k, def, min)
  local v = opts[k]
  if v == nil then return def end
  local i = type(v) == "number" and math.tointeger(v)
  if not i or i < min then
    error(("GradScaler: option '%s': expected an integer >= %d, got %s"):format(k, min, tostring(v)), 0)
  end
  return i
end

-- keel.amp.GradScaler{init_scale = 2^16, growth_factor = 2, backoff_factor
-- = 0.5, growth_interval = 2000, enabled = true}
function amp.GradScaler(opts)
  opts = opts == nil and {} or opts
  if type(opts) ~= "table" then
    error(("GradScaler: argument #1: expected a table of options, got %s"):format(type(opts)), 0)
  end
  for k in pairs(opts) do
    if not KNOWN[k] then error(("GradScaler: unknown option '%s'"):format(tostring(k)), 0) end
  end
  if opts.enabled ~= nil and type(opts.enabled) ~= "boolean" then
    error(("GradScaler: option 'enabled': expected a boolean, got %s"):format(tostring(opts.enabled)), 0)
  end
  local init = num_opt(opts, "init_scale", 2.0 ^ 16, function(v) return v > 0 and finite(C.f32(v)) end,
    "a number > 0 within float32's range")
  local self = setmetatable({
    _enabled = opts.enabled ~= false,
    _growth_factor = num_opt(opts, "growth_factor", 2.0, function(v) return v > 1 end, "a number > 1"),
    _backoff_factor = num_opt(opts, "backoff_factor", 0.5, function(v) return v > 0 and v < 1 end,
      "a number in (0, 1)"),
    _growth_interval = int_opt(opts, "growth_interval", 2000, 1),
    _scale = C.f32(init),      -- a float32 value, as torch's scale tensor
    _growth_tracker = 0,
    _started = false,          -- scale() was called (torch's lazy init)
    _per_opt = setmetatable({}, {__mode = "k"}),
  }, GradScaler)
  return self
end

function GradScaler:__tostring()
  if not self._enabled then return "keel.amp.GradScaler(disabled)" end
  return ("keel.amp.GradScaler(scale %.9g, growth x%.9g every %d clean steps (%d so far), backoff x%.9g)"):format(
    self._scale, self._growth_factor, self._growth_interval, self._growth_tracker, self._backoff_factor)
end

local function check_opt(fn, opt)
  if type(opt) ~= "table" or type(opt._amp_step) ~= "function" then
    error(("scaler:%s: argument #1: expected an optimizer (keel.optim.*), got %s"):format(fn, type(opt)), 0)
  end
end

-- torch: "Attempted step but _scale is None" (scale() must come first)
local function check_started(self, fn)
  if not self._started then
    error(("scaler:%s: the scale was never used: this may indicate your script did not call " ..
      "scaler:scale(loss) earlier in the iteration"):format(fn), 0)
  end
end

local function opt_state(self, opt)
  local st = self._per_opt[opt]
  if not st then
    st = {stage = READY, found_inf = false, checked = false}
    self._per_opt[opt] = st
  end
  return st
end

-- The inverse as torch takes it: 1 / scale in double, rounded to float32.
local function inv_scale(self) return C.f32(1 / self._scale) end

-- outputs * scale: a tensor (a new one on the graph) or a list of them
-- (nested lists too); disabled, outputs as they are.
function GradScaler:scale(outputs)
  if not self._enabled then return outputs end
  local s = self._scale
  local function apply(v)
    if core.is_tensor(v) then return v * s end
    if type(v) == "table" and getmetatable(v) == nil then
      local out = {}
      for i, x in ipairs(v) do out[i] = apply(x) end
      return out
    end
    error(("scaler:scale: outputs must be a tensor or a list of tensors, got %s"):format(type(v)), 0)
  end
  local out = apply(outputs)
  self._started = true
  return out
end

-- Unscales opt's gradients in place now (before the user's own clipping or
-- inspection) and records whether any is NaN/Inf. Once per optimizer
-- between updates, before step.
function GradScaler:unscale_(opt)
  if not self._enabled then return end
  check_opt("unscale_", opt)
  check_started(self, "unscale_")
  local st = opt_state(self, opt)
  if st.stage == UNSCALED then
    error("scaler:unscale_: unscale_() has already been called on this optimizer since the last update()", 0)
  elseif st.stage == STEPPED then
    error("scaler:unscale_: unscale_() is being called after step()", 0)
  end
  local nonfinite, ngrads = opt:_unscale_grads(inv_scale(self))
  st.found_inf = nonfinite > 0
  st.checked = ngrads > 0
  st.stage = UNSCALED
end

-- Steps opt unless a gradient overflowed; returns the optimizer's report
-- (r.scale, r.overflow; r.reason = "overflow" on a skip). loss (optional)
-- is the unscaled loss, for the report, the guard and the monitor.
function GradScaler:step(opt, loss)
  check_opt("step", opt)
  if not self._enabled then return opt:step(loss) end
  if type(loss) == "function" then
    error("scaler:step: closure use is not supported if GradScaler is enabled", 0)
  end
  check_started(self, "step")
  local st = opt_state(self, opt)
  if st.stage == STEPPED then
    error("scaler:step: step() has already been called since the last update()", 0)
  end
  local a
  if st.stage == READY then
    -- the fused path: the C step unscales as it reads
    if not opt:_any_grad() then
      error("scaler:step: no inf checks were recorded for this optimizer (no parameter has a gradient: " ..
        "call backward on scaler:scale(loss) first)", 0)
    end
    a = {scale = self._scale, inv = inv_scale(self), found_inf = false}
  else
    if not st.checked then
      error("scaler:step: no inf checks were recorded for this optimizer (unscale_ found no gradient)", 0)
    end
    a = {scale = self._scale, inv = 1, found_inf = st.found_inf}
  end
  local r = opt:_amp_step(loss, a)
  st.found_inf = r.overflow == true
  st.checked = true
  st.stage = STEPPED
  return r
end

-- The scale for the next iteration: backed off when a step of this
-- iteration overflowed, grown after growth_interval clean ones; or
-- new_scale (a number or a one-element tensor; the growth count stays).
-- Returns the new scale.
function GradScaler:update(new_scale)
  if not self._enabled then return nil end
  check_started(self, "update")
  if new_scale ~= nil then
    local v = new_scale
    if core.is_tensor(v) then
      if v:numel() ~= 1 or v.requires_grad then
        error("scaler:update: new_scale should be a number or a 1-element tensor with requires_grad = false", 0)
      end
      v = v:item()
    end
    if type(v) ~= "number" or not (v > 0) or not finite(C.f32(v)) then
      error(("scaler:update: new_scale should be a number > 0 within float32's range, got %s"):format(
        tostring(new_scale)), 0)
    end
    self._scale = C.f32(v)
  else
    local any, found = false, false
    for _, st in pairs(self._per_opt) do
      if st.checked then
        any = true
        found = found or st.found_inf
      end
    end
    if not any then
      error("scaler:update: no inf checks were recorded prior to update (call scaler:step(opt) first)", 0)
    end
    self._scale, self._growth_tracker = C.scale_update(self._scale, self._growth_tracker, found,
      self._growth_factor, self._backoff_factor, self._growth_interval)
  end
  self._per_opt = setmetatable({}, {__mode = "k"})
  return self._scale
end

-- The current scale (1 when disabled).
function GradScaler:get_scale() return self._enabled and self._scale or 1.0 end
function GradScaler:is_enabled() return self._enabled end
function GradScaler:get_growth_factor() return self._growth_factor end
function GradScaler:get_backoff_factor() return self._backoff_factor end
function GradScaler:get_growth_interval() return self._growth_interval end
function GradScaler:get_growth_tracker() return self._growth_tracker end

function GradScaler:set_growth_factor(v)
  self._growth_factor = num_opt({growth_factor = v}, "growth_factor", nil, function(x) return x > 1 end,
    "a number > 1")
end
function GradScaler:set_backoff_factor(v)
  self._backoff_factor = num_opt({backoff_factor = v}, "backoff_factor", nil,
    function(x) return x > 0 and x < 1 end, "a number in (0, 1)")
end
function GradScaler:set_growth_interval(v)
  self._growth_interval = int_opt({growth_interval = v}, "growth_interval", nil, 1)
end

-- PyTorch's keys: {scale, growth_factor, backoff_factor, growth_interval,
-- _growth_tracker}; {} when disabled.
function GradScaler:state_dict()
  if not self._enabled then return {} end
  return {scale = self._scale, growth_factor = self._growth_factor, backoff_factor = self._backoff_factor,
          growth_interval = self._growth_interval, _growth_tracker = self._growth_tracker}
end

-- Checks sd without changing anything (keel.checkpoint calls it first).
function GradScaler:_check_state(sd)
  if not self._enabled then return end
  if type(sd) ~= "table" then
    error("GradScaler.load_state_dict: expected a table from scaler:state_dict()", 0)
  end
  if next(sd) == nil then
    error("GradScaler.load_state_dict: the source state dict is empty, possibly because it was saved from a " ..
      "disabled instance of GradScaler", 0)
  end
  local function need(k, ok, what)
    local v = sd[k]
    if type(v) ~= "number" or not ok(v) then
      error(("GradScaler.load_state_dict: '%s' must be %s, got %s"):format(k, what, tostring(v)), 0)
    end
  end
  need("scale", function(v) return v > 0 and finite(C.f32(v)) end, "a number > 0")
  need("growth_factor", function(v) return finite(v) and v > 1 end, "a number > 1")
  need("backoff_factor", function(v) return v > 0 and v < 1 end, "a number in (0, 1)")
  need("growth_interval", function(v) return math.tointeger(v) ~= nil and v >= 1 end, "an integer >= 1")
  need("_growth_tracker", function(v) return math.tointeger(v) ~= nil and v >= 0 end, "an integer >= 0")
end

-- Restores a state_dict (a disabled scaler ignores it, as PyTorch's).
function GradScaler:load_state_dict(sd)
  if not self._enabled then return end
  self:_check_state(sd)
  self._scale = C.f32(sd.scale)
  self._growth_factor = sd.growth_factor
  self._backoff_factor = sd.backoff_factor
  self._growth_interval = math.tointeger(sd.growth_interval)
  self._growth_tracker = math.tointeger(sd._growth_tracker)
end

-- public entry points: errors point at the caller
amp.GradScaler = api(amp.GradScaler)
for _, k in ipairs{"scale", "unscale_", "step", "update", "set_growth_factor", "set_backoff_factor",
                   "set_growth_interval", "state_dict", "load_state_dict"} do
  GradScaler[k] = api(GradScaler[k])
end

return amp
