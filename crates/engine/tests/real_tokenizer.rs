//! Sessions on a model whose GGUF carries the real DeepSeek V4 tokenizer
//! (129,280 ids; built at test time from tiny-q2, see `common/realtok.rs`):
//! a multi-turn, thinking-mode conversation with a tool call is rendered by
//! `dsv4-text`, tokenized by the GGUF's tokenizer (specials map to the real
//! ids), and driven through `Session` on the CPU backend: save/load continues
//! bit-identically, prefix reuse and rewind agree with cold runs, and the disk
//! KV cache stores and finds a checkpoint keyed by the rendered text.

mod common;

use std::sync::{Arc, OnceLock};

use common::realtok;
use dsv4_engine::kvdisk::{DiskCache, DiskCacheOptions, SaveReason};
use dsv4_engine::sampler::{argmax, Sampler, SamplerConfig};
use dsv4_engine::session::{GenLimits, Session, SessionOptions, StopReason};
use dsv4_engine::{CpuBackend, Model};
use dsv4_gguf::GgufFile;
use dsv4_text::chat::{encode_messages, parse_messages_json, EncodeOptions, Message};
use dsv4_text::Tokenizer;

struct Fx {
    model: Arc<Model>,
    tok: Tokenizer,
}

fn fx() -> &'static Fx {
    static FX: OnceLock<Fx> = OnceLock::new();
    FX.get_or_init(|| {
        let path = realtok::model_path();
        let file = Arc::new(GgufFile::open(path).expect("built GGUF parses"));
        let tok = Tokenizer::from_gguf(&file).expect("tokenizer from the built GGUF");
        let model = Arc::new(Model::from_gguf(file, None).expect("the loader accepts the real-vocab model"));
        Fx { model, tok }
    })
}

/// The first turns: system prompt with a tool, a user question, an assistant
/// turn with reasoning and a tool call, the tool's result. Rendered in
/// thinking mode this ends with the assistant opener `<｜Assistant｜><think>`.
fn conversation() -> Vec<Message> {
    parse_messages_json(
        r#"{"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What's the weather in Paris? Answer in °C, s'il vous plaît."},
            {"role": "assistant", "content": "", "reasoning_content": "The user wants the weather; call the tool.",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "{\"temp\": 21, \"sky\": \"clear\"}"}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                  "required": ["city"]}}}]}"#,
    )
    .expect("messages")
}

/// The conversation continued: the assistant's answer (with reasoning) and a follow-up question.
fn longer_conversation() -> Vec<Message> {
    let mut m = conversation();
    let mut answer = Message::assistant("It is 21 °C and clear in Paris. 🌤");
    answer.reasoning_content = Some("The tool says 21 and clear.".into());
    m.push(answer);
    m.push(Message::user("And tomorrow? 明天呢？"));
    m
}

fn render(msgs: &[Message]) -> String {
    encode_messages(msgs, &EncodeOptions::thinking()).expect("render")
}

fn session(opts: SessionOptions) -> Session {
    Session::new(Box::new(CpuBackend::with_ctx(fx().model.clone(), 2048)), opts)
}

fn none(_: usize, _: usize) {}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// `n` greedy steps: each argmax token is fed back; returns (token, logits bits) per step.
fn greedy(s: &mut Session, n: usize) -> Vec<(u32, Vec<u32>)> {
    (0..n)
        .map(|_| {
            let t = argmax(s.logits()).expect("finite logits");
            s.extend(&[t], &mut none).unwrap();
            (t, bits(s.logits()))
        })
        .collect()
}

