//! Differentiable versions of the fused operations a LLaMA layer needs (and a BERT layer, for the
//! cross-encoder's training). candle's fused RMS norm, layer norm, softmax and rotary embedding
//! run on all cores but have no gradient; their compositions from elementwise operations have one
//! but run on one core, many passes each. These run the fused forward and give the gradient in a
//! few fused or matrix operations. Cross-entropy, GELU, softmax, layer norm and a linear layer with
//! its bias are fused both ways (one pass, on all cores): candle runs elementwise and broadcast
//! operations on one core, and every extra node of the graph costs its gradient a zero-filled
//! buffer and an addition besides.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

type Forward = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;
/// (input, output, gradient of the output) → gradient of the input
type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

struct WithGrad {
    name: &'static str,
    forward: Forward,
    backward: Backward,
}

/// The values of a custom op's input, which must be contiguous.
fn values<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("needs a contiguous input") };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// `f` of the values of `t` (made contiguous), read in place.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("needs a CPU tensor") };
    f(values(cpu, layout)?)
}

/// `x` rebuilt as a plain tensor from a custom op's storage.
fn plain(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    Tensor::from_slice(values(storage, layout)?, layout.shape(), &candle_core::Device::Cpu)
}

/// Whether the fused CPU version of an op applies to `x`.
fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn storage(t: Tensor) -> Result<(CpuStorage, Shape)> {
    let shape = t.shape().clone();
    Ok((CpuStorage::F32(t.flatten_all()?.to_vec1::<f32>()?), shape))
}

impl CustomOp1 for WithGrad {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        storage((self.forward)(&plain(s, l)?)?)
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(&arg.detach(), &res.detach(), grad)?))
    }
}

/// `forward(x)`, with `backward` as its gradient when `x` tracks one (CPU, f32).
fn with_grad(x: &Tensor, name: &'static str, forward: Forward, backward: Backward) -> Result<Tensor> {
    if !x.track_op() || !fused(x) {
        return forward(x);
    }
    x.contiguous()?.apply_op1(WithGrad { name, forward, backward })
}

/// RMS norm over the last dimension with the frozen `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let (w1, w2) = (weight.clone(), weight.clone());
    with_grad(
        x,
        "rms-norm",
        Box::new(move |x| candle_nn::ops::rms_norm(&x.contiguous()?, &w1, eps)),
        Box::new(move |x, _y, g| {
            // y = x·r·w, r = (mean x² + eps)^-½ → dx = r·(g·w) − x·r³·mean(g·w·x)
            let gw = g.broadcast_mul(&w2)?;
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?.recip()?;
            let dot = (&gw * x)?.mean_keepdim(D::Minus1)?;
            gw.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * dot)?)?
        }),
    )
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() || !fused(x) {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    x.contiguous()?.apply_op1(Softmax { scale: 1.0, mask: None })
}

/// Attention's softmax(scale · scores + mask) over the last dimension of `scores` (batch, ..., keys)
/// with an additive `mask` of batch × keys values (0 for a key to attend, a large negative number
/// for padding), shaped (batch, 1, ..., 1, keys) to broadcast over `scores`.
pub fn attention_softmax(scores: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    if !fused(scores) {
        return candle_nn::ops::softmax_last_dim(&(scores * scale)?.broadcast_add(mask)?.contiguous()?);
    }
    let (batch, keys) = (scores.dim(0)?, scores.dim(D::Minus1)?);
    let (rank, dims) = (scores.rank(), mask.dims());
    let fits = rank >= 2 && dims.len() == rank && dims[0] == batch && dims[rank - 1] == keys && dims[1..rank - 1].iter().all(|&d| d == 1);
    if !fits {
        candle_core::bail!("attention mask {:?} does not fit scores {:?}", mask.shape(), scores.shape());
    }
    let mask = mask.flatten_all()?.to_vec1::<f32>()?;
    scores.contiguous()?.apply_op1(Softmax { scale: scale as f32, mask: Some(mask) })
}

