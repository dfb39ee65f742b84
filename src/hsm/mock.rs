//! An in-memory HSM for tests: Ed25519 keys (ed25519-dalek), HMAC-SHA256
//! secrets and data objects, with latency and failures injected per
//! operation, so the signing service can be driven without SoftHSM2 and a
//! slow or failing device can be simulated.
//!
//! Compiled only with the cargo feature `mock-hsm`, which only the
//! package's self dev-dependency turns on: release builds never contain it
//! (`tests/release_path.rs` checks).
//!
//! Like a real device it offers no export: no call returns a private key
//! or a secret, and `Debug` shows none. Keys are addressed by 16-bit object
//! ids ([`super::KeyRef`]), as a YubiHSM addresses them.
//!
//! ```
//! # #[cfg(feature = "mock-hsm")] {
//! use keyward::hsm::mock::MockHsm;
//! use keyward::hsm::{Hsm, HsmOp};
//! use keyward::types::KeyName;
//!
//! let hsm = MockHsm::new();
//! let key = hsm.generate_ed25519(&KeyName::new("hot").unwrap()).unwrap();
//! hsm.fail_next(HsmOp::Sign, 1);
//! assert!(hsm.sign_ed25519(&key, b"m").is_err());
//! assert!(hsm.sign_ed25519(&key, b"m").is_ok());
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use ed25519_dalek::Signer as _;
use hmac::Mac as _;
use zeroize::Zeroizing;

use super::{Hsm, HsmError, HsmKey, HsmOp, KeyRef, foreign_key_ref};
use crate::types::{KeyName, PublicKey};

/// What the injected errors say.
const INJECTED: &str = "injected by the mock HSM";

/// First object id handed out (ids below are reserved, as on a YubiHSM
/// whose id 1 is the default auth key).
const FIRST_ID: u16 = 0x0100;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[derive(Default)]
struct Objects {
    /// Key name → object id and private key.
    keys: BTreeMap<KeyName, (u16, ed25519_dalek::SigningKey)>,
    next_id: u16,
    secrets: BTreeMap<String, Zeroizing<Vec<u8>>>,
    data: BTreeMap<String, Vec<Vec<u8>>>,
}

#[derive(Default)]
struct Gate {
    closed: bool,
    waiting: usize,
}

/// Injected behaviour and counts of one operation.
#[derive(Default)]
struct OpFaults {
    delay: Mutex<Duration>,
    gate: Mutex<Gate>,
    opened: Condvar,
    fail_next: Mutex<u64>,
    entered: AtomicU64,
    succeeded: AtomicU64,
}

