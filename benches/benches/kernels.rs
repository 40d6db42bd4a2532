//! Kernel benchmarks (criterion), side by side in one run:
//!
//! - `bandwidth`: memory read bandwidth of this machine (sum of a 256 MiB buffer, 1 and 2
//!   threads) — the physical limit for GEMV.
//! - `gemv_f16` / `gemv_q8` / `gemv_q4`: f16-weight and quantized GEMV on weight matrices larger than L2, every kernel
//!   this CPU supports (one per kernel set that has its own); throughput is the weight bytes streamed (compare with
//!   `bandwidth` at the same thread count).
//! - `sgemm`: f32 GEMM at 512³ and MiniLM's shapes: every tile this CPU supports (from the
//!   kernel lists, the portable one included) called directly, and Acorn vs ONNX Runtime each running the same
//!   one-MatMul ONNX model (weights as an initializer); throughput in FLOP (2·m·n·k).
//! - `qgemm`: the quantized GEMMs (q8 panels, q4) against the f32 GEMM at MiniLM's and SmolLM2's
//!   prefill shapes, at every kernel level this CPU supports, named by the kernel that runs
//!   (activation quantization included, as a model pays it).
//! - `pool`: the cost of splitting a call over 2 threads (worker already awake, or asleep).
//!
//! ```text
//! python3 tests/assets/fetch.py        # ONNX Runtime for the sgemm peer
//! cargo bench -p acorn-benches --bench kernels [-- FILTER]
//! ```

use std::hint::black_box;
use std::time::Duration;

use acorn::kernels::half::{self, F16Weights};
use acorn::kernels::quant::{self, QActs};
use acorn::kernels::{self, BMat, Isa, MatRef, Panels};
use acorn::Tensor;
use acorn_converter::onnx_build::OnnxBuilder;
use acorn_tests::{pseudo_random, read_pass};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bandwidth(c: &mut Criterion) {
    let buf = pseudo_random(64 << 20, 1); // 256 MiB
    let mut g = c.benchmark_group("bandwidth");
    g.throughput(Throughput::Bytes((buf.len() * 4) as u64)).sample_size(10).measurement_time(Duration::from_secs(4));
    for threads in [1, 2] {
        g.bench_function(BenchmarkId::new("read", format!("{threads}t")), |b| {
            b.iter(|| black_box(read_pass(&buf, threads)))
        });
    }
    g.finish();
}

/// Weight bytes cycled through per GEMV benchmark: copies of the matrix well above the 32 MiB
/// L3, so the figure is DRAM streaming, comparable with `bandwidth`.
const ROTATE_BYTES: usize = 256 << 20;

/// (n, k): output rows × inner dimension of the weight matrix.
const GEMV_SHAPES: [(usize, usize); 4] = [(4096, 4096), (1536, 576), (576, 1536), (49152, 576)];

/// Enough copies of `w` (of `bytes` bytes) to stream `ROTATE_BYTES`.
fn copies<T: Clone>(w: &T, bytes: usize) -> Vec<T> {
    (0..(ROTATE_BYTES / bytes).max(1)).map(|_| w.clone()).collect()
}

/// One GEMV group at 1 and 2 threads; `run(threads, turn)` multiplies by copy `turn` (mod the
/// number of copies) of the weights. Throughput is the weight bytes streamed per call.
fn gemv_group(
    c: &mut Criterion,
    fmt: &str,
    kernel: &str,
    (n, k): (usize, usize),
    bytes: usize,
    mut run: impl FnMut(usize, usize),
) {
    let mut g = c.benchmark_group(format!("gemv_{fmt}/{n}x{k}"));
    g.throughput(Throughput::Bytes(bytes as u64)).sample_size(20).measurement_time(Duration::from_secs(2));
    let mut turn = 0usize;
    for threads in [1, 2] {
        g.bench_function(format!("{kernel}/{threads}t"), |b| {
            b.iter(|| {
                turn += 1;
                run(threads, turn)
            })
        });
    }
    g.finish();
}

