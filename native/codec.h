// Codec kernels for fastckpt.codec: byte grouping of float elements, and a
// Huffman-only encoder that writes standard zstd frames (RFC 8878), so that any
// zstd decoder, the Python fallback's included, reads what it writes. Pure C++ on
// raw pointers: no Python, no PyTorch, no allocation beyond std::vector.
//
// Why a Huffman-only encoder: the exponent bytes of trained weights are close to
// independent draws from a skewed distribution. zstd's match finder spends most of
// its time there finding short matches that pay less than the Huffman literals it
// codes anyway; coding literals alone reaches the same size in a fraction of the time.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <queue>
#include <utility>
#include <vector>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fastckpt's codec kernels assume a little-endian host, as the on-disk format does"
#endif

namespace fastckpt_codec {

// ---- byte grouping (docs/CODEC.md, "Byte grouping") ----------------------------------

template <typename U>
void split_typed(const uint8_t* src, size_t n, uint8_t* dst) {
  constexpr int kBits = 8 * sizeof(U);
  for (size_t i = 0; i < n; ++i) {
    U x;
    std::memcpy(&x, src + i * sizeof(U), sizeof(U));
    U r = static_cast<U>((x << 1) | (x >> (kBits - 1)));
    for (size_t j = 0; j < sizeof(U); ++j) dst[j * n + i] = static_cast<uint8_t>(r >> (8 * j));
  }
}

template <typename U>
void merge_typed(const uint8_t* const* groups, size_t n, uint8_t* dst) {
  constexpr int kBits = 8 * sizeof(U);
  for (size_t i = 0; i < n; ++i) {
    U r = 0;
    for (size_t j = 0; j < sizeof(U); ++j) r |= static_cast<U>(static_cast<U>(groups[j][i]) << (8 * j));
    U x = static_cast<U>((r >> 1) | (r << (kBits - 1)));
    std::memcpy(dst + i * sizeof(U), &x, sizeof(U));
  }
}

// Rotates each of the n elements of `itemsize` bytes left by one bit and stores byte j
// of every element in group j: dst[j * n + i]. itemsize is 2, 4 or 8.
inline void split_groups(const uint8_t* src, size_t n, int itemsize, uint8_t* dst) {
  if (itemsize == 2) split_typed<uint16_t>(src, n, dst);
  if (itemsize == 4) split_typed<uint32_t>(src, n, dst);
  if (itemsize == 8) split_typed<uint64_t>(src, n, dst);
}

// Inverse of split_groups; groups[j] holds the n bytes of group j.
inline void merge_groups(const uint8_t* const* groups, size_t n, int itemsize, uint8_t* dst) {
  if (itemsize == 2) merge_typed<uint16_t>(groups, n, dst);
  if (itemsize == 4) merge_typed<uint32_t>(groups, n, dst);
  if (itemsize == 8) merge_typed<uint64_t>(groups, n, dst);
}

// ---- XXH64, for the zstd frame's content checksum -----------------------------------

constexpr uint64_t kP1 = 11400714785074694791ULL, kP2 = 14029467366897019727ULL,
                   kP3 = 1609587929392839161ULL, kP4 = 9650029242287828579ULL,
                   kP5 = 2870177450012600261ULL;

inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t xxh_round(uint64_t acc, uint64_t in) { return rotl64(acc + in * kP2, 31) * kP1; }
inline uint64_t xxh_merge(uint64_t h, uint64_t v) { return (h ^ xxh_round(0, v)) * kP1 + kP4; }

inline uint64_t xxh64(const uint8_t* p, size_t len) {
  const uint8_t* end = p + len;
  uint64_t h;
  if (len >= 32) {
    uint64_t v1 = kP1 + kP2, v2 = kP2, v3 = 0, v4 = 0 - kP1;
    for (; p + 32 <= end; p += 32) {
      v1 = xxh_round(v1, load64(p));
      v2 = xxh_round(v2, load64(p + 8));
      v3 = xxh_round(v3, load64(p + 16));
      v4 = xxh_round(v4, load64(p + 24));
    }
    h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
    h = xxh_merge(xxh_merge(xxh_merge(xxh_merge(h, v1), v2), v3), v4);
  } else {
    h = kP5;
  }
  h += len;
  for (; p + 8 <= end; p += 8) h = rotl64(h ^ xxh_round(0, load64(p)), 27) * kP1 + kP4;
  if (p + 4 <= end) {
    h = rotl64(h ^ (static_cast<uint64_t>(load32(p)) * kP1), 23) * kP2 + kP3;
    p += 4;
  }
  for (; p < end; ++p) h = rotl64(h ^ (*p * kP5), 11) * kP1;
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  return h ^ (h >> 32);
}

// ---- Huffman code ------------------------------------------------------------------

// zstd's limit on a Huffman code length.
constexpr int kMaxCodeBits = 11;
// zstd's direct weight representation describes symbols 0..127 explicitly, plus one
// implied last symbol; larger alphabets need FSE-coded weights, which this encoder
// does not write (the caller then uses zstd itself).
constexpr int kMaxSymbol = 128;
constexpr size_t kBlockMax = size_t{128} << 10;

// Code lengths for the counts (symbols with a zero count get none) from a Huffman
// tree. Where the tree is deeper than kMaxCodeBits, every count is halved (none to
// zero) and the tree rebuilt: that lifts the rare symbols' tail at a small cost to
// the ratio, and ends at the latest when all counts are 1 (8 bits for 256 symbols).
inline void code_lengths(const uint64_t* counts, int nsym, uint8_t* bits) {
  std::vector<uint64_t> c(counts, counts + nsym);
  for (;;) {
    using Node = std::pair<uint64_t, int>;
    std::priority_queue<Node, std::vector<Node>, std::greater<Node>> heap;
    std::vector<int> parent;
    for (int s = 0; s < nsym; ++s) {
      if (c[s]) {
        heap.push({c[s], static_cast<int>(parent.size())});
        parent.push_back(-1);
      }
    }
    while (heap.size() > 1) {
      Node a = heap.top();
      heap.pop();
      Node b = heap.top();
      heap.pop();
      int id = static_cast<int>(parent.size());
      parent.push_back(-1);
      parent[a.second] = parent[b.second] = id;
      heap.push({a.first + b.first, id});
    }
    // Internal nodes are created after their children, so one backward pass
    // gives every node's depth.
    std::vector<int> depth(parent.size(), 0);
    for (size_t i = parent.size() - 1; i-- > 0;) depth[i] = depth[parent[i]] + 1;
    int longest = 0, leaf = 0;
    for (int s = 0; s < nsym; ++s) {
      bits[s] = c[s] ? static_cast<uint8_t>(depth[leaf++]) : 0;
      longest = std::max<int>(longest, bits[s]);
    }
    if (longest <= kMaxCodeBits) return;
    for (auto& v : c) v = v ? std::max<uint64_t>(1, v >> 1) : 0;
  }
}

// Little-endian bit writer: bits go in from the low end, whole bytes come out.
struct BitWriter {
  uint8_t* out = nullptr;
  uint64_t acc = 0;
  int n = 0;
  void put(uint64_t value, int nbits) {
    acc |= value << n;
    n += nbits;
  }
  // Needs 8 writable bytes at `out`; leaves fewer than 8 bits pending.
  void flush() {
    std::memcpy(out, &acc, 8);
    int bytes = n >> 3;
    out += bytes;
    acc >>= 8 * bytes;
    n &= 7;
  }
};

// Codes of symbol pairs: entry (lo | hi << 8) holds the codes of hi then lo (the
// order a backwards stream writes them) as one value, with its bit length above bit
// 24. One lookup and one write then move two symbols. Only pairs of symbols below
// nsym are filled; the table is the thread's own and reused, since faulting in a
// fresh 256 KiB for every frame costs a sizeable part of the coding.
inline const uint32_t* pair_table(const uint32_t* table, int nsym) {
  thread_local std::vector<uint32_t> entry(size_t{1} << 16);
  for (int lo = 0; lo < nsym; ++lo) {
    for (int hi = 0; hi < nsym; ++hi) {
      uint32_t a = table[hi], b = table[lo], abits = a >> 16;
      entry[lo | hi << 8] = (a & 0xFFFF) | (b & 0xFFFF) << abits | (abits + (b >> 16)) << 24;
    }
  }
  return entry.data();
}

// Huffman streams as zstd reads them (backwards): a stream's symbols are written last
// to first, then a single 1 bit marks its end.
struct StreamWriter {
  const uint8_t* src;
  size_t left;  // symbols still to write: src[0, left)
  BitWriter w;
  void put_one(const uint32_t* table) {
    uint32_t a = table[src[--left]];
    w.put(a & 0xFFFF, static_cast<int>(a >> 16));
  }
  // Two pairs (at most 44 bits) fit beside the 7 bits a flush may leave.
  void put_four(const uint32_t* pairs) {
    uint16_t hi, lo;
    std::memcpy(&hi, src + left - 2, 2);
    std::memcpy(&lo, src + left - 4, 2);
    left -= 4;
    uint32_t a = pairs[hi], b = pairs[lo], abits = a >> 24;
    // Joined before the write: the writer's own shift chain then has one step, not two.
    w.put((a & 0xFFFFFF) | static_cast<uint64_t>(b & 0xFFFFFF) << abits,
          static_cast<int>(abits + (b >> 24)));
    w.flush();
  }
  // Writes singles until `left` is `target`, flushing often enough for 11-bit codes.
  void put_down_to(size_t target, const uint32_t* table) {
    for (int k = 1; left > target; ++k) {
      put_one(table);
      if (k % 4 == 0) w.flush();
    }
    w.flush();
  }
  size_t finish(uint8_t* begin) {
    w.put(1, 1);
    w.flush();
    return static_cast<size_t>(w.out - begin) + (w.n ? 1 : 0);
  }
};

// Worst-case bytes of a stream of n symbols, with the writer's 8 bytes of slack.
inline size_t stream_cap(size_t n) { return n * kMaxCodeBits / 8 + 16; }

// Codes two streams side by side: two independent bit writers keep the core busy
// where one would wait on its own shifts. Stream a goes to `out`, b right after it;
// b is coded at a worst-case distance and moved down. Returns the end of both.
inline uint8_t* encode_two(const uint8_t* a, size_t na, const uint8_t* b, size_t nb,
                           const uint32_t* table, const uint32_t* pairs, uint8_t* out,
                           size_t sizes[2]) {
  uint8_t* out_b = out + stream_cap(na);
  StreamWriter x{a, na, BitWriter{out}}, y{b, nb, BitWriter{out_b}};
  size_t common = std::min(na, nb) / 4 * 4;
  x.put_down_to(common, table);
  y.put_down_to(common, table);
  while (x.left) {
    x.put_four(pairs);
    y.put_four(pairs);
  }
  sizes[0] = x.finish(out);
  sizes[1] = y.finish(out_b);
  std::memmove(out + sizes[0], out_b, sizes[1]);
  return out + sizes[0] + sizes[1];
}

inline void put_le(uint8_t*& p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) *p++ = static_cast<uint8_t>(v >> (8 * i));
}

