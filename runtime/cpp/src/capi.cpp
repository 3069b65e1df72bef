// The C API: opaque handles over the C++ objects; every exception becomes an sf_status.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <new>

#include "pipeline.hpp"
#include "random.hpp"
#include "starflow.h"

namespace native = starflow::native;

struct sf_status {
  std::string message;
};
struct sf_tensor {
  native::Tensor tensor;
};
struct sf_config {
  native::LoadSettings settings;
};
struct sf_pipeline {
  std::unique_ptr<native::Pipeline> pipeline;
  std::string description;
};
struct sf_sampling {
  native::Sampling sampling;
};

namespace {

sf_status out_of_memory{"out of memory"};  // returned when even the status cannot be allocated

sf_status* failure(const std::string& message) {
  try {
    return new sf_status{message};
  } catch (...) {
    return &out_of_memory;
  }
}

// Runs `body`, turning any exception into a status; checks that required pointers are given.
template <typename Body>
sf_status* guarded(const char* function, Body body) {
  try {
    body(function);
    return nullptr;
  } catch (const native::Error& err) {
    return failure(err.what());
  } catch (const std::bad_alloc&) {
    return failure(std::string(function) + ": out of memory");
  } catch (const std::exception& err) {
    return failure(std::string(function) + ": " + err.what());
  } catch (...) {
    return failure(std::string(function) + ": unknown error");
  }
}

void require(const void* pointer, const char* function, const char* name) {
  if (!pointer) throw native::Error(std::string(function) + ": " + name + " is NULL");
}

native::Shape shape_of(const int64_t* shape, size_t rank, const char* function) {
  if (rank && !shape) throw native::Error(std::string(function) + ": shape is NULL");
  if (rank > 8) throw native::Error(std::string(function) + ": rank " + std::to_string(rank) + " is over 8");
  return native::Shape(shape, shape + rank);
}

native::DType dtype_of(sf_dtype dtype) {
  if (dtype != SF_FLOAT32 && dtype != SF_FLOAT16 && dtype != SF_INT64)
    throw native::Error("sf_tensor_create: dtype " + std::to_string(static_cast<int>(dtype)) +
                          " is not SF_FLOAT32, SF_FLOAT16 or SF_INT64");
  return static_cast<native::DType>(dtype);
}

const native::Tensor* optional(const sf_tensor* t) { return t ? &t->tensor : nullptr; }

// `count` C strings as prompts; a NULL entry is the unconditional prompt "".
std::vector<std::string> prompt_list(const char* const* prompts, size_t count, const char* function) {
  if (count) require(prompts, function, "prompts");
  std::vector<std::string> list;
  for (size_t i = 0; i < count; ++i) list.emplace_back(prompts[i] ? prompts[i] : "");
  return list;
}

std::string text(const char* value, const char* function, const char* name) {
  require(value, function, name);
  return value;
}

// A sampling setter: `edit(copy, function)` a copy, check it, keep it only when it passes (the
// setter's name is passed on because a lambda's own __func__ is "operator()").
template <typename Edit>
sf_status* change(sf_sampling* s, const char* function, Edit edit) {
  return guarded(function, [&](const char* fn) {
    require(s, fn, "sampling");
    native::Sampling changed = s->sampling;
    edit(changed, fn);
    changed.check();
    s->sampling = changed;
  });
}

}  // namespace

