-- clip_spec.lua: keel.clip. Standalone clipping against PyTorch's
-- clip_grad_norm_/clip_grad_value_ and Optax's adaptive_grad_clip
-- (tests/fixtures/optim_ref.py), chains against a plain Lua reference that
-- applies the transforms one after the other, AutoClip and ZClip against
-- their documented formulas on hand-made norm sequences, schedules as
-- thresholds, and the error paths.
local H = require "helper"
local keel = H.keel
local optim, clip = keel.optim, keel.clip
local REF = require "fixtures.optim_ref"

local function val(k, seed, lo, hi)
  return lo + (hi - lo) * (((k * 7919 + seed * 104729) % 10007) / 10007)
end

local function filled(shape, seed, lo, hi, dtype)
  local vals = {}
  for k = 0, H.numel(shape) - 1 do vals[k + 1] = val(k, seed, lo, hi) end
  return keel.tensor(vals, {dtype = dtype}):reshape(shape)
end

-- the fixture's standalone setup: parameters and their gradients
local function standalone_params(dtype)
  local ps = {}
  for i, shape in ipairs(REF.shapes) do
    ps[i] = filled(shape, 40 + i, -1, 1, dtype):requires_grad_()
    ps[i].grad = filled(shape, 50 + i, -2, 2, dtype)
  end
  return ps
end

local TOL = {float64 = {atol = 1e-14, rtol = 1e-12}, float32 = {atol = 1e-7, rtol = 1e-6}}

describe("standalone clipping equals PyTorch / Optax", function()
  for _, case in ipairs(REF.standalone) do
    it(case.label, function()
      local ps = standalone_params(case.dtype)
      if case.fn == "norm" then
        local total = clip.clip_grad_norm_(ps, case.max, {p = case.p == "inf" and math.huge or case.p})
        H.assert_close(total, case.total, TOL[case.dtype], "total norm")
      elseif case.fn == "value" then
        assert.is_nil(clip.clip_grad_value_(ps, case.v))
      else
        clip.agc_(ps, case.clipping, {eps = case.eps})
      end
      for i, p in ipairs(ps) do H.assert_close(H.flat(p.grad), case.grads[i], TOL[case.dtype], "grad " .. i) end
    end)
  end

  it("clip_grad_norm_ takes a tensor, a positional norm type, and skips parameters without .grad", function()
    local a = keel.tensor({3.0, 4.0}, {dtype = "float64", requires_grad = true})
    local b = keel.tensor({1.0}, {dtype = "float64", requires_grad = true})
    a.grad = keel.tensor({3.0, 4.0}, {dtype = "float64"})
    assert.equals(5, clip.clip_grad_norm_({a, b}, 10))
    assert.equals(4, clip.clip_grad_norm_(a, 10, "inf"))
    assert.equals(7, clip.clip_grad_norm_(a, 10, 1))
    H.assert_close(a.grad, {3.0, 4.0}, 0)
    assert.equals(0, clip.clip_grad_norm_({b}, 1))
  end)

  it("clip_grad_norm_ follows torch on non-finite gradients", function()
    local a = keel.tensor({3.0, 0 / 0}, {dtype = "float64", requires_grad = true})
    a.grad = keel.tensor({3.0, 0 / 0}, {dtype = "float64"})
    local total = clip.clip_grad_norm_(a, 1)
    assert.is_true(total ~= total)
    assert.is_true(a.grad[1] ~= a.grad[1])   -- scaled by NaN, as torch
    a.grad = keel.tensor({3.0, math.huge}, {dtype = "float64"})
    local msg = H.assert_error(function() clip.clip_grad_norm_(a, 1, {error_if_nonfinite = true}) end,
                               "clip_grad_norm_: the total norm of order 2", "non-finite")
    assert.is_truthy(msg:find("clip_spec.lua", 1, true) or msg:find("clip.lua", 1, true), msg)
    H.assert_close(a.grad, {3.0, math.huge}, 0)
    assert.equals(math.huge, clip.clip_grad_norm_(a, 1))
  end)

  it("works on non-contiguous gradients", function()
    local p = keel.zeros({3, 2}, {dtype = "float64", requires_grad = true})
    p.grad = keel.tensor({{1, 2, 3}, {4, 5, 6}}, {dtype = "float64"}):t()
    clip.clip_grad_value_(p, 2.5)
    H.assert_close(p.grad, {{1, 2.5}, {2, 2.5}, {2.5, 2.5}}, 0)
    local total = clip.clip_grad_norm_(p, 1)
    H.assert_close(total, math.sqrt(1 + 4 + 4 * 6.25), 1e-15)
  end)
end)

