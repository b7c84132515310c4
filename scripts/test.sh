#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with only the Rust toolchain:
# starts the services tests need (installing them when absent), then format check,
# clippy with warnings denied, and every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/services-up.sh)"
export EPR_TEST_NATS_URL EPR_TEST_NATS_BIN EPR_TEST_DATABASE_URL
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
