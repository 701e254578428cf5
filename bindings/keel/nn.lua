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


function Module:extra_repr() return "" end

---------------------------------------------------------------------------
-- Hooks
---------------------------------------------------------------------------
-- Forward pre-hooks, forward hooks and full backward (pre-)hooks, per
-- module and global. They live in side tables keyed by the module, not in
-- its fields: state_dict(), to() and the traversals never see them.
--
-- Backward hooks work on the tape alone: when a module with backward hooks
-- is called with grad mode on, the tensor arguments that require grad are
-- routed through one identity node (a view for one tensor, a cat of the
-- flattened tensors for several) and so are its tensor results. A tensor
-- hook on the results' node sees every grad_output at once, before the
-- module's own backward; one on the arguments' node sees every grad_input
-- at once, after it. Each call keeps its own record, so a module called
-- twice in a forward fires twice per backward (and again on a second
-- backward through a retained graph).

local hooks = require "keel.hooks"
local pack, unpack = table.pack, table.unpack

local KINDS = {"pre", "fwd", "bpre", "bwd"}

-- module -> record {pre = {...}, fwd = {...}, bpre = {...}, bwd = {...}}:
-- lists of entries {fn = f} (one table per registration, so that the same
-- function registered twice gives two hooks that remove separately), kept
-- by keel.hooks' handles. The record also caches its plan (see plan()).
local hooked = setmetatable({}, {__mode = "k"})
-- The same lists for every module (nn.register_module_*), run first.
local global = {pre = {}, fwd = {}, bpre = {}, bwd = {}}
local n_global = 0
-- Records in `hooked` plus n_global: while 0, a call need not look its
-- module up (an upvalue test is cheaper than a table lookup).
local n_hooked = 0
-- Bumped by every registration and removal: cached plans older than it
-- are rebuilt.
local gen = 0

local hooked_call  -- defined below

-- Calling a module runs its forward. Every call goes through here: with no
-- hook anywhere and anomaly scopes off it is a tail call to forward after
-- two tests (measured: about 10 ns more per call than a bare tail call).
function Module:__call(...)
  if n_hooked == 0 and hooks.scope_enter == nil then
    return self:forward(...)
  end
  return hooked_call(self, ...)
end

