#!/usr/bin/env bash
# Peer benchmark: Gatehouse vs nginx vs HAProxy, side by side, on loopback.
#
#   bench/run.sh            # full run (about 40 minutes with the defaults)
#   bench/run.sh --quick    # smoke test (about 3 minutes): short loads, 1 round, 1 worker
#
# What it does (details and recorded numbers: docs/BENCHMARKS.md):
#  1. installs nginx (and Debian's dynamic stream module, libnginx-mod-stream), haproxy,
#     wrk, h2load (nghttp2-client) and curl with apt-get when missing;
#  2. builds `gatehouse` and the `bench_client` example with cargo --release --locked;
#  3. starts ONE fixed backend (a dedicated nginx answering `return 200 "..."` on HTTP/1.1,
#     h2c and TLS, and serving two sparse files: BENCH_BULK_SIZE and BENCH_STREAM_SIZE,
#     made with `truncate` in /dev/shm), plus an upload sink (`bench_client sink`, which
#     reads each body to its end before answering), used by every peer and by the direct
#     baseline;
#  4. for each worker count (BENCH_WORKERS, default "1 2") starts Gatehouse, nginx and
#     HAProxy with that many workers/threads (configs: bench/*.conf, *.cfg, *.toml, ports
#     filled in here), then runs, interleaved (direct, gatehouse, nginx, haproxy, repeat
#     BENCH_ROUNDS times; the median is reported):
#       - HTTP/1.1 keep-alive max throughput and p50/p99 latency (wrk --latency);
#       - HTTP/1.1 p99 at a fixed rate of half nginx's median max throughput
#         (bench_client rate: open-loop, latency from each request's due time);
#       - h2c throughput (h2load, 100 concurrent streams per connection);
#       - TLS termination (one throwaway ECDSA P-256 certificate, TLS 1.3): HTTP/1.1
#         keep-alive throughput over TLS (wrk https) and h2 over TLS (h2load https);
#       - TLS passthrough: each peer relays, by SNI and without terminating, to the
#         backend's TLS port (Gatehouse `passthrough` route, nginx `stream` + ssl_preread,
#         HAProxy `mode tcp` + req.ssl_sni; dedicated ports). (a) HTTP/1.1 keep-alive
#         requests inside the relayed TLS (wrk https://localhost:PORT/, SNI localhost);
#         (b) one BENCH_BULK_SIZE download over the relay (curl -k), in MB/s;
#       - new TLS connections per second on each peer's TLS-terminating port (direct: the
#         backend's TLS port): bench_client handshakes, BENCH_HANDSHAKE_CONNECTIONS loops
#         of connect, full handshake (resumption disabled), one request, close;
#       - streaming a BENCH_STREAM_SIZE body through the plain HTTP port, download (curl
#         -o /dev/null) and upload (curl -T to the sink), sampling the peer's summed RSS
#         every 100 ms: start, peak, growth, MB/s (nginx streams both ways on these paths:
#         proxy_buffering off, proxy_request_buffering off);
#       - memory of BENCH_IDLE_CONNECTIONS idle keep-alive connections (bench_client
#         idle, on a freshly restarted peer; summed RSS of the peer's processes from
#         /proc before and after, divided by the connections);
#  5. prints a summary with ratios vs Gatehouse and saves everything under BENCH_OUT.
#
# Everything it starts listens on 127.0.0.1 only and is stopped on exit.
#
# Settings (environment):
#   BENCH_DURATION=10s        each measured load (wrk -d, h2load -D, rate and handshake clients)
#   BENCH_WARMUP=3s           one unmeasured wrk run per peer before the first round
#   BENCH_ROUNDS=3            interleaved rounds per load; medians are reported
#   BENCH_WORKERS="1 2"       worker counts to measure (same for every peer)
#   BENCH_CONNECTIONS=50      wrk / rate-client connections
#   BENCH_WRK_THREADS=1       wrk threads (and rate- and handshake-client threads)
#   BENCH_H2_CONNECTIONS=10   h2load connections (each with 100 streams: -m 100)
#   BENCH_H2_STREAMS=100      h2load -m
#   BENCH_HANDSHAKE_CONNECTIONS=50   new-TLS-connection loops running at once
#   BENCH_BULK_SIZE=1G        TLS passthrough bulk download (truncate -s syntax)
#   BENCH_STREAM_SIZE=2G      streamed body, each direction
#   BENCH_IDLE_CONNECTIONS=10000   (fewer when `ulimit -n` cannot be raised far enough:
#                             HAProxy reserves two descriptors per connection, so with
#                             the 20000 hard limit of some containers this is 9500)
#   BENCH_BACKEND_WORKERS=1   nginx workers of the fixed backend
#   BENCH_PORT_BASE=18100     ports BASE..BASE+14 are used
#   BENCH_MAX_LOAD=           if set (e.g. 0.7), wait until the 1-minute load average is
#                             below it before measuring (polls every 30 s, up to
#                             BENCH_LOAD_WAIT=900 s, then measures anyway and says so)
#   BENCH_OUT=target/bench/<timestamp>   results directory
#   BENCH_PEERS="gatehouse nginx haproxy"
#   BENCH_TESTS="http1 rate h2 tls1 tls2 pt1 ptbulk hs stream idle"   rows to measure
#                             (rate needs http1: its rate is half of nginx's maximum)
#   BENCH_SKIP_BUILD=1        reuse target/release binaries (iterating on the harness)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=${BENCH_QUICK:-0}
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done
# Descriptors: as many as allowed (containers often cap the hard limit, e.g. at 20000).
# The peer configs are sized from it: HAProxy refuses to start when 2 × maxconn plus its
# reserve exceeds its descriptor limit, nginx warns when worker_connections does.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
HAPROXY_MAXCONN=$(((NOFILE - 400) / 2))
((HAPROXY_MAXCONN > 40000)) && HAPROXY_MAXCONN=40000
NGINX_CONNECTIONS=$((NOFILE - 1000))
((NGINX_CONNECTIONS > 40000)) && NGINX_CONNECTIONS=40000
IDLE_FIT=$((HAPROXY_MAXCONN - 300))
((IDLE_FIT > 10000)) && IDLE_FIT=10000

