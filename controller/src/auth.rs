//! Who may receive config: dataplanes prove their ServiceAccount with a projected token,
//! which the API server checks for us (TokenReview, with our audience). A projected token is
//! bound to its pod, and the review names the pod: that name is the only one the dataplane
//! may ack for.
//!
//! Every verdict, refusals included, is cached by the token's hash, and reviews of tokens
//! not seen before are rate limited per client address: a flood of made-up tokens costs the
//! API server at most [`REVIEWS_PER_SECOND`] per address, one replayed token costs it
//! nothing, and a token accepted before is reviewed again without waiting for the limit, so
//! a flood cannot lock out dataplanes already known.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::Mutex,
    time::{Duration, Instant},
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use sha2::{Digest, Sha256};

/// A review holds this long: tokens are re-checked on reconnects and acks after it.
const CACHE_FOR: Duration = Duration::from_secs(60);
/// How long an accepted token is remembered as accepted, to review it again past the limit.
const KNOWN_FOR: Duration = Duration::from_secs(3600);
/// Reviews of new tokens per second and client address, with a burst of as many: a fleet
/// of dataplanes reconnecting at once gets through in seconds; a flood is turned away
/// without a review.
pub const REVIEWS_PER_SECOND: u32 = 20;
/// No ServiceAccount token is this long (they are a few KiB at most).
const MAX_TOKEN: usize = 16 * 1024;
/// The extra field of a review that names the pod a token is bound to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

pub struct Authenticator {
    client: Client,
    audience: String,
    /// `system:serviceaccount:<ns>:<name>` of the ServiceAccounts allowed.
    allowed: Vec<String>,
    /// Verdicts by the token's SHA-256, with when they were reached.
    cache: Mutex<HashMap<[u8; 32], Verdict>>,
    reviews: DefaultKeyedRateLimiter<IpAddr>,
    reviewed: prometheus::IntCounter,
}

type Verdict = (Instant, Result<Identity, Refusal>);

/// A dataplane the API server vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `system:serviceaccount:<ns>:<name>`.
    pub user: String,
    /// The pod the token is bound to: a projected token always is; one made by hand
    /// (`kubectl create token`) is not.
    pub pod: Option<String>,
}

impl Identity {
    /// Whether this dataplane may speak for `node` in an ack.
    pub fn may_ack_for(&self, node: &str) -> Result<(), Refusal> {
        match &self.pod {
            Some(pod) if pod != node => Err(Refusal::NotItself { node: node.to_owned(), pod: pod.clone() }),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no bearer token")]
    NoToken,
    #[error("not a ServiceAccount token")]
    Malformed,
    #[error("token not authenticated: {0}")]
    NotAuthenticated(String),
    #[error("{0} may not receive config")]
    NotAllowed(String),
    #[error("cannot review the token: {0}")]
    ReviewFailed(String),
    #[error("too many new tokens to review; try again shortly")]
    TooManyReviews,
    #[error("an ack for node {node} refused: the token is pod {pod}'s")]
    NotItself { node: String, pod: String },
}

impl Refusal {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refusal::NoToken | Refusal::Malformed | Refusal::NotAuthenticated(_) => http::StatusCode::UNAUTHORIZED,
            Refusal::NotAllowed(_) | Refusal::NotItself { .. } => http::StatusCode::FORBIDDEN,
            Refusal::ReviewFailed(_) => http::StatusCode::SERVICE_UNAVAILABLE,
            Refusal::TooManyReviews => http::StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// A JWT's shape: three base64url parts. Anything else is refused without a review.
fn looks_like_a_jwt(token: &str) -> bool {
    let b64url = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    token.len() <= MAX_TOKEN && token.split('.').count() == 3 && token.split('.').all(b64url)
}

impl Authenticator {
    /// `allowed` holds `namespace:name` ServiceAccounts.
    /// `reviewed` counts the reviews sent.
    pub fn new(client: Client, audience: String, allowed: &[String], reviewed: prometheus::IntCounter) -> Self {
        let allowed = allowed.iter().map(|sa| format!("system:serviceaccount:{sa}")).collect();
        let rate = NonZeroU32::new(REVIEWS_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        Self {
            client,
            audience,
            allowed,
            cache: Mutex::new(HashMap::new()),
            reviews: RateLimiter::keyed(Quota::per_second(rate)),
            reviewed,
        }
    }

    /// The dataplane behind an `Authorization` header sent from `peer`, or why not.
    pub async fn check(&self, authorization: Option<&str>, peer: IpAddr) -> Result<Identity, Refusal> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::NoToken)?;
        if !looks_like_a_jwt(token) {
            return Err(Refusal::Malformed);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let known = match self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&digest) {
            Some((at, verdict)) if at.elapsed() < CACHE_FOR => return verdict.clone(),
            Some((_, verdict)) => verdict.is_ok(),
            None => false,
        };
        if !known && self.reviews.check_key(&peer).is_err() {
            return Err(Refusal::TooManyReviews);
        }
        self.reviewed.inc();
        let verdict = self.review(token).await;
        if !matches!(verdict, Err(Refusal::ReviewFailed(_))) {
            // The rate limit bounds how many refusals a minute can add; accepted tokens are
            // the dataplanes' own, a few per pod and hour.
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (at, v)| at.elapsed() < if v.is_ok() { KNOWN_FOR } else { CACHE_FOR });
            cache.insert(digest, (Instant::now(), verdict.clone()));
            self.reviews.retain_recent();
        }
        verdict
    }

    async fn review(&self, token: &str) -> Result<Identity, Refusal> {
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
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        if !self.allowed.contains(&name) {
            return Err(Refusal::NotAllowed(name));
        }
        let pod = user.extra.and_then(|mut e| e.remove(POD_NAME_EXTRA)).and_then(|v| v.into_iter().next());
        Ok(Identity { user: name, pod })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_jwt_shaped_tokens_are_reviewed() {
        assert!(looks_like_a_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_"));
        for bad in ["not-a-token", "a.b", "a.b.c.d", "a..c", "a.b.c d", "a.b.c=", &"a.b.".repeat(6000)] {
            assert!(!looks_like_a_jwt(bad), "{bad:.40}");
        }
    }

    #[test]
    fn a_pod_token_acks_only_for_its_own_pod() {
        let bound = Identity { user: "system:serviceaccount:g:dp".into(), pod: Some("dp-1".into()) };
        assert_eq!(bound.may_ack_for("dp-1"), Ok(()));
        let e = bound.may_ack_for("dp-2").expect_err("another pod's name");
        assert_eq!(e.to_string(), "an ack for node dp-2 refused: the token is pod dp-1's");
        assert_eq!(e.status(), http::StatusCode::FORBIDDEN);
        let unbound = Identity { pod: None, ..bound };
        assert_eq!(unbound.may_ack_for("anything"), Ok(()));
    }
}
