# The fqt executable's promises: help, exit status 2 with one clear line for bad input, and
# the statistics it prints. Each test runs expect.sh STATUS REGEX -- command...
set(FQT_EXE $<TARGET_FILE:fqt_cli>)
set(EXPECT ${CMAKE_CURRENT_SOURCE_DIR}/cli/expect.sh)
set(CLI_TMP ${CMAKE_CURRENT_BINARY_DIR}/cli_tmp)
file(MAKE_DIRECTORY ${CLI_TMP})

function(fqt_cli_test name status regex)
  add_test(NAME cli.${name} COMMAND ${EXPECT} ${status} "${regex}" -- ${ARGN})
endfunction()

fqt_cli_test(help 0 "quantize.*synth|Subcommands" ${FQT_EXE} --help)
fqt_cli_test(no_command 2 "error" ${FQT_EXE})
fqt_cli_test(unknown_command 2 "error" ${FQT_EXE} frobnicate)
fqt_cli_test(quantize_help 0 "--samples.*|bias" ${FQT_EXE} quantize --help)
fqt_cli_test(quantize_missing_file 2 "cannot open" ${FQT_EXE} quantize --input ${CLI_TMP}/nope.npy)
fqt_cli_test(quantize_bad_flag 2 "error" ${FQT_EXE} quantize --input x.npy --frobnicate)
fqt_cli_test(quantize_bad_bits 2 "bit width from 2 to 8" ${FQT_EXE} quantize --input x.npy --bits 4,12)
fqt_cli_test(quantize_bad_quantizer 2 "unknown quantizer 'pqs'.*valid" ${FQT_EXE} quantize --input x.npy --quantizer pqs)
fqt_cli_test(quantize_not_npy 2 "not a valid .npy" ${FQT_EXE} quantize --input ${CMAKE_CURRENT_SOURCE_DIR}/CMakeLists.txt)
fqt_cli_test(quantize_samples 2 "samples" ${FQT_EXE} quantize --input x.npy --samples 1)

# Fixtures: a heavy-tailed matrix and a 1-D array made by the CLI itself.
add_test(NAME cli.synth_heavy COMMAND ${EXPECT} 0 "wrote" -- ${FQT_EXE} synth --kind heavy-tailed --rows 128 --cols 1024 --seed 0 --out ${CLI_TMP}/heavy.npy)
set_tests_properties(cli.synth_heavy PROPERTIES FIXTURES_SETUP heavy)
fqt_cli_test(synth_bad_kind 2 "unknown matrix kind" ${FQT_EXE} synth --kind cauchy --out ${CLI_TMP}/x.npy)
# The table prints PTQ, PSQ, BHQ rows; the JSON carries the stable field names scripts rely on.
fqt_cli_test(quantize_table 0 "bhq +4" ${FQT_EXE} quantize --input ${CLI_TMP}/heavy.npy --quantizer ptq,psq,bhq --bits 4 --samples 20)
fqt_cli_test(quantize_json 0 "\"bias_noise_floor\"" ${FQT_EXE} quantize --input ${CLI_TMP}/heavy.npy --bits 8 --samples 10 --json)
set_tests_properties(cli.quantize_table cli.quantize_json PROPERTIES FIXTURES_REQUIRED heavy)
# The ordering BHQ < PSQ < PTQ, checked on the JSON by a small script.
add_test(NAME cli.quantize_ordering COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cli/check_ordering.sh ${FQT_EXE} ${CLI_TMP}/heavy.npy)
set_tests_properties(cli.quantize_ordering PROPERTIES FIXTURES_REQUIRED heavy)
# fqt bench step --breakdown: the layers' regions and the rest add up to the step.
add_test(NAME cli.bench_step_breakdown COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cli/check_breakdown.sh ${FQT_EXE})
# fqt bench memory: one record per working-set size, latencies and bandwidths positive and a set
# within L1/L2 faster to load from than one 64 times larger; a size of 0 is refused.
add_test(NAME cli.bench_memory COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cli/check_memory.sh ${FQT_EXE})
fqt_cli_test(bench_memory_bad_size 2 "out of" ${FQT_EXE} bench memory --sizes 0.5,0)

# fqt train / eval: a tiny real run on the built-in synthetic data, then its checkpoint.
set(RUN ${CLI_TMP}/train_run)
add_test(NAME cli.train_synthetic COMMAND ${EXPECT} 0 "final test accuracy" -- ${FQT_EXE} train --data synthetic
         --model cnn --mode fqt --dgrad bhq --dgrad-bits 5 --epochs 1 --batch 64 --lr 0.02 --train-limit 256
         --test-limit 128 --out ${RUN} --overwrite --quiet)
