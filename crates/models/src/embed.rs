//! Sentence embeddings with a BERT encoder (all-MiniLM-L6-v2 by default): tokenise, run the
//! encoder in batches padded to the longest input, mean-pool over real tokens, L2-normalise.
//!
//! Two runtimes compute the encoder:
//! - ONNX Runtime, on the folder's `model.onnx` (a feature-extraction export: inputs
//!   `input_ids`, `attention_mask` and optionally `token_type_ids`, output `last_hidden_state`;
//!   `make models` exports the default embedder's with [`crate::onnx::feature_extractor`]);
//! - candle, on `model.safetensors` (candle's `BertModel`, `Config` from `config.json`).
//!
//! `auto` takes ONNX Runtime when the folder has `model.onnx` and `lorag.onnxruntime_library`
//! is set (on the CPU it is 3–4× faster than candle for MiniLM: fused kernels, all cores), and
//! candle otherwise.

use crate::ModelError;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokenizers::{Tokenizer, TruncationParams};

/// Tokens per input the embedder sees (all-MiniLM-L6-v2's max_seq_length); longer text is
/// truncated (use `chunk()` to keep all of it).
pub const MAX_TOKENS: usize = 256;

pub struct Embedder {
    backend: Backend,
    tokenizer: Tokenizer,
    pub dimensions: usize,
    pub max_tokens: usize,
    /// What computes it: "candle cpu", "onnxruntime CPUExecutionProvider", ...
    pub runtime: String,
}

enum Backend {
    Candle { model: BertModel, device: Device },
    /// `session` runs on all cores; `lanes`, on the CPU of a machine with several cores, are
    /// sessions of the same model on a share of the cores each (the same weights in memory),
    /// for passes that hold several texts.
    Onnx { session: Mutex<ort::session::Session>, lanes: Lanes, token_types: bool, output: usize },
}

/// The lane sessions and a thread for each (kept: a run on a new thread would set up ONNX
/// Runtime's per-thread buffers again).
struct Lanes {
    sessions: Vec<Mutex<ort::session::Session>>,
    threads: Option<rayon::ThreadPool>,
}

impl Lanes {
    /// The session of the lane whose thread calls (one of `threads`).
    fn here(&self) -> &Mutex<ort::session::Session> {
        &self.sessions[rayon::current_thread_index().unwrap_or(0) % self.sessions.len()]
    }
}

/// Lanes at most, however many cores: each lane is a session, and more than a few buy little
/// once every lane has several cores.
const MAX_LANES: usize = 4;

/// Lanes and threads per lane for ONNX Runtime on the CPU: one lane per core up to
/// [`MAX_LANES`], the cores split evenly; no lanes on one core.
fn lanes() -> (usize, usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return (0, 0);
    }
    let lanes = cores.min(MAX_LANES);
    (lanes, cores / lanes)
}

/// `lorag.embedding_runtime`: which runtime computes an embedder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// ONNX Runtime when the folder has `model.onnx` and the library is set, else candle.
    Auto,
    Candle,
    OnnxRuntime,
}

impl Runtime {
    pub fn parse(s: &str) -> Result<Runtime, ModelError> {
        match s.trim() {
            "" | "auto" => Ok(Runtime::Auto),
            "candle" => Ok(Runtime::Candle),
            "onnxruntime" => Ok(Runtime::OnnxRuntime),
            other => Err(ModelError::Invalid(format!("unknown embedding runtime \"{other}\": use auto, candle or onnxruntime"))),
        }
    }

