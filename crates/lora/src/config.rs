//! What an adapter is (rank, alpha, target modules, base model) and how it is trained.

use crate::{LoraError, Result};
use serde::{Deserialize, Serialize};

/// The linear maps of a LLaMA-family layer that can carry an adapter, in PEFT's names.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The PEFT path of a module inside a layer (`self_attn.q_proj`, `mlp.up_proj`).
pub fn module_path(module: usize) -> String {
    let block = if module < 4 { "self_attn" } else { "mlp" };
    format!("{block}.{}", MODULES[module])
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Names from [`MODULES`], in that order, without repeats.
    pub target_modules: Vec<String>,
    /// The registered name of the base model.
    pub base_model: String,
}

pub const MAX_RANK: usize = 256;

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > MAX_RANK {
            return Err(LoraError::Invalid(format!("rank must be between 1 and {MAX_RANK}, got {}", self.rank)));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0 && self.alpha <= 4096.0) {
            return Err(LoraError::Invalid(format!("alpha must be positive and at most 4096, got {}", self.alpha)));
        }
        if self.target_modules.is_empty() {
            return Err(LoraError::Invalid("target_modules is empty".into()));
        }
        for m in &self.target_modules {
            if !MODULES.contains(&m.as_str()) {
                return Err(LoraError::Invalid(format!("unknown target module \"{m}\" (known: {})", MODULES.join(", "))));
            }
        }
        Ok(())
    }

    /// The modules as indexes into [`MODULES`], sorted, without repeats.
    pub fn module_indexes(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..MODULES.len()).filter(|&i| self.target_modules.iter().any(|m| m == MODULES[i])).collect();
        idx.dedup();
        idx
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// `adapter_config.json` as Hugging Face PEFT writes it. `base_model_name_or_path` is the
    /// Hub name when lorag knows it (the default models), else the registered name.
    pub fn to_peft(&self, hub_name: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": hub_name.unwrap_or(&self.base_model),
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": self.target_modules,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "init_lora_weights": true,
            "revision": null,
        })
    }

    /// Reads PEFT's `adapter_config.json` for the base model registered as `base_model`. Refuses
    /// what lorag would serve differently from PEFT (bias, rsLoRA, DoRA, fan_in_fan_out, extra
    /// saved modules, per-module ranks).
    pub fn from_peft(json: &serde_json::Value, base_model: &str) -> Result<LoraConfig> {
        let bad = |m: String| LoraError::Invalid(format!("adapter_config.json: {m}"));
        if let Some(t) = json.get("peft_type").and_then(|v| v.as_str()) {
            if t != "LORA" {
                return Err(bad(format!("peft_type is {t}, only LORA adapters are supported")));
            }
        }
        let rank = json.get("r").and_then(|v| v.as_u64()).ok_or_else(|| bad("no integer \"r\"".into()))? as usize;
        let alpha = json.get("lora_alpha").and_then(|v| v.as_f64()).ok_or_else(|| bad("no number \"lora_alpha\"".into()))?;
        let target_modules: Vec<String> = match json.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            Some(serde_json::Value::String(s)) => return Err(bad(format!("target_modules as a pattern (\"{s}\") is not supported; list the modules"))),
            _ => return Err(bad("no \"target_modules\" list".into())),
        };
        let flag = |k: &str| json.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        for k in ["use_rslora", "use_dora", "fan_in_fan_out"] {
            if flag(k) {
                return Err(bad(format!("{k} is set; lorag serves plain LoRA only")));
            }
        }
        if json.get("bias").and_then(|v| v.as_str()).is_some_and(|b| b != "none") {
            return Err(bad("bias is not \"none\"; lorag adapters carry no bias".into()));
        }
        if json.get("modules_to_save").is_some_and(|v| !v.is_null()) {
            return Err(bad("modules_to_save is set; lorag adapters hold LoRA weights only".into()));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if json.get(k).and_then(|v| v.as_object()).is_some_and(|o| !o.is_empty()) {
                return Err(bad(format!("{k} is set; lorag uses one rank and alpha for every module")));
            }
        }
        let mut config = LoraConfig { rank, alpha, target_modules, base_model: base_model.to_owned() };
        config.validate()?;
        config.target_modules = config.module_indexes().into_iter().map(|i| MODULES[i].to_owned()).collect();
        Ok(config)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Stop after this many optimiser steps even if epochs remain.
    pub max_steps: Option<usize>,
    pub learning_rate: f64,
    /// Tokens per training block (rows are packed end to end, separated by the end token).
    pub seq_len: usize,
    /// Blocks per optimiser step.
    pub batch_size: usize,
    pub seed: u64,
    /// Fraction of the steps spent warming the learning rate up linearly from 0.
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    /// Gradients are scaled down when their global L2 norm exceeds this.
    pub max_grad_norm: f64,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            epochs: 1,
            max_steps: None,
            learning_rate: 1e-3,
            seq_len: 256,
            batch_size: 4,
            seed: 0,
            warmup_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

