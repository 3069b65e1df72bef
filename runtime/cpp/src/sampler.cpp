// starflow/core/sampler.py in C++; see that module for the algorithm's description.
#include "sampler.hpp"

#include <algorithm>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace starflow::native {
namespace {

// Rows [first, first + count) of every position in [from, from + length) into a fresh (count, length, D).
Sequence slice(const Sequence& x, int64_t first, int64_t count, int64_t from, int64_t length) {
  Sequence out(count, length, x.dim);
  for (int64_t r = 0; r < count; ++r)
    std::memcpy(out.at(r, 0), x.at(first + r, from), sizeof(float) * length * x.dim);
  return out;
}

Sequence stacked(const Sequence& a, const Sequence& b) {  // [a ; b] along rows
  Sequence out(a.rows + b.rows, a.length, a.dim);
  std::copy(a.data.begin(), a.data.end(), out.data.begin());
  std::copy(b.data.begin(), b.data.end(), out.data.begin() + a.data.size());
  return out;
}

Sequence solve_sequential(SamplerBlock& block, const Sequence& z, double guidance, BlockStats& stats) {
  Sequence x = z, mu, sigma;
  const std::vector<float>& sos = block.sos();
  int64_t first = sos.empty() ? 1 : 0;  // without sos token 0 passes unchanged
  for (int64_t t = first; t < z.length; ++t) {
    Sequence input = t == 0 ? Sequence(z.rows, 1, z.dim) : slice(x, 0, z.rows, t - 1, 1);
    if (t == 0)
      for (int64_t r = 0; r < z.rows; ++r) std::copy(sos.begin(), sos.end(), input.at(r, 0));
    block.step(input, t - first, mu, sigma);
    if (guidance > 0) guide(mu, sigma, guidance);
    for (int64_t r = 0; r < z.rows; ++r)
      for (int64_t d = 0; d < z.dim; ++d) x.at(r, t)[d] = z.at(r, t)[d] * sigma.at(r, 0)[d] + mu.at(r, 0)[d];
    stats.iterations.push_back(1);
    stats.image_iterations.emplace_back(z.rows, 1);
    stats.evaluations += 1;
    stats.tokens += z.rows;
  }
  return x;
}

// mean over the chunk's positions of the previous chunk's (mu, sigma) applied to the new targets
void chunk_mean_guess(Sequence& full, const Sequence& mu, const Sequence& sigma, const Sequence& z, int64_t start,
                      int64_t c) {
  for (int64_t r = 0; r < z.rows; ++r)
    for (int64_t d = 0; d < z.dim; ++d) {
      float sum_mu = 0, sum_sigma = 0;
      for (int64_t t = 0; t < mu.length; ++t) {
        sum_mu += mu.at(r, t)[d];
        sum_sigma += sigma.at(r, t)[d];
      }
      const float mean_mu = sum_mu / static_cast<float>(mu.length), mean_sigma = sum_sigma / static_cast<float>(mu.length);
      for (int64_t t = 0; t < c; ++t) full.at(r, start + 1 + t)[d] = mean_mu + mean_sigma * z.at(r, start + t)[d];
    }
}

// mean((new - old)^2) / mean(new^2) over n values from their double sums, divided in float32 as
// the Python runtime divides its float32 means
float change_ratio(double change, double size, int64_t n) {
  const double count = static_cast<double>(n);
  return static_cast<float>(change / count) / static_cast<float>(size / count);
}

// A block's sequence as frames of `tokens` tokens, and the video rules that follow (starflow.sampler.Frames).
struct Frames {
  int64_t tokens = 0;       // per frame (all of them for an image)
  bool warm_start = false;  // a chunk after the first frame starts from one frame earlier
  int64_t window = 0;       // frames the cache holds; 0: the whole sequence
  int64_t context = 0;      // frames re-encoded when the window rolls
  int64_t later_chunk_factor = 1;  // chunks after the first frame are this many times the block size
};

// With `by_row` each row stops on its own test; a stopped row keeps its values and is fed the inputs
// of its last iteration again, so the cache entries the step rewrites for it stay those of that
// iteration, as if it had stopped alone. Over a clip's frames: longer chunks after the first frame,
// a warm first iteration, and past `window` frames a cache restarted from the last `context` frames.
Sequence solve_jacobi(SamplerBlock& block, const Sequence& z, double guidance, const Jacobi& options, bool by_row,
                      const Frames& frames, BlockStats& stats) {
  const std::vector<float>& sos = block.sos();
  if (sos.empty()) throw Error("Jacobi sampling needs a model with `sos: 1`; use method 'sequential'");
  const int64_t rows = z.rows, T = z.length, D = z.dim, F = frames.tokens;
  const float threshold = static_cast<float>(options.threshold);
  Sequence full(rows, T + 1, D), mu, sigma;  // input position t holds x_{t-1}; position 0 the sos
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(sos.begin(), sos.end(), full.at(r, 0));
    std::memcpy(full.at(r, 1), z.at(r, 0), sizeof(float) * T * D);
  }
  const int64_t window = frames.window ? std::min(T, frames.window * F) : T;  // in tokens
  int64_t start = 0, end = window, origin = 0;  // origin: the first position the cache holds
  std::vector<char> stopped(rows);              // rows done (`by_row`; the batch rule stops all at once)
  std::vector<int> ran(rows);                   // iterations each row ran
  Sequence inputs;
  while (true) {
    while (start < end) {
      const int64_t c =
          std::min<int64_t>(options.block_size * (start <= F ? 1 : frames.later_chunk_factor), end - start);
      if (options.init == "chunk-mean" && start > 0) chunk_mean_guess(full, mu, sigma, z, start, c);
      inputs = Sequence(rows, c, D);
      std::fill(stopped.begin(), stopped.end(), 0);
      std::fill(ran.begin(), ran.end(), 0);
      int i = 0;
      for (; i < options.max_iter; ++i) {
        const int64_t first = i == 0 && frames.warm_start && start > F ? start - F : start;  // warm: a frame back
        for (int64_t r = 0; r < rows; ++r)
          if (!stopped[r]) std::memcpy(inputs.at(r, 0), full.at(r, first), sizeof(float) * c * D);
        block.step(inputs, start - origin, mu, sigma);
        if (guidance > 0) guide(mu, sigma, guidance);
        double change = 0, size = 0;  // the official stop test's sums: over the batch, or per row
        bool all_stopped = true;
        for (int64_t r = 0; r < rows; ++r) {
          if (stopped[r]) continue;
          ++ran[r];
          if (by_row) change = size = 0;
          float* old = full.at(r, start + 1);
          const float *m = mu.at(r, 0), *s = sigma.at(r, 0), *target = z.at(r, start);
          for (int64_t k = 0; k < c * D; ++k) {
            float updated = m[k] + s[k] * target[k];
            float delta = updated - old[k];
            change += static_cast<double>(delta * delta);
            size += static_cast<double>(updated * updated);
            old[k] = updated;
          }
          if (by_row) {
            stopped[r] = change_ratio(change, size, c * D) < threshold;
            all_stopped = all_stopped && stopped[r];
          }
        }
        stats.evaluations += 1;
        stats.tokens += rows * c;
        const bool done = by_row ? all_stopped : change_ratio(change, size, rows * c * D) < threshold;
        if (done || i == options.max_iter - 1) break;
      }
      stats.iterations.push_back(i + 1);
      stats.image_iterations.push_back(by_row ? ran : std::vector<int>(rows, i + 1));
      start += c;
    }
    if (end >= T) return slice(full, 0, rows, 1, T);
    // roll: a fresh cache (text kept) holding the last `context` frames, re-encoded as the start of a
    // sequence: sos, then all of them but the last, whose input the next chunk is
    const int64_t context = frames.context * F;
    end = std::min(end + window - context, T);
    origin = start - context;
    // (its own outputs are dropped: mu and sigma stay the last chunk's, which chunk-mean reads)
    Sequence restart(rows, std::max<int64_t>(context, 1), D), unused_mu, unused_sigma;
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(sos.begin(), sos.end(), restart.at(r, 0));
      if (context > 1) std::memcpy(restart.at(r, 1), full.at(r, start + 1 - context), sizeof(float) * (context - 1) * D);
    }
    block.step(restart, 0, unused_mu, unused_sigma);
    stats.evaluations += 1;
    stats.tokens += rows * context;
  }
}

