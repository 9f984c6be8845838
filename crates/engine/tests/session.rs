//! Sessions on the fixture models: save/load and snapshot/restore continue with
//! bit-identical logits, prefix reuse and rewind agree with cold runs, generation
//! stops where it should, and the disk KV cache survives crashes and corruption.

use std::path::PathBuf;
use std::sync::Arc;

use dsv4_engine::kvdisk::{DiskCache, DiskCacheOptions, SaveReason};
use dsv4_engine::sampler::{Sampler, SamplerConfig};
use dsv4_engine::session::{GenLimits, Session, SessionOptions, StopReason};
use dsv4_engine::{CpuBackend, Model, State};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(name)
}

fn model(name: &str) -> Arc<Model> {
    Arc::new(Model::load(&fixture(name).join("model.gguf")).expect("fixture model"))
}

fn prompt(name: &str) -> (Vec<u32>, Vec<u32>) {
    let t = dsv4_engine::fixture::Tokens::load(&fixture(name).join("tokens.json")).unwrap();
    (t.prompt, t.decode)
}

fn session(m: &Arc<Model>, opts: SessionOptions) -> Session {
    Session::new(Box::new(CpuBackend::new(m.clone())), opts)
}

fn none(_: usize, _: usize) {}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Decode logits after feeding `decode` one token at a time.
fn continue_decode(s: &mut Session, decode: &[u32]) -> Vec<Vec<u32>> {
    decode
        .iter()
        .map(|&t| {
            s.extend(&[t], &mut none).unwrap();
            bits(s.logits())
        })
        .collect()
}

#[test]
fn empty_state_matches_model_state() {
    let m = model("tiny-q2");
    assert_eq!(State::empty_for(&m.cfg), m.new_state());
}

#[test]
fn save_load_continues_bit_identically() {
    let m = model("tiny-q2");
    let (p, d) = prompt("tiny-q2");
    // uninterrupted
    let mut a = session(&m, SessionOptions::default());
    a.sync(&p, &mut none).unwrap();
    let want = continue_decode(&mut a, &d);

    // saved after the prompt, loaded into a fresh session
    let mut b = session(&m, SessionOptions::default());
    b.sync(&p, &mut none).unwrap();
    let mut buf = Vec::new();
    b.save(&mut buf).unwrap();
    let mut c = session(&m, SessionOptions::default());
    c.load(&mut buf.as_slice()).unwrap();
    assert_eq!(c.tokens(), &p[..]);
    assert_eq!(bits(c.logits()), bits(b.logits()));
    // re-saving gives the same bytes
    let mut buf2 = Vec::new();
    c.save(&mut buf2).unwrap();
    assert_eq!(buf, buf2);
    assert_eq!(continue_decode(&mut c, &d), want);

    // a save mid-decode (compressor windows partially filled) too
    let mut e = session(&m, SessionOptions::default());
    e.sync(&p, &mut none).unwrap();
    continue_decode(&mut e, &d[..3]);
    let mut buf3 = Vec::new();
    e.save(&mut buf3).unwrap();
    let mut f = session(&m, SessionOptions::default());
    f.load(&mut buf3.as_slice()).unwrap();
    assert_eq!(continue_decode(&mut f, &d[3..]), want[3..].to_vec());
}

#[test]
fn corrupt_or_foreign_payloads_are_rejected() {
    let m = model("tiny-q2");
    let (p, _) = prompt("tiny-q2");
    let mut a = session(&m, SessionOptions::default());
    a.sync(&p, &mut none).unwrap();
    let mut buf = Vec::new();
    a.save(&mut buf).unwrap();
    let mut s = session(&m, SessionOptions::default());
    s.sync(&p[..5], &mut none).unwrap();
    let before = bits(s.logits());
    // every truncation and a byte flip at many offsets: an error, never a panic or a changed session
    for cut in (0..buf.len()).step_by(997).chain([buf.len() - 1]) {
        assert!(s.load(&mut &buf[..cut]).is_err(), "truncated at {cut} accepted");
    }
    for off in (0..buf.len()).step_by(1009) {
        let mut bad = buf.clone();
        bad[off] ^= 0x10;
        assert!(s.load(&mut bad.as_slice()).is_err(), "flip at {off} accepted");
    }
    assert_eq!(s.tokens(), &p[..5]);
    assert_eq!(bits(s.logits()), before);

    // another model (q4 experts): refused, unless other quantisations are allowed
    let m4 = model("tiny-q4");
    let mut q4 = session(&m4, SessionOptions::default());
    assert!(q4.load(&mut buf.as_slice()).is_err());
    let mut q4 = session(&m4, SessionOptions { allow_other_quant: true, ..Default::default() });
    q4.load(&mut buf.as_slice()).unwrap();
    assert_eq!(q4.tokens(), &p[..]);
    // a different architecture is never accepted
    let mf = model("tiny-f32");
    let mut f = session(&mf, SessionOptions { allow_other_quant: true, ..Default::default() });
    assert!(f.load(&mut buf.as_slice()).is_err());
}

