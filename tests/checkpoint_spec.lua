-- checkpoint_spec.lua: keel.checkpoint (training state in one safetensors file).
local H = require "helper"
local keel = H.keel
local nn = keel.nn

local function read_bytes(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- A small training run; arg: mode ("straight" | "first" | "resume"), the
-- checkpoint path, the output path (final parameters, safetensors).
local TRAIN = [=[
local keel = require "keel"
local nn, F = keel.nn, keel.nn.functional
local mode, ckpt, out = arg[1], arg[2], arg[3]
keel.manual_seed(123)
local model = nn.Sequential{nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 3)}
local opt = keel.optim.AdamW(model:parameters(), {lr = 1e-2, weight_decay = 1e-2,
                                                  clip = keel.clip.global_norm(0.5)})
local sched = keel.optim.schedule.cosine(opt, {warmup = 10, total = 200, min_lr = 1e-4})
local X = keel.randn(64, 4)
local Y = X:matmul(keel.randn(4, 3)):argmax(2)
local step = 0
local function train(n)
  model:train()
  for _ = 1, n do
    step = step + 1
    local i0 = (step * 16) % 64
    local xb = X:narrow(1, i0 + 1, 16) + keel.randn(16, 4) * 0.05
    local loss = F.cross_entropy(model(xb), Y:narrow(1, i0 + 1, 16))
    opt:zero_grad()
    loss:backward()
    opt:step()
    sched:step()
  end
end
if mode == "straight" then
  train(200)
elseif mode == "first" then
  train(100)
  keel.checkpoint.save(ckpt, {model = model, optimizer = opt, schedule = sched, step = step,
                              extra = {seed = 123, big = math.maxinteger - 1}})
else
  local r = keel.checkpoint.load(ckpt, {model = model, optimizer = opt, schedule = sched})
  assert(r.step == 100 and r.extra.big == math.maxinteger - 1, "bad step/extra")
  step = r.step
  train(100)
end
keel.save(out, model:state_dict(), {metadata = {lr = ("%a"):format(opt.param_groups[1].lr)}})
]=]

-- The same run with keel.guard: planted loss spikes at steps 70 and 140 are
-- skipped and back the lr off (still backed off at the checkpoint, and the
-- second spike is only caught with the restored window: min_samples = 50).
local TRAIN_GUARD = [=[
local keel = require "keel"
local nn, F = keel.nn, keel.nn.functional
local mode, ckpt, out = arg[1], arg[2], arg[3]
keel.manual_seed(123)
local model = nn.Sequential{nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 3)}
local opt = keel.optim.AdamW(model:parameters(), {lr = 1e-2, weight_decay = 1e-2,
                                                  clip = keel.clip.global_norm(0.5)})
local sched = keel.optim.schedule.cosine(opt, {warmup = 10, total = 200, min_lr = 1e-4})
local guard = keel.guard(opt, {spike = {z = 6, window = 100, min_samples = 50}, on_spike = "skip",
                               lr_backoff = 0.5, recover_after = 80, verbose = false, model = model})
local X = keel.randn(64, 4)
local Y = X:matmul(keel.randn(4, 3)):argmax(2)
local step = 0
local function train(n)
  model:train()
  for _ = 1, n do
    step = step + 1
    local i0 = (step * 16) % 64
    local xb = X:narrow(1, i0 + 1, 16) + keel.randn(16, 4) * 0.05
    local loss = F.cross_entropy(model(xb), Y:narrow(1, i0 + 1, 16))
    if step == 70 or step == 140 then loss = loss * 1e3 end
    opt:zero_grad()
    loss:backward()
    opt:step(loss)
    sched:step()
  end
end
if mode == "straight" then
  train(200)
elseif mode == "first" then
  train(100)
  assert(guard:stats().spike_loss == 1 and opt.lr_scale == 0.5, "the first spike was not caught")
  keel.checkpoint.save(ckpt, {model = model, optimizer = opt, schedule = sched, guard = guard, step = step})
else
  local r = keel.checkpoint.load(ckpt, {model = model, optimizer = opt, schedule = sched, guard = guard})
  step = r.step
  train(100)
end
assert(guard:stats().spike_loss == (mode == "first" and 1 or 2), "spikes: " .. guard:summary())
keel.save(out, model:state_dict(), {metadata = {lr = ("%a"):format(opt.param_groups[1].lr)}})
]=]

