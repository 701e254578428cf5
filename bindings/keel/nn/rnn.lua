-- keel.nn.rnn: recurrent modules (RNN, LSTM, GRU and their cells) and
-- attention (scaled_dot_product_attention, MultiheadAttention).
--
-- The cells and layers are engine ops with fused C forward and backward
-- kernels (nn.functional.rnn_tanh_cell, rnn_relu_cell, lstm_cell, gru_cell,
-- and rnn_tanh_layer, rnn_relu_layer, lstm_layer, gru_layer: one layer, one
-- direction, all time steps in one op). The modules here stack layers and
-- directions, add dropout between layers and handle batch_first and
-- unbatched inputs. Parameter names, shapes and initialisation are
-- PyTorch's. Attention runs the fused engine op (scaled_dot_product_attention
-- without the weights), or composed ops (matmul, softmax, additive masks)
-- when the weights are asked for.
local keel = require "keel"

return function(nn)
  local F = nn.functional
  local init = nn.init
  local is_tensor = keel.is_tensor

  local function shape_str(s)
    local p = {}
    for i, v in ipairs(s) do p[i] = tostring(v) end
    return "[" .. table.concat(p, ",") .. "]"
  end

  -- Levels: 1 this helper, 2 the init method, 3 the class call, 4 the user.
  local function options(who, opts)
    if opts ~= nil and type(opts) ~= "table" then
      error(who .. ": options: expected a table, got " .. type(opts), 4)
    end
    return opts or {}
  end

  local function check_size(who, name, v)
    if math.type(v) ~= "integer" or v < 1 then
      error(("%s: %s: expected a positive integer, got %s"):format(who, name, tostring(v)), 4)
    end
  end

  local function default(v, d)
    if v == nil then return d end
    return v
  end

  -- Raises at the caller of the module (forward is called by __call).
  local function check_tensor(who, what, v, level)
    if not is_tensor(v) then
      error(("%s: %s: expected a keel.Tensor, got %s"):format(who, what, type(v)), level or 4)
    end
  end

  ---------------------------------------------------------------------------
  -- Recurrent layers
  ---------------------------------------------------------------------------

  -- mode -> gates per step, the layer op and the cell op
  local MODES = {
    RNN_TANH = {gates = 1, layer = "rnn_tanh_layer", cell = "rnn_tanh_cell"},
    RNN_RELU = {gates = 1, layer = "rnn_relu_layer", cell = "rnn_relu_cell"},
    LSTM = {gates = 4, layer = "lstm_layer", cell = "lstm_cell"},
    GRU = {gates = 3, layer = "gru_layer", cell = "gru_cell"},
  }

  -- The mode of a new module: its class's kind, and for RNN the
  -- nonlinearity option.
  local function rnn_mode(self, opts)
    local who, kind = self.__name, self._kind
    if kind == nil then
      error(who .. ": not a recurrent module; use nn.RNN, nn.LSTM, nn.GRU or their cells", 4)
    end
    if kind ~= "RNN" then return kind end
    local nl = default(opts.nonlinearity, "tanh")
    if nl == "tanh" then return "RNN_TANH" end
    if nl == "relu" then return "RNN_RELU" end
    error(("%s: nonlinearity: expected \"tanh\" or \"relu\", got %s"):format(who, tostring(nl)), 4)
  end

  -- The shared base of nn.RNN, nn.LSTM and nn.GRU:
  -- (input_size, hidden_size [, {num_layers = 1, bias = true, batch_first =
  -- false, dropout = 0, bidirectional = false, nonlinearity = "tanh" (RNN
  -- only), dtype = "float32"}]). Parameters per layer l and direction:
  -- weight_ih_l<l>[_reverse] [G*hidden, in], weight_hh_l<l>[_reverse]
  -- [G*hidden, hidden], bias_ih_l<l>[_reverse], bias_hh_l<l>[_reverse]
  -- [G*hidden], G = 1, 4 (i, f, g, o), 3 (r, z, n); all U(-k, k) with
  -- k = 1/sqrt(hidden_size), as PyTorch.
  local RNNBase = nn.Module:extend("RNNBase")
  nn.RNNBase = RNNBase

  function RNNBase:init(input_size, hidden_size, opts)
    local who = self.__name
    check_size(who, "input_size", input_size)
    check_size(who, "hidden_size", hidden_size)
    opts = options(who, opts)
    self.mode = rnn_mode(self, opts)
    self.input_size, self.hidden_size = input_size, hidden_size
    self.num_layers = default(opts.num_layers, 1)
    check_size(who, "num_layers", self.num_layers)
    self.bias = default(opts.bias, true)
    self.batch_first = default(opts.batch_first, false)
    self.dropout = default(opts.dropout, 0)
    if type(self.dropout) ~= "number" or not (self.dropout >= 0 and self.dropout <= 1) then
      error(("%s: dropout: expected a number in [0, 1], got %s"):format(who, tostring(self.dropout)), 3)
    end
    self.bidirectional = default(opts.bidirectional, false)
    if self.mode == "RNN_TANH" or self.mode == "RNN_RELU" then
      self.nonlinearity = self.mode == "RNN_TANH" and "tanh" or "relu"
    end
    local G = MODES[self.mode].gates
    local dirs = self.bidirectional and 2 or 1
    local o = {dtype = opts.dtype}
    for l = 0, self.num_layers - 1 do
      local nin = l == 0 and input_size or hidden_size * dirs
      for d = 0, dirs - 1 do
        local sfx = "_l" .. l .. (d == 1 and "_reverse" or "")
        self["weight_ih" .. sfx] = nn.Parameter(keel.empty({G * hidden_size, nin}, o))
        self["weight_hh" .. sfx] = nn.Parameter(keel.empty({G * hidden_size, hidden_size}, o))
        if self.bias then
          self["bias_ih" .. sfx] = nn.Parameter(keel.empty({G * hidden_size}, o))
          self["bias_hh" .. sfx] = nn.Parameter(keel.empty({G * hidden_size}, o))
        end
      end
    end
    self:reset_parameters()
  end

  function RNNBase:reset_parameters()
    local k = 1 / math.sqrt(self.hidden_size)
    for _, p in ipairs(self:parameters()) do init.uniform_(p, -k, k) end
  end

  -- The initial state argument: [num_layers * dirs, B, H] (unbatched:
  -- [num_layers * dirs, H], given here already unsqueezed).
  local function check_state(who, what, t, want)
    check_tensor(who, what, t, 5)
    if not (t:dim() == 3 and t.shape[1] == want[1] and t.shape[2] == want[2] and t.shape[3] == want[3]) then
      error(("%s: %s has shape %s, expected %s ([num_layers * num_directions, batch, hidden_size])"):format(
        who, what, shape_str(t.shape), shape_str(want)), 4)
    end
  end

  -- forward(input [, h0 [, c0]]) -> output, h_n (, c_n for LSTM).
  -- input [T, B, input_size] ([B, T, input_size] with batch_first) or
  -- unbatched [T, input_size]; h0, c0 [num_layers * num_directions, B,
  -- hidden_size] (or without B), zeros when nil; an LSTM also takes
  -- {h0, c0} as the second argument. output [T, B, D * hidden_size] (D = 2
  -- when bidirectional; [B, T, ...] with batch_first), h_n and c_n like h0.
  function RNNBase:forward(input, h0, c0)
    local who = self.__name
    local lstm = self.mode == "LSTM"
    check_tensor(who, "input", input)
    if lstm and type(h0) == "table" then h0, c0 = h0[1], h0[2] end
    if not lstm and c0 ~= nil then
      error(who .. ": got a cell state, but only an LSTM has one", 3)
    end
    local nd = input:dim()
    if nd ~= 2 and nd ~= 3 then
      error(("%s: input has shape %s, expected 3 dimensions (batched) or 2 (unbatched)"):format(
        who, shape_str(input.shape)), 3)
    end
    if input.shape[nd] ~= self.input_size then
      error(("%s: input has shape %s, expected input_size %d in the last dimension"):format(
        who, shape_str(input.shape), self.input_size), 3)
    end
    local batched = nd == 3
    local x = input
    if not batched then
      x = x:unsqueeze(2)
      if h0 ~= nil then check_tensor(who, "h0", h0); if h0:dim() == 2 then h0 = h0:unsqueeze(2) end end
      if c0 ~= nil then check_tensor(who, "c0", c0); if c0:dim() == 2 then c0 = c0:unsqueeze(2) end end
    elseif self.batch_first then
      x = x:transpose(1, 2)
    end
    local dirs = self.bidirectional and 2 or 1
    local B, H = x.shape[2], self.hidden_size
    local want = {self.num_layers * dirs, B, H}
    if h0 ~= nil then check_state(who, "h0", h0, want) end
    if c0 ~= nil then check_state(who, "c0", c0, want) end

    local layer = F[MODES[self.mode].layer]
    local hs, cs = {}, {}
    for l = 0, self.num_layers - 1 do
      local outs = {}
      for d = 0, dirs - 1 do
        local sfx = "_l" .. l .. (d == 1 and "_reverse" or "")
        local k = l * dirs + d + 1
        local hk = h0 and h0:select(1, k) or nil
        local wi, wh = self["weight_ih" .. sfx], self["weight_hh" .. sfx]
        local bi, bh = self["bias_ih" .. sfx], self["bias_hh" .. sfx]
        if lstm then
          outs[d + 1], hs[k], cs[k] = layer(x, hk, c0 and c0:select(1, k) or nil, wi, wh, bi, bh, d == 1)
        else
          outs[d + 1], hs[k] = layer(x, hk, wi, wh, bi, bh, d == 1)
        end
      end
      x = dirs == 2 and keel.cat(outs, 3) or outs[1]
      if self.dropout > 0 and self.training and l < self.num_layers - 1 then
        x = F.dropout(x, self.dropout, true)
      end
    end
    local h_n = keel.stack(hs, 1)
    local c_n = lstm and keel.stack(cs, 1) or nil
    if not batched then
      x, h_n = x:squeeze(2), h_n:squeeze(2)
      if c_n then c_n = c_n:squeeze(2) end
    elseif self.batch_first then
      x = x:transpose(1, 2)
    end
    if lstm then return x, h_n, c_n end
    return x, h_n
  end

  function RNNBase:extra_repr()
    local s = ("%d, %d"):format(self.input_size, self.hidden_size)
    if self.num_layers ~= 1 then s = s .. ", num_layers=" .. self.num_layers end
    if self.nonlinearity == "relu" then s = s .. ", nonlinearity='relu'" end
    if self.bias ~= true then s = s .. ", bias=" .. tostring(self.bias) end
    if self.batch_first then s = s .. ", batch_first=true" end
    if self.dropout ~= 0 then s = s .. ", dropout=" .. tostring(self.dropout) end
    if self.bidirectional then s = s .. ", bidirectional=true" end
    return s
  end

  nn.RNN = RNNBase:extend("RNN")
  nn.RNN._kind = "RNN"
  nn.LSTM = RNNBase:extend("LSTM")
  nn.LSTM._kind = "LSTM"
  nn.GRU = RNNBase:extend("GRU")
  nn.GRU._kind = "GRU"

  ---------------------------------------------------------------------------
  -- Cells
  ---------------------------------------------------------------------------

  -- The shared base of nn.RNNCell, nn.LSTMCell and nn.GRUCell:
  -- (input_size, hidden_size [, {bias = true, nonlinearity = "tanh" (RNNCell
  -- only), dtype = "float32"}]). Parameters weight_ih [G*hidden, input],
  -- weight_hh [G*hidden, hidden], bias_ih, bias_hh [G*hidden]; U(-k, k),
  -- k = 1/sqrt(hidden_size).
  local RNNCellBase = nn.Module:extend("RNNCellBase")
  nn.RNNCellBase = RNNCellBase

  function RNNCellBase:init(input_size, hidden_size, opts)
    local who = self.__name
    check_size(who, "input_size", input_size)
    check_size(who, "hidden_size", hidden_size)
    opts = options(who, opts)
    self.mode = rnn_mode(self, opts)
    self.input_size, self.hidden_size = input_size, hidden_size
    self.bias = default(opts.bias, true)
    if self.mode == "RNN_TANH" or self.mode == "RNN_RELU" then
      self.nonlinearity = self.mode == "RNN_TANH" and "tanh" or "relu"
    end
    local G = MODES[self.mode].gates
    local o = {dtype = opts.dtype}
    self.weight_ih = nn.Parameter(keel.empty({G * hidden_size, input_size}, o))
    self.weight_hh = nn.Parameter(keel.empty({G * hidden_size, hidden_size}, o))
    if self.bias then
      self.bias_ih = nn.Parameter(keel.empty({G * hidden_size}, o))
      self.bias_hh = nn.Parameter(keel.empty({G * hidden_size}, o))
    end
    self:reset_parameters()
  end

  RNNCellBase.reset_parameters = RNNBase.reset_parameters

  -- forward(input [, h [, c]]) -> h' (and c' for LSTMCell). input
  -- [B, input_size] or unbatched [input_size]; h, c [B, hidden_size]
  -- (zeros when nil); an LSTMCell also takes {h, c} as the second argument.
  function RNNCellBase:forward(input, h, c)
    local who = self.__name
    local lstm = self.mode == "LSTM"
    check_tensor(who, "input", input)
    if lstm and type(h) == "table" then h, c = h[1], h[2] end
    if not lstm and c ~= nil then
      error(who .. ": got a cell state, but only an LSTMCell has one", 3)
    end
    local nd = input:dim()
    if nd ~= 1 and nd ~= 2 then
      error(("%s: input has shape %s, expected 2 dimensions (batched) or 1 (unbatched)"):format(
        who, shape_str(input.shape)), 3)
    end
    if input.shape[nd] ~= self.input_size then
      error(("%s: input has shape %s, expected input_size %d in the last dimension"):format(
        who, shape_str(input.shape), self.input_size), 3)
    end
    local batched = nd == 2
    if not batched then
      input = input:unsqueeze(1)
      if h ~= nil then check_tensor(who, "h", h); h = h:unsqueeze(1) end
      if c ~= nil then check_tensor(who, "c", c); c = c:unsqueeze(1) end
    end
    local cell = F[MODES[self.mode].cell]
    local h1, c1
    if lstm then
      h1, c1 = cell(input, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
    else
      h1 = cell(input, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
    end
    if not batched then
      h1 = h1:squeeze(1)
      if c1 then c1 = c1:squeeze(1) end
    end
    if lstm then return h1, c1 end
    return h1
  end

  function RNNCellBase:extra_repr()
    local s = ("%d, %d"):format(self.input_size, self.hidden_size)
    if self.bias ~= true then s = s .. ", bias=" .. tostring(self.bias) end
    if self.nonlinearity == "relu" then s = s .. ", nonlinearity='relu'" end
    return s
  end

  nn.RNNCell = RNNCellBase:extend("RNNCell")
  nn.RNNCell._kind = "RNN"
  nn.LSTMCell = RNNCellBase:extend("LSTMCell")
  nn.LSTMCell._kind = "LSTM"
  nn.GRUCell = RNNCellBase:extend("GRUCell")
  nn.GRUCell._kind = "GRU"

  ---------------------------------------------------------------------------
  -- Attention
  ---------------------------------------------------------------------------

  -- A mask as a tensor to add to the attention scores, on the mask's
  -- device. An int64 mask is boolean: nonzero marks the positions that
  -- take part (masked_when = false, as scaled_dot_product_attention) or
  -- that are masked out (masked_when = true, as MultiheadAttention); the
  -- others get -inf. A float mask is added as it is.
  local function mask_bias(who, what, mask, dtype, masked_when, level)
    check_tensor(who, what, mask, level)
    if mask.dtype ~= "int64" then return mask:to(dtype) end
    local hit = mask:ne(0)
    local o = {dtype = dtype, device = mask.device}
    local neg, zero = keel.full({}, -math.huge, o), keel.zeros({}, o)
    if masked_when then return keel.where(hit, neg, zero) end
    return keel.where(hit, zero, neg)
  end

  -- -inf above the diagonal of an [L, S] score matrix (j > i), on device:
  -- position i attends to positions 1..i, as PyTorch's is_causal.
  local function causal_bias(L, S, dtype, device)
    local i = keel.arange(L, {dtype = dtype, device = "cpu"}):view(L, 1)
    local j = keel.arange(S, {dtype = dtype, device = "cpu"}):view(1, S)
    local o = {dtype = dtype, device = "cpu"}
    return keel.where(j:gt(i), keel.full({}, -math.huge, o), keel.zeros({}, o)):to(device)
  end

  -- The composed path: weights materialised, returned with the output.
  local function composed_attention(q, k, v, scale, bias, is_causal, p)
    local s = q:matmul(k:transpose(-2, -1)) * scale
    if is_causal then s = s + causal_bias(q.shape[q:dim() - 1], k.shape[k:dim() - 1], s.dtype, s.device) end
    if bias ~= nil then s = s + bias end
    local w = F.softmax(s, -1)
    if p > 0 then w = F.dropout(w, p, true) end
    return w:matmul(v), w
  end

  -- scaled_dot_product_attention(q [..., L, E], k [..., S, E], v [..., S, Ev]
  -- [, {attn_mask =, is_causal = false, dropout_p = 0, scale = 1/sqrt(E),
  -- need_weights = false}]) -> output [..., L, Ev]: softmax(q k^T * scale +
  -- mask) v, as PyTorch's function. The leading dims broadcast. attn_mask
  -- broadcasts to [..., L, S]: an int64 mask is boolean (nonzero = takes
  -- part, as PyTorch's bool masks), a float mask is added (and gets a
  -- gradient). is_causal masks j > i (and excludes attn_mask, as PyTorch).
  -- Dropout (dropout_p > 0) applies to the weights whenever it is asked
  -- for, as PyTorch's function does.
  -- The fused engine op (keel_sdpa) runs by default: it never stores the
  -- [..., L, S] weights. need_weights = true runs the composed ops instead
  -- and returns the weights [..., L, S] as a second result (its dropout
  -- mask is F.dropout's, not the fused op's).
  function F.scaled_dot_product_attention(q, k, v, opts)
    local who = "scaled_dot_product_attention"
    check_tensor(who, "argument #1 (query)", q, 3)
    check_tensor(who, "argument #2 (key)", k, 3)
    check_tensor(who, "argument #3 (value)", v, 3)
    if opts ~= nil and type(opts) ~= "table" then
      error(who .. ": argument #4: expected a table of options, got " .. type(opts), 2)
    end
    opts = opts or {}
    local nq, nk, nv = q:dim(), k:dim(), v:dim()
    if nq < 2 or nk < 2 or nv < 2 then
      error(("%s: query, key and value need at least 2 dimensions, got %s, %s and %s"):format(
        who, shape_str(q.shape), shape_str(k.shape), shape_str(v.shape)), 2)
    end
    local E, S = q.shape[nq], k.shape[nk - 1]
    if k.shape[nk] ~= E then
      error(("%s: query %s and key %s differ in the last dimension (embedding size)"):format(
        who, shape_str(q.shape), shape_str(k.shape)), 2)
    end
    if v.shape[nv - 1] ~= S then
      error(("%s: key %s and value %s differ in the sequence dimension (second to last)"):format(
        who, shape_str(k.shape), shape_str(v.shape)), 2)
    end
    local scale = opts.scale
    if scale == nil then scale = 1 / math.sqrt(E) end
    if type(scale) ~= "number" then
      error(who .. ": scale: expected a number, got " .. type(scale), 2)
    end
    local p = default(opts.dropout_p, 0)
    if type(p) ~= "number" or not (p >= 0 and p <= 1) then
      error(("%s: dropout_p: expected a number in [0, 1], got %s"):format(who, tostring(p)), 2)
    end
    if opts.is_causal and opts.attn_mask ~= nil then
      error(who .. ": attn_mask and is_causal are exclusive; pass one", 2)
    end
    local bias
    if opts.attn_mask ~= nil then bias = mask_bias(who, "attn_mask", opts.attn_mask, q.dtype, false, 4) end
    if opts.need_weights then return composed_attention(q, k, v, scale, bias, opts.is_causal, p) end
    return F._sdpa(q, k, v, bias, opts.is_causal and true or false, scale, p)
  end

  -- nn.MultiheadAttention(embed_dim, num_heads [, {bias = true, batch_first
  -- = false, dropout = 0, kdim = embed_dim, vdim = embed_dim, dtype}]):
  -- PyTorch's layout and init: in_proj_weight [3E, E] (xavier_uniform_),
  -- in_proj_bias [3E] (zeros), out_proj (a Linear, bias zeroed); with kdim
  -- or vdim other than E, q_proj_weight [E, E], k_proj_weight [E, kdim],
  -- v_proj_weight [E, vdim] instead of in_proj_weight.
  local MHA = nn.Module:extend("MultiheadAttention")
  nn.MultiheadAttention = MHA

  function MHA:init(embed_dim, num_heads, opts)
    local who = "MultiheadAttention"
    check_size(who, "embed_dim", embed_dim)
    check_size(who, "num_heads", num_heads)
    opts = options(who, opts)
    if embed_dim % num_heads ~= 0 then
      error(("%s: embed_dim (%d) must be divisible by num_heads (%d)"):format(who, embed_dim, num_heads), 3)
    end
    self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
    self.kdim, self.vdim = default(opts.kdim, embed_dim), default(opts.vdim, embed_dim)
    check_size(who, "kdim", self.kdim)
    check_size(who, "vdim", self.vdim)
    self.batch_first = default(opts.batch_first, false)
    self.dropout = default(opts.dropout, 0)
    if type(self.dropout) ~= "number" or not (self.dropout >= 0 and self.dropout <= 1) then
      error(("%s: dropout: expected a number in [0, 1], got %s"):format(who, tostring(self.dropout)), 3)
    end
    local bias = default(opts.bias, true)
    local o = {dtype = opts.dtype}
    local E = embed_dim
    self._qkv_same_embed_dim = self.kdim == E and self.vdim == E
    if self._qkv_same_embed_dim then
      self.in_proj_weight = nn.Parameter(keel.empty({3 * E, E}, o))
    else
      self.q_proj_weight = nn.Parameter(keel.empty({E, E}, o))
      self.k_proj_weight = nn.Parameter(keel.empty({E, self.kdim}, o))
      self.v_proj_weight = nn.Parameter(keel.empty({E, self.vdim}, o))
    end
    if bias then self.in_proj_bias = nn.Parameter(keel.empty({3 * E}, o)) end
    self.out_proj = nn.Linear(E, E, {bias = bias, dtype = opts.dtype})
    self:reset_parameters()
  end

  function MHA:reset_parameters()
    if self._qkv_same_embed_dim then
      init.xavier_uniform_(self.in_proj_weight)
    else
      init.xavier_uniform_(self.q_proj_weight)
      init.xavier_uniform_(self.k_proj_weight)
      init.xavier_uniform_(self.v_proj_weight)
    end
    if self.in_proj_bias then
      init.constant_(self.in_proj_bias, 0)
      init.constant_(self.out_proj.bias, 0)
    end
  end

  -- The projection weights and biases of q, k and v.
  function MHA:_projections()
    local E = self.embed_dim
    local w = self.in_proj_weight
    local wq, wk, wv
    if w then
      wq, wk, wv = w:narrow(1, 1, E), w:narrow(1, E + 1, E), w:narrow(1, 2 * E + 1, E)
    else
      wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
    end
    local b = self.in_proj_bias
    if not b then return wq, wk, wv end
    return wq, wk, wv, b:narrow(1, 1, E), b:narrow(1, E + 1, E), b:narrow(1, 2 * E + 1, E)
  end

  -- forward(query [L, N, E], key [S, N, kdim], value [S, N, vdim] [, {
  -- attn_mask =, key_padding_mask =, need_weights = true,
  -- average_attn_weights = true, is_causal = false}]) -> output [L, N, E]
  -- and the attention weights [N, L, S] averaged over the heads ([N,
  -- num_heads, L, S] without averaging; nil when need_weights is false).
  -- batch_first: [N, L, E] etc.; unbatched: [L, E] etc. attn_mask [L, S] or
  -- [N * num_heads, L, S], key_padding_mask [N, S]: an int64 mask is
  -- boolean with nonzero = masked out (PyTorch's bool masks here), a float
  -- mask is added to the scores. is_causal masks position j > i.
  -- need_weights = false runs the fused attention op (no [N, heads, L, S]
  -- weights are kept), as PyTorch's fast path; true (PyTorch's default)
  -- runs the composed ops that make the weights.
  function MHA:forward(query, key, value, opts)
    local who = "MultiheadAttention"
    check_tensor(who, "query", query)
    check_tensor(who, "key", key)
    check_tensor(who, "value", value)
    if opts ~= nil and type(opts) ~= "table" then
      error(who .. ": options: expected a table, got " .. type(opts), 3)
    end
    opts = opts or {}
    local E, nh, hd = self.embed_dim, self.num_heads, self.head_dim
    local batched = query:dim() == 3
    if not (query:dim() == 2 or batched) or key:dim() ~= query:dim() or value:dim() ~= query:dim() then
      error(("%s: query %s, key %s and value %s: expected 3 dimensions each (batched) or 2 (unbatched)"):format(
        who, shape_str(query.shape), shape_str(key.shape), shape_str(value.shape)), 3)
    end
    local q, k, v = query, key, value
    if not batched then
      q, k, v = q:unsqueeze(2), k:unsqueeze(2), v:unsqueeze(2)
    elseif self.batch_first then
      q, k, v = q:transpose(1, 2), k:transpose(1, 2), v:transpose(1, 2)
    end
    local L, N, S = q.shape[1], q.shape[2], k.shape[1]
    if q.shape[3] ~= E or k.shape[3] ~= self.kdim or v.shape[3] ~= self.vdim then
      error(("%s: query, key and value have %d, %d and %d features, expected %d, %d and %d"):format(
        who, q.shape[3], k.shape[3], v.shape[3], E, self.kdim, self.vdim), 3)
    end
    if k.shape[2] ~= N or v.shape[2] ~= N or v.shape[1] ~= S then
      error(("%s: key %s and value %s do not match query %s in batch and sequence sizes"):format(
        who, shape_str(key.shape), shape_str(value.shape), shape_str(query.shape)), 3)
    end
    local wq, wk, wv, bq, bk, bv = self:_projections()
    -- [len, N, E] -> [N, heads, len, head_dim]
    local function heads(x, len)
      return x:reshape({len, N, nh, hd}):permute(2, 3, 1, 4)
    end
    q = heads(F.linear(q, wq, bq), L)
    k = heads(F.linear(k, wk, bk), S)
    v = heads(F.linear(v, wv, bv), S)

    local bias
    local dtype = q.dtype
    if opts.attn_mask ~= nil then
      local m = mask_bias(who, "attn_mask", opts.attn_mask, dtype, true, 5)
      if m:dim() == 3 then
        if m.shape[1] ~= N * nh or m.shape[2] ~= L or m.shape[3] ~= S then
          error(("%s: attn_mask has shape %s, expected [%d,%d] or [%d,%d,%d]"):format(
            who, shape_str(m.shape), L, S, N * nh, L, S), 3)
        end
        m = m:reshape({N, nh, L, S})
      elseif m:dim() ~= 2 or m.shape[1] ~= L or m.shape[2] ~= S then
        error(("%s: attn_mask has shape %s, expected [%d,%d] or [%d,%d,%d]"):format(
          who, shape_str(m.shape), L, S, N * nh, L, S), 3)
      end
      bias = m
    end
    if opts.key_padding_mask ~= nil then
      local m = mask_bias(who, "key_padding_mask", opts.key_padding_mask, dtype, true, 5)
      local want = batched and {N, S} or {S}
      if m:dim() ~= #want or m.shape[1] ~= want[1] or m.shape[#want] ~= want[#want] then
        error(("%s: key_padding_mask has shape %s, expected %s"):format(who, shape_str(m.shape), shape_str(want)), 3)
      end
      m = m:reshape({N, 1, 1, S})
      bias = bias and bias + m or m
    end
    local p = self.training and self.dropout or 0
    local need_weights = default(opts.need_weights, true)
    local out, w
    if need_weights then
      -- the weights are asked for: the composed path, which has them
      out, w = composed_attention(q, k, v, 1 / math.sqrt(hd), bias, opts.is_causal, p)
    else
      out = F._sdpa(q, k, v, bias, opts.is_causal and true or false, 1 / math.sqrt(hd), p)
    end
    -- [N, heads, L, head_dim] -> [L, N, E]
    out = F.linear(out:permute(3, 1, 2, 4):reshape({L, N, E}), self.out_proj.weight, self.out_proj.bias)
    if not batched then
      out = out:squeeze(2)
    elseif self.batch_first then
      out = out:transpose(1, 2)
    end
    if not need_weights then return out, nil end
    if default(opts.average_attn_weights, true) then w = w:mean(2) end
    if not batched then w = w:squeeze(1) end
    return out, w
  end
end
