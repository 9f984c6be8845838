//! Every CUDA kernel family against its CPU reference (dsv4_engine::ops and
//! the gguf crate's dot products) on odd shapes and fresh random inputs.
//! Skips (passing, with a note) when no GPU is usable.

use dsv4_cuda::model::dev_stride;
use dsv4_cuda::{launch, Gpu};
use dsv4_engine::ops;
use dsv4_engine::pack::{PackedRows, RopeStore, RowFormat};
use dsv4_gguf::{quant, GgmlType};
use rand::{Rng, SeedableRng};

fn gpu() -> Option<Gpu> {
    match dsv4_cuda::available() {
        Ok(()) => Some(Gpu::new(0).expect("GPU init")),
        Err(e) => {
            eprintln!("skipping CUDA kernel test: {e}");
            None
        }
    }
}

/// f32 rows packed by the CPU (pack.rs), laid out at the device stride (pad bytes 0).
fn dev_packed(fmt: RowFormat, rows: &[f32]) -> Vec<u8> {
    let mut p = PackedRows::new(fmt);
    p.extend_from_f32(rows).unwrap();
    let (rb, st) = (fmt.row_bytes(), dev_stride(fmt));
    let mut out = vec![0u8; p.len() * st];
    for (o, r) in out.chunks_exact_mut(st).zip(p.as_bytes().chunks_exact(rb)) {
        o[..rb].copy_from_slice(r);
    }
    out
}

/// `n` rows read back from the device (stride `dev_stride(fmt)`), padding stripped,
/// checked by the CPU's `from_bytes` (no NaN codes or exponents).
fn read_packed(g: &Gpu, ptr: u64, fmt: RowFormat, n: usize) -> PackedRows {
    let (rb, st) = (fmt.row_bytes(), dev_stride(fmt));
    let words = g.read_i32(ptr, n * st / 4).unwrap();
    let raw: &[u8] = bytemuck::cast_slice(&words);
    let data: Vec<u8> = raw.chunks_exact(st).flat_map(|r| r[..rb].to_vec()).collect();
    PackedRows::from_bytes(fmt, n, data).unwrap()
}

/// Rows as the engine emits them: FP8 sim on the non-RoPE dims (RoPE dims
/// rounded to bf16 for `RopeStore::Bf16`), or the FP4 sim for indexer rows.
fn on_grid_rows(rng: &mut rand::rngs::StdRng, fmt: RowFormat, n: usize) -> Vec<f32> {
    let d = fmt.dim();
    let mut v = Vec::with_capacity(n * d);
    for r in 0..n {
        let e: i32 = rng.gen_range(-30..30);
        let mut row: Vec<f32> = (0..d)
            .map(|i| match r % 5 {
                0 => 0.0,
                1 if i % 3 == 0 => -0.0,
                2 => rng.gen_range(-1.0f32..1.0) * 1e-7,
                _ => rng.gen_range(-1.0f32..1.0) * (2.0f32).powi(e),
            })
            .collect();
        match fmt {
            RowFormat::Fp8 { dim, rope, store } => {
                ops::fp8_sim_inplace(&mut row[..dim - rope], 64);
                store.round(&mut row[dim - rope..]);
            }
            RowFormat::Fp4 { .. } => ops::fp4_sim_inplace(&mut row, 32),
        }
        v.extend_from_slice(&row);
    }
    v
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Random valid blocks: noise bytes with every f16 scale field set small.
fn random_rows(rng: &mut rand::rngs::StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut b: Vec<u8> = (0..rows * rb).map(|_| rng.gen()).collect();
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    match ty {
        GgmlType::F32 => {
            for c in b.chunks_exact_mut(4) {
                c.copy_from_slice(&(rng.gen_range(-1.0f32..1.0)).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&f16(rng.gen_range(-1.0f32..1.0)));
            }
        }
        GgmlType::BF16 => {
            for c in b.chunks_exact_mut(2) {
                let v = half::bf16::from_f32(rng.gen_range(-1.0f32..1.0));
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        _ => {
            let bb = ty.block_bytes();
            let fields: &[usize] = match ty {
                GgmlType::Q8_0 => &[0],
                GgmlType::Q2_K => &[80, 82],
                GgmlType::Q4_K => &[0, 2],
                GgmlType::IQ2_XXS => &[0],
                _ => unreachable!(),
            };
            for blk in b.chunks_exact_mut(bb) {
                for &o in fields {
                    blk[o..o + 2].copy_from_slice(&f16(rng.gen_range(0.001f32..0.02)));
                }
            }
        }
    }
    b
}

/// The CPU's HC weights for one token (state `xt`, raw mixes fn . x), as
/// hc_pre computes them (eps 1e-6, 20 Sinkhorn iterations).
fn hc_weights_ref(xt: &[f32], mixes_t: &[f32], scale: &[f32], base: &[f32], m: usize) -> ops::HcWeights {
    let r = ops::rms_inv(xt, 1e-6);
    let mx: Vec<f32> = mixes_t.iter().map(|v| v * r).collect();
    ops::hc_split_sinkhorn(&mx, scale, base, m, 20, 1e-6)
}

fn suffix(ty: GgmlType) -> &'static str {
    match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::BF16 => "bf16",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q2_K => "q2_k",
        GgmlType::Q4_K => "q4_k",
        _ => "iq2_xxs",
    }
}

#[test]
fn matvec_all_types_odd_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let types = [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::IQ2_XXS];
    for ty in types {
        let unit = ty.block_elems().max(8);
        for &(rows, cols_units) in &[(1usize, 1usize), (7, 3), (33, 2), (5, 17)] {
            let cols = cols_units * unit;
            let w = random_rows(&mut rng, ty, rows, cols);
            let rb = ty.row_bytes(cols).unwrap();
            for &n in &[1usize, 3, 8] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let mut want = vec![0.0f32; n * rows];
                for t in 0..n {
                    for r in 0..rows {
                        want[t * rows + r] = quant::dot_f32(ty, &w[r * rb..(r + 1) * rb], &x[t * cols..(t + 1) * cols]);
                    }
                }
                let nt = if n >= 8 { 8 } else if n >= 4 { 4 } else if n >= 2 { 2 } else { 1 };
                let dw = g.upload(&w).unwrap();
                let dx = g.upload(&x).unwrap();
                let dy = g.upload(&vec![f32::NAN; n * rows]).unwrap(); // poisoned
                for (kname, grid, block, rows_per_block) in [("mv", (rows.div_ceil(4) as u32, 1, 1), (128, 1, 1), 4usize), ("mvk", (rows as u32, 1, 1), (256, 1, 1), 1)] {
                    for stage in [0i32, 1, 2] {
                        let stage_ok = rb % 16 == 0 && !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
                        if (stage == 1 && !stage_ok) || (stage == 2 && (kname != "mv" || nt != 1)) {
                            continue;
                        }
                        let shmem = match stage {
                            1 => (rb * rows_per_block) as u32,
                            2 => (cols * 4) as u32,
                            _ => 0,
                        };
                        let name = format!("{kname}_{}_{nt}", suffix(ty));
                        launch!(g, &name, grid, block, shmem;
                            dw.ptr, rb as u64, rows as i32, cols as i32, dx.ptr, cols as i32, dy.ptr, rows as i32, n.min(nt) as i32,
                            0u64, 0u64, 1i32, stage).unwrap();
                        let got = g.read_f32(dy.ptr, n.min(nt) * rows).unwrap();
                        let e = rel_err(&got, &want[..n.min(nt) * rows]);
                        assert!(e < 1e-5, "{name} stage {stage} rows {rows} cols {cols} n {n}: rel err {e}");
                    }
                }
            }
        }
    }
}

#[test]
fn matvec_expert_indexed() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for ty in [GgmlType::IQ2_XXS, GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::Q8_0] {
        let (rows, cols, n_exp, k, n_tok) = (9usize, 512usize, 5usize, 2usize, 3usize);
        let rb = ty.row_bytes(cols).unwrap();
        let w = random_rows(&mut rng, ty, rows * n_exp, cols);
        let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let eids: Vec<i32> = (0..n_tok * k).map(|_| rng.gen_range(0..n_exp as i32)).collect();
        let mut want = vec![0.0f32; n_tok * k * rows];
        for s in 0..n_tok * k {
            let e = eids[s] as usize;
            for r in 0..rows {
                let row = &w[(e * rows + r) * rb..(e * rows + r + 1) * rb];
                want[s * rows + r] = quant::dot_f32(ty, row, &x[(s / k) * cols..(s / k + 1) * cols]);
            }
        }
        let (dw, dx, de) = (g.upload(&w).unwrap(), g.upload(&x).unwrap(), g.upload(&eids).unwrap());
        let dy = g.upload(&vec![f32::NAN; want.len()]).unwrap();
        let stage = (rb % 16 == 0) as i32;
        launch!(g, &format!("mv_{}_1", suffix(ty)), (rows.div_ceil(4) as u32, (n_tok * k) as u32, 1), (128, 1, 1), if stage == 1 { (rb * 4) as u32 } else { 0 };
            dw.ptr, rb as u64, rows as i32, cols as i32, dx.ptr, cols as i32, dy.ptr, rows as i32, 1i32,
            de.ptr, (rows * rb) as u64, k as i32, stage).unwrap();
        let got = g.read_f32(dy.ptr, want.len()).unwrap();
        assert!(rel_err(&got, &want) < 1e-5, "{ty:?} experts");
    }
}

