// Files in and out, by the rules of the Python side (starflow.core.atomic, starflow.core.bounded):
// what is read is a regular file, opened without waiting (a FIFO named as a graph never hangs a
// load); what is written goes into a hidden sibling created exclusively, is flushed to disk and is
// renamed over its target, which must be absent or a regular file (a symbolic link or a device such
// as /dev/full is refused, not replaced); partials a killed process left are removed by the next
// write there.
#pragma once

#include <cstddef>
#include <string>

namespace starflow::native {

// `text` in single quotes, as messages show a path or a token.
std::string quoted(const std::string& text);

// An open, readable descriptor of `path`, a regular file (symbolic links followed), closed with the object.
class RegularFile {
 public:
  explicit RegularFile(const std::string& path);
  ~RegularFile();
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  int fd() const { return fd_; }
  std::size_t size() const { return size_; }

 private:
  int fd_ = -1;
  std::size_t size_ = 0;
};

// `path`'s bytes (a regular file of at most `limit` bytes).
std::string read_file(const std::string& path, std::size_t limit);

// `path` absent or a regular file (`folder`: absent or a folder, not a link to one), else an Error
// naming `what` (a FIFO or a device: "is a device or other special file", as the Python writer says).
void check_target(const std::string& path, const std::string& what, bool folder = false);
// check_target, and `path`'s folder exists and takes a new file (one is created and removed); a
// `folder` may also be a link to a folder (`--out results` on a bigger disk): its files go in there.
void check_output(const std::string& path, const std::string& what, bool folder = false);
// `data` into a new hidden sibling of `path` (".NAME.partial-PID-HOST-RANDOM", O_CREAT|O_EXCL|
// O_NOFOLLOW, the permissions a plain open gives), fsynced, renamed over `path`, its folder fsynced;
// the sibling removed on any failure. Inside a folder of stage_folder's not yet placed (ours alone),
// `path` is a new file there: created (O_CREAT|O_EXCL|O_NOFOLLOW) and fsynced, with no sweep or
// rename per file (place_folder makes the folder whole at once).
void write_atomically(const std::string& path, const std::string& data);
// A new hidden folder beside `path` (named as write_atomically's partials) to build a folder of
// outputs in, after removing `path`'s partials whose process is gone.
std::string stage_folder(const std::string& path, const std::string& what);
// The finished `staged` folder to `path`: renamed into place whole when `path` does not exist; when
// it is a folder (or a link to one, or another writer made it meanwhile), its files are moved in one
// by one (same-named regular files replaced; anything else at a name refused before any file moves).
// `staged` is removed in every case; errors say what `path` holds.
void place_folder(const std::string& staged, const std::string& path, const std::string& what);

}  // namespace starflow::native
