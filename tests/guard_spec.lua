-- guard_spec.lua: keel.guard (spike and non-finite detection, skip,
-- rollback to in-memory snapshots, lr back-off, bounded retries, events,
-- clip telemetry, state for checkpoints).
--
-- The tests named "integration: ..." go through opt:step(loss) and need the
-- optimizer to ask the guard (opt._guard:_decide) before it applies a step;
-- the others drive guard:_decide directly, as the optimizer does.
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local F = nn.functional
local hooks = require "keel.hooks"
local G = require "keel.guard"

-- {======================================================================
-- Helpers
-- =======================================================================

local PACK = {float32 = "<f", float64 = "<d", int64 = "<i8"}

-- The raw bytes of a tensor's values (row-major), exact to the bit.
local function bytes(t)
  local f = assert(PACK[t.dtype], t.dtype)
  local out = {}
  for i, v in ipairs(H.flat(t)) do
    if f == "<i8" then v = math.tointeger(v) end
    out[i] = string.pack(f, v)
  end
  return table.concat(out)
end

local function sorted_keys(t)
  local ks = {}
  for k in pairs(t) do ks[#ks + 1] = k end
  table.sort(ks, function(a, b) return tostring(a) < tostring(b) end)
  return ks
end

-- Every parameter and buffer of a model, as bytes by name.
local function model_bytes(m)
  local out = {}
  for k, t in pairs(m:state_dict()) do out[k] = bytes(t) end
  return out
end

-- Every state tensor and step of an optimizer, as bytes.
local function opt_bytes(opt)
  local sd = opt:state_dict()
  local out = {"step_count=" .. tostring(sd.step_count)}
  for _, i in ipairs(sorted_keys(sd.state)) do
    local st = sd.state[i]
    for _, k in ipairs(sorted_keys(st)) do
      local v = st[k]
      out[#out + 1] = ("%s.%s=%s"):format(i, k, keel.is_tensor(v) and bytes(v) or tostring(v))
    end
  end
  for gi, g in ipairs(sd.param_groups) do out[#out + 1] = ("group%d.lr=%a"):format(gi, g.lr) end
  return table.concat(out, "\n")
end

-- Deep equality where NaN equals NaN.
local function same(a, b)
  if type(a) == "number" and type(b) == "number" then return a == b or (a ~= a and b ~= b) end
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

local function same_bytes(a, b, what)
  for k, v in pairs(a) do assert.is_true(v == b[k], what .. ": " .. k .. " differs") end
  for k in pairs(b) do assert.is_not_nil(a[k], what .. ": " .. k .. " is new") end
end

-- A small optimizer to attach a guard to (for decisions on fake reports).
local function small_opt(opts)
  local w = nn.Parameter(keel.zeros(3))
  return keel.optim.SGD({w}, opts or {lr = 0.1}), w
end

-- Quiet guard with a short window.
local function quiet(opt, opts)
  opts = opts or {}
  if opts.verbose == nil then opts.verbose = false end
  if opts.spike == nil then opts.spike = {z = 6, window = 50, min_samples = 10} end
  return keel.guard(opt, opts)
end

-- n clean decisions on fake reports: grad norms around 1 (log-normal,
-- sd 0.1) and losses around 2; returns the step after the last.
local function feed(g, opt, n, step, rnd)
  rnd = rnd or H.rng(3)
  step = step or 1
  for _ = 1, n do
    local gn = math.exp(0.1 * (rnd() + rnd() + rnd() - 1.5) * 2)
    local loss = 2 + 0.1 * (rnd() - 0.5)
    assert.are.equal("apply", g:_decide(opt, {grad_norm = gn, nonfinite = 0, step = step}, loss))
    step = step + 1
  end
  return step
end

local function capture_stderr(fn)
  local lines = {}
  local real = io.stderr
  io.stderr = {write = function(self, ...)
    for _, s in ipairs{...} do lines[#lines + 1] = s end
    return self
  end}
  local ok, err = pcall(fn)
  io.stderr = real
  if not ok then error(err, 0) end
  return table.concat(lines)
end

-- }======================================================================

describe("keel.guard", function()

  describe("window statistics", function()
    local W = G._window

    local function ref(vals)
      local a = {table.unpack(vals)}
      table.sort(a)
      local n = #a
      local med = n % 2 == 1 and a[(n + 1) // 2] or (a[n // 2] + a[n // 2 + 1]) / 2
      local d = {}
      for i, v in ipairs(a) do d[i] = math.abs(v - med) end
      table.sort(d)
      local mad = n % 2 == 1 and d[(n + 1) // 2] or (d[n // 2] + d[n // 2 + 1]) / 2
      return med, mad
    end

    it("median and MAD equal a sort-based reference while the window slides", function()
      local rnd = H.rng(11)
      for _, cap in ipairs{2, 3, 7, 20} do
        local w = W.new(cap)
        local all = {}
        for i = 1, 60 do
          -- repeated values too: ties must not break the ring/sorted bookkeeping
          local v = i % 5 == 0 and 1.5 or math.floor(rnd() * 8) / 2
          all[#all + 1] = v
          W.push(w, v)
          local vals = W.values(w)
          assert.are.same({table.unpack(all, math.max(1, #all - cap + 1))}, vals)
          if #vals >= 2 then
            local m1, d1 = W.median_mad(w)
            local m2, d2 = ref(vals)
            assert.are.equal(m2, m1)
            assert.are.equal(d2, d1)
          end
        end
      end
    end)
  end)

  describe("attaching", function()
    it("attaches as opt._guard, sets the non-finite policy to skip and restores it on remove", function()
      local opt = small_opt()
      assert.are.equal("error", opt.nonfinite)
      local g = quiet(opt)
      assert.are.equal(g, opt._guard)
      assert.are.equal("skip", opt.nonfinite)
      assert.are.equal(1, opt.lr_scale)
      H.assert_error(function() keel.guard(opt) end, "already has a guard")
      g:remove()
      assert.is_nil(opt._guard)
      assert.are.equal("error", opt.nonfinite)
      g:remove()   -- twice is fine
      assert.are.equal("apply", g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 1, step = 1}, 1))
      local g2 = quiet(opt)   -- a new one may attach now
      assert.are.equal(g2, opt._guard)
    end)

    it("rejects bad options with the option's name and what it expected", function()
      local opt = small_opt()
      H.assert_error(function() keel.guard({}, {}) end, "guard: argument #1: expected an optimizer")
      H.assert_error(function() keel.guard(opt, 5) end, "guard: argument #2")
      H.assert_error(function() keel.guard(opt, {bogus = 1}) end, "guard: unknown option 'bogus'")
      H.assert_error(function() keel.guard(opt, {spike = {window = 1}}) end,
        "guard: option 'spike.window': expected an integer >= 2, got 1")
      H.assert_error(function() keel.guard(opt, {spike = {z = -1}}) end, "option 'spike.z': expected a number > 0")
      H.assert_error(function() keel.guard(opt, {spike = {zz = 1}}) end, "unknown field 'zz'")
      H.assert_error(function() keel.guard(opt, {spike = {window = 10, min_samples = 11}}) end,
        "'spike.min_samples': expected an integer <= window (10)")
      H.assert_error(function() keel.guard(opt, {on_spike = "retry"}) end,
        [[option 'on_spike': expected "skip", "rollback" or "error", got "retry"]])
      H.assert_error(function() keel.guard(opt, {lr_backoff = 2}) end, "'lr_backoff': expected a number in (0, 1]")
      H.assert_error(function() keel.guard(opt, {max_retries = -1}) end, "'max_retries': expected an integer >= 0")
      H.assert_error(function() keel.guard(opt, {snapshot_every = 0}) end, "'snapshot_every'")
      H.assert_error(function() keel.guard(opt, {skip_batches = 2}) end, "'skip_batches' needs option 'loader'")
      H.assert_error(function() keel.guard(opt, {model = 3}) end, "option 'model': expected an nn.Module")
      H.assert_error(function() keel.guard(opt, {max_grad_norm = 0 / 0}) end, "'max_grad_norm'")
      assert.is_nil(opt._guard)   -- nothing was attached by the failures
    end)
  end)

  describe("decisions", function()
    it("lets a loss scaler's overflow through uncounted as a decision: the optimizer skips it", function()
      local opt = small_opt()
      local g = quiet(opt)
      assert.are.equal("apply", g:_decide(opt, {reason = "overflow", grad_norm = math.huge, nonfinite = 3}, 1))
      local st = g:stats()
      assert.are.same({0, 0, 1, 1}, {st.decisions, st.events, st.overflow, g.lr_scale})
      assert.are.same({}, st.last_grad_norms)
      assert.matches("no events in 0 steps, 1 overflow skip %(loss scaler%)", g:summary())
    end)

    it("lets clean steps through and counts them", function()
      local opt = small_opt()
      local g = quiet(opt)
      feed(g, opt, 30)
      local s = g:stats()
      assert.are.equal(30, s.decisions)
      assert.are.equal(30, s.applied)
      assert.are.equal(0, s.events)
      assert.are.equal(1, s.lr_scale)
      assert.matches("^guard: no events in 30 steps", g:summary())
    end)

    it("skips non-finite gradients, grad norms and losses, and backs the lr off", function()
      local opt = small_opt()
      local g = quiet(opt, {lr_backoff = 0.5, max_retries = 10})
      local step = feed(g, opt, 5)
      local evs = {}
      g:on_event(function(ev) evs[#evs + 1] = ev end)
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 7, step = step}, 2.0))
      assert.are.equal("skip", g:_decide(opt, {grad_norm = math.huge, nonfinite = 0, step = step}, 2.0))
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 1.0, nonfinite = 0, step = step}, 0 / 0))
      assert.are.equal(3, #evs)
      for _, ev in ipairs(evs) do
        assert.are.equal("nonfinite", ev.kind)
        assert.are.equal("skip", ev.action)
        assert.are.equal(1, ev.step)   -- the number it would have had (no step applied here)
        assert.is_string(ev.line)
      end
      assert.are.equal(7, evs[1].nonfinite)
      assert.are.equal("grad_norm", evs[1].metric)
      assert.are.equal("loss", evs[3].metric)
      assert.matches("7 non%-finite gradient values", evs[1].line)
      assert.are.same({1, 2, 3}, {evs[1].retries, evs[2].retries, evs[3].retries})
      assert.are.equal(0.5, evs[1].lr_scale)
      assert.are.equal(0.125, evs[3].lr_scale)
      assert.are.equal(0.125, opt.lr_scale)
      assert.are.equal(3, g:stats().skipped)
      assert.are.equal(3, g:stats().nonfinite)
    end)

    it("a loss tensor counts as its value", function()
      local opt = small_opt()
      local g = quiet(opt)
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 1, nonfinite = 0, step = 1}, keel.tensor(0 / 0)))
      assert.are.equal("apply", g:_decide(opt, {grad_norm = 1, nonfinite = 0, step = 1}, keel.tensor({2.5})))
      assert.are.equal(2.5, g:stats().last_losses[2])
    end)

    it("catches a grad-norm spike and keeps it out of the window", function()
      local opt = small_opt()
      local g = quiet(opt)
      local step = feed(g, opt, 40)
      local before = G._window.values(g._grad)
      local ev
      g:on_event(function(e) ev = e end)
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 50, nonfinite = 0, step = step}, 2.0))
      assert.are.equal("spike_grad", ev.kind)
      assert.are.equal("grad_norm", ev.metric)
      assert.are.equal(50, ev.value)
      assert.is_true(ev.z > 6)
      assert.are.equal(6, ev.threshold)
      assert.is_true(math.abs(ev.median - 1) < 0.2)
      assert.matches("grad%-norm spike 50 %(x", ev.line)
      assert.are.same(before, G._window.values(g._grad))
      -- a moderate rise (x1.3 here) is not a spike
      assert.are.equal("apply", g:_decide(opt, {grad_norm = 1.3, nonfinite = 0, step = step}, 2.0))
    end)

    it("catches a loss spike; a loss drop is never one", function()
      local opt = small_opt()
      local g = quiet(opt)
      local step = feed(g, opt, 40)
      assert.are.equal("apply", g:_decide(opt, {grad_norm = 1, nonfinite = 0, step = step}, -100))
      local ev
      g:on_event(function(e) ev = e end)
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 1, nonfinite = 0, step = step + 1}, 40))
      assert.are.equal("spike_loss", ev.kind)
      assert.are.equal(40, ev.value)
    end)

    it("judges nothing before min_samples accepted steps, and nothing with spike = false", function()
      local opt = small_opt()
      local g = quiet(opt, {spike = {z = 6, window = 50, min_samples = 10}})
      local step = feed(g, opt, 9)
      assert.are.equal("apply", g:_decide(opt, {grad_norm = 1e6, nonfinite = 0, step = step}, 1e6))
      local opt2 = small_opt()
      local g2 = quiet(opt2, {spike = false})
      step = feed(g2, opt2, 50)
      assert.are.equal("apply", g2:_decide(opt2, {grad_norm = 1e6, nonfinite = 0, step = step}, 1e6))
      -- non-finite values are still caught
      assert.are.equal("skip", g2:_decide(opt2, {grad_norm = 0 / 0, nonfinite = 1, step = step}, 1))
    end)

    it("enforces hard ceilings from the first step", function()
      local opt = small_opt()
      local g = quiet(opt, {max_grad_norm = 10, max_loss = 5})
      local evs = {}
      g:on_event(function(e) evs[#evs + 1] = e end)
      assert.are.equal("apply", g:_decide(opt, {grad_norm = 9, nonfinite = 0, step = 1}, 4))
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 11, nonfinite = 0, step = 2}, 4))
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 1, nonfinite = 0, step = 2}, 6))
      assert.are.equal("ceiling", evs[1].kind)
      assert.are.equal("grad_norm", evs[1].metric)
      assert.are.equal(10, evs[1].threshold)
      assert.are.equal("ceiling", evs[2].kind)
      assert.are.equal("loss", evs[2].metric)
      assert.matches("loss 6 above max_loss 5", evs[2].line)
    end)

    it("on_spike = \"error\" raises at once with the event line", function()
      local opt = small_opt()
      local g = quiet(opt, {on_spike = "error"})
      local step = feed(g, opt, 30)
      local ev
      g:on_event(function(e) ev = e end)
      H.assert_error(function() g:_decide(opt, {grad_norm = 1e3, nonfinite = 0, step = step}, 2) end,
        "guard: step 1: grad-norm spike", 'on_spike = "error"')
      assert.are.equal("error", ev.action)
    end)

    it("escalates to error after max_retries events in a row, with a summary", function()
      local opt = small_opt()
      local g = quiet(opt, {max_retries = 2})
      local step = feed(g, opt, 30)
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 1e3, nonfinite = 0, step = step}, 2))
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 4, step = step}, 2))
      local err = H.assert_error(function() g:_decide(opt, {grad_norm = 2e3, nonfinite = 0, step = step}, 2) end,
        "giving up after 3 events in a row (max_retries 2)", "1 non-finite step", "2 grad-norm spikes",
        "2 skipped", "last grad norms", "2000", "last losses")
      assert.is_nil(err:find("\n"), "one line")
      assert.are.equal(3, g.retries)
    end)

    it("a clean stretch of reset_after steps resets the retries", function()
      local opt = small_opt()
      local g = quiet(opt, {max_retries = 1, reset_after = 5})
      local step = feed(g, opt, 30)
      for _ = 1, 4 do
        assert.are.equal("skip", g:_decide(opt, {grad_norm = 1e3, nonfinite = 0, step = step}, 2))
        step = feed(g, opt, 5, step)
        assert.are.equal(0, g.retries)
      end
      -- 4 clean steps are not enough: the second event in a row gives up
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 1e3, nonfinite = 0, step = step}, 2))
      step = feed(g, opt, 4, step)
      H.assert_error(function() g:_decide(opt, {grad_norm = 1e3, nonfinite = 0, step = step}, 2) end,
        "giving up")
    end)

    it("recovers the lr: x1/lr_backoff every recover_after clean steps, up to 1", function()
      local opt = small_opt()
      local g = quiet(opt, {lr_backoff = 0.5, recover_after = 10, max_retries = 5})
      local step = feed(g, opt, 20)
      g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 1, step = step}, 2)
      g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 1, step = step}, 2)
      assert.are.equal(0.25, opt.lr_scale)
      step = feed(g, opt, 9, step)
      assert.are.equal(0.25, opt.lr_scale)
      step = feed(g, opt, 1, step)
      assert.are.equal(0.5, opt.lr_scale)
      step = feed(g, opt, 10, step)
      assert.are.equal(1, opt.lr_scale)
      feed(g, opt, 30, step)
      assert.are.equal(1, opt.lr_scale)
      assert.are.equal(1, g:stats().lr_scale)
    end)

    it("keeps the user's lr_scale as the base and gives it back on remove", function()
      local opt = small_opt()
      opt.lr_scale = 0.8
      local g = quiet(opt, {lr_backoff = 0.5})
      assert.are.equal(0.8, opt.lr_scale)
      g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 1, step = 1}, 2)
      assert.are.equal(0.4, opt.lr_scale)
      g:remove()
      assert.are.equal(0.8, opt.lr_scale)
    end)
  end)

  describe("events", function()
    it("go to on_event listeners (removable), the hooks bus and one stderr line", function()
      local opt = small_opt()
      local g = keel.guard(opt, {spike = {z = 6, window = 50, min_samples = 10}})
      local mine, bus = {}, {}
      local h1 = g:on_event(function(ev) mine[#mine + 1] = ev end)
      local h2 = hooks.on("guard", function(ev) bus[#bus + 1] = ev end)
      local out = capture_stderr(function()
        local step = feed(g, opt, 20)
        g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 2, step = step}, 2)
        h1:remove()
        g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 2, step = step}, 2)
      end)
      h2:remove()
      assert.are.equal(1, #mine)
      assert.are.equal(2, #bus)
      assert.are.equal(mine[1], bus[1])
      local lines = {}
      for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.are.equal(2, #lines)
      assert.are.equal(bus[1].line, lines[1])
      assert.matches("^guard: step 1: 2 non%-finite gradient values", lines[1])
      assert.matches("skipped, lr x0%.5 %(retry 1/3%)", lines[1])
      -- verbose = false: silent
      local opt2 = small_opt()
      local g2 = keel.guard(opt2, {verbose = false})
      out = capture_stderr(function() g2:_decide(opt2, {grad_norm = 0 / 0, nonfinite = 1, step = 1}, 1) end)
      assert.are.equal("", out)
    end)

    it("names the dominating parameter from the model and the first non-finite one", function()
      keel.manual_seed(4)
      local m = nn.Sequential{nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)}
      local opt = keel.optim.SGD(m:parameters(), {lr = 0.1})
      local g = quiet(opt, {model = m})
      assert.are.equal("1.weight", g:param_name(1))
      assert.are.equal("3.bias", g:param_name(4))
      local evs = {}
      g:on_event(function(e) evs[#evs + 1] = e end)
      local step = feed(g, opt, 20)
      g:_decide(opt, {grad_norm = 1e3, nonfinite = 0, step = step, top_param = 3, top_share = 0.9}, 2)
      assert.are.equal("3.weight", evs[1].param)
      assert.are.equal(0.9, evs[1].share)
      assert.matches("%(top 3%.weight, 90%% of the norm%)", evs[1].line)
      -- a real step with a NaN planted in the second layer's weight gradient:
      -- the optimizer (non-finite policy "skip" while guarded) reports it
      F.mse_loss(m(keel.randn(5, 3)), keel.randn(5, 2)):backward()
      keel.no_grad(function() m[3].weight.grad:fill_(0 / 0) end)
      local before = model_bytes(m)
      local r = opt:step()
      same_bytes(before, model_bytes(m), "parameters")
      assert.is_true(r.nonfinite > 0)
      if #evs == 1 then g:_decide(opt, r, 1.0) end   -- an optimizer that does not ask the guard itself
      assert.are.equal(2, #evs)
      assert.are.equal("nonfinite", evs[2].kind)
      assert.are.equal("3.weight", evs[2].param)
      assert.matches("%(first in 3%.weight%)", evs[2].line)
    end)

    it("carries the anomaly detector's line, once", function()
      local stub_event = {line = "anomaly: tanh in rnn.cell produced NaN at step 7 (x.lua:3)"}
      local stub = {anomaly = function() return stub_event end, step_anomaly = function() return stub_event end}
      local prev = rawget(keel, "autograd")
      rawset(keel, "autograd", stub)
      local ok, err = pcall(function()
        local opt = small_opt()
        local g = quiet(opt)
        local evs = {}
        g:on_event(function(e) evs[#evs + 1] = e end)
        g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 1, step = 7}, 1)
        g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 1, step = 8}, 1)
        assert.are.equal(stub_event.line, evs[1].anomaly)
        assert.matches("; anomaly: anomaly: tanh", evs[1].line, 1, true)
        assert.is_nil(evs[2].anomaly)
      end)
      rawset(keel, "autograd", prev)
      assert(ok, err)
    end)
  end)

  describe("telemetry", function()
    it("counts clipped steps, the mean clip coefficient and the top parameter", function()
      local opt = small_opt()
      local g = quiet(opt)
      for i = 1, 8 do
        local clipped = i % 4 == 0
        g:_decide(opt, {grad_norm = 1, nonfinite = 0, step = i, clipped = clipped, clip_coef = clipped and 0.4 or 1,
                        top_param = i <= 6 and 1 or 2, top_share = i <= 6 and 0.6 or 0.9}, 1)
      end
      local s = g:stats()
      assert.are.equal(2, s.clipped)
      assert.are.equal(0.25, s.clip_fraction)
      assert.is_true(math.abs(s.clip_coef_mean - 0.4) < 1e-12)
      assert.are.equal(0.4, s.clip_coef_last)
      assert.are.equal("param1", s.top_param)
      assert.is_true(math.abs(s.top_share - 0.6) < 1e-12)
      assert.are.equal(0.75, s.top_fraction)
      assert.are.equal("guard: no events in 8 steps; clipped 25% of steps (mean coef 0.4); " ..
        "top parameter param1 (60% of the norm)", g:summary())
    end)

    it("summarises events, actions and the back-off", function()
      local opt = small_opt()
      local g = quiet(opt, {max_retries = 10})
      local step = feed(g, opt, 20)
      g:_decide(opt, {grad_norm = 1e3, nonfinite = 0, step = step}, 2)
      g:_decide(opt, {grad_norm = 1e3, nonfinite = 0, step = step}, 2)
      g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 3, step = step}, 2)
      assert.matches("^guard: 1 non%-finite step, 2 grad%-norm spikes: 3 skipped, lr x0%.125; no step clipped$",
        g:summary())
    end)
  end)

  describe("snapshots and rollback", function()
    local function make()
      keel.manual_seed(21)
      local m = nn.Sequential{nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 2)}
      local opt = keel.optim.AdamW(m:parameters(), {lr = 1e-2, clip = keel.clip.global_norm(1.0)})
      return m, opt
    end
    local function train(m, opt, n)
      for _ = 1, n do
        local x = keel.randn(8, 3)
        local loss = F.mse_loss(m(x), keel.randn(8, 2))
        opt:zero_grad()
        loss:backward()
        opt:step()
      end
    end

    it("restores parameters, buffers, optimizer state and RNG byte for byte", function()
      local m, opt = make()
      train(m, opt, 3)
      local g = quiet(opt, {model = m, on_spike = "rollback", keep = 2})
      assert.are.equal(3, g:snapshot())
      local want_m, want_o, want_rng = model_bytes(m), opt_bytes(opt), keel.get_rng_state()
      local counters = opt.counters
      train(m, opt, 4)
      assert.is_false(opt_bytes(opt) == want_o)
      assert.are.equal(3, g:rollback())
      same_bytes(want_m, model_bytes(m), "model")
      assert.are.equal(want_o, opt_bytes(opt))
      assert.are.same(want_rng, keel.get_rng_state())
      assert.are.equal(3, opt.step_count)
      assert.is_true(opt.counters.steps > counters.steps, "the counters keep counting")
      assert.are.equal("skip", opt.nonfinite)
      -- the snapshot stays: a second rollback restores it again
      train(m, opt, 2)
      assert.are.equal(3, g:rollback())
      same_bytes(want_m, model_bytes(m), "model")
      assert.are.equal(want_o, opt_bytes(opt))
    end)

    it("keeps a ring of `keep` snapshots, reuses their buffers, and goes further back on demand", function()
      local m, opt = make()
      local g = quiet(opt, {model = m, on_spike = "rollback", keep = 2})
      train(m, opt, 1)
      g:snapshot()
      train(m, opt, 1)
      g:snapshot()
      local want2 = model_bytes(m)
      local buf = g._ring[1].params[1]
      train(m, opt, 1)
      g:snapshot()   -- drops the oldest (step 1), recycles its buffers
      assert.are.equal(2, #g._ring)
      assert.are.equal(buf, g._ring[2].params[1])
      assert.are.same({2, 3}, {g._ring[1].step, g._ring[2].step})
      train(m, opt, 2)
      assert.are.equal(2, g:rollback(2))
      same_bytes(want2, model_bytes(m), "model")
      assert.are.equal(1, #g._ring, "the newer snapshot is gone")
      assert.are.equal(2, opt.step_count)
      -- far back is clamped to the oldest kept
      assert.are.equal(2, g:rollback(9))
    end)

    it("takes snapshots every snapshot_every accepted steps, before they are applied", function()
      local opt = small_opt()
      local g = quiet(opt, {on_spike = "rollback", snapshot_every = 5, keep = 3})
      feed(g, opt, 12)
      -- steps 1, 6 and 11 took one (nothing applied here: step_count stays 0)
      assert.are.equal(3, #g._ring)
      local g2 = quiet(small_opt(), {on_spike = "skip"})
      feed(g2, g2.opt, 12)
      assert.are.equal(0, #g2._ring, "no snapshots without a rollback action")
    end)

    it("a spike with on_spike = \"rollback\" restores and moves the loader past skip_batches", function()
      local m, opt = make()
      local ds = {x = keel.arange(40):reshape(20, 2)}
      local loader = keel.data.DataLoader(ds, {batch_size = 2})
      local g = quiet(opt, {model = m, on_spike = "rollback", loader = loader, skip_batches = 3,
                            spike = {z = 6, window = 20, min_samples = 5}})
      local step = feed(g, opt, 10)
      local want = model_bytes(m)
      train(m, opt, 2)   -- moves away from the snapshot
      local it = loader:batches()
      it()
      local ev
      g:on_event(function(e) ev = e end)
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 1e4, nonfinite = 0, step = step}, 2))
      assert.are.equal("rollback", ev.action)
      assert.are.equal(0, ev.to_step)
      assert.are.equal(3, ev.skipped_batches)
      assert.are.equal(4, loader:state().cursor)
      same_bytes(want, model_bytes(m), "model")
      assert.matches("rolled back to step 0, skipped 3 batches", ev.line)
      assert.are.same({from = 3, to = 0}, g:stats().last_rollback)
      -- at most to the end of the epoch
      loader:set_state({epoch = 1, cursor = 9, seed = 0})
      g:_decide(opt, {grad_norm = 1e4, nonfinite = 0, step = step}, 2)
      assert.are.equal(1, ev.skipped_batches)
      assert.are.equal(10, loader:state().cursor)
      loader:close()
    end)

    it("without a snapshot yet, a rollback is a skip", function()
      local opt = small_opt()
      local g = quiet(opt, {on_nonfinite = "rollback"})
      local ev
      g:on_event(function(e) ev = e end)
      assert.are.equal("skip", g:_decide(opt, {grad_norm = 0 / 0, nonfinite = 1, step = 1}, 1))
      assert.are.equal("skip", ev.action)
      assert.matches("skipped %(no snapshot yet%)", ev.line)
    end)
  end)

  describe("state", function()
    it("state_dict/load_state_dict carry the windows, counters, back-off and retries", function()
      local opt = small_opt()
      local g = quiet(opt, {max_retries = 5})
      local rnd = H.rng(8)
      local step = feed(g, opt, 30, 1, rnd)
      g:_decide(opt, {grad_norm = 1e3, nonfinite = 0, step = step, clipped = true, clip_coef = 0.3,
                      top_param = 1, top_share = 1}, 2)
      local sd = g:state_dict()
      local kio = require "keel.io"
      sd = kio.json_decode(kio.json_encode(sd))   -- as a checkpoint stores it
      local opt2 = small_opt()
      local g2 = quiet(opt2, {max_retries = 5})
      g2:load_state_dict(sd)
      assert.are.same(g:stats(), g2:stats())
      assert.are.equal(0.5, opt2.lr_scale)
      -- the same inputs get the same decisions from here on
      local rnd1, rnd2 = H.rng(9), H.rng(9)
      for i = 1, 40 do
        local gn = i % 13 == 0 and 40 or math.exp(0.2 * (rnd1() - 0.5))
        local _ = rnd2()
        local a = g:_decide(opt, {grad_norm = gn, nonfinite = 0, step = step + i}, 2)
        local b = g2:_decide(opt2, {grad_norm = gn, nonfinite = 0, step = step + i}, 2)
        assert.are.equal(a, b, "step " .. i)
      end
      assert.are.same(g:state_dict(), g2:state_dict())
      H.assert_error(function() g2:load_state_dict({version = 99}) end, "guard.load_state_dict: state version 99")
      H.assert_error(function() g2:load_state_dict(5) end, "expected a table")
    end)
  end)

  -- {======================================================================
  -- Through opt:step(loss): these need the optimizer's call of
  -- opt._guard:_decide before it applies a step
  -- =======================================================================

  describe("integration", function()
    local function setup_model(seed)
      keel.manual_seed(seed or 31)
      local m = nn.Sequential{nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1)}
      local opt = keel.optim.Adam(m:parameters(), {lr = 1e-2})
      return m, opt
    end
    local function forward(m)
      local x = keel.randn(16, 4)
      return F.mse_loss(m(x), x:sum(2, true))
    end

    it("integration: opt:step(loss) with a planted NaN gradient leaves parameters and optimizer state untouched",
      function()
      local m, opt = setup_model()
      local g = quiet(opt, {model = m})
      for _ = 1, 3 do
        local loss = forward(m)
        opt:zero_grad(); loss:backward(); opt:step(loss)
      end
      local loss = forward(m)
      opt:zero_grad(); loss:backward()
      keel.no_grad(function() m[5].weight.grad:fill_(0 / 0) end)
      local pm, po = model_bytes(m), opt_bytes(opt)
      local evs = {}
      g:on_event(function(e) evs[#evs + 1] = e end)
      local r = opt:step(loss)
      assert.is_false(r.applied)
      assert.are.equal(1, #evs)
      assert.are.equal("nonfinite", evs[1].kind)
      assert.are.equal("5.weight", evs[1].param)
      same_bytes(pm, model_bytes(m), "model")
      assert.are.equal(po, opt_bytes(opt))
      assert.are.equal(3, opt.step_count)
    end)

    it("integration: a spike with the skip policy leaves the parameters untouched", function()
      local m, opt = setup_model()
      local g = quiet(opt, {spike = {z = 6, window = 30, min_samples = 8}})
      for _ = 1, 12 do
        local loss = forward(m)
        opt:zero_grad(); loss:backward()
        assert.is_true(opt:step(loss).applied)
      end
      local loss = forward(m) * 1e4
      opt:zero_grad(); loss:backward()
      local pm, po = model_bytes(m), opt_bytes(opt)
      local r = opt:step(loss)
      assert.is_false(r.applied)
      assert.are.equal(1, g:stats().skipped)
      same_bytes(pm, model_bytes(m), "model")
      assert.are.equal(po, opt_bytes(opt))
    end)

    it("integration: a spike rolls back parameters, buffers, optimizer state and RNG byte for byte", function()
      local m, opt = setup_model()
      local g = quiet(opt, {model = m, on_spike = "rollback", snapshot_every = 4, keep = 2,
                            spike = {z = 6, window = 30, min_samples = 8}})
      local at = {}   -- state before each step, by opt.step_count
      local ev
      g:on_event(function(e) ev = e end)
      for i = 1, 15 do
        local loss = forward(m)
        if i == 15 then loss = loss * 1e4 end
        opt:zero_grad(); loss:backward()
        at[opt.step_count] = {m = model_bytes(m), o = opt_bytes(opt), rng = keel.get_rng_state()}
        local r = opt:step(loss)
        assert.are.equal(i < 15, r.applied)
      end
      assert.are.equal("rollback", ev.action)
      assert.are.equal(12, ev.to_step)   -- snapshots before steps 1, 5, 9, 13: the newest holds 12 steps
      local want = at[ev.to_step]
      same_bytes(want.m, model_bytes(m), "model")
      assert.are.equal(want.o, opt_bytes(opt))
      assert.are.same(want.rng, keel.get_rng_state())
      assert.are.equal(12, opt.step_count)
      assert.are.equal(0.5, opt.lr_scale)
    end)

    it("integration: the lr back-off scales the applied update", function()
      local w = nn.Parameter(keel.tensor({1.0, 2.0}))
      local opt = keel.optim.SGD({w}, {lr = 0.1})
      local g = quiet(opt, {lr_backoff = 0.5})
      local function grad_step(v)
        opt:zero_grad()
        local loss = (w * keel.tensor(v)):sum()
        loss:backward()
        return opt:step(loss)
      end
      grad_step({0 / 0, 1})
      assert.are.equal(0.5, opt.lr_scale)
      local before = H.flat(w)
      local r = grad_step({1, 1})
      assert.is_true(r.applied)
      local after = H.flat(w)
      H.assert_close(after, {before[1] - 0.05, before[2] - 0.05}, {atol = 1e-7, rtol = 0})
      H.assert_close(r.lr, 0.05, {atol = 1e-12, rtol = 0})
      assert.are.equal(1, g:stats().applied)
    end)

    it("integration: max_retries escalates to an error with a summary, the failing step unapplied", function()
      local m, opt = setup_model()
      quiet(opt, {max_retries = 2, spike = {z = 6, window = 30, min_samples = 8}})
      for _ = 1, 10 do
        local loss = forward(m)
        opt:zero_grad(); loss:backward(); opt:step(loss)
      end
      for _ = 1, 2 do
        local loss = forward(m) * 1e4
        opt:zero_grad(); loss:backward()
        assert.is_false(opt:step(loss).applied)
      end
      local loss = forward(m) * 1e4
      opt:zero_grad(); loss:backward()
      local pm = model_bytes(m)
      H.assert_error(function() opt:step(loss) end, "guard: step 11:", "giving up after 3 events in a row",
        "2 skipped", "last grad norms", "last losses")
      assert.are.equal(pm["1.weight"], model_bytes(m)["1.weight"])
      assert.are.equal(10, opt.step_count)
    end)

    it("integration: a loss scaler's overflow is the scaler's business (no event, back-off, retry or window entry)",
      function()
      local m, opt = setup_model()
      local g = quiet(opt, {model = m, max_retries = 1, spike = {z = 6, window = 30, min_samples = 8}})
      local sc = keel.amp.GradScaler{growth_interval = 1000}
      local evs = {}
      g:on_event(function(e) evs[#evs + 1] = e end)
      local function step(plant)
        local loss = forward(m)
        opt:zero_grad()
        sc:scale(loss):backward()
        if plant then keel.no_grad(function() m[5].weight.grad:fill_(plant) end) end
        local r = sc:step(opt, loss)
        sc:update()
        return r
      end
      for _ = 1, 10 do assert.is_true(step().applied) end
      local W = G._window
      local wg, wl = W.values(g._grad), W.values(g._loss)
      local recent = {table.unpack(g:stats().last_grad_norms)}
      local function param_bytes()
        local out = {}
        for name, p in m:named_parameters() do out[name] = bytes(p) end
        return out
      end
      local pm, po = param_bytes(), opt_bytes(opt)
      -- three overflows in a row: more than max_retries events would have been
      for i = 1, 3 do
        local r = step(i == 2 and 0 / 0 or math.huge)
        assert.is_false(r.applied)
        assert.are.equal("overflow", r.reason)
      end
      assert.are.equal(65536 / 8, sc:get_scale())
      same_bytes(pm, param_bytes(), "parameters")
      assert.are.equal(po, opt_bytes(opt))
      assert.are.equal(0, #evs)
      local st = g:stats()
      assert.are.same({0, 0, 0, 1, 3, 10}, {st.events, st.nonfinite, st.retries, st.lr_scale, st.overflow,
                                            st.decisions})
      assert.are.same(wg, W.values(g._grad))
      assert.are.same(wl, W.values(g._loss))
      assert.are.same(recent, st.last_grad_norms)
      assert.matches("3 overflow skips %(loss scaler%)", g:summary())
      assert.matches("no events in 10 steps", g:summary())
      -- and training goes on, judged as before
      assert.is_true(step().applied)
      assert.are.equal(11, g:stats().applied)
      -- the count is part of the guard's state; an older state without it loads
      local sd = g:state_dict()
      assert.are.equal(3, sd.counts.overflow)
      local _, opt2 = setup_model()
      local g2 = quiet(opt2, {spike = {z = 6, window = 30, min_samples = 8}})
      g2:load_state_dict(sd)
      assert.are.equal(3, g2:stats().overflow)
      sd.counts.overflow = nil
      g2:load_state_dict(sd)
      assert.are.equal(0, g2:stats().overflow)
    end)

    it("integration: with a loss scaler the guard judges unscaled grad norms (a growing scale is no spike)", function()
      local m, opt = setup_model()
      local g = quiet(opt, {spike = {z = 6, window = 30, min_samples = 5}})
      local sc = keel.amp.GradScaler{init_scale = 2, growth_interval = 1}   -- doubles every step
      for i = 1, 30 do
        local loss = forward(m)
        opt:zero_grad()
        sc:scale(loss):backward()
        local r = sc:step(opt, loss)
        assert.is_true(r.applied, "step " .. i)
        assert.are.equal(2.0 ^ i, r.scale)
        sc:update()
        assert.is_true(r.grad_norm < 1e3)
      end
      assert.are.equal(0, g:stats().events)
    end)

    it("integration: after remove(), a NaN gradient raises again (the policy is back to error)", function()
      local m, opt = setup_model()
      local g = quiet(opt)
      g:remove()
      local loss = forward(m)
      opt:zero_grad(); loss:backward()
      keel.no_grad(function() m[1].bias.grad:fill_(0 / 0) end)
      H.assert_error(function() opt:step(loss) end, "non-finite")
    end)
  end)

  -- }======================================================================

  describe("scripts", function()
    local BIN = os.getenv("KEEL_BIN")
    it("integration: gpt.lua trains with the guard and prints its summary", function()
      if not BIN then pending("KEEL_BIN is not set (tools/test.sh sets it)") return end
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute(("mkdir -p %q"):format(dir)))
      local f = assert(io.open(dir .. "/t.txt", "w"))
      for i = 1, 30 do f:write(("line %d: the quick brown fox jumps over the lazy dog.\n"):format(i)) end
      f:close()
      local cmd = ("%q scripts/gpt.lua --data %q --steps 4 --block 16 --batch 4 --dim 16 --heads 2 --layers 1 " ..
        "--warmup 1 --log-every 2 --sample 5 --out %q 2>&1"):format(BIN, dir .. "/t.txt", dir .. "/g.safetensors")
      local h = io.popen(cmd)
      local out = h:read("a")
      local ok = h:close()
      os.execute(("rm -rf %q"):format(dir))
      assert.is_true(ok, out)
      assert.matches("\nguard: no events in 4 steps", out)
    end)
  end)
end)
