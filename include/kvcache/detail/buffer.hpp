// SPDX-License-Identifier: Apache-2.0
// A move-only, cache-line aligned, uninitialized array: the storage under every cache.
#pragma once

#include "kvcache/types.hpp"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvcache::detail {

inline constexpr std::size_t buffer_alignment = 64;

// Buffers of at least this many bytes are aligned to 2 MiB and, on Linux, offered to the
// kernel as transparent huge pages: attention over a paged cache jumps between pages scattered
// over gigabytes, and with 4 KiB pages each jump would miss the TLB.
inline constexpr std::size_t huge_page_bytes = std::size_t(2) << 20;
inline constexpr std::size_t huge_buffer_bytes = std::size_t(8) << 20;

inline std::size_t alignment_for(std::size_t bytes) noexcept {
  return bytes >= huge_buffer_bytes ? huge_page_bytes : buffer_alignment;
}

template <class T>
class buffer {
  static_assert(std::is_trivially_copyable_v<T>, "buffer holds trivially copyable scalars");

 public:
  buffer() noexcept = default;
  /// Allocates `n` uninitialized elements; throws std::length_error when n is negative or its
  /// bytes exceed the largest object (PTRDIFF_MAX), std::bad_alloc when memory is short.
  explicit buffer(Index n) : size_(n) {
    constexpr auto max_bytes = static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max());
    if (n < 0 || static_cast<std::size_t>(n) > max_bytes / sizeof(T)) {
      throw std::length_error("kvcache: buffer size out of range");
    }
    if (n > 0) {
      const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
      data_ = static_cast<T*>(::operator new(bytes, std::align_val_t{alignment_for(bytes)}));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      // Advice only: where huge pages are off or unavailable the buffer works as it is.
      if (bytes >= huge_buffer_bytes) {
        ::madvise(data_, bytes / huge_page_bytes * huge_page_bytes, MADV_HUGEPAGE);
      }
#endif
    }
  }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  buffer(buffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  buffer& operator=(buffer&& other) noexcept {
    buffer(std::move(other)).swap(*this);
    return *this;
  }
  ~buffer() {
    if (data_ != nullptr) {
      const std::size_t bytes = static_cast<std::size_t>(size_) * sizeof(T);
      ::operator delete(data_, std::align_val_t{alignment_for(bytes)});
    }
  }

  void swap(buffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
  }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  Index size() const noexcept { return size_; }

 private:
  T* data_ = nullptr;
  Index size_ = 0;
};

}  // namespace kvcache::detail
