//! GGUF v3 container reader (spec §1).
//!
//! The whole file is mapped (or owned) and parsed up front into metadata and
//! tensor infos; tensor data is then handed out as borrowed slices. Parsing is
//! strict because the input may be hostile: every read is bounds-checked,
//! counts are never trusted for allocation (capacity is bounded by the bytes
//! that remain), nesting depth is limited, and tensor extents are checked
//! against the file and against each other before any slice is handed out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::types::GgmlType;

/// "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// The only container version accepted.
pub const GGUF_VERSION: u32 = 3;
/// Alignment used when `general.alignment` is absent or zero.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's limit on tensor rank.
pub const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are rejected (bounds recursion on hostile input).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Largest up-front reservation for a counted list (counts come from the file).
const INITIAL_CAPACITY: usize = 1 << 16;

/// Everything that can go wrong reading, writing or decoding GGUF data.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("I/O error: {0}")]
    Write(#[from] std::io::Error),
    #[error("not a GGUF file: magic is {0:#010x}, expected 0x46554747 (\"GGUF\")")]
    BadMagic(u32),
    #[error("unsupported GGUF version {0} (only version 3 is supported)")]
    UnsupportedVersion(u32),
    #[error("file truncated: {what} at byte offset {offset} needs {need} bytes, only {have} remain")]
    Truncated { what: String, offset: usize, need: u64, have: usize },
    #[error("{what} at byte offset {offset}: count {count} cannot fit in the {have} bytes that remain")]
    CountTooLarge { what: String, offset: usize, count: u64, have: usize },
    #[error("{what} at byte offset {offset} is not valid UTF-8")]
    BadUtf8 { what: String, offset: usize },
    #[error("metadata key {key:?}: unknown value type {ty} at byte offset {offset}")]
    BadValueType { key: String, ty: u32, offset: usize },
    #[error("metadata key {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}")]
    NestingTooDeep { key: String },
    #[error("metadata key {key:?}: invalid bool byte {byte}")]
    BadBool { key: String, byte: u8 },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("general.alignment: {0}")]
    BadAlignment(String),
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("tensor {tensor:?}: {n_dims} dimensions (must be 1..={MAX_DIMS})")]
    BadDims { tensor: String, n_dims: u32 },
    #[error("tensor {tensor:?}: unsupported ggml type id {id}")]
    UnknownType { tensor: String, id: u32 },
    #[error("tensor {tensor:?}: {reason}")]
    BadShape { tensor: String, reason: String },
    #[error("tensor {tensor:?}: data [{start}, {end}) relative to data start {data_offset} lies past the end of the data section ({data_len} bytes)")]
    TensorOutOfBounds { tensor: String, start: u64, end: u64, data_offset: usize, data_len: usize },
    #[error("tensors {a:?} and {b:?} overlap (data offsets {a_start}..{a_end} and {b_start}..)")]
    TensorOverlap { a: String, b: String, a_start: u64, a_end: u64, b_start: u64 },
    #[error("{ty}: {what} has {got} bytes/elements, expected {expected}")]
    Length { ty: GgmlType, what: &'static str, expected: usize, got: usize },
    #[error("{op} is not supported for type {ty}")]
    Unsupported { ty: GgmlType, op: &'static str },
    #[error("invalid input for the writer: {0}")]
    Invalid(String),
}

/// A metadata value (spec §1, value types 0..12).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The GGUF value-type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Lower-case GGUF type name ("u32", "string", "array", ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// Any integer value, widened (u64 values above i64::MAX give `None`).
    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that fits in u32.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_int().and_then(|v| u32::try_from(v).ok())
    }
    /// Any integer value that fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }
    /// Any integer value that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_int().and_then(|v| i64::try_from(v).ok())
    }
    /// Any numeric value (floats and integers), converted to f32.
    pub fn as_f32(&self) -> Option<f32> {
        self.as_f64().map(|v| v as f32)
    }
    /// Any numeric value (floats and integers), converted to f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, `ne[0]` fastest-varying.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset relative to [`GgufFile::data_offset`].
    pub offset: u64,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elems(&self) -> usize {
        // Validated at parse time not to overflow.
        self.ne.iter().product::<u64>() as usize
    }
}

