// SPDX-License-Identifier: Apache-2.0
// Debug-only assertions for the insides of kernels; API boundaries throw instead.
#pragma once

#ifndef KVCACHE_ASSERT
#ifdef NDEBUG
#define KVCACHE_ASSERT(cond) ((void)0)
#else
#include <cassert>
#define KVCACHE_ASSERT(cond) assert(cond)
#endif
#endif
