// The export's graphs behind the sampler and the generator's stages.
#include "pipeline.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <functional>

#include <nlohmann/json.hpp>

#include "bounded.hpp"
#include "density.hpp"
#include "tokenizer.hpp"

namespace starflow::native {
namespace {

using json = nlohmann::json;

Sequence as_sequence(const Tensor& t) {
  Sequence s(t.shape[0], t.shape[1], t.shape[2]);
  std::memcpy(s.data.data(), t.f32(), t.bytes.size());
  return s;
}

// A token's id in tokenizer.json (`path`): 0 .. INT32_MAX, as the tokenizers library keeps them (u32,
// and an encoder's ids are int32 or int64), so the vocabulary's size never overflows.
int64_t token_id(const json& id, const std::string& token, const std::string& path) {
  const int64_t value = id.get<int64_t>();
  if (value < 0 || value > INT32_MAX)
    throw Error(path + ": token " + quoted(token) + " has id " + std::to_string(value) + "; expected an id from 0 to " +
                std::to_string(INT32_MAX));
  return value;
}

// The ids a tokenizer.json (`path`) gives, [0, size): its model's vocabulary (an object of ids, or
// Unigram's list of pieces) and its added tokens.
int64_t vocabulary_size(const json& tokenizer, const std::string& path) {
  const json& vocab = tokenizer.at("model").at("vocab");
  int64_t size = vocab.is_array() ? static_cast<int64_t>(vocab.size()) : 0;
  if (vocab.is_object())
    for (const auto& [token, id] : vocab.items()) size = std::max(size, token_id(id, token, path) + 1);
  if (tokenizer.contains("added_tokens"))
    for (const json& added : tokenizer.at("added_tokens"))
      size = std::max(size, token_id(added.at("id"), added.value("content", ""), path) + 1);
  return size;
}

void check_finite(const Tensor& t, const std::string& name) {
  const float* v = t.f32();
  for (std::size_t i = 0; i < t.size(); ++i)
    if (!std::isfinite(v[i])) throw Error(name + ": contains NaN or inf values; the sample would be NaN");
}

// Sampling::check_finite: as `starflow generate --check-finite` (the message is the Python one's).
void check_finite_output(const Tensor& t) {
  const float* v = t.f32();
  if (!std::all_of(v, v + t.size(), [](float x) { return std::isfinite(x); }))
    throw Error("the sampled latents or images contain NaN or inf: the model overflowed on these inputs "
                "(nothing was written)");
}

void check_float32(const Tensor& t, const std::string& name) {
  if (t.dtype != DType::f32) throw Error(name + ": expected float32, got " + dtype_name(t.dtype));
}

// Rows [first, first + count) of a tensor's leading dimension.
Tensor rows_of(const Tensor& t, int64_t first, int64_t count) {
  Shape shape = t.shape;
  shape[0] = count;
  Tensor out(t.dtype, shape);
  std::size_t row = t.bytes.size() / static_cast<std::size_t>(t.shape[0]);
  std::memcpy(out.bytes.data(), t.bytes.data() + first * row, count * row);
  return out;
}

Tensor concat_rows(const std::vector<Tensor>& parts) {
  Shape shape = parts.front().shape;
  shape[0] = 0;
  for (const Tensor& p : parts) shape[0] += p.shape[0];
  Tensor out(parts.front().dtype, shape);
  std::size_t at = 0;
  for (const Tensor& p : parts) {
    std::memcpy(out.bytes.data() + at, p.bytes.data(), p.bytes.size());
    at += p.bytes.size();
  }
  return out;
}

// Output `name` of `session` must have this dtype and shape (the message is built only on failure:
// this runs on every step call).
void expect_output(const Output& out, DType dtype, const Shape& shape, const Session& session, const char* name) {
  if (out.dtype() != dtype || out.shape() != shape)
    throw Error("graph " + session.name() + " output " + name + ": the graph gave " + dtype_name(out.dtype()) + " " + shape_text(out.shape()) + ", expected " +
                dtype_name(dtype) + " " + shape_text(shape));
}

}  // namespace

using OpenGraph = std::function<std::unique_ptr<Session>(const std::string& kind)>;

// One exported block's density-direction graphs of one precision, each session opened by `open` on
// first use and kept, as the Python GraphBlock's runners: forward (likelihoods, and the gradient's
// density pass) and vjp (the self-denoise's gradient).
class DensityGraphs : public DensityBlock {
 public:
  DensityGraphs(const BlockEntry& entry, OpenGraph open) : entry_(entry), open_(std::move(open)) {}

  bool flip() const override { return entry_.flip; }
  bool flip_in_frame() const override { return entry_.flip_in_frame; }
  bool frame_local() const override { return entry_.frame_local; }
  bool text_conditioned() const override { return entry_.text_conditioned; }

  void open_forward() {
    if (!forward_) forward_ = open_("forward");
  }

