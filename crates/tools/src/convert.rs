//! HF (official DeepSeek V4 release) → GGUF conversion.
//!
//! Reads config.json, tokenizer.json and the safetensors shards directly, plans
//! every output tensor ([`crate::plan`]), validates every source tensor (present,
//! right dtype / shape / scale grid) before creating any output, then streams
//! tensor by tensor: rows (or whole experts) are decoded to f32 and re-encoded in
//! parallel with rayon, in chunks of bounded size, and appended to `OUT.tmp`
//! through [`StreamWriter`], which renames it onto `OUT` only at the very end.
//! Peak memory is a few chunks (≈ 64 MB of f32 per thread-batch), whatever the
//! model size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dsv4_gguf::{GgmlType, Value};
use rayon::prelude::*;

use crate::formats::{tid2eid_i32, SourceError, SourceMatrix};
use crate::gguf_stream::{StreamError, StreamWriter, TensorSpec};
use crate::imatrix::Imatrix;
use crate::plan::{build_plan, ModelConfig, PlanError, PlanItem, Recipe, Source};
use crate::safetensors::{Checkpoint, SafetensorsError};
use crate::{iq2xxs, kquants};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("GGUF tensor {tensor}: {msg}")]
    Tensor { tensor: String, msg: String },
    #[error("{0}")]
    Other(String),
}