struct Softmax {
    scale: f32,
    /// batch × keys additive values; a row of scores takes its batch's
    mask: Option<Vec<f32>>,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(s, l)?;
        let keys = l.dims().last().copied().unwrap_or(1).max(1);
        // with a mask, scores are (batch, ..., keys): checked by attention_softmax
        let rows_per_batch = if self.mask.is_some() { (x.len() / keys / l.dims()[0].max(1)).max(1) } else { 1 };
        let mut y = vec![0f32; x.len()];
        for_rows(&mut y, keys, |r, row| {
            let x = &x[r * keys..(r + 1) * keys];
            let mask = self.mask.as_ref().map(|m| &m[(r / rows_per_batch) * keys..][..keys]);
            for (j, (o, &v)) in row.iter_mut().zip(x).enumerate() {
                *o = self.scale * v + mask.map_or(0.0, |m| m[j]);
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for o in row.iter_mut() {
                *o = (*o - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    /// dx = scale · y · (g − Σ g·y)
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let keys = res.dim(D::Minus1)?;
        let dx = with_values(res, |y| {
            with_values(grad, |g| {
                let mut dx = vec![0f32; y.len()];
                for_rows(&mut dx, keys, |r, row| {
                    let (y, g) = (&y[r * keys..(r + 1) * keys], &g[r * keys..(r + 1) * keys]);
                    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                    row.iter_mut().zip(y.iter().zip(g)).for_each(|(o, (y, g))| *o = self.scale * y * (g - dot));
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// Layer normalisation over the last dimension: (x − mean) / σ · `gamma` + `beta`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    if !fused(x) {
        return candle_nn::ops::layer_norm_slow(x, gamma, beta, eps);
    }
    x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, LayerNorm { eps })
}

struct LayerNorm {
    eps: f32,
}

impl LayerNorm {
    /// The mean and 1/σ of a row.
    fn moments(&self, x: &[f32]) -> (f32, f32) {
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (values(s1, l1)?, values(s2, l2)?, values(s3, l3)?);
        let cols = l1.dims().last().copied().unwrap_or(1);
        if gamma.len() != cols || beta.len() != cols {
            candle_core::bail!("layer norm of {:?} with gamma {:?} and beta {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let mut y = vec![0f32; x.len()];
        for_rows(&mut y, cols, |r, row| {
            let x = &x[r * cols..(r + 1) * cols];
            let (mean, rstd) = self.moments(x);
            for (((o, &v), g), b) in row.iter_mut().zip(x).zip(gamma).zip(beta) {
                *o = (v - mean) * rstd * g + b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    /// With n = (x − mean)/σ and dn = g·gamma: dx = (dn − mean(dn) − n·mean(dn·n)) / σ,
    /// dgamma = Σ g·n and dbeta = Σ g over the rows.
    fn bwd(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let cols = x.dim(D::Minus1)?;
        let (dx, dgamma, dbeta) = with_values(x, |xs| {
            with_values(gamma, |gamma| {
                with_values(grad, |g| {
                    let mut dx = vec![0f32; xs.len()];
                    let parts = for_rows_summing(&mut dx, cols, 2, |r, row, sums| {
                        let (x, g) = (&xs[r * cols..(r + 1) * cols], &g[r * cols..(r + 1) * cols]);
                        let (mean, rstd) = self.moments(x);
                        let (mut mean_dn, mut mean_dn_n) = (0f32, 0f32);
                        for j in 0..cols {
                            let (n, dn) = ((x[j] - mean) * rstd, g[j] * gamma[j]);
                            mean_dn += dn;
                            mean_dn_n += dn * n;
                            sums[0][j] += g[j] * n;
                            sums[1][j] += g[j];
                        }
                        (mean_dn, mean_dn_n) = (mean_dn / cols as f32, mean_dn_n / cols as f32);
                        for (j, o) in row.iter_mut().enumerate() {
                            let n = (x[j] - mean) * rstd;
                            *o = rstd * (g[j] * gamma[j] - mean_dn - n * mean_dn_n);
                        }
                    });
                    let [dgamma, dbeta]: [Vec<f32>; 2] = parts.try_into().expect("two sums");
                    Ok((dx, dgamma, dbeta))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            x.track_op().then(|| Tensor::from_vec(dx, x.shape(), dev)).transpose()?,
            gamma.track_op().then(|| Tensor::from_vec(dgamma, gamma.shape(), dev)).transpose()?,
            beta.track_op().then(|| Tensor::from_vec(dbeta, beta.shape(), dev)).transpose()?,
        ))
    }
}

/// A linear layer, `x` (rows, in) · `w`ᵀ (w: out, in) + `b` (out): one matrix product that starts
/// from the bias; its gradient two matrix products and a column sum.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return x.matmul(&w.t()?)?.broadcast_add(b);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (values(s1, l1)?, values(s2, l2)?, values(s3, l3)?);
        let ((rows, inner), (out, inner_w)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if inner != inner_w || b.len() != out {
            candle_core::bail!("linear layer of x {:?}, w {:?}, b {:?}: the shapes do not fit", l1.shape(), l2.shape(), l3.shape());
        }
        let mut y = vec![0f32; rows * out];
        for_rows(&mut y, out, |_, row| row.copy_from_slice(b));
        if y.is_empty() || inner == 0 {
            return Ok((CpuStorage::F32(y), Shape::from((rows, out))));
        }
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        // Safety: y is rows × out, x rows × inner and w out × inner, all row-major (checked above
        // and by `values`); y is borrowed mutably here alone. y(i, j) = 1·y(i, j) + 1·Σₖ x(i, k)·w(j, k),
        // the right-hand side being wᵀ read through its strides (k: 1, j: inner).
        unsafe {
            gemm::gemm(
                rows, out, inner,
                y.as_mut_ptr(), 1, out as isize, true,
                x.as_ptr(), 1, inner as isize,
                w.as_ptr(), inner as isize, 1,
                1.0, 1.0, false, false, false, parallelism,
            );
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
    /// dx = g·w, dw = gᵀ·x, db = Σ g over the rows.
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.track_op().then(|| grad.matmul(&w.detach())).transpose()?;
        let dw = w.track_op().then(|| grad.t()?.matmul(&x.detach())).transpose()?;
        let db = b
            .track_op()
            .then(|| {
                let cols = b.elem_count();
                let sums = with_values(&grad, |g| {
                    let mut none = vec![0f32; g.len()];
                    Ok(for_rows_summing(&mut none, cols, 1, |r, _, sums| {
                        sums[0].iter_mut().zip(&g[r * cols..(r + 1) * cols]).for_each(|(s, v)| *s += v);
                    }))
                })?;
                Tensor::from_vec(sums.into_iter().next().expect("one sum"), b.shape(), b.device())
            })
            .transpose()?;
        Ok((dx, dw, db))
    }
}

/// Rotary position embedding (the non-interleaved form of LLaMA) of `x` (b, heads, t, d) with
/// `cos`, `sin` (t, d/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (c1, s1, c2) = (cos.contiguous()?, sin.contiguous()?, cos.contiguous()?);
    let neg = sin.neg()?.contiguous()?;
    with_grad(
        x,
        "rope",
        Box::new(move |x| candle_nn::rotary_emb::rope(&x.contiguous()?, &c1, &s1)),
        // a rotation: its gradient is the rotation back
        Box::new(move |_x, _y, g| candle_nn::rotary_emb::rope(&g.contiguous()?, &c2, &neg)),
    )
}

/// GELU with the exact erf (BERT's `gelu`), both ways one pass over the elements on all cores:
/// candle's `gelu_erf` runs on one core, and its gradient is a dozen passes, erf among them.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GeluErf)
}

struct GeluErf;

/// Elements per task: enough that a task outweighs its scheduling.
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// `f` of every element of `xs` (with the same element of `gs`, when given), on all cores.
fn map_elements(xs: &[f32], gs: Option<&[f32]>, f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(ELEMENTS_PER_TASK).enumerate().for_each(|(i, o)| {
        let at = i * ELEMENTS_PER_TASK;
        let x = &xs[at..at + o.len()];
        match gs {
            Some(gs) => o.iter_mut().zip(x).zip(&gs[at..]).for_each(|((o, &x), &g)| *o = f(x, g)),
            None => o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x, 0.0)),
        }
    });
    out
}

/// Rows of `cols` values per task: at least [`ELEMENTS_PER_TASK`] values.
fn rows_per_task(cols: usize) -> usize {
    (ELEMENTS_PER_TASK / cols.max(1)).max(1)
}

/// `f(row index, row)` for every row of `cols` values of `out`, on all cores.
fn for_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.is_empty() {
        return; // also the case of rows of no values
    }
    let per = rows_per_task(cols);
    out.par_chunks_mut(cols * per).enumerate().for_each(|(t, rows)| {
        rows.chunks_mut(cols).enumerate().for_each(|(i, row)| f(t * per + i, row));
    });
}

/// [`for_rows`] where `f` also adds into `sums` column sums of `cols` values each: the sums of
/// every task are added in task order, so they come out the same whichever thread ran what.
fn for_rows_summing(out: &mut [f32], cols: usize, sums: usize, f: impl Fn(usize, &mut [f32], &mut [Vec<f32>]) + Sync) -> Vec<Vec<f32>> {
    if out.is_empty() {
        return vec![vec![0f32; cols]; sums];
    }
    let per = rows_per_task(cols);
    let parts: Vec<Vec<Vec<f32>>> = out
        .par_chunks_mut(cols * per)
        .enumerate()
        .map(|(t, rows)| {
            let mut part = vec![vec![0f32; cols]; sums];
            rows.chunks_mut(cols).enumerate().for_each(|(i, row)| f(t * per + i, row, &mut part));
            part
        })
        .collect();
    let mut total = vec![vec![0f32; cols]; sums];
    for part in parts {
        for (t, p) in total.iter_mut().zip(part) {
            t.iter_mut().zip(p).for_each(|(t, p)| *t += p);
        }
    }
    total
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(s, l)?;
        // candle's own formula and erf, so that the values are candle's to the bit
        let y = map_elements(x, None, |x, _| (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use std::f32::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};
        // d/dx x·Φ(x) = Φ(x) + x·φ(x), φ(x) = e^(−x²/2) / √(2π)
        let density = 0.5 * FRAC_1_SQRT_2 * FRAC_2_SQRT_PI;
        let dx = with_values(arg, |x| {
            with_values(grad, |g| {
                Ok(map_elements(x, Some(g), |x, g| {
                    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * FRAC_1_SQRT_2));
                    g * (cdf + x * density * (-0.5 * x * x).exp())
                }))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

struct CrossEntropy {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }
    /// logits (rows, vocab) → per-row loss (rows,)
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let x = values(s, l)?;
        let loss: Vec<f32> = x
            .par_chunks(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
                (max as f64 + sum.ln() - row[t as usize] as f64) as f32
            })
            .collect();
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = arg.dims2()?;
        let g = grad.to_vec1::<f32>()?;
        let mut dx = vec![0f32; rows * vocab];
        with_values(arg, |x| {
            dx.par_chunks_mut(vocab).zip(x.par_chunks(vocab)).zip(self.targets.par_iter().zip(g.par_iter())).for_each(
                |((d, row), (&t, &gr))| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for (o, &v) in d.iter_mut().zip(row) {
                        *o = (v - max).exp();
                        sum += *o;
                    }
                    let k = gr / sum;
                    for o in d.iter_mut() {
                        *o *= k;
                    }
                    d[t as usize] -= gr;
                },
            );
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dx, (rows, vocab), arg.device())?))
    }
}

/// Mean cross-entropy of `logits` (rows, vocab) against `targets` (rows,).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !fused(logits) {
        return candle_nn::loss::cross_entropy(logits, targets);
    }
    let targets = targets.to_vec1::<u32>()?;
    let vocab = logits.dim(1)?;
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target {t} is outside the vocabulary of {vocab}");
    }
    logits.contiguous()?.apply_op1(CrossEntropy { targets })?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < tol, "differ by {d}");
    }

    /// Each op: same value and same gradient as candle's composed (slow) version.
    #[test]
    fn fused_ops_match_the_composed_ones_in_value_and_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        let w2 = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        // padding of the last keys in the second batch
        let mask = Tensor::new(&[0f32, 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., -1e4, -1e4, -1e4], &dev).unwrap().reshape((2, 1, 1, 8)).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let (cos, sin) = (Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap(), Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap());
        type F<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
        let cases: Vec<(F, F)> = vec![
            (Box::new(|x| rms_norm(x, &w, 1e-5).unwrap()), Box::new(|x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5).unwrap())),
            (Box::new(|x| softmax(x).unwrap()), Box::new(|x| candle_nn::ops::softmax(x, D::Minus1).unwrap())),
            (Box::new(|x| rope(x, &cos, &sin).unwrap()), Box::new(|x| candle_nn::rotary_emb::rope_slow(x, &cos, &sin).unwrap())),
            (Box::new(|x| gelu_erf(x).unwrap()), Box::new(|x| x.gelu_erf().unwrap())),
            (Box::new(|x| layer_norm(x, &w, &w2, 1e-5).unwrap()), Box::new(|x| candle_nn::ops::layer_norm_slow(x, &w, &w2, 1e-5).unwrap())),
            (Box::new(|x| attention_softmax(x, 0.3, &mask).unwrap()), Box::new(|x| {
                candle_nn::ops::softmax(&(x * 0.3).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
            })),
        ];
        for (fast, slow) in cases {
            let (a, b) = (fast(&x), slow(&x));
            close(&a, &b, 1e-5);
            let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            close(ga.get(&x).unwrap(), gb.get(&x).unwrap(), 1e-4);
        }
        let logits = Var::from_tensor(&Tensor::randn(0f32, 3.0, (6, 11), &dev).unwrap()).unwrap();
        let t = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &dev).unwrap();
        let (a, b) = (cross_entropy(&logits, &t).unwrap(), candle_nn::loss::cross_entropy(&logits, &t).unwrap());
        close(&a, &b, 1e-5);
        let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
        close(ga.get(&logits).unwrap(), gb.get(&logits).unwrap(), 1e-5);
        assert!(cross_entropy(&logits, &Tensor::new(&[11u32, 0, 0, 0, 0, 0], &dev).unwrap()).is_err());
    }

    /// The ops with weights: the gradients of the weights too, and none for frozen ones.
    #[test]
    fn fused_linear_and_layer_norm_give_the_gradients_of_every_input() {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
        let (x, w, b, gamma, beta) = (var(&[37, 24]), var(&[19, 24]), var(&[19]), var(&[19]), var(&[19]));
        let probe = Tensor::randn(0f32, 1.0, (37, 19), &dev).unwrap();
        let fast = layer_norm(&linear(&x, &w, &b).unwrap(), &gamma, &beta, 1e-5).unwrap();
        let slow = candle_nn::ops::layer_norm_slow(&x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap(), &gamma, &beta, 1e-5).unwrap();
        close(&fast, &slow, 1e-4);
        let gf = (fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b, &gamma, &beta] {
            close(gf.get(v).unwrap(), gs.get(v).unwrap(), 1e-3);
        }
        // frozen weights get no gradient (nor its cost)
        let (wd, bd) = (w.as_tensor().detach(), b.as_tensor().detach());
        let g = (linear(&x, &wd, &bd).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&wd).is_none() && g.get(&bd).is_none() && g.get(&x).is_some());
        assert!(linear(&x, &var(&[19, 23]), &b).is_err());
        let empty = linear(&Tensor::zeros((0, 24), DType::F32, &dev).unwrap(), &w, &b).unwrap();
        assert_eq!(empty.dims(), &[0, 19]);
        let none = Var::zeros((0, 24), DType::F32, &dev).unwrap();
        let y = linear(&x, &none, &Var::zeros(0, DType::F32, &dev).unwrap()).unwrap();
        assert_eq!(y.dims(), &[37, 0]);
        assert!(y.sum_all().unwrap().backward().unwrap().get(&none).is_some());
        let scores = var(&[2, 3, 4, 0]);
        let p = attention_softmax(&scores, 1.0, &Tensor::zeros((2, 1, 1, 0), DType::F32, &dev).unwrap()).unwrap();
        assert!(p.sum_all().unwrap().backward().unwrap().get(&scores).is_some());
        // a mask must be (batch, 1, 1, keys): the same number of values in another shape is refused
        let scores = var(&[2, 3, 4, 4]);
        assert!(attention_softmax(&scores, 1.0, &Tensor::zeros((2, 1, 4, 1), DType::F32, &dev).unwrap()).is_err());
        assert!(attention_softmax(&scores, 1.0, &Tensor::zeros((2, 1, 1, 4), DType::F32, &dev).unwrap()).is_ok());
        assert!(layer_norm(&x, &gamma, &beta, 1e-5).is_err());
    }
}
