//! `dsv4 imatrix` on the tiny-q2 fixture: the .dat it writes parses back, has an
//! entry for every routed-expert tensor (gate, up, down; main layers and the MTP
//! block), and its values and call counts match an independent in-process run of
//! the same chunks with a counting observer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use dsv4_engine::{Backend, CpuBackend, Model, Want};
use dsv4_tools::imatrix::Imatrix;

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/tiny-q2/model.gguf")
}

/// name → (n_in, per-expert Σx² [n_expert·n_in], per-expert row counts)
type Stats = BTreeMap<String, (usize, Vec<f64>, Vec<u64>)>;

/// What `dsv4 imatrix --chunk CHUNK` must have seen: same tokenisation, BOS +
/// CHUNK−1 tokens per chunk from an empty state, MTP on every next token.
fn expected(text: &str, chunk: usize) -> (Stats, usize, usize, usize) {
    let file = Arc::new(dsv4_gguf::GgufFile::open(&model_path()).unwrap());
    let tok = dsv4_text::Tokenizer::from_gguf(&file).unwrap();
    let mut model = Model::from_gguf(file, None).unwrap();
    let stats = Arc::new(Mutex::new(Stats::new()));
    let s2 = stats.clone();
    model.observer = Some(Arc::new(move |name: &str, ne: usize, e: usize, x: &[f32]| {
        let mut s = s2.lock().unwrap();
        let st = s.entry(name.to_string()).or_insert_with(|| (x.len(), vec![0.0; ne * x.len()], vec![0; ne]));
        for (a, v) in st.1[e * x.len()..(e + 1) * x.len()].iter_mut().zip(x) {
            *a += (*v as f64) * (*v as f64);
        }
        st.2[e] += 1;
    }));
    let k = model.cfg.n_experts_used;
    let mut b = CpuBackend::with_ctx(Arc::new(model), chunk);
    let tokens = tok.encode(text);
    let (mut main_tokens, mut mtp_tokens, mut n_chunks) = (0, 0, 0);
    for c in tokens.chunks(chunk - 1) {
        b.reset();
        let mut t = vec![tok.bos_id()];
        t.extend_from_slice(c);
        let out = b.eval(&t, Want { all_logits: false, hidden: true }).unwrap();
        let hd = out.hidden.len() / t.len();
        for p in 1..t.len() {
            b.mtp_eval(&out.hidden[(p - 1) * hd..p * hd], t[p]).unwrap();
        }
        main_tokens += t.len();
        mtp_tokens += t.len() - 1;
        n_chunks += 1;
    }
    let s = stats.lock().unwrap().clone();
    (s, main_tokens * k, mtp_tokens * k, n_chunks)
}

/// (name, ncall) of each entry, read from the raw bytes (the reader divides by ncall).
fn raw_ncalls(b: &[u8]) -> BTreeMap<String, i32> {
    let rd = |p: usize| i32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let mut out = BTreeMap::new();
    let mut p = 4;
    for _ in 0..rd(0) {
        let len = rd(p) as usize;
        let name = String::from_utf8(b[p + 4..p + 4 + len].to_vec()).unwrap();
        p += 4 + len;
        let (ncall, nval) = (rd(p), rd(p + 4) as usize);
        p += 8 + 4 * nval;
        out.insert(name, ncall);
    }
    out
}

#[test]
fn imatrix_tiny_q2_round_trips_and_counts_match() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("calib.txt");
    let text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n\
                1234567890 — how vexingly quick daft zebras jump; sphinx of black quartz, judge my vow.";
    std::fs::write(&data, text).unwrap();
    let out = tmp.path().join("imatrix.dat");
    let chunk = 24;
    let o = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["imatrix", "-m"])
        .arg(model_path())
        .arg("--dataset")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--chunk", &chunk.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let (want, main_routed, mtp_routed, n_chunks) = expected(text, chunk);
    assert!(n_chunks >= 2, "the test wants several chunks");
    let bytes = std::fs::read(&out).unwrap();
    let im = Imatrix::parse(&bytes).unwrap();
    assert_eq!(im.last_chunk, n_chunks as i32);
    assert_eq!(im.dataset.as_deref(), Some("calib.txt"));
    assert_eq!(im.entries.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for t in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
        assert!(want.contains_key(&format!("blk.3.{t}.weight")) && want.contains_key(&format!("mtp.0.{t}.weight")));
    }
    let ncalls = raw_ncalls(&bytes);
    for (name, (n_in, sums, counts)) in &want {
        // every token reaches k experts: the rows counted are exactly the tokens routed
        let routed: u64 = counts.iter().sum();
        let expect = if name.starts_with("mtp.") { mtp_routed } else { main_routed };
        assert_eq!(routed as usize, expect, "{name}");
        assert_eq!(ncalls[name], *counts.iter().max().unwrap() as i32, "{name}");
        let got = &im.entries[name];
        assert_eq!(got.len(), sums.len(), "{name}");
        for (i, (&g, &s)) in got.iter().zip(sums).enumerate() {
            let c = counts[i / n_in];
            let w = if c == 0 { 1.0 } else { s / c as f64 };
            assert!((g as f64 - w).abs() <= 1e-5 * w.abs().max(1e-6), "{name}[{i}]: {g} vs {w}");
        }
    }
}
