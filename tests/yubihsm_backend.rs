//! The YubiHSM 2 backend (src/hsm/yubihsm/) on the yubihsm crate's MockHsm,
//! for what MockHsm can show beyond the shared contract (tests/
//! hsm_contract.rs): the objects keyward creates, read back through a
//! second `yubihsm::Client` on the same MockHsm (capabilities, domains,
//! origin and labels, which MockHsm stores even though it does not enforce
//! them), and keys keyward must refuse, planted through that client.
//!
//! What MockHsm cannot show (capabilities and domains enforced, a wrapped
//! Ed25519 key round-tripping) is tested against SoftHSM2 where PKCS#11 has
//! the concept (tests/hsm_pkcs11.rs) and listed in the README as needing
//! hardware.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keyward::hsm::Hsm;
use keyward::hsm::yubihsm::names::{self, FIRST_ID};
use keyward::hsm::yubihsm::{YubiHsm, YubiHsmSettings};
use keyward::hsm::{HsmError, HsmKey};
use keyward::types::KeyName;
use yubihsm::object::{self, Filter, Origin};
use yubihsm::{Capability, Client, Connector, Credentials, Domain, asymmetric};

/// A fresh MockHsm: keyward's backend on it (domains and backups as
/// given) and an inspecting client (factory auth key 1) on the same device.
fn mock(domains: &[u8], exportable_under_wrap: bool) -> (YubiHsm, Client, Connector) {
    let connector = Connector::mockhsm();
    let hsm = on(&connector, domains, exportable_under_wrap);
    let client = Client::open(connector.clone(), Credentials::default(), true).unwrap();
    (hsm, client, connector)
}

/// Another keyward backend on the device behind `connector`.
fn on(connector: &Connector, domains: &[u8], exportable_under_wrap: bool) -> YubiHsm {
    YubiHsm::with_connector(
        connector.clone(),
        Credentials::default(),
        YubiHsmSettings {
            domains: domains.to_vec(),
            exportable_under_wrap,
            device: "mockhsm".into(),
        },
    )
    .unwrap()
}

fn name(s: &str) -> KeyName {
    KeyName::new(s).unwrap()
}

/// The one object of `t` labelled `label` on the device (as stored).
fn object_labelled(client: &Client, t: object::Type, label: &str) -> object::Info {
    let found = client
        .list_objects(&[Filter::Type(t), Filter::Label(label.into())])
        .unwrap();
    assert_eq!(
        found.len(),
        1,
        "{t:?} objects labelled {label:?}: {found:?}"
    );
    client.get_object_info(found[0].object_id, t).unwrap()
}

/// An Ed25519 key made by the inspecting client (ids below keyward's
/// [`FIRST_ID`], so keyward never picks the same id: MockHsm panics on
/// duplicates).
fn plant_generated(client: &Client, id: u16, label: &str, caps: Capability) {
    assert!(id < FIRST_ID);
    client
        .generate_asymmetric_key(
            id,
            label.into(),
            Domain::DOM1,
            caps,
            asymmetric::Algorithm::Ed25519,
        )
        .unwrap();
}

fn assert_unprotected(result: Result<HsmKey, HsmError>, why: &str) -> String {
    match result {
        Err(e @ HsmError::UnprotectedKey { .. }) => {
            assert_eq!(e.code(), "key_unprotected");
            let text = e.to_string();
            assert!(text.contains(why), "{text}");
            text
        }
        other => panic!("expected key_unprotected ({why}), got {other:?}"),
    }
}

