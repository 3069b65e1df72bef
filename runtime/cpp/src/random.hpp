// The noise of a seed: what `np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)`
// draws (starflow.core.generation.make_noise), so a seed gives the same images in C++ as in Python:
// bit for bit on x86-64 glibc against numpy builds that do not fuse multiply-add (another libm or
// an FMA-contracting numpy may differ in rare values). Written from the published algorithms
// (random.cpp says which, and which details were settled against numpy's outputs), not from
// numpy's source.
#pragma once

#include <cstdint>

#include "tensor.hpp"

namespace starflow::native {

// Standard normal float32 of any shape (images (N, C, H, W), clips (N, T, C, H, W), ...), filled
// in C order from one generator, as numpy fills an array of that shape.
Tensor normal_noise(uint64_t seed, const Shape& shape);

}  // namespace starflow::native
