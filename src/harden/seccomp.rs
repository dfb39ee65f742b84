//! The seccomp filters of keyward's processes, one per role, applied to
//! every thread (TSYNC) once start-up is done.
//!
//! The filters live as seccompiler JSON in `seccomp/` (each rule with its
//! reason in `comment`; `seccomp/README.md` explains the choices). build.rs
//! compiles them into BPF, embedded here, so a broken filter fails the build.
//! An operator may add rules in `seccomp.d/*.json` beside the configuration
//! file ([`Extension`]): those are merged into the role's list and the
//! result compiled at start; they can only allow more system calls, never
//! change the default action, remove a rule or allow one of [`NEVER`].
//! An HSM backend that needs more than the base list after the lockdown
//! brings its own program in the same format, `seccomp/backends/*.json`
//! ([`BackendProgram`]), merged the same way only when the configuration
//! uses that backend.
//!
//! Each role has two stacked programs: the main allow-list, which kills the
//! process (`SECCOMP_RET_KILL_PROCESS`) on anything else, and a small one
//! answering `clone3` with `ENOSYS`, so glibc falls back to `clone(2)` whose
//! flags the main filter checks (threads only). The kernel runs both; kill
//! takes precedence over an errno, which takes precedence over allow.
//!
//! ```no_run
//! use keyward::harden::seccomp::{Filter, Role};
//! let filter = Filter::load(Role::Daemon, std::path::Path::new("/etc/keyward/keyward.toml"))?;
//! // ... start-up: open the HSM, the ledger, bind the sockets ...
//! filter.apply()?;
//! # Ok::<(), keyward::harden::seccomp::SeccompError>(())
//! ```

use std::path::{Path, PathBuf};

use seccompiler::{BpfProgram, sock_filter};

/// System calls no extension may allow: new programs, other processes'
/// memory, kernel code, namespaces and mounts, credentials, filters, and
/// io_uring (whose operations bypass seccomp).
pub const NEVER: &[&str] = &[
    "execve",
    "execveat",
    "fork",
    "vfork",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "seccomp",
    "personality",
    "keyctl",
    "add_key",
    "request_key",
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "capset",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
];

/// Which process a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `keywardd`, from `seccomp/keywardd.json`.
    Daemon,
    /// `keyward mirror`, from `seccomp/keyward-mirror.json`.
    Mirror,
}

impl Role {
    /// The filter's name in its JSON file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Daemon => "keywardd",
            Role::Mirror => "keyward-mirror",
        }
    }

    fn json(self) -> &'static str {
        match self {
            Role::Daemon => include_str!("../../seccomp/keywardd.json"),
            Role::Mirror => include_str!("../../seccomp/keyward-mirror.json"),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn embedded(self) -> (&'static [u8], &'static [u8]) {
        match self {
            Role::Daemon => (
                include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/keywardd.bpf")),
                include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/keywardd_enosys.bpf")),
            ),
            Role::Mirror => (
                include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/keyward-mirror.bpf")),
                include_bytes!(concat!(
                    env!("OUT_DIR"),
                    "/seccomp/keyward-mirror_enosys.bpf"
                )),
            ),
        }
    }
}

/// Extra rules an HSM backend needs after the lockdown, in the extension
/// format ([`Extension`]), kept in `seccomp/backends/NAME.json` (build.rs
/// checks each merges into `keywardd.json` and compiles) and embedded here.
/// keywardd merges the programs [`BackendProgram::for_hsm`] names for its
/// `[hsm]` section; other configurations never get them. Programs compose:
/// a backend's own calls, plus the socket family its device is reached by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendProgram {
    /// `backend = "yubihsm"` with an `http://` connector: the yubihsm
    /// crate's HTTP client connects with a timeout and sets the socket's
    /// timeouts (with [`BackendProgram::Tcp4`] or [`BackendProgram::Tcp6`]).
    YubiHsmHttp,
    /// TCP stream sockets over IPv4.
    Tcp4,
    /// TCP stream sockets over IPv6.
    Tcp6,
    /// `backend = "yubihsm"` on USB: libusb's usbfs ioctls, its hot-plug
    /// netlink socket and event loop, and `/dev/bus/usb` writable under
    /// Landlock. Derived from libusb's source (seccomp/README.md).
    YubiHsmUsb,
}

