//! A BERT cross-encoder in candle: the encoder of a sentence-embedding model (MiniLM by
//! default) with Hugging Face's sequence-classification head (pooler on `[CLS]`, then one
//! logit), trained on (query, passage, label) pairs and saved as a Hugging Face folder
//! (`model.safetensors` with `BertForSequenceClassification` names, `config.json`, the
//! tokenizer) plus `model.onnx` for ONNX Runtime ([`crate::onnx`]).
//!
//! Training fine-tunes every encoder layer, the pooler and the head; the embedding tables stay
//! frozen (their gradient would be a 30522 × 384 scatter per step for little gain).

use crate::ModelError;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

/// What the cross-encoder needs of a BERT `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}

/// The weights of one encoder layer, by Hugging Face suffix (`attention.self.query.weight`, ...).
pub const LAYER_WEIGHTS: [&str; 16] = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];

/// Frozen embedding tables.
const FROZEN: [&str; 3] = [
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
];

pub struct CrossEncoder {
    pub config: BertConfig,
    /// Every weight by its `BertForSequenceClassification` name; trained ones are `Var`s.
    pub weights: BTreeMap<String, Var>,
    pub tokenizer: Tokenizer,
    pub max_tokens: usize,
    device: Device,
    /// While training: the weights that are trained (the rest enter the forward pass detached,
    /// so no gradient is computed for them). Otherwise empty: nothing is tracked.
    trained: std::collections::HashSet<String>,
}

/// Training settings of [`CrossEncoder::train`].
#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub epochs: usize,
    /// Encoder layers trained, from the top (the rest stay frozen); `None`: all.
    pub trainable_layers: Option<usize>,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub seed: u64,
    pub weight_decay: f64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings { epochs: 1, trainable_layers: None, learning_rate: 5e-5, batch_size: 16, seed: 0, weight_decay: 0.01 }
    }
}

/// After each optimiser step: (step, total steps, loss of the step, mean loss so far).
pub type StepReport<'a> = &'a mut dyn FnMut(usize, usize, f32, f32) -> bool;

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = lorag_lora::ops::linear(&x.reshape((rows, dims[dims.len() - 1]))?, w, b)?;
    let mut out = dims;
    *out.last_mut().expect("a tensor has dims") = w.dim(0)?;
    y.reshape(out)
}

fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    lorag_lora::ops::layer_norm(x, g, b, eps as f32)
}

/// A small deterministic generator (splitmix64) for shuffling and the head's initialisation.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
}

