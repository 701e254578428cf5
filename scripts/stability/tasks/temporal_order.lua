-- The temporal order problem (Hochreiter and Schmidhuber 1997, experiment
-- 6a, in the form generated for Pascanu, Mikolov and Bengio 2013).
--
-- Input: one of 6 symbols per step, one-hot (channels 1, 2: the relevant
-- symbols A and B; channels 3..6: distractors c, d, e, f). Every step holds
-- a random distractor except two: at a step drawn from [10%, 20%) of the
-- sequence and at one drawn from [50%, 60%), A or B at random. Target: the
-- order of the two relevant symbols, a class of 4 (AA, BA, AB, BB: class
-- 1 + first + 2 * second, A = 0, B = 1), read from the last step;
-- cross-entropy loss. Exactly T steps. An error is a wrong argmax.
local keel = keel or require "keel"
local onehot = require "stability.onehot"

-- A temporal order task with relevant symbols at the given slots (each
-- [lo, lo + 10%) of T); temporal_order3 builds its three-slot form here.
local function make(name, slots)
  local task = {name = name, input_size = 6, output_size = 1 << #slots, kind = "classification",
                target = "last", slots = slots}

  function task.sample(B, T, rng)
    local sym, y = {}, {}
    for i = 1, T * B do sym[i] = 2 + rng:int(4) end          -- distractors, 0-based symbols 2..5
    local width = math.max(T // 10, 1)
    for b = 0, B - 1 do
      local class = 0
      for k, lo in ipairs(task.slots) do
        local p = math.floor(T * lo) + rng:int(width)
        local v = rng:bit()
        sym[p * B + b + 1] = v
        class = class + v * (1 << (k - 1))
      end
      y[b + 1] = class + 1
    end
    return onehot(sym, T, B, task.input_size), keel.tensor(y, {dtype = "int64"})
  end

  return task
end

-- the positions (fractions of T) of the relevant symbols: [lo, lo + 10%)
local task = make("temporal order", {0.1, 0.5})
task.make = make
return task