describe("AGC units (Optax unitwise_norm in PyTorch's layout)", function()
  -- clipping 0.5 and parameters of norm 1 per unit: a unit whose gradient
  -- norm reaches 0.5 is scaled to 0.5
  local function agc_scale(shape, pvals, gvals)
    local p = keel.tensor(pvals, {dtype = "float64"}):reshape(shape):requires_grad_()
    p.grad = keel.tensor(gvals, {dtype = "float64"}):reshape(shape)
    clip.agc_(p, 0.5)
    return H.flat(p.grad)
  end

  it("a matrix is clipped row by row (output units)", function()
    local g = agc_scale({2, 2}, {1, 0, 0, 1}, {3, 4, 0.1, 0.2})
    H.assert_close(g, {0.3, 0.4, 0.1, 0.2}, 1e-15)
  end)

  it("a vector, a scalar and {1, n} or {n, 1} shapes are one unit", function()
    for _, shape in ipairs{{4}, {1, 4}, {4, 1}} do
      local g = agc_scale(shape, {0.5, 0.5, 0.5, 0.5}, {3, 0, 0, 4})
      H.assert_close(g, {0.3, 0, 0, 0.4}, 1e-15)
    end
    local p = keel.tensor(2.0, {dtype = "float64"}):requires_grad_()
    p.grad = keel.tensor(4.0, {dtype = "float64"})
    clip.agc_(p, 0.5)
    H.assert_close(p.grad, 1.0, 1e-15)
  end)

  it("the weight norm is floored at eps", function()
    local g = agc_scale({2}, {0, 0}, {3, 4}, nil)
    H.assert_close(g, {3 * 0.5e-3 / 5, 4 * 0.5e-3 / 5}, 1e-15)
  end)
end)

