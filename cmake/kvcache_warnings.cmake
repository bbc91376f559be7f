# SPDX-License-Identifier: Apache-2.0
# Warning flags for kvcache's own targets (tests, benchmarks, examples), never for consumers.
option(KVCACHE_WERROR "Treat warnings in kvcache's own targets as errors" OFF)

add_library(kvcache_warnings INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(kvcache_warnings INTERFACE -Wall -Wextra -Wpedantic
    $<$<BOOL:${KVCACHE_WERROR}>:-Werror>)
elseif(MSVC)
  target_compile_options(kvcache_warnings INTERFACE /W4 $<$<BOOL:${KVCACHE_WERROR}>:/WX>)
endif()

# -march=native for our own programs: the release preset turns it on, so its tests exercise the
# widest SIMD paths (AVX-512, F16C) while the dev and asan builds exercise the baseline ones.
# Off by default so binaries stay portable.
option(KVCACHE_NATIVE "Compile kvcache's benchmarks and examples for this machine's CPU" OFF)
# Or for a named target instead: the avx2 preset sets x86-64-v3 (AVX2, FMA, F16C, no AVX-512),
# so the AVX2 paths are built and tested on a machine that has AVX-512 too.
set(KVCACHE_MARCH "" CACHE STRING "-march for kvcache's own programs (overrides KVCACHE_NATIVE)")
add_library(kvcache_native INTERFACE)
if(KVCACHE_MARCH STREQUAL "" AND KVCACHE_NATIVE)
  set(_kvcache_march native)
else()
  set(_kvcache_march "${KVCACHE_MARCH}")
endif()
if(NOT _kvcache_march STREQUAL "" AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(kvcache_native INTERFACE -march=${_kvcache_march})
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # GCC 12 flags its own AVX-512 intrinsics (_mm512_undefined_ps, inlined into Eigen's
    # packing code) as uninitialized: a false positive outside our code. The dev and asan
    # builds, which are not native, keep both warnings on for our code.
    target_compile_options(kvcache_native INTERFACE -Wno-uninitialized -Wno-maybe-uninitialized)
  endif()
endif()
