#!/usr/bin/env bash
# A Ray head on this machine for `python -m pipeline submit`, bound to 127.0.0.1.
#
#   cluster/local-head.sh start|stop|status
#
# The project's venv comes first on PATH before `ray start`, so jobs run a python
# that has ray, torch and the project's requirements. Usage stats are off. Ray's
# token authentication stays on (its default; the token lives in ~/.ray/auth_token
# and `python -m pipeline submit` on this machine finds it); only tests on
# loopback set RAY_AUTH_MODE=disabled.
#
# Settings, from the environment:
#   RAY_HEAD_PORT (6379)  RAY_DASHBOARD_PORT (8265)  RAY_CLIENT_PORT (10001)
#   RAY_AGENT_PORT (52365)  RAY_NUM_CPUS (all cores)  RAY_NUM_GPUS (detected)
#   RAY_LOGGER_LEVEL (warning: at info, Ray logs job env vars, credentials included)
#   RAY_HEAD_DIR  state: pid file, log, Ray's temp dir (default /tmp/metapipe-ray-$UID; at most 32
#                 characters: Ray's socket paths live under it and a socket path is capped at 107 bytes)
#   METAPIPE_VENV the environment to run (default: the project's .venv)
# `stop` stops this head only (the PID recorded by `start`), never other Ray instances on the machine.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${METAPIPE_VENV:-$root/.venv}
dir=${RAY_HEAD_DIR:-/tmp/metapipe-ray-$(id -u)}
pidfile=$dir/head.pid
port=${RAY_HEAD_PORT:-6379}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}
client_port=${RAY_CLIENT_PORT:-10001}
agent_port=${RAY_AGENT_PORT:-52365}
dashboard=http://127.0.0.1:$dashboard_port
# Ray puts sockets at $dir/ray/session_<date>_<time>_<usec>_<pid>/sockets/dash_TaskEventsHead:
# 4 + 42 + 9 + 19 characters after $dir. Longer, and the dashboard fails a minute into `ray start`.
max_dir=32

running() {
  [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

answers() {
  "$venv/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "$dashboard/api/version" 2>/dev/null
}

start() {
  if running; then
    echo "Ray head already running (pid $(cat "$pidfile")), dashboard $dashboard"
    return 0
  fi
  if (( ${#dir} > max_dir )); then
    echo "error: RAY_HEAD_DIR=$dir is ${#dir} characters; at most $max_dir (Ray's socket paths under it are capped at 107 bytes)" >&2
    exit 2
  fi
  [[ -x $venv/bin/ray ]] || { echo "error: no ray in $venv (set METAPIPE_VENV or install requirements.txt)" >&2; exit 2; }
  mkdir -p "$dir"
  # Ray's runtime-env agent logs each job's env_vars (the credentials `pipeline submit` forwards) at INFO.
  export PATH="$venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_LOGGER_LEVEL=${RAY_LOGGER_LEVEL:-warning}
  local resources=(--num-cpus="${RAY_NUM_CPUS:-$(nproc)}")
  [[ -n ${RAY_NUM_GPUS:-} ]] && resources+=(--num-gpus="$RAY_NUM_GPUS")
  # --block keeps `ray start` in the foreground: stopping its PID stops every process of this head.
  nohup ray start --head --block --disable-usage-stats \
    --node-ip-address=127.0.0.1 --port="$port" \
    --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
    --ray-client-server-port="$client_port" --dashboard-agent-listen-port="$agent_port" \
    --temp-dir="$dir/ray" "${resources[@]}" >"$dir/head.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 120); do
    if answers; then
      echo "Ray head running (pid $(cat "$pidfile")): address 127.0.0.1:$port, dashboard and jobs API $dashboard"
      echo "logs: $dir"
      return 0
    fi
    if ! running; then
      echo "error: ray start exited; last lines of $dir/head.log:" >&2
      tail -n 20 "$dir/head.log" >&2
      rm -f "$pidfile"
      exit 1
    fi
    sleep 0.5
  done
  echo "error: the dashboard at $dashboard did not answer in 60 s; see $dir/head.log" >&2
  exit 1
}

stop() {
  if ! running; then
    echo "no Ray head running from $dir"
    rm -f "$pidfile"
    return 0
  fi
  local pid
  pid=$(cat "$pidfile")
  kill -TERM "$pid"
  for _ in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; echo "Ray head stopped (pid $pid)"; return 0; }
    sleep 0.5
  done
  echo "Ray head (pid $pid) still running after 30 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

status() {
  if running && answers; then
    echo "Ray head running (pid $(cat "$pidfile")), dashboard $dashboard"
    PATH="$venv/bin:$PATH" ray status --address="127.0.0.1:$port" || true
  else
    echo "Ray head not running (state in $dir)"
    return 3
  fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
