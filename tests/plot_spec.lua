-- plot_spec.lua: keel.plot and `keel plot`: the PNG is valid (signature,
-- IHDR), has the size asked for, decodes with keel's own image reader and
-- shows the loss and per-parameter curves (their colours are there).
local H = require "helper"
local keel = H.keel
local core = require "keel.core"
local S = core._summary
local hooks = require "keel.hooks"
local plot = require "keel.plot"

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(S.mkdirs(d))
  return d
end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- width and height from the IHDR chunk
local function ihdr(png)
  local w, h = string.unpack(">I4>I4", png, 17)
  return {w, h}
end

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- A run written by keel.monitor from fake step events: loss falling, a
-- spike, a NaN loss, a skipped step, a guard event; three parameters.
local function make_run(dir, steps)
  local params = {keel.randn{3, 3}, keel.randn{3}, keel.randn{2, 3}}
  local opt = {param_groups = {{params = params}}}
  local step_now = 0
  function opt:grad_stats()
    local out = {}
    for i, p in ipairs(params) do
      local g = 10 ^ (-i) * (1 + 0.5 * math.sin(step_now / 7)) * (step_now == 60 and 1000 or 1)
      out[i] = {numel = p:numel(), nan = 0, inf = 0, norm = g, weight_norm = 1, update_ratio = 1e-3}
    end
    return out
  end
  local m = keel.monitor.new(dir, {every = 2, tensorboard = false})
  for s = 1, steps do
    step_now = s
    local loss = 2 * math.exp(-s / 30) + (s == 60 and 5 or 0)
    if s == 80 then loss = 0 / 0 end
    hooks.emit("step", opt, {applied = s ~= 90, reason = s == 90 and "guard" or nil, step = s, grad_norm = 1,
                             clip_coef = 1, clipped = false, lr = 0.1}, loss)
  end
  hooks.emit("guard", {kind = "spike", step = 60, action = "skip", line = "guard: spike"})
  m:close()
end

-- Decoded pixels as one float32 channel 0xRRGGBB (exact below 2^24).
local function packed_pixels(path)
  local img = core._data.read_images({path}, 3, 0, 0)   -- [1, 3, H, W], 0..255
  local rgb = img:select(1, 1)
  return rgb:select(1, 1) * 65536 + rgb:select(1, 2) * 256 + rgb:select(1, 3), img.shape
end

local function count_colour(px, c) return px:eq(c):sum():item() end

