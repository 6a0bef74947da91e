// Status and Expected<T>: what can fail at run time (I/O, bad files, bad flags, out of memory)
// returns one of these, with a message that names the file, tensor or flag. Invariants of ferry's
// own code use FERRY_CHECK (check.h) instead.
#pragma once

#include <cstdio>
#include <string>
#include <utility>
#include <variant>

namespace ferry {

// What kind of failure; the CLI maps every kind to a non-zero exit code.
enum class ErrorCode {
  kOk = 0,
  kInvalidArgument,  // a flag or parameter value the user gave
  kNotFound,         // a file, directory or tensor that should exist
  kCorrupt,          // a file whose contents disagree with themselves or with the config
  kUnsupported,      // a valid input ferry does not handle (architecture, dtype, rope type)
  kIo,               // the operating system refused a read, write or map
  kOutOfMemory,      // a budget or an allocation that cannot be met
  kInternal,
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }
  bool ok() const { return code_ == ErrorCode::kOk; }
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // Returns this status with `context` put in front of the message ("loading X: <message>").
  Status with_context(const std::string& context) const {
    if (ok()) return *this;
    return Status(code_, context + ": " + message_);
  }

 private:
  ErrorCode code_ = ErrorCode::kOk;
  std::string message_;
};

// Formats like printf into a std::string.
[[gnu::format(printf, 1, 2)]] std::string strprintf(const char* fmt, ...);

inline Status invalid_argument(std::string m) { return {ErrorCode::kInvalidArgument, std::move(m)}; }
inline Status not_found(std::string m) { return {ErrorCode::kNotFound, std::move(m)}; }
inline Status corrupt(std::string m) { return {ErrorCode::kCorrupt, std::move(m)}; }
inline Status unsupported(std::string m) { return {ErrorCode::kUnsupported, std::move(m)}; }
inline Status io_error(std::string m) { return {ErrorCode::kIo, std::move(m)}; }
inline Status out_of_memory(std::string m) { return {ErrorCode::kOutOfMemory, std::move(m)}; }

// Holds either a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Expected {
 public:
  Expected(T value) : v_(std::move(value)) {}  // NOLINT: implicit on purpose
  Expected(Status status) : v_(std::move(status)) {
    if (std::get<Status>(v_).ok()) v_ = Status(ErrorCode::kInternal, "Expected built from an OK status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return ok(); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace ferry

#define FERRY_CONCAT_INNER(a, b) a##b
#define FERRY_CONCAT(a, b) FERRY_CONCAT_INNER(a, b)

// Returns the status from the enclosing function if `expr` (a Status) is not OK.
#define FERRY_RETURN_IF_ERROR(expr)          \
  do {                                       \
    ::ferry::Status _st = (expr);            \
    if (!_st.ok()) return _st;               \
  } while (0)

// Declares `lhs` from an Expected<T> expression, or returns its status from the enclosing function.
#define FERRY_ASSIGN_OR_RETURN(lhs, expr) FERRY_ASSIGN_OR_RETURN_IMPL(FERRY_CONCAT(_exp_, __LINE__), lhs, expr)
#define FERRY_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()
