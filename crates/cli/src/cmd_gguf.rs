//! `dsv4 gguf inspect FILE` and `dsv4 gguf diff A B`: look inside GGUF files.
//!
//! `inspect` prints metadata (long arrays abbreviated), the tensor table and
//! per-type totals. `diff` compares two files tensor by tensor: presence,
//! type and shape, and for decodable tensors the numeric difference of the
//! dequantised values (max abs, rms, rms relative to the first file's rms).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use dsv4_gguf::quant::dequantize_vec;
use dsv4_gguf::{GgmlType, GgufFile, Value};

#[derive(Args, Debug)]
pub struct GgufArgs {
    #[command(subcommand)]
    pub cmd: GgufCmd,
}

#[derive(Subcommand, Debug)]
pub enum GgufCmd {
    /// Print metadata, the tensor table and totals per type.
    Inspect {
        file: PathBuf,
        /// Array elements shown before abbreviating.
        #[arg(long, default_value_t = 8)]
        max_items: usize,
        /// Skip the tensor table (metadata and totals only).
        #[arg(long)]
        no_tensors: bool,
    },
    /// Compare two GGUF files tensor by tensor.
    Diff {
        a: PathBuf,
        b: PathBuf,
        /// Also compare metadata values.
        #[arg(long)]
        metadata: bool,
    },
}

pub fn run(a: GgufArgs) -> Result<()> {
    match a.cmd {
        GgufCmd::Inspect { file, max_items, no_tensors } => {
            let f = open(&file)?;
            print!("{}", inspect(&f, max_items, !no_tensors));
            Ok(())
        }
        GgufCmd::Diff { a, b, metadata } => {
            let (fa, fb) = (open(&a)?, open(&b)?);
            let (report, n_diff) = diff(&fa, &fb, metadata)?;
            print!("{report}");
            if n_diff > 0 {
                println!("{n_diff} tensor(s) differ");
            }
            Ok(())
        }
    }
}

fn open(p: &Path) -> Result<GgufFile> {
    GgufFile::open(p).with_context(|| format!("opening {}", p.display()))
}

/// Human-readable value; arrays longer than `max_items` show type, length and the first few.
pub fn format_value(v: &Value, max_items: usize) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => {
            let ty = items.first().map(Value::type_name).unwrap_or("?");
            let shown: Vec<String> = items.iter().take(max_items).map(|x| format_value(x, max_items)).collect();
            if items.len() > max_items {
                format!("[{ty}; {}] [{}, ...]", items.len(), shown.join(", "))
            } else {
                format!("[{}]", shown.join(", "))
            }
        }
        Value::F32(x) => format!("{x:?}"),
        Value::F64(x) => format!("{x:?}"),
        Value::Bool(b) => b.to_string(),
        other => other.as_i64().map(|i| i.to_string()).or_else(|| other.as_u64().map(|u| u.to_string())).unwrap_or_default(),
    }
}

fn human_bytes(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// The `inspect` report as text.
pub fn inspect(f: &GgufFile, max_items: usize, tensors: bool) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "GGUF v{}, alignment {}, {} metadata entries, {} tensors, data at byte {}, file {}",
        f.version(),
        f.alignment(),
        f.metadata().len(),
        f.tensor_infos().len(),
        f.data_offset(),
        human_bytes(f.file_bytes().len())
    );
    let _ = writeln!(s, "\nmetadata:");
    for (k, v) in f.metadata() {
        let _ = writeln!(s, "  {k:<50} {:<6} {}", v.type_name(), format_value(v, max_items));
    }
    let mut totals: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    if tensors {
        let _ = writeln!(s, "\ntensors:\n  {:<48} {:<8} {:<24} {:>12} {:>12}", "name", "type", "ne", "bytes", "offset");
    }
    for t in f.tensor_infos() {
        let e = totals.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_elems();
        e.2 += t.n_bytes;
        if tensors {
            let ne = format!("{:?}", t.ne);
            let _ = writeln!(s, "  {:<48} {:<8} {:<24} {:>12} {:>12}", t.name, t.ty.name(), ne, t.n_bytes, t.offset);
        }
    }
    let _ = writeln!(s, "\ntotals per type:");
    let (mut n, mut el, mut by) = (0, 0, 0);
    for (ty, (c, e, b)) in &totals {
        let _ = writeln!(s, "  {ty:<8} {c:>6} tensors {e:>15} elements {:>12}", human_bytes(*b));
        n += c;
        el += e;
        by += b;
    }
    let _ = writeln!(s, "  {:<8} {n:>6} tensors {el:>15} elements {:>12}", "all", human_bytes(by));
    s
}

/// Numeric difference of two decoded tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiffStats {
    pub max_abs: f64,
    pub rms: f64,
    /// rms(a − b) / rms(a) (0 if both are all zero).
    pub rel_rms: f64,
}

pub fn diff_values(a: &[f32], b: &[f32]) -> DiffStats {
    let (mut max_abs, mut se, mut sa) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = (x as f64 - y as f64).abs();
        max_abs = max_abs.max(d);
        se += d * d;
        sa += x as f64 * x as f64;
    }
    let n = a.len().max(1) as f64;
    let rms = (se / n).sqrt();
    let rms_a = (sa / n).sqrt();
    let rel_rms = if rms_a > 0.0 { rms / rms_a } else if rms > 0.0 { f64::INFINITY } else { 0.0 };
    DiffStats { max_abs, rms, rel_rms }
}

