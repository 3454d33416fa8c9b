// The C++ unit tests' one assertion: no framework, so they build with nothing but the compiler.
#pragma once

#include <cstddef>
#include <cstdio>
#include <cstring>

inline int g_passed = 0;
inline int g_failed = 0;

// CHECK(condition, printf-style context): counts, and prints the failures only.
#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (cond) {                                                   \
      ++g_passed;                                                 \
    } else {                                                      \
      ++g_failed;                                                 \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)

struct TestCase {
  const char* name;
  void (*fn)();
};

// Runs the tests named on the command line (all of them without names), each between its name and "ok" or
// "FAILED", then the totals; exit status 0 only where every check passed and every name given was a test's.
template <size_t N>
int run_tests(const TestCase (&tests)[N], int argc, char** argv) {
  int ran = 0;
  for (const auto& t : tests) {
    bool wanted = argc < 2;
    for (int k = 1; k < argc; ++k) wanted = wanted || std::strcmp(argv[k], t.name) == 0;
    if (!wanted) continue;
    ++ran;
    const int failed_before = g_failed;
    std::printf("%s\n", t.name);
    t.fn();
    std::printf("%s: %s\n", t.name, g_failed == failed_before ? "ok" : "FAILED");
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  if (ran != (argc < 2 ? static_cast<int>(N) : argc - 1)) {
    std::printf("FAIL: %d tests ran; a name given is not a test's (or was given twice)\n", ran);
    return 1;
  }
  return g_failed == 0 ? 0 : 1;
}
