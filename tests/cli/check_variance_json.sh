#!/usr/bin/env bash
# check_variance_json.sh FILE: the variance.json of `fqt variance` has the documented record fields
# and a "total" record per configuration.
set -u
f=$1
[[ -s $f ]] || { echo "no file $f"; exit 1; }
for k in quantizer bits layer quant_variance sampling_variance ratio bias bias_noise_floor bound increment; do
  grep -q "\"$k\":" "$f" || { echo "missing field $k in $f"; exit 1; }
done
grep -q '"layer": "total"' "$f" || { echo "no total record in $f"; exit 1; }
echo "ok: $f has the record fields"