set_tests_properties(cli.train_synthetic PROPERTIES FIXTURES_SETUP trained)
# A fresh run into a folder that holds one is refused (exit 2), keeping the saved checkpoint.
fqt_cli_test(train_no_overwrite 2 "already holds a run" ${FQT_EXE} train --data synthetic --epochs 1 --out ${RUN})
fqt_cli_test(eval_checkpoint 0 "test accuracy [0-9.]+% .* on 128 samples" ${FQT_EXE} eval --checkpoint ${RUN}/ckpt.safetensors --test-limit 128)
fqt_cli_test(train_metrics_jsonl 0 "\"test_acc\"" cat ${RUN}/metrics.jsonl)
set_tests_properties(cli.eval_checkpoint cli.train_metrics_jsonl cli.train_no_overwrite PROPERTIES FIXTURES_REQUIRED trained)
fqt_cli_test(train_help 0 "--dgrad-bits" ${FQT_EXE} train --help)
fqt_cli_test(train_bad_model 2 "unknown model|valid" ${FQT_EXE} train --data synthetic --model resnet1000)
fqt_cli_test(train_bad_mode 2 "unknown mode 'int4'" ${FQT_EXE} train --data synthetic --mode int4)
fqt_cli_test(train_bad_dgrad 2 "stochastic" ${FQT_EXE} train --data synthetic --dgrad affine)
fqt_cli_test(train_bad_bits 2 "2..8" ${FQT_EXE} train --data synthetic --dgrad-bits 1)
fqt_cli_test(train_bad_lr 2 "--lr" ${FQT_EXE} train --data synthetic --lr -1)
fqt_cli_test(train_bad_data 2 "unknown dataset" ${FQT_EXE} train --data imagenet22k)
fqt_cli_test(train_missing_data_dir 2 "cannot|missing|not found|No such" ${FQT_EXE} train --data mnist --data-dir ${CLI_TMP}/no_such_dir)
fqt_cli_test(train_existing_run 2 "already holds a run .*--resume.*--overwrite" ${FQT_EXE} train --data synthetic --out ${RUN})
set_tests_properties(cli.train_existing_run PROPERTIES FIXTURES_REQUIRED trained)
# Both start an fqt train in ${RUN}, which one fqt train at a time may use (its folder lock).
set_tests_properties(cli.train_no_overwrite cli.train_existing_run PROPERTIES RESOURCE_LOCK run_folder)
fqt_cli_test(train_resume_nothing 2 "no checkpoint" ${FQT_EXE} train --data synthetic --resume --out ${CLI_TMP}/never_ran)
# A corrupt checkpoint (this CMakeLists.txt) is rejected with a message, not a crash.
fqt_cli_test(eval_corrupt_checkpoint 2 "CMakeLists.txt" ${FQT_EXE} eval --checkpoint ${CMAKE_CURRENT_SOURCE_DIR}/CMakeLists.txt)

# Reliability (docs/RELIABILITY.md): every subcommand x class of bad input exits 2 with one
# clear line and leaves no output behind; kill -9 at random moments, then --resume, ends
# byte-identical to an uninterrupted run (10 trials).
add_test(NAME cli.bad_inputs COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cli/bad_inputs.sh ${FQT_EXE} ${CLI_TMP}/bad_inputs)
# fqt train/eval with a run folder at stake: --max-steps checkpoints and resumes bit for bit,
# failed resumes/overwrites, damaged checkpoint metadata and stored configurations, divergence,
# mixed-shape MNIST files, ignored options: exit 2 with one line and the folder unchanged.
add_test(NAME cli.train_inputs COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cli/train_inputs.sh ${FQT_EXE} ${CLI_TMP}/train_inputs)
set_tests_properties(cli.train_inputs PROPERTIES TIMEOUT 300)
add_test(NAME cli.kill_resume COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cli/kill_resume.sh ${FQT_EXE} ${CLI_TMP}/kill_resume 10 12345)
set_tests_properties(cli.kill_resume PROPERTIES TIMEOUT 300)
fqt_cli_test(train_on_nonfinite_stop 2 "non-finite gradient at epoch 1 step 2, layer conv2: .*last good checkpoint .*saved after 2 steps. is kept"
             env FQT_TEST_POISON=grad:conv2.weight:2 ${FQT_EXE} train --data synthetic --model cnn --epochs 1 --batch 64
             --train-limit 256 --test-limit 64 --ckpt-every 1 --quiet --overwrite --out ${CLI_TMP}/nan_stop)
fqt_cli_test(train_on_nonfinite_skip 0 "1 step.s. skipped"
             env FQT_TEST_POISON=grad:fc.weight:1 ${FQT_EXE} train --data synthetic --model cnn --epochs 1 --batch 64
             --train-limit 256 --test-limit 64 --on-nonfinite skip --quiet --overwrite --out ${CLI_TMP}/nan_skip)