impl BackendProgram {
    /// Every backend program.
    pub const ALL: &'static [BackendProgram] = &[
        BackendProgram::YubiHsmHttp,
        BackendProgram::Tcp4,
        BackendProgram::Tcp6,
        BackendProgram::YubiHsmUsb,
    ];

    /// The program's name (its file is `seccomp/backends/NAME.json`).
    pub fn name(self) -> &'static str {
        match self {
            BackendProgram::YubiHsmHttp => "yubihsm-http",
            BackendProgram::Tcp4 => "tcp4",
            BackendProgram::Tcp6 => "tcp6",
            BackendProgram::YubiHsmUsb => "yubihsm-usb",
        }
    }

    /// The program's JSON (extension format).
    pub const fn json(self) -> &'static str {
        match self {
            BackendProgram::YubiHsmHttp => include_str!("../../seccomp/backends/yubihsm-http.json"),
            BackendProgram::Tcp4 => include_str!("../../seccomp/backends/tcp4.json"),
            BackendProgram::Tcp6 => include_str!("../../seccomp/backends/tcp6.json"),
            BackendProgram::YubiHsmUsb => include_str!("../../seccomp/backends/yubihsm-usb.json"),
        }
    }

    /// The programs the HSM backend `hsm` needs beside keywardd's list.
    pub fn for_hsm(hsm: &crate::config::HsmConfig) -> Vec<BackendProgram> {
        use crate::config::YubiHsmConnector;
        match hsm.yubihsm().map(|y| &y.connector) {
            Some(YubiHsmConnector::Http { addr, .. }) => {
                // The configuration admits IP addresses only (no resolver
                // runs after the lockdown).
                let family = if addr.contains(':') {
                    BackendProgram::Tcp6
                } else {
                    BackendProgram::Tcp4
                };
                vec![BackendProgram::YubiHsmHttp, family]
            }
            Some(YubiHsmConnector::Usb { .. }) => vec![BackendProgram::YubiHsmUsb],
            None => Vec::new(),
        }
    }

    /// The program's rules, checked as an operator's extension is.
    pub fn rules(self) -> Result<Vec<ExtensionRule>, SeccompError> {
        Ok(self.extension()?.allow)
    }

    /// The whole program (rules and Landlock write paths), checked as an
    /// operator's extension is.
    pub fn extension(self) -> Result<Extension, SeccompError> {
        let path = PathBuf::from(format!("seccomp/backends/{}.json", self.name()));
        parse_extension(&path, self.json())
    }
}

/// Why a filter could not be loaded or applied.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filters name x86_64 system calls.
    #[error(
        "the seccomp filters are written for x86_64; this build is for {0}, so keyward cannot lock itself down here"
    )]
    UnsupportedArch(&'static str),
    /// An extension file could not be read.
    #[error("cannot read seccomp extension {path}: {source}")]
    ExtensionUnreadable {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An extension file was refused.
    #[error("seccomp extension {path}: {reason}")]
    ExtensionInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The merged filter did not compile.
    #[error("cannot compile the seccomp filter: {0}")]
    Compile(String),
    /// The kernel refused the filter.
    #[error("cannot apply the seccomp filter: {0}")]
    Apply(String),
}

impl SeccompError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            SeccompError::UnsupportedArch(_) => "seccomp_unsupported_arch",
            SeccompError::ExtensionUnreadable { .. } => "seccomp_extension_unreadable",
            SeccompError::ExtensionInvalid { .. } => "seccomp_extension_invalid",
            SeccompError::Compile(_) => "seccomp_compile_failed",
            SeccompError::Apply(_) => "seccomp_apply_failed",
        }
    }
}