/// A borrowed view of one tensor's data.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    pub name: &'a str,
    pub ty: GgmlType,
    pub ne: &'a [u64],
    pub data: &'a [u8],
}

impl Tensor<'_> {
    pub fn n_elems(&self) -> usize {
        self.ne.iter().product::<u64>() as usize
    }
    /// Dimension `i`, 1 if the tensor has fewer dimensions.
    pub fn dim(&self, i: usize) -> u64 {
        self.ne.get(i).copied().unwrap_or(1)
    }
    /// Number of rows (product of all dims but the first).
    pub fn n_rows(&self) -> usize {
        self.ne.iter().skip(1).product::<u64>() as usize
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file; owns the mapping or buffer its tensors borrow from.
pub struct GgufFile {
    storage: Storage,
    version: u32,
    alignment: usize,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_offset: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Map and parse a file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; like every mmap user we rely on the
        // file not being truncated underneath us while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mmap(map))
    }

    /// Parse an in-memory file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<GgufFile, GgufError> {
        let header = parse_header(storage.bytes())?;
        Ok(GgufFile {
            storage,
            version: header.version,
            alignment: header.alignment,
            metadata: header.metadata,
            key_index: header.key_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
            data_offset: header.data_offset,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> usize {
        self.alignment
    }
    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }
    /// Tensor infos in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    pub fn tensor(&self, name: &str) -> Option<Tensor<'_>> {
        self.tensor_info(name).map(|t| self.tensor_of(t))
    }
    /// The data view of an info obtained from [`GgufFile::tensor_infos`].
    pub fn tensor_of<'a>(&'a self, t: &'a TensorInfo) -> Tensor<'a> {
        // Extents were validated against the file length at parse time.
        let start = self.data_offset + t.offset as usize;
        Tensor { name: &t.name, ty: t.ty, ne: &t.ne, data: &self.file_bytes()[start..start + t.n_bytes] }
    }
    /// Absolute byte offset of the data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }
    pub fn file_bytes(&self) -> &[u8] {
        self.storage.bytes()
    }
}

struct Header {
    version: u32,
    alignment: usize,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_offset: usize,
}

/// Bounds-checked little-endian reader.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() as u64 {
            return Err(GgufError::Truncated { what: what(), offset: self.pos, need: n, have: self.remaining() });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let offset = self.pos;
        let len = self.u64(&|| format!("{} (string length)", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8 { what: what(), offset })
    }

    /// Check that `count` items of at least `min_size` bytes each can fit in
    /// what remains; returns the count. Callers reserve at most
    /// [`INITIAL_CAPACITY`] up front and let vectors grow as items actually parse.
    fn bounded_count(&self, count: u64, min_size: u64, what: &dyn Fn() -> String) -> Result<usize, GgufError> {
        let fits = count.checked_mul(min_size).is_some_and(|b| b <= self.remaining() as u64);
        if !fits {
            return Err(GgufError::CountTooLarge { what: what(), offset: self.pos, count, have: self.remaining() });
        }
        Ok(count as usize)
    }
}