if [[ $QUICK == 1 ]]; then
  DURATION=${BENCH_DURATION:-2s}
  WARMUP=${BENCH_WARMUP:-1s}
  ROUNDS=${BENCH_ROUNDS:-1}
  WORKERS_LIST=${BENCH_WORKERS:-1}
  IDLE_CONNECTIONS=${BENCH_IDLE_CONNECTIONS:-1000}
else
  DURATION=${BENCH_DURATION:-10s}
  WARMUP=${BENCH_WARMUP:-3s}
  ROUNDS=${BENCH_ROUNDS:-3}
  WORKERS_LIST=${BENCH_WORKERS:-1 2}
  IDLE_CONNECTIONS=${BENCH_IDLE_CONNECTIONS:-$IDLE_FIT}
fi
CONNECTIONS=${BENCH_CONNECTIONS:-50}
WRK_THREADS=${BENCH_WRK_THREADS:-1}
H2_CONNECTIONS=${BENCH_H2_CONNECTIONS:-10}
H2_STREAMS=${BENCH_H2_STREAMS:-100}
HS_CONNECTIONS=${BENCH_HANDSHAKE_CONNECTIONS:-50}
BULK_SIZE=${BENCH_BULK_SIZE:-1G}
STREAM_SIZE=${BENCH_STREAM_SIZE:-2G}
BACKEND_WORKERS=${BENCH_BACKEND_WORKERS:-1}
PORT_BASE=${BENCH_PORT_BASE:-18100}
MAX_LOAD=${BENCH_MAX_LOAD:-}
LOAD_WAIT=${BENCH_LOAD_WAIT:-900}
PEERS=${BENCH_PEERS:-gatehouse nginx haproxy}
ALL_TESTS="http1 rate h2 tls1 tls2 pt1 ptbulk hs stream idle"
TESTS=${BENCH_TESTS:-$ALL_TESTS}
for t in $TESTS; do
  [[ " $ALL_TESTS " == *" $t "* ]] || { echo "unknown test in BENCH_TESTS: $t (known: $ALL_TESTS)" >&2; exit 2; }
done
want() { [[ " $TESTS " == *" $1 "* ]]; }
OUT=${BENCH_OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw" "$OUT/run/tmp"
OUT=$(cd "$OUT" && pwd)
RUN=$OUT/run
RESULTS=$OUT/results.tsv
: >"$RESULTS"

BACKEND_PORT=$PORT_BASE
BACKEND_H2_PORT=$((PORT_BASE + 1))
declare -A PORT=([direct]=$BACKEND_PORT [gatehouse]=$((PORT_BASE + 2)) [nginx]=$((PORT_BASE + 4)) [haproxy]=$((PORT_BASE + 6)))
declare -A H2_PORT=([direct]=$BACKEND_H2_PORT [gatehouse]=$((PORT_BASE + 2)) [nginx]=$((PORT_BASE + 5)) [haproxy]=$((PORT_BASE + 7)))
BACKEND_TLS_PORT=$((PORT_BASE + 10))
SINK_PORT=$((PORT_BASE + 14))
declare -A TLS_PORT=([direct]=$BACKEND_TLS_PORT [gatehouse]=$((PORT_BASE + 3)) [nginx]=$((PORT_BASE + 8)) [haproxy]=$((PORT_BASE + 9)))
# TLS passthrough (SNI routing without termination) to the backend's TLS port.
declare -A PT_PORT=([direct]=$BACKEND_TLS_PORT [gatehouse]=$((PORT_BASE + 11)) [nginx]=$((PORT_BASE + 12)) [haproxy]=$((PORT_BASE + 13)))
# The name every passthrough route matches; it resolves to 127.0.0.1 so wrk and curl
# send it as SNI.
PT_SNI=localhost

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
seconds() { # "10s" / "1500ms" / "2m" / "10" -> seconds (may be fractional)
  local v=$1
  case "$v" in
    *ms) awk -v x="${v%ms}" 'BEGIN { print x / 1000 }' ;;
    *s) echo "${v%s}" ;;
    *m) awk -v x="${v%m}" 'BEGIN { print x * 60 }' ;;
    *) echo "$v" ;;
  esac
}

# ---------------------------------------------------------------------------- cleanup
PIDS=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n ${FILES:-} && $FILES == /dev/shm/gatehouse-bench.* ]] && rm -rf "$FILES"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a command in the background, remembers its pid for cleanup. Sets STARTED_PID.
start_bg() {
  local logfile=$1
  shift
  "$@" >"$logfile" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local kept=()
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
  PIDS=("${kept[@]}")
}