/// An operator's extension file, `seccomp.d/NAME.json` beside the
/// configuration file:
///
/// ```json
/// { "comment": "vendor module X talks to its daemon over TCP",
///   "allow": [ { "syscall": "socket", "comment": "AF_INET to 127.0.0.1:1792",
///                "args": [ { "index": 0, "type": "dword", "op": "eq", "val": 2 } ] } ] }
/// ```
///
/// `args` are seccompiler's conditions. Every rule needs its reason.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    /// Why the file exists.
    pub comment: String,
    /// The system calls (with optional argument conditions) it allows.
    #[serde(default)]
    pub allow: Vec<ExtensionRule>,
    /// Absolute paths keywardd may also write beneath (Landlock; see
    /// [`super::landlock`]), e.g. a vendor module's log directory.
    #[serde(default)]
    pub write_paths: Vec<PathBuf>,
}

/// One allow rule of an [`Extension`].
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionRule {
    /// System call name (x86_64).
    pub syscall: String,
    /// seccompiler argument conditions (all must hold); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<serde_json::Value>>,
    /// Why the rule is needed.
    pub comment: String,
}

/// The extension directory for a configuration file: `seccomp.d/` beside it.
pub fn extension_dir(config_file: &Path) -> PathBuf {
    config_file
        .parent()
        .unwrap_or(Path::new("."))
        .join("seccomp.d")
}

/// A role's filter, ready to apply.
#[derive(Debug, Clone)]
pub struct Filter {
    role: Role,
    main: BpfProgram,
    enosys: BpfProgram,
    /// The extension files merged into it.
    pub extensions: Vec<PathBuf>,
    /// The backend programs merged into it.
    pub backend_programs: Vec<BackendProgram>,
    /// The extension files' `write_paths`.
    pub write_paths: Vec<PathBuf>,
}

