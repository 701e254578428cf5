-- keel.data_loader: the DataLoader and the transforms of keel.data (merged
-- into keel.data by keel/data.lua). The work is in C (engine/loader.c):
-- batch assembly, transforms, and a prefetch thread.
--
--   local loader = data.DataLoader(dataset, {batch_size = 64, shuffle = true, seed = 1,
--     drop_last = false, prefetch = 2,
--     transforms = {data.transforms.to_float(), data.transforms.normalize(0.1307, 0.3081)}})
--   for xb, yb, i in loader:batches() do ... end     -- one epoch (the rest of it)
--   #loader, loader:num_batches(), loader:state(), loader:set_state(s), loader:close()
--
-- dataset = {x = tensor [N, ...], y = tensor [N, ...] or nil}. Each call of
-- batches() runs from the cursor to the end of the current epoch, then the
-- loader moves to the next epoch. Epoch e (1, 2, ...) shuffles with a
-- permutation drawn from (seed, e), independent of keel's global RNG; the
-- random transforms of a sample draw from (seed, e, its position in the
-- epoch): keel.h documents the exact stream. state() = {epoch, cursor, seed}
-- where cursor is the number of batches already taken in the epoch;
-- set_state(s) continues from there (exact resume, or skipping a batch).
-- x and y are on one device: a CUDA dataset gives CUDA batches gathered on
-- the device, equal to the CPU loader's (same order, transforms and values);
-- prefetch does nothing there (the device queue already runs ahead).

local core = require "keel.core"
local C = core._data

local M = {}

local function is_int(v) return math.type(v) == "integer" end

---------------------------------------------------------------------------
-- Transforms (plain descriptions, applied in C per sample, in order)
---------------------------------------------------------------------------

local T = {}
M.transforms = T

-- v * scale (default 1/255: raw 0..255 values to 0..1).
function T.to_float(scale)
  if scale == nil then scale = 1 / 255 end
  if type(scale) ~= "number" or scale ~= scale or scale == math.huge or scale == -math.huge then
    error("to_float: scale must be a finite number, got " .. tostring(scale), 2)
  end
  return {kind = "to_float", scale = scale}
end

local function channel_values(fn, name, v)
  if type(v) == "number" then
    if v ~= v or v == math.huge or v == -math.huge then
      error(("%s: %s must be finite, got %s"):format(fn, name, tostring(v)), 3)
    end
    return {v}
  end
  if type(v) ~= "table" or #v == 0 then
    error(("%s: %s must be a number or a non-empty list of numbers, got %s"):format(fn, name, type(v)), 3)
  end
  local out = {}
  for i = 1, #v do
    local e = v[i]
    if type(e) ~= "number" or e ~= e or e == math.huge or e == -math.huge then
      error(("%s: %s[%d] must be a finite number, got %s"):format(fn, name, i, tostring(e)), 3)
    end
    out[i] = e
  end
  return out
end

