//! Cross-encoder reranking with ONNX Runtime.
//!
//! A reranker folder holds `model.onnx` (a Hugging Face sequence-classification export: inputs
//! `input_ids`, `attention_mask` and optionally `token_type_ids`, output `logits` of shape
//! batch × 1, or × 2 where the second column is "relevant") and `tokenizer.json`. The query and
//! each document are encoded as one pair, cut longest-first to the model's limit, sorted by
//! length and run in padded batches.
//!
//! Cancel: every run has its own run options, and a watcher thread terminates the run as soon
//! as the caller is gone (a closed connection) or cancelled, so a long batch stops mid-way.
//!
//! ONNX Runtime is loaded as [`crate::onnxrt`] says.

use crate::ModelError;
use ort::session::{RunOptions, Session};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

/// Pairs per ONNX Runtime run, at most, and padded tokens per run, at most.
const BATCH_PAIRS: usize = 32;
const BATCH_TOKENS: usize = 8192;
/// Pairs tokenized between two looks for a cancel (256 long ones: about a tenth of a second).
const TOKENIZE_PAIRS: usize = 256;

/// Token limit when neither `config.json` nor `tokenizer_config.json` gives one.
const DEFAULT_MAX_TOKENS: usize = 512;

pub struct Reranker {
    /// The registered name it was loaded as.
    pub name: String,
    session: Mutex<Session>,
    tokenizer: Tokenizer,
    has_token_types: bool,
    /// Which of the session's outputs holds the logits.
    output: usize,
    /// Column of `logits` that scores relevance (0 for one label, 1 for two).
    label: usize,
    pub max_tokens: usize,
    /// The execution provider that really runs (ONNX Runtime would fall back silently).
    pub provider: String,
}

/// The first `model_max_length`/`max_position_embeddings` the folder declares.
fn declared_max_tokens(dir: &Path) -> usize {
    let read = |name: &str, key: &str| -> Option<usize> {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get(key)?.as_u64().map(|n| n as usize).filter(|&n| n > 0 && n <= 1 << 16)
    };
    read("tokenizer_config.json", "model_max_length")
        .or_else(|| read("config.json", "max_position_embeddings"))
        .unwrap_or(DEFAULT_MAX_TOKENS)
}

