#!/usr/bin/env bash
# kill_resume.sh FQT TMPDIR [TRIALS] [SEED]
#
# Crash safety of `fqt train`: a reference run goes uninterrupted; then, in each of TRIALS
# trials (default 10), the same run is started, killed with SIGKILL at one to three random
# (seeded) moments, each time restarted with --resume (or from scratch when no checkpoint
# exists yet), and finally resumed to the end. After every kill the checkpoint on disk must be
# complete and usable (`fqt eval` reads it), and the final checkpoint must be byte-identical to
# the reference run's: same weights, batch-norm statistics, momentum, step and RNG counters.
# Prints one line per trial and "kill-resume: N/N identical"; exit status 1 on any difference.
set -u
fqt=$1 tmp=$2 trials=${3:-10} seed=${4:-12345}
RANDOM=$seed
export OMP_WAIT_POLICY=passive  # fqt would re-execute itself to set this; keep one process
args=(train --data synthetic --model cnn --mode fqt --dgrad bhq --dgrad-bits 5 --epochs 3 --batch 32
      --train-limit 256 --test-limit 64 --ckpt-every 1 --seed 5 --threads 1 --quiet)

total_steps=24  # 3 epochs x 256/32 batches
rm -rf "$tmp" && mkdir -p "$tmp" || exit 1
start=$(date +%s%N)
"$fqt" "${args[@]}" --out "$tmp/reference" > "$tmp/reference.log" 2>&1 || { cat "$tmp/reference.log"; exit 1; }
full_ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "reference run: ${full_ms} ms"

identical=0 kills_total=0
for ((t = 1; t <= trials; t++)); do
  run="$tmp/trial$t"
  nkills=$((1 + RANDOM % 3))
  points=()
  # A trial needs at least one kill that lands while the run is alive; if every run finished
  # first (the machine sped up since the reference run was timed), start the trial over with
  # shorter delays, up to 5 times, instead of counting it as a failure.
  for ((attempt = 1; attempt <= 5 && ${#points[@]} == 0; attempt++)); do
  rm -rf "$run"
  for ((k = 0; k < nkills; k++)); do
    # A moment within the expected remaining time of the run (20 ms in at least; the process
    # starts in a few ms), so that nearly every kill lands while it trains or checkpoints.
    resume=() done_steps=0
    if [[ -f $run/ckpt.safetensors ]]; then
      resume=(--resume)
      done_steps=$(grep -ao '"fqt.step":"[0-9]*"' "$run/ckpt.safetensors" | grep -o '[0-9]*' || echo 0)
    fi
    remaining_ms=$((full_ms * (total_steps - done_steps) / total_steps * 9 / 10))
    ((remaining_ms > 40)) || remaining_ms=40
    remaining_ms=$((remaining_ms / attempt))
    ((remaining_ms > 40)) || remaining_ms=40
    delay=$((20 + RANDOM % (remaining_ms - 20)))
    "$fqt" "${args[@]}" --out "$run" "${resume[@]}" > "$run.log" 2>&1 &
    pid=$!
    sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
    if kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null
      step="none"
      if [[ -f $run/ckpt.safetensors ]]; then
        # The checkpoint left behind must be complete and readable.
        if ! "$fqt" eval --checkpoint "$run/ckpt.safetensors" --test-limit 32 > "$run.eval.log" 2>&1; then
          echo "trial $t: checkpoint unusable after kill -9 at ${delay} ms:"; cat "$run.eval.log"; exit 1
        fi
        step=$(grep -ao '"fqt.step":"[0-9]*"' "$run/ckpt.safetensors" | grep -o '[0-9]*' || echo '?')
      fi
      points+=("${delay}ms(ckpt step $step)")
      kills_total=$((kills_total + 1))
    else
      wait "$pid"  # finished before the kill
    fi
  done
  done
  if ((${#points[@]} == 0)); then
    echo "trial $t: every run finished before its kill in 5 attempts; no kill point (machine much faster than the reference run?)"
  fi
  # Resume (or start) until the run completes.
  resume=()
  [[ -f $run/ckpt.safetensors ]] && resume=(--resume)
  if ! "$fqt" "${args[@]}" --out "$run" "${resume[@]}" > "$run.log" 2>&1; then
    echo "trial $t: the final resume failed:"; cat "$run.log"; exit 1
  fi
  leftovers=$(find "$run" -name '*.tmp.*' | wc -l)
  if ((${#points[@]} > 0)) && cmp -s "$tmp/reference/ckpt.safetensors" "$run/ckpt.safetensors" && ((leftovers == 0)); then
    identical=$((identical + 1))
    echo "trial $t: killed at ${points[*]:-<finished first>} -> identical"
  else
    echo "trial $t: killed at ${points[*]:-<finished first>} -> DIFFERENT final checkpoint ($leftovers temporaries left)"
  fi
done
echo "kill-resume: $identical/$trials identical ($kills_total kills)"
((identical == trials))
