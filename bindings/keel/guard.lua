-- keel.guard: detection of bad steps (non-finite values, loss and
-- grad-norm spikes, hard ceilings) and recovery (skip, rollback to an
-- in-memory snapshot, learning-rate back-off, bounded retries, then error).
--
--   local guard = keel.guard(opt, {
--     spike = {z = 6, window = 200},   -- robust z-score over the recent accepted steps
--     on_spike = "rollback",           -- "skip" | "rollback" | "error"
--     on_nonfinite = "skip",
--     lr_backoff = 0.5, max_retries = 3,
--     model = model, loader = loader,  -- names and buffers; the loader's cursor
--   })
--   ... opt:step(loss) ...            -- the optimizer asks guard:_decide before applying
--   print(guard:summary())
--
-- The optimizer calls guard:_decide(opt, r, loss) after its statistics pass
-- and before it changes anything; "apply" lets the step through, "skip"
-- makes the optimizer cancel it (a rollback has then already restored the
-- snapshot). A loss scaler's overflow (r.reason = "overflow", keel.amp) is
-- the scaler's business: the step is skipped and the scale backs off, so
-- the guard lets the optimizer carry out that skip and only counts it
-- (counts.overflow, "N overflow skips" in the summary): no event, no lr
-- back-off, no retry, and nothing of that step enters the windows. Every event is a table (see `new_event`) that goes to the
-- guard's own listeners (guard:on_event), to the hooks bus (topic "guard",
-- which keel.monitor logs) and, unless verbose = false, to io.stderr as one
-- line.
--
-- Spike statistics. Each metric keeps a window of its last `window`
-- ACCEPTED values (a rejected value never enters, so one spike cannot
-- widen the band that should catch the next). The centre is the window's
-- median and the spread 1.4826 x its median absolute deviation (MAD; the
-- factor makes it the standard deviation for normal data): a handful of
-- large but accepted values moves neither, where they would inflate a
-- mean and a standard deviation and hide the spike that follows them. The
-- grad norm is judged on log values: norms are roughly log-normal, their
-- spread grows with their level, and a jump is multiplicative (z = 6 on
-- log values with a spread of 0.2 is a 3.3-fold jump at any scale). The
-- loss is judged on raw values, since losses may be zero or negative.
-- Only upward deviations count. The spread has a floor (0.1 in log units
-- for the grad norm, 5% of |median| for the loss) so that an almost
-- constant window (full-batch training) does not turn noise into spikes.

local keel = require "keel"
local hooks = require "keel.hooks"
local api = require("keel.clip")._api

local M = {}

local Guard = {}
Guard.__index = Guard
Guard.__name = "keel.Guard"
M.Guard = Guard

local ACTIONS = {skip = true, rollback = true, error = true}
local MAD_TO_SD = 1.4826
local FLOOR_LOG = 0.1      -- spread floor of log grad norms
local FLOOR_REL = 0.05     -- spread floor of losses, relative to |median|
local RECENT = 8           -- recent values kept for summaries

local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end

local function fmt(x)
  if x == nil then return "?" end
  if x ~= x then return "nan" end
  if x == math.huge then return "inf" end
  if x == -math.huge then return "-inf" end
  if math.type(x) == "integer" then return tostring(x) end
  local a = math.abs(x)
  if a ~= 0 and (a >= 1e5 or a < 1e-3) then return ("%.3g"):format(x) end
  return ("%.4g"):format(x)
end

local function pct(x) return (("%.1f%%"):format(100 * x):gsub("%.0%%$", "%%")) end

