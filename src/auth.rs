//! API keys: who may call which RPC, on which topics.
//!
//! A key is a random token (`hrld_` + 43 base64url characters) that clients send as
//! `authorization: Bearer <key>`. The server keeps only its SHA-256 hash, with a name, roles and
//! optional topic patterns, in a JSON key set (`--api-keys-file`, reloaded when it changes, or
//! `HERALD_API_KEYS`):
//!
//! ```json
//! {"keys": [{"name": "billing", "roles": ["publish"], "topics": ["fin:*"],
//!            "sha256": "<64 hex digits>"}]}
//! ```
//!
//! `herald keys generate` makes a key and prints its entry. A presented key is hashed and
//! compared with every stored hash in constant time. Roles: `publish` (Publish), `subscribe`
//! (Subscribe, Unsubscribe, and reading subscriptions), `read` (GetSubscription,
//! ListSubscriptions, ListPending), `operate` (operator controls; reading too). Topic patterns
//! limit Publish to matching topics, Subscribe to patterns they cover, and every call about a
//! subscription to subscriptions whose patterns they cover.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

use crate::model::{Subscription, pattern_matches};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Publish events.
    Publish,
    /// Create and delete subscriptions (and read them).
    Subscribe,
    /// Read subscriptions and their pending deliveries.
    Read,
    /// Operator controls (and reading).
    Operate,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Publish => "publish",
            Role::Subscribe => "subscribe",
            Role::Read => "read",
            Role::Operate => "operate",
        }
    }
}

/// One stored key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who the key belongs to, for messages and logs.
    pub name: String,
    /// What it may do.
    pub roles: Vec<Role>,
    /// Topic patterns it is limited to; empty means every topic.
    #[serde(default)]
    pub topics: Vec<String>,
    /// SHA-256 of the key, hex.
    sha256: String,
    #[serde(skip)]
    hash: [u8; 32],
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<ApiKey>,
}

/// A parsed key set.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Arc<ApiKey>>,
}

impl KeySet {
    /// Parses the JSON form, checking every entry.
    pub fn parse(text: &str) -> Result<KeySet, String> {
        let file: KeyFile =
            serde_json::from_str(text).map_err(|error| format!("API key set: {error}"))?;
        let mut keys = Vec::new();
        for mut key in file.keys {
            let hash = decode_hex(&key.sha256)
                .ok_or_else(|| format!("API key `{}`: sha256 must be 64 hex digits", key.name))?;
            if key.roles.is_empty() {
                return Err(format!("API key `{}` has no roles", key.name));
            }
            for pattern in &key.topics {
                crate::validate::patterns(std::slice::from_ref(pattern))
                    .map_err(|error| format!("API key `{}`: {error}", key.name))?;
            }
            key.hash = hash;
            keys.push(Arc::new(key));
        }
        Ok(KeySet { keys })
    }

    /// The key whose hash matches `token`'s; every stored hash is compared, in constant time.
    fn find(&self, token: &str) -> Option<Arc<ApiKey>> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.hash.ct_eq(&hash)) {
                found = Some(key.clone());
            }
        }
        found
    }
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(bytes)
}

/// A new key and the hex SHA-256 to store for it.
pub fn generate_key() -> (String, String) {
    let random: [u8; 32] = rand::random();
    let key = format!("hrld_{}", URL_SAFE_NO_PAD.encode(random));
    let hash = Sha256::digest(key.as_bytes());
    let hex = hash.iter().map(|byte| format!("{byte:02x}")).collect();
    (key, hex)
}

/// Where keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// No keys: every call is allowed (loopback, or `--insecure-no-auth`).
    None,
    /// The JSON text itself (`HERALD_API_KEYS`).
    Inline(String),
    /// A file, reloaded when it changes.
    File(PathBuf),
}

/// Who made a call, as the authentication layer found.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Authentication is off.
    Anyone,
    /// A key.
    Key(Arc<ApiKey>),
}

/// The current key set, replaced when its file changes.
pub struct Keys {
    source: KeySource,
    current: RwLock<Arc<KeySet>>,
    seen: RwLock<Option<(SystemTime, u64)>>,
}

