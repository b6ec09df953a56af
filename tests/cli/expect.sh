#!/usr/bin/env bash
# expect.sh STATUS REGEX -- command...   Runs the command; passes when it exits with STATUS and
# its combined output matches REGEX (grep -E). Used by ctest to check the CLI's promises.
set -u
want=$1 regex=$2
shift 3
out=$("$@" 2>&1)
got=$?
if [[ $got -ne $want ]]; then
  echo "exit status $got, expected $want. Output:"; echo "$out"; exit 1
fi
if ! grep -Eq -- "$regex" <<<"$out"; then
  echo "output does not match /$regex/:"; echo "$out"; exit 1
fi
echo "ok: status $got, output matches /$regex/"
