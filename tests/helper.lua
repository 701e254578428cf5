--
-- tests/helper.lua: shared test support for the busted specs.
--
-- local H = require "helper"
--   H.keel                      the module under test
--   H.assert_close(a, e, tol)   tensor / number / nested table vs expected
--   H.gradcheck(f, inputs, o)   full vector-Jacobian check against float64
--                               central differences
--   H.rng(seed), H.values(...)  deterministic numbers independent of keel's RNG
--   H.t64(shape, ...)           a float64 leaf that requires grad
--   H.flat, H.nest, H.shape_of  nested-table utilities
--   H.ref_*                     naive Lua reference implementations
--
local keel = require "keel"
local luassert = require "luassert"

local H = { keel = keel }

-- Default tolerances by dtype: {atol, rtol}.
H.tol = {
  float32 = { atol = 1e-5, rtol = 1e-5 },
  float64 = { atol = 1e-12, rtol = 1e-12 },
  int64   = { atol = 0, rtol = 0 },
  number  = { atol = 1e-12, rtol = 1e-12 },
}

-- Gradient check defaults (float64 central differences).
H.grad_eps = 1e-6
H.grad_atol = 1e-6
H.grad_rtol = 1e-5

-- A test failure; the message starts with the spec line that called into
-- this helper (not helper.lua itself).
local function fail(msg)
  local where = ""
  for level = 2, 30 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.currentline > 0 and not info.short_src:find("helper%.lua$") then
      where = info.short_src .. ":" .. info.currentline .. ": "
      break
    end
  end
  luassert.is_true(false, where .. msg)
end
H.fail = fail

function H.is_tensor(x) return type(x) == "userdata" end

