//! The training loop: rows arrive as token lists (in batches, so a table larger than memory
//! streams through), are packed end to end into `seq_len` blocks, shuffled within a window,
//! and every `batch_size` blocks make one AdamW step on the adapter's A and B, with warm-up and
//! cosine decay, global gradient clipping and a seed. The base model is only read.

use crate::adapter::{Adapter, Pair};
use crate::config::{LoraConfig, TrainConfig};
use crate::{LoraError, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

/// A causal language model that can run with an adapter added to its frozen weights.
pub trait CausalLm {
    /// Logits (blocks, positions, vocab) for token blocks (blocks, positions), with `adapter`'s
    /// terms added. Differentiable in the adapter's weights when they are variables.
    fn block_logits(&self, tokens: &Tensor, adapter: Option<&Adapter>) -> candle_core::Result<Tensor>;
    fn num_layers(&self) -> usize;
    /// (inputs, outputs) of module `m` of [`crate::MODULES`].
    fn module_dims(&self, m: usize) -> (usize, usize);
    /// Parameters of the base model.
    fn parameters(&self) -> usize;
    /// The token that ends a row when rows are packed.
    fn end_token(&self) -> u32;
    fn context_window(&self) -> usize;
    fn device(&self) -> Device;
}

/// Mean next-token cross-entropy of token blocks (blocks, positions) and the number of
/// predicted tokens.
pub fn block_loss<M: CausalLm + ?Sized>(model: &M, blocks: &Tensor, adapter: Option<&Adapter>) -> candle_core::Result<Tensor> {
    let (b, l) = blocks.dims2()?;
    let logits = model.block_logits(&blocks.narrow(1, 0, l - 1)?, adapter)?;
    let vocab = logits.dim(2)?;
    let targets = blocks.narrow(1, 1, l - 1)?.reshape(b * (l - 1))?;
    crate::ops::cross_entropy(&logits.reshape((b * (l - 1), vocab))?, &targets)
}

/// Where a training run stands; sent as progress and kept for the progress view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    /// Loss of the last step, and the mean over the last steps (up to 10).
    pub loss: f64,
    pub mean_loss: f64,
    pub learning_rate: f64,
    /// Tokens trained on so far.
    pub tokens: u64,
    pub tokens_per_second: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
    pub done: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub progress: Progress,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
}

/// Blocks kept back to shuffle among (a window: the table streams through).
const SHUFFLE_BLOCKS: usize = 64;

pub struct Trainer<M: CausalLm> {
    model: Arc<M>,
    lora: LoraConfig,
    train: TrainConfig,
    /// (layer, module, A, B)
    vars: Vec<(usize, usize, Var, Var)>,
    optimizer: AdamW,
    rng: StdRng,
    /// Tokens not yet in a block.
    pending: Vec<u32>,
    blocks: Vec<Vec<u32>>,
    counted: u64,
    progress: Progress,
    recent: Vec<f64>,
    started: Instant,
}

