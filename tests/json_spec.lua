-- tests/json_spec.lua: keel.json, the codec behind keel.io.json_*,
-- keel.monitor's metrics.jsonl and keel.plot's reader.
local H = require "helper"
local _ = H.keel
local json = require "keel.json"

describe("keel.json numbers", function()
  it("writes floats in the fewest digits that read back exactly, always as floats", function()
    assert.are.equal("0.1", json.number(0.1))
    assert.are.equal("1.0", json.number(1.0))
    assert.are.equal("-0.0", json.number(-0.0))
    assert.are.equal("0.0", json.number(0.0))
    assert.are.equal("1e+308", json.number(1e308))
    assert.are.equal("7", json.number(7))
    for _, v in ipairs{1 / 3, 2 ^ -1074, 1.7976931348623157e308, 123456789.125, -2.5e-8, 0.30000000000000004} do
      local s = json.number(v)
      assert.are.equal(v, tonumber(s), s)
      assert.are.equal("float", math.type(json.decode(s)), s)
    end
  end)
  it("writes NaN and the infinities as bare words, or as strings when strict", function()
    assert.are.equal("NaN", json.number(0 / 0))
    assert.are.equal("-Infinity", json.number(-math.huge))
    assert.are.equal('"Infinity"', json.number(math.huge, true))
    assert.are.equal('"NaN"', json.number(0 / 0, true))
    local v = json.decode("[NaN,Infinity,-Infinity]")
    assert.is_true(v[1] ~= v[1])
    assert.are.equal(math.huge, v[2])
    assert.are.equal(-math.huge, v[3])
  end)
  it("reads integers exactly and refuses ones past 64 bits", function()
    assert.are.equal(math.maxinteger, json.decode(tostring(math.maxinteger)))
    assert.are.equal(math.mininteger, json.decode(tostring(math.mininteger)))
    assert.has_error(function() json.decode("9223372036854775808") end,
      "json_decode: integer out of range at byte 1")
  end)
end)

describe("keel.json strings", function()
  it("quotes control characters, and non-UTF-8 bytes only when strict", function()
    assert.are.equal('"a\\"b\\\\c\\n\\u0001"', json.quote('a"b\\c\n\1'))
    assert.are.equal('"\255"', json.quote("\255"))
    assert.are.equal('"\\u00ff"', json.quote("\255", true))
    assert.are.equal('"\u{e9}"', json.quote("\u{e9}", true))   -- valid UTF-8 stays as it is
    assert.are.equal("\255x", json.decode(json.quote("\255x")))
  end)
  it("reads escapes and surrogate pairs, and refuses broken ones", function()
    assert.are.equal("\u{1F600}/\t", json.decode('"\\ud83d\\ude00\\/\\t"'))
    assert.has_error(function() json.decode('"\\ud83d"') end, "json_decode: unpaired surrogate at byte 2")
    assert.has_error(function() json.decode('"a\nb"') end, "json_decode: control character in a string at byte 3")
    assert.has_error(function() json.decode('"\\q"') end, "json_decode: bad escape at byte 2")
  end)
end)

describe("keel.json values", function()
  it("round-trips tables with integer and '#' keys through hash_keys", function()
    local v = {a = {1, 2, {x = true}}, [3] = "three", ["#h"] = false, e = {}}
    local s = json.encode(v)
    assert.are.equal('{"#3":"three","##h":false,"a":[1,2,{"x":true}],"e":{}}', s)
    assert.are.same(v, json.decode(s, {hash_keys = true}))
    assert.are.equal("three", json.decode(s)["#3"])   -- without it, keys stay strings
  end)
  it("refuses what it cannot encode, naming where", function()
    assert.has_error(function() json.encode({a = {b = print}}) end, "json_encode: value.a.b: cannot encode a function")
    local deep = {}
    for _ = 1, json.MAX_DEPTH + 1 do deep = {deep} end
    assert.has_error(function() json.encode(deep) end,
      ("json_encode: value%s: nesting deeper than %d"):format(("[1]"):rep(json.MAX_DEPTH + 1), json.MAX_DEPTH))
    assert.has_error(function() json.encode({[true] = 1}) end,
      "json_encode: value: key of type boolean, expected strings or integers")
  end)
  it("keeps object key order when asked, reads null as nil, and names the error's byte", function()
    local order = {}
    local v = json.decode('{"z":1,"a":{"y":null,"b":2},"m":[true,null,3]}', {order = order})
    assert.are.same({"z", "a", "m"}, order[v])
    assert.are.same({"y", "b"}, order[v.a])
    assert.is_nil(v.a.y)
    assert.are.equal(3, v.m[3])
    assert.is_nil(v.m[2])
    assert.has_error(function() json.decode('{"a" 1}', {name = "plot"}) end, "plot: expected ':' at byte 6")
    assert.has_error(function() json.decode("[1,2") end, "json_decode: expected ',' or ']' at byte 5")
    assert.has_error(function() json.decode('[1,') end, "json_decode: unexpected end at byte 4")
    assert.has_error(function() json.decode("[1] 2") end, "json_decode: trailing characters at byte 5")
    assert.has_error(function() json.decode(("["):rep(json.MAX_DEPTH + 2)) end)
  end)
end)
