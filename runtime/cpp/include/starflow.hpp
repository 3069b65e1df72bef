// libstarflow for C++: RAII owners over the C handles of starflow.h; failures throw starflow::Error.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "starflow.h"

namespace starflow {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws the status's message (and frees the status) when a call failed.
inline void check(sf_status* status) {
  if (!status) return;
  std::string message = sf_status_message(status);
  sf_status_free(status);
  throw Error(message);
}

template <typename T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* handle) const { Free(handle); }
};

class Tensor {
 public:
  explicit Tensor(sf_tensor* handle = nullptr) : handle_(handle) {}
  static Tensor zeros(sf_dtype dtype, const std::vector<int64_t>& shape) {
    sf_tensor* t = nullptr;
    check(sf_tensor_create(dtype, shape.data(), shape.size(), &t));
    return Tensor(t);
  }
  static Tensor load(const std::string& path) {
    sf_tensor* t = nullptr;
    check(sf_tensor_load_npy(path.c_str(), &t));
    return Tensor(t);
  }
  // numpy's default_rng(seed).standard_normal(shape, dtype=float32), as sf_tensor_noise.
  static Tensor noise(uint64_t seed, const std::vector<int64_t>& shape) {
    sf_tensor* t = nullptr;
    check(sf_tensor_noise(seed, shape.data(), shape.size(), &t));
    return Tensor(t);
  }
  void save(const std::string& path) const { check(sf_tensor_save_npy(get(), path.c_str())); }
  std::vector<int64_t> shape() const {
    const int64_t* s = sf_tensor_shape(get());
    return {s, s + sf_tensor_rank(get())};
  }
  sf_dtype dtype() const { return sf_tensor_dtype(get()); }
  float* f32() { return static_cast<float*>(sf_tensor_data(handle_.get())); }
  sf_tensor* get() const { return handle_.get(); }
  explicit operator bool() const { return handle_ != nullptr; }

 private:
  std::unique_ptr<sf_tensor, Deleter<sf_tensor, sf_tensor_free>> handle_;
};

class Config {
 public:
  Config() {
    sf_config* c = nullptr;
    check(sf_config_create(&c));
    handle_.reset(c);
  }
  Config& precision(const std::string& p) { return check(sf_config_set_precision(get(), p.c_str())), *this; }
  Config& threads(int n) { return check(sf_config_set_threads(get(), n)), *this; }
  Config& onnxruntime_library(const std::string& path) {
    return check(sf_config_set_onnxruntime_library(get(), path.c_str())), *this;
  }
  Config& provider(const std::string& name, const std::vector<std::string>& keys = {},
                   const std::vector<std::string>& values = {}) {
    std::vector<const char*> k, v;
    for (const auto& key : keys) k.push_back(key.c_str());
    for (const auto& value : values) v.push_back(value.c_str());
    if (k.size() != v.size()) throw Error("Config::provider: keys and values differ in length");
    return check(sf_config_add_provider(get(), name.c_str(), k.data(), v.data(), k.size())), *this;
  }
  sf_config* get() const { return handle_.get(); }

 private:
  std::unique_ptr<sf_config, Deleter<sf_config, sf_config_free>> handle_;
};

class Pipeline;

class Sampling {
 public:
  explicit Sampling(const Pipeline& pipeline, const std::string& preset = "official");
  Sampling& guidance(double w) { return check(sf_sampling_set_guidance(get(), w)), *this; }
  Sampling& method(const std::string& m) { return check(sf_sampling_set_method(get(), m.c_str())), *this; }
  Sampling& stop(const std::string& rule) { return check(sf_sampling_set_stop(get(), rule.c_str())), *this; }
  Sampling& block_size(int n) { return check(sf_sampling_set_block_size(get(), n)), *this; }
  Sampling& max_iter(int n) { return check(sf_sampling_set_max_iter(get(), n)), *this; }
  Sampling& threshold(double t) { return check(sf_sampling_set_threshold(get(), t)), *this; }
  Sampling& init(const std::string& first_guess) { return check(sf_sampling_set_init(get(), first_guess.c_str())), *this; }
  Sampling& shallow_jacobi(int block_size, int max_iter, double threshold, const std::string& first_guess) {
    return check(sf_sampling_set_shallow_jacobi(get(), block_size, max_iter, threshold, first_guess.c_str())), *this;
  }
  // frames 0: no limit; context 0: frames - 1 (sf_sampling_set_window)
  Sampling& window(int frames, int context = 0) { return check(sf_sampling_set_window(get(), frames, context)), *this; }
  Sampling& warm_start(bool on) { return check(sf_sampling_set_warm_start(get(), on)), *this; }
  Sampling& check_finite(bool on) { return check(sf_sampling_set_check_finite(get(), on)), *this; }
  sf_sampling* get() const { return handle_.get(); }

