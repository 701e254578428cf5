-- bench/index_copies.lua: host<->device copies per training step when the
-- indices (token ids, class targets with and without ignore_index, gather
-- and index_select indices) were uploaded once with :cuda(). Prints
--   RESULT name=index_step_h2d value=<copies per step> unit=copies
--   RESULT name=index_step_d2h value=<copies per step> unit=copies
-- Run with the keel executable on a GPU, or on the CPU simulator:
--   KEEL_CUDA_PLUGIN=$PWD/build/release/lib/libkeel_cuda_sim.so build/release/bin/keel bench/index_copies.lua
package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
local B = require "common"
local keel = require "keel"
local nn, F = keel.nn, keel.nn.functional

local ok, why = keel.cuda.is_available()
if not ok then error("bench/index_copies.lua: CUDA is not available: " .. tostring(why), 0) end
keel.manual_seed(1)
local emb, head = nn.Embedding(50, 16), nn.Linear(16, 10)
emb:to("cuda")
head:to("cuda")
local i64 = {dtype = "int64"}
local ids = keel.tensor({{1, 5, 9, 2}, {7, 7, 3, 50}}, i64):cuda()
local tgt = keel.tensor({1, 2, 3, 4, 5, 6, 7, 8}, i64):cuda()
local ign = keel.tensor({1, -100, 3, 4, -100, 6, 7, 8}, i64):cuda()
local gi = keel.tensor({{1}, {3}, {2}, {10}, {4}, {5}, {6}, {7}}, i64):cuda()
local sel = keel.tensor({2, 4, 6}, i64):cuda()

local function step()
  local z = head(emb(ids):reshape{8, 16})
  local loss = F.cross_entropy(z, tgt) + F.cross_entropy(z, ign, {ignore_index = -100})
    + F.nll_loss(F.log_softmax(z, 2), tgt) + z:gather(2, gi):sum() + z:index_select(1, sel):sum()
  loss:backward()
end

step()   -- first use: parameters' gradients allocated
local n = B.scaled(10)
local m0 = keel.cuda.memory_stats()
for _ = 1, n do step() end
local m1 = keel.cuda.memory_stats()
B.result("index_step_h2d", (m1.h2d_copies - m0.h2d_copies) / n, "copies")
B.result("index_step_d2h", (m1.d2h_copies - m0.d2h_copies) / n, "copies")
