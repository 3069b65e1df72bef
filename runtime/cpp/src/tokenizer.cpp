// The SentencePiece path for hf-encoder prompts; tokenizer.hpp says what is checked, and why.
#include "tokenizer.hpp"

#include <algorithm>
#include <cstdio>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <sentencepiece_processor.h>

namespace starflow::native {
namespace {

using json = nlohmann::json;

// UTF-8 as Python's str.encode writes it (no overlong forms, no surrogates, at most U+10FFFF): the
// only prompts the Python runtime can be given, and what the SentencePiece model reads.
bool valid_utf8(const std::string& text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  for (std::size_t i = 0; i < n;) {
    const unsigned c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t extra = 0;
    unsigned low = 0x80, high = 0xBF;  // the second byte's range; later ones are always 80..BF
    if (c >= 0xC2 && c <= 0xDF) extra = 1;
    else if (c == 0xE0) extra = 2, low = 0xA0;
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) extra = 2;
    else if (c == 0xED) extra = 2, high = 0x9F;
    else if (c == 0xF0) extra = 3, low = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) extra = 3;
    else if (c == 0xF4) extra = 3, high = 0x8F;
    else return false;
    if (n - i <= extra || s[i + 1] < low || s[i + 1] > high) return false;
    for (std::size_t k = 2; k <= extra; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return false;
    i += extra + 1;
  }
  return true;
}

// Unicode's White_Space characters (code point, UTF-8): where tokenizers' WhitespaceSplit ends a word
// (Rust's char::is_whitespace), after the normalizer. SentencePiece ends words at ' ' only.
constexpr std::pair<char32_t, const char*> kWhiteSpace[] = {
    {0x09, "\t"},          {0x0A, "\n"},          {0x0B, "\v"},          {0x0C, "\f"},          {0x0D, "\r"},
    {0x20, " "},           {0x85, "\xC2\x85"},    {0xA0, "\u00A0"},     {0x1680, "\u1680"}, {0x2000, "\u2000"},
    {0x2001, "\u2001"},   {0x2002, "\u2002"},   {0x2003, "\u2003"},   {0x2004, "\u2004"}, {0x2005, "\u2005"},
    {0x2006, "\u2006"},   {0x2007, "\u2007"},   {0x2008, "\u2008"},   {0x2009, "\u2009"}, {0x200A, "\u200A"},
    {0x2028, "\u2028"},   {0x2029, "\u2029"},   {0x202F, "\u202F"},   {0x205F, "\u205F"}, {0x3000, "\u3000"}};

// The first "<0xHH>" (a byte piece's name: upper-case hex) in `text`, or "".
std::string byte_piece_in(const std::string& text) {
  auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F'); };
  for (std::size_t at = text.find("<0x"); at != text.npos; at = text.find("<0x", at + 1))
    if (at + 6 <= text.size() && hex(text[at + 3]) && hex(text[at + 4]) && text[at + 5] == '>') return text.substr(at, 6);
  return {};
}

std::string base64_decode(const std::string& text) {
  if (text.size() % 4) return {};
  std::string out(text.size() / 4 * 3, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(text.data()), static_cast<int>(text.size()));
  if (n < 0) return {};
  std::size_t padding = text.size() >= 2 && text.compare(text.size() - 2, 2, "==") == 0 ? 2
                        : !text.empty() && text.back() == '=' ? 1
                                                              : 0;
  out.resize(static_cast<std::size_t>(n) - padding);
  return out;
}

// Metaspace("▁") prepending it to every word ("always"; older files: add_prefix_space), as the
// model's dummy prefix does.
bool prepends_to_every_word(const json& p) {
  if (p.value("type", "") != "Metaspace" || p.value("replacement", "") != "\u2581") return false;
  return p.contains("prepend_scheme") ? p["prepend_scheme"] == "always" : p.value("add_prefix_space", false);
}

}  // namespace

