#!/usr/bin/env bash
# bad_inputs.sh FQT TMPDIR
#
# Every subcommand of fqt, given each class of bad input, must exit with status 2 (no crash,
# no core dump: a signal would give 128+N), print one clear "fqt: error: ..." line that matches
# the expected phrase, and leave no output file behind (no run folder, no .npy, no temporary).
# Classes: unknown option, malformed number, out-of-range value, unknown name, incompatible
# combination, missing file, corrupt file, truncated file, unwritable output.
# Prints a table (subcommand, class, result) and exits 1 if any row fails.
set -u
fqt=$1 tmp=$2
export OMP_WAIT_POLICY=passive
rm -rf "$tmp" && mkdir -p "$tmp/fixtures" || exit 1
fx=$tmp/fixtures

# ---- fixtures: a real checkpoint and .npy, and broken copies of them ----------------------
"$fqt" train --data synthetic --model mlp --epochs 1 --batch 64 --train-limit 128 --test-limit 64 --quiet \
  --out "$fx/run" > "$fx/train.log" 2>&1 || { echo "fixture run failed:"; cat "$fx/train.log"; exit 1; }
ckpt=$fx/run/ckpt.safetensors
head -c $(($(stat -c %s "$ckpt") / 2)) "$ckpt" > "$fx/truncated.safetensors"
"$fqt" synth --rows 8 --cols 16 --out "$fx/good.npy" > /dev/null || exit 1
head -c 100 "$fx/good.npy" > "$fx/truncated.npy"
printf 'just some text, not an array\n' > "$fx/text.npy"
# A valid 1-D float32 .npy (header padded to 128 bytes, as numpy writes it): quantize needs 2-D.
dict="{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
{ printf '\x93NUMPY\x01\x00\x76\x00'; printf '%s%*s\n' "$dict" $((118 - ${#dict} - 1)) ''; printf '\0\0\x80\x3f\0\0\0\x40'; } > "$fx/vec.npy"
# A finite 2 x 1 float32 matrix spanning -3e38 .. 3e38 (x - lo overflows fp32).
dict="{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }"
{ printf '\x93NUMPY\x01\x00\x76\x00'; printf '%s%*s\n' "$dict" $((118 - ${#dict} - 1)) ''; printf '\xe6\xb1\x61\x7f\xe6\xb1\x61\xff'; } > "$fx/huge.npy"
# A 2 x 1 float64 matrix [1, 1e300]: finite, but beyond float32 (it used to be reported as Inf).
dict="{'descr': '<f8', 'fortran_order': False, 'shape': (2, 1), }"
{ printf '\x93NUMPY\x01\x00\x76\x00'; printf '%s%*s\n' "$dict" $((118 - ${#dict} - 1)) ''; printf '\0\0\0\0\0\0\xf0\x3f\x9c\x75\x00\x88\x3c\xe4\x37\x7e'; } > "$fx/f64big.npy"
# MNIST folders: garbage files, and a truncated gzip.
mkdir -p "$fx/mnist_garbage" "$fx/mnist_truncated" "$fx/mnist_empty"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  printf 'garbage garbage garbage' > "$fx/mnist_garbage/$f"
  printf '\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x1c\x00\x00\x00\x1c' | gzip -c | head -c 20 > "$fx/mnist_truncated/$f.gz"
done
printf 'x' > "$fx/a_file"
# A valid safetensors file that is not an fqt checkpoint: the checkpoint with its fqt.format renamed.
sed 's/"fqt.format"/"fqt.formax"/' "$ckpt" > "$fx/plain.safetensors"
mkdir -p "$tmp/resume_bad" && cp "$fx/truncated.safetensors" "$tmp/resume_bad/ckpt.safetensors"

rows=0 failed=0
# check SUBCOMMAND CLASS REGEX [--no-output PATH] -- command args...
check() {
  local sub=$1 class=$2 regex=$3 no_output=""
  shift 3
  if [[ $1 == --no-output ]]; then no_output=$2; shift 2; fi
  shift  # --
  local out status
  out=$("$@" 2>&1)
  status=$?
  local verdict=ok
  if ((status != 2)); then verdict="exit status $status"
  elif [[ $(grep -c . <<<"$out") -ne 1 ]] || ! grep -q '^fqt: error: ' <<<"$out"; then verdict="not one 'fqt: error:' line"
  elif ! grep -Eq -- "$regex" <<<"$out"; then verdict="message does not match /$regex/"
  elif [[ -n $no_output ]] && compgen -G "$no_output*" > /dev/null; then verdict="left output behind: $(compgen -G "$no_output*")"
  fi
  rows=$((rows + 1))
  printf '%-9s %-22s %s\n' "$sub" "$class" "$verdict"
  if [[ $verdict != ok ]]; then
    failed=$((failed + 1))
    echo "    command: ${*:2}"; sed 's/^/    | /' <<<"$out"
  fi
}

T=(train --data synthetic --quiet --epochs 1 --train-limit 128 --test-limit 64)
R=$tmp/run  # must never be created by a failing train
check train unknown-option    "frobnicate"                 --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --frobnicate
check train malformed-number  "--batch.*ten"          --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --batch ten
check train out-of-range      "--batch must be in 1..65536" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --batch 0
check train out-of-range-2    "--lr"                       --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --lr 1e999
check train out-of-range-3    "--momentum" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --momentum 5
check train out-of-range-4    "--threads must be in 0.." --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --threads 100000
check train int64-overflow    "--max-steps: '99999999999999999999' is out of this option's range" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --max-steps 99999999999999999999
check train int32-overflow    "--dgrad-bits: '99999999999' is out of this option's range" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --dgrad-bits 99999999999
check train not-decimal       "--batch: '0x20' is not a whole number in decimal digits" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --batch 0x20
check train not-whole         "--max-steps: '1e3' is not a whole number" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --max-steps 1e3
check train seed-overflow     "--seed: '18446744073709551616' is out of this option's range" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --seed 18446744073709551616
check train not-a-number      "--lr: 'abc' is not a number" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --lr abc
check train repeated-option   "--epochs was given 2 times; give it once" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --epochs 2
check train empty-value       "--momentum was given an empty value" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --momentum ""
check train unknown-name      "unknown model"              --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --model resnet1000
check train unknown-name-2    "unknown --on-nonfinite"     --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --on-nonfinite ignore
check train unknown-name-3    "dgrad-rows.*pixels"         --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --dgrad-rows pixels
check train incompatible      "--wgrad bhq is not supported" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --wgrad bhq
check train incompatible-2    "larger than the training set" --no-output "$R" -- "$fqt" "${T[@]}" --out "$R" --batch 1000
check train missing-file      "file not found"             --no-output "$R" -- "$fqt" train --data mnist --data-dir "$fx/mnist_empty" --out "$R"
check train corrupt-file      "bad magic number"           --no-output "$R" -- "$fqt" train --data mnist --data-dir "$fx/mnist_garbage" --out "$R"
check train truncated-file    "truncated gzip"             --no-output "$R" -- "$fqt" train --data mnist --data-dir "$fx/mnist_truncated" --out "$R"
check train corrupt-checkpoint "truncated|runs past"        -- "$fqt" train --resume --out "$tmp/resume_bad"
check train existing-run      "already holds a run"        -- "$fqt" "${T[@]}" --out "$fx/run"
check train unwritable-output "cannot create the run folder" --no-output "$fx/a_file/run" -- "$fqt" "${T[@]}" --out "$fx/a_file/run"

check eval unknown-option     "frobnicate"                 -- "$fqt" eval --checkpoint "$ckpt" --frobnicate
check eval malformed-number   "test-limit"                 -- "$fqt" eval --checkpoint "$ckpt" --test-limit many
check eval out-of-range       "--test-limit must be >= 0"  -- "$fqt" eval --checkpoint "$ckpt" --test-limit -3
check eval missing-file       "cannot open"                -- "$fqt" eval --checkpoint "$fx/nope.safetensors"
check eval corrupt-file       "not a safetensors file|absurd" -- "$fqt" eval --checkpoint "$fx/good.npy"
check eval truncated-file     "truncated"                  -- "$fqt" eval --checkpoint "$fx/truncated.safetensors"
check eval folder-not-file    "run: is a folder, not a file"    -- "$fqt" eval --checkpoint "$fx/run"
mkfifo "$fx/fifo.safetensors"  # (opening it for reading waited for a writer forever)
check eval fifo-not-file      "fifo.safetensors: not a regular file" -- timeout 20 "$fqt" eval --checkpoint "$fx/fifo.safetensors"
check eval not-a-checkpoint   "not an fqt checkpoint"      -- "$fqt" eval --checkpoint "$fx/plain.safetensors"

check bench unknown-option    "frobnicate"                 -- "$fqt" bench step --frobnicate
check bench malformed-number  "steps"                      -- "$fqt" bench step --steps few
check bench out-of-range      "--batch must be in 1..65536" -- "$fqt" bench step --batch 0
check bench unknown-name      "unknown mode 'int4'"        -- "$fqt" bench step --mode int4
check bench unknown-name-2    "unknown dgrad rows 'row'"   -- "$fqt" bench step --dgrad-rows pixel,row
check bench incompatible      "input|CxHxW"                -- "$fqt" bench step --input 3x0x32
check bench missing-subcommand "fqt bench. needs a command .one of: gemm, step, memory" -- "$fqt" bench
check bench unknown-subcommand "unknown command 'frob' for .fqt bench" -- "$fqt" bench frob
check bench out-of-range-2    "--threads must be in 0..1024" -- "$fqt" bench step --model mlp --threads 100000 --no-fork
check bench incompatible-2    "--input must look like CxHxW" -- "$fqt" bench step --input 1x28x28x9
check bench incompatible-3    "model cnn needs images of at least 4x4" -- "$fqt" bench step --model cnn --input 1x2x2
check bench incompatible-4    "stage1.block0.bn1: training needs more than one value" -- "$fqt" bench step --model preact_resnet20 --batch 1 --input 1x1x1 --mode fp32 --steps 1 --warmup 0
check bench-memory out-of-range "--reps must be in 1..10000" -- "$fqt" bench memory --sizes 0.25 --reps 2147483647
check bench-memory empty-item "the list '0.25,' has an empty item" -- "$fqt" bench memory --sizes 0.25,
check bench-memory empty-item-2 "the list ',' has an empty item" -- "$fqt" bench memory --sizes , --reps 1
check bench-gemm unknown-option "frobnicate"               -- "$fqt" bench gemm --frobnicate
check bench-gemm malformed-number "--m"                    -- "$fqt" bench gemm --m big
check bench-gemm out-of-range "--m|must be"                -- "$fqt" bench gemm --m 0
check bench-gemm out-of-range-2 "each operand at most 2.28" -- "$fqt" bench gemm --m 9999999999
check bench-gemm int64-overflow "--m: '99999999999999999999' is out of this option's range" -- "$fqt" bench gemm --m 99999999999999999999
check bench-gemm out-of-range-3 "--threads must be in 0..1024" -- "$fqt" bench gemm --m 8 --n 8 --k 8 --threads 100000
check bench-gemm incompatible "--shapes needs a square --input" -- "$fqt" bench gemm --shapes cnn --input 1x28x20
check bench-gemm unknown-name "unknown model|valid"        -- "$fqt" bench gemm --shapes resnet1000

V=$tmp/variance_out  # must never be created by a failing variance run
check variance unknown-option "frobnicate"                 --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --frobnicate
check variance malformed-number "samples"                  --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --samples lots
check variance out-of-range   "bit width from 2 to 8"      --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --dgrad-bits 9
check variance out-of-range-2 "--threads must be in 0..1024" --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --threads 100000
check variance unmeasured-breakdown "--breakdown: .bhq:4. is not one of the configurations measured" --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --dgrad psq --breakdown bhq:4
check variance out-of-range-3 "is negative; it must be >= 0" --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --seed -1
mkdir -p "$tmp/vfolder/variance.json"  # a folder where the output file goes
check variance unwritable-output "variance.json: exists and is not a regular file" -- "$fqt" variance --data synthetic --model mlp --batches 2 --batch 16 --samples 2 --dgrad ptq --dgrad-bits 4 --breakdown none --no-floor -q --out "$tmp/vfolder"
check variance out-of-range-5 "--samples must be in 2..100000" --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --samples 2000000000
check variance out-of-range-4 "--act-bits and --weight-bits must be bit widths" --no-output "$V" -- "$fqt" variance --checkpoint "$ckpt" --out "$V" --act-bits 9
check variance unknown-name   "unknown quantizer 'pqs'"    --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --dgrad pqs
check variance unknown-name-2 "dgrad-rows.*samples"        --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --dgrad-rows samples
check variance incompatible   "must be stochastic"         --no-output "$V" -- "$fqt" variance --data synthetic --out "$V" --dgrad affine
check variance missing-file   "cannot open"                --no-output "$V" -- "$fqt" variance --checkpoint "$fx/nope.safetensors" --out "$V"
check variance truncated-file "truncated"                  --no-output "$V" -- "$fqt" variance --checkpoint "$fx/truncated.safetensors" --out "$V"

check quantize unknown-option "frobnicate"                 -- "$fqt" quantize --input "$fx/good.npy" --frobnicate
check quantize malformed-number "samples"                  -- "$fqt" quantize --input "$fx/good.npy" --samples lots
check quantize out-of-range   "bit width from 2 to 8"      -- "$fqt" quantize --input "$fx/good.npy" --bits 12
check quantize out-of-range-2 "--threads must be in 0..1024" -- "$fqt" quantize --input "$fx/good.npy" --threads 100000
check quantize out-of-range-3 "--samples must be in 2..100000" -- "$fqt" quantize --input "$fx/good.npy" --samples 2147483647
check quantize empty-item     "the list '4,,8' has an empty item" -- "$fqt" quantize --input "$fx/good.npy" --bits 4,,8
check quantize not-a-file     "/dev/zero: not a regular file" -- "$fqt" quantize --input /dev/zero
check quantize folder         "is a folder, not a .npy file" -- "$fqt" quantize --input "$fx"
check quantize out-of-range-4 "values span -3e\+38 .. 3e\+38, wider than fp32 grids" -- "$fqt" quantize --input "$fx/huge.npy"
check quantize beyond-fp32    "the value 1e\+300 at row 1, column 0 is beyond float32's range" -- "$fqt" quantize --input "$fx/f64big.npy"
check quantize repeated-option "-k/--samples was given 2 times; give it once" -- "$fqt" quantize --input "$fx/good.npy" -k 3 --samples 4
check quantize unknown-name   "unknown quantizer 'pqs'"    -- "$fqt" quantize --input "$fx/good.npy" --quantizer pqs
check quantize incompatible   "expected a 2-D array"       -- "$fqt" quantize --input "$fx/vec.npy"
check quantize missing-file   "cannot open"                -- "$fqt" quantize --input "$fx/nope.npy"
check quantize corrupt-file   "not a valid .npy"           -- "$fqt" quantize --input "$fx/text.npy"
check quantize truncated-file "truncated|runs past|needs more data" -- "$fqt" quantize --input "$fx/truncated.npy"

S=$tmp/synth_out.npy  # must never be created by a failing synth
check synth unknown-option    "frobnicate"                 --no-output "$S" -- "$fqt" synth --out "$S" --frobnicate
check synth malformed-number  "rows"                       --no-output "$S" -- "$fqt" synth --out "$S" --rows twelve
check synth out-of-range      "rows"                       --no-output "$S" -- "$fqt" synth --out "$S" --rows 0
check synth unknown-name      "unknown matrix kind"        --no-output "$S" -- "$fqt" synth --out "$S" --kind cauchy
check synth incompatible      "too large"                  --no-output "$S" -- "$fqt" synth --out "$S" --rows 1048576 --cols 1048576
check synth unwritable-output "cannot create the temporary file"  --no-output "$fx/a_file/x.npy" -- "$fqt" synth --out "$fx/a_file/x.npy"
check synth out-of-range-2    "is negative; it must be >= 0" --no-output "$S" -- "$fqt" synth --out "$S" --seed -1
cp "$ckpt" "$tmp/keep.safetensors"
check synth not-an-npy-output "exists and is not a .npy file" -- "$fqt" synth --rows 2 --cols 2 --out "$tmp/keep.safetensors"
cmp -s "$ckpt" "$tmp/keep.safetensors" || { echo "synth replaced a checkpoint"; failed=$((failed + 1)); }

check fqt unknown-subcommand  "unknown command 'frobnicate' for .fqt. .one of: train" -- "$fqt" frobnicate
check fqt unknown-option      "unknown option '--frobnicate' for .fqt." -- "$fqt" --frobnicate
echo "bad inputs: $((rows - failed))/$rows rows exit 2 with one clear line"
((failed == 0))