#[test]
fn snapshot_restore_is_exact() {
    let m = model("tiny-q2");
    let (p, d) = prompt("tiny-q2");
    let mut s = session(&m, SessionOptions::default());
    s.sync(&p[..37], &mut none).unwrap();
    let snap = s.snapshot().unwrap();
    s.extend(&p[37..], &mut none).unwrap();
    let want = continue_decode(&mut s, &d);
    s.restore(&snap).unwrap();
    assert_eq!(s.pos(), 37);
    s.extend(&p[37..], &mut none).unwrap();
    assert_eq!(continue_decode(&mut s, &d), want);
}

#[test]
fn prefix_reuse_and_rewind_match_cold_runs() {
    let m = model("tiny-q2");
    let (p, _) = prompt("tiny-q2");
    let opts = SessionOptions { chunk: 16, checkpoint_interval: 16, ..Default::default() };
    // cold reference for the full prompt
    let mut cold = session(&m, opts.clone());
    cold.sync(&p, &mut none).unwrap();

    // prefix reuse: 40 tokens first, then the rest
    let mut s = session(&m, opts.clone());
    s.sync(&p[..40], &mut none).unwrap();
    let st = s.sync(&p, &mut none).unwrap();
    assert_eq!((st.reused, st.evaluated, st.cold, st.restored_at), (40, 30, false, None));
    // chunk boundaries differ (40 | 48 vs 48), so compare with float tolerance
    assert!(max_abs(s.logits(), cold.logits()) < 1e-4);

    // rewind: a prompt that diverges at 50 restores the rewind point at 48
    let mut q = p[..50].to_vec();
    q.extend([7, 8, 9, 10, 11]);
    let mut cold_q = session(&m, opts.clone());
    cold_q.sync(&q, &mut none).unwrap();
    let st = s.sync(&q, &mut none).unwrap();
    assert_eq!(st.restored_at, Some(48));
    assert_eq!((st.reused, st.evaluated), (48, 7));
    assert!(max_abs(s.logits(), cold_q.logits()) < 1e-4);
    // the rewind point beyond 48 is gone
    assert!(s.checkpoint_positions().iter().all(|&c| c <= 48));

    // with the same chunk boundaries as the cold runs, rewinding is bit-exact
    let mut s = session(&m, opts.clone());
    s.sync(&p, &mut none).unwrap();
    s.sync(&q, &mut none).unwrap();
    assert_eq!(bits(s.logits()), bits(cold_q.logits()));
    s.sync(&p, &mut none).unwrap();
    assert_eq!(bits(s.logits()), bits(cold.logits()));

    // a prompt that is a prefix of a rewind point's position uses its stored logits
    s.mark().unwrap();
    let st = s.sync(&p[..32], &mut none).unwrap();
    assert_eq!((st.restored_at, st.evaluated), (Some(32), 0));
    let mut c32 = session(&m, opts.clone());
    c32.sync(&p[..32], &mut none).unwrap();
    assert_eq!(bits(s.logits()), bits(c32.logits()));

    // divergence before the first rewind point: cold prefill
    let st = s.sync(&[0, 5, 6], &mut none).unwrap();
    assert!(st.cold);
    assert_eq!(s.tokens(), &[0, 5, 6]);
}

