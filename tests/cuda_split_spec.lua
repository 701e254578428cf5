--
-- tests/cuda_split_spec.lua: the per-channel and reduction kernels'
-- launch shapes on the CUDA simulator. Few sums over long ranges split
-- over blocks (common.cuh kc_chan_split: reduce.cu, norm.cu, conv.cu's
-- bias gradient) and add their partials in a second pass; many sums take
-- one pass. Counting the simulator's launches per run of an op
-- (tests/split_launch_count.lua) tells the two apart, so each pair of
-- shapes here provably takes both paths. Batch norm over [N, C] inputs
-- runs in columns (kc_chan_block: neighbouring channels across a warp),
-- checked against the CPU with units of channels whole and partial.
--
local H = require "helper"
local D = require "devcheck"
H.cpu_default(teardown)   -- CPU references stay CPU under KEEL_DEVICE=cuda (helper.lua)
local F = H.keel.nn.functional
local gpu_it = H.gpu_it(it, pending)

describe("cuda split and whole reductions (simulator launch counts)", function()
  -- launches of one run of the case: runs 2 and 1 subtracted (the input's
  -- upload and any setup cancel out); 4 simulated SMs, as the defaults
  local function per_run(case)
    local function launches(reps)
      return (H.sim_run("tests/split_launch_count.lua", {("%q"):format(case), reps}, "KEEL_CUDA_SIM_SMS=4"))
    end
    return launches(2) - launches(1)
  end
  local test = H.on_sim() and gpu_it or pending
  -- name, split case, whole case, launches the split adds
  for _, c in ipairs({
    {"sum over rows", "sum rows split", "sum rows whole", 1},
    {"sum over columns", "sum cols split", "sum cols whole", 1},
    {"batch norm statistics, runs of one (columns)", "bn cols split", "bn cols whole", 2},
    {"batch norm statistics, runs below a block", "bn runs split", "bn runs whole", 2},
  }) do
    test(c[1] .. ": the split shape adds its second pass, the whole one does not", function()
      local split, whole = per_run(c[2]), per_run(c[3])
      assert.is_true(whole >= 1, "launches of the whole case: " .. whole)
      assert.equals(whole + c[4], split, "launches of the split case")
    end)
  end
end)

describe("cuda batch norm in columns ([N, C] inputs)", function()
  for _, dt in ipairs({"float32", "float64"}) do
    -- channels: a partial unit of 8 (5), one and a half units of 32 (40,
    -- whole), three units split over rows (70), a full unit (32)
    for _, shape in ipairs({{37, 5}, {20, 40}, {300, 70}, {96, 32}}) do
      local name = table.concat(shape, "x")
      gpu_it("training with affine and running stats, then eval, " .. name .. " " .. dt, function()
        local ins = D.check_batch_norm_train(shape, dt, 81)
        D.check(function(a, ww, bb, m, v) return F.batch_norm(a, m, v, ww, bb, false) end, ins)
        -- the same bits twice: a fixed order of the column sums
        local xd = D.input(shape, dt, {seed = 86, grad = false}):to("cuda")
        assert.same(F.batch_norm(xd, nil, nil, nil, nil, true):cpu():totable(),
                    F.batch_norm(xd, nil, nil, nil, nil, true):cpu():totable())
      end)
    end
  end
end)

describe("cuda per-channel walks of runs below a block", function()
  -- kc_chan_visit steps n and l by the block size's quotient and remainder
  -- (256 = q L + r): r == 0 (L = 64), q == 1 (L = 200), carries every few
  -- steps (L = 37, split so slices start mid-run); group norm's walk of
  -- channels the same way (L = 200, 3 channels a group)
  for _, dt in ipairs({"float32", "float64"}) do
    for _, shape in ipairs({{4, 3, 64}, {5, 3, 200}, {50, 2, 37}}) do
      gpu_it("batch norm " .. table.concat(shape, "x") .. " " .. dt, function()
        local C = shape[2]
        D.check(function(a, w, b) return F.batch_norm(a, nil, nil, w, b, true) end,
                {D.input(shape, dt, {seed = 91}), D.input({C}, dt, {lo = 0.5, hi = 1.5, seed = 92}),
                 D.input({C}, dt, {seed = 93})})
      end)
    end
    gpu_it("group norm 2x6x200, 2 groups, " .. dt, function()
      D.check(function(a, w, b) return F.group_norm(a, 2, w, b) end,
              {D.input({2, 6, 200}, dt, {seed = 94}), D.input({6}, dt, {lo = 0.5, hi = 1.5, seed = 95}),
               D.input({6}, dt, {seed = 96})})
    end)
  end
end)
