-- keel.json: the one JSON codec of keel's Lua side (internal). Its users:
--   keel.io.json_encode / json_decode   checkpoint metadata: every value
--                                       they accept comes back exactly
--   keel.monitor                        metrics.jsonl, strict JSON for any
--                                       reader (its own lenient walk over
--                                       records, on quote and number below)
--   keel.plot                           reads those lines back, keeping the
--                                       order of object keys (the legend
--                                       follows the parameters' order)
--
-- Numbers: integers are written as integers and read back as Lua integers
-- (64-bit exact; a longer integer text is an error). Floats are written in
-- the fewest digits that read back to the same double, always with a '.'
-- or an exponent, so they read back as floats. NaN and the infinities are
-- the bare words NaN, Infinity, -Infinity (as Python's json module writes
-- them) or, for strict JSON, the strings "NaN", "Infinity", "-Infinity".
-- The decoder reads the bare words; turning the strings back into numbers
-- is the reader's business (it knows which fields are numbers).

local J = {}

-- The depth of nesting both directions accept.
J.MAX_DEPTH = 64

-- {======================================================================
-- Encoding
-- =======================================================================

local ESC = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f', ['\n'] = '\\n', ['\r'] = '\\r',
             ['\t'] = '\\t'}

-- s as a JSON string. strict: bytes that are not UTF-8 (which a strict
-- parser refuses) become \u00XX code points; otherwise they stay raw, and
-- this decoder gives back exactly the bytes written.
function J.quote(s, strict)
  s = s:gsub('[%c"\\]', function(c) return ESC[c] or ("\\u%04x"):format(c:byte()) end)
  if strict and not utf8.len(s) then
    s = s:gsub("[\128-\255]", function(c) return ("\\u%04x"):format(c:byte()) end)
  end
  return '"' .. s .. '"'
end

local NONFINITE = {[true] = {nan = '"NaN"', inf = '"Infinity"', ninf = '"-Infinity"'},
                   [false] = {nan = "NaN", inf = "Infinity", ninf = "-Infinity"}}

-- v as a JSON number (see the header); strict: NaN and the infinities as
-- strings.
function J.number(v, strict)
  if math.type(v) == "integer" then return ("%d"):format(v) end
  local words = NONFINITE[not not strict]
  if v ~= v then return words.nan end
  if v == math.huge then return words.inf end
  if v == -math.huge then return words.ninf end
  if v == 0 then return 1 / v < 0 and "-0.0" or "0.0" end
  local s
  for digits = 15, 17 do
    s = ("%." .. digits .. "g"):format(v)
    if tonumber(s) == v then break end
  end
  if not s:find("[%.e]") then s = s .. ".0" end
  return s
end

local function encode(v, out, depth, path)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = J.quote(v)
  elseif t == "number" then
    out[#out + 1] = J.number(v)
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "table" then
    if depth > J.MAX_DEPTH then error(("json_encode: %s: nesting deeper than %d"):format(path, J.MAX_DEPTH), 0) end
    local n, count = #v, 0
    for _ in pairs(v) do count = count + 1 end
    if n > 0 and count == n then
      out[#out + 1] = "["
      for i = 1, n do
        if i > 1 then out[#out + 1] = "," end
        encode(v[i], out, depth + 1, path .. "[" .. i .. "]")
      end
      out[#out + 1] = "]"
      return
    end
    local keys = {}
    for k in pairs(v) do
      if math.type(k) ~= "integer" and type(k) ~= "string" then
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
      out[#out + 1] = J.quote(ks)
      out[#out + 1] = ":"
      encode(v[k], out, depth + 1, path .. "." .. tostring(k))
    end
    out[#out + 1] = "}"
  else
    error(("json_encode: %s: cannot encode a %s"):format(path, t), 0)
  end
end

-- A nested table of strings, numbers and booleans as JSON text, exact: a
-- table with keys 1..n (n >= 1) is an array; any other table is an object,
-- its keys sorted, integer keys written "#<n>" and string keys that start
-- with '#' given one more '#' (decode(s, {hash_keys = true}) undoes both).
function J.encode(v)
  local out = {}
  encode(v, out, 0, "value")
  return table.concat(out)
end

-- }======================================================================

-- {======================================================================
-- Decoding
-- =======================================================================

local UNESC = {['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t'}
local WORDS = {{"true", true}, {"false", false}, {"NaN", 0 / 0}, {"Infinity", math.huge}, {"-Infinity", -math.huge}}

-- JSON text s as Lua values. opts (all optional):
--   name        the error messages' prefix (default "json_decode")
--   hash_keys   undo encode's "#<n>" and "##" object keys
--   order       a table (best weak-keyed) that gets, for every object
--               decoded, the list of its keys in the order of the text
-- null reads as nil. Errors name the byte where the text went wrong.
function J.decode(s, opts)
  opts = opts or {}
  local name, hash_keys, order = opts.name or "json_decode", opts.hash_keys, opts.order
  local function fail(i, what) error(("%s: %s at byte %d"):format(name, what, i), 0) end
  local function skip(i) return s:find("[^ \t\r\n]", i) or #s + 1 end

  local function str(i)   -- s:sub(i, i) == '"'
    local out, j = {}, i + 1
    while true do
      local a = s:find('["\\%c]', j)
      if not a then fail(i, "unterminated string") end
      out[#out + 1] = s:sub(j, a - 1)
      local c = s:sub(a, a)
      if c == '"' then return table.concat(out), a + 1 end
      if c ~= "\\" then fail(a, "control character in a string") end
      local e = s:sub(a + 1, a + 1)
      if UNESC[e] then
        out[#out + 1] = UNESC[e]
        j = a + 2
      elseif e == "u" then
        local hex = s:match("^%x%x%x%x", a + 2)
        if not hex then fail(a, "bad \\u escape") end
        local cp = tonumber(hex, 16)
        j = a + 6
        if cp >= 0xd800 and cp <= 0xdbff then
          local lo = s:match("^\\u(%x%x%x%x)", j)
          lo = lo and tonumber(lo, 16)
          if not lo or lo < 0xdc00 or lo > 0xdfff then fail(a, "unpaired surrogate") end
          cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00)
          j = j + 6
        elseif cp >= 0xdc00 and cp <= 0xdfff then
          fail(a, "unpaired surrogate")
        end
        out[#out + 1] = utf8.char(cp)
      else
        fail(a, "bad escape")
      end
    end
  end

  local function number(i)
    local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", i)
    if not num or num == "" or num == "-" then fail(i, "unexpected character") end
    local v
    if num:find("[%.eE]") then
      v = tonumber(num)
    else
      v = math.tointeger(tonumber(num))
      if not v or ("%d"):format(v) ~= num:gsub("^%-0$", "0") then fail(i, "integer out of range") end
    end
    if not v then fail(i, "bad number") end
    return v, i + #num
  end

  -- after an item of an object or array closed by close: whether it ends
  -- here, and where the next item or value starts
  local function next_item(i, close)
    i = skip(i)
    local c = s:sub(i, i)
    if c == close then return true, i + 1 end
    if c ~= "," then fail(i, ("expected ',' or '%s'"):format(close)) end
    return false, i + 1
  end

  local value
  local function object(i, depth)
    local t, keys = {}, {}
    if order then order[t] = keys end
    i = skip(i + 1)
    if s:sub(i, i) == "}" then return t, i + 1 end
    while true do
      i = skip(i)
      if s:sub(i, i) ~= '"' then fail(i, "expected a key") end
      local k
      k, i = str(i)
      if hash_keys and k:sub(1, 2) == "##" then
        k = k:sub(2)
      elseif hash_keys and k:sub(1, 1) == "#" then
        k = math.tointeger(tonumber(k:sub(2))) or fail(i, "bad integer key")
      end
      i = skip(i)
      if s:sub(i, i) ~= ":" then fail(i, "expected ':'") end
      if t[k] == nil then keys[#keys + 1] = k end
      t[k], i = value(i + 1, depth + 1)
      local done
      done, i = next_item(i, "}")
      if done then return t, i end
    end
  end

  local function array(i, depth)
    local t, n = {}, 0
    i = skip(i + 1)
    if s:sub(i, i) == "]" then return t, i + 1 end
    while true do
      n = n + 1
      t[n], i = value(i, depth + 1)
      local done
      done, i = next_item(i, "]")
      if done then return t, i end
    end
  end

  value = function(i, depth)
    if depth > J.MAX_DEPTH then fail(i, "nesting too deep") end
    i = skip(i)
    local c = s:sub(i, i)
    if c == "{" then return object(i, depth) end
    if c == "[" then return array(i, depth) end
    if c == '"' then return str(i) end
    if c == "" then fail(i, "unexpected end") end
    if s:sub(i, i + 3) == "null" then return nil, i + 4 end
    for _, w in ipairs(WORDS) do
      if s:sub(i, i + #w[1] - 1) == w[1] then return w[2], i + #w[1] end
    end
    return number(i)
  end

  if type(s) ~= "string" then error(("%s: expected a string, got %s"):format(name, type(s)), 2) end
  local v, i = value(1, 0)
  i = skip(i)
  if i <= #s then fail(i, "trailing characters") end
  return v
end

-- }======================================================================

return J