// Room huffman_frame needs for n input bytes: a block is coded (at most 11 bits a
// byte, plus headers, tree and 8 bytes of slack per stream) before it is known
// whether it shrinks.
inline size_t huffman_frame_bound(size_t n) {
  size_t blocks = n / kBlockMax + 1;
  return 32 + n + n / 2 + blocks * 256;
}

// A block's four streams hold at most ceil(kBlockMax / 4) 11-bit codes each, so the
// jump table's 16-bit stream sizes always suffice.
static_assert((kBlockMax / 4) * kMaxCodeBits / 8 + 8 < 65536, "jump table overflow");

// Below this the four-stream layout's fixed costs outweigh any gain.
constexpr size_t kMinFrameInput = 1024;

// counts[s] = occurrences of byte s in src[0, n), n < 2^32. Four tables: repeated
// bytes do not wait on each other's increments.
inline void count_bytes(const uint8_t* src, size_t n, uint64_t counts[256]) {
  uint32_t hist[4][256] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v = load64(src + i);
    ++hist[0][v & 0xFF];
    ++hist[1][(v >> 8) & 0xFF];
    ++hist[2][(v >> 16) & 0xFF];
    ++hist[3][(v >> 24) & 0xFF];
    ++hist[0][(v >> 32) & 0xFF];
    ++hist[1][(v >> 40) & 0xFF];
    ++hist[2][(v >> 48) & 0xFF];
    ++hist[3][v >> 56];
  }
  for (; i < n; ++i) ++hist[0][src[i]];
  for (int s = 0; s < 256; ++s)
    counts[s] = uint64_t{hist[0][s]} + hist[1][s] + hist[2][s] + hist[3][s];
}

