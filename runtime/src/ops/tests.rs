//! Op semantics on small cases with known answers, and Conv against a direct loop.

use super::eval;
use crate::graph::{AutoPad, BinaryOp, ConvAttrs, Epilogue, FusedAct, Op, PadMode};
use crate::tensor::Tensor;

fn f32t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_f32(shape.to_vec(), v.to_vec())
}

fn i64t(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::from_i64(shape.to_vec(), v.to_vec())
}

fn run(op: Op, ins: &[Option<&Tensor>]) -> Vec<Tensor> {
    let views: Vec<_> = ins.iter().map(|t| t.map(|t| t.view())).collect();
    eval(&op, &views, 1, 1).unwrap_or_else(|e| panic!("{op:?}: {}", e.message()))
}

#[test]
fn broadcast_binary_ops() {
    let a = f32t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let b = f32t(&[3], &[10., 20., 30.]);
    let c = f32t(&[2, 1], &[100., 200.]);
    assert_eq!(
        run(Op::Binary(BinaryOp::Add), &[Some(&a), Some(&b)])[0].as_f32().unwrap(),
        &[11., 22., 33., 14., 25., 36.]
    );
    assert_eq!(
        run(Op::Binary(BinaryOp::Sub), &[Some(&c), Some(&a)])[0].as_f32().unwrap(),
        &[99., 98., 97., 196., 195., 194.]
    );
    let big = f32t(&[2, 1, 3], &[1., 2., 3., 4., 5., 6.]);
    let col = f32t(&[1, 2, 1], &[0., 1.]);
    let out = &run(Op::Binary(BinaryOp::Mul), &[Some(&big), Some(&col)])[0];
    assert_eq!(out.shape(), &[2, 2, 3]);
    assert_eq!(out.as_f32().unwrap(), &[0., 0., 0., 1., 2., 3., 0., 0., 0., 4., 5., 6.]);
    let bad = f32t(&[4], &[0.; 4]);
    let views = [Some(a.view()), Some(bad.view())];
    assert!(eval(&Op::Binary(BinaryOp::Add), &views, 1, 1).is_err());
}

#[test]
fn slice_with_negative_steps_and_clamping() {
    let x = f32t(&[2, 5], &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let out = &run(
        Op::Slice,
        &[
            Some(&x),
            Some(&i64t(&[1], &[-1])),
            Some(&i64t(&[1], &[i64::MIN])),
            Some(&i64t(&[1], &[1])),
            Some(&i64t(&[1], &[-2])),
        ],
    )[0];
    assert_eq!(out.shape(), &[2, 3]);
    assert_eq!(out.as_f32().unwrap(), &[4., 2., 0., 9., 7., 5.]);
    let out = &run(Op::Slice, &[Some(&x), Some(&i64t(&[2], &[1, 1])), Some(&i64t(&[2], &[100, 3]))])[0];
    assert_eq!(out.as_f32().unwrap(), &[6., 7.]);
}

#[test]
fn pad_modes() {
    let x = f32t(&[1, 4], &[1., 2., 3., 4.]);
    let pads = i64t(&[4], &[0, 2, 0, 2]);
    let r = |m| run(Op::Pad { mode: m }, &[Some(&x), Some(&pads)]).swap_remove(0);
    assert_eq!(r(PadMode::Reflect).as_f32().unwrap(), &[3., 2., 1., 2., 3., 4., 3., 2.]);
    assert_eq!(r(PadMode::Edge).as_f32().unwrap(), &[1., 1., 1., 2., 3., 4., 4., 4.]);
    assert_eq!(r(PadMode::Wrap).as_f32().unwrap(), &[3., 4., 1., 2., 3., 4., 1., 2.]);
    let v = f32t(&[], &[9.]);
    let c = run(Op::Pad { mode: PadMode::Constant }, &[Some(&x), Some(&pads), Some(&v)]).swap_remove(0);
    assert_eq!(c.as_f32().unwrap(), &[9., 9., 1., 2., 3., 4., 9., 9.]);
}

#[test]
fn gather_negative_and_out_of_range() {
    let x = f32t(&[3, 2], &[1., 2., 3., 4., 5., 6.]);
    let out = &run(Op::Gather { axis: 0 }, &[Some(&x), Some(&i64t(&[2], &[-1, 0]))])[0];
    assert_eq!(out.as_f32().unwrap(), &[5., 6., 1., 2.]);
    let idx = i64t(&[1], &[3]);
    let e = eval(&Op::Gather { axis: 0 }, &[Some(x.view()), Some(idx.view())], 1, 1).unwrap_err();
    assert!(e.message().contains("out of range"), "{}", e.message());
}

#[test]
fn softmax_axis_and_legacy() {
    let x = f32t(&[2, 2], &[0., 0., 1., 3.]);
    let m = &run(Op::Softmax { axis: 0, log: false, legacy: false }, &[Some(&x)])[0];
    let e = 1.0 / (1.0 + 1f32.exp());
    let e3 = 1.0 / (1.0 + 3f32.exp());
    let want = [e, e3, 1. - e, 1. - e3];
    for (g, w) in m.as_f32().unwrap().iter().zip(want) {
        assert!((g - w).abs() < 1e-6);
    }
    // legacy (opset < 13) with axis 0 normalises over everything.
    let l = &run(Op::Softmax { axis: 0, log: false, legacy: true }, &[Some(&x)])[0];
    assert!((l.as_f32().unwrap().iter().sum::<f32>() - 1.0).abs() < 1e-6);
}

/// Direct-loop 2-D convolution, the reference for im2col + GEMM.
#[allow(clippy::too_many_arguments)]
fn conv_direct(
    x: &[f32],
    xs: [usize; 4],
    w: &[f32],
    ws: [usize; 4],
    b: &[f32],
    stride: [usize; 2],
    pad: [usize; 4],
    dil: [usize; 2],
    group: usize,
) -> (Vec<f32>, [usize; 4]) {
    let [n, c, h, wd] = xs;
    let [m, cg, kh, kw] = ws;
    let oh = (h + pad[0] + pad[2] - dil[0] * (kh - 1) - 1) / stride[0] + 1;
    let ow = (wd + pad[1] + pad[3] - dil[1] * (kw - 1) - 1) / stride[1] + 1;
    let mg = m / group;
    let mut out = vec![0.0; n * m * oh * ow];
    for bn in 0..n {
        for oc in 0..m {
            let g = oc / mg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = b[oc];
                    for ic in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * stride[0] + ky * dil[0]) as isize - pad[0] as isize;
                                let ix = (ox * stride[1] + kx * dil[1]) as isize - pad[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xc = g * cg + ic;
                                s += x[((bn * c + xc) * h + iy as usize) * wd + ix as usize]
                                    * w[((oc * cg + ic) * kh + ky) * kw + kx];
                            }
                        }
                    }
                    out[((bn * m + oc) * oh + oy) * ow + ox] = s;
                }
            }
        }
    }
    let _ = c;
    (out, [n, m, oh, ow])
}

