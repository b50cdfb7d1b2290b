//! Who may write: the data tokens of `[auth]`.
//!
//! With `auth.data_tokens = "required"`, a PUT or DELETE of a blob needs
//! `Authorization: Bearer TOKEN`, where TOKEN is one of:
//!
//! - a **static token**: a line of `auth.token_file` (blank lines and
//!   lines starting with `#` are ignored). Several lines are valid at once,
//!   so a token is rotated by adding the new one, moving the clients over,
//!   and removing the old one; the file is read again within
//!   [`WATCH_INTERVAL`] of a change (and on SIGHUP), without a
//!   restart. Tokens are kept as SHA-256 digests and compared in constant
//!   time.
//! - a **signed token** scoped to one partition and an expiry, minted by a
//!   control plane that holds a key of `auth.signing_key_file` (or by
//!   `datanode token`): `dn1.<partition>.<expires>.<signature>`, where
//!   `expires` is a Unix time in seconds and `signature` the unpadded
//!   base64url HMAC-SHA256, under the key, of `dn1.<partition>.<expires>`.
//!   The file holds one key per line: the first signs, every one verifies,
//!   so a key is rotated by adding the new one first and removing the old
//!   one once its tokens have expired.
//!
//! The admin token is accepted too. A refused write is 401 `unauthorized`
//! with the reason (never the token) and counted in
//! `datanode_auth_rejected_total{reason}`; nothing of it was attempted.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{digest, hmac};

use crate::config::AuthConfig;

/// The prefix of a signed token (its format version).
const SIGNED_PREFIX: &str = "dn1";
/// Largest credential file read (a token list, a key, a certificate).
pub const MAX_CREDENTIAL_FILE: u64 = 1 << 20;

/// The token of an `Authorization: Bearer TOKEN` value (the scheme is
/// case-insensitive), trimmed.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim_start();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Reads a credential file: a regular file of at most
/// [`MAX_CREDENTIAL_FILE`] bytes (a FIFO or a device would block or never
/// end). Opened without blocking, checked on the open handle.
pub fn read_credential_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_CREDENTIAL_FILE {
        return Err(format!("{} is larger than {MAX_CREDENTIAL_FILE} bytes", path.display()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CREDENTIAL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_CREDENTIAL_FILE {
        return Err(format!("{} is larger than {MAX_CREDENTIAL_FILE} bytes", path.display()));
    }
    Ok(bytes)
}

/// A digest of what files held, so that no secret stays in memory in the
/// clear beyond what checking needs.
fn fingerprint(contents: &[Vec<u8>]) -> Vec<u8> {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in contents {
        context.update(&(part.len() as u64).to_le_bytes());
        context.update(part);
    }
    context.finish().as_ref().to_vec()
}

/// Shortest static token and signing key accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// How often credential files (TLS, data tokens) are looked at for a change.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Calls `reload` on a blocking thread every [`WATCH_INTERVAL`], until the
/// process ends: what a credential's `reload(false)` does when its files
/// have not changed is one read and one digest.
pub fn spawn_watch(reload: impl Fn() + Send + Sync + 'static) {
    let reload = std::sync::Arc::new(reload);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(WATCH_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let reload = std::sync::Arc::clone(&reload);
            let _ = tokio::task::spawn_blocking(move || reload()).await;
        }
    });
}

/// The reload of a set of credential files (TLS, data tokens): what the
/// last look found (their fingerprint, or the error reading them), so that
/// a reload acts and reports only when something changed. Held across a
/// whole reload, so two reloads never interleave.
pub struct LastSeen {
    credential: &'static str,
    seen: Mutex<Result<Vec<u8>, String>>,
}

impl LastSeen {
    /// For `credential` (the metric's label), whose files held `contents`.
    pub fn new(credential: &'static str, contents: &[Vec<u8>]) -> LastSeen {
        LastSeen { credential, seen: Mutex::new(Ok(fingerprint(contents))) }
    }

    /// Reads the files with `read` and, when they changed since the last
    /// look (or `forced`, a SIGHUP), hands them to `apply`, whose outcome
    /// is counted in `datanode_credential_reloads_total{credential,result}`
    /// and logged: `Ok` with what was loaded, `Err` when the new files are
    /// refused and the running credentials kept. A read error is logged
    /// once until it changes.
    pub fn reload(
        &self,
        forced: bool,
        read: impl FnOnce() -> Result<Vec<Vec<u8>>, String>,
        apply: impl FnOnce(&[Vec<u8>]) -> Result<String, String>,
    ) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let credential = self.credential;
        let contents = match read() {
            Ok(contents) => contents,
            Err(error) => {
                if forced || seen.as_ref().err() != Some(&error) {
                    tracing::warn!(credential, %error, "cannot read the credential files; keeping the running ones");
                }
                *seen = Err(error);
                return;
            }
        };
        let print = fingerprint(&contents);
        if seen.as_ref().ok() == Some(&print) && !forced {
            return;
        }
        *seen = Ok(print);
        let result = apply(&contents);
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        metrics::counter!("datanode_credential_reloads_total", "credential" => credential, "result" => outcome)
            .increment(1);
        match result {
            Ok(loaded) => tracing::info!(credential, loaded, "credential files loaded"),
            Err(error) => {
                tracing::warn!(credential, %error, "the new credential files are refused; keeping the running ones");
            }
        }
    }
}