#[test]
fn row_finish_modes_match_ops() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for &(d, rd, per_tok, n) in &[(128usize, 64usize, 3usize, 2usize), (512, 64, 1, 5), (64, 64, 4, 3)] {
        let rope = ops::Rope::new(rd, 160000.0, Some(ops::Yarn { factor: 16.0, original_ctx: 65536.0, beta_fast: 32.0, beta_slow: 1.0 }));
        let x: Vec<f32> = (0..n * per_tok * d).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        let w: Vec<f32> = (0..d).map(|_| rng.gen_range(0.5f32..1.5)).collect();
        let p0 = 1000usize;
        for mode in 0..3i32 {
            if mode == 1 && (d - rd) % 64 != 0 {
                continue;
            }
            if mode == 2 && !d.is_power_of_two() {
                continue;
            }
            let mut want = x.clone();
            for (b, row) in want.chunks_mut(d).enumerate() {
                let pos = p0 + b / per_tok;
                match mode {
                    0 => {
                        ops::rms_scale_inplace(row, 1e-6);
                        rope.apply(&mut row[d - rd..], pos, false);
                    }
                    1 => {
                        ops::rmsnorm_inplace(row, &w, 1e-6);
                        rope.apply(&mut row[d - rd..], pos, false);
                        ops::fp8_sim_inplace(&mut row[..d - rd], 64);
                    }
                    _ => {
                        rope.apply(&mut row[d - rd..], pos, false);
                        ops::hadamard_inplace(row);
                        ops::fp4_sim_inplace(row, 32);
                    }
                }
            }
            let dx = g.upload(&x).unwrap();
            let dw = g.upload(&w).unwrap();
            let om = g.upload(&rope.omega).unwrap();
            let pp = g.upload(&[p0 as i32]).unwrap();
            launch!(g, "row_finish", ((n * per_tok) as u32, 1, 1), (128, 1, 1), 0;
                dx.ptr, d as i32, per_tok as i32, rd as i32, om.ptr, pp.ptr, dw.ptr, 1e-6f32, mode, 0i32).unwrap();
            let got = g.read_f32(dx.ptr, x.len()).unwrap();
            // FP8/FP4 grids can legitimately flip an element sitting on a rounding
            // midpoint; everything else must agree to float noise
            let bad = got.iter().zip(&want).filter(|(a, b)| (*a - *b).abs() > 1e-4 * (1.0 + b.abs())).count();
            assert!(bad <= got.len() / 500, "row_finish mode {mode} d {d}: {bad} of {} differ", got.len());
        }
    }
}

#[test]
fn topk_select_matches_cpu_with_ties() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let ld = 5000usize;
    // 1024 threads: rows <= 1024 and <= 2048 take the small-count radix passes
    // (keys in 1-2 registers), more the general ones (keys cached up to 32 x threads)
    let vis: Vec<i32> = vec![5000, 30, 1, 2049, 777, 1024, 1025, 2048, 1500, 600];
    for k in [37usize, 512, 1100] {
    let n = vis.len();
    // coarse values so ties are frequent
    let scores: Vec<f32> = (0..n * ld).map(|_| (rng.gen_range(-50i32..50) as f32) * 0.25).collect();
    let (ds, dv) = (g.upload(&scores).unwrap(), g.upload(&vis).unwrap());
    // 1024 threads: keys cached in registers (v <= 32 x threads); 128 threads:
    // the 5000-row token takes the uncached path
    for threads in [1024u32, 128] {
    let sel = g.upload(&vec![-1i32; n * k]).unwrap();
    let cnt = g.upload(&vec![0i32; n]).unwrap();
    launch!(g, "topk_select", (n as u32, 1, 1), (threads, 1, 1), 0; ds.ptr, ld as i32, dv.ptr, k as i32, sel.ptr, cnt.ptr).unwrap();
    let got = g.read_i32(sel.ptr, n * k).unwrap();
    let gc = g.read_i32(cnt.ptr, n).unwrap();
    for t in 0..n {
        let v = vis[t] as usize;
        let mut want = if v <= k { (0..v).collect::<Vec<_>>() } else { ops::topk_desc(&scores[t * ld..t * ld + v], k) };
        want.sort();
        let c = gc[t] as usize;
        let mut have: Vec<usize> = got[t * k..t * k + c].iter().map(|&i| i as usize).collect();
        assert!(have.windows(2).all(|w| w[0] < w[1]), "ascending order");
        have.sort();
        assert_eq!(c, v.min(k), "token {t}, {threads} threads, k {k}");
        assert_eq!(have, want, "token {t}, {threads} threads, k {k}");
    }
    }
    }
}

#[test]
fn sink_attention_matches_ops() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (h, d, rd, win) = (6usize, 128usize, 64usize, 8usize);
    let rope = ops::Rope::new(rd, 10000.0, None);
    let cases = [(1usize, 20usize, 9usize, true, 3usize, RopeStore::F32), (3, 5, 0, false, 1, RopeStore::F32), (2, 40, 11, false, 1, RopeStore::Bf16), (1, 100, 25, false, 4, RopeStore::F32), (1, 100, 25, false, 4, RopeStore::Bf16), (2, 30, 7, true, 1, RopeStore::Bf16),
        // more than 16 splits (the combine's second batch), some of them empty
        (1, 100, 25, false, 20, RopeStore::F32),
        // 8 and 16 splits (one with empty splits, two tokens)
        (1, 300, 90, false, 8, RopeStore::Bf16), (2, 40, 11, true, 16, RopeStore::F32),
        // static + dynamic shared memory over 48 KB with the dynamic part under
        // it (the function's limit must still be raised)
        (1, 2300, 2200, false, 1, RopeStore::F32)];
    for &(n, p0, nrows, use_sel, nsplit, store) in &cases {
        let q: Vec<f32> = (0..n * h * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let fresh: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let ring: Vec<f32> = (0..win * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        // compressed rows as the compressor leaves them (packed on the device)
        let fmt = RowFormat::Fp8 { dim: d, rope: rd, store };
        let mut rows: Vec<f32> = (0..nrows.max(1) * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        for r in rows.chunks_mut(d) {
            ops::fp8_sim_inplace(&mut r[..d - rd], 64);
            store.round(&mut r[d - rd..]);
        }
        let rows_dev = dev_packed(fmt, &rows);
        let sinks: Vec<f32> = (0..h).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let k = 4usize;
        let sel: Vec<i32> = (0..n * k).map(|_| rng.gen_range(0..nrows.max(1) as i32)).collect();
        let cnt: Vec<i32> = vec![k as i32; n];
        let vis: Vec<i32> = (0..n).map(|t| nrows.min(t + 2) as i32).collect();
        let scale = (d as f32).powf(-0.5);
        let mut want = vec![0.0f32; n * h * d];
        for t in 0..n {
            let p = p0 + t;
            let mut keys: Vec<&[f32]> = Vec::new();
            for qp in (p + 1).saturating_sub(win)..=p {
                keys.push(if qp >= p0 { &fresh[(qp - p0) * d..(qp - p0 + 1) * d] } else { &ring[(qp % win) * d..(qp % win + 1) * d] });
            }
            if nrows > 0 {
                if use_sel {
                    for &i in &sel[t * k..(t + 1) * k] {
                        keys.push(&rows[i as usize * d..(i as usize + 1) * d]);
                    }
                } else {
                    for i in 0..vis[t] as usize {
                        keys.push(&rows[i * d..(i + 1) * d]);
                    }
                }
            }
            for hh in 0..h {
                let o = &mut want[(t * h + hh) * d..(t * h + hh + 1) * d];
                ops::sink_attention(&q[(t * h + hh) * d..(t * h + hh + 1) * d], &keys, sinks[hh], scale, o);
                rope.apply(&mut o[d - rd..], p, true);
            }
        }
        let up = |v: &[f32]| g.upload(v).unwrap();
        let (dq, df, dr, dsk, om) = (up(&q), up(&fresh), up(&ring), up(&sinks), up(&rope.omega));
        let drows = g.upload(&rows_dev).unwrap();
        let rfmt = (dev_stride(fmt) * 2) as i32 + (store == RopeStore::Bf16) as i32;
        let (dsel, dcnt, dvis, pp) = (g.upload(&sel).unwrap(), g.upload(&cnt).unwrap(), g.upload(&vis).unwrap(), g.upload(&[p0 as i32]).unwrap());
        let out = g.upload(&vec![f32::NAN; n * h * d]).unwrap();
        let part = g.upload(&vec![0.0f32; n * h * nsplit * (d + 2)]).unwrap();
        let max_keys = win + if use_sel { k } else { nrows };
        let per = max_keys.div_ceil(nsplit);
        let rows_ptr = if nrows > 0 { drows.ptr } else { 0 };
        let (sel_ptr, sel_ld) = if use_sel { (dsel.ptr, k as i32) } else { (0u64, 0i32) };
        launch!(g, "sink_attn", (n as u32, h.div_ceil(4) as u32, nsplit as u32), (256, 1, 1), ((4 * per + 8 * d) * 4) as u32;
            dq.ptr, df.ptr, dr.ptr, rows_ptr, rfmt, sel_ptr, dcnt.ptr, dvis.ptr, sel_ld, dsk.ptr,
            h as i32, d as i32, rd as i32, om.ptr, pp.ptr, win as i32, scale, out.ptr, part.ptr, per as i32, 1i32).unwrap();
        if nsplit > 1 {
            launch!(g, "attn_combine", (n as u32, h as u32, 1), (128, 1, 1), 0;
                part.ptr, nsplit as i32, dsk.ptr, h as i32, d as i32, rd as i32, om.ptr, pp.ptr, out.ptr, 0u64, 0u64).unwrap();
            // the same combine writing a Q8_0 copy: the CPU's quantisation of its
            // output; its dims merged in 4 chunks over grid z (bit for bit the
            // one-block merge)
            let out2 = g.upload(&vec![f32::NAN; n * h * d]).unwrap();
            let (q0, d0) = (g.upload(&vec![0x55u8; n * h * d]).unwrap(), g.upload(&vec![f32::NAN; n * h * d / 32]).unwrap());
            launch!(g, "attn_combine", (n as u32, h as u32, 4), (128, 1, 1), 0;
                part.ptr, nsplit as i32, dsk.ptr, h as i32, d as i32, rd as i32, om.ptr, pp.ptr, out2.ptr, q0.ptr, d0.ptr).unwrap();
            let o2 = g.read_f32(out2.ptr, n * h * d).unwrap();
            let o1 = g.read_f32(out.ptr, n * h * d).unwrap();
            assert_eq!(o2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), o1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "combine over 4 dim chunks");
            let codes: Vec<i8> = g.read_i32(q0.ptr, n * h * d / 4).unwrap().iter().flat_map(|w| w.to_le_bytes()).map(|b| b as i8).collect();
            let sc = g.read_f32(d0.ptr, n * h * d / 32).unwrap();
            let a = dsv4_gguf::kernels::quantize_acts(GgmlType::Q8_0, &o2);
            assert_eq!(&codes[..], &a.q8_0().unwrap().qs[..], "combine Q8_0 codes");
            assert_eq!(sc.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), a.q8_0().unwrap().d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "combine Q8_0 scales");
        }
        let got = g.read_f32(out.ptr, n * h * d).unwrap();
        let e = rel_err(&got, &want);
        assert!(e < 1e-5, "attention n {n} p0 {p0} rows {nrows} sel {use_sel} splits {nsplit} {store:?}: rel err {e}");
    }
}

