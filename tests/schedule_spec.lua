-- schedule_spec.lua: keel.optim.schedule against torch.optim.lr_scheduler
-- (50 steps, two groups with base lrs 0.1 and 0.02; tests/fixtures/
-- optim_ref.py), step counting, composition, state_dict and errors.
local H = require "helper"
local keel = H.keel
local optim, clip = keel.optim, keel.clip
local S = optim.schedule
local REF = require "fixtures.optim_ref"

-- an optimizer like the fixture's: two groups, zero gradients every step
local function setup(kind)
  local a = keel.zeros({2}, {requires_grad = true})
  local b = keel.zeros({3}, {requires_grad = true})
  local groups = {{params = {a}, lr = 0.1}, {params = {b}, lr = 0.02}}
  local opt = kind == "adam" and optim.Adam(groups) or optim.SGD(groups, {lr = 0.1, momentum = 0.9})
  local function step()
    a.grad = keel.zeros{2}
    b.grad = keel.zeros{3}
    assert.is_true(opt:step().applied)
  end
  return opt, step
end

local MAKE = {
  step = function(o) return S.step(o, {step_size = 7, gamma = 0.5}) end,
  multistep = function(o) return S.multistep(o, {milestones = {10, 25, 25, 40}, gamma = 0.3}) end,
  exponential = function(o) return S.exponential(o, {gamma = 0.95}) end,
  linear = function(o) return S.linear(o, {start_factor = 0.25, end_factor = 1.0, total = 10}) end,
  lambda = function(o) return S.lambda(o, function(s) return 1 / (1 + 0.1 * s) end) end,
  cosine = function(o) return S.cosine(o, {total = 50, min_lr = 0.001}) end,
  cosine_restarts = function(o) return S.cosine(o, {restarts = {period = 10, mult = 2}, min_lr = 0.01}) end,
  cosine_warmup = function(o) return S.cosine(o, {warmup = 10, total = 40, min_lr = 0.005}) end,
  one_cycle = function(o) return S.one_cycle(o, {max_lr = {0.5, 0.1}, total = 50}) end,
  one_cycle_linear_3phase_adam = function(o)
    return S.one_cycle(o, {max_lr = 0.3, total = 50, pct_start = 0.25, anneal = "linear", three_phase = true,
                           div_factor = 10, final_div_factor = 100})
  end,
  plateau = function(o)
    return S.plateau(o, {mode = "min", factor = 0.5, patience = 3, threshold = 0.01, cooldown = 2,
                         min_lr = {0.001, 0.0005}})
  end,
  plateau_max_abs = function(o)
    return S.plateau(o, {mode = "max", factor = 0.7, patience = 2, threshold = 0.5, threshold_mode = "abs"})
  end,
  chain = function(o)
    return S.chain(o, {S.exponential(o, {gamma = 0.9}), S.step(o, {step_size = 5, gamma = 0.5})})
  end,
  sequential = function(o)
    return S.sequential(o, {S.linear(o, {start_factor = 0.1, total = 5}), S.exponential(o, {gamma = 0.9})},
                        {milestones = {5}})
  end,
}

local function momenta(opt)
  local m = {}
  for i, g in ipairs(opt.param_groups) do m[i] = g.betas and g.betas[1] or g.momentum end
  return m
end

describe("schedules equal torch.optim.lr_scheduler (50 steps)", function()
  for _, case in ipairs(REF.schedules) do
    it(case.label, function()
      local opt, step = setup(case.optim)
      local sched = MAKE[case.label](opt)
      local tol = {atol = 1e-15, rtol = 1e-12}
      H.assert_close({opt.param_groups[1].lr, opt.param_groups[2].lr}, case.lrs[1], tol, "lr at 0")
      if case.momentum then H.assert_close(momenta(opt), case.momentum[1], tol, "momentum at 0") end
      for t = 1, 50 do
        step()
        local lrs
        if case.metrics then lrs = sched:step(case.metrics[t]) else lrs = sched:step() end
        H.assert_close(lrs, case.lrs[t + 1], tol, "lr at " .. t)
        H.assert_close({opt.param_groups[1].lr, opt.param_groups[2].lr}, case.lrs[t + 1], tol)
        H.assert_close(sched:get_last_lr(), case.lrs[t + 1], tol)
        if case.momentum then H.assert_close(momenta(opt), case.momentum[t + 1], tol, "momentum at " .. t) end
      end
    end)
  end
end)

