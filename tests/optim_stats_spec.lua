-- optim_stats_spec.lua: the optimizer's statistics (one C pass over each
-- gradient and its weight) against float64 Lua loops, the update sizes
-- against the parameters' actual change, the step's halves (prepare, then
-- apply or cancel), lr_scale, the on_grad hooks, the guard's seat in the
-- step and the "step" topic.
local H = require "helper"
local keel = H.keel
local optim, clip = keel.optim, keel.clip
local hooks = require "keel.hooks"

local CTOR = {sgd = optim.SGD, adam = optim.Adam, adamw = optim.AdamW, rmsprop = optim.RMSprop,
              adagrad = optim.Adagrad}
local KIND_OPTS = {
  sgd = {lr = 0.1, momentum = 0.9, weight_decay = 0.01},
  adam = {lr = 0.01, weight_decay = 0.01},
  adamw = {lr = 0.01, weight_decay = 0.1},
  rmsprop = {lr = 0.01, momentum = 0.5, centered = true},
  adagrad = {lr = 0.1, lr_decay = 0.01},
}

local function copy(t)
  local o = {}
  for k, v in pairs(t) do o[k] = v end
  return o
end

-- A tensor from a flat list of values.
local function tensor(vals, shape, dtype)
  return keel.tensor(H.nest(vals, shape), {dtype = dtype})
end

-- Exact bits of a number.
local function bits(x) return string.pack("<d", x) end

