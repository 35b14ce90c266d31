//! Text generation with LLaMA-family decoders (SmolLM2 by default; Llama and Qwen2 configs).
//!
//! Follows candle's model shape (`Config` from `config.json`, weights by checkpoint name), with
//! one difference that is the point of this file: the KV cache lives outside the model, one per
//! stream, and [`Llama::forward`] takes *several* streams at once. The new tokens of every
//! stream (a whole prompt for a new one, one token for the others) go through each weight
//! matrix as one matrix product; only attention runs per stream, against that stream's cache.
//! Decoding is bound by reading the weights, so N streams decoded together cost about one.
//!
//! Weights are F32 (safetensors, F32 or BF16 on disk) or, for a GGUF file, 8-bit blocks
//! ([`Weight::Q8`]): decoding steps multiply straight from the blocks (a quarter of the bytes
//! to read per token), prompts and training dequantize one matrix at a time.
//!
//! Prompts use the chat template of `tokenizer_config.json` (rendered with minijinja); context
//! passages (retrieved rows) are cut, last first, to fit the model's context window, never the
//! question.

use crate::engine::ModelSpec;
use crate::lora::AdapterPayload;
use lorag_lora::Adapter;
use std::sync::Arc;
use crate::q8::Q8Matrix;
use crate::ModelError;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;
use tokenizers::Tokenizer;

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

/// A frozen weight matrix (out × in).
enum Weight {
    F32(Tensor),
    /// 8-bit blocks, for GGUF models ([`crate::q8`]).
    Q8(Q8Matrix),
}

impl Weight {
    /// `x · Wᵀ`: on the 8-bit blocks themselves where [`Q8Matrix::multiplies`] that many rows;
    /// otherwise, and for training (gradients), through the F32 matrix, dequantized for the call.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weight::F32(w) => linear(x, w),
            Weight::Q8(q) => {
                if q.multiplies(x.dims2()?.0) && !x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 {
                    q.matmul(x)
                } else {
                    lorag_lora::frozen::frozen_matmul(x, &q.dequantize(x.device())?)
                }
            }
        }
    }

    /// Turns into 8-bit blocks, where the rows split into whole blocks (else stays as it is).
    fn quantize(&mut self) -> candle_core::Result<()> {
        if let Weight::F32(w) = self {
            if Q8Matrix::fits(w)? {
                let q = Q8Matrix::quantize(w)?;
                *self = Weight::Q8(q);
            }
        }
        Ok(())
    }

    /// Bytes one pass over the matrix reads.
    fn bytes(&self) -> usize {
        match self {
            Weight::F32(w) => w.elem_count() * 4,
            Weight::Q8(q) => q.bytes(),
        }
    }
}

/// A linear map: weight and optional bias.
struct Lin {
    w: Weight,
    b: Option<Tensor>,
}

impl Lin {
    fn load(vb: &VarBuilder, inputs: usize, outputs: usize, bias: bool) -> candle_core::Result<Lin> {
        let w = vb.get((outputs, inputs), "weight")?;
        let b = if bias { Some(vb.get(outputs, "bias")?) } else { None };
        Ok(Lin { w: Weight::F32(w), b })
    }
}

/// The linear maps of a layer, in the order of [`lorag_lora::MODULES`] (q, k, v, o, gate, up, down).
struct Layer {
    lin: [Lin; 7],
    ln1: RmsNorm,
    ln2: RmsNorm,
    ln1_w: Tensor,
    ln2_w: Tensor,
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

impl Config {
    /// (inputs, outputs) of module `m` of [`lorag_lora::MODULES`].
    pub fn module_dims(&self, m: usize) -> (usize, usize) {
        let h = self.hidden_size;
        let head_dim = h / self.num_attention_heads;
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads) * head_dim;
        match m {
            Q => (h, self.num_attention_heads * head_dim),
            K | V => (h, kv),
            O => (self.num_attention_heads * head_dim, h),
            GATE | UP => (h, self.intermediate_size),
            _ => (self.intermediate_size, h),
        }
    }

    /// Parameters of the model (embedding, layers, final norm, output head unless tied).
    pub fn parameters(&self) -> usize {
        let h = self.hidden_size;
        let layer: usize = (0..7).map(|m| { let (i, o) = self.module_dims(m); i * o }).sum::<usize>() + 2 * h;
        let qkv_bias = if self.model_type.as_deref() == Some("qwen2") { self.module_dims(Q).1 + 2 * self.module_dims(K).1 } else { 0 };
        let head = if self.tie_word_embeddings { 0 } else { h * self.vocab_size };
        self.vocab_size * h + self.num_hidden_layers * (layer + qkv_bias) + h + head
    }
}

/// A stream's rows within a batch: (first row, rows, its adapter).
type Segment<'a> = (usize, usize, Option<&'a Adapter>);

pub struct Llama {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    norm_w: Tensor,
    lm_head: Weight,
    cos: Tensor,
    sin: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    pub config: Config,
}

/// One stream's keys and values, per layer: (kv_heads, capacity, head_dim) each, written in
/// place; the first `position` positions hold values.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pub position: usize,
}

impl KvCache {
    /// Writes the keys and values `k`, `v` (kv_heads, n, head_dim) of the next `n` positions of
    /// layer `li` (of `layers`) in place, and returns that layer's buffers. A full buffer is
    /// copied into one twice its size (never past `window` positions unless more are needed),
    /// so a step writes only its own positions where concatenating copied the whole cache.
    fn append(&mut self, li: usize, layers: usize, window: usize, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        if self.layers.len() < layers {
            self.layers.resize_with(layers, || None);
        }
        let (heads, n, hd) = k.dims3()?;
        let needed = self.position + n;
        let capacity = self.layers[li].as_ref().map_or(0, |(kc, _)| kc.dim(1).unwrap_or(0));
        if capacity < needed {
            let grown = needed.next_power_of_two().max(KV_MIN_CAPACITY).min(window).max(needed);
            let resize = |old: Option<&Tensor>| -> candle_core::Result<Tensor> {
                let buffer = Tensor::zeros((heads, grown, hd), k.dtype(), k.device())?;
                if let Some(old) = old.filter(|_| self.position > 0) {
                    buffer.slice_set(&old.narrow(1, 0, self.position)?.contiguous()?, 1, 0)?;
                }
                Ok(buffer)
            };
            let old = self.layers[li].take();
            self.layers[li] = Some((resize(old.as_ref().map(|o| &o.0))?, resize(old.as_ref().map(|o| &o.1))?));
        }
        let (kc, vc) = self.layers[li].clone().expect("the layer's buffers were made above");
        kc.slice_set(&k.contiguous()?, 1, self.position)?;
        vc.slice_set(&v.contiguous()?, 1, self.position)?;
        Ok((kc, vc))
    }
}

/// Positions a stream's cache holds at first (it doubles when full).
const KV_MIN_CAPACITY: usize = 64;

