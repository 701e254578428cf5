-- tests/cuda_optim_deferred_spec.lua: optimizer steps decided on the device
-- (engine/optim.c step_device, kernels/optim.cu decide). With CUDA
-- parameters, no on_grad hook, guard or GradScaler, a clip chain of L2
-- norms then value bounds and a non-finite policy other than "error", the
-- step computes the clip factors and the skip on the device and returns
-- without waiting; the report fills itself on first access. Each test
-- runs the same steps twice on the device: once so (the deferred path),
-- once with a no-op on_grad hook on every parameter, which keeps the
-- host-decided path; both must agree to the bit (parameters, state,
-- reports, counters, statistics). Also: Adam's step count after a skipped
-- step, a report read late, the host waits per step (simulator), and the
-- cases that keep the host path. Without a GPU (or the simulator) every
-- test is a visible skip.
local H = require "helper"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local optim, clip = keel.optim, keel.clip
local hooks = require "keel.hooks"
local gpu_it = H.gpu_it(it, pending)

local CTOR = {sgd = optim.SGD, adam = optim.Adam, adamw = optim.AdamW, rmsprop = optim.RMSprop,
              adagrad = optim.Adagrad}

-- An odd size past one chunk, a short one, a 0-d one and an empty one.
local SHAPES = {{3, 4099}, {17}, {}, {0, 5}, {40, 8}}

local REPORT = {"applied", "reason", "grad_norm", "clip_coef", "clipped", "nonfinite", "step", "n_updated",
                "top_param", "top_share"}
local COUNTERS = {"steps", "skipped", "cancelled", "errors", "no_grad", "nonfinite_steps", "nonfinite_elements",
                  "clipped", "overflow"}
local STATS = {"numel", "nan", "inf", "zeros", "sum", "sumsq", "sum_abs", "max_abs", "w_sumsq", "update_sumsq"}

local tensor = H.tensor_of

-- Two sets of the same device parameters.
local function params(dtype, seed)
  local a, b = {}, {}
  for i, shape in ipairs(SHAPES) do
    local t = tensor(H.values(H.numel(shape), -1, 1, seed + i), shape, dtype)
    a[i] = t:to("cuda"):requires_grad_()
    b[i] = t:to("cuda"):requires_grad_()
  end
  return a, b
end

-- Step t's gradients (the same on both sets), NaN/Inf planted at the
-- steps listed in bad.
local function set_grads(a, b, t, scale, bad)
  for i, p in ipairs(a) do
    local n = p:numel()
    local v = H.values(n, -2, 2, 1000 * t + i)
    for j = 1, n do v[j] = v[j] * scale end
    if bad and bad[t] and i == 1 then
      v[t] = 0 / 0
      v[5] = math.huge
    end
    local g = tensor(v, p.shape, p.dtype)
    p.grad = g:to("cuda")
    b[i].grad = g:to("cuda")
  end
end

-- A no-op on_grad hook on each parameter: that step keeps the host path.
local function hook_all(ps)
  local handles = {}
  for i, p in ipairs(ps) do
    local list = hooks.grad[p]
    if not list then list = {}; hooks.grad[p] = list end
    handles[i] = hooks.add(list, {fn = function() end, name = "p" .. i})
  end
  return handles
end

local function bits(x) return x == nil and "nil" or type(x) == "number" and string.pack("<d", x) or tostring(x) end

