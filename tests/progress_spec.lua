-- progress_spec.lua: keel.progress with an injected stream, clock and
-- terminal flag: plain lines without a terminal (never \r), one redrawn
-- line (\r, at most 10 redraws a second) with one.
local H = require "helper"
local keel = H.keel
local progress = require "keel.progress"

local function sink()
  local s = {parts = {}}
  function s:write(...)
    for i = 1, select("#", ...) do self.parts[#self.parts + 1] = tostring((select(i, ...))) end
  end
  function s:text() return table.concat(self.parts) end
  return s
end

local function fake_clock(t)
  local c = {t = t or 100}
  c.fn = function() return c.t end
  return c
end

local function count(s, pat)
  local n = 0
  for _ in s:gmatch(pat) do n = n + 1 end
  return n
end

describe("keel.progress", function()
  it("is keel.progress", function()
    assert.are.equal(progress.progress, keel.progress)
  end)

  it("without a terminal: plain lines every N steps and a last one, never \\r", function()
    local out, clk = sink(), fake_clock()
    local bar = keel.progress(10, {out = out, tty = false, every = 4, clock = clk.fn, items = 32, unit = "img"})
    for i = 1, 10 do
      clk.t = clk.t + 0.5
      bar:update{loss = 1 / i, grad_norm = 2, lr = 1e-3, epoch = 1}
    end
    bar:close()
    bar:close()
    local text = out:text()
    assert.is_nil(text:find("\r", 1, true))
    local ls = {}
    for l in text:gmatch("([^\n]*)\n") do ls[#ls + 1] = l end
    assert.are.equal(3, #ls)   -- steps 4, 8 and the close at 10
    assert.truthy(ls[1]:find("^epoch 1 4/10 %(40%%%) loss 0%.25 gnorm 2 lr 1%.00e%-03 64%.0 img/s ETA 00:03$"), ls[1])
    assert.truthy(ls[2]:find("8/10"))
    assert.truthy(ls[3]:find("10/10 %(100%%%).*done 00:05"), ls[3])
  end)

  it("without a terminal and without `every`: a line every `interval` seconds", function()
    local out, clk = sink(), fake_clock()
    local bar = keel.progress(1000, {out = out, tty = false, interval = 10, clock = clk.fn})
    for _ = 1, 100 do
      clk.t = clk.t + 1
      bar:update()
    end
    assert.are.equal(10, count(out:text(), "\n"))
    bar:close()   -- the state at 100 is already out
    assert.are.equal(10, count(out:text(), "\n"))
    local out2 = sink()
    local bar2 = keel.progress(1000, {out = out2, tty = false, interval = 10, clock = clk.fn})
    for _ = 1, 15 do
      clk.t = clk.t + 1
      bar2:update()
    end
    bar2:close()
    assert.are.equal(2, count(out2:text(), "\n"))
    assert.truthy(out2:text():find("15/1000 %(1%%%)"))
    assert.is_nil(out:text():find("\r", 1, true))
  end)

  it("on a terminal: \\r redraws, at most 10 a second, and the final state", function()
    local out, clk = sink(), fake_clock()
    local bar = keel.progress(200, {out = out, tty = true, width = 100, clock = clk.fn})
    for _ = 1, 200 do
      clk.t = clk.t + 0.01   -- 100 updates a second for 2 s
      bar:update(1, {loss = 0.5})
    end
    bar:close()
    local text = out:text()
    local redraws = count(text, "\r")
    assert.is_true(redraws >= 15 and redraws <= 23, "redraws: " .. redraws)
    assert.are.equal(1, count(text, "\n"))
    assert.are.equal("\n", text:sub(-1))
    local last = text:match("\r([^\r]*)\n$")
    local rate = last:match("^200/200 %[#+%] 100%% loss 0%.5 ([%d.]+) it/s done 00:02")
    assert.truthy(rate, last)
    H.assert_close(tonumber(rate), 100, 0.2)
    for line in text:gmatch("\r([^\r\n]*)") do assert.is_true(#line <= 99) end
  end)

  it("fits the terminal width and pads over a longer previous line", function()
    local out, clk = sink(), fake_clock()
    local bar = keel.progress(50, {out = out, tty = true, width = 40, clock = clk.fn, min_interval = 0})
    clk.t = clk.t + 1
    bar:update(1, {loss = 123.456, some_metric = 0.5})
    clk.t = clk.t + 1
    bar:update(1, {loss = 1})
    for line in out:text():gmatch("\r([^\r]*)") do assert.is_true(#line <= 39, line) end
    local draws = {}
    for line in out:text():gmatch("\r([^\r]*)") do draws[#draws + 1] = line end
    assert.is_true(#draws[2] >= #draws[1]:gsub("%s+$", ""))
  end)

  it("shows extra fields, unknown totals, and messages above the bar", function()
    local out, clk = sink(), fake_clock()
    local bar = keel.progress(nil, {out = out, tty = false, every = 1, clock = clk.fn, desc = "train"})
    clk.t = clk.t + 2
    bar:update(3, {acc = 0.9, items = 30})
    bar:write("guard: step 3: spike")
    local text = out:text()
    assert.truthy(text:find("^train 3 acc 0%.9 15%.0 it/s 00:02\n"), text)
    assert.truthy(text:find("guard: step 3: spike\n", 1, true))
    local tout = sink()
    local tbar = keel.progress(10, {out = tout, tty = true, clock = clk.fn, width = 80})
    tbar:update()
    tbar:write("hello")
    assert.truthy(tout:text():find("\r%s+\rhello\n\r1/10"))
  end)

  it("checks its arguments", function()
    assert.has_error(function() keel.progress(-1) end)
    assert.has_error(function() keel.progress(1.5) end)
    assert.has_error(function() keel.progress(10, {bogus = 1}) end, "progress: unknown option 'bogus'")
    assert.has_error(function() keel.progress(10, {every = 0}) end)
    local bar = keel.progress(10, {out = sink(), tty = false})
    assert.has_error(function() bar:update(-1) end)
    assert.has_error(function() bar:update("x") end)
  end)
end)