#[test]
fn generated_ed25519_keys_can_only_sign_and_live_in_the_configured_domains() {
    let (hsm, client, _c) = mock(&[2, 5], false);
    let key = hsm.generate_ed25519(&name("hot")).unwrap();
    let info = object_labelled(&client, object::Type::AsymmetricKey, "hot");
    assert_eq!(
        info.capabilities,
        Capability::SIGN_EDDSA,
        "exactly sign-eddsa"
    );
    assert_eq!(info.domains, Domain::DOM2 | Domain::DOM5);
    assert_eq!(info.origin, Origin::Generated);
    assert_eq!(
        info.algorithm,
        yubihsm::Algorithm::Asymmetric(asymmetric::Algorithm::Ed25519)
    );
    assert!(info.object_id >= FIRST_ID);
    let public = client.get_public_key(info.object_id).unwrap();
    assert_eq!(public.as_ref(), &key.public_key.0[..]);

    // With backups asked for, exportable-under-wrap is added, nothing else.
    let (hsm, client, _c) = mock(&[1], true);
    hsm.generate_ed25519(&name("backed-up")).unwrap();
    let info = object_labelled(&client, object::Type::AsymmetricKey, "backed-up");
    assert_eq!(
        info.capabilities,
        Capability::SIGN_EDDSA | Capability::EXPORTABLE_UNDER_WRAP
    );
    assert_eq!(info.domains, Domain::DOM1);
}

#[test]
fn approver_hmac_keys_and_data_get_the_configured_domains_and_only_hmac_capabilities() {
    let (hsm, client, _c) = mock(&[3, 16], false);
    let short = "keyward-approver:alice";
    let long = format!("keyward-approver:{}", "b".repeat(64));
    assert!(long.len() > names::LABEL_MAX);
    let (k1, k2) = ([7u8; 32], [9u8; 32]);
    hsm.import_hmac_key(short, &k1).unwrap();
    hsm.import_hmac_key(&long, &k2).unwrap();
    for (label, key) in [(short, &k1), (long.as_str(), &k2)] {
        // Stored under the mapped label: the name itself, or its digest.
        let device_label = names::device_label(label);
        assert_eq!(device_label == label, label.len() <= names::LABEL_MAX);
        let info = object_labelled(&client, object::Type::HmacKey, &device_label);
        assert_eq!(
            info.capabilities,
            Capability::SIGN_HMAC | Capability::VERIFY_HMAC
        );
        assert_eq!(info.domains, Domain::DOM3 | Domain::DOM16);
        assert_eq!(
            info.algorithm,
            yubihsm::Algorithm::Hmac(yubihsm::hmac::Algorithm::Sha256)
        );
        // And the backend finds it again by the full label: the tag is the
        // software HMAC-SHA256 under the imported key.
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
        mac.update(b"approve intent 1");
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(
            hsm.hmac_sha256(label, b"approve intent 1").unwrap(),
            expected
        );
    }
    // Opaque data (checkpoint state and the like) in the same domains.
    hsm.store_data("keyward-state", b"v1").unwrap();
    let info = object_labelled(&client, object::Type::Opaque, "keyward-state");
    assert_eq!(info.domains, Domain::DOM3 | Domain::DOM16);
    assert_eq!(info.capabilities, Capability::empty());

    // With backups asked for, both may also be exported under wrap
    // (`keyward backup create` exports them with the keys), nothing else.
    let (hsm, client, _c) = mock(&[1], true);
    hsm.import_hmac_key(short, &k1).unwrap();
    let info = object_labelled(&client, object::Type::HmacKey, short);
    assert_eq!(
        info.capabilities,
        Capability::SIGN_HMAC | Capability::VERIFY_HMAC | Capability::EXPORTABLE_UNDER_WRAP
    );
    hsm.store_data("keyward-state", b"v1").unwrap();
    let info = object_labelled(&client, object::Type::Opaque, "keyward-state");
    assert_eq!(info.capabilities, Capability::EXPORTABLE_UNDER_WRAP);
}