-- The functions of kind (global first, then the record's), as a new list;
-- nil when none. Plans hold these lists and never change them, so a hook
-- may add or remove hooks while a list runs.
local function collect(kind, rec)
  local g, l = global[kind], rec[kind]
  local ng, nl = #g, #l
  if ng + nl == 0 then return nil end
  local out = {}
  for i = 1, ng do out[i] = g[i].fn end
  for i = 1, nl do out[ng + i] = l[i].fn end
  return out
end

-- A module without a record of its own uses this one (global hooks only).
local NONE = {pre = {}, fwd = {}, bpre = {}, bwd = {}}

-- rec with its plan up to date: p_pre, p_fwd, p_bpre, p_bwd (lists of
-- functions or nil), p_full (full backward hooks: route the arguments),
-- p_bw (any backward hook: route the results).
local function plan(rec)
  rec = rec or NONE
  if rec.gen ~= gen then
    rec.gen = gen
    rec.p_pre, rec.p_fwd = collect("pre", rec), collect("fwd", rec)
    rec.p_bpre, rec.p_bwd = collect("bpre", rec), collect("bwd", rec)
    rec.p_full = rec.p_bwd ~= nil
    rec.p_bw = rec.p_full or rec.p_bpre ~= nil
  end
  return rec
end

-- The traceback of an error in a forward hook, the hook's message first.
local function traceback(e)
  if type(e) ~= "string" then
    local mt = getmetatable(e)
    e = (mt and mt.__tostring) and tostring(e) or ("(error object is a " .. type(e) .. " value)")
  end
  return debug.traceback(e, 2)
end

local function hook_failed(self, what, i, tb)
  error(("%s\n(raised in %s #%d of %s)"):format(tb, what, i, self.__name or "a module"), 0)
end

local function shape_eq(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

local function shape_str(s)
  local p = {}
  for i, v in ipairs(s) do p[i] = tostring(v) end
  return "[" .. table.concat(p, ",") .. "]"
end

-- Routes list[i] for i in pos through one identity node: returns that node's
-- tensor (to hook) and, for several tensors, what split() needs to cut its
-- gradient apart. list[i] is replaced by a view after the node.
local function route(list, pos)
  if #pos == 1 then
    local x = list[pos[1]]
    local v = x:view(x.shape)
    list[pos[1]] = v
    return v, nil
  end
  local flat, meta = {}, {}
  for k, i in ipairs(pos) do
    local x = list[i]
    flat[k] = x:reshape({-1})
    meta[k] = {shape = x.shape, dtype = x.dtype, numel = x:numel()}
  end
  local c = keel.cat(flat, 1)   -- promotes mixed dtypes; cast back below
  local off = 1
  for k, i in ipairs(pos) do
    local m = meta[k]
    local v = c:narrow(1, off, m.numel):view(m.shape)
    if v.dtype ~= m.dtype then v = v:to(m.dtype) end
    list[i] = v
    off = off + m.numel
  end
  return c, meta
end

-- The gradient g of route()'s node as a list {n = n, [pos[k]] = grad}.
local function split(g, pos, meta, n)
  local out = {n = n}
  if not meta then out[pos[1]] = g; return out end
  local off = 1
  for k, i in ipairs(pos) do
    local m = meta[k]
    local gi = g:narrow(1, off, m.numel):view(m.shape)
    if gi.dtype ~= m.dtype then gi = gi:to(m.dtype) end
    out[i] = gi
    off = off + m.numel
  end
  return out
end

-- Merges a hook's returned list r into cur: a non-nil entry replaces the
-- gradient at a routed position; anything else is an error.
local function merge(cur, r, pos, what, name)
  if type(r) ~= "table" then
    error(("%s: expected a list of gradients (table) or nil as the result, got %s"):format(
      what, type(r)), 0)
  end
  local routed = {}
  for _, i in ipairs(pos) do routed[i] = true end
  for k, v in pairs(r) do
    if k ~= "n" then
      if not routed[k] then
        error(("%s: %s[%s]: the module has no gradient there (not a tensor, or it does not require grad), got a %s"):format(
          what, name, tostring(k), type(v)), 0)
      end
      cur[k] = v
    end
  end
end

-- The replacement for route()'s node gradient when a hook changed cur
-- (compared with orig), else nil. Entries are checked against the shapes.
local function replacement(cur, orig, pos, meta, what, name)
  local changed = false
  for _, i in ipairs(pos) do
    local v, o = cur[i], orig[i]
    if v == nil then
      cur[i] = o
    elseif v ~= o then
      if not is_tensor(v) or not shape_eq(v.shape, o.shape) then
        error(("%s: %s[%d]: expected a keel.Tensor of shape %s, got %s"):format(what, name, i,
          shape_str(o.shape), is_tensor(v) and "shape " .. shape_str(v.shape) or type(v)), 0)
      end
      changed = true
    end
  end
  if not changed then return nil end
  if not meta then return cur[pos[1]] end
  local flat = {}
  for k, i in ipairs(pos) do flat[k] = cur[i]:reshape({-1}) end
  return keel.cat(flat, 1)
end

local function copy_list(l)
  local c = {n = l.n}
  for k, v in pairs(l) do c[k] = v end
  return c
end

-- Runs the full backward hooks of call's module with (grad_input,
-- grad_output); returns the replacement for the inputs' node gradient.
local function fire_full(call, self, gin, gout)
  local full = plan(hooked[self]).p_bwd
  if not full then return nil end
  local orig = copy_list(gin)
  for i = 1, #full do
    local r = full[i](self, gin, gout)
    if r ~= nil then merge(gin, r, call.in_pos, "full backward hook", "grad_input") end
  end
  return replacement(gin, orig, call.in_pos, call.in_meta, "full backward hook", "grad_input")
end

-- The hook on the results' node: grad_output is complete.
local function output_grad_hook(call)
  return function(g)
    local self = call.mod
    local gout = split(g, call.out_pos, call.out_meta, call.nout)
    local orig = copy_list(gout)
    local bpre = plan(hooked[self]).p_bpre
    if bpre then
      for i = 1, #bpre do
        local r = bpre[i](self, gout)
        if r ~= nil then merge(gout, r, call.out_pos, "full backward pre-hook", "grad_output") end
      end
    end
    local rep = replacement(gout, orig, call.out_pos, call.out_meta, "full backward pre-hook", "grad_output")
    if call.full then
      if #call.in_pos == 0 then
        -- No argument requires grad: the full hooks fire now, grad_input all nil.
        fire_full(call, self, {n = call.nin}, gout)
      else
        call.gout = gout
      end
    end
    return rep
  end
end

-- The hook on the arguments' node: grad_input is complete.
local function input_grad_hook(call)
  return function(g)
    local self = call.mod
    local gout = call.gout or {n = call.nout or 0}
    call.gout = nil
    return fire_full(call, self, split(g, call.in_pos, call.in_meta, call.nin), gout)
  end
end

-- Routes the arguments of one call; returns the call's record. The record
-- is held by the tape's hooks (through the registry) as long as the graph
-- lives: it keeps no tensor of the graph, so that a graph never keeps
-- itself alive. It keeps the module, so that the hooks of a module dropped
-- before backward (nn.ReLU()(x) in a forward) still fire; a module that
-- stores its own non-leaf results in a field and is then dropped keeps
-- its last graph alive.
local function route_inputs(self, args, full)
  local call = {mod = self, full = full, nin = args.n, in_pos = {}}
  if not full then return call end
  local pos = call.in_pos
  for i = 1, args.n do
    local x = args[i]
    if is_tensor(x) and x.requires_grad then pos[#pos + 1] = i end
  end
  if #pos > 0 then
    local node
    node, call.in_meta = route(args, pos)
    node:register_hook(input_grad_hook(call))
  end
  return call
end

local function route_outputs(call, res)
  local pos = {}
  for i = 1, res.n do
    local y = res[i]
    if is_tensor(y) and y.requires_grad then pos[#pos + 1] = i end
  end
  call.nout, call.out_pos = res.n, pos
  if #pos == 0 then return end
  local node
  node, call.out_meta = route(res, pos)
  node:register_hook(output_grad_hook(call))
end

-- Applies what forward hook #i returned (ok, ...) to the results res;
-- returns res or the table that replaces it.
local function take_results(self, i, res, ok, ...)
  if not ok then hook_failed(self, "forward hook", i, (...)) end
  local n = select("#", ...)
  if n == 0 or (...) == nil then return res end
  if n == 1 then
    res[1] = ...
    if res.n < 1 then res.n = 1 end
    return res
  end
  return pack(...)
end

-- A module call with hooks (or anomaly scopes): pre-hooks, routing of the
-- arguments for backward hooks, forward, forward hooks, routing of the
-- results (PyTorch's order).
local function run(self, ...)
  local rec = hooked[self]
  if rec == nil and n_global == 0 then return self:forward(...) end
  rec = plan(rec)
  local pre, fwd = rec.p_pre, rec.p_fwd
  local bw = rec.p_bw and keel.is_grad_enabled()
  if not (pre or fwd or bw) then return self:forward(...) end
  local args = pack(...)
  if pre then
    for i = 1, #pre do
      local ok, r = xpcall(pre[i], traceback, self, args)
      if not ok then hook_failed(self, "forward pre-hook", i, r) end
      if r ~= nil then
        if type(r) == "table" then
          local n = r.n or #r
          if math.type(n) ~= "integer" or n < 0 then
            error(("forward pre-hook #%d of %s: returned arguments with n = %s, expected an integer >= 0"):format(
              i, self.__name, tostring(r.n)), 0)
          end
          args = table.move(r, 1, n, 1, {n = n})
        else
          args[1] = r
          if args.n < 1 then args.n = 1 end
        end
      end
    end
  end
  local call = bw and route_inputs(self, args, rec.p_full) or nil
  if not (fwd or call) then return self:forward(unpack(args, 1, args.n)) end
  local res = pack(self:forward(unpack(args, 1, args.n)))
  if fwd then
    for i = 1, #fwd do
      res = take_results(self, i, res, xpcall(fwd[i], traceback, self, args, res[1], res))
    end
  end
  if call then route_outputs(call, res) end
  return unpack(res, 1, res.n)
end

-- The scope ends when the call does, also when it raises (a to-be-closed
-- variable, so the error keeps its own traceback).
local Scope = {__close = function(s) if s.leave then s.leave(s.tok) end end}

hooked_call = function(self, ...)
  local enter = hooks.scope_enter
  if enter == nil then return run(self, ...) end
  local leave = hooks.scope_leave
  local scope <close> = setmetatable({tok = enter(self), leave = leave}, Scope)
  return run(self, ...)
end

local function check_hook(who, fn, opts)
  if type(fn) ~= "function" then
    error(who .. ": argument #1: expected a function, got " .. type(fn), 3)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error(who .. ": argument #2: expected an options table or nil, got " .. type(opts), 3)
  end
end

-- Appends (or with opts.prepend, prepends) {fn = fn} to list.
local function add_entry(list, fn, opts, on_remove)
  local entry = {fn = fn}
  local h = hooks.add(list, entry, on_remove)
  if opts and opts.prepend then
    table.remove(list)
    table.insert(list, 1, entry)
  end
  gen = gen + 1
  return h
end

local function uncount(rec)
  if rec.counted then
    rec.counted = false
    n_hooked = n_hooked - 1
  end
end

-- A module collected with hooks still registered is uncounted when its
-- record goes (the handles may keep the record alive a while longer).
local Rec = {__gc = uncount}

-- m:register_forward_pre_hook(fn [, {prepend = true}]) etc.: see the docs
-- (docs/lua-api.md, "nn: module hooks"). Each returns a handle with :remove().
for name, kind in pairs{register_forward_pre_hook = "pre", register_forward_hook = "fwd",
                        register_full_backward_pre_hook = "bpre", register_full_backward_hook = "bwd"} do
  Module[name] = function(self, fn, opts)
    if is_class[self] or not is_module(self) then
      error(name .. ": expected a module instance (call it as m:" .. name .. "(fn))", 2)
    end
    check_hook(name, fn, opts)
    local rec = hooked[self]
    if not rec then
      rec = setmetatable({pre = {}, fwd = {}, bpre = {}, bwd = {}, counted = true}, Rec)
      hooked[self] = rec
      n_hooked = n_hooked + 1
    end
    return add_entry(rec[kind], fn, opts, function()
      gen = gen + 1
      -- the last hook gone: back to the fast path
      if hooked[self] == rec and #rec.pre + #rec.fwd + #rec.bpre + #rec.bwd == 0 then
        hooked[self] = nil
        uncount(rec)
      end
    end)
  end
  -- nn.register_module_forward_pre_hook(fn [, opts]) etc.: for every module.
  local gname = name:gsub("^register_", "register_module_")
  nn[gname] = function(fn, opts)
    check_hook(gname, fn, opts)
    n_global, n_hooked = n_global + 1, n_hooked + 1
    return add_entry(global[kind], fn, opts, function()
      gen = gen + 1
      n_global, n_hooked = n_global - 1, n_hooked - 1
    end)
  end
end

-- For tests and tools: the number of hooks of each kind on m.
function nn._hook_counts(m)
  local rec = hooked[m]
  local out = {}
  for _, k in ipairs(KINDS) do out[k] = rec and #rec[k] or 0 end
  return out
end

-- The parameter each hooks.grad list belongs to, so that a removal that
-- empties a list can drop it (to() moves lists to converted parameters).
local grad_owner = setmetatable({}, {__mode = "kv"})

-- model:on_grad(fn [, {filter = pattern | function(name, p)}]): fn(name,
-- grad, stats) for every parameter (those whose name matches the Lua
-- pattern, or for which filter returns true), called by the optimizer's
-- step (see optim). Returns one handle that removes them all.
function Module:on_grad(fn, opts)
  if type(fn) ~= "function" then
    error("on_grad: argument #1: expected a function(name, grad, stats), got " .. type(fn), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("on_grad: argument #2: expected an options table or nil, got " .. type(opts), 2)
  end
  local filter = opts and opts.filter
  if filter ~= nil and type(filter) ~= "string" and type(filter) ~= "function" then
    error("on_grad: option 'filter': expected a Lua pattern (string) or a function(name, p), got "
      .. type(filter), 2)
  end
  local handles = {}
  for name, p in self:named_parameters() do
    local keep = true
    if type(filter) == "string" then keep = name:find(filter) ~= nil
    elseif filter then keep = filter(name, p) and true or false end
    if keep then
      local list = hooks.grad[p]
      if not list then
        list = {}
        hooks.grad[p] = list
      end
      grad_owner[list] = p
      handles[#handles + 1] = hooks.add(list, {fn = fn, name = name}, function()
        if #list == 0 then
          local q = grad_owner[list]
          if q ~= nil and hooks.grad[q] == list then hooks.grad[q] = nil end
        end
      end)
    end
  end
  return hooks.group(handles)
end

-- Moves the on_grad hooks of parameter old to its converted copy new.
local function move_grad_hooks(old, new)
  local list = hooks.grad[old]
  if list then
    hooks.grad[new] = list
    hooks.grad[old] = nil
    grad_owner[list] = new
  end
end

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
-- ("cpu", "cuda", "cuda:0"), a tensor (its dtype and device), or
-- {dtype =, device =}. A dtype converts the floating-point parameters and
-- buffers (int64 buffers stay); a device moves all of them. A move to
-- another device alone happens in place (Tensor:set_data): every
-- parameter and buffer stays the same tensor, with its .grad moved too,
-- so hooks and references keep working. A dtype change makes new tensors
-- that replace the fields (a parameter is marked again, with the same
-- requires_grad, and its .grad is converted too). A tensor shared by
-- several fields stays shared. Optimizer state follows its parameter (it
-- moves at the next step), so an optimizer may be built before or after
-- to(). Returns self.
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
  if device ~= nil then
    if device == "cuda:0" then device = "cuda" end
    if device ~= "cpu" and device ~= "cuda" then
      if type(device) == "string" and device:match("^cuda:%d+$") then
        error("to: device " .. device .. ": keel uses one GPU per process, \"cuda\" or \"cuda:0\" "
              .. "(choose which with CUDA_VISIBLE_DEVICES)", 2)
      end
      error("to: unknown device or dtype " .. tostring(device)
            .. " (expected \"cpu\", \"cuda\", \"float32\" or \"float64\")", 2)
    end
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
            if n ~= t and n.dtype == t.dtype and t.is_leaf then
              -- Only the device changes: the data moves in place (torch's
              -- `param.data = ...`), so this tensor stays the one that an
              -- optimizer, hooks and user code hold. Its .grad follows.
              local g = t.grad
              if g ~= nil then t.grad = nil end
              t:set_data(n)
              if g ~= nil then t.grad = convert(g) end
              n = t
            elseif n ~= t and is_param[t] then
              -- A dtype change makes a new Parameter: an optimizer's state
              -- has the old dtype, and must not be handed the new one.
              local g = t.grad
              n = nn.Parameter(n, t.requires_grad)
              if g then n.grad = convert(g) end
              move_grad_hooks(t, n)
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
function Module:cuda() return self:to("cuda") end

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
  local nin, xs = w.shape[2], x.shape
  local nd = #xs
  if nd == 0 or xs[nd] ~= nin then
    error(("linear: input has shape %s, expected %d features in the last dimension"):format(
      shape_str(xs), nin), 2)
  end
  local y
  if nd > 2 and nin > 0 then
    -- one [rows, in] product: its weight gradient is one GEMM, where a
    -- batched product's would be a GEMM per batch entry and a sum
    xs[nd] = w.shape[1]
    y = x:reshape{-1, nin}:matmul(w:t()):reshape(xs)
  else
    y = x:matmul(w:t())
  end
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
