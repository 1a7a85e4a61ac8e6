#!/usr/bin/env bash
# Reproduce the vendored NiiVue bundle of `slicefield view` from the npm registry:
#   tools/update_niivue.sh [VERSION]        (default: the version recorded in niivue.json)
# Takes dist/niivue.umd.js (self-contained UMD build, no dependencies to fetch at run time) from the published
# @niivue/niivue tarball, unchanged, and records its version, sha256 and the tarball's integrity in niivue.json.
# Needs node's npm and the npm registry; nothing is built. License: BSD-2-Clause (NIIVUE_LICENSE.txt beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=src/slicefield/viewer/static
version="${1:-$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$dest/niivue.json")}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@niivue/niivue@$version" >/dev/null)
tar -xzf "$tmp/niivue-niivue-$version.tgz" -C "$tmp" package/dist/niivue.umd.js package/package.json
license="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["license"])' "$tmp/package/package.json")"
if [ "$license" != "BSD-2-Clause" ]; then
    echo "update_niivue.sh: @niivue/niivue $version is licensed $license, not BSD-2-Clause: check before vendoring" >&2
    exit 1
fi
cp "$tmp/package/dist/niivue.umd.js" "$dest/niivue.umd.js"
sha="$(sha256sum "$dest/niivue.umd.js" | cut -d' ' -f1)"
integrity="$(npm view "@niivue/niivue@$version" dist.integrity 2>/dev/null)"
cat > "$dest/niivue.json" <<JSON
{
  "package": "@niivue/niivue",
  "version": "$version",
  "file": "dist/niivue.umd.js",
  "sha256": "$sha",
  "tarball_integrity": "$integrity",
  "license": "BSD-2-Clause",
  "license_file": "NIIVUE_LICENSE.txt",
  "homepage": "https://github.com/niivue/niivue",
  "reproduce": "tools/update_niivue.sh $version"
}
JSON
echo "vendored @niivue/niivue $version: $dest/niivue.umd.js sha256 $sha"
