//! Tools that sit above the daemon: the benchmark ([`bench`]) and the
//! development instance ([`dev`]) behind `keyward bench` and `keyward init
//! --dev`, the HSM set-up ([`setup`], [`yubihsm_setup`]) and the YubiHSM
//! self-test ([`yubihsm_selftest`]).
//!
//! They drive the core (config, HSM, ledger, service, a keywardd child
//! process) from outside; nothing in the core imports them.

pub mod bench;
pub mod dev;
pub mod setup;
pub mod yubihsm_selftest;
pub mod yubihsm_setup;

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every `.rs` file under `dir`, recursively.
    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// A path segment `tools::` (as in `crate::tools::dev`), not part of a
    /// longer name.
    fn names_tools(text: &str) -> bool {
        text.match_indices("tools::").any(|(i, _)| {
            !text[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    }

    #[test]
    fn the_core_never_imports_the_tools() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let offenders: Vec<_> = files
            .iter()
            .filter(|f| !f.starts_with(src.join("tools")) && !f.starts_with(src.join("bin")))
            .filter(|f| names_tools(&std::fs::read_to_string(f).expect("a source file")))
            .collect();
        assert!(files.len() > 20, "found the sources: {files:?}");
        assert!(
            offenders.is_empty(),
            "the core imports the tools, which sit above it: {offenders:?}"
        );
    }

    #[test]
    fn a_tools_path_is_told_from_a_longer_name() {
        assert!(names_tools("use crate::tools::dev;"));
        assert!(names_tools("tools::bench::run()"));
        assert!(!names_tools("my_tools::x"));
    }
}
