// The one Catch2 main, compiled once into densegrad_catch_main and linked into every test.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