pub const MAX_SEQ_LEN: usize = 8192;
pub const MAX_BATCH: usize = 256;
/// Tokens in one optimiser step (batch_size · seq_len): the logits and their gradient alone
/// take 8 bytes per token per vocabulary entry (≈ 3 GB at 8192 tokens for a 49k vocabulary).
pub const MAX_STEP_TOKENS: usize = 8192;
/// batch_size · seq_len², bounding the attention scores kept for the backward pass (per layer
/// and head: batch_size · seq_len² floats; ≈ 4.5 GB over SmolLM2's 30 layers at this bound).
pub const MAX_STEP_ATTENTION: usize = 1 << 21;

impl TrainConfig {
    /// Checks the ranges; `context` is the base model's context window.
    pub fn validate(&self, context: usize) -> Result<()> {
        let bad = |m: String| Err(LoraError::Invalid(m));
        if self.epochs == 0 || self.epochs > 1000 {
            return bad(format!("epochs must be between 1 and 1000, got {}", self.epochs));
        }
        if self.max_steps == Some(0) {
            return bad("max_steps must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return bad(format!("learning_rate must be in (0, 1], got {}", self.learning_rate));
        }
        let top = context.min(MAX_SEQ_LEN);
        if self.seq_len < 2 || self.seq_len > top {
            return bad(format!("seq_len must be between 2 and {top} (the model's context), got {}", self.seq_len));
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            return bad(format!("batch_size must be between 1 and {MAX_BATCH}, got {}", self.batch_size));
        }
        let tokens = self.batch_size * self.seq_len;
        if tokens > MAX_STEP_TOKENS || self.batch_size * self.seq_len * self.seq_len > MAX_STEP_ATTENTION {
            return bad(format!(
                "batch_size {} × seq_len {} needs more memory per step than lorag allows (at most {MAX_STEP_TOKENS} tokens per step, and batch_size · seq_len² at most {MAX_STEP_ATTENTION}); lower batch_size or seq_len",
                self.batch_size, self.seq_len
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!("warmup_ratio must be in [0, 1), got {}", self.warmup_ratio));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) || !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return bad("weight_decay must be ≥ 0 and max_grad_norm > 0".into());
        }
        Ok(())
    }

    /// The learning rate at `step` (0-based) of `total`: linear warm-up, then cosine decay to a
    /// tenth of the peak.
    pub fn learning_rate_at(&self, step: usize, total: usize) -> f64 {
        let total = total.max(1);
        let warmup = ((total as f64 * self.warmup_ratio).ceil() as usize).min(total - 1);
        if step < warmup {
            return self.learning_rate * (step + 1) as f64 / (warmup + 1) as f64;
        }
        let span = (total - warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        let floor = 0.1 * self.learning_rate;
        floor + (self.learning_rate - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora() -> LoraConfig {
        LoraConfig { rank: 8, alpha: 16.0, target_modules: vec!["v_proj".into(), "q_proj".into()], base_model: "m".into() }
    }

    #[test]
    fn validation_and_peft_round_trip() {
        assert!(lora().validate().is_ok());
        assert!(LoraConfig { rank: 0, ..lora() }.validate().is_err());
        assert!(LoraConfig { rank: 257, ..lora() }.validate().is_err());
        assert!(LoraConfig { alpha: f64::NAN, ..lora() }.validate().is_err());
        assert!(LoraConfig { target_modules: vec!["wq".into()], ..lora() }.validate().is_err());
        assert_eq!(lora().module_indexes(), vec![0, 2]);
        let json = lora().to_peft(Some("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert_eq!(json["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
        let back = LoraConfig::from_peft(&json, "m").unwrap();
        assert_eq!((back.rank, back.alpha, back.target_modules.clone()), (8, 16.0, vec!["q_proj".to_string(), "v_proj".into()]));
        let mut dora = json.clone();
        dora["use_dora"] = true.into();
        assert!(LoraConfig::from_peft(&dora, "m").is_err());
        let mut regex = json.clone();
        regex["target_modules"] = ".*proj".into();
        assert!(LoraConfig::from_peft(&regex, "m").is_err());
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let t = TrainConfig { learning_rate: 1.0, warmup_ratio: 0.1, ..TrainConfig::default() };
        let lr: Vec<f64> = (0..100).map(|s| t.learning_rate_at(s, 100)).collect();
        assert!(lr[0] < lr[5] && lr[5] < lr[9]);
        assert!((lr[10] - 1.0).abs() < 1e-9);
        assert!(lr.windows(2).skip(10).all(|w| w[1] <= w[0]));
        assert!(lr[99] >= 0.1 && lr[99] < 0.11);
        assert!(t.learning_rate_at(0, 1) > 0.0);
        assert!(TrainConfig { seq_len: 1, ..t.clone() }.validate(2048).is_err());
        assert!(TrainConfig { seq_len: 4096, ..t.clone() }.validate(2048).is_err());
        assert!(TrainConfig { learning_rate: 0.0, ..t.clone() }.validate(2048).is_err());
        assert!(TrainConfig { batch_size: 0, ..t.clone() }.validate(2048).is_err());
        assert!(TrainConfig { batch_size: 32, seq_len: 512, ..t.clone() }.validate(8192).is_err());
        assert!(TrainConfig { batch_size: 1, seq_len: 2048, ..t.clone() }.validate(8192).is_err());
        assert!(TrainConfig { batch_size: 8, seq_len: 256, ..t.clone() }.validate(8192).is_ok());
        assert!(TrainConfig { batch_size: 2, seq_len: 1024, ..t }.validate(8192).is_ok());
    }
}
