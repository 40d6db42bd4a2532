//! `gemv-bandwidth`: GEMV weight streaming as a fraction of the machine's read bandwidth, with
//! the two measured in alternation (round by round), so both see the same moment of a shared,
//! noisy machine; prints the median of the per-round ratios.
//!
//! ```text
//! cargo run --release -p acorn-benches --bin gemv-bandwidth -- [--rounds 15]
//! ```
//!
//! Each round: one pass summing a 256 MiB buffer (the read-bandwidth reference, as in the
//! `bandwidth` criterion group), then GEMV calls on rotating copies of the weights until 256 MiB
//! of weights were read (so they come from DRAM, not the 32 MiB L3), at 1 and 2 threads. Formats:
//! f32 in the panels `acorn convert` stores, f32 row-major `[n, k]` (a tied LM head, read by
//! `MatMulTransB` as dot products), f16, q8 and q4.
//!
//! `--sparse`: instead, sparse q8 (`weights::q8sparse`, half of every row's codes zero, as
//! `acorn convert --prune … --quantize q8` writes it) against dense q8 of the same matrix, one
//! activation row (a decode step), alternated round by round: the median of the per-round
//! ratios of the time per GEMV (dense / sparse: above 1, the sparse one is faster).

use std::hint::black_box;
use std::time::Instant;

use acorn::kernels;
use acorn::kernels::half::{self, F16Weights};
use acorn::kernels::quant::{self, QActs};
use acorn_tests::{pseudo_random, read_pass};

const STREAM: usize = 256 << 20;

/// One GEMV call: `(copy turn, threads, output)`.
type Gemv<'a> = Box<dyn Fn(usize, usize, &mut [f32]) + 'a>;
const SHAPES: [(usize, usize); 4] = [(4096, 4096), (1536, 576), (576, 1536), (49152, 576)];

