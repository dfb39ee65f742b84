//! Operations on a whole instance that run beside keywardd: backups
//! (create, verify, restore); key rotation and drills will join them.

pub mod backup;
