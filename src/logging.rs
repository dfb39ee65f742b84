//! Log set-up for the binaries: human-readable lines on stderr (journald
//! captures them under systemd), filtered by `KEYWARD_LOG` (default `info`).
//! Secrets are never logged: they are `secrecy` types without `Debug`.

/// Installs the global subscriber once.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYWARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (full disk, file-size limit)
        // must never turn into a panic: the fallback report would go to the
        // same failing stderr and panic the thread that logged.
        .log_internal_errors(false)
        .try_init();
}