/// GiB/s of one read pass over `buf` on `threads` threads.
fn bandwidth(buf: &[f32], threads: usize) -> f64 {
    let t = Instant::now();
    black_box(read_pass(buf, threads));
    (buf.len() * 4) as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

/// GiB/s of GEMV calls of `bytes` weight bytes each (see [`per_call`]).
fn stream(bytes: usize, run: impl FnMut(usize)) -> f64 {
    bytes as f64 / per_call(bytes, run) / (1u64 << 30) as f64
}

/// Seconds per GEMV call over rotating copies: `run(turn)` uses copy `turn`, called until
/// ≥ [`STREAM`] bytes of `bytes` each were read (so they come from DRAM, not the L3); `run(0)`
/// first warms the code path (copy 0 is read again only after every other copy).
fn per_call(bytes: usize, mut run: impl FnMut(usize)) -> f64 {
    let calls = STREAM.div_ceil(bytes);
    run(0);
    let t = Instant::now();
    for turn in 1..=calls {
        run(turn);
    }
    t.elapsed().as_secs_f64() / calls as f64
}

/// One shape's weights `[n, k]`, activation row and its q8 blocks.
fn case(n: usize, k: usize) -> (Vec<f32>, Vec<f32>, QActs) {
    let w = pseudo_random(n * k, (n + k) as u64);
    let x = pseudo_random(k, 7);
    let mut qa = QActs::default();
    quant::quantize_acts(&x, 1, k, &mut qa).expect("k is a multiple of 32");
    (w, x, qa)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize =
        args.iter().position(|a| a == "--rounds").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(15);
    let isa = kernels::selected();
    if args.iter().any(|a| a == "--sparse") {
        sparse_vs_dense(isa, rounds);
        return;
    }
    let buf = pseudo_random(STREAM / 4, 1);
    println!("gemv-bandwidth: {rounds} rounds, kernels: {}", kernels::describe());
    println!();
    println!("| n × k | format (kernel) | threads | GiB/s (median) | bandwidth GiB/s (median) | median of per-round ratios |");
    println!("|---|---|---:|---:|---:|---:|");
    for (n, k) in SHAPES {
        let (w, x, qa) = case(n, k);
        let mut out = vec![0.0f32; n];
        let q4b = n * k / 2 + 2 * n * k / 32;
        let formats =
            [("f32", 4 * n * k), ("f32 rows", 4 * n * k), ("f16", 2 * n * k), ("q8", n * k + 4 * n), ("q4", q4b)];
        for (fmt, bytes) in formats {
            // Copies of the weights totalling ≥ 256 MiB, built per format (≈ 256 MiB live).
            let copies = (STREAM / bytes).max(2);
            let (kernel, run): (&str, Gemv<'_>) = match fmt {
                "f32" => {
                    // Panels of the kernel's width, as `acorn convert` stores MatMul weights.
                    let nr = isa.f32_tile().map_or(16, |t| t.nr);
                    let b = kernels::BMat::Strided(kernels::MatRef { data: &w, rs: n, cs: 1 });
                    let all: Vec<Vec<f32>> = vec![kernels::pack_panels(b, k, n, nr); copies];
                    let x = &x;
                    (
                        isa.f32_tile().map_or("reference", |t| t.name),
                        Box::new(move |t, th, o| {
                            let p = kernels::Panels { data: &all[t % all.len()], k, n, nr };
                            let a = kernels::MatRef { data: x, rs: k, cs: 1 };
                            kernels::sgemm_with(isa, 1, n, k, a, kernels::BMat::Panels(p), o, n, false, th)
                        }),
                    )
                }
                "f32 rows" => {
                    // Row-major [n, k] weights (a tied LM head: `MatMulTransB`).
                    let all: Vec<Vec<f32>> = vec![w.clone(); copies];
                    let x = &x;
                    (
                        "dot products",
                        Box::new(move |t, th, o| {
                            let b = kernels::MatRef { data: &all[t % all.len()], rs: 1, cs: k };
                            let a = kernels::MatRef { data: x, rs: k, cs: 1 };
                            kernels::sgemm_with(isa, 1, n, k, a, kernels::BMat::Strided(b), o, n, false, th)
                        }),
                    )
                }
                "f16" => {
                    let f16: Vec<u16> = w.iter().map(|&v| acorn::dtype::f32_to_f16(v)).collect();
                    let all: Vec<Vec<u16>> = vec![f16; copies];
                    let x = &x;
                    (
                        isa.f16_kernel_name(),
                        Box::new(move |t, th, o| {
                            let w = F16Weights { n, k, data: &all[t % all.len()] };
                            half::gemm_f16(isa, x, 1, &w, o, th).expect("shapes match")
                        }),
                    )
                }
                "q8" => {
                    let all = vec![acorn::weights::q8::encode(&w, n, k); copies];
                    let qa = &qa;
                    (
                        isa.q_rows().q8_name,
                        Box::new(move |t, th, o| {
                            quant::gemm_q8(isa, qa, &all[t % all.len()].view(), o, th).expect("shapes match")
                        }),
                    )
                }
                _ => {
                    let all = vec![acorn::weights::q4::encode(&w, n, k, 32, false); copies];
                    let qa = &qa;
                    (
                        isa.q_rows().q4_name,
                        Box::new(move |t, th, o| {
                            quant::gemm_q4(isa, qa, &all[t % all.len()].view(), o, th).expect("shapes match")
                        }),
                    )
                }
            };
            for threads in [1, 2] {
                let (mut g, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..rounds {
                    let bw = bandwidth(&buf, threads);
                    let gv = stream(bytes, |t| run(t, threads, &mut out));
                    g.push(gv);
                    b.push(bw);
                    r.push(gv / bw);
                }
                println!(
                    "| {n} × {k} | {fmt} (`{kernel}`) | {threads} | {:.1} | {:.1} | {:.0}% |",
                    median(g),
                    median(b),
                    100.0 * median(r)
                );
            }
        }
    }
}

/// `--sparse`: sparse q8 at 50 % against dense q8, one activation row, 1 thread.
fn sparse_vs_dense(isa: kernels::Isa, rounds: usize) {
    use acorn::weights::q8sparse::{Q8SparseOwned, Q8SparseWeights};
    println!("gemv-bandwidth --sparse: {rounds} rounds, kernels: {}", kernels::describe());
    println!("sparse kernel: {}", quant::q8_sparse_rows4(isa).map_or(quant::q8_sparse_row(isa).0, |r| r.0));
    println!();
    println!("| n × k | dense q8 µs | sparse q8 µs | bytes sparse / dense | dense / sparse time (median of per-round ratios) |");
    println!("|---|---:|---:|---:|---:|");
    for (n, k) in SHAPES {
        let (w, _, qa) = case(n, k);
        let mut out = vec![0.0f32; n];
        let mut q = acorn::weights::q8::encode(&w, n, k);
        // Half of every row zero: the smaller half by magnitude (what pruning leaves).
        let mut order: Vec<usize> = Vec::with_capacity(k);
        for row in q.q.chunks_exact_mut(k) {
            order.clear();
            order.extend(0..k);
            order.sort_by_key(|&i| row[i].unsigned_abs());
            order[..k / 2].iter().for_each(|&i| row[i] = 0);
        }
        let sp = Q8SparseOwned::from_q8(&q);
        let (bytes, nnz) = (sp.to_bytes(), sp.nnz());
        let (dense_b, sparse_b) = (n * k + 4 * n, bytes.len());
        let dense_all = vec![q.clone(); (STREAM / dense_b).max(2)];
        // Copies in u32 words, so the masks within are aligned.
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
        let sparse_all = vec![words; (STREAM / sparse_b).max(2)];
        let (mut d, mut s, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let td = per_call(dense_b, |t| {
                quant::gemm_q8(isa, &qa, &dense_all[t % dense_all.len()].view(), &mut out, 1).expect("shapes match")
            });
            let ts = per_call(sparse_b, |t| {
                let b: &[u8] = bytemuck::cast_slice(&sparse_all[t % sparse_all.len()]);
                let v = Q8SparseWeights::from_bytes(&b[..sparse_b], n, k, nnz).expect("its own layout");
                quant::gemm_q8_sparse(isa, &qa, &v, &mut out, 1).expect("shapes match")
            });
            d.push(td * 1e6);
            s.push(ts * 1e6);
            r.push(td / ts);
        }
        println!(
            "| {n} × {k} | {:.1} | {:.1} | {:.3} | {:.2}× |",
            median(d),
            median(s),
            sparse_b as f64 / dense_b as f64,
            median(r)
        );
    }
}
