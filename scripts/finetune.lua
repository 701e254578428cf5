-- scripts/finetune.lua: fine-tuning. Loads the CNN weights that
-- scripts/mnist.lua saved (safetensors), freezes the convolutions
-- (requires_grad = false: the optimizer skips them), replaces the 10-way
-- head with a fresh 2-way one and trains it on a new task: even or odd digit.
--
--   keel scripts/mnist.lua [--data DIR]          (writes mnist.safetensors)
--   keel scripts/finetune.lua [--from mnist.safetensors] [--data DIR] [--epochs 1]
--                             [--batch 64] [--lr 1e-3] [--limit N]
--                             [--out finetune.safetensors]
-- Device: keel's default device (KEEL_DEVICE=cuda keel scripts/finetune.lua trains on the GPU);
-- the data is moved there once and the model is made there.
package.path = (arg[0]:match("^(.*)/") or ".") .. "/lib/?.lua;" .. package.path
local keel = keel or require "keel"
local args = require "args"
local digits = require "digits"
local nn, optim, clip = keel.nn, keel.optim, keel.clip

local opt = args.parse(arg, {
  from = "mnist.safetensors", data = false, epochs = 1, batch = 64, lr = 1e-3, limit = 0,
  seed = 2, log_every = 50, out = "finetune.safetensors", _strings = {"data"},
}, "usage: keel scripts/finetune.lua [--from FILE] [--data DIR] [--epochs N] [--lr X] [--limit N]")
keel.manual_seed(opt.seed)

-- the pretrained model -------------------------------------------------------
local f = io.open(opt.from)
if not f then
  io.stderr:write(("finetune: %s not found: run `keel scripts/mnist.lua` first (or give --from FILE)\n")
    :format(opt.from))
  os.exit(1)
end
f:close()
local model = digits.cnn()
local weights, meta = keel.load(opt.from)
model:load_state_dict(weights)
print(("loaded %s (%s)"):format(opt.from, meta and meta.script or "no metadata"))

-- freeze the convolutions, replace the head ---------------------------------
local frozen = {}
for _, conv in ipairs {model[1], model[4]} do
  for _, p in ipairs(conv:parameters()) do
    p.requires_grad = false
    frozen[#frozen + 1] = {p, p:clone()}
  end
end
model[10] = nn.Linear(128, 2)
local trainable = 0
for _, p in ipairs(model:parameters()) do
  if p.requires_grad then trainable = trainable + p:numel() end
end
print(("froze the 2 conv layers; new head Linear(128, 2); %d trainable parameters"):format(trainable))

-- the new task: even (class 1) or odd (class 2) -------------------------------
local train_set, test_set, source = digits.datasets(opt.data, opt.seed)
print(source .. "; task: is the digit even or odd")
train_set = digits.limit(train_set, opt.limit)
local train = digits.loader(train_set, {batch_size = opt.batch, shuffle = true, seed = opt.seed, drop_last = true})
local test = digits.loader(test_set, {batch_size = 500})
local PARITY = keel.tensor({1, 2, 1, 2, 1, 2, 1, 2, 1, 2}, {dtype = "int64"})   -- digit 0 is y = 1
local function parity(y) return PARITY:index_select(1, y) end                -- even: 1, odd: 2

-- every parameter goes to the optimizer: the frozen ones get no gradient
-- and are skipped
local optimizer = optim.AdamW(model:parameters(), {lr = opt.lr, clip = clip.global_norm(1.0)})

local function accuracy()
  model:eval()
  local correct, n = 0, 0
  keel.no_grad(function()
    for x, y in test:batches() do
      correct = correct + model(x):argmax(2):eq(parity(y)):sum():item()
      n = n + y:numel()
    end
  end)
  model:train()
  return 100 * correct / n
end

print(("before training: even/odd accuracy %.2f%%"):format(accuracy()))
local step, t0 = 0, args.now()
for epoch = 1, opt.epochs do
  for x, y in train:batches() do
    local loss = nn.cross_entropy(model(x), parity(y))
    optimizer:zero_grad()
    loss:backward()
    local r = optimizer:step()
    step = step + 1
    if step % opt.log_every == 0 then
      print(("epoch %d  step %d  loss %.4f  grad norm %.3f"):format(epoch, step, loss:item(), r.grad_norm))
    end
  end
  print(("epoch %d: even/odd test accuracy %.2f%%  (%.1f s)"):format(epoch, accuracy(), args.now() - t0))
end

local unchanged = true
for _, pair in ipairs(frozen) do
  if pair[1]:ne(pair[2]):sum():item() ~= 0 or pair[1].grad ~= nil then unchanged = false end
end
print(("frozen conv weights unchanged: %s"):format(unchanged and "yes" or "NO"))
keel.save(opt.out, model:state_dict(), {metadata = {script = "finetune.lua", task = "even/odd"}})
print("saved the fine-tuned weights to " .. opt.out)
