//! Tenant secrets: values a tenant sets once (`PUT /v1/secrets/{name}`)
//! and its functions get as environment variables when deployed with them.
//!
//! A value is sealed before it reaches the store, with XChaCha20-Poly1305
//! under the host's secrets key (`GUST_SECRETS_KEY`, or a key generated in
//! `<data-dir>/secrets.key`, mode 0600), its tenant and name bound in as
//! associated data so that a sealed value cannot be moved to another
//! tenant or name. Hosts sharing a store need the same key. The host keeps
//! the sealed values of every tenant in memory (loaded at start, reloaded
//! when the store says they changed) and opens the ones a call needs when
//! it starts: an invocation makes no store round trip for them, and a
//! value set or rotated is what the next call sees.
//!
//! Values are never logged, never in records: what a function prints of
//! one verbatim is replaced by `[secret NAME]` in its captured output.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::{Service, ServiceError};
use crate::store::{MetaStore, SecretPut, SecretRecord, StoreError, now_millis};

/// Names and values, sorted by name: an environment or a configuration.
type Pairs = Arc<[(String, String)]>;

/// The largest secret value, in bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// The longest secret name.
const MAX_NAME_LEN: usize = 128;

/// Values shorter than this are not redacted from captured output: a
/// two-letter value would garble everything a function prints.
const MIN_REDACTED_LEN: usize = 4;

/// Why the host's secrets key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretsKeyError {
    /// `GUST_SECRETS_KEY` or the key file does not hold a 256-bit key.
    #[error(
        "{0} must hold a 256-bit key: 64 hex digits or 44 characters of base64 (make one with `openssl rand -hex 32`)"
    )]
    Malformed(String),
    /// The key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The host's key for sealing secrets.
pub(crate) struct SecretsKey {
    cipher: XChaCha20Poly1305,
    /// The console's session-signing key, derived from this one: every
    /// host sharing a store (and so this key) accepts the same sessions,
    /// and a new secrets key ends every session.
    session: Zeroizing<[u8; 32]>,
    /// A digest of the key (not the key), stored with each sealed value so
    /// that one sealed under another key is reported as such.
    id: String,
}

impl fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretsKey").field("id", &self.id).finish()
    }
}

/// `GUST_SECRETS_KEY` as given: shown nowhere, not even in `Debug`.
#[derive(Clone)]
pub struct SecretsKeyText(pub String);

impl fmt::Debug for SecretsKeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretsKeyText(<redacted>)")
    }
}

/// The file a host keeps its generated key in, under its data directory.
pub(crate) const KEY_FILE: &str = "secrets.key";

impl SecretsKey {
    /// The key `GUST_SECRETS_KEY` gives (`from_env`), or the one in
    /// `<data_dir>/secrets.key`, generated there (mode 0600) at the first
    /// start.
    ///
    /// # Errors
    /// A malformed key, or a key file that cannot be read or written.
    pub(crate) fn load(data_dir: &Path, from_env: Option<&str>) -> Result<Self, SecretsKeyError> {
        if let Some(text) = from_env {
            return parse_key(text)
                .map(Self::new)
                .ok_or_else(|| SecretsKeyError::Malformed("GUST_SECRETS_KEY".into()));
        }
        let path = data_dir.join(KEY_FILE);
        let io = |source| SecretsKeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                warn_if_readable_by_others(&path);
                parse_key(&text)
                    .map(Self::new)
                    .ok_or_else(|| SecretsKeyError::Malformed(path.display().to_string()))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut key = Zeroizing::new([0u8; 32]);
                getrandom::fill(&mut key[..]).map_err(|e| io(std::io::Error::other(e)))?;
                let text = Zeroizing::new(format!("{}\n", hex::encode(&key[..])));
                std::fs::create_dir_all(data_dir).map_err(io)?;
                write_private(&path, text.as_bytes()).map_err(io)?;
                tracing::info!(path = %path.display(), "generated the host's secrets key");
                Ok(Self::new(key))
            }
            Err(error) => Err(io(error)),
        }
    }

    fn new(key: Zeroizing<[u8; 32]>) -> Self {
        let id = Sha256::new()
            .chain_update(b"gust secrets key id\0")
            .chain_update(&key[..])
            .finalize();
        Self {
            cipher: XChaCha20Poly1305::new((&*key).into()),
            session: Zeroizing::new(blake3::derive_key("gust console session v1", &key[..])),
            id: hex::encode(&id[..8]),
        }
    }

    /// A MAC of `data` under the console's session key.
    pub(crate) fn session_mac(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.session, data).as_bytes()
    }

    /// The key's id (a digest, safe to show).
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// `value` sealed for `tenant`'s secret `name`: nonce, then ciphertext.
    fn seal(&self, tenant: &str, name: &str, value: &[u8]) -> Result<Vec<u8>, ServiceError> {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce)
            .map_err(|e| ServiceError::Internal(format!("no randomness for a nonce: {e}")))?;
        let aad = associated_data(tenant, name);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: &aad,
                },
            )
            .map_err(|_| ServiceError::Internal("sealing a secret failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The value of `record`, or why it cannot be had.
    fn open(&self, record: &SecretRecord) -> Result<Zeroizing<String>, String> {
        if record.key_id != self.id {
            return Err(format!(
                "it was sealed with another secrets key (id {}; this host's is {}): give every host the same GUST_SECRETS_KEY",
                record.key_id, self.id
            ));
        }
        let Some((nonce, sealed)) = record.sealed.split_at_checked(24) else {
            return Err("its sealed value is truncated".into());
        };
        let aad = associated_data(&record.tenant, &record.name);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| "its sealed value does not open (altered, or moved)".to_owned())?;
        let plain = Zeroizing::new(plain);
        std::str::from_utf8(&plain)
            .map(|text| Zeroizing::new(text.to_owned()))
            .map_err(|_| "its value is not UTF-8".to_owned())
    }
}