/// Why a write was refused; `as_str` is the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Neither a static token nor a well-formed signed one.
    Unknown,
    /// A signed token whose signature does not match.
    BadSignature,
    /// A signed token past its expiry.
    Expired,
    /// A signed token for another partition.
    WrongPartition,
    /// A signed token valid further ahead than `auth.max_token_ttl`.
    TtlTooLong,
}

impl Denied {
    /// Stable name: the `reason` label of `datanode_auth_rejected_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Unknown => "unknown_token",
            Denied::BadSignature => "bad_signature",
            Denied::Expired => "expired",
            Denied::WrongPartition => "wrong_partition",
            Denied::TtlTooLong => "ttl_too_long",
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            Denied::Missing => "writes need a data token: Authorization: Bearer TOKEN",
            Denied::Unknown => "the data token is not valid",
            Denied::BadSignature => "the signed data token's signature does not match",
            Denied::Expired => "the signed data token has expired",
            Denied::WrongPartition => "the signed data token is for another partition",
            Denied::TtlTooLong => "the signed data token is valid for longer than auth.max_token_ttl",
        }
    }

    /// Every reason, for counters that exist at 0 from the start.
    pub const ALL: [Denied; 6] = [
        Denied::Missing,
        Denied::Unknown,
        Denied::BadSignature,
        Denied::Expired,
        Denied::WrongPartition,
        Denied::TtlTooLong,
    ];
}

/// What the files hold.
struct Keys {
    /// SHA-256 of every static token.
    tokens: Vec<digest::Digest>,
    /// The signing keys: every one verifies, the first signs.
    signing: Vec<hmac::Key>,
}

/// The data-token check of a running node.
pub struct DataAuth {
    required: bool,
    token_file: Option<PathBuf>,
    signing_key_file: Option<PathBuf>,
    max_ttl: u64,
    keys: RwLock<Keys>,
    seen: LastSeen,
}

impl std::fmt::Debug for DataAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataAuth")
            .field("required", &self.required)
            .field("token_file", &self.token_file)
            .field("signing_key_file", &self.signing_key_file)
            .finish_non_exhaustive()
    }
}

impl DataAuth {
    /// Reads the files of `[auth]`; the error names the file and what is
    /// wrong. With `data_tokens = "off"` nothing is read.
    pub fn load(config: &AuthConfig) -> Result<DataAuth, String> {
        let required = config.data_tokens == "required";
        let (token_file, signing_key_file) = (config.token_file.clone(), config.signing_key_file.clone());
        let auth = DataAuth {
            required,
            token_file,
            signing_key_file,
            max_ttl: config.max_token_ttl.as_secs(),
            keys: RwLock::new(Keys { tokens: Vec::new(), signing: Vec::new() }),
            seen: LastSeen::new("data_tokens", &[]),
        };
        if !required {
            return Ok(auth);
        }
        let contents = auth.read()?;
        let keys = auth.parse(&contents)?;
        Ok(DataAuth { keys: RwLock::new(keys), seen: LastSeen::new("data_tokens", &contents), ..auth })
    }

    /// Whether writes need a token.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Checks the `Authorization` header of a write to `partition`.
    pub fn check(&self, partition: u64, authorization: Option<&str>) -> Result<(), Denied> {
        if !self.required {
            return Ok(());
        }
        let token = bearer(authorization).ok_or(Denied::Missing)?;
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let offered = digest::digest(&digest::SHA256, token.as_bytes());
        // Every digest is compared, so the time does not tell which matched.
        let known = keys.tokens.iter().fold(false, |found, t| found | constant_time_eq(t.as_ref(), offered.as_ref()));
        if known {
            return Ok(());
        }
        match token.starts_with(SIGNED_PREFIX) && !keys.signing.is_empty() {
            true => verify_signed(&keys.signing, token, partition, unix_now(), self.max_ttl),
            false => Err(Denied::Unknown),
        }
    }