  void density(const Sequence& x, int64_t h, int64_t w, const Sequence* text, Sequence& z,
               Sequence& logdet) override {
    open_forward();
    const int64_t grid[2] = {h, w};
    std::vector<Feed> feeds = {{"x", DType::f32, {x.rows, x.length, x.dim}, x.data.data()},
                               {"grid", DType::i64, {2}, grid}};
    if (text) feeds.push_back({"text", DType::f32, {text->rows, text->length, text->dim}, text->data.data()});
    auto out = forward_->run(feeds);
    for (auto [output, target] : {std::pair{"z", &z}, {"logdet", &logdet}}) {
      const Output& o = out[forward_->index_of(output)];
      expect_output(o, DType::f32, {x.rows, x.length, x.dim}, *forward_, output);
      target->rows = x.rows, target->length = x.length, target->dim = x.dim;
      target->data.assign(o.f32(), o.f32() + x.data.size());
    }
  }

  void vjp(const Sequence& x, int64_t h, int64_t w, const Sequence& grad_z, const Sequence* text,
           Sequence& grad_x) override {
    if (!vjp_) vjp_ = open_("vjp");
    const int64_t grid[2] = {h, w};
    const Shape shape = {x.rows, x.length, x.dim};
    std::vector<Feed> feeds = {{"x", DType::f32, shape, x.data.data()},
                               {"grid", DType::i64, {2}, grid},
                               {"grad_z", DType::f32, shape, grad_z.data.data()}};
    if (text) feeds.push_back({"text", DType::f32, {text->rows, text->length, text->dim}, text->data.data()});
    auto out = vjp_->run(feeds);
    const Output& o = out[vjp_->index_of("grad_x")];
    expect_output(o, DType::f32, shape, *vjp_, "grad_x");
    grad_x.rows = x.rows, grad_x.length = x.length, grad_x.dim = x.dim;
    grad_x.data.assign(o.f32(), o.f32() + x.data.size());
  }

 private:
  const BlockEntry& entry_;
  OpenGraph open_;
  std::unique_ptr<Session> forward_, vjp_;
};

// One exported flow block: its step (and prefill) session, a key/value cache per batch size, and its
// density-direction graphs of the same precision.
class GraphBlock : public SamplerBlock {
 public:
  GraphBlock(const BlockEntry& entry, std::unique_ptr<Session> step, std::unique_ptr<Session> prefill, DType cache,
             OpenGraph open_density)
      : entry_(entry), step_(std::move(step)), prefill_(std::move(prefill)), cache_dtype_(cache),
        density_(entry, std::move(open_density)) {}

  DensityGraphs& density() { return density_; }

  int index() const override { return entry_.index; }
  bool deep() const override { return entry_.deep; }
  bool flip() const override { return entry_.flip; }
  bool flip_in_frame() const override { return entry_.flip_in_frame; }
  bool frame_local() const override { return entry_.frame_local; }
  bool text_conditioned() const override { return entry_.text_conditioned; }
  const std::vector<float>& sos() const override { return entry_.sos; }

  // grid (h, w) is one frame's, as the Python GraphBlock feeds it: a clip's step graph places its
  // positions in frames from it and `start`.
  void open(int64_t rows, int64_t h, int64_t w, const Sequence* text, int64_t tokens) override {
    rows_ = rows;
    text_length_ = text ? text->length : 0;
    length_ = text_length_ + tokens;
    grid_[0] = h;
    grid_[1] = w;
    auto& cache = caches_[{rows, length_}];  // allocated once per size, reused by later calls
    if (cache.first.empty()) {
      Tensor zeros(cache_dtype_, cache_shape(length_));
      cache = {zeros.bytes, zeros.bytes};
    }
    keys_ = cache.first.data();
    values_ = cache.second.data();
    if (text) {
      auto out = prefill_->run({{"text", DType::f32, {text->rows, text->length, text->dim}, text->data.data()}});
      for (const char* name : {"keys", "values"}) {
        const Output& o = out[prefill_->index_of(name)];
        expect_output(o, cache_dtype_, cache_shape(text_length_), *prefill_, name);
        scatter(std::strcmp(name, "keys") == 0 ? keys_ : values_, o.data(), 0, text_length_);
      }
    }
  }

  void step(const Sequence& x, int64_t start, Sequence& mu, Sequence& sigma) override {
    const int64_t past = text_length_ + start, c = x.length;
    if (past + c > length_)  // the sampler sizes the cache; this guards its bookkeeping
      throw Error("block " + std::to_string(entry_.index) + ": cache overflow: " + std::to_string(past + c) +
                  " positions in a cache of " + std::to_string(length_));
    gather(keys_, past_keys_, past);
    gather(values_, past_values_, past);
    int64_t position = start;
    auto out = step_->run({
        {"x", DType::f32, {x.rows, c, x.dim}, x.data.data()},
        {"past_keys", cache_dtype_, cache_shape(past), past_keys_.data()},
        {"past_values", cache_dtype_, cache_shape(past), past_values_.data()},
        {"grid", DType::i64, {2}, grid_},
        {"start", DType::i64, {}, &position},
    });
    for (auto [output, target] : {std::pair{"mu", &mu}, {"sigma", &sigma}}) {
      const Output& o = out[step_->index_of(output)];
      expect_output(o, DType::f32, {x.rows, c, x.dim}, *step_, output);
      target->rows = x.rows, target->length = c, target->dim = x.dim;
      target->data.assign(o.f32(), o.f32() + x.rows * c * x.dim);  // reuses the caller's buffer
    }
    for (const char* output : {"new_keys", "new_values"}) {
      const Output& o = out[step_->index_of(output)];
      expect_output(o, cache_dtype_, cache_shape(c), *step_, output);
      scatter(std::strcmp(output, "new_keys") == 0 ? keys_ : values_, o.data(), past, c);
    }
  }

