//! keywardd's services, independent of the transport: the signing service
//! ([`Signer`]) and the operations service ([`Operations`]), both over one
//! shared [`Core`].
//!
//! The request path of the signing service:
//!
//! ```text
//! prepare (pure) -> ledger txn A: intent_received, policy_evaluated, reserve spend
//!   -> HSM sign + software verify (no lock held) -> ledger txn B: signature_created,
//!   spend confirmed -> response
//! ```
//! Nothing is released before txn B is durably committed. If anything fails
//! between A and B, the reservation stays counted (fail closed) until
//! [`Operations::recover`] records the interruption and releases it.
//!
//! Which actions belong to which service is set out in [`operations`].

mod approvals;
mod approvers;
pub mod backups;
pub mod checkpoints;
mod decision;
pub mod drills;
mod error;
pub mod freeze;
pub mod history;
pub mod keys;
pub mod operations;
mod prepare;
mod relay;
pub mod rotation;
mod shared;
mod signer;
mod submit;
pub mod sweep;
mod views;

pub use approvals::ApprovalOutcome;
pub use approvers::encode_key;
pub use backups::{BackupSignError, BackupSignRequest, BackupSignature};
pub use drills::{DrillError, DrillReport, LastDrill, MAX_DRILL_AGE_DAYS};
pub use error::{BreakerError, ReloadError, SubmitError};
pub use freeze::{Freeze, FreezeError, FreezeOutcome, FreezeScope, Frozen, Unfrozen};
pub use keys::{CreatedKey, KeyCreateError, new_key_name};
pub use operations::{AUDIT_BREAKER, Operations, ReloadOutcome};
pub use shared::{Core, Keys, RetiringKeys};
pub use signer::{Signer, SubmitOutcome};
pub use submit::denial_body;
