# moat's build: the C parts, every test stage, and the benchmarks.
#
#   make deps    install the missing Debian packages (the only target that
#                calls apt-get; a no-op when everything is installed)
#   make c       build the C parts for the VM: the core library and
#                priv/ (moat_nif.so, moat_demo.so, the moat_cnode
#                executable). The default goal, and what rebar3's
#                pre_hook runs, so it never calls apt.
#   make test    deps, then each stage of TEST_STAGES in order, timed;
#                stops at the first stage that fails
#   make bench   deps, then build, then the benchmark suite
#                (moat_bench:main/0): a status line while it runs, one
#                table, and bench/results/<date>.csv and .svg. Under five
#                minutes on two cores; MOAT_BENCH_QUICK=1 for a short run
#   make bench-core  the C core's own benchmark table (bench/core.c)
#   make bench-peers build the C peers of the suite (bench/peers/: a dirty
#                NIF, a port program, a bare ei C-node) into
#                _build/c/plain/bench/
#   make fuzz    deps, then the test-fuzz stage: each libFuzzer target for
#                FUZZ_SECONDS (`make fuzz FUZZ_SECONDS=600` by hand)
#   make shell   an Erlang shell with moat loaded and the pool demo
#                running (NIF backend), the VM flags of the benchmarks
#   make iex     the same in Elixir's iex
#   make clean   remove the C build (_build/c) and what it put in priv/
#
# Variables: CC, CFLAGS, CPPFLAGS and LDFLAGS are taken from the
# environment and moat's own flags are appended to them (moat's include
# directories are searched before those in CPPFLAGS). TSAN_CC compiles the
# TSan variant (default $(CC)). ERL_ROOT is found with erl unless given
# (rebar3 hooks pass it as ERLANG_ROOT_DIR). JOBS is the -j of the build
# steps in `make test` and `make bench`. C_TEST_TIMEOUT bounds each C test
# binary, in seconds. FUZZ_CC (default clang) builds the fuzz targets,
# FUZZ_SECONDS (default 15) is how long each runs, and FUZZ_FLAGS adds
# libFuzzer options. VERBOSE=1 prints whole compiler commands.
#
# Layout: every variant V in {plain, asan, tsan} builds into _build/c/V/:
# libmoat_core.a from c_src/core/*.c, one cmocka binary test_* per
# test/c/test_*.c (with the other test/c/*.c as helpers), and, for asan and
# tsan, moat_demo.so from c_src/demo/*.c, and fixtures/*.so from
# test/c/fixtures/*.c (the loader tests' libraries). The plain demo goes to
# priv/moat_demo.so; benchmarks bench/*.c become _build/c/plain/bench_*.
# The C-node executable, from c_src/cnode, is priv/moat_cnode (plain) or
# _build/c/V/moat_cnode, and test/c/cnode gives each variant test_cnode
# and test_cnode_frame. The fuzz targets, test/c/fuzz/fuzz_*.c, become
# _build/c/fuzz/fuzz_* over the core and the C-node's frame decoder built
# again with clang's fuzzer instrumentation; each runs on its own working
# corpus, _build/c/fuzz/corpus/fuzz_*/ (kept between runs, and seeded from
# test/c/fuzz/corpus/fuzz_*/), and writes what it finds to
# _build/c/fuzz/artifacts/fuzz_*/.
# Sanitizer and fuzz builds never write into priv/, nor the fuzz runs into
# the source tree. New .c files are picked up by the wildcards below
# without editing this file.

SHELL := /bin/bash
.DEFAULT_GOAL := c

UNAME_S := $(shell uname -s)
ifneq ($(UNAME_S),Linux)
ifneq ($(filter-out clean,$(or $(MAKECMDGOALS),c)),)
$(error moat supports Linux only for now (uname -s says $(UNAME_S)))
endif
endif

B := _build/c
VARIANTS := plain asan tsan
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
REBAR3 ?= rebar3

# Mix 1.14 runs rebar3 dependencies with the rebar3 it finds here; offline
# it cannot download one of its own.
ifeq ($(strip $(MIX_REBAR3)),)
MIX_REBAR3 := $(shell command -v rebar3 2>/dev/null)
endif
export MIX_REBAR3

ifeq ($(VERBOSE),1)
Q :=
else
Q := @
endif

# --- Debian packages ---------------------------------------------------------

DEB_PACKAGES := erlang-dev erlang-nox erlang-eunit erlang-common-test \
    erlang-dialyzer rebar3 elixir libuv1-dev libcmocka-dev valgrind gcc \
    clang libclang-rt-14-dev pkg-config make

# --- Toolchain and flags -----------------------------------------------------

# Found lazily and once: `make deps` and `make clean` must work before
# Erlang is installed, and a target that needs ERL_ROOT asks erl only once.
ERL_ROOT_CMD := erl -noshell -eval 'io:format("~s",[code:root_dir()]),halt().'
ifeq ($(origin ERL_ROOT),undefined)
ERL_ROOT = $(eval ERL_ROOT := $(or $(ERLANG_ROOT_DIR),$(shell $(ERL_ROOT_CMD) 2>/dev/null)))$(ERL_ROOT)
endif
EI_DIR = $(lastword $(sort $(wildcard $(ERL_ROOT)/lib/erl_interface-*)))
EI_INC = $(EI_DIR)/include
# Debian builds libei.a as position-independent code, so it links into
# shared objects too.
EI_LIB = $(EI_DIR)/lib/libei.a

UV_CFLAGS = $(eval UV_CFLAGS := $(shell pkg-config --cflags libuv 2>/dev/null))$(UV_CFLAGS)
UV_LIBS = $(eval UV_LIBS := $(shell pkg-config --libs libuv 2>/dev/null))$(UV_LIBS)
CMOCKA_CFLAGS = $(eval CMOCKA_CFLAGS := $(shell pkg-config --cflags cmocka 2>/dev/null))$(CMOCKA_CFLAGS)
CMOCKA_LIBS = $(eval CMOCKA_LIBS := $(shell pkg-config --libs cmocka 2>/dev/null))$(CMOCKA_LIBS)

