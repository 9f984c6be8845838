//! `dsv4 tokenize` and `dsv4 render`: thin front ends over `dsv4-text`, useful
//! to check ids and prompts against DeepSeek's reference byte for byte.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, ValueEnum};
use dsv4_text::chat::{encode_messages, parse_messages_json, EncodeOptions, ReasoningEffort, ThinkingMode};
use dsv4_text::Tokenizer;

/// Where the vocabulary comes from.
#[derive(Args, Debug, Clone)]
pub struct TokenizerSource {
    /// A GGUF whose `tokenizer.ggml.*` metadata holds the vocabulary.
    #[arg(long, value_name = "FILE.gguf", conflicts_with = "tokenizer")]
    pub model: Option<PathBuf>,
    /// A Hugging Face tokenizer.json.
    #[arg(long, value_name = "tokenizer.json")]
    pub tokenizer: Option<PathBuf>,
}

impl TokenizerSource {
    fn load(&self) -> Result<Tokenizer> {
        match (&self.model, &self.tokenizer) {
            (Some(m), _) => Tokenizer::from_gguf_path(m).with_context(|| format!("loading the tokenizer of {}", m.display())),
            (None, Some(t)) => Tokenizer::from_tokenizer_json(t).with_context(|| format!("loading {}", t.display())),
            (None, None) => bail!("give --model FILE.gguf or --tokenizer tokenizer.json"),
        }
    }
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").args(["text", "file"])))]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub source: TokenizerSource,
    /// Text to tokenize.
    #[arg(long)]
    pub text: Option<String>,
    /// File whose contents (UTF-8) to tokenize; without --text or --file, stdin is read.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Do not recognise special/added tokens in the text (plain BPE).
    #[arg(long)]
    pub plain: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    Chat,
    Thinking,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EffortArg {
    Max,
    High,
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    /// Messages JSON: an array of messages (official encoder shape) or an object
    /// with `messages` (and optionally `tools`, attached to the first message).
    #[arg(long, value_name = "M.json")]
    pub messages: PathBuf,
    /// chat (`</think>` opener) or thinking (`<think>` opener).
    #[arg(long, value_enum, default_value = "thinking")]
    pub mode: ModeArg,
    /// `max` adds the Think-Max prefix in thinking mode; `high` adds nothing.
    #[arg(long, value_enum)]
    pub reasoning_effort: Option<EffortArg>,
    /// Tool definitions (OpenAI `tools` array), attached to the first message
    /// as the official test driver does.
    #[arg(long, value_name = "T.json")]
    pub tools: Option<PathBuf>,
    /// Serving context in tokens: below 393216, max is downgraded to high (ds4's rule).
    #[arg(long)]
    pub context_tokens: Option<u64>,
    /// Print token ids (JSON array) instead of the prompt text.
    #[arg(long)]
    pub ids: bool,
    #[command(flatten)]
    pub source: TokenizerSource,
}

fn print_ids(ids: &[u32]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(ids)?)?;
    Ok(())
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = a.source.load()?;
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading stdin")?;
            s
        }
    };
    let ids = if a.plain { tok.encode_plain(&text) } else { tok.encode(&text) };
    print_ids(&ids)
}

pub fn render(a: RenderArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.messages).with_context(|| format!("reading {}", a.messages.display()))?;
    let mut messages = parse_messages_json(&text).with_context(|| format!("parsing {}", a.messages.display()))?;
    if let Some(t) = &a.tools {
        let tools: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(t).with_context(|| format!("reading {}", t.display()))?).with_context(|| format!("{} is not a JSON array of tools", t.display()))?;
        match messages.first_mut() {
            Some(first) => first.tools = Some(tools),
            None => bail!("--tools given but there are no messages"),
        }
    }
    let opts = EncodeOptions {
        mode: match a.mode {
            ModeArg::Chat => ThinkingMode::Chat,
            ModeArg::Thinking => ThinkingMode::Thinking,
        },
        reasoning_effort: a.reasoning_effort.map(|e| match e {
            EffortArg::Max => ReasoningEffort::Max,
            EffortArg::High => ReasoningEffort::High,
        }),
        context_tokens: a.context_tokens,
        ..EncodeOptions::default()
    };
    let prompt = encode_messages(&messages, &opts)?;
    if a.ids {
        let tok = a.source.load()?;
        return print_ids(&tok.encode(&prompt));
    }
    let mut out = std::io::stdout().lock();
    out.write_all(prompt.as_bytes())?;
    out.flush()?;
    Ok(())
}
