// SPDX-License-Identifier: Apache-2.0
// Umbrella header: everything kvcache offers.
#pragma once

#include "kvcache/attention/decode.hpp"
#include "kvcache/attention/kernel.hpp"
#include "kvcache/attention/online_softmax.hpp"
#include "kvcache/attention/prefill.hpp"
#include "kvcache/attention/reference.hpp"
#include "kvcache/cache/block.hpp"
#include "kvcache/cache/contiguous.hpp"
#include "kvcache/cache/fixed.hpp"
#include "kvcache/cache/quantized.hpp"
#include "kvcache/cache/sliding_window.hpp"
#include "kvcache/io/state_file.hpp"
#include "kvcache/memory.hpp"
#include "kvcache/rope.hpp"
#include "kvcache/shape.hpp"
#include "kvcache/thread_pool.hpp"
#include "kvcache/types.hpp"
#include "kvcache/version.hpp"