-- {======================================================================
-- Sliding window: a ring in arrival order and the same values sorted,
-- so that the median is O(1) and the MAD one merge from the middle
-- =======================================================================

local function window_new(cap) return {cap = cap, ring = {}, pos = 1, n = 0, sorted = {}} end

-- first index i with a[i] > x (a sorted)
local function upper(a, x)
  local lo, hi = 1, #a + 1
  while lo < hi do
    local mid = (lo + hi) // 2
    if a[mid] <= x then lo = mid + 1 else hi = mid end
  end
  return lo
end

local function window_push(w, x)
  local s = w.sorted
  if w.n == w.cap then
    local old = w.ring[w.pos]
    local i = upper(s, old) - 1     -- the last copy of old; any copy will do
    table.remove(s, i)
  else
    w.n = w.n + 1
  end
  w.ring[w.pos] = x
  w.pos = w.pos % w.cap + 1
  table.insert(s, upper(s, x), x)
end

local function window_values(w)
  local out = {}
  if w.n < w.cap then
    for i = 1, w.n do out[i] = w.ring[i] end
  else
    for i = w.pos, w.cap do out[#out + 1] = w.ring[i] end
    for i = 1, w.pos - 1 do out[#out + 1] = w.ring[i] end
  end
  return out
end

-- median and median absolute deviation
local function median_mad(w)
  local a, n = w.sorted, #w.sorted
  local med = n % 2 == 1 and a[(n + 1) // 2] or (a[n // 2] + a[n // 2 + 1]) / 2
  -- deviations grow outwards from the median on both sides: merge them
  local hi = upper(a, med)
  local lo = hi - 1
  local k1, k2 = (n + 1) // 2, n // 2 + 1
  local d1
  for k = 1, k2 do
    local d
    if lo >= 1 and (hi > n or med - a[lo] <= a[hi] - med) then
      d = med - a[lo]; lo = lo - 1
    else
      d = a[hi] - med; hi = hi + 1
    end
    if k == k1 then d1 = d end
    if k == k2 then return med, n % 2 == 1 and d1 or (d1 + d) / 2 end
  end
  return med, d1
end

-- }======================================================================

-- {======================================================================
-- Options
-- =======================================================================

local KNOWN = {spike = true, on_spike = true, on_nonfinite = true, lr_backoff = true, min_lr_scale = true,
               recover_after = true, max_retries = true, reset_after = true, snapshot_every = true,
               keep = true, model = true, loader = true, skip_batches = true, max_grad_norm = true,
               max_loss = true, verbose = true}

local function oerr(name, what, v)
  error(("guard: option '%s': expected %s, got %s"):format(name, what, type(v) == "string" and ("%q"):format(v)
    or tostring(v)), 0)
end

local function int_opt(t, k, def, min, name)
  local v = t[k]
  if v == nil then return def end
  if math.type(v) ~= "integer" and not (type(v) == "number" and v == math.floor(v) and finite(v)) or v < min then
    oerr(name or k, ("an integer >= %d"):format(min), v)
  end
  return math.tointeger(v)
end

local function num_opt(t, k, def, ok, what, name)
  local v = t[k]
  if v == nil then return def end
  if type(v) ~= "number" or not finite(v) or not ok(v) then oerr(name or k, what, v) end
  return v
end

local function parse(opt, opts)
  if type(opt) ~= "table" or type(opt.step) ~= "function" or type(opt.param_groups) ~= "table" then
    error(("guard: argument #1: expected an optimizer (keel.optim.*), got %s"):format(type(opt)), 0)
  end
  opts = opts == nil and {} or opts
  if type(opts) ~= "table" then error(("guard: argument #2: expected a table of options, got %s"):format(type(opts)), 0) end
  for k in pairs(opts) do
    if not KNOWN[k] then error(("guard: unknown option '%s'"):format(tostring(k)), 0) end
  end
  local c = {}
  local spike = opts.spike
  if spike == nil then spike = {} end
  if spike == false then
    c.z = nil
  elseif type(spike) ~= "table" then
    oerr("spike", "a table {z =, window =, min_samples =} or false", spike)
  else
    for k in pairs(spike) do
      if k ~= "z" and k ~= "window" and k ~= "min_samples" then
        error(("guard: option 'spike': unknown field '%s' (z, window, min_samples)"):format(tostring(k)), 0)
      end
    end
    c.z = num_opt(spike, "z", 6, function(v) return v > 0 end, "a number > 0", "spike.z")
    c.window = int_opt(spike, "window", 200, 2, "spike.window")
    c.min_samples = int_opt(spike, "min_samples", math.min(20, c.window), 2, "spike.min_samples")
    if c.min_samples > c.window then
      oerr("spike.min_samples", ("an integer <= window (%d)"):format(c.window), c.min_samples)
    end
  end
  for _, k in ipairs{"on_spike", "on_nonfinite"} do
    local v = opts[k]
    if v == nil then v = "skip" end
    if not ACTIONS[v] then oerr(k, '"skip", "rollback" or "error"', v) end
    c[k] = v
  end
  c.lr_backoff = num_opt(opts, "lr_backoff", 0.5, function(v) return v > 0 and v <= 1 end, "a number in (0, 1]")
  c.min_lr_scale = num_opt(opts, "min_lr_scale", 1e-3, function(v) return v > 0 and v <= 1 end,
    "a number in (0, 1]")
  c.recover_after = int_opt(opts, "recover_after", 100, 1)
  c.reset_after = int_opt(opts, "reset_after", 10, 1)
  c.max_retries = int_opt(opts, "max_retries", 3, 0)
  c.snapshot_every = int_opt(opts, "snapshot_every", 100, 1)
  c.keep = int_opt(opts, "keep", 2, 1)
  c.skip_batches = int_opt(opts, "skip_batches", 0, 0)
  c.max_grad_norm = num_opt(opts, "max_grad_norm", nil, function(v) return v > 0 end, "a number > 0")
  c.max_loss = num_opt(opts, "max_loss", nil, function() return true end, "a finite number")
  local m = opts.model
  if m ~= nil and (type(m) ~= "table" or type(m.named_parameters) ~= "function") then
    oerr("model", "an nn.Module", m)
  end
  c.model = m
  local l = opts.loader
  if l ~= nil and (type(l) ~= "table" or type(l.state) ~= "function" or type(l.set_state) ~= "function") then
    oerr("loader", "a loader with state() and set_state()", l)
  end
  c.loader = l
  if c.skip_batches > 0 and not l then
    error("guard: option 'skip_batches' needs option 'loader'", 0)
  end
  if opts.verbose ~= nil and type(opts.verbose) ~= "boolean" then oerr("verbose", "a boolean", opts.verbose) end
  c.verbose = opts.verbose ~= false
  return opt, c
end

-- }======================================================================

-- {======================================================================
-- Construction
-- =======================================================================

local function fresh_counts()
  return {decisions = 0, applied = 0, events = 0, skipped = 0, rolled_back = 0, nonfinite = 0,
          spike_loss = 0, spike_grad = 0, ceiling = 0, clipped = 0, overflow = 0}
end

-- keel.guard(opt [, opts]) -> guard, attached to opt (opt._guard).
function M.guard(opt_, opts)
  local opt, c = parse(opt_, opts)
  if rawget(opt, "_guard") ~= nil then
    error("guard: this optimizer already has a guard (guard:remove() it first)", 0)
  end
  local self = setmetatable({
    opt = opt, model = c.model, loader = c.loader, config = c,
    counts = fresh_counts(),
    _loss = c.z and window_new(c.window), _grad = c.z and window_new(c.window),
    _recent_loss = {}, _recent_grad = {},
    _listeners = {},
    lr_scale = 1, retries = 0, _clean = 0, _recover_clean = 0, _since_snapshot = 0,
    _coef_sum = 0, _last_coef = nil, _top = {},
    _ring = {}, _spare = {},
    _prev_nonfinite = opt.nonfinite, _base_scale = opt.lr_scale or 1,
  }, Guard)
  opt._guard = self
  self:_sync()
  return self
end

-- Puts the guard's settings on the optimizer: the non-finite policy "skip"
-- (a NaN gradient must reach the guard as a report, not as an error) and
-- opt.lr_scale = (its value at attach) x (the guard's back-off).
-- keel.checkpoint calls it after it loads an optimizer state.
function Guard:_sync()
  if self._removed then return end
  local opt = self.opt
  if opt.nonfinite ~= "skip" then opt:set_nonfinite("skip") end
  opt.lr_scale = self._base_scale * self.lr_scale
end

-- Detaches the guard: the optimizer's previous non-finite policy and
-- lr_scale come back; snapshots are dropped. A second call does nothing.
function Guard:remove()
  local opt = self.opt
  if self._removed then return end
  self._removed = true
  if rawget(opt, "_guard") == self then opt._guard = nil end
  if self._prev_nonfinite and opt.nonfinite ~= self._prev_nonfinite then opt:set_nonfinite(self._prev_nonfinite) end
  opt.lr_scale = self._base_scale
  self:_drop_snapshots()
end
Guard.__close = function(self) self:remove() end

function Guard:__tostring()
  local c = self.config
  return ("keel.Guard(on_spike = %s, on_nonfinite = %s%s; %d event%s)"):format(c.on_spike, c.on_nonfinite,
    self._removed and ", removed" or "", self.counts.events, self.counts.events == 1 and "" or "s")
end

-- fn(event) for every event; returns a handle with :remove().
function Guard:on_event(fn)
  if type(fn) ~= "function" then
    error(("guard:on_event: argument #1: expected a function, got %s"):format(type(fn)), 2)
  end
  return hooks.add(self._listeners, fn)
end

-- }======================================================================

-- {======================================================================
-- Names and provenance
-- =======================================================================

-- The optimizer's parameters in order (the userdata the model holds).
local function opt_params(opt)
  local out = {}
  for _, g in ipairs(opt.param_groups) do
    for _, p in ipairs(g.params) do out[#out + 1] = p end
  end
  return out
end

-- Name of the optimizer's i-th parameter: the model's name, else "param<i>".
function Guard:param_name(i)
  if i == nil then return nil end
  local names = self._names
  if names == nil then
    names = {}
    if self.model then
      local by_tensor = {}
      for name, p in self.model:named_parameters() do by_tensor[p] = name end
      for j, p in ipairs(opt_params(self.opt)) do names[j] = by_tensor[p] end
    end
    self._names = names
  end
  return names[i] or ("param" .. i)
end

-- The line of the anomaly detector's event of this step (else its first
-- event since it was cleared), each event once.
function Guard:_anomaly()
  local ok, ag = pcall(function() return keel.autograd end)
  if not ok or type(ag) ~= "table" then return nil end
  local get = type(ag.step_anomaly) == "function" and ag.step_anomaly or ag.anomaly
  if type(get) ~= "function" then return nil end
  local a = get()
  if a == nil or a == self._seen_anomaly then return nil end
  self._seen_anomaly = a
  return type(a) == "table" and (a.line or tostring(a.op)) or tostring(a)
end

-- }======================================================================

-- {======================================================================
-- Snapshots
-- =======================================================================

-- Closes the tensors of an optimizer state dict (frees their memory now:
-- the GC does not see how large they are).
local function free_state(sd)
  if type(sd) ~= "table" or type(sd.state) ~= "table" then return end
  for _, st in pairs(sd.state) do
    if type(st) == "table" then
      for _, t in pairs(st) do
        if keel.is_tensor(t) then local _ <close> = t end
      end
    end
  end
end

local function same_layout(a, b)
  if a.dtype ~= b.dtype or a.device ~= b.device then return false end
  local sa, sb = a.shape, b.shape
  if #sa ~= #sb then return false end
  for i = 1, #sa do if sa[i] ~= sb[i] then return false end end
  return true
end

-- copy of src into the slot's buffer (reused when its layout fits)
local function keep_copy(buf, src)
  if buf ~= nil and same_layout(buf, src) then
    buf:copy_(src)
    return buf
  end
  return src:detach():clone()
end

function Guard:_drop_snapshots()
  for _, s in ipairs(self._ring) do free_state(s.opt); s.opt = nil end
  self._ring, self._spare = {}, {}
end

-- Takes a snapshot now: parameters and model buffers (copied into the
-- buffers of a recycled slot), the optimizer's state_dict, the RNG.
function Guard:snapshot()
  local opt, ring = self.opt, self._ring
  local slot
  if #ring >= self.config.keep then
    slot = table.remove(ring, 1)
  else
    slot = table.remove(self._spare) or {params = {}, buffers = {}}
  end
  free_state(slot.opt)
  slot.opt = nil
  local params = opt_params(opt)
  keel.no_grad(function()
    for i, p in ipairs(params) do slot.params[i] = keep_copy(slot.params[i], p) end
    for i = #params + 1, #slot.params do slot.params[i] = nil end
    if self.model then
      local seen = {}
      for name, b in self.model:named_buffers() do
        slot.buffers[name] = keep_copy(slot.buffers[name], b)
        seen[name] = true
      end
      for name in pairs(slot.buffers) do if not seen[name] then slot.buffers[name] = nil end end
    end
  end)
  slot.opt = opt:state_dict()
  slot.rng = keel.get_rng_state()
  slot.step = opt.step_count
  ring[#ring + 1] = slot
  self._since_snapshot = 0
  return slot.step
end

-- Restores the snapshot `back` places from the newest (1 = the newest;
-- clamped to the oldest kept) and drops the newer ones. Returns the step
-- it restored, or nil when there is no snapshot.
function Guard:rollback(back)
  local ring = self._ring
  if #ring == 0 then return nil end
  local idx = math.max(1, #ring - ((back or 1) - 1))
  local slot = ring[idx]
  local opt = self.opt
  local params = opt_params(opt)
  if #params ~= #slot.params then
    error(("guard: the optimizer has %d parameters, the snapshot %d (parameters were added since)"):format(
      #params, #slot.params), 0)
  end
  keel.no_grad(function()
    for i, p in ipairs(params) do p:copy_(slot.params[i]) end
    if self.model then
      for name, b in self.model:named_buffers() do
        local s = slot.buffers[name]
        if s then b:copy_(s) end
      end
    end
  end)
  -- the optimizer's counters are a log of what happened: they keep counting;
  -- its non-finite policy stays the guard's
  local sd = {}
  for k, v in pairs(slot.opt) do sd[k] = v end
  sd.counters = opt.counters
  sd.nonfinite = nil
  opt:load_state_dict(sd)
  keel.set_rng_state(slot.rng)
  self:_sync()
  for i = #ring, idx + 1, -1 do
    local s = table.remove(ring, i)
    free_state(s.opt)
    s.opt = nil
    self._spare[#self._spare + 1] = s
  end
  self._since_snapshot = 0
  return slot.step
end

-- Moves a loader's cursor skip_batches further (at most to the end of
-- its epoch); returns how many batches it skipped.
local function skip_batches(loader, n)
  if n <= 0 then return 0 end
  local s = loader:state()
  local nb = loader.num_batches and loader:num_batches() or math.huge
  local cursor = math.min(s.cursor + n, nb)
  loader:set_state({epoch = s.epoch, cursor = cursor, seed = s.seed})
  return cursor - s.cursor
end

-- }======================================================================

-- {======================================================================
-- The decision
-- =======================================================================

local function push_recent(list, v)
  list[#list + 1] = v
  if #list > RECENT then table.remove(list, 1) end
end

local function zscore(self, w, x, floor)
  if w == nil or w.n < self.config.min_samples then return nil end
  local med, mad = median_mad(w)
  local sigma = math.max(MAD_TO_SD * mad, floor(med))
  return (x - med) / sigma, med
end

local function floor_log() return FLOOR_LOG end
local function floor_loss(med) return math.max(FLOOR_REL * math.abs(med), 1e-12) end

local KIND_TEXT = {nonfinite = "non-finite values", spike_loss = "loss spike", spike_grad = "grad-norm spike",
                   ceiling = "ceiling"}

-- The finding of this step, or nil when it is clean.
function Guard:_detect(r, loss, gn)
  local c = self.config
  local nf = r.nonfinite or 0
  if nf > 0 or (loss ~= nil and not finite(loss)) or (gn ~= nil and not finite(gn)) then
    local what
    if nf > 0 then what = ("%d non-finite gradient value%s"):format(nf, nf == 1 and "" or "s")
    elseif gn ~= nil and not finite(gn) then what = "grad norm " .. fmt(gn)
    else what = "loss " .. fmt(loss) end
    local metric = (nf > 0 or (gn ~= nil and not finite(gn))) and "grad_norm" or "loss"
    return {kind = "nonfinite", metric = metric, value = metric == "loss" and loss or gn, nonfinite = nf,
            text = what}
  end
  if c.max_loss and loss ~= nil and loss > c.max_loss then
    return {kind = "ceiling", metric = "loss", value = loss, threshold = c.max_loss,
            text = ("loss %s above max_loss %s"):format(fmt(loss), fmt(c.max_loss))}
  end
  if c.max_grad_norm and gn ~= nil and gn > c.max_grad_norm then
    return {kind = "ceiling", metric = "grad_norm", value = gn, threshold = c.max_grad_norm,
            text = ("grad norm %s above max_grad_norm %s"):format(fmt(gn), fmt(c.max_grad_norm))}
  end
  if c.z == nil then return nil end
  local zg, mg, zl, ml
  if gn ~= nil then zg, mg = zscore(self, self._grad, math.log(math.max(gn, 1e-300)), floor_log) end
  if loss ~= nil then zl, ml = zscore(self, self._loss, loss, floor_loss) end
  local grad_hit = zg ~= nil and zg > c.z
  local loss_hit = zl ~= nil and zl > c.z
  if grad_hit and (not loss_hit or zg >= zl) then
    local median = math.exp(mg)
    return {kind = "spike_grad", metric = "grad_norm", value = gn, z = zg, threshold = c.z, median = median,
            text = ("grad-norm spike %s (x%s the median %s; z %s > %s)"):format(fmt(gn), fmt(gn / median),
              fmt(median), fmt(zg), fmt(c.z))}
  end
  if loss_hit then
    return {kind = "spike_loss", metric = "loss", value = loss, z = zl, threshold = c.z, median = ml,
            text = ("loss spike %s (median %s; z %s > %s)"):format(fmt(loss), fmt(ml), fmt(zl), fmt(c.z))}
  end
  return nil
end

-- A clean step: its values enter the windows, telemetry, recovery, and the
-- snapshot when one is due (taken before the step is applied: the state
-- then is the result of accepted steps only).
function Guard:_accept(r, loss, gn)
  local c, n = self.config, self.counts
  n.applied = n.applied + 1
  if self._grad and gn ~= nil then window_push(self._grad, math.log(math.max(gn, 1e-300))) end
  if self._loss and loss ~= nil then window_push(self._loss, loss) end
  if r.clipped then
    n.clipped = n.clipped + 1
    self._coef_sum = self._coef_sum + (r.clip_coef or 1)
  end
  self._last_coef = r.clip_coef
  local tp = r.top_param
  if tp ~= nil and tp >= 1 then
    local e = self._top[tp]
    if not e then e = {count = 0, share = 0}; self._top[tp] = e end
    e.count = e.count + 1
    e.share = e.share + (r.top_share or 0)
  end
  self._clean = self._clean + 1
  if self._clean >= c.reset_after then self.retries = 0 end
  if self.lr_scale < 1 then
    self._recover_clean = self._recover_clean + 1
    if self._recover_clean >= c.recover_after then
      self._recover_clean = 0
      self.lr_scale = math.min(1, self.lr_scale / c.lr_backoff)
      self:_sync()
    end
  end
  if c.on_spike == "rollback" or c.on_nonfinite == "rollback" then
    if #self._ring == 0 or self._since_snapshot >= c.snapshot_every then self:snapshot() end
    self._since_snapshot = self._since_snapshot + 1
  end
end

-- The parameter that dominates: the first with non-finite values for a
-- non-finite step, else the largest share of the global sum of squares.
function Guard:_culprit(r, kind)
  if kind == "nonfinite" and (r.nonfinite or 0) > 0 then
    local ok, stats = pcall(self.opt.grad_stats, self.opt)
    if ok and type(stats) == "table" then
      for i, s in ipairs(stats) do
        if (s.nan or 0) + (s.inf or 0) > 0 then return i, nil end
      end
    end
    -- no statistics of this step (an optimizer that reports before its
    -- statistics pass): one pass over the gradients, on events only
    for i, p in ipairs(opt_params(self.opt)) do
      local g = p.grad
      if g ~= nil then
        local s = require("keel.clip").grad_stats({g})[1]
        if s.nan + s.inf > 0 then return i, nil end
      end
    end
    return nil
  end
  if r.top_param == nil or r.top_param < 1 then return nil end
  return r.top_param, r.top_share
end

local function summary_counts(self)
  local n, parts = self.counts, {}
  local function add(k, word)
    if n[k] > 0 then parts[#parts + 1] = ("%d %s"):format(n[k], word) end
  end
  add("nonfinite", n.nonfinite == 1 and "non-finite step" or "non-finite steps")
  add("spike_loss", n.spike_loss == 1 and "loss spike" or "loss spikes")
  add("spike_grad", n.spike_grad == 1 and "grad-norm spike" or "grad-norm spikes")
  add("ceiling", n.ceiling == 1 and "ceiling" or "ceilings")
  return parts
end

local function list_text(vs)
  local out = {}
  for i, v in ipairs(vs) do out[i] = fmt(v) end
  return table.concat(out, ", ")
end

-- Handles a finding: counts, action, back-off, event; returns "skip" or raises.
function Guard:_event(r, loss, gn, f, step)
  local c, n = self.config, self.counts
  n.events = n.events + 1
  n[f.kind] = n[f.kind] + 1
  self.retries = self.retries + 1
  self._clean, self._recover_clean = 0, 0
  local action = f.kind == "nonfinite" and c.on_nonfinite or c.on_spike
  local escalated = false
  if action ~= "error" and self.retries > c.max_retries then action, escalated = "error", true end
  local ev = {kind = f.kind, metric = f.metric, step = step, action = action, value = f.value, z = f.z,
              threshold = f.threshold, median = f.median, nonfinite = f.nonfinite, retries = self.retries,
              max_retries = c.max_retries, loss = loss, grad_norm = gn, n = n.events}
  local pi, share = self:_culprit(r, f.kind)
  if pi ~= nil then ev.param_index, ev.param, ev.share = pi, self:param_name(pi), share end
  ev.anomaly = self:_anomaly()
  local did
  if action == "rollback" then
    local to = self:rollback(self.retries)
    if to == nil then
      action, ev.action = "skip", "skip"
      did = "skipped (no snapshot yet)"
    else
      n.rolled_back = n.rolled_back + 1
      ev.to_step = to
      self.last_rollback = {from = step, to = to}
      did = ("rolled back to step %d"):format(to)
      if self.loader then
        ev.skipped_batches = skip_batches(self.loader, c.skip_batches)
        if ev.skipped_batches > 0 then did = did .. (", skipped %d batches"):format(ev.skipped_batches) end
      end
    end
  elseif action == "skip" then
    did = "skipped"
  end
  if action == "skip" then n.skipped = n.skipped + 1 end
  if action ~= "error" and c.lr_backoff < 1 then
    self.lr_scale = math.max(c.min_lr_scale, self.lr_scale * c.lr_backoff)
    self:_sync()
  end
  ev.lr_scale = self.lr_scale
  local where = ""
  if ev.param then
    where = ev.share and (" (top %s, %s of the norm)"):format(ev.param, pct(ev.share))
      or (" (first in %s)"):format(ev.param)
  end
  local line
  if action == "error" then
    local why = escalated and ("%d events in a row (max_retries %d)"):format(self.retries, c.max_retries)
      or ("on_%s = \"error\""):format(f.kind == "nonfinite" and "nonfinite" or "spike")
    line = ("guard: step %d: %s%s: giving up after %s; %s; last grad norms %s; last losses %s%s"):format(
      step, f.text, where, why, self:summary({short = true}), list_text(self._recent_grad),
      list_text(self._recent_loss), ev.anomaly and ("; anomaly: " .. ev.anomaly) or "")
  else
    line = ("guard: step %d: %s%s: %s, lr x%s (retry %d/%d)%s"):format(step, f.text, where, did,
      fmt(self.lr_scale), self.retries, c.max_retries, ev.anomaly and ("; anomaly: " .. ev.anomaly) or "")
  end
  ev.line = line
  self.last_event = ev
  if c.verbose then io.stderr:write(line, "\n") end
  hooks.emit("guard", ev)
  for _, fn in ipairs(table.move(self._listeners, 1, #self._listeners, 1, {})) do fn(ev) end
  if action == "error" then error(line, 0) end
  return "skip"
end

-- Called by the optimizer after its statistics pass, before it changes
-- anything: "apply" or "skip" (a rollback has then restored a snapshot);
-- raises for the "error" action.
function Guard:_decide(opt, r, loss)
  if self._removed then return "apply" end
  if opt ~= nil and opt ~= self.opt then error("guard: _decide called with another optimizer", 0) end
  r = r or {}
  if loss == nil then loss = r.loss end
  if keel.is_tensor(loss) then loss = loss:item() end
  if loss ~= nil and type(loss) ~= "number" then
    error(("guard: the loss must be a number or a 1-element tensor, got %s"):format(type(loss)), 0)
  end
  if r.reason == "no_grad" then return "apply" end   -- nothing to judge, nothing will change
  local n = self.counts
  if r.reason == "overflow" then
    -- the loss scaler skips this step and backs off: counted, not judged
    n.overflow = n.overflow + 1
    return "apply"
  end
  n.decisions = n.decisions + 1
  local gn = r.grad_norm
  -- the number this step gets when applied (r.step is the count before it)
  local step = self.opt.step_count + 1
  if gn ~= nil then push_recent(self._recent_grad, gn) end
  if loss ~= nil then push_recent(self._recent_loss, loss) end
  local f = self:_detect(r, loss, gn)
  if f == nil then
    self:_accept(r, loss, gn)
    return "apply"
  end
  return self:_event(r, loss, gn, f, step)
end

-- }======================================================================

-- {======================================================================
-- Telemetry
-- =======================================================================

function Guard:stats()
  local n = self.counts
  local s = {}
  for k, v in pairs(n) do s[k] = v end
  s.lr_scale, s.retries = self.lr_scale, self.retries
  s.clip_fraction = n.applied > 0 and n.clipped / n.applied or 0
  s.clip_coef_mean = n.clipped > 0 and self._coef_sum / n.clipped or nil
  s.clip_coef_last = self._last_coef
  local best, bi
  for i, e in pairs(self._top) do
    if best == nil or e.count > best.count or (e.count == best.count and i < bi) then best, bi = e, i end
  end
  if best then
    s.top_param_index, s.top_param = bi, self:param_name(bi)
    s.top_share = best.share / best.count
    s.top_fraction = best.count / math.max(n.applied, 1)
  end
  s.snapshots = #self._ring
  if self.last_rollback then s.last_rollback = {from = self.last_rollback.from, to = self.last_rollback.to} end
  s.last_grad_norms = {table.unpack(self._recent_grad)}
  s.last_losses = {table.unpack(self._recent_loss)}
  return s
end

-- A short readable text for the end of a run, e.g.
-- "guard: 2 grad-norm spikes (1 skipped, 1 rollback: step 340->300), lr x0.5;
--  clipped 12.5% of steps (mean coef 0.41); top parameter rnn.weight_hh (63% of the norm)"
function Guard:summary(opts)
  local s = self:stats()
  local parts = summary_counts(self)
  local text
  if #parts == 0 then
    text = ("no events in %d step%s"):format(s.decisions, s.decisions == 1 and "" or "s")
  else
    local acts = {}
    if s.skipped > 0 then acts[#acts + 1] = ("%d skipped"):format(s.skipped) end
    if s.rolled_back > 0 then
      acts[#acts + 1] = ("%d rollback%s (%sstep %d->%d)"):format(s.rolled_back, s.rolled_back == 1 and "" or "s",
        s.rolled_back == 1 and "" or "last ", s.last_rollback.from, s.last_rollback.to)
    end
    text = table.concat(parts, ", ") .. (#acts > 0 and (": " .. table.concat(acts, ", ")) or "")
  end
  if s.lr_scale ~= 1 then text = text .. (", lr x%s"):format(fmt(s.lr_scale)) end
  if s.overflow > 0 then
    text = text .. (", %d overflow skip%s (loss scaler)"):format(s.overflow, s.overflow == 1 and "" or "s")
  end
  if opts and opts.short then return text end
  local tail = {}
  if s.clipped > 0 then
    tail[#tail + 1] = ("clipped %s of steps (mean coef %s)"):format(pct(s.clip_fraction), fmt(s.clip_coef_mean))
  elseif s.applied > 0 then
    tail[#tail + 1] = "no step clipped"
  end
  if s.top_param then
    tail[#tail + 1] = ("top parameter %s (%s of the norm)"):format(s.top_param, pct(s.top_share))
  end
  return "guard: " .. text .. (#tail > 0 and ("; " .. table.concat(tail, "; ")) or "")
end

-- }======================================================================

-- {======================================================================
-- State (for keel.checkpoint): windows, counters, back-off, retries;
-- not the snapshots (they are in-memory copies of what the checkpoint
-- already holds)
-- =======================================================================

local VERSION = 1
local COUNT_KEYS = {"decisions", "applied", "events", "skipped", "rolled_back", "nonfinite", "spike_loss",
                    "spike_grad", "ceiling", "clipped"}

function Guard:state_dict()
  local top = {}
  for i, e in pairs(self._top) do top[#top + 1] = {i, e.count, e.share} end
  table.sort(top, function(a, b) return a[1] < b[1] end)
  local counts = {overflow = self.counts.overflow}
  for _, k in ipairs(COUNT_KEYS) do counts[k] = self.counts[k] end
  return {
    version = VERSION, counts = counts,
    loss = self._loss and window_values(self._loss) or {}, grad = self._grad and window_values(self._grad) or {},
    lr_scale = self.lr_scale, retries = self.retries, clean = self._clean, recover_clean = self._recover_clean,
    since_snapshot = self._since_snapshot, coef_sum = self._coef_sum, last_coef = self._last_coef,
    top = top, recent_loss = {table.unpack(self._recent_loss)}, recent_grad = {table.unpack(self._recent_grad)},
    last_rollback = self.last_rollback and {from = self.last_rollback.from, to = self.last_rollback.to} or nil,
  }
end

local function num_list(sd, k)
  local v = sd[k]
  if v == nil then return {} end
  if type(v) ~= "table" then error(("guard.load_state_dict: '%s' must be a list of numbers"):format(k), 0) end
  for i = 1, #v do
    if type(v[i]) ~= "number" then
      error(("guard.load_state_dict: '%s'[%d] must be a number, got %s"):format(k, i, type(v[i])), 0)
    end
  end
  return v
end

-- Checks a state dict without changing anything (keel.checkpoint calls it
-- before it restores any part).
function Guard:_check_state(sd)
  if type(sd) ~= "table" then error("guard.load_state_dict: expected a table from guard:state_dict()", 0) end
  if sd.version ~= VERSION then
    error(("guard.load_state_dict: state version %s, expected %d"):format(tostring(sd.version), VERSION), 0)
  end
  if type(sd.counts) ~= "table" then error("guard.load_state_dict: 'counts' is missing", 0) end
  for _, k in ipairs(COUNT_KEYS) do
    if math.type(sd.counts[k]) ~= "integer" then
      error(("guard.load_state_dict: counts.%s must be an integer"):format(k), 0)
    end
  end
  -- (overflow came later: a state without it counts none)
  if sd.counts.overflow ~= nil and math.type(sd.counts.overflow) ~= "integer" then
    error("guard.load_state_dict: counts.overflow must be an integer", 0)
  end
  for _, k in ipairs{"loss", "grad", "recent_loss", "recent_grad"} do num_list(sd, k) end
  if type(sd.lr_scale) ~= "number" or not (sd.lr_scale > 0 and sd.lr_scale <= 1) then
    error("guard.load_state_dict: lr_scale must be a number in (0, 1]", 0)
  end
  for _, k in ipairs{"retries", "clean", "recover_clean", "since_snapshot"} do
    if math.type(sd[k]) ~= "integer" or sd[k] < 0 then
      error(("guard.load_state_dict: '%s' must be an integer >= 0"):format(k), 0)
    end
  end
  if sd.top ~= nil then
    if type(sd.top) ~= "table" then error("guard.load_state_dict: 'top' must be a list", 0) end
    for i, e in ipairs(sd.top) do
      if type(e) ~= "table" or math.type(e[1]) ~= "integer" or type(e[2]) ~= "number" or type(e[3]) ~= "number" then
        error(("guard.load_state_dict: top[%d] must be {index, count, share}"):format(i), 0)
      end
    end
  end
end

function Guard:load_state_dict(sd)
  self:_check_state(sd)
  self.counts = fresh_counts()
  for _, k in ipairs(COUNT_KEYS) do self.counts[k] = sd.counts[k] end
  self.counts.overflow = sd.counts.overflow or 0
  local c = self.config
  if c.z then
    self._loss, self._grad = window_new(c.window), window_new(c.window)
    local function fill(w, vs)
      for i = math.max(1, #vs - c.window + 1), #vs do window_push(w, vs[i]) end
    end
    fill(self._loss, num_list(sd, "loss"))
    fill(self._grad, num_list(sd, "grad"))
  end
  self.lr_scale, self.retries = sd.lr_scale, sd.retries
  self._clean, self._recover_clean, self._since_snapshot = sd.clean, sd.recover_clean, sd.since_snapshot
  self._coef_sum, self._last_coef = sd.coef_sum or 0, sd.last_coef
  self._top = {}
  for _, e in ipairs(sd.top or {}) do self._top[e[1]] = {count = e[2], share = e[3]} end
  self._recent_loss = {table.unpack(num_list(sd, "recent_loss"))}
  self._recent_grad = {table.unpack(num_list(sd, "recent_grad"))}
  self.last_rollback = type(sd.last_rollback) == "table" and
    {from = sd.last_rollback.from, to = sd.last_rollback.to} or nil
  self:_sync()
  -- snapshots of the previous timeline do not belong to the loaded one
  self:_drop_snapshots()
  self._since_snapshot = 0
end

-- }======================================================================

-- public entry points: errors point at the caller
M.guard = api(M.guard)
for _, k in ipairs{"remove", "snapshot", "rollback", "stats", "summary", "state_dict", "load_state_dict",
                   "param_name"} do
  Guard[k] = api(Guard[k])
end

-- exposed for the tests
M._window = {new = window_new, push = window_push, values = window_values, median_mad = median_mad}

return M
