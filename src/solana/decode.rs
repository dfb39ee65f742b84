//! Strict decoding of legacy and v0 Solana messages.
//!
//! Every length is checked against the bytes that remain, compact lengths
//! must be canonical, indexes must be in range, account keys must be
//! distinct, and nothing may follow the message. The checks cover the
//! runtime's own sanitization rules so a message that decodes here is one
//! the network would also accept structurally.

use std::collections::HashSet;

use super::PACKET_DATA_SIZE;
use crate::types::PublicKey;

/// Why message bytes were refused. Each variant has a stable snake_case
/// [`code`](DecodeError::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end before the field being read.
    #[error("message is truncated: {field} needs {needed} more bytes at offset {offset}")]
    Truncated {
        /// What was being read.
        field: &'static str,
        /// Byte offset where it starts.
        offset: usize,
        /// Bytes missing.
        needed: usize,
    },
    /// Bytes remain after the message.
    #[error("{count} trailing bytes after the message at offset {offset}")]
    TrailingBytes {
        /// Where the message ended.
        offset: usize,
        /// How many bytes follow it.
        count: usize,
    },
    /// A compact length is not in its shortest form or exceeds 65535.
    #[error("invalid compact length for {field} at offset {offset}")]
    InvalidLength {
        /// What was being read.
        field: &'static str,
        /// Byte offset of the length.
        offset: usize,
    },
    /// A versioned message with a version other than 0.
    #[error("unsupported message version {0}")]
    UnsupportedVersion(u8),
    /// The header counts are inconsistent with the account keys.
    #[error("invalid message header: {0}")]
    InvalidHeader(String),
    /// The same account key appears twice.
    #[error("account key {0} appears more than once")]
    DuplicateAccount(PublicKey),
    /// An index points outside the accounts.
    #[error(
        "instruction {instruction}: {what} index {index} is out of range ({available} accounts)"
    )]
    IndexOutOfRange {
        /// Instruction position.
        instruction: usize,
        /// Which index.
        what: &'static str,
        /// The index found.
        index: u8,
        /// Number of accounts available to it.
        available: usize,
    },
    /// An address table lookup is malformed.
    #[error("address table lookup {lookup}: {problem}")]
    InvalidLookup {
        /// Lookup position.
        lookup: usize,
        /// What is wrong.
        problem: String,
    },
    /// The transaction would exceed the network's packet size.
    #[error("transaction would be {size} bytes; the network accepts at most {max}")]
    TooLarge {
        /// Size of the signed transaction.
        size: usize,
        /// The maximum.
        max: usize,
    },
}

impl DecodeError {
    /// Stable snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
            DecodeError::InvalidLength { .. } => "invalid_length",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::InvalidHeader(_) => "invalid_header",
            DecodeError::DuplicateAccount(_) => "duplicate_account",
            DecodeError::IndexOutOfRange { .. } => "index_out_of_range",
            DecodeError::InvalidLookup { .. } => "invalid_lookup",
            DecodeError::TooLarge { .. } => "too_large",
        }
    }
}

/// Message format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageVersion {
    /// The original format without address lookup tables.
    Legacy,
    /// Version 0, with address lookup tables.
    V0,
}

/// One instruction as it appears in the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledInstruction {
    /// Index of the program id among the static account keys.
    pub program_id_index: u8,
    /// Indexes of the accounts passed, into static then loaded accounts.
    pub accounts: Vec<u8>,
    /// Instruction data.
    pub data: Vec<u8>,
}

/// A v0 address table lookup: accounts loaded from an on-chain table,
/// which keyward cannot see offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressTableLookup {
    /// The lookup table account.
    pub account_key: PublicKey,
    /// Indexes into the table of accounts loaded writable.
    pub writable_indexes: Vec<u8>,
    /// Indexes into the table of accounts loaded read-only.
    pub readonly_indexes: Vec<u8>,
}

/// A decoded, structurally valid message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedMessage {
    /// Format.
    pub version: MessageVersion,
    /// Signatures required; the first that many account keys sign.
    pub num_required_signatures: u8,
    /// Of the signers, how many (the last ones) are read-only.
    pub num_readonly_signed: u8,
    /// Of the non-signers, how many (the last static ones) are read-only.
    pub num_readonly_unsigned: u8,
    /// The static account keys; the first is the fee payer.
    pub account_keys: Vec<PublicKey>,
    /// The recent blockhash (or nonce) the message is bound to.
    pub recent_blockhash: [u8; 32],
    /// Instructions in execution order.
    pub instructions: Vec<CompiledInstruction>,
    /// v0 address table lookups (empty for legacy).
    pub lookups: Vec<AddressTableLookup>,
}

