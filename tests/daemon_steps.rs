//! keywardd's start-up steps: open → bind → lockdown → serve.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// The lockdown runs after the sockets are bound and before the daemon is
/// ready, and finds what `harden_process` set at the top of `main` still
/// in force (a seccomp filter applied there will need `no_new_privs`).
#[test]
fn the_lockdown_finds_the_early_hardening_in_force() {
    let mut inst = Instance::start_default();
    assert_eq!(inst.stop().code(), Some(0));
    let log = inst.log();
    assert!(log.contains("keywardd ready"), "{log}");
    assert!(!log.contains("lockdown:"), "{log}");
}