# fqt variance: help, clear errors, a small real measurement on the trained checkpoint, plots.
fqt_cli_test(variance_help 0 "--dgrad-bits.*--samples|--samples" ${FQT_EXE} variance --help)
fqt_cli_test(variance_bad_bits 2 "bit width from 2 to 8" ${FQT_EXE} variance --data synthetic --dgrad-bits 4,9)
fqt_cli_test(variance_one_batch 2 "--batches must be at least 2" ${FQT_EXE} variance --data synthetic --batches 1)
fqt_cli_test(variance_deterministic 2 "must be stochastic" ${FQT_EXE} variance --data synthetic --dgrad affine)
fqt_cli_test(variance_bad_breakdown 2 "--breakdown" ${FQT_EXE} variance --data synthetic --breakdown bhq4)
fqt_cli_test(variance_missing_checkpoint 2 "cannot open" ${FQT_EXE} variance --checkpoint ${CLI_TMP}/nope.safetensors)
add_test(NAME cli.variance_run COMMAND ${EXPECT} 0 "Per-layer breakdown, dgrad bhq 4-bit" -- ${FQT_EXE} variance
         --checkpoint ${RUN}/ckpt.safetensors --dgrad ptq,psq,bhq --dgrad-bits 4,8 --samples 3 --batches 2 --batch 32
         --threads 1 --out ${CLI_TMP}/variance --quiet)
set_tests_properties(cli.variance_run PROPERTIES FIXTURES_REQUIRED trained FIXTURES_SETUP variance)
add_test(NAME cli.variance_json_fields COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cli/check_variance_json.sh ${CLI_TMP}/variance/variance.json)
set_tests_properties(cli.variance_json_fields PROPERTIES FIXTURES_REQUIRED variance)
# The table shows the wgrad-only floor as quantizer "none"; --no-floor leaves it out of the records.
fqt_cli_test(variance_floor_row 0 "none +- +[0-9.]+e[-+][0-9]+ +[0-9.]+e" ${FQT_EXE} variance --data synthetic --model cnn
             --dgrad psq --dgrad-bits 8 --samples 2 --batches 2 --batch 16 --threads 1 --breakdown none --quiet)
add_test(NAME cli.variance_no_floor COMMAND sh -c "$<TARGET_FILE:fqt_cli> variance --data synthetic --model cnn --dgrad psq \
  --dgrad-bits 8 --samples 2 --batches 2 --batch 16 --threads 1 --breakdown none --no-floor --json > ${CLI_TMP}/no_floor.json \
  && grep -q '\"quant_variance_se\"' ${CLI_TMP}/no_floor.json && ! grep -q '\"quantizer\": \"none\"' ${CLI_TMP}/no_floor.json")
# --wgrad exact: records say wgrad "exact" (bits 0), there is no floor row, and the top layer (fc), whose
# incoming gradient is exact, has no quantization variance; --wgrad-bits with it is refused.
add_test(NAME cli.variance_wgrad_exact COMMAND sh -c "$<TARGET_FILE:fqt_cli> variance --data synthetic --model cnn --dgrad psq \
  --dgrad-bits 4,8 --samples 2 --batches 2 --batch 16 --threads 1 --breakdown none --wgrad exact --out ${CLI_TMP}/variance_dgrad \
  --json > ${CLI_TMP}/wexact.json \
  && /usr/bin/python3 -c \"import json,sys; r=json.load(open(sys.argv[1])); \
assert r and all(x['wgrad']=='exact' and x['wgrad_bits']==0 and x['quantizer']=='psq' for x in r), r; \
fc=[x for x in r if x['layer']=='fc'][0]; t=[x for x in r if x['layer']=='total'][0]; \
assert fc['quant_variance']==0 and t['quant_variance']>0, (fc, t)\" ${CLI_TMP}/wexact.json")
set_tests_properties(cli.variance_wgrad_exact PROPERTIES FIXTURES_SETUP variance_dgrad)
fqt_cli_test(variance_wgrad_exact_bits 2 "--wgrad-bits has no meaning with --wgrad exact" ${FQT_EXE} variance
             --data synthetic --wgrad exact --wgrad-bits 4)
# Plots with Debian's matplotlib; skipped (77) where /usr/bin/python3 has none.
add_test(NAME cli.plot_variance COMMAND sh -c "/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || exit 77; \
  /usr/bin/python3 ${CMAKE_SOURCE_DIR}/scripts/plot_variance ${CLI_TMP}/variance/variance.json --runs ${RUN} \
  --out ${CLI_TMP}/figures && test -s ${CLI_TMP}/figures/variance_vs_bits.svg && test -s ${CLI_TMP}/figures/variance_per_layer.png \
  && test -s ${CLI_TMP}/figures/training_curves.png")