LIBS = $(EI_LIB) $(UV_LIBS) -lpthread -ldl -lm

TSAN_CC ?= $(CC)
CC_plain = $(CC)
CC_asan = $(CC)
CC_tsan = $(TSAN_CC)

MOAT_CFLAGS := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -g -pthread -fPIC
# Valgrind runs the plain binaries, and valgrind 3.19 cannot read the
# DWARF 5 that clang 14 writes by default.
CFLAGS_plain := -O2 -gdwarf-4
CFLAGS_asan := -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
    -fno-sanitize-recover=all
CFLAGS_tsan := -O1 -fsanitize=thread

# c_src/core (and the demo, which must load into the C-node as well as the
# VM) may not depend on ERTS. Leaving the erl_nif include path out is not
# enough on Debian, whose erlang-dev also puts erl_nif.h in /usr/include,
# so these builds search a directory of stand-ins first: each stops the
# compiler with an #error naming the rule that was broken.
GUARD_DIR := $(B)/erts-guard
GUARD_HEADERS := $(addprefix $(GUARD_DIR)/,erl_nif.h erl_driver.h)

CORE_CPPFLAGS = -I$(GUARD_DIR) -Iinclude -Ic_src/core -I$(EI_INC) \
    $(UV_CFLAGS) $(CPPFLAGS)
DEMO_CPPFLAGS = -I$(GUARD_DIR) -Iinclude -Ic_src/demo -I$(EI_INC) \
    $(UV_CFLAGS) $(CPPFLAGS) -fvisibility=hidden
TEST_CPPFLAGS = -Iinclude -Ic_src/core -Itest/c -I$(EI_INC) $(UV_CFLAGS) \
    $(CMOCKA_CFLAGS) $(CPPFLAGS)
# The NIF is the one part built against ERTS.
NIF_CPPFLAGS = -Iinclude -Ic_src/core -Ic_src/nif -I$(ERL_ROOT)/usr/include \
    -I$(EI_INC) $(UV_CFLAGS) $(CPPFLAGS) -fvisibility=hidden
BENCH_CPPFLAGS = -Iinclude -Ic_src/core -Ibench -I$(EI_INC) $(UV_CFLAGS) \
    $(CPPFLAGS)

# $(1): variant, $(2): include paths and flags of that part of the tree.
define compile
@mkdir -p $(@D)
@$(if $(Q),echo "  CC [$(1)]  $<")
$(Q)$(CC_$(1)) $(CFLAGS) $(MOAT_CFLAGS) $(CFLAGS_$(1)) $(2) -MMD -MP -c $< -o $@
endef

# $(1): variant, $(2): extra libraries.
define link_program
@$(if $(Q),echo "  LD [$(1)]  $@")
$(Q)$(CC_$(1)) $(CFLAGS) $(MOAT_CFLAGS) $(CFLAGS_$(1)) $(LDFLAGS) -o $@ $^ \
    $(2) $(LIBS)
endef

# A task library carries its own copy of ei, hidden so that it never
# interposes on the host's.
define link_shared
@mkdir -p $(@D)
@$(if $(Q),echo "  LD [$(1)]  $@")
$(Q)$(CC_$(1)) $(CFLAGS) $(MOAT_CFLAGS) $(CFLAGS_$(1)) $(LDFLAGS) -shared \
    -o $@ $^ -Wl,--exclude-libs,libei.a $(LIBS)
endef

# --- Sources and products ----------------------------------------------------

