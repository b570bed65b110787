# tests/fuzz/run_fuzz.cmake: builds the fuzz targets with clang in their own build directory and
# runs each on its seed corpus for a bounded time; any finding (crash, sanitizer report, uncaught
# exception other than dg::Error, allocation over 512 MB, input slower than 20 s) fails.
#   cmake -P tests/fuzz/run_fuzz.cmake                          build, then run every target
#   cmake -D MODE=build -D BUILD_DIR=<dir> -P run_fuzz.cmake    configure + build only
#   cmake -D MODE=run -D FUZZ_TARGET=npy -D BUILD_DIR=<dir> -P run_fuzz.cmake   run one target
# Variables: CLANGXX (default: clang++-14 from PATH), BUILD_DIR (default: build-fuzz at the
# repository root), FUZZ_SECONDS (default 20, per target), GENERATOR and MAKE_PROGRAM (optional).
# New inputs go to <BUILD_DIR>/corpus/<target>, reports and crashing inputs to <BUILD_DIR>/findings.
cmake_minimum_required(VERSION 3.25)

set(_src "${CMAKE_CURRENT_LIST_DIR}")
set(_all_targets safetensors npy json idx cifar10 checkpoint)
if(NOT MODE)
  set(MODE all)
endif()
if(NOT BUILD_DIR)
  get_filename_component(BUILD_DIR "${_src}/../../build-fuzz" ABSOLUTE)
endif()
if(NOT FUZZ_SECONDS)
  set(FUZZ_SECONDS 20)
endif()

function(fuzz_build)
  if(NOT CLANGXX)
    find_program(CLANGXX clang++-14)
  endif()
  if(NOT CLANGXX)
    message(FATAL_ERROR "run_fuzz: clang++-14 not found (apt-get install clang-14 libclang-rt-14-dev)")
  endif()
  if(NOT EXISTS "${BUILD_DIR}/CMakeCache.txt")
    set(gen "")
    if(GENERATOR)
      set(gen -G "${GENERATOR}")
      if(MAKE_PROGRAM)
        list(APPEND gen "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
      endif()
    endif()
    execute_process(COMMAND "${CMAKE_COMMAND}" -S "${_src}" -B "${BUILD_DIR}" ${gen}
                            "-DCMAKE_CXX_COMPILER=${CLANGXX}" -DCMAKE_BUILD_TYPE=
                    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
    if(NOT rc EQUAL 0)
      file(REMOVE "${BUILD_DIR}/CMakeCache.txt")  # configure again next time
      message(FATAL_ERROR "run_fuzz: configuring ${_src} with ${CLANGXX} failed:\n${out}")
    endif()
  endif()
  set(targets "")
  foreach(t IN LISTS _all_targets)
    list(APPEND targets fuzz_${t})
  endforeach()
  execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" -j 2 --target ${targets}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "run_fuzz: building the fuzz targets failed:\n${out}")
  endif()
  message(STATUS "run_fuzz: fuzz targets built in ${BUILD_DIR}")
endfunction()

function(fuzz_run target)
  set(exe "${BUILD_DIR}/fuzz_${target}")
  if(NOT EXISTS "${exe}")
    message(FATAL_ERROR "run_fuzz: ${exe} not built (run with MODE=build first)")
  endif()
  set(work "${BUILD_DIR}/corpus/${target}")
  set(findings "${BUILD_DIR}/findings/${target}")
  file(MAKE_DIRECTORY "${work}" "${findings}")
  set(ENV{UBSAN_OPTIONS} "print_stacktrace=1:halt_on_error=1")
  # New inputs go to the first directory; the seeds (second) are only read.
  execute_process(
    COMMAND "${exe}" -max_total_time=${FUZZ_SECONDS} -max_len=8192 -timeout=20 -rss_limit_mb=2048
            -malloc_limit_mb=512 -print_final_stats=1 "-artifact_prefix=${findings}/" "${work}" "${_src}/corpus/${target}"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  file(WRITE "${findings}/last_run.log" "${out}")
  if(NOT rc EQUAL 0)
    string(LENGTH "${out}" n)
    if(n GREATER 8000)
      math(EXPR start "${n} - 8000")
      string(SUBSTRING "${out}" ${start} -1 out)
    endif()
    message(FATAL_ERROR "run_fuzz: fuzz_${target} found a problem (exit ${rc}); the input is in ${findings}/, "
                        "replay it with: ${exe} <file>\n${out}")
  endif()
  string(REGEX MATCH "Done [0-9]+ runs in [0-9]+ second" done "${out}")
  string(REGEX MATCH "new_units_added: +[0-9]+" added "${out}")
  string(REGEX MATCH "peak_rss_mb: +[0-9]+" rss "${out}")
  message(STATUS "run_fuzz: fuzz_${target}: no findings; ${done}(s); ${added}; ${rss}")
endfunction()

if(MODE STREQUAL "build")
  fuzz_build()
elseif(MODE STREQUAL "run")
  if(NOT FUZZ_TARGET IN_LIST _all_targets)
    message(FATAL_ERROR "run_fuzz: FUZZ_TARGET must be one of ${_all_targets}, got '${FUZZ_TARGET}'")
  endif()
  fuzz_run(${FUZZ_TARGET})
elseif(MODE STREQUAL "all")
  fuzz_build()
  foreach(t IN LISTS _all_targets)
    fuzz_run(${t})
  endforeach()
else()
  message(FATAL_ERROR "run_fuzz: unknown MODE '${MODE}' (expected build, run or all)")
endif()
