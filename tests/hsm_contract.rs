//! One behavioural contract for every HSM backend.
//!
//! Each behaviour is a function taking a [`Fixture`]; the [`contract!`]
//! macro instantiates every behaviour as its own `#[test]` for a backend
//! (`pkcs11::signs_and_verifies`, `mock::signs_and_verifies`, ...). Adding a
//! backend is one `contract!(name, factory, outage_factory)` line plus its
//! factories; the outage factory's fixture can take the device away and
//! bring it back (SoftHSM2: the token's directory; MockHsm: its connector;
//! the mock: unplugged) for `recovers_after_an_outage`.
//!
//! Backends today:
//! - `pkcs11`: the PKCS#11 backend on a real SoftHSM2 token. SoftHSM2 reads
//!   `SOFTHSM2_CONF` once per process, so the binary provisions one token
//!   (generated PIN) and shares one `Pkcs11Hsm` across its tests; each
//!   fixture gets its own name prefix so tests never see each other's keys.
//! - `mock`: the in-memory test backend (`src/hsm/mock.rs`), fresh per test.
//! - `yubihsm`: the YubiHSM backend (`src/hsm/yubihsm/`) on the yubihsm
//!   crate's MockHsm, fresh per test (what MockHsm cannot show, such as
//!   capabilities and domains, is listed in the README as needing
//!   hardware).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use hmac::Mac;
use keyward::config::YubiHsmConnector;
use keyward::hsm::mock::MockHsm;
use keyward::hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use keyward::hsm::softhsm::{conf_path, provision_dev_token};
use keyward::hsm::yubihsm::mock_connector::{MockConnector, MockConnectorOptions};
use keyward::hsm::yubihsm::{Credentials, YubiHsm, YubiHsmSettings, connector_for};
use keyward::hsm::{ExecutorSettings, Hsm, HsmError, HsmExecutor, HsmKey, sign_verified};
use keyward::types::KeyName;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A backend under test: the HSM, and a prefix that makes this test's key
/// and secret names its own (backends may be shared between tests).
trait Fixture {
    /// The backend, through the `Hsm` trait only.
    fn hsm(&self) -> Arc<dyn Hsm>;
    /// A prefix unique to this fixture.
    fn prefix(&self) -> &str;
    /// A way to take the device away and bring it back (fixtures made by
    /// a backend's outage factory).
    fn outage(&self) -> &dyn Outage;

    /// A key name unique to this fixture.
    fn key(&self, base: &str) -> KeyName {
        KeyName::new(&format!("{}-{base}", self.prefix())).unwrap()
    }
    /// A secret or data label unique to this fixture.
    fn label(&self, base: &str) -> String {
        format!("{}-{base}", self.prefix())
    }
}

/// The device going away (unplugged, connector stopped, token lost) and
/// coming back, as the backend's callers would see it.
trait Outage: Send + Sync {
    fn down(&self);
    fn up(&self);
}

/// For fixtures whose factory made no outage.
struct NoOutage;

