# SPDX-License-Identifier: Apache-2.0
# The kv_memory calculator: its logic under GoogleTest, and the program run from the command line.
add_executable(test_kv_memory ${CMAKE_CURRENT_LIST_DIR}/test_kv_memory.cpp)
target_include_directories(test_kv_memory PRIVATE ${PROJECT_SOURCE_DIR}/examples)
target_link_libraries(test_kv_memory PRIVATE kvcache::kvcache kvcache_warnings kvcache_native GTest::gtest_main)
gtest_discover_tests(test_kv_memory DISCOVERY_TIMEOUT 60)

# kv_memory_accepts(<name> <regex> <args>...): the program prints a match of <regex> and no
# error (every error message starts with "kv_memory: ").
function(kv_memory_accepts name regex)
  add_test(NAME kv_memory.${name} COMMAND kv_memory ${ARGN})
  set_tests_properties(kv_memory.${name} PROPERTIES
    PASS_REGULAR_EXPRESSION "${regex}" FAIL_REGULAR_EXPRESSION "kv_memory: " LABELS kv_memory)
endfunction()

# kv_memory_rejects(<name> <regex> <args>...): the program exits non-zero, and its message
# matches <regex>. CTest checks one or the other per test, hence two tests. That the status is
# exactly 2 is checked in test_kv_memory, through kv_memory::run.
function(kv_memory_rejects name regex)
  add_test(NAME kv_memory.rejects.${name} COMMAND kv_memory ${ARGN})
  set_tests_properties(kv_memory.rejects.${name} PROPERTIES WILL_FAIL TRUE LABELS kv_memory)
  add_test(NAME kv_memory.rejects.${name}.message COMMAND kv_memory ${ARGN})
  set_tests_properties(kv_memory.rejects.${name}.message PROPERTIES
    PASS_REGULAR_EXPRESSION "${regex}" LABELS kv_memory)
endfunction()

kv_memory_accepts(help "usage: kv_memory --model NAME" --help)
kv_memory_accepts(list "\\| llama-2-7b +\\| MHA +\\| +32 \\|.*\\| +524288 \\| +294912 \\| +163840 \\|"
  --list)
# Llama-3-70B, 64k tokens, fp16: 2 x 65536 x 80 x 8 x 128 x 2 bytes = 20 GiB exactly.
kv_memory_accepts(llama_3_70b_json "\"total_bytes\": 21474836480"
  --model llama-3-70b --seq-len 65536 --dtype f16 --json)
# A 7B MHA model on a 24 GB card with 14 GB of weights: 1e10 bytes / 512 KiB a token.
kv_memory_accepts(llama_2_7b_fits_batch_1 "19073 tokens per sequence at batch 1"
  --model llama-2-7b --seq-len 4096 --device-mem 24GB --weights 14GB)
kv_memory_accepts(llama_2_7b_fits_batch_100 "190 tokens per sequence at batch 100"
  --model llama-2-7b --seq-len 4096 --batch 100 --device-mem 24GB --weights 14GB)
kv_memory_accepts(llama_2_7b_fits_gib "20480 tokens per sequence at batch 1"
  --model llama-2-7b --seq-len 4096 --device-mem 24GiB --weights 14GiB)
kv_memory_accepts(mistral_window "4096 cached tokens \\(the window of seq-len 32768\\)"
  --model mistral-7b --seq-len 32768)
kv_memory_accepts(deepseek_mla_int4 "per token  21600 bytes"
  --model deepseek-v2 --seq-len 4096 --dtype int4)
kv_memory_accepts(equals_syntax "\"bytes_per_token\": 73728"
  --model=llama-3-8b --seq-len=1 --dtype=int8 --group=32 --json)

kv_memory_rejects(no_arguments "usage: kv_memory")
kv_memory_rejects(unknown_model "--model: unknown model 'llama-4'" --model llama-4 --seq-len 8)
kv_memory_rejects(unknown_flag "unknown flag '--frob'" --model llama-3-8b --seq-len 8 --frob)
kv_memory_rejects(unknown_dtype "--dtype: unknown dtype 'fp8'"
  --model llama-3-8b --seq-len 8 --dtype fp8)
kv_memory_rejects(non_numeric "--seq-len: expected a positive integer, got 'abc'"
  --model llama-3-8b --seq-len abc)
kv_memory_rejects(negative "--batch: expected a positive integer, got '-2'"
  --model llama-3-8b --seq-len 8 --batch -2)
kv_memory_rejects(missing_value "--seq-len is missing its value" --model llama-3-8b --seq-len)
kv_memory_rejects(bad_size "--device-mem: unknown unit 'XB'"
  --model llama-3-8b --seq-len 8 --device-mem 24XB)
kv_memory_rejects(weights_exceed_device "--weights 30GB .* is more than --device-mem 24GB"
  --model llama-3-8b --seq-len 8 --device-mem 24GB --weights 30GB)
