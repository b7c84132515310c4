#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with only the Rust toolchain:
# starts the services tests need (installing them when absent), then format check,
# clippy with warnings denied, every test of the workspace (with the PostgreSQL store's own
# tests and the replica tests), the black-box API tests again on PostgreSQL
# (EPR_TEST_BACKEND=postgres; inherently embedded tests say so and run embedded), and the
# property-based API tests (Schemathesis against a running server, scripts/schemathesis.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/services-up.sh)"
export EPR_TEST_NATS_URL EPR_TEST_NATS_BIN EPR_TEST_DATABASE_URL EPR_TEST_OIDC_PROVIDER
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== cargo test: black-box API tests on PostgreSQL"
# The replica tests run on PostgreSQL whatever the variable says: they ran just above.
EPR_TEST_BACKEND=postgres cargo test -p epr-server --test api --locked -- --skip replicas::
echo "== schemathesis"
scripts/schemathesis.sh