extern "C" {

const char* sf_version(void) { return "0.1.0"; }

const char* sf_status_message(const sf_status* status) { return status ? status->message.c_str() : "ok"; }

void sf_status_free(sf_status* status) {
  if (status != &out_of_memory) delete status;
}

// ---- tensors ----
sf_status* sf_tensor_create(sf_dtype dtype, const int64_t* shape, size_t rank, sf_tensor** out) {
  return guarded(__func__, [&](const char* fn) {
    require(out, fn, "out");
    *out = new sf_tensor{native::Tensor(dtype_of(dtype), shape_of(shape, rank, fn))};
  });
}

sf_status* sf_tensor_load_npy(const char* path, sf_tensor** out) {
  return guarded(__func__, [&](const char* fn) {
    require(path, fn, "path");
    require(out, fn, "out");
    *out = new sf_tensor{native::load_npy(path)};
  });
}

sf_status* sf_tensor_save_npy(const sf_tensor* tensor, const char* path) {
  return guarded(__func__, [&](const char* fn) {
    require(tensor, fn, "tensor");
    require(path, fn, "path");
    native::save_npy(tensor->tensor, path);
  });
}

sf_status* sf_tensor_noise(uint64_t seed, const int64_t* shape, size_t rank, sf_tensor** out) {
  return guarded(__func__, [&](const char* fn) {
    require(out, fn, "out");
    *out = new sf_tensor{native::normal_noise(seed, shape_of(shape, rank, fn))};
  });
}

sf_dtype sf_tensor_dtype(const sf_tensor* t) { return t ? static_cast<sf_dtype>(t->tensor.dtype) : SF_FLOAT32; }
size_t sf_tensor_rank(const sf_tensor* t) { return t ? t->tensor.shape.size() : 0; }
const int64_t* sf_tensor_shape(const sf_tensor* t) { return t ? t->tensor.shape.data() : nullptr; }
void* sf_tensor_data(sf_tensor* t) { return t ? t->tensor.bytes.data() : nullptr; }
void sf_tensor_free(sf_tensor* t) { delete t; }

sf_status* sf_image_save_png(const sf_tensor* images, size_t index, const char* path) {
  return guarded(__func__, [&](const char* fn) {
    require(images, fn, "images");
    require(path, fn, "path");
    native::save_png(images->tensor, index, path);
  });
}

// ---- config ----
sf_status* sf_config_create(sf_config** out) {
  return guarded(__func__, [&](const char* fn) {
    require(out, fn, "out");
    *out = new sf_config{};
  });
}

sf_status* sf_config_set_precision(sf_config* config, const char* precision) {
  return guarded(__func__, [&](const char* fn) {
    require(config, fn, "config");
    require(precision, fn, "precision");
    std::string p = precision;
    if (p != "fp32" && p != "fp16") throw native::Error("precision: expected 'fp32' or 'fp16', got '" + p + "'");
    config->settings.precision = p;
  });
}

sf_status* sf_config_set_threads(sf_config* config, int threads) {
  return guarded(__func__, [&](const char* fn) {
    require(config, fn, "config");
    if (threads < 0 || threads > 1024)
      throw native::Error("threads: must be 0 (all cores) or 1 .. 1024, got " + std::to_string(threads));
    config->settings.session.threads = threads;
  });
}

sf_status* sf_config_set_onnxruntime_library(sf_config* config, const char* path) {
  return guarded(__func__, [&](const char* fn) {
    require(config, fn, "config");
    config->settings.onnxruntime_library = path ? path : "";
  });
}

sf_status* sf_config_add_provider(sf_config* config, const char* name, const char* const* keys,
                                  const char* const* values, size_t count) {
  return guarded(__func__, [&](const char* fn) {
    require(config, fn, "config");
    require(name, fn, "name");
    if (count && (!keys || !values)) throw native::Error("sf_config_add_provider: keys or values is NULL");
    native::Provider provider{name, {}, {}};
    for (size_t i = 0; i < count; ++i) {
      require(keys[i], fn, "a key");
      require(values[i], fn, "a value");
      provider.keys.emplace_back(keys[i]);
      provider.values.emplace_back(values[i]);
    }
    config->settings.session.providers.push_back(std::move(provider));
  });
}

void sf_config_free(sf_config* config) { delete config; }

// ---- pipeline ----
sf_status* sf_pipeline_load(const char* artifacts_dir, const sf_config* config, sf_pipeline** out) {
  return guarded(__func__, [&](const char* fn) {
    require(artifacts_dir, fn, "artifacts_dir");
    require(out, fn, "out");
    *out = nullptr;
    native::LoadSettings settings = config ? config->settings : native::LoadSettings{};
    auto pipeline = std::make_unique<native::Pipeline>(artifacts_dir, settings);
    std::string description = pipeline->describe();
    *out = new sf_pipeline{std::move(pipeline), std::move(description)};
  });
}

void sf_pipeline_free(sf_pipeline* pipeline) { delete pipeline; }

const char* sf_pipeline_describe(const sf_pipeline* pipeline) {
  return pipeline ? pipeline->description.c_str() : "{}";
}

const char* sf_pipeline_stats(const sf_pipeline* pipeline) {
  return pipeline ? pipeline->pipeline->stats().c_str() : "[]";
}

sf_status* sf_pipeline_save_stats(const sf_pipeline* pipeline, const char* path) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(path, fn, "path");
    native::write_atomically(path, pipeline->pipeline->stats());
  });
}