Tokenizer::Tokenizer(const std::string& model_path, const std::string& tokenizer_path, const json& doc,
                     int64_t length, int64_t pad_id)
    : model_(std::make_unique<sentencepiece::SentencePieceProcessor>()),
      model_path_(model_path),
      length_(length),
      pad_id_(pad_id) {
  auto status = model_->LoadFromSerializedProto(read_file(model_path, kMaxTokenizerBytes));
  if (!status.ok()) throw Error(model_path + ": not a SentencePiece model (" + status.ToString() + ")");
  const std::string refused = "; libstarflow tokenizes with a SentencePiece model arranged as T5's only "
                              "(pass token ids instead: sf_pipeline_encode_tokens, starflow-run --token-ids)";
  auto fail = [&](const std::string& what) { throw Error(tokenizer_path + ": " + what + refused); };
  try {
    // the vocabulary: the model's pieces, ids and scores, then added tokens only (T5's sentinels)
    const json& model = doc.at("model");
    if (model.at("type") != "Unigram") fail("its model is " + model.at("type").dump() + ", not Unigram");
    const json& vocab = model.at("vocab");
    const int pieces = model_->GetPieceSize();
    if (vocab.size() < static_cast<std::size_t>(pieces))
      fail("its vocabulary has " + std::to_string(vocab.size()) + " entries, fewer than the " +
           std::to_string(pieces) + " pieces of " + model_path);
    for (int id = 0; id < pieces; ++id) {
      const std::string piece = vocab[id].at(0).get<std::string>();
      if (piece != model_->IdToPiece(id) || vocab[id].at(1).get<float>() != model_->GetScore(id))
        fail("id " + std::to_string(id) + " is " + vocab[id].dump() + " there, '" + model_->IdToPiece(id) +
             "' (score " + std::to_string(model_->GetScore(id)) + ") in " + model_path);
    }
    if (pad_id_ < 0 || static_cast<std::size_t>(pad_id_) >= vocab.size())
      fail("text.component.pad_id " + std::to_string(pad_id_) + " is not an id of its vocabulary (0.." +
           std::to_string(vocab.size() - 1) + ")");
    if (model.at("unk_id") != model_->unk_id())
      fail("its unk_id is " + model.at("unk_id").dump() + ", " + std::to_string(model_->unk_id()) + " in " + model_path);
    std::vector<bool> added_id(vocab.size(), false);
    for (const json& token : doc.at("added_tokens")) {
      const std::string content = token.at("content");
      for (const char* flag : {"normalized", "lstrip", "rstrip", "single_word"})
        if (token.at(flag).get<bool>())
          fail("added token '" + content + "' is " + flag + " (libstarflow matches added tokens verbatim)");
      const int64_t id = token.at("id");
      if (id >= 0 && static_cast<std::size_t>(id) < vocab.size()) added_id[id] = true;
      if (!content.empty()) added_.emplace_back(content, id);
    }
    for (std::size_t id = pieces; id < vocab.size(); ++id)
      if (!added_id[id]) fail("id " + std::to_string(id) + " is neither a piece of " + model_path + " nor an added token");
    std::stable_sort(added_.begin(), added_.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });

    const json& normalizer = doc.at("normalizer");
    if (normalizer.is_null() || normalizer.at("type") != "Precompiled")
      fail("its normalizer is " + (normalizer.is_null() ? std::string("null") : normalizer.at("type").dump()) +
           ", not the model's own (Precompiled)");
    const std::string map = base64_decode(normalizer.at("precompiled_charsmap"));
    if (map.empty() || model_->serialized_model_proto().find(map) == std::string::npos)
      fail("its Precompiled character map is not the one in " + model_path);
    const json& pre = doc.at("pre_tokenizer");
    if (pre.is_null() || pre.value("type", "") != "Sequence" || pre.at("pretokenizers").size() != 2 ||
        pre["pretokenizers"][0].value("type", "") != "WhitespaceSplit" || !prepends_to_every_word(pre["pretokenizers"][1]))
      fail("its pre_tokenizer is " + pre.dump() + ", not T5's (WhitespaceSplit, then Metaspace prepending '\u2581' "
           "to every word)");

    // the template: its special tokens before and after the prompt's ("$A </s>": none, then </s>)
    const json& post = doc.at("post_processor");
    if (!post.is_null()) {
      if (post.at("type") != "TemplateProcessing")
        fail("its post_processor is " + post.at("type").dump() + ", not a TemplateProcessing");
      bool prompt = false;
      for (const json& item : post.at("single")) {
        if (item.contains("Sequence") && item["Sequence"].at("id") == "A" && !prompt) {
          prompt = true;
        } else if (item.contains("SpecialToken")) {
          for (const json& id : post.at("special_tokens").at(item["SpecialToken"].at("id").get<std::string>()).at("ids"))
            (prompt ? suffix_ : prefix_).push_back(id.get<int64_t>());
        } else {
          fail("its template item " + item.dump() + " is not the prompt ($A, once) or a special token");
        }
      }
      if (!prompt) fail("its template has no place for the prompt ($A)");
    }
    if (static_cast<int64_t>(prefix_.size() + suffix_.size()) > length_)
      fail("its template's " + std::to_string(prefix_.size() + suffix_.size()) + " tokens do not fit token_length " +
           std::to_string(length_));
    // White_Space characters the model's normalizer keeps (nmt_nfkc: U+0085) end a word in
    // tokenizers but are letters to SentencePiece: they become ' ' before it reads them.
    for (const auto& [code, text] : kWhiteSpace) {
      std::vector<std::string> pieces;
      auto probe = model_->Encode(text, &pieces);
      if (!probe.ok()) {
        char hex[16];
        std::snprintf(hex, sizeof hex, "U+%04X", static_cast<unsigned>(code));
        throw Error(model_path + ": cannot encode " + hex + " (" + probe.ToString() + ")");
      }
      // kept: in a piece, or spelt in byte pieces (byte_fallback: an unknown character)
      if (std::any_of(pieces.begin(), pieces.end(), [&, text = std::string(text)](const std::string& p) {
            return p.find(text) != p.npos || model_->IsByte(model_->PieceToId(p));
          }))
        kept_spaces_.push_back(text);
    }
    // What tokenizer.json's WhitespaceSplit + Metaspace do, the model's normalizer must do too: drop
    // extra whitespace and prepend "▁" (its spec is a protobuf the system library gives no
    // access to: probed by behaviour).
    std::vector<int> spaced, plain;
    std::vector<std::string> first;
    if (!model_->Encode(" x  y ", &spaced).ok() || !model_->Encode("x y", &plain).ok() ||
        !model_->Encode("x", &first).ok() || first.empty())
      throw Error(model_path + ": cannot encode the probes ' x  y ', 'x y' and 'x'");
    if (spaced != plain)
      throw Error(model_path + ": keeps extra whitespace (remove_extra_whitespaces false), which " + tokenizer_path +
                  "'s WhitespaceSplit drops" + refused);
    if (first[0].rfind("▁", 0) != 0 && first[0] != "<0xE2>")  // "▁" may be unknown: its first byte
      throw Error(model_path + ": adds no '▁' before the text (add_dummy_prefix false), as " + tokenizer_path +
                  "'s Metaspace does" + refused);
    // Byte pieces (<0x00>..<0xFF>): a model with byte_fallback spells an unknown character in them,
    // tokenizers without it (T5's converter: byte_fallback false) gives one <unk> for each run of
    // unknown characters, as SentencePiece's own unknowns are merged.
    for (int id = 0; id < pieces && !has_bytes_; ++id) has_bytes_ = model_->IsByte(id);
    merge_bytes_ = has_bytes_ && !model.value("byte_fallback", false);
    // the sides (transformers' own; the Python runtime reads them from here too; absent: right)
    for (auto [key, left] : {std::pair{"truncation", &truncate_left_}, {"padding", &pad_left_}}) {
      const json& section = doc.at(key);
      const std::string side = section.is_null() ? "Right" : section.at("direction").get<std::string>();
      if (side != "Left" && side != "Right") fail(std::string(key) + " direction '" + side + "' is not Left or Right");
      *left = side == "Left";
    }
  } catch (const json::exception& err) {
    throw Error(tokenizer_path + ": not a tokenizer.json as the tokenizers library writes it (" + err.what() + ")");
  }
}

