//! Compile every kernel with NVRTC for one architecture and write the cubin:
//! a host-side check of the `.cu` files (no driver or GPU needed, only
//! libnvrtc). Usage: `kernel_compile [OUT.cubin] [SM]` (SM default 90).
//! tools/cuda-compile-check.sh fetches NVRTC, runs this and prints per-kernel
//! register and instruction counts from the SASS.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).cloned().unwrap_or_else(|| "kernels.cubin".into());
    let sm: i32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(90);
    // never the disk cache: this is a compile check
    std::env::set_var("DSV4_KERNEL_CACHE", std::env::temp_dir().join(format!("dsv4-kcheck-{}", std::process::id())));
    let cubin = dsv4_cuda::device::compile((sm / 10, sm % 10))?;
    std::fs::write(&out, &cubin)?;
    eprintln!("compiled {} bytes of cubin for sm_{sm} -> {out}", cubin.len());
    Ok(())
}