#[test]
fn hc_pre_post_head_match_ops() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let (m, d, n) = (4usize, 96usize, 3usize);
    let nmix = (2 + m) * m;
    let x: Vec<f32> = (0..n * m * d).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    let mixes: Vec<f32> = (0..n * nmix).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    let scale: Vec<f32> = (0..3).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let base: Vec<f32> = (0..nmix).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let norm: Vec<f32> = (0..d).map(|_| rng.gen_range(0.5f32..1.5)).collect();
    let up = |v: &[f32]| g.upload(v).unwrap();
    let (dx, dm, ds, db, dn) = (up(&x), up(&mixes), up(&scale), up(&base), up(&norm));
    let a = up(&vec![f32::NAN; n * d]);
    let hw = up(&vec![f32::NAN; n * (m + m * m)]);
    launch!(g, "hc_pre", (n as u32, 1, 1), (256, 1, 1), 0; dx.ptr, dm.ptr, ds.ptr, db.ptr, dn.ptr, d as i32, m as i32, 20i32, 1e-6f32, 1e-6f32, a.ptr, hw.ptr, 0u64, 0u64, 0u64, 0u64, 1i32, 0i32, 0u64, 0i32, 0i32).unwrap();
    let ga = g.read_f32(a.ptr, n * d).unwrap();
    let ghw = g.read_f32(hw.ptr, n * (m + m * m)).unwrap();
    let f: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let df = up(&f);
    launch!(g, "hc_post", (n as u32, 1, 1), (256, 1, 1), 0; dx.ptr, df.ptr, hw.ptr, d as i32, m as i32, 0u64, 0u64, 0u64, 0i32, 0u64, 0u64, 0i32, 0u64).unwrap();
    let gx = g.read_f32(dx.ptr, n * m * d).unwrap();
    for t in 0..n {
        let xt = &x[t * m * d..(t + 1) * m * d];
        let w = hc_weights_ref(xt, &mixes[t * nmix..(t + 1) * nmix], &scale, &base, m);
        let mut at = vec![0.0f32; d];
        ops::hc_collapse(xt, &w.pre, d, &mut at);
        ops::rmsnorm_inplace(&mut at, &norm, 1e-6);
        assert!(rel_err(&ga[t * d..(t + 1) * d], &at) < 1e-5, "hc_pre a");
        let mut want_hw = w.post.clone();
        want_hw.extend_from_slice(&w.comb);
        assert!(rel_err(&ghw[t * (m + m * m)..(t + 1) * (m + m * m)], &want_hw) < 1e-5, "hc_pre weights");
        let mut xo = vec![0.0f32; m * d];
        ops::hc_post(&f[t * d..(t + 1) * d], xt, &w, d, &mut xo);
        assert!(rel_err(&gx[t * m * d..(t + 1) * m * d], &xo) < 1e-5, "hc_post");
    }
}

#[test]
fn router_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // (<= 256 experts: the picks from registers; more: from shared memory)
    for (ne, k, n) in [(77usize, 5usize, 4usize), (256, 6, 2), (300, 6, 3)] {
    // repeated values make ties; bias breaks some of them
    let logits: Vec<f32> = (0..n * ne).map(|_| rng.gen_range(-8i32..8) as f32 * 0.5).collect();
    let bias: Vec<f32> = (0..ne).map(|_| rng.gen_range(-2i32..2) as f32 * 0.1).collect();
    let up = |v: &[f32]| g.upload(v).unwrap();
    let (dl, db) = (up(&logits), up(&bias));
    let tok = g.upload(&vec![0i32; n]).unwrap();
    let eids = g.upload(&vec![-1i32; n * k]).unwrap();
    let ew = up(&vec![f32::NAN; n * k]);
    launch!(g, "router", (n as u32, 1, 1), (256, 1, 1), 0; dl.ptr, ne as i32, k as i32, db.ptr, 0u64, tok.ptr, 1i32, 1.5f32, eids.ptr, ew.ptr).unwrap();
    let ge = g.read_i32(eids.ptr, n * k).unwrap();
    let gw = g.read_f32(ew.ptr, n * k).unwrap();
    for t in 0..n {
        let s: Vec<f32> = logits[t * ne..(t + 1) * ne].iter().map(|&v| ops::softplus(v).sqrt()).collect();
        let biased: Vec<f32> = s.iter().zip(&bias).map(|(a, b)| a + b).collect();
        let mut idx = ops::topk_desc(&biased, k);
        let sum: f32 = idx.iter().map(|&e| s[e]).sum();
        idx.sort();
        for (j, &e) in idx.iter().enumerate() {
            assert_eq!(ge[t * k + j], e as i32, "token {t} slot {j}");
            assert!((gw[t * k + j] - s[e] / sum * 1.5).abs() < 1e-5);
        }
    }
    // hash routing: the table's ids (one repeated) in ascending order, equal
    // ids in table order; weights normalised in table order
    let table: Vec<i32> = (0..3 * k).map(|i| if i % k == 1 { ((i / k) * 7 % ne) as i32 } else { rng.gen_range(0..ne as i32) }).collect();
    let mut table = table;
    table[k] = table[k + 1]; // token 1's row repeats an id
    let (dt, tok) = (g.upload(&table).unwrap(), g.upload(&(0..n).map(|t| (t % 3) as i32).collect::<Vec<_>>()).unwrap());
    launch!(g, "router", (n as u32, 1, 1), (256, 1, 1), 0; dl.ptr, ne as i32, k as i32, db.ptr, dt.ptr, tok.ptr, 1i32, 1.5f32, eids.ptr, ew.ptr).unwrap();
    let ge = g.read_i32(eids.ptr, n * k).unwrap();
    let gw = g.read_f32(ew.ptr, n * k).unwrap();
    for t in 0..n {
        let row = &table[(t % 3) * k..(t % 3 + 1) * k];
        let s: Vec<f32> = logits[t * ne..(t + 1) * ne].iter().map(|&v| ops::softplus(v).sqrt()).collect();
        let sum: f32 = row.iter().map(|&e| s[e as usize]).sum();
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by_key(|&j| row[j]); // stable
        for (slot, &j) in order.iter().enumerate() {
            assert_eq!(ge[t * k + slot], row[j], "hash token {t} slot {slot}");
            assert!((gw[t * k + slot] - s[row[j] as usize] / sum * 1.5).abs() < 1e-5, "hash weight");
        }
    }
    }
}

/// Compressor kernels (streaming update + row finishing + packing) against a
/// CPU reference written from spec §7 with the `ops` functions, over chunks that
/// straddle window boundaries, for both overlap (ratio 4) and plain ratios and
/// both RoPE stores. comp_finish writes packed rows (pack.rs layout at the
/// device stride): they must be valid, canonical (the CPU re-packs the decoded
/// values to the same bytes) and, in bf16 mode, hold exactly the bf16 rounding
/// of the f32 mode's RoPE dims.
#[test]
fn compressor_matches_cpu_reference() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let rope = ops::Rope::new(64, 160000.0, Some(ops::Yarn { factor: 16.0, original_ctx: 65536.0, beta_fast: 32.0, beta_slow: 1.0 }));
    for &(ratio, d, is_idx) in &[(4usize, 128usize, false), (4, 64, true), (8, 128, false), (4, 192, false)] {
        let coff = if ratio == 4 { 2 } else { 1 };
        let w = coff * d;
        let slots = if coff == 2 { 2 * ratio } else { ratio };
        let ape: Vec<f32> = (0..ratio * w).map(|_| rng.gen_range(-0.5f32..0.5)).collect();
        let norm: Vec<f32> = (0..d).map(|_| rng.gen_range(0.5f32..1.5)).collect();
        let total = 29usize;
        let kv: Vec<f32> = (0..total * w).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        let sc: Vec<f32> = (0..total * w).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        let stores: &[RopeStore] = if is_idx { &[RopeStore::F32] } else { &[RopeStore::F32, RopeStore::Bf16] };
        let mut f32_mode_rows: Vec<f32> = Vec::new();
        for &store in stores {
            // CPU reference
            let mut skv = vec![0.0f32; slots * w];
            let mut ssc = vec![f32::NEG_INFINITY; slots * w];
            let mut want_rows: Vec<f32> = Vec::new();
            for p in 0..total {
                let slot = if coff == 2 { ratio + p % ratio } else { p % ratio };
                for i in 0..w {
                    skv[slot * w + i] = kv[p * w + i];
                    ssc[slot * w + i] = sc[p * w + i] + ape[(p % ratio) * w + i];
                }
                if (p + 1) % ratio != 0 {
                    continue;
                }
                let mut vals: Vec<&[f32]> = Vec::new();
                let mut scs: Vec<&[f32]> = Vec::new();
                if coff == 2 {
                    for s in 0..ratio {
                        vals.push(&skv[s * w..s * w + d]);
                        scs.push(&ssc[s * w..s * w + d]);
                    }
                    for s in ratio..2 * ratio {
                        vals.push(&skv[s * w + d..(s + 1) * w]);
                        scs.push(&ssc[s * w + d..(s + 1) * w]);
                    }
                } else {
                    for s in 0..ratio {
                        vals.push(&skv[s * w..(s + 1) * w]);
                        scs.push(&ssc[s * w..(s + 1) * w]);
                    }
                }
                let mut row = vec![0.0f32; d];
                ops::softmax_pool(&vals, &scs, &mut row);
                ops::rmsnorm_inplace(&mut row, &norm, 1e-6);
                rope.apply(&mut row[d - 64..], p + 1 - ratio, false);
                if is_idx {
                    ops::hadamard_inplace(&mut row);
                    ops::fp4_sim_inplace(&mut row, 32);
                } else {
                    ops::fp8_sim_inplace(&mut row[..d - 64], 64);
                    store.round(&mut row[d - 64..]);
                }
                want_rows.extend_from_slice(&row);
                if coff == 2 {
                    skv.copy_within(ratio * w..2 * ratio * w, 0);
                    ssc.copy_within(ratio * w..2 * ratio * w, 0);
                }
            }
            // GPU, in chunks of 5 tokens mixed with single-token steps (the
            // decode path of the overlapping compressors), emitting or not
            let fmt = if is_idx { RowFormat::Fp4 { dim: d } } else { RowFormat::Fp8 { dim: d, rope: 64, store } };
            let stride = dev_stride(fmt);
            let up = |v: &[f32]| g.upload(v).unwrap();
            let (dape, dnorm, om) = (up(&ape), up(&norm), up(&rope.omega));
            let dkvs = up(&vec![0.0f32; slots * w]);
            let dscs = up(&vec![f32::NEG_INFINITY; slots * w]);
            let rows = g.upload(&vec![0xABu8; (total / ratio + 1) * stride]).unwrap(); // poisoned
            let pooled = up(&vec![0.0f32; 8 * d]);
            let pp = g.upload(&[0i32]).unwrap();
            let mut p0 = 0usize;
            let mut chunk = 0usize;
            while p0 < total {
                let n = [5usize, 1, 1, 1, 3, 1, 1, 1, 1][chunk % 9].min(total - p0);
                chunk += 1;
                g.write_i32(&pp, 0, &[p0 as i32]).unwrap();
                let (ckv, csc) = (up(&kv[p0 * w..(p0 + n) * w]), up(&sc[p0 * w..(p0 + n) * w]));
                launch!(g, "comp_update", ((d as u32).div_ceil(128), 1, 1), (128, 1, 1), 0;
                    ckv.ptr, csc.ptr, dape.ptr, dkvs.ptr, dscs.ptr, n as i32, pp.ptr, ratio as i32, coff as i32, d as i32, pooled.ptr).unwrap();
                launch!(g, "comp_finish", ((n / ratio + 1) as u32, 1, 1), (128, 1, 1), 0;
                    pooled.ptr, rows.ptr, stride as i32, pp.ptr, n as i32, d as i32, 64i32, om.ptr, dnorm.ptr, 1e-6f32, ratio as i32, is_idx as i32,
                    (store == RopeStore::Bf16) as i32).unwrap();
                p0 += n;
            }
            let n_rows = total / ratio;
            let packed = read_packed(&g, rows.ptr, fmt, n_rows);
            let got = packed.to_f32();
            assert_eq!(got.len(), want_rows.len());
            let bad = got.iter().zip(&want_rows).filter(|(a, b)| (*a - *b).abs() > 1e-4 * (1.0 + b.abs())).count();
            assert!(bad <= got.len() / 200, "compressor ratio {ratio} d {d} {store:?}: {bad} of {} values differ", got.len());
            let mut again = PackedRows::new(fmt);
            again.extend_from_f32(&got).unwrap();
            assert_eq!(again.as_bytes(), packed.as_bytes(), "ratio {ratio} d {d} {store:?}: GPU packing is not the CPU's canonical one");
            if is_idx {
                continue;
            }
            if store == RopeStore::F32 {
                f32_mode_rows = got;
            } else {
                for (rb, rf) in got.chunks(d).zip(f32_mode_rows.chunks(d)) {
                    let mut want = rf.to_vec();
                    RopeStore::Bf16.round(&mut want[d - 64..]);
                    assert!(rb.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "ratio {ratio} d {d}: bf16 row is not the f32 row rounded");
                }
            }
        }
    }
}

