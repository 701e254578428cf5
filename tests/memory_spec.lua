-- memory_spec.lua: a training-shaped loop must keep memory flat without
-- collectgarbage(): the engine's intermediates are released when backward
-- finishes and the binding tells Lua's GC about the bytes it holds.
--
-- KEEL_MEMTEST_STEPS overrides the step count (default 10000), for slow
-- sanitizer builds only.
local H = require "helper"
local keel = H.keel

local STEPS = tonumber(os.getenv("KEEL_MEMTEST_STEPS") or "") or 10000
local LIVE_LIMIT = 64 * 1024 * 1024
local RSS_GROWTH_LIMIT = 64 * 1024 * 1024
local CHECK_EVERY = 500

describe("memory", function()
  it(("stays flat over %d steps of a ~1 MB graph without collectgarbage()"):format(STEPS), function()
    keel.manual_seed(3)
    local w = keel.randn({ 256, 256 }):mul(0.05)   -- 256 kB parameter
    w.requires_grad = true
    local b = keel.zeros({ 256 }, { requires_grad = true })
    local x = keel.randn({ 16, 256 })

    local rss_start, rss_end
    local max_live = 0
    local checks = 0
    local first_loss, last_loss
    local rss_mark = math.min(1000, STEPS // 10)
    for step = 1, STEPS do
      -- graph: four 256x256 intermediates (~1 MB) plus small activations
      local w1 = w * 0.5
      local w2 = w1 + w
      local w3 = w2 * w1
      local w4 = w3 - w1
      local h = (x:matmul(w4) + b):relu()
      local loss = (h * h):mean()
      loss:backward()
      if step == 1 then first_loss = loss:item() end
      last_loss = loss:item()
      -- plain SGD, outside the graph
      keel.no_grad(function()
        w:sub_(w.grad * 0.01)
        b:sub_(b.grad * 0.01)
      end)
      w.grad = nil
      b.grad = nil
      if step % CHECK_EVERY == 0 or step == STEPS then
        checks = checks + 1
        local live = keel.memory_stats().live_bytes
        if live > max_live then max_live = live end
        assert.is_true(live < LIVE_LIMIT,
          ("step %d: live_bytes %.1f MB over the %.0f MB bound"):format(step, live / 2 ^ 20,
                                                                      LIVE_LIMIT / 2 ^ 20))
      end
      if step == rss_mark then rss_start = H.rss_bytes() end
      if step == STEPS then rss_end = H.rss_bytes() end
    end
    assert.is_true(checks >= 1)
    assert.is_true(last_loss < first_loss, "the loop trained: " .. first_loss .. " -> " .. last_loss)
    if rss_start and rss_end then
      local growth = rss_end - rss_start
      assert.is_true(growth < RSS_GROWTH_LIMIT,
        ("RSS grew by %.1f MB between step %d and %d"):format(growth / 2 ^ 20, rss_mark, STEPS))
    end
  end)

  it("dropped tensors are reclaimed by the GC without an explicit collect", function()
    local base = keel.memory_stats().live_bytes
    local peak = 0
    for _ = 1, 2000 do
      local t = keel.zeros({ 256, 256 })  -- 256 kB each, 500 MB in total
      t:add_(1)
      local live = keel.memory_stats().live_bytes - base
      if live > peak then peak = live end
    end
    assert.is_true(peak < LIVE_LIMIT, ("peak %.1f MB"):format(peak / 2 ^ 20))
  end)
end)