CORE_SRCS := $(wildcard c_src/core/*.c)
DEMO_SRCS := $(wildcard c_src/demo/*.c)
TEST_SRCS := $(wildcard test/c/test_*.c)
TEST_HELPER_SRCS := $(filter-out $(TEST_SRCS),$(wildcard test/c/*.c))
# Small task libraries, good and broken, that the loader tests open.
FIXTURE_SRCS := $(wildcard test/c/fixtures/*.c)
BENCH_SRCS := $(wildcard bench/*.c)
NIF_SRCS := $(wildcard c_src/nif/*.c)
NIF_OBJS := $(patsubst c_src/nif/%.c,$(B)/plain/obj/nif/%.o,$(NIF_SRCS))
NIF_SO := $(if $(NIF_SRCS),priv/moat_nif.so)

TEST_NAMES := $(basename $(notdir $(TEST_SRCS)))
BENCH_BINS := $(patsubst bench/%.c,$(B)/plain/bench_%,$(BENCH_SRCS))

DEMO_SO_plain := priv/moat_demo.so
DEMO_SO_asan := $(B)/asan/moat_demo.so
DEMO_SO_tsan := $(B)/tsan/moat_demo.so

# $(1): variant. Defines the variant's file lists and pattern rules.
# Each variant's objects also depend on $(B)/V/flags, which holds the
# compiler and flags they were built with and is rewritten when those
# change (another CC or CFLAGS, say), so that nothing stale is linked.
define variant_rules
FLAGS_SIG_$(1) := $$(strip $$(CC_$(1)) $$(CFLAGS) $$(CPPFLAGS) $$(LDFLAGS) $$(MOAT_CFLAGS) $$(CFLAGS_$(1)))
ifneq ($$(strip $$(file <$(B)/$(1)/flags)),$$(FLAGS_SIG_$(1)))
.PHONY: $(B)/$(1)/flags
endif
$(B)/$(1)/flags:
	$$(shell mkdir -p $$(@D))$$(file >$$@,$$(FLAGS_SIG_$(1)))

CORE_OBJS_$(1) := $$(patsubst c_src/core/%.c,$(B)/$(1)/obj/core/%.o,$$(CORE_SRCS))
DEMO_OBJS_$(1) := $$(patsubst c_src/demo/%.c,$(B)/$(1)/obj/demo/%.o,$$(DEMO_SRCS))
TEST_HELPER_OBJS_$(1) := $$(patsubst test/c/%.c,$(B)/$(1)/obj/test/%.o,$$(TEST_HELPER_SRCS))
TEST_BINS_$(1) := $$(addprefix $(B)/$(1)/,$$(TEST_NAMES))
DEMO_$(1) := $$(if $$(DEMO_SRCS),$$(DEMO_SO_$(1)))
FIXTURES_$(1) := $$(patsubst test/c/fixtures/%.c,$(B)/$(1)/fixtures/%.so,$$(FIXTURE_SRCS))

$(B)/$(1)/obj/core/%.o: c_src/core/%.c Makefile $(B)/$(1)/flags | $$(GUARD_HEADERS) check-build-env
	$$(call compile,$(1),$$(CORE_CPPFLAGS))

$(B)/$(1)/obj/demo/%.o: c_src/demo/%.c Makefile $(B)/$(1)/flags | $$(GUARD_HEADERS) check-build-env
	$$(call compile,$(1),$$(DEMO_CPPFLAGS))

$(B)/$(1)/obj/test/%.o: test/c/%.c Makefile $(B)/$(1)/flags | check-build-env check-test-env
	$$(call compile,$(1),$$(TEST_CPPFLAGS))

$(B)/$(1)/libmoat_core.a: $$(CORE_OBJS_$(1)) | check-build-env
	@mkdir -p $$(@D)
	@rm -f $$@
	@$$(if $$(Q),echo "  AR [$(1)]  $$@")
	$$(Q)$$(AR) rcs $$@ $$^

$(B)/$(1)/test_%: $(B)/$(1)/obj/test/test_%.o $$(TEST_HELPER_OBJS_$(1)) $(B)/$(1)/libmoat_core.a
	$$(call link_program,$(1),$$(CMOCKA_LIBS))

$$(DEMO_SO_$(1)): $$(DEMO_OBJS_$(1))
	$$(call link_shared,$(1))

$(B)/$(1)/obj/fixtures/%.o: test/c/fixtures/%.c Makefile $(B)/$(1)/flags | $$(GUARD_HEADERS) check-build-env
	$$(call compile,$(1),$$(DEMO_CPPFLAGS))

$(B)/$(1)/fixtures/%.so: $(B)/$(1)/obj/fixtures/%.o
	$$(call link_shared,$(1))
endef
$(foreach v,$(VARIANTS),$(eval $(call variant_rules,$(v))))

# The NIF glue's harness: test/c/nif drives c_src/nif/moat_nif.c outside
# the VM.  Per variant, the NIF goes into a shared object of its own over
# that variant's core (moat_nif.c pins its own file with dladdr and dlopen,
# which a test executable cannot be) and test_nif links it with a fake
# erl_nif (test/c/nif/fake_erl_nif.c), then runs with the other binaries.
# In this build only, three libuv calls of moat_nif.c are renamed to the
# fake's hooks: its job queues' signal and wait (so that a test can tell
# the janitor and the reaper are idle) and the clock of run/4's and
# task_spin/1's wait (so that a test can hold it still).
NIF_HARNESS_SRCS := $(wildcard test/c/nif/*.c)
NIF_HARNESS_HOOKS := -Duv_cond_signal=fake_uv_cond_signal \
    -Duv_cond_wait=fake_uv_cond_wait -Duv_hrtime=fake_uv_hrtime

# $(1): variant.
define nif_harness_rules
$(B)/$(1)/obj/nif-harness/moat_nif.o: c_src/nif/moat_nif.c Makefile $(B)/$(1)/flags | check-build-env
	$$(call compile,$(1),$$(NIF_CPPFLAGS) $$(NIF_HARNESS_HOOKS))

$(B)/$(1)/obj/nif-harness/%.o: test/c/nif/%.c Makefile $(B)/$(1)/flags | check-build-env check-test-env
	$$(call compile,$(1),$$(TEST_CPPFLAGS) -I$$(ERL_ROOT)/usr/include)

$(B)/$(1)/nif-harness/moat_nif_harness.so: $(B)/$(1)/obj/nif-harness/moat_nif.o $(B)/$(1)/libmoat_core.a
	@mkdir -p $$(@D)
	@$$(if $$(Q),echo "  LD [$(1)]  $$@")
	$$(Q)$$(CC_$(1)) $$(CFLAGS) $$(MOAT_CFLAGS) $$(CFLAGS_$(1)) $$(LDFLAGS) -shared \
	    -Wl,-soname,moat_nif_harness.so -o $$@ $$^ -Wl,--exclude-libs,ALL $$(LIBS)

$(B)/$(1)/test_nif: $$(patsubst test/c/nif/%.c,$(B)/$(1)/obj/nif-harness/%.o,$$(NIF_HARNESS_SRCS)) $(B)/$(1)/nif-harness/moat_nif_harness.so
	$$(call link_program,$(1),$$(CMOCKA_LIBS) -Xlinker -rpath -Xlinker $$(CURDIR)/$(B)/$(1)/nif-harness)

TEST_BINS_$(1) += $(B)/$(1)/test_nif
endef
ifneq ($(NIF_SRCS),)
ifneq ($(NIF_HARNESS_SRCS),)
$(foreach v,$(VARIANTS),$(eval $(call nif_harness_rules,$(v))))
endif
endif

# The C-node: c_src/cnode becomes the executable moat_cnode over each
# variant's core: priv/moat_cnode for the VM (plain), $(B)/V/moat_cnode for
# asan and tsan. Like the core it must not see ERTS, so the guard
# directory comes first on its include path. Its tests join each variant's
# TEST_BINS: test_cnode drives the variant's executable over its stdio
# (run_c_tests says where it is in MOAT_CNODE, and where the tests' own
# task library, test/c/cnode/cnode_lib.c, is in MOAT_CNODE_LIB), and
# test_cnode_frame calls the frame decoder directly.
CNODE_SRCS := $(wildcard c_src/cnode/*.c)
CNODE_CPPFLAGS = -I$(GUARD_DIR) -Iinclude -Ic_src/core -Ic_src/cnode \
    -I$(EI_INC) $(UV_CFLAGS) $(CPPFLAGS)
CNODE_TEST_CPPFLAGS = $(TEST_CPPFLAGS) -Ic_src/cnode -Itest/c/cnode
# Bound at load (-z now): a forked worker then writes no GOT entry, each
# of which would cost it a copied page, on its first call of a function
# (the fork server's own start calls few of them).
CNODE_LDFLAGS := -Wl,-z,now
CNODE_plain := priv/moat_cnode
CNODE_asan := $(B)/asan/moat_cnode
CNODE_tsan := $(B)/tsan/moat_cnode

# $(1): variant.
define cnode_rules
CNODE_OBJS_$(1) := $$(patsubst c_src/cnode/%.c,$(B)/$(1)/obj/cnode/%.o,$$(CNODE_SRCS))
CNODE_LIB_$(1) := $(B)/$(1)/cnode/cnode_lib.so

$(B)/$(1)/obj/cnode/%.o: c_src/cnode/%.c Makefile $(B)/$(1)/flags | $$(GUARD_HEADERS) check-build-env
	$$(call compile,$(1),$$(CNODE_CPPFLAGS))

$$(CNODE_$(1)): $$(CNODE_OBJS_$(1)) $(B)/$(1)/libmoat_core.a
	@mkdir -p $$(@D)
	$$(call link_program,$(1),$$(CNODE_LDFLAGS))

$(B)/$(1)/obj/cnode-test/%.o: test/c/cnode/%.c Makefile $(B)/$(1)/flags | check-build-env check-test-env
	$$(call compile,$(1),$$(CNODE_TEST_CPPFLAGS))

$(B)/$(1)/obj/cnode-lib/%.o: test/c/cnode/%.c Makefile $(B)/$(1)/flags | $$(GUARD_HEADERS) check-build-env
	$$(call compile,$(1),$$(DEMO_CPPFLAGS))

$(B)/$(1)/cnode/cnode_lib.so: $(B)/$(1)/obj/cnode-lib/cnode_lib.o
	$$(call link_shared,$(1))

# The executable and the library are run, not linked: order-only.
$(B)/$(1)/test_cnode: $(B)/$(1)/obj/cnode-test/test_cnode.o | $$(CNODE_$(1)) $(B)/$(1)/cnode/cnode_lib.so
	$$(call link_program,$(1),$$(CMOCKA_LIBS))

$(B)/$(1)/test_cnode_frame: $(B)/$(1)/obj/cnode-test/test_frame.o $(B)/$(1)/obj/cnode/frame.o $(B)/$(1)/libmoat_core.a
	$$(call link_program,$(1),$$(CMOCKA_LIBS))

# test_cnode_dist drives the executable over distribution, ei playing the VM.
$(B)/$(1)/test_cnode_dist: $(B)/$(1)/obj/cnode-test/test_dist.o | $$(CNODE_$(1)) $(B)/$(1)/cnode/cnode_lib.so
	$$(call link_program,$(1),$$(CMOCKA_LIBS))

TEST_BINS_$(1) += $(B)/$(1)/test_cnode $(B)/$(1)/test_cnode_frame $(B)/$(1)/test_cnode_dist
endef
ifneq ($(CNODE_SRCS),)
$(foreach v,$(VARIANTS),$(eval $(call cnode_rules,$(v))))
endif

$(B)/plain/obj/nif/%.o: c_src/nif/%.c Makefile $(B)/plain/flags | check-build-env
	$(call compile,plain,$(NIF_CPPFLAGS))

# The core and ei are linked in and hidden: the NIF exports nif_init only.
priv/moat_nif.so: $(NIF_OBJS) $(B)/plain/libmoat_core.a
	@mkdir -p $(@D)
	@$(if $(Q),echo "  LD [plain]  $@")
	$(Q)$(CC) $(CFLAGS) $(MOAT_CFLAGS) $(CFLAGS_plain) $(LDFLAGS) -shared \
	    -o $@ $^ -Wl,--exclude-libs,ALL $(LIBS)

$(B)/plain/obj/bench/%.o: bench/%.c Makefile $(B)/plain/flags | check-build-env
	$(call compile,plain,$(BENCH_CPPFLAGS))

$(B)/plain/bench_%: $(B)/plain/obj/bench/%.o $(B)/plain/libmoat_core.a
	$(call link_program,plain,)

$(GUARD_HEADERS): Makefile
	@mkdir -p $(@D)
	@printf '%s\n' \
	    '/* Generated by the Makefile: see GUARD_DIR there. */' \
	    '#error "$(@F) is ERTS: c_src/core and c_src/demo must not include it (DESIGN.md section 1)"' \
	    > $@

# The fuzz targets: test/c/fuzz/fuzz_*.c, each a libFuzzer
# LLVMFuzzerTestOneInput, linked with libmoat_fuzz.a, the core and
# c_src/cnode/frame.c compiled with clang's coverage instrumentation and
# ASan and UBSan (the guard directory first, as for the core). Like a
# variant's, these objects are rebuilt when $(B)/fuzz/flags changes.
FUZZ_CC ?= clang
FUZZ_SRCS := $(wildcard test/c/fuzz/fuzz_*.c)
FUZZ_NAMES := $(basename $(notdir $(FUZZ_SRCS)))
CC_fuzz = $(FUZZ_CC)
FUZZ_SANITIZE := address,undefined
CFLAGS_fuzz := -O1 -fno-omit-frame-pointer -fno-sanitize-recover=all \
    -fsanitize=fuzzer-no-link,$(FUZZ_SANITIZE)
FUZZ_OBJS := $(patsubst c_src/core/%.c,$(B)/fuzz/obj/core/%.o,$(CORE_SRCS)) \
    $(if $(wildcard c_src/cnode/frame.c),$(B)/fuzz/obj/cnode/frame.o)

FLAGS_SIG_fuzz := $(strip $(CC_fuzz) $(CFLAGS) $(CPPFLAGS) $(LDFLAGS) $(MOAT_CFLAGS) $(CFLAGS_fuzz))
ifneq ($(strip $(file <$(B)/fuzz/flags)),$(FLAGS_SIG_fuzz))
.PHONY: $(B)/fuzz/flags
endif
$(B)/fuzz/flags:
	$(shell mkdir -p $(@D))$(file >$@,$(FLAGS_SIG_fuzz))

$(B)/fuzz/obj/core/%.o: c_src/core/%.c Makefile $(B)/fuzz/flags | $(GUARD_HEADERS) check-build-env check-fuzz-env
	$(call compile,fuzz,$(CORE_CPPFLAGS))

$(B)/fuzz/obj/cnode/%.o: c_src/cnode/%.c Makefile $(B)/fuzz/flags | $(GUARD_HEADERS) check-build-env check-fuzz-env
	$(call compile,fuzz,$(CNODE_CPPFLAGS))

$(B)/fuzz/obj/fuzz/%.o: test/c/fuzz/%.c Makefile $(B)/fuzz/flags | $(GUARD_HEADERS) check-build-env check-fuzz-env
	$(call compile,fuzz,$(CNODE_CPPFLAGS))

$(B)/fuzz/libmoat_fuzz.a: $(FUZZ_OBJS)
	@rm -f $@
	@$(if $(Q),echo "  AR [fuzz]  $@")
	$(Q)$(AR) rcs $@ $^

$(B)/fuzz/fuzz_%: $(B)/fuzz/obj/fuzz/fuzz_%.o $(B)/fuzz/libmoat_fuzz.a
	@$(if $(Q),echo "  LD [fuzz]  $@")
	$(Q)$(FUZZ_CC) $(CFLAGS) $(MOAT_CFLAGS) -O1 -fsanitize=fuzzer,$(FUZZ_SANITIZE) \
	    $(LDFLAGS) -o $@ $^ $(LIBS)

-include $(wildcard $(B)/*/obj/*/*.d)

# --- Environment checks (never install anything) -----------------------------

check-build-env:
	@[ "$(UNAME_S)" = Linux ] || { echo "moat supports Linux only for now" >&2; exit 1; }
	@command -v $(firstword $(CC)) >/dev/null || { \
	    echo "moat: C compiler '$(CC)' not found: install the Debian package gcc" >&2; exit 1; }
	@[ -n "$(ERL_ROOT)" ] || { \
	    echo "moat: erl not found on PATH: install the Debian packages erlang-nox and erlang-dev" >&2; exit 1; }
	@[ -f "$(EI_INC)/ei.h" ] && [ -f "$(EI_LIB)" ] || { \
	    echo "moat: erl_interface (ei.h, libei.a) not found under $(ERL_ROOT)/lib: install the Debian package erlang-dev" >&2; exit 1; }
	@command -v pkg-config >/dev/null || { \
	    echo "moat: pkg-config not found: install the Debian package pkg-config" >&2; exit 1; }
	@pkg-config --exists libuv || { \
	    echo "moat: libuv not found (pkg-config libuv): install the Debian package libuv1-dev" >&2; exit 1; }

check-test-env:
	@pkg-config --exists cmocka || { \
	    echo "moat: cmocka not found (pkg-config cmocka): install the Debian package libcmocka-dev" >&2; exit 1; }

# Links an empty fuzz target: clang alone is not enough, the fuzzer and
# sanitizer runtimes are a package of their own.
check-fuzz-env:
	@command -v $(firstword $(FUZZ_CC)) >/dev/null || { \
	    echo "moat: '$(FUZZ_CC)' (FUZZ_CC) not found: install the Debian package clang" >&2; exit 1; }
	@mkdir -p $(B)/fuzz; \
	echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; (void)n; return 0; }' | \
	    $(FUZZ_CC) -xc - -fsanitize=fuzzer,$(FUZZ_SANITIZE) -o $(B)/fuzz/probe >$(B)/fuzz/probe.log 2>&1 || { \
	    cat $(B)/fuzz/probe.log >&2; \
	    v=$$($(FUZZ_CC) --version 2>/dev/null | sed -n 's/.*clang version \([0-9][0-9]*\).*/\1/p' | head -n 1); \
	    if [ -n "$$v" ]; then \
	        echo "moat: $(FUZZ_CC) cannot link a fuzz target (-fsanitize=fuzzer,$(FUZZ_SANITIZE)): install the Debian package libclang-rt-$$v-dev" >&2; \
	    else \
	        echo "moat: $(FUZZ_CC) (FUZZ_CC) is not clang, which libFuzzer needs: install the Debian package clang and leave FUZZ_CC unset" >&2; \
	    fi; exit 1; }
	@rm -f $(B)/fuzz/probe $(B)/fuzz/probe.log

