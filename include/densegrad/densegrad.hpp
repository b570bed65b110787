// densegrad/densegrad.hpp: the one header users include.
// Pulls in the core tensor, autograd, ops and io; backends are chosen at compile time.
#pragma once

#include "version.hpp"

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/generator.hpp"
#include "core/precision.hpp"
#include "core/shape.hpp"
#include "core/tensor.hpp"

#include "autograd/grad_mode.hpp"
#include "autograd/tape.hpp"
#include "autograd/checkpoint.hpp"

#include "ops/activation.hpp"
#include "ops/concat.hpp"
#include "ops/conv.hpp"
#include "ops/dense.hpp"
#include "ops/dropout.hpp"
#include "ops/elementwise.hpp"
#include "ops/fused.hpp"
#include "ops/linear.hpp"
#include "ops/loss.hpp"
#include "ops/matmul.hpp"
#include "ops/norm.hpp"
#include "ops/pool.hpp"
#include "ops/reduce.hpp"
#include "ops/shape.hpp"

#include "autograd/gradcheck.hpp"

#include "io/npy.hpp"
#include "io/safetensors.hpp"
#include "io/tensor_io.hpp"

#include "nn/init.hpp"
#include "nn/layers.hpp"
#include "nn/module.hpp"

#include "optim/optim.hpp"

#include "data/data.hpp"
