-- rnn_spec.lua: the recurrent modules (RNN, LSTM, GRU and their cells) and
-- attention (scaled_dot_product_attention, MultiheadAttention) against
-- PyTorch's numbers (tests/fixtures/rnn_ref.lua, float64 and float32),
-- gradient checks through whole modules, default initialisation, dropout
-- between layers, and the error paths. The gradient checks of the engine
-- ops themselves are in tests/cases/rnn.lua.
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local F = nn.functional
local REF = dofile("tests/fixtures/rnn_ref.lua")
local err = H.assert_error

local TOL = {
  float64 = { atol = 1e-10, rtol = 1e-10 },
  float32 = { atol = 2e-5, rtol = 2e-5 },
}

local function make(shape, seed, dtype, lo, hi, rg)
  local v = H.values(H.numel(shape), lo or -1, hi or 1, seed)
  return keel.tensor(H.nest(v, shape), { dtype = dtype, requires_grad = rg ~= false })
end

local function copy(t, extra)
  local o = {}
  for k, v in pairs(t or {}) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

-- Sets the k-th parameter to values(numel, -0.5, 0.5, pseed + k) and
-- checks the names against PyTorch's.
local function set_params(m, c)
  local names, k = {}, 0
  keel.no_grad(function()
    for name, p in m:named_parameters() do
      k = k + 1
      names[k] = name
      p:copy_(make(p.shape, c.pseed + k, p.dtype, -0.5, 0.5, false))
    end
  end)
  assert.are.same(c.param_names, names)
end

-- sum over results of (y_i * R_i), as the fixture's loss, then backward.
local function backward_loss(results)
  local loss
  for i, y in ipairs(results) do
    local r = keel.tensor(H.nest(H.values(H.numel(y.shape), -1, 1, 90 + i), y.shape), { dtype = y.dtype })
    local term = (y * r):sum()
    loss = loss and loss + term or term
  end
  loss:backward()
end

