//! A streaming GGUF v3 writer: the header (metadata and every tensor info) is
//! written first — tensor sizes follow from type and shape, so offsets are known
//! before any tensor is quantised — and tensor data is then appended in order.
//! Only the tensor being produced is in memory (the gguf crate's `GgufWriter`
//! holds every tensor's bytes, which a 160 GB model cannot afford).
//!
//! Output goes to `FINAL.tmp`; `finish` fsyncs and renames it. Dropping an
//! unfinished writer (any error path) removes the temporary file, so a failed
//! run never leaves a half-written file under either name — except after a kill
//! or crash, where `FINAL.tmp` plus `FINAL.tmp.progress` (the number of tensors
//! completed and fsynced, and a hash of the header) let the next run with the
//! same plan resume after the last completed tensor.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use dsv4_gguf::writer::{put_str, put_value};
use dsv4_gguf::{GgmlType, Value};
use sha2::{Digest, Sha256};

pub const ALIGN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("tensor {name:?}: {msg}")]
    Tensor { name: String, msg: String },
    #[error("{0}")]
    Order(String),
}

/// One planned tensor.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub ty: GgmlType,
    /// GGUF order: `ne[0]` is the contiguous (input) axis.
    pub ne: Vec<u64>,
}

impl TensorSpec {
    pub fn n_elems(&self) -> u64 {
        self.ne.iter().product()
    }
    /// Byte size; `None` if a row is not whole blocks.
    pub fn n_bytes(&self) -> Option<u64> {
        let be = self.ty.block_elems() as u64;
        if self.ne.first().is_none_or(|&n0| n0 % be != 0) {
            return None;
        }
        (self.n_elems() / be).checked_mul(self.ty.block_bytes() as u64)
    }
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// Serialises the header and returns it with each tensor's absolute file offset.
pub fn build_header(kv: &[(String, Value)], tensors: &[TensorSpec]) -> Result<(Vec<u8>, Vec<u64>, u64), StreamError> {
    let mut head = Vec::new();
    head.extend_from_slice(&0x4655_4747u32.to_le_bytes());
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut head, k);
        head.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut head, v);
    }
    let mut rel = 0u64;
    let mut rels = Vec::with_capacity(tensors.len());
    for t in tensors {
        let n = t.n_bytes().ok_or_else(|| StreamError::Tensor {
            name: t.name.clone(),
            msg: format!("ne {:?} is not a whole number of {} blocks ({} values)", t.ne, t.ty, t.ty.block_elems()),
        })?;
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&rel.to_le_bytes());
        rels.push(rel);
        rel = align_up(rel + n);
    }
    let data_start = align_up(head.len() as u64);
    head.resize(data_start as usize, 0);
    Ok((head, rels.iter().map(|r| r + data_start).collect(), data_start + rel))
}

