//! Container reader/writer: round trips, every documented rejection, and
//! property tests that hostile bytes never panic.

use dsv4_gguf::quant::{encode_f16, encode_f32, quantize_q8_0};
use dsv4_gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Value};
use proptest::prelude::*;

fn all_values() -> Vec<(String, Value)> {
    vec![
        ("u8".into(), Value::U8(200)),
        ("i8".into(), Value::I8(-100)),
        ("u16".into(), Value::U16(60000)),
        ("i16".into(), Value::I16(-30000)),
        ("u32".into(), Value::U32(4_000_000_000)),
        ("i32".into(), Value::I32(-2_000_000_000)),
        ("f32".into(), Value::F32(1.5e-6)),
        ("bool".into(), Value::Bool(true)),
        ("string".into(), Value::String("héllo <｜User｜>".into())),
        ("u64".into(), Value::U64(u64::MAX)),
        ("i64".into(), Value::I64(i64::MIN)),
        ("f64".into(), Value::F64(std::f64::consts::PI)),
        ("arr.u32".into(), Value::Array(vec![Value::U32(1), Value::U32(2)])),
        ("arr.str".into(), Value::Array(vec![Value::String("a b".into()), Value::String(String::new())])),
        ("arr.empty".into(), Value::Array(vec![])),
        (
            "arr.nested".into(),
            Value::Array(vec![Value::Array(vec![Value::I8(1)]), Value::Array(vec![Value::I8(-1), Value::I8(2)])]),
        ),
        ("arr.f64".into(), Value::Array(vec![Value::F64(0.5), Value::F64(-2.0)])),
        ("arr.bool".into(), Value::Array(vec![Value::Bool(false), Value::Bool(true)])),
    ]
}

fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    for (k, v) in all_values() {
        w.add_kv(k, v).unwrap();
    }
    let x: Vec<f32> = (0..64).map(|i| i as f32 * 0.1 - 3.0).collect();
    w.add_tensor("a.q8", GgmlType::Q8_0, &[32, 2], quantize_q8_0(&x)).unwrap();
    w.add_tensor("b.f16", GgmlType::F16, &[8, 2, 2], encode_f16(&x[..32])).unwrap();
    w.add_tensor("c.f32", GgmlType::F32, &[3], encode_f32(&x[..3])).unwrap();
    w.add_tensor("d.i32", GgmlType::I32, &[2, 2], vec![1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0]).unwrap();
    w
}

fn sample_bytes() -> Vec<u8> {
    sample_writer().to_bytes().unwrap()
}

