// Concurrent pipelines: the promise in starflow.h ("different pipelines may be used from different
// threads at the same time"), checked for results and, in the ThreadSanitizer build (`make
// cpp-tsan`), for data races.
//
// usage: starflow-threads-test ARTIFACTS [THREADS] [ROUNDS]
// Each thread loads its own pipeline of ARTIFACTS (the loads overlap, so the one ONNX Runtime
// library is loaded under contention) and generates ROUNDS batches from its own seeds; every
// batch must equal, bit for bit, the same batch generated alone beforehand. One intra-op thread
// per graph, so the numbers do not depend on how the work is split. Exits 0 when all are equal.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "starflow.hpp"

namespace {

struct Job {
  uint64_t seed;
  std::vector<float> images;  // what the job generated
  std::string error;
};

// Two prompts the export knows: its first two classes, a free prompt for a subword encoder, or
// the unconditional "" for an unconditional model.
std::vector<std::string> prompts_for(const starflow::Pipeline& pipeline) {
  nlohmann::json about = nlohmann::json::parse(pipeline.describe());
  if (about["text_dim"].get<int>() == 0) return {"", ""};
  if (about["classes"].is_array() && about["classes"].size() >= 2)
    return {about["classes"][0].get<std::string>(), about["classes"][1].get<std::string>()};
  return {"a red car", "a small house"};
}

// One batch (of clips, for a video export) from `seed`: the export's official settings, the
// per-row stop rule, self-denoise when the export has its graph; the images as a flat copy.
std::vector<float> generate(starflow::Pipeline& pipeline, uint64_t seed) {
  nlohmann::json about = nlohmann::json::parse(pipeline.describe());
  std::vector<std::string> prompts = prompts_for(pipeline);
  std::vector<const char*> text;
  for (const std::string& p : prompts) text.push_back(p.c_str());
  std::vector<int64_t> shape = {static_cast<int64_t>(prompts.size()), about["channels"].get<int64_t>(),
                                about["train"][0].get<int64_t>(), about["train"][1].get<int64_t>()};
  if (!about["video"].is_null())  // a video export's clips: (B, T, C, H, W), a few frames
    shape.insert(shape.begin() + 1, std::min<int64_t>(4, about["video"]["frames"]["max"].get<int64_t>()));
  starflow::Tensor noise = starflow::Tensor::noise(seed, shape);
  starflow::Sampling sampling(pipeline);
  sampling.stop("row");
  sf_tensor* images = nullptr;
  starflow::check(sf_pipeline_generate(pipeline.get(), sampling.get(), text.data(), text.size(), "", noise.get(),
                                       about["denoise"].get<bool>(), &images, nullptr));
  starflow::Tensor owned(images);
  std::size_t count = 1;
  for (int64_t d : owned.shape()) count *= static_cast<std::size_t>(d);
  return {owned.f32(), owned.f32() + count};
}

starflow::Config one_thread_per_graph() {
  starflow::Config config;
  config.threads(1);
  return config;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 4) {
    std::fprintf(stderr, "usage: %s ARTIFACTS [THREADS] [ROUNDS]\n", argv[0]);
    return 2;
  }
  const std::string artifacts = argv[1];
  const int threads = argc > 2 ? std::atoi(argv[2]) : 4, rounds = argc > 3 ? std::atoi(argv[3]) : 2;
  if (threads < 1 || rounds < 1) {
    std::fprintf(stderr, "THREADS and ROUNDS must be integers >= 1\n");
    return 2;
  }
  std::vector<std::vector<Job>> jobs(threads);
  for (int t = 0; t < threads; ++t)
    for (int r = 0; r < rounds; ++r) jobs[t].push_back({static_cast<uint64_t>(100 * t + r), {}, {}});

  std::vector<std::vector<std::vector<float>>> alone(threads);
  try {
    starflow::Config config = one_thread_per_graph();
    starflow::Pipeline pipeline(artifacts, &config);
    for (int t = 0; t < threads; ++t)
      for (const Job& job : jobs[t]) alone[t].push_back(generate(pipeline, job.seed));
  } catch (const starflow::Error& err) {
    std::fprintf(stderr, "alone: %s\n", err.what());
    return 1;
  }

  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&artifacts, &jobs, t] {
      try {
        starflow::Config config = one_thread_per_graph();
        starflow::Pipeline pipeline(artifacts, &config);
        for (Job& job : jobs[t]) job.images = generate(pipeline, job.seed);
      } catch (const starflow::Error& err) {
        for (Job& job : jobs[t]) job.error = err.what();
      }
    });
  for (std::thread& worker : workers) worker.join();

  int failures = 0;
  for (int t = 0; t < threads; ++t)
    for (int r = 0; r < rounds; ++r) {
      const Job& job = jobs[t][r];
      bool same = job.error.empty() && job.images == alone[t][r];
      std::printf("%s thread %d seed %llu%s%s\n", same ? "ok  " : "FAIL", t, static_cast<unsigned long long>(job.seed),
                  job.error.empty() ? (same ? "" : ": differs from the batch generated alone") : ": ",
                  job.error.c_str());
      failures += !same;
    }
  std::printf("%s: %d thread(s) x %d round(s), %d failure(s)\n", failures ? "FAILED" : "passed", threads, rounds,
              failures);
  return failures ? 1 : 0;
}