impl Outage for NoOutage {
    fn down(&self) {
        panic!("this fixture was not made by an outage factory");
    }
    fn up(&self) {}
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn unique_prefix(backend: &str) -> String {
    format!("{backend}{}", NEXT.fetch_add(1, Ordering::SeqCst))
}

// ---- backends -------------------------------------------------------------

struct Shared {
    prefix: String,
    hsm: Arc<dyn Hsm>,
    outage: Box<dyn Outage>,
    /// Held for the fixture's life: a shared backend's outage test runs
    /// alone (it holds the write side).
    _turn: Option<Turn>,
}

#[allow(dead_code)]
enum Turn {
    Alone(RwLockWriteGuard<'static, ()>),
}

impl Shared {
    fn new(prefix: String, hsm: Arc<dyn Hsm>) -> Shared {
        Shared {
            prefix,
            hsm,
            outage: Box::new(NoOutage),
            _turn: None,
        }
    }
}

impl Fixture for Shared {
    fn hsm(&self) -> Arc<dyn Hsm> {
        Arc::clone(&self.hsm)
    }
    fn prefix(&self) -> &str {
        &self.prefix
    }
    fn outage(&self) -> &dyn Outage {
        &*self.outage
    }
}

/// The in-memory mock, fresh for each test.
fn mock() -> Box<dyn Fixture> {
    Box::new(Shared::new(
        unique_prefix("mock"),
        Arc::new(MockHsm::new().with_workers(4)),
    ))
}

struct Unplug(Arc<MockHsm>);

impl Outage for Unplug {
    fn down(&self) {
        self.0.set_unplugged(true);
    }
    fn up(&self) {
        self.0.set_unplugged(false);
    }
}

/// The mock, which can be unplugged.
fn mock_outage() -> Box<dyn Fixture> {
    let mock = Arc::new(MockHsm::new().with_workers(4));
    let mut f = Shared::new(unique_prefix("mock"), Arc::clone(&mock) as Arc<dyn Hsm>);
    f.outage = Box::new(Unplug(mock));
    Box::new(f)
}

/// The YubiHSM backend on a fresh MockHsm (the yubihsm crate's software
/// YubiHSM 2) for each test, through its factory authentication key.
fn yubihsm() -> Box<dyn Fixture> {
    let hsm = YubiHsm::mock(YubiHsmSettings {
        domains: vec![1],
        exportable_under_wrap: false,
        device: "mockhsm".into(),
    })
    .unwrap();
    Box::new(Shared::new(unique_prefix("yh"), Arc::new(hsm)))
}

struct ConnectorOutage(MockConnector);

impl Outage for ConnectorOutage {
    fn down(&self) {
        self.0.set_online(false);
    }
    fn up(&self) {
        self.0.set_online(true);
    }
}

/// The YubiHSM backend through the real HTTP connector client, talking to
/// a MockHsm behind an in-process mock connector that can be stopped.
fn yubihsm_outage() -> Box<dyn Fixture> {
    let connector = MockConnector::start(MockConnectorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        port_file: None,
        latency: Duration::ZERO,
        exit_when_gone: None,
    })
    .unwrap();
    let addr = connector.addr();
    let hsm = YubiHsm::with_connector(
        connector_for(
            &YubiHsmConnector::Http {
                addr: addr.ip().to_string(),
                port: addr.port(),
            },
            2_000,
        )
        .unwrap(),
        Credentials::default(),
        YubiHsmSettings {
            domains: vec![1],
            exportable_under_wrap: false,
            device: format!("http://{addr}"),
        },
    )
    .unwrap();
    let mut f = Shared::new(unique_prefix("yh"), Arc::new(hsm));
    f.outage = Box::new(ConnectorOutage(connector));
    Box::new(f)
}

/// The PKCS#11 backend on one SoftHSM2 token shared by this binary.
fn pkcs11() -> Box<dyn Fixture> {
    // One test at a time on the token: SoftHSM2 2.6 fails a key generation
    // now and then (CKR_GENERAL_ERROR, the module's state lost) while
    // another session of the process creates or destroys token objects;
    // concurrency through one session pool is what
    // `concurrent_signing_through_the_executor` tests.
    let turn = Turn::Alone(PKCS11_TURNS.write().unwrap_or_else(|p| p.into_inner()));
    let (_, hsm) = pkcs11_token();
    let mut f = Shared::new(unique_prefix("p11-"), Arc::clone(hsm));
    f._turn = Some(turn);
    Box::new(f)
}

/// The shared token's tests run one at a time.
static PKCS11_TURNS: RwLock<()> = RwLock::new(());

struct TokenOutage {
    tokens: std::path::PathBuf,
    away: std::path::PathBuf,
    token: std::sync::Mutex<Option<std::ffi::OsString>>,
}

impl Outage for TokenOutage {
    /// SoftHSM2 keeps a token in a directory of its own: taken away, the
    /// module marks the token and its objects invalid.
    fn down(&self) {
        let entry = std::fs::read_dir(&self.tokens)
            .unwrap()
            .next()
            .expect("the token's directory")
            .unwrap();
        std::fs::rename(entry.path(), &self.away).unwrap();
        *self.token.lock().unwrap() = Some(entry.file_name());
    }
    fn up(&self) {
        if let Some(name) = self.token.lock().unwrap().take() {
            std::fs::rename(&self.away, self.tokens.join(name)).unwrap();
        }
    }
}

impl Drop for TokenOutage {
    fn drop(&mut self) {
        self.up();
    }
}

/// The shared SoftHSM2 token, alone (no other test of this binary uses it
/// meanwhile), with its directory to take away.
fn pkcs11_outage() -> Box<dyn Fixture> {
    let turn = Turn::Alone(PKCS11_TURNS.write().unwrap_or_else(|p| p.into_inner()));
    let (tmp, hsm) = pkcs11_token();
    let mut f = Shared::new(unique_prefix("p11-"), Arc::clone(hsm));
    f.outage = Box::new(TokenOutage {
        tokens: tmp.path().join("tokens"),
        away: tmp.path().join("token-away"),
        token: std::sync::Mutex::new(None),
    });
    f._turn = Some(turn);
    Box::new(f)
}

fn pkcs11_token() -> &'static (tempfile::TempDir, Arc<dyn Hsm>) {
    static TOKEN: OnceLock<(tempfile::TempDir, Arc<dyn Hsm>)> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        // SAFETY: runs once, before this process loads the PKCS#11 module;
        // the other tests of this binary that may run meanwhile use the
        // in-memory mock and read no environment.
        #[allow(unsafe_code)]
        unsafe {
            keyward::process::set_env_single_threaded("SOFTHSM2_CONF", &conf_path(tmp.path()))
        };
        let token = provision_dev_token(tmp.path(), MODULE.as_ref(), "kw-contract").unwrap();
        let hsm = Pkcs11Hsm::open(&Pkcs11Config {
            module: MODULE.into(),
            token_label: "kw-contract".into(),
            pin_file: token.pin_file.clone(),
            max_sessions: 4,
        })
        .unwrap();
        (tmp, Arc::new(hsm) as Arc<dyn Hsm>)
    })
}