# ---------------------------------------------------------------------- dependencies
NGINX_STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so
install_deps() {
  local missing=()
  command -v nginx >/dev/null || missing+=(nginx)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  command -v curl >/dev/null || missing+=(curl)
  # Debian builds nginx's stream module (TCP relay, ssl_preread) as a dynamic module.
  if nginx -V 2>&1 | grep -q -- '--with-stream=dynamic' && [[ ! -e $NGINX_STREAM_MODULE ]]; then
    missing+=(libnginx-mod-stream)
  fi
  [[ ${#missing[@]} == 0 ]] && return
  log "installing ${missing[*]}"
  local policy_added=0
  # Keep the packages' own services from starting (they would listen on port 80).
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  [[ $policy_added == 1 ]] && rm -f /usr/sbin/policy-rc.d
  # A fresh nginx package brings the module too (nginx depends on it in Debian 12).
  if nginx -V 2>&1 | grep -q -- '--with-stream=dynamic' && [[ ! -e $NGINX_STREAM_MODULE ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libnginx-mod-stream
  fi
  return 0
}

# ----------------------------------------------------------------------------- setup
render() { # template output [extra sed expressions]
  local template=$1 output=$2
  shift 2
  sed -e "s|@RUN@|$RUN|g" -e "s|@BACKEND_PORT@|$BACKEND_PORT|g" \
    -e "s|@BACKEND_H2_PORT@|$BACKEND_H2_PORT|g" -e "s|@BACKEND_WORKERS@|$BACKEND_WORKERS|g" \
    -e "s|@NOFILE@|$NOFILE|g" -e "s|@NGINX_CONNECTIONS@|$NGINX_CONNECTIONS|g" \
    -e "s|@HAPROXY_MAXCONN@|$HAPROXY_MAXCONN|g" -e "s|@BACKEND_TLS_PORT@|$BACKEND_TLS_PORT|g" \
    -e "s|@SINK_PORT@|$SINK_PORT|g" -e "s|@PT_SNI@|$PT_SNI|g" -e "s|@FILES@|$FILES|g" \
    -e "s|@LOAD_STREAM_MODULE@|$LOAD_STREAM_MODULE|g" \
    "$@" "$template" >"$output"
  if grep -v '^[[:space:]]*#' "$output" | grep -q '@[A-Z_0-9]*@'; then die "unfilled placeholder in $output"; fi
}

wait_port() { # port [seconds]
  local port=$1 limit=${2:-20}
  for _ in $(seq $((limit * 10))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

check_free() {
  local port
  for port in "$@"; do
    if ss -Hltn "sport = :$port" | grep -q .; then
      die "port $port is in use (set BENCH_PORT_BASE to move the harness)"
    fi
  done
}

check_http() { # port: one request must answer 200
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$1/") || true
  [[ $code == 200 ]] || die "127.0.0.1:$1 answered '$code' instead of 200"
}

check_h2() { # port: one h2c prior-knowledge request must answer 200
  local out
  out=$(h2load -n 1 -c 1 "http://127.0.0.1:$1/" 2>&1) || true
  grep -q '1 2xx' <<<"$out" || die "h2c on 127.0.0.1:$1 failed: $(tail -3 <<<"$out")"
}

declare -A PEER_PID
start_peer() { # peer workers
  local peer=$1 workers=$2
  local common=(-e "s|@WORKERS@|$workers|g" -e "s|@PORT@|${PORT[$peer]}|g" -e "s|@H2_PORT@|${H2_PORT[$peer]}|g"
    -e "s|@TLS_PORT@|${TLS_PORT[$peer]}|g" -e "s|@PT_PORT@|${PT_PORT[$peer]}|g")
  case "$peer" in
    gatehouse)
      render bench/gatehouse.toml "$RUN/gatehouse.toml" "${common[@]}"
      start_bg "$RUN/gatehouse-w$workers.log" "$ROOT/target/release/gatehouse" run \
        --config "$RUN/gatehouse.toml" --workers "$workers"
      ;;
    nginx)
      render bench/nginx.conf "$RUN/nginx.conf" "${common[@]}"
      start_bg "$RUN/nginx-w$workers.log" nginx -p "$RUN" -c "$RUN/nginx.conf" \
        -e "$RUN/nginx-error.log" -g 'daemon off;'
      ;;
    haproxy)
      render bench/haproxy.cfg "$RUN/haproxy.cfg" "${common[@]}"
      start_bg "$RUN/haproxy-w$workers.log" haproxy -db -f "$RUN/haproxy.cfg"
      ;;
  esac
  PEER_PID[$peer]=$STARTED_PID
  wait_port "${PORT[$peer]}" || die "$peer did not start; see $RUN/$peer-w$workers.log"
  wait_port "${H2_PORT[$peer]}" || die "$peer h2c port did not open"
  check_http "${PORT[$peer]}"
  check_h2 "${H2_PORT[$peer]}"
  wait_port "${TLS_PORT[$peer]}" || die "$peer TLS port did not open"
  check_tls "${TLS_PORT[$peer]}"
  wait_port "${PT_PORT[$peer]}" || die "$peer TLS passthrough port did not open"
  check_passthrough "${PT_PORT[$peer]}"
}

make_certificate() { # a throwaway ECDSA P-256 certificate for every peer's TLS port
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench.test -addext "subjectAltName=DNS:bench.test,DNS:$PT_SNI" \
    -keyout "$RUN/tls.key" -out "$RUN/tls.crt" 2>/dev/null || die "openssl could not make a certificate"
  cat "$RUN/tls.crt" "$RUN/tls.key" >"$RUN/tls.pem"
}

check_tls() { # port: one HTTPS request (h2 by ALPN) must answer 200
  local out
  out=$(h2load -n 1 -c 1 "https://127.0.0.1:$1/" 2>&1) || true
  grep -q '1 2xx' <<<"$out" || die "TLS on 127.0.0.1:$1 failed: $(tail -3 <<<"$out")"
  check_tls13 "$1" bench.test
}

check_tls13() { # port sni: every TLS endpoint must negotiate TLS 1.3 (nginx before 1.23.4
  # offers only up to 1.2 unless ssl_protocols says otherwise)
  local out
  out=$(openssl s_client -connect "127.0.0.1:$1" -servername "$2" </dev/null 2>&1) || true
  grep -q 'TLSv1\.3' <<<"$out" || die "127.0.0.1:$1 did not negotiate TLS 1.3: $(grep -m1 -i 'protocol' <<<"$out")"
}

check_passthrough() { # port: one HTTPS request with SNI $PT_SNI must reach the backend's TLS port
  local code
  code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 --resolve "$PT_SNI:$1:127.0.0.1" \
    "https://$PT_SNI:$1/") || true
  [[ $code == 200 ]] || die "TLS passthrough on 127.0.0.1:$1 answered '$code' instead of 200"
  check_tls13 "$1" "$PT_SNI"
  [[ $1 == "$BACKEND_TLS_PORT" ]] && return 0
  # Routed by SNI: another name must not get through.
  code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 --resolve "other.test:$1:127.0.0.1" \
    "https://other.test:$1/") || true
  [[ $code == 000 ]] || die "TLS passthrough on 127.0.0.1:$1 relayed an unknown SNI (answered '$code')"
}

check_sink() { # port: a small upload must be read to its end
  local out
  out=$(head -c 100000 /dev/zero | curl -s --max-time 5 -H 'Expect:' -T - "http://127.0.0.1:$1/upload") || true
  [[ $out == received=100000 ]] || die "upload sink on 127.0.0.1:$1 answered '$out'"
}

# All pids of a peer: the process and its children (nginx workers).
peer_pids() {
  local pid=$1
  echo "$pid"
  pgrep -P "$pid" || true
}

rss_kib() { # pids... -> summed VmRSS in KiB
  local total=0 pid v
  for pid in "$@"; do
    v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

record() { # workers test peer round metric value
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"
}

to_ms() { # "1.23ms" / "456.00us" / "1.02s" -> milliseconds
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 }
    else if (v ~ /m$/) { sub(/m$/, "", v); print v * 60000 }
    else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 }
    else print "nan" }'
}

