#!/usr/bin/env bash
# Evidence without ground truth on real scans that ship in pip packages (issue 10, part 4): for each scan,
# `slicefield validate` (held-out slices predicted through the acquisition model, residual maps, report) and one
# `slicefield reconstruct --run-dir` of the method it ranks first.
#   dipy's data/files/aniso_vox.nii.gz: a real 4 x 4 x 5 mm T1 stack, oblique (one stack: slice groups held out);
#   nibabel's tests/data/anatomical.nii: a real 2 mm T1 read as one stack of 2 mm axial slices.
# Colin27 stacks (three simulated from the real 1 mm scan, truth known) are in benchmarks/validate_ranking.py.
# Usage: bash benchmarks/real_scans.sh [out_dir]     (default runs/real; ~10 min on 2 cores)
# ANISO=path/to/aniso_vox.nii.gz skips fetching dipy's wheel (the file is not in any dependency of slicefield).
set -euo pipefail
out=${1:-runs/real}
sf=${SLICEFIELD:-.venv/bin/slicefield}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -z "${ANISO:-}" ]; then
  wheel_dir=$(mktemp -d)
  "$py" -m pip download -q --no-deps dipy==1.12.1 -d "$wheel_dir"
  "$py" -m zipfile -e "$wheel_dir"/dipy-*.whl "$wheel_dir/whl" >/dev/null
  ANISO="$wheel_dir/whl/dipy/data/files/aniso_vox.nii.gz"
fi
ANATOMICAL=$("$py" -c "import nibabel, pathlib; print(pathlib.Path(nibabel.__file__).parent / 'tests/data/anatomical.nii')")
mkdir -p "$out"
run() {
  name=$1; stack=$2; res=$3
  echo "== $name: validate bspline,srr,inr at $res mm"
  /usr/bin/time -f "$name validate wall %e s, peak %M kB" \
    "$sf" validate "$stack" --methods bspline,srr,inr --resolution "$res" --run-dir "$out/${name}_validate"
  for m in srr inr; do
    echo "== $name: reconstruct $m at $res mm"
    /usr/bin/time -f "$name $m wall %e s, peak %M kB" \
      "$sf" reconstruct "$stack" --method "$m" --resolution "$res" -o "$out/${name}_$m.nii.gz" --run-dir "$out/${name}_$m"
  done
}
run aniso_vox "$ANISO" 2
run anatomical "$ANATOMICAL" 1
