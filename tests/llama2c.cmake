# SPDX-License-Identifier: Apache-2.0
# The llama2.c checkpoint and tokenizer test; include()d from tests/CMakeLists.txt.
add_executable(test_llama2c ${CMAKE_CURRENT_LIST_DIR}/test_llama2c.cpp)
target_include_directories(test_llama2c PRIVATE ${PROJECT_SOURCE_DIR}/examples)
target_link_libraries(test_llama2c PRIVATE kvcache::kvcache kvcache_warnings kvcache_native GTest::gtest_main)
gtest_discover_tests(test_llama2c DISCOVERY_TIMEOUT 60)