// ---- sampling options ----
sf_status* sf_sampling_create(const sf_pipeline* pipeline, sf_sampling** out) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(out, fn, "out");
    *out = new sf_sampling{pipeline->pipeline->defaults()};
  });
}

sf_status* sf_sampling_create_preset(const sf_pipeline* pipeline, const char* name, sf_sampling** out) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(name, fn, "name");
    require(out, fn, "out");
    *out = new sf_sampling{pipeline->pipeline->preset(name)};
  });
}

sf_status* sf_sampling_set_guidance(sf_sampling* s, double weight) {
  return change(s, __func__, [&](native::Sampling& x, const char*) { x.guidance = weight; });
}

sf_status* sf_sampling_set_method(sf_sampling* s, const char* method) {
  return change(s, __func__, [&](native::Sampling& x, const char* fn) { x.method = text(method, fn, "method"); });
}

sf_status* sf_sampling_set_stop(sf_sampling* s, const char* rule) {
  return change(s, __func__, [&](native::Sampling& x, const char* fn) { x.stop = text(rule, fn, "rule"); });
}

sf_status* sf_sampling_set_block_size(sf_sampling* s, int block_size) {
  return change(s, __func__, [&](native::Sampling& x, const char*) { x.jacobi.block_size = block_size; });
}

sf_status* sf_sampling_set_max_iter(sf_sampling* s, int max_iter) {
  return change(s, __func__, [&](native::Sampling& x, const char*) { x.jacobi.max_iter = max_iter; });
}

sf_status* sf_sampling_set_threshold(sf_sampling* s, double threshold) {
  return change(s, __func__, [&](native::Sampling& x, const char*) { x.jacobi.threshold = threshold; });
}

sf_status* sf_sampling_set_init(sf_sampling* s, const char* init) {
  return change(s, __func__, [&](native::Sampling& x, const char* fn) { x.jacobi.init = text(init, fn, "init"); });
}

sf_status* sf_sampling_set_shallow_jacobi(sf_sampling* s, int block_size, int max_iter, double threshold,
                                          const char* init) {
  return change(s, __func__, [&](native::Sampling& x, const char* fn) {
    x.shallow_jacobi = native::Jacobi{block_size, max_iter, threshold, text(init, fn, "init")};
  });
}

sf_status* sf_sampling_set_window(sf_sampling* s, int window, int context) {
  return change(s, __func__, [&](native::Sampling& x, const char*) {  // 0: none; Sampling::check refuses < 0
    x.window = window ? std::optional<int>(window) : std::nullopt;
    x.context = context ? std::optional<int>(context) : std::nullopt;
  });
}

sf_status* sf_sampling_set_warm_start(sf_sampling* s, int on) {
  return change(s, __func__, [&](native::Sampling& x, const char*) { x.warm_start = on != 0; });
}

sf_status* sf_sampling_set_check_finite(sf_sampling* s, int on) {
  return change(s, __func__, [&](native::Sampling& x, const char*) { x.check_finite = on != 0; });
}

void sf_sampling_free(sf_sampling* s) { delete s; }

// ---- outputs ----
sf_status* sf_output_check(const char* path, int folder) {
  return guarded(__func__, [&](const char* fn) {
    require(path, fn, "path");
    native::check_output(path, path, folder != 0);
  });
}

sf_status* sf_output_stage_folder(const char* path, char* staged, size_t capacity) {
  return guarded(__func__, [&](const char* fn) {
    require(path, fn, "path");
    require(staged, fn, "staged");
    const std::string folder = native::stage_folder(path, path);
    if (folder.size() >= capacity) {
      std::filesystem::remove(folder);
      throw native::Error(std::string(fn) + ": capacity " + std::to_string(capacity) + " is too small for '" + folder + "'");
    }
    std::memcpy(staged, folder.c_str(), folder.size() + 1);
  });
}

