-- keel.hooks: the registries through which nn, optim, autograd, guard and
-- monitor reach each other without requiring each other.
--
--   hooks.grad[p]       parameter (the Lua userdata held by the model and
--                       the optimizer) -> list of {fn = fn, name = "fc1.weight"}
--                       registered by model:on_grad; the optimizer calls them
--                       from its statistics pass
--   hooks.on(topic, fn) subscribe; returns a handle with :remove()
--   hooks.emit(topic, ...)
--   hooks.scope_enter, hooks.scope_leave
--                       set by keel.autograd while anomaly detection is on,
--                       nil otherwise; Module:__call brackets forward with them
--
-- Topics: "step" (opt, report, loss) after every optimizer step, applied or
-- not; "guard" (event) for every guard event; "anomaly" (event) when
-- anomaly detection names an op.

local M = {}

M.grad = setmetatable({}, {__mode = "k"})

local Handle = {}
Handle.__index = Handle
Handle.__name = "keel.HookHandle"

-- Removes the hook; a second call does nothing.
function Handle:remove()
  local list, entry = self._list, self._entry
  if not list then return end
  self._list = nil
  for i = #list, 1, -1 do
    if list[i] == entry then table.remove(list, i) break end
  end
  if self._on_remove then self._on_remove() end
end

Handle.__tostring = function(self)
  return "keel.HookHandle" .. (self._list and "" or " (removed)")
end

-- Appends entry to list; the handle removes it. on_remove (optional) runs
-- after removal (to drop an emptied registry slot, say).
function M.add(list, entry, on_remove)
  list[#list + 1] = entry
  return setmetatable({_list = list, _entry = entry, _on_remove = on_remove}, Handle)
end

-- A handle that removes several at once.
function M.group(handles)
  local entry = {}
  local h = setmetatable({_list = {entry}, _entry = entry}, Handle)
  h._on_remove = function() for _, x in ipairs(handles) do x:remove() end end
  return h
end

local topics = {}

function M.on(topic, fn)
  if type(fn) ~= "function" then
    error(("hooks.on: argument #2: expected a function, got %s"):format(type(fn)), 2)
  end
  local list = topics[topic]
  if not list then list = {}; topics[topic] = list end
  return M.add(list, fn)
end

-- Calls the listeners of topic in subscription order; a listener added or
-- removed during the call takes effect at the next emit.
function M.emit(topic, ...)
  local list = topics[topic]
  if not list or #list == 0 then return end
  local snapshot = table.move(list, 1, #list, 1, {})
  for i = 1, #snapshot do snapshot[i](...) end
end

function M.has(topic)
  local list = topics[topic]
  return list ~= nil and #list > 0
end

return M
