//! Kernel benchmarks (criterion), side by side in one run:
//!
//! - `bandwidth`: memory read bandwidth of this machine (sum of a 256 MiB buffer, 1 and 2
//!   threads) — the physical limit for GEMV.
//! - `gemv_f16` / `gemv_q8` / `gemv_q4`: f16-weight and quantized GEMV on weight matrices larger than L2; throughput is the
//!   weight bytes streamed (compare with `bandwidth` at the same thread count).
//! - `sgemm`: f32 GEMM at 512³ and MiniLM's shapes: Acorn's native kernel and the portable
//!   (`generic`) kernel called directly, and Acorn vs ONNX Runtime each running the same
//!   one-MatMul ONNX model (weights as an initializer); throughput in FLOP (2·m·n·k).
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
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Sums `buf` with 64 independent lanes (four vector accumulators at the widest width, so the
/// add latency never limits the read rate).
fn sum(buf: &[f32]) -> f32 {
    let mut acc = [0.0f32; 64];
    kernels::math::with_width(|| {
        for c in buf.chunks_exact(64) {
            for l in 0..64 {
                acc[l] += c[l];
            }
        }
    });
    acc.iter().sum()
}

fn bandwidth(c: &mut Criterion) {
    let buf = data(64 << 20, 1); // 256 MiB
    let mut g = c.benchmark_group("bandwidth");
    g.throughput(Throughput::Bytes((buf.len() * 4) as u64)).sample_size(10).measurement_time(Duration::from_secs(4));
    for threads in [1, 2] {
        g.bench_function(BenchmarkId::new("read", format!("{threads}t")), |b| {
            b.iter(|| {
                let parts: Vec<std::sync::Mutex<f32>> = (0..threads).map(|_| std::sync::Mutex::new(0.0)).collect();
                let per = buf.len().div_ceil(threads);
                kernels::pool::for_each(threads, threads, &|t| {
                    let s = sum(&buf[t * per..((t + 1) * per).min(buf.len())]);
                    *parts[t].lock().unwrap() = s;
                });
                black_box(parts.iter().map(|p| *p.lock().unwrap()).sum::<f32>())
            })
        });
    }
    g.finish();
}

/// Bytes of q4 weights cycled through per GEMV benchmark (q8: twice that): well above L3.
const ROTATE_BYTES: usize = 128 << 20;

/// (n, k): output rows × inner dimension of the weight matrix.
const GEMV_SHAPES: [(usize, usize); 4] = [(4096, 4096), (1536, 576), (576, 1536), (49152, 576)];

fn gemv(c: &mut Criterion) {
    let isa = kernels::selected();
    for (n, k) in GEMV_SHAPES {
        let w = data(n * k, (n + k) as u64);
        let x = data(k, 7);
        let mut qa = QActs::default();
        quant::quantize_acts(&x, 1, k, &mut qa).unwrap();
        let mut out = vec![0.0f32; n];
        // Copies cycled through so the weights streamed exceed the 32 MiB L3: the figure is
        // DRAM streaming, comparable with `bandwidth`.
        let q8 = quant::quantize_q8(&w, n, k);
        let q4 = quant::quantize_q4(&w, n, k, 32, false);
        let f16: Vec<u16> = w.iter().map(|&v| acorn::tensor::f32_to_f16(v)).collect();
        drop(w);
        let f16s: Vec<Vec<u16>> = (0..(2 * ROTATE_BYTES / (2 * n * k)).max(1)).map(|_| f16.clone()).collect();
        let mut g = c.benchmark_group(format!("gemv_f16/{n}x{k}"));
        g.throughput(Throughput::Bytes((2 * n * k) as u64)).sample_size(20).measurement_time(Duration::from_secs(2));
        let mut turn16 = 0usize;
        for threads in [1, 2] {
            g.bench_function(format!("{}/{threads}t", isa.f16_row().0), |b| {
                b.iter(|| {
                    turn16 += 1;
                    let w = F16Weights { n, k, data: &f16s[turn16 % f16s.len()] };
                    half::gemm_f16(isa, &x, 1, &w, &mut out, threads).unwrap()
                })
            });
        }
        g.finish();
        let copies = (ROTATE_BYTES / (n * k / 2)).max(1);
        let q8s: Vec<_> = (0..copies).map(|_| q8.clone()).collect();
        let q4s: Vec<_> = (0..copies).map(|_| q4.clone()).collect();
        let mut turn = 0usize;
        let mut g = c.benchmark_group(format!("gemv_q8/{n}x{k}"));
        g.throughput(Throughput::Bytes((n * k + 4 * n) as u64))
            .sample_size(20)
            .measurement_time(Duration::from_secs(2));
        for threads in [1, 2] {
            g.bench_function(format!("{}/{threads}t", isa.q_rows().q8_name), |b| {
                b.iter(|| {
                    turn += 1;
                    quant::gemm_q8(isa, &qa, &q8s[turn % copies].view(), &mut out, threads).unwrap()
                })
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("gemv_q4/{n}x{k}"));
        g.throughput(Throughput::Bytes((n * k / 2 + 2 * n * k / 32) as u64))
            .sample_size(20)
            .measurement_time(Duration::from_secs(2));
        for threads in [1, 2] {
            g.bench_function(format!("{}/{threads}t", isa.q_rows().q4_name), |b| {
                b.iter(|| {
                    turn += 1;
                    quant::gemm_q4(isa, &qa, &q4s[turn % copies].view(), &mut out, threads).unwrap()
                })
            });
        }
        g.finish();
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
    let native = kernels::selected();
    for (m, k, n) in GEMM_SHAPES {
        let a = data(m * k, 3);
        let b = data(k * n, 4);
        let mut out = vec![0.0f32; m * n];
        let mut g = c.benchmark_group(format!("sgemm/{m}x{k}x{n}"));
        g.throughput(Throughput::Elements((2 * m * n * k) as u64))
            .sample_size(30)
            .measurement_time(Duration::from_secs(2));
        let am = MatRef { data: &a, rs: k, cs: 1 };
        for isa in [native, Isa::Generic] {
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

criterion_group!(benches, bandwidth, gemv, sgemm);
criterion_main!(benches);
