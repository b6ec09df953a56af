#!/usr/bin/env bash
# check_breakdown.sh FQT: `fqt bench step --breakdown --json` on one step reports the layers'
# regions (conv forward and backward phases, batch norm, linear) and the rest of the step as one
# region; the regions do not overlap, so with one timed step they add up to the step time and
# none is negative. BHQ's phases come apart from them, inside their regions.
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
assert rec["phases"] == {}, f"phases without BHQ: {rec['phases']}"
print(f"{len(b)} regions adding up to the {rec['median_ms']:.2f} ms step")
PY
# With BHQ: its quantizer's and dgrad's phases, listed apart (JSON field phases, not in
# breakdown): the quantizer's lie inside quantize() (their sum is at most quantizer_ms), the
# dgrad's inside the dgrad regions.
out=$("$fqt" bench step --model cnn --mode fqt --dgrad bhq --batch 8 --steps 1 --warmup 0 --threads 1 --breakdown --json) ||
  { echo "bench step (bhq) failed"; exit 1; }
/usr/bin/python3 - "$out" <<'PY' || exit 1
import json, sys
rec = json.loads(sys.argv[1])[0]
p, b = rec["phases"], rec["breakdown"]
for want in ("bhq quantizer: row ranges", "bhq quantizer: rank sort, shares (beside the wgrad draw)",
             "bhq quantizer: groups (members, scales)", "bhq quantizer: group sums",
             "bhq quantizer: rows transformed, rounded", "bhq dgrad: row terms, members",
             "bhq dgrad: rows (members' products, T^-1, col2im)"):
    assert want in p, f"no phase {want!r} in {list(p)}"
assert all(v >= 0 for v in p.values()), f"a negative phase: {p}"
assert not any(n in b for n in p), "a phase counted as a region"
quant = sum(v for n, v in p.items() if n.startswith("bhq quantizer"))
assert quant <= rec["quantizer_ms"] * (1 + 1e-6) + 1e-6, f"quantizer phases {quant} ms > quantizer {rec['quantizer_ms']} ms"
dg = sum(v for n, v in p.items() if n.startswith("bhq dgrad"))
regions = sum(v for n, v in b.items() if n.endswith(": backward: dgrad"))
assert dg <= regions * (1 + 1e-6) + 1e-6, f"dgrad phases {dg} ms > dgrad regions {regions} ms"
print(f"{len(p)} BHQ phases: quantizer {quant:.3f} of {rec['quantizer_ms']:.3f} ms, dgrad {dg:.3f} of {regions:.3f} ms")
PY
