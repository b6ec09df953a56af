#!/usr/bin/env bash
# check_variance_json.sh FILE: the variance.json of `fqt variance` has the documented record fields,
# a "total" record per configuration, the wgrad-only floor (quantizer "none", bits 0, dgrad bound
# 0) and, with >= 2 batches, a finite positive quant_variance_se on every total record, with the
# per-batch values averaging to quant_variance; its "command" is one that reruns.
set -u
f=$1
[[ -s $f ]] || { echo "no file $f"; exit 1; }
for k in quantizer bits layer quant_variance quant_variance_se quant_variance_batches sampling_variance ratio bias \
         bias_noise_floor bound increment; do
  grep -q "\"$k\":" "$f" || { echo "missing field $k in $f"; exit 1; }
done
grep -q '"layer": "total"' "$f" || { echo "no total record in $f"; exit 1; }
/usr/bin/python3 - "$f" <<'PY' || exit 1
import json, math, sys
doc = json.load(open(sys.argv[1]))
recs = doc["records"]
# The recorded command reruns: flags as written (CLI11 stores a flag's value as "true").
cmd = doc["command"]
assert cmd.startswith("fqt variance ") and " --quiet" in cmd, f"command {cmd!r}"
assert not any(w in ("true", "false") for w in cmd.split()), f"command {cmd!r} gives a flag a value"
tot = [r for r in recs if r["layer"] == "total"]
floor = [r for r in tot if r["quantizer"] == "none"]
assert len(floor) == 1, f"expected one wgrad-only floor total record, got {len(floor)}"
fl = floor[0]
assert fl["bits"] == 0 and fl["bound"] == 0 and fl["quant_variance"] > 0, f"floor record: {fl}"
B = doc["batches"]
for r in tot:
    se = r["quant_variance_se"]
    if B >= 2:
        assert se is not None and math.isfinite(se) and se > 0, f"{r['quantizer']} {r['bits']}: quant_variance_se {se}"
    v = r["quant_variance_batches"]
    assert len(v) == B, f"{len(v)} per-batch values, {B} batches"
    assert abs(sum(v) / B - r["quant_variance"]) <= 1e-9 * r["quant_variance"], "per-batch values do not average"
# (Whether each configuration lies above the floor is a statistical question, tested with stated
# margins in tests/stat/test_variance.cpp; here the counts are printed only.)
above = sum(r["quant_variance"] > fl["quant_variance"] for r in tot if r is not fl)
print(f"floor {fl['quant_variance']:.3e} (se {fl['quant_variance_se']}); {above} of {len(tot) - 1} configurations above it")
PY
echo "ok: $f has the record fields and the floor"
