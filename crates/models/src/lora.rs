//! LoRA in the model runtime: adapters sent with a request (parsed against the base model and
//! cached by checksum), and the row-streaming jobs — training an adapter and measuring
//! perplexity — that a backend drives with [`JobRequest`]s while it reads the table.
//!
//! A job is a short conversation on one connection: open, (count,)* feed*, finish. The model
//! process runs it on that connection's thread, beside the scheduler; without the worker the
//! backend runs the same [`Job`] itself.

use crate::engine::ModelSpec;
use crate::generate::Generator;
use crate::ModelError;
use candle_core::{Device, Tensor};
use lorag_lora::train::{block_loss, CausalLm, Progress, Summary, Trainer};
use lorag_lora::{Adapter, LoraConfig, LoraError, TrainConfig};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// An adapter as stored in `lorag.adapters`, sent along with a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterPayload {
    pub name: String,
    pub config: LoraConfig,
    /// sha256 of `weights`: the cache key, so a retrained adapter is never served stale.
    pub sha256: String,
    /// PEFT `adapter_model.safetensors` bytes.
    pub weights: Vec<u8>,
}

impl From<LoraError> for ModelError {
    fn from(e: LoraError) -> ModelError {
        match e {
            LoraError::Invalid(m) => ModelError::Invalid(m),
            LoraError::Runtime(m) => ModelError::Runtime(m),
            LoraError::Cancelled => ModelError::Runtime("cancelled".into()),
        }
    }
}

/// Parses `payload` for `generator`'s model, checking every tensor's name and shape.
pub fn parse_adapter(payload: &AdapterPayload, generator: &Generator) -> Result<Adapter, ModelError> {
    let c = &generator.model.config;
    Adapter::from_safetensors(payload.config.clone(), &payload.weights, c.num_hidden_layers, |m| c.module_dims(m), &generator.device())
        .map_err(|e| ModelError::Invalid(format!("adapter \"{}\": {e}", payload.name)))
}

impl CausalLm for Generator {
    fn block_logits(&self, tokens: &Tensor, adapter: Option<&Adapter>) -> candle_core::Result<Tensor> {
        self.model.block_logits(tokens, adapter)
    }
    fn num_layers(&self) -> usize {
        self.model.config.num_hidden_layers
    }
    fn module_dims(&self, m: usize) -> (usize, usize) {
        self.model.config.module_dims(m)
    }
    fn parameters(&self) -> usize {
        self.model.config.parameters()
    }
    fn end_token(&self) -> u32 {
        self.end_token
    }
    fn context_window(&self) -> usize {
        self.context_window()
    }
    fn device(&self) -> Device {
        self.device()
    }
}

/// What a backend opens a job with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobSpec {
    /// Train a new adapter on the rows that follow.
    Train { model: ModelSpec, adapter: String, lora: LoraConfig, train: TrainConfig, backend_pid: i32, user: String },
    /// Sum the next-token loss of the rows that follow, each row on its own, in windows of
    /// `seq_len` tokens.
    Perplexity { model: ModelSpec, adapter: Option<AdapterPayload>, seq_len: usize },
}