-- {======================================================================
-- Nested tables
-- =======================================================================

-- Shape of a nested table of numbers ({} for a number).
function H.shape_of(t)
  local shape = {}
  while type(t) == "table" do
    shape[#shape + 1] = #t
    t = t[1]
  end
  return shape
end

-- Flattens a tensor, a nested table or a number into a list, row-major.
function H.flat(x)
  if H.is_tensor(x) then x = x:totable() end
  local out = {}
  local function walk(v)
    if type(v) == "table" then
      for i = 1, #v do walk(v[i]) end
    else
      out[#out + 1] = v
    end
  end
  walk(x)
  return out
end

function H.numel(shape)
  local n = 1
  for i = 1, #shape do n = n * shape[i] end
  return n
end

-- Builds a nested table of the given shape from a flat list. A 0-d shape
-- gives the number itself.
function H.nest(flat, shape)
  if #shape == 0 then return flat[1] end
  local pos = 0
  local function build(d)
    local t = {}
    for i = 1, shape[d] do
      if d == #shape then
        pos = pos + 1
        t[i] = flat[pos]
      else
        t[i] = build(d + 1)
      end
    end
    return t
  end
  return build(1)
end

-- 1-based multi-index of the k-th (1-based) element in row-major order.
function H.unravel(k, shape)
  local idx = {}
  k = k - 1
  for d = #shape, 1, -1 do
    idx[d] = k % shape[d] + 1
    k = k // shape[d]
  end
  return idx
end

-- Row-major (1-based) position of a 1-based multi-index.
function H.ravel(idx, shape)
  local k = 0
  for d = 1, #shape do k = k * shape[d] + (idx[d] - 1) end
  return k + 1
end

function H.same_shape(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

function H.shape_str(s)
  local parts = {}
  for i = 1, #s do parts[i] = tostring(s[i]) end
  return "[" .. table.concat(parts, ",") .. "]"
end

-- }======================================================================

-- {======================================================================
-- Deterministic numbers (a 64-bit LCG; Lua 5.4 integers wrap)
-- =======================================================================

function H.rng(seed)
  local s = (seed or 1) * 2654435761 + 12345
  return function()
    s = s * 6364136223846793005 + 1442695040888963407
    return ((s >> 11) & 0x1FFFFFFFFFFFFF) / 9007199254740992.0
  end
end

-- n numbers uniform in [lo, hi); with opts.away = d, |v| >= d for each.
function H.values(n, lo, hi, seed, away)
  local r = H.rng(seed or 7)
  local out = {}
  local i = 0
  while i < n do
    local v = lo + (hi - lo) * r()
    if not away or math.abs(v) >= away then
      i = i + 1
      out[i] = v
    end
  end
  return out
end

-- A tensor of the given shape with deterministic values in [lo, hi).
-- opts: dtype (default float64), requires_grad (default true), away.
function H.t64(shape, lo, hi, seed, opts)
  opts = opts or {}
  local vals = H.values(H.numel(shape), lo or -1, hi or 1, seed, opts.away)
  local rg = opts.requires_grad
  if rg == nil then rg = true end
  return keel.tensor(H.nest(vals, shape), { dtype = opts.dtype or "float64", requires_grad = rg })
end

-- }======================================================================

-- {======================================================================
-- Comparisons
-- =======================================================================

local function resolve_tol(tol, dtype)
  local base = H.tol[dtype] or H.tol.number
  if tol == nil then return base.atol, base.rtol end
  if type(tol) == "number" then return tol, tol end
  return tol.atol or base.atol, tol.rtol or base.rtol
end

local function close(a, e, atol, rtol)
  if a == e then return true end  -- infinities, exact
  if a ~= a and e ~= e then return true end  -- both NaN
  if type(a) ~= "number" or type(e) ~= "number" then return false end
  return math.abs(a - e) <= atol + rtol * math.abs(e)
end
H.close = close

-- actual: tensor, number or nested table. expected: number or nested table.
-- tol: number (atol = rtol = tol) or {atol=, rtol=}; default by dtype.
function H.assert_close(actual, expected, tol, msg)
  local dtype = "number"
  local ashape
  if H.is_tensor(actual) then
    dtype = actual.dtype
    ashape = actual.shape
    actual = actual:totable()
  else
    ashape = H.shape_of(actual)
  end
  local eshape = H.shape_of(expected)
  local prefix = msg and (msg .. ": ") or ""
  if not H.same_shape(ashape, eshape) then
    fail(("%sshape %s, expected %s"):format(prefix, H.shape_str(ashape), H.shape_str(eshape)))
  end
  local atol, rtol = resolve_tol(tol, dtype)
  local fa, fe = H.flat(actual), H.flat(expected)
  if #fa ~= #fe then
    fail(("%s%d values, expected %d"):format(prefix, #fa, #fe))
  end
  for i = 1, #fe do
    if not close(fa[i], fe[i], atol, rtol) then
      local idx = H.unravel(i, eshape)
      fail(("%selement %s: got %.17g, expected %.17g (atol %g, rtol %g)"):format(
        prefix, H.shape_str(idx), fa[i], fe[i], atol, rtol))
    end
  end
  return true
end

-- Every element of tensor t equals v (within tol).
function H.assert_all(t, v, tol, msg)
  local atol, rtol = resolve_tol(tol, t.dtype)
  for i, x in ipairs(H.flat(t)) do
    if not close(x, v, atol, rtol) then
      fail(("%selement %d is %.17g, expected %.17g"):format(msg and (msg .. ": ") or "", i, x, v))
    end
  end
  return true
end

function H.assert_shape(t, shape, msg)
  local s = t.shape
  if not H.same_shape(s, shape) then
    fail(("%sshape %s, expected %s"):format(msg and (msg .. ": ") or "", H.shape_str(s),
                                            H.shape_str(shape)))
  end
  return true
end

-- pcall(fn, ...) must fail; every pattern (plain text) must occur in the
-- message. Returns the message.
function H.assert_error(fn, ...)
  local ok, err = pcall(fn)
  if ok then fail("expected an error, the call succeeded") end
  err = tostring(err)
  for _, p in ipairs({ ... }) do
    if not err:find(p, 1, true) then
      fail(("error message %q does not contain %q"):format(err, p))
    end
  end
  return err
end

-- Same, with Lua patterns instead of plain text.
function H.assert_error_match(fn, ...)
  local ok, err = pcall(fn)
  if ok then fail("expected an error, the call succeeded") end
  err = tostring(err)
  for _, p in ipairs({ ... }) do
    if not err:find(p) then
      fail(("error message %q does not match %q"):format(err, p))
    end
  end
  return err
end

-- }======================================================================

-- {======================================================================
-- Gradient check
-- =======================================================================

-- Evaluates f with recording off and returns its output, flattened.
local function eval_flat(f, inputs)
  return keel.no_grad(function()
    local out = f(table.unpack(inputs, 1, inputs.n or #inputs))
    return H.flat(out)
  end)
end

local function dot(a, b)
  local s = 0
  for i = 1, #a do s = s + a[i] * b[i] end
  return s
end

--
-- gradcheck(f, inputs, opts): f maps the input tensors to one tensor.
-- Every input is a float64 leaf with requires_grad. With a fixed random R
-- of f's output shape, the gradient of sum(f(inputs) * R) from backward is
-- compared to central differences on every element of every input:
--   |analytic - numeric| <= atol + rtol * |numeric|
-- opts: eps, atol, rtol, seed (of R), name (for messages), no_grad_ok =
-- {i=true} for inputs f does not depend on (their grad may be nil).
-- Raises a test failure naming the input, the element and both values.
--
function H.gradcheck(f, inputs, opts)
  opts = opts or {}
  local eps = opts.eps or H.grad_eps
  local atol = opts.atol or H.grad_atol
  local rtol = opts.rtol or H.grad_rtol
  local name = opts.name and (opts.name .. ": ") or ""
  for i, x in ipairs(inputs) do
    if not H.is_tensor(x) then fail(("%sinput %d is not a tensor"):format(name, i)) end
    if not x.requires_grad then fail(("%sinput %d does not require grad"):format(name, i)) end
    if not x.is_leaf then fail(("%sinput %d is not a leaf"):format(name, i)) end
    x.grad = nil
  end

  local out = f(table.unpack(inputs))
  if not H.is_tensor(out) then fail(name .. "f did not return a tensor") end
  if not out.requires_grad then fail(name .. "output does not require grad") end
  local oshape = out.shape
  local rnd = H.rng(opts.seed or 4242)
  local r = {}
  for i = 1, H.numel(oshape) do
    -- magnitudes in [0.5, 1.5) with random signs: no element is ignored
    local v = 0.5 + rnd()
    if rnd() < 0.5 then v = -v end
    r[i] = v
  end
  -- on the output's device, which may not be the default one (to("cpu"))
  local R = keel.tensor(H.nest(r, oshape), { dtype = out.dtype, device = out.device })
  local loss = (out * R):sum()
  loss:backward()

  for i, x in ipairs(inputs) do
    local shape = x.shape
    local n = H.numel(shape)
    local g = x.grad
    local ga
    if g == nil then
      if not (opts.no_grad_ok and opts.no_grad_ok[i]) then
        fail(("%sinput %d has no .grad after backward"):format(name, i))
      end
      ga = {}
      for k = 1, n do ga[k] = 0 end
    else
      if not H.same_shape(g.shape, shape) then
        fail(("%sgrad of input %d has shape %s, input has %s"):format(name, i,
             H.shape_str(g.shape), H.shape_str(shape)))
      end
      if g.dtype ~= x.dtype then
        fail(("%sgrad of input %d has dtype %s, input has %s"):format(name, i, g.dtype, x.dtype))
      end
      ga = H.flat(g)
    end
    for k = 1, n do
      local idx = H.unravel(k, shape)
      local orig = x:get(table.unpack(idx))
      local fp, fm
      keel.no_grad(function()
        idx[#shape + 1] = orig + eps
        x:set(table.unpack(idx))
      end)
      fp = dot(eval_flat(f, inputs), r)
      keel.no_grad(function()
        idx[#shape + 1] = orig - eps
        x:set(table.unpack(idx))
      end)
      fm = dot(eval_flat(f, inputs), r)
      keel.no_grad(function()
        idx[#shape + 1] = orig
        x:set(table.unpack(idx))
      end)
      idx[#shape + 1] = nil
      local num = (fp - fm) / (2 * eps)
      if not (math.abs(ga[k] - num) <= atol + rtol * math.abs(num)) then
        fail(("%sinput %d element %s: analytic %.12g, numeric %.12g (diff %.3g)"):format(
          name, i, H.shape_str(idx), ga[k], num, math.abs(ga[k] - num)))
      end
    end
  end
  for _, x in ipairs(inputs) do x.grad = nil end
  return true
end

-- }======================================================================

-- {======================================================================
-- Naive references
-- =======================================================================

-- NumPy broadcast of two shapes; nil when incompatible.
function H.broadcast_shape(sa, sb)
  local n = math.max(#sa, #sb)
  local out = {}
  for i = 1, n do
    local x = sa[i - (n - #sa)] or 1
    local y = sb[i - (n - #sb)] or 1
    if i <= n - #sa then x = 1 end
    if i <= n - #sb then y = 1 end
    if x ~= y and x ~= 1 and y ~= 1 then return nil end
    out[i] = x == 1 and y or x
  end
  return out
end

-- Element of flat data with shape `shape`, read at an index of the
-- broadcast shape `oshape`.
local function bread(flat, shape, idx, oshape)
  local lead = #oshape - #shape
  local k = 0
  for d = 1, #shape do
    local i = idx[d + lead]
    if shape[d] == 1 then i = 1 end
    k = k * shape[d] + (i - 1)
  end
  return flat[k + 1]
end
H.bread = bread

-- fn applied elementwise with broadcasting; a, b are tensors, nested
-- tables or numbers. Returns the nested result and its shape.
function H.ref_binary(a, b, fn)
  local sa = H.is_tensor(a) and a.shape or H.shape_of(a)
  local sb = H.is_tensor(b) and b.shape or H.shape_of(b)
  local fa, fb = H.flat(a), H.flat(b)
  local so = assert(H.broadcast_shape(sa, sb), "ref_binary: shapes do not broadcast")
  local out = {}
  for k = 1, H.numel(so) do
    local idx = H.unravel(k, so)
    out[k] = fn(bread(fa, sa, idx, so), bread(fb, sb, idx, so))
  end
  return H.nest(out, so), so
end

function H.ref_unary(a, fn)
  local fa = H.flat(a)
  local out = {}
  for k = 1, #fa do out[k] = fn(fa[k]) end
  local s = H.is_tensor(a) and a.shape or H.shape_of(a)
  return H.nest(out, s), s
end

-- torch.matmul semantics on tensors a, b (read with totable).
function H.ref_matmul(a, b)
  local sa, sb = a.shape, b.shape
  local fa, fb = H.flat(a), H.flat(b)
  local a1, b1 = #sa == 1, #sb == 1
  if a1 then sa = { 1, sa[1] } end
  if b1 then sb = { sb[1], 1 } end
  local n, k, m = sa[#sa - 1], sa[#sa], sb[#sb]
  assert(k == sb[#sb - 1], "ref_matmul: inner sizes differ")
  local ba, bb = {}, {}
  for i = 1, #sa - 2 do ba[i] = sa[i] end
  for i = 1, #sb - 2 do bb[i] = sb[i] end
  local bo = assert(H.broadcast_shape(ba, bb), "ref_matmul: batch shapes do not broadcast")
  local out = {}
  local nb = H.numel(bo)
  for bi = 1, nb do
    local bidx = H.unravel(bi, bo)
    for i = 1, n do
      for j = 1, m do
        local s = 0
        for p = 1, k do
          local ia, ib = {}, {}
          for d = 1, #bidx do ia[d] = bidx[d]; ib[d] = bidx[d] end
          ia[#bidx + 1], ia[#bidx + 2] = i, p
          ib[#bidx + 1], ib[#bidx + 2] = p, j
          local sao = {}
          for d = 1, #bo do sao[d] = bo[d] end
          sao[#bo + 1], sao[#bo + 2] = n, k
          local sbo = {}
          for d = 1, #bo do sbo[d] = bo[d] end
          sbo[#bo + 1], sbo[#bo + 2] = k, m
          s = s + bread(fa, sa, ia, sao) * bread(fb, sb, ib, sbo)
        end
        out[#out + 1] = s
      end
    end
  end
  local so = {}
  for d = 1, #bo do so[d] = bo[d] end
  if not a1 then so[#so + 1] = n end
  if not b1 then so[#so + 1] = m end
  return H.nest(out, so), so
end

-- Reduction of tensor/nested a over dims (1-based list, negatives allowed;
-- nil = all) with fn(list of values) -> number.
function H.ref_reduce(a, dims, fn, keepdim)
  local s = H.is_tensor(a) and a.shape or H.shape_of(a)
  local fa = H.flat(a)
  local red = {}
  if dims == nil then
    for d = 1, #s do red[d] = true end
  else
    if type(dims) == "number" then dims = { dims } end
    for _, d in ipairs(dims) do
      if d < 0 then d = d + #s + 1 end
      red[d] = true
    end
  end
  local kshape = {}
  for d = 1, #s do kshape[d] = red[d] and 1 or s[d] end
  local groups = {}
  for k = 1, #fa do
    local idx = H.unravel(k, s)
    for d = 1, #s do if red[d] then idx[d] = 1 end end
    local g = H.ravel(idx, kshape)
    groups[g] = groups[g] or {}
    table.insert(groups[g], fa[k])
  end
  local out = {}
  for g = 1, H.numel(kshape) do out[g] = fn(groups[g]) end
  local oshape = {}
  if keepdim then
    oshape = kshape
  else
    for d = 1, #s do if not red[d] then oshape[#oshape + 1] = s[d] end end
  end
  return H.nest(out, oshape), oshape
end

H.red = {
  sum = function(v) local s = 0 for _, x in ipairs(v) do s = s + x end return s end,
  prod = function(v) local s = 1 for _, x in ipairs(v) do s = s * x end return s end,
  max = function(v) local s = -math.huge for _, x in ipairs(v) do if x > s then s = x end end return s end,
  min = function(v) local s = math.huge for _, x in ipairs(v) do if x < s then s = x end end return s end,
}
H.red.mean = function(v) return H.red.sum(v) / #v end
function H.red.var(correction)
  return function(v)
    local m = H.red.mean(v)
    local s = 0
    for _, x in ipairs(v) do s = s + (x - m) ^ 2 end
    return s / (#v - correction)
  end
end
function H.red.std(correction)
  local var = H.red.var(correction)
  return function(v) return math.sqrt(var(v)) end
end
function H.red.norm(p)
  return function(v)
    if p == math.huge then
      local s = 0
      for _, x in ipairs(v) do if math.abs(x) > s then s = math.abs(x) end end
      return s
    end
    local s = 0
    for _, x in ipairs(v) do s = s + math.abs(x) ^ p end
    return s ^ (1 / p)
  end
end
-- 1-based position of the max / min in a list (first on ties).
H.red.argmax = function(v)
  local b = 1
  for i = 2, #v do if v[i] > v[b] then b = i end end
  return b
end
H.red.argmin = function(v)
  local b = 1
  for i = 2, #v do if v[i] < v[b] then b = i end end
  return b
end

-- }======================================================================

-- Memory in use by keel (bytes held by live storages).
function H.live_bytes() return keel.memory_stats().live_bytes end

-- Resident set size of this process in bytes (Linux).
function H.rss_bytes()
  local f = io.open("/proc/self/statm", "r")
  if not f then return nil end
  local line = f:read("l")
  f:close()
  local _, resident = line:match("^(%d+)%s+(%d+)")
  return tonumber(resident) * 4096
end

-- {======================================================================
-- GPU tests. H.gpu() is true when CUDA tensors can be made (asked on first
-- call: opening the plugin costs a moment), with the reason when not.
-- H.gpu_it(it, pending) makes a function (name, fn) that is `it` on a GPU
-- and a visible skip elsewhere: a pending test whose name ends in
-- H.GPU_MARK, which tools/test.sh counts. (busted's it and pending live in
-- the spec's environment, so the spec hands them over.)
-- =======================================================================

local gpu_state
function H.gpu()
  if gpu_state == nil then
    local ok, why = keel.cuda.is_available()
    gpu_state = {ok = ok, why = why}
  end
  return gpu_state.ok, gpu_state.why
end

-- A tensor of the given shape and dtype from a flat list of values
-- (0-dimensional and empty shapes included).
function H.tensor_of(vals, shape, dtype)
  if H.numel(shape) == 0 then return keel.zeros(shape, {dtype = dtype}) end
  if #shape == 0 then return keel.tensor(vals[1], {dtype = dtype}) end
  return keel.tensor(vals, {dtype = dtype}):reshape(shape)
end

-- What a Lua chunk (source text) writes to stdout when the keel executable
-- ($KEEL_BIN) runs it, once per environment prefix of envs (e.g.
-- "OPENBLAS_NUM_THREADS=1 "): a list of outputs in that order, or nil when
-- KEEL_BIN is not set (tools/test.sh sets it; the caller then pends).
-- With merge_stderr, each output is stdout and stderr together.
function H.run_keel(source, envs, merge_stderr)
  local bin = os.getenv("KEEL_BIN")
  if not bin then return nil end
  local script = os.tmpname()
  local f = assert(io.open(script, "w"))
  f:write(source)
  f:close()
  local outs = {}
  for i, env in ipairs(envs) do
    local h = io.popen(("%s%q %q%s"):format(env, bin, script, merge_stderr and " 2>&1" or ""))
    outs[i] = h:read("a")
    h:close()
  end
  os.remove(script)
  return outs
end

-- Whether CUDA is the simulator plugin here and KEEL_BIN can run child
-- processes on it: the specs that read the simulator's counters need both.
function H.on_sim()
  return (os.getenv("KEEL_CUDA_PLUGIN") or ""):find("sim", 1, true) ~= nil and os.getenv("KEEL_BIN") ~= nil
end

-- The CUDA simulator's counters over a keel run of script with the given
-- arguments (shell words) and environment settings (a prefix such as
-- "KEEL_CUDA_SIM_SMS=4"; KEEL_CUDA_SIM_STATS=1 prints the counters at
-- exit): kernel launches and host waits. Needs KEEL_BIN and the simulator.
function H.sim_run(script, args, env)
  local cmd = ("KEEL_CUDA_SIM_STATS=1 %s %q %q %s 2>&1"):format(env or "",
    assert(os.getenv("KEEL_BIN"), "KEEL_BIN is not set"), script, table.concat(args, " "))
  local f = assert(io.popen(cmd))
  local out = f:read("a")
  f:close()
  local l, w = out:match("kcsim: (%d+) launches, %d+ blocks, %d+ threads, (%d+) waits")
  assert(l, "no simulator counts in: " .. out)
  return tonumber(l), tonumber(w)
end

-- H.sim_run of tests/optim_launch_count.lua (its arguments: parameters,
-- steps [, nonfinite policy]).
function H.sim_counts(...)
  return H.sim_run("tests/optim_launch_count.lua", {...})
end

-- The CPU as the default device for the rest of this spec file, whatever
-- KEEL_DEVICE says; the previous default comes back after the file. The
-- CUDA specs call it first: they compare CUDA results with CPU references
-- made by the default-device creators and modules, and move the CUDA side
-- there explicitly, so they test the same thing in the KEEL_DEVICE=cuda
-- run as in the normal one (that run's subject is the other specs, on
-- CUDA tensors). teardown is busted's, handed over as for H.gpu_it.
function H.cpu_default(teardown)
  local prev = keel.set_default_device("cpu")
  teardown(function() keel.set_default_device(prev) end)
end

H.GPU_MARK = " [gpu]"

function H.gpu_it(it, pending)
  return function(name, fn)
    if H.gpu() then it(name, fn) else pending(name .. H.GPU_MARK) end
  end
end

-- }======================================================================

return H
