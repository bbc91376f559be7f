// SPDX-License-Identifier: Apache-2.0
// The library's version.
#pragma once

#define KVCACHE_VERSION_MAJOR 0
#define KVCACHE_VERSION_MINOR 1
#define KVCACHE_VERSION_PATCH 0
