-- The DataLoader and its transforms (engine/loader.c, keel/data_loader.lua).
local H = require "helper"
local keel = H.keel

local data
do
  local ok, d = pcall(require, "keel.data")
  data = (ok and type(d) == "table" and d.DataLoader) and d or require "keel.data_loader"
end
local T = data.transforms

-- {======================================================================
-- Lua re-implementation of the loader's documented RNG (keel.h)
-- =======================================================================

local G = 0x9E3779B97F4A7C15
local function stream(seed, epoch, pos)
  local s = seed * G + epoch * 0xBF58476D1CE4E5B9 + (pos + 1) * 0x94D049BB133111EB
  return function()
    s = s + G
    local z = s
    z = (z ~ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ~ (z >> 27)) * 0x94D049BB133111EB
    return z ~ (z >> 31)
  end
end
local function rint(r, n) return (r() >> 11) % n end
local function runit(r) return (r() >> 11) * 2.0 ^ -53 end

local function ref_order(n, seed, epoch, shuffle)
  local o = {}
  for i = 1, n do o[i] = i end
  if shuffle then
    local r = stream(seed, epoch, -1)
    for i = n - 1, 1, -1 do
      local j = rint(r, i + 1)
      o[i + 1], o[j + 1] = o[j + 1], o[i + 1]
    end
  end
  return o
end

-- }======================================================================

