// Bad input through the C API: every case must come back as a status with a clear message.
//
// usage: starflow-tests GOOD_EXPORT BAD_EXPORTS
//   GOOD_EXPORT  a valid text-conditioned export (label table, latent range including 8x8)
//   BAD_EXPORTS  a folder of broken exports (prepared by tests/runtime/cpp/test_libstarflow.py), each holding
//                `expect.txt`: a phrase the load error must contain
// Exits 0 when every case passes; prints one line per case.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "starflow.h"

namespace {

int failures = 0;
std::vector<sf_tensor*> made;  // every tensor the cases create, freed at the end

// The call must fail with a message containing `phrase`.
void expect_error(const std::string& name, sf_status* status, const std::string& phrase) {
  if (!status) {
    std::printf("FAIL %s: succeeded, expected an error containing '%s'\n", name.c_str(), phrase.c_str());
    ++failures;
    return;
  }
  std::string message = sf_status_message(status);
  sf_status_free(status);
  bool ok = message.find(phrase) != std::string::npos;
  std::printf("%s %s: %s\n", ok ? "ok  " : "FAIL", name.c_str(), message.c_str());
  failures += !ok;
}

void expect_ok(const std::string& name, sf_status* status) {
  std::printf("%s %s%s%s\n", status ? "FAIL" : "ok  ", name.c_str(), status ? ": " : "",
              status ? sf_status_message(status) : "");
  failures += status != nullptr;
  sf_status_free(status);
}

sf_tensor* tensor(sf_dtype dtype, std::vector<int64_t> shape, float fill = 0.5f) {
  sf_tensor* t = nullptr;
  expect_ok("create tensor", sf_tensor_create(dtype, shape.data(), shape.size(), &t));
  if (t && dtype == SF_FLOAT32) {
    std::size_t n = 1;
    for (int64_t d : shape) n *= static_cast<std::size_t>(d);
    auto* data = static_cast<float*>(sf_tensor_data(t));
    for (std::size_t i = 0; i < n; ++i) data[i] = fill;
  }
  made.push_back(t);
  return t;
}

std::string read(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  std::string s = text.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s GOOD_EXPORT BAD_EXPORTS\n", argv[0]);
    return 2;
  }
  const std::string good = argv[1];

  // Before any library is loaded (one per process): a library that cannot be loaded.
  sf_config* config = nullptr;
  sf_pipeline* pipeline = nullptr;
  expect_ok("config", sf_config_create(&config));
  expect_ok("set library", sf_config_set_onnxruntime_library(config, "/nonexistent/libonnxruntime.so.1"));
  expect_error("missing ONNX Runtime library", sf_pipeline_load(good.c_str(), config, &pipeline),
               "cannot load the ONNX Runtime library");
  expect_ok("set library", sf_config_set_onnxruntime_library(config, "libm.so.6"));
  expect_error("not an ONNX Runtime library", sf_pipeline_load(good.c_str(), config, &pipeline),
               "is not an ONNX Runtime library");
  expect_ok("default library", sf_config_set_onnxruntime_library(config, nullptr));
  expect_ok("threads", sf_config_set_threads(config, 1));
  expect_error("negative threads", sf_config_set_threads(config, -1), "threads: must be 0");
  expect_error("unknown precision", sf_config_set_precision(config, "int8"), "expected 'fp32' or 'fp16'");
  expect_error("NULL directory", sf_pipeline_load(nullptr, config, &pipeline), "artifacts_dir is NULL");
  expect_error("no export", sf_pipeline_load("/nonexistent", config, &pipeline), "not a starflow export directory");

  // Broken exports prepared by the Python side.
  for (const auto& entry : std::filesystem::directory_iterator(argv[2])) {
    std::string phrase = read(entry.path() / "expect.txt");
    expect_error("export " + entry.path().filename().string(),
                 sf_pipeline_load(entry.path().c_str(), config, &pipeline), phrase);
    sf_pipeline_free(pipeline);
    pipeline = nullptr;
  }

