// Packing tokenized samples into seq_len rows: document boundaries, positions,
// padding, the over-long policy and the statistics.
#include <gtest/gtest.h>

#include "core/error.h"
#include "data/packing.h"

namespace qlora {
namespace {

// A sample of n tokens with ids base, base+1, ...; label -100 on the first
// `prompt` tokens.
TokenizedSample sample(int n, int prompt, int base) {
  TokenizedSample s;
  for (int i = 0; i < n; ++i) {
    s.input_ids.push_back(base + i);
    s.labels.push_back(i < prompt ? kIgnoreLabel : base + i);
  }
  return s;
}

TEST(DatasetPacking, BestFitKeepsDocumentsWholeWithBoundariesAndPositions) {
  PackOptions o;
  o.seq_len = 8;
  o.pad_id = 0;
  const std::vector<TokenizedSample> in = {sample(5, 1, 100), sample(3, 1, 200), sample(2, 1, 300),
                                           sample(6, 2, 400)};
  const auto r = pack_samples(in, o);
  // Longest first: [6] then [5]; 3 joins the 5 (fills it), 2 joins the 6.
  ASSERT_EQ(r.rows.size(), 2u);
  const auto& a = r.rows[0];
  EXPECT_EQ(a.input_ids, (std::vector<TokenId>{400, 401, 402, 403, 404, 405, 300, 301}));
  EXPECT_EQ(a.labels, (std::vector<int32_t>{-100, -100, 402, 403, 404, 405, -100, 301}));
  EXPECT_EQ(a.position_ids, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 0, 1}));
  EXPECT_EQ(a.doc_offsets, (std::vector<int32_t>{0, 6, 8}));
  const auto& b = r.rows[1];
  EXPECT_EQ(b.input_ids, (std::vector<TokenId>{100, 101, 102, 103, 104, 200, 201, 202}));
  EXPECT_EQ(b.doc_offsets, (std::vector<int32_t>{0, 5, 8}));
  EXPECT_EQ(r.stats.tokens, 16);
  EXPECT_EQ(r.stats.padding, 0);
  EXPECT_EQ(r.stats.trained_tokens, 16 - 5);
  EXPECT_DOUBLE_EQ(r.stats.efficiency(), 1.0);
}

TEST(DatasetPacking, PaddingModeAndOverLongPolicies) {
  PackOptions o;
  o.seq_len = 4;
  o.packing = false;
  o.pad_id = 7;
  const std::vector<TokenizedSample> in = {sample(2, 1, 10), sample(6, 1, 20), sample(6, 5, 30), sample(3, 3, 40)};
  auto r = pack_samples(in, o);
  // 6-token samples are cut to 4; the third then has no trained token left,
  // the fourth never had one.
  ASSERT_EQ(r.rows.size(), 2u);
  EXPECT_EQ(r.rows[0].input_ids, (std::vector<TokenId>{10, 11, 7, 7}));
  EXPECT_EQ(r.rows[0].labels, (std::vector<int32_t>{-100, 11, -100, -100}));
  EXPECT_EQ(r.rows[0].position_ids, (std::vector<int32_t>{0, 1, 0, 0}));
  EXPECT_EQ(r.rows[0].doc_offsets, (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(r.rows[1].input_ids, (std::vector<TokenId>{20, 21, 22, 23}));
  EXPECT_EQ(r.stats.truncated, 2u);
  EXPECT_EQ(r.stats.dropped_untrained, 2u);
  EXPECT_EQ(r.stats.padding, 2);
  EXPECT_DOUBLE_EQ(r.stats.efficiency(), 6.0 / 8.0);

  o.over_long = OverLong::drop;
  r = pack_samples(in, o);
  EXPECT_EQ(r.rows.size(), 1u);
  EXPECT_EQ(r.stats.dropped_too_long, 2u);
  EXPECT_EQ(r.stats.truncated, 0u);
}

TEST(DatasetPacking, RefusesADatasetWithNothingTrained) {
  PackOptions o;
  o.seq_len = 16;
  try {
    pack_samples({sample(4, 4, 1), sample(3, 3, 1)}, o);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no sample has a trained token (2 samples: 2 with every token masked"),
              std::string::npos)
        << e.what();
  }
  o.seq_len = 1;
  EXPECT_THROW(pack_samples({sample(4, 1, 1)}, o), Error);
}

}  // namespace
}  // namespace qlora