/// The packing and decoding device code (pack_rows / unpack_rows run the same
/// functions as comp_finish / sink_attn / index_scores) against pack.rs on odd
/// shapes: identical bytes, bit-identical values.
#[test]
fn packed_rows_match_cpu_pack() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let fmts = [
        RowFormat::Fp8 { dim: 512, rope: 64, store: RopeStore::F32 },
        RowFormat::Fp8 { dim: 512, rope: 64, store: RopeStore::Bf16 },
        RowFormat::Fp8 { dim: 128, rope: 64, store: RopeStore::Bf16 },
        RowFormat::Fp8 { dim: 200, rope: 72, store: RopeStore::F32 },
        RowFormat::Fp8 { dim: 200, rope: 72, store: RopeStore::Bf16 },
        RowFormat::Fp8 { dim: 100, rope: 4, store: RopeStore::F32 },
        RowFormat::Fp4 { dim: 128 },
        RowFormat::Fp4 { dim: 64 },
        RowFormat::Fp4 { dim: 50 },
        RowFormat::Fp4 { dim: 33 },
    ];
    for fmt in fmts {
        let n = 37usize;
        let d = fmt.dim();
        let (kind, rd, bf16) = match fmt {
            RowFormat::Fp8 { rope, store, .. } => (0i32, rope, (store == RopeStore::Bf16) as i32),
            RowFormat::Fp4 { .. } => (1, 0, 0),
        };
        let v = on_grid_rows(&mut rng, fmt, n);
        let stride = dev_stride(fmt);
        let dv = g.upload(&v).unwrap();
        let rows = g.upload(&vec![0u8; n * stride]).unwrap();
        launch!(g, "pack_rows", (5, 1, 1), (128, 1, 1), 0; dv.ptr, n as i32, d as i32, rd as i32, bf16, kind, rows.ptr, stride as i32).unwrap();
        let got = read_packed(&g, rows.ptr, fmt, n);
        let mut want = PackedRows::new(fmt);
        want.extend_from_f32(&v).unwrap();
        assert_eq!(got.as_bytes(), want.as_bytes(), "{fmt:?}: device packing differs from pack.rs");
        // decode the CPU's bytes on the device
        let src = g.upload(&dev_packed(fmt, &v)).unwrap();
        let out = g.upload(&vec![f32::NAN; n * d]).unwrap();
        launch!(g, "unpack_rows", (7, 1, 1), (96, 1, 1), 0; src.ptr, stride as i32, n as i32, d as i32, rd as i32, bf16, kind, out.ptr).unwrap();
        let dec = g.read_f32(out.ptr, n * d).unwrap();
        assert!(dec.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()), "{fmt:?}: device decode is not bit-exact");
    }
}

#[test]
fn index_scores_swiglu_reduce_head_embed_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let up = |v: &[f32]| g.upload(v).unwrap();
    // index_scores: 2 tokens, 3 heads of 64, 45 visible rows (k = 4)
    let (ih, id, n, k) = (3usize, 64usize, 2usize, 4usize);
    let vis: Vec<i32> = vec![40, 45];
    let ld = 50usize;
    let q: Vec<f32> = (0..n * ih * id).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let w: Vec<f32> = (0..n * ih).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    // key rows as the indexer compressor leaves them: FP4, packed on the device
    let kfmt = RowFormat::Fp4 { dim: id };
    let krows = on_grid_rows(&mut rng, kfmt, ld);
    let kdev = g.upload(&dev_packed(kfmt, &krows)).unwrap();
    let scores = up(&vec![0.0f32; n * ld]);
    let dv = g.upload(&vis).unwrap();
    launch!(g, "index_scores", (3, n as u32, 1), (256, 1, 1), ((ih * (id + 1) + 8 * id) * 4) as u32;
        up(&q).ptr, up(&w).ptr, kdev.ptr, dev_stride(kfmt) as i32, dv.ptr, ih as i32, id as i32, 0.5f32, scores.ptr, ld as i32, k as i32).unwrap();
    let got = g.read_f32(scores.ptr, n * ld).unwrap();
    for t in 0..n {
        for i in 0..vis[t] as usize {
            let mut s = 0.0f32;
            for h in 0..ih {
                s += w[t * ih + h] * 0.5 * ops::dot(&q[(t * ih + h) * id..(t * ih + h + 1) * id], &krows[i * id..(i + 1) * id]).max(0.0);
            }
            assert!((got[t * ld + i] - s).abs() < 1e-4 * (1.0 + s.abs()), "index score t {t} row {i}");
        }
    }
    // the row-per-thread kernels (32 / 64 / 128 dims; more rows than one block)
    for id in [32usize, 64, 128] {
        let (ih, ld, n) = (5usize, 300usize, 3usize);
        // token 0: very few rows (a warp per row, more threads than heads),
        // token 1: few rows (4 threads per row), token 2: more rows than threads
        let vis: Vec<i32> = vec![3, 20, 299];
        let q: Vec<f32> = (0..n * ih * id).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let w: Vec<f32> = (0..n * ih).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let kfmt = RowFormat::Fp4 { dim: id };
        let krows = on_grid_rows(&mut rng, kfmt, ld);
        let kdev = g.upload(&dev_packed(kfmt, &krows)).unwrap();
        let scores = up(&vec![f32::NAN; n * ld]);
        let dv = g.upload(&vis).unwrap();
        launch!(g, &format!("index_scores_rt{id}"), (2, n as u32, 1), (128, 1, 1), ((ih * (id + 4) + ih) * 4) as u32;
            up(&q).ptr, up(&w).ptr, kdev.ptr, dev_stride(kfmt) as i32, dv.ptr, ih as i32, 0.5f32, scores.ptr, ld as i32, 2i32).unwrap();
        let got = g.read_f32(scores.ptr, n * ld).unwrap();
        for t in 0..n {
            for i in 0..vis[t] as usize {
                let mut s = 0.0f32;
                for h in 0..ih {
                    s += w[t * ih + h] * 0.5 * ops::dot(&q[(t * ih + h) * id..(t * ih + h + 1) * id], &krows[i * id..(i + 1) * id]).max(0.0);
                }
                assert!((got[t * ld + i] - s).abs() < 1e-4 * (1.0 + s.abs()), "index_scores_rt{id} t {t} row {i}: {} vs {s}", got[t * ld + i]);
            }
            assert!(got[t * ld + vis[t] as usize..(t + 1) * ld].iter().all(|v| v.is_nan()), "no scores past the visible rows");
        }
    }
    // swiglu with per-slot weights, then moe_reduce with a shared term
    let (rows, ff, kk, d) = (6usize, 40usize, 3usize, 40usize);
    let gg: Vec<f32> = (0..rows * ff).map(|_| rng.gen_range(-15.0f32..15.0)).collect();
    let uu: Vec<f32> = (0..rows * ff).map(|_| rng.gen_range(-15.0f32..15.0)).collect();
    let ws: Vec<f32> = (0..rows).map(|_| rng.gen_range(0.0f32..1.0)).collect();
    let h = up(&vec![f32::NAN; rows * ff]);
    launch!(g, "swiglu", (4, 1, 1), (64, 1, 1), 0; up(&gg).ptr, up(&uu).ptr, up(&ws).ptr, ff as i32, rows as i32, 10.0f32, h.ptr, 0u64, 0u64, 0u64, 0u64, 0u64).unwrap();
    let gh = g.read_f32(h.ptr, rows * ff).unwrap();
    let mut wh = vec![0.0f32; rows * ff];
    for r in 0..rows {
        ops::swiglu_clamped(&gg[r * ff..(r + 1) * ff], &uu[r * ff..(r + 1) * ff], 10.0, ws[r], &mut wh[r * ff..(r + 1) * ff]);
    }
    assert!(rel_err(&gh, &wh) < 1e-6, "swiglu");
    let ntok = rows / kk;
    let ysh: Vec<f32> = (0..ntok * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let y = up(&vec![f32::NAN; ntok * d]);
    launch!(g, "moe_reduce", (2, 1, 1), (64, 1, 1), 0; h.ptr, up(&ysh).ptr, kk as i32, d as i32, ntok as i32, y.ptr, 0u64).unwrap();
    let gy = g.read_f32(y.ptr, ntok * d).unwrap();
    for t in 0..ntok {
        for c in 0..d {
            let want: f32 = (0..kk).map(|j| wh[(t * kk + j) * ff + c]).sum::<f32>() + ysh[t * d + c];
            assert!((gy[t * d + c] - want).abs() < 1e-5 * (1.0 + want.abs()), "moe_reduce");
        }
    }
    // hc_head (+ final norm)
    let (m, dd) = (4usize, 72usize);
    let x: Vec<f32> = (0..m * dd).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    let mixes: Vec<f32> = (0..m).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    let (scale, base): (Vec<f32>, Vec<f32>) = (vec![0.7], (0..m).map(|_| rng.gen_range(-1.0f32..1.0)).collect());
    let norm: Vec<f32> = (0..dd).map(|_| rng.gen_range(0.5f32..1.5)).collect();
    let hy = up(&vec![f32::NAN; dd]);
    launch!(g, "hc_head", (1, 1, 1), (256, 1, 1), 0; up(&x).ptr, up(&mixes).ptr, up(&scale).ptr, up(&base).ptr, up(&norm).ptr,
        dd as i32, m as i32, 1e-6f32, 1e-6f32, hy.ptr, 1i32, 0i32).unwrap();
    let r = ops::rms_inv(&x, 1e-6);
    let wts: Vec<f32> = (0..m).map(|j| ops::sigmoid(mixes[j] * r * scale[0] + base[j]) + 1e-6).collect();
    let mut want = vec![0.0f32; dd];
    ops::hc_collapse(&x, &wts, dd, &mut want);
    ops::rmsnorm_inplace(&mut want, &norm, 1e-6);
    assert!(rel_err(&g.read_f32(hy.ptr, dd).unwrap(), &want) < 1e-5, "hc_head");
    // embedding rows (F16), replicated into the streams
    let vocab = 10usize;
    let table: Vec<half::f16> = (0..vocab * dd).map(|_| half::f16::from_f32(rng.gen_range(-1.0f32..1.0))).collect();
    let dt = g.upload(&table.iter().map(|h| h.to_bits()).collect::<Vec<u16>>()).unwrap();
    let toks: Vec<i32> = vec![3, 9, 0];
    let out = up(&vec![f32::NAN; toks.len() * m * dd]);
    launch!(g, "embed_rows", (toks.len() as u32, 1, 1), (128, 1, 1), 0; dt.ptr, 1i32, g.upload(&toks).unwrap().ptr, dd as i32, m as i32, out.ptr).unwrap();
    let ge = g.read_f32(out.ptr, toks.len() * m * dd).unwrap();
    for (t, &tok) in toks.iter().enumerate() {
        for j in 0..m {
            for c in 0..dd {
                assert_eq!(ge[(t * m + j) * dd + c], table[tok as usize * dd + c].to_f32(), "embed");
            }
        }
    }
}