// One Huffman code, as zstd describes it: weight w = table_log + 1 - bits (0 for an
// absent symbol) and, per symbol, the code value | bit length << 16.
struct HuffmanCode {
  int nsym = 0, table_log = 0;
  uint8_t weight[256] = {};
  uint32_t table[256] = {};

  HuffmanCode(const uint64_t* counts, int n) : nsym(n) {
    uint8_t bits[256] = {};
    code_lengths(counts, nsym, bits);
    table_log = *std::max_element(bits, bits + nsym);
    for (int s = 0; s < nsym; ++s) weight[s] = bits[s] ? table_log + 1 - bits[s] : 0;
    // Canonical codes as zstd's decoder assigns them: by weight from lowest up,
    // symbols in order within a weight, consecutive code values.
    uint32_t next = 0;  // first free entry of the 2^table_log decoding table
    for (int w = 1; w <= table_log; ++w) {
      for (int s = 0; s < nsym; ++s) {
        if (weight[s] == w) {
          table[s] = (next >> (w - 1)) | static_cast<uint32_t>(table_log + 1 - w) << 16;
          next += 1u << (w - 1);
        }
      }
    }
  }

  uint64_t coded_bits(const uint64_t* counts) const {
    uint64_t total = 0;
    for (int s = 0; s < nsym; ++s) total += counts[s] * (table[s] >> 16);
    return total;
  }

