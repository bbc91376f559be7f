// SPDX-License-Identifier: Apache-2.0
// A consumer of kvcache::redis: the Redis tier compiles and links; with no server on the port
// it answers a miss and counts the error.
#include <kvcache/store/redis_store.hpp>

#include <cstdio>

int main() {
  kvcache::redis_options o = kvcache::redis_options::from_url("redis://127.0.0.1:1");
  o.connect_timeout = std::chrono::milliseconds(100);
  kvcache::redis_store store(o);
  const bool ok = !store.get("kvcache-consumer") && store.counters().errors == 1;
  std::printf("redis tier: %s\n", ok ? "a miss, one error counted" : "unexpected");
  return ok ? 0 : 1;
}
