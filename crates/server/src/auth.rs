//! Optional API-key check. Accepts `Authorization: Bearer KEY` (OpenAI SDKs)
//! or `x-api-key: KEY` (Anthropic SDKs); compares in constant time so the key
//! cannot be recovered by timing. `/health` stays open for probes.

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use crate::errors::{Api, ApiError, Kind};
use crate::AppState;

/// Which error shape a path uses.
pub fn api_for_path(path: &str) -> Api {
    if path.starts_with("/v1/messages") {
        Api::Anthropic
    } else {
        Api::OpenAi
    }
}

fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        return Some(v.as_bytes());
    }
    let v = headers.get(axum::http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.len().min(7));
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

/// True when `given` equals `key`; time depends only on the lengths.
pub fn key_matches(key: &[u8], given: &[u8]) -> bool {
    key.len() == given.len() && bool::from(key.ct_eq(given))
}

pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = state.cfg.api_key.as_deref() else { return next.run(req).await };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let ok = presented(req.headers()).is_some_and(|g| key_matches(key.as_bytes(), g));
    if ok {
        next.run(req).await
    } else {
        ApiError::new(Kind::Authentication, "invalid or missing API key (send `Authorization: Bearer KEY` or `x-api-key: KEY`)")
            .with_code("invalid_api_key")
            .into_response_for(api_for_path(req.uri().path()))
    }
}
