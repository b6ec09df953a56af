#!/usr/bin/env bash
# int_vs_sim_accuracy.sh FQT TMPDIR
#
# Issue 4: a 2-epoch FQT run with --arith int reaches the same accuracy as --arith sim. The two
# runs share seed, data order, codes and random numbers; they differ only by fp32 rounding in the
# GEMM epilogues (int) versus the fp32 GEMMs (sim), which moves single predictions. The bound is
# the noise of comparing two test accuracies on n samples: 3 sigma of the difference of two
# independent binomial proportions, 3 sqrt(2 p (1 - p) / n) (3.3 points at p = 0.84, n = 2000)
# — conservative, since the runs are strongly correlated. Both runs must also clear 75%.
# What it can and cannot see: a dgrad epilogue that drops the gradient rows' own scales trains to
# chance (10%) and fails here (checked by hand on 2026-11-28); errors a batch norm absorbs (a
# per-channel constant in fprop) or that training shrugs off (BHQ's correction with the wrong
# sign: 84.2% vs 84.0%) pass. Those are what tests/unit/test_int_path.cpp is for: every layer,
# quantizer and bit width against the simulated path to fp32 rounding. This test is the
# end-to-end check the issue asks for.
# cnn on the first 6000 Fashion-MNIST training images (2 x 47 steps of 128), BHQ 5-bit dgrad:
# the integer path's most involved case (BHQ's inverse transform applied after the GEMM).
# Fixed seed: the outcome is the same on every run of the same build.
set -u
fqt=$1 tmp=$2
rm -rf "$tmp" && mkdir -p "$tmp" || exit 1
acc=()
for arith in int sim; do
  "$fqt" train --model cnn --data fashion-mnist --mode fqt --dgrad bhq --dgrad-bits 5 --epochs 2 --lr 0.02 \
    --train-limit 6000 --test-limit 2000 --seed 0 --arith "$arith" --out "$tmp/$arith" --quiet \
    > "$tmp/$arith.log" 2>&1 || { cat "$tmp/$arith.log"; exit 1; }
  a=$(/usr/bin/python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["test_acc"])' \
      "$tmp/$arith/metrics.jsonl") || exit 1
  acc+=("$a")
done
/usr/bin/python3 - "${acc[0]}" "${acc[1]}" <<'PY'
import math, sys
ai, asim = float(sys.argv[1]), float(sys.argv[2])
n = 2000
p = (ai + asim) / 2
bound = 3 * math.sqrt(2 * p * (1 - p) / n)
print(f"test accuracy after 2 epochs: int {ai:.2%}, sim {asim:.2%}, |difference| {abs(ai - asim):.2%} "
      f"(bound {bound:.2%} = 3 sigma at n = {n})")
ok = abs(ai - asim) <= bound and min(ai, asim) >= 0.75
if not ok:
    print("FAIL: the integer path does not train like the simulated path")
sys.exit(0 if ok else 1)
PY