Tokenizer::~Tokenizer() = default;

std::vector<int64_t> Tokenizer::tokens(const std::string& prompt) const {
  std::vector<int64_t> out;
  std::vector<int> ids;
  auto encode = [&](std::size_t first, std::size_t end) {
    if (first == end) return;
    std::string text = prompt.substr(first, end - first);
    for (const std::string& space : kept_spaces_)
      for (std::size_t at = text.find(space); at != text.npos; at = text.find(space, at + 1)) text.replace(at, space.size(), " ");
    auto status = model_->Encode(text, &ids);
    if (!status.ok()) throw Error(model_path_ + ": cannot encode a prompt (" + status.ToString() + ")");
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (!merge_bytes_ || !model_->IsByte(ids[i])) out.push_back(ids[i]);
      else if (i == 0 || !model_->IsByte(ids[i - 1])) out.push_back(model_->unk_id());  // a run's first byte
    }
  };
  std::size_t start = 0;  // the text not yet encoded begins here
  for (std::size_t at = 0; at < prompt.size();) {
    auto hit = std::find_if(added_.begin(), added_.end(),
                            [&](const auto& token) { return prompt.compare(at, token.first.size(), token.first) == 0; });
    if (hit == added_.end()) {
      ++at;
      continue;
    }
    encode(start, at);
    out.push_back(hit->second);
    at += hit->first.size();
    start = at;
  }
  encode(start, prompt.size());
  return out;
}