sf_status* sf_output_place_folder(const char* staged, const char* path) {
  return guarded(__func__, [&](const char* fn) {
    require(staged, fn, "staged");
    require(path, fn, "path");
    native::place_folder(staged, path, path);
  });
}

// ---- stages ----
sf_status* sf_pipeline_sample(sf_pipeline* pipeline, const sf_sampling* sampling, const sf_tensor* noise,
                              const sf_tensor* text, const sf_tensor* text_uncond, sf_tensor** latent) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(noise, fn, "noise");
    require(latent, fn, "latent");
    native::Sampling options = sampling ? sampling->sampling : pipeline->pipeline->defaults();
    *latent = new sf_tensor{pipeline->pipeline->sample(noise->tensor, optional(text), optional(text_uncond), options)};
  });
}

sf_status* sf_pipeline_encode_prompts(sf_pipeline* pipeline, const char* const* prompts, size_t count,
                                      sf_tensor** embeddings) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(embeddings, fn, "embeddings");
    std::vector<std::string> list = prompt_list(prompts, count, fn);
    *embeddings = new sf_tensor{pipeline->pipeline->encode_prompts(list)};
  });
}

sf_status* sf_pipeline_tokenize(sf_pipeline* pipeline, const char* const* prompts, size_t count, sf_tensor** ids,
                                sf_tensor** mask) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(ids, fn, "ids");
    require(mask, fn, "mask");
    std::vector<std::string> list = prompt_list(prompts, count, fn);
    auto [tokens, attention] = pipeline->pipeline->tokenize(list);
    auto owned_ids = std::make_unique<sf_tensor>(sf_tensor{std::move(tokens)});
    *mask = new sf_tensor{std::move(attention)};
    *ids = owned_ids.release();
  });
}

sf_status* sf_pipeline_encode_tokens(sf_pipeline* pipeline, const sf_tensor* ids, const sf_tensor* mask,
                                     sf_tensor** embeddings) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(ids, fn, "ids");
    require(mask, fn, "mask");
    require(embeddings, fn, "embeddings");
    *embeddings = new sf_tensor{pipeline->pipeline->encode_tokens(ids->tensor, mask->tensor)};
  });
}

sf_status* sf_pipeline_denoise(sf_pipeline* pipeline, const sf_tensor* latent, const sf_tensor* text, sf_tensor** out) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(latent, fn, "latent");
    require(out, fn, "out");
    *out = new sf_tensor{pipeline->pipeline->denoise(latent->tensor, optional(text))};
  });
}

sf_status* sf_pipeline_decode(sf_pipeline* pipeline, const sf_tensor* latent, sf_tensor** images) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(latent, fn, "latent");
    require(images, fn, "images");
    *images = new sf_tensor{pipeline->pipeline->decode(latent->tensor)};
  });
}

sf_status* sf_pipeline_generate(sf_pipeline* pipeline, const sf_sampling* sampling, const char* const* prompts,
                                size_t count, const char* negative_prompt, const sf_tensor* noise, int denoise,
                                sf_tensor** images, sf_tensor** latents) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(noise, fn, "noise");
    require(images, fn, "images");
    std::vector<std::string> list = prompt_list(prompts, count, fn);
    native::Sampling options = sampling ? sampling->sampling : pipeline->pipeline->defaults();
    native::Tensor latent;
    native::Tensor result = pipeline->pipeline->generate(list, negative_prompt ? negative_prompt : "",
                                                           noise->tensor, options, denoise != 0, &latent);
    auto* image_handle = new sf_tensor{std::move(result)};
    if (latents) {
      try {
        *latents = new sf_tensor{std::move(latent)};
      } catch (...) {
        delete image_handle;
        throw;
      }
    }
    *images = image_handle;
  });
}

sf_status* sf_pipeline_log_likelihood(sf_pipeline* pipeline, const sf_tensor* latents, const sf_tensor* text,
                                      sf_tensor** bits) {
  return guarded(__func__, [&](const char* fn) {
    require(pipeline, fn, "pipeline");
    require(latents, fn, "latents");
    require(bits, fn, "bits");
    *bits = new sf_tensor{pipeline->pipeline->log_likelihood(latents->tensor, optional(text))};
  });
}

}  // extern "C"
