//! Fine-tuning (`acorn convert --train FILE --fine-tune-layers K`): the top K encoder layers and
//! a classification head trained together on the labelled utterances with AdamW (candle, in the
//! converter only: the runtime never carries a training crate), with a validation split and
//! early stopping; the updated weights go back into the graph, which is then converted as usual.
//!
//! The layers are found in the graph Acorn's passes leave for a post-LayerNorm BERT block:
//! `MatMul(x, Wqkv, b)` → `Split` → `Attention` → `MatMul(·, Wo, b)` → `Add(·, x)` →
//! `LayerNorm` → `MatMul(·, W1, b)` → `Gelu` → `MatMul(·, W2, b)` → `Add` → `LayerNorm`.
//! The layers below them stay frozen: their output is computed once per utterance by Acorn.

use std::time::Instant;

use acorn::graph::{Activation, Graph, Node, Op, ValueId};
use acorn::head::{self, FitOptions};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::heads::Labelled;
use crate::ir::Module;

/// One encoder block's weights (tensor indices into `Module::tensors`) and attributes.
#[derive(Clone, Debug)]
pub struct Block {
    /// The block's input (the residual stream).
    pub input: ValueId,
    /// Its output (after the second LayerNorm).
    pub output: ValueId,
    /// `[wqkv, bqkv, wo, bo, ln1_g, ln1_b, w1, b1, w2, b2, ln2_g, ln2_b]`.
    pub tensors: [usize; 12],
    /// LayerNorm epsilons.
    pub eps: [f32; 2],
    /// Attention heads and score scale.
    pub heads: usize,
    pub scale: Option<f32>,
    /// A fitted map `x + x·M + b` between the previous block's output and this block
    /// (`--drop-layers`' replacement of removed layers): `[M, b]`.
    pub map: Option<[usize; 2]>,
}

impl Block {
    /// Every tensor the block trains: its 12, then its map's 2.
    pub fn all_tensors(&self) -> Vec<usize> {
        self.tensors.iter().chain(self.map.iter().flatten()).copied().collect()
    }
}

struct Walk<'a> {
    g: &'a Graph,
    consts: std::collections::HashMap<ValueId, usize>,
}

