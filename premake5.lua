--[[
premake5.lua: the keel build.

Runs under Debian's premake4 (`premake4 --file=premake5.lua gmake`) and under
premake5 (`premake5 gmake2`, or `gmake` from beta5 on). tools/build.sh is the
usual entry point. Everything generated lands under build/:

  build/Makefile, build/*.make         generated makefiles
  build/<cfg>/lib/libkeel.{a,so}       the engine (engine/*.c), for C hosts
  build/<cfg>/lua/keel/core.so         the Lua module (bindings/*.c minus repl.c)
  build/<cfg>/bin/keel                 the REPL / script runner (static Lua)
  build/<cfg>/bin/keel_ctest           the Lua-free C test (tests/c/*.c)
  build/<cfg>/lib/libkeel_cuda.so      the CUDA plugin (kernels/*.cu), when nvcc is found
  build/<cfg>/lib/libkeel_cuda_sim.so  the same kernels on a CPU simulator (kernels/sim/), always
  build/<cfg>/bin/kcsim_test           the simulator's self-test (tests/sim/), always
  build/<cfg>/lib/libkeel_fakecuda.so  a host-memory stand-in for it, for the tests
  build/obj/<cfg>/<project>/           object files
  build/cuda.txt                       what was decided about CUDA (tools/build.sh shows it)

Configurations: release (-O2), debug (-O0 -g, KEEL_DEBUG), asan (-O1 -g,
AddressSanitizer + UBSan).

Sources are globbed when the makefiles are generated: rerun premake after
adding a .c file (tools/build.sh always does).

CUDA: the plugin is built when nvcc is on PATH or at /usr/local/cuda/bin
(--with-cuda: its absence is an error; --without-cuda: never built). The
engine itself never links CUDA: it opens the plugin at run time, so the
CPU build is the same with or without nvcc. The simulator plugin needs
only g++ and is built in every case (KEEL_CUDA_PLUGIN=<its path> selects
it; tools/test.sh runs the CUDA specs on it).
]]

local CONFIGS = { "release", "debug", "asan" }

newoption { trigger = "with-cuda", description = "Build the CUDA plugin; fail when nvcc is not found" }
newoption { trigger = "without-cuda", description = "Do not build the CUDA plugin, even when nvcc is found" }
local LUA_INC = "/usr/include/lua5.4"
local LUA_STATIC = "/usr/lib/x86_64-linux-gnu/liblua5.4.a"

-- {==================================================================
-- Shims: premake4 (Lua 5.1, 4.3) and premake5 differ in a few names.
-- ===================================================================

-- premake5 has workspace/filter/symbols; premake4 has solution/configuration
-- and flags{"Symbols"}. premake5 still accepts `solution`, but dropped
-- `configuration` (beta3) and flags{"Symbols"} (beta4).
local workspace_ = workspace or solution
-- premake5 renamed excludes to removefiles (the old name is deprecated).
local removefiles_ = removefiles or excludes

-- Scope the following settings to one configuration, or to all with nil.
local function when(cfg)
  if filter then
    filter(cfg and ("configurations:" .. cfg) or {})
  else
    configuration(cfg or {})
  end
end

-- Debug symbols; premake4 also stops stripping (-s) the binaries.
local function with_symbols()
  if symbols then symbols "On" else flags { "Symbols" } end
end

-- }==================================================================

workspace_ "keel"
  configurations(CONFIGS)
  location "build"
  language "C"

  includedirs { "engine", "kernels", LUA_INC }
  buildoptions {
    "-std=c11", "-D_GNU_SOURCE",
    "-Wall", "-Wextra", "-Wshadow", "-Wmissing-prototypes",
    "-Wno-unused-parameter",
    "-fPIC",                 -- premake4 gives static libraries none; libkeel.a goes into core.so
    "-fvisibility=hidden",   -- public symbols are marked KEEL_API / luaopen_keel_core
  }

  when "release"
    buildoptions { "-O2" }

  when "debug"
    defines { "KEEL_DEBUG" }
    buildoptions { "-O0", "-g" }
    with_symbols()

  when "asan"
    buildoptions { "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer" }
    linkoptions { "-fsanitize=address,undefined" }
    with_symbols()

  when(nil)

-- Output and object directories for the current project, per configuration.
-- (premake4 has no %{cfg.name} tokens, so spell each configuration out.)
local function outputs(name, sub)
  for _, cfg in ipairs(CONFIGS) do
    when(cfg)
      targetdir("build/" .. cfg .. "/" .. sub)
      objdir("build/obj/" .. cfg .. "/" .. name)
  end
  when(nil)
end

-- The Lua binding sources: every bindings/*.c, and the REPL's main
-- (bindings/repl.c) only in the executable.
local function binding_files(with_repl)
  files { "bindings/*.c", "bindings/*.h" }
  if not with_repl then removefiles_ { "bindings/repl.c" } end
end

-- {==================================================================
-- CUDA: found or not, decided once here. kernels/*.cu are compiled by nvcc
-- from a pre-build step of keel_static (premake4 has no per-file rules;
-- premake5 runs pre-build steps only in projects with C sources) through
-- kernels/cuda.mk, into build/<cfg>/lib/libkeel_cuda.so. That is a plugin
-- the engine dlopens (engine/device.c): no project links it, so nothing
-- has to relink when it changes, and a machine without CUDA runs the same
-- binaries.
-- ===================================================================

local function find_nvcc()
  local dir = os.pathsearch("nvcc", os.getenv("PATH") or "")
  if dir then return dir .. "/nvcc" end
  if os.isfile("/usr/local/cuda/bin/nvcc") then return "/usr/local/cuda/bin/nvcc" end
  return nil
end

local NVCC, CUDA_NOTE = nil, nil
if _OPTIONS["without-cuda"] then
  CUDA_NOTE = "off: --without-cuda"
else
  NVCC = find_nvcc()
  if NVCC then
    CUDA_NOTE = "on " .. NVCC
  elseif _OPTIONS["with-cuda"] then
    error("--with-cuda: nvcc was not found on PATH or in /usr/local/cuda/bin", 0)
  else
    CUDA_NOTE = "off: nvcc not found on PATH or in /usr/local/cuda/bin"
  end
end
if _ACTION then
  os.mkdir("build")
  local f = io.open("build/cuda.txt", "w")
  if f then f:write(CUDA_NOTE, "\n"); f:close() end
end

-- }==================================================================

-- {==================================================================
-- The engine: libkeel.a and libkeel.so
-- ===================================================================

-- premake4 links a sibling library as `-L<its targetdir> -lkeel`, and ld
-- prefers libkeel.so when both sit in one directory. So the archive that the
-- other projects link is built alone in build/obj/<cfg>/libkeel/, and copied
-- to build/<cfg>/lib/libkeel.a for C hosts. (premake5 links siblings by full
-- path and would not need this.)
project "keel_static"
  kind "StaticLib"
  targetname "keel"
  files { "engine/*.c", "engine/*.h" }
  for _, cfg in ipairs(CONFIGS) do
    when(cfg)
      targetdir("build/obj/" .. cfg .. "/libkeel")
      objdir("build/obj/" .. cfg .. "/keel_static")
      -- commands run in build/, where the makefiles are. `+` hands make's
      -- jobserver to the nested make. The asan configuration shares the
      -- release objects (device code is not instrumented).
      local pre = {}
      if NVCC then
        pre[#pre + 1] = "+$(MAKE) --no-print-directory -f ../kernels/cuda.mk ROOT=.. NVCC=" .. NVCC .. " CFG=" .. cfg ..
          " OBJ=obj/" .. (cfg == "asan" and "release" or cfg) .. "/cuda LIB=" .. cfg .. "/lib/libkeel_cuda.so"
      end
      -- the CPU simulator plugin (kernels/sim/) and its self-test
      -- (tests/sim/, bin/kcsim_test): g++ only, so always; the asan
      -- configuration instruments them (their own objects)
      pre[#pre + 1] = "+$(MAKE) --no-print-directory -f ../kernels/cuda.mk sim ROOT=.. CFG=" .. cfg ..
        " SIMOBJ=obj/" .. cfg .. "/cuda_sim SIMLIB=" .. cfg .. "/lib/libkeel_cuda_sim.so SIMTEST=" .. cfg .. "/bin/kcsim_test"
      prebuildcommands(pre)
      postbuildcommands {
        "mkdir -p " .. cfg .. "/lib",
        "cp -f obj/" .. cfg .. "/libkeel/libkeel.a " .. cfg .. "/lib/libkeel.a",
      }
  end
  when(nil)

project "keel_shared"
  kind "SharedLib"
  targetname "keel"
  files { "engine/*.c", "engine/*.h" }
  links { "openblas", "z", "pthread", "m", "dl" }
  outputs("keel_shared", "lib")

-- }==================================================================

-- {==================================================================
-- The Lua module keel.core (core.so, loaded by stock lua5.4: it must not
-- link liblua, the interpreter exports the lua_* symbols)
-- ===================================================================

project "keel_lua"
  kind "SharedLib"
  targetname "core"
  targetprefix ""
  binding_files()
  links { "keel_static", "openblas", "z", "pthread", "m", "dl" }
  outputs("keel_lua", "lua/keel")

-- }==================================================================

-- {==================================================================
-- The keel executable: REPL + script runner with Lua linked statically.
-- -Wl,-E exports the lua_* symbols to C modules loaded by require; the
-- whole archive goes in so that every lua_* symbol is there to export.
-- ===================================================================

project "keel_bin"
  kind "ConsoleApp"
  targetname "keel"
  binding_files(true)
  links { "keel_static", "openblas", "z", "pthread", "edit", "m", "dl" }
  linkoptions { "-Wl,-E", "-Wl,--whole-archive", LUA_STATIC, "-Wl,--no-whole-archive" }
  outputs("keel_bin", "bin")

-- }==================================================================

-- {==================================================================
-- The Lua-free C test (only when its sources exist)
-- ===================================================================

if #os.matchfiles("tests/c/*.c") > 0 then
  project "keel_ctest"
    kind "ConsoleApp"
    targetname "keel_ctest"
    files { "tests/c/*.c", "tests/c/*.h" }
    links { "keel_static", "openblas", "z", "pthread", "m", "dl" }
    outputs("keel_ctest", "bin")
end

-- }==================================================================

-- {==================================================================
-- A stand-in CUDA plugin in host memory (tests/plugin/fake_cuda.c): the
-- tests load it to run the device layer (dispatch, caching allocator,
-- copies, to(), model:to) on machines without a GPU. Built always.
-- ===================================================================

if #os.matchfiles("tests/plugin/*.c") > 0 then
  project "keel_fakecuda"
    kind "SharedLib"
    targetname "keel_fakecuda"
    files { "tests/plugin/*.c" }
    outputs("keel_fakecuda", "lib")
end

-- }==================================================================
