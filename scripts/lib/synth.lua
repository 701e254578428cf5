-- scripts/lib/synth.lua: a built-in synthetic digit set, so that the MNIST
-- scripts run without downloading anything. Digits 0-9 are drawn as
-- seven-segment strokes on a 28x28 canvas, with random position, width,
-- stroke thickness, slant, brightness and pixel noise: easy, but not trivial.
--
--   local synth = require "synth"
--   local ds = synth.digits(6000, seed)   -- a keel.data dataset: {x = [N,1,28,28]
--                                         -- float32 in 0..255, y = [N] int64 1..10, n = N}
-- Pixel values follow MNIST's files (0..255) so that the same to_float and
-- normalize transforms apply.
local keel = keel or require "keel"

local M = {}

--           a  b  c  d  e  f  g   (top, top right, bottom right, bottom,
local SEGS = {                   -- bottom left, top left, middle)
  [0] = "abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg",
}

-- One template: the digit's segments in a box of w x h at (x0, y0), strokes
-- of thickness t, slanted by `slant` pixels over the height.
local function draw(out, digit, x0, y0, w, h, t, slant)
  local on = {}
  for c in SEGS[digit]:gmatch(".") do on[c] = true end
  local mid = y0 + h // 2
  for y = 0, 27 do
    local shift = math.floor(slant * (mid - y) / h + 0.5)
    for x = 0, 27 do
      local sx = x - shift
      local inx = sx >= x0 and sx < x0 + w
      local left, right = sx >= x0 and sx < x0 + t, sx >= x0 + w - t and sx < x0 + w
      local top, bottom = y >= y0 and y < y0 + t, y >= y0 + h - t and y < y0 + h
      local middle = y >= mid - t // 2 and y < mid - t // 2 + t
      local upper, lower = y >= y0 and y < mid + 1, y >= mid and y < y0 + h
      local v = (on.a and top and inx) or (on.d and bottom and inx) or (on.g and middle and inx)
        or (on.f and left and upper) or (on.b and right and upper)
        or (on.e and left and lower) or (on.c and right and lower)
      out[#out + 1] = v and 1 or 0
    end
  end
end

local templates, labels   -- built once: [T, 784] and the digit of each row
local function build()
  local px, lab = {}, {}
  for digit = 0, 9 do
    for x0 = 6, 10, 2 do
      for y0 = 2, 6, 2 do
        for _, w in ipairs {10, 13} do
          for _, t in ipairs {2, 3} do
            for _, slant in ipairs {0, 3} do
              draw(px, digit, x0, y0, w, 20, t, slant)
              lab[#lab + 1] = digit
            end
          end
        end
      end
    end
  end
  templates = keel.tensor(px):view{#lab, 784}
  labels = lab
end

-- n images (seeded: the same seed gives the same set).
function M.digits(n, seed)
  if not templates then build() end
  local rng = keel.get_rng_state()
  keel.manual_seed(seed)
  local pick = (keel.rand{n} * #labels):long():clamp(0, #labels - 1)
  local idx = (pick + 1):totable()
  local y = {}
  for i = 1, n do y[i] = labels[idx[i]] + 1 end
  local img = templates:index_select(1, pick + 1)
  local bright = keel.rand{n, 1} * 0.4 + 0.6
  img = ((img * bright + keel.randn{n, 784} * 0.15):clamp(0, 1) * 255):view{n, 1, 28, 28}
  keel.set_rng_state(rng)
  return {x = img, y = keel.tensor(y, {dtype = "int64"}), n = n, source = "synthetic digits"}
end

return M
