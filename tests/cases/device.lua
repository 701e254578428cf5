-- Gradcheck cases of the device area (loaded by tests/autograd_spec.lua).
-- to_device to the CPU (copy = true forces the op, which moves the
-- gradient back to the input's device): from the CPU in the normal run,
-- from CUDA where KEEL_DEVICE=cuda makes the inputs CUDA tensors (the
-- other operand is then brought over too, as the product needs one
-- device). The CPU -> GPU path is the same rule and is checked in
-- tests/device_spec.lua (stand-in plugin) and on a GPU.
local env = ...
local T = env.T

return {
  to_device = {
    { "to cpu copy", function(a) return a:to("cpu", { copy = true }) * a:to("cpu") end,
      function() return { T({ 2, 3 }, -1, 1, 801) } end },
    { "to cpu copy of a transposed view", function(a) return a:t():to("cpu", { copy = true }):narrow(1, 2, 2) end,
      function() return { T({ 2, 3 }, -1, 1, 802) } end },
    { "to(other tensor) with copy", function(a, b) return a:to(b, { copy = true }) + b end,
      function() return { T({ 4 }, -1, 1, 803), T({ 4 }, -1, 1, 804) } end },
  },
}
