//! TLS for the PostgreSQL audit trail: the connection string's TLS settings
//! and a tokio-postgres TLS connector over tokio-rustls, rustls on `ring`.
//!
//! tokio-postgres parses `sslmode` with libpq's weak words only (`disable`,
//! `prefer`, `require`) and knows no certificate file, so this module takes
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of the connection
//! string before tokio-postgres reads the rest, decides the policy
//! (docs/AUDIT-DB.md, "TLS") and then tells tokio-postgres either
//! `Disable` (plaintext) or `Require` (TLS or no connection: it never falls
//! back to plaintext when the server answers the SSL request with `N`).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use super::postgres::PgError;

/// The settings this module reads (and removes) from a connection string.
const OURS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// How the connection is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// Plaintext.
    Disable,
    /// TLS, the server's certificate chained to a trusted root; its names
    /// not checked.
    VerifyCa,
    /// TLS, the chain and the host name (or IP address) checked.
    VerifyFull,
}

impl Mode {
    fn word(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

/// Where the trusted roots come from.
#[derive(Clone, Debug)]
enum Roots {
    /// A PEM file of CA certificates (`sslrootcert=PATH`).
    File(PathBuf),
    /// The operating system's store (`sslrootcert=system`).
    System,
}

impl fmt::Display for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Roots::File(p) => write!(f, "sslrootcert {}", p.display()),
            Roots::System => f.write_str("the system's trusted roots (sslrootcert=system)"),
        }
    }
}

/// A connection string, read: what tokio-postgres takes, and the TLS
/// policy.
pub(super) struct Parsed {
    /// Everything but the TLS settings; its `ssl_mode` is set by
    /// [`Parsed::connector`].
    pub cfg: tokio_postgres::Config,
    mode: Mode,
    roots: Option<Roots>,
    client: Option<(PathBuf, PathBuf)>,
}

/// What [`super::postgres`] connects with: the configuration and, for
/// TLS, the connector.
#[derive(Clone)]
pub(super) struct Connector {
    /// The configuration, `ssl_mode` `Disable` or `Require`.
    pub cfg: tokio_postgres::Config,
    /// `None`: plaintext.
    pub tls: Option<MakeRustls>,
}

impl Connector {
    /// The sslmode in force (for messages).
    pub fn mode(&self) -> &'static str {
        match &self.tls {
            None => Mode::Disable.word(),
            Some(t) => t.mode.word(),
        }
    }
}

/// The raw TLS settings found in a connection string.
#[derive(Default)]
struct Settings {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl Settings {
    fn set(&mut self, key: &str, value: String) -> Result<(), PgError> {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            _ => &mut self.sslkey,
        };
        if slot.is_some() {
            return Err(PgError::Invalid(format!(
                "{key} is given twice in the connection string"
            )));
        }
        *slot = Some(value);
        Ok(())
    }
}

fn not_a_url() -> PgError {
    PgError::Invalid(
        "not a PostgreSQL connection string (postgresql://USER@HOST:PORT/DB or key=value pairs)"
            .into(),
    )
}

/// Reads a connection string (URL or key=value pairs): the TLS settings
/// out, the rest through tokio-postgres, then the policy. Reads no file.
pub(super) fn parse(url: &str) -> Result<Parsed, PgError> {
    let mut settings = Settings::default();
    let rest = split(url, &mut settings)?;
    let cfg = rest
        .parse::<tokio_postgres::Config>()
        .map_err(|_| not_a_url())?;
    policy(cfg, settings)
}

/// The connection string without the TLS settings, which go to `settings`.
fn split(url: &str, settings: &mut Settings) -> Result<String, PgError> {
    for prefix in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(prefix) {
            return split_url(prefix, rest, settings);
        }
    }
    split_pairs(url, settings)
}

/// A URL: its query string (after the first `?` that follows the
/// credentials, as tokio-postgres reads it) loses the TLS settings.
fn split_url(prefix: &str, rest: &str, settings: &mut Settings) -> Result<String, PgError> {
    let from = rest.find('@').map_or(0, |at| at + 1);
    let Some(q) = rest[from..].find('?').map(|q| from + q) else {
        return Ok(format!("{prefix}{rest}"));
    };
    let mut kept: Vec<&str> = Vec::new();
    for piece in rest[q + 1..].split('&') {
        let ours = match piece.split_once('=') {
            Some((k, v)) => {
                let k = percent_decode(k)?;
                if OURS.contains(&k.as_str()) {
                    settings.set(&k, percent_decode(v)?)?;
                    true
                } else {
                    false
                }
            }
            None => false,
        };
        if !ours {
            kept.push(piece);
        }
    }
    let base = &rest[..q];
    Ok(if kept.is_empty() {
        format!("{prefix}{base}")
    } else {
        format!("{prefix}{base}?{}", kept.join("&"))
    })
}

