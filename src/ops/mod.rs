//! Operations on a whole instance that run beside keywardd: backups
//! (create, verify, restore) and drills (disaster recovery, rotation).

pub mod backup;
pub mod drill;
