#!/usr/bin/env bash
# Start a real Prefect server (API + UI + scheduler) on 127.0.0.1, with its SQLite database in a
# project-local folder. Schedules and deployments need this; a plain `python -m flows.pipeline`
# without PREFECT_API_URL uses a temporary server instead.
#
#   bash scripts/prefect-server.sh                  # .prefect/ in the project, port 4200
#   PREFECT_HOME=~/prefect PORT=4300 bash scripts/prefect-server.sh
#
# Then, in the shell that runs flows:  export PREFECT_API_URL=http://127.0.0.1:4200/api
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
mkdir -p "$PREFECT_HOME"
# The UI (a JS app in the browser) calls the API at PREFECT_UI_API_URL, which otherwise defaults
# to port 4200 whatever --port says. No usage telemetry, no sign-up pop-up over the run pages.
export PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$PORT
export PREFECT_UI_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=${PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT:-false}

PREFECT=prefect
[ -x .venv/bin/prefect ] && PREFECT=.venv/bin/prefect
if ! command -v "$PREFECT" >/dev/null; then
  echo "error: prefect is not installed: run 'bash scripts/install.sh' (it creates .venv with it)." >&2
  exit 1
fi

cat <<MSG
Prefect server: database in $PREFECT_HOME, UI at http://127.0.0.1:$PORT
In the shell that runs flows:

    export PREFECT_API_URL=http://127.0.0.1:$PORT/api

MSG
exec "$PREFECT" server start --host 127.0.0.1 --port "$PORT"
