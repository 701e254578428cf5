-- keel.io: safetensors files (also keel.save / keel.load).
--
--   keel.save(path, tensors [, {metadata = {key = "value", ...}}])
--       tensors: name -> tensor (model:state_dict() works); written
--       contiguous, atomically (temporary file, fsync, rename).
--   keel.load(path) -> tensors, metadata
--       every tensor of the file by name, and the __metadata__ strings.
--       F16/BF16 load as float32; I32/I16/I8/U8/BOOL as int64.
--   keel.io.json_encode(v) / keel.io.json_decode(s)
--       JSON for nested tables of numbers, strings and booleans, exact
--       for every Lua value they accept (bindings/keel/json.lua).

local core = require "keel.core"
local json = require "keel.json"
local C = core._io

local io_ = {}

-- Drops the "file:line: " that C errors carry, so that the error points
-- at the caller of keel.save / keel.load.
local function rethrow(fn, err, level)
  local msg = tostring(err):gsub("^[^\n]-:%d+: ", "", 1):gsub("^safetensors_" .. fn .. ":", fn .. ":", 1)
  if not msg:find("^" .. fn .. ":") then msg = fn .. ": " .. msg end
  error(msg, level + 1)
end

function io_.save(path, tensors, opts)
  if type(path) ~= "string" then
    error("save: argument #1: expected a file name (string), got " .. type(path), 2)
  end
  if type(tensors) ~= "table" then
    error("save: argument #2: expected a table name -> tensor, got " .. type(tensors), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("save: argument #3: expected an options table, got " .. type(opts), 2)
  end
  local meta = opts and opts.metadata
  if meta ~= nil and type(meta) ~= "table" then
    error("save: metadata: expected a table of strings, got " .. type(meta), 2)
  end
  -- plain table copy: a state dict's metatable keeps nothing C needs
  local plain = {}
  for k, v in pairs(tensors) do plain[k] = v end
  local ok, err = pcall(C.save, path, plain, meta)
  if not ok then rethrow("save", err, 2) end
end

function io_.load(path)
  if type(path) ~= "string" then
    error("load: argument #1: expected a file name (string), got " .. type(path), 2)
  end
  local ok, t, meta = pcall(C.load, path)
  if not ok then rethrow("load", t, 2) end
  return t, meta
end

-- {======================================================================
-- JSON (keel.json: see there what is exact)
-- =======================================================================

function io_.json_encode(v)
  return json.encode(v)
end

function io_.json_decode(s)
  if type(s) ~= "string" then error("json_decode: expected a string, got " .. type(s), 2) end
  return json.decode(s, {hash_keys = true})
end

-- }======================================================================

return io_
