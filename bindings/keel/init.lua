-- keel: the Lua face of the engine. The C module keel.core does the work;
-- this file adds what reads better in Lua: printing, no_grad, functional
-- forms of the methods and a few conveniences.

local core = require "keel.core"

local keel = {}
for k, v in pairs(core) do keel[k] = v end

local Tensor = core.Tensor   -- method table of every tensor
local mt = core._mt          -- the userdata metatable
keel._mt = nil

---------------------------------------------------------------------------
-- Grad mode
---------------------------------------------------------------------------

-- Runs fn(...) with recording off; restores the mode even when fn errors.
function keel.no_grad(fn, ...)
  if type(fn) ~= "function" then
    error("no_grad: argument #1: expected a function, got " .. type(fn), 2)
  end
  local prev = core.set_grad_enabled(false)
  local res = table.pack(pcall(fn, ...))
  core.set_grad_enabled(prev)
  if not res[1] then error(res[2], 0) end
  return table.unpack(res, 2, res.n)
end

-- Same, with recording on.
function keel.enable_grad(fn, ...)
  local prev = core.set_grad_enabled(true)
  local res = table.pack(pcall(fn, ...))
  core.set_grad_enabled(prev)
  if not res[1] then error(res[2], 0) end
  return table.unpack(res, 2, res.n)
end

---------------------------------------------------------------------------
-- Conveniences
---------------------------------------------------------------------------

local function like(name, make)
  keel[name] = function(t, ...)
    if not core.is_tensor(t) then
      error(name .. ": argument #1: expected a keel.Tensor, got " .. type(t), 2)
    end
    return make(t, ...)
  end
end
-- t's dtype and device unless opts says otherwise
local function like_opts(t, opts)
  local o = {dtype = t.dtype, device = t.device}
  for k, v in pairs(opts or {}) do o[k] = v end
  return o
end
like("zeros_like", function(t, opts) return core.zeros(t.shape, like_opts(t, opts)) end)
like("ones_like", function(t, opts) return core.ones(t.shape, like_opts(t, opts)) end)
like("empty_like", function(t, opts) return core.empty(t.shape, like_opts(t, opts)) end)
like("rand_like", function(t, opts) return core.rand(t.shape, like_opts(t, opts)) end)
like("randn_like", function(t, opts) return core.randn(t.shape, like_opts(t, opts)) end)
like("full_like", function(t, v, opts)
  if type(v) ~= "number" then
    error("full_like: argument #2: expected a number, got " .. type(v), 3)
  end
  return core.full(t.shape, v, like_opts(t, opts))
end)

function Tensor:expand_as(other) return self:expand(other.shape) end
function Tensor:view_as(other) return self:view(other.shape) end
function Tensor:type_as(other) return self:to(other.dtype) end

