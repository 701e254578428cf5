-- tests/cuda_attention_spec.lua: the fused attention kernels of the CUDA
-- plugin (kernels/attention.cu) against the CPU backend
-- (engine/backend_cpu_attn.c), their specification: float32 and float64,
-- odd shapes past one tile, causal (L < S, L > S), learnable and broadcast
-- biases, boolean masks, dropout (the same counter-based mask on both
-- devices, so the tolerance stays tight), fully masked rows, the composed
-- fallback above the kernels' head size limit, autocast, and
-- MultiheadAttention on CUDA with is_causal and masks (masks are built on
-- the inputs' device). Without a GPU (or the simulator plugin) every test
-- is a visible skip.
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local nn = keel.nn
local F = nn.functional
local gpu_it = H.gpu_it(it, pending)

local TOL = {float32 = {atol = 2e-5, rtol = 2e-4}, float64 = {atol = 1e-12, rtol = 1e-10}}

local function inp(shape, dtype, seed) return D.input(shape, dtype, {seed = seed, lo = -1, hi = 1}) end

local function sdpa(opts)
  return function(q, k, v, m)
    if opts.seed then keel.manual_seed(opts.seed) end
    local o = {}
    for key, val in pairs(opts) do if key ~= "seed" then o[key] = val end end
    if m then o.attn_mask = m end
    return F.scaled_dot_product_attention(q, k, v, o)
  end
end

describe("fused attention on CUDA agrees with the CPU", function()
  local cases = {
    {"plain", {2, 3, 5, 7}, {2, 3, 9, 7}, {2, 3, 9, 4}, {}},
    {"causal, L < S, past one tile", {1, 40, 16}, {1, 70, 16}, {1, 70, 8}, {is_causal = true}},
    {"causal, L > S", {2, 37, 5}, {2, 20, 5}, {2, 20, 6}, {is_causal = true}},
    {"E = 1, scale", {3, 9, 1}, {3, 11, 1}, {3, 11, 1}, {scale = 2.5}},
    {"head sizes 64 and 96", {1, 2, 18, 64}, {1, 2, 33, 64}, {1, 2, 33, 96}, {}},
    {"broadcast batch dims", {2, 1, 6, 4}, {1, 3, 7, 4}, {7, 5}, {is_causal = true}},
    {"dropout", {2, 2, 9, 8}, {2, 2, 35, 8}, {2, 2, 35, 3}, {dropout_p = 0.3, seed = 5}},
    {"dropout, causal", {1, 33, 4}, {1, 33, 4}, {1, 33, 4}, {dropout_p = 0.5, is_causal = true, seed = 6}},
  }
  for _, dtype in ipairs {"float32", "float64"} do
    for n, c in ipairs(cases) do
      gpu_it(c[1] .. " (" .. dtype .. ")", function()
        D.check(sdpa(c[5]), {inp(c[2], dtype, n), inp(c[3], dtype, 20 + n), inp(c[4], dtype, 40 + n)},
                {tol = TOL[dtype]})
      end)
    end
    gpu_it("learnable biases [L, S] and [B, 1, L, S] (" .. dtype .. ")", function()
      local q, k, v = {2, 3, 6, 4}, {2, 3, 40, 4}, {2, 3, 40, 5}
      D.check(sdpa({}), {inp(q, dtype, 1), inp(k, dtype, 2), inp(v, dtype, 3), inp({6, 40}, dtype, 4)},
              {tol = TOL[dtype]})
      D.check(sdpa({dropout_p = 0.2, seed = 9}),
              {inp(q, dtype, 5), inp(k, dtype, 6), inp(v, dtype, 7), inp({2, 1, 6, 40}, dtype, 8)},
              {tol = TOL[dtype]})
    end)
    gpu_it("boolean mask with a fully masked row (" .. dtype .. ")", function()
      local vals = H.values(4 * 6, -1, 1, 3)
      for i = 1, #vals do vals[i] = vals[i] > -0.3 and 1 or 0 end
      for i = 7, 12 do vals[i] = 0 end   -- row 2 sees nothing: NaN there on both
      local m = keel.tensor(H.nest(vals, {4, 6}), {dtype = "int64"})
      local rc, rd = D.check(function(q, k, v)
        local o = F.scaled_dot_product_attention(q, k, v, {attn_mask = m:to(q.device)})
        return o:narrow(2, 1, 1) + o:narrow(2, 3, 2):sum(2, true)
      end, {inp({2, 4, 3}, dtype, 1), inp({2, 6, 3}, dtype, 2), inp({2, 6, 2}, dtype, 3)}, {tol = TOL[dtype]})
      assert.is_truthy(rc and rd)
    end)
    gpu_it("a NaN score among finite ones in a key tile: that row NaN, the others as on the CPU (" .. dtype .. ")",
      function()
      -- one NaN in the bias at (row 3, key 6): within the first tile of
      -- keys, so its lane alone holds NaN when the row's maximum is taken
      local vals = H.values(5 * 40, -1, 1, 9)
      vals[2 * 40 + 6] = 0 / 0
      local bias = keel.tensor(H.nest(vals, {5, 40}), {dtype = dtype})
      local q, k, v = inp({2, 5, 8}, dtype, 1), inp({2, 40, 8}, dtype, 2), inp({2, 40, 3}, dtype, 3)
      local want = F.scaled_dot_product_attention(q, k, v, {attn_mask = bias})
      local got = F.scaled_dot_product_attention(q:cuda(), k:cuda(), v:cuda(), {attn_mask = bias:cuda()}):cpu()
      local w, g = want:totable(), got:totable()
      for b = 1, 2 do
        for i = 1, 5 do
          for d = 1, 3 do
            local x, y = w[b][i][d], g[b][i][d]
            if i == 3 then
              assert.is_true(x ~= x and y ~= y, "row 3 is NaN on both")
            else
              assert.is_true(math.abs(x - y) <= TOL[dtype].atol + TOL[dtype].rtol * math.abs(x),
                ("b%d i%d d%d: %s vs %s"):format(b, i, d, x, y))
            end
          end
        end
      end
    end)
  end

  gpu_it("inputs on two devices: an error naming the argument and both devices", function()
    local q = keel.zeros({2, 3, 4})
    H.assert_error_match(function() F._sdpa(q:cuda(), q, q, nil, false, 1, 0) end,
      "scaled_dot_product_attention: key is on cpu, the query on cuda; expected one device")
    H.assert_error_match(function() F._sdpa(q, q, q, keel.zeros({3, 3}):cuda(), false, 1, 0) end,
      "scaled_dot_product_attention: bias %(attn_mask%) is on cuda, the query on cpu; expected one device")
  end)

  gpu_it("above the head size limit: the composed fallback, still on the device", function()
    D.check(sdpa({is_causal = true}), {inp({2, 5, 260}, "float32", 1), inp({2, 7, 260}, "float32", 2),
                                      inp({2, 7, 3}, "float32", 3)}, {tol = TOL.float32})
    D.check(sdpa({dropout_p = 0.4, seed = 4}), {inp({1, 4, 130}, "float64", 4), inp({1, 6, 130}, "float64", 5),
                                                 inp({1, 6, 2}, "float64", 6), inp({4, 6}, "float64", 7)},
            {tol = TOL.float64})
  end)

  gpu_it("under autocast: rounded like the CPU, and not full precision", function()
    local q, k, v = inp({2, 24, 16}, "float32", 1), inp({2, 40, 16}, "float32", 2), inp({2, 40, 8}, "float32", 3)
    local full = F.scaled_dot_product_attention(q:to("cuda"), k:to("cuda"), v:to("cuda")):cpu()
    for _, prec in ipairs {"bfloat16", "float16", "tf32"} do
      local rc, rd
      keel.amp.autocast(prec, function()
        rc, rd = D.check(sdpa({is_causal = true}), {q, k, v}, {tol = {atol = 3e-2, rtol = 3e-2}})
      end)
      if prec == "bfloat16" then
        assert.is_true((rd[1]:cpu():detach() - full):abs():max():item() > 1e-4)
      end
      assert.is_truthy(rc)
    end
  end)
end)

describe("MultiheadAttention on CUDA", function()
  local function twin(E, heads, opts)
    keel.manual_seed(21)
    local m = nn.MultiheadAttention(E, heads, opts)
    local md = nn.MultiheadAttention(E, heads, opts)
    md:load_state_dict(m:state_dict())
    md:to("cuda")
    return m, md
  end

  local function compare(a, b, tol)
    H.assert_close(b:cpu():detach():reshape {-1}, a:detach():reshape {-1}:totable(), tol)
  end

  for _, nw in ipairs {true, false} do
    gpu_it("is_causal and masks, need_weights = " .. tostring(nw), function()
      local m, md = twin(8, 2, {dtype = "float64"})
      local x = D.input({5, 3, 8}, "float64", {seed = 3, grad = false})
      local pad = keel.tensor({{0, 0, 0, 0, 1}, {0, 0, 0, 0, 0}, {0, 1, 0, 0, 0}}, {dtype = "int64"})
      local am = D.input({5, 5}, "float64", {seed = 4, grad = false})
      local xd = x:to("cuda")
      local o1 = m(x, x, x, {is_causal = true, need_weights = nw})
      local o2 = md(xd, xd, xd, {is_causal = true, need_weights = nw})
      D.same_device(o2, "cuda")
      compare(o1, o2, TOL.float64)
      o1 = m(x, x, x, {attn_mask = am, key_padding_mask = pad, need_weights = nw})
      o2 = md(xd, xd, xd, {attn_mask = am:to("cuda"), key_padding_mask = pad:to("cuda"), need_weights = nw})
      compare(o1, o2, TOL.float64)
      o1:sum():backward()
      o2:sum():backward()
      compare(m.in_proj_weight.grad, md.in_proj_weight.grad, TOL.float64)
    end)
  end
end)
