# tests/dist/expect_failure.cmake: CTest driver for the tests that a failing rank ends the
# whole job (dist_fail_*, registered in tests/CMakeLists.txt):
#   cmake -D "CMD=mpiexec;-n;2;test_dist;--inject-failure;throw" -D "EXPECT=<regex>" -D TIMEOUT=<s> -P expect_failure.cmake
# Passes when the job ends within TIMEOUT seconds (no rank left waiting in a collective), with a
# non-zero status, and its output (stdout and stderr together) matches EXPECT.
cmake_minimum_required(VERSION 3.25)
string(TIMESTAMP start "%s")
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT ${TIMEOUT})
string(TIMESTAMP stop "%s")
math(EXPR seconds "${stop} - ${start}")
if(NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "the job did not end by itself within ${TIMEOUT} s (${rc}): a rank hangs\n${out}\n${err}")
endif()
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a non-zero exit status, got 0:\n${out}\n${err}")
endif()
if(NOT "${out}\n${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "the output does not match '${EXPECT}':\nstdout:\n${out}\nstderr:\n${err}")
endif()
string(REGEX MATCH "${EXPECT}" line "${out}\n${err}")
message(STATUS "the job ended in ${seconds} s with status ${rc}: ${line}")
