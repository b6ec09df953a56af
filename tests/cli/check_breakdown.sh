#!/usr/bin/env bash
# check_breakdown.sh FQT: `fqt bench step --breakdown --json` on one step reports the layers'
# regions (conv forward and backward phases, batch norm, linear) and the rest of the step as one
# region; the regions do not overlap, so with one timed step they add up to the step time and
# none is negative.
set -u
fqt=$1
out=$("$fqt" bench step --model cnn --mode fqt --dgrad psq --batch 8 --steps 1 --warmup 0 --threads 1 --breakdown --json) ||
  { echo "bench step failed"; exit 1; }
/usr/bin/python3 - "$out" <<'PY' || exit 1
import json, sys
rec = json.loads(sys.argv[1])[0]
b = rec["breakdown"]
names = list(b)
for want in (": forward", ": backward: wgrad", ": backward: dgrad", ": backward: quantize dY", "batchnorm",
             "linear", "(outside the layers"):
    assert any(want in n for n in names), f"no region with {want!r} in {names}"
assert all(v >= 0 for v in b.values()), f"a negative region: {b}"
total = sum(b.values())
assert abs(total - rec["median_ms"]) <= 1e-6 * rec["median_ms"] + 1e-9, f"regions {total} ms, step {rec['median_ms']} ms"
print(f"{len(b)} regions adding up to the {rec['median_ms']:.2f} ms step")
PY
