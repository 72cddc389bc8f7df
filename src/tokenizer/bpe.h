// The BPE model of tokenizer.json ("type": "BPE"): vocabulary, merge ranks,
// and the merge loop for one pre-tokenized word.
//
// Two flavours share the loop:
//  - byte-level (GPT-2, Llama 3, Qwen2, SmolLM): the word is raw bytes; each
//    byte starts as the vocab entry of its byte-level code point, and with
//    ignore_merges a word that is itself a vocab entry is emitted directly.
//  - SentencePiece-style (Llama 2, Mistral): the word is normalized UTF-8
//    ("▁the"); each character starts as its vocab entry, or as <0xNN> byte
//    tokens (byte_fallback), or as unk.
// Merging picks the lowest-ranked adjacent pair first (leftmost on ties) with
// a binary heap, as HF tokenizers does, so ids match HF exactly.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace qlora::tok {

struct BpeOptions {
  bool byte_level = false;
  bool byte_fallback = false;
  bool fuse_unk = false;
  bool ignore_merges = false;
  std::optional<TokenId> unk;
};

// Per-call working memory, reused across the words of one encode() call.
struct BpeScratch {
  struct Sym {
    TokenId id;
    int32_t prev, next;
    int32_t byte;  // byte-level: the raw byte while still a single byte, else -1
  };
  struct Cand {
    uint32_t rank;
    int32_t pos;
    TokenId new_id;
    TokenId left, right;  // the pair when queued: an unchanged pair needs no re-lookup
  };
  std::vector<Sym> syms;
  std::vector<Cand> heap;
  // Direct-mapped cache of merge lookups, set up on the first long word of a
  // call: in CJK text a whole clause is one word and the same character pairs
  // recur, so most lookups then stay in this small table instead of missing
  // in the large merge table.
  struct PairHit {
    uint64_t key;
    uint32_t rank;
    TokenId id;
  };
  std::vector<PairHit> pair_cache;
};

class Bpe {
 public:
  // vocab: stored piece -> id. merges in rank order. file: for errors.
  Bpe(const std::vector<std::pair<std::string, TokenId>>& vocab,
      const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions opt, const std::string& file);

  // Appends the ids of one word (raw bytes when byte_level) to out.
  void encode_word(std::string_view word, std::vector<TokenId>& out, BpeScratch& scratch) const;

  std::optional<TokenId> find(std::string_view piece) const;
  // Stored piece of an id, or nullptr if the model has no such id.
  const std::string* piece(TokenId id) const;
  int64_t max_id() const { return static_cast<int64_t>(id_to_piece_.size()) - 1; }
  const BpeOptions& options() const { return opt_; }

 private:
  // Flat open-addressing map from a string to an id: the keys live in one
  // arena and each slot keeps the full hash, so a lookup costs about two
  // cache lines instead of the bucket, node and key of std::unordered_map
  // (the ignore_merges lookup runs once per word).
  class Map {
   public:
    void build(const std::vector<std::pair<std::string, TokenId>>& entries);
    std::optional<TokenId> find(std::string_view key) const;

   private:
    struct Slot {
      uint64_t hash;
      uint32_t off, len;
      TokenId id;  // -1: empty
    };
    std::vector<Slot> slots_;
    std::string arena_;
    size_t mask_ = 0;
  };

  // Open-addressing map from an id pair to (rank, merged id); the merge loop
  // probes it once per candidate pair, so it is kept flat and branch-light.
  class PairMap {
   public:
    struct Value {
      uint32_t rank;
      TokenId id;
    };
    void reserve(size_t n);
    void put(TokenId a, TokenId b, Value v);
    const Value* get(TokenId a, TokenId b) const;

   private:
    static uint64_t key(TokenId a, TokenId b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
    size_t slot(uint64_t k) const { return size_t((k * 0x9E3779B97F4A7C15ull) >> shift_); }
    static constexpr uint64_t kEmpty = ~uint64_t(0);
    // Key and value side by side: one cache line per probe on a table far
    // larger than the caches (Llama 3 has 280k merges).
    struct Slot {
      uint64_t key;
      Value val;
    };
    std::vector<Slot> slots_;
    int shift_ = 64;
    size_t mask_ = 0;
  };

  void push_pair(BpeScratch& s, int32_t left) const;
  // The merge of (a, b) through the scratch cache when it is set up.
  PairMap::Value lookup(BpeScratch& s, TokenId a, TokenId b) const;
  void initial_symbols(std::string_view word, BpeScratch& s) const;

  BpeOptions opt_;
  Map piece_to_id_;
  Map raw_to_id_;  // byte-level only: vocab entries as raw bytes
  std::vector<std::string> id_to_piece_;
  std::vector<bool> has_id_;
  std::array<TokenId, 256> byte_id_;  // byte-level: byte -> id; else <0xNN> -> id; -1 if none
  PairMap merges_;
  // Byte-level: the merge of every byte pair, dense (rank kNoMerge = none).
  // Over long words (CJK runs) most lookups are byte pairs; this keeps them
  // out of the large hash table and its cache misses.
  static constexpr uint32_t kNoMerge = ~uint32_t(0);
  static constexpr size_t kLongWord = 24;     // symbols; shorter words skip the pair cache
  static constexpr int kPairCacheBits = 11;   // 2048 entries, 32 KiB
  std::vector<PairMap::Value> byte_pairs_;
};

}  // namespace qlora::tok