#[test]
fn conv_matches_direct_loop() {
    let gen = |n: usize, seed: usize| {
        (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0) - 1.0).collect::<Vec<f32>>()
    };
    // (N, C, H, W, M, kh, kw, stride, pads [t, l, b, r], dilation, group)
    let cases = [
        (1, 3, 7, 9, 4, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1], 1),
        (2, 4, 8, 8, 6, 3, 2, [2, 1], [0, 1, 2, 0], [1, 2], 2),
        (1, 4, 5, 11, 4, 1, 3, [1, 3], [0, 0, 0, 0], [1, 1], 4),
        (1, 2, 1, 40, 3, 1, 5, [1, 2], [0, 2, 0, 2], [1, 3], 1),
        (1, 8, 6, 6, 8, 1, 1, [1, 1], [0, 0, 0, 0], [1, 1], 1),
        // depthwise (3×3, 5×5 stride 2, a channel multiplier of 2, dilated)
        (2, 5, 9, 13, 5, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1], 5),
        (1, 4, 11, 10, 4, 5, 5, [2, 2], [2, 2, 1, 2], [1, 1], 4),
        (1, 3, 7, 8, 6, 3, 3, [1, 2], [1, 0, 0, 1], [2, 1], 3),
        // depthwise maps wide enough for the register tiles: two column blocks with an
        // overlapping last tile and leftover rows; stride 2 with odd and even left pads (the
        // row-reuse tiles); 5×5; dilation with a multiplier, 7×7 and stride 3 (the general
        // tile); a kernel wider than the tiles take (row loops)
        (1, 4, 21, 70, 4, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1], 4),
        (1, 3, 19, 40, 3, 3, 3, [2, 2], [1, 1, 1, 1], [1, 1], 3),
        (1, 3, 18, 37, 3, 3, 3, [2, 2], [0, 0, 1, 1], [1, 1], 3),
        (1, 3, 23, 41, 3, 5, 5, [1, 1], [2, 2, 2, 2], [1, 1], 3),
        (1, 2, 21, 44, 2, 5, 5, [2, 2], [2, 2, 2, 2], [1, 1], 2),
        (1, 2, 12, 50, 4, 3, 3, [1, 1], [2, 2, 2, 2], [2, 2], 2),
        (1, 2, 10, 33, 2, 7, 7, [1, 1], [3, 3, 3, 3], [1, 1], 2),
        (1, 2, 9, 60, 2, 3, 3, [3, 3], [1, 1, 1, 1], [1, 1], 2),
        (1, 2, 5, 50, 2, 1, 33, [1, 1], [0, 16, 0, 16], [1, 1], 2),
        // stride-2 phases, a 1×1 stride 2, dilation with stride, and a map wide enough for
        // several column blocks of the blocked GEMM (and for two threads to share them)
        (1, 6, 15, 17, 20, 3, 3, [2, 2], [1, 1, 1, 1], [1, 1], 1),
        (1, 6, 9, 9, 7, 1, 1, [2, 2], [0, 0, 0, 0], [1, 1], 1),
        (1, 3, 12, 14, 5, 3, 2, [3, 2], [2, 1, 0, 3], [2, 3], 1),
        (1, 4, 70, 75, 9, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1], 1),
        (1, 40, 50, 60, 70, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1], 1),
        // 3×3 at stride 1 with channels enough for Winograd's F(2×2, 3×3) on every set (a
        // batch, odd output sizes, asymmetric pads)
        (2, 100, 11, 13, 97, 3, 3, [1, 1], [1, 0, 1, 2], [1, 1], 1),
        // a pointwise convolution deeper than one depth step, its output written in place
        // (grid columns are output columns) with a partial last column tile
        (1, 150, 21, 29, 30, 1, 1, [1, 1], [0, 0, 0, 0], [1, 1], 1),
        // one channel read by windows along a row (an STFT front end: the transposed
        // product), a batch of two; with an end pad its windows never reach
        (2, 1, 1, 640, 40, 1, 64, [1, 32], [0, 0, 0, 0], [1, 1], 1),
        (1, 1, 1, 100, 33, 1, 10, [1, 10], [0, 0, 0, 5], [1, 1], 1),
        // batches of small outputs, folded into one product (silero's sequence encoder: 4, 2
        // and 1 frames per chunk), 1-D and 2-D, padded, strided, dilated
        (7, 9, 1, 4, 12, 1, 3, [1, 1], [0, 1, 0, 1], [1, 1], 1),
        (5, 6, 1, 4, 5, 1, 3, [1, 2], [0, 1, 0, 1], [1, 1], 1),
        (3, 4, 5, 6, 9, 3, 3, [2, 2], [1, 1, 0, 1], [1, 2], 1),
        (2, 3, 4, 4, 40, 2, 2, [1, 1], [0, 0, 0, 0], [1, 1], 1),
    ];
    for (i, &(n, c, h, w, m, kh, kw, st, pd, dl, g)) in cases.iter().enumerate() {
        let x = gen(n * c * h * w, i);
        let wt = gen(m * (c / g) * kh * kw, i + 10);
        let b = gen(m, i + 20);
        let (want, oshape) = conv_direct(&x, [n, c, h, w], &wt, [m, c / g, kh, kw], &b, st, pd, dl, g);
        let attrs = ConvAttrs {
            kernel_shape: vec![kh as i64, kw as i64],
            strides: st.iter().map(|&v| v as i64).collect(),
            pads: vec![pd[0] as i64, pd[1] as i64, pd[2] as i64, pd[3] as i64],
            dilations: dl.iter().map(|&v| v as i64).collect(),
            group: g as i64,
            auto_pad: AutoPad::NotSet,
        };
        let xt = f32t(&[n, c, h, w], &x);
        let wt_t = f32t(&[m, c / g, kh, kw], &wt);
        let bt = f32t(&[m], &b);
        let tol = 1e-4 * (c / g * kh * kw) as f32;
        for threads in [1, 2] {
            let ins = [Some(xt.view()), Some(wt_t.view()), Some(bt.view())];
            let got = eval(&Op::Conv(attrs.clone()), &ins, 1, threads).unwrap().swap_remove(0);
            assert_eq!(got.shape(), &oshape, "case {i}");
            for (j, (a, e)) in got.as_f32().unwrap().iter().zip(&want).enumerate() {
                assert!((a - e).abs() < tol, "case {i}, {threads} threads, cell {j}: {a} vs {e}");
            }
        }
        // Every fused epilogue equals the activation and affine applied afterwards.
        let acts = crate::kernels::conv::EVERY_ACT;
        for (k, &act) in acts.iter().enumerate() {
            let post = Epilogue {
                act,
                scale: if k % 2 == 0 { 1.0 } else { 0.5 },
                shift: if k % 3 == 0 { 0.0 } else { -0.25 },
            };
            let op = Op::ConvFused { conv: attrs.clone(), post };
            let got = run(op, &[Some(&xt), Some(&wt_t), Some(&bt)]).swap_remove(0);
            for (j, (a, e)) in got.as_f32().unwrap().iter().zip(&want).enumerate() {
                let e = crate::kernels::conv::act_scalar(act, *e) * post.scale + post.shift;
                assert!((a - e).abs() < tol, "case {i}, {act:?}, cell {j}: {a} vs {e}");
            }
        }
    }
}

#[test]
fn broadcast_arithmetic_split_across_threads_equals_one_thread() {
    // A per-channel scale (squeeze-excitation), a broadcast over the leading axis, a row
    // vector against a batch, the broadcast side first (each long enough to split): 2 threads
    // equal 1 and the definition.
    let cases: [(&[usize], &[usize]); 4] = [
        (&[1, 6, 100, 120], &[1, 6, 1, 1]),
        (&[1, 1, 90, 64], &[3, 5, 90, 64]),
        (&[2, 3, 120, 100], &[3, 1, 100]),
        (&[7, 1], &[7, 11000]),
    ];
    for (i, (xs, ys)) in cases.iter().enumerate() {
        let osh: Vec<usize> = {
            let r = xs.len().max(ys.len());
            let pad = |s: &[usize]| [vec![1; r - s.len()], s.to_vec()].concat();
            let (px, py) = (pad(xs), pad(ys));
            px.iter().zip(&py).map(|(&a, &b)| a.max(b)).collect()
        };
        let gen =
            |n: usize, k: usize| (0..n).map(|j| ((j * 31 + k * 7) % 97) as f32 / 13.0 + 0.5).collect::<Vec<f32>>();
        let (xv, yv) = (gen(xs.iter().product(), 1), gen(ys.iter().product(), 2));
        let (xt, yt) = (f32t(xs, &xv), f32t(ys, &yv));
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
            let ins = [Some(xt.view()), Some(yt.view())];
            let one = eval(&Op::Binary(op), &ins, 1, 1).unwrap().swap_remove(0);
            let two = eval(&Op::Binary(op), &ins, 1, 2).unwrap().swap_remove(0);
            assert_eq!(one.shape(), &osh[..], "case {i}");
            assert_eq!(one.as_f32().unwrap(), two.as_f32().unwrap(), "case {i} {op:?}");
            // the definition, at a few cells
            let r = osh.len();
            let at = |sh: &[usize], idx: &[usize]| {
                let off = r - sh.len();
                sh.iter().enumerate().fold(0, |acc, (k, &d)| acc * d + if d == 1 { 0 } else { idx[off + k] })
            };
            let n: usize = osh.iter().product();
            for cell in (0..n).step_by(997) {
                let mut idx = vec![0; r];
                let mut c = cell;
                for k in (0..r).rev() {
                    idx[k] = c % osh[k];
                    c /= osh[k];
                }
                let (a, b) = (xv[at(xs, &idx)], yv[at(ys, &idx)]);
                let want = match op {
                    BinaryOp::Add => a + b,
                    BinaryOp::Sub => a - b,
                    BinaryOp::Mul => a * b,
                    _ => a / b,
                };
                assert_eq!(two.as_f32().unwrap()[cell], want, "case {i} {op:?} cell {cell}");
            }
        }
    }
}

