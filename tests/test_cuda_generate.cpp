// Generation on either backend through TokenGenerator: the reply of
// sample_reply stops at the generator's capacity (CPU, runs everywhere), and
// on the GPU CudaLlamaModel::last_logits tracks the CPU's KV-cache generator,
// CudaTokenGenerator's step-by-step feeding equals one whole pass, and a
// generation between training steps changes nothing. GPU parts skip without one.
//
// Threshold (GPU against CPU logits): the forward chain of test_cuda_model.cpp
// without the backward half: 11 bf16 roundings per layer, the final norm and
// the lm_head product: relative error <= (11 L + 2) x 2^-8.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_testing.h"
#include "data/chat_template.h"
#include "data/tokenize_sample.h"
#include "model/builtin.h"
#include "model/llama_generate.h"
#include "model/weights.h"
#include "test_models.h"
#include "testing.h"
#include "tokenizer/tokenizer.h"
#include "train/sample_text.h"

#if QLORA_HAVE_CUDA
#include "model/llama_cuda.h"
#endif

namespace qlora {
namespace {

// Wraps a generator, recording every feed's length, and caps its capacity.
class RecordingGenerator final : public TokenGenerator {
 public:
  RecordingGenerator(std::unique_ptr<TokenGenerator> inner, int64_t cap, std::vector<int64_t>& feeds)
      : inner_(std::move(inner)), cap_(cap), feeds_(feeds) {}
  void feed(const int32_t* tokens, int64_t T, float* logits) override {
    feeds_.push_back(T);
    inner_->feed(tokens, T, logits);
  }
  int64_t length() const override { return inner_->length(); }
  int64_t capacity() const override { return cap_; }

 private:
  std::unique_ptr<TokenGenerator> inner_;
  int64_t cap_;
  std::vector<int64_t>& feeds_;
};

TEST(SampleReply, StopsAtTheGeneratorsCapacity) {
  const auto dir = resolve_model_path("builtin:tiny");
  const LlamaWeights w = load_llama_weights(dir);
  const auto tok = Tokenizer::load(dir);
  const ChatTemplate tmpl = template_for_tokenizer(*tok, "alpaca");  // plain text, EOS from the tokenizer
  for (const int64_t room : {0, 1, 5}) {
    std::vector<int64_t> feeds;
    int64_t asked = 0;
    const MakeGenerator make = [&](int64_t max_seq) -> std::unique_ptr<TokenGenerator> {
      asked = max_seq;
      // The prompt's length is what the first feed holds; leave `room` more.
      return std::make_unique<RecordingGenerator>(std::make_unique<LlamaGenerator>(w, nullptr, max_seq),
                                                  max_seq - 40 + room, feeds);
    };
    const std::string reply = sample_reply(make, w.cfg, *tok, tmpl, "Hello there", 40);
    ASSERT_GT(asked, 40) << "asked for prompt + 40 tokens";
    const int64_t prompt = asked - 40;
    if (room == 0) {
      EXPECT_TRUE(feeds.empty()) << "no room for a reply: nothing is fed";
      EXPECT_EQ(reply, "");
      continue;
    }
    ASSERT_FALSE(feeds.empty());
    EXPECT_EQ(feeds[0], prompt);
    int64_t total = 0;
    for (int64_t f : feeds) total += f;
    // The last generated token is never fed back, so the sequence stays below capacity.
    EXPECT_LE(total, prompt + room - 1) << "room " << room;
    for (size_t i = 1; i < feeds.size(); ++i) EXPECT_EQ(feeds[i], 1);
  }
}

#if QLORA_HAVE_CUDA

using testing::rel_l2;

std::vector<int32_t> prompt_ids(int64_t T, int64_t V) {
  std::vector<int32_t> ids;
  for (int64_t t = 0; t < T; ++t) ids.push_back(int32_t((t * 29 + 3) % V));
  return ids;
}

TEST(CudaGenerate, LastLogitsTrackTheCpuGenerator) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));
  const ModelConfig& cfg = w.cfg;
  LoraConfig lc;
  lc.rank = 8;
  const LoraWeights lora = testing::random_lora(cfg, lc, 300, 0.05f);
  const double bound = std::ldexp(double(11 * cfg.num_hidden_layers + 2), -8);
  CudaContext ctx;
  CudaLlamaModel gpu(ctx, w, &lora, 2, 40);
  for (const int64_t T : {1, 7, 40}) {
    const std::vector<int32_t> ids = prompt_ids(T, cfg.vocab_size);
    std::vector<float> want(size_t(cfg.vocab_size)), got(want.size(), NAN);
    LlamaGenerator cpu(w, &lora, T);
    cpu.feed(ids.data(), T, want.data());
    gpu.last_logits(ids.data(), T, got.data());
    for (float g : got) ASSERT_TRUE(std::isfinite(g)) << "T " << T;
    EXPECT_LE(rel_l2(want, got), bound) << "T " << T;
  }
}

