-- keel.tensorboard: TensorBoard event files, written without TensorFlow.
--
--   local tb = require "keel.tensorboard"
--   local w = tb.writer(dir)            -- dir/events.out.tfevents.<time>.<host>.<pid>.<n>
--   w:scalar("loss", 0.31, step)
--   w:histogram("grad/fc1.weight", t_or_hist, step)   -- a tensor, or a table from
--                                       -- keel.core._summary.histogram
--   w:text("guard", "step 120: loss spike, skipped", step)
--   w:add(step, {{tag = "a", value = 1}, {tag = "h", histo = h}, {tag = "t", text = "..."}})
--                                       -- several values in one event
--   w:flush(); w:close()                -- also <close> and the garbage collector
--
-- The file is a sequence of records, each framed as TFRecord frames them:
--   uint64 length (little-endian), uint32 masked CRC-32C of those 8 bytes,
--   the data, uint32 masked CRC-32C of the data.
-- Each record is a serialized tensorboard.Event (compat/proto/event.proto):
--   wall_time = 1 (double), step = 2 (int64), file_version = 3 (string,
--   "brain.Event:2" in the first record), summary = 5 (Summary).
-- Summary: repeated Value value = 1. Value: tag = 1, simple_value = 2
-- (float), histo = 5 (HistogramProto), tensor = 8 (TensorProto, for text),
-- metadata = 9 (SummaryMetadata: plugin_data = 1 {plugin_name = 1}).
-- HistogramProto: min = 1, max = 2, num = 3, sum = 4, sum_squares = 5
-- (doubles), bucket_limit = 6 and bucket = 7 (packed doubles); bucket i
-- spans (bucket_limit[i-1], bucket_limit[i]], the first from min.
-- TensorProto: dtype = 1 (DT_STRING = 7), tensor_shape = 2, string_val = 8.

local core = require "keel.core"
local S = core._summary

local spack = string.pack

local tb = {}

