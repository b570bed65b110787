// densegrad/core/options.hpp: the macro behind every options struct (Conv2dOptions,
// AdamWOptions, ...): chainable setters like the PyTorch C++ frontend's TORCH_ARG.
#pragma once

/// Declares an option `name` with a chainable setter name(v) and a getter name().
/// Example: struct O { DENSEGRAD_ARG(double, lr) = 1e-3; };  O().lr(0.1).lr() == 0.1
#define DENSEGRAD_ARG(type, name)                          \
 public:                                                   \
  auto& name(const type& v) { name##_ = v; return *this; } \
  const type& name() const { return name##_; }             \
                                                           \
 private:                                                  \
  type name##_