# --- Main targets ------------------------------------------------------------

c: check-build-env $(if $(CORE_SRCS),$(B)/plain/libmoat_core.a) $(DEMO_plain) $(NIF_SO) \
    $(if $(CNODE_SRCS),$(CNODE_plain))

deps:
	@[ "$(UNAME_S)" = Linux ] || { echo "moat supports Linux only for now" >&2; exit 1; }
	@command -v dpkg-query >/dev/null || { \
	    echo "make deps needs Debian's dpkg and apt-get; install these yourself: $(DEB_PACKAGES)" >&2; exit 1; }
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
	    [ "$$(dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null)" = "install ok installed" ] \
	        || missing="$$missing $$p"; \
	done; \
	[ -n "$$missing" ] || exit 0; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	echo "deps: installing$$missing"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends $$missing

# The shells load moat from rebar3's build, with the benchmarks' VM flags
# and the C peers, so that moat_bench:compare/1 finds everything; they
# start the pool demo (moat_bench:start_demo/1) and print what to try.
SHELL_ENV = MOAT_BENCH_PEERS="$(CURDIR)/$(BENCH_PEER_DIR)" \
    MOAT_BENCH_CORE="$(CURDIR)/$(B)/plain/bench_core"

shell: bench-peers
	$(REBAR3_RUN) compile
	$(SHELL_ENV) erl $(BENCH_ERL_FLAGS) -pa _build/default/lib/moat/ebin \
	    -eval 'moat_bench:start_demo(erlang)'

