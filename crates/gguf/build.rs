//! Enables the AVX-512 kernels (`cfg(dsv4_avx512)`) when the compiler has
//! stable AVX-512 intrinsics (Rust ≥ 1.89); the crate's MSRV stays lower and
//! older compilers build the AVX2/scalar kernels only.

use std::process::Command;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(dsv4_avx512)");
    println!("cargo:rerun-if-changed=build.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            let ver = v.split_whitespace().nth(1)?.to_string();
            let mut it = ver.split('.');
            let major: u32 = it.next()?.parse().ok()?;
            let minor: u32 = it.next()?.parse().ok()?;
            Some(if major > 1 { u32::MAX } else { minor })
        });
    if minor.is_some_and(|m| m >= 89) {
        println!("cargo:rustc-cfg=dsv4_avx512");
    }
}
