#!/usr/bin/env bash
# Build the medlava image: containers/build.sh [OUT.sif]   (default: medlava.sif; needs apptainer >= 1.2)
# Pins come only from containers/versions.env; run from anywhere, the build context is the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while IFS= read -r line; do
  [[ -z "$line" || "$line" == \#* ]] && continue
  args+=(--build-arg "$line")
done < containers/versions.env
exec apptainer build "${args[@]}" "${1:-medlava.sif}" containers/medlava.def