// ---- behaviours -----------------------------------------------------------

fn verify(key: &HsmKey, message: &[u8], sig: &[u8; 64]) {
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.public_key.0).unwrap();
    vk.verify_strict(message, &ed25519_dalek::Signature::from_bytes(sig))
        .expect("signature verifies strictly against the public key");
}

/// The public key generation returns is the one found and listed later.
fn generated_key_is_found_with_the_same_public_key(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let name = f.key("hot");
    let made = hsm.generate_ed25519(&name).unwrap();
    assert_eq!(made.name, name);
    let found = hsm.find_ed25519(&name).unwrap();
    assert_eq!(found.public_key, made.public_key);
    assert_eq!(found, made);
}

/// A signature of the HSM verifies (ed25519 strict) against the key's
/// public key, directly and through `sign_verified`; another message's does not.
fn signs_and_verifies(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let key = hsm.generate_ed25519(&f.key("hot")).unwrap();
    let sig = hsm.sign_ed25519(&key, b"pay alice 1 SOL").unwrap();
    verify(&key, b"pay alice 1 SOL", &sig);
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.public_key.0).unwrap();
    assert!(
        vk.verify_strict(b"pay mallory", &ed25519_dalek::Signature::from_bytes(&sig))
            .is_err()
    );
    assert_eq!(sign_verified(&*hsm, &key, b"pay alice 1 SOL").unwrap(), sig);
}

/// Ed25519 is deterministic: one message, one signature; different
/// messages or different keys, different signatures.
fn signatures_are_deterministic_and_distinct(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let a = hsm.generate_ed25519(&f.key("a")).unwrap();
    let b = hsm.generate_ed25519(&f.key("b")).unwrap();
    assert_ne!(a.public_key, b.public_key, "two keys, two public keys");
    let s1 = hsm.sign_ed25519(&a, b"one").unwrap();
    assert_eq!(hsm.sign_ed25519(&a, b"one").unwrap(), s1);
    assert_ne!(hsm.sign_ed25519(&a, b"two").unwrap(), s1);
    assert_ne!(hsm.sign_ed25519(&b, b"one").unwrap(), s1);
    // Empty and large messages are signed too.
    verify(&a, b"", &hsm.sign_ed25519(&a, b"").unwrap());
    let big = vec![7u8; 1232];
    verify(&a, &big, &hsm.sign_ed25519(&a, &big).unwrap());
}

