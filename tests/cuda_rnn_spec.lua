-- tests/cuda_rnn_spec.lua: the recurrent kernels of the CUDA plugin
-- (kernels/rnn.cu) against the CPU backend, which is their specification.
-- The layer ops themselves (nn.functional.rnn_tanh_layer, rnn_relu_layer,
-- lstm_layer, gru_layer, and a cell) with every input's gradient, float32
-- and float64, forward and reverse, with and without states and biases,
-- sizes past one block, non-contiguous inputs, empty batches, NaN; then
-- the modules (multi-layer, bidirectional, batch_first) moved with
-- module:to("cuda"), comparing parameter gradients; then a char-LSTM step
-- (embedding, LSTM, linear, cross entropy). Without a GPU (or the
-- simulator plugin) every test is a visible skip.
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local nn = keel.nn
local F = nn.functional
local gpu_it = H.gpu_it(it, pending)

local GATES = {rnn_tanh = 1, rnn_relu = 1, lstm = 4, gru = 3}
local MODES = {"rnn_tanh", "rnn_relu", "lstm", "gru"}

-- f32: the CPU computes exp/tanh with its own polynomial and the GEMMs sum
-- in another order; errors grow a little over the steps.
local TOL = {float32 = {atol = 3e-5, rtol = 3e-4}, float64 = {atol = 1e-11, rtol = 1e-9}}

-- Inputs of a layer op: x [T, B, I], h0 (, c0) [B, H], w_ih, w_hh (, b_ih,
-- b_hh); absent ones are false (kept in the list so positions stay).
local function layer_inputs(mode, c, dtype)
  local G = GATES[mode]
  local o = function(seed, lo, hi) return {dtype = dtype, seed = seed, lo = lo or -1, hi = hi or 1} end
  local x = D.input({c.T, c.B, c.I}, o(11))
  local h0 = c.state and D.input({c.B, c.H}, o(12)) or false
  local c0 = (c.state and mode == "lstm") and D.input({c.B, c.H}, o(13)) or false
  local wi = D.input({G * c.H, c.I}, o(14, -0.6, 0.6))
  local wh = D.input({G * c.H, c.H}, o(15, -0.6, 0.6))
  local bi = c.bias and D.input({G * c.H}, o(16, -0.5, 0.5)) or false
  local bh = c.bias and D.input({G * c.H}, o(17, -0.5, 0.5)) or false
  return {x, h0, c0, wi, wh, bi, bh}
end

-- f(x, h0, c0, wi, wh, bi, bh) -> {out, h_n (, c_n)}; nt: feed x and w_ih
-- as non-contiguous views (x through a transpose, w_ih as w^T^T).
local function layer_fn(mode, c)
  local op = F[mode .. "_layer"]
  return function(x, h0, c0, wi, wh, bi, bh)
    h0 = h0 or nil; c0 = c0 or nil; bi = bi or nil; bh = bh or nil
    if c.nt then
      x = x:transpose(1, 2):contiguous():transpose(1, 2)
      wi = wi:t():contiguous():t()
    end
    if mode == "lstm" then
      local out, hn, cn = op(x, h0, c0, wi, wh, bi, bh, c.reverse)
      return {out, hn, cn}
    end
    local out, hn = op(x, h0, wi, wh, bi, bh, c.reverse)
    return {out, hn}
  end
end

