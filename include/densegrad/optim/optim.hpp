// densegrad/optim/optim.hpp: everything in optim/ in one include: the Optimizer base and
// param groups, SGD, AdamW, LR schedules, gradient clipping, ModelEMA.
// Includes only: each header documents its own part.
#pragma once

#include "optimizer.hpp"
#include "sgd.hpp"
#include "adamw.hpp"
#include "schedule.hpp"
#include "clip.hpp"
#include "ema.hpp"
