// starflow/core/sampler.py's density direction in C++; see that module for the algorithm.
#include "density.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

namespace starflow::native {
namespace {

// The float32 sum numpy takes over a contiguous axis (pairwise summation): up to 8 values one after
// another; up to 128 in 8 running sums (value i into sum i mod 8) combined as a tree, then the
// remainder; longer runs split in two at half the length rounded down to a multiple of 8.
float pairwise_sum(const float* v, int64_t n) {
  if (n < 8) {
    float sum = -0.0f;
    for (int64_t i = 0; i < n; ++i) sum += v[i];
    return sum;
  }
  if (n <= 128) {
    float lane[8];
    std::copy(v, v + 8, lane);
    int64_t i = 8;
    for (; i + 8 <= n; i += 8)
      for (int k = 0; k < 8; ++k) lane[k] += v[i + k];
    float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; i < n; ++i) sum += v[i];
    return sum;
  }
  int64_t half = n / 2;
  half -= half % 8;
  return pairwise_sum(v, half) + pairwise_sum(v + half, n - half);
}

// np.mean of float32 values: their float32 sum divided by the count in float64 (numpy divides by an
// intp count, which promotes), rounded back to float32.
float mean_float32(const float* v, int64_t n) {
  return static_cast<float>(static_cast<double>(pairwise_sum(v, n)) / static_cast<double>(n));
}

// The token grid of latents (B, C, H, W) or clips (B, F, C, H, W) patchified.
struct Grid {
  bool clip;
  int64_t B, frames, h, w;
};

Grid grid_of(const Tensor& latents, int patch) {
  const std::size_t rank = latents.shape.size();
  const bool clip = rank == 5;
  return {clip, latents.shape[0], clip ? latents.shape[1] : 1, latents.shape[rank - 2] / patch,
          latents.shape[rank - 1] / patch};
}

// A raster-order sequence (B, F*h*w, D) into `block`'s view, in place: its token order, a frame-local
// block's rows one per frame of a clip (the same memory). The permutation is its own inverse, so
// `to_raster` takes a block's output back.
void to_block(Sequence& s, const DensityBlock& block, const Grid& g) {
  const bool local = block.frame_local() && g.clip;
  if (local) s.rows = g.B * g.frames, s.length = g.h * g.w;
  permute(s, block.flip(), block.flip_in_frame(), local ? 1 : g.frames);
}

void to_raster(Sequence& s, const DensityBlock& block, const Grid& g) {
  const bool local = block.frame_local() && g.clip;
  permute(s, block.flip(), block.flip_in_frame(), local ? 1 : g.frames);
  if (local) s.rows = g.B, s.length = g.frames * g.h * g.w;
}

// The density pass: latents -> z (raster order), each block's logdet, and with `inputs` each block's
// input in its own order (what its vjp graph takes again: kept rather than permuted twice).
Sequence density_pass(const std::vector<DensityBlock*>& blocks, const Tensor& latents, const Sequence* text,
                      int patch, const Grid& g, std::vector<Sequence>& logdets, std::vector<Sequence>* inputs) {
  Sequence seq = patchify(latents, patch), z, logdet;  // (B, frames*h*w, D)
  for (DensityBlock* block : blocks) {
    to_block(seq, *block, g);
    block->density(seq, g.h, g.w, block->text_conditioned() ? text : nullptr, z, logdet);
    to_raster(z, *block, g);
    if (inputs) inputs->push_back(std::move(seq));
    seq = std::move(z);
    logdets.push_back(std::move(logdet));  // in the block's own order, as the Python runtime keeps it
  }
  return seq;
}

}  // namespace

Density density(const std::vector<DensityBlock*>& blocks, const Tensor& latents, const Sequence* text, int patch) {
  const Grid g = grid_of(latents, patch);
  Density out;
  Sequence z = density_pass(blocks, latents, text, patch, g, out.logdets, nullptr);
  out.z = unpatchify(z, patch, g.h, g.w, g.clip ? g.frames : 0);
  return out;
}

Tensor nll_gradient(const std::vector<DensityBlock*>& blocks, const Tensor& latents, const Sequence* text, int patch) {
  const Grid g = grid_of(latents, patch);
  std::vector<Sequence> logdets, inputs;
  Sequence grad = density_pass(blocks, latents, text, patch, g, logdets, &inputs);  // z: d(0.5*sum(z^2))/dz
  Sequence grad_x;
  for (std::size_t i = blocks.size(); i-- > 0;) {
    DensityBlock& block = *blocks[i];
    to_block(grad, block, g);
    block.vjp(inputs[i], g.h, g.w, grad, block.text_conditioned() ? text : nullptr, grad_x);
    to_raster(grad_x, block, g);
    std::swap(grad, grad_x);
  }
  return unpatchify(grad, patch, g.h, g.w, g.clip ? g.frames : 0);
}

std::vector<float> nll_per_sample(const Density& density) {
  const Tensor& z = density.z;
  const int64_t B = z.shape[0], n = static_cast<int64_t>(z.size()) / B;
  std::vector<float> square(z.size()), nll(B);
  for (std::size_t i = 0; i < square.size(); ++i) square[i] = z.f32()[i] * z.f32()[i];
  for (int64_t b = 0; b < B; ++b) nll[b] = 0.5f * mean_float32(square.data() + b * n, n);
  for (const Sequence& logdet : density.logdets) {
    const int64_t m = static_cast<int64_t>(logdet.data.size()) / B;  // a frame-local block's rows: B * frames
    for (int64_t b = 0; b < B; ++b) nll[b] -= mean_float32(logdet.data.data() + b * m, m);
  }
  return nll;
}

std::vector<float> to_bits_per_dim(const std::vector<float>& nll) {
  // the constants rounded to float32 first, as numpy applies Python floats to a float32 array
  const float half_log_two_pi = static_cast<float>(0.5 * std::log(2 * 3.141592653589793)), log_two = static_cast<float>(std::log(2.0));
  std::vector<float> bits(nll.size());
  for (std::size_t i = 0; i < nll.size(); ++i) bits[i] = (nll[i] + half_log_two_pi) / log_two;
  return bits;
}

}  // namespace starflow::native
