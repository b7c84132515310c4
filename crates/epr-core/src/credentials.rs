//! Endpoint credentials: endpoint tokens with Kaa CM's life cycle, claim tokens for device
//! self-registration, and the refusals a self-registration can meet.
//!
//! Tokens belong to their endpoint. Every token write is an endpoint [`crate::command::Command`]
//! (routed, locked and committed with the endpoint's other writes, planned by
//! [`crate::command::plan`]), so a token never outlives its endpoint and a token change commits
//! with its events like any other change. Stores keep only hashes: [`EndpointToken::hash`]
//! for endpoint tokens, [`claim_hash`] for claim tokens, [`secret_hash`] for provisioning
//! secrets, each with its own domain-separation prefix.

use crate::command::Registration;
use crate::ids::{AppName, ClaimId, EndpointId, TokenHash, TokenId};
use crate::{DomainError, Timestamp, ValidationError};
use std::fmt;

/// Kaa CM's token states: `Inactive` (issued, never used) → `Active` (on the first
/// successful validation) ↔ `Suspended`; `Revoked` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TokenStatus {
    Inactive,
    Active,
    Suspended,
    Revoked,
}

impl TokenStatus {
    pub const ALL: [TokenStatus; 4] = [
        TokenStatus::Inactive,
        TokenStatus::Active,
        TokenStatus::Suspended,
        TokenStatus::Revoked,
    ];

    /// Kaa's spelling (`Inactive`, `Active`, `Suspended`, `Revoked`); also the stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inactive => "Inactive",
            Self::Active => "Active",
            Self::Suspended => "Suspended",
            Self::Revoked => "Revoked",
        }
    }

    /// Kaa's spelling, any letter case (16/ECAP does not list `targetStatus` values, so
    /// `ACTIVE` and `active` are accepted too).
    pub fn parse(s: &str, field: &str) -> Result<Self, ValidationError> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                ValidationError::new(
                    field,
                    "enum",
                    format!("must be one of Inactive, Active, Suspended, Revoked; got '{s}'"),
                )
            })
    }

    /// Whether a token may move from `self` to `to` (`to != self`). Refusals are `409`
    /// conflicts with field `status`.
    pub fn check_transition(self, to: TokenStatus) -> Result<(), DomainError> {
        use TokenStatus::*;
        let refuse = |message: String| {
            Err(DomainError::Conflict {
                field: "status",
                message,
            })
        };
        match (self, to) {
            (Revoked, _) => refuse("the token is revoked; revocation is final".into()),
            (_, Inactive) => refuse(format!(
                "a token cannot return to Inactive (it is {})",
                self.as_str()
            )),
            (Inactive, Active | Suspended | Revoked)
            | (Active, Suspended | Revoked)
            | (Suspended, Active | Revoked) => Ok(()),
            (from, to) => refuse(format!(
                "a token cannot go from {} to {}",
                from.as_str(),
                to.as_str()
            )),
        }
    }
}

impl fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One endpoint token as stored (never the token itself).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredToken {
    pub id: TokenId,
    pub endpoint_id: EndpointId,
    pub app: AppName,
    pub hash: TokenHash,
    pub status: TokenStatus,
    pub created: Timestamp,
    /// The last status change, if any.
    pub updated: Option<Timestamp>,
}

impl StoredToken {
    /// The token's strong entity tag (quoted): it changes with every status change.
    pub fn etag(&self) -> String {
        format!(
            "\"{}-{}-{:x}\"",
            self.id,
            self.status.as_str(),
            self.updated.unwrap_or(self.created).0
        )
    }
}

