#!/usr/bin/env bash
# bspline vs srr across acquisition protocols on Colin27 (ch2bet), one `slicefield benchmark` run per protocol.
# Usage: bash benchmarks/protocols.sh [path/to/ch2bet.nii.gz]   (writes benchmarks/results/colin_*.json)
set -euo pipefail
ref=${1:-../shared/data/ch2bet.nii.gz}
sf=${SLICEFIELD:-.venv/bin/slicefield}
out=benchmarks/results
mkdir -p "$out"
run() { name=$1; shift; echo "== $name: $*"; "$sf" -q benchmark "$ref" --methods bspline,srr --json "$out/colin_$name.json" "$@"; }
run oblique_x4 --orientations axial@10,5,0,coronal@-8,0,12,sagittal@0,10,-6
run box_3mm_gap1 --psf box --thickness 3 --gap 1
run x8 --thickness 8
run rician3 --noise 0.03 --noise-kind rician
run two_stacks --orientations axial,sagittal
