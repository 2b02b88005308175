//! The HTTP client of the Transit provider: hyper 1 with rustls (on `ring`),
//! the stack the AWS SDK already brings into the build.
//!
//! One client per provider, connections pooled (HTTP/1.1 keep-alive). Every
//! request carries the token in `X-Vault-Token` (a header value marked
//! sensitive) and, where configured, `X-Vault-Namespace`; every request and
//! its answer together are bounded by the request timeout, and every answer
//! body by [`MAX_ANSWER_LEN`] before it is parsed.

use std::sync::Arc;
use std::time::Duration;

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

use super::config::{config_error, TokenSource, VaultConfig};
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
            timeout: config.request_timeout,
        })
    }

    pub(super) fn address(&self) -> &str {
        &self.address
    }

    /// Sends `method /v1/{path}` with `body` (JSON) and reads the answer.
    /// Transport failures and timeouts are [`ProviderErrorKind::Unavailable`].
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Answer> {
        let token = self
            .token
            .as_ref()
            .ok_or_else(|| {
                provider_error(
                    ProviderErrorKind::Misconfigured,
                    "no Vault token: set VAULT_TOKEN (or BAO_TOKEN), or configure a token file",
                )
            })?
            .token()?;
        let mut token_header = HeaderValue::from_str(token.expose())
            .map_err(|_| config_error("the Vault token is not a valid header value"))?;
        token_header.set_sensitive(true);
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}/v1/{path}", self.address))
            .header("X-Vault-Token", token_header)
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns.clone());
        }
        // The body (it can hold a DEK in base64) is handed to hyper, which
        // frees it without wiping it: docs/TRANSIT.md says so.
        let body = match body {
            Some(mut b) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(std::mem::take(&mut *b)))
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
