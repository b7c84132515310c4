//! The endpoint record, its entity tags and write preconditions.

use crate::ids::{AppName, AppVersionName, EndpointId};
use crate::metadata::Metadata;
use crate::Timestamp;

/// One registered endpoint, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub id: EndpointId,
    pub app: AppName,
    pub app_version: AppVersionName,
    /// When the endpoint entered its current application version.
    pub app_version_registered: Timestamp,
    pub created: Timestamp,
    pub metadata: Metadata,
    /// Last metadata change; `None` until the first change after registration.
    pub metadata_updated: Option<Timestamp>,
    /// Unique per registration (a re-registered ID gets a new one), so an entity tag of a
    /// deleted endpoint never matches its successor.
    pub incarnation: i64,
    /// Bumped on every change of the record.
    pub version: u64,
    /// Bumped on every change of the metadata only; the metadata entity tag, as in 19/EPMMP.
    pub metadata_version: u64,
}

impl Endpoint {
    /// Strong entity tag of the endpoint record, quoted as HTTP wants it.
    pub fn etag(&self) -> String {
        format!("\"{:x}-{}\"", self.incarnation, self.version)
    }

    /// Strong entity tag of the metadata document.
    pub fn metadata_etag(&self) -> String {
        format!("\"{:x}-m{}\"", self.incarnation, self.metadata_version)
    }
}

/// Which entity tag a conditional write is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    Endpoint,
    Metadata,
}

/// An `If-Match` precondition (RFC 9110 §13.1.1) on a write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Precondition {
    /// No `If-Match`: the write is unconditional.
    #[default]
    None,
    /// `If-Match: *`: the entity must exist.
    Any,
    /// `If-Match: "a", "b"`: the current strong tag must equal one of these. Weak tags
    /// never match (If-Match uses strong comparison).
    OneOf(Vec<String>),
}

impl Precondition {
    /// Parses an `If-Match` header value.
    pub fn parse_if_match(header: &str) -> Self {
        let header = header.trim();
        if header == "*" {
            return Self::Any;
        }
        Self::OneOf(
            header
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// Checks the precondition against the current endpoint. A missing endpoint fails any
    /// precondition other than `None`, but callers report "not found" first.
    pub fn check(&self, current: &Endpoint, kind: TagKind) -> Result<(), crate::DomainError> {
        let tag = match kind {
            TagKind::Endpoint => current.etag(),
            TagKind::Metadata => current.metadata_etag(),
        };
        self.check_tag(tag)
    }

    /// Checks the precondition against an entity's current strong tag.
    pub fn check_tag(&self, tag: String) -> Result<(), crate::DomainError> {
        match self {
            Self::None | Self::Any => Ok(()),
            Self::OneOf(tags) if tags.iter().any(|t| !t.starts_with("W/") && *t == tag) => Ok(()),
            Self::OneOf(_) => Err(crate::DomainError::PreconditionFailed { current: tag }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoint {
        Endpoint {
            id: EndpointId::parse("e").unwrap(),
            app: AppName::parse("a").unwrap(),
            app_version: AppVersionName::parse("a-v1").unwrap(),
            app_version_registered: Timestamp(1),
            created: Timestamp(1),
            metadata: Metadata::empty(),
            metadata_updated: None,
            incarnation: 255,
            version: 3,
            metadata_version: 2,
        }
    }

    #[test]
    fn if_match_semantics() {
        let e = ep();
        assert_eq!(e.etag(), "\"ff-3\"");
        assert_eq!(e.metadata_etag(), "\"ff-m2\"");
        let ok = Precondition::parse_if_match("\"x\", \"ff-3\"");
        assert!(ok.check(&e, TagKind::Endpoint).is_ok());
        assert!(ok.check(&e, TagKind::Metadata).is_err());
        assert!(Precondition::parse_if_match("*")
            .check(&e, TagKind::Metadata)
            .is_ok());
        assert!(Precondition::parse_if_match("W/\"ff-3\"")
            .check(&e, TagKind::Endpoint)
            .is_err());
    }
}