# ------------------------------------------------------------------------------ loads
run_wrk() { # workers peer round duration [discard]
  local w=$1 peer=$2 round=$3 duration=$4 discard=${5:-}
  local raw=$OUT/raw/w$w-http1-$peer-r$round.txt
  wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$duration" --latency \
    "http://127.0.0.1:${PORT[$peer]}/" >"$raw" 2>&1 || die "wrk failed against $peer: $(tail -3 "$raw")"
  [[ -n $discard ]] && return 0
  local rps p50 p99 errors non2xx
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$raw")
  p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$raw")")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$raw")")
  errors=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$raw")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $5 }' "$raw")
  record "$w" http1 "$peer" "$round" rps "$rps"
  record "$w" http1 "$peer" "$round" p50_ms "$p50"
  record "$w" http1 "$peer" "$round" p99_ms "$p99"
  record "$w" http1 "$peer" "$round" errors "$((${errors:-0} + ${non2xx:-0}))"
  log "  http1 w=$w $peer round $round: $rps req/s, p50 ${p50} ms, p99 ${p99} ms"
}

run_rate() { # workers peer round rate
  local w=$1 peer=$2 round=$3 rate=$4
  local raw=$OUT/raw/w$w-rate-$peer-r$round.txt
  "$ROOT/target/release/examples/bench_client" rate --addr "127.0.0.1:${PORT[$peer]}" \
    --rate "$rate" --connections "$CONNECTIONS" --threads "$WRK_THREADS" --duration "$DURATION" --warmup 2s \
    >"$raw" 2>&1 || die "rate client failed against $peer: $(tail -3 "$raw")"
  local line key
  line=$(tail -1 "$raw")
  for key in achieved_rps p50_ms p99_ms p999_ms errors non_2xx; do
    record "$w" rate "$peer" "$round" "$key" "$(tr ' ' '\n' <<<"$line" | awk -F= -v k="$key" '$1 == k { print $2 }')"
  done
  log "  rate  w=$w $peer round $round: $line"
}

run_h2() { # workers peer round
  local w=$1 peer=$2 round=$3
  local raw=$OUT/raw/w$w-h2-$peer-r$round.txt
  h2load -t 1 -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -D "$(seconds "$DURATION")" \
    "http://127.0.0.1:${H2_PORT[$peer]}/" >"$raw" 2>&1 || die "h2load failed against $peer: $(tail -3 "$raw")"
  local rps failed mean
  rps=$(awk '/^finished in/ { print $4 }' "$raw")
  failed=$(awk '/^requests:/ { print $10 + $12 + $14 }' "$raw")
  mean=$(to_ms "$(awk '/^time for request:/ { print $6 }' "$raw")")
  record "$w" h2 "$peer" "$round" rps "$rps"
  record "$w" h2 "$peer" "$round" mean_ms "$mean"
  record "$w" h2 "$peer" "$round" errors "${failed:-0}"
  log "  h2c   w=$w $peer round $round: $rps req/s, mean ${mean} ms, failed ${failed:-?}"
}

run_tls_http1() { # workers peer round
  local w=$1 peer=$2 round=$3
  local raw=$OUT/raw/w$w-tls1-$peer-r$round.txt
  wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency \
    "https://127.0.0.1:${TLS_PORT[$peer]}/" >"$raw" 2>&1 || die "wrk https failed against $peer: $(tail -3 "$raw")"
  local rps p99 errors
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$raw")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$raw")")
  errors=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$raw")
  record "$w" tls1 "$peer" "$round" rps "$rps"
  record "$w" tls1 "$peer" "$round" p99_ms "$p99"
  record "$w" tls1 "$peer" "$round" errors "${errors:-0}"
  log "  tls1  w=$w $peer round $round: $rps req/s, p99 ${p99} ms"
}

run_tls_h2() { # workers peer round
  local w=$1 peer=$2 round=$3
  local raw=$OUT/raw/w$w-tls2-$peer-r$round.txt
  h2load -t 1 -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -D "$(seconds "$DURATION")" \
    "https://127.0.0.1:${TLS_PORT[$peer]}/" >"$raw" 2>&1 || die "h2load https failed against $peer: $(tail -3 "$raw")"
  local rps failed
  rps=$(awk '/^finished in/ { print $4 }' "$raw")
  failed=$(awk '/^requests:/ { print $10 + $12 + $14 }' "$raw")
  record "$w" tls2 "$peer" "$round" rps "$rps"
  record "$w" tls2 "$peer" "$round" errors "${failed:-0}"
  log "  tls2  w=$w $peer round $round: $rps req/s, failed ${failed:-?}"
}

run_pt_wrk() { # workers peer round: keep-alive HTTP/1.1 inside TLS relayed by SNI
  local w=$1 peer=$2 round=$3
  local raw=$OUT/raw/w$w-pt1-$peer-r$round.txt
  # wrk sends the URL's host as SNI; localhost resolves to 127.0.0.1 (::1, tried first
  # when present, has no listener and is refused at once).
  wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency \
    "https://$PT_SNI:${PT_PORT[$peer]}/" >"$raw" 2>&1 || die "wrk https (passthrough) failed against $peer: $(tail -3 "$raw")"
  local rps p99 errors
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$raw")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$raw")")
  errors=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$raw")
  record "$w" pt1 "$peer" "$round" rps "$rps"
  record "$w" pt1 "$peer" "$round" p99_ms "$p99"
  record "$w" pt1 "$peer" "$round" errors "${errors:-0}"
  log "  pt1   w=$w $peer round $round: $rps req/s, p99 ${p99} ms"
}

