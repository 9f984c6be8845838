//! Writes the CUDA backend's logits for a fixture (`fixture_logits FIXTURE_DIR OUT_DIR`):
//! whole prompt with decode, stepwise and MTP, then a 3-token-chunk prefill with
//! decode. Built from two trees, the outputs can be compared byte for byte (the
//! packed compressed rows must not change one logit bit against f32 rows).
use std::path::PathBuf;
use std::sync::Arc;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (dir, out) = (PathBuf::from(&a[1]), PathBuf::from(&a[2]));
    std::fs::create_dir_all(&out).unwrap();
    let tokens = dsv4_engine::fixture::Tokens::load(&dir.join("tokens.json")).unwrap();
    let model = Arc::new(dsv4_engine::Model::load(&dir.join("model.gguf")).unwrap());
    let mut be = dsv4_cuda::CudaBackend::new(model, 4096, 16).unwrap();
    let o = dsv4_engine::fixture::run(&mut be, &tokens, 0, true, true).unwrap();
    let c = dsv4_engine::fixture::run(&mut be, &tokens, 3, false, false).unwrap();
    for (name, v) in [("prefill_last", &o.prefill_last), ("decode", &o.decode), ("stepwise", &o.stepwise), ("mtp", &o.mtp), ("hidden", &o.hidden), ("chunk3_prefill_last", &c.prefill_last), ("chunk3_decode", &c.decode)] {
        dsv4_engine::fixture::write_f32(&out.join(format!("{name}.f32")), v).unwrap();
    }
    println!("{}: wrote {} logit values", dir.display(), o.stepwise.len() + o.decode.len() + o.mtp.len());
}
