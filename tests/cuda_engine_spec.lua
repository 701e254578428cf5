--
-- tests/cuda_engine_spec.lua: the engine paths around the kernels with
-- CUDA tensors: anomaly detection names the op on the device, histograms
-- of device tensors (the monitor's), prod's backward and 0-d arg
-- reductions, device index tensors and class targets (checked on the
-- host, read by the kernels where they are), and optimizer statistics
-- that are gathered with one wait for all parameters. Run on a GPU, or on
-- the CUDA simulator (tools/test.sh); visible skips elsewhere.
--
local H = require "helper"
local D = require "devcheck"
local keel = H.keel
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local nn = keel.nn
local F = nn.functional
local ag = keel.autograd
local hooks = require "keel.hooks"
local gpu_it = H.gpu_it(it, pending)

local function record(fn)
  local events = {}
  local h = hooks.on("anomaly", function(ev) events[#events + 1] = ev end)
  local ok, err = pcall(fn)
  h:remove()
  return events, ok, err
end

-- Class targets t written on the device after their upload: the host copy
-- is stale, so cross_entropy's check downloads t (once) and sees the values.
local function stale_targets_download(x, t)
  t:add_(10)
  local m = keel.cuda.memory_stats()
  local ok, err = pcall(F.cross_entropy, x, t)
  assert.is_false(ok)
  assert.matches("out of range", err)
  assert.are.equal(m.d2h_copies + 1, keel.cuda.memory_stats().d2h_copies)
end

describe("CUDA tensors in the engine's own paths", function()
  after_each(function()
    ag.detect_anomaly(false)
    ag.clear_anomaly()
  end)

  gpu_it("anomaly detection names the op that made the first Inf on the device, forward and backward", function()
    ag.detect_anomaly(true, {mode = "record"})
    local x = keel.tensor({{1, -2, 3}}):cuda():requires_grad_(true)
    local events = record(function() (x:log() * 2):sum():backward() end)
    assert.are.equal(1, #events)
    assert.are.equal("forward", events[1].phase)
    assert.are.equal("log", events[1].op)
    assert.are.equal(1, events[1].nan)

    ag.clear_anomaly()
    local z = keel.tensor({{0, 4}}):cuda():requires_grad_(true)
    local y = z:sqrt()
    assert.is_nil(ag.anomaly())
    events = record(function() y:sum():backward() end)
    assert.are.equal(1, #events)
    assert.are.equal("backward", events[1].phase)
    assert.are.equal("sqrt", events[1].op)
    assert.are.equal(1, events[1].inf)
  end)

  gpu_it("histograms of device tensors equal the CPU's", function()
    local S = require("keel.core")._summary
    local t = keel.randn{1000}
    local hc = S.histogram(t, {bins = 12})
    local hd = S.histogram(t:cuda(), {bins = 12})
    assert.are.same(hc, hd)
    -- a strided device view too
    local m = keel.randn{20, 30}
    assert.are.same(S.histogram(m:t(), {bins = 5}), S.histogram(m:cuda():t(), {bins = 5}))
  end)

  gpu_it("prod's gradient and 0-d argmax on the device", function()
    local a = keel.tensor({{1.5, 0, 2}, {-1, 3, 0.5}}, {dtype = "float64"})
    local ac = a:clone():requires_grad_(true)
    local ad = a:cuda():requires_grad_(true)
    ac:prod(2):sum():backward()
    ad:prod(2):sum():backward()
    H.assert_close(ad.grad:cpu(), ac.grad:totable(), 1e-12)
    local s = keel.tensor(4):cuda()
    assert.are.equal(1, s:argmax(1):item())
    assert.are.equal("cuda", s:argmax(1).device)
  end)

  gpu_it("index tensors may sit on either device; their values are checked", function()
    local a = keel.randn{4, 5}
    local idx = keel.tensor({{1, 5, 2}, {4, 4, 1}}, {dtype = "int64"})
    local want = a:gather(2, idx):totable()
    local ad = a:cuda()
    H.assert_close(ad:gather(2, idx):cpu(), want, 0)          -- host index
    H.assert_close(ad:gather(2, idx:cuda()):cpu(), want, 0)   -- device index
    H.assert_error_match(function() ad:gather(2, keel.tensor({{6}}, {dtype = "int64"}):cuda()) end,
                         "gather: index 6 out of range")
    -- max(dim)'s device positions feed its backward (scatter_add)
    local x = keel.tensor({{1, 7, 3}, {9, 2, 8}}):cuda():requires_grad_(true)
    local v, i = x:max(2)
    assert.are.same({2, 1}, i:cpu():totable())
    v:sum():backward()
    assert.are.same({{0, 1, 0}, {1, 0, 0}}, x.grad:cpu():totable())
  end)

  gpu_it("class targets on the device are checked on the host, with the CPU's message", function()
    local x = keel.randn{3, 4}
    local y = keel.tensor({1, 4, 2}, {dtype = "int64"})
    H.assert_close(F.cross_entropy(x:cuda(), y:cuda()):cpu(), F.cross_entropy(x, y):totable(), 1e-5)
    local _, ecpu = pcall(F.cross_entropy, x, keel.tensor({1, 5, 2}, {dtype = "int64"}))
    local _, ecuda = pcall(F.cross_entropy, x:cuda(), keel.tensor({1, 5, 2}, {dtype = "int64"}):cuda())
    assert.is_truthy(tostring(ecpu):find("out of range", 1, true), ecpu)
    assert.are.equal(tostring(ecpu):match("cross_entropy:.*"), tostring(ecuda):match("cross_entropy:.*"))
    -- a target on the other device is a mixing error
    H.assert_error_match(function() F.cross_entropy(x:cuda(), y) end, "cpu")
  end)

  gpu_it("a step over many device parameters: statistics and update sizes arrive for every one", function()
    keel.manual_seed(2)
    local ps, cs = {}, {}
    for i = 1, 12 do
      local p = keel.randn({7 + i})
      cs[i] = p:clone():requires_grad_(true)
      ps[i] = p:cuda():requires_grad_(true)
      local g = keel.randn({7 + i})
      cs[i].grad = g
      ps[i].grad = g:cuda()
    end
    local oc = keel.optim.AdamW(cs, {lr = 0.01, clip = keel.clip.global_norm(0.5)})
    local od = keel.optim.AdamW(ps, {lr = 0.01, clip = keel.clip.global_norm(0.5)})
    local rc, rd = oc:step(), od:step()
    assert.are.equal(rc.grad_norm, rd.grad_norm)
    local sc, sd = oc:grad_stats(), od:grad_stats()
    for i = 1, 12 do
      H.assert_close(ps[i]:cpu(), cs[i]:totable(), {atol = 1e-6, rtol = 1e-6})
      assert.is_true(sd[i].update_ratio > 0, "update ratio of parameter " .. i)
      H.assert_close(sd[i].update_ratio, sc[i].update_ratio, 1e-6)
      H.assert_close(sd[i].norm, sc[i].norm, 1e-9)
    end
  end)

  gpu_it("safetensors and checkpoints save device tensors and load them back onto the model's device", function()
    local p = os.tmpname()
    local t = {a = keel.randn{3, 4}:cuda(), b = keel.arange(0, 6):reshape{2, 3}:cuda():t(),
               i = keel.tensor({1, -2}, {dtype = "int64"}):cuda()}
    keel.save(p, t)
    local back = keel.load(p)
    for k, v in pairs(t) do
      assert.are.equal("cpu", back[k].device)
      assert.are.same(v:cpu():totable(), back[k]:totable(), k)
    end
    -- a CUDA model and its optimizer, saved and restored into fresh ones
    keel.manual_seed(4)
    local model = nn.Linear(3, 2)
    model:to("cuda")
    local opt = keel.optim.Adam(model:parameters(), {lr = 0.01})
    model(keel.randn{5, 3}:cuda()):sum():backward()
    opt:step()
    keel.checkpoint.save(p, {model = model, optimizer = opt, step = 1})
    local m2 = nn.Linear(3, 2)
    m2:to("cuda")
    local o2 = keel.optim.Adam(m2:parameters(), {lr = 0.01})
    keel.checkpoint.load(p, {model = m2, optimizer = o2})
    os.remove(p)
    assert.are.equal("cuda", m2.weight.device)
    assert.are.same(model.weight:cpu():totable(), m2.weight:cpu():totable())
    -- the next steps agree: the optimizer state came back where its parameter is
    for _, pair in ipairs {{model, opt}, {m2, o2}} do
      pair[2]:zero_grad()
      pair[1](keel.ones{2, 3}:cuda()):sum():backward()
      pair[2]:step()
    end
    H.assert_close(m2.weight:cpu(), model.weight:cpu():totable(), 0)
  end)

  gpu_it("host-to-device copies that do not wait land intact, through many laps of the staging ring", function()
    -- 16 MiB of pinned ring: 240 uploads of 75,000 floats (300 KB) go round
    -- it about four times, each overwriting the source it came from at
    -- once; one upload past half the ring takes the synchronous road.
    local up, n = {}, 75000
    local src = keel.empty{n}
    for i = 1, 240 do
      src:fill_(i)
      up[i] = src:cuda()
    end
    local big = keel.arange(3000000, {dtype = "float32"})
    local bup = big:cuda()
    for i = 1, 240, 17 do
      local t = up[i]:cpu()
      assert.are.equal(i * n, t:sum():item())
      assert.are.equal(i, t:min():item())
      assert.are.equal(i, t:max():item())
    end
    for i = 1, 240 do assert.are.equal(i * n, up[i]:sum():item(), i) end
    assert.are.equal(0, (bup:cpu() - big):abs():max():item())
    -- class targets are uploaded the same way (checked, then staged)
    local x = keel.randn{4, 3}:cuda()
    local losses = {}
    for k = 1, 3 do
      losses[k] = F.cross_entropy(x, keel.tensor({k, k, k, k}, {dtype = "int64"}):cuda(), {reduction = "sum"})
    end
    for k = 1, 3 do
      local want = F.cross_entropy(x:cpu(), keel.tensor({k, k, k, k}, {dtype = "int64"}), {reduction = "sum"})
      assert.is_true(math.abs(losses[k]:item() - want:item()) < 1e-4, k)
    end
  end)

  gpu_it("uploaded class targets and token ids are checked from their host copy, without a download", function()
    local i64 = {dtype = "int64"}
    local x = keel.randn{4, 3}:cuda():requires_grad_(true)
    local t = keel.tensor({1, 2, 3, 1}, i64):cuda()
    local emb = nn.Embedding(5, 2)
    emb:to("cuda")
    local ids = keel.tensor({{1, 2}, {3, 5}}, i64):cuda()
    local m0 = keel.cuda.memory_stats()
    local loss = F.cross_entropy(x, t) + emb(ids):sum() + x:gather(2, t:view(4, 1)):sum()
    loss:backward()
    local m1 = keel.cuda.memory_stats()
    assert.are.equal(m0.d2h_copies, m1.d2h_copies)
    assert.are.equal(m0.h2d_copies, m1.h2d_copies)   -- the kernels read the uploaded tensors themselves
    local want = F.cross_entropy(x:cpu(), t:cpu()) + emb.weight:cpu():index_select(1, ids:cpu():view(4)):sum() +
      x:cpu():gather(2, t:cpu():view(4, 1)):sum()
    assert.is_true(math.abs(loss:item() - want:item()) < 1e-5)
    -- a view reads its own elements of the host copy
    local t6 = keel.tensor({3, 1, 2, 2, 1, 3}, i64):cuda()
    local sub = t6:narrow(1, 2, 4)
    local m2 = keel.cuda.memory_stats()
    local l2 = F.cross_entropy(x, sub, {reduction = "none"})
    assert.are.equal(m2.d2h_copies, keel.cuda.memory_stats().d2h_copies)
    H.assert_close(l2:cpu(), F.cross_entropy(x:cpu(), keel.tensor({1, 2, 2, 1}, i64), {reduction = "none"}):totable(),
      1e-5)
    stale_targets_download(x, t)
    ids:fill_(9)
    local ok, err = pcall(emb, ids)
    assert.is_false(ok)
    assert.matches("out of range", tostring(err))
  end)

  -- where's number operands become 0-d tensors on the other operands'
  -- device, whichever device is the default
  gpu_it("where with number operands on either device, under either default device", function()
    local x = keel.tensor({{1, -2, 3}, {-4, 5, -6}})
    local want = {{1, 0, 3}, {0, 5, 0}}
    for _, default in ipairs {"cpu", "cuda"} do
      local prev = keel.set_default_device(default)
      local ok, err = pcall(function()
        for _, dev in ipairs {"cpu", "cuda"} do
          local xd = x:to(dev)
          local r = keel.where(xd:gt(0), xd, 0)
          assert.are.equal(dev, r.device)
          assert.are.same(want, r:cpu():totable())
          local r2 = keel.where(xd:gt(0), 1.5, -0.5)
          assert.are.equal(dev, r2.device)
          assert.are.same({{1.5, -0.5, 1.5}, {-0.5, 1.5, -0.5}}, r2:cpu():totable())
          local r3 = keel.where(xd:gt(0), 2, xd:double())
          assert.are.equal("float64", r3.dtype)
          assert.are.equal(dev, r3.device)
        end
      end)
      keel.set_default_device(prev)
      assert(ok, err)
    end
    H.assert_error_match(function() keel.where(x:gt(0), 0, "a") end, "where: argument #3")
  end)

  -- keel.tensor and arange on a CUDA default device make the values on the
  -- host and upload them once: an int64 one keeps them as to("cuda") does,
  -- so a target or id made that way is checked without a download.
  gpu_it("int64 tensors made on a CUDA default device are checked from their host copy", function()
    local i64 = {dtype = "int64"}
    local x = keel.randn{4, 3}:cuda():requires_grad_(true)
    local emb = nn.Embedding(5, 2)
    emb:to("cuda")
    local prev = keel.set_default_device("cuda")
    local ok, err = pcall(function()
      local t = keel.tensor({1, 2, 3, 1}, i64)
      local ids = keel.arange(1, 5, 1, i64):view(2, 2)
      assert.are.equal("cuda", t.device)
      assert.are.equal("cuda", ids.device)
      local m0 = keel.cuda.memory_stats()
      local loss = F.cross_entropy(x, t) + emb(ids):sum() + x:gather(2, t:view(4, 1)):sum()
      loss:backward()
      local m1 = keel.cuda.memory_stats()
      assert.are.equal(m0.d2h_copies, m1.d2h_copies)
      assert.are.equal(m0.h2d_copies, m1.h2d_copies)
      local want = F.cross_entropy(x:cpu(), t:cpu()) + emb.weight:cpu():index_select(1, ids:cpu():view(4)):sum() +
        x:cpu():gather(2, t:cpu():view(4, 1)):sum()
      assert.is_true(math.abs(loss:item() - want:item()) < 1e-5)
      -- a float tensor keeps nothing: its values are the device's alone
      local f = keel.tensor({1, 2}, {dtype = "float64"})
      assert.are.equal("cuda", f.device)
      assert.are.same({1, 2}, f:cpu():totable())
      stale_targets_download(x, t)
    end)
    keel.set_default_device(prev)
    assert(ok, err)
  end)

  -- A training step over uploaded int64 indices: the kernels read them where
  -- they are (index base and ignored value passed along), so no step, forward
  -- or backward, copies an index either way; results are the CPU's.
  gpu_it("a training step on uploaded indices copies no index to or from the device, and matches the CPU", function()
    local i64 = {dtype = "int64"}
    local ix_cpu = {
      ids = keel.tensor({{1, 2, 3}, {4, 6, 6}}, i64),
      t = keel.tensor({1, 5, 3, 2, 4, 1}, i64),
      t_in = keel.tensor({1, 3, 3, 2, 4, 3}, i64),      -- ignore_index 3: a valid class, ignored before rebasing
      t_neg = keel.tensor({1, -100, 3, -100, 4, 1}, i64),
      gi = keel.tensor({{2, 1}, {1, 1}, {5, 4}, {5, 2}, {3, 3}, {4, 5}}, i64),
      sel = keel.tensor({3, 1, 3}, i64),
    }
    local function build(dev)
      keel.manual_seed(11)
      local emb, lin = nn.Embedding(6, 4), nn.Linear(4, 5)
      if dev then emb:to(dev); lin:to(dev) end
      return emb, lin
    end
    local function step(emb, lin, ix)
      local z = lin(emb(ix.ids):view(6, 4))
      local loss = F.cross_entropy(z, ix.t) +
        F.cross_entropy(z, ix.t_in, {ignore_index = 3, label_smoothing = 0.1}) +
        F.cross_entropy(z, ix.t_neg, {ignore_index = -100, reduction = "sum"}) +
        F.nll_loss(F.log_softmax(z, 2), ix.t_in, {ignore_index = 3}) +
        z:gather(2, ix.gi):pow(2):sum() + z:index_select(1, ix.sel):sum() + z:index_select(2, ix.sel):mean()
      loss:backward()
      return loss
    end
    local emb_c, lin_c = build()
    local emb_d, lin_d = build("cuda")
    local ix_dev = {}
    for k, v in pairs(ix_cpu) do ix_dev[k] = v:cuda() end
    local loss_c, loss_d
    for s = 1, 3 do
      loss_c = step(emb_c, lin_c, ix_cpu)
      local m0 = keel.cuda.memory_stats()
      loss_d = step(emb_d, lin_d, ix_dev)
      local m1 = keel.cuda.memory_stats()
      assert.are.equal(m0.h2d_copies, m1.h2d_copies, "step " .. s .. ": uploads")
      assert.are.equal(m0.d2h_copies, m1.d2h_copies, "step " .. s .. ": downloads")
      H.assert_close(loss_d:item(), loss_c:item(), 1e-4, "step " .. s .. ": loss")
    end
    -- three steps' accumulated gradients
    local tol = D.tol.float32
    H.assert_close(emb_d.weight.grad:cpu(), emb_c.weight.grad:totable(), tol.rtol, "embedding gradient")
    H.assert_close(lin_d.weight.grad:cpu(), lin_c.weight.grad:totable(), tol.rtol, "linear gradient")
    H.assert_close(lin_d.bias.grad:cpu(), lin_c.bias.grad:totable(), tol.rtol, "bias gradient")
  end)

  gpu_it("device indices of any strides go to the kernels as they are, results as the CPU's", function()
    -- int64 values in 1..hi, deterministic
    local function ix(shape, hi, seed)
      local v, r = {}, H.rng(seed)
      for k = 1, H.numel(shape) do v[k] = 1 + math.floor(r() * hi) end
      return keel.tensor(v, {dtype = "int64"}):reshape(shape)
    end
    for _, dt in ipairs({"float32", "float64"}) do
      local o = {tol = D.tol[dt]}
      local x = D.input({7, 5}, dt)
      -- the index inputs reach the CUDA side as device tensors: transposed,
      -- expanded (zero strides), narrowed (an offset), a strided 1-D, a 0-d
      D.check(function(a, i) return a:gather(2, i:t()) end, {x, ix({5, 7}, 5, 1)}, o)
      D.check(function(a, i) return a:gather(1, i:expand({4, 5})) end, {x, ix({1, 5}, 7, 2)}, o)
      D.check(function(a, i) return a:gather(2, i:narrow(2, 2, 3)) end, {x, ix({7, 4}, 5, 3)}, o)
      D.check(function(a, src, i) return a:scatter_add(1, i:t(), src) end,
              {x, D.input({5, 5}, dt, {seed = 4}), ix({5, 5}, 7, 4)}, o)
      D.check(function(a, i) return a:index_select(1, i:select(2, 2)) end, {x, ix({6, 2}, 7, 5)}, o)
      D.check(function(a, i) return a:index_select(2, i:select(1, 3)) end, {x, ix({4}, 5, 6)}, o)
      -- embedding and class losses read dense indices: a strided one is copied on the device
      D.check(function(w, i) return F.embedding(i:t(), w) end, {D.input({9, 4}, dt), ix({3, 5}, 9, 7)}, o)
      D.check(function(w, i) return F.embedding(i:t(), w, 2) end, {D.input({9, 4}, dt), ix({3, 5}, 9, 8)}, o)
      D.check(function(a, t) return F.cross_entropy(a, t:select(2, 1), {ignore_index = 2, reduction = "none"}) end,
              {D.input({6, 5}, dt), ix({6, 2}, 5, 9)}, o)
      D.check(function(a, t) return F.cross_entropy(a, t:select(2, 1), {ignore_index = 2, label_smoothing = 0.2}) end,
              {D.input({6, 5}, dt), ix({6, 2}, 5, 9)}, o)
      D.check(function(a, t) return F.nll_loss(a, t:t(), {ignore_index = 4}) end, {D.input({2, 5, 3}, dt), ix({3, 2}, 5, 10)},
              o)
      -- whole-valued float targets take the converting path (uploaded once)
      D.check(function(a, t) return F.cross_entropy(a, t, {ignore_index = 5}) end,
              {D.input({4, 5}, dt), keel.tensor({1, 5, 2, 2}, {dtype = dt})}, o)
    end
  end)

  gpu_it("CPU indices with CUDA data are uploaded once per op; backward reuses the upload", function()
    local i64 = {dtype = "int64"}
    local gi, sel = keel.tensor({{2}, {1}, {3}, {3}}, i64), keel.tensor({4, 1}, i64)
    local x = keel.randn{4, 3}
    local xd = x:cuda():detach():requires_grad_(true)
    x:requires_grad_(true)
    local emb = nn.Embedding(5, 2)
    local w = emb.weight:detach():clone()
    emb:to("cuda")
    local m0 = keel.cuda.memory_stats()
    local loss = xd:gather(2, gi):sum() + xd:index_select(1, sel):sum() + emb(sel):pow(2):sum()
    local m1 = keel.cuda.memory_stats()
    loss:backward()
    local m2 = keel.cuda.memory_stats()
    assert.are.equal(3, m1.h2d_copies - m0.h2d_copies)   -- one per op
    assert.are.equal(0, m2.h2d_copies - m1.h2d_copies)   -- backward: none
    assert.are.equal(m0.d2h_copies, m2.d2h_copies)       -- and nothing downloaded to check them again
    local want = x:gather(2, gi):sum() + x:index_select(1, sel):sum() + w:index_select(1, sel):pow(2):sum()
    want:backward()
    H.assert_close(loss:item(), want:item(), 1e-5)
    H.assert_close(xd.grad:cpu(), x.grad:totable(), 1e-6)
  end)

  gpu_it("an index made on the device is downloaded for its check once: backward's check reuses it", function()
    local x = keel.randn{6, 5}
    local xd = x:cuda():detach():requires_grad_(true)
    x:requires_grad_(true)
    local idx = xd:detach():argmax(2, true)          -- int64 [6, 1], made on the device
    local m0 = keel.cuda.memory_stats()
    local y = xd:gather(2, idx):sum() + xd:index_select(1, idx:view(6)):sum()
    local m1 = keel.cuda.memory_stats()
    y:backward()
    local m2 = keel.cuda.memory_stats()
    assert.are.equal(1, m1.d2h_copies - m0.d2h_copies)   -- the first check downloads
    assert.are.equal(0, m2.d2h_copies - m1.d2h_copies)   -- the others read that copy
    assert.are.equal(0, m2.h2d_copies - m0.h2d_copies)   -- and nothing goes up
    local hi = x:detach():argmax(2, true)
    local want = x:gather(2, hi):sum() + x:index_select(1, hi:view(6)):sum()
    want:backward()
    H.assert_close(y:item(), want:item(), 1e-5)
    H.assert_close(xd.grad:cpu(), x.grad:totable(), 1e-6)
    -- a change of the values makes the copy stale: the next check downloads
    idx:fill_(1)
    local m3 = keel.cuda.memory_stats()
    xd:gather(2, idx)
    assert.are.equal(1, keel.cuda.memory_stats().d2h_copies - m3.d2h_copies)
  end)

  gpu_it("a training loop keeps device memory bounded and host memory flat without collectgarbage()", function()
    -- uploads of a batch and labels every step, embedding ids, a device-decided
    -- AdamW step: staging, host copies of indices and the optimizer's
    -- pending results must not pile up
    keel.manual_seed(4)
    local emb, l1, l2 = nn.Embedding(20, 8), nn.Linear(16, 32), nn.Linear(32, 5)
    local params = {}
    for _, m in ipairs{emb, l1, l2} do
      m:to("cuda")
      for _, p in ipairs(m:parameters()) do params[#params + 1] = p end
    end
    local opt = keel.optim.AdamW(params, {lr = 1e-3, clip = keel.clip.global_norm(1.0), nonfinite = "skip"})
    local function step()
      local ids = ((keel.rand{4, 2} * 20):long():clamp(0, 19) + 1):cuda()
      local y = ((keel.rand{4} * 5):long():clamp(0, 4) + 1):cuda()
      local x = keel.randn{4, 8}:cuda()
      local h = keel.cat({emb(ids):mean(2), x}, 2)
      local loss = F.cross_entropy(l2(l1(h):relu()), y)
      opt:zero_grad()
      loss:backward()
      opt:step()
    end
    for _ = 1, 50 do step() end
    collectgarbage()
    local a0, rss0, peak = keel.cuda.memory_stats().allocated_bytes, H.rss_bytes(), 0
    for _ = 1, 400 do
      step()
      peak = math.max(peak, keel.cuda.memory_stats().allocated_bytes)
    end
    -- the GC frees dropped tensors as it goes (the binding tells it their
    -- device bytes): a bounded lag, and nothing kept once collected
    assert.is_true(peak < a0 + 2 ^ 20, ("device bytes in use %d at rest, %d at the peak"):format(a0, peak))
    collectgarbage()
    assert.are.equal(a0, keel.cuda.memory_stats().allocated_bytes)
    local rss1 = H.rss_bytes()
    -- (not under AddressSanitizer: its quarantine keeps freed host memory)
    if rss0 and rss1 and not (os.getenv("LD_PRELOAD") or ""):find("asan", 1, true) then
      assert.is_true(rss1 - rss0 < 4 * 2 ^ 20, ("host RSS grew by %.1f MB"):format((rss1 - rss0) / 2 ^ 20))
    end
  end)
end)
