-- scripts/regression.lua: fit a 2-layer MLP to a synthetic regression
-- task with hand-written SGD; the loss printed every `log_every` steps falls.
--   keel scripts/regression.lua [steps] [lr]
local keel = keel or require "keel"
local args = arg or {}

local opt = {
  steps = tonumber(args[1]) or 400,
  lr = tonumber(args[2]) or 0.1,
  n = 256, inputs = 4, hidden = 32,
  seed = 1234, log_every = 50,
}
assert(opt.steps >= 1, "steps must be at least 1")
keel.manual_seed(opt.seed)

-- data: y = tanh(x @ a) + x1 * 0.5 + noise, for x ~ N(0, 1)
local x = keel.randn{opt.n, opt.inputs}
local a = keel.randn{opt.inputs, 1}
local y = x:matmul(a):tanh() + x:narrow(2, 1, 1) * 0.5 + keel.randn{opt.n, 1} * 0.05

-- model: pred = tanh(x @ W1 + b1) @ W2 + b2
local function param(t) t.requires_grad = true; return t end
local W1 = param(keel.randn{opt.inputs, opt.hidden} * (1 / math.sqrt(opt.inputs)))
local b1 = param(keel.zeros{opt.hidden})
local W2 = param(keel.randn{opt.hidden, 1} * (1 / math.sqrt(opt.hidden)))
local b2 = param(keel.zeros{1})
local params = {W1, b1, W2, b2}

local function forward(input)
  return (input:matmul(W1) + b1):tanh():matmul(W2) + b2
end

-- training loop: mean squared error, plain SGD under no_grad
local first, last
for step = 1, opt.steps do
  local loss = ((forward(x) - y) ^ 2):mean()
  loss:backward()
  keel.no_grad(function()
    for _, p in ipairs(params) do
      p:sub_(p.grad * opt.lr)
      p.grad = nil
    end
  end)
  last = loss:item()
  first = first or last
  if step == 1 or step % opt.log_every == 0 or step == opt.steps then
    print(("step %4d  loss %.6f"):format(step, last))
  end
end

print(("final loss %.6f (from %.6f) after %d steps, lr %g"):format(last, first, opt.steps, opt.lr))
if not (last < first) then error("the loss did not fall") end
