-- scripts/stability/rng.lua: a small seeded random generator for the task
-- generators (xoshiro256**, seeded through splitmix64), so that the data
-- stream of a run depends only on its own seed: not on keel's RNG (which
-- initialises the model) nor on math.random.
--
--   local rng = require("stability.rng").new(seed)
--   rng:uniform()   a float in [0, 1)
--   rng:int(n)      an integer in 0 .. n-1 (n >= 1)
--   rng:bit()       0 or 1
local M = {}
local R = {}
R.__index = R

local function rotl(x, k) return (x << k) | (x >> (64 - k)) end

function M.new(seed)
  local z = math.tointeger(seed) or 1
  local s = {}
  for i = 1, 4 do   -- splitmix64 spreads a small seed over the 256-bit state
    z = z + 0x9E3779B97F4A7C15
    local v = z
    v = (v ~ (v >> 30)) * 0xBF58476D1CE4E5B9
    v = (v ~ (v >> 27)) * 0x94D049BB133111EB
    s[i] = v ~ (v >> 31)
  end
  return setmetatable({s[1], s[2], s[3], s[4]}, R)
end

-- The next 64 random bits (xoshiro256**).
function R:next()
  local s0, s1, s2, s3 = self[1], self[2], self[3], self[4]
  local out = rotl(s1 * 5, 7) * 9
  local t = s1 << 17
  s2 = s2 ~ s0
  s3 = s3 ~ s1
  s1 = s1 ~ s2
  s0 = s0 ~ s3
  s2 = s2 ~ t
  s3 = rotl(s3, 45)
  self[1], self[2], self[3], self[4] = s0, s1, s2, s3
  return out
end

function R:uniform() return (self:next() >> 11) * 0x1p-53 end

-- Lemire's multiply-shift would need 128-bit products; the top 53 bits
-- times n is unbiased enough for n far below 2^53.
function R:int(n) return math.floor(self:uniform() * n) end

function R:bit() return self:next() >> 63 end

return M
