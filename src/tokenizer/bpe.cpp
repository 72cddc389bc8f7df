#include "tokenizer/bpe.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "tokenizer/unicode_bytes.h"

namespace qlora::tok {

namespace {

// Min-heap order: lowest rank first, then leftmost position (HF's Merge order).
struct CandAfter {
  bool operator()(const BpeScratch::Cand& a, const BpeScratch::Cand& b) const {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  }
};

}  // namespace

void Bpe::PairMap::reserve(size_t n) {
  size_t cap = 16;
  int bits = 4;
  // Load factor <= 0.75: probes stay short while the table stays small, which
  // matters more here (cache misses dominate the merge loop).
  while (cap * 3 < n * 4) cap <<= 1, ++bits;
  slots_.assign(cap, Slot{kEmpty, Value{0, 0}});
  mask_ = cap - 1;
  shift_ = 64 - bits;
}

void Bpe::PairMap::put(TokenId a, TokenId b, Value v) {
  const uint64_t k = key(a, b);
  for (size_t i = slot(k);; i = (i + 1) & mask_) {
    if (slots_[i].key == kEmpty || slots_[i].key == k) {
      slots_[i] = {k, v};  // a repeated merge keeps the later rank, as HF's HashMap does
      return;
    }
  }
}

const Bpe::PairMap::Value* Bpe::PairMap::get(TokenId a, TokenId b) const {
  if (slots_.empty()) return nullptr;
  const uint64_t k = key(a, b);
  for (size_t i = slot(k);; i = (i + 1) & mask_) {
    if (slots_[i].key == k) return &slots_[i].val;
    if (slots_[i].key == kEmpty) return nullptr;
  }
}

void Bpe::Map::build(const std::vector<std::pair<std::string, TokenId>>& entries) {
  size_t cap = 16;
  while (cap < entries.size() * 2) cap <<= 1;
  slots_.assign(cap, Slot{0, 0, 0, -1});
  mask_ = cap - 1;
  arena_.clear();
  for (const auto& [key, id] : entries) {
    const uint64_t h = hash(key);
    size_t i = size_t(h) & mask_;
    for (; slots_[i].id >= 0; i = (i + 1) & mask_) {
      const Slot& o = slots_[i];
      if (o.hash == h && std::string_view(arena_).substr(o.off, o.len) == key) break;  // duplicate: last wins
    }
    if (slots_[i].id < 0) {
      slots_[i] = {h, uint32_t(arena_.size()), uint32_t(key.size()), id};
      arena_ += key;
    } else {
      slots_[i].id = id;
    }
  }
}

std::optional<TokenId> Bpe::Map::find(std::string_view key, uint64_t h) const {
  if (slots_.empty()) return std::nullopt;
  for (size_t i = size_t(h) & mask_; slots_[i].id >= 0; i = (i + 1) & mask_) {
    const Slot& o = slots_[i];
    if (o.hash == h && o.len == key.size() && std::memcmp(arena_.data() + o.off, key.data(), key.size()) == 0)
      return o.id;
  }
  return std::nullopt;
}

Bpe::Bpe(const std::vector<std::pair<std::string, TokenId>>& vocab,
         const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions opt, const std::string& file)
    : opt_(std::move(opt)) {
  // Never reused, unlike an address: a scratch can't mistake a new Bpe for the
  // one whose caches it holds.
  static std::atomic<uint64_t> next_instance{1};
  instance_ = next_instance.fetch_add(1);
  byte_id_.fill(-1);
  TokenId max_id = -1;
  for (const auto& [p, id] : vocab) {
    // Ids index dense tables; refuse absurd ones instead of allocating for them.
    if (id < 0 || id >= kMaxVocabSize)
      fail(file, ": vocab entry '", p, "' has id ", id, ", outside [0, ", kMaxVocabSize, ")");
    max_id = std::max(max_id, id);
  }
  id_to_piece_.resize(size_t(max_id + 1));
  has_id_.assign(size_t(max_id + 1), false);
  piece_to_id_.build(vocab);
  const auto& table = ByteLevelTable::get();
  std::vector<std::pair<std::string, TokenId>> raw_entries;
  for (const auto& [p, id] : vocab) {
    id_to_piece_[size_t(id)] = p;
    has_id_[size_t(id)] = true;
    if (opt_.byte_level) {
      if (auto raw = table.decode(p)) {
        if (raw->size() == 1) byte_id_[static_cast<uint8_t>((*raw)[0])] = id;
        raw_entries.emplace_back(std::move(*raw), id);
      }
    }
  }
  raw_to_id_.build(raw_entries);
  if (!opt_.byte_level && opt_.byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      if (const auto id = piece_to_id_.find(name)) byte_id_[size_t(b)] = *id;
    }
  }
  merges_.reserve(merges.size());
  int filter_bits = 1;
  while ((size_t(8) << filter_bits) < merges.size()) ++filter_bits;
  merge_filter_.assign(size_t(1) << filter_bits, 0);
  filter_shift_ = 64 - filter_bits;
  std::string joined;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const auto ia = piece_to_id_.find(a), ib = piece_to_id_.find(b);
    joined = a + b;
    const auto ij = piece_to_id_.find(joined);
    if (!ia || !ib || !ij) fail(file, ": merge #", rank, " '", a, " ", b, "' uses a token missing from the vocab");
    merges_.put(*ia, *ib, {uint32_t(rank), *ij});
    const uint64_t h = filter_hash((uint64_t(uint32_t(*ia)) << 32) | uint32_t(*ib));
    merge_filter_[size_t(h >> filter_shift_)] |= filter_mask(h);
  }
  if (opt_.byte_level) {
    byte_pairs_.assign(256 * 256, 0);
    for (int x = 0; x < 256; ++x)
      for (int y = 0; y < 256; ++y)
        if (byte_id_[size_t(x)] >= 0 && byte_id_[size_t(y)] >= 0)
          if (const auto* v = merges_.get(byte_id_[size_t(x)], byte_id_[size_t(y)])) {
            byte_merges_.push_back(*v);
            byte_pairs_[size_t(x * 256 + y)] = uint16_t(byte_merges_.size());
          }
    // A 16-bit index holds 65,535 merges; a vocab merging every byte pair
    // (none known) takes the general lookup instead.
    if (byte_merges_.size() > 0xFFFF) {
      byte_pairs_.clear();
      byte_merges_.clear();
    }
  }
}

