# Benchmarks and the performance report: `fqt bench gemm` / `fqt bench step` on tiny shapes
# (fields the report relies on), the report generator on fixture JSON (a quick-mode run), and
# scripts/perf_history on fixture reports.
set(PERF_FQT $<TARGET_FILE:fqt_cli>)
set(PERF_EXPECT ${CMAKE_CURRENT_SOURCE_DIR}/cli/expect.sh)
add_test(NAME perf.bench_gemm_json COMMAND ${PERF_EXPECT} 0 "\"fp32_gflops\"" --
         ${PERF_FQT} bench gemm --m 64 --n 48 --k 96 --reps 1 --threads 1 --json)
add_test(NAME perf.bench_gemm_shapes COMMAND ${PERF_EXPECT} 0 "stage3.block0.conv2 wgrad [(][+]4 more[)]" --
         ${PERF_FQT} bench gemm --m 32 --n 32 --k 32 --shapes preact_resnet20 --batch 2 --reps 1 --threads 1)
add_test(NAME perf.bench_step_json COMMAND ${PERF_EXPECT} 0 "\"peak_rss_bytes\"" --
         ${PERF_FQT} bench step --model mlp --mode fp32,qat,fqt --dgrad psq --arith int,sim --batch 8 --steps 1
         --warmup 0 --threads 1 --json)
add_test(NAME perf.bench_step_bad_arith COMMAND ${PERF_EXPECT} 2 "unknown arithmetic .fp16. .valid: int, sim" --
         ${PERF_FQT} bench step --model mlp --arith fp16 --steps 1)
find_program(PERF_PYTHON NAMES python3 PATHS /usr/bin NO_DEFAULT_PATH)
if(PERF_PYTHON)
  add_test(NAME perf.report_generator
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/perf/check_report.sh ${PERF_PYTHON}
                   ${CMAKE_SOURCE_DIR}/scripts/perf_report_md.py ${CMAKE_CURRENT_SOURCE_DIR}/perf/fixtures
                   ${CMAKE_CURRENT_BINARY_DIR}/perf_report_test.md)
  add_test(NAME perf.history
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/perf/check_history.sh ${PERF_PYTHON}
                   ${CMAKE_SOURCE_DIR}/scripts/perf_history.py ${CMAKE_CURRENT_SOURCE_DIR}/perf/fixtures/history)
endif()
add_test(NAME perf.bench_step_recompute COMMAND ${PERF_EXPECT} 0 "\"recompute\": \"auto\"" --
         ${PERF_FQT} bench step --model cnn --mode fqt --dgrad psq --recompute off,auto,on --batch 4 --input 1x8x8
         --steps 1 --warmup 0 --threads 1 --json)
add_test(NAME perf.bench_step_dgrad_rows COMMAND ${PERF_EXPECT} 0 "\"dgrad_rows\": \"sample\"" --
         ${PERF_FQT} bench step --model cnn --mode fqt --dgrad psq,bhq --dgrad-rows pixel,sample --batch 4 --input 1x8x8
         --steps 1 --warmup 0 --threads 1 --json)
add_test(NAME perf.bench_step_bad_recompute COMMAND ${PERF_EXPECT} 2 "recompute.*off, auto or on" --
         ${PERF_FQT} bench step --model mlp --recompute yes --steps 1)
add_test(NAME perf.bench_gemm_bad_backend COMMAND ${PERF_EXPECT} 2 "backend.*avx2" --
         ${PERF_FQT} bench gemm --m 8 --n 8 --k 8 --backend sse)
set_tests_properties(perf.bench_gemm_json perf.bench_gemm_shapes perf.bench_step_json perf.bench_step_bad_arith
                     perf.bench_step_recompute perf.bench_step_dgrad_rows perf.bench_step_bad_recompute perf.bench_gemm_bad_backend
                     PROPERTIES ENVIRONMENT "OMP_WAIT_POLICY=passive" TIMEOUT 60)
