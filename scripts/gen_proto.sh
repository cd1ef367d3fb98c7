#!/usr/bin/env bash
# Regenerate services/_proto from services/proto (or into $1 to check freshness).
set -euo pipefail
out="${1:-services/_proto}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
PATH="$(dirname "$python"):$PATH" "$python" -m grpc_tools.protoc -I services/proto \
  --python_out="$out" --pyi_out="$out" --grpclib_python_out="$out" --grpc_python_out="$out" \
  services/proto/*.proto
# protoc emits top-level imports; make them package-relative so the code lives inside services.
sed -i -E 's/^import ([a-z_]+_pb2)( as .*)?$/from . import \1\2/' "$out"/*_grpc.py
printf '"""Generated from services/proto by scripts/gen_proto.sh; do not edit."""\n' > "$out/__init__.py"
