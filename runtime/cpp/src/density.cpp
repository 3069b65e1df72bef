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

}  // namespace

Density density(const std::vector<DensityBlock*>& blocks, const Tensor& latents, const Sequence* text, int patch) {
  const std::size_t rank = latents.shape.size();
  const bool clip = rank == 5;
  const int64_t B = latents.shape[0], frames = clip ? latents.shape[1] : 1;
  const int64_t h = latents.shape[rank - 2] / patch, w = latents.shape[rank - 1] / patch;
  Density out;
  Sequence seq = patchify(latents, patch), z, logdet;  // (B, frames*h*w, D)
  for (DensityBlock* block : blocks) {
    const bool local = block->frame_local() && clip;
    if (local) seq.rows = B * frames, seq.length = h * w;  // one row per frame: the same memory
    const int64_t seq_frames = local ? 1 : frames;
    permute(seq, block->flip(), block->flip_in_frame(), seq_frames);
    block->density(seq, h, w, block->text_conditioned() ? text : nullptr, z, logdet);
    permute(z, block->flip(), block->flip_in_frame(), seq_frames);
    if (local) z.rows = B, z.length = frames * h * w;
    seq = std::move(z);
    out.logdets.push_back(std::move(logdet));  // in the block's own order, as the Python runtime keeps it
  }
  out.z = unpatchify(seq, patch, h, w, clip ? frames : 0);
  return out;
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
