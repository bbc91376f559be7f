# SPDX-License-Identifier: Apache-2.0
# The tiny_decoder program run from the command line with bad arguments: each must exit with
# status 2 and a message naming what is wrong. include()d from tests/CMakeLists.txt.

# tiny_decoder_exits(<name> <status> <regex> <args>...): the program exits with <status> and
# its standard error matches <regex>.
function(tiny_decoder_exits name status regex)
  list(JOIN ARGN "|" args)
  add_test(NAME tiny_decoder.${name}
    COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:tiny_decoder> "-DARGS=${args}"
      -DSTATUS=${status} "-DSTDERR=${regex}" -P ${CMAKE_CURRENT_LIST_DIR}/cmake/expect_exit.cmake)
  set_tests_properties(tiny_decoder.${name} PROPERTIES LABELS tiny_decoder)
endfunction()

# prompt + --gen wrapped around and was then blamed on seq_len.
tiny_decoder_exits(gen_overflows 2 "--gen 9223372036854775807 with a prompt of 16 tokens"
  --gen 9223372036854775807)
tiny_decoder_exits(gen_out_of_range 2 "--gen 99999999999999999999 is out of range"
  --gen 99999999999999999999)
# A denormal temperature is a number; what a float cannot hold is refused as such.
tiny_decoder_exits(temperature_denormal 0 "" --temperature 1e-45 --gen 2 --mode cached)
tiny_decoder_exits(temperature_below_float 2 "--temperature 1e-50 is closer to 0 than"
  --temperature 1e-50)
tiny_decoder_exits(temperature_infinite 2 "--temperature must be a finite number" --temperature inf)
tiny_decoder_exits(temperature_not_a_number 2 "--temperature needs a number, got 'warm'"
  --temperature warm)
# Shape errors exited with 1, other bad flags with 2.
tiny_decoder_exits(heads_not_dividing_dim 2 "--dim 256 must be --heads 3 times an even head_dim"
  --heads 3 --kv-heads 2)
tiny_decoder_exits(kv_heads_not_dividing_heads 2 "--heads 8 is not a multiple of --kv-heads 3"
  --kv-heads 3)
tiny_decoder_exits(vocab_overflows 2 "--vocab 4611686018427387904.*more bytes than a 64-bit"
  --vocab 4611686018427387904)
tiny_decoder_exits(threads_above_cap 2 "--threads must be <= 1024, got 100000000"
  --threads 100000000)
tiny_decoder_exits(window_too_large 2 "capacity.*overflows"
  --window 4611686018427387904 --gen 2 --mode cached)
# A directory was read as a file of 2^63 - 1 bytes.
tiny_decoder_exits(tokenizer_directory 2 "tokenizer: '.*': is a directory"
  --tokenizer ${CMAKE_CURRENT_LIST_DIR})
tiny_decoder_exits(checkpoint_directory 2 "load_checkpoint: '.*': is a directory"
  --checkpoint ${CMAKE_CURRENT_LIST_DIR})
# The residual reached the cache, which crashed.
tiny_decoder_exits(residual_too_large 2 "--residual 4611686018427387904 is more than the sequence"
  --residual 4611686018427387904 --kv-type int8 --group 16)
tiny_decoder_exits(group_out_of_range 2 "--group must be <= 33554431"
  --group 4611686018427387904 --kv-type int8)

# The prompt's cache saved to a file, then loaded instead of the prefill: the same tokens, for
# a contiguous f32 cache and a ring of int4 groups with sinks.
foreach(kind IN ITEMS f32 int4_window)
  set(extra "")
  if(kind STREQUAL "int4_window")
    set(extra "--kv-type|int4|--window|12|--sinks|2|--group|4")
  endif()
  add_test(NAME tiny_decoder.prompt_cache_${kind}
    COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:tiny_decoder>
      -DFILE=${CMAKE_CURRENT_BINARY_DIR}/prompt_cache_${kind}.kv "-DARGS=${extra}"
      -P ${CMAKE_CURRENT_LIST_DIR}/cmake/prompt_cache.cmake)
  set_tests_properties(tiny_decoder.prompt_cache_${kind} PROPERTIES LABELS tiny_decoder)
endforeach()
set_tests_properties(tiny_decoder.prompt_cache_f32 PROPERTIES FIXTURES_SETUP prompt_cache_file)
# A file saved from another kind of cache is a bad argument, named.
tiny_decoder_exits(prompt_cache_other_kind 2 "format is \"f32\" in the file, \"int8\" in this cache"
  --gen 4 --mode cached --kv-type int8 --load-cache ${CMAKE_CURRENT_BINARY_DIR}/prompt_cache_f32.kv)
