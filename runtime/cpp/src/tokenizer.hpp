// Prompts -> the text encoder's (input_ids, attention_mask) for an hf-encoder export that carries its
// SentencePiece model (T5's spiece.model): the ids starflow.runtime.text.TextEncoderRunner gets from
// tokenizer.json through the `tokenizers` library, made here by the SentencePiece library.
//
// tokenizer.json is what the Python runtime reads; it says what surrounds the SentencePiece model,
// and only the T5 arrangement is accepted (anything else: the constructor throws; Pipeline keeps the
// reason and throws it from tokenize, so token ids still work):
// a Unigram vocabulary whose first ids are the model's pieces, the model's own normalizer
// (Precompiled, the same character map), whitespace split + Metaspace prepending "▁" to every word
// (the model's dummy prefix and whitespace rules), added tokens matched verbatim in the raw prompt,
// a TemplateProcessing post-processor (T5: "$A </s>"); the model must drop extra whitespace and add
// the dummy "▁" (probed), as the pre_tokenizer does.
// byte_fallback models (mT5's) spell an unknown character in byte pieces; without byte_fallback in
// tokenizer.json (T5's converter) each run of them is one <unk>, and a prompt holding a byte
// piece's name ("<0xF0>", a vocabulary entry to tokenizers) is refused.
// Per prompt: split out the added tokens (leftmost match, longest first), encode the text between
// them with the model (White_Space characters its normalizer keeps made ' ' first, as tokenizers'
// WhitespaceSplit ends words at them), truncate to token_length less the template's tokens on tokenizer.json's side,
// add the template's tokens, pad to token_length on its padding side (mask 0 there).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "tensor.hpp"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace starflow::native {

constexpr std::size_t kMaxTokenizerBytes = 256u << 20;  // tokenizer.json, spiece.model: mT5's and UMT5's are ~20 MB

class Tokenizer {
 public:
  // `document`: tokenizer.json as the Pipeline read it (parse_json, at most kMaxTokenizerBytes).
  // Errors name the file: unreadable, not a SentencePiece model, or not arranged as above.
  Tokenizer(const std::string& model_path, const std::string& tokenizer_path, const nlohmann::json& document,
            int64_t length, int64_t pad_id);
  ~Tokenizer();
  // (input_ids, attention_mask), int64 (B, length). Refuses a prompt that is not valid UTF-8.
  std::pair<Tensor, Tensor> encode(const std::vector<std::string>& prompts) const;

 private:
  std::vector<int64_t> tokens(const std::string& prompt) const;  // before truncation and the template

  std::unique_ptr<sentencepiece::SentencePieceProcessor> model_;
  std::string model_path_;
  std::vector<std::pair<std::string, int64_t>> added_;  // (content, id), longest first
  std::vector<int64_t> prefix_, suffix_;                 // the template's tokens around the prompt's
  std::vector<std::string> kept_spaces_;                 // White_Space the normalizer keeps: ' ' for the model
  bool truncate_left_ = false, pad_left_ = false;
  bool has_bytes_ = false;    // the model has byte pieces: a prompt spelling one is refused
  bool merge_bytes_ = false;  // ... and tokenizer.json no byte_fallback: each run of them is one <unk>
  int64_t length_ = 0, pad_id_ = 0;
};

}  // namespace starflow::native
