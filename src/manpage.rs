//! Manual pages rendered from the binaries' own clap definitions, so the
//! pages the Debian package ships can never disagree with the options the
//! binaries accept.
//!
//! Each binary has a hidden entry point that calls [`write`] with its
//! `clap::Command` (`keywardd --write-man-page DIR`, `keyward
//! write-man-page DIR`); `packaging/build-deb.sh` runs them on the release
//! binaries before `cargo deb --no-build`. Nothing is checked in.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! let cmd = clap::Command::new("keywardd").about("The keyward signing daemon");
//! let pages = keyward::manpage::write(cmd, "8", std::path::Path::new("target/man"))?;
//! assert!(pages[0].ends_with("keywardd.8"));
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

/// Renders the page of `cmd` in manual `section` (`"1"` for user
/// commands, `"8"` for daemons) into `dir/NAME.SECTION`, and one page per
/// visible subcommand (`keyward-audit-verify.1`), and returns their paths.
/// Hidden options and subcommands are left out.
pub fn write(cmd: clap::Command, section: &str, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    write_tree(cmd, section, dir, &mut written)?;
    Ok(written)
}

fn write_tree(
    cmd: clap::Command,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
        write_tree(sub, section, dir, written)?;
    }
    let man = clap_mangen::Man::new(cmd)
        .section(section)
        .source(format!("keyward {}", env!("CARGO_PKG_VERSION")))
        .manual("keyward");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    std::fs::write(&path, page)?;
    written.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_list_visible_options_and_subcommands_and_leave_hidden_ones_out() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = clap::Command::new("demo")
            .about("A demo")
            .arg(clap::Arg::new("config").long("config").help("the config"))
            .arg(clap::Arg::new("secret").long("secret-flag").hide(true))
            .subcommand(clap::Command::new("audit").about("Audit things"))
            .subcommand(clap::Command::new("internal").hide(true));
        let mut pages = write(cmd, "1", dir.path()).unwrap();
        pages.sort();
        assert_eq!(
            pages,
            [dir.path().join("demo-audit.1"), dir.path().join("demo.1")]
        );
        let text = std::fs::read_to_string(dir.path().join("demo.1")).unwrap();
        assert!(text.contains(".TH demo 1"), "{text}");
        assert!(text.contains("config") && text.contains("audit"), "{text}");
        assert!(
            !text.contains("secret") && !text.contains("internal"),
            "{text}"
        );
    }
}
