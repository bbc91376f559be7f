// SPDX-License-Identifier: Apache-2.0
// Operations on one sequence of a paged cache: rollback to nothing, context shift against the
// contiguous cache's, and saving and loading a sequence.
#include "common.hpp"

#include <algorithm>
#include <vector>

namespace {

using namespace kvcache;
using namespace kvcache::test;

const cache_shape model(2, 8, 2, 16);  // 2 layers, GQA 8/2, head_dim 16
const attention_shape heads = model.heads();

// The keys and values of a sequence: token i of layer l is row i of rows(l, ...).
row_matrix<float> rows(Index l, Index n, unsigned seed) {
  return random_matrix<float>(n, model.kv_width(), seed * 101 + unsigned(l));
}

// ---- rollback ----------------------------------------------------------------------------------

TEST(PagedCrop, ASequenceRolledBackToNothingAppendsAgain) {
  paged_kv_cache<plain_format<float>> paged(model, {4, 8});
  const Index seq = paged.create();
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(seq, l, rows(l, 10, 1), rows(l, 10, 2));
  paged.rollback(seq, 10);
  EXPECT_TRUE(paged.block_table(seq).empty());
  EXPECT_EQ(paged.stats().used, 0);
  for (Index l = 0; l < model.n_layers(); ++l) paged.append(seq, l, rows(l, 6, 3), rows(l, 6, 4));
  EXPECT_EQ(paged.page_positions(seq), (std::vector<Index>{0, 4}));
  for (Index l = 0; l < model.n_layers(); ++l) {
    EXPECT_EQ(paged.keys(seq, l), rows(l, 6, 3));
    EXPECT_EQ(paged.values(seq, l), rows(l, 6, 4));
  }
}

}  // namespace
