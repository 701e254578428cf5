-- bench/common.lua: shared helpers of the keel benchmarks.
--
-- Finds keel and the bench helper modules, times with a monotonic wall
-- clock, takes medians, and prints the machine-readable lines
--   RESULT name=<name> value=<number> unit=<unit>
-- Scripts load it with
--   package.path = (arg[0]:match("^(.*)/") or ".") .. "/?.lua;" .. package.path
--   local B = require "common"

local B = {}

local function dirname(p) return p:match("^(.*)/[^/]*$") or "." end

B.bench_dir = dirname(arg and arg[0] or "bench/x.lua")
B.root = B.bench_dir .. "/.."

-- Where the keel C module comes from, first match wins:
--   KEEL_CPATH   a Lua cpath pattern ("/tmp/kb/lua/?.so") or a directory
--                holding keel/core.so ("/tmp/kb/lua")
--   build/release/lua/keel/core.so   (tools/build.sh release)
--   /tmp/kb/lua/keel/core.so         (the lead's quick build)
local function exists(p) local f = io.open(p, "rb"); if f then f:close() return true end return false end

local function keel_cpath()
  local env = os.getenv("KEEL_CPATH")
  if env and env ~= "" then
    if env:find("?", 1, true) then return env end
    return (env:gsub("/$", "")) .. "/?.so"
  end
  local why = {}
  for _, d in ipairs { B.root .. "/build/release/lua", "/tmp/kb/lua" } do
    local so = d .. "/keel/core.so"
    if exists(so) then
      -- a half-built module (no entry point) is skipped, with a warning
      local f, err = package.loadlib(so, "luaopen_keel_core")
      if f then return d .. "/?.so" end
      why[#why + 1] = so .. ": " .. tostring(err)
      io.stderr:write("bench: skipping ", so, ": ", tostring(err), "\n")
    end
  end
  error("bench: no loadable keel.core (" .. table.concat(why, "; ") ..
        "): run tools/build.sh or set KEEL_CPATH", 0)
end

-- The keel executable carries keel.core itself (package.preload): a
-- core.so loaded beside it would be a second engine.
local builtin = package.preload["keel.core"] or package.loaded["keel.core"]
local cpath = not builtin and keel_cpath() or nil
B.keel_cpath = cpath or "(built into the keel executable)"
package.path = table.concat({
  B.root .. "/bindings/?.lua", B.root .. "/bindings/?/init.lua", package.path }, ";")
package.cpath = (cpath and cpath .. ";" or "") .. B.bench_dir .. "/.build/?.so;" .. package.cpath

local ok, benchlib = pcall(require, "benchlib")
if ok then B.lib = benchlib end

-- B.clock(default) -> now, name. BENCH_CLOCK overrides the script's default:
--   wall     monotonic wall clock (needed when OpenBLAS runs 2 threads)
--   thread   CPU time of this thread, user + system: single-threaded work
--            only; on a shared machine it leaves out the time other
--            processes hold the core (equals wall on an idle machine)
function B.clock(default)
  local name = os.getenv("BENCH_CLOCK")
  if name == nil or name == "" then name = default end
  if not B.lib then
    -- keel's own monotonic wall clock stands in (the "thread" clock needs benchlib)
    if name == "wall" then return require("keel.core")._summary.now, "wall" end
    -- os.clock is CPU time of all threads: right for 1-thread loops only
    io.stderr:write("bench: benchlib not built (run bench/run.sh); timing with os.clock\n")
    return os.clock, "os.clock"
  end
  if name == "thread" then return B.lib.thread_cpu, "thread" end
  if name ~= "wall" then error("bench: BENCH_CLOCK must be wall or thread, got " .. name, 0) end
  return B.lib.now, "wall"
end

function B.median(t)
  local s = {}
  for i = 1, #t do s[i] = t[i] end
  table.sort(s)
  local n = #s
  if n == 0 then return 0 / 0 end
  if n % 2 == 1 then return s[(n + 1) // 2] end
  return (s[n // 2] + s[n // 2 + 1]) / 2
end

function B.min(t)
  local m = math.huge
  for i = 1, #t do if t[i] < m then m = t[i] end end
  return m
end

function B.max(t)
  local m = -math.huge
  for i = 1, #t do if t[i] > m then m = t[i] end end
  return m
end

local function fmt(v)
  if v ~= v then return "nan" end
  local a = math.abs(v)
  if a >= 100 then return ("%.1f"):format(v)
  elseif a >= 1 then return ("%.3f"):format(v)
  else return ("%.4g"):format(v) end
end
B.fmt = fmt

function B.result(name, value, unit)
  io.write(("RESULT name=%s value=%s unit=%s\n"):format(name, fmt(value), unit))
  io.flush()
end

-- A human-readable line (not parsed): spread of the samples.
function B.note(fmtstr, ...)
  io.write("# ", fmtstr:format(...), "\n")
  io.flush()
end

function B.spread(t)
  return ("median %s min %s max %s (n=%d)"):format(fmt(B.median(t)), fmt(B.min(t)), fmt(B.max(t)), #t)
end

-- Seconds per call of step(): warmup calls, then rounds of reps calls
-- timed by now(); the median over rounds, and the rounds' times. sync (when
-- given: keel.cuda.synchronize) runs after the warmup and closes each round,
-- so queued device work is inside the time.
function B.time_steps(now, step, warmup, reps, rounds, sync)
  for _ = 1, warmup do step() end
  if sync then sync() end
  local per = {}
  for r = 1, rounds do
    local t0 = now()
    for _ = 1, reps do step() end
    if sync then sync() end
    per[r] = (now() - t0) / reps
  end
  return B.median(per), per
end

-- Integer environment knob with a default.
function B.env_int(name, default)
  local v = tonumber(os.getenv(name) or "")
  return v and math.floor(v) or default
end

-- BENCH_SCALE (default 1) scales every iteration count, e.g. 0.2 for a
-- quick smoke run.
B.scale = tonumber(os.getenv("BENCH_SCALE") or "") or 1
function B.scaled(n) return math.max(1, math.floor(n * B.scale + 0.5)) end

return B
