//! Recovery share text (docs/RECOVERY.md, section 5) on arbitrary input:
//! reading never panics and fails only with the share error, bounded in
//! length; a share that reads prints its canonical text, which reads again
//! to the same share; combining whatever shares the lines of the input
//! give never panics and never returns a key whose fingerprint is not the
//! shares'.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_envelope::provider::recovery::{RecoveryPrivateKey, RecoveryShare};
use phi_envelope::Error;

fn read(text: &str) -> Option<RecoveryShare> {
    match RecoveryShare::parse(text) {
        Ok(share) => {
            let canonical = share.to_text();
            let again = RecoveryShare::parse(&canonical).expect("a canonical share reads");
            assert_eq!(again.to_text().as_str(), canonical.as_str());
            assert_eq!(
                (again.index(), again.threshold(), again.count()),
                (share.index(), share.threshold(), share.count())
            );
            assert!(share.threshold() >= 2 && share.threshold() <= share.count());
            assert!(share.index() >= 1 && share.index() <= share.count());
            Some(share)
        }
        Err(e) => {
            assert!(matches!(e, Error::RecoveryShare(_)), "{e:?}");
            assert!(
                e.to_string().len() <= 1024,
                "error of {} bytes",
                e.to_string().len()
            );
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    read(&text);
    let shares: Vec<RecoveryShare> = text.lines().take(16).filter_map(read).collect();
    if let Ok(key) = RecoveryPrivateKey::combine(&shares) {
        assert_eq!(key.public_key().fingerprint(), shares[0].fingerprint());
    }
});