impl Reranker {
    /// Loads `dir/model.onnx` on the device `device` allows; checks that it is a cross-encoder.
    pub fn load(dir: &Path, device: &str, library: &str) -> Result<Reranker, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::Missing { path: dir.to_owned() });
        }
        let path = dir.join("model.onnx");
        if !path.is_file() {
            return Err(ModelError::Missing { path });
        }
        let max_tokens = declared_max_tokens(dir);
        let mut tokenizer = crate::embed::load_tokenizer(dir, None)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;

        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        let (session, provider) = crate::onnxrt::session(&path, &bytes, device, library)?;

        let not_cross_encoder = |why: String| ModelError::Unsuitable {
            detail: format!("\"{}\" is not a cross-encoder: {why}", path.display()),
            hint: "A reranker is a sequence-classification export with inputs input_ids, attention_mask (and token_type_ids) and an output logits of shape [batch, 1] or [batch, 2].".into(),
        };
        let has_token_types = crate::onnxrt::bert_inputs(&session, &not_cross_encoder)?;
        let output = crate::onnxrt::output_index(&session, "logits")
            .ok_or_else(|| not_cross_encoder("it has no output \"logits\"".into()))?;
        let logits = &session.outputs()[output];
        let shape = logits.dtype().tensor_shape().ok_or_else(|| not_cross_encoder("its output is not a tensor".into()))?;
        let label = match shape.len() {
            2 if shape[1] == 1 => 0,
            2 if shape[1] == 2 => 1,
            _ => return Err(not_cross_encoder(format!("its output has shape {shape:?}, not [batch, 1] or [batch, 2]"))),
        };
        if logits.dtype().tensor_type() != Some(ort::value::TensorElementType::Float32) {
            return Err(not_cross_encoder("its output is not float32".into()));
        }
        Ok(Reranker { name: String::new(), session: Mutex::new(session), tokenizer, has_token_types, output, label, max_tokens, provider })
    }

    /// Scores every document against `query` (higher is more relevant), in the documents'
    /// order. `cancelled` is polled by a watcher thread while each batch runs and before the
    /// next: once it is true the run is terminated (ONNX Runtime's run option) and the call
    /// ends with "cancelled". It must not call PostgreSQL (it runs off the main thread).
    pub fn score(&self, query: &str, documents: &[&str], cancelled: &(dyn Fn() -> bool + Sync)) -> Result<Vec<f32>, ModelError> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        // tokenized a slice at a time, looking for a cancel between slices: 3000 long documents
        // take a second to tokenize, which statement_timeout should not have to wait for
        let mut encodings = Vec::with_capacity(documents.len());
        for slice in documents.chunks(TOKENIZE_PAIRS) {
            stop_if(cancelled)?;
            let pairs: Vec<(String, String)> = slice.iter().map(|d| (query.to_string(), d.to_string())).collect();
            encodings.extend(self.tokenizer.encode_batch(pairs, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?);
        }
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].get_ids().len());
        let mut scores = vec![0f32; documents.len()];
        let mut start = 0;
        while start < order.len() {
            // a run of pairs of similar length, at most BATCH_PAIRS and BATCH_TOKENS padded
            let mut end = start + 1;
            while end < order.len() && end - start < BATCH_PAIRS {
                let longest = encodings[order[end]].get_ids().len();
                if longest * (end - start + 1) > BATCH_TOKENS {
                    break;
                }
                end += 1;
            }
            stop_if(cancelled)?;
            let batch: Vec<&tokenizers::Encoding> = order[start..end].iter().map(|&i| &encodings[i]).collect();
            for (&i, s) in order[start..end].iter().zip(self.run(&batch, cancelled)?) {
                scores[i] = s;
            }
            start = end;
        }
        Ok(scores)
    }

    /// One padded ONNX Runtime run, terminated when `cancelled` turns true meanwhile.
    fn run(&self, batch: &[&tokenizers::Encoding], cancelled: &(dyn Fn() -> bool + Sync)) -> Result<Vec<f32>, ModelError> {
        let n = batch.len();
        let rt = |e: ort::Error| ModelError::Runtime(e.to_string());
        let inputs = crate::onnxrt::encode(batch, self.has_token_types)?;
        let options = RunOptions::new().map_err(rt)?;
        let done = AtomicBool::new(false);
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let (result, terminated) = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    if cancelled() {
                        let _ = options.terminate();
                        return true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                false
            });
            let result = session.run_with_options(inputs, &options).map_err(rt).and_then(|outputs| {
                let (out_shape, values) = outputs[self.output].try_extract_tensor::<f32>().map_err(rt)?;
                let width = out_shape.get(1).copied().unwrap_or(1) as usize;
                if out_shape.first().copied() != Some(n as i64) || values.len() != n * width {
                    return Err(ModelError::Runtime(format!("the reranker returned logits of shape {out_shape:?} for {n} pairs")));
                }
                Ok((0..n).map(|i| values[i * width + self.label.min(width - 1)]).collect::<Vec<f32>>())
            });
            done.store(true, Ordering::Release);
            (result, watcher.join().unwrap_or(false))
        });
        if terminated {
            return Err(ModelError::Invalid("cancelled".into()));
        }
        result
    }
}

/// Ends a scoring with "cancelled" once `cancelled` says so.
fn stop_if(cancelled: &(dyn Fn() -> bool + Sync)) -> Result<(), ModelError> {
    if cancelled() {
        return Err(ModelError::Invalid("cancelled".into()));
    }
    Ok(())
}

type Key = (PathBuf, Option<String>, String);

/// Rerankers loaded in this process, shared by every connection.
static LOADED: Mutex<Option<HashMap<Key, Arc<Reranker>>>> = Mutex::new(None);

/// The reranker of `spec`, loaded (checksum of `model.onnx` verified) on first use.
pub fn reranker(spec: &crate::engine::ModelSpec) -> Result<Arc<Reranker>, ModelError> {
    let key = spec.key();
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    let map = loaded.get_or_insert_with(HashMap::new);
    if let Some(r) = map.get(&key) {
        return Ok(r.clone());
    }
    if let Some(expected) = &spec.checksum {
        let file = spec.path.join("model.onnx");
        let actual = crate::sha256_file(&file)?;
        if &actual != expected {
            return Err(ModelError::Checksum { path: file, expected: expected.clone(), actual });
        }
    }
    let mut r = Reranker::load(&spec.path, &spec.device, &spec.library)?;
    r.name = spec.name.clone();
    let r = Arc::new(r);
    map.insert(key, r.clone());
    Ok(r)
}

/// Names and execution providers of the loaded rerankers, for the status.
pub fn loaded() -> Vec<(String, String)> {
    let loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<(String, String)> = loaded.iter().flatten().map(|(_, r)| (r.name.clone(), r.provider.clone())).collect();
    out.sort();
    out
}
