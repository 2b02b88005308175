//! The HTTP client of the Transit provider: hyper 1 with rustls (on `ring`),
//! the stack the AWS SDK already brings into the build.
//!
//! One client per provider, connections pooled (HTTP/1.1 keep-alive). Every
//! request carries the token in `X-Vault-Token` (a header value marked
//! sensitive) and, where configured, `X-Vault-Namespace`; every request and
//! its answer together are bounded by the request timeout, and every answer
//! body by [`MAX_ANSWER_LEN`] before it is parsed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use super::auth::{parse_auth, parse_lookup, Lease, Session, VaultAppRole};
use super::config::{config_error, TokenSource, VaultConfig, VaultToken};
use super::error::provider_error;
use crate::error::{Error, Result};
use crate::provider::ProviderErrorKind;

/// Largest answer body read, in bytes (a batch rewrap of
/// [`MAX_BATCH`](super::MAX_BATCH) items is about 40 KiB).
const MAX_ANSWER_LEN: usize = 1 << 20;

/// An answer of the server: its status and body (zeroized on drop: it can
/// hold a plaintext DEK).
pub(super) struct Answer {
    pub status: u16,
    pub body: Zeroizing<Vec<u8>>,
}

/// The client and what every request needs.
pub(super) struct Http {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    address: String,
    namespace: Option<HeaderValue>,
    token: Option<TokenSource>,
    /// The AppRole token, or what is known of a fixed token's lease.
    session: tokio::sync::Mutex<Session>,
    timeout: Duration,
}

fn tls_config(config: &VaultConfig) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(format!("TLS setup failed: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &config.ca_cert {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| {
                config_error(format!(
                    "cannot read CA certificates from {} (VAULT_CACERT): {e}",
                    path.display()
                ))
            })?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(config_error(format!(
                "{} (VAULT_CACERT) holds no usable CA certificate",
                path.display()
            )));
        }
    } else if config.address.starts_with("https:") {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            return Err(config_error(
                "no system root certificates found: set VAULT_CACERT to the CA that signed the \
                 server's certificate",
            ));
        }
    }
    let builder = builder.with_root_certificates(roots);
    match &config.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    config_error(format!(
                        "cannot read the client certificate {} (VAULT_CLIENT_CERT): {e}",
                        cert.display()
                    ))
                })?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|_| {
                // The error could quote the file; say only where it is.
                config_error(format!(
                    "cannot read a PEM private key from {} (VAULT_CLIENT_KEY)",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| config_error(format!("the client certificate is unusable: {e}")))
        }
    }
}