describe("step counting", function()
  it("by default counts applied optimizer steps: a skipped step does not advance", function()
    local p = keel.zeros({1}, {requires_grad = true})
    local opt = optim.SGD({p}, {lr = 1.0, nonfinite = "skip"})
    local sched = S.exponential(opt, {gamma = 0.5})
    p.grad = keel.ones{1}; opt:step(); sched:step()
    assert.equals(0.5, opt.param_groups[1].lr)
    p.grad = keel.tensor({0 / 0}); opt:step(); sched:step()
    assert.equals(0.5, opt.param_groups[1].lr)
    p.grad = keel.ones{1}; opt:step(); sched:step()
    assert.equals(0.25, opt.param_groups[1].lr)
    -- stepping the schedule twice for one optimizer step changes nothing
    sched:step()
    assert.equals(0.25, opt.param_groups[1].lr)
  end)

  it("count = \"calls\" counts sched:step() calls, as PyTorch", function()
    local p = keel.zeros({1}, {requires_grad = true})
    local opt = optim.SGD({p}, {lr = 1.0})
    local sched = S.exponential(opt, {gamma = 0.5, count = "calls"})
    sched:step(); sched:step()
    assert.equals(0.25, opt.param_groups[1].lr)
  end)

  it("starts at 0 when made after some steps", function()
    local p = keel.zeros({1}, {requires_grad = true})
    local opt = optim.SGD({p}, {lr = 1.0})
    for _ = 1, 3 do p.grad = keel.ones{1}; opt:step() end
    local sched = S.exponential(opt, {gamma = 0.5})
    assert.equals(1.0, opt.param_groups[1].lr)
    p.grad = keel.ones{1}; opt:step(); sched:step()
    assert.equals(0.5, opt.param_groups[1].lr)
  end)

  it("the lr a schedule sets is the one the next step uses", function()
    local p = keel.tensor({0.0}, {dtype = "float64", requires_grad = true})
    local opt = optim.SGD({p}, {lr = 1.0})
    local sched = S.step(opt, {step_size = 1, gamma = 0.1})
    for _ = 1, 3 do
      p.grad = keel.tensor({1.0}, {dtype = "float64"})
      local r = opt:step()
      sched:step()
      assert.is_true(r.lr > opt.param_groups[1].lr)
    end
    H.assert_close(p, {-1.11}, 1e-15)
  end)
end)

describe("base lrs", function()
  it("are each group's initial_lr, kept across schedules, as PyTorch", function()
    local opt = setup()
    S.exponential(opt, {gamma = 0.5})
    assert.equals(0.1, opt.param_groups[1].initial_lr)
    assert.equals(0.02, opt.param_groups[2].initial_lr)
    opt.param_groups[1].lr = 7
    local s2 = S.step(opt, {step_size = 3})
    assert.equals(0.1, opt.param_groups[1].lr)
    assert.same({0.1, 0.02}, s2:get_last_lr())
  end)

  it("a group added later gets its own base", function()
    local opt, step = setup()
    local sched = S.exponential(opt, {gamma = 0.5})
    opt:add_param_group{params = {keel.zeros({1}, {requires_grad = true})}, lr = 4.0}
    step()
    assert.same({0.05, 0.01, 2.0}, sched:step())
  end)
end)

describe("value schedules", function()
  it("compute values without an optimizer (value(s)), e.g. for clip thresholds", function()
    local c = S.cosine(nil, {base = 2.0, warmup = 4, total = 12, min_lr = 0.5})
    assert.equals(0, c:value(0))
    assert.equals(1.0, c:value(2))
    assert.equals(2.0, c:value(4))
    H.assert_close(c:value(8), 0.5 + 1.5 * (1 + math.cos(math.pi * 4 / 8)) / 2, 1e-15)
    assert.equals(0.5, c:value(12))
    assert.equals(0.5, c:value(100))
    local e = S.exponential(nil, {gamma = 0.5})
    assert.equals(0.125, e:value(3))
    H.assert_error(function() e:step() end, "schedule.exponential: a value schedule (no optimizer) has no step()")
  end)

  it("one_cycle holds its value at total past the end", function()
    local o = S.one_cycle(nil, {max_lr = 1.0, total = 20})
    assert.equals(o:value(20), o:value(25))
  end)
end)