 private:
  Shape cache_shape(int64_t positions) const {
    return {entry_.layers, rows_, entry_.kv_heads, positions, entry_.head_dim};
  }
  // The cache is (layers, rows, kv_heads, length, head_dim): a graph's (..., n, head_dim) tensor
  // goes to positions [at, at + n) of every (layer, row, head), and the first `past` come out.
  std::size_t lanes() const { return static_cast<std::size_t>(entry_.layers * rows_ * entry_.kv_heads); }
  std::size_t position_bytes() const { return entry_.head_dim * itemsize(cache_dtype_); }
  void scatter(unsigned char* cache, const void* source, int64_t at, int64_t n) const {
    auto* from = static_cast<const unsigned char*>(source);
    const std::size_t p = position_bytes();
    for (std::size_t lane = 0; lane < lanes(); ++lane)
      std::memcpy(cache + (lane * length_ + at) * p, from + lane * n * p, n * p);
  }
  void gather(const unsigned char* cache, std::vector<unsigned char>& out, int64_t past) const {
    const std::size_t p = position_bytes();
    out.resize(std::max<std::size_t>(lanes() * past * p, 1));
    for (std::size_t lane = 0; lane < lanes(); ++lane)
      std::memcpy(out.data() + lane * past * p, cache + lane * length_ * p, past * p);
  }

