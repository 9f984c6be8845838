//! Prometheus-style counters and gauges, kept as atomics so handlers and the
//! worker update them without locks; `GET /metrics` renders the text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::generator::GenSummary;

#[derive(Debug, Default)]
pub struct Metrics {
    pub requests_chat: AtomicU64,
    pub requests_completions: AtomicU64,
    pub requests_responses: AtomicU64,
    pub requests_messages: AtomicU64,
    pub requests_other: AtomicU64,
    pub errors_4xx: AtomicU64,
    pub errors_5xx: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    pub cancelled: AtomicU64,
    pub generations: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Microseconds.
    pub prefill_us: AtomicU64,
    pub decode_us: AtomicU64,
    /// Last request's rates, in milli-tokens per second.
    pub last_prefill_mtps: AtomicU64,
    pub last_decode_mtps: AtomicU64,
    pub queue_depth: AtomicI64,
    pub in_flight: AtomicI64,
}

impl Metrics {
    pub fn record_summary(&self, s: &GenSummary) {
        self.generations.fetch_add(1, Relaxed);
        self.prompt_tokens.fetch_add(s.prompt_tokens as u64, Relaxed);
        self.cached_tokens.fetch_add(s.cached_tokens as u64, Relaxed);
        self.completion_tokens.fetch_add(s.completion_tokens as u64, Relaxed);
        self.prefill_us.fetch_add((s.prefill_ms * 1000.0) as u64, Relaxed);
        self.decode_us.fetch_add((s.decode_ms * 1000.0) as u64, Relaxed);
        self.last_prefill_mtps.store((s.prefill_tps() * 1000.0) as u64, Relaxed);
        self.last_decode_mtps.store((s.decode_tps() * 1000.0) as u64, Relaxed);
    }

    pub fn record_status(&self, status: u16) {
        match status {
            400..=499 => self.errors_4xx.fetch_add(1, Relaxed),
            500..=599 => self.errors_5xx.fetch_add(1, Relaxed),
            _ => 0,
        };
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let mut counter = |name: &str, help: &str, labels: &[(&str, u64)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (l, v) in labels {
                if l.is_empty() {
                    let _ = writeln!(o, "{name} {v}");
                } else {
                    let _ = writeln!(o, "{name}{{{l}}} {v}");
                }
            }
        };
        let g = |a: &AtomicU64| a.load(Relaxed);
        counter(
            "dsv4_requests_total",
            "HTTP requests by endpoint.",
            &[
                ("endpoint=\"chat_completions\"", g(&self.requests_chat)),
                ("endpoint=\"completions\"", g(&self.requests_completions)),
                ("endpoint=\"responses\"", g(&self.requests_responses)),
                ("endpoint=\"messages\"", g(&self.requests_messages)),
                ("endpoint=\"other\"", g(&self.requests_other)),
            ],
        );
        counter("dsv4_errors_total", "Error responses by class.", &[("class=\"4xx\"", g(&self.errors_4xx)), ("class=\"5xx\"", g(&self.errors_5xx))]);
        counter("dsv4_rejected_queue_full_total", "Requests refused because the queue was full.", &[("", g(&self.rejected_queue_full))]);
        counter("dsv4_cancelled_total", "Generations stopped because the client went away.", &[("", g(&self.cancelled))]);
        counter("dsv4_generations_total", "Finished generations.", &[("", g(&self.generations))]);
        counter("dsv4_prompt_tokens_total", "Prompt tokens (including cached).", &[("", g(&self.prompt_tokens))]);
        counter("dsv4_cache_hit_tokens_total", "Prompt tokens reused from the live session or disk cache.", &[("", g(&self.cached_tokens))]);
        counter("dsv4_completion_tokens_total", "Generated tokens.", &[("", g(&self.completion_tokens))]);
        let _ = writeln!(o, "# HELP dsv4_prefill_seconds_total Time spent in prefill.\n# TYPE dsv4_prefill_seconds_total counter");
        let _ = writeln!(o, "dsv4_prefill_seconds_total {:.6}", g(&self.prefill_us) as f64 / 1e6);
        let _ = writeln!(o, "# HELP dsv4_decode_seconds_total Time spent decoding.\n# TYPE dsv4_decode_seconds_total counter");
        let _ = writeln!(o, "dsv4_decode_seconds_total {:.6}", g(&self.decode_us) as f64 / 1e6);
        let _ = writeln!(o, "# HELP dsv4_prefill_tokens_per_second Last request's prefill rate.\n# TYPE dsv4_prefill_tokens_per_second gauge");
        let _ = writeln!(o, "dsv4_prefill_tokens_per_second {:.3}", g(&self.last_prefill_mtps) as f64 / 1000.0);
        let _ = writeln!(o, "# HELP dsv4_decode_tokens_per_second Last request's decode rate.\n# TYPE dsv4_decode_tokens_per_second gauge");
        let _ = writeln!(o, "dsv4_decode_tokens_per_second {:.3}", g(&self.last_decode_mtps) as f64 / 1000.0);
        let _ = writeln!(o, "# HELP dsv4_queue_depth Requests waiting for the worker.\n# TYPE dsv4_queue_depth gauge");
        let _ = writeln!(o, "dsv4_queue_depth {}", self.queue_depth.load(Relaxed).max(0));
        let _ = writeln!(o, "# HELP dsv4_in_flight Requests being generated.\n# TYPE dsv4_in_flight gauge");
        let _ = writeln!(o, "dsv4_in_flight {}", self.in_flight.load(Relaxed).max(0));
        o
    }
}
