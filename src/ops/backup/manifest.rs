//! The manifest of a backup and its signature.
//!
//! `manifest.json` is the pretty-printed JSON of [`Manifest`] (fields in
//! declaration order) and a newline; [`Manifest::parse`] accepts only
//! those exact bytes, so one manifest has one byte form and one digest.
//! `manifest.sig` is one line: the base64 Ed25519 signature of the audit
//! key over [`signed_message`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BackupError;

/// Name of the manifest in a backup.
pub const MANIFEST: &str = "manifest.json";
/// Name of the manifest's signature in a backup.
pub const SIGNATURE: &str = "manifest.sig";
/// Version of the backup format.
pub const FORMAT: u32 = 1;

/// Domain separator of manifest signatures.
///
/// The audit key also signs checkpoints, whose signed bytes are a C2SP
/// note body `<origin>\n<size>\n<root>\n` (src/ledger/checkpoint.rs). A
/// manifest message can never be such a body: its NUL byte at offset 26
/// would have to be part of the origin line, and a configured origin may
/// not hold control characters (config.rs refuses them), while the
/// default origin `keyward/<label>` already differs at offset 7 (`/`
/// against `:`). Nothing else is signed with the audit key.
pub const SIGNING_DOMAIN: &[u8] = b"keyward:backup-manifest:v1\0";

/// The bytes the audit key signs for a manifest whose SHA-256 is `digest`.
pub fn signed_message(digest: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + 32);
    m.extend_from_slice(SIGNING_DOMAIN);
    m.extend_from_slice(digest);
    m
}

/// What a backup holds and the ledger head it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// When the backup was taken (UTC, RFC 3339).
    pub created_at: String,
    /// The keyward version that took it.
    pub keyward_version: String,
    /// The instance it was taken from.
    pub instance: InstanceInfo,
    /// The last ledger entry in the snapshot.
    pub ledger: LedgerHead,
    /// Every file of the backup but the manifest and its signature.
    pub files: Vec<FileEntry>,
}

/// The instance a backup was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    /// HSM backend (`pkcs11`, `yubihsm`).
    pub backend: String,
    /// The PKCS#11 token label (for a YubiHSM 2: its connector).
    pub token_label: String,
    /// The checkpoint origin of its ledger.
    pub origin: String,
    /// What of the HSM's key material the backup holds.
    pub key_material: KeyMaterial,
    /// For the operator (e.g. where the keys of a vendor HSM are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The wrap key the `wrapped` files are encrypted under (YubiHSM 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrap_key: Option<u16>,
}

/// What of the HSM's key material a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyMaterial {
    /// SoftHSM2's token directory (its objects are encrypted under the SO
    /// and user PINs).
    Softhsm2Token,
    /// A YubiHSM 2's objects, each exported under the device's wrap key
    /// (`hsm/TYPE-ID.wrap`, role `wrapped`).
    YubihsmWrapped,
    /// None: a vendor HSM's keys are backed up with the vendor's own tools.
    Vendor,
}

/// A ledger entry: sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerHead {
    /// Sequence number (0 for an empty ledger).
    pub seq: u64,
    /// Hash (hex).
    pub hash: String,
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the backup, `/`-separated.
    pub path: String,
    /// What it is.
    pub role: Role,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 (hex).
    pub sha256: String,
}

/// What a file of a backup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A file of SoftHSM2's token directory.
    Token,
    /// The ledger snapshot.
    Ledger,
    /// keyward.toml.
    Config,
    /// The policy file.
    Policy,
    /// The audit verifier key pinned on the instance.
    AuditVkey,
    /// A YubiHSM 2 object exported under the wrap key.
    Wrapped,
}

impl Manifest {
    /// The manifest's bytes (its one form).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).unwrap_or_default();
        b.push(b'\n');
        b
    }

    /// Reads manifest bytes; refuses any other form than [`Manifest::to_bytes`]'s.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, BackupError> {
        let bad = |p: String| BackupError::invalid("backup_manifest_invalid", MANIFEST, p);
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(bad(format!(
                "format {} is not supported (this keyward reads format {FORMAT})",
                m.format
            )));
        }
        if m.to_bytes() != bytes {
            return Err(bad(
                "not in its canonical form (it was edited after it was written)".into(),
            ));
        }
        Ok(m)
    }

    /// The one file of `role` (config, policy, ledger, audit vkey).
    pub fn file(&self, role: Role) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.role == role)
    }
}