describe("keel.plot", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() os.execute("rm -rf " .. dir) end)

  it("writes a valid PNG of the requested size with the loss and per-parameter curves", function()
    make_run(dir, 120)
    local out, info = plot.plot(dir, {out = dir .. "/grads.png", width = 640, height = 480})
    assert.are.equal(dir .. "/grads.png", out)
    assert.are.equal(60, info.steps)
    assert.are.equal(3, info.params)
    assert.are.equal(2, info.events)   -- the skip at 90 and the guard event
    local png = read(out)
    assert.are.equal("\137PNG\r\n\26\n", png:sub(1, 8))
    assert.are.equal("IHDR", png:sub(13, 16))
    assert.are.same({640, 480}, ihdr(png))
    local px, shape = packed_pixels(out)
    assert.are.same({1, 3, 480, 640}, shape)
    local total = 640 * 480
    local white = count_colour(px, 0xffffff)
    assert.is_true(white < total * 0.95, "mostly blank")
    assert.is_true(white > total * 0.5, "mostly ink")
    -- the palette's first three colours (loss and parameters 1..3) and the event red
    for _, c in ipairs {0x1f77b4, 0xff7f0e, 0x2ca02c, 0xd62728} do
      assert.is_true(count_colour(px, c) > 20, ("colour %06x is missing"):format(c))
    end
    -- ink in both panels: the top and bottom halves of the plot area
    local top = px:narrow(1, 60, 150):narrow(2, 120, 300)
    local bottom = px:narrow(1, 300, 120):narrow(2, 120, 300)
    assert.is_true(count_colour(top, 0x1f77b4) > 10)
    assert.is_true(count_colour(bottom, 0xff7f0e) + count_colour(bottom, 0x2ca02c) > 10)
  end)

  it("defaults to RUN_DIR/plot.png, takes a .jsonl path, filters parameters, skips broken lines", function()
    make_run(dir, 40)
    -- a run killed mid-write leaves half a line
    local f = assert(io.open(dir .. "/metrics.jsonl", "a"))
    f:write('{"type":"step","step":41,"loss":0.')
    f:close()
    local out, info = plot.plot(dir)
    assert.are.equal(dir .. "/plot.png", out)
    assert.are.equal(1, info.bad_lines)
    assert.are.equal("\137PNG", read(out):sub(1, 4))
    local _, info2 = plot.plot(dir .. "/metrics.jsonl", {out = dir .. "/p2.png", layers = "param[12]$"})
    assert.are.equal(2, info2.params)
  end)

  it("reads monitor lines: key order, NaN and Infinity strings, escapes", function()
    local v = plot._decode('{"b":1,"a":{"z":"NaN","y":"Infinity","x":-1.5e-3},"s":"q\\"\\u00e9\\n","t":[true,null]}')
    assert.are.equal(1, v.b)
    assert.are.equal(-1.5e-3, v.a.x)
    assert.are.equal("q\"\u{e9}\n", v.s)
    assert.are.equal(true, v.t[1])
    write(dir .. "/metrics.jsonl", table.concat({
      '{"type":"step","step":2,"loss":"NaN","params":{"w2":{"grad_norm":"Infinity"},"w1":{"grad_norm":0.5}}}',
      '{"type":"step","step":1,"loss":1,"params":{"w2":{"grad_norm":1},"w1":{"grad_norm":0.25}}}',
      '{"type":"skip","step":2,"reason":"nonfinite"}',
      'not json',
      '',
    }, "\n"))
    local data = plot.read(dir .. "/metrics.jsonl")
    assert.are.same({"w2", "w1"}, data.names)   -- file order, not sorted
    assert.are.equal(1, data.records[1].step)    -- sorted by step
    assert.is_true(data.records[2].loss ~= data.records[2].loss)
    assert.are.equal(math.huge, data.records[2].params.w2)
    assert.are.equal(1, #data.events)
    assert.are.equal(1, data.bad_lines)
    local out = plot.plot(dir, {width = 400, height = 300})
    assert.are.equal("\137PNG", read(out):sub(1, 4))
  end)

  it("reports a run without records and bad options", function()
    write(dir .. "/metrics.jsonl", '{"type":"scalar","step":1,"tag":"x","value":1}\n')
    assert.has_error(function() plot.plot(dir) end)
    assert.has_error(function() plot.plot(dir .. "/missing") end)
    assert.has_error(function() plot.plot(dir, {width = 10}) end)
    assert.has_error(function() plot.plot(dir, {colour = "red"}) end, "plot: unknown option 'colour'")
    assert.has_error(function() plot.plot(42) end)
  end)

  it("encodes PNGs from strings and pixel tables", function()
    local png = S.png_encode(2, 1, "\255\0\0\0\0\255")
    assert.are.equal("\137PNG\r\n\26\n", png:sub(1, 8))
    assert.are.same({2, 1}, ihdr(png))
    assert.are.equal(8, png:byte(25))   -- bit depth 8
    assert.are.equal(2, png:byte(26))   -- colour type 2 (RGB)
    write(dir .. "/p.png", S.png_encode(3, 2, {0xff0000, 0x00ff00, 0x0000ff, 0x000000, 0xffffff, 0x808080}))
    local img = core._data.read_images({dir .. "/p.png"}, 3, 0, 0)
    assert.are.same({{{255, 0, 0}, {0, 255, 128}}, {{0, 255, 0}, {0, 255, 128}}, {{0, 0, 255}, {0, 255, 128}}},
      img:select(1, 1):totable())
    assert.has_error(function() S.png_encode(2, 2, "abc") end)
    assert.has_error(function() S.png_encode(0, 2, "") end)
    assert.has_error(function() S.png_encode(1, 1, {1.5}) end)
  end)
end)

describe("keel plot (the executable)", function()
  local BIN = os.getenv("KEEL_BIN")
  if not BIN or BIN == "" then
    pending("KEEL_BIN is not set")
    return
  end
  local function sh(cmd)
    local p = io.popen(cmd .. " 2>&1; echo \"rc=$?\"")
    local out = p:read("a")
    p:close()
    return out, tonumber(out:match("rc=(%d+)%s*$"))
  end

  it("draws RUN_DIR into -o FILE, and fails with a message on a bad run", function()
    local dir = tmpdir()
    make_run(dir, 30)
    local out, rc = sh(("'%s' plot '%s' -o '%s/g.png' --width 500 --height 400"):format(BIN, dir, dir))
    assert.are.equal(0, rc, out)
    assert.truthy(out:find("g.png"))
    local png = read(dir .. "/g.png")
    assert.are.same({500, 400}, ihdr(png))
    out, rc = sh(("'%s' plot '%s/nothing'"):format(BIN, dir))
    assert.are_not.equal(0, rc)
    assert.truthy(out:find("keel plot:"), out)
    out, rc = sh(("'%s' plot"):format(BIN))
    assert.are_not.equal(0, rc)
    assert.truthy(out:find("usage: keel plot"), out)
    out, rc = sh(("'%s' -e 'print(1 + 1)'"):format(BIN))   -- the rest of the command line is unchanged
    assert.are.equal(0, rc)
    assert.truthy(out:find("^2\n"))
    os.execute("rm -rf " .. dir)
  end)
end)