-- {======================================================================
-- Chains against a sequential reference
-- =======================================================================

-- Applies transforms one by one to flat gradient lists (double precision).
local function ref_chain(grads, params, shapes, items)
  local function norm(list, p)
    local s = 0
    for _, g in ipairs(list) do
      for _, x in ipairs(g) do
        if p == math.huge then s = math.max(s, math.abs(x)) else s = s + math.abs(x) ^ p end
      end
    end
    return p == math.huge and s or s ^ (1 / p)
  end
  local function scale(g, c) for j = 1, #g do g[j] = g[j] * c end end
  for _, t in ipairs(items) do
    if t.kind == "value" then
      for _, g in ipairs(grads) do
        for j = 1, #g do g[j] = math.max(-t.threshold, math.min(t.threshold, g[j])) end
      end
    elseif t.kind == "norm" then
      for _, g in ipairs(grads) do scale(g, math.min(1, t.threshold / (norm({g}, t.p) + 1e-6))) end
    elseif t.kind == "global_norm" then
      local c = math.min(1, t.threshold / (norm(grads, t.p) + 1e-6))
      for _, g in ipairs(grads) do scale(g, c) end
    elseif t.kind == "agc" then
      for i, g in ipairs(grads) do
        local shape, big = shapes[i], 0
        for _, s in ipairs(shape) do if s ~= 1 then big = big + 1 end end
        local units = big <= 1 and 1 or shape[1]
        local len = #g // units
        for u = 0, units - 1 do
          local gs, ps = 0, 0
          for j = u * len + 1, (u + 1) * len do gs = gs + g[j] ^ 2; ps = ps + params[i][j] ^ 2 end
          local gn, pn = math.sqrt(gs), math.sqrt(ps)
          local mx = t.threshold * math.max(pn, t.eps)
          if not (gn < mx) then
            for j = u * len + 1, (u + 1) * len do g[j] = g[j] * (mx / math.max(gn, 1e-6)) end
          end
        end
      end
    end
  end
  return grads
end

local CHAINS = {
  {"value then global_norm", {clip.value(0.5), clip.global_norm(1.0)}},
  {"global_norm then value", {clip.global_norm(1.0), clip.value(0.1)}},
  {"norm then global_norm p=1", {clip.norm(0.8), clip.global_norm(2.0, {p = 1})}},
  {"agc then global_norm", {clip.agc(0.1), clip.global_norm(0.5)}},
  {"value, agc, value", {clip.value(1.0), clip.agc(0.2), clip.value(0.15)}},
  {"long mix", {clip.global_norm(3.0), clip.value(0.4), clip.norm(0.9, {p = 3}), clip.value(0.2),
                clip.global_norm(0.7, {p = math.huge}), clip.agc(0.3), clip.global_norm(0.6, {p = 1.5})}},
}

describe("chains compose in order", function()
  for _, c in ipairs(CHAINS) do
    it(c[1], function()
      local ps = standalone_params("float64")
      local shapes, grads, params = {}, {}, {}
      for i, p in ipairs(ps) do
        shapes[i] = p.shape
        grads[i] = H.flat(p.grad)
        params[i] = H.flat(p)
      end
      local items = clip._flatten(clip.chain(c[2]))
      local expected = ref_chain(grads, params, shapes, items)
      -- SGD with lr 1: the update is the clipped gradient
      local opt = optim.SGD(ps, {lr = 1.0, clip = clip.chain(c[2])})
      local r = opt:step()
      for i, p in ipairs(ps) do
        local got = H.flat(p)
        for j = 1, #got do got[j] = params[i][j] - got[j] end
        H.assert_close(got, expected[i], {atol = 1e-14, rtol = 1e-12}, c[1] .. ", parameter " .. i)
      end
      assert.is_true(r.clipped)
    end)
  end

  it("nested chains flatten", function()
    local t = clip.chain{clip.value(1), clip.chain{clip.norm(2), clip.chain{clip.agc(0.1)}}, clip.global_norm(3)}
    local kinds = {}
    for i, x in ipairs(clip._flatten(t)) do kinds[i] = x.kind end
    assert.same({"value", "norm", "agc", "global_norm"}, kinds)
    assert.equals("keel.clip.chain{value(1), chain{norm(2), chain{agc(0.1)}}, global_norm(3)}", tostring(t))
  end)

  it("clipped is false when nothing changes", function()
    local p = keel.tensor({1.0, 1.0}, {dtype = "float64", requires_grad = true})
    p.grad = keel.tensor({0.1, 0.2}, {dtype = "float64"})
    local opt = optim.SGD({p}, {lr = 0.1, clip = clip.chain{clip.value(1), clip.global_norm(10), clip.norm(5)}})
    local r = opt:step()
    assert.is_false(r.clipped)
    assert.equals(1, r.clip_coef)
    assert.equals(0, opt.counters.clipped)
  end)
end)

-- }======================================================================