-- (v - mean[c]) / std[c] per channel; numbers or one value per channel.
function T.normalize(mean, std)
  local m = channel_values("normalize", "mean", mean)
  local s = channel_values("normalize", "std", std)
  if #m ~= #s then
    error(("normalize: %d means and %d stds, expected as many"):format(#m, #s), 2)
  end
  for i = 1, #s do
    if s[i] == 0 then error(("normalize: std[%d] is 0"):format(i), 2) end
  end
  return {kind = "normalize", mean = m, std = s}
end

-- A size x size (or {h, w}) window of the sample zero-padded by padding.
function T.random_crop(size, opts)
  local h, w
  if is_int(size) then h, w = size, size
  elseif type(size) == "table" and is_int(size[1]) and is_int(size[2]) then h, w = size[1], size[2]
  else error("random_crop: size must be an integer or {h, w}, got " .. tostring(size), 2) end
  if h < 1 or w < 1 then error(("random_crop: size %dx%d, expected >= 1"):format(h, w), 2) end
  opts = opts or {}
  if type(opts) ~= "table" then error("random_crop: options must be a table, got " .. type(opts), 2) end
  local p = opts.padding or 0
  if not is_int(p) or p < 0 then
    error("random_crop: padding must be an integer >= 0, got " .. tostring(p), 2)
  end
  return {kind = "random_crop", size_h = h, size_w = w, padding = p}
end

-- Reverses the last dimension (width) with probability p.
function T.random_hflip(p)
  if p == nil then p = 0.5 end
  if type(p) ~= "number" or not (p >= 0 and p <= 1) then
    error("random_hflip: p must be a number in [0, 1], got " .. tostring(p), 2)
  end
  return {kind = "random_hflip", p = p}
end

---------------------------------------------------------------------------
-- DataLoader
---------------------------------------------------------------------------

local DataLoader = {}
DataLoader.__index = DataLoader
DataLoader.__name = "keel.data.DataLoader"

local known = {batch_size = true, shuffle = true, seed = true, drop_last = true,
               transforms = true, prefetch = true}

function M.DataLoader(dataset, opts)
  if type(dataset) ~= "table" or not core.is_tensor(dataset.x) then
    error("DataLoader: dataset has no x tensor, expected {x = tensor, y = tensor or nil}", 2)
  end
  if dataset.y ~= nil and not core.is_tensor(dataset.y) then
    error("DataLoader: dataset.y must be a tensor or nil, got " .. type(dataset.y), 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("DataLoader: options must be a table, got " .. type(opts), 2) end
  for k in pairs(opts) do
    if not known[k] then error("DataLoader: unknown option '" .. tostring(k) .. "'", 2) end
  end
  local bs = opts.batch_size or 64
  if not is_int(bs) or bs < 1 then
    error("DataLoader: batch_size must be an integer >= 1, got " .. tostring(bs), 2)
  end
  local seed = opts.seed or 0
  if not is_int(seed) then error("DataLoader: seed must be an integer, got " .. tostring(seed), 2) end
  local prefetch = opts.prefetch or 2
  if not is_int(prefetch) or prefetch < 0 or prefetch > 64 then
    error("DataLoader: prefetch must be an integer in 0..64, got " .. tostring(prefetch), 2)
  end
  local tfs = opts.transforms or {}
  if type(tfs) ~= "table" then error("DataLoader: transforms must be a list, got " .. type(tfs), 2) end
  for i = 1, #tfs do
    if type(tfs[i]) ~= "table" or type(tfs[i].kind) ~= "string" then
      error(("DataLoader: transforms[%d] is not a transform (use keel.data.transforms.*)"):format(i), 2)
    end
  end
  local ok, ld = pcall(C.loader_new, dataset.x, dataset.y, {
    batch_size = bs, shuffle = opts.shuffle and true or false, seed = seed,
    drop_last = opts.drop_last and true or false, prefetch = prefetch, transforms = tfs})
  if not ok then error((tostring(ld):gsub("^[^:]*:%d+: ", "")), 2) end
  return setmetatable({_ld = ld, dataset = dataset, batch_size = bs}, DataLoader)
end

-- Iterator over the rest of the current epoch: xb, yb (nil without y), i.
-- Once it has returned nil it stays done (the loader is at the next epoch).
function DataLoader:batches()
  local ld, done = self._ld, false
  return function()
    if done then return nil end
    local xb, yb, i = ld:next()
    if xb == nil then done = true end
    return xb, yb, i
  end
end

function DataLoader:num_batches() return self._ld:num_batches() end
DataLoader.__len = DataLoader.num_batches

function DataLoader:state() return self._ld:state() end

function DataLoader:set_state(s)
  if type(s) ~= "table" then error("set_state: expected a table {epoch=, cursor=, seed=}, got " .. type(s), 2) end
  for _, k in ipairs{"epoch", "cursor", "seed"} do
    if s[k] ~= nil and not is_int(s[k]) then
      error(("set_state: %s must be an integer, got %s"):format(k, tostring(s[k])), 2)
    end
  end
  local ok, err = pcall(self._ld.set_state, self._ld, s)
  if not ok then error((tostring(err):gsub("^[^:]*:%d+: ", "")), 2) end
end

-- Stops the prefetch thread and frees the buffers; the loader is unusable after.
function DataLoader:close() self._ld:close() end
DataLoader.__close = DataLoader.close

function DataLoader:__tostring()
  local s = self._ld:is_closed() and "closed" or
    ("%d batches of %d"):format(self._ld:num_batches(), self.batch_size)
  return "keel.data.DataLoader(" .. s .. ")"
end

return M
