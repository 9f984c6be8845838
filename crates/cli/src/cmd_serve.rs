//! `dsv4 serve`: parses the flags, loads the model into the real generator
//! (or a scripted mock for protocol tests via `DSV4_SERVE_MOCK_SCRIPT`), and
//! hands over to dsv4-server.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use dsv4_server::engine_gen::{DiskSettings, EngineGenerator};
use dsv4_server::mock::MockGenerator;
use dsv4_server::{AppState, Generator, ServerConfig};

#[derive(Args)]
pub struct ServeArgs {
    /// GGUF model file.
    #[arg(short = 'm', long = "model")]
    pub model: Option<PathBuf>,
    /// Address to bind. Without --api-key keep it on loopback.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Context size in tokens.
    #[arg(long, default_value_t = 32768)]
    pub ctx: usize,
    /// Backend: auto (CUDA when a GPU is usable, else CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Precision of the RoPE dims of compressed KV rows in the state: f32 (exact
    /// vs the f32 reference; 4.12 GiB at 1M tokens for V4 Flash) or bf16 (the
    /// official cache precision; 3.45 GiB, logits change slightly).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub kv_rope: dsv4_engine::pack::RopeStore,
    /// 8-bit activations for the quantised-weight products (ds4's numerics;
    /// faster, within the fixtures' q8 bounds) instead of the f32 reference.
    #[arg(long)]
    pub q8: bool,
    /// Directory of the disk KV cache (off when absent).
    #[arg(long)]
    pub kv_disk_dir: Option<PathBuf>,
    /// Disk KV cache budget in MiB.
    #[arg(long, default_value_t = 8192)]
    pub kv_disk_space_mb: u64,
    /// Require this key (`Authorization: Bearer KEY` or `x-api-key`). Also read from DSV4_API_KEY.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Allow cross-origin requests from any origin.
    #[arg(long)]
    pub cors: bool,
    /// Requests that may wait for the worker; more get 429 + Retry-After.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_body_mb: usize,
    /// Tool-call ids whose exact sampled DSML is remembered.
    #[arg(long, default_value_t = 100_000)]
    pub tool_memory_max_ids: usize,
    /// SSE keep-alive interval in seconds (covers long prefills).
    #[arg(long, default_value_t = 10)]
    pub keepalive_s: u64,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let cfg = ServerConfig {
        api_key: a.api_key.clone().or_else(|| std::env::var("DSV4_API_KEY").ok()).filter(|k| !k.is_empty()),
        body_limit: a.max_body_mb.max(1) << 20,
        queue: a.max_queue.max(1),
        keepalive: Duration::from_secs(a.keepalive_s.max(1)),
        cors: a.cors,
        tool_memory_max_ids: a.tool_memory_max_ids,
        ..ServerConfig::default()
    };
    let generator: Box<dyn Generator> = match std::env::var_os("DSV4_SERVE_MOCK_SCRIPT") {
        // Test-only: a scripted generator instead of the model (see crates/server/src/mock.rs).
        Some(p) => {
            let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", PathBuf::from(&p).display()))?;
            Box::new(MockGenerator::from_json(&text).context("parsing the mock script")?)
        }
        None => {
            let Some(model) = &a.model else { bail!("--model is required") };
            let disk = a.kv_disk_dir.clone().map(|dir| DiskSettings { dir, space_mb: a.kv_disk_space_mb });
            eprintln!("loading {} (ctx {}, --kv-rope {})…", model.display(), a.ctx, a.kv_rope);
            let backend = a.backend.clone();
            Box::new(
                EngineGenerator::load_with(model, a.ctx, disk, a.kv_rope, if a.q8 { dsv4_engine::Numerics::Q8 } else { dsv4_engine::Numerics::F32 }, &|m, ctx| crate::backends::make(&backend, m, ctx).map_err(|e| format!("{e:#}")))
                    .map_err(anyhow::Error::msg)?,
            )
        }
    };
    let addr = SocketAddr::new(a.host, a.port);
    dsv4_server::run_blocking(addr, move || AppState::new(generator, cfg)).context("server")?;
    Ok(())
}
