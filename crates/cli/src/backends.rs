//! Backend selection: the one place that knows which backends exist.
//! `auto` picks CUDA when a GPU is usable, else the CPU (with a one-line notice).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dsv4_engine::{Backend, CpuBackend, Model};

/// Prefill chunk the CUDA backend sizes its activation scratch for.
pub const CUDA_MAX_CHUNK: usize = 256;

pub fn make(name: &str, model: Arc<Model>, ctx: usize) -> Result<Box<dyn Backend>> {
    match name {
        "cpu" => Ok(Box::new(CpuBackend::with_ctx(model, ctx))),
        "cuda" => Ok(Box::new(dsv4_cuda::CudaBackend::new(model, ctx, CUDA_MAX_CHUNK).context("starting the CUDA backend")?)),
        "auto" => match dsv4_cuda::available() {
            Ok(()) => make("cuda", model, ctx),
            Err(why) => {
                eprintln!("dsv4: no usable GPU ({why}); using the CPU backend");
                make("cpu", model, ctx)
            }
        },
        other => bail!("unknown backend `{other}` (available: auto, cpu, cuda)"),
    }
}
