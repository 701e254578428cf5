-- monitor_spec.lua: keel.monitor (JSONL lines, when it records, what it
-- records, events, lifecycle) and the C histogram it uses. Most tests emit
-- "step" events themselves with a fake optimizer; the last one drives a real
-- optimizer and needs optim.lua's "step" event.
local H = require "helper"
local keel = H.keel
local core = require "keel.core"
local S = core._summary
local hooks = require "keel.hooks"
local monitor = require "keel.monitor"

-- {======================================================================
-- A strict JSON parser (RFC 8259): no NaN/Infinity literals, no trailing
-- commas, no control characters in strings, valid UTF-8, one value.
-- =======================================================================

local function strict_json(s)
  assert(utf8.len(s), "not valid UTF-8")
  local pos = 1
  local function fail(what) error(("strict json: %s at byte %d of %s"):format(what, pos, s), 0) end
  local function ws() pos = s:find("[^ \t\r\n]", pos) or #s + 1 end
  local value
  local function str()
    pos = pos + 1
    local out = {}
    while true do
      local c = s:sub(pos, pos)
      if c == "" then fail("unterminated string") end
      if c == '"' then pos = pos + 1 return table.concat(out) end
      if c:byte() < 0x20 then fail("control character in a string") end
      if c == "\\" then
        local e = s:sub(pos + 1, pos + 1)
        local map = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t"}
        if map[e] then out[#out + 1] = map[e] pos = pos + 2
        elseif e == "u" then
          local hex = s:sub(pos + 2, pos + 5)
          if not hex:match("^%x%x%x%x$") then fail("bad \\u escape") end
          out[#out + 1] = utf8.char(tonumber(hex, 16))
          pos = pos + 6
        else fail("bad escape") end
      else
        out[#out + 1] = c
        pos = pos + 1
      end
    end
  end
  value = function()
    ws()
    local c = s:sub(pos, pos)
    if c == "{" then
      local obj = {}
      pos = pos + 1
      ws()
      if s:sub(pos, pos) == "}" then pos = pos + 1 return obj end
      while true do
        ws()
        if s:sub(pos, pos) ~= '"' then fail("expected a string key") end
        local k = str()
        ws()
        if s:sub(pos, pos) ~= ":" then fail("expected ':'") end
        pos = pos + 1
        obj[k] = value()
        ws()
        local d = s:sub(pos, pos)
        pos = pos + 1
        if d == "}" then return obj end
        if d ~= "," then fail("expected ',' or '}'") end
      end
    elseif c == "[" then
      local arr = {}
      pos = pos + 1
      ws()
      if s:sub(pos, pos) == "]" then pos = pos + 1 return arr end
      while true do
        arr[#arr + 1] = value()
        ws()
        local d = s:sub(pos, pos)
        pos = pos + 1
        if d == "]" then return arr end
        if d ~= "," then fail("expected ',' or ']'") end
      end
    elseif c == '"' then return str()
    elseif s:sub(pos, pos + 3) == "true" then pos = pos + 4 return true
    elseif s:sub(pos, pos + 4) == "false" then pos = pos + 5 return false
    elseif s:sub(pos, pos + 3) == "null" then pos = pos + 4 return nil
    end
    local num = s:match("^-?0[.eE]?", pos) and s:match("^-?0%.?%d*[eE]?[-+]?%d*", pos)
      or s:match("^-?[1-9]%d*%.?%d*[eE]?[-+]?%d*", pos)
    if not num then fail("unexpected character") end
    -- the grammar: int [frac] [exp], where frac and exp need digits
    if not (num:match("^-?%d+$") or num:match("^-?%d+%.%d+$") or num:match("^-?%d+[eE][-+]?%d+$")
            or num:match("^-?%d+%.%d+[eE][-+]?%d+$")) then fail("bad number " .. num) end
    pos = pos + #num
    return tonumber(num)
  end
  local v = value()
  ws()
  if pos <= #s then fail("trailing characters") end
  return v
end

-- }======================================================================

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(S.mkdirs(d))
  return d
end

local function lines(path)
  local out = {}
  local f = io.open(path, "r")
  if not f then return out end
  for l in f:lines() do out[#out + 1] = l end
  f:close()
  return out
end

local function records(path, kind)
  local out = {}
  for _, l in ipairs(lines(path)) do
    local r = strict_json(l)
    if kind == nil or r.type == kind then out[#out + 1] = r end
  end
  return out
end

-- A fake optimizer: the parameters and the grad_stats list of the contract.
local function fake_opt(params)
  local opt = {param_groups = {{params = params}}, stats_calls = 0}
  function opt:grad_stats()
    self.stats_calls = self.stats_calls + 1
    local out = {}
    for i, p in ipairs(params) do
      out[i] = {numel = p:numel(), nan = 0, inf = 0, zeros = 0, sum = 0.5, sumsq = (0.1 * i) ^ 2, sum_abs = 1,
                max_abs = 0.05 * i, norm = 0.1 * i, w_sumsq = i * i, weight_norm = i, update_sumsq = 1e-6,
                update_ratio = 1e-3 * i}
    end
    return out
  end
  return opt
end

local function report(step, extra)
  local r = {applied = true, step = step, grad_norm = 1.5, clip_coef = 1, clipped = false, lr = 0.01, nonfinite = 0,
             n_updated = 2}
  for k, v in pairs(extra or {}) do r[k] = v end
  return r
end

describe("keel.core._summary.histogram", function()
  -- reference: uniform bins over [lo, hi], bucket = floor((x - lo) / width), hi in the last
  local function ref(vals, bins, lo, hi)
    local counts, n, sum, sumsq, mn, mx, nan, inf = {}, 0, 0, 0, math.huge, -math.huge, 0, 0
    for i = 1, bins do counts[i] = 0 end
    for _, v in ipairs(vals) do
      if v ~= v then nan = nan + 1
      elseif v == math.huge or v == -math.huge then inf = inf + 1
      else
        n, sum, sumsq = n + 1, sum + v, sumsq + v * v
        mn, mx = math.min(mn, v), math.max(mx, v)
      end
    end
    lo, hi = lo or mn, hi or mx
    for _, v in ipairs(vals) do
      if v == v and v ~= math.huge and v ~= -math.huge and v >= lo and v <= hi then
        local b = math.floor((v - lo) / (hi - lo) * bins) + 1
        if b > bins then b = bins end
        counts[b] = counts[b] + 1
      end
    end
    return {counts = counts, count = n, sum = sum, sumsq = sumsq, min = mn, max = mx, nan = nan, inf = inf}
  end

  it("equals a reference computation over the data's range (float64, with NaN and Inf)", function()
    local vals = H.values(1000, -5, 7, 3)
    vals[10], vals[20], vals[30] = 0 / 0, math.huge, -math.huge
    local t = keel.tensor(vals, {dtype = "float64"})
    local h = S.histogram(t, {bins = 17})
    local e = ref(vals, 17)
    assert.are.same(e.counts, h.counts)
    assert.are.equal(997, h.count)
    assert.are.equal(1, h.nan)
    assert.are.equal(2, h.inf)
    assert.are.equal(e.min, h.min)
    assert.are.equal(e.max, h.max)
    H.assert_close(h.sum, e.sum, 1e-9)
    H.assert_close(h.sumsq, e.sumsq, 1e-9)
    assert.are.equal(18, #h.edges)
    assert.are.equal(e.min, h.edges[1])
    assert.are.equal(e.max, h.edges[18])
  end)

  it("float32 and a non-contiguous view, a given range with values outside it", function()
    local vals = H.values(600, -2, 2, 5)
    local t = keel.tensor(H.nest(vals, {20, 30})):t()   -- float32, transposed view
    local flat32 = {}
    for i, v in ipairs(vals) do flat32[i] = string.unpack("<f", string.pack("<f", v)) end
    local h = S.histogram(t, {bins = 8, range = {-1, 1}})
    local e = ref(flat32, 8, -1, 1)
    assert.are.same(e.counts, h.counts)
    local inside = 0
    for _, c in ipairs(h.counts) do inside = inside + c end
    local below, above = 0, 0
    for _, v in ipairs(flat32) do if v < -1 then below = below + 1 elseif v > 1 then above = above + 1 end end
    assert.are.equal(below, h.below)
    assert.are.equal(above, h.above)
    assert.are.equal(600, inside + below + above)
  end)

  it("given edges: e[i] <= x < e[i+1], the last edge closed", function()
    local t = keel.tensor{0, 1, 1.5, 2, 2.5, 3, 4, -1, 5}
    local h = S.histogram(t, {edges = {0, 1, 2, 4}})
    assert.are.same({1, 2, 4}, h.counts)
    assert.are.equal(1, h.below)
    assert.are.equal(1, h.above)
  end)

  it("all-equal and all-NaN tensors, int64", function()
    local h = S.histogram(keel.zeros{5}, {bins = 4})
    assert.are.same({5, 0, 0, 0}, h.counts)
    assert.are.equal(0, h.min)
    assert.are.equal(0, h.max)
    h = S.histogram(keel.full({3}, 0 / 0), {bins = 2})
    assert.are.equal(0, h.count)
    assert.are.equal(3, h.nan)
    h = S.histogram(keel.tensor({1, 2, 3, 4}, {dtype = "int64"}), {bins = 3})
    assert.are.same({1, 1, 2}, h.counts)
  end)

  it("rejects bad options", function()
    local t = keel.randn{4}
    assert.has_error(function() S.histogram(t, {bins = 0}) end)
    assert.has_error(function() S.histogram(t, {edges = {1, 1, 2}}) end)
    assert.has_error(function() S.histogram(t, {edges = {1}}) end)
    assert.has_error(function() S.histogram(t, {range = {2, 1}}) end)
    assert.has_error(function() S.histogram(t, {edges = {0, 1}, range = {0, 1}}) end)
    assert.has_error(function() S.histogram("x") end)
  end)
end)

describe("keel.monitor", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function()
    local m = monitor.current()
    if m then m:close() end
    os.execute("rm -rf " .. dir)
  end)

  it("records at every `every`-th step only, and does no per-parameter work in between", function()
    local p1, p2 = keel.randn{2, 3}, keel.randn{3}
    local opt = fake_opt({p1, p2})
    local m = monitor.log(dir, {every = 3, tensorboard = false})
    for s = 1, 10 do
      hooks.emit("step", opt, report(s), 2 / s)
      assert.are.equal(s // 3, opt.stats_calls, "grad_stats called only on recorded steps")
    end
    m:close()
    local recs = records(dir .. "/metrics.jsonl", "step")
    assert.are.equal(3, #recs)
    assert.are.same({3, 6, 9}, {recs[1].step, recs[2].step, recs[3].step})
    local r = recs[2]
    H.assert_close(r.loss, 2 / 6)
    H.assert_close(r.loss_avg, (2 / 4 + 2 / 5 + 2 / 6) / 3)
    assert.are.equal(0.01, r.lr)
    assert.are.equal(1.5, r.grad_norm)
    assert.are.equal(1, r.clip_coef)
    assert.are.equal(false, r.clipped)
    assert.are.equal(true, r.applied)
    assert.are.equal(3, r.steps)
    assert.are.equal(0, r.skipped)
    -- per parameter, without a model: param<i>
    H.assert_close(r.params.param1.grad_norm, 0.1)
    H.assert_close(r.params.param2.grad_norm, 0.2)
    assert.are.equal(2, r.params.param2.weight_norm)
    H.assert_close(r.params.param2.update_ratio, 2e-3)
    H.assert_close(r.params.param1.max_abs, 0.05)
    assert.are.equal(0, r.params.param1.nonfinite)
  end)

  it("names parameters from the model and follows the first optimizer only", function()
    local nn = keel.nn
    local model = nn.Sequential {nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)}
    local params = {}
    for _, p in model:named_parameters() do params[#params + 1] = p end
    local opt, other = fake_opt(params), fake_opt({keel.randn{2}})
    local m = monitor.log(dir, {every = 1, model = model, tensorboard = false})
    hooks.emit("step", opt, report(1), 1.0)
    hooks.emit("step", other, report(1), 9.0)
    hooks.emit("step", opt, report(2), 0.5)
    m:close()
    local recs = records(dir .. "/metrics.jsonl", "step")
    assert.are.equal(2, #recs)
    assert.are.equal(0.5, recs[2].loss)
    local names = {}
    for k in pairs(recs[1].params) do names[#names + 1] = k end
    table.sort(names)
    assert.are.same({"1.bias", "1.weight", "3.bias", "3.weight"}, names)
    -- the order in the line is the parameter order
    local line = lines(dir .. "/metrics.jsonl")[1]
    assert.truthy(line:find('"1%.weight".*"1%.bias".*"3%.weight".*"3%.bias"'))
  end)

  it("writes strict JSON for NaN and Inf, odd strings, skips and events", function()
    local opt = fake_opt({keel.randn{2}})
    local m = monitor.log(dir, {every = 2, tensorboard = false})
    hooks.emit("step", opt, report(1), 1.0)
    hooks.emit("step", opt, report(2, {grad_norm = 0 / 0, clip_coef = math.huge}), -math.huge)
    hooks.emit("step", opt, report(2, {applied = false, reason = "nonfinite", grad_norm = math.huge,
                                       nonfinite = 7}), 0 / 0)
    hooks.emit("guard", {kind = "spike", step = 3, action = "skip", z = 0 / 0, line = 'tab\there "quoted" \1 \\',
                         shapes = {{2, 3}, {4}}, fn = print})
    hooks.emit("anomaly", {phase = "backward", op = "tanh", module = "rnn.cell", step = 3, nan = 2, inf = 0,
                           line = "bytes \255\254 not UTF-8", where = "x.lua:1"})
    m:scalar("test/accuracy", 0.9)
    m:scalar("eval/loss", keel.tensor(0.25), 10)
    m:close()
    local all = lines(dir .. "/metrics.jsonl")
    assert.is_true(#all >= 6)
    for _, l in ipairs(all) do
      assert.is_false(l:find("NaN[,}]") ~= nil and not l:find('"NaN"'))
      local ok, err = pcall(strict_json, l)
      assert.is_true(ok, err)
    end
    local step = records(dir .. "/metrics.jsonl", "step")[1]
    assert.are.equal(2, step.step)
    assert.are.equal("NaN", step.grad_norm)
    assert.are.equal("Infinity", step.clip_coef)
    assert.are.equal("-Infinity", step.loss)
    local skip = records(dir .. "/metrics.jsonl", "skip")[1]
    assert.are.equal(3, skip.step)
    assert.are.equal("nonfinite", skip.reason)
    assert.are.equal("Infinity", skip.grad_norm)
    assert.are.equal(7, skip.nonfinite)
    local guard = records(dir .. "/metrics.jsonl", "guard")[1]
    -- after three opt:step() calls: the step in progress is the 4th; the
    -- guard's own number (it counts applied steps) is kept as event_step
    assert.are.equal(4, guard.step)
    assert.are.equal(3, guard.event_step)
    assert.are.equal("skip", guard.action)
    assert.are.equal("NaN", guard.z)
    assert.are.equal('tab\there "quoted" \1 \\', guard.line)
    assert.are.same({{2, 3}, {4}}, guard.shapes)
    assert.is_nil(guard.fn)
    local an = records(dir .. "/metrics.jsonl", "anomaly")[1]
    assert.are.equal(4, an.step)
    assert.are.equal("tanh", an.op)
    assert.are.equal("rnn.cell", an.module)
    local sc = records(dir .. "/metrics.jsonl", "scalar")
    assert.are.equal("test/accuracy", sc[1].tag)
    assert.are.equal(0.9, sc[1].value)
    assert.are.equal(3, sc[1].step)   -- the last step seen
    assert.are.equal(10, sc[2].step)
    assert.are.equal(0.25, sc[2].value)
  end)

  it("numbers an event before any step with the event's own step", function()
    local m = monitor.log(dir, {every = 1, tensorboard = false})
    hooks.emit("anomaly", {phase = "forward", op = "exp", step = 12, line = "anomaly"})
    m:close()
    local an = records(dir .. "/metrics.jsonl", "anomaly")[1]
    assert.are.equal(12, an.step)
    assert.is_nil(an.event_step)
  end)

  it("counts skipped and clipped steps between records, and the total", function()
    local opt = fake_opt({keel.randn{2}})
    local m = monitor.log(dir, {every = 4, tensorboard = false})
    -- r.step counts applied steps: it stays while steps are skipped
    hooks.emit("step", opt, report(1, {clipped = true}))
    hooks.emit("step", opt, report(1, {applied = false, reason = "guard"}))
    hooks.emit("step", opt, report(2, {clipped = true}))
    hooks.emit("step", opt, report(3))
    hooks.emit("step", opt, report(3, {applied = false, reason = "guard"}))
    hooks.emit("step", opt, report(4))
    hooks.emit("step", opt, report(5))
    hooks.emit("step", opt, report(6))
    m:close()
    local recs = records(dir .. "/metrics.jsonl", "step")
    assert.are.equal(2, #recs)
    assert.are.equal(4, recs[1].step)
    assert.are.equal(1, recs[1].skipped)
    assert.are.equal(0.5, recs[1].clipped_frac)
    assert.are.equal(1, recs[2].skipped)
    assert.are.equal(2, recs[2].skipped_total)
    assert.are.equal(0, recs[2].clipped_frac)
    assert.is_nil(recs[1].loss)   -- no loss given
    assert.are.equal(2, #records(dir .. "/metrics.jsonl", "skip"))
  end)

  it("logs the loss scale of keel.amp steps and their overflow skips", function()
    local w = keel.nn.Parameter(keel.tensor({1.0, 2.0}))
    local opt = keel.optim.SGD({w}, {lr = 0.1})
    local sc = keel.amp.GradScaler{init_scale = 1024}
    local m = monitor.log(dir, {every = 1, tensorboard = false})
    for i = 1, 3 do
      opt:zero_grad()
      local loss = (w * w):sum()
      sc:scale(loss):backward()
      if i == 2 then keel.no_grad(function() w.grad[1] = math.huge end) end
      sc:step(opt, loss)
      sc:update()
    end
    opt:zero_grad()
    ;(w * w):sum():backward()
    opt:step()   -- without the scaler: no scale
    m:close()
    local recs = records(dir .. "/metrics.jsonl", "step")
    assert.are.equal(4, #recs)
    assert.are.same({1024, 1024, 512}, {recs[1].scale, recs[2].scale, recs[3].scale})
    assert.is_nil(recs[4].scale)
    assert.are.equal("overflow", recs[2].reason)
    local skips = records(dir .. "/metrics.jsonl", "skip")
    assert.are.equal(1, #skips)
    assert.are.equal("overflow", skips[1].reason)
    assert.are.equal(1024, skips[1].scale)
    assert.are.equal(2, skips[1].step)
  end)

  it("continues the step count of a resumed optimizer", function()
    local opt = fake_opt({keel.randn{2}})
    local m = monitor.log(dir, {every = 5, tensorboard = false})
    for s = 101, 110 do hooks.emit("step", opt, report(s), 1) end
    m:close()
    local recs = records(dir .. "/metrics.jsonl", "step")
    assert.are.same({105, 110}, {recs[1].step, recs[2].step})
  end)

  it("computes histograms only every hist_every steps", function()
    local p = keel.randn{4, 4}
    p.grad = keel.randn{4, 4}
    local opt = fake_opt({p})
    local real, calls = S.histogram, 0
    S.histogram = function(...) calls = calls + 1 return real(...) end
    local ok, err = pcall(function()
      local m = monitor.log(dir, {every = 2, hist_every = 6, jsonl = false})
      for s = 1, 12 do hooks.emit("step", opt, report(s), 1) end
      m:close()
    end)
    S.histogram = real
    assert.is_true(ok, err)
    assert.are.equal(4, calls)   -- steps 6 and 12: weight and gradient
    calls = 0
    S.histogram = function(...) calls = calls + 1 return real(...) end
    ok, err = pcall(function()
      local m = monitor.log(dir, {every = 2, histograms = false})
      for s = 1, 40 do hooks.emit("step", opt, report(s), 1) end
      m:close()
    end)
    S.histogram = real
    assert.is_true(ok, err)
    assert.are.equal(0, calls)
  end)

  it("flushes every flush_every records, and at flush() and close()", function()
    local opt = fake_opt({keel.randn{2}})
    local m = monitor.log(dir, {every = 1, flush_every = 3, flush_secs = 1e9, tensorboard = false})
    local path = dir .. "/metrics.jsonl"
    hooks.emit("step", opt, report(1), 1)
    hooks.emit("step", opt, report(2), 1)
    hooks.emit("step", opt, report(3), 1)
    assert.are.equal(3, #lines(path))
    hooks.emit("step", opt, report(4), 1)
    m:flush()
    assert.are.equal(4, #lines(path))
    hooks.emit("step", opt, report(5), 1)
    m:close()
    assert.are.equal(5, #lines(path))
    -- closed: no longer subscribed
    hooks.emit("step", opt, report(6), 1)
    assert.are.equal(5, #lines(path))
    m:close()   -- a second close does nothing
    assert.has_error(function() m:scalar("x", 1) end, "monitor.scalar: the monitor is closed")
  end)

  it("a second log() closes the first default monitor; new() monitors are independent; <close>", function()
    local opt = fake_opt({keel.randn{2}})
    local dir2 = dir .. "/second"
    local a = monitor.log(dir, {every = 1, tensorboard = false})
    local b = monitor.new(dir .. "/extra", {every = 1, tensorboard = false})
    hooks.emit("step", opt, report(1), 1)
    local c = monitor.log(dir2, {every = 1, tensorboard = false})
    assert.are.equal(c, monitor.current())
    hooks.emit("step", opt, report(2), 1)
    c:close()
    b:close()
    assert.is_nil(monitor.current())
    assert.are.equal(1, #lines(dir .. "/metrics.jsonl"))
    assert.are.equal(2, #lines(dir .. "/extra/metrics.jsonl"))
    assert.are.equal(1, #lines(dir2 .. "/metrics.jsonl"))
    assert.truthy(tostring(a):find("closed"))
    do
      local m <close> = monitor.new(dir .. "/scoped", {every = 1, tensorboard = false})
      hooks.emit("step", opt, report(3), 1)
    end
    hooks.emit("step", opt, report(4), 1)
    assert.are.equal(1, #lines(dir .. "/scoped/metrics.jsonl"))
    -- appends: a resumed run continues the same file
    local d = monitor.log(dir, {every = 1, tensorboard = false})
    hooks.emit("step", opt, report(9), 1)
    d:close()
    assert.are.equal(2, #lines(dir .. "/metrics.jsonl"))
  end)

  it("a monitor nobody holds is collected, flushing its lines", function()
    local opt = fake_opt({keel.randn{2}})
    local path = dir .. "/gc/metrics.jsonl"
    do
      local m = monitor.new(dir .. "/gc", {every = 1, tensorboard = false, flush_every = 100, flush_secs = 1e9})
      hooks.emit("step", opt, report(1), 1)
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal(1, #lines(path))
    hooks.emit("step", opt, report(2), 1)   -- its listener is gone or inert
    assert.are.equal(1, #lines(path))
  end)

  it("drives a progress bar at every step and prints a line per record when asked", function()
    local out = {parts = {}}
    function out:write(...) for i = 1, select("#", ...) do self.parts[#self.parts + 1] = (select(i, ...)) end end
    local opt = fake_opt({keel.randn{2}})
    local bar_out = {parts = {}, write = out.write}
    local m = monitor.log(dir, {every = 2, tensorboard = false, print = true, out = out,
                                progress = {total = 4, out = bar_out, tty = false, every = 1}})
    for s = 1, 4 do hooks.emit("step", opt, report(s), 1 / s) end
    m:close()
    local printed = table.concat(out.parts)
    assert.truthy(printed:find("^step 2 loss 0%.5 lr 0%.01 grad_norm 1%.5\nstep 4 loss 0%.25"), printed)
    local bar = table.concat(bar_out.parts)
    assert.truthy(bar:find("1/4 %(25%%%) loss 1 gnorm 1%.5 lr 1%.00e%-02"), bar)
    assert.truthy(bar:find("4/4 %(100%%%) loss 0%.25"), bar)
    assert.is_nil(bar:find("\r", 1, true))
  end)

  it("checks its options", function()
    assert.has_error(function() monitor.log(42) end,
      "monitor.log: argument #1: expected a run directory (string), got number")
    assert.has_error(function() monitor.log(dir, {every = 0}) end,
      "monitor.log: option 'every': expected an integer >= 1, got 0")
    assert.has_error(function() monitor.log(dir, {evry = 3}) end, "monitor.log: unknown option 'evry'")
    assert.has_error(function() monitor.log(dir, {model = 3}) end,
      "monitor.log: option 'model': expected a keel.nn module, got number")
    local m = monitor.log(dir, {tensorboard = false})
    assert.has_error(function() m:scalar(nil, 1) end)
    assert.has_error(function() m:scalar("x", "y") end)
    assert.has_error(function() m:scalar("x", 1, 1.5) end)
    m:close()
    assert.has_error(function() monitor.scalar("x", 1) end,
      "monitor.scalar: no monitor: call keel.monitor.log(run_dir) first")
  end)

  -- End to end with the real optimizer: passes once optim.lua emits
  -- hooks "step" at the end of opt:step() (issue 4 contract).
  it("records a real optimizer's steps (needs optim's step event)", function()
    local nn = keel.nn
    keel.manual_seed(1)
    local model = nn.Sequential {nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)}
    local opt = keel.optim.SGD(model:parameters(), {lr = 0.05, clip = keel.clip.global_norm(1.0)})
    local m = monitor.log(dir, {every = 2, hist_every = 4, model = model})
    local x, y = keel.randn{16, 4}, keel.randn{16, 1}
    for _ = 1, 6 do
      local loss = (model(x) - y):pow(2):mean()
      opt:zero_grad()
      loss:backward()
      opt:step(loss)
    end
    m:close()
    local recs = records(dir .. "/metrics.jsonl", "step")
    assert.is_true(#recs > 0, "no step event from opt:step(): optim.lua does not emit hooks \"step\" yet")
    assert.are.same({2, 4, 6}, {recs[1].step, recs[2].step, recs[3] and recs[3].step})
    local r = recs[3]
    assert.is_number(r.loss)
    assert.is_number(r.grad_norm)
    assert.are.equal(0.05, r.lr)
    for _, name in ipairs {"1.weight", "1.bias", "3.weight", "3.bias"} do
      local p = r.params[name]
      assert.truthy(p, "no stats for " .. name)
      assert.is_true(p.grad_norm > 0)
      assert.is_true(p.weight_norm > 0)
      assert.is_true(type(p.update_ratio) == "number" and p.update_ratio > 0)
    end
  end)
end)
