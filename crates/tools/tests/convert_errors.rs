//! Checkpoints the tests generate from tiny-hf: other shard layouts, missing,
//! truncated, hostile or mis-shaped tensors (a clear error and no output file,
//! not even the temporary one), and resuming an interrupted conversion.

use std::path::{Path, PathBuf};

use dsv4_gguf::GgufFile;
use dsv4_tools::safetensors::{Checkpoint, SafeTensors};
use dsv4_tools::{convert, ConvertOptions, NoProgress, Recipe};
use sha2::{Digest, Sha256};

fn tiny_hf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/tiny-hf/hf")
}

fn copy_dir(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(tiny_hf()).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// Writes a safetensors file from (name, dtype, shape, bytes).
fn write_st(path: &Path, entries: &[(String, String, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (n, d, s, b) in entries {
        header.insert(n.clone(), serde_json::json!({"dtype": d, "shape": s, "data_offsets": [off, off + b.len()]}));
        off += b.len();
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for e in entries {
        out.extend(&e.3);
    }
    std::fs::write(path, out).unwrap();
}

fn entries_of(path: &Path, skip: &str) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let st = SafeTensors::open(path).unwrap();
    st.names()
        .filter(|n| *n != skip)
        .map(|n| {
            let v = st.get(n).unwrap();
            (n.to_string(), v.dtype.name().to_string(), v.shape.to_vec(), v.data.to_vec())
        })
        .collect()
}

fn opts(hf: &Path, out: &Path, recipe: Recipe) -> ConvertOptions {
    ConvertOptions { hf_dir: hf.into(), out: out.into(), recipe, imatrix: None, mtp_out: None, no_mtp: false, resume: false, name: None }
}

fn assert_no_output(out: &Path) {
    assert!(!out.exists(), "{} exists after a failed conversion", out.display());
    let dir = out.parent().unwrap();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(!n.contains(".gguf"), "left behind: {n}");
    }
}

fn expect_error(hf: &Path, needle: &str) {
    let outdir = tempfile::tempdir().unwrap();
    let out = outdir.path().join("out.gguf");
    let e = convert(&opts(hf, &out, Recipe::Q8), &NoProgress).expect_err("conversion should fail");
    let msg = e.to_string();
    assert!(msg.contains(needle), "error {msg:?} does not mention {needle:?}");
    assert_no_output(&out);
}

#[test]
fn single_shard_without_index_gives_the_same_file() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    copy_dir(&hf);
    let mut all = entries_of(&tiny_hf().join("model-00001-of-00002.safetensors"), "");
    all.extend(entries_of(&tiny_hf().join("model-00002-of-00002.safetensors"), ""));
    // Official-style `model.` prefixes are accepted too.
    for e in all.iter_mut() {
        e.0 = format!("model.{}", e.0);
    }
    for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"] {
        std::fs::remove_file(hf.join(f)).unwrap();
    }
    write_st(&hf.join("model.safetensors"), &all);
    let a = tmp.path().join("a.gguf");
    let b = tmp.path().join("b.gguf");
    convert(&opts(&hf, &a, Recipe::Q8), &NoProgress).unwrap();
    convert(&opts(&tiny_hf(), &b, Recipe::Q8), &NoProgress).unwrap();
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "shard layout changed the output");
}

#[test]
fn missing_scale_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    copy_dir(&hf);
    let shard = hf.join("model-00001-of-00002.safetensors");
    let e = entries_of(&shard, "layers.1.attn.wq_a.scale");
    write_st(&shard, &e);
    // With the index still listing it: the index mismatch is reported.
    expect_error(&hf, "layers.1.attn.wq_a.scale");
    // Without the index: the weight without its scale is reported.
    std::fs::remove_file(hf.join("model.safetensors.index.json")).unwrap();
    expect_error(&hf, "layers.1.attn.wq_a.scale");
}

