//! Running the engine over a golden fixture (../shared/fixtures/*) and comparing
//! with the reference logits. Shared by `dsv4 logits` and the test suite.
//!
//! A fixture folder has `tokens.json` (prompt, decode, sequence, mtp pairing)
//! and raw little-endian f32 files; see ../shared/fixtures/README.md.

use std::path::Path;

use serde::Deserialize;

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::model::Want;

#[derive(Clone, Debug, Deserialize)]
pub struct MtpSpec {
    pub input_ids: Vec<u32>,
    pub positions: Vec<usize>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Tokens {
    pub prompt: Vec<u32>,
    pub decode: Vec<u32>,
    pub sequence: Vec<u32>,
    #[serde(default)]
    pub mtp: Option<MtpSpec>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens> {
        let text = std::fs::read_to_string(path)?;
        let t: Tokens = serde_json::from_str(&text).map_err(|e| EngineError::Input(format!("{}: {e}", path.display())))?;
        if t.prompt.is_empty() {
            return Err(EngineError::Input("tokens.json: empty prompt".into()));
        }
        Ok(t)
    }
}

/// The engine's outputs in the fixture's file layout.
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    /// `[vocab]`
    pub prefill_last: Vec<f32>,
    /// `[n_decode][vocab]`
    pub decode: Vec<f32>,
    /// `[len(sequence)][vocab]`
    pub stepwise: Vec<f32>,
    /// `[len(sequence)][hc][dim]`
    pub hidden: Vec<f32>,
    /// `[len(sequence)][vocab]` (empty when the model has no MTP block)
    pub mtp: Vec<f32>,
}

/// Prompt prefill (in chunks of `chunk`, 0 = whole prompt), decode steps, a fresh
/// stepwise run, and the MTP block over the engine's own hidden states.
pub fn run(backend: &mut dyn Backend, tokens: &Tokens, chunk: usize, stepwise: bool, mtp: bool) -> Result<Outputs> {
    let mut out = Outputs::default();
    backend.reset();
    let chunk = if chunk == 0 { tokens.prompt.len() } else { chunk };
    for (i, piece) in tokens.prompt.chunks(chunk).enumerate() {
        let last = (i + 1) * chunk >= tokens.prompt.len();
        let r = backend.eval(piece, Want { all_logits: false, hidden: true })?;
        out.hidden.extend_from_slice(&r.hidden);
        if last {
            out.prefill_last = r.logits;
        }
    }
    for &t in &tokens.decode {
        let r = backend.eval(&[t], Want { all_logits: false, hidden: true })?;
        out.hidden.extend_from_slice(&r.hidden);
        out.decode.extend_from_slice(&r.logits);
    }
    if mtp {
        if let Some(spec) = &tokens.mtp {
            let n = spec.input_ids.len();
            let md = out.hidden.len() / tokens.sequence.len().max(1);
            for i in 0..n {
                if spec.positions.get(i) != Some(&i) {
                    return Err(EngineError::Input("tokens.json: mtp positions must be 0,1,2,…".into()));
                }
                let h = out.hidden.get(i * md..(i + 1) * md).ok_or_else(|| EngineError::Input("mtp rows exceed the sequence".into()))?;
                let l = backend.mtp_eval(h, spec.input_ids[i])?;
                out.mtp.extend_from_slice(&l);
            }
        }
    }
    if stepwise {
        backend.reset();
        for &t in &tokens.sequence {
            let r = backend.eval(&[t], Want::default())?;
            out.stepwise.extend_from_slice(&r.logits);
        }
    }
    Ok(out)
}

pub fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let b = std::fs::read(path)?;
    if b.len() % 4 != 0 {
        return Err(EngineError::Input(format!("{}: size is not a multiple of 4", path.display())));
    }
    Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

pub fn write_f32(path: &Path, v: &[f32]) -> Result<()> {
    let mut b = Vec::with_capacity(v.len() * 4);
    for x in v {
        b.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, b)?;
    Ok(())
}

/// Deviation statistics of one logits file, as the fixture tolerances use them.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub max_abs: f32,
    pub mean_abs: f64,
    pub median_row_cosine: f64,
    pub min_row_cosine: f64,
    pub top1_agreement: f64,
    pub rows: usize,
}

pub fn compare(got: &[f32], want: &[f32], vocab: usize) -> Result<Stats> {
    if got.len() != want.len() || vocab == 0 || want.len() % vocab != 0 {
        return Err(EngineError::Input(format!("shape mismatch: got {} values, expected {}", got.len(), want.len())));
    }
    let rows = want.len() / vocab;
    let mut s = Stats { rows, min_row_cosine: 1.0, ..Default::default() };
    let mut sum_abs = 0.0f64;
    let mut coss = Vec::with_capacity(rows);
    let mut agree = 0usize;
    for r in 0..rows {
        let g = &got[r * vocab..(r + 1) * vocab];
        let w = &want[r * vocab..(r + 1) * vocab];
        let (mut dot, mut ng, mut nw) = (0.0f64, 0.0f64, 0.0f64);
        for (&a, &b) in g.iter().zip(w) {
            let d = (a - b).abs();
            if !(d <= s.max_abs) {
                s.max_abs = if d.is_nan() { f32::INFINITY } else { d };
            }
            sum_abs += d as f64;
            dot += a as f64 * b as f64;
            ng += a as f64 * a as f64;
            nw += b as f64 * b as f64;
        }
        let cos = dot / (ng.sqrt() * nw.sqrt()).max(1e-30);
        coss.push(cos);
        if argmax(g) == argmax(w) {
            agree += 1;
        }
    }
    s.mean_abs = sum_abs / want.len() as f64;
    coss.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    s.min_row_cosine = coss.first().copied().unwrap_or(1.0);
    s.median_row_cosine = if rows % 2 == 1 { coss[rows / 2] } else { (coss[rows / 2 - 1] + coss[rows / 2]) / 2.0 };
    s.top1_agreement = agree as f64 / rows as f64;
    Ok(s)
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
