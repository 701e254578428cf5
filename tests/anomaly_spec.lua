-- anomaly_spec.lua: keel.autograd.detect_anomaly. A NaN or Inf planted in
-- a chosen layer is named (op, module path, input shapes, step, creation
-- line) in forward and in backward; modes error / warn / record; a failed
-- backward leaves every .grad as it was; off, nothing is recorded; sites
-- are interned (bounded by call sites, not by ops).
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local hooks = require "keel.hooks"
local ag = keel.autograd

local SRC = debug.getinfo(1, "S").short_src
-- line of the caller: `f(x); L.x = here()` on one line marks where f ran
local function here() return debug.getinfo(2, "l").currentline end
local L = {}

-- The step being computed follows optim's "step" events; emitted here when
-- this optim.lua does not emit it yet.
local function opt_step(opt)
  local seen = false
  local h = hooks.on("step", function() seen = true end)
  local r = opt:step()
  h:remove()
  if not seen then hooks.emit("step", opt, r, nil) end
  return r
end

-- Net: body = Sequential{Linear(3,4), Tanh, Linear(4,2)}, head = Linear(2,1)
local Net = nn.Module:extend("AnomalyNet")
function Net:init()
  self.body = nn.Sequential{nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)}
  self.head = nn.Linear(2, 1)
end
function Net:forward(x)
  local h = self.body(x); L.body = here()
  return self.head(h)
end

-- A module whose forward takes the log of its input (NaN for negatives)
-- and one that takes the square root (infinite gradient at 0).
local Log = nn.Module:extend("LogLayer")
function Log:init() end
function Log:forward(x) local y = x:log(); L.log = here(); return y end
local Sqrt = nn.Module:extend("SqrtLayer")
function Sqrt:init() end
function Sqrt:forward(x) local y = x:sqrt(); L.sqrt = here(); return y end

local function fresh()
  ag.detect_anomaly(false)
  ag.clear_anomaly()
  ag.set_step(nil)
end

