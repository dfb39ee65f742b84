//! `keyward drill dr`: the disaster-recovery drill.
//!
//! Steps, in order (the first that fails ends the drill and names itself):
//!
//! 1. `backup`: the backup to recover from: the one given, the newest in a
//!    backup directory, or a fresh one taken through the running keywardd.
//! 2. `verify`: its manifest, signature, digests, ledger chain and
//!    checkpoints (a changed file fails here, naming the file).
//! 3. `restore`: a fresh instance in the scratch directory, without the
//!    mirror; its policy is checked, then replaced by one drill agent (the
//!    drill's uid) allowed every key production's policy names. Only a
//!    backup holding its token (SoftHSM2): a vendor HSM's backup would
//!    restore onto production's own HSM.
//! 4. `ledger`: the restored ledger verifies against the trusted audit key
//!    and its head is the manifest's; with a file mirror configured, every
//!    mirrored entry up to that head is the restored entry.
//! 5. `counters`: the restored spend counters equal those recomputed from
//!    the ledger.
//! 6. `start`: keywardd on the restored instance.
//! 7. `sign`: a tiny SOL transfer with each key, each signature verified
//!    under production's public key for that name (the first marks the
//!    recovery time).
//! 8. `stop`: the scratch keywardd stops cleanly.

use std::path::{Path, PathBuf};

use super::checks::{counters_match_ledger, mirror_matches};
use super::scratch::{ScratchDaemon, sign_probe};
use super::{Progress, Report, Run};
use crate::config::Config;
use crate::ledger::TrustedKey;
use crate::ops::backup;

/// Name of the agent the restored instance's policy holds.
pub const DRILL_AGENT: &str = "drill";

/// Where the backup comes from.
#[derive(Debug, Clone)]
pub enum BackupSource {
    /// This backup directory.
    Given(PathBuf),
    /// The newest backup (by its manifest's time) in this directory.
    NewestIn(PathBuf),
    /// A fresh backup of production, taken through its keywardd into the
    /// scratch directory.
    Fresh,
}

/// What the DR drill needs.
pub struct DrOptions<'a> {
    /// Production's configuration.
    pub config: &'a Config,
    /// Where the backup comes from.
    pub backup: BackupSource,
    /// The audit key to trust (production's pinned key).
    pub trusted: &'a TrustedKey,
    /// The keywardd binary to start on the restored instance.
    pub keywardd: &'a Path,
    /// The scratch directory (absolute, new or empty).
    pub scratch: &'a Path,
    /// The PIN file the restored instance reads (default: the backed-up
    /// configuration's).
    pub pin_file: Option<PathBuf>,
    /// Production's keys: (name, public key) of every registered version.
    pub originals: Vec<(String, String)>,
    /// The drill's uid (the restored policy's one agent).
    pub uid: u32,
}

/// The newest backup in `dir`: the subdirectory with a `manifest.json`
/// most recently modified (half-written `*.tmp-*` ones left out).
pub fn newest_backup(dir: &Path) -> Result<PathBuf, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in entries.flatten() {
        // A backup still being written (OUT.tmp-XXXXXXXX) is not one yet.
        if e.file_name().to_string_lossy().contains(".tmp-") {
            continue;
        }
        let manifest = e.path().join(backup::MANIFEST);
        let Ok(meta) = std::fs::metadata(&manifest) else {
            continue;
        };
        let Ok(t) = meta.modified() else { continue };
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, e.path()));
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        format!(
            "no backup (a directory with {}) in {}",
            backup::MANIFEST,
            dir.display()
        )
    })
}

/// The drill agent's policy: uid `uid`, every key in `keys`, small SOL
/// limits, no approvals.
pub fn drill_policy(uid: u32, keys: &[String]) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    format!(
        "# keyward DR drill: production's agents are replaced by the drill's uid.\n\
         [agents.{DRILL_AGENT}]\n\
         uid = {uid}\n\
         keys = [{}]\n\n\
         [agents.{DRILL_AGENT}.limits.SOL]\n\
         per_tx = \"0.001\"\n\
         per_day = \"1\"\n",
        keys.join(", ")
    )
}