  const BlockEntry& entry_;
  std::unique_ptr<Session> step_, prefill_;
  DType cache_dtype_;
  std::map<std::pair<int64_t, int64_t>, std::pair<std::vector<unsigned char>, std::vector<unsigned char>>> caches_;
  unsigned char *keys_ = nullptr, *values_ = nullptr;
  std::vector<unsigned char> past_keys_, past_values_;  // the contiguous [:past] view fed to the graph
  int64_t rows_ = 0, text_length_ = 0, length_ = 0, grid_[2]{};
  DensityGraphs density_;
};

Pipeline::Pipeline(const std::string& directory, const LoadSettings& settings)
    : manifest_(load_manifest(directory)), settings_(settings) {
  const std::string& precision = settings.precision;
  if (std::find(manifest_.precisions.begin(), manifest_.precisions.end(), precision) == manifest_.precisions.end()) {
    std::string have;
    for (const std::string& p : manifest_.precisions) have += (have.empty() ? "" : ", ") + p;
    throw Error(directory + ": no " + precision + " graphs; this export has " + have);
  }
  manifest_.verify_files();
  library_ = &OrtLibrary::get(settings.onnxruntime_library);
  auto open = [&](const GraphEntry& g) {
    return std::make_unique<Session>(*library_, g.name, manifest_.path(g.file), settings.session);
  };
  // a block's density-direction graph of `precision`, opened when first run: an export without forward
  // graphs is refused only when a likelihood is asked of it (the vjp graphs are there whenever the
  // gradient runs: load_manifest refuses an nll-gradient export without them)
  auto density_graphs = [this](const BlockEntry& entry, const std::string& precision) -> OpenGraph {
    return [this, &entry, precision](const std::string& kind) {
      auto kinds = entry.graphs.find(precision);
      if (kind == "forward" && (kinds == entry.graphs.end() || !kinds->second.count(kind)))
        throw Error(manifest_.directory + ": block " + std::to_string(entry.index) + " has no " + precision +
                    " forward graph (the density graphs, which likelihoods run); re-export with them "
                    "(`starflow export onnx` writes them unless --no-density)");
      const GraphEntry& g = manifest_.block_graph(entry, kind, precision);
      return std::make_unique<Session>(*library_, g.name, manifest_.path(g.file), settings_.session);
    };
  };
  for (const BlockEntry& entry : manifest_.blocks) {
    const GraphEntry& step = manifest_.block_graph(entry, "step", precision);
    std::unique_ptr<Session> prefill;
    if (entry.text_conditioned) prefill = open(manifest_.block_graph(entry, "prefill", precision));
    blocks_.push_back(std::make_unique<GraphBlock>(entry, open(step), std::move(prefill), step.input("past_keys").dtype,
                                                   density_graphs(entry, precision)));
  }
  // the self-denoise's gradient runs fp32 graphs, as in the Python Generator: an fp32 pipeline's own
  // (their sessions shared with its likelihoods), else fp32 ones beside them
  if (manifest_.denoise && !manifest_.denoise_learned && precision != "fp32")
    for (const BlockEntry& entry : manifest_.blocks)
      fp32_density_.push_back(std::make_unique<DensityGraphs>(entry, density_graphs(entry, "fp32")));
  // the components run their fp32 graphs, as in the Python Generator
  for (const std::optional<std::string>& graph :
       {manifest_.text_component ? std::optional(manifest_.text_component->graph) : std::nullopt,
        manifest_.denoise_graph, manifest_.decoder_graph})
    if (graph) components_[*graph] = open(manifest_.graph(*graph));
  if (manifest_.text_component) {  // tokenizer.json, read once: the ids the text encoder takes, a label table's
    const TextComponent& c = *manifest_.text_component;
    std::string path = manifest_.path(c.tokenizer);
    json tokenizer = parse_json(read_file(path, kMaxTokenizerBytes), path, kMaxTokenizerBytes);
    try {
      vocabulary_size_ = vocabulary_size(tokenizer, path);
      if (c.kind == "label-table")
        for (const auto& [token, id] : tokenizer.at("model").at("vocab").items()) vocabulary_[token] = id.get<int64_t>();
    } catch (const json::exception& err) {
      throw Error("text encoder: cannot read the vocabulary in " + path + ": " + err.what());
    }
    if (c.sentencepiece) {
      try {
        tokenizer_ = std::make_unique<Tokenizer>(manifest_.path(*c.sentencepiece), path, tokenizer, c.token_length,
                                                 c.pad_id);
      } catch (const Error& err) {  // prompts only: token ids and embeddings still work
        tokenizer_refused_ = err.what();
      }
    }
  }
}

Pipeline::~Pipeline() = default;

Sampling Pipeline::defaults() const {
  Sampling s;
  s.guidance = manifest_.default_guidance;
  s.jacobi = manifest_.jacobi;
  return with_clip_settings(s);
}

Sampling Pipeline::preset(const std::string& name) const {
  if (name == "official") return defaults();
  auto found = manifest_.presets.find(name);
  if (found == manifest_.presets.end()) {
    std::string names = "'official'";
    for (const auto& [known, unused] : manifest_.presets) names += ", '" + known + "'";
    throw Error("sampler '" + name + "': this export has the presets [" + names + "]");
  }
  return with_clip_settings(found->second);
}

// A video export's clip settings are its video section's, whatever the preset (Manifest.sampling).
Sampling Pipeline::with_clip_settings(Sampling s) const {
  if (const std::optional<Video>& video = manifest_.video) {
    s.warm_start = video->warm_start;
    s.window = video->window;
    s.context = video->context;
  }
  return s;
}

std::string Pipeline::describe() const {
  const Manifest& m = manifest_;
  json d = {
      {"directory", m.directory},
      {"precision", settings_.precision},
      {"onnxruntime_library", library_->path()},
      {"channels", m.channels},
      {"patch_size", m.patch_size},
      {"multiple_of", m.multiple_of},
      {"train", {m.train[0], m.train[1]}},
      {"min", {m.min_size[0], m.min_size[1]}},
      {"max", {m.max_size[0], m.max_size[1]}},
      {"text_dim", m.text_dim},
      {"text_max_length", m.text_max_length},
      {"text_encoder", m.text_component ? json(m.text_component->kind) : json(nullptr)},
      {"classes", m.text_component && m.text_component->classes ? json(*m.text_component->classes) : json(nullptr)},
      {"max_rows", m.max_rows()},
      {"denoise", m.denoise},
      {"denoise_kind", m.denoise ? json(m.denoise_learned ? "learned" : "nll-gradient") : json(nullptr)},
      {"video", nullptr},
      {"decoder", m.decoder_kind},
      {"default_guidance", m.default_guidance},
      {"jacobi", {{"block_size", m.jacobi.block_size}, {"max_iter", m.jacobi.max_iter}, {"threshold", m.jacobi.threshold}}},
      {"presets", json::array()},
  };
  for (const auto& [name, unused] : m.presets) d["presets"].push_back(name);
  if (const std::optional<Video>& v = m.video)
    d["video"] = {{"frames", {{"min", v->frames.min}, {"opt", v->frames.opt}, {"max", v->frames.max}}},
                  {"window", v->window ? json(*v->window) : json(nullptr)},
                  {"context", v->context ? json(*v->context) : json(nullptr)},
                  {"later_chunk_factor", v->later_chunk_factor},
                  {"warm_start", v->warm_start},
                  {"fps", v->fps}};
  return d.dump();
}

// starflow.runtime.Pipeline.check_inputs (with sampler.check_sample_inputs), in its order.
void Pipeline::check_inputs(const Tensor& noise, const Tensor* y, const Tensor* y_uncond, const Sampling& options,
                            const std::string& name) const {
  const Manifest& m = manifest_;
  const std::optional<Video>& video = m.video;
  options.check();
  const std::size_t rank = noise.shape.size();
  const bool rank_ok = rank == 4 || (video && rank == 5);
  const std::string c = std::to_string(m.channels);
  std::string wanted = "(B, " + c + ", H, W) float32 latent array";
  if (video) wanted += " or a (B, F, " + c + ", H, W) float32 clip array";
  if (!rank_ok || noise.shape[rank - 3] != m.channels || noise.dtype != DType::f32)
    throw Error(name + ": expected a " + wanted + ", got " + dtype_name(noise.dtype) + " " + shape_text(noise.shape) +
                (!video && rank == 5 ? " (clips need a video model)" : ""));
  const int64_t B = noise.shape[0], frames = rank == 5 ? noise.shape[1] : 1, H = noise.shape[rank - 2],
                W = noise.shape[rank - 1];
  if (B == 0 || frames == 0) throw Error(name + ": the batch is empty, shape " + shape_text(noise.shape));
  if (H == 0 || W == 0 || H % m.patch_size || W % m.patch_size)
    throw Error(name + ": latent size " + std::to_string(H) + "x" + std::to_string(W) +
                " is not a positive multiple of patch_size " + std::to_string(m.patch_size));
  if (options.method == "sequential" && options.window && frames > *options.window)
    throw Error(name + ": " + std::to_string(frames) + " frames roll past the " + std::to_string(*options.window) +
                "-frame window, which needs method='jacobi' (the official rolling generation is Jacobi's)");
  if (m.text_dim == 0) {
    if (y) throw Error("y: this model is not text-conditioned; pass no text and no guidance");
  } else {
    if (!y) throw Error("y: this model is text-conditioned; pass (" + std::to_string(B) + ", L, " +
                        std::to_string(m.text_dim) + ") text embeddings");
    if (y->shape.size() != 3 || y->shape[0] != B || y->shape[2] != m.text_dim || y->shape[1] < 1 ||
        y->shape[1] > m.text_max_length || y->dtype != DType::f32)
      throw Error("y: expected float32 text embeddings of shape (" + std::to_string(B) + ", L, " +
                  std::to_string(m.text_dim) + ") with 1 <= L <= " + std::to_string(m.text_max_length) + ", got " +
                  dtype_name(y->dtype) + " " + shape_text(y->shape));
  }
  if (options.guidance > 0) {
    if (m.text_dim == 0) throw Error("guidance > 0 needs a text-conditioned model");
    if (!y_uncond) throw Error("guidance > 0 needs y_uncond (the encoded empty prompt), same shape as y");
    check_float32(*y_uncond, "y_uncond");
    if (y_uncond->shape != y->shape)
      throw Error("y_uncond: expected shape " + shape_text(y->shape) + " (as y), got " + shape_text(y_uncond->shape));
  }
  check_finite(noise, name);
  if (y) check_finite(*y, "y");
  if (options.guidance > 0) check_finite(*y_uncond, "y_uncond");
  if (H < m.min_size[0] || H > m.max_size[0] || W < m.min_size[1] || W > m.max_size[1])
    throw Error(name + ": latent " + std::to_string(H) + "x" + std::to_string(W) + " is outside this export's range " +
                std::to_string(m.min_size[0]) + "x" + std::to_string(m.min_size[1]) + " .. " +
                std::to_string(m.max_size[0]) + "x" + std::to_string(m.max_size[1]) +
                " (re-export with min_latent/max_latent to cover it)");
  if (video && rank != 5)
    throw Error(name + ": this is a video export; pass clips (B, F, C, H, W) of " + std::to_string(video->frames.min) +
                " .. " + std::to_string(video->frames.max) + " frames, got shape " + shape_text(noise.shape));
  check_frames(frames);
  const int64_t held = video ? (video->window ? *video->window : video->frames.max) : 0;
  if (video && options.window && *options.window > held)
    throw Error("window: " + std::to_string(*options.window) + " frames is more than this export's caches hold (" +
                std::to_string(held) + " frames)");
  if (video && video->window && !options.window && frames > *video->window)
    throw Error(name + ": " + std::to_string(frames) + " frames without a window are more than this export's caches hold (" +
                std::to_string(*video->window) + " frames); sample with window <= " + std::to_string(*video->window));
}

// One graph call's rows: `batch` samples of `frames` frames (1: images) fit the export's batch profile.
void Pipeline::check_rows(int64_t batch, int64_t frames, double guidance, const std::string& name) const {
  const Manifest& m = manifest_;
  int64_t rows = batch * (guidance > 0 ? 2 : 1);
  if (m.any_frame_local()) rows = std::max(rows, batch * frames);
  if (rows > m.max_rows())
    throw Error(name + ": batch " + std::to_string(batch) + " of " + std::to_string(frames) + " frame(s) runs as " +
                std::to_string(rows) + " graph rows (guidance doubles the batch, frame-local blocks take a row per "
                "frame); this export allows 1 .. " + std::to_string(m.max_rows()) + " rows");
}

// A video export's clips are within its frame range (an image export's stills pass).
void Pipeline::check_frames(int64_t frames) const {
  const std::optional<Video>& video = manifest_.video;
  if (video && (frames < video->frames.min || frames > video->frames.max))
    throw Error("frames: " + std::to_string(frames) + " frames is outside this export's range " +
                std::to_string(video->frames.min) + " .. " + std::to_string(video->frames.max) +
                " (re-export with max_frames to cover it)");
}

Tensor Pipeline::sample(const Tensor& noise, const Tensor* y, const Tensor* y_uncond, const Sampling& options) {
  check_inputs(noise, y, y_uncond, options);
  check_rows(noise.shape[0], noise.shape.size() == 5 ? noise.shape[1] : 1, options.guidance, "noise");
  std::optional<Sequence> text, text_uncond;
  if (y) text = as_sequence(*y);
  if (options.guidance > 0) text_uncond = as_sequence(*y_uncond);
  std::vector<SamplerBlock*> blocks;
  for (auto& block : blocks_) blocks.push_back(block.get());
  std::vector<BlockStats> stats;
  stats_ = "[]";
  const int later_chunk_factor = manifest_.video ? kLaterChunkFactor : 1;  // images: one frame
  Tensor latent = native::sample(blocks, noise, text ? &*text : nullptr, text_uncond ? &*text_uncond : nullptr,
                                   options, manifest_.patch_size, manifest_.guide_deep_only, later_chunk_factor, stats);
  json record = json::array();
  for (const BlockStats& s : stats)
    record.push_back({{"block", s.block}, {"method", s.method}, {"iterations", s.iterations},
                      {"image_iterations", s.image_iterations}, {"evaluations", s.evaluations},
                      {"tokens", s.tokens}, {"seconds", s.seconds}});
  stats_ = record.dump();
  if (options.check_finite) check_finite_output(latent);
  return latent;
}

Session& Pipeline::component(const std::string& graph) { return *components_.at(graph); }

std::vector<DensityBlock*> Pipeline::forward_blocks(bool gradient) {
  std::vector<DensityBlock*> forward;
  for (std::size_t i = blocks_.size(); i-- > 0;)
    forward.push_back(gradient && !fp32_density_.empty() ? fp32_density_[i].get() : &blocks_[i]->density());
  return forward;
}

Tensor Pipeline::encode_tokens(const Tensor& ids, const Tensor& mask) {
  if (!manifest_.text_component)
    throw Error(manifest_.directory + ": this export has no text encoder graph" +
                (manifest_.text_dim ? "; pass text embeddings instead" : " (the model is unconditional)"));
  const TextComponent& c = *manifest_.text_component;
  for (auto [tensor, name] : {std::pair{&ids, "input_ids"}, {&mask, "attention_mask"}})
    if (tensor->dtype != DType::i64 || tensor->shape.size() != 2 || tensor->shape[0] < 1 ||
        tensor->shape[1] != c.token_length || tensor->shape != ids.shape)
      throw Error(std::string(name) + ": expected int64 (B, " + std::to_string(c.token_length) + ") with B >= 1, got " +
                  dtype_name(tensor->dtype) + " " + shape_text(tensor->shape));
  for (std::size_t i = 0; i < ids.size(); ++i) {  // a negative id would pick another token's embedding
    const int64_t id = ids.i64()[i], on = mask.i64()[i];
    const std::string at = " at (" + std::to_string(i / c.token_length) + ", " + std::to_string(i % c.token_length) + ")";
    if (id < 0 || id >= vocabulary_size_)
      throw Error("input_ids: " + std::to_string(id) + at + " is outside this text encoder's vocabulary [0, " +
                  std::to_string(vocabulary_size_) + ")");
    if (on != 0 && on != 1) throw Error("attention_mask: " + std::to_string(on) + at + " is not 0 or 1");
  }
  Session& session = component(c.graph);
  auto out = session.run({{"input_ids", DType::i64, ids.shape, ids.bytes.data()},
                          {"attention_mask", DType::i64, mask.shape, mask.bytes.data()}});
  const Output& embeddings = out[session.index_of("embeddings")];
  if (embeddings.dtype() != DType::f32 || embeddings.shape().size() != 3 || embeddings.shape()[2] != manifest_.text_dim)
    throw Error("graph " + session.name() + ": embeddings " + shape_text(embeddings.shape()) + ", expected (B, L, " +
                std::to_string(manifest_.text_dim) + ") float32");
  return embeddings.to_tensor();
}

std::pair<Tensor, Tensor> Pipeline::tokenize(const std::vector<std::string>& prompts) const {
  if (prompts.empty()) throw Error("prompts: pass at least one (\"\" is the unconditional prompt)");
  if (!manifest_.text_component)
    throw Error(manifest_.directory + ": this export has no text encoder graph" +
                (manifest_.text_dim ? "; pass text embeddings instead" : " (the model is unconditional)"));
  const TextComponent& c = *manifest_.text_component;
  if (tokenizer_) return tokenizer_->encode(prompts);
  if (!tokenizer_refused_.empty()) throw Error(tokenizer_refused_);
  if (c.kind != "label-table")
    throw Error(manifest_.directory + ": this export's text encoder (" + c.kind + ") carries no SentencePiece model "
                "for its tokenizer (text.component.sentencepiece is null: only T5-family encoders' spiece.model is "
                "exported); tokenise with the `tokenizers` library and pass the ids (sf_pipeline_encode_tokens, "
                "starflow-run --token-ids)");
  Tensor ids(DType::i64, {static_cast<int64_t>(prompts.size()), c.token_length}), mask(DType::i64, ids.shape);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    std::fill(ids.i64() + i * c.token_length, ids.i64() + (i + 1) * c.token_length, c.pad_id);
    if (prompts[i].empty()) continue;  // the unconditional prompt: padding only
    bool known = !c.classes || std::count(c.classes->begin(), c.classes->end(), prompts[i]);
    auto token = vocabulary_.find(prompts[i]);
    if (!known || token == vocabulary_.end()) {
      std::string labels;
      for (const std::string& label : c.classes.value_or(std::vector<std::string>{}))
        labels += (labels.empty() ? "'" : ", '") + label + "'";
      throw Error("prompt '" + prompts[i] + "': this model knows the prompts [" + labels + "]");
    }
    ids.i64()[i * c.token_length] = token->second;
    mask.i64()[i * c.token_length] = 1;
  }
  return {std::move(ids), std::move(mask)};
}

