//! The single worker thread that owns the [`Generator`] (and so the engine and
//! its live session), and the bounded queue in front of it.
//!
//! Handlers never block on the model: they `try_submit` a [`Job`] (a full
//! queue is an immediate 429 with `Retry-After`) and read [`GenMsg`]s from an
//! unbounded per-job channel (bounded in practice by `max_tokens`). The worker
//! stops a generation at the next event once the job's receiver is dropped
//! (client disconnected) or its cancel flag is set (stop sequence matched).
//! A panic inside the generator is caught and reported as an internal error so
//! the server keeps serving.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::errors::ApiError;
use crate::generator::{Flow, GenError, GenEvent, GenRequest, GenSummary, Generator, ModelInfo};
use crate::metrics::Metrics;

/// Messages from the worker to a handler.
#[derive(Debug)]
pub enum GenMsg {
    Event(GenEvent),
    Done(Result<GenSummary, GenError>),
}

/// One queued request.
pub struct Job {
    pub req: GenRequest,
    pub tx: mpsc::UnboundedSender<GenMsg>,
    pub cancel: Arc<AtomicBool>,
    pub enqueued: Instant,
}

/// A handler's view of a submitted job.
pub struct JobHandle {
    pub rx: mpsc::UnboundedReceiver<GenMsg>,
    pub cancel: Arc<AtomicBool>,
}

/// The sending side of the queue, shared by all handlers.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    pub info: ModelInfo,
}

impl WorkerHandle {
    /// Enqueues without waiting; a full (or closed) queue is a 429.
    pub fn try_submit(&self, req: GenRequest) -> Result<JobHandle, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job { req, tx, cancel: cancel.clone(), enqueued: Instant::now() };
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(JobHandle { rx, cancel }),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.metrics.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(ApiError::overloaded(2)),
                    mpsc::error::TrySendError::Closed(_) => Err(ApiError::internal("the generation worker has stopped")),
                }
            }
        }
    }
}

/// Starts the worker thread; `queue` is the number of requests that may wait.
pub fn spawn(mut generator: Box<dyn Generator>, queue: usize, metrics: Arc<Metrics>) -> std::io::Result<WorkerHandle> {
    let info = generator.model_info();
    let (tx, mut rx) = mpsc::channel::<Job>(queue.max(1));
    let m = metrics.clone();
    std::thread::Builder::new().name("dsv4-worker".into()).spawn(move || {
        while let Some(job) = rx.blocking_recv() {
            m.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if job.tx.is_closed() || job.cancel.load(Ordering::Relaxed) {
                m.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            m.in_flight.fetch_add(1, Ordering::Relaxed);
            let waited = job.enqueued.elapsed();
            let tx = job.tx.clone();
            let cancel = job.cancel.clone();
            let mut client_gone = false;
            let mut cb = |ev: GenEvent| {
                if cancel.load(Ordering::Relaxed) {
                    return Flow::Stop;
                }
                if tx.send(GenMsg::Event(ev)).is_err() {
                    client_gone = true;
                    return Flow::Stop;
                }
                Flow::Continue
            };
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| generator.generate(job.req, &mut cb)))
                .unwrap_or_else(|p| {
                    let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
                    tracing::error!("generator panicked: {msg}");
                    Err(GenError::Internal(format!("the generator panicked: {msg}")))
                });
            if client_gone {
                m.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(s) = &result {
                m.record_summary(s);
                tracing::info!(
                    "generation: queued {:.0} ms, prompt {} (cached {}), completion {}, prefill {:.1} t/s, decode {:.1} t/s, finish {:?}",
                    waited.as_secs_f64() * 1000.0,
                    s.prompt_tokens,
                    s.cached_tokens,
                    s.completion_tokens,
                    s.prefill_tps(),
                    s.decode_tps(),
                    s.finish
                );
            }
            // counted out before the client hears Done, so a client that
            // reads the metrics right after its last event sees it finished
            m.in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = job.tx.send(GenMsg::Done(result));
        }
    })?;
    Ok(WorkerHandle { tx, metrics, info })
}