impl Http {
    pub(super) fn new(config: &VaultConfig) -> Result<Http> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(config)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let namespace = config
            .namespace
            .as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| config_error("the namespace is not a valid header value"))?;
        Ok(Http {
            client,
            address: config.address.clone(),
            namespace,
            token: config.token.clone(),
            session: tokio::sync::Mutex::new(Session::default()),
            timeout: config.request_timeout,
        })
    }

    pub(super) fn address(&self) -> &str {
        &self.address
    }

    /// Sends `method /v1/{path}` with `body` (JSON) and reads the answer,
    /// with a valid token (see [`super::auth`]). An AppRole token that the
    /// server no longer knows (a 403, and `lookup-self` refused too: revoked
    /// or expired early) is replaced by a new login and the request sent
    /// once more; a 403 for a policy that denies the request keeps the
    /// token and is answered as it is. (Vault checks permissions before any
    /// handler runs, so a refused request did nothing and is safe to send
    /// again.) Transport failures and timeouts are
    /// [`ProviderErrorKind::Unavailable`].
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Answer> {
        // The body (it can hold a DEK in base64) is handed to hyper, which
        // frees it without wiping it: docs/TRANSIT.md says so.
        let body = body.map(|mut b| Bytes::from(std::mem::take(&mut *b)));
        let token = self.current_token().await?;
        let answer = self
            .send(method.clone(), path, Some(&token), body.clone())
            .await?;
        if answer.status == 403
            && matches!(self.token, Some(TokenSource::AppRole(_)))
            && !self.token_is_known(&token).await
        {
            self.forget(&token).await;
            let token = self.current_token().await?;
            return self.send(method, path, Some(&token), body).await;
        }
        Ok(answer)
    }

    /// Whether the server still knows `token` (`lookup-self` answers); a
    /// server that cannot be asked counts as knowing it.
    async fn token_is_known(&self, token: &VaultToken) -> bool {
        match self
            .send(Method::GET, "auth/token/lookup-self", Some(token), None)
            .await
        {
            Ok(a) => a.status != 403,
            Err(_) => true,
        }
    }

    /// The token to send now: a token file's content, a fixed token
    /// (renewed first where due), or the AppRole session's (logging in or
    /// renewing first where due).
    async fn current_token(&self) -> Result<VaultToken> {
        let source = self.token.as_ref().ok_or_else(|| {
            provider_error(
                ProviderErrorKind::Misconfigured,
                "no Vault token: set VAULT_TOKEN (or BAO_TOKEN) or VAULT_ROLE_ID with \
                 VAULT_SECRET_ID, or configure a token file",
            )
        })?;
        match source {
            TokenSource::File(_) => source.token(),
            TokenSource::Fixed(token) => {
                self.keep_fixed(token).await;
                Ok(token.clone())
            }
            TokenSource::AppRole(role) => self.app_role_token(role).await,
        }
    }

    /// The AppRole session's token: renewed past two thirds of its lease,
    /// replaced by a new login past nine tenths, when a renewal is refused
    /// or capped by the maximum TTL, or when there is none. The session
    /// changes only when a login succeeds: a failed login leaves a token
    /// that is still within its lease in use.
    async fn app_role_token(&self, role: &VaultAppRole) -> Result<VaultToken> {
        let mut session = self.session.lock().await;
        let now = Instant::now();
        let current = session.token.clone().zip(session.lease);
        if let Some((token, lease)) = &current {
            // A login or renewal failed a moment ago: keep the token while
            // its lease lasts instead of trying again on every request.
            if session.quiet(now) && !lease.over(now) {
                return Ok(token.clone());
            }
            if !lease.nearly_over(now) {
                if !lease.wants_renewal(now) {
                    return Ok(token.clone());
                }
                match self.renew(token, now).await {
                    Ok(renewed) if !renewed.capped(lease) => {
                        session.lease = Some(renewed);
                        return Ok(token.clone());
                    }
                    // Capped by the maximum TTL: log in while it still works.
                    Ok(_) => {}
                    Err(e) if transient(&e) => {
                        session.quiet_until = Some(now + BACKOFF);
                        return Ok(token.clone());
                    }
                    Err(_) => {}
                }
            }
        }
        match self.login(role, now).await {
            Ok((token, lease)) => {
                session.token = Some(token.clone());
                session.lease = Some(lease);
                session.quiet_until = None;
                Ok(token)
            }
            Err(e) => match current {
                Some((token, lease)) if !lease.over(now) => {
                    session.quiet_until = Some(now + BACKOFF);
                    Ok(token)
                }
                _ => Err(e),
            },
        }
    }

    /// `POST auth/MOUNT/login` with the role: a new token and its lease.
    async fn login(&self, role: &VaultAppRole, now: Instant) -> Result<(VaultToken, Lease)> {
        let path = format!("auth/{}/login", role.mount);
        // Like a DEK, the secret id goes to hyper, which frees it unwiped.
        let mut body = role.login_body()?;
        let body = Bytes::from(std::mem::take(&mut *body));
        let answer = self.send(Method::POST, &path, None, Some(body)).await?;
        let what = format!("the AppRole login at {path}");
        let (token, lease) = parse_auth(answer.status, &answer.body, &what, now)?;
        let token = token.ok_or_else(|| {
            provider_error(
                ProviderErrorKind::Other,
                format!("Vault/OpenBao answered {what} without a token"),
            )
        })?;
        Ok((token, lease))
    }

    /// Learns a fixed token's lease once (`lookup-self`) and renews it past
    /// two thirds of its TTL. Failures here are not the request's: a token
    /// that cannot be looked up or renewed is used as it is until the
    /// server refuses it; a server that is down or throttling is asked
    /// again after [`BACKOFF`], not by every request.
    async fn keep_fixed(&self, token: &VaultToken) {
        let mut session = self.session.lock().await;
        let now = Instant::now();
        if session.quiet(now) {
            return;
        }
        if session.lease.is_none() && !session.settled {
            match self
                .send(Method::GET, "auth/token/lookup-self", Some(token), None)
                .await
            {
                Ok(a) if a.status == 200 => {
                    session.lease = parse_lookup(&a.body, now);
                    session.settled = session.lease.is_none();
                }
                // Not allowed to look itself up (no `default` policy), or
                // not a token the server knows: nothing to renew.
                Ok(a) if (400..500).contains(&a.status) && a.status != 429 => {
                    session.settled = true
                }
                Ok(_) | Err(_) => session.quiet_until = Some(now + BACKOFF),
            }
        }
        if let Some(lease) = session.lease {
            if lease.wants_renewal(now) {
                match self.renew(token, now).await {
                    Ok(mut renewed) => {
                        // Capped by its maximum TTL: no renewal gains more.
                        if renewed.capped(&lease) {
                            renewed.renewable = false;
                        }
                        session.lease = Some(renewed);
                    }
                    Err(e) if transient(&e) => session.quiet_until = Some(now + BACKOFF),
                    Err(_) => {
                        session.lease = None;
                        session.settled = true;
                    }
                }
            }
        }
    }

    /// `auth/token/renew-self` for `token`: its new lease.
    async fn renew(&self, token: &VaultToken, now: Instant) -> Result<Lease> {
        let answer = self
            .send(
                Method::POST,
                "auth/token/renew-self",
                Some(token),
                Some(Bytes::from_static(b"{}")),
            )
            .await?;
        let (_, lease) = parse_auth(answer.status, &answer.body, "the token renewal", now)?;
        Ok(lease)
    }

    /// Drops the AppRole session if it still holds `token`.
    async fn forget(&self, token: &VaultToken) {
        let mut session = self.session.lock().await;
        if session
            .token
            .as_ref()
            .is_some_and(|t| t.expose() == token.expose())
        {
            session.token = None;
            session.lease = None;
        }
    }

    /// One request with `token` (none for a login).
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&VaultToken>,
        body: Option<Bytes>,
    ) -> Result<Answer> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}/v1/{path}", self.address))
            .header("X-Vault-Request", "true");
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(token.expose())
                .map_err(|_| config_error("the Vault token is not a valid header value"))?;
            value.set_sensitive(true);
            request = request.header("X-Vault-Token", value);
        }
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns.clone());
        }
        let body = match body {
            Some(b) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Full::new(b)
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .map_err(|e| config_error(format!("cannot build the request for {path}: {e}")))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                let what = if e.is_connect() {
                    "could not connect"
                } else {
                    "the connection failed"
                };
                unavailable(format!(
                    "Vault/OpenBao at {} is unreachable: {what} for {path} ({}); check that the \
                     server runs and VAULT_ADDR, and retry later",
                    self.address,
                    error_chain(&e)
                ))
            })?;
            let status = response.status().as_u16();
            let collected = Limited::new(response.into_body(), MAX_ANSWER_LEN)
                .collect()
                .await
                .map_err(|e| {
                    unavailable(format!(
                        "Vault/OpenBao at {} sent an unreadable or oversized answer to {path} \
                         ({e}); retry, and check that VAULT_ADDR points at Vault or OpenBao",
                        self.address
                    ))
                })?;
            let body = Zeroizing::new(collected.to_bytes().to_vec());
            Ok::<_, Error>(Answer { status, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(unavailable(format!(
                "Vault/OpenBao at {} did not answer {path} within {:?} (the request timeout); \
                 check that the server is healthy, or raise VaultConfig::request_timeout",
                self.address, self.timeout
            ))),
        }
    }
}

/// How long a provider waits before asking a server that was down or
/// throttling about its token again (lookups and renewals only).
const BACKOFF: Duration = Duration::from_secs(5);

/// A failure that says nothing about the token: the server was down,
/// sealed or throttling.
fn transient(e: &Error) -> bool {
    matches!(e, Error::Provider(p) if matches!(
        p.kind(),
        ProviderErrorKind::Unavailable | ProviderErrorKind::Throttled
    ))
}

fn unavailable(message: String) -> Error {
    provider_error(ProviderErrorKind::Unavailable, message)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s.chars().take(300).collect()
}
