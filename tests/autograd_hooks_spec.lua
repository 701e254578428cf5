-- autograd_hooks_spec.lua: Tensor:register_post_accumulate_grad_hook (order,
-- removal, modification, errors with the hook's traceback) and errors in
-- tensor hooks (register_hook): traceback, every .grad unchanged.
local H = require "helper"
local keel = H.keel

local SRC = debug.getinfo(1, "S").short_src
local function here() return debug.getinfo(2, "l").currentline end

local function leaf(v) return keel.tensor(v, {dtype = "float64"}):requires_grad_() end

describe("post-accumulate-grad hooks", function()
  it("run once per backward, after .grad is committed, with the tensor itself", function()
    local p = leaf({1, 2})
    local seen = {}
    p:register_post_accumulate_grad_hook(function(t)
      assert.is_true(rawequal(t, p))
      seen[#seen + 1] = t.grad:totable()
    end)
    local loss = (p * 3):sum()
    loss:backward({retain_graph = true})
    assert.are.same({{3, 3}}, seen)
    loss:backward()   -- accumulates: the hook sees the sum
    assert.are.same({{3, 3}, {6, 6}}, seen)
  end)

  it("see every gradient of the pass committed", function()
    local a, b = leaf({1}), leaf({2})
    local b_grad
    a:register_post_accumulate_grad_hook(function() b_grad = b.grad and b.grad:item() end)
    b:register_post_accumulate_grad_hook(function() end)
    ;((a * b) * 1):sum():backward()
    assert.are.equal(1, b_grad)
  end)

  it("run only for tensors that received a gradient", function()
    local a, b = leaf({1}), leaf({2})
    local calls = {}
    a:register_post_accumulate_grad_hook(function() calls[#calls + 1] = "a" end)
    b:register_post_accumulate_grad_hook(function() calls[#calls + 1] = "b" end)
    ;(a * 2):sum():backward()
    assert.are.same({"a"}, calls)
  end)

  it("run in registration order, and stop after remove()", function()
    local p = leaf({1})
    local calls = {}
    local h1 = p:register_post_accumulate_grad_hook(function() calls[#calls + 1] = 1 end)
    p:register_post_accumulate_grad_hook(function() calls[#calls + 1] = 2 end)
    local h3 = p:register_post_accumulate_grad_hook(function() calls[#calls + 1] = 3 end)
    ;(p * 1):sum():backward()
    assert.are.same({1, 2, 3}, calls)
    h1:remove()
    h1:remove()   -- twice: harmless
    calls = {}
    ;(p * 1):sum():backward()
    assert.are.same({2, 3}, calls)
    h3:remove()
    calls = {}
    ;(p * 1):sum():backward()
    assert.are.same({2}, calls)
  end)

  it("a hook that removes itself still lets the others of the pass run", function()
    local p = leaf({1})
    local calls = {}
    local h
    h = p:register_post_accumulate_grad_hook(function() calls[#calls + 1] = "self"; h:remove() end)
    p:register_post_accumulate_grad_hook(function() calls[#calls + 1] = "other" end)
    ;(p * 1):sum():backward()
    ;(p * 1):sum():backward()
    assert.are.same({"self", "other", "other"}, calls)
  end)

  it("may change .grad in place or assign it", function()
    local p, q = leaf({1, 2}), leaf({3})
    p:register_post_accumulate_grad_hook(function(t) t.grad:mul_(10) end)
    q:register_post_accumulate_grad_hook(function(t) t.grad = keel.tensor({-1}, {dtype = "float64"}) end)
    ;((p * 2):sum() + (q * 5):sum()):backward()
    H.assert_close(p.grad, {20, 20})
    H.assert_close(q.grad, {-1})
    -- the next pass accumulates onto what the hook left
    ;((p * 2):sum() + (q * 5):sum()):backward()
    H.assert_close(p.grad, {220, 220})
    H.assert_close(q.grad, {-1})
  end)

  it("work on a leaf root and on nn parameters", function()
    local p = leaf({1, 2})
    local n = 0
    p:register_post_accumulate_grad_hook(function() n = n + 1 end)
    p:backward(keel.tensor({1, 1}, {dtype = "float64"}))
    assert.are.equal(1, n)
    local lin = keel.nn.Linear(2, 1)
    local names = {}
    for name, w in lin:named_parameters() do
      w:register_post_accumulate_grad_hook(function(t)
        assert.is_true(rawequal(t, w))
        names[#names + 1] = name
      end)
    end
    lin(keel.randn({3, 2})):sum():backward()
    table.sort(names)
    assert.are.same({"bias", "weight"}, names)
  end)

  it("raise errors with the hook's traceback (the .grad is already committed)", function()
    local p = leaf({1})
    local line
    p:register_post_accumulate_grad_hook(function() line = here(); error("boom") end)
    local ok, err = pcall(function() (p * 4):sum():backward() end)
    assert.is_false(ok)
    assert.matches("^post_accumulate_grad hook: ", err)
    assert.matches(SRC .. ":" .. line .. ": boom", err, 1, true)
    assert.matches("stack traceback:", err, 1, true)
    assert.matches(SRC .. ":" .. line .. ":", err:match("stack traceback:.*"), 1, true)
    H.assert_close(p.grad, {4})
  end)

  it("refuse tensors that are no leaves or need no grad, and non-functions", function()
    local p = leaf({1})
    assert.has_error(function() (p * 2):register_post_accumulate_grad_hook(function() end) end,
      "register_post_accumulate_grad_hook: expected a leaf tensor that requires grad, got a non-leaf tensor")
    assert.has_error(function() keel.tensor({1}):register_post_accumulate_grad_hook(function() end) end,
      "register_post_accumulate_grad_hook: expected a leaf tensor that requires grad, "
      .. "got a tensor that does not require grad")
    assert.has_error(function() p:register_post_accumulate_grad_hook(5) end,
      "register_post_accumulate_grad_hook: argument #1: expected a function, got number")
  end)

  it("die with their tensor: a later tensor at the same address has none", function()
    local calls = 0
    do
      local p = leaf({1})
      p:register_post_accumulate_grad_hook(function() calls = calls + 1 end)
      ;(p * 1):sum():backward()
    end
    assert.are.equal(1, calls)
    collectgarbage()
    collectgarbage()
    for _ = 1, 200 do
      local q = leaf({1})
      ;(q * 1):sum():backward()
    end
    assert.are.equal(1, calls)
  end)
end)

describe("tensor hook errors", function()
  it("carry the hook's traceback and leave every .grad unchanged", function()
    local a, b = leaf({1, 2}), leaf({3})
    a.grad = keel.tensor({10, 20}, {dtype = "float64"})
    local mid = a * 2
    local line
    mid:register_hook(function() line = here(); error("hook failed") end)
    local ok, err = pcall(function() (mid:sum() + (b * 3):sum()):backward() end)
    assert.is_false(ok)
    assert.matches(SRC .. ":" .. line .. ": hook failed", err, 1, true)
    assert.matches("stack traceback:", err, 1, true)
    assert.matches(SRC .. ":" .. line .. ":", err:match("stack traceback:.*"), 1, true)
    H.assert_close(a.grad, {10, 20})
    assert.is_nil(b.grad)
  end)

  it("on a leaf also leave every .grad unchanged", function()
    local a, b = leaf({1, 2}), leaf({3})
    b.grad = keel.tensor({7}, {dtype = "float64"})
    b:register_hook(function() error("leaf hook failed") end)
    local ok, err = pcall(function() ((a * 2):sum() + (b * 3):sum()):backward() end)
    assert.is_false(ok)
    assert.matches("leaf hook failed", err, 1, true)
    assert.matches("stack traceback:", err, 1, true)
    assert.is_nil(a.grad)
    H.assert_close(b.grad, {7})
  end)
end)