-- flatten(start, stop): merges dims start..stop (1-based, default all).
function Tensor:flatten(start, stop)
  local shape, nd = self.shape, self:dim()
  if nd == 0 then return self:reshape{1} end
  start, stop = start or 1, stop or -1
  if start < 0 then start = start + nd + 1 end
  if stop < 0 then stop = stop + nd + 1 end
  if start < 1 or stop > nd or start > stop then
    error(("flatten: dimensions %d..%d out of range for %d dimensions"):format(start, stop, nd), 2)
  end
  local out, merged = {}, 1
  for i = 1, start - 1 do out[#out + 1] = shape[i] end
  for i = start, stop do merged = merged * shape[i] end
  out[#out + 1] = merged
  for i = stop + 1, nd do out[#out + 1] = shape[i] end
  return self:reshape(out)
end

function Tensor:T()
  local nd = self:dim()
  local perm = {}
  for i = 1, nd do perm[i] = nd - i + 1 end
  return self:permute(perm)
end

-- Functional forms: keel.exp(t), keel.sum(t, 1), keel.matmul(a, b), ...
-- (not t:cuda() and t:cpu(): keel.cuda is the CUDA module)
local not_functional = {cuda = true, cpu = true}
for name, fn in pairs(Tensor) do
  if keel[name] == nil and type(fn) == "function" and not not_functional[name] then
    keel[name] = function(t, ...)
      if not core.is_tensor(t) then
        error(name .. ": argument #1: expected a keel.Tensor, got " .. type(t), 2)
      end
      return fn(t, ...)
    end
  end
end

---------------------------------------------------------------------------
-- Printing: a header, then values, elided like PyTorch for big tensors
---------------------------------------------------------------------------

local EDGE, THRESHOLD = 3, 1000

-- Values to show along each dim: all, or EDGE from each end with a gap.
local function shown(n, elide)
  local idx = {}
  if elide and n > 2 * EDGE then
    for i = 1, EDGE do idx[#idx + 1] = i end
    idx[#idx + 1] = false
    for i = n - EDGE + 1, n do idx[#idx + 1] = i end
  else
    for i = 1, n do idx[i] = i end
  end
  return idx
end

-- Collects the shown values (numbers) of t in row order.
local function collect(t, elide, out)
  if t:dim() == 0 then out[#out + 1] = t:item(); return end
  if t:dim() == 1 then
    local vals = t:totable()
    for _, i in ipairs(shown(#vals, elide)) do
      if i then out[#out + 1] = vals[i] end
    end
    return
  end
  for _, i in ipairs(shown(t:size(1), elide)) do
    if i then collect(t:select(1, i), elide, out) end
  end
end

local function formatter(values, dtype)
  if dtype == "int64" then
    local w = 1
    for _, v in ipairs(values) do w = math.max(w, #string.format("%d", v)) end
    return function(v) return string.format("%" .. w .. "d", v) end
  end
  local maxabs, minabs, integral, finite = 0, math.huge, true, true
  for _, v in ipairs(values) do
    if v ~= v or v == math.huge or v == -math.huge then
      finite = false
    else
      local a = math.abs(v)
      if a > maxabs then maxabs = a end
      if a > 0 and a < minabs then minabs = a end
      if v ~= math.floor(v) then integral = false end
    end
  end
  local fmt
  if integral and maxabs < 1e8 then
    fmt = "%.0f."
  elseif maxabs >= 1e5 or (minabs < 1e-4 and minabs > 0) then
    fmt = "%.4e"
  else
    fmt = "%.4f"
  end
  local function one(v)
    if v ~= v then return "nan" end
    if v == math.huge then return "inf" end
    if v == -math.huge then return "-inf" end
    return string.format(fmt, v)
  end
  local w = 1
  for _, v in ipairs(values) do w = math.max(w, #one(v)) end
  local _ = finite
  return function(v) local s = one(v); return string.rep(" ", w - #s) .. s end
end

local function render(t, fmt, elide, indent)
  if t:dim() == 0 then return fmt(t:item()) end
  if t:dim() == 1 then
    local vals, parts = t:totable(), {}
    for _, i in ipairs(shown(#vals, elide)) do parts[#parts + 1] = i and fmt(vals[i]) or "..." end
    return "[" .. table.concat(parts, ", ") .. "]"
  end
  local rows = {}
  for _, i in ipairs(shown(t:size(1), elide)) do
    rows[#rows + 1] = i and render(t:select(1, i), fmt, elide, indent .. " ") or "..."
  end
  local sep = "," .. string.rep("\n", t:dim() - 1) .. indent .. " "
  return "[" .. table.concat(rows, sep) .. "]"
end

local function header(t)
  local dims = {}
  for i, s in ipairs(t.shape) do dims[i] = tostring(s) end
  local h = ("[keel.Tensor %s %s %s]"):format(t.dtype, t.device,
    #dims > 0 and table.concat(dims, "x") or "scalar")
  if t.grad_fn then
    h = h .. " grad_fn=" .. t.grad_fn
  elseif t.requires_grad then
    h = h .. " requires_grad"
  end
  return h
end

mt.__tostring = function(t)
  if t.is_closed then return "[keel.Tensor closed]" end
  return keel.no_grad(function()
    local d = t:detach()
    if d:numel() == 0 then return header(t) .. "\n[]" end
    if d.device ~= "cpu" then d = d:cpu() end   -- one copy to the host, not one per row
    local elide = d:numel() > THRESHOLD
    local vals = {}
    collect(d, elide, vals)
    return header(t) .. "\n" .. render(d, formatter(vals, d.dtype), elide, "")
  end)
end

keel.Tensor = Tensor
keel.version = core.version

-- Submodules load on first use: they require "keel" themselves.
local lazy = {nn = "keel.nn", optim = "keel.optim", clip = "keel.clip", data = "keel.data",
              io = "keel.io", checkpoint = "keel.checkpoint", monitor = "keel.monitor",
              autograd = "keel.autograd", hooks = "keel.hooks", amp = "keel.amp",
              cuda = "keel.cuda"}
-- keel.save / keel.load are keel.io's (safetensors)
-- keel.guard(opt, opts) is keel.guard's; keel.progress(total, opts) keel.progress's
local lazy_fn = {save = "keel.io", load = "keel.io", guard = "keel.guard", progress = "keel.progress"}
setmetatable(keel, {__index = function(t, k)
  local name = lazy[k]
  if name then
    local m = require(name)
    rawset(t, k, m)
    return m
  end
  name = lazy_fn[k]
  if name then
    local f = require(name)[k]
    rawset(t, k, f)
    return f
  end
  return nil
end})

return keel
