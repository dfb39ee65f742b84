//! The approver registry, an operator action: enrolling (a key made in the
//! HSM, given out once) and removing approvers, each recorded in the ledger.

use base64::Engine as _;
use keyward_client::wire::codes;
use zeroize::Zeroizing;

use super::{Operations, SubmitError};
use crate::approval::{self, store};
use crate::hsm::HsmOp;
use crate::ledger::LedgerError;
use crate::ledger::events::{ApproverAdded, ApproverRemoved};

impl Operations {
    /// Enrolls an approver: 32 random bytes from the HSM become a
    /// sensitive, non-extractable HMAC key in the HSM, `approver_added` is
    /// recorded, and the key is returned once for the approver's key file.
    pub async fn add_approver(
        &self,
        name: &str,
        by: &str,
    ) -> Result<Zeroizing<Vec<u8>>, SubmitError> {
        crate::types::AgentName::new(name).map_err(|e| SubmitError::BadRequest {
            code: codes::INVALID_REQUEST,
            message: e.to_string().replace("agent name", "approver name"),
        })?;
        let reader = self.core.ledger.reader()?;
        if store::approver(&reader, name)
            .map_err(LedgerError::Sqlite)?
            .is_some()
        {
            return Err(SubmitError::BadRequest {
                code: "approver_exists",
                message: format!("approver {name:?} exists or was removed; a name is never reused"),
            });
        }
        drop(reader);
        let label = approval::key_label(name);
        let key = self
            .core
            .hsm
            .call(HsmOp::ImportHmac, move |hsm| {
                let key = hsm.random(32)?;
                hsm.import_hmac_key(&label, &key)?;
                Ok(key)
            })
            .await
            .map_err(SubmitError::Hsm)?;
        let (n, b) = (name.to_owned(), by.to_owned());
        let recorded = self
            .core
            .ledger
            .write(move |txn| {
                let now = txn.now_ms();
                store::add_approver(txn.conn(), &n, now)?;
                let added = ApproverAdded {
                    key_label: approval::key_label(&n),
                    approver: n,
                    by: b,
                };
                txn.record(None, None, &added)
            })
            .await;
        if let Err(e) = recorded {
            // Not recorded, so not enrolled: the key must not linger.
            let _ = self
                .core
                .hsm
                .delete_secret(&approval::key_label(name))
                .await;
            return Err(e.into());
        }
        Ok(key)
    }

    /// Removes an approver: recorded, then the key is destroyed. Their
    /// tokens stop counting at once.
    pub async fn remove_approver(&self, name: &str, by: &str) -> Result<u64, SubmitError> {
        let (n, b) = (name.to_owned(), by.to_owned());
        let seq = self
            .core
            .ledger
            .write(move |txn| {
                let now = txn.now_ms();
                if !store::remove_approver(txn.conn(), &n, now)? {
                    return Ok(None);
                }
                let removed = ApproverRemoved { approver: n, by: b };
                Ok(Some(txn.record(None, None, &removed)?.seq.0))
            })
            .await?
            .ok_or(SubmitError::NotFound)?;
        if let Err(e) = self
            .core
            .hsm
            .delete_secret(&approval::key_label(name))
            .await
        {
            tracing::error!(approver = name, error = %e, "approver removed, but destroying the key failed; it no longer counts");
        }
        Ok(seq)
    }

    /// Every approver with their state.
    pub fn approvers(&self) -> Result<Vec<store::ApproverRecord>, SubmitError> {
        let reader = self.core.ledger.reader()?;
        Ok(store::approvers(&reader).map_err(LedgerError::Sqlite)?)
    }
}

/// Base64url of an approver key, for the admin answer.
pub fn encode_key(key: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key))
}
