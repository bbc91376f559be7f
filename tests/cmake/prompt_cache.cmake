# SPDX-License-Identifier: Apache-2.0
cmake_minimum_required(VERSION 3.21)
# tiny_decoder --save-cache then --load-cache (the prompt's KV cache through a file instead of
# its prefill) picks the same tokens. -DPROGRAM=... -DFILE=... -DARGS=a|b|c (extra flags).
string(REPLACE "|" ";" extra "${ARGS}")
foreach(step IN ITEMS save load)
  execute_process(
    COMMAND ${PROGRAM} --gen 48 --mode cached --json ${extra} --${step}-cache ${FILE}
    RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "--${step}-cache exited ${status}: ${err}")
  endif()
  string(JSON tokens_${step} GET "${out}" modes cached tokens)
  string(JSON how GET "${out}" prompt_cache)
  set(expected saved)
  if(step STREQUAL "load")
    set(expected loaded)
  endif()
  if(NOT how STREQUAL expected)
    message(FATAL_ERROR "--${step}-cache reported prompt_cache '${how}', expected '${expected}'")
  endif()
endforeach()
if(NOT tokens_save STREQUAL tokens_load)
  message(FATAL_ERROR "different tokens:\n  saved:  ${tokens_save}\n  loaded: ${tokens_load}")
endif()
