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
           "\| preact_resnet20 \| fqt \| fqt \| bhq \| int" "## Targets" "int8 GEMM >= 3x fp32 GEMM at 1024\^3 \| [0-9.]+x \| (yes|no)" \
           "quantizer time \(PSQ\) <= 15%.*\| [0-9.]+% \| (yes|no)" "activation memory saved .*\| [0-9.]+x \| (yes|no)" \
           "\| preact_resnet20 \| [0-9]+ \| [0-9]+ \| yes" "GEMM ms f32 / int" "Warning: the machine was busy" \
           "\*\*Note:\*\* [0-9]+ configuration"; do
  if ! grep -Eq -- "$pat" "$out"; then echo "missing /$pat/ in $out"; fail=1; fi
done
# An empty folder is an error, not an empty document.
if "$py" "$gen" "$(mktemp -d)" "$out.empty" 2>/dev/null; then echo "empty run folder accepted"; fail=1; fi
[[ $fail == 0 ]] && echo "ok: report generated with all sections"
exit $fail