/// What a sealed value is bound to: its tenant and name.
fn associated_data(tenant: &str, name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(tenant.len() + name.len() + 16);
    aad.extend_from_slice(b"gust secret\0");
    aad.extend_from_slice(tenant.as_bytes());
    aad.push(0);
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// 64 hex digits or base64 of 32 bytes, surrounding whitespace ignored.
fn parse_key(text: &str) -> Option<Zeroizing<[u8; 32]>> {
    use base64::Engine as _;
    let text = text.trim();
    let bytes = Zeroizing::new(if text.len() == 64 {
        hex::decode(text).ok()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?
    });
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return None;
    }
    key.copy_from_slice(&bytes);
    Some(key)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(metadata) = std::fs::metadata(path)
            && metadata.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "the secrets key file is readable by others than its owner; chmod 600 it");
        }
    }
}

/// `^[A-Z_][A-Z0-9_]{0,127}$`: a name that is an environment variable.
pub fn valid_secret_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_uppercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && name.len() <= MAX_NAME_LEN
}

/// A secret as the API shows it: never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    /// Its name.
    pub name: String,
    /// First set.
    pub created_at: u64,
    /// Last set.
    pub updated_at: u64,
}

impl From<&SecretRecord> for SecretInfo {
    fn from(record: &SecretRecord) -> Self {
        Self {
            name: record.name.clone(),
            created_at: record.created_at,
            updated_at: record.updated_at,
        }
    }
}

/// The sealed secrets of every tenant, as the host holds them.
type Sealed = HashMap<String, Arc<HashMap<String, SecretRecord>>>;

/// Every tenant's sealed secrets, kept in step with the store, and the key
/// that opens them.
pub(crate) struct Secrets {
    key: SecretsKey,
    sealed: RwLock<Arc<Sealed>>,
}

impl Secrets {
    /// The key that seals them.
    pub(crate) fn key(&self) -> &SecretsKey {
        &self.key
    }

    /// Loads every tenant's sealed secrets from `store`.
    pub(crate) fn load(key: SecretsKey, store: &dyn MetaStore) -> Result<Self, StoreError> {
        let secrets = Self {
            key,
            sealed: RwLock::new(Arc::new(HashMap::new())),
        };
        secrets.reload(store)?;
        Ok(secrets)
    }

    /// Reads every tenant's sealed secrets from `store` again.
    pub(crate) fn reload(&self, store: &dyn MetaStore) -> Result<(), StoreError> {
        let mut sealed: HashMap<String, HashMap<String, SecretRecord>> = HashMap::new();
        for record in store.all_secrets()? {
            sealed
                .entry(record.tenant.clone())
                .or_default()
                .insert(record.name.clone(), record);
        }
        let sealed = sealed
            .into_iter()
            .map(|(tenant, secrets)| (tenant, Arc::new(secrets)))
            .collect();
        if let Ok(mut current) = self.sealed.write() {
            *current = Arc::new(sealed);
        }
        Ok(())
    }

