#!/usr/bin/env bash
# Generates the Python protobuf/gRPC modules and their mypy stubs from the wire contract.
#
#   usage: tools/gen_proto.sh PYTHON OUTDIR     (make: bash tools/gen_proto.sh .venv/bin/python agent/rpc/pb)
#
# OUTDIR is build output (gitignored): it is replaced wholesale on every run and never edited by
# hand. PYTHON must have grpcio-tools and mypy-protobuf; the mypy-protobuf plugins are taken from
# PYTHON's bin directory (the venv), else from PATH.
set -euo pipefail

if [ "$#" -ne 2 ]; then
  echo "usage: $0 PYTHON OUTDIR" >&2
  exit 2
fi

abspath() {  # absolute path without resolving symlinks: a venv's python is a symlink to /usr/bin
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    */*) printf '%s/%s\n' "$(cd "$(dirname "$1")" && pwd)" "$(basename "$1")" ;;
    *) command -v "$1" ;;
  esac
}

python=$(abspath "$1")
mkdir -p "$2"
outdir=$(cd "$2" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
proto_rel=vicifast/agent/v1/agent.proto

plugin() {
  local name=$1 bindir
  bindir=$(dirname "$python")
  if [ -x "$bindir/$name" ]; then
    printf '%s\n' "$bindir/$name"
  elif command -v "$name" >/dev/null; then
    command -v "$name"
  else
    echo "$0: $name not found next to $python or on PATH (pip install mypy-protobuf)" >&2
    exit 1
  fi
}
mypy_plugin=$(plugin protoc-gen-mypy)
mypy_grpc_plugin=$(plugin protoc-gen-mypy_grpc)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# -I proto keeps the descriptor's file name "vicifast/agent/v1/agent.proto" and the full names
# vicifast.agent.v1.*: reflection and the health service depend on them, so the proto is
# compiled from its canonical place and only the Python output is moved.
(
  cd "$root"
  "$python" -m grpc_tools.protoc \
    -I proto \
    --plugin=protoc-gen-mypy="$mypy_plugin" \
    --plugin=protoc-gen-mypy_grpc="$mypy_grpc_plugin" \
    --python_out="$work" \
    --grpc_python_out="$work" \
    --mypy_out=quiet:"$work" \
    --mypy_grpc_out=quiet:"$work" \
    "proto/$proto_rel"
)

gen="$work/${proto_rel%/*}"
# protoc writes the grpc module (and its stub) with an absolute import of the message module
# derived from the proto's path: `from vicifast.agent.v1 import agent_pb2`. That package does not
# exist in our tree; the modules live flat in OUTDIR (agent.rpc.pb). A relative import makes the
# pair work wherever OUTDIR is, without a fake top-level `vicifast` package on sys.path. The
# rewrite must hit exactly one line per file, else protoc's output changed and we stop.
for f in "$gen/agent_pb2_grpc.py" "$gen/agent_pb2_grpc.pyi"; do
  n=$(grep -c '^from vicifast\.agent\.v1 import agent_pb2 as ' "$f" || true)
  if [ "$n" != 1 ]; then
    echo "$0: expected one 'from vicifast.agent.v1 import agent_pb2' line in ${f##*/}, found $n" >&2
    exit 1
  fi
  sed -i 's/^from vicifast\.agent\.v1 import agent_pb2 as /from . import agent_pb2 as /' "$f"
done
if grep -n 'vicifast\.agent\.v1 import\|import vicifast' "$gen"/*; then
  echo "$0: generated code still imports the vicifast package; extend the rewrite" >&2
  exit 1
fi

cat > "$gen/__init__.py" <<'PY'
"""Generated from proto/vicifast/agent/v1/agent.proto by tools/gen_proto.sh. DO NOT EDIT."""
PY

# Replace OUTDIR's contents only after everything above succeeded.
find "$outdir" -mindepth 1 -maxdepth 1 ! -name .stamp -exec rm -rf {} +
cp "$gen"/__init__.py "$gen"/agent_pb2.py "$gen"/agent_pb2.pyi \
  "$gen"/agent_pb2_grpc.py "$gen"/agent_pb2_grpc.pyi "$outdir"/
