#include "test_util.h"

#include <sys/wait.h>

#include <cstdio>

namespace ferry::test {

CmdResult run_ferry(const std::string& args, bool stdout_only) {
  return run_shell(std::string(FERRY_BIN) + " " + args + (stdout_only ? " 2>/dev/null" : " 2>&1"));
}

CmdResult run_shell(const std::string& cmd) {
  CmdResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = pclose(p);
  if (WIFEXITED(st)) r.exit_code = WEXITSTATUS(st);
  else if (WIFSIGNALED(st)) r.exit_code = 128 + WTERMSIG(st);
  return r;
}

}  // namespace ferry::test
