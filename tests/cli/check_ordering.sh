#!/usr/bin/env bash
# fqt quantize --json on a heavy-tailed matrix: measured variance BHQ < PSQ < PTQ at 4 and 8 bits,
# and every record carries the documented fields.
set -euo pipefail
json=$("$1" quantize --input "$2" --quantizer ptq,psq,bhq --bits 4,8 --samples 20 --json)
/usr/bin/python3 - "$json" <<'PY'
import json, sys
recs = json.loads(sys.argv[1])
need = {"quantizer", "bits", "measured_variance", "analytic_variance", "bound", "bias", "bias_noise_floor"}
for r in recs:
    missing = need - r.keys()
    assert not missing, f"record lacks {missing}: {r}"
for b in (4, 8):
    v = {r["quantizer"]: r["measured_variance"] for r in recs if r["bits"] == b}
    assert v["bhq"] < v["psq"] < v["ptq"], f"{b} bits: ordering broken: {v}"
    print(f"{b} bits: ptq {v['ptq']:.3e} > psq {v['psq']:.3e} > bhq {v['bhq']:.3e} (psq/bhq {v['psq']/v['bhq']:.1f})")
PY
