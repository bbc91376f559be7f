// SPDX-License-Identifier: Apache-2.0
// Builds the messages of the exceptions thrown at the API boundary.
#pragma once

#include <sstream>
#include <string>

namespace kvcache::detail {

/// Concatenates the arguments with operator<< into one message string.
template <class... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// Throws `Error` with the concatenated message, e.g.
/// `fail<std::invalid_argument>("append: k has ", 96, " columns, expected ", 128)`.
template <class Error, class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  throw Error(message(parts...));
}

}  // namespace kvcache::detail