-- D.check over only the present inputs (false ones dropped from the call).
local function check_layer(mode, c, dtype)
  local all = layer_inputs(mode, c, dtype)
  local present, where = {}, {}
  for i = 1, 7 do
    if all[i] then present[#present + 1] = all[i]; where[#where + 1] = i end
  end
  local f = layer_fn(mode, c)
  D.check(function(...)
    local a, got = {false, false, false, false, false, false, false}, {...}
    for k, i in ipairs(where) do a[i] = got[k] end
    return f(table.unpack(a, 1, 7))
  end, present, {tol = TOL[dtype]})
end

local CASES = {
  {name = "T=7 B=2 I=3 H=5, states and biases", T = 7, B = 2, I = 3, H = 5, state = true, bias = true},
  {name = "T=7 B=9 I=4 H=33 reverse (B*H past one block)", T = 7, B = 9, I = 4, H = 33, state = true, bias = true,
   reverse = true},
  {name = "T=1 B=3 I=2 H=5, no states, no biases", T = 1, B = 3, I = 2, H = 5},
  {name = "T=7 B=3 I=5 H=33, no states, non-contiguous x and w_ih", T = 7, B = 3, I = 5, H = 33, bias = true,
   nt = true},
  {name = "T=1 B=2 I=3 H=33 reverse, states, no biases", T = 1, B = 2, I = 3, H = 33, state = true, reverse = true},
  -- past the simulator's grid cap (7 blocks): B*H > 7*256 threads, and the
  -- bias column sums over more than 7*32 gate columns (LSTM, GRU)
  {name = "T=3 B=24 I=5 H=77 (grid-stride loops go round)", T = 3, B = 24, I = 5, H = 77, state = true,
   bias = true},
}

describe("cuda rnn: layer ops against the CPU", function()
  for _, mode in ipairs(MODES) do
    for _, dtype in ipairs {"float32", "float64"} do
      for _, c in ipairs(CASES) do
        gpu_it(("%s_layer %s: %s"):format(mode, dtype, c.name), function()
          check_layer(mode, c, dtype)
        end)
      end
    end
  end
end)

describe("cuda rnn: edge cases", function()
  for _, mode in ipairs(MODES) do
    gpu_it(mode .. "_layer: an empty batch (B = 0)", function()
      local c = {T = 3, B = 0, I = 4, H = 5, state = true, bias = true}
      local inp = layer_inputs(mode, c, "float64")
      D.check(layer_fn(mode, c), inp, {tol = 0})
      -- every input got a gradient; the weights' and biases' are zero
      for i = 1, 7 do
        if inp[i] then
          assert.is_truthy(inp[i].grad, "no gradient of input " .. i)
          H.assert_shape(inp[i].grad, inp[i].shape, "gradient of input " .. i)
          if inp[i]:numel() > 0 then H.assert_all(inp[i].grad, 0, 0, "gradient of input " .. i) end
        end
      end
    end)

    gpu_it(mode .. "_layer: NaN in the input propagates as on the CPU", function()
      local c = {T = 4, B = 3, I = 2, H = 5, state = true, bias = true}
      local inp = layer_inputs(mode, c, "float32")
      keel.no_grad(function() inp[1]:select(1, 2):select(1, 2):fill_(0 / 0) end)
      local rc, rd = D.check(layer_fn(mode, c), inp, {backward = false})
      -- the NaN reaches h of batch row 2 from step 2 on and no other row
      local o = rd[1]:cpu():totable()
      assert.is_true(o[2][2][1] ~= o[2][2][1])
      assert.is_true(o[4][2][3] ~= o[4][2][3])
      assert.is_true(o[4][1][1] == o[4][1][1])
      assert.is_true(rc[1]:totable()[1][2][1] == rc[1]:totable()[1][2][1])
    end)
  end

  gpu_it("lstm_cell and gru_cell (a layer of one step)", function()
    for _, dtype in ipairs {"float32", "float64"} do
      local o = function(shape, seed) return D.input(shape, {dtype = dtype, seed = seed, lo = -0.7, hi = 0.7}) end
      D.check(function(x, h, cc, wi, wh, bi, bh)
        local h1, c1 = F.lstm_cell(x, h, cc, wi, wh, bi, bh)
        return {h1, c1}
      end, {o({4, 3}, 1), o({4, 6}, 2), o({4, 6}, 3), o({24, 3}, 4), o({24, 6}, 5), o({24}, 6), o({24}, 7)},
        {tol = TOL[dtype]})
      D.check(function(x, h, wi, wh, bi, bh) return F.gru_cell(x, h, wi, wh, bi, bh) end,
        {o({4, 3}, 1), o({4, 6}, 2), o({18, 3}, 4), o({18, 6}, 5), o({18}, 6), o({18}, 7)}, {tol = TOL[dtype]})
    end
  end)

  gpu_it("a float32 layer with large pre-activations saturates as on the CPU", function()
    for _, mode in ipairs(MODES) do
      local c = {T = 3, B = 2, I = 3, H = 4, state = true, bias = true}
      local inp = layer_inputs(mode, c, "float32")
      keel.no_grad(function() inp[1]:mul_(80) end)
      D.check(layer_fn(mode, c), inp, {tol = TOL.float32})
    end
  end)
end)

-- {======================================================================
-- Modules moved with module:to("cuda")
-- =======================================================================

-- Deterministic parameters (the k-th gets values of seed 100 + k).
local function set_params(m, dtype)
  local k = 0
  keel.no_grad(function()
    for _, p in m:named_parameters() do
      k = k + 1
      local v = H.values(H.numel(p.shape), -0.5, 0.5, 100 + k)
      p:copy_(keel.tensor(v, {dtype = dtype}):reshape(p.shape))
    end
  end)
end

local function compare_params(mc, mg, tol)
  local gpu = {}
  for name, p in mg:named_parameters() do gpu[name] = p end
  local n = 0
  for name, p in mc:named_parameters() do
    local q = gpu[name]
    assert.is_truthy(q, "no parameter " .. name .. " on cuda")
    D.same_device(q, "cuda")
    assert.is_truthy(p.grad, "no gradient of " .. name .. " on cpu")
    assert.is_truthy(q.grad, "no gradient of " .. name .. " on cuda")
    H.assert_close(q.grad:cpu(), p.grad:totable(), tol, "gradient of " .. name)
    n = n + 1
  end
  assert.is_true(n > 0)
end

local MODULES = {
  {class = "RNN", opts = {num_layers = 2}},
  {class = "RNN", opts = {nonlinearity = "relu", bidirectional = true}},
  {class = "LSTM", opts = {num_layers = 2, bidirectional = true}},
  {class = "LSTM", opts = {batch_first = true}, state = true},
  {class = "GRU", opts = {num_layers = 2, batch_first = true}, state = true},
  {class = "GRU", opts = {bidirectional = true, bias = false}},
}

describe("cuda rnn: modules", function()
  for _, mc in ipairs(MODULES) do
    for _, dtype in ipairs {"float32", "float64"} do
      local o = {}
      for k, v in pairs(mc.opts) do o[k] = ("%s=%s"):format(k, tostring(v)) end
      local desc = {}
      for _, v in pairs(o) do desc[#desc + 1] = v end
      table.sort(desc)
      local name = ("nn.%s(%s)%s %s"):format(mc.class, table.concat(desc, ", "), mc.state and " with h0" or "",
                                            dtype)
      gpu_it(name, function()
        local I, Hd, T, B = 3, 5, 7, 2
        local opts = {dtype = dtype}
        for k, v in pairs(mc.opts) do opts[k] = v end
        local cpu_m = nn[mc.class](I, Hd, opts)
        local gpu_m = nn[mc.class](I, Hd, opts)
        set_params(cpu_m, dtype)
        set_params(gpu_m, dtype)
        gpu_m:to("cuda")
        local L = (mc.opts.num_layers or 1) * (mc.opts.bidirectional and 2 or 1)
        local xs = mc.opts.batch_first and {B, T, I} or {T, B, I}
        local inputs = {D.input(xs, {dtype = dtype, seed = 21})}
        if mc.state then
          inputs[2] = D.input({L, B, Hd}, {dtype = dtype, seed = 22})
          if mc.class == "LSTM" then inputs[3] = D.input({L, B, Hd}, {dtype = dtype, seed = 23}) end
        end
        local calls = 0
        D.check(function(x, h0, c0)
          calls = calls + 1          -- D.check runs the CPU side first
          local m = calls == 1 and cpu_m or gpu_m
          return {m(x, h0, c0)}
        end, inputs, {tol = TOL[dtype]})
        compare_params(cpu_m, gpu_m, TOL[dtype])
      end)
    end
  end
end)

-- }======================================================================

describe("cuda rnn: a char-LSTM training step", function()
  gpu_it("embedding -> LSTM -> linear -> cross entropy, loss and every gradient", function()
    local V, E, Hd, T, B = 11, 6, 33, 7, 3
    local function model()
      local m = {emb = nn.Embedding(V, E, {dtype = "float64"}), lstm = nn.LSTM(E, Hd, {dtype = "float64"}),
                 fc = nn.Linear(Hd, V, {dtype = "float64"})}
      for _, k in ipairs {"emb", "lstm", "fc"} do set_params(m[k], "float64") end
      return m
    end
    local mc, mg = model(), model()
    for _, k in ipairs {"emb", "lstm", "fc"} do mg[k]:to("cuda") end
    local idx, tgt = {}, {}
    local r = H.rng(5)
    for i = 1, T * B do
      idx[i] = 1 + math.floor(r() * V)
      tgt[i] = 1 + math.floor(r() * V)
    end
    local function step(m, dev)
      local x = keel.tensor(idx, {dtype = "int64"}):reshape({T, B}):to(dev)
      local y = keel.tensor(tgt, {dtype = "int64"}):to(dev)
      local h = m.lstm(m.emb(x))
      local logits = m.fc(h:reshape({T * B, Hd}))
      local loss = F.cross_entropy(logits, y)
      loss:backward()
      return loss
    end
    local lc, lg = step(mc, "cpu"), step(mg, "cuda")
    D.same_device(lg, "cuda")
    H.assert_close(lg:cpu(), lc:totable(), TOL.float64, "loss")
    for _, k in ipairs {"emb", "lstm", "fc"} do compare_params(mc[k], mg[k], TOL.float64) end
  end)
end)
