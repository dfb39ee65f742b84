//! Keys that are already on the token when keyward looks for them: a key
//! pair labelled like a policy key but created without protection (its
//! private key readable or extractable, or ever so) is refused by name,
//! by the backend and by keywardd at start.
//!
//! The unprotected pairs are made on the instance's real SoftHSM2 token
//! with cryptoki in this process, which needs `SOFTHSM2_CONF` (read once,
//! when the module is initialized): this file has a single test that sets
//! it first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use keyward::hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm, context, find_token};
use keyward::hsm::softhsm::conf_path;
use keyward::hsm::{Hsm, HsmError};
use keyward::types::KeyName;
use secrecy::SecretString;

use common::*;

/// DER of the Ed25519 curve OID 1.3.101.112.
const ED25519_OID_DER: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

/// A logged-in read-write session on the instance's token.
fn user_session(inst: &Instance) -> Session {
    let module = inst.config_value("module");
    let ctx = context(module.as_ref()).unwrap();
    let slot = find_token(&ctx, &inst.config_value("token_label")).unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    let pin = std::fs::read_to_string(inst.config_value("pin_file")).unwrap();
    session
        .login(
            UserType::User,
            Some(&SecretString::from(pin.trim().to_owned())),
        )
        .unwrap();
    session
}

fn objects_labelled(session: &Session, label: &str) -> Vec<ObjectHandle> {
    session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()
}

/// Destroys the key pair `label` and makes a new one on the token with the
/// same label, private, whose private key is neither sensitive nor
/// protected from extraction. Returns the private key's handle.
fn replace_with_unprotected_pair(session: &Session, label: &str) -> ObjectHandle {
    for h in objects_labelled(session, label) {
        session.destroy_object(h).unwrap();
    }
    let public = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(ED25519_OID_DER.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(vec![7; 16]),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Sign(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(vec![7; 16]),
    ];
    let (_, private) = session
        .generate_key_pair(&Mechanism::EccEdwardsKeyPairGen, &public, &private)
        .unwrap();
    private
}

fn pkcs11(inst: &Instance) -> Pkcs11Hsm {
    Pkcs11Hsm::open(&Pkcs11Config {
        module: inst.config_value("module").into(),
        token_label: inst.config_value("token_label"),
        pin_file: inst.config_value("pin_file").into(),
        max_sessions: 2,
    })
    .unwrap()
}

#[test]
fn keys_found_on_the_token_without_protection_are_refused_by_name() {
    let mut inst = Instance::init();
    // SAFETY: the only test (and thread) of this binary; it loads the module
    // later, on this thread.
    #[allow(unsafe_code)]
    unsafe {
        keyward::process::set_env_single_threaded("SOFTHSM2_CONF", &conf_path(inst.inst_dir()))
    };
    let hot = KeyName::new("hot").unwrap();

    // The key `keyward init` generated is protected and found.
    {
        let hsm = pkcs11(&inst);
        let key = hsm.find_ed25519(&hot).unwrap();
        assert_eq!(key.public_key.to_base58(), inst.hot.to_string());
    }

    // Replaced by a pair whose private key can be read and wrapped out.
    let session = user_session(&inst);
    let private = replace_with_unprotected_pair(&session, "hot");
    let hsm = pkcs11(&inst);
    let e = hsm.find_ed25519(&hot).unwrap_err();
    match &e {
        HsmError::UnprotectedKey { key, weaknesses } => {
            assert_eq!(key, "hot");
            assert_eq!(
                weaknesses,
                "CKA_SENSITIVE is false, CKA_EXTRACTABLE is true, \
                 CKA_ALWAYS_SENSITIVE is false, CKA_NEVER_EXTRACTABLE is false"
            );
        }
        other => panic!("expected UnprotectedKey, got {other:?}"),
    }
    assert_eq!(e.code(), "key_unprotected");
    assert!(e.to_string().contains("\"hot\""), "{e}");
    // keywardd refuses to start, naming the key and the attributes.
    let (code, log) = inst.start_refused(&[]);
    assert_ne!(code, 0, "{log}");
    for part in [
        "key \"hot\"",
        "not protected",
        "CKA_SENSITIVE is false",
        "CKA_EXTRACTABLE is true",
    ] {
        assert!(log.contains(part), "{part:?} missing from: {log}");
    }
    assert!(!inst.agent_socket.exists(), "nothing was served");

    // Made sensitive and non-extractable afterwards, the key was readable
    // once: still refused.
    session
        .update_attributes(
            private,
            &[Attribute::Sensitive(true), Attribute::Extractable(false)],
        )
        .unwrap();
    let attrs = hsm.private_key_attributes(&hot);
    // private_key_attributes reads without judging; find judges.
    let attrs = attrs.unwrap();
    assert!(attrs.sensitive && !attrs.extractable, "{attrs:?}");
    match hsm.find_ed25519(&hot).unwrap_err() {
        HsmError::UnprotectedKey { key, weaknesses } => {
            assert_eq!(key, "hot");
            assert_eq!(
                weaknesses,
                "CKA_ALWAYS_SENSITIVE is false, CKA_NEVER_EXTRACTABLE is false"
            );
        }
        other => panic!("expected UnprotectedKey, got {other:?}"),
    }
    let (code, log) = inst.start_refused(&[]);
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("key \"hot\"") && log.contains("CKA_ALWAYS_SENSITIVE is false"),
        "{log}"
    );

    // A key generated inside the token under the same name is used again.
    for h in objects_labelled(&session, "hot") {
        session.destroy_object(h).unwrap();
    }
    let fresh = hsm.generate_ed25519(&hot).unwrap();
    assert_eq!(hsm.find_ed25519(&hot).unwrap(), fresh);
    drop(session);
    drop(hsm);
    inst.start();
    let keys = rt().block_on(inst.client().keys()).unwrap();
    let text = format!("{keys:?}");
    assert!(text.contains(&fresh.public_key.to_base58()), "{text}");

    // A policy naming an unprotected key on the token is refused at reload;
    // the policy in force stays.
    let session = user_session(&inst);
    replace_with_unprotected_pair(&session, "spare");
    drop(session);
    let policy = std::fs::read_to_string(&inst.policy).unwrap();
    let hash_before = rt().block_on(inst.client().policy()).unwrap().policy_hash;
    let recorded_before = recorded_entries(&inst);
    assert!(policy.contains("keys = [\"hot\"]"), "{policy}");
    std::fs::write(
        &inst.policy,
        policy.replace("keys = [\"hot\"]", "keys = [\"hot\", \"spare\"]"),
    )
    .unwrap();
    let out = inst.keyward(&["policy", "reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"spare\"") && err.contains("CKA_SENSITIVE is false"),
        "{err}"
    );
    let view = rt().block_on(inst.client().policy()).unwrap();
    assert_eq!(view.policy_hash, hash_before);
    assert_eq!(view.keys, ["hot"]);
    assert_eq!(
        recorded_entries(&inst),
        recorded_before,
        "a refused reload records nothing"
    );
    assert!(inst.stop().success());
}
