-- tests/cases/rnn.lua: gradient checks of the recurrent ops (one entry per
-- op name of keel.ops()), loaded by autograd_spec.lua. Each case checks the
-- gradient of every input: x, the states, both weights and both biases.
local env = ...
local T, keel = env.T, env.keel
local F = require("keel.core")._nn

-- Inputs of a cell or layer: x, h (, c), w_ih, w_hh (, b_ih, b_hh), float64.
local function args(gates, lead, I, H, opts)
  opts = opts or {}
  local s = opts.seed or 0
  local B = lead[#lead]
  local xs = {}
  for i = 1, #lead do xs[i] = lead[i] end
  xs[#xs + 1] = I
  local list = { T(xs, -1, 1, 301 + s) }
  if opts.state ~= false then
    list[#list + 1] = T({ B, H }, -1, 1, 302 + s)
    if gates == 4 then list[#list + 1] = T({ B, H }, -1, 1, 303 + s) end
  end
  list[#list + 1] = T({ gates * H, I }, -0.8, 0.8, 304 + s)
  list[#list + 1] = T({ gates * H, H }, -0.8, 0.8, 305 + s)
  if opts.bias ~= false then
    list[#list + 1] = T({ gates * H }, -0.5, 0.5, 306 + s)
    list[#list + 1] = T({ gates * H }, -0.5, 0.5, 307 + s)
  end
  return list
end

-- Every result of a cell/layer call, joined along dimension 1 (h_n and
-- c_n of a layer are unsqueezed to the output's rank).
local function joined(...)
  local r = { ... }
  local nd = r[1]:dim()
  for i = 2, #r do
    if r[i]:dim() < nd then r[i] = r[i]:unsqueeze(1) end
  end
  if #r == 1 then return r[1] end
  return keel.cat(r, 1)
end

-- f of the inputs args() makes, given which optional ones are present.
local function caller(fn, lstm, has_state, has_bias, reverse)
  return function(...)
    local a = { ... }
    local k = 1
    local x = a[k]; k = k + 1
    local h, c
    if has_state then
      h = a[k]; k = k + 1
      if lstm then c = a[k]; k = k + 1 end
    end
    local wi, wh = a[k], a[k + 1]
    local bi, bh
    if has_bias then bi, bh = a[k + 2], a[k + 3] end
    if lstm then return joined(fn(x, h, c, wi, wh, bi, bh, reverse)) end
    return joined(fn(x, h, wi, wh, bi, bh, reverse))
  end
end

local function cell_cases(fn, gates, lstm, seed)
  return {
    { "batch 3, input 4, hidden 5, biases", caller(fn, lstm, true, true),
      function() return args(gates, { 3 }, 4, 5, { seed = seed }) end },
    { "no biases", caller(fn, lstm, true, false),
      function() return args(gates, { 2 }, 3, 4, { seed = seed + 10, bias = false }) end },
    { "no initial state (zeros)", caller(fn, lstm, false, true),
      function() return args(gates, { 2 }, 3, 2, { seed = seed + 20, state = false }) end },
  }
end

local function layer_cases(fn, gates, lstm, seed)
  return {
    { "3 steps, batch 2, input 3, hidden 4, biases", caller(fn, lstm, true, true),
      function() return args(gates, { 3, 2 }, 3, 4, { seed = seed }) end },
    { "reverse", caller(fn, lstm, true, true, true),
      function() return args(gates, { 3, 2 }, 2, 3, { seed = seed + 10 }) end },
    { "no biases, no initial state", caller(fn, lstm, false, false),
      function() return args(gates, { 2, 3 }, 2, 3, { seed = seed + 20, state = false, bias = false }) end },
    { "one step", caller(fn, lstm, true, true),
      function() return args(gates, { 1, 2 }, 3, 2, { seed = seed + 30 }) end },
  }
end

return {
  rnn_tanh_cell = cell_cases(F.rnn_tanh_cell, 1, false, 0),
  rnn_relu_cell = cell_cases(F.rnn_relu_cell, 1, false, 100),
  lstm_cell = cell_cases(F.lstm_cell, 4, true, 200),
  gru_cell = cell_cases(F.gru_cell, 3, false, 300),
  rnn_tanh_layer = layer_cases(F.rnn_tanh_layer, 1, false, 400),
  rnn_relu_layer = layer_cases(F.rnn_relu_layer, 1, false, 500),
  lstm_layer = layer_cases(F.lstm_layer, 4, true, 600),
  gru_layer = layer_cases(F.gru_layer, 3, false, 700),
}
