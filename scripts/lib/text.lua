-- scripts/lib/text.lua: what the character-level scripts share: the text
-- (keel.data.chars), char-rnn style batches and sampling with a temperature.
local keel = keel or require "keel"

local M = {}

M.DEFAULT = "/work/shared/data/tinyshakespeare/input.txt"

M.BUILTIN = [[
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

All:
We know't, we know't.

First Citizen:
Let us kill him, and we'll have corn at our own price.
Is't a verdict?

All:
No more talking on't; let it be done: away, away!
]]

-- The text of `path`, or of the default file when path is false and that
-- exists, or the built-in paragraph.
-- Returns keel.data.chars's dataset, its ids (ds.data) moved to keel's
-- default device (where the model's parameters are made: the reader gives
-- CPU ids), and a line that says where the text came from.
function M.load(path)
  if not path then
    local f = io.open(M.DEFAULT)
    if f then f:close(); path = M.DEFAULT end
  end
  local ds, source
  if path then
    ds, source = keel.data.chars(path, {text = false}), "text: " .. path
  else
    ds, source = keel.data.chars(M.BUILTIN, {text = true}),
      ("text: no --data and no %s: the built-in paragraph (%d characters)"):format(M.DEFAULT, #M.BUILTIN)
  end
  ds.data = ds.data:to(keel.get_default_device())
  return ds, source
end

-- char-rnn batches: the ids [N] cut into `batch` parallel streams; next()
-- returns x, y ([T, batch] int64, y = x shifted by one) for consecutive
-- windows of T, and true at the start of each pass (to reset a carried state).
-- A short text gets fewer streams, then shorter windows; returns next, the
-- windows per pass and the batch and T used.
function M.windows(ids, batch, T)
  local n = ids:numel()
  assert(n >= 3, ("text too short: %d characters"):format(n))
  T = math.min(T, n - 2)
  batch = math.max(1, math.min(batch, (n - 1) // (T + 1)))
  local len = (n - 1) // batch
  local x_all = ids:narrow(1, 1, batch * len):view{batch, len}
  local y_all = ids:narrow(1, 2, batch * len):view{batch, len}
  local per_pass, w = len // T, 0
  return function()
    local start = w % per_pass
    w = w + 1
    local x = x_all:narrow(2, start * T + 1, T):t():contiguous()
    local y = y_all:narrow(2, start * T + 1, T):t():contiguous()
    return x, y, start == 0
  end, per_pass, batch, T
end

-- One id drawn from logits [V] at a temperature.
function M.draw(logits, temperature)
  local p = keel.nn.F.softmax(logits / temperature, -1):totable()
  local u, acc = math.random(), 0
  for i = 1, #p do
    acc = acc + p[i]
    if u <= acc then return i end
  end
  return #p
end

return M
