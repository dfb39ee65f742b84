//! Checkpoints: C2SP tlog-checkpoint bodies in the C2SP signed-note format,
//! signed with an Ed25519 audit key held in the HSM.
//!
//! Body: `<origin>\n<tree size>\n<base64 root hash>\n`. Note: the body, a
//! blank line, then one line per signature `— <key name> <base64(key id ‖
//! signature)>` where the key id is the first 4 bytes of SHA-256(key name ‖
//! "\n" ‖ 0x01 ‖ public key) and the signature is Ed25519 over the body.
//! A verifier key is `<name>+<hex key id>+<base64(0x01 ‖ public key)>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::merkle::Hash;
use crate::types::PublicKey;

/// Name of the audit key in the HSM and in notes.
pub const AUDIT_KEY: &str = "keyward-audit";

/// Signature algorithm byte of Ed25519 in signed notes.
const ALG_ED25519: u8 = 0x01;

/// The key id of `name`'s Ed25519 key in signed notes.
pub fn key_id(name: &str, key: &PublicKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(key.0);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// The verifier key string of `name`'s key.
pub fn verifier_key(name: &str, key: &PublicKey) -> String {
    let mut k = vec![ALG_ED25519];
    k.extend_from_slice(&key.0);
    format!(
        "{name}+{}+{}",
        hex::encode(key_id(name, key)),
        STANDARD.encode(k)
    )
}

/// The checkpoint body.
pub fn body(origin: &str, size: u64, root: &Hash) -> String {
    format!("{origin}\n{size}\n{}\n", STANDARD.encode(root))
}

/// The signed note of `body` with `signature` by `name`'s `key`.
pub fn note(body: &str, name: &str, key: &PublicKey, signature: &[u8; 64]) -> String {
    let mut sig = key_id(name, key).to_vec();
    sig.extend_from_slice(signature);
    format!("{body}\n\u{2014} {name} {}\n", STANDARD.encode(sig))
}

/// Label of the HSM data object that keeps the newest checkpoint outside
/// the database (see [`Mark`]).
pub const MARK_LABEL: &str = "keyward-checkpoint-mark";

/// The payload of a `checkpoint` ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRecord {
    /// Log origin (first line of the note).
    pub origin: String,
    /// Number of entries covered (1..=size).
    pub size: u64,
    /// Merkle root of those entries (hex).
    pub root: String,
    /// The C2SP signed note.
    pub note: String,
    /// Name of the signing key.
    pub key: String,
    /// Its public key (base58).
    pub public_key: String,
    /// Its verifier key, for reading only: verification uses a trusted key,
    /// never this field.
    pub verifier_key: String,
}

/// The newest checkpoint, kept in the HSM as a private data object that
/// only the daemon's credentials can write. A database whose history does
/// not contain it (shorter, or another tree at that size) was truncated,
/// rolled back or rewritten.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    /// Number of entries covered.
    pub size: u64,
    /// Merkle root of those entries (hex).
    pub root: String,
    /// Sequence number of the `checkpoint` entry that recorded it.
    pub seq: u64,
    /// The signed note.
    pub note: String,
}

impl Mark {
    /// The mark of a recorded checkpoint.
    pub fn of(record: &CheckpointRecord, seq: u64) -> Mark {
        Mark {
            size: record.size,
            root: record.root.clone(),
            seq,
            note: record.note.clone(),
        }
    }

    /// The bytes stored in the HSM.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the stored bytes and checks that the note is signed by `vkey`
    /// and says the same size and root.
    pub fn decode_verified(bytes: &[u8], vkey: &str) -> Result<Mark, String> {
        let mark: Mark = serde_json::from_slice(bytes)
            .map_err(|e| format!("the HSM's checkpoint mark is not readable: {e}"))?;
        let cp = verify(&mark.note, vkey)
            .map_err(|e| format!("the HSM's checkpoint mark does not verify: {e}"))?;
        if cp.size != mark.size || hex::encode(cp.root) != mark.root {
            return Err("the HSM's checkpoint mark says another size or root than its note".into());
        }
        Ok(mark)
    }

