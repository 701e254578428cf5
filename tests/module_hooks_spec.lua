-- module_hooks_spec.lua: module forward pre-hooks, forward hooks, full
-- backward (pre-)hooks, global module hooks, model:on_grad and the anomaly
-- scopes of Module:__call (bindings/keel/nn.lua).
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local hooks = require "keel.hooks"
local close = H.assert_close

-- Largest absolute difference between two tensors.
local function maxdiff(a, b)
  return (a:to("float64") - b:to("float64")):abs():max():item()
end

local function assert_same(a, b, tol, msg)
  local d = maxdiff(a, b)
  assert.is_true(d <= (tol or 1e-12), (msg or "tensors differ") .. ": max difference " .. d)
end

-- A module whose forward returns its arguments' product (two tensors, and
-- a non-tensor third argument passed through as a second result).
local Mul = nn.Module:extend("Mul")
function Mul:forward(a, b, tag) return a * b, tag end

local Id = nn.Module:extend("Id")
function Id:forward(...) return ... end

local function lin64(i, o, seed)
  keel.manual_seed(seed or 1)
  return nn.Linear(i, o):double()
end

describe("forward pre-hooks", function()
  it("run in registration order (prepend first) and see the arguments as {n = count, ...}", function()
    local m = Id()
    local log = {}
    m:register_forward_pre_hook(function(mod, args)
      assert.are.equal(m, mod)
      log[#log + 1] = "a:" .. args.n .. ":" .. tostring(args[1]) .. ":" .. tostring(args[3])
    end)
    m:register_forward_pre_hook(function() log[#log + 1] = "b" end)
    m:register_forward_pre_hook(function() log[#log + 1] = "c" end, {prepend = true})
    local a, b, c = m(1, nil, 3)
    assert.are.same({"c", "a:3:1:3", "b"}, log)
    assert.are.equal(1, a); assert.is_nil(b); assert.are.equal(3, c)
  end)

  it("replace all arguments by returning a table, the first by returning another value", function()
    local m = Id()
    local h1 = m:register_forward_pre_hook(function(_, args)
      return {args[1] * 10, "x", n = 3}
    end)
    assert.are.same({20, "x", nil}, {m(2, 5, 6)})
    assert.are.equal(3, select("#", m(2, 5, 6)))
    h1:remove()
    m:register_forward_pre_hook(function(_, args) return args[1] + 1 end)
    local r = table.pack(m(2, 5, 6))
    assert.are.same({3, 5, 6, n = 3}, r)
    -- a later hook sees the arguments an earlier one gave
    m:register_forward_pre_hook(function(_, args) return args[1] * 2 end)
    assert.are.equal(6, (m(2)))
  end)

  it("replace a tensor argument that forward then computes with", function()
    local lin = lin64(3, 2)
    local x = H.t64({4, 3}, -1, 1, 1, {requires_grad = false})
    local want = lin:forward(x * 2)
    lin:register_forward_pre_hook(function(_, args) return args[1] * 2 end)
    assert_same(lin(x), want, 0, "output with the doubled input")
  end)
end)

describe("forward hooks", function()
  it("run in registration order after forward, with the arguments and the output", function()
    local lin = lin64(3, 2)
    local x = H.t64({4, 3}, -1, 1, 2, {requires_grad = false})
    local log = {}
    lin:register_forward_pre_hook(function() log[#log + 1] = "pre" end)
    lin:register_forward_hook(function(mod, args, out, outs)
      assert.are.equal(lin, mod)
      assert.are.equal(x, args[1])
      assert.are.equal(1, outs.n)
      assert.are.equal(out, outs[1])
      assert_same(out, lin:forward(x), 0, "hook output")
      log[#log + 1] = "f1"
    end)
    lin:register_forward_hook(function() log[#log + 1] = "f2" end)
    lin:register_forward_hook(function() log[#log + 1] = "f0" end, {prepend = true})
    lin(x)
    assert.are.same({"pre", "f0", "f1", "f2"}, log)
  end)

  it("replace the first result by returning one value, all results by returning several", function()
    local m = Id()
    local h = m:register_forward_hook(function(_, _, out) return out * 2 end)
    assert.are.same({2, 7, n = 2}, table.pack(m(1, 7)))
    h:remove()
    m:register_forward_hook(function(_, _, out, outs) return out, outs[2], "extra" end)
    assert.are.same({1, 7, "extra", n = 3}, table.pack(m(1, 7)))
    -- the next hook sees the replaced results
    m:register_forward_hook(function(_, _, out, outs)
      assert.are.equal(3, outs.n)
      return out + 100
    end)
    assert.are.same({101, 7, "extra", n = 3}, table.pack(m(1, 7)))
  end)

  it("see every result of a module returning several (RNN: output, h_n)", function()
    keel.manual_seed(3)
    local rnn = nn.RNN(3, 4)
    local x = keel.randn({5, 2, 3})
    local seen
    rnn:register_forward_hook(function(_, _, out, outs) seen = {out, outs} end)
    local out, hn = rnn(x)
    assert.are.equal(out, seen[1])
    assert.are.equal(2, seen[2].n)
    assert.are.equal(hn, seen[2][2])
    H.assert_shape(seen[2][2], {1, 2, 4})
  end)

  it("also run with grad mode off", function()
    local lin = lin64(3, 2)
    local n = 0
    lin:register_forward_hook(function() n = n + 1 end)
    keel.no_grad(function() lin(keel.zeros({1, 3}, {dtype = "float64"})) end)
    assert.are.equal(1, n)
  end)
end)

describe("hook handles", function()
  it("remove a hook; removing twice is harmless; the other hooks stay", function()
    local m = Id()
    local log = {}
    local h1 = m:register_forward_hook(function() log[#log + 1] = 1 end)
    local h2 = m:register_forward_hook(function() log[#log + 1] = 2 end)
    h1:remove()
    h1:remove()
    m(0)
    assert.are.same({2}, log)
    h2:remove()
    m(0)
    assert.are.same({2}, log)
    assert.are.same({pre = 0, fwd = 0, bpre = 0, bwd = 0}, nn._hook_counts(m))
  end)

  it("of the same function registered twice remove one registration each", function()
    local m = Id()
    local n = 0
    local f = function() n = n + 1 end
    local h1 = m:register_forward_pre_hook(f)
    m:register_forward_pre_hook(f)
    m(0)
    assert.are.equal(2, n)
    h1:remove()
    m(0)
    assert.are.equal(3, n)
  end)

  it("a hook that removes itself while running does not skip the next one", function()
    local m = Id()
    local log = {}
    local h
    h = m:register_forward_hook(function() log[#log + 1] = "a"; h:remove() end)
    m:register_forward_hook(function() log[#log + 1] = "b" end)
    m(0)
    m(0)
    assert.are.same({"a", "b", "b"}, log)
  end)

  it("registration checks its arguments", function()
    local m = Id()
    H.assert_error(function() m:register_forward_hook(42) end,
      "register_forward_hook: argument #1: expected a function, got number")
    H.assert_error(function() m:register_full_backward_hook(function() end, 3) end,
      "register_full_backward_hook: argument #2: expected an options table")
    H.assert_error(function() nn.Linear:register_forward_hook(function() end) end,
      "register_forward_hook: expected a module instance")
  end)
end)

describe("global module hooks", function()
  it("run for every module, before the module's own hooks, until removed", function()
    local a, b = Id(), Id()
    local log = {}
    b:register_forward_hook(function() log[#log + 1] = "b.own" end)
    local g1 = nn.register_module_forward_pre_hook(function(m) log[#log + 1] = (m == a and "a" or "b") .. ".gpre" end)
    local g2 = nn.register_module_forward_hook(function(m) log[#log + 1] = (m == a and "a" or "b") .. ".gfwd" end)
    a(1); b(1)
    g1:remove(); g2:remove(); g2:remove()
    a(1); b(1)
    assert.are.same({"a.gpre", "a.gfwd", "b.gpre", "b.gfwd", "b.own", "b.own"}, log)
  end)

  it("global full backward hooks see every module's gradients", function()
    local lin = lin64(3, 2)
    local x = H.t64({2, 3}, -1, 1, 5)
    local seen = {}
    local g = nn.register_module_full_backward_hook(function(m, gin) seen[m] = gin[1] end)
    lin(x):sum():backward()
    g:remove()
    assert.is_not_nil(seen[lin])
    assert_same(seen[lin], x.grad, 1e-12, "grad_input of the global hook")
  end)

  it("fire for a module dropped before backward", function()
    local x = H.t64({2, 3}, -1, 1, 6)
    local n, gi = 0, nil
    local g = nn.register_module_full_backward_hook(function(_, a) n = n + 1; gi = a[1] end)
    local y = nn.Tanh()(x)   -- the module is garbage after this line
    collectgarbage(); collectgarbage()
    y:sum():backward()
    g:remove()
    assert.are.equal(1, n)
    assert_same(gi, x.grad, 1e-12, "grad_input")
  end)
end)

describe("full backward hooks", function()
  it("see grad_output and grad_input = grad_output @ W of a Linear", function()
    local lin = lin64(3, 2, 7)
    local x = H.t64({4, 3}, -1, 1, 8)
    local c = H.t64({4, 2}, -1, 1, 9, {requires_grad = false})
    local calls, gin, gout = 0, nil, nil
    lin:register_full_backward_hook(function(m, gi, go)
      assert.are.equal(lin, m)
      calls = calls + 1
      gin, gout = gi, go
    end)
    local y = lin(x)
    y:retain_grad()
    ;(y * c):sum():backward()
    assert.are.equal(1, calls)
    assert.are.equal(1, gin.n)
    assert.are.equal(1, gout.n)
    assert_same(gout[1], c, 1e-12, "grad_output")
    assert_same(gout[1], y.grad, 1e-12, "grad_output vs y.grad")
    assert_same(gin[1], c:matmul(lin.weight), 1e-12, "grad_input vs grad_output @ W")
    assert_same(gin[1], x.grad, 1e-12, "grad_input vs x.grad")
  end)

  it("pre-hooks run before the full hooks, each kind in registration order", function()
    local lin = lin64(3, 2)
    local log = {}
    lin:register_full_backward_hook(function() log[#log + 1] = "full1" end)
    lin:register_full_backward_pre_hook(function() log[#log + 1] = "pre1" end)
    lin:register_full_backward_hook(function() log[#log + 1] = "full2" end)
    lin:register_full_backward_pre_hook(function() log[#log + 1] = "pre2" end)
    lin(H.t64({2, 3})):sum():backward()
    assert.are.same({"pre1", "pre2", "full1", "full2"}, log)
  end)

  it("a pre-hook's replacement grad_output changes the module's gradients", function()
    local lin = lin64(3, 2, 11)
    local x = H.t64({4, 3}, -1, 1, 12)
    lin(x):sum():backward()
    local w1, x1 = lin.weight.grad:clone(), x.grad:clone()
    lin:zero_grad(); x.grad = nil
    local seen
    lin:register_full_backward_pre_hook(function(_, go) return {go[1] * 3} end)
    lin:register_full_backward_hook(function(_, _, go) seen = go[1] end)
    lin(x):sum():backward()
    assert_same(lin.weight.grad, w1 * 3, 1e-12, "weight grad")
    assert_same(x.grad, x1 * 3, 1e-12, "input grad")
    H.assert_all(seen, 3, 1e-12, "the full hook sees the replaced grad_output")
  end)

  it("a replacement grad_input changes the gradient of an earlier layer", function()
    local l1, l2 = lin64(3, 4, 21), lin64(4, 2, 22)
    local net = nn.Sequential(l1, nn.Tanh(), l2)
    local x = H.t64({5, 3}, -1, 1, 23)
    net(x):sum():backward()
    local g1, g2 = l1.weight.grad:clone(), l2.weight.grad:clone()
    net:zero_grad()
    local h = l2:register_full_backward_hook(function(_, gi) return {gi[1] * 2} end)
    net(x):sum():backward()
    assert_same(l1.weight.grad, g1 * 2, 1e-12, "earlier layer's weight grad doubles")
    assert_same(l2.weight.grad, g2, 1e-12, "the hooked layer's own weight grad stays")
    -- removed between forward and backward: it does not fire
    net:zero_grad()
    local y = net(x)
    h:remove()
    y:sum():backward()
    assert_same(l1.weight.grad, g1, 1e-12, "after removal")
  end)

  it("nil entries of a returned list keep the gradient; bad entries are errors naming the hook", function()
    local lin = lin64(3, 2)
    local x = H.t64({2, 3})
    lin:register_full_backward_hook(function() return {nil, n = 1} end)
    lin(x):sum():backward()
    assert_same(x.grad, keel.ones({2, 2}, {dtype = "float64"}):matmul(lin.weight), 1e-12, "kept grad_input")
    x.grad = nil
    local m2 = lin64(3, 2)
    m2:register_full_backward_hook(function() return {keel.zeros({5}, {dtype = "float64"})} end)
    H.assert_error(function() m2(x):sum():backward() end,
      "full backward hook: grad_input[1]: expected a keel.Tensor of shape [2,3], got shape [5]")
    assert.is_nil(x.grad)
    local m3 = lin64(3, 2)
    m3:register_full_backward_pre_hook(function() return "no" end)
    H.assert_error(function() m3(x):sum():backward() end,
      "full backward pre-hook: expected a list of gradients (table) or nil")
    assert.is_nil(m3.weight.grad)
  end)

  it("fire once per call for a module called twice in one forward", function()
    local lin = lin64(3, 3, 31)
    local x = H.t64({2, 3}, -1, 1, 32)
    local c = H.t64({2, 3}, -1, 1, 33, {requires_grad = false})
    local calls = {}
    lin:register_full_backward_hook(function(_, gi, go) calls[#calls + 1] = {gi[1], go[1]} end)
    local y1 = lin(x)
    y1:retain_grad()
    local y2 = lin(y1:tanh())
    ;(y2 * c):sum():backward()
    assert.are.equal(2, #calls)
    -- backward runs the second call first
    assert_same(calls[1][2], c, 1e-12, "grad_output of the second call")
    assert_same(calls[1][1], c:matmul(lin.weight), 1e-12, "grad_input of the second call")
    assert_same(calls[2][2], y1.grad, 1e-12, "grad_output of the first call")
    assert_same(calls[2][1], x.grad, 1e-12, "grad_input of the first call")
  end)

  it("fire again on each backward through a retained graph", function()
    local lin = lin64(3, 2)
    local x = H.t64({2, 3})
    local n, last = 0, nil
    lin:register_full_backward_hook(function(_, gi) n = n + 1; last = gi[1] end)
    local loss = lin(x):sum()
    loss:backward(nil, {retain_graph = true})
    local first = last
    loss:backward()
    assert.are.equal(2, n)
    assert_same(last, first, 1e-12, "same grad_input both times")
    assert_same(x.grad, first * 2, 1e-12, "x.grad accumulated twice")
  end)

  it("without an input that requires grad, fire once with grad_input all nil", function()
    local lin = lin64(3, 2)
    local x = H.t64({2, 3}, -1, 1, 1, {requires_grad = false})
    local calls, gi, go = 0, nil, nil
    lin:register_full_backward_hook(function(_, a, b) calls = calls + 1; gi, go = a, b end)
    lin(x):sum():backward()
    assert.are.equal(1, calls)
    assert.are.equal(1, gi.n)
    assert.is_nil(gi[1])
    H.assert_all(go[1], 1, 0, "grad_output")
    assert.is_not_nil(lin.weight.grad)
    -- returning a gradient for an input without one is an error
    local m2 = lin64(3, 2)
    m2:register_full_backward_hook(function(_, a) return {keel.zeros_like(x)} end)
    H.assert_error(function() m2(x):sum():backward() end,
      "full backward hook: grad_input[1]: the module has no gradient there")
  end)

  it("give each of several inputs its gradient (nil for non-tensors) and replace one", function()
    local m = Mul()
    local a = H.t64({2, 3}, -1, 1, 41)
    local b = H.t64({2, 3}, -1, 1, 42)
    local c = H.t64({2, 3}, -1, 1, 43, {requires_grad = false})
    local gi, go
    local h = m:register_full_backward_hook(function(_, x, y) gi, go = x, y end)
    local out, tag = m(a, b, "tag")
    assert.are.equal("tag", tag)
    ;(out * c):sum():backward()
    assert.are.equal(3, gi.n)
    assert.are.equal(2, go.n)
    assert.is_nil(gi[3])
    assert.is_nil(go[2])
    assert_same(go[1], c, 1e-12, "grad_output")
    assert_same(gi[1], c * b, 1e-12, "grad_input[1]")
    assert_same(gi[2], c * a, 1e-12, "grad_input[2]")
    assert_same(a.grad, c * b, 1e-12, "a.grad")
    h:remove()
    a.grad, b.grad = nil, nil
    m:register_full_backward_hook(function(_, x) return {nil, x[2] * 0} end)
    ;(m(a, b) * c):sum():backward()
    assert_same(a.grad, c * b, 1e-12, "a.grad kept")
    H.assert_all(b.grad, 0, 0, "b.grad replaced by zeros")
  end)

  it("see every result of an RNN (output, h_n) as grad_output", function()
    keel.manual_seed(5)
    local rnn = nn.RNN(3, 4):double()
    local x = H.t64({5, 2, 3}, -1, 1, 51)
    local gi, go
    rnn:register_full_backward_hook(function(_, a, b) gi, go = a, b end)
    local out, hn = rnn(x)
    out:retain_grad(); hn:retain_grad()
    local c = H.t64({1, 2, 4}, -1, 1, 52, {requires_grad = false})
    ;(out:sum() + (hn * c):sum()):backward()
    assert.are.equal(2, go.n)
    assert_same(go[1], out.grad, 1e-12, "grad of output")
    assert_same(go[2], hn.grad, 1e-12, "grad of h_n")
    assert_same(gi[1], x.grad, 1e-12, "grad_input")
  end)

  it("leave gradients exactly as without hooks (gradcheck through the routing)", function()
    local m = Mul()
    m:register_full_backward_hook(function() end)
    m:register_full_backward_pre_hook(function() end)
    H.gradcheck(function(a, b) return (m(a, b)) end,
      {H.t64({2, 3}, -1, 1, 61), H.t64({3}, -1, 1, 62)}, {name = "Mul with backward hooks"})
    local lin = lin64(3, 2)
    lin:register_full_backward_hook(function() end)
    H.gradcheck(function(x) return lin(x):tanh() end, {H.t64({2, 3}, -1, 1, 63)},
      {name = "Linear with a backward hook"})
  end)

  it("are skipped with grad mode off and cost nothing once removed", function()
    local lin = lin64(3, 2)
    local n = 0
    local h = lin:register_full_backward_hook(function() n = n + 1 end)
    local x = H.t64({2, 3})
    local y = keel.no_grad(function() return lin(x) end)
    assert.is_false(y.requires_grad)
    assert.are.equal("view", lin(x).grad_fn)   -- the routing node
    h:remove()
    local y2 = lin(x)
    assert.are.equal(lin:forward(x).grad_fn, y2.grad_fn)   -- no routing node after removal
    y2:sum():backward()
    assert.are.equal(0, n)
  end)

  it("do not keep the graph alive", function()
    local lin = lin64(8, 8)
    lin:register_full_backward_hook(function() end)
    lin:register_full_backward_pre_hook(function() end)
    collectgarbage(); collectgarbage()
    local base = keel.memory_stats().live_tensors
    for _ = 1, 20 do
      local x = H.t64({4, 8})
      local y = lin(x)
      y:sum():backward()
    end
    lin:zero_grad()
    collectgarbage(); collectgarbage()
    assert.are.equal(base, keel.memory_stats().live_tensors)
  end)
end)

describe("errors raised inside hooks", function()
  it("surface with the hook's message first and its traceback, and change nothing", function()
    local lin = lin64(3, 2)
    local w = lin.weight:clone()
    local fail = true
    local fired = 0
    lin:register_forward_pre_hook(function() fired = fired + 1 end)
    lin:register_forward_hook(function()
      if fail then error("bad forward hook") end
    end)
    local x = H.t64({2, 3}, -1, 1, 1, {requires_grad = false})
    local err = H.assert_error(function() lin(x) end, "bad forward hook", "stack traceback",
      "module_hooks_spec.lua", "forward hook #1 of Linear")
    assert.is_truthy(err:find("^[^\n]*bad forward hook"), "the hook's message comes first: " .. err)
    assert.are.same({pre = 1, fwd = 1, bpre = 0, bwd = 0}, nn._hook_counts(lin))
    assert_same(lin.weight, w, 0, "weights")
    fail = false
    assert_same(lin(x), lin:forward(x), 0, "the next call works")
    assert.are.equal(2, fired)
  end)

  it("in a pre-hook stop the call before forward", function()
    local m = Id()
    local ran = false
    m.forward = function() ran = true end
    m:register_forward_pre_hook(function() error({code = 1}) end)
    H.assert_error(function() m(1) end, "(error object is a table value)", "stack traceback",
      "forward pre-hook #1 of Id")
    assert.is_false(ran)
  end)

  it("in a backward hook abort backward with the traceback and no .grad change", function()
    local lin = lin64(3, 2)
    lin:register_full_backward_hook(function() error("bad backward hook") end)
    local x = H.t64({2, 3})
    H.assert_error(function() lin(x):sum():backward() end, "bad backward hook", "stack traceback",
      "module_hooks_spec.lua")
    assert.is_nil(x.grad)
    assert.is_nil(lin.weight.grad)
  end)
end)

describe("hooks and the rest of the module", function()
  it("survive to(), are not in state_dict and survive load_state_dict", function()
    local lin = nn.Linear(3, 2)
    local n = 0
    lin:register_forward_hook(function() n = n + 1 end)
    lin:to("float64")
    local sd = lin:state_dict()
    local keys = {}
    for k in pairs(sd) do keys[#keys + 1] = k end
    table.sort(keys)
    assert.are.same({"bias", "weight"}, keys)
    lin:load_state_dict(sd)
    lin(keel.zeros({1, 3}, {dtype = "float64"}))
    assert.are.equal(1, n)
    for k, v in pairs(lin) do
      assert.is_false(type(v) == "function", "a function field " .. tostring(k))
    end
  end)
end)

describe("model:on_grad", function()
  it("registers fn with each parameter's name in hooks.grad; the handle removes all", function()
    local net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    local f = function() end
    local h = net:on_grad(f)
    local names = {}
    for name, p in net:named_parameters() do
      local list = hooks.grad[p]
      assert.is_not_nil(list, name)
      assert.are.equal(1, #list)
      assert.are.equal(f, list[1].fn)
      names[#names + 1] = list[1].name
    end
    assert.are.same({"1.weight", "1.bias", "3.weight", "3.bias"}, names)
    local h2 = net[3]:on_grad(f)
    assert.are.equal(2, #hooks.grad[net[3].weight])
    assert.are.equal("weight", hooks.grad[net[3].weight][2].name)   -- relative to net[3]
    h:remove()
    h:remove()
    assert.is_nil(hooks.grad[net[1].weight])
    assert.are.equal(1, #hooks.grad[net[3].weight])
    h2:remove()
    for _, p in ipairs(net:parameters()) do assert.is_nil(hooks.grad[p]) end
  end)

  it("filters by a name pattern or a function", function()
    local net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    local h1 = net:on_grad(function() end, {filter = "weight$"})
    assert.is_not_nil(hooks.grad[net[1].weight])
    assert.is_nil(hooks.grad[net[1].bias])
    h1:remove()
    local h2 = net:on_grad(function() end, {filter = function(name) return name:sub(1, 1) == "2" end})
    assert.is_nil(hooks.grad[net[1].weight])
    assert.is_not_nil(hooks.grad[net[2].bias])
    h2:remove()
  end)

  it("follows the parameters through to(dtype)", function()
    local lin = nn.Linear(2, 2)
    local h = lin:on_grad(function() end)
    local old = lin.weight
    lin:to("float64")
    assert.are_not.equal(old, lin.weight)
    assert.is_nil(hooks.grad[old])
    assert.are.equal("weight", hooks.grad[lin.weight][1].name)
    h:remove()
    assert.is_nil(hooks.grad[lin.weight])
  end)

  it("checks its arguments", function()
    local lin = nn.Linear(2, 2)
    H.assert_error(function() lin:on_grad("x") end,
      "on_grad: argument #1: expected a function(name, grad, stats), got string")
    H.assert_error(function() lin:on_grad(function() end, {filter = 3}) end,
      "on_grad: option 'filter': expected a Lua pattern (string) or a function(name, p), got number")
    assert.is_nil(hooks.grad[lin.weight])
  end)
end)

describe("anomaly scopes in Module:__call", function()
  local saved_enter, saved_leave
  before_each(function() saved_enter, saved_leave = hooks.scope_enter, hooks.scope_leave end)
  after_each(function() hooks.scope_enter, hooks.scope_leave = saved_enter, saved_leave end)

  local function install(log, names)
    local next_tok = 0
    hooks.scope_enter = function(m)
      next_tok = next_tok + 1
      log[#log + 1] = "enter " .. names[m]
      return {tok = next_tok, name = names[m]}
    end
    hooks.scope_leave = function(tok) log[#log + 1] = "leave " .. tok.name .. "#" .. tok.tok end
  end

  it("bracket every module call in nesting order", function()
    local l1, l2 = nn.Linear(3, 3), nn.Linear(3, 1)
    local net = nn.Sequential(l1, l2)
    local log = {}
    install(log, {[net] = "net", [l1] = "l1", [l2] = "l2"})
    net(keel.zeros({2, 3}))
    assert.are.same({"enter net", "enter l1", "leave l1#2", "enter l2", "leave l2#3", "leave net#1"}, log)
  end)

  it("close the scope when forward or a hook raises, and include the hooks inside", function()
    local l1 = nn.Linear(3, 3)
    local net = nn.Sequential(l1)
    local log = {}
    install(log, {[net] = "net", [l1] = "l1"})
    l1:register_forward_hook(function() log[#log + 1] = "hook l1" end)
    H.assert_error(function() net(keel.zeros({2, 5})) end, "linear")
    assert.are.same({"enter net", "enter l1", "leave l1#2", "leave net#1"}, log)
    log = {}
    install(log, {[net] = "net", [l1] = "l1"})
    net(keel.zeros({2, 3}))
    assert.are.same({"enter net", "enter l1", "hook l1", "leave l1#2", "leave net#1"}, log)
  end)

  it("are not entered once scope_enter is nil again", function()
    local lin = nn.Linear(3, 3)
    local n = 0
    hooks.scope_enter = function() n = n + 1 end
    hooks.scope_leave = function() end
    lin(keel.zeros({1, 3}))
    hooks.scope_enter, hooks.scope_leave = nil, nil
    lin(keel.zeros({1, 3}))
    assert.are.equal(1, n)
  end)
end)
