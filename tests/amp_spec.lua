-- amp_spec.lua: keel.amp.GradScaler, dynamic loss scaling.
--
-- The fused path (scaler:step hands the scale's inverse to the C step)
-- against a hand-written reference of PyTorch's sequence built from keel's
-- standalone pieces (scale -> backward -> unscale_ in place -> clip_grad_norm_
-- -> step unless an inf was found -> update), and every path against
-- PyTorch's own GradScaler (tests/fixtures/amp_ref.py). Float64 runs compare
-- to the bit where the scale is a power of two.
local H = require "helper"
local keel = H.keel
local nn, optim, clip = keel.nn, keel.optim, keel.clip
local F = nn.functional
local amp = keel.amp
local REF = require "fixtures.amp_ref"

-- {======================================================================
-- Helpers
-- =======================================================================

local PACK = {float32 = "<f", float64 = "<d"}

-- The raw bytes of a tensor's values, exact to the bit.
local function bytes(t)
  local f = assert(PACK[t.dtype], t.dtype)
  local out = {}
  for i, v in ipairs(H.flat(t)) do out[i] = string.pack(f, v) end
  return table.concat(out)
end

local function list_bytes(ts)
  local out = {}
  for i, t in ipairs(ts) do out[i] = bytes(t) end
  return table.concat(out, "|")
end

-- Every state tensor and step count of an optimizer, as bytes.
local function opt_bytes(opt)
  local sd = opt:state_dict()
  local out = {"step_count=" .. tostring(sd.step_count)}
  for i = 1, #opt:parameters() do
    local st = sd.state[i] or {}
    local keys = {}
    for k in pairs(st) do keys[#keys + 1] = k end
    table.sort(keys)
    for _, k in ipairs(keys) do
      local v = st[k]
      out[#out + 1] = ("%d.%s=%s"):format(i, k, keel.is_tensor(v) and bytes(v) or tostring(v))
    end
  end
  return table.concat(out, "\n")
end

-- x rounded to float32, as torch keeps the scale.
local function f32(x) return (string.unpack("<f", string.pack("<f", x))) end

-- PyTorch's _amp_update_scale_, written out (see amp_ref.py).
local function ref_update(s, found)
  if found then
    s.scale = f32(s.scale * s.backoff)
    s.tracker = 0
  else
    local k = s.tracker + 1
    if k == s.interval then
      local ns = f32(s.scale * s.growth)
      if ns == ns and ns ~= math.huge then s.scale = ns end
      s.tracker = 0
    else
      s.tracker = k
    end
  end
end

local function ref_scaler(o)
  o = o or {}
  return {scale = f32(o.init_scale or 2.0 ^ 16), growth = o.growth_factor or 2.0, backoff = o.backoff_factor or 0.5,
          interval = o.growth_interval or 2000, tracker = 0}
end

-- PyTorch's unscale_ by hand: every .grad times float32(1 / scale) in
-- place; whether any unscaled value is NaN/Inf.
local function ref_unscale(params, scale)
  local inv, found = f32(1 / scale), false
  keel.no_grad(function()
    for _, p in ipairs(params) do
      local g = p.grad
      if g ~= nil then
        g:mul_(inv)
        local s = clip.grad_stats({g})[1]
        if s.nan + s.inf > 0 then found = true end
      end
    end
  end)
  return found
end

-- }======================================================================

-- {======================================================================
-- The fixture's problem (amp_ref.py): three parameters and a gradient
-- keel computes bit for bit as PyTorch does
-- =======================================================================

local function val(k, seed, lo, hi)
  return lo + (hi - lo) * (((k * 7919 + seed * 104729) % 10007) / 10007)
end

local function filled(shape, seed, lo, hi, dtype)
  local vals = {}
  for k = 0, H.numel(shape) - 1 do vals[k + 1] = val(k, seed, lo, hi) end
  return keel.tensor(vals, {dtype = dtype}):reshape(shape)
end

local function problem(case)
  local P, consts = {}, {}
  for i, shape in ipairs(REF.shapes) do
    P[i] = filled(shape, i, -1.5, 1.5, case.dtype):requires_grad_()
    consts[i] = {filled(shape, 10 + i, 0.5, 2.0, case.dtype), filled(shape, 20 + i, -1.0, 1.0, case.dtype),
                 filled(shape, 30 + i, 0.0, 0.5, case.dtype)}
  end
  local spikes, plants = {}, {}
  for _, s in ipairs(case.spikes) do spikes[s[1]] = s[2] end
  for _, s in ipairs(case.plants) do plants[s[1]] = s[2] == "inf" and math.huge or 0 / 0 end
  -- .grad of step t: the gradient times the scale (scale_fn(g)), then the plant
  local function grad(t, scale_fn)
    keel.no_grad(function()
      for i, p in ipairs(P) do
        local c, tt, d = consts[i][1], consts[i][2], consts[i][3]
        local x = p:detach()
        p.grad = scale_fn((c * (x - tt) + d * (x * x * x)) * (spikes[t] or 1.0))
      end
      if plants[t] then P[1].grad[1][1] = plants[t] end
    end)
  end
  return P, grad
end

local CTOR = {sgd = optim.SGD, adam = optim.Adam, adamw = optim.AdamW}

local function opts_of(case, with_clip)
  local o = {}
  for k, v in pairs(case.opts) do o[k] = v end
  if with_clip then
    if case.clip.kind == "global_norm" then o.clip = clip.global_norm(case.clip.max) end
    if case.clip.kind == "value" then o.clip = clip.value(case.clip.v) end
  end
  return o
end

local function standalone_clip(case, P)
  if case.clip.kind == "global_norm" then return clip.clip_grad_norm_(P, case.clip.max) end
  if case.clip.kind == "value" then clip.clip_grad_value_(P, case.clip.v) end
  return nil
end

-- mode "fused": the clip chain in the optimizer, scaler:step does the rest;
-- "explicit": scaler:unscale_, standalone clipping, scaler:step;
-- "reference": no scaler at all (the sequence above by hand).
local function run_case(case, mode)
  local P, grad = problem(case)
  local opt = CTOR[case.kind](P, opts_of(case, mode == "fused"))
  local sc = amp.GradScaler(case.scaler)
  local ref = ref_scaler(case.scaler)
  local out = {P = P, opt = opt, scales = {}, found = {}, norms = {}, reports = {}, untouched = true}
  for t = 1, case.steps do
    opt:zero_grad()
    if mode == "reference" then
      out.scales[t] = ref.scale
      grad(t, function(g) return g * ref.scale end)
      local found = ref_unscale(P, ref.scale)
      local norm = standalone_clip(case, P)
      if not found then opt:step() end
      ref_update(ref, found)
      out.found[t], out.norms[t] = found, (not found) and norm or false
    else
      out.scales[t] = sc:get_scale()
      grad(t, function(g) return sc:scale(g) end)
      local before = list_bytes(P)
      local norm
      if mode == "explicit" then
        sc:unscale_(opt)
        norm = standalone_clip(case, P)
      end
      local r = sc:step(opt)
      out.reports[t] = r
      out.found[t] = r.overflow
      if mode == "fused" then norm = case.clip.kind == "global_norm" and r.grad_norm or nil end
      out.norms[t] = (not r.overflow) and norm or false
      if r.overflow and list_bytes(P) ~= before then out.untouched = false end
      sc:update()
    end
  end
  out.final_scale = mode == "reference" and ref.scale or sc:get_scale()
  out.tracker = mode == "reference" and ref.tracker or sc:get_growth_tracker()
  return out
end

local TOL = {float64 = {atol = 1e-12, rtol = 1e-10}, float32 = {atol = 1e-6, rtol = 1e-5}}

-- }======================================================================

describe("keel.amp.GradScaler", function()

  describe("options and state", function()
    it("has PyTorch's defaults", function()
      local sc = amp.GradScaler()
      assert.is_true(sc:is_enabled())
      assert.are.equal(65536.0, sc:get_scale())
      assert.are.equal(2.0, sc:get_growth_factor())
      assert.are.equal(0.5, sc:get_backoff_factor())
      assert.are.equal(2000, sc:get_growth_interval())
      assert.are.equal(0, sc:get_growth_tracker())
      assert.are.same({scale = 65536.0, growth_factor = 2.0, backoff_factor = 0.5, growth_interval = 2000,
                       _growth_tracker = 0}, sc:state_dict())
      assert.matches("GradScaler%(scale 65536", tostring(sc))
    end)

    it("keeps the scale in float32, as torch's scale tensor", function()
      local sc = amp.GradScaler{init_scale = 1000.1}
      assert.are.equal(f32(1000.1), sc:get_scale())
      assert.are_not.equal(1000.1, sc:get_scale())
    end)

    it("rejects bad options and setters with the option's name", function()
      H.assert_error(function() amp.GradScaler{bogus = 1} end, "GradScaler: unknown option 'bogus'")
      H.assert_error(function() amp.GradScaler{growth_factor = 1} end, "'growth_factor': expected a number > 1")
      H.assert_error(function() amp.GradScaler{backoff_factor = 1} end, "'backoff_factor': expected a number in (0, 1)")
      H.assert_error(function() amp.GradScaler{growth_interval = 0} end, "'growth_interval': expected an integer >= 1")
      H.assert_error(function() amp.GradScaler{init_scale = -1} end, "'init_scale'")
      H.assert_error(function() amp.GradScaler{init_scale = 1e39} end, "within float32's range")
      H.assert_error(function() amp.GradScaler{enabled = 1} end, "'enabled': expected a boolean")
      H.assert_error(function() amp.GradScaler(3) end, "GradScaler: argument #1")
      local sc = amp.GradScaler()
      sc:set_growth_factor(4)
      sc:set_backoff_factor(0.25)
      sc:set_growth_interval(7)
      assert.are.same({4, 0.25, 7}, {sc:get_growth_factor(), sc:get_backoff_factor(), sc:get_growth_interval()})
      H.assert_error(function() sc:set_growth_interval(1.5) end, "growth_interval")
    end)

    it("state_dict round-trips and the restored scaler continues the same sequence", function()
      local w1 = nn.Parameter(keel.tensor({1.0, -2.0}, {dtype = "float64"}))
      local w2 = nn.Parameter(keel.tensor({1.0, -2.0}, {dtype = "float64"}))
      local o1, o2 = optim.SGD({w1}, {lr = 0.1}), optim.SGD({w2}, {lr = 0.1})
      local s1 = amp.GradScaler{init_scale = 8.0, growth_interval = 3}
      local function iter(sc, opt, w, bad)
        opt:zero_grad()
        local loss = (w * w):sum()
        sc:scale(loss):backward()
        if bad then keel.no_grad(function() w.grad[1] = math.huge end) end
        sc:step(opt)
        return sc:update()
      end
      for i = 1, 5 do iter(s1, o1, w1, i == 2) end
      local sd = s1:state_dict()
      assert.are.same({scale = 8.0, growth_factor = 2.0, backoff_factor = 0.5, growth_interval = 3,
                       _growth_tracker = 0}, sd)
      local s2 = amp.GradScaler()
      s2:load_state_dict(sd)
      assert.are.same(sd, s2:state_dict())
      keel.no_grad(function() w2:copy_(w1) end)
      for i = 1, 9 do
        local a, b = iter(s1, o1, w1, i == 4), iter(s2, o2, w2, i == 4)
        assert.are.equal(a, b)
      end
      assert.are.same(s1:state_dict(), s2:state_dict())
      assert.are.equal(bytes(w1), bytes(w2))
    end)

    it("refuses the empty state of a disabled scaler, and a disabled scaler ignores any", function()
      local off = amp.GradScaler{enabled = false}
      assert.are.same({}, off:state_dict())
      H.assert_error(function() amp.GradScaler():load_state_dict(off:state_dict()) end,
        "the source state dict is empty")
      H.assert_error(function() amp.GradScaler():load_state_dict({scale = -1, growth_factor = 2, backoff_factor = 0.5,
        growth_interval = 1, _growth_tracker = 0}) end, "'scale' must be a number > 0")
      off:load_state_dict({scale = 3})   -- ignored, as PyTorch's
      assert.are.equal(1.0, off:get_scale())
    end)
  end)

  describe("scale", function()
    it("returns loss x scale as a new tensor on the graph; backward gives scaled gradients", function()
      for _, dtype in ipairs{"float64", "float32"} do
        keel.manual_seed(5)
        local m = nn.Linear(3, 2)
        if dtype == "float64" then m:to(dtype) end
        local x = keel.randn({4, 3}, {dtype = dtype})
        local loss = (m(x) ^ 2):mean()
        local sc = amp.GradScaler()
        local scaled = sc:scale(loss)
        assert.are.equal(dtype, scaled.dtype)
        assert.are.equal(loss:item() * 65536, scaled:item())
        assert.is_not_nil(scaled.grad_fn)
        scaled:backward()
        local g1 = m.weight.grad:clone()
        m:zero_grad()
        loss = (m(x) ^ 2):mean()
        loss:backward()
        assert.are.equal(bytes(m.weight.grad * 65536), bytes(g1))
      end
    end)

    it("scales lists of tensors, and a disabled scaler returns its argument", function()
      local sc = amp.GradScaler{init_scale = 4}
      local a, b = keel.tensor({1.0}), keel.tensor({2.0})
      local out = sc:scale({a, {b}})
      assert.are.equal(4, out[1]:item())
      assert.are.equal(8, out[2][1]:item())
      H.assert_error(function() sc:scale(3) end, "scaler:scale: outputs must be a tensor or a list of tensors")
      local off = amp.GradScaler{enabled = false}
      assert.are.equal(a, off:scale(a))
    end)
  end)

  -- {====================================================================
  -- Against PyTorch (amp_ref.py) and the hand-written reference
  -- =====================================================================

  describe("trajectories", function()
    for _, case in ipairs(REF.cases) do
      local pow2 = not case.label:find("odd_scale")
      it(case.label .. ": fused, explicit and reference paths agree with each other and PyTorch", function()
        local fused, explicit, ref = run_case(case, "fused"), run_case(case, "explicit"), run_case(case, "reference")
        for _, run in ipairs{fused, explicit, ref} do
          -- the scale sequence and the overflow decisions are exact
          assert.are.same(case.scales, run.scales)
          assert.are.same(case.found_inf, run.found)
          assert.are.equal(case.final_scale, run.final_scale)
          assert.are.equal(case.growth_tracker, run.tracker)
          for i, p in ipairs(run.P) do
            H.assert_close(H.flat(p), case.final[i], TOL[case.dtype], case.label .. ": parameter " .. i)
            local st = run.opt:state_dict().state[i]
            for k, v in pairs(case.state[i]) do
              H.assert_close(H.flat(st[k]), v, TOL[case.dtype], case.label .. ": state " .. k .. " of " .. i)
            end
          end
          if case.norms then
            for t, n in ipairs(case.norms) do
              if n == false then
                assert.is_false(run.norms[t])
              else
                H.assert_close(run.norms[t], n, {atol = 0, rtol = case.dtype == "float64" and 1e-12 or 1e-6},
                  "norm at step " .. t)
              end
            end
          end
        end
        -- explicit = reference to the bit: the same operations
        assert.are.equal(list_bytes(ref.P), list_bytes(explicit.P))
        assert.are.equal(opt_bytes(ref.opt), opt_bytes(explicit.opt))
        -- fused = reference to the bit for power-of-two scales (or no clip
        -- factor: value clipping, none), else within a rounding
        local exact = pow2 or case.clip.kind ~= "global_norm"
        if exact then
          assert.are.equal(list_bytes(ref.P), list_bytes(fused.P))
          assert.are.equal(opt_bytes(ref.opt), opt_bytes(fused.opt))
        else
          for i, p in ipairs(fused.P) do
            H.assert_close(H.flat(p), H.flat(ref.P[i]), {atol = 1e-6, rtol = 1e-5})
          end
        end
        -- the report's grad_norm is the unscaled norm clip_grad_norm_ saw:
        -- to the bit while the parameters are (always at the first step)
        if case.norms then
          if exact then
            assert.are.same(ref.norms, fused.norms)
          else
            assert.are.equal(ref.norms[1], fused.norms[1])
          end
        end
        -- skipped steps leave the parameters untouched; the counters say why
        assert.is_true(fused.untouched)
        local nfound = 0
        for _, f in ipairs(case.found_inf) do if f then nfound = nfound + 1 end end
        local c = fused.opt.counters
        assert.are.equal(nfound, c.overflow)
        assert.are.equal(case.steps - nfound, c.steps)
        assert.are.equal(0, c.skipped)
        assert.are.equal(0, c.nonfinite_steps)
        for t, r in ipairs(fused.reports) do
          assert.are.equal(case.scales[t], r.scale)
          assert.are.equal(case.found_inf[t], r.overflow)
          assert.are.equal(not case.found_inf[t], r.applied)
          assert.are.equal(case.found_inf[t] and "overflow" or nil, r.reason)
        end
      end)
    end
  end)

  describe("a model trained through autograd", function()
    -- two identical models: one with the fused scaler, one with the
    -- hand-written PyTorch sequence; 40 steps, growth every 5 clean steps,
    -- Inf and NaN planted in the scaled gradients
    local function model(dtype)
      keel.manual_seed(17)
      local m = nn.Sequential{nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)}
      if dtype == "float64" then m:to(dtype) end
      return m
    end

    for _, dtype in ipairs{"float64", "float32"} do
      it(dtype .. ": parameters and Adam state equal the reference to the bit; the scale sequence is exact", function()
        local data = {}
        keel.manual_seed(99)
        for t = 1, 40 do data[t] = {keel.randn({16, 5}, {dtype = dtype}), keel.randn({16, 3}, {dtype = dtype})} end
        local plant = {[7] = math.huge, [8] = 0 / 0, [21] = -math.huge}
        local ma, mb = model(dtype), model(dtype)
        local oa = optim.Adam(ma:parameters(), {lr = 1e-2, clip = clip.global_norm(0.5)})
        local ob = optim.Adam(mb:parameters(), {lr = 1e-2})
        local sc = amp.GradScaler{growth_interval = 5}
        local ref = ref_scaler{growth_interval = 5}
        local seen = {}
        for t = 1, 40 do
          local x, y = data[t][1], data[t][2]
          -- fused
          oa:zero_grad()
          local la = F.mse_loss(ma(x), y)
          sc:scale(la):backward()
          if plant[t] then keel.no_grad(function() ma[3].bias.grad[2] = plant[t] end) end
          local before = list_bytes(ma:parameters())
          local r = sc:step(oa, la)
          assert.are.equal(ref.scale, r.scale)
          if plant[t] then
            assert.is_false(r.applied)
            assert.are.equal("overflow", r.reason)
            assert.are.equal(before, list_bytes(ma:parameters()))
          else
            assert.is_true(r.applied)
          end
          seen[#seen + 1] = sc:update()
          -- reference: scale -> backward -> unscale_ -> clip_grad_norm_ -> step -> update
          ob:zero_grad()
          local lb = F.mse_loss(mb(x), y)
          assert.are.equal(la:item(), lb:item())
          local scaled = lb * ref.scale
          scaled:backward()
          if plant[t] then keel.no_grad(function() mb[3].bias.grad[2] = plant[t] end) end
          local found = ref_unscale(mb:parameters(), ref.scale)
          local norm = clip.clip_grad_norm_(mb:parameters(), 0.5)
          if not found then
            ob:step()
            assert.are.equal(norm, r.grad_norm)
            assert.are.equal(norm > 0.5, r.clipped)
          end
          ref_update(ref, found)
          assert.are.equal(ref.scale, sc:get_scale())
          assert.are.equal(list_bytes(mb:parameters()), list_bytes(ma:parameters()))
        end
        assert.are.equal(opt_bytes(ob), opt_bytes(oa))
        -- backoffs at 7, 8, 21; growth after every 5 clean steps in between
        assert.are.same({65536.0, 65536.0, 65536.0, 65536.0, 131072.0, 131072.0, 65536.0, 32768.0}, {table.unpack(seen, 1, 8)})
        assert.are.equal(3, oa.counters.overflow)
        assert.are.equal(37, oa.step_count)
      end)
    end

    it("leaves .grad scaled on the fused path; unscale_ unscales it in place", function()
      local m = model("float64")
      local opt = optim.SGD(m:parameters(), {lr = 0.1})
      local sc = amp.GradScaler{init_scale = 1024}
      local x = keel.randn({4, 5}, {dtype = "float64"})
      sc:scale(m(x):sum()):backward()
      local g0 = m[1].weight.grad:clone()
      sc:step(opt)
      assert.are.equal(bytes(g0), bytes(m[1].weight.grad))
      sc:update()
      opt:zero_grad()
      sc:scale(m(x):sum()):backward()
      g0 = m[1].weight.grad:clone()
      sc:unscale_(opt)
      assert.are.equal(bytes(g0 * (1 / 1024)), bytes(m[1].weight.grad))
      assert.is_true(sc:step(opt).applied)
    end)

    it("on_grad hooks see unscaled statistics", function()
      local m = model("float64")
      local opt = optim.SGD(m:parameters(), {lr = 0.1})
      local x = keel.randn({4, 5}, {dtype = "float64"})
      m(x):sum():backward()
      local want = math.sqrt((m[1].weight.grad ^ 2):sum():item())
      opt:zero_grad()
      local norms = {}
      local h = m:on_grad(function(name, g, stats) norms[name] = stats.norm end)
      local sc = amp.GradScaler()
      sc:scale(m(x):sum()):backward()
      sc:step(opt)
      h:remove()
      H.assert_close(norms["1.weight"], want, 1e-12)
    end)
  end)

  describe("on_grad hooks in a scaled step", function()
    it("a replacement gradient is read like .grad (scaled); later hooks see its unscaled statistics", function()
      local m = nn.Linear(2, 1)
      m:to("float64")
      local opt = optim.SGD(m:parameters(), {lr = 0.5})
      local sc = amp.GradScaler{init_scale = 4}
      local w0 = H.flat(m.weight)
      local norm
      local h1 = m:on_grad(function(name)
        if name == "weight" then return keel.tensor({{8.0, -4.0}}, {dtype = "float64"}) end
      end)
      local h2 = m:on_grad(function(name, _, stats) if name == "weight" then norm = stats.norm end end)
      sc:scale(m(keel.ones({3, 2}, {dtype = "float64"})):sum()):backward()
      local r = sc:step(opt)
      h1:remove()
      h2:remove()
      assert.is_true(r.applied)
      assert.are.equal(math.sqrt(5), norm)
      assert.are.same({w0[1] - 0.5 * 2, w0[2] + 0.5 * 1}, H.flat(m.weight))
    end)
  end)

  describe("overflow", function()
    it("is judged on the unscaled values: a finite gradient that a scale below 1 makes Inf skips", function()
      local w = nn.Parameter(keel.zeros(4))
      local opt = optim.SGD({w}, {lr = 1e-40})
      local sc = amp.GradScaler{init_scale = 2.0 ^ -30}
      sc:scale(keel.tensor({1.0}))
      w.grad = keel.tensor({1e30, -1e30, 1.0, 1e29})   -- x 2^30: two overflow float32
      local r = sc:step(opt)
      assert.is_false(r.applied)
      assert.are.equal("overflow", r.reason)
      assert.are.equal(2, r.nonfinite)
      assert.are.equal(math.huge, r.grad_norm)
      sc:update()
      assert.are.equal(2.0 ^ -31, sc:get_scale())
      w.grad = keel.tensor({1e29, -1e29, 1.0, 1e29})   -- x 2^31: within range
      r = sc:step(opt)
      assert.is_true(r.applied)
      H.assert_close(r.grad_norm, math.sqrt(3 * (1e29 * 2.0 ^ 31) ^ 2 + 2.0 ^ 62), 1e-6)
      sc:update()
      -- the explicit unscale_ sees it too
      w.grad = keel.tensor({1e30, 1.0, 1.0, 1.0})
      sc:unscale_(opt)
      assert.are.equal(math.huge, w.grad[1])
      assert.is_false(sc:step(opt).applied)
    end)

    it("skips whatever the non-finite policy, and does not count as a non-finite step", function()
      for _, policy in ipairs{"error", "skip", "zero", "keep"} do
        local w = nn.Parameter(keel.tensor({1.0, 2.0}))
        local opt = optim.SGD({w}, {lr = 0.1, nonfinite = policy})
        local sc = amp.GradScaler()
        sc:scale(keel.tensor({1.0}))
        w.grad = keel.tensor({0 / 0, 1.0})
        local r = sc:step(opt)
        assert.is_false(r.applied)
        assert.are.equal("overflow", r.reason)
        assert.is_true(r.overflow)
        assert.are.same({1.0, 2.0}, H.flat(w))
        local c = opt.counters
        assert.are.same({1, 0, 0, 0}, {c.overflow, c.skipped, c.errors, c.nonfinite_steps})
        sc:update()
        assert.are.equal(32768.0, sc:get_scale())
      end
    end)

    it("a plain opt:step() after scaler steps has no loss scale", function()
      local w = nn.Parameter(keel.tensor({1.0, 2.0}, {dtype = "float64"}))
      local opt = optim.SGD({w}, {lr = 0.5})
      local sc = amp.GradScaler{init_scale = 4}
      sc:scale(keel.tensor({1.0}))
      w.grad = keel.tensor({4.0, 8.0}, {dtype = "float64"})
      sc:step(opt)
      sc:update()
      assert.are.same({0.5, 1.0}, H.flat(w))
      w.grad = keel.tensor({1.0, 1.0}, {dtype = "float64"})
      local r = opt:step()
      assert.is_nil(r.scale)
      assert.are.same({0.0, 0.5}, H.flat(w))
    end)
  end)

  describe("errors (PyTorch's)", function()
    local function setup()
      local w = nn.Parameter(keel.tensor({1.0, 2.0}))
      local opt = optim.SGD({w}, {lr = 0.1})
      local sc = amp.GradScaler()
      return w, opt, sc
    end

    it("unscale_ twice in a step, or after step", function()
      local w, opt, sc = setup()
      sc:scale((w * w):sum()):backward()
      sc:unscale_(opt)
      H.assert_error(function() sc:unscale_(opt) end,
        "unscale_() has already been called on this optimizer since the last update()")
      sc:step(opt)
      H.assert_error(function() sc:unscale_(opt) end, "unscale_() is being called after step()")
      H.assert_error(function() sc:step(opt) end, "step() has already been called since the last update()")
      sc:update()
      opt:zero_grad()
      sc:scale((w * w):sum()):backward()
      sc:unscale_(opt)   -- fine again after update
    end)

    it("update without a step, step without gradients, before any scale, with a closure", function()
      local w, opt, sc = setup()
      H.assert_error(function() sc:step(opt) end, "did not call scaler:scale(loss)")
      sc:scale((w * w):sum())
      H.assert_error(function() sc:update() end, "no inf checks were recorded prior to update")
      H.assert_error(function() sc:step(opt) end, "no inf checks were recorded for this optimizer")
      H.assert_error(function() sc:step(opt, function() return 1 end) end, "closure use is not supported")
      H.assert_error(function() sc:step({}) end, "scaler:step: argument #1: expected an optimizer")
      H.assert_error(function() sc:update(-1) end, "new_scale should be a number > 0")
      assert.are.equal(8.0, sc:update(8.0))   -- a given scale needs no step
      assert.are.equal(8.0, sc:get_scale())
      assert.are.equal(0, sc:get_growth_tracker())
    end)

    it("a disabled scaler passes through", function()
      local w, opt = setup()
      local sc = amp.GradScaler{enabled = false}
      local loss = (w * w):sum()
      assert.are.equal(loss, sc:scale(loss))
      loss:backward()
      sc:unscale_(opt)
      local r = sc:step(opt)
      assert.is_true(r.applied)
      assert.is_nil(r.scale)
      assert.is_nil(sc:update())
      assert.are.equal(1.0, sc:get_scale())
      assert.is_false(sc:is_enabled())
    end)
  end)
end)