#[test]
fn rendering_and_special_ids_are_real() {
    let f = fx();
    assert_eq!(f.model.cfg.vocab, realtok::VOCAB);
    assert_eq!(f.tok.vocab_size(), realtok::VOCAB);
    assert_eq!((f.tok.bos_id(), f.tok.eos_id()), (realtok::BOS, realtok::EOS));
    for (s, id) in [
        ("<｜User｜>", realtok::USER),
        ("<｜Assistant｜>", realtok::ASSISTANT),
        ("<think>", realtok::THINK),
        ("</think>", realtok::THINK_END),
        ("｜DSML｜", realtok::DSML),
        ("<｜begin▁of▁sentence｜>", realtok::BOS),
        ("<｜end▁of▁sentence｜>", realtok::EOS),
    ] {
        assert_eq!(f.tok.token_id(s), Some(id), "{s}");
        assert_eq!(f.tok.encode(s), vec![id], "{s} is one atomic token");
    }
    // the GGUF's tokenizer is the tokenizer.json one
    let json = Tokenizer::from_tokenizer_json(realtok::tokenizer_json()).unwrap();
    let text = render(&longer_conversation());
    let ids = f.tok.encode(&text);
    assert_eq!(ids, json.encode(&text));
    assert_eq!(f.tok.decode(&ids), text.as_bytes(), "decode(encode(text)) == text");

    // the rendered conversation carries the chat specials and DSML
    assert!(text.contains("<｜DSML｜tool_calls>") && text.contains("</think>"), "{text}");
    assert_eq!(ids[0], realtok::BOS);
    let count = |id: u32| ids.iter().filter(|&&t| t == id).count();
    assert_eq!(count(realtok::USER), 3, "two user turns + the tool result turn");
    assert_eq!(count(realtok::ASSISTANT), 3);
    assert!(count(realtok::DSML) >= 6, "DSML markers are atomic tokens");
    assert!(count(realtok::THINK) >= 2 && count(realtok::THINK_END) >= 2);
    assert!(ids.iter().any(|&t| t >= 512), "ids beyond the toy vocabulary");
    assert!(ids.iter().all(|&t| (t as usize) < realtok::VOCAB));
    // the thinking-mode prompt ends with the assistant opener
    let short = f.tok.encode(&render(&conversation()));
    assert_eq!(short[short.len() - 2..], [realtok::ASSISTANT, realtok::THINK]);
    // rendering is append-only here (tools keep earlier reasoning): the short prompt's ids prefix the long one's
    assert!(ids.starts_with(&short), "short prompt is not a token prefix of the continued one");
}

#[test]
fn save_load_continues_bit_identically() {
    let f = fx();
    let p = f.tok.encode(&render(&conversation()));
    let follow = f.tok.encode(&encode_messages(&[Message::user("Thanks! 谢谢")], &EncodeOptions { add_bos: false, ..EncodeOptions::thinking() }).unwrap());
    assert_eq!(follow[0], realtok::USER);
    let opts = SessionOptions { chunk: 64, checkpoint_interval: 64, ..Default::default() };

    // uninterrupted: prompt, 4 greedy tokens, EOS + the next user turn, 4 more
    let mut a = session(opts.clone());
    a.sync(&p, &mut none).unwrap();
    let mut want = greedy(&mut a, 4);
    a.extend(&[realtok::EOS], &mut none).unwrap();
    a.extend(&follow, &mut none).unwrap();
    let want_follow = bits(a.logits());
    want.extend(greedy(&mut a, 4));

    // saved after the prompt, loaded into a fresh session
    let mut b = session(opts.clone());
    b.sync(&p, &mut none).unwrap();
    let mut buf = Vec::new();
    b.save(&mut buf).unwrap();
    let mut c = session(opts.clone());
    c.load(&mut buf.as_slice()).unwrap();
    assert_eq!(c.tokens(), &p[..]);
    assert_eq!(bits(c.logits()), bits(b.logits()));
    let mut buf2 = Vec::new();
    c.save(&mut buf2).unwrap();
    assert_eq!(buf, buf2, "re-saving gives the same bytes");
    eprintln!("greedy continuation: {:?}", want.iter().map(|w| w.0).collect::<Vec<_>>());
    let mut got = greedy(&mut c, 4);
    c.extend(&[realtok::EOS], &mut none).unwrap();
    c.extend(&follow, &mut none).unwrap();
    assert_eq!(bits(c.logits()), want_follow);
    got.extend(greedy(&mut c, 4));
    assert_eq!(got, want);

    // saved mid-answer (after 2 generated tokens), loaded, continued
    let mut d = session(opts.clone());
    d.sync(&p, &mut none).unwrap();
    greedy(&mut d, 2);
    let mut buf3 = Vec::new();
    d.save(&mut buf3).unwrap();
    let mut e = session(opts.clone());
    e.load(&mut buf3.as_slice()).unwrap();
    let mut got = greedy(&mut e, 2);
    e.extend(&[realtok::EOS], &mut none).unwrap();
    e.extend(&follow, &mut none).unwrap();
    got.extend(greedy(&mut e, 4));
    assert_eq!(got, want[2..].to_vec());

    // seeded sampling through Session::generate: same tokens after a load
    let gen = |s: &mut Session| {
        let mut sampler = Sampler::new(SamplerConfig { seed: 11, ..Default::default() });
        s.generate(&mut sampler, &GenLimits { max_tokens: 6, stop_tokens: vec![realtok::EOS] }, &mut |_| true).unwrap()
    };
    let mut g1 = session(opts.clone());
    g1.sync(&p, &mut none).unwrap();
    let mut g2 = session(opts.clone());
    g2.load(&mut buf.as_slice()).unwrap();
    let (x, y) = (gen(&mut g1), gen(&mut g2));
    assert_eq!(x.tokens, y.tokens);
    assert_eq!(x.reason, y.reason);
    assert!(matches!(x.reason, StopReason::MaxTokens | StopReason::StopToken));
    assert_eq!(bits(g1.logits()), bits(g2.logits()));

    // the payload belongs to this model: the 512-token fixture refuses it
    let toy = Arc::new(Model::load(&realtok::base_fixture()).unwrap());
    let mut t = Session::new(Box::new(CpuBackend::new(toy)), SessionOptions { allow_other_quant: true, ..Default::default() });
    assert!(t.load(&mut buf.as_slice()).is_err());
}

