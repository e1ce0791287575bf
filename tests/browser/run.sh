#!/usr/bin/env bash
# Browser test of the web UI: starts a real `blipsearch serve` on a temporary index of the fixture
# images with the tiny fixture models, then drives the UI in headless Chromium
# (tests/browser/ui.test.mjs) in five passes: the whole UI with a key on writes; moderation (a
# match list made in the UI flags two images, which are reviewed, and the audit log shows it); a
# short pass with --protect-reads; a server without a key (flags show to all, moderation is
# refused); and the facets and product cards over a small product catalogue (made by the ignored
# test `browser_catalogue` of tests/api.rs). Screenshots land in target/browser/ (ui.png,
# ui-detail.png, ui-review.png, ui-audit.png, ui-facets.png, ui-products.png, and failure.png
# when a step fails); the server log is target/browser/server.log.
#
# Needs: cargo, node + npm, and Debian's chromium (installed here with apt-get when missing and
# running as root, as in CI). Environment overrides: BLIPSEARCH_BIN (skip the cargo build),
# CHROMIUM (browser binary), ARTIFACT_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ARTIFACT_DIR=${ARTIFACT_DIR:-$ROOT/target/browser}
mkdir -p "$ARTIFACT_DIR"
rm -f "$ARTIFACT_DIR"/failure.png

if [ -z "${CHROMIUM:-}" ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      echo "installing chromium (apt-get)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "chromium is missing: apt-get install -y chromium (as root), or set CHROMIUM" >&2
      exit 1
    fi
  fi
  CHROMIUM=$(command -v chromium)
fi
"$CHROMIUM" --version

# playwright-core (pinned in package-lock.json) needs Node.js 20 or newer.
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
  echo "the browser test needs Node.js >= 20 and npm (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

. tests/serve-lib.sh
blipsearch_bin
# The collection: every fixture image but one; that one is uploaded through the UI.
scratch_collection browser
UPLOAD_IMAGE=$TMP/upload/rocket.jpg
mkdir -p "$TMP/upload"
mv "$TMP/images/rocket.jpg" "$UPLOAD_IMAGE"
EXPECTED_IMAGES=$(find "$TMP/images" -type f | wc -l)

API_KEY=browser-test-key

free_port() {
  node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# start_server EXTRA_ARGS...: a server on a free loopback port over the temporary index.
start_server() {
  PORT=$(free_port)
  serve_fixtures "$ARTIFACT_DIR/server.log" "$@"
  echo "blipsearch serve $* on 127.0.0.1:$PORT (pid $SERVER_PID, log $ARTIFACT_DIR/server.log)"
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

# run_ui_test EXPECTED_IMAGES [UI_TEST]: the browser test against the running server.
run_ui_test() {
  local status=0
  BLIPSEARCH_URL="http://127.0.0.1:$PORT" \
  EXPECTED_IMAGES=$1 \
  UI_TEST=${2:-full} \
  QUERY_IMAGE="$TMP/images/camera.png" \
  DROP_IMAGE="$TMP/images/coffee.png" \
  UPLOAD_IMAGE="$UPLOAD_IMAGE" \
  REFERENCE_IMAGES="$ROOT/tests/fixtures/pdq/camera.text.jpg:$ROOT/tests/fixtures/pdq/rocket.mirror.jpg" \
  BLIPSEARCH_API_KEY=$API_KEY \
  ARTIFACT_DIR=$ARTIFACT_DIR \
  CHROMIUM=$CHROMIUM \
  SERVER_PID=$SERVER_PID \
    node tests/browser/ui.test.mjs || status=$?
  if [ "$status" != 0 ]; then
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "the server exited early" >&2; fi
    echo "---- last lines of $ARTIFACT_DIR/server.log" >&2
    tail -n 40 "$ARTIFACT_DIR/server.log" >&2
    exit "$status"
  fi
}

: >"$ARTIFACT_DIR/server.log"
# 1. The whole UI; writes need the key (the UI asks for it on the upload's 401).
start_server
run_ui_test "$EXPECTED_IMAGES"
# 2. Moderation on the same server (now with the upload): lists, flags, review, audit.
run_ui_test $((EXPECTED_IMAGES + 1)) moderation
stop_server
# 3. Same index, reads need the key too.
start_server --protect-reads
run_ui_test $((EXPECTED_IMAGES + 1)) protected-reads
stop_server
# 4. Same index (with the flag confirmed in 2), on a server without a key.
API_KEY='' start_server
API_KEY='' run_ui_test $((EXPECTED_IMAGES + 1)) no-key
stop_server
# 5. A product catalogue: facets, a price range, product cards.
CATALOGUE=$TMP/catalogue
mkdir -p "$CATALOGUE"
BROWSER_CATALOGUE_DIR=$CATALOGUE cargo test --test api -- --ignored --exact browser_catalogue
# Served as the fixtures are, from $CATALOGUE/images and $CATALOGUE/index.
PORT=$(free_port)
TMP=$CATALOGUE serve_fixtures "$ARTIFACT_DIR/server.log"
echo "blipsearch serve over the catalogue on 127.0.0.1:$PORT (pid $SERVER_PID)"
# Eight images: four products of one to three images, and one image without a product.
run_ui_test 8 catalogue
stop_server
