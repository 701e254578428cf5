-- tests/cases/attention.lua: gradient checks of the fused attention op
-- (keel.ops() name scaled_dot_product_attention), loaded by
-- autograd_spec.lua: q, k, v and a learnable bias, causal, broadcast, and
-- dropout with the RNG reseeded before each evaluation (the mask repeats).
local env = ...
local T, keel = env.T, env.keel
local F = require("keel.core")._nn

return {
  scaled_dot_product_attention = {
    { "sdpa q, k, v (L != S, E != Ev)", function(q, k, v) return F._sdpa(q, k, v, nil, false, 0.6, 0) end,
      function() return { T({ 2, 3, 4 }, -1, 1, 601), T({ 2, 5, 4 }, -1, 1, 602), T({ 2, 5, 3 }, -1, 1, 603) } end },
    { "sdpa causal with a broadcast bias", function(q, k, v, b) return F._sdpa(q, k, v, b, true, 0.5, 0) end,
      function()
        return { T({ 2, 4, 3 }, -1, 1, 604), T({ 2, 3, 3 }, -1, 1, 605), T({ 2, 3, 2 }, -1, 1, 606),
                 T({ 4, 3 }, -1, 1, 607) }
      end },
    { "sdpa dropout, broadcast batch", function(q, k, v)
        keel.manual_seed(608)
        return F._sdpa(q, k, v, nil, false, 0.5, 0.35)
      end, function() return { T({ 2, 1, 3, 2 }, -1, 1, 609), T({ 1, 2, 4, 2 }, -1, 1, 610), T({ 4, 3 }, -1, 1, 611) } end },
  },
}
