-- tests/cuda_index_spec.lua: the CUDA indexing kernels (kernels/index.cu:
-- gather, scatter_add, index_select, embedding and its backward) against
-- the CPU backend, which is their specification. Every dim of 3-D inputs,
-- repeated indices (atomic sums: compared within tolerance), index shapes
-- smaller than the input, non-contiguous and broadcast operands, int64
-- data, empty indices, NaN/Inf, float32 and float64 gradients (gather's
-- backward is a scatter_add and the other way round, index_select's and
-- embedding's are scatters), nn.Embedding with padding_idx. Index tensors
-- stay on the CPU, as the op layer takes them. Without a GPU (or the
-- simulator plugin) every test is a visible skip.
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local nn = keel.nn
local F = nn.functional
local gpu_it = H.gpu_it(it, pending)

local TOL = {float32 = {atol = 1e-5, rtol = 1e-5}, float64 = {atol = 1e-12, rtol = 1e-12},
             int64 = {atol = 0, rtol = 0}}
local DTYPES = {"float32", "float64"}

local function input(shape, dtype, seed, grad)
  return D.input(shape, {dtype = dtype, seed = seed, grad = grad})
end

-- An int64 CPU index of the given shape with values in 1..hi (1-based),
-- deterministic, with repeats when the shape has more values than hi.
local function index(shape, hi, seed)
  local n = H.numel(shape)
  local r = H.rng(seed or 5)
  local v = {}
  for i = 1, n do v[i] = 1 + math.floor(r() * hi) end
  if n == 0 then return keel.zeros(shape, {dtype = "int64"}) end
  return keel.tensor(v, {dtype = "int64"}):reshape(shape)
end

local function check(f, ins, dtype, opts)
  opts = opts or {}
  opts.tol = opts.tol or TOL[dtype]
  D.check(f, ins, opts)
end

describe("cuda gather", function()
  for _, dt in ipairs(DTYPES) do
    gpu_it(dt .. ": every dim of a 3-D input, repeats, index smaller than the input", function()
      local shape = {4, 5, 6}
      for d = 1, 3 do
        local ishape = {3, 4, 5}
        ishape[d] = 7                        -- longer than the input along d: repeats
        local idx = index(ishape, shape[d], d)
        check(function(a) return a:gather(d, idx) end, {input(shape, dt, d)}, dt)
        check(function(a) return keel.gather(a, d - 4, idx) end, {input(shape, dt, d)}, dt)
      end
    end)

    gpu_it(dt .. ": sizes past one block, non-contiguous input", function()
      local idx = index({300, 2}, 7, 2)
      check(function(a) return a:gather(2, idx) end, {input({300, 7}, dt, 1)}, dt)
      local idx2 = index({1, 300}, 7, 3)
      check(function(a) return a:t():gather(1, idx2) end, {input({300, 7}, dt, 1)}, dt)
      local idx3 = index({5, 4, 3}, 6, 4)
      check(function(a) return a:permute(3, 1, 2):gather(3, idx3) end, {input({4, 6, 5}, dt, 1)}, dt)
      check(function(a) return a:expand({5, 9, 6}):gather(2, idx3:narrow(2, 1, 4)) end, {input({1, 9, 1}, dt, 1)}, dt)
      -- past the simulator's 32-bit index limit (4096): the 64-bit take, and scatter_add behind it
      local idx3 = index({1200, 5}, 7, 8)
      check(function(a) return a:gather(2, idx3) end, {input({1200, 7}, dt, 1)}, dt)
      check(function(a) return a:t():gather(1, idx3:t()) end, {input({1200, 7}, dt, 1)}, dt)
    end)

    gpu_it(dt .. ": empty index, NaN and Inf", function()
      check(function(a) return a:gather(1, index({0, 3}, 4)) end, {input({4, 3}, dt, 1)}, dt)
      local a = keel.tensor({{0 / 0, 1, math.huge}, {2, -math.huge, 3}}, {dtype = dt})
      check(function(x) return x:gather(2, index({2, 5}, 3)) end, {a}, dt, {backward = false})
    end)
  end

  gpu_it("int64 data", function()
    local a = keel.tensor({{1, 2, 3}, {4, 5, 6}, {7, 8, 2 ^ 40}}, {dtype = "int64"})
    check(function(x) return x:gather(1, index({5, 3}, 3)) end, {a}, "int64", {backward = false})
    check(function(x) return x:t():gather(2, index({3, 4}, 3)) end, {a}, "int64", {backward = false})
  end)
end)

describe("cuda scatter_add", function()
  for _, dt in ipairs(DTYPES) do
    gpu_it(dt .. ": every dim of a 3-D input, repeats, source larger than the index", function()
      local shape = {4, 5, 6}
      for d = 1, 3 do
        local ishape = {3, 4, 5}
        ishape[d] = 9
        local sshape = {4, 5, 6}
        sshape[d] = 10
        local idx = index(ishape, shape[d], d)
        check(function(a, s) return a:scatter_add(d, idx, s) end, {input(shape, dt, d), input(sshape, dt, 9)}, dt)
      end
    end)

    gpu_it(dt .. ": many repeats into few slots (atomic sums), past one block", function()
      local idx = index({600, 3}, 2, 7)
      check(function(a, s) return a:scatter_add(1, idx, s) end, {input({2, 3}, dt, 1), input({600, 3}, dt, 2)}, dt,
            {tol = dt == "float32" and {atol = 1e-4, rtol = 1e-5} or nil})
    end)

    gpu_it(dt .. ": non-contiguous base and source, broadcast source", function()
      local idx = index({3, 4}, 5, 2)
      check(function(a, s) return a:t():scatter_add(2, idx, s:t()) end, {input({5, 3}, dt, 1), input({4, 3}, dt, 2)},
            dt)
      check(function(a, s) return a:scatter_add(2, idx, s:expand({3, 4})) end, {input({3, 5}, dt, 1),
            input({1, 4}, dt, 2)}, dt)
    end)

    gpu_it(dt .. ": empty index, NaN and Inf", function()
      check(function(a, s) return a:scatter_add(1, index({0, 3}, 4), s) end, {input({4, 3}, dt, 1),
            input({2, 3}, dt, 2)}, dt)   -- nothing added: a copy of a; s gets zeros
      local s = keel.tensor({{0 / 0, 1}, {math.huge, 2}}, {dtype = dt})
      check(function(a, x) return a:scatter_add(2, index({2, 2}, 3), x) end, {input({2, 3}, dt, 1), s}, dt,
            {backward = false})
    end)
  end

  gpu_it("int64 data (exact sums)", function()
    local a = keel.tensor({{1, 2, 3}, {4, 5, 6}}, {dtype = "int64"})
    local s = keel.tensor({{10, 20, 30}, {-40, 50, 2 ^ 40}, {7, 8, 9}}, {dtype = "int64"})
    check(function(x, y) return x:scatter_add(1, index({3, 3}, 2), y) end, {a, s}, "int64", {backward = false})
  end)
end)

describe("cuda index_select", function()
  for _, dt in ipairs(DTYPES) do
    gpu_it(dt .. ": every dim of a 3-D input with repeats (dense rows, vector and scalar widths)", function()
      for _, shape in ipairs({{4, 5, 6}, {3, 7, 8}, {5, 3, 1}}) do
        for d = 1, 3 do
          local idx = index({7}, shape[d], d)
          check(function(a) return a:index_select(d, idx) end, {input(shape, dt, d)}, dt)
        end
      end
    end)

    gpu_it(dt .. ": non-contiguous and offset inputs, a Lua table index, past one block", function()
      local idx = index({9}, 6, 1)
      check(function(a) return a:t():index_select(1, idx) end, {input({8, 6}, dt, 1)}, dt)
      check(function(a) return a:narrow(2, 2, 8):index_select(1, idx) end, {input({6, 9}, dt, 1)}, dt)
      check(function(a) return a:permute(2, 3, 1):index_select(3, idx) end, {input({6, 3, 5}, dt, 1)}, dt)
      check(function(a) return a:index_select(2, {3, 1, 3}) end, {input({4, 5}, dt, 1)}, dt)
      check(function(a) return a:index_select(1, index({500}, 300, 3)) end, {input({300, 4}, dt, 1)}, dt)
      check(function(a) return a:index_select(2, index({500}, 300, 3)) end, {input({3, 300}, dt, 1)}, dt)
    end)

    gpu_it(dt .. ": outputs past the simulator's 32-bit index limit (4096)", function()
      -- dense rows, vector and scalar widths, and the strided take
      check(function(a) return a:index_select(1, index({700}, 50, 4)) end, {input({50, 8}, dt, 1)}, dt)
      check(function(a) return a:index_select(2, index({900}, 40, 5)) end, {input({7, 40}, dt, 1)}, dt)
      check(function(a) return a:t():index_select(1, index({1100}, 60, 6)) end, {input({5, 60}, dt, 1)}, dt)
    end)

    gpu_it(dt .. ": empty index, 0-d index, NaN", function()
      check(function(a) return a:index_select(1, index({0}, 4)) end, {input({4, 3}, dt, 1)}, dt)
      local i0 = keel.tensor(2, {dtype = "int64"})
      check(function(a) return a:index_select(2, i0) end, {input({4, 3}, dt, 1)}, dt)
      local a = keel.tensor({{0 / 0, 1}, {math.huge, -math.huge}}, {dtype = dt})
      check(function(x) return x:index_select(1, {2, 1, 2}) end, {a}, dt, {backward = false})
    end)
  end

  gpu_it("int64 data", function()
    local a = keel.tensor({{1, 2, 3, 4}, {5, 6, 7, 2 ^ 40}}, {dtype = "int64"})
    check(function(x) return x:index_select(2, {4, 4, 1}) end, {a}, "int64", {backward = false})
    check(function(x) return x:index_select(1, {2, 1, 2}) end, {a}, "int64", {backward = false})
    check(function(x) return x:t():index_select(1, {2}) end, {a}, "int64", {backward = false})
  end)
end)

describe("cuda embedding", function()
  for _, dt in ipairs(DTYPES) do
    gpu_it(dt .. ": forward and weight gradient, repeats, with and without padding", function()
      for _, c in ipairs({{10, 7}, {10, 8}, {300, 5}, {50, 64}}) do
        local V, Dm = c[1], c[2]
        local idx = index({4, 9}, V, V)
        check(function(w) return F.embedding(idx, w) end, {input({V, Dm}, dt, 1)}, dt)
        check(function(w) return F.embedding(idx, w, 3) end, {input({V, Dm}, dt, 1)}, dt)
        check(function(w) return F.embedding(idx, w, -1) end, {input({V, Dm}, dt, 1)}, dt)
      end
      -- past the simulator's 32-bit index limit (4096 elements), forward and backward
      local wide = index({600}, 40, 7)
      check(function(w) return F.embedding(wide, w, 5) end, {input({40, 9}, dt, 1)}, dt,
            {grad_tol = dt == "float32" and {atol = 1e-4, rtol = 1e-5} or nil})
      local big = index({700}, 3, 2)          -- few rows, many repeats
      check(function(w) return F.embedding(big, w, 2) end, {input({3, 33}, dt, 1)}, dt,
            {grad_tol = dt == "float32" and {atol = 1e-4, rtol = 1e-5} or nil})
    end)

    gpu_it(dt .. ": empty indices, NaN rows", function()
      check(function(w) return F.embedding(index({0}, 4), w) end, {input({4, 3}, dt, 1)}, dt)
      check(function(w) return F.embedding(index({2, 0}, 4), w) end, {input({4, 3}, dt, 1)}, dt)
      local w = keel.tensor({{0 / 0, 1}, {math.huge, 2}, {3, 4}}, {dtype = dt})
      check(function(x) return F.embedding({3, 1, 2, 1}, x) end, {w}, dt, {backward = false})
    end)

    gpu_it(dt .. ": nn.Embedding with padding_idx moved to cuda", function()
      keel.manual_seed(5)
      local m = nn.Embedding(40, 12, {padding_idx = 4, dtype = dt})
      local md = nn.Embedding(40, 12, {padding_idx = 4, dtype = dt})
      md:load_state_dict(m:state_dict())
      md:to("cuda")
      local idx = index({6, 5}, 40, 8)
      idx = keel.cat({idx, keel.full({6, 1}, 4, {dtype = "int64"})}, 2)   -- the pad row too
      local y, yd = m:forward(idx), md:forward(idx)
      D.same_device(yd, "cuda")
      H.assert_close(yd:cpu(), y:totable(), TOL[dt], "output")
      local g = input({6, 6, 12}, dt, 3, false)
      y:backward(g)
      yd:backward(g:to("cuda"))
      D.same_device(md.weight.grad, "cuda")
      H.assert_close(md.weight.grad:cpu(), m.weight.grad:totable(), TOL[dt], "weight grad")
      H.assert_all(md.weight.grad:cpu():select(1, 4), 0, 0, "pad row")
    end)
  end
end)
