//! A blocking [`Hsm`] whose every call goes through the executor.

use super::{HsmExecutor, HsmOp};
use crate::hsm::{Hsm, HsmError, HsmKey};
use crate::types::KeyName;

/// A blocking view of an [`HsmExecutor`] ([`HsmExecutor::blocking`]).
pub struct Blocking<'a> {
    pub(super) executor: &'a HsmExecutor,
    pub(super) runtime: tokio::runtime::Handle,
}

impl Blocking<'_> {
    fn run<T, F>(&self, op: HsmOp, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hsm) -> Result<T, HsmError> + Send + 'static,
    {
        self.runtime.block_on(self.executor.call(op, f))
    }
}

impl Hsm for Blocking<'_> {
    fn backend(&self) -> &'static str {
        self.executor.backend
    }
    fn workers(&self) -> usize {
        self.executor.workers
    }
    fn generate_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        let name = name.clone();
        self.run(HsmOp::Generate, move |h| h.generate_ed25519(&name))
    }
    fn find_ed25519(&self, name: &KeyName) -> Result<HsmKey, HsmError> {
        let name = name.clone();
        self.run(HsmOp::Find, move |h| h.find_ed25519(&name))
    }
    fn list_ed25519(&self) -> Result<Vec<HsmKey>, HsmError> {
        self.run(HsmOp::List, |h| h.list_ed25519())
    }
    fn destroy_ed25519(&self, key: &HsmKey) -> Result<(), HsmError> {
        let key = key.clone();
        self.run(HsmOp::DestroyKey, move |h| h.destroy_ed25519(&key))
    }
    fn sign_ed25519(&self, key: &HsmKey, message: &[u8]) -> Result<[u8; 64], HsmError> {
        let (key, message) = (key.clone(), message.to_vec());
        self.run(HsmOp::Sign, move |h| h.sign_ed25519(&key, &message))
    }
    fn random(&self, len: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, HsmError> {
        self.run(HsmOp::Random, move |h| h.random(len))
    }
    fn import_hmac_key(&self, label: &str, key: &[u8]) -> Result<(), HsmError> {
        let (label, key) = (label.to_owned(), zeroize::Zeroizing::new(key.to_vec()));
        self.run(HsmOp::ImportHmac, move |h| h.import_hmac_key(&label, &key))
    }
    fn hmac_sha256(&self, label: &str, data: &[u8]) -> Result<[u8; 32], HsmError> {
        let (label, data) = (label.to_owned(), data.to_vec());
        self.run(HsmOp::Hmac, move |h| h.hmac_sha256(&label, &data))
    }
    fn verify_hmac_sha256(
        &self,
        label: &str,
        data: &[u8],
        tag: &[u8; 32],
    ) -> Result<bool, HsmError> {
        let (label, data, tag) = (label.to_owned(), data.to_vec(), *tag);
        self.run(HsmOp::Hmac, move |h| {
            h.verify_hmac_sha256(&label, &data, &tag)
        })
    }
    fn delete_secret(&self, label: &str) -> Result<bool, HsmError> {
        let label = label.to_owned();
        self.run(HsmOp::DeleteSecret, move |h| h.delete_secret(&label))
    }
    fn store_data(&self, label: &str, value: &[u8]) -> Result<(), HsmError> {
        let (label, value) = (label.to_owned(), value.to_vec());
        self.run(HsmOp::StoreData, move |h| h.store_data(&label, &value))
    }
    fn load_data(&self, label: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        let label = label.to_owned();
        self.run(HsmOp::LoadData, move |h| h.load_data(&label))
    }
    fn health(&self) -> Result<(), HsmError> {
        self.run(HsmOp::Health, |h| h.health())
    }
}
