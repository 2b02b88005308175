//! Shared setup of the PKCS#11 test binaries: a fresh SoftHSM2 token per
//! test binary (process).
//!
//! SoftHSM2 is unreliable when several processes use one token directory at
//! the same time (upstream issue #757), and `cargo test` runs test binaries
//! one after another but other tooling may not. So each binary creates its
//! own token: it writes a `softhsm2.conf` into a new temporary directory,
//! points `SOFTHSM2_CONF` of its own process at it before the module is
//! initialized, initializes the token with the SO PIN and sets the user PIN
//! (through `cryptoki`, like an operator would with `softhsm2-util`). The
//! module path, token label and PINs come from the environment that
//! `scripts/softhsm-env.sh` / `scripts/test-services.sh` export; without
//! them the tests fail loudly, they are never skipped.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use phi_envelope::provider::pkcs11::{Pin, Pkcs11Config, Pkcs11Provider};
use phi_envelope::KeyRef;

const HOWTO: &str = "SoftHSM2 not configured: run `scripts/test-services.sh start && source \
    target/test-services/env.sh` (or `source scripts/softhsm-env.sh \"$(mktemp -d)\"`), then \
    `cargo test --features pkcs11 --test pkcs11`";

/// The token of this test process.
pub struct Token {
    pub module: String,
    pub label: String,
    pub so_pin: String,
    /// The test's own handle on the module (the library state is shared
    /// with the provider's handle: one library per process).
    pub ctx: Pkcs11,
    pub dir: tempfile::TempDir,
}

fn env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{var} is not set. {HOWTO}"),
    }
}

/// The token, created on first use.
pub fn token() -> &'static Token {
    static TOKEN: OnceLock<Token> = OnceLock::new();
    TOKEN.get_or_init(create_token)
}

fn create_token() -> Token {
    let module = env("PHI_PKCS11_MODULE");
    assert!(
        Path::new(&module).is_file(),
        "PHI_PKCS11_MODULE={module} does not exist. {HOWTO}"
    );
    let label = env("PHI_PKCS11_TOKEN");
    let so_pin = env("PHI_PKCS11_SO_PIN");
    let pin = env("PHI_PKCS11_PIN");

    let dir = tempfile::Builder::new()
        .prefix("phi-pkcs11-test-")
        .tempdir()
        .expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
             slots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n",
            tokens.display()
        ),
    )
    .unwrap();
    // Before anything in this process initializes the module.
    std::env::set_var("SOFTHSM2_CONF", &conf);

    let ctx = Pkcs11::new(&module).unwrap_or_else(|e| panic!("loading {module}: {e}. {HOWTO}"));
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            panic!("the module was initialized before the test token was set up")
        }
        Err(e) => panic!("initializing {module}: {e}. {HOWTO}"),
    }
    let free = ctx
        .get_all_slots()
        .unwrap()
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|t| !t.token_initialized())
                .unwrap_or(false)
        })
        .expect("SoftHSM2 offers a free slot");
    ctx.init_token(free, &AuthPin::new(so_pin.clone().into()), &label)
        .expect("init token");
    let slot = find_slot(&ctx, &label);
    let s = ctx.open_rw_session(slot).unwrap();
    s.login(UserType::So, Some(&AuthPin::new(so_pin.clone().into())))
        .unwrap();
    s.init_pin(&AuthPin::new(pin.into())).unwrap();
    s.logout().unwrap();
    drop(s);
    Token {
        module,
        label,
        so_pin,
        ctx,
        dir,
    }
}

pub fn find_slot(ctx: &Pkcs11, label: &str) -> Slot {
    ctx.get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|t| t.label() == label)
                .unwrap_or(false)
        })
        .expect("the test token")
}

/// The provider configuration for the test token (PIN from the
/// environment, as a service would read it).
pub fn config() -> Pkcs11Config {
    let t = token();
    Pkcs11Config::new(
        &t.module,
        &t.label,
        Pin::from_env("PHI_PKCS11_PIN").unwrap(),
    )
}

pub async fn provider() -> Pkcs11Provider {
    provider_with(config()).await
}

pub async fn provider_with(config: Pkcs11Config) -> Pkcs11Provider {
    token();
    Pkcs11Provider::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test token: {e}. {HOWTO}"))
}

/// `pkcs11:token=<test token>;object=<label>`.
pub fn key(label: &str) -> KeyRef {
    format!("pkcs11:token={};object={label}", token().label)
        .parse()
        .unwrap()
}

/// A logged-in session of the test itself, for looking at the objects.
/// (Logging in again is a no-op when the provider is logged in: login state
/// is per process.)
pub fn session() -> Session {
    let t = token();
    let s = t.ctx.open_rw_session(find_slot(&t.ctx, &t.label)).unwrap();
    match s.login(
        UserType::User,
        Some(&AuthPin::new(env("PHI_PKCS11_PIN").into())),
    ) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("test login: {e}"),
    }
    s
}

/// The secret-key objects labelled `label`, with their CKA_ID.
pub fn key_objects(s: &Session, label: &str) -> Vec<(cryptoki::object::ObjectHandle, Vec<u8>)> {
    s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
    .unwrap()
    .into_iter()
    .map(|h| {
        let id = s
            .get_attributes(h, &[AttributeType::Id])
            .unwrap()
            .into_iter()
            .find_map(|a| match a {
                Attribute::Id(id) => Some(id),
                _ => None,
            })
            .unwrap_or_default();
        (h, id)
    })
    .collect()
}

/// The boolean attribute `ty` of `h`.
pub fn bool_attr(s: &Session, h: cryptoki::object::ObjectHandle, ty: AttributeType) -> bool {
    let attrs = s.get_attributes(h, &[ty]).unwrap();
    attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::Sensitive(b)
            | Attribute::Extractable(b)
            | Attribute::AlwaysSensitive(b)
            | Attribute::NeverExtractable(b)
            | Attribute::Token(b)
            | Attribute::Private(b)
            | Attribute::Encrypt(b)
            | Attribute::Decrypt(b)
            | Attribute::Wrap(b)
            | Attribute::Unwrap(b)
            | Attribute::Modifiable(b) => Some(b),
            _ => None,
        })
        .unwrap_or_else(|| panic!("attribute {ty:?} not readable"))
}

/// The kind of a provider error.
pub fn kind(e: &phi_envelope::Error) -> phi_envelope::provider::ProviderErrorKind {
    match e {
        phi_envelope::Error::Provider(p) => p.kind(),
        other => panic!("expected a provider error, got {other:?}"),
    }
}