std::pair<Tensor, Tensor> Tokenizer::encode(const std::vector<std::string>& prompts) const {
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    if (!valid_utf8(prompts[b])) throw Error("prompt " + std::to_string(b) + ": not valid UTF-8");
    if (has_bytes_)
      if (std::string spelt = byte_piece_in(prompts[b]); !spelt.empty())
        throw Error("prompt " + std::to_string(b) + ": contains '" + spelt + "', a byte piece's name, which "
                    "tokenizer.json reads as that piece and SentencePiece as text (pass token ids instead)");
  }
  const int64_t rows = static_cast<int64_t>(prompts.size());
  Tensor ids(DType::i64, {rows, length_}), mask(DType::i64, {rows, length_});
  const std::size_t room = static_cast<std::size_t>(length_) - prefix_.size() - suffix_.size();
  for (int64_t b = 0; b < rows; ++b) {
    std::vector<int64_t> text = tokens(prompts[b]);
    if (text.size() > room)  // tokenizers keeps `room` tokens from its truncation side
      text = truncate_left_ ? std::vector<int64_t>(text.end() - room, text.end())
                            : std::vector<int64_t>(text.begin(), text.begin() + room);
    std::vector<int64_t> row = prefix_;
    row.insert(row.end(), text.begin(), text.end());
    row.insert(row.end(), suffix_.begin(), suffix_.end());
    const std::size_t first = pad_left_ ? length_ - row.size() : 0;  // where the tokens go
    int64_t* id = ids.i64() + b * length_;
    int64_t* attention = mask.i64() + b * length_;
    std::fill(id, id + length_, pad_id_);
    std::copy(row.begin(), row.end(), id + first);
    std::fill(attention + first, attention + first + row.size(), 1);
  }
  return {std::move(ids), std::move(mask)};
}

}  // namespace starflow::native
