#!/usr/bin/env bash
# keyward demo: creates a development instance on a SoftHSM2 token in
# ./demo-instance, starts keywardd, lets an agent sign a SOL transfer, shows a
# denial, enrolls two approvers and gets a large transfer approved by both,
# and verifies the audit chain. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keyward/target}"
echo "==> building (release)"
cargo build --release --locked -q --bin keyward --bin keywardd
cargo build --release --locked -q -p keyward-client --example agent
bin="$CARGO_TARGET_DIR/release"
dir="$PWD/demo-instance"

if [ -e "$dir" ]; then
  if [ -f "$dir/.keyward-demo" ]; then
    rm -rf "$dir"
  else
    echo "$dir exists and was not made by this demo; move it away first" >&2
    exit 2
  fi
fi

echo "==> keyward init --dev $dir"
"$bin/keyward" init --dev "$dir"
touch "$dir/.keyward-demo"

echo "==> starting keywardd"
"$bin/keywardd" --config "$dir/keyward.toml" 2>"$dir/keywardd.log" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  [ -S "$dir/agent.sock" ] && break
  sleep 0.1
done
[ -S "$dir/agent.sock" ] || { cat "$dir/keywardd.log" >&2; exit 1; }

recipient="9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM"
blockhash="EkSnNWid2cvwEVnVx9aBqawnmiCNiDgp3gUdkDPTKN1N"

echo
echo "==> an agent asks for 0.25 SOL to $recipient (within the 1 SOL per-transaction limit)"
"$bin/examples/agent" --socket "$dir/agent.sock" --intent-id demo-1 --to "$recipient" --amount 0.25 --blockhash "$blockhash"

echo
echo "==> the agent asks for 5 SOL (over the limit): denied"
if "$bin/examples/agent" --socket "$dir/agent.sock" --intent-id demo-2 --to "$recipient" --amount 5 --blockhash "$blockhash"; then
  echo "unexpected: the over-limit transfer was signed" >&2
  exit 1
fi

echo
echo "==> the operator requires 2 approvals (alice, bob) above 0.3 SOL and reloads the policy"
"$bin/keyward" --config "$dir/keyward.toml" approver add alice --out "$dir/alice.key"
"$bin/keyward" --config "$dir/keyward.toml" approver add bob --out "$dir/bob.key"
cat >>"$dir/policy.toml" <<'POLICY'
approval_above = "0.3"
approvers = { required = 2, of = ["alice", "bob"] }
POLICY
"$bin/keyward" --config "$dir/keyward.toml" policy reload

echo
echo "==> the agent asks for 0.5 SOL: it waits for approvals"
"$bin/examples/agent" --socket "$dir/agent.sock" --intent-id demo-3 --to "$recipient" --amount 0.5 --blockhash "$blockhash" --request-out "$dir/demo-3.request.json"
for who in alice bob; do
  echo
  echo "==> $who checks what the transaction really does and approves it"
  token=$("$bin/keyward" approve --request "$dir/demo-3.request.json" --approver "$who" --key-file "$dir/$who.key" --yes)
  "$bin/examples/agent" --socket "$dir/agent.sock" --intent-id demo-3 --approval "$token"
done

echo
echo "==> keyward audit trail demo-1"
"$bin/keyward" --config "$dir/keyward.toml" audit trail demo-1
echo
echo "==> keyward audit verify"
"$bin/keyward" --config "$dir/keyward.toml" audit verify
echo
echo "Done. The instance stays in $dir; start it again with:"
echo "  $bin/keywardd --config $dir/keyward.toml"
