//! The one place where failures become HTTP responses.
//!
//! Every error carries a status and a category; [`ApiError::into_response_for`]
//! renders it in the error shape of the API the client speaks (OpenAI
//! `{"error":{"message","type","code"}}`, Anthropic
//! `{"type":"error","error":{"type","message"}}`) so each SDK raises its own
//! typed exception. Queue overflow adds `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::generator::GenError;

/// Which API's error shape to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

/// Error categories (mapped to status codes and per-API type names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidRequest,
    Authentication,
    NotFound,
    PayloadTooLarge,
    Overloaded,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: Kind,
    pub message: String,
    /// OpenAI `code` (e.g. `context_length_exceeded`); `None` uses the type.
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into(), code: None, retry_after_s: None }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidRequest, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }
    pub fn overloaded(retry_after_s: u32) -> Self {
        ApiError { retry_after_s: Some(retry_after_s), ..Self::new(Kind::Overloaded, "the server is busy: the request queue is full; retry later") }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::InvalidRequest => StatusCode::BAD_REQUEST,
            Kind::Authentication => StatusCode::UNAUTHORIZED,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn type_name(&self, api: Api) -> &'static str {
        match (api, self.kind) {
            (Api::OpenAi, Kind::InvalidRequest | Kind::NotFound | Kind::PayloadTooLarge) => "invalid_request_error",
            (Api::OpenAi, Kind::Authentication) => "authentication_error",
            (Api::OpenAi, Kind::Overloaded) => "rate_limit_error",
            (Api::OpenAi, Kind::Internal) => "server_error",
            (Api::Anthropic, Kind::InvalidRequest) => "invalid_request_error",
            (Api::Anthropic, Kind::Authentication) => "authentication_error",
            (Api::Anthropic, Kind::NotFound) => "not_found_error",
            (Api::Anthropic, Kind::PayloadTooLarge) => "request_too_large",
            (Api::Anthropic, Kind::Overloaded) => "rate_limit_error",
            (Api::Anthropic, Kind::Internal) => "api_error",
        }
    }

    /// The JSON body in `api`'s shape (also used inside SSE error events).
    pub fn body(&self, api: Api) -> serde_json::Value {
        let ty = self.type_name(api);
        match api {
            Api::OpenAi => json!({"error": {"message": self.message, "type": ty, "param": null, "code": self.code.unwrap_or(ty)}}),
            Api::Anthropic => json!({"type": "error", "error": {"type": ty, "message": self.message}}),
        }
    }

    pub fn into_response_for(self, api: Api) -> Response {
        let mut resp = (self.status(), axum::Json(self.body(api))).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<GenError> for ApiError {
    fn from(e: GenError) -> Self {
        match e {
            GenError::PromptTooLong { .. } => ApiError::invalid(e.to_string()).with_code("context_length_exceeded"),
            GenError::Invalid(_) => ApiError::invalid(e.to_string()),
            GenError::Internal(_) => ApiError::internal(e.to_string()),
        }
    }
}

impl From<dsv4_text::ChatError> for ApiError {
    fn from(e: dsv4_text::ChatError) -> Self {
        ApiError::invalid(format!("cannot render the conversation: {e}"))
    }
}

/// An error bound to an API, so handlers can return `Result<_, Rejection>`.
#[derive(Debug)]
pub struct Rejection(pub Api, pub ApiError);

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        self.1.into_response_for(self.0)
    }
}

/// Parses a JSON request body into `T`, with errors in `api`'s shape. Bad
/// UTF-8, syntax errors, wrong types and nesting past serde_json's recursion
/// limit all end up here as 400s.
pub fn parse_body<T: serde::de::DeserializeOwned>(api: Api, body: &[u8]) -> Result<T, Rejection> {
    if body.is_empty() {
        return Err(Rejection(api, ApiError::invalid("the request body is empty; expected a JSON object")));
    }
    serde_json::from_slice(body).map_err(|e| Rejection(api, ApiError::invalid(format!("invalid request body: {e}"))))
}

/// Maps a body-extraction failure (too large, broken framing) to a JSON error.
pub fn body_rejection(api: Api, e: axum::extract::rejection::BytesRejection) -> Rejection {
    let status = e.status();
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE { Kind::PayloadTooLarge } else { Kind::InvalidRequest };
    Rejection(api, ApiError::new(kind, format!("cannot read the request body: {}", e.body_text())))
}
