#!/usr/bin/env bash
# Builds the Debian package: release binaries (never with the test features
# test-hooks or mock-hsm), man pages rendered from the binaries' own clap
# definitions, then `cargo deb --no-build`. Prints the .deb's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keyward/target}"
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin keywardd --bin keyward >&2
release="$CARGO_TARGET_DIR/release"
# The shipped binaries must not carry the test hooks.
for bin in keywardd keyward; do
	if grep -q "TEST BUILD: fault injection" "$release/$bin"; then
		echo "build-deb: $release/$bin was built with feature test-hooks" >&2
		exit 1
	fi
done
rm -rf "$release/man"
"$release/keywardd" --write-man-page "$release/man"
"$release/keyward" write-man-page "$release/man"
gzip -9n "$release"/man/*
cargo deb --no-build --locked --output "$CARGO_TARGET_DIR/debian/" >&2
ls -t "$CARGO_TARGET_DIR"/debian/keyward_*.deb | head -n 1
