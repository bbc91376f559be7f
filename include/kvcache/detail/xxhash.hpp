// SPDX-License-Identifier: Apache-2.0
// xxHash (libxxhash-dev), compiled into each translation unit as static functions.
#pragma once

// Nothing to link, and a consumer's own #include <xxhash.h>, before or after this one, still
// works.
#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#include <xxhash.h>
#undef XXH_INLINE_ALL
#else
#include <xxhash.h>
#endif