/// Names as long as keyward allows (64-byte key names, approver labels of
/// more than 80 bytes; a YubiHSM label holds 40) work like short ones, and
/// two long names that share their first 40 bytes stay two keys.
fn longest_names_work(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let pad = |base: &str, len: usize| {
        let head = format!("{}-{base}", f.prefix());
        format!("{head}{}", "x".repeat(len - head.len()))
    };
    let a = KeyName::new(&pad("a", 64)).unwrap();
    let b = KeyName::new(&format!("{}b", &a.as_str()[..63])).unwrap();
    assert_eq!(b.as_str().len(), 64);
    let ka = hsm.generate_ed25519(&a).unwrap();
    let kb = hsm.generate_ed25519(&b).unwrap();
    assert_ne!(ka.public_key, kb.public_key);
    assert_eq!(hsm.find_ed25519(&a).unwrap(), ka);
    assert_eq!(hsm.find_ed25519(&b).unwrap(), kb);
    verify(&kb, b"long", &hsm.sign_ed25519(&kb, b"long").unwrap());
    let listed = hsm.list_ed25519().unwrap();
    assert!(listed.contains(&ka) && listed.contains(&kb), "{listed:?}");
    assert_eq!(hsm.generate_ed25519(&a).unwrap_err().code(), "key_exists");

    let label = format!("keyward-approver:{}", pad("approver", 64));
    hsm.import_hmac_key(&label, &[9u8; 32]).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&[9u8; 32]).unwrap();
    mac.update(b"m");
    mac.verify_slice(&hsm.hmac_sha256(&label, b"m").unwrap())
        .expect("tag equals software HMAC");
    assert_eq!(
        hsm.hmac_sha256(&format!("{label}2"), b"m")
            .unwrap_err()
            .code(),
        "key_not_found"
    );
}

/// Finding a key that does not exist: `key_not_found`.
fn missing_key_is_key_not_found(f: Box<dyn Fixture>) {
    let e = f.hsm().find_ed25519(&f.key("absent")).unwrap_err();
    assert!(matches!(e, HsmError::KeyNotFound(_)), "{e}");
    assert_eq!(e.code(), "key_not_found");
}

/// Generating a name that exists: `key_exists`, and the first key is kept.
fn generating_an_existing_name_is_key_exists(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let name = f.key("hot");
    let first = hsm.generate_ed25519(&name).unwrap();
    let e = hsm.generate_ed25519(&name).unwrap_err();
    assert!(matches!(e, HsmError::KeyExists(_)), "{e}");
    assert_eq!(e.code(), "key_exists");
    assert_eq!(hsm.find_ed25519(&name).unwrap(), first);
}

/// Destroying a key removes it (private and public): it is no longer
/// found, listed or usable, a second destroy is `key_not_found`, health no
/// longer looks for it, and another key (long-named too) is untouched.
fn destroyed_key_is_gone(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let doomed = hsm.generate_ed25519(&f.key("old")).unwrap();
    let kept = hsm.generate_ed25519(&f.key("new")).unwrap();
    let head = format!("{}-long", f.prefix());
    let long = KeyName::new(&format!("{head}{}", "l".repeat(64 - head.len()))).unwrap();
    let long = hsm.generate_ed25519(&long).unwrap();
    hsm.health().unwrap();
    hsm.destroy_ed25519(&doomed).unwrap();
    hsm.destroy_ed25519(&long).unwrap();
    for gone in [&doomed, &long] {
        assert_eq!(
            hsm.find_ed25519(&gone.name).unwrap_err().code(),
            "key_not_found"
        );
        assert!(
            hsm.sign_ed25519(gone, b"m").is_err(),
            "a destroyed key signs nothing"
        );
        assert_eq!(
            hsm.destroy_ed25519(gone).unwrap_err().code(),
            "key_not_found"
        );
    }
    let listed = hsm.list_ed25519().unwrap();
    assert!(
        !listed.contains(&doomed) && !listed.contains(&long),
        "{listed:?}"
    );
    assert!(listed.contains(&kept));
    hsm.health()
        .expect("health does not look for destroyed keys");
    verify(&kept, b"still", &hsm.sign_ed25519(&kept, b"still").unwrap());
    // The name can be used again.
    let again = hsm.generate_ed25519(&doomed.name).unwrap();
    assert_ne!(again.public_key, doomed.public_key);
}