#[test]
fn prefix_reuse_and_rewind_match_cold_runs() {
    let f = fx();
    let short = f.tok.encode(&render(&conversation()));
    let long = f.tok.encode(&render(&longer_conversation()));
    assert!(long.starts_with(&short) && long.len() > short.len() + 20);
    let iv = 64;
    assert_ne!(short.len() % iv, 0, "pick a conversation whose prompt does not end on a chunk boundary");
    let opts = SessionOptions { chunk: iv, checkpoint_interval: iv, ..Default::default() };
    let mut cold = session(opts.clone());
    let st = cold.sync(&long, &mut none).unwrap();
    assert_eq!((st.reused, st.evaluated), (0, long.len()));

    // next turn of a chat: the prompt's prefix is reused, only the new tokens are evaluated
    let mut s = session(opts.clone());
    s.sync(&short, &mut none).unwrap();
    let st = s.sync(&long, &mut none).unwrap();
    assert_eq!((st.reused, st.evaluated, st.cold, st.restored_at), (short.len(), long.len() - short.len(), false, None));
    assert_eq!(s.tokens(), &long[..]);
    // chunk boundaries differ (short.len() is not a multiple of 64): float tolerance, same argmax
    let d = max_abs(s.logits(), cold.logits());
    eprintln!("prompts: {} and {} tokens; prefix reuse vs cold: max |diff| {d:e}", short.len(), long.len());
    assert!(d < 1e-4, "prefix reuse differs from the cold run by {d}");
    assert_eq!(argmax(s.logits()), argmax(cold.logits()));

    // with the same chunk boundaries, reuse is bit-exact
    let cut = short.len() / iv * iv;
    let mut s = session(opts.clone());
    s.sync(&long[..cut], &mut none).unwrap();
    let st = s.sync(&long, &mut none).unwrap();
    assert_eq!((st.reused, st.restored_at), (cut, None));
    assert_eq!(bits(s.logits()), bits(cold.logits()));

    // the model's own answer diverges from the transcript's: rewind to the last rewind
    // point at or before the divergence (a multiple of 64, same boundaries as cold) = bit-exact
    let mut s = session(opts.clone());
    s.sync(&short, &mut none).unwrap();
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    let g = s.generate(&mut sampler, &GenLimits { max_tokens: 4, stop_tokens: vec![] }, &mut |_| true).unwrap();
    assert_eq!(g.tokens.len(), 4);
    let lcp = s.tokens().iter().zip(&long).take_while(|(a, b)| a == b).count();
    assert!(lcp >= short.len() && lcp < s.pos());
    let st = s.sync(&long, &mut none).unwrap();
    assert_eq!(st.restored_at, Some(lcp / iv * iv));
    assert_eq!((st.reused, st.evaluated), (lcp / iv * iv, long.len() - lcp / iv * iv));
    assert_eq!(bits(s.logits()), bits(cold.logits()));

    // as the CLI does: a rewind point marked at the prompt's end is restored exactly there
    let mut s = session(opts.clone());
    s.sync(&short, &mut none).unwrap();
    s.mark().unwrap();
    let short_logits = bits(s.logits());
    s.generate(&mut Sampler::new(SamplerConfig::greedy()), &GenLimits { max_tokens: 4, stop_tokens: vec![] }, &mut |_| true).unwrap();
    let st = s.sync(&long, &mut none).unwrap();
    assert_eq!((st.restored_at, st.reused), (Some(short.len()), short.len()));
    assert!(max_abs(s.logits(), cold.logits()) < 1e-4);
    // and going back to the short prompt restores its stored logits without evaluating
    let st = s.sync(&short, &mut none).unwrap();
    assert_eq!((st.restored_at, st.evaluated), (Some(short.len()), 0));
    assert_eq!(bits(s.logits()), short_logits);
}