iex: bench-peers
	@command -v iex >/dev/null || { \
	    echo "moat: iex not found: install the Debian package elixir" >&2; exit 1; }
	$(REBAR3_RUN) compile
	$(SHELL_ENV) iex --erl "$(BENCH_ERL_FLAGS)" -pa _build/default/lib/moat/ebin \
	    -e ':moat_bench.start_demo(:elixir)'

# EEP-48 doc chunks from the EDoc of the public modules, so that
# `h :moat.async` (iex) and `h(moat, async)` (erl) show it: code:get_doc/1
# finds doc/chunks/<module>.chunk beside the application's ebin.  rebar3's
# compile post_hook runs this and says where that is: Mix's bare compile
# sets REBAR_BARE_COMPILER_OUTPUT_DIR, rebar3 REBAR_DEPS_DIR.
COMMA := ,
SPACE := $(subst ,, )
DOC_APP_DIR := $(or $(REBAR_BARE_COMPILER_OUTPUT_DIR),$(if $(REBAR_DEPS_DIR),$(REBAR_DEPS_DIR)/moat))
DOC_MODULES := src/moat.erl bench/moat_bench.erl
DOC_FILES := $(subst $(SPACE),$(COMMA),$(patsubst %,"%",$(DOC_MODULES)))
DOC_CHUNKS := $(if $(DOC_APP_DIR),$(patsubst %.erl,$(DOC_APP_DIR)/doc/chunks/%.chunk,$(notdir $(DOC_MODULES))))

