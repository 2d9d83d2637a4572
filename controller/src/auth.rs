//! Who may receive config: dataplanes prove their ServiceAccount with a projected token,
//! which the API server checks for us (TokenReview, with our audience).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use sha2::{Digest, Sha256};

/// A review holds this long: tokens are re-checked on reconnects and acks after it.
const CACHE_FOR: Duration = Duration::from_secs(60);

pub struct Authenticator {
    client: Client,
    audience: String,
    /// `system:serviceaccount:<ns>:<name>` of the ServiceAccounts allowed.
    allowed: Vec<String>,
    /// Verdicts by the token's SHA-256, with when they were reached.
    cache: Mutex<HashMap<[u8; 32], Verdict>>,
}

type Verdict = (Instant, Result<String, Refusal>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no bearer token")]
    NoToken,
    #[error("token not authenticated: {0}")]
    NotAuthenticated(String),
    #[error("{0} may not receive config")]
    NotAllowed(String),
    #[error("cannot review the token: {0}")]
    ReviewFailed(String),
}

impl Refusal {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refusal::NoToken | Refusal::NotAuthenticated(_) => http::StatusCode::UNAUTHORIZED,
            Refusal::NotAllowed(_) => http::StatusCode::FORBIDDEN,
            Refusal::ReviewFailed(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl Authenticator {
    /// `allowed` holds `namespace:name` ServiceAccounts.
    pub fn new(client: Client, audience: String, allowed: &[String]) -> Self {
        let allowed = allowed.iter().map(|sa| format!("system:serviceaccount:{sa}")).collect();
        Self { client, audience, allowed, cache: Mutex::new(HashMap::new()) }
    }

    /// The ServiceAccount user behind an `Authorization` header, or why not.
    pub async fn check(&self, authorization: Option<&str>) -> Result<String, Refusal> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::NoToken)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((at, verdict)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&digest)
            && at.elapsed() < CACHE_FOR
        {
            return verdict.clone();
        }
        let verdict = self.review(token).await;
        if !matches!(verdict, Err(Refusal::ReviewFailed(_))) {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
            cache.insert(digest, (Instant::now(), verdict.clone()));
        }
        verdict
    }

    async fn review(&self, token: &str) -> Result<String, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let done =
            api.create(&PostParams::default(), &review).await.map_err(|e| Refusal::ReviewFailed(e.to_string()))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::NotAuthenticated(status.error.unwrap_or_else(|| "rejected".to_owned())));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        if self.allowed.contains(&user) { Ok(user) } else { Err(Refusal::NotAllowed(user)) }
    }
}
