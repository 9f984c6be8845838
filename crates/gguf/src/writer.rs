//! GGUF v3 writer.
//!
//! Collects metadata and tensors in memory-order, then streams header, infos,
//! padding and data. Tensor offsets are assigned in insertion order, each
//! aligned to the file alignment (32, or `general.alignment` if that key was
//! added). `write_file` writes to a temporary sibling, fsyncs and renames, so
//! a crash never leaves a half-written file under the final name.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use crate::container::{align_up, GgufError, Value, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_DIMS};
use crate::types::GgmlType;

struct PendingTensor {
    name: String,
    ty: GgmlType,
    ne: Vec<u64>,
    bytes: Vec<u8>,
}

/// Builder for a GGUF v3 file.
#[derive(Default)]
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a metadata entry. `general.alignment` must be a power-of-two u32.
    pub fn add_kv(&mut self, key: impl Into<String>, value: Value) -> Result<&mut Self, GgufError> {
        let key = key.into();
        if key == "general.alignment" && !matches!(value, Value::U32(a) if a.is_power_of_two()) {
            return Err(GgufError::Invalid(format!("general.alignment must be a power-of-two u32, got {value:?}")));
        }
        check_value(&key, &value, 0)?;
        if !self.keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey(key));
        }
        self.kv.push((key, value));
        Ok(self)
    }

    /// Add a tensor; `bytes.len()` must equal the size implied by `ty` and `ne`.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        ne: &[u64],
        bytes: Vec<u8>,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        if ne.is_empty() || ne.len() > MAX_DIMS as usize {
            return Err(GgufError::BadDims { tensor: name, n_dims: ne.len() as u32 });
        }
        if ne[0] % ty.block_elems() as u64 != 0 {
            return Err(GgufError::BadShape {
                tensor: name,
                reason: format!("ne0 = {} is not a multiple of the {} block size", ne[0], ty.name()),
            });
        }
        let expected = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|c| usize::try_from(c).ok())
            .and_then(|c| ty.row_bytes(c))
            .ok_or_else(|| GgufError::BadShape { tensor: name.clone(), reason: format!("size of {ne:?} overflows") })?;
        if bytes.len() != expected {
            return Err(GgufError::Length { ty, what: "tensor data", expected, got: bytes.len() });
        }
        if !self.names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        self.tensors.push(PendingTensor { name, ty, ne: ne.to_vec(), bytes });
        Ok(self)
    }

    /// The alignment the file will use.
    pub fn alignment(&self) -> usize {
        self.kv
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u32())
            .map(|a| a as usize)
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Serialise the whole file.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), GgufError> {
        let align = self.alignment();
        let mut head = Vec::new();
        head.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        head.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut head, k);
            head.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = align_up(offset + t.bytes.len(), align).ok_or_else(|| GgufError::Invalid("file too large".into()))?;
        }
        let data_start = align_up(head.len(), align).ok_or_else(|| GgufError::Invalid("header too large".into()))?;
        head.resize(data_start, 0);
        w.write_all(&head)?;
        let zeros = vec![0u8; align];
        let mut pos = 0usize;
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            w.write_all(&zeros[..off - pos])?;
            w.write_all(&t.bytes)?;
            pos = off + t.bytes.len();
        }
        Ok(())
    }

    /// Serialise into a byte vector.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }

    /// Write to `path` atomically: temp file in the same directory, fsync, rename.
    pub fn write_file(&self, path: &Path) -> Result<(), GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file_name = path.file_name().ok_or_else(|| GgufError::Invalid(format!("{} has no file name", path.display())))?;
        let tmp = path.with_file_name(format!(".{}.tmp{}", file_name.to_string_lossy(), std::process::id()));
        let result = (|| {
            let f = std::fs::File::create(&tmp).map_err(io)?;
            let mut bw = std::io::BufWriter::with_capacity(1 << 20, f);
            self.write_to(&mut bw)?;
            let f = bw.into_inner().map_err(|e| io(e.into_error()))?;
            f.sync_all().map_err(io)?;
            drop(f);
            std::fs::rename(&tmp, path).map_err(io)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Arrays must be homogeneous to be representable (one element type per array).
fn check_value(key: &str, v: &Value, depth: usize) -> Result<(), GgufError> {
    if let Value::Array(items) = v {
        if depth >= crate::container::MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep { key: key.to_string() });
        }
        if let Some(first) = items.first() {
            let t = first.type_id();
            for it in items {
                if it.type_id() != t {
                    return Err(GgufError::Invalid(format!("key {key:?}: array mixes {} and {}", first.type_name(), it.type_name())));
                }
                check_value(key, it, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Appends a GGUF string (u64 length + bytes). Public so streaming writers
/// (the converter's) serialise metadata exactly as this writer does.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a metadata value's payload (no type tag; arrays carry their element
/// type and count). Values are assumed validated (`add_kv` checks arrays).
pub fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            // Empty arrays carry element type u8 (any type is valid for zero items).
            let ty = items.first().map(Value::type_id).unwrap_or(0);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
