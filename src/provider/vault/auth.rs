//! How the provider keeps a valid token: a fixed token renewed before it
//! expires, a token file re-read before every request, or an AppRole login
//! (`auth/MOUNT/login`) renewed and repeated as needed.
//!
//! Renewal is lazy: the request that finds the token past two thirds of its
//! TTL renews it first (`auth/token/renew-self`), so an idle provider makes
//! no request and starts no task. An AppRole token is replaced by a new
//! login when it is past nine tenths of its TTL, when renewal fails, and
//! once when the server answers 403 (a token revoked early).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use zeroize::Zeroizing;

use super::config::{config_error, VaultToken};
use super::error::{provider_error, server_says};
use crate::error::{Error, Result};
use crate::provider::ProviderErrorKind;

/// Longest role id or secret id accepted, in bytes (Vault's are UUIDs).
const MAX_APPROLE_LEN: usize = 4096;

/// An AppRole identity: the role id, the secret id (zeroized, never
/// printed), and the mount of the AppRole auth method (`approle` unless
/// set).
///
/// ```
/// use phi_envelope::provider::vault::{VaultAppRole, VaultConfig};
///
/// let role = VaultAppRole::new("role-id", "secret-id")?.mount("approle-backups")?;
/// let config = VaultConfig::with_app_role("https://vault.example:8200", role, &[7; 32])?;
/// # let _ = config;
/// # Ok::<(), phi_envelope::Error>(())
/// ```
#[derive(Clone)]
pub struct VaultAppRole {
    pub(super) mount: String,
    role_id: Zeroizing<String>,
    secret_id: SecretId,
}

#[derive(Clone)]
enum SecretId {
    Fixed(Zeroizing<String>),
    /// Read at every login (a file an orchestrator rotates).
    File(PathBuf),
}

impl fmt::Debug for VaultAppRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = match &self.secret_id {
            SecretId::Fixed(_) => "<redacted>".to_owned(),
            SecretId::File(p) => format!("file {}", p.display()),
        };
        f.debug_struct("VaultAppRole")
            .field("mount", &self.mount)
            .field("role_id", &"<redacted>")
            .field("secret_id", &secret)
            .finish()
    }
}

fn check_id(what: &str, value: &str) -> Result<Zeroizing<String>> {
    let v = value.trim();
    if v.is_empty() || v.len() > MAX_APPROLE_LEN || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(config_error(format!(
            "an AppRole {what} must be 1 to {MAX_APPROLE_LEN} visible ASCII characters"
        )));
    }
    Ok(Zeroizing::new(v.to_owned()))
}

impl VaultAppRole {
    /// An AppRole identity with its secret id given once. Both are copied
    /// into zeroizing buffers; surrounding whitespace is removed.
    pub fn new(role_id: &str, secret_id: &str) -> Result<VaultAppRole> {
        Ok(VaultAppRole {
            mount: "approle".into(),
            role_id: check_id("role id", role_id)?,
            secret_id: SecretId::Fixed(check_id("secret id", secret_id)?),
        })
    }

    /// An AppRole identity whose secret id is read from `path` at every
    /// login, so that whatever delivers or rotates it (an orchestrator, a
    /// Vault Agent template) needs no restart of the application.
    pub fn with_secret_id_file(role_id: &str, path: impl AsRef<Path>) -> Result<VaultAppRole> {
        Ok(VaultAppRole {
            mount: "approle".into(),
            role_id: check_id("role id", role_id)?,
            secret_id: SecretId::File(path.as_ref().to_owned()),
        })
    }

