//! How keyward's names become YubiHSM labels and object ids.
//!
//! A YubiHSM label holds at most 40 bytes, while a key name may have 64 and
//! an approver's secret label 81. A name of at most 40 bytes is its own
//! label; a longer one is replaced by `~` and 39 hex digits of the SHA-256
//! of the name (no key name, approver label or data label starts with `~`,
//! so the two forms cannot meet). For an Ed25519 key with a hashed label,
//! keyward also stores the full name in an opaque object labelled `=` and
//! the same digits, so listing keys can give their names back.
//!
//! Object ids are 16-bit and unique per object type. keyward picks the
//! lowest id from [`FIRST_ID`] that no object of the type uses: the device
//! runs one command at a time and keywardd is its only writer, so the
//! listing and the creation cannot be raced by keyward itself (a real
//! device refuses a taken id; `keyward hsm setup yubihsm` keeps its own
//! objects below [`FIRST_ID`]).

use sha2::{Digest, Sha256};

/// Longest YubiHSM label.
pub const LABEL_MAX: usize = 40;

/// The first object id keyward gives to objects it creates while running.
pub const FIRST_ID: u16 = 0x0100;

/// The last object id (0xffff is not an object id on the device).
pub const LAST_ID: u16 = 0xfffe;

/// The device label of `name`: `name` itself when it fits and cannot be
/// mistaken for a hashed label, `~` and 39 hex digits of its SHA-256
/// otherwise.
pub fn device_label(name: &str) -> String {
    if name.len() <= LABEL_MAX && !name.starts_with('~') && !name.starts_with('=') {
        name.to_owned()
    } else {
        format!("~{}", &digest_hex(name)[..LABEL_MAX - 1])
    }
}

/// The label of the opaque object that holds the full name behind a hashed
/// key label, `None` for a label that is the name itself.
pub fn name_record_label(device_label: &str) -> Option<String> {
    device_label.strip_prefix('~').map(|h| format!("={h}"))
}

/// The lowest id from [`FIRST_ID`] not in `taken`, if any is left.
pub fn free_id(taken: &[u16]) -> Option<u16> {
    let mut taken: Vec<u16> = taken.iter().copied().filter(|id| *id >= FIRST_ID).collect();
    taken.sort_unstable();
    taken.dedup();
    let mut candidate = FIRST_ID;
    for id in taken {
        if id > candidate {
            break;
        }
        if id == candidate {
            if candidate == LAST_ID {
                return None;
            }
            candidate += 1;
        }
    }
    Some(candidate)
}

fn digest_hex(name: &str) -> String {
    hex::encode(Sha256::digest(name.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_their_own_label_and_long_ones_a_digest() {
        assert_eq!(device_label("hot"), "hot");
        let forty = "a".repeat(40);
        assert_eq!(device_label(&forty), forty);
        let long = format!("keyward-approver:{}", "b".repeat(64));
        let label = device_label(&long);
        assert_eq!(label.len(), LABEL_MAX);
        assert!(label.starts_with('~'));
        assert_ne!(
            label,
            device_label(&format!("{long}c")),
            "distinct names, distinct labels"
        );
        assert_eq!(label, device_label(&long), "stable");
        // A name that looks hashed is hashed itself, so it cannot collide.
        assert_ne!(device_label(&label), label);
        assert_eq!(name_record_label("hot"), None);
        assert_eq!(
            name_record_label(&label).unwrap(),
            format!("={}", &label[1..])
        );
    }

    #[test]
    fn free_ids_start_at_the_first_id_and_fill_gaps() {
        assert_eq!(free_id(&[]), Some(FIRST_ID));
        assert_eq!(free_id(&[1, 2, 3]), Some(FIRST_ID));
        assert_eq!(free_id(&[FIRST_ID, FIRST_ID + 2]), Some(FIRST_ID + 1));
        assert_eq!(free_id(&[FIRST_ID + 1, FIRST_ID]), Some(FIRST_ID + 2));
        let all: Vec<u16> = (FIRST_ID..=LAST_ID).collect();
        assert_eq!(free_id(&all), None);
    }
}