impl CrossEncoder {
    /// Loads a BERT folder: a cross-encoder saved by [`CrossEncoder::save`], or a plain encoder
    /// (a sentence-embedding model), whose pooler is kept and whose head starts small and random.
    pub fn load(dir: &Path, max_tokens: usize, seed: u64, device: &Device) -> Result<CrossEncoder, ModelError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| ModelError::corrupt(&config_path, e))?;
        if config.hidden_act.as_deref().is_some_and(|a| a != "gelu") {
            return Err(ModelError::Invalid(format!("{}: only BERT encoders with GELU are supported", dir.display())));
        }
        if config.num_attention_heads == 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(ModelError::corrupt(&config_path, "hidden_size is not a multiple of num_attention_heads"));
        }
        let max_tokens = max_tokens.clamp(8, config.max_position_embeddings);
        let mut tokenizer = crate::embed::load_tokenizer(dir, None)?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_tokens, strategy: TruncationStrategy::LongestFirst, ..Default::default() }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| ModelError::corrupt(&path, e))?;
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut expected: Vec<(String, Vec<usize>)> = vec![
            (FROZEN[0].into(), vec![config.vocab_size, h]),
            (FROZEN[1].into(), vec![config.max_position_embeddings, h]),
            (FROZEN[2].into(), vec![config.type_vocab_size, h]),
            ("bert.embeddings.LayerNorm.weight".into(), vec![h]),
            ("bert.embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..config.num_hidden_layers {
            for (k, name) in LAYER_WEIGHTS.iter().enumerate() {
                let shape = match k {
                    0 | 2 | 4 | 6 => vec![h, h],
                    10 => vec![i, h],
                    11 => vec![i],
                    12 => vec![h, i],
                    _ => vec![h],
                };
                expected.push((format!("bert.encoder.layer.{l}.{name}"), shape));
            }
        }
        expected.push(("bert.pooler.dense.weight".into(), vec![h, h]));
        expected.push(("bert.pooler.dense.bias".into(), vec![h]));
        let mut rng = Rng(seed ^ 0x5eed);
        let mut weights = BTreeMap::new();
        for (name, shape) in expected.iter().cloned().chain([("classifier.weight".to_string(), vec![1, h]), ("classifier.bias".to_string(), vec![1])]) {
            let plain = name.strip_prefix("bert.").unwrap_or(&name);
            let t = match tensors.get(&name).or_else(|| tensors.get(plain)) {
                Some(t) => {
                    if t.dims() != shape.as_slice() {
                        return Err(ModelError::corrupt(&path, format!("{name} has shape {:?}, expected {shape:?}", t.dims())));
                    }
                    t.to_dtype(DType::F32)?
                }
                // a plain encoder has no head: BERT's initialisation (N(0, 0.02), zero bias)
                None if name.starts_with("classifier.") || name.starts_with("bert.pooler.") => {
                    let n: usize = shape.iter().product();
                    let values: Vec<f32> = if name.ends_with("bias") { vec![0.0; n] } else { (0..n).map(|_| 0.02 * rng.normal()).collect() };
                    Tensor::from_vec(values, shape.as_slice(), device)?
                }
                None => return Err(ModelError::corrupt(&path, format!("tensor {name} is missing"))),
            };
            weights.insert(name, Var::from_tensor(&t)?);
        }
        Ok(CrossEncoder { config, weights, tokenizer, max_tokens, device: device.clone(), trained: Default::default() })
    }

    /// A weight for the forward pass: tracked for its gradient only while it is being trained.
    fn w(&self, name: &str) -> Tensor {
        let t = self.weights.get(name).unwrap_or_else(|| panic!("weight {name} was checked on load")).as_tensor();
        if self.trained.contains(name) {
            t.clone()
        } else {
            t.detach()
        }
    }

    /// Token ids, token types and mask of (query, passage) pairs, padded to the longest.
    pub fn encode(&self, pairs: &[(&str, &str)]) -> Result<(Tensor, Tensor, Tensor), ModelError> {
        let inputs: Vec<(String, String)> = pairs.iter().map(|(q, p)| (q.to_string(), p.to_string())).collect();
        let enc = self.tokenizer.encode_batch(inputs, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let (len, ids, types, mask) = crate::embed::padded(&enc.iter().collect::<Vec<_>>());
        let n = enc.len();
        let mask: Vec<f32> = mask.into_iter().map(|m| m as f32).collect();
        Ok((
            Tensor::from_vec(ids, (n, len), &self.device)?,
            Tensor::from_vec(types, (n, len), &self.device)?,
            Tensor::from_vec(mask, (n, len), &self.device)?,
        ))
    }

    /// Relevance logits (batch) of encoded pairs; differentiable in the trained weights.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, s) = ids.dims2()?;
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        let d = h / heads;
        let word = candle_nn::Embedding::new(self.w(FROZEN[0]), h).forward(ids)?;
        let pos = self.w(FROZEN[1]).narrow(0, 0, s)?;
        let typ = candle_nn::Embedding::new(self.w(FROZEN[2]), h).forward(types)?;
        let x = word.broadcast_add(&pos)?.add(&typ)?;
        let mut x = layer_norm(&x, &self.w("bert.embeddings.LayerNorm.weight"), &self.w("bert.embeddings.LayerNorm.bias"), c.layer_norm_eps)?;
        // 0 for real tokens, -10000 for padding (what Hugging Face's BERT adds)
        let bias = ((mask.reshape((b, 1, 1, s))? - 1.0)? * 10000.0)?;
        let scale = 1.0 / (d as f64).sqrt();
        for l in 0..c.num_hidden_layers {
            let w = |k: usize| self.w(&format!("bert.encoder.layer.{l}.{}", LAYER_WEIGHTS[k]));
            let heads_of = |t: Tensor| t.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous();
            let q = heads_of(linear(&x, &w(0), &w(1))?)?;
            let k = heads_of(linear(&x, &w(2), &w(3))?)?;
            let v = heads_of(linear(&x, &w(4), &w(5))?)?;
            let p = lorag_lora::ops::attention_softmax(&q.matmul(&k.t()?.contiguous()?)?, scale, &bias)?;
            let ctx = p.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, s, h))?;
            let a = linear(&ctx, &w(6), &w(7))?;
            x = layer_norm(&(x + a)?, &w(8), &w(9), c.layer_norm_eps)?;
            let f = linear(&lorag_lora::ops::gelu_erf(&linear(&x, &w(10), &w(11))?)?, &w(12), &w(13))?;
            x = layer_norm(&(x + f)?, &w(14), &w(15), c.layer_norm_eps)?;
        }
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = linear(&cls, &self.w("bert.pooler.dense.weight"), &self.w("bert.pooler.dense.bias"))?.tanh()?;
        linear(&pooled, &self.w("classifier.weight"), &self.w("classifier.bias"))?.squeeze(1)
    }

    /// Scores of (query, passage) pairs, in batches of 16.
    pub fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, ModelError> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(16) {
            let (ids, types, mask) = self.encode(chunk)?;
            out.extend(self.forward(&ids, &types, &mask)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Fine-tunes on (query, passage, label in [0, 1]) with binary cross-entropy (pointwise).
    /// Returns the mean loss of the last epoch; `report` after every step, false stops (cancel).
    pub fn train(&mut self, pairs: &[(String, String, f32)], settings: &TrainSettings, report: StepReport) -> Result<f32, ModelError> {
        let batch = settings.batch_size;
        self.optimise(pairs.len(), batch, |i| pairs[i].0.len() + pairs[i].1.len(), settings, report, |model, items| {
            let chunk: Vec<(&str, &str)> = items.iter().map(|&i| (pairs[i].0.as_str(), pairs[i].1.as_str())).collect();
            let (ids, types, mask) = model.encode(&chunk)?;
            let z = model.forward(&ids, &types, &mask)?;
            let y = Tensor::from_vec(items.iter().map(|&i| pairs[i].2).collect::<Vec<f32>>(), items.len(), &model.device)?;
            // binary cross-entropy with logits: max(z, 0) - z·y + log(1 + e^-|z|)
            Ok((z.relu()? - (&z * &y)? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?)
        })
    }

    /// Fine-tunes on groups of (query, relevant passage, non-relevant passages) with a listwise
    /// softmax cross-entropy: within each group the relevant passage must score highest. All
    /// groups need the same number of negatives; `settings.batch_size` counts pairs.
    pub fn train_groups(&mut self, groups: &[(String, String, Vec<String>)], settings: &TrainSettings, report: StepReport) -> Result<f32, ModelError> {
        let size = 1 + groups.first().map_or(0, |g| g.2.len());
        if size < 2 || groups.iter().any(|g| g.2.len() + 1 != size) {
            return Err(ModelError::Invalid("every group needs the same number (at least one) of non-relevant passages".into()));
        }
        let per_batch = (settings.batch_size / size).max(1);
        let len = |i: usize| groups[i].1.len() + groups[i].2.iter().map(String::len).sum::<usize>() / (size - 1);
        self.optimise(groups.len(), per_batch, len, settings, report, |model, items| {
            let mut chunk = Vec::with_capacity(items.len() * size);
            for &i in items {
                let (q, pos, negs) = &groups[i];
                chunk.push((q.as_str(), pos.as_str()));
                chunk.extend(negs.iter().map(|n| (q.as_str(), n.as_str())));
            }
            let (ids, types, mask) = model.encode(&chunk)?;
            let z = model.forward(&ids, &types, &mask)?.reshape((items.len(), size))?;
            let targets = Tensor::zeros(items.len(), DType::U32, &model.device)?;
            Ok(lorag_lora::ops::cross_entropy(&z, &targets)?)
        })
    }

    /// The training loop: AdamW on every weight but the embedding tables, linear warm-up over
    /// the first 10 % of steps, then linear decay to zero; items shuffled each epoch, batches
    /// of similar length.
    fn optimise(
        &mut self,
        items: usize,
        batch_size: usize,
        length: impl Fn(usize) -> usize,
        settings: &TrainSettings,
        report: StepReport,
        loss_of: impl Fn(&CrossEncoder, &[usize]) -> Result<Tensor, ModelError>,
    ) -> Result<f32, ModelError> {
        if items == 0 {
            return Err(ModelError::Invalid("no training pairs".into()));
        }
        if batch_size == 0 || settings.epochs == 0 {
            return Err(ModelError::Invalid("batch_size and epochs must be positive".into()));
        }
        let layers = self.config.num_hidden_layers;
        let first_trained = layers - settings.trainable_layers.unwrap_or(layers).min(layers);
        let frozen = |name: &str| {
            FROZEN.contains(&name)
                || (first_trained > 0 && name.starts_with("bert.embeddings."))
                || name
                    .strip_prefix("bert.encoder.layer.")
                    .and_then(|rest| rest.split('.').next()?.parse::<usize>().ok())
                    .is_some_and(|l| l < first_trained)
        };
        let trained: Vec<Var> = self.weights.iter().filter(|(n, _)| !frozen(n)).map(|(_, v)| v.clone()).collect();
        self.trained = self.weights.keys().filter(|n| !frozen(n)).cloned().collect();
        // the steps see the model read-only; whatever they return, nothing stays tracked after
        let this = &*self;
        let result = (|| -> Result<f32, ModelError> {
            let params = ParamsAdamW { lr: settings.learning_rate, weight_decay: settings.weight_decay, ..Default::default() };
            let mut opt = AdamW::new(trained, params)?;
            let total = items.div_ceil(batch_size) * settings.epochs;
            let warmup = (total / 10).max(1);
            let mut rng = Rng(settings.seed);
            let mut step = 0;
            let mut epoch_loss = 0.0;
            for _ in 0..settings.epochs {
                let mut order: Vec<usize> = (0..items).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                // similar lengths in one batch pad less: sort within windows of 8 batches
                for window in order.chunks_mut(batch_size * 8) {
                    window.sort_by_key(|&i| length(i));
                }
                let mut batches: Vec<&[usize]> = order.chunks(batch_size).collect();
                for i in (1..batches.len()).rev() {
                    batches.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                epoch_loss = 0.0;
                for (n, batch) in batches.iter().enumerate() {
                    let lr = if step < warmup {
                        settings.learning_rate * (step + 1) as f64 / warmup as f64
                    } else {
                        settings.learning_rate * (total - step) as f64 / (total - warmup).max(1) as f64
                    };
                    opt.set_learning_rate(lr);
                    let loss = loss_of(this, batch)?;
                    opt.backward_step(&loss)?;
                    let l = loss.to_scalar::<f32>()?;
                    epoch_loss += l;
                    step += 1;
                    if !report(step, total, l, epoch_loss / (n + 1) as f32) {
                        return Err(ModelError::Invalid("cancelled".into()));
                    }
                }
                epoch_loss /= batches.len() as f32;
            }
            Ok(epoch_loss)
        })();
        self.trained.clear();
        result
    }

    /// Writes a Hugging Face `BertForSequenceClassification` folder and its ONNX export.
    pub fn save(&self, dir: &Path, base: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let tensors: std::collections::HashMap<String, Tensor> = self.weights.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        let c = &self.config;
        let config = serde_json::json!({
            "architectures": ["BertForSequenceClassification"],
            "model_type": "bert",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
            "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
            "layer_norm_eps": c.layer_norm_eps, "hidden_act": "gelu", "num_labels": 1,
            "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
        });
        let write = |name: &str, bytes: &[u8]| -> Result<(), ModelError> {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| ModelError::io(&p, e))
        };
        write("config.json", serde_json::to_string_pretty(&config).expect("json").as_bytes())?;
        write("tokenizer_config.json", serde_json::json!({ "model_max_length": self.max_tokens }).to_string().as_bytes())?;
        let tok = base.join("tokenizer.json");
        let bytes = std::fs::read(&tok).map_err(|e| ModelError::io(&tok, e))?;
        write("tokenizer.json", &bytes)?;
        write("model.onnx", &crate::onnx::cross_encoder(c, &|name| self.w(name))?)?;
        Ok(())
    }
}

/// Exports the BERT encoder in `dir` (a sentence-embedding model folder) to `dir/model.onnx`
/// as a feature-extraction graph ([`crate::onnx::feature_extractor`]) that records the sha256
/// of the `model.safetensors` it was made from; the file appears whole or not at all.
pub fn export_embedder(dir: &Path) -> Result<PathBuf, ModelError> {
    let source = crate::sha256_file(&dir.join("model.safetensors"))?;
    let model = CrossEncoder::load(dir, 512, 0, &Device::Cpu)?;
    let bytes = crate::onnx::feature_extractor(&model.config, &|name| model.w(name), &source)?;
    let out = dir.join("model.onnx");
    let partial = dir.join(format!(".model.onnx.{}", std::process::id()));
    std::fs::write(&partial, bytes).map_err(|e| ModelError::io(&partial, e))?;
    std::fs::rename(&partial, &out).map_err(|e| ModelError::io(&out, e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
    }

    /// The ONNX export computes what candle computes (ONNX Runtime against candle on the same
    /// weights, within 1e-3), and a few training steps on a toy task lower the loss while the
    /// embedding tables stay as they were.
    #[test]
    fn onnx_export_agrees_with_candle_and_training_learns() {
        let base = models().join("all-MiniLM-L6-v2");
        let library = models().join("onnxruntime/libonnxruntime.so.1.32.0");
        if !base.join("model.safetensors").exists() || !library.exists() {
            eprintln!("MiniLM or ONNX Runtime not fetched (make models): skipping");
            return;
        }
        let device = Device::Cpu;
        let mut model = CrossEncoder::load(&base, 64, 7, &device).unwrap();
        let words_before = model.w(FROZEN[0]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let pairs = [
            ("what is the lift of a swept wing", "the lift of swept wings at low speed was measured"),
            ("what is the lift of a swept wing", "a recipe for bread"),
            ("heat transfer in hypersonic flow", "heat transfer rates in hypersonic boundary layers"),
            ("heat transfer in hypersonic flow", "the history of the bicycle"),
        ];
        let train: Vec<(String, String, f32)> = pairs
            .iter()
            .enumerate()
            .map(|(i, (q, p))| (q.to_string(), p.to_string(), if i % 2 == 0 { 1.0 } else { 0.0 }))
            .collect();
        let mut losses = Vec::new();
        let settings = TrainSettings { epochs: 8, trainable_layers: None, learning_rate: 1e-4, batch_size: 4, seed: 1, weight_decay: 0.0 };
        model
            .train(&train, &settings, &mut |_, _, l, _| {
                losses.push(l);
                true
            })
            .unwrap();
        assert!(losses.last().unwrap() < &(losses[0] * 0.7), "{losses:?}");
        assert_eq!(model.w(FROZEN[0]).flatten_all().unwrap().to_vec1::<f32>().unwrap(), words_before);

        let dir = std::env::temp_dir().join(format!("lorag-cross-{}", std::process::id()));
        model.save(&dir, &base).unwrap();
        let mut spec = crate::engine::ModelSpec::new("t", dir.clone(), None, "cpu");
        spec.library = library.to_str().unwrap().into();
        let reranker = crate::rerank::reranker(&spec).unwrap();
        let docs: Vec<&str> = pairs.iter().map(|p| p.1).collect();
        let onnx = reranker.score(pairs[0].0, &docs, &|| false).unwrap();
        let candle: Vec<f32> = model.score(&docs.iter().map(|d| (pairs[0].0, *d)).collect::<Vec<_>>()).unwrap();
        for (a, b) in onnx.iter().zip(&candle) {
            assert!((a - b).abs() < 1e-3, "onnx {onnx:?} candle {candle:?}");
        }
        // the saved folder loads back into candle with the same scores
        let again = CrossEncoder::load(&dir, 64, 99, &device).unwrap();
        let reloaded = again.score(&docs.iter().map(|d| (pairs[0].0, *d)).collect::<Vec<_>>()).unwrap();
        assert_eq!(reloaded, candle);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
