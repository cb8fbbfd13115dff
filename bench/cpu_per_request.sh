#!/usr/bin/env bash
# CPU time per request of already-running servers, interleaved: the A/B tool behind the
# "CPU per request" figures in docs/BENCHMARKS.md (wall-clock req/s on two shared cores
# scatters by ±15 %; a process's own CPU per request is steadier).
#
#   bench/cpu_per_request.sh NAME=PID=URL [NAME=PID=URL ...]
#
# Each round runs `wrk -t1 -c$BENCH_CONNECTIONS -d$BENCH_DURATION URL` against every peer
# in turn and reads the peer's utime + stime from /proc/PID/stat (all its threads) before
# and after; CPU per request = CPU ticks ÷ the requests wrk reports. For nginx give a
# worker's PID, not the master's. Prints each peer's median req/s and µs per request over
# BENCH_ROUNDS rounds, and every round's req/s.
#
# Settings (environment): BENCH_ROUNDS=8, BENCH_DURATION=3s, BENCH_CONNECTIONS=50.
set -euo pipefail
rounds=${BENCH_ROUNDS:-8}
duration=${BENCH_DURATION:-3s}
connections=${BENCH_CONNECTIONS:-50}
if [ "$#" -eq 0 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
hz=$(getconf CLK_TCK)

cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

per_request() { # ticks requests -> µs
  awk -v t="$1" -v hz="$hz" -v n="$2" 'BEGIN {printf "%.2f", (n > 0 ? t * 1e6 / hz / n : 0)}'
}

declare -A rps_of us_of user_of sys_of
for spec in "$@"; do
  IFS='=' read -r name pid url <<<"$spec"
  [ -r "/proc/$pid/stat" ] || { echo "$name: no process $pid" >&2; exit 1; }
  rps_of[$name]=""
  us_of[$name]=""
  user_of[$name]=""
  sys_of[$name]=""
done
for round in $(seq "$rounds"); do
  for spec in "$@"; do
    IFS='=' read -r name pid url <<<"$spec"
    read -r user_before sys_before < <(cpu_ticks "$pid")
    out=$(wrk -t1 -c"$connections" -d"$duration" "$url")
    read -r user_after sys_after < <(cpu_ticks "$pid")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    user=$((user_after - user_before))
    sys=$((sys_after - sys_before))
    us=$(per_request $((user + sys)) "$requests")
    rps_of[$name]+="$rps "
    us_of[$name]+="$us "
    user_of[$name]+="$(per_request "$user" "$requests") "
    sys_of[$name]+="$(per_request "$sys" "$requests") "
    echo "round $round $name: $rps req/s, $us µs CPU per request" >&2
  done
done
printf '%-12s %12s %16s %10s %10s   %s\n' peer "req/s (med)" "µs/req (med)" "user" "kernel" \
  "req/s per round"
for spec in "$@"; do
  IFS='=' read -r name _ _ <<<"$spec"
  printf '%-12s %12s %16s %10s %10s   %s\n' "$name" "$(median <<<"${rps_of[$name]}")" \
    "$(median <<<"${us_of[$name]}")" "$(median <<<"${user_of[$name]}")" \
    "$(median <<<"${sys_of[$name]}")" "${rps_of[$name]}"
done
