-- Gradcheck cases of the device area (loaded by tests/autograd_spec.lua).
-- to_device on the CPU -> CPU path (copy = true forces the op, which moves
-- the gradient back to the input's device); the GPU path is the same rule
-- and is checked in tests/device_spec.lua (stand-in plugin) and on a GPU.
local env = ...
local T = env.T

return {
  to_device = {
    { "to cpu copy", function(a) return a:to("cpu", { copy = true }) * a end,
      function() return { T({ 2, 3 }, -1, 1, 801) } end },
    { "to cpu copy of a transposed view", function(a) return a:t():to("cpu", { copy = true }):narrow(1, 2, 2) end,
      function() return { T({ 2, 3 }, -1, 1, 802) } end },
    { "to(other tensor) with copy", function(a, b) return a:to(b, { copy = true }) + b end,
      function() return { T({ 4 }, -1, 1, 803), T({ 4 }, -1, 1, 804) } end },
  },
}
