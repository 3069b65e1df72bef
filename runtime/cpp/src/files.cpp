// Files in and out: see files.hpp for the rules.
#include "files.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <random>
#include <set>
#include <vector>

#include "tensor.hpp"

namespace starflow::native {
namespace {

namespace fs = std::filesystem;

// What a non-regular file is, for messages (st_mode of lstat), in starflow.core.atomic.check_target's words.
std::string kind_of(mode_t mode) {
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISREG(mode)) return "a file";
  return "a device or other special file";  // a FIFO, a socket, a character or block device
}

// The folders of stage_folder not yet placed: this process's alone, so a file in one is written in place.
std::mutex staging_lock;
std::set<fs::path> staging;

bool is_staged(const fs::path& folder) {
  std::lock_guard<std::mutex> hold(staging_lock);
  return staging.count(folder) > 0;
}

// `data` to `fd` and on disk; the reason it failed ("" when it did not). `fd` is closed.
std::string write_and_close(int fd, const std::string& data) {
  std::string reason;
  for (std::size_t done = 0; done < data.size() && reason.empty();) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno != EINTR) reason = std::strerror(errno);
    if (n > 0) done += static_cast<std::size_t>(n);
  }
  if (reason.empty() && ::fsync(fd) != 0) reason = std::strerror(errno);
  if (::close(fd) != 0 && reason.empty()) reason = std::strerror(errno);
  return reason;
}

// This host and pid namespace, hashed as starflow.core.atomic._host hashes them: a pid means
// something only within both.
const std::string& host() {
  static const std::string hashed = [] {
    char name[HOST_NAME_MAX + 1] = {};
    ::gethostname(name, sizeof name - 1);
    char ns[256] = {};
    ssize_t n = ::readlink("/proc/self/ns/pid", ns, sizeof ns - 1);
    return sha256_bytes(std::string(name) + ":" + (n > 0 ? std::string(ns, static_cast<std::size_t>(n)) : ""))
        .substr(0, 8);
  }();
  return hashed;
}

// A new partial's name beside `path`: ".NAME.partial-PID-HOST-" and 8 of tempfile's characters.
fs::path partial_name(const fs::path& path) {
  static const char letters[] = "abcdefghijklmnopqrstuvwxyz0123456789_";
  std::random_device random;
  std::string tail;
  for (int i = 0; i < 8; ++i) tail += letters[random() % (sizeof letters - 1)];
  return path.parent_path() /
         ("." + path.filename().string() + ".partial-" + std::to_string(::getpid()) + "-" + host() + "-" + tail);
}

fs::path folder_of(const fs::path& path) { return path.parent_path().empty() ? fs::path(".") : path.parent_path(); }

// `name`'s partials in `directory` whose process (of this host) is gone: files unlinked, folders removed.
void remove_stale(const fs::path& directory, const std::string& name) {
  const std::string prefix = "." + name + ".partial-";
  std::unique_ptr<DIR, int (*)(DIR*)> dir(::opendir(directory.c_str()), ::closedir);
  if (!dir) return;  // nothing to clean where nothing can be listed; the write reports the place
  std::vector<std::string> stale;
  while (const dirent* entry = ::readdir(dir.get())) {
    const std::string file = entry->d_name;
    if (file.compare(0, prefix.size(), prefix) != 0) continue;
    std::size_t at = prefix.size(), digits = file.find_first_not_of("0123456789", at);
    if (digits == at || digits == std::string::npos || digits - at > 9 || file[digits] != '-') continue;
    const std::string pid = file.substr(at, digits - at), rest = file.substr(digits + 1);
    if (rest.size() < 10 || rest.compare(0, 8, host()) != 0 || rest[8] != '-' ||
        rest.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789_", 9) != std::string::npos)
      continue;
    if (::kill(static_cast<pid_t>(std::stol(pid)), 0) != 0 && errno == ESRCH) stale.push_back(file);
  }
  for (const std::string& file : stale) {
    std::error_code ignored;
    fs::remove_all(directory / file, ignored);
  }
}

// A folder's target: check_target's, where a link to a folder is also a folder to write into
// (`--out results` on a bigger disk), as the Python writer takes it.
void check_folder_target(const fs::path& target, const std::string& what) {
  std::error_code error;
  if (!fs::is_directory(target, error)) check_target(target.string(), what, true);
}

void fsync_folder(const fs::path& folder) {
  int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);  // some file systems cannot sync a folder: the rename itself is done
  ::close(fd);
}

}  // namespace

std::string quoted(const std::string& text) { return "'" + text + "'"; }

RegularFile::RegularFile(const std::string& path) {
  // O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting for one
  fd_ = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd_ < 0) throw Error("cannot read " + quoted(path) + ": " + std::strerror(errno));
  struct stat info {};
  const bool stated = ::fstat(fd_, &info) == 0;
  if (!stated || !S_ISREG(info.st_mode)) {
    const std::string why = stated ? "it is " + kind_of(info.st_mode) + ", not a regular file" : std::strerror(errno);
    ::close(fd_);
    throw Error("cannot read " + quoted(path) + ": " + why);
  }
  ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) & ~O_NONBLOCK);
  size_ = static_cast<std::size_t>(info.st_size);
}

RegularFile::~RegularFile() { ::close(fd_); }

std::string read_file(const std::string& path, std::size_t limit) {
  RegularFile file(path);
  if (file.size() > limit)
    throw Error(quoted(path) + " is " + std::to_string(file.size()) + " bytes; over the limit of " + std::to_string(limit));
  std::string data(file.size(), '\0');
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::read(file.fd(), data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error("cannot read " + quoted(path) + ": " + std::strerror(errno));
    if (n == 0) break;  // shorter than it was: what is there
    done += static_cast<std::size_t>(n);
  }
  data.resize(done);
  return data;
}

