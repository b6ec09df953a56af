#!/usr/bin/env bash
# train_inputs.sh FQT TMPDIR
#
# `fqt train` / `fqt eval` with a run folder at stake (docs/RELIABILITY.md): bad input, a damaged
# checkpoint or a failed run exits with status 2 and ONE "fqt: error:" line, and leaves the run
# folder byte for byte as it was (config.json, metrics.jsonl, ckpt.safetensors: nothing
# rewritten, nothing added); --max-steps checkpoints where it stops and --resume goes on from
# there bit for bit; the warnings for ignored options; the help's quantizer lists.
# Prints one line per row and exits 1 if any row fails.
set -u
fqt=$1 tmp=$2
export OMP_WAIT_POLICY=passive
rm -rf "$tmp" && mkdir -p "$tmp" || exit 1
B0=(--data synthetic --model mlp --train-limit 128 --test-limit 64 --threads 1 --quiet)
B=("${B0[@]}" --batch 64)  # 2 steps an epoch

rows=0 failed=0
fail() { failed=$((failed + 1)); echo "FAIL $1"; shift; for l in "$@"; do echo "    | $l"; done; }
pass() { echo "ok   $1"; }
snapshot() { (cd "$1" 2>/dev/null && find . -type f | sort | xargs -r sha256sum) ; }

# expect NAME STATUS REGEX [--unchanged DIR] [--absent PATH] -- command...
# STATUS 2: exactly one line, "fqt: error: ..."; the combined output must match REGEX.
expect() {
  local name=$1 want=$2 regex=$3 unchanged="" absent=""
  shift 3
  while [[ $1 != -- ]]; do
    case $1 in
      --unchanged) unchanged=$2; shift 2 ;;
      --absent) absent=$2; shift 2 ;;
    esac
  done
  shift
  local before="" out status
  [[ -n $unchanged ]] && before=$(snapshot "$unchanged")
  out=$("$@" 2>&1)
  status=$?
  rows=$((rows + 1))
  if ((status != want)); then fail "$name: exit status $status, expected $want" "$out"; return; fi
  if ((want == 2)) && { [[ $(grep -c . <<<"$out") -ne 1 ]] || ! grep -q '^fqt: error: ' <<<"$out"; }; then
    fail "$name: not one 'fqt: error:' line" "$out"; return
  fi
  if ! grep -Eq -- "$regex" <<<"$out"; then fail "$name: output does not match /$regex/" "$out"; return; fi
  if [[ -n $unchanged && $(snapshot "$unchanged") != "$before" ]]; then fail "$name: $unchanged changed" "$out"; return; fi
  if [[ -n $absent && -e $absent ]]; then fail "$name: $absent was created" "$out"; return; fi
  pass "$name"
}

# edit.py FILE OP ARGS: rewrites a safetensors file with its metadata or tensors changed.
#   meta KEY VALUE | meta-del KEY | config KEY JSON | config-del KEY | nan TENSOR | drop PREFIX
cat > "$tmp/edit.py" <<'EOF'
import json, struct, sys
path, op, args = sys.argv[1], sys.argv[2], sys.argv[3:]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
head = json.loads(raw[8:8 + n])
data = raw[8 + n:]
meta = head.pop("__metadata__", {})
if op == "meta": meta[args[0]] = args[1]
elif op == "meta-del": del meta[args[0]]
elif op in ("config", "config-del"):
    cfg = json.loads(meta["fqt.config"])
    if op == "config": cfg[args[0]] = json.loads(args[1])
    else: del cfg[args[0]]
    meta["fqt.config"] = json.dumps(cfg)
elif op == "nan":
    b, _ = head[args[0]]["data_offsets"]
    data = data[:b] + struct.pack("<f", float("nan")) + data[b + 4:]
elif op == "drop":
    keep = sorted((v["data_offsets"][0], k) for k, v in head.items() if not k.startswith(args[0]))
    out = b""
    for _, k in keep:
        b, e = head[k]["data_offsets"]
        head[k]["data_offsets"] = [len(out), len(out) + e - b]
        out += data[b:e]
    head = {k: head[k] for _, k in keep}
    data = out