std::optional<TokenId> Bpe::find(std::string_view piece) const { return piece_to_id_.find(piece); }

const std::string* Bpe::piece(TokenId id) const {
  if (id < 0 || size_t(id) >= id_to_piece_.size() || !has_id_[size_t(id)]) return nullptr;
  return &id_to_piece_[size_t(id)];
}

void Bpe::initial_symbols(std::string_view word, BpeScratch& s) const {
  auto push = [&](TokenId id, int32_t byte = -1) {
    const auto n = static_cast<int32_t>(s.syms.size());
    s.syms.push_back({id, n - 1, -1, byte});
    if (n > 0) s.syms[size_t(n - 1)].next = n;
  };
  if (opt_.byte_level) {
    // Every byte has an entry in a byte-level vocab; a missing one (a
    // hand-made file) is dropped rather than guessed. Symbols carry their
    // byte only when the dense byte-pair table exists.
    const bool dense = !byte_pairs_.empty();
    for (char c : word)
      if (const TokenId id = byte_id_[static_cast<uint8_t>(c)]; id >= 0) push(id, dense ? static_cast<uint8_t>(c) : -1);
    return;
  }
  bool last_unk = false;
  for (size_t i = 0; i < word.size();) {
    // Invalid UTF-8 cannot be a vocab entry; its bytes go to byte fallback.
    const size_t n = utf8_step(word, i);
    const std::string_view ch = word.substr(i, n);
    i += n;
    if (const auto id = piece_to_id_.find(ch)) {
      push(*id);
      last_unk = false;
      continue;
    }
    if (opt_.byte_fallback) {
      bool all = true;
      for (char c : ch) all = all && byte_id_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        for (char c : ch) push(byte_id_[static_cast<uint8_t>(c)]);
        last_unk = false;
        continue;
      }
    }
    if (!opt_.unk) continue;  // HF drops characters it cannot represent at all
    if (opt_.fuse_unk && last_unk) continue;
    push(*opt_.unk);
    last_unk = true;
  }
}

void Bpe::bind(BpeScratch& s) const {
  if (s.owner == instance_) return;
  s.owner = instance_;
  s.pair_cache.assign(size_t(1) << kPairCacheBits, {~uint64_t(0), 0, 0});
  s.word_slots.assign(size_t(1) << kWordCacheBits, {0, 0, 0, 0, 0});
  s.word_keys.clear();
  s.word_ids.clear();
  s.words_cached = 0;
}