// A block's per-row counts -> per image: the most over the image's rows, its guidance twin
// ([cond ; uncond], image-major halves) and, in a frame-local block, the `rows_per_sequence`
// consecutive rows of its frames (starflow.sampler.per_image).
std::vector<int> per_image(const std::vector<int>& row_counts, int64_t images, int64_t rows_per_sequence) {
  std::vector<int> by_image(images, 0);
  for (std::size_t row = 0; row < row_counts.size(); ++row) {
    int& most = by_image[(static_cast<int64_t>(row) / rows_per_sequence) % images];
    most = std::max(most, row_counts[row]);
  }
  return by_image;
}

}  // namespace

namespace {

std::string number_text(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.9g", value);
  return text;
}

}  // namespace

void Jacobi::check(const std::string& name) const {
  if (block_size < 1) throw Error(name + ".block_size: must be an integer >= 1, got " + std::to_string(block_size));
  if (max_iter < 1) throw Error(name + ".max_iter: must be an integer >= 1, got " + std::to_string(max_iter));
  if (!(threshold >= 0 && threshold <= FLT_MAX))  // compared in float32: past its range every chunk stops at once
    throw Error(name + ".threshold: must be a number >= 0 within float32's range, got " + number_text(threshold));
  if (init != "noise" && init != "chunk-mean")
    throw Error(name + ".init: expected 'noise' or 'chunk-mean', got '" + init + "'");
}