Tensor Pipeline::encode_prompts(const std::vector<std::string>& prompts) {
  auto [ids, mask] = tokenize(prompts);
  return encode_tokens(ids, mask);
}

// The self-denoise step after sampling (Generator.denoise): for images x - noise_std^2 * grad, grad the
// gradient of each sample's NLL chained over the blocks' fp32 forward and vjp graphs, or for a video
// export's learned denoiser clips x - step * correction in the official overlapping windows.
Tensor Pipeline::denoise(const Tensor& latent, const Tensor* text) {
  const Manifest& m = manifest_;
  if (!m.denoise)
    throw Error(m.directory + ": this export has no self-denoise step; skip denoising or re-export with it");
  const std::size_t rank = latent.shape.size();
  if (!m.denoise_learned) {  // Pipeline.nll_gradient's checks (the latents are its first array)
    check_inputs(latent, text, nullptr, Sampling{}, "latents");
    check_rows(latent.shape[0], rank == 5 ? latent.shape[1] : 1, 0, "latents");
    std::optional<Sequence> y;
    if (text) y = as_sequence(*text);
    Tensor out = nll_gradient(forward_blocks(true), latent, y ? &*y : nullptr, m.patch_size);
    const float scale = static_cast<float>(m.denoise_noise_std * m.denoise_noise_std);  // float32, as numpy
    for (std::size_t i = 0; i < out.size(); ++i) out.f32()[i] = latent.f32()[i] - scale * out.f32()[i];
    return out;
  }
  const bool clip = rank == 5;  // the learned denoiser takes images as one-frame clips
  if (latent.dtype != DType::f32 || (rank != 4 && !clip) || latent.shape[rank - 3] != m.channels ||
      std::any_of(latent.shape.begin(), latent.shape.end(), [](int64_t d) { return d < 1; }) ||
      latent.shape[rank - 2] % m.multiple_of || latent.shape[rank - 1] % m.multiple_of)
    throw Error("x: expected a float32 (B, [F, ]" + std::to_string(m.channels) + ", H, W) latent batch in multiples of " +
                std::to_string(m.multiple_of) + ", got " + dtype_name(latent.dtype) + " " +
                shape_text(latent.shape));
  Session& session = component(*m.denoise_graph);
  const bool takes_text = std::any_of(m.graph(*m.denoise_graph).inputs.begin(), m.graph(*m.denoise_graph).inputs.end(),
                                      [](const TensorSpec& t) { return t.name == "text"; });
  // a learned denoiser without text ignores it, as in Python
  if (takes_text && (!text || text->dtype != DType::f32 || text->shape.size() != 3 ||
                     text->shape[0] != latent.shape[0] || text->shape[1] < 1 || text->shape[2] != m.text_dim))
    throw Error("text: expected (" + std::to_string(latent.shape[0]) + ", L, " + std::to_string(m.text_dim) +
                ") float32 text embeddings with L >= 1" +
                (text ? ", got " + dtype_name(text->dtype) + " " + shape_text(text->shape) : std::string()));
  // x - step * the graph's correction for clips x (B, F, ...), as float32
  const float step = static_cast<float>(m.denoise_step);
  auto correct = [&](const Tensor& x) {
    std::vector<Feed> feeds = {{"x", DType::f32, x.shape, x.bytes.data()}};
    if (takes_text) feeds.push_back({"text", DType::f32, text->shape, text->bytes.data()});
    auto out = session.run(feeds);
    const Output& correction = out[session.index_of("correction")];
    expect_output(correction, DType::f32, x.shape, session, "correction");
    Tensor result(DType::f32, x.shape);
    for (std::size_t i = 0; i < x.size(); ++i) result.f32()[i] = x.f32()[i] - step * correction.f32()[i];
    return result;
  };
  Tensor clips = latent;
  if (!clip) clips.shape.insert(clips.shape.begin() + 1, 1);  // (B, 1, C, H, W)
  const int64_t window = m.video && m.video->window ? *m.video->window : 0;  // the sampling window's frames
  denoise_windows(clips, correct, window,
                  m.denoise_overlap ? std::optional<int64_t>(*m.denoise_overlap) : std::nullopt);
  clips.shape = latent.shape;
  return clips;
}