local function record(fn)
  local events = {}
  local h = hooks.on("anomaly", function(ev) events[#events + 1] = ev end)
  local ok, err = pcall(fn)
  h:remove()
  return events, ok, err
end

describe("detect_anomaly options", function()
  before_each(fresh)
  after_each(fresh)

  it("turns on and off, and reports the mode", function()
    assert.is_false(ag.is_anomaly_enabled())
    assert.is_nil(ag.anomaly_mode())
    ag.detect_anomaly(true)
    assert.is_true(ag.is_anomaly_enabled())
    assert.are.same({"error", false}, {ag.anomaly_mode()})
    ag.detect_anomaly(true, {mode = "record", full = true})
    assert.are.same({"record", true}, {ag.anomaly_mode()})
    assert.is_function(hooks.scope_enter)
    ag.detect_anomaly(false)
    assert.is_false(ag.is_anomaly_enabled())
    assert.is_nil(hooks.scope_enter)
    assert.is_nil(hooks.scope_leave)
  end)

  it("rejects bad arguments with a message naming them", function()
    assert.has_error(function() ag.detect_anomaly("yes") end,
      "detect_anomaly: argument #1: expected a boolean, got string")
    assert.has_error(function() ag.detect_anomaly(true, {mode = "loud"}) end,
      'detect_anomaly: option \'mode\': expected "error", "warn" or "record", got "loud"')
    assert.has_error(function() ag.detect_anomaly(true, {moed = "warn"}) end,
      "detect_anomaly: unknown option 'moed' (expected mode, full)")
    assert.has_error(function() ag.detect_anomaly(true, {full = 1}) end,
      "detect_anomaly: option 'full': expected a boolean, got number")
    assert.has_error(function() ag.detect_anomaly(true, nil, 5) end,
      "detect_anomaly: argument #3: expected a function, got number")
    assert.is_false(ag.is_anomaly_enabled())
  end)

  it("runs a function with detection on and puts the old setting back, also on error", function()
    local a, b = ag.detect_anomaly(true, {mode = "record"}, function()
      assert.is_true(ag.is_anomaly_enabled())
      return 1, 2
    end)
    assert.are.same({1, 2}, {a, b})
    assert.is_false(ag.is_anomaly_enabled())
    ag.detect_anomaly(true, {mode = "warn"})
    assert.has_error(function()
      ag.detect_anomaly(true, {mode = "record"}, function() error("inner", 0) end)
    end, "inner")
    assert.are.same({"warn", false}, {ag.anomaly_mode()})
    ag.detect_anomaly(false, function() assert.is_false(ag.is_anomaly_enabled()) end)
    assert.is_true(ag.is_anomaly_enabled())
  end)
end)

describe("detection off", function()
  after_each(fresh)

  it("records no event and stamps no site", function()
    local x = keel.tensor({-1, 2}):requires_grad_()
    local events = record(function()
      local y = x:log()
      y:sum():backward()
      assert.is_nil(ag._site_of(y))
    end)
    assert.are.equal(0, #events)
    assert.is_nil(ag.anomaly())
  end)
end)

describe("forward", function()
  after_each(fresh)

  it("names the op, module path, shapes, step and line of a planted overflow", function()
    keel.manual_seed(3)
    local net = Net()
    local opt = keel.optim.SGD(net:parameters(), {lr = 0.01})
    local x = keel.randn({5, 3})
    ag.detect_anomaly(true, {mode = "record"})
    for _ = 1, 3 do
      local loss = net(x):sum()
      opt:zero_grad()
      loss:backward()
      opt_step(opt)
    end
    assert.is_nil(ag.anomaly())
    -- the last layer of the body now overflows: finite inputs, Inf output.
    -- Its inputs are made positive (tanh(1) everywhere) so that every
    -- product is, and any summation order overflows to +Inf: with mixed
    -- signs the Inf/NaN split of a row depends on the order the device sums
    -- in (Inf - Inf), which is no business of anomaly detection.
    keel.no_grad(function()
      net.body[1].weight:zero_()
      net.body[1].bias:fill_(1)
      net.body[3].weight:fill_(3e38)
    end)
    local events = record(function() net(x * 100) end)
    assert.are.equal(1, #events)
    local ev = ag.anomaly()
    assert.are.equal(events[1], ev)
    assert.are.equal("forward", ev.phase)
    assert.are.equal("matmul", ev.op)
    assert.are.equal("op", ev.cause)
    assert.are.equal("body.3", ev.module)
    assert.are.same({{5, 4}, {4, 2}}, ev.shapes)
    assert.are.equal(4, ev.step)   -- three steps done: the fourth is being computed
    assert.are.equal(SRC .. ":" .. L.body, ev.where)
    assert.are.equal(10, ev.inf)
    assert.are.equal(0, ev.nan)
    assert.are.equal(("anomaly: step 4, forward: matmul in body.3 (inputs [5,4], [4,2]) produced 10 Inf, "
      .. "0 NaN from finite inputs; created at %s:%d"):format(SRC, L.body), ev.line)
  end)

  it("names the first op only: later ops, and their backward, see a non-finite input", function()
    local net = nn.Sequential{Log(), nn.Linear(3, 2), nn.Tanh()}
    ag.detect_anomaly(true, {mode = "record"})
    local x = keel.tensor({{1, -2, 3}}):requires_grad_()
    local events = record(function() net(x):sum():backward() end)
    assert.are.equal(1, #events)
    local ev = events[1]
    assert.are.equal("log", ev.op)
    assert.are.equal("1", ev.module)
    assert.are.equal(SRC .. ":" .. L.log, ev.where)
    assert.are.same({{1, 3}}, ev.shapes)
    assert.are.equal(1, ev.nan)
    assert.are.equal(0, ev.inf)
  end)

  it("names a root module by its class, a nested one by its path", function()
    ag.detect_anomaly(true, {mode = "record"})
    local x = keel.tensor({-1.0}):requires_grad_()
    Log()(x)
    assert.are.equal("LogLayer", ag.anomaly().module)
    ag.clear_anomaly()
    local Outer = nn.Module:extend("Outer")
    function Outer:init() self.inner = nn.Sequential{nn.Identity(), Log()} end
    function Outer:forward(y) return self.inner(y) end
    Outer()(x)
    assert.are.equal("inner.2", ag.anomaly().module)
    ag.clear_anomaly()
    x:log()   -- outside any module
    assert.is_nil(ag.anomaly().module)
  end)

  it("names the first op that reads data holding NaN (no op made it)", function()
    local net = nn.Sequential{nn.Linear(3, 2), nn.Tanh()}
    ag.detect_anomaly(true, {mode = "record"})
    local events = record(function() net(keel.tensor({{1, 0 / 0, 3}})):sum():backward() end)
    assert.are.equal(1, #events)
    assert.are.equal("input", events[1].cause)
    assert.are.equal(1, events[1].input)
    assert.are.equal("1", events[1].module)
  end)

  it("names a parameter that already holds NaN as the input of the op that reads it", function()
    local net = Net()
    keel.no_grad(function() net.head.weight:fill_(0 / 0) end)
    ag.detect_anomaly(true, {mode = "record"})
    net(keel.randn({2, 3}))
    local ev = ag.anomaly()
    assert.are.equal("input", ev.cause)
    assert.are.equal("head", ev.module)
    assert.are.equal("matmul", ev.op)
    assert.are.equal(2, ev.input)
    assert.matches("got NaN/Inf in its input 2, which no op made", ev.line, 1, true)
  end)

  it("full mode keeps the creation traceback and adds input statistics", function()
    ag.detect_anomaly(true, {mode = "record", full = true})
    local x = keel.tensor({4, -3}):requires_grad_()
    Log()(x)
    local ev = ag.anomaly()
    assert.are.same({{min = -3, max = 4, nonfinite = 0}}, ev.stats)
    assert.matches("; inputs 1: min -3 max 4;", ev.line, 1, true)
    assert.matches("stack traceback:", ev.traceback, 1, true)
    assert.matches(SRC .. ":" .. L.log, ev.traceback, 1, true)
    assert.is_nil(ev.line:find("\n"))
  end)
end)

describe("backward", function()
  after_each(fresh)

  it("names the node whose gradient became infinite from a finite one", function()
    local net = nn.Sequential{nn.Linear(2, 2), nn.ReLU(), Sqrt()}
    keel.no_grad(function()
      net[1].weight:copy_(keel.tensor({{1, 0}, {0, 1}}))
      net[1].bias:zero_()
    end)
    ag.detect_anomaly(true, {mode = "record"})
    local y = net(keel.tensor({{0, 4}}))   -- sqrt(0): forward finite, gradient Inf
    assert.is_nil(ag.anomaly())
    local events = record(function() y:sum():backward() end)
    assert.are.equal(1, #events)
    local ev = events[1]
    assert.are.equal("backward", ev.phase)
    assert.are.equal("sqrt", ev.op)
    assert.are.equal("3", ev.module)
    assert.are.equal(SRC .. ":" .. L.sqrt, ev.where)
    assert.are.same({{1, 2}}, ev.shapes)
    assert.are.equal(1, ev.input)
    assert.are.equal(1, ev.inf)
    assert.matches("backward: sqrt in 3 (input [1,2]) produced 1 Inf, 0 NaN in the gradient of its input 1 "
      .. "from a finite gradient", ev.line, 1, true)
  end)

  it("names a product whose backward overflows (finite forward)", function()
    local a = keel.tensor({1e20}):requires_grad_()
    local b = keel.tensor({1e-20}):requires_grad_()
    ag.detect_anomaly(true, {mode = "record"})
    local p = a * b; L.mul = here()
    local z = (p * 1e30):sum()   -- 1e30: finite; d/db = a * 1e30 overflows
    z:backward()
    local ev = ag.anomaly()
    assert.are.equal("mul", ev.op)
    assert.are.equal("backward", ev.phase)
    assert.are.equal(2, ev.input)
    assert.are.equal(SRC .. ":" .. L.mul, ev.where)
    assert.are.same({{1}, {1}}, ev.shapes)
  end)

  it("in error mode raises the line and leaves every .grad unchanged", function()
    local w1 = keel.tensor({0, 4}):requires_grad_()
    local w2 = keel.tensor({1, 2}):requires_grad_()
    local w3 = keel.tensor({5}):requires_grad_()   -- no gradient yet
    w1.grad = keel.tensor({10, 20})
    w2.grad = keel.tensor({30, 40})
    ag.detect_anomaly(true)
    local loss = (w2 * 3):sum() + w1:sqrt():sum() + w3:sum()
    local events, ok, err = record(function() loss:backward() end)
    assert.is_false(ok)
    assert.are.equal(1, #events)
    assert.are.equal(events[1].line, err)
    assert.matches("^anomaly: backward: sqrt %(input %[2%]%) produced 1 Inf, 0 NaN", err)
    H.assert_close(w1.grad, {10, 20})
    H.assert_close(w2.grad, {30, 40})
    assert.is_nil(w3.grad)
  end)
end)

describe("modes", function()
  after_each(fresh)

  it("error: raises the one line after the op, catchable by the caller", function()
    ag.detect_anomaly(true)
    local x = keel.tensor({-1, 1}):requires_grad_()
    local reached = false
    local events, ok, err = record(function()
      local y = Log()(x)
      reached = true
      return y
    end)
    assert.is_false(ok)
    assert.is_false(reached)
    assert.are.equal(1, #events)
    assert.are.equal(events[1].line, err)
    assert.is_nil(err:find("\n"))
    -- called straight from pcall (a C caller), or in a tail call: raised
    -- by the op's call, caught by the pcall around it
    local ok2, err2 = pcall(x.log, x)
    assert.is_false(ok2)
    assert.matches("^anomaly: forward: log", err2)
    local ok3, err3 = pcall(function() return x:log() end)
    assert.is_false(ok3)
    assert.matches("^anomaly: forward: log", err3)
    -- a nested module's forward that ends in a tail call
    local Tail = nn.Module:extend("TailLog")
    function Tail:init() self.inner = Log() end
    function Tail:forward(y) return self.inner(y) end
    local ok4, err4 = pcall(function() return Tail()(x) end)
    assert.is_false(ok4)
    assert.matches("^anomaly: forward: log in inner ", err4)
    assert.is_nil(debug.gethook())
    -- the tensor ops after the error work as usual
    assert.are.equal(2, (x * 2 + 1):sum():item())
  end)

  it("warn: prints each line once to stderr and goes on", function()
    local lines = {}
    local stderr = io.stderr
    io.stderr = {write = function(_, ...) lines[#lines + 1] = table.concat({...}) end}
    local ok, err = pcall(function()
      ag.detect_anomaly(true, {mode = "warn"})
      local x = keel.tensor({-1, 1}):requires_grad_()
      local events = record(function()
        for i = 1, 3 do
          ag.set_step(i)   -- the same anomaly at every step: one warning
          local y = x:log(); L.warn = here()
        end
      end)
      assert.are.equal(3, #events)
      assert.are.equal(3, events[3].step)
    end)
    io.stderr = stderr
    assert(ok, err)
    assert.are.equal(1, #lines)
    assert.are.equal(("anomaly: step 1, forward: log (input [2]) produced 0 Inf, 1 NaN from finite inputs; "
      .. "created at %s:%d\n"):format(SRC, L.warn), lines[1])
  end)

  it("record: keeps the first event until clear_anomaly; step_anomaly is per step", function()
    ag.detect_anomaly(true, {mode = "record"})
    local x = keel.tensor({-1, 0}):requires_grad_()
    x:log()
    local first = ag.anomaly()
    assert.are.equal("log", first.op)
    x:sqrt():sum():backward()
    assert.are.equal(first, ag.anomaly())
    assert.are.equal(first, ag.step_anomaly())
    hooks.emit("step", nil, {step = 7})
    assert.is_nil(ag.step_anomaly())
    assert.are.equal(first, ag.anomaly())
    assert.are.equal(8, ag.step())
    x:log()
    assert.are.equal(8, ag.step_anomaly().step)
    ag.clear_anomaly()
    assert.is_nil(ag.anomaly())
    assert.is_nil(ag.step_anomaly())
  end)
end)

describe("cost and bounds", function()
  after_each(fresh)

  it("gives the same values and gradients on and off", function()
    local function run(on)
      keel.manual_seed(11)
      local net = nn.Sequential{nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)}
      local x = keel.randn({6, 4})
      ag.detect_anomaly(on, {mode = "record"})
      local loss = nn.cross_entropy(net(x), keel.tensor({1, 2, 3, 1, 2, 3}):long())
      loss:backward()
      ag.detect_anomaly(false)
      return loss:item(), net[1].weight.grad:totable(), net[3].bias.grad:totable()
    end
    local a = table.pack(run(false))
    local b = table.pack(run(true))
    assert.are.same(a, b)
    assert.is_nil(ag.anomaly())
  end)

  it("interns sites: 10,000 steps of a loop do not grow the table", function()
    ag.detect_anomaly(true, {mode = "record"})
    local net = nn.Sequential{nn.Linear(2, 2), nn.Tanh()}
    local x = keel.randn({1, 2})
    local function step() net(x):sum():backward() end
    step()
    local n = ag._site_count()
    assert.is_true(n >= 1)
    for _ = 1, 10000 do step() end
    assert.are.equal(n, ag._site_count())
    assert.is_nil(ag.anomaly())
  end)

  it("stamps the user's line on ops made inside keel's own Lua code", function()
    ag.detect_anomaly(true, {mode = "record"})
    local x = keel.randn({2, 3, 4}):requires_grad_()
    local y = x:flatten(); L.flat = here()   -- Tensor:flatten is in keel/init.lua
    local site = ag._site_of(y)
    assert.is_not_nil(site)
    local info = require("keel.core")._autograd.sites()[site]
    assert.are.equal(SRC .. ":" .. L.flat, info.where)
  end)
end)
