# SPDX-License-Identifier: Apache-2.0
cmake_minimum_required(VERSION 3.21)
# Two serve processes sharing a prompt through a dir: store, then the faults. Runs PROGRAM with
# ARGS (separated by '|') --json --store dir:DIR:
#   1. into an empty DIR: it writes the shared prompt's pages;
#   2. again: it restores HITS pages from DIR (its prefill_tokens_skipped above the first's), and
#      gives the first run's tokens;
#   3. with every page file corrupted (a byte flipped in each): it refuses them (store_rejected),
#      restores none, and gives the same tokens;
#   4. with --store-budget-mb 0 into an empty DIR: it stores nothing and gives the same tokens.
string(REPLACE "|" ";" args "${ARGS}")

function(serve_run out_var)
  execute_process(COMMAND ${PROGRAM} ${args} --json --store dir:${DIR} ${ARGN}
                  RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "exit status ${status}, expected 0\nstderr: ${err}\nstdout: ${out}")
  endif()
  set(${out_var} "${out}" PARENT_SCOPE)
  set(${out_var}_err "${err}" PARENT_SCOPE)
endfunction()
function(expect out key op want)
  string(JSON got GET "${out}" ${key})
  if(op STREQUAL "=" AND NOT got STREQUAL want OR op STREQUAL ">" AND NOT got GREATER want)
    message(FATAL_ERROR "${key} is ${got}, expected ${op} ${want}\n${out}")
  endif()
endfunction()

file(REMOVE_RECURSE ${DIR})
serve_run(one)
expect("${one}" store_hits = 0)
expect("${one}" store_pages_written = ${HITS})
expect("${one}" identical_tokens = ON)
string(JSON tokens GET "${one}" tokens)
string(JSON skipped GET "${one}" prefill_tokens_skipped)

serve_run(two)
expect("${two}" store_hits = ${HITS})
expect("${two}" store_bytes_read > 0)
expect("${two}" prefill_tokens_skipped > ${skipped})
expect("${two}" store_rejected = 0)
string(JSON tokens_two GET "${two}" tokens)
if(NOT tokens_two STREQUAL tokens)
  message(FATAL_ERROR "the second run's tokens differ:\n${tokens}\n${tokens_two}")
endif()

file(GLOB pages ${DIR}/*.kvpage)
list(LENGTH pages n)
if(NOT n EQUAL HITS)
  message(FATAL_ERROR "${n} page files in ${DIR}, expected ${HITS}")
endif()
foreach(page IN LISTS pages)  # change the middle byte of each
  file(SIZE ${page} size)
  math(EXPR mid "${size} / 2")
  file(READ ${page} byte OFFSET ${mid} LIMIT 1 HEX)
  if(byte STREQUAL "01")
    set(new "\\002")
  else()
    set(new "\\001")
  endif()
  execute_process(COMMAND printf "${new}"
                  COMMAND dd of=${page} bs=1 seek=${mid} conv=notrunc status=none
                  RESULT_VARIABLE st)
  file(READ ${page} changed OFFSET ${mid} LIMIT 1 HEX)
  if(NOT st EQUAL 0 OR changed STREQUAL byte)
    message(FATAL_ERROR "could not change a byte of ${page}")
  endif()
endforeach()
serve_run(three)
expect("${three}" store_hits = 0)
expect("${three}" store_rejected = 1)
string(JSON tokens_three GET "${three}" tokens)
if(NOT tokens_three STREQUAL tokens)
  message(FATAL_ERROR "the run over corrupted pages gives other tokens:\n${tokens}\n${tokens_three}")
endif()
if(NOT three_err MATCHES "warning: the store dir:.* returned 1 bad page")
  message(FATAL_ERROR "no warning of the bad page on stderr: ${three_err}")
endif()

file(REMOVE_RECURSE ${DIR})
serve_run(four --store-budget-mb 0)
expect("${four}" store_pages_written = 0)
string(JSON tokens_four GET "${four}" tokens)
if(NOT tokens_four STREQUAL tokens)
  message(FATAL_ERROR "the run with no budget gives other tokens")
endif()
file(REMOVE_RECURSE ${DIR})
