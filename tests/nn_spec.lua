-- nn_spec.lua: keel.nn's module system (classes, registration order,
-- traversals, modes, conversion, state dicts, printing), the containers,
-- nn.functional.linear and the layers of bindings/keel/nn/linear.lua.
local H = require "helper"
local keel = H.keel
local nn = keel.nn
local F = nn.functional
local close = H.assert_close

-- Names from a (name, value) iterator, in order.
local function names(it)
  local out = {}
  for name in it do out[#out + 1] = name end
  return out
end

local function sd_names(sd)
  local out = {}
  for k in pairs(sd) do out[#out + 1] = k end
  return out
end

local function same_values(a, b)
  return (a - b):abs():max():item() == 0
end

describe("nn.Parameter", function()
  it("marks a tensor, turns requires_grad on and returns the same tensor", function()
    local t = keel.zeros{2, 3}
    local p = nn.Parameter(t)
    assert.are.equal(t, p)
    assert.is_true(p.requires_grad)
    assert.is_true(nn.is_parameter(p))
    assert.is_false(nn.is_parameter(keel.zeros{2}))
  end)

  it("stays a parameter when frozen", function()
    local p = nn.Parameter(keel.zeros{2}, false)
    assert.is_false(p.requires_grad)
    assert.is_true(nn.is_parameter(p))
    local m = nn.Module()
    m.w = p
    assert.are.equal(1, #m:parameters())
    assert.are.equal(0, #m:buffers())
  end)

  it("detaches a non-leaf so the parameter is a leaf", function()
    local x = keel.ones({2}, {requires_grad = true})
    local p = nn.Parameter(x * 2)
    assert.is_true(p.is_leaf)
    assert.is_true(p.requires_grad)
    close(p, {2, 2})
  end)

  it("rejects a non-tensor", function()
    H.assert_error(function() nn.Parameter({1, 2}) end,
      "Parameter: argument #1: expected a keel.Tensor, got table")
  end)
end)

describe("nn.Module classes", function()
  it("extend makes a callable class whose call runs init", function()
    local Counter = nn.Module:extend("Counter")
    function Counter:init(n) self.n = n end
    function Counter:forward(x) return x + self.n end
    local c = Counter(5)
    assert.are.equal(5, c.n)
    assert.are.equal(7, c(2))
    assert.is_true(c.training)
    assert.is_true(nn.is_module(c))
    assert.is_false(nn.is_module({}))
    assert.are.equal("Counter", c.__name)
    assert.are.equal("keel.nn class Counter", tostring(Counter))
  end)

  it("subclasses inherit, override and reach the parent through super", function()
    local Base = nn.Module:extend("Base")
    function Base:init(n) self.n = n end
    function Base:forward(x) return x * self.n end
    function Base:extra_repr() return "n=" .. self.n end
    local Twice = Base:extend("Twice")
    function Twice:init(n) Twice.super.init(self, n); self.twice = true end
    function Twice:forward(x) return Base.forward(self, x) * 2 end
    local Deeper = Twice:extend("Deeper")
    local d = Deeper(3)
    assert.are.equal(12, d(2))
    assert.is_true(d.twice)
    assert.are.equal("Deeper(n=3)", tostring(d))
    assert.are.equal(6, Base(3)(2))
    -- a method added to the base later is seen by the subclasses
    function Base:extra() return "late" end
    assert.are.equal("late", d:extra())
  end)

  it("reports a missing forward with the class name", function()
    local NoForward = nn.Module:extend("NoForward")
    H.assert_error(function() NoForward()(1) end, "NoForward: forward is not implemented")
  end)

  it("extend checks its receiver and name", function()
    H.assert_error(function() nn.Module:extend() end,
      "extend: argument #1: expected a class name (string), got nil")
    local m = nn.Module()
    H.assert_error(function() m:extend("X") end, "extend: called on an instance")
  end)
end)

-- A user module whose fields are added in non-alphabetical order.
local Block = nn.Module:extend("Block")
function Block:init()
  self.proj = nn.Linear(4, 3)
  self.alpha = nn.Parameter(keel.ones{1})
  self.features = nn.Sequential(nn.Linear(3, 5), nn.Identity(), nn.Sequential(nn.Linear(5, 2)))
  self.running = keel.zeros{2}
  self.note = "not a tensor"
end
function Block:forward(x)
  return self.features(self.proj(x)) * self.alpha + self.running
end

describe("registration order and names", function()
  it("named_parameters follows assignment order with dotted 1-based names", function()
    local b = Block()
    -- a module's own parameters come before its children's, as in PyTorch
    assert.are.same({"alpha", "proj.weight", "proj.bias", "features.1.weight", "features.1.bias",
      "features.3.1.weight", "features.3.1.bias"}, names(b:named_parameters()))
    assert.are.same({"running"}, names(b:named_buffers()))
    assert.are.same({"proj", "features"}, names(b:named_children()))
    assert.are.same({"", "proj", "features", "features.1", "features.2", "features.3", "features.3.1"},
      names(b:named_modules()))
    local ps = b:parameters()
    assert.are.equal(7, #ps)
    assert.are.equal(b.alpha, ps[1])
    assert.are.equal(b.proj.weight, ps[2])
    assert.are.equal(2, #b:children())
    assert.are.equal(7, #b:modules())
    assert.are.same({"alpha"}, names(b:named_parameters(false)))
  end)

  it("a field set to nil disappears; set again it comes last", function()
    local b = Block()
    b.proj = nil
    assert.are.same({"features"}, names(b:named_children()))
    b.proj = nn.Linear(4, 3)
    assert.are.same({"features", "proj"}, names(b:named_children()))
  end)

  it("fields stored with rawset are found, after the others", function()
    local m = nn.Module()
    m.b = nn.Identity()
    rawset(m, "a", nn.Identity())
    assert.are.same({"b", "a"}, names(m:named_children()))
  end)

  it("plain Lua tables of modules are not children", function()
    local m = nn.Module()
    m.list = {nn.Linear(2, 2)}
    assert.are.equal(0, #m:parameters())
  end)

  it("shared parameters are listed once, under their first name", function()
    local m = nn.Module()
    m.enc = nn.Linear(3, 3)
    m.dec = nn.Linear(3, 3)
    m.dec.weight = m.enc.weight
    assert.are.same({"enc.weight", "enc.bias", "dec.bias"}, names(m:named_parameters()))
    assert.are.equal(3, #m:parameters())
    assert.are.equal(9 + 3 + 3, m:num_parameters())
    -- the state dict has both names, as PyTorch's
    assert.are.same({"enc.weight", "enc.bias", "dec.weight", "dec.bias"}, sd_names(m:state_dict()))
  end)

  it("a shared module is visited once, but printed and saved under each name", function()
    local shared = nn.Linear(2, 2)
    local s = nn.Sequential(shared, nn.Identity(), shared)
    assert.are.equal(2, #s:parameters())
    assert.are.same({"", "1", "2"}, names(s:named_modules()))
    assert.are.same({"1", "2"}, names(s:named_children()))
    assert.are.equal(2, #s:children())
    assert.are.same({"1.weight", "1.bias", "3.weight", "3.bias"}, sd_names(s:state_dict()))
    assert.truthy(tostring(s):find("(3): Linear", 1, true))
    local d = nn.ModuleDict{a = shared, b = shared}
    assert.are.same({"a", "b"}, d:keys())
    assert.are.equal(2, #d)
    assert.are.equal(2, #d:values())
  end)

  it("register_buffer and register_parameter", function()
    local m = nn.Module()
    m:register_parameter("w", keel.zeros{2})
    m:register_buffer("mask", keel.ones{2}, {persistent = false})
    m:register_buffer("stat", keel.zeros{1})
    assert.is_true(nn.is_parameter(m.w))
    assert.are.same({"mask", "stat"}, names(m:named_buffers()))
    assert.are.same({"w", "stat"}, sd_names(m:state_dict()))
    H.assert_error(function() m:register_buffer(1, keel.zeros{1}) end,
      "register_buffer: argument #1: expected a name (string), got number")
    H.assert_error(function() m:register_buffer("x", 3) end,
      "register_buffer: argument #2: expected a keel.Tensor or nil, got number")
    H.assert_error(function() m:register_buffer("p", nn.Parameter(keel.zeros{1})) end,
      "register_buffer: 'p' is a parameter, expected a plain tensor")
    H.assert_error(function() m:register_parameter(2, keel.zeros{1}) end,
      "register_parameter: argument #1: expected a name (string), got number")
  end)

  it("apply visits children before their parent", function()
    local seen = {}
    local s = nn.Sequential(nn.Linear(1, 1), nn.Sequential(nn.Identity()))
    assert.are.equal(s, s:apply(function(m) seen[#seen + 1] = m.__name end))
    assert.are.same({"Linear", "Identity", "Sequential", "Sequential"}, seen)
    H.assert_error(function() s:apply(1) end, "apply: argument #1: expected a function, got number")
  end)
end)

describe("modes and gradients", function()
  it("train/eval set training on every module", function()
    local b = Block()
    assert.are.equal(b, b:eval())
    for _, m in ipairs(b:modules()) do assert.is_false(m.training) end
    b.features:train()
    assert.is_false(b.training)
    assert.is_true(b.features[3][1].training)
    b:train(true)
    for _, m in ipairs(b:modules()) do assert.is_true(m.training) end
    H.assert_error(function() b:train("no") end, "train: argument #1: expected a boolean, got string")
  end)

  it("zero_grad sets grads to nil, or zeroes them in place", function()
    local b = Block()
    b(keel.randn{2, 4}):sum():backward()
    for _, p in ipairs(b:parameters()) do assert.is_not_nil(p.grad) end
    b:zero_grad{set_to_none = false}
    for _, p in ipairs(b:parameters()) do H.assert_all(p.grad, 0) end
    assert.are.equal(b, b:zero_grad())
    for _, p in ipairs(b:parameters()) do assert.is_nil(p.grad) end
  end)

  it("requires_grad_ freezes and unfreezes every parameter", function()
    local b = Block()
    local n = b:num_parameters()
    b.proj:requires_grad_(false)
    assert.are.equal(n - 15, b:num_parameters(true))
    assert.are.equal(n, b:num_parameters())
    b:requires_grad_()
    assert.are.equal(n, b:num_parameters(true))
  end)
end)

describe("Module:to", function()
  it("converts parameters and floating buffers, keeping them parameters", function()
    local m = nn.Module()
    m.enc = nn.Linear(3, 2)
    m.dec = nn.Linear(3, 2)
    m.dec.weight = m.enc.weight
    m.dec.bias.requires_grad = false
    m.count = keel.zeros({1}, {dtype = "int64"})
    m.stat = keel.ones{2}
    m.enc(keel.ones{1, 3}):sum():backward()
    local before = m.enc.weight:totable()
    assert.are.equal(m, m:to("float64"))
    assert.are.equal("float64", m.enc.weight.dtype)
    assert.are.equal("float64", m.enc.weight.grad.dtype)
    assert.are.equal("float64", m.stat.dtype)
    assert.are.equal("int64", m.count.dtype)
    assert.are.equal(m.enc.weight, m.dec.weight)
    assert.is_true(nn.is_parameter(m.enc.weight))
    assert.is_true(m.enc.weight.is_leaf)
    assert.is_true(m.enc.weight.requires_grad)
    assert.is_false(m.dec.bias.requires_grad)
    assert.is_true(nn.is_parameter(m.dec.bias))
    assert.are.equal(3, #m:parameters())
    close(m.enc.weight, before, 1e-7)
    local y = m.enc(keel.ones({3}, {dtype = "float64"}))
    assert.are.equal("float64", y.dtype)
    m:float()
    assert.are.equal("float32", m.enc.weight.dtype)
    m:double()
    assert.are.equal("float64", m.stat.dtype)
  end)

  it("keeps tensors that need no conversion", function()
    local l = nn.Linear(2, 2)
    local w = l.weight
    l:to("cpu"); l:to("float32"); l:cpu()
    assert.are.equal(w, l.weight)
    l:to(keel.zeros({1}, {dtype = "f64"}))
    assert.are.equal("float64", l.weight.dtype)
    l:to{dtype = "float32", device = "cpu"}
    assert.are.equal("float32", l.weight.dtype)
  end)

  it("rejects non-floating dtypes and bad arguments", function()
    local l = nn.Linear(2, 2)
    H.assert_error(function() l:to("int64") end,
      "to: dtype int64 is not a floating-point dtype, expected float32 or float64")
    H.assert_error(function() l:to{dtype = "long"} end,
      "to: dtype long is not a floating-point dtype, expected float32 or float64")
    H.assert_error(function() l:to(3) end,
      "to: argument #1: expected a dtype, a device, a tensor or {dtype=, device=}, got number")
  end)
end)

describe("state_dict", function()
  it("holds detached parameters and buffers in PyTorch's order", function()
    local b = Block()
    local sd = b:state_dict()
    assert.are.same({"alpha", "running", "proj.weight", "proj.bias", "features.1.weight",
      "features.1.bias", "features.3.1.weight", "features.3.1.bias"}, sd_names(sd))
    assert.is_false(sd["proj.weight"].requires_grad)
    assert.is_true(same_values(sd["proj.weight"], b.proj.weight))
    local kept = b:state_dict{keep_vars = true}
    assert.are.equal(b.proj.weight, kept["proj.weight"])
  end)

  it("round-trips into a fresh model", function()
    keel.manual_seed(11)
    local a, b = Block(), Block()
    assert.is_false(same_values(a.proj.weight, b.proj.weight))
    keel.no_grad(function() a.running:fill_(0.5) end)
    local res = b:load_state_dict(a:state_dict())
    assert.are.same({missing = {}, unexpected = {}}, res)
    for name, v in pairs(a:state_dict()) do
      assert.is_true(same_values(v, b:state_dict()[name]), name)
    end
    local x = keel.randn{3, 4}
    assert.is_true(same_values(a(x), b(x)))
    -- copied in place: the parameters are the same tensors as before
    assert.is_true(nn.is_parameter(b.proj.weight))
    assert.is_true(b.proj.weight.requires_grad)
  end)

  it("strict: lists the missing and unexpected keys and copies nothing", function()
    local a, b = Block(), Block()
    local sd = a:state_dict()
    sd["proj.bias"] = nil
    sd["features.1.weight"] = nil
    sd["extra.weight"] = keel.zeros{1}
    local before = b.proj.weight:clone()
    H.assert_error(function() b:load_state_dict(sd) end,
      "load_state_dict: missing keys: proj.bias, features.1.weight; unexpected keys: extra.weight")
    assert.is_true(same_values(before, b.proj.weight))
    -- a plain table works too
    H.assert_error(function() b:load_state_dict({alpha = keel.ones{1}}) end,
      "load_state_dict: missing keys: running, proj.weight")
  end)

  it("non-strict: copies what matches and returns the rest", function()
    local a, b = Block(), Block()
    local sd = a:state_dict()
    sd["proj.bias"] = nil
    sd["zzz"] = keel.zeros{1}
    local res = b:load_state_dict(sd, {strict = false})
    assert.are.same({"proj.bias"}, res.missing)
    assert.are.same({"zzz"}, res.unexpected)
    assert.is_true(same_values(a.proj.weight, b.proj.weight))
    assert.is_false(same_values(a.proj.bias, b.proj.bias))
  end)

  it("reports shape mismatches and non-tensors, strict or not", function()
    local b = Block()
    local sd = b:state_dict()
    sd["proj.weight"] = keel.zeros{4, 3}
    sd["alpha"] = 1
    H.assert_error(function() b:load_state_dict(sd, {strict = false}) end,
      "load_state_dict: alpha is a number, expected a keel.Tensor; proj.weight has shape [4,3], expected [3,4]")
    H.assert_error(function() b:load_state_dict(3) end,
      "load_state_dict: argument #1: expected a state dict (table), got number")
  end)

  it("converts dtypes on load", function()
    local a = nn.Linear(2, 2, {dtype = "float64"})
    local b = nn.Linear(2, 2)
    b:load_state_dict(a:state_dict())
    assert.are.equal("float32", b.weight.dtype)
    close(b.weight, a.weight:totable(), 1e-6)
  end)

  it("errors on a module that contains itself", function()
    local m = nn.Module()
    m.me = m
    H.assert_error(function() m:state_dict() end, "state_dict: module me contains itself")
  end)
end)

describe("printing", function()
  it("prints PyTorch's module tree", function()
    local b = Block()
    assert.are.equal(table.concat({
      "Block(",
      "  (proj): Linear(in_features=4, out_features=3, bias=true)",
      "  (features): Sequential(",
      "    (1): Linear(in_features=3, out_features=5, bias=true)",
      "    (2): Identity()",
      "    (3): Sequential(",
      "      (1): Linear(in_features=5, out_features=2, bias=true)",
      "    )",
      "  )",
      ")"}, "\n"), tostring(b))
    assert.are.equal("Linear(in_features=2, out_features=1, bias=false)",
      tostring(nn.Linear(2, 1, {bias = false})))
  end)

  it("puts a multi-line extra_repr before the children", function()
    local M = nn.Module:extend("M")
    function M:init() self.c = nn.Identity() end
    function M:extra_repr() return "a=1\nb=2" end
    assert.are.equal("M(\n  a=1\n  b=2\n  (c): Identity()\n)", tostring(M()))
  end)
end)

describe("containers", function()
  it("Sequential from a list or arguments; index, length, ipairs, add", function()
    local l1, l2 = nn.Linear(2, 3), nn.Linear(3, 1)
    local s = nn.Sequential{l1, nn.Identity()}
    assert.are.equal(2, #s)
    assert.are.equal(l1, s[1])
    assert.are.equal(s, s:add(l2))
    assert.are.equal(3, #s)
    local seen = 0
    for i, m in ipairs(s) do seen = seen + 1; assert.are.equal(s[i], m) end
    assert.are.equal(3, seen)
    local x = keel.randn{4, 2}
    assert.is_true(same_values(s(x), l2(l1(x))))
    local s2 = nn.Sequential(l1, l2)
    assert.is_true(same_values(s2(x), l2(l1(x))))
    s2:append(nn.Identity())
    assert.are.equal(3, #s2)
    assert.are.equal(x, nn.Sequential()(x))
    H.assert_error(function() nn.Sequential{l1, 3} end,
      "Sequential: element 2: expected a Module, got number")
    H.assert_error(function() nn.Sequential(l1, nil, l2) end,
      "Sequential: element 2: expected a Module, got nil")
  end)

  it("Sequential passes every argument to the first module and returns all results of the last", function()
    local Two = nn.Module:extend("Two")
    function Two:forward(a, b) return a + b, a - b end
    local s = nn.Sequential(Two(), nn.Identity(), Two())
    -- Identity gets only the first result
    local r1, r2 = nn.Sequential(Two())(3, 1)
    assert.are.same({4, 2}, {r1, r2})
    local Pair = nn.Module:extend("Pair")
    function Pair:forward(a) return a, -a end
    local p1, p2 = nn.Sequential(Two(), Pair())(3, 1)
    assert.are.same({4, -4}, {p1, p2})
    assert.are.equal(3, #s)
  end)

  it("ModuleList: append, extend, ipairs, no forward", function()
    local ml = nn.ModuleList{nn.Linear(1, 1)}
    ml:append(nn.Linear(1, 2)):extend{nn.Identity(), nn.Linear(2, 2)}
    assert.are.equal(4, #ml)
    local n = 0
    for _ in ipairs(ml) do n = n + 1 end
    assert.are.equal(4, n)
    assert.are.same({"1.weight", "1.bias", "2.weight", "2.bias", "4.weight", "4.bias"},
      names(ml:named_parameters()))
    H.assert_error(function() ml(1) end, "ModuleList: forward is not implemented")
    H.assert_error(function() ml:append(5) end, "ModuleList: element 5: expected a Module, got number")
    -- extend on the class still makes a subclass
    local MyList = nn.ModuleList:extend("MyList")
    assert.are.equal(2, #MyList{nn.Identity(), nn.Identity()})
    H.assert_error(function() nn.ModuleList(3) end,
      "ModuleList: argument #1: expected a list of modules, got number")
  end)

  it("ModuleDict: sorted from a map, ordered from pairs; names may not hide methods", function()
    local d = nn.ModuleDict{b = nn.Linear(1, 1), a = nn.Identity()}
    assert.are.same({"a", "b"}, d:keys())
    assert.are.equal(2, #d)
    local o = nn.ModuleDict{{"z", nn.Identity()}, {"y", nn.Linear(1, 1)}}
    assert.are.same({"z", "y"}, o:keys())
    o:add("x", nn.Identity())
    assert.are.same({"z", "y", "x"}, names(o:items()))
    assert.are.equal(3, #o:values())
    assert.are.equal("Linear", o.y.__name)
    assert.are.same({"y.weight", "y.bias"}, names(o:named_parameters()))
    H.assert_error(function() o:add("train", nn.Identity()) end,
      "ModuleDict: name 'train' would hide a field or method of the module")
    H.assert_error(function() o:add("training", nn.Identity()) end, "would hide")
    H.assert_error(function() o:add("w", 1) end, "ModuleDict: element w: expected a Module, got number")
    H.assert_error(function() nn.ModuleDict{[2.5] = nn.Identity()} end, "ModuleDict: keys must be strings")
  end)
end)

describe("nn.functional", function()
  it("holds the engine's functional ops and linear", function()
    -- (an area may wrap a C function in Lua: only presence is checked)
    for k in pairs(require("keel.core")._nn) do assert.is_function(F[k], k) end
    assert.are.equal(F, nn.F)
    local x, w, b = H.t64({3, 4}), H.t64({2, 4}, -1, 1, 2), H.t64({2}, -1, 1, 3)
    local ref = H.ref_matmul(x, w:t())
    close(F.linear(x, w), ref)
    close(F.linear(x, w, b) - b, ref, 1e-12)
  end)

  it("checks its arguments", function()
    local w = keel.zeros{2, 4}
    H.assert_error(function() F.linear(keel.zeros{3, 5}, w) end,
      "linear: input has shape [3,5], expected 4 features in the last dimension")
    H.assert_error(function() F.linear(keel.zeros{3, 4}, keel.zeros{4}) end,
      "linear: weight has 1 dimensions, expected 2 ([out, in])")
    H.assert_error(function() F.linear(1, w) end, "linear: argument #1: expected a keel.Tensor, got number")
    H.assert_error(function() F.linear(keel.zeros{4}, 1) end, "linear: argument #2: expected a keel.Tensor, got number")
    H.assert_error(function() F.linear(keel.zeros{4}, w, 1) end,
      "linear: argument #3: expected a keel.Tensor or nil, got number")
  end)
end)

describe("nn.Linear", function()
  it("computes x @ W^T + b for 1-D, 2-D and 3-D inputs", function()
    local l = nn.Linear(4, 3, {dtype = "float64"})
    assert.are.same({3, 4}, l.weight.shape)
    assert.are.same({3}, l.bias.shape)
    assert.are.equal("float64", l.weight.dtype)
    local x = H.t64({5, 4}, -1, 1, 9, {requires_grad = false})
    local ref = H.ref_binary(H.ref_matmul(x, l.weight:t()), l.bias, function(a, b) return a + b end)
    close(l(x), ref)
    close(l(x[2]), ref[2])
    local x3 = x:reshape{1, 5, 4}
    close(l(x3), {ref})
  end)

  it("without bias", function()
    local l = nn.Linear(3, 2, {bias = false})
    assert.is_nil(l.bias)
    assert.are.equal(1, #l:parameters())
    local x = keel.randn{2, 3}
    close(l(x), H.ref_matmul(x, l.weight:t()), 1e-6)
  end)

  it("passes a gradient check (input, weight and bias)", function()
    local l = nn.Linear(4, 3, {dtype = "float64"})
    local x = H.t64({2, 4}, -1, 1, 21)
    H.gradcheck(function(xx) return l(xx) end, {x, l.weight, l.bias}, {name = "Linear"})
    local l3 = nn.Linear(3, 2, {dtype = "float64", bias = false})
    H.gradcheck(function(xx) return l3(xx):tanh() end, {H.t64({2, 2, 3}, -1, 1, 22), l3.weight},
      {name = "Linear 3-D, no bias"})
  end)

  it("starts within PyTorch's bounds 1/sqrt(in_features)", function()
    local l = nn.Linear(100, 50)
    local bound = 1 / math.sqrt(100)
    assert.is_true(l.weight:abs():max():item() <= bound)
    assert.is_true(l.bias:abs():max():item() <= bound)
    assert.is_true(l.weight:abs():max():item() > 0.9 * bound)
    local l0 = nn.Linear(0, 2)
    H.assert_all(l0.bias, 0)
  end)

  it("checks its arguments", function()
    H.assert_error(function() nn.Linear(2.5, 3) end,
      "Linear: in_features: expected a non-negative integer, got 2.5")
    H.assert_error(function() nn.Linear(2, -1) end,
      "Linear: out_features: expected a non-negative integer, got -1")
    H.assert_error(function() nn.Linear(2, 3, "x") end, "Linear: options: expected a table, got string")
    H.assert_error(function() nn.Linear(2, 3)(keel.zeros{2, 3}) end,
      "linear: input has shape [2,3], expected 2 features in the last dimension")
  end)

  it("trains: a small MLP fit by plain SGD lowers the loss", function()
    keel.manual_seed(3)
    local Relu = nn.Module:extend("Relu")
    function Relu:forward(x) return x:relu() end
    local net = nn.Sequential(nn.Linear(2, 16), Relu(), nn.Linear(16, 1))
    local x = keel.randn{64, 2}
    local y = (x:narrow(2, 1, 1) * x:narrow(2, 2, 1)):tanh()
    local function loss_fn() return ((net(x) - y) ^ 2):mean() end
    local first = loss_fn():item()
    for _ = 1, 200 do
      net:zero_grad()
      local loss = loss_fn()
      loss:backward()
      keel.no_grad(function()
        for _, p in ipairs(net:parameters()) do p:sub_(p.grad * 0.1) end
      end)
    end
    local last = loss_fn():item()
    assert.is_true(last < 0.5 * first, ("loss %g -> %g"):format(first, last))
  end)
end)

describe("Identity, Flatten, Unflatten", function()
  it("Identity returns its input", function()
    local x = keel.zeros{2}
    assert.are.equal(x, nn.Identity(1, 2)(x))
  end)

  it("Flatten keeps the batch dimension by default (1-based dims)", function()
    local x = keel.zeros{2, 3, 4, 5}
    H.assert_shape(nn.Flatten()(x), {2, 60})
    H.assert_shape(nn.Flatten(1)(x), {120})
    H.assert_shape(nn.Flatten(2, 3)(x), {2, 12, 5})
    assert.are.equal("Flatten(start_dim=2, end_dim=-1)", tostring(nn.Flatten()))
    H.assert_error(function() nn.Flatten(1.5) end, "Flatten: start_dim and end_dim: expected integers")
    local xg = H.t64({2, 2, 3})
    H.gradcheck(function(a) return nn.Flatten()(a) end, {xg})
  end)

  it("Unflatten splits one dimension", function()
    local x = keel.zeros{2, 12}
    H.assert_shape(nn.Unflatten(2, {3, 4})(x), {2, 3, 4})
    H.assert_shape(nn.Unflatten(-1, {2, 6})(x), {2, 2, 6})
    H.assert_shape(nn.Unflatten(1, {1, 2})(x), {1, 2, 12})
    assert.are.equal("Unflatten(dim=2, unflattened_size={3, 4})", tostring(nn.Unflatten(2, {3, 4})))
    H.assert_error(function() nn.Unflatten(3, {1})(x) end, "Unflatten: dimension 3 out of range for 2 dimensions")
    H.assert_error(function() nn.Unflatten(1.5, {1}) end, "Unflatten: dim: expected an integer, got 1.5")
    H.assert_error(function() nn.Unflatten(1, {}) end, "Unflatten: sizes: expected a non-empty list of sizes")
  end)
end)

describe("area installers", function()
  -- Loads keel.nn afresh with an extra area file keel/nn/rnn.lua (placed
  -- first on package.path) holding src; restores everything afterwards.
  local function load_with_area(src)
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. "/keel/nn"))
    local f = assert(io.open(dir .. "/keel/nn/rnn.lua", "w"))
    f:write(src)
    f:close()
    local saved_path, saved_nn, saved_area = package.path, package.loaded["keel.nn"], package.loaded["keel.nn.rnn"]
    package.path = dir .. "/?.lua;" .. package.path
    package.loaded["keel.nn"], package.loaded["keel.nn.rnn"] = nil, nil
    rawset(keel, "nn", nil)
    local results = {}
    for i = 1, 2 do
      package.loaded["keel.nn.rnn"] = nil
      results[i] = table.pack(pcall(require, "keel.nn"))
    end
    package.path = saved_path
    package.loaded["keel.nn"], package.loaded["keel.nn.rnn"] = saved_nn, saved_area
    rawset(keel, "nn", saved_nn)
    os.remove(dir .. "/keel/nn/rnn.lua"); os.remove(dir .. "/keel/nn"); os.remove(dir .. "/keel"); os.remove(dir)
    return results
  end

  it("run with the new nn table, which require('keel').nn also gives", function()
    local r = load_with_area([[
      local keel = require "keel"
      local outer = keel.nn
      return function(nn)
        assert(outer == nn, "keel.nn differs from the installer's argument")
        nn.Probe = nn.Module:extend("Probe")
        nn.functional.probe = function() return 42 end
      end]])
    assert.is_true(r[1][1], tostring(r[1][2]))
    local fresh = r[1][2]
    assert.are_not.equal(nn, fresh)
    assert.is_not_nil(fresh.Probe)
    assert.are.equal(42, fresh.F.probe())
    assert.is_not_nil(fresh.Linear)
    assert.are.equal(nn, keel.nn)
  end)

  it("propagate their errors, on every require", function()
    local r = load_with_area('return function(nn) error("rnn installer: boom") end')
    assert.is_false(r[1][1])
    assert.truthy(tostring(r[1][2]):find("rnn installer: boom", 1, true))
    assert.is_false(r[2][1])
    assert.truthy(tostring(r[2][2]):find("rnn installer: boom", 1, true))
  end)
end)