#[test]
fn a_key_with_a_name_longer_than_a_label_is_listed_with_its_full_name() {
    let (hsm, client, _c) = mock(&[1], false);
    let long = "k".repeat(64);
    let made = hsm.generate_ed25519(&name(&long)).unwrap();
    hsm.generate_ed25519(&name("hot")).unwrap();
    // On the device: a hashed label and a name record holding the name.
    let label = names::device_label(&long);
    assert_eq!(label.len(), names::LABEL_MAX);
    assert!(label.starts_with('~'));
    object_labelled(&client, object::Type::AsymmetricKey, &label);
    let record = names::name_record_label(&label).unwrap();
    let info = object_labelled(&client, object::Type::Opaque, &record);
    assert_eq!(
        client.get_opaque(info.object_id).unwrap(),
        long.as_bytes().to_vec()
    );
    let listed = hsm.list_ed25519().unwrap();
    let names: Vec<&str> = listed.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["hot", long.as_str()]);
    assert_eq!(listed[1].public_key, made.public_key);
    // Found by the full name from another backend on the same device.
    let other = on(&_c, &[1], false);
    assert_eq!(
        other.find_ed25519(&name(&long)).unwrap().public_key,
        made.public_key
    );
}

#[test]
fn an_imported_key_is_refused_as_unprotected() {
    let (hsm, client, _c) = mock(&[1], false);
    // An Ed25519 seed known outside the device, with the right capability.
    let seed = [0x42u8; 32];
    client
        .put_asymmetric_key(
            0x0010,
            "imported".into(),
            Domain::DOM1,
            Capability::SIGN_EDDSA,
            asymmetric::Algorithm::Ed25519,
            seed.to_vec(),
        )
        .unwrap();
    let text = assert_unprotected(hsm.find_ed25519(&name("imported")), "origin is Imported");
    assert!(!text.contains("4242"), "no key material in errors: {text}");
    // Listing refuses it too rather than handing it out.
    assert!(matches!(
        hsm.list_ed25519(),
        Err(HsmError::UnprotectedKey { .. })
    ));
}

#[test]
fn an_exportable_key_is_refused_unless_backups_are_on() {
    let (hsm, client, connector) = mock(&[1], false);
    plant_generated(
        &client,
        0x0011,
        "exportable",
        Capability::SIGN_EDDSA | Capability::EXPORTABLE_UNDER_WRAP,
    );
    assert_unprotected(
        hsm.find_ed25519(&name("exportable")),
        "exportable-under-wrap is set but hsm.exportable_under_wrap is false",
    );
    // The same key, with hsm.exportable_under_wrap = true: accepted.
    let backups = on(&connector, &[1], true);
    let key = backups.find_ed25519(&name("exportable")).unwrap();
    let public = client.get_public_key(0x0011).unwrap();
    assert_eq!(public.as_ref(), &key.public_key.0[..]);
    let sig = backups.sign_ed25519(&key, b"m").unwrap();
    ed25519_dalek::VerifyingKey::from_bytes(&key.public_key.0)
        .unwrap()
        .verify_strict(b"m", &ed25519_dalek::Signature::from_bytes(&sig))
        .unwrap();
}

#[test]
fn a_key_that_may_do_more_than_sign_or_cannot_sign_is_refused() {
    let (hsm, client, connector) = mock(&[1], true);
    plant_generated(
        &client,
        0x0012,
        "too-mighty",
        Capability::SIGN_EDDSA | Capability::SIGN_ATTESTATION_CERTIFICATE,
    );
    plant_generated(&client, 0x0013, "cannot-sign", Capability::SIGN_ECDSA);
    plant_generated(&client, 0x0014, "just-right", Capability::SIGN_EDDSA);
    // Refused even with backups on: the extra capability is the fault.
    assert_unprotected(
        hsm.find_ed25519(&name("too-mighty")),
        "it may do more than sign",
    );
    let text = assert_unprotected(
        hsm.find_ed25519(&name("cannot-sign")),
        "capability sign-eddsa is missing",
    );
    assert!(text.contains("more than sign"), "{text}");
    // The checks are not simply refusing everything planted.
    hsm.find_ed25519(&name("just-right")).unwrap();
    on(&connector, &[1], false)
        .find_ed25519(&name("just-right"))
        .unwrap();
}
