//! `dsv4`: the command-line front end. Thin: every subcommand parses its
//! arguments and calls into the engine / text / tools / server crates.
//! One module per subcommand family, each owning its clap `Args`.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod backends;
mod demo;
mod cmd_bench;
mod cmd_convert;
mod cmd_gguf;
mod cmd_logits;
mod cmd_perplexity;
mod cmd_run;
mod cmd_serve;
mod cmd_text;

#[derive(Parser)]
#[command(name = "dsv4", version, about = "DeepSeek V4 Flash inference engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One-shot generation from a prompt, streamed to stdout.
    Run(cmd_run::RunArgs),
    /// Interactive multi-turn chat.
    Chat(cmd_run::ChatArgs),
    /// OpenAI- and Anthropic-compatible HTTP server.
    Serve(cmd_serve::ServeArgs),
    /// Evaluate a fixture's tokens.json and write logits files in the fixture layout.
    Logits(cmd_logits::LogitsArgs),
    /// Token-level perplexity (average NLL) of a text file.
    Perplexity(cmd_perplexity::PerplexityArgs),
    /// Benchmarks (kernels; synthetic models).
    Bench(cmd_bench::BenchArgs),
    /// Tokenize text and print the ids as a JSON array.
    Tokenize(cmd_text::TokenizeArgs),
    /// Render a chat (messages JSON) into the exact prompt text or ids.
    Render(cmd_text::RenderArgs),
    /// GGUF tools: inspect, diff.
    Gguf(cmd_gguf::GgufArgs),
    /// Convert the official DeepSeek V4 Flash release (safetensors) to GGUF.
    Convert(cmd_convert::ConvertArgs),
    /// Download published GGUF files from the Hugging Face Hub (resumable, verified).
    Download(cmd_convert::DownloadArgs),
    /// Collect routed-expert activation importance (imatrix) from the engine's prefill.
    Imatrix(cmd_convert::ImatrixArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => cmd_run::run(a),
        Cmd::Chat(a) => cmd_run::chat(a),
        Cmd::Serve(a) => cmd_serve::run(a),
        Cmd::Logits(a) => cmd_logits::run(a),
        Cmd::Perplexity(a) => cmd_perplexity::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
        Cmd::Tokenize(a) => cmd_text::tokenize(a),
        Cmd::Render(a) => cmd_text::render(a),
        Cmd::Gguf(a) => cmd_gguf::run(a),
        Cmd::Convert(a) => cmd_convert::convert(a),
        Cmd::Download(a) => cmd_convert::download(a),
        Cmd::Imatrix(a) => cmd_convert::imatrix(a),
    }
}
