-- keel.nn: modules in Lua over the engine's differentiable ops.
--
--   local nn = require("keel").nn
--   local Net = nn.Module:extend("Net")
--   function Net:init(n) self.fc1 = nn.Linear(n, 32); self.fc2 = nn.Linear(32, 1) end
--   function Net:forward(x) return self.fc2(self.fc1(x):relu()) end
--   local net = Net(8)                 -- Net(...) builds an instance and calls init
--   for name, p in net:named_parameters() do print(name, p) end   -- fc1.weight, ...
--
-- A module is a plain Lua table whose metatable is its class. Fields are
-- stored raw, so reading self.weight costs one table access; only the
-- first assignment of a field goes through __newindex, which records the
-- order fields were added in. That order is the order of
-- named_parameters(), state_dict() and the printed tree, as in PyTorch.
-- Every field is one of:
--   * a module                       a child (named after the field)
--   * a tensor passed to Parameter   a parameter (even with requires_grad off)
--   * any other tensor               a buffer: in state_dict(), moved by to()
--   * anything else                  plain state, ignored by the traversals
-- Containers keep their children under the integer keys 1, 2, ...; their
-- names are "1", "2", ... (1-based, the Lua convention; PyTorch's are 0-based).
-- Lua tables of modules are not children: use ModuleList or ModuleDict.

local keel = require "keel"
local core = require "keel.core"

local is_tensor = core.is_tensor
local no_grad = keel.no_grad

local nn = {}
-- Set before the area installers run, so that `require("keel").nn` inside
-- them finds this table instead of loading this file a second time.
package.loaded["keel.nn"] = nn
rawset(keel, "nn", nn)

---------------------------------------------------------------------------
-- Parameters
---------------------------------------------------------------------------

-- Tensors marked as parameters. Weak keys: marking keeps nothing alive.
local is_param = setmetatable({}, {__mode = "k"})

-- nn.Parameter(t [, requires_grad]): marks t as a parameter and turns
-- requires_grad on (off when requires_grad is false). A non-leaf t is
-- detached first, so the parameter is always a leaf. Returns the parameter.
function nn.Parameter(t, requires_grad)
  if not is_tensor(t) then
    error("Parameter: argument #1: expected a keel.Tensor, got " .. type(t), 2)
  end
  if not t.is_leaf then t = t:detach() end
  t.requires_grad = requires_grad ~= false
  is_param[t] = true
  return t
end

function nn.is_parameter(t) return is_param[t] == true end

---------------------------------------------------------------------------
-- Classes
---------------------------------------------------------------------------

local is_class = setmetatable({}, {__mode = "k"})

-- Per instance: the order its fields were added in (`order`, a list of
-- keys, and `pos`, key -> true) and the names of non-persistent buffers.
local info = setmetatable({}, {__mode = "k"})

local function info_of(self)
  local inf = info[self]
  if not inf then
    inf = {order = {}, pos = {}}
    info[self] = inf
  end
  return inf
end

local function is_module(v)
  return type(v) == "table" and is_class[getmetatable(v)] == true
end
nn.is_module = is_module

-- Called for the first assignment of a field (or the first after it was
-- set to nil): records the key, last, as PyTorch does after `del`.
local function module_newindex(self, k, v)
  if v ~= nil then
    local inf = info_of(self)
    if inf.pos[k] then
      local order = inf.order
      for i = 1, #order do
        if order[i] == k then table.remove(order, i); break end
      end
    end
    inf.pos[k] = true
    inf.order[#inf.order + 1] = k
  end
  rawset(self, k, v)
end

local Module = {}
nn.Module = Module

local function construct(class, ...)
  local self = setmetatable({}, class)
  info[self] = {order = {}, pos = {}}
  self.training = true
  self:init(...)
  return self
end

local function class_tostring(class) return "keel.nn class " .. class.__name end

local function make_class(class, parent, name)
  class.__index = class
  class.__name = name
  class.super = parent
  is_class[class] = true
  return setmetatable(class, {__index = parent, __call = construct, __tostring = class_tostring})
end

-- Class:extend(name): a new class inheriting from Class. Metamethods are
-- looked up raw by Lua, so they are copied down; redefine one on the new
-- class to change it there.
function Module:extend(name)
  if not is_class[self] then
    error("extend: called on an instance; call it on a class (Module:extend(name))", 2)
  end
  if type(name) ~= "string" then
    error("extend: argument #1: expected a class name (string), got " .. type(name), 2)
  end
  local class = {}
  for k, v in pairs(self) do
    if type(k) == "string" and k:sub(1, 2) == "__" and k ~= "__index" and k ~= "__name" then
      class[k] = v
    end
  end
  return make_class(class, self, name)
end

Module.__newindex = module_newindex
make_class(Module, nil, "Module")

function Module:init() end

function Module:forward()
  error(self.__name .. ": forward is not implemented", 2)
end

-- Calling a module runs its forward. All calls go through here (the place
-- for forward hooks).
function Module:__call(...)
  return self:forward(...)
end

function Module:extra_repr() return "" end

---------------------------------------------------------------------------
-- Traversal
---------------------------------------------------------------------------

local function key_less(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta < tb end
  if ta == "number" or ta == "string" then return a < b end
  return tostring(a) < tostring(b)
end

-- The keys of self's modules and tensors, in the order they were added.
-- Fields stored with rawset (never seen by __newindex) follow, sorted.
local function field_keys(self)
  local inf = info_of(self)
  local keys = {}
  for _, k in ipairs(inf.order) do
    local v = rawget(self, k)
    if v ~= nil and (is_tensor(v) or is_module(v)) then keys[#keys + 1] = k end
  end
  local extra
  for k, v in next, self do
    if not inf.pos[k] and (is_tensor(v) or is_module(v)) then
      extra = extra or {}
      extra[#extra + 1] = k
    end
  end
  if extra then
    table.sort(extra, key_less)
    for _, k in ipairs(extra) do keys[#keys + 1] = k end
  end
  return keys
end

local function join(prefix, k)
  if prefix == "" then return tostring(k) end
  return prefix .. "." .. tostring(k)
end

-- An iterator over a list of {name, value} pairs.
local function iter(pairs_list)
  local i = 0
  return function()
    i = i + 1
    local e = pairs_list[i]
    if e then return e[1], e[2] end
  end
end

-- {name, module} for self and every module under it, depth first, each
-- module once (the first name it is reached by).
local function collect_modules(self, prefix, out, seen)
  if seen[self] then return out end
  seen[self] = true
  out[#out + 1] = {prefix, self}
  for _, k in ipairs(field_keys(self)) do
    local v = rawget(self, k)
    if is_module(v) then collect_modules(v, join(prefix, k), out, seen) end
  end
  return out
end

-- {name, tensor} for the tensors of kind ("param" or "buffer") in self
-- (and under it when recurse ~= false), each tensor once.
local function collect_tensors(self, kind, recurse)
  local mods = recurse == false and {{"", self}} or collect_modules(self, "", {}, {})
  local out, seen = {}, {}
  for _, e in ipairs(mods) do
    local prefix, m = e[1], e[2]
    for _, k in ipairs(field_keys(m)) do
      local v = rawget(m, k)
      if is_tensor(v) and not seen[v] and ((kind == "param") == (is_param[v] == true)) then
        seen[v] = true
        out[#out + 1] = {join(prefix, k), v}
      end
    end
  end
  return out
end

-- Lists (to pass on, index or count) ...
function Module:parameters(recurse)
  local out = {}
  for i, e in ipairs(collect_tensors(self, "param", recurse)) do out[i] = e[2] end
  return out
end

function Module:buffers(recurse)
  local out = {}
  for i, e in ipairs(collect_tensors(self, "buffer", recurse)) do out[i] = e[2] end
  return out
end

-- {name, child} for the direct children; with dedup, each module once.
local function child_entries(self, dedup)
  local out, seen = {}, {}
  for _, k in ipairs(field_keys(self)) do
    local v = rawget(self, k)
    if is_module(v) and not (dedup and seen[v]) then
      seen[v] = true
      out[#out + 1] = {tostring(k), v}
    end
  end
  return out
end

function Module:children()
  local out = {}
  for i, e in ipairs(child_entries(self, true)) do out[i] = e[2] end
  return out
end

function Module:modules()
  local out = {}
  for i, e in ipairs(collect_modules(self, "", {}, {})) do out[i] = e[2] end
  return out
end

-- ... and iterators over (name, value) for the named forms:
--   for name, p in model:named_parameters() do ... end
function Module:named_parameters(recurse)
  return iter(collect_tensors(self, "param", recurse))
end

function Module:named_buffers(recurse)
  return iter(collect_tensors(self, "buffer", recurse))
end

function Module:named_children()
  return iter(child_entries(self, true))
end

-- Self first, named "".
function Module:named_modules()
  return iter(collect_modules(self, "", {}, {}))
end

-- register_buffer(name, t [, {persistent = false}]): same as assigning the
-- field, except that a non-persistent buffer stays out of state_dict().
function Module:register_buffer(name, t, opts)
  if type(name) ~= "string" then
    error("register_buffer: argument #1: expected a name (string), got " .. type(name), 2)
  end
  if t ~= nil and not is_tensor(t) then
    error("register_buffer: argument #2: expected a keel.Tensor or nil, got " .. type(t), 2)
  end
  if t ~= nil and is_param[t] then
    error("register_buffer: '" .. name .. "' is a parameter, expected a plain tensor", 2)
  end
  local inf = info_of(self)
  if opts and opts.persistent == false then
    inf.nonpersistent = inf.nonpersistent or {}
    inf.nonpersistent[name] = true
  elseif inf.nonpersistent then
    inf.nonpersistent[name] = nil
  end
  self[name] = t
  return t
end

-- register_parameter(name, p): marks p as a parameter and assigns the field.
function Module:register_parameter(name, p)
  if type(name) ~= "string" then
    error("register_parameter: argument #1: expected a name (string), got " .. type(name), 2)
  end
  if p ~= nil then p = nn.Parameter(p) end
  self[name] = p
  return p
end

-- apply(fn): fn(m) on every child (recursively), then on self; returns self.
function Module:apply(fn)
  if type(fn) ~= "function" then
    error("apply: argument #1: expected a function, got " .. type(fn), 2)
  end
  for _, c in ipairs(self:children()) do c:apply(fn) end
  fn(self)
  return self
end

---------------------------------------------------------------------------
-- Modes, gradients, conversion
---------------------------------------------------------------------------

function Module:train(mode)
  if mode == nil then mode = true end
  if type(mode) ~= "boolean" then
    error("train: argument #1: expected a boolean, got " .. type(mode), 2)
  end
  for _, m in ipairs(self:modules()) do m.training = mode end
  return self
end

function Module:eval() return self:train(false) end

-- requires_grad_([b]): turns requires_grad on (or off) for every parameter.
function Module:requires_grad_(b)
  if b == nil then b = true end
  for _, p in ipairs(self:parameters()) do p.requires_grad = b end
  return self
end

-- zero_grad(): clears every parameter's gradient (.grad = nil, as
-- PyTorch's default set_to_none); zero_grad{set_to_none = false} zeroes
-- existing gradients in place instead.
function Module:zero_grad(opts)
  local to_none = not (opts and opts.set_to_none == false)
  for _, p in ipairs(self:parameters()) do
    if to_none then
      p.grad = nil
    else
      local g = p.grad
      if g then no_grad(function() g:zero_() end) end
    end
  end
  return self
end

function Module:num_parameters(trainable_only)
  local n = 0
  for _, p in ipairs(self:parameters()) do
    if not trainable_only or p.requires_grad then n = n + p:numel() end
  end
  return n
end

local DTYPES = {
  float32 = "float32", f32 = "float32", float = "float32",
  float64 = "float64", f64 = "float64", double = "float64",
}

-- to(x): x is a dtype ("float32", "float64", or a short name), a device
-- ("cpu"), a tensor (its dtype and device), or {dtype =, device =}. A
-- dtype converts the floating-point parameters and buffers (int64 buffers
-- stay); a device moves all of them. A converted tensor replaces the field
-- (a parameter is marked again, with the same requires_grad, and its
-- .grad is converted too); a tensor shared by several fields stays shared.
-- Optimizers hold the old tensors: build them after to(). Returns self.
function Module:to(x)
  local dtype, device
  if type(x) == "string" then
    if DTYPES[x] then dtype = DTYPES[x] elseif x == "int64" or x == "i64" or x == "long" then
      error("to: dtype " .. x .. " is not a floating-point dtype, expected float32 or float64", 2)
    else device = x end
  elseif is_tensor(x) then
    dtype, device = x.dtype, x.device
    if not DTYPES[dtype] then dtype = nil end
  elseif type(x) == "table" and not is_module(x) then
    if x.dtype ~= nil then
      dtype = DTYPES[x.dtype]
      if not dtype then
        error("to: dtype " .. tostring(x.dtype) .. " is not a floating-point dtype, expected float32 or float64", 2)
      end
    end
    device = x.device
  else
    error("to: argument #1: expected a dtype, a device, a tensor or {dtype=, device=}, got " .. type(x), 2)
  end

  local function convert(t)
    local floating = t.dtype == "float32" or t.dtype == "float64"
    local want_dtype = (dtype and floating) and dtype or t.dtype
    local want_device = device or t.device
    if want_dtype == t.dtype and want_device == t.device then return t end
    local n = t
    if want_device ~= t.device then n = n:to(want_device) end
    if want_dtype ~= n.dtype then n = n:to(want_dtype) end
    return n
  end

  local done = {}  -- old tensor -> new tensor
  no_grad(function()
    for _, m in ipairs(self:modules()) do
      for _, k in ipairs(field_keys(m)) do
        local t = rawget(m, k)
        if is_tensor(t) then
          local n = done[t]
          if n == nil then
            n = convert(t)
            if n ~= t and is_param[t] then
              local g = t.grad
              n = nn.Parameter(n, t.requires_grad)
              if g then n.grad = convert(g) end
            end
            done[t] = n
          end
          rawset(m, k, n)
        end
      end
    end
  end)
  return self
end

function Module:float() return self:to("float32") end
function Module:double() return self:to("float64") end
function Module:cpu() return self:to("cpu") end

---------------------------------------------------------------------------
-- State dict
---------------------------------------------------------------------------

-- A state dict is a plain table name -> tensor; its metatable makes
-- pairs() follow the model's order (keys added later come after, sorted).
local sd_keys = setmetatable({}, {__mode = "k"})

local function sd_pairs(sd)
  local keys, seen = {}, {}
  for _, k in ipairs(sd_keys[sd] or {}) do
    if rawget(sd, k) ~= nil then keys[#keys + 1] = k; seen[k] = true end
  end
  local extra = {}
  for k in next, sd do if not seen[k] then extra[#extra + 1] = k end end
  table.sort(extra, key_less)
  for _, k in ipairs(extra) do keys[#keys + 1] = k end
  local i = 0
  return function()
    i = i + 1
    local k = keys[i]
    if k ~= nil then return k, rawget(sd, k) end
  end, sd, nil
end

local StateDict = {__name = "keel.StateDict", __pairs = sd_pairs}

-- All parameters and persistent buffers by dotted name: each module's
-- parameters, then its buffers, then its children's (PyTorch's order). A
-- tensor or module reached by two names appears under both (as in
-- PyTorch); a module that contains itself is an error.
local function state_entries(self)
  local out, active = {}, {}
  local function walk(m, prefix)
    if active[m] then
      error("state_dict: module " .. (prefix == "" and "(root)" or prefix) .. " contains itself", 0)
    end
    active[m] = true
    local np = info_of(m).nonpersistent
    local keys = field_keys(m)
    for pass = 1, 2 do
      for _, k in ipairs(keys) do
        local v = rawget(m, k)
        if is_tensor(v) and (pass == 1) == (is_param[v] == true)
           and not (pass == 2 and np and np[k]) then
          out[#out + 1] = {join(prefix, k), v}
        end
      end
    end
    for _, k in ipairs(keys) do
      local v = rawget(m, k)
      if is_module(v) then walk(v, join(prefix, k)) end
    end
    active[m] = nil
  end
  walk(self, "")
  return out
end

-- state_dict([{keep_vars = true}]): tensors are detached (sharing storage
-- with the model) unless keep_vars.
function Module:state_dict(opts)
  local keep = opts and opts.keep_vars
  local sd, keys = {}, {}
  for _, e in ipairs(state_entries(self)) do
    keys[#keys + 1] = e[1]
    sd[e[1]] = keep and e[2] or e[2]:detach()
  end
  sd_keys[sd] = keys
  return setmetatable(sd, StateDict)
end

local function shape_str(s)
  local p = {}
  for i, v in ipairs(s) do p[i] = tostring(v) end
  return "[" .. table.concat(p, ",") .. "]"
end

-- load_state_dict(sd [, {strict = true}]): copies every entry of sd into
-- the tensor of the same name, in place and without recording. Nothing is
-- copied if an entry has the wrong shape or is not a tensor, nor (strict)
-- if keys are missing or unexpected; the error lists every problem.
-- Returns {missing = {...}, unexpected = {...}}.
function Module:load_state_dict(sd, opts)
  if type(sd) ~= "table" then
    error("load_state_dict: argument #1: expected a state dict (table), got " .. type(sd), 2)
  end
  local strict = not (opts and opts.strict == false)
  local entries = state_entries(self)
  local want = {}
  for _, e in ipairs(entries) do want[e[1]] = e[2] end

  local missing, unexpected, bad = {}, {}, {}
  for _, e in ipairs(entries) do
    local name, t = e[1], e[2]
    local v = sd[name]
    if v == nil then
      missing[#missing + 1] = name
    elseif not is_tensor(v) then
      bad[#bad + 1] = ("%s is a %s, expected a keel.Tensor"):format(name, type(v))
    else
      local a, b = v.shape, t.shape
      local same = #a == #b
      for i = 1, #a do if a[i] ~= b[i] then same = false end end
      if not same then
        bad[#bad + 1] = ("%s has shape %s, expected %s"):format(name, shape_str(a), shape_str(b))
      end
    end
  end
  local ordered = getmetatable(sd) == StateDict
  for k in pairs(sd) do
    if want[k] == nil then unexpected[#unexpected + 1] = tostring(k) end
  end
  if not ordered then table.sort(unexpected) end

  local problems = {}
  if strict and #missing > 0 then
    problems[#problems + 1] = "missing keys: " .. table.concat(missing, ", ")
  end
  if strict and #unexpected > 0 then
    problems[#problems + 1] = "unexpected keys: " .. table.concat(unexpected, ", ")
  end
  for _, b in ipairs(bad) do problems[#problems + 1] = b end
  if #problems > 0 then
    error("load_state_dict: " .. table.concat(problems, "; "), 2)
  end

  no_grad(function()
    for _, e in ipairs(entries) do
      local v = sd[e[1]]
      if v ~= nil then e[2]:copy_(v) end
    end
  end)
  return {missing = missing, unexpected = unexpected}
end

---------------------------------------------------------------------------
-- Printing: PyTorch's module tree
---------------------------------------------------------------------------

-- Indents every line of s but the first.
local function addindent(s, n)
  local pad = string.rep(" ", n)
  return (s:gsub("\n", "\n" .. pad))
end

function Module:__tostring()
  local lines = {}
  local extra = self:extra_repr()
  local nextra = 0
  if extra ~= nil and extra ~= "" then
    for line in (tostring(extra) .. "\n"):gmatch("(.-)\n") do
      lines[#lines + 1] = line
      nextra = nextra + 1
    end
  end
  for _, e in ipairs(child_entries(self, false)) do
    local name, child = e[1], e[2]
    lines[#lines + 1] = "(" .. name .. "): " .. addindent(tostring(child), 2)
  end
  local s = self.__name .. "("
  if #lines > 0 then
    if nextra == 1 and #lines == 1 then
      s = s .. lines[1]
    else
      s = s .. "\n  " .. table.concat(lines, "\n  ") .. "\n"
    end
  end
  return s .. ")"
end

---------------------------------------------------------------------------
-- Containers
---------------------------------------------------------------------------

-- level: of the caller to blame (1 = the caller of check_module's caller).
local function check_module(who, v, i, level)
  if not is_module(v) then
    error(("%s: element %s: expected a Module, got %s"):format(who, tostring(i), type(v)), level + 2)
  end
end

-- nn.Sequential{m1, m2, ...} or nn.Sequential(m1, m2, ...): seq[i], #seq,
-- ipairs(seq); seq:add(m) (= append). forward passes the arguments to the
-- first module and the first result of each module to the next; it returns
-- everything the last one returns (the input when empty).
local Sequential = Module:extend("Sequential")
nn.Sequential = Sequential

function Sequential:init(...)
  local list = table.pack(...)
  local n = list.n
  if n == 1 and type(list[1]) == "table" and not is_module(list[1]) then
    list = list[1]
    n = #list
  end
  for i = 1, n do
    check_module("Sequential", list[i], i, 2)
    self[i] = list[i]
  end
end

function Sequential:add(m)
  check_module("Sequential", m, #self + 1, 1)
  self[#self + 1] = m
  return self
end
Sequential.append = Sequential.add

function Sequential:forward(...)
  local n = #self
  if n == 0 then return ... end
  if n == 1 then return self[1](...) end
  local x = self[1](...)
  for i = 2, n - 1 do x = self[i](x) end
  return self[n](x)
end

-- nn.ModuleList{m1, m2, ...}: a list of children, list[i], #list, ipairs;
-- append(m), extend(list). No forward.
local ModuleList = Module:extend("ModuleList")
nn.ModuleList = ModuleList

function ModuleList:init(list)
  if list ~= nil then
    if type(list) ~= "table" or is_module(list) then
      error("ModuleList: argument #1: expected a list of modules, got " .. type(list), 3)
    end
    for i = 1, #list do
      check_module("ModuleList", list[i], i, 2)
      self[i] = list[i]
    end
  end
end

function ModuleList:append(m)
  check_module("ModuleList", m, #self + 1, 1)
  self[#self + 1] = m
  return self
end

-- On the class, extend(name) makes a subclass; on an instance it appends
-- every module of a list.
function ModuleList:extend(x)
  if is_class[self] then return Module.extend(self, x) end
  if type(x) ~= "table" then
    error("extend: argument #1: expected a list of modules, got " .. type(x), 2)
  end
  for i = 1, #x do self:append(x[i]) end
  return self
end

-- nn.ModuleDict{name = m, ...} (added in sorted name order: a Lua table
-- has none) or nn.ModuleDict{{"name", m}, ...} (in list order). d.name or
-- d["name"]; d:add(name, m); d:keys(), d:values(), d:items() (iterator),
-- #d. A name may not be a method name (it would hide the method).
local ModuleDict = Module:extend("ModuleDict")
nn.ModuleDict = ModuleDict

function ModuleDict:init(t)
  if t == nil then return end
  if type(t) ~= "table" or is_module(t) then
    error("ModuleDict: argument #1: expected a table of modules, got " .. type(t), 3)
  end
  if #t > 0 then
    for i, e in ipairs(t) do
      if type(e) ~= "table" or type(e[1]) ~= "string" then
        error(("ModuleDict: element %d: expected a {name, module} pair"):format(i), 3)
      end
      self:add(e[1], e[2])
    end
  else
    local names = {}
    for k in pairs(t) do
      if type(k) ~= "string" then
        error("ModuleDict: keys must be strings, got " .. type(k), 3)
      end
      names[#names + 1] = k
    end
    table.sort(names)
    for _, k in ipairs(names) do self:add(k, t[k]) end
  end
end

function ModuleDict:add(name, m)
  if type(name) ~= "string" then
    error("ModuleDict: name: expected a string, got " .. type(name), 2)
  end
  if name == "training" or (rawget(self, name) == nil and getmetatable(self)[name] ~= nil) then
    error("ModuleDict: name '" .. name .. "' would hide a field or method of the module", 2)
  end
  check_module("ModuleDict", m, name, 1)
  self[name] = m
  return self
end

-- Every name, also when two names hold the same module.
function ModuleDict:keys()
  local out = {}
  for i, e in ipairs(child_entries(self, false)) do out[i] = e[1] end
  return out
end

function ModuleDict:values()
  local out = {}
  for i, e in ipairs(child_entries(self, false)) do out[i] = e[2] end
  return out
end

function ModuleDict:items() return iter(child_entries(self, false)) end
function ModuleDict:__len() return #child_entries(self, false) end

---------------------------------------------------------------------------
-- Functional ops, initialisers and the layer files
---------------------------------------------------------------------------

local F = {}
for k, v in pairs(core._nn) do F[k] = v end
nn.functional = F
nn.F = F

-- linear(x, w [, b]): x @ w^T + b, with x [..., in], w [out, in], b [out].
function F.linear(x, w, b)
  if not is_tensor(x) then error("linear: argument #1: expected a keel.Tensor, got " .. type(x), 2) end
  if not is_tensor(w) then error("linear: argument #2: expected a keel.Tensor, got " .. type(w), 2) end
  if w:dim() ~= 2 then
    error(("linear: weight has %d dimensions, expected 2 ([out, in])"):format(w:dim()), 2)
  end
  local nin = w.shape[2]
  if x:dim() == 0 or x.shape[x:dim()] ~= nin then
    error(("linear: input has shape %s, expected %d features in the last dimension"):format(
      shape_str(x.shape), nin), 2)
  end
  local y = x:matmul(w:t())
  if b ~= nil then
    if not is_tensor(b) then error("linear: argument #3: expected a keel.Tensor or nil, got " .. type(b), 2) end
    y = y + b
  end
  return y
end

nn.init = require "keel.nn_init"

-- Each bindings/keel/nn/<area>.lua returns function(nn) that adds its
-- modules and functional forms. An error in one is raised as is, and the
-- half-built nn is forgotten so that the next require fails the same way.
local ok, err = pcall(function()
  for _, area in ipairs{"linear", "conv", "norm", "act", "loss", "rnn"} do
    if package.searchpath("keel.nn." .. area, package.path) then
      require("keel.nn." .. area)(nn)
    end
  end
end)
if not ok then
  package.loaded["keel.nn"] = nil
  rawset(keel, "nn", nil)
  error(err, 0)
end

return nn
