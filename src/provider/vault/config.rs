//! [`VaultConfig`]: where the Transit server is, how the provider
//! authenticates, and what it sends of the encryption context.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::hmac;
use zeroize::Zeroizing;

use super::error::provider_error;
use crate::error::{Error, Result};
use crate::format::EncryptionContext;
use crate::provider::ProviderErrorKind;

/// Shortest accepted context digest key, in bytes.
pub const MIN_CONTEXT_KEY_LEN: usize = 32;

/// Most previous context digest keys that unwrap tries (each costs one
/// extra decrypt call on a message that does not open under the current
/// key).
pub const MAX_PREVIOUS_CONTEXT_KEYS: usize = 3;

/// Longest token accepted, in bytes (Vault and OpenBao tokens are about 100).
const MAX_TOKEN_LEN: usize = 4096;

/// The HMAC label of the context digest (domain separation from every other
/// use of the same secret, the KMS provider's digest included).
const DIGEST_LABEL: &[u8] = b"phi-envelope/v1 vault-transit context\x00";

/// A Vault / OpenBao token: zeroized on drop, never printed (`Debug` shows
/// `VaultToken(<redacted>)`), never put in an error or a log.
#[derive(Clone)]
pub struct VaultToken(Zeroizing<String>);

impl VaultToken {
    /// Wraps a token. Surrounding whitespace (a trailing newline of a token
    /// file) is removed; the token must then be 1 to 4096 visible ASCII
    /// characters, since it travels in an HTTP header.
    pub fn new(token: impl Into<String>) -> Result<VaultToken> {
        let token = Zeroizing::new(token.into());
        let trimmed = token.trim();
        if trimmed.is_empty()
            || trimmed.len() > MAX_TOKEN_LEN
            || !trimmed.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(config_error(
                "a Vault token must be 1 to 4096 visible ASCII characters",
            ));
        }
        Ok(VaultToken(Zeroizing::new(trimmed.to_owned())))
    }

    pub(super) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for VaultToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VaultToken(<redacted>)")
    }
}

/// Where the token comes from.
#[derive(Clone)]
pub(super) enum TokenSource {
    /// Given once (from `VAULT_TOKEN` / `BAO_TOKEN` or by the application).
    Fixed(VaultToken),
    /// Read from this file before every request, so that a Vault Agent (or
    /// any process that renews and rewrites the token file) keeps the
    /// provider authenticated without a restart.
    File(PathBuf),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Fixed(_) => f.write_str("Fixed(<redacted>)"),
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

impl TokenSource {
    /// The current token.
    pub(super) fn token(&self) -> Result<VaultToken> {
        match self {
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::File(path) => {
                let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
                    provider_error(
                        ProviderErrorKind::Misconfigured,
                        format!(
                            "cannot read the Vault token file {}: {e}; check the path and its \
                             permissions (the file is read before every request)",
                            path.display()
                        ),
                    )
                })?);
                let text = std::str::from_utf8(&bytes).map_err(|_| {
                    config_error(format!(
                        "the Vault token file {} is not UTF-8",
                        path.display()
                    ))
                })?;
                VaultToken::new(text).map_err(|_| {
                    config_error(format!(
                        "the Vault token file {} does not hold a token (1 to 4096 visible ASCII \
                         characters)",
                        path.display()
                    ))
                })
            }
        }
    }
}

/// Configuration of a [`VaultTransitProvider`](super::VaultTransitProvider).
///
/// Build it from the standard environment with [`from_env`](Self::from_env)
/// (as the `vault` and `bao` command-line tools read it) or explicitly with
/// [`new`](Self::new), then adjust:
///
/// ```
/// use phi_envelope::provider::vault::{VaultConfig, VaultToken};
/// # let context_key = [7u8; 32];
/// let config = VaultConfig::new(
///     "https://vault.hospital.example:8200",
///     VaultToken::new("hvs.example")?,
///     &context_key,
/// )?
/// .namespace("phi")?
/// .request_timeout(std::time::Duration::from_secs(5));
/// # Ok::<(), phi_envelope::Error>(())
/// ```
///
/// # What reaches the server of the encryption context
///
/// Transit's `context` of every request is the base64 of
/// `HMAC-SHA-256(context_key, label || canonical pairs)`: a keyed digest of
/// the **whole** phi-envelope encryption context, never a value of it.
/// Transit derives the per-context key from it (derived keys), so a wrapped
/// DEK unwraps only under the exact context it was made with; the server, its
/// audit devices and anyone reading them learn a 32-byte digest that they
/// cannot test guesses against without the context key. The context key (at
/// least 32 random bytes from the application's secret store) is as
/// long-lived as the data; replace it with
/// [`previous_context_key`](Self::previous_context_key) and a rewrap, as
/// docs/TRANSIT.md describes.
#[derive(Clone)]
pub struct VaultConfig {
    pub(super) address: String,
    pub(super) namespace: Option<String>,
    pub(super) token: Option<TokenSource>,
    pub(super) ca_cert: Option<PathBuf>,
    pub(super) client_cert: Option<(PathBuf, PathBuf)>,
    /// Current context key first, then previous ones.
    context_keys: Vec<Zeroizing<Vec<u8>>>,
    pub(super) request_timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) key_check_ttl: Duration,
    pub(super) auto_rotate_period: Option<Duration>,
}

