// SPDX-License-Identifier: Apache-2.0
// xxHash (libxxhash-dev), compiled into each translation unit as static functions.
#pragma once

// Nothing to link, and a consumer's own #include <xxhash.h>, before or after this one, still
// works. Without inline hints (unless the consumer chose them): GCC at -Og refuses xxHash
// 0.8.1's always_inline functions called through pointers ("inlining failed"); as plain
// statics they are inlined as the optimizer sees fit, at every level.
#ifndef XXH_INLINE_ALL
#ifndef XXH_NO_INLINE_HINTS
#define XXH_NO_INLINE_HINTS 1
#define KVCACHE_XXH_NO_INLINE_HINTS
#endif
#define XXH_INLINE_ALL
#include <xxhash.h>
#undef XXH_INLINE_ALL
#ifdef KVCACHE_XXH_NO_INLINE_HINTS
#undef XXH_NO_INLINE_HINTS
#undef KVCACHE_XXH_NO_INLINE_HINTS
#endif
#else
#include <xxhash.h>
#endif
