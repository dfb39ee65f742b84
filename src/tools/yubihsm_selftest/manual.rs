//! The checks of `keyward hsm selftest` that only a real device, or
//! credentials other than the signer's, can prove: printed with the exact
//! `yubihsm-shell` commands.

use super::SelftestSettings;
use super::report::ManualCheck;
use crate::tools::yubihsm_setup::plan;

/// `-C` of yubihsm-shell: `yhusb://` for USB.
pub(super) fn connector_url(device: &str) -> String {
    match device.strip_prefix("usb") {
        Some("") => "yhusb://".to_owned(),
        Some(serial) => format!("yhusb://serial={}", serial.trim_start_matches(':')),
        None => device.to_owned(),
    }
}

/// The checks only a real device, or other credentials, can prove.
pub fn manual_checks(s: &SelftestSettings) -> Vec<ManualCheck> {
    let c = connector_url(&s.device);
    let signer = s.auth_key_id;
    let admin = plan::ADMIN_AUTH_KEY_ID;
    let wrap = plan::WRAP_KEY_ID;
    let d = s
        .domains
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let other = (1u8..=16).find(|n| !s.domains.contains(n)).unwrap_or(16);
    let mut checks = vec![
        ManualCheck {
            what: "signing with the signer key on an Ed25519 key without sign-eddsa must fail"
                .to_owned(),
            commands: vec![
                format!(
                    "yubihsm-shell -C {c} --authkey {signer} -a generate-asymmetric-key -i 0 -l nosign -d {d} -c none -A ed25519"
                ),
                format!(
                    "echo test > msg; yubihsm-shell -C {c} --authkey {signer} -a sign-eddsa -i ID -A ed25519 --in msg   # must fail: insufficient permissions"
                ),
                format!(
                    "yubihsm-shell -C {c} --authkey {admin} -a delete-object -i ID -t asymmetric-key"
                ),
            ],
        },
        ManualCheck {
            what: format!("the signer key cannot see objects of another domain (here {other})"),
            commands: vec![
                format!(
                    "# on a device with an object in domain {other} (e.g. before set-up, with the factory key): note its ID"
                ),
                format!(
                    "yubihsm-shell -C {c} --authkey {signer} -a get-object-info -i ID -t opaque   # must fail: object not found"
                ),
            ],
        },
        ManualCheck {
            what: "the signer key cannot export keys, nor create authentication keys".to_owned(),
            commands: vec![
                format!(
                    "yubihsm-shell -C {c} --authkey {signer} -a get-wrapped -i KEYID -t asymmetric-key -w {wrap:#06x} --out k.wrap   # must fail"
                ),
                format!(
                    "yubihsm-shell -C {c} --authkey {signer} -a put-authentication-key -i 0 -l x -d {d} -c sign-eddsa   # must fail"
                ),
            ],
        },
        ManualCheck {
            what:
                "the factory key is gone: a session with key 1 and password \"password\" must fail"
                    .to_owned(),
            commands: vec![format!(
                "yubihsm-shell -C {c} --authkey 1 -a list-objects   # password: password; must fail"
            )],
        },
    ];
    if s.exportable_under_wrap {
        checks.push(ManualCheck {
            what: "backups: export_wrapped of a key, then import_wrapped, gives the same public key \
                   (MockHsm's Ed25519 export does not round-trip; prove it on the device, with a throw-away key)"
                .to_owned(),
            commands: vec![
                format!("yubihsm-shell -C {c} --authkey {signer} -a generate-asymmetric-key -i 0 -l wraptest -d {d} -c sign-eddsa,exportable-under-wrap -A ed25519"),
                format!("yubihsm-shell -C {c} --authkey {signer} -a get-public-key -i ID --out before.pub"),
                format!("yubihsm-shell -C {c} --authkey {admin} -a get-wrapped -i ID -t asymmetric-key -w {wrap:#06x} --out key.wrap"),
                format!("yubihsm-shell -C {c} --authkey {admin} -a delete-object -i ID -t asymmetric-key"),
                format!("yubihsm-shell -C {c} --authkey {admin} -a put-wrapped -w {wrap:#06x} --in key.wrap"),
                format!("yubihsm-shell -C {c} --authkey {signer} -a get-public-key -i ID --out after.pub && cmp before.pub after.pub"),
                format!("yubihsm-shell -C {c} --authkey {admin} -a delete-object -i ID -t asymmetric-key"),
            ],
        });
    }
    checks
}