/// The in-memory HSM. See the module docs.
pub struct MockHsm {
    objects: Mutex<Objects>,
    workers: usize,
    faults: [OpFaults; HsmOp::ALL.len()],
    /// Signatures still to be returned corrupted (one bit flipped).
    corrupt_signatures: AtomicU64,
    /// While set, every call fails as with a device that is gone.
    unplugged: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for MockHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = lock(&self.objects);
        f.debug_struct("MockHsm")
            .field("keys", &o.keys.keys().collect::<Vec<_>>())
            .field("secrets", &o.secrets.keys().collect::<Vec<_>>())
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Default for MockHsm {
    fn default() -> Self {
        MockHsm::new()
    }
}

impl MockHsm {
    /// An empty device that runs one command at a time.
    pub fn new() -> MockHsm {
        MockHsm {
            objects: Mutex::new(Objects {
                next_id: FIRST_ID,
                ..Objects::default()
            }),
            workers: 1,
            faults: Default::default(),
            corrupt_signatures: AtomicU64::new(0),
            unplugged: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same, serving `n` calls at once (as a token with `n` sessions).
    pub fn with_workers(mut self, n: usize) -> MockHsm {
        self.workers = n.max(1);
        self
    }

    fn op(&self, op: HsmOp) -> &OpFaults {
        &self.faults[HsmOp::ALL.iter().position(|o| *o == op).unwrap_or(0)]
    }

    /// The next `n` signatures come back with one bit flipped: a device
    /// that answers, but wrongly (keyward's software check must refuse
    /// them).
    pub fn corrupt_next_signatures(&self, n: u64) {
        self.corrupt_signatures.store(n, Ordering::SeqCst);
    }

    /// Every later call of `op` takes at least `delay` inside the device.
    pub fn set_delay(&self, op: HsmOp, delay: Duration) {
        *lock(&self.op(op).delay) = delay;
    }

    /// Calls of `op` stop inside the device until [`MockHsm::open_gate`].
    pub fn close_gate(&self, op: HsmOp) {
        lock(&self.op(op).gate).closed = true;
    }

    /// Lets the calls held at the gate of `op` (and later ones) through.
    pub fn open_gate(&self, op: HsmOp) {
        let f = self.op(op);
        lock(&f.gate).closed = false;
        f.opened.notify_all();
    }

    /// Calls of `op` held at its gate now.
    pub fn held(&self, op: HsmOp) -> usize {
        lock(&self.op(op).gate).waiting
    }

    /// The next `n` calls of `op` fail with a device error.
    pub fn fail_next(&self, op: HsmOp, n: u64) {
        *lock(&self.op(op).fail_next) = n;
    }

    /// Unplugs the device (`true`): every call fails with
    /// [`HsmError::StateLost`] (`hsm_unavailable`), objects kept, until it
    /// is plugged in again (`false`).
    pub fn set_unplugged(&self, unplugged: bool) {
        self.unplugged.store(unplugged, Ordering::SeqCst);
    }

    /// Calls of `op` that reached the device.
    pub fn calls(&self, op: HsmOp) -> u64 {
        self.op(op).entered.load(Ordering::SeqCst)
    }

    /// Calls of `op` that succeeded.
    pub fn succeeded(&self, op: HsmOp) -> u64 {
        self.op(op).succeeded.load(Ordering::SeqCst)
    }

    /// Runs one call of `op`: counted, delayed, held at the gate, failed
    /// if asked, else `f`.
    fn device<T>(
        &self,
        op: HsmOp,
        f: impl FnOnce(&mut Objects) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        if self.unplugged.load(Ordering::SeqCst) {
            return Err(HsmError::StateLost {
                op: op.as_str(),
                detail: "the mock device is unplugged".into(),
            });
        }
        let faults = self.op(op);
        faults.entered.fetch_add(1, Ordering::SeqCst);
        let delay = *lock(&faults.delay);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        {
            let mut gate = lock(&faults.gate);
            gate.waiting += 1;
            while gate.closed {
                gate = match faults.opened.wait(gate) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
            gate.waiting -= 1;
        }
        {
            let mut fail = lock(&faults.fail_next);
            if *fail > 0 {
                *fail -= 1;
                return Err(HsmError::Device {
                    op: op.as_str(),
                    detail: INJECTED.into(),
                });
            }
        }
        let result = f(&mut lock(&self.objects));
        if result.is_ok() {
            faults.succeeded.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

fn hsm_key(name: &KeyName, id: u16, key: &ed25519_dalek::SigningKey) -> HsmKey {
    HsmKey {
        name: name.clone(),
        public_key: PublicKey(key.verifying_key().to_bytes()),
        key_ref: KeyRef::object_id(id),
    }
}

impl Hsm for MockHsm {
    fn backend(&self) -> &'static str {
        "mock"
    }

    fn workers(&self) -> usize {
        self.workers
    }

    fn generate_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        self.device(HsmOp::Generate, |o| {
            if o.keys.contains_key(name) {
                return Err(HsmError::KeyExists(name.to_string()));
            }
            let id = o.next_id;
            o.next_id = id.checked_add(1).ok_or_else(|| HsmError::Device {
                op: "generate",
                detail: "no object id left".into(),
            })?;
            let mut seed = Zeroizing::new([0u8; 32]);
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed[..]);
            let key = ed25519_dalek::SigningKey::from_bytes(&seed);
            let made = hsm_key(name, id, &key);
            o.keys.insert(name.clone(), (id, key));
            Ok(made)
        })
    }

    fn find_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        self.device(HsmOp::Find, |o| {
            o.keys
                .get(name)
                .map(|(id, key)| hsm_key(name, *id, key))
                .ok_or_else(|| HsmError::KeyNotFound(name.to_string()))
        })
    }

    fn list_ed25519(&self) -> Result<Vec<HsmKey>, HsmError> {
        self.device(HsmOp::List, |o| {
            Ok(o.keys
                .iter()
                .map(|(name, (id, key))| hsm_key(name, *id, key))
                .collect())
        })
    }

    fn destroy_ed25519(&self, key: &HsmKey) -> Result<(), HsmError> {
        let id = key
            .key_ref
            .as_object_id()
            .ok_or_else(|| foreign_key_ref("destroy", key))?;
        self.device(HsmOp::DestroyKey, |o| {
            let before = o.keys.len();
            o.keys.retain(|_, (i, _)| *i != id);
            if o.keys.len() == before {
                return Err(HsmError::KeyNotFound(key.name.to_string()));
            }
            Ok(())
        })
    }

    fn sign_ed25519(&self, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError> {
        let id = key
            .key_ref
            .as_object_id()
            .ok_or_else(|| foreign_key_ref("sign", key))?;
        let mut sig = self.device(HsmOp::Sign, |o| {
            o.keys
                .values()
                .find(|(i, _)| *i == id)
                .map(|(_, k)| k.sign(message).to_bytes())
                .ok_or_else(|| HsmError::KeyNotFound(key.name.to_string()))
        })?;
        let corrupt = self
            .corrupt_signatures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if corrupt {
            sig[0] ^= 1;
        }
        Ok(sig)
    }

    fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.device(HsmOp::Random, |_| {
            let mut out = Zeroizing::new(vec![0u8; len]);
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut out[..]);
            Ok(out)
        })
    }

    fn import_hmac_key(&self, label: &str, key: &[u8]) -> Result<(), HsmError> {
        self.device(HsmOp::ImportHmac, |o| {
            if o.secrets.contains_key(label) {
                return Err(HsmError::KeyExists(label.to_owned()));
            }
            o.secrets
                .insert(label.to_owned(), Zeroizing::new(key.to_vec()));
            Ok(())
        })
    }

    fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
        self.device(HsmOp::Hmac, |o| {
            let key = o
                .secrets
                .get(label)
                .ok_or_else(|| HsmError::KeyNotFound(label.to_owned()))?;
            let mut mac =
                hmac::Hmac::<sha2::Sha256>::new_from_slice(key).map_err(|e| HsmError::Device {
                    op: "hmac",
                    detail: e.to_string(),
                })?;
            mac.update(data);
            Ok(mac.finalize().into_bytes().into())
        })
    }