/// Prefill's expert grouping: slots sorted by expert into tiles of ≤ 8 rows,
/// inputs gathered, one grouped matvec per tile; every slot's output equals
/// the direct per-slot product.
#[test]
fn grouped_expert_matvec_matches_per_slot() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    for ty in [GgmlType::IQ2_XXS, GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::Q8_0] {
        let (rows, cols, ne, k, n) = (9usize, 512usize, 5usize, 3usize, 11usize);
        let slots = n * k;
        let rb = ty.row_bytes(cols).unwrap();
        let w = random_rows(&mut rng, ty, rows * ne, cols);
        let a: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let eids: Vec<i32> = (0..slots).map(|_| rng.gen_range(0..ne as i32)).collect();
        let max_tiles = slots.div_ceil(8) + ne;
        let (dw, da, de) = (g.upload(&w).unwrap(), g.upload(&a).unwrap(), g.upload(&eids).unwrap());
        let order = g.upload(&vec![-1i32; slots]).unwrap();
        let pos = g.upload(&vec![-1i32; slots]).unwrap();
        let tiles = g.upload(&vec![-1i32; 4 * max_tiles]).unwrap();
        let ag = g.upload(&vec![f32::NAN; slots * cols]).unwrap();
        let y = g.upload(&vec![f32::NAN; slots * rows]).unwrap();
        launch!(g, "moe_group", (1, 1, 1), (1024, 1, 1), 0; de.ptr, slots as i32, ne as i32, 8i32, max_tiles as i32, order.ptr, pos.ptr, tiles.ptr).unwrap();
        launch!(g, "gather_rows", (8, 1, 1), (256, 1, 1), 0; da.ptr, order.ptr, k as i32, cols as i32, slots as i32, ag.ptr).unwrap();
        launch!(g, &format!("mvg_{}", suffix(ty)), (rows.div_ceil(4) as u32, max_tiles as u32, 1), (128, 1, 1), 0;
            dw.ptr, rb as u64, rows as i32, cols as i32, ag.ptr, cols as i32, y.ptr, rows as i32, (rows * rb) as u64, tiles.ptr).unwrap();
        let got = g.read_f32(y.ptr, slots * rows).unwrap();
        let gpos = g.read_i32(pos.ptr, slots).unwrap();
        let gorder = g.read_i32(order.ptr, slots).unwrap();
        let mut seen = vec![false; slots];
        for (j, &s) in gorder.iter().enumerate() {
            assert_eq!(gpos[s as usize] as usize, j, "pos is the inverse of order");
            seen[s as usize] = true;
            if j > 0 {
                assert!(eids[gorder[j - 1] as usize] <= eids[s as usize], "sorted by expert");
            }
        }
        assert!(seen.iter().all(|&x| x), "order is a permutation");
        for s in 0..slots {
            let e = eids[s] as usize;
            for r in 0..rows {
                let want = quant::dot_f32(ty, &w[(e * rows + r) * rb..(e * rows + r + 1) * rb], &a[(s / k) * cols..(s / k + 1) * cols]);
                let have = got[gpos[s] as usize * rows + r];
                assert!((have - want).abs() <= 1e-4 * (1.0 + want.abs()), "{ty:?} slot {s} row {r}: {have} vs {want}");
            }
        }
    }
}

