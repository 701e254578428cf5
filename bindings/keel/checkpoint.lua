-- keel.checkpoint: a whole training state in one safetensors file.
--
--   keel.checkpoint.save(path, {model = m, optimizer = opt, schedule = s,
--                               loader = l, guard = g, scaler = sc, step = n, extra = {...}})
--   keel.checkpoint.load(path, {model = m, optimizer = opt, schedule = s,
--                               loader = l, guard = g, scaler = sc [, rng = false]}) -> {step = n, extra = ...}
--
-- Layout: the model's state_dict as tensors "model.<name>" (so the file
-- loads in PyTorch's safetensors like any weights file); every other tensor
-- (optimizer moments, ...) under "optim.<path>", "schedule.<path>",
-- "loader.<path>" or "extra.<path>"; everything else as JSON strings in
-- __metadata__: format, step, rng (keel.get_rng_state(), 64-bit exact),
-- optimizer (opt:state_dict() less its tensors), schedule
-- (sched:state_dict()), loader (l:state()), guard (g:state_dict(): its
-- windows, counters, back-off and retries; not its in-memory snapshots),
-- scaler (a keel.amp.GradScaler's state_dict: scale, growth tracker and
-- factors), extra. Every part is optional on save; load restores the parts it is
-- given (the model strictly, with load_state_dict) and the RNG unless
-- rng = false. The write is atomic, so a crash leaves the previous
-- checkpoint intact.

local keel = require "keel"
local kio = require "keel.io"

local checkpoint = {}

local FORMAT = "keel.checkpoint"
local VERSION = "1"
-- A table standing for a tensor stored in the file under this name.
local REF = "__tensor__"

-- A JSON-able copy of v with its tensors moved to `tensors` under
-- prefix.<path>.
local function split(v, prefix, tensors, seen)
  if keel.is_tensor(v) then
    if tensors[prefix] then error(("checkpoint.save: two tensors named '%s'"):format(prefix), 0) end
    tensors[prefix] = v:detach()
    return {[REF] = prefix}
  end
  if type(v) ~= "table" then return v end
  if seen[v] then error(("checkpoint.save: %s contains itself"):format(prefix), 0) end
  seen[v] = true
  local out = {}
  for k, x in pairs(v) do out[k] = split(x, prefix .. "." .. tostring(k), tensors, seen) end
  seen[v] = nil
  return out
end

-- The inverse: tensor references replaced by the loaded tensors.
local function join(v, tensors, what)
  if type(v) ~= "table" then return v end
  local name = v[REF]
  if name ~= nil then
    local t = tensors[name]
    if not t then error(("checkpoint.load: %s refers to tensor '%s', which the file lacks"):format(what,
      tostring(name)), 0) end
    return t
  end
  local out = {}
  for k, x in pairs(v) do out[k] = join(x, tensors, what) end
  return out
end

local function check_opts(fn, path, opts)
  if type(path) ~= "string" then
    error(("%s: argument #1: expected a file name (string), got %s"):format(fn, type(path)), 3)
  end
  if type(opts) ~= "table" then
    error(("%s: argument #2: expected a table {model = ..., optimizer = ..., ...}, got %s"):format(fn, type(opts)), 3)
  end
end

-- The stateful parts beside the model, in the order load restores them:
-- the option and metadata key, the tensors' prefix, and how to read the
-- state from the object, check it against the object before anything is
-- restored (optional), and restore it.
local PARTS = {
  {key = "optimizer", prefix = "optim", get = function(o) return o:state_dict() end,
   set = function(o, sd)
     o:load_state_dict(sd)
     -- a guarded optimizer keeps the guard's non-finite policy and lr scale
     local g = rawget(o, "_guard")
     if g and g._sync then g:_sync() end
   end},
  {key = "schedule", prefix = "schedule", get = function(o) return o:state_dict() end,
   set = function(o, sd) o:load_state_dict(sd) end},
  {key = "loader", prefix = "loader", get = function(o) return o:state() end,
   set = function(o, sd) if o.load_state then o:load_state(sd) else o:set_state(sd) end end},
  {key = "guard", prefix = "guard", get = function(o) return o:state_dict() end,
   set = function(o, sd) o:load_state_dict(sd) end},
  {key = "scaler", prefix = "scaler", get = function(o) return o:state_dict() end,
   set = function(o, sd) o:load_state_dict(sd) end},
}

