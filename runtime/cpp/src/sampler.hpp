// The sampling algorithm of starflow/core/sampler.py, over float32 buffers: guidance, the sequential
// and block-Jacobi solvers with the official stop test (or the per-row one), and the loop over blocks
// (deep first).
// The numbers follow the Python runtime operation for operation in float32.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "tensor.hpp"

namespace starflow::native {

// How block-wise Jacobi solves one block (starflow.sampler.JacobiSettings).
struct Jacobi {
  int block_size = 16, max_iter = 32;
  double threshold = 1e-3;
  std::string init = "noise";  // first guess: "noise" (official) or "chunk-mean"
  void check(const std::string& name) const;
};

// The Jacobi stop test (starflow.sampler.STOP_RULES): "batch" (official) is one test over every row,
// so a row's result depends on its batch; with "row" each row stops on its own test and then holds
// still, so a row's result is the same alone or in any batch (a server batching unrelated requests).
void check_stop(const std::string& rule, const std::string& name);

struct Sampling {
  double guidance = 0;
  std::string method = "jacobi";  // or "sequential"
  std::string stop = "batch";     // or "row": see check_stop
  Jacobi jacobi;
  std::optional<Jacobi> shallow_jacobi;  // the shallow blocks' own settings; none: `jacobi`
  void check() const;
  const Jacobi& jacobi_for(bool deep) const { return deep || !shallow_jacobi ? jacobi : *shallow_jacobi; }
};

struct BlockStats {
  int block = 0;
  std::string method;
  std::vector<int> iterations;  // per chunk; all 1 for sequential
  int64_t evaluations = 0, tokens = 0;
  double seconds = 0;
};

// (rows, T, D) float32, row-major.
struct Sequence {
  int64_t rows = 0, length = 0, dim = 0;
  std::vector<float> data;
  Sequence() = default;
  Sequence(int64_t rows, int64_t length, int64_t dim) : rows(rows), length(length), dim(dim), data(rows * length * dim) {}
  float* at(int64_t row, int64_t t) { return data.data() + (row * length + t) * dim; }
  const float* at(int64_t row, int64_t t) const { return data.data() + (row * length + t) * dim; }
};

// A flow block as the sampler drives it (the exported block's step and prefill graphs).
class SamplerBlock {
 public:
  virtual ~SamplerBlock() = default;
  virtual int index() const = 0;
  virtual bool deep() const = 0;
  virtual bool flip() const = 0;
  virtual bool text_conditioned() const = 0;
  virtual const std::vector<float>& sos() const = 0;  // empty: token 0 passes unchanged
  // A fresh cache for `rows` sequences on an h x w grid, the text's keys/values prefilled.
  virtual void open(int64_t rows, int64_t h, int64_t w, const Sequence* text) = 0;
  // x (rows, c, D) at block positions [start, start + c) -> mu, sigma (rows, c, D); writes the cache.
  virtual void step(const Sequence& x, int64_t start, Sequence& mu, Sequence& sigma) = 0;
};

Sequence patchify(const Tensor& latent, int patch);                       // (B, C, H, W) -> (B, T, p*p*C)
Tensor unpatchify(const Sequence& x, int patch, int64_t h, int64_t w);   // the inverse
void guide(Sequence& mu, Sequence& sigma, double weight);                 // on [cond ; uncond]

// noise (B, C, H, W) and text ((B or 2B), L, dim) already checked -> latent; stats per block.
Tensor sample(const std::vector<SamplerBlock*>& blocks, const Tensor& noise, const Sequence* text,
              const Sequence* text_uncond, const Sampling& options, int patch, bool guide_deep_only,
              std::vector<BlockStats>& stats);

}  // namespace starflow::native