impl<M: CausalLm> Trainer<M> {
    /// A new adapter for `model`: A drawn like PEFT's (Kaiming-uniform, bound 1/√in) from `seed`,
    /// B zero, so training starts from the base model exactly.
    pub fn new(model: Arc<M>, lora: LoraConfig, train: TrainConfig) -> Result<Trainer<M>> {
        lora.validate()?;
        train.validate(model.context_window())?;
        let device = model.device();
        let mut rng = StdRng::seed_from_u64(train.seed);
        let mut vars = Vec::new();
        for layer in 0..model.num_layers() {
            for m in lora.module_indexes() {
                let (inp, out) = model.module_dims(m);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..lora.rank * inp).map(|_| rng.random_range(-bound..bound)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (lora.rank, inp), &device)?)?;
                let b = Var::zeros((out, lora.rank), DType::F32, &device)?;
                vars.push((layer, m, a, b));
            }
        }
        let all: Vec<Var> = vars.iter().flat_map(|(_, _, a, b)| [a.clone(), b.clone()]).collect();
        let params = ParamsAdamW { lr: train.learning_rate, weight_decay: train.weight_decay, ..ParamsAdamW::default() };
        let optimizer = AdamW::new(all, params)?;
        Ok(Trainer {
            model,
            lora,
            train,
            vars,
            optimizer,
            rng,
            pending: Vec::new(),
            blocks: Vec::new(),
            counted: 0,
            progress: Progress::default(),
            recent: Vec::new(),
            started: Instant::now(),
        })
    }

    pub fn trainable_parameters(&self) -> usize {
        self.vars.iter().map(|(_, _, a, b)| a.elem_count() + b.elem_count()).sum()
    }

    /// Counts the tokens of a batch of rows before training (the plan needs the total).
    pub fn count(&mut self, rows: &[Vec<u32>]) {
        self.counted += rows.iter().map(|r| r.len() as u64 + 1).sum::<u64>();
    }

    /// Fixes the number of steps from the counted tokens; an error when they do not make one block.
    pub fn plan(&mut self) -> Result<usize> {
        let per_epoch = (self.counted / self.train.seq_len as u64) as usize;
        if per_epoch == 0 {
            return Err(LoraError::Invalid(format!(
                "the source has {} tokens, fewer than one block of seq_len {}",
                self.counted, self.train.seq_len
            )));
        }
        let steps = (per_epoch * self.train.epochs).div_ceil(self.train.batch_size);
        self.progress.total_steps = self.train.max_steps.map_or(steps, |m| m.min(steps));
        self.started = Instant::now();
        Ok(self.progress.total_steps)
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    fn adapter(&self) -> Adapter {
        let mut layers: Vec<[Option<Pair>; 7]> = (0..self.model.num_layers()).map(|_| Default::default()).collect();
        for (l, m, a, b) in &self.vars {
            layers[*l][*m] = Some(Pair { a: a.as_tensor().clone(), b: b.as_tensor().clone() });
        }
        Adapter { config: self.lora.clone(), layers }
    }

    /// Packs `rows` into blocks and trains on them, a step whenever the shuffle window is full.
    /// `keep_going` is asked after every step (with the progress); `false` stops the run.
    pub fn feed(&mut self, rows: &[Vec<u32>], keep_going: &mut dyn FnMut(&Progress) -> bool) -> Result<()> {
        let end = self.model.end_token();
        for row in rows {
            if self.progress.done {
                return Ok(());
            }
            self.pending.extend_from_slice(row);
            self.pending.push(end);
            // whole blocks off the front (one pass, however long the row), training as the window fills
            let full = self.pending.len() / self.train.seq_len * self.train.seq_len;
            let mut taken = 0;
            while taken < full && !self.progress.done {
                self.blocks.push(self.pending[taken..taken + self.train.seq_len].to_vec());
                taken += self.train.seq_len;
                while self.blocks.len() >= SHUFFLE_BLOCKS.max(self.train.batch_size) && !self.progress.done {
                    self.step(keep_going)?;
                }
            }
            self.pending.drain(..taken);
        }
        Ok(())
    }

    /// Trains on what is left (a last, possibly smaller batch) and returns the adapter.
    pub fn finish(mut self, keep_going: &mut dyn FnMut(&Progress) -> bool) -> Result<(Adapter, Summary)> {
        while !self.blocks.is_empty() && !self.progress.done {
            self.step(keep_going)?;
        }
        self.progress.done = true;
        let summary = Summary {
            progress: self.progress.clone(),
            trainable_parameters: self.trainable_parameters(),
            total_parameters: self.model.parameters(),
        };
        Ok((self.adapter(), summary))
    }

    fn step(&mut self, keep_going: &mut dyn FnMut(&Progress) -> bool) -> Result<()> {
        let n = self.train.batch_size.min(self.blocks.len());
        let mut batch: Vec<u32> = Vec::with_capacity(n * self.train.seq_len);
        for _ in 0..n {
            let i = self.rng.random_range(0..self.blocks.len());
            batch.extend(self.blocks.swap_remove(i));
        }
        let device = self.model.device();
        let tokens = Tensor::from_vec(batch, (n, self.train.seq_len), &device)?;
        let lr = self.train.learning_rate_at(self.progress.step, self.progress.total_steps);
        self.optimizer.set_learning_rate(lr);
        let adapter = self.adapter();
        let loss = block_loss(&*self.model, &tokens, Some(&adapter))?;
        let mut grads = loss.backward()?;
        // global L2 norm over every A and B, clipped to max_grad_norm
        let mut sq = 0f64;
        for (_, _, a, b) in &self.vars {
            for v in [a, b] {
                if let Some(g) = grads.get(v) {
                    sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
            }
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(LoraError::Runtime(format!("the gradient became {norm} at step {}; lower learning_rate", self.progress.step + 1)));
        }
        if norm > self.train.max_grad_norm {
            let k = self.train.max_grad_norm / norm;
            for (_, _, a, b) in &self.vars {
                for v in [a, b] {
                    if let Some(g) = grads.remove(v) {
                        grads.insert(v, (g * k)?);
                    }
                }
            }
        }
        self.optimizer.step(&grads)?;
        let loss = loss.to_scalar::<f32>()? as f64;
        let p = &mut self.progress;
        p.step += 1;
        p.loss = loss;
        self.recent.push(loss);
        if self.recent.len() > 10 {
            self.recent.remove(0);
        }
        p.mean_loss = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        p.learning_rate = lr;
        p.tokens += (n * self.train.seq_len) as u64;
        p.elapsed_s = self.started.elapsed().as_secs_f64();
        p.tokens_per_second = p.tokens as f64 / p.elapsed_s.max(1e-9);
        p.eta_s = p.elapsed_s / p.step as f64 * p.total_steps.saturating_sub(p.step) as f64;
        p.done = p.step >= p.total_steps;
        if !keep_going(p) {
            return Err(LoraError::Cancelled);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    /// A one-layer toy language model: embedding → q_proj → tied output, enough to train.
    struct Toy {
        embed: Tensor,
        q: Tensor,
    }

    impl CausalLm for Toy {
        fn block_logits(&self, tokens: &Tensor, adapter: Option<&Adapter>) -> candle_core::Result<Tensor> {
            let (b, l) = tokens.dims2()?;
            let x = candle_nn::Embedding::new(self.embed.clone(), 8).forward(&tokens.flatten_all()?)?;
            let mut h = crate::frozen::frozen_matmul(&x, &self.q)?;
            if let Some(d) = adapter.map(|a| a.delta(0, 0, &x)).transpose()?.flatten() {
                h = (h + d)?;
            }
            crate::frozen::frozen_matmul(&h, &self.embed)?.reshape((b, l, 16))
        }
        fn num_layers(&self) -> usize {
            1
        }
        fn module_dims(&self, _m: usize) -> (usize, usize) {
            (8, 8)
        }
        fn parameters(&self) -> usize {
            16 * 8 + 64
        }
        fn end_token(&self) -> u32 {
            0
        }
        fn context_window(&self) -> usize {
            64
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
    }

    fn toy() -> Arc<Toy> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut r = |n: usize| Tensor::from_vec((0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        Arc::new(Toy { embed: r(128).reshape((16, 8)).unwrap(), q: r(64).reshape((8, 8)).unwrap() })
    }

    fn run(model: Arc<Toy>, seed: u64) -> (Adapter, Summary) {
        let lora = LoraConfig { rank: 4, alpha: 8.0, target_modules: vec!["q_proj".into()], base_model: "toy".into() };
        let train = TrainConfig { seq_len: 8, batch_size: 4, epochs: 30, learning_rate: 0.05, seed, ..TrainConfig::default() };
        // a repeating pattern the base model does not know
        let rows: Vec<Vec<u32>> = (0..8).map(|i| (0..15).map(|j| 1 + ((i + j) % 5) as u32).collect()).collect();
        let mut t = Trainer::new(model, lora, train).unwrap();
        t.count(&rows); // one epoch's rows
        assert_eq!(t.plan().unwrap(), (30 * 8 * 16 / 8usize).div_ceil(4));
        for _ in 0..30 {
            t.feed(&rows, &mut |_| true).unwrap();
        }
        t.finish(&mut |_| true).unwrap()
    }

    #[test]
    fn learns_leaves_the_base_alone_and_repeats_with_a_seed() {
        let model = toy();
        let before = (model.embed.to_vec2::<f32>().unwrap(), model.q.to_vec2::<f32>().unwrap());
        let blocks = Tensor::new(&[[1u32, 2, 3, 4, 5, 1, 2, 3]], &Device::Cpu).unwrap();
        let base_loss = block_loss(&*model, &blocks, None).unwrap().to_scalar::<f32>().unwrap();
        let (adapter, summary) = run(model.clone(), 3);
        let tuned = block_loss(&*model, &blocks, Some(&adapter)).unwrap().to_scalar::<f32>().unwrap();
        assert!(tuned < base_loss * 0.8, "loss {base_loss} → {tuned}");
        assert!(summary.progress.done && summary.progress.step == summary.progress.total_steps);
        assert_eq!(summary.trainable_parameters, 4 * 8 * 2);
        // the base is untouched, and so is its loss
        assert_eq!((model.embed.to_vec2::<f32>().unwrap(), model.q.to_vec2::<f32>().unwrap()), before);
        assert_eq!(block_loss(&*model, &blocks, None).unwrap().to_scalar::<f32>().unwrap(), base_loss);
        // same seed, same adapter; another seed, another one
        let again = run(model.clone(), 3).0.to_safetensors().unwrap();
        assert_eq!(again, adapter.to_safetensors().unwrap());
        assert_ne!(run(model, 4).0.to_safetensors().unwrap(), again);
    }

    #[test]
    fn too_little_text_and_cancel() {
        let lora = LoraConfig { rank: 2, alpha: 2.0, target_modules: vec!["q_proj".into()], base_model: "toy".into() };
        let train = TrainConfig { seq_len: 32, batch_size: 1, ..TrainConfig::default() };
        let mut t = Trainer::new(toy(), lora.clone(), train.clone()).unwrap();
        t.count(&[vec![1, 2, 3]]);
        assert!(matches!(t.plan(), Err(LoraError::Invalid(m)) if m.contains("fewer than one block")));
        let mut t = Trainer::new(toy(), lora, TrainConfig { seq_len: 4, ..train }).unwrap();
        let rows: Vec<Vec<u32>> = (0..200).map(|_| vec![1, 2, 3]).collect();
        t.count(&rows);
        t.plan().unwrap();
        let mut calls = 0;
        let r = t.feed(&rows, &mut |_| {
            calls += 1;
            calls < 3
        });
        assert_eq!(r, Err(LoraError::Cancelled));
        assert_eq!(calls, 3);
    }
}
