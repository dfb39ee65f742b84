#!/usr/bin/env bash
# Fails if any ELF binary given contains the yubihsm crate's MockHsm (a
# software YubiHSM 2 that accepts the factory password; issue 17,
# criterion 6). Two independent looks at each ELF file:
#   - its symbol table (`nm`): any symbol of the crate's `mockhsm` module
#     or of a type named MockHsm, mangled or not. A binary without a symbol
#     table (stripped) is refused rather than passed: this check needs one.
#   - its bytes: the source paths of the crate's mockhsm module, which
#     panic locations embed and stripping does not remove.
# With --stripped first, only the second look (for the packaged, stripped
# binaries). Exit 0: none found; 1: found (or not checkable), naming what
# and where.
# packaging/build-deb.sh runs it on the release binaries before packaging;
# tests/release_path.rs runs it on a test build, which must be caught.
set -euo pipefail
stripped=no
if [ "${1:-}" = --stripped ]; then
	stripped=yes
	shift
fi
[ $# -ge 1 ] || {
	echo "usage: $0 [--stripped] BINARY..." >&2
	exit 2
}
status=0
for bin in "$@"; do
	if [ ! -f "$bin" ]; then
		echo "check-no-mockhsm: $bin does not exist" >&2
		status=1
		continue
	fi
	if [ "$stripped" = no ]; then
		symbols=$(nm --defined-only "$bin" 2>/dev/null || true)
		count=$(printf '%s\n' "$symbols" | grep -c . || true)
		if [ "$count" -lt 100 ]; then
			echo "check-no-mockhsm: $bin has no symbol table ($count symbols): cannot check it (check before stripping)" >&2
			status=1
			continue
		fi
		found=$(printf '%s\n' "$symbols" | grep -i -E 'mockhsm' | head -n 5 || true)
		if [ -n "$found" ]; then
			echo "check-no-mockhsm: $bin contains MockHsm symbols, e.g.:" >&2
			printf '%s\n' "$found" | sed 's/^/  /' >&2
			status=1
			continue
		fi
	fi
	if grep -a -q -E 'src/mockhsm(/|\.rs)' "$bin"; then
		echo "check-no-mockhsm: $bin contains the source paths of yubihsm's mockhsm module" >&2
		status=1
		continue
	fi
	echo "check-no-mockhsm: $bin: no MockHsm"
done
exit "$status"