    /// Reads `tenant`'s sealed secrets from `store` again (after this host
    /// changed them), leaving the other tenants' as they are.
    pub(crate) fn reload_tenant(
        &self,
        store: &dyn MetaStore,
        tenant: &str,
    ) -> Result<(), StoreError> {
        let held: HashMap<String, SecretRecord> = store
            .secrets(tenant)?
            .into_iter()
            .map(|record| (record.name.clone(), record))
            .collect();
        if let Ok(mut current) = self.sealed.write() {
            let mut sealed = Sealed::clone(&current);
            if held.is_empty() {
                sealed.remove(tenant);
            } else {
                sealed.insert(tenant.to_owned(), Arc::new(held));
            }
            *current = Arc::new(sealed);
        }
        Ok(())
    }

    fn tenant(&self, tenant: &str) -> Option<Arc<HashMap<String, SecretRecord>>> {
        self.sealed.read().ok()?.get(tenant).cloned()
    }

    /// The values of `names` for a call of `function` of `tenant`, opened.
    ///
    /// # Errors
    /// [`ServiceError::SecretMissing`] for a secret deleted since the
    /// deploy; [`ServiceError::SecretUnreadable`] for one this host's key
    /// does not open.
    pub(crate) fn open(
        &self,
        tenant: &str,
        function: &str,
        names: &[String],
    ) -> Result<Vec<(String, Zeroizing<String>)>, ServiceError> {
        let held = self.tenant(tenant).unwrap_or_default();
        names
            .iter()
            .map(|name| {
                let record = held.get(name).ok_or_else(|| ServiceError::SecretMissing {
                    function: function.to_owned(),
                    name: name.clone(),
                })?;
                let value =
                    self.key
                        .open(record)
                        .map_err(|reason| ServiceError::SecretUnreadable {
                            name: name.clone(),
                            reason,
                        })?;
                Ok((name.clone(), value))
            })
            .collect()
    }

    /// Which of `names` the tenant has no secret of.
    fn missing(&self, tenant: &str, names: &[String]) -> Vec<String> {
        let held = self.tenant(tenant).unwrap_or_default();
        names
            .iter()
            .filter(|name| !held.contains_key(*name))
            .cloned()
            .collect()
    }
}

/// `text` with every value of `values` (long enough to be recognised)
/// replaced by `[secret NAME]`.
pub(crate) fn redact(text: &str, values: &[(String, Zeroizing<String>)]) -> String {
    let mut text = text.to_owned();
    // Longest first: a value containing another is replaced whole.
    let mut by_length: Vec<&(String, Zeroizing<String>)> = values
        .iter()
        .filter(|(_, value)| value.len() >= MIN_REDACTED_LEN)
        .collect();
    by_length.sort_by_key(|(_, value)| std::cmp::Reverse(value.len()));
    for (name, value) in by_length {
        if text.contains(value.as_str()) {
            text = text.replace(value.as_str(), &format!("[secret {name}]"));
        }
    }
    text
}

impl Service {
    /// Sets the tenant's secret `name` to `value`; true when it is new.
    ///
    /// # Errors
    /// [`ServiceError::InvalidSecret`] for a bad name or value,
    /// [`ServiceError::SecretQuota`] beyond the policy's `max_secrets`, or
    /// a store failure.
    pub fn put_secret(
        &self,
        tenant: &str,
        name: &str,
        value: &[u8],
    ) -> Result<(SecretInfo, bool), ServiceError> {
        check_secret_name(name)?;
        if value.is_empty() {
            return Err(ServiceError::InvalidSecret(format!(
                "the value of secret {name} is empty"
            )));
        }
        if value.len() > MAX_SECRET_BYTES {
            return Err(ServiceError::InvalidSecret(format!(
                "the value of secret {name} is {} bytes, above the limit of {MAX_SECRET_BYTES}",
                value.len()
            )));
        }
        let text = std::str::from_utf8(value).map_err(|_| {
            ServiceError::InvalidSecret(format!(
                "the value of secret {name} is not UTF-8 text (it becomes an environment variable)"
            ))
        })?;
        if text.contains('\0') {
            return Err(ServiceError::InvalidSecret(format!(
                "the value of secret {name} contains a NUL byte, which an environment variable cannot hold"
            )));
        }
        let now = now_millis();
        let record = SecretRecord {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            key_id: self.secrets.key.id().to_owned(),
            sealed: self.secrets.key.seal(tenant, name, value)?,
            created_at: now,
            updated_at: now,
        };
        let max = self.policy(tenant).max_secrets;
        let put = self.store.put_secret(&record, max)?;
        if put == SecretPut::AtLimit {
            return Err(ServiceError::SecretQuota { limit: max });
        }
        // The next call sees it, on this host at once (others when the
        // store tells them).
        self.secrets.reload_tenant(self.store.as_ref(), tenant)?;
        // As stored: a replaced secret keeps its first `created_at`.
        let stored = self
            .secrets
            .tenant(tenant)
            .and_then(|held| held.get(name).map(SecretInfo::from))
            .unwrap_or_else(|| SecretInfo::from(&record));
        tracing::info!(%tenant, secret = %name, created = put == SecretPut::Created, "secret set");
        Ok((stored, put == SecretPut::Created))
    }

