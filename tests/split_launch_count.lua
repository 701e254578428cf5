-- tests/split_launch_count.lua CASE REPS: REPS runs of one case of a
-- per-channel or reduction kernel on cuda, for a run under the CUDA
-- simulator with KEEL_CUDA_SIM_STATS=1 and KEEL_CUDA_SIM_SMS=4
-- (tests/cuda_split_spec.lua counts the launches of one run: a split
-- reduction adds its second pass, so the count tells split from whole).
local keel = require "keel"
local F = keel.nn.functional
local case, reps = arg[1], tonumber(arg[2])

local function dev(shape)
  return keel.randn(shape, {dtype = "float64"}):to("cuda")
end

-- name -> {input shape, fn(x)}
local CASES = {
  ["sum rows split"] = {{3, 5000}, function(x) return x:sum(2) end},
  ["sum rows whole"] = {{64, 40}, function(x) return x:sum(2) end},
  ["sum cols split"] = {{5000, 3}, function(x) return x:sum(1) end},
  ["sum cols whole"] = {{10, 3}, function(x) return x:sum(1) end},
  ["bn cols split"] = {{300, 70}, function(x) return F.batch_norm(x, nil, nil, nil, nil, true) end},
  ["bn cols whole"] = {{20, 40}, function(x) return F.batch_norm(x, nil, nil, nil, nil, true) end},
  ["bn runs split"] = {{50, 2, 37}, function(x) return F.batch_norm(x, nil, nil, nil, nil, true) end},
  ["bn runs whole"] = {{2, 40, 37}, function(x) return F.batch_norm(x, nil, nil, nil, nil, true) end},
}
local c = assert(CASES[case], "no case " .. tostring(case))
local x = dev(c[1])
for _ = 1, reps do c[2](x) end