#[test]
fn round_trip_every_value_type() {
    let f = GgufFile::from_bytes(sample_bytes()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    let want = all_values();
    assert_eq!(f.metadata().len(), want.len());
    for ((k, v), (wk, wv)) in f.metadata().iter().zip(&want) {
        assert_eq!(k, wk);
        assert_eq!(v, wv, "key {k}");
        assert_eq!(f.get(k), Some(wv));
    }
    assert_eq!(f.data_offset() % 32, 0);
    let names: Vec<&str> = f.tensor_infos().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a.q8", "b.f16", "c.f32", "d.i32"]);
    for t in f.tensor_infos() {
        assert_eq!(t.offset % 32, 0);
    }
    let t = f.tensor("b.f16").unwrap();
    assert_eq!((t.ty, t.ne, t.n_elems(), t.dim(2), t.dim(3)), (GgmlType::F16, &[8u64, 2, 2][..], 32, 2, 1));
    assert_eq!(f.tensor("a.q8").unwrap().data.len(), 68);
    assert_eq!(dsv4_gguf::read_i32(f.tensor("d.i32").unwrap().data), [1, 2, 3, 4]);
    assert!(f.tensor("nope").is_none());
}

#[test]
fn value_accessors() {
    assert_eq!(Value::I32(7).as_u32(), Some(7));
    assert_eq!(Value::I32(-7).as_u32(), None);
    assert_eq!(Value::U64(u64::MAX).as_i64(), None);
    assert_eq!(Value::U8(3).as_u64(), Some(3));
    assert_eq!(Value::F64(1e-6).as_f32(), Some(1e-6));
    assert_eq!(Value::U32(16).as_f32(), Some(16.0));
    assert_eq!(Value::F32(1.0).as_u32(), None);
    assert_eq!(Value::Bool(true).as_bool(), Some(true));
    assert_eq!(Value::String("x".into()).as_str(), Some("x"));
    assert_eq!(Value::Array(vec![]).as_array().map(<[Value]>::len), Some(0));
    assert_eq!(Value::F64(0.0).type_name(), "f64");
}

#[test]
fn custom_alignment_and_write_file() {
    let mut w = sample_writer();
    w.add_kv("general.alignment", Value::U32(64)).unwrap();
    let dir = std::env::temp_dir().join(format!("dsv4-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("t.gguf");
    w.write_file(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert!(f.tensor_infos().iter().all(|t| t.offset % 64 == 0));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(w.add_kv("general.alignment", Value::U32(48)).is_err());
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new();
    assert!(matches!(w.add_tensor("t", GgmlType::Q8_0, &[32], vec![0; 33]), Err(GgufError::Length { .. })));
    assert!(matches!(w.add_tensor("t", GgmlType::Q8_0, &[16], vec![0; 17]), Err(GgufError::BadShape { .. })));
    assert!(matches!(w.add_tensor("t", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0; 4]), Err(GgufError::BadDims { .. })));
    w.add_tensor("t", GgmlType::F32, &[1], vec![0; 4]).unwrap();
    assert!(matches!(w.add_tensor("t", GgmlType::F32, &[1], vec![0; 4]), Err(GgufError::DuplicateTensor(_))));
    w.add_kv("k", Value::U8(1)).unwrap();
    assert!(matches!(w.add_kv("k", Value::U8(1)), Err(GgufError::DuplicateKey(_))));
    assert!(w.add_kv("mixed", Value::Array(vec![Value::U8(1), Value::I8(1)])).is_err());
}

// ---- Hand-built hostile files ----

struct Raw(Vec<u8>);
impl Raw {
    fn header(n_tensors: u64, n_kv: u64) -> Raw {
        let mut v = Vec::new();
        v.extend_from_slice(b"GGUF");
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&n_tensors.to_le_bytes());
        v.extend_from_slice(&n_kv.to_le_bytes());
        Raw(v)
    }
    fn str(mut self, s: &[u8]) -> Self {
        self.0.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.0.extend_from_slice(s);
        self
    }
    fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn tensor(self, name: &str, ne: &[u64], ty: u32, off: u64) -> Self {
        let mut r = self.str(name.as_bytes()).u32(ne.len() as u32);
        for &d in ne {
            r = r.u64(d);
        }
        r.u32(ty).u64(off)
    }
    fn pad_data(mut self, data: usize) -> Vec<u8> {
        let n = self.0.len().div_ceil(32) * 32 + data;
        self.0.resize(n, 0);
        self.0
    }
}

fn err(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn rejects_hostile_headers() {
    let mut bad_magic = sample_bytes();
    bad_magic[0] = b'X';
    assert!(err(bad_magic).contains("magic"));
    let mut v2 = sample_bytes();
    v2[4] = 2;
    assert!(err(v2).contains("version 2"));
    assert!(err(b"GGU".to_vec()).contains("truncated"));
    let full = sample_bytes();
    assert!(err(full[..full.len() - 1].to_vec()).contains("past the end"));
    assert!(err(Raw::header(0, u64::MAX).pad_data(0)).contains("metadata count"));
    assert!(err(Raw::header(u64::MAX / 2, 0).pad_data(0)).contains("tensor count"));
    // Array claiming 2^60 elements.
    let e = err(Raw::header(0, 1).str(b"k").u32(9).u32(4).u64(1 << 60).pad_data(0));
    assert!(e.contains("\"k\"") && e.contains("1152921504606846976"), "{e}");
    // String longer than the file.
    assert!(err(Raw::header(0, 1).str(b"k").u32(8).u64(1 << 40).pad_data(0)).contains("truncated"));
    assert!(err(Raw::header(0, 1).str(b"k").u32(13).pad_data(0)).contains("unknown value type 13"));
    assert!(err(Raw::header(0, 1).str(b"\xff\xfe").u32(0).pad_data(1)).contains("UTF-8"));
    assert!(err(Raw::header(0, 1).str(b"k").u32(8).str(b"\xc3").pad_data(0)).contains("UTF-8"));
    let dup = Raw::header(0, 2).str(b"k").u32(0).pad_data(0);
    let mut d2 = dup[..24].to_vec();
    d2.extend_from_slice(&Raw::header(0, 0).str(b"k").u32(0).0[24..]);
    d2.push(1);
    d2.extend_from_slice(&Raw::header(0, 0).str(b"k").u32(0).0[24..]);
    d2.push(2);
    d2.resize(d2.len() + 32, 0);
    assert!(err(d2).contains("duplicate metadata key \"k\""));
    // Deep nesting: 20 nested single-element arrays.
    let mut r = Raw::header(0, 1).str(b"deep").u32(9);
    for _ in 0..20 {
        r = r.u32(9).u64(1);
    }
    assert!(err(r.u32(0).pad_data(64)).contains("nested"));
    let mut b = Raw::header(0, 1).str(b"b").u32(7).0;
    b.push(2);
    b.resize(64, 0);
    assert!(err(b).contains("bool"));
    assert!(err(Raw::header(0, 1).str(b"general.alignment").u32(4).u32(48).pad_data(0)).contains("power of two"));
    assert!(err(Raw::header(0, 1).str(b"general.alignment").u32(8).str(b"32").pad_data(0)).contains("must be u32"));
}

#[test]
fn rejects_hostile_tensors() {
    let one = |ne: &[u64], ty: u32, off: u64, data: usize| err(Raw::header(1, 0).tensor("w", ne, ty, off).pad_data(data));
    assert!(one(&[1, 1, 1, 1, 1], 0, 0, 4).contains("5 dimensions"));
    assert!(one(&[], 0, 0, 4).contains("0 dimensions"));
    assert!(one(&[32], 2, 0, 64).contains("unsupported ggml type id 2"));
    assert!(one(&[16, 2], 8, 0, 64).contains("not a multiple"));
    assert!(one(&[1 << 32, 1 << 32, 1 << 32], 0, 0, 0).contains("overflows"));
    assert!(one(&[32], 0, 0, 64).contains("past the end"));
    assert!(one(&[8], 0, u64::MAX - 4, 64).contains("past the end"));
    let two = Raw::header(2, 0).tensor("a", &[8], 0, 0).tensor("b", &[8], 0, 16).pad_data(64);
    assert!(err(two).contains("overlap"));
    let dup = Raw::header(2, 0).tensor("a", &[8], 0, 0).tensor("a", &[8], 0, 32).pad_data(64);
    assert!(err(dup).contains("duplicate tensor name \"a\""));
    // A valid hand-built one parses.
    let ok = Raw::header(2, 0).tensor("a", &[8], 0, 0).tensor("b", &[32], 8, 32).pad_data(66);
    let f = GgufFile::from_bytes(ok).unwrap();
    assert_eq!(f.tensor("b").unwrap().data.len(), 34);
}

fn parse_no_panic(bytes: Vec<u8>) {
    if let Ok(f) = GgufFile::from_bytes(bytes) {
        // Every handed-out view must be in bounds and decodable without panics.
        for t in f.tensor_infos() {
            let v = f.tensor(&t.name).unwrap();
            assert_eq!(v.data.len(), t.n_bytes);
            if t.n_elems() <= 1 << 16 && v.ty != GgmlType::I32 {
                let mut out = vec![0f32; t.n_elems()];
                let _ = dsv4_gguf::dequantize(v.ty, v.data, &mut out);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        if magic && bytes.len() >= 8 {
            bytes[..4].copy_from_slice(b"GGUF");
            bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        }
        parse_no_panic(bytes);
    }

    #[test]
    fn mutated_valid_file_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..8),
        overwrite in proptest::option::of((any::<prop::sample::Index>(), any::<u64>())),
        truncate in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = sample_bytes();
        for (i, bit) in flips {
            let i = i.index(b.len());
            b[i] ^= 1 << bit;
        }
        if let Some((i, v)) = overwrite {
            let i = i.index(b.len() - 8);
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        if let Some(t) = truncate {
            let n = t.index(b.len());
            b.truncate(n);
        }
        parse_no_panic(b);
    }
}