fn decode(ty: GgmlType, data: &[u8], n: usize) -> Option<Vec<f32>> {
    if ty == GgmlType::I32 {
        return Some(dsv4_gguf::read_i32(data).into_iter().map(|v| v as f32).collect());
    }
    dequantize_vec(ty, data, n).ok()
}

/// The `diff` report and the number of tensors that differ in any way.
pub fn diff(a: &GgufFile, b: &GgufFile, metadata: bool) -> Result<(String, usize)> {
    use std::fmt::Write;
    let mut s = String::new();
    let mut n_diff = 0;
    if metadata {
        let _ = writeln!(s, "metadata:");
        for (k, va) in a.metadata() {
            match b.get(k) {
                None => {
                    let _ = writeln!(s, "  {k}: only in A");
                }
                Some(vb) if vb != va => {
                    let _ = writeln!(s, "  {k}: {} vs {}", format_value(va, 4), format_value(vb, 4));
                }
                _ => {}
            }
        }
        for (k, _) in b.metadata() {
            if a.get(k).is_none() {
                let _ = writeln!(s, "  {k}: only in B");
            }
        }
    }
    let _ = writeln!(s, "{:<48} {:<18} {:>12} {:>12} {:>12}", "tensor", "status", "max_abs", "rms", "rel_rms");
    let (mut identical, mut only_a, mut only_b, mut mismatched, mut worst) = (0, 0, 0, 0, (0f64, String::new()));
    for ta in a.tensor_infos() {
        let Some(tb) = b.tensor_info(&ta.name) else {
            let _ = writeln!(s, "{:<48} only in A", ta.name);
            only_a += 1;
            n_diff += 1;
            continue;
        };
        if ta.ne != tb.ne {
            let _ = writeln!(s, "{:<48} shape {:?} vs {:?}", ta.name, ta.ne, tb.ne);
            mismatched += 1;
            n_diff += 1;
            continue;
        }
        let (da, db) = (a.tensor_of(ta).data, b.tensor_of(tb).data);
        let status = if ta.ty != tb.ty { format!("{} vs {}", ta.ty, tb.ty) } else { ta.ty.name().to_string() };
        if ta.ty == tb.ty && da == db {
            identical += 1;
            continue;
        }
        n_diff += 1;
        match (decode(ta.ty, da, ta.n_elems()), decode(tb.ty, db, tb.n_elems())) {
            (Some(va), Some(vb)) => {
                let d = diff_values(&va, &vb);
                if d.rel_rms > worst.0 {
                    worst = (d.rel_rms, ta.name.clone());
                }
                let _ = writeln!(s, "{:<48} {:<18} {:>12.4e} {:>12.4e} {:>12.4e}", ta.name, status, d.max_abs, d.rms, d.rel_rms);
            }
            _ => {
                let _ = writeln!(s, "{:<48} {:<18} (not decodable)", ta.name, status);
            }
        }
    }
    for tb in b.tensor_infos() {
        if a.tensor_info(&tb.name).is_none() {
            let _ = writeln!(s, "{:<48} only in B", tb.name);
            only_b += 1;
            n_diff += 1;
        }
    }
    let _ = writeln!(
        s,
        "\nsummary: {} tensors in A, {} in B; {identical} identical, {} differ in values, {mismatched} shape mismatches, {only_a} only in A, {only_b} only in B",
        a.tensor_infos().len(),
        b.tensor_infos().len(),
        n_diff - mismatched - only_a - only_b
    );
    if !worst.1.is_empty() {
        let _ = writeln!(s, "largest relative rms difference: {:.4e} ({})", worst.0, worst.1);
    }
    Ok((s, n_diff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv4_gguf::quant::{encode_f32, quantize_q8_0};
    use dsv4_gguf::GgufWriter;

    fn file(scale: f32, extra: bool) -> GgufFile {
        let mut w = GgufWriter::new();
        w.add_kv("general.architecture", Value::String("deepseek4".into())).unwrap();
        w.add_kv("list", Value::Array((0..20u32).map(Value::U32).collect())).unwrap();
        let x: Vec<f32> = (0..64).map(|i| i as f32 * scale).collect();
        w.add_tensor("same", GgmlType::F32, &[4], encode_f32(&[1.0, 2.0, 3.0, 4.0])).unwrap();
        w.add_tensor("q", GgmlType::Q8_0, &[32, 2], quantize_q8_0(&x)).unwrap();
        if extra {
            w.add_tensor("extra", GgmlType::F32, &[1], encode_f32(&[0.0])).unwrap();
        }
        GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap()
    }

    #[test]
    fn inspect_abbreviates_and_totals() {
        let s = inspect(&file(0.1, false), 4, true);
        assert!(s.contains("[u32; 20] [0, 1, 2, 3, ...]"), "{s}");
        assert!(s.contains("Q8_0") && s.contains("all"));
    }

    #[test]
    fn diff_reports_values_and_presence() {
        let (s, n) = diff(&file(0.1, false), &file(0.2, true), true).unwrap();
        assert_eq!(n, 2, "{s}");
        assert!(s.contains("only in B") && s.contains("1 identical"), "{s}");
        let (_, n) = diff(&file(0.1, false), &file(0.1, false), false).unwrap();
        assert_eq!(n, 0);
        let d = diff_values(&[1.0, -1.0], &[1.0, 1.0]);
        assert_eq!(d.max_abs, 2.0);
        assert!((d.rel_rms - 2f64.sqrt()).abs() < 1e-12);
    }
}
