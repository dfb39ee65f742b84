#!/usr/bin/env bash
# Builds the Debian package: release binaries (never with the test features
# test-hooks, mock-hsm or yubihsm-mock, and checked to contain no MockHsm),
# man pages rendered from the binaries' own clap
# definitions, then `cargo deb --no-build`. Prints the .deb's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keyward/target}"
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo deb --version >/dev/null 2>&1; then
	echo "build-deb: installing cargo-deb (cargo install --locked)" >&2
	cargo install --locked --quiet cargo-deb --version 3.8.0 >&2
fi
# The features a release build of the package resolves: none (test-hooks,
# mock-hsm and yubihsm-mock are turned on only by the dev-dependency on
# itself).
features=$(cargo tree --locked -e normal -p keyward --depth 0 -f '{f}' 2>/dev/null)
case "$features" in
*test-hooks* | *mock-hsm* | *yubihsm-mock*)
	echo "build-deb: a release build would enable test features: $features" >&2
	exit 1
	;;
esac
cargo build --release --locked --bin keywardd --bin keyward >&2
release="$CARGO_TARGET_DIR/release"
# And the daemon built: without the fault-injection hook (the mock HSM is
# not reachable from the binaries at all; the feature check above covers it).
if grep -q "fault injection in force" "$release/keywardd"; then
	echo "build-deb: $release/keywardd was built with feature test-hooks" >&2
	exit 1
fi
# And neither binary contains the yubihsm crate's MockHsm (symbols and
# source paths; before `cargo deb --strip` removes the symbol table).
packaging/check-no-mockhsm.sh "$release/keywardd" "$release/keyward" >&2
rm -rf "$release/man"
"$release/keywardd" --write-man-page "$release/man"
"$release/keyward" write-man-page "$release/man"
gzip -9n "$release"/man/*
# Stripped: the binaries are built with line tables (profile.release),
# which the package does not ship (lintian: unstripped-binary-or-object).
cargo deb --no-build --locked --strip --no-dbgsym --output "$CARGO_TARGET_DIR/debian/" >&2
ls -t "$CARGO_TARGET_DIR"/debian/keyward_*.deb | head -n 1
