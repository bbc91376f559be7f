// SPDX-License-Identifier: Apache-2.0
// The paged layout: how many pages of how many tokens a paged cache's pool holds, and the
// sliding window (with sinks) its sequences keep.
#pragma once

#include "kvcache/detail/checked.hpp"
#include "kvcache/detail/error.hpp"
#include "kvcache/types.hpp"
#include "kvcache/view.hpp"

#include <stdexcept>

namespace kvcache {

/// Where a paged_kv_cache puts tokens: in `n_pages` pages of `page_size` tokens (every layer
/// and kv head), shared by all sequences (vLLM's PagedAttention). With `window` > 0 every
/// sequence attends over a sliding window of that many tokens plus its first `sinks` tokens
/// (StreamingLLM), and a page that falls wholly out of the window, holding no sink, goes back
/// to the pool at the sequence's next append.
struct paged_layout {
  Index page_size = 16;
  Index n_pages = 0;
  Index window = 0;
  Index sinks = 0;

  // Not inlined: built by GCC 12 at -O3 -march=native (AVX-512), a layout {a, a} made inline
  // (as an aggregate or by an inline constructor) was seen with window = sinks = a in the test
  // programs, while the same code alone was right.
  [[gnu::noinline]] paged_layout(Index page_size_ = 16, Index n_pages_ = 0, Index window_ = 0,
                         Index sinks_ = 0) noexcept
      : page_size(page_size_), n_pages(n_pages_), window(window_), sinks(sinks_) {}

  static constexpr const char* name = "paged";

  /// Throws std::invalid_argument unless page_size >= 1, n_pages >= 1, window >= 0 and
  /// 0 <= sinks < window (sinks == 0 without a window).
  void check() const {
    if (page_size < 1) {
      detail::fail<std::invalid_argument>("paged_layout: page_size must be >= 1, got ", page_size);
    }
    if (n_pages < 1) {
      detail::fail<std::invalid_argument>("paged_layout: n_pages must be >= 1, got ", n_pages);
    }
    if (window < 0) {
      detail::fail<std::invalid_argument>("paged_layout: window must be >= 0 (0: none), got ",
                                          window);
    }
    if (sinks < 0 || (sinks > 0 && sinks >= window)) {
      detail::fail<std::invalid_argument>("paged_layout: sinks = ", sinks, " must be in [0, ",
                                          "window = ", window, ") (no sinks without a window)");
    }
  }

  /// This layout, once check() has passed.
  paged_layout checked() const {
    check();
    return *this;
  }

  /// The mask every sequence's view is read through.
  attention_mask mask() const noexcept {
    attention_mask m;
    m.window = window;
    m.sinks = sinks;
    return m;
  }

  friend bool operator==(const paged_layout& a, const paged_layout& b) noexcept {
    return a.page_size == b.page_size && a.n_pages == b.n_pages && a.window == b.window &&
           a.sinks == b.sinks;
  }
};

}  // namespace kvcache
