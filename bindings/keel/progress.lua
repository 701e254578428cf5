-- keel.progress: a progress bar for training loops (keel.progress(total, opts)).
--
--   local bar = keel.progress(#loader * epochs, {items = 64, unit = "img"})
--   for epoch = 1, epochs do
--     for xb, yb in loader:batches() do
--       ...
--       bar:update{loss = loss:item(), grad_norm = r.grad_norm, lr = r.lr, epoch = epoch}
--     end
--   end
--   bar:close()
--
-- On a terminal (stdout is a tty) one line is redrawn in place with \r, at
-- most 1/min_interval times a second (10 by default):
--   epoch 2  1200/5000 [######..............]  24% loss 0.3412 gnorm 1.23 lr 1.00e-03 812 img/s ETA 04:41
-- Elsewhere (a log file, a pipe, CI) it never writes \r: it prints a plain
-- line every `every` steps, or every `interval` seconds (10 by default),
-- and a last one at close.
--
-- bar:update([n = 1] [, fields]) advances by n steps; fields (all optional):
--   loss, grad_norm, lr, epoch, items (items in these n steps, for the
--   throughput; default n * opts.items), and any other number, shown as
--   "name value".
-- bar:write(text) prints a line above the bar (a tty keeps the bar below).
-- bar:close() draws the final state and ends the line (also <close>).
--
-- opts: out (a stream with :write, default io.stdout), tty (default: out is
-- io.stdout and stdout is a terminal), width (columns; default the
-- terminal's, else $COLUMNS, else 80), desc (a prefix), unit ("it"),
-- items (items per step, 1), min_interval (0.1 s), every (plain mode:
-- a line every N steps), interval (plain mode: seconds between lines, 10),
-- clock (a function returning seconds; default monotonic).

local core = require "keel.core"
local S = core._summary

local P = {}

local Bar = {}
Bar.__index = Bar
Bar.__name = "keel.ProgressBar"

local KNOWN = {out = true, tty = true, width = true, desc = true, unit = true, items = true, min_interval = true,
               every = true, interval = true, clock = true, total = true}

local function fmt_time(s)
  if s ~= s or s == math.huge or s < 0 then return "--:--" end
  s = math.floor(s + 0.5)
  local h, m = s // 3600, (s % 3600) // 60
  if h > 0 then return ("%d:%02d:%02d"):format(h, m, s % 60) end
  return ("%02d:%02d"):format(m, s % 60)
end

local function fmt_num(v)
  if type(v) ~= "number" then return tostring(v) end
  if v ~= v then return "nan" end
  if v == math.huge then return "inf" end
  if v == -math.huge then return "-inf" end
  if math.type(v) == "integer" then return ("%d"):format(v) end
  local a = math.abs(v)
  if a ~= 0 and (a < 1e-3 or a >= 1e5) then return ("%.2e"):format(v) end
  return ("%.4g"):format(v)
end

local function fmt_rate(r)
  if r >= 100 then return ("%.0f"):format(r) end
  if r >= 10 then return ("%.1f"):format(r) end
  return ("%.2f"):format(r)
end

function P.progress(total, opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("progress: argument #2: expected an options table, got " .. type(opts), 2) end
  for k in pairs(opts) do
    if not KNOWN[k] then error(("progress: unknown option '%s'"):format(tostring(k)), 2) end
  end
  if total ~= nil and (math.type(total) ~= "integer" or total < 0) then
    error(("progress: argument #1: expected the number of steps (an integer >= 0) or nil, got %s"):format(
      tostring(total)), 2)
  end
  local function num_opt(k, def, min)
    local v = opts[k]
    if v == nil then return def end
    if type(v) ~= "number" or v < min then
      error(("progress: option '%s': expected a number >= %s, got %s"):format(k, tostring(min), tostring(v)), 3)
    end
    return v
  end
  local out = opts.out or io.stdout
  local tty = opts.tty
  if tty == nil then tty = out == io.stdout and S.isatty(1) end
  local clock = opts.clock or S.now
  local width = opts.width or S.term_width(1) or tonumber(os.getenv("COLUMNS") or "") or 80
  local t0 = clock()
  local self = setmetatable({
    total = total, n = 0, fields = {}, extra = {},
    _out = out, _tty = tty and true or false, _clock = clock, _width = math.max(20, math.floor(width)),
    _desc = opts.desc, _unit = opts.unit or "it", _items_per = num_opt("items", 1, 0),
    _min_interval = num_opt("min_interval", 0.1, 0), _every = opts.every and num_opt("every", nil, 1) or nil,
    _interval = num_opt("interval", 10, 0),
    _t0 = t0, _items = 0, _last_draw = -math.huge, _last_line = t0, _drawn_len = 0,
    _rate_t = t0, _rate_items = 0, _rate = nil, _closed = false, _line_n = -1,
  }, Bar)
  return self
end

-- Throughput: items per second, smoothed over the redraws (an
-- exponential average, so a slow first step fades out).
function Bar:_update_rate(now)
  local dt = now - self._rate_t
  if dt >= 0.5 or (self._rate == nil and dt > 0 and self._items > 0) then
    local r = (self._items - self._rate_items) / dt
    self._rate = self._rate and (0.7 * self._rate + 0.3 * r) or r
    self._rate_t, self._rate_items = now, self._items
  end
end

-- The text of the current state, fitted to the width.
function Bar:render(now)
  now = now or self._clock()
  local f, parts = self.fields, {}
  if self._desc then parts[#parts + 1] = self._desc end
  if f.epoch then parts[#parts + 1] = "epoch " .. fmt_num(f.epoch) end
  local total = self.total
  local count = total and ("%d/%d"):format(self.n, total) or ("%d"):format(self.n)
  local tail = {}
  if f.loss ~= nil then tail[#tail + 1] = "loss " .. fmt_num(f.loss) end
  if f.grad_norm ~= nil then tail[#tail + 1] = "gnorm " .. fmt_num(f.grad_norm) end
  if f.lr ~= nil then tail[#tail + 1] = "lr " .. ("%.2e"):format(f.lr) end
  for _, k in ipairs(self.extra) do tail[#tail + 1] = k .. " " .. fmt_num(f[k]) end
  local rate = self._rate
  local elapsed = now - self._t0
  if rate == nil and elapsed > 0 and self._items > 0 then rate = self._items / elapsed end
  if rate then tail[#tail + 1] = fmt_rate(rate) .. " " .. self._unit .. "/s" end
  if total then
    local eta
    if self.n >= total then eta = "done " .. fmt_time(elapsed)
    elseif rate and rate > 0 and self._items > 0 then
      local per_step = self._items / self.n
      eta = "ETA " .. fmt_time((total - self.n) * per_step / rate)
    else
      eta = "ETA --:--"
    end
    tail[#tail + 1] = eta
  else
    tail[#tail + 1] = fmt_time(elapsed)
  end
  local head = table.concat(parts, " ")
  local rest = table.concat(tail, " ")
  local line
  if total and total > 0 and self._tty then
    local pct = ("%3d%%"):format(math.floor(100 * math.min(self.n, total) / total))
    local fixed = #head + (#head > 0 and 1 or 0) + #count + 1 + 2 + 1 + #pct + 1 + #rest
    local bw = math.min(30, self._width - 1 - fixed)
    if bw >= 5 then
      local fill = math.floor(bw * math.min(self.n, total) / total + 1e-9)
      line = (head ~= "" and head .. " " or "") .. count .. " [" .. string.rep("#", fill) ..
        string.rep(".", bw - fill) .. "] " .. pct .. " " .. rest
    else
      line = (head ~= "" and head .. " " or "") .. count .. " " .. pct .. " " .. rest
    end
  elseif total and total > 0 then
    line = (head ~= "" and head .. " " or "") .. count .. (" (%d%%) "):format(math.floor(100 * math.min(self.n,
      total) / total)) .. rest
  else
    line = (head ~= "" and head .. " " or "") .. count .. " " .. rest
  end
  if self._tty and #line > self._width - 1 then line = line:sub(1, self._width - 1) end
  return line
end

function Bar:_draw(now)
  local line = self:render(now)
  local pad = self._drawn_len - #line
  self._out:write("\r", line, pad > 0 and string.rep(" ", pad) or "")
  if self._out.flush then self._out:flush() end
  self._drawn_len = #line
  self._last_draw = now
end

function Bar:_line(now)
  self._out:write(self:render(now), "\n")
  if self._out.flush then self._out:flush() end
  self._last_line = now
  self._line_n = self.n
end

-- bar:update([n] [, fields])
function Bar:update(n, fields)
  if type(n) == "table" then n, fields = 1, n end
  if n == nil then n = 1 end
  if math.type(n) ~= "integer" or n < 0 then
    error(("progress.update: argument #1: expected a step count (integer >= 0) or a fields table, got %s"):format(
      tostring(n)), 2)
  end
  if self._closed then return end
  self.n = self.n + n
  local items = self._items_per * n
  if fields then
    local f = self.fields
    for k, v in pairs(fields) do
      if k == "items" then items = v
      else
        if k ~= "loss" and k ~= "grad_norm" and k ~= "lr" and k ~= "epoch" and f[k] == nil and v ~= nil then
          local ex = self.extra
          ex[#ex + 1] = k
          table.sort(ex)
        end
        if type(v) == "userdata" and core.is_tensor(v) then v = v:item() end
        f[k] = v
      end
    end
  end
  self._items = self._items + items
  local now = self._clock()
  self:_update_rate(now)
  local finished = self.total and self.n >= self.total
  if self._tty then
    if finished or now - self._last_draw >= self._min_interval then self:_draw(now) end
  else
    local every = self._every
    if (every and self.n % every == 0) or (not every and now - self._last_line >= self._interval) then
      self:_line(now)
    end
  end
end

-- A message line that does not garble the bar.
function Bar:write(text)
  if self._tty and self._drawn_len > 0 and not self._closed then
    self._out:write("\r", string.rep(" ", self._drawn_len), "\r", tostring(text), "\n")
    self._drawn_len = 0
    self:_draw(self._clock())
  else
    self._out:write(tostring(text), "\n")
  end
end

-- Final state and a newline; a second call does nothing.
function Bar:close()
  if self._closed then return end
  local now = self._clock()
  if self._tty then
    self:_draw(now)
    self._out:write("\n")
  elseif self._line_n ~= self.n then   -- unless that line is already out
    self:_line(now)
  end
  if self._out.flush then self._out:flush() end
  self._closed = true
end

Bar.__close = Bar.close
Bar.__tostring = function(self) return "keel.ProgressBar(" .. self:render() .. ")" end

P.Bar = Bar

return P
