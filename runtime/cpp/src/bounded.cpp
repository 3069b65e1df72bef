// The bounded JSON reader: nlohmann's DOM builder, driven by its SAX parser (which keeps its own
// stack, not the call stack), with each limit checked on the event that would break it.
#include "bounded.hpp"

#include <algorithm>
#include <cctype>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "tensor.hpp"

namespace starflow::native {
namespace {

using json = nlohmann::json;
using DomBuilder = nlohmann::detail::json_sax_dom_parser<json>;

class BoundedBuilder : public DomBuilder {
 public:
  BoundedBuilder(json& root, const std::string& source, std::size_t max_string)
      : DomBuilder(root), source_(source), max_string_(max_string) {}

  // sax_parse calls these by name on this type: they check, then build as the base does
  bool start_object(std::size_t n) { return enter(), DomBuilder::start_object(n); }
  bool start_array(std::size_t n) { return enter(), DomBuilder::start_array(n); }
  bool end_object() { return --depth_, DomBuilder::end_object(); }
  bool end_array() { return --depth_, DomBuilder::end_array(); }
  bool key(std::string& value) { return check_string(value), DomBuilder::key(value); }
  bool string(std::string& value) { return check_string(value), DomBuilder::string(value); }
  bool number_unsigned(std::uint64_t value) {  // every non-negative integer (negative ones: number_integer)
    if (value > static_cast<std::uint64_t>(INT64_MAX)) fail(std::to_string(value) + " is an integer outside int64");
    return DomBuilder::number_unsigned(value);
  }
  bool number_float(double value, const std::string& text) {  // also integers past (u)int64, as text
    check_number(text, value);
    return DomBuilder::number_float(value, text);
  }
  // A number's text and value (the lexer's own overflow passes HUGE_VAL): digits, then range.
  void check_number(const std::string& text, double value) const {
    const auto digits = static_cast<std::size_t>(
        std::count_if(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c); }));
    if (digits > kMaxNumberDigits)
      fail("a number of " + std::to_string(digits) + " digits (at most " + std::to_string(kMaxNumberDigits) + ")");
    if (text.find_first_of(".eE") == std::string::npos) fail(text + " is an integer outside int64");
    if (!std::isfinite(value) || std::fabs(value) > FLT_MAX)
      fail(text + " is not a finite number within float32's range");
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw Error(source_ + ": " + what); }
  void enter() {
    if (++depth_ > kMaxJsonDepth) fail("nested more than " + std::to_string(kMaxJsonDepth) + " deep");
  }
  void check_string(const std::string& value) const {
    if (value.size() <= max_string_) return;  // bytes bound characters from above
    const auto characters = static_cast<std::size_t>(  // UTF-8: every byte but continuation bytes
        std::count_if(value.begin(), value.end(), [](unsigned char c) { return (c & 0xC0) != 0x80; }));
    if (characters > max_string_)
      fail("a string of " + std::to_string(characters) + " characters (at most " + std::to_string(max_string_) + ")");
  }

  const std::string& source_;
  std::size_t max_string_;
  std::size_t depth_ = 0;
};

}  // namespace

json parse_json(const std::string& text, const std::string& source, std::size_t max_string) {
  json document;
  BoundedBuilder builder(document, source, max_string);
  try {
    json::sax_parse(text, &builder);
  } catch (const json::out_of_range& err) {  // 406: the lexer's "number overflow parsing '<text>'"
    const std::string what = err.what();
    const std::size_t first = what.find('\''), last = what.rfind('\'');
    if (err.id == 406 && first != last) builder.check_number(what.substr(first + 1, last - first - 1), HUGE_VAL);
    throw Error(source + ": not valid JSON (" + what + ")");
  } catch (const json::exception& err) {
    throw Error(source + ": not valid JSON (" + err.what() + ")");
  }
  return document;
}

}  // namespace starflow::native
