#!/usr/bin/env bash
# Mutation testing of keyward's security-critical code with cargo-mutants:
# every mutant (a small bug injected into the code) must make a test fail.
# Not part of scripts/test.sh: each mutant rebuilds and runs the tests that
# cover its file, which takes hours on 2 cores for all groups.
#
#   scripts/mutants.sh                 every group
#   scripts/mutants.sh request submit  only these groups
#   scripts/mutants.sh --list          the groups and their files
#   MUTANTS_ARGS=--iterate scripts/mutants.sh verify
#                                      only what the last run of a group did
#                                      not catch (after adding tests)
#
# Results: mutants.out/<group>/mutants.out/ (caught.txt, missed.txt, timeout.txt,
# unviable.txt). Record each run's result in TESTING.md: every missed mutant
# is killed by a new test or explained there as equivalent or harmless.
set -euo pipefail
cd "$(dirname "$0")/.."

# group | files (space-separated) | test targets that cover them
groups=(
  "request|src/approval/request.rs|--lib --test approvals --test approval_hardening"
  "approval|src/approval/mod.rs src/approval/store.rs|--lib --test approvals --test approval_hardening"
  "submit|src/service/submit.rs src/service/decision.rs|--test release_path --test signing --test concurrency --test ledger_failure --test denials --test policy_rules --test approvals --test approval_hardening --test dry_runs --test decision_path --test hsm_executor"
  "evaluate|src/policy/evaluate.rs|--lib --test policy_rules --test policy_properties --test denials --test dry_runs"
  "engine|src/policy/engine.rs|--lib --test policy_rules --test policy_properties --test denials --test dry_runs --test approval_hardening"
  "verify|src/ledger/verify.rs src/ledger/history.rs|--lib --test audit_tamper --test audit_anchor --test checkpoints"
  "writer|src/ledger/writer.rs|--lib --test ledger_failure --test concurrency"
  "effects|src/solana/effects.rs|--lib --test solana_crosscheck --test spl --test denials --test signing"
  "service|src/service/approvals.rs src/service/signer.rs src/service/operations.rs src/service/shared.rs src/mirror/gate.rs|--lib --test approvals --test approval_hardening --test concurrency --test release_path --test decision_path --test operations --test mirror"
)

if [ "${1:-}" = "--list" ]; then
  for g in "${groups[@]}"; do
    IFS='|' read -r name files _ <<<"$g"
    printf '%-9s %s\n' "$name" "$files"
  done
  exit 0
fi

scripts/install-deps.sh
if ! command -v cargo-mutants >/dev/null 2>&1; then
  cargo install --locked cargo-mutants@27.1.0
fi

# No debug info: each mutant relinks every test binary, and linking with
# full debug info is most of a rebuild.
export CARGO_PROFILE_DEV_DEBUG=0
wanted=("$@")
status=0
for g in "${groups[@]}"; do
  IFS='|' read -r name files tests <<<"$g"
  if ((${#wanted[@]})) && [[ ! " ${wanted[*]} " =~ " ${name} " ]]; then
    continue
  fi
  args=()
  for f in $files; do args+=(--file "$f"); done
  for t in $tests; do args+=("--cargo-test-arg=$t"); done
  echo "==> mutants: $name ($files)" >&2
  # One job: the integration tests start daemons and HSM tokens of their own
  # and compete for the same 2 cores.
  mkdir -p "mutants.out/$name"
  # shellcheck disable=SC2086 # MUTANTS_ARGS is a list of options
  cargo mutants --jobs 1 --timeout 600 --output "mutants.out/$name" "${args[@]}" ${MUTANTS_ARGS:-} || status=$?
done
exit "$status"
