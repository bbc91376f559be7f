// SPDX-License-Identifier: Apache-2.0
// Consumer smoke test of the state file container: xxHash is found for the consumer too.
#include <kvcache/io/state_file.hpp>

#include <cstdio>
#include <sstream>

int main() {
  namespace io = kvcache::io;
  std::stringstream file;
  io::state_writer writer(file, "consumer.kv");
  writer.begin_section(io::fourcc("HEAD"));
  writer.put_u32(4);
  writer.end_section();
  writer.finish();

  io::state_reader reader(file, "consumer.kv");
  io::section head = reader.expect_section(io::fourcc("HEAD"));
  head.expect_u32("n_kv_heads", 4);
  head.expect_end();
  reader.expect_end();

  std::string corrupt = file.str();
  corrupt[20] ^= 1;
  std::istringstream in(corrupt);
  try {
    io::state_reader bad(in, "corrupt.kv");
    while (bad.next_section()) {
    }
  } catch (const io::format_error&) {
    std::puts("consumer_state_file: ok");
    return 0;
  }
  std::puts("consumer_state_file: a corrupt file was accepted");
  return 1;
}