/// Listing returns every generated key, sorted by name, with the public
/// keys generation returned.
fn lists_generated_keys_sorted(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let b = hsm.generate_ed25519(&f.key("b")).unwrap();
    let a = hsm.generate_ed25519(&f.key("a")).unwrap();
    let listed = hsm.list_ed25519().unwrap();
    let names: Vec<&KeyName> = listed.iter().map(|k| &k.name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "listed sorted by name");
    let mine: Vec<&HsmKey> = listed
        .iter()
        .filter(|k| k.name.as_str().starts_with(&format!("{}-", f.prefix())))
        .collect();
    assert_eq!(mine, vec![&a, &b]);
}

/// An approver's HMAC key: tags equal software HMAC-SHA256, a wrong tag
/// does not match, a second import of the label is `key_exists`, a missing
/// label `key_not_found`, and deletion removes it.
fn hmac_approver_keys(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let label = f.label("approver-alice");
    let key = [0x5a_u8; 32];
    hsm.import_hmac_key(&label, &key).unwrap();
    let data = b"keyward:approval:v1\0payload";
    let tag = hsm.hmac_sha256(&label, data).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(data);
    mac.verify_slice(&tag).expect("tag equals software HMAC");
    let mut wrong = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    wrong.update(data);
    let mut forged = tag;
    forged[31] ^= 1;
    assert!(
        wrong.verify_slice(&forged).is_err(),
        "a wrong tag is refused"
    );
    assert_ne!(hsm.hmac_sha256(&label, b"other payload").unwrap(), tag);
    // Verified by the backend (inside the device where it can).
    assert!(hsm.verify_hmac_sha256(&label, data, &tag).unwrap());
    assert!(!hsm.verify_hmac_sha256(&label, data, &forged).unwrap());
    assert!(
        !hsm.verify_hmac_sha256(&label, b"other payload", &tag)
            .unwrap()
    );
    assert_eq!(
        hsm.verify_hmac_sha256(&f.label("approver-nobody"), data, &tag)
            .unwrap_err()
            .code(),
        "key_not_found"
    );

    let e = hsm.import_hmac_key(&label, &[1u8; 32]).unwrap_err();
    assert_eq!(e.code(), "key_exists", "{e}");
    assert_eq!(
        hsm.hmac_sha256(&label, data).unwrap(),
        tag,
        "first key kept"
    );

    let e = hsm
        .hmac_sha256(&f.label("approver-nobody"), data)
        .unwrap_err();
    assert_eq!(e.code(), "key_not_found", "{e}");

    assert!(hsm.delete_secret(&label).unwrap());
    assert!(!hsm.delete_secret(&label).unwrap());
    assert_eq!(
        hsm.hmac_sha256(&label, data).unwrap_err().code(),
        "key_not_found"
    );
}

/// The audit key is an Ed25519 key like the others (the ledger's
/// checkpoints are signed by it); its signatures verify, and the data
/// objects a backend keeps (e.g. the audit state) replace each other.
fn audit_key_and_data_objects(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let audit = hsm.generate_ed25519(&f.key("audit")).unwrap();
    let note = b"keyward checkpoint\n42\nroot\n";
    verify(&audit, note, &sign_verified(&*hsm, &audit, note).unwrap());

    let label = f.label("state");
    assert!(hsm.load_data(&label).unwrap().is_empty());
    hsm.store_data(&label, b"one").unwrap();
    hsm.store_data(&label, b"two").unwrap();
    assert_eq!(hsm.load_data(&label).unwrap(), vec![b"two".to_vec()]);
}

/// Random bytes have the asked length and differ between calls; health
/// passes.
fn random_and_health(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let a = hsm.random(32).unwrap();
    let b = hsm.random(32).unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(*a, *b);
    hsm.health().unwrap();
}

