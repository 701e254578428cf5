-- scripts/lib/args.lua: the command-line parser of the training scripts.
--
--   local args = require "args"
--   local opt = args.parse(arg, {epochs = 5, lr = 1e-3, data = false, resume = false},
--                          "usage: keel scripts/mnist.lua [--epochs N] ...")
--
-- `--name value` sets opt.name, converted to the type of its default (a number
-- default takes a number, a string default a string). A boolean default makes
-- a flag: `--name` sets it true, `--no-name` false. An option whose default is
-- false but that takes a string when given (`--data DIR`) is listed in
-- defaults._strings. Dashes in names become underscores (`--log-every` is
-- opt.log_every). `--help` prints the usage and the defaults, then exits.
-- Unknown options and bad values print the usage and exit with status 2.
local M = {}

local function fail(usage, msg)
  io.stderr:write(msg, "\n", usage, "\n")
  os.exit(2)
end

function M.parse(argv, defaults, usage)
  local strings = {}
  for _, k in ipairs(defaults._strings or {}) do strings[k] = true end
  local opt = {}
  for k, v in pairs(defaults) do if k ~= "_strings" then opt[k] = v end end
  local i = 1
  while argv[i] ~= nil do
    local word = argv[i]
    local name = word:match("^%-%-([%w%-_]+)$")
    if not name then fail(usage, ("unexpected argument '%s'"):format(word)) end
    name = name:gsub("%-", "_")
    if name == "help" then
      local keys = {}
      for k in pairs(opt) do keys[#keys + 1] = k end
      table.sort(keys)
      io.write(usage, "\ndefaults:\n")
      for _, k in ipairs(keys) do io.write(("  --%s %s\n"):format(k:gsub("_", "-"), tostring(opt[k]))) end
      os.exit(0)
    end
    local negated = name:match("^no_(.+)$")
    local def = defaults[name]
    if def == nil and negated and type(defaults[negated]) == "boolean" and not strings[negated] then
      opt[negated] = false
      i = i + 1
    elseif def == nil then
      fail(usage, ("unknown option --%s"):format(name))
    elseif type(def) == "boolean" and not strings[name] then
      opt[name] = true
      i = i + 1
    else
      local value = argv[i + 1]
      if value == nil then fail(usage, ("option --%s needs a value"):format(name)) end
      if type(def) == "number" then
        local n = tonumber(value)
        if n == nil then fail(usage, ("option --%s: expected a number, got '%s'"):format(name, value)) end
        opt[name] = n
      else
        opt[name] = value
      end
      i = i + 2
    end
  end
  return opt
end

-- Wall-clock seconds (os.clock counts the CPU time of every thread): from
-- /proc/uptime (10 ms steps), else os.time.
function M.now()
  local f = io.open("/proc/uptime")
  if not f then return os.time() end
  local t = f:read("n")
  f:close()
  return t
end

return M
