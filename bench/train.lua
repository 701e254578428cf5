-- bench/train.lua WHAT [batch]: training-step throughput of keel on the
-- issue #3 workloads, printed as RESULT lines; bench/train_torch.py is the
-- PyTorch twin of each (same model, batch, optimizer, synthetic data).
--
--   cnn [64|128]   DESIGN.md's MNIST CNN, Adam, global-norm clip 1.0 (img/s)
--   lstm           char LSTM: vocab 65, embedding 64, hidden 256, seq 64,
--                  batch 32, SGD momentum 0.9, global-norm clip 5 (tokens/s)
--   adamw          clip_grad_norm + AdamW over 10M float32 parameters in 50
--                  tensors (ms per step), against the least memory traffic
--                  a step needs: read p, g, m, v and write p, m, v is
--                  28 B per parameter, 40 B counting the separate clip pass
--                  PyTorch makes; a memcpy of 20 B per parameter moves 40 B
--                  (read + write), the peer BASELINE.md names
package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
local B = require "common"
local M = require "models"
local keel = require "keel"
local nn, optim, clip = keel.nn, keel.optim, keel.clip

local what, batch = arg[1] or "cnn", tonumber(arg[2] or "64")
local now = B.clock("wall")
local threads = os.getenv("OPENBLAS_NUM_THREADS") or "?"
keel.manual_seed(0)
-- KEEL_BENCH_PRECISION=bfloat16|float16|tf32: the float32 products of the
-- whole run at that matmul precision (autocast's rounding), named in the
-- results
local precision = os.getenv("KEEL_BENCH_PRECISION")
local tag = ""
if precision and precision ~= "" and precision ~= "highest" then
  keel.set_float32_matmul_precision(precision)
  tag = "_" .. precision
end

local function time_steps(step, warmup, reps, rounds)
  return B.time_steps(now, step, warmup, reps, rounds)
end

if what == "cnn" then
  local model = M.mnist_cnn()
  local opt = optim.Adam(model:parameters(), {lr = 1e-3, clip = clip.global_norm(1.0)})
  local x, y = keel.randn{batch, 1, 28, 28}, M.labels({batch}, 10)
  local s = time_steps(M.step(opt, function() return nn.cross_entropy(model(x), y) end), 3, B.scaled(10), 3)
  B.result(("train_cnn_b%d_t%s%s_keel"):format(batch, threads, tag), batch / s, "img/s")
elseif what == "lstm" then
  local c = M.LSTM
  local loss, params = M.char_lstm()
  local opt = optim.SGD(params, {lr = 0.1, momentum = 0.9, clip = clip.global_norm(5.0)})
  local xs, ys = M.labels({c.T, c.N}, c.V), M.labels({c.T, c.N}, c.V)
  local s = time_steps(M.step(opt, function() return loss(xs, ys) end), 2, B.scaled(5), 3)
  B.result(("train_lstm_t%s%s_keel"):format(threads, tag), c.T * c.N / s, "tokens/s")
elseif what == "adamw" then
  local total, n = 10 * 1000 * 1000, 50
  local params = {}
  for i = 1, n do
    local p = keel.randn({total // n}, {requires_grad = true})
    p.grad = keel.randn{total // n}
    params[i] = p
  end
  local opt = optim.AdamW(params, {lr = 1e-3, weight_decay = 1e-2, clip = clip.global_norm(1.0)})
  local s = time_steps(function() opt:step() end, 2, B.scaled(5), 3)
  local moved = 40 * total                       -- bytes of traffic, read + write
  local copy = B.lib.memcpy_time(moved // 2, 5)  -- a copy moves twice its size
  B.result(("clip_adamw_10M_t%s_keel"):format(threads), s * 1e3, "ms")
  B.result(("clip_adamw_10M_t%s_memcpy"):format(threads), copy * 1e3, "ms")
  B.result(("clip_adamw_10M_t%s_ratio"):format(threads), s / copy, "x_memcpy")
  B.result(("clip_adamw_10M_t%s_keel_bw"):format(threads), moved / s / 1e9, "GB/s")
else
  error("bench/train.lua: unknown workload " .. tostring(what) .. " (cnn, lstm, adamw)", 0)
end