-- {======================================================================
-- Protocol buffer encoding (the few wire types the events use)
-- =======================================================================

-- Base-128 varint of a Lua integer; negative values take 10 bytes, as
-- protobuf writes int64 (>> is a logical shift on Lua integers).
local function varint(n)
  if n >= 0 and n < 128 then return string.char(n) end
  local b = {}
  repeat
    local low = n & 0x7f
    n = n >> 7
    b[#b + 1] = n ~= 0 and (low | 0x80) or low
  until n == 0
  return string.char(table.unpack(b))
end
tb._varint = varint

local function key(field, wire) return varint((field << 3) | wire) end
local function f_double(field, v) return key(field, 1) .. spack("<d", v) end
local function f_varint(field, v) return key(field, 0) .. varint(v) end
local function f_bytes(field, s) return key(field, 2) .. varint(#s) .. s end

local FLT_MAX = 3.4028234663852886e38
-- float32 field; values beyond float32's range become +-Inf (the cast in
-- string.pack would be undefined there)
local function f_float(field, v)
  if v > FLT_MAX then v = math.huge elseif v < -FLT_MAX then v = -math.huge end
  return key(field, 5) .. spack("<f", v)
end

local function packed_doubles(field, list)
  local n = #list
  if n == 0 then return "" end
  local parts, CH = {}, 200   -- string.pack takes a bounded number of arguments
  for i = 1, n, CH do
    local j = math.min(n, i + CH - 1)
    parts[#parts + 1] = spack("<" .. string.rep("d", j - i + 1), table.unpack(list, i, j))
  end
  return f_bytes(field, table.concat(parts))
end

-- }======================================================================

-- {======================================================================
-- Summary values
-- =======================================================================

local function as_number(v)
  if type(v) == "number" then return v end
  if core.is_tensor(v) then return v:item() end
  return nil
end

-- HistogramProto from a histogram table (keel.core._summary.histogram):
-- bucket_limit are the upper edges; runs of empty buckets are merged into
-- one (same meaning, far fewer bytes).
local function histo_proto(h)
  local lo, hi = h.min, h.max
  if h.count == 0 then lo, hi = 0, 0 end
  local head = f_double(1, lo) .. f_double(2, hi) .. f_double(3, h.count) .. f_double(4, h.sum) ..
               f_double(5, h.sumsq)
  if h.limits_packed then   -- histogram(t, {packed = true}): buckets already encoded in C
    return head .. f_bytes(6, h.limits_packed) .. f_bytes(7, h.counts_packed)
  end
  local limits, counts = {}, {}
  if h.count > 0 then
    if h.max <= h.min then
      limits[1], counts[1] = h.max, h.count
    else
      local edges, c, nb = h.edges, h.counts, #h.counts
      local i = 1
      while i <= nb do
        local cnt = c[i]
        if cnt == 0 then
          while i < nb and c[i + 1] == 0 do i = i + 1 end
        end
        limits[#limits + 1] = edges[i + 1]
        counts[#counts + 1] = cnt
        i = i + 1
      end
      -- values outside a given range still count: TensorBoard has no
      -- separate underflow/overflow, so fold them into the end buckets
      if (h.below or 0) > 0 then counts[1] = counts[1] + h.below end
      if (h.above or 0) > 0 then counts[#counts] = counts[#counts] + h.above end
    end
  else
    limits[1], counts[1] = 0, 0
  end
  return head .. packed_doubles(6, limits) .. packed_doubles(7, counts)
end

local TEXT_METADATA = f_bytes(1, f_bytes(1, "text"))   -- SummaryMetadata{plugin_data{plugin_name}}

local function value_proto(v, where)
  local tag = v.tag
  if type(tag) ~= "string" or tag == "" then
    error(("%s: expected a non-empty string tag, got %s"):format(where, tostring(tag)), 3)
  end
  local body
  if v.value ~= nil then
    local x = as_number(v.value)
    if not x then error(("%s: tag '%s': value: expected a number, got %s"):format(where, tag, type(v.value)), 3) end
    body = f_float(2, x)
  elseif v.histo ~= nil then
    local h = v.histo
    if core.is_tensor(h) then h = S.histogram(h, {bins = v.bins or 30, packed = true}) end
    if type(h) ~= "table" or (type(h.counts) ~= "table" and type(h.limits_packed) ~= "string") then
      error(("%s: tag '%s': histo: expected a tensor or a histogram table"):format(where, tag), 3)
    end
    body = f_bytes(5, histo_proto(h))
  elseif v.text ~= nil then
    -- TensorProto{dtype = DT_STRING, tensor_shape = {} (a scalar), string_val}
    local tensor = f_varint(1, 7) .. f_bytes(2, "") .. f_bytes(8, tostring(v.text))
    body = f_bytes(9, TEXT_METADATA) .. f_bytes(8, tensor)
  else
    error(("%s: tag '%s': expected value, histo or text"):format(where, tag), 3)
  end
  return f_bytes(1, f_bytes(1, tag) .. body)   -- Summary.value (repeated, field 1)
end

-- }======================================================================

-- {======================================================================
-- Records and the writer
-- =======================================================================

-- One TFRecord frame around data.
local function frame(data)
  local len = spack("<I8", #data)
  return len .. spack("<I4", S.masked_crc32c(len)) .. data .. spack("<I4", S.masked_crc32c(data))
end
tb.frame = frame

-- Serialized Event with a summary of the encoded values (each already a
-- Summary.value field).
local function event(wall, step, values)
  return f_double(1, wall) .. f_varint(2, step) .. f_bytes(5, table.concat(values))
end

local Writer = {}
Writer.__index = Writer
Writer.__name = "keel.tensorboard.Writer"

local file_counter = 0

local function check_step(step, where)
  if math.type(step) ~= "integer" then
    if type(step) == "number" and step == math.floor(step) and step >= -2^63 and step < 2^63 then
      return math.tointeger(step)
    end
    error(("%s: step: expected an integer, got %s"):format(where, tostring(step)), 3)
  end
  return step
end

-- tb.writer(dir [, {filename_suffix = "", wall_time = fn}]) -> Writer
function tb.writer(dir, opts)
  if type(dir) ~= "string" or dir == "" then
    error("tensorboard.writer: argument #1: expected a directory name, got " .. type(dir), 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("tensorboard.writer: argument #2: expected an options table", 2) end
  local ok, err = S.mkdirs(dir)
  if not ok then error("tensorboard.writer: cannot create " .. dir .. ": " .. tostring(err), 2) end
  local clock = opts.wall_time or S.wall_time
  local now = clock()
  file_counter = file_counter + 1
  local name = ("events.out.tfevents.%010d.%s.%d.%d%s"):format(math.floor(now), S.hostname(), S.pid(),
    file_counter, opts.filename_suffix or "")
  local path = dir .. "/" .. name
  local f, ferr = io.open(path, "ab")
  if not f then error("tensorboard.writer: " .. tostring(ferr), 2) end
  f:setvbuf("full")
  local self = setmetatable({path = path, _f = f, _clock = clock}, Writer)
  f:write(frame(f_double(1, now) .. f_varint(2, 0) .. f_bytes(3, "brain.Event:2")))
  return self
end

local function live(self, where)
  if not self._f then error(where .. ": the writer is closed", 3) end
  return self._f
end

-- Writes one event with several values at step.
-- values: list of {tag =, value = number} | {tag =, histo = tensor or histogram} | {tag =, text =}
function Writer:add(step, values, wall_time)
  local f = live(self, "tensorboard.add")
  step = check_step(step, "tensorboard.add")
  local enc = {}
  for i, v in ipairs(values) do enc[i] = value_proto(v, "tensorboard.add") end
  f:write(frame(event(wall_time or self._clock(), step, enc)))
end

function Writer:scalar(tag, value, step, wall_time)
  local f = live(self, "tensorboard.scalar")
  step = check_step(step, "tensorboard.scalar")
  f:write(frame(event(wall_time or self._clock(), step, {value_proto({tag = tag, value = value}, "tensorboard.scalar")})))
end

function Writer:histogram(tag, h, step, wall_time)
  local f = live(self, "tensorboard.histogram")
  step = check_step(step, "tensorboard.histogram")
  f:write(frame(event(wall_time or self._clock(), step, {value_proto({tag = tag, histo = h}, "tensorboard.histogram")})))
end

function Writer:text(tag, text, step, wall_time)
  local f = live(self, "tensorboard.text")
  step = check_step(step, "tensorboard.text")
  f:write(frame(event(wall_time or self._clock(), step, {value_proto({tag = tag, text = text}, "tensorboard.text")})))
end

function Writer:flush()
  if self._f then self._f:flush() end
end

-- Closes the file; a second call does nothing.
function Writer:close()
  local f = self._f
  if not f then return end
  self._f = nil
  if io.type(f) == "file" then f:close() end
end

Writer.__close = Writer.close
Writer.__gc = function(self) pcall(Writer.close, self) end
Writer.__tostring = function(self)
  return ("keel.tensorboard.Writer(%s%s)"):format(self.path, self._f and "" or ", closed")
end

tb.Writer = Writer

-- }======================================================================

return tb
