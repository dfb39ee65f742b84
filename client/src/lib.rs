//! keyward-client: the wire types of the keyward agent API and Unix-socket clients.

pub mod wire;