void check_stop(const std::string& rule, const std::string& name) {
  if (rule != "batch" && rule != "row") throw Error(name + ": expected 'batch' or 'row', got '" + rule + "'");
}

void Sampling::check() const {
  if (method != "jacobi" && method != "sequential")
    throw Error("method: expected 'jacobi' or 'sequential', got '" + method + "'");
  check_stop(stop, "stop");
  if (!(guidance >= 0 && guidance <= FLT_MAX))  // the guide runs in float32: past its range every value is NaN
    throw Error("guidance: must be a finite number >= 0 within float32's range, got " + number_text(guidance));
  jacobi.check("jacobi");
  if (shallow_jacobi) shallow_jacobi->check("shallow_jacobi");
  for (auto [value, name] : {std::pair{&window, "window"}, {&context, "context"}})
    if (*value && **value < 1)
      throw Error(std::string(name) + ": must be an integer >= 1 (frames), got " + std::to_string(**value));
  if (context && (!window || *context >= *window))
    throw Error("context: must be fewer frames than the window (" + (window ? std::to_string(*window) : "None") +
                "), got " + std::to_string(*context));
}

Sequence patchify(const Tensor& latent, int p) {
  const bool clip = latent.shape.size() == 5;  // (B, F, C, H, W): each frame as an image, frame after frame
  const int64_t frames = clip ? latent.shape[1] : 1, B = latent.shape[0] * frames;
  const int64_t C = latent.shape[clip ? 2 : 1], H = latent.shape[clip ? 3 : 2], W = latent.shape[clip ? 4 : 3];
  const int64_t h = H / p, w = W / p;
  Sequence x(B, h * w, int64_t{p} * p * C);
  const float* in = latent.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < h; ++i)
      for (int64_t j = 0; j < w; ++j) {
        float* token = x.at(b, i * w + j);
        for (int64_t p1 = 0; p1 < p; ++p1)
          for (int64_t p2 = 0; p2 < p; ++p2)
            for (int64_t c = 0; c < C; ++c)
              token[(p1 * p + p2) * C + c] = in[((b * C + c) * H + i * p + p1) * W + j * p + p2];
      }
  x.rows = latent.shape[0];  // (B * F, h*w, D) is (B, F*h*w, D) in memory
  x.length *= frames;
  return x;
}

Tensor unpatchify(const Sequence& x, int p, int64_t h, int64_t w, int64_t frames) {
  const int64_t B = x.rows * std::max<int64_t>(frames, 1), C = x.dim / (int64_t{p} * p), H = h * p, W = w * p;
  Tensor latent(DType::f32, frames ? Shape{x.rows, frames, C, H, W} : Shape{B, C, H, W});
  float* out = latent.f32();
  const float* tokens = x.data.data();  // (B * frames, h*w, D)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < h; ++i)
      for (int64_t j = 0; j < w; ++j) {
        const float* token = tokens + (b * h * w + i * w + j) * x.dim;
        for (int64_t p1 = 0; p1 < p; ++p1)
          for (int64_t p2 = 0; p2 < p; ++p2)
            for (int64_t c = 0; c < C; ++c)
              out[((b * C + c) * H + i * p + p1) * W + j * p + p2] = token[(p1 * p + p2) * C + c];
      }
  return latent;
}

void permute(Sequence& x, bool flip, bool in_frame, int64_t frames) {
  if (!flip) return;
  const int64_t pieces = in_frame && frames > 1 ? frames : 1, n = x.length / pieces;  // reversed one by one
  for (int64_t r = 0; r < x.rows; ++r)
    for (int64_t piece = 0; piece < pieces; ++piece)
      for (int64_t t = 0; t < n / 2; ++t)
        std::swap_ranges(x.at(r, piece * n + t), x.at(r, piece * n + t) + x.dim, x.at(r, piece * n + n - 1 - t));
}

