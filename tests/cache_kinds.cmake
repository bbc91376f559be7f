# SPDX-License-Identifier: Apache-2.0
# Tests of the fixed-capacity and sliding-window caches; include()d from tests/CMakeLists.txt.
foreach(name IN ITEMS test_fixed test_sliding_window)
  add_executable(${name} ${CMAKE_CURRENT_LIST_DIR}/${name}.cpp)
  target_link_libraries(${name} PRIVATE kvcache::kvcache kvcache_warnings kvcache_native GTest::gtest_main)
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60)
endforeach()