fn percent_decode(s: &str) -> Result<String, PgError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied(), b.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| not_a_url())
}

/// key=value pairs, tokenised as tokio-postgres does (values bare or in
/// single quotes, `\` escaping the next character); the TLS settings are
/// taken out, the other pairs kept as written.
fn split_pairs(s: &str, settings: &mut Settings) -> Result<String, PgError> {
    let mut kept: Vec<&str> = Vec::new();
    let mut it = s.char_indices().peekable();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut it);
        let Some(&(start, _)) = it.peek() else { break };
        let mut key_end = start;
        while let Some((i, c)) = it.next_if(|&(_, c)| !c.is_whitespace() && c != '=') {
            key_end = i + c.len_utf8();
        }
        let key = &s[start..key_end];
        if key.is_empty() {
            // tokio-postgres would stop reading here and silently drop
            // every setting after it.
            return Err(PgError::Invalid(
                "an empty setting name (\"=...\") in the connection string".into(),
            ));
        }
        skip_ws(&mut it);
        if it.next_if(|&(_, c)| c == '=').is_none() {
            // Malformed: tokio-postgres reports it.
            return Ok(s.to_owned());
        }
        skip_ws(&mut it);
        let mut value = String::new();
        let mut end = s.len();
        if it.next_if(|&(_, c)| c == '\'').is_some() {
            let mut closed = false;
            while let Some((i, c)) = it.next() {
                match c {
                    '\'' => {
                        closed = true;
                        end = i + 1;
                        break;
                    }
                    '\\' => {
                        if let Some((_, c2)) = it.next() {
                            value.push(c2);
                        }
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Ok(s.to_owned());
            }
        } else {
            while let Some((i, c)) = it.next() {
                if c.is_whitespace() {
                    end = i;
                    break;
                }
                if c == '\\' {
                    if let Some((_, c2)) = it.next() {
                        value.push(c2);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if OURS.contains(&key) {
            settings.set(key, value)?;
        } else {
            kept.push(&s[start..end]);
        }
    }
    Ok(kept.join(" "))
}

/// Whether connecting to host `i` stays on this machine: a Unix socket, a
/// loopback address (`hostaddr` first, as tokio-postgres connects to it),
/// or the name `localhost`.
fn is_local(cfg: &tokio_postgres::Config, i: usize) -> bool {
    if let Some(addr) = cfg.get_hostaddrs().get(i) {
        return addr.is_loopback();
    }
    match cfg.get_hosts().get(i) {
        Some(Host::Tcp(h)) => {
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
        }
        #[cfg(unix)]
        Some(Host::Unix(_)) => true,
        None => false,
    }
}

/// The policy (docs/AUDIT-DB.md, "TLS"): no `sslmode` means plaintext
/// when every host is a Unix socket or loopback and no TLS setting is
/// given, `verify-full` otherwise; `prefer`, `allow` and `require` are
/// refused; TLS needs trusted roots and TCP hosts with names.
fn policy(cfg: tokio_postgres::Config, s: Settings) -> Result<Parsed, PgError> {
    let n = cfg.get_hosts().len().max(cfg.get_hostaddrs().len());
    let any_tls_setting = s.sslrootcert.is_some() || s.sslcert.is_some() || s.sslkey.is_some();
    let mode =
        match s.sslmode.as_deref() {
            None if !any_tls_setting && (0..n).all(|i| is_local(&cfg, i)) => Mode::Disable,
            None => Mode::VerifyFull,
            Some("disable") => Mode::Disable,
            Some("verify-ca") => Mode::VerifyCa,
            Some("verify-full") => Mode::VerifyFull,
            Some(weak @ ("allow" | "prefer")) => {
                return Err(PgError::Invalid(format!(
                "sslmode={weak} is refused: it falls back to plaintext whenever the server (or \
                 someone in between) declines TLS; say sslmode=verify-full (with sslrootcert), or \
                 sslmode=disable to send in clear knowingly"
            )))
            }
            Some("require") => return Err(PgError::Invalid(
                "sslmode=require is refused: in libpq it encrypts without checking who the server \
                 is; say sslmode=verify-full (or verify-ca) with sslrootcert=PATH or \
                 sslrootcert=system"
                    .into(),
            )),
            Some(_) => {
                return Err(PgError::Invalid(
                    "unknown sslmode: say disable, verify-ca or verify-full".into(),
                ))
            }
        };
    if mode == Mode::Disable {
        if any_tls_setting {
            return Err(PgError::Invalid(
                "sslmode=disable with sslrootcert, sslcert or sslkey: say which one is meant"
                    .into(),
            ));
        }
        return Ok(Parsed {
            cfg,
            mode,
            roots: None,
            client: None,
        });
    }
    let word = mode.word();
    for (i, host) in cfg.get_hosts().iter().enumerate() {
        match host {
            Host::Tcp(_) => {}
            #[cfg(unix)]
            Host::Unix(p) => {
                return Err(PgError::Invalid(format!(
                    "sslmode={word} with the Unix socket {}: PostgreSQL speaks TLS over TCP only \
                     (host {})",
                    p.display(),
                    i + 1
                )))
            }
        }
    }
    if cfg.get_hosts().len() < n {
        return Err(PgError::Invalid(format!(
            "sslmode={word} needs host=NAME for every hostaddr: the name the server's \
             certificate is checked against"
        )));
    }
    let roots = match s.sslrootcert.as_deref() {
        Some("system") => Roots::System,
        Some("") | None => {
            return Err(PgError::Invalid(format!(
                "sslmode={word} needs the roots to trust: sslrootcert=PATH (a PEM file of the CA \
                 that signed the server's certificate) or sslrootcert=system (the system's store)"
            )))
        }
        Some(p) => Roots::File(PathBuf::from(p)),
    };
    if mode == Mode::VerifyCa
        && cfg.get_password().is_some()
        && cfg.get_channel_binding() != tokio_postgres::config::ChannelBinding::Require
    {
        return Err(PgError::Invalid(
            "sslmode=verify-ca with a password needs channel_binding=require: verify-ca does not \
             check the server's name, so any server with a certificate from that CA could ask for \
             the password in clear; add channel_binding=require (SCRAM bound to this TLS channel), \
             or use sslmode=verify-full"
                .into(),
        ));
    }
    let client = match (s.sslcert, s.sslkey) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        _ => {
            return Err(PgError::Invalid(
                "a client certificate needs both sslcert and sslkey".into(),
            ))
        }
    };
    Ok(Parsed {
        cfg,
        mode,
        roots: Some(roots),
        client,
    })
}

impl Parsed {
    /// Reads the certificate files and makes the connector.
    pub fn connector(self) -> Result<Connector, PgError> {
        let mut cfg = self.cfg;
        let Some(roots) = self.roots else {
            cfg.ssl_mode(SslMode::Disable);
            return Ok(Connector { cfg, tls: None });
        };
        cfg.ssl_mode(SslMode::Require);
        let config = client_config(self.mode, &roots, self.client.as_ref())?;
        Ok(Connector {
            cfg,
            tls: Some(MakeRustls {
                config: Arc::new(config),
                mode: self.mode,
                roots: Arc::new(roots.to_string()),
            }),
        })
    }
}

/// The most bytes read from a certificate or key file.
const MAX_TLS_FILE: u64 = 1 << 20;

/// Reads a PEM file named by `setting` (`sslrootcert`, `sslcert`,
/// `sslkey`): a regular file (opened without blocking: a FIFO or a device
/// is refused, never waited on), at most 1 MiB. A private key must not be
/// readable by group or others (as libpq: mode 0600 or less, or 0640 or
/// less when root owns it).
fn read_tls_file(
    path: &std::path::Path,
    setting: &str,
    private: bool,
) -> Result<zeroize::Zeroizing<Vec<u8>>, PgError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let fail = |why: String| PgError::Invalid(format!("{setting} {}: {why}", path.display()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| fail(format!("cannot open it: {e}")))?;
    let meta = f.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() > MAX_TLS_FILE {
        return Err(fail(format!("larger than {MAX_TLS_FILE} bytes")));
    }
    if private {
        let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
        if meta.mode() & 0o777 & !allowed != 0 {
            return Err(fail(format!(
                "the private key can be read by group or others (mode {:o}): chmod 600 it",
                meta.mode() & 0o777
            )));
        }
    }
    let mut out = zeroize::Zeroizing::new(Vec::new());
    f.take(MAX_TLS_FILE + 1)
        .read_to_end(&mut out)
        .map_err(|e| fail(format!("cannot read it: {e}")))?;
    if out.len() as u64 > MAX_TLS_FILE {
        return Err(fail(format!("larger than {MAX_TLS_FILE} bytes")));
    }
    Ok(out)
}

fn client_config(
    mode: Mode,
    roots: &Roots,
    client: Option<&(PathBuf, PathBuf)>,
) -> Result<ClientConfig, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let pem = read_tls_file(path, "sslrootcert", false)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    PgError::Invalid(format!(
                        "cannot read CA certificates from sslrootcert {}: {e}",
                        path.display()
                    ))
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(PgError::Invalid(format!(
                    "sslrootcert {} holds no usable CA certificate",
                    path.display()
                )));
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(PgError::Invalid(
                    "sslrootcert=system: no system root certificates found".into(),
                ));
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Invalid(format!("TLS setup failed: {e}")))?;
    let builder = match mode {
        Mode::VerifyCa => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly {
                roots: Arc::new(store),
                provider,
            })),
        _ => builder.with_root_certificates(store),
    };
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pem = read_tls_file(cert, "sslcert", false)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    PgError::Invalid(format!(
                        "cannot read the client certificate sslcert {}: {e}",
                        cert.display()
                    ))
                })?;
            let key_pem = read_tls_file(key, "sslkey", true)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
                // The error could quote the file; say only where it is.
                PgError::Invalid(format!(
                    "cannot read a PEM private key from sslkey {}",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| PgError::Invalid(format!("the client certificate is unusable: {e}")))?
        }
    };
    // PostgreSQL 17's ALPN name; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// `sslmode=verify-ca`: the chain to a trusted root is checked (validity
