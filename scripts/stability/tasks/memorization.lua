-- The noiseless memorization problem (Hochreiter and Schmidhuber 1997;
-- as generated for Pascanu, Mikolov and Bengio 2013, with their defaults of
-- 5 values and 10 positions).
--
-- Input, 7 one-hot channels (1..5 the values, 6 "blank", 7 "trigger"),
-- T + 20 steps: the first 10 steps a pattern of 10 values (each of 5, at
-- random), then blanks; the trigger replaces the blank at step T + 11;
-- the network must then output the 10 values in order over the last 10
-- steps. Target at EVERY step, a class of 6 (1..5 the values, 6 "blank"):
-- "blank" for the first T + 10 steps, the pattern for the last 10;
-- cross-entropy averaged over all steps. A sequence is an error when any
-- of its steps has a wrong argmax (as the 2013 code counts it).
local keel = keel or require "keel"
local onehot = require "stability.onehot"

local task = {name = "noiseless memorization", input_size = 7, output_size = 6, kind = "classification",
              target = "all", values = 5, positions = 10}

-- sample(B, T, rng) -> x [T + 20, B, 7], y int64 [T + 20, B]
function task.sample(B, T, rng)
  local V, P = task.values, task.positions
  local L = T + 2 * P
  local sym, y = {}, {}
  local BLANK, TRIGGER = V, V + 1              -- 0-based input symbols
  for i = 1, L * B do sym[i], y[i] = BLANK, V + 1 end   -- y: 1-based classes, V + 1 = blank
  for b = 0, B - 1 do
    for k = 0, P - 1 do
      local v = rng:int(V)
      sym[k * B + b + 1] = v
      y[(L - P + k) * B + b + 1] = v + 1
    end
    sym[(T + P) * B + b + 1] = TRIGGER
  end
  return onehot(sym, L, B, task.input_size), keel.tensor(y, {dtype = "int64"}):view(L, B)
end

return task
