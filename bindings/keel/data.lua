-- keel.data: datasets (and, from keel.data_loader, the data loader).
--
-- A dataset is a table
--   {x = tensor, y = int64 tensor [N] of labels 1..C (or nil), n = N,
--    classes = {names} (optional), source = path}
-- Images are float32 [N, C, H, W] with raw pixel values 0..255: the
-- loader's to_float / normalize transforms scale them.
--
--   data.read_idx(path)                         tensor as stored (raw or .gz)
--   data.mnist(dir, {train = true})             MNIST or Fashion-MNIST files
--   data.cifar10(dir, {train = true})           CIFAR-10 binary batches
--   data.csv(path, {header = false, label_column = nil, delimiter = ",",
--                   label_base = 0})            numeric CSV
--   data.chars(path_or_text, {text = nil})      character-level text: a file when
--                                               one opens, else the text itself
--                                               (text = true: always the text,
--                                               false: always a file)
--   data.image_folder(dir, {size = {H, W}, channels = 3})
--                                               one subfolder per class

local keel = require "keel"
local core = require "keel.core"
local C = core._data

local data = {}

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function opts_table(fn, opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(fn .. ": options: expected a table, got " .. type(opts), 3)
  end
  return opts
end

-- Calls f(...) and rethrows its error at the caller's caller level.
local function call(f, ...)
  local res = table.pack(pcall(f, ...))
  if not res[1] then error(res[2], 3) end
  return table.unpack(res, 2, res.n)
end

function data.read_idx(path)
  if type(path) ~= "string" then
    error("read_idx: argument #1: expected a file name, got " .. type(path), 2)
  end
  return call(C.read_idx, path)
end

-- float labels (0-based, as stored) -> int64 1-based
local function labels_of(t)
  return (t:to("int64") + 1)
end

function data.mnist(dir, opts)
  opts = opts_table("mnist", opts)
  if type(dir) ~= "string" then
    error("mnist: argument #1: expected a directory, got " .. type(dir), 2)
  end
  local train = opts.train ~= false
  local prefix = train and "train" or "t10k"
  local function find(kind)
    local base = dir .. "/" .. prefix .. "-" .. kind .. "-idx" .. (kind == "images" and "3" or "1") .. "-ubyte"
    if exists(base) then return base end
    if exists(base .. ".gz") then return base .. ".gz" end
    error("mnist: " .. base .. "(.gz) not found, expected MNIST or Fashion-MNIST files in " .. dir, 3)
  end
  local ipath, lpath = find("images"), find("labels")
  local x = call(C.read_idx, ipath)
  local y = call(C.read_idx, lpath)
  if x.ndim ~= 3 or y.ndim ~= 1 or x.shape[1] ~= y.shape[1] then
    error(string.format("mnist: %s is %s and %s is %s, expected [N, H, W] images and [N] labels",
      ipath, table.concat(x.shape, "x"), lpath, table.concat(y.shape, "x")), 2)
  end
  local n = x.shape[1]
  return {x = x:reshape(n, 1, x.shape[2], x.shape[3]), y = labels_of(y), n = n,
          classes = opts.classes, source = dir}
end

function data.cifar10(dir, opts)
  opts = opts_table("cifar10", opts)
  if type(dir) ~= "string" then
    error("cifar10: argument #1: expected a directory, got " .. type(dir), 2)
  end
  local names = {}
  if opts.train ~= false then
    for i = 1, 5 do names[i] = dir .. "/data_batch_" .. i .. ".bin" end
  else
    names[1] = dir .. "/test_batch.bin"
  end
  for _, p in ipairs(names) do
    if not exists(p) then error("cifar10: " .. p .. " not found, expected CIFAR-10 binary batches", 2) end
  end
  local x, y = call(C.read_cifar10, names)
  return {x = x, y = y, n = x.shape[1], source = dir,
          classes = {"airplane", "automobile", "bird", "cat", "deer",
                     "dog", "frog", "horse", "ship", "truck"}}
end

local function split_line(line, delim)
  local out, pos = {}, 1
  while true do
    local s, e = line:find(delim, pos, true)
    if not s then out[#out + 1] = line:sub(pos) break end
    out[#out + 1] = line:sub(pos, s - 1)
    pos = e + 1
  end
  for i, v in ipairs(out) do out[i] = v:match("^%s*(.-)%s*$") end
  return out
end

function data.csv(path, opts)
  opts = opts_table("csv", opts)
  if type(path) ~= "string" then
    error("csv: argument #1: expected a file name, got " .. type(path), 2)
  end
  local delim = opts.delimiter or ","
  local m = call(C.read_csv, path, delim, opts.header and true or false)
  local rows, cols = m.shape[1], m.shape[2]
  local columns
  if opts.header then
    local f = io.open(path, "rb")
    local line = f and f:read("l") or ""
    if f then f:close() end
    columns = split_line(line:gsub("\r$", ""), delim)
  end
  local ds = {n = rows, source = path, columns = columns}
  local lc = opts.label_column
  if lc == nil then
    ds.x = m:to("float32")
    return ds
  end
  if math.type(lc) ~= "integer" or lc == 0 or lc > cols or lc < -cols then
    error(string.format("csv: label_column %s, expected 1..%d or -1..-%d", tostring(lc), cols, cols), 2)
  end
  if lc < 0 then lc = cols + 1 + lc end
  local base = opts.label_base or 0
  local lab = m:narrow(2, lc, 1):reshape(rows)
  local li = lab:to("int64")
  if (li:to("float64") - lab):abs():max():item() ~= 0 then
    error("csv: " .. path .. ": column " .. lc .. " holds non-integer labels, expected class numbers", 2)
  end
  local lo = li:min():item()
  if lo < base then
    error(string.format("csv: %s: label %d in column %d, expected labels from %d (label_base)",
      path, lo, lc, base), 2)
  end
  ds.y = li - base + 1
  local parts = {}
  if lc > 1 then parts[#parts + 1] = m:narrow(2, 1, lc - 1) end
  if lc < cols then parts[#parts + 1] = m:narrow(2, lc + 1, cols - lc) end
  if #parts == 0 then
    error("csv: " .. path .. " has only the label column, expected features too", 2)
  end
  ds.x = (#parts == 1 and parts[1] or keel.cat(parts, 2)):to("float32")
  if columns then table.remove(columns, lc) end
  return ds
end

-- Character-level text: ids 1..V over the sorted distinct bytes.
function data.chars(src, opts)
  opts = opts_table("chars", opts)
  if type(src) ~= "string" then
    error("chars: argument #1: expected a file name or text, got " .. type(src), 2)
  end
  local text, source = src, nil
  if not opts.text then
    local f, err = io.open(src, "rb")
    if f then
      text = f:read("a")
      f:close()
      source = src
    elseif opts.text == false or (not src:find("\n", 1, true) and (src:find("/", 1, true)
           or src:find("%.%w+$"))) then
      -- looks like a file name: a typo must not become the text
      error("chars: cannot open " .. tostring(err) .. " (pass {text = true} for literal text)", 2)
    end
  end
  if #text == 0 then error("chars: empty text, expected at least one character", 2) end
  local seen = {}
  for i = 1, #text, 4096 do
    for _, b in ipairs({text:byte(i, math.min(i + 4095, #text))}) do seen[b] = true end
  end
  local vocab, stoi = {}, {}
  for b = 0, 255 do
    if seen[b] then
      vocab[#vocab + 1] = string.char(b)
      stoi[string.char(b)] = #vocab
    end
  end
  local ds = {vocab = vocab, stoi = stoi, source = source}
  function ds.encode(s)
    if type(s) ~= "string" then error("encode: expected a string, got " .. type(s), 2) end
    return call(C.encode_bytes, s, stoi)
  end
  function ds.decode(ids)
    if core.is_tensor(ids) then ids = ids:reshape(-1):totable() end
    if type(ids) ~= "table" then error("decode: expected a tensor or a table of ids, got " .. type(ids), 2) end
    local out = {}
    for i, id in ipairs(ids) do
      local c = vocab[math.tointeger(id) or 0]
      if not c then error("decode: id " .. tostring(id) .. " at position " .. i .. " is not in 1.." .. #vocab, 2) end
      out[i] = c
    end
    return table.concat(out)
  end
  ds.data = call(C.encode_bytes, text, stoi)
  ds.n = #text
  return ds
end

local IMAGE_EXT = {png = true, jpg = true, jpeg = true, bmp = true}

function data.image_folder(dir, opts)
  opts = opts_table("image_folder", opts)
  if type(dir) ~= "string" then
    error("image_folder: argument #1: expected a directory, got " .. type(dir), 2)
  end
  local channels = opts.channels or 3
  if channels ~= 1 and channels ~= 3 then
    error("image_folder: channels " .. tostring(channels) .. ", expected 1 or 3", 2)
  end
  local h, w = 0, 0
  if opts.size ~= nil then
    local s = opts.size
    if type(s) ~= "table" or math.type(s[1]) ~= "integer" or math.type(s[2]) ~= "integer"
       or s[1] < 1 or s[2] < 1 then
      error("image_folder: size: expected {H, W} of positive integers", 2)
    end
    h, w = s[1], s[2]
  end
  local classes, paths, labels = {}, {}, {}
  for _, e in ipairs(call(C.list_dir, dir)) do
    if e.dir then
      classes[#classes + 1] = e.name
      for _, f in ipairs(call(C.list_dir, dir .. "/" .. e.name)) do
        if not f.dir then
          local ext = (f.name:match("%.([^.]+)$") or ""):lower()
          if not IMAGE_EXT[ext] then
            error("image_folder: " .. dir .. "/" .. e.name .. "/" .. f.name
                  .. " is not a .png, .jpg, .jpeg or .bmp file", 2)
          end
          paths[#paths + 1] = dir .. "/" .. e.name .. "/" .. f.name
          labels[#labels + 1] = #classes
        end
      end
    end
  end
  if #classes == 0 then error("image_folder: " .. dir .. " has no subfolders, expected one per class", 2) end
  if #paths == 0 then error("image_folder: " .. dir .. " has no images", 2) end
  local x = call(C.read_images, paths, channels, h, w)
  return {x = x, y = keel.tensor(labels, {dtype = "int64"}), n = #paths, classes = classes,
          source = dir, paths = paths}
end

if package.searchpath("keel.data_loader", package.path) then
  for k, v in pairs(require "keel.data_loader") do data[k] = v end
end

return data
