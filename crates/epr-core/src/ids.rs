//! Validating newtypes. Each has one fallible constructor, `parse`, so every value in the
//! program has passed its rule exactly once ("parse, don't validate").

use crate::ValidationError;
use std::fmt;

/// Checks length and an allowed-character predicate; `what` becomes the field name.
fn check(
    field: &str,
    value: &str,
    max_len: usize,
    allowed: impl Fn(char) -> bool,
    rule_text: &str,
) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "required", "must not be empty"));
    }
    if value.len() > max_len {
        return Err(ValidationError::new(
            field,
            "max-length",
            format!("must be at most {max_len} characters long"),
        ));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(ValidationError::new(
            field,
            "pattern",
            format!(
                "must match {rule_text}; '{}' is not allowed",
                bad.escape_default()
            ),
        ));
    }
    Ok(())
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A tenant. Every stored key and every query carries one; while authentication is off
    /// all requests belong to the configured default tenant (`kaa`, Kaa's system tenant).
    TenantId
);
string_newtype!(
    /// An endpoint identifier: URL-unreserved characters (`^[a-zA-Z0-9._~-]+$`, as Kaa
    /// documents), at most 128 characters, unique within a tenant, immutable.
    EndpointId
);
string_newtype!(
    /// An application name: lowercase Latin letters, digits, `-` and `_` (Kaa's rule).
    AppName
);
string_newtype!(
    /// An application version name, e.g. `c8u2bklah5mkbalggie0-v1`; same alphabet as
    /// application names. Unique within a tenant, so it determines its application.
    AppVersionName
);
string_newtype!(
    /// An endpoint token: a credential, `^[^+#/.]+$` per Kaa, at most 512 characters.
    EndpointToken
);

string_newtype!(
    /// The ID of one endpoint token (Kaa CM's `endpointTokenId`): 1–64 characters of
    /// `[A-Za-z0-9-]` (we generate UUIDs). Names a token without revealing it.
    TokenId
);
string_newtype!(
    /// The ID of one claim token (`claimTokenId`): same rule as [`TokenId`].
    ClaimId
);

pub const ENDPOINT_ID_MAX: usize = 128;
pub const NAME_MAX: usize = 128;
pub const TOKEN_MAX: usize = 512;
pub const TENANT_MAX: usize = 64;

/// Endpoint IDs that collide with static REST routes (`/endpoints/batch`) and so could
/// never be read back over HTTP.
pub const RESERVED_ENDPOINT_IDS: &[&str] = &["batch"];

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
}

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        check(
            "tenant",
            s,
            TENANT_MAX,
            |c| c.is_ascii_alphanumeric() || c == '-' || c == '_',
            "^[a-zA-Z0-9_-]+$",
        )?;
        Ok(Self(s.to_owned()))
    }
}

impl EndpointId {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        check(
            "endpointId",
            s,
            ENDPOINT_ID_MAX,
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-'),
            "^[a-zA-Z0-9._~-]+$",
        )?;
        if RESERVED_ENDPOINT_IDS.contains(&s) {
            return Err(ValidationError::new(
                "endpointId",
                "reserved",
                format!("'{s}' is reserved by the REST API"),
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl AppName {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        check(
            "applicationName",
            s,
            NAME_MAX,
            is_name_char,
            "^[a-z0-9_-]+$",
        )?;
        Ok(Self(s.to_owned()))
    }
}

impl AppVersionName {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        check(
            "appVersion.name",
            s,
            NAME_MAX,
            is_name_char,
            "^[a-z0-9_-]+$",
        )?;
        Ok(Self(s.to_owned()))
    }
}

fn check_opaque_id(field: &str, s: &str) -> Result<(), ValidationError> {
    check(
        field,
        s,
        64,
        |c| c.is_ascii_alphanumeric() || c == '-',
        "^[A-Za-z0-9-]+$",
    )
}

impl TokenId {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        check_opaque_id("endpointTokenId", s)?;
        Ok(Self(s.to_owned()))
    }
}

impl ClaimId {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        check_opaque_id("claimTokenId", s)?;
        Ok(Self(s.to_owned()))
    }
}

impl EndpointToken {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        check(
            "endpointToken",
            s,
            TOKEN_MAX,
            |c| !matches!(c, '+' | '#' | '/' | '.') && !c.is_control(),
            "^[^+#/.]+$",
        )?;
        Ok(Self(s.to_owned()))
    }

    /// The stored form of a token: SHA-256 over a domain-separation prefix, the application
    /// and the token. Deterministic so uniqueness within an application can be enforced and a
    /// token can be looked up, while the plain text is never stored. Tokens we generate carry
    /// 122 random bits, so a fast hash is not a brute-force risk for them.
    pub fn hash(&self, app: &AppName) -> TokenHash {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"epr-endpoint-token-v1\0");
        h.update(app.as_str().as_bytes());
        h.update(b"\0");
        h.update(self.0.as_bytes());
        TokenHash(h.finalize().into())
    }
}

/// SHA-256 of an endpoint token (see [`EndpointToken::hash`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// The inverse of [`TokenHash::to_hex`]: exactly 64 lowercase hexadecimal digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_id_rules() {
        assert!(EndpointId::parse("67b27f9b-c4d1-41dc-b21f-2917b74c467a").is_ok());
        assert!(EndpointId::parse("a.b_c~d-E9").is_ok());
        assert_eq!(EndpointId::parse("").unwrap_err().rule, "required");
        assert_eq!(EndpointId::parse("a/b").unwrap_err().rule, "pattern");
        assert_eq!(EndpointId::parse("a b").unwrap_err().rule, "pattern");
        assert_eq!(EndpointId::parse("batch").unwrap_err().rule, "reserved");
        assert_eq!(
            EndpointId::parse(&"x".repeat(129)).unwrap_err().rule,
            "max-length"
        );
    }

    #[test]
    fn names_are_lowercase() {
        assert!(AppVersionName::parse("c8u2bklah5mkbalggie0-v1").is_ok());
        assert_eq!(AppVersionName::parse("App-V1").unwrap_err().rule, "pattern");
        assert!(AppName::parse("smart_meter").is_ok());
    }

    #[test]
    fn token_rules_and_hash() {
        assert!(EndpointToken::parse("02226466-e744-48ac-8f0c-a57fe4e77de4").is_ok());
        for bad in ["a+b", "a#b", "a/b", "a.b", ""] {
            assert!(EndpointToken::parse(bad).is_err(), "{bad}");
        }
        let t = EndpointToken::parse("tok").unwrap();
        let a = AppName::parse("a").unwrap();
        let b = AppName::parse("b").unwrap();
        assert_eq!(t.hash(&a), t.hash(&a));
        assert_ne!(t.hash(&a), t.hash(&b), "hash is scoped to the application");
    }
}