#[test]
fn integer_arithmetic_follows_onnx() {
    let a = i64t(&[4], &[7, -7, 7, -7]);
    let b = i64t(&[4], &[3, 3, -3, -3]);
    let r = |op| run(Op::Binary(op), &[Some(&a), Some(&b)]).swap_remove(0);
    assert_eq!(r(BinaryOp::Mod).as_i64().unwrap(), &[1, 2, -2, -1]);
    assert_eq!(r(BinaryOp::Fmod).as_i64().unwrap(), &[1, -1, 1, -1]);
    assert_eq!(r(BinaryOp::Div).as_i64().unwrap(), &[2, -2, -2, 2]);
    assert_eq!(r(BinaryOp::Max).as_i64().unwrap(), &[7, 3, 7, -3]);
    let lt = r(BinaryOp::Less);
    assert_eq!(lt.bytes(), &[0, 1, 0, 1]);
    let z = i64t(&[1], &[0]);
    let e = eval(&Op::Binary(BinaryOp::Div), &[Some(a.view()), Some(z.view())], 1, 1).unwrap_err();
    assert!(e.message().contains("division by zero"));
    let ai = Tensor::new(vec![2], crate::tensor::TensorData::I32(vec![5, -5])).unwrap();
    let bi = Tensor::new(vec![1], crate::tensor::TensorData::I32(vec![3])).unwrap();
    let m = run(Op::Binary(BinaryOp::Mod), &[Some(&ai), Some(&bi)]).swap_remove(0);
    assert_eq!(m.bytes(), bytemuck::cast_slice::<i32, u8>(&[2, 1]));
}

#[test]
fn arg_max_and_min_with_ties() {
    let x = f32t(&[2, 3], &[1., 5., 5., 2., 0., 0.]);
    let r = |max, last| {
        run(Op::ArgExtreme { max, axis: 1, keepdims: false, select_last_index: last }, &[Some(&x)]).swap_remove(0)
    };
    assert_eq!(r(true, false).as_i64().unwrap(), &[1, 0]);
    assert_eq!(r(true, true).as_i64().unwrap(), &[2, 0]);
    assert_eq!(r(false, false).as_i64().unwrap(), &[0, 1]);
    assert_eq!(r(false, true).as_i64().unwrap(), &[0, 2]);
    let xi = i64t(&[3], &[4, 9, 9]);
    let m = run(Op::ArgExtreme { max: true, axis: 0, keepdims: true, select_last_index: false }, &[Some(&xi)]);
    assert_eq!(m[0].shape(), &[1]);
    assert_eq!(m[0].as_i64().unwrap(), &[1]);
}

/// Resize attributes with ONNX's defaults and `mode`.
fn resize_attrs(mode: crate::graph::ResizeMode) -> crate::graph::ResizeAttrs {
    use crate::graph::{AspectPolicy, CoordMode, NearestMode, ResizeAttrs};
    ResizeAttrs {
        mode,
        coord: CoordMode::HalfPixel,
        nearest: NearestMode::RoundPreferFloor,
        cubic_coeff_a: -0.75,
        exclude_outside: false,
        extrapolation_value: 0.0,
        antialias: false,
        axes: vec![],
        aspect: AspectPolicy::Stretch,
    }
}

#[test]
fn malformed_shapes_are_errors_not_panics() {
    use crate::graph::ResizeMode;
    use crate::tensor::{DType, TensorData};
    // Integer matmul whose batch dims only broadcast to a larger batch than either side has.
    let a = Tensor::new(vec![2, 1, 1, 1], TensorData::U8(vec![1; 2])).unwrap();
    let b = Tensor::new(vec![1, 2, 1, 1], TensorData::U8(vec![1; 2])).unwrap();
    assert!(eval(&Op::MatMulInteger, &[Some(a.view()), Some(b.view())], 1, 1).is_err());
    // Resize asked to produce elements from an empty input.
    let x = Tensor::zeros(DType::F32, vec![1, 0]).unwrap();
    let sizes = i64t(&[2], &[1, 5]);
    let attrs = resize_attrs(ResizeMode::Linear);
    assert!(eval(&Op::Resize(attrs), &[Some(x.view()), None, None, Some(sizes.view())], 1, 1).is_err());
    // A pool window with an absurd dilation overflows usize: an error.
    let x = f32t(&[1, 1, 4], &[1.0; 4]);
    let pool = crate::graph::PoolAttrs {
        kind: crate::graph::PoolKind::Max,
        global: false,
        kernel_shape: vec![3],
        strides: vec![],
        pads: vec![],
        dilations: vec![i64::MAX / 2],
        auto_pad: AutoPad::NotSet,
        ceil_mode: false,
        count_include_pad: false,
        storage_order: 0,
    };
    assert!(eval(&Op::Pool(pool), &[Some(x.view())], 1, 1).is_err());
}