-- {======================================================================
-- Adaptive thresholds
-- =======================================================================

-- An optimizer over one parameter whose gradient norm at step t is norms[t];
-- returns the reports. lr 0 keeps the parameter; the coefficient shows.
local function run_norms(spec, norms)
  local p = keel.tensor({0.0, 0.0}, {dtype = "float64", requires_grad = true})
  local opt = optim.SGD({p}, {lr = 0.0, clip = spec})
  local out = {}
  for t, n in ipairs(norms) do
    p.grad = keel.tensor({0.6 * n, 0.8 * n}, {dtype = "float64"})
    out[t] = opt:step()
  end
  return out, opt
end

-- numpy.percentile, linear method (what AutoClip's reference calls)
local function np_percentile(xs, q)
  local s = {table.unpack(xs)}
  table.sort(s)
  local vi = (#s - 1) * (q / 100)
  if vi >= #s - 1 then return s[#s] end
  local lo = math.floor(vi)
  local g = vi - lo
  local a, b = s[lo + 1], s[lo + 2]
  local d = b - a
  if g >= 0.5 then return b - d * (1 - g) end
  return a + d * g
end

describe("percentile (AutoClip)", function()
  it("clips to the p-th percentile of the norms so far, the current one included", function()
    local norms = {1, 3, 2, 10, 2.5, 2.5, 40}
    local reps = run_norms(clip.percentile{p = 50}, norms)
    -- by hand: {1} -> 1; {1,3} -> 2; {1,2,3} -> 2; {1,2,3,10} -> 2.5; ...
    local by_hand = {1, 2, 2, 2.5, 2.5, 2.5, 2.5}
    for t, r in ipairs(reps) do
      H.assert_close(r.grad_norm, norms[t], 1e-15)
      local thr = np_percentile({table.unpack(norms, 1, t)}, 50)
      assert.equals(by_hand[t], thr)
      H.assert_close(r.clip_coef, math.min(1, thr / (norms[t] + 1e-6)), 1e-15, "step " .. t)
    end
    assert.is_true(reps[7].clip_coef < 0.07)    -- the spike is clipped hard
  end)

  it("with a history window, only the last norms count", function()
    local norms = {1, 3, 2, 10, 2.5, 2.5, 40, 1}
    local reps = run_norms(clip.percentile{p = 30, history = 3}, norms)
    for t, r in ipairs(reps) do
      local thr = np_percentile({table.unpack(norms, math.max(1, t - 2), t)}, 30)
      H.assert_close(r.clip_coef, math.min(1, thr / (norms[t] + 1e-6)), 1e-15, "step " .. t)
    end
  end)

  it("a skipped step does not enter the history", function()
    local p = keel.tensor({0.0}, {dtype = "float64", requires_grad = true})
    local opt = optim.SGD({p}, {lr = 0.0, clip = clip.percentile{p = 0}, nonfinite = "skip"})
    p.grad = keel.tensor({5.0}, {dtype = "float64"}); opt:step()
    p.grad = keel.tensor({0 / 0}, {dtype = "float64"}); assert.is_false(opt:step().applied)
    p.grad = keel.tensor({10.0}, {dtype = "float64"})
    H.assert_close(opt:step().clip_coef, 5 / (10 + 1e-6), 1e-15)
    assert.same({5.0, 10.0}, opt:state_dict().clip[1].history)
  end)
end)

-- ZClip's formulas (zclip.py), written out again
local function zclip_ref(norms, z_thr, alpha, warmup, eps, mode, max_norm)
  local buf, mean, var, init, coefs = {}, nil, nil, false, {}
  for t, n in ipairs(norms) do
    if not init then
      buf[#buf + 1] = n
      if #buf >= warmup then
        local s = 0
        for _, x in ipairs(buf) do s = s + x end
        mean = s / #buf
        local v = 0
        for _, x in ipairs(buf) do v = v + (x - mean) ^ 2 end
        var = v / #buf
        init, buf = true, {}
      end
      coefs[t] = max_norm and math.min(1, max_norm / (n + 1e-6)) or 1
    else
      local std = var ^ 0.5
      local z = (n - mean) / (std + eps)
      local cv
      if z > z_thr then cv = mode == "mean" and mean or mean + (z_thr * std) / (z / z_thr) end
      local eff = cv or n
      if max_norm then eff = math.min(eff, max_norm) end
      coefs[t] = n > eff and eff / (n + 1e-6) or 1
      local x = cv or n
      mean = alpha * mean + (1 - alpha) * x
      var = alpha * var + (1 - alpha) * (x - mean) ^ 2
    end
  end
  return coefs, mean, var
end

describe("zscore (ZClip)", function()
  it("warm-up, then spikes beyond z standard deviations are clipped; the EMA adapts", function()
    local norms = {1, 2, 3, 2.5, 10, 2.4, 2.6, 30, 2.5}
    local reps, opt = run_norms(clip.zscore{z = 2, alpha = 0.5, warmup = 3}, norms)
    -- by hand for the first spike: mean 2, var 2/3 after warm-up; step 4 (2.5)
    -- is no spike: mean 2.25, var 1/3 + 1/32; step 5 (10):
    local mean, var = 2.25, (2 / 3) / 2 + 0.5 * 0.25 ^ 2
    local std = math.sqrt(var)
    local z = (10 - mean) / (std + 1e-6)
    local clip_to = mean + 2 * std / (z / 2)
    H.assert_close(reps[5].clip_coef, clip_to / (10 + 1e-6), 1e-14)
    local coefs, m, v = zclip_ref(norms, 2, 0.5, 3, 1e-6)
    for t, r in ipairs(reps) do H.assert_close(r.clip_coef, coefs[t], 1e-14, "step " .. t) end
    for _, t in ipairs{1, 2, 3, 4, 6, 7, 9} do assert.equals(1, reps[t].clip_coef) end
    assert.is_true(reps[8].clip_coef < 0.15)
    local st = opt:state_dict().clip[1]
    assert.is_true(st.initialized)
    H.assert_close(st.mean, m, 1e-14)
    H.assert_close(st.var, v, 1e-14)
  end)

  it("mode = \"mean\" clips to the mean, max_norm caps, also in warm-up", function()
    local norms = {1, 3, 2, 2.5, 10, 2.4, 8, 30, 2.5}
    local reps = run_norms(clip.zscore{z = 1.5, alpha = 0.9, warmup = 2, mode = "mean", max_norm = 2.2}, norms)
    local coefs = zclip_ref(norms, 1.5, 0.9, 2, 1e-6, "mean", 2.2)
    for t, r in ipairs(reps) do H.assert_close(r.clip_coef, coefs[t], 1e-14, "step " .. t) end
    assert.is_true(reps[1].clip_coef == 1 and reps[2].clip_coef < 1)
  end)
end)

describe("thresholds that change with the step", function()
  it("a function of the step (applied steps before this one)", function()
    local seen = {}
    local p = keel.tensor({0.0}, {dtype = "float64", requires_grad = true})
    local opt = optim.SGD({p}, {lr = 1.0, clip = clip.value(function(s) seen[#seen + 1] = s; return 1 / (s + 1) end)})
    for _ = 1, 4 do
      p.grad = keel.tensor({10.0}, {dtype = "float64"})
      opt:step()
    end
    assert.same({0, 0, 1, 2, 3}, seen)   -- once at set_clip, then before each step
    H.assert_close(p, {-(1 + 1 / 2 + 1 / 3 + 1 / 4)}, 1e-15)
  end)

  it("a value schedule", function()
    local p = keel.tensor({0.0}, {dtype = "float64", requires_grad = true})
    local thr = optim.schedule.exponential(nil, {base = 2.0, gamma = 0.5})
    local opt = optim.SGD({p}, {lr = 1.0, clip = clip.global_norm(thr)})
    for t = 1, 3 do
      p.grad = keel.tensor({10.0}, {dtype = "float64"})
      local r = opt:step()
      H.assert_close(r.clip_coef, 2 * 0.5 ^ (t - 1) / (10 + 1e-6), 1e-15)
    end
  end)

  it("a skipped step does not advance the threshold's step", function()
    local seen = {}
    local p = keel.tensor({0.0}, {dtype = "float64", requires_grad = true})
    local opt = optim.SGD({p}, {lr = 1.0, nonfinite = "skip",
                                clip = clip.norm(function(s) seen[#seen + 1] = s; return 1 end)})
    p.grad = keel.tensor({0 / 0}, {dtype = "float64"}); opt:step()
    p.grad = keel.tensor({1.0}, {dtype = "float64"}); opt:step()
    assert.same({0, 0, 0}, seen)
  end)
end)

describe("grad_stats", function()
  it("counts NaN and Inf and sums the rest, in one pass", function()
    local t = keel.tensor({3.0, 0 / 0, -4.0, math.huge, -math.huge, 0.5}, {dtype = "float32"})
    local s = clip.grad_stats({t, keel.zeros{0}})
    assert.equals(6, s[1].numel)
    assert.equals(1, s[1].nan)
    assert.equals(2, s[1].inf)
    assert.equals(25.25, s[1].sumsq)
    assert.equals(7.5, s[1].sum_abs)
    assert.equals(4, s[1].max_abs)
    assert.equals(0, s[2].numel)
  end)

  it("sums in double, in a fixed order, over long tensors", function()
    local n = 3 * 4096 + 77
    local t = keel.full({n}, 0.1, {dtype = "float32"})
    local s = clip.grad_stats(t)
    local x = string.unpack("<f", string.pack("<f", 0.1))
    H.assert_close(s[1].sumsq, n * x * x, 1e-12)
    H.assert_close(s[1].sum_abs, n * x, 1e-12)
  end)
end)

describe("errors", function()
  local p = keel.zeros({2}, {requires_grad = true})
  it("transform arguments", function()
    H.assert_error(function() clip.value("x") end,
                   "clip.value: the bound must be a number, a function of the step or a schedule, got string")
    H.assert_error(function() clip.global_norm(0 / 0) end, "clip.global_norm: max_norm is NaN")
    H.assert_error(function() clip.norm(1, {p = 0}) end, "clip.norm: p must be a number > 0 or math.huge")
    H.assert_error(function() clip.norm(1, {q = 2}) end, "clip.norm: unknown option 'q'")
    H.assert_error(function() clip.agc(0.1, {eps = -1}) end, "clip.agc: eps must be a number >= 0")
    H.assert_error(function() clip.percentile{history = 0} end, "clip.percentile: history must be an integer >= 1")
    H.assert_error(function() clip.zscore{mode = "median"} end, "clip.zscore: mode must be \"adaptive\" or \"mean\"")
    H.assert_error(function() clip.zscore{warmup = 0} end, "clip.zscore: warmup must be an integer >= 1")
    H.assert_error(function() clip.chain{clip.value(1), 3} end, "clip.chain: element 2 is not a clip transform")
    H.assert_error(function() clip.chain(clip.value(1)) end, "clip.chain: expected a list of transforms")
  end)

  it("thresholds out of range, at creation or when a function returns them", function()
    H.assert_error(function() optim.SGD({p}, {lr = 0.1, clip = clip.value(-1)}) end,
                   "clip: transform 1 (value): threshold must be >= 0, got -1")
    H.assert_error(function() optim.SGD({p}, {lr = 0.1, clip = clip.percentile{p = 101}}) end,
                   "clip: transform 1 (percentile): p must be in [0, 100], got 101")
    H.assert_error(function() optim.SGD({p}, {lr = 0.1, clip = clip.zscore{z = 0}}) end,
                   "clip: transform 1 (zscore): z must be > 0, got 0")
    H.assert_error(function() optim.SGD({p}, {lr = 0.1, clip = clip.zscore{alpha = 1}}) end,
                   "alpha must be in [0, 1)")
    local opt = optim.SGD({p}, {lr = 0.1, clip = clip.chain{clip.value(1),
                                                            clip.norm(function(s) return s == 0 and 1 or -2 end)}})
    p.grad = keel.ones{2}
    opt:step()
    local msg = H.assert_error(function() opt:step() end, "clip: transform 2 (norm): threshold must be >= 0, got -2")
    assert.is_truthy(msg:find("clip_spec.lua", 1, true), msg)
    local opt2 = optim.SGD({p}, {lr = 0.1, clip = clip.value(function(s) return s == 0 and 1 or "big" end)})
    opt2:step()
    H.assert_error(function() opt2:step() end, "the threshold function returned string at step 1, expected a number")
  end)

  it("standalone functions", function()
    p.grad = keel.ones{2}
    local msg = H.assert_error(function() clip.clip_grad_value_({p}, -1) end, "clip_grad_value_: clip_value must be >= 0, got -1")
    assert.is_truthy(msg:find("clip_spec.lua", 1, true), msg)
    H.assert_error(function() clip.clip_grad_value_({p}, "1") end, "clip_grad_value_: argument #2: clip_value must be a number")
    H.assert_error(function() clip.clip_grad_norm_({p}, 1, {p = -1}) end, "clip.clip_grad_norm_: p must be a number > 0")
    H.assert_error(function() clip.clip_grad_norm_({p}, "1") end, "clip_grad_norm_: argument #2: max_norm must be a number")
    H.assert_error(function() clip.clip_grad_norm_(5, 1) end, "clip_grad_norm_: argument #1: expected a tensor or a list")
    H.assert_error(function() clip.clip_grad_norm_({p, 5}, 1) end, "clip_grad_norm_: parameter 2 is not a keel.Tensor")
    H.assert_error(function() clip.agc_({p}, -0.1) end, "agc_: clipping must be >= 0, got -0.1")
    H.assert_error(function() clip.agc_({p}, 0.1, {eps = -1}) end, "agc_: eps must be >= 0, got -1")
  end)
end)