    /// Reads the files again and switches to them when they changed and
    /// hold valid tokens; a bad file is reported once and the running
    /// tokens kept. Blocking (reads files).
    pub fn reload(&self, forced: bool) {
        if !self.required {
            return;
        }
        self.seen.reload(
            forced,
            || self.read(),
            |contents| {
                let keys = self.parse(contents)?;
                let loaded = format!("{} static tokens", keys.tokens.len());
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
                Ok(loaded)
            },
        );
    }

    fn read(&self) -> Result<Vec<Vec<u8>>, String> {
        [&self.token_file, &self.signing_key_file]
            .into_iter()
            .map(|file| match file {
                Some(path) => read_credential_file(path),
                None => Ok(Vec::new()),
            })
            .collect()
    }

    fn parse(&self, contents: &[Vec<u8>]) -> Result<Keys, String> {
        let (tokens, key) = match contents {
            [tokens, key] => (tokens, key),
            _ => return Err("internal: unexpected number of token files".into()),
        };
        let mut digests = Vec::new();
        if let Some(path) = &self.token_file {
            let text =
                std::str::from_utf8(tokens).map_err(|_| format!("auth.token_file = {}: not UTF-8", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let token = line.trim();
                if token.is_empty() || token.starts_with('#') {
                    continue;
                }
                if token.len() < MIN_SECRET_BYTES || token.contains(char::is_whitespace) {
                    return Err(format!(
                        "auth.token_file = {}:{}: a token is at least {MIN_SECRET_BYTES} characters without spaces",
                        path.display(),
                        n + 1
                    ));
                }
                digests.push(digest::digest(&digest::SHA256, token.as_bytes()));
            }
        }
        let signing = match &self.signing_key_file {
            Some(path) => signing_keys(path, key)?,
            None => Vec::new(),
        };
        if digests.is_empty() && signing.is_empty() {
            return Err(format!(
                "auth.data_tokens = \"required\" but {} holds no token and no auth.signing_key_file is set: \
                 nobody could write",
                self.token_file.as_deref().map_or_else(|| "no auth.token_file".into(), |p| p.display().to_string())
            ));
        }
        Ok(Keys { tokens: digests, signing })
    }
}

/// The HMAC keys of a signing key file: one per line, as written (text,
/// e.g. base64; surrounding whitespace is not part of a key; blank lines
/// and lines starting with `#` are ignored). Several at once let a key be
/// rotated without refusing the tokens already handed out: add the new
/// key first (it signs), keep the old one until its tokens expire.
fn signing_keys(path: &Path, contents: &[u8]) -> Result<Vec<hmac::Key>, String> {
    let mut keys = Vec::new();
    for (n, line) in contents.split(|b| *b == b'\n').enumerate() {
        let key = line.trim_ascii();
        if key.is_empty() || key.starts_with(b"#") {
            continue;
        }
        if key.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "auth.signing_key_file = {}:{}: the key is shorter than {MIN_SECRET_BYTES} bytes",
                path.display(),
                n + 1
            ));
        }
        keys.push(hmac::Key::new(hmac::HMAC_SHA256, key));
    }
    if keys.is_empty() {
        return Err(format!("auth.signing_key_file = {}: no key in it", path.display()));
    }
    Ok(keys)
}

/// The key that signs: the first of a signing key file, for `datanode token`.
pub fn read_signing_key(path: &Path) -> Result<hmac::Key, String> {
    let mut keys = signing_keys(path, &read_credential_file(path)?)?;
    Ok(keys.swap_remove(0))
}

