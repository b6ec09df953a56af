#!/usr/bin/env bash
# check_history.sh PYTHON SCRIPT FIXTURE_DIR: scripts/perf_history.py on two fixture reports of
# different layouts (with and without the recompute column, 7 and 3 rounds), the newer one given
# twice (one run, labelled with the older file), and on a file that is not a report.
set -euo pipefail
py=$1 script=$2 dir=$3
out=$("$py" "$script" --files "$dir/new.md" "$dir/new.md" "$dir/old.md")
echo "$out"
fail=0
expect() {
  if ! grep -Eq -- "$1" <<<"$out"; then echo "missing /$1/"; fail=1; fi
}
# new.md: PyTorch's median ms is the 7th column (129.9), not images/s; every figure in its column.
expect "^\| [^|]*new.md \| 2026-12-06 \| 04c47a3 \| 7 \| 19 \| 129.9 \| 3.65x \| 2.21x \| 1.87x \| 2.16x \| 1.97x \| 1.00x \| 12.90% \| 13.72% \| 16.47% \| 25.92% \| 7.40x \|$"
# old.md: no recompute column (median ms is the 6th: 214.9, not 596), no memory line, no rows-per-sample targets.
expect "^\| [^|]*old.md \| 2026-11-23 \| c411566 \| 3 \| — \| 214.9 \| 1.17x \| — \| 0.94x \| — \| — \| — \| 23.89% \| — \| — \| — \| 5.17x \|$"
rows=$(grep -c "new.md" <<<"$out" || true)
[[ $rows == 1 ]] || { echo "new.md given twice: $rows rows, expected 1 (the same run)"; fail=1; }
# Not a report: a clear message and exit status 1, no table.
set +e
msg=$("$py" "$script" --files "$dir/bad.md" 2>&1)
rc=$?
set -e
[[ $rc == 1 && $msg == *"bad.md: not a performance report"* && $msg != *"|"* ]] || { echo "bad.md: rc $rc, output: $msg"; fail=1; }
msg=$("$py" "$script" --files "$dir/missing.md" 2>&1) && { echo "a missing file exited 0"; fail=1; }
[[ $msg == *"cannot read"*"missing.md"* ]] || { echo "missing.md: $msg"; fail=1; }
exit $fail
