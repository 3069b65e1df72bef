// manifest.json + record.json -> Manifest, refusing anything the Python loader refuses that changes
// what runs. The digest is the sha256 of manifest.json's bytes, as read: no JSON is printed here.
#include "manifest.hpp"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <functional>
#include <regex>

#include <nlohmann/json.hpp>

#include "bounded.hpp"

namespace starflow::native {
namespace {

using json = nlohmann::json;
constexpr std::size_t kMaxManifestBytes = 64u << 20;

// ---- reading fields with errors that name the key ---------------------------------------------------
struct Reader {
  std::string source;  // the manifest's path, for messages

  [[noreturn]] void fail(const std::string& key, const std::string& expected) const {
    throw Error(source + ": key '" + key + "' " + expected);
  }
  const json& at(const json& object, const std::string& key, const std::string& where) const {
    if (!object.is_object() || !object.contains(key)) fail(where + key, "is missing");
    return object.at(key);
  }
  std::string text(const json& object, const std::string& key, const std::string& where) const {
    const json& v = at(object, key, where);
    if (!v.is_string()) fail(where + key, "must be a string");
    return v.get<std::string>();
  }
  int64_t integer(const json& object, const std::string& key, const std::string& where) const {
    const json& v = at(object, key, where);
    if (!v.is_number_integer()) fail(where + key, "must be an integer");
    return v.get<int64_t>();
  }
  int small(const json& object, const std::string& key, const std::string& where, int low = 0) const {
    int64_t v = integer(object, key, where);
    if (v < low || v > INT_MAX) fail(where + key, "must be an integer in [" + std::to_string(low) + ", INT_MAX]");
    return static_cast<int>(v);
  }
  double number(const json& object, const std::string& key, const std::string& where) const {
    const json& v = at(object, key, where);
    if (!v.is_number()) fail(where + key, "must be a number");
    return v.get<double>();
  }
  bool flag(const json& object, const std::string& key, const std::string& where) const {
    const json& v = at(object, key, where);
    if (!v.is_boolean()) fail(where + key, "must be true or false");
    return v.get<bool>();
  }
  const json& list(const json& object, const std::string& key, const std::string& where) const {
    const json& v = at(object, key, where);
    if (!v.is_array()) fail(where + key, "must be a list");
    return v;
  }
  std::string name(const json& object, const std::string& key, const std::string& where) const {
    static const std::regex plain("[A-Za-z0-9_][A-Za-z0-9._-]{0,199}");
    std::string v = text(object, key, where);
    if (!std::regex_match(v, plain))
      fail(where + key, "is '" + v + "': not a plain file or graph name (letters, digits, . _ -; no paths)");
    return v;
  }
  TensorSpec spec(const json& item, const std::string& where) const {
    TensorSpec s{text(item, "name", where), dtype_of(text(item, "dtype", where), source + ": " + where + "dtype"), {}};
    for (const json& d : list(item, "shape", where)) {
      if (d.is_number_integer()) s.dims.push_back(std::to_string(d.get<int64_t>()));
      else if (d.is_string()) s.dims.push_back(d.get<std::string>());
      else fail(where + "shape", "must hold integers and dim names");
    }
    return s;
  }
  FileEntry file(const json& item, const std::string& where) const {
    std::string hash = text(item, "sha256", where);
    if (hash.size() != 64 || hash.find_first_not_of("0123456789abcdef") != std::string::npos)
      fail(where + "sha256", "must be 64 lowercase hex digits");
    return {name(item, "file", where), hash};
  }
};

// The block's layers, kv_heads, head_dim and token width are its graph's (starflow.contract.manifest's
// _check_block_shapes), checked at load rather than by a graph call's error.
void check_block_shapes(const BlockEntry& block, const GraphEntry& g, int token_dim, const Reader& r) {
  const std::string layers = std::to_string(block.layers), heads = std::to_string(block.kv_heads),
                    head_dim = std::to_string(block.head_dim);
  const std::map<std::string, std::vector<std::string>> expected = {
      {"past_keys", {layers, "batch", heads, "past", head_dim}}, {"keys", {layers, "batch", heads, "text", head_dim}}};
  for (const std::vector<TensorSpec>* specs : {&g.inputs, &g.outputs})
    for (const TensorSpec& t : *specs) {
      auto want = expected.find(t.name);
      bool fits = want == expected.end() || t.dims == want->second;
      if (t.name == "x") fits = !t.dims.empty() && t.dims.back() == std::to_string(token_dim);
      if (fits) continue;
      std::string dims;
      for (const std::string& d : t.dims) dims += (dims.empty() ? "" : ", ") + d;
      throw Error(r.source + ": block " + std::to_string(block.index) + " (layers " + layers + ", kv_heads " + heads +
                  ", head_dim " + head_dim + ", token_dim " + std::to_string(token_dim) + ") does not fit graph " +
                  g.name + ": " + t.name + " is [" + dims + "]");
    }
}

void check_references(const Manifest& m, const Reader& r) {
  auto refer = [&](const std::string& name, const std::string& kind, const std::string& owner) -> const GraphEntry& {
    auto found = m.graphs.find(name);
    if (found == m.graphs.end() || found->second.kind != kind)
      throw Error(r.source + ": " + owner + " names graph '" + name + "', which is no " + kind + " graph here");
    return found->second;
  };
  int token_dim = m.channels * m.patch_size * m.patch_size;
  for (const BlockEntry& block : m.blocks) {
    std::string owner = "block " + std::to_string(block.index);
    if (static_cast<int>(block.sos.size()) != token_dim)
      throw Error(r.source + ": " + owner + " sos_embed has " + std::to_string(block.sos.size()) + " values, not " +
                  std::to_string(token_dim));
    for (const auto& [precision, kinds] : block.graphs) {
      if (std::find(m.precisions.begin(), m.precisions.end(), precision) == m.precisions.end())
        throw Error(r.source + ": " + owner + " has " + precision + " graphs, a precision not listed");
      for (const auto& [kind, name] : kinds) {
        const GraphEntry& g = refer(name, kind, owner);
        if (g.block != block.index)  // as the Python loader: each block drives its own graphs
          throw Error(r.source + ": " + owner + " names graph " + name + " of another block");
        if (g.precision != precision) throw Error(r.source + ": " + owner + " names graph " + name + " of another precision");
        check_block_shapes(block, g, token_dim, r);
      }
      if (!kinds.count("step")) throw Error(r.source + ": " + owner + " has no " + precision + " step graph");
      if (block.text_conditioned && !kinds.count("prefill"))
        throw Error(r.source + ": " + owner + " is text-conditioned but has no " + precision + " prefill graph");
    }
  }
  if (m.text_component) refer(m.text_component->graph, "text_encoder", "text");
  if (m.decoder_graph) refer(*m.decoder_graph, "decoder", "decoder");
  if (m.denoise_graph) refer(*m.denoise_graph, "denoise", "denoise");
  if (m.denoise && !m.denoise_learned)  // at load, as the Python loader, not when the gradient first runs
    for (const BlockEntry& block : m.blocks) {
      auto fp32 = block.graphs.find("fp32");
      std::string missing;
      for (const char* kind : {"forward", "vjp"})
        if (fp32 == block.graphs.end() || !fp32->second.count(kind))
          missing += (missing.empty() ? "" : " or ") + std::string(kind);
      if (!missing.empty())
        throw Error(r.source + ": denoise nll-gradient chains the blocks' fp32 forward and vjp graphs; block " +
                    std::to_string(block.index) + " has no fp32 " + missing + " graph");
    }
}

json parse_document(const std::string& text, const std::string& source) {
  json doc = parse_json(text, source);
  if (!doc.is_object()) throw Error(source + ": expected a JSON object");
  if (!doc.contains("schema_version") || doc["schema_version"] != kSchemaVersion)
    throw Error(source + ": schema_version " + (doc.contains("schema_version") ? doc["schema_version"].dump() : "missing") +
                ", this libstarflow reads " + std::to_string(kSchemaVersion) + "; re-export with this starflow");
  return doc;
}

}  // namespace

const TensorSpec& GraphEntry::input(const std::string& wanted) const {
  for (const TensorSpec& spec : inputs)
    if (spec.name == wanted) return spec;
  throw Error("graph " + name + " has no input '" + wanted + "'");
}

const GraphEntry& Manifest::graph(const std::string& name) const {
  auto found = graphs.find(name);
  if (found == graphs.end()) throw Error(directory + ": no graph named '" + name + "' in manifest.json");
  return found->second;
}

const GraphEntry& Manifest::block_graph(const BlockEntry& block, const std::string& kind,
                                        const std::string& precision) const {
  auto per_precision = block.graphs.find(precision);
  if (per_precision == block.graphs.end() || !per_precision->second.count(kind))
    throw Error(directory + ": block " + std::to_string(block.index) + " has no " + precision + " " + kind + " graph");
  return graph(per_precision->second.at(kind));
}

std::string Manifest::path(const std::string& file) const {
  std::string joined = directory + "/" + file;
  char resolved_dir[PATH_MAX], resolved[PATH_MAX];
  if (!::realpath(directory.c_str(), resolved_dir)) throw Error(directory + ": cannot resolve the export directory");
  if (!::realpath(joined.c_str(), resolved)) throw Error(directory + ": file " + joined + " is missing");
  std::string base = std::string(resolved_dir) + "/";
  if (std::string(resolved).compare(0, base.size(), base) != 0)
    throw Error(directory + ": '" + file + "' leads outside the export directory; refused");
  return joined;
}

void Manifest::verify_files() const {
  std::map<std::string, std::string> hashed;  // file -> its sha256: a block's graphs share one weights file
  auto verify = [&](const std::string& owner, const FileEntry& entry) {
    auto found = hashed.find(entry.file);
    if (found == hashed.end()) found = hashed.emplace(entry.file, sha256_file(path(entry.file))).first;
    const std::string& actual = found->second;
    if (actual != entry.sha256)
      throw Error(owner + ": file " + directory + "/" + entry.file + " does not match its sha256 in manifest.json "
                  "(changed since the export; re-export)");
  };
  for (const auto& [name, g] : graphs) {
    verify("graph " + name, {g.file, g.sha256});
    for (const FileEntry& e : g.external_data) verify("graph " + name, e);
  }
  for (const FileEntry& f : files) verify("file " + f.file, f);
}

Manifest load_manifest(const std::string& directory) {
  Reader r{directory + "/manifest.json"};
  std::string bytes;
  try {
    bytes = read_file(r.source, kMaxManifestBytes);
  } catch (const Error& err) {
    throw Error(directory + ": no readable manifest.json; not a starflow export directory (" + err.what() + ")");
  }
  return parse_manifest(bytes, directory, [&] {
    try {
      return read_file(directory + "/record.json", kMaxManifestBytes);
    } catch (const Error& err) {
      throw Error(r.source + ": no readable record.json beside it (the digest and validation record); re-export (" +
                  err.what() + ")");
    }
  });
}

Manifest parse_manifest(const std::string& bytes, const std::string& directory,
                        const std::function<std::string()>& read_record) {
  Reader r{directory + "/manifest.json"};
  json doc = parse_document(bytes, r.source);
  const std::string record_bytes = read_record();  // after the manifest's checks, as the Python loader
  Reader record_reader{directory + "/record.json"};
  json record = parse_document(record_bytes, record_reader.source);
  if (record_reader.text(record, "manifest_sha256", "") != sha256_bytes(bytes))
    throw Error(r.source + ": its fields changed since the export (digest mismatch): the graphs would be driven by "
                "settings they were not validated with; re-export instead of editing");

  Manifest m;
  m.directory = directory;
  const json& latent = r.at(doc, "latent", "");
  m.channels = r.small(latent, "channels", "latent.", 1);
  m.patch_size = r.small(latent, "patch_size", "latent.", 1);
  m.multiple_of = r.small(latent, "multiple_of", "latent.", 1);
  for (auto [key, target] : {std::pair{"train", m.train}, {"min", m.min_size}, {"max", m.max_size}}) {
    const json& pair = r.list(latent, key, "latent.");
    auto size = [](const json& v) { return v.is_number_integer() && v.get<int64_t>() >= 1 && v.get<int64_t>() <= INT_MAX; };
    if (pair.size() != 2 || !size(pair[0]) || !size(pair[1]))
      r.fail(std::string("latent.") + key, "must be [height, width], each from 1 to INT_MAX");
    target[0] = pair[0].get<int>();
    target[1] = pair[1].get<int>();
  }
  if (doc.contains("text") && !doc["text"].is_null()) {
    const json& text = doc["text"];
    m.text_dim = r.small(text, "dim", "text.", 1);
    m.text_max_length = r.small(text, "max_length", "text.", 1);
    if (text.contains("component") && !text["component"].is_null()) {
      const json& c = text["component"];
      TextComponent component{r.text(c, "kind", "text.component."), r.name(c, "graph", "text.component."),
                              r.name(c, "tokenizer", "text.component."), r.small(c, "token_length", "text.component.", 1),
                              r.integer(c, "pad_id", "text.component."), std::nullopt, std::nullopt};
      if (c.contains("classes") && !c["classes"].is_null()) {
        component.classes.emplace();
        for (const json& label : r.list(c, "classes", "text.component.")) {
          if (!label.is_string()) r.fail("text.component.classes", "must be a list of strings");
          component.classes->push_back(label.get<std::string>());
        }
      }
      if (!r.at(c, "sentencepiece", "text.component.").is_null())
        component.sentencepiece = r.name(c, "sentencepiece", "text.component.");
      m.text_component = component;
    }
  }
  const json& decoder = r.at(doc, "decoder", "");
  m.decoder_kind = r.text(decoder, "kind", "decoder.");
  if (decoder.contains("graph") && !decoder["graph"].is_null()) m.decoder_graph = r.name(decoder, "graph", "decoder.");
  if (doc.contains("denoise") && !doc["denoise"].is_null()) {
    const json& denoise = doc["denoise"];
    std::string kind = r.text(denoise, "kind", "denoise.");
    if (kind != "nll-gradient" && kind != "learned") r.fail("denoise.kind", "must be nll-gradient or learned");
    m.denoise = true;
    m.denoise_noise_std = r.number(denoise, "noise_std", "denoise.");
    m.denoise_learned = kind == "learned";
    if (m.denoise_learned) {  // starflow.contract.Denoise: step > 0, overlap >= 0 or null
      m.denoise_step = r.number(denoise, "step", "denoise.");
      if (!(m.denoise_step > 0)) r.fail("denoise.step", "must be a number > 0 for the learned denoiser");
      if (!r.at(denoise, "overlap", "denoise.").is_null()) m.denoise_overlap = r.small(denoise, "overlap", "denoise.");
    }
    // a learned denoiser names its graph; nll-gradient names none (it chains the blocks' graphs)
    const bool named = !r.at(denoise, "graph", "denoise.").is_null();
    if (m.denoise_learned && !named) r.fail("denoise.graph", "must name the learned denoiser's graph");
    if (!m.denoise_learned && named)
      r.fail("denoise.graph", "must be null for nll-gradient (it chains the blocks' fp32 forward and vjp graphs)");
    if (named) m.denoise_graph = r.name(denoise, "graph", "denoise.");
  }
  if (doc.contains("video") && !doc["video"].is_null()) {  // starflow.contract.Video
    const json& video = doc["video"];
    const json& frames = r.at(video, "frames", "video.");
    Video v;
    v.frames = {r.integer(frames, "min", "video.frames."), r.integer(frames, "opt", "video.frames."),
                r.integer(frames, "max", "video.frames.")};
    if (v.frames.min < 1 || v.frames.max < v.frames.min) r.fail("video.frames", "must have 1 <= min <= max");
    for (auto [key, target] : {std::pair{"window", &v.window}, {"context", &v.context}})
      if (!r.at(video, key, "video.").is_null()) *target = r.small(video, key, "video.", 1);
    v.later_chunk_factor = r.small(video, "later_chunk_factor", "video.", 1);
    if (v.later_chunk_factor != kLaterChunkFactor)  // the samplers (C++ and Python) run the official rule
      r.fail("video.later_chunk_factor", "is " + std::to_string(v.later_chunk_factor) +
                                             "; this runtime samples clips with the official 4 (chunks after the "
                                             "first frame are 4x the block size)");
    v.warm_start = r.flag(video, "warm_start", "video.");
    v.fps = r.number(video, "fps", "video.");
    if (!(v.fps > 0)) r.fail("video.fps", "must be a number > 0");
    if (v.context && (!v.window || *v.context >= *v.window)) r.fail("video.context", "must be fewer frames than video.window");
    m.video = v;
  }
  const json& guidance = r.at(doc, "guidance", "");
  m.default_guidance = r.number(guidance, "default_weight", "guidance.");
  m.guide_deep_only = r.text(guidance, "blocks", "guidance.") == "deep";
  auto jacobi = [&](const json& j, const std::string& at) {  // starflow.core.sampler.JacobiSettings
    Jacobi settings{r.small(j, "block_size", at, 1), r.small(j, "max_iter", at, 1), r.number(j, "threshold", at),
                    r.text(j, "init", at)};
    try {
      settings.check(at.substr(0, at.size() - 1));
    } catch (const Error& err) {
      r.fail(at.substr(0, at.size() - 1), std::string("is not valid: ") + err.what());
    }
    return settings;
  };
  m.jacobi = jacobi(r.at(doc, "jacobi", ""), "jacobi.");
  const json& presets = r.at(doc, "sampling_presets", "");
  if (!presets.is_object()) r.fail("sampling_presets", "must be an object");
  for (const auto& [name, item] : presets.items()) {  // starflow.core.sampler.SampleOptions
    std::string where = "sampling_presets." + name + ".";
    Sampling preset;
    preset.guidance = r.number(item, "guidance", where);
    preset.method = r.text(item, "method", where);
    preset.stop = r.text(item, "stop", where);
    try {
      check_stop(preset.stop, "stop");
    } catch (const Error& err) {
      r.fail(where + "stop", std::string("is not valid: ") + err.what());
    }
    preset.jacobi = jacobi(r.at(item, "jacobi", where), where + "jacobi.");
    const json& shallow = r.at(item, "shallow_jacobi", where);
    if (!shallow.is_null()) preset.shallow_jacobi = jacobi(shallow, where + "shallow_jacobi.");
    try {
      preset.check();
    } catch (const Error& err) {
      r.fail(where.substr(0, where.size() - 1), std::string("is not a valid preset: ") + err.what());
    }
    m.presets[name] = preset;
  }
  const json& dims = r.at(doc, "dims", "");
  if (!dims.is_object()) r.fail("dims", "must be an object");
  for (const auto& [name, range] : dims.items())
    m.dims[name] = {r.integer(range, "min", "dims." + name + "."), r.integer(range, "opt", "dims." + name + "."),
                    r.integer(range, "max", "dims." + name + ".")};
  if (!m.dims.count("batch")) r.fail("dims.batch", "is missing");
  const json& precisions = r.at(doc, "precisions", "");
  if (!precisions.is_object()) r.fail("precisions", "must be an object");
  for (const auto& [name, info] : precisions.items()) m.precisions.push_back(name);
  for (const json& item : r.list(doc, "graphs", "")) {
    GraphEntry g;
    g.name = r.name(item, "name", "graphs[].");
    std::string where = "graphs[" + g.name + "].";
    g.kind = r.text(item, "kind", where);
    if (!r.at(item, "block", where).is_null()) g.block = r.small(item, "block", where);
    g.precision = r.text(item, "precision", where);
    FileEntry main = r.file(item, where);
    g.file = main.file;
    g.sha256 = main.sha256;
    for (const json& e : r.list(item, "external_data", where)) g.external_data.push_back(r.file(e, where + "external_data[]."));
    for (const json& s : r.list(item, "inputs", where)) g.inputs.push_back(r.spec(s, where + "inputs[]."));
    for (const json& s : r.list(item, "outputs", where)) g.outputs.push_back(r.spec(s, where + "outputs[]."));
    if (!m.graphs.emplace(g.name, g).second) r.fail(where + "name", "is listed twice");
  }
  for (const json& item : r.list(doc, "files", "")) m.files.push_back(r.file(item, "files[]."));
  for (const json& item : r.list(doc, "blocks", "")) {
    BlockEntry b;
    b.index = r.small(item, "index", "blocks[].");
    std::string where = "blocks[" + std::to_string(b.index) + "].";
    b.deep = r.text(item, "role", where) == "deep";
    std::string permutation = r.text(item, "permutation", where);
    if (permutation != "identity" && permutation != "flip" && permutation != "flip-in-frame")
      r.fail(where + "permutation", "must be identity, flip or flip-in-frame");
    b.flip = permutation != "identity";
    b.flip_in_frame = permutation == "flip-in-frame";
    b.frame_local = r.flag(item, "frame_local", where);
    b.text_conditioned = r.flag(item, "text_conditioned", where);
    b.layers = r.small(item, "layers", where, 1);
    b.kv_heads = r.small(item, "kv_heads", where, 1);
    b.head_dim = r.small(item, "head_dim", where, 1);
    for (const json& v : r.list(item, "sos_embed", where)) {
      if (!v.is_number()) r.fail(where + "sos_embed", "must hold numbers");
      b.sos.push_back(v.get<float>());
    }
    const json& graphs = r.at(item, "graphs", where);
    for (const auto& [precision, kinds] : graphs.items())
      for (const auto& [kind, name] : kinds.items()) {
        if (!name.is_string()) r.fail(where + "graphs." + precision + "." + kind, "must be a graph name");
        b.graphs[precision][kind] = name.get<std::string>();
      }
    m.blocks.push_back(std::move(b));
  }
  if (m.blocks.empty() || !m.blocks.front().deep) r.fail("blocks", "must list the deep block first (sampling order)");
  if (m.text_dim == 0 && m.text_component) r.fail("text.component", "needs text.dim");
  if (m.text_component) {  // what is read has its sha256 (the Python reader refuses the same)
    const TextComponent& c = *m.text_component;
    for (const auto& [key, name] : {std::pair{"tokenizer", std::optional(c.tokenizer)}, {"sentencepiece", c.sentencepiece}})
      if (const auto& wanted = name;  // a structured binding: not captured by a C++17 lambda
          wanted && std::none_of(m.files.begin(), m.files.end(), [&](const FileEntry& f) { return f.file == *wanted; }))
        r.fail(std::string("text.component.") + key,
               "names '" + *name + "', which files does not list (every file read has its sha256 there)");
    if (c.kind == "label-table" && c.sentencepiece)
      r.fail("text.component.sentencepiece", "must be null for a label-table component");
  }
  check_references(m, r);
  return m;
}

}  // namespace starflow::native