impl Llama {
    pub fn load(vb: VarBuilder, config: Config) -> candle_core::Result<Llama> {
        let heads = config.num_attention_heads;
        let kv_heads = config.num_key_value_heads.unwrap_or(heads);
        let head_dim = config.hidden_size / heads;
        let h = config.hidden_size;
        // Qwen2 puts biases on q, k and v; Llama and SmolLM2 have none.
        let qkv_bias = config.model_type.as_deref() == Some("qwen2");
        let embed = candle_nn::embedding(config.vocab_size, h, vb.pp("model.embed_tokens"))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let vb = vb.pp(format!("model.layers.{i}"));
            let att = vb.pp("self_attn");
            let mlp = vb.pp("mlp");
            let ln1 = candle_nn::rms_norm(h, config.rms_norm_eps, vb.pp("input_layernorm"))?;
            let ln2 = candle_nn::rms_norm(h, config.rms_norm_eps, vb.pp("post_attention_layernorm"))?;
            layers.push(Layer {
                lin: [
                    Lin::load(&att.pp("q_proj"), h, heads * head_dim, qkv_bias)?,
                    Lin::load(&att.pp("k_proj"), h, kv_heads * head_dim, qkv_bias)?,
                    Lin::load(&att.pp("v_proj"), h, kv_heads * head_dim, qkv_bias)?,
                    Lin::load(&att.pp("o_proj"), heads * head_dim, h, false)?,
                    Lin::load(&mlp.pp("gate_proj"), h, config.intermediate_size, false)?,
                    Lin::load(&mlp.pp("up_proj"), h, config.intermediate_size, false)?,
                    Lin::load(&mlp.pp("down_proj"), config.intermediate_size, h, false)?,
                ],
                ln1_w: ln1.clone().into_inner().weight().clone(),
                ln2_w: ln2.clone().into_inner().weight().clone(),
                ln1,
                ln2,
            });
        }
        let norm = candle_nn::rms_norm(h, config.rms_norm_eps, vb.pp("model.norm"))?;
        let lm_head = Weight::F32(if config.tie_word_embeddings {
            embed.embeddings().clone()
        } else {
            vb.pp("lm_head").get((config.vocab_size, h), "weight")?
        });
        let device = vb.device();
        let inv: Vec<f32> =
            (0..head_dim / 2).map(|i| 1.0 / (config.rope_theta as f32).powf(2.0 * i as f32 / head_dim as f32)).collect();
        let inv = Tensor::new(inv, device)?.unsqueeze(0)?;
        let t = Tensor::arange(0u32, config.max_position_embeddings as u32, device)?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let freqs = t.broadcast_mul(&inv)?;
        Ok(Llama { embed, layers, norm_w: norm.clone().into_inner().weight().clone(), norm, lm_head, cos: freqs.cos()?, sin: freqs.sin()?, heads, kv_heads, head_dim, config })
    }

    /// Serves the linear maps and the output head from 8-bit blocks (the token embedding
    /// stays F32: it is looked up, not multiplied).
    fn quantize(&mut self) -> candle_core::Result<()> {
        for layer in &mut self.layers {
            for lin in &mut layer.lin {
                lin.w.quantize()?;
            }
        }
        self.lm_head.quantize()
    }

    /// Bytes of weights one decoding step reads: every linear map and the output head.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self.layers.iter().map(|l| l.lin.iter().map(|m| m.w.bytes()).sum::<usize>() + 2 * 4 * self.config.hidden_size).sum();
        layers + self.lm_head.bytes() + 4 * self.config.hidden_size
    }

    /// Module `m` of layer `li` on `x` (rows × in): the frozen map for all rows, plus each
    /// segment's adapter term on its own rows. Differentiable in the adapters' weights (and in
    /// `x`), never in the frozen weights.
    fn project(&self, li: usize, m: usize, x: &Tensor, segments: &[Segment]) -> candle_core::Result<Tensor> {
        let lin = &self.layers[li].lin[m];
        let mut y = lin.w.forward(x)?;
        if let Some(b) = &lin.b {
            y = y.broadcast_add(b)?;
        }
        if !segments.iter().any(|(_, _, a)| a.is_some_and(|a| a.adapts(li, m))) {
            return Ok(y);
        }
        let out = y.dim(1)?;
        let mut parts = Vec::with_capacity(segments.len());
        for &(first, rows, adapter) in segments {
            let delta = match adapter {
                Some(a) => a.delta(li, m, &x.narrow(0, first, rows)?)?,
                None => None,
            };
            parts.push(match delta {
                Some(d) => d,
                None => Tensor::zeros((rows, out), y.dtype(), y.device())?,
            });
        }
        y + Tensor::cat(&parts, 0)?
    }

    /// Runs the new `tokens` of each stream (after what its cache holds), each with its own
    /// adapter (or none), and returns the next-token logits of each stream, (streams, vocab).
    pub fn forward(&self, batch: &mut [(&[u32], &mut KvCache, Option<&Adapter>)]) -> candle_core::Result<Tensor> {
        let device = self.cos.device();
        let all: Vec<u32> = batch.iter().flat_map(|(t, _, _)| t.iter().copied()).collect();
        let mut segments: Vec<Segment> = Vec::with_capacity(batch.len());
        let mut first = 0;
        for (t, _, a) in batch.iter() {
            segments.push((first, t.len(), *a));
            first += t.len();
        }
        let mut x = self.embed.forward(&Tensor::new(all.as_slice(), device)?)?; // (T, hidden)
        let rows = all.len();
        // every new token's own position, for its rotation
        let positions: Vec<u32> =
            batch.iter().flat_map(|(t, c, _)| (c.position..c.position + t.len()).map(|p| p as u32)).collect();
        let positions = Tensor::new(positions.as_slice(), device)?;
        let (cos, sin) = (self.cos.index_select(&positions, 0)?, self.sin.index_select(&positions, 0)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let rep = self.heads / self.kv_heads;
        let hd = self.head_dim;
        // (T, heads·hd) → (1, heads, T, hd): all streams' tokens in one layout, one rotation
        let heads_first = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            t.reshape((rows, heads, hd))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)
        };
        // each stream's new positions in chunks of query rows, with their causal masks (the
        // same in every layer)
        let chunks: Vec<Vec<(usize, usize, Option<Tensor>)>> = batch
            .iter()
            .map(|(t, c, _)| {
                if t.len() == 1 {
                    return Ok(vec![(0, 1, None)]);
                }
                (0..t.len())
                    .step_by(ATTENTION_ROWS)
                    .map(|first| {
                        let len = ATTENTION_ROWS.min(t.len() - first);
                        Ok((first, len, Some(causal_mask(len, c.position + first, device)?)))
                    })
                    .collect()
            })
            .collect::<candle_core::Result<_>>()?;
        let by_hand = device.is_cpu() && x.dtype() == DType::F32;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.ln1.forward(&x)?;
            let q = (candle_nn::rotary_emb::rope(&heads_first(self.project(li, Q, &h, &segments)?, self.heads)?, &cos, &sin)? * scale)?;
            let k = candle_nn::rotary_emb::rope(&heads_first(self.project(li, K, &h, &segments)?, self.kv_heads)?, &cos, &sin)?;
            let v = heads_first(self.project(li, V, &h, &segments)?, self.kv_heads)?;
            let mut outs = Vec::with_capacity(batch.len());
            // streams decoding one token, attended by hand: (first row, its cache's buffers, keys it sees)
            let mut steps = Vec::new();
            let mut offset = 0;
            for ((tokens, cache, _), chunks) in batch.iter_mut().zip(&chunks) {
                let n = tokens.len();
                let pos = cache.position;
                let (ki, vi) = (k.narrow(2, offset, n)?.squeeze(0)?, v.narrow(2, offset, n)?.squeeze(0)?);
                let (kc, vc) = cache.append(li, self.layers.len(), self.config.max_position_embeddings, &ki, &vi)?; // (kv_heads, capacity, hd)
                if by_hand && n == 1 {
                    steps.push((offset, kc, vc, pos + 1));
                    outs.push(None);
                    offset += n;
                    continue;
                }
                for (first, len, mask) in chunks {
                    let (first, len) = (*first, *len);
                    // the keys these queries may see
                    let seen = pos + first + len;
                    // Grouped-query attention without copying the cache per query head: the `rep`
                    // query heads that share a key/value head are rows of one product with it.
                    let qi = q.narrow(2, offset + first, len)?.reshape((self.kv_heads, rep * len, hd))?;
                    let mut att = qi.matmul(&kc.narrow(1, 0, seen)?.t()?)?; // (kv_heads, rep·len, seen)
                    if let Some(mask) = mask {
                        att = att.reshape((self.kv_heads, rep, len, seen))?.broadcast_add(mask)?.reshape((self.kv_heads, rep * len, seen))?;
                    }
                    let att = candle_nn::ops::softmax_last_dim(&att)?;
                    let o = att.matmul(&vc.narrow(1, 0, seen)?)?.reshape((self.heads, len, hd))?.transpose(0, 1)?.reshape((len, self.heads * hd))?;
                    outs.push(Some(o));
                }
                offset += n;
            }
            let o = if steps.is_empty() {
                Tensor::cat(&outs.into_iter().flatten().collect::<Vec<_>>(), 0)?
            } else {
                self.attend_steps(&q, &steps, outs)?
            };
            x = (x + self.project(li, O, &o, &segments)?)?;
            let h = layer.ln2.forward(&x)?;
            let act = gated(&self.project(li, GATE, &h, &segments)?, &self.project(li, UP, &h, &segments)?)?;
            x = (x + self.project(li, DOWN, &act, &segments)?)?;
        }
        let mut last = Vec::with_capacity(batch.len());
        let mut end = 0u32;
        for (tokens, cache, _) in batch.iter_mut() {
            end += tokens.len() as u32;
            last.push(end - 1);
            cache.position += tokens.len();
        }
        let x = x.index_select(&Tensor::new(last.as_slice(), device)?, 0)?;
        self.lm_head.forward(&self.norm.forward(&x)?)
    }

    /// Attention of the streams in `steps` that decode one token, (first row, keys, values, keys
    /// it sees) with its cache's buffers (kv_heads, capacity, hd): every (stream, key/value head)
    /// is a task on the pool that reads the cache in place ([`attend`]), where candle's ops ran
    /// one stream after another on one core (two products, a softmax and reshapes per stream and
    /// layer). `outs` holds the other streams' outputs in row order, `None` where a step's row
    /// goes; returns all rows, (rows, heads · hd).
    fn attend_steps(&self, q: &Tensor, steps: &[(usize, Tensor, Tensor, usize)], outs: Vec<Option<Tensor>>) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let (_, heads, rows, hd) = q.dims4()?; // q: (1, heads, rows, hd), scaled
        let q = q.contiguous()?;
        let q_storage = q.storage_and_layout();
        let q = cpu_values(&q_storage)?;
        let (kv_heads, rep) = (self.kv_heads, self.heads / self.kv_heads);
        let guards: Vec<_> = steps.iter().map(|(_, k, v, _)| (k.storage_and_layout(), v.storage_and_layout())).collect();
        let mut caches = Vec::with_capacity(steps.len());
        for ((k, v), (_, kt, _, _)) in guards.iter().zip(steps) {
            caches.push((cpu_values(k)?, cpu_values(v)?, kt.dim(1)?));
        }
        let mut out = vec![0f32; steps.len() * heads * hd];
        let task = |(task, out): (usize, &mut [f32])| {
            let (s, g) = (task / kv_heads, task % kv_heads);
            let (row, seen) = (steps[s].0, steps[s].3);
            let (keys, values, capacity) = caches[s];
            let at = g * capacity * hd;
            let (keys, values) = (&keys[at..at + seen * hd], &values[at..at + seen * hd]);
            // the rep query heads of key/value head g, one after another
            let queries: Vec<f32> = (g * rep..(g + 1) * rep).flat_map(|h| &q[(h * rows + row) * hd..(h * rows + row + 1) * hd]).copied().collect();
            #[cfg(target_arch = "x86_64")]
            if avx512::available() {
                // Safety: the CPU has AVX-512F and FMA (just checked).
                return unsafe { avx512::attend(&queries, keys, values, hd, out) };
            }
            attend(&queries, keys, values, hd, out)
        };
        // Short contexts on this thread: waking the pool costs more than their attention.
        let products: usize = steps.iter().map(|s| s.3).sum::<usize>() * heads * hd;
        if products < PARALLEL_ATTENTION {
            out.chunks_mut(rep * hd).enumerate().for_each(task);
        } else {
            out.par_chunks_mut(rep * hd).enumerate().for_each(task);
        }
        if outs.iter().all(Option::is_none) {
            return Tensor::from_vec(out, (steps.len(), heads * hd), self.cos.device());
        }
        let mut parts = Vec::with_capacity(outs.len());
        let mut stepped = out.chunks_exact(heads * hd);
        for o in outs {
            parts.push(match o {
                Some(o) => o,
                None => Tensor::from_slice(stepped.next().expect("one row per step"), (1, heads * hd), self.cos.device())?,
            });
        }
        Tensor::cat(&parts, 0)
    }

    /// Logits of every position of token blocks (blocks, positions) → (blocks, positions, vocab),
    /// with `adapter`'s terms. Differentiable in the adapter (candle's fused rope, softmax and RMS
    /// norm have no gradient; `lorag_lora::ops` gives them one), so it serves training and
    /// perplexity alike.
    pub fn block_logits(&self, tokens: &Tensor, adapter: Option<&Adapter>) -> candle_core::Result<Tensor> {
        let (b, l) = tokens.dims2()?;
        let device = tokens.device();
        let rows = b * l;
        let segments: [Segment; 1] = [(0, rows, adapter)];
        let eps = self.config.rms_norm_eps as f32;
        let mut x = self.embed.forward(&tokens.flatten_all()?)?; // (rows, hidden)
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (cos, sin) = (self.cos.narrow(0, 0, l)?, self.sin.narrow(0, 0, l)?);
        let mask = causal_mask(l, 0, device)?;
        let split = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, l, heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let rep = self.heads / self.kv_heads;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = lorag_lora::ops::rms_norm(&x, &layer.ln1_w, eps)?;
            let q = lorag_lora::ops::rope(&split(self.project(li, Q, &h, &segments)?, self.heads)?, &cos, &sin)?;
            let k = lorag_lora::ops::rope(&split(self.project(li, K, &h, &segments)?, self.kv_heads)?, &cos, &sin)?;
            let v = split(self.project(li, V, &h, &segments)?, self.kv_heads)?;
            let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
            let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?; // (b, heads, l, l)
            let att = lorag_lora::ops::softmax(&att)?;
            let o = att.matmul(&v)?.transpose(1, 2)?.reshape((rows, self.heads * self.head_dim))?;
            x = (x + self.project(li, O, &o, &segments)?)?;
            let h = lorag_lora::ops::rms_norm(&x, &layer.ln2_w, eps)?;
            let act = (self.project(li, GATE, &h, &segments)?.silu()? * self.project(li, UP, &h, &segments)?)?;
            x = (x + self.project(li, DOWN, &act, &segments)?)?;
        }
        let x = lorag_lora::ops::rms_norm(&x, &self.norm_w, eps)?;
        self.lm_head.forward(&x)?.reshape((b, l, self.config.vocab_size))
    }
}