// Latents -> images (N, H, W, C) in [0, 1], clips (N, T, C, H, W) -> (N, T, H, W, C).
// The decoder stage can turn these latents into pixels (Generator.check_stages): generate asks
// before any work, decode before its graph runs.
void Pipeline::check_decoder(bool clips) const {
  const Manifest& m = manifest_;
  if (clips && m.decoder_kind != "identity")  // as the Python Generator
    throw Error("decoding " + m.decoder_kind + " video latents is not built yet");
  if (m.decoder_kind != "identity" && !m.decoder_graph)
    throw Error(m.directory + ": this latent model's export has no decoder graph; re-export with vae=DIR");
}

Tensor Pipeline::decode(const Tensor& latent) {
  const Manifest& m = manifest_;
  const std::size_t rank = latent.shape.size();
  if (latent.dtype != DType::f32 || (rank != 4 && rank != 5) || latent.shape[rank - 3] != m.channels)
    throw Error("latent: expected a float32 (B, " + std::to_string(m.channels) + ", H, W) batch or (B, T, " +
                std::to_string(m.channels) + ", H, W) clips, got " + dtype_name(latent.dtype) + " " +
                shape_text(latent.shape));
  check_decoder(rank == 5);
  Tensor image = latent;
  if (m.decoder_graph) {
    Session& session = component(*m.decoder_graph);
    auto out = session.run({{"latent", DType::f32, latent.shape, latent.bytes.data()}});
    image = out[session.index_of("image")].to_tensor();
    check_float32(image, "graph " + session.name() + " output image");
  }
  // (N, C, H, W) in [-1, 1] -> (N, H, W, C) in [0, 1], as starflow.core.outputs.to_unit_images;
  // a clip's frames are images one after another
  const int64_t N = rank == 5 ? image.shape[0] * image.shape[1] : image.shape[0];
  const int64_t C = image.shape[rank - 3], H = image.shape[rank - 2], W = image.shape[rank - 1];
  Tensor unit(DType::f32, rank == 5 ? Shape{image.shape[0], image.shape[1], H, W, C} : Shape{N, H, W, C});
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < H * W; ++i) {
        float v = std::min(std::max(image.f32()[(n * C + c) * H * W + i], -1.0f), 1.0f);
        unit.f32()[(n * H * W + i) * C + c] = (v + 1.0f) / 2.0f;
      }
  return unit;
}

