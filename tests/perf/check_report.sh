#!/usr/bin/env bash
# check_report.sh PYTHON GENERATOR FIXTURE_DIR OUT.md: runs the performance-report generator on
# fixture JSON and checks that the document has its tables, the targets and the command.
set -euo pipefail
py=$1 gen=$2 dir=$3 out=$4
rm -f "$out"
"$py" "$gen" "$dir" "$out"
fail=0
for pat in "^# Performance" "QUICK MODE" "Command: \`scripts/perf_report" "## GEMM throughput" \
           "^\| 1024 \| 1024 \| 1024 \| 1 \| square" "## Training step" "\| preact_resnet20 \| pytorch \| fp32" \
           "\| preact_resnet20 \| fqt \| fqt \| bhq \| int" "\| preact_resnet20 \| fqt \| fqt \| bhq/s \| int \| auto \|" \
           "quantizer time \(BHQ, rows per sample\) <= 15%.*\| [0-9.]+% \| (yes|no)" \
           "FQT-int8 \(psq/s\) step of PreAct-ResNet-20 >= 2x faster than PyTorch" "## Targets" "int8 GEMM >= 3x fp32 GEMM at 1024\^3 \| [0-9.]+x \| (yes|no)" \
           "quantizer time \(PSQ\) <= 15%.*\| [0-9.]+% \| (yes|no)" "activation memory saved .*\| [0-9.]+x \| (yes|no)" \
           "\| preact_resnet20 \| [0-9]+ \| [0-9]+ \| yes" "GEMM ms f32 / int" "Warning: the machine was busy" \
           "\*\*Note:\*\* [0-9]+ configuration" "\| preact_resnet20 \| fqt \| fqt \| psq \| int \| on \|" \
           "\| preact_resnet20 \| fqt \| fqt \| psq \| int \| off \|" "\| preact_resnet20 \| fqt \| fqt \| bhq \| int \| auto \|" \
           "FQT\) \(default --recompute auto\) \| 3.21x \| yes" "with --recompute off\) \| 1.57x \| no" \
           "with --recompute on\) \| 7.23x \| yes" "step time with --recompute off / auto .*\| 0.90x \|" \
           "step with --recompute off against PyTorch fp32 .*\| [0-9.]+x" \
           "## Where the FQT step goes \(preact_resnet20, PSQ vs BHQ\)" "^\| step \(median\) \| [0-9.]+ \| [0-9.]+ \|" \
           "^\| conv 16->16 3x3 s1: backward: dgrad \| [0-9.]+ \| [0-9.]+ \|" \
           "^\| bhq quantizer: rank sort, shares \(beside the wgrad draw\) \| [0-9.]+ \| [0-9.]+% \|"; do
  if ! grep -Eq -- "$pat" "$out"; then echo "missing /$pat/ in $out"; fail=1; fi
done
# Rounds: a speedup is the median over rounds of the per-round ratio (fp32 and FQT measured in the
# same round), not the ratio of the median times. Three rounds, fp32 100 / 200 / 150 ms and
# FQT-psq 80 / 125 / 90 ms:
rd=$(mktemp -d)
cp "$dir/meta.json" "$rd/"
"$py" - "$dir/step_preact_resnet20.json" "$rd" <<'PY'
import json, sys
recs = json.load(open(sys.argv[1]))
for rnd, (f32, psq) in enumerate([(100.0, 80.0), (200.0, 125.0), (150.0, 90.0)], 1):
    out = []
    for r in recs:
        r = dict(r)
        if r.get("mode") == "fp32":
            r["median_ms"] = f32
        elif r.get("dgrad") == "psq":
            r["median_ms"] = psq
        out.append(r)
    json.dump(out, open(f"{sys.argv[2]}/step_preact_resnet20_r{rnd}.json", "w"))
PY
"$py" "$gen" "$rd" "$out.rounds"
# ratios 1.25, 1.60, 1.667 -> median 1.60; the ratio of the medians would be 150 / 90 = 1.67.
for pat in "\(psq\) step of PreAct-ResNet-20 >= 1.5x faster than fqt fp32 \(default --recompute auto\) \| 1.60x \(rounds: 1.25-1.67, n=3\) \| yes" \
           "\| preact_resnet20 \| fqt \| fp32 \| - \| - \| off \| 150.0 \|"; do
  if ! grep -Eq -- "$pat" "$out.rounds"; then echo "missing /$pat/ in $out.rounds"; fail=1; fi
done
rm -rf "$rd"
# Measured interference (meta other_cpu_cores / steal_cpu_cores): the warning only when others
# took more than a quarter of a core.
for load in 0.01 0.6; do
  rd=$(mktemp -d)
  cp "$dir"/*.json "$rd/"
  "$py" - "$rd/meta.json" "$load" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])); m.update(other_cpu_cores=float(sys.argv[2]), steal_cpu_cores=0.0, bench_wall_s=60.0)
json.dump(m, open(sys.argv[1], "w"))
PY
  "$py" "$gen" "$rd" "$out.load"
  grep -q "other processes used $(printf %.2f "$load") cores" "$out.load" || { echo "no interference line for $load"; fail=1; }
  if [[ $load == 0.6 ]] && ! grep -q "Warning: other processes or the hypervisor took 0.60" "$out.load"; then
    echo "no warning at 0.6 cores"; fail=1
  fi
  if [[ $load == 0.01 ]] && grep -q "Warning" "$out.load"; then echo "warning at 0.01 cores"; fail=1; fi
  rm -rf "$rd"
done
# An empty folder is an error, not an empty document.
empty=$(mktemp -d)
if "$py" "$gen" "$empty" "$out.empty" 2>/dev/null; then echo "empty run folder accepted"; fail=1; fi
rmdir "$empty"
[[ $fail == 0 ]] && echo "ok: report generated with all sections"
exit $fail
