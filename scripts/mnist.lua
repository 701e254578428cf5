-- scripts/mnist.lua: DESIGN.md's CNN on MNIST, with AdamW, global-norm
-- clipping and a warmup + cosine schedule; evaluates on the test set and
-- saves a training checkpoint (atomically) after every epoch, and the final
-- weights as safetensors (they load in PyTorch; scripts/finetune.lua uses them).
-- keel.guard watches every step (a loss or grad-norm spike or a NaN/Inf
-- gradient is skipped and the lr backed off), and --log DIR writes the run's
-- metrics (JSONL + TensorBoard; `keel plot DIR -o grads.png` draws them).
--
--   keel scripts/mnist.lua [--data DIR] [--epochs 5] [--batch 64] [--lr 2e-3]
--                          [--out mnist.ckpt] [--weights mnist.safetensors]
--                          [--resume] [--limit N] [--log-every 100]
--                          [--log DIR] [--no-guard] [--anomaly]
--
-- --data DIR reads DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz];
-- without it the script trains on a built-in synthetic digit set (see
-- scripts/lib/synth.lua). --limit N keeps the first N training images.
-- --resume continues from the checkpoint --out. Threads: OPENBLAS_NUM_THREADS.
-- Device: keel's default device (KEEL_DEVICE=cuda keel scripts/mnist.lua trains on the GPU);
-- the data is moved there once and the model is made there.
package.path = (arg[0]:match("^(.*)/") or ".") .. "/lib/?.lua;" .. package.path
local keel = keel or require "keel"
local args = require "args"
local digits = require "digits"
local nn, optim, clip = keel.nn, keel.optim, keel.clip

local opt = args.parse(arg, {
  data = false, epochs = 5, batch = 64, lr = 2e-3, weight_decay = 1e-2, warmup = 200,
  out = "mnist.ckpt", weights = "mnist.safetensors", resume = false, limit = 0, seed = 1, log_every = 100,
  log = false, guard = true, anomaly = false, _strings = {"data", "log"},
}, "usage: keel scripts/mnist.lua [--data DIR] [--epochs N] [--batch N] [--lr X] [--out FILE]\n"
  .. "                              [--weights FILE] [--resume] [--limit N] [--log DIR] [--no-guard] [--anomaly]")
keel.manual_seed(opt.seed)

-- data ---------------------------------------------------------------------
local train_set, test_set, source = digits.datasets(opt.data, opt.seed)
print(source)
train_set = digits.limit(train_set, opt.limit)
local train = digits.loader(train_set, {batch_size = opt.batch, shuffle = true, seed = opt.seed, drop_last = true})
local test = digits.loader(test_set, {batch_size = 500})
local steps_per_epoch = #train
local total = opt.epochs * steps_per_epoch
print(("%d training images, %d test images, %d steps per epoch"):format(train_set.n, test_set.n, steps_per_epoch))

-- model, optimizer, schedule ------------------------------------------------
local model = digits.cnn()
local optimizer = optim.AdamW(model:parameters(), {lr = opt.lr, weight_decay = opt.weight_decay,
                                                   clip = clip.global_norm(1.0)})
local schedule = optim.schedule.cosine(optimizer, {warmup = math.min(opt.warmup, total // 10), total = total})
-- DESIGN.md's guard and monitoring lines
local guard = opt.guard and keel.guard(optimizer, {
  spike = {z = 6, window = 200}, on_spike = "skip", on_nonfinite = "skip",
  lr_backoff = 0.5, max_retries = 3, model = model,
}) or nil
local monitor = opt.log and keel.monitor.log(opt.log, {every = 10, model = model}) or nil
if opt.anomaly then keel.autograd.detect_anomaly(true, {mode = "warn"}) end
local state = {model = model, optimizer = optimizer, schedule = schedule, loader = train, step = 0, guard = guard}
local first_epoch = 1
if opt.resume then
  state.step = keel.checkpoint.load(opt.out, state).step
  first_epoch = state.step // steps_per_epoch + 1
  print(("resumed from %s at step %d (epoch %d)"):format(opt.out, state.step, first_epoch))
end

-- training loop -------------------------------------------------------------
local t_start = args.now()
for epoch = first_epoch, opt.epochs do
  local t0, t_log, last, seen = args.now(), args.now(), state.step, 0
  for x, y in train:batches() do
    local loss = nn.cross_entropy(model(x), y)
    optimizer:zero_grad()
    loss:backward()
    local r = optimizer:step(loss)
    schedule:step()
    state.step, seen = state.step + 1, seen + y:numel()
    if state.step % opt.log_every == 0 or state.step == total then
      local t = args.now()
      print(("epoch %d  step %d/%d  loss %.4f  grad norm %.3f  lr %.2e  %.0f img/s"):format(epoch, state.step,
        total, loss:item(), r.grad_norm, r.lr, (state.step - last) * opt.batch / math.max(t - t_log, 1e-3)))
      t_log, last = t, state.step
    end
  end
  local train_time = args.now() - t0
  local acc = digits.accuracy(model, test)
  if monitor then monitor:scalar("test/accuracy", acc) end
  keel.checkpoint.save(opt.out, state)
  print(("epoch %d: test accuracy %.2f%%  (%.1f s, %.0f img/s; checkpoint %s)"):format(
    epoch, acc, train_time, seen / math.max(train_time, 1e-3), opt.out))
end
if guard then print(guard:summary()) end
if monitor then
  monitor:close()
  print(("metrics in %s (keel plot %s -o grads.png)"):format(opt.log, opt.log))
end
keel.save(opt.weights, model:state_dict(), {metadata = {script = "mnist.lua", steps = tostring(state.step)}})
print(("total %.1f s; weights in %s"):format(args.now() - t_start, opt.weights))