set_tests_properties(tiny_decoder.prompt_cache_other_kind PROPERTIES FIXTURES_REQUIRED prompt_cache_file)
tiny_decoder_exits(prompt_cache_both 2 "--save-cache and --load-cache exclude each other"
  --save-cache a.kv --load-cache b.kv)

# Token-level interface: token ids in, each step's logits out.
tiny_decoder_exits(prompt_tokens_empty_item 2 "--prompt-tokens needs comma-separated token ids, got '1,,2'"
  --prompt-tokens 1,,2)
tiny_decoder_exits(prompt_tokens_not_a_number 2 "--prompt-tokens needs a whole number, got 'x'"
  --prompt-tokens 1,x)
tiny_decoder_exits(prompt_tokens_past_vocab 2 "token 512 is not below the vocabulary size 512"
  --prompt-tokens 1,512)
tiny_decoder_exits(prompt_and_prompt_tokens 2 "--prompt and --prompt-tokens exclude each other"
  --prompt hi --tokenizer t.bin --prompt-tokens 1)
add_test(NAME tiny_decoder.logits_out
  COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:tiny_decoder>
    -DFILE=${CMAKE_CURRENT_BINARY_DIR}/logits_out.bin "-DARGS=--prompt-tokens|5,6,7|--gen|6"
    -DROWS=6 -DVOCAB=512 -P ${CMAKE_CURRENT_LIST_DIR}/cmake/logits_out.cmake)
set_tests_properties(tiny_decoder.logits_out PROPERTIES LABELS tiny_decoder)

# --eval over the committed model's held-out text.
set(brown ${PROJECT_SOURCE_DIR}/examples/tiny_decoder/brown)
tiny_decoder_exits(eval_needs_tokenizer 2 "--eval needs --tokenizer" --eval ${brown}/heldout.txt)
tiny_decoder_exits(eval_tokens_out_needs_eval 2 "--eval-tokens-out needs --eval"
  --eval-tokens-out x.csv)
tiny_decoder_exits(eval_excludes_save_cache 2 "--eval excludes --save-cache"
  --eval x.txt --tokenizer t.bin --save-cache c.kv)
tiny_decoder_exits(eval_missing_file 2 "--eval .*/missing.txt: cannot open it"
  --checkpoint ${brown}/model.bin --tokenizer ${brown}/tokenizer.bin --eval ${brown}/missing.txt)
tiny_decoder_exits(eval_directory 2 "--eval .*: is a directory"
  --checkpoint ${brown}/model.bin --tokenizer ${brown}/tokenizer.bin --eval ${brown})
# A short text through an int4 window cache: the report's keys, and KL above 0.
file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/eval_short.txt
  "The jury said it did find that many of the city's voters had been confused by the new law.\n")
add_test(NAME tiny_decoder.eval_json
  COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:tiny_decoder> -DSTATUS=0 -DSTDERR=
    "-DARGS=--checkpoint|${brown}/model.bin|--tokenizer|${brown}/tokenizer.bin|--eval-json|${CMAKE_CURRENT_BINARY_DIR}/eval_short.txt|--kv-type|int4|--group|8|--window|8|--sinks|2"
    "-DSTDOUT=\"tokens\":[0-9]+,\"perplexity\":[0-9.]+,\"bits_per_byte\":[0-9.]+,\"mean_kl_vs_f32\":[0-9.]*[1-9][0-9.e-]*,\"kv_bytes\":[1-9]"
    -P ${CMAKE_CURRENT_LIST_DIR}/cmake/expect_exit.cmake)
set_tests_properties(tiny_decoder.eval_json PROPERTIES LABELS tiny_decoder)
# Multi-head latent attention: cached and uncached pick the same tokens (the program exits 1
# otherwise with an f32 cache), and --json reports the latent cache beside the GQA model of the
# same size.
add_test(NAME tiny_decoder.mla_json
  COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:tiny_decoder>
    "-DARGS=--attention|mla|--kv-lora-rank|32|--rope-dim|8|--layers|2|--gen|24|--json"
    -P ${CMAKE_CURRENT_LIST_DIR}/cmake/mla_json.cmake)
set_tests_properties(tiny_decoder.mla_json PROPERTIES LABELS tiny_decoder)
tiny_decoder_exits(mla_window 0 "" --attention mla --window 16 --sinks 2 --gen 24 --mode compare)
tiny_decoder_exits(attention_unknown 2 "--attention must be gqa or mla, got 'mha'" --attention mha)
tiny_decoder_exits(mla_rope_odd 2 "--rope-dim must be even, got 7" --attention mla --rope-dim 7)
tiny_decoder_exits(mla_checkpoint 2 "--attention mla runs random weights"
  --attention mla --checkpoint model.bin)
tiny_decoder_exits(mla_eval 2 "--attention mla excludes --eval" --attention mla --eval x.txt --tokenizer t.bin)
