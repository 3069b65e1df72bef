// numpy's default generator and its float32 normal, reproduced from the published algorithms in
// our own structure:
//   SeedSequence: NEP 19 and numpy.random.SeedSequence's documented design (after M. O'Neill's
//     seed_seq_fe): the seed's 32-bit words hashed into a pool of 4 words, each pool word folded
//     into the others, and generate_state reading the pool through a second hash;
//   PCG64: M. O'Neill, "PCG: A Family of Simple Fast Space-Efficient Statistically Good Algorithms
//     for Random Number Generation" (2014): a 128-bit LCG with the XSL-RR 64-bit output; numpy
//     seeds it with SeedSequence's generate_state(4, uint64) (state, then increment);
//   the float32 normal: G. Marsaglia and W. W. Tsang, "The Ziggurat Method for Generating Random
//     Variables" (2000), with 256 layers.
// What those leave open was established against numpy's outputs and documentation, and
// tests/runtime/cpp/test_noise.py pins each choice: a 32-bit draw is a 64-bit output's low half,
// then its high half; a uniform is a 32-bit draw's top 24 bits; the tail's exponentials are
// -log1p(-u) in float and its sign is bit 17 of the draw that chose the base layer; the box
// thresholds are rounded to the nearest integer and the layers' heights rounded from double; the
// wedge compares with exp in double.
#include "random.hpp"

#include <array>
#include <cmath>

namespace starflow::native {
namespace {

using u128 = unsigned __int128;

// ---- SeedSequence -------------------------------------------------------------------------------
// Both of SeedSequence's hashes have one shape, a keyed multiply: XOR the word with the key, step
// the key (times a fixed odd number), multiply by the stepped key, fold the high half onto the low.
// The constants (start keys, key steps, the two blend factors) are numpy's SeedSequence's.
constexpr int kPoolWords = 4;

uint32_t fold_high(uint32_t word) { return word ^ (word >> 16); }

class KeyedHash {
 public:
  KeyedHash(uint32_t key, uint32_t key_step) : key_(key), key_step_(key_step) {}
  uint32_t operator()(uint32_t word) {
    uint32_t keyed = word ^ key_;
    key_ *= key_step_;
    return fold_high(keyed * key_);
  }

 private:
  uint32_t key_, key_step_;
};

// `incoming` folded into `word`: the difference of two odd multiples, high half folded down.
uint32_t blend(uint32_t word, uint32_t incoming) {
  return fold_high(0xca01f9ddu * word - 0x4973f715u * incoming);
}

// SeedSequence(seed).generate_state(4, np.uint64) for a seed below 2**64 (no spawn key).
std::array<uint64_t, 4> seed_sequence_state(uint64_t seed) {
  // The seed's 32-bit words, least significant first, padded with zero words to the pool's size (a
  // seed below 2**32 is one word, [low], and pads to what [low, 0] pads to). At most 2 words: none
  // are left over to fold in after the pool is full.
  std::array<uint32_t, kPoolWords> pool = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  KeyedHash intake(0x43b0d7e5, 0x931e8875);
  for (uint32_t& word : pool) word = intake(word);
  // Every word into every other, in pool order, the intake hash's key still stepping.
  for (int from = 0; from < kPoolWords; ++from)
    for (int into = 0; into < kPoolWords; ++into)
      if (into != from) pool[into] = blend(pool[into], intake(pool[from]));

  // generate_state: 8 words read round-robin from the pool through the output hash, each pair
  // (low, high) one 64-bit word.
  KeyedHash output(0x8b51f9dd, 0x58f38ded);
  std::array<uint64_t, 4> state;
  for (int i = 0; i < 4; ++i) {
    uint64_t low = output(pool[(2 * i) % kPoolWords]);
    uint64_t high = output(pool[(2 * i + 1) % kPoolWords]);
    state[i] = high << 32 | low;
  }
  return state;
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

  // [0, 1): a draw's top 24 bits (a float's precision) as a multiple of 2^-24, exactly.
  float uniform() { return std::ldexp(static_cast<float>(next32() >> 8), -24); }

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
  std::array<float, 256> width;  // the layer's half-width per unit of the 23-bit draw
  // exp(-x^2/2) at the layer's outer edge (1 at the peak), in double rounded to float (a float exp
  // is an ulp off in 147 layers, and moves rare wedge decisions)
  std::array<float, 256> height;
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

// An Exp(1) variate by inversion, -log(1 - u); log1p in float, as numpy's tail.
float exponential(Pcg64& rng) { return -std::log1p(-rng.uniform()); }

// Marsaglia and Tsang's tail past r: an excess x = E1 / r over r, kept when 2 E2 > x^2 (E1 and E2
// exponential), the value r + x. (x is E1 times the float nearest 1/r, not E1 / r.)
float tail(Pcg64& rng, bool negative) {
  float excess, bound;
  do {
    excess = kInverseRf * exponential(rng);
    bound = exponential(rng);
  } while (2.0f * bound <= excess * excess);
  float value = kRf + excess;
  return negative ? -value : value;
}

// The wedge of `layer` at `magnitude`: a height drawn uniformly between the layer's outer height and
// the next layer's, kept under the curve. The band times the uniform is exact in double and rounded
// once to float, so no compiler fuses it with the add (numpy's x86-64 build does not); the curve in
// double, as numpy's (a float exp decides otherwise about once in 2e7 values).
bool under_curve(Pcg64& rng, const Ziggurat& z, unsigned layer, float magnitude) {
  float band = z.height[layer - 1] - z.height[layer];
  float height = static_cast<float>(static_cast<double>(band) * rng.uniform()) + z.height[layer];
  double half_square = 0.5 * magnitude * magnitude;  // exact in double
  return height < std::exp(-half_square);
}

// Generator.standard_normal(dtype=np.float32), one value: a 32-bit draw picks a layer (bits 0-7),
// a sign (bit 8) and a position across the layer (bits 9-31); most land in the layer's box.
float standard_normal(Pcg64& rng, const Ziggurat& z) {
  for (;;) {
    uint32_t draw = rng.next32();
    unsigned layer = draw & 0xff;
    bool negative = (draw >> 8) & 1;
    uint32_t position = draw >> 9;
    float magnitude = static_cast<float>(position) * z.width[layer];
    if (position < z.accept[layer]) return negative ? -magnitude : magnitude;
    if (layer == 0) return tail(rng, (draw >> 17) & 1);  // the tail's sign: the position's bit 8
    if (under_curve(rng, z, layer, magnitude)) return negative ? -magnitude : magnitude;
    // rejected: a fresh draw
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