    /// Whether the embedder in `dir` runs on ONNX Runtime (else candle).
    pub fn onnx_for(self, dir: &Path, library: &str) -> Result<bool, ModelError> {
        let (onnx, safetensors) = (dir.join("model.onnx").is_file(), dir.join("model.safetensors").is_file());
        match self {
            Runtime::Candle => Ok(false),
            Runtime::OnnxRuntime => Ok(true),
            Runtime::Auto if onnx && !library.is_empty() => Ok(true),
            Runtime::Auto if onnx && !safetensors => Err(ModelError::Setup {
                detail: format!("the embedder in \"{}\" is an ONNX model, and ONNX Runtime is not set up", dir.display()),
                hint: crate::onnxrt::LIBRARY_HINT.into(),
            }),
            Runtime::Auto => Ok(false),
        }
    }
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
        // the engine names the device
        let runtime = "candle".to_string();
        Ok(Embedder { backend: Backend::Candle { model, device: device.clone() }, tokenizer, dimensions: config.hidden_size, max_tokens: MAX_TOKENS, runtime })
    }

    /// Loads `dir/model.onnx` into ONNX Runtime (from `library`) on the device `device`
    /// allows, checks that it is a feature-extraction export, and checks `checksum`: the
    /// sha256 of the `model.safetensors` lorag exported it from (recorded in its metadata), or
    /// else of `model.onnx` itself.
    pub fn load_onnx(dir: &Path, device: &str, library: &str, checksum: Option<&str>) -> Result<Embedder, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::Missing { path: dir.to_owned() });
        }
        let path = dir.join("model.onnx");
        if !path.is_file() {
            return Err(ModelError::Missing { path });
        }
        let tokenizer = load_tokenizer(dir, Some(MAX_TOKENS))?;
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        if let Some(expected) = checksum {
            let actual = crate::onnx::source_sha256(&bytes).unwrap_or_else(|| crate::sha256_hex(&bytes));
            if actual != expected {
                return Err(ModelError::Checksum { path, expected: expected.to_string(), actual });
            }
        }
        // Why lanes: a run over one text keeps all cores only partly busy (measured on 2 cores,
        // MiniLM, Cranfield abstracts, one text per run: 47 texts/s on both cores one run after
        // the other, 54 with one single-core run per core side by side). The lanes share the
        // model's weights: 601 MB for the model process with two lanes, 776 MB when each
        // session read its own copy.
        let (lane_count, lane_threads) = if crate::onnxrt::runs_on_cpu(device, library)? { lanes() } else { (0, 0) };
        let shared = if lane_count > 0 { crate::onnxrt::SharedWeights::from_model(&bytes) } else { None };
        let (session, provider) = crate::onnxrt::session_with(&path, &bytes, device, library, None, shared.as_ref())?;
        let mut lanes = Lanes { sessions: Vec::new(), threads: None };
        if let Some(shared) = &shared {
            for _ in 0..lane_count {
                let (lane, _) = crate::onnxrt::session_with(&path, &bytes, "cpu", library, Some(lane_threads), Some(shared))?;
                lanes.sessions.push(Mutex::new(lane));
            }
            let pool = rayon::ThreadPoolBuilder::new().num_threads(lane_count).thread_name(|i| format!("lorag-lane-{i}")).build();
            lanes.threads = Some(pool.map_err(|e| ModelError::Runtime(format!("cannot start the embedder's lanes: {e}")))?);
        }
        drop(bytes);
        let unsuitable = |why: String| ModelError::Unsuitable {
            detail: format!("\"{}\" is not an embedder: {why}", path.display()),
            hint: "An embedder is a feature-extraction export with inputs input_ids, attention_mask (and token_type_ids) and an output last_hidden_state of shape [batch, sequence, hidden].".into(),
        };
        let token_types = crate::onnxrt::bert_inputs(&session, &unsuitable)?;
        let output = crate::onnxrt::output_index(&session, "last_hidden_state")
            .ok_or_else(|| unsuitable("it has no output \"last_hidden_state\"".into()))?;
        let hidden = &session.outputs()[output];
        let shape = hidden.dtype().tensor_shape().ok_or_else(|| unsuitable("its output is not a tensor".into()))?;
        if shape.len() != 3 || hidden.dtype().tensor_type() != Some(ort::value::TensorElementType::Float32) {
            return Err(unsuitable(format!("its output \"{}\" is not float32 of shape [batch, sequence, hidden] (shape {shape:?})", hidden.name())));
        }
        // the width: fixed in the export, or else from config.json
        let dimensions = match shape[2] {
            d if d > 0 => d as usize,
            _ => read_json::<Config>(&dir.join("config.json"))?.hidden_size,
        };
        let runtime = format!("onnxruntime {provider}");
        Ok(Embedder { backend: Backend::Onnx { session: Mutex::new(session), lanes, token_types, output }, tokenizer, dimensions, max_tokens: MAX_TOKENS, runtime })
    }

    /// Embeds `texts` (callers split large inputs into batches of [`crate::engine::BATCH`]).
    ///
    /// On ONNX Runtime's CPU lanes, several texts run one text per run, the lanes side by
    /// side. Otherwise texts are grouped by token length and each group is one padded forward
    /// pass: on ONNX Runtime one group after the other, on candle the groups on all cores at
    /// once. Measured on CPU: a padded pass over texts of mixed lengths costs more per text than
    /// passes over texts of one length (padding, and candle's elementwise ops run on one
    /// thread), so similar lengths share a pass and the rest run side by side.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let groups = length_groups(&encodings.iter().map(|e| e.get_ids().len()).collect::<Vec<_>>());
        if let Backend::Onnx { session, lanes, token_types, output } = &self.backend {
            let mut vectors = vec![Vec::new(); texts.len()];
            // Lanes for every pass of several texts. Passes of about 4 texts (8 connections,
            // one text each) gain no throughput on 2 lanes (one lane idles at the end of an odd
            // pass), but on the all-core session their padded runs would grow its arena, which
            // ONNX Runtime keeps, to the largest pass seen: measured, the model process grew 62 MB
            // in its first 8-connection run that way, 11 MB with every such pass on the lanes.
            let Some(threads) = lanes.threads.as_ref().filter(|_| texts.len() > 1) else {
                // one run on all cores after the other
                for group in &groups {
                    let batch: Vec<&tokenizers::Encoding> = group.iter().map(|&i| &encodings[i]).collect();
                    for (i, v) in group.iter().copied().zip(self.forward_onnx(&batch, session, *token_types, *output)?) {
                        vectors[i] = v;
                    }
                }
                return Ok(vectors);
            };
            // the lanes side by side, one text per run (on one core a padded run of a few texts
            // costs more than their runs one by one: measured on 2 cores, passes of 32 Cranfield
            // abstracts, 38 texts/s in length groups against 55 one by one), each lane taking the
            // longest text left, so that the lanes finish close together
            let mut order: Vec<usize> = (0..texts.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].get_ids().len()));
            let next = AtomicUsize::new(0);
            let lane = |session: &Mutex<ort::session::Session>| -> Result<Vec<(usize, Vec<f32>)>, ModelError> {
                let mut out = Vec::new();
                while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                    out.extend(self.forward_onnx(&[&encodings[i]], session, *token_types, *output)?.into_iter().map(|v| (i, v)));
                }
                Ok(out)
            };
            let results = threads.broadcast(|_| lane(lanes.here()));
            for r in results {
                for (i, v) in r? {
                    vectors[i] = v;
                }
            }
            return Ok(vectors);
        }
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
        let (model, device) = match &self.backend {
            Backend::Candle { model, device } => (model, device),
            Backend::Onnx { session, token_types, output, .. } => return self.forward_onnx(encodings, session, *token_types, *output),
        };
        let (len, ids, types, mask) = padded(encodings);
        let n = encodings.len();
        let ids = Tensor::from_vec(ids, (n, len), device)?;
        let types = Tensor::from_vec(types, (n, len), device)?;
        let mask = Tensor::from_vec(mask, (n, len), device)?;
        let hidden = model.forward(&ids, &types, Some(&mask))?; // (n, len, dim)
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (n, dim)
        let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?; // (n, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let normalised = mean.broadcast_div(&norms)?;
        Ok(normalised.to_vec2::<f32>()?)
    }

    /// One padded ONNX Runtime run over `encodings`; mean pooling and normalisation here.
    fn forward_onnx(&self, encodings: &[&tokenizers::Encoding], session: &Mutex<ort::session::Session>, token_types: bool, output: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let rt = |e: ort::Error| ModelError::Runtime(e.to_string());
        let inputs = crate::onnxrt::encode(encodings, token_types)?;
        let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(inputs).map_err(rt)?;
        let (shape, hidden) = outputs[output].try_extract_tensor::<f32>().map_err(rt)?;
        let (n, dim) = (encodings.len(), self.dimensions);
        let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(1).max(1);
        if shape.len() != 3 || shape[0] as usize != n || shape[1] as usize != len || shape[2] as usize != dim {
            return Err(ModelError::Runtime(format!("the embedder returned a hidden state of shape {shape:?} for {n} texts of {len} tokens")));
        }
        Ok(encodings
            .iter()
            .enumerate()
            .map(|(row, e)| {
                let tokens = e.get_ids().len().max(1);
                let mut v = vec![0f32; dim];
                for t in 0..tokens {
                    let at = (row * len + t) * dim;
                    v.iter_mut().zip(&hidden[at..at + dim]).for_each(|(s, x)| *s += x);
                }
                let norm = v.iter().map(|x| (x / tokens as f32).powi(2)).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x = *x / tokens as f32 / norm);
                v
            })
            .collect())
    }

    /// Whether this embedder has lanes ([`crate::engine::Lanes`]).
    pub fn has_lanes(&self) -> bool {
        matches!(&self.backend, Backend::Onnx { lanes, .. } if lanes.threads.is_some())
    }

    /// Embeds one text on the lane of the calling thread (one of the lanes' pool).
    fn embed_on_lane(&self, text: &str) -> Result<Vec<f32>, ModelError> {
        let Backend::Onnx { lanes, token_types, output, .. } = &self.backend else {
            return Err(ModelError::Runtime("this embedder has no lanes".into()));
        };
        let encoding = self.tokenizer.encode(text, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut v = self.forward_onnx(&[&encoding], lanes.here(), *token_types, *output)?;
        v.pop().ok_or_else(|| ModelError::Runtime("a run gave no embedding".into()))
    }

    /// Token count of `text` without truncation (for tests and chunking decisions).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl crate::engine::Lanes for Embedder {
    fn count(&self) -> usize {
        match &self.backend {
            Backend::Onnx { lanes, .. } => lanes.sessions.len(),
            Backend::Candle { .. } => 0,
        }
    }

    fn spawn(self: Arc<Self>, work: crate::engine::LaneWork) {
        let Backend::Onnx { lanes: Lanes { threads: Some(threads), .. }, .. } = &self.backend else {
            // no lanes: the work runs here, each text on the whole embedder
            let embedder = self.clone();
            work(&move |text: &str| embedder.embed(&[text]).map(|mut v| v.pop().unwrap_or_default()));
            return;
        };
        let embedder = self.clone();
        threads.spawn(move || {
            // a panic must not reach rayon, which would abort the process (the work's own
            // guards still run while it unwinds)
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&|text: &str| embedder.embed_on_lane(text))));
        });
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

    /// The ONNX export of the embedder computes what candle computes (cosine ≥ 0.9999 for texts
    /// of very different lengths in one call, so padded passes too); the registry's checksum
    /// (of model.safetensors) is checked against the export's record of it; a cross-encoder
    /// export is not taken for an embedder.
    #[test]
    fn onnx_runtime_embeds_like_candle() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let (base, library) = (models.join("all-MiniLM-L6-v2"), models.join("onnxruntime/libonnxruntime.so.1.32.0"));
        if !base.join("model.safetensors").exists() || !library.exists() {
            eprintln!("MiniLM or ONNX Runtime not fetched (make models): skipping");
            return;
        }
        let library = library.to_str().unwrap();
        let dir = std::env::temp_dir().join(format!("lorag-embed-onnx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::copy(base.join(f), dir.join(f)).unwrap();
        }
        crate::cross::export_embedder(&dir).unwrap();
        let long = "the boundary layer on a flat plate in supersonic flow ".repeat(60);
        let texts = ["hnsw", "", "What is the lift of a swept wing at low speed?", long.as_str(), "a", "heat transfer in hypersonic flow"];
        let candle = Embedder::load(&dir, &Device::Cpu).unwrap();
        let sha = crate::sha256_file(&dir.join("model.safetensors")).unwrap();
        let onnx = Embedder::load_onnx(&dir, "cpu", library, Some(&sha)).unwrap();
        assert_eq!(onnx.dimensions, 384);
        assert_eq!(onnx.runtime, "onnxruntime CPUExecutionProvider");
        let Backend::Onnx { lanes: ref onnx_lanes, .. } = onnx.backend else { panic!("not on ONNX Runtime") };
        assert_eq!(onnx_lanes.sessions.len(), lanes().0, "one lane per core (up to {MAX_LANES}) on a machine with several");
        let together = onnx.embed(&texts).unwrap();
        for ((a, b), text) in candle.embed(&texts).unwrap().iter().zip(&together).zip(texts) {
            let cosine: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            assert!(cosine >= 0.9999, "cosine {cosine}");
            // the lanes (several texts) compute what a run on all cores does (one text)
            let alone = onnx.embed(&[text]).unwrap().pop().unwrap();
            let cosine: f32 = alone.iter().zip(b).map(|(x, y)| x * y).sum();
            assert!(cosine >= 0.99999, "\"{text}\" alone and among others: cosine {cosine}");
        }
        match Embedder::load_onnx(&dir, "cpu", library, Some(&"0".repeat(64))) {
            Err(ModelError::Checksum { actual, .. }) => assert_eq!(actual, sha),
            other => panic!("expected a checksum error, got {:?}", other.map(|e| e.runtime)),
        }
        assert_eq!(crate::onnx::source_sha256(&std::fs::read(dir.join("model.onnx")).unwrap()), Some(sha));
        // auto: ONNX Runtime with the library, candle without
        assert!(Runtime::Auto.onnx_for(&dir, library).unwrap());
        assert!(!Runtime::Auto.onnx_for(&dir, "").unwrap());
        let reranker = models.join("minilm-reranker");
        if reranker.join("model.onnx").exists() {
            match Embedder::load_onnx(&reranker, "cpu", library, None) {
                Err(ModelError::Unsuitable { detail, .. }) => assert!(detail.contains("not an embedder"), "{detail}"),
                other => panic!("a cross-encoder is not an embedder: {:?}", other.map(|e| e.runtime)),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
