//! Writes on-grid compressed rows and their pack.rs packing (`packed_row_vectors OUT`)
//! for tools/cuda-host-check.sh, which checks the CUDA packing/decoding code against
//! them on the host (no GPU). Record: u32 kind (0 attention, 1 indexer), dim, rope
//! dims, bf16 RoPE flag, row count, row bytes; then per row f32[dim] + packed bytes.
use dsv4_engine::ops;
use dsv4_engine::pack::{PackedRows, RopeStore, RowFormat};
use std::io::Write;

fn main() {
    let mut out = std::fs::File::create(std::env::args().nth(1).expect("usage: packed_row_vectors OUT")).unwrap();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    // (kind, d, rd)
    let cases = [(0, 512, 64), (0, 128, 64), (0, 200, 72), (0, 64, 0), (0, 100, 4), (1, 128, 0), (1, 64, 0), (1, 50, 0), (1, 33, 0)];
    for &(kind, d, rd) in &cases {
        for bf16 in [0u32, 1] {
            if kind == 1 && bf16 == 1 {
                continue;
            }
            let fmt = if kind == 0 { RowFormat::Fp8 { dim: d, rope: rd, store: if bf16 == 1 { RopeStore::Bf16 } else { RopeStore::F32 } } } else { RowFormat::Fp4 { dim: d } };
            let n = 400;
            let mut rows = Vec::new();
            for r in 0..n {
                let e = (rnd() * 80.0) as i32 - 40;
                let mode = r % 8;
                let mut v: Vec<f32> = (0..d)
                    .map(|i| {
                        let x = (rnd() * 2.0 - 1.0) as f32;
                        match mode {
                            0 => 0.0,
                            1 => if i % 3 == 0 { -0.0 } else { x * 1e-7 },
                            2 => f32::from_bits((rnd() * 4000.0) as u32) * if i % 2 == 0 { 1.0 } else { -1.0 },
                            3 => x * (2.0f32).powi((rnd() * 60.0) as i32 - 30),
                            4 => x * 1e30,
                            _ => x * (2.0f32).powi(e),
                        }
                    })
                    .collect();
                if kind == 0 {
                    let nope = d - rd;
                    ops::fp8_sim_inplace(&mut v[..nope], 64);
                    if bf16 == 1 {
                        RopeStore::Bf16.round(&mut v[nope..]);
                    }
                } else {
                    if d.is_power_of_two() && r % 2 == 0 {
                        ops::hadamard_inplace(&mut v);
                    }
                    ops::fp4_sim_inplace(&mut v, 32);
                }
                let mut p = PackedRows::new(fmt);
                if p.push(&v).is_ok() {
                    rows.push((v, p.as_bytes().to_vec()));
                }
            }
            let hdr = [kind as u32, d as u32, rd as u32, bf16, rows.len() as u32, fmt.row_bytes() as u32];
            for h in hdr {
                out.write_all(&h.to_le_bytes()).unwrap();
            }
            for (v, b) in &rows {
                for x in v {
                    out.write_all(&x.to_le_bytes()).unwrap();
                }
                out.write_all(b).unwrap();
            }
            eprintln!("kind {kind} d {d} rd {rd} bf16 {bf16}: {} rows", rows.len());
        }
    }
}
