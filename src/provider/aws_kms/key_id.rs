//! KMS key identifiers: key id, key ARN, alias name, alias ARN; and the check
//! of the key id KMS answers with against the one asked for.

/// What an `aws-kms:` reference names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum KmsRef {
    /// A key, by ARN (`arn:PARTITION:kms:REGION:ACCOUNT:key/ID`) or bare id.
    Key(KmsKey),
    /// An alias name (`alias/NAME`) or alias ARN.
    Alias(String),
}

/// A resolved key: its id and, where known, its ARN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct KmsKey {
    /// The full key ARN, when known.
    pub arn: Option<String>,
    /// The key id (`1234abcd-...` or `mrk-...`).
    pub id: String,
}

/// The parts of a KMS ARN.
pub(super) struct Arn<'a> {
    pub partition: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    resource: &'a str,
}

/// The parts of a KMS key or alias ARN; `None` for anything else.
pub(super) fn parse_arn(s: &str) -> Option<Arn<'_>> {
    let rest = s.strip_prefix("arn:")?;
    let mut parts = rest.splitn(5, ':');
    let partition = parts.next()?;
    let service = parts.next()?;
    let region = parts.next()?;
    let account = parts.next()?;
    let resource = parts.next()?;
    (partition.starts_with("aws") && service == "kms" && !region.is_empty() && !account.is_empty())
        .then_some(Arn {
            partition,
            region,
            account,
            resource,
        })
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl KmsRef {
    /// The ARN parts of the reference, when it is a key or alias ARN.
    pub fn arn(&self) -> Option<Arn<'_>> {
        match self {
            KmsRef::Key(k) => k.arn.as_deref().and_then(parse_arn),
            KmsRef::Alias(a) => parse_arn(a),
        }
    }

    /// Parses the part of a reference after `aws-kms:` (already validated by
    /// [`KeyRef`](crate::KeyRef)).
    pub fn parse(key_id: &str) -> Option<KmsRef> {
        if key_id.starts_with("alias/") {
            return Some(KmsRef::Alias(key_id.to_owned()));
        }
        if let Some(arn) = parse_arn(key_id) {
            if arn.resource.starts_with("alias/") {
                return Some(KmsRef::Alias(key_id.to_owned()));
            }
            let id = arn.resource.strip_prefix("key/")?;
            return valid_id(id).then(|| {
                KmsRef::Key(KmsKey {
                    arn: Some(key_id.to_owned()),
                    id: id.to_owned(),
                })
            });
        }
        valid_id(key_id).then(|| {
            KmsRef::Key(KmsKey {
                arn: None,
                id: key_id.to_owned(),
            })
        })
    }
}

impl KmsKey {
    /// A key from what KMS reports (DescribeKey's KeyId and Arn).
    pub fn from_metadata(id: &str, arn: Option<&str>) -> Option<KmsKey> {
        let key = KmsKey {
            arn: arn.map(str::to_owned),
            id: id.to_owned(),
        };
        (valid_id(id) && arn.is_none_or(|a| key.matches(a))).then_some(key)
    }

    /// What to send as `KeyId`: the ARN when known (it pins region and
    /// account too), else the id.
    pub fn pin(&self) -> &str {
        self.arn.as_deref().unwrap_or(&self.id)
    }

    /// The account of the key, when its ARN is known.
    #[cfg(test)]
    pub fn account(&self) -> Option<&str> {
        self.arn.as_deref().and_then(parse_arn).map(|a| a.account)
    }

    /// The region of the key, when its ARN is known.
    pub fn region(&self) -> Option<&str> {
        self.arn.as_deref().and_then(parse_arn).map(|a| a.region)
    }

    /// True when `answered` (a KeyId from a KMS response: a key ARN, or a
    /// bare key id from some KMS-compatible servers) names this key. An ARN
    /// must equal ours exactly when we know ours; otherwise its key id must
    /// equal our id. Alias forms never match: KMS answers with keys.
    pub fn matches(&self, answered: &str) -> bool {
        if let Some(arn) = parse_arn(answered) {
            let Some(id) = arn.resource.strip_prefix("key/") else {
                return false;
            };
            match &self.arn {
                Some(ours) => ours == answered,
                None => id == self.id,
            }
        } else {
            valid_id(answered) && answered == self.id
        }
    }

    /// The key this answer names, for the header: the answered ARN when it
    /// is one (checked by [`matches`](Self::matches) first), else ours.
    pub fn canonical(&self, answered: &str) -> KmsKey {
        if parse_arn(answered).is_some() {
            KmsKey {
                arn: Some(answered.to_owned()),
                id: self.id.clone(),
            }
        } else {
            self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    const ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn parses_every_form() {
        assert_eq!(
            KmsRef::parse(ARN),
            Some(KmsRef::Key(KmsKey {
                arn: Some(ARN.into()),
                id: ID.into()
            }))
        );
        assert_eq!(
            KmsRef::parse(ID),
            Some(KmsRef::Key(KmsKey {
                arn: None,
                id: ID.into()
            }))
        );
        assert_eq!(
            KmsRef::parse("alias/phi"),
            Some(KmsRef::Alias("alias/phi".into()))
        );
        let alias_arn = "arn:aws:kms:us-east-1:111122223333:alias/phi";
        assert_eq!(
            KmsRef::parse(alias_arn),
            Some(KmsRef::Alias(alias_arn.into()))
        );
        assert_eq!(KmsRef::parse("arn:aws:s3:::bucket"), None);
    }

    #[test]
    fn answers_are_checked() {
        let by_arn = KmsKey {
            arn: Some(ARN.into()),
            id: ID.into(),
        };
        let by_id = KmsKey {
            arn: None,
            id: ID.into(),
        };
        for k in [&by_arn, &by_id] {
            assert!(k.matches(ARN));
            assert!(k.matches(ID));
            assert!(!k.matches("arn:aws:kms:us-east-1:111122223333:key/other"));
            assert!(!k.matches("other"));
            assert!(!k.matches("alias/phi"));
            assert!(!k.matches("arn:aws:kms:us-east-1:111122223333:alias/phi"));
            assert!(!k.matches(""));
        }
        // Same id, other account or region: only a bare-id reference
        // accepts it (KMS resolved the bare id in the caller's account).
        let elsewhere =
            "arn:aws:kms:eu-west-1:444455556666:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert!(!by_arn.matches(elsewhere));
        assert!(by_id.matches(elsewhere));
        assert_eq!(by_id.canonical(ARN), by_arn);
        assert_eq!(by_id.canonical(ID), by_id);
        assert_eq!(by_arn.account(), Some("111122223333"));
        assert_eq!(by_id.account(), None);
        assert_eq!(by_arn.region(), Some("us-east-1"));
    }
}