impl<'a> Walk<'a> {
    fn producer(&self, v: ValueId) -> Option<&'a Node> {
        self.g.nodes.iter().find(|n| n.outputs.contains(&v))
    }
    fn readers(&self, v: ValueId) -> Vec<&'a Node> {
        self.g.nodes.iter().filter(|n| n.inputs.contains(&Some(v)) && !matches!(n.op, Op::Shape { .. })).collect()
    }
    fn only_reader(&self, v: ValueId, want: impl Fn(&Op) -> bool) -> Option<&'a Node> {
        match self.readers(v)[..] {
            [n] if want(&n.op) => Some(n),
            _ => None,
        }
    }
    fn tensor(&self, v: Option<ValueId>) -> Option<usize> {
        self.consts.get(&v?).copied()
    }
    /// `MatMul(x, W, b)` with W and b constants: (W, b).
    fn linear(&self, n: &Node) -> Option<(usize, usize)> {
        (n.op == Op::MatMul && n.inputs.len() == 3).then_some(())?;
        Some((self.tensor(n.inputs[1])?, self.tensor(n.inputs[2])?))
    }
    /// `LayerNorm(x, g, b)` over the last axis: (g, b, eps).
    fn layer_norm(&self, n: &Node) -> Option<(usize, usize, f32)> {
        let Op::LayerNorm { axis: -1, epsilon } = n.op else { return None };
        Some((self.tensor(*n.inputs.get(1)?)?, self.tensor(*n.inputs.get(2)?)?, epsilon))
    }
    /// The residual `Add(a, other)` reading `a`, and `other`.
    fn residual(&self, a: ValueId) -> Option<(&'a Node, ValueId)> {
        let add = self.only_reader(a, |op| *op == Op::Binary(acorn::graph::BinaryOp::Add))?;
        let other = add.inputs.iter().flatten().copied().find(|&v| v != a)?;
        Some((add, other))
    }

    fn block(&self, att: &Node) -> Option<Block> {
        let Op::Attention(attrs) = &att.op else { return None };
        let heads = attrs.q_num_heads? as usize;
        let split = self.producer(att.inputs.first().copied().flatten()?)?;
        if !matches!(split.op, Op::Split { .. })
            || (0..3).any(|i| att.inputs.get(i).copied().flatten() != split.outputs.get(i).copied())
        {
            return None;
        }
        let qkv = self.producer(split.inputs[0]?)?;
        let (wqkv, bqkv) = self.linear(qkv)?;
        let x = qkv.inputs[0]?;
        let o = self.only_reader(att.outputs[0], |op| *op == Op::MatMul)?;
        let (wo, bo) = self.linear(o)?;
        let (add1, res1) = self.residual(o.outputs[0])?;
        (res1 == x).then_some(())?;
        let ln1 = self.only_reader(add1.outputs[0], |op| matches!(op, Op::LayerNorm { .. }))?;
        let (g1, b1n, e1) = self.layer_norm(ln1)?;
        let h = ln1.outputs[0];
        let f1 = self.readers(h).into_iter().find(|n| n.op == Op::MatMul)?;
        let (w1, b1) = self.linear(f1)?;
        let gelu = self.only_reader(f1.outputs[0], |op| *op == Op::Activation(Activation::Gelu { tanh: false }))?;
        let f2 = self.only_reader(gelu.outputs[0], |op| *op == Op::MatMul)?;
        let (w2, b2) = self.linear(f2)?;
        let (add2, res2) = self.residual(f2.outputs[0])?;
        (res2 == h).then_some(())?;
        let ln2 = self.only_reader(add2.outputs[0], |op| matches!(op, Op::LayerNorm { .. }))?;
        let (g2, b2n, e2) = self.layer_norm(ln2)?;
        Some(Block {
            input: x,
            output: ln2.outputs[0],
            tensors: [wqkv, bqkv, wo, bo, g1, b1n, w1, b1, w2, b2, g2, b2n],
            eps: [e1, e2],
            heads,
            scale: attrs.scale,
            map: None,
        })
    }

    /// `v = Add(a, MatMul(a, M, b))` with `M`, `b` constants: `[M, b]`.
    fn map_between(&self, a: ValueId, v: ValueId) -> Option<[usize; 2]> {
        let add = self.producer(v)?;
        (add.op == Op::Binary(acorn::graph::BinaryOp::Add) && add.inputs.len() == 2).then_some(())?;
        let t = add.inputs.iter().flatten().copied().find(|&x| x != a)?;
        add.inputs.contains(&Some(a)).then_some(())?;
        let mm = self.producer(t)?;
        (mm.inputs.first().copied().flatten() == Some(a)).then_some(())?;
        let (w, b) = self.linear(mm)?;
        Some([w, b])
    }
}

/// The encoder's blocks, bottom up; an error (about `flag`) naming the first layer that is not a
/// post-LN BERT block as Acorn's passes fuse it.
pub fn encoder_blocks(m: &Module, flag: &str) -> Result<Vec<Block>> {
    let consts = m.graph.constants.iter().map(|c| (c.value, c.tensor as usize)).collect();
    let w = Walk { g: &m.graph, consts };
    let atts: Vec<&Node> = m.graph.nodes.iter().filter(|n| matches!(n.op, Op::Attention(_))).collect();
    if atts.is_empty() {
        bail!("{flag} needs a transformer encoder; this graph has no attention block");
    }
    let mut blocks: Vec<Block> = atts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            w.block(a).with_context(|| {
                format!(
                    "{flag}: encoder layer {} (attention node '{}') is not a post-LayerNorm BERT block \
                     (fused QKV MatMul with bias → Split → Attention → MatMul → Add → LayerNorm → MatMul → GELU → \
                     MatMul → Add → LayerNorm)",
                    i + 1,
                    a.name
                )
            })
        })
        .collect::<Result<_>>()?;
    // Blocks follow one another directly or through a fitted map; nothing else is trained.
    for i in 1..blocks.len() {
        let prev = blocks[i - 1].output;
        if blocks[i].input != prev {
            let map = w.map_between(prev, blocks[i].input).with_context(|| {
                format!(
                    "{flag}: encoder layer {} does not read layer {i}'s output, directly or through a fitted map \
                     x + x·M + b",
                    i + 1
                )
            })?;
            blocks[i].map = Some(map);
        }
    }
    let last = blocks.last().expect("an encoder with attention has blocks").output;
    if w.readers(last).iter().any(|n| w.map_between(last, n.outputs[0]).is_some()) {
        bail!(
            "{flag}: a fitted map follows the encoder's last block (its last layer was removed); it would not be \
             trained with the blocks — keep the last layer"
        );
    }
    Ok(blocks)
}

