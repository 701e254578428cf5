-- scripts/stability/model.lua: the network of the pathological-task runs
-- (Pascanu, Mikolov and Bengio 2013): one tanh RNN layer (nn.RNN) and a
-- linear read-out, of the last step (target = "last") or of every step
-- (target = "all"); the task's loss and its error count.
--
--   local model = require "stability.model"
--   local m = model.new(task, {hidden = 50, init = "smart", rng = rng})
--   local out = m(x)                           -- [B, out] or [L, B, out]
--   local loss = model.loss(task, out, y)
--   local wrong = model.errors(task, out, y, tol)   -- sequences counted wrong
--   local err = model.evaluate(m, task, T, n, rng, tol)   -- fraction wrong, mean loss
--
-- Initialisations (opts.init):
--   "smart"   the 2013 paper's "smart tanh": W_hh sparse (15 non-zero
--             weights per unit, N(0, 0.01)) scaled to spectral radius 0.95,
--             W_ih and W_hy N(0, 0.01), biases 0
--   "basic"   the paper's "basic tanh": every weight N(0, 0.1), biases 0
--   "default" PyTorch's U(-1/sqrt(hidden), 1/sqrt(hidden)) everywhere
--   "orthogonal" W_hh a random orthogonal matrix (every singular value 1:
--             gradients neither shrink nor grow through the linear part
--             of a step), W_ih N(0, 1) (inputs large enough to push the
--             units out of tanh's linear range, where a marker can gate a
--             value); the rest as "default". explode.lua's choice: with
--             PyTorch's default the adding problem at T = 100 stays on its
--             plateau (the recurrent matrix's spectral radius ~0.58 makes
--             gradients vanish within a few tens of steps)
local keel = keel or require "keel"
local nn = keel.nn

local M = {}

local TaskRNN = nn.Module:extend("TaskRNN")

function TaskRNN:init(input_size, hidden, output_size, all_steps)
  self.rnn = nn.RNN(input_size, hidden, {nonlinearity = "tanh"})
  self.head = nn.Linear(hidden, output_size)
  self.all_steps = all_steps
end

function TaskRNN:forward(x)
  local out = self.rnn(x)                         -- [L, B, H]
  if self.all_steps then return self.head(out) end
  return self.head(out:select(1, out.shape[1]))   -- the last step: [B, H] -> [B, out]
end

-- The spectral radius of a square matrix: Gelfand's formula
-- rho = lim ||W^k||^(1/k), with k = 2^12 reached by repeated squaring
-- (renormalised at every squaring, in float64). Eigen-solvers are not
-- needed for one number, and power iteration fails on the complex
-- conjugate pairs a random non-symmetric matrix has.
function M.spectral_radius(w)
  local m, log_scale = w:double(), 0
  for _ = 1, 12 do
    local n = m:norm():item()
    if n == 0 then return 0 end
    m = m / n
    log_scale = 2 * (log_scale + math.log(n))
    m = m:matmul(m)
  end
  return math.exp((log_scale + math.log(m:norm():item())) / 4096)
end

local function set(p, t) p:copy_(t) end

function M.initialise(m, kind, rng)
  if kind == "default" then return end
  local rnn, head = m.rnn, m.head
  local H, I = rnn.hidden_size, rnn.input_size
  keel.no_grad(function()
    if kind == "orthogonal" then
      nn.init.orthogonal_(rnn.weight_hh_l0)
      set(rnn.weight_ih_l0, keel.randn{H, I})
      return
    end
    if kind == "basic" then
      set(rnn.weight_hh_l0, keel.randn{H, H} * 0.1)
      set(rnn.weight_ih_l0, keel.randn{H, I} * 0.1)
      set(head.weight, keel.randn(head.weight.shape) * 0.1)
    elseif kind == "smart" then
      -- 15 non-zero recurrent weights per unit (all when H <= 15)
      local keep = math.min(15, H)
      local mask = {}
      for i = 0, H - 1 do
        local perm = {}
        for j = 1, H do perm[j] = j; mask[i * H + j] = 0 end
        for j = 1, keep do            -- a partial Fisher-Yates shuffle
          local k = j + rng:int(H - j + 1)
          perm[j], perm[k] = perm[k], perm[j]
          mask[i * H + perm[j]] = 1
        end
      end
      local w = keel.randn{H, H} * 0.01 * keel.tensor(mask):view(H, H)
      set(rnn.weight_hh_l0, w * (0.95 / M.spectral_radius(w)))
      set(rnn.weight_ih_l0, keel.randn{H, I} * 0.01)
      set(head.weight, keel.randn(head.weight.shape) * 0.01)
    else
      error(("stability.model: init: expected \"smart\", \"basic\", \"orthogonal\" or \"default\", got %s"):format(tostring(kind)), 0)
    end
    rnn.bias_ih_l0:zero_()
    rnn.bias_hh_l0:zero_()
    head.bias:zero_()
  end)
end

-- model.new(task, {hidden = 50, init = "smart", rng = rng}); keel's RNG
-- draws the weights, rng the sparsity pattern of "smart".
function M.new(task, opts)
  opts = opts or {}
  local m = TaskRNN(task.input_size, opts.hidden or 50, task.output_size, task.target == "all")
  M.initialise(m, opts.init or "smart", opts.rng)
  return m
end

-- MSE for regression (the 2013 code's mean over the batch of the squared
-- error), cross-entropy for classification (averaged over every step for
-- target = "all").
function M.loss(task, out, y)
  if task.kind == "regression" then return nn.mse_loss(out, y) end
  if task.target == "all" then
    return nn.cross_entropy(out:reshape{-1, task.output_size}, y:reshape{-1})
  end
  return nn.cross_entropy(out, y)
end

-- The number of sequences of the batch counted wrong: |pred - target| >
-- tol (regression), a wrong argmax (classification; any wrong step of the
-- sequence for target = "all").
function M.errors(task, out, y, tol)
  if task.kind == "regression" then
    return (out - y):abs():gt(tol):sum():item()
  end
  if task.target == "all" then
    return out:argmax(3):ne(y):sum(1):gt(0):sum():item()
  end
  return out:argmax(2):ne(y):sum():item()
end

-- The fraction of n fresh sequences counted wrong and their mean loss,
-- in chunks of 1000 (as the 2013 code's evaluation batches).
function M.evaluate(m, task, T, n, rng, tol)
  local wrong, loss_sum, done = 0, 0, 0
  local was_training = m.training
  m:eval()
  keel.no_grad(function()
    while done < n do
      local b = math.min(1000, n - done)
      local x, y = task.sample(b, T, rng)
      local out = m(x)
      wrong = wrong + M.errors(task, out, y, tol)
      loss_sum = loss_sum + M.loss(task, out, y):item() * b
      done = done + b
    end
  end)
  if was_training then m:train() end
  return wrong / n, loss_sum / n
end

return M
