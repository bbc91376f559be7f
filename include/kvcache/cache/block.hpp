// SPDX-License-Identifier: Apache-2.0
// Kept for code that includes it by its former name: the blocks and views are in view.hpp.
#pragma once

#include "kvcache/view.hpp"
