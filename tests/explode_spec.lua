-- explode_spec.lua: scripts/explode.lua and scripts/stability/ in tiny
-- configurations. The task generators of Pascanu, Mikolov and Bengio 2013
-- are checked against their definitions (positions, encodings, targets);
-- the model's spectral radius, initialisation and error counts against
-- hand-made cases; the scripts run through the keel executable (KEEL_BIN,
-- set by tools/test.sh) and must show their outcomes: the unprotected RNN
-- dies with a named anomaly, the protected one lives; the 20-layer MLP
-- with N(0, 1) weights diverges and the BatchNorm one trains; the runner
-- solves a short temporal order problem.
local H = require "helper"
local keel = H.keel

package.path = "scripts/?.lua;scripts/lib/?.lua;" .. package.path
local xrng = require "stability.rng"
local model = require "stability.model"

local BIN = os.getenv("KEEL_BIN")

local function run(script, args)
  local cmd = {("%q"):format(BIN), ("%q"):format("scripts/" .. script)}
  for _, a in ipairs(args or {}) do cmd[#cmd + 1] = ("%q"):format(a) end
  local h = io.popen("OPENBLAS_NUM_THREADS=1 " .. table.concat(cmd, " ") .. " 2>&1")
  local out = h:read("a")
  local _, _, code = h:close()
  return out, code
end

local function task(name) return require("stability.tasks." .. name) end

-- x [L, B, C] as a Lua table x[t][b][c]
local function tab(t) return t:totable() end

-- The 0-based symbol (channel - 1) of a one-hot step, checking it is one-hot.
local function symbol(row)
  local sym, ones = nil, 0
  for c, v in ipairs(row) do
    if v == 1 then sym, ones = c - 1, ones + 1 else assert.equals(0, v) end
  end
  assert.equals(1, ones, "a step is not one-hot")
  return sym
end

describe("stability.rng", function()
  it("is deterministic per seed, uniform in [0, 1) and int(n) in 0..n-1", function()
    local a, b, c = xrng.new(5), xrng.new(5), xrng.new(6)
    local same, differ, sum = true, false, 0
    for _ = 1, 1000 do
      local x, y, z = a:uniform(), b:uniform(), c:uniform()
      if x ~= y then same = false end
      if x ~= z then differ = true end
      assert.is_true(x >= 0 and x < 1)
      sum = sum + x
    end
    assert.is_true(same and differ)
    assert.is_true(math.abs(sum / 1000 - 0.5) < 0.05, "mean " .. sum / 1000)
    local seen = {}
    for _ = 1, 2000 do
      local k = a:int(7)
      assert.is_true(math.type(k) == "integer" and k >= 0 and k < 7)
      seen[k] = true
      local bit = a:bit()
      assert.is_true(bit == 0 or bit == 1)
    end
    for k = 0, 6 do assert.is_true(seen[k], "int(7) never gave " .. k) end
  end)
end)

describe("stability tasks", function()
  local rng
  before_each(function() rng = xrng.new(11) end)

  it("adding: two marks (first 10%, then 10..50%), target their mean, T + up to 10% steps", function()
    local t = task("adding")
    assert.same({"adding", 2, 1, "regression", "last"}, {t.name, t.input_size, t.output_size, t.kind, t.target})
    local lengths = {}
    for _ = 1, 5 do
      local x, y = t.sample(16, 100, rng)
      local L = x.shape[1]
      lengths[L] = true
      assert.is_true(L >= 100 and L < 110)
      assert.same({L, 16, 2}, x.shape)
      assert.same({16, 1}, y.shape)
      local xs, ys = tab(x), tab(y)
      for b = 1, 16 do
        local marks = {}
        for s = 1, L do
          local m, v = xs[s][b][1], xs[s][b][2]
          assert.is_true(v >= 0 and v < 1)
          if m == 1 then marks[#marks + 1] = s - 1 else assert.equals(0, m) end
        end
        assert.equals(2, #marks)
        assert.is_true(marks[1] < L // 10, "first mark at " .. marks[1])
        assert.is_true(marks[2] >= L // 10 and marks[2] < L // 10 + L * 4 // 10, "second mark at " .. marks[2])
        local want = (xs[marks[1] + 1][b][2] + xs[marks[2] + 1][b][2]) / 2
        assert.is_true(math.abs(ys[b][1] - want) < 1e-6)
      end
    end
    assert.is_true(next(lengths, next(lengths)) ~= nil, "the length never varied")
  end)

  it("adding, explode.lua's variant: exactly T steps, a mark in each half, target the sum", function()
    local t = task("adding").make{combine = "sum", placement = "halves", jitter = false}
    for _ = 1, 3 do
      local x, y = t.sample(16, 40, rng)
      assert.same({40, 16, 2}, x.shape)
      local xs, ys = tab(x), tab(y)
      for b = 1, 16 do
        local marks = {}
        for s = 1, 40 do if xs[s][b][1] == 1 then marks[#marks + 1] = s - 1 end end
        assert.equals(2, #marks)
        assert.is_true(marks[1] < 20 and marks[2] >= 20)
        assert.is_true(math.abs(ys[b][1] - (xs[marks[1] + 1][b][2] + xs[marks[2] + 1][b][2])) < 1e-6)
      end
    end
  end)

  it("multiplication: the adding input, target the product", function()
    local t = task("multiplication")
    assert.equals("multiplication", t.name)
    local x, y = t.sample(16, 50, rng)
    local xs, ys = tab(x), tab(y)
    for b = 1, 16 do
      local p = 1
      local n = 0
      for s = 1, x.shape[1] do if xs[s][b][1] == 1 then p, n = p * xs[s][b][2], n + 1 end end
      assert.equals(2, n)
      assert.is_true(math.abs(ys[b][1] - p) < 1e-6)
    end
  end)

  local function check_order(t, slots, T)
    local x, y = t.sample(32, T, rng)
    assert.same({T, 32, 6}, x.shape)
    assert.same({32}, y.shape)
    assert.equals("int64", y.dtype)
    local xs, ys = tab(x), tab(y)
    for b = 1, 32 do
      local relevant = {}
      for s = 1, T do
        local sym = symbol(xs[s][b])
        if sym < 2 then relevant[#relevant + 1] = {pos = s - 1, v = sym} end
      end
      assert.equals(#slots, #relevant)
      local class = 0
      for k, lo in ipairs(slots) do
        local p = relevant[k].pos
        assert.is_true(p >= math.floor(T * lo) and p < math.floor(T * lo) + T // 10,
          ("relevant symbol %d at %d"):format(k, p))
        class = class + relevant[k].v * (1 << (k - 1))
      end
      assert.equals(class + 1, ys[b])
    end
  end

  it("temporal order: A/B at [10%, 20%) and [50%, 60%), class 1 + first + 2 * second", function()
    local t = task("temporal_order")
    assert.same({6, 4, "classification"}, {t.input_size, t.output_size, t.kind})
    check_order(t, {0.1, 0.5}, 60)
  end)

  it("3-bit temporal order: three relevant steps, 8 classes", function()
    local t = task("temporal_order3")
    assert.same({6, 8}, {t.input_size, t.output_size})
    check_order(t, {0.1, 0.3, 0.6}, 60)
  end)

  it("random permutation: the first symbol (1 or 2 of 100) is the class at the end", function()
    local t = task("permutation")
    local x, y = t.sample(16, 30, rng)
    assert.same({30, 16, 100}, x.shape)
    local xs, ys = tab(x), tab(y)
    for b = 1, 16 do
      local first = symbol(xs[1][b])
      assert.is_true(first == 0 or first == 1)
      assert.equals(first + 1, ys[b])
      for s = 2, 30 do assert.is_true(symbol(xs[s][b]) >= 2) end
    end
  end)

  it("noiseless memorization: 10 values, a trigger at T + 11, the values again over the last 10 steps", function()
    local t = task("memorization")
    assert.same({7, 6, "all"}, {t.input_size, t.output_size, t.target})
    local T = 15
    local x, y = t.sample(8, T, rng)
    local L = T + 20
    assert.same({L, 8, 7}, x.shape)
    assert.same({L, 8}, y.shape)
    local xs, ys = tab(x), tab(y)
    for b = 1, 8 do
      for s = 1, L do
        local sym = symbol(xs[s][b])
        if s <= 10 then
          assert.is_true(sym < 5)
          assert.equals(sym + 1, ys[L - 10 + s][b])
        elseif s == T + 11 then
          assert.equals(6, sym)           -- the trigger
        else
          assert.equals(5, sym)           -- blank
        end
        if s <= L - 10 then assert.equals(6, ys[s][b]) end
      end
    end
  end)
end)

describe("stability.model", function()
  it("spectral_radius is right for a rotation (complex eigenvalues) and a triangular matrix", function()
    H.assert_close(model.spectral_radius(keel.tensor{{0, 2}, {-2, 0}}), 2, {atol = 1e-3})
    H.assert_close(model.spectral_radius(keel.tensor{{0.5, 3}, {0, -0.9}}), 0.9, {atol = 1e-2})
  end)

  it("smart init: 15 recurrent weights per unit, spectral radius 0.95, small input and output weights", function()
    keel.manual_seed(3)
    local m = model.new(task("temporal_order"), {hidden = 50, init = "smart", rng = xrng.new(3)})
    local w = m.rnn.weight_hh_l0
    for _, row in ipairs(w:totable()) do
      local nz = 0
      for _, v in ipairs(row) do if v ~= 0 then nz = nz + 1 end end
      assert.equals(15, nz)
    end
    H.assert_close(model.spectral_radius(w), 0.95, {atol = 2e-3})
    assert.is_true(m.rnn.weight_ih_l0:abs():max():item() < 0.06)
    assert.equals(0, m.rnn.bias_hh_l0:abs():sum():item())
  end)

  it("counts errors: |pred - target| > tol; wrong argmax; any wrong step of a sequence", function()
    local reg = {kind = "regression", target = "last"}
    local out, y = keel.tensor{{0.50}, {0.55}, {0.40}, {0.465}}, keel.tensor{{0.5}, {0.5}, {0.5}, {0.5}}
    assert.equals(2, model.errors(reg, out, y, 0.04))     -- 0.05 and 0.1 off count, 0.035 does not
    local cls = {kind = "classification", target = "last"}
    assert.equals(1, model.errors(cls, keel.tensor{{1, 0}, {0, 1}, {2, 1}},
      keel.tensor({1, 2, 2}, {dtype = "int64"}), 0))
    local all = {kind = "classification", target = "all"}
    -- [L = 2, B = 2, C = 2]: sequence 1 right at both steps, sequence 2 wrong at step 2
    local logits = keel.tensor{{{1, 0}, {1, 0}}, {{0, 1}, {1, 0}}}
    assert.equals(1, model.errors(all, logits, keel.tensor({{1, 1}, {2, 2}}, {dtype = "int64"}), 0))
  end)
end)

describe("scripts", function()
  if not BIN then
    it("need KEEL_BIN", function() pending("KEEL_BIN is not set (tools/test.sh sets it)") end)
    return
  end

  it("explode.lua (a): the unprotected RNN diverges with a named anomaly, the protected one lives", function()
    local out, code = run("explode.lua", {"--part", "a", "--quick"})
    assert.equals(0, code, out)
    local step = tonumber(out:match("unprotected, first anomaly: [^\n]-step (%d+)"))
    assert.is_not_nil(step, "no anomaly line with a step:\n" .. out)
    local died = tonumber(out:match("result%s+diverged at step (%d+)"))
    assert.is_not_nil(died, out)
    assert.is_true(step <= died, out)
    -- the anomaly names an op and where it was made
    assert.matches("first anomaly: [^\n]*explode%.lua:%d+", out)
    -- the protected column: trained to the end, a finite test MSE, no anomaly
    local row = out:match("\n%s*result%s+diverged at step %d+ %b()%s+([^\n]+)")
    assert.matches("^trained %d+ steps", row or "", out)
    local mse = out:match("\n%s*test MSE%s+%S+%s+(%S+)")
    assert.is_not_nil(tonumber(mse), out)
    assert.is_true(tonumber(mse) < 1, out)
    assert.matches("first anomaly %(step%)%s+%d+%s+none", out)
  end)

  it("explode.lua (b): N(0, 1) weights diverge; clipping keeps them finite; Kaiming + clipping learns", function()
    local out, code = run("explode.lua", {"--part", "b", "--quick"})
    assert.equals(0, code, out)
    local summary = out:match("summary %(b%).*$")
    assert.is_not_nil(summary, out)
    local function row(name)
      local r = summary:match("\n%s*" .. name:gsub("%p", "%%%0") .. "%s%s+([^\n]+)")
      assert.is_not_nil(r, "no row " .. name .. ":\n" .. out)
      return r
    end
    assert.matches("^diverged at step %d+", row("N(0, 1) init"))
    -- clipping alone cannot repair activations 1e14 times too large, but nothing overflows
    local clipped = row("N(0, 1) init + clip 1")
    assert.matches("^did not learn%s+%S+%s+(%S+)", clipped)
    assert.is_not_nil(tonumber(clipped:match("^did not learn%s+%S+%s+(%S+)")), clipped)
    assert.matches("^learned", row("Kaiming init + clip 1"))
    assert.is_nil(row("N(0, 1) init + BatchNorm"):match("^diverged"), out)
  end)

  it("explode.lua refuses an unknown part", function()
    local out, code = run("explode.lua", {"--part", "c"})
    assert.equals(2, code, out)
    assert.matches("%-%-part: expected a, b or ab", out)
  end)

  it("stability/run.lua solves a short temporal order problem with clipping and with the guard", function()
    local out, code = run("stability/run.lua", {"--tasks", "torder", "--lengths", "10", "--settings", "clip,guard",
                                                "--steps", "3000", "--eval", "1000", "--check", "100"})
    assert.equals(0, code, out)
    assert.matches("success table", out)
    assert.matches("\n%s*temporal order%s+10%s+yes @%d+ %(%d+%.%d%%%)%s+yes @%d+", out)
  end)

  it("stability/run.lua names an unknown task", function()
    local out, code = run("stability/run.lua", {"--tasks", "nope"})
    assert.equals(2, code, out)
    assert.matches("unknown task 'nope'", out)
  end)
end)
