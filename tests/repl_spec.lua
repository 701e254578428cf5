-- repl_spec.lua: the keel executable (KEEL_BIN): scripts with arguments,
-- the REPL fed on stdin, and -e.
local BIN = os.getenv("KEEL_BIN")

local function shquote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function write_file(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function read_file(path)
  local f = io.open(path, "r")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end

-- Runs a shell command line; returns its stdout+stderr and exit status.
local function run(cmdline)
  local out = os.tmpname()
  local ok, how, code = os.execute(cmdline .. " >" .. shquote(out) .. " 2>&1")
  local text = read_file(out)
  os.remove(out)
  -- Lua 5.4: true|nil, "exit"|"signal", code
  return text, ok == true, code, how
end

-- Feeds `input` to the REPL on stdin.
local function repl(input)
  local inp = os.tmpname()
  write_file(inp, input)
  local text, ok, code = run(shquote(BIN) .. " <" .. shquote(inp))
  os.remove(inp)
  return text, ok, code
end

local function has_line(text, pred)
  for line in (text .. "\n"):gmatch("(.-)\r?\n") do
    if pred(line) then return true end
  end
  return false
end

-- a line whose content (after any prompt) is the number n
local function prints_number(text, n)
  return has_line(text, function(line)
    local v = line:gsub("^[>%s]*", ""):gsub("%s+$", "")
    return tonumber(v) == n
  end)
end

if not BIN or BIN == "" then
  describe("keel executable", function()
    pending("KEEL_BIN is not set: the REPL and script runner are not tested")
  end)
  return
end

describe("keel executable", function()
  it("exists and runs", function()
    local f = io.open(BIN, "r")
    assert.is_truthy(f, "KEEL_BIN=" .. BIN .. " cannot be opened")
    if f then f:close() end
  end)

  it("runs a script with arguments in arg", function()
    local script = os.tmpname()
    write_file(script, [[
print("ARGC=" .. #arg)
print("ARG1=" .. tostring(arg[1]))
print("ARG2=" .. tostring(arg[2]))
print("ARG0=" .. tostring(arg[0]))
print("HASKEEL=" .. tostring(require("keel") ~= nil))
]])
    local text, ok = run(shquote(BIN) .. " " .. shquote(script) .. " a b")
    os.remove(script)
    assert.is_true(ok, text)
    assert.is_truthy(text:find("ARGC=2", 1, true), text)
    assert.is_truthy(text:find("ARG1=a", 1, true), text)
    assert.is_truthy(text:find("ARG2=b", 1, true), text)
    assert.is_truthy(text:find("ARG0=" .. script, 1, true), text)
    assert.is_truthy(text:find("HASKEEL=true", 1, true), text)
  end)

  it("a script that errors exits non-zero with the message", function()
    local script = os.tmpname()
    write_file(script, 'error("script failed on purpose")\n')
    local text, ok = run(shquote(BIN) .. " " .. shquote(script))
    os.remove(script)
    assert.is_false(ok)
    assert.is_truthy(text:find("script failed on purpose", 1, true), text)
  end)

  it("a script can use keel tensors", function()
    local script = os.tmpname()
    write_file(script, [[
local keel = require "keel"
local t = keel.tensor({{1, 2}, {3, 4}})
print("SUM=" .. string.format("%g", t:sum():item()))
]])
    local text, ok = run(shquote(BIN) .. " " .. shquote(script))
    os.remove(script)
    assert.is_true(ok, text)
    assert.is_truthy(text:find("SUM=10", 1, true), text)
  end)

  it("-e runs a chunk with keel preloaded", function()
    local text, ok = run(shquote(BIN) .. " -e " .. shquote("print(keel.ones(2):sum():item())"))
    assert.is_true(ok, text)
    assert.is_true(prints_number(text, 2), text)
  end)

  it("the REPL evaluates expressions from stdin and prints results", function()
    local text, ok = repl("1+1\n40+2\n")
    assert.is_true(ok, text)
    assert.is_true(prints_number(text, 2), text)
    assert.is_true(prints_number(text, 42), text)
  end)

  it("the REPL runs statements and keeps globals between lines", function()
    local text = repl("x = 20\ny = x * 3\nprint('Y=' .. y)\n")
    assert.is_truthy(text:find("Y=60", 1, true), text)
  end)

  it("the REPL pretty-prints tensors with their header", function()
    local text = repl("keel.ones(2, 3)\nprint('DEV=' .. keel.ones(1).device)\n")
    assert.is_truthy(text:find("keel.Tensor", 1, true), text)
    assert.is_truthy(text:find("2x3", 1, true), text)
    -- the header names the tensor's device: the REPL's default one (cpu,
    -- or cuda where the environment has KEEL_DEVICE=cuda)
    local dev = text:match("DEV=(%w+)")
    assert.is_truthy(dev, text)
    assert.is_truthy(text:find("float32 " .. dev .. " 2x3", 1, true), text)
  end)

  it("the REPL survives an error and evaluates the next line", function()
    local text, ok = repl("error('boom from line one')\n6*7\nkeel.zeros(2) + keel.zeros(3)\n7*8\n")
    assert.is_true(ok, text)
    assert.is_truthy(text:find("boom from line one", 1, true), text)
    assert.is_true(prints_number(text, 42), text)
    assert.is_truthy(text:find("add", 1, true), text)       -- the engine error is shown
    assert.is_true(prints_number(text, 56), text)
  end)

  it("the REPL survives a syntax error", function()
    local text = repl("1 +* 2\n9*9\n")
    assert.is_true(prints_number(text, 81), text)
  end)
end)
