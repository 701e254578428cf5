-- keel.autograd: anomaly detection (which op made the first NaN or Inf,
-- where, in which module, at which step) and the registry behind
-- Tensor:register_post_accumulate_grad_hook.
--
--   keel.autograd.detect_anomaly(true)                      -- mode "error"
--   keel.autograd.detect_anomaly(true, {mode = "record"})   -- or "warn"; full = true for tracebacks
--   keel.autograd.detect_anomaly(true, opts, fn)            -- fn runs with it, then the old setting is back
--   local ev = keel.autograd.anomaly()   -- first event since clear_anomaly(), or nil
--
-- An event is a table: phase ("forward" | "backward"), op, module (path in
-- the model, e.g. "rnn.cell", or nil), shapes (the op's input shapes),
-- step (the optimizer step being computed, or nil before the first
-- "step" event), where ("file.lua:45", the line that made the op), nan,
-- inf, cause ("op": it made NaN/Inf from finite inputs; "input": forward
-- input number `input` already held them and no op made it, so it is a
-- parameter or data), input, traceback (full mode), line (one readable
-- line: the error message in mode "error").
--
-- The engine does the checks (engine/anomaly.c); lkeel_autograd.c stamps
-- creation sites and hands events here.

local core = require "keel.core"
local hooks = require "keel.hooks"
local C = core._autograd

local M = {}

local MODES = {error = true, warn = true, record = true}

local state = {
  on = false, mode = "error", full = false,
  step = nil,          -- the step being computed: r.step + 1 of the last "step" event
  first = nil,         -- first event since clear_anomaly()
  step_first = nil,    -- first event since the last "step" event
  warned = {},         -- warn mode: lines already printed
}

---------------------------------------------------------------------------
-- Module scopes: nn's Module:__call brackets forward with these while
-- detection is on; ops made inside get the module's path.
---------------------------------------------------------------------------

local scope_ids, scope_paths = {}, {}      -- path <-> id (bounded by distinct paths)
local names = setmetatable({}, {__mode = "k"})   -- root -> {module -> name or false}
local stack_m, stack_id, depth = {}, {}, 0

local function scope_id(path)
  local id = scope_ids[path]
  if not id then
    id = #scope_paths + 1
    scope_paths[id] = path
    scope_ids[path] = id
  end
  return id
end

local function class_name(m)
  local ok, n = pcall(function() return m.__name end)
  return ok and type(n) == "string" and n or "?"
end

local function names_of(root, fresh)
  local map = not fresh and names[root]
  if not map then
    map = {}
    if type(root) == "table" and type(root.named_modules) == "function" then
      for name, mod in root:named_modules() do
        if map[mod] == nil then map[mod] = name end
      end
    end
    names[root] = map
  end
  return map
end

-- The path of m below the root of the current forward.
local function path_of(m)
  if depth == 0 then return class_name(m) end
  local root = stack_m[1]
  local map = names_of(root)
  local name = map[m]
  if name == nil then
    -- added to the model since the names were taken: take them again,
    -- once; a module outside the tree is remembered as such
    map = names_of(root, true)
    name = map[m]
    if name == nil then map[m] = false end
  end
  if not name then return scope_paths[stack_id[depth]] .. "." .. class_name(m) end
  if name == "" then return class_name(m) end
  return name
end

local scope_leave

local function scope_enter(m)
  local id = scope_id(path_of(m))
  depth = depth + 1
  stack_m[depth], stack_id[depth] = m, id
  C.set_scope(id)
  return depth
end

function scope_leave(tok)
  if type(tok) ~= "number" then return end
  for i = depth, tok, -1 do stack_m[i], stack_id[i] = nil, nil end
  if tok <= depth then depth = tok - 1 end
  C.set_scope(depth > 0 and stack_id[depth] or 0)
  -- detection was turned off inside a forward: leave once it has unwound
  if not state.on and depth == 0 and hooks.scope_leave == scope_leave then hooks.scope_leave = nil end
end

M._scope_enter, M._scope_leave = scope_enter, scope_leave

---------------------------------------------------------------------------
-- Events
---------------------------------------------------------------------------

local function shape_str(s) return "[" .. table.concat(s, ",") .. "]" end

local function num(x)
  if x ~= x then return "nan" end
  return ("%.4g"):format(x)
end

local function format_line(ev)
  local parts = {"anomaly: "}
  if ev.step then parts[#parts + 1] = ("step %d, "):format(ev.step) end
  parts[#parts + 1] = ev.phase .. ": " .. ev.op
  if ev.module then parts[#parts + 1] = " in " .. ev.module end
  local shapes = {}
  for i, s in ipairs(ev.shapes) do shapes[i] = shape_str(s) end
  if #shapes > 0 then
    parts[#parts + 1] = (" (input%s %s)"):format(#shapes > 1 and "s" or "", table.concat(shapes, ", "))
  end
  local counts = ("%d Inf, %d NaN"):format(ev.inf, ev.nan)
  if ev.phase == "backward" then
    parts[#parts + 1] = (" produced %s in the gradient of its input %d from a finite gradient"):format(counts, ev.input)
  elseif ev.cause == "input" then
    parts[#parts + 1] = (" got NaN/Inf in its input %d, which no op made (a parameter or data); its output has %s")
      :format(ev.input, counts)
  else
    parts[#parts + 1] = " produced " .. counts .. " from finite inputs"
  end
  if ev.stats then
    local st = {}
    for i, s in ipairs(ev.stats) do
      st[i] = ("%d: min %s max %s%s"):format(ev.inputs[i], num(s.min), num(s.max),
        s.nonfinite > 0 and (" nonfinite %d"):format(s.nonfinite) or "")
    end
    parts[#parts + 1] = "; inputs " .. table.concat(st, ", ")
  elseif ev.grad_stats then
    parts[#parts + 1] = ("; incoming gradient min %s max %s"):format(num(ev.grad_stats.min), num(ev.grad_stats.max))
  end
  parts[#parts + 1] = "; created at " .. (ev.where or "an unknown site")
  return table.concat(parts)
end

local sites = C.sites()

-- Called from C with the engine's event; returns the message to raise in
-- mode "error".
local function on_event(ev)
  local site = ev.site and sites[ev.site]
  ev.site = nil
  if site then
    ev.where = site.where
    ev.module = site.scope ~= 0 and scope_paths[site.scope] or nil
    ev.traceback = site.traceback
  end
  ev.step = state.step
  ev.line = format_line(ev)
  state.first = state.first or ev
  state.step_first = state.step_first or ev
  hooks.emit("anomaly", ev)
  if state.mode == "warn" then
    -- once per kind of event (the line less its step and counts): one that
    -- recurs every step warns once
    local key = table.concat({ev.phase, ev.op, ev.module or "", ev.where or "", ev.cause, ev.input or 0}, "|")
    if not state.warned[key] then
      state.warned[key] = true
      io.stderr:write(ev.line, "\n")
    end
  elseif state.mode == "error" then
    if ev.traceback then return ev.line .. "\ncreated at:\n" .. ev.traceback end
    return ev.line
  end
end
C.set_handler(on_event)

-- Sites in keel's own Lua files are never creation sites: the one that
-- counts is the user's line (their script, or their module's forward).
do
  local src = debug.getinfo(1, "S").source
  C.set_skip(src:match("^(@.*[/\\])autograd%.lua$"))
end

-- The step being computed follows the optimizer's "step" events.
hooks.on("step", function(_, r)
  if type(r) == "table" and math.type(r.step) == "integer" then
    state.step = r.step + 1
  elseif state.step then
    state.step = state.step + 1
  end
  state.step_first = nil
end)

---------------------------------------------------------------------------
-- API
---------------------------------------------------------------------------

local function set(on, mode, full)
  state.on, state.mode, state.full = on, mode, full
  if on then
    C.set_mode(mode, full)
    hooks.scope_enter, hooks.scope_leave = scope_enter, scope_leave
  else
    C.set_mode("off", false)
    if hooks.scope_enter == scope_enter then hooks.scope_enter = nil end
    if depth == 0 and hooks.scope_leave == scope_leave then hooks.scope_leave = nil end
  end
end

local function check_opts(opts)
  local mode, full = "error", false
  if opts == nil then return mode, full end
  if type(opts) ~= "table" then
    error("detect_anomaly: argument #2: expected an options table, got " .. type(opts), 3)
  end
  for k in pairs(opts) do
    if k ~= "mode" and k ~= "full" then
      error(("detect_anomaly: unknown option '%s' (expected mode, full)"):format(tostring(k)), 3)
    end
  end
  if opts.mode ~= nil then
    if not MODES[opts.mode] then
      error(("detect_anomaly: option 'mode': expected \"error\", \"warn\" or \"record\", got %s")
        :format(type(opts.mode) == "string" and ('"' .. opts.mode .. '"') or tostring(opts.mode)), 3)
    end
    mode = opts.mode
  end
  if opts.full ~= nil then
    if type(opts.full) ~= "boolean" then
      error("detect_anomaly: option 'full': expected a boolean, got " .. type(opts.full), 3)
    end
    full = opts.full
  end
  return mode, full
end

-- detect_anomaly(on [, opts [, fn]]): turns detection on or off; with fn,
-- runs fn() with that setting and puts the previous one back (also when
-- fn raises), returning fn's results.
function M.detect_anomaly(on, opts, fn)
  if type(opts) == "function" and fn == nil then opts, fn = nil, opts end
  if type(on) ~= "boolean" then
    error("detect_anomaly: argument #1: expected a boolean, got " .. type(on), 2)
  end
  local mode, full = check_opts(opts)
  if fn == nil then
    set(on, mode, full)
    return
  end
  if type(fn) ~= "function" then
    error("detect_anomaly: argument #3: expected a function, got " .. type(fn), 2)
  end
  local prev_on, prev_mode, prev_full = state.on, state.mode, state.full
  set(on, mode, full)
  local res = table.pack(pcall(fn))
  set(prev_on, prev_mode, prev_full)
  if not res[1] then error(res[2], 0) end
  return table.unpack(res, 2, res.n)
end

function M.is_anomaly_enabled() return state.on end

-- mode, full (mode is nil when off)
function M.anomaly_mode()
  if not state.on then return nil end
  return state.mode, state.full
end

-- The first event since clear_anomaly() (kept across steps: after a run
-- that died, it names where it started), or nil.
function M.anomaly()
  if state.on then C.flush() end
  return state.first
end

-- The first event of the step being computed, or nil: cleared at every
-- "step" event. The guard reads this in its decision (before the step's
-- own "step" event).
function M.step_anomaly()
  if state.on then C.flush() end
  return state.step_first
end

function M.clear_anomaly()
  state.first, state.step_first = nil, nil
  state.warned = {}
end

-- Sites interned so far (bounded by distinct call sites, not by ops).
function M._site_count() return C.site_count() end
function M._site_of(t) return C.site_of(t) end
-- The step being computed (nil before the first "step" event); set_step
-- is for loops without a keel optimizer.
function M.step() return state.step end
function M.set_step(n)
  if n ~= nil and math.type(n) ~= "integer" then
    error("set_step: argument #1: expected an integer or nil, got " .. type(n), 2)
  end
  state.step = n
end

-- NaN and Inf counts of a float tensor.
function M.count_nonfinite(t)
  if not core.is_tensor(t) then
    error("count_nonfinite: argument #1: expected a keel.Tensor, got " .. type(t), 2)
  end
  return C.count_nonfinite(t)
end

---------------------------------------------------------------------------
-- Post-accumulate-grad hooks: p:register_post_accumulate_grad_hook(fn)
-- (checked in C) lands here. fn(p) runs after backward has committed
-- p.grad, once per backward that gave p a gradient.
---------------------------------------------------------------------------

-- engine handle -> list (weak: the list lives while its tensor's userdata
-- does, through post_by_ud, and is gone before that userdata's __gc runs)
local post_by_ptr = setmetatable({}, {__mode = "v"})
local post_by_ud = setmetatable({}, {__mode = "k"})
C.set_post_hooks(post_by_ptr)

function M._register_post_hook(p, fn)
  local key = C.ptr(p)
  local list = post_by_ud[p] or post_by_ptr[key]
  if not list then list = {owner = p} end
  post_by_ud[p], post_by_ptr[key] = list, list
  return hooks.add(list, {fn = fn}, function()
    if #list == 0 and post_by_ptr[key] == list then
      post_by_ptr[key] = nil
      for ud, l in pairs(post_by_ud) do
        if l == list then post_by_ud[ud] = nil end
      end
    end
  end)
end

return M