Tensor Pipeline::generate(const std::vector<std::string>& prompts, const std::string& negative_prompt,
                          const Tensor& noise, const Sampling& options, bool denoise, Tensor* latents) {
  const Manifest& m = manifest_;
  options.check();
  if (prompts.empty()) throw Error("prompts: pass at least one (\"\" is the unconditional prompt)");
  const bool clips = noise.shape.size() == 5;  // (count, T, C, H, W); ImageGenerator.check_frames
  if (!m.video && clips)
    throw Error("frames: " + std::to_string(noise.shape[1]) + " asked of an image model; clips need a video model");
  if (m.video && !clips) throw Error("this is a video model: ask for clips with frames=N (--frames N)");
  if (clips) check_frames(noise.shape[1]);
  if (noise.shape.empty() || noise.shape[0] != static_cast<int64_t>(prompts.size()))
    throw Error("noise: expected one row per prompt (" + std::to_string(prompts.size()) +
                (clips ? ", T, C, H, W), got " : ", C, H, W), got ") + shape_text(noise.shape));
  bool any_text = std::any_of(prompts.begin(), prompts.end(), [](const std::string& p) { return !p.empty(); });
  if (!m.text_dim && (any_text || options.guidance > 0))
    throw Error("this model is unconditional: give no prompt text and no guidance");
  if (m.text_dim && !m.text_component)
    throw Error(m.directory + ": this export has no text encoder; pass text embeddings to sf_pipeline_sample");
  if (denoise && !m.denoise)
    throw Error(m.directory +
                ": this export has no self-denoise step; generate without denoising or re-export with it");
  check_decoder(clips);
  std::optional<Tensor> y, y_uncond;
  if (m.text_dim) {
    y = encode_prompts(prompts);
    if (options.guidance > 0) {
      Tensor one = encode_prompts({negative_prompt});
      std::vector<Tensor> copies(prompts.size(), one);
      y_uncond = concat_rows(copies);
    }
  }
  const int64_t per_batch = m.images_per_batch(options.guidance, clips ? noise.shape[1] : 0);
  std::vector<Tensor> parts;
  for (int64_t first = 0; first < noise.shape[0]; first += per_batch) {
    const int64_t n = std::min(per_batch, noise.shape[0] - first);
    std::optional<Tensor> cond, uncond;
    if (y) cond = rows_of(*y, first, n);
    if (y_uncond) uncond = rows_of(*y_uncond, first, n);
    Tensor x = sample(rows_of(noise, first, n), cond ? &*cond : nullptr, uncond ? &*uncond : nullptr, options);
    parts.push_back(denoise ? this->denoise(x, cond ? &*cond : nullptr) : std::move(x));
  }
  Tensor latent = concat_rows(parts);
  Tensor images = decode(latent);
  if (options.check_finite)
    for (const Tensor* t : {&latent, &images}) check_finite_output(*t);
  if (latents) *latents = std::move(latent);
  return images;
}