TEST(CudaGenerate, StepByStepEqualsOnePassAndBadTokensLeaveTheSequence) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));
  const int64_t V = w.cfg.vocab_size;
  CudaContext ctx;
  CudaLlamaModel model(ctx, w, nullptr, 1, 16);
  CudaTokenGenerator gen(model, 12);
  EXPECT_EQ(gen.capacity(), 12);
  EXPECT_THROW(CudaTokenGenerator(model, 17), Error);
  const std::vector<int32_t> ids = prompt_ids(9, V);
  std::vector<float> step(static_cast<size_t>(V)), whole(static_cast<size_t>(V));
  gen.feed(ids.data(), 6, step.data());
  for (int64_t t = 6; t < 9; ++t) gen.feed(&ids[size_t(t)], 1, step.data());
  EXPECT_EQ(gen.length(), 9);
  model.last_logits(ids.data(), 9, whole.data());
  EXPECT_EQ(0, std::memcmp(step.data(), whole.data(), step.size() * sizeof(float)))
      << "the same sequence through the same kernels";

  const int32_t bad = int32_t(V + 5);
  const std::string e = testing::error_of([&] { gen.feed(&bad, 1, step.data()); });
  EXPECT_NE(e.find("token id " + std::to_string(bad)), std::string::npos) << e;
  EXPECT_EQ(gen.length(), 9);
  EXPECT_THROW(gen.feed(ids.data(), 4, step.data()), Error) << "9 + 4 > capacity 12";
}

TEST(CudaGenerate, GeneratingBetweenStepsChangesNothing) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));
  const ModelConfig& cfg = w.cfg;
  LoraConfig lc;
  lc.rank = 4;
  lc.dropout = 0.1;
  const LoraWeights lora = testing::random_lora(cfg, lc, 500, 0.05f);
  const int64_t B = 2, T = 24;
  std::vector<int32_t> tokens = prompt_ids(B * T, cfg.vocab_size), targets(tokens.begin() + 1, tokens.end());
  targets.push_back(1);
  const LlamaBatch batch{tokens.data(), targets.data(), nullptr, B, T};
  auto loss_after = [&](bool generate_first) {
    CudaContext ctx;
    CudaLlamaModel m(ctx, w, &lora, B, T);
    std::vector<float> logits(size_t(cfg.vocab_size));
    if (generate_first) m.last_logits(tokens.data(), 10, logits.data());
    EXPECT_TRUE(m.training());
    EXPECT_EQ(m.forward_count(), 0u);
    const double loss = m.forward(batch);
    m.backward();
    std::vector<float> grads(size_t(m.lora_size()));
    m.download_grads(grads.data());
    return std::make_pair(loss, grads);
  };
  const auto plain = loss_after(false), after = loss_after(true);
  EXPECT_EQ(plain.first, after.first);
  EXPECT_EQ(plain.second, after.second);
}

// `qlora generate --device cuda` end to end: the weights streamed from the
// folder, greedy ids of the requested count.
TEST(CudaGenerate, CliGeneratesOnTheGpu) {
  QLORA_REQUIRE_GPU();
  const testing::CliResult r =
      testing::run_qlora("generate --model builtin:tiny --prompt-ids '1 2 3' --max-new-tokens 5 --ignore-eos "
                         "--device cuda");
  ASSERT_EQ(r.status, 0) << r.output;
  const size_t at = r.output.find("ids:");
  ASSERT_NE(at, std::string::npos) << r.output;
  std::istringstream line(r.output.substr(at + 4, r.output.find('\n', at) - at - 4));
  int n = 0;
  for (int id; line >> id; ++n) EXPECT_GE(id, 0);
  EXPECT_EQ(n, 5) << r.output;
  EXPECT_EQ(r.output.find("warning"), std::string::npos) << r.output;
}

#else

TEST(CudaGenerate, CliGeneratesOnTheGpu) { QLORA_REQUIRE_GPU(); }
TEST(CudaGenerate, LastLogitsTrackTheCpuGenerator) { QLORA_REQUIRE_GPU(); }
TEST(CudaGenerate, StepByStepEqualsOnePassAndBadTokensLeaveTheSequence) { QLORA_REQUIRE_GPU(); }
TEST(CudaGenerate, GeneratingBetweenStepsChangesNothing) { QLORA_REQUIRE_GPU(); }

#endif

}  // namespace
}  // namespace qlora
