//! `dsv4`: the command-line front end. Thin: every subcommand parses its
//! arguments and calls into the engine / text / server crates.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cmd_bench;
mod cmd_gguf;
mod cmd_logits;
mod cmd_text;

#[derive(Parser)]
#[command(name = "dsv4", version, about = "DeepSeek V4 Flash inference engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Evaluate a fixture's tokens.json and write logits files in the fixture layout.
    Logits(cmd_logits::LogitsArgs),
    /// Benchmarks (kernels; synthetic models).
    Bench(cmd_bench::BenchArgs),
    /// Tokenize text and print the ids as a JSON array.
    Tokenize(cmd_text::TokenizeArgs),
    /// Render a chat (messages JSON) into the exact prompt text or ids.
    Render(cmd_text::RenderArgs),
    /// GGUF tools: inspect, diff.
    Gguf(cmd_gguf::GgufArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Logits(a) => cmd_logits::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
        Cmd::Tokenize(a) => cmd_text::tokenize(a),
        Cmd::Render(a) => cmd_text::render(a),
        Cmd::Gguf(a) => cmd_gguf::run(a),
    }
}
