// The C++ unit tests' one assertion: no framework, so they build with nothing but the compiler.
#pragma once

#include <cstdio>

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