impl Keys {
    /// Loads the keys of `source`; an error says what is wrong with them.
    pub fn load(source: KeySource) -> Result<Keys, String> {
        let keys = Keys {
            source,
            current: RwLock::new(Arc::new(KeySet::default())),
            seen: RwLock::new(None),
        };
        let set = match &keys.source {
            KeySource::None => KeySet::default(),
            KeySource::Inline(text) => KeySet::parse(text)?,
            KeySource::File(path) => {
                *keys.seen.write().expect("lock") = file_stamp(path);
                read_key_file(path)?
            }
        };
        *keys.current.write().expect("lock") = Arc::new(set);
        Ok(keys)
    }

    /// True if calls must present a key.
    pub fn required(&self) -> bool {
        !matches!(self.source, KeySource::None)
    }

    /// Reloads the key file if it changed since the last look; a file that no longer parses
    /// is reported and the previous keys stay in force.
    pub fn reload_if_changed(&self) {
        let KeySource::File(path) = &self.source else {
            return;
        };
        let stamp = file_stamp(path);
        if stamp == *self.seen.read().expect("lock") {
            return;
        }
        *self.seen.write().expect("lock") = stamp;
        match read_key_file(path) {
            Ok(set) => {
                tracing::info!(path = %path.display(), keys = set.keys.len(), "reloaded API keys");
                *self.current.write().expect("lock") = Arc::new(set);
            }
            Err(error) => {
                tracing::error!(%error, "cannot reload API keys; the previous keys stay in force");
            }
        }
    }

    /// Checks a call's `authorization` header.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, Status> {
        if !self.required() {
            return Ok(Caller::Anyone);
        }
        let header = metadata
            .get("authorization")
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <API key>` metadata")
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization metadata is not text"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <API key>`"))?
            .trim();
        self.find(token).map_err(Status::unauthenticated)
    }

    /// Checks an HTTP request's `Authorization` header (for the admin listener): `Bearer
    /// <API key>`, or `Basic` with the API key as the password (what a browser's login
    /// prompt sends; the user name is ignored). The error says what is wrong.
    pub fn authenticate_http(&self, header: Option<&str>) -> Result<Caller, String> {
        if !self.required() {
            return Ok(Caller::Anyone);
        }
        let header = header.ok_or("missing `Authorization: Bearer <API key>`")?;
        if let Some(token) = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
        {
            return self.find(token.trim());
        }
        let basic = header
            .strip_prefix("Basic ")
            .or_else(|| header.strip_prefix("basic "))
            .ok_or(
                "authorization must be `Bearer <API key>` or `Basic` with the key as password",
            )?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or("malformed Basic credentials")?;
        let (_, password) = decoded
            .split_once(':')
            .ok_or("malformed Basic credentials")?;
        self.find(password)
    }

    fn find(&self, token: &str) -> Result<Caller, String> {
        let set = self.current.read().expect("lock").clone();
        set.find(token)
            .map(Caller::Key)
            .ok_or_else(|| "unknown API key".to_string())
    }

    /// Reloads the key file every `interval` until the process ends.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        if !matches!(self.source, KeySource::File(_)) {
            return;
        }
        let keys = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(keys) = keys.upgrade() else { return };
                keys.reload_if_changed();
            }
        });
    }
}

/// A file's modification time and length, to notice that it changed (`None` if unreadable).
pub(crate) fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

fn read_key_file(path: &Path) -> Result<KeySet, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read API keys from {}: {error}", path.display()))?;
    KeySet::parse(&text).map_err(|error| format!("{}: {error}", path.display()))
}

