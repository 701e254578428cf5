-- scripts_spec.lua: the training scripts in scripts/ run end to end in tiny
-- configurations through the keel executable (KEEL_BIN, set by
-- tools/test.sh): exit status 0 and the lines each one must print.

local BIN = os.getenv("KEEL_BIN")

-- Runs `keel script args...` (stderr joined); returns the output and the
-- exit code.
local function run(script, args)
  local cmd = {("%q"):format(BIN), ("%q"):format("scripts/" .. script)}
  for _, a in ipairs(args or {}) do cmd[#cmd + 1] = ("%q"):format(a) end
  local h = io.popen(table.concat(cmd, " ") .. " 2>&1")
  local out = h:read("a")
  local _, _, code = h:close()
  return out, code
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

describe("training scripts", function()
  if not BIN then
    it("need KEEL_BIN", function() pending("KEEL_BIN is not set (tools/test.sh sets it)") end)
    return
  end

  local dir, text_file
  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute(("mkdir -p %q"):format(dir)))
    text_file = dir .. "/text.txt"
    local f = assert(io.open(text_file, "w"))
    for i = 1, 40 do f:write(("line %d: the quick brown fox jumps over the lazy dog.\n"):format(i)) end
    f:close()
  end)
  teardown(function() os.execute(("rm -rf %q"):format(dir)) end)

  it("mnist.lua trains on the synthetic digits without --data, saves and resumes", function()
    local ck, w = dir .. "/m.ckpt", dir .. "/m.safetensors"
    local out, code = run("mnist.lua", {"--epochs", "1", "--limit", "512", "--log-every", "4",
                                        "--out", ck, "--weights", w})
    assert.equals(0, code, out)
    assert.matches("^data: no %-%-data given: the built%-in synthetic digit set", out)
    assert.matches("epoch 1  step 4/8  loss %d", out)
    assert.matches("epoch 1: test accuracy %d+%.%d%d%%", out)
    assert.is_true(exists(ck) and exists(w), out)
    out, code = run("mnist.lua", {"--epochs", "2", "--limit", "512", "--log-every", "4",
                                  "--out", ck, "--weights", w, "--resume"})
    assert.equals(0, code, out)
    assert.matches("resumed from .- at step 8 %(epoch 2%)", out)
    assert.matches("epoch 2: test accuracy", out)
    assert.is_nil(out:match("epoch 1:"), out)
  end)

  it("finetune.lua loads the weights, freezes the convolutions and trains a new head", function()
    local w = dir .. "/m.safetensors"
    if not exists(w) then
      local out, code = run("mnist.lua", {"--epochs", "1", "--limit", "128", "--out", dir .. "/f.ckpt",
                                          "--weights", w})
      assert.equals(0, code, out)
    end
    local out, code = run("finetune.lua", {"--from", w, "--limit", "512", "--out", dir .. "/ft.safetensors"})
    assert.equals(0, code, out)
    assert.matches("froze the 2 conv layers; new head Linear%(128, 2%)", out)
    assert.matches("epoch 1: even/odd test accuracy %d+%.%d%d%%", out)
    assert.matches("frozen conv weights unchanged: yes", out)
    assert.is_true(exists(dir .. "/ft.safetensors"), out)
  end)

  it("finetune.lua says what to do when the weights are missing", function()
    local out, code = run("finetune.lua", {"--from", dir .. "/none.safetensors"})
    assert.equals(1, code, out)
    assert.matches("not found: run `keel scripts/mnist.lua` first", out)
  end)

  it("charrnn.lua trains an LSTM with truncated BPTT and samples text", function()
    local out, code = run("charrnn.lua", {"--data", text_file, "--steps", "6", "--seq", "16", "--batch", "4",
                                          "--embed", "8", "--hidden", "16", "--log-every", "3",
                                          "--sample", "40", "--out", dir .. "/c.safetensors"})
    assert.equals(0, code, out)
    assert.matches("text: " .. text_file:gsub("%p", "%%%0"), out)
    assert.matches("step 6/6  loss %d", out)
    assert.matches("sample %(temperature 0.80%):\n", out)
    assert.is_true(exists(dir .. "/c.safetensors"), out)
  end)

  it("charrnn.lua uses fewer streams and shorter windows on a short text", function()
    local short = dir .. "/short.txt"
    local f = assert(io.open(short, "w"))
    f:write("to be or not to be\n")
    f:close()
    local out, code = run("charrnn.lua", {"--data", short, "--steps", "2", "--embed", "8", "--hidden", "16",
                                          "--sample", "10", "--out", dir .. "/s.safetensors"})
    assert.equals(0, code, out)
    assert.matches("short text: 1 streams, windows of 17", out)
    assert.matches("sample %(temperature 0.80%):\n", out)
  end)

  it("gpt.lua trains a causal transformer with warmup and cosine decay and samples text", function()
    local out, code = run("gpt.lua", {"--data", text_file, "--steps", "6", "--block", "16", "--batch", "4",
                                      "--dim", "16", "--heads", "2", "--layers", "1", "--warmup", "2",
                                      "--log-every", "3", "--sample", "30", "--out", dir .. "/g.safetensors"})
    assert.equals(0, code, out)
    assert.matches("model: 1 blocks, dim 16, 2 heads, block 16: %d+ parameters", out)
    assert.matches("step 6/6  loss %d", out)
    assert.matches("sample %(temperature 0.80%):\n", out)
    assert.is_true(exists(dir .. "/g.safetensors"), out)
  end)

  it("reject unknown options with the usage (exit status 2)", function()
    local out, code = run("gpt.lua", {"--bogus", "1"})
    assert.equals(2, code, out)
    assert.matches("unknown option %-%-bogus\nusage: keel scripts/gpt.lua", out)
    out, code = run("mnist.lua", {"--epochs", "many"})
    assert.equals(2, code, out)
    assert.matches("option %-%-epochs: expected a number, got 'many'", out)
  end)
end)