  // Direct representation: a header byte, then the 4-bit weights of every symbol
  // but the last, whose weight the decoder derives.
  uint8_t* write_tree(uint8_t* q) const {
    int top = nsym - 1;
    *q++ = static_cast<uint8_t>(127 + top);
    for (int s = 0; s < top; s += 2)
      *q++ = static_cast<uint8_t>(weight[s] << 4 | (s + 1 < top ? weight[s + 1] : 0));
    return q;
  }
};

// A 3-byte block header: last-block flag, block type (0 raw, 2 compressed), size.
inline void put_block_header(uint8_t* p, bool last, unsigned type, size_t size) {
  put_le(p, (last ? 1u : 0u) | type << 1 | size << 3, 3);
}

// Writes one block of len bytes at p: a compressed block of Huffman literals (with
// the tree unless `tree_sent`, which it then sets) and no sequences, or a raw block
// if that would not be smaller. Returns the end of the block.
inline uint8_t* write_block(const uint8_t* blk, size_t len, bool last, const HuffmanCode& code,
                            const uint32_t* pairs, bool& tree_sent, uint8_t* p) {
  uint8_t* lit = p + 3;
  uint8_t* q = tree_sent ? lit + 5 : code.write_tree(lit + 5);  // after the literals header
  uint8_t* jump = q;
  // zstd's split: ceil(len / 4) symbols in each of the first three, the rest last.
  size_t seg = (len + 3) / 4, sizes[4];
  q = encode_two(blk, seg, blk + seg, seg, code.table, pairs, q + 6, sizes);
  q = encode_two(blk + 2 * seg, seg, blk + 3 * seg, len - 3 * seg, code.table, pairs, q,
                 sizes + 2);
  size_t lit_size = static_cast<size_t>(q - (lit + 5));
  if (lit_size + 5 + 1 >= len) {  // not smaller: raw (its tree, if any, is not sent)
    put_block_header(p, last, 0, len);
    std::memcpy(lit, blk, len);
    return lit + len;
  }
  for (int k = 0; k < 3; ++k) {
    jump[2 * k] = static_cast<uint8_t>(sizes[k]);
    jump[2 * k + 1] = static_cast<uint8_t>(sizes[k] >> 8);
  }
  // Literals header: type 2 (with tree) or 3 (reusing it), size format 3 (18-bit
  // regenerated and compressed sizes, four streams).
  uint8_t* h = lit;
  put_le(h, (tree_sent ? 3u : 2u) | 3u << 2 | static_cast<uint64_t>(len) << 4 |
                static_cast<uint64_t>(lit_size) << 22, 5);
  *q++ = 0;  // no sequences
  put_block_header(p, last, 2, static_cast<size_t>(q - lit));
  tree_sent = true;
  return q;
}