/// 8-bit activation path (mmvq.cu): `quant_q8` gives the CPU's codes and
/// scales bit for bit (Q8_0 and Q8_K), and every `mq*` product (warp-per-row,
/// split-K, expert-indexed, grouped tiles; 1..8 tokens) matches the CPU's
/// `matvec_q8` on odd shapes.
#[test]
fn q8_quant_and_matvec_match_cpu() {
    use dsv4_gguf::kernels::{dot_q8_with, quantize_acts};
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    // quantisation: odd row counts, a row of zeros, exact ties of |max|
    for &(rows, cols) in &[(1usize, 256usize), (3, 768), (5, 2304)] {
        let mut x: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        x[..256].iter_mut().for_each(|v| *v = 0.0);
        if rows > 1 {
            x[cols + 7] = 5.0;
            x[cols + 9] = -5.0; // tie: the first (positive) one sets the sign
        }
        let xs = cols + 32; // padded input stride
        let mut xp = vec![0.0f32; rows * xs];
        for r in 0..rows {
            xp[r * xs..r * xs + cols].copy_from_slice(&x[r * cols..(r + 1) * cols]);
        }
        let dx = g.upload(&xp).unwrap();
        let (q0, d0) = (g.upload(&vec![0x55u8; rows * cols]).unwrap(), g.upload(&vec![f32::NAN; rows * cols / 32]).unwrap());
        let (qk, dk) = (g.upload(&vec![0x55u8; rows * cols]).unwrap(), g.upload(&vec![f32::NAN; rows * cols / 256]).unwrap());
        launch!(g, "quant_q8", ((cols / 256) as u32, rows as u32, 1), (256, 1, 1), 0;
            dx.ptr, xs as i32, cols as i32, q0.ptr, d0.ptr, qk.ptr, dk.ptr).unwrap();
        let (gq0, gd0) = (g.read_i32(q0.ptr, rows * cols / 4).unwrap(), g.read_f32(d0.ptr, rows * cols / 32).unwrap());
        let (gqk, gdk) = (g.read_i32(qk.ptr, rows * cols / 4).unwrap(), g.read_f32(dk.ptr, rows * cols / 256).unwrap());
        let bytes = |v: &[i32]| -> Vec<i8> { v.iter().flat_map(|w| w.to_le_bytes()).map(|b| b as i8).collect() };
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let a0 = quantize_acts(GgmlType::Q8_0, row);
            let ak = quantize_acts(GgmlType::Q2_K, row);
            let (c0, ck) = (a0.q8_0().unwrap(), ak.q8_k().unwrap());
            assert_eq!(&bytes(&gq0)[r * cols..(r + 1) * cols], &c0.qs[..], "Q8_0 codes row {r}");
            assert_eq!(&bytes(&gqk)[r * cols..(r + 1) * cols], &ck.qs[..], "Q8_K codes row {r}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&gd0[r * cols / 32..(r + 1) * cols / 32]), bits(&c0.d), "Q8_0 scales row {r}");
            assert_eq!(bits(&gdk[r * cols / 256..(r + 1) * cols / 256]), bits(&ck.d), "Q8_K scales row {r}");
        }
    }
    // products
    for ty in [GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::IQ2_XXS] {
        let blk = if ty == GgmlType::Q8_0 { 32 } else { 256 };
        for &(rows, cols) in &[(1usize, 256usize), (7, 768), (33, 512), (5, 4352), (19, 2560)] {
            let w = random_rows(&mut rng, ty, rows, cols);
            let rb = ty.row_bytes(cols).unwrap();
            for &n in &[1usize, 3, 8] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let acts: Vec<_> = (0..n).map(|t| quantize_acts(ty, &x[t * cols..(t + 1) * cols])).collect();
                let mut want = vec![0.0f32; n * rows];
                for t in 0..n {
                    for r in 0..rows {
                        want[t * rows + r] = dot_q8_with(ty, &w[r * rb..(r + 1) * rb], &acts[t], false);
                    }
                }
                let dw = g.upload(&w).unwrap();
                let dx = g.upload(&x).unwrap();
                let dq = g.upload(&vec![0u8; n * cols]).unwrap();
                let dd = g.upload(&vec![0f32; n * cols / 32]).unwrap();
                let (q0, d0, qk, dk) = if blk == 32 { (dq.ptr, dd.ptr, 0u64, 0u64) } else { (0, 0, dq.ptr, dd.ptr) };
                launch!(g, "quant_q8", (cols.div_ceil(256) as u32, n as u32, 1), (256, 1, 1), 0; dx.ptr, cols as i32, cols as i32, q0, d0, qk, dk).unwrap();
                let nt = if n >= 8 { 8 } else if n >= 4 { 4 } else if n >= 2 { 2 } else { 1 };
                let dy = g.upload(&vec![f32::NAN; n * rows]).unwrap();
                let sfx: &[&str] = if ty == GgmlType::Q8_0 { &["q8_0", "q8_0s"] } else { &[suffix(ty)] };
                for (kname, grid, block, sf) in [("mq", (rows.div_ceil(8) as u32, 1, 1), (256u32, 1, 1)), ("mq", (rows.div_ceil(4) as u32, 1, 1), (128, 1, 1)), ("mqk", (rows as u32, 1, 1), (256, 1, 1))]
                    .into_iter()
                    .flat_map(|(k, g, b)| sfx.iter().map(move |sf| (k, g, b, *sf)))
                {
                    let name = format!("{kname}_{sf}_{nt}");
                    launch!(g, &name, grid, block, 0;
                        dw.ptr, rb as u64, rows as i32, cols as i32, dq.ptr, cols as i32, dd.ptr, (cols / blk) as i32, dy.ptr, rows as i32,
                        n.min(nt) as i32, 0u64, 0u64, 1i32).unwrap();
                    let got = g.read_f32(dy.ptr, n.min(nt) * rows).unwrap();
                    let e = rel_err(&got, &want[..n.min(nt) * rows]);
                    assert!(e < 1e-5, "{name} block {block:?} rows {rows} cols {cols} n {n}: rel err {e}");
                }
            }
        }
        // expert-indexed (decode MoE): slot s = expert eids[s] times token s / k
        let (rows, cols, n_exp, k, n_tok) = (9usize, 512usize, 5usize, 2usize, 3usize);
        let rb = ty.row_bytes(cols).unwrap();
        let w = random_rows(&mut rng, ty, rows * n_exp, cols);
        let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let eids: Vec<i32> = (0..n_tok * k).map(|_| rng.gen_range(0..n_exp as i32)).collect();
        let acts: Vec<_> = (0..n_tok).map(|t| quantize_acts(ty, &x[t * cols..(t + 1) * cols])).collect();
        let mut want = vec![0.0f32; n_tok * k * rows];
        for s in 0..n_tok * k {
            let e = eids[s] as usize;
            for r in 0..rows {
                want[s * rows + r] = dot_q8_with(ty, &w[(e * rows + r) * rb..(e * rows + r + 1) * rb], &acts[s / k], false);
            }
        }
        let (dw, dx, de) = (g.upload(&w).unwrap(), g.upload(&x).unwrap(), g.upload(&eids).unwrap());
        let dq = g.upload(&vec![0u8; n_tok * cols]).unwrap();
        let dd = g.upload(&vec![0f32; n_tok * cols / 32]).unwrap();
        let (q0, d0, qk, dk) = if blk == 32 { (dq.ptr, dd.ptr, 0u64, 0u64) } else { (0, 0, dq.ptr, dd.ptr) };
        launch!(g, "quant_q8", ((cols / 256) as u32, n_tok as u32, 1), (256, 1, 1), 0; dx.ptr, cols as i32, cols as i32, q0, d0, qk, dk).unwrap();
        let dy = g.upload(&vec![f32::NAN; want.len()]).unwrap();
        launch!(g, &format!("mq_{}_1", suffix(ty)), (rows.div_ceil(8) as u32, (n_tok * k) as u32, 1), (256, 1, 1), 0;
            dw.ptr, rb as u64, rows as i32, cols as i32, dq.ptr, cols as i32, dd.ptr, (cols / blk) as i32, dy.ptr, rows as i32,
            1i32, de.ptr, (rows * rb) as u64, k as i32).unwrap();
        let got = g.read_f32(dy.ptr, want.len()).unwrap();
        assert!(rel_err(&got, &want) < 1e-5, "{ty:?} q8 experts");
        // pair mode: the same slots against a second expert stack in one launch
        let w2 = random_rows(&mut rng, ty, rows * n_exp, cols);
        let mut want2 = vec![0.0f32; n_tok * k * rows];
        for s in 0..n_tok * k {
            let e = eids[s] as usize;
            for r in 0..rows {
                want2[s * rows + r] = dot_q8_with(ty, &w2[(e * rows + r) * rb..(e * rows + r + 1) * rb], &acts[s / k], false);
            }
        }
        let dw2 = g.upload(&w2).unwrap();
        let (y1, y2) = (g.upload(&vec![f32::NAN; want.len()]).unwrap(), g.upload(&vec![f32::NAN; want.len()]).unwrap());
        launch!(g, &format!("mqp_{}", suffix(ty)), (rows.div_ceil(8) as u32, (2 * n_tok * k) as u32, 1), (256, 1, 1), 0;
            dw.ptr, rb as u64, rows as i32, cols as i32, dq.ptr, cols as i32, dd.ptr, (cols / blk) as i32, y1.ptr, rows as i32,
            de.ptr, (rows * rb) as u64, k as i32, dw2.ptr, y2.ptr, (n_tok * k) as i32).unwrap();
        assert!(rel_err(&g.read_f32(y1.ptr, want.len()).unwrap(), &want) < 1e-5, "{ty:?} pair, first");
        assert!(rel_err(&g.read_f32(y2.ptr, want.len()).unwrap(), &want2) < 1e-5, "{ty:?} pair, second");
        if ty == GgmlType::IQ2_XXS {
            // the decode pair kernel: one warp per row of both stacks
            let (y1, y2) = (g.upload(&vec![f32::NAN; want.len()]).unwrap(), g.upload(&vec![f32::NAN; want.len()]).unwrap());
            launch!(g, "mqp2_iq2_xxs", (rows.div_ceil(8) as u32, (n_tok * k) as u32, 1), (256, 1, 1), 0;
                dw.ptr, rb as u64, rows as i32, cols as i32, dq.ptr, cols as i32, dd.ptr, (cols / blk) as i32, y1.ptr, rows as i32,
                de.ptr, (rows * rb) as u64, k as i32, dw2.ptr, y2.ptr).unwrap();
            let (p1, p2) = (g.read_f32(y1.ptr, want.len()).unwrap(), g.read_f32(y2.ptr, want.len()).unwrap());
            assert!(rel_err(&p1, &want) < 1e-5, "IQ2_XXS pair2, first");
            assert!(rel_err(&p2, &want2) < 1e-5, "IQ2_XXS pair2, second");
            // with bank-replicated tables: the same integer sums, bit for bit
            let (r1, r2) = (g.upload(&vec![f32::NAN; want.len()]).unwrap(), g.upload(&vec![f32::NAN; want.len()]).unwrap());
            launch!(g, "mqp2r_iq2_xxs", (rows.div_ceil(8) as u32, (n_tok * k) as u32, 1), (256, 1, 1), 384 * 32 * 4;
                dw.ptr, rb as u64, rows as i32, cols as i32, dq.ptr, cols as i32, dd.ptr, (cols / blk) as i32, r1.ptr, rows as i32,
                de.ptr, (rows * rb) as u64, k as i32, dw2.ptr, r2.ptr).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&g.read_f32(r1.ptr, want.len()).unwrap()), bits(&p1), "IQ2_XXS pair2 replicated tables, first");
            assert_eq!(bits(&g.read_f32(r2.ptr, want.len()).unwrap()), bits(&p2), "IQ2_XXS pair2 replicated tables, second");
        }
        // grouped tiles over expert-sorted slots (prefill MoE)
        let slots = n_tok * k;
        let max_tiles = slots.div_ceil(8) + n_exp;
        let order = g.upload(&vec![-1i32; slots]).unwrap();
        let pos = g.upload(&vec![-1i32; slots]).unwrap();
        let tiles = g.upload(&vec![-1i32; 4 * max_tiles]).unwrap();
        let ag = g.upload(&vec![f32::NAN; slots * cols]).unwrap();
        launch!(g, "moe_group", (1, 1, 1), (1024, 1, 1), 0; de.ptr, slots as i32, n_exp as i32, 8i32, max_tiles as i32, order.ptr, pos.ptr, tiles.ptr).unwrap();
        launch!(g, "gather_rows", (8, 1, 1), (256, 1, 1), 0; dx.ptr, order.ptr, k as i32, cols as i32, slots as i32, ag.ptr).unwrap();
        let dq = g.upload(&vec![0u8; slots * cols]).unwrap();
        let dd = g.upload(&vec![0f32; slots * cols / 32]).unwrap();
        let (q0, d0, qk, dk) = if blk == 32 { (dq.ptr, dd.ptr, 0u64, 0u64) } else { (0, 0, dq.ptr, dd.ptr) };
        launch!(g, "quant_q8", ((cols / 256) as u32, slots as u32, 1), (256, 1, 1), 0; ag.ptr, cols as i32, cols as i32, q0, d0, qk, dk).unwrap();
        let y = g.upload(&vec![f32::NAN; slots * rows]).unwrap();
        launch!(g, &format!("mqg_{}", suffix(ty)), (rows.div_ceil(4) as u32, max_tiles as u32, 1), (128, 1, 1), 0;
            dw.ptr, rb as u64, rows as i32, cols as i32, dq.ptr, cols as i32, dd.ptr, (cols / blk) as i32, y.ptr, rows as i32, (rows * rb) as u64, tiles.ptr).unwrap();
        let got = g.read_f32(y.ptr, slots * rows).unwrap();
        let gpos = g.read_i32(pos.ptr, slots).unwrap();
        for s in 0..slots {
            for r in 0..rows {
                let (have, want) = (got[gpos[s] as usize * rows + r], want[s * rows + r]);
                assert!((have - want).abs() <= 1e-4 * (1.0 + want.abs()), "{ty:?} grouped slot {s} row {r}: {have} vs {want}");
            }
        }
    }
}

