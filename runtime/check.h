// FERRY_CHECK: always-on invariant checks of ferry's own code (not of user input: that is Status).
// A failed check prints file:line and the condition, then aborts. FERRY_DCHECK is debug-only.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace ferry::detail {
[[noreturn]] void check_failed(const char* file, int line, const char* cond, const char* msg);
}

#define FERRY_CHECK(cond)                                                  \
  do {                                                                     \
    if (!(cond)) ::ferry::detail::check_failed(__FILE__, __LINE__, #cond, ""); \
  } while (0)

#define FERRY_CHECK_MSG(cond, msg)                                            \
  do {                                                                        \
    if (!(cond)) ::ferry::detail::check_failed(__FILE__, __LINE__, #cond, msg); \
  } while (0)

#ifdef NDEBUG
#define FERRY_DCHECK(cond) \
  do {                     \
  } while (0)
#else
#define FERRY_DCHECK(cond) FERRY_CHECK(cond)
#endif
