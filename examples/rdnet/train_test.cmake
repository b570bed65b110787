# examples/rdnet/train_test.cmake: CTest driver for rdnet_train's tests that need more than
# one run or more than a regular expression (registered in examples/CMakeLists.txt):
#   MODE=resume        2 epochs == 1 epoch (--stop-after 1) + --resume + 1 epoch, bit for bit:
#                      the same metrics.csv (all but the seconds column) and the same tensors
#                      (model, optimizer, schedule, RNG) in last.safetensors, byte for byte.
#   MODE=missing_data  no Fashion-MNIST: exit code 1 and one line naming the apt package.
# Run as: cmake -D MODE=... -D TRAIN=<rdnet_train> -D WORK_DIR=<dir> -D "ARGS=<tiny run>" -P train_test.cmake
# Not a test of accuracy: rdnet_train_synthetic checks that with PASS_REGULAR_EXPRESSION.
cmake_minimum_required(VERSION 3.25)
separate_arguments(ARGS UNIX_COMMAND "${ARGS}")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run_train out_var)  # runs rdnet_train with ARGN, fails the test unless it exits 0
  execute_process(COMMAND "${TRAIN}" ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "rdnet_train ${ARGN}\nexited with ${rc}:\n${out}\n${err}")
  endif()
  set(${out_var} "${out}" PARENT_SCOPE)
endfunction()

include("${CMAKE_CURRENT_LIST_DIR}/../../cmake/train_checks.cmake")  # read_metrics, expect_resumed_equal

if(MODE STREQUAL "resume")
  run_train(out_a ${ARGS} --out "${WORK_DIR}/straight")
  run_train(out_b ${ARGS} --out "${WORK_DIR}/resumed" --stop-after 1)
  if(NOT EXISTS "${WORK_DIR}/resumed/last.safetensors" OR EXISTS "${WORK_DIR}/resumed/best.safetensors.tmp")
    message(FATAL_ERROR "--stop-after 1 left no checkpoint:\n${out_b}")
  endif()
  run_train(out_c --resume "${WORK_DIR}/resumed/last.safetensors")  # settings and --out come from the checkpoint
  expect_resumed_equal("${out_c}" "${WORK_DIR}/straight" "${WORK_DIR}/resumed" 3)
elseif(MODE STREQUAL "missing_data")
  execute_process(COMMAND "${TRAIN}" --data-dir "${WORK_DIR}/no-such-dir" --out "${WORK_DIR}/out"
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  string(STRIP "${err}" err)
  string(FIND "${err}" "\n" newline)
  if(NOT rc EQUAL 1 OR NOT newline EQUAL -1 OR NOT err MATCHES "apt-get install dataset-fashion-mnist.*--data-dir")
    message(FATAL_ERROR "expected exit code 1 and one line naming the apt package and --data-dir, got ${rc}:\n"
                        "stdout: ${out}\nstderr: ${err}")
  endif()
  message(STATUS "missing data: ${err}")
else()
  message(FATAL_ERROR "train_test.cmake: unknown MODE '${MODE}' (expected resume or missing_data)")
endif()