#[test]
fn disk_cache_keyed_by_rendered_text() {
    let f = fx();
    let short_text = render(&conversation());
    let long_text = render(&longer_conversation());
    let long = f.tok.encode(&long_text);
    let dir = tempfile::tempdir().unwrap();
    let mut o = DiskCacheOptions::new(dir.path());
    o.min_tokens = 64;
    o.align_tokens = 64;
    o.trim_tokens = 8;
    let c = DiskCache::open(o.clone(), f.model.fingerprint).unwrap();

    // a cold save of the first prompt: trimmed, aligned down; keyed by the text its tokens decode to
    let short = f.tok.encode(&short_text);
    let k = c.cold_save_point(short.len()).expect("long enough to save");
    assert_eq!(k % 64, 0);
    let opts = SessionOptions { chunk: 64, checkpoint_interval: 64, ..Default::default() };
    let mut s = session(opts.clone());
    s.sync(&short[..k], &mut none).unwrap();
    let key_text = f.tok.decode(&short[..k]);
    assert!(short_text.as_bytes().starts_with(&key_text) && long_text.as_bytes().starts_with(&key_text));
    let path = c.save(&s, &key_text, SaveReason::Cold).unwrap();
    assert_eq!(path.file_name().unwrap().to_string_lossy(), format!("{}.kv", dsv4_engine::kvdisk::text_key(&key_text)));

    // the next turn's rendering finds it (by text, not tokens) and continues exactly like a cold run
    let e = c.lookup(long_text.as_bytes()).expect("hit for the continued conversation");
    assert_eq!((e.tokens, e.reason, e.text_len), (k, SaveReason::Cold, key_text.len()));
    assert!(c.lookup("<｜begin▁of▁sentence｜><｜User｜>something else".as_bytes()).is_none());
    let mut t = session(opts.clone());
    assert!(c.load_into(&e, &mut t).unwrap());
    assert_eq!(t.tokens(), &short[..k]);
    let st = t.sync(&long, &mut none).unwrap();
    assert_eq!((st.reused, st.cold), (k, false));
    let mut cold = session(opts.clone());
    cold.sync(&long, &mut none).unwrap();
    assert_eq!(bits(t.logits()), bits(cold.logits()));
    assert_eq!(greedy(&mut t, 3), greedy(&mut cold, 3));

    // the toy-vocabulary fixture's cache does not see this model's checkpoint (and leaves it alone)
    let toy = Model::load(&realtok::base_fixture()).unwrap();
    assert_ne!(toy.fingerprint, f.model.fingerprint);
    let c_toy = DiskCache::open(o, toy.fingerprint).unwrap();
    assert!(c_toy.lookup(long_text.as_bytes()).is_none());
    assert!(path.exists());
    assert!(c.lookup(long_text.as_bytes()).is_some());
}
