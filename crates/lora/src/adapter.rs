//! An adapter's weights and their Hugging Face PEFT form: `adapter_model.safetensors` with
//! tensors named `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (rank × in)
//! and `…lora_B.weight` (out × rank), beside an `adapter_config.json` ([`LoraConfig::to_peft`]).

use crate::config::{module_path, LoraConfig, MODULES};
use crate::{LoraError, Result};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// A and B of one adapted linear map.
#[derive(Clone)]
pub struct Pair {
    pub a: Tensor,
    pub b: Tensor,
}

#[derive(Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    /// Per layer, per module of [`MODULES`]: the pair, where the module is adapted.
    pub layers: Vec<[Option<Pair>; 7]>,
}

fn peft_name(layer: usize, module: usize, which: char) -> String {
    format!("base_model.model.model.layers.{layer}.{}.lora_{which}.weight", module_path(module))
}

/// Parses a PEFT tensor name into (layer, module, 'A' | 'B').
fn parse_name(name: &str) -> Option<(usize, usize, char)> {
    // PEFT writes "base_model.model.model.layers…"; some tools drop the "base_model.model." prefix.
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (path, which) = if let Some(p) = rest.strip_suffix(".lora_A.weight") {
        (p, 'A')
    } else {
        (rest.strip_suffix(".lora_B.weight")?, 'B')
    };
    let module = (0..MODULES.len()).find(|&m| module_path(m) == path)?;
    Some((layer, module, which))
}

impl Adapter {
    /// `x` (tokens × in) → its adapter term (tokens × out), or `None` where `module` of `layer` is
    /// not adapted.
    pub fn delta(&self, layer: usize, module: usize, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(pair) = self.layers.get(layer).and_then(|l| l[module].as_ref()) else { return Ok(None) };
        let low = x.matmul(&pair.a.t()?)?;
        Ok(Some((low.matmul(&pair.b.t()?)? * self.config.scale())?))
    }

    pub fn adapts(&self, layer: usize, module: usize) -> bool {
        self.layers.get(layer).is_some_and(|l| l[module].is_some())
    }

    /// Trainable parameters.
    pub fn parameters(&self) -> usize {
        self.layers.iter().flatten().flatten().map(|p| p.a.elem_count() + p.b.elem_count()).sum()
    }

    /// The weights as PEFT's `adapter_model.safetensors` (f32).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (l, modules) in self.layers.iter().enumerate() {
            for (m, pair) in modules.iter().enumerate() {
                if let Some(p) = pair {
                    tensors.push((peft_name(l, m, 'A'), p.a.to_dtype(DType::F32)?.contiguous()?));
                    tensors.push((peft_name(l, m, 'B'), p.b.to_dtype(DType::F32)?.contiguous()?));
                }
            }
        }
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::tensor::serialize(tensors, Some(meta)).map_err(|e| LoraError::Runtime(format!("writing safetensors: {e}")))
    }

    /// Reads PEFT safetensors for a model of `layers` layers whose module `m` maps
    /// `dims(m).0` inputs to `dims(m).1` outputs, checking every name and shape.
    pub fn from_safetensors(config: LoraConfig, bytes: &[u8], layers: usize, dims: impl Fn(usize) -> (usize, usize), device: &Device) -> Result<Adapter> {
        config.validate()?;
        let bad = |m: String| LoraError::Invalid(format!("adapter weights: {m}"));
        let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let wanted = config.module_indexes();
        let mut out: Vec<[Option<Pair>; 7]> = (0..layers).map(|_| Default::default()).collect();
        let mut halves: HashMap<(usize, usize), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (name, t) in tensors {
            let (layer, module, which) = parse_name(&name).ok_or_else(|| bad(format!("unexpected tensor \"{name}\"")))?;
            if layer >= layers {
                return Err(bad(format!("\"{name}\" is for layer {layer}, but the base model has {layers} layers")));
            }
            if !wanted.contains(&module) {
                return Err(bad(format!("\"{name}\" adapts {}, which target_modules does not list", MODULES[module])));
            }
            let (inp, outp) = dims(module);
            let expect = if which == 'A' { (config.rank, inp) } else { (outp, config.rank) };
            if t.dims2().ok() != Some(expect) {
                return Err(bad(format!("\"{name}\" has shape {:?}, the base model needs {expect:?} at rank {}", t.dims(), config.rank)));
            }
            let t = t.to_dtype(DType::F32)?;
            let e = halves.entry((layer, module)).or_default();
            if which == 'A' { e.0 = Some(t) } else { e.1 = Some(t) }
        }
        if halves.is_empty() {
            return Err(bad("no LoRA tensors".into()));
        }
        for ((layer, module), (a, b)) in halves {
            match (a, b) {
                (Some(a), Some(b)) => out[layer][module] = Some(Pair { a, b }),
                _ => return Err(bad(format!("layer {layer} {} has only one of lora_A and lora_B", MODULES[module]))),
            }
        }
        Ok(Adapter { config, layers: out })
    }
}

/// Hex sha256 of bytes (adapters are cached and compared by it).
pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_with_peft_names_and_checks() {
        let dev = Device::Cpu;
        let config = LoraConfig { rank: 2, alpha: 4.0, target_modules: vec!["q_proj".into(), "down_proj".into()], base_model: "m".into() };
        let dims = |m: usize| if m == 6 { (8, 4) } else { (4, 4) };
        let mut layers: Vec<[Option<Pair>; 7]> = (0..3).map(|_| Default::default()).collect();
        for (l, layer) in layers.iter_mut().enumerate() {
            for m in [0usize, 6] {
                let (i, o) = dims(m);
                let a = Tensor::arange(0f32, (2 * i) as f32, &dev).unwrap().reshape((2, i)).unwrap();
                let b = (Tensor::ones((o, 2), DType::F32, &dev).unwrap() * (l + 1) as f64).unwrap();
                layer[m] = Some(Pair { a, b });
            }
        }
        let adapter = Adapter { config: config.clone(), layers };
        assert_eq!(adapter.parameters(), 3 * (2 * 4 + 4 * 2 + 2 * 8 + 4 * 2));
        let bytes = adapter.to_safetensors().unwrap();
        let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(str::to_owned).collect();
        assert!(names.contains(&"base_model.model.model.layers.2.mlp.down_proj.lora_B.weight".to_string()));
        let back = Adapter::from_safetensors(config.clone(), &bytes, 3, dims, &dev).unwrap();
        let x = Tensor::ones((5, 4), DType::F32, &dev).unwrap();
        let d1 = adapter.delta(1, 0, &x).unwrap().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(back.delta(1, 0, &x).unwrap().unwrap().to_vec2::<f32>().unwrap(), d1);
        // scale · B·A·x: A·1 = [6, 22], B = 2 → 2·28 = 56, scale 2 → 112
        assert_eq!(d1[0], vec![112.0; 4]);
        assert!(back.delta(1, 2, &x).unwrap().is_none());
        // wrong rank, too few layers, a module not in the config, garbage
        let r4 = LoraConfig { rank: 4, ..config.clone() };
        assert!(Adapter::from_safetensors(r4, &bytes, 3, dims, &dev).is_err());
        assert!(Adapter::from_safetensors(config.clone(), &bytes, 2, dims, &dev).is_err());
        let q_only = LoraConfig { target_modules: vec!["q_proj".into()], ..config.clone() };
        assert!(Adapter::from_safetensors(q_only, &bytes, 3, dims, &dev).is_err());
        assert!(Adapter::from_safetensors(config, b"not safetensors", 3, dims, &dev).is_err());
    }
}