/// Progress reporting (the CLI plugs in a progress bar).
pub trait Progress: Sync {
    fn begin(&self, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64, _tensor: &str) {}
    fn finish(&self) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub hf_dir: PathBuf,
    pub out: PathBuf,
    pub recipe: Recipe,
    pub imatrix: Option<PathBuf>,
    /// Write `mtp.*` to this file instead of the main one.
    pub mtp_out: Option<PathBuf>,
    /// Leave the MTP block out entirely (ignored when `mtp_out` is set).
    pub no_mtp: bool,
    /// Continue an interrupted run from `OUT.tmp` when its header matches.
    pub resume: bool,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ConvertReport {
    pub tensors: usize,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub seconds: f64,
    pub resumed_at: usize,
}

/// Elements decoded per parallel chunk of a dense tensor.
const CHUNK_ELEMS: usize = 1 << 24;

pub fn convert(opts: &ConvertOptions, progress: &dyn Progress) -> Result<ConvertReport, ConvertError> {
    let t0 = Instant::now();
    let cfg = ModelConfig::from_file(&opts.hf_dir.join("config.json"))?;
    let tok_kv = dsv4_text::gguf_glue::tokenizer_metadata_from_json(opts.hf_dir.join("tokenizer.json"))
        .map_err(|e| ConvertError::Tokenizer(e.to_string()))?;
    if let Some((_, Value::Array(toks))) = tok_kv.iter().find(|(k, _)| k == "tokenizer.ggml.tokens") {
        if toks.len() != cfg.vocab {
            return Err(ConvertError::Tokenizer(format!("tokenizer.json has {} tokens, config.json vocab_size is {}", toks.len(), cfg.vocab)));
        }
    }
    let imatrix = match &opts.imatrix {
        Some(p) => Some(Imatrix::load(p).map_err(|e| ConvertError::Other(e.to_string()))?),
        None => None,
    };
    let ck = Checkpoint::open(&opts.hf_dir)?;
    let plan = build_plan(&cfg, opts.recipe);
    for it in &plan {
        validate_source(&ck, &cfg, it)?;
    }
    let bytes_in: u64 = plan.iter().map(|it| source_bytes(&ck, it)).sum();

    let mut kv = vec![
        ("general.architecture".to_string(), Value::String("deepseek4".into())),
        ("general.name".to_string(), Value::String(opts.name.clone().unwrap_or_else(|| "DeepSeek V4 Flash".into()))),
        ("general.quantization_version".to_string(), Value::U32(2)),
        ("general.converter".to_string(), Value::String(format!("dsv4 convert --recipe {}", opts.recipe.name()))),
    ];
    kv.extend(cfg.metadata());
    let mut main_kv = kv.clone();
    main_kv.extend(tok_kv);

    let (main_items, mtp_items): (Vec<&PlanItem>, Vec<&PlanItem>) = plan.iter().partition(|it| !it.mtp);
    let mut jobs: Vec<(PathBuf, Vec<(String, Value)>, Vec<&PlanItem>)> = Vec::new();
    match (&opts.mtp_out, opts.no_mtp) {
        (Some(mp), _) => {
            jobs.push((opts.out.clone(), main_kv, main_items));
            if !mtp_items.is_empty() {
                jobs.push((mp.clone(), kv, mtp_items));
            }
        }
        (None, true) => jobs.push((opts.out.clone(), main_kv, main_items)),
        (None, false) => jobs.push((opts.out.clone(), main_kv, plan.iter().collect())),
    }
    // n_mtp stays in the metadata of a main file without the block: the engine
    // and ds4 load the block from the separate file when given.
    let mut writers = Vec::new();
    let mut total = 0u64;
    let mut report = ConvertReport { bytes_in, ..Default::default() };
    for (path, kv, items) in &jobs {
        let specs: Vec<TensorSpec> = items.iter().map(|it| it.spec.clone()).collect();
        let w = StreamWriter::create(path, kv, specs, opts.resume)?;
        total += w.total_bytes();
        report.resumed_at += w.next_tensor();
        writers.push(w);
    }
    progress.begin(total);
    for ((_, _, items), w) in jobs.iter().zip(writers.iter_mut()) {
        let start = w.next_tensor();
        for it in items.iter().skip(start) {
            w.begin_tensor(&it.spec.name)?;
            write_tensor(&ck, &cfg, it, imatrix.as_ref(), w, progress)?;
            w.end_tensor(true)?;
            report.tensors += 1;
        }
    }
    for w in writers {
        report.bytes_out += w.total_bytes();
        w.finish()?;
    }
    progress.finish();
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

fn tensor_err(it: &PlanItem, msg: impl Into<String>) -> ConvertError {
    ConvertError::Tensor { tensor: it.spec.name.clone(), msg: msg.into() }
}

/// PyTorch shape `[out, in]` (or `[n]`) expected for a plain source.
fn expected_shape(ne: &[u64]) -> Vec<usize> {
    ne.iter().rev().map(|&d| d as usize).collect()
}

fn validate_source(ck: &Checkpoint, cfg: &ModelConfig, it: &PlanItem) -> Result<(), ConvertError> {
    match &it.source {
        Source::Matrix(name) => {
            let m = SourceMatrix::open(ck, name)?;
            let want = expected_shape(&it.spec.ne);
            let got = m.shape();
            let ok = match want.as_slice() {
                [n] => got == [1, *n] || (got[0] * got[1] == *n && got[0] == 1),
                [o, i] => got == [*o, *i],
                _ => false,
            };
            if !ok {
                return Err(tensor_err(it, format!("source {name} ({}) has shape {:?}, expected {:?}", m.format_name(), got, want)));
            }
        }
        Source::Experts { prefix, w, n } => {
            let (o, i) = (it.spec.ne[1] as usize, it.spec.ne[0] as usize);
            for e in 0..*n {
                let name = format!("{prefix}.{e}.{w}.weight");
                let m = SourceMatrix::open(ck, &name)?;
                if m.shape() != [o, i] {
                    return Err(tensor_err(it, format!("source {name} has shape {:?}, expected [{o}, {i}]", m.shape())));
                }
            }
        }
        Source::Tid2eid(name) => {
            let v = ck.get(name)?;
            if v.shape != [cfg.vocab, cfg.n_used] {
                return Err(tensor_err(it, format!("source {name} has shape {:?}, expected [{}, {}]", v.shape, cfg.vocab, cfg.n_used)));
            }
            tid2eid_i32(&v, cfg.n_experts)?;
        }
    }
    Ok(())
}

fn source_bytes(ck: &Checkpoint, it: &PlanItem) -> u64 {
    let one = |n: &str| ck.get(n).map(|v| v.data.len() as u64).unwrap_or(0);
    match &it.source {
        Source::Matrix(n) | Source::Tid2eid(n) => one(n),
        Source::Experts { prefix, w, n } => (0..*n).map(|e| one(&format!("{prefix}.{e}.{w}.weight"))).sum(),
    }
}

/// Encodes one row of f32 values as `ty`, appending to `out`.
pub fn encode_row(ty: GgmlType, row: &[f32], importance: Option<&[f32]>, out: &mut Vec<u8>) -> Result<(), String> {
    match ty {
        GgmlType::F32 => row.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => {
            for &v in row {
                let h = half::f16::from_f32(v);
                if !h.is_finite() && v.is_finite() {
                    return Err(format!("value {v} overflows F16"));
                }
                out.extend_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        GgmlType::Q8_0 => out.extend_from_slice(&dsv4_gguf::quantize_q8_0(row)),
        GgmlType::Q4_K => kquants::quantize_q4_k(row, out),
        GgmlType::Q2_K => kquants::quantize_q2_k(row, out),
        GgmlType::IQ2_XXS => {
            if importance.is_some_and(|w| w.len() != row.len()) {
                return Err("importance vector length differs from the row".into());
            }
            iq2xxs::quantize_iq2_xxs(row, importance, out)
        }
        t => return Err(format!("cannot encode {t}")),
    }
    Ok(())
}

fn write_tensor(
    ck: &Checkpoint,
    cfg: &ModelConfig,
    it: &PlanItem,
    imatrix: Option<&Imatrix>,
    w: &mut StreamWriter,
    progress: &dyn Progress,
) -> Result<(), ConvertError> {
    let ty = it.spec.ty;
    match &it.source {
        Source::Tid2eid(name) => {
            let v = ck.get(name)?;
            let ids = tid2eid_i32(&v, cfg.n_experts)?;
            let mut b = Vec::with_capacity(ids.len() * 4);
            ids.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
            w.write(&b)?;
            progress.advance(b.len() as u64, &it.spec.name);
        }
        Source::Matrix(name) => {
            let m = SourceMatrix::open(ck, name)?;
            let cols = m.cols;
            let chunk_rows = (CHUNK_ELEMS / cols.max(1)).max(1);
            let mut r0 = 0;
            while r0 < m.rows {
                let r1 = (r0 + chunk_rows).min(m.rows);
                let parts: Vec<Result<Vec<u8>, ConvertError>> = (r0..r1)
                    .into_par_iter()
                    .map(|r| {
                        let mut row = vec![0f32; cols];
                        m.row(r, &mut row)?;
                        let mut out = Vec::with_capacity(ty.row_bytes(cols).unwrap_or(0));
                        encode_row(ty, &row, None, &mut out).map_err(|e| tensor_err(it, format!("row {r}: {e}")))?;
                        Ok(out)
                    })
                    .collect();
                for p in parts {
                    let p = p?;
                    w.write(&p)?;
                    progress.advance(p.len() as u64, &it.spec.name);
                }
                r0 = r1;
            }
        }
        Source::Experts { prefix, w: which, n } => {
            let (rows, cols) = (it.spec.ne[1] as usize, it.spec.ne[0] as usize);
            let imat = imatrix.and_then(|im| im.get(&it.spec.name));
            if let Some(v) = imat {
                if v.len() != cols * n {
                    return Err(tensor_err(it, format!("imatrix entry has {} values, expected {} ({} experts x {cols})", v.len(), cols * n, n)));
                }
            }
            let batch = rayon::current_num_threads().max(1);
            let mut e0 = 0;
            while e0 < *n {
                let e1 = (e0 + batch).min(*n);
                let parts: Vec<Result<Vec<u8>, ConvertError>> = (e0..e1)
                    .into_par_iter()
                    .map(|e| {
                        let m = SourceMatrix::open(ck, &format!("{prefix}.{e}.{which}.weight"))?;
                        let x = m.to_vec()?;
                        let importance: Option<Vec<f32>> = if ty == GgmlType::IQ2_XXS {
                            Some(match imat {
                                Some(v) => v[e * cols..(e + 1) * cols].to_vec(),
                                None => column_energy(&x, cols),
                            })
                        } else {
                            None
                        };
                        let mut out = Vec::with_capacity(ty.row_bytes(cols).unwrap_or(0) * rows);
                        for (r, row) in x.chunks_exact(cols).enumerate() {
                            encode_row(ty, row, importance.as_deref(), &mut out).map_err(|er| tensor_err(it, format!("expert {e} row {r}: {er}")))?;
                        }
                        Ok(out)
                    })
                    .collect();
                for p in parts {
                    let p = p?;
                    w.write(&p)?;
                    progress.advance(p.len() as u64, &it.spec.name);
                }
                e0 = e1;
            }
        }
    }
    Ok(())
}

/// The importance of each input column without an imatrix: Σ_rows w² (as ds4).
fn column_energy(x: &[f32], cols: usize) -> Vec<f32> {
    let mut c = vec![0f32; cols];
    for row in x.chunks_exact(cols) {
        for (a, v) in c.iter_mut().zip(row) {
            *a += v * v;
        }
    }
    c
}

/// Converts, then checks that the written file parses (header, sizes).
pub fn convert_and_verify(opts: &ConvertOptions, progress: &dyn Progress) -> Result<ConvertReport, ConvertError> {
    let r = convert(opts, progress)?;
    for p in std::iter::once(&opts.out).chain(opts.mtp_out.as_ref()) {
        dsv4_gguf::GgufFile::open(Path::new(p)).map_err(|e| ConvertError::Other(format!("{}: written file does not parse: {e}", p.display())))?;
    }
    Ok(r)
}
