-- tests/dataset_spec.lua: the dataset readers of keel.data on small fixtures
-- (written here, or the few in tests/fixtures/data/ made by make.py).
local H = require "helper"
local keel = H.keel
local data = require "keel.data"

local FIX = "tests/fixtures/data/"

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  return path
end

local dirs = {}
local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p '" .. d .. "'"))
  dirs[#dirs + 1] = d
  return d
end

local function tmpfile(s)
  local d = tmpdir()
  return write(d .. "/f", s)
end

teardown(function()
  for _, d in ipairs(dirs) do os.execute("rm -rf '" .. d .. "'") end
end)

-- an IDX file: type code, dims, payload
local function idx(tc, dims, payload)
  local h = string.pack(">BBBB", 0, 0, tc, #dims)
  for _, d in ipairs(dims) do h = h .. string.pack(">I4", d) end
  return h .. payload
end

local function err_of(f, ...)
  local ok, e = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return tostring(e)
end

local function has(msg, pat)
  assert.is_truthy(msg:find(pat, 1, true), "message '" .. msg .. "' lacks '" .. pat .. "'")
end

describe("read_idx", function()
  it("reads every element type with its shape and values", function()
    local t = data.read_idx(tmpfile(idx(0x08, {2, 3}, "\0\1\2\253\254\255")))
    assert.equal("float32", t.dtype)
    assert.same({2, 3}, t.shape)
    assert.same({{0, 1, 2}, {253, 254, 255}}, t:totable())
    t = data.read_idx(tmpfile(idx(0x09, {3}, "\127\128\255")))
    assert.same({127, -128, -1}, t:totable())
    t = data.read_idx(tmpfile(idx(0x0B, {2}, string.pack(">i2>i2", -300, 1234))))
    assert.same({-300, 1234}, t:totable())
    t = data.read_idx(tmpfile(idx(0x0C, {2}, string.pack(">i4>i4", -2000000000, 16777217))))
    assert.equal("float64", t.dtype)
    assert.same({-2000000000, 16777217}, t:totable())
    t = data.read_idx(tmpfile(idx(0x0D, {1, 1, 1, 2}, string.pack(">f>f", 1.5, -0.25))))
    assert.same({1, 1, 1, 2}, t.shape)
    assert.same({1.5, -0.25}, t:reshape(2):totable())
    t = data.read_idx(tmpfile(idx(0x0E, {1}, string.pack(">d", 0.1))))
    assert.equal(0.1, t[1])
  end)

  it("reads gzip files", function()
    local t = data.read_idx(FIX .. "mnist_images.idx3.gz")
    assert.same({4, 28, 28}, t.shape)
    for _, p in ipairs({{1, 1, 1}, {2, 5, 9}, {4, 28, 28}}) do
      local i, r, c = p[1] - 1, p[2] - 1, p[3] - 1
      assert.equal((i * 7 + r * 3 + c) % 256, t:get(p[1], p[2], p[3]))
    end
  end)

  it("rejects bad magic, types and dimension counts", function()
    has(err_of(data.read_idx, tmpfile("\1\0\8\1\0\0\0\1x")), "bad magic number")
    has(err_of(data.read_idx, tmpfile("\0")), "bad magic number")
    has(err_of(data.read_idx, tmpfile(idx(0x07, {1}, "x"))), "unknown IDX element type 0x07")
    has(err_of(data.read_idx, tmpfile(idx(0x08, {}, ""))), "0 dimensions, expected 1 to 4")
    has(err_of(data.read_idx, tmpfile(idx(0x08, {1, 1, 1, 1, 1}, "x"))), "5 dimensions, expected 1 to 4")
    has(err_of(data.read_idx, tmpfile(string.pack(">BBBBI4", 0, 0, 8, 2, 5))), "truncated: the header ends early")
  end)

  it("bounds the dimensions before allocating", function()
    has(err_of(data.read_idx, tmpfile(idx(0x08, {65536, 65536}, ""))), "more than 2^31 elements")
    has(err_of(data.read_idx, tmpfile(idx(0x0E, {1 << 30}, ""))), "payload too large")
    -- a zero dimension does not lift the bound on the others
    has(err_of(data.read_idx, tmpfile(idx(0x08, {0, 65536, 65536}, ""))), "more than 2^31 elements")
    assert.same({0, 5}, data.read_idx(tmpfile(idx(0x08, {0, 5}, ""))).shape)
  end)

  it("names truncated payloads and trailing data", function()
    local e = err_of(data.read_idx, tmpfile(idx(0x08, {60000, 28, 28}, string.rep("x", 1000))))
    has(e, "read_idx: f is truncated: expected 47040000 bytes of data, got 1000")
    has(err_of(data.read_idx, tmpfile(idx(0x08, {3}, "abcd"))), "trailing data after the 3 bytes of payload")
  end)

  it("rejects truncated, corrupt and padded gzip", function()
    local gz = slurp(FIX .. "mnist_images.idx3.gz")
    has(err_of(data.read_idx, tmpfile(gz:sub(1, 200))), "truncated")
    has(err_of(data.read_idx, tmpfile(gz:sub(1, #gz - 4))), "truncated")
    has(err_of(data.read_idx, tmpfile(gz .. "junk")), "trailing data after the gzip stream")
    local bad = gz:sub(1, 20) .. string.rep("\255", 40) .. gz:sub(61)
    local e = err_of(data.read_idx, tmpfile(bad))
    assert.is_truthy(e:find("corrupt gzip", 1, true) or e:find("truncated", 1, true)
                     or e:find("magic", 1, true), e)
  end)

  it("names a missing file", function()
    has(err_of(data.read_idx, "/nonexistent/x.idx"), "cannot open /nonexistent/x.idx")
    has(err_of(data.read_idx, 3), "expected a file name")
  end)
end)

describe("mnist", function()
  it("reads gzip files into images [N, 1, 28, 28] and 1-based labels", function()
    local d = tmpdir()
    write(d .. "/train-images-idx3-ubyte.gz", slurp(FIX .. "mnist_images.idx3.gz"))
    write(d .. "/train-labels-idx1-ubyte.gz", slurp(FIX .. "mnist_labels.idx1.gz"))
    local ds = data.mnist(d)
    assert.equal(4, ds.n)
    assert.same({4, 1, 28, 28}, ds.x.shape)
    assert.equal("float32", ds.x.dtype)
    assert.equal("int64", ds.y.dtype)
    assert.same({4, 2, 5, 2}, ds.y:totable())
    assert.equal((7 + 3 * 2 + 5) % 256, ds.x:get(2, 1, 3, 6))
    assert.equal(d, ds.source)
  end)

  it("reads raw test files, and names missing ones", function()
    local d = tmpdir()
    write(d .. "/t10k-images-idx3-ubyte", idx(8, {2, 28, 28}, string.rep("\9", 2 * 784)))
    write(d .. "/t10k-labels-idx1-ubyte", idx(8, {2}, "\0\9"))
    local ds = data.mnist(d, {train = false})
    assert.same({2, 1, 28, 28}, ds.x.shape)
    assert.same({1, 10}, ds.y:totable())
    has(err_of(data.mnist, d), "train-images-idx3-ubyte(.gz) not found")
  end)

  it("checks that images and labels agree", function()
    local d = tmpdir()
    write(d .. "/train-images-idx3-ubyte", idx(8, {2, 28, 28}, string.rep("\9", 2 * 784)))
    write(d .. "/train-labels-idx1-ubyte", idx(8, {3}, "\0\9\1"))
    has(err_of(data.mnist, d), "expected [N, H, W] images and [N] labels")
  end)
end)

describe("cifar10", function()
  local function record(label, base)
    local px = {}
    for i = 0, 3071 do px[#px + 1] = string.char((i + base) % 256) end
    return string.char(label) .. table.concat(px)
  end

  it("reads batches into [N, 3, 32, 32] images and 1-based labels", function()
    local d = tmpdir()
    write(d .. "/test_batch.bin", record(0, 0) .. record(9, 5) .. record(3, 7))
    local ds = data.cifar10(d, {train = false})
    assert.equal(3, ds.n)
    assert.same({3, 3, 32, 32}, ds.x.shape)
    assert.same({1, 10, 4}, ds.y:totable())
    assert.equal((1024 + 32 + 2 + 5) % 256, ds.x:get(2, 2, 2, 3))
    assert.equal("truck", ds.classes[10])
  end)

  it("concatenates the five training batches", function()
    local d = tmpdir()
    for i = 1, 5 do write(d .. "/data_batch_" .. i .. ".bin", record(i, i)) end
    local ds = data.cifar10(d)
    assert.same({2, 3, 4, 5, 6}, ds.y:totable())
    assert.equal(5, ds.x:get(5, 1, 1, 1))
  end)

  it("rejects partial records and bad labels", function()
    local d = tmpdir()
    write(d .. "/test_batch.bin", record(0, 0) .. "xyz")
    has(err_of(data.cifar10, d, {train = false}), "size 3076 is not a positive multiple of 3073")
    write(d .. "/test_batch.bin", record(0, 0) .. record(10, 0))
    has(err_of(data.cifar10, d, {train = false}), "record 2 has label 10, expected 0 to 9")
    write(d .. "/test_batch.bin", "")
    has(err_of(data.cifar10, d, {train = false}), "size 0 is not a positive multiple")
    has(err_of(data.cifar10, d), "data_batch_1.bin not found")
  end)
end)

describe("csv", function()
  it("reads numbers, with a header and a label column", function()
    local p = tmpfile("a, b ,label\r\n1.5,2,0\n-3e2,4,2\n\n5,6,1\n")
    local ds = data.csv(p, {header = true, label_column = -1})
    assert.equal(3, ds.n)
    assert.equal("float32", ds.x.dtype)
    assert.same({{1.5, 2}, {-300, 4}, {5, 6}}, ds.x:totable())
    assert.same({1, 3, 2}, ds.y:totable())
    assert.same({"a", "b"}, ds.columns)
  end)

  it("takes any label column, base and delimiter", function()
    local ds = data.csv(tmpfile("1;10;20\n2;30;40\n"), {delimiter = ";", label_column = 1, label_base = 1})
    assert.same({1, 2}, ds.y:totable())
    assert.same({{10, 20}, {30, 40}}, ds.x:totable())
    ds = data.csv(tmpfile("1,2\n3,4"))
    assert.is_nil(ds.y)
    assert.same({{1, 2}, {3, 4}}, ds.x:totable())
  end)

  it("names the line and column of a bad number", function()
    has(err_of(data.csv, tmpfile("1,2\n3,4x\n")), "read_csv: f:2:2: bad number '4x', expected a number")
    has(err_of(data.csv, tmpfile("1,2\n3,\n")), "f:2:2: empty field")
    has(err_of(data.csv, tmpfile("h1,h2\n1,2\nfoo,4\n"), {header = true}), "f:3:1: bad number 'foo'")
  end)

  it("rejects ragged rows, empty files and bad labels", function()
    has(err_of(data.csv, tmpfile("1,2,3\n4,5\n")), "f:2: 2 columns, expected 3 (as on line 1)")
    has(err_of(data.csv, tmpfile("")), "no data rows")
    has(err_of(data.csv, tmpfile("1,2.5\n"), {label_column = 2}), "non-integer labels")
    has(err_of(data.csv, tmpfile("1,-1\n"), {label_column = 2}), "label -1 in column 2")
    has(err_of(data.csv, tmpfile("1,2\n"), {label_column = 3}), "label_column 3, expected 1..2")
    has(err_of(data.csv, "/nonexistent.csv"), "cannot open")
  end)
end)

describe("chars", function()
  it("builds a sorted vocabulary and 1-based ids", function()
    local ds = data.chars("hello world", {text = true})
    assert.same({" ", "d", "e", "h", "l", "o", "r", "w"}, ds.vocab)
    assert.equal(11, ds.n)
    assert.equal("int64", ds.data.dtype)
    assert.same({4, 3, 5, 5, 6}, ds.data:narrow(1, 1, 5):totable())
    assert.equal(5, ds.stoi.l)
    assert.equal("hello world", ds.decode(ds.data))
    assert.equal("low", ds.decode(ds.encode("low")))
    assert.equal("he", ds.decode({4, 3}))
  end)

  it("reads a file and rejects unknown characters and ids", function()
    local ds = data.chars(tmpfile("abca\n"))
    assert.same({"\n", "a", "b", "c"}, ds.vocab)
    has(err_of(ds.encode, "abz"), "character 'z' at position 3 is not in the vocabulary")
    has(err_of(ds.decode, {1, 9}), "id 9 at position 2 is not in 1..4")
    has(err_of(data.chars, "", {text = true}), "empty text")
    has(err_of(data.chars, "/nonexistent/input.txt"), "cannot open /nonexistent/input.txt")
    has(err_of(data.chars, "input.txt"), "cannot open input.txt")
    assert.same({"a", "b"}, data.chars("abba").vocab)
  end)
end)

describe("image_folder", function()
  local function folder()
    local d = tmpdir()
    os.execute("mkdir -p '" .. d .. "/cat' '" .. d .. "/ant'")
    write(d .. "/cat/a.png", slurp(FIX .. "rgb_3x2.png"))
    write(d .. "/ant/b.PNG", slurp(FIX .. "gray_3x2.png"))
    write(d .. "/ant/c.png", slurp(FIX .. "rgb_3x2.png"))
    return d
  end

  it("reads classes from sorted subfolders, images as [N, C, H, W] 0..255", function()
    local ds = data.image_folder(folder())
    assert.same({"ant", "cat"}, ds.classes)
    assert.equal(3, ds.n)
    assert.same({3, 3, 2, 3}, ds.x.shape)
    assert.same({1, 1, 2}, ds.y:totable())
    -- rgb pixel (r, c) = (10r + c, 100 + 10r + c, 200 + r + c), 0-based
    assert.equal(12, ds.x:get(2, 1, 2, 3))
    assert.equal(112, ds.x:get(3, 2, 2, 3))
    assert.equal(203, ds.x:get(3, 3, 2, 3))
    -- gray expanded to three equal channels
    assert.equal(41, ds.x:get(1, 3, 2, 2))
  end)

  it("converts to one channel and resizes", function()
    local ds = data.image_folder(folder(), {channels = 1, size = {4, 6}})
    assert.same({3, 1, 4, 6}, ds.x.shape)
    assert.equal(0, ds.x:get(1, 1, 1, 1))
    assert.equal(42, ds.x:get(1, 1, 4, 6))   -- corner: gray (1, 2) = 42
  end)

  it("names a bad file", function()
    local d = folder()
    write(d .. "/cat/notes.txt", "hi")
    has(err_of(data.image_folder, d), "cat/notes.txt is not a .png, .jpg, .jpeg or .bmp file")
    os.remove(d .. "/cat/notes.txt")
    write(d .. "/cat/broken.png", slurp(FIX .. "rgb_3x2.png"):sub(1, 40))
    has(err_of(data.image_folder, d), "cat/broken.png")
    write(d .. "/cat/broken.png", "not an image at all")
    has(err_of(data.image_folder, d), "cat/broken.png: not a PNG, JPEG or BMP image")
  end)

  it("refuses hostile headers before decoding", function()
    local d = folder()
    local png = slurp(FIX .. "rgb_3x2.png")
    -- the IDAT chunk (after the 8-byte signature and 25-byte IHDR) claims 2^30 bytes
    write(d .. "/cat/a.png", png:sub(1, 33) .. string.pack(">I4", 1 << 30) .. png:sub(38))
    has(err_of(data.image_folder, d), "a.png: corrupt PNG: the chunk at byte 33 claims 1073741824 bytes")
    -- a JPEG Huffman table of 16 * 17 = 272 codes (stb 2.27 overflows on it)
    write(d .. "/cat/a.png", "\255\216\255\196\0\19\0" .. string.rep("\17", 16) .. string.rep("\0", 300))
    has(err_of(data.image_folder, d), "a.png: corrupt JPEG: a Huffman table of 272 codes")
    -- a 54-byte BMP claiming 4000 x 4000 pixels
    write(d .. "/cat/a.png", string.pack("<c2I4I4I4", "BM", 54, 0, 54)
      .. string.pack("<I4i4i4I2I2I4I4i4i4I4I4", 40, 4000, 4000, 1, 24, 0, 0, 0, 0, 0, 0))
    has(err_of(data.image_folder, d, {size = {2, 3}}), "a.png: 4000x4000 pixels, more than a file of 54 bytes can hold")
  end)

  it("requires a size when images differ", function()
    local d = folder()
    local bmp = string.pack("<c2I4I4I4", "BM", 54 + 4, 0, 54)
      .. string.pack("<I4i4i4I2I2I4I4i4i4I4I4", 40, 1, 1, 1, 24, 0, 4, 0, 0, 0, 0) .. "\1\2\3\0"
    write(d .. "/cat/z.bmp", bmp)
    has(err_of(data.image_folder, d), "z.bmp is 1x1, expected 2x3")
    local ds = data.image_folder(d, {size = {2, 3}})
    assert.equal(4, ds.n)
    assert.same({3, 2, 1}, {ds.x:get(4, 1, 1, 1), ds.x:get(4, 2, 1, 1), ds.x:get(4, 3, 1, 1)})
    has(err_of(data.image_folder, d .. "/nope"), "cannot open directory")
    has(err_of(data.image_folder, d, {channels = 2}), "channels 2, expected 1 or 3")
  end)
end)
