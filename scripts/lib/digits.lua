-- scripts/lib/digits.lua: what mnist.lua and finetune.lua share: the
-- datasets (real MNIST or the synthetic digits), their loaders and the CNN.
local keel = keel or require "keel"

local M = {}

-- DESIGN.md's CNN: 28x28 -> 10 logits.
function M.cnn()
  local nn = keel.nn
  return nn.Sequential {
    nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10),
  }
end

-- ds with x and y on keel's default device (where the model is made): the
-- loader then gathers each batch there (MNIST's 47 MB fit any GPU).
local function on_device(ds)
  local dev = keel.get_default_device()
  ds.x, ds.y = ds.x:to(dev), ds.y:to(dev)
  return ds
end

-- train_set, test_set and a line that says which: MNIST from dir, or the
-- built-in synthetic digits when dir is false; on keel's default device.
function M.datasets(dir, seed)
  if dir then
    return on_device(keel.data.mnist(dir, {train = true})), on_device(keel.data.mnist(dir, {train = false})),
      "data: MNIST from " .. dir
  end
  local synth = require "synth"
  return on_device(synth.digits(6000, seed)), on_device(synth.digits(1000, seed + 1)),
    "data: no --data given: the built-in synthetic digit set (6000 training, 1000 test images)"
end

-- The first n examples of ds (all when n is 0 or more than ds.n).
function M.limit(ds, n)
  if n <= 0 or n >= ds.n then return ds end
  return {x = ds.x:narrow(1, 1, n), y = ds.y:narrow(1, 1, n), n = n, source = ds.source}
end

-- A loader with MNIST's normalisation.
function M.loader(ds, opts)
  local d = keel.data
  opts.transforms = {d.transforms.to_float(), d.transforms.normalize(0.1307, 0.3081)}
  return d.DataLoader(ds, opts)
end

-- Test accuracy in % of model over a loader (eval mode, no graph).
function M.accuracy(model, loader)
  model:eval()
  local correct, n = 0, 0
  keel.no_grad(function()
    for x, y in loader:batches() do
      correct = correct + model(x):argmax(2):eq(y):sum():item()
      n = n + y:numel()
    end
  end)
  model:train()
  return 100 * correct / n
end

return M