    /// Logs in at `auth/MOUNT/login` instead of `auth/approle/login`.
    pub fn mount(mut self, mount: &str) -> Result<VaultAppRole> {
        let m = mount.trim().trim_matches('/');
        if m.is_empty()
            || m.len() > 256
            || !m.split('/').all(|s| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            })
        {
            return Err(config_error(format!(
                "the AppRole mount {mount:?} must be path segments of letters, digits, '-', '_' \
                 and '.'"
            )));
        }
        self.mount = m.to_owned();
        Ok(self)
    }

    fn secret_id(&self) -> Result<Zeroizing<String>> {
        match &self.secret_id {
            SecretId::Fixed(s) => Ok(s.clone()),
            SecretId::File(path) => {
                let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
                    provider_error(
                        ProviderErrorKind::Misconfigured,
                        format!(
                            "cannot read the AppRole secret id file {}: {e}; check the path and \
                             its permissions (it is read at every login)",
                            path.display()
                        ),
                    )
                })?);
                let text = std::str::from_utf8(&bytes).map_err(|_| {
                    config_error(format!(
                        "the AppRole secret id file {} is not UTF-8",
                        path.display()
                    ))
                })?;
                check_id("secret id", text).map_err(|_| {
                    config_error(format!(
                        "the AppRole secret id file {} does not hold a secret id",
                        path.display()
                    ))
                })
            }
        }
    }

    /// The JSON body of a login (zeroizing: it holds the secret id).
    pub(super) fn login_body(&self) -> Result<Zeroizing<Vec<u8>>> {
        let secret = self.secret_id()?;
        let mut value = serde_json::json!({
            "role_id": self.role_id.as_str(),
            "secret_id": secret.as_str(),
        });
        let body = Zeroizing::new(serde_json::to_vec(&value).unwrap_or_default());
        for field in ["role_id", "secret_id"] {
            if let Some(serde_json::Value::String(s)) = value.get_mut(field) {
                zeroize::Zeroize::zeroize(s);
            }
        }
        Ok(body)
    }
}

/// The `auth` block of a login, renewal or lookup answer.
#[derive(Deserialize)]
struct AuthBlock {
    #[serde(default)]
    client_token: Option<String>,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

impl Drop for AuthBlock {
    fn drop(&mut self) {
        if let Some(t) = &mut self.client_token {
            zeroize::Zeroize::zeroize(t);
        }
    }
}

#[derive(Deserialize)]
struct AuthAnswer {
    auth: Option<AuthBlock>,
}

/// `auth/token/lookup-self` answers in `data`.
#[derive(Deserialize)]
struct LookupAnswer {
    data: Option<LookupData>,
}

#[derive(Deserialize)]
struct LookupData {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

/// A lease as the server granted it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Lease {
    /// When the lease was granted (or looked up).
    pub since: Instant,
    /// Its TTL then; zero for a token that never expires.
    pub ttl: Duration,
    /// Whether `renew-self` can extend it.
    pub renewable: bool,
}

impl Lease {
    /// True once two thirds of a renewable, expiring lease have passed.
    pub fn wants_renewal(&self, now: Instant) -> bool {
        self.renewable && !self.ttl.is_zero() && now >= self.since + self.ttl * 2 / 3
    }

