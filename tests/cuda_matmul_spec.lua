-- tests/cuda_matmul_spec.lua: the CUDA matmul (kernels/blas.cu, cuBLAS)
-- against the CPU backend, which is its specification. Every torch.matmul
-- form (1-D, 2-D, batched, broadcast batch dims), operands read in place
-- through transposes, permutes and narrows, operands that must be copied
-- first (neither inner stride 1, a broadcast inside a matrix), odd sizes
-- past one tile, empty products, NaN/Inf, float32 and float64 with input
-- gradients (backward multiplies by transposed views: more layouts), the
-- float32 matmul precisions, and nn.Linear. Without a GPU (or the
-- simulator plugin) every test is a visible skip.
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local nn = keel.nn
local F = nn.functional
local gpu_it = H.gpu_it(it, pending)

-- f32: cuBLAS and the CPU BLAS sum K products in different orders.
local TOL = {float32 = {atol = 1e-4, rtol = 1e-4}, float64 = {atol = 1e-11, rtol = 1e-10}}
local DTYPES = {"float32", "float64"}

local function input(shape, dtype, seed, grad)
  return D.input(shape, {dtype = dtype, seed = seed, lo = -1, hi = 1, grad = grad})
end

-- D.check of f over fresh inputs of the given shapes.
local function check(f, shapes, dtype, opts)
  local ins = {}
  for i, s in ipairs(shapes) do ins[i] = input(s, dtype, 10 + i) end
  opts = opts or {}
  opts.tol = opts.tol or TOL[dtype]
  D.check(f, ins, opts)
end

local mm = function(a, b) return a:matmul(b) end

