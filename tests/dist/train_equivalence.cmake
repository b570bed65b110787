# tests/dist/train_equivalence.cmake: CTest driver for rdnet_train on 2 ranks (registered in
# tests/CMakeLists.txt; ARGS is a tiny synthetic run, B an even per-rank batch):
#   MODE=equivalence  one process with --batch-size 2B (WORK_DIR/single) vs `mpiexec -n 2` with
#                     --batch-size B (WORK_DIR/dist) and with 2 micro-batches of B/2 (--accum-steps 2,
#                     WORK_DIR/accum): 2B images per step in all three; the same metrics.csv within
#                     tolerance (see compare_close) and the same lr; only rank 0 prints.
#   MODE=resume       2 ranks, --batch-size B: 1 epoch (--stop-after 1) + --resume + 1 epoch ==
#                     MODE=equivalence's 2 epochs (DIST_DIR), bit for bit: metrics.csv without
#                     seconds, and every checkpoint tensor.
# Run as: cmake -D MODE=... -D TRAIN=<rdnet_train> -D "MPIEXEC=mpiexec;-n;2" -D WORK_DIR=<dir>
#         -D "ARGS=<tiny run>" -D B=<batch per rank> [-D DIST_DIR=<dir>] [-D RUN_TIMEOUT=<s per run>]
#         -P train_equivalence.cmake
cmake_minimum_required(VERSION 3.25)
if(NOT RUN_TIMEOUT)
  set(RUN_TIMEOUT 50)
endif()
separate_arguments(ARGS UNIX_COMMAND "${ARGS}")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run out_var)  # runs ARGN, fails the test unless it exits 0
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT ${RUN_TIMEOUT})
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${ARGN}\nexited with ${rc}:\n${out}\n${err}")
  endif()
  set(${out_var} "${out}" PARENT_SCOPE)
endfunction()

include("${CMAKE_CURRENT_LIST_DIR}/../../cmake/train_checks.cmake")  # read_metrics, expect_resumed_equal

# A decimal like "2.509201" or "10.16" in millionths (CMake's math is integer only).
function(to_micro text out_var)
  if(NOT text MATCHES "^(-?)([0-9]+)\\.?([0-9]*)$")
    message(FATAL_ERROR "not a plain decimal number: '${text}'")
  endif()
  set(sign "${CMAKE_MATCH_1}")
  set(int "${CMAKE_MATCH_2}")
  string(SUBSTRING "${CMAKE_MATCH_3}000000" 0 6 frac)
  string(REGEX REPLACE "^0+([0-9])" "\\1" frac "${frac}")
  math(EXPR v "${sign}(${int} * 1000000 + ${frac})")
  set(${out_var} ${v} PARENT_SCOPE)
endfunction()

# Fails unless two metrics.csv agree: the same epochs and lr (the same schedule), train and test
# loss within 0.002, test accuracy within 1 percentage point.
function(compare_close path_a path_b)
  read_metrics("${path_a}" a)
  read_metrics("${path_b}" b)
  list(LENGTH a na)
  list(LENGTH b nb)
  if(NOT na EQUAL nb OR na LESS 2)
    message(FATAL_ERROR "metrics differ in length:\n${a}\n${b}")
  endif()
  math(EXPR last "${na} - 1")
  foreach(i RANGE 1 ${last})
    list(GET a ${i} row_a)
    list(GET b ${i} row_b)
    string(REPLACE "," ";" ra "${row_a}")
    string(REPLACE "," ";" rb "${row_b}")
    list(GET ra 4 lr_a)
    list(GET rb 4 lr_b)
    if(NOT lr_a STREQUAL lr_b)
      message(FATAL_ERROR "lr differs (the schedules differ):\n${row_a}\n${row_b}")
    endif()
    foreach(col_tol IN ITEMS 1:2000 2:2000 3:1000000)  # column:tolerance in millionths
      string(REPLACE ":" ";" col_tol "${col_tol}")
      list(GET col_tol 0 col)
      list(GET col_tol 1 tol)
      list(GET ra ${col} x)
      list(GET rb ${col} y)
      to_micro("${x}" xm)
      to_micro("${y}" ym)
      math(EXPR d "${xm} - ${ym}")
      if(d LESS 0)
        math(EXPR d "-${d}")
      endif()
      if(d GREATER tol)
        message(FATAL_ERROR "column ${col} differs by ${d} millionths (more than ${tol}):\n${row_a}\n${row_b}")
      endif()
    endforeach()
  endforeach()
endfunction()

math(EXPR B2 "${B} * 2")
math(EXPR half "${B} / 2")
if(MODE STREQUAL "equivalence")
  run(out_1 "${TRAIN}" ${ARGS} --batch-size ${B2} --out "${WORK_DIR}/single")
  run(out_2 ${MPIEXEC} "${TRAIN}" ${ARGS} --batch-size ${B} --out "${WORK_DIR}/dist")
  run(out_3 ${MPIEXEC} "${TRAIN}" ${ARGS} --batch-size ${half} --accum-steps 2 --out "${WORK_DIR}/accum")
  string(REGEX MATCHALL "rdnet_train: done" done "${out_2}")
  list(LENGTH done n_done)
  if(NOT out_2 MATCHES "data-parallel on 2 ranks" OR NOT n_done EQUAL 1)
    message(FATAL_ERROR "expected one rank to print, and to say it trains on 2 ranks:\n${out_2}")
  endif()
  compare_close("${WORK_DIR}/single/metrics.csv" "${WORK_DIR}/dist/metrics.csv")
  compare_close("${WORK_DIR}/single/metrics.csv" "${WORK_DIR}/accum/metrics.csv")
  foreach(r IN ITEMS single dist accum)
    file(READ "${WORK_DIR}/${r}/metrics.csv" m)
    message(STATUS "${r}:\n${m}")
  endforeach()
elseif(MODE STREQUAL "resume")
  run(out_b ${MPIEXEC} "${TRAIN}" ${ARGS} --batch-size ${B} --out "${WORK_DIR}/resumed" --stop-after 1)
  run(out_c ${MPIEXEC} "${TRAIN}" --resume "${WORK_DIR}/resumed/last.safetensors")
  expect_resumed_equal("${out_c}" "${DIST_DIR}" "${WORK_DIR}/resumed")
else()
  message(FATAL_ERROR "train_equivalence.cmake: unknown MODE '${MODE}' (expected equivalence or resume)")
endif()
