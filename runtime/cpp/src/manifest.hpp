// The export's contract (manifest.json, with record.json's digest of it) as C++ values, checked as
// the Python loader checks it: schema version, manifest.json's sha256 against record.json's, plain
// file names resolving inside the directory, references between blocks and graphs, and (on
// request) every file's sha256. The fields are starflow/contract/manifest.schema.json's.
#pragma once

#include <algorithm>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "sampler.hpp"
#include "tensor.hpp"

#ifndef STARFLOW_SCHEMA_VERSION
#error "STARFLOW_SCHEMA_VERSION is not defined (CMake reads it from starflow/contract/manifest.schema.json)"
#endif

namespace starflow::native {

constexpr int kSchemaVersion = STARFLOW_SCHEMA_VERSION;  // CMake reads it from manifest.schema.json

struct Range {
  int64_t min = 0, opt = 0, max = 0;
};

struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<std::string> dims;  // a number as text, or a symbolic dim named in `dims`
};

struct FileEntry {
  std::string file, sha256;
};

struct GraphEntry {
  std::string name, kind, precision, file, sha256;
  std::optional<int> block;  // the flow block's index; none for component graphs
  std::vector<FileEntry> external_data;
  std::vector<TensorSpec> inputs, outputs;
  const TensorSpec& input(const std::string& name) const;
};

struct BlockEntry {
  int index = 0;
  bool deep = false, flip = false, text_conditioned = false;
  bool flip_in_frame = false;  // permutation flip-in-frame: a clip's flip reverses each frame
  bool frame_local = false;    // a clip's frames are sampled as separate sequences
  int layers = 0, kv_heads = 0, head_dim = 0;
  std::vector<float> sos;
  std::map<std::string, std::map<std::string, std::string>> graphs;  // precision -> kind -> graph
};

struct TextComponent {
  std::string kind, graph, tokenizer;
  int token_length = 0;
  int64_t pad_id = 0;
  std::optional<std::vector<std::string>> classes;
  std::optional<std::string> sentencepiece;  // hf-encoder: the SentencePiece model behind tokenizer.json
};

// STARFlow-V exports (starflow.contract.Video): clips (B, F, C, H, W) of frames.min .. frames.max frames.
constexpr int kLaterChunkFactor = 4;  // official video Jacobi: chunks after the first frame are 4x the block size

struct Video {
  Range frames;
  std::optional<int> window, context;  // the deep block's cache in frames (none: all); context none: window - 1
  int later_chunk_factor = kLaterChunkFactor;  // a manifest with another is refused
  bool warm_start = true;
  double fps = 8;
};

struct Manifest {
  std::string directory;  // as given by the caller
  int channels = 0, patch_size = 1, multiple_of = 1;
  int train[2]{}, min_size[2]{}, max_size[2]{};
  int text_dim = 0, text_max_length = 0;  // 0: no text
  std::optional<TextComponent> text_component;
  std::string decoder_kind;
  std::optional<std::string> decoder_graph;
  bool denoise = false;          // a self-denoise step after sampling, of one of two kinds:
  bool denoise_learned = false;  // "learned" (video): its graph's x - step * correction in windows; else
                                 // "nll-gradient": x - noise_std^2 * grad over the blocks' fp32 forward and vjp graphs
  std::optional<std::string> denoise_graph;  // the learned denoiser's
  double denoise_noise_std = 0, denoise_step = 0;
  std::optional<int> denoise_overlap;  // learned only; none: window - 1
  std::optional<Video> video;          // none: an image export
  double default_guidance = 0;
  bool guide_deep_only = true;
  Jacobi jacobi;                             // the default block-wise Jacobi settings
  std::map<std::string, Sampling> presets;  // calibrated, opt-in sampling settings by name
  std::map<std::string, Range> dims;
  std::vector<std::string> precisions;
  std::vector<BlockEntry> blocks;  // sampling order: deep block first
  std::map<std::string, GraphEntry> graphs;
  std::vector<FileEntry> files;

  int64_t max_rows() const { return dims.at("batch").max; }
  bool any_frame_local() const {  // some block samples a clip's frames as separate sequences
    return std::any_of(blocks.begin(), blocks.end(), [](const BlockEntry& b) { return b.frame_local; });
  }
  // Manifest.images_per_batch: samples (images, or clips of `frames` when frames > 0) per graph call;
  // guidance doubles the rows and a frame-local block runs a row per frame. At least 1: a clip too
  // long for one call is refused by the rows check.
  int64_t images_per_batch(double guidance, int64_t frames = 0) const {
    int64_t per_sample = guidance > 0 ? 2 : 1;
    if (frames > 0 && any_frame_local()) per_sample = std::max(per_sample, frames);
    return std::max<int64_t>(max_rows() / per_sample, 1);
  }
  const GraphEntry& graph(const std::string& name) const;
  const GraphEntry& block_graph(const BlockEntry& block, const std::string& kind, const std::string& precision) const;
  std::string path(const std::string& file) const;  // directory/file, refused unless inside
  void verify_files() const;                         // every graph, external-data and other file's sha256
};

Manifest load_manifest(const std::string& directory);
// load_manifest's checks on manifest.json's bytes, as if read from `directory`; `read_record` gives
// record.json's once the manifest passed its own checks (the fuzz target passes them in memory).
Manifest parse_manifest(const std::string& bytes, const std::string& directory,
                        const std::function<std::string()>& read_record);

}  // namespace starflow::native