local function check_results(c, results, inputs, m, tol)
  assert.are.equal(#c.results, #results)
  for i, y in ipairs(results) do
    H.assert_shape(y, c.results[i].shape, "result " .. i)
    H.assert_close(H.flat(y), c.results[i].values, tol, "result " .. i)
  end
  backward_loss(results)
  for i, x in ipairs(inputs) do
    H.assert_close(H.flat(x.grad), c.input_grads[i], tol, "grad of input " .. i)
  end
  if m then
    for name, p in m:named_parameters() do
      H.assert_close(H.flat(p.grad), c.param_grads[name], tol, "grad of " .. name)
    end
  end
end

describe("recurrent modules against PyTorch", function()
  for _, dtype in ipairs { "float64", "float32" } do
    for _, c in ipairs(REF.modules) do
      it(c.name .. " (" .. dtype .. ")", function()
        local m = nn[c.class](c.I, c.H, copy(c.opts, { dtype = dtype }))
        set_params(m, c)
        local bf, L = c.opts.batch_first, c.opts.num_layers or 1
        local D = c.opts.bidirectional and 2 or 1
        local x = make(bf and { c.B, c.T, c.I } or { c.T, c.B, c.I }, c.xseed, dtype)
        local inputs, h0, c0 = { x }, nil, nil
        if c.hseed then
          h0 = make({ L * D, c.B, c.H }, c.hseed, dtype)
          inputs[2] = h0
        end
        if c.cseed then
          c0 = make({ L * D, c.B, c.H }, c.cseed, dtype)
          inputs[3] = c0
        end
        local results = { m(x, h0, c0) }
        check_results(c, results, inputs, m, TOL[dtype])
      end)
    end
  end

  it("LSTM takes the initial state as {h0, c0} too", function()
    local c = REF.modules[5]
    assert.are.equal("LSTM", c.name)
    local m = nn.LSTM(c.I, c.H, copy(c.opts, { dtype = "float64" }))
    set_params(m, c)
    local x = make({ c.T, c.B, c.I }, c.xseed, "float64")
    local h0 = make({ 2, c.B, c.H }, c.hseed, "float64")
    local c0 = make({ 2, c.B, c.H }, c.cseed, "float64")
    local out, hn, cn = m(x, { h0, c0 })
    H.assert_close(H.flat(out), c.results[1].values, TOL.float64)
    H.assert_close(H.flat(hn), c.results[2].values, TOL.float64)
    H.assert_close(H.flat(cn), c.results[3].values, TOL.float64)
  end)
end)

describe("recurrent cells against PyTorch", function()
  for _, dtype in ipairs { "float64", "float32" } do
    for _, c in ipairs(REF.cells) do
      it(c.name .. " (" .. dtype .. ")", function()
        local m = nn[c.class](c.I, c.H, copy(c.opts, { dtype = dtype }))
        set_params(m, c)
        local x, h = make({ c.B, c.I }, c.xseed, dtype), make({ c.B, c.H }, c.hseed, dtype)
        local inputs, cs = { x, h }, nil
        if c.cseed then
          cs = make({ c.B, c.H }, c.cseed, dtype)
          inputs[3] = cs
        end
        check_results(c, { m(x, h, cs) }, inputs, m, TOL[dtype])
      end)
    end
  end
end)

-- The fixture's mask: int64 1/0 (values > 0) for "bool", the values for "float".
local function make_mask(kind, shape, seed, dtype)
  local v = H.values(H.numel(shape), -1, 1, seed)
  if kind == "bool" then
    for i = 1, #v do v[i] = v[i] > 0 and 1 or 0 end
    return keel.tensor(H.nest(v, shape), { dtype = "int64" })
  end
  return keel.tensor(H.nest(v, shape), { dtype = dtype })
end

describe("scaled_dot_product_attention against PyTorch's formula", function()
  for _, dtype in ipairs { "float64", "float32" } do
    for _, c in ipairs(REF.sdpa) do
      it(c.name .. " (" .. dtype .. ")", function()
        local q, k, v = make(c.q, c.qseed, dtype), make(c.k, c.kseed, dtype), make(c.v, c.vseed, dtype)
        local opts = { scale = c.scale, is_causal = c.is_causal, need_weights = true }
        if c.mask_kind then opts.attn_mask = make_mask(c.mask_kind, c.mask_shape, c.mask_seed, dtype) end
        check_results(c, { F.scaled_dot_product_attention(q, k, v, opts) }, { q, k, v }, nil, TOL[dtype])
        -- the fused op (the default) returns the output alone
        opts.need_weights = nil
        local out, w = F.scaled_dot_product_attention(q, k, v, opts)
        assert.is_nil(w)
        H.assert_close(H.flat(out), c.results[1].values, TOL[dtype], "fused output")
      end)
    end
  end
end)

describe("MultiheadAttention against PyTorch", function()
  for _, dtype in ipairs { "float64", "float32" } do
    for _, c in ipairs(REF.mha) do
      it(c.name .. " (" .. dtype .. ")", function()
        local m = nn.MultiheadAttention(c.E, c.heads, copy(c.opts, { dtype = dtype }))
        set_params(m, c)
        local bf = c.opts.batch_first
        local function seq(n, d)
          if not c.N then return { n, d } end
          return bf and { c.N, n, d } or { n, c.N, d }
        end
        local q = make(seq(c.L, c.E), c.qseed, dtype)
        local k, v, inputs
        if c.self then
          k, v, inputs = q, q, { q }
        else
          k = make(seq(c.S, c.opts.kdim or c.E), c.kseed, dtype)
          v = make(seq(c.S, c.opts.vdim or c.E), c.vseed, dtype)
          inputs = { q, k, v }
        end
        local fo = { is_causal = c.is_causal, average_attn_weights = c.average_attn_weights }
        for _, key in ipairs { "attn_mask", "key_padding_mask" } do
          local mk = c[key]
          if mk then fo[key] = make_mask(mk.kind, mk.shape, mk.seed, dtype) end
        end
        check_results(c, { m(q, k, v, fo) }, inputs, m, TOL[dtype])
      end)
    end
  end

  it("need_weights = false returns no weights and the same output", function()
    local m = nn.MultiheadAttention(4, 2, { dtype = "float64" })
    local x = H.t64({ 3, 2, 4 }, -1, 1, 5)
    local o1 = m(x, x, x)
    local o2, w = m(x, x, x, { need_weights = false })
    assert.is_nil(w)
    H.assert_close(o2, o1:totable(), TOL.float64)
  end)
end)

-- {======================================================================
-- Gradient checks through whole modules (float64, 2 steps)
-- =======================================================================

-- The module's results joined into one tensor for gradcheck.
local function joined(...)
  local r = { ... }
  local flat = {}
  for i, t in ipairs(r) do flat[i] = t:reshape({ -1 }) end
  return keel.cat(flat, 1)
end

local function params(m)
  return m:parameters()
end

describe("gradient checks through modules", function()
  local cases = {
    { "RNN tanh, 2 layers", function() return nn.RNN(2, 3, { num_layers = 2, dtype = "float64" }) end },
    { "RNN relu, batch_first", function() return nn.RNN(2, 3, { nonlinearity = "relu", batch_first = true, dtype = "float64" }) end },
    { "LSTM, 2 layers", function() return nn.LSTM(2, 3, { num_layers = 2, dtype = "float64" }) end },
    { "LSTM bidirectional, batch_first", function() return nn.LSTM(2, 2, { bidirectional = true, batch_first = true, dtype = "float64" }) end },
    { "GRU, 2 layers", function() return nn.GRU(2, 3, { num_layers = 2, dtype = "float64" }) end },
    { "GRU bidirectional, no bias", function() return nn.GRU(2, 2, { bidirectional = true, bias = false, dtype = "float64" }) end },
  }
  for _, case in ipairs(cases) do
    it(case[1], function()
      keel.manual_seed(11)
      local m = case[2]()
      local lstm = m.mode == "LSTM"
      local D = m.bidirectional and 2 or 1
      local x = H.t64(m.batch_first and { 2, 2, 2 } or { 2, 2, 2 }, -1, 1, 21)
      local h0 = H.t64({ m.num_layers * D, 2, m.hidden_size }, -1, 1, 22)
      local c0 = H.t64({ m.num_layers * D, 2, m.hidden_size }, -1, 1, 23)
      local inputs = { x, h0 }
      if lstm then inputs[3] = c0 end
      for _, p in ipairs(params(m)) do inputs[#inputs + 1] = p end
      H.gradcheck(function(xx, hh, cc)
        if lstm then return joined(m(xx, hh, cc)) end
        return joined(m(xx, hh))
      end, inputs, { name = case[1] })
    end)
  end

  for _, cls in ipairs { "RNNCell", "LSTMCell", "GRUCell" } do
    it(cls .. " over 2 steps", function()
      keel.manual_seed(12)
      local m = nn[cls](3, 2, { dtype = "float64" })
      local lstm = cls == "LSTMCell"
      local x1, x2 = H.t64({ 2, 3 }, -1, 1, 31), H.t64({ 2, 3 }, -1, 1, 32)
      local inputs = { x1, x2 }
      for _, p in ipairs(params(m)) do inputs[#inputs + 1] = p end
      H.gradcheck(function(a, b)
        if lstm then
          local h, c = m(a)
          return joined(m(b, h, c))
        end
        return m(b, m(a))
      end, inputs, { name = cls })
    end)
  end

  it("scaled_dot_product_attention, causal and masked", function()
    H.gradcheck(function(q, k, v)
      return F.scaled_dot_product_attention(q, k, v, { is_causal = true })
    end, { H.t64({ 2, 3, 2 }, -1, 1, 41), H.t64({ 2, 3, 2 }, -1, 1, 42), H.t64({ 2, 3, 2 }, -1, 1, 43) })
    local mask = keel.tensor({ { 1, 0, 1, 1 }, { 0, 1, 1, 0 } }, { dtype = "int64" })
    H.gradcheck(function(q, k, v)
      return F.scaled_dot_product_attention(q, k, v, { attn_mask = mask, scale = 0.3 })
    end, { H.t64({ 2, 3 }, -1, 1, 44), H.t64({ 4, 3 }, -1, 1, 45), H.t64({ 4, 2 }, -1, 1, 46) })
  end)

  it("MultiheadAttention", function()
    keel.manual_seed(13)
    local m = nn.MultiheadAttention(4, 2, { dtype = "float64" })
    local q, kv = H.t64({ 2, 2, 4 }, -1, 1, 51), H.t64({ 3, 2, 4 }, -1, 1, 52)
    local inputs = { q, kv }
    for _, p in ipairs(params(m)) do inputs[#inputs + 1] = p end
    H.gradcheck(function(a, b) return joined(m(a, b, b)) end, inputs, { name = "MultiheadAttention" })
  end)
end)

-- }======================================================================

describe("recurrent modules", function()
  it("have PyTorch's parameter names, shapes and default init", function()
    keel.manual_seed(3)
    local m = nn.GRU(10, 20, { num_layers = 2 })
    local names = {}
    for name, p in m:named_parameters() do
      names[#names + 1] = name .. " " .. H.shape_str(p.shape)
      local k = 1 / math.sqrt(20)
      local v = H.flat(p)
      local mn, mx, sum, sq = math.huge, -math.huge, 0, 0
      for _, x in ipairs(v) do
        mn, mx, sum, sq = math.min(mn, x), math.max(mx, x), sum + x, sq + x * x
      end
      assert.is_true(mn >= -k and mx <= k, name .. " outside U(-k, k)")
      if #v >= 600 then
        -- U(-k, k): mean 0, variance k^2 / 3
        assert.is_true(math.abs(sum / #v) < 0.1 * k, name .. " mean")
        assert.is_true(math.abs(sq / #v / (k * k / 3) - 1) < 0.15, name .. " variance")
      end
    end
    assert.are.same({
      "weight_ih_l0 [60,10]", "weight_hh_l0 [60,20]", "bias_ih_l0 [60]", "bias_hh_l0 [60]",
      "weight_ih_l1 [60,20]", "weight_hh_l1 [60,20]", "bias_ih_l1 [60]", "bias_hh_l1 [60]",
    }, names)
    local cell = nn.LSTMCell(3, 5, { bias = false })
    local cn = {}
    for name, p in cell:named_parameters() do cn[#cn + 1] = name .. " " .. H.shape_str(p.shape) end
    assert.are.same({ "weight_ih [20,3]", "weight_hh [20,5]" }, cn)
  end)

  it("print like PyTorch", function()
    assert.are.equal("LSTM(10, 20, num_layers=2, batch_first=true)",
      tostring(nn.LSTM(10, 20, { num_layers = 2, batch_first = true })))
    assert.are.equal("RNN(3, 4, nonlinearity='relu', bias=false, dropout=0.5, bidirectional=true)",
      tostring(nn.RNN(3, 4, { nonlinearity = "relu", bias = false, dropout = 0.5, bidirectional = true })))
    assert.are.equal("GRUCell(3, 4)", tostring(nn.GRUCell(3, 4)))
  end)

  it("state_dict round trip between two LSTMs", function()
    local a, b = nn.LSTM(3, 4, { num_layers = 2 }), nn.LSTM(3, 4, { num_layers = 2 })
    b:load_state_dict(a:state_dict())
    local x = keel.randn({ 5, 2, 3 })
    local oa, ob = a(x), b(x)
    H.assert_close(ob, oa:totable(), 0)
  end)

  it("run unbatched inputs as PyTorch (no batch dimension)", function()
    keel.manual_seed(4)
    local m = nn.LSTM(3, 4, { num_layers = 2, dtype = "float64" })
    local x, h0, c0 = H.t64({ 5, 3 }, -1, 1, 61), H.t64({ 2, 4 }, -1, 1, 62), H.t64({ 2, 4 }, -1, 1, 63)
    local o1, h1, c1 = m(x, h0, c0)
    H.assert_shape(o1, { 5, 4 }); H.assert_shape(h1, { 2, 4 }); H.assert_shape(c1, { 2, 4 })
    local o2, h2, c2 = m(x:unsqueeze(2), h0:unsqueeze(2), c0:unsqueeze(2))
    H.assert_close(o1, o2:squeeze(2):totable(), TOL.float64)
    H.assert_close(h1, h2:squeeze(2):totable(), TOL.float64)
    H.assert_close(c1, c2:squeeze(2):totable(), TOL.float64)
    local cell = nn.GRUCell(3, 4, { dtype = "float64" })
    local hc = cell(x[1], h0[1])
    H.assert_shape(hc, { 4 })
    H.assert_close(hc, cell(x[1]:unsqueeze(1), h0[1]:unsqueeze(1)):squeeze(1):totable(), TOL.float64)
  end)

  it("match a loop over the cells, and h_n is the last output", function()
    keel.manual_seed(5)
    local m = nn.LSTM(3, 4, { dtype = "float64" })
    local cell = nn.LSTMCell(3, 4, { dtype = "float64" })
    cell:load_state_dict({ weight_ih = m.weight_ih_l0, weight_hh = m.weight_hh_l0,
                           bias_ih = m.bias_ih_l0, bias_hh = m.bias_hh_l0 })
    local x = H.t64({ 4, 2, 3 }, -1, 1, 71)
    local out, hn, cn = m(x)
    local h, c
    for t = 1, 4 do
      h, c = cell(x[t], h, c)
      H.assert_close(out[t], h:totable(), TOL.float64)
    end
    H.assert_close(hn[1], h:totable(), TOL.float64)
    H.assert_close(cn[1], c:totable(), TOL.float64)
  end)

  it("apply dropout between layers in training only", function()
    keel.manual_seed(6)
    local m = nn.GRU(3, 8, { num_layers = 2, dropout = 0.5 })
    local x = keel.randn({ 4, 2, 3 })
    m:eval()
    local e1, e2 = m(x), m(x)
    H.assert_close(e2, e1:totable(), 0)
    local plain = nn.GRU(3, 8, { num_layers = 2 })
    plain:load_state_dict(m:state_dict())
    H.assert_close(plain(x), e1:totable(), 0)
    m:train()
    local t1, t2 = m(x), m(x)
    local d1, d2 = (t1 - e1):abs():max():item(), (t2 - t1):abs():max():item()
    assert.is_true(d1 > 1e-4, "training output equals eval output")
    assert.is_true(d2 > 1e-4, "two training passes gave the same mask")
    -- dropout after the last layer would change h_n of layer 2 only through
    -- the output: h_n of layer 1 is before dropout, so it is the same
    local _, hn_t = m(x)
    local _, hn_e = plain(x)
    H.assert_close(hn_t[1], hn_e[1]:totable(), 0)
  end)

  it("record nothing under no_grad", function()
    local m = nn.LSTM(3, 4)
    local out, hn, cn = keel.no_grad(function() return m(keel.randn({ 2, 1, 3 })) end)
    assert.is_false(out.requires_grad)
    assert.is_false(hn.requires_grad)
    assert.is_false(cn.requires_grad)
  end)

  it("backward twice with retain_graph accumulates", function()
    local m = nn.GRU(2, 3, { dtype = "float64" })
    local out = m(H.t64({ 3, 1, 2 }, -1, 1, 81))
    local loss = out:sum()
    loss:backward({ retain_graph = true })
    local g1 = m.weight_hh_l0.grad:clone()
    loss:backward()
    H.assert_close(m.weight_hh_l0.grad, (g1 * 2):totable(), TOL.float64)
  end)
end)

describe("recurrent memory", function()
  it("holds no tensors after a step (outputs, workspace, gradients all released)", function()
    local m = nn.LSTM(3, 4, { num_layers = 2, bidirectional = true })
    local g = nn.GRUCell(3, 4)
    local x = keel.randn({ 5, 2, 3 })
    local function step()
      local o, h, c = m(x)
      local hc = g(x[1], g(x[2]))
      ;(o:sum() + h:sum() + c:sum() + hc:sum()):backward()
      m:zero_grad()
      g:zero_grad()
      -- nor does a call that fails its checks
      pcall(F.lstm_layer, x:transpose(1, 2), nil, nil, m.weight_ih_l0, m.weight_hh_l0, keel.zeros({ 3 }))
    end
    step()
    collectgarbage(); collectgarbage()
    local before = keel.memory_stats().live_tensors
    for _ = 1, 3 do step() end
    collectgarbage(); collectgarbage()
    assert.are.equal(before, keel.memory_stats().live_tensors)
  end)
end)

describe("recurrent ops", function()
  it("reverse runs the steps backwards and keeps time order", function()
    local x, h0 = H.t64({ 3, 2, 2 }, -1, 1, 91), H.t64({ 2, 3 }, -1, 1, 92)
    local wi, wh = H.t64({ 3, 2 }, -1, 1, 93), H.t64({ 3, 3 }, -1, 1, 94)
    local out, hn = F.rnn_tanh_layer(x, h0, wi, wh, nil, nil, true)
    local h = h0
    for t = 3, 1, -1 do
      h = F.rnn_tanh_cell(x[t], h, wi, wh)
      H.assert_close(out[t], h:totable(), TOL.float64)
    end
    H.assert_close(hn, h:totable(), TOL.float64)
  end)

  it("read non-contiguous inputs", function()
    local x = H.t64({ 2, 3, 2 }, -1, 1, 95)    -- transposed: 3 steps, batch 2, input 2
    local h = H.t64({ 3, 2 }, -1, 1, 96)       -- transposed: batch 2, hidden 3
    local wi, wh = H.t64({ 9, 2 }, -1, 1, 97), H.t64({ 9, 3 }, -1, 1, 98)
    local a = F.gru_layer(x:transpose(1, 2), h:t(), wi, wh)
    local b = F.gru_layer(x:transpose(1, 2):contiguous(), h:t():contiguous(), wi, wh)
    H.assert_close(a, b:totable(), 0)
    local xt = x:transpose(1, 2)[1]
    assert.is_false(xt:is_contiguous())
    local c = F.gru_cell(xt, h:t(), wi, wh)
    local d = F.gru_cell(xt:contiguous(), h:t():contiguous(), wi, wh)
    H.assert_close(c, d:totable(), 0)
  end)

  it("compute float32 tanh and sigmoid within a few ulp, NaN and infinities included", function()
    -- x [n, 1] through one-unit cells: rnn_tanh_cell gives tanh(x); a GRU
    -- cell with only the z gate fed and h = 1 gives sigmoid(x)
    local xs = { 0, -0.0, 1e-30, -3e-7, 1e-5, -3e-3, 0.05, 0.1249, -0.1251, 0.13, -0.5, 0.7, 1, -2.5,
                 3, 8.9, -9.5, 15, 40, 87.5, 88.5, -100, 1e30, math.huge, -math.huge, 0 / 0 }
    for k = 1, 200 do xs[#xs + 1] = -12 + 24 * (k - 0.5) / 200 end
    local col = {}
    for i, v in ipairs(xs) do col[i] = { v } end
    local function run(dtype)
      -- float64 from the float32-rounded inputs, so both see the same x
      local x = keel.tensor(col, { dtype = "float32" }):to(dtype)
      local one, zero = keel.ones({ 1, 1 }, { dtype = dtype }), keel.zeros({ 1, 1 }, { dtype = dtype })
      local t = F.rnn_tanh_cell(x, nil, one, zero)
      local s = F.gru_cell(x, keel.ones({ #xs, 1 }, { dtype = dtype }),
        keel.tensor({ { 0 }, { 1 }, { 0 } }, { dtype = dtype }), keel.zeros({ 3, 1 }, { dtype = dtype }))
      return H.flat(t), H.flat(s)
    end
    local t32, s32 = run("float32")
    local t64, s64 = run("float64")
    for i, x in ipairs(xs) do
      for _, pair in ipairs { { "tanh", t32[i], t64[i] }, { "sigmoid", s32[i], s64[i] } } do
        local name, got, want = pair[1], pair[2], pair[3]
        local ok
        if want ~= want then ok = got ~= got
        else ok = math.abs(got - want) <= 4e-7 * math.abs(want) + 1e-37 end
        assert.is_true(ok, ("%s(%.9g): float32 %.9g, float64 %.17g"):format(name, x, got, want))
      end
    end
  end)

  it("name their grad_fn", function()
    local x, h = H.t64({ 2, 3 }, -1, 1, 1), H.t64({ 2, 4 }, -1, 1, 2)
    local w1, w2 = H.t64({ 4, 3 }, -1, 1, 3), H.t64({ 4, 4 }, -1, 1, 4)
    assert.are.equal("rnn_tanh_cell", F.rnn_tanh_cell(x, h, w1, w2).grad_fn)
    assert.are.equal("rnn_relu_cell", F.rnn_relu_cell(x, h, w1, w2).grad_fn)
    local hs, cs = F.lstm_cell(x, h, h, H.t64({ 16, 3 }, -1, 1, 5), H.t64({ 16, 4 }, -1, 1, 6))
    assert.are.equal("select", hs.grad_fn)
    assert.are.equal("select", cs.grad_fn)
    assert.are.equal("gru_layer", F.gru_layer(x:unsqueeze(1), h, H.t64({ 12, 3 }, -1, 1, 7), H.t64({ 12, 4 }, -1, 1, 8)).grad_fn)
  end)
end)

describe("recurrent errors", function()
  local x, h = H.t64({ 2, 3 }, -1, 1, 1), H.t64({ 2, 4 }, -1, 1, 2)
  local wi, wh = H.t64({ 16, 3 }, -1, 1, 3), H.t64({ 16, 4 }, -1, 1, 4)

  it("name the argument and the expected shape", function()
    err(function() F.lstm_cell(x, h, h, H.t64({ 16, 5 }, -1, 1, 5), wh) end,
      "lstm_cell: weight_ih has shape [16,5], expected [16,3] ([4*hidden_size, input_size])")
    err(function() F.lstm_cell(x, h, h, wi, H.t64({ 12, 4 }, -1, 1, 6)) end,
      "lstm_cell: weight_hh has shape [12,4], expected [4*hidden_size, hidden_size]")
    err(function() F.lstm_cell(x, H.t64({ 3, 4 }, -1, 1, 7), h, wi, wh) end,
      "lstm_cell: h has shape [3,4], expected [2,4] ([batch, hidden_size])")
    err(function() F.lstm_cell(x, h, H.t64({ 2, 5 }, -1, 1, 8), wi, wh) end,
      "lstm_cell: c has shape [2,5], expected [2,4] ([batch, hidden_size])")
    err(function() F.lstm_cell(x, h, h, wi, wh, H.t64({ 15 }, -1, 1, 9)) end,
      "lstm_cell: bias_ih has shape [15], expected [16] ([4*hidden_size])")
    err(function() F.gru_cell(x, h, H.t64({ 12, 3 }, -1, 1, 10), H.t64({ 12, 4 }, -1, 1, 11), nil,
                              H.t64({ 16 }, -1, 1, 12)) end,
      "gru_cell: bias_hh has shape [16], expected [12] ([3*hidden_size])")
    err(function() F.rnn_tanh_cell(x:view(6), h, wi, wh) end,
      "rnn_tanh_cell: input has shape [6], expected 2 dimensions [batch, input_size]")
    err(function() F.lstm_layer(x, h, h, wi, wh) end,
      "lstm_layer: input has shape [2,3], expected 3 dimensions [seq_len, batch, input_size]")
    err(function() F.gru_layer(x:view(2, 1, 3), H.t64({ 2, 4 }, -1, 1, 13), H.t64({ 12, 3 }, -1, 1, 10),
                                H.t64({ 12, 4 }, -1, 1, 11)) end,
      "gru_layer: h0 has shape [2,4], expected [1,4] ([batch, hidden_size])")
    err(function() F.rnn_relu_layer(keel.zeros({ 0, 2, 3 }, { dtype = "float64" }), nil,
                                    H.t64({ 4, 3 }, -1, 1, 14), H.t64({ 4, 4 }, -1, 1, 15)) end,
      "rnn_relu_layer: input has no time steps, expected at least one")
  end)

  it("refuse mixed dtypes and non-float inputs", function()
    err(function() F.lstm_cell(x, h, h, wi:float(), wh) end,
      "lstm_cell: weight_ih has dtype float32, expected float64 (the input's)")
    err(function() F.rnn_tanh_cell(keel.zeros({ 2, 3 }, { dtype = "int64" }), nil, wi, wh) end,
      "rnn_tanh_cell: expected a float32 or float64 tensor, got int64")
    err(function() F.lstm_cell(x, h, h, "w", wh) end,
      "lstm_cell: argument #4: expected a keel.Tensor, got string")
  end)

  it("modules check sizes and options", function()
    local m = nn.LSTM(3, 4, { num_layers = 2 })
    err(function() m(keel.zeros({ 5, 2, 6 })) end,
      "LSTM: input has shape [5,2,6], expected input_size 3 in the last dimension")
    err(function() m(keel.zeros({ 5, 2, 3 }), keel.zeros({ 1, 2, 4 })) end,
      "LSTM: h0 has shape [1,2,4], expected [2,2,4] ([num_layers * num_directions, batch, hidden_size])")
    err(function() m(keel.zeros({ 2, 5, 2, 3 })) end,
      "LSTM: input has shape [2,5,2,3], expected 3 dimensions (batched) or 2 (unbatched)")
    err(function() nn.GRU(3, 4)(keel.zeros({ 5, 2, 3 }), nil, keel.zeros({ 1, 2, 4 })) end,
      "GRU: got a cell state, but only an LSTM has one")
    err(function() nn.RNN(3, 4, { nonlinearity = "sigmoid" }) end,
      "RNN: nonlinearity: expected \"tanh\" or \"relu\", got sigmoid")
    err(function() nn.LSTM(0, 4) end, "LSTM: input_size: expected a positive integer, got 0")
    err(function() nn.GRU(3, 4, { dropout = 2 }) end, "GRU: dropout: expected a number in [0, 1], got 2")
    err(function() nn.LSTMCell(3, 4)(keel.zeros({ 2, 2, 3 })) end,
      "LSTMCell: input has shape [2,2,3], expected 2 dimensions (batched) or 1 (unbatched)")
    err(function() nn.RNNCell(3, 4)(keel.zeros({ 2, 5 })) end,
      "RNNCell: input has shape [2,5], expected input_size 3 in the last dimension")
    err(function() nn.RNNCell(3, 4)(keel.zeros({ 2, 3 }), keel.zeros({ 2, 5 })) end,
      "rnn_tanh_cell: h has shape [2,5], expected [2,4] ([batch, hidden_size])")
  end)

  it("attention checks its arguments", function()
    local q = keel.zeros({ 2, 3, 4 })
    err(function() F.scaled_dot_product_attention(q, keel.zeros({ 2, 5, 3 }), keel.zeros({ 2, 5, 4 })) end,
      "scaled_dot_product_attention: query [2,3,4] and key [2,5,3] differ in the last dimension")
    err(function() F.scaled_dot_product_attention(q, q, keel.zeros({ 2, 4, 4 })) end,
      "scaled_dot_product_attention: key [2,3,4] and value [2,4,4] differ in the sequence dimension")
    err(function() F.scaled_dot_product_attention(q, q, q, { is_causal = true, attn_mask = keel.zeros({ 3, 3 }) }) end,
      "scaled_dot_product_attention: attn_mask and is_causal are exclusive")
    err(function() F.scaled_dot_product_attention(q, q, q, { dropout_p = 1.5 }) end,
      "scaled_dot_product_attention: dropout_p: expected a number in [0, 1], got 1.5")
    err(function() nn.MultiheadAttention(6, 4) end,
      "MultiheadAttention: embed_dim (6) must be divisible by num_heads (4)")
    local m = nn.MultiheadAttention(4, 2)
    local q5 = keel.zeros({ 3, 2, 5 })
    err(function() m(q5, q5, q5) end,
      "MultiheadAttention: query, key and value have 5, 5 and 5 features, expected 4, 4 and 4")
    err(function() m(keel.zeros({ 3, 2, 4 }), keel.zeros({ 5, 3, 4 }), keel.zeros({ 5, 3, 4 })) end,
      "MultiheadAttention: key [5,3,4] and value [5,3,4] do not match query [3,2,4] in batch and sequence sizes")
    local x = keel.zeros({ 3, 2, 4 })
    err(function() m(x, x, x, { attn_mask = keel.zeros({ 3, 4 }) }) end,
      "MultiheadAttention: attn_mask has shape [3,4], expected [3,3] or [4,3,3]")
    err(function() m(x, x, x, { key_padding_mask = keel.zeros({ 3, 2 }) }) end,
      "MultiheadAttention: key_padding_mask has shape [3,2], expected [2,3]")
  end)
end)

describe("attention", function()
  it("causal masking gives zero weight above the diagonal", function()
    local q = keel.randn({ 2, 4, 3 })
    local _, w = F.scaled_dot_product_attention(q, q, q, { is_causal = true, need_weights = true })
    for b = 1, 2 do
      for i = 1, 4 do
        for j = i + 1, 4 do assert.are.equal(0, w[b][i][j]) end
      end
    end
  end)

  it("dropout on the weights only in training (MultiheadAttention)", function()
    keel.manual_seed(9)
    local m = nn.MultiheadAttention(4, 2, { dropout = 0.5 })
    local x = keel.randn({ 3, 2, 4 })
    m:eval()
    local o1 = m(x, x, x)
    H.assert_close(m(x, x, x), o1:totable(), 0)
    m:train()
    assert.is_true((m(x, x, x) - o1):abs():max():item() > 1e-4)
  end)

  it("MultiheadAttention init is PyTorch's", function()
    keel.manual_seed(10)
    local m = nn.MultiheadAttention(32, 4)
    local bound = math.sqrt(6 / (32 + 96))
    local v = H.flat(m.in_proj_weight)
    local mx = 0
    for _, x in ipairs(v) do mx = math.max(mx, math.abs(x)) end
    assert.is_true(mx <= bound and mx > 0.9 * bound)
    H.assert_all(m.in_proj_bias, 0)
    H.assert_all(m.out_proj.bias, 0)
    local names = {}
    for name in m:named_parameters() do names[#names + 1] = name end
    assert.are.same({ "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias" }, names)
  end)
end)