run_pt_bulk() { # workers peer round: one large download inside TLS relayed by SNI
  local w=$1 peer=$2 round=$3
  local raw=$OUT/raw/w$w-ptbulk-$peer-r$round.txt
  curl -sk --http1.1 -o /dev/null --max-time 600 --resolve "$PT_SNI:${PT_PORT[$peer]}:127.0.0.1" \
    -w '%{http_code} %{size_download} %{time_total}\n' \
    "https://$PT_SNI:${PT_PORT[$peer]}/files/bulk.bin" >"$raw" 2>&1 || die "bulk download (passthrough) failed against $peer: $(tail -3 "$raw")"
  local code size seconds mbps
  read -r code size seconds <"$raw"
  [[ $code == 200 && $size == "$BULK_BYTES" ]] || die "bulk download via $peer: status $code, $size of $BULK_BYTES bytes"
  mbps=$(awk -v b="$size" -v t="$seconds" 'BEGIN { printf "%.1f", b / t / 1e6 }')
  record "$w" ptbulk "$peer" "$round" mbps "$mbps"
  log "  ptbulk w=$w $peer round $round: $mbps MB/s"
}

run_handshakes() { # workers peer round: full TLS handshakes, one request per connection
  local w=$1 peer=$2 round=$3
  local raw=$OUT/raw/w$w-hs-$peer-r$round.txt
  "$ROOT/target/release/examples/bench_client" handshakes --addr "127.0.0.1:${TLS_PORT[$peer]}" \
    --connections "$HS_CONNECTIONS" --threads "$WRK_THREADS" --duration "$DURATION" >"$raw" 2>&1 ||
    die "handshake client failed against $peer: $(tail -3 "$raw")"
  local line key
  line=$(tail -1 "$raw")
  for key in per_sec errors non_2xx; do
    record "$w" hs "$peer" "$round" "$key" "$(tr ' ' '\n' <<<"$line" | awk -F= -v k="$key" '$1 == k { print $2 }')"
  done
  log "  hs    w=$w $peer round $round: $line"
}

run_stream() { # workers peer round direction(down|up): 2 GiB through the plain HTTP port, RSS sampled
  local w=$1 peer=$2 round=$3 dir=$4
  local raw=$OUT/raw/w$w-stream-$dir-$peer-r$round.txt
  local -a pids
  if [[ $peer == direct ]]; then
    # The server's own RSS: the backend nginx (download) or the sink (upload).
    if [[ $dir == down ]]; then mapfile -t pids < <(peer_pids "$BACKEND_PID"); else pids=("$SINK_PID"); fi
  else
    mapfile -t pids < <(peer_pids "${PEER_PID[$peer]}")
  fi
  local -a request
  if [[ $dir == down ]]; then
    request=(-o /dev/null "http://127.0.0.1:${PORT[$peer]}/files/stream.bin")
  else
    local port=${PORT[$peer]}
    [[ $peer == direct ]] && port=$SINK_PORT
    # No `Expect: 100-continue` round trip: not every peer answers it the same way.
    request=(-o "$raw.body" -H 'Expect:' -T "$FILES/stream.bin" "http://127.0.0.1:$port/upload")
  fi
  local start peak sample
  start=$(rss_kib "${pids[@]}")
  peak=$start
  curl -s --max-time 600 -w '%{http_code} %{size_download} %{size_upload} %{time_total}\n' \
    "${request[@]}" >"$raw" 2>&1 &
  local client=$!
  while kill -0 "$client" 2>/dev/null; do
    sample=$(rss_kib "${pids[@]}")
    ((sample > peak)) && peak=$sample
    sleep 0.1
  done
  wait "$client" || die "streaming $dir failed against $peer: $(tail -3 "$raw")"
  local code down up seconds moved mbps
  read -r code down up seconds <"$raw"
  moved=$down
  [[ $dir == up ]] && moved=$up
  [[ $code == 200 && $moved == "$STREAM_BYTES" ]] || die "streaming $dir via $peer: status $code, $moved of $STREAM_BYTES bytes"
  if [[ $dir == up ]] && [[ $(cat "$raw.body") != "received=$STREAM_BYTES" ]]; then
    die "streaming up via $peer: the sink answered '$(cat "$raw.body")'"
  fi
  mbps=$(awk -v b="$moved" -v t="$seconds" 'BEGIN { printf "%.1f", b / t / 1e6 }')
  record "$w" "stream_$dir" "$peer" "$round" mbps "$mbps"
  record "$w" "stream_$dir" "$peer" "$round" rss_start_kib "$start"
  record "$w" "stream_$dir" "$peer" "$round" rss_peak_kib "$peak"
  record "$w" "stream_$dir" "$peer" "$round" rss_growth_kib "$((peak - start))"
  log "  stream $dir w=$w $peer round $round: $mbps MB/s, RSS $start -> peak $peak KiB"
}

run_idle() { # workers peer
  local w=$1 peer=$2
  local raw=$OUT/raw/w$w-idle-$peer.txt
  # A fresh process: memory freed after the earlier loads stays in each allocator's free
  # lists and would be reused for the idle connections, hiding their cost.
  stop_pid "${PEER_PID[$peer]}"
  start_peer "$peer" "$w"
  local -a pids
  mapfile -t pids < <(peer_pids "${PEER_PID[$peer]}")
  sleep 1
  local before after
  before=$(rss_kib "${pids[@]}")
  start_bg "$raw" "$ROOT/target/release/examples/bench_client" idle \
    --addr "127.0.0.1:${PORT[$peer]}" --connections "$IDLE_CONNECTIONS" --hold 8s
  local client=$STARTED_PID
  for _ in $(seq 1200); do
    grep -q '^ready' "$raw" && break
    kill -0 "$client" 2>/dev/null || break
    sleep 0.1
  done
  grep -q '^ready' "$raw" || die "idle client failed against $peer: $(tail -3 "$raw")"
  sleep 2
  after=$(rss_kib "${pids[@]}")
  wait "$client" || true
  stop_pid "$client"
  local opened still
  opened=$(awk '/^ready/ { print $2 }' "$raw")
  still=$(awk '/^still_open/ { print $2 }' "$raw")
  local per_conn
  per_conn=$(awk -v a="$after" -v b="$before" -v n="$opened" 'BEGIN { printf "%.2f", (n > 0) ? (a - b) / n : 0 }')
  record "$w" idle "$peer" 1 rss_before_kib "$before"
  record "$w" idle "$peer" 1 rss_after_kib "$after"
  record "$w" idle "$peer" 1 connections "$opened"
  record "$w" idle "$peer" 1 still_open "${still:-0}"
  record "$w" idle "$peer" 1 kib_per_conn "$per_conn"
  log "  idle  w=$w $peer: $opened connections, RSS $before -> $after KiB, $per_conn KiB/conn, ${still:-?} still open after the hold"
  sleep 3 # let the peer notice the closed connections
}