/// Trainable copies of the blocks' weights.
struct Trainable {
    vars: Vec<Vec<Var>>,
    blocks: Vec<Block>,
    head_w: Var,
    head_b: Var,
}

fn var_of(m: &Module, t: usize, dev: &Device) -> Result<Var> {
    let tensor = &m.tensors[t].1;
    let data = tensor.as_f32().with_context(|| format!("{} is not f32", m.tensors[t].0))?;
    Ok(Var::from_tensor(&Tensor::from_slice(data, tensor.shape(), dev)?)?)
}

fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let c = x.broadcast_sub(&mean)?;
    let var = c.sqr()?.mean_keepdim(D::Minus1)?;
    c.broadcast_div(&(var + eps as f64)?.sqrt()?)?.broadcast_mul(g)?.broadcast_add(b)
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_matmul(w)?.broadcast_add(b)
}

/// `blocks` on `x` [B, S, D] with the weights `vars` (each block's 12 tensors in
/// [`Block::tensors`] order): the last block's hidden state [B, S, D]. The attention width is
/// the QKV product's third (heads removed by pruning leave it below `D`).
pub(crate) fn blocks_forward(vars: &[Vec<Var>], blocks: &[Block], x: &Tensor) -> candle_core::Result<Tensor> {
    let mut each = blocks_forward_each(vars, blocks, x)?;
    Ok(each.pop().unwrap_or_else(|| x.clone()))
}

/// [`blocks_forward`] with every block's output, bottom up.
pub(crate) fn blocks_forward_each(vars: &[Vec<Var>], blocks: &[Block], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    let mut outs = Vec::with_capacity(blocks.len());
    let mut x = x.clone();
    let (b, s, _) = x.dims3()?;
    for (v, blk) in vars.iter().zip(blocks) {
        let t = |i: usize| v[i].as_tensor();
        if blk.map.is_some() {
            x = (linear(&x, t(12), t(13))? + &x)?;
        }
        let h = blk.heads;
        let w = t(0).dim(1)? / 3;
        let dh = w / h;
        let qkv = linear(&x, t(0), t(1))?;
        let split = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, i * w, w)?.reshape((b, s, h, dh))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, vv) = (split(0)?, split(1)?, split(2)?);
        let scale = blk.scale.unwrap_or(1.0 / (dh as f32).sqrt()) as f64;
        let p = candle_nn::ops::softmax(&(q.matmul(&k.t()?)? * scale)?, D::Minus1)?;
        let ctx = p.matmul(&vv)?.transpose(1, 2)?.contiguous()?.reshape((b, s, w))?;
        let a = linear(&ctx, t(2), t(3))?;
        let hh = layer_norm(&(a + &x)?, t(4), t(5), blk.eps[0])?;
        let f = linear(&linear(&hh, t(6), t(7))?.gelu_erf()?, t(8), t(9))?;
        x = layer_norm(&(f + &hh)?, t(10), t(11), blk.eps[1])?;
        outs.push(x.clone());
    }
    Ok(outs)
}

/// Trainable copies of `blocks`' weights in `m`.
pub(crate) fn block_vars(m: &Module, blocks: &[Block], dev: &Device) -> Result<Vec<Vec<Var>>> {
    blocks
        .iter()
        .map(|b| -> Result<Vec<Var>> { b.all_tensors().into_iter().map(|t| var_of(m, t, dev)).collect() })
        .collect()
}

impl Trainable {
    /// The blocks on `x` [B, S, D], then mean pooling and L2 normalisation: [B, D].
    fn embed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let pooled = blocks_forward(&self.vars, &self.blocks, x)?.mean(1)?;
        let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        pooled.broadcast_div(&norm)
    }

    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.embed(x)?.matmul(&self.head_w.as_tensor().t()?)?.broadcast_add(self.head_b.as_tensor())
    }
}

/// What fine-tuning reports.
pub struct FineTuned {
    /// (key, value) for the pass record.
    pub report: Vec<(String, f64)>,
}

/// Settings of [`fine_tune`].
pub struct FineTuneOptions {
    /// Encoder layers trained, from the top.
    pub layers: usize,
    /// Most passes over the training examples.
    pub max_epochs: usize,
    /// Epochs without a better validation accuracy before stopping.
    pub patience: usize,
    /// AdamW step size of the encoder layers (the head's is 20× it).
    pub learning_rate: f64,
}

