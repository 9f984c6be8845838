//! Running a job and streaming it: submit to the worker, wait until the
//! prompt is accepted (so validation errors are still proper 4xx responses),
//! then either fold the turn into one response or stream it as SSE through a
//! per-API [`SseMapper`]. Keep-alive comments flow while prefill runs. The
//! SSE body owns the job's receiver, so a client disconnect drops it and the
//! worker stops at the next token.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};

use crate::errors::ApiError;
use crate::generator::{GenEvent, GenRequest, GenSummary, TokenLogprob};
use crate::turn::{Out, Turn};
use crate::worker::{GenMsg, JobHandle};
use crate::AppState;

/// A submitted job whose prompt has been accepted.
pub struct Running {
    pub job: JobHandle,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub turn: Turn,
    /// Logprobs not yet attached to an emitted event.
    pub pending_logprobs: Vec<TokenLogprob>,
    early: Option<Result<GenSummary, ApiError>>,
    /// The job ended before any token (protocol shortcut).
    pre_done: Option<Result<GenSummary, ApiError>>,
}

/// One step of a running turn.
pub enum Step {
    Outs(Vec<Out>),
    Done(Result<GenSummary, ApiError>),
}

/// Submits `req` and waits for the worker to accept the prompt.
pub async fn start(state: &AppState, req: GenRequest, make_turn: impl FnOnce(std::sync::Arc<std::sync::atomic::AtomicBool>) -> Turn) -> Result<Running, ApiError> {
    let mut job = state.worker.try_submit(req)?;
    let turn = make_turn(job.cancel.clone());
    match job.rx.recv().await {
        Some(GenMsg::Event(GenEvent::Started { prompt_tokens, cached_tokens })) => {
            Ok(Running { job, prompt_tokens, cached_tokens, turn, pending_logprobs: Vec::new(), early: None, pre_done: None })
        }
        Some(GenMsg::Event(GenEvent::Token { .. })) => Err(ApiError::internal("generator protocol error: token before Started")),
        Some(GenMsg::Done(Ok(s))) => Ok(Running { job, prompt_tokens: s.prompt_tokens, cached_tokens: s.cached_tokens, turn, pending_logprobs: Vec::new(), early: None, pre_done: Some(Ok(s)) }),
        Some(GenMsg::Done(Err(e))) => Err(e.into()),
        None => Err(ApiError::internal("the generation worker dropped the request")),
    }
}

impl Running {
    /// The next batch of output events, or the end.
    pub async fn next(&mut self) -> Step {
        if let Some(r) = self.early.take() {
            return Step::Done(r);
        }
        if let Some(r) = self.pre_done.take() {
            return self.end(r);
        }
        loop {
            match self.job.rx.recv().await {
                Some(GenMsg::Event(GenEvent::Token { text, logprob, .. })) => {
                    if let Some(l) = &logprob {
                        self.pending_logprobs.push(l.clone());
                    }
                    let outs = self.turn.push(&text, logprob);
                    if !outs.is_empty() {
                        return Step::Outs(outs);
                    }
                }
                Some(GenMsg::Event(GenEvent::Started { .. })) => {}
                Some(GenMsg::Done(r)) => return self.end(r.map_err(ApiError::from)),
                None => return Step::Done(Err(ApiError::internal("the generation worker stopped"))),
            }
        }
    }

    /// Flushes the parser; the result is delivered by the next `next()`.
    fn end(&mut self, r: Result<GenSummary, ApiError>) -> Step {
        let outs = self.turn.finish();
        if outs.is_empty() {
            return Step::Done(r);
        }
        self.early = Some(r);
        Step::Outs(outs)
    }

    /// Runs to the end (non-streaming).
    pub async fn collect(&mut self) -> Result<GenSummary, ApiError> {
        loop {
            if let Step::Done(r) = self.next().await {
                return r;
            }
        }
    }
}

/// Maps turn events to one API's SSE events.
pub trait SseMapper: Send + 'static {
    fn start(&mut self, run: &mut Running) -> Vec<Event>;
    fn outs(&mut self, run: &mut Running, outs: Vec<Out>) -> Vec<Event>;
    fn done(&mut self, run: &mut Running, result: Result<GenSummary, ApiError>) -> Vec<Event>;
}

/// JSON data event without a name (OpenAI chat style).
pub fn data(v: &serde_json::Value) -> Event {
    Event::default().data(v.to_string())
}

/// Named event (Anthropic / Responses style).
pub fn named(name: &str, v: &serde_json::Value) -> Event {
    Event::default().event(name).data(v.to_string())
}

/// Streams a running turn through `mapper`.
pub fn stream_response<M: SseMapper>(run: Running, mapper: M, keepalive: Duration) -> Response {
    enum Phase {
        Start,
        Body,
        End,
    }
    let s = stream::unfold((run, mapper, Phase::Start), |(mut run, mut m, phase)| async move {
        match phase {
            Phase::Start => {
                let evs = m.start(&mut run);
                Some((evs, (run, m, Phase::Body)))
            }
            Phase::Body => match run.next().await {
                Step::Outs(outs) => {
                    let evs = m.outs(&mut run, outs);
                    Some((evs, (run, m, Phase::Body)))
                }
                Step::Done(r) => {
                    let evs = m.done(&mut run, r);
                    Some((evs, (run, m, Phase::End)))
                }
            },
            Phase::End => None,
        }
    })
    .flat_map(|evs| stream::iter(evs.into_iter().map(Ok::<Event, Infallible>)));
    Sse::new(s).keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive")).into_response()
}