  expect_ok("load", sf_pipeline_load(good.c_str(), config, &pipeline));
  if (!pipeline) return 1;
  sf_sampling* sampling = nullptr;
  expect_ok("sampling", sf_sampling_create(pipeline, &sampling));
  expect_ok("guidance 0", sf_sampling_set_guidance(sampling, 0));
  expect_error("block size 0", sf_sampling_set_block_size(sampling, 0), "block_size: must be an integer >= 1");
  expect_error("unknown method", sf_sampling_set_method(sampling, "euler"), "expected 'jacobi' or 'sequential'");
  expect_error("unknown stop rule", sf_sampling_set_stop(sampling, "column"),
               "stop: expected 'batch' or 'row', got 'column'");
  expect_error("NULL stop rule", sf_sampling_set_stop(sampling, nullptr), "sf_sampling_set_stop: rule is NULL");
  expect_ok("stop row", sf_sampling_set_stop(sampling, "row"));  // the sample below runs per-row stops
  expect_error("negative guidance", sf_sampling_set_guidance(sampling, -1), "guidance: must be a finite number");
  expect_error("NaN threshold", sf_sampling_set_threshold(sampling, std::nan("")), "threshold: must be a number >= 0");

  sf_tensor* text = nullptr;
  const char* prompts[] = {"3", "7"};
  expect_ok("encode", sf_pipeline_encode_prompts(pipeline, prompts, 2, &text));
  const char* unknown[] = {"cat"};
  sf_tensor* unused = nullptr;
  expect_error("unknown prompt", sf_pipeline_encode_prompts(pipeline, unknown, 1, &unused), "this model knows the prompts");
  sf_tensor *ids = nullptr, *mask = nullptr;
  expect_error("tokenize NULL pipeline", sf_pipeline_tokenize(nullptr, prompts, 2, &ids, &mask), "pipeline is NULL");
  expect_error("tokenize NULL prompts", sf_pipeline_tokenize(pipeline, nullptr, 2, &ids, &mask), "prompts is NULL");
  expect_error("tokenize NULL ids", sf_pipeline_tokenize(pipeline, prompts, 2, nullptr, &mask), "ids is NULL");
  expect_error("tokenize NULL mask", sf_pipeline_tokenize(pipeline, prompts, 2, &ids, nullptr), "mask is NULL");
  expect_error("tokenize no prompts", sf_pipeline_tokenize(pipeline, nullptr, 0, &ids, &mask), "pass at least one");
  const char* with_null[] = {"3", nullptr};  // NULL: the unconditional prompt
  expect_ok("tokenize", sf_pipeline_tokenize(pipeline, with_null, 2, &ids, &mask));
  if (ids && mask) {
    made.push_back(ids);
    made.push_back(mask);
    const auto* mask_of = static_cast<const int64_t*>(sf_tensor_data(mask));
    const int64_t length = sf_tensor_shape(mask)[1];
    bool ok = mask_of[0] == 1 && mask_of[length] == 0;  // "3": its label; "": padding only
    std::printf("%s tokenize masks\n", ok ? "ok  " : "FAIL");
    failures += !ok;
  }
  sf_tensor* latent = nullptr;
  sf_tensor* noise = tensor(SF_FLOAT32, {2, 1, 8, 8});
  expect_error("noise channels", sf_pipeline_sample(pipeline, sampling, tensor(SF_FLOAT32, {2, 3, 8, 8}), text, nullptr, &latent),
               "noise: expected a (B, 1, H, W) float32 latent array, got float32 (2, 3, 8, 8)");
  expect_error("noise rank", sf_pipeline_sample(pipeline, sampling, tensor(SF_FLOAT32, {2, 64}), text, nullptr, &latent),
               "got float32 (2, 64)");
  expect_error("noise dtype", sf_pipeline_sample(pipeline, sampling, tensor(SF_INT64, {2, 1, 8, 8}), text, nullptr, &latent),
               "got int64 (2, 1, 8, 8)");
  expect_error("grid outside the profile",
               sf_pipeline_sample(pipeline, sampling, tensor(SF_FLOAT32, {2, 1, 2, 2}), text, nullptr, &latent),
               "is outside this export's range");
  expect_error("NaN noise", sf_pipeline_sample(pipeline, sampling, tensor(SF_FLOAT32, {2, 1, 8, 8}, NAN), text, nullptr, &latent),
               "noise: contains NaN or inf");
  expect_error("text missing", sf_pipeline_sample(pipeline, sampling, noise, nullptr, nullptr, &latent),
               "this model is text-conditioned");
  expect_error("text batch", sf_pipeline_sample(pipeline, sampling, tensor(SF_FLOAT32, {3, 1, 8, 8}), text, nullptr, &latent),
               "y: expected float32 text embeddings of shape (3, L, ");
  expect_ok("guidance 1.5", sf_sampling_set_guidance(sampling, 1.5));
  expect_error("guidance without uncond text", sf_pipeline_sample(pipeline, sampling, noise, text, nullptr, &latent),
               "guidance > 0 needs y_uncond");
  expect_error("NULL noise", sf_pipeline_sample(pipeline, sampling, nullptr, text, nullptr, &latent), "noise is NULL");
  expect_ok("guidance 0", sf_sampling_set_guidance(sampling, 0));
  expect_error("too many rows", sf_pipeline_sample(pipeline, sampling, tensor(SF_FLOAT32, {64, 1, 8, 8}),
                                                   tensor(SF_FLOAT32, {64, 1, 32}), nullptr, &latent),
               "rows");
  expect_error("bad .npy", sf_tensor_load_npy(argv[0], &unused), "not a .npy file");
  expect_error("missing .npy", sf_tensor_load_npy("/nonexistent.npy", &unused), "cannot read");
  expect_ok("sample", sf_pipeline_sample(pipeline, sampling, noise, text, nullptr, &latent));
  expect_error("decode wrong channels", sf_pipeline_decode(pipeline, tensor(SF_FLOAT32, {1, 2, 8, 8}), &unused),
               "latent: expected a float32 (B, 1, H, W) batch");
  expect_error("save into a missing folder", sf_tensor_save_npy(latent, "/nonexistent/out.npy"), "cannot write");

