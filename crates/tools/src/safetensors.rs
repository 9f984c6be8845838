//! A strict, memory-mapped safetensors reader for the official DeepSeek V4
//! checkpoint (and the tiny fixture in the same format).
//!
//! A shard is `u64 header_len` + JSON header + data. Every entry is validated
//! before anything is handed out: known dtype, shape product × element size
//! equals the byte range (with overflow checks), the range lies inside the data
//! section, and no two tensors overlap. A hostile or truncated file gives a
//! [`SafetensorsError`] naming the file and tensor, never a panic or a huge
//! allocation. Data stays in the mmap; callers read row ranges so a 160 GB
//! checkpoint never has to fit in memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

/// Header JSON larger than this is rejected (the real shards have ~100 KB headers).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: tensor {name:?}: {msg}")]
    Tensor { path: PathBuf, name: String, msg: String },
    #[error("tensor {0:?} is not in the checkpoint")]
    Missing(String),
    #[error("{0}")]
    Index(String),
}

type Result<T> = std::result::Result<T, SafetensorsError>;

/// Element types that occur in the DeepSeek V4 release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F8E4M3,
    F8E8M0,
    I8,
    U8,
    BF16,
    F16,
    F32,
    I32,
    I64,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E8M0" => Dtype::F8E8M0,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BF16" => Dtype::BF16,
            "F16" => Dtype::F16,
            "F32" => Dtype::F32,
            "I32" => Dtype::I32,
            "I64" => Dtype::I64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F8E4M3 | Dtype::F8E8M0 | Dtype::I8 | Dtype::U8 => 1,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A borrowed tensor: dtype, PyTorch-order shape and its raw little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    /// The shard it lives in (for error messages).
    pub path: &'a Path,
}

impl TensorView<'_> {
    pub fn n_elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One mmap'd `.safetensors` file.
pub struct SafeTensors {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensors").field("path", &self.path).field("tensors", &self.entries.len()).finish()
    }
}