local function same_bits(a, b, what)
  local fa, fb = H.flat(a:cpu()), H.flat(b:cpu())
  assert.equals(#fa, #fb, what)
  for i = 1, #fa do
    if bits(fa[i]) ~= bits(fb[i]) then
      error(("%s: element %d: %.17g deferred, %.17g host-decided"):format(what, i, fa[i], fb[i]), 2)
    end
  end
end

local function same_report(a, b, what)
  for _, k in ipairs(REPORT) do
    assert.equals(bits(a[k]), bits(b[k]), ("%s: report.%s: %s deferred, %s host-decided"):format(what, k,
      tostring(a[k]), tostring(b[k])))
  end
end

local function same_everything(oa, ob, pa, pb, what)
  for i = 1, #pa do same_bits(pa[i], pb[i], ("%s: parameter %d"):format(what, i)) end
  local ca, cb = oa.counters, ob.counters
  for _, k in ipairs(COUNTERS) do assert.equals(cb[k], ca[k], what .. ": counters." .. k) end
  local sa, sb = oa:state_dict(), ob:state_dict()
  assert.equals(sb.step_count, sa.step_count, what .. ": step_count")
  for i = 1, #pa do
    local x, y = sa.state[i] or {}, sb.state[i] or {}
    for k, v in pairs(y) do
      if keel.is_tensor(v) then same_bits(x[k], v, ("%s: state %d.%s"):format(what, i, k))
      else assert.equals(v, x[k], ("%s: state %d.%s"):format(what, i, k)) end
    end
    for k in pairs(x) do assert.is_not_nil(y[k], ("%s: state %d.%s only deferred"):format(what, i, k)) end
  end
  local ga, gb = oa:grad_stats(), ob:grad_stats()
  for i = 1, #pa do
    for _, k in ipairs(STATS) do
      assert.equals(bits(gb[i][k]), bits(ga[i][k]), ("%s: grad_stats %d.%s"):format(what, i, k))
    end
  end
end

-- Runs nsteps both ways; returns the optimizers and parameters.
local function run_both(kind, opts, dtype, nsteps, scale, bad)
  local pa, pb = params(dtype, 7)
  local function mk(ps)
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    return CTOR[kind](ps, o)
  end
  local oa, ob = mk(pa), mk(pb)
  local handles = hook_all(pb)
  local what = ("%s %s"):format(kind, dtype)
  local ok, err = pcall(function()
    for t = 1, nsteps do
      set_grads(pa, pb, t, scale, bad)
      local ra, rb = oa:step(), ob:step()
      assert.is_table(getmetatable(ra), what .. ": the step is decided on the device")
      assert.is_nil(getmetatable(rb), what .. ": the hooked step is decided on the host")
      same_report(ra, rb, ("%s step %d"):format(what, t))
      same_everything(oa, ob, pa, pb, ("%s step %d"):format(what, t))
    end
  end)
  for _, h in ipairs(handles) do h:remove() end
  if not ok then error(err, 0) end
  return oa, ob, pa, pb
end

-- {======================================================================
-- The deferred path against the host's
-- =======================================================================

describe("cuda deferred optimizer steps", function()
  local CHAINS = {
    {"no clip", nil},
    {"global_norm active", clip.global_norm(0.5)},
    {"global_norm inactive", clip.global_norm(1e6)},
    {"norm then value", clip.chain{clip.norm(0.3), clip.value(0.02)}},
    {"global_norm, norm, value", clip.chain{clip.global_norm(2), clip.norm(1), clip.value(0.5)}},
  }
  for _, dtype in ipairs{"float32", "float64"} do
    for _, policy in ipairs{"skip", "zero", "keep"} do
      gpu_it(("agree with the host-decided steps, every chain (%s, nonfinite = %s)"):format(dtype, policy), function()
        for _, c in ipairs(CHAINS) do
          run_both("adamw", {lr = 0.05, nonfinite = policy, clip = c[2], amsgrad = true}, dtype, 4, 1, {[3] = true})
        end
      end)
    end
    gpu_it("agree with the host-decided steps, every kind (" .. dtype .. ")", function()
      local KINDS = {
        {"sgd", {lr = 0.1, momentum = 0.9, nesterov = true}},
        {"adam", {lr = 0.01, weight_decay = 0.01}},
        {"rmsprop", {lr = 0.01, momentum = 0.5, centered = true}},
        {"adagrad", {lr = 0.1, lr_decay = 0.01}},
      }
      for _, k in ipairs(KINDS) do
        local o = k[2]
        o.nonfinite = "skip"
        o.clip = clip.global_norm(1)
        run_both(k[1], o, dtype, 4, 1, {[2] = true})
      end
    end)
  end

  -- More tensors than the decision kernel's block has threads (each
  -- thread then owns several), some empty (no device work), under a chain
  -- of every kind of item the device decides: per tensor, global, bound.
  for _, policy in ipairs{"zero", "skip"} do
    gpu_it(("agree with the host-decided steps over 700 tensors (nonfinite = %s)"):format(policy), function()
      local N = 700
      local pa, pb = {}, {}
      for i = 1, N do
        local shape = i % 100 == 50 and {0, 3} or {i % 6 + 1, i % 5 + 1}
        local dtype = i % 3 == 0 and "float64" or "float32"
        local t = tensor(H.values(H.numel(shape), -1, 1, 500 + i), shape, dtype)
        pa[i] = t:to("cuda"):requires_grad_()
        pb[i] = t:to("cuda"):requires_grad_()
      end
      local chain = clip.chain{clip.norm(1), clip.global_norm(2), clip.value(0.05)}
      local oa = optim.AdamW(pa, {lr = 0.05, nonfinite = policy, clip = chain})
      local ob = optim.AdamW(pb, {lr = 0.05, nonfinite = policy, clip = chain})
      local handles = hook_all(pb)
      local ok, err = pcall(function()
        for t = 1, 3 do
          for i, p in ipairs(pa) do
            -- every tenth tensor large: the per-tensor norm clips those
            local n, scale = p:numel(), i % 10 == 0 and 20 or 0.1
            local v = H.values(n, -2, 2, 1000 * t + i)
            for j = 1, n do v[j] = v[j] * scale end
            if t == 2 and i == 7 then v[2] = 0 / 0 end
            local g = tensor(v, p.shape, p.dtype)
            p.grad = g:to("cuda")
            pb[i].grad = g:to("cuda")
          end
          local ra, rb = oa:step(), ob:step()
          local what = ("700 tensors, %s, step %d"):format(policy, t)
          assert.is_table(getmetatable(ra), what .. ": decided on the device")
          assert.is_nil(getmetatable(rb), what .. ": decided on the host")
          same_report(ra, rb, what)
          same_everything(oa, ob, pa, pb, what)
          if t ~= 2 or policy == "zero" then
            assert.is_true(ra.clipped, what .. ": clipped")
            assert.is_true(ra.clip_coef < 1, what .. ": the global norm is active")
          else
            assert.is_false(ra.applied, what .. ": skipped")
          end
        end
      end)
      for _, h in ipairs(handles) do h:remove() end
      if not ok then error(err, 0) end
    end)
  end

  gpu_it("the report fills itself on first access, and pairs() sees every field", function()
    local pa = params("float32", 3)
    local o = optim.Adam(pa, {lr = 0.01, nonfinite = "skip", clip = clip.global_norm(0.5)})
    set_grads(pa, params("float32", 3), 1, 1)
    local r = o:step()
    assert.is_table(getmetatable(r), "pending")
    local keys = {}
    for k in pairs(r) do keys[k] = true end
    assert.is_nil(getmetatable(r), "resolved")
    for _, k in ipairs{"applied", "grad_norm", "clip_coef", "clipped", "step", "n_updated", "lr"} do
      assert.is_true(keys[k], k)
    end
    assert.is_true(r.applied)
    assert.equals(1, r.step)
  end)

  gpu_it("a skipped step advances no step count (Adam's bias correction) and changes nothing", function()
    local pa, pb = params("float64", 5)
    local oa = optim.Adam(pa, {lr = 0.1, nonfinite = "skip"})
    local ob = optim.Adam(pb, {lr = 0.1, nonfinite = "skip"})
    set_grads(pa, pb, 1, 1)
    oa:step(); ob:step()
    local before = {}
    for i, p in ipairs(pa) do before[i] = p:clone() end
    local sd = oa:state_dict()
    -- step 2 skipped on a; b takes step 3's gradients only
    set_grads(pa, pb, 2, 1, {[2] = true})
    local r2 = oa:step()
    set_grads(pa, pb, 3, 1)
    local r3 = oa:step()
    ob:step()
    assert.is_false(r2.applied)
    assert.equals("nonfinite", r2.reason)
    assert.equals(1, r2.step)
    assert.is_true(r3.applied)
    assert.equals(2, r3.step)
    local sa = oa:state_dict()
    assert.equals(2, sa.step_count)
    assert.equals(2, sa.state[1].step)
    for i = 1, #pa do same_bits(pa[i], pb[i], "after the skip, parameter " .. i) end
    assert.equals(1, oa.counters.skipped)
    assert.equals(1, sd.step_count)
    for i, p in ipairs(before) do assert.equals(#H.flat(p:cpu()), #H.flat(pa[i]:cpu())) end
  end)

  gpu_it("float32 and float64 parameters in one step", function()
    local a32, b32 = params("float32", 21)
    local a64, b64 = params("float64", 22)
    local pa, pb = {}, {}
    for i = 1, #a32 do pa[#pa + 1] = a32[i]; pa[#pa + 1] = a64[i]; pb[#pb + 1] = b32[i]; pb[#pb + 1] = b64[i] end
    local opts = {lr = 0.05, nonfinite = "zero", clip = clip.chain{clip.norm(0.4), clip.global_norm(0.6)}}
    local oa, ob = optim.Adam(pa, opts), optim.Adam(pb, opts)
    local handles = hook_all(pb)
    for t = 1, 3 do
      set_grads(pa, pb, t, 1, {[2] = true})
      local ra, rb = oa:step(), ob:step()
      assert.is_table(getmetatable(ra))
      same_report(ra, rb, "mixed step " .. t)
      same_everything(oa, ob, pa, pb, "mixed step " .. t)
    end
    for _, h in ipairs(handles) do h:remove() end
  end)

  gpu_it("w_sumsq follows a write between deferred steps", function()
    local pa = params("float64", 23)
    local o = optim.AdamW(pa, {lr = 0.05, nonfinite = "keep"})
    for t = 1, 4 do
      if t == 3 then keel.no_grad(function() pa[1]:mul_(3) end) end
      local want = {}
      for i, p in ipairs(pa) do want[i] = (p:double() * p:double()):sum():item() end
      set_grads(pa, params("float64", 23), t, 1)
      o:step()
      for i, s in ipairs(o:grad_stats()) do
        H.assert_close(s.w_sumsq, want[i], {atol = 0, rtol = 1e-13}, ("step %d parameter %d"):format(t, i))
      end
    end
  end)

  gpu_it("a report read after the next step is its own step's", function()
    local pa = params("float32", 9)
    local pb = params("float32", 9)
    local o = optim.SGD(pa, {lr = 0.1, nonfinite = "zero", clip = clip.global_norm(0.1)})
    set_grads(pa, pb, 1, 1)
    local r1 = o:step()
    set_grads(pa, pb, 2, 5, {[2] = true})
    local r2 = o:step()
    set_grads(pa, pb, 3, 1)
    local r3 = o:step()
    assert.equals(3, r3.step)
    assert.equals(2, r2.step)
    assert.equals(1, r1.step)
    assert.equals(0, r1.nonfinite)
    assert.is_true(r2.nonfinite > 0)
    assert.is_true(r2.grad_norm > r1.grad_norm)
  end)

  gpu_it("a \"step\" listener gets the pending report; reading it resolves it", function()
    local pa = params("float32", 17)
    local o = optim.SGD(pa, {lr = 0.1, nonfinite = "skip", clip = clip.global_norm(0.2)})
    local seen = {}
    local h = hooks.on("step", function(opt, r)
      if opt == o then seen[#seen + 1] = {lazy = getmetatable(r) ~= nil, r = r} end
    end)
    set_grads(pa, params("float32", 17), 1, 1)
    local r = o:step()
    h:remove()
    assert.equals(1, #seen)
    assert.is_true(seen[1].lazy, "pending when emitted")
    assert.equals(r, seen[1].r, "the same table")
    assert.is_true(seen[1].r.clipped)
    assert.is_nil(getmetatable(r), "resolved for every holder")
  end)

  gpu_it("counters, step_count and grad_stats read right after a deferred step are that step's", function()
    local pa = params("float64", 11)
    local o = optim.RMSprop(pa, {lr = 0.01, nonfinite = "skip"})
    set_grads(pa, params("float64", 11), 1, 1)
    local r = o:step()
    assert.equals(1, o:state_dict().step_count)
    assert.equals(1, o.counters.steps)
    assert.is_true(o:grad_stats()[1].update_sumsq > 0)
    assert.is_true(r.applied)
  end)
end)

-- }======================================================================

-- {======================================================================
-- What keeps the host path: the report is complete on return
-- =======================================================================

describe("cuda steps the host decides", function()
  local function one(opts, setup)
    local pa = params("float32", 13)
    local o = optim.AdamW(pa, opts)
    if setup then setup(o, pa) end
    set_grads(pa, params("float32", 13), 1, 1)
    return o:step(), o, pa
  end
  gpu_it("the error policy, a percentile or AGC chain, a general p-norm, a norm after a value bound", function()
    for _, opts in ipairs{
      {lr = 0.01},
      {lr = 0.01, nonfinite = "skip", clip = clip.percentile{p = 50}},
      {lr = 0.01, nonfinite = "skip", clip = clip.agc(0.01)},
      {lr = 0.01, nonfinite = "skip", clip = clip.global_norm(1, {p = 1})},
      {lr = 0.01, nonfinite = "skip", clip = clip.chain{clip.value(0.1), clip.global_norm(1)}},
    } do
      local r = one(opts)
      assert.is_nil(getmetatable(r))
      assert.is_true(r.applied)
    end
  end)
  gpu_it("an on_grad hook, a loss scale (keel.amp's step)", function()
    local handles
    local r = one({lr = 0.01, nonfinite = "skip"}, function(_, pa) handles = hook_all(pa) end)
    for _, h in ipairs(handles) do h:remove() end
    assert.is_nil(getmetatable(r))
    assert.is_true(r.applied)
    local pa = params("float32", 13)
    local o = optim.AdamW(pa, {lr = 0.01, nonfinite = "skip"})
    set_grads(pa, params("float32", 13), 1, 1)
    local r2 = o:_amp_step(nil, {scale = 4, inv = 0.25, found_inf = false})
    assert.is_nil(getmetatable(r2))
    assert.is_true(r2.applied)
  end)
  gpu_it("a guard", function()
    local r = one({lr = 0.01, nonfinite = "skip"}, function(o) keel.guard(o) end)
    assert.is_nil(getmetatable(r))
    assert.is_true(r.applied)
  end)
  gpu_it("an on_grad hook of another optimizer's parameter does not matter", function()
    local other = keel.zeros({2}):to("cuda"):requires_grad_()
    local handles = hook_all({other})
    local r = one({lr = 0.01, nonfinite = "skip"})
    for _, h in ipairs(handles) do h:remove() end
    assert.is_table(getmetatable(r), "pending")
    assert.is_true(r.applied)
  end)
  gpu_it("CPU parameters", function()
    local p = keel.randn({5}):requires_grad_()
    local o = optim.Adam({p}, {lr = 0.1, nonfinite = "skip"})
    p.grad = keel.randn({5})
    local r = o:step()
    assert.is_nil(getmetatable(r))
    assert.is_true(r.applied)
  end)
end)

-- }======================================================================

-- {======================================================================
-- Host waits per step (simulator only: it counts them)
-- =======================================================================

describe("cuda deferred steps wait for nothing", function()
  local counts = H.sim_counts
  -- KEEL_CUDA_SIM_ASYNC plays a device a whole step behind, for which
  -- resolving the last step waits: these counts are the synchronous one's
  local test = H.on_sim() and not os.getenv("KEEL_CUDA_SIM_ASYNC") and gpu_it or pending
  test("no host wait per step when nothing reads the report; one launch more than the host path", function()
    local l3a, w3a = counts(3, 2, "skip")
    local l3b, w3b = counts(3, 4, "skip")
    local l40a, w40a = counts(40, 2, "zero")
    local l40b, w40b = counts(40, 4, "zero")
    assert.equals(0, w3b - w3a, "waits of two more steps (3 parameters)")
    assert.equals(0, w40b - w40a, "waits of two more steps (40 parameters)")
    assert.equals(l3b - l3a, l40b - l40a, "launches of two more steps")
    assert.is_true((l40b - l40a) / 2 <= 5, "launches per step: " .. (l40b - l40a) / 2)
    -- the host path: one wait per step
    local _, wea = counts(3, 2, "error")
    local _, web = counts(3, 4, "error")
    assert.equals(2, web - wea, "waits of two more host-decided steps")
  end)
end)

-- }======================================================================