function checkpoint.save(path, opts)
  check_opts("checkpoint.save", path, opts)
  local tensors, meta = {}, {format = FORMAT, version = VERSION}
  local ok, err = pcall(function()
    if opts.model ~= nil then
      for k, t in pairs(opts.model:state_dict()) do tensors["model." .. k] = t end
    end
    for _, part in ipairs(PARTS) do
      local obj = opts[part.key]
      if obj ~= nil then meta[part.key] = kio.json_encode(split(part.get(obj), part.prefix, tensors, {})) end
    end
    if opts.extra ~= nil then meta.extra = kio.json_encode(split(opts.extra, "extra", tensors, {})) end
    if opts.step ~= nil then
      if math.type(opts.step) ~= "integer" then
        error("checkpoint.save: step must be an integer, got " .. tostring(opts.step), 0)
      end
      meta.step = kio.json_encode(opts.step)
    end
    meta.rng = kio.json_encode(keel.get_rng_state())
  end)
  if not ok then error(tostring(err), 2) end
  ok, err = pcall(kio.save, path, tensors, {metadata = meta})
  if not ok then error((tostring(err):gsub("^save:", "checkpoint.save:")), 2) end
end

local function decode(meta, key)
  local ok, v = pcall(kio.json_decode, meta[key])
  if not ok then error(("checkpoint.load: corrupt %s state: %s"):format(key, tostring(v)), 0) end
  return v
end

function checkpoint.load(path, opts)
  opts = opts or {}
  check_opts("checkpoint.load", path, opts)
  local ok, tensors, meta = pcall(kio.load, path)
  if not ok then error((tostring(tensors):gsub("^load:", "checkpoint.load:")), 2) end
  local res
  ok, res = pcall(function()
    if meta.format ~= FORMAT then
      error(("checkpoint.load: %s is not a keel checkpoint (no format = %q in its metadata)"):format(path, FORMAT), 0)
    end
    if meta.version ~= VERSION then
      error(("checkpoint.load: %s has checkpoint version %s, expected %s"):format(path, tostring(meta.version),
        VERSION), 0)
    end
    for _, part in ipairs(PARTS) do
      if opts[part.key] ~= nil and meta[part.key] == nil then
        error(("checkpoint.load: %s holds no %s state"):format(path, part.key), 0)
      end
    end
    -- decode and check everything before changing anything
    local msd, states = nil, {}
    if opts.model ~= nil then
      msd = {}
      for k, t in pairs(tensors) do
        local name = k:match("^model%.(.*)$")
        if name then msd[name] = t end
      end
    end
    for i, part in ipairs(PARTS) do
      local obj = opts[part.key]
      if obj ~= nil then
        states[i] = join(decode(meta, part.key), tensors, part.key .. " state")
        if obj._check_state then obj:_check_state(states[i]) end
      end
    end
    local rng = meta.rng and decode(meta, "rng")
    local out = {}
    if meta.step then out.step = decode(meta, "step") end
    if meta.extra then out.extra = join(decode(meta, "extra"), tensors, "extra") end
    if msd then opts.model:load_state_dict(msd) end
    for i, part in ipairs(PARTS) do
      if states[i] ~= nil then part.set(opts[part.key], states[i]) end
    end
    if rng and opts.rng ~= false then keel.set_rng_state(rng) end
    return out
  end)
  if not ok then error((tostring(res):gsub("^[^\n]-:%d+: ", "", 1)), 2) end
  return res
end

return checkpoint
