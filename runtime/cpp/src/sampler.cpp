// starflow/core/sampler.py in C++; see that module for the algorithm's description.
#include "sampler.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
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

void flip(Sequence& x) {
  for (int64_t r = 0; r < x.rows; ++r)
    for (int64_t t = 0; t < x.length / 2; ++t)
      std::swap_ranges(x.at(r, t), x.at(r, t) + x.dim, x.at(r, x.length - 1 - t));
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

// With `by_row` each row stops on its own test; a stopped row keeps its values and is fed the inputs
// of its last iteration again, so the cache entries the step rewrites for it stay those of that
// iteration, as if it had stopped alone.
Sequence solve_jacobi(SamplerBlock& block, const Sequence& z, double guidance, const Jacobi& options, bool by_row,
                      BlockStats& stats) {
  const std::vector<float>& sos = block.sos();
  if (sos.empty()) throw Error("Jacobi sampling needs a model with `sos: 1`; use method 'sequential'");
  const int64_t rows = z.rows, T = z.length, D = z.dim;
  const float threshold = static_cast<float>(options.threshold);
  Sequence full(rows, T + 1, D), mu, sigma;  // input position t holds x_{t-1}; position 0 the sos
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(sos.begin(), sos.end(), full.at(r, 0));
    std::memcpy(full.at(r, 1), z.at(r, 0), sizeof(float) * T * D);
  }
  for (int64_t start = 0; start < T;) {
    const int64_t c = std::min<int64_t>(options.block_size, T - start);
    if (options.init == "chunk-mean" && start > 0) chunk_mean_guess(full, mu, sigma, z, start, c);
    Sequence inputs(rows, c, D);
    std::vector<char> stopped(rows, 0);  // rows done (`by_row`; the batch rule stops all at once)
    int i = 0;
    for (; i < options.max_iter; ++i) {
      for (int64_t r = 0; r < rows; ++r)
        if (!stopped[r]) std::memcpy(inputs.at(r, 0), full.at(r, start), sizeof(float) * c * D);
      block.step(inputs, start, mu, sigma);
      if (guidance > 0) guide(mu, sigma, guidance);
      double change = 0, size = 0;  // the official stop test's sums: over the batch, or per row
      bool all_stopped = true;
      for (int64_t r = 0; r < rows; ++r) {
        if (stopped[r]) continue;
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
    start += c;
  }
  return slice(full, 0, rows, 1, T);
}

}  // namespace

void Jacobi::check(const std::string& name) const {
  if (block_size < 1) throw Error(name + ".block_size: must be an integer >= 1, got " + std::to_string(block_size));
  if (max_iter < 1) throw Error(name + ".max_iter: must be an integer >= 1, got " + std::to_string(max_iter));
  if (!(threshold >= 0)) throw Error(name + ".threshold: must be a number >= 0, got " + std::to_string(threshold));
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
  if (!std::isfinite(guidance) || guidance < 0)
    throw Error("guidance: must be a finite number >= 0, got " + std::to_string(guidance));
  jacobi.check("jacobi");
  if (shallow_jacobi) shallow_jacobi->check("shallow_jacobi");
}

Sequence patchify(const Tensor& latent, int p) {
  const int64_t B = latent.shape[0], C = latent.shape[1], h = latent.shape[2] / p, w = latent.shape[3] / p;
  const int64_t H = latent.shape[2], W = latent.shape[3];
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
  return x;
}

Tensor unpatchify(const Sequence& x, int p, int64_t h, int64_t w) {
  const int64_t B = x.rows, C = x.dim / (int64_t{p} * p), H = h * p, W = w * p;
  Tensor latent(DType::f32, {B, C, H, W});
  float* out = latent.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < h; ++i)
      for (int64_t j = 0; j < w; ++j) {
        const float* token = x.at(b, i * w + j);
        for (int64_t p1 = 0; p1 < p; ++p1)
          for (int64_t p2 = 0; p2 < p; ++p2)
            for (int64_t c = 0; c < C; ++c)
              out[((b * C + c) * H + i * p + p1) * W + j * p + p2] = token[(p1 * p + p2) * C + c];
      }
  return latent;
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
              std::vector<BlockStats>& stats) {
  const int64_t B = noise.shape[0], h = noise.shape[2] / patch, w = noise.shape[3] / patch;
  double guidance = options.guidance;
  Sequence both;
  if (guidance > 0) both = stacked(*text, *text_uncond);
  const Sequence* rows_text = guidance > 0 ? &both : text;
  Sequence x = patchify(noise, patch);
  stats.clear();
  for (SamplerBlock* block : blocks) {
    if (!block->deep() && guide_deep_only && guidance > 0) {
      guidance = 0;
      rows_text = text;
    }
    Sequence z = guidance > 0 ? stacked(x, x) : x;
    BlockStats record;
    record.block = block->index();
    record.method = options.method;
    auto began = std::chrono::steady_clock::now();
    block->open(z.rows, h, w, block->text_conditioned() ? rows_text : nullptr);
    if (block->flip()) flip(z);
    x = options.method == "sequential" ? solve_sequential(*block, z, guidance, record)
                                       : solve_jacobi(*block, z, guidance, options.jacobi_for(block->deep()),
                                                      options.stop == "row", record);
    if (block->flip()) flip(x);
    if (x.rows != B) x = slice(x, 0, B, 0, x.length);
    record.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
    stats.push_back(std::move(record));
  }
  return unpatchify(x, patch, h, w);
}

}  // namespace starflow::native