/// Smallest encoded size of one value of a type (for count bounding).
fn min_value_size(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

fn read_value(c: &mut Cursor<'_>, ty: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
    let what = || format!("value of metadata key {key:?}");
    Ok(match ty {
        0 => Value::U8(c.u8(&what)?),
        1 => Value::I8(c.u8(&what)? as i8),
        2 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        3 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        4 => Value::U32(c.u32(&what)?),
        5 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        6 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        7 => match c.u8(&what)? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            byte => return Err(GgufError::BadBool { key: key.to_string(), byte }),
        },
        8 => Value::String(c.string(&what)?),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(GgufError::NestingTooDeep { key: key.to_string() });
            }
            let ty_off = c.pos;
            let elem_ty = c.u32(&|| format!("array element type of metadata key {key:?}"))?;
            if elem_ty > 12 {
                return Err(GgufError::BadValueType { key: key.to_string(), ty: elem_ty, offset: ty_off });
            }
            let count = c.u64(&|| format!("array length of metadata key {key:?}"))?;
            let n = c.bounded_count(count, min_value_size(elem_ty), &|| format!("array of metadata key {key:?}"))?;
            let mut items = Vec::with_capacity(n.min(INITIAL_CAPACITY));
            for _ in 0..n {
                items.push(read_value(c, elem_ty, key, depth + 1)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(c.u64(&what)?),
        11 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        12 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        _ => return Err(GgufError::BadValueType { key: key.to_string(), ty, offset: c.pos.saturating_sub(4) }),
    })
}

/// Round `x` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(x: usize, align: usize) -> Option<usize> {
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.u32(&|| "magic".into())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = c.u32(&|| "version".into())?;
    if version != GGUF_VERSION {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata count".into())?;

    // A key/value is at least 8 (key length) + 4 (type) + 1 bytes.
    let n_kv = c.bounded_count(n_kv, 13, &|| "metadata count".into())?;
    let mut metadata = Vec::with_capacity(n_kv.min(INITIAL_CAPACITY));
    let mut key_index = HashMap::with_capacity(n_kv.min(INITIAL_CAPACITY));
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        let ty = c.u32(&|| format!("value type of metadata key {key:?}"))?;
        let value = read_value(&mut c, ty, &key, 0)?;
        if key_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.push((key, value));
    }

    let alignment = match key_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(0)) => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as usize,
        Some(Value::U32(a)) => return Err(GgufError::BadAlignment(format!("{a} is not a power of two"))),
        Some(v) => return Err(GgufError::BadAlignment(format!("must be u32, found {}", v.type_name()))),
    };

    // A tensor info is at least 8 (name length) + 4 + 8 (one dim) + 4 + 8 bytes.
    let n_tensors = c.bounded_count(n_tensors, 32, &|| "tensor count".into())?;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(INITIAL_CAPACITY));
    let mut tensor_index = HashMap::with_capacity(n_tensors.min(INITIAL_CAPACITY));
    for i in 0..n_tensors {
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let what = || format!("info of tensor {name:?}");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::BadDims { tensor: name, n_dims });
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(c.u64(&what)?);
        }
        let type_id = c.u32(&what)?;
        let offset = c.u64(&what)?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownType { tensor: name.clone(), id: type_id })?;
        let n_bytes = tensor_bytes(&name, ty, &ne)?;
        if tensor_index.insert(name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(TensorInfo { name, ne, ty, offset, n_bytes });
    }

    let data_offset = align_up(c.pos, alignment).ok_or_else(|| GgufError::BadAlignment("data offset overflows".into()))?;
    let data_len = buf.len().saturating_sub(data_offset);
    check_extents(&tensors, data_offset, data_len)?;
    Ok(Header { version, alignment, metadata, key_index, tensors, tensor_index, data_offset })
}

/// Byte size of a tensor, validating the shape (whole blocks per row, no overflow).
fn tensor_bytes(name: &str, ty: GgmlType, ne: &[u64]) -> Result<usize, GgufError> {
    let bad = |reason: String| GgufError::BadShape { tensor: name.to_string(), reason };
    let count = ne
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|c| usize::try_from(c).ok())
        .ok_or_else(|| bad(format!("element count of dims {ne:?} overflows")))?;
    let ne0 = ne[0];
    if ne0 % ty.block_elems() as u64 != 0 {
        return Err(bad(format!("row length ne0 = {ne0} is not a multiple of the {} block size {}", ty.name(), ty.block_elems())));
    }
    ty.row_bytes(count).ok_or_else(|| bad(format!("byte size of dims {ne:?} overflows")))
}

fn check_extents(tensors: &[TensorInfo], data_offset: usize, data_len: usize) -> Result<(), GgufError> {
    for t in tensors {
        let end = t.offset.checked_add(t.n_bytes as u64);
        match end {
            Some(end) if end <= data_len as u64 => {}
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: t.name.clone(),
                    start: t.offset,
                    end: end.unwrap_or(u64::MAX),
                    data_offset,
                    data_len,
                })
            }
        }
    }
    // Overlap check on the non-empty tensors, sorted by start offset.
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        let (a, b) = (w[0], w[1]);
        let a_end = a.offset + a.n_bytes as u64;
        if a_end > b.offset {
            return Err(GgufError::TensorOverlap {
                a: a.name.clone(),
                b: b.name.clone(),
                a_start: a.offset,
                a_end,
                b_start: b.offset,
            });
        }
    }
    Ok(())
}
