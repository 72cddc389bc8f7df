// Errors with context. Library code throws qlora::Error whose message already
// names the file, tensor or key and what was expected; only src/cli/ turns it
// into a message on stderr and a non-zero exit code.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace qlora {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// str("tensor ", name, " has ", n, " elements") -> one string; avoids <format>,
// which the Debian 12 toolchain (g++ 12) does not ship.
template <typename... Args>
std::string str(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(str(std::forward<Args>(args)...));
}

}  // namespace qlora
