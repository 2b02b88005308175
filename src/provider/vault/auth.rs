//! How the provider keeps a valid token: a fixed token renewed before it
//! expires, a token file re-read before every request, or an AppRole login
//! (`auth/MOUNT/login`) renewed and repeated as needed.
//!
//! Renewal is lazy: the request that finds the token past two thirds of its
//! TTL renews it first (`auth/token/renew-self`), so an idle provider makes
//! no request and starts no task. An AppRole token is replaced by a new
//! login past nine tenths of its TTL, when renewal is refused or capped by
//! the maximum TTL, and once when the server answers 403 and refuses the
//! token's own `lookup-self` too (revoked early); a 403 of a policy keeps
//! the token. A server that is down or throttling is asked about the token
//! again only after a pause. Leases are clamped to ten years, so that no
//! deadline arithmetic overflows on an absurd answer.

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

/// Longest lease believed, in seconds (ten years): a larger or absurd
/// `lease_duration` is clamped so that no deadline arithmetic overflows.
const MAX_LEASE_SECS: u64 = 10 * 365 * 86_400;

fn lease_ttl(seconds: u64) -> Duration {
    Duration::from_secs(seconds.min(MAX_LEASE_SECS))
}

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

    /// The JSON body of a login (zeroizing: it holds the secret id). Built
    /// in a buffer large enough for the worst-case escaping, so that it
    /// never reallocates and leaves no unwiped copy behind.
    pub(super) fn login_body(&self) -> Result<Zeroizing<Vec<u8>>> {
        use std::io::Write as _;
        let secret = self.secret_id()?;
        let mut body = Zeroizing::new(Vec::with_capacity(
            32 + 6 * (self.role_id.len() + secret.len()),
        ));
        let quoted = |out: &mut Vec<u8>, s: &str| serde_json::to_writer(out, s);
        let mut write = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            body.write_all(b"{\"role_id\":")?;
            quoted(&mut body, &self.role_id)?;
            body.write_all(b",\"secret_id\":")?;
            quoted(&mut body, &secret)?;
            body.write_all(b"}")?;
            Ok(())
        };
        write().map_err(|_| config_error("cannot encode the AppRole login"))?;
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
        self.renewable && self.past(now, 2, 3)
    }

    /// True once nine tenths of an expiring lease have passed.
    pub fn nearly_over(&self, now: Instant) -> bool {
        self.past(now, 9, 10)
    }

    /// True once an expiring lease is over.
    pub fn over(&self, now: Instant) -> bool {
        self.past(now, 1, 1)
    }

    /// True when this lease, granted by a renewal of `before`, is less than
    /// half of it: the token is near its maximum TTL (or the server gave
    /// no TTL at all), and renewing gains little.
    pub fn capped(&self, before: &Lease) -> bool {
        self.ttl.is_zero() || self.ttl < before.ttl / 2
    }

    /// True once `num / den` of an expiring lease have passed (never for a
    /// lease that does not expire, or whose deadline is out of range).
    fn past(&self, now: Instant, num: u32, den: u32) -> bool {
        !self.ttl.is_zero()
            && self
                .ttl
                .checked_mul(num)
                .map(|d| d / den)
                .and_then(|d| self.since.checked_add(d))
                .is_some_and(|deadline| now >= deadline)
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
    /// The server was down or throttling: no lookup or renewal before.
    pub quiet_until: Option<Instant>,
}

impl Session {
    /// True while lookups and renewals are held back.
    pub fn quiet(&self, now: Instant) -> bool {
        self.quiet_until.is_some_and(|t| now < t)
    }
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
            ttl: lease_ttl(block.lease_duration),
            renewable: block.renewable,
        },
    ))
}

/// Parses a `lookup-self` answer into the token's lease, if it expires.
pub(super) fn parse_lookup(body: &[u8], since: Instant) -> Option<Lease> {
    let data = serde_json::from_slice::<LookupAnswer>(body).ok()?.data?;
    (data.ttl > 0).then(|| Lease {
        since,
        ttl: lease_ttl(data.ttl),
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
        // An absurd lease from the server: clamped, no overflow, no panic.
        let body = br#"{"auth":{"client_token":"t","lease_duration":18446744073709551615,"renewable":true}}"#;
        let (_, huge) = parse_auth(200, body, "login", now).unwrap();
        assert_eq!(huge.ttl, Duration::from_secs(MAX_LEASE_SECS));
        assert!(!huge.wants_renewal(now) && !huge.nearly_over(now));
        let unclamped = Lease {
            ttl: Duration::MAX,
            ..lease
        };
        assert!(!unclamped.wants_renewal(now) && !unclamped.nearly_over(now));
        // A renewal capped by the maximum TTL, or without a TTL.
        let short = Lease {
            ttl: Duration::from_secs(30),
            ..lease
        };
        assert!(short.capped(&lease) && forever.capped(&lease) && !lease.capped(&lease));
        assert!(lease.over(now + Duration::from_secs(90)));
        assert!(!lease.over(now + Duration::from_secs(89)));
    }

    #[test]
    fn the_login_body_is_json_of_both_ids() {
        let r = VaultAppRole::new("ro\\le\"id", "s3cr\"t").unwrap();
        let body = r.login_body().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["role_id"], "ro\\le\"id");
        assert_eq!(v["secret_id"], "s3cr\"t");
        // Never reallocated: the only buffer is the zeroizing one.
        assert_eq!(body.capacity(), 32 + 6 * (8 + 6));
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
