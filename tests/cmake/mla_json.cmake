# SPDX-License-Identifier: Apache-2.0
# Runs tiny_decoder with ARGS (separated by '|') and checks its --json: identical cached and
# uncached tokens, kv_bytes equal to the latent formula and below gqa_kv_bytes.
cmake_minimum_required(VERSION 3.21)

string(REPLACE "|" ";" args "${ARGS}")
execute_process(COMMAND ${PROGRAM} ${args} RESULT_VARIABLE status OUTPUT_VARIABLE out
                ERROR_VARIABLE err)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "exit status ${status}\nstderr: ${err}")
endif()
string(JSON identical GET "${out}" identical_tokens)
string(JSON attention GET "${out}" config attention)
string(JSON kv_bytes GET "${out}" kv_bytes)
string(JSON formula GET "${out}" kv_bytes_formula)
string(JSON gqa GET "${out}" gqa_kv_bytes)
if(NOT identical STREQUAL "ON" OR NOT attention STREQUAL "mla")
  message(FATAL_ERROR "identical_tokens ${identical}, attention ${attention}:\n${out}")
endif()
if(NOT kv_bytes EQUAL formula OR NOT kv_bytes LESS gqa)
  message(FATAL_ERROR "kv_bytes ${kv_bytes}, formula ${formula}, gqa_kv_bytes ${gqa}:\n${out}")
endif()
