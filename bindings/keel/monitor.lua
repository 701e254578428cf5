-- keel.monitor: training telemetry to JSONL and TensorBoard event files.
--
--   local mon = keel.monitor.log("runs/exp1", {every = 10, model = model})
--   for ... do
--     ...
--     opt:step(loss)                    -- the monitor listens to the optimizer's "step" event
--   end
--   mon:scalar("test/accuracy", acc)    -- user metrics, at the current step by default
--   mon:close()                         -- also <close>; flushed every few records anyway
--
-- What is recorded, every `every` steps (step % every == 0):
--   loss (the value passed to opt:step), its mean over the steps since the
--   last record, lr, global grad norm, clip coefficient, clipped, fraction
--   of steps clipped and steps skipped since the last record, the parameter
--   that dominates the global norm, and per parameter: grad norm, weight
--   norm, update/weight ratio, max |grad|, non-finite count (all from
--   opt:grad_stats(), computed in C by the optimizer's statistics pass).
--   Every `hist_every` steps: histograms of each parameter and its gradient
--   (keel.core._summary.histogram, one pass in C), TensorBoard only.
-- Always: a line for every step that was not applied ("skip"; a loss
-- scaler's overflow has reason "overflow"), and for every "guard" and
-- "anomaly" event on keel.hooks. Steps of a keel.amp.GradScaler carry the
-- loss scale (r.scale): it is logged as "scale" in both kinds of line.
--
-- Files (append-only, so a resumed run continues its log):
--   run_dir/metrics.jsonl                 one JSON object per line (see docs/lua-api.md)
--   run_dir/events.out.tfevents.*         TensorBoard (keel.tensorboard)
-- Non-finite numbers are written as the strings "NaN", "Infinity" and
-- "-Infinity", so every line stays strict JSON and nothing is lost.
--
-- Steps that are not recorded cost one counter check and a few field reads:
-- no per-parameter work, no I/O.

local core = require "keel.core"
local hooks = require "keel.hooks"
local json = require "keel.json"
local tensorboard = require "keel.tensorboard"
local S = core._summary

local M = {}

-- {======================================================================
-- JSON lines (strict: every line must parse with a strict JSON parser)
-- =======================================================================

-- numbers and strings as keel.json writes them for strict readers
local function jnum(v) return json.number(v, true) end
local function jstr(s) return json.quote(s, true) end

local jval
local function jtable(t, depth)
  if depth > 16 then return '"..."' end
  local n = #t
  if n > 0 or next(t) == nil then
    local parts = {}
    for i = 1, n do parts[i] = jval(t[i], depth + 1) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for _, k in ipairs(keys) do
    local v = t[k]
    if type(v) ~= "function" then parts[#parts + 1] = jstr(tostring(k)) .. ":" .. jval(v, depth + 1) end
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

jval = function(v, depth)
  local tv = type(v)
  if tv == "number" then return jnum(v) end
  if tv == "string" then return jstr(v) end
  if tv == "boolean" then return v and "true" or "false" end
  if tv == "nil" then return "null" end
  if tv == "table" then return jtable(v, depth or 0) end
  if core.is_tensor(v) and v:numel() == 1 then return jnum(v:item()) end
  return jstr(tostring(v))
end

-- Object with keys in the given order: jobject(k1, v1, k2, v2, ...); pairs
-- whose value is nil are left out.
local function jobject(...)
  local parts, n = {}, select("#", ...)
  for i = 1, n, 2 do
    local k, v = select(i, ...)
    if v ~= nil then parts[#parts + 1] = jstr(k) .. ":" .. jval(v) end
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

M._json = {number = jnum, string = jstr, value = jval}

-- }======================================================================

-- {======================================================================
-- The monitor
-- =======================================================================

local Monitor = {}
Monitor.__index = Monitor
Monitor.__name = "keel.Monitor"

local function to_number(v)
  if type(v) == "number" then return v end
  if core.is_tensor(v) then return v:item() end
  return nil
end

local function opt_int(opts, k, def, min, where)
  local v = opts[k]
  if v == nil then return def end
  if math.type(v) ~= "integer" or v < min then
    error(("%s: option '%s': expected an integer >= %d, got %s"):format(where, k, min, tostring(v)), 3)
  end
  return v
end

local KNOWN = {every = true, hist_every = true, model = true, optimizer = true, jsonl = true, tensorboard = true,
               histograms = true, bins = true, flush_every = true, flush_secs = true, progress = true,
               print = true, out = true, clock = true}

local function new(run_dir, opts, where)
  if type(run_dir) ~= "string" or run_dir == "" then
    error(("%s: argument #1: expected a run directory (string), got %s"):format(where, type(run_dir)), 3)
  end
  opts = opts or {}
  if type(opts) ~= "table" then
    error(("%s: argument #2: expected an options table, got %s"):format(where, type(opts)), 3)
  end
  for k in pairs(opts) do
    if not KNOWN[k] then error(("%s: unknown option '%s'"):format(where, tostring(k)), 3) end
  end
  local every = opt_int(opts, "every", 10, 1, where)
  local hist_every = opts.hist_every
  if hist_every == nil then hist_every = 10 * every
  elseif hist_every ~= false then hist_every = opt_int(opts, "hist_every", nil, 1, where) end
  if opts.histograms == false then hist_every = false end
  local model = opts.model
  if model ~= nil and (type(model) ~= "table" or type(model.named_parameters) ~= "function") then
    error(("%s: option 'model': expected a keel.nn module, got %s"):format(where, type(model)), 3)
  end
  local ok, err = S.mkdirs(run_dir)
  if not ok then error(("%s: cannot create %s: %s"):format(where, run_dir, tostring(err)), 3) end

  local self = {
    run_dir = run_dir, every = every, hist_every = hist_every, step = nil,
    _model = model, _want_opt = opts.optimizer, _opt = nil, _n = 0, _base = 0,
    _bins = opt_int(opts, "bins", 30, 1, where),
    _flush_every = opt_int(opts, "flush_every", 10, 1, where),
    _flush_secs = opts.flush_secs or 5,
    _clock = opts.clock or S.now,
    _print = opts.print and (opts.out or io.stdout) or nil,
    -- window since the last record
    _w_steps = 0, _w_clipped = 0, _w_skipped = 0, _w_loss = 0, _w_nloss = 0,
    _skipped_total = 0, _records = 0, _since_flush = 0, _warned = false,
  }
  if opts.jsonl ~= false then
    local f, ferr = io.open(run_dir .. "/metrics.jsonl", "a")
    if not f then error(("%s: %s"):format(where, tostring(ferr)), 3) end
    f:setvbuf("full")
    self._jsonl = f
    self.jsonl_path = run_dir .. "/metrics.jsonl"
  end
  if opts.tensorboard ~= false then
    self._tb = tensorboard.writer(run_dir)
    self.tensorboard_path = self._tb.path
  end
  if opts.progress then
    local popts = type(opts.progress) == "table" and opts.progress or {}
    self._bar = require("keel.progress").progress(popts.total, popts)
  end
  self._last_flush = self._clock()
  -- the metatable (with __gc) last: finalizers run in reverse order of
  -- registration, so the monitor is finalized before its files
  setmetatable(self, Monitor)

  -- The listeners hold the monitor weakly: a monitor nobody references is
  -- collected (its __gc flushes and unsubscribes).
  local ref = setmetatable({m = self}, {__mode = "v"})
  self._handles = {
    hooks.on("step", function(opt, r, loss)
      local m = ref.m
      if m then return m:_on_step(opt, r, loss) end
    end),
    hooks.on("guard", function(ev)
      local m = ref.m
      if m then return m:_event("guard", ev) end
    end),
    hooks.on("anomaly", function(ev)
      local m = ref.m
      if m then return m:_event("anomaly", ev) end
    end),
  }
  return self
end

-- The optimizer's parameters in order (the userdata the model holds).
local function param_list(opt)
  local list = {}
  for _, g in ipairs(opt.param_groups or {}) do
    for _, p in ipairs(g.params or {}) do list[#list + 1] = p end
  end
  return list
end

-- Names of the parameters: model:named_parameters(), else "param<i>".
function Monitor:_names(params)
  local names = self._name_of
  local miss = names == nil
  if names then
    for _, p in ipairs(params) do if names[p] == nil then miss = true break end end
  end
  if miss and self._model then
    names = setmetatable({}, {__mode = "k"})
    for name, p in self._model:named_parameters() do
      if names[p] == nil then names[p] = name end
    end
    self._name_of = names
  end
  local out = {}
  for i, p in ipairs(params) do out[i] = names and names[p] or ("param" .. i) end
  return out
end

-- Per step: a counter check, a few field reads; the rest only when recording.
function Monitor:_on_step(opt, r, loss)
  if self._opt ~= opt then
    if self._opt ~= nil or self._closed then return end
    if self._want_opt ~= nil and self._want_opt ~= opt then return end
    self._opt = opt   -- the first optimizer seen (or opts.optimizer) is the one followed
    local s = math.tointeger(r.step) or 0
    self._base = s - (r.applied == false and 0 or 1)
  end
  local n = self._n + 1
  self._n = n
  local step = self._base + n
  self.step = step
  self._w_steps = self._w_steps + 1
  if loss == nil then loss = r.loss end
  if loss ~= nil then
    local l = to_number(loss)
    loss = l
    if l and l == l and l ~= math.huge and l ~= -math.huge then
      self._w_loss = self._w_loss + l
      self._w_nloss = self._w_nloss + 1
    end
  end
  if r.clipped then self._w_clipped = self._w_clipped + 1 end
  if r.applied == false then self:_skip(step, r) end
  local bar = self._bar
  if bar then bar:update(1, {loss = loss, grad_norm = r.grad_norm, lr = r.lr}) end
  if step % self.every == 0 then
    local ok, err = pcall(self._record, self, opt, r, loss, step)
    if not ok then self:_warn(err) end
  end
end

-- An I/O failure (a full disk) must not stop training: warn once, go on.
function Monitor:_warn(err)
  if not self._warned then
    self._warned = true
    io.stderr:write("keel.monitor: ", tostring(err), " (further errors are not shown)\n")
  end
end

function Monitor:_write_line(line, flush_now)
  local f = self._jsonl
  if f and io.type(f) == "file" then
    f:write(line, "\n")
    if flush_now then f:flush() end
  end
end

function Monitor:_skip(step, r)
  self._w_skipped = self._w_skipped + 1
  self._skipped_total = self._skipped_total + 1
  local ok, err = pcall(self._write_line, self, jobject("type", "skip", "step", step, "time", S.wall_time(),
    "reason", r.reason, "grad_norm", r.grad_norm, "nonfinite", r.nonfinite, "scale", r.scale), true)
  if not ok then self:_warn(err) end
end

local sqrt = math.sqrt

function Monitor:_record(opt, r, loss, step)
  local wall = S.wall_time()
  local params = param_list(opt)
  local names = self:_names(params)
  local stats = type(opt.grad_stats) == "function" and opt:grad_stats() or {}
  local hist = self.hist_every and step % self.hist_every == 0 and self._tb ~= nil
  local w_steps = self._w_steps
  local loss_avg = self._w_nloss > 0 and self._w_loss / self._w_nloss or nil
  local clipped_frac = w_steps > 0 and self._w_clipped / w_steps or nil
  local top_name = r.top_param and names[r.top_param] or nil

  -- per parameter
  local pparts, tbv = {}, {}
  local function tbs(tag, v) if v ~= nil then tbv[#tbv + 1] = {tag = tag, value = v} end end
  tbs("loss", loss)
  tbs("loss_avg", loss_avg)
  tbs("lr", r.lr)
  tbs("grad_norm", r.grad_norm)
  tbs("clip_coef", r.clip_coef)
  tbs("clipped_frac", clipped_frac)
  tbs("skipped", self._w_skipped)
  tbs("top_share", r.top_share)
  tbs("scale", r.scale)
  for i, p in ipairs(params) do
    local s, name = stats[i], names[i]
    local gnorm, wnorm, ratio, max_abs, nonfinite
    if s and (s.numel or 0) > 0 then
      gnorm = s.norm or (s.sumsq and sqrt(s.sumsq))
      max_abs = s.max_abs
      nonfinite = (s.nan or 0) + (s.inf or 0)
    end
    if s then
      wnorm = s.weight_norm or (s.w_sumsq and sqrt(s.w_sumsq))
      ratio = s.update_ratio
    end
    if hist then
      local hopts = {bins = self._bins, packed = true}
      local ok, h = pcall(S.histogram, p, hopts)
      if ok then
        tbv[#tbv + 1] = {tag = "weight/" .. name, histo = h}
        if wnorm == nil then wnorm = sqrt(h.sumsq) end
      end
      local g = p.grad
      if g ~= nil then
        local okg, hg = pcall(S.histogram, g, hopts)
        if okg then tbv[#tbv + 1] = {tag = "grad/" .. name, histo = hg} end
      end
    end
    tbs("grad_norm/" .. name, gnorm)
    tbs("weight_norm/" .. name, wnorm)
    tbs("update_ratio/" .. name, ratio)
    pparts[#pparts + 1] = jstr(name) .. ":" .. jobject("grad_norm", gnorm, "weight_norm", wnorm,
      "update_ratio", ratio, "max_abs", max_abs, "nonfinite", nonfinite)
  end

  if self._jsonl then
    local head = jobject("type", "step", "step", step, "time", wall, "loss", loss, "loss_avg", loss_avg,
      "lr", r.lr, "grad_norm", r.grad_norm, "clip_coef", r.clip_coef, "clipped", r.clipped,
      "applied", r.applied, "reason", r.reason, "nonfinite", r.nonfinite, "clipped_frac", clipped_frac,
      "skipped", self._w_skipped, "skipped_total", self._skipped_total, "steps", w_steps,
      "top_param", top_name, "top_share", r.top_share, "scale", r.scale)
    self:_write_line(head:sub(1, -2) .. ',"params":{' .. table.concat(pparts, ",") .. "}}")
  end
  if self._tb then self._tb:add(step, tbv, wall) end
  if self._print then
    self._print:write(("step %d%s lr %s grad_norm %s%s\n"):format(step,
      loss and (" loss %.4g"):format(loss) or "", r.lr and ("%.3g"):format(r.lr) or "-",
      r.grad_norm and ("%.4g"):format(r.grad_norm) or "-",
      self._w_skipped > 0 and (" skipped %d"):format(self._w_skipped) or ""))
  end

  self._w_steps, self._w_clipped, self._w_skipped, self._w_loss, self._w_nloss = 0, 0, 0, 0, 0
  self._records = self._records + 1
  self._since_flush = self._since_flush + 1
  if self._since_flush >= self._flush_every or self._clock() - self._last_flush >= self._flush_secs then
    self:flush()
  end
end

-- A guard or anomaly event: a JSONL line and a TensorBoard text entry,
-- flushed at once (they are rare and they matter).
function Monitor:_event(kind, ev)
  if self._closed then return end
  local ok, err = pcall(function()
    if type(ev) ~= "table" then ev = {line = tostring(ev)} end
    -- Guard and anomaly events fire inside (or before) the opt:step() whose
    -- "step" event comes after them: they belong to the step in progress,
    -- in the monitor's numbering (which counts skipped steps too). The
    -- event's own step (the guard counts applied steps) is kept apart.
    local own = math.tointeger(ev.step)
    local step
    if self._opt ~= nil and self.step then step = self.step + 1 else step = own or 0 end
    local rest = {}
    for k, v in pairs(ev) do
      if k ~= "step" and k ~= "type" and type(v) ~= "function" then rest[k] = v end
    end
    if own and own ~= step then rest.event_step = own end
    local body = jval(rest)
    local line = '{"type":' .. jstr(kind) .. ',"step":' .. jnum(step) .. ',"time":' .. jnum(S.wall_time()) ..
      (body ~= "{}" and ("," .. body:sub(2)) or "}")
    self:_write_line(line, true)
    if self._tb then
      self._tb:text(kind, ev.line or body, step)
      self._tb:flush()
    end
  end)
  if not ok then self:_warn(err) end
end

-- User metric: monitor:scalar("test/accuracy", 0.98 [, step]) (step defaults
-- to the last optimizer step seen, else 0).
function Monitor:scalar(tag, value, step)
  if type(tag) ~= "string" or tag == "" then
    error("monitor.scalar: argument #1: expected a tag (non-empty string), got " .. type(tag), 2)
  end
  local v = to_number(value)
  if v == nil then
    error(("monitor.scalar: argument #2: expected a number, got %s"):format(type(value)), 2)
  end
  if step ~= nil and math.type(step) ~= "integer" then
    error(("monitor.scalar: argument #3: expected an integer step, got %s"):format(tostring(step)), 2)
  end
  if self._closed then error("monitor.scalar: the monitor is closed", 2) end
  step = step or self.step or 0
  self:_write_line(jobject("type", "scalar", "step", step, "time", S.wall_time(), "tag", tag, "value", v))
  if self._tb then self._tb:scalar(tag, v, step) end
end

function Monitor:flush()
  if self._jsonl and io.type(self._jsonl) == "file" then self._jsonl:flush() end
  if self._tb then self._tb:flush() end
  self._since_flush = 0
  self._last_flush = self._clock()
end

-- Unsubscribes, flushes and closes the files; a second call does nothing.
function Monitor:close()
  if self._closed then return end
  self._closed = true
  for _, h in ipairs(self._handles or {}) do h:remove() end
  if self._bar then pcall(self._bar.close, self._bar) end
  if self._jsonl and io.type(self._jsonl) == "file" then self._jsonl:close() end
  self._jsonl = nil
  if self._tb then self._tb:close() end
  if M._default == self then M._default = nil end
end

Monitor.__close = function(self) self:close() end
Monitor.__gc = function(self) pcall(Monitor.close, self) end
Monitor.__tostring = function(self)
  return ("keel.Monitor(%s, every %d%s)"):format(self.run_dir, self.every, self._closed and ", closed" or "")
end

-- }======================================================================

-- keel.monitor.log(run_dir, opts): the default monitor. A second call
-- closes the previous default monitor first (one run, one log); use
-- keel.monitor.new for several monitors at once.
function M.log(run_dir, opts)
  local m = new(run_dir, opts, "monitor.log")
  if M._default then M._default:close() end
  M._default = m
  return m
end

-- A monitor that is not the default (log() does not replace it).
function M.new(run_dir, opts)
  return new(run_dir, opts, "monitor.new")
end

-- The default monitor, or nil.
function M.current() return M._default end

-- keel.monitor.scalar(tag, value [, step]) on the default monitor.
function M.scalar(tag, value, step)
  local m = M._default
  if not m then error("monitor.scalar: no monitor: call keel.monitor.log(run_dir) first", 2) end
  return m:scalar(tag, value, step)
end

M.Monitor = Monitor

return M