void guide(Sequence& mu, Sequence& sigma, double weight) {
  // float32 throughout, as numpy evaluates sampler.guide with a Python float weight
  const float w = static_cast<float>(weight), one_plus_w = static_cast<float>(1 + weight);
  const std::size_t half = mu.data.size() / 2;
  float *mc = mu.data.data(), *mu_u = mc + half, *sc = sigma.data.data(), *su = sc + half;
  for (std::size_t k = 0; k < half; ++k) {
    float ratio = std::min(sc[k] / su[k], 1.0f);
    float s = ratio * ratio;
    float denominator = one_plus_w - w * s;
    float sigma_g = sc[k] / std::sqrt(denominator);
    float mu_g = (one_plus_w * mc[k] - (w * s) * mu_u[k]) / denominator;
    mc[k] = mu_u[k] = mu_g;
    sc[k] = su[k] = sigma_g;
  }
}

Tensor sample(const std::vector<SamplerBlock*>& blocks, const Tensor& noise, const Sequence* text,
              const Sequence* text_uncond, const Sampling& options, int patch, bool guide_deep_only,
              int later_chunk_factor, std::vector<BlockStats>& stats) {
  const bool clip = noise.shape.size() == 5;
  const int64_t B = noise.shape[0], n_frames = clip ? noise.shape[1] : 1;
  const int64_t h = noise.shape[noise.shape.size() - 2] / patch, w = noise.shape.back() / patch, F = h * w;
  double guidance = options.guidance;
  Sequence both;
  if (guidance > 0) both = stacked(*text, *text_uncond);
  const Sequence* rows_text = guidance > 0 ? &both : text;
  Sequence x = patchify(noise, patch);  // (B, frames * F, D)
  stats.clear();
  for (SamplerBlock* block : blocks) {
    if (!block->deep() && guide_deep_only && guidance > 0) {
      guidance = 0;
      rows_text = text;
    }
    Sequence z = guidance > 0 ? stacked(x, x) : x;
    const int64_t rows = z.rows;
    const bool local = block->frame_local() && clip;
    if (local) z.rows *= n_frames, z.length = F;  // (rows * frames, F, D): the same memory
    const int64_t sequence_frames = local ? 1 : n_frames;
    // only the deep block rolls (official)
    const Frames frames{F, options.warm_start, block->deep() && options.window ? *options.window : 0,
                        options.context_frames(), later_chunk_factor};
    const int64_t tokens = frames.window ? std::min(z.length, frames.window * F) : z.length;
    BlockStats record;
    record.block = block->index();
    record.method = options.method;
    auto began = std::chrono::steady_clock::now();
    block->open(z.rows, h, w, block->text_conditioned() ? rows_text : nullptr, tokens);
    permute(z, block->flip(), block->flip_in_frame(), sequence_frames);
    x = options.method == "sequential" ? solve_sequential(*block, z, guidance, record)
                                       : solve_jacobi(*block, z, guidance, options.jacobi_for(block->deep()),
                                                      options.stop == "row", frames, record);
    for (std::vector<int>& chunk : record.image_iterations) chunk = per_image(chunk, B, local ? n_frames : 1);
    permute(x, block->flip(), block->flip_in_frame(), sequence_frames);
    if (local) x.rows = rows, x.length = n_frames * F;
    if (x.rows != B) x = slice(x, 0, B, 0, x.length);
    record.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
    stats.push_back(std::move(record));
  }
  return unpatchify(x, patch, h, w, clip ? n_frames : 0);
}

void denoise_windows(Tensor& x, const std::function<Tensor(const Tensor&)>& step, int64_t window,
                     std::optional<int64_t> overlap) {
  const int64_t B = x.shape[0], n = x.shape[1], size = window ? window : n;
  if (overlap && *overlap >= size)
    throw Error("denoiser overlap " + std::to_string(*overlap) + " must be fewer frames than the window " +
                std::to_string(size));
  const std::size_t frame = x.size() / static_cast<std::size_t>(B * n);  // floats per frame
  // while the next window still has frames to write
  for (int64_t start = 0, kept = 0; start + kept < n; kept = overlap ? *overlap : size - 1, start += size - kept) {
    const int64_t stop = std::min(start + size, n);
    Tensor part(DType::f32, {B, stop - start, x.shape[2], x.shape[3], x.shape[4]});
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(part.f32() + b * (stop - start) * frame, x.f32() + (b * n + start) * frame,
                  sizeof(float) * (stop - start) * frame);
    const Tensor out = step(part);
    for (int64_t b = 0; b < B; ++b)  // frames [start + kept, stop) of each clip
      std::memcpy(x.f32() + (b * n + start + kept) * frame, out.f32() + (b * (stop - start) + kept) * frame,
                  sizeof(float) * (stop - start - kept) * frame);
  }
}

}  // namespace starflow::native