# ---------------------------------------------------------------------------- summary
median() { # values on stdin
  sort -g | awk '{ a[NR] = $1 } END {
    if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

value() { # workers test peer metric -> median over rounds
  awk -F'\t' -v w="$1" -v t="$2" -v p="$3" -v m="$4" '$1 == w && $2 == t && $3 == p && $5 == m { print $6 }' "$RESULTS" | median
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0 || a == "nan" || b == "nan") print "n/a"; else printf "%.2f", a / b }'; }

summary() {
  local w peer gh
  echo "Gatehouse peer benchmark — $(date -u '+%Y-%m-%d %H:%M UTC')"
  cat "$OUT/machine.txt"
  echo
  echo "Medians of $ROUNDS interleaved round(s); ratios are Gatehouse ÷ peer (throughput: higher is better"
  echo "for Gatehouse; latency and memory: lower is better for Gatehouse)."
  for w in $WORKERS_LIST; do
    echo
    echo "== $w worker(s) =="
    if want http1; then
      echo
      echo "HTTP/1.1 keep-alive, wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION --latency"
      printf '  %-10s %12s %10s %10s %8s %12s\n' peer req/s p50_ms p99_ms errors "GH÷peer rps"
      gh=$(value "$w" http1 gatehouse rps)
      for peer in direct $PEERS; do
        local rps
        rps=$(value "$w" http1 "$peer" rps)
        printf '  %-10s %12.0f %10.3f %10.3f %8s %12s\n' "$peer" "$rps" "$(value "$w" http1 "$peer" p50_ms)" \
          "$(value "$w" http1 "$peer" p99_ms)" "$(value "$w" http1 "$peer" errors)" "$(ratio "$gh" "$rps")"
      done
    fi
    if want rate; then
      local target
      target=$(awk -F'\t' -v w="$w" '$1 == w && $2 == "rate" && $5 == "target_rps" { print $6; exit }' "$RESULTS")
      echo
      echo "HTTP/1.1 fixed rate ${target:-?} req/s (half of nginx's median max), $CONNECTIONS connections, $DURATION"
      printf '  %-10s %12s %10s %10s %10s %8s %12s\n' peer achieved p50_ms p99_ms p99.9_ms errors "GH÷peer p99"
      gh=$(value "$w" rate gatehouse p99_ms)
      for peer in direct $PEERS; do
        local p99
        p99=$(value "$w" rate "$peer" p99_ms)
        printf '  %-10s %12.0f %10.3f %10.3f %10.3f %8s %12s\n' "$peer" "$(value "$w" rate "$peer" achieved_rps)" \
          "$(value "$w" rate "$peer" p50_ms)" "$p99" "$(value "$w" rate "$peer" p999_ms)" \
          "$(value "$w" rate "$peer" errors)" "$(ratio "$gh" "$p99")"
      done
    fi
    if want h2; then
      echo
      echo "h2c (prior knowledge), h2load -t1 -c$H2_CONNECTIONS -m$H2_STREAMS -D$(seconds "$DURATION")"
      printf '  %-10s %12s %10s %8s %12s\n' peer req/s mean_ms failed "GH÷peer rps"
      gh=$(value "$w" h2 gatehouse rps)
      for peer in direct $PEERS; do
        local rps
        rps=$(value "$w" h2 "$peer" rps)
        printf '  %-10s %12.0f %10.3f %8s %12s\n' "$peer" "$rps" "$(value "$w" h2 "$peer" mean_ms)" \
          "$(value "$w" h2 "$peer" errors)" "$(ratio "$gh" "$rps")"
      done
    fi
    if want tls1; then
      echo
      echo "TLS termination, HTTP/1.1 keep-alive over TLS, wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION (https)"
      printf '  %-10s %12s %10s %8s %12s\n' peer req/s p99_ms errors "GH÷peer rps"
      gh=$(value "$w" tls1 gatehouse rps)
      for peer in $PEERS; do
        local rps
        rps=$(value "$w" tls1 "$peer" rps)
        printf '  %-10s %12.0f %10.3f %8s %12s\n' "$peer" "$rps" "$(value "$w" tls1 "$peer" p99_ms)" \
          "$(value "$w" tls1 "$peer" errors)" "$(ratio "$gh" "$rps")"
      done
    fi
    if want tls2; then
      echo
      echo "TLS termination, h2 over TLS, h2load -t1 -c$H2_CONNECTIONS -m$H2_STREAMS -D$(seconds "$DURATION") (https)"
      printf '  %-10s %12s %8s %12s\n' peer req/s failed "GH÷peer rps"
      gh=$(value "$w" tls2 gatehouse rps)
      for peer in $PEERS; do
        local rps
        rps=$(value "$w" tls2 "$peer" rps)
        printf '  %-10s %12.0f %8s %12s\n' "$peer" "$rps" "$(value "$w" tls2 "$peer" errors)" "$(ratio "$gh" "$rps")"
      done
    fi
    if want pt1; then
      echo
      echo "TLS passthrough (SNI $PT_SNI, not terminated), HTTP/1.1 keep-alive inside TLS, wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION (https)"
      printf '  %-10s %12s %10s %8s %12s %12s\n' peer req/s p99_ms errors "GH÷peer rps" "peer÷direct"
      gh=$(value "$w" pt1 gatehouse rps)
      local direct
      direct=$(value "$w" pt1 direct rps)
      for peer in direct $PEERS; do
        local rps
        rps=$(value "$w" pt1 "$peer" rps)
        printf '  %-10s %12.0f %10.3f %8s %12s %12s\n' "$peer" "$rps" "$(value "$w" pt1 "$peer" p99_ms)" \
          "$(value "$w" pt1 "$peer" errors)" "$(ratio "$gh" "$rps")" "$(ratio "$rps" "$direct")"
      done
    fi
    if want ptbulk; then
      echo
      echo "TLS passthrough bulk: one $BULK_SIZE download over TLS (curl -k, HTTP/1.1), MB/s = 10^6 bytes/s"
      printf '  %-10s %12s %12s %12s\n' peer MB/s "GH÷peer" "peer÷direct"
      gh=$(value "$w" ptbulk gatehouse mbps)
      direct=$(value "$w" ptbulk direct mbps)
      for peer in direct $PEERS; do
        local mbps
        mbps=$(value "$w" ptbulk "$peer" mbps)
        printf '  %-10s %12.1f %12s %12s\n' "$peer" "$mbps" "$(ratio "$gh" "$mbps")" "$(ratio "$mbps" "$direct")"
      done
    fi
    if want hs; then
      echo
      echo "New TLS connections: full handshakes (no resumption), one request each, bench_client handshakes -c$HS_CONNECTIONS -t$WRK_THREADS, $DURATION"
      printf '  %-10s %14s %8s %8s %12s\n' peer handshakes/s errors non_2xx "GH÷peer"
      gh=$(value "$w" hs gatehouse per_sec)
      for peer in direct $PEERS; do
        local hs
        hs=$(value "$w" hs "$peer" per_sec)
        printf '  %-10s %14.0f %8s %8s %12s\n' "$peer" "$hs" "$(value "$w" hs "$peer" errors)" \
          "$(value "$w" hs "$peer" non_2xx)" "$(ratio "$gh" "$hs")"
      done
    fi
    if want stream; then
      local dir label
      for dir in down up; do
        label="download (curl -o /dev/null)"
        [[ $dir == up ]] && label="upload (curl -T, read to its end by the sink)"
        echo
        echo "Streaming one $STREAM_SIZE body, $label; RSS of the peer's processes every 100 ms (direct: the server's)"
        printf '  %-10s %10s %12s %12s %12s %12s\n' peer MB/s rss_start rss_peak growth "GH÷peer MB/s"
        gh=$(value "$w" "stream_$dir" gatehouse mbps)
        for peer in direct $PEERS; do
          local mbps
          mbps=$(value "$w" "stream_$dir" "$peer" mbps)
          printf '  %-10s %10.1f %10s K %10s K %10s K %12s\n' "$peer" "$mbps" \
            "$(value "$w" "stream_$dir" "$peer" rss_start_kib)" "$(value "$w" "stream_$dir" "$peer" rss_peak_kib)" \
            "$(value "$w" "stream_$dir" "$peer" rss_growth_kib)" "$(ratio "$gh" "$mbps")"
        done
      done
    fi
    if want idle; then
      echo
      echo "Idle keep-alive connections: $IDLE_CONNECTIONS opened, one request each, then idle"
      printf '  %-10s %12s %12s %10s %12s %12s\n' peer rss_before rss_after still_open KiB/conn "GH÷peer"
      gh=$(value "$w" idle gatehouse kib_per_conn)
      for peer in $PEERS; do
        local per
        per=$(value "$w" idle "$peer" kib_per_conn)
        printf '  %-10s %10s K %10s K %10s %12s %12s\n' "$peer" "$(value "$w" idle "$peer" rss_before_kib)" \
          "$(value "$w" idle "$peer" rss_after_kib)" "$(value "$w" idle "$peer" still_open)" "$per" "$(ratio "$gh" "$per")"
      done
    fi
  done
}

