// The density direction of starflow/core/sampler.py (`density`, `nll_per_sample`, `to_bits_per_dim`,
// `nll_gradient`) over float32 buffers: latents -> z and each block's log-determinant, then each
// sample's negative log-likelihood in bits per dimension, in float32 as numpy computes it (its pairwise
// sums); and the gradient of that likelihood, chained over the blocks' vector-Jacobian products.
#pragma once

#include <vector>

#include "sampler.hpp"
#include "tensor.hpp"

namespace starflow::native {

// A flow block as the density direction drives it (the exported block's forward and vjp graphs).
class DensityBlock {
 public:
  virtual ~DensityBlock() = default;
  virtual bool flip() const = 0;
  virtual bool flip_in_frame() const = 0;  // a clip's flip reverses each frame, frames kept in order
  virtual bool frame_local() const = 0;    // a clip's frames are separate sequences
  virtual bool text_conditioned() const = 0;
  // x (rows, T, D) in the block's token order, (h, w) the token grid of one frame, text (B, L, dim)
  // or null -> z and logdet = -log sigma, both (rows, T, D) in the block's token order.
  virtual void density(const Sequence& x, int64_t h, int64_t w, const Sequence* text, Sequence& z,
                       Sequence& logdet) = 0;
  // x and grad_z (rows, T, D) in the block's token order, as `density` -> grad_x, d/dx of
  // sum(grad_z * z) - sum(logdet), (rows, T, D) in the block's token order.
  virtual void vjp(const Sequence& x, int64_t h, int64_t w, const Sequence& grad_z, const Sequence* text,
                   Sequence& grad_x) = 0;
};

struct Density {
  Tensor z;  // the latents' shape
  // per block in forward order, each in its block's token order: (B, F*h*w, D), or a frame-local
  // block's (B*F, h*w, D) for a clip (the same memory as Python's (B, F, h*w, D))
  std::vector<Sequence> logdets;
};

// latents (B, C, H, W) or clips (B, F, C, H, W) float32 and text (B, L, dim) or null, already
// checked; `blocks` in forward order (the reverse of sampling order), each in its own token order, a
// frame-local block over each frame of a clip as its own sequence.
Density density(const std::vector<DensityBlock*>& blocks, const Tensor& latents, const Sequence* text, int patch);

// The gradient of each sample's total NLL 0.5*sum(z^2) - sum(logdet) with respect to the latents, of
// their shape (inputs and `blocks` as `density`): the density pass keeps each block's input, then from
// g = z each block's vjp, last block first, maps g back through it.
Tensor nll_gradient(const std::vector<DensityBlock*>& blocks, const Tensor& latents, const Sequence* text, int patch);

// 0.5 * mean(z^2) - the sum over blocks of mean(logdet), per sample (means over all but the batch).
std::vector<float> nll_per_sample(const Density& density);
// (nll + 0.5 * log(2 pi)) / log(2): the Gaussian negative log-likelihood per dimension, in bits.
std::vector<float> to_bits_per_dim(const std::vector<float>& nll);

}  // namespace starflow::native
