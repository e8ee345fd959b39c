#!/usr/bin/env bash
# Regenerate server/jaxinfer_pb2.py, server/jaxinfer_pb2.pyi and server/jaxinfer_pb2_grpc.py from
# server/jaxinfer.proto. Run from anywhere; needs grpcio-tools (pip install grpcio-tools).
# The include root is the repository root, so the generated gRPC module imports
# "from server import jaxinfer_pb2".
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. server/jaxinfer.proto
grep -q "^from server import jaxinfer_pb2" server/jaxinfer_pb2_grpc.py
echo "regenerated server/jaxinfer_pb2.py, server/jaxinfer_pb2.pyi, server/jaxinfer_pb2_grpc.py"