#[test]
fn progress_and_cancel() {
    let m = model("tiny-q2");
    let (p, _) = prompt("tiny-q2");
    let mut s = session(&m, SessionOptions { chunk: 10, checkpoint_interval: 0, ..Default::default() });
    let mut seen = Vec::new();
    s.sync(&p, &mut |d, t| seen.push((d, t))).unwrap();
    assert_eq!(seen.first(), Some(&(0, 70)));
    assert_eq!(seen.last(), Some(&(70, 70)));
    assert_eq!(seen.len(), 8);
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut s = session(&m, SessionOptions { chunk: 10, checkpoint_interval: 0, ..Default::default() });
    s.set_cancel_flag(Some(flag.clone()));
    let f2 = flag.clone();
    let st = s
        .sync(&p, &mut |d, _| {
            if d >= 20 {
                f2.store(true, std::sync::atomic::Ordering::Relaxed)
            }
        })
        .unwrap();
    assert!(st.cancelled);
    assert_eq!(s.pos(), 20);
}

#[test]
fn generation_is_reproducible_and_stops() {
    let m = model("tiny-q2");
    let (p, _) = prompt("tiny-q2");
    let gen = |cfg: SamplerConfig, limits: &GenLimits, ctx: usize| {
        let mut s = Session::new(Box::new(CpuBackend::with_ctx(m.clone(), ctx)), SessionOptions::default());
        s.sync(&p, &mut none).unwrap();
        let mut sampler = Sampler::new(cfg);
        let g = s.generate(&mut sampler, limits, &mut |_| true).unwrap();
        (g, s.pos())
    };
    let lim = GenLimits { max_tokens: 12, stop_tokens: vec![] };
    let cfg = SamplerConfig { seed: 42, ..Default::default() };
    let (a, pos) = gen(cfg, &lim, 4096);
    let (b, _) = gen(cfg, &lim, 4096);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!((a.reason, a.tokens.len(), pos), (StopReason::MaxTokens, 12, 70 + 11));
    let (c, _) = gen(SamplerConfig { seed: 43, ..cfg }, &lim, 4096);
    assert_ne!(a.tokens, c.tokens, "different seeds gave the same 12 tokens");
    // greedy equals argmax of the logits path
    let (g, _) = gen(SamplerConfig::greedy(), &lim, 4096);
    let (g2, _) = gen(SamplerConfig::greedy(), &lim, 4096);
    assert_eq!(g.tokens, g2.tokens);
    // stop token: the first sampled token as a stop id stops at once
    let lim_stop = GenLimits { max_tokens: 12, stop_tokens: vec![a.tokens[3]] };
    let (d, pos) = gen(cfg, &lim_stop, 4096);
    let first = a.tokens.iter().position(|&t| t == a.tokens[3]).unwrap();
    assert_eq!(d.reason, StopReason::StopToken);
    assert_eq!(d.tokens, a.tokens[..=first].to_vec());
    assert_eq!(pos, 70 + first);
    // context full
    let (e, pos) = gen(cfg, &lim, 75);
    assert_eq!(e.reason, StopReason::ContextFull);
    assert_eq!(pos, 75);
    assert_eq!(e.tokens[..], a.tokens[..6]);
}

fn cache(dir: &std::path::Path, m: &Arc<Model>) -> DiskCache {
    let mut o = DiskCacheOptions::new(dir);
    o.min_tokens = 16;
    o.align_tokens = 16;
    o.trim_tokens = 4;
    DiskCache::open(o, m.fingerprint).unwrap()
}

/// The fixture "rendered text": one char per token is enough for prefix logic.
fn text_of(toks: &[u32]) -> Vec<u8> {
    toks.iter().flat_map(|t| format!("<{t}>").into_bytes()).collect()
}

#[test]
fn disk_cache_round_trip_lookup_and_eviction() {
    let m = model("tiny-q2");
    let (p, d) = prompt("tiny-q2");
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), &m);
    assert_eq!(c.cold_save_point(70), Some(64));
    assert_eq!(c.cold_save_point(10), None);
    let mut s = session(&m, SessionOptions::default());
    s.sync(&p[..64], &mut none).unwrap();
    c.save(&s, &text_of(&p[..64]), SaveReason::Cold).unwrap();
    s.sync(&p[..32], &mut none).unwrap();
    c.save(&s, &text_of(&p[..32]), SaveReason::Cold).unwrap();

    // the longest rendered prefix wins
    let e = c.lookup(&text_of(&p)).expect("hit");
    assert_eq!((e.tokens, e.reason), (64, SaveReason::Cold));
    assert_eq!(c.lookup(&text_of(&p[..40])).unwrap().tokens, 32);
    assert!(c.lookup(&text_of(&[3, 4])).is_none());

    let mut t = session(&m, SessionOptions::default());
    assert!(c.load_into(&e, &mut t).unwrap());
    let st = t.sync(&p, &mut none).unwrap();
    assert_eq!(st.reused, 64);
    let mut u = session(&m, SessionOptions { chunk: 64, ..Default::default() });
    u.sync(&p, &mut none).unwrap();
    assert_eq!(continue_decode(&mut t, &d), continue_decode(&mut u, &d));

    // budget: only the most recently used file survives a tiny budget
    let size = std::fs::metadata(&e.path).unwrap().len();
    let mut o = c.opts.clone();
    o.budget_bytes = size;
    let c2 = DiskCache::open(o, m.fingerprint).unwrap();
    c2.evict_to_budget(None);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].path(), e.path, "the entry just hit is the most recently used");
}

