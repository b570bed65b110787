# cmake/train_checks.cmake: helpers shared by the CTest drivers that compare rdnet_train runs
# (examples/rdnet/train_test.cmake, tests/dist/train_equivalence.cmake); include() it from a
# `cmake -P` script.

# metrics.csv rows without the seconds column (wall time differs from run to run).
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

# Fails unless a run resumed at epoch 2 (its output: resumed_out) ended exactly as the straight
# run did: the same metrics.csv but the seconds (expected_rows rows with the header, when given)
# and the same tensors in last.safetensors, byte for byte.
function(expect_resumed_equal resumed_out straight_dir resumed_dir)
  if(NOT resumed_out MATCHES "resuming .* at epoch 2")
    message(FATAL_ERROR "the resumed run did not start at epoch 2:\n${resumed_out}")
  endif()
  read_metrics("${straight_dir}/metrics.csv" m_a)
  read_metrics("${resumed_dir}/metrics.csv" m_b)
  list(LENGTH m_a rows)
  if(NOT m_a STREQUAL m_b)
    message(FATAL_ERROR "metrics differ:\nstraight: ${m_a}\nresumed:  ${m_b}")
  endif()
  if(ARGC GREATER 3 AND NOT rows EQUAL ARGV3)
    message(FATAL_ERROR "expected ${ARGV3} rows of metrics.csv (with the header), got ${rows}:\n${m_a}")
  endif()
  read_tensor_bytes("${straight_dir}/last.safetensors" t_a)
  read_tensor_bytes("${resumed_dir}/last.safetensors" t_b)
  string(LENGTH "${t_a}" n)
  if(NOT t_a STREQUAL t_b OR n EQUAL 0)
    message(FATAL_ERROR "last.safetensors tensors differ between the straight and the resumed run")
  endif()
  message(STATUS "resume: metrics and ${n} hex digits of checkpoint tensors identical")
endfunction()