# ------------------------------------------------------------------------------- main
install_deps
LOAD_STREAM_MODULE=
if nginx -V 2>&1 | grep -q -- '--with-stream=dynamic'; then
  [[ -e $NGINX_STREAM_MODULE ]] || die "nginx's stream module is missing ($NGINX_STREAM_MODULE; Debian: libnginx-mod-stream)"
  LOAD_STREAM_MODULE="load_module $NGINX_STREAM_MODULE;"
fi
if [[ ${BENCH_SKIP_BUILD:-0} == 1 ]]; then
  log "BENCH_SKIP_BUILD=1: using the existing target/release binaries"
else
  log "building gatehouse and the bench client (cargo build --release --locked)"
  cargo build --release --locked --bin gatehouse --example bench_client
fi

((IDLE_CONNECTIONS <= IDLE_FIT)) ||
  die "ulimit -n is $NOFILE: at most $IDLE_FIT idle connections fit (BENCH_IDLE_CONNECTIONS=$IDLE_CONNECTIONS)"
check_free "$BACKEND_PORT" "$BACKEND_H2_PORT" "${PORT[gatehouse]}" "${PORT[nginx]}" "${H2_PORT[nginx]}" \
  "${PORT[haproxy]}" "${H2_PORT[haproxy]}" "${TLS_PORT[gatehouse]}" "${TLS_PORT[nginx]}" "${TLS_PORT[haproxy]}" \
  "$BACKEND_TLS_PORT" "${PT_PORT[gatehouse]}" "${PT_PORT[nginx]}" "${PT_PORT[haproxy]}" "$SINK_PORT"
make_certificate

# The large bodies are sparse files (no disk or memory used). On tmpfs when there is one:
# reading holes of a sparse file on a disk filesystem can be slower than the proxies
# (about 200 MB/s on the reference machine), in /dev/shm it is not.
if [[ -d /dev/shm && -w /dev/shm ]]; then
  FILES=$(mktemp -d /dev/shm/gatehouse-bench.XXXXXX)
  chmod 755 "$FILES" # nginx workers started by root run as nobody
else
  FILES=$RUN/files
  mkdir -p "$FILES"