impl DecodedMessage {
    /// Number of accounts loaded from lookup tables.
    pub fn num_loaded(&self) -> usize {
        self.lookups
            .iter()
            .map(|l| l.writable_indexes.len() + l.readonly_indexes.len())
            .sum()
    }

    /// The static key at `index`, or `None` when the index refers to an
    /// account loaded from a lookup table (or is out of range).
    pub fn static_key(&self, index: u8) -> Option<PublicKey> {
        self.account_keys.get(usize::from(index)).copied()
    }

    /// Whether account `index` signs the message.
    pub fn is_signer(&self, index: usize) -> bool {
        index < usize::from(self.num_required_signatures)
    }

    /// Whether account `index` (static or loaded) is writable.
    pub fn is_writable(&self, index: usize) -> bool {
        let signers = usize::from(self.num_required_signatures);
        let statics = self.account_keys.len();
        if index < signers {
            index < signers - usize::from(self.num_readonly_signed)
        } else if index < statics {
            index < statics - usize::from(self.num_readonly_unsigned)
        } else {
            let writable_loaded: usize =
                self.lookups.iter().map(|l| l.writable_indexes.len()).sum();
            index < statics + writable_loaded
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let remaining = self.bytes.len() - self.pos;
        if n > remaining {
            return Err(DecodeError::Truncated {
                field,
                offset: self.pos,
                needed: n - remaining,
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    fn array32(&mut self, field: &'static str) -> Result<[u8; 32], DecodeError> {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.take(32, field)?);
        Ok(out)
    }

    /// A compact-u16 ("short vec") length: 1-3 bytes, 7 bits each, in its
    /// shortest form and at most 65535.
    fn compact_len(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let start = self.pos;
        let invalid = || DecodeError::InvalidLength {
            field,
            offset: start,
        };
        let mut value: u32 = 0;
        for i in 0..3 {
            let byte = self.u8(field)?;
            let bits = u32::from(byte & 0x7f);
            // A zero final byte after the first is a longer-than-needed form.
            if i > 0 && byte == 0 {
                return Err(invalid());
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return if value > u32::from(u16::MAX) {
                    Err(invalid())
                } else {
                    Ok(value as usize)
                };
            }
            if i == 2 {
                return Err(invalid());
            }
        }
        Err(invalid())
    }

    fn bytes_vec(&mut self, field: &'static str) -> Result<Vec<u8>, DecodeError> {
        let n = self.compact_len(field)?;
        Ok(self.take(n, field)?.to_vec())
    }
}

fn compact_len_size(n: usize) -> usize {
    match n {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        _ => 3,
    }
}

/// Decodes a legacy or v0 message, refusing anything malformed.
pub fn decode_message(bytes: &[u8]) -> Result<DecodedMessage, DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    let first = r.u8("header")?;
    let (version, num_required_signatures) = if first & 0x80 != 0 {
        let v = first & 0x7f;
        if v != 0 {
            return Err(DecodeError::UnsupportedVersion(v));
        }
        (MessageVersion::V0, r.u8("header")?)
    } else {
        (MessageVersion::Legacy, first)
    };
    let num_readonly_signed = r.u8("header")?;
    let num_readonly_unsigned = r.u8("header")?;

    let n_keys = r.compact_len("account keys")?;
    let mut account_keys = Vec::with_capacity(n_keys.min(256));
    let mut seen = HashSet::with_capacity(n_keys.min(256));
    for _ in 0..n_keys {
        let key = PublicKey(r.array32("account key")?);
        if !seen.insert(key) {
            return Err(DecodeError::DuplicateAccount(key));
        }
        account_keys.push(key);
    }
    let recent_blockhash = r.array32("recent blockhash")?;

    let n_ix = r.compact_len("instructions")?;
    let mut instructions = Vec::with_capacity(n_ix.min(256));
    for _ in 0..n_ix {
        let program_id_index = r.u8("program id index")?;
        let accounts = r.bytes_vec("instruction accounts")?;
        let data = r.bytes_vec("instruction data")?;
        instructions.push(CompiledInstruction {
            program_id_index,
            accounts,
            data,
        });
    }

    let mut lookups = Vec::new();
    if version == MessageVersion::V0 {
        let n_lookups = r.compact_len("address table lookups")?;
        for _ in 0..n_lookups {
            let account_key = PublicKey(r.array32("lookup table address")?);
            let writable_indexes = r.bytes_vec("lookup writable indexes")?;
            let readonly_indexes = r.bytes_vec("lookup readonly indexes")?;
            lookups.push(AddressTableLookup {
                account_key,
                writable_indexes,
                readonly_indexes,
            });
        }
    }
    if r.pos != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            offset: r.pos,
            count: bytes.len() - r.pos,
        });
    }

    let msg = DecodedMessage {
        version,
        num_required_signatures,
        num_readonly_signed,
        num_readonly_unsigned,
        account_keys,
        recent_blockhash,
        instructions,
        lookups,
    };
    sanitize(&msg)?;
    let signatures = usize::from(num_required_signatures);
    let size = compact_len_size(signatures) + 64 * signatures + bytes.len();
    if size > PACKET_DATA_SIZE {
        return Err(DecodeError::TooLarge {
            size,
            max: PACKET_DATA_SIZE,
        });
    }
    Ok(msg)
}

/// The runtime's structural rules, applied before anything looks at the
/// instructions.
fn sanitize(m: &DecodedMessage) -> Result<(), DecodeError> {
    let header = |s: String| Err(DecodeError::InvalidHeader(s));
    let statics = m.account_keys.len();
    let signers = usize::from(m.num_required_signatures);
    if signers == 0 {
        return header("no required signatures, so no fee payer".into());
    }
    if m.num_readonly_signed >= m.num_required_signatures {
        return header("the fee payer must be writable, but every signer is read-only".into());
    }
    if signers + usize::from(m.num_readonly_unsigned) > statics {
        return header(format!(
            "{signers} signers and {} read-only unsigned accounts need more than the {statics} account keys",
            m.num_readonly_unsigned
        ));
    }
    let mut tables = HashSet::new();
    for (i, l) in m.lookups.iter().enumerate() {
        if l.writable_indexes.is_empty() && l.readonly_indexes.is_empty() {
            return Err(DecodeError::InvalidLookup {
                lookup: i,
                problem: "it loads no accounts".into(),
            });
        }
        if !tables.insert(l.account_key) {
            return Err(DecodeError::InvalidLookup {
                lookup: i,
                problem: format!("table {} is looked up twice", l.account_key),
            });
        }
    }
    let total = statics + m.num_loaded();
    if total > 256 {
        return header(format!("{total} accounts; at most 256 can be addressed"));
    }
    for (i, ix) in m.instructions.iter().enumerate() {
        let p = usize::from(ix.program_id_index);
        // The fee payer cannot be a program, and programs cannot come from
        // lookup tables.
        if p == 0 || p >= statics {
            return Err(DecodeError::IndexOutOfRange {
                instruction: i,
                what: "program id",
                index: ix.program_id_index,
                available: statics,
            });
        }
        for &a in &ix.accounts {
            if usize::from(a) >= total {
                return Err(DecodeError::IndexOutOfRange {
                    instruction: i,
                    what: "account",
                    index: a,
                    available: total,
                });
            }
        }
    }
    Ok(())
}

/// Writes a compact-u16 length.
pub(super) fn push_compact_len(out: &mut Vec<u8>, n: usize) {
    let mut n = n;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    /// A legacy message: payer 1, recipient 2, program 3; one instruction.
    fn legacy() -> Vec<u8> {
        let mut m = vec![1, 0, 1, 3];
        for k in 1..=3 {
            m.extend_from_slice(&key(k));
        }
        m.extend_from_slice(&key(9));
        m.extend_from_slice(&[1, 2, 2, 0, 1, 3, 7, 7, 7]);
        m
    }

    #[test]
    fn decodes_a_legacy_message() {
        let m = decode_message(&legacy()).unwrap();
        assert_eq!(m.version, MessageVersion::Legacy);
        assert_eq!(m.account_keys.len(), 3);
        assert_eq!(m.recent_blockhash, key(9));
        assert_eq!(m.instructions[0].accounts, vec![0, 1]);
        assert_eq!(m.instructions[0].data, vec![7, 7, 7]);
        assert!(m.is_signer(0) && !m.is_signer(1));
        assert!(m.is_writable(0) && m.is_writable(1) && !m.is_writable(2));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let good = legacy();
        for n in 0..good.len() {
            let e = decode_message(&good[..n]).unwrap_err();
            assert_eq!(e.code(), "truncated", "prefix of {n} bytes: {e}");
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut m = legacy();
        m.push(0);
        assert_eq!(decode_message(&m).unwrap_err().code(), "trailing_bytes");
    }

    #[test]
    fn compact_lengths_must_be_canonical() {
        let mut r = Reader {
            bytes: &[0x80, 0x00],
            pos: 0,
        };
        assert!(matches!(
            r.compact_len("x"),
            Err(DecodeError::InvalidLength { .. })
        ));
        let mut r = Reader {
            bytes: &[0xff, 0xff, 0x04],
            pos: 0,
        };
        assert!(matches!(
            r.compact_len("x"),
            Err(DecodeError::InvalidLength { .. })
        ));
        let mut r = Reader {
            bytes: &[0xff, 0xff, 0x03],
            pos: 0,
        };
        assert_eq!(r.compact_len("x").unwrap(), 65535);
        for n in [0usize, 1, 127, 128, 16383, 16384, 65535] {
            let mut v = Vec::new();
            push_compact_len(&mut v, n);
            assert_eq!(v.len(), compact_len_size(n));
            let mut r = Reader { bytes: &v, pos: 0 };
            assert_eq!(r.compact_len("x").unwrap(), n);
        }
    }

    #[test]
    fn header_and_index_rules() {
        let mut m = legacy();
        m[0] = 0;
        assert_eq!(decode_message(&m).unwrap_err().code(), "invalid_header");
        let mut m = legacy();
        m[1] = 1; // the only signer read-only
        assert_eq!(decode_message(&m).unwrap_err().code(), "invalid_header");
        let mut m = legacy();
        m[2] = 3; // 1 signer + 3 read-only unsigned > 3 keys
        assert_eq!(decode_message(&m).unwrap_err().code(), "invalid_header");
        let mut m = legacy();
        let ix = 4 + 96 + 32 + 1;
        m[ix] = 0; // the fee payer as program
        assert_eq!(decode_message(&m).unwrap_err().code(), "index_out_of_range");
        let mut m = legacy();
        m[ix + 2] = 3; // account index past the keys
        assert_eq!(decode_message(&m).unwrap_err().code(), "index_out_of_range");
        let mut m = legacy();
        m[4 + 32..4 + 64].copy_from_slice(&key(1));
        assert_eq!(decode_message(&m).unwrap_err().code(), "duplicate_account");
        let mut m = legacy();
        m.insert(0, 0x81);
        assert_eq!(
            decode_message(&m).unwrap_err().code(),
            "unsupported_version"
        );
    }

    #[test]
    fn v0_lookups_extend_the_index_range() {
        let mut m = legacy();
        m.insert(0, 0x80);
        // Account index 3 refers to the first loaded account.
        let ix = 1 + 4 + 96 + 32 + 1;
        m[ix + 3] = 3;
        let mut lookup = m.clone();
        lookup.push(1);
        lookup.extend_from_slice(&key(5));
        lookup.extend_from_slice(&[1, 4, 0]);
        let d = decode_message(&lookup).unwrap();
        assert_eq!(d.version, MessageVersion::V0);
        assert_eq!(d.num_loaded(), 1);
        assert!(d.static_key(3).is_none());
        assert!(d.is_writable(3));
        // Without the lookup the index is out of range.
        m.push(0);
        assert_eq!(decode_message(&m).unwrap_err().code(), "index_out_of_range");
        // An empty lookup is refused.
        let mut empty = m.clone();
        empty.pop();
        empty.push(1);
        empty.extend_from_slice(&key(5));
        empty.extend_from_slice(&[0, 0]);
        assert_eq!(decode_message(&empty).unwrap_err().code(), "invalid_lookup");
    }

    #[test]
    fn oversized_messages_are_refused() {
        let mut m = legacy();
        let ix = 4 + 96 + 32 + 1;
        // Replace the 3-byte data with 1100 bytes.
        m.truncate(ix + 4);
        push_compact_len(&mut m, 1100);
        m.extend(std::iter::repeat_n(1u8, 1100));
        assert_eq!(decode_message(&m).unwrap_err().code(), "too_large");
    }
}