/// SHA-256 of manifest bytes.
pub fn manifest_digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The text of `manifest.sig`.
pub fn signature_text(signature: &[u8; 64]) -> String {
    format!("{}\n", STANDARD.encode(signature))
}

/// Checks `manifest.sig`'s text against the manifest bytes and a trusted
/// verifier key.
pub fn verify_signature(sig_text: &[u8], manifest: &[u8], vkey: &str) -> Result<(), BackupError> {
    let bad = |p: &str| BackupError::invalid("backup_signature_invalid", SIGNATURE, p);
    let text = std::str::from_utf8(sig_text).map_err(|_| bad("not text"))?;
    let raw = STANDARD
        .decode(text.trim_end_matches('\n'))
        .map_err(|_| bad("not one line of base64"))?;
    let sig = <[u8; 64]>::try_from(raw.as_slice()).map_err(|_| bad("not a 64-byte signature"))?;
    let (_, key) = crate::ledger::checkpoint::parse_verifier_key(vkey)
        .map_err(|e| BackupError::NoTrustedKey(e.to_string()))?;
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.0)
        .map_err(|_| BackupError::NoTrustedKey("the trusted key is not an Ed25519 key".into()))?;
    vk.verify_strict(
        &signed_message(&manifest_digest(manifest)),
        &ed25519_dalek::Signature::from_bytes(&sig),
    )
    .map_err(|_| {
        bad(&format!(
            "does not verify over {MANIFEST} under the trusted audit key {vkey}: {MANIFEST} was changed, or it was signed by another key"
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ed25519_dalek::Signer as _;

    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT,
            created_at: "2026-01-01T00:00:00Z".into(),
            keyward_version: "0.1.0".into(),
            instance: InstanceInfo {
                backend: "pkcs11".into(),
                token_label: "t".into(),
                origin: "keyward/t".into(),
                key_material: KeyMaterial::Softhsm2Token,
                wrap_key: None,
                note: None,
            },
            ledger: LedgerHead {
                seq: 3,
                hash: "00".repeat(32),
            },
            files: vec![FileEntry {
                path: "config/policy.toml".into(),
                role: Role::Policy,
                size: 1,
                sha256: "11".repeat(32),
            }],
        }
    }

    #[test]
    fn a_manifest_reads_back_only_in_its_own_form() {
        let bytes = manifest().to_bytes();
        assert_eq!(Manifest::parse(&bytes).unwrap(), manifest());
        let compact = serde_json::to_vec(&manifest()).unwrap();
        let e = Manifest::parse(&compact).unwrap_err();
        assert_eq!(e.code(), "backup_manifest_invalid");
    }

    #[test]
    fn a_signature_verifies_only_for_its_manifest_and_key() {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]);
        let pk = crate::types::PublicKey(sk.verifying_key().to_bytes());
        let vkey = crate::ledger::checkpoint::verifier_key("keyward-audit", &pk);
        let bytes = manifest().to_bytes();
        let sig = sk
            .sign(&signed_message(&manifest_digest(&bytes)))
            .to_bytes();
        let text = signature_text(&sig);
        verify_signature(text.as_bytes(), &bytes, &vkey).unwrap();
        let mut other = bytes.clone();
        other[10] ^= 1;
        assert!(verify_signature(text.as_bytes(), &other, &vkey).is_err());
        let other_key = crate::types::PublicKey(
            ed25519_dalek::SigningKey::from_bytes(&[6u8; 32])
                .verifying_key()
                .to_bytes(),
        );
        let other_vkey = crate::ledger::checkpoint::verifier_key("keyward-audit", &other_key);
        assert!(verify_signature(text.as_bytes(), &bytes, &other_vkey).is_err());
        // The undomained digest is not accepted either.
        let raw = sk.sign(&manifest_digest(&bytes)).to_bytes();
        assert!(verify_signature(signature_text(&raw).as_bytes(), &bytes, &vkey).is_err());
    }
}
