//! `x · Wᵀ` through a frozen weight. candle's matmul gradient computes the gradient of both
//! operands even when one is a constant; for a frozen base model that wasted product is a third
//! of all training work. This op gives the gradient of `x` only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// (out, in)
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // candle's own CPU matmul on the storages: no copy of the input or the output.
        let (m, k) = layout.shape().dims2()?;
        let wt = self.weight.t()?;
        let n = wt.dim(1)?;
        let (guard, w_layout) = wt.storage_and_layout();
        let Storage::Cpu(w) = &*guard else { candle_core::bail!("frozen-matmul: the weight is not on the CPU") };
        let out = storage.matmul(w, (1, m, n, k), layout, w_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `x` (tokens × in) times the transpose of the frozen `weight` (out × in), differentiable in `x`
/// only. On devices other than the CPU, or for inputs that track no gradient, a plain matmul.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !x.track_op() || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return x.matmul(&weight.t()?);
    }
    x.contiguous()?.apply_op1(FrozenMatmul { weight: weight.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn same_value_and_input_gradient_as_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 4)).unwrap();
        let x = Var::from_tensor(&(Tensor::arange(0f32, 8.0, &dev).unwrap().reshape((2, 4)).unwrap() * 0.5).unwrap()).unwrap();
        let plain = x.matmul(&w.t().unwrap()).unwrap();
        let frozen = frozen_matmul(&x, &w).unwrap();
        assert_eq!(plain.to_vec2::<f32>().unwrap(), frozen.to_vec2::<f32>().unwrap());
        let g1 = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(g1.get(&x).unwrap().to_vec2::<f32>().unwrap(), g2.get(&x).unwrap().to_vec2::<f32>().unwrap());
        assert!(g2.get(&w).is_none());
    }
}
