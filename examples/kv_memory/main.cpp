// SPDX-License-Identifier: Apache-2.0
// kv_memory: prints what a model's KV cache costs and what fits in a device (see --help).
#include "calculator.hpp"

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  return kv_memory::run(args, std::cout, std::cerr);
}