impl Caller {
    /// Fails with `PERMISSION_DENIED` unless the caller has `role` (or one that includes it)
    /// for `rpc`.
    pub fn require(&self, role: Role, rpc: &str) -> Result<(), Status> {
        let Caller::Key(key) = self else {
            return Ok(());
        };
        let granted = key.roles.iter().any(|held| {
            *held == role || (role == Role::Read && matches!(held, Role::Subscribe | Role::Operate))
        });
        if granted {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "API key `{}` (roles: {}) may not call {rpc}: it needs role `{}`",
            key.name,
            role_list(&key.roles),
            role.name()
        )))
    }

    /// Fails with `PERMISSION_DENIED` unless the caller may use `topic`.
    pub fn require_topic(&self, topic: &str) -> Result<(), Status> {
        match self {
            Caller::Key(key)
                if !key.topics.is_empty()
                    && !key
                        .topics
                        .iter()
                        .any(|pattern| pattern_matches(pattern, topic)) =>
            {
                Err(Status::permission_denied(format!(
                    "API key `{}` is limited to topics {:?}; `{topic}` is not among them",
                    key.name, key.topics
                )))
            }
            _ => Ok(()),
        }
    }

    /// Fails with `PERMISSION_DENIED` unless every one of `patterns` is within the caller's
    /// topic patterns.
    pub fn require_patterns(&self, patterns: &[String]) -> Result<(), Status> {
        let Caller::Key(key) = self else {
            return Ok(());
        };
        if key.topics.is_empty() {
            return Ok(());
        }
        for pattern in patterns {
            if !key.topics.iter().any(|limit| covers(limit, pattern)) {
                return Err(Status::permission_denied(format!(
                    "API key `{}` is limited to topics {:?}; `{pattern}` reaches beyond them",
                    key.name, key.topics
                )));
            }
        }
        Ok(())
    }

    /// Fails with `PERMISSION_DENIED` unless the subscription is within the caller's topics.
    pub fn require_subscription(&self, subscription: &Subscription) -> Result<(), Status> {
        self.require_patterns(&subscription.topics)
    }

    /// True if the subscription is within the caller's topics.
    pub fn may_see(&self, subscription: &Subscription) -> bool {
        self.require_subscription(subscription).is_ok()
    }
}

/// True if every topic that `pattern` matches, `limit` matches too.
fn covers(limit: &str, pattern: &str) -> bool {
    match limit.strip_suffix('*') {
        Some(prefix) => pattern.starts_with(prefix),
        None => limit == pattern,
    }
}

fn role_list(roles: &[Role]) -> String {
    let names: Vec<&str> = roles.iter().map(|role| role.name()).collect();
    names.join(", ")
}

/// The caller a request was authenticated as (the authentication layer inserts it).
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anyone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(entries: &str) -> KeySet {
        KeySet::parse(&format!(r#"{{"keys": [{entries}]}}"#)).unwrap()
    }

    #[test]
    fn keys_are_found_by_hash_and_checked_for_roles_and_topics() {
        let (key, hash) = generate_key();
        let (other, _) = generate_key();
        let keys = set(&format!(
            r#"{{"name": "billing", "roles": ["publish"], "topics": ["fin:*"], "sha256": "{hash}"}}"#
        ));
        let caller = Caller::Key(keys.find(&key).expect("found"));
        assert!(keys.find(&other).is_none());
        assert!(caller.require(Role::Publish, "Publish").is_ok());
        let denied = caller.require(Role::Subscribe, "Subscribe").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("`billing` (roles: publish)"));
        assert!(caller.require_topic("fin:purchase").is_ok());
        assert!(caller.require_topic("user:new").is_err());
        assert!(caller.require_patterns(&["fin:eu:*".into()]).is_ok());
        assert!(caller.require_patterns(&["fin*".into()]).is_err());
        assert!(caller.require_patterns(&["*".into()]).is_err());
    }

    #[test]
    fn malformed_key_sets_are_refused_with_the_reason() {
        for (text, expected) in [
            (
                r#"{"keys": [{"name": "a", "roles": ["publish"], "sha256": "xyz"}]}"#,
                "64 hex",
            ),
            (
                r#"{"keys": [{"name": "a", "roles": [], "sha256": "00"}]}"#,
                "64 hex",
            ),
            (
                r#"{"keys": [{"name": "a", "roles": ["admin"], "sha256": "00"}]}"#,
                "unknown variant",
            ),
            (
                r#"{"keys": [{"name": "a", "role": ["read"]}]}"#,
                "unknown field",
            ),
        ] {
            let error = KeySet::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
