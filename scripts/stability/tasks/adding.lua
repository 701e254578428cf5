-- The adding problem (Hochreiter and Schmidhuber 1997, experiment 4), as
-- generated for Pascanu, Mikolov and Bengio 2013.
--
-- Input, 2 channels per step: channel 1 a marker (1 at exactly two steps,
-- 0 elsewhere), channel 2 a value drawn from U(0, 1). The first marked
-- step is drawn from the first 10% of the sequence, the second from the
-- next 40% (10% .. 50%): at least half of the sequence lies between the
-- second mark and the output. Target: the MEAN of the two marked values,
-- in [0, 1]; it is exactly 1997's target 0.5 + (X1 + X2) / 4 for values X
-- in [-1, 1], so 1997's error threshold (0.04) keeps its meaning. MSE loss
-- on the output of the last step. Length: as the 2013 generator, a
-- sequence asked for with length T has T + U{0 .. T/10 - 1} steps (the
-- same for a whole batch).
--
-- adding.make(opts) builds variants (the same interface):
--   combine   "mean" (default) | "sum" | "product" (the multiplication task)
--   placement "pascanu" (default, as above) | "halves": the first mark
--             uniformly in the first half, the second in the second half
--             (the variant of Le et al. 2015 and Arjovsky et al. 2016)
--   jitter    false: exactly T steps
local keel = keel or require "keel"

local NAMES = {mean = "adding", sum = "adding (sum)", product = "multiplication"}

local function make(opts)
  opts = opts or {}
  local combine = opts.combine or "mean"
  assert(NAMES[combine], "adding.make: combine must be \"mean\", \"sum\" or \"product\"")
  local halves = opts.placement == "halves"
  assert(opts.placement == nil or halves or opts.placement == "pascanu",
    "adding.make: placement must be \"pascanu\" or \"halves\"")
  local jitter = opts.jitter ~= false
  local task = {name = NAMES[combine], input_size = 2, output_size = 1, kind = "regression", target = "last",
                make = make}

  -- sample(B, T, rng) -> x [L, B, 2] float32, y [B, 1] float32
  function task.sample(B, T, rng)
    local L = T
    if jitter and T >= 10 then L = T + rng:int(T // 10) end
    local x, y = {}, {}
    for t = 0, L - 1 do          -- x is [L, B, 2] row-major: (t * B + b) * 2 + channel
      for b = 0, B - 1 do
        local i = (t * B + b) * 2
        x[i + 1], x[i + 2] = 0, rng:uniform()
      end
    end
    for b = 0, B - 1 do
      local p0, p1
      if halves then
        p0, p1 = rng:int(L // 2), L // 2 + rng:int(L - L // 2)
      else
        p0 = rng:int(math.max(L // 10, 1))
        p1 = L // 10 + rng:int(math.max(L * 4 // 10, 1))
        if p1 == p0 then p1 = p0 + 1 end   -- only when L < 10
      end
      local i0, i1 = (p0 * B + b) * 2, (p1 * B + b) * 2
      x[i0 + 1], x[i1 + 1] = 1, 1
      local a, c = x[i0 + 2], x[i1 + 2]
      if combine == "mean" then y[b + 1] = (a + c) / 2
      elseif combine == "sum" then y[b + 1] = a + c
      else y[b + 1] = a * c end
    end
    return keel.tensor(x):view(L, B, 2), keel.tensor(y):view(B, 1)
  end
  return task
end

return make()
