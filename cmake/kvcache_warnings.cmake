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
add_library(kvcache_native INTERFACE)
if(KVCACHE_NATIVE AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(kvcache_native INTERFACE -march=native)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # GCC 12 flags its own AVX-512 intrinsics (_mm512_undefined_ps, inlined into Eigen's
    # packing code) as uninitialized: a false positive outside our code. The dev and asan
    # builds, which are not native, keep both warnings on for our code.
    target_compile_options(kvcache_native INTERFACE -Wno-uninitialized -Wno-maybe-uninitialized)
  endif()
endif()