-- The same run with a keel.amp.GradScaler (growth every 7 clean steps,
-- overflows planted at steps 30, 31 and 130): the scale, its growth count
-- and the parameters resume exactly (scaler = sc).
local TRAIN_AMP = [=[
local keel = require "keel"
local nn, F = keel.nn, keel.nn.functional
local mode, ckpt, out = arg[1], arg[2], arg[3]
keel.manual_seed(123)
local model = nn.Sequential{nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)}
local opt = keel.optim.AdamW(model:parameters(), {lr = 1e-2, weight_decay = 1e-2,
                                                  clip = keel.clip.global_norm(0.5)})
local scaler = keel.amp.GradScaler{growth_interval = 7}
local X = keel.randn(64, 4)
local Y = X:matmul(keel.randn(4, 3)):argmax(2)
local step = 0
local function train(n)
  for _ = 1, n do
    step = step + 1
    local i0 = (step * 16) % 64
    local loss = F.cross_entropy(model(X:narrow(1, i0 + 1, 16)), Y:narrow(1, i0 + 1, 16))
    opt:zero_grad()
    scaler:scale(loss):backward()
    if step == 30 or step == 31 or step == 130 then
      keel.no_grad(function() model[3].bias.grad[1] = math.huge end)
    end
    scaler:step(opt, loss)
    scaler:update()
  end
end
if mode == "straight" then
  train(200)
elseif mode == "first" then
  train(100)
  keel.checkpoint.save(ckpt, {model = model, optimizer = opt, scaler = scaler, step = step})
else
  local fresh = keel.amp.GradScaler{growth_interval = 7}
  local r = keel.checkpoint.load(ckpt, {model = model, optimizer = opt, scaler = fresh})
  scaler, step = fresh, r.step
  train(100)
end
assert(opt.counters.overflow == (mode == "first" and 2 or 3) or mode == "resume", "overflows")
keel.save(out, model:state_dict(), {metadata = {scale = ("%a"):format(scaler:get_scale()),
                                                tracker = tostring(scaler:get_growth_tracker())}})
]=]

local function run_lua(script, ...)
  local args = {}
  for i, a in ipairs{...} do args[i] = ("%q"):format(a) end
  local cmd = ("LUA_PATH=%q LUA_CPATH=%q lua5.4 %s %s 2>&1"):format(package.path, package.cpath, script,
    table.concat(args, " "))
  local h = io.popen(cmd)
  local out = h:read("a")
  local ok = h:close()
  return ok, out
end