/// The kernel sets this CPU runs, one per distinct kernel name `name(isa)` gives (the benches
/// run every kernel of every supported level, not just the selected one).
fn supported_sets(name: impl Fn(Isa) -> &'static str) -> Vec<(Isa, &'static str)> {
    let mut out: Vec<(Isa, &'static str)> = Vec::new();
    for isa in kernels::ALL_ISAS.into_iter().filter(|i| i.supported()) {
        let n = name(isa);
        if !out.iter().any(|(_, m)| *m == n) {
            out.push((isa, n));
        }
    }
    out
}

fn gemv(c: &mut Criterion) {
    for (n, k) in GEMV_SHAPES {
        let w = pseudo_random(n * k, (n + k) as u64);
        let x = pseudo_random(k, 7);
        let mut qa = QActs::default();
        quant::quantize_acts(&x, 1, k, &mut qa).unwrap();
        let mut out = vec![0.0f32; n];

        let f16: Vec<u16> = w.iter().map(|&v| acorn::dtype::f32_to_f16(v)).collect();
        let bytes = 2 * n * k;
        let f16s = copies(&f16, bytes);
        for (isa, name) in supported_sets(|i| i.f16_kernel_name()) {
            gemv_group(c, "f16", name, (n, k), bytes, |threads, turn| {
                let w = F16Weights { n, k, data: &f16s[turn % f16s.len()] };
                half::gemm_f16(isa, &x, 1, &w, &mut out, threads).unwrap()
            });
        }
        drop(f16s);

        let bytes = n * k + 4 * n;
        let q8s = copies(&acorn::weights::q8::encode(&w, n, k), bytes);
        for (isa, name) in supported_sets(|i| i.q_rows().q8_name) {
            gemv_group(c, "q8", name, (n, k), bytes, |threads, turn| {
                quant::gemm_q8(isa, &qa, &q8s[turn % q8s.len()].view(), &mut out, threads).unwrap()
            });
        }
        drop(q8s);

        let bytes = n * k / 2 + 2 * n * k / 32;
        let q4s = copies(&acorn::weights::q4::encode(&w, n, k, 32, false), bytes);
        let q4_name = |i: Isa| match kernels::lists::pick(quant::q4_sym32_rows(), i) {
            Some(band) => band.name,
            None => i.q_rows().q4_name,
        };
        for (isa, name) in supported_sets(q4_name) {
            gemv_group(c, "q4", name, (n, k), bytes, |threads, turn| {
                quant::gemm_q4(isa, &qa, &q4s[turn % q4s.len()].view(), &mut out, threads).unwrap()
            });
        }
    }
}

/// (m, k, n): 512³, MiniLM-L3's projections at 16 and 128 tokens, and one head of its
/// attention at 128 tokens (scores Q·Kᵀ, then scores·V).
const GEMM_SHAPES: [(usize, usize, usize); 9] = [
    (512, 512, 512),
    (16, 384, 384),
    (16, 384, 1536),
    (16, 1536, 384),
    (128, 384, 384),
    (128, 384, 1536),
    (128, 1536, 384),
    (128, 32, 128),
    (128, 128, 32),
];

fn sgemm(c: &mut Criterion) {
    let onnx_dir = tempfile::tempdir().unwrap();
    let sets = supported_sets(|i| i.f32_tile().map_or("reference", |t| t.name));
    for (m, k, n) in GEMM_SHAPES {
        let a = pseudo_random(m * k, 3);
        let b = pseudo_random(k * n, 4);
        let mut out = vec![0.0f32; m * n];
        let mut g = c.benchmark_group(format!("sgemm/{m}x{k}x{n}"));
        g.throughput(Throughput::Elements((2 * m * n * k) as u64))
            .sample_size(30)
            .measurement_time(Duration::from_secs(2));
        let am = MatRef { data: &a, rs: k, cs: 1 };
        for &(isa, _) in &sets {
            let Some(nr) = isa.f32_panel() else { continue };
            let packed = kernels::pack_panels(BMat::Strided(MatRef { data: &b, rs: n, cs: 1 }), k, n, nr);
            let bp = BMat::Panels(Panels { data: &packed, k, n, nr });
            let tile = isa.f32_tile().map_or("?", |t| t.name);
            for threads in [1, 2] {
                g.bench_function(format!("kernel-{tile}/{threads}t"), |bch| {
                    bch.iter(|| kernels::sgemm_with(isa, m, n, k, am, bp, &mut out, n, false, threads))
                });
            }
        }
        // The same product as a one-MatMul model, in each runtime's session.
        let mut ob = OnnxBuilder::new(17);
        ob.input_f32("a", &[&m.to_string(), &k.to_string()]);
        ob.init_f32("b", &[k as i64, n as i64], b.clone());
        ob.node("MatMul", "mm", &["a", "b"], &["y"], vec![]);
        ob.output_f32("y");
        let path = onnx_dir.path().join(format!("mm_{m}_{k}_{n}.onnx"));
        std::fs::write(&path, ob.to_bytes()).unwrap();
        let acorn_path = path.with_extension("acorn");
        acorn_converter::convert(&path, &acorn_path, &Default::default()).unwrap();
        let model = acorn::Model::open(&acorn_path).unwrap();
        let input = Tensor::from_f32(vec![m, k], a.clone());
        for threads in [1, 2] {
            let mut s = model.session().with_threads(threads).commit().unwrap();
            g.bench_function(format!("acorn-session/{threads}t"), |bch| {
                bch.iter(|| black_box(s.run(&[("a", &input)]).unwrap()))
            });
            match acorn_tests::OrtModel::load(&path, threads) {
                Ok(mut ort) => g.bench_function(format!("onnxruntime-session/{threads}t"), |bch| {
                    bch.iter(|| black_box(ort.run(&[("a", &input)], &["y"]).unwrap()))
                }),
                Err(e) => panic!("ONNX Runtime unavailable ({e}); run `{}`", acorn_tests::FETCH),
            };
        }
        g.finish();
    }
}

/// What splitting a call over 2 threads costs before any work: handing an empty task to the
/// pool's worker and waiting for it, with the worker busy-idle (`hot`, calls back to back) and
/// after it went to sleep (`after_1ms_idle`, as between two matmuls of a model).
fn pool_overhead(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");
    g.sample_size(30).measurement_time(Duration::from_secs(2));
    g.bench_function("hot", |b| {
        b.iter(|| {
            kernels::pool::for_each(2, 2, &|i| {
                black_box(i);
            })
        })
    });
    g.bench_function("after_1ms_idle", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                std::thread::sleep(Duration::from_millis(1));
                let t = std::time::Instant::now();
                kernels::pool::for_each(2, 2, &|i| {
                    black_box(i);
                });
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

/// (m, k, n) of the quantized GEMM group: MiniLM-L3 at 128 tokens, SmolLM2's prefill of 128.
const QGEMM_SHAPES: [(usize, usize, usize); 4] =
    [(128, 384, 1536), (128, 1536, 384), (128, 576, 1536), (128, 1536, 576)];

fn qgemm(c: &mut Criterion) {
    for (m, k, n) in QGEMM_SHAPES {
        let a = pseudo_random(m * k, 3);
        let w = pseudo_random(n * k, 4);
        let mut out = vec![0.0f32; m * n];
        let mut g = c.benchmark_group(format!("qgemm/{m}x{k}x{n}"));
        g.throughput(Throughput::Elements((2 * m * n * k) as u64))
            .sample_size(20)
            .measurement_time(Duration::from_secs(2));
        let q8 = acorn::weights::q8::encode(&w, n, k);
        let (pq, ps) = acorn::weights::q8::pack_panels(&q8.q, &q8.scales, n, k, 32);
        let q8p = acorn::weights::Q8Panels { n, k, nr: 32, q: &pq, scales: &ps, narrow: false };
        // The narrow codes `--target x86_64-avx2` / `x86_64-avx512` store.
        let q7 = acorn::weights::q8::encode_within(&w, n, k, acorn::weights::q8::NARROW_MAX);
        let (pq7, ps7) = acorn::weights::q8::pack_panels(&q7.q, &q7.scales, n, k, 32);
        let q7p = acorn::weights::Q8Panels { n, k, nr: 32, q: &pq7, scales: &ps7, narrow: true };
        let q4 = acorn::weights::q4::encode(&w, n, k, 32, true);
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let mut qa = QActs::default();
        for isa in kernels::ALL_ISAS.into_iter().filter(|i| *i != Isa::Reference && i.supported()) {
            let level = isa.name();
            if let Some(nr) = isa.f32_panel() {
                let packed = kernels::pack_panels(BMat::Strided(MatRef { data: &wt, rs: n, cs: 1 }), k, n, nr);
                let bp = BMat::Panels(Panels { data: &packed, k, n, nr });
                let am = MatRef { data: &a, rs: k, cs: 1 };
                let tile = isa.f32_tile().map_or("?", |t| t.name);
                g.bench_function(format!("{level}/f32-{tile}/1t"), |bch| {
                    bch.iter(|| kernels::sgemm_with(isa, m, n, k, am, bp, &mut out, n, false, 1))
                });
            }
            let q8_name = isa.q_rows().q8_panel.map_or("q8_panel_row_generic", |(name, _)| name);
            g.bench_function(format!("{level}/q8-{q8_name}/1t"), |bch| {
                bch.iter(|| {
                    quant::quantize_acts_q8(&a, m, k, &mut qa, 1).unwrap();
                    quant::gemm_q8_panels(isa, &qa, &q8p, &mut out, 1).unwrap()
                })
            });
            if isa.narrow_q8() {
                let q7_name = quant::q8_kernel_name(isa, m, Some((32, true)));
                g.bench_function(format!("{level}/q8-{q7_name}/1t"), |bch| {
                    bch.iter(|| {
                        quant::quantize_acts_q8(&a, m, k, &mut qa, 1).unwrap();
                        quant::gemm_q8_panels(isa, &qa, &q7p, &mut out, 1).unwrap()
                    })
                });
            }
            let q4_name = isa.q_rows().q4_panel.map_or(isa.q_rows().q4_name, |(name, _)| name);
            g.bench_function(format!("{level}/q4-{q4_name}/1t"), |bch| {
                bch.iter(|| {
                    if quant::q4_reads_arranged(isa, m, 32) {
                        quant::quantize_acts(&a, m, k, &mut qa).unwrap();
                    } else {
                        quant::quantize_acts_q8(&a, m, k, &mut qa, 1).unwrap();
                    }
                    quant::gemm_q4(isa, &qa, &q4.view(), &mut out, 1).unwrap()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bandwidth, gemv, sgemm, qgemm, pool_overhead);
criterion_main!(benches);
