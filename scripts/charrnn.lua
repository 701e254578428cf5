-- scripts/charrnn.lua: a character-level LSTM language model, char-rnn
-- style: Embedding -> 2-layer LSTM -> Linear, trained with truncated
-- backpropagation through time (the state is carried across windows,
-- detached), Adam with global-norm clipping at 5, then samples text.
--
--   keel scripts/charrnn.lua [--data FILE] [--steps 300] [--seq 64] [--batch 32]
--                            [--hidden 256] [--lr 2e-3] [--temperature 0.8]
--                            [--sample 300] [--out charrnn.safetensors]
--
-- Without --data it reads /work/shared/data/tinyshakespeare/input.txt when
-- that exists, else a built-in paragraph. The weights are saved with keel.save.
-- Device: keel's default device (KEEL_DEVICE=cuda keel scripts/charrnn.lua trains on the GPU);
-- the data is moved there once and the model is made there.
package.path = (arg[0]:match("^(.*)/") or ".") .. "/lib/?.lua;" .. package.path
local keel = keel or require "keel"
local args = require "args"
local text = require "text"
local nn, optim, clip = keel.nn, keel.optim, keel.clip

local opt = args.parse(arg, {
  data = false, steps = 300, seq = 64, batch = 32, embed = 64, hidden = 256, layers = 2,
  lr = 2e-3, clip = 5, temperature = 0.8, sample = 300, seed = 1, log_every = 25,
  out = "charrnn.safetensors", _strings = {"data"},
}, "usage: keel scripts/charrnn.lua [--data FILE] [--steps N] [--seq T] [--batch B] [--hidden H]")
keel.manual_seed(opt.seed)
math.randomseed(opt.seed)

-- data ---------------------------------------------------------------------
local ds, source = text.load(opt.data)
local V = #ds.vocab
print(("%s (%d characters, vocabulary of %d)"):format(source, ds.data:numel(), V))
local next_window, per_pass, B, T = text.windows(ds.data, opt.batch, opt.seq)
if B ~= opt.batch or T ~= opt.seq then print(("short text: %d streams, windows of %d"):format(B, T)) end

-- model --------------------------------------------------------------------
local CharRNN = nn.Module:extend("CharRNN")
function CharRNN:init(v, e, h, layers)
  self.embed = nn.Embedding(v, e)
  self.lstm = nn.LSTM(e, h, {num_layers = layers})
  self.head = nn.Linear(h, v)
end
function CharRNN:forward(x, h, c)   -- x [T, B] ids -> logits [T, B, V], h, c
  local out, h_n, c_n = self.lstm(self.embed(x), h, c)
  return self.head(out), h_n, c_n
end
local model = CharRNN(V, opt.embed, opt.hidden, opt.layers)
local optimizer = optim.Adam(model:parameters(), {lr = opt.lr, clip = clip.global_norm(opt.clip)})

-- training: truncated BPTT --------------------------------------------------
local h, c
local t0, t_log, last = args.now(), args.now(), 0
for step = 1, opt.steps do
  local x, y, restart = next_window()
  if restart then h, c = nil, nil end
  local logits
  logits, h, c = model(x, h, c)
  h, c = h:detach(), c:detach()
  local loss = nn.cross_entropy(logits:reshape{-1, V}, y:reshape{-1})
  optimizer:zero_grad()
  loss:backward()
  local r = optimizer:step()
  if step % opt.log_every == 0 or step == 1 or step == opt.steps then
    local t = args.now()
    print(("step %d/%d  loss %.4f  grad norm %.3f%s  %.0f chars/s"):format(step, opt.steps, loss:item(),
      r.grad_norm, r.clipped and " (clipped)" or "", (step - last) * T * B / math.max(t - t_log, 1e-3)))
    t_log, last = t, step
  end
end
print(("trained %d steps (%.1f passes over the text) in %.1f s"):format(
  opt.steps, opt.steps / per_pass, args.now() - t0))
keel.save(opt.out, model:state_dict(), {metadata = {script = "charrnn.lua", vocab = table.concat(ds.vocab)}})
print("saved the weights to " .. opt.out)

-- sampling -----------------------------------------------------------------
model:eval()
local out = {}
keel.no_grad(function()
  local id, hs, cs = ds.data[1], nil, nil
  for i = 1, opt.sample do
    local logits
    logits, hs, cs = model(keel.tensor({{id}}, {dtype = "int64"}), hs, cs)
    id = text.draw(logits:view{V}, opt.temperature)
    out[i] = ds.vocab[id]
  end
end)
print(("sample (temperature %.2f):"):format(opt.temperature))
print(ds.vocab[ds.data[1]] .. table.concat(out))