describe("cuda matmul", function()
  for _, dt in ipairs(DTYPES) do
    describe(dt, function()
      gpu_it("2-D products of sizes 1, 17, 64 and 129 x 257 with gradients", function()
        for _, c in ipairs({{1, 1, 1}, {1, 17, 1}, {17, 17, 17}, {64, 64, 64}, {129, 33, 257}, {257, 65, 129},
                            {3, 300, 2}}) do
          local M, K, N = c[1], c[2], c[3]
          check(mm, {{M, K}, {K, N}}, dt)
        end
      end)

      gpu_it("1-D forms: dot, matrix-vector, vector-matrix, vector-batch", function()
        check(mm, {{17}, {17}}, dt)
        check(mm, {{129, 40}, {40}}, dt)
        check(mm, {{40}, {40, 129}}, dt)
        check(mm, {{5, 7, 9}, {9}}, dt)
        check(mm, {{9}, {5, 9, 7}}, dt)
        check(function(a, b) return keel.matmul(a, b) end, {{1}, {1, 1}}, dt)
      end)

      gpu_it("batched products, batch 1 and 5", function()
        check(mm, {{1, 17, 9}, {1, 9, 33}}, dt)
        check(mm, {{5, 17, 9}, {5, 9, 33}}, dt)
        check(mm, {{5, 1, 9}, {5, 9, 1}}, dt)
        check(mm, {{2, 3, 17, 9}, {2, 3, 9, 33}}, dt)
      end)

      gpu_it("broadcast batch dimensions (stride 0 on either side)", function()
        check(mm, {{5, 17, 9}, {9, 33}}, dt)      -- one B: a tall product
        check(mm, {{17, 9}, {5, 9, 33}}, dt)      -- one A for every batch
        check(mm, {{5, 1, 17, 9}, {3, 9, 33}}, dt)
        check(mm, {{2, 1, 7, 9}, {1, 3, 9, 4}}, dt)
        check(mm, {{1, 17, 9}, {5, 9, 33}}, dt)
      end)

      gpu_it("transposed operands read in place (t, transpose, permute)", function()
        check(function(a, b) return a:t():matmul(b) end, {{9, 17}, {9, 33}}, dt)
        check(function(a, b) return a:matmul(b:t()) end, {{17, 9}, {33, 9}}, dt)
        check(function(a, b) return a:t():matmul(b:t()) end, {{9, 129}, {65, 9}}, dt)
        check(function(a, b) return a:transpose(2, 3):matmul(b) end, {{5, 9, 17}, {5, 9, 33}}, dt)
        -- [M, 5, K] seen as [5, M, K]: batch stride K, row stride 5K
        check(function(a, b) return a:permute(2, 1, 3):matmul(b:permute(3, 1, 2)) end,
              {{17, 5, 9}, {9, 33, 5}}, dt)
        check(function(a, b) return a:t():matmul(b) end, {{9, 1}, {9, 1}}, dt)
      end)

      gpu_it("narrowed views (row stride over the row length)", function()
        check(function(a, b) return a:narrow(2, 3, 9):matmul(b:narrow(1, 2, 9):narrow(2, 5, 20)) end,
              {{17, 14}, {12, 30}}, dt)
        check(function(a, b) return a:narrow(3, 2, 9):matmul(b:narrow(2, 1, 9)) end, {{5, 17, 12}, {5, 11, 33}}, dt)
        check(function(a, b) return a:narrow(1, 2, 3):matmul(b) end, {{7, 17, 9}, {3, 9, 8}}, dt)
      end)

      gpu_it("operands that must be copied first: no inner stride 1, broadcast rows", function()
        -- select leaves inner strides 2K and 2: neither is 1
        check(function(a, b) return a:select(3, 2):matmul(b) end, {{17, 9, 2}, {9, 33}}, dt)
        check(function(a, b) return a:matmul(b:select(1, 1):t():t()) end, {{17, 9}, {2, 9, 33}}, dt)
        check(function(a, b) return a:matmul(b:select(3, 1)) end, {{5, 17, 9}, {5, 9, 33, 3}}, dt)
        -- a row broadcast down the matrix (row stride 0), and a column one
        check(function(a, b) return a:expand({17, 9}):matmul(b) end, {{1, 9}, {9, 33}}, dt)
        check(function(a, b) return a:matmul(b:expand({9, 33})) end, {{17, 9}, {9, 1}}, dt)
        check(function(a, b) return a:expand({5, 17, 9}):matmul(b:expand({5, 9, 33})) end, {{17, 1}, {1, 33}}, dt)
      end)

      gpu_it("empty products: zero rows, columns, batch; K = 0 gives zeros", function()
        for _, c in ipairs({{{0, 9}, {9, 33}}, {{17, 9}, {9, 0}}, {{0, 17, 9}, {0, 9, 3}}, {{17, 0}, {0, 33}},
                            {{5, 17, 0}, {5, 0, 3}}, {{0}, {0}}, {{0, 5}, {5}}}) do
          local ins = {input(c[1], dt, 1), input(c[2], dt, 2)}
          D.check(mm, ins, {tol = TOL[dt]})
        end
      end)

      gpu_it("NaN and Inf propagate as on the CPU", function()
        local a = keel.tensor({{1, 0 / 0, 2}, {1, 2, 3}, {math.huge, 1, 0}, {-math.huge, 1, 1}}, {dtype = dt})
        local b = keel.tensor({{1, 2}, {3, 4}, {5, math.huge}}, {dtype = dt})
        D.check(mm, {a, b}, {backward = false, tol = TOL[dt]})
      end)
    end)
  end

  gpu_it("float32 and float64 mixed: promoted to float64", function()
    local a, b = input({17, 9}, "float32", 1), input({9, 33}, "float64", 2)
    D.check(mm, {a, b}, {tol = TOL.float64})
  end)

  gpu_it("the cuda result is a fresh contiguous tensor on the device", function()
    local a, b = input({5, 17, 9}, "float32", 1, false), input({9, 33}, "float32", 2, false)
    local r = a:to("cuda"):matmul(b:to("cuda"))
    D.same_device(r, "cuda")
    assert.is_true(r:is_contiguous())
    H.assert_close(r:cpu(), a:matmul(b):totable(), TOL.float32)
  end)

  gpu_it("float32 matmul precisions (tf32, bfloat16, float16) follow the CPU's rounding", function()
    for _, p in ipairs({"tf32", "bfloat16", "float16"}) do
      local prev = keel.set_float32_matmul_precision(p)
      local ok, e = pcall(function()
        -- rounded operands, float32 sums: agree to the rounding of a few ulps of the format
        check(mm, {{33, 40}, {40, 17}}, "float32", {tol = {atol = 2e-2, rtol = 2e-2}})
      end)
      keel.set_float32_matmul_precision(prev)
      if not ok then error(e, 0) end
    end
  end)

  gpu_it("a reduced precision reaches cuBLAS (the simulator rounds operands as tensor cores do)", function()
    local a, b = input({33, 40}, "float32", 1, false):to("cuda"), input({40, 17}, "float32", 2, false):to("cuda")
    local full = a:matmul(b):cpu()
    local prev = keel.set_float32_matmul_precision("bfloat16")
    local ok, r = pcall(function() return a:matmul(b):cpu() end)
    keel.set_float32_matmul_precision(prev)
    if not ok then error(r, 0) end
    -- bfloat16 operands (7 mantissa bits) move 40-term sums by ~1e-2
    assert.is_true((r - full):abs():max():item() > 1e-4, "bfloat16 gave the float32 result")
  end)

  gpu_it("float64 ignores the float32 matmul precision", function()
    local prev = keel.set_float32_matmul_precision("bfloat16")
    local ok, e = pcall(function() check(mm, {{33, 40}, {40, 17}}, "float64") end)
    keel.set_float32_matmul_precision(prev)
    if not ok then error(e, 0) end
  end)
end)

describe("cuda nn.Linear", function()
  for _, dt in ipairs(DTYPES) do
    gpu_it(dt .. ": F.linear forward and backward (input, weight, bias)", function()
      check(function(x, w, b) return F.linear(x, w, b) end, {{33, 20}, {17, 20}, {17}}, dt)
      check(function(x, w) return F.linear(x, w) end, {{4, 7, 20}, {17, 20}}, dt)
      check(function(x, w, b) return F.linear(x, w, b) end, {{20}, {17, 20}, {17}}, dt)
    end)

    gpu_it(dt .. ": a Linear module moved to cuda: output and parameter gradients", function()
      keel.manual_seed(3)
      local m = nn.Linear(20, 17, {dtype = dt})
      local md = nn.Linear(20, 17, {dtype = dt})
      md:load_state_dict(m:state_dict())
      md:to("cuda")
      local x = input({9, 20}, dt, 4, false)
      local y, yd = m:forward(x), md:forward(x:to("cuda"))
      D.same_device(yd, "cuda")
      H.assert_close(yd:cpu(), y:totable(), TOL[dt], "output")
      local g = input({9, 17}, dt, 5, false)
      y:backward(g)
      yd:backward(g:to("cuda"))
      D.same_device(md.weight.grad, "cuda")
      H.assert_close(md.weight.grad:cpu(), m.weight.grad:totable(), TOL[dt], "weight grad")
      H.assert_close(md.bias.grad:cpu(), m.bias.grad:totable(), TOL[dt], "bias grad")
    end)
  end
end)