/// One query row's attention for the query heads (`queries`, heads × hd, already scaled) that
/// share one key/value head, against that head's `keys` and `values` (positions × hd): `out`
/// (heads × hd). Plain loops: where AVX-512 runs, [`avx512::attend`] does this instead.
fn attend(queries: &[f32], keys: &[f32], values: &[f32], hd: usize, out: &mut [f32]) {
    let seen = keys.len() / hd;
    let mut scores = vec![0f32; seen];
    for (query, o) in queries.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        for (s, key) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
            let mut acc = [0f32];
            row_dots(query, key, &mut acc);
            *s = acc[0];
        }
        softmax_in_place(&mut scores);
        o.fill(0.0);
        for (w, value) in scores.iter().zip(values.chunks_exact(hd)) {
            for (o, v) in o.iter_mut().zip(value) {
                *o += w * v;
            }
        }
    }
}

/// `out = silu(gate) · up`, silu(g) = g / (1 + e^−g): where AVX-512 runs, [`avx512::silu_mul`].
fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// The MLP's activation, silu(gate) · up: by hand on the CPU where no gradient is wanted (one
/// pass, e^x 16 lanes at a time; candle's silu took a libm call per value and a second pass for
/// the product), else by candle's ops.
fn gated(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !gate.device().is_cpu() || gate.dtype() != DType::F32 || gate.track_op() || up.track_op() || gate.shape() != up.shape() {
        return candle_nn::ops::silu(gate)? * up;
    }
    let (g, u) = (gate.flatten_all()?.to_vec1::<f32>()?, up.flatten_all()?.to_vec1::<f32>()?);
    let mut out = vec![0f32; g.len()];
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // Safety: the CPU has AVX-512F and FMA (just checked).
        unsafe { avx512::silu_mul(&g, &u, &mut out) };
        return Tensor::from_vec(out, gate.shape(), gate.device());
    }
    silu_mul(&g, &u, &mut out);
    Tensor::from_vec(out, gate.shape(), gate.device())
}