pub fn tmp_path(final_path: &Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn progress_path(final_path: &Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_owned();
    s.push(".tmp.progress");
    PathBuf::from(s)
}

/// Streaming writer; see the module docs.
pub struct StreamWriter {
    final_path: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<File>>,
    specs: Vec<TensorSpec>,
    offsets: Vec<u64>,
    total: u64,
    next: usize,
    header_hash: String,
    finished: bool,
    /// Whether a kill leaves the temp file for resuming (errors still remove it).
    keep_on_drop: bool,
}

impl StreamWriter {
    /// Creates `FINAL.tmp` (or resumes it when `resume` and its progress record
    /// matches this exact header). Returns the writer; `next_tensor()` says where
    /// to continue.
    pub fn create(final_path: &Path, kv: &[(String, Value)], specs: Vec<TensorSpec>, resume: bool) -> Result<StreamWriter, StreamError> {
        let (head, offsets, total) = build_header(kv, &specs)?;
        let header_hash = format!("{:x}", Sha256::digest(&head));
        let tmp = tmp_path(final_path);
        let io = |source| StreamError::Io { path: tmp.clone(), source };
        let mut next = 0usize;
        let mut file = None;
        if resume {
            if let Some(done) = read_progress(final_path, &header_hash) {
                if done <= specs.len() {
                    if let Ok(f) = OpenOptions::new().write(true).open(&tmp) {
                        let end = if done == 0 { head.len() as u64 } else { offsets[done - 1] + specs[done - 1].n_bytes().unwrap_or(0) };
                        if f.metadata().map(|m| m.len() >= end).unwrap_or(false) {
                            f.set_len(end).map_err(io)?;
                            let mut f = f;
                            f.seek(SeekFrom::Start(end)).map_err(io)?;
                            file = Some(f);
                            next = done;
                        }
                    }
                }
            }
        }
        let file = match file {
            Some(f) => f,
            None => {
                let mut f = File::create(&tmp).map_err(io)?;
                f.write_all(&head).map_err(io)?;
                f
            }
        };
        let w = StreamWriter {
            final_path: final_path.to_path_buf(),
            tmp: tmp.clone(),
            file: Some(std::io::BufWriter::with_capacity(8 << 20, file)),
            specs,
            offsets,
            total,
            next,
            header_hash,
            finished: false,
            keep_on_drop: false,
        };
        if next == 0 {
            w.write_progress(0)?;
        }
        Ok(w)
    }

    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Index of the next tensor to write (non-zero after a resume).
    pub fn next_tensor(&self) -> usize {
        self.next
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Mark that an interruption (not an error) may leave the temp file behind.
    pub fn set_keep_on_drop(&mut self, keep: bool) {
        self.keep_on_drop = keep;
    }

    /// Starts tensor `next`: pads up to its offset. Then call [`Self::write`]
    /// with its bytes (in pieces) and [`Self::end_tensor`].
    pub fn begin_tensor(&mut self, name: &str) -> Result<(), StreamError> {
        let i = self.next;
        let spec = self.specs.get(i).ok_or_else(|| StreamError::Order(format!("no tensor left to write, got {name:?}")))?;
        if spec.name != name {
            return Err(StreamError::Order(format!("expected tensor {:?} next, got {name:?}", spec.name)));
        }
        let pos = self.position()?;
        let target = self.offsets[i];
        if pos > target {
            return Err(StreamError::Order(format!("tensor {name:?}: file position {pos} past its offset {target}")));
        }
        let pad = vec![0u8; (target - pos) as usize];
        self.write_raw(&pad)
    }

    fn position(&mut self) -> Result<u64, StreamError> {
        let tmp = self.tmp.clone();
        let f = self.file.as_mut().expect("open");
        f.stream_position().map_err(|source| StreamError::Io { path: tmp, source })
    }

    fn write_raw(&mut self, b: &[u8]) -> Result<(), StreamError> {
        let tmp = self.tmp.clone();
        self.file.as_mut().expect("open").write_all(b).map_err(|source| StreamError::Io { path: tmp, source })
    }

    pub fn write(&mut self, b: &[u8]) -> Result<(), StreamError> {
        self.write_raw(b)
    }

    /// Ends tensor `next`, checking that exactly its size was written. With
    /// `checkpoint`, flushes + fsyncs and records progress (for resuming).
    pub fn end_tensor(&mut self, checkpoint: bool) -> Result<(), StreamError> {
        let i = self.next;
        let spec = &self.specs[i];
        let want = self.offsets[i] + spec.n_bytes().unwrap_or(0);
        let name = spec.name.clone();
        let pos = self.position()?;
        if pos != want {
            return Err(StreamError::Tensor { name, msg: format!("wrote up to byte {pos}, expected {want}") });
        }
        self.next += 1;
        if checkpoint {
            let tmp = self.tmp.clone();
            let f = self.file.as_mut().expect("open");
            f.flush().map_err(|source| StreamError::Io { path: tmp.clone(), source })?;
            f.get_ref().sync_data().map_err(|source| StreamError::Io { path: tmp, source })?;
            self.write_progress(self.next)?;
        }
        Ok(())
    }

    fn write_progress(&self, done: usize) -> Result<(), StreamError> {
        let p = progress_path(&self.final_path);
        std::fs::write(&p, format!("{} {}\n", self.header_hash, done)).map_err(|source| StreamError::Io { path: p, source })
    }

    /// Pads the file, fsyncs, renames the temp file onto the final name.
    pub fn finish(mut self) -> Result<(), StreamError> {
        if self.next != self.specs.len() {
            return Err(StreamError::Order(format!("only {} of {} tensors written", self.next, self.specs.len())));
        }
        let pos = self.position()?;
        if pos < self.total {
            let pad = vec![0u8; (self.total - pos) as usize];
            self.write_raw(&pad)?;
        }
        let tmp = self.tmp.clone();
        let io = |source| StreamError::Io { path: tmp.clone(), source };
        let bw = self.file.take().expect("open");
        let f = bw.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&self.tmp, &self.final_path).map_err(|source| StreamError::Io { path: self.final_path.clone(), source })?;
        if let Some(dir) = self.final_path.parent() {
            if let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
                let _ = d.sync_all();
            }
        }
        let _ = std::fs::remove_file(progress_path(&self.final_path));
        self.finished = true;
        Ok(())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.finished && !self.keep_on_drop {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
            let _ = std::fs::remove_file(progress_path(&self.final_path));
        }
    }
}

fn read_progress(final_path: &Path, hash: &str) -> Option<usize> {
    let text = std::fs::read_to_string(progress_path(final_path)).ok()?;
    let mut it = text.split_whitespace();
    if it.next()? != hash {
        return None;
    }
    it.next()?.parse().ok()
}
