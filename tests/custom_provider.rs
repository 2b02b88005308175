//! A provider written outside the crate, with only the public API, passes
//! the same conformance suite as the built-in providers.

mod conformance;

use std::sync::Arc;

use conformance::{MemoryKms, Subject};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_written_provider_passes_the_conformance_suite() {
    let kms = Arc::new(MemoryKms::new("vault-sim"));
    let key = kms.add_key("records");
    let other_key = kms.add_key("archive");
    conformance::run(Subject {
        provider: kms,
        key,
        other_key,
    })
    .await;
}

#[tokio::test]
async fn destroyed_key_gives_a_clear_error() {
    use phi_envelope::{Envelope, Keyring};
    let kms = Arc::new(MemoryKms::new("vault-sim"));
    let key = kms.add_key("records");
    let env = Envelope::new(
        Keyring::builder()
            .provider(kms.clone())
            .recipient(key.clone())
            .build()
            .unwrap(),
    );
    let c = conformance::ctx("1");
    let sealed = env.seal(b"x", &c).await.unwrap();
    env.keyring()
        .destroy(&key, 1, &phi_envelope::Caller::new("operator", "shred"))
        .await
        .unwrap();
    let e = env.open(&sealed, &c).await.unwrap_err();
    match e {
        phi_envelope::Error::Provider(p) => {
            assert_eq!(
                p.kind(),
                phi_envelope::provider::ProviderErrorKind::KeyDestroyed
            )
        }
        other => panic!("expected KeyDestroyed, got {other:?}"),
    }
}
