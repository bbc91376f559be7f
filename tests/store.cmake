# SPDX-License-Identifier: Apache-2.0
# The tiers of prefix pages: host memory and disk always; Redis when hiredis and a
# redis-server to start are both found (scripts/test.sh installs them).
kvcache_test(test_store test_store.cpp)

find_program(KVCACHE_REDIS_SERVER redis-server)
if(KVCACHE_HAVE_REDIS AND KVCACHE_REDIS_SERVER)
  kvcache_test(test_redis_store test_redis_store.cpp)
  target_link_libraries(test_redis_store PRIVATE kvcache::redis)
  target_compile_definitions(test_redis_store PRIVATE
    KVCACHE_REDIS_SERVER="${KVCACHE_REDIS_SERVER}")
  if(KVCACHE_BUILD_EXAMPLES)
    target_compile_definitions(test_redis_store PRIVATE KVCACHE_SERVE="$<TARGET_FILE:serve>")
    add_dependencies(test_redis_store serve)
  endif()
else()
  message(STATUS "kvcache: the Redis tier's tests need hiredis (libhiredis-dev) and "
                 "redis-server; not built")
endif()
