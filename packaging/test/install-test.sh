#!/usr/bin/env bash
# The proof that the package works: builds the .deb (or takes the one given
# as $1), checks it with lintian, installs it with apt into a clean Debian 12
# root (debootstrap --variant=minbase bookworm, cached as a tarball under
# $HOME/.cache/keyward/debootstrap, unpacked fresh for every run), checks
# files, owners, modes, users, groups and conffiles, then does what the
# README's "Install" section tells an operator: `keyward setup --softhsm`,
# `keyward key create`, a policy naming the key, keywardd started as user
# keyward with the unit's credential, an intent signed by a member of
# keyward-agents and refused to a user outside it, `keyward mirror` as user
# keyward-mirror shipping to its file, `keyward audit verify` by a member of
# keyward-ledger, the daemon stopped, the package purged and the ledger
# still there. Any failure names its step. Needs root; prints SKIP without.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
	echo "SKIP: packaging/test/install-test.sh needs root (debootstrap, chroot, mounts); run the suite as root, as CI does"
	exit 0
fi

started=$(date +%s)
# What this test needs beyond the suite's own dependencies, installed when
# missing (a bare Debian 12 machine has none of them).
tools=()
command -v debootstrap >/dev/null 2>&1 || tools+=(debootstrap)
command -v lintian >/dev/null 2>&1 || tools+=(lintian)
if ((${#tools[@]})); then
	echo "install-test: installing ${tools[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null
fi
STEP="start"
step() {
	STEP=$1
	echo "== install-test: $STEP"
}
fail() {
	echo "install-test: FAILED at step \"$STEP\": $*" >&2
	exit 1
}

cache="$HOME/.cache/keyward/debootstrap"
tarball="$cache/bookworm-minbase.tar.gz"
archives="$cache/apt-archives"
mirror_url="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root=""
pids=()

cleanup() {
	local rc=$?
	for pid in "${pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if [ -n "$root" ]; then
		for m in var/cache/apt/archives run dev proc; do
			if mountpoint -q "$root/$m"; then
				umount "$root/$m" || umount -l "$root/$m" || true
			fi
		done
		# Only remove the root once nothing is mounted in it.
		if ! grep -q " $root/" /proc/mounts; then
			rm -rf "$root"
		else
			echo "install-test: $root still has mounts; left in place" >&2
		fi
	fi
	if [ "$rc" != 0 ]; then
		echo "install-test: FAILED at step \"$STEP\" (exit $rc)" >&2
	fi
	echo "install-test: took $(($(date +%s) - started)) s"
}
trap cleanup EXIT

in_root() {
	chroot "$root" "$@"
}

step "build the package"
if [ $# -ge 1 ]; then
	deb=$(realpath "$1")
else
	deb=$(packaging/build-deb.sh)
fi
[ -f "$deb" ] || fail "no package at $deb"
echo "package: $deb"

step "lintian: no errors, no warnings"
lintian --fail-on error,warning --info "$deb" ||
	fail "lintian reported errors or warnings (above)"

step "clean Debian 12 root"
mkdir -p "$cache" "$archives"
if [ ! -f "$tarball" ]; then
	fresh=$(mktemp -d /var/tmp/keyward-debootstrap.XXXXXX)
	debootstrap --variant=minbase bookworm "$fresh" "$mirror_url" >"$cache/debootstrap.log" 2>&1 ||
		fail "debootstrap failed: see $cache/debootstrap.log"
	chmod 755 "$fresh"
	tar -C "$fresh" -czf "$tarball.tmp" .
	mv "$tarball.tmp" "$tarball"
	rm -rf "$fresh"
fi
root=$(mktemp -d /var/tmp/keyward-install.XXXXXX)
tar -C "$root" -xzf "$tarball"
# mktemp made the root 0700 (and a tarball of a fresh debootstrap carries
# that mode for "."): the system users inside could not even reach /lib.
chmod 755 "$root"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount --bind "$archives" "$root/var/cache/apt/archives"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# No service may start inside the root (there is no systemd in it).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp "$deb" "$root/tmp/"
debname=$(basename "$deb")

step "apt-get install ./$debname (dependencies from $mirror_url)"
in_root apt-get update -qq || fail "apt-get update"
DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -qq "/tmp/$debname" >"$root/tmp/apt.log" 2>&1 ||
	fail "apt-get install: $(tail -20 "$root/tmp/apt.log")"
in_root dpkg-query -W -f='${Status}\n' softhsm2 | grep -q "install ok installed" ||
	fail "softhsm2 (Recommends) was not installed"

step "files, owners and modes"
expect() { # PATH OWNER:GROUP MODE
	local got
	got=$(in_root stat -c '%U:%G %a' "$1" 2>/dev/null) || fail "$1 is missing"
	[ "$got" = "$2 $3" ] || fail "$1 is $got, expected $2 $3"
}
expect /usr/bin/keywardd root:root 755
expect /usr/bin/keyward root:root 755
expect /lib/systemd/system/keywardd.service root:root 644
expect /lib/systemd/system/keyward-mirror.service root:root 644
expect /lib/systemd/system/keyward-drill.service root:root 644
expect /lib/systemd/system/keyward-drill.timer root:root 644
expect /etc/keyward root:keyward 750
expect /etc/keyward/keyward.toml root:keyward 640
expect /etc/keyward/policy.toml root:keyward 640
expect /etc/keyward/credentials root:root 700
expect /var/lib/keyward keyward:keyward-ledger 2750
expect /var/lib/keyward/mirror keyward-mirror:keyward 2750
expect /var/log/keyward keyward-mirror:adm 750
expect /usr/share/man/man8/keywardd.8.gz root:root 644
expect /usr/share/man/man1/keyward.1.gz root:root 644
expect /usr/share/doc/keyward/copyright root:root 644
expect /usr/share/doc/keyward/changelog.Debian.gz root:root 644
# The packaged (stripped) binaries carry no MockHsm either (build-deb.sh
# checked the symbols before stripping; this checks what was installed).
packaging/check-no-mockhsm.sh --stripped "$root/usr/bin/keywardd" "$root/usr/bin/keyward" ||
	fail "the installed binaries contain the yubihsm crate's MockHsm"
[ -L "$root/etc/systemd/system/multi-user.target.wants/keywardd.service" ] ||
	fail "keywardd.service is not enabled"
[ -L "$root/etc/systemd/system/multi-user.target.wants/keyward-mirror.service" ] ||
	fail "keyward-mirror.service is not enabled"
[ -L "$root/etc/systemd/system/timers.target.wants/keyward-drill.timer" ] ||
	fail "keyward-drill.timer is not enabled"

step "users and groups"
for g in keyward keyward-agents keyward-admin keyward-ledger keyward-mirror; do
	in_root getent group "$g" >/dev/null || fail "no group $g"
done
groups_of() { in_root id -nG "$1" | tr ' ' '\n' | sort | tr '\n' ' '; }
[ "$(groups_of keyward)" = "keyward keyward-admin keyward-agents " ] ||
	fail "keyward's groups: $(groups_of keyward)"
[ "$(groups_of keyward-mirror)" = "keyward-ledger keyward-mirror " ] ||
	fail "keyward-mirror's groups: $(groups_of keyward-mirror)"
for u in keyward keyward-mirror; do
	uid=$(in_root id -u "$u")
	[ "$uid" -lt 1000 ] || fail "$u is not a system user (uid $uid)"
	[ "$(in_root getent passwd "$u" | cut -d: -f7)" = /usr/sbin/nologin ] || fail "$u has a login shell"
done

step "conffiles"
conffiles=$(in_root dpkg-query -W -f='${Conffiles}\n' keyward)
for f in /etc/keyward/keyward.toml /etc/keyward/policy.toml; do
	grep -q "^ $f " <<<"$conffiles" || fail "$f is not a conffile: $conffiles"
done

step "keywardd refuses to start before set-up"
# The unit's RuntimeDirectory=, so that what is refused is the missing set-up.
in_root install -d -o keyward -g keyward -m 0751 /run/keyward
if out=$(in_root setpriv --reuid=keyward --regid=keyward --init-groups \
	env CREDENTIALS_DIRECTORY=/nonexistent keywardd --config /etc/keyward/keyward.toml 2>&1); then
	fail "keywardd started without a token or PIN: $out"
fi
echo "refused: $(tail -n 1 <<<"$out")"

step "keyward setup --softhsm"
in_root keyward setup --softhsm || fail "keyward setup --softhsm"
expect /etc/keyward/credentials/hsm.pin root:root 400

step "keyward key create hot (offline, before the first start)"
out=$(in_root keyward key create hot) || fail "keyward key create hot: $out"
echo "$out"

step "policy naming the key for agent trader"
in_root useradd --create-home --groups keyward-agents trader
in_root useradd --create-home outsider
in_root useradd --create-home --groups keyward-ledger auditor
cat >>"$root/etc/keyward/policy.toml" <<'EOF'

[agents.trader]
user = "trader"
keys = ["hot"]

[agents.trader.limits.SOL]
per_tx = "1"
per_day = "10"
EOF
in_root keyward policy check /etc/keyward/policy.toml || fail "keyward policy check"

step "keywardd as user keyward with the unit's credential"
# What systemd does for the unit: RuntimeDirectory=keyward (0751), the PIN
# credential copied to a directory only the service's user can read,
# UMask=0077.
in_root install -d -o keyward -g keyward -m 0751 /run/keyward
in_root install -d -o keyward -g keyward -m 0500 /run/credentials/keywardd.service
in_root install -o keyward -g keyward -m 0400 /etc/keyward/credentials/hsm.pin \
	/run/credentials/keywardd.service/pin
chroot "$root" setpriv --reuid=keyward --regid=keyward --init-groups \
	--inh-caps=-all --bounding-set=-all --no-new-privs \
	env -i PATH=/usr/bin:/bin CREDENTIALS_DIRECTORY=/run/credentials/keywardd.service \
	sh -c 'umask 0077; exec keywardd --config /etc/keyward/keyward.toml' \
	>"$root/tmp/keywardd.log" 2>&1 &
daemon_pid=$!
pids+=("$daemon_pid")
deadline=$(($(date +%s) + 60))
until [ -S "$root/run/keyward/agent.sock" ] && [ -S "$root/run/keyward/admin.sock" ]; do
	kill -0 "$daemon_pid" 2>/dev/null || fail "keywardd exited: $(cat "$root/tmp/keywardd.log")"
	[ "$(date +%s)" -lt "$deadline" ] || fail "keywardd did not bind its sockets: $(cat "$root/tmp/keywardd.log")"
	sleep 0.2
done
expect /run/keyward/agent.sock keyward:keyward-agents 660
expect /run/keyward/admin.sock keyward:keyward-admin 660
expect /var/lib/keyward/ledger.sqlite3 keyward:keyward-ledger 640
keys=$(in_root keyward key list) || fail "keyward key list: $keys"
grep -q hot <<<"$keys" || fail "keyward key list does not show hot: $keys"

# A minimal HTTP/1.1 client over the agent socket (perl-base is in every
# Debian root); prints the answer, or "connect failed: <reason>".
cat >"$root/tmp/http.pl" <<'EOF'
use strict; use IO::Socket::UNIX;
my ($path, $method, $target, $body) = @ARGV; $body //= "";
my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $path) or do { print "connect failed: $!\n"; exit 0 };
my $req = "$method $target HTTP/1.1\r\nHost: keyward\r\nConnection: close\r\n";
$req .= "Content-Type: application/json\r\nContent-Length: " . length($body) . "\r\n" if $method ne "GET";
syswrite($c, $req . "\r\n" . $body);
local $/; my $all = <$c>; print $all // "";
EOF
intent='{"intent_id":"install-test-1","key":"hot","action":{"type":"transfer","asset":"SOL","to":"Vote111111111111111111111111111111111111111","amount":"0.25","recent_blockhash":"SysvarC1ock11111111111111111111111111111111"}}'

step "an intent signed for trader (a member of keyward-agents)"
answer=$(in_root runuser -u trader -- perl /tmp/http.pl /run/keyward/agent.sock POST /v1/intents "$intent")
grep -q '^HTTP/1.1 200' <<<"$answer" && grep -q '"status":"signed"' <<<"$answer" ||
	fail "not signed: $answer"

step "a user outside keyward-agents cannot connect"
answer=$(in_root runuser -u outsider -- perl /tmp/http.pl /run/keyward/agent.sock POST /v1/intents "$intent")
grep -q '^connect failed: Permission denied' <<<"$answer" || fail "outsider was not refused: $answer"

step "keyward mirror as user keyward-mirror ships to its file"
# What systemd does for the unit: keyward.toml handed over as a credential
# (the mirror's user cannot read /etc/keyward), UMask=0027.
in_root install -d -o keyward-mirror -g keyward-mirror -m 0500 /run/credentials/keyward-mirror.service
in_root install -o keyward-mirror -g keyward-mirror -m 0400 /etc/keyward/keyward.toml \
	/run/credentials/keyward-mirror.service/keyward.toml
chroot "$root" setpriv --reuid=keyward-mirror --regid=keyward-mirror --init-groups \
	--inh-caps=-all --bounding-set=-all --no-new-privs \
	env -i PATH=/usr/bin:/bin CREDENTIALS_DIRECTORY=/run/credentials/keyward-mirror.service \
	sh -c 'umask 0027; exec keyward --config "$CREDENTIALS_DIRECTORY/keyward.toml" mirror' \
	>"$root/tmp/mirror.log" 2>&1 &
mirror_pid=$!
pids+=("$mirror_pid")
deadline=$(($(date +%s) + 60))
until grep -q 'signature_created' "$root/var/log/keyward/ledger.jsonl" 2>/dev/null &&
	[ -f "$root/var/lib/keyward/mirror/file.ack" ]; do
	kill -0 "$mirror_pid" 2>/dev/null || fail "keyward mirror exited: $(cat "$root/tmp/mirror.log")"
	[ "$(date +%s)" -lt "$deadline" ] || fail "no entries arrived: $(cat "$root/tmp/mirror.log")"
	sleep 0.2
done
echo "mirrored entries: $(wc -l <"$root/var/log/keyward/ledger.jsonl")"
kill "$mirror_pid"
wait "$mirror_pid" || true

step "keyward audit verify as a member of keyward-ledger (daemon running)"
install -m 0444 "$root/etc/keyward/audit.vkey" "$root/tmp/audit.vkey"
out=$(in_root runuser -u auditor -- keyward audit verify --db /var/lib/keyward/ledger.sqlite3 \
	--vkey-file /tmp/audit.vkey 2>&1) || fail "audit verify: $out"
echo "$out" | tail -n 3

step "stop keywardd"
kill -TERM "$daemon_pid"
wait "$daemon_pid" || fail "keywardd exited with $?: $(tail -5 "$root/tmp/keywardd.log")"

step "apt-get purge keyward keeps the ledger"
out=$(DEBIAN_FRONTEND=noninteractive in_root apt-get purge -y -qq keyward 2>&1) || fail "purge: $out"
echo "$out" | grep -A8 "Kept" || fail "purge did not say what it kept: $out"
[ -f "$root/var/lib/keyward/ledger.sqlite3" ] || fail "the ledger is gone"
for f in /etc/keyward/keyward.toml /etc/keyward/policy.toml /etc/keyward/softhsm2.conf /usr/bin/keywardd; do
	[ ! -e "$root$f" ] || fail "$f is still there after purge"
done
[ -f "$root/etc/keyward/credentials/hsm.pin" ] || fail "the PIN of the kept token is gone"

echo "install-test: PASS"