    /// The tenant's secrets: names and times, never values.
    ///
    /// # Errors
    /// A store failure.
    pub fn secrets(&self, tenant: &str) -> Result<Vec<SecretInfo>, ServiceError> {
        Ok(self
            .store
            .secrets(tenant)?
            .iter()
            .map(SecretInfo::from)
            .collect())
    }

    /// Deletes the tenant's secret `name`. Functions deployed with it fail
    /// their calls with `secret-missing` until it is set again or they are
    /// deployed without it.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn delete_secret(&self, tenant: &str, name: &str) -> Result<(), ServiceError> {
        check_secret_name(name)?;
        if !self.store.delete_secret(tenant, name)? {
            return Err(ServiceError::NotFound(format!("no secret {name}")));
        }
        self.secrets.reload_tenant(self.store.as_ref(), tenant)?;
        tracing::info!(%tenant, secret = %name, "secret deleted");
        Ok(())
    }

    /// Checks the secrets a deploy names: valid names the tenant has, each
    /// once; returns them sorted.
    ///
    /// # Errors
    /// [`ServiceError::InvalidSecret`] naming what is wrong.
    pub fn deploy_secrets(
        &self,
        tenant: &str,
        names: &[String],
    ) -> Result<Vec<String>, ServiceError> {
        let mut names = names.to_vec();
        for name in &names {
            check_secret_name(name)?;
        }
        names.sort();
        names.dedup();
        let missing = self.secrets.missing(tenant, &names);
        if !missing.is_empty() {
            return Err(ServiceError::InvalidSecret(format!(
                "no secret {} (set it first: gust secrets set NAME)",
                missing.join(", ")
            )));
        }
        Ok(names)
    }

    /// The environment and configuration of a call of `function`:
    /// - environment: the policy's `env` and the function's secrets (a
    ///   secret wins over a policy variable of the same name);
    /// - configuration (`wasi:config`): the policy's `[config]`, the
    ///   function's own values over it, its secrets over both.
    pub(crate) fn function_grants(
        &self,
        function: &crate::store::FunctionRecord,
        policy_env: &Pairs,
        policy_config: &Pairs,
    ) -> Result<(Pairs, Pairs), ServiceError> {
        let opened = if function.secrets.is_empty() {
            Vec::new()
        } else {
            self.secrets
                .open(&function.tenant, &function.name, &function.secrets)?
        };
        let mut config: std::collections::BTreeMap<&str, &str> = policy_config
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        config.extend(
            function
                .config
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        config.extend(opened.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let config: Pairs = config
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if opened.is_empty() {
            return Ok((Arc::clone(policy_env), config));
        }
        let mut env: Vec<(String, String)> = policy_env
            .iter()
            .filter(|(name, _)| !opened.iter().any(|(secret, _)| secret == name))
            .cloned()
            .collect();
        env.extend(
            opened
                .iter()
                .map(|(name, value)| (name.clone(), value.as_str().to_owned())),
        );
        env.sort();
        Ok((env.into(), config))
    }

    /// `function`'s secret values, for redacting what it printed; empty
    /// when it has none or they cannot be opened.
    pub(crate) fn secret_values(
        &self,
        function: &crate::store::FunctionRecord,
    ) -> Vec<(String, Zeroizing<String>)> {
        if function.secrets.is_empty() {
            return Vec::new();
        }
        self.secrets
            .open(&function.tenant, &function.name, &function.secrets)
            .unwrap_or_default()
    }

    /// Follows other hosts' changes to secrets (a shared store's
    /// notifications), reloading the sealed values at each.
    pub(crate) fn follow_secrets(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let mut changed = self.store.secrets_changed();
        let service = Arc::downgrade(self);
        tokio::spawn(async move {
            while changed.changed().await.is_ok() {
                let Some(service) = service.upgrade() else {
                    return;
                };
                let reloaded = tokio::task::spawn_blocking(move || {
                    service.secrets.reload(service.store.as_ref())
                })
                .await;
                match reloaded {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "could not reload secrets after a change")
                    }
                    Err(error) => tracing::warn!(%error, "reloading secrets panicked"),
                }
            }
        })
    }
}