describe("state_dict", function()
  it("round trip continues identically", function()
    local opt, step = setup()
    local sched = S.chain(opt, {S.exponential(opt, {gamma = 0.9}), S.step(opt, {step_size = 3, gamma = 0.5})})
    for _ = 1, 5 do step(); sched:step() end
    local osd, ssd = opt:state_dict(), sched:state_dict()
    local expect = {}
    for t = 1, 4 do step(); expect[t] = sched:step() end
    local opt2, step2 = setup()
    local sched2 = S.chain(opt2, {S.exponential(opt2, {gamma = 0.9}), S.step(opt2, {step_size = 3, gamma = 0.5})})
    opt2:load_state_dict(osd)
    sched2:load_state_dict(ssd)
    assert.same(ssd._last_lr, sched2:get_last_lr())
    for t = 1, 4 do step2(); assert.same(expect[t], sched2:step()) end
  end)

  it("plateau keeps best, bad epochs and cooldown", function()
    local opt = setup()
    local p = S.plateau(opt, {patience = 1})
    p:step(1.0); p:step(2.0)
    local sd = p:state_dict()
    assert.equals(1.0, sd.best)
    assert.equals(1, sd.num_bad_epochs)
    local opt2 = setup()
    local p2 = S.plateau(opt2, {patience = 1})
    p2:load_state_dict(sd)
    p2:step(3.0)
    H.assert_close({opt2.param_groups[1].lr, opt2.param_groups[2].lr}, {0.01, 0.002}, 1e-15)
    H.assert_error(function() p2:load_state_dict(S.step(opt2, {step_size = 2}):state_dict()) end,
                   "schedule.plateau: load_state_dict: expected a state dict of a plateau schedule")
  end)
end)

describe("errors", function()
  local opt = setup()
  it("name the schedule and the option", function()
    H.assert_error(function() S.step(opt, {gamma = 0.5}) end, "schedule.step: step_size must be an integer >= 1, got nil")
    H.assert_error(function() S.step(opt, {step_size = 2, gama = 0.5}) end, "schedule.step: unknown option 'gama'")
    local msg = H.assert_error(function() S.step(42, {step_size = 2}) end, "schedule.step: argument #1: expected an optimizer")
    assert.is_truthy(msg:find("schedule_spec.lua", 1, true), msg)
    H.assert_error(function() S.multistep(opt, {milestones = {1.5}}) end, "schedule.multistep: milestone 1 is not an integer")
    H.assert_error(function() S.exponential(opt, {}) end, "schedule.exponential: gamma must be a number, got nil")
    H.assert_error(function() S.cosine(opt, {total = 10, warmup = 10}) end, "schedule.cosine: total (10) must exceed warmup (10)")
    H.assert_error(function() S.cosine(opt, {}) end, "schedule.cosine: total must be an integer >= 1")
    H.assert_error(function() S.cosine(opt, {total = 10, restarts = 3}) end, "restarts must be a table")
    H.assert_error(function() S.one_cycle(opt, {total = 10}) end, "schedule.one_cycle: max_lr is required")
    H.assert_error(function() S.one_cycle(opt, {max_lr = {1, 2, 3}, total = 10}) end,
                   "max_lr must be a number or a list of 2 numbers")
    local ada = optim.Adagrad({keel.zeros({1}, {requires_grad = true})})
    H.assert_error(function() S.one_cycle(ada, {max_lr = 1, total = 10}) end,
                   "Adagrad has no momentum to cycle (cycle_momentum = false)")
    H.assert_error(function() S.plateau(opt, {mode = "up"}) end, "schedule.plateau: mode must be \"min\" or \"max\"")
    H.assert_error(function() S.plateau(opt):step() end, "schedule.plateau: step(metric): expected a number, got nil")
    H.assert_error(function() S.plateau(opt):value(3) end, "schedule.plateau: has no closed form")
    H.assert_error(function() S.chain(opt, {S.plateau(opt)}) end, "schedule.chain: element 1 is not a schedule with a closed form")
    H.assert_error(function() S.sequential(opt, {S.step(opt, {step_size = 1}), S.step(opt, {step_size = 2})}, {milestones = {}}) end,
                   "schedule.sequential: milestones must list 1 steps")
    H.assert_error(function() S.lambda(opt, 3) end, "schedule.lambda: argument #2: expected a function of the step")
    H.assert_error(function() S.lambda(opt, function() return "x" end) end, "schedule.lambda: the function returned string at step 0")
    H.assert_error(function() S.step(opt, {step_size = 1, count = "epochs"}) end,
                   "schedule.step: count must be \"steps\" (applied optimizer steps) or \"calls\"")
  end)
end)