Tensor Pipeline::log_likelihood(const Tensor& latents, const Tensor* y) {
  const Manifest& m = manifest_;
  check_inputs(latents, y, nullptr, Sampling{}, "latents");  // the whole input, once, before any split
  const int64_t B = latents.shape[0];
  const int64_t frames = latents.shape.size() == 5 ? latents.shape[1] : 0;
  const int64_t per_batch = m.images_per_batch(0, frames);
  check_rows(std::min(B, per_batch), std::max<int64_t>(frames, 1), 0, "latents");  // a clip too long for one call
  for (auto& block : blocks_) block->density().open_forward();  // an export without density graphs: refused here
  const std::vector<DensityBlock*> forward = forward_blocks(false);
  Tensor bits(DType::f32, {B});
  auto score = [&](const Tensor& x, const Tensor* text, int64_t first) {
    std::optional<Sequence> sequence;
    if (text) sequence = as_sequence(*text);
    std::vector<float> b =
        to_bits_per_dim(nll_per_sample(density(forward, x, sequence ? &*sequence : nullptr, m.patch_size)));
    std::copy(b.begin(), b.end(), bits.f32() + first);
  };
  if (B <= per_batch) {
    score(latents, y, 0);  // one call: no copy
    return bits;
  }
  for (int64_t first = 0; first < B; first += per_batch) {
    const int64_t n = std::min(per_batch, B - first);
    std::optional<Tensor> text;
    if (y) text = rows_of(*y, first, n);
    score(rows_of(latents, first, n), text ? &*text : nullptr, first);
  }
  return bits;
}

}  // namespace starflow::native