/// A signed token for `partition`, valid until `expires` (Unix seconds).
pub fn sign(key: &hmac::Key, partition: u64, expires: u64) -> String {
    let claims = format!("{SIGNED_PREFIX}.{partition}.{expires}");
    let tag = hmac::sign(key, claims.as_bytes());
    format!("{claims}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// A canonical decimal number: digits only, no leading zero (but `0`).
fn canonical(text: &str) -> Option<u64> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    (digits && (text == "0" || !text.starts_with('0'))).then(|| text.parse().ok()).flatten()
}

/// Checks a signed token: its signature first, under any of `keys` (a
/// tampered token is a bad signature, whatever its claims say), then its
/// claims: canonical numbers, not expired, not valid further ahead than
/// `max_ttl` seconds, for this partition.
fn verify_signed(keys: &[hmac::Key], token: &str, partition: u64, now: u64, max_ttl: u64) -> Result<(), Denied> {
    let (claims, signature) = token.rsplit_once('.').ok_or(Denied::Unknown)?;
    let mut parts = claims.split('.');
    let (Some(SIGNED_PREFIX), Some(for_partition), Some(expires), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Denied::Unknown);
    };
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| Denied::BadSignature)?;
    if !keys.iter().any(|key| hmac::verify(key, claims.as_bytes(), &signature).is_ok()) {
        return Err(Denied::BadSignature);
    }
    let (Some(for_partition), Some(expires)) = (canonical(for_partition), canonical(expires)) else {
        return Err(Denied::Unknown);
    };
    if expires <= now {
        return Err(Denied::Expired);
    }
    if expires - now > max_ttl {
        return Err(Denied::TtlTooLong);
    }
    if for_partition != partition {
        return Err(Denied::WrongPartition);
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Compares in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn a_signed_token_holds_for_its_partition_until_it_expires() {
        let token = sign(&key(), 7, 1_000);
        assert_eq!(verify_signed(&[key()], &token, 7, 999, 3600), Ok(()));
        assert_eq!(verify_signed(&[key()], &token, 7, 1_000, 3600), Err(Denied::Expired));
        assert_eq!(verify_signed(&[key()], &token, 8, 999, 3600), Err(Denied::WrongPartition));
    }

    #[test]
    fn a_tampered_signed_token_is_a_bad_signature() {
        let token = sign(&key(), 7, 1_000);
        // Other claims under the same signature: another partition, a later expiry.
        let signature = token.rsplit_once('.').unwrap().1;
        for forged in [format!("dn1.8.1000.{signature}"), format!("dn1.7.9999.{signature}")] {
            assert_eq!(verify_signed(&[key()], &forged, 8, 999, 3600), Err(Denied::BadSignature), "{forged}");
        }
        let other = hmac::Key::new(hmac::HMAC_SHA256, b"another key of sixteen or more bytes");
        assert_eq!(verify_signed(&[other], &token, 7, 999, 3600), Err(Denied::BadSignature));
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            verify_signed(&[key()], std::str::from_utf8(&flipped).unwrap(), 7, 999, 3600),
            Err(Denied::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_are_refused_without_a_panic() {
        let cases =
            ["", ".", "dn1", "dn1.", "dn1..", "dn1...", "dn1.7.1000", "dn1.x.y.z", "dn2.7.1000.AAAA", "dn1.7.1000.!!"];
        for token in cases {
            assert!(verify_signed(&[key()], token, 7, 0, u64::MAX).is_err(), "{token:?}");
        }
        // Any bytes at all: refused, never a panic.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 80) as usize;
            let text: String =
                (0..len).map(|i| b"dn1.0123456789-_AZaz="[((seed >> (i % 56)) % 21) as usize] as char).collect();
            let _ = verify_signed(&[key()], &text, 1, 0, u64::MAX);
        }
    }

    #[test]
    fn claims_are_canonical_and_no_further_ahead_than_the_limit() {
        let forever = sign(&key(), 7, u64::MAX);
        assert_eq!(verify_signed(&[key()], &forever, 7, 1_000, 3600), Err(Denied::TtlTooLong));
        assert_eq!(verify_signed(&[key()], &sign(&key(), 7, 4_600), 7, 1_000, 3600), Ok(()));
        // Signed, but not canonical: refused, as a path's partition id would be.
        let claims_of =
            |claims: &str| format!("{claims}.{}", URL_SAFE_NO_PAD.encode(hmac::sign(&key(), claims.as_bytes())));
        for claims in ["dn1.07.2000", "dn1.+7.2000", "dn1.7.02000", "dn1.7.+2000", "dn1.7. 2000"] {
            assert_eq!(verify_signed(&[key()], &claims_of(claims), 7, 1_000, 3600), Err(Denied::Unknown), "{claims}");
        }
        assert_eq!(verify_signed(&[key()], &claims_of("dn1.0.2000"), 0, 1_000, 3600), Ok(()));
    }

    #[test]
    fn a_signing_key_rotates_without_refusing_the_tokens_handed_out() {
        let path = Path::new("token.key");
        let old = signing_keys(path, b"old key of sixteen bytes or more\n").unwrap();
        let token = sign(&old[0], 7, 2_000);
        let both = signing_keys(
            path,
            b"# new first: it signs\nnew key of sixteen bytes or more\nold key of sixteen bytes or more\n",
        )
        .unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(verify_signed(&both, &token, 7, 1_000, 3600), Ok(()), "the old key still verifies");
        let fresh = sign(&both[0], 7, 2_000);
        assert_eq!(verify_signed(&both, &fresh, 7, 1_000, 3600), Ok(()));
        let new_only = signing_keys(path, b"new key of sixteen bytes or more\n").unwrap();
        assert_eq!(verify_signed(&new_only, &token, 7, 1_000, 3600), Err(Denied::BadSignature), "retired");
        assert_eq!(verify_signed(&new_only, &fresh, 7, 1_000, 3600), Ok(()));
        assert!(signing_keys(path, b"short\n").is_err());
        assert!(signing_keys(path, b"# only a comment\n\n").is_err());
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("BEARER abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("Bearerabc")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn equal_is_equal_and_nothing_else() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
