-- keel.clip: gradient clipping.
--
-- Transforms for an optimizer's `clip` option (applied inside the
-- optimizer's step, in C, in one pass; .grad is left as it was):
--   clip.value(v)                        every element to [-v, v]
--   clip.norm(max, {p = 2})              each tensor alone to p-norm <= max
--   clip.global_norm(max, {p = 2})       all tensors together (p = 1, 2, math.huge, any > 0)
--   clip.agc(clipping, {eps = 1e-3})     unit-wise adaptive clipping (Brock et al. 2021, Optax)
--   clip.percentile{p = 10, history = N} AutoClip (Seetharaman et al. 2020)
--   clip.zscore{z = 2.5, alpha = 0.97, warmup = 25, eps = 1e-6, mode = "adaptive", max_norm = nil}
--                                        ZClip (Kumar et al. 2025)
--   clip.chain{t1, t2, ...}              in order
-- Every threshold (v, max, clipping, p of percentile, z) may be a number, a
-- function of the step (the optimizer's applied steps before this one) or
-- an object with a :value(step) method (a detached schedule, see
-- keel.optim.schedule); it is resolved before each step.
--
-- Standalone, in place on .grad (PyTorch's torch.nn.utils names):
--   clip.clip_grad_norm_(params, max_norm, {p = 2, error_if_nonfinite = false}) -> total norm
--   clip.clip_grad_value_(params, v)
--   clip.agc_(params, clipping, {eps = 1e-3})
--   clip.grad_stats(tensors) -> {{numel, nan, inf, zeros, sum, sumsq, sum_abs, max_abs, norm}, ...}

local core = require "keel.core"
local C = core._optim

local clip = {}

-- Raises e again at the given level (counted from the caller of reraise):
-- a message that starts with a position inside keel's own Lua files (or
-- has none) gets the caller's position instead; others (a user
-- function's error) pass unchanged.
local function reraise(e, level)
  e = tostring(e)
  local stripped, n = e:gsub("^[^\n]-keel[/\\][%w_]+%.lua:%d+: ", "", 1)
  if n > 0 or not e:find("^[^\n]-:%d+: ") then error(stripped, level + 1) end
  error(e, 0)
end

-- f as a public function: its errors point at its caller.
local function api(f)
  return function(...)
    local ok, r = pcall(f, ...)
    if not ok then reraise(r, 2) end
    return r
  end
end
clip._api = api

local Transform = {}
Transform.__index = Transform
Transform.__name = "keel.clip"

local function describe(t)
  local thr = t.threshold
  if type(thr) ~= "number" then thr = "<" .. type(thr) .. ">" end
  if t.kind == "chain" then
    local parts = {}
    for i, c in ipairs(t.items) do parts[i] = describe(c) end
    return "chain{" .. table.concat(parts, ", ") .. "}"
  end
  return ("%s(%s)"):format(t.kind, tostring(thr))
end
Transform.__tostring = function(t) return "keel.clip." .. describe(t) end

local function is_transform(x) return getmetatable(x) == Transform end
clip.is_transform = is_transform

-- A threshold argument: a number, a function of the step, or an object
-- with :value(step).
local function check_threshold(fn, v, what)
  local tv = type(v)
  if tv == "number" then
    if v ~= v then error(("clip.%s: %s is NaN"):format(fn, what), 3) end
    return v
  end
  if tv == "function" then return v end
  if (tv == "table" or tv == "userdata") and type(v.value) == "function" then return v end
  error(("clip.%s: %s must be a number, a function of the step or a schedule, got %s"):format(fn, what, tv), 3)
end

local function norm_order(fn, p)
  if p == nil then return 2 end
  if p == "inf" then return math.huge end
  if type(p) ~= "number" or not (p > 0) then
    error(("clip.%s: p must be a number > 0 or math.huge, got %s"):format(fn, tostring(p)), 3)
  end
  return p
end

local function check_opts(fn, opts, allowed)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error(("clip.%s: options must be a table, got %s"):format(fn, type(opts)), 3) end
  for k in pairs(opts) do
    if not allowed[k] then error(("clip.%s: unknown option '%s'"):format(fn, tostring(k)), 3) end
  end
  return opts
end

local function new(t) return setmetatable(t, Transform) end

function clip.value(v)
  return new{kind = "value", threshold = check_threshold("value", v, "the bound")}
end

function clip.norm(max_norm, opts)
  opts = check_opts("norm", opts, {p = true})
  return new{kind = "norm", threshold = check_threshold("norm", max_norm, "max_norm"), p = norm_order("norm", opts.p)}
end

function clip.global_norm(max_norm, opts)
  opts = check_opts("global_norm", opts, {p = true})
  return new{kind = "global_norm", threshold = check_threshold("global_norm", max_norm, "max_norm"),
             p = norm_order("global_norm", opts.p)}
end

function clip.agc(clipping, opts)
  opts = check_opts("agc", opts, {eps = true})
  local eps = opts.eps or 1e-3
  if type(eps) ~= "number" or not (eps >= 0) then error("clip.agc: eps must be a number >= 0", 2) end
  return new{kind = "agc", threshold = check_threshold("agc", clipping, "clipping"), eps = eps}
end

function clip.percentile(opts)
  opts = check_opts("percentile", opts, {p = true, history = true})
  local h = opts.history
  if h ~= nil and (math.type(h) ~= "integer" or h < 1) then
    error("clip.percentile: history must be an integer >= 1 (or nil for all)", 2)
  end
  return new{kind = "percentile", threshold = check_threshold("percentile", opts.p or 10, "p"), window = h or 0}
end

function clip.zscore(opts)
  opts = check_opts("zscore", opts, {z = true, alpha = true, warmup = true, eps = true, mode = true,
                                     max_norm = true})
  local mode = opts.mode or "adaptive"
  if mode ~= "adaptive" and mode ~= "mean" then
    error(("clip.zscore: mode must be \"adaptive\" or \"mean\", got %s"):format(tostring(mode)), 2)
  end
  local warmup = opts.warmup or 25
  if math.type(warmup) ~= "integer" or warmup < 1 then error("clip.zscore: warmup must be an integer >= 1", 2) end
  for _, k in ipairs{"alpha", "eps", "max_norm"} do
    if opts[k] ~= nil and type(opts[k]) ~= "number" then
      error(("clip.zscore: %s must be a number, got %s"):format(k, type(opts[k])), 2)
    end
  end
  return new{kind = "zscore", threshold = check_threshold("zscore", opts.z or 2.5, "z"),
             alpha = opts.alpha or 0.97, window = warmup, eps = opts.eps or 1e-6,
             mode = mode == "mean" and 1 or 0, max_norm = opts.max_norm or 0}
end

function clip.chain(list)
  if type(list) ~= "table" or is_transform(list) then
    error("clip.chain: expected a list of transforms, e.g. clip.chain{clip.value(5), clip.global_norm(1)}", 2)
  end
  for i, t in ipairs(list) do
    if not is_transform(t) then
      error(("clip.chain: element %d is not a clip transform (got %s)"):format(i, type(t)), 2)
    end
  end
  return new{kind = "chain", items = {table.unpack(list)}}
end

-- The flat list of transforms of t (a transform, a chain, or nil).
function clip._flatten(t, out)
  out = out or {}
  if t == nil then return out end
  if not is_transform(t) then
    error(("clip: expected a clip transform (keel.clip.value, .global_norm, ...), got %s"):format(type(t)), 3)
  end
  if t.kind == "chain" then
    for _, c in ipairs(t.items) do clip._flatten(c, out) end
  else
    out[#out + 1] = t
  end
  return out
end

-- The threshold's value at step.
function clip._resolve(thr, step, where)
  local v = thr
  if type(thr) == "function" then v = thr(step)
  elseif type(thr) ~= "number" then v = thr:value(step) end
  if type(v) ~= "number" then
    error(("%s: the threshold function returned %s at step %d, expected a number"):format(where, type(v), step), 3)
  end
  return v
end

---------------------------------------------------------------------------
-- Standalone
---------------------------------------------------------------------------

local function param_list(fn, params)
  if core.is_tensor(params) then return {params} end
  if type(params) ~= "table" then
    error(("%s: argument #1: expected a tensor or a list of tensors, got %s"):format(fn, type(params)), 3)
  end
  return params
end

-- torch.nn.utils.clip_grad_norm_: returns the total norm (a number).
-- opts may be the norm order itself, as torch's positional norm_type.
clip.clip_grad_norm_ = api(function(params, max_norm, opts)
  if type(opts) == "number" or opts == "inf" then opts = {p = opts} end
  opts = check_opts("clip_grad_norm_", opts, {p = true, error_if_nonfinite = true, norm_type = true})
  if type(max_norm) ~= "number" then
    error(("clip_grad_norm_: argument #2: max_norm must be a number, got %s"):format(type(max_norm)), 2)
  end
  local p = norm_order("clip_grad_norm_", opts.p or opts.norm_type)
  return C.clip_grad_norm(param_list("clip_grad_norm_", params), max_norm, p, opts.error_if_nonfinite)
end)

clip.clip_grad_value_ = api(function(params, v)
  if type(v) ~= "number" then
    error(("clip_grad_value_: argument #2: clip_value must be a number, got %s"):format(type(v)), 2)
  end
  C.clip_grad_value(param_list("clip_grad_value_", params), v)
end)

-- Optax adaptive_grad_clip(clipping, eps) applied to each parameter's .grad.
clip.agc_ = api(function(params, clipping, opts)
  opts = check_opts("agc_", opts, {eps = true})
  if type(clipping) ~= "number" then
    error(("agc_: argument #2: clipping must be a number, got %s"):format(type(clipping)), 2)
  end
  C.clip_grad_agc(param_list("agc_", params), clipping, opts.eps or 1e-3)
end)

clip.grad_stats = api(function(tensors)
  return C.grad_stats(param_list("grad_stats", tensors))
end)

return clip