#[test]
fn disk_cache_survives_corruption() {
    let m = model("tiny-q2");
    let (p, _) = prompt("tiny-q2");
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), &m);
    let mut s = session(&m, SessionOptions::default());
    s.sync(&p[..48], &mut none).unwrap();
    let path = c.save(&s, &text_of(&p[..48]), SaveReason::Cold).unwrap();
    let good = std::fs::read(&path).unwrap();
    let probe = text_of(&p);
    // flips anywhere (header, text, payload, checksum) and truncations: skipped, never loaded
    let offsets: Vec<usize> = (0..good.len()).step_by(good.len() / 40).chain([0, 4, 8, 12, 70, good.len() - 1]).collect();
    let mut t = session(&m, SessionOptions::default());
    for off in offsets {
        let mut bad = good.clone();
        bad[off] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        if let Some(e) = c.lookup(&probe) {
            assert!(!c.load_into(&e, &mut t).unwrap(), "flip at {off} loaded");
        }
        assert!(!path.exists(), "corrupt file (flip at {off}) not removed");
        assert_eq!(t.pos(), 0);
    }
    for cut in [0, 10, 71, good.len() / 2, good.len() - 1] {
        std::fs::write(&path, &good[..cut]).unwrap();
        assert!(c.lookup(&probe).is_none(), "truncated at {cut} found");
    }
    // a file of another version is skipped
    let mut v2 = good.clone();
    v2[4] = 2;
    std::fs::write(&path, &v2).unwrap();
    assert!(c.lookup(&probe).is_none());
    // another model's file is ignored (and left alone)
    std::fs::write(&path, &good).unwrap();
    let m4 = model("tiny-q4");
    let c4 = cache(dir.path(), &m4);
    assert!(c4.lookup(&probe).is_none());
    assert!(path.exists());
    assert!(c.lookup(&probe).is_some());
}

/// Helper run in a child process by `disk_cache_survives_a_killed_writer`.
#[test]
fn kv_writer_child() {
    let Ok(dir) = std::env::var("DSV4_KV_WRITER_DIR") else { return };
    let m = model("tiny-q2");
    let (p, _) = prompt("tiny-q2");
    let c = cache(std::path::Path::new(&dir), &m);
    let mut s = session(&m, SessionOptions::default());
    s.sync(&p, &mut none).unwrap();
    for i in 0u32.. {
        let mut text = text_of(&p);
        text.extend(format!("#{i}").bytes());
        c.save(&s, &text, SaveReason::Continued).unwrap();
    }
}

#[test]
fn disk_cache_survives_a_killed_writer() {
    let m = model("tiny-q2");
    let dir = tempfile::tempdir().unwrap();
    for delay_ms in [400u64, 700, 1100] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "kv_writer_child", "--nocapture", "--test-threads=1"])
            .env("DSV4_KV_WRITER_DIR", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // every .kv file that exists is complete and loads; temp files are cleaned up at open
        let c = cache(dir.path(), &m);
        let tmp_left = std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(".tmp.")).count();
        assert_eq!(tmp_left, 0);
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            // the file's own text (length at offset 48, text at 72) is its lookup key
            let bytes = std::fs::read(e.path()).unwrap();
            let n = u64::from_le_bytes(bytes[48..56].try_into().unwrap()) as usize;
            let probe = bytes[72..72 + n].to_vec();
            let entry = c.lookup(&probe).expect("complete file");
            let mut s = session(&m, SessionOptions::default());
            assert!(c.load_into(&entry, &mut s).unwrap());
            assert_eq!(s.pos(), 70);
        }
    }
}