 private:
  std::unique_ptr<sf_sampling, Deleter<sf_sampling, sf_sampling_free>> handle_;
};

class Pipeline {
 public:
  explicit Pipeline(const std::string& artifacts_dir, const Config* config = nullptr) {
    sf_pipeline* p = nullptr;
    check(sf_pipeline_load(artifacts_dir.c_str(), config ? config->get() : nullptr, &p));
    handle_.reset(p);
  }
  Tensor sample(const Sampling& s, const Tensor& noise, const Tensor& text = Tensor(),
                const Tensor& text_uncond = Tensor()) {
    sf_tensor* out = nullptr;
    check(sf_pipeline_sample(get(), s.get(), noise.get(), text.get(), text_uncond.get(), &out));
    return Tensor(out);
  }
  Tensor encode(const std::vector<std::string>& prompts) {
    std::vector<const char*> p;
    for (const auto& prompt : prompts) p.push_back(prompt.c_str());
    sf_tensor* out = nullptr;
    check(sf_pipeline_encode_prompts(get(), p.data(), p.size(), &out));
    return Tensor(out);
  }
  // Prompts -> (token ids, attention mask), as sf_pipeline_tokenize.
  std::pair<Tensor, Tensor> tokenize(const std::vector<std::string>& prompts) {
    std::vector<const char*> p;
    for (const auto& prompt : prompts) p.push_back(prompt.c_str());
    sf_tensor *ids = nullptr, *mask = nullptr;
    check(sf_pipeline_tokenize(get(), p.data(), p.size(), &ids, &mask));
    return {Tensor(ids), Tensor(mask)};
  }
  Tensor denoise(const Tensor& latent, const Tensor& text = Tensor()) {
    sf_tensor* out = nullptr;
    check(sf_pipeline_denoise(get(), latent.get(), text.get(), &out));
    return Tensor(out);
  }
  Tensor decode(const Tensor& latent) {
    sf_tensor* out = nullptr;
    check(sf_pipeline_decode(get(), latent.get(), &out));
    return Tensor(out);
  }
  // Prompts -> images (clips), one per prompt with its row of noise; latents too when asked.
  Tensor generate(const Sampling& s, const std::vector<std::string>& prompts, const Tensor& noise,
                  const std::string& negative_prompt = "", bool denoise = true, Tensor* latents = nullptr) {
    std::vector<const char*> p;
    for (const auto& prompt : prompts) p.push_back(prompt.c_str());
    sf_tensor *images = nullptr, *latent = nullptr;
    check(sf_pipeline_generate(get(), s.get(), p.data(), p.size(), negative_prompt.c_str(), noise.get(), denoise,
                               &images, latents ? &latent : nullptr));
    Tensor owned(images);
    if (latents) *latents = Tensor(latent);
    return owned;
  }
  // Each sample's negative log-likelihood in bits per dimension (B,), as sf_pipeline_log_likelihood.
  Tensor log_likelihood(const Tensor& latents, const Tensor& text = Tensor()) {
    sf_tensor* out = nullptr;
    check(sf_pipeline_log_likelihood(get(), latents.get(), text.get(), &out));
    return Tensor(out);
  }
  std::string describe() const { return sf_pipeline_describe(get()); }
  std::string stats() const { return sf_pipeline_stats(get()); }
  void save_stats(const std::string& path) const { check(sf_pipeline_save_stats(get(), path.c_str())); }
  sf_pipeline* get() const { return handle_.get(); }

 private:
  std::unique_ptr<sf_pipeline, Deleter<sf_pipeline, sf_pipeline_free>> handle_;
};

inline Sampling::Sampling(const Pipeline& pipeline, const std::string& preset) {
  sf_sampling* s = nullptr;
  check(sf_sampling_create_preset(pipeline.get(), preset.c_str(), &s));
  handle_.reset(s);
}

}  // namespace starflow