void check_target(const std::string& path, const std::string& what, bool folder) {
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) {
    if (errno == ENOENT) return;
    throw Error(what + ": cannot look at it (" + std::strerror(errno) + ")");
  }
  if (folder ? S_ISDIR(info.st_mode) : S_ISREG(info.st_mode)) return;
  throw Error(what + ": is " + kind_of(info.st_mode) + "; expected " +
              (folder ? "a new name or a folder" : "a new name or a regular file") + " (writing replaces what is there)");
}

void check_output(const std::string& path, const std::string& what, bool folder) {
  const fs::path target = fs::path(path).has_filename() ? fs::path(path) : fs::path(path).parent_path();  // "out/"
  const fs::path parent = folder_of(target);
  std::error_code error;
  if (!fs::is_directory(parent, error)) throw Error(what + ": directory " + parent.string() + " does not exist");
  if (folder) check_folder_target(target, what);
  else check_target(target.string(), what);
  const fs::path probe = partial_name(target);  // a partial's name: a killed run's probe is swept like one
  int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) throw Error(what + ": cannot write in " + parent.string() + " (" + std::strerror(errno) + ")");
  ::close(fd);
  ::unlink(probe.c_str());
}

void write_atomically(const std::string& path, const std::string& data) {
  const fs::path target(path);
  const std::string what = "cannot write " + quoted(path);
  if (is_staged(folder_of(target))) {  // a new file in our own staged folder: no one else writes there
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
    if (fd < 0) throw Error(what + ": " + std::strerror(errno));
    const std::string reason = write_and_close(fd, data);
    if (reason.empty()) return;
    ::unlink(path.c_str());
    throw Error(what + ": " + reason);
  }
  check_target(path, what);
  remove_stale(folder_of(target), target.filename().string());
  fs::path temporary;
  int fd = -1;
  for (int attempt = 0; fd < 0 && attempt < 100; ++attempt) {
    temporary = partial_name(target);  // 0666 less the umask: what a plain open gives
    fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) throw Error(what + ": " + std::strerror(errno));
  }
  if (fd < 0) throw Error(what + ": no free temporary name beside it");
  std::string reason = write_and_close(fd, data);
  if (reason.empty()) {
    try {
      check_target(path, what);  // again: the place may have changed meanwhile
    } catch (const Error&) {
      ::unlink(temporary.c_str());
      throw;
    }
  }
  if (reason.empty() && std::rename(temporary.c_str(), path.c_str()) != 0) reason = std::strerror(errno);
  if (!reason.empty()) {
    ::unlink(temporary.c_str());
    throw Error(what + ": " + reason);
  }
  fsync_folder(folder_of(target));
}

std::string stage_folder(const std::string& path, const std::string& what) {
  const fs::path target = fs::path(path).has_filename() ? fs::path(path) : fs::path(path).parent_path();
  check_folder_target(target, what);
  remove_stale(folder_of(target), target.filename().string());
  for (int attempt = 0; attempt < 100; ++attempt) {
    const fs::path staged = partial_name(target);
    if (::mkdir(staged.c_str(), 0777) == 0) {  // 0777 less the umask, as mkdir
      std::lock_guard<std::mutex> hold(staging_lock);
      staging.insert(staged);
      return staged.string();
    }
    if (errno != EEXIST) throw Error(what + ": cannot create a folder beside it (" + std::strerror(errno) + ")");
  }
  throw Error(what + ": no free folder name beside it");
}

void place_folder(const std::string& staged, const std::string& path, const std::string& what) {
  {
    std::lock_guard<std::mutex> hold(staging_lock);
    staging.erase(fs::path(staged));
  }
  const fs::path target = fs::path(path).has_filename() ? fs::path(path) : fs::path(path).parent_path();
  std::vector<fs::path> files;
  std::error_code error;
  for (const fs::directory_entry& file : fs::directory_iterator(staged, error)) files.push_back(file.path());
  std::size_t moved = 0;
  std::string reason = error ? error.message() : "";
  bool into = false;  // the files moved into a folder there, one by one
  try {
    into = reason.empty() && fs::is_directory(target, error);
    if (reason.empty() && !into) {
      check_target(target.string(), what, true);
      fsync_folder(staged);  // its files were fsynced as write_atomically wrote them
      if (std::rename(staged.c_str(), target.c_str()) == 0) moved = files.size();
      else if (errno == ENOTEMPTY || errno == EEXIST) into = true;  // another writer has just made the folder
      else reason = std::strerror(errno);
    }
    if (into) {
      for (const fs::path& file : files) check_target((target / file.filename()).string(), what + "/" + file.filename().string());
      for (; moved < files.size(); ++moved)
        if (std::rename(files[moved].c_str(), (target / files[moved].filename()).c_str()) != 0) {
          reason = std::strerror(errno);
          break;
        }
    }
  } catch (const Error&) {
    fs::remove_all(staged, error);
    throw;
  }
  fs::remove_all(staged, error);
  fsync_folder(into ? target : folder_of(target));
  if (reason.empty()) return;
  if (moved == 0) throw Error(what + ": cannot put the folder in place (" + reason + "); nothing was written");
  throw Error(what + ": " + std::to_string(moved) + " of " + std::to_string(files.size()) +
              " files were moved in before a failure (" + reason + "); the other " +
              std::to_string(files.size() - moved) + " were not written");
}

}  // namespace starflow::native
