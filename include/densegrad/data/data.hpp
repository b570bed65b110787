// densegrad/data/data.hpp: the data library in one include: datasets (IDX for MNIST/Fashion-MNIST,
// CIFAR-10 binary, synthetic), augmentation, and the threaded DataLoader.
// Not part of densegrad.hpp: it needs zlib (link ZLIB::ZLIB) and threads (Threads::Threads).
#pragma once

#include "dataset.hpp"
#include "idx.hpp"
#include "cifar10.hpp"
#include "synthetic.hpp"
#include "augment.hpp"
#include "loader.hpp"