/// `scores` → their softmax, in place.
#[inline(always)]
fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// Multiply-adds of a decoding step's attention (all streams, all heads) from which it is split
/// over the pool: ~230 positions in all with SmolLM2-135M. Below, one core reads those keys and
/// values (~10 µs per layer) faster than the pool's other threads wake up to help; above, the
/// reads from memory go faster on every core (measured per layer with 1 and 4 streams).
const PARALLEL_ATTENTION: usize = 1 << 17;

/// Query rows of a prompt whose attention is computed together: a prompt's attention in chunks
/// sees only the keys up to each chunk's end (half the work of the whole square under the
/// causal mask) and its scores stay a few MB (the whole square of a 1,300-token prompt was 61
/// MB per layer, allocated and faulted in afresh each time).
const ATTENTION_ROWS: usize = 128;

/// Rows up to which [`few_rows_matmul`] beats candle's general matmul (and the rows one call of
/// the 8-bit kernels takes, [`crate::q8`]).
pub(crate) const FEW_ROWS: usize = 8;

/// `x · Wᵀ` for a frozen `weight` (out × in): few rows (decoding steps) by [`few_rows_matmul`],
/// the rest (prompts, training) by the frozen-weight matmul.
fn linear(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, _) = x.dims2()?;
    if rows <= FEW_ROWS && !x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 && weight.is_contiguous() {
        return few_rows_matmul(x, weight);
    }
    lorag_lora::frozen::frozen_matmul(x, weight)
}

/// `x · Wᵀ` for a few rows of `x`: every weight row is read once and multiplied into each row
/// of `x` ([`row_dots`], weight rows split over the cores). Decoding is bound by reading the
/// weights, and candle's matmul packs them for more than one row, which makes 4 rows cost 3× one
/// row; here 4 streams cost about what one does.
fn few_rows_matmul(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, wk) = weight.dims2()?;
    if k != wk {
        candle_core::bail!("few_rows_matmul: {m}×{k} times ({n}×{wk})ᵀ");
    }
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let storage = weight.storage_and_layout();
    let w = &cpu_values(&storage)?[..n * k];
    by_weight_rows(m, n, x.device(), |o, out| {
        let row = &w[o * k..(o + 1) * k];
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // Safety: the CPU has AVX-512F and FMA (just checked).
            return unsafe { avx512::f32_rows(&xs, row, out) };
        }
        row_dots(&xs, row, out)
    })
}

/// The F32 values of a tensor on the CPU from its first element on, read in place (without the
/// copy `to_vec1` makes), from what `storage_and_layout` returned; the caller knows the layout.
fn cpu_values<'a>((storage, layout): &'a (std::sync::RwLockReadGuard<'_, candle_core::Storage>, &candle_core::Layout)) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(values) = &**storage else { candle_core::bail!("a tensor read in place is not on the CPU") };
    Ok(&values.as_slice::<f32>()?[layout.start_offset()..])
}

/// The (m × n) product whose column `o` `dots(o, out)` computes (the m rows of x times weight
/// row o), weight rows in chunks across the cores.
pub(crate) fn by_weight_rows(m: usize, n: usize, device: &Device, dots: impl Fn(usize, &mut [f32]) + Sync) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    const CHUNK: usize = 256;
    // out_t[o·m + r] = x_r · w_o
    let mut out_t = vec![0f32; n * m];
    out_t.par_chunks_mut(CHUNK * m).enumerate().for_each(|(c, out)| {
        for (j, o) in out.chunks_mut(m).enumerate() {
            dots(c * CHUNK + j, o);
        }
    });
    let mut out = vec![0f32; m * n];
    for (o, vals) in out_t.chunks(m).enumerate() {
        for (r, v) in vals.iter().enumerate() {
            out[r * n + o] = *v;
        }
    }
    Tensor::from_vec(out, (m, n), device)
}

/// `out[r] = x_r · row` for the rows of `xs` (out.len() rows of row.len()): the weight row is
/// loaded once per 16 values and multiplied into every input row (16 lanes per row, summed at
/// the end; the same order for every row count, so a stream decodes alike alone or batched).
#[inline(always)]
fn row_dots(xs: &[f32], row: &[f32], out: &mut [f32]) {
    let k = row.len();
    let mut acc = [[0f32; 16]; FEW_ROWS];
    let whole = k / 16 * 16;
    for i in (0..whole).step_by(16) {
        let wc: &[f32; 16] = row[i..i + 16].try_into().expect("16 values");
        accumulate(&mut acc, out.len(), xs, k, i, wc);
    }
    for (r, v) in out.iter_mut().enumerate() {
        let mut sum = acc[r].iter().sum::<f32>();
        for i in whole..k {
            sum = xs[r * k + i].mul_add(row[i], sum);
        }
        *v = sum;
    }
}

/// `acc[r] += x_r[at..at + 16] · wc`, lane by lane, for the first `rows` rows of `xs` (rows of `k`).
#[inline(always)]
pub(crate) fn accumulate(acc: &mut [[f32; 16]; FEW_ROWS], rows: usize, xs: &[f32], k: usize, at: usize, wc: &[f32; 16]) {
    for (r, a) in acc.iter_mut().enumerate().take(rows) {
        let xc: &[f32; 16] = xs[r * k + at..r * k + at + 16].try_into().expect("16 values");
        for l in 0..16 {
            a[l] = xc[l].mul_add(wc[l], a[l]);
        }
    }
}

