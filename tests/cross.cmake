# SPDX-License-Identifier: Apache-2.0
# The cross-attention cache: its tests, and with the examples the encoder_decoder program run
# from the command line. Every test's name starts with "cross." (ctest -R cross).
# include()d from tests/CMakeLists.txt.
add_executable(test_cross ${CMAKE_CURRENT_LIST_DIR}/test_cross.cpp)
target_link_libraries(test_cross PRIVATE kvcache::kvcache kvcache_warnings kvcache_native GTest::gtest_main)
gtest_discover_tests(test_cross DISCOVERY_TIMEOUT 60 TEST_PREFIX cross.)

if(NOT KVCACHE_BUILD_EXAMPLES)
  return()
endif()

# A small model, so that the run without any cache is quick under the sanitizers too.
set(encoder_decoder_model --dim 64 --hidden 128 --heads 4 --kv-heads 2 --enc-layers 2
  --dec-layers 2 --vocab 128)

# encoder_decoder_checks(<name> <checks> <args>...): encoder_decoder <args> --json exits 0 and
# its output passes <checks> (see cmake/serve_json.cmake).
function(encoder_decoder_checks name checks)
  list(JOIN ARGN "|" args)
  add_test(NAME cross.encoder_decoder.${name}
    COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:encoder_decoder> "-DARGS=${args}"
      "-DCHECKS=${checks}" -P ${CMAKE_CURRENT_LIST_DIR}/cmake/serve_json.cmake)
  set_tests_properties(cross.encoder_decoder.${name} PROPERTIES LABELS encoder_decoder)
endfunction()

# encoder_decoder_exits(<name> <status> <regex> <args>...): the program exits with <status> and
# its standard error matches <regex>.
function(encoder_decoder_exits name status regex)
  list(JOIN ARGN "|" args)
  add_test(NAME cross.encoder_decoder.${name}
    COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:encoder_decoder> "-DARGS=${args}"
      -DSTATUS=${status} "-DSTDERR=${regex}" -P ${CMAKE_CURRENT_LIST_DIR}/cmake/expect_exit.cmake)
  set_tests_properties(cross.encoder_decoder.${name} PROPERTIES LABELS encoder_decoder)
endfunction()

# Both caches, the self-attention cache alone and no cache pick the same tokens (f32), and each
# cache holds what the formula says: cross, 2 layers x 37 encoder tokens x 2 (K, V) x 2 kv heads
# x 16 x 4 bytes = 18944; self, the 2 prompt tokens and 11 of the 12 generated ones: 6656.
encoder_decoder_checks(identical_f32
  "identical_tokens=true,cross_kv_bytes=18944,cross_kv_bytes_formula=18944,self_kv_bytes=6656,self_kv_bytes_formula=6656,speedup>0,speedup_over_self_cache_only>0"
  ${encoder_decoder_model} --src-len 37 --gen 12)
# Two attention threads, the reverse task, a source of one token and more target tokens than
# source tokens.
encoder_decoder_checks(identical_threads "identical_tokens=true,cross_kv_bytes=512"
  ${encoder_decoder_model} --src-len 1 --gen 9 --threads 2 --task reverse)
# A source longer than a tile of 128 keys.
encoder_decoder_checks(identical_long_source "identical_tokens=true,cross_kv_bytes=153600"
  ${encoder_decoder_model} --src-len 300 --gen 4 --threads 2)
# Other storage runs every mode (its tokens may differ from the uncached f32 run's); bf16
# holds half of f32's bytes.
encoder_decoder_checks(bf16 "cross_kv_bytes=9472,self_kv_bytes=3328"
  ${encoder_decoder_model} --src-len 37 --gen 12 --kv-type bf16)
encoder_decoder_checks(int4 "cross_kv_bytes>0,self_kv_bytes>0"
  ${encoder_decoder_model} --src-len 70 --gen 6 --kv-type int4 --group 16)

encoder_decoder_exits(help 0 "" --help)
encoder_decoder_exits(kv_type_unknown 2 "--kv-type must be f32, f16, bf16, int8 or int4, got 'f8'"
  --kv-type f8)
encoder_decoder_exits(src_len_zero 2 "--src-len must be >= 1, got 0" --src-len 0)
encoder_decoder_exits(heads_not_dividing_dim 2 "--dim 256 must be --heads 3 times an even head_dim"
  --heads 3)
encoder_decoder_exits(kv_heads_not_dividing_heads 2 "--heads 8 is not a multiple of --kv-heads 3"
  --kv-heads 3)
encoder_decoder_exits(unknown_option 2 "unknown option '--batch'" --batch 4)
encoder_decoder_exits(missing_value 2 "--gen needs a value" --gen)