-- x[i] = rows whose every value identifies the row; y = 1..N.
local function dataset(n, shape)
  shape = shape or {2}
  local per = H.numel(shape)
  local full = {n}
  for _, s in ipairs(shape) do full[#full + 1] = s end
  return {
    x = keel.arange(0, n * per):reshape(full),
    y = keel.arange(1, n + 1):to("int64"),
    n = n,
  }
end

-- All labels of one epoch, in order, and the batch sizes.
local function epoch_labels(loader)
  local ys, sizes = {}, {}
  for _, yb in loader:batches() do
    sizes[#sizes + 1] = yb.shape[1]
    for _, v in ipairs(H.flat(yb)) do ys[#ys + 1] = v end
  end
  return ys, sizes
end

local function range(n) local r = {} for i = 1, n do r[i] = i end return r end

describe("DataLoader order", function()
  it("visits 1..N in order without shuffle, x rows matching y", function()
    local ds = dataset(10, {3})
    local loader = data.DataLoader(ds, {batch_size = 4})
    assert.are.equal(3, #loader)
    assert.are.equal(3, loader:num_batches())
    local k = 0
    for xb, yb, i in loader:batches() do
      k = k + 1
      assert.are.equal(k, i)
      local xs, ys = H.flat(xb), H.flat(yb)
      for r = 1, #ys do
        for c = 1, 3 do assert.are.equal((ys[r] - 1) * 3 + c - 1, xs[(r - 1) * 3 + c]) end
      end
    end
    assert.are.equal(3, k)
    local ys = epoch_labels(loader)   -- the second epoch, still in order
    assert.are.same(range(10), ys)
    loader:close()
  end)

  it("shuffles deterministically from the seed, per epoch, as documented", function()
    local ds = dataset(50)
    local a = data.DataLoader(ds, {batch_size = 7, shuffle = true, seed = 42})
    local b = data.DataLoader(ds, {batch_size = 7, shuffle = true, seed = 42})
    local c = data.DataLoader(ds, {batch_size = 7, shuffle = true, seed = 43})
    local a1, b1, c1 = epoch_labels(a), epoch_labels(b), epoch_labels(c)
    assert.are.same(a1, b1)
    assert.are_not.same(a1, c1)
    assert.are.same(ref_order(50, 42, 1, true), a1)
    assert.are.same(ref_order(50, 43, 1, true), c1)
    local a2 = epoch_labels(a)
    assert.are_not.same(a1, a2)
    assert.are.same(ref_order(50, 42, 2, true), a2)
    for _, ys in ipairs{a1, a2, c1} do
      local seen = {}
      for _, v in ipairs(ys) do
        assert.is_nil(seen[v])
        seen[v] = true
      end
      for i = 1, 50 do assert.is_true(seen[i]) end
    end
    a:close(); b:close(); c:close()
  end)

  it("does not depend on keel's global RNG", function()
    local ds = dataset(20)
    keel.manual_seed(1)
    local a = epoch_labels(data.DataLoader(ds, {batch_size = 5, shuffle = true, seed = 9}))
    keel.manual_seed(2)
    keel.rand{10}
    local b = epoch_labels(data.DataLoader(ds, {batch_size = 5, shuffle = true, seed = 9}))
    assert.are.same(a, b)
  end)

  it("keeps the last partial batch, or drops it with drop_last", function()
    local ds = dataset(10)
    local ys, sizes = epoch_labels(data.DataLoader(ds, {batch_size = 3}))
    assert.are.same({3, 3, 3, 1}, sizes)
    assert.are.same(range(10), ys)
    local dl = data.DataLoader(ds, {batch_size = 3, drop_last = true})
    assert.are.equal(3, #dl)
    ys, sizes = epoch_labels(dl)
    assert.are.same({3, 3, 3}, sizes)
    assert.are.same(range(9), ys)
    local none = data.DataLoader(ds, {batch_size = 11, drop_last = true})
    assert.are.equal(0, #none)
    ys = epoch_labels(none)
    assert.are.same({}, ys)
    assert.are.equal(2, none:state().epoch)
  end)

  it("gives the x shape of a partial batch and nil labels without y", function()
    local ds = dataset(5, {1, 2, 2})
    local loader = data.DataLoader({x = ds.x}, {batch_size = 2})
    local shapes = {}
    for xb, yb in loader:batches() do
      assert.is_nil(yb)
      shapes[#shapes + 1] = xb.shape
    end
    assert.are.same({{2, 1, 2, 2}, {2, 1, 2, 2}, {1, 1, 2, 2}}, shapes)
  end)

  it("reads non-contiguous x and labels of any row shape", function()
    local base = keel.arange(0, 12):reshape{3, 4}:t()   -- [4, 3], transposed
    local y = keel.arange(0, 8):reshape{4, 2}:to("int64")
    local loader = data.DataLoader({x = base, y = y}, {batch_size = 4, prefetch = 0})
    for xb, yb in loader:batches() do
      assert.are.same(base:totable(), xb:totable())
      assert.are.same(y:totable(), yb:totable())
    end
  end)

  it("batches stay valid after later batches are made", function()
    local ds = dataset(12)
    local kept = {}
    for xb in data.DataLoader(ds, {batch_size = 2, prefetch = 3}):batches() do kept[#kept + 1] = xb end
    for i, xb in ipairs(kept) do
      assert.are.same({{(i - 1) * 4, (i - 1) * 4 + 1}, {(i - 1) * 4 + 2, (i - 1) * 4 + 3}}, xb:totable())
    end
  end)
end)

describe("DataLoader state", function()
  it("state/set_state resume at the same batch", function()
    local ds = dataset(40)
    local opts = {batch_size = 6, shuffle = true, seed = 7}
    local a = data.DataLoader(ds, opts)
    epoch_labels(a)                               -- epoch 1
    local it = a:batches()
    it(); it()                                    -- two batches of epoch 2
    local s = a:state()
    assert.are.same({epoch = 2, cursor = 2, seed = 7}, s)
    local _, rest = it()
    local b = data.DataLoader(ds, opts)
    b:set_state(s)
    local _, yb, i = b:batches()()
    assert.are.equal(3, i)
    assert.are.same(rest:totable(), yb:totable())
    -- skipping a batch: cursor + 1
    local c = data.DataLoader(ds, opts)
    c:set_state({epoch = 2, cursor = 3, seed = 7})
    local _, _, j = c:batches()()
    assert.are.equal(4, j)
    -- a full pass moves to the next epoch
    local d = data.DataLoader(ds, opts)
    epoch_labels(d)
    assert.are.same({epoch = 2, cursor = 0, seed = 7}, d:state())
    a:close(); b:close(); c:close(); d:close()
  end)

  it("batches() continues from the cursor after a break", function()
    local ds = dataset(10)
    local loader = data.DataLoader(ds, {batch_size = 2})
    for _, _, i in loader:batches() do if i == 2 then break end end
    local ys = epoch_labels(loader)
    assert.are.same({5, 6, 7, 8, 9, 10}, ys)
    -- an exhausted iterator stays exhausted
    local it = loader:batches()
    for _ = 1, 5 do it() end
    assert.is_nil(it())
    assert.is_nil(it())
    assert.are.same({epoch = 3, cursor = 0, seed = 0}, loader:state())
  end)

  it("rejects a bad state", function()
    local loader = data.DataLoader(dataset(10), {batch_size = 5})
    H.assert_error(function() loader:set_state({epoch = 1, cursor = 3}) end, "cursor 3, expected 0..2")
    H.assert_error(function() loader:set_state({epoch = 0}) end, "epoch 0, expected >= 1")
    H.assert_error(function() loader:set_state({cursor = 1.5}) end, "cursor must be an integer")
    H.assert_error(function() loader:set_state(3) end, "set_state: expected a table")
  end)
end)

describe("DataLoader prefetch thread", function()
  local function all_batches(loader)
    local out = {}
    for _ = 1, 2 do
      for xb, yb in loader:batches() do out[#out + 1] = {xb:totable(), yb:totable()} end
    end
    return out
  end

  it("gives the same batches with prefetch on and off", function()
    local ds = dataset(37, {2, 5, 6})
    local function mk(p)
      return data.DataLoader(ds, {batch_size = 5, shuffle = true, seed = 3, prefetch = p,
        transforms = {T.to_float(0.5), T.normalize({1, 2}, {2, 4}),
                      T.random_crop({4, 5}, {padding = 2}), T.random_hflip(0.5)}})
    end
    local ref = all_batches(mk(0))
    for _, p in ipairs{1, 2, 8} do assert.are.same(ref, all_batches(mk(p))) end
  end)

  it("closes mid-epoch (joins the thread) and refuses use after", function()
    local loader = data.DataLoader(dataset(100), {batch_size = 3, prefetch = 4})
    local it = loader:batches()
    it()
    loader:close()
    loader:close()   -- twice is fine
    H.assert_error(function() loader:num_batches() end, "closed")
    H.assert_error(function() it() end, "closed")
    assert.matches("closed", tostring(loader))
    do
      local l2 <close> = data.DataLoader(dataset(10), {batch_size = 3})
      l2:batches()()
    end
    -- dropped without close: __gc joins
    for _ = 1, 5 do data.DataLoader(dataset(10), {batch_size = 3}):batches()() end
    collectgarbage()
    collectgarbage()
  end)
end)

describe("DataLoader transforms", function()
  -- One sample through the documented pipeline, in Lua. s: nested [C][H][W].
  local function ref_sample(s, tfs, seed, epoch, pos)
    local r = stream(seed, epoch, pos)
    local C, Hh, W = #s, #s[1], #s[1][1]
    for _, t in ipairs(tfs) do
      if t.kind == "to_float" then
        for c = 1, C do for i = 1, Hh do for j = 1, W do s[c][i][j] = s[c][i][j] * t.scale end end end
      elseif t.kind == "normalize" then
        for c = 1, C do
          local m, sd = t.mean[#t.mean == 1 and 1 or c], t.std[#t.std == 1 and 1 or c]
          for i = 1, Hh do for j = 1, W do s[c][i][j] = (s[c][i][j] - m) / sd end end
        end
      elseif t.kind == "random_crop" then
        local p = t.padding
        local top = rint(r, Hh + 2 * p - t.size_h + 1)
        local left = rint(r, W + 2 * p - t.size_w + 1)
        local o = {}
        for c = 1, C do
          o[c] = {}
          for i = 1, t.size_h do
            o[c][i] = {}
            for j = 1, t.size_w do
              local si, sj = top + i - p, left + j - p
              o[c][i][j] = (si >= 1 and si <= Hh and sj >= 1 and sj <= W) and s[c][si][sj] or 0
            end
          end
        end
        s, Hh, W = o, t.size_h, t.size_w
      elseif t.kind == "random_hflip" then
        if runit(r) < t.p then
          for c = 1, C do
            for i = 1, Hh do
              local row, n = s[c][i], W
              for j = 1, n // 2 do row[j], row[n + 1 - j] = row[n + 1 - j], row[j] end
            end
          end
        end
      end
    end
    return s
  end

  it("to_float and normalize give exact values per channel", function()
    local x = keel.tensor{{{{0, 255}}, {{51, 102}}, {{255, 0}}}}   -- [1, 3, 1, 2]
    local loader = data.DataLoader({x = x}, {batch_size = 1,
      transforms = {T.to_float(), T.normalize({0.5, 0.25, 0}, {0.5, 0.25, 2})}})
    local xb = loader:batches()()
    H.assert_close(xb, {{{{-1, 1}}, {{-0.2, 0.6}}, {{0.5, 0}}}}, {atol = 1e-6, rtol = 0})
    local one = data.DataLoader({x = keel.tensor{{{3, 5}}}},   -- [1, 1, 2], [H, W] samples
      {batch_size = 1, transforms = {T.to_float(1), T.normalize(0.1307, 0.3081)}})
    H.assert_close(one:batches()(), {{{(3 - 0.1307) / 0.3081, (5 - 0.1307) / 0.3081}}}, {atol = 1e-5, rtol = 1e-6})
  end)

  it("random_crop and random_hflip match the documented RNG", function()
    local n, C, Hh, W = 9, 2, 5, 6
    local ds = dataset(n, {C, Hh, W})
    local tfs = {T.random_crop({4, 3}, {padding = 2}), T.random_hflip(0.5), T.to_float(0.5)}
    local loader = data.DataLoader(ds, {batch_size = 4, shuffle = true, seed = 11, transforms = tfs})
    local flipped, kept = 0, 0
    for epoch = 1, 2 do
      local order = ref_order(n, 11, epoch, true)
      local pos = 0
      for xb in loader:batches() do
        local got = xb:totable()
        for k = 1, #got do
          local row = order[pos + 1] - 1
          local src = H.nest(H.flat(ds.x[row + 1]), {C, Hh, W})
          local want = ref_sample(src, tfs, 11, epoch, pos)
          assert.are.same(want, got[k])
          local r = stream(11, epoch, pos); r(); r()
          if runit(r) < 0.5 then flipped = flipped + 1 else kept = kept + 1 end
          pos = pos + 1
        end
      end
      assert.are.equal(n, pos)
    end
    assert.is_true(flipped > 0 and kept > 0)
  end)

  it("hflip with p = 1 reverses rows, p = 0 keeps them; crop offsets", function()
    local x = keel.tensor{{{1, 2, 3}, {4, 5, 6}}}            -- [1, 2, 3]: one [H, W] sample
    local f = data.DataLoader({x = x}, {batch_size = 1, transforms = {T.random_hflip(1)}})
    assert.are.same({{{3, 2, 1}, {6, 5, 4}}}, f:batches()():totable())
    local k = data.DataLoader({x = x}, {batch_size = 1, transforms = {T.random_hflip(0)}})
    assert.are.same({{{1, 2, 3}, {4, 5, 6}}}, k:batches()():totable())
    -- full-size crop without padding is the identity; padding 1 to 4x5 is a zero frame
    local id = data.DataLoader({x = x}, {batch_size = 1, transforms = {T.random_crop({2, 3})}})
    assert.are.same({{{1, 2, 3}, {4, 5, 6}}}, id:batches()():totable())
    local fr = data.DataLoader({x = x}, {batch_size = 1, transforms = {T.random_crop({4, 5}, {padding = 1})}})
    assert.are.same({{{0, 0, 0, 0, 0}, {0, 1, 2, 3, 0}, {0, 4, 5, 6, 0}, {0, 0, 0, 0, 0}}},
                    fr:batches()():totable())
    -- a 1x1 crop of a padded sample: the pixel at the drawn offset
    local seed = 5
    local c1 = data.DataLoader({x = x}, {batch_size = 1, seed = seed,
      transforms = {T.random_crop(1, {padding = 1})}})
    for epoch = 1, 4 do
      local r = stream(seed, epoch, 0)
      local top, left = rint(r, 4), rint(r, 5)
      local v = (top >= 1 and top <= 2 and left >= 1 and left <= 3) and (top - 1) * 3 + left or 0
      assert.are.same({{{v}}}, c1:batches()():totable())
      c1:batches()()   -- end of the epoch
    end
  end)
end)

describe("DataLoader errors", function()
  local ds = dataset(10, {1, 4, 4})
  it("checks the dataset", function()
    H.assert_error(function() data.DataLoader({}, {}) end, "DataLoader: dataset has no x tensor")
    H.assert_error(function() data.DataLoader(nil) end, "DataLoader: dataset has no x tensor")
    H.assert_error(function() data.DataLoader({x = ds.x, y = 3}) end, "dataset.y must be a tensor or nil")
    H.assert_error(function() data.DataLoader({x = ds.x, y = keel.zeros{3}:to("int64")}) end,
      "DataLoader: y has 3 rows, expected 10 (as x)")
    H.assert_error(function()
      data.DataLoader({x = ds.y}, {transforms = {T.to_float()}})
    end, "transforms need float32 x, got int64")
  end)
  it("checks the options", function()
    H.assert_error(function() data.DataLoader(ds, {batch_size = 0}) end, "batch_size must be an integer >= 1, got 0")
    H.assert_error(function() data.DataLoader(ds, {batch_size = 2.5}) end, "batch_size must be an integer >= 1")
    H.assert_error(function() data.DataLoader(ds, {batch_size = "a"}) end, "batch_size must be an integer >= 1")
    H.assert_error(function() data.DataLoader(ds, {seed = 0.5}) end, "seed must be an integer")
    H.assert_error(function() data.DataLoader(ds, {prefetch = -1}) end, "prefetch must be an integer in 0..64")
    H.assert_error(function() data.DataLoader(ds, {batchsize = 2}) end, "unknown option 'batchsize'")
    H.assert_error(function() data.DataLoader(ds, {transforms = {{}}}) end, "transforms[1] is not a transform")
  end)
  it("checks the transforms", function()
    H.assert_error(function() T.to_float("x") end, "to_float: scale must be a finite number")
    H.assert_error(function() T.normalize(0.5, 0) end, "normalize: std[1] is 0")
    H.assert_error(function() T.normalize({1, 2}, {1}) end, "normalize: 2 means and 1 stds")
    H.assert_error(function() T.normalize("a", 1) end, "normalize: mean must be a number or a non-empty list")
    H.assert_error(function() T.normalize({1, "b"}, {1, 1}) end, "normalize: mean[2] must be a finite number")
    H.assert_error(function() T.random_crop(0) end, "random_crop: size 0x0, expected >= 1")
    H.assert_error(function() T.random_crop("a") end, "random_crop: size must be an integer or {h, w}")
    H.assert_error(function() T.random_crop(3, {padding = -1}) end, "random_crop: padding must be an integer >= 0")
    H.assert_error(function() T.random_hflip(2) end, "random_hflip: p must be a number in [0, 1]")
    -- checks that need the sample shape
    H.assert_error(function()
      data.DataLoader(ds, {transforms = {T.random_crop(7, {padding = 1})}})
    end, "random_crop: size 7x7 larger than the padded 6x6 sample")
    H.assert_error(function()
      data.DataLoader(ds, {transforms = {T.normalize({1, 2}, {1, 1})}})
    end, "normalize: 2 mean/std values for 1 channels, expected 1 or 1")
    H.assert_error(function()
      data.DataLoader({x = keel.zeros{4, 3}}, {transforms = {T.random_hflip()}})
    end, "random_hflip: samples have 1 dims, expected [C, H, W] or [H, W]")
  end)
end)
