# SPDX-License-Identifier: Apache-2.0
# The quantized caches (int8, int4): storage, byte accounting, and attention over their views.
add_executable(test_quantized ${CMAKE_CURRENT_LIST_DIR}/test_quantized.cpp)
target_link_libraries(test_quantized PRIVATE kvcache::kvcache kvcache_warnings kvcache_native GTest::gtest_main)
gtest_discover_tests(test_quantized DISCOVERY_TIMEOUT 60)