bool Bpe::cached_word(std::string_view word, uint64_t h, std::vector<TokenId>& out, const BpeScratch& s) const {
  const size_t mask = s.word_slots.size() - 1;
  const auto tag = uint32_t(h >> 32);
  for (size_t i = size_t(h) & mask;; i = (i + 1) & mask) {
    const BpeScratch::WordSlot& e = s.word_slots[i];
    if (e.key_len == 0) return false;
    if (e.tag == tag && e.key_len == word.size() &&
        std::memcmp(s.word_keys.data() + e.key_off, word.data(), word.size()) == 0) {
      out.insert(out.end(), s.word_ids.begin() + e.ids_off, s.word_ids.begin() + e.ids_off + e.ids_len);
      return true;
    }
  }
}

void Bpe::cache_word(std::string_view word, uint64_t h, const TokenId* ids, size_t n, BpeScratch& s) const {
  if (word.size() > kMaxCachedWord || n > word.size()) return;
  if (s.words_cached >= s.word_slots.size() / 2) {  // half full: start over
    std::fill(s.word_slots.begin(), s.word_slots.end(), BpeScratch::WordSlot{0, 0, 0, 0, 0});
    s.word_keys.clear();
    s.word_ids.clear();
    s.words_cached = 0;
  }
  const size_t mask = s.word_slots.size() - 1;
  size_t i = size_t(h) & mask;
  while (s.word_slots[i].key_len != 0) i = (i + 1) & mask;
  s.word_slots[i] = {uint32_t(h >> 32), uint32_t(s.word_keys.size()), uint32_t(s.word_ids.size()),
                     uint16_t(word.size()), uint16_t(n)};
  s.word_keys.append(word);
  s.word_ids.insert(s.word_ids.end(), ids, ids + n);
  ++s.words_cached;
}

Bpe::PairMap::Value Bpe::lookup(BpeScratch& s, TokenId a, TokenId b) const {
  const uint64_t k = (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
  auto& e = s.pair_cache[size_t((k * 0x9E3779B97F4A7C15ull) >> (64 - kPairCacheBits))];
  if (e.key != k) {
    const auto* v = may_merge(k) ? merges_.get(a, b) : nullptr;
    e = {k, v ? v->rank : kNoMerge, v ? v->id : -1};
  }
  return {e.rank, e.id};
}

void Bpe::push_pair(BpeScratch& s, int32_t left) const {
  const auto& l = s.syms[size_t(left)];
  if (l.next < 0) return;
  const auto& rs = s.syms[size_t(l.next)];
  const TokenId r = rs.id;
  const PairMap::Value m =
      (l.byte >= 0 && rs.byte >= 0) ? byte_pair(l.byte, rs.byte) : lookup(s, l.id, r);
  if (m.rank == kNoMerge) return;
  s.heap.push_back({m.rank, left, m.id, l.id, r});
  std::push_heap(s.heap.begin(), s.heap.end(), CandAfter{});
}

void Bpe::encode_word(std::string_view word, std::vector<TokenId>& out, BpeScratch& s) const {
  if (word.empty()) return;
  bind(s);
  const uint64_t h = Map::hash(word);
  if (cached_word(word, h, out, s)) return;
  const size_t start = out.size();
  std::optional<TokenId> whole;
  if (opt_.ignore_merges) whole = (opt_.byte_level ? raw_to_id_ : piece_to_id_).find(word, h);
  if (whole)
    out.push_back(*whole);
  else
    merge_word(word, out, s);
  cache_word(word, h, out.data() + start, out.size() - start, s);
}

void Bpe::merge_word(std::string_view word, std::vector<TokenId>& out, BpeScratch& s) const {
  s.syms.clear();
  s.heap.clear();
  initial_symbols(word, s);
  if (s.syms.empty()) return;
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(s.syms.size()); ++i) push_pair(s, i);
  while (!s.heap.empty()) {
    std::pop_heap(s.heap.begin(), s.heap.end(), CandAfter{});
    const BpeScratch::Cand top = s.heap.back();
    s.heap.pop_back();
    auto& left = s.syms[size_t(top.pos)];
    if (left.id < 0 || left.next < 0) continue;  // merged away since it was queued
    auto& right = s.syms[size_t(left.next)];
    // A changed pair is stale unless it merges to the same id: that is HF's
    // test, kept for identical results; the unchanged pair skips the lookup.
    if ((left.id != top.left || right.id != top.right) && lookup(s, left.id, right.id).id != top.new_id) continue;
    left.id = top.new_id;
    left.byte = -1;
    left.next = right.next;
    if (right.next >= 0) s.syms[size_t(right.next)].prev = top.pos;
    right.id = -1;
    if (left.prev >= 0) push_pair(s, left.prev);
    push_pair(s, top.pos);
  }
  for (int32_t i = 0; i >= 0; i = s.syms[size_t(i)].next) out.push_back(s.syms[size_t(i)].id);
}

}  // namespace qlora::tok
