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
--       for every Lua value they accept (see below).

local core = require "keel.core"
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
-- JSON
--
-- Integers are written as integers and read back as Lua integers (64-bit
-- exact); floats always carry a '.', 'e', or are NaN/Infinity/-Infinity
-- (as Python's json module writes them), and "%.17g" round-trips every
-- double. A table with keys 1..n (n >= 1) is an array; any other table is
-- an object whose integer keys are written "#<n>" and whose string keys
-- starting with '#' get one more '#'. Nesting depth is bounded.
-- =======================================================================

local MAX_DEPTH = 64

local ESC = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f', ['\n'] = '\\n', ['\r'] = '\\r',
             ['\t'] = '\\t'}

local function enc_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESC[c] or (c:byte() < 32 and ("\\u%04x"):format(c:byte())) or c
  end) .. '"'
end

local function enc_number(v)
  if math.type(v) == "integer" then return ("%d"):format(v) end
  if v ~= v then return "NaN" end
  if v == math.huge then return "Infinity" end
  if v == -math.huge then return "-Infinity" end
  local s = ("%.17g"):format(v)
  if not s:find("[%.eEn]") then s = s .. ".0" end
  return s
end

local function encode(v, out, depth, path)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = enc_string(v)
  elseif t == "number" then
    out[#out + 1] = enc_number(v)
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "table" then
    if depth > MAX_DEPTH then error(("json_encode: %s: nesting deeper than %d"):format(path, MAX_DEPTH), 0) end
    local n, count = #v, 0
    for _ in pairs(v) do count = count + 1 end
    if n > 0 and count == n then
      out[#out + 1] = "["
      for i = 1, n do
        if i > 1 then out[#out + 1] = "," end
        encode(v[i], out, depth + 1, path .. "[" .. i .. "]")
      end
      out[#out + 1] = "]"
    else
      local keys = {}
      for k in pairs(v) do
        local kt = math.type(k) == "integer" and "i" or type(k) == "string" and "s" or nil
        if not kt then
          error(("json_encode: %s: key of type %s, expected strings or integers"):format(path, type(k)), 0)
        end
        keys[#keys + 1] = k
      end
      table.sort(keys, function(a, b)
        if type(a) ~= type(b) then return type(a) == "number" end
        return a < b
      end)
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        local ks = type(k) == "number" and ("#%d"):format(k) or (k:sub(1, 1) == "#" and "#" .. k or k)
        out[#out + 1] = enc_string(ks)
        out[#out + 1] = ":"
        encode(v[k], out, depth + 1, path .. "." .. tostring(k))
      end
      out[#out + 1] = "}"
    end
  else
    error(("json_encode: %s: cannot encode a %s"):format(path, t), 0)
  end
end

function io_.json_encode(v)
  local out = {}
  encode(v, out, 0, "value")
  return table.concat(out)
end

local function dec_error(s, i, what)
  error(("json_decode: %s at byte %d"):format(what, i), 0)
end

local function skip(s, i)
  return s:find("[^ \t\r\n]", i) or #s + 1
end

local function utf8_of(cp) return utf8.char(cp) end

local decode_value

local function dec_string(s, i)
  -- s:sub(i, i) == '"'
  local out, j = {}, i + 1
  while true do
    local a, b = s:find('["\\%c]', j)
    if not a then dec_error(s, i, "unterminated string") end
    out[#out + 1] = s:sub(j, a - 1)
    local c = s:sub(a, a)
    if c == '"' then return table.concat(out), a + 1 end
    if c ~= "\\" then dec_error(s, a, "control character in a string") end
    local e = s:sub(a + 1, a + 1)
    local simple = ({['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t'})[e]
    if simple then
      out[#out + 1] = simple
      j = a + 2
    elseif e == "u" then
      local hex = s:match("^%x%x%x%x", a + 2)
      if not hex then dec_error(s, a, "bad \\u escape") end
      local cp = tonumber(hex, 16)
      j = a + 6
      if cp >= 0xd800 and cp <= 0xdbff then
        local lo = s:match("^\\u(%x%x%x%x)", j)
        lo = lo and tonumber(lo, 16)
        if not lo or lo < 0xdc00 or lo > 0xdfff then dec_error(s, a, "unpaired surrogate") end
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00)
        j = j + 6
      elseif cp >= 0xdc00 and cp <= 0xdfff then
        dec_error(s, a, "unpaired surrogate")
      end
      out[#out + 1] = utf8_of(cp)
    else
      dec_error(s, a, "bad escape")
    end
  end
end

local function dec_number(s, i)
  for _, lit in ipairs{{"NaN", 0 / 0}, {"Infinity", math.huge}, {"-Infinity", -math.huge}} do
    if s:sub(i, i + #lit[1] - 1) == lit[1] then return lit[2], i + #lit[1] end
  end
  local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", i)
  if not num or num == "" or num == "-" then dec_error(s, i, "unexpected character") end
  local v
  if num:find("[%.eE]") then
    v = tonumber(num)  -- a float: the text has '.' or an exponent
  else
    v = math.tointeger(tonumber(num))
    if not v or ("%d"):format(v) ~= num:gsub("^%-0$", "0") then
      dec_error(s, i, "integer out of range")
    end
  end
  if not v then dec_error(s, i, "bad number") end
  return v, i + #num
end

decode_value = function(s, i, depth)
  if depth > MAX_DEPTH then dec_error(s, i, "nesting too deep") end
  i = skip(s, i)
  local c = s:sub(i, i)
  if c == "{" then
    local t = {}
    i = skip(s, i + 1)
    if s:sub(i, i) == "}" then return t, i + 1 end
    while true do
      i = skip(s, i)
      if s:sub(i, i) ~= '"' then dec_error(s, i, "expected a key") end
      local k
      k, i = dec_string(s, i)
      if k:sub(1, 2) == "##" then
        k = k:sub(2)
      elseif k:sub(1, 1) == "#" then
        local n = math.tointeger(tonumber(k:sub(2)))
        if not n then dec_error(s, i, "bad integer key") end
        k = n
      end
      i = skip(s, i)
      if s:sub(i, i) ~= ":" then dec_error(s, i, "expected ':'") end
      t[k], i = decode_value(s, i + 1, depth + 1)
      i = skip(s, i)
      c = s:sub(i, i)
      if c == "}" then return t, i + 1 end
      if c ~= "," then dec_error(s, i, "expected ',' or '}'") end
      i = i + 1
    end
  elseif c == "[" then
    local t = {}
    i = skip(s, i + 1)
    if s:sub(i, i) == "]" then return t, i + 1 end
    while true do
      t[#t + 1], i = decode_value(s, i, depth + 1)
      i = skip(s, i)
      c = s:sub(i, i)
      if c == "]" then return t, i + 1 end
      if c ~= "," then dec_error(s, i, "expected ',' or ']'") end
      i = i + 1
    end
  elseif c == '"' then
    return dec_string(s, i)
  elseif s:sub(i, i + 3) == "true" then
    return true, i + 4
  elseif s:sub(i, i + 4) == "false" then
    return false, i + 5
  elseif c == "" then
    dec_error(s, i, "unexpected end")
  end
  return dec_number(s, i)
end

function io_.json_decode(s)
  if type(s) ~= "string" then error("json_decode: expected a string, got " .. type(s), 2) end
  local v, i = decode_value(s, 1, 0)
  i = skip(s, i)
  if i <= #s then dec_error(s, i, "trailing characters") end
  return v
end

-- }======================================================================

return io_
