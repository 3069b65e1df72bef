// numpy's default generator and its float32 normal, from the published algorithms:
//   SeedSequence: NEP 19 and numpy.random.SeedSequence's documented design (after M. O'Neill's
//     seed_seq_fe): the seed as 32-bit words hashed into a pool of 4 words, which generate_state
//     hashes again into as many words as asked;
//   PCG64: M. O'Neill, "PCG: A Family of Simple Fast Space-Efficient Statistically Good Algorithms
//     for Random Number Generation" (2014): a 128-bit LCG with the XSL-RR 64-bit output; numpy
//     seeds it with SeedSequence's generate_state(4, uint64) (state, then increment);
//   the float32 normal: G. Marsaglia and W. W. Tsang, "The Ziggurat Method for Generating Random
//     Variables" (2000), with 256 layers drawn from numpy's 32-bit output.
#include "random.hpp"

#include <array>
#include <cmath>

namespace starflow::native {
namespace {

using u128 = unsigned __int128;

// ---- SeedSequence -------------------------------------------------------------------------------
constexpr uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875;  // hashing the entropy into the pool
constexpr uint32_t kInitB = 0x8b51f9dd, kMultB = 0x58f38ded;  // hashing the pool into the output
constexpr uint32_t kMixMultL = 0xca01f9dd, kMixMultR = 0x4973f715;
constexpr int kPoolSize = 4;

// SeedSequence(seed).generate_state(4, np.uint64) for a seed below 2**64 (no spawn key).
std::array<uint64_t, 4> seed_sequence_state(uint64_t seed) {
  // The integer as little-endian 32-bit words: 0 is one word [0], 2**32 is [0, 1].
  uint32_t entropy[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  int words = seed >> 32 ? 2 : 1;  // never more than the pool holds, so no words are mixed in later

  uint32_t hash_const = kInitA;
  auto hashmix = [&hash_const](uint32_t value) {
    value ^= hash_const;
    hash_const *= kMultA;
    value *= hash_const;
    return value ^ (value >> 16);
  };
  auto mix = [](uint32_t x, uint32_t y) {
    uint32_t result = kMixMultL * x - kMixMultR * y;
    return result ^ (result >> 16);
  };
  std::array<uint32_t, kPoolSize> pool;
  for (int i = 0; i < kPoolSize; ++i) pool[i] = hashmix(i < words ? entropy[i] : 0);
  for (int source = 0; source < kPoolSize; ++source)
    for (int target = 0; target < kPoolSize; ++target)
      if (source != target) pool[target] = mix(pool[target], hashmix(pool[source]));

  std::array<uint32_t, 8> out32;  // generate_state cycles through the pool
  uint32_t hash = kInitB;
  for (int i = 0; i < 8; ++i) {
    uint32_t value = pool[i % kPoolSize] ^ hash;
    hash *= kMultB;
    value *= hash;
    out32[i] = value ^ (value >> 16);
  }
  std::array<uint64_t, 4> out;  // uint64 words are pairs of uint32 words, little-endian
  for (int i = 0; i < 4; ++i) out[i] = out32[2 * i] | static_cast<uint64_t>(out32[2 * i + 1]) << 32;
  return out;
}

// ---- PCG64 and numpy's 32-bit draw ------------------------------------------------------------
class Pcg64 {
 public:
  // numpy.random.PCG64(seed): state and stream from SeedSequence, each word pair (high, low).
  explicit Pcg64(uint64_t seed) {
    std::array<uint64_t, 4> words = seed_sequence_state(seed);
    u128 initial = static_cast<u128>(words[0]) << 64 | words[1];
    u128 stream = static_cast<u128>(words[2]) << 64 | words[3];
    increment_ = stream << 1 | 1;  // the LCG's increment must be odd
    state_ = 0;
    step();
    state_ += initial;
    step();
  }

  uint64_t next64() {  // XSL-RR of the advanced state: high ^ low, rotated right by the top 6 bits
    step();
    auto rotate = static_cast<unsigned>(state_ >> 122);
    auto folded = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
    return (folded >> rotate) | (folded << ((64 - rotate) & 63));
  }

  // numpy's 32-bit draw: the low half of a 64-bit draw, then (held) its high half.
  uint32_t next32() {
    if (holding_) {
      holding_ = false;
      return held_;
    }
    uint64_t value = next64();
    held_ = static_cast<uint32_t>(value >> 32);
    holding_ = true;
    return static_cast<uint32_t>(value);
  }

  float uniform() { return static_cast<float>(next32() >> 8) * (1.0f / 16777216.0f); }  // [0, 1), top 24 bits

 private:
  static constexpr u128 kMultiplier = static_cast<u128>(0x2360ed051fc65da4ull) << 64 | 0x4385df649fccf645ull;
  void step() { state_ = state_ * kMultiplier + increment_; }

  u128 state_, increment_;
  uint32_t held_ = 0;
  bool holding_ = false;
};

// ---- the float32 ziggurat ---------------------------------------------------------------------
// 256 layers of equal area under exp(-x^2/2): the base layer (0, holding the tail past r) and 255
// rectangles, widest (255, of half-width r) to narrowest (1, at the peak). Marsaglia and Tsang's
// constants for 256 layers: r, the base's edge, and v, each layer's area.
constexpr double kR = 3.6541528853610088, kV = 4.92867323399e-3;
constexpr float kRf = static_cast<float>(kR), kInverseRf = static_cast<float>(1.0 / kR);

struct Ziggurat {
  // A 23-bit draw under this is inside the layer's inner box. Rounded to the nearest integer, as
  // numpy's are (truncating gives 1 less in 118 layers: a draw at that value takes a wedge test,
  // consumes one more number, and every later value differs).
  std::array<uint32_t, 256> accept;
  std::array<float, 256> width;      // the layer's half-width per unit of the 23-bit draw
  std::array<float, 256> height;     // exp(-x^2/2) at the layer's outer edge; 1 at the peak
};

// Marsaglia and Tsang's construction: each edge from the one below, x' = f^-1(v / x + f(x)).
Ziggurat build_ziggurat() {
  const double scale = 8388608.0;  // 2^23: the draw's range
  auto density = [](double x) { return std::exp(-0.5 * x * x); };
  Ziggurat z;
  double base = kV / density(kR);  // the base layer's width if it were a rectangle of area v
  z.accept[0] = static_cast<uint32_t>(std::lround(kR / base * scale));
  z.accept[1] = 0;  // the top layer has no inner box: every draw goes to its wedge test
  z.width[0] = static_cast<float>(base / scale);
  z.width[255] = static_cast<float>(kR / scale);
  z.height[0] = 1.0f;
  z.height[255] = static_cast<float>(density(kR));
  double x = kR;
  for (int i = 254; i >= 1; --i) {
    double inner = std::sqrt(-2.0 * std::log(kV / x + density(x)));
    z.accept[i + 1] = static_cast<uint32_t>(std::lround(inner / x * scale));
    x = inner;
    z.width[i] = static_cast<float>(x / scale);
    z.height[i] = static_cast<float>(density(x));
  }
  return z;
}

const Ziggurat& ziggurat() {
  static const Ziggurat table = build_ziggurat();  // built at first use; thread-safe in C++11
  return table;
}

// Generator.standard_normal(dtype=np.float32), one value.
float standard_normal(Pcg64& rng, const Ziggurat& z) {
  for (;;) {
    uint32_t draw = rng.next32();  // bits 0-7: the layer, 8: the sign, 9-31: the position
    unsigned layer = draw & 0xff;
    uint32_t position = draw >> 9;
    float x = static_cast<float>(position) * z.width[layer];
    if ((draw >> 8) & 1) x = -x;
    if (position < z.accept[layer]) return x;
    if (layer == 0) {  // the tail past r (Marsaglia's method), its sign from bit 8 of the position
      for (;;) {
        float xx = -kInverseRf * std::log1p(-rng.uniform());
        float yy = -std::log1p(-rng.uniform());
        if (yy + yy > xx * xx) return ((position >> 8) & 1) ? -(kRf + xx) : kRf + xx;
      }
    }
    // The wedge between this layer's box and the curve. The product is exact in double and
    // rounded once to float, so no compiler fuses it with the add (numpy's x86-64 build does not);
    // the curve in double, as numpy's (a float exp decides otherwise about once in 2e7 values).
    float gap = z.height[layer - 1] - z.height[layer];
    float y = static_cast<float>(static_cast<double>(gap) * rng.uniform()) + z.height[layer];
    if (y < std::exp(-0.5 * x * x)) return x;
  }
}

}  // namespace

Tensor normal_noise(uint64_t seed, const Shape& shape) {
  Tensor noise(DType::f32, shape);
  Pcg64 rng(seed);
  const Ziggurat& z = ziggurat();
  float* out = noise.f32();
  for (std::size_t i = 0, n = noise.size(); i < n; ++i) out[i] = standard_normal(rng, z);
  return noise;
}

}  // namespace starflow::native