doc-chunks: $(DOC_CHUNKS)

$(DOC_CHUNKS): $(DOC_MODULES)
	@mkdir -p $(@D)
	$(Q)erl -noshell -eval 'ok = edoc:files([$(DOC_FILES)], [{doclet, edoc_doclet_chunks}, {layout, edoc_layout_chunks}, {dir, "$(abspath $(@D)/..)"}, {preprocess, true}, {todo, false}]), halt().'

clean:
	rm -rf $(B) priv/*.so priv/moat_cnode

# --- Test stages ---------------------------------------------------------------

TEST_STAGES ?= check-core test-c test-c-asan test-c-tsan test-c-valgrind test-fuzz \
    test-erl test-example test-elixir

# Each stage runs in its own make, started after `deps`, so that a fresh
# machine finds the tools that deps has just installed. The stage's build
# steps run with -j$(JOBS); its tests run one at a time.
test: deps
	@stages="$(TEST_STAGES)"; table=""; total=0; rc=0; \
	for s in $$stages; do \
	    echo "== stage $$s"; \
	    t0=$$(date +%s.%N); \
	    if $(MAKE) --no-print-directory -j$(JOBS) ERL_ROOT="$(ERL_ROOT)" "$$s"; \
	    then result=ok; else result=FAILED; rc=1; fi; \
	    t1=$$(date +%s.%N); \
	    d=$$(awk -v a="$$t0" -v b="$$t1" 'BEGIN { printf "%.1f", b - a }'); \
	    total=$$(awk -v a="$$total" -v b="$$d" 'BEGIN { printf "%.1f", a + b }'); \
	    echo "== stage $$s: $$d s ($$result)"; \
	    table="$$table$$(printf '  %-16s %8s s  %s' "$$s" "$$d" "$$result")"$$'\n'; \
	    [ $$rc -eq 0 ] || break; \
	done; \
	echo "== summary"; \
	printf '%s' "$$table"; \
	printf '  %-16s %8s s\n' total "$$total"; \
	exit $$rc

# Idle schedulers that busy-wait take the CPU a pool's threads need when
# there are as few cores as here: the benchmarks run the VM without it,
# moat and its peers alike (doc/nif.md).  Without it, though, every
# round trip wakes a sleeping CPU, which triples a bare port echo here:
# the round trips (group 4) run a second time in a VM with the default
# flags, where REFERENCE.md's baselines were measured (doc/cnode.md).
BENCH_ERL_FLAGS ?= +sbwt none +sbwtdcpu none +sbwtdio none
BENCH_LATENCY_ERL_FLAGS ?=

# The C peers of moat_bench (bench/peers/): a NIF library of dirty CPU
# NIFs, a port program and a bare ei echo C-node, built for the
# benchmarks only, never into priv/.
BENCH_PEER_DIR := $(B)/plain/bench
BENCH_PEERS := $(BENCH_PEER_DIR)/moat_bench_dirty.so $(BENCH_PEER_DIR)/moat_bench_port \
    $(BENCH_PEER_DIR)/moat_bench_ei

$(BENCH_PEER_DIR)/moat_bench_dirty.so: bench/peers/moat_bench_dirty.c Makefile | check-build-env
	@mkdir -p $(@D)
	@$(if $(Q),echo "  LD [bench]  $@")
	$(Q)$(CC) $(CFLAGS) $(MOAT_CFLAGS) $(CFLAGS_plain) -I$(ERL_ROOT)/usr/include $(CPPFLAGS) \
	    -fvisibility=hidden $(LDFLAGS) -shared -o $@ $<

$(BENCH_PEER_DIR)/moat_bench_port: bench/peers/moat_bench_port.c Makefile | check-build-env
	@mkdir -p $(@D)
	@$(if $(Q),echo "  LD [bench]  $@")
	$(Q)$(CC) $(CFLAGS) $(MOAT_CFLAGS) $(CFLAGS_plain) $(CPPFLAGS) $(LDFLAGS) -o $@ $<

$(BENCH_PEER_DIR)/moat_bench_ei: bench/peers/moat_bench_ei.c Makefile | check-build-env
	@mkdir -p $(@D)
	@$(if $(Q),echo "  LD [bench]  $@")
	$(Q)$(CC) $(CFLAGS) $(MOAT_CFLAGS) $(CFLAGS_plain) -I$(EI_INC) $(CPPFLAGS) $(LDFLAGS) \
	    -o $@ $< $(EI_LIB) -lpthread

bench-peers: $(BENCH_PEERS)

bench: deps
	@$(MAKE) --no-print-directory -j$(JOBS) ERL_ROOT="$(ERL_ROOT)" run-bench

# The suite prints a status line while it runs (one line per step when
# the output is not a terminal), then one table, and writes
# bench/results/<date>.csv and .svg. bench_core is built for row 6b.
run-bench: $(BENCH_BINS) $(BENCH_PEERS) $(DEMO_plain)
	@command -v $(REBAR3) >/dev/null || { \
	    echo "moat: rebar3 not found: install the Debian package rebar3" >&2; exit 1; }
	$(REBAR3_RUN) compile
	@echo "== moat_bench (bench/moat_bench.erl), VM flags: $(BENCH_ERL_FLAGS)"
	@[ -t 1 ] || plain=1; \
	MOAT_BENCH_PLAIN=$$plain MOAT_BENCH_RESULTS="$(CURDIR)/bench/results" $(SHELL_ENV) \
	ERL_CRASH_DUMP_BYTES=0 erl $(BENCH_ERL_FLAGS) -noshell \
	    -pa _build/default/lib/moat/ebin \
	    -eval 'moat_bench:main() =:= ok orelse halt(1), halt().'
	@echo "== moat_bench group 4 again, VM flags: $(or $(BENCH_LATENCY_ERL_FLAGS),the defaults)"
	@[ -t 1 ] || plain=1; \
	MOAT_BENCH_PLAIN=$$plain MOAT_BENCH_RESULTS="$(CURDIR)/bench/results" $(SHELL_ENV) \
	MOAT_BENCH_GROUPS=4 MOAT_BENCH_LABEL=vm-defaults \
	ERL_CRASH_DUMP_BYTES=0 erl $(BENCH_LATENCY_ERL_FLAGS) -noshell \
	    -pa _build/default/lib/moat/ebin \
	    -eval 'moat_bench:main() =:= ok orelse halt(1), halt().'

bench-core: deps
	@$(MAKE) --no-print-directory -j$(JOBS) ERL_ROOT="$(ERL_ROOT)" run-bench-core

run-bench-core: $(BENCH_BINS) $(DEMO_plain)
	@[ -n "$(BENCH_BINS)" ] || { echo "bench: no C benchmarks in bench/"; exit 0; }; \
	for b in $(BENCH_BINS); do \
	    echo "== $$b"; \
	    MOAT_DEMO_SO="$(CURDIR)/$(DEMO_SO_plain)" "./$$b" || exit 1; \
	done

check-core: check-build-env $(GUARD_HEADERS)
	@if grep -rsnE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"]([^">]*/)?erl_(nif|driver)[a-z_]*\.h[">]' c_src/core; then \
	    echo "check-core: the lines above include ERTS headers; c_src/core must stay ERTS-free" >&2; exit 1; \
	fi
	@for d in $(patsubst -I%,%,$(filter -I%,$(CORE_CPPFLAGS))); do \
	    if [ "$$d" != "$(GUARD_DIR)" ] && [ -e "$$d/erl_nif.h" ]; then \
	        echo "check-core: the core's include path $$d holds erl_nif.h" >&2; exit 1; \
	    fi; \
	done
	@if echo '#include <erl_nif.h>' | $(CC_plain) $(CFLAGS) $(MOAT_CFLAGS) $(CFLAGS_plain) \
	        $(CORE_CPPFLAGS) -xc -fsyntax-only - >/dev/null 2>&1; then \
	    echo "check-core: #include <erl_nif.h> compiles with the core's flags; it must fail" >&2; exit 1; \
	fi
	@echo "check-core: c_src/core includes no ERTS header, and <erl_nif.h> cannot compile there"
	$(if $(CORE_SRCS),@$(MAKE) --no-print-directory $(B)/plain/libmoat_core.a,@echo "check-core: c_src/core has no sources yet")

# $(1): variant, $(2): environment for the binaries, $(3): the command
# that runs each binary (valgrind, setarch), if any. Every binary runs,
# then the stage fails if any did. A binary still running after
# C_TEST_TIMEOUT seconds is killed and counts as failed (exit 124), so a
# deadlock fails the stage instead of hanging CI.
define run_c_tests
@bins="$(TEST_BINS_$(1))"; \
if [ -z "$$bins" ]; then echo "$@: no test binaries (no test/c/test_*.c yet), nothing to run"; exit 0; fi; \
passed=0; failed=""; \
for t in $$bins; do \
    echo "-- $@: $$t"; \
    if MOAT_DEMO_SO="$(CURDIR)/$(DEMO_SO_$(1))" \
        MOAT_FIXTURES_DIR="$(CURDIR)/$(B)/$(1)/fixtures" \
        MOAT_CNODE="$(CURDIR)/$(CNODE_$(1))" MOAT_CNODE_LIB="$(CURDIR)/$(CNODE_LIB_$(1))" $(2) \
        timeout -k 10 $(C_TEST_TIMEOUT) $(3) "./$$t"; then \
        passed=$$((passed + 1)); \
    else \
        failed="$$failed $$t (exit $$?)"; \
    fi; \
done; \
echo "$@: $$passed of $(words $(TEST_BINS_$(1))) test binaries passed"; \
[ -z "$$failed" ] || { echo "$@: failed:$$failed" >&2; exit 1; }
endef

C_TEST_TIMEOUT ?= 180
ASAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
TSAN_ENV := TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
# The TSan runtimes of gcc 12 and clang 14 expect the address layout of
# older kernels: where the kernel randomizes mmap with more bits (some
# newer kernels set vm.mmap_rnd_bits to 32; 28 is the old default), they
# stop at start with "unexpected memory mapping". Running the binaries
# with ASLR off avoids that wherever setarch is allowed to do so.
TSAN_RUNNER = $(eval TSAN_RUNNER := $(shell setarch "$$(uname -m)" -R true 2>/dev/null && echo setarch "$$(uname -m)" -R))$(TSAN_RUNNER)
VALGRIND_SUPP := $(wildcard test/c/valgrind.supp)
# Fair scheduling: valgrind runs one thread at a time, and by default a
# thread that spins (the demo's spin, a pool worker waiting for work)
# keeps the others from running for long stretches, so that a test
# waiting for two tasks to be running, or a C-node's loop thread waiting
# to read a frame, can starve on a loaded machine.
VALGRIND := valgrind --error-exitcode=99 --leak-check=full \
    --show-leak-kinds=definite,indirect,possible \
    --errors-for-leak-kinds=definite,indirect,possible --track-fds=no -q \
    --fair-sched=yes $(addprefix --suppressions=,$(VALGRIND_SUPP))

# test_cnode runs the C-node it spawns under valgrind too, with the
# C-node's own suppressions.
CNODE_VALGRIND_ENV = MOAT_CNODE_RUNNER="$(VALGRIND) \
    --suppressions=test/c/cnode/valgrind.supp"

test-c: $(TEST_BINS_plain) $(DEMO_plain) $(FIXTURES_plain)
	$(call run_c_tests,plain,)

test-c-asan: $(TEST_BINS_asan) $(DEMO_asan) $(FIXTURES_asan)
	$(call run_c_tests,asan,$(ASAN_ENV))

test-c-tsan: $(TEST_BINS_tsan) $(DEMO_tsan) $(FIXTURES_tsan)
	@echo "$@: running with $(or $(TSAN_RUNNER),ASLR on: setarch -R is not allowed here)"
	$(call run_c_tests,tsan,$(TSAN_ENV),$(TSAN_RUNNER))

test-c-valgrind: $(TEST_BINS_plain) $(DEMO_plain) $(FIXTURES_plain)
	@command -v valgrind >/dev/null || { \
	    echo "moat: valgrind not found: install the Debian package valgrind" >&2; exit 1; }
	$(call run_c_tests,plain,$(CNODE_VALGRIND_ENV),$(VALGRIND))

# Each fuzz target runs for FUZZ_SECONDS on its working corpus (the
# committed seeds copied in first), the targets side by side under -j,
# each logging to $(B)/fuzz/fuzz_*.log. A crash, a sanitizer report, a
# leak, an input running over 10 s, an RSS over 2 GiB or an invariant's
# abort() makes libFuzzer stop with a nonzero status and write the input
# to $(B)/fuzz/artifacts/fuzz_*/; the stage then fails with the log's end
# and the command that replays it (the binary with the file as argument).
FUZZ_SECONDS ?= 15
FUZZ_FLAGS ?=
FUZZ_RUNS := $(addprefix fuzz-run-,$(FUZZ_NAMES))

$(FUZZ_RUNS): fuzz-run-%: $(B)/fuzz/%
	@corpus=$(B)/fuzz/corpus/$*; art=$(B)/fuzz/artifacts/$*; log=$(B)/fuzz/$*.log; \
	mkdir -p "$$corpus" "$$art" || exit 1; \
	if [ -d test/c/fuzz/corpus/$* ]; then cp -R test/c/fuzz/corpus/$*/. "$$corpus"/ || exit 1; fi; \
	echo "-- test-fuzz: $* for $(FUZZ_SECONDS) s (log: $$log)"; \
	if UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    timeout -k 10 $$(( $(FUZZ_SECONDS) + 120 )) ./$(B)/fuzz/$* \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -print_final_stats=1 -artifact_prefix="$$art/" $(FUZZ_FLAGS) \
	    "$$corpus" >"$$log" 2>&1; then \
	    printf '%s\n' "test-fuzz: $*: $$(grep -E '^#[0-9]+[[:space:]]+DONE' "$$log" | tail -n 1)"; \
	else \
	    rc=$$?; tail -n 40 "$$log" >&2; \
	    unit=$$(sed -n 's/.*Test unit written to //p' "$$log" | tail -n 1); \
	    echo "test-fuzz: $* failed (exit $$rc); replay with: ./$(B)/fuzz/$* $${unit:-FILE}" >&2; \
	    exit 1; \
	fi

test-fuzz: $(FUZZ_RUNS)
	@[ -n "$(FUZZ_RUNS)" ] || echo "test-fuzz: no fuzz targets (no test/c/fuzz/fuzz_*.c), nothing to run"

fuzz: deps
	@$(MAKE) --no-print-directory -j$(JOBS) ERL_ROOT="$(ERL_ROOT)" test-fuzz

# rebar3 runs `make c` itself; MAKEFLAGS is dropped so that this make's
# jobserver and variables do not leak into that unrelated make.
REBAR3_RUN = env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL \
    MOAT_DEMO_SO="$(CURDIR)/$(DEMO_SO_plain)" $(REBAR3)

# moat_bench_tests starts the bare ei echo peer.
test-erl: $(BENCH_PEERS)
	@command -v $(REBAR3) >/dev/null || { \
	    echo "moat: rebar3 not found: install the Debian package rebar3" >&2; exit 1; }
	$(REBAR3_RUN) eunit
	$(REBAR3_RUN) ct

# test/elixir is a Mix project that uses moat as a path dependency: Mix
# compiles moat with rebar3 (found through MIX_REBAR3), whose hook runs
# `make c` in this directory, so MAKEFLAGS is dropped here too.
test-elixir:
	@command -v mix >/dev/null || { \
	    echo "moat: mix not found: install the Debian package elixir" >&2; exit 1; }
	@[ -n "$(MIX_REBAR3)" ] || { \
	    echo "moat: rebar3 not found (Mix needs it, through MIX_REBAR3): install the Debian package rebar3" >&2; exit 1; }
	cd test/elixir && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL MIX_ENV=test mix test

.PHONY: test-elixir

# examples/my_tasks (doc/task_library.md) as a project of its own would
# build it: a rebar3 application that takes moat from _checkouts/moat, a
# link to this directory, builds its task library in its own pre_hook and
# runs its EUnit tests. rebar3 runs moat's `make c` hook here through that
# link, so MAKEFLAGS is dropped (REBAR3_RUN).
test-example:
	@command -v $(REBAR3) >/dev/null || { \
	    echo "moat: rebar3 not found: install the Debian package rebar3" >&2; exit 1; }
	cd examples/my_tasks && $(REBAR3_RUN) eunit

.PHONY: test-example

.PHONY: c deps shell iex doc-chunks clean test bench run-bench bench-core run-bench-core \
    bench-peers check-build-env check-test-env \
    check-fuzz-env check-core test-c test-c-asan test-c-tsan test-c-valgrind test-fuzz \
    $(FUZZ_RUNS) fuzz test-erl
.SECONDARY:
.DELETE_ON_ERROR:
