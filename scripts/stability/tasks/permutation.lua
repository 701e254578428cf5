-- The random permutation problem (as generated for Pascanu, Mikolov and
-- Bengio 2013, after Martens and Sutskever 2011): a sequence of T symbols
-- out of 100, one-hot. The first symbol is 1 or 2 (0-based 0 or 1), every
-- other one a random symbol out of 3..100; at the last step the network
-- must name the first symbol: a class of 100 (only 1 and 2 ever occur),
-- cross-entropy loss. An error is a wrong argmax.
local keel = keel or require "keel"
local onehot = require "stability.onehot"

local task = {name = "random permutation", input_size = 100, output_size = 100, kind = "classification",
              target = "last"}

function task.sample(B, T, rng)
  local sym, y = {}, {}
  for i = 1, T * B do sym[i] = 2 + rng:int(98) end
  for b = 0, B - 1 do
    local v = rng:bit()
    sym[b + 1] = v
    y[b + 1] = v + 1
  end
  return onehot(sym, T, B, task.input_size), keel.tensor(y, {dtype = "int64"})
end

return task
