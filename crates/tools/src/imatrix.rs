//! Importance matrices in llama.cpp's legacy `.dat` format (the one ds4 reads):
//!
//! ```text
//! i32 n_entries
//! n_entries × { i32 name_len; name bytes; i32 ncall; i32 nval; f32 values[nval] }
//! [i32 last_chunk; i32 len; dataset name bytes]      (optional trailer)
//! ```
//!
//! `values` are per-input-column means of x² times `ncall`; for a stacked expert
//! tensor (`blk.N.ffn_gate_exps.weight`) they are `n_expert` blocks of `n_in`
//! columns, expert by expert. [`Collector`] accumulates activations as the
//! engine's MoE routes tokens to experts; [`Imatrix`] loads a file and hands
//! per-tensor vectors (divided by `ncall`) to the IQ2_XXS quantiser.

use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
}

/// A loaded importance matrix: tensor name → per-column importance.
#[derive(Clone, Debug, Default)]
pub struct Imatrix {
    pub entries: BTreeMap<String, Vec<f32>>,
    pub dataset: Option<String>,
    pub last_chunk: i32,
}

impl Imatrix {
    pub fn load(path: &Path) -> Result<Imatrix, ImatrixError> {
        let p = path.display().to_string();
        let b = std::fs::read(path).map_err(|source| ImatrixError::Io { path: p.clone(), source })?;
        Self::parse(&b).map_err(|msg| ImatrixError::Format { path: p, msg })
    }

    pub fn parse(b: &[u8]) -> Result<Imatrix, String> {
        let mut pos = 0usize;
        let i32_at = |pos: &mut usize, what: &str| -> Result<i32, String> {
            let s = b.get(*pos..*pos + 4).ok_or_else(|| format!("truncated at byte {} reading {what}", *pos))?;
            *pos += 4;
            Ok(i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        };
        let n = i32_at(&mut pos, "entry count")?;
        if n < 0 || n as usize > b.len() / 12 {
            return Err(format!("entry count {n} is impossible for a {}-byte file", b.len()));
        }
        let mut im = Imatrix::default();
        for _ in 0..n {
            let len = i32_at(&mut pos, "name length")?;
            if len <= 0 || len as usize > 4096 {
                return Err(format!("bad name length {len}"));
            }
            let name = b.get(pos..pos + len as usize).ok_or("truncated name")?;
            let name = std::str::from_utf8(name).map_err(|_| "name is not UTF-8")?.to_string();
            pos += len as usize;
            let ncall = i32_at(&mut pos, "ncall")?;
            let nval = i32_at(&mut pos, "nval")?;
            if nval < 0 || (nval as usize).checked_mul(4).is_none_or(|nb| nb > b.len() - pos) {
                return Err(format!("{name}: nval {nval} runs past the end of the file"));
            }
            let vals: Vec<f32> = b[pos..pos + 4 * nval as usize]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) / (ncall.max(1) as f32))
                .collect();
            pos += 4 * nval as usize;
            if vals.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(format!("{name}: values must be finite and non-negative"));
            }
            im.entries.insert(name, vals);
        }
        if pos + 8 <= b.len() {
            im.last_chunk = i32_at(&mut pos, "last chunk")?;
            let len = i32_at(&mut pos, "dataset length")?;
            if len >= 0 && pos + len as usize <= b.len() {
                im.dataset = std::str::from_utf8(&b[pos..pos + len as usize]).ok().map(str::to_string);
            }
        }
        Ok(im)
    }

    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.entries.get(name).map(Vec::as_slice)
    }
}

/// Accumulates Σx² per input column of each expert and how many rows each got.
#[derive(Clone, Debug, Default)]
pub struct Collector {
    /// tensor name → (n_in, per-expert sums [n_expert × n_in], per-expert counts)
    stats: BTreeMap<String, (usize, Vec<f64>, Vec<u64>)>,
    pub chunks: i32,
}

impl Collector {
    /// Record one activation row `x` (length n_in) entering expert `e` of a
    /// stacked tensor with `n_expert` experts.
    pub fn add(&mut self, tensor: &str, n_expert: usize, e: usize, x: &[f32]) {
        let n_in = x.len();
        let st = self.stats.entry(tensor.to_string()).or_insert_with(|| (n_in, vec![0.0; n_in * n_expert], vec![0; n_expert]));
        if st.0 != n_in || e >= st.2.len() {
            return;
        }
        for (a, v) in st.1[e * n_in..(e + 1) * n_in].iter_mut().zip(x) {
            *a += (*v as f64) * (*v as f64);
        }
        st.2[e] += 1;
    }

    /// Legacy `.dat` bytes (llama.cpp `save_imatrix_legacy` conventions: an
    /// expert never routed to gets 1.0 so it is not zero-weighted).
    pub fn to_bytes(&self, dataset: &str) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.stats.len() as i32).to_le_bytes());
        for (name, (n_in, sums, counts)) in &self.stats {
            out.extend_from_slice(&(name.len() as i32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            let ncall = counts.iter().copied().max().unwrap_or(0).max(1) as i32;
            out.extend_from_slice(&ncall.to_le_bytes());
            out.extend_from_slice(&(sums.len() as i32).to_le_bytes());
            for (i, s) in sums.iter().enumerate() {
                let c = counts[i / n_in.max(&1)];
                let v = if c == 0 { 1.0 } else { s / c as f64 } * ncall as f64;
                out.extend_from_slice(&(v as f32).to_le_bytes());
            }
        }
        out.extend_from_slice(&self.chunks.to_le_bytes());
        out.extend_from_slice(&(dataset.len() as i32).to_le_bytes());
        out.extend_from_slice(dataset.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile() {
        let mut c = Collector::default();
        c.add("blk.3.ffn_gate_exps.weight", 2, 1, &[1.0, 2.0]);
        c.add("blk.3.ffn_gate_exps.weight", 2, 1, &[3.0, 0.0]);
        let b = c.to_bytes("data.txt");
        let im = Imatrix::parse(&b).unwrap();
        let v = im.get("blk.3.ffn_gate_exps.weight").unwrap();
        assert_eq!(v, &[1.0, 1.0, 5.0, 2.0]);
        assert_eq!(im.dataset.as_deref(), Some("data.txt"));
        for cut in [0, 3, 10, b.len() - 20] {
            let _ = Imatrix::parse(&b[..cut]); // must not panic
        }
        assert!(Imatrix::parse(&[0xff, 0xff, 0xff, 0x7f]).is_err());
    }
}
