//! The HSM, KMS and Transit providers, when the example is built with the
//! `pkcs11`, `aws-kms` or `vault` feature. Configured from the environment only (secrets
//! never on the command line); see docs/CLI.md.

use std::sync::Arc;

use phi_envelope::KeyProvider;

use crate::CliError;

/// A secret from `VAR` or from the file named by `VAR_FILE` (one trailing
/// newline removed).
fn secret_env(var: &str) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, CliError> {
    if let Ok(v) = std::env::var(var) {
        if !v.is_empty() {
            return Ok(Some(zeroize::Zeroizing::new(v.into_bytes())));
        }
    }
    let file_var = format!("{var}_FILE");
    if let Some(path) = std::env::var_os(&file_var) {
        let mut bytes = std::fs::read(&path).map_err(|e| {
            CliError::usage(format!(
                "cannot read {} (from {file_var}): {e}",
                std::path::Path::new(&path).display()
            ))
        })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        return Ok(Some(zeroize::Zeroizing::new(bytes)));
    }
    Ok(None)
}

/// The PKCS#11 provider: `PHI_ENVELOPE_PKCS11_MODULE` (the library),
/// `PHI_ENVELOPE_PKCS11_TOKEN` (the token label) and the user PIN in
/// `PHI_ENVELOPE_PKCS11_PIN` or the file `PHI_ENVELOPE_PKCS11_PIN_FILE`.
#[cfg(feature = "pkcs11")]
pub fn pkcs11(rt: &tokio::runtime::Runtime) -> Result<Arc<dyn KeyProvider>, CliError> {
    use phi_envelope::provider::local::SecretString;
    use phi_envelope::provider::pkcs11::{Pin, Pkcs11Config, Pkcs11Provider};
    let need = |var: &str| {
        std::env::var(var).map_err(|_| {
            CliError::usage(format!(
                "pkcs11 keys need {var} (and PHI_ENVELOPE_PKCS11_MODULE, PHI_ENVELOPE_PKCS11_TOKEN, PHI_ENVELOPE_PKCS11_PIN or _PIN_FILE)"
            ))
        })
    };
    let module = need("PHI_ENVELOPE_PKCS11_MODULE")?;
    let token = need("PHI_ENVELOPE_PKCS11_TOKEN")?;
    let pin = secret_env("PHI_ENVELOPE_PKCS11_PIN")?.ok_or_else(|| {
        CliError::usage(
            "pkcs11 keys need the token's user PIN in PHI_ENVELOPE_PKCS11_PIN or the file named by PHI_ENVELOPE_PKCS11_PIN_FILE".into(),
        )
    })?;
    let pin = String::from_utf8(pin.to_vec())
        .map_err(|_| CliError::usage("the PKCS#11 PIN is not UTF-8".into()))?;
    let config = Pkcs11Config::new(module, token, Pin::new(SecretString::from(pin)));
    let p = rt.block_on(Pkcs11Provider::connect(config))?;
    Ok(Arc::new(p))
}

/// The AWS KMS provider: the standard AWS configuration (region,
/// credentials, `AWS_ENDPOINT_URL`), and the context-digest secret (32+
/// bytes) in `PHI_ENVELOPE_KMS_CONTEXT_KEY` or the file
/// `PHI_ENVELOPE_KMS_CONTEXT_KEY_FILE`.
#[cfg(feature = "aws-kms")]
pub fn aws_kms(rt: &tokio::runtime::Runtime) -> Result<Arc<dyn KeyProvider>, CliError> {
    use phi_envelope::provider::aws_kms::{AwsKmsConfig, AwsKmsProvider};
    let key = secret_env("PHI_ENVELOPE_KMS_CONTEXT_KEY")?.ok_or_else(|| {
        CliError::usage(
            "aws-kms keys need the context digest secret (32+ bytes) in PHI_ENVELOPE_KMS_CONTEXT_KEY or the file named by PHI_ENVELOPE_KMS_CONTEXT_KEY_FILE".into(),
        )
    })?;
    let sdk = rt.block_on(aws_config::defaults(aws_config::BehaviorVersion::latest()).load());
    let p = AwsKmsProvider::new(&sdk, AwsKmsConfig::new(&key)?)?;
    Ok(Arc::new(p))
}

/// The Vault / OpenBao Transit provider: the standard Vault environment
/// (`VAULT_ADDR`, `VAULT_TOKEN`, `VAULT_NAMESPACE`, `VAULT_CACERT`, or their
/// `BAO_*` twins), and the context-digest secret (32+ bytes) in
/// `PHI_ENVELOPE_VAULT_CONTEXT_KEY` or the file
/// `PHI_ENVELOPE_VAULT_CONTEXT_KEY_FILE`.
#[cfg(feature = "vault")]
pub fn vault() -> Result<Arc<dyn KeyProvider>, CliError> {
    use phi_envelope::provider::vault::{VaultConfig, VaultTransitProvider};
    let key = secret_env("PHI_ENVELOPE_VAULT_CONTEXT_KEY")?.ok_or_else(|| {
        CliError::usage(
            "vault-transit keys need the context digest secret (32+ bytes) in PHI_ENVELOPE_VAULT_CONTEXT_KEY or the file named by PHI_ENVELOPE_VAULT_CONTEXT_KEY_FILE".into(),
        )
    })?;
    Ok(Arc::new(VaultTransitProvider::new(VaultConfig::from_env(
        &key,
    )?)?))
}