impl Filter {
    /// The role's filter as compiled at build time.
    pub fn compiled(role: Role) -> Result<Filter, SeccompError> {
        #[cfg(target_arch = "x86_64")]
        {
            let (main, enosys) = role.embedded();
            Ok(Filter {
                role,
                main: decode(main),
                enosys: decode(enosys),
                extensions: Vec::new(),
                backend_programs: Vec::new(),
                write_paths: Vec::new(),
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = role;
            Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
        }
    }

    /// The role's filter with the extension files in `seccomp.d/` beside
    /// `config_file` merged in (the compiled one when there are none).
    pub fn load(role: Role, config_file: &Path) -> Result<Filter, SeccompError> {
        Filter::load_with(role, config_file, &[])
    }

    /// keywardd's filter for `cfg`: the backend programs its `[hsm]`
    /// needs ([`BackendProgram::for_hsm`]) and the extension files merged in.
    pub fn for_daemon(cfg: &crate::config::Config) -> Result<Filter, SeccompError> {
        Filter::load_with(Role::Daemon, &cfg.file, &BackendProgram::for_hsm(&cfg.hsm))
    }

    /// [`Filter::load`] with the backend `programs` merged in first.
    pub fn load_with(
        role: Role,
        config_file: &Path,
        programs: &[BackendProgram],
    ) -> Result<Filter, SeccompError> {
        let dir = extension_dir(config_file);
        let mut files = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|source| SeccompError::ExtensionUnreadable {
                        path: dir.clone(),
                        source,
                    })?;
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "json") {
                        files.push(path);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SeccompError::ExtensionUnreadable { path: dir, source }),
        }
        files.sort();
        let mut rules = Vec::new();
        let mut write_paths = Vec::new();
        for program in programs {
            let ext = program.extension()?;
            rules.extend(ext.allow);
            write_paths.extend(ext.write_paths);
        }
        for path in &files {
            let text = std::fs::read_to_string(path).map_err(|source| {
                SeccompError::ExtensionUnreadable {
                    path: path.clone(),
                    source,
                }
            })?;
            let ext = parse_extension(path, &text)?;
            rules.extend(ext.allow);
            write_paths.extend(ext.write_paths);
        }
        #[cfg(feature = "test-hooks")]
        let drop = std::env::var("KEYWARD_TEST_SECCOMP_DROP").ok();
        #[cfg(not(feature = "test-hooks"))]
        let drop: Option<String> = None;
        let mut filter = if rules.is_empty() && drop.is_none() {
            Filter::compiled(role)?
        } else {
            Filter::merged(role, &rules, drop.as_deref())?
        };
        filter.extensions = files;
        filter.backend_programs = programs.to_vec();
        filter.write_paths = write_paths;
        Ok(filter)
    }

    /// The role's JSON with `rules` added (and, in test builds, `drop`
    /// removed), compiled now.
    fn merged(
        role: Role,
        rules: &[ExtensionRule],
        drop: Option<&str>,
    ) -> Result<Filter, SeccompError> {
        Filter::compiled(role)?; // the architecture check
        let mut doc: serde_json::Value = serde_json::from_str(role.json())
            .map_err(|e| SeccompError::Compile(format!("embedded filter: {e}")))?;
        let list = doc[role.name()]["filter"]
            .as_array_mut()
            .ok_or_else(|| SeccompError::Compile("embedded filter has no rule list".into()))?;
        if let Some(drop) = drop {
            list.retain(|r| r["syscall"] != drop);
        }
        for rule in rules {
            let same = |r: &serde_json::Value| r["syscall"] == rule.syscall.as_str();
            let present: Vec<bool> = list
                .iter()
                .filter(|r| same(r))
                .map(|r| r.get("args").is_some())
                .collect();
            if present.iter().any(|conditional| !conditional) {
                continue; // already allowed unconditionally
            }
            if rule.args.is_none() {
                // seccompiler keeps only the conditions when a system call
                // has both; an unconditional rule replaces them.
                list.retain(|r| !same(r));
            }
            list.push(
                serde_json::to_value(rule).map_err(|e| SeccompError::Compile(e.to_string()))?,
            );
        }
        let text = serde_json::to_vec(&doc).map_err(|e| SeccompError::Compile(e.to_string()))?;
        let mut map = seccompiler::compile_from_json(text.as_slice(), native_arch()?)
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
        let enosys_name = format!("{}_enosys", role.name());
        let (Some(main), Some(enosys)) = (map.remove(role.name()), map.remove(&enosys_name)) else {
            return Err(SeccompError::Compile(
                "embedded filter lacks a program".into(),
            ));
        };
        Ok(Filter {
            role,
            main,
            enosys,
            extensions: Vec::new(),
            backend_programs: Vec::new(),
            write_paths: Vec::new(),
        })
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Applies the filter to every thread of the process (TSYNC); sets
    /// `no_new_privs` first. Irrevocable.
    pub fn apply(&self) -> Result<(), SeccompError> {
        // The ENOSYS program first: once the main one is in force, the
        // `seccomp` call that would add it is itself killed.
        seccompiler::apply_filter_all_threads(&self.enosys)
            .map_err(|e| SeccompError::Apply(e.to_string()))?;
        seccompiler::apply_filter_all_threads(&self.main)
            .map_err(|e| SeccompError::Apply(e.to_string()))
    }
}

#[cfg(target_arch = "x86_64")]
fn native_arch() -> Result<seccompiler::TargetArch, SeccompError> {
    Ok(seccompiler::TargetArch::x86_64)
}