#[test]
fn missing_expert_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    copy_dir(&hf);
    std::fs::remove_file(hf.join("model.safetensors.index.json")).unwrap();
    let shard = hf.join("model-00001-of-00002.safetensors");
    let e = entries_of(&shard, "layers.2.ffn.experts.3.w2.weight");
    write_st(&shard, &e);
    expect_error(&hf, "layers.2.ffn.experts.3.w2.weight");
}

#[test]
fn truncated_and_hostile_shards_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    copy_dir(&hf);
    let shard = hf.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&hf, "model-00002-of-00002.safetensors");
    // Header length pointing past the end of the file.
    let mut b = bytes.clone();
    b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&shard, &b).unwrap();
    expect_error(&hf, "header length");
    // Overlapping data ranges, bad dtype, shape/size mismatch.
    for (hdr, needle) in [
        (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, "overlap"),
        (r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#, "unsupported dtype"),
        (r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, "needs 12 bytes"),
        (r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}"#, "overflows"),
        (r#"[1,2]"#, "not a JSON object"),
    ] {
        let mut f = (hdr.len() as u64).to_le_bytes().to_vec();
        f.extend(hdr.as_bytes());
        f.extend([0u8; 16]);
        std::fs::write(&shard, &f).unwrap();
        let e = SafeTensors::open(&shard).unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }
}

#[test]
fn wrong_shape_and_bad_config_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    copy_dir(&hf);
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    std::fs::write(hf.join("config.json"), cfg.replace("\"q_lora_rank\": 128", "\"q_lora_rank\": 256")).unwrap();
    expect_error(&hf, "expected");
    std::fs::write(hf.join("config.json"), cfg.replace("\"hidden_size\": 256,", "")).unwrap();
    expect_error(&hf, "hidden_size");
    std::fs::write(hf.join("config.json"), "{not json").unwrap();
    expect_error(&hf, "config.json");
}

#[test]
fn interrupted_conversion_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full.gguf");
    convert(&opts(&tiny_hf(), &full, Recipe::Q4), &NoProgress).unwrap();
    let bytes = std::fs::read(&full).unwrap();
    let f = GgufFile::open(&full).unwrap();
    let k = 57;
    let t = &f.tensor_infos()[k - 1];
    let end = f.data_offset() + t.offset as usize + t.n_bytes;
    let hash = format!("{:x}", Sha256::digest(&bytes[..f.data_offset()]));
    // What a run killed after tensor k leaves behind (plus some garbage past it).
    let out = tmp.path().join("resumed.gguf");
    let mut partial = bytes[..end].to_vec();
    partial.extend([0xAB; 1000]);
    std::fs::write(tmp.path().join("resumed.gguf.tmp"), &partial).unwrap();
    std::fs::write(tmp.path().join("resumed.gguf.tmp.progress"), format!("{hash} {k}\n")).unwrap();
    let mut o = opts(&tiny_hf(), &out, Recipe::Q4);
    o.resume = true;
    let r = convert(&o, &NoProgress).unwrap();
    assert_eq!(r.resumed_at, k);
    assert_eq!(r.tensors, f.tensor_infos().len() - k);
    assert!(std::fs::read(&out).unwrap() == bytes, "resumed file differs");
    assert!(!tmp.path().join("resumed.gguf.tmp").exists() && !tmp.path().join("resumed.gguf.tmp.progress").exists());
    // A progress record for another header is ignored (full restart).
    std::fs::write(tmp.path().join("r2.gguf.tmp"), &partial).unwrap();
    std::fs::write(tmp.path().join("r2.gguf.tmp.progress"), format!("{} {k}\n", "0".repeat(64))).unwrap();
    let mut o = opts(&tiny_hf(), &tmp.path().join("r2.gguf"), Recipe::Q4);
    o.resume = true;
    assert_eq!(convert(&o, &NoProgress).unwrap().resumed_at, 0);
    assert!(std::fs::read(tmp.path().join("r2.gguf")).unwrap() == bytes);
}

#[test]
fn checkpoint_lists_every_tensor() {
    let ck = Checkpoint::open(&tiny_hf()).unwrap();
    assert_eq!(ck.len(), 417);
}
