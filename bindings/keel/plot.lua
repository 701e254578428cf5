-- keel.plot: draws a run's metrics.jsonl (keel.monitor) into a PNG.
--
--   keel plot RUN_DIR -o grads.png                 (the keel executable)
--   require("keel.plot").plot(run_dir, {out = "grads.png"})
--
-- Top panel: the loss over steps (log scale when it spans more than three
-- decades, as an explosion does; non-finite losses are marked on the top
-- edge). Bottom panel: the gradient norm of each parameter over steps, log
-- scale, one colour per parameter with a legend. Steps the optimizer
-- skipped and guard events are red dashed lines in both panels.
--
-- Everything is drawn here, in Lua, into a table of 0xRRGGBB pixels
-- (anti-aliased lines, a 5x7 bitmap font of our own); the PNG is encoded by
-- stb_image_write in C (keel.core._summary.png_encode).
--
-- opts: out (default RUN_DIR/plot.png), width (1200), height (800),
-- layers (a Lua pattern: only parameters whose name matches; by default
-- all, or only non-bias ones when there are more than 20), title.

local core = require "keel.core"
local json = require "keel.json"
local S = core._summary

local plot = {}

-- {======================================================================
-- JSON lines (keel.json), keeping the order of object keys: the legend
-- follows the parameter order. keel.monitor writes NaN and the infinities
-- as strings, Python as bare words: num() below reads both.
-- =======================================================================

local ORDER = setmetatable({}, {__mode = "k"})   -- object -> its keys in file order

local function decode(s)
  return json.decode(s, {name = "json", order = ORDER})
end
plot._decode = decode

local SPECIAL = {NaN = 0 / 0, Infinity = math.huge, ["-Infinity"] = -math.huge}
local function num(v)
  if type(v) == "number" then return v end
  if type(v) == "string" then return SPECIAL[v] end
  return nil
end

-- Reads RUN_DIR/metrics.jsonl (or a file): the step records and the event
-- steps (skips, guard, anomaly). Lines that do not parse (a run killed
-- mid-write) are skipped.
function plot.read(path)
  local f, err = io.open(path, "r")
  if not f then error("plot: " .. tostring(err), 0) end
  local records, events, names, seen, bad = {}, {}, {}, {}, 0
  for line in f:lines() do
    if line:find("%S") then
      local ok, rec = pcall(decode, line)
      if ok and type(rec) == "table" then
        local kind, step = rec.type, num(rec.step)
        if kind == "step" and step then
          local r = {step = step, loss = num(rec.loss), grad_norm = num(rec.grad_norm), params = {}}
          if type(rec.params) == "table" then
            for _, name in ipairs(ORDER[rec.params] or {}) do
              local p = rec.params[name]
              if type(p) == "table" then
                r.params[name] = num(p.grad_norm)
                if not seen[name] then seen[name] = true names[#names + 1] = name end
              end
            end
          end
          records[#records + 1] = r
        elseif (kind == "skip" or kind == "guard" or kind == "anomaly") and step then
          events[#events + 1] = {step = step, kind = kind}
        end
      else
        bad = bad + 1
      end
    end
  end
  f:close()
  table.sort(records, function(a, b) return a.step < b.step end)
  return {records = records, events = events, names = names, bad_lines = bad}
end

-- }======================================================================

-- {======================================================================
-- Canvas: a table of 0xRRGGBB pixels, row-major
-- =======================================================================

local Canvas = {}
Canvas.__index = Canvas

local function canvas(w, h, bg)
  local px = {}
  for i = 1, w * h do px[i] = bg end
  return setmetatable({w = w, h = h, px = px}, Canvas)
end

-- Blends colour c into pixel (x, y) (0-based) with coverage a in [0, 1].
function Canvas:blend(x, y, c, a)
  if x < 0 or y < 0 or x >= self.w or y >= self.h or a <= 0 then return end
  local i = y * self.w + x + 1
  if a >= 1 then self.px[i] = c return end
  local b = self.px[i]
  local r = ((b >> 16) & 255) * (1 - a) + ((c >> 16) & 255) * a
  local g = ((b >> 8) & 255) * (1 - a) + ((c >> 8) & 255) * a
  local bl = (b & 255) * (1 - a) + (c & 255) * a
  self.px[i] = (math.floor(r + 0.5) << 16) | (math.floor(g + 0.5) << 8) | math.floor(bl + 0.5)
end

function Canvas:rect(x0, y0, w, h, c)
  local x1, y1 = math.min(self.w, x0 + w) - 1, math.min(self.h, y0 + h) - 1
  x0, y0 = math.max(0, x0), math.max(0, y0)
  local px, W = self.px, self.w
  for y = y0, y1 do
    local base = y * W + 1
    for x = x0, x1 do px[base + x] = c end
  end
end

-- Anti-aliased line of the given width (pixels), walking the major axis:
-- each column (or row) gets a span around the centre, its two ends partly
-- covered.
function Canvas:line(x0, y0, x1, y1, c, width)
  width = width or 1.5
  local dx, dy = x1 - x0, y1 - y0
  local steep = math.abs(dy) > math.abs(dx)
  if steep then x0, y0, x1, y1, dx, dy = y0, x0, y1, x1, dy, dx end
  if x0 > x1 then x0, x1, y0, y1 = x1, x0, y1, y0 end
  local slope = dx ~= 0 and dy / dx or 0
  local half = width / 2 * math.sqrt(1 + slope * slope)
  local xs, xe = math.floor(x0 + 0.5), math.floor(x1 + 0.5)
  for x = xs, xe do
    local yc = y0 + slope * (x - x0)
    local top, bot = yc - half, yc + half
    for y = math.floor(top), math.floor(bot) do
      local a = math.min(bot, y + 1) - math.max(top, y)   -- covered part of [y, y+1]
      if a > 0 then
        if steep then self:blend(y, x, c, a) else self:blend(x, y, c, a) end
      end
    end
  end
end

-- Dashed vertical line.
function Canvas:vdash(x, y0, y1, c, on, off)
  x = math.floor(x + 0.5)
  local y = y0
  while y <= y1 do
    for k = 0, on - 1 do if y + k <= y1 then self:blend(x, y + k, c, 0.8) end end
    y = y + on + off
  end
end

-- }======================================================================

-- {======================================================================
-- A 5x7 bitmap font (9 rows with descenders), drawn by us
-- =======================================================================

local GLYPHS = {
  ["0"] = ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.", ["1"] = "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
  ["2"] = ".###.|#...#|....#|...#.|..#..|.#...|#####", ["3"] = "#####|...#.|..#..|...#.|....#|#...#|.###.",
  ["4"] = "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.", ["5"] = "#####|#....|####.|....#|....#|#...#|.###.",
  ["6"] = "..##.|.#...|#....|####.|#...#|#...#|.###.", ["7"] = "#####|....#|...#.|..#..|.#...|.#...|.#...",
  ["8"] = ".###.|#...#|#...#|.###.|#...#|#...#|.###.", ["9"] = ".###.|#...#|#...#|.####|....#|...#.|.##..",
  a = ".....|.....|.###.|....#|.####|#...#|.####", b = "#....|#....|#.##.|##..#|#...#|#...#|####.",
  c = ".....|.....|.###.|#....|#....|#...#|.###.", d = "....#|....#|.##.#|#..##|#...#|#...#|.####",
  e = ".....|.....|.###.|#...#|#####|#....|.###.", f = "..##.|.#..#|.#...|###..|.#...|.#...|.#...",
  g = ".....|.....|.####|#...#|#...#|.####|....#|#...#|.###.", h = "#....|#....|#.##.|##..#|#...#|#...#|#...#",
  i = "..#..|.....|.##..|..#..|..#..|..#..|.###.", j = "...#.|.....|..##.|...#.|...#.|...#.|...#.|#..#.|.##..",
  k = "#....|#....|#..#.|#.#..|##...|#.#..|#..#.", l = ".##..|..#..|..#..|..#..|..#..|..#..|.###.",
  m = ".....|.....|##.#.|#.#.#|#.#.#|#.#.#|#.#.#", n = ".....|.....|#.##.|##..#|#...#|#...#|#...#",
  o = ".....|.....|.###.|#...#|#...#|#...#|.###.", p = ".....|.....|####.|#...#|#...#|#...#|####.|#....|#....",
  q = ".....|.....|.####|#...#|#...#|#...#|.####|....#|....#", r = ".....|.....|#.##.|##..#|#....|#....|#....",
  s = ".....|.....|.###.|#....|.###.|....#|####.", t = ".#...|.#...|###..|.#...|.#...|.#..#|..##.",
  u = ".....|.....|#...#|#...#|#...#|#..##|.##.#", v = ".....|.....|#...#|#...#|#...#|.#.#.|..#..",
  w = ".....|.....|#...#|#...#|#.#.#|#.#.#|.#.#.", x = ".....|.....|#...#|.#.#.|..#..|.#.#.|#...#",
  y = ".....|.....|#...#|#...#|#...#|#...#|.####|....#|.###.", z = ".....|.....|#####|...#.|..#..|.#...|#####",
  A = ".###.|#...#|#...#|#####|#...#|#...#|#...#", B = "####.|#...#|#...#|####.|#...#|#...#|####.",
  C = ".###.|#...#|#....|#....|#....|#...#|.###.", D = "####.|#...#|#...#|#...#|#...#|#...#|####.",
  E = "#####|#....|#....|####.|#....|#....|#####", F = "#####|#....|#....|####.|#....|#....|#....",
  G = ".###.|#...#|#....|#.###|#...#|#...#|.####", H = "#...#|#...#|#...#|#####|#...#|#...#|#...#",
  I = ".###.|..#..|..#..|..#..|..#..|..#..|.###.", J = "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
  K = "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#", L = "#....|#....|#....|#....|#....|#....|#####",
  M = "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#", N = "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
  O = ".###.|#...#|#...#|#...#|#...#|#...#|.###.", P = "####.|#...#|#...#|####.|#....|#....|#....",
  Q = ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#", R = "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
  S = ".####|#....|#....|.###.|....#|....#|####.", T = "#####|..#..|..#..|..#..|..#..|..#..|..#..",
  U = "#...#|#...#|#...#|#...#|#...#|#...#|.###.", V = "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
  W = "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.", X = "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
  Y = "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..", Z = "#####|....#|...#.|..#..|.#...|#....|#####",
  ["."] = ".....|.....|.....|.....|.....|.##..|.##..", ["-"] = ".....|.....|.....|.###.|.....|.....|.....",
  ["+"] = ".....|..#..|..#..|#####|..#..|..#..|.....", [":"] = ".....|.##..|.##..|.....|.##..|.##..|.....",
  ["/"] = "....#|....#|...#.|..#..|.#...|#....|#....", ["_"] = ".....|.....|.....|.....|.....|.....|.....|#####",
  ["("] = "...#.|..#..|.#...|.#...|.#...|..#..|...#.", [")"] = ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
  [","] = ".....|.....|.....|.....|.....|.##..|.##..|..#..|.#...", ["="] = ".....|.....|#####|.....|#####|.....|.....",
  ["%"] = "##..#|##..#|...#.|..#..|.#...|#..##|#..##", ["["] = ".###.|.#...|.#...|.#...|.#...|.#...|.###.",
  ["]"] = ".###.|...#.|...#.|...#.|...#.|...#.|.###.", ["#"] = ".#.#.|.#.#.|#####|.#.#.|#####|.#.#.|.#.#.",
  ["*"] = ".....|..#..|#.#.#|.###.|#.#.#|..#..|.....", ["?"] = ".###.|#...#|....#|...#.|..#..|.....|..#..",
  ["!"] = "..#..|..#..|..#..|..#..|..#..|.....|..#..", ["'"] = "..#..|..#..|.#...|.....|.....|.....|.....",
  ["<"] = "...#.|..#..|.#...|#....|.#...|..#..|...#.", [">"] = ".#...|..#..|...#.|....#|...#.|..#..|.#...",
}
-- glyph -> list of {col, row} of set pixels (0-based)
local FONT = {}
for ch, rows in pairs(GLYPHS) do
  local set, r = {}, 0
  for row in rows:gmatch("[^|]+") do
    for c = 1, #row do
      if row:sub(c, c) == "#" then set[#set + 1] = {c - 1, r} end
    end
    r = r + 1
  end
  FONT[ch] = set
end
local CELL_W, CELL_H = 6, 10   -- 5 + 1 spacing; 9 rows + 1

local function text_width(s, scale) return #s * CELL_W * scale - scale end

-- Text with its top-left at (x, y); unknown characters draw as '?'.
function Canvas:text(x, y, s, c, scale)
  scale = scale or 2
  for i = 1, #s do
    local ch = s:sub(i, i)
    local g = FONT[ch] or FONT[ch:lower()] or (ch ~= " " and FONT["?"]) or nil
    if g then
      local ox = x + (i - 1) * CELL_W * scale
      for _, p in ipairs(g) do self:rect(ox + p[1] * scale, y + p[2] * scale, scale, scale, c) end
    end
  end
end

-- }======================================================================

-- {======================================================================
-- Axes
-- =======================================================================

local function fmt_tick(v, step)
  if v == 0 then return "0" end
  local a = math.abs(v)
  if a >= 1e5 or a < 1e-3 then
    local s = ("%.1e"):format(v):gsub("%.0e", "e"):gsub("e%+?(-?)0*(%d)", "e%1%2")
    return s
  end
  local d = math.max(0, -math.floor(math.log(step, 10) + 1e-9))
  return ("%." .. d .. "f"):format(v)
end

-- Ticks of a linear axis over [lo, hi]: about n, at 1, 2 or 5 times a power of ten.
local function linear_ticks(lo, hi, n)
  local raw = (hi - lo) / n
  local p = 10 ^ math.floor(math.log(raw, 10))
  local step = p
  for _, m in ipairs {1, 2, 5, 10} do
    if m * p >= raw then step = m * p break end
  end
  local ticks = {}
  local t = math.ceil(lo / step - 1e-9) * step
  while t <= hi + step * 1e-9 do
    ticks[#ticks + 1] = {v = math.abs(t) < step * 1e-9 and 0 or t}
    t = t + step
  end
  for _, tk in ipairs(ticks) do tk.label = fmt_tick(tk.v, step) end
  return ticks
end

local function decade_label(e)
  if e >= 0 and e <= 3 then return ("%d"):format(10 ^ e // 1) end
  if e == -1 then return "0.1" end
  if e == -2 then return "0.01" end
  return "1e" .. e
end

-- Axis: maps values to pixels. kind "linear" or "log" (log10 values).
local function axis(lo, hi, p0, p1, kind)
  local ax = {lo = lo, hi = hi, p0 = p0, p1 = p1, kind = kind}
  local span = hi - lo
  function ax.map(v)
    if kind == "log" then v = math.log(v, 10) end
    return p0 + (v - lo) / span * (p1 - p0)
  end
  return ax
end

-- Range of finite values (positive ones for a log axis), padded.
local function value_range(values, log)
  local lo, hi = math.huge, -math.huge
  for _, v in ipairs(values) do
    if v == v and v ~= math.huge and v ~= -math.huge and (not log or v > 0) then
      local x = log and math.log(v, 10) or v
      if x < lo then lo = x end
      if x > hi then hi = x end
    end
  end
  if lo > hi then return nil end
  if hi - lo < 1e-12 * math.max(1, math.abs(hi)) then
    if log then lo, hi = lo - 0.5, hi + 0.5 else lo, hi = lo - math.max(1e-3, math.abs(lo) * 0.1), hi + math.max(1e-3, math.abs(hi) * 0.1) end
  else
    local pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
  end
  return lo, hi
end

-- }======================================================================

-- {======================================================================
-- The figure
-- =======================================================================

local WHITE, BLACK, FRAME, GRID, TEXT = 0xffffff, 0x000000, 0x666666, 0xe6e6e6, 0x222222
local EVENT = 0xd62728
local PALETTE = {0x1f77b4, 0xff7f0e, 0x2ca02c, 0x9467bd, 0x8c564b, 0xe377c2, 0x7f7f7f, 0xbcbd22, 0x17becf,
                 0x393b79, 0xad494a, 0x637939, 0x7b4173, 0x3182bd, 0xe6550d, 0x31a354}

-- One panel: frame, grid, ticks and labels, the series, the events.
local function panel(cv, box, xr, series, opts)
  local x0, y0, w, h = box.x, box.y, box.w, box.h
  local all = {}
  for _, s in ipairs(series) do for _, v in ipairs(s.y) do all[#all + 1] = v end end
  local log = opts.log
  local lo, hi = value_range(all, log)
  cv:rect(x0, y0, w, h, WHITE)
  cv:text(x0, y0 - 26, opts.title, TEXT, 2)
  if not lo then
    cv:text(x0 + 20, y0 + h // 2 - 8, "no data", FRAME, 2)
  end
  lo, hi = lo or 0, hi or 1
  local ax = axis(xr[1], xr[2], x0, x0 + w - 1, "linear")
  local ay = axis(lo, hi, y0 + h - 1, y0, log and "log" or "linear")
  -- y grid and labels
  if log then
    local e0, e1 = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
    local every = math.max(1, math.ceil((e1 - e0 + 1) / 8))
    for e = math.floor(lo), math.ceil(hi) do
      if (e1 - e0) <= 4 then   -- minor ticks 2..9 within each decade
        for m = 2, 9 do
          local lv = e + math.log(m, 10)
          if lv > lo and lv < hi then
            local y = math.floor(ay.map(10 ^ lv) + 0.5)
            cv:rect(x0, y, 5, 1, FRAME)
          end
        end
      end
      if e >= e0 and e <= e1 and (e - e0) % every == 0 then
        local y = math.floor(ay.map(10 ^ e) + 0.5)
        cv:rect(x0, y, w, 1, GRID)
        cv:rect(x0 - 6, y, 6, 1, FRAME)
        local lab = decade_label(e)
        cv:text(x0 - 10 - text_width(lab, 2), y - 7, lab, TEXT, 2)
      end
    end
  else
    for _, tk in ipairs(linear_ticks(lo, hi, 5)) do
      local y = math.floor(ay.map(tk.v) + 0.5)
      if y >= y0 and y < y0 + h then
        cv:rect(x0, y, w, 1, GRID)
        cv:rect(x0 - 6, y, 6, 1, FRAME)
        cv:text(x0 - 10 - text_width(tk.label, 2), y - 7, tk.label, TEXT, 2)
      end
    end
  end
  -- x grid and labels
  for _, tk in ipairs(linear_ticks(xr[1], xr[2], 8)) do
    local x = math.floor(ax.map(tk.v) + 0.5)
    if x >= x0 and x < x0 + w then
      cv:rect(x, y0, 1, h, GRID)
      cv:rect(x, y0 + h, 1, 6, FRAME)
      if opts.xlabels then cv:text(x - text_width(tk.label, 2) // 2, y0 + h + 10, tk.label, TEXT, 2) end
    end
  end
  -- events
  for _, ev in ipairs(opts.events or {}) do
    if ev.step >= xr[1] and ev.step <= xr[2] then cv:vdash(ax.map(ev.step), y0, y0 + h - 1, EVENT, 6, 4) end
  end
  -- series: polylines broken at non-finite (and, on a log axis, non-positive) values
  for _, s in ipairs(series) do
    local px, py
    for i, v in ipairs(s.y) do
      local ok = v and v == v and v ~= math.huge and v ~= -math.huge and (not log or v > 0)
      if ok then
        local x, y = ax.map(s.x[i]), ay.map(v)
        if px then cv:line(px, py, x, y, s.color, 2) else cv:rect(math.floor(x), math.floor(y), 2, 2, s.color) end
        px, py = x, y
      else
        px = nil
        if v ~= nil and s.mark_nonfinite then   -- NaN/Inf loss: a red mark on the top edge
          local x = math.floor(ax.map(s.x[i]) + 0.5)
          cv:rect(x - 2, y0, 5, 8, EVENT)
        end
      end
    end
  end
  -- frame
  cv:rect(x0, y0, w, 1, FRAME)
  cv:rect(x0, y0 + h - 1, w, 1, FRAME)
  cv:rect(x0, y0, 1, h, FRAME)
  cv:rect(x0 + w - 1, y0, 1, h, FRAME)
end

-- Legend entries at (x, y) downwards, as many as fit in height.
local function legend(cv, x, y, height, entries)
  local scale = (#entries * 22 <= height) and 2 or 1
  local row = scale == 2 and 22 or 12
  local fit = math.max(1, height // row)
  for i, e in ipairs(entries) do
    if i == fit and #entries > fit then
      cv:text(x, y + (i - 1) * row, ("+%d more"):format(#entries - fit + 1), TEXT, scale)
      break
    end
    local ly = y + (i - 1) * row
    cv:rect(x, ly + 4 * scale, 14 * scale // 2 + 8, 3, e.color)
    cv:text(x + 14 * scale // 2 + 14, ly, e.name, TEXT, scale)
  end
end

local KNOWN = {out = true, width = true, height = true, layers = true, title = true}

-- plot.plot(run_dir_or_jsonl, opts) -> path of the PNG, {steps =, params =}
function plot.plot(run_dir, opts)
  opts = opts or {}
  if type(run_dir) ~= "string" or run_dir == "" then
    error("plot: argument #1: expected a run directory (string), got " .. type(run_dir), 2)
  end
  if type(opts) ~= "table" then error("plot: argument #2: expected an options table, got " .. type(opts), 2) end
  for k in pairs(opts) do
    if not KNOWN[k] then error(("plot: unknown option '%s'"):format(tostring(k)), 2) end
  end
  local W, H = opts.width or 1200, opts.height or 800
  if math.type(W) ~= "integer" or math.type(H) ~= "integer" or W < 400 or H < 300 or W > 8000 or H > 8000 then
    error(("plot: width and height: expected integers, at least 400x300 and at most 8000, got %s x %s"):format(
      tostring(W), tostring(H)), 2)
  end
  local path = run_dir
  if not run_dir:find("%.jsonl$") then path = run_dir .. "/metrics.jsonl" end
  local data = plot.read(path)
  local recs = data.records
  if #recs == 0 then error("plot: " .. path .. " has no step records (is it a keel.monitor run?)", 2) end

  -- series
  local xs, loss = {}, {}
  for i, r in ipairs(recs) do xs[i] = r.step loss[i] = r.loss or false end
  local names = {}
  local pattern = opts.layers
  for _, n in ipairs(data.names) do
    if not pattern or n:find(pattern) then names[#names + 1] = n end
  end
  if not pattern and #names > 20 then
    local kept = {}
    for _, n in ipairs(names) do if not n:find("bias$") then kept[#kept + 1] = n end end
    if #kept > 0 then names = kept end
  end
  local grads = {}
  for k, n in ipairs(names) do
    local ys, gx = {}, {}
    for _, r in ipairs(recs) do
      local v = r.params[n]
      if v ~= nil then gx[#gx + 1] = r.step ys[#ys + 1] = v end
    end
    grads[k] = {name = n, x = gx, y = ys, color = PALETTE[(k - 1) % #PALETTE + 1]}
  end
  if #names == 0 then   -- no per-parameter data: the global norm
    local ys = {}
    for i, r in ipairs(recs) do ys[i] = r.grad_norm or false end
    grads[1] = {name = "global", x = xs, y = ys, color = PALETTE[1]}
  end

  -- loss on a log axis when it spans more than three decades
  local lmin, lmax = math.huge, -math.huge
  for _, v in ipairs(loss) do
    if v and v == v and v > -math.huge and v < math.huge then
      lmin, lmax = math.min(lmin, v), math.max(lmax, v)
    end
  end
  local loss_log = lmin > 0 and lmax / lmin > 1000

  local xr = {xs[1], xs[#xs]}
  if xr[2] <= xr[1] then xr = {xr[1] - 1, xr[2] + 1} end

  -- layout
  local longest = 10   -- "skip/guard"
  for _, g in ipairs(grads) do longest = math.max(longest, #g.name) end
  local legend_w = math.min(math.floor(W * 0.3), 40 + longest * 12)
  local left, right, top = 110, legend_w + 20, opts.title and 80 or 50
  local gap, bottom = 80, 70
  local pw = W - left - right
  local ph = (H - top - gap - bottom) // 2
  local cv = canvas(W, H, WHITE)
  if opts.title then   -- as large as fits, cut when nothing does
    local title, room = tostring(opts.title), W - left - 10
    local scale = text_width(title, 3) <= room and 3 or 2
    local fit = room // (CELL_W * scale)
    if #title > fit then title = title:sub(1, math.max(1, fit - 2)) .. ".." end
    cv:text(left, 14, title, BLACK, scale)
  end
  local box1 = {x = left, y = top, w = pw, h = ph}
  local box2 = {x = left, y = top + ph + gap, w = pw, h = ph}
  panel(cv, box1, xr, {{x = xs, y = loss, color = PALETTE[1], mark_nonfinite = true}},
        {title = loss_log and "loss (log scale)" or "loss", log = loss_log, events = data.events, xlabels = true})
  panel(cv, box2, xr, grads, {title = "gradient norm per parameter (log scale)", log = true, events = data.events,
        xlabels = true})
  cv:text(left + pw // 2 - text_width("step", 2) // 2, H - 28, "step", TEXT, 2)
  -- legends
  local lx = left + pw + 20
  local top_entries = {{name = "loss", color = PALETTE[1]}}
  if #data.events > 0 then top_entries[2] = {name = "skip/guard", color = EVENT} end
  legend(cv, lx, top + 4, ph, top_entries)
  local entries = {}
  for _, g in ipairs(grads) do entries[#entries + 1] = {name = g.name, color = g.color} end
  legend(cv, lx, top + ph + gap + 4, ph, entries)

  local out = opts.out or (run_dir:gsub("/metrics%.jsonl$", "") .. "/plot.png")
  local png = S.png_encode(W, H, cv.px)
  local tmp = out .. ".tmp"
  local f, err = io.open(tmp, "wb")
  if not f then error("plot: " .. tostring(err), 2) end
  f:write(png)
  f:close()
  local ok, rerr = os.rename(tmp, out)
  if not ok then os.remove(tmp) error("plot: " .. tostring(rerr), 2) end
  return out, {steps = #recs, params = #grads, events = #data.events, bad_lines = data.bad_lines}
end

local USAGE = "usage: keel plot RUN_DIR [-o OUT.png] [--width W] [--height H] [--layers PATTERN] [--title TEXT]"

-- The `keel plot` subcommand: args are the words after "plot".
function plot.main(args)
  local run_dir, opts = nil, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    local function value()
      i = i + 1
      if args[i] == nil then error("keel plot: " .. a .. " needs a value\n" .. USAGE, 0) end
      return args[i]
    end
    if a == "-o" or a == "--out" then opts.out = value()
    elseif a == "--width" or a == "--height" then
      local v = math.tointeger(tonumber(value()))
      if not v then error("keel plot: " .. a .. ": expected an integer\n" .. USAGE, 0) end
      opts[a:sub(3)] = v
    elseif a == "--layers" then opts.layers = value()
    elseif a == "--title" then opts.title = value()
    elseif a == "-h" or a == "--help" then print(USAGE) return true
    elseif a:sub(1, 1) == "-" and a ~= "-" then error("keel plot: unknown option " .. a .. "\n" .. USAGE, 0)
    elseif run_dir then error("keel plot: more than one run directory\n" .. USAGE, 0)
    else run_dir = a end
    i = i + 1
  end
  if not run_dir then error("keel plot: no run directory\n" .. USAGE, 0) end
  local ok, out, info = pcall(plot.plot, run_dir, opts)
  if not ok then error((tostring(out):gsub("^plot: ", "keel plot: ")), 0) end
  print(("keel plot: %s (%d steps, %d parameters)"):format(out, info.steps, info.params))
  return true
end

return plot
