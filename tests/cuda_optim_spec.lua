-- tests/cuda_optim_spec.lua: the optimizer kernels of the CUDA plugin
-- (kernels/optim.cu: grad_stats, grad_scale_, optim_update) against the
-- CPU backend, their specification, through the Lua API. Each test runs
-- the same steps on CPU parameters and on CUDA copies (gradients are set
-- by hand, so no other kernel family is needed) and compares parameters,
-- state, reports and statistics: every optimizer kind with its options,
-- float32 and float64, odd sizes past one block and one chunk, empty
-- parameters; every clip kind and the standalone clip functions;
-- non-finite gradients under each policy; GradScaler (fused and unscale_,
-- overflow skips); state that follows model:to(); state_dict across
-- devices; mixed devices; update ratios. Without a GPU (or the simulator
-- plugin) every test is a visible skip.
local H = require "helper"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local nn, optim, clip, amp = keel.nn, keel.optim, keel.clip, keel.amp
local gpu_it = H.gpu_it(it, pending)

local CTOR = {sgd = optim.SGD, adam = optim.Adam, adamw = optim.AdamW, rmsprop = optim.RMSprop,
              adagrad = optim.Adagrad}

-- Odd sizes: a unit longer than one chunk (4096) with an odd length,
-- many short AGC units (odd and vector-aligned), a vector-aligned one, a
-- tiny one, a 0-d one and an empty one.
local SHAPES = {{3, 4099}, {64, 33}, {50, 8}, {1000}, {7}, {}, {0, 5}}

-- {======================================================================
-- Helpers
-- =======================================================================

local tensor = H.tensor_of

-- A leaf parameter on dev holding t's values.
local function leaf(t, dev)
  local y = t:detach():to(dev)
  if dev == "cpu" then y = y:clone() end
  return y:requires_grad_()
end

-- The same parameters on the CPU and on the device.
local function params(dtype, seed, shapes)
  local cpu, dev = {}, {}
  for i, shape in ipairs(shapes or SHAPES) do
    local t = tensor(H.values(H.numel(shape), -1, 1, seed + i), shape, dtype)
    cpu[i] = leaf(t, "cpu")
    dev[i] = leaf(t, "cuda")
  end
  return cpu, dev
end

-- Gradient values of step t: scaled by `scale`, with plant(vals, i, t)
-- to plant specials.
local function set_grads(cpu, dev, t, scale, plant)
  for i, p in ipairs(cpu) do
    local n = p:numel()
    local v = H.values(n, -2, 2, 1000 * t + i)
    if scale then for j = 1, n do v[j] = v[j] * scale end end
    if plant then plant(v, i, t) end
    local g = tensor(v, p.shape, p.dtype)
    p.grad = g
    dev[i].grad = g:to("cuda")
  end
end

local function bits(x) return string.pack("<d", x) end

-- Tolerances: exact when the kernels repeat the CPU's operations (no clip
-- factor from sums), else a factor computed from sums in another order.
local TOL = {float32 = {atol = 2e-6, rtol = 2e-5}, float64 = {atol = 1e-12, rtol = 1e-10}}

