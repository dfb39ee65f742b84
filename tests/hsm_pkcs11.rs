//! The PKCS#11 backend against a real SoftHSM2 token provisioned in a
//! temporary directory.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, when the module is initialized, and
//! the environment is process-wide; so this file has a single test that sets
//! it first and then runs every scenario in order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use keyward::hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use keyward::hsm::softhsm::{conf_path, provision_dev_token};
use keyward::hsm::{Hsm, HsmError, sign_verified};
use keyward::types::KeyName;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn cfg(label: &str, pin: &std::path::Path) -> Pkcs11Config {
    Pkcs11Config {
        module: MODULE.into(),
        token_label: label.into(),
        pin_file: pin.to_path_buf(),
        max_sessions: 4,
    }
}

#[test]
fn pkcs11_backend_on_a_real_softhsm_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // SAFETY: this is the only test (and thread) of this binary that touches
    // the environment, and it does so before the module is loaded.
    #[allow(unsafe_code)]
    unsafe {
        keyward::process::set_env_single_threaded("SOFTHSM2_CONF", &conf_path(dir))
    };

    // Provisioning: conf, token dir, a 0400 PIN file.
    let token = provision_dev_token(dir, MODULE.as_ref(), "kw-test").unwrap();
    let mode = std::fs::metadata(&token.pin_file)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o400);
    assert!(token.token_dir.is_dir());
    assert!(
        std::fs::read_to_string(&token.conf_file)
            .unwrap()
            .contains(token.token_dir.to_str().unwrap())
    );

    // Unknown label, wrong PIN, loose PIN file.
    let e = Pkcs11Hsm::open(&cfg("no-such-token", &token.pin_file)).unwrap_err();
    assert!(matches!(e, HsmError::TokenNotFound(_)), "{e}");
    let wrong = dir.join("wrong-pin");
    std::fs::write(&wrong, "not-the-pin").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o400)).unwrap();
    let e = Pkcs11Hsm::open(&cfg("kw-test", &wrong)).unwrap_err();
    assert!(matches!(e, HsmError::Login { .. }), "{e}");
    let loose = dir.join("loose-pin");
    std::fs::copy(&token.pin_file, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Pkcs11Hsm::open(&cfg("kw-test", &loose)).unwrap_err();
    assert!(matches!(e, HsmError::Pin(_)), "{e}");

    let hsm = Arc::new(Pkcs11Hsm::open(&cfg("kw-test", &token.pin_file)).unwrap());
    hsm.health().unwrap();
    let hot = KeyName::new("hot").unwrap();
    assert!(matches!(
        hsm.find_ed25519(&hot),
        Err(HsmError::KeyNotFound(_))
    ));

    // Generation inside the token; found again by label.
    let key = hsm.generate_ed25519(&hot).unwrap();
    assert_eq!(hsm.find_ed25519(&hot).unwrap(), key);
    assert!(matches!(
        hsm.generate_ed25519(&hot),
        Err(HsmError::KeyExists(_))
    ));

    // The private key object is sensitive and not extractable, and its value
    // cannot be read.
    let attrs = hsm.private_key_attributes(&hot).unwrap();
    assert!(attrs.token, "{attrs:?}");
    assert!(attrs.private, "{attrs:?}");
    assert!(attrs.sensitive, "{attrs:?}");
    assert!(!attrs.extractable, "{attrs:?}");
    assert!(
        attrs.always_sensitive && attrs.never_extractable,
        "{attrs:?}"
    );
    assert!(attrs.key_type_ec_edwards, "{attrs:?}");
    assert!(attrs.is_protected());
    assert_eq!(
        hsm.try_read_private_value(&hot).unwrap(),
        None,
        "CKA_VALUE must not be readable"
    );

    // Signatures verify against the public key (ed25519-dalek, strict).
    let msg = b"keyward test message";
    let sig = sign_verified(&*hsm, &key, msg).unwrap();
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.public_key.0).unwrap();
    vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig))
        .unwrap();
    // A key whose public half does not match is caught by the software check.
    let mut forged = key.clone();
    forged.public_key.0 = ed25519_dalek::SigningKey::from_bytes(&[5; 32])
        .verifying_key()
        .to_bytes();
    assert!(matches!(
        sign_verified(&*hsm, &forged, msg),
        Err(HsmError::BadSignature(_))
    ));

    // A second handle in the same process shares the initialized module.
    let again = Pkcs11Hsm::open(&cfg("kw-test", &token.pin_file)).unwrap();
    assert_eq!(again.find_ed25519(&hot).unwrap(), key);

    // Concurrent signing through the pool: 8 threads × 50 signatures on 4 sessions.
    let cold = hsm
        .generate_ed25519(&KeyName::new("cold").unwrap())
        .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let hsm = Arc::clone(&hsm);
            let key = if t % 2 == 0 {
                key.clone()
            } else {
                cold.clone()
            };
            std::thread::spawn(move || {
                for i in 0..50 {
                    let m = format!("message {t}/{i}");
                    sign_verified(&*hsm, &key, m.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    let names: Vec<String> = hsm
        .list_ed25519()
        .unwrap()
        .into_iter()
        .map(|k| k.name.to_string())
        .collect();
    assert_eq!(names, ["cold", "hot"]);

    // Data objects (the checkpoint mark): private to the logged-in user,
    // persistent, not modifiable in place; a store replaces every earlier
    // object of the label, and a new handle on the token reads the newest.
    assert!(hsm.load_data("mark").unwrap().is_empty());
    hsm.store_data("mark", b"first").unwrap();
    assert_eq!(hsm.load_data("mark").unwrap(), vec![b"first".to_vec()]);
    hsm.store_data("mark", b"second").unwrap();
    assert_eq!(hsm.load_data("mark").unwrap(), vec![b"second".to_vec()]);
    assert_eq!(
        hsm.data_object_attributes("mark").unwrap(),
        vec![(true, true, false)]
    );
    assert!(hsm.load_data("other").unwrap().is_empty());
    assert_eq!(again.load_data("mark").unwrap(), vec![b"second".to_vec()]);

    // Lost state: the sessions are closed, the module is finalized and
    // initialized again, the user logs in again; keys are found and sign as
    // before, and a new handle shares the new context.
    drop(again);
    hsm.reopen_now().unwrap();
    sign_verified(&*hsm, &key, msg).unwrap();
    sign_verified(&*hsm, &cold, msg).unwrap();
    hsm.health().unwrap();
    let again = Pkcs11Hsm::open(&cfg("kw-test", &token.pin_file)).unwrap();
    assert_eq!(again.find_ed25519(&hot).unwrap(), key);
    // Re-opens are rate-limited.
    let e = hsm.reopen_now().unwrap_err();
    assert!(matches!(e, HsmError::StateLost { .. }), "{e}");
    // Data objects live in the token, not the session: they survive it.
    assert_eq!(hsm.load_data("mark").unwrap(), vec![b"second".to_vec()]);
}
