# cmake -D "CMD=prog;arg;..." -D "EXPECT=regex" -P expect_error.cmake: passes when the command
# exits with status 1 (not a signal, not 0) and its stderr matches EXPECT.
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc ERROR_VARIABLE err OUTPUT_QUIET)
if(NOT rc STREQUAL "1")
  message(FATAL_ERROR "expected exit status 1, got '${rc}'; stderr:\n${err}")
endif()
if(NOT err MATCHES "${EXPECT}")
  message(FATAL_ERROR "stderr does not match '${EXPECT}':\n${err}")
endif()
