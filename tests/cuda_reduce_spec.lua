--
-- tests/cuda_reduce_spec.lua: the CUDA reduce and norm kernels
-- (kernels/reduce.cu) against the CPU, through the Lua API: sum, mean,
-- prod, max/min with indices, amax/amin, argmax/argmin, var/std and
-- p-norms; forward and backward, float32 and float64 (int64 where the op
-- takes it); odd sizes larger than a block, every kernel path (rows,
-- columns, split reductions, several non-adjacent reduced dims, strided,
-- broadcast and empty operands), ties and NaN/Inf.
--
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local gpu_it = H.gpu_it(it, pending)

local FLOATS = {"float32", "float64"}

local function dstr(d)
  if type(d) == "table" then return "{" .. table.concat(d, ",") .. "}" end
  return tostring(d)
end

-- A float tensor of values from vals (numbers, or "nan", "inf", "-inf").
local function special(vals, dtype, shape)
  local v = {}
  for i, x in ipairs(vals) do
    v[i] = x == "nan" and 0 / 0 or x == "inf" and math.huge or x == "-inf" and -math.huge or x
  end
  local t = keel.tensor(v, {dtype = dtype, device = "cpu"})
  if shape then t = t:reshape(shape) end
  return t
end

-- Dims lists on a 3-d tensor: each dim, non-adjacent pairs, all.
local DIMS = {1, 2, 3, -1, {1, 3}, {2, 3}, {1, 2}, {1, 2, 3}}

describe("cuda reduce: sum / mean / prod / amax / amin", function()
  for _, dt in ipairs(FLOATS) do
    for _, op in ipairs({"sum", "mean", "amax", "amin"}) do
      gpu_it(op .. " over everything, " .. dt .. " [7,33,65]", function()
        D.check(function(x) return x[op](x) end, {D.input({7, 33, 65}, dt)})
      end)
      for _, d in ipairs(DIMS) do
        gpu_it(op .. "(" .. dstr(d) .. ") keepdim and not, " .. dt, function()
          D.check(function(x) return {x[op](x, d), x[op](x, d, true)} end, {D.input({7, 33, 65}, dt)})
        end)
      end
    end
    gpu_it("prod over dims and everything, " .. dt, function()
      -- values near 1, so products of a few hundred stay finite
      local function x() return D.input({5, 9, 11}, dt, {lo = 0.8, hi = 1.2}) end
      D.check(function(a) return {a:prod(), a:prod(1), a:prod(3, true)} end, {x()})
      D.check(function(a) return a:prod({1, 3}) end, {x()})
    end)
  end
end)

describe("cuda reduce: kernel paths", function()
  for _, dt in ipairs(FLOATS) do
    gpu_it("full sum of 1e6 elements (split over many blocks), " .. dt, function()
      local x = D.input({1000000}, dt, {grad = false, seed = 3})
      D.check(function(a) return {a:sum(), a:mean()} end, {x}, {backward = false})
      -- constant 0.1: a float32 sum in float32 would drift by percents
      local c = keel.ones({1000000}, {dtype = dt}):mul(0.1)
      D.check(function(a) return a:sum() end, {c}, {backward = false, tol = dt == "float32" and 1e-4 or nil})
    end)
    gpu_it("long rows [3, 100003] (rows split), " .. dt, function()
      D.check(function(a) return {a:sum(2), a:amax(2)} end, {D.input({3, 100003}, dt)})
    end)
    gpu_it("long columns [50001, 3] (columns split), " .. dt, function()
      D.check(function(a) return {a:sum(1), a:amin(1, true)} end, {D.input({50001, 3}, dt)})
    end)
    gpu_it("many short rows [4099, 5] and many columns [5, 4099], " .. dt, function()
      D.check(function(a) return {a:sum(2), a:mean(1)} end, {D.input({4099, 5}, dt)})
      D.check(function(a) return {a:sum(1), a:mean(2)} end, {D.input({5, 4099}, dt)})
    end)
    gpu_it("4-d, non-adjacent dims {1,3} and {2,4}, " .. dt, function()
      local x = D.input({3, 17, 5, 37}, dt)
      D.check(function(a) return {a:sum({1, 3}), a:amax({2, 4}, true), a:mean({1, 2, 4})} end, {x})
    end)
    gpu_it("strided inputs: transpose, narrow, permute, " .. dt, function()
      local x = D.input({13, 21, 9}, dt)
      D.check(function(a)
        local t = a:transpose(1, 3)                 -- [9, 21, 13]
        local n = a:narrow(2, 3, 11)                -- [13, 11, 9], strided rows
        local p = a:permute({2, 3, 1})
        return {t:sum(3), t:sum({1, 2}), n:sum(2), n:amax(3), n:mean(), p:sum({1, 3}), p:amin(2)}
      end, {x})
    end)
    gpu_it("broadcast (stride 0) inputs, " .. dt, function()
      local x = D.input({1, 37, 1}, dt)
      D.check(function(a)
        local e = a:expand({5, 37, 33})
        return {e:sum(1), e:sum(3), e:sum({1, 3}), e:mean(), e:amax(2)}
      end, {x})
    end)
  end
end)