/// What a command does to its endpoint's token rows (applied by the store in the command's
/// transaction, after the endpoint row).
#[derive(Debug, Clone, PartialEq)]
pub enum TokenOp {
    /// A new token row. Its hash must be free in the application: stores check, as they do
    /// for the endpoint ID, and refuse with `409` field `endpointToken`; its ID must be free
    /// in the tenant (`409`, field `endpointTokenId`).
    Insert(StoredToken),
    /// A token of this endpoint changes status.
    SetStatus {
        id: TokenId,
        status: TokenStatus,
        updated: Timestamp,
    },
    /// Every token row of the endpoint goes (the endpoint is unregistered; Kaa's CM deletes
    /// an unregistered endpoint's tokens, after announcing them revoked).
    DeleteAll,
}

/// An endpoint-ID pattern (a regular expression matched against the whole ID), at most 256
/// characters. Compiled once, when parsed: it is matched on every self-registration.
#[derive(Debug, Clone)]
pub struct IdPattern {
    text: String,
    regex: regex::Regex,
}

impl PartialEq for IdPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for IdPattern {}

impl IdPattern {
    pub fn parse(s: &str, field: &str) -> Result<Self, ValidationError> {
        if s.is_empty() || s.len() > 256 {
            return Err(ValidationError::new(
                field,
                "max-length",
                "must be a regular expression of 1 to 256 characters",
            ));
        }
        let regex = regex::RegexBuilder::new(&format!("^(?:{s})$"))
            .size_limit(1 << 20)
            .build()
            .map_err(|e| {
                ValidationError::new(
                    field,
                    "regex",
                    format!("not a valid regular expression: {e}"),
                )
            })?;
        Ok(Self {
            text: s.to_owned(),
            regex,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the whole of `id` matches.
    pub fn matches(&self, id: &str) -> bool {
        self.regex.is_match(id)
    }
}

/// Which endpoint IDs a claim token may register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimBinding {
    Any,
    Endpoint(EndpointId),
    Pattern(IdPattern),
}

/// When and by which endpoint a claim token was used.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimUse {
    pub at: Timestamp,
    pub endpoint_id: EndpointId,
}

/// A one-time claim token, pre-provisioned by an operator for a device's self-registration.
/// Unique per application by hash.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimToken {
    pub id: ClaimId,
    pub app: AppName,
    pub hash: TokenHash,
    pub created: Timestamp,
    pub expires: Timestamp,
    pub binding: ClaimBinding,
    pub used: Option<ClaimUse>,
}

impl ClaimToken {
    /// Whether this claim token may register `id` in `app` at `now`.
    pub fn check(&self, app: &AppName, id: &EndpointId, now: Timestamp) -> Result<(), Refusal> {
        if &self.app != app {
            return Err(Refusal::new(
                RefusalReason::CredentialInvalid,
                "the claim token is not valid for this application",
            ));
        }
        if self.used.is_some() {
            return Err(Refusal::new(
                RefusalReason::ClaimTokenUsed,
                "the claim token has already been used",
            ));
        }
        if now >= self.expires {
            return Err(Refusal::new(
                RefusalReason::ClaimTokenExpired,
                "the claim token has expired",
            ));
        }
        let bound = match &self.binding {
            ClaimBinding::Any => true,
            ClaimBinding::Endpoint(e) => e == id,
            ClaimBinding::Pattern(p) => p.matches(id.as_str()),
        };
        if !bound {
            return Err(Refusal::new(
                RefusalReason::ClaimTokenWrongEndpoint,
                format!("the claim token is not valid for endpoint '{id}'"),
            ));
        }
        Ok(())
    }
}

fn tagged_hash(tag: &[u8], app: &AppName, secret: &str) -> TokenHash {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(tag);
    h.update(app.as_str().as_bytes());
    h.update(b"\0");
    h.update(secret.as_bytes());
    TokenHash(h.finalize().into())
}

/// The stored form of a claim token (never equal to an endpoint token's hash of the same text).
pub fn claim_hash(app: &AppName, claim: &str) -> TokenHash {
    tagged_hash(b"epr-claim-token-v1\0", app, claim)
}

