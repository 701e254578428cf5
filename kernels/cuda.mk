# kernels/cuda.mk: builds the CUDA plugin libkeel_cuda.so with nvcc.
#
# premake4 has no rules for .cu files, so the generated makefiles call this
# one from keel_static's pre-build step (premake5.lua), in build/:
#   make -f ../kernels/cuda.mk NVCC=... CFG=release OBJ=obj/release/cuda LIB=release/lib/libkeel_cuda.so
# It is incremental: objects depend on their .cu and on the headers nvcc
# reports (-MD), the library on the objects.
#
# The plugin is dlopened by the engine (engine/device.c); nothing links it.
# Targets: sm_80 (A100), sm_90 (H100/H200) and compute_90 PTX, which newer
# GPUs compile when they load it. Device code is never instrumented: the
# asan configuration reuses the release objects (OBJ), so a CI run that
# builds both compiles the kernels once.
#
# Target `sim` builds the CPU simulator plugin instead (kernels/sim/: the
# same .cu files compiled as plain C++ by g++ against its own CUDA
# headers, no CUDA library linked), for every configuration, with or
# without nvcc:
#   make -f ../kernels/cuda.mk sim CFG=asan SIMOBJ=obj/asan/cuda_sim SIMLIB=asan/lib/libkeel_cuda_sim.so
# The asan configuration instruments it (-fsanitize=address,undefined),
# so a kernel's out-of-bounds access is reported where it happens. `sim`
# also builds the simulator's self-test, SIMTEST (default
# $(CFG)/bin/kcsim_test), from tests/sim/.

NVCC ?= nvcc
CFG ?= release
ROOT ?= ..
OBJ ?= obj/$(CFG)/cuda
LIB ?= $(CFG)/lib/libkeel_cuda.so
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
# the toolkit's libraries: lib64 on Linux installs, targets/... in some
CUDA_LIBDIR ?= $(firstword $(wildcard $(CUDA_HOME)/lib64 $(CUDA_HOME)/targets/x86_64-linux/lib) $(CUDA_HOME)/lib64)

ARCH := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -gencode arch=compute_90,code=compute_90
TARGETS := sm_80 sm_90 compute_90

ifeq ($(CFG),debug)
OPT := -O0 -g -lineinfo -Xcompiler -O0
else
OPT := -O3 -lineinfo
endif

FLAGS := -std=c++17 $(OPT) -Xcompiler -fPIC,-fvisibility=hidden,-Wall \
         -I$(ROOT)/engine -I$(ROOT)/kernels -DKC_TARGETS='"$(TARGETS)"' $(ARCH)
# -lstdc++ for the guard of the table's function-local static
LIBS := -L$(CUDA_LIBDIR) -Xlinker -rpath=$(CUDA_LIBDIR) -lcublas -lcudart -lstdc++

SRC := $(wildcard $(ROOT)/kernels/*.cu)
OBJS := $(patsubst $(ROOT)/kernels/%.cu,$(OBJ)/%.o,$(SRC))

all: $(LIB)

$(LIB): $(OBJS)
	@mkdir -p $(dir $@)
	@echo "nvcc: linking $(notdir $@) ($(CFG))"
	@$(NVCC) -shared -o $@ $(OBJS) $(LIBS)

$(OBJ)/%.o: $(ROOT)/kernels/%.cu
	@mkdir -p $(OBJ)
	@echo "nvcc: $(notdir $<) ($(TARGETS))"
	@$(NVCC) $(FLAGS) -MD -MF $(@:.o=.d) -c $< -o $@

-include $(OBJS:.o=.d)

# ---------------------------------------------------------------- simulator
CXX ?= g++
SIMOBJ ?= obj/$(CFG)/cuda_sim
SIMLIB ?= $(CFG)/lib/libkeel_cuda_sim.so
ifeq ($(CFG),debug)
SIMOPT := -O0 -g
else ifeq ($(CFG),asan)
SIMOPT := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer
else
SIMOPT := -O2
endif
# KC_MAX_BLOCKS: a small odd grid cap, so grid-stride loops go round;
# KC_INDEX32_LIMIT: a small one, so the tests' sizes take both the 32-bit
# and the 64-bit index paths (common.cuh kc_index32)
SIMFLAGS := -std=c++17 $(SIMOPT) -fPIC -fvisibility=hidden -Wall -Wno-unknown-pragmas -DKEEL_CUDA_SIM \
            -DKC_MAX_BLOCKS=7 -DKC_INDEX32_LIMIT=4096 -I$(ROOT)/kernels/sim -I$(ROOT)/engine -I$(ROOT)/kernels
SIMSRC := $(wildcard $(ROOT)/kernels/sim/*.cpp)
SIMOBJS := $(patsubst $(ROOT)/kernels/%.cu,$(SIMOBJ)/%.o,$(SRC)) \
           $(patsubst $(ROOT)/kernels/sim/%.cpp,$(SIMOBJ)/%.o,$(SIMSRC))

# The simulator's self-test (tests/sim/*.cu, kcsim_test): compiled like
# the kernels, linked with the simulator's own objects (the plugin hides
# their symbols) into an executable that tools/test.sh runs.
SIMTEST ?= $(CFG)/bin/kcsim_test
SIMTESTSRC := $(wildcard $(ROOT)/tests/sim/*.cu)
SIMTESTOBJS := $(patsubst $(ROOT)/tests/sim/%.cu,$(SIMOBJ)/test/%.o,$(SIMTESTSRC))
SIMRTOBJS := $(patsubst $(ROOT)/kernels/sim/%.cpp,$(SIMOBJ)/%.o,$(SIMSRC))

ifneq ($(SIMTESTSRC),)
sim: $(SIMLIB) $(SIMTEST)
else
sim: $(SIMLIB)
endif

$(SIMTEST): $(SIMTESTOBJS) $(SIMRTOBJS)
	@mkdir -p $(dir $@)
	@echo "sim: linking $(notdir $@) ($(CFG))"
	@$(CXX) $(SIMOPT) -o $@ $(SIMTESTOBJS) $(SIMRTOBJS) -lpthread

$(SIMOBJ)/test/%.o: $(ROOT)/tests/sim/%.cu
	@mkdir -p $(SIMOBJ)/test
	@echo "sim: tests/sim/$(notdir $<) ($(CFG))"
	@$(CXX) $(SIMFLAGS) -x c++ -include $(ROOT)/kernels/sim/kcsim.h -MD -MF $(@:.o=.d) -c $< -o $@

$(SIMLIB): $(SIMOBJS)
	@mkdir -p $(dir $@)
	@echo "sim: linking $(notdir $@) ($(CFG))"
	@$(CXX) -shared $(SIMOPT) -o $@ $(SIMOBJS) -lpthread

$(SIMOBJ)/%.o: $(ROOT)/kernels/%.cu
	@mkdir -p $(SIMOBJ)
	@echo "sim: $(notdir $<) ($(CFG))"
	@$(CXX) $(SIMFLAGS) -x c++ -include $(ROOT)/kernels/sim/kcsim.h -MD -MF $(@:.o=.d) -c $< -o $@

$(SIMOBJ)/%.o: $(ROOT)/kernels/sim/%.cpp
	@mkdir -p $(SIMOBJ)
	@echo "sim: sim/$(notdir $<) ($(CFG))"
	@$(CXX) $(SIMFLAGS) -MD -MF $(@:.o=.d) -c $< -o $@

-include $(SIMOBJS:.o=.d) $(SIMTESTOBJS:.o=.d)

.PHONY: all sim
