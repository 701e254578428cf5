-- scripts/gpt.lua: a small character-level causal transformer (GPT style):
-- token + position embeddings, pre-norm blocks (LayerNorm -> causal
-- MultiheadAttention -> residual, LayerNorm -> MLP with GELU -> residual),
-- a final LayerNorm and a linear head. AdamW, linear warmup then cosine
-- decay, global-norm clipping at 1, and keel.guard (a loss or grad-norm
-- spike or a non-finite gradient skips the step and halves the lr for a
-- while); prints the loss, the guard's summary and a sample.
--
--   keel scripts/gpt.lua [--data FILE] [--steps 200] [--block 64] [--batch 16]
--                        [--dim 128] [--heads 4] [--layers 2] [--lr 1e-3]
--                        [--warmup 20] [--temperature 0.8] [--sample 200]
--                        [--out gpt.safetensors] [--no-guard]
--
-- Without --data it reads /work/shared/data/tinyshakespeare/input.txt when
-- that exists, else a built-in paragraph. The weights are saved with keel.save.
-- Device: keel's default device (KEEL_DEVICE=cuda keel scripts/gpt.lua trains on the GPU);
-- the data is moved there once and the model is made there.
package.path = (arg[0]:match("^(.*)/") or ".") .. "/lib/?.lua;" .. package.path
local keel = keel or require "keel"
local args = require "args"
local text = require "text"
local nn, optim, clip = keel.nn, keel.optim, keel.clip

local opt = args.parse(arg, {
  data = false, steps = 200, block = 64, batch = 16, dim = 128, heads = 4, layers = 2,
  lr = 1e-3, weight_decay = 0.1, warmup = 20, temperature = 0.8, sample = 200, seed = 1,
  log_every = 20, out = "gpt.safetensors", guard = true, _strings = {"data"},
}, "usage: keel scripts/gpt.lua [--data FILE] [--steps N] [--block T] [--dim D] [--layers N]")
keel.manual_seed(opt.seed)
math.randomseed(opt.seed)

-- data: random windows of block + 1 characters ------------------------------
local ds, source = text.load(opt.data)
local V, N, T = #ds.vocab, ds.data:numel(), opt.block
assert(N > T + 1, ("the text (%d characters) is shorter than a block (%d)"):format(N, T))
print(("%s (%d characters, vocabulary of %d)"):format(source, N, V))
local span = keel.arange(0, T + 1):long():view{1, T + 1}
local function batch()
  local start = (keel.rand{opt.batch, 1} * (N - T)):long():clamp(0, N - T - 1) + 1
  local w = ds.data:index_select(1, (start + span):view{-1}):view{opt.batch, T + 1}
  return w:narrow(2, 1, T), w:narrow(2, 2, T)
end

-- model --------------------------------------------------------------------
local Block = nn.Module:extend("Block")
function Block:init(d, heads)
  self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
  self.attn = nn.MultiheadAttention(d, heads, {batch_first = true})
  self.mlp = nn.Sequential {nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)}
end
function Block:forward(x)
  local h = self.ln1(x)
  x = x + self.attn(h, h, h, {is_causal = true, need_weights = false})
  return x + self.mlp(self.ln2(x))
end

local GPT = nn.Module:extend("GPT")
function GPT:init(v, block, d, heads, layers)
  self.tok, self.pos = nn.Embedding(v, d), nn.Embedding(block, d)
  local blocks = {}
  for i = 1, layers do blocks[i] = Block(d, heads) end
  self.blocks = nn.Sequential(blocks)
  self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, v)
end
function GPT:forward(idx)   -- idx [B, t] ids -> logits [B, t, V]
  local t = idx:size(2)
  local x = self.tok(idx) + self.pos(keel.arange(1, t + 1):long())
  return self.head(self.ln(self.blocks(x)))
end
local model = GPT(V, T, opt.dim, opt.heads, opt.layers)
local n_params = 0
for _, p in ipairs(model:parameters()) do n_params = n_params + p:numel() end
print(("model: %d blocks, dim %d, %d heads, block %d: %d parameters"):format(
  opt.layers, opt.dim, opt.heads, T, n_params))

local optimizer = optim.AdamW(model:parameters(), {lr = opt.lr, weight_decay = opt.weight_decay,
                                                   betas = {0.9, 0.95}, clip = clip.global_norm(1.0)})
local schedule = optim.schedule.cosine(optimizer, {warmup = math.min(opt.warmup, opt.steps - 1),
                                                   total = opt.steps, min_lr = opt.lr / 10})
-- the guard reads the loss and the grad norm of each step before it is
-- applied: a spike beyond 6 robust standard deviations of the last 200
-- accepted steps, or a NaN/Inf gradient, is skipped and the lr halved
-- (doubled back every 100 clean steps); 4 bad steps in a row stop the run.
local guard = opt.guard and keel.guard(optimizer, {
  spike = {z = 6, window = 200}, on_spike = "skip", on_nonfinite = "skip",
  lr_backoff = 0.5, max_retries = 3, model = model,
}) or nil

-- training -----------------------------------------------------------------
local t0, t_log, last = args.now(), args.now(), 0
for step = 1, opt.steps do
  local x, y = batch()
  local loss = nn.cross_entropy(model(x):reshape{-1, V}, y:reshape{-1})
  optimizer:zero_grad()
  loss:backward()
  local r = optimizer:step(loss)
  schedule:step()
  if step % opt.log_every == 0 or step == 1 or step == opt.steps then
    local t = args.now()
    print(("step %d/%d  loss %.4f  grad norm %.3f  lr %.2e  %.0f tokens/s"):format(step, opt.steps,
      loss:item(), r.grad_norm, r.lr, (step - last) * opt.batch * T / math.max(t - t_log, 1e-3)))
    t_log, last = t, step
  end
end
print(("trained %d steps in %.1f s"):format(opt.steps, args.now() - t0))
if guard then print(guard:summary()) end
keel.save(opt.out, model:state_dict(), {metadata = {script = "gpt.lua", vocab = table.concat(ds.vocab)}})
print("saved the weights to " .. opt.out)

-- sampling: the last block of context, one character at a time -------------
model:eval()
local ctx = {ds.data[1]}
keel.no_grad(function()
  for _ = 1, opt.sample do
    local from = math.max(1, #ctx - T + 1)
    local logits = model(keel.tensor({table.move(ctx, from, #ctx, 1, {})}, {dtype = "int64"}))
    ctx[#ctx + 1] = text.draw(logits[1][-1], opt.temperature)
  end
end)
local chars = {}
for i, id in ipairs(ctx) do chars[i] = ds.vocab[id] end
print(("sample (temperature %.2f):"):format(opt.temperature))
print(table.concat(chars))
