//! The objects `keyward hsm setup yubihsm` creates: fixed ids below
//! [`FIRST_ID`](crate::hsm::yubihsm::names::FIRST_ID) (the backend
//! allocates its own objects from there up), labels, capabilities,
//! delegated capabilities and domains. Pure: no device, no files.
//!
//! | id | type | label | role |
//! |---|---|---|---|
//! | 0x0002 | authentication-key | `keyward-signer` | keywardd's session: sign, keep approver HMAC keys and data objects |
//! | 0x0003 | authentication-key | `keyward-admin` | the operator: delete objects (retire keys, revoke an auth key), backups under wrap; never signs |
//! | 0x0004 | authentication-key | `keyward-audit` | the auditor: the device's log and options, read-only |
//! | 0x0010 | wrap-key (AES-256-CCM) | `keyward-backup` | only with `--backups`: exports and imports keys under wrap |

use yubihsm::{Capability, Domain, object};

/// The factory authentication key's id (password `password`).
pub const FACTORY_AUTH_KEY_ID: u16 = 1;
/// keywardd's authentication key.
pub const SIGNER_AUTH_KEY_ID: u16 = 0x0002;
/// The operator's authentication key.
pub const ADMIN_AUTH_KEY_ID: u16 = 0x0003;
/// The auditor's authentication key.
pub const AUDIT_AUTH_KEY_ID: u16 = 0x0004;
/// The wrap key for backups (with `--backups`).
pub const WRAP_KEY_ID: u16 = 0x0010;

/// What an object set-up creates is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// keywardd's authentication key.
    Signer,
    /// The operator's authentication key.
    Admin,
    /// The auditor's authentication key.
    Audit,
    /// The wrap key for backups.
    Wrap,
}