/// The stored form of an application's provisioning secret.
pub fn secret_hash(app: &AppName, secret: &str) -> TokenHash {
    tagged_hash(b"epr-provisioning-secret-v1\0", app, secret)
}

/// Equality of two hashes in time that does not depend on where they differ.
pub fn hashes_equal(a: &TokenHash, b: &TokenHash) -> bool {
    a.0.iter()
        .zip(b.0.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// What a self-registration of an ID that is already registered does (per application).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reregistration {
    /// Refused with [`RefusalReason::AlreadyRegistered`].
    #[default]
    Refuse,
    /// The device gets a new token; every earlier token of the endpoint is revoked. The
    /// record (application version, metadata) is left as it is.
    Reissue,
}

/// A device's self-registration, checked against its application's rules by the caller;
/// what remains to check is what only the store's transaction can: the claim token (if any)
/// is unused, unexpired and bound to this ID, and whether the ID is registered.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfRegistration {
    pub registration: Registration,
    /// The hash ([`claim_hash`]) of the claim token presented, if the credential is one.
    /// It is used up in the same transaction as the registration.
    pub claim: Option<TokenHash>,
    pub reregistration: Reregistration,
}

/// Why a self-registration was refused: stable, machine-readable codes (the device API's
/// `reason`, the rejection log and the metric's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalReason {
    /// The request itself is malformed (the body, an ID, a version name).
    InvalidRequest,
    /// The application (or version) is unknown in the tenant.
    UnknownApplication,
    /// Self-registration is closed for the application (or it has no rules).
    Closed,
    /// No credential was presented.
    CredentialMissing,
    /// The provisioning secret or claim token is wrong.
    CredentialInvalid,
    /// The application accepts claim tokens only.
    ClaimTokenRequired,
    ClaimTokenUsed,
    ClaimTokenExpired,
    ClaimTokenWrongEndpoint,
    EndpointIdNotAllowed,
    MetadataKeyMissing,
    MetadataValueNotAllowed,
    MetadataTooLarge,
    AlreadyRegistered,
    RateLimited,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 15] = [
        Self::InvalidRequest,
        Self::UnknownApplication,
        Self::Closed,
        Self::CredentialMissing,
        Self::CredentialInvalid,
        Self::ClaimTokenRequired,
        Self::ClaimTokenUsed,
        Self::ClaimTokenExpired,
        Self::ClaimTokenWrongEndpoint,
        Self::EndpointIdNotAllowed,
        Self::MetadataKeyMissing,
        Self::MetadataValueNotAllowed,
        Self::MetadataTooLarge,
        Self::AlreadyRegistered,
        Self::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid-request",
            Self::UnknownApplication => "unknown-application",
            Self::Closed => "self-registration-closed",
            Self::CredentialMissing => "credential-missing",
            Self::CredentialInvalid => "credential-invalid",
            Self::ClaimTokenRequired => "claim-token-required",
            Self::ClaimTokenUsed => "claim-token-used",
            Self::ClaimTokenExpired => "claim-token-expired",
            Self::ClaimTokenWrongEndpoint => "claim-token-wrong-endpoint",
            Self::EndpointIdNotAllowed => "endpoint-id-not-allowed",
            Self::MetadataKeyMissing => "metadata-key-missing",
            Self::MetadataValueNotAllowed => "metadata-value-not-allowed",
            Self::MetadataTooLarge => "metadata-too-large",
            Self::AlreadyRegistered => "already-registered",
            Self::RateLimited => "rate-limited",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused self-registration: the reason and a sentence for people. `field` names the
/// offending request field or metadata key, when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub message: String,
    pub field: Option<String>,
}