fn check_secret_name(name: &str) -> Result<(), ServiceError> {
    if valid_secret_name(name) {
        Ok(())
    } else {
        Err(ServiceError::InvalidSecretName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretsKey {
        SecretsKey::new(Zeroizing::new([byte; 32]))
    }

    fn record(key: &SecretsKey, tenant: &str, name: &str, value: &str) -> SecretRecord {
        SecretRecord {
            tenant: tenant.into(),
            name: name.into(),
            key_id: key.id().into(),
            sealed: key.seal(tenant, name, value.as_bytes()).unwrap(),
            created_at: 1,
            updated_at: 1,
        }
    }

    #[test]
    fn sealed_values_open_only_where_they_were_sealed() {
        let k = key(7);
        let sealed = record(&k, "acme", "API_KEY", "sk-live-123");
        assert_eq!(k.open(&sealed).unwrap().as_str(), "sk-live-123");
        assert!(!String::from_utf8_lossy(&sealed.sealed).contains("sk-live"));
        // Two seals of one value differ (random nonces).
        let again = record(&k, "acme", "API_KEY", "sk-live-123");
        assert_ne!(sealed.sealed, again.sealed);
        // Moved to another tenant or name: refused.
        for (tenant, name) in [("evil", "API_KEY"), ("acme", "OTHER")] {
            let moved = SecretRecord {
                tenant: tenant.into(),
                name: name.into(),
                ..sealed.clone()
            };
            assert!(k.open(&moved).unwrap_err().contains("does not open"));
        }
        // Another key: said so, with both ids.
        let other = key(8);
        let error = other.open(&sealed).unwrap_err();
        assert!(
            error.contains("another secrets key") && error.contains(k.id()),
            "{error}"
        );
        // Altered: refused.
        let mut altered = sealed.clone();
        if let Some(last) = altered.sealed.last_mut() {
            *last ^= 1;
        }
        assert!(k.open(&altered).is_err());
    }

    #[test]
    fn keys_come_from_the_environment_or_a_private_generated_file() {
        let dir = tempfile::tempdir().unwrap();
        let hex_key = "ab".repeat(32);
        let from_env = SecretsKey::load(dir.path(), Some(&hex_key)).unwrap();
        assert_eq!(from_env.id(), key(0xab).id());
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode([0xab; 32]);
        assert_eq!(
            SecretsKey::load(dir.path(), Some(&b64)).unwrap().id(),
            from_env.id()
        );
        let error = SecretsKey::load(dir.path(), Some("short")).unwrap_err();
        assert!(error.to_string().contains("GUST_SECRETS_KEY"), "{error}");
        // Generated once, then the same key.
        let first = SecretsKey::load(dir.path(), None).unwrap();
        let second = SecretsKey::load(dir.path(), None).unwrap();
        assert_eq!(first.id(), second.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn names_are_environment_variables() {
        for good in ["A", "_X", "OPENAI_API_KEY", "K2", &"A".repeat(128)] {
            assert!(valid_secret_name(good), "{good}");
        }
        for bad in ["", "a", "1A", "A-B", "A B", "Ä", &"A".repeat(129)] {
            assert!(!valid_secret_name(bad), "{bad}");
        }
    }

    #[test]
    fn printed_values_are_redacted_longest_first() {
        let values = vec![
            ("SHORT".to_owned(), Zeroizing::new("abc".to_owned())),
            ("TOKEN".to_owned(), Zeroizing::new("tok-123".to_owned())),
            (
                "LONG".to_owned(),
                Zeroizing::new("tok-123-extended".to_owned()),
            ),
        ];
        assert_eq!(
            redact("a tok-123 and tok-123-extended, abc", &values),
            "a [secret TOKEN] and [secret LONG], abc"
        );
    }
}
