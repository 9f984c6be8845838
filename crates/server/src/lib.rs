//! dsv4-server: OpenAI- and Anthropic-compatible HTTP APIs over one
//! generation worker.
//!
//! Layout: handlers (`openai`, `anthropic`, `responses`) parse and validate
//! requests, render the prompt with `dsv4_text::chat`, and submit a
//! [`generator::GenRequest`] to the single worker thread (`worker`) that owns
//! the [`generator::Generator`]; results come back token by token and are
//! mapped (`turn`, `sse`) to each API's JSON or SSE shapes. Errors are shaped
//! in one place (`errors`). The server never touches tensors: the real
//! generator (`engine_gen`) wraps dsv4-engine, the scripted one (`mock`) drives
//! protocol tests.

pub mod anthropic;
pub mod auth;
pub mod dsml_grammar;
#[cfg(feature = "engine")]
pub mod engine_gen;
pub mod errors;
pub mod generator;
pub mod metrics;
pub mod mock;
pub mod openai;
pub mod prompt;
pub mod responses;
pub mod sse;
pub mod toolmem;
pub mod turn;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use generator::{FinishReason, Flow, GenError, GenEvent, GenRequest, GenSummary, Generator, ModelInfo, Sampling};

use crate::errors::{ApiError, Kind};
use crate::metrics::Metrics;
use crate::toolmem::ToolMemory;
use crate::worker::WorkerHandle;

/// Server settings (the CLI maps its flags here).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub api_key: Option<String>,
    /// Largest request body accepted (bytes).
    pub body_limit: usize,
    /// Requests that may wait for the worker before new ones get 429.
    pub queue: usize,
    /// SSE keep-alive comment interval (covers long prefills).
    pub keepalive: Duration,
    pub cors: bool,
    /// Tool-call ids whose exact DSML is remembered.
    pub tool_memory_max_ids: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            api_key: None,
            body_limit: 64 << 20,
            queue: 16,
            keepalive: Duration::from_secs(10),
            cors: false,
            tool_memory_max_ids: 100_000,
            default_max_tokens: 32_768,
        }
    }
}

/// Shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    pub worker: WorkerHandle,
    pub metrics: Arc<Metrics>,
    pub tools: Arc<ToolMemory>,
    pub cfg: Arc<ServerConfig>,
}

impl AppState {
    /// Starts the worker thread around `generator`.
    pub fn new(generator: Box<dyn Generator>, cfg: ServerConfig) -> std::io::Result<AppState> {
        let metrics = Arc::new(Metrics::default());
        let worker = worker::spawn(generator, cfg.queue, metrics.clone())?;
        Ok(AppState { worker, metrics, tools: Arc::new(ToolMemory::new(cfg.tool_memory_max_ids)), cfg: Arc::new(cfg) })
    }
}

async fn health(State(state): State<AppState>) -> Response {
    axum::Json(serde_json::json!({"status": "ok", "model": state.worker.info.id, "ctx": state.worker.info.ctx})).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn not_found(req: Request) -> Response {
    let api = auth::api_for_path(req.uri().path());
    ApiError::new(Kind::NotFound, format!("no route for {} {}", req.method(), req.uri().path())).into_response_for(api)
}

async fn count_status(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    state.metrics.record_status(resp.status().as_u16());
    resp
}

/// The full router (used by `serve` and by tests).
pub fn router(state: AppState) -> Router {
    let mut r = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(anthropic::messages))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.cfg.body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_status));
    if state.cfg.cors {
        r = r.layer(tower_http::cors::CorsLayer::permissive());
    }
    r.with_state(state)
}

/// True for loopback addresses (where running without a key is safe).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Binds and serves until Ctrl-C. Warns when exposed beyond loopback without a key.
pub async fn serve(addr: SocketAddr, state: AppState) -> std::io::Result<()> {
    if !is_loopback(&addr) && state.cfg.api_key.is_none() {
        tracing::warn!("listening on {addr} without --api-key: anyone who can reach this address can use the model");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("dsv4 server listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

/// For the CLI: logging to stderr (`RUST_LOG` overrides `info`), a
/// multi-threaded runtime, then [`serve`] until Ctrl-C.
pub fn run_blocking(addr: SocketAddr, state_fn: impl FnOnce() -> std::io::Result<AppState>) -> std::io::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let state = state_fn()?;
    rt.block_on(serve(addr, state))
}
