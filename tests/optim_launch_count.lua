-- tests/optim_launch_count.lua N STEPS [POLICY]: STEPS AdamW steps under a
-- global norm clip over N cuda parameters with non-finite policy POLICY
-- ("error" by default: decided on the host; "skip", "zero", "keep": on the
-- device), for a run under the CUDA simulator with KEEL_CUDA_SIM_STATS=1
-- (tests/cuda_optim_spec.lua and cuda_optim_deferred_spec.lua count its
-- launches and waits).
local keel = require "keel"
local n, steps, policy = tonumber(arg[1]), tonumber(arg[2]), arg[3] or "error"
local ps = {}
for i = 1, n do ps[i] = keel.randn({5, i + 2}):to("cuda"):requires_grad_() end
local o = keel.optim.AdamW(ps, {lr = 1e-3, clip = keel.clip.global_norm(1.0), nonfinite = policy})
for i = 1, n do ps[i].grad = keel.randn({5, i + 2}):to("cuda") end
for _ = 1, steps do o:step() end
assert(o:grad_stats()[n].update_sumsq > 0)