/// dates, key usage, signatures), the names are not.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a TLS handshake failed, in words that name the host and the check.
#[derive(Debug)]
pub(super) struct HandshakeError(String);

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandshakeError {}

impl HandshakeError {
    fn new(host: &str, roots: &str, mode: Mode, e: &io::Error) -> HandshakeError {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let what = match tls {
            Some(rustls::Error::InvalidCertificate(c)) => match c {
                CertificateError::UnknownIssuer => format!(
                    "the server's certificate is not issued by a CA in {roots} (unknown CA)"
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => format!(
                    "the server's certificate is not valid for the name {host} (name mismatch; \
                     sslmode={} checks it)",
                    mode.word()
                ),
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => {
                    format!("the server's certificate is outside its validity period ({c:?})")
                }
                other => format!("the server's certificate is refused: {other:?}"),
            },
            Some(rustls::Error::AlertReceived(a)) => format!(
                "the server ended the handshake ({a:?}); if it asks for a client certificate, \
                 give sslcert and sslkey"
            ),
            Some(other) => format!("the TLS handshake failed: {other}"),
            None => format!("the TLS handshake failed: {e}"),
        };
        HandshakeError(format!("{host}: {what}"))
    }
}

/// tokio-postgres's [`MakeTlsConnect`] over tokio-rustls.
#[derive(Clone)]
pub(super) struct MakeRustls {
    config: Arc<ClientConfig>,
    mode: Mode,
    /// Where the roots came from, for messages.
    roots: Arc<String>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = HandshakeError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, HandshakeError> {
        let name = ServerName::try_from(domain.to_owned()).map_err(|_| {
            HandshakeError(format!(
                "{domain:?} is not a host name or IP address a certificate can name"
            ))
        })?;
        Ok(RustlsConnect {
            make: self.clone(),
            name,
        })
    }
}

/// One handshake, for one host.
pub(super) struct RustlsConnect {
    make: MakeRustls,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let host = self.name.to_str().into_owned();
            let tls = tokio_rustls::TlsConnector::from(self.make.config.clone())
                .connect(self.name, stream)
                .await
                .map_err(|e| HandshakeError::new(&host, &self.make.roots, self.make.mode, &e))?;
            let end_point = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| tls_server_end_point(cert));
            Ok(RustlsStream { tls, end_point })
        })
    }
}