# A group need not divide head_dim: 3 value groups (48 + 48 + 32 channels) a token and, for
# keys, 128 scale pairs per 48 tokens: 32 x 8 x (2 x 64 + 3 x 4 + 128 x 4 / 48) bytes.
kv_memory_accepts(group_not_dividing "per token  38571 bytes"
  --model llama-3-8b --seq-len 8 --dtype int4 --group 48)
kv_memory_accepts(list_group_not_dividing
  "\\| llama-2-7b +\\| MHA +\\| +32 \\|.*\\| +524288 \\| +285355 \\| +154283 \\|"
  --list --group 48)
kv_memory_accepts(device_mem_exabytes "7EiB = 8070450532247928832 bytes"
  --model llama-3-8b --seq-len 8 --device-mem 7EiB)

# Values too large are called too large, not malformed.
kv_memory_rejects(device_mem_too_large "--device-mem: the size is too large.*'8EiB'"
  --model llama-3-8b --seq-len 8 --device-mem 8EiB)
kv_memory_rejects(device_mem_too_many_digits "--device-mem: the size is too large"
  --model llama-3-8b --seq-len 8 --device-mem 99999999999999999999)
# --list checks every flag before it prints a line.
kv_memory_rejects(list_with_a_model "--list takes only --group, got --model"
  --list --group 48 --model llama-4)
# latent_dim + rope_dim wraps around 2^64 to 12: "8 bytes per token" before.
kv_memory_rejects(latent_overflow "too large to count.*latent_dim \\+ rope_dim"
  --layers 3 --latent-dim 6148914691236517206 --rope-dim 6148914691236517206 --seq-len 1
  --device-mem 1GB)

# --page-size: a paged cache (vLLM's PagedAttention). Llama-2-7B in f16, 4100 tokens in pages
# of 16: 257 pages of 16 x 524288 bytes, 12 slots of the last unused; 1e10 bytes hold 1192
# pages, 4 sequences of 257.
kv_memory_accepts(paged_page "page       8388608 bytes \\(8 MiB, 8.39 MB\\) = 16 tokens x 524288 bytes"
  --model llama-2-7b --seq-len 4100 --page-size 16)
kv_memory_accepts(paged_pages "pages      257 a sequence = ceil\\(4100 tokens / 16\\), 25700 for batch 100"
  --model llama-2-7b --seq-len 4100 --batch 100 --page-size 16)
kv_memory_accepts(paged_bytes "paged      2155872256 bytes .* = 257 pages x 8388608 bytes, vs 2149580800 contiguous"
  --model llama-2-7b --seq-len 4100 --page-size 16)
kv_memory_accepts(paged_waste "waste      6291456 bytes .* = batch 1 x 12 unused slots in the last page"
  --model llama-2-7b --seq-len 4100 --page-size 16)
kv_memory_accepts(paged_fit "in pages   1192 pages of 16 tokens \\(9999220736 bytes\\) = 19072 tokens\n +batch 4 at seq-len 4100 \\(1028 pages, 257 a sequence\\)"
  --model llama-2-7b --seq-len 4100 --page-size 16 --device-mem 24GB --weights 14GB)
kv_memory_accepts(paged_json "\"pages_per_sequence\": 63,\n  \"total_pages\": 4032,.*\"paged_waste_bytes\": 67108864,.*\"max_pages\": 3814,\n  \"max_paged_tokens\": 61024,\n  \"max_paged_batch\": 60"
  --model llama-3-8b --seq-len 1000 --batch 64 --page-size 16 --device-mem 24GB --weights 16GB --json)
# int8 at group 32 in pages of 64: whole groups of keys.
kv_memory_accepts(paged_int8 "page       4718592 bytes"
  --model llama-3-8b --seq-len 100 --dtype int8 --page-size 64)

kv_memory_rejects(page_size_zero "--page-size: expected a positive integer, got '0'"
  --model llama-3-8b --seq-len 8 --page-size 0)
kv_memory_rejects(page_size_negative "--page-size: expected a positive integer, got '-16'"
  --model llama-3-8b --seq-len 8 --page-size -16)
kv_memory_rejects(page_size_not_a_number "--page-size: expected a positive integer, got 'sixteen'"
  --model llama-3-8b --seq-len 8 --page-size sixteen)
kv_memory_rejects(page_size_missing "--page-size is missing its value"
  --model llama-3-8b --seq-len 8 --page-size)
kv_memory_rejects(page_size_not_whole_groups "--page-size 48 is not a multiple of the group 32"
  --model llama-3-8b --seq-len 8 --dtype int8 --page-size 48)
kv_memory_rejects(page_size_not_whole_groups_of_group "--page-size 96 is not a multiple of --group 64"
  --model llama-3-8b --seq-len 8 --dtype int4 --group 64 --page-size 96)
kv_memory_rejects(page_size_too_large "too large to count.*reduce --batch, --seq-len, --page-size"
  --model llama-3-8b --seq-len 8 --page-size 9223372036854775807)
