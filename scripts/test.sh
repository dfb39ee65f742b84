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
# The Debian package, installed and used in a clean Debian 12 root (root
# only; it prints SKIP otherwise).
packaging/test/install-test.sh
