//! Sentence embeddings with a BERT encoder (all-MiniLM-L6-v2 by default): tokenise, run the
//! encoder in batches padded to the longest input, mean-pool over real tokens, L2-normalise.
//! Follows candle's model shape: `Config` from `config.json`, weights by checkpoint name.

use crate::ModelError;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;
use tokenizers::{Tokenizer, TruncationParams};

/// Tokens per input the embedder sees (all-MiniLM-L6-v2's max_seq_length); longer text is
/// truncated (use `chunk()` to keep all of it).
pub const MAX_TOKENS: usize = 256;

pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    pub dimensions: usize,
    pub max_tokens: usize,
}

/// Reads and checks a model folder's files.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::corrupt(path, e))
}

/// The tokenizer of a model folder, without the padding and truncation some ship built in
/// (MiniLM's pads and truncates everything to 128).
pub fn load_tokenizer(dir: &Path, max_tokens: Option<usize>) -> Result<Tokenizer, ModelError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(ModelError::Missing { path });
    }
    let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| ModelError::corrupt(&path, e))?;
    tokenizer.with_padding(None);
    match max_tokens {
        Some(max) => {
            tokenizer
                .with_truncation(Some(TruncationParams { max_length: max, ..Default::default() }))
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        }
        None => {
            tokenizer.with_truncation(None).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        }
    }
    Ok(tokenizer)
}

impl Embedder {
    /// Loads `dir` (`config.json`, `tokenizer.json`, `model.safetensors`). The weights are
    /// read into memory, not mapped: a file truncated later cannot crash the process.
    pub fn load(dir: &Path, device: &Device) -> Result<Embedder, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::Missing { path: dir.to_owned() });
        }
        let config: Config = read_json(&dir.join("config.json"))?;
        let tokenizer = load_tokenizer(dir, Some(MAX_TOKENS))?;
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| ModelError::io(&weights, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| ModelError::corrupt(&weights, e))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = BertModel::load(vb, &config).map_err(|e| ModelError::corrupt(&weights, e))?;
        Ok(Embedder { model, tokenizer, device: device.clone(), dimensions: config.hidden_size, max_tokens: MAX_TOKENS })
    }

    /// Embeds `texts` (callers split large inputs into batches of [`crate::engine::BATCH`]).
    ///
    /// Texts are grouped by token length and each group is one padded forward pass; groups run
    /// on all cores at once. Measured on CPU: a padded pass over texts of mixed lengths costs
    /// more per text than passes over texts of one length (padding, and candle's elementwise
    /// ops run on one thread), so similar lengths share a pass and the rest run side by side.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let groups = length_groups(&encodings.iter().map(|e| e.get_ids().len()).collect::<Vec<_>>());
        // rayon's pool: the same few long-lived threads candle's matrix products use, so memory
        // (one malloc arena per thread) stays bounded however many passes run.
        use rayon::prelude::*;
        if let [group] = groups.as_slice() {
            // one pass: run it here, no hand-over to the pool
            let batch: Vec<&tokenizers::Encoding> = group.iter().map(|&i| &encodings[i]).collect();
            let mut vectors = vec![Vec::new(); texts.len()];
            for (i, v) in group.iter().copied().zip(self.forward(&batch)?) {
                vectors[i] = v;
            }
            return Ok(vectors);
        }
        let results: Vec<Result<Vec<(usize, Vec<f32>)>, ModelError>> = groups
            .par_iter()
            .map(|group| {
                let batch: Vec<&tokenizers::Encoding> = group.iter().map(|&i| &encodings[i]).collect();
                Ok(group.iter().copied().zip(self.forward(&batch)?).collect())
            })
            .collect();
        let mut vectors = vec![Vec::new(); texts.len()];
        for r in results {
            for (i, v) in r? {
                vectors[i] = v;
            }
        }
        Ok(vectors)
    }

    /// One padded forward pass over `encodings`.
    fn forward(&self, encodings: &[&tokenizers::Encoding]) -> Result<Vec<Vec<f32>>, ModelError> {
        let (len, ids, types, mask) = padded(encodings);
        let n = encodings.len();
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let types = Tensor::from_vec(types, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, dim)
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (n, dim)
        let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?; // (n, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let normalised = mean.broadcast_div(&norms)?;
        Ok(normalised.to_vec2::<f32>()?)
    }

    /// Token count of `text` without truncation (for tests and chunking decisions).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// Token ids, token types and attention mask (1 for a token, 0 for padding) of `encodings`,
/// each padded with zeros to the longest (at least 1), row after row; and that length.
pub(crate) fn padded(encodings: &[&tokenizers::Encoding]) -> (usize, Vec<u32>, Vec<u32>, Vec<u32>) {
    let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(1).max(1);
    let n = encodings.len();
    let (mut ids, mut types, mut mask) = (Vec::with_capacity(n * len), Vec::with_capacity(n * len), Vec::with_capacity(n * len));
    for e in encodings {
        let pad = len - e.get_ids().len();
        ids.extend(e.get_ids().iter().copied().chain(std::iter::repeat_n(0, pad)));
        types.extend(e.get_type_ids().iter().copied().chain(std::iter::repeat_n(0, pad)));
        mask.extend(std::iter::repeat_n(1, e.get_ids().len()).chain(std::iter::repeat_n(0, pad)));
    }
    (len, ids, types, mask)
}

/// Indices grouped so that a group's longest text is at most 1/8 (and 8 tokens) longer than
/// its shortest: such a group pads little.
fn length_groups(lengths: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match groups.last_mut() {
            Some(g) if lengths[i] <= lengths[g[0]] + lengths[g[0]] / 8 + 8 => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_groups_cover_every_text_once_and_pad_little() {
        let lengths = [200, 12, 14, 250, 13, 205, 90, 60, 210];
        let groups = length_groups(&lengths);
        let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
        for g in &groups {
            let (lo, hi) = (g.iter().map(|&i| lengths[i]).min().unwrap(), g.iter().map(|&i| lengths[i]).max().unwrap());
            assert!(hi <= lo + lo / 8 + 8, "{g:?}");
        }
        assert!(groups.iter().any(|g| g.len() == 3), "12, 13 and 14 tokens share a pass: {groups:?}");
    }
}