describe("checkpoint", function()
  local base
  before_each(function() base = os.tmpname() end)
  after_each(function()
    os.execute(("rm -f %q %q*"):format(base, base))
  end)

  it("resumes exactly: 200 steps == 100, save, new process, load, 100", function()
    local script = base .. ".train.lua"
    local f = assert(io.open(script, "w"))
    f:write(TRAIN)
    f:close()
    local ckpt, straight, resumed = base .. ".ckpt", base .. ".straight", base .. ".resumed"
    local ok, out = run_lua(script, "straight", ckpt, straight)
    assert.is_true(ok, out)
    ok, out = run_lua(script, "first", ckpt, base .. ".half")
    assert.is_true(ok, out)
    ok, out = run_lua(script, "resume", ckpt, resumed)
    assert.is_true(ok, out)
    local a, b = read_bytes(straight), read_bytes(resumed)
    assert.are.equal(#a, #b)
    assert.is_true(a == b, "final parameters differ between the straight and the resumed run")
    -- and the run actually trained: the halfway parameters differ
    assert.is_false(read_bytes(base .. ".half") == a)
  end)

  it("integration: resumes exactly with a guard (guard = g): windows, counters and lr back-off", function()
    local script = base .. ".train.lua"
    local f = assert(io.open(script, "w"))
    f:write(TRAIN_GUARD)
    f:close()
    local ckpt, straight, resumed = base .. ".ckpt", base .. ".straight", base .. ".resumed"
    local ok, out = run_lua(script, "straight", ckpt, straight)
    assert.is_true(ok, out)
    ok, out = run_lua(script, "first", ckpt, base .. ".half")
    assert.is_true(ok, out)
    ok, out = run_lua(script, "resume", ckpt, resumed)
    assert.is_true(ok, out)
    assert.is_true(read_bytes(straight) == read_bytes(resumed),
      "final parameters differ between the straight and the resumed guarded run")
  end)

  it("resumes exactly with a loss scaler (scaler = sc): scale, growth count, parameters", function()
    local script = base .. ".train.lua"
    local f = assert(io.open(script, "w"))
    f:write(TRAIN_AMP)
    f:close()
    local ckpt, straight, resumed = base .. ".ckpt", base .. ".straight", base .. ".resumed"
    local ok, out = run_lua(script, "straight", ckpt, straight)
    assert.is_true(ok, out)
    ok, out = run_lua(script, "first", ckpt, base .. ".half")
    assert.is_true(ok, out)
    ok, out = run_lua(script, "resume", ckpt, resumed)
    assert.is_true(ok, out)
    assert.is_true(read_bytes(straight) == read_bytes(resumed),
      "final parameters or scale differ between the straight and the resumed run")
    local _, m1 = keel.load(straight)
    local _, m2 = keel.load(base .. ".half")
    assert.are_not.equal(m1.scale, m2.scale)   -- the scale moved after the checkpoint
    -- a checkpoint without scaler state refuses a scaler
    local sc = keel.amp.GradScaler()
    keel.checkpoint.save(base .. ".noscaler", {step = 1})
    local ok2, err = pcall(keel.checkpoint.load, base .. ".noscaler", {scaler = sc})
    assert.is_false(ok2)
    assert.is_truthy(tostring(err):find("holds no scaler state"), err)
  end)

  it("saves and restores a guard's state (guard = g) and keeps the guard's policy on the optimizer", function()
    local w = keel.nn.Parameter(keel.zeros(3))
    local opt = keel.optim.SGD({w}, {lr = 0.1})
    local g = keel.guard(opt, {verbose = false, spike = {z = 6, window = 20, min_samples = 5}})
    for i = 1, 12 do g:_decide(opt, {grad_norm = 1 + i / 100, nonfinite = 0}, 2 - i / 100) end
    g:_decide(opt, {grad_norm = 1e3, nonfinite = 0}, 2)
    local path = base .. ".ckpt"
    keel.checkpoint.save(path, {optimizer = opt, guard = g})
    local _, meta = keel.load(path)
    assert.is_string(meta.guard)

    local w2 = keel.nn.Parameter(keel.zeros(3))
    local opt2 = keel.optim.SGD({w2}, {lr = 0.1})
    local g2 = keel.guard(opt2, {verbose = false, spike = {z = 6, window = 20, min_samples = 5}})
    keel.checkpoint.load(path, {optimizer = opt2, guard = g2})
    assert.are.same(g:state_dict(), g2:state_dict())
    assert.are.equal(0.5, opt2.lr_scale)
    assert.are.equal("skip", opt2.nonfinite)
    -- an optimizer state saved without a guard does not undo the guard's policy
    local opt3 = keel.optim.SGD({keel.nn.Parameter(keel.zeros(3))}, {lr = 0.1})
    keel.checkpoint.save(path, {optimizer = opt3})
    keel.checkpoint.load(path, {optimizer = opt2})
    assert.are.equal("skip", opt2.nonfinite)
    assert.are.equal(0.5, opt2.lr_scale)
    -- a file without guard state, or a corrupt one, changes nothing
    local ok, err = pcall(keel.checkpoint.load, path, {optimizer = opt2, guard = g2})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("holds no guard state"), err)
    local t, m = keel.load(base .. ".ckpt")
    m.guard = '{"version":7}'
    keel.save(base .. ".bad", t, {metadata = m})
    local before = g2:state_dict()
    ok, err = pcall(keel.checkpoint.load, base .. ".bad", {guard = g2})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("guard.load_state_dict: state version 7"), err)
    assert.are.same(before, g2:state_dict())
  end)

  it("stores model tensors under model.* and the rest as metadata", function()
    keel.manual_seed(5)
    local m = nn.Sequential{nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)}
    local opt = keel.optim.AdamW(m:parameters(), {lr = 1e-3})
    local sched = keel.optim.schedule.cosine(opt, {total = 10})
    local x = keel.randn(8, 3)
    for _ = 1, 3 do
      opt:zero_grad()
      m(x):sum():backward()
      opt:step()
      sched:step()
    end
    local loader_state = {epoch = 2, position = 17, seed = math.mininteger + 3}
    local loader = {state = function() return loader_state end}
    local path = base .. ".ckpt"
    local rng = keel.get_rng_state()
    keel.checkpoint.save(path, {model = m, optimizer = opt, schedule = sched, loader = loader, step = 3,
                                extra = {name = "run", list = {1, 2.5, true}, w = keel.tensor({1, 2})}})
    local t, meta = keel.load(path)
    assert.are.equal("keel.checkpoint", meta.format)
    for k, v in pairs(m:state_dict()) do assert.are.same(v:totable(), t["model." .. k]:totable()) end
    assert.is_not_nil(t["optim.state.1.exp_avg"])
    assert.is_not_nil(meta.optimizer and meta.schedule and meta.rng and meta.loader)

    -- restore into fresh objects
    keel.manual_seed(99)
    local m2 = nn.Sequential{nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)}
    local opt2 = keel.optim.AdamW(m2:parameters(), {lr = 1e-3})
    local sched2 = keel.optim.schedule.cosine(opt2, {total = 10})
    local got
    local loader2 = {state = function() end, load_state = function(_, s) got = s end}
    local r = keel.checkpoint.load(path, {model = m2, optimizer = opt2, schedule = sched2, loader = loader2})
    assert.are.equal(3, r.step)
    assert.are.equal("run", r.extra.name)
    assert.are.same({1, 2.5, true}, r.extra.list)
    assert.are.same({1, 2}, r.extra.w:totable())
    assert.are.same(loader_state, got)
    assert.are.same(rng, keel.get_rng_state())
    for k, v in pairs(m:state_dict()) do assert.are.same(v:totable(), m2:state_dict()[k]:totable()) end
    assert.are.same(sched:state_dict(), sched2:state_dict())
    assert.are.equal(opt.param_groups[1].lr, opt2.param_groups[1].lr)
    -- the next steps agree
    opt:zero_grad(); m(x):sum():backward(); opt:step()
    opt2:zero_grad(); m2(x):sum():backward(); opt2:step()
    for k, v in pairs(m:state_dict()) do assert.are.same(v:totable(), m2:state_dict()[k]:totable()) end
  end)

  it("saves and restores a DataLoader's position", function()
    local ds = {x = keel.arange(40):reshape(20, 2), y = keel.arange(20):long() + 1}
    local function loader() return keel.data.DataLoader(ds, {batch_size = 3, shuffle = true, seed = 7}) end
    local l = loader()
    local it = l:batches()
    for _ = 1, 3 do it() end
    local path = base .. ".ckpt"
    keel.checkpoint.save(path, {loader = l, step = 3})
    local want = {it()}
    local l2 = loader()
    local r = keel.checkpoint.load(path, {loader = l2})
    assert.are.equal(3, r.step)
    local got = {l2:batches()()}
    assert.are.same(want[1]:totable(), got[1]:totable())
    assert.are.same(want[2]:totable(), got[2]:totable())
    l:close()
    l2:close()
  end)

  it("refuses mismatches with clear errors", function()
    local m = nn.Linear(3, 2)
    local path = base .. ".ckpt"
    keel.checkpoint.save(path, {model = m, step = 1})
    local ok, err = pcall(keel.checkpoint.load, path, {model = nn.Linear(3, 5)})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("shape"), err)
    ok, err = pcall(keel.checkpoint.load, path, {model = nn.Sequential{nn.Linear(3, 2)}})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("missing keys"), err)
    local opt = keel.optim.SGD(m:parameters(), {lr = 0.1})
    ok, err = pcall(keel.checkpoint.load, path, {model = m, optimizer = opt})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("holds no optimizer state"), err)
    keel.save(path, {w = keel.zeros(1)})
    ok, err = pcall(keel.checkpoint.load, path, {model = m})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("not a keel checkpoint"), err)
    ok, err = pcall(keel.checkpoint.load, base .. ".missing", {model = m})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("^checkpoint.load: .*cannot open"), err)
    ok, err = pcall(keel.checkpoint.save, path, {step = 1.5})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("step must be an integer"), err)
  end)
end)