  // Issue 29: token ids and masks in range, float32 settings, non-finite pixels, output targets.
  if (ids && mask) {
    auto* id = static_cast<int64_t*>(sf_tensor_data(ids));
    auto* on = static_cast<int64_t*>(sf_tensor_data(mask));
    const int64_t kept = id[0];
    id[0] = -1;  // ONNX Gather would wrap it to the last row: another token's embedding
    expect_error("negative token id", sf_pipeline_encode_tokens(pipeline, ids, mask, &unused),
                 "input_ids: -1 at (0, 0) is outside this text encoder's vocabulary [0, ");
    id[0] = kept;
    on[0] = 2;
    expect_error("mask not 0 or 1", sf_pipeline_encode_tokens(pipeline, ids, mask, &unused),
                 "attention_mask: 2 at (0, 0) is not 0 or 1");
    on[0] = 1;
  }
  expect_error("guidance past float32", sf_sampling_set_guidance(sampling, 1e39),
               "guidance: must be a finite number >= 0 within float32's range, got 1e+39");
  expect_error("threshold past float32", sf_sampling_set_threshold(sampling, 1e39), "within float32's range");
  expect_error("NaN pixels as a PNG", sf_image_save_png(tensor(SF_FLOAT32, {1, 2, 2, 1}, NAN), 0, "/tmp/never.png"),
               "4 pixel values that are NaN or inf, which a PNG cannot hold");
  expect_error("output over a device", sf_output_check("/dev/null", 0), "/dev/null: is a device or other special file");
  expect_error("output folder missing", sf_output_check("/nonexistent/x.npy", 0), "directory /nonexistent does not exist");
  expect_error("a file where a folder goes", sf_output_check(argv[0], 1), "is a file; expected a new name or a folder");
  expect_error("save over a device", sf_tensor_save_npy(latent, "/dev/null"), "is a device or other special file");
  char staged[8];
  expect_error("staging name too long", sf_output_stage_folder("/tmp/starflow-api-test", staged, sizeof staged),
               "capacity 8 is too small");

