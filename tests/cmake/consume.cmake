# SPDX-License-Identifier: Apache-2.0
# Builds and runs the consumer project in tests/cmake/consumer, getting kvcache by METHOD:
# find_package (after installing to a prefix of its own), add_subdirectory or fetch_content.
cmake_minimum_required(VERSION 3.21)

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    list(JOIN ARGV " " cmd)
    message(FATAL_ERROR "failed (${rc}): ${cmd}")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(consumer_args -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
    -DKVCACHE_METHOD=${METHOD} -DKVCACHE_SOURCE_DIR=${SOURCE_DIR})

if(METHOD STREQUAL "find_package")
  set(prefix ${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/kvcache -G ${GENERATOR}
      -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DKVCACHE_BUILD_TESTS=OFF
      -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=OFF -DKVCACHE_INSTALL=ON
      -DCMAKE_INSTALL_PREFIX=${prefix})
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/kvcache)
  list(APPEND consumer_args -DCMAKE_PREFIX_PATH=${prefix})
endif()

run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR}/consumer -B ${WORK_DIR}/consumer ${consumer_args})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer)
run(${WORK_DIR}/consumer/consumer)
run(${WORK_DIR}/consumer/consumer_state_file)
if(EXISTS ${WORK_DIR}/consumer/consumer_redis)
  run(${WORK_DIR}/consumer/consumer_redis)
endif()