local function same(cpu, dev, tol, what)
  assert.equals("cuda", dev.device, what .. ": device")
  local a, b = H.flat(cpu), H.flat(dev:cpu())
  assert.equals(#a, #b, what .. ": numel")
  if tol then
    if #a > 0 then H.assert_close(dev:cpu(), cpu:totable(), tol, what) end
    return
  end
  for i = 1, #a do
    if bits(a[i]) ~= bits(b[i]) then
      H.fail(("%s: element %d is %.17g on cuda, %.17g on cpu"):format(what, i, b[i], a[i]))
    end
  end
end

local function same_params(cpu, dev, tol, what)
  for i = 1, #cpu do same(cpu[i], dev[i], tol, ("%s: parameter %d"):format(what, i)) end
end

-- Every state tensor of two optimizers (state_dict copies).
local function same_state(oc, od, tol, what)
  local sc, sd = oc:state_dict(), od:state_dict()
  assert.equals(sc.step_count, sd.step_count, what .. ": step_count")
  for i = 1, #oc:parameters() do
    local a, b = sc.state[i] or {}, sd.state[i] or {}
    for k, v in pairs(a) do
      if keel.is_tensor(v) then
        assert.is_true(keel.is_tensor(b[k]), ("%s: state %d.%s missing on cuda"):format(what, i, k))
        same(v, b[k], tol, ("%s: state %d.%s"):format(what, i, k))
      else
        assert.equals(v, b[k], ("%s: state %d.%s"):format(what, i, k))
      end
    end
  end
end

local function close(a, b, tol, what)
  if a ~= a then
    assert.is_true(b ~= b, what .. ": expected NaN, got " .. tostring(b))
    return
  end
  if a == math.huge or a == -math.huge then assert.equals(a, b, what); return end
  if not H.close(b, a, tol.atol, tol.rtol) then
    H.fail(("%s: %.17g on cuda, %.17g on cpu"):format(what, b, a))
  end
end

local STAT_EXACT = {"numel", "nan", "inf", "zeros", "max_abs"}
local STAT_SUMS = {"sum", "sumsq", "sum_abs", "w_sumsq", "norm", "weight_norm", "update_ratio"}

local function same_stats(a, b, tol, what)
  assert.equals(#a, #b, what .. ": count")
  for i = 1, #a do
    local x, y = a[i], b[i]
    for _, k in ipairs(STAT_EXACT) do assert.equals(x[k], y[k], ("%s %d %s"):format(what, i, k)) end
    for _, k in ipairs(STAT_SUMS) do
      if x[k] == nil then
        assert.is_nil(y[k], ("%s %d %s"):format(what, i, k))
      else
        close(x[k], y[k], tol, ("%s %d %s"):format(what, i, k))
      end
    end
  end
end

local function same_report(a, b, tol, what)
  assert.equals(a.applied, b.applied, what .. ": applied")
  assert.equals(a.reason, b.reason, what .. ": reason")
  assert.equals(a.nonfinite, b.nonfinite, what .. ": nonfinite")
  assert.equals(a.n_updated, b.n_updated, what .. ": n_updated")
  assert.equals(a.clipped, b.clipped, what .. ": clipped")
  assert.equals(a.top_param, b.top_param, what .. ": top_param")
  close(a.grad_norm, b.grad_norm, tol, what .. ": grad_norm")
  close(a.clip_coef, b.clip_coef, tol, what .. ": clip_coef")
end

local function copy(t)
  local o = {}
  for k, v in pairs(t) do o[k] = v end
  return o
end

-- Runs nsteps on both sides with optimizer kind and options, comparing
-- after each step; tol nil: to the bit.
local function run_pair(kind, opts, dtype, nsteps, tol, grads)
  local cpu, dev = params(dtype, 10, grads and grads.shapes)
  local oc, od = CTOR[kind](cpu, copy(opts)), CTOR[kind](dev, copy(opts))
  local what = ("%s %s"):format(kind, dtype)
  for t = 1, nsteps do
    set_grads(cpu, dev, t, grads and grads.scale, grads and grads.plant)
    local rc, rd = oc:step(), od:step()
    same_report(rc, rd, TOL[dtype], ("%s step %d"):format(what, t))
    same_params(cpu, dev, tol, ("%s step %d"):format(what, t))
    same_stats(oc:grad_stats(), od:grad_stats(), TOL[dtype], ("%s step %d stats"):format(what, t))
  end
  same_state(oc, od, tol, what)
  return oc, od, cpu, dev
end

-- }======================================================================

-- {======================================================================
-- Every optimizer kind and its options
-- =======================================================================

local CASES = {
  {"sgd", {lr = 0.1}},
  {"sgd", {lr = 0.1, momentum = 0.9, dampening = 0.1, weight_decay = 0.01}},
  {"sgd", {lr = 0.1, momentum = 0.9, nesterov = true, maximize = true}},
  {"adam", {lr = 0.01}},
  {"adam", {lr = 0.01, weight_decay = 0.01, amsgrad = true, maximize = true}},
  {"adamw", {lr = 0.01, weight_decay = 0.1}},
  {"adamw", {lr = 0.01, betas = {0.8, 0.99}, amsgrad = true}},
  {"rmsprop", {lr = 0.01}},
  {"rmsprop", {lr = 0.01, momentum = 0.5, centered = true, weight_decay = 0.01}},
  {"rmsprop", {lr = 0.01, alpha = 0.9, momentum = 0.3, maximize = true}},
  {"adagrad", {lr = 0.1}},
  {"adagrad", {lr = 0.1, lr_decay = 0.01, weight_decay = 0.01, initial_accumulator_value = 0.1}},
}

local function describe_opts(o)
  local keys = {}
  for k, v in pairs(o) do
    keys[#keys + 1] = k .. "=" .. (type(v) == "table" and "{" .. table.concat(v, ",") .. "}" or tostring(v))
  end
  table.sort(keys)
  return table.concat(keys, " ")
end

describe("cuda optimizers", function()
  for _, case in ipairs(CASES) do
    for _, dtype in ipairs{"float32", "float64"} do
      gpu_it(("%s {%s} %s: 3 steps, parameters and state to the bit"):format(case[1], describe_opts(case[2]),
        dtype), function()
        run_pair(case[1], case[2], dtype, 3, nil)
      end)
    end
  end

  for _, dtype in ipairs{"float32", "float64"} do
    gpu_it("parameters that start off a 16-byte boundary (views at an offset) (" .. dtype .. ")", function()
      -- contiguous leaf views one element in: the kernels' scalar path,
      -- beside state buffers that are aligned
      local function views(dev)
        local out = {}
        for i, n in ipairs{4101, 64} do
          local big = tensor(H.values(n + 1, -1, 1, 500 + i), {n + 1}, dtype):to(dev)
          out[i] = big:narrow(1, 2, n):detach():requires_grad_()
        end
        return out
      end
      local cpu, dev = views("cpu"), views("cuda")
      local oc = optim.Adam(cpu, {lr = 0.01, clip = clip.agc(0.05)})
      local od = optim.Adam(dev, {lr = 0.01, clip = clip.agc(0.05)})
      for t = 1, 3 do
        set_grads(cpu, dev, t)
        same_report(oc:step(), od:step(), TOL[dtype], "step " .. t)
        same_params(cpu, dev, TOL[dtype], "step " .. t)
        same_stats(oc:grad_stats(), od:grad_stats(), TOL[dtype], "stats " .. t)
      end
      -- and in place: clip_grad_value_ on misaligned gradients
      for i = 1, #cpu do
        local g = tensor(H.values(cpu[i]:numel() + 1, -3, 3, 600 + i), {cpu[i]:numel() + 1}, dtype)
        cpu[i].grad = g:narrow(1, 2, cpu[i]:numel())
        dev[i].grad = g:to("cuda"):narrow(1, 2, cpu[i]:numel())
      end
      clip.clip_grad_value_(cpu, 1.0)
      clip.clip_grad_value_(dev, 1.0)
      for i = 1, #cpu do same(cpu[i].grad:contiguous(), dev[i].grad:contiguous(), nil, "clipped grad " .. i) end
    end)
  end

  gpu_it("a group may mix devices; groups have their own options", function()
    local cpu, dev = params("float64", 30, {{9, 5}, {13}})
    local mixed = {dev[1], cpu[2]:detach():clone():requires_grad_()}
    local ref = {cpu[1], cpu[2]}
    local oc = optim.Adam({{params = {ref[1]}, lr = 0.02}, {params = {ref[2]}}}, {lr = 0.01})
    local om = optim.Adam({{params = {mixed[1]}, lr = 0.02}, {params = {mixed[2]}}}, {lr = 0.01})
    for t = 1, 3 do
      for i = 1, 2 do
        local g = tensor(H.values(ref[i]:numel(), -1, 1, 50 * t + i), ref[i].shape, "float64")
        ref[i].grad = g
        mixed[i].grad = g:to(mixed[i].device)
      end
      oc:step()
      om:step()
    end
    same(ref[1], mixed[1], nil, "cuda parameter")
    assert.equals("cpu", mixed[2].device)
    H.assert_close(mixed[2], ref[2]:totable(), 0, "cpu parameter")
  end)
end)

-- }======================================================================

-- {======================================================================
-- Clipping inside the step, and standalone
-- =======================================================================

local CLIPS = {
  {"value", function() return clip.value(0.5) end},
  {"norm", function() return clip.norm(1.0) end},
  {"norm p=1", function() return clip.norm(3.0, {p = 1}) end},
  {"norm p=inf", function() return clip.norm(0.5, {p = math.huge}) end},
  {"norm p=3", function() return clip.norm(1.0, {p = 3}) end},
  {"global_norm", function() return clip.global_norm(2.0) end},
  {"global_norm p=1.5", function() return clip.global_norm(2.0, {p = 1.5}) end},
  {"agc", function() return clip.agc(0.01) end},
  {"percentile", function() return clip.percentile({p = 50}) end},
  {"zscore", function() return clip.zscore({warmup = 1, z = 0.5}) end},
  {"chain value, agc, global_norm", function()
    return clip.chain{clip.value(1.0), clip.agc(0.05), clip.global_norm(3.0)}
  end},
}

describe("cuda clipping", function()
  for _, c in ipairs(CLIPS) do
    for _, dtype in ipairs{"float32", "float64"} do
      gpu_it(("clip %s in the step (%s): reports, statistics and parameters agree"):format(c[1], dtype), function()
        run_pair("adamw", {lr = 0.01, clip = c[2]()}, dtype, 2, TOL[dtype])
        run_pair("sgd", {lr = 0.1, momentum = 0.9, clip = c[2]()}, dtype, 2, TOL[dtype])
      end)
    end
  end

  for _, dtype in ipairs{"float32", "float64"} do
    gpu_it("standalone clip_grad_norm_, clip_grad_value_, agc_ and grad_stats on cuda gradients (" .. dtype .. ")",
      function()
        local tol = TOL[dtype]
        local cpu, dev = params(dtype, 40)
        local function grads(cmp)
          for i = 1, #cpu do
            if cmp then same(cpu[i].grad, dev[i].grad, tol, "grad " .. i) end
          end
        end
        for _, p in ipairs{2, 1, math.huge, 3} do
          set_grads(cpu, dev, p == math.huge and 9 or p, 3)
          local nc = clip.clip_grad_norm_(cpu, 1.5, {p = p})
          local nd = clip.clip_grad_norm_(dev, 1.5, {p = p})
          close(nc, nd, tol, "clip_grad_norm_ total p=" .. p)
          grads(true)
        end
        set_grads(cpu, dev, 5, 3)
        clip.clip_grad_value_(cpu, 0.7)
        clip.clip_grad_value_(dev, 0.7)
        grads(true)
        set_grads(cpu, dev, 6, 3)
        clip.agc_(cpu, 0.02)
        clip.agc_(dev, 0.02)
        grads(true)
        -- statistics with NaN/Inf planted
        set_grads(cpu, dev, 7, 1, function(v, i)
          if #v > 3 then v[2] = 0 / 0; v[#v] = math.huge; v[3] = -math.huge; v[1] = 0 end
        end)
        local gc, gd = {}, {}
        for i = 1, #cpu do gc[i] = cpu[i].grad; gd[i] = dev[i].grad end
        same_stats(clip.grad_stats(gc), clip.grad_stats(gd), tol, "grad_stats")
        -- non-finite total: NaN as torch
        local nc = clip.clip_grad_norm_(cpu, 1.0)
        local nd = clip.clip_grad_norm_(dev, 1.0)
        assert.is_true(nc ~= nc and nd ~= nd, "NaN total norm")
        grads(true)
      end)
  end

  gpu_it("non-contiguous cuda gradients are clipped through copies", function()
    local pc = keel.zeros({6, 5}, {dtype = "float64"}):requires_grad_()
    local pd = leaf(pc, "cuda")
    local g = tensor(H.values(30, -3, 3, 77), {5, 6}, "float64")
    pc.grad = g:t()
    pd.grad = g:to("cuda"):t()
    clip.clip_grad_norm_({pc}, 1.0)
    clip.clip_grad_norm_({pd}, 1.0)
    same(pc.grad:contiguous(), pd.grad:contiguous(), TOL.float64, "clipped grad")
  end)
end)

-- }======================================================================

-- {======================================================================
-- Non-finite gradients
-- =======================================================================

-- NaN, Inf and -Inf at places that move with the step, so that "keep"
-- and "zero" differ where earlier steps left state behind.
local function plant_nonfinite(v, i, t)
  if #v >= 7 then
    v[t] = 0 / 0
    v[3 + t] = math.huge
    v[#v + 1 - t] = -math.huge
  end
end

describe("cuda non-finite gradients", function()
  for _, policy in ipairs{"zero", "keep", "skip"} do
    for _, dtype in ipairs{"float32", "float64"} do
      gpu_it(("nonfinite = %s (%s) over every kind"):format(policy, dtype), function()
        for _, kind in ipairs{"sgd", "adam", "adamw", "rmsprop", "adagrad"} do
          local opts = {lr = 0.05, nonfinite = policy}
          if kind == "adam" then opts.weight_decay = 0.1 end
          if kind == "sgd" or kind == "rmsprop" then opts.momentum = 0.9 end
          local oc, od = run_pair(kind, opts, dtype, 3, nil, {plant = plant_nonfinite})
          local cc, cd = oc.counters, od.counters
          for _, k in ipairs{"steps", "skipped", "nonfinite_steps", "nonfinite_elements"} do
            assert.equals(cc[k], cd[k], kind .. " counters." .. k)
          end
        end
      end)
    end
  end

  gpu_it("nonfinite = error raises on cuda and changes nothing", function()
    local cpu, dev = params("float32", 60, {{100}})
    local od = optim.SGD(dev, {lr = 0.1})
    set_grads(cpu, dev, 1, 1, plant_nonfinite)
    local before = dev[1]:cpu()
    H.assert_error(function() od:step() end, "non-finite gradient")
    same(before, dev[1], nil, "parameter")
  end)

  gpu_it("nonfinite = keep with a fresh momentum buffer, and clipping on top", function()
    run_pair("sgd", {lr = 0.1, momentum = 0.9, nonfinite = "keep", clip = clip.agc(0.05)}, "float64", 3,
      TOL.float64, {plant = plant_nonfinite})
    run_pair("adam", {lr = 0.1, nonfinite = "zero", clip = clip.value(0.3)}, "float32", 3, TOL.float32,
      {plant = plant_nonfinite})
  end)
end)

-- }======================================================================

-- {======================================================================
-- GradScaler
-- =======================================================================

describe("cuda GradScaler", function()
  for _, dtype in ipairs{"float32", "float64"} do
    gpu_it("fused step, unscale_ then clip, overflow skip and backoff agree with the CPU (" .. dtype .. ")",
      function()
        local cpu, dev = params(dtype, 70)
        local oc = optim.Adam(cpu, {lr = 0.01, clip = clip.global_norm(1.0)})
        local od = optim.Adam(dev, {lr = 0.01, clip = clip.global_norm(1.0)})
        local sc = amp.GradScaler({init_scale = 1024, growth_interval = 2})
        local sd = amp.GradScaler({init_scale = 1024, growth_interval = 2})
        local tol = TOL[dtype]
        for t = 1, 6 do
          local scale = sc:get_scale()
          assert.equals(scale, sd:get_scale(), "scale at step " .. t)
          -- the scaled loss's backward, by hand: gradients times the scale
          sc:scale(keel.tensor(1.0))
          sd:scale(keel.tensor(1.0))
          local plant = t == 3 and function(v, i) if i == 2 then v[5] = math.huge end end or nil
          set_grads(cpu, dev, t, scale, plant)
          if t % 2 == 0 then
            -- unscale_ in place first (grad_scale_ and grad_stats), then the step
            sc:unscale_(oc)
            sd:unscale_(od)
            for i = 1, #cpu do same(cpu[i].grad, dev[i].grad, nil, ("unscaled grad %d step %d"):format(i, t)) end
          end
          local rc, rd = sc:step(oc), sd:step(od)
          same_report(rc, rd, tol, "step " .. t)
          assert.equals(rc.overflow, rd.overflow, "overflow " .. t)
          if t == 3 then
            assert.is_false(rd.applied)
            assert.equals("overflow", rd.reason)
          end
          sc:update()
          sd:update()
          same_params(cpu, dev, tol, "step " .. t)
        end
        assert.equals(oc.counters.overflow, od.counters.overflow)
        assert.equals(1, od.counters.overflow)
        same_state(oc, od, tol, "scaler")
      end)
  end
end)

describe("cuda hooks and zero_grad", function()
  local hooks = require "keel.hooks"

  gpu_it("on_grad hooks see the same statistics (under a loss scale too); zero_grad on cuda", function()
    local cpu, dev = params("float64", 80, {{4103}, {9, 4}})
    local seen = {cpu = {}, cuda = {}}
    local handles = {}
    for _, side in ipairs{{"cpu", cpu}, {"cuda", dev}} do
      for i, p in ipairs(side[2]) do
        local list = hooks.grad[p]
        if not list then list = {}; hooks.grad[p] = list end
        handles[#handles + 1] = hooks.add(list, {name = "p" .. i, fn = function(_, g, st)
          assert.equals(side[1], g.device)
          seen[side[1]][#seen[side[1]] + 1] = st
        end})
      end
    end
    local oc, od = optim.SGD(cpu, {lr = 0.1}), optim.SGD(dev, {lr = 0.1})
    local sc, sd = amp.GradScaler({init_scale = 3}), amp.GradScaler({init_scale = 3})
    for t = 1, 2 do
      sc:scale(keel.tensor(1.0))
      sd:scale(keel.tensor(1.0))
      set_grads(cpu, dev, t, 3)
      same_report(sc:step(oc), sd:step(od), TOL.float64, "step " .. t)
      sc:update()
      sd:update()
    end
    for _, h in ipairs(handles) do h:remove() end
    assert.equals(4, #seen.cuda)
    for j = 1, 4 do
      local a, b = seen.cpu[j], seen.cuda[j]
      for _, k in ipairs{"numel", "nan", "inf", "zeros", "nonfinite", "step"} do assert.equals(a[k], b[k], k) end
      for _, k in ipairs{"norm", "max_abs", "mean", "std", "rms", "weight_norm", "update_ratio"} do
        if a[k] == nil then assert.is_nil(b[k], k) else close(a[k], b[k], TOL.float64, k) end
      end
    end
    same_params(cpu, dev, TOL.float64, "after the scaled steps")
    od:zero_grad({set_to_none = false})
    for _, p in ipairs(dev) do
      assert.equals("cuda", p.grad.device)
      H.assert_close(p.grad:cpu():abs():sum():item(), 0, 0, "zeroed grad")
    end
    od:zero_grad()
    for _, p in ipairs(dev) do assert.is_nil(p.grad) end
  end)
end)

-- }======================================================================

-- {======================================================================
-- State follows its parameter; state_dict across devices
-- =======================================================================

local function linear_pair(dtype)
  keel.manual_seed(5)
  local a = nn.Linear(37, 11)
  if dtype == "float64" then a:double() end
  local b = nn.Linear(37, 11)
  if dtype == "float64" then b:double() end
  -- the same values in both
  local pa, pb = a:parameters(), b:parameters()
  keel.no_grad(function()
    for i = 1, #pa do pb[i]:copy_(pa[i]) end
  end)
  return a, b
end

local function model_grads(m, t)
  for i, p in ipairs(m:parameters()) do
    local g = tensor(H.values(p:numel(), -1, 1, 300 * t + i), p.shape, p.dtype)
    p.grad = g:to(p.device)
  end
end

describe("cuda optimizer state", function()
  for _, kind in ipairs{"sgd", "adam", "rmsprop", "adagrad"} do
    gpu_it(kind .. ": model:to(\"cuda\") after steps moves the state at the next step, and back", function()
      local a, b = linear_pair("float64")
      local opts = {lr = 0.05, momentum = (kind == "sgd" or kind == "rmsprop") and 0.9 or nil,
                    amsgrad = kind == "adam" or nil}
      local oa, ob = CTOR[kind](a:parameters(), copy(opts)), CTOR[kind](b:parameters(), copy(opts))
      for t = 1, 5 do
        if t == 3 then b:to("cuda") end
        if t == 5 then b:to("cpu") end
        model_grads(a, t)
        model_grads(b, t)
        oa:step()
        ob:step()
        local want = (t == 3 or t == 4) and "cuda" or "cpu"
        for i, p in ipairs(b:parameters()) do
          assert.equals(want, p.device, "parameter device")
          local st = ob:state_dict().state[i]
          for k, v in pairs(st or {}) do
            if keel.is_tensor(v) then assert.equals(want, v.device, ("state %d.%s at step %d"):format(i, k, t)) end
          end
          local q = a:parameters()[i]
          if want == "cuda" then same(q, p, nil, ("parameter %d step %d"):format(i, t))
          else H.assert_close(p, q:totable(), 0, ("parameter %d step %d"):format(i, t)) end
        end
      end
    end)
  end

  for _, dtype in ipairs{"float32", "float64"} do
    gpu_it("state_dict round trip between devices (" .. dtype .. ")", function()
      local cpu, dev = params(dtype, 90, {{5, 9}, {31}})
      local opts = {lr = 0.01, amsgrad = true}
      local oc = optim.Adam(cpu, copy(opts))
      for t = 1, 2 do
        set_grads(cpu, dev, t)
        oc:step()
      end
      -- the CPU optimizer's state into a CUDA one over the same values
      local dev2 = {}
      for i, p in ipairs(cpu) do dev2[i] = leaf(p, "cuda") end
      local od = optim.Adam(dev2, copy(opts))
      od:load_state_dict(oc:state_dict())
      for i = 1, #dev2 do
        for k, v in pairs(od:state_dict().state[i]) do
          if keel.is_tensor(v) then assert.equals("cuda", v.device, "loaded state " .. k) end
        end
      end
      same_state(oc, od, nil, "loaded on cuda")
      for t = 3, 4 do
        set_grads(cpu, dev2, t)
        oc:step()
        od:step()
      end
      same_params(cpu, dev2, nil, "after loading")
      same_state(oc, od, nil, "after loading")
      -- and back: the CUDA optimizer's state into a CPU one
      local cpu2 = {}
      for i, p in ipairs(dev2) do cpu2[i] = leaf(p, "cpu") end
      local oc2 = optim.Adam(cpu2, copy(opts))
      oc2:load_state_dict(od:state_dict())
      for t = 5, 6 do
        set_grads(cpu2, dev2, t)
        oc2:step()
        od:step()
      end
      same_params(cpu2, dev2, nil, "back on the cpu")
    end)
  end
end)

-- }======================================================================

-- {======================================================================
-- Update statistics
-- =======================================================================

describe("cuda update statistics", function()
  -- the weight's sum of squares comes from the previous update's pass,
  -- unless the parameter was written since (then it is read again)
  for _, dtype in ipairs{"float32", "float64"} do
    gpu_it("w_sumsq follows mul_, copy_ and load_state_dict between steps (" .. dtype .. ")", function()
      local tol = {atol = 0, rtol = dtype == "float64" and 1e-13 or 1e-6}
      local m = nn.Linear(300, 7, {dtype = dtype}):to("cuda")
      local P = m:parameters()
      local opt = optim.AdamW(P, {lr = 0.05, clip = clip.global_norm(0.5)})
      local other = optim.SGD({P[1]}, {lr = 0.01})   -- a second optimizer writing P[1]
      local function step(t, what)
        local want = {}
        for i, p in ipairs(P) do
          p.grad = tensor(H.values(p:numel(), -1, 1, 40 * t + i), p.shape, dtype):to("cuda")
          want[i] = (p:double() * p:double()):sum():item()
        end
        opt:step()
        for i, st in ipairs(opt:grad_stats()) do
          close(st.w_sumsq, want[i], tol, ("%s: parameter %d"):format(what, i))
        end
      end
      step(1, "first step")
      step(2, "nothing in between")
      keel.no_grad(function() P[1]:mul_(2) end)
      step(3, "after mul_")
      keel.no_grad(function() P[2]:copy_(keel.ones(P[2].shape, {dtype = dtype}):to("cuda") * 3) end)
      step(4, "after copy_")
      m:load_state_dict(nn.Linear(300, 7, {dtype = dtype}):state_dict())
      step(5, "after load_state_dict")
      other:step()   -- P[1] has a gradient: another optimizer's update in between
      step(6, "after another optimizer's update")
      step(7, "nothing in between again")
    end)
  end
  for _, dtype in ipairs{"float32", "float64"} do
    gpu_it("update_ratio and the update's sum of squares agree (" .. dtype .. ")", function()
      local oc, od, cpu, dev = run_pair("sgd", {lr = 0.1, momentum = 0.5}, dtype, 3, nil)
      local sc, sd = oc:grad_stats(), od:grad_stats()
      for i = 1, #cpu do
        if cpu[i]:numel() > 0 then
          assert.is_number(sd[i].update_ratio, "update_ratio " .. i)
          close(sc[i].update_ratio, sd[i].update_ratio, TOL[dtype], "update_ratio " .. i)
        end
      end
    end)
  end
end)

-- }======================================================================

-- {======================================================================
-- Update sizes that arrive late: a device step does not wait for its
-- update's sum of squares; reading it (or the next step, add_param_group,
-- freeing the optimizer) does. Read after other work, they must be the
-- step's own.
-- =======================================================================

describe("cuda update sizes read late", function()
  local function sizes(o)
    local t = {}
    for i, s in ipairs(o:grad_stats()) do t[i] = s.update_sumsq end
    return t
  end
  local function same_sizes(a, b, tol, what)
    assert.equals(#a, #b, what .. ": count")
    for i = 1, #a do
      if a[i] == nil then assert.is_nil(b[i], what .. " " .. i)
      else close(a[i], b[i], tol, ("%s: parameter %d update_sumsq"):format(what, i)) end
    end
  end
  for _, dtype in ipairs{"float32", "float64"} do
    gpu_it("after another step, after add_param_group, after free (" .. dtype .. ")", function()
      local tol = TOL[dtype]
      local cpu, dev = params(dtype, 20)
      local oc, od = optim.AdamW(cpu, {lr = 0.05}), optim.AdamW(dev, {lr = 0.05})
      -- two steps, nothing read in between: the second step's sizes
      for t = 1, 2 do
        set_grads(cpu, dev, t)
        oc:step(); od:step()
      end
      local sc = sizes(oc)
      assert.is_number(sc[1])
      same_sizes(sc, sizes(od), tol, "two steps")
      -- a step, other device work, then add_param_group (the records move)
      set_grads(cpu, dev, 3)
      oc:step(); od:step()
      local extra = tensor(H.values(12, -1, 1, 77), {3, 4}, dtype)
      local xc, xd = leaf(extra, "cpu"), leaf(extra, "cuda")
      local junk = (dev[1] * 2):sum():item()   -- device work and a host wait in between
      assert.is_number(junk)
      oc:add_param_group{params = {xc}}
      od:add_param_group{params = {xd}}
      same_sizes(sizes(oc), sizes(od), tol, "after add_param_group")
      assert.is_nil(sizes(od)[#dev + 1], "the new parameter has no update yet")
      same_params(cpu, dev, nil, "after add_param_group")
      -- a step, then the optimizer is dropped unread: its results must not
      -- land in freed memory (ASan), and a new optimizer's must be right
      set_grads(cpu, dev, 4)
      od:step()
      od = nil
      collectgarbage(); collectgarbage()
      local oc2, od2 = optim.SGD(cpu, {lr = 0.1, momentum = 0.5}), optim.SGD(dev, {lr = 0.1, momentum = 0.5})
      oc:step()   -- the CPU side catches up with the dropped step
      same_params(cpu, dev, nil, "after the dropped optimizer's step")
      set_grads(cpu, dev, 5)
      oc2:step(); od2:step()
      same_sizes(sizes(oc2), sizes(od2), tol, "a new optimizer")
      same_params(cpu, dev, nil, "a new optimizer")
    end)
  end
end)

-- }======================================================================

-- {======================================================================
-- Launches per step (simulator only: it counts them): the statistics and
-- the update run as multi-tensor batches, so the count does not grow with
-- the number of parameters, and a step waits for the device once.
-- =======================================================================

describe("cuda optimizer launches", function()
  local counts = H.sim_counts
  local test = H.on_sim() and gpu_it or pending
  test("per step: as many launches for 40 parameters as for 3, one more wait per step", function()
    local l3a, w3a = counts(3, 2)
    local l3b, w3b = counts(3, 4)
    local l40a, w40a = counts(40, 2)
    local l40b, w40b = counts(40, 4)
    assert.equals(l3b - l3a, l40b - l40a, "launches of two more steps")
    assert.is_true((l40b - l40a) / 2 <= 4, "launches per step: " .. (l40b - l40a) / 2)
    assert.equals(2, w3b - w3a, "waits of two more steps (3 parameters)")
    assert.equals(2, w40b - w40a, "waits of two more steps (40 parameters)")
  end)
end)

-- }======================================================================
