//! Use cases of endpoint tokens: Kaa CM's REST shape (issue, list, get, change state) and
//! 16/ECAP (validate a token, change a token's state by its value).

use super::{Error, Registry};
use crate::command::Command;
use crate::credentials::{StoredToken, TokenListQuery, TokenStatus};
use crate::endpoint::Precondition;
use crate::ids::{AppName, EndpointId, EndpointToken, TenantId, TokenId};
use crate::query::{Page, PageRequest};
use crate::DomainError;

/// A token issued by [`Registry::issue_token`]: the token itself (shown once) and its row.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub stored: StoredToken,
}

/// The answer to a 16/ECAP token validation.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenValidation {
    /// The token identifies its endpoint (it is `Active` now, activated if it was `Inactive`).
    Valid(StoredToken),
    /// No token with this value in the application.
    Unknown,
    /// The token exists but is `Suspended` or `Revoked`.
    Refused(StoredToken),
}

impl Registry {
    /// Issues a new token to an existing endpoint (`token` given, or generated).
    pub async fn issue_token(
        &self,
        tenant: &TenantId,
        endpoint: EndpointId,
        app: &str,
        token: Option<&str>,
        correlation_id: &str,
    ) -> Result<IssuedToken, Error> {
        let app = AppName::parse(app)?;
        let token = match token {
            Some(t) => EndpointToken::parse(t)?,
            None => EndpointToken::parse(&self.ids.token())?,
        };
        let token_id = TokenId::parse(&self.ids.token_id())?;
        let hash = token.hash(&app);
        let ctx = self.ctx(tenant, correlation_id);
        let now = ctx.now;
        let cmd = Command::IssueToken {
            id: endpoint.clone(),
            app: app.clone(),
            token_hash: hash,
            token_id: token_id.clone(),
        };
        self.store.execute(cmd, ctx).await?;
        Ok(IssuedToken {
            token: token.into_string(),
            stored: StoredToken {
                id: token_id,
                endpoint_id: endpoint,
                app,
                hash,
                status: TokenStatus::Inactive,
                created: now,
                updated: None,
            },
        })
    }

    /// An endpoint's tokens (`404` when the endpoint does not exist).
    pub async fn list_tokens(
        &self,
        tenant: &TenantId,
        endpoint: &EndpointId,
        query: &TokenListQuery,
        page: PageRequest,
    ) -> Result<Page<StoredToken>, Error> {
        let page = self
            .store
            .list_tokens(tenant, endpoint, query, page)
            .await?;
        if page.total == 0 {
            self.get(tenant, endpoint).await?;
        }
        Ok(page)
    }

    pub async fn get_token(
        &self,
        tenant: &TenantId,
        endpoint: &EndpointId,
        id: &TokenId,
    ) -> Result<StoredToken, Error> {
        match self.store.get_token(tenant, endpoint, id).await? {
            Some(t) => Ok(t),
            None => {
                self.get(tenant, endpoint).await?;
                Err(DomainError::not_found("endpoint token", id.as_str()).into())
            }
        }
    }

    /// Moves an endpoint's token to `target` (suspend, reactivate, revoke) and answers the
    /// token after the change.
    pub async fn transition_token(
        &self,
        tenant: &TenantId,
        endpoint: EndpointId,
        id: TokenId,
        target: TokenStatus,
        precondition: Precondition,
        correlation_id: &str,
    ) -> Result<StoredToken, Error> {
        let cmd = Command::TransitionToken {
            id: endpoint.clone(),
            token_id: id.clone(),
            target,
            precondition,
            only_from: None,
        };
        self.store
            .execute(cmd, self.ctx(tenant, correlation_id))
            .await?;
        self.get_token(tenant, &endpoint, &id).await
    }

    /// 16/ECAP token validation: resolves the endpoint of a token of an application and
    /// activates an `Inactive` token (its first successful validation).
    pub async fn validate_token(
        &self,
        tenant: &TenantId,
        app: &str,
        token: &str,
        correlation_id: &str,
    ) -> Result<TokenValidation, Error> {
        let app = AppName::parse(app)?;
        let token = EndpointToken::parse(token)?;
        let hash = token.hash(&app);
        let Some(found) = self.store.find_token(tenant, &app, &hash).await? else {
            return Ok(TokenValidation::Unknown);
        };
        match found.status {
            TokenStatus::Active => Ok(TokenValidation::Valid(found)),
            TokenStatus::Suspended | TokenStatus::Revoked => Ok(TokenValidation::Refused(found)),
            TokenStatus::Inactive => {
                let cmd = Command::TransitionToken {
                    id: found.endpoint_id.clone(),
                    token_id: found.id.clone(),
                    target: TokenStatus::Active,
                    precondition: Precondition::None,
                    only_from: Some(TokenStatus::Inactive),
                };
                match self
                    .store
                    .execute(cmd, self.ctx(tenant, correlation_id))
                    .await
                {
                    // Activated (or activated by a concurrent validation).
                    Ok(_) => {}
                    // Changed meanwhile (suspended, revoked, endpoint gone): answer what
                    // the token is now.
                    Err(Error::Rejected(
                        DomainError::Conflict { .. } | DomainError::NotFound { .. },
                    )) => {}
                    Err(e) => return Err(e),
                }
                Ok(match self.store.find_token(tenant, &app, &hash).await? {
                    None => TokenValidation::Unknown,
                    Some(t) if t.status == TokenStatus::Active => TokenValidation::Valid(t),
                    Some(t) => TokenValidation::Refused(t),
                })
            }
        }
    }

    /// 16/ECAP status transition: moves the token with this value to `target`. `None` when
    /// no such token exists.
    pub async fn transition_token_by_value(
        &self,
        tenant: &TenantId,
        app: &str,
        token: &str,
        target: TokenStatus,
        correlation_id: &str,
    ) -> Result<Option<StoredToken>, Error> {
        let app = AppName::parse(app)?;
        let token = EndpointToken::parse(token)?;
        let hash = token.hash(&app);
        let Some(found) = self.store.find_token(tenant, &app, &hash).await? else {
            return Ok(None);
        };
        self.transition_token(
            tenant,
            found.endpoint_id,
            found.id,
            target,
            Precondition::None,
            correlation_id,
        )
        .await
        .map(Some)
    }
}
