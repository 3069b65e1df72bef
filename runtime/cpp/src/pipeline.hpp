// A loaded export: the flow blocks' graphs driven by the sampler, and the stages around it
// (text encoder, self-denoise, decoder), as starflow.runtime.Pipeline and Generator.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "manifest.hpp"
#include "ort.hpp"
#include "sampler.hpp"

namespace starflow::native {

struct LoadSettings {
  std::string precision = "fp32";
  std::string onnxruntime_library;  // empty: beside libstarflow
  SessionSettings session;
};

class DensityBlock;
class DensityGraphs;
class GraphBlock;
class Tokenizer;

class Pipeline {
 public:
  Pipeline(const std::string& directory, const LoadSettings& settings);
  ~Pipeline();

  const Manifest& manifest() const { return manifest_; }
  Sampling defaults() const;
  Sampling preset(const std::string& name) const;  // "official" (the defaults) or a manifest preset
  std::string describe() const;          // JSON
  const std::string& stats() const { return stats_; }  // JSON of the last sample call

  // noise (B, C, H, W) or clips (B, F, C, H, W) float32, text (B, L, dim) or null, text_uncond as
  // text or null -> latents of noise's shape.
  Tensor sample(const Tensor& noise, const Tensor* text, const Tensor* text_uncond, const Sampling& options);
  Tensor encode_prompts(const std::vector<std::string>& prompts);
  // Prompts -> the text encoder graph's (input_ids, attention_mask), int64 (B, token_length), as the
  // Python runtime's TextEncoderRunner.tokenize: label tables, or the export's SentencePiece model.
  std::pair<Tensor, Tensor> tokenize(const std::vector<std::string>& prompts) const;
  Tensor encode_tokens(const Tensor& ids, const Tensor& mask);
  // Generator.denoise: latents (B, C, H, W) one NLL-gradient step, or clips through a learned denoiser.
  Tensor denoise(const Tensor& latent, const Tensor* text);
  Tensor decode(const Tensor& latent);  // (N, H, W, C) in [0, 1]; clips (N, T, H, W, C)
  // Generator.generate: one image (clip) per prompt, its noise row; returns images, fills `latents`.
  Tensor generate(const std::vector<std::string>& prompts, const std::string& negative_prompt, const Tensor& noise,
                  const Sampling& options, bool denoise, Tensor* latents);
  // Generator.bits_per_dim: latents (B, C, H, W) or clips (B, F, C, H, W) float32, text (B, L, dim)
  // or null -> (B,) float32, each sample's negative log-likelihood in bits per latent dimension. Any
  // B: runs in batches the export's rows allow (Manifest::images_per_batch), the whole input checked
  // before any graph runs.
  Tensor log_likelihood(const Tensor& latents, const Tensor* text);

 private:
  // Everything a caller can get wrong, before any work; messages call the first array `name` (the
  // density direction's: latents).
  void check_inputs(const Tensor& noise, const Tensor* text, const Tensor* text_uncond, const Sampling& options,
                    const std::string& name = "noise") const;
  void check_frames(int64_t frames) const;
  void check_decoder(bool clips) const;
  void check_rows(int64_t batch, int64_t frames, double guidance, const std::string& name) const;
  Sampling with_clip_settings(Sampling sampling) const;
  Session& component(const std::string& graph);
  // The blocks' density-direction graphs in forward order (the reverse of sampling order): this
  // precision's, or with `gradient` the fp32 ones the self-denoise's gradient runs.
  std::vector<DensityBlock*> forward_blocks(bool gradient);

  Manifest manifest_;
  LoadSettings settings_;
  OrtLibrary* library_;
  std::vector<std::unique_ptr<GraphBlock>> blocks_;  // sampling order
  std::vector<std::unique_ptr<DensityGraphs>> fp32_density_;  // an fp16 pipeline's gradient graphs (sampling order)
  std::map<std::string, std::unique_ptr<Session>> components_;  // opened on first use
  std::map<std::string, int64_t> vocabulary_;  // label-table exports
  int64_t vocabulary_size_ = 0;                // token ids are in [0, this) (tokenizer.json's)
  std::unique_ptr<Tokenizer> tokenizer_;       // hf-encoder exports that carry a SentencePiece model
  std::string tokenizer_refused_;  // why it could not be built: thrown by tokenize, not by the load (ids still work)
  std::string stats_ = "[]";
};

}  // namespace starflow::native
