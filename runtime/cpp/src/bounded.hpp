// JSON read without trusting it, under the limits of starflow.core.bounded (the Python reader):
// checked by the parser as it reads, so a hostile document ends in one line naming it before
// anything walks it (no recursion on the input's depth, no number or string past its bound).
#pragma once

#include <cstddef>
#include <string>

#include <nlohmann/json.hpp>

namespace starflow::native {

constexpr std::size_t kMaxJsonDepth = 64;         // arrays/objects; real manifests nest 6 deep
constexpr std::size_t kMaxNumberDigits = 32;      // a float's repr has at most 17 + 3 digits
constexpr std::size_t kMaxStringChars = 1 << 16;  // a manifest's longest string has 170 characters

// `text` as JSON: nesting at most kMaxJsonDepth deep, a number at most kMaxNumberDigits digits (an
// integer within int64, any other number finite and within float32's range), a string (or key) at
// most `max_string` characters, valid UTF-8; errors start with `source`.
nlohmann::json parse_json(const std::string& text, const std::string& source,
                          std::size_t max_string = kMaxStringChars);

}  // namespace starflow::native
