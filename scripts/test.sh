#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests.
# Installs what the tests need when it is missing, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# External tools the tests drive for real: fail2ban-regex checks the firewall's and the
# rate limiter's log lines; openssl makes the RSA key the RS256 JWT tests sign with;
# schemathesis fuzzes the admin API against its OpenAPI document (installed below).
missing=()
command -v fail2ban-regex >/dev/null 2>&1 || missing+=(fail2ban)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# pebble (and pebble-challtestsrv) is the real ACME server the ACME tests validate against.
command -v pebble >/dev/null 2>&1 || missing+=(pebble)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# schemathesis checks the admin API against docs/openapi.json (its test skips without it).
if ! command -v schemathesis >/dev/null 2>&1; then
  python3 -m pip install --quiet schemathesis || echo "warning: cannot install schemathesis; its test will be skipped" >&2
fi

if command -v cargo-nextest >/dev/null 2>&1; then
  runner=(cargo nextest run --locked --no-fail-fast)
else
  runner=(cargo test --locked --no-fail-fast)
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
"${runner[@]}" "$@"
