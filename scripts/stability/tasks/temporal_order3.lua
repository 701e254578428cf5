-- The 3-bit temporal order problem (Hochreiter and Schmidhuber 1997,
-- experiment 6b, in the form generated for Pascanu, Mikolov and Bengio
-- 2013): the temporal order input (6 one-hot symbols, A/B relevant,
-- c..f distractors) with three relevant steps, drawn from [10%, 20%),
-- [30%, 40%) and [60%, 70%) of the sequence. Target: a class of 8 (1 +
-- first + 2 * second + 4 * third, A = 0, B = 1) at the last step;
-- cross-entropy loss. Exactly T steps. An error is a wrong argmax.
local keel = keel or require "keel"
local onehot = require "stability.onehot"

local task = {name = "3-bit temporal order", input_size = 6, output_size = 8, kind = "classification",
              target = "last"}

task.slots = {0.1, 0.3, 0.6}

function task.sample(B, T, rng)
  local sym, y = {}, {}
  for i = 1, T * B do sym[i] = 2 + rng:int(4) end
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
