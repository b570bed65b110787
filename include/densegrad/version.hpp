// densegrad/version.hpp: the library version, written down in exactly one place.
// CMakeLists.txt reads the three numbers below; the string is built from them.
#pragma once

#define DENSEGRAD_VERSION_MAJOR 0
#define DENSEGRAD_VERSION_MINOR 1
#define DENSEGRAD_VERSION_PATCH 0

#define DENSEGRAD_VERSION_STR_(x) #x
#define DENSEGRAD_VERSION_XSTR_(x) DENSEGRAD_VERSION_STR_(x)

/// The version as "MAJOR.MINOR.PATCH", e.g. "0.1.0".
#define DENSEGRAD_VERSION                             \
    DENSEGRAD_VERSION_XSTR_(DENSEGRAD_VERSION_MAJOR) "." \
    DENSEGRAD_VERSION_XSTR_(DENSEGRAD_VERSION_MINOR) "." \
    DENSEGRAD_VERSION_XSTR_(DENSEGRAD_VERSION_PATCH)
