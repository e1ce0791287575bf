#!/usr/bin/env bash
# Contract test of the HTTP API: starts a real `blipsearch serve` on a temporary collection of the
# fixture images with the tiny fixture models, then runs schemathesis (pinned in requirements.txt,
# installed into its own virtual environment) against the server's own /api/openapi.json with
# every check (tests/schemathesis/hooks.py makes schema-valid uploads real images). Two passes
# with a fixed seed: writes need the key, then --protect-reads (reads need it too). Any failure
# fails the script. Reports (JUnit, and a pytest file reproducing failures) and the server log
# land in target/schemathesis/.
#
# Needs: cargo, python3 >= 3.11 with venv (python3-venv is installed with apt-get when
# missing and running as root, as in CI), PyPI on the first run. Environment overrides:
# BLIPSEARCH_BIN (skip the cargo build), SCHEMATHESIS_VENV (where the virtual environment lives),
# ARTIFACT_DIR, MAX_EXAMPLES (test cases per operation and phase), SEED.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ARTIFACT_DIR=${ARTIFACT_DIR:-$ROOT/target/schemathesis}
VENV=${SCHEMATHESIS_VENV:-$ROOT/target/schemathesis-venv}
MAX_EXAMPLES=${MAX_EXAMPLES:-60}
SEED=${SEED:-20240601}
mkdir -p "$ARTIFACT_DIR"
START=$(date +%s)

. tests/serve-lib.sh
python_venv "$VENV" tests/schemathesis/requirements.txt
"$VENV/bin/schemathesis" --version

blipsearch_bin
scratch_collection schemathesis
API_KEY=schemathesis-test-key

# start_server EXTRA_ARGS...: a server on a free loopback port over the temporary collection,
# returning once its folder ingest is idle.
start_server() {
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  serve_fixtures "$ARTIFACT_DIR/server.log" "$@"
  echo "blipsearch serve $* on 127.0.0.1:$PORT (pid $SERVER_PID, log $ARTIFACT_DIR/server.log)"
  local state=
  for _ in $(seq 1 300); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "the server exited early" >&2
      tail -n 40 "$ARTIFACT_DIR/server.log" >&2
      exit 1
    fi
    state=$(python3 - "$PORT" "$API_KEY" <<'PY' 2>/dev/null || true
import json, sys, urllib.request
port, key = sys.argv[1:]
req = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"Bearer {key}"})
ingest = json.load(urllib.request.urlopen(req, timeout=5))["ingest"]
print(ingest["state"] if ingest["last_run_unix"] else "starting")
PY
)
    if [ "$state" = idle ]; then
      return 0
    fi
    sleep 0.5
  done
  echo "the folder ingest did not finish (state: ${state:-no answer})" >&2
  exit 1
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

FAILED=()
# run_schemathesis NAME EXTRA_ARGS...: every check against the running server.
run_schemathesis() {
  local name=$1
  shift
  local status=0
  SCHEMATHESIS_HOOKS=tests/schemathesis/hooks.py \
  "$VENV/bin/schemathesis" --config-file tests/schemathesis/schemathesis.toml \
    run "http://127.0.0.1:$PORT/api/openapi.json" \
    --checks all \
    --header "Authorization: Bearer $API_KEY" \
    --max-examples "$MAX_EXAMPLES" \
    --seed "$SEED" \
    --generation-database none \
    --workers 1 \
    --request-timeout 60 \
    --no-color \
    --report junit,pytest \
    --report-junit-path "$ARTIFACT_DIR/$name.junit.xml" \
    --report-pytest-path "$ARTIFACT_DIR/$name.reproduce.py" \
    "$@" || status=$?
  if [ "$status" != 0 ]; then
    FAILED+=("$name")
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "the server exited early" >&2; fi
  fi
}

: >"$ARTIFACT_DIR/server.log"
# 1. Writes need the key.
start_server
run_schemathesis writes-keyed
stop_server
# 2. Reads need it too.
start_server --protect-reads
run_schemathesis reads-keyed
stop_server

echo "schemathesis: $((  $(date +%s) - START ))s in all"
if [ "${#FAILED[@]}" != 0 ]; then
  echo "schemathesis found failures in: ${FAILED[*]} (reports in $ARTIFACT_DIR)" >&2
  exit 1
fi
echo "schemathesis: no failures"