/// The few-row kernels for AVX-512: `out[r] = x_r · w` for the `out.len()` rows of `xs` (rows
/// of `w.len()` values), one weight row loaded once for all of them. The row count is a constant
/// of each instance, so every accumulator lives in a register; a loop over a run-time row count
/// kept them in memory behind bounds checks and branches, which cost half of a decoding step.
/// Each row has two accumulators (the two halves of a 32-value block), and a row's sums run in
/// the same order whatever the row count, so a stream decodes alike alone or batched.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::FEW_ROWS;
    use std::arch::x86_64::*;

    /// Whether this CPU has what the kernels below need (AVX-512F and FMA); std caches the
    /// answer, so asking costs one load.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")
    }

    /// Calls `$kernel::<R>` for the run-time row count `$rows` (1..=FEW_ROWS).
    macro_rules! for_rows {
        ($rows:expr, $kernel:ident ( $($arg:expr),* )) => {
            match $rows {
                1 => $kernel::<1>($($arg),*),
                2 => $kernel::<2>($($arg),*),
                3 => $kernel::<3>($($arg),*),
                4 => $kernel::<4>($($arg),*),
                5 => $kernel::<5>($($arg),*),
                6 => $kernel::<6>($($arg),*),
                7 => $kernel::<7>($($arg),*),
                8 => $kernel::<8>($($arg),*),
                n => unreachable!("{n} rows: few-row kernels take 1 to {FEW_ROWS}"),
            }
        };
    }
    pub(crate) use for_rows;

    /// [`super::attend`] with AVX-512 for head sizes of 32, 64 and 128 (the rest take the plain
    /// loops): a query head's 16-value chunks stay in registers while its scores are taken key
    /// by key, and its output's chunks while the values are summed, position by position.
    ///
    /// Safety: the CPU must have AVX-512F and FMA.
    pub unsafe fn attend(queries: &[f32], keys: &[f32], values: &[f32], hd: usize, out: &mut [f32]) {
        assert!(queries.len() == out.len() && queries.len() % hd == 0 && keys.len() == values.len() && keys.len() % hd == 0);
        // Safety: as for this function; the lengths were checked.
        unsafe {
            match hd {
                32 => attend_kernel::<2>(queries, keys, values, out),
                64 => attend_kernel::<4>(queries, keys, values, out),
                128 => attend_kernel::<8>(queries, keys, values, out),
                _ => super::attend(queries, keys, values, hd, out),
            }
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn attend_kernel<const C: usize>(queries: &[f32], keys: &[f32], values: &[f32], out: &mut [f32]) {
        let hd = C * 16;
        let seen = keys.len() / hd;
        let mut scores = vec![0f32; seen];
        for (query, o) in queries.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            // Safety: every chunk read is inside query, or inside key or value row p < seen of
            // keys and values (lengths checked by the caller); o has hd values.
            unsafe {
                let q: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(query.as_ptr().add(16 * c)));
                // q · key p, lane by lane
                let partial = |p: usize| {
                    let key = keys.as_ptr().add(p * hd);
                    let mut acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(key));
                    for (c, qc) in q.iter().enumerate().skip(1) {
                        acc = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(key.add(16 * c)), acc);
                    }
                    acc
                };
                let whole = seen / 16 * 16;
                for first in (0..whole).step_by(16) {
                    _mm512_storeu_ps(scores.as_mut_ptr().add(first), sums(std::array::from_fn(|i| partial(first + i))));
                }
                for (p, s) in scores.iter_mut().enumerate().skip(whole) {
                    *s = _mm512_reduce_add_ps(partial(p));
                }
                softmax(&mut scores);
                let mut acc = [_mm512_setzero_ps(); C];
                for (p, w) in scores.iter().enumerate() {
                    let (value, w) = (values.as_ptr().add(p * hd), _mm512_set1_ps(*w));
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(value.add(16 * c)), *a);
                    }
                }
                for (c, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(o.as_mut_ptr().add(16 * c), *a);
                }
            }
        }
    }

    /// The sums of 16 vectors' lanes, in one vector (lane i: the sum of v[i]'s lanes): one tree
    /// of shuffles and adds for the 16 (45 instructions) instead of a horizontal sum each.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sums(v: [__m512; 16]) -> __m512 {
        // pairs: per 128-bit quarter, [a0 + a2, b0 + b2, a1 + a3, b1 + b3]
        let t: [__m512; 8] = std::array::from_fn(|i| _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1])));
        // fours: per quarter, one partial sum of each of 4 vectors
        let u: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))
        });
        // the quarters: u[i]'s four partial sums added, into quarter i
        let w: [__m512; 2] = std::array::from_fn(|i| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(u[2 * i], u[2 * i + 1]), _mm512_shuffle_f32x4::<0b11_01_11_01>(u[2 * i], u[2 * i + 1]))
        });
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(w[0], w[1]), _mm512_shuffle_f32x4::<0b11_01_11_01>(w[0], w[1]))
    }

    /// e^x in every lane: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by Cephes' expf polynomial
    /// (within 2 ulp of f32::exp), times 2^n by `vscalefps`. x is first clamped to [-104, 88.7]
    /// (e^x is 0 or the largest finite f32 beyond), so NaN comes out finite: callers pass
    /// finite values.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    pub fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7)), _mm512_set1_ps(-104.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        // ln 2 in two parts, so that n · (first part) is exact
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_375), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        // 1 + r + r² · p
        let e = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(e, n)
    }

    /// [`super::softmax_in_place`] 16 scores at a time.
    #[target_feature(enable = "avx512f,fma")]
    fn softmax(scores: &mut [f32]) {
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let (whole, rest) = scores.split_at_mut(scores.len() / 16 * 16);
        let mut sum = _mm512_setzero_ps();
        for chunk in whole.chunks_exact_mut(16) {
            // Safety: chunk has 16 values.
            unsafe {
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(chunk.as_ptr()), _mm512_set1_ps(max)));
                _mm512_storeu_ps(chunk.as_mut_ptr(), e);
                sum = _mm512_add_ps(sum, e);
            }
        }
        let mut sum = _mm512_reduce_add_ps(sum);
        for s in rest.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for s in scores.iter_mut() {
            *s *= inv;
        }
    }

    /// `out = silu(gate) · up`, 16 values at a time, silu(g) = g / (1 + e^−g).
    ///
    /// Safety: the CPU must have AVX-512F and FMA.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        assert!(gate.len() == up.len() && up.len() == out.len());
        let whole = out.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            // Safety: i + 16 <= whole <= each length.
            unsafe {
                let g = _mm512_loadu_ps(gate.as_ptr().add(i));
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
                let silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
                _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(silu, _mm512_loadu_ps(up.as_ptr().add(i))));
            }
        }
        super::silu_mul(&gate[whole..], &up[whole..], &mut out[whole..]);
    }

    /// F32 weights.
    ///
    /// Safety: the CPU must have AVX-512F and FMA.
    pub unsafe fn f32_rows(xs: &[f32], w: &[f32], out: &mut [f32]) {
        assert!(xs.len() == out.len() * w.len() && out.len() <= FEW_ROWS);
        // Safety: as for this function; the lengths were checked.
        unsafe { for_rows!(out.len(), f32_kernel(xs, w, out)) }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn f32_kernel<const R: usize>(xs: &[f32], w: &[f32], out: &mut [f32]) {
        let k = w.len();
        let whole = k / 32 * 32;
        let (x, wp) = (xs.as_ptr(), w.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // Safety: i + 32 <= whole <= k, and every row of xs has k values (checked by the caller).
        unsafe {
            for i in (0..whole).step_by(32) {
                let (w0, w1) = (_mm512_loadu_ps(wp.add(i)), _mm512_loadu_ps(wp.add(i + 16)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xr = x.add(r * k + i);
                    a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, a[0]);
                    a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr.add(16)), w1, a[1]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            for i in whole..k {
                sum = xs[r * k + i].mul_add(w[i], sum);
            }
            out[r] = sum;
        }
    }
}

/// The additive causal mask of `n` new positions after `past` cached ones: (n, past + n).
fn causal_mask(n: usize, past: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = past + n;
    let mask: Vec<f32> = (0..n).flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (n, total), device)
}

/// What a caller asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub model: ModelSpec,
    pub prompt: String,
    pub system: Option<String>,
    /// Passages to answer from (best first); cut from the end to fit the context window.
    pub context: Vec<String>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// A LoRA adapter to add to the model for this request.
    pub adapter: Option<AdapterPayload>,
}

/// What comes back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generated {
    pub text: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Tokens of context passages left out to fit the model's context window.
    pub context_tokens_cut: usize,
    /// "stop" (a stop token) or "length" (max_tokens reached).
    pub finish_reason: String,
    pub time_to_first_token_ms: f64,
    pub total_ms: f64,
}

pub struct Generator {
    pub model: Llama,
    tokenizer: Tokenizer,
    template: Option<String>,
    stop: Vec<u32>,
    /// The token that ends a document (rows are packed with it when training).
    pub end_token: u32,
}

/// One request being decoded.
pub struct Stream {
    pending: Vec<u32>,
    cache: KvCache,
    adapter: Option<Arc<Adapter>>,
    sampler: LogitsProcessor,
    out: Vec<u32>,
    max_tokens: usize,
    prompt_tokens: usize,
    context_tokens_cut: usize,
    started: Instant,
    first_token_ms: Option<f64>,
    finish: Option<&'static str>,
}

impl Stream {
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }
}

/// The prompt's user turn: the question alone, or the passages and then the question.
fn user_turn(prompt: &str, context: &[String]) -> String {
    if context.is_empty() {
        return prompt.to_owned();
    }
    // Small models follow a plain instruction best; asking them to say when the context lacks the
    // answer makes SmolLM2-135M refuse even when it is there.
    let mut s = String::from("Answer the question using the context below.\n\nContext:\n");
    for (i, c) in context.iter().enumerate() {
        s.push_str(&format!("[{}] {}\n", i + 1, c.trim()));
    }
    s.push_str(&format!("\nQuestion: {prompt}"));
    s
}

