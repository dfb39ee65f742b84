#!/usr/bin/env bash
# Runs keyward's whole test suite (formatting, lints, unit and integration
# tests against a real SoftHSM2 token). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keyward/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The end-to-end tests again on backend "yubihsm" (MockHsm behind `keyward
# hsm mock-connector`, through keywardd's HTTP connector client).
KEYWARD_TEST_BACKEND=yubihsm-mock cargo test --locked --test signing --test denials --test approvals --test checkpoints --test rotation
# The Debian package, installed and used in a clean Debian 12 root (root
# only; it prints SKIP otherwise).
packaging/test/install-test.sh