impl Default for FineTuneOptions {
    fn default() -> Self {
        FineTuneOptions { layers: 2, max_epochs: 12, patience: 3, learning_rate: 5e-5 }
    }
}

/// Deterministic shuffling (xorshift).
pub(crate) fn shuffle<T>(v: &mut [T], seed: &mut u64) {
    for i in (1..v.len()).rev() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        v.swap(i, (*seed % (i as u64 + 1)) as usize);
    }
}

/// Trains the top `opts.layers` blocks and a head on `data` (token ids `ids`; the encoder's
/// embedding output and mask input; validation: the examples for which `val[i]`), writes the
/// best epoch's weights back into `m`.
pub fn fine_tune(
    m: &mut Module,
    data: &Labelled,
    ids: &[Vec<i64>],
    (output, mask): (&str, &str),
    val: &[bool],
    opts: &FineTuneOptions,
    progress: &crate::Progress,
) -> Result<FineTuned> {
    let t0 = Instant::now();
    let blocks = encoder_blocks(m, "--fine-tune-layers")?;
    let k = opts.layers;
    if k == 0 || k > blocks.len() {
        bail!("--fine-tune-layers {k}: the encoder has {} layers", blocks.len());
    }
    let top = blocks[blocks.len() - k..].to_vec();
    // The frozen part, once: the hidden state entering the first trained block, per utterance.
    let input = top[0].input;
    let mut graph = m.graph.clone();
    let name = m.graph.values[input as usize].name.clone();
    graph.outputs.push(acorn::IoSpec { name: name.clone(), value: input, dtype: acorn::DType::F32, dims: None });
    let model = crate::heads::runnable_graph(m, graph)?;
    let states = crate::heads::hidden_states(&model, ids, &name, mask, progress)?;
    let d = states[0].len() / ids[0].len();
    let dev = Device::Cpu;
    let y: Vec<u32> = data.rows.iter().map(|(c, _)| *c as u32).collect();
    // Utterances grouped by token count (no padding), in batches of at most 16.
    let batches = |validation: bool| -> Vec<Vec<usize>> {
        let mut idx: Vec<usize> = (0..ids.len()).filter(|&i| val[i] == validation).collect();
        idx.sort_by_key(|&i| ids[i].len());
        idx.chunk_by(|&a, &b| ids[a].len() == ids[b].len()).flat_map(|g| g.chunks(16).map(|c| c.to_vec())).collect()
    };
    let (mut train, valid) = (batches(false), batches(true));
    let input_of = |batch: &[usize]| -> candle_core::Result<Tensor> {
        let s = ids[batch[0]].len();
        let data: Vec<f32> = batch.iter().flat_map(|&i| states[i].iter().copied()).collect();
        Tensor::from_vec(data, (batch.len(), s, d), &dev)
    };
    let labels_of =
        |batch: &[usize]| Tensor::from_vec(batch.iter().map(|&i| y[i]).collect::<Vec<u32>>(), batch.len(), &dev);
    let vars = block_vars(m, &top, &dev)?;
    let c = data.labels.len();
    let mut net = Trainable {
        vars,
        blocks: top.clone(),
        head_w: Var::zeros((c, d), DType::F32, &dev)?,
        head_b: Var::zeros(c, DType::F32, &dev)?,
    };
    // The head starts as softmax regression on the frozen embeddings (the "before" accuracy).
    let embed_all = |net: &Trainable, batches: &[Vec<usize>]| -> Result<(Vec<f32>, Vec<usize>)> {
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for b in batches {
            xs.extend(net.embed(&input_of(b)?)?.flatten_all()?.to_vec1::<f32>()?);
            ys.extend(b.iter().map(|&i| y[i] as usize));
        }
        Ok((xs, ys))
    };
    let (fx, fy) = embed_all(&net, &train)?;
    let (vx, vy) = embed_all(&net, &valid)?;
    // The trained copy must compute what the graph computes: its embeddings of the validation
    // utterances against Acorn's (a block read wrong would be trained as another network).
    let order: Vec<usize> = valid.iter().flatten().copied().collect();
    let vids: Vec<Vec<i64>> = order.iter().map(|&i| ids[i].clone()).collect();
    let (acorn_emb, _) = crate::heads::embed(&model, &vids, &[output.to_string()], mask, progress)?;
    let worst = acorn_emb[0]
        .chunks_exact(d)
        .zip(vx.chunks_exact(d))
        .map(|(a, b)| {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / (n(a) * n(b)).max(1e-12)
        })
        .fold(1.0f32, f32::min);
    if worst < 0.999 {
        bail!(
            "--fine-tune-layers: the trainable copy of the top {k} layers does not reproduce the model's embeddings \
             (lowest cosine {worst:.5}); the encoder's output is not the mean-pooled, normalised last layer"
        );
    }
    let frozen =
        head::fit_softmax(&fx, d, &fy, data.labels.clone(), &FitOptions { l2: 1e-4, ..FitOptions::default() })?;
    let before = head::accuracy(&frozen, &vx, &vy)?;
    net.head_w = Var::from_tensor(&Tensor::from_vec(frozen.weight.clone(), (c, d), &dev)?)?;
    net.head_b = Var::from_tensor(&Tensor::from_vec(frozen.bias.clone(), c, &dev)?)?;
    let accuracy = |net: &Trainable| -> Result<(f64, f64)> {
        let (mut right, mut loss, mut n) = (0usize, 0.0f64, 0usize);
        for b in &valid {
            let logits = net.logits(&input_of(b)?)?;
            loss +=
                candle_nn::loss::cross_entropy(&logits, &labels_of(b)?)?.to_scalar::<f32>()? as f64 * b.len() as f64;
            let pred = logits.argmax(1)?.to_vec1::<u32>()?;
            right += pred.iter().zip(b).filter(|(p, &i)| **p == y[i]).count();
            n += b.len();
        }
        Ok((right as f64 / n as f64, loss / n as f64))
    };
    let encoder_vars: Vec<Var> = net.vars.iter().flatten().cloned().collect();
    let params = |lr: f64| ParamsAdamW { lr, weight_decay: 0.01, ..ParamsAdamW::default() };
    let mut opt_enc = AdamW::new(encoder_vars, params(opts.learning_rate))?;
    let mut opt_head = AdamW::new(vec![net.head_w.clone(), net.head_b.clone()], params(opts.learning_rate * 20.0))?;
    let snapshot = |net: &Trainable| -> Result<Vec<Vec<f32>>> {
        net.vars.iter().flatten().map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect()
    };
    let (start_acc, start_loss) = accuracy(&net)?;
    let mut best = (start_acc, -start_loss, 0usize, snapshot(&net)?);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut epochs = 0;
    let mut last_loss = 0.0;
    for epoch in 1..=opts.max_epochs {
        shuffle(&mut train, &mut seed);
        let mut total = 0.0f64;
        for (bi, b) in train.iter().enumerate() {
            let loss = candle_nn::loss::cross_entropy(&net.logits(&input_of(b)?)?, &labels_of(b)?)?;
            total += loss.to_scalar::<f32>()? as f64 * b.len() as f64;
            let grads = loss.backward()?;
            opt_enc.step(&grads)?;
            opt_head.step(&grads)?;
            progress.report(&format!("fine-tuning epoch {epoch}"), bi as u64 + 1, train.len() as u64);
        }
        last_loss = total / fy.len() as f64;
        epochs = epoch;
        let (acc, vloss) = accuracy(&net)?;
        // Better accuracy, or the same with a lower validation loss.
        if (acc, -vloss) > (best.0, best.1) {
            best = (acc, -vloss, epoch, snapshot(&net)?);
        } else if epoch - best.2 >= opts.patience {
            break;
        }
    }
    // The best epoch's weights back into the graph's tensors.
    let (best_acc, _, best_epoch, weights) = best;
    for (blk, w) in top.iter().flat_map(|b| b.all_tensors()).zip(weights) {
        let shape = m.tensors[blk].1.shape().to_vec();
        m.tensors[blk].1 = acorn::Tensor::from_f32(shape, w);
    }
    Ok(FineTuned {
        report: vec![
            ("fine_tune_layers".into(), k as f64),
            ("fine_tune_copy_min_cosine".into(), worst as f64),
            ("fine_tune_validation_accuracy_before".into(), before),
            ("fine_tune_validation_accuracy_after".into(), best_acc),
            ("fine_tune_epochs".into(), epochs as f64),
            ("fine_tune_best_epoch".into(), best_epoch as f64),
            ("fine_tune_last_train_loss".into(), last_loss),
            ("fine_tune_seconds".into(), t0.elapsed().as_secs_f64()),
        ],
    })
}
