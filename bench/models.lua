-- bench/models.lua: the workloads' models and data, one definition for
-- bench/train.lua (CPU) and bench/gpu.lua (CUDA); the PyTorch twins
-- (train_torch.py, gpu_torch.py) build the same ones.
local keel = require "keel"
local nn = keel.nn

local M = {}

-- DESIGN.md's MNIST CNN: 1x28x28 in, 10 classes.
function M.mnist_cnn()
  return nn.Sequential {
    nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10),
  }
end

-- The char LSTM's sizes: vocabulary, embedding, hidden, sequence, batch.
M.LSTM = {V = 65, E = 64, H = 256, T = 64, N = 32}

-- The char LSTM (embedding, one LSTM layer, linear head) on device, and
-- its parameters in one list; step(xs, ys) -> the loss of one sequence
-- batch (xs, ys: [T, N] class indices).
function M.char_lstm(device)
  local c = M.LSTM
  local emb, lstm, head = nn.Embedding(c.V, c.E), nn.LSTM(c.E, c.H), nn.Linear(c.H, c.V)
  local params = {}
  for _, m in ipairs {emb, lstm, head} do
    if device then m:to(device) end
    for _, p in ipairs(m:parameters()) do params[#params + 1] = p end
  end
  local function loss(xs, ys)
    local out = lstm(emb(xs))                         -- [T, N, H]
    return nn.cross_entropy(head(out:reshape{c.T * c.N, c.H}), ys:reshape{c.T * c.N})
  end
  return loss, params
end

-- Uniform class indices in 1..classes (index base 1), of the given shape.
function M.labels(shape, classes)
  return (keel.rand(shape) * classes):long():clamp(0, classes - 1) + 1
end

-- One training step of the loss closure: zero_grad, backward, step.
function M.step(opt, loss)
  return function()
    local l = loss()
    opt:zero_grad()
    l:backward()
    opt:step()
  end
end

return M
