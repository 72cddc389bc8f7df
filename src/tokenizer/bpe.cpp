#include "tokenizer/bpe.h"

#include <algorithm>
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
    const uint64_t h = std::hash<std::string_view>{}(key);
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

std::optional<TokenId> Bpe::Map::find(std::string_view key) const {
  if (slots_.empty()) return std::nullopt;
  const uint64_t h = std::hash<std::string_view>{}(key);
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
  byte_id_.fill(-1);
  TokenId max_id = -1;
  for (const auto& [p, id] : vocab) {
    // Ids index dense tables; refuse absurd ones instead of allocating for them.
    if (id < 0 || id >= (1 << 26)) fail(file, ": vocab entry '", p, "' has an invalid id ", id);
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
  std::string joined;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const auto ia = piece_to_id_.find(a), ib = piece_to_id_.find(b);
    joined = a + b;
    const auto ij = piece_to_id_.find(joined);
    if (!ia || !ib || !ij) fail(file, ": merge #", rank, " '", a, " ", b, "' uses a token missing from the vocab");
    merges_.put(*ia, *ib, {uint32_t(rank), *ij});
  }
  if (opt_.byte_level) {
    byte_pairs_.assign(256 * 256, {kNoMerge, -1});
    for (int x = 0; x < 256; ++x)
      for (int y = 0; y < 256; ++y)
        if (byte_id_[size_t(x)] >= 0 && byte_id_[size_t(y)] >= 0)
          if (const auto* v = merges_.get(byte_id_[size_t(x)], byte_id_[size_t(y)])) byte_pairs_[size_t(x * 256 + y)] = *v;
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
    // hand-made file) is dropped rather than guessed.
    for (char c : word)
      if (const TokenId id = byte_id_[static_cast<uint8_t>(c)]; id >= 0) push(id, static_cast<uint8_t>(c));
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

Bpe::PairMap::Value Bpe::lookup(BpeScratch& s, TokenId a, TokenId b) const {
  if (s.pair_cache.empty()) {
    const auto* v = merges_.get(a, b);
    return v ? *v : PairMap::Value{kNoMerge, -1};
  }
  const uint64_t k = (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
  auto& e = s.pair_cache[size_t((k * 0x9E3779B97F4A7C15ull) >> (64 - kPairCacheBits))];
  if (e.key != k) {
    const auto* v = merges_.get(a, b);
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
      (l.byte >= 0 && rs.byte >= 0) ? byte_pairs_[size_t(l.byte * 256 + rs.byte)] : lookup(s, l.id, r);
  if (m.rank == kNoMerge) return;
  s.heap.push_back({m.rank, left, m.id, l.id, r});
  std::push_heap(s.heap.begin(), s.heap.end(), CandAfter{});
}

void Bpe::encode_word(std::string_view word, std::vector<TokenId>& out, BpeScratch& s) const {
  if (word.empty()) return;
  if (opt_.ignore_merges) {
    const Map& m = opt_.byte_level ? raw_to_id_ : piece_to_id_;
    if (const auto id = m.find(word)) {
      out.push_back(*id);
      return;
    }
  }
  s.syms.clear();
  s.heap.clear();
  initial_symbols(word, s);
  if (s.syms.empty()) return;
  if (s.syms.size() >= kLongWord && s.pair_cache.empty())
    s.pair_cache.assign(size_t(1) << kPairCacheBits, {~uint64_t(0), 0, 0});
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