impl Generator {
    /// Loads a Hugging Face folder (F32 or BF16 `model.safetensors`), or a GGUF file, whose
    /// weights are served as 8-bit blocks.
    pub fn load(path: &Path, device: &Device) -> Result<Generator, ModelError> {
        if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Generator::load_gguf(path, device);
        }
        let dir = path;
        if !dir.is_dir() {
            return Err(ModelError::Missing { path: dir.to_owned() });
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let config: Config = serde_json::from_str(&text).map_err(|e| ModelError::corrupt(&config_path, e))?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(ModelError::Missing { path: tok_path });
        }
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| ModelError::corrupt(&tok_path, e))?;
        let tokenizer_config = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| ModelError::io(&weights, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| ModelError::corrupt(&weights, e))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Generator::assemble(config, tokenizer, tokenizer_config, vb, &weights)
    }

    /// Loads a LLaMA GGUF: its tensors (dequantized, un-permuted), configuration and tokenizer
    /// ([`crate::gguf::read`]); the linear maps and the output head are then kept as 8-bit blocks.
    fn load_gguf(path: &Path, device: &Device) -> Result<Generator, ModelError> {
        let model = crate::gguf::read(path)?;
        let config: Config = serde_json::from_value(model.config).map_err(|e| ModelError::corrupt(path, e))?;
        let tokenizer = Tokenizer::from_str(&model.tokenizer.to_string()).map_err(|e| ModelError::corrupt(path, e))?;
        let tensors = model.tensors.into_iter().map(|(n, t)| Ok((n, t.to_device(device)?))).collect::<candle_core::Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let mut g = Generator::assemble(config, tokenizer, Some(model.tokenizer_config), vb, path)?;
        g.model.quantize()?;
        Ok(g)
    }

    /// The generator of a configuration, tokenizer, `tokenizer_config.json` and weights (read
    /// from `weights`, which a weight that does not fit is reported against).
    fn assemble(config: Config, tokenizer: Tokenizer, tokenizer_config: Option<serde_json::Value>, vb: VarBuilder, weights: &Path) -> Result<Generator, ModelError> {
        match config.model_type.as_deref() {
            None | Some("llama") | Some("qwen2") | Some("mistral") => {}
            Some(other) => return Err(ModelError::Invalid(format!("model type \"{other}\" is not a supported generator (llama, qwen2)"))),
        }
        let template = tokenizer_config.and_then(|v| v.get("chat_template").and_then(|t| t.as_str()).map(str::to_owned));
        let mut stop: Vec<u32> = match &config.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|n| n.as_u64().map(|n| n as u32)).collect(),
            _ => Vec::new(),
        };
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"] {
            if let Some(id) = tokenizer.token_to_id(t) {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
        let end_token = ["<|endoftext|>", "</s>", "<|end_of_text|>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .or_else(|| stop.first().copied())
            .unwrap_or(0);
        let model = Llama::load(vb, config).map_err(|e| ModelError::corrupt(weights, e))?;
        Ok(Generator { model, tokenizer, template, stop, end_token })
    }

    pub fn device(&self) -> Device {
        self.model.cos.device().clone()
    }

    pub fn context_window(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    fn render(&self, system: Option<&str>, user: &str) -> Result<String, ModelError> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        messages.push(serde_json::json!({"role": "user", "content": user}));
        match &self.template {
            Some(t) => {
                let mut env = minijinja::Environment::new();
                env.add_template("chat", t).map_err(|e| ModelError::Invalid(format!("chat template: {e}")))?;
                env.get_template("chat")
                    .and_then(|t| t.render(minijinja::context! { messages => messages, add_generation_prompt => true, bos_token => "", eos_token => "" }))
                    .map_err(|e| ModelError::Invalid(format!("chat template: {e}")))
            }
            // No template: ChatML, which SmolLM2 and Qwen2 use.
            None => {
                let mut s = String::new();
                for m in &messages {
                    s.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m["role"].as_str().unwrap_or(""), m["content"].as_str().unwrap_or("")));
                }
                s.push_str("<|im_start|>assistant\n");
                Ok(s)
            }
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?.get_ids().to_vec())
    }

    /// Tokenises the prompt (cutting context to fit) and sets up sampling, with `adapter` (the
    /// parsed form of `req.adapter`) added to the model for this stream.
    pub fn start(&self, req: &GenerateRequest, adapter: Option<Arc<Adapter>>) -> Result<Stream, ModelError> {
        let started = Instant::now();
        let window = self.context_window();
        if req.max_tokens == 0 || req.max_tokens >= window {
            return Err(ModelError::Refused {
                detail: format!("max_tokens must be between 1 and {} for this model", window - 1),
                hint: format!("The prompt and the answer share the model's context of {window} tokens."),
            });
        }
        let budget = window - req.max_tokens;
        let bare = self.encode(&self.render(req.system.as_deref(), &user_turn(&req.prompt, &[]))?)?;
        if bare.len() > budget {
            return Err(ModelError::Refused {
                detail: format!(
                    "the prompt has {} tokens; with max_tokens {} it does not fit the model's context of {window} tokens",
                    bare.len(),
                    req.max_tokens
                ),
                hint: format!(
                    "Shorten the prompt (with the chat template it may have {budget} tokens at this max_tokens), or lower max_tokens. Long documents belong in a table, passed as context by rag_answer(), which cuts them to fit."
                ),
            });
        }
        // Keep passages in order while they fit; cut the one that crosses the budget.
        let mut kept: Vec<String> = Vec::new();
        let mut cut = 0usize;
        let mut ids = bare;
        for passage in &req.context {
            let mut trial = kept.clone();
            trial.push(passage.clone());
            let t = self.encode(&self.render(req.system.as_deref(), &user_turn(&req.prompt, &trial))?)?;
            let passage_tokens = self.encode(passage)?;
            if t.len() <= budget {
                kept = trial;
                ids = t;
                continue;
            }
            let room = budget.saturating_sub(ids.len()).saturating_sub(16);
            let keep = room.min(passage_tokens.len());
            cut += passage_tokens.len() - keep;
            if keep > 0 {
                let head = self.tokenizer.decode(&passage_tokens[..keep], true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
                let mut trial = kept.clone();
                trial.push(head);
                let t = self.encode(&self.render(req.system.as_deref(), &user_turn(&req.prompt, &trial))?)?;
                if t.len() <= budget {
                    kept = trial;
                    ids = t;
                }
            }
            for rest in req.context.iter().skip(kept.len() + 1) {
                cut += self.encode(rest)?.len();
            }
            break;
        }
        let sampling = if req.temperature <= 0.0 {
            Sampling::ArgMax
        } else if req.top_p > 0.0 && req.top_p < 1.0 {
            Sampling::TopP { p: req.top_p, temperature: req.temperature }
        } else {
            Sampling::All { temperature: req.temperature }
        };
        Ok(Stream {
            prompt_tokens: ids.len(),
            pending: ids,
            cache: KvCache::default(),
            adapter,
            sampler: LogitsProcessor::from_sampling(req.seed, sampling),
            out: Vec::new(),
            max_tokens: req.max_tokens,
            context_tokens_cut: cut,
            started,
            first_token_ms: None,
            finish: None,
        })
    }

    /// One decoding step for every unfinished stream in `streams`, together.
    pub fn step(&self, streams: &mut [&mut Stream]) -> Result<(), ModelError> {
        let mut live: Vec<&mut Stream> = streams.iter_mut().map(|s| &mut **s).filter(|s| s.finish.is_none()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let pending: Vec<Vec<u32>> = live.iter_mut().map(|s| std::mem::take(&mut s.pending)).collect();
        let logits = {
            let mut batch: Vec<(&[u32], &mut KvCache, Option<&Adapter>)> =
                pending.iter().zip(live.iter_mut()).map(|(p, s)| (p.as_slice(), &mut s.cache, s.adapter.as_deref())).collect();
            // On a thread of rayon's pool: the step's ~200 parallel matrix products then split
            // their work with the pool's other threads by work stealing, where from this thread
            // each one was handed over to the pool and waited for (two context switches per
            // product: 40% of a decoding step's time went to the scheduler).
            let model = &self.model;
            rayon::scope(|_| model.forward(&mut batch))?
        };
        for (i, s) in live.iter_mut().enumerate() {
            let row = logits.get(i)?;
            let next = s.sampler.sample(&row)?;
            if s.first_token_ms.is_none() {
                s.first_token_ms = Some(s.started.elapsed().as_secs_f64() * 1000.0);
            }
            if self.stop.contains(&next) {
                s.finish = Some("stop");
                continue;
            }
            s.out.push(next);
            s.pending = vec![next];
            if s.out.len() >= s.max_tokens || s.cache.position + 1 >= self.context_window() {
                s.finish = Some("length");
            }
        }
        Ok(())
    }

    pub fn result(&self, s: &Stream) -> Result<Generated, ModelError> {
        Ok(Generated {
            text: self.tokenizer.decode(&s.out, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?.trim().to_owned(),
            prompt_tokens: s.prompt_tokens,
            generated_tokens: s.out.len(),
            context_tokens_cut: s.context_tokens_cut,
            finish_reason: s.finish.unwrap_or("length").to_owned(),
            time_to_first_token_ms: s.first_token_ms.unwrap_or(0.0),
            total_ms: s.started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Generates to the end, checking `keep_going` between steps (in-backend use).
    pub fn generate(&self, req: &GenerateRequest, adapter: Option<Arc<Adapter>>, mut keep_going: impl FnMut()) -> Result<Generated, ModelError> {
        let mut s = self.start(req, adapter)?;
        while !s.is_finished() {
            keep_going();
            self.step(&mut [&mut s])?;
        }
        self.result(&s)
    }

    /// Bytes of weights one decoding step reads (for the bandwidth bound of the benchmark).
    pub fn weight_bytes(&self) -> usize {
        self.model.weight_bytes()
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// The default generator, as `make models` leaves it (CI fetches models before unit tests).
    fn smollm2() -> Option<Generator> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct");
        if !dir.join("model.safetensors").exists() {
            eprintln!("SmolLM2 not fetched (make models): skipping");
            return None;
        }
        Some(Generator::load(&dir, &Device::Cpu).unwrap())
    }

    fn request(prompt: &str, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            model: ModelSpec::new("g", "/", None, "cpu"),
            prompt: prompt.into(),
            system: None,
            context: vec![],
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
            adapter: None,
        }
    }

    #[test]
    fn smollm2_answers_and_batched_decoding_equals_one_at_a_time() {
        let Some(g) = smollm2() else { return };
        let alone = g.generate(&request("What is the capital of France?", 20), None, || {}).unwrap();
        assert_eq!(alone.text, "The capital of France is Paris.");
        assert_eq!(alone.finish_reason, "stop");
        let other = g.generate(&request("Name a primary colour.", 12), None, || {}).unwrap();
        // the two together, started at different times, give the same tokens
        let mut a = g.start(&request("What is the capital of France?", 20), None).unwrap();
        let mut b = g.start(&request("Name a primary colour.", 12), None).unwrap();
        g.step(&mut [&mut a]).unwrap();
        g.step(&mut [&mut a]).unwrap();
        while !(a.is_finished() && b.is_finished()) {
            g.step(&mut [&mut a, &mut b]).unwrap();
        }
        assert_eq!(g.result(&a).unwrap().text, alone.text);
        assert_eq!(g.result(&b).unwrap().text, other.text);
        // max_tokens ends a stream; sampling with a seed repeats
        let short = g.generate(&request("Write a long story about a dragon.", 3), None, || {}).unwrap();
        assert_eq!((short.generated_tokens, short.finish_reason.as_str()), (3, "length"));
        let mut warm = request("Write a poem about the sea.", 8);
        warm.temperature = 0.9;
        warm.top_p = 0.9;
        assert_eq!(g.generate(&warm, None, || {}).unwrap().text, g.generate(&warm, None, || {}).unwrap().text);
    }

    /// The GGUF the default generator comes from, served from 8-bit blocks: the same greedy
    /// answer, batched decoding equal to one stream alone, logits close to the F32 model's, and
    /// a quarter of the bytes to read per token.
    #[test]
    fn gguf_decodes_from_8_bit_blocks() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let Some(f32) = smollm2() else { return };
        if !path.exists() {
            eprintln!("SmolLM2 GGUF not fetched (make models): skipping");
            return;
        }
        let q = Generator::load(&path, &Device::Cpu).unwrap();
        assert!(q.weight_bytes() * 3 < f32.weight_bytes(), "{} vs {} bytes", q.weight_bytes(), f32.weight_bytes());
        let alone = q.generate(&request("What is the capital of France?", 20), None, || {}).unwrap();
        assert!(alone.text.contains("Paris"), "{}", alone.text);
        let other = q.generate(&request("Name a primary colour.", 12), None, || {}).unwrap();
        let mut a = q.start(&request("What is the capital of France?", 20), None).unwrap();
        let mut b = q.start(&request("Name a primary colour.", 12), None).unwrap();
        q.step(&mut [&mut a]).unwrap();
        while !(a.is_finished() && b.is_finished()) {
            q.step(&mut [&mut a, &mut b]).unwrap();
        }
        assert_eq!(q.result(&a).unwrap().text, alone.text);
        assert_eq!(q.result(&b).unwrap().text, other.text);
        // next-token logits after a prompt: 8-bit blocks against F32
        let tokens = f32.encode("The capital of France is").unwrap();
        let logits = |g: &Generator| g.model.forward(&mut [(&tokens[..], &mut KvCache::default(), None)]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (x, y) = (logits(&f32), logits(&q));
        let dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        let cosine = dot / (x.iter().map(|a| a * a).sum::<f32>().sqrt() * y.iter().map(|b| b * b).sum::<f32>().sqrt());
        assert!(cosine > 0.995, "cosine {cosine}");
        let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(argmax(&x), argmax(&y));
        // training-style passes (many rows, gradients) run on the dequantized matrices
        let block = Tensor::new(&tokens[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        assert_eq!(q.model.block_logits(&block, None).unwrap().dims3().unwrap(), (1, tokens.len(), 49152));
    }

    /// Over a passage of 123 positions, the 8-bit model's next-token distributions stay close to
    /// the F32 model's (on AVX512-VNNI, prompts go through the same 8-bit products as decoding
    /// steps).
    /// Measured: mean KL 0.0014, top-1 agreement 0.992 (activations rounded to 8 bits instead of
    /// 16 gave 0.0046 and 0.976).
    #[test]
    fn gguf_next_token_distributions_stay_close_to_f32() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let (Some(f32), true) = (smollm2(), path.exists()) else { return };
        let q = Generator::load(&path, &Device::Cpu).unwrap();
        let text = "PostgreSQL is a powerful, open source object-relational database system with over 35 years of active development that has earned it a strong reputation for reliability, feature robustness, and performance. VACUUM reclaims storage occupied by dead tuples. In normal PostgreSQL operation, tuples that are deleted or obsoleted by an update are not physically removed from their table; they remain present until a VACUUM is done. Therefore it's necessary to do VACUUM periodically, especially on frequently-updated tables. The capital of France is Paris, and the capital of Germany is Berlin.";
        let tokens = f32.encode(text).unwrap();
        let block = Tensor::new(&tokens[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = |g: &Generator| g.model.block_logits(&block, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let (a, b) = (logits(&f32), logits(&q));
        let softmax = |v: &[f32]| {
            let m = v.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f64> = v.iter().map(|x| ((x - m) as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|x| x / s).collect::<Vec<f64>>()
        };
        let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let (mut agree, mut kl) = (0, 0f64);
        for (x, y) in a.iter().zip(&b) {
            agree += (argmax(x) == argmax(y)) as usize;
            let (p, r) = (softmax(x), softmax(y));
            kl += p.iter().zip(&r).map(|(p, r)| if *p > 0.0 { p * (p / r.max(1e-30)).ln() } else { 0.0 }).sum::<f64>();
        }
        let n = a.len() as f64;
        assert!(n > 100.0);
        assert!(kl / n < 0.003, "mean KL {}", kl / n);
        assert!(agree as f64 / n >= 0.98, "top-1 agreement {}", agree as f64 / n);
    }

    /// A prompt longer than [`ATTENTION_ROWS`] gives the same next-token logits whether its
    /// attention runs in chunks in one pass or in two passes, the second against the first's
    /// cache, and batched with another stream's prompt.
    #[test]
    fn attention_is_alike_in_one_pass_two_passes_or_steps() {
        let Some(g) = smollm2() else { return };
        let tokens = g.encode(&"Tables have rows and columns; indexes speed up lookups. ".repeat(30)).unwrap();
        assert!(tokens.len() > 2 * ATTENTION_ROWS + 10, "{} tokens", tokens.len());
        let one = g.model.forward(&mut [(&tokens[..], &mut KvCache::default(), None)]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut cache = KvCache::default();
        let half = tokens.len() / 2 + 3;
        g.model.forward(&mut [(&tokens[..half], &mut cache, None)]).unwrap();
        let two = g.model.forward(&mut [(&tokens[half..], &mut cache, None)]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let largest = one.iter().fold(0f32, |m, v| m.max(v.abs()));
        let close = |x: &[f32], y: &[f32]| {
            for (i, (a, b)) in x.iter().zip(y).enumerate() {
                assert!((a - b).abs() <= 1e-3 * largest, "logit {i}: {a} vs {b}");
            }
        };
        close(&one, &two);
        // batched with another stream's short prompt, each stream's logits as alone
        let short = g.encode("What is an index?").unwrap();
        let alone = g.model.forward(&mut [(&short[..], &mut KvCache::default(), None)]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let both = g.model.forward(&mut [(&short[..], &mut KvCache::default(), None), (&tokens[..], &mut KvCache::default(), None)]).unwrap();
        close(&both.get(0).unwrap().to_vec1::<f32>().unwrap(), &alone);
        close(&both.get(1).unwrap().to_vec1::<f32>().unwrap(), &one);
        // the last positions one decoding step at a time (attended by hand against the cache in
        // place, which grows past 256 positions on the way), and a step batched with a prompt
        let start = 250;
        assert!(tokens.len() > 256 + 2, "{} tokens", tokens.len());
        let mut cache = KvCache::default();
        g.model.forward(&mut [(&tokens[..start], &mut cache, None)]).unwrap();
        for t in start..tokens.len() - 1 {
            g.model.forward(&mut [(&tokens[t..t + 1], &mut cache, None)]).unwrap();
        }
        let mut other = KvCache::default();
        let both = g.model.forward(&mut [(&tokens[tokens.len() - 1..], &mut cache, None), (&short[..], &mut other, None)]).unwrap();
        close(&both.get(0).unwrap().to_vec1::<f32>().unwrap(), &one);
        close(&both.get(1).unwrap().to_vec1::<f32>().unwrap(), &alone);
    }

    /// A decoding step's attention, by the plain loops and by the AVX-512 kernels, equals the
    /// softmax-weighted sum of values computed in f64, for the head sizes the kernels take and
    /// one they leave to the plain loops, from one key to several hundred.
    #[test]
    fn step_attention_matches_its_definition() {
        let value = |i: usize, salt: usize| ((i * 7919 + salt * 104729) % 2001) as f32 / 1000.0 - 1.0;
        for hd in [32, 48, 64, 128] {
            for (heads, seen) in [(1, 1), (3, 2), (3, 37), (2, 300)] {
                let queries: Vec<f32> = (0..heads * hd).map(|i| 0.3 * value(i, 1)).collect();
                let keys: Vec<f32> = (0..seen * hd).map(|i| value(i, 2)).collect();
                let values: Vec<f32> = (0..seen * hd).map(|i| value(i, 3)).collect();
                let mut expected = vec![0f64; heads * hd];
                for j in 0..heads {
                    let dot = |p: usize| (0..hd).map(|d| queries[j * hd + d] as f64 * keys[p * hd + d] as f64).sum::<f64>();
                    let scores: Vec<f64> = (0..seen).map(dot).collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = weights.iter().sum();
                    for d in 0..hd {
                        expected[j * hd + d] = (0..seen).map(|p| weights[p] / sum * values[p * hd + d] as f64).sum();
                    }
                }
                let mut plain = vec![0f32; heads * hd];
                attend(&queries, &keys, &values, hd, &mut plain);
                #[allow(unused_mut)] // off x86_64 only the plain loops run
                let mut outs = vec![plain];
                #[cfg(target_arch = "x86_64")]
                if avx512::available() {
                    let mut fast = vec![0f32; heads * hd];
                    // Safety: the CPU has AVX-512F and FMA (just checked).
                    unsafe { avx512::attend(&queries, &keys, &values, hd, &mut fast) };
                    outs.push(fast);
                }
                for out in outs {
                    for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                        assert!((*a as f64 - b).abs() < 1e-5, "hd {hd}, {heads} heads, {seen} keys, value {i}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// The AVX-512 e^x stays within 2 ulp of f32::exp from −104 to 88.7 (0 and the largest
    /// finite value beyond), and the MLP's activation by hand equals candle's silu times up.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_and_activation_match_libm_and_candle() {
        if !avx512::available() {
            eprintln!("no AVX-512 here: skipping");
            return;
        }
        use std::arch::x86_64::*;
        let xs: Vec<f32> = (0..200_000).map(|i| -110.0 + i as f32 * 0.001_005).chain([0.0, -0.0, 1e-30, -1e-30, 88.7, -104.0]).collect();
        for chunk in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0f32; 16];
            // Safety: the CPU has AVX-512F and FMA (checked above).
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), avx512::exp(_mm512_loadu_ps(lanes.as_ptr()))) };
            for (x, e) in chunk.iter().zip(got) {
                let want = x.clamp(-104.0, 88.7).exp();
                let ulp = (want.to_bits() as i64 - e.to_bits() as i64).abs();
                assert!(ulp <= 2 || (want < 1e-37 && e < 1e-37), "e^{x}: {e} vs {want} ({ulp} ulp)");
            }
        }
        let gate = Tensor::from_vec((0..4 * 1539).map(|i| ((i * 7919) % 4001) as f32 / 200.0 - 10.0).collect::<Vec<f32>>(), (4, 1539), &Device::Cpu).unwrap();
        let up = Tensor::from_vec((0..4 * 1539).map(|i| ((i * 104729) % 3001) as f32 / 1000.0 - 1.5).collect::<Vec<f32>>(), (4, 1539), &Device::Cpu).unwrap();
        let mine = gated(&gate, &up).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let candle = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (a, b)) in mine.iter().zip(&candle).enumerate() {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "value {i}: {a} vs {b}");
        }
    }

    #[test]
    fn context_is_cut_to_fit_never_the_question() {
        let Some(g) = smollm2() else { return };
        let window = g.context_window();
        let mut req = request("What colour is the sky?", window / 2);
        req.context = vec!["The sky is blue.".into(), "word ".repeat(window), "The grass is green.".into()];
        let s = g.start(&req, None).unwrap();
        assert!(s.prompt_tokens <= window - req.max_tokens);
        assert!(s.context_tokens_cut > window / 2, "cut {}", s.context_tokens_cut);
        let mut huge = request(&"why ".repeat(window), 10);
        huge.context = vec!["The sky is blue.".into()];
        assert!(matches!(g.start(&huge, None), Err(ModelError::Refused { detail, hint }) if detail.contains("does not fit") && hint.contains("Shorten the prompt")));
        assert!(g.start(&request("hi", 0), None).is_err());
    }
}