impl SafeTensors {
    pub fn open(path: &Path) -> Result<SafeTensors> {
        let io = |source| SafetensorsError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only; like every mmap reader we rely on
        // nobody truncating it underneath us while converting.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (data_start, entries) = parse_header(path, &mmap)?;
        Ok(SafeTensors { path: path.to_path_buf(), mmap, data_start, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let (k, e) = self.entries.get_key_value(name)?;
        Some(TensorView {
            name: k,
            dtype: e.dtype,
            shape: &e.shape,
            data: &self.mmap[self.data_start + e.start..self.data_start + e.end],
            path: &self.path,
        })
    }
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<(usize, BTreeMap<String, Entry>)> {
    let fmt = |msg: String| SafetensorsError::Format { path: path.to_path_buf(), msg };
    if bytes.len() < 8 {
        return Err(fmt(format!("file is {} bytes, too short for a safetensors header", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(fmt(format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")));
    }
    if n > (bytes.len() - 8) as u64 {
        return Err(fmt(format!("header length {n} runs past the end of the {}-byte file (truncated?)", bytes.len())));
    }
    let data_start = 8 + n as usize;
    let header: Value = serde_json::from_slice(&bytes[8..data_start]).map_err(|e| fmt(format!("header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| fmt("header is not a JSON object".into()))?;
    let data_len = bytes.len() - data_start;
    let mut entries = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let terr = |msg: String| SafetensorsError::Tensor { path: path.to_path_buf(), name: name.clone(), msg };
        let dt = v.get("dtype").and_then(Value::as_str).ok_or_else(|| terr("no dtype".into()))?;
        let dtype = Dtype::parse(dt).ok_or_else(|| terr(format!("unsupported dtype {dt:?}")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| terr("no shape".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| terr("shape entries must be non-negative integers".into()))?;
        if shape.len() > 8 {
            return Err(terr(format!("{} dimensions", shape.len())));
        }
        let offs = v.get("data_offsets").and_then(Value::as_array).ok_or_else(|| terr("no data_offsets".into()))?;
        let (start, end) = match offs.as_slice() {
            [a, b] => (
                a.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| terr("bad data_offsets".into()))?,
                b.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| terr("bad data_offsets".into()))?,
            ),
            _ => return Err(terr("data_offsets must be [start, end]".into())),
        };
        if start > end || end > data_len {
            return Err(terr(format!("data_offsets [{start}, {end}) outside the {data_len}-byte data section (truncated file?)")));
        }
        let want = shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        if want != end - start {
            return Err(terr(format!("shape {shape:?} of {} needs {want} bytes, data_offsets give {}", dtype.name(), end - start)));
        }
        entries.insert(name.clone(), Entry { dtype, shape, start, end });
    }
    // Overlapping ranges mean a corrupt or malicious header.
    let mut spans: Vec<(&str, usize, usize)> = entries.iter().filter(|(_, e)| e.end > e.start).map(|(k, e)| (k.as_str(), e.start, e.end)).collect();
    spans.sort_by_key(|s| s.1);
    for w in spans.windows(2) {
        if w[1].1 < w[0].2 {
            return Err(fmt(format!("tensors {:?} and {:?} overlap", w[0].0, w[1].0)));
        }
    }
    Ok((data_start, entries))
}

/// A checkpoint directory: every shard, with a name → shard map.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    shards: Vec<SafeTensors>,
    map: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` if present (every shard it names
    /// must exist and hold the tensors it claims), else every `*.safetensors` file.
    /// A leading `model.` on tensor names is stripped (some exports add it).
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<String> = Vec::new();
        let mut claimed: Vec<(String, String)> = Vec::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| SafetensorsError::Io { path: index.clone(), source })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| SafetensorsError::Index(format!("{}: {e}", index.display())))?;
            let wm = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| SafetensorsError::Index(format!("{}: no weight_map object", index.display())))?;
            for (k, f) in wm {
                let f = f.as_str().ok_or_else(|| SafetensorsError::Index(format!("{}: shard of {k:?} is not a string", index.display())))?;
                if !is_plain_file_name(f) {
                    return Err(SafetensorsError::Index(format!("{}: shard name {f:?} is not a plain file name", index.display())));
                }
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
                claimed.push((k.clone(), f.to_string()));
            }
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| SafetensorsError::Io { path: dir.to_path_buf(), source })?;
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".safetensors") {
                    files.push(n);
                }
            }
            files.sort();
        }
        if files.is_empty() {
            return Err(SafetensorsError::Index(format!("{}: no safetensors shards found", dir.display())));
        }
        let mut shards = Vec::new();
        let mut map = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let st = SafeTensors::open(&dir.join(f))?;
            for n in st.names() {
                let key = n.strip_prefix("model.").unwrap_or(n).to_string();
                if map.insert(key.clone(), i).is_some() {
                    return Err(SafetensorsError::Index(format!("tensor {key:?} appears in more than one shard")));
                }
            }
            shards.push(st);
        }
        for (k, f) in &claimed {
            let key = k.strip_prefix("model.").unwrap_or(k);
            match map.get(key) {
                Some(&i) if files[i] == *f => {}
                Some(&i) => return Err(SafetensorsError::Index(format!("index puts {k:?} in {f}, found in {}", files[i]))),
                None => return Err(SafetensorsError::Index(format!("index lists {k:?} in {f}, but that shard does not contain it"))),
            }
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, map })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        let &i = self.map.get(name).ok_or_else(|| SafetensorsError::Missing(name.to_string()))?;
        let st = &self.shards[i];
        st.get(name).or_else(|| st.get(&format!("model.{name}"))).ok_or_else(|| SafetensorsError::Missing(name.to_string()))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A file name with no directory part, no `..`, nothing absolute.
pub fn is_plain_file_name(f: &str) -> bool {
    !f.is_empty() && f != "." && f != ".." && !f.contains('/') && !f.contains('\\') && !f.contains('\0') && !f.contains(':')
}
