#!/usr/bin/env bash
# Screenshot a page of the Prefect UI with headless Chromium (scripts/install-system.sh installs it).
#
#   bash scripts/screenshot-prefect.sh [URL] [OUT]
#
# URL defaults to the newest flow run on the server at $PREFECT_API_URL (default
# http://127.0.0.1:4200/api); OUT to docs/img/prefect-flow-run.png. With DOM_OUT=<file>, the
# rendered page's HTML is saved there too (the tests check it names the run and its stages).
set -euo pipefail
cd "$(dirname "$0")/.."

API=${PREFECT_API_URL:-http://127.0.0.1:4200/api}
URL=${1:-}
OUT=${2:-docs/img/prefect-flow-run.png}

if ! command -v chromium >/dev/null; then
  echo "error: chromium is not installed: run 'bash scripts/install-system.sh' (Debian package chromium)." >&2
  exit 1
fi
if [ -z "$URL" ]; then
  RUN_ID=$(curl -sf -X POST "$API/flow_runs/filter" -H 'Content-Type: application/json' \
             -d '{"sort": "START_TIME_DESC", "limit": 1, "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}}}' \
           | python3 -c 'import json, sys; runs = json.load(sys.stdin); print(runs[0]["id"] if runs else "")') || {
    echo "error: the Prefect server at $API is unreachable: start it with 'bash scripts/prefect-server.sh' and export the PREFECT_API_URL it prints." >&2
    exit 1
  }
  [ -n "$RUN_ID" ] || { echo "error: no flow run on $API yet: run 'python -m flows.pipeline' first." >&2; exit 1; }
  URL="${API%/api}/runs/flow-run/$RUN_ID"
fi

# The UI is a JS app: --virtual-time-budget lets it fetch and render before the shot is taken.
# A fresh profile and no background services keep Chromium from phoning home.
chromium_page() {
  local profile
  profile=$(mktemp -d)
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --window-size=1400,900 --virtual-time-budget=15000 "$@" 2>/dev/null
  rm -rf "$profile"
}

mkdir -p "$(dirname "$OUT")"
if [ -n "${DOM_OUT:-}" ]; then
  chromium_page --screenshot="$OUT" --dump-dom "$URL" > "$DOM_OUT"   # one render, both outputs
else
  chromium_page --screenshot="$OUT" "$URL" >/dev/null
fi
echo "$URL -> $OUT"
