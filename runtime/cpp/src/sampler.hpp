// The sampling algorithm of starflow/core/sampler.py, over float32 buffers: guidance, the sequential
// and block-Jacobi solvers with the official stop test (or the per-row one), the official video rules
// (frame-local blocks, the flip inside each frame, longer later chunks, warm start, the rolling
// window), the loop over blocks (deep first), and the learned denoiser's overlapping windows.
// The numbers follow the Python runtime operation for operation in float32.
#pragma once

#include <functional>
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
  // Clips (starflow.sampler.SampleOptions): a Jacobi chunk after the first frame starts from the
  // tokens one frame earlier; past `window` frames the deep block's cache restarts from the last
  // `context` frames (none: window - 1), re-encoded.
  bool warm_start = true;
  std::optional<int> window, context;
  // A sample or generation holding NaN or inf fails (nothing is returned), as `starflow generate`'s
  // --check-finite; off: the values are returned as they are.
  bool check_finite = true;
  void check() const;
  const Jacobi& jacobi_for(bool deep) const { return deep || !shallow_jacobi ? jacobi : *shallow_jacobi; }
  int context_frames() const { return !window ? 0 : context ? *context : *window - 1; }
};

struct BlockStats {
  int block = 0;
  std::string method;
  std::vector<int> iterations;  // per chunk; all 1 for sequential
  // per chunk, the iterations each image's rows ran (the "row" stop rule lets them differ)
  std::vector<std::vector<int>> image_iterations;
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
  virtual bool flip_in_frame() const = 0;  // a clip's flip reverses each frame, frames kept in order
  virtual bool frame_local() const = 0;    // a clip's frames are sampled as separate sequences
  virtual bool text_conditioned() const = 0;
  virtual const std::vector<float>& sos() const = 0;  // empty: token 0 passes unchanged
  // A fresh cache of `tokens` positions (after the text's) for `rows` sequences of h x w token frames,
  // the text's keys/values prefilled.
  virtual void open(int64_t rows, int64_t h, int64_t w, const Sequence* text, int64_t tokens) = 0;
  // x (rows, c, D) at cache positions [start, start + c) (block positions less a rolled window's
  // origin) -> mu, sigma (rows, c, D); writes the cache.
  virtual void step(const Sequence& x, int64_t start, Sequence& mu, Sequence& sigma) = 0;
};

// Latents <-> tokens (starflow.sampler.patchify): an image batch (B, C, H, W) -> (B, h*w, p*p*C),
// channel order (p1 p2 c), tokens row-major over (h, w) = (H/p, W/p); a clip batch (B, F, C, H, W)
// -> (B, F*h*w, p*p*C), frame after frame. unpatchify is the inverse: `frames` 0 gives images,
// otherwise clips (B, frames, C, h*p, w*p). A frame-local block's rows (B*F, h*w, D) are the same
// memory as (B, F*h*w, D): change `rows` and `length` only.
Sequence patchify(const Tensor& latent, int patch);
Tensor unpatchify(const Sequence& x, int patch, int64_t h, int64_t w, int64_t frames = 0);
// A block's token order, in place (its own inverse): raster order unless `flip`; flipped, the whole
// sequence reversed, or with `in_frame` and frames > 1 (video's temporal_causal) each of the
// `frames` frames reversed, frames kept in order.
void permute(Sequence& x, bool flip, bool in_frame, int64_t frames);
void guide(Sequence& mu, Sequence& sigma, double weight);  // on [cond ; uncond]

// noise (B, C, H, W) or clips (B, F, C, H, W) and text ((B or 2B), L, dim), already checked -> latents
// of the same shape; stats per block in sampling order. Over a clip's frames, Jacobi chunks after the
// first frame are `later_chunk_factor` times the block size (kLaterChunkFactor, the official 4).
Tensor sample(const std::vector<SamplerBlock*>& blocks, const Tensor& noise, const Sequence* text,
              const Sequence* text_uncond, const Sampling& options, int patch, bool guide_deep_only,
              int later_chunk_factor, std::vector<BlockStats>& stats);

// starflow.sampler.denoise_windows: clips x (B, F, C, H, W) through a learned denoiser `step` (a
// window of clips -> the denoised window) in windows of `window` frames (0: all at once), in place:
// the first window writes all its frames, each later one, starting window - overlap frames on, the
// frames after its first `overlap` (none: window - 1, one new frame each).
void denoise_windows(Tensor& x, const std::function<Tensor(const Tensor&)>& step, int64_t window,
                     std::optional<int64_t> overlap);

}  // namespace starflow::native
