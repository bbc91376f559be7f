// SPDX-License-Identifier: Apache-2.0
// Writes the seed corpus of fuzz_state_file: small valid state files, one per kind of field,
// into the directory given. Run by CTest before the fuzzer, so the seeds follow the format.
#include <kvcache/io/state_file.hpp>

#include <cstdio>
#include <fstream>
#include <functional>
#include <string>

namespace {

namespace io = kvcache::io;

void seed(const std::string& path, const std::function<void(io::state_writer&)>& sections) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  io::state_writer writer(out, path);
  sections(writer);
  writer.finish();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIRECTORY\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  seed(dir + "/empty.kv", [](io::state_writer&) {});
  seed(dir + "/header.kv", [](io::state_writer& w) {
    w.begin_section(io::fourcc("HEAD"));
    w.put_u32(8);
    w.put_string("llama");
    w.put_i64(-1);
    w.put_f64(10000.0);
    w.end_section();
  });
  seed(dir + "/ops.kv", [](io::state_writer& w) {
    // Payloads that read_fields walks as ops: each op byte followed by its field.
    w.begin_section(io::fourcc("OPS1"));
    const unsigned char u32_op = 0, string_op = 4, expect_op = 7, name_op = 8;
    w.put_bytes(&u32_op, 1);
    w.put_u32(1);
    w.put_bytes(&string_op, 1);
    w.put_string("kv");
    w.put_bytes(&expect_op, 1);
    w.put_u32(8);
    w.put_bytes(&name_op, 1);
    w.put_string("llama");
    w.end_section();
    w.begin_section(io::fourcc("OPS2"));
    const unsigned char count_op = 5, floats_op = 36;  // 36: three floats
    const Eigen::half halves[2] = {Eigen::half(1.0f), Eigen::half(-2.0f)};
    const float floats[3] = {0.5f, -1.0f, 3.0f};
    w.put_bytes(&count_op, 1);
    w.put_u64(2);
    w.put_array(halves, 2);
    w.put_bytes(&floats_op, 1);
    w.put_array(floats, 3);
    w.end_section();
  });
  seed(dir + "/layers.kv", [](io::state_writer& w) {
    for (int layer = 0; layer < 3; ++layer) {
      w.begin_section(io::fourcc("LAYR"));
      w.put_u32(static_cast<std::uint32_t>(layer));
      const float keys[4] = {1.0f * layer, 2.0f, -3.0f, 0.25f};
      w.put_array(keys, 4);
      w.end_section();
    }
  });
  return 0;
}
