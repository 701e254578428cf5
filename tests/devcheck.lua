--
-- tests/devcheck.lua: CPU and CUDA agreement, the check behind every
-- tests/cuda_*_spec.lua. One function runs an op on CPU inputs and on
-- copies of them on the CUDA device, compares what comes out, then runs
-- backward on both with the same upstream gradient and compares the
-- inputs' gradients.
--
--   local D = require "devcheck"
--   D.check(f, inputs [, opts])
--     f(x1, x2, ...) -> a tensor, or a list of tensors
--     inputs: CPU tensors; those with requires_grad get compared gradients
--     opts.tol: {atol=, rtol=} or a number (default: by dtype, D.tol)
--     opts.grad_tol: the same for gradients (default: opts.tol)
--     opts.backward = false: compare forward only
--     opts.seed: of the upstream gradient (default 1)
--     Empty results and gradients are compared too (shapes, then values).
--   D.same_device(t, "cuda") asserts where a result lives.
--   D.input(shape [, dtype] [, opts]) makes a random CPU input.
--
-- The CUDA side must stay on the device: a result that came back on the
-- CPU is an error (an op that silently falls back is no CUDA kernel).
--
local H = require "helper"
local keel = H.keel

local D = {}

-- f32 kernels may sum in another order than the CPU; f64 ones barely.
D.tol = {
  float32 = {atol = 1e-5, rtol = 1e-4},
  float64 = {atol = 1e-12, rtol = 1e-10},
  int64 = {atol = 0, rtol = 0},
}

local function tol_of(t, given)
  if type(given) == "number" then return {atol = given, rtol = given} end
  return given or D.tol[t.dtype] or D.tol.float32
end

local function list(r)
  if H.is_tensor(r) then return {r} end
  return r
end

function D.same_device(t, dev)
  if t.device ~= dev then H.fail(("result on %s, expected %s"):format(t.device, dev)) end
end

-- A leaf copy of x on dev, with x's requires_grad.
local function leaf_on(x, dev)
  local y = x:detach():to(dev):contiguous()
  if y == x then y = x:clone():detach() end
  if x.requires_grad then y:requires_grad_(true) end
  return y
end

local function compare(cpu, dev, tol, what)
  H.assert_shape(dev, cpu.shape, what)
  if dev.dtype ~= cpu.dtype then
    H.fail(("%s: dtype %s on cuda, %s on cpu"):format(what, dev.dtype, cpu.dtype))
  end
  D.same_device(dev, "cuda")
  -- flattened: totable() of an empty tensor loses its shape (checked above)
  H.assert_close(dev:cpu():reshape{-1}, cpu:reshape{-1}:totable(), tol_of(cpu, tol), what)
end

-- Deterministic upstream gradient shaped like t (values in [-1, 1]).
local function upstream(t, seed)
  local n = t:numel()
  local vals = H.values(n, -1, 1, seed)
  local g = keel.tensor(vals, {dtype = t.dtype, device = "cpu"})
  if n == 0 then return keel.zeros(t.shape, {dtype = t.dtype, device = "cpu"}) end
  return g:reshape(t.shape)
end

function D.check(f, inputs, opts)
  opts = opts or {}
  local cpu_in, dev_in = {}, {}
  for i, x in ipairs(inputs) do
    -- a gradient left by an earlier check would add up on the CPU side only
    if H.is_tensor(x) and x.requires_grad and x.grad ~= nil then x.grad = nil end
    cpu_in[i] = x
    dev_in[i] = H.is_tensor(x) and leaf_on(x, "cuda") or x
  end
  local rc = list(f(table.unpack(cpu_in, 1, #inputs)))
  local rd = list(f(table.unpack(dev_in, 1, #inputs)))
  if #rc ~= #rd then H.fail(("%d results on cuda, %d on cpu"):format(#rd, #rc)) end
  for k = 1, #rc do compare(rc[k], rd[k], opts.tol, "result " .. k) end
  if opts.backward == false then return rc, rd end
  -- backward through every float result that carries a graph
  local any = false
  for k = 1, #rc do
    if rc[k].requires_grad and (rc[k].dtype == "float32" or rc[k].dtype == "float64") then
      local g = upstream(rc[k], (opts.seed or 1) + k)
      rc[k]:backward(g, {retain_graph = k < #rc})
      rd[k]:backward(g:to("cuda"), {retain_graph = k < #rc})
      any = true
    end
  end
  if not any then return rc, rd end
  for i, x in ipairs(cpu_in) do
    if H.is_tensor(x) and x.requires_grad then
      local gc, gd = x.grad, dev_in[i].grad
      if gc == nil then
        if gd ~= nil then H.fail(("input %d: a gradient on cuda, none on cpu"):format(i)) end
      else
        if gd == nil then H.fail(("input %d: no gradient on cuda"):format(i)) end
        compare(gc, gd, opts.grad_tol or opts.tol, "gradient of input " .. i)
      end
    end
  end
  return rc, rd
end

-- Random CPU input: shape, dtype (default float32), requires_grad, range.
-- D.input(shape, dtype, opts) is D.input(shape, opts) with opts.dtype = dtype.
function D.input(shape, opts, more)
  if type(opts) == "string" then
    local o = {dtype = opts}
    for k, v in pairs(more or {}) do if k ~= "dtype" then o[k] = v end end
    opts = o
  end
  opts = opts or {}
  local n = H.numel(shape)
  local t = keel.tensor(H.values(math.max(n, 1), opts.lo or -2, opts.hi or 2, opts.seed or 7),
                        {dtype = opts.dtype or "float32", device = "cpu"})
  t = n == 0 and keel.zeros(shape, {dtype = opts.dtype or "float32", device = "cpu"}) or t:reshape(shape)
  if opts.grad ~= false then t:requires_grad_(true) end
  return t
end

-- Batch norm in training (affine, running statistics updated) on an
-- input of shape and dtype dt, CPU against the device; seed picks the
-- values. Returns the inputs {x, weight, bias, running_mean, running_var}.
function D.check_batch_norm_train(shape, dt, seed)
  local F = require("keel").nn.functional
  local C = shape[2]
  local ins = {
    D.input(shape, dt, {seed = seed}),
    D.input({C}, dt, {lo = 0.5, hi = 1.5, seed = seed + 1}),
    D.input({C}, dt, {seed = seed + 2}),
    D.input({C}, dt, {grad = false, seed = seed + 3}),
    D.input({C}, dt, {grad = false, lo = 0.5, hi = 2, seed = seed + 4}),
  }
  D.check(function(a, ww, bb, m, v)
    local y = F.batch_norm(a, m, v, ww, bb, true, 0.1, 1e-5)
    return {y, m * 1, v * 1}
  end, ins)
  return ins
end

return D