/// The persistent single-token Q8_0 kernels (`mq1p_q8_0`, `mq1p_q8_0s`): odd
/// shapes, grids of 1, 3 and one block per 8 rows (so warps walk several rows
/// and batches), plain / expert-indexed (constant and device ids) / paired;
/// equal to the CPU's dot, and bit for bit to the per-row kernel.
#[test]
fn persistent_q8_0_matvec_matches_cpu() {
    use dsv4_gguf::kernels::{dot_q8_with, quantize_acts};
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(33);
    let ty = GgmlType::Q8_0;
    // (rows of whole 16-byte units: cols a multiple of 256; 1280 and 2560 end
    // in a part batch, 4352 in a part chunk)
    // (even rows with cols <= 1024 also take the two-rows-per-batch kernel)
    for &(rows, cols) in &[(1usize, 256usize), (7, 768), (33, 512), (19, 2560), (301, 4352), (45, 1280), (9, 8192), (8, 256), (34, 1024), (6, 768)] {
        let rb = ty.row_bytes(cols).unwrap();
        let (n_exp, k, n_tok) = (3usize, 2usize, 2usize);
        let w = random_rows(&mut rng, ty, rows * n_exp, cols);
        let w2 = random_rows(&mut rng, ty, rows * n_exp, cols);
        let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let acts: Vec<_> = (0..n_tok).map(|t| quantize_acts(ty, &x[t * cols..(t + 1) * cols])).collect();
        let (dw, dw2, dx) = (g.upload(&w).unwrap(), g.upload(&w2).unwrap(), g.upload(&x).unwrap());
        let dq = g.upload(&vec![0u8; n_tok * cols]).unwrap();
        let dd = g.upload(&vec![0f32; n_tok * cols / 32]).unwrap();
        launch!(g, "quant_q8", (cols.div_ceil(256) as u32, n_tok as u32, 1), (256, 1, 1), 0; dx.ptr, cols as i32, cols as i32, dq.ptr, dd.ptr, 0u64, 0u64).unwrap();
        let dot = |m: &[u8], e: usize, r: usize, t: usize| dot_q8_with(ty, &m[(e * rows + r) * rb..(e * rows + r + 1) * rb], &acts[t], false);
        // the per-row kernels' outputs for the plain case (bitwise references)
        let per_row = |kname: &str| {
            let yr = g.upload(&vec![f32::NAN; rows]).unwrap();
            launch!(g, kname, (rows.div_ceil(8) as u32, 1, 1), (256, 1, 1), 0;
                dw.ptr, rb as u64, rows as i32, cols as i32, dq.ptr, cols as i32, dd.ptr, (cols / 32) as i32, yr.ptr, rows as i32, 1i32, 0u64, 0u64, 1i32).unwrap();
            g.read_f32(yr.ptr, rows).unwrap()
        };
        let (yref_wide, yref_short) = (per_row("mq_q8_0_1"), per_row("mq_q8_0s_1"));
        let eids: Vec<i32> = (0..n_tok * k).map(|_| rng.gen_range(0..n_exp as i32)).collect();
        let iota: Vec<i32> = (0..n_tok * k).map(|s| (s % n_exp) as i32).collect();
        let mut kernels = vec![("mq1p_q8_0", &yref_wide, 1usize), ("mq1p_q8_0s", &yref_short, 1)];
        if rows % 2 == 0 && cols <= 1024 {
            kernels.push(("mq1p_q8_0s2", &yref_short, 2));
        }
        for (name, yref, rpi) in kernels {
            for (grid, early) in [(1u32, 1i32), (3, 0), ((rows / rpi).div_ceil(8) as u32, 1)] {
                // (slots, x_group arg, ids, pair)
                let cases: Vec<(usize, i32, Option<&Vec<i32>>, bool)> =
                    vec![(1, 1, None, false), (1, 1, None, true), (n_tok * k, k as i32, Some(&eids), false), (n_tok * k, -(k as i32), Some(&iota), true)];
                for (slots, xg, ids, pair) in cases {
                    let de = ids.map(|v| g.upload(v).unwrap());
                    let ep = de.as_ref().map(|b| b.ptr).unwrap_or(0);
                    let (y1, y2) = (g.upload(&vec![f32::NAN; slots * rows]).unwrap(), g.upload(&vec![f32::NAN; slots * rows]).unwrap());
                    // (as forward.rs: 8 warps x (a batch of 4 chunks of rpi rows + 16 spare bytes))
                    let smem = (8 * (rpi * 4 * if name.contains("0s") { 8 } else { 16 } * 34 + 16)) as u32;
                    launch!(g, name, (grid, 1, 1), (256, 1, 1), smem;
                        dw.ptr, rb as u64, rows as i32, cols as i32, dq.ptr, cols as i32, dd.ptr, (cols / 32) as i32, y1.ptr, rows as i32,
                        slots as i32, ep, (rows * rb) as u64, xg, if pair { dw2.ptr } else { 0u64 }, if pair { y2.ptr } else { 0u64 }, early).unwrap();
                    let got1 = g.read_f32(y1.ptr, slots * rows).unwrap();
                    let got2 = g.read_f32(y2.ptr, slots * rows).unwrap();
                    let (mut want1, mut want2) = (vec![0.0f32; slots * rows], vec![0.0f32; slots * rows]);
                    for s in 0..slots {
                        let (e, t) = match ids {
                            Some(v) => (v[s] as usize, s / xg.unsigned_abs() as usize),
                            None => (0, 0),
                        };
                        for r in 0..rows {
                            want1[s * rows + r] = dot(&w, e, r, t);
                            want2[s * rows + r] = dot(&w2, e, r, t);
                            if ids.is_none() {
                                assert_eq!(got1[s * rows + r].to_bits(), yref[r].to_bits(), "{name} grid {grid} rows {rows} cols {cols}: not bitwise the per-row kernel");
                            }
                        }
                    }
                    // (the CPU adds a long row's block terms in another order)
                    let what = format!("{name} grid {grid} early {early} rows {rows} cols {cols} slots {slots} pair {pair}");
                    assert!(rel_err(&got1, &want1) < 1e-5, "{what}");
                    if pair {
                        assert!(rel_err(&got2, &want2) < 1e-5, "{what}: second matrix");
                    }
                }
            }
        }
    }
}