impl fmt::Debug for VaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultConfig")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .field("token", &self.token)
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert.as_ref().map(|c| &c.0))
            .field("context_key", &"<redacted>")
            .field("previous_context_keys", &(self.context_keys.len() - 1))
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("key_check_ttl", &self.key_check_ttl)
            .field("auto_rotate_period", &self.auto_rotate_period)
            .finish()
    }
}

pub(super) fn config_error(reason: impl Into<String>) -> Error {
    Error::InvalidArgument(format!("vault-transit configuration: {}", reason.into()))
}

fn check_context_key(key: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    if key.len() < MIN_CONTEXT_KEY_LEN {
        return Err(config_error(format!(
            "the context digest key must be at least {MIN_CONTEXT_KEY_LEN} random bytes \
             (generate it once, keep it in your secret store as long as the data)"
        )));
    }
    Ok(Zeroizing::new(key.to_vec()))
}

/// True for a host that names this machine (plain HTTP is allowed only to it).
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks and normalises an address: `https://HOST[:PORT]`, or `http://` to
/// a loopback host only (the token would cross the network in clear).
fn check_address(address: &str) -> Result<String> {
    let uri: hyper::Uri = address
        .trim()
        .parse()
        .map_err(|_| config_error(format!("{address:?} is not a URL (https://HOST:PORT)")))?;
    let scheme = uri.scheme_str().unwrap_or("");
    let Some(authority) = uri.authority() else {
        return Err(config_error(format!(
            "{address:?} has no host (expected https://HOST:PORT)"
        )));
    };
    if authority.as_str().contains('@') {
        return Err(config_error(
            "the Vault address must not carry user information",
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(config_error(format!(
            "the Vault address {address:?} must not have a path or query (the provider adds /v1/...)"
        )));
    }
    match scheme {
        "https" => {}
        "http" if is_loopback(authority.host()) => {}
        "http" => {
            return Err(config_error(format!(
                "refusing plain http to {}: the token and the DEKs would cross the network in \
                 clear; use https (plain http is accepted for loopback addresses only)",
                authority.host()
            )))
        }
        _ => {
            return Err(config_error(format!(
                "{address:?}: the scheme must be https (or http to a loopback address)"
            )))
        }
    }
    Ok(format!("{scheme}://{authority}"))
}

fn env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

impl VaultConfig {
    /// A configuration for the server at `address` (`https://HOST:PORT`;
    /// `http://` only to a loopback address), authenticating with `token`,
    /// whose context digests are keyed with `context_key` (at least 32
    /// random bytes; copied into a zeroizing buffer).
    ///
    /// Defaults: no namespace, the system's root certificates, no client
    /// certificate, a 10 s timeout per request and 5 s to connect, key
    /// settings re-checked every 60 s, no automatic rotation on keys it
    /// creates.
    pub fn new(address: &str, token: VaultToken, context_key: &[u8]) -> Result<VaultConfig> {
        Ok(VaultConfig {
            address: check_address(address)?,
            namespace: None,
            token: Some(TokenSource::Fixed(token)),
            ca_cert: None,
            client_cert: None,
            context_keys: vec![check_context_key(context_key)?],
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            key_check_ttl: Duration::from_secs(60),
            auto_rotate_period: None,
        })
    }

    /// A configuration from the standard environment, each `VAULT_*`
    /// variable taking precedence over its `BAO_*` twin:
    ///
    /// | variable | meaning |
    /// | --- | --- |
    /// | `VAULT_ADDR` / `BAO_ADDR` | the server address (required) |
    /// | `VAULT_TOKEN` / `BAO_TOKEN` | the token (required unless `token_file` is called next) |
    /// | `VAULT_NAMESPACE` / `BAO_NAMESPACE` | the namespace |
    /// | `VAULT_CACERT` / `BAO_CACERT` | a PEM file of the CA certificates to trust instead of the system's |
    /// | `VAULT_CLIENT_CERT` + `VAULT_CLIENT_KEY` (`BAO_*`) | a PEM client certificate and key (TLS client authentication) |
    /// | `VAULT_SKIP_VERIFY` / `BAO_SKIP_VERIFY` | refused when true: phi-envelope never skips TLS verification |
    ///
    /// Without a token in the environment the configuration still builds
    /// when a token file follows ([`token_file`](Self::token_file));
    /// otherwise [`VaultTransitProvider::new`](super::VaultTransitProvider::new)
    /// fails with a message naming the variables.
    pub fn from_env(context_key: &[u8]) -> Result<VaultConfig> {
        let address = env(&["VAULT_ADDR", "BAO_ADDR"]).ok_or_else(|| {
            config_error("neither VAULT_ADDR nor BAO_ADDR is set (the server address)")
        })?;
        if let Some(v) = env(&["VAULT_SKIP_VERIFY", "BAO_SKIP_VERIFY"]) {
            if !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "false" | "f" | "no"
            ) {
                return Err(config_error(
                    "VAULT_SKIP_VERIFY is set: phi-envelope never skips TLS verification; set \
                     VAULT_CACERT to the CA that signed the server's certificate instead",
                ));
            }
        }
        let token = match env(&["VAULT_TOKEN", "BAO_TOKEN"]) {
            Some(t) => Some(TokenSource::Fixed(VaultToken::new(t)?)),
            None => None,
        };
        let mut config = VaultConfig::new(&address, VaultToken::new("unset")?, context_key)?;
        config.token = token;
        if let Some(ns) = env(&["VAULT_NAMESPACE", "BAO_NAMESPACE"]) {
            config = config.namespace(&ns)?;
        }
        if let Some(ca) = env(&["VAULT_CACERT", "BAO_CACERT"]) {
            config = config.ca_cert_file(ca);
        }
        match (
            env(&["VAULT_CLIENT_CERT", "BAO_CLIENT_CERT"]),
            env(&["VAULT_CLIENT_KEY", "BAO_CLIENT_KEY"]),
        ) {
            (Some(c), Some(k)) => config = config.client_cert_files(c, k),
            (None, None) => {}
            _ => {
                return Err(config_error(
                    "VAULT_CLIENT_CERT and VAULT_CLIENT_KEY go together: set both or neither",
                ))
            }
        }
        Ok(config)
    }

    /// Uses `token` for every request.
    pub fn token(mut self, token: VaultToken) -> VaultConfig {
        self.token = Some(TokenSource::Fixed(token));
        self
    }

    /// Reads the token from `path` before every request (a Vault Agent sink,
    /// a Kubernetes secret volume): whatever renews or replaces the token
    /// file keeps the provider authenticated.
    pub fn token_file(mut self, path: impl AsRef<Path>) -> VaultConfig {
        self.token = Some(TokenSource::File(path.as_ref().to_owned()));
        self
    }

    /// Sends `X-Vault-Namespace: namespace` (Vault Enterprise and OpenBao
    /// namespaces); mounts in key references are relative to it.
    pub fn namespace(mut self, namespace: &str) -> Result<VaultConfig> {
        let ns = namespace.trim().trim_matches('/');
        if ns.is_empty()
            || ns.len() > 256
            || !ns.split('/').all(|s| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            })
        {
            return Err(config_error(
                "a namespace is /-separated segments of [A-Za-z0-9._-]",
            ));
        }
        self.namespace = Some(ns.to_owned());
        Ok(self)
    }

    /// Trusts the CA certificates of this PEM file instead of the system's
    /// (`VAULT_CACERT`). Read when the provider is built.
    pub fn ca_cert_file(mut self, path: impl AsRef<Path>) -> VaultConfig {
        self.ca_cert = Some(path.as_ref().to_owned());
        self
    }

    /// Authenticates the TLS connection with this PEM certificate chain and
    /// private key (`VAULT_CLIENT_CERT`, `VAULT_CLIENT_KEY`). Read when the
    /// provider is built.
    pub fn client_cert_files(
        mut self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> VaultConfig {
        self.client_cert = Some((cert.as_ref().to_owned(), key.as_ref().to_owned()));
        self
    }

    /// Adds a previous context digest key: messages wrapped under it still
    /// unwrap (one extra decrypt call each). At most
    /// [`MAX_PREVIOUS_CONTEXT_KEYS`], tried in the order added. Transit's
    /// rewrap cannot change the context, so a rewrap of such a message
    /// re-encrypts the DEK under the current digest instead (Transit
    /// `encrypt`).
    pub fn previous_context_key(mut self, key: &[u8]) -> Result<VaultConfig> {
        if self.context_keys.len() > MAX_PREVIOUS_CONTEXT_KEYS {
            return Err(config_error(format!(
                "at most {MAX_PREVIOUS_CONTEXT_KEYS} previous context keys; rewrap old messages \
                 and retire the oldest"
            )));
        }
        self.context_keys.push(check_context_key(key)?);
        Ok(self)
    }

    /// The longest a request may take, connection and answer included
    /// (default 10 s). A server that accepts the connection and never
    /// answers fails the call as unavailable after this time.
    pub fn request_timeout(mut self, timeout: Duration) -> VaultConfig {
        self.request_timeout = timeout;
        self
    }

    /// The longest a TCP connection may take to establish (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> VaultConfig {
        self.connect_timeout = timeout;
        self
    }

    /// How long a key's checked settings (derived, type) are trusted before
    /// they are read again (default 60 s; `Duration::ZERO` reads them
    /// before every wrap and unwrap).
    pub fn key_check_ttl(mut self, ttl: Duration) -> VaultConfig {
        self.key_check_ttl = ttl;
        self
    }

    /// Keys made by `create_key` rotate themselves on the server every
    /// `period` (Transit `auto_rotate_period`, at least one hour): the
    /// keyring's cryptoperiod enforced by the server too.
    pub fn auto_rotate_period(mut self, period: Duration) -> Result<VaultConfig> {
        if period < Duration::from_secs(3600) {
            return Err(config_error(
                "Transit accepts an auto_rotate_period of at least one hour",
            ));
        }
        self.auto_rotate_period = Some(period);
        Ok(self)
    }

    /// Number of context keys (current + previous).
    pub(super) fn context_key_count(&self) -> usize {
        self.context_keys.len()
    }

    /// The Transit `context` for `context` under context key `index`
    /// (0 = current): base64 of the keyed digest.
    pub(super) fn transit_context(&self, context: &EncryptionContext, index: usize) -> String {
        use base64::Engine as _;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.context_keys[index]);
        let mut mac = hmac::Context::with_key(&key);
        mac.update(DIGEST_LABEL);
        mac.update(&context.canonical_pairs());
        base64::engine::general_purpose::STANDARD.encode(mac.sign().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> VaultToken {
        VaultToken::new("s.secret-token-value").unwrap()
    }

    #[test]
    fn addresses() {
        for (given, want) in [
            ("https://vault.example:8200", "https://vault.example:8200"),
            ("https://vault.example:8200/", "https://vault.example:8200"),
            ("http://127.0.0.1:8200", "http://127.0.0.1:8200"),
            ("http://localhost:8200", "http://localhost:8200"),
            ("http://[::1]:8200", "http://[::1]:8200"),
        ] {
            let c = VaultConfig::new(given, token(), &[1; 32]).unwrap();
            assert_eq!(c.address, want);
        }
        for bad in [
            "http://vault.example:8200",
            "http://10.0.0.1:8200",
            "ftp://127.0.0.1",
            "https://vault.example/v1",
            "https://user:pw@vault.example",
            "vault.example:8200",
            "",
        ] {
            assert!(VaultConfig::new(bad, token(), &[1; 32]).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let c = VaultConfig::new("http://127.0.0.1:1", token(), &[0xAB; 32]).unwrap();
        let text = format!("{c:?} {:?}", token());
        assert!(!text.contains("secret-token-value"), "{text}");
        assert!(!text.to_lowercase().contains("abab"), "{text}");
        assert!(VaultConfig::new("http://127.0.0.1:1", token(), &[1; 31]).is_err());
        assert!(VaultToken::new("").is_err());
        assert!(VaultToken::new("a b").is_err());
        assert_eq!(VaultToken::new("tok\n").unwrap().expose(), "tok");
    }

    #[test]
    fn digest_is_keyed_and_hides_values() {
        let ctx = EncryptionContext::new()
            .with("patient", "MRN-123 Jane Roe")
            .unwrap();
        let a = VaultConfig::new("http://127.0.0.1:1", token(), &[1; 32]).unwrap();
        let b = a.clone().previous_context_key(&[2; 32]).unwrap();
        let d = a.transit_context(&ctx, 0);
        assert_eq!(d, b.transit_context(&ctx, 0));
        assert_ne!(d, b.transit_context(&ctx, 1));
        assert_ne!(d, a.transit_context(&EncryptionContext::new(), 0));
        assert!(!d.contains("MRN"));
        assert_eq!(d.len(), 44);
    }
}