impl Role {
    /// The role's name, as printed and in credential file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Signer => "signer",
            Role::Admin => "admin",
            Role::Audit => "audit",
            Role::Wrap => "wrap",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One object set-up creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedObject {
    /// What it is for.
    pub role: Role,
    /// Its object id.
    pub id: u16,
    /// Its type.
    pub object_type: object::Type,
    /// Its label.
    pub label: &'static str,
    /// What it may do.
    pub capabilities: Capability,
    /// What the objects it creates or imports may do.
    pub delegated: Capability,
    /// Its domains.
    pub domains: Domain,
}

/// The capabilities keyward gives its own keys: Ed25519 keys sign, HMAC
/// keys sign and verify; with backups, both may be exported under wrap.
pub fn key_capabilities(backups: bool) -> Capability {
    let mut c = Capability::SIGN_EDDSA | Capability::SIGN_HMAC | Capability::VERIFY_HMAC;
    if backups {
        c |= Capability::EXPORTABLE_UNDER_WRAP;
    }
    c
}

/// What keywardd's session needs (see [`crate::hsm::yubihsm`]): sign with
/// Ed25519 keys it generates, import approver HMAC keys and sign and
/// verify with them, delete them when an approver is removed, keep data
/// (name records, the checkpoint mark) in opaque objects, and read random
/// bytes. It cannot delete or export Ed25519 keys, nor touch
/// authentication or wrap keys.
pub fn signer_capabilities() -> Capability {
    Capability::SIGN_EDDSA
        | Capability::SIGN_HMAC
        | Capability::VERIFY_HMAC
        | Capability::GENERATE_ASYMMETRIC_KEY
        | Capability::PUT_HMAC_KEY
        | Capability::DELETE_HMAC_KEY
        | Capability::GET_OPAQUE
        | Capability::PUT_OPAQUE
        | Capability::DELETE_OPAQUE
        | Capability::GET_PSEUDO_RANDOM
}

/// The operator's: delete any of keyward's objects (retire keys, remove
/// approvers, revoke an authentication key such as a leaked signer's),
/// read and write data objects, read device options; with backups, export
/// and import under wrap. It cannot sign, and cannot create
/// authentication keys (that would let it make itself a signer).
pub fn admin_capabilities(backups: bool) -> Capability {
    let mut c = Capability::DELETE_ASYMMETRIC_KEY
        | Capability::DELETE_HMAC_KEY
        | Capability::DELETE_OPAQUE
        | Capability::DELETE_AUTHENTICATION_KEY
        | Capability::GET_OPAQUE
        | Capability::PUT_OPAQUE
        | Capability::GET_OPTION;
    if backups {
        c |= Capability::EXPORT_WRAPPED | Capability::IMPORT_WRAPPED;
    }
    c
}

/// The auditor's: the device's log of commands and its options.
pub fn audit_capabilities() -> Capability {
    Capability::GET_LOG_ENTRIES | Capability::GET_OPTION
}

/// The objects set-up creates for objects in `domains`, in the order it
/// creates them (the wrap key only with `backups`).
pub fn plan(domains: Domain, backups: bool) -> Vec<PlannedObject> {
    let auth = object::Type::AuthenticationKey;
    let mut objects = vec![
        PlannedObject {
            role: Role::Signer,
            id: SIGNER_AUTH_KEY_ID,
            object_type: auth,
            label: "keyward-signer",
            capabilities: signer_capabilities(),
            delegated: key_capabilities(backups),
            domains,
        },
        PlannedObject {
            role: Role::Admin,
            id: ADMIN_AUTH_KEY_ID,
            object_type: auth,
            label: "keyward-admin",
            capabilities: admin_capabilities(backups),
            // Restored keys come back with their capabilities.
            delegated: if backups {
                key_capabilities(true)
            } else {
                Capability::empty()
            },
            domains,
        },
        PlannedObject {
            role: Role::Audit,
            id: AUDIT_AUTH_KEY_ID,
            object_type: auth,
            label: "keyward-audit",
            capabilities: audit_capabilities(),
            delegated: Capability::empty(),
            domains,
        },
    ];
    if backups {
        objects.push(PlannedObject {
            role: Role::Wrap,
            id: WRAP_KEY_ID,
            object_type: object::Type::WrapKey,
            label: "keyward-backup",
            capabilities: Capability::EXPORT_WRAPPED | Capability::IMPORT_WRAPPED,
            delegated: key_capabilities(true),
            domains,
        });
    }
    objects
}

/// `caps` as the device's names (`sign-eddsa, sign-hmac`), or `none`.
pub fn capability_names(caps: Capability) -> String {
    let names: Vec<String> = caps
        .iter()
        .map(|c| {
            let mut s = String::new();
            match std::fmt::write(&mut s, format_args!("{c}")) {
                Ok(()) => s,
                Err(_) => format!("{:#x}", c.bits()),
            }
        })
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The domain numbers (1-16) in `domains`.
pub fn domain_numbers(domains: Domain) -> Vec<u8> {
    (1u8..=16)
        .filter(|n| Domain::at(usize::from(*n)).is_ok_and(|d| domains.contains(d)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_below_the_backends_own_and_distinct() {
        let objects = plan(Domain::DOM1, true);
        assert_eq!(objects.len(), 4);
        for o in &objects {
            assert!(o.id > FACTORY_AUTH_KEY_ID);
            assert!(o.id < crate::hsm::yubihsm::names::FIRST_ID);
            assert!(o.label.len() <= crate::hsm::yubihsm::names::LABEL_MAX);
        }
        assert_eq!(plan(Domain::DOM1, false).len(), 3, "no wrap key");
    }

    #[test]
    fn only_the_signer_signs_and_no_one_creates_authentication_keys() {
        let sign = Capability::SIGN_EDDSA | Capability::SIGN_HMAC;
        for o in plan(Domain::DOM1, true) {
            assert_eq!(!(o.capabilities & sign).is_empty(), o.role == Role::Signer);
            assert!(!o.capabilities.contains(Capability::PUT_AUTHENTICATION_KEY));
        }
        assert!(!signer_capabilities().contains(Capability::DELETE_ASYMMETRIC_KEY));
        assert!(!signer_capabilities().contains(Capability::EXPORT_WRAPPED));
    }

    #[test]
    fn capability_and_domain_names() {
        assert_eq!(
            capability_names(Capability::SIGN_EDDSA | Capability::SIGN_HMAC),
            "sign-eddsa, sign-hmac"
        );
        assert_eq!(capability_names(Capability::empty()), "none");
        assert_eq!(domain_numbers(Domain::DOM1 | Domain::DOM3), vec![1, 3]);
    }
}
