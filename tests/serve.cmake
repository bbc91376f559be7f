# SPDX-License-Identifier: Apache-2.0
# The serve program: small runs on a small model whose tokens must equal generating each
# request alone on a contiguous cache, and bad arguments exiting with status 2 and a message.
# include()d from tests/CMakeLists.txt.

# The parts (packed weights, the batched forward pass, the scheduler): label serve. Their
# names leave `ctest -R serve` to the program's tests, which need only the serve target built.
add_executable(test_batching ${CMAKE_CURRENT_LIST_DIR}/test_batching.cpp)
target_include_directories(test_batching PRIVATE ${PROJECT_SOURCE_DIR}/examples)
target_link_libraries(test_batching PRIVATE kvcache::kvcache kvcache_warnings kvcache_native
                      GTest::gtest_main)
gtest_discover_tests(test_batching DISCOVERY_TIMEOUT 60 PROPERTIES LABELS serve)

set(serve_model --dim 64 --hidden 128 --heads 4 --kv-heads 2 --layers 2 --vocab 128)

# serve_checks(<name> <checks> <args>...): serve <args> --json exits 0 and its output passes
# <checks> (see cmake/serve_json.cmake).
function(serve_checks name checks)
  list(JOIN ARGN "|" args)
  add_test(NAME serve.${name}
    COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:serve> "-DARGS=${args}" "-DCHECKS=${checks}"
      -P ${CMAKE_CURRENT_LIST_DIR}/cmake/serve_json.cmake)
  set_tests_properties(serve.${name} PROPERTIES LABELS serve)
endfunction()

# serve_exits(<name> <status> <regex> <args>...): serve exits with <status> and its standard
# error matches <regex>.
function(serve_exits name status regex)
  list(JOIN ARGN "|" args)
  add_test(NAME serve.${name}
    COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:serve> "-DARGS=${args}"
      -DSTATUS=${status} "-DSTDERR=${regex}" -P ${CMAKE_CURRENT_LIST_DIR}/cmake/expect_exit.cmake)
  set_tests_properties(serve.${name} PROPERTIES LABELS serve)
endfunction()

# Requests sharing a prompt: later ones adopt its pages from the prefix cache.
serve_checks(prefix_hits "identical_tokens=true,prefix_hit_rate>0.5,preemptions=0,requests=6"
  ${serve_model} --requests 6 --max-batch 3 --shared-prompt-len 32 --suffix-len 5 --gen 10
  --page-size 8 --chunk 64)
# A prefill budget larger than every prompt together: the requests after the first wait a step
# for its prompt pages instead of computing them again.
serve_checks(prefix_wait "identical_tokens=true,prefix_waits>0,prefix_hit_rate>0.5"
  ${serve_model} --requests 4 --max-batch 4 --shared-prompt-len 32 --suffix-len 4 --gen 6
  --page-size 8 --chunk 1000)
# Pages of 4 tokens, a pool of 10 for 5 requests of 35 tokens (9 pages each alone), two at a
# time, and chunks of 7 prompt tokens (not a multiple of the page): the pool runs out while
# requests decode, the newest is preempted and recomputed from its prompt and the tokens it had.
serve_checks(preemption "identical_tokens=true,preemptions>0,prefix_hit_rate>0,pages=10"
  ${serve_model} --requests 5 --max-batch 2 --shared-prompt-len 20 --suffix-len 4 --gen 12
  --page-size 4 --chunk 7 --pages 10)
# The same with two attention threads and one request at a time.
serve_checks(one_at_a_time "identical_tokens=true,max_running=1,prefix_hit_rate>0"
  ${serve_model} --requests 3 --max-batch 1 --shared-prompt-len 16 --suffix-len 3 --gen 6
  --page-size 4 --threads 2)
# Nothing shared: no prefix hits; more batch slots than requests.
serve_checks(no_shared_prompt "identical_tokens=true,prefix_hit_rate=0,max_running=4"
  ${serve_model} --requests 4 --max-batch 8 --shared-prompt-len 0 --suffix-len 9 --gen 5
  --page-size 4)

serve_exits(requests_zero 2 "--requests must be >= 1, got 0" --requests 0)
serve_exits(max_batch_not_a_number 2 "--max-batch needs a whole number, got 'many'"
  --max-batch many)
serve_exits(chunk_zero 2 "--chunk must be >= 1, got 0" --chunk 0)
serve_exits(page_size_zero 2 "--page-size must be >= 1, got 0" --page-size 0)
serve_exits(pages_below_one_request 2 "--pages 3 cannot hold one request: 264 prompt tokens"
  --pages 3)
serve_exits(gen_overflows 2 "--gen 9223372036854775807 need more positions"
  --gen 9223372036854775807)
serve_exits(too_many_tokens 2 "--requests 16 of 100000008 prompt tokens \\+ --gen 64 each make more"
  --shared-prompt-len 100000000)
serve_exits(no_prompt 2 "--shared-prompt-len 0 with --suffix-len 0"
  --shared-prompt-len 0 --suffix-len 0)
serve_exits(shared_prompt_needs_tokenizer 2 "--shared-prompt needs --tokenizer"
  --shared-prompt "Once upon a time")
serve_exits(kv_heads_not_dividing_heads 2 "--heads 8 is not a multiple of --kv-heads 3"
  --kv-heads 3)
serve_exits(unknown_option 2 "unknown option '--batch'" --batch 4)
serve_exits(missing_value 2 "--gen needs a value" --gen)

# A prompt shared between processes through a dir: store, and the faults (corrupted pages, no
# budget): see cmake/serve_store.cmake. The Redis tier's run is in test_redis_store.
add_test(NAME serve.store_dir
  COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:serve>
    "-DARGS=--dim|64|--hidden|128|--heads|4|--kv-heads|2|--layers|2|--vocab|128|--requests|3|--max-batch|3|--shared-prompt-len|48|--suffix-len|5|--gen|8|--page-size|8|--chunk|64"
    -DHITS=6 -DDIR=${CMAKE_CURRENT_BINARY_DIR}/serve_store_dir
    -P ${CMAKE_CURRENT_LIST_DIR}/cmake/serve_store.cmake)
set_tests_properties(serve.store_dir PROPERTIES LABELS serve)
serve_exits(store_bad 2 "--store needs redis://HOST:PORT or dir:PATH, got 'ftp://x'"
  --store ftp://x)
serve_exits(store_empty_dir 2 "--store needs redis://HOST:PORT or dir:PATH, got 'dir:'" --store dir:)
serve_exits(store_file 2 "--store: disk_store: cannot use the directory"
  --store dir:${CMAKE_CURRENT_LIST_DIR}/serve.cmake ${serve_model} --requests 1 --gen 1
  --shared-prompt-len 8)
if(KVCACHE_HAVE_REDIS)
  serve_exits(store_bad_port 2 "the port of \"redis://h:0\" must be 1..65535" --store redis://h:0)
endif()