impl Refusal {
    pub fn new(reason: RefusalReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// A refused self-registration as the operator sees it (`GET …/self-registration/rejections`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub at: Timestamp,
    pub app: AppName,
    /// As the device sent them (unvalidated, truncated to 256 characters by the caller).
    pub app_version: Option<String>,
    pub endpoint_id: Option<String>,
    /// The client's address (`ip:port` without the port: the IP).
    pub source: String,
    pub reason: RefusalReason,
    pub message: String,
}

/// How many rejections a store keeps per application (the oldest go first).
pub const REJECTIONS_KEPT: u64 = 1000;

/// Which tokens of an endpoint to list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenListQuery {
    /// Only tokens in one of these states; all when empty.
    pub statuses: Vec<TokenStatus>,
    /// Oldest first (`order=ASC`); newest first otherwise (Kaa's default `DESC`).
    pub ascending: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use TokenStatus::*;
        for (from, to, ok) in [
            (Inactive, Active, true),
            (Inactive, Suspended, true),
            (Inactive, Revoked, true),
            (Active, Suspended, true),
            (Active, Revoked, true),
            (Active, Inactive, false),
            (Suspended, Active, true),
            (Suspended, Revoked, true),
            (Suspended, Inactive, false),
            (Revoked, Active, false),
            (Revoked, Suspended, false),
            (Revoked, Inactive, false),
        ] {
            assert_eq!(from.check_transition(to).is_ok(), ok, "{from} -> {to}");
        }
        assert_eq!(TokenStatus::parse("SUSPENDED", "s").unwrap(), Suspended);
        assert_eq!(TokenStatus::parse("x", "s").unwrap_err().rule, "enum");
    }

    fn claim(binding: ClaimBinding) -> ClaimToken {
        let app = AppName::parse("a").unwrap();
        ClaimToken {
            id: ClaimId::parse("c1").unwrap(),
            hash: claim_hash(&app, "secret"),
            app,
            created: Timestamp(0),
            expires: Timestamp(100),
            binding,
            used: None,
        }
    }

    #[test]
    fn claim_checks() {
        let app = AppName::parse("a").unwrap();
        let id = EndpointId::parse("dev-1").unwrap();
        assert!(claim(ClaimBinding::Any)
            .check(&app, &id, Timestamp(5))
            .is_ok());
        let reason = |c: ClaimToken, now| c.check(&app, &id, Timestamp(now)).unwrap_err().reason;
        assert_eq!(
            reason(claim(ClaimBinding::Any), 100),
            RefusalReason::ClaimTokenExpired
        );
        let mut used = claim(ClaimBinding::Any);
        used.used = Some(ClaimUse {
            at: Timestamp(1),
            endpoint_id: id.clone(),
        });
        assert_eq!(reason(used, 5), RefusalReason::ClaimTokenUsed);
        let other = ClaimBinding::Endpoint(EndpointId::parse("dev-2").unwrap());
        assert_eq!(
            reason(claim(other), 5),
            RefusalReason::ClaimTokenWrongEndpoint
        );
        let pattern = ClaimBinding::Pattern(IdPattern::parse("dev-[0-9]+", "p").unwrap());
        assert!(claim(pattern).check(&app, &id, Timestamp(5)).is_ok());
        // The pattern is anchored: a match inside the ID is not enough.
        let pattern = ClaimBinding::Pattern(IdPattern::parse("ev-1", "p").unwrap());
        assert_eq!(
            reason(claim(pattern), 5),
            RefusalReason::ClaimTokenWrongEndpoint
        );
    }

    #[test]
    fn hashes_are_separated() {
        let app = AppName::parse("a").unwrap();
        let t = crate::ids::EndpointToken::parse("same").unwrap();
        assert_ne!(t.hash(&app), claim_hash(&app, "same"));
        assert_ne!(claim_hash(&app, "same"), secret_hash(&app, "same"));
        assert!(hashes_equal(&claim_hash(&app, "x"), &claim_hash(&app, "x")));
        assert!(!hashes_equal(
            &claim_hash(&app, "x"),
            &claim_hash(&app, "y")
        ));
        for r in RefusalReason::ALL {
            assert_eq!(RefusalReason::parse(r.as_str()), Some(r));
        }
    }
}
