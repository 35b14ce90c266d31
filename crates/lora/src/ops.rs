//! Differentiable versions of the fused operations a LLaMA layer needs (and a BERT layer, for the
//! cross-encoder's training). candle's fused RMS norm, layer norm, softmax and rotary embedding
//! run on all cores but have no gradient; their compositions from elementwise operations have one
//! but run on one core, many passes each. These run the fused forward and give the gradient in a
//! few fused or matrix operations. Cross-entropy and GELU are fused both ways (one pass, on all
//! cores).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

type Forward = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;
/// (input, output, gradient of the output) → gradient of the input
type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

struct WithGrad {
    name: &'static str,
    forward: Forward,
    backward: Backward,
}

/// `x` rebuilt as a plain tensor from a custom op's storage.
fn plain(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("needs a contiguous input") };
    Tensor::from_slice(&storage.as_slice::<f32>()?[start..end], layout.shape(), &candle_core::Device::Cpu)
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
    if !x.track_op() || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
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

/// Layer normalisation over the last dimension without the affine part: (x − mean) / σ.
pub fn normalize(x: &Tensor, eps: f32) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    let ones = Tensor::ones(n, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(n, x.dtype(), x.device())?;
    with_grad(
        x,
        "normalize",
        Box::new(move |x| candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, eps)),
        Box::new(move |x, y, g| {
            // dx = (g − mean(g) − y·mean(g·y)) / σ
            let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?.recip()?;
            let gm = g.mean_keepdim(D::Minus1)?;
            let gy = (g * y)?.mean_keepdim(D::Minus1)?;
            g.broadcast_sub(&gm)?.sub(&y.broadcast_mul(&gy)?)?.broadcast_mul(&r)
        }),
    )
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    with_grad(
        x,
        "softmax",
        Box::new(|x| candle_nn::ops::softmax_last_dim(&x.contiguous()?)),
        Box::new(|_x, y, g| {
            // dx = y·(g − Σ g·y)
            let dot = (g * y)?.sum_keepdim(D::Minus1)?;
            y * g.broadcast_sub(&dot)?
        }),
    )
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
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
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

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("needs a contiguous input") };
        let x = &s.as_slice::<f32>()?[start..end];
        // candle's own formula and erf, so that the values are candle's to the bit
        let y = map_elements(x, None, |x, _| (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use std::f32::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};
        let x = arg.detach().flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // d/dx x·Φ(x) = Φ(x) + x·φ(x), φ(x) = e^(−x²/2) / √(2π)
        let density = 0.5 * FRAC_1_SQRT_2 * FRAC_2_SQRT_PI;
        let dx = map_elements(&x, Some(&g), |x, g| {
            let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * FRAC_1_SQRT_2));
            g * (cdf + x * density * (-0.5 * x * x).exp())
        });
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
        let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("needs contiguous logits") };
        let (rows, vocab) = l.shape().dims2()?;
        let x = &s.as_slice::<f32>()?[start..end];
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
        let x = arg.detach().flatten_all()?.to_vec1::<f32>()?;
        let g = grad.to_vec1::<f32>()?;
        let mut dx = vec![0f32; rows * vocab];
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
        Ok(Some(Tensor::from_vec(dx, (rows, vocab), arg.device())?))
    }
}

/// Mean cross-entropy of `logits` (rows, vocab) against `targets` (rows,).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !logits.device().is_cpu() || logits.dtype() != candle_core::DType::F32 {
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
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let (cos, sin) = (Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap(), Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap());
        type F<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
        let cases: Vec<(F, F)> = vec![
            (Box::new(|x| rms_norm(x, &w, 1e-5).unwrap()), Box::new(|x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5).unwrap())),
            (Box::new(|x| softmax(x).unwrap()), Box::new(|x| candle_nn::ops::softmax(x, D::Minus1).unwrap())),
            (Box::new(|x| rope(x, &cos, &sin).unwrap()), Box::new(|x| candle_nn::rotary_emb::rope_slow(x, &cos, &sin).unwrap())),
            (Box::new(|x| gelu_erf(x).unwrap()), Box::new(|x| x.gelu_erf().unwrap())),
            (Box::new(|x| normalize(x, 1e-5).unwrap()), Box::new(|x| {
                let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
                xc.broadcast_div(&(xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap().sqrt().unwrap()).unwrap()
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
}