describe("cuda reduce: max / min with indices, argmax / argmin", function()
  for _, dt in ipairs(FLOATS) do
    for _, op in ipairs({"max", "min"}) do
      for _, d in ipairs({1, 2, 3}) do
        gpu_it(op .. "(" .. d .. ") values and indices, " .. dt, function()
          D.check(function(a)
            local v, i = a[op](a, d)
            local vk, ik = a[op](a, d, true)
            return {v, i, vk, ik}
          end, {D.input({7, 300, 9}, dt)})
        end)
      end
      gpu_it(op .. " of everything and along a strided dim, " .. dt, function()
        D.check(function(a)
          local v, i = a:transpose(1, 2)[op](a:transpose(1, 2), 1)
          return {a[op](a), v, i}
        end, {D.input({9, 2001}, dt)})
      end)
    end
    gpu_it("ties go to the first position, " .. dt, function()
      -- few distinct values: many ties in every row and column
      local v = {}
      for k = 1, 31 * 257 do v[k] = (k * 7) % 5 end
      local x = keel.tensor(v, {dtype = dt, device = "cpu"}):reshape({31, 257})
      D.check(function(a)
        local r = {}
        for _, d in ipairs({1, 2}) do
          local mv, mi = a:max(d)
          local nv, ni = a:min(d)
          r[#r + 1] = mi
          r[#r + 1] = ni
          r[#r + 1] = mv + nv
        end
        r[#r + 1] = a:argmax()
        r[#r + 1] = a:argmin()
        return r
      end, {x}, {backward = false})
    end)
    gpu_it("argmax / argmin along dims and flattened, " .. dt, function()
      D.check(function(a)
        return {a:argmax(), a:argmin(), a:argmax(1), a:argmin(2, true), a:argmax(3)}
      end, {D.input({6, 35, 70}, dt, {grad = false})}, {backward = false})
    end)
    gpu_it("NaN wins max and min, the first NaN's index; inf is ordinary, " .. dt, function()
      local x = special({1, "nan", 3, "nan", 2, "inf", "-inf", 0,
                         "inf", 4, "-inf", 5, 6, 7, 8, 9}, dt, {4, 4})
      D.check(function(a)
        local mv, mi = a:max(2)
        local nv, ni = a:min(1)
        return {mv, mi, nv, ni, a:max(), a:amin(2), a:argmax(), a:argmax(1)}
      end, {x}, {backward = false})
    end)
  end
end)

describe("cuda reduce: int64", function()
  gpu_it("sum, prod, max/min with indices, argmax, amax", function()
    local v = {}
    for k = 1, 5 * 77 do v[k] = (k * 37) % 23 - 11 end
    local x = keel.tensor(v, {dtype = "int64", device = "cpu"}):reshape({5, 77})
    D.check(function(a)
      local mv, mi = a:max(2)
      local nv, ni = a:min(1, true)
      return {a:sum(), a:sum(1), a:sum(2, true), a:narrow(2, 1, 9):prod(2), mv, mi, nv, ni, a:argmax(),
              a:amax(1), a:amin()}
    end, {x}, {backward = false})
  end)
  gpu_it("sums beyond 2^32 are exact", function()
    local x = keel.tensor({3000000000, 1, 2, 1000000000}, {dtype = "int64", device = "cpu"})
    local r = x:to("cuda"):sum()
    D.same_device(r, "cuda")
    assert.are.equal(4000000003, r:item())
  end)
end)

describe("cuda reduce: empty tensors", function()
  for _, dt in ipairs(FLOATS) do
    gpu_it("reducing a size-0 dim gives 0, 1, NaN; a kept size-0 dim gives nothing, " .. dt, function()
      local x = D.input({4, 0, 3}, dt)
      D.check(function(a)
        H.assert_shape(a:sum(1), {0, 3})
        return {a:sum(2), a:prod(2), a:mean(2), a:sum(), a:sum(1), a:sum({1, 3}), a:norm(2, 2),
                a:norm(math.huge)}
      end, {x}, {backward = false})
      -- gradients of a 1-d empty input
      D.check(function(a) return {a:sum(), a:sum(1, true), a:mean()} end, {D.input({0}, dt)})
    end)
  end
end)

describe("cuda reduce: NaN and Inf", function()
  for _, dt in ipairs(FLOATS) do
    gpu_it("sum/mean/prod/amax propagate NaN; inf - inf is NaN, " .. dt, function()
      local x = special({1, 2, "nan", 4, "inf", "-inf", 3, 1, "inf", 2, 3, 4, 1, 2, 3, 4}, dt, {4, 4})
      D.check(function(a)
        return {a:sum(2), a:mean(1), a:prod(2), a:amax(2), a:amin(1), a:sum(), a:norm(2, 2),
                a:norm(math.huge, 1), a:norm(1, 2), a:norm(3, 1)}
      end, {x}, {backward = false})
    end)
  end
end)

describe("cuda norm", function()
  local PS = {1, 2, 3, 0.5, 1.5, math.huge}
  for _, dt in ipairs(FLOATS) do
    for _, p in ipairs(PS) do
      local pn = p == math.huge and "inf" or tostring(p)
      gpu_it("p=" .. pn .. " over everything and over dims, " .. dt, function()
        -- away from 0: the gradient of |x|^p is smooth there
        local x = D.input({9, 41, 7}, dt, {lo = 0.1, hi = 2})
        D.check(function(a)
          local s = a * 1
          return {a:norm(p), a:norm(p, 2), a:norm(p, {1, 3}, true), s:transpose(1, 2):norm(p, 1)}
        end, {x})
      end)
    end
    gpu_it("2-norm of 1e6 elements, " .. dt, function()
      D.check(function(a) return {a:norm(), a:norm(1), a:norm(math.huge)} end,
              {D.input({1000, 1000}, dt, {grad = false})}, {backward = false})
    end)
  end
end)

describe("cuda var / std", function()
  for _, dt in ipairs(FLOATS) do
    for _, d in ipairs({1, 2, {1, 3}}) do
      gpu_it("var/std(" .. dstr(d) .. ") correction 0 and 1, " .. dt, function()
        D.check(function(a)
          return {a:var(d), a:std(d, {correction = 0, keepdim = true}), a:var(nil, {correction = 0}), a:std()}
        end, {D.input({6, 45, 13}, dt)})
      end)
    end
  end
end)

describe("cuda reduce: dtype errors", function()
  gpu_it("mean of int64 is refused on the device as on the CPU", function()
    local x = keel.tensor({1, 2, 3}, {dtype = "int64"}):to("cuda")
    H.assert_error_match(function() return x:mean() end, "mean: expected a float")
  end)
end)
