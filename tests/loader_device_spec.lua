-- tests/loader_device_spec.lua: the DataLoader over CUDA datasets
-- (engine/loader.c, "Device datasets"): batches gathered on the device must
-- be the CPU loader's batches, value for value and in the same order, for
-- every loader feature (order, shuffle per epoch, drop_last, partial batch,
-- no labels, non-contiguous data, state/set_state, each transform alone and
-- in pipelines, crop padding after normalize). The CPU loader is the
-- reference; its datasets are made on the CPU explicitly, so the spec reads
-- the same under KEEL_DEVICE=cuda. Without the GPU (or the simulator
-- plugin) every test is a visible skip.
local H = require "helper"
local keel = H.keel
local data = keel.data
local T = data.transforms
local gpu_it = H.gpu_it(it, pending)

-- n rows of the given sample shape: float32 values with fractions (so the
-- transforms' arithmetic is compared, not just copies); labels 1..n.
local function cpu_dataset(n, shape)
  local full = {n}
  for _, s in ipairs(shape) do full[#full + 1] = s end
  local vals = H.values(H.numel(full), -3, 300, 17)
  return {x = keel.tensor(vals, {device = "cpu", dtype = "float32"}):reshape(full),
          y = keel.arange(1, n + 1, {device = "cpu"}):to("int64")}
end

local function on_cuda(ds)
  return {x = ds.x:to("cuda"), y = ds.y and ds.y:to("cuda") or nil}
end

-- Every batch of `epochs` epochs: {x table, y table or false, index}; checks
-- that each batch is on `device`.
local function run(loader, epochs, device)
  local out = {}
  for _ = 1, epochs do
    for xb, yb, i in loader:batches() do
      assert.are.equal(device, xb.device)
      if yb then assert.are.equal(device, yb.device) end
      out[#out + 1] = {xb:totable(), yb and yb:totable() or false, i}
    end
  end
  return out
end

-- The CPU and the CUDA loader over the same data and options agree exactly.
local function agree(ds, opts, epochs)
  local cpu = data.DataLoader(ds, opts)
  local dev = data.DataLoader(on_cuda(ds), opts)
  assert.are.equal(#cpu, #dev)
  local want = run(cpu, epochs or 2, "cpu")
  local got = run(dev, epochs or 2, "cuda")
  assert.are.same(want, got)
  assert.are.same(cpu:state(), dev:state())
  cpu:close()
  dev:close()
  return got
end

describe("DataLoader over CUDA datasets", function()
  gpu_it("gathers rows in order and shuffled per epoch, as the CPU loader", function()
    local ds = cpu_dataset(23, {3})
    local got = agree(ds, {batch_size = 5}, 2)
    assert.are.equal(10, #got)
    agree(ds, {batch_size = 5, shuffle = true, seed = 4}, 3)
    agree(ds, {batch_size = 23, shuffle = true, seed = 9}, 2)
    agree(ds, {batch_size = 64, shuffle = true, seed = 1}, 1)
  end)

  gpu_it("keeps or drops the partial batch and loads x without labels", function()
    local ds = cpu_dataset(10, {2, 2})
    agree(ds, {batch_size = 3}, 1)
    local got = agree(ds, {batch_size = 3, drop_last = true, shuffle = true, seed = 2}, 2)
    assert.are.equal(6, #got)
    local none = agree(ds, {batch_size = 11, drop_last = true}, 1)
    assert.are.same({}, none)
    local xs = agree({x = ds.x}, {batch_size = 4, shuffle = true, seed = 5}, 1)
    assert.are.equal(false, xs[1][2])
  end)

  gpu_it("reads non-contiguous x and y of any row shape", function()
    local base = keel.arange(0, 24, {device = "cpu"}):reshape{4, 6}:t()     -- [6, 4], transposed
    local y = keel.arange(0, 12, {device = "cpu"}):reshape{2, 6}:t():to("int64")
    agree({x = base, y = y}, {batch_size = 4, shuffle = true, seed = 3}, 2)
    -- a transposed view of device data
    local dx = keel.arange(0, 24, {device = "cpu"}):reshape{4, 6}:to("cuda"):t()
    assert.is_false(dx:is_contiguous())
    local want = run(data.DataLoader({x = base, y = y}, {batch_size = 4}), 1, "cpu")
    assert.are.same(want, run(data.DataLoader({x = dx, y = y:to("cuda")}, {batch_size = 4}), 1, "cuda"))
  end)

  gpu_it("state and set_state resume at the same batch", function()
    local ds = on_cuda(cpu_dataset(40, {2}))
    local opts = {batch_size = 6, shuffle = true, seed = 7}
    local a = data.DataLoader(ds, opts)
    run(a, 1, "cuda")
    local it = a:batches()
    it(); it()
    local s = a:state()
    assert.are.same({epoch = 2, cursor = 2, seed = 7}, s)
    local xr, yr, ir = it()
    local b = data.DataLoader(ds, opts)
    b:set_state(s)
    local xb, yb, ib = b:batches()()
    assert.are.equal(ir, ib)
    assert.are.same(xr:totable(), xb:totable())
    assert.are.same(yr:totable(), yb:totable())
    -- the CPU loader at the same position gives the same batch
    local c = data.DataLoader({x = ds.x:to("cpu"), y = ds.y:to("cpu")}, opts)
    c:set_state(s)
    local xc = c:batches()()
    assert.are.same(xc:totable(), xb:totable())
  end)

  gpu_it("to_float and normalize (one value, per channel) give the CPU's float32 values", function()
    local ds = cpu_dataset(9, {3, 2, 4})
    agree(ds, {batch_size = 4, transforms = {T.to_float()}}, 1)
    agree(ds, {batch_size = 4, transforms = {T.to_float(0.37), T.normalize(0.1307, 0.3081)}}, 1)
    agree(ds, {batch_size = 4, shuffle = true, seed = 8,
               transforms = {T.normalize({0.5, -1.25, 3}, {0.3, 2, 0.7}), T.to_float(3)}}, 1)
    local flat = cpu_dataset(7, {5})    -- rank-1 samples: one channel
    agree(flat, {batch_size = 3, transforms = {T.to_float(0.1), T.normalize(2, 3)}}, 1)
  end)

  gpu_it("random_crop with and without padding, [C, H, W] and [H, W] samples", function()
    agree(cpu_dataset(11, {2, 5, 6}), {batch_size = 4, shuffle = true, seed = 11,
      transforms = {T.random_crop({4, 3}, {padding = 2})}}, 3)
    agree(cpu_dataset(11, {5, 6}), {batch_size = 4, seed = 2,
      transforms = {T.random_crop(3)}}, 2)
    agree(cpu_dataset(5, {1, 3, 3}), {batch_size = 5, seed = 6,
      transforms = {T.random_crop(1, {padding = 1})}}, 4)
    -- padding after normalize: the frame is 0, not the normalized 0
    agree(cpu_dataset(6, {3, 4, 4}), {batch_size = 4, seed = 3,
      transforms = {T.to_float(), T.normalize({0.1, 0.2, 0.3}, {0.5, 0.6, 0.7}),
                    T.random_crop(5, {padding = 2})}}, 2)
  end)

  gpu_it("random_hflip per sample, p = 0 and p = 1, and the full pipeline", function()
    local ds = cpu_dataset(13, {2, 3, 5})
    local got = agree(ds, {batch_size = 13, seed = 21, transforms = {T.random_hflip(0.5)}}, 3)
    -- some samples flipped and some not in one batch: the select path
    local cpu = ds.x:totable()
    local flipped, kept = 0, 0
    for _, b in ipairs(got) do
      for k = 1, #b[1] do
        if H.close(b[1][k][1][1][1], cpu[k][1][1][1], 0, 0) then kept = kept + 1 else flipped = flipped + 1 end
      end
    end
    assert.is_true(flipped > 0 and kept > 0)
    agree(ds, {batch_size = 4, transforms = {T.random_hflip(1)}}, 1)
    agree(ds, {batch_size = 4, transforms = {T.random_hflip(0)}}, 1)
    agree(cpu_dataset(8, {4, 7}), {batch_size = 3, seed = 2, transforms = {T.random_hflip(0.5)}}, 2)
    agree(cpu_dataset(37, {2, 5, 6}), {batch_size = 5, shuffle = true, seed = 3,
      transforms = {T.to_float(0.5), T.normalize({1, 2}, {2, 4}),
                    T.random_crop({4, 5}, {padding = 2}), T.random_hflip(0.5)}}, 2)
    agree(cpu_dataset(9, {1, 6, 6}), {batch_size = 4, shuffle = true, seed = 12,
      transforms = {T.random_hflip(0.5), T.random_crop(4, {padding = 1}), T.random_hflip(0.5),
                    T.random_crop(3)}}, 2)
  end)

  gpu_it("batches are data: no graph even when the dataset requires grad", function()
    local x = keel.tensor(H.values(12, -1, 1, 3), {device = "cpu"}):reshape{4, 3}:to("cuda")
    x:requires_grad_(true)
    local loader = data.DataLoader({x = x}, {batch_size = 2, transforms = {T.to_float(2)}})
    for xb in loader:batches() do assert.is_false(xb.requires_grad) end
  end)

  gpu_it("moves one index per batch to the device and downloads nothing", function()
    local ds = on_cuda(cpu_dataset(12, {1, 4, 4}))
    local plain = data.DataLoader(ds, {batch_size = 4, shuffle = true, seed = 1})
    local tf = data.DataLoader(ds, {batch_size = 4, shuffle = true, seed = 1,
      transforms = {T.to_float(), T.normalize(0.5, 0.25)}})
    for _, loader in ipairs{plain, tf} do
      local it = loader:batches()
      it()   -- a first batch: the kernels' one-time uploads, if any
      local m0 = keel.cuda.memory_stats()
      local xb, yb = it()
      local m1 = keel.cuda.memory_stats()
      assert.is_not_nil(xb)
      assert.is_not_nil(yb)
      assert.are.equal(1, m1.h2d_copies - m0.h2d_copies)   -- the rows, shared by x and y
      assert.are.equal(0, m1.d2h_copies - m0.d2h_copies)   -- the index is checked on the host
    end
  end)

  gpu_it("refuses x and y on different devices, naming both", function()
    local ds = cpu_dataset(4, {2})
    H.assert_error(function() data.DataLoader({x = ds.x:to("cuda"), y = ds.y}) end,
      "DataLoader: x is on cuda and y on cpu, expected one device")
    H.assert_error(function() data.DataLoader({x = ds.x, y = ds.y:to("cuda")}) end,
      "DataLoader: x is on cpu and y on cuda, expected one device")
  end)

  gpu_it("checks the transforms against the sample shape as on the CPU", function()
    local x = cpu_dataset(4, {1, 4, 4}).x:to("cuda")
    H.assert_error(function() data.DataLoader({x = x}, {transforms = {T.random_crop(7, {padding = 1})}}) end,
      "random_crop: size 7x7 larger than the padded 6x6 sample")
    H.assert_error(function() data.DataLoader({x = x:to("int64")}, {transforms = {T.to_float()}}) end,
      "transforms need float32 x, got int64")
  end)
end)
