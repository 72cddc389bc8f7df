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

// Working memory of one thread, reused across words and across encode()
// calls, so its caches stay warm from one document to the next. It belongs to
// one Bpe at a time (`owner`, a Bpe's unique instance number): a Bpe that
// finds another owner's state clears it before use.
struct BpeScratch {
  uint64_t owner = 0;
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
  // Direct-mapped cache of merge lookups: in CJK text a whole clause is one
  // word and the same character pairs recur within and across documents, so
  // most lookups stay in this small table instead of missing in the large
  // merge table (a miss there was a third of the time on Chinese text).
  struct PairHit {
    uint64_t key;
    uint32_t rank;
    TokenId id;
  };
  std::vector<PairHit> pair_cache;
  // Results of whole words (HF's BPE cache): repeated words, most words of
  // English text and common phrases of Chinese text, skip both the vocab
  // lookup and the merge loop. Open addressing over `slots`; keys and ids
  // live in the two arenas; when half full it is cleared and refilled, which
  // keeps the frequent words and bounds memory.
  struct WordSlot {
    uint32_t tag;  // high bits of the hash
    uint32_t key_off, ids_off;
    uint16_t key_len, ids_len;  // key_len 0: empty (words are never empty)
  };
  std::vector<WordSlot> word_slots;
  std::string word_keys;
  std::vector<TokenId> word_ids;
  size_t words_cached = 0;
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
    std::optional<TokenId> find(std::string_view key) const { return find(key, hash(key)); }
    std::optional<TokenId> find(std::string_view key, uint64_t h) const;
    static uint64_t hash(std::string_view key) { return std::hash<std::string_view>{}(key); }

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

  void merge_word(std::string_view word, std::vector<TokenId>& out, BpeScratch& s) const;
  // Cached ids of word (hash h), or false.
  bool cached_word(std::string_view word, uint64_t h, std::vector<TokenId>& out, const BpeScratch& s) const;
  void cache_word(std::string_view word, uint64_t h, const TokenId* ids, size_t n, BpeScratch& s) const;
  void push_pair(BpeScratch& s, int32_t left) const;
  // The merge of (a, b) through the scratch cache when it is set up.
  PairMap::Value lookup(BpeScratch& s, TokenId a, TokenId b) const;
  void initial_symbols(std::string_view word, BpeScratch& s) const;
  // Makes s this Bpe's: clears another owner's caches.
  void bind(BpeScratch& s) const;

  BpeOptions opt_;
  Map piece_to_id_;
  Map raw_to_id_;  // byte-level only: vocab entries as raw bytes
  std::vector<std::string> id_to_piece_;
  std::vector<bool> has_id_;
  std::array<TokenId, 256> byte_id_;  // byte-level: byte -> id; else <0xNN> -> id; -1 if none
  PairMap merges_;
  // Byte-level: the merge of every byte pair. Over long words (CJK runs) most
  // lookups are byte pairs; this keeps them out of the large hash table and
  // its cache misses. Dense index (0 = no merge, else 1 + index into
  // byte_merges_): 128 KiB, as only a few thousand byte pairs merge (4,287 in
  // Llama 3), so it shares the L2 cache with the pair cache and the filter.
  static constexpr uint32_t kNoMerge = ~uint32_t(0);
  static constexpr int kPairCacheBits = 13;  // 8192 entries, 128 KiB: stays in L2
  static constexpr int kWordCacheBits = 14;  // 16384 slots (256 KiB), cleared at half full
  static constexpr size_t kMaxCachedWord = 128;  // bytes; longer words rarely repeat
  uint64_t instance_;                        // unique per Bpe ever made: the owner tag of a scratch
  std::vector<uint16_t> byte_pairs_;
  std::vector<PairMap::Value> byte_merges_;
  PairMap::Value byte_pair(int x, int y) const {
    const uint16_t i = byte_pairs_[size_t(x * 256 + y)];
    return i ? byte_merges_[i - 1u] : PairMap::Value{kNoMerge, -1};
  }
  // Blocked Bloom filter of the merge pairs (3 bits in one 64-bit word per
  // pair). Most pair-cache misses in CJK text are pairs with no merge; the
  // filter answers those from a table that stays in L2 instead of probing the
  // merges table (8 MB for Llama 3) in main memory. False positives (~1%)
  // just take the probe.
  // Sized at 4-8 pairs per word: 2^16 words (512 KiB) for Llama 3's 280k merges.
  std::vector<uint64_t> merge_filter_;
  int filter_shift_ = 64;
  static uint64_t filter_hash(uint64_t k) {  // murmur3's finalizer: independent of the table hashes
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ull;
    return k ^ (k >> 33);
  }
  static uint64_t filter_mask(uint64_t h) {
    return (uint64_t(1) << (h & 63)) | (uint64_t(1) << ((h >> 6) & 63)) | (uint64_t(1) << ((h >> 12) & 63));
  }
  bool may_merge(uint64_t k) const {
    const uint64_t h = filter_hash(k);
    const uint64_t m = filter_mask(h);
    return (merge_filter_[size_t(h >> filter_shift_)] & m) == m;
  }
};

}  // namespace qlora::tok