/// A TLS session with the server.
pub(super) struct RustlsStream<S> {
    tls: tokio_rustls::client::TlsStream<S>,
    /// The `tls-server-end-point` channel binding, where the server's
    /// certificate gives one.
    end_point: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// `tls-server-end-point` (RFC 5929), for SCRAM-SHA-256-PLUS: the
    /// server's certificate hashed with its signature's hash; none when
    /// that hash is not one of SHA-1, SHA-256, SHA-384 or SHA-512 (or MD5).
    fn channel_binding(&self) -> ChannelBinding {
        match &self.end_point {
            Some(h) => ChannelBinding::tls_server_end_point(h.clone()),
            None => ChannelBinding::none(),
        }
    }
}

/// One DER element: its tag, its content and what follows it.
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (usize::from(first), b)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        (len, &b[n..])
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// RFC 5929 section 4.1: the hash of the certificate's DER under the hash
/// of its `signatureAlgorithm`, SHA-256 for MD5 and SHA-1.
fn tls_server_end_point(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, ... }
    let (0x30, body, _) = der(cert.as_ref())? else {
        return None;
    };
    let (0x30, _tbs, rest) = der(body)? else {
        return None;
    };
    let (0x30, alg, _) = der(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der(alg)? else {
        return None;
    };
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    let algorithm = match oid {
        [p @ .., 4 | 5 | 11] if p == RSA => &ring::digest::SHA256, // md5, sha1, sha256 WithRSA
        [p @ .., 12] if p == RSA => &ring::digest::SHA384,
        [p @ .., 13] if p == RSA => &ring::digest::SHA512,
        [p @ .., 2] if p == ECDSA_SHA2 => &ring::digest::SHA256,
        [p @ .., 3] if p == ECDSA_SHA2 => &ring::digest::SHA384,
        [p @ .., 4] if p == ECDSA_SHA2 => &ring::digest::SHA512,
        p if p == ECDSA_SHA1 => &ring::digest::SHA256,
        // RSASSA-PSS (its hash is in its parameters), Ed25519, others:
        // no binding.
        _ => return None,
    };
    Some(
        ring::digest::digest(algorithm, cert.as_ref())
            .as_ref()
            .to_vec(),
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// The connection error's words: a failed handshake as
/// [`HandshakeError`] says it, a server that declined TLS as such.
pub(super) fn connect_error(target: &str, mode: &str, e: &tokio_postgres::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HandshakeError>() {
            return Some(format!(
                "cannot connect to {target} over TLS (sslmode={mode}): {h}; nothing was sent"
            ));
        }
        // tokio-postgres's words when the server answers the SSLRequest
        // with N (its error has no kind to match).
        if s.to_string() == "server does not support TLS" {
            return Some(format!(
                "cannot connect to {target}: the server refused TLS (it answered the SSL \
                 request with N) and sslmode={mode} requires it; nothing was sent in clear"
            ));
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> Result<Mode, String> {
        parse(url).map(|p| p.mode).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_the_host() {
        assert_eq!(mode("postgresql://w@127.0.0.1:5432/db"), Ok(Mode::Disable));
        assert_eq!(mode("postgresql://w@localhost/db"), Ok(Mode::Disable));
        assert_eq!(mode("postgresql://w@[::1]:5432/db"), Ok(Mode::Disable));
        assert_eq!(
            mode("host=/run/postgresql user=w dbname=db"),
            Ok(Mode::Disable)
        );
        assert_eq!(
            mode("host=db.example hostaddr=127.0.0.1 user=w"),
            Ok(Mode::Disable)
        );
        // A remote host means verify-full, which needs roots.
        let e = mode("postgresql://w@db.example/db").unwrap_err();
        assert!(e.contains("sslmode=verify-full needs the roots"), "{e}");
        assert_eq!(
            mode("postgresql://w@db.example/db?sslrootcert=/ca.pem"),
            Ok(Mode::VerifyFull)
        );
        // One remote host among local ones is enough.
        let e = mode("host=localhost,10.0.0.7 user=w").unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        // A TLS setting on a loopback host asks for TLS.
        assert_eq!(
            mode("postgresql://w@127.0.0.1/db?sslrootcert=system"),
            Ok(Mode::VerifyFull)
        );
        assert_eq!(
            mode("postgresql://w@10.0.0.7/db?sslmode=disable"),
            Ok(Mode::Disable)
        );
    }

    #[test]
    fn verify_ca_with_a_password_needs_channel_binding() {
        // verify-ca does not check the server's name: any holder of a
        // certificate from the CA could ask for the password in clear.
        let e = mode("postgresql://w:pw@127.0.0.1/db?sslmode=verify-ca&sslrootcert=/ca.pem")
            .unwrap_err();
        assert!(e.contains("channel_binding=require"), "{e}");
        let e = mode(
            "postgresql://w:pw@127.0.0.1/db?sslmode=verify-ca&sslrootcert=/ca.pem&channel_binding=prefer",
        )
        .unwrap_err();
        assert!(e.contains("channel_binding=require"), "{e}");
        assert_eq!(
            mode("postgresql://w:pw@127.0.0.1/db?sslmode=verify-ca&sslrootcert=/ca.pem&channel_binding=require"),
            Ok(Mode::VerifyCa)
        );
        // No password to lose, or the name checked: as before.
        assert_eq!(
            mode("postgresql://w@127.0.0.1/db?sslmode=verify-ca&sslrootcert=/ca.pem"),
            Ok(Mode::VerifyCa)
        );
        assert_eq!(
            mode("postgresql://w:pw@localhost/db?sslmode=verify-full&sslrootcert=/ca.pem"),
            Ok(Mode::VerifyFull)
        );
    }

    #[test]
    fn an_empty_setting_name_is_refused() {
        // tokio-postgres stops reading at it and drops what follows (a
        // channel_binding=require, say).
        let e = mode("host=localhost user=w sslmode=verify-ca sslrootcert=/ca.pem =x channel_binding=require")
            .unwrap_err();
        assert!(e.contains("empty setting name"), "{e}");
    }

    #[test]
    fn certificate_and_key_files_must_be_regular_bounded_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_tls_file(&key, "sslkey", true).unwrap_err().to_string();
        assert!(e.contains("group or others"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_tls_file(&key, "sslkey", true).is_ok());
        let e = read_tls_file(std::path::Path::new("/dev/zero"), "sslrootcert", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; (MAX_TLS_FILE + 1) as usize]).unwrap();
        let e = read_tls_file(&big, "sslrootcert", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn weak_and_contradictory_settings_are_refused() {
        for (url, says) in [
            (
                "postgresql://w@10.0.0.7/db?sslmode=require",
                "sslmode=require is refused",
            ),
            (
                "postgresql://w@127.0.0.1/db?sslmode=prefer",
                "sslmode=prefer is refused",
            ),
            ("host=10.0.0.7 sslmode=allow", "sslmode=allow is refused"),
            ("postgresql://w@h/db?sslmode=verify", "unknown sslmode"),
            (
                "postgresql://w@h/db?sslmode=disable&sslrootcert=/ca.pem",
                "sslmode=disable with",
            ),
            (
                "postgresql://w@h/db?sslmode=verify-full&sslmode=disable",
                "given twice",
            ),
            (
                "host=/tmp sslmode=verify-full sslrootcert=/ca.pem",
                "TLS over TCP only",
            ),
            (
                "hostaddr=10.0.0.7 sslmode=verify-ca sslrootcert=/ca.pem",
                "needs host=NAME",
            ),
            (
                "postgresql://w@h/db?sslrootcert=/ca.pem&sslcert=/c.pem",
                "both sslcert and sslkey",
            ),
        ] {
            let e = mode(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn a_malformed_certificate_gives_no_channel_binding() {
        for der in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x03, 0x30, 0x01, 0x00],
            &[0x30, 0x06, 0x30, 0x00, 0x30, 0x02, 0x05, 0x00],
        ] {
            assert_eq!(
                tls_server_end_point(&CertificateDer::from(der.to_vec())),
                None
            );
        }
        // An ecdsa-with-SHA256 signature algorithm: SHA-256 of the whole.
        let cert = [
            0x30, 0x0e, 0x30, 0x00, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
            0x03, 0x02,
        ];
        assert_eq!(
            tls_server_end_point(&CertificateDer::from(cert.to_vec())),
            Some(
                ring::digest::digest(&ring::digest::SHA256, &cert)
                    .as_ref()
                    .to_vec()
            )
        );
    }

    #[test]
    fn the_rest_goes_to_tokio_postgres() {
        let p = parse(
            "postgresql://w:p%40ss@db.example:6543/audit?application_name=x&sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5&channel_binding=require",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::VerifyCa);
        assert!(matches!(&p.roots, Some(Roots::File(f)) if f == &PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.cfg.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(p.cfg.get_application_name(), Some("x"));
        assert_eq!(p.cfg.get_ports(), &[6543]);
        let p = parse(
            "host=db.example user=w sslmode = 'verify-full' sslrootcert='/my ca\\'s.pem' dbname=audit",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::VerifyFull);
        assert!(matches!(&p.roots, Some(Roots::File(f)) if f == &PathBuf::from("/my ca's.pem")));
        assert_eq!(p.cfg.get_dbname(), Some("audit"));
        // Other unknown options are still refused by tokio-postgres.
        assert!(parse("postgresql://w@127.0.0.1/db?sslcrl=/x").is_err());
        assert!(parse("host=127.0.0.1 sslmode='verify-full").is_err());
    }
}