  // Likelihood: a status for every bad input, before any graph runs; a batch over the rows in parts.
  sf_tensor* bits = nullptr;
  expect_error("likelihood NULL latents", sf_pipeline_log_likelihood(pipeline, nullptr, text, &bits),
               "sf_pipeline_log_likelihood: latents is NULL");
  expect_error("likelihood NULL out", sf_pipeline_log_likelihood(pipeline, noise, text, nullptr), "bits is NULL");
  expect_error("likelihood without text", sf_pipeline_log_likelihood(pipeline, noise, nullptr, &bits),
               "y: this model is text-conditioned");
  expect_error("likelihood channels", sf_pipeline_log_likelihood(pipeline, tensor(SF_FLOAT32, {2, 3, 8, 8}), text, &bits),
               "latents: expected a (B, 1, H, W) float32 latent array, got float32 (2, 3, 8, 8)");
  expect_error("likelihood dtype", sf_pipeline_log_likelihood(pipeline, tensor(SF_INT64, {2, 1, 8, 8}), text, &bits),
               "got int64 (2, 1, 8, 8)");
  expect_error("likelihood NaN", sf_pipeline_log_likelihood(pipeline, tensor(SF_FLOAT32, {2, 1, 8, 8}, NAN), text, &bits),
               "latents: contains NaN or inf");
  expect_error("likelihood outside the range",
               sf_pipeline_log_likelihood(pipeline, tensor(SF_FLOAT32, {2, 1, 2, 2}), text, &bits),
               "latents: latent 2x2 is outside this export's range");
  expect_error("likelihood text rows", sf_pipeline_log_likelihood(pipeline, tensor(SF_FLOAT32, {40, 1, 8, 8}), text, &bits),
               "y: expected float32 text embeddings of shape (40, L, ");
  sf_tensor* many = tensor(SF_FLOAT32, {40, 1, 8, 8});
  sf_tensor* many_text = tensor(SF_FLOAT32, {40, 1, 32});  // the demo export's text width
  static_cast<float*>(sf_tensor_data(many))[40 * 64 - 1] = NAN;  // in the last part only: the whole is checked first
  expect_error("likelihood NaN in a later part", sf_pipeline_log_likelihood(pipeline, many, many_text, &bits),
               "latents: contains NaN or inf");
  static_cast<float*>(sf_tensor_data(many))[40 * 64 - 1] = 0.5f;
  expect_ok("likelihood in parts", sf_pipeline_log_likelihood(pipeline, many, many_text, &bits));
  if (bits) {
    const float* b = static_cast<const float*>(sf_tensor_data(bits));
    bool ok = sf_tensor_rank(bits) == 1 && sf_tensor_shape(bits)[0] == 40 && std::isfinite(b[0]) &&
              std::fabs(b[0] - b[39]) < 1e-5f;  // the same sample in the first and the last part
    std::printf("%s likelihood in parts: 40 finite bits per dim, equal rows equal\n", ok ? "ok  " : "FAIL");
    failures += !ok;
  }
  sf_tensor_free(bits);

  sf_tensor_free(latent);
  sf_tensor_free(text);
  for (sf_tensor* t : made) sf_tensor_free(t);
  sf_sampling_free(sampling);
  sf_pipeline_free(pipeline);
  sf_config_free(config);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