/// N threads sign at once through the executor; every signature verifies
/// and is the key's deterministic signature of that message.
fn concurrent_signing_through_the_executor(f: Box<dyn Fixture>) {
    const THREADS: usize = 8;
    const EACH: usize = 5;
    let hsm = f.hsm();
    let key = hsm.generate_ed25519(&f.key("hot")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let exec = Arc::new(
        HsmExecutor::start(
            Arc::clone(&hsm),
            ExecutorSettings {
                queue_depth: THREADS * EACH,
                ..ExecutorSettings::default()
            },
        )
        .unwrap(),
    );
    let barrier = Arc::new(std::sync::Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (exec, key, barrier) = (Arc::clone(&exec), key.clone(), Arc::clone(&barrier));
            let handle = rt.handle().clone();
            std::thread::spawn(move || {
                let via = exec.blocking(handle);
                barrier.wait();
                (0..EACH)
                    .map(|i| {
                        let msg = format!("thread {t} message {i}").into_bytes();
                        let sig = sign_verified(&via, &key, &msg).unwrap();
                        (msg, sig)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        for (msg, sig) in t.join().unwrap() {
            verify(&key, &msg, &sig);
            assert_eq!(hsm.sign_ed25519(&key, &msg).unwrap(), sig);
        }
    }
    assert!(exec.calls_finished() >= (THREADS * EACH) as u64);
}

/// The device goes away under a backend that holds keys: calls fail with
/// `hsm_unavailable` (never a panic, never a signature), health fails; when
/// it comes back the same backend object signs again by itself (no
/// re-open by the caller) with the same key.
fn recovers_after_an_outage(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let key = hsm.generate_ed25519(&f.key("hot")).unwrap();
    sign_verified(&*hsm, &key, b"before").unwrap();
    hsm.health().unwrap();

    f.outage().down();
    let e = sign_verified(&*hsm, &key, b"during").unwrap_err();
    assert_eq!(e.code(), "hsm_unavailable", "{e}");
    assert!(hsm.health().is_err(), "health sees the outage");

    f.outage().up();
    let deadline = Instant::now() + Duration::from_secs(30);
    let sig = loop {
        match sign_verified(&*hsm, &key, b"after") {
            Ok(sig) => break sig,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), "hsm_unavailable", "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("no recovery within 30 s: {e}"),
        }
    };
    verify(&key, b"after", &sig);
    hsm.health().unwrap();
    assert_eq!(hsm.find_ed25519(&key.name).unwrap(), key);
}

/// Errors carry stable snake_case codes: a signature from a key the
/// backend does not hold is refused (never a panic), and every code is
/// one of the documented ones.
fn errors_carry_stable_codes(f: Box<dyn Fixture>) {
    let hsm = f.hsm();
    let name = f.key("gone");
    let e = hsm.find_ed25519(&name).unwrap_err();
    assert_eq!(e.code(), "key_not_found");
    let e = hsm.hmac_sha256(&f.label("nothing"), b"x").unwrap_err();
    assert_eq!(e.code(), "key_not_found");
    let e = hsm
        .import_hmac_key(&f.label("dup"), &[2u8; 32])
        .and_then(|()| hsm.import_hmac_key(&f.label("dup"), &[2u8; 32]));
    assert_eq!(e.unwrap_err().code(), "key_exists");
    for e in [
        HsmError::KeyNotFound("k".into()),
        HsmError::KeyExists("k".into()),
        HsmError::BadSignature("k".into()),
    ] {
        let code = e.code();
        assert!(
            code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{code}"
        );
    }
}

macro_rules! contract {
    ($backend:ident, $factory:path, $outage:path) => {
        mod $backend {
            #[test]
            fn recovers_after_an_outage() {
                super::recovers_after_an_outage($outage());
            }
            #[test]
            fn destroyed_key_is_gone() {
                super::destroyed_key_is_gone($outage());
            }
            contract!(@each $factory;
                generated_key_is_found_with_the_same_public_key,
                signs_and_verifies,
                signatures_are_deterministic_and_distinct,
                missing_key_is_key_not_found,
                longest_names_work,
                generating_an_existing_name_is_key_exists,
                lists_generated_keys_sorted,
                hmac_approver_keys,
                audit_key_and_data_objects,
                random_and_health,
                concurrent_signing_through_the_executor,
                errors_carry_stable_codes,
            );
        }
    };
    (@each $factory:path; $($behaviour:ident),* $(,)?) => {
        $(
            #[test]
            fn $behaviour() {
                super::$behaviour($factory());
            }
        )*
    };
}

contract!(pkcs11, super::pkcs11, super::pkcs11_outage);
contract!(mock, super::mock, super::mock_outage);
contract!(yubihsm, super::yubihsm, super::yubihsm_outage);
