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

# metrics.csv without the seconds column (wall time differs from run to run).
function(read_metrics path out_var)
  file(STRINGS "${path}" lines)
  set(kept "")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE ",[^,]*$" "" line "${line}")
    list(APPEND kept "${line}")
  endforeach()
  set(${out_var} "${kept}" PARENT_SCOPE)
endfunction()

# The data section of a safetensors file, as hex: everything after the 8-byte length and the
# JSON header. The headers differ only in __metadata__ (the command lines), not in tensors.
function(read_tensor_bytes path out_var)
  file(READ "${path}" len_hex LIMIT 8 HEX)
  set(be "")
  foreach(i RANGE 14 0 -2)  # little-endian u64 -> big-endian hex digits
    string(SUBSTRING "${len_hex}" ${i} 2 byte)
    string(APPEND be "${byte}")
  endforeach()
  math(EXPR offset "0x${be} + 8")
  file(READ "${path}" data OFFSET ${offset} HEX)
  set(${out_var} "${data}" PARENT_SCOPE)
endfunction()

if(MODE STREQUAL "resume")
  run_train(out_a ${ARGS} --out "${WORK_DIR}/straight")
  run_train(out_b ${ARGS} --out "${WORK_DIR}/resumed" --stop-after 1)
  if(NOT EXISTS "${WORK_DIR}/resumed/last.safetensors" OR EXISTS "${WORK_DIR}/resumed/best.safetensors.tmp")
    message(FATAL_ERROR "--stop-after 1 left no checkpoint:\n${out_b}")
  endif()
  run_train(out_c --resume "${WORK_DIR}/resumed/last.safetensors")  # settings and --out come from the checkpoint
  if(NOT out_c MATCHES "resuming .* at epoch 2")
    message(FATAL_ERROR "the resumed run did not start at epoch 2:\n${out_c}")
  endif()
  read_metrics("${WORK_DIR}/straight/metrics.csv" m_a)
  read_metrics("${WORK_DIR}/resumed/metrics.csv" m_b)
  list(LENGTH m_a rows)
  if(NOT m_a STREQUAL m_b OR NOT rows EQUAL 3)
    message(FATAL_ERROR "metrics differ (or not 2 epochs):\nstraight: ${m_a}\nresumed:  ${m_b}")
  endif()
  read_tensor_bytes("${WORK_DIR}/straight/last.safetensors" t_a)
  read_tensor_bytes("${WORK_DIR}/resumed/last.safetensors" t_b)
  string(LENGTH "${t_a}" n)
  if(NOT t_a STREQUAL t_b OR n EQUAL 0)
    message(FATAL_ERROR "last.safetensors tensors differ between the straight and the resumed run")
  endif()
  message(STATUS "resume: metrics and ${n} hex digits of checkpoint tensors identical")
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