head["__metadata__"] = meta
h = json.dumps(head, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
open(path, "wb").write(struct.pack("<Q", len(h)) + h + data)
EOF
edit() { python3 "$tmp/edit.py" "$@" || { echo "edit.py $* failed"; exit 1; }; }

# ---- 1. --max-steps inside an epoch checkpoints there; --resume continues bit for bit ----------
"$fqt" train "${B[@]}" --epochs 2 --out "$tmp/full" > /dev/null 2>&1 || { echo "reference run failed"; exit 1; }
expect max-steps-checkpoints 0 "final test accuracy [0-9.]+% .*after 0 epochs, 1 step \(stopped by --max-steps in epoch 1, 1 of 2 steps; checkpoint saved\)" \
  -- "$fqt" train "${B[@]}" --epochs 2 --max-steps 1 --out "$tmp/cut"
rows=$((rows + 1))
if [[ -f $tmp/cut/ckpt.safetensors ]] && grep -aq '"fqt.step":"1"' "$tmp/cut/ckpt.safetensors"; then pass "max-steps-checkpoint-at-step-1"
else fail "max-steps-checkpoint-at-step-1: no checkpoint at step 1 in $tmp/cut" "$(ls "$tmp/cut")"; fi
expect resume-to-step-3 0 "after 1 epoch, 3 steps \(stopped by --max-steps in epoch 2, 1 of 2 steps" \
  -- "$fqt" train --out "$tmp/cut" --resume --max-steps 3 --quiet
expect resume-to-the-end 0 "after 2 epochs, 4 steps" -- "$fqt" train --out "$tmp/cut" --resume --quiet
rows=$((rows + 1))
if cmp -s "$tmp/full/ckpt.safetensors" "$tmp/cut/ckpt.safetensors"; then pass "resumed-run-bit-identical"
else fail "resumed-run-bit-identical: the final checkpoints differ"; fi
expect resume-below-checkpoint 2 "--max-steps 3: the run in .* is already at step 4" --unchanged "$tmp/cut" \
  -- "$fqt" train --out "$tmp/cut" --resume --max-steps 3 --quiet
expect resume-complete-run 0 "nothing to do: the run in .* is complete \(2 epochs, 4 steps\); nothing was changed" \
  --unchanged "$tmp/cut" -- "$fqt" train --out "$tmp/cut" --resume --quiet
"$fqt" train "${B[@]}" --epochs 2 --max-steps 1 --out "$tmp/at1" > /dev/null 2>&1
expect resume-at-max-steps 0 "nothing to do: the run in .* is already at step 1 = --max-steps" --unchanged "$tmp/at1" \
  -- "$fqt" train --out "$tmp/at1" --resume --max-steps 1 --quiet

# ---- 2. a resume that fails validation changes nothing -------------------------------------------
mkdir -p "$tmp/nan" && cp "$tmp/at1"/* "$tmp/nan/" && edit "$tmp/nan/ckpt.safetensors" nan param/fc1.weight
expect resume-nan-weights 2 "ckpt.safetensors: tensor 'param/fc1.weight' holds nan at element 0" --unchanged "$tmp/nan" \
  -- "$fqt" train --out "$tmp/nan" --resume --max-steps 4 --quiet
expect eval-nan-weights 2 "nan/ckpt.safetensors: tensor 'param/fc1.weight' holds nan" \
  -- "$fqt" eval --checkpoint "$tmp/nan/ckpt.safetensors"
expect variance-nan-weights 2 "nan/ckpt.safetensors: tensor 'param/fc1.weight' holds nan" \
  -- "$fqt" variance --checkpoint "$tmp/nan/ckpt.safetensors" --samples 2 --batches 2 --batch 16 --threads 1 --quiet
mkdir -p "$tmp/step" && cp "$tmp/at1"/* "$tmp/step/" && edit "$tmp/step/ckpt.safetensors" meta fqt.step 999999999
expect resume-step-out-of-epoch 2 "checkpoint step 999999999 does not lie in epoch 1" --unchanged "$tmp/step" \
  -- "$fqt" train --out "$tmp/step" --resume --max-steps 1000000000 --quiet

# ---- 6. damaged checkpoint metadata and stored configurations ------------------------------------
# Each row: a copy of the step-2 run (end of epoch 1, momentum buffers present), one edit, then
# --resume must refuse it naming the file, and leave the folder unchanged.
"$fqt" train "${B[@]}" --epochs 2 --max-steps 2 --out "$tmp/e1" > /dev/null 2>&1
k=0
damaged() {  # damaged REGEX EDIT-ARGS...
  local regex=$1; shift
  k=$((k + 1))
  local d=$tmp/damaged$k
  mkdir -p "$d" && cp "$tmp/e1"/* "$d/" && edit "$d/ckpt.safetensors" "$@"
  expect "damaged-$k($*)" 2 "$d/ckpt.safetensors: .*$regex" --unchanged "$d" -- "$fqt" train --out "$d" --resume --quiet
}
damaged "'fqt.sgd.momentum' is 'nan', not a number in \[0, 1\)" meta fqt.sgd.momentum nan
damaged "'fqt.sgd.momentum' is '-1'" meta fqt.sgd.momentum -1
damaged "'fqt.sgd.momentum' is '5'" meta fqt.sgd.momentum 5
damaged "'fqt.sgd.momentum' is ''" meta fqt.sgd.momentum ""
damaged "no 'fqt.sgd.momentum'" meta-del fqt.sgd.momentum
damaged "does not match its run configuration" meta fqt.sgd.momentum 0.5
damaged "'fqt.sgd.weight_decay' is 'nan'" meta fqt.sgd.weight_decay nan
damaged "'fqt.sgd.weight_decay' is '-1'" meta fqt.sgd.weight_decay -1
damaged "'fqt.sgd.weight_decay' is '5'" meta fqt.sgd.weight_decay 5
damaged "'fqt.sgd.nesterov' is '2', not 0 or 1" meta fqt.sgd.nesterov 2
damaged "'fqt.sgd.nesterov' is 'x', not 0 or 1" meta fqt.sgd.nesterov x
damaged "'fqt.sgd.momentum_initialized' is 'x'" meta fqt.sgd.momentum_initialized x
damaged "'fqt.sgd.momentum_initialized' is '7'" meta fqt.sgd.momentum_initialized 7
damaged "'fqt.optimizer' is 'adam'" meta fqt.optimizer adam
damaged "'fqt.optimizer' is ''" meta fqt.optimizer ""
damaged "no 'fqt.optimizer'" meta-del fqt.optimizer
damaged "momentum_initialized = 1 but the file holds no momentum/. tensors" drop momentum/
damaged "checkpoint step 2 does not lie in epoch 1 \(2 steps per epoch\)" meta fqt.epoch 0
damaged "no 'fqt.config'" meta-del fqt.config
damaged "fqt.seed = 7 but its run configuration has seed 0" meta fqt.seed 7
damaged "'activation.quantizer' must be zero-aligned" config activation '{"quantizer": "bhq", "bits": 8}'
damaged "'weight.quantizer' must be symmetric, symmetric-row or zero-aligned \(got 'ptq'\)" config weight '{"quantizer": "ptq", "bits": 8}'
damaged "'seed' must be a non-negative integer \(got -1\)" config seed -1
damaged "'seed' must be an integer \(got 1.5\)" config seed 1.5
damaged "'log_every' must be 0 \(off\) or a number of steps \(got -1\)" config log_every -1
damaged "'track_variance_every' must be 0 \(off\) or a number of steps \(got -1\)" config track_variance_every -1
damaged "'batch' must be an integer \(got 1e\+30\)" config batch 1e30
damaged "'batch' must be in 1..65536 \(got 0\)" config batch 0
damaged "'epochs' must be an integer \(got \"two\"\)" config epochs '"two"'
damaged "key 'lr' is missing" config-del lr
damaged "'model' is 'resnet1000', an unknown model" config model '"resnet1000"'
damaged "unknown mode 'int4'" config mode '"int4"'
damaged "'lr' must be a positive number below 100 \(got 1000\)" config lr 1000
damaged "'on_nonfinite' is 'ignore'" config on_nonfinite '"ignore"'
# The run's last epoch done but a step past it (config epochs 1, step 3): damaged, not "complete".
mkdir -p "$tmp/pastend" && cp "$tmp/e1"/* "$tmp/pastend/" && edit "$tmp/pastend/ckpt.safetensors" config epochs 1 &&
  edit "$tmp/pastend/ckpt.safetensors" meta fqt.step 3
expect resume-step-past-the-end 2 "pastend/ckpt.safetensors: checkpoint metadata fqt.epoch = 1 \(the run's last\) but fqt.step = 3, not the run's 2 steps" \
  --unchanged "$tmp/pastend" -- "$fqt" train --out "$tmp/pastend" --resume --quiet
# A stored configuration that does not parse at all.
k=$((k + 1)) && d=$tmp/damaged$k && mkdir -p "$d" && cp "$tmp/e1"/* "$d/" && edit "$d/ckpt.safetensors" meta fqt.config '{"model": "mlp",'
expect "damaged-$k(config not JSON)" 2 "$d/ckpt.safetensors: run configuration \(fqt.config\) is not valid JSON" \
  --unchanged "$d" -- "$fqt" train --out "$d" --resume --quiet
expect "eval-damaged-config" 2 "damaged$k/ckpt.safetensors: run configuration \(fqt.config\) is not valid JSON" \
  -- "$fqt" eval --checkpoint "$d/ckpt.safetensors"

# ---- 3. a failed --overwrite run leaves the old run as it was; a good one replaces it all --------
expect overwrite-diverges 2 "non-finite .* at epoch 1 step [0-9]+, layer fc[0-9].*no checkpoint of this run was written, and the run in .* it was to replace is left as it was \(try a lower --lr, or --on-nonfinite skip\)" \
  --unchanged "$tmp/e1" -- "$fqt" train "${B0[@]}" --epochs 2 --batch 32 --lr 99 --overwrite --out "$tmp/e1"
expect overwrite-bad-input 2 "--batch must be in 1..65536" --unchanged "$tmp/e1" \
  -- "$fqt" train "${B0[@]}" --epochs 2 --batch 0 --overwrite --out "$tmp/e1"
mkdir -p "$tmp/ow" && cp "$tmp/e1"/* "$tmp/ow/"
expect overwrite-replaces 0 "after 1 epoch, 4 steps" -- "$fqt" train "${B0[@]}" --epochs 1 --batch 32 --overwrite --out "$tmp/ow"
rows=$((rows + 1))
if grep -q '"batch": 32' "$tmp/ow/config.json" && grep -aq '"fqt.step":"4"' "$tmp/ow/ckpt.safetensors" &&
   [[ $(grep -c . "$tmp/ow/metrics.jsonl") -eq 1 ]] && grep -q '"step":4' "$tmp/ow/metrics.jsonl"; then pass "overwrite-replaces-all-three"
else fail "overwrite-replaces-all-three: config/metrics/checkpoint not all of the new run" "$(cat "$tmp/ow/config.json" "$tmp/ow/metrics.jsonl")"; fi

# ---- 4. --resume with --overwrite; options --resume ignores ----------------------------------------
expect resume-and-overwrite 2 "--resume and --overwrite cannot be combined" --unchanged "$tmp/at1" \
  -- "$fqt" train --out "$tmp/at1" --resume --overwrite --quiet
mkdir -p "$tmp/ign" && cp "$tmp/at1"/* "$tmp/ign/"
expect resume-ignored-options 0 "warning: --model, --batch, --lr ignored: --resume continues with the settings stored in the run" \
  -- "$fqt" train --out "$tmp/ign" --resume --model cnn --batch 32 --lr 0.5 --max-steps 2 --quiet

# ---- 5. divergence: the documented message; skip finishes ------------------------------------------
expect diverge-stop 2 "non-finite .* at epoch 1 step [0-9]+, layer fc[0-9]: .*training stopped, .*\(try a lower --lr, or --on-nonfinite skip\)" \
  -- "$fqt" train "${B0[@]}" --epochs 2 --batch 32 --lr 99 --out "$tmp/div"
expect diverge-skip 0 "step\(s\) skipped for a non-finite" \
  -- "$fqt" train "${B0[@]}" --epochs 2 --batch 32 --lr 99 --on-nonfinite skip --out "$tmp/divskip"
rows=$((rows + 1))
if [[ -f $tmp/divskip/ckpt.safetensors ]]; then pass "diverge-skip-checkpoint"; else fail "diverge-skip-checkpoint: none written"; fi

# ---- 6b. kill -9 during the first save of an --overwrite / --resume run -------------------------------
# The save keeps the old files aside and renames its new ones into place, the checkpoint last; a kill
# before any of the three renames (test hook FQT_TEST_KILL_BEFORE) leaves the checkpoint aside:
# `fqt eval` says so, and the next run in the folder puts the saved run back byte for byte (a fresh
# run without --overwrite is then refused again), even when the killed process's pid is alive again
# (the asides are renamed to this shell's pid: pids repeat in containers; the folder lock decides),
# and the interrupted run can simply be started again. "noconfig": a saved run without config.json,
# whose new config.json the recovery removes. "halfway": a recovery killed after it put config.json
# back (done here by hand) is finished by the next run without touching config.json again.
three() { (cd "$1" && sha256sum config.json metrics.jsonl ckpt.safetensors 2>&1); }
for how in overwrite resume noconfig halfway; do
  for file in config.json metrics.jsonl ckpt.safetensors; do
    [[ ($how == noconfig || $how == halfway) && $file != ckpt.safetensors ]] && continue
    name=kill-$how-before-$file
    d=$tmp/kill_${how}_$file
    mkdir -p "$d" && cp "$tmp/e1"/* "$d/"
    [[ $how == noconfig ]] && rm "$d/config.json"
    before=$(three "$d")
    if [[ $how == resume ]]; then run=("$fqt" train --resume --out "$d" --quiet)
    else run=("$fqt" train "${B0[@]}" --epochs 1 --batch 32 --overwrite --out "$d"); fi
    FQT_TEST_KILL_BEFORE=$file sh -c '"$@"; exit $?' sh "${run[@]}" > /dev/null 2>&1
    status=$?
    rows=$((rows + 1))
    if ((status != 137)); then fail "$name: the hook did not kill the run (exit status $status)"; continue; fi
    for f in "$d"/*.tmp.*; do mv "$f" "${f%.*}.$$"; done
    [[ $how == halfway ]] && mv "$d/config.json.replaced.tmp.$$" "$d/config.json"
    out=$("$fqt" eval --checkpoint "$d/ckpt.safetensors" 2>&1)
    if ! grep -q "ckpt.safetensors: missing: a save of its run was interrupted" <<<"$out"; then
      fail "$name: eval does not name the interrupted save" "$out"; continue
    fi
    out=$("$fqt" train "${B[@]}" --epochs 1 --out "$d" 2>&1)
    status=$?
    if ((status != 2)) || ! grep -q "is put back" <<<"$out" || ! grep -q "already holds a run" <<<"$out"; then
      fail "$name: the next run did not put the saved run back (exit status $status)" "$out"; continue
    fi
    if [[ $(three "$d") != "$before" ]]; then fail "$name: the saved run differs after the recovery" "$(three "$d")"; continue; fi
    want="ckpt.safetensors config.json metrics.jsonl "
    [[ $how == noconfig ]] && want="ckpt.safetensors metrics.jsonl "
    if [[ $(ls "$d" | tr '\n' ' ') != "$want" ]]; then fail "$name: files left after the recovery" "$(ls "$d")"; continue; fi
    if ! "${run[@]}" > /dev/null 2>&1 || [[ $(ls "$d" | tr '\n' ' ') != "ckpt.safetensors config.json metrics.jsonl " ]]; then
      fail "$name: the run again did not finish cleanly" "$(ls "$d")"; continue
    fi
    pass "$name"
  done
done

# ---- 7. MNIST files of two shapes -------------------------------------------------------------------
python3 - "$tmp/mixed" <<'EOF'
import os, struct, sys
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
def idx(name, n, side):
    open(f"{d}/{name}-images-idx3-ubyte", "wb").write(struct.pack(">IIII", 0x803, n, side, side) + bytes(range(256)) * (n * side * side // 256))
    open(f"{d}/{name}-labels-idx1-ubyte", "wb").write(struct.pack(">II", 0x801, n) + bytes(i % 10 for i in range(n)))
idx("train", 32, 28)
idx("t10k", 16, 32)
for side in (20, 28):
    d = f"{sys.argv[1]}{side}"; os.makedirs(d, exist_ok=True)
    idx("train", 32, side)
    idx("t10k", 16, side)
EOF
expect mnist-mixed-shapes 2 "mixed/train-images-idx3-ubyte holds 1x28x28 images but .*mixed/t10k-images-idx3-ubyte holds 1x32x32" \
  --absent "$tmp/mixed_run" -- "$fqt" train --data mnist --data-dir "$tmp/mixed" --model mlp --batch 16 --quiet --out "$tmp/mixed_run"
# A FIFO or a dangling link where a data file should be: said so (a FIFO used to read as "file not found").
mkdir -p "$tmp/oddfiles" && cp "$tmp/mixed28"/* "$tmp/oddfiles/" && rm "$tmp/oddfiles/t10k-images-idx3-ubyte"
mkfifo "$tmp/oddfiles/t10k-images-idx3-ubyte"
expect data-fifo 2 "oddfiles/t10k-images-idx3-ubyte: not a regular file \(a FIFO" --absent "$tmp/odd_run" \
  -- timeout 60 "$fqt" train --data mnist --data-dir "$tmp/oddfiles" --model mlp --batch 16 --quiet --out "$tmp/odd_run"
rm "$tmp/oddfiles/t10k-images-idx3-ubyte" && ln -s "$tmp/no-such-file" "$tmp/oddfiles/t10k-images-idx3-ubyte"
expect data-dangling-link 2 "oddfiles/t10k-images-idx3-ubyte: a link to '.*no-such-file', which does not exist" \
  --absent "$tmp/odd_run" \
  -- "$fqt" train --data mnist --data-dir "$tmp/oddfiles" --model mlp --batch 16 --quiet --out "$tmp/odd_run"
# A run trained on 28x28 files, evaluated / resumed / measured on 20x20 ones: the message names the images.
"$fqt" train --data mnist --data-dir "$tmp/mixed28" --model mlp --batch 16 --epochs 2 --max-steps 2 --quiet \
  --out "$tmp/run28" > /dev/null 2>&1
small_images="in the model built for the 1x20x20 images of .*mixed20/(t10k|train)-images-idx3-ubyte \(images of another size"
expect eval-other-image-size 2 "run28/ckpt.safetensors: tensor 'param/fc1.weight' has shape \[256, 784\] in the checkpoint but \[256, 400\] $small_images" \
  -- "$fqt" eval --checkpoint "$tmp/run28/ckpt.safetensors" --data-dir "$tmp/mixed20"
expect resume-other-image-size 2 "run28/ckpt.safetensors: .*$small_images" --unchanged "$tmp/run28" \
  -- "$fqt" train --resume --out "$tmp/run28" --data-dir "$tmp/mixed20" --quiet
expect variance-other-image-size 2 "run28/ckpt.safetensors: .*$small_images" --absent "$tmp/var20" \
  -- "$fqt" variance --checkpoint "$tmp/run28/ckpt.safetensors" --data-dir "$tmp/mixed20" --batch 4 --batches 2 --out "$tmp/var20"

# ---- 8. seeds, options unused in a mode ----------------------------------------------------------------
expect seed-negative 2 "--seed: .-1. is negative; it must be >= 0" --absent "$tmp/seed" \
  -- "$fqt" train "${B[@]}" --epochs 1 --seed -1 --out "$tmp/seed"
expect fp32-unused-options 0 "warning: --dgrad, --wgrad-bits ignored: unused in --mode fp32" \
  -- "$fqt" train "${B[@]}" --epochs 1 --mode fp32 --dgrad ptq --wgrad-bits 4
expect qat-unused-options 0 "warning: --dgrad-bits ignored: unused in --mode qat" \
  -- "$fqt" train "${B[@]}" --epochs 1 --mode qat --dgrad-bits 4
expect fp32-track-variance 0 "warning: --track-variance in fp32 mode: the gradients are not quantized" \
  -- "$fqt" train "${B[@]}" --epochs 1 --mode fp32 --track-variance 1
"$fqt" train "${B[@]}" --epochs 2 --max-steps 1 --mode fp32 --out "$tmp/fp32run" > /dev/null 2>&1
expect resume-fp32-track-variance 0 "warning: --track-variance in fp32 mode: the gradients are not quantized" \
  -- "$fqt" train --resume --out "$tmp/fp32run" --track-variance 1 --max-steps 2 --quiet
expect resume-synthetic-data-dir 0 "warning: --data-dir ignored: the synthetic data" \
  -- "$fqt" train --resume --out "$tmp/fp32run" --data-dir /nonexistent --max-steps 3 --quiet
expect synthetic-data-dir 0 "warning: --data-dir ignored: the synthetic data is generated" \
  -- "$fqt" train "${B[@]}" --epochs 1 --data-dir /nonexistent

# ---- 9. the quantizer lists of the help, and the extra ones train ------------------------------------
expect help-dgrad-lists-column 0 "ptq, ptq-zero, psq, bhq .*or column" -- "$fqt" train --help
expect help-wgrad-lists-psq 0 "ptq, ptq-zero, column .*or psq" -- "$fqt" train --help
expect dgrad-column-trains 0 "final test accuracy" -- "$fqt" train "${B[@]}" --epochs 1 --dgrad column
expect wgrad-psq-trains 0 "final test accuracy" -- "$fqt" train "${B[@]}" --epochs 1 --wgrad psq

echo "train_inputs: $((rows - failed))/$rows rows pass"
((failed == 0))
