-- tensorboard_spec.lua: CRC-32C, TFRecord framing and the TensorBoard event
-- files of keel.tensorboard and keel.monitor, read back by a reader written
-- here (pure Lua CRC, a generic protobuf decoder), independent of the writer.
local H = require "helper"
local keel = H.keel
local core = require "keel.core"
local S = core._summary
local tb = require "keel.tensorboard"
local hooks = require "keel.hooks"

-- {======================================================================
-- Reference CRC-32C, bit by bit (no table, no C)
-- =======================================================================

local function ref_crc32c(s)
  local crc = 0xffffffff
  for i = 1, #s do
    crc = crc ~ s:byte(i)
    for _ = 1, 8 do
      if crc & 1 == 1 then crc = (crc >> 1) ~ 0x82F63B78 else crc = crc >> 1 end
    end
  end
  return crc ~ 0xffffffff
end

local function ref_mask(c)
  return ((((c >> 15) | (c << 17)) & 0xffffffff) + 0xa282ead8) & 0xffffffff
end

-- }======================================================================

-- {======================================================================
-- Test reader: records (both CRCs checked) and protobuf messages
-- =======================================================================

-- Returns the list of record payloads, or nil and why.
local function read_records(bytes)
  local recs, pos = {}, 1
  while pos <= #bytes do
    if #bytes - pos + 1 < 12 then return nil, ("truncated header at byte %d"):format(pos) end
    local lenbytes = bytes:sub(pos, pos + 7)
    local len = string.unpack("<I8", lenbytes)
    local hcrc = string.unpack("<I4", bytes, pos + 8)
    if hcrc ~= ref_mask(ref_crc32c(lenbytes)) then return nil, ("length CRC mismatch at byte %d"):format(pos) end
    local dpos = pos + 12
    if #bytes - dpos + 1 < len + 4 then return nil, ("truncated record at byte %d"):format(pos) end
    local data = bytes:sub(dpos, dpos + len - 1)
    local dcrc = string.unpack("<I4", bytes, dpos + len)
    if dcrc ~= ref_mask(ref_crc32c(data)) then return nil, ("data CRC mismatch at byte %d"):format(pos) end
    recs[#recs + 1] = data
    pos = dpos + len + 4
  end
  return recs
end

local function read_varint(s, pos)
  local v, shift = 0, 0
  while true do
    local b = s:byte(pos)
    assert(b, "varint runs past the end")
    v = v | ((b & 0x7f) << shift)
    pos = pos + 1
    if b < 0x80 then return v, pos end
    shift = shift + 7
    assert(shift < 70, "varint too long")
  end
end

-- Generic decode: list of {field =, wire =, value =} (value: integer for
-- varint, raw 8/4-byte strings for fixed64/fixed32, string for bytes).
local function decode(s)
  local out, pos = {}, 1
  while pos <= #s do
    local key
    key, pos = read_varint(s, pos)
    local field, wire = key >> 3, key & 7
    local v
    if wire == 0 then v, pos = read_varint(s, pos)
    elseif wire == 1 then v = s:sub(pos, pos + 7) assert(#v == 8) pos = pos + 8
    elseif wire == 5 then v = s:sub(pos, pos + 3) assert(#v == 4) pos = pos + 4
    elseif wire == 2 then
      local n
      n, pos = read_varint(s, pos)
      v = s:sub(pos, pos + n - 1)
      assert(#v == n, "length-delimited field runs past the end")
      pos = pos + n
    else error("unexpected wire type " .. wire) end
    out[#out + 1] = {field = field, wire = wire, value = v}
  end
  return out
end

local function fields(s, f)
  local r = {}
  for _, e in ipairs(decode(s)) do if e.field == f then r[#r + 1] = e end end
  return r
end
local function one(s, f) return fields(s, f)[1] end
local function dbl(e) return e and string.unpack("<d", e.value) end
local function flt(e) return e and string.unpack("<f", e.value) end
local function packed_doubles(e)
  local t = {}
  if not e then return t end
  for i = 1, #e.value, 8 do t[#t + 1] = string.unpack("<d", e.value, i) end
  return t
end

-- Events of a file: {wall, step, version, values = {{tag, simple, histo, text, plugin}}}
local function read_events(path)
  local f = assert(io.open(path, "rb"))
  local bytes = f:read("a")
  f:close()
  local recs, err = read_records(bytes)
  assert(recs, err)
  local evs = {}
  for _, rec in ipairs(recs) do
    local ev = {wall = dbl(one(rec, 1)), step = one(rec, 2) and one(rec, 2).value or 0, values = {}}
    local v3 = one(rec, 3)
    if v3 then ev.version = v3.value end
    local summ = one(rec, 5)
    if summ then
      for _, ve in ipairs(fields(summ.value, 1)) do
        local val = {tag = one(ve.value, 1).value}
        local sv = one(ve.value, 2)
        if sv then assert(sv.wire == 5, "simple_value must be a float (wire type 5)") val.simple = flt(sv) end
        local hv = one(ve.value, 5)
        if hv then
          local h = hv.value
          val.histo = {min = dbl(one(h, 1)), max = dbl(one(h, 2)), num = dbl(one(h, 3)), sum = dbl(one(h, 4)),
                       sum_squares = dbl(one(h, 5)), limits = packed_doubles(one(h, 6)),
                       counts = packed_doubles(one(h, 7))}
        end
        local md = one(ve.value, 9)
        if md then val.plugin = one(one(md.value, 1).value, 1).value end
        local tv = one(ve.value, 8)
        if tv then
          assert(one(tv.value, 1).value == 7, "text tensors are DT_STRING (7)")
          val.text = one(tv.value, 8).value
        end
        ev.values[#ev.values + 1] = val
      end
    end
    evs[#evs + 1] = ev
  end
  return evs, bytes
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(S.mkdirs(d))
  return d
end

local function event_files(dir)
  local p = io.popen("ls " .. dir)
  local list = {}
  for name in p:lines() do
    if name:find("^events%.out%.tfevents%.") then list[#list + 1] = dir .. "/" .. name end
  end
  p:close()
  return list
end

-- }======================================================================

describe("CRC-32C", function()
  it("matches the known check values", function()
    assert.are.equal(0xE3069283, S.crc32c("123456789"))
    assert.are.equal(0, S.crc32c(""))
    -- RFC 3720 (iSCSI) test vectors
    assert.are.equal(0x8A9136AA, S.crc32c(string.rep("\0", 32)))
    assert.are.equal(0x62A8AB43, S.crc32c(string.rep("\255", 32)))
    local inc = {}
    for i = 0, 31 do inc[#inc + 1] = string.char(i) end
    assert.are.equal(0x46DD794E, S.crc32c(table.concat(inc)))
  end)

  it("equals a bitwise reference on random data and continues across pieces", function()
    local r = H.rng(7)
    for n = 0, 300, 37 do
      local b = {}
      for i = 1, n do b[i] = string.char(math.floor(r() * 256) % 256) end
      local s = table.concat(b)
      assert.are.equal(ref_crc32c(s), S.crc32c(s))
      local cut = n // 3
      assert.are.equal(S.crc32c(s), S.crc32c(s:sub(cut + 1), S.crc32c(s:sub(1, cut))))
    end
  end)

  it("masks as TFRecord does", function()
    for _, c in ipairs {0, 1, 0xE3069283, 0xffffffff, 0x80000000} do
      assert.are.equal(ref_mask(c), S.crc32c_mask(c))
    end
    assert.are.equal(ref_mask(S.crc32c("abc")), S.masked_crc32c("abc"))
    -- the header of a 24-byte record, as every TensorFlow event file starts
    assert.are.equal("\x18\0\0\0\0\0\0\0\xa3\x7f\x4b\x22", tb.frame(string.rep("x", 24)):sub(1, 12))
  end)

  it("rejects bad arguments", function()
    assert.has_error(function() S.crc32c("x", -1) end)
    assert.has_error(function() S.crc32c_mask(2 ^ 40 // 1) end)
  end)
end)

describe("keel.tensorboard writer", function()
  it("writes file_version first, then scalars, histograms and text, with valid CRCs", function()
    local dir = tmpdir()
    local w = tb.writer(dir)
    assert.truthy(w.path:find("/events%.out%.tfevents%.%d+%.[^/]+%.%d+%.%d+$"))
    w:scalar("loss", 0.25, 1)
    w:scalar("loss", 1 / 3, 2)
    w:scalar("big", 1e300, 2)
    local t = keel.tensor{-1, 0, 0, 0.5, 2, 2, 2, 3, 0 / 0}
    w:histogram("weights", t, 3)
    w:text("note", "hello, board", 4)
    w:add(5, {{tag = "a", value = 1}, {tag = "b", value = -2.5}})
    w:add(2 ^ 40 // 1, {{tag = "a", value = 2}})
    w:close()
    w:close()   -- idempotent
    local evs = read_events(w.path)
    assert.are.equal(8, #evs)
    assert.are.equal("brain.Event:2", evs[1].version)
    assert.is_true(evs[1].wall > 1.5e9)
    assert.are.same({1, 2, 2, 3, 4, 5, 2 ^ 40 // 1}, {evs[2].step, evs[3].step, evs[4].step, evs[5].step,
      evs[6].step, evs[7].step, evs[8].step})
    assert.are.equal("loss", evs[2].values[1].tag)
    assert.are.equal(0.25, evs[2].values[1].simple)
    assert.are.equal(string.unpack("<f", string.pack("<f", 1 / 3)), evs[3].values[1].simple)
    assert.are.equal(math.huge, evs[4].values[1].simple)   -- beyond float32: +Inf
    local h = evs[5].values[1].histo
    assert.are.equal("weights", evs[5].values[1].tag)
    assert.are.equal(-1, h.min)
    assert.are.equal(3, h.max)
    assert.are.equal(8, h.num)   -- the NaN is not counted
    H.assert_close(h.sum, 8.5)
    H.assert_close(h.sum_squares, 1 + 0.25 + 12 + 9)
    assert.are.equal(#h.limits, #h.counts)
    local total = 0
    for i, c in ipairs(h.counts) do
      total = total + c
      if i > 1 then assert.is_true(h.limits[i] > h.limits[i - 1]) end
    end
    assert.are.equal(8, total)
    assert.are.equal(3, h.limits[#h.limits])
    -- empty buckets are merged: never two empty buckets in a row
    for i = 2, #h.counts do assert.is_false(h.counts[i] == 0 and h.counts[i - 1] == 0) end
    assert.are.equal("note", evs[6].values[1].tag)
    assert.are.equal("text", evs[6].values[1].plugin)
    assert.are.equal("hello, board", evs[6].values[1].text)
    assert.are.equal(2, #evs[7].values)
    assert.are.equal(-2.5, evs[7].values[2].simple)
    os.execute("rm -rf " .. dir)
  end)

  it("buckets equal a reference count over the histogram's edges", function()
    local dir = tmpdir()
    local w = tb.writer(dir)
    local vals = H.values(500, -3, 3, 11)
    w:histogram("h", keel.tensor(vals), 7)
    w:close()
    local h = read_events(w.path)[2].values[1].histo
    -- bucket i spans (limit[i-1], limit[i]], the first from min: count by hand
    for i, lim in ipairs(h.limits) do
      local lo = i == 1 and -math.huge or h.limits[i - 1]
      local n = 0
      for _, v in ipairs(vals) do
        local x = string.unpack("<f", string.pack("<f", v))   -- the tensor is float32
        -- keel's buckets are [e_i, e_i+1), the last closed; no value sits on an edge here
        if x >= lo and x < lim or (i == #h.limits and x == lim) then n = n + 1 end
      end
      assert.are.equal(n, h.counts[i], ("bucket %d"):format(i))
    end
    os.execute("rm -rf " .. dir)
  end)

  it("C-packed buckets (the monitor's) equal the Lua encoding of the same histogram", function()
    local dir = tmpdir()
    local w = tb.writer(dir)
    local t = keel.tensor{-3, -0.5, -0.4, 0, 0, 0.1, 0.9, 0.95, 5, 0 / 0, 1 / 0}
    local cases = {{bins = 10}, {bins = 4, range = {-1, 1}}, {edges = {-1, 0, 0.5, 1}}, {bins = 3}}
    for i, o in ipairs(cases) do
      local po = {packed = true}
      for k, v in pairs(o) do po[k] = v end
      w:histogram("lua" .. i, S.histogram(t, o), i)
      w:histogram("c" .. i, S.histogram(t, po), i)
    end
    w:histogram("empty_lua", S.histogram(keel.full({2}, 0 / 0)), 9)
    w:histogram("empty_c", S.histogram(keel.full({2}, 0 / 0), {packed = true}), 9)
    w:histogram("same_lua", S.histogram(keel.full({3}, 2)), 9)
    w:histogram("same_c", S.histogram(keel.full({3}, 2), {packed = true}), 9)
    w:close()
    local evs = read_events(w.path)
    local by = {}
    for _, ev in ipairs(evs) do for _, v in ipairs(ev.values) do by[v.tag] = v.histo end end
    for i = 1, #cases do
      assert.are.same(by["lua" .. i], by["c" .. i])
      local total = 0
      for _, c in ipairs(by["c" .. i].counts) do total = total + c end
      assert.are.equal(9, total, "case " .. i)   -- values outside a range fold into the end buckets
    end
    assert.are.same({2}, by.same_c.limits)
    assert.are.same({3}, by.same_c.counts)
    assert.are.same(by.empty_lua, by.empty_c)
    assert.are.same(by.same_lua, by.same_c)
    os.execute("rm -rf " .. dir)
  end)

  it("the test reader detects a corrupted byte, a corrupted length and a truncated file", function()
    local dir = tmpdir()
    local w = tb.writer(dir)
    w:scalar("x", 1, 1)
    w:close()
    local f = assert(io.open(w.path, "rb"))
    local bytes = f:read("a")
    f:close()
    assert.truthy(read_records(bytes))
    -- one byte of the second record's data
    local first_len = string.unpack("<I8", bytes)
    local p = 12 + first_len + 4 + 12 + 3
    local bad = bytes:sub(1, p - 1) .. string.char(bytes:byte(p) ~ 0x20) .. bytes:sub(p + 1)
    local ok, err = read_records(bad)
    assert.is_nil(ok)
    assert.truthy(err:find("data CRC mismatch"))
    -- a byte of the first length
    bad = string.char(bytes:byte(1) ~ 1) .. bytes:sub(2)
    ok, err = read_records(bad)
    assert.is_nil(ok)
    assert.truthy(err:find("length CRC mismatch"))
    ok, err = read_records(bytes:sub(1, -3))
    assert.is_nil(ok)
    assert.truthy(err:find("truncated"))
    os.execute("rm -rf " .. dir)
  end)

  it("checks its arguments", function()
    local dir = tmpdir()
    local w = tb.writer(dir)
    assert.has_error(function() w:scalar("", 1, 1) end)
    assert.has_error(function() w:scalar("x", "one", 1) end)
    assert.has_error(function() w:scalar("x", 1, 1.5) end)
    assert.has_error(function() w:add(1, {{tag = "x"}}) end)
    w:close()
    assert.has_error(function() w:scalar("x", 1, 1) end, "tensorboard.scalar: the writer is closed")
    assert.has_error(function() tb.writer(42) end)
    os.execute("rm -rf " .. dir)
  end)
end)

describe("keel.monitor TensorBoard output", function()
  local function fake_opt(params)
    local opt = {param_groups = {{params = params}}}
    function opt:grad_stats()
      local out = {}
      for i, p in ipairs(params) do
        out[i] = {numel = p:numel(), nan = 0, inf = 0, zeros = 0, sum = 0, sumsq = i * i, sum_abs = i, max_abs = i,
                  norm = i, w_sumsq = 4 * i * i, weight_norm = 2 * i, update_sumsq = 0, update_ratio = 0.001 * i}
      end
      return out
    end
    return opt
  end

  it("writes scalars every `every` steps and histograms every `hist_every`", function()
    local dir = tmpdir()
    local w1, b1 = keel.randn{3, 4}, keel.randn{3}
    w1.grad, b1.grad = keel.randn{3, 4}, keel.randn{3}
    local opt = fake_opt({w1, b1})
    local m = keel.monitor.new(dir, {every = 2, hist_every = 4, jsonl = false})
    for s = 1, 8 do
      -- the guard speaks inside opt:step(), before the step event
      if s == 7 then
        hooks.emit("guard", {kind = "spike", step = 7, action = "skip", line = "guard: step 7: loss spike, skipped"})
      end
      hooks.emit("step", opt, {applied = true, step = s, grad_norm = 10 + s, clip_coef = 1, clipped = false,
                               lr = 0.01, nonfinite = 0}, 1 / s)
    end
    m:scalar("test/accuracy", 0.75, 8)
    m:close()
    local files = event_files(dir)
    assert.are.equal(1, #files)
    local evs = read_events(files[1])
    local steps, hsteps, by_tag = {}, {}, {}
    for _, ev in ipairs(evs) do
      for _, v in ipairs(ev.values) do
        by_tag[v.tag] = by_tag[v.tag] or {}
        by_tag[v.tag][ev.step] = v
        if v.tag == "grad_norm" then steps[#steps + 1] = ev.step end
        if v.tag == "grad/param1" then hsteps[#hsteps + 1] = ev.step end
      end
    end
    assert.are.same({2, 4, 6, 8}, steps)
    assert.are.same({4, 8}, hsteps)
    assert.are.equal(16, by_tag.grad_norm[6].simple)
    H.assert_close(by_tag.loss[6].simple, 1 / 6, {atol = 1e-7, rtol = 1e-6})
    assert.are.equal(2, by_tag["grad_norm/param2"][2].simple)
    assert.are.equal(4, by_tag["weight_norm/param2"][2].simple)
    H.assert_close(by_tag["update_ratio/param1"][4].simple, 0.001, {atol = 1e-9, rtol = 1e-6})
    assert.are.equal(12, by_tag["weight/param1"][8].histo.num)
    assert.are.equal(3, by_tag["grad/param2"][4].histo.num)
    assert.are.equal("guard: step 7: loss spike, skipped", by_tag.guard[7].text)
    assert.are.equal(0.75, by_tag["test/accuracy"][8].simple)
    os.execute("rm -rf " .. dir)
  end)
end)
