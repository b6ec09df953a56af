#!/usr/bin/env bash
# check_memory.sh FQT: `fqt bench memory --json` gives one record per requested working-set size
# with positive latency and bandwidth, and dependent loads within a 256 KB set (L1/L2) take less
# time than within a 16 MB one (beyond L2 on any machine this runs on).
set -u
fqt=$1
out=$("$fqt" bench memory --sizes 0.25,16 --reps 3 --json) || { echo "bench memory failed"; exit 1; }
/usr/bin/python3 - "$out" <<'PY' || exit 1
import json, sys
recs = json.loads(sys.argv[1])
assert [r["bytes"] for r in recs] == [262144, 16777216], recs
assert all(r["latency_ns"] > 0 and r["read_gbps"] > 0 for r in recs), recs
assert recs[0]["latency_ns"] < recs[1]["latency_ns"], recs
print(" / ".join(f"{r['bytes'] >> 10} KB: {r['latency_ns']:.1f} ns, {r['read_gbps']:.1f} GB/s" for r in recs))
PY