/// Producers that write an 8-bit copy of their output (hc_pre, rmsnorm_rows,
/// swiglu) give exactly the CPU's quantisation of their own f32 output, for
/// both formats, with blocks of 256, 512 and 1024 threads and a grid-stride loop.
#[test]
fn fused_quant_outputs_match_cpu_quantisation() {
    use dsv4_gguf::kernels::quantize_acts;
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let up = |v: &[f32]| g.upload(v).unwrap();
    let bufs = |len: usize| (g.upload(&vec![0x55u8; len]).unwrap(), g.upload(&vec![f32::NAN; len / 32]).unwrap(), g.upload(&vec![0x55u8; len]).unwrap(), g.upload(&vec![f32::NAN; len / 256]).unwrap());
    let check = |name: &str, out: &[f32], cols: usize, q: &(dsv4_cuda::device::DevBuf, dsv4_cuda::device::DevBuf, dsv4_cuda::device::DevBuf, dsv4_cuda::device::DevBuf)| {
        let len = out.len();
        let codes = |p: u64| -> Vec<i8> { g.read_i32(p, len / 4).unwrap().iter().flat_map(|w| w.to_le_bytes()).map(|b| b as i8).collect() };
        let (c0, ck) = (codes(q.0.ptr), codes(q.2.ptr));
        let (s0, sk) = (g.read_f32(q.1.ptr, len / 32).unwrap(), g.read_f32(q.3.ptr, len / 256).unwrap());
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (r, row) in out.chunks_exact(cols).enumerate() {
            let a0 = quantize_acts(GgmlType::Q8_0, row);
            let ak = quantize_acts(GgmlType::IQ2_XXS, row);
            let (a0, ak) = (a0.q8_0().unwrap(), ak.q8_k().unwrap());
            assert_eq!(&c0[r * cols..(r + 1) * cols], &a0.qs[..], "{name} Q8_0 codes row {r}");
            assert_eq!(&ck[r * cols..(r + 1) * cols], &ak.qs[..], "{name} Q8_K codes row {r}");
            assert_eq!(bits(&s0[r * cols / 32..(r + 1) * cols / 32]), bits(&a0.d), "{name} Q8_0 scales row {r}");
            assert_eq!(bits(&sk[r * cols / 256..(r + 1) * cols / 256]), bits(&ak.d), "{name} Q8_K scales row {r}");
        }
    };
    // rmsnorm_rows, 512 threads, d = 768
    let (d, rows) = (768usize, 3usize);
    let x: Vec<f32> = (0..rows * d).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    let w: Vec<f32> = (0..d).map(|_| rng.gen_range(0.5f32..1.5)).collect();
    let (dx, dw) = (up(&x), up(&w));
    let q = bufs(rows * d);
    launch!(g, "rmsnorm_rows", (rows as u32, 1, 1), (512, 1, 1), 0; dx.ptr, dw.ptr, d as i32, 1e-6f32, q.0.ptr, q.1.ptr, q.2.ptr, q.3.ptr).unwrap();
    let out = g.read_f32(dx.ptr, rows * d).unwrap();
    let mut want = x[..d].to_vec();
    ops::rmsnorm_inplace(&mut want, &w, 1e-6);
    assert!(rel_err(&out[..d], &want) < 1e-5, "rmsnorm_rows value");
    check("rmsnorm_rows", &out, d, &q);
    // swiglu, 256 threads, 2 blocks over 6 chunks (grid-stride), with weights
    let (ff, rows) = (512usize, 3usize);
    let gg: Vec<f32> = (0..rows * ff).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
    let uu: Vec<f32> = (0..rows * ff).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
    let ws: Vec<f32> = (0..rows).map(|_| rng.gen_range(0.1f32..1.0)).collect();
    let h = up(&vec![f32::NAN; rows * ff]);
    let q = bufs(rows * ff);
    launch!(g, "swiglu", (2, 1, 1), (256, 1, 1), 0; up(&gg).ptr, up(&uu).ptr, up(&ws).ptr, ff as i32, rows as i32, 3.0f32, h.ptr, 0u64, q.0.ptr, q.1.ptr, q.2.ptr, q.3.ptr).unwrap();
    let out = g.read_f32(h.ptr, rows * ff).unwrap();
    check("swiglu", &out, ff, &q);
    // hc_pre, 256 threads, d = 512, m = 4: a weights block and two column slices per token
    let (m, d, n) = (4usize, 512usize, 2usize);
    let nmix = (2 + m) * m;
    let x: Vec<f32> = (0..n * m * d).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    let mixes: Vec<f32> = (0..n * nmix).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    let scale: Vec<f32> = (0..3).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let base: Vec<f32> = (0..nmix).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let norm: Vec<f32> = (0..d).map(|_| rng.gen_range(0.5f32..1.5)).collect();
    let a = up(&vec![f32::NAN; n * d]);
    let hw = up(&vec![f32::NAN; n * (m + m * m)]);
    let q = bufs(n * d);
    launch!(g, "hc_pre", (n as u32, 3, 1), (256, 1, 1), 0; up(&x).ptr, up(&mixes).ptr, up(&scale).ptr, up(&base).ptr, up(&norm).ptr, d as i32, m as i32, 20i32, 1e-6f32, 1e-6f32, a.ptr, hw.ptr,
        q.0.ptr, q.1.ptr, q.2.ptr, q.3.ptr, 1i32, 0i32, 0u64, 0i32, 0i32).unwrap();
    let out = g.read_f32(a.ptr, n * d).unwrap();
    let ghw = g.read_f32(hw.ptr, n * (m + m * m)).unwrap();
    // the same as two launches (slices only, then weights only): bit for bit
    {
        let (a2, hw2) = (up(&vec![f32::NAN; n * d]), up(&vec![f32::NAN; n * (m + m * m)]));
        let q2 = bufs(n * d);
        let (dx, dmx, dsc, dba, dno) = (up(&x), up(&mixes), up(&scale), up(&base), up(&norm));
        launch!(g, "hc_pre", (n as u32, 2, 1), (256, 1, 1), 0; dx.ptr, dmx.ptr, dsc.ptr, dba.ptr, dno.ptr, d as i32, m as i32, 20i32, 1e-6f32, 1e-6f32, a2.ptr, hw2.ptr,
            q2.0.ptr, q2.1.ptr, q2.2.ptr, q2.3.ptr, 1i32, 0i32, 0u64, 0i32, 1i32).unwrap();
        launch!(g, "hc_pre", (n as u32, 1, 1), (256, 1, 1), 0; dx.ptr, dmx.ptr, dsc.ptr, dba.ptr, dno.ptr, d as i32, m as i32, 20i32, 1e-6f32, 1e-6f32, a2.ptr, hw2.ptr,
            0u64, 0u64, 0u64, 0u64, 1i32, 0i32, 0u64, 0i32, 2i32).unwrap();
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(g.read_f32(a2.ptr, n * d).unwrap()), bits(out.clone()), "hc_pre slices launched alone");
        assert_eq!(bits(g.read_f32(hw2.ptr, n * (m + m * m)).unwrap()), bits(ghw.clone()), "hc_pre weights launched alone");
        for (b1, b2, len) in [(&q.0, &q2.0, n * d / 4), (&q.2, &q2.2, n * d / 4)] {
            assert_eq!(g.read_i32(b1.ptr, len).unwrap(), g.read_i32(b2.ptr, len).unwrap(), "hc_pre slices alone: 8-bit copies");
        }
    }
    for t in 0..n {
        let xt = &x[t * m * d..(t + 1) * m * d];
        let w = hc_weights_ref(xt, &mixes[t * nmix..(t + 1) * nmix], &scale, &base, m);
        let mut at = vec![0.0f32; d];
        ops::hc_collapse(xt, &w.pre, d, &mut at);
        ops::rmsnorm_inplace(&mut at, &norm, 1e-6);
        assert!(rel_err(&out[t * d..(t + 1) * d], &at) < 1e-5, "sliced hc_pre a");
        let mut want_hw = w.post.clone();
        want_hw.extend_from_slice(&w.comb);
        assert!(rel_err(&ghw[t * (m + m * m)..(t + 1) * (m + m * m)], &want_hw) < 1e-5, "sliced hc_pre weights");
    }
    // hc_post over column slices of 256 (d = 512: two blocks per token)
    let f: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let dx = up(&x);
    let gp = up(&vec![f32::NAN; n * 2 * 10]);
    launch!(g, "hc_post", (n as u32, 2, 1), (256, 1, 1), 0; dx.ptr, up(&f).ptr, hw.ptr, d as i32, m as i32, gp.ptr, 0u64, 0u64, 0i32, 0u64, 0u64, 0i32, 0u64).unwrap();
    let gx = g.read_f32(dx.ptr, n * m * d).unwrap();
    // the Gram parts hc_post leaves give hc_pre the same result as reading x
    let (a1, a2) = (up(&vec![f32::NAN; n * d]), up(&vec![f32::NAN; n * d]));
    for (ap, gpp, parts) in [(a1.ptr, 0u64, 0i32), (a2.ptr, gp.ptr, 2i32)] {
        launch!(g, "hc_pre", (n as u32, 3, 1), (256, 1, 1), 0; dx.ptr, up(&mixes).ptr, up(&scale).ptr, up(&base).ptr, up(&norm).ptr, d as i32, m as i32, 20i32, 1e-6f32, 1e-6f32, ap, hw.ptr,
            0u64, 0u64, 0u64, 0u64, 1i32, 0i32, gpp, parts, 0i32).unwrap();
    }
    let (r1, r2) = (g.read_f32(a1.ptr, n * d).unwrap(), g.read_f32(a2.ptr, n * d).unwrap());
    assert!(rel_err(&r2, &r1) < 1e-6, "hc_pre from hc_post's Gram parts");
    // hc_post reducing the MoE output itself equals moe_reduce + hc_post, bit for bit
    let k = 3usize;
    let yk: Vec<f32> = (0..n * k * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let ysh: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let pos: Vec<i32> = (0..(n * k) as i32).rev().collect();
    let (dyk, dysh, dpos) = (up(&yk), up(&ysh), g.upload(&pos).unwrap());
    let y = up(&vec![f32::NAN; n * d]);
    launch!(g, "moe_reduce", (4, 1, 1), (256, 1, 1), 0; dyk.ptr, dysh.ptr, k as i32, d as i32, n as i32, y.ptr, dpos.ptr).unwrap();
    let (xa, xb) = (up(&x), up(&x));
    launch!(g, "hc_post", (n as u32, 2, 1), (256, 1, 1), 0; xa.ptr, y.ptr, hw.ptr, d as i32, m as i32, 0u64, 0u64, 0u64, 0i32, 0u64, 0u64, 0i32, 0u64).unwrap();
    launch!(g, "hc_post", (n as u32, 2, 1), (256, 1, 1), 0; xb.ptr, 0u64, hw.ptr, d as i32, m as i32, 0u64, dyk.ptr, dysh.ptr, k as i32, dpos.ptr, 0u64, 0i32, 0u64).unwrap();
    let (ga, gb) = (g.read_f32(xa.ptr, n * m * d).unwrap(), g.read_f32(xb.ptr, n * m * d).unwrap());
    assert!(ga.iter().zip(&gb).all(|(a, b)| a.to_bits() == b.to_bits()), "hc_post with the MoE reduction inside");
    // hc_post leaving the next HC's mix products as per-block partials
    let frows = 24usize;
    let fnw = random_rows(&mut rng, GgmlType::F16, frows, m * d);
    let xc = up(&x);
    let mixp = up(&vec![f32::NAN; 2 * n * frows]);
    launch!(g, "hc_post", (n as u32, 2, 1), (256, 1, 1), 0; xc.ptr, y.ptr, hw.ptr, d as i32, m as i32, 0u64, 0u64, 0u64, 0i32, 0u64,
        g.upload(&fnw).unwrap().ptr, frows as i32, mixp.ptr).unwrap();
    let (gxc, gm) = (g.read_f32(xc.ptr, n * m * d).unwrap(), g.read_f32(mixp.ptr, 2 * n * frows).unwrap());
    assert!(gxc.iter().zip(&ga).all(|(a, b)| a.to_bits() == b.to_bits()), "hc_post state unchanged by the mix partials");
    let rb = GgmlType::F16.row_bytes(m * d).unwrap();
    for t in 0..n {
        let got: Vec<f32> = (0..frows).map(|r| (0..2).map(|p| gm[(p * n + t) * frows + r]).sum()).collect();
        let want: Vec<f32> = (0..frows).map(|r| quant::dot_f32(GgmlType::F16, &fnw[r * rb..(r + 1) * rb], &gxc[t * m * d..(t + 1) * m * d])).collect();
        assert!(rel_err(&got, &want) < 1e-5, "mix partials token {t}");
    }
    for t in 0..n {
        let xt = &x[t * m * d..(t + 1) * m * d];
        let w = hc_weights_ref(xt, &mixes[t * nmix..(t + 1) * nmix], &scale, &base, m);
        let mut xo = vec![0.0f32; m * d];
        ops::hc_post(&f[t * d..(t + 1) * d], xt, &w, d, &mut xo);
        assert!(rel_err(&gx[t * m * d..(t + 1) * m * d], &xo) < 1e-5, "sliced hc_post");
    }
    check("hc_pre", &out, d, &q);
}

/// Split-K F16 products over blocks (HC mixes at decode): the partials of a
/// row add up to the CPU dot product, and hc_pre / hc_head add them in order.
#[test]
fn split_k_f16_partials_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let (rows, cols, parts) = (24usize, 16384usize, 4usize);
    let w = random_rows(&mut rng, GgmlType::F16, rows, cols);
    let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let rb = GgmlType::F16.row_bytes(cols).unwrap();
    let y = g.upload(&vec![f32::NAN; parts * rows]).unwrap();
    launch!(g, "mvks_f16", (rows as u32, parts as u32, 1), (256, 1, 1), 0; g.upload(&w).unwrap().ptr, rb as u64, cols as i32, g.upload(&x).unwrap().ptr, y.ptr, rows as i32).unwrap();
    let part = g.read_f32(y.ptr, parts * rows).unwrap();
    let got: Vec<f32> = (0..rows).map(|r| (0..parts).map(|p| part[p * rows + r]).sum()).collect();
    let want: Vec<f32> = (0..rows).map(|r| quant::dot_f32(GgmlType::F16, &w[r * rb..(r + 1) * rb], &x)).collect();
    assert!(rel_err(&got, &want) < 1e-5, "mvks_f16");
}
