# SPDX-License-Identifier: Apache-2.0
# The committed model trained on the Brown corpus; include()d from tests/CMakeLists.txt.
add_executable(test_brown ${CMAKE_CURRENT_LIST_DIR}/test_brown.cpp)
target_include_directories(test_brown PRIVATE ${PROJECT_SOURCE_DIR}/examples)
target_compile_definitions(test_brown PRIVATE
  KVCACHE_BROWN_DIR="${PROJECT_SOURCE_DIR}/examples/tiny_decoder/brown")
target_link_libraries(test_brown PRIVATE kvcache::kvcache kvcache_warnings kvcache_native GTest::gtest_main)
gtest_discover_tests(test_brown DISCOVERY_TIMEOUT 60 PROPERTIES LABELS tiny_decoder)