-- Every value of two tensors has the same bits.
local function same_bits(a, b, what)
  local fa, fb = H.flat(a), H.flat(b)
  assert.equals(#fa, #fb, what)
  for i = 1, #fa do
    if bits(fa[i]) ~= bits(fb[i]) then
      H.fail(("%s: element %d is %.17g, was %.17g"):format(what or "tensor", i, fa[i], fb[i]))
    end
  end
end

-- The reference statistics of a flat list g (and weight list w).
local function ref_stats(g, w)
  local r = {numel = #g, nan = 0, inf = 0, zeros = 0, sum = 0, sumsq = 0, sum_abs = 0, max_abs = 0, w_sumsq = 0}
  for i, x in ipairs(g) do
    if x ~= x then r.nan = r.nan + 1
    elseif x == math.huge or x == -math.huge then r.inf = r.inf + 1
    else
      if x == 0 then r.zeros = r.zeros + 1 end
      r.sum = r.sum + x
      r.sumsq = r.sumsq + x * x
      r.sum_abs = r.sum_abs + math.abs(x)
      r.max_abs = math.max(r.max_abs, math.abs(x))
    end
    if w then r.w_sumsq = r.w_sumsq + w[i] * w[i] end
  end
  return r
end

-- n values in [-2, 2) with zeros, NaN, +Inf and -Inf planted at fixed places.
local function planted(n, seed, plant)
  local v = H.values(n, -2, 2, seed)
  for i = 5, n, 97 do v[i] = 0 end
  if plant then
    v[3] = 0 / 0
    v[n] = 0 / 0
    v[math.min(n, 4097)] = math.huge
    v[math.max(1, n - 9)] = -math.huge
  end
  return v
end

local SHAPES = {{10}, {4103}, {3, 1501}, {8200}, {7}}

local function check_stats(st, ref, rtol, what)
  for _, k in ipairs{"numel", "nan", "inf", "zeros"} do assert.equals(ref[k], st[k], what .. " " .. k) end
  assert.equals(ref.max_abs, st.max_abs, what .. " max_abs")
  for _, k in ipairs{"sum", "sumsq", "sum_abs", "w_sumsq"} do
    if not H.close(st[k], ref[k], rtol * (ref.sum_abs + ref.w_sumsq + 1), rtol) then
      H.fail(("%s %s: got %.17g, expected %.17g"):format(what, k, st[k], ref[k]))
    end
  end
  H.assert_close(st.norm, math.sqrt(ref.sumsq), rtol, what .. " norm")
  H.assert_close(st.weight_norm, math.sqrt(ref.w_sumsq), rtol, what .. " weight_norm")
end

-- {======================================================================
-- C statistics equal reference computations
-- =======================================================================

describe("statistics of the step", function()
  for _, dtype in ipairs{"float32", "float64"} do
    it("equal float64 Lua loops (" .. dtype .. ", planted NaN/Inf/zeros, blocks and tails)", function()
      local P, grads, weights = {}, {}, {}
      for i, shape in ipairs(SHAPES) do
        local n = H.numel(shape)
        P[i] = tensor(H.values(n, -1, 1, 100 + i), shape, dtype):requires_grad_()
        P[i].grad = tensor(planted(n, 200 + i, i % 2 == 0), shape, dtype)
        grads[i] = H.flat(P[i].grad)
        weights[i] = H.flat(P[i])
      end
      local opt = optim.SGD(P, {lr = 0, nonfinite = "skip"})
      local r = opt:step()
      assert.is_false(r.applied)
      assert.equals("nonfinite", r.reason)
      local st = opt:grad_stats()
      local nonfinite = 0
      for i = 1, #SHAPES do
        local ref = ref_stats(grads[i], weights[i])
        nonfinite = nonfinite + ref.nan + ref.inf
        check_stats(st[i], ref, 1e-12, ("parameter %d"):format(i))
        assert.is_nil(st[i].update_ratio)
      end
      assert.equals(nonfinite, r.nonfinite)
      -- the standalone function agrees on the gradient's part: to the bit
      -- on the CPU (one pass in element order both times); on CUDA the
      -- step's statistics come from the multi-tensor kernels, chunked
      -- otherwise than the standalone call's, so the sums agree up to
      -- their summation order (counts and max_abs still exactly)
      local alone = clip.grad_stats(P[2].grad)[1]
      for _, k in ipairs{"numel", "nan", "inf", "zeros", "max_abs"} do
        assert.equals(bits(st[2][k]), bits(alone[k]), k)
      end
      for _, k in ipairs{"sum", "sumsq", "sum_abs"} do
        if P[2].device == "cpu" then
          assert.equals(bits(st[2][k]), bits(alone[k]), k)
        elseif not H.close(alone[k], st[2][k], 1e-12 * (st[2].sum_abs + 1), 1e-12) then
          H.fail(("standalone %s: got %.17g, the step's %.17g"):format(k, alone[k], st[2][k]))
        end
      end
    end)
  end

  it("are those of the finite elements under zero/keep, and the weight's are its own", function()
    local p = tensor({1, 2, 3, 4}, {4}, "float64"):requires_grad_()
    p.grad = tensor({0 / 0, -3, 0, math.huge}, {4}, "float64")
    local opt = optim.SGD({p}, {lr = 0, nonfinite = "keep"})
    assert.is_true(opt:step().applied)
    local s = opt:grad_stats()[1]
    assert.equals(1, s.nan); assert.equals(1, s.inf); assert.equals(1, s.zeros)
    assert.equals(-3, s.sum); assert.equals(9, s.sumsq); assert.equals(3, s.max_abs)
    assert.equals(30, s.w_sumsq)
  end)

  it("give top_param and top_share: the largest share of the global sum of squares", function()
    local a = tensor({1, 1}, {2}, "float64"):requires_grad_()
    local b = tensor({1, 1, 1}, {3}, "float64"):requires_grad_()
    local c = tensor({1}, {1}, "float64"):requires_grad_()
    a.grad = tensor({1, 2}, {2}, "float64")       -- 5
    b.grad = tensor({3, 0, 1}, {3}, "float64")    -- 10
    local opt = optim.SGD({a, b, c}, {lr = 0.1})
    local r = opt:step()
    assert.equals(2, r.top_param)
    H.assert_close(r.top_share, 10 / 15, 1e-15)
    a.grad = keel.zeros({2}, {dtype = "float64"})
    b.grad = nil
    r = opt:step()
    assert.is_nil(r.top_param)
    assert.equals(0, r.top_share)
  end)

  it("have the same bits with or without AVX2 (KEEL_SIMD=sse2, a child process)", function()
    local outs = H.run_keel([[
      local keel = require "keel"
      local out = {}
      for _, dtype in ipairs{"float32", "float64"} do
        for _, kind in ipairs{"SGD", "Adam", "RMSprop", "Adagrad"} do
          keel.manual_seed(3)
          local P = {}
          for i, n in ipairs{4103, 9, 8200} do
            P[i] = keel.randn({n}, {dtype = dtype}):requires_grad_()
          end
          local opt = keel.optim[kind](P, {lr = 0.01, momentum = kind == "SGD" and 0.9 or nil,
                                          clip = keel.clip.global_norm(5)})
          for _ = 1, 3 do
            for _, p in ipairs(P) do p.grad = keel.randn(p.shape, {dtype = dtype}) * 2 end
            local r = opt:step()
            out[#out + 1] = ("%a %a"):format(r.grad_norm, r.clip_coef)
            for _, s in ipairs(opt:grad_stats()) do
              out[#out + 1] = ("%a %a %a %a %a %a %d"):format(s.sumsq, s.sum, s.sum_abs, s.max_abs, s.w_sumsq,
                                                             s.update_sumsq, s.zeros)
            end
          end
          for _, p in ipairs(P) do
            for _, x in ipairs(p:totable()) do out[#out + 1] = ("%a"):format(x) end
          end
        end
      end
      io.write(table.concat(out, "\n"))
    ]], {"", "KEEL_SIMD=sse2 "})
    if not outs then pending("KEEL_BIN is not set (tools/test.sh sets it)") return end
    assert.is_truthy(outs[1]:match("^0x"), outs[1]:sub(1, 200))
    assert.is_true(outs[1] == outs[2], "the two paths differ")
  end)
end)

-- }======================================================================

-- {======================================================================
-- Update sizes
-- =======================================================================

local function diff_ratio(before, after)
  local d2, w2 = 0, 0
  local a, b = H.flat(after), H.flat(before)
  for i = 1, #a do
    d2 = d2 + (a[i] - b[i]) ^ 2
    w2 = w2 + b[i] ^ 2
  end
  return d2, math.sqrt(d2) / math.sqrt(w2)
end

-- The weight's sum of squares comes from the previous update's pass (it
-- sums the values it writes) unless something wrote to the parameter
-- since: then the statistics pass reads the parameter again.
local function wsq_of(p) return (p:double() * p:double()):sum():item() end

describe("w_sumsq after writes between steps", function()
  for _, dtype in ipairs{"float64", "float32"} do
    local tol = dtype == "float64" and 1e-13 or 1e-6
    for _, kind in ipairs{"sgd", "adam", "rmsprop"} do
      it(("follows mul_, copy_ and load_state_dict (%s, %s)"):format(kind, dtype), function()
        local m = keel.nn.Linear(37, 5, {dtype = dtype})
        local P = m:parameters()
        local opt = CTOR[kind](P, copy(KIND_OPTS[kind]))
        local function step(t, what)
          local want = {}
          for i, p in ipairs(P) do
            p.grad = tensor(H.values(p:numel(), -1, 1, 40 * t + i), p.shape, dtype)
            want[i] = wsq_of(p)
          end
          opt:step()
          for i, s in ipairs(opt:grad_stats()) do
            H.assert_close(s.w_sumsq, want[i], {atol = 0, rtol = tol}, ("%s: parameter %d"):format(what, i))
          end
        end
        step(1, "first step")
        step(2, "nothing in between")
        keel.no_grad(function() P[1]:mul_(2) end)
        step(3, "after mul_")
        keel.no_grad(function() P[2]:copy_(keel.ones(P[2].shape, {dtype = dtype}) * 3) end)
        step(4, "after copy_")
        local other = keel.nn.Linear(37, 5, {dtype = dtype})
        m:load_state_dict(other:state_dict())
        step(5, "after load_state_dict")
        step(6, "nothing in between again")
      end)
    end
  end

  it("per AGC unit, and when the chain's units change", function()
    local P = {tensor(H.values(6 * 9, -1, 1, 5), {6, 9}, "float64"):requires_grad_(),
               tensor(H.values(7, -1, 1, 6), {7}, "float64"):requires_grad_()}
    local opt = optim.SGD(P, {lr = 0.5, clip = clip.agc(0.05)})
    for t = 1, 5 do
      if t == 3 then opt:set_clip(nil) end             -- one unit per tensor now
      if t == 4 then opt:set_clip(clip.agc(0.05)) end   -- back to rows
      local want = {}
      for i, p in ipairs(P) do
        p.grad = tensor(H.values(p:numel(), -2, 2, 9 * t + i), p.shape, "float64")
        want[i] = wsq_of(p)
      end
      local rep = opt:step()
      for i, s in ipairs(opt:grad_stats()) do
        H.assert_close(s.w_sumsq, want[i], {atol = 0, rtol = 1e-13}, ("step %d parameter %d"):format(t, i))
      end
      assert.is_true(rep.applied)
    end
  end)

  it("AGC clips by the current weights after a write between steps", function()
    local function run(write)
      local p = tensor(H.values(4 * 8, -1, 1, 3), {4, 8}, "float64"):requires_grad_()
      local opt = optim.SGD({p}, {lr = 0.1, clip = clip.agc(0.02)})
      for t = 1, 3 do
        p.grad = tensor(H.values(32, -3, 3, 70 + t), {4, 8}, "float64")
        opt:step()
        if t == 1 and write then keel.no_grad(function() p:mul_(10) end) end
        if t == 1 and not write then
          -- the same values, written in a fresh optimizer's world
          keel.no_grad(function() p:mul_(10) end)
          opt = optim.SGD({p}, {lr = 0.1, clip = clip.agc(0.02)})
        end
      end
      return H.flat(p)
    end
    H.assert_close(run(true), run(false), 0)
  end)
end)

describe("update_ratio", function()
  for _, dtype in ipairs{"float64", "float32"} do
    for _, kind in ipairs{"sgd", "adam", "adamw", "rmsprop", "adagrad"} do
      it(("equals ||w_after - w_before|| / ||w_before|| (%s, %s)"):format(kind, dtype), function()
        local P = {}
        for i, shape in ipairs{{5000}, {3, 7}, {1}} do
          P[i] = tensor(H.values(H.numel(shape), -1, 1, 10 + i), shape, dtype):requires_grad_()
        end
        local opts = copy(KIND_OPTS[kind])
        opts.clip = clip.norm(0.5)
        local opt = CTOR[kind](P, opts)
        local tol = dtype == "float64" and 1e-12 or 1e-6
        for t = 1, 3 do
          local before = {}
          for i, p in ipairs(P) do
            p.grad = tensor(H.values(p:numel(), -1, 1, 20 * t + i), p.shape, dtype)
            before[i] = p:clone()
          end
          opt:step()
          local st = opt:grad_stats()
          for i, p in ipairs(P) do
            local d2, ratio = diff_ratio(before[i], p)
            H.assert_close(st[i].update_sumsq, d2, {atol = 0, rtol = tol}, ("step %d parameter %d"):format(t, i))
            H.assert_close(st[i].update_ratio, ratio, {atol = 0, rtol = tol})
            H.assert_close(st[i].w_sumsq, (before[i]:double() * before[i]:double()):sum():item(),
                           {atol = 0, rtol = 1e-12})
          end
        end
      end)
    end
  end

  it("keeps each parameter's last applied update; is 0 where the keep policy left it", function()
    local a = tensor({1, 2}, {2}, "float64"):requires_grad_()
    local b = tensor({3, 4}, {2}, "float64"):requires_grad_()
    local opt = optim.SGD({a, b}, {lr = 0.5, nonfinite = "keep"})
    a.grad = tensor({1, 1}, {2}, "float64")
    opt:step()
    local r1 = opt:grad_stats()[1].update_ratio
    H.assert_close(r1, math.sqrt(0.5) / math.sqrt(5), 1e-15)
    assert.is_nil(opt:grad_stats()[2].update_ratio)
    a.grad = nil
    b.grad = tensor({0 / 0, math.huge}, {2}, "float64")
    opt:step()
    local st = opt:grad_stats()
    assert.equals(r1, st[1].update_ratio)   -- a had no gradient: its last update stands
    assert.equals(0, st[2].update_ratio)
    assert.equals(0, st[2].update_sumsq)
  end)
end)

-- }======================================================================

-- {======================================================================
-- prepare and cancel change nothing
-- =======================================================================

-- Everything an optimizer has, as plain values: parameters, state_dict
-- (state, step counts, counters, clip state), the step count.
local function everything(opt, P)
  local sd = opt:state_dict()
  local out = {params = {}, state = {}, clip = sd.clip, counters = sd.counters, step_count = sd.step_count}
  for i, p in ipairs(P) do out.params[i] = p:totable() end
  for i, st in pairs(sd.state) do
    out.state[i] = {}
    for k, v in pairs(st) do out.state[i][k] = type(v) == "number" and v or v:totable() end
  end
  return out
end

local function same_everything(a, b, skip_counter)
  for i in ipairs(a.params) do same_bits(b.params[i], a.params[i], "parameter " .. i) end
  for i, st in pairs(a.state) do
    for k, v in pairs(st) do
      if type(v) == "number" then assert.equals(v, b.state[i][k]) else same_bits(b.state[i][k], v, k) end
    end
  end
  for i, cs in pairs(a.clip) do
    assert.equals(#cs.history, #b.clip[i].history, "clip history length")
    for j, x in ipairs(cs.history) do assert.equals(bits(x), bits(b.clip[i].history[j])) end
    assert.equals(bits(cs.mean), bits(b.clip[i].mean))
    assert.equals(bits(cs.var), bits(b.clip[i].var))
    assert.equals(cs.initialized, b.clip[i].initialized)
  end
  for k, v in pairs(a.counters) do
    if k ~= skip_counter then assert.equals(v, b.counters[k], "counter " .. k) end
  end
  assert.equals(a.step_count, b.step_count)
end

local function guard_of(fn) return {_decide = fn} end

describe("a cancelled step", function()
  for _, kind in ipairs{"sgd", "adam", "rmsprop", "adagrad"} do
    it("leaves parameters, state, counters and adaptive clip state byte-identical (" .. kind .. ")", function()
      local P = {}
      for i, shape in ipairs{{40}, {4, 5}} do
        P[i] = tensor(H.values(H.numel(shape), -1, 1, i), shape, "float32"):requires_grad_()
      end
      local opts = copy(KIND_OPTS[kind])
      opts.clip = clip.chain{clip.percentile{p = 50, history = 4}, clip.zscore{z = 1.5, warmup = 2}}
      local opt = CTOR[kind](P, opts)
      local function grads(t)
        for i, p in ipairs(P) do p.grad = tensor(H.values(p:numel(), -t, t, 30 * t + i), p.shape, "float32") end
      end
      for t = 1, 4 do grads(t); opt:step() end
      grads(50)   -- a spike: clipping would act and the adaptive state move
      local before = everything(opt, P)
      local seen
      opt._guard = guard_of(function(_, o, r, loss)
        seen = {r = r, loss = loss, stats = o:grad_stats()}
        return "skip"
      end)
      local r = opt:step(1.5)
      assert.is_false(r.applied)
      assert.equals("guard", r.reason)
      assert.equals(1.5, seen.loss)
      assert.is_true(seen.r.grad_norm > 0)
      assert.equals(2, #seen.stats)
      local after = everything(opt, P)
      same_everything(before, after, "cancelled")
      assert.equals(before.counters.cancelled + 1, after.counters.cancelled)
      -- and the next applied step is the one the optimizer would have taken
      opt._guard = nil
      local twin = CTOR[kind]({P[1]:detach():clone():requires_grad_(), P[2]:detach():clone():requires_grad_()}, opts)
      twin:load_state_dict(opt:state_dict())
      local Q = twin:parameters()
      for i, p in ipairs(P) do Q[i].grad = p.grad:clone() end
      local r1, r2 = opt:step(), twin:step()
      assert.equals(bits(r2.clip_coef), bits(r1.clip_coef))
      for i = 1, #P do same_bits(P[i], Q[i], "parameter " .. i) end
    end)
  end

  it("with a non-finite gradient counts it, and the skip policy reports nonfinite", function()
    local p = tensor({1, 2}, {2}, "float64"):requires_grad_()
    local opt = optim.Adam({p}, {nonfinite = "skip"})
    p.grad = tensor({0 / 0, 1}, {2}, "float64")
    local decided
    opt._guard = guard_of(function(_, _, r) decided = r.nonfinite; return "apply" end)
    local r = opt:step()
    assert.equals(1, decided)
    assert.is_false(r.applied)
    assert.equals("nonfinite", r.reason)
    assert.equals(1, opt.counters.skipped)
    opt._guard = guard_of(function() return "skip" end)
    r = opt:step()
    assert.equals("guard", r.reason)
    assert.equals(1, opt.counters.cancelled)
    assert.equals(2, opt.counters.nonfinite_steps)
    assert.equals(0, opt.step_count)
    H.assert_close(p, {1, 2}, 0)
  end)

  it("a rollback inside the guard (load_state_dict) is then skipped; applying it is refused", function()
    local p = tensor({1, 2, 3}, {3}, "float64"):requires_grad_()
    local opt = optim.Adam({p}, {lr = 0.1, clip = clip.percentile{p = 50}})
    p.grad = tensor({1, 1, 1}, {3}, "float64")
    opt:step()
    local snap, params = opt:state_dict(), p:clone()
    opt:step()
    p.grad = tensor({30, -30, 30}, {3}, "float64")
    local function rollback()
      keel.no_grad(function() p:copy_(params) end)
      opt:load_state_dict(snap)
    end
    opt._guard = guard_of(function() rollback(); return "skip" end)
    local r = opt:step()
    assert.equals("guard", r.reason)
    H.assert_close(r.grad_norm, math.sqrt(2700), 1e-12)   -- what prepare measured stays in the report
    assert.equals(1, r.top_param)
    assert.equals(1, opt.step_count)
    same_bits(p, params, "rolled back")
    opt._guard = guard_of(function() rollback(); return "apply" end)
    H.assert_error(function() opt:step() end, "Adam.apply: the prepared step is stale")
    assert.equals(1, opt.step_count)
    opt._guard = nil
    assert.is_true(opt:step().applied)
  end)

  it("the guard may change lr_scale before the update; its errors change nothing", function()
    local p = tensor({1, 2}, {2}, "float64"):requires_grad_()
    local opt = optim.SGD({p}, {lr = 0.5})
    p.grad = tensor({1, 1}, {2}, "float64")
    opt._guard = guard_of(function(_, o) o.lr_scale = 0.25; return "apply" end)
    local r = opt:step()
    assert.equals(0.125, r.lr)
    H.assert_close(p, {0.875, 1.875}, 0)
    assert.equals(0.5, opt.param_groups[1].lr)
    local before = everything(opt, {p})
    opt._guard = guard_of(function() error("guard: too many retries") end)
    H.assert_error(function() opt:step() end, "guard: too many retries")
    opt._guard = guard_of(function() return "maybe" end)
    H.assert_error(function() opt:step() end, "SGD.step: the guard's _decide returned maybe")
    opt._guard = guard_of(function(_, o) o.lr_scale = "half"; return "apply" end)
    H.assert_error(function() opt:step() end, "SGD.step: lr_scale must be a finite number >= 0, got half")
    opt.lr_scale = 0.25
    same_everything(before, everything(opt, {p}))
  end)
end)

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

describe("the percentile decision before the history moves", function()
  it("equals numpy's over the window, with ties and cancelled steps between", function()
    local rnd = H.rng(99)
    for _, window in ipairs{1, 2, 3, 5} do
      for _, q in ipairs{0, 30, 50, 100} do
        local p = keel.tensor({0.0, 0.0}, {dtype = "float64", requires_grad = true})
        local opt = optim.SGD({p}, {lr = 0.0, clip = clip.percentile{p = q, history = window}})
        local hist = {}
        for t = 1, 40 do
          local n = ({1, 2, 2, 3, 5})[1 + math.floor(rnd() * 5)]   -- many ties
          p.grad = keel.tensor({0.6 * n, 0.8 * n}, {dtype = "float64"})
          local cancel = rnd() < 0.3
          opt._guard = cancel and guard_of(function() return "skip" end) or nil
          local r = opt:step()
          local win = {}
          for j = math.max(1, #hist - window + 2), #hist do win[#win + 1] = hist[j] end
          win[#win + 1] = r.grad_norm
          if not cancel then
            hist[#hist + 1] = r.grad_norm
            local thr = np_percentile(win, q)
            H.assert_close(r.clip_coef, math.min(1, thr / (r.grad_norm + 1e-6)), 1e-15,
                           ("window %d, p %d, step %d"):format(window, q, t))
          end
        end
        local st = opt:state_dict().clip[1].history
        assert.equals(math.min(window, #hist), #st)
        for j = 1, #st do assert.equals(hist[#hist - #st + j], st[j]) end
      end
    end
  end)
end)

-- }======================================================================

-- {======================================================================
-- lr_scale
-- =======================================================================

describe("lr_scale", function()
  it("multiplies every group's lr at apply time, under a schedule", function()
    local function run(scale, lr)
      local a = tensor(H.values(6, -1, 1, 1), {6}, "float64"):requires_grad_()
      local b = tensor(H.values(4, -1, 1, 2), {4}, "float64"):requires_grad_()
      local opt = optim.Adam({{params = {a}, lr = lr}, {params = {b}, lr = 2 * lr}})
      local sched = optim.schedule.step(opt, {step_size = 2, gamma = 0.5})
      opt.lr_scale = scale
      local lrs = {}
      for t = 1, 5 do
        a.grad = tensor(H.values(6, -1, 1, 10 + t), {6}, "float64")
        b.grad = tensor(H.values(4, -1, 1, 20 + t), {4}, "float64")
        lrs[t] = opt:step().lr
        sched:step()
      end
      return a, b, lrs, opt
    end
    local a1, b1, lrs1, opt1 = run(0.25, 0.1)
    local a2, b2, lrs2 = run(1, 0.025)
    same_bits(a1, a2, "group 1")
    same_bits(b1, b2, "group 2")
    for t = 1, 5 do assert.equals(lrs2[t], lrs1[t]) end
    assert.equals(0.1 * 0.5 ^ 2, opt1.param_groups[1].lr)   -- the schedule's lr, untouched by the scale
  end)

  it("is checked, and a bad value changes nothing", function()
    local p = tensor({1}, {1}, "float64"):requires_grad_()
    local opt = optim.SGD({p}, {lr = 0.1})
    p.grad = tensor({1}, {1}, "float64")
    for _, bad in ipairs{-1, 0 / 0, math.huge, "x"} do
      opt.lr_scale = bad
      H.assert_error(function() opt:step() end, "SGD.step: lr_scale must be a finite number >= 0")
    end
    assert.equals(0, opt.step_count)
    assert.equals(0, opt.counters.steps + opt.counters.cancelled)
    opt.lr_scale = 0
    assert.is_true(opt:step().applied)
    H.assert_close(p, {1}, 0)
  end)
end)

-- }======================================================================

-- {======================================================================
-- on_grad hooks
-- =======================================================================

-- Registers fn as an on_grad hook of p (as model:on_grad does).
local function on_grad(p, name, fn)
  local list = hooks.grad[p]
  if not list then list = {}; hooks.grad[p] = list end
  return hooks.add(list, {fn = fn, name = name})
end

describe("on_grad hooks", function()
  local handles
  before_each(function() handles = {} end)
  after_each(function() for _, h in ipairs(handles) do h:remove() end end)

  local function model()
    local P = {}
    for i, shape in ipairs{{6}, {2, 3}, {5}} do
      P[i] = tensor(H.values(H.numel(shape), -1, 1, 40 + i), shape, "float64"):requires_grad_()
      P[i].grad = tensor(planted(H.numel(shape), 50 + i), shape, "float64")
    end
    return P
  end

  it("are called in parameter order with names, gradients and C statistics", function()
    local P = model()
    P[2].grad = nil
    local opt = optim.SGD(P, {lr = 0.1})
    local calls = {}
    for i, p in ipairs(P) do
      handles[#handles + 1] = on_grad(p, "p" .. i, function(name, g, stats)
        calls[#calls + 1] = {name = name, g = g:totable(), stats = stats}
      end)
    end
    local want = {}
    for i, p in ipairs(P) do want[i] = {g = p.grad and H.flat(p.grad), w = H.flat(p)} end
    opt:step()
    assert.equals(2, #calls)                        -- p2 has no gradient
    for j, i in ipairs{1, 3} do
      local c, ref = calls[j], ref_stats(want[i].g, want[i].w)
      assert.equals("p" .. i, c.name)
      H.assert_close(H.flat(c.g), want[i].g, 0)
      local s, n = c.stats, ref.numel
      H.assert_close(s.norm, math.sqrt(ref.sumsq), 1e-14)
      assert.equals(ref.max_abs, s.max_abs)
      H.assert_close(s.mean, ref.sum / n, 1e-14)
      H.assert_close(s.rms, math.sqrt(ref.sumsq / n), 1e-14)
      H.assert_close(s.std, math.sqrt(ref.sumsq / n - (ref.sum / n) ^ 2), 1e-12)
      H.assert_close(s.weight_norm, math.sqrt(ref.w_sumsq), 1e-14)
      assert.equals(ref.zeros, s.zeros)
      assert.equals(0, s.nonfinite)
      assert.equals(n, s.numel)
      assert.equals(1, s.step)
      assert.is_nil(s.update_ratio)
    end
    -- the next step's hooks see the update ratio of this one
    local ratio = opt:grad_stats()[1].update_ratio
    calls = {}
    opt:step()
    assert.equals(ratio, calls[1].stats.update_ratio)
    assert.equals(2, calls[1].stats.step)
  end)

  it("see non-finite counts before the policy acts", function()
    local p = tensor({1, 2, 3}, {3}, "float64"):requires_grad_()
    p.grad = tensor({0 / 0, math.huge, 1}, {3}, "float64")
    local opt = optim.SGD({p}, {lr = 0.1, nonfinite = "skip"})
    local seen
    handles[1] = on_grad(p, "w", function(_, _, s) seen = s end)
    opt:step()
    assert.equals(2, seen.nonfinite)
    assert.equals(1, seen.nan)
    assert.equals(1, seen.inf)
    assert.equals(1, seen.mean)
  end)

  it("may replace a gradient: later hooks and the update see the new one", function()
    local P = model()
    local Q = {}
    for i, p in ipairs(P) do Q[i] = p:detach():clone():requires_grad_(); Q[i].grad = p.grad * 3 end
    Q[2].grad = P[2].grad:clone()
    local opt = optim.SGD(P, {lr = 0.1, clip = clip.global_norm(2.0)})
    local ref = optim.SGD(Q, {lr = 0.1, clip = clip.global_norm(2.0)})
    local later
    for _, i in ipairs{1, 3} do
      handles[#handles + 1] = on_grad(P[i], "p" .. i, function(_, g) return g * 3 end)
    end
    handles[#handles + 1] = on_grad(P[1], "p1", function(_, g, s) later = {g = g:totable(), norm = s.norm} end)
    local r = opt:step()
    local r2 = ref:step()
    H.assert_close(later.g, Q[1].grad:totable(), 0)
    H.assert_close(later.norm, math.sqrt((Q[1].grad * Q[1].grad):sum():item()), 1e-14)
    assert.equals(bits(r2.grad_norm), bits(r.grad_norm))
    for i = 1, 3 do same_bits(P[i], Q[i], "parameter " .. i) end
    H.assert_close(P[1].grad, Q[1].grad:totable(), 0)   -- the replacement stays as .grad
  end)

  it("an error aborts the step with nothing changed, with the hook's traceback", function()
    local P = model()
    local opt = optim.Adam(P, {lr = 0.1})
    opt:step()
    local before = everything(opt, P)
    local grads = {}
    for i, p in ipairs(P) do grads[i] = p.grad:totable() end
    handles[1] = on_grad(P[2], "fc.weight", function() error("hook exploded") end)
    local listener_calls = 0
    handles[2] = hooks.on("step", function() listener_calls = listener_calls + 1 end)
    local msg = H.assert_error(function() opt:step() end, "Adam.step: on_grad hook for 'fc.weight' failed",
                               "hook exploded", "stack traceback:", "optim_stats_spec.lua")
    assert.is_truthy(msg:find("^[^\n]*optim_stats_spec%.lua:%d+:"), msg)   -- points at the caller
    same_everything(before, everything(opt, P))
    for i, p in ipairs(P) do H.assert_close(p.grad, grads[i], 0) end
    assert.equals(0, listener_calls)
    -- a bad return value is an error too, and changes nothing
    handles[1]:remove()
    handles[3] = on_grad(P[1], "w", function() return keel.zeros{2} end)
    H.assert_error(function() opt:step() end, "on_grad hook for 'w' returned a float32 tensor of shape {2}",
                   "expected nil or a float64 tensor of shape {6}")
    handles[3]:remove()
    handles[4] = on_grad(P[1], "w", function() return 5 end)
    H.assert_error(function() opt:step() end, "returned number")
    handles[4]:remove()
    same_everything(before, everything(opt, P))
    -- and the optimizer steps normally afterwards
    assert.is_true(opt:step().applied)
    assert.equals(2, opt.step_count)
  end)

  it("are not called once removed, and a hook may remove itself", function()
    local P = model()
    local opt = optim.SGD(P, {lr = 0.1})
    local n = 0
    local h
    h = on_grad(P[1], "w", function() n = n + 1; h:remove() end)
    opt:step()
    opt:step()
    assert.equals(1, n)
  end)
end)

-- }======================================================================

-- {======================================================================
-- The loss and the "step" topic
-- =======================================================================

describe("the step report and the step topic", function()
  it("record the loss given as a number, a one-element tensor or a closure's result", function()
    local p = tensor({1}, {1}, "float64"):requires_grad_()
    local opt = optim.SGD({p}, {lr = 0.1})
    local got = {}
    local h = hooks.on("step", function(o, r, loss) got[#got + 1] = {o = o, r = r, loss = loss} end)
    p.grad = tensor({1}, {1}, "float64")
    local r1 = opt:step(2.5)
    local r2 = opt:step(keel.tensor({{0.75}}))
    p.grad = nil
    local r3 = opt:step(function() return keel.tensor(1.25) end)
    h:remove()
    opt:step(4)
    assert.equals(3, #got)
    assert.equals(2.5, r1.loss); assert.equals(2.5, got[1].loss)
    assert.equals(0.75, r2.loss)
    assert.equals(1.25, r3.loss)
    assert.equals(opt, got[1].o)
    assert.equals(r2, got[2].r)
    assert.is_true(got[2].r.applied)
    assert.is_false(got[3].r.applied)                -- emitted for steps not applied too
    assert.equals("no_grad", got[3].r.reason)
    H.assert_error(function() opt:step(keel.zeros{2}) end, "SGD.step: argument #1: the loss must have one element, got 2")
  end)
end)

-- }======================================================================