#[test]
fn pooling_matches_direct_loop() {
    // Windows wider than the map (an SPP block's 13×13 on 13×13: no interior), strides and
    // dilations with uneven pads (stride 1 max runs whole-plane shifts), average with and
    // without the padding counted.
    // (map, kernel, strides, dilations, pads [t, l, b, r])
    type Case = ([usize; 2], [usize; 2], [usize; 2], [usize; 2], [usize; 4]);
    let cases: [Case; 10] = [
        // 2-column pairs (over 2 rows or 1): odd sizes, an end pad the windows never reach
        ([7, 9], [2, 2], [2, 2], [1, 1], [0, 0, 0, 0]),
        ([8, 10], [2, 2], [2, 2], [1, 1], [0, 0, 1, 1]),
        ([6, 8], [1, 2], [1, 2], [1, 1], [0, 0, 0, 0]),
        ([5, 9], [1, 2], [1, 2], [1, 1], [0, 0, 0, 0]),
        ([13, 13], [13, 13], [1, 1], [1, 1], [6, 6, 6, 6]),
        ([7, 11], [5, 3], [1, 2], [1, 1], [2, 1, 2, 1]),
        ([9, 10], [3, 3], [2, 3], [2, 2], [1, 2, 0, 3]),
        ([6, 5], [9, 7], [1, 1], [1, 1], [4, 3, 4, 3]),
        ([8, 20], [1, 4], [1, 4], [1, 1], [0, 0, 0, 0]),
        ([9, 10], [3, 3], [1, 1], [2, 2], [2, 1, 2, 3]),
    ];
    for (i, &(hw, k, st, dl, pd)) in cases.iter().enumerate() {
        let (h, w) = (hw[0], hw[1]);
        let c = 3;
        let x: Vec<f32> = (0..c * h * w).map(|j| ((j * 7919 + i * 31) % 1000) as f32 / 100.0 - 5.0).collect();
        let xt = f32t(&[1, c, h, w], &x);
        let (oh, ow) = (
            (h + pd[0] + pd[2] - dl[0] * (k[0] - 1) - 1) / st[0] + 1,
            (w + pd[1] + pd[3] - dl[1] * (k[1] - 1) - 1) / st[1] + 1,
        );
        for (kind, include) in [
            (crate::graph::PoolKind::Max, false),
            (crate::graph::PoolKind::Avg, false),
            (crate::graph::PoolKind::Avg, true),
        ] {
            let max = kind == crate::graph::PoolKind::Max;
            if !max && dl != [1, 1] {
                continue;
            }
            let attrs = crate::graph::PoolAttrs {
                kind,
                global: false,
                kernel_shape: k.iter().map(|&v| v as i64).collect(),
                strides: st.iter().map(|&v| v as i64).collect(),
                pads: pd.iter().map(|&v| v as i64).collect(),
                dilations: dl.iter().map(|&v| v as i64).collect(),
                auto_pad: AutoPad::NotSet,
                ceil_mode: false,
                count_include_pad: include,
                storage_order: 0,
            };
            let got = run(Op::Pool(attrs), &[Some(&xt)]).swap_remove(0);
            assert_eq!(got.shape(), &[1, c, oh, ow], "case {i}");
            let got = got.as_f32().unwrap();
            for ch in 0..c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (mut m, mut s, mut n) = (f32::NEG_INFINITY, 0.0f32, 0usize);
                        for ky in 0..k[0] {
                            for kx in 0..k[1] {
                                let (iy, ix) = (
                                    (oy * st[0] + ky * dl[0]) as isize - pd[0] as isize,
                                    (ox * st[1] + kx * dl[1]) as isize - pd[1] as isize,
                                );
                                if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                                    let v = x[ch * h * w + iy as usize * w + ix as usize];
                                    (m, s, n) = (m.max(v), s + v, n + 1);
                                }
                            }
                        }
                        let want = match (max, include) {
                            (true, _) => m,
                            (false, false) => s / n.max(1) as f32,
                            (false, true) => {
                                // taps inside input + padding, per axis
                                let ny = (0..k[0]).filter(|&t| oy * st[0] + t < h + pd[0] + pd[2]).count();
                                let nx = (0..k[1]).filter(|&t| ox * st[1] + t < w + pd[1] + pd[3]).count();
                                s / (ny * nx) as f32
                            }
                        };
                        let g = got[(ch * oh + oy) * ow + ox];
                        assert!(
                            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "case {i} {kind:?} {include}: [{ch},{oy},{ox}] {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn max_pooling_propagates_nan() {
    // One NaN at (2, 3) of a 5×7 plane: every window holding it gives NaN, no other does, at
    // stride 1 (whole-plane shifts), stride 2 (row then column passes) and in 2-column pairs.
    let mut x = vec![0.5f32; 35];
    x[2 * 7 + 3] = f32::NAN;
    let xt = f32t(&[1, 1, 5, 7], &x);
    // (kernel, strides, leading pad)
    for (k, st, p) in [([3, 3], [1, 1], 1), ([3, 3], [2, 2], 1), ([2, 2], [2, 2], 0), ([1, 2], [1, 2], 0)] {
        let attrs = crate::graph::PoolAttrs {
            kind: crate::graph::PoolKind::Max,
            global: false,
            kernel_shape: k.iter().map(|&v| v as i64).collect(),
            strides: st.iter().map(|&v| v as i64).collect(),
            pads: vec![p as i64; 4],
            dilations: vec![],
            auto_pad: AutoPad::NotSet,
            ceil_mode: false,
            count_include_pad: false,
            storage_order: 0,
        };
        let got = run(Op::Pool(attrs), &[Some(&xt)]).swap_remove(0);
        let (oh, ow) = (got.shape()[2], got.shape()[3]);
        for oy in 0..oh {
            for ox in 0..ow {
                let inside = |o: usize, s: usize, k: usize, at: usize| (o * s..o * s + k).contains(&(at + p));
                let hit = inside(oy, st[0], k[0], 2) && inside(ox, st[1], k[1], 3);
                let v = got.as_f32().unwrap()[oy * ow + ox];
                assert_eq!(v.is_nan(), hit, "kernel {k:?}, stride {st:?} [{oy},{ox}]: {v}");
            }
        }
    }
}

#[test]
fn matmul_batches_against_one_weight_matrix() {
    // A [2, 3, 5, 4] · B [4, 7]: every batch shares B (one product of 30 rows), and B [2, 1, 4, 7]
    // broadcast over the middle dimension (one product per batch) — both against a direct loop.
    let a: Vec<f32> = (0..2 * 3 * 5 * 4).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
    let b: Vec<f32> = (0..2 * 4 * 7).map(|i| ((i * 5) % 13) as f32 * 0.5 - 3.0).collect();
    for bshape in [&[4, 7][..], &[2, 1, 4, 7][..]] {
        let bt = f32t(bshape, &b[..bshape.iter().product::<usize>()]);
        let out = &run(Op::MatMul, &[Some(&f32t(&[2, 3, 5, 4], &a)), Some(&bt)])[0];
        assert_eq!(out.shape(), &[2, 3, 5, 7]);
        let got = out.as_f32().unwrap();
        for (bi, mi) in (0..2).flat_map(|x| (0..3).map(move |y| (x, y))) {
            let boff = if bshape.len() == 2 { 0 } else { bi * 28 };
            for i in 0..5 {
                for j in 0..7 {
                    let want: f32 = (0..4).map(|p| a[((bi * 3 + mi) * 5 + i) * 4 + p] * b[boff + p * 7 + j]).sum();
                    assert_eq!(got[((bi * 3 + mi) * 5 + i) * 7 + j], want, "B {bshape:?} at ({bi},{mi},{i},{j})");
                }
            }
        }
    }
}

/// Attention by definition (f64): `q` [B, qh, S, hd], `k`/`v` [B, kvh, T, ·] (past rows first),
/// `bias(b, h, i, j)` the mask; returns [B, qh, S, hv].
#[allow(clippy::too_many_arguments)]
fn attention_by_definition(
    (b, qh, kvh, s, t, hd, hv): (usize, usize, usize, usize, usize, usize, usize),
    q: &dyn Fn(usize, usize, usize, usize) -> f32,
    k: &dyn Fn(usize, usize, usize, usize) -> f32,
    v: &dyn Fn(usize, usize, usize, usize) -> f32,
    bias: &dyn Fn(usize, usize, usize, usize) -> f64,
    scale: f64,
) -> Vec<f64> {
    let mut y = vec![0.0; b * qh * s * hv];
    for bi in 0..b {
        for h in 0..qh {
            let kh = h / (qh / kvh);
            for i in 0..s {
                let sc: Vec<f64> = (0..t)
                    .map(|j| {
                        let dot: f64 = (0..hd).map(|d| q(bi, h, i, d) as f64 * k(bi, kh, j, d) as f64).sum();
                        dot * scale + bias(bi, h, i, j)
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hv {
                    y[((bi * qh + h) * s + i) * hv + d] = (0..t).map(|j| e[j] / z * v(bi, kh, j, d) as f64).sum();
                }
            }
        }
    }
    y
}

#[test]
fn attention_units_match_the_definition_in_both_layouts_on_any_thread_count() {
    use crate::graph::AttentionAttrs;
    use crate::kernels::pseudo_random;
    // B, query heads, K/V heads, S, past, head width, value width.
    for &(b, qh, kvh, s, past, hd, hv) in &[
        (2, 4, 2, 5, 0, 8, 6),
        (2, 6, 6, 7, 3, 5, 9),
        (1, 12, 12, 40, 8, 32, 32),
        (2, 4, 2, 33, 0, 40, 24),
        (3, 3, 1, 1, 4, 16, 16),
    ] {
        let t = past + s;
        for three_d in [false, true] {
            for (masked, causal) in [(false, false), (true, false), (false, true)] {
                let qv = pseudo_random(b * qh * s * hd, 1);
                let kv = pseudo_random(b * kvh * s * hd, 2);
                let vv = pseudo_random(b * kvh * s * hv, 3);
                let pk = pseudo_random(b * kvh * past * hd, 4);
                let pv = pseudo_random(b * kvh * past * hv, 5);
                // An additive [B, 1, 1, T] mask hiding one key per batch.
                let mv: Vec<f32> = (0..b * t).map(|x| if x % t == (x / t + 1) % t { -1e4 } else { 0.1 }).collect();
                // Element (batch, head, row, d) of a tensor in the layout under test.
                let at = |data: &[f32], heads: usize, rows: usize, w: usize, bi, h, r, d| {
                    if three_d {
                        data[((bi * rows + r) * heads + h) * w + d]
                    } else {
                        data[((bi * heads + h) * rows + r) * w + d]
                    }
                };
                let q = |bi, h, i, d| at(&qv, qh, s, hd, bi, h, i, d);
                let kf = |bi, h, j, d| {
                    if j < past {
                        pk[((bi * kvh + h) * past + j) * hd + d]
                    } else {
                        at(&kv, kvh, s, hd, bi, h, j - past, d)
                    }
                };
                let vf = |bi, h, j, d| {
                    if j < past {
                        pv[((bi * kvh + h) * past + j) * hv + d]
                    } else {
                        at(&vv, kvh, s, hv, bi, h, j - past, d)
                    }
                };
                let bias = |bi: usize, _h, i: usize, j: usize| {
                    let m = if masked { mv[bi * t + j] as f64 } else { 0.0 };
                    if causal && j > past + i {
                        f64::NEG_INFINITY
                    } else {
                        m
                    }
                };
                let scale = 0.3;
                let want = attention_by_definition((b, qh, kvh, s, t, hd, hv), &q, &kf, &vf, &bias, scale);
                let dims = |heads: usize, w: usize| if three_d { vec![b, s, heads * w] } else { vec![b, heads, s, w] };
                let (qt, kt, vt) = (f32t(&dims(qh, hd), &qv), f32t(&dims(kvh, hd), &kv), f32t(&dims(kvh, hv), &vv));
                let (pkt, pvt) = (f32t(&[b, kvh, past, hd], &pk), f32t(&[b, kvh, past, hv], &pv));
                let mt = f32t(&[b, 1, 1, t], &mv);
                let op = Op::Attention(AttentionAttrs {
                    is_causal: causal,
                    q_num_heads: three_d.then_some(qh as i64),
                    kv_num_heads: three_d.then_some(kvh as i64),
                    qk_mode: 0,
                    scale: Some(scale as f32),
                    softcap: 0.0,
                });
                let mut ins = vec![Some(&qt), Some(&kt), Some(&vt), masked.then_some(&mt)];
                if past > 0 {
                    ins.extend([Some(&pkt), Some(&pvt)]);
                }
                let views: Vec<_> = ins.iter().map(|t| t.map(|t| t.view())).collect();
                for threads in [1, 2, 3] {
                    let got =
                        eval(&op, &views, 1, threads).unwrap_or_else(|e| panic!("{}", e.message())).swap_remove(0);
                    let got = got.as_f32().unwrap();
                    for bi in 0..b {
                        for h in 0..qh {
                            for i in 0..s {
                                for d in 0..hv {
                                    let g = at(got, qh, s, hv, bi, h, i, d) as f64;
                                    let w = want[((bi * qh + h) * s + i) * hv + d];
                                    assert!(
                                        (g - w).abs() < 1e-4,
                                        "{:?} 3-D={three_d} mask={masked} causal={causal} threads={threads}: y[{bi},{h},{i},{d}] = {g}, want {w}",
                                        (b, qh, kvh, s, past, hd, hv)
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn long_elementwise_ops_and_layer_norm_split_across_threads_exactly() {
    use crate::graph::{Activation, BinaryOp};
    use crate::kernels::pseudo_random;
    // 70 rows of 1000: above every split threshold, not a multiple of the thread counts.
    let (rows, n) = (70, 1000);
    let x = f32t(&[rows, n], &pseudo_random(rows * n, 1));
    let y = f32t(&[rows, n], &pseudo_random(rows * n, 2));
    let (scale, bias) = (f32t(&[n], &pseudo_random(n, 3)), f32t(&[n], &pseudo_random(n, 4)));
    let cases: Vec<(Op, Vec<Option<&Tensor>>)> = vec![
        (Op::Activation(Activation::Gelu { tanh: false }), vec![Some(&x)]),
        (Op::Unary(crate::graph::UnaryOp::Exp), vec![Some(&x)]),
        (Op::Binary(BinaryOp::Add), vec![Some(&x), Some(&y)]),
        (Op::Binary(BinaryOp::Div), vec![Some(&x), Some(&y)]),
        (Op::LayerNorm { axis: -1, epsilon: 1e-5 }, vec![Some(&x), Some(&scale), Some(&bias)]),
    ];
    for (op, ins) in cases {
        let views: Vec<_> = ins.iter().map(|t| t.map(|t| t.view())).collect();
        let one = eval(&op, &views, 1, 1).unwrap().swap_remove(0);
        for threads in [2, 3] {
            let par = eval(&op, &views, 1, threads).unwrap().swap_remove(0);
            assert_eq!(one.as_f32().unwrap(), par.as_f32().unwrap(), "{op:?} on {threads} threads");
        }
    }
}

#[test]
fn attention_rows_with_no_attendable_key_are_zero_on_both_paths() {
    use crate::graph::AttentionAttrs;
    use crate::kernels::pseudo_random;
    // [1, 2 heads, 3 queries, 4 keys, head 8]; a boolean mask closes every key of query 1.
    let (q, k, v) = (
        f32t(&[1, 2, 3, 8], &pseudo_random(48, 1)),
        f32t(&[1, 2, 4, 8], &pseudo_random(64, 2)),
        f32t(&[1, 2, 4, 8], &pseudo_random(64, 3)),
    );
    let mut mask = Tensor::zeros(crate::tensor::DType::Bool, vec![1, 1, 3, 4]).unwrap();
    for (i, b) in mask.bytes_mut().iter_mut().enumerate() {
        *b = u8::from(i / 4 != 1);
    }
    let attrs = AttentionAttrs {
        is_causal: false,
        q_num_heads: None,
        kv_num_heads: None,
        qk_mode: 0,
        scale: None,
        softcap: 0.0,
    };
    // Attention takes the unit kernel (the softmax of this CPU's kernel set); the window
    // (unbounded on both sides, so the same answer) takes the general path.
    for op in [Op::Attention(attrs.clone()), Op::AttentionWindow { attrs, left: 100, right: 100 }] {
        let y = run(op.clone(), &[Some(&q), Some(&k), Some(&v), Some(&mask)]).swap_remove(0);
        let y = y.as_f32().unwrap();
        for h in 0..2 {
            let row = &y[(h * 3 + 1) * 8..(h * 3 + 2) * 8];
            assert!(row.iter().all(|&x| x == 0.0), "{op:?} head {h}: {row:?}");
            let open = &y[(h * 3) * 8..(h * 3 + 1) * 8];
            assert!(open.iter().all(|x| x.is_finite() && *x != 0.0), "{op:?} head {h}: {open:?}");
        }
    }
}

#[test]
fn conv_transpose_matches_scatter_loop() {
    use crate::graph::ConvTransposeAttrs;
    let gen = |n: usize, seed: usize| {
        (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0) - 1.0).collect::<Vec<f32>>()
    };
    // (N, C, H, W, M/group, kh, kw, stride, pads [t, l, b, r], dilation, output_padding, group)
    let cases = [
        (1, 4, 5, 6, 3, 2, 2, [2, 2], [0, 0, 0, 0], [1, 1], [0, 0], 1),
        (2, 4, 4, 7, 2, 3, 3, [2, 1], [1, 0, 1, 2], [1, 2], [1, 0], 2),
        (1, 3, 1, 9, 2, 1, 4, [1, 3], [0, 1, 0, 1], [1, 1], [0, 2], 1),
        (1, 6, 3, 3, 1, 3, 3, [3, 3], [1, 1, 0, 0], [2, 1], [2, 1], 6),
        // several chunks of input rows: overlapping taps across chunk edges, and a begin pad
        // larger than the first chunk's reach
        (1, 5, 23, 60, 20, 3, 3, [2, 2], [1, 1, 2, 1], [1, 1], [1, 0], 1),
        (1, 3, 30, 70, 16, 5, 4, [1, 2], [7, 0, 1, 2], [2, 1], [0, 1], 1),
        // kernel = stride along rows (taps tile each output row: one interleaving pass)
        (1, 2, 4, 5, 3, 3, 3, [3, 3], [1, 0, 0, 0], [1, 1], [0, 0], 1),
        (1, 3, 33, 40, 24, 2, 2, [2, 2], [0, 0, 0, 0], [1, 1], [0, 0], 1),
        // chunks whose rows do not overlap (each its own product, accumulation and epilogue,
        // chunks spread over the threads): output
        // padding rows no tap reaches, a kernel shorter than its stride with a begin pad
        (1, 2, 40, 30, 40, 2, 2, [2, 2], [0, 0, 0, 0], [1, 1], [1, 1], 1),
        (1, 2, 45, 30, 40, 2, 3, [3, 2], [1, 0, 0, 0], [1, 1], [2, 0], 1),
        // (split across threads by chunks) a begin pad that crops a whole chunk's taps and
        // part of the next one's
        (1, 2, 45, 30, 40, 2, 2, [2, 2], [30, 0, 3, 0], [1, 1], [0, 0], 1),
    ];
    for (i, &(n, c, h, w, mg, kh, kw, st, pd, dl, op, g)) in cases.iter().enumerate() {
        let x = gen(n * c * h * w, i);
        let wt = gen(c * mg * kh * kw, i + 10);
        let m = mg * g;
        let b = gen(m, i + 20);
        let full = |inp: usize, s: usize, k: usize, d: usize, o: usize| (inp - 1) * s + (k - 1) * d + 1 + o;
        let oh = full(h, st[0], kh, dl[0], op[0]) - pd[0] - pd[2];
        let ow = full(w, st[1], kw, dl[1], op[1]) - pd[1] - pd[3];
        let mut want = vec![0.0f32; n * m * oh * ow];
        for bn in 0..n {
            for oc in 0..m {
                want[(bn * m + oc) * oh * ow..][..oh * ow].fill(b[oc]);
            }
            for ci in 0..c {
                let gi = ci / (c / g);
                for iy in 0..h {
                    for ix in 0..w {
                        for mi in 0..mg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let oy = (iy * st[0] + ky * dl[0]) as isize - pd[0] as isize;
                                    let ox = (ix * st[1] + kx * dl[1]) as isize - pd[1] as isize;
                                    if oy < 0 || ox < 0 || oy >= oh as isize || ox >= ow as isize {
                                        continue;
                                    }
                                    want[((bn * m + gi * mg + mi) * oh + oy as usize) * ow + ox as usize] +=
                                        x[((bn * c + ci) * h + iy) * w + ix] * wt[((ci * mg + mi) * kh + ky) * kw + kx];
                                }
                            }
                        }
                    }
                }
            }
        }
        let attrs = ConvTransposeAttrs {
            kernel_shape: vec![kh as i64, kw as i64],
            strides: st.iter().map(|&v| v as i64).collect(),
            pads: pd.iter().map(|&v| v as i64).collect(),
            dilations: dl.iter().map(|&v| v as i64).collect(),
            output_padding: op.iter().map(|&v| v as i64).collect(),
            output_shape: None,
            group: g as i64,
            auto_pad: AutoPad::NotSet,
        };
        let (xt, wt_t, bt) = (f32t(&[n, c, h, w], &x), f32t(&[c, mg, kh, kw], &wt), f32t(&[m], &b));
        for threads in [1, 2] {
            let ins = [Some(xt.view()), Some(wt_t.view()), Some(bt.view())];
            let got = eval(&Op::ConvTranspose(attrs.clone()), &ins, 1, threads).unwrap().swap_remove(0);
            assert_eq!(got.shape(), &[n, m, oh, ow], "case {i}");
            for (j, (a, e)) in got.as_f32().unwrap().iter().zip(&want).enumerate() {
                assert!((a - e).abs() < 1e-4, "case {i}, {threads} threads, cell {j}: {a} vs {e}");
            }
            // The fused epilogue equals the activation and affine applied afterwards.
            let post = Epilogue { act: FusedAct::LeakyRelu { alpha: 0.1 }, scale: 0.5, shift: -0.25 };
            let op = Op::ConvTransposeFused { convt: attrs.clone(), post };
            let got = eval(&op, &ins, 1, threads).unwrap().swap_remove(0);
            for (j, (a, e)) in got.as_f32().unwrap().iter().zip(&want).enumerate() {
                let e = crate::kernels::conv::act_scalar(post.act, *e) * post.scale + post.shift;
                assert!((a - e).abs() < 1e-4, "case {i} fused, {threads} threads, cell {j}: {a} vs {e}");
            }
        }
    }
}

#[test]
fn resize_split_across_threads_equals_one_thread() {
    use crate::graph::ResizeMode;
    // 13 planes upsampled 2× (linear and nearest): large enough to split across two threads.
    let x: Vec<f32> = (0..13 * 40 * 70).map(|i| ((i * 7919 % 1000) as f32) / 500.0 - 1.0).collect();
    let xt = f32t(&[1, 13, 40, 70], &x);
    let scales = f32t(&[4], &[1.0, 1.0, 2.0, 2.0]);
    for mode in [ResizeMode::Linear, ResizeMode::Nearest] {
        let attrs = resize_attrs(mode);
        let ins = [Some(xt.view()), None, Some(scales.view())];
        let one = eval(&Op::Resize(attrs.clone()), &ins, 1, 1).unwrap().swap_remove(0);
        let two = eval(&Op::Resize(attrs), &ins, 1, 2).unwrap().swap_remove(0);
        assert_eq!(one.shape(), &[1, 13, 80, 140]);
        assert_eq!(one.as_f32().unwrap(), two.as_f32().unwrap(), "{mode:?}");
    }
}

/// Rows of `k` values padded with zeros to a multiple of 32 (the q8 encodings' rows), and K'.
fn padded_rows<T: Copy + Default>(v: &[T], k: usize) -> (Vec<T>, usize) {
    let kp = k.next_multiple_of(32);
    let mut out = vec![T::default(); v.len() / k * kp];
    for (dst, src) in out.chunks_exact_mut(kp).zip(v.chunks_exact(k)) {
        dst[..k].copy_from_slice(src);
    }
    (out, kp)
}

/// An encoded weight's bytes held in u64s, so the parts read in place (f32 scales) are aligned.
/// `m` rows of `k` f32 weights stored as a convolution's q8 rows (`[M, K']`, K' = k rounded up to
/// 32), and the values the codes hold (`m × k`).
struct Q8Rows {
    words: Vec<u64>,
    len: usize,
    shape: [usize; 2],
    decoded: Vec<f32>,
}

impl Q8Rows {
    fn new(wt: &[f32], m: usize, k: usize) -> Self {
        let (padded, kp) = padded_rows(wt, k);
        let enc = crate::weights::q8::encode(&padded, m, kp);
        let decoded = enc
            .view()
            .q
            .chunks_exact(kp)
            .zip(enc.view().scales)
            .flat_map(|(r, &sc)| r[..k].iter().map(move |&v| v as f32 * sc))
            .collect();
        let bytes = enc.to_bytes();
        Q8Rows { words: aligned(&bytes), len: bytes.len(), shape: [m, kp], decoded }
    }

    fn view(&self) -> crate::tensor::View<'_> {
        crate::tensor::View {
            dtype: crate::tensor::DType::F32,
            shape: &self.shape,
            bytes: &bytemuck::cast_slice(&self.words)[..self.len],
            encoding: crate::weights::TensorEncoding::Q8 { transposed: false },
        }
    }
}

fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
    words
}

/// An LSTM whose W and R are int8 codes in q8 panels `[K', D·4H]` (K' = K rounded up to 32, as
/// the converter keeps `DynamicQuantizeLSTM`'s codes) gives the outputs of the same LSTM on the
/// codes' f32 values, within the rounding of its int8 activations: both directions, K and H not
/// multiples of 32 (padded), several rows per step, every kernel set (`ACORN_KERNELS`, and
/// aarch64 under qemu). A weight that is not whole panels per direction is an error.
#[test]
fn lstm_on_q8_panels_matches_its_f32_values() {
    use crate::graph::{LstmAttrs, RnnDirection};
    use crate::weights::{q8, TensorEncoding};
    let (s, b, k, h, d) = (5usize, 3usize, 20usize, 8usize, 2usize);
    let g4 = 4 * h;
    let codes = |n: usize, seed: u64| -> Vec<i8> {
        crate::kernels::pseudo_random(n, seed).iter().map(|v| (v * 127.0).round() as i8).collect()
    };
    // Codes [D, 4H, K] (ONNX's LSTM order) and one scale per direction and gate row.
    let (wq, rq) = (codes(d * g4 * k, 1), codes(d * g4 * h, 2));
    let scales: Vec<f32> = (0..d * g4).map(|j| 0.004 + 0.0001 * (j % 7) as f32).collect();
    let dense = |q: &[i8], kk: usize| -> Tensor {
        let v = q.iter().enumerate().map(|(i, &c)| c as f32 * scales[i / kk]).collect();
        Tensor::from_f32(vec![d, g4, kk], v)
    };
    // The q8 panels: D·4H columns of K' codes, padded with 0.
    let panels = |q: &[i8], kk: usize| -> (Vec<u64>, Vec<usize>) {
        let (rows, kp) = padded_rows(q, kk);
        (aligned(&q8::panel_bytes(&rows, &scales, d * g4, kp, 32)), vec![kp, d * g4])
    };
    let x = f32t(&[s, b, k], &crate::kernels::pseudo_random(s * b * k, 3));
    let bias = f32t(&[d, 8 * h], &crate::kernels::pseudo_random(d * 8 * h, 4));
    let h0 = f32t(&[d, b, h], &crate::kernels::pseudo_random(d * b * h, 5));
    let op = Op::Lstm(LstmAttrs {
        hidden_size: h as i64,
        direction: RnnDirection::Bidirectional,
        layout: 0,
        clip: None,
        input_forget: false,
    });
    let (wd, rd) = (dense(&wq, k), dense(&rq, h));
    let want = run(op.clone(), &[Some(&x), Some(&wd), Some(&rd), Some(&bias), None, Some(&h0)]);
    let ((wp, ws), (rp, rs)) = (panels(&wq, k), panels(&rq, h));
    fn q8view<'a>(words: &'a [u64], shape: &'a [usize]) -> crate::tensor::View<'a> {
        crate::tensor::View {
            dtype: crate::tensor::DType::F32,
            shape,
            bytes: bytemuck::cast_slice(words),
            encoding: TensorEncoding::Q8Panels { nr: 32 },
        }
    }
    let ins =
        [Some(x.view()), Some(q8view(&wp, &ws)), Some(q8view(&rp, &rs)), Some(bias.view()), None, Some(h0.view())];
    let got = eval(&op, &ins, 3, 1).unwrap_or_else(|e| panic!("{}", e.message()));
    for (g, w) in got.iter().zip(&want) {
        let (g, w) = (g.as_f32().unwrap(), w.as_f32().unwrap());
        let worst = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 2e-2, "int8 LSTM differs from its f32 values by {worst}");
        let close = g.iter().zip(w).filter(|(a, b)| (*a - *b).abs() < 5e-3).count();
        assert!(close * 10 >= g.len() * 9, "{close} of {} values within 5e-3", g.len());
    }
    // Another hidden size than the panels hold: an error, not a read past them.
    let Op::Lstm(attrs) = &op else { unreachable!() };
    let bad = Op::Lstm(LstmAttrs { hidden_size: 6, ..attrs.clone() });
    let r6 = f32t(&[d, 24, 6], &vec![0.0; d * 24 * 6]);
    assert!(eval(&bad, &[Some(x.view()), Some(q8view(&wp, &ws)), Some(r6.view())], 1, 1).is_err());
    // No inputs per step (K = 0) with q8 weights: an error, not a division by zero.
    let (x0, w0, w0s) = (f32t(&[s, b, 0], &[]), vec![0u64; 64], [0usize, d * g4]);
    assert!(eval(&op, &[Some(x0.view()), Some(q8view(&w0, &w0s)), Some(q8view(&rp, &rs))], 1, 1).is_err());
}

/// A batch of convolutions with small outputs on q8 weights (rows `[M, K']`, K' padded to 32)
/// runs as one int8 product over the batch (`batch_folded`, 80 rows): the same outputs as the
/// direct loop on the codes' f32 values, within the int8 rounding of the inputs, on every kernel
/// set — and one image alone (4 rows: the f32 product on the decoded codes) agrees with it.
#[test]
fn batched_q8_convolutions_fold_into_one_product() {
    let (n, c, w, m, kw) = (20usize, 9usize, 4usize, 20usize, 3usize);
    let k = c * kw;
    let wt: Vec<f32> = crate::kernels::pseudo_random(m * k, 7).iter().map(|v| v * 0.3).collect();
    let rows = Q8Rows::new(&wt, m, k);
    let (wview, decoded) = (rows.view(), &rows.decoded);
    let x: Vec<f32> = crate::kernels::pseudo_random(n * c * w, 8);
    let b: Vec<f32> = crate::kernels::pseudo_random(m, 9);
    let (want, oshape) = conv_direct(&x, [n, c, 1, w], decoded, [m, c, 1, kw], &b, [1, 1], [0, 1, 0, 1], [1, 1], 1);
    let attrs = ConvAttrs {
        kernel_shape: vec![1, kw as i64],
        strides: vec![1, 1],
        pads: vec![0, 1, 0, 1],
        dilations: vec![1, 1],
        group: 1,
        auto_pad: AutoPad::NotSet,
    };
    let (xt, bt) = (f32t(&[n, c, 1, w], &x), f32t(&[m], &b));
    let got = eval(&Op::Conv(attrs.clone()), &[Some(xt.view()), Some(wview), Some(bt.view())], 1, 1)
        .unwrap_or_else(|e| panic!("{}", e.message()))
        .swap_remove(0);
    assert_eq!(got.shape(), &oshape);
    let got = got.as_f32().unwrap();
    let worst = got.iter().zip(&want).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
    assert!(worst < 0.05, "folded int8 convolution is {worst} from the direct loop");
    // Image 2 alone (the per-image path) gives its slice of the batch's outputs.
    let one = f32t(&[1, c, 1, w], &x[2 * c * w..3 * c * w]);
    let alone = eval(&Op::Conv(attrs.clone()), &[Some(one.view()), Some(wview), Some(bt.view())], 1, 1)
        .unwrap_or_else(|e| panic!("{}", e.message()))
        .swap_remove(0);
    let per = m * oshape[3];
    let d =
        alone.as_f32().unwrap().iter().zip(&got[2 * per..3 * per]).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
    assert!(d < 0.05, "one image alone is {d} from its slice of the folded batch");
    // Weight rows shorter than a pixel's inputs (12 channels × 3 taps > 32): an error on both
    // folded paths (the batch's 80 rows in int8, one image's 4 in f32), not a read past a row.
    let x12 = f32t(&[n, 12, 1, w], &crate::kernels::pseudo_random(n * 12 * w, 10));
    let one12 = f32t(&[1, 12, 1, w], &crate::kernels::pseudo_random(12 * w, 10));
    for xt in [&x12, &one12] {
        assert!(eval(&Op::Conv(attrs.clone()), &[Some(xt.view()), Some(wview), Some(bt.view())], 1, 1).is_err());
    }
}

/// `ConvStaticQ8` computes `post(Conv(dq(q(x)), W) + B)` with the model's `QuantizeLinear`
/// (`clamp(round_half_even(x / scale) + zero, −128, 127)`) on every path: f32 weights (grouped,
/// 1×1 and depthwise too: the input quantized as the kernels lay it out), q8 rows on the int8 kernels (one image; a batch folded into one int8
/// product; few rows folded in f32; one input channel read in place), with a fused ReLU (a
/// Swish on the large planes, whose requantization is looked up per code) and zero points of
/// either sign. A scale that is not a quantization is an error.
#[test]
fn static_input_convolutions_follow_their_definition() {
    // (N, C, H, W, M, kh, kw, stride, pads [t, l, b, r], group)
    let cases = [
        (1, 16, 9, 11, 24, 3, 3, [1, 1], [1, 1, 1, 1], 1),
        (20, 9, 1, 4, 20, 1, 3, [1, 1], [0, 1, 0, 1], 1),
        (1, 9, 1, 4, 20, 1, 3, [1, 1], [0, 1, 0, 1], 1),
        (2, 1, 1, 256, 40, 1, 64, [1, 32], [0, 0, 0, 0], 1),
        (1, 8, 7, 7, 8, 3, 3, [2, 2], [1, 1, 1, 1], 8),
        (1, 8, 6, 5, 12, 3, 1, [1, 1], [1, 0, 1, 0], 2),
        // 1×1 (its input otherwise read in place), depthwise wide enough for the register
        // tiles, at stride 1 and 2
        (2, 16, 5, 9, 24, 1, 1, [1, 1], [0, 0, 0, 0], 1),
        (1, 6, 5, 37, 6, 3, 3, [1, 1], [1, 1, 1, 1], 6),
        (1, 4, 7, 70, 4, 3, 3, [2, 2], [1, 1, 1, 1], 4),
        // planes of more than 2048 outputs with a Swish: the requantization looked up per code
        // (GEMM, grouped, depthwise)
        (1, 3, 48, 48, 5, 3, 3, [1, 1], [1, 1, 1, 1], 1),
        (1, 4, 46, 50, 6, 3, 3, [1, 1], [1, 1, 1, 1], 2),
        (1, 4, 45, 47, 4, 3, 3, [1, 1], [1, 1, 1, 1], 4),
    ];
    for (i, &(n, c, h, w, m, kh, kw, stride, pads, group)) in cases.iter().enumerate() {
        let cg = c / group;
        let k = cg * kh * kw;
        let wt: Vec<f32> = crate::kernels::pseudo_random(m * k, 70 + i as u64).iter().map(|v| v * 0.3).collect();
        let x = crate::kernels::pseudo_random(n * c * h * w, 80 + i as u64);
        let b = crate::kernels::pseudo_random(m, 90 + i as u64);
        let attrs = ConvAttrs {
            kernel_shape: vec![kh as i64, kw as i64],
            strides: stride.iter().map(|&s| s as i64).collect(),
            pads: vec![pads[0] as i64, pads[1] as i64, pads[2] as i64, pads[3] as i64],
            dilations: vec![1, 1],
            group: group as i64,
            auto_pad: AutoPad::NotSet,
        };
        // (Swish on the planes of more than 2048 outputs: a requantization looked up)
        let act = if h * w > 2048 { FusedAct::Swish } else { FusedAct::Relu };
        let post = Epilogue { act, ..Epilogue::NONE };
        // q8 rows (ungrouped cases only) and the values they hold.
        let rows = Q8Rows::new(&wt, m, k);
        let (qview, decoded) = (rows.view(), &rows.decoded);
        let wf = f32t(&[m, cg, kh, kw], &wt);
        let (xt, bt) = (f32t(&[n, c, h, w], &x), f32t(&[m], &b));
        let scale = x.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 200.0;
        for zero in [-7i32, 0, 100] {
            let dq: Vec<f32> = x
                .iter()
                .map(|&v| (((v / scale).round_ties_even() as i32 + zero).clamp(-128, 127) - zero) as f32 * scale)
                .collect();
            let weights: Vec<(crate::tensor::View<'_>, &[f32])> =
                if group == 1 { vec![(wf.view(), &wt), (qview, decoded)] } else { vec![(wf.view(), &wt)] };
            // Without and with the output's requantization (uint8, zero point 9) and a
            // per-channel affine after it.
            let requant = crate::graph::OutRequant {
                scale: 0.05,
                zero_point: 9,
                lo: 0,
                hi: 255,
                mul: (0..m).map(|j| 0.5 + 0.1 * j as f32).collect(),
                add: (0..m).map(|j| 0.03 * j as f32 - 0.2).collect(),
            };
            for (wv, values) in weights {
                for out in [None, Some(requant.clone())] {
                    let op = Op::ConvStaticQ8 { conv: attrs.clone(), post, scale, zero_point: zero, out: out.clone() };
                    let (mut want, oshape) =
                        conv_direct(&dq, [n, c, h, w], values, [m, cg, kh, kw], &b, stride, pads, [1, 1], group);
                    let plane = oshape[2] * oshape[3];
                    for (j, v) in want.iter_mut().enumerate() {
                        if let Some(r) = &out {
                            let ch = (j / plane) % m;
                            let q = ((*v / r.scale).round_ties_even() as i32 + r.zero_point).clamp(r.lo, r.hi);
                            *v = (q - r.zero_point) as f32 * r.scale * r.mul[ch] + r.add[ch];
                        }
                        *v = crate::kernels::conv::act_scalar(act, *v);
                    }
                    let top = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    // A requantized output may land one step away where the sums round a tie
                    // differently.
                    let step = out.as_ref().map_or(0.0, |r| r.scale * r.mul.iter().fold(0.0f32, |a, &v| a.max(v)));
                    for threads in [1, 2] {
                        let got = eval(&op, &[Some(xt.view()), Some(wv), Some(bt.view())], 1, threads)
                            .unwrap_or_else(|e| panic!("case {i}: {}", e.message()))
                            .swap_remove(0);
                        let got = got.as_f32().unwrap();
                        let tol = 2e-5 * (1.0 + top);
                        let off = got.iter().zip(&want).filter(|(a, e)| (*a - *e).abs() > tol).count();
                        let worst = got.iter().zip(&want).map(|(a, e)| (a - e).abs()).fold(0.0, f32::max);
                        assert!(
                            (off == 0 || (off * 100 <= want.len() && worst <= step * 1.001 + tol)),
                            "case {i}, zero {zero}, {} weights, requantized {}, {threads} threads: {off} off, worst {worst}",
                            wv.encoding,
                            out.is_some()
                        );
                    }
                }
            }
        }
        let bad = Op::ConvStaticQ8 { conv: attrs.clone(), post, scale: f32::NAN, zero_point: 0, out: None };
        assert!(eval(&bad, &[Some(xt.view()), Some(wf.view()), Some(bt.view())], 1, 1).is_err());
    }
}
