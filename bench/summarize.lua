-- bench/summarize.lua: reads the raw output of the benchmarks (stdin) and
-- prints the final RESULT lines: one per name (the median when a name was
-- measured in several rounds), then derived lines (keel/PyTorch ratios,
-- Lua-binding share of the per-op cost), then target checks as comments.
--
-- usage: lua5.4 bench/summarize.lua < raw.log

local order, vals, units = {}, {}, {}
for line in io.lines() do
  local name, value, unit = line:match("^RESULT name=(%S+) value=(%S+) unit=(%S+)")
  if name then
    if not vals[name] then order[#order + 1] = name; vals[name] = {} end
    local v = tonumber(value)
    if v then table.insert(vals[name], v) else table.insert(vals[name], 0 / 0) end
    units[name] = unit
  end
end

local function median(t)
  local s = {}
  for i = 1, #t do s[i] = t[i] end
  table.sort(s, function(a, b) return a < b end)
  local n = #s
  if n == 0 then return 0 / 0 end
  if n % 2 == 1 then return s[(n + 1) // 2] end
  return (s[n // 2] + s[n // 2 + 1]) / 2
end

local function fmt(v)
  if v ~= v then return "nan" end
  local a = math.abs(v)
  if a >= 100 then return ("%.1f"):format(v)
  elseif a >= 1 then return ("%.3f"):format(v)
  else return ("%.4g"):format(v) end
end

local val = {}
local function emit(name, v, unit)
  val[name] = v
  io.write(("RESULT name=%s value=%s unit=%s\n"):format(name, fmt(v), unit))
end

for _, name in ipairs(order) do emit(name, median(vals[name]), units[name]) end

-- keel vs PyTorch, per-op (lower is better for keel: < 1 means keel is faster)
local ops = { "add", "add_scalar", "add_grad", "relu", "sum", "matmul", "linear_fwd_bwd" }
for _, op in ipairs(ops) do
  local k, t = val["overhead_" .. op], val["torch_overhead_" .. op]
  if k and t and t > 0 then emit("overhead_" .. op .. "_ratio_torch", k / t, "x_torch") end
end
-- what the Lua side adds on top of the engine's C API
for _, op in ipairs(ops) do
  local k, e = val["overhead_" .. op], val["overhead_engine_" .. op]
  if k and e then emit("overhead_" .. op .. "_binding", k - e, "us") end
end

-- target checks (comments, not RESULT lines)
local checks = {}
local function check(name, cmp, target, what)
  local v = val[name]
  if v == nil then return end
  local ok = (cmp == ">=" and v >= target) or (cmp == "<=" and v <= target)
  checks[#checks + 1] = ("# target %-32s %10s %s %-6s %s  %s"):format(name, fmt(v), cmp, fmt(target),
    ok and "PASS" or "MISS", what or "")
end
for _, t in ipairs { 1, 2 } do
  for _, n in ipairs { 512, 1024, 2048 } do
    check(("matmul_%d_t%d_ratio"):format(n, t), ">=", 0.95, "keel / OpenBLAS direct")
  end
end
check("add_16M_ratio", ">=", 0.9, "keel a+b / plain C loop, preallocated output")
check("add_16M_ratio_fresh", ">=", 0.9, "keel a+b / plain C loop, malloc per op (informational)")
check("add_16M_inplace_ratio", ">=", 0.9, "keel d:add_(b) / C d[i] += b[i] (informational)")
check("overhead_add", "<=", 1.0, "us per 4-element a+b from Lua")
check("overhead_add_ratio_torch", "<=", 0.25, "BASELINE.md: <= 0.25x PyTorch eager")
check("overhead_linear_fwd_bwd_ratio_torch", "<=", 0.25, "BASELINE.md: <= 0.25x PyTorch")
if #checks > 0 then io.write(table.concat(checks, "\n"), "\n") end