set_tests_properties(cli.plot_variance PROPERTIES FIXTURES_REQUIRED "variance;trained" SKIP_RETURN_CODE 77)
fqt_cli_test(plot_variance_no_args 2 "give a variance.json" /usr/bin/python3 ${CMAKE_SOURCE_DIR}/scripts/plot_variance)
# fqt train --track-variance and --log-every: variance and step records in metrics.jsonl.
add_test(NAME cli.train_track_variance COMMAND ${EXPECT} 0 "final test accuracy" -- ${FQT_EXE} train --data synthetic
         --model cnn --mode fqt --dgrad ptq --dgrad-bits 4 --epochs 1 --batch 64 --train-limit 256 --test-limit 64
         --track-variance 2 --log-every 2 --threads 1 --out ${CLI_TMP}/track_run --overwrite --quiet)
set_tests_properties(cli.train_track_variance PROPERTIES FIXTURES_SETUP tracked)
fqt_cli_test(train_track_variance_records 0 "\"kind\":\"variance\".*\"ratio\"" cat ${CLI_TMP}/track_run/metrics.jsonl)
set_tests_properties(cli.train_track_variance_records PROPERTIES FIXTURES_REQUIRED tracked)
# 256 samples / batch 64 = 4 steps: a step record after steps 2 and 4 (keys in sorted order).
fqt_cli_test(train_log_every_records 0 "\"kind\":\"step\",\"lr\":[^,]+,\"step\":4,\"train_acc\"" cat ${CLI_TMP}/track_run/metrics.jsonl)
set_tests_properties(cli.train_log_every_records PROPERTIES FIXTURES_REQUIRED tracked)
fqt_cli_test(train_bad_log_every 2 "--log-every" ${FQT_EXE} train --data synthetic --log-every -1)
fqt_cli_test(train_bad_track_variance 2 "--track-variance" ${FQT_EXE} train --data synthetic --track-variance -5)
# scripts/write_results (the RESULTS.md generator of scripts/replicate) on the runs above.
add_test(NAME cli.write_results COMMAND sh -c "/usr/bin/python3 ${CMAKE_SOURCE_DIR}/scripts/write_results --runs ${CLI_TMP} \
  --names 'train_run track_run' --variance ${CLI_TMP}/variance/variance.json --figures ${CLI_TMP}/figures \
  --results ${CLI_TMP}/RESULTS.md --smoke 1 && grep -q '| train_run | 1 |' ${CLI_TMP}/RESULTS.md \
  && grep -q 'Smoke test' ${CLI_TMP}/RESULTS.md && grep -q 'Sampling (QAT) variance' ${CLI_TMP}/RESULTS.md \
  && grep -q '| none (wgrad-only floor, dgrad exact) |' ${CLI_TMP}/RESULTS.md \
  && grep -q 'Any violation beyond 2 SE' ${CLI_TMP}/RESULTS.md && grep -q '| variance BHQ <= PSQ <= PTQ at 8 bits' ${CLI_TMP}/RESULTS.md \
  && grep -q 'ratio (dgrad-induced)' ${CLI_TMP}/RESULTS.md && ! grep -q 'dgrad quantizers alone' ${CLI_TMP}/RESULTS.md")
set_tests_properties(cli.write_results PROPERTIES FIXTURES_REQUIRED "variance;trained;tracked")
# ... and with the --wgrad exact measurement: its section and its Targets rows.
add_test(NAME cli.write_results_dgrad_only COMMAND sh -c "/usr/bin/python3 ${CMAKE_SOURCE_DIR}/scripts/write_results --runs ${CLI_TMP} \
  --names 'train_run' --variance ${CLI_TMP}/variance/variance.json --variance-dgrad ${CLI_TMP}/variance_dgrad/variance.json \
  --figures ${CLI_TMP}/figures --results ${CLI_TMP}/RESULTS_dgrad.md --smoke 1 \
  && grep -q '### The dgrad quantizers alone' ${CLI_TMP}/RESULTS_dgrad.md \
  && grep -q '| variance ratio PSQ 4->8 bits = 289.00 (dgrad alone, wgrad exact) |' ${CLI_TMP}/RESULTS_dgrad.md \
  && grep -q '| psq | 8 | [0-9.]*e-[0-9]* |' ${CLI_TMP}/RESULTS_dgrad.md")
set_tests_properties(cli.write_results_dgrad_only PROPERTIES FIXTURES_REQUIRED "variance;variance_dgrad;trained")
# Issue 4: 2-epoch FQT training on Fashion-MNIST (6000 images) with --arith int reaches the
# accuracy of --arith sim within 3 sigma of test-set noise (the script states the bound).
add_test(NAME cli.int_vs_sim_accuracy COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/cli/int_vs_sim_accuracy.sh ${FQT_EXE} ${CLI_TMP}/int_vs_sim)
set_tests_properties(cli.int_vs_sim_accuracy PROPERTIES TIMEOUT 600)
