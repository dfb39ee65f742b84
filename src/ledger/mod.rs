//! The durable, hash-chained ledger.
