//! SoftHSM2's token directory: where it is, and a stable copy of it taken
//! while keywardd uses the token.

use std::path::{Path, PathBuf};

use super::BackupError;
use crate::config::Config;

/// SoftHSM2's configuration when neither `[hsm] env` nor the environment
/// name one.
const DEFAULT_SOFTHSM_CONF: &str = "/etc/softhsm/softhsm2.conf";

/// Times a token directory is copied before it is declared unstable.
const COPY_ATTEMPTS: usize = 10;

/// The directory of the instance's SoftHSM2 token (the subdirectory of
/// SoftHSM2's `directories.tokendir` whose `token.object` carries the
/// token label), or `None` when the PKCS#11 module is not SoftHSM2.
pub fn find_softhsm_token(cfg: &Config) -> Result<Option<PathBuf>, BackupError> {
    let Some(p) = cfg.hsm.pkcs11() else {
        return Err(BackupError::YubiHsmUnsupported("has no SoftHSM2 token"));
    };
    let is_softhsm = p
        .module
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("softhsm"));
    if !is_softhsm {
        return Ok(None);
    }
    let label = p.token_label.clone();
    let err = |problem: String| BackupError::Token {
        label: label.clone(),
        problem,
    };
    let conf = cfg
        .hsm
        .env
        .get("SOFTHSM2_CONF")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("SOFTHSM2_CONF").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOFTHSM_CONF));
    let text = std::fs::read_to_string(&conf).map_err(|e| {
        err(format!(
            "cannot read SoftHSM2's configuration {}: {e}",
            conf.display()
        ))
    })?;
    let tokendir = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "directories.tokendir").then(|| PathBuf::from(v.trim()))
        })
        .ok_or_else(|| err(format!("{} sets no directories.tokendir", conf.display())))?;
    // SoftHSM2 keeps the label as a length-prefixed (u64 BE), blank-padded
    // 32-byte string in token.object.
    let mut needle = 32u64.to_be_bytes().to_vec();
    let mut padded = label.as_bytes().to_vec();
    if padded.len() > 32 {
        return Err(err("a PKCS#11 token label has at most 32 bytes".into()));
    }
    padded.resize(32, b' ');
    needle.extend_from_slice(&padded);
    let entries = std::fs::read_dir(&tokendir).map_err(|e| {
        err(format!(
            "cannot read the token directory {}: {e}",
            tokendir.display()
        ))
    })?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(bytes) = std::fs::read(dir.join("token.object")) else {
            continue;
        };
        if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
            found.push(dir);
        }
    }
    match found.len() {
        1 => Ok(found.pop()),
        0 => Err(err(format!(
            "no token with this label in {} (from {})",
            tokendir.display(),
            conf.display()
        ))),
        _ => Err(err(format!(
            "more than one token with this label in {}",
            tokendir.display()
        ))),
    }
}

/// The regular files of a token directory, sorted, each with its digest.
fn snapshot(dir: &Path) -> Result<Vec<(String, [u8; 32], u64)>, BackupError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(BackupError::io(format!("cannot read {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(BackupError::io(format!("cannot read {}", dir.display())))?;
        let ty = entry
            .file_type()
            .map_err(BackupError::io(format!("cannot read {}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !ty.is_file() {
            return Err(BackupError::Token {
                label: dir.display().to_string(),
                problem: format!("{name} is not a regular file; refusing to back up the token"),
            });
        }
        let (digest, size) = super::digest_file(&entry.path())?;
        out.push((name, digest, size));
    }
    out.sort();
    Ok(out)
}

/// Copies the token directory `src` into `dst` (created 0700): every
/// regular file (mode 0600), repeated until a copy equals the directory as
/// read again after it, so no object written meanwhile is torn. Returns
/// (name, sha256, size) of each copied file.
pub(super) fn copy_token(
    src: &Path,
    dst: &Path,
) -> Result<Vec<(String, [u8; 32], u64)>, BackupError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dst)
        .map_err(BackupError::io(format!("cannot create {}", dst.display())))?;
    for _ in 0..COPY_ATTEMPTS {
        let before = snapshot(src)?;
        let mut copied = Vec::new();
        for (name, _, _) in &before {
            let to = dst.join(name);
            super::create::copy_new(&src.join(name), &to, 0o600)?;
            let (digest, size) = super::digest_file(&to)?;
            copied.push((name.clone(), digest, size));
        }
        let after = snapshot(src)?;
        if copied == after {
            return Ok(copied);
        }
        for (name, _, _) in &copied {
            let _ = std::fs::remove_file(dst.join(name));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(BackupError::Token {
        label: src.display().to_string(),
        problem: format!(
            "the token changed during each of {COPY_ATTEMPTS} copies; try again when the daemon is less busy"
        ),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A token.object as SoftHSM2 writes the label: length-prefixed, padded.
    fn token_object(label: &str) -> Vec<u8> {
        let mut b = vec![0, 0, 0, 0, 0x80, 0, 0x53, 0x49, 0, 0, 0, 0, 0, 0, 0, 3];
        b.extend_from_slice(&32u64.to_be_bytes());
        let mut l = label.as_bytes().to_vec();
        l.resize(32, b' ');
        b.extend_from_slice(&l);
        b
    }

    fn config(dir: &Path, module: &str, label: &str) -> Config {
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "# c\ndirectories.tokendir = {}\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        let text = format!(
            "[daemon]\nagent_socket = \"a.sock\"\nadmin_socket = \"b.sock\"\nstate_dir = \"s\"\npolicy = \"p.toml\"\n\n\
             [hsm]\nmodule = \"{module}\"\ntoken_label = \"{label}\"\npin_file = \"/x/pin\"\nenv = {{ SOFTHSM2_CONF = \"{}\" }}\n",
            conf.display()
        );
        Config::parse(&dir.join("keyward.toml"), &text).unwrap()
    }

    #[test]
    fn the_token_is_found_by_its_exact_label_and_a_vendor_module_has_none() {
        let dir = tempfile::tempdir().unwrap();
        for (uuid, label) in [
            ("u1", "keyward-dev2"),
            ("u2", "keyward-dev"),
            ("u3", "other"),
        ] {
            let t = dir.path().join("tokens").join(uuid);
            std::fs::create_dir_all(&t).unwrap();
            std::fs::write(t.join("token.object"), token_object(label)).unwrap();
        }
        let cfg = config(dir.path(), "/usr/lib/softhsm/libsofthsm2.so", "keyward-dev");
        assert_eq!(
            find_softhsm_token(&cfg).unwrap(),
            Some(dir.path().join("tokens").join("u2"))
        );
        let cfg = config(dir.path(), "/usr/lib/softhsm/libsofthsm2.so", "absent");
        assert_eq!(
            find_softhsm_token(&cfg).unwrap_err().code(),
            "backup_token_not_found"
        );
        let cfg = config(dir.path(), "/opt/vendor/libvendorp11.so", "keyward-dev");
        assert_eq!(find_softhsm_token(&cfg).unwrap(), None);
    }

    #[test]
    fn a_token_copy_holds_every_file_with_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("token.object"), b"abc").unwrap();
        std::fs::write(src.join("token.lock"), b"").unwrap();
        let copied = copy_token(&src, &dir.path().join("dst")).unwrap();
        let names: Vec<_> = copied.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(names, ["token.lock", "token.object"]);
        assert_eq!(
            std::fs::read(dir.path().join("dst/token.object")).unwrap(),
            b"abc"
        );
        assert_eq!(copied[1].2, 3);
    }
}