fi
truncate -s "$BULK_SIZE" "$FILES/bulk.bin"
truncate -s "$STREAM_SIZE" "$FILES/stream.bin"
BULK_BYTES=$(stat -c %s "$FILES/bulk.bin")
STREAM_BYTES=$(stat -c %s "$FILES/stream.bin")

{
  echo "machine: $(nproc) CPU(s), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
  echo "memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "source: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  echo "versions: $("$ROOT/target/release/gatehouse" --version), $(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -1 | awk '{ print "HAProxy " $3 }'), wrk $(wrk -v 2>&1 | head -1 | awk '{ print $2 }'), $(h2load --version | head -1 | sed 's/.*nghttp2\//h2load /')"
  echo "settings: duration $DURATION, rounds $ROUNDS, workers '$WORKERS_LIST', wrk -t$WRK_THREADS -c$CONNECTIONS, h2load -c$H2_CONNECTIONS -m$H2_STREAMS, handshake clients $HS_CONNECTIONS, bulk $BULK_SIZE, stream $STREAM_SIZE, idle $IDLE_CONNECTIONS, backend nginx with $BACKEND_WORKERS worker(s), ulimit -n $NOFILE (HAProxy maxconn $HAPROXY_MAXCONN)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

log "starting the backend on 127.0.0.1:$BACKEND_PORT (h2c $BACKEND_H2_PORT, TLS $BACKEND_TLS_PORT, upload sink $SINK_PORT)"
render bench/backend.nginx.conf "$RUN/backend.conf"
start_bg "$RUN/backend.log" nginx -p "$RUN" -c "$RUN/backend.conf" -e "$RUN/backend-error.log" -g 'daemon off;'
BACKEND_PID=$STARTED_PID
wait_port "$BACKEND_PORT" || die "backend did not start; see $RUN/backend.log"
check_http "$BACKEND_PORT"
check_h2 "$BACKEND_H2_PORT"
wait_port "$BACKEND_TLS_PORT" || die "backend TLS port did not open"
check_passthrough "$BACKEND_TLS_PORT"
start_bg "$RUN/sink.log" "$ROOT/target/release/examples/bench_client" sink --listen "127.0.0.1:$SINK_PORT"
SINK_PID=$STARTED_PID
wait_port "$SINK_PORT" || die "upload sink did not start; see $RUN/sink.log"
check_sink "$SINK_PORT"

if [[ -n $MAX_LOAD ]]; then
  waited=0
  while awk -v max="$MAX_LOAD" '{ exit !($1 > max) }' /proc/loadavg; do
    if ((waited >= LOAD_WAIT)); then
      log "load still $(cut -d' ' -f1-3 /proc/loadavg) after ${waited}s; measuring anyway"
      break
    fi
    log "load average $(cut -d' ' -f1-3 /proc/loadavg) > $MAX_LOAD; waiting 30 s"
    sleep 30
    waited=$((waited + 30))
  done
fi
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
log "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
started=$SECONDS

# Interleaved rounds of one load: every round runs each peer (and direct) once.
rounds() { # with_direct(0|1) function: runs `function w peer round` for each round and peer
  local with_direct=$1 fn=$2 round peer
  for round in $(seq "$ROUNDS"); do
    for peer in $([[ $with_direct == 1 ]] && echo direct) $PEERS; do "$fn" "$w" "$peer" "$round"; sleep 1; done
  done
}

for w in $WORKERS_LIST; do
  log "== $w worker(s): starting $PEERS"
  for peer in $PEERS; do start_peer "$peer" "$w"; done

  if want http1 || want rate; then
    log "warm-up ($WARMUP per peer)"
    for peer in direct $PEERS; do run_wrk "$w" "$peer" 0 "$WARMUP" discard; done
  fi

  if want http1; then
    log "HTTP/1.1 max throughput"
    for round in $(seq "$ROUNDS"); do
      for peer in direct $PEERS; do run_wrk "$w" "$peer" "$round" "$DURATION"; sleep 1; done
    done
  fi

  if want rate; then
    nginx_max=$(value "$w" http1 nginx rps)
    [[ $nginx_max == nan ]] && nginx_max=$(value "$w" http1 direct rps)
    [[ $nginx_max == nan ]] && die "the fixed-rate row needs the http1 row (BENCH_TESTS)"
    rate=$(awk -v r="$nginx_max" 'BEGIN { printf "%d", r / 2 }')
    log "HTTP/1.1 fixed rate: $rate req/s"
    for round in $(seq "$ROUNDS"); do
      for peer in direct $PEERS; do
        record "$w" rate "$peer" "$round" target_rps "$rate"
        run_rate "$w" "$peer" "$round" "$rate"
        sleep 1
      done
    done
  fi

  if want h2; then
    log "h2c throughput"
    rounds 1 run_h2
  fi

  if want tls1; then
    log "TLS termination: HTTP/1.1 over TLS"
    rounds 0 run_tls_http1
  fi

  if want tls2; then
    log "TLS termination: h2 over TLS"
    rounds 0 run_tls_h2
  fi

  if want pt1; then
    log "TLS passthrough: HTTP/1.1 keep-alive inside TLS, relayed by SNI"
    rounds 1 run_pt_wrk
  fi

  if want ptbulk; then
    log "TLS passthrough: one $BULK_SIZE download"
    rounds 1 run_pt_bulk
  fi

  if want hs; then
    log "new TLS connections per second (full handshakes)"
    rounds 1 run_handshakes
  fi

  if want stream; then
    log "streaming $STREAM_SIZE bodies (download, then upload), RSS sampled every 100 ms"
    for round in $(seq "$ROUNDS"); do
      for dir in down up; do
        for peer in direct $PEERS; do run_stream "$w" "$peer" "$round" "$dir"; sleep 1; done
      done
    done
  fi

  if want idle; then
    log "idle connections memory"
    for peer in $PEERS; do run_idle "$w" "$peer"; done
  fi

  for peer in $PEERS; do stop_pid "${PEER_PID[$peer]}"; done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg); measuring took $((SECONDS - started)) s" >>"$OUT/machine.txt"

summary | tee "$OUT/summary.txt"
log "results: $OUT (summary.txt, results.tsv, raw/)"