    fn delete_secret(&self, label: &str) -> Result<bool, HsmError> {
        self.device(HsmOp::DeleteSecret, |o| {
            Ok(o.secrets.remove(label).is_some())
        })
    }

    fn store_data(&self, label: &str, value: &[u8]) -> Result<(), HsmError> {
        self.device(HsmOp::StoreData, |o| {
            o.data.insert(label.to_owned(), vec![value.to_vec()]);
            Ok(())
        })
    }

    fn load_data(&self, label: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        self.device(HsmOp::LoadData, |o| {
            Ok(o.data.get(label).cloned().unwrap_or_default())
        })
    }

    fn health(&self) -> Result<(), HsmError> {
        self.device(HsmOp::Health, |_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn name(s: &str) -> KeyName {
        KeyName::new(s).unwrap()
    }

    #[test]
    fn signs_verifiably_with_keys_addressed_by_object_id() {
        let hsm = MockHsm::new();
        let hot = hsm.generate_ed25519(&name("hot")).unwrap();
        let cold = hsm.generate_ed25519(&name("cold")).unwrap();
        assert_eq!(hot.key_ref.as_object_id(), Some(FIRST_ID));
        assert_eq!(cold.key_ref.as_object_id(), Some(FIRST_ID + 1));
        assert_eq!(hsm.find_ed25519(&name("hot")).unwrap(), hot);
        let sig = super::super::sign_verified(&hsm, &hot, b"message").unwrap();
        assert_ne!(sig, hsm.sign_ed25519(&cold, b"message").unwrap());
        assert!(matches!(
            hsm.generate_ed25519(&name("hot")),
            Err(HsmError::KeyExists(_))
        ));
        assert!(matches!(
            hsm.find_ed25519(&name("none")),
            Err(HsmError::KeyNotFound(_))
        ));
        let names: Vec<_> = hsm
            .list_ed25519()
            .unwrap()
            .into_iter()
            .map(|k| k.name.to_string())
            .collect();
        assert_eq!(names, ["cold", "hot"]);
        let labelled = HsmKey {
            key_ref: KeyRef::label("hot"),
            ..hot
        };
        assert!(matches!(
            hsm.sign_ed25519(&labelled, b"m"),
            Err(HsmError::Device { .. })
        ));
    }

    #[test]
    fn hmac_matches_software_and_data_objects_replace() {
        let hsm = MockHsm::new();
        hsm.import_hmac_key("approver:alice", &[7; 32]).unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&[7; 32]).unwrap();
        mac.update(b"payload");
        let want: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(hsm.hmac_sha256("approver:alice", b"payload").unwrap(), want);
        assert!(hsm.import_hmac_key("approver:alice", &[1; 32]).is_err());
        assert!(hsm.delete_secret("approver:alice").unwrap());
        assert!(!hsm.delete_secret("approver:alice").unwrap());
        assert!(hsm.load_data("mark").unwrap().is_empty());
        hsm.store_data("mark", b"1").unwrap();
        hsm.store_data("mark", b"2").unwrap();
        assert_eq!(hsm.load_data("mark").unwrap(), vec![b"2".to_vec()]);
        let shown = format!("{hsm:?}");
        assert!(!shown.contains("7, 7"), "{shown}");
    }

    #[test]
    fn injected_failures_count_down_and_the_gate_holds_calls() {
        let hsm = std::sync::Arc::new(MockHsm::new());
        let key = hsm.generate_ed25519(&name("hot")).unwrap();
        hsm.fail_next(HsmOp::Sign, 2);
        assert!(hsm.sign_ed25519(&key, b"m").is_err());
        assert!(hsm.sign_ed25519(&key, b"m").is_err());
        assert!(hsm.sign_ed25519(&key, b"m").is_ok());
        assert_eq!((hsm.calls(HsmOp::Sign), hsm.succeeded(HsmOp::Sign)), (3, 1));
        assert!(hsm.health().is_ok(), "other operations are not affected");

        hsm.close_gate(HsmOp::Sign);
        let h = std::sync::Arc::clone(&hsm);
        let k = key.clone();
        let t = std::thread::spawn(move || h.sign_ed25519(&k, b"held"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hsm.held(HsmOp::Sign) == 0 {
            assert!(std::time::Instant::now() < deadline, "never held");
            std::thread::yield_now();
        }
        assert!(!t.is_finished());
        assert_eq!(hsm.succeeded(HsmOp::Sign), 1);
        hsm.open_gate(HsmOp::Sign);
        assert!(t.join().unwrap().is_ok());
        assert_eq!(hsm.held(HsmOp::Sign), 0);
    }
}