    /// The newest of the marks stored in the HSM (two exist after an
    /// interrupted update), each verified with `vkey`.
    pub fn newest(values: &[Vec<u8>], vkey: &str) -> Result<Option<Mark>, String> {
        let mut newest: Option<Mark> = None;
        for v in values {
            let m = Mark::decode_verified(v, vkey)?;
            if newest.as_ref().is_none_or(|n| m.size > n.size) {
                newest = Some(m);
            }
        }
        Ok(newest)
    }
}

/// A checkpoint read from a verified note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Log origin.
    pub origin: String,
    /// Number of entries covered.
    pub size: u64,
    /// Merkle root of those entries.
    pub root: Hash,
}

/// Parses a verifier key string: (name, public key).
pub fn parse_verifier_key(vkey: &str) -> Result<(String, PublicKey), String> {
    let mut parts = vkey.splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("a verifier key is NAME+KEYID+KEY".into());
    };
    let raw = STANDARD
        .decode(key)
        .map_err(|_| "the key part is not base64")?;
    let (&alg, k) = raw.split_first().ok_or("empty key")?;
    if alg != ALG_ED25519 || k.len() != 32 {
        return Err("only Ed25519 verifier keys are supported".into());
    }
    let mut pk = [0u8; 32];
    pk.copy_from_slice(k);
    let pk = PublicKey(pk);
    if hex::encode(key_id(name, &pk)) != id {
        return Err("the key id does not match the name and key".into());
    }
    Ok((name.to_owned(), pk))
}

/// Verifies a signed checkpoint note with a verifier key and returns what
/// it says. Every failure is an error naming what is wrong.
pub fn verify(note: &str, vkey: &str) -> Result<Checkpoint, String> {
    let (name, key) = parse_verifier_key(vkey)?;
    let split = note
        .find("\n\n")
        .ok_or("no blank line between text and signatures")?;
    let (text, sigs) = (&note[..=split], &note[split + 2..]);
    let id = key_id(&name, &key);
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.0).map_err(|_| "invalid Ed25519 key")?;
    let mut verified = false;
    for line in sigs.lines() {
        let Some(rest) = line.strip_prefix("\u{2014} ") else {
            return Err(format!("not a signature line: {line:?}"));
        };
        let Some((n, b64)) = rest.rsplit_once(' ') else {
            return Err("signature line without a signature".into());
        };
        if n != name {
            continue;
        }
        let raw = STANDARD
            .decode(b64)
            .map_err(|_| "signature is not base64")?;
        if raw.len() != 68 || raw[..4] != id {
            continue;
        }
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&raw[4..]);
        vk.verify_strict(text.as_bytes(), &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|_| "the checkpoint signature does not verify")?;
        verified = true;
    }
    if !verified {
        return Err(format!("no signature by {name} on the note"));
    }
    let mut lines = text.lines();
    let origin = lines.next().ok_or("no origin line")?.to_owned();
    let size = lines
        .next()
        .and_then(|l| l.parse::<u64>().ok())
        .ok_or("the second line is not a tree size")?;
    let root = lines
        .next()
        .and_then(|l| STANDARD.decode(l).ok())
        .and_then(|r| <[u8; 32]>::try_from(r.as_slice()).ok())
        .ok_or("the third line is not a base64 SHA-256 root")?;
    Ok(Checkpoint { origin, size, root })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ed25519_dalek::Signer as _;

    use super::*;

    #[test]
    fn a_signed_note_verifies_and_any_change_is_refused() {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let pk = PublicKey(sk.verifying_key().to_bytes());
        let b = body("keyward/test", 42, &[7u8; 32]);
        let n = note(&b, AUDIT_KEY, &pk, &sk.sign(b.as_bytes()).to_bytes());
        let vkey = verifier_key(AUDIT_KEY, &pk);
        let cp = verify(&n, &vkey).unwrap();
        assert_eq!(
            (cp.origin.as_str(), cp.size, cp.root),
            ("keyward/test", 42, [7u8; 32])
        );
        assert!(verify(&n.replace("\n42\n", "\n43\n"), &vkey).is_err());
        let other = PublicKey(
            ed25519_dalek::SigningKey::from_bytes(&[8u8; 32])
                .verifying_key()
                .to_bytes(),
        );
        assert!(verify(&n, &verifier_key(AUDIT_KEY, &other)).is_err());
        assert!(parse_verifier_key("x+00000000+AAAA").is_err());
    }
}
