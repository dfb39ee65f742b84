//! Compiles the seccomp filters in `seccomp/` into BPF with seccompiler, so
//! a broken filter fails the build rather than the daemon's start. The
//! programs land in `$OUT_DIR/seccomp/<filter>.bpf` (the `sock_filter`
//! words, native endian) and are embedded by `src/harden/seccomp.rs` with
//! `include_bytes!`, beside the JSON they came from (for the operator's
//! extension files, merged and compiled at start).
//!
//! The HSM backends' programs in `seccomp/backends/*.json` (extension
//! format, merged into keywardd's list at start when the backend is in use)
//! are checked here too: each rule with its reason, and keywardd's list
//! with the program added compiles.
// A build script reports failure by panicking, with the reason.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each role's file and the filters it must define.
const ROLES: &[(&str, &[&str])] = &[
    ("keywardd", &["keywardd", "keywardd_enosys"]),
    (
        "keyward-mirror",
        &["keyward-mirror", "keyward-mirror_enosys"],
    ),
];

fn main() {
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("seccomp");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/seccomp");
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => Some(seccompiler::TargetArch::x86_64),
        // The filters name x86_64 system calls (aarch64 has no `open`,
        // `poll`, `unlink`, `epoll_wait`...). Elsewhere keywardd refuses to
        // start with a filter (src/harden/seccomp.rs); the files are still
        // checked here.
        _ => None,
    };
    for (role, filters) in ROLES {
        let path = Path::new("seccomp").join(format!("{role}.json"));
        println!("cargo:rerun-if-changed={}", path.display());
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        check_structure(&path, &text, filters);
        let Some(arch) = arch else { continue };
        let compiled = seccompiler::compile_from_json(text.as_bytes(), arch)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for name in *filters {
            let program = &compiled[*name];
            let mut bytes = Vec::with_capacity(program.len() * 8);
            for ins in program {
                bytes.extend_from_slice(&ins.code.to_ne_bytes());
                bytes.push(ins.jt);
                bytes.push(ins.jf);
                bytes.extend_from_slice(&ins.k.to_ne_bytes());
            }
            std::fs::write(out.join(format!("{name}.bpf")), bytes).expect("write the BPF program");
        }
    }
    check_backend_programs(arch);
}

/// Each `seccomp/backends/*.json` gives its reason and every rule's, and
/// merged into `keywardd.json` (rules appended, as keywardd merges them)
/// still passes [`check_structure`] and compiles.
fn check_backend_programs(arch: Option<seccompiler::TargetArch>) {
    let dir = Path::new("seccomp").join("backends");
    println!("cargo:rerun-if-changed={}", dir.display());
    let base_path = Path::new("seccomp").join("keywardd.json");
    let base = std::fs::read_to_string(&base_path).expect("read seccomp/keywardd.json");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read seccomp/backends")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for path in files {
        println!("cargo:rerun-if-changed={}", path.display());
        let fail = |msg: String| -> ! { panic!("{}: {msg}", path.display()) };
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| fail(e.to_string()));
        let program: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| fail(format!("not JSON: {e}")));
        if program["comment"]
            .as_str()
            .is_none_or(|c| c.trim().is_empty())
        {
            fail("no \"comment\" giving the program's reason".into());
        }
        let rules = program["allow"]
            .as_array()
            .unwrap_or_else(|| fail("no \"allow\" list".into()));
        let mut doc: serde_json::Value = serde_json::from_str(&base).expect("keywardd.json");
        let list = doc["keywardd"]["filter"]
            .as_array_mut()
            .expect("keywardd.json has a rule list");
        list.extend(rules.iter().cloned());
        let merged = serde_json::to_string(&doc).expect("serialize");
        check_structure(&path, &merged, &["keywardd", "keywardd_enosys"]);
        if let Some(arch) = arch {
            seccompiler::compile_from_json(merged.as_bytes(), arch)
                .unwrap_or_else(|e| fail(format!("merged into keywardd.json: {e}")));
        }
    }
}

/// What seccompiler does not check: exactly the expected filters, every rule
/// with its reason (`comment`), no syscall both unconditional and
/// conditional (seccompiler would silently keep only the conditions), and
/// every syscall a `_enosys` filter answers is allowed by the main filter
/// (otherwise the main filter's kill wins and the errno rule is dead).
fn check_structure(path: &Path, text: &str, filters: &[&str]) {
    let fail = |msg: String| -> ! { panic!("{}: {msg}", path.display()) };
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| fail(format!("not JSON: {e}")));
    let map = v
        .as_object()
        .unwrap_or_else(|| fail("not an object".into()));
    let names: BTreeSet<&str> = map.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = filters.iter().copied().collect();
    if names != expected {
        fail(format!("defines filters {names:?}, expected {expected:?}"));
    }
    let mut allowed: BTreeMap<String, bool> = BTreeMap::new();
    for name in filters {
        let rules = map[*name]["filter"]
            .as_array()
            .unwrap_or_else(|| fail(format!("{name}: no filter list")));
        let mut kinds: BTreeMap<String, (bool, bool)> = BTreeMap::new();
        for rule in rules {
            let syscall = rule["syscall"]
                .as_str()
                .unwrap_or_else(|| fail(format!("{name}: a rule without a syscall")));
            if rule["comment"].as_str().is_none_or(|c| c.trim().is_empty()) {
                fail(format!(
                    "{name}: rule for {syscall} has no comment giving its reason"
                ));
            }
            let k = kinds.entry(syscall.to_owned()).or_default();
            if rule.get("args").is_some() {
                k.1 = true;
            } else {
                k.0 = true;
            }
        }
        for (syscall, (plain, conditional)) in &kinds {
            if *plain && *conditional {
                fail(format!(
                    "{name}: {syscall} is both unconditional and conditional"
                ));
            }
        }
        if name.ends_with("_enosys") {
            for syscall in kinds.keys() {
                if !allowed.contains_key(syscall) {
                    fail(format!(
                        "{name}: {syscall} is answered ENOSYS but the main filter kills it first"
                    ));
                }
            }
        } else {
            allowed.extend(kinds.into_iter().map(|(s, (p, _))| (s, p)));
        }
    }
}
