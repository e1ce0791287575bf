#!/usr/bin/env bash
# Installs Milvus Lite (pinned in tests/milvus/requirements.txt) into target/milvus-venv, where the
# Rust tests that run against Milvus find its gRPC server (`milvus-lite server`); they start and
# stop their own servers on loopback. BLIPSEARCH_MILVUS_LITE names another binary instead.
#
# Needs python3 >= 3.10 with venv (installed with apt-get when missing and running as root, as in
# CI) and PyPI on the first run; later runs reuse the environment while the pins are unchanged.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/serve-lib.sh
python_venv target/milvus-venv tests/milvus/requirements.txt
target/milvus-venv/bin/milvus-lite server --help >/dev/null
echo "milvus-lite: $PWD/target/milvus-venv/bin/milvus-lite"
