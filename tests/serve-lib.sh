# shellcheck shell=bash
# Shell helpers of the scripts that test a real `blipsearch serve` (tests/browser/run.sh,
# tests/schemathesis/run.sh, tests/load/run.sh). Source it from the repository root.

# blipsearch_bin: sets BLIPSEARCH_BIN to the debug binary, building it, unless it is set.
blipsearch_bin() {
  if [ -n "${BLIPSEARCH_BIN:-}" ]; then
    return
  fi
  cargo build --bin blipsearch
  local target_dir
  target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  BLIPSEARCH_BIN=$target_dir/debug/blipsearch
}

# scratch_collection NAME: a temporary folder $TMP holding a copy of the fixture images in
# $TMP/images. On exit the server $SERVER_PID (when set and running) is stopped and $TMP removed.
scratch_collection() {
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/blipsearch-$1.XXXXXX")
  SERVER_PID=
  trap stop_server_and_clean EXIT
  mkdir -p "$TMP/images"
  cp tests/fixtures/images/* "$TMP/images/"
}

stop_server_and_clean() {
  if [ -n "${SERVER_PID:-}" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}

# python_venv DIR REQUIREMENTS: a virtual environment in DIR with the pinned REQUIREMENTS,
# made again only when they change. Debian ships venv apart from python3: it is installed
# with apt-get when missing and running as root (as in CI).
python_venv() {
  local venv=$1 reqs=$2
  if cmp -s "$reqs" "$venv/requirements.txt"; then
    return
  fi
  echo "installing $reqs into $venv"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      echo "installing python3-venv (apt-get)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$venv"
      python3 -m venv "$venv"
    else
      echo "python3 -m venv failed: apt-get install -y python3-venv (as root)" >&2
      exit 1
    fi
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs"
  cp "$reqs" "$venv/requirements.txt"
}

# serve_fixtures LOG ARGS...: starts `blipsearch serve` in the background (SERVER_PID) over
# $TMP/images (collection in $TMP/index) with the tiny fixture models and the key $API_KEY (none
# when it is empty), on 127.0.0.1:$PORT, with ARGS added and its output appended to LOG.
serve_fixtures() {
  local log=$1
  shift
  "$BLIPSEARCH_BIN" serve \
    --images "$TMP/images" \
    --index "$TMP/index" \
    --bind "127.0.0.1:$PORT" \
    --model-dir tests/fixtures/tiny-a/retrieval \
    --caption-model-dir tests/fixtures/tiny-a/caption \
    ${API_KEY:+--api-key "$API_KEY"} \
    "$@" \
    >>"$log" 2>&1 &
  SERVER_PID=$!
}