#[cfg(not(target_arch = "x86_64"))]
fn native_arch() -> Result<seccompiler::TargetArch, SeccompError> {
    Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

/// The `sock_filter` words build.rs wrote (8 bytes each, native endian).
#[cfg(target_arch = "x86_64")]
fn decode(bytes: &[u8]) -> BpfProgram {
    bytes
        .chunks_exact(8)
        .map(|w| sock_filter {
            code: u16::from_ne_bytes([w[0], w[1]]),
            jt: w[2],
            jf: w[3],
            k: u32::from_ne_bytes([w[4], w[5], w[6], w[7]]),
        })
        .collect()
}

/// Compiles a filter of just `rule`: the outer error is the architecture,
/// the inner what seccompiler found wrong with the rule.
fn compile_probe(rule: &ExtensionRule) -> Result<Result<(), String>, SeccompError> {
    let arch = native_arch()?;
    let probe = serde_json::json!({ "probe": {
        "mismatch_action": "allow", "match_action": {"errno": 1}, "filter": [rule] } });
    let text = serde_json::to_vec(&probe).map_err(|e| SeccompError::Compile(e.to_string()))?;
    Ok(seccompiler::compile_from_json(text.as_slice(), arch)
        .map(|_| ())
        .map_err(|e| e.to_string()))
}

/// Parses one extension file strictly: known fields only, a reason for the
/// file and each rule, known system calls, none of [`NEVER`], valid
/// argument conditions.
pub fn parse_extension(path: &Path, text: &str) -> Result<Extension, SeccompError> {
    let invalid = |reason: String| SeccompError::ExtensionInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let ext: Extension = serde_json::from_str(text).map_err(|e| {
        invalid(format!(
            "{e} (expected {{\"comment\": \"why\", \"allow\": [{{\"syscall\": \"NAME\", \"comment\": \"why\"}}]}})"
        ))
    })?;
    if ext.comment.trim().is_empty() {
        return Err(invalid(
            "the file's \"comment\" must say why it exists".into(),
        ));
    }
    if let Some(p) = ext.write_paths.iter().find(|p| !p.is_absolute()) {
        return Err(invalid(format!(
            "write path {} is not absolute",
            p.display()
        )));
    }
    for (i, rule) in ext.allow.iter().enumerate() {
        let n = i + 1;
        if NEVER.contains(&rule.syscall.as_str()) {
            return Err(invalid(format!(
                "rule {n} allows {}, which keyward never allows (it would let a compromised signer run programs, read other processes, change credentials or load kernel code)",
                rule.syscall
            )));
        }
        if rule.comment.trim().is_empty() {
            return Err(invalid(format!(
                "rule {n} ({}) has no \"comment\" saying why it is needed",
                rule.syscall
            )));
        }
        // Let seccompiler judge the name, then the conditions, one rule at a
        // time, so the error names the rule.
        let bare = ExtensionRule {
            syscall: rule.syscall.clone(),
            args: None,
            comment: rule.comment.clone(),
        };
        if compile_probe(&bare)?.is_err() {
            return Err(invalid(format!(
                "rule {n}: unknown system call {:?} (names are the x86_64 ones, as in `man 2 syscalls`)",
                rule.syscall
            )));
        }
        if let Err(why) = compile_probe(rule)? {
            return Err(invalid(format!("rule {n} ({}): {why}", rule.syscall)));
        }
    }
    Ok(ext)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ExtensionRule>, SeccompError> {
        parse_extension(Path::new("x.json"), text).map(|e| e.allow)
    }

    #[test]
    fn embedded_filters_decode_and_end_in_a_return() {
        for role in [Role::Daemon, Role::Mirror] {
            let f = Filter::compiled(role).unwrap();
            assert!(f.main.len() > 20, "{role:?}");
            // BPF_RET | BPF_K
            assert_eq!(f.main.last().map(|i| i.code), Some(0x06));
            assert_eq!(f.enosys.last().map(|i| i.code), Some(0x06));
        }
    }

    #[test]
    fn an_extension_adds_rules() {
        let rules = parse(
            r#"{"comment": "vendor", "allow": [
                {"syscall": "uname", "comment": "module reads the host name"},
                {"syscall": "socket", "comment": "TCP", "args": [{"index": 0, "type": "dword", "op": "eq", "val": 2}]}]}"#,
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        let merged = Filter::merged(Role::Daemon, &rules, None).unwrap();
        let base = Filter::compiled(Role::Daemon).unwrap();
        assert!(merged.main.len() > base.main.len());
    }

    #[test]
    fn an_unknown_system_call_is_refused_by_name() {
        let e = parse(r#"{"comment": "c", "allow": [{"syscall": "frobnicate", "comment": "c"}]}"#)
            .unwrap_err();
        assert_eq!(e.code(), "seccomp_extension_invalid");
        assert!(
            e.to_string().contains("unknown system call \"frobnicate\""),
            "{e}"
        );
    }

    #[test]
    fn never_allowed_system_calls_are_refused() {
        for name in ["execve", "ptrace", "io_uring_setup", "setuid"] {
            let text = format!(
                r#"{{"comment": "c", "allow": [{{"syscall": "{name}", "comment": "c"}}]}}"#
            );
            let e = parse(&text).unwrap_err();
            assert!(e.to_string().contains("never allows"), "{name}: {e}");
        }
    }

    #[test]
    fn an_extension_cannot_change_actions_or_omit_reasons() {
        // A default action, a filter of its own, unknown fields: refused.
        for text in [
            r#"{"comment": "c", "allow": [], "mismatch_action": "allow"}"#,
            r#"{"keywardd": {"mismatch_action": "allow", "match_action": "allow", "filter": []}}"#,
            r#"{"comment": "c", "allow": [{"syscall": "uname", "comment": "c", "action": "allow"}]}"#,
            r#"{"comment": "c", "allow": [{"syscall": "uname"}]}"#,
            r#"{"comment": " ", "allow": []}"#,
            r#"{"comment": "c", "allow": [{"syscall": "uname", "comment": ""}]}"#,
            r#"{"comment": "c", "write_paths": ["relative/dir"]}"#,
            r#"{"comment": "c", "allow": [{"syscall": "socket", "comment": "c", "args": [{"index": 9, "type": "dword", "op": "eq", "val": 2}]}]}"#,
            "not json",
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.code(), "seccomp_extension_invalid", "{text}");
        }
    }

    #[test]
    fn an_unconditional_extension_rule_replaces_the_conditions() {
        let rules = vec![ExtensionRule {
            syscall: "socket".into(),
            args: None,
            comment: "any family".into(),
        }];
        // Compiles (seccompiler would otherwise keep only the AF_UNIX
        // condition and silently drop the unconditional rule).
        let merged = Filter::merged(Role::Daemon, &rules, None).unwrap();
        let base = Filter::compiled(Role::Daemon).unwrap();
        assert_ne!(merged.main, base.main);
    }

    #[test]
    fn backend_programs_parse_and_merge_into_the_daemon_filter() {
        let base = Filter::compiled(Role::Daemon).unwrap();
        for program in BackendProgram::ALL {
            let rules = program.rules().unwrap();
            assert!(!rules.is_empty(), "{program:?}");
            let merged = Filter::merged(Role::Daemon, &rules, None).unwrap();
            assert!(merged.main.len() > base.main.len(), "{program:?}");
        }
    }

    fn config_with_hsm(hsm: &str) -> crate::config::Config {
        crate::config::Config::parse(
            Path::new("/etc/keyward/keyward.toml"),
            &format!(
                "[daemon]\nagent_socket = \"a.sock\"\nadmin_socket = \"b.sock\"\n\
                 state_dir = \"state\"\npolicy = \"policy.toml\"\n\n[hsm]\n{hsm}"
            ),
        )
        .unwrap()
    }

    #[test]
    fn an_http_connector_gets_the_yubihsm_http_program_and_its_address_family_only() {
        let yubihsm = |connector: &str| {
            config_with_hsm(&format!(
                "backend = \"yubihsm\"\nconnector = \"{connector}\"\ncredential_file = \"auth\"\n"
            ))
        };
        use BackendProgram::*;
        for (connector, programs) in [
            ("http://127.0.0.1:12345", vec![YubiHsmHttp, Tcp4]),
            ("http://[::1]:12345", vec![YubiHsmHttp, Tcp6]),
            ("usb", vec![YubiHsmUsb]),
            ("usb:0123456789", vec![YubiHsmUsb]),
        ] {
            let cfg = yubihsm(connector);
            assert_eq!(BackendProgram::for_hsm(&cfg.hsm), programs, "{connector}");
            // What keywardd merges compiles.
            let rules: Vec<ExtensionRule> =
                programs.iter().flat_map(|p| p.rules().unwrap()).collect();
            Filter::merged(Role::Daemon, &rules, None).unwrap();
        }
        let pkcs11 = config_with_hsm(
            "module = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"k\"\npin_file = \"pin\"\n",
        );
        assert_eq!(BackendProgram::for_hsm(&pkcs11.hsm), vec![]);
    }

    #[test]
    fn backend_programs_never_open_sockets_beyond_tcp_and_usb_hot_plug() {
        // socket(2) rules of every program: family AF_INET or AF_INET6 and
        // type SOCK_STREAM, both checked.
        for program in BackendProgram::ALL {
            for rule in program.rules().unwrap() {
                if rule.syscall != "socket" {
                    continue;
                }
                let args = serde_json::to_value(&rule.args).unwrap();
                if *program == BackendProgram::YubiHsmUsb {
                    // libusb's hot-plug socket: AF_NETLINK, protocol
                    // NETLINK_KOBJECT_UEVENT, both checked.
                    assert!(
                        args[0]["index"] == 0
                            && args[0]["val"] == 16
                            && args[1]["index"] == 2
                            && args[1]["val"] == 15,
                        "{program:?}: {args}"
                    );
                    continue;
                }
                let family = args[0]["val"].as_u64();
                assert!(
                    args[0]["index"] == 0
                        && args[0]["op"] == "eq"
                        && matches!(family, Some(2 | 10)),
                    "{program:?}: {args}"
                );
                assert!(
                    args[1]["index"] == 1
                        && args[1]["op"]["masked_eq"] == 15
                        && args[1]["val"] == 1,
                    "{program:?}: {args}"
                );
            }
        }
    }

    #[test]
    fn the_readme_gives_every_backend_rule_with_its_reason() {
        let readme = include_str!("../../seccomp/README.md");
        for program in BackendProgram::ALL {
            let heading = format!("## backends/{}.json", program.name());
            assert!(
                readme.contains(&heading),
                "seccomp/README.md lacks {heading}"
            );
            for rule in program.rules().unwrap() {
                let row = format!("| `{}` |", rule.syscall);
                assert!(
                    readme.contains(&row) && readme.contains(&rule.comment),
                    "seccomp/README.md lacks {row} {}",
                    rule.comment
                );
            }
        }
    }

    #[test]
    fn the_readme_gives_every_rule_with_its_reason() {
        let readme = include_str!("../../seccomp/README.md");
        for role in [Role::Daemon, Role::Mirror] {
            let doc: serde_json::Value = serde_json::from_str(role.json()).unwrap();
            for filter in doc.as_object().unwrap().values() {
                for rule in filter["filter"].as_array().unwrap() {
                    let row = format!("| `{}` |", rule["syscall"].as_str().unwrap());
                    let why = rule["comment"].as_str().unwrap();
                    assert!(
                        readme.contains(&row) && readme.contains(why),
                        "seccomp/README.md lacks {row} {why}"
                    );
                }
            }
        }
    }
}