impl JobSpec {
    pub fn model(&self) -> &ModelSpec {
        match self {
            JobSpec::Train { model, .. } | JobSpec::Perplexity { model, .. } => model,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobRequest {
    /// Training only: rows counted before training, so the schedule knows its length.
    Count(Vec<String>),
    /// Rows to train on or to score.
    Feed(Vec<String>),
    Finish,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobResponse {
    Opened { trainable_parameters: usize, total_parameters: usize },
    Counted { tokens: u64 },
    /// Where training stands after a feed.
    Fed(Progress),
    Trained { summary: Summary, weights: Vec<u8>, sha256: String },
    Scored { nll: f64, tokens: u64 },
}

/// Who is training what, for the progress view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingStatus {
    pub adapter: String,
    pub model: String,
    pub backend_pid: i32,
    pub user: String,
    pub progress: Progress,
}

enum State {
    Train { trainer: Trainer<Generator>, planned: bool },
    Score { adapter: Option<Adapter>, seq_len: usize, nll: f64, tokens: u64 },
}

pub struct Job {
    generator: Arc<Generator>,
    state: Option<State>,
    pub status: Option<TrainingStatus>,
}

impl Job {
    /// Opens `spec` on `generator` (the spec's model, loaded).
    pub fn open(spec: JobSpec, generator: Arc<Generator>) -> Result<(Job, JobResponse), ModelError> {
        let total = generator.model.config.parameters();
        match spec {
            JobSpec::Train { model, adapter, lora, train, backend_pid, user } => {
                let trainer = Trainer::new(generator.clone(), lora, train)?;
                let opened = JobResponse::Opened { trainable_parameters: trainer.trainable_parameters(), total_parameters: total };
                let status = TrainingStatus { adapter, model: model.name, backend_pid, user, progress: Progress::default() };
                Ok((Job { generator, state: Some(State::Train { trainer, planned: false }), status: Some(status) }, opened))
            }
            JobSpec::Perplexity { adapter, seq_len, .. } => {
                if seq_len < 2 || seq_len > generator.context_window() {
                    return Err(ModelError::Invalid(format!("seq_len must be between 2 and {}, got {seq_len}", generator.context_window())));
                }
                let adapter = adapter.map(|p| parse_adapter(&p, &generator)).transpose()?;
                let trainable = adapter.as_ref().map_or(0, Adapter::parameters);
                let state = State::Score { adapter, seq_len, nll: 0.0, tokens: 0 };
                Ok((Job { generator, state: Some(state), status: None }, JobResponse::Opened { trainable_parameters: trainable, total_parameters: total }))
            }
        }
    }

    fn tokenize(&self, rows: &[String]) -> Result<Vec<Vec<u32>>, ModelError> {
        rows.iter().map(|r| self.generator.encode(r)).collect()
    }

    /// Handles one request; `keep_going` sees every training step's progress and stops the run
    /// by answering `false`.
    pub fn handle(&mut self, request: JobRequest, keep_going: &mut dyn FnMut(&Progress) -> bool) -> Result<JobResponse, ModelError> {
        let gone = || ModelError::Invalid("this job has finished".into());
        match request {
            JobRequest::Count(rows) => {
                let tokens = self.tokenize(&rows)?;
                let Some(State::Train { trainer, planned: false }) = self.state.as_mut() else {
                    return Err(ModelError::Invalid("rows are counted only before a training job's first feed".into()));
                };
                trainer.count(&tokens);
                Ok(JobResponse::Counted { tokens: tokens.iter().map(|t| t.len() as u64 + 1).sum() })
            }
            JobRequest::Feed(rows) => {
                let tokens = self.tokenize(&rows)?;
                match self.state.as_mut().ok_or_else(gone)? {
                    State::Train { trainer, planned } => {
                        if !*planned {
                            trainer.plan()?;
                            *planned = true;
                        }
                        let status = &mut self.status;
                        trainer.feed(&tokens, &mut |p| {
                            if let Some(s) = status.as_mut() {
                                s.progress = p.clone();
                            }
                            keep_going(p)
                        })?;
                        Ok(JobResponse::Fed(trainer.progress().clone()))
                    }
                    State::Score { adapter, seq_len, nll, tokens: scored } => {
                        for row in &tokens {
                            let (n, t) = score(&self.generator, adapter.as_ref(), row, *seq_len, &mut || {
                                keep_going(&Progress { tokens: *scored, ..Progress::default() })
                            })?;
                            *nll += n;
                            *scored += t;
                        }
                        Ok(JobResponse::Fed(Progress { tokens: *scored, ..Progress::default() }))
                    }
                }
            }
            JobRequest::Finish => match self.state.take().ok_or_else(gone)? {
                State::Train { mut trainer, planned } => {
                    if !planned {
                        trainer.plan()?;
                    }
                    let (adapter, summary) = trainer.finish(keep_going)?;
                    let weights = adapter.to_safetensors()?;
                    let sha256 = lorag_lora::adapter::sha256(&weights);
                    Ok(JobResponse::Trained { summary, weights, sha256 })
                }
                State::Score { nll, tokens, .. } => Ok(JobResponse::Scored { nll, tokens }),
            },
        }
    }
}

/// Summed next-token loss of one row and the number of tokens it predicts: the row follows the
/// end token (so its first token is predicted too), in windows of `seq_len`, each window alone.
/// `keep_going` is asked before every window; `false` stops (query cancel).
fn score(
    generator: &Generator,
    adapter: Option<&Adapter>,
    row: &[u32],
    seq_len: usize,
    keep_going: &mut dyn FnMut() -> bool,
) -> Result<(f64, u64), ModelError> {
    let mut ids = Vec::with_capacity(row.len() + 1);
    ids.push(generator.end_token);
    ids.extend_from_slice(row);
    let mut nll = 0.0;
    let mut count = 0u64;
    let mut start = 0;
    while start + 1 < ids.len() {
        if !keep_going() {
            return Err(LoraError::Cancelled.into());
        }
        let end = (start + seq_len).min(ids.len());
        let window = Tensor::new(&ids[start..end], &generator.device())?.unsqueeze(0)?;
        let predicted = (end - start - 1) as u64;
        let mean = block_loss(generator, &window, adapter)?.to_scalar::<f32>()? as f64;
        nll += mean * predicted as f64;
        count += predicted;
        start = end - 1;
    }
    Ok((nll, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::KvCache;
    use lorag_lora::adapter::Pair;
    use std::path::Path;

    fn smollm2() -> Option<Arc<Generator>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct");
        if !dir.join("model.safetensors").exists() {
            eprintln!("SmolLM2 not fetched (make models): skipping");
            return None;
        }
        Some(Arc::new(Generator::load(&dir, &Device::Cpu).unwrap()))
    }

    /// A small random adapter on q and v of every layer.
    fn adapter(g: &Generator, seed: u64) -> Adapter {
        let config = LoraConfig { rank: 4, alpha: 8.0, target_modules: vec!["q_proj".into(), "v_proj".into()], base_model: "s".into() };
        let c = &g.model.config;
        let layers = (0..c.num_hidden_layers)
            .map(|_| {
                let mut l: [Option<Pair>; 7] = Default::default();
                for m in [0usize, 2] {
                    let (i, o) = c.module_dims(m);
                    let a = (Tensor::randn(0f32, 1.0, (4, i), &Device::Cpu).unwrap() * (0.05 * seed as f64)).unwrap();
                    let b = (Tensor::randn(0f32, 1.0, (o, 4), &Device::Cpu).unwrap() * 0.05).unwrap();
                    l[m] = Some(Pair { a, b });
                }
                l
            })
            .collect();
        Adapter { config, layers }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn block_forward_matches_decoding_and_adapters_stay_per_stream() {
        let Some(g) = smollm2() else { return };
        let ids = g.encode("PostgreSQL stores tables in pages of eight kilobytes.").unwrap();
        let other = g.encode("The wind tunnel measured the lift of the wing.").unwrap();
        let a = adapter(&g, 1);
        // the training/perplexity forward and the decoding forward agree, with and without adapter
        for ad in [None, Some(&a)] {
            let blocks = g.model.block_logits(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), ad).unwrap();
            let last = blocks.get(0).unwrap().get(ids.len() - 1).unwrap();
            let mut cache = KvCache::default();
            let dec = g.model.forward(&mut [(ids.as_slice(), &mut cache, ad)]).unwrap().get(0).unwrap();
            assert!(max_diff(&last, &dec) < 2e-3, "{}", max_diff(&last, &dec));
        }
        // two streams in one batch, one with an adapter: each equals its own run alone
        let alone = |t: &[u32], ad: Option<&Adapter>| {
            let mut c = KvCache::default();
            g.model.forward(&mut [(t, &mut c, ad)]).unwrap().get(0).unwrap()
        };
        let (mut c1, mut c2) = (KvCache::default(), KvCache::default());
        let both = g.model.forward(&mut [(ids.as_slice(), &mut c1, Some(&a)), (other.as_slice(), &mut c2, None)]).unwrap();
        assert!(max_diff(&both.get(0).unwrap(), &alone(&ids, Some(&a))) < 1e-4);
        assert!(max_diff(&both.get(1).unwrap(), &alone(&other, None)) < 1e-4);
        assert!(max_diff(&alone(&ids, Some(&a)), &alone(&ids, None)) > 1e-3, "the adapter changes the output");
    }

    #[test]
    fn training_job_learns_and_perplexity_of_the_base_is_unchanged() {
        let Some(g) = smollm2() else { return };
        let spec = ModelSpec::new("s", "/", None, "cpu");
        let rows: Vec<String> = (0..40).map(|i| format!("Record {i}: the zebra code of lorag is {}.", i * 7 % 13)).collect();
        let held: Vec<String> = (40..48).map(|i| format!("Record {i}: the zebra code of lorag is {}.", i * 7 % 13)).collect();
        let ppl = |adapter: Option<AdapterPayload>, rows: &[String]| {
            let (mut job, _) = Job::open(JobSpec::Perplexity { model: spec.clone(), adapter, seq_len: 64 }, g.clone()).unwrap();
            job.handle(JobRequest::Feed(rows.to_vec()), &mut |_| true).unwrap();
            match job.handle(JobRequest::Finish, &mut |_| true).unwrap() {
                JobResponse::Scored { nll, tokens } => (nll / tokens as f64).exp(),
                other => panic!("{other:?}"),
            }
        };
        let base = ppl(None, &held);
        let lora = LoraConfig { rank: 8, alpha: 16.0, target_modules: vec!["q_proj".into(), "v_proj".into()], base_model: "s".into() };
        let train = TrainConfig { seq_len: 32, batch_size: 4, epochs: 2, learning_rate: 3e-3, ..TrainConfig::default() };
        let spec_t = JobSpec::Train { model: spec.clone(), adapter: "z".into(), lora: lora.clone(), train, backend_pid: 1, user: "u".into() };
        let (mut job, _) = Job::open(spec_t, g.clone()).unwrap();
        job.handle(JobRequest::Count(rows.clone()), &mut |_| true).unwrap();
        for _ in 0..2 {
            job.handle(JobRequest::Feed(rows.clone()), &mut |_| true).unwrap();
        }
        let JobResponse::Trained { weights, sha256, summary } = job.handle(JobRequest::Finish, &mut |_| true).unwrap() else { panic!() };
        assert_eq!(summary.progress.step, summary.progress.total_steps);
        let payload = AdapterPayload { name: "z".into(), config: lora, sha256, weights };
        let tuned = ppl(Some(payload), &held);
        assert!(tuned < base * 0.85, "held-out perplexity {base} → {tuned}");
        assert_eq!(ppl(None, &held), base, "the base model is untouched");
    }
}
