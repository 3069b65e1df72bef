// starflow-run: sample an export from the command line through libstarflow's C API.
//
// Latent mode: --noise N.npy [--text Y.npy --text-uncond Y0.npy] -> --out latent.npy
// Prompt mode: --prompt P ... [--num-images N --seed S | --noise N.npy] -> --out grid.png / folder / images.npy
//   (with --frames N: clips -> --out clips.npy / folder)
// Likelihood mode: --likelihood IMAGES.npy | --likelihood-latents L.npy [--prompt P ...] -> bits per dim [--out B.npy]
// Tokenize mode: --tokenize --prompt P ... -> --out ids.npy [--mask-out M.npy]
#include <algorithm>
#include <cctype>
#include <cfloat>
#include <charconv>
#include <climits>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "starflow.hpp"

namespace {

const char* kUsage = R"(usage: starflow-run --artifacts DIR --out OUT [options]

Samples a starflow export (the directory `starflow export onnx` writes) with libstarflow.

Latent mode (writes the sampled latent, (B, C, H, W) float32 .npy; clips (B, T, C, H, W)):
  --noise N.npy            prior noise, (B, C, H, W) float32; a video export's clips (B, T, C, H, W)
  --text Y.npy             text embeddings (B, L, dim) float32 (text-conditioned models)
  --text-uncond Y0.npy     the empty prompt's embeddings, as --text (needed when guidance > 0)
  --token-ids IDS.npy      instead of --text: int64 (B, token_length) ids for the text encoder graph,
  --attention-mask M.npy     with their mask (default: all ones)
  --uncond-token-ids U.npy   and the empty prompt's ids (mask: --uncond-attention-mask, default ones)

Prompt mode (label-table exports, e.g. the embedded digits model, and T5-family exports, which carry
their SentencePiece model; other subword tokenizers: pass --token-ids in latent mode; writes images):
  --prompt P               a prompt (repeat for more); "" is the unconditional prompt
  --num-images N           images per prompt (default 1)
  --seed S                 noise seed, 0 to 2**64-1 (default 0): the noise `starflow generate --seed S`
                           draws (numpy's default_rng(S)), so the same prompts give the same images
  --noise N.npy            instead of --seed: (prompts*N, C, H, W) float32 noise
  --negative-prompt P      the unconditional text under guidance (default "")
  --no-denoise             skip the self-denoise step (needed when the export has none)
  --latents-out L.npy      also write the latents
  --frames N               clips of N frames (video exports, within the export's frame range); with
                           --noise, its (prompts*N, T, C, H, W) clips give the frames
  OUT as `starflow generate --out`: a .png is one grid (N images per prompt a row, at most 8), a
  .npy the (N, H, W, C) float32 array in [0, 1], a folder (no suffix) one PNG per image; PNGs are
  upscaled (nearest) until an image's smaller side is at least 32 pixels. Clips: a .npy is the
  (N, T, H, W, C) float32 array in [0, 1] (`starflow generate --frames` writes uint8 0 .. 255), a
  folder one PNG per clip and frame named as
  `starflow generate --frames` names them (clip000_frame0000.png, ...; upscaled until the smaller
  side is at least 128 pixels); no grid .png (nor .gif/.mp4: use `starflow generate`)

Likelihood mode (each sample's negative log-likelihood in bits per dimension, as the Python runtime's
Generator.bits_per_dim and POST /v1/likelihood: printed, and with --out written as an (N,) float32 .npy):
  --likelihood IMAGES.npy  images (N, H, W, C) float32 in [0, 1] (a video export's clips (N, T, H, W, C)),
                           as prompt mode's --out x.npy (uint8 clips from `starflow generate`: divide by
                           255 first); pixel-space exports only (their latents are the images,
                           (N, C, H, W) * 2 - 1): a VAE export has no encoder here
  --likelihood-latents L.npy  instead: latents (N, C, H, W) float32 (clips (N, T, C, H, W)), any export
  --prompt P               text-conditioned models: one prompt per sample, in order; or --text Y.npy
                           (N, L, dim) embeddings, or --token-ids IDS.npy [--attention-mask M.npy]
  Batches of any size run in parts of the export's rows.

Tokenize mode (what the text encoder graph is fed: the ids and mask that --token-ids and
--attention-mask take, as the Python runtime's TextEncoderRunner.tokenize gives them):
  --tokenize               writes the --prompt P ... ids, int64 (N, token_length), to --out (.npy)
  --mask-out M.npy         and their attention mask
  The Python runtime's ids, except (rarely) where a character the normalizer maps is followed by
  combining marks or a zero-width joiner: tokenizers maps that grapheme cluster as a whole.

Sampling (default: the export's; the options below change the chosen settings):
  --sampler NAME           official (default) or a preset the export carries, e.g. fast
  --guidance G  --method jacobi|sequential  --block-size N  --max-iter N  --threshold T
  --init noise|chunk-mean  a Jacobi chunk's first guess (default noise, the official)
  --stop batch|row         when a Jacobi chunk stops: one test over the batch (default, the official)
                           or each row alone (an image is then the same in any batch)
  --shallow-jacobi B,M,T[,INIT]  the shallow blocks' own block size, max iterations, threshold
  --window W [--context C] clips: the deep block attends to at most W frames, then its cache restarts
                           from the last C frames (default W - 1), re-encoded (rolling; Jacobi only)
  --no-warm-start          clips: a chunk after the first frame starts from its noise, not the
                           tokens one frame earlier (the official warm start)

Running:
  --precision fp32|fp16    graph set (default fp32)
  --threads N              intra-op threads per graph (default: all cores)
  --onnxruntime PATH       libonnxruntime.so.1.* (default: the one beside libstarflow)
  --provider NAME[:k=v,...] an ONNX Runtime execution provider (CUDA, TensorRT, ...; built, not run)
  --stats FILE.json        per-block iterations, calls and seconds of the last sample call
  --repeat N               sample N times (latent mode), print each run's seconds (benchmarks)
  --no-check-finite        keep samples holding NaN or inf (default --check-finite: refused, nothing
                           written, as `starflow generate`; a PNG never holds them)
  --help

Every option is checked before the export is read: integers strictly (digits only) within their
range (--num-images, --block-size, --max-iter 1 .. 1048576; --threads 1 .. 1024; --repeat 1 .. 10000;
--frames, --window, --context 1 .. 65536; --seed 0 .. 2**64-1), numbers finite within float32's
range, and every output path (its folder exists and takes a file; the path is absent or a regular
file, never a symbolic link or a device). Outputs are written as libstarflow writes every file
(starflow.h: a hidden partial beside it, flushed, renamed); a folder of PNGs is made in a hidden
folder beside it, then renamed into place whole when --out does not exist, or its files moved one
by one into an existing --out folder.
)";

struct Arguments {
  std::map<std::string, std::string> values;
  std::vector<std::string> prompts;
  std::vector<std::string> providers;
  std::set<std::string> flags;
  bool has(const std::string& key) const { return values.count(key) > 0; }
  std::string get(const std::string& key, const std::string& fallback = "") const {
    auto found = values.find(key);
    return found == values.end() ? fallback : found->second;
  }
};

Arguments parse(int argc, char** argv) {
  static const std::set<std::string> valued = {
      "--artifacts", "--out", "--mask-out", "--noise", "--text", "--text-uncond", "--token-ids", "--attention-mask",
      "--uncond-token-ids", "--uncond-attention-mask", "--num-images", "--seed", "--negative-prompt",
      "--latents-out", "--guidance", "--method", "--block-size", "--max-iter", "--threshold", "--precision",
      "--threads", "--onnxruntime", "--stats", "--repeat", "--init", "--shallow-jacobi", "--sampler",
      "--stop", "--frames", "--window", "--context", "--likelihood", "--likelihood-latents"};
  static const std::set<std::string> switches = {"--tokenize",     "--no-denoise",       "--no-warm-start",
                                                 "--check-finite", "--no-check-finite", "--help"};
  Arguments args;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (switches.count(key)) {
      args.flags.insert(key);
      continue;
    }
    if (!valued.count(key) && key != "--prompt" && key != "--provider")
      throw starflow::Error("unknown option '" + key + "' (see --help)");
    if (i + 1 >= argc) throw starflow::Error("option " + key + " needs a value");
    std::string value = argv[++i];
    if (key == "--prompt") args.prompts.push_back(value);
    else if (key == "--provider") args.providers.push_back(value);
    else if (!args.values.emplace(key, value).second) throw starflow::Error("option " + key + " given twice");
  }
  return args;
}

// Every integer option's range: what the library takes, bounded where a larger value is a typo
// that would run for hours or allocate without end (never wrapped, truncated or clamped).
struct Bounds {
  long long low, high;
};
const std::map<std::string, Bounds> kIntegers = {
    {"--num-images", {1, 1 << 20}}, {"--block-size", {1, 1 << 20}}, {"--max-iter", {1, 1 << 20}},
    {"--threads", {1, 1024}},       {"--repeat", {1, 10000}},        {"--frames", {1, 1 << 16}},
    {"--window", {1, 1 << 16}},     {"--context", {1, 1 << 16}}};

// `text` as a decimal integer from `low` to `high`, strictly: digits and an optional leading '-' only.
template <typename T>
T parse_integer(const std::string& text, const std::string& name, T low, T high, const std::string& range = "") {
  T value{};
  const char* end = text.data() + text.size();
  auto [at, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || at != end || value < low || value > high)
    throw starflow::Error(name + ": expected an integer from " +
                          (range.empty() ? std::to_string(low) + " to " + std::to_string(high) : range) + ", got '" +
                          text + "'");
  return value;
}

// An integer option (kIntegers' range), or `fallback` when it is not given.
long long integer(const Arguments& args, const std::string& key, long long fallback) {
  if (!args.has(key)) return fallback;
  const Bounds& range = kIntegers.at(key);
  return parse_integer(args.get(key), key, range.low, range.high);
}

// --seed: 0 to 2**64-1, sf_tensor_noise's range (Python's `starflow generate` also takes larger
// seeds; those are refused here, not wrapped).
uint64_t parse_seed(const Arguments& args) {
  return parse_integer<uint64_t>(args.get("--seed", "0"), "--seed", 0, std::numeric_limits<uint64_t>::max(),
                                 "0 to 2**64-1 (18446744073709551615)");
}

// A number option: a finite decimal number within float32's range (the sampler computes in float32).
double number(const std::string& text, const std::string& name) {
  double value = 0;
  const char* end = text.data() + text.size();
  auto [at, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || at != end || !std::isfinite(value) || std::fabs(value) > FLT_MAX)
    throw starflow::Error(name + ": expected a finite number within float32's range (magnitude at most " +
                          "3.40282347e+38), got '" + text + "'");
  return value;
}

starflow::Tensor ones_like(const starflow::Tensor& ids) {
  starflow::Tensor mask = starflow::Tensor::zeros(SF_INT64, ids.shape());
  auto* data = static_cast<int64_t*>(sf_tensor_data(mask.get()));
  std::size_t n = 1;
  for (int64_t d : ids.shape()) n *= static_cast<std::size_t>(d);
  for (std::size_t i = 0; i < n; ++i) data[i] = 1;
  return mask;
}

starflow::Tensor encode_tokens(starflow::Pipeline& pipeline, const Arguments& args, const std::string& ids_key,
                               const std::string& mask_key) {
  starflow::Tensor ids = starflow::Tensor::load(args.get(ids_key));
  starflow::Tensor mask = args.has(mask_key) ? starflow::Tensor::load(args.get(mask_key)) : ones_like(ids);
  sf_tensor* out = nullptr;
  starflow::check(sf_pipeline_encode_tokens(pipeline.get(), ids.get(), mask.get(), &out));
  return starflow::Tensor(out);
}

// An output path, before any work: its folder exists and takes a new file, and it is absent or a
// regular file (`folder`: a folder); `flag` names it in the error.
void check_output(const std::string& flag, const std::string& path, bool folder = false) {
  sf_status* status = sf_output_check(path.c_str(), folder);
  if (!status) return;
  std::string message = sf_status_message(status);
  sf_status_free(status);
  throw starflow::Error(flag + " " + message);
}

void write_stats(const starflow::Pipeline& pipeline, const Arguments& args) {
  if (args.has("--stats")) pipeline.save_stats(args.get("--stats"));
}

bool ends_with(const std::string& text, const std::string& tail) {
  return text.size() >= tail.size() && text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
}

// What prompt mode writes for --out, as `starflow generate` (starflow.core.outputs.output_kind):
// "png" (a grid), "npy" or "dir" (one PNG per image); checked before the export is loaded.
std::string output_kind(const std::string& out) {
  namespace fs = std::filesystem;
  fs::path path(out);
  std::string suffix = path.extension().string();
  if (!suffix.empty() && suffix != ".png" && suffix != ".npy")
    throw starflow::Error("--out: prompt mode writes images to a .png (grid), a .npy (N, H, W, C) array or a "
                          "folder (one PNG per image), got '" + out + "'");
  std::error_code error;
  if (suffix.empty() && fs::exists(path, error) && !fs::is_directory(path, error))
    throw starflow::Error("--out " + out + ": exists and is not a folder");
  if (!suffix.empty() && fs::is_directory(path, error))
    throw starflow::Error("--out " + out + ": is a directory, expected a " + suffix + " file");
  fs::path parent = (path.has_filename() ? path : path.parent_path()).parent_path();  // "foxes/": ""
  if (!parent.empty() && !fs::is_directory(parent, error))
    throw starflow::Error("--out " + out + ": directory " + parent.string() + " does not exist");
  return suffix.empty() ? "dir" : suffix.substr(1);
}

// Images [first, first + count) of (N, H, W, C) (clips (N, T, H, W, C): their N*T frames) as one
// (1, H', W', C) picture, as `starflow generate` draws it: `columns` tiles a row with `pad` black
// pixels around each, then upscaled `scale` times (nearest).
starflow::Tensor mosaic(starflow::Tensor& images, int64_t first, int64_t count, int64_t columns, int64_t pad,
                        int64_t scale) {
  std::vector<int64_t> shape = images.shape();
  std::size_t rank = shape.size();
  int64_t h = shape[rank - 3], w = shape[rank - 2], c = shape[rank - 1], rows = (count + columns - 1) / columns;
  int64_t height = rows * (h + pad) + pad, width = columns * (w + pad) + pad;
  starflow::Tensor picture = starflow::Tensor::zeros(SF_FLOAT32, {1, height * scale, width * scale, c});
  const float* source = images.f32();
  float* target = picture.f32();
  for (int64_t y = 0; y < height * scale; ++y) {
    for (int64_t x = 0; x < width * scale; ++x) {
      int64_t gy = y / scale - pad, gx = x / scale - pad;  // inside the grid, past its first border
      if (gy < 0 || gx < 0 || gy % (h + pad) >= h || gx % (w + pad) >= w) continue;
      int64_t index = gy / (h + pad) * columns + gx / (w + pad);
      if (index >= count) continue;
      const float* pixel = source + (((first + index) * h + gy % (h + pad)) * w + gx % (w + pad)) * c;
      std::copy(pixel, pixel + c, target + (y * width * scale + x) * c);
    }
  }
  return picture;
}

// starflow.core.outputs.slug: a prompt as a file name part.
std::string slug(const std::string& prompt) {
  std::string text;
  bool gap = false;
  for (unsigned char ch : prompt) {
    bool plain = ch < 128 && std::isalnum(ch);
    if (plain && gap && !text.empty()) text += '-';
    if (plain) text += static_cast<char>(ch);
    gap = !plain;
  }
  text = text.substr(0, 40);
  return text.empty() ? "unconditional" : text;
}

// starflow.core.outputs.visible_scale: tiny images (8x8 digits) drawn at a visible size; clips'
// frames (outputs._video_scale) until their smaller side is at least 128 pixels.
int64_t image_scale(int64_t h, int64_t w) { return std::max<int64_t>(1, 32 / std::min(h, w)); }
int64_t frame_scale(int64_t h, int64_t w) { return (128 + std::min(h, w) - 1) / std::min(h, w); }

void save_png(starflow::Tensor& picture, const std::string& path) {
  starflow::check(sf_image_save_png(picture.get(), 0, path.c_str()));
}

starflow::Config make_config(const Arguments& args) {
  starflow::Config config;
  if (args.has("--precision")) config.precision(args.get("--precision"));
  config.threads(static_cast<int>(integer(args, "--threads", 0)));
  if (args.has("--onnxruntime")) config.onnxruntime_library(args.get("--onnxruntime"));
  for (const std::string& spec : args.providers) {
    std::string name = spec.substr(0, spec.find(':'));
    std::vector<std::string> keys, values;
    if (spec.find(':') != std::string::npos) {
      std::string rest = spec.substr(spec.find(':') + 1);
      for (std::size_t at = 0; at <= rest.size();) {
        std::size_t comma = rest.find(',', at);
        std::string pair = rest.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
        std::size_t equals = pair.find('=');
        if (equals == std::string::npos) throw starflow::Error("--provider " + spec + ": options are key=value");
        keys.push_back(pair.substr(0, equals));
        values.push_back(pair.substr(equals + 1));
        if (comma == std::string::npos) break;
        at = comma + 1;
      }
    }
    config.provider(name, keys, values);
  }
  return config;
}

// Likelihood mode: each sample's bits per dimension (sf_pipeline_log_likelihood), every option
// checked before the export loads.
int likelihood(const Arguments& args) {
  for (const char* key : {"--noise", "--text-uncond", "--uncond-token-ids", "--uncond-attention-mask", "--num-images",
                          "--seed", "--negative-prompt", "--latents-out", "--guidance", "--method", "--block-size",
                          "--max-iter", "--threshold", "--stats", "--repeat", "--init", "--shallow-jacobi", "--sampler",
                          "--stop", "--frames", "--window", "--context"})
    if (args.has(key)) throw starflow::Error(std::string(key) + " applies to sampling, not to --likelihood");
  for (const char* flag : {"--no-denoise", "--no-warm-start", "--check-finite", "--no-check-finite"})
    if (args.flags.count(flag)) throw starflow::Error(std::string(flag) + " applies to sampling, not to --likelihood");
  if (!args.has("--artifacts")) throw starflow::Error("missing --artifacts (see --help)");
  if (args.has("--likelihood") && args.has("--likelihood-latents"))
    throw starflow::Error("pass --likelihood IMAGES.npy or --likelihood-latents LATENTS.npy, not both");
  if (static_cast<int>(!args.prompts.empty()) + args.has("--text") + args.has("--token-ids") > 1)
    throw starflow::Error("give the text once: --prompt (one per sample), --text or --token-ids");
  if (args.has("--attention-mask") && !args.has("--token-ids"))
    throw starflow::Error("--attention-mask applies with --token-ids");
  const std::string out = args.get("--out");
  if (args.has("--out") && !ends_with(out, ".npy"))
    throw starflow::Error("--out: likelihood mode writes an (N,) float32 .npy file, got '" + out + "'");
  const bool images = args.has("--likelihood");
  const std::string input = images ? args.get("--likelihood") : args.get("--likelihood-latents");
  const std::string option = images ? "--likelihood" : "--likelihood-latents";
  starflow::Tensor x = starflow::Tensor::load(input);
  if (!args.prompts.empty() && (x.shape().empty() || static_cast<int64_t>(args.prompts.size()) != x.shape()[0]))
    throw starflow::Error("--prompt: give one per sample (" + std::to_string(x.shape().empty() ? 0 : x.shape()[0]) +
                          " in " + input + "), got " + std::to_string(args.prompts.size()));
  if (args.has("--out")) check_output("--out", out);

  starflow::Config config = make_config(args);
  starflow::Pipeline pipeline(args.get("--artifacts"), &config);
  nlohmann::json info = nlohmann::json::parse(pipeline.describe());
  const std::vector<int64_t> shape = x.shape();
  if (images) {  // starflow.core.outputs.from_unit_images: (N, [T,] H, W, C) in [0, 1] -> (N, [T,] C, H, W) in [-1, 1]
    if (info["decoder"] != "identity")
      throw starflow::Error(option + ": this export decodes its latents with a " + info["decoder"].get<std::string>() +
                            " decoder and carries no encoder to turn images into latents; pass its latents with "
                            "--likelihood-latents");
    const bool video = !info["video"].is_null();
    const std::size_t rank = video ? 5 : 4;
    const int64_t channels = info["channels"];
    std::string layout = video ? "(N, T, H, W, " : "(N, H, W, ";
    if (x.dtype() != SF_FLOAT32 || shape.size() != rank || shape.back() != channels) {
      std::string got;
      for (int64_t d : shape) got += (got.empty() ? "" : ", ") + std::to_string(d);
      throw starflow::Error(option + " " + input + ": expected float32 images " + layout + std::to_string(channels) +
                            ") in [0, 1] for this " + (video ? "video" : "image") + " export, got " +
                            (x.dtype() == SF_FLOAT32 ? "float32" : x.dtype() == SF_INT64 ? "int64" : "float16") + " (" +
                            got + (shape.size() == 1 ? ",)" : ")"));
    }
    std::vector<int64_t> latent_shape = shape;
    latent_shape.pop_back();
    latent_shape.insert(latent_shape.end() - 2, channels);
    starflow::Tensor latents = starflow::Tensor::zeros(SF_FLOAT32, latent_shape);
    const int64_t pixels = shape[rank - 3] * shape[rank - 2];
    int64_t count = 1;  // images, or clips' frames
    for (std::size_t d = 0; d + 3 < rank; ++d) count *= shape[d];
    const float* from = x.f32();
    float* to = latents.f32();
    for (int64_t n = 0; n < count; ++n)  // each image (each frame of a clip)
      for (int64_t i = 0; i < pixels; ++i)
        for (int64_t c = 0; c < channels; ++c)
          to[(n * channels + c) * pixels + i] = from[(n * pixels + i) * channels + c] * 2.0f - 1.0f;
    x = std::move(latents);
  }
  starflow::Tensor text;
  if (!args.prompts.empty()) {
    text = pipeline.encode(args.prompts);  // one per sample: checked before the load
  }
  if (args.has("--text")) text = starflow::Tensor::load(args.get("--text"));
  if (args.has("--token-ids")) text = encode_tokens(pipeline, args, "--token-ids", "--attention-mask");
  auto began = std::chrono::steady_clock::now();
  starflow::Tensor bits = pipeline.log_likelihood(x, text);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  if (args.has("--out")) bits.save(out);
  const float* b = bits.f32();
  const int64_t n = bits.shape()[0];
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += b[i];
    std::printf("%lld: %.6f bits/dim%s%s%s\n", static_cast<long long>(i), b[i], args.prompts.empty() ? "" : " (prompt '",
                args.prompts.empty() ? "" : args.prompts[i].c_str(), args.prompts.empty() ? "" : "')");
  }
  std::printf("mean %.6f bits/dim over %lld %s in %.2f s%s%s\n", total / static_cast<double>(n),
              static_cast<long long>(n), n == 1 ? "sample" : "samples", seconds, args.has("--out") ? " -> " : "",
              out.c_str());
  return 0;
}

// Tokenize mode: the prompts' token ids and attention mask (sf_pipeline_tokenize), as .npy files.
int tokenize(const Arguments& args) {
  for (const auto& [key, value] : args.values)
    if (key != "--artifacts" && key != "--out" && key != "--mask-out")
      throw starflow::Error(key + " does not apply to --tokenize");
  for (const std::string& flag : args.flags)
    if (flag != "--tokenize") throw starflow::Error(flag + " does not apply to --tokenize");
  if (!args.providers.empty()) throw starflow::Error("--provider does not apply to --tokenize");
  for (const char* key : {"--artifacts", "--out"})
    if (!args.has(key)) throw starflow::Error(std::string("missing ") + key + " (see --help)");
  if (args.prompts.empty()) throw starflow::Error("--tokenize: pass the prompts with --prompt P (repeat for more)");
  for (const char* key : {"--out", "--mask-out"})
    if (args.has(key) && !ends_with(args.get(key), ".npy"))
      throw starflow::Error(std::string(key) + ": tokenize mode writes an int64 .npy file, got '" + args.get(key) + "'");
  auto file = [&](const char* key) { return std::filesystem::weakly_canonical(std::filesystem::absolute(args.get(key))); };
  if (args.has("--mask-out") && file("--mask-out") == file("--out"))  // one file: the mask would replace the ids
    throw starflow::Error("--mask-out: '" + args.get("--mask-out") + "' is --out's file; name another");
  for (const char* key : {"--out", "--mask-out"})
    if (args.has(key)) check_output(key, args.get(key));
  starflow::Pipeline pipeline(args.get("--artifacts"));
  auto [ids, mask] = pipeline.tokenize(args.prompts);
  ids.save(args.get("--out"));
  if (args.has("--mask-out")) mask.save(args.get("--mask-out"));
  std::printf("tokenized %zu prompts -> %s%s%s\n", args.prompts.size(), args.get("--out").c_str(),
              args.has("--mask-out") ? ", " : "", args.get("--mask-out").c_str());
  return 0;
}

// PNGs written as starflow.core.outputs writes a folder: into a hidden sibling folder first
// (sf_output_stage_folder), so a failure (a full disk) leaves nothing in `out`; the caller places it
// (sf_output_place_folder: renamed whole when `out` does not exist, else its files moved into `out`
// one by one). `picture(i)` is the i-th file's name and picture; returns the staged folder.
std::string stage_pngs(const std::string& out, int64_t count,
                       const std::function<std::pair<std::string, starflow::Tensor>(int64_t)>& picture) {
  char staged[PATH_MAX];
  starflow::check(sf_output_stage_folder(out.c_str(), staged, sizeof staged));
  try {
    for (int64_t i = 0; i < count; ++i) {
      auto [name, image] = picture(i);
      save_png(image, (std::filesystem::path(staged) / name).string());
    }
  } catch (const std::exception& err) {
    std::error_code ignored;
    std::filesystem::remove_all(staged, ignored);
    std::string reason = err.what();  // the hidden folder's name means nothing to the caller
    for (std::size_t at; (at = reason.find(staged)) != std::string::npos;)
      reason.replace(at, std::strlen(staged), out);
    throw starflow::Error("--out " + out + ": nothing was written (" + reason + ")");
  }
  return staged;
}

// --shallow-jacobi BLOCK_SIZE,MAX_ITER,THRESHOLD[,INIT], each part checked as its own flag's.
struct JacobiSpec {
  int block_size, max_iter;
  double threshold;
  std::string init;
};

JacobiSpec shallow_jacobi(const std::string& spec) {
  std::vector<std::string> parts;
  for (std::size_t at = 0;;) {
    std::size_t comma = spec.find(',', at);
    parts.push_back(spec.substr(at, comma == std::string::npos ? std::string::npos : comma - at));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  if (parts.size() < 3 || parts.size() > 4)
    throw starflow::Error("--shallow-jacobi: expected BLOCK_SIZE,MAX_ITER,THRESHOLD[,INIT], got '" + spec + "'");
  const Bounds &block = kIntegers.at("--block-size"), &iterations = kIntegers.at("--max-iter");
  return {static_cast<int>(parse_integer(parts[0], "--shallow-jacobi block size", block.low, block.high)),
          static_cast<int>(parse_integer(parts[1], "--shallow-jacobi max_iter", iterations.low, iterations.high)),
          number(parts[2], "--shallow-jacobi threshold"), parts.size() == 4 ? parts[3] : "noise"};
}

// The images asked for fit in memory (their noise, latents and pictures, float32), checked before
// any list is built or noise drawn: the cost of a refusal does not grow with the count.
void check_memory(const Arguments& args, const nlohmann::json& info, long long per_prompt, long long frames) {
  const double images = static_cast<double>(args.prompts.size()) * static_cast<double>(per_prompt);
  const double each = 3.0 * 4.0 * static_cast<double>(frames) * info["channels"].get<double>() *
                      info["train"][0].get<double>() * info["train"][1].get<double>();
  const double needed = images * each, memory = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) *
                                                static_cast<double>(::sysconf(_SC_PAGE_SIZE));
  if (needed > memory) {
    char text[160];
    std::snprintf(text, sizeof text, "%.0f images need about %.1f GiB, more than this machine's %.1f GiB", images,
                  needed / (1 << 30), memory / (1 << 30));
    throw starflow::Error("--num-images " + std::to_string(per_prompt) + ": " + text);
  }
}

int run(const Arguments& args) {
  if (args.flags.count("--tokenize")) return tokenize(args);
  if (args.has("--mask-out")) throw starflow::Error("--mask-out applies to --tokenize");
  if (args.has("--likelihood") || args.has("--likelihood-latents")) return likelihood(args);
  for (const char* key : {"--artifacts", "--out"})
    if (!args.has(key)) throw starflow::Error(std::string("missing ") + key + " (see --help)");
  bool prompt_mode = !args.prompts.empty();
  if (!prompt_mode && !args.has("--noise"))
    throw starflow::Error("pass --noise N.npy (latent mode) or --prompt P (prompt mode); see --help");
  for (const char* key : {"--text", "--text-uncond", "--token-ids", "--uncond-token-ids", "--repeat"})
    if (prompt_mode && args.has(key)) throw starflow::Error(std::string(key) + " applies to latent mode, not --prompt");
  for (const char* key : {"--num-images", "--seed", "--negative-prompt", "--latents-out"})
    if (!prompt_mode && args.has(key)) throw starflow::Error(std::string(key) + " applies to --prompt mode");
  if (args.has("--text") && args.has("--token-ids"))
    throw starflow::Error("pass --text or --token-ids, not both");
  if (prompt_mode && args.has("--noise") && args.has("--seed")) throw starflow::Error("pass --noise or --seed, not both");
  if (!prompt_mode && args.has("--no-denoise")) throw starflow::Error("--no-denoise applies to --prompt mode");
  if (!prompt_mode && args.has("--frames"))
    throw starflow::Error("--frames applies to --prompt mode (latent mode takes the frames from --noise)");
  if (args.has("--context") && !args.has("--window")) throw starflow::Error("--context applies with --window W");
  std::string out = args.get("--out");
  if (!prompt_mode && !ends_with(out, ".npy"))
    throw starflow::Error("--out: latent mode writes a .npy file, got '" + out + "'");
  std::string kind = prompt_mode ? output_kind(out) : "npy";
  if (args.has("--latents-out") && !ends_with(args.get("--latents-out"), ".npy"))
    throw starflow::Error("--latents-out: writes a .npy file, got '" + args.get("--latents-out") + "'");
  if (args.flags.count("--check-finite") && args.flags.count("--no-check-finite"))
    throw starflow::Error("pass --check-finite or --no-check-finite, not both");
  long long frames = integer(args, "--frames", 0);  // 0: images (or --noise's clips)
  const char* clip_outs = "--out: clips are written to a .npy (N, T, H, W, C) array or a folder (one PNG per frame)";
  if (frames && kind == "png") throw starflow::Error(std::string(clip_outs) + ", got '" + out + "'");
  // every option and output path, before the export loads
  uint64_t seed = parse_seed(args);
  const long long block_size = integer(args, "--block-size", 0), max_iter = integer(args, "--max-iter", 0);
  const long long window = integer(args, "--window", 0), context = integer(args, "--context", 0);
  const long long per_prompt = integer(args, "--num-images", 1), repeat = integer(args, "--repeat", 1);
  std::optional<double> guidance, threshold;
  if (args.has("--guidance")) guidance = number(args.get("--guidance"), "--guidance");
  if (args.has("--threshold")) threshold = number(args.get("--threshold"), "--threshold");
  std::optional<JacobiSpec> shallow;
  if (args.has("--shallow-jacobi")) shallow = shallow_jacobi(args.get("--shallow-jacobi"));
  check_output("--out", out, kind == "dir");
  for (const char* key : {"--latents-out", "--stats"})
    if (args.has(key)) check_output(key, args.get(key));

  starflow::Config config = make_config(args);
  starflow::Pipeline pipeline(args.get("--artifacts"), &config);
  starflow::Sampling sampling(pipeline, args.get("--sampler", "official"));
  if (guidance) sampling.guidance(*guidance);
  if (args.has("--method")) sampling.method(args.get("--method"));
  if (args.has("--stop")) sampling.stop(args.get("--stop"));
  if (args.has("--block-size")) sampling.block_size(static_cast<int>(block_size));
  if (args.has("--max-iter")) sampling.max_iter(static_cast<int>(max_iter));
  if (threshold) sampling.threshold(*threshold);
  if (args.has("--init")) sampling.init(args.get("--init"));
  if (args.has("--window"))
    sampling.window(static_cast<int>(window), static_cast<int>(context));
  if (args.flags.count("--no-warm-start")) sampling.warm_start(false);
  if (shallow) sampling.shallow_jacobi(shallow->block_size, shallow->max_iter, shallow->threshold, shallow->init);
  if (args.flags.count("--no-check-finite")) sampling.check_finite(false);

  if (!prompt_mode) {
    starflow::Tensor noise = starflow::Tensor::load(args.get("--noise"));
    starflow::Tensor text, uncond;
    if (args.has("--text")) text = starflow::Tensor::load(args.get("--text"));
    if (args.has("--text-uncond")) uncond = starflow::Tensor::load(args.get("--text-uncond"));
    if (args.has("--token-ids")) text = encode_tokens(pipeline, args, "--token-ids", "--attention-mask");
    if (args.has("--uncond-token-ids"))
      uncond = encode_tokens(pipeline, args, "--uncond-token-ids", "--uncond-attention-mask");
    starflow::Tensor latent;
    double seconds = 0;
    for (long long i = 0; i < repeat; ++i) {
      auto began = std::chrono::steady_clock::now();
      latent = pipeline.sample(sampling, noise, text, uncond);
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
      if (args.has("--repeat")) std::printf("sample %lld: %.6f s\n", i + 1, seconds);
    }
    latent.save(out);
    write_stats(pipeline, args);
    std::string shape;
    for (int64_t d : latent.shape()) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    std::printf("sampled a (%s) latent -> %s in %.2f s\n", shape.c_str(), out.c_str(), seconds);
    return 0;
  }

  nlohmann::json info = nlohmann::json::parse(pipeline.describe());
  if (!args.flags.count("--no-denoise") && !info["denoise"].get<bool>())
    throw starflow::Error(args.get("--artifacts") +
                          ": this export has no self-denoise step (exported without it); pass --no-denoise, "
                          "or re-export with it");
  // clips or images, and the frame count, as the export describes them: before the noise is drawn
  const nlohmann::json& video = info["video"];
  if (frames && video.is_null())
    throw starflow::Error("frames: " + std::to_string(frames) + " asked of an image model; clips need a video model");
  if (!frames && !args.has("--noise") && !video.is_null())
    throw starflow::Error("this is a video model: ask for clips with frames=N (--frames N)");
  if (frames && (frames < video["frames"]["min"].get<long long>() || frames > video["frames"]["max"].get<long long>()))
    throw starflow::Error("frames: " + std::to_string(frames) + " frames is outside this export's range " +
                          video["frames"]["min"].dump() + " .. " + video["frames"]["max"].dump() +
                          " (re-export with max_frames to cover it)");
  check_memory(args, info, per_prompt, std::max<long long>(frames, 1));  // before the list of prompts is built
  std::vector<std::string> prompts;
  for (const std::string& p : args.prompts)
    for (long long i = 0; i < per_prompt; ++i) prompts.push_back(p);
  auto count = static_cast<int64_t>(prompts.size());
  std::vector<int64_t> noise_shape = {count, info["channels"], info["train"][0], info["train"][1]};
  if (frames) noise_shape.insert(noise_shape.begin() + 1, frames);
  starflow::Tensor noise = args.has("--noise") ? starflow::Tensor::load(args.get("--noise"))
                                               : starflow::Tensor::noise(seed, noise_shape);
  const bool clips = noise.shape().size() == 5;  // the frame count itself is the library's to check
  if (clips && kind == "png") throw starflow::Error(std::string(clip_outs) + ", got '" + out + "'");
  if (frames && clips && noise.shape()[1] != frames)
    throw starflow::Error("--frames " + std::to_string(frames) + ": the --noise clips have " +
                          std::to_string(noise.shape()[1]) + " frames");
  starflow::Tensor owned_latents(nullptr);
  auto began = std::chrono::steady_clock::now();
  starflow::Tensor owned_images = pipeline.generate(sampling, prompts, noise, args.get("--negative-prompt"),
                                                    !args.flags.count("--no-denoise"),
                                                    args.has("--latents-out") ? &owned_latents : nullptr);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  std::string where = out;
  std::vector<int64_t> shape = owned_images.shape();
  const int64_t h = shape[shape.size() - 3], w = shape[shape.size() - 2];
  // A folder's PNGs are made (staged) first, then the latents written, then the images put in place:
  // the likeliest failures (a full disk, NaN pixels) come before any file the user has is touched.
  // A failure after the latents removes them only when this run created them.
  std::string staged;
  if (kind == "dir" && clips) {  // one PNG per clip and frame, as starflow.core.outputs.write_video names them
    const int64_t T = shape[1];
    staged = stage_pngs(out, count * T, [&](int64_t i) {
      char name[64];
      std::snprintf(name, sizeof name, "clip%03lld_frame%04lld.png", static_cast<long long>(i / T),
                    static_cast<long long>(i % T));
      return std::make_pair(std::string(name), mosaic(owned_images, i, 1, 1, 0, frame_scale(h, w)));
    });
    where = out + (ends_with(out, "/") ? "" : "/") + " (" + std::to_string(count * T) + " PNGs)";
  } else if (kind == "dir") {
    staged = stage_pngs(out, count, [&](int64_t i) {
      char number[24];
      std::snprintf(number, sizeof number, "%04lld-", static_cast<long long>(i));
      return std::make_pair(number + slug(prompts[i]) + ".png", mosaic(owned_images, i, 1, 1, 0, image_scale(h, w)));
    });
    where = out + (ends_with(out, "/") ? "" : "/") + " (" + std::to_string(count) + (count == 1 ? " PNG)" : " PNGs)");
  }
  const std::string latents_out = args.get("--latents-out");
  std::error_code ignored;
  const bool latents_there = owned_latents && std::filesystem::symlink_status(latents_out, ignored).type() !=
                                                  std::filesystem::file_type::not_found;
  try {
    if (owned_latents) owned_latents.save(latents_out);
  } catch (...) {
    if (!staged.empty()) std::filesystem::remove_all(staged, ignored);
    throw;
  }
  try {
    if (kind == "npy") {
      owned_images.save(out);
    } else if (kind == "png") {
      starflow::Tensor grid = mosaic(owned_images, 0, count, std::min<long long>(per_prompt, 8), 1, image_scale(h, w));
      save_png(grid, out);
    } else {
      starflow::check(sf_output_place_folder(staged.c_str(), out.c_str()));
    }
  } catch (...) {
    if (owned_latents && !latents_there) std::filesystem::remove(latents_out, ignored);
    throw;
  }
  write_stats(pipeline, args);
  std::string what = count == 1 ? "image" : "images", unit = "images";
  if (clips) {
    what = (count == 1 ? "clip of " : "clips of ") + std::to_string(shape[1]) + " frames";
    unit = "clips";
  }
  std::printf("generated %lld %s %lldx%lld -> %s in %.2f s (%.1f %s/s)\n", static_cast<long long>(count),
              what.c_str(), static_cast<long long>(h), static_cast<long long>(w), where.c_str(), seconds,
              static_cast<double>(count) / std::max(seconds, 1e-9), unit.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Arguments args = parse(argc, argv);
    if (args.flags.count("--help") || argc == 1) {
      std::fputs(kUsage, argc == 1 ? stderr : stdout);
      return argc == 1 ? 2 : 0;
    }
    return run(args);
  } catch (const std::exception& err) {
    std::fprintf(stderr, "starflow-run: error: %s\n", err.what());
    return 1;
  }
}
