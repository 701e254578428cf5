-- io_spec.lua: safetensors read/write (keel.save, keel.load).
local H = require "helper"
local keel = H.keel

local FIX = "tests/fixtures/safetensors/"

local function tmpname(tag)
  return os.tmpname() .. "." .. tag .. ".safetensors"
end

local function read_bytes(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function write_bytes(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- Every element as an exact string (hex floats), row-major.
local function exact(t)
  local out = {}
  local function walk(v)
    if type(v) == "table" then
      for _, x in ipairs(v) do walk(x) end
    elseif math.type(v) == "integer" then
      out[#out + 1] = ("%d"):format(v)
    else
      out[#out + 1] = ("%a"):format(v)
    end
  end
  walk(t:totable())
  return table.concat(out, " ")
end

local function same_tensor(a, b)
  assert.are.equal(b.dtype, a.dtype)
  assert.are.same(b.shape, a.shape)
  assert.are.equal(exact(b), exact(a))
end

-- A header (JSON text) and data as a file.
local function st_file(header, data)
  return string.pack("<I8", #header) .. header .. (data or "")
end

local function load_error(bytes)
  local p = tmpname("bad")
  write_bytes(p, bytes)
  local ok, err = pcall(keel.load, p)
  os.remove(p)
  assert.is_false(ok, "loading a bad file succeeded")
  return tostring(err)
end

describe("safetensors", function()
  local files = {}
  local function tmp(tag)
    local p = tmpname(tag)
    files[#files + 1] = p
    return p
  end
  after_each(function()
    for _, p in ipairs(files) do os.remove(p) end
    files = {}
  end)

  it("round-trips every dtype and shape exactly", function()
    keel.manual_seed(1)
    local t = {
      f32 = keel.randn(3, 4),
      f64 = keel.randn({2, 2, 2}, {dtype = "float64"}),
      i64 = keel.tensor({math.mininteger, -1, 0, 1 << 62}, {dtype = "int64"}),
      scalar = keel.tensor(3.25),
      scalar64 = keel.tensor(-7, {dtype = "int64"}),
      empty = keel.zeros(0, 5),
      empty2 = keel.zeros({3, 0}, {dtype = "float64"}),
      special = keel.tensor({0 / 0, math.huge, -math.huge, -0.0, 1e-45}),
    }
    local p = tmp("rt")
    keel.save(p, t)
    local back, meta = keel.load(p)
    assert.are.same({}, meta)
    local n = 0
    for k, v in pairs(back) do
      n = n + 1
      same_tensor(t[k], v)
    end
    assert.are.equal(8, n)
    assert.is_true(back.special:totable()[1] ~= back.special:totable()[1])
  end)

  it("writes non-contiguous tensors contiguous", function()
    local base = keel.arange(12):reshape(3, 4)
    local views = {t = base:t(), n = base:narrow(2, 2, 2), e = keel.tensor({1, 2}):view(2, 1):expand(2, 3)}
    for _, v in pairs(views) do assert.is_false(v:is_contiguous()) end
    local p = tmp("nc")
    keel.save(p, views)
    local back = keel.load(p)
    for k, v in pairs(views) do
      same_tensor(v:contiguous(), back[k])
      assert.is_true(back[k]:is_contiguous())
    end
  end)

  it("keeps metadata and accepts a state_dict", function()
    local m = keel.nn.Sequential{keel.nn.Linear(3, 2), keel.nn.ReLU(), keel.nn.Linear(2, 1)}
    local p = tmp("meta")
    keel.save(p, m:state_dict(), {metadata = {epoch = "3", ["ünïcode"] = "ok \"quoted\"\n"}})
    local back, meta = keel.io.load(p)
    assert.are.same({epoch = "3", ["ünïcode"] = "ok \"quoted\"\n"}, meta)
    local m2 = keel.nn.Sequential{keel.nn.Linear(3, 2), keel.nn.ReLU(), keel.nn.Linear(2, 1)}
    m2:load_state_dict(back)
    for k, v in pairs(m:state_dict()) do same_tensor(v, m2:state_dict()[k]) end
  end)

  it("writes the bytes the reference writer writes", function()
    -- tests/fixtures/safetensors/reference.safetensors: written by make.py,
    -- byte-identical to safetensors.torch.save
    local t = {
      ["b.weight"] = keel.tensor({{0.5, -1.0, 2.0}, {0.25, 3.0, -4.5}}),
      ["a.bias"] = keel.tensor({0.1, 1e-3}),
      steps = keel.tensor(42, {dtype = "int64"}),
      x64 = keel.tensor({{1.0 / 3.0}, {-2.0}}, {dtype = "float64"}),
      empty = keel.zeros(2, 0),
    }
    local p = tmp("ref")
    keel.save(p, t, {metadata = {epoch = "3", note = "quote \" backslash \\ tab \t é"}})
    assert.are.equal(read_bytes(FIX .. "reference.safetensors"), read_bytes(p))
    -- and the header itself, for a small case
    local q = tmp("small")
    keel.save(q, {w = keel.tensor({1, 2})})
    local want = '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    want = want .. string.rep(" ", (8 - #want % 8) % 8)
    assert.are.equal(string.pack("<I8", #want) .. want .. string.pack("<ff", 1, 2), read_bytes(q))
  end)

  it("loads a file written from PyTorch with the right values", function()
    local t, meta = keel.load(FIX .. "torch.safetensors")
    assert.are.same({format = "pt", source = "make.py"}, meta)
    local function f32(x) return (string.unpack("<f", string.pack("<f", x))) end
    local want = {
      weight = {"float32", {2, 3}, {{-0.5, -0.25, 0}, {0.25, 0.5, 0.75}}},
      bias = {"float32", {3}, {1.5, -2.25, f32(0.1)}},
      double = {"float64", {2}, {0.1, -1e300}},
      index = {"int64", {3}, {1, -2, (1 << 40) + 3}},
      scalar = {"float32", {}, 7.0},
      empty = {"float32", {0, 3}, {}},
      half = {"float32", {5}, {1.0, -0.5, 65504.0, 2.0 ^ -24, math.huge}},
      bhalf = {"float32", {3}, {1.0, -3.0, 0.15625}},
      i32 = {"int64", {2}, {-7, 2147483647}},
      i16 = {"int64", {2}, {-300, 300}},
      i8 = {"int64", {2}, {-128, 127}},
      u8 = {"int64", {2}, {0, 255}},
      flag = {"int64", {3}, {1, 0, 1}},
      ["layer.0.weight"] = {"float32", {2, 2}, {{1, 3}, {2, 4}}},
    }
    local n = 0
    for k, w in pairs(want) do
      local v = t[k]
      assert.is_not_nil(v, k)
      assert.are.equal(w[1], v.dtype, k)
      assert.are.same(w[2], v.shape, k)
      if k == "empty" then
        assert.are.equal(0, v:numel())
      else
        assert.are.same(w[3], v:totable(), k)
      end
      n = n + 1
    end
    for _ in pairs(t) do n = n - 1 end
    assert.are.equal(0, n)
  end)

  describe("rejects hostile files with a clear error", function()
    local ok_entry = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    local data8 = string.pack("<ff", 1, 2)
    local cases = {
      {"an empty file", "", "file too short"},
      {"a truncated length", "\5\0\0", "file too short"},
      {"a header past EOF", string.pack("<I8", 1000) .. "{}", "runs past the end of the file"},
      {"a huge header length", string.pack("<I8", 0xffffffffffff) .. "{}", "exceeds the limit"},
      {"a negative-looking length", string.pack("<i8", -8) .. "{}", "exceeds the limit"},
      {"bad JSON", st_file('{"a":{"dtype":"F32",', ""), "corrupt header"},
      {"a non-object header", st_file('[1,2]    ', ""), "must be a JSON object"},
      {"trailing garbage", st_file('{} x', ""), "trailing bytes"},
      {"invalid UTF-8", st_file('{"\255":1}', ""), "not valid UTF-8"},
      {"an unknown dtype", st_file('{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}', data8),
       "unsupported dtype Q7"},
      {"an unsupported dtype", st_file('{"a":{"dtype":"U64","shape":[1],"data_offsets":[0,8]}}', data8),
       "unsupported dtype U64"},
      {"a wrong size", st_file('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', data8),
       "expected 12 for its shape"},
      {"offsets past the data", st_file('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', data8),
       "run past the end of the data"},
      {"overlapping offsets", st_file('{' .. ok_entry .. ',"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
       data8), "overlaps"},
      {"a hole", st_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', data8), "leaves a hole"},
      {"bytes after the last tensor", st_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', data8),
       "after the last tensor"},
      {"reversed offsets", st_file('{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}', data8), "end before"},
      {"duplicate names", st_file('{' .. ok_entry .. ',' .. ok_entry .. '}', data8 .. data8), "appears twice"},
      {"a shape that overflows", st_file('{"a":{"dtype":"F64","shape":[4294967296,4294967296],' ..
       '"data_offsets":[0,8]}}', data8), "overflows"},
      {"a negative dimension", st_file('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', data8),
       "non-negative integer"},
      {"a fractional offset", st_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', data8),
       "fraction"},
      {"a missing field", st_file('{"a":{"dtype":"F32","shape":[2]}}', data8), "lacks data_offsets"},
      {"an unknown field", st_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}', data8),
       "unknown field"},
      {"non-string metadata", st_file('{"__metadata__":{"k":1}}', ""), "must be strings"},
      {"too many dimensions", st_file('{"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,2],"data_offsets":[0,8]}}',
       data8), "more than 8 dimensions"},
      {"a NUL in a name", st_file('{"a\\u0000b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data8), "NUL"},
      {"a lone surrogate", st_file('{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data8),
       "invalid escape"},
      {"an unterminated string", st_file('{"abc', ""), "unterminated string"},
    }
    for _, c in ipairs(cases) do
      it(c[1], function()
        local err = load_error(c[2])
        assert.is_truthy(err:find("^load: "), err)
        assert.is_truthy(err:find(c[3], 1, true), ("%q does not say %q"):format(err, c[3]))
      end)
    end

    it("a directory or a missing file", function()
      local ok, err = pcall(keel.load, "/tmp")
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find("not a regular file"), err)
      ok, err = pcall(keel.load, "/nonexistent/x.safetensors")
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find("cannot open"), err)
    end)

    it("every truncation of a valid file", function()
      local good = read_bytes(FIX .. "torch.safetensors")
      for n = 0, #good - 1, 7 do load_error(good:sub(1, n)) end
    end)
  end)

  it("accepts what the format allows", function()
    -- no tensors at all, whitespace in the JSON, escapes, metadata only
    local p = tmp("ok")
    write_bytes(p, st_file(' { "__metadata__" : { "k" : "v\\u00e9\\ud83d\\ude00" } }\n', ""))
    local t, meta = keel.load(p)
    assert.are.same({}, t)
    assert.are.equal("vé😀", meta.k)
    keel.save(p, {})
    t, meta = keel.load(p)
    assert.are.same({}, t)
    assert.are.same({}, meta)
  end)

  it("refuses bad arguments to save", function()
    local p = tmp("args")
    local cases = {
      {{[1] = keel.zeros(1)}, "names must be strings"},
      {{a = 1}, "expected a keel.Tensor"},
      {{__metadata__ = keel.zeros(1)}, "reserved"},
      {{["a\0b"] = keel.zeros(1)}, "NUL"},
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(keel.save, p, c[1])
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find(c[2], 1, true), err)
    end
    local ok, err = pcall(keel.save, p, {a = keel.zeros(1)}, {metadata = {k = 1}})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("strings to strings"), err)
    assert.is_false(exists(p))
  end)

  describe("atomic writes", function()
    it("a failed write leaves the previous file and no temporary file", function()
      local p = tmp("atomic")
      keel.save(p, {w = keel.tensor({1, 2, 3})})
      local before = read_bytes(p)
      -- the temporary name is taken by a directory: the write fails
      local pid = io.open("/proc/self/stat"):read("n")
      local tmpdir = ("%s.tmp.%d"):format(p, pid)
      assert.is_true(os.execute("mkdir " .. tmpdir))
      local ok, err = pcall(keel.save, p, {w = keel.tensor({4, 5, 6})})
      os.execute("rmdir " .. tmpdir)
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find("cannot create"), err)
      assert.are.equal(before, read_bytes(p))
      -- a write that fails midway (file size limit) in another process
      local cmd = ("trap '' XFSZ; ulimit -f 8; LUA_PATH=%q LUA_CPATH=%q lua5.4 -e %q 2>&1"):format(
        package.path, package.cpath,
        ("local k = require 'keel'; local ok, e = pcall(k.save, %q, {w = k.zeros(100000)}); print(e)"):format(p))
      local h = io.popen(cmd)
      local out = h:read("a")
      h:close()
      assert.is_truthy(out:find("cannot write"), out)
      assert.are.equal(before, read_bytes(p))
      local ls = io.popen("ls " .. p .. ".tmp.* 2>/dev/null"):read("a")
      assert.are.equal("", ls)
      assert.are.same({1, 2, 3}, keel.load(p).w:totable())
      -- and a successful one replaces it
      keel.save(p, {w = keel.tensor({7})})
      assert.are.same({7}, keel.load(p).w:totable())
    end)
  end)
end)

describe("keel.io json", function()
  local J = keel.io
  it("round-trips nested values exactly", function()
    local v = {1, 2.5, "s\"\\\n\1é", true, false, {a = {b = {c = math.maxinteger}}},
               {[1] = "x", [3] = "y"}, {["#k"] = 1, [-5] = 0.1}, {}, 1.0, -0.0, 1e308, 5e-324,
               math.mininteger, 0 / 0, math.huge, -math.huge}
    local s = J.json_encode(v)
    local back = J.json_decode(s)
    assert.are.equal(s, J.json_encode(back))
    assert.are.equal(math.maxinteger, back[6].a.b.c)
    assert.are.equal("float", math.type(back[10]))
    assert.are.equal("integer", math.type(back[1]))
    assert.are.equal("y", back[7][3])
    assert.are.equal(0.1, back[8][-5])
    assert.are.equal(1, back[8]["#k"])
    assert.are.equal(5e-324, back[13])
    assert.is_true(1 / back[11] < 0)
  end)
  it("rejects what it cannot encode or decode", function()
    assert.has_error(function() J.json_encode({f = print}) end)
    assert.has_error(function() J.json_decode("[1,") end)
    assert.has_error(function() J.json_decode('{"a":1} x') end)
    assert.has_error(function() J.json_decode("99999999999999999999") end)
    assert.has_error(function() J.json_decode(string.rep("[", 100)) end)
  end)
end)