/// Writes the drill policy as a new file (0600), synced.
fn write_policy(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Runs the DR drill; `sign` asks production's keywardd to sign a fresh
/// backup's manifest (used only with [`BackupSource::Fresh`]).
pub fn run(
    opts: &DrOptions<'_>,
    sign: impl FnOnce(
        &keyward_client::wire::BackupSignRequest,
    ) -> Result<keyward_client::wire::BackupSigned, String>,
    progress: &dyn Progress,
) -> Report {
    let mut run = Run::new("dr", false, progress);
    let backup_dir = run.step("backup", |facts| {
        let dir = match &opts.backup {
            BackupSource::Given(p) => p.clone(),
            BackupSource::NewestIn(d) => newest_backup(d)?,
            BackupSource::Fresh => {
                let out = opts.scratch.join("backup");
                let created = backup::create(
                    opts.config,
                    &backup::CreateOptions {
                        out: out.clone(),
                        admin_credential: None,
                        wrap_key: backup::DEFAULT_WRAP_KEY,
                    },
                    sign,
                )
                .map_err(|e| format!("{e} ({})", e.code()))?;
                facts.push(format!(
                    "fresh backup recorded as backup_created entry {}",
                    created.backup_seq
                ));
                out
            }
        };
        facts.push(format!("backup: {}", dir.display()));
        Ok((dir.clone(), dir.display().to_string()))
    });
    let verified = backup_dir.as_ref().and_then(|dir| {
        run.step("verify", |facts| {
            let v = backup::verify(dir, opts.trusted).map_err(|e| format!("{e} ({})", e.code()))?;
            let m = &v.manifest;
            facts.push(format!(
                "manifest head: entry {} ({})",
                m.ledger.seq, m.ledger.hash
            ));
            let note = format!("{} files, ledger head {}", m.files.len(), m.ledger.seq);
            Ok((v, note))
        })
    });
    let instance = opts.scratch.join("instance");
    let restored = backup_dir.as_ref().and_then(|dir| {
        run.step("restore", |facts| {
            // A backup without the token (a vendor HSM) restores to an
            // instance on production's own HSM: the drill would sign with
            // production's keys. Refused.
            if let Some(v) = &verified
                && v.manifest.instance.key_material == backup::KeyMaterial::YubihsmWrapped
            {
                // Its keys are imported into a replacement device, which
                // a scratch drill does not have.
                return Err(
                    "the backup holds YubiHSM 2 objects wrapped under the wrap key: they restore only onto a spare YubiHSM 2 \
                     provisioned with that wrap key, so the DR drill does not restore them; rehearse with \
                     `keyward backup restore IN --to DIR --connector SPARE --admin-credential FILE`"
                        .into(),
                );
            }
            if let Some(v) = &verified
                && v.manifest.instance.key_material != backup::KeyMaterial::Softhsm2Token
            {
                return Err(format!(
                    "the backup holds no key material (token {:?} of a vendor HSM): a restored instance would use production's own HSM, \
                     so the DR drill restores only SoftHSM2 backups; rehearse the vendor HSM's recovery with its own tools",
                    v.manifest.instance.token_label
                ));
            }
            let r = backup::restore(
                dir,
                opts.trusted,
                &backup::RestoreOptions {
                    to: instance.clone(),
                    pin_file: opts.pin_file.clone(),
                    keep_mirror: false,
                    yubihsm: None,
                },
            )
            .map_err(|e| format!("{e} ({})", e.code()))?;
            let cfg = Config::load(&r.config).map_err(|e| e.to_string())?;
            let policy = crate::policy::Policy::load(&cfg.daemon.policy)
                .map_err(|e| format!("the backed-up policy does not load: {e}"))?;
            let keys: Vec<String> = policy
                .all_keys()
                .into_iter()
                .map(|k| k.as_str().to_owned())
                .collect();
            if keys.is_empty() {
                return Err("the backed-up policy names no key".into());
            }
            let kept = cfg.daemon.policy.with_extension("production.toml");
            std::fs::rename(&cfg.daemon.policy, &kept)
                .map_err(|e| format!("cannot keep {}: {e}", kept.display()))?;
            write_policy(&cfg.daemon.policy, &drill_policy(opts.uid, &keys))?;
            facts.push(format!(
                "keys named by the backed-up policy: {}",
                keys.join(", ")
            ));
            let note = format!("into {}", instance.display());
            Ok(((cfg, keys), note))
        })
    });
    if let (Some(v), Some((cfg, _))) = (&verified, &restored) {
        run.step("ledger", |facts| {
            let db = cfg.ledger_path();
            let report = crate::ledger::verify_history(&db, opts.trusted, &Default::default())
                .map_err(|e| format!("the restored ledger {}: {e}", db.display()))?;
            let head = manifest_head(v);
            if report.chain.head_seq != head.0 || hex::encode(report.chain.head_hash) != head.1 {
                return Err(format!(
                    "the restored head is entry {}, the manifest says {}",
                    report.chain.head_seq, head.0
                ));
            }
            let mut note = format!(
                "{} entries, {} checkpoints verified",
                report.chain.entries, report.checkpoints
            );
            if let Some(file) = opts.config.mirror.as_ref().and_then(|m| m.file.as_ref()) {
                let conn = crate::ledger::open_read_only(&db).map_err(|e| e.to_string())?;
                let n = mirror_matches(&conn, file, head.0)?;
                facts.push(format!(
                    "mirror {}: {n} entries equal the restored ones",
                    file.display()
                ));
                note.push_str(&format!("; {n} mirrored entries match"));
            }
            Ok(((), note))
        });
        run.step("counters", |_| {
            let conn =
                crate::ledger::open_read_only(&cfg.ledger_path()).map_err(|e| e.to_string())?;
            let c = counters_match_ledger(&conn)?;
            Ok((
                (),
                format!(
                    "{} spent, {} reserved, {} running totals match the ledger",
                    c.spent, c.reserved, c.totals
                ),
            ))
        });
    }
    let daemon = restored.as_ref().and_then(|(cfg, _)| {
        run.step("start", |_| {
            let log = opts.scratch.join("keywardd.log");
            let d = ScratchDaemon::start(opts.keywardd, &cfg.file, &log)?;
            Ok((
                d,
                format!("agent socket {}", cfg.daemon.agent_socket.display()),
            ))
        })
    });
    if let (Some(mut daemon), Some((_, keys))) = (daemon, &restored) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let mut first = true;
        for key in keys {
            let mut recovered = false;
            run.step(&format!("sign {key}"), |facts| {
                let rt = rt.as_ref().map_err(|e| format!("no runtime: {e}"))?;
                let originals: Vec<&String> = opts
                    .originals
                    .iter()
                    .filter(|(n, _)| n == key)
                    .map(|(_, pk)| pk)
                    .collect();
                if originals.is_empty() {
                    return Err(format!("production has no key {key}"));
                }
                let id = format!("drill-{}", hex::encode(rand::random::<[u8; 8]>()));
                let mut last = String::new();
                for pk in &originals {
                    match sign_probe(rt, &daemon.agent_socket, &id, key, pk) {
                        Ok(sig) => {
                            recovered = true;
                            facts.push(format!("key {key} signs as {pk} (signature {sig})"));
                            return Ok(((), format!("public key {pk}")));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            });
            if recovered && first {
                first = false;
                run.mark_recovered();
            }
        }
        run.step("stop", |_| {
            if daemon.stop() {
                Ok(((), "stopped cleanly".into()))
            } else {
                Err(format!(
                    "the scratch keywardd did not stop cleanly: {}",
                    super::scratch::log_tail(&daemon.log)
                ))
            }
        });
    }
    run.finish()
}

/// The ledger head a verified backup's manifest names: (seq, hash hex).
fn manifest_head(v: &backup::Verified) -> (u64, String) {
    (
        v.manifest.ledger.seq,
        v.manifest.ledger.hash.to_ascii_lowercase(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_newest_backup_is_the_latest_manifest_and_never_a_half_written_one() {
        let dir = std::env::temp_dir().join(format!(
            "kw-newest-{}",
            hex::encode(rand::random::<[u8; 6]>())
        ));
        assert!(newest_backup(&dir).is_err(), "a missing directory");
        for name in ["b1", "b2", "b3.tmp-0011aabb", "not-a-backup"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
        }
        assert!(newest_backup(&dir).unwrap_err().contains("no backup"));
        let t = std::time::SystemTime::now();
        for (name, age) in [("b1", 30), ("b2", 20), ("b3.tmp-0011aabb", 10)] {
            let f = std::fs::File::create(dir.join(name).join(backup::MANIFEST)).unwrap();
            f.set_modified(t - std::time::Duration::from_secs(age))
                .unwrap();
        }
        assert_eq!(newest_backup(&dir).unwrap(), dir.join("b2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_drill_policy_loads_and_binds_every_key_to_the_drills_uid() {
        let dir = std::env::temp_dir().join(format!(
            "kw-policy-{}",
            hex::encode(rand::random::<[u8; 6]>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.toml");
        std::fs::write(&file, drill_policy(4242, &["hot".into(), "cold".into()])).unwrap();
        let p = crate::policy::Policy::load(&file).unwrap();
        let agent = p.agent_for_uid(4242).unwrap();
        assert_eq!(agent.name.as_str(), DRILL_AGENT);
        let all = p.all_keys();
        let keys: Vec<&str> = all.iter().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["cold", "hot"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