// Writes a zstd frame holding `src` as Huffman-coded literal blocks with no
// sequences, with content size and content checksum. Returns its length, or 0 when
// this encoder cannot help: under kMinFrameInput bytes (or 4 GiB and more), fewer
// than two distinct byte values, a byte value above kMaxSymbol, or a result no
// smaller than the input. `out` must hold huffman_frame_bound(n) bytes.
inline size_t huffman_frame(const uint8_t* src, size_t n, uint8_t* out) {
  if (n < kMinFrameInput || n >= (size_t{1} << 32)) return 0;
  uint64_t counts[256];
  count_bytes(src, n, counts);
  int distinct = 0, top = -1;
  for (int s = 0; s < 256; ++s) {
    if (counts[s]) ++distinct, top = s;
  }
  if (distinct < 2 || top > kMaxSymbol) return 0;
  HuffmanCode code(counts, top + 1);
  if (code.coded_bits(counts) / 8 + 64 >= n) return 0;

  uint8_t* p = out;
  put_le(p, 0xFD2FB528u, 4);  // magic
  // Single segment (the window is the content), a content checksum, and the
  // smallest content-size field that holds n.
  int fcs_flag = n < 256 ? 0 : n < 65536 + 256 ? 1 : 2;
  *p++ = static_cast<uint8_t>(fcs_flag << 6 | 1 << 5 | 1 << 2);
  static const int kFcsBytes[3] = {1, 2, 4};
  put_le(p, fcs_flag == 1 ? n - 256 : n, kFcsBytes[fcs_flag]);

  // Balanced blocks, so none is a tiny remainder.
  size_t nblocks = (n + kBlockMax - 1) / kBlockMax;
  size_t per = (n + nblocks - 1) / nblocks;
  const uint32_t* pairs = pair_table(code.table, code.nsym);
  bool tree_sent = false;
  for (size_t b = 0; b < nblocks; ++b)
    p = write_block(src + b * per, std::min(per, n - b * per), b + 1 == nblocks, code, pairs,
                    tree_sent, p);
  put_le(p, xxh64(src, n) & 0xFFFFFFFFu, 4);
  size_t total = static_cast<size_t>(p - out);
  return tree_sent && total < n ? total : 0;
}

}  // namespace fastckpt_codec