    /// True once nine tenths of an expiring lease have passed.
    pub fn nearly_over(&self, now: Instant) -> bool {
        !self.ttl.is_zero() && now >= self.since + self.ttl * 9 / 10
    }
}

/// What the provider knows of its current token.
#[derive(Default)]
pub(super) struct Session {
    /// The token an AppRole login issued.
    pub token: Option<VaultToken>,
    /// Its lease (for a fixed token: from a lookup), once known.
    pub lease: Option<Lease>,
    /// A fixed token's lease could not be learnt (no `lookup-self`
    /// capability, or it does not expire): do not ask again.
    pub settled: bool,
}

/// Parses the answer of a login or renewal: the new token (a login) and
/// its lease.
pub(super) fn parse_auth(
    status: u16,
    body: &[u8],
    what: &str,
    since: Instant,
) -> Result<(Option<VaultToken>, Lease)> {
    if status != 200 {
        let errors = serde_json::from_slice::<super::Errors>(body)
            .map(|e| e.errors)
            .unwrap_or_default();
        let says = server_says(&errors);
        let kind = match status {
            400 | 403 => ProviderErrorKind::AccessDenied,
            429 => ProviderErrorKind::Throttled,
            500..=599 => ProviderErrorKind::Unavailable,
            _ => ProviderErrorKind::Other,
        };
        return Err(provider_error(
            kind,
            format!("Vault/OpenBao refused {what} (HTTP {status}){says}"),
        ));
    }
    let answer: AuthAnswer = serde_json::from_slice(body).map_err(|_| bad_answer(what))?;
    let block = answer.auth.ok_or_else(|| bad_answer(what))?;
    let token = match &block.client_token {
        Some(t) => Some(VaultToken::new(t.as_str()).map_err(|_| bad_answer(what))?),
        None => None,
    };
    Ok((
        token,
        Lease {
            since,
            ttl: Duration::from_secs(block.lease_duration),
            renewable: block.renewable,
        },
    ))
}

/// Parses a `lookup-self` answer into the token's lease, if it expires.
pub(super) fn parse_lookup(body: &[u8], since: Instant) -> Option<Lease> {
    let data = serde_json::from_slice::<LookupAnswer>(body).ok()?.data?;
    (data.ttl > 0).then(|| Lease {
        since,
        ttl: Duration::from_secs(data.ttl),
        renewable: data.renewable,
    })
}

fn bad_answer(what: &str) -> Error {
    provider_error(
        ProviderErrorKind::Other,
        format!("Vault/OpenBao answered {what} without a usable auth block"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_role_is_never_printed() {
        let r = VaultAppRole::new("role-id-value", "secret-id-value").unwrap();
        let text = format!("{r:?}");
        assert!(!text.contains("role-id-value") && !text.contains("secret-id-value"));
        assert!(VaultAppRole::new("", "s").is_err());
        assert!(VaultAppRole::new("r", "a b").is_err());
        assert!(r.clone().mount("../x").is_err());
        assert_eq!(r.mount("/approle-x/").unwrap().mount, "approle-x");
    }

    #[test]
    fn renewal_and_expiry_points() {
        let now = Instant::now();
        let lease = Lease {
            since: now,
            ttl: Duration::from_secs(90),
            renewable: true,
        };
        assert!(!lease.wants_renewal(now + Duration::from_secs(59)));
        assert!(lease.wants_renewal(now + Duration::from_secs(60)));
        assert!(!lease.nearly_over(now + Duration::from_secs(80)));
        assert!(lease.nearly_over(now + Duration::from_secs(81)));
        let fixed = Lease {
            renewable: false,
            ..lease
        };
        assert!(!fixed.wants_renewal(now + Duration::from_secs(89)));
        let forever = Lease {
            ttl: Duration::ZERO,
            ..lease
        };
        assert!(!forever.wants_renewal(now + Duration::from_secs(1 << 20)));
        assert!(!forever.nearly_over(now + Duration::from_secs(1 << 20)));
    }

    #[test]
    fn auth_answers_parse_and_refusals_are_access_denied() {
        let now = Instant::now();
        let body = br#"{"auth":{"client_token":"hvs.x","lease_duration":60,"renewable":true}}"#;
        let (token, lease) = parse_auth(200, body, "login", now).unwrap();
        assert_eq!(token.unwrap().expose(), "hvs.x");
        assert_eq!(lease.ttl, Duration::from_secs(60));
        let e = parse_auth(
            400,
            br#"{"errors":["invalid role or secret ID"]}"#,
            "login",
            now,
        )
        .unwrap_err();
        match e {
            Error::Provider(p) => assert_eq!(p.kind(), ProviderErrorKind::AccessDenied),
            other => panic!("{other:?}"),
        }
        assert!(parse_auth(200, b"{}", "login", now).is_err());
        assert!(parse_lookup(br#"{"data":{"ttl":0,"renewable":false}}"#, now).is_none());
        assert!(parse_lookup(br#"{"data":{"ttl":30,"renewable":true}}"#, now).is_some());
    }
}
