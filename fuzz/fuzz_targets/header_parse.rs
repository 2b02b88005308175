//! Header parsing on arbitrary bytes: `Header::parse`, `Header::read_from`
//! through readers that hand out the input in pieces (with `Interrupted`
//! errors), and `envelope::inspect` / `inspect_reader` all agree; a parsed
//! header is exactly the bytes it consumed, within every bound, and parses
//! again to itself.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use phi_envelope::envelope::{inspect, inspect_reader};
use phi_envelope::format::{
    FIXED_PREFIX_LEN, HEADER_TAG_LEN, MAX_HEADER_LEN, MAX_RECIPIENTS, VERSION,
};
use phi_envelope::{cobblestone, Header};
use phi_envelope_fuzz::io::Pieces;

fuzz_target!(|data: &[u8]| {
    let parsed = Header::parse(data);
    match &parsed {
        Ok((h, used)) => {
            let used = *used;
            assert_eq!(used, h.len());
            assert!(used <= MAX_HEADER_LEN && used <= data.len());
            assert!(used >= FIXED_PREFIX_LEN + HEADER_TAG_LEN);
            assert_eq!(h.as_bytes(), &data[..used]);
            assert!(!h.is_empty());
            assert_eq!(h.version(), VERSION);
            let n = h.recipients().len();
            assert!((1..=MAX_RECIPIENTS).contains(&n));
            for r in h.recipients() {
                r.validate().expect("a parsed entry validates");
            }
            let (again, used2) = Header::parse(h.as_bytes()).expect("re-parse");
            assert_eq!((&again, used2), (h, used));
            let _ = format!("{h:?}");
        }
        Err(e) => {
            let _ = format!("{e} {e:?}");
        }
    }

    for codes in [&[][..], &[1], &[0, 3, 1, 200, 7, 64]] {
        let mut r = Pieces::new(data, codes);
        match (Header::read_from(&mut r), &parsed) {
            (Ok(h), Ok((h0, used))) => {
                assert_eq!(&h, h0);
                assert_eq!(
                    r.position(),
                    *used,
                    "read_from consumed more than its header"
                );
            }
            (Err(e), Err(e0)) => assert_eq!(e.to_string(), e0.to_string()),
            (a, b) => panic!("read_from {a:?} but parse {b:?}"),
        }
    }

    let info = inspect(data);
    let info_r = inspect_reader(Cursor::new(data));
    match (&parsed, &info, &info_r) {
        (Ok((h, used)), _, _) => {
            let body = (data.len() - used) as u64;
            match (&info, cobblestone::plaintext_len(body)) {
                (Ok(i), Ok(n)) => {
                    assert_eq!(&i.header, h);
                    assert_eq!(i.body_len, Some(body));
                    assert_eq!(i.plaintext_len, Some(n));
                    assert_eq!(i.chunks, Some(n / cobblestone::CHUNK_SIZE as u64 + 1));
                }
                (Err(_), Err(_)) => {}
                (a, b) => panic!("inspect {a:?} but plaintext_len {b:?}"),
            }
        }
        (Err(_), Err(_), Err(_)) => {}
        (a, b, c) => panic!("parse {a:?}, inspect {b:?}, inspect_reader {c:?}"),
    }
    match (&info, &info_r) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("inspect {a:?} but inspect_reader {b:?}"),
    }
});
