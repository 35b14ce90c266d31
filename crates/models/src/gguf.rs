//! GGUF → Hugging Face folder, for LLaMA-family generators (SmolLM2 by default).
//!
//! The registries carry SmolLM2-135M-Instruct only as a llama.cpp GGUF (Q4_1). The generator
//! wants a Hugging Face folder: `config.json`, F32 `model.safetensors` with Hugging Face's tensor
//! names, `tokenizer.json`, and `tokenizer_config.json` with the chat template. This builds it:
//! - tensors are dequantised to F32 and renamed (`blk.N.attn_q` → `model.layers.N.self_attn.q_proj`);
//! - Q and K are un-permuted: llama.cpp's converter interleaves each head's two rotary halves
//!   (`w.reshape(heads, 2, d/2, in).swapaxes(1, 2)`), Hugging Face's `rotate_half` wants them apart;
//! - the tokenizer is the GGUF's GPT-2 style byte-level BPE (tokens, merges, token types), with
//!   llama.cpp's `smollm` pre-tokenizer (single digits, then GPT-2's byte-level split);
//! - `config.json` and the template come from the GGUF's metadata.

use crate::ModelError;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

fn meta<'a>(content: &'a Content, key: &str, path: &Path) -> Result<&'a Value, ModelError> {
    content.metadata.get(key).ok_or_else(|| ModelError::corrupt(path, format!("GGUF metadata has no {key}")))
}

fn meta_u(content: &Content, key: &str, path: &Path) -> Result<usize, ModelError> {
    let v = meta(content, key, path)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|e| ModelError::corrupt(path, format!("{key}: {e}")))
}

fn meta_f(content: &Content, key: &str, path: &Path) -> Result<f64, ModelError> {
    let v = meta(content, key, path)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|e| ModelError::corrupt(path, format!("{key}: {e}")))
}

fn meta_strings(content: &Content, key: &str, path: &Path) -> Result<Vec<String>, ModelError> {
    let v = meta(content, key, path)?.to_vec().map_err(|e| ModelError::corrupt(path, format!("{key}: {e}")))?;
    v.iter()
        .map(|s| s.to_string().cloned().map_err(|e| ModelError::corrupt(path, format!("{key}: {e}"))))
        .collect()
}

/// Undoes llama.cpp's rotary permutation of a Q or K weight of shape (heads · d, in).
pub fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    w.reshape((heads, out / heads / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))
}

/// The Hugging Face name of a GGUF tensor name, for the LLaMA architecture.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// A `tokenizer.json` for a GPT-2 style byte-level BPE vocabulary; token type 3 (control)
/// marks special tokens.
pub fn tokenizer_json(tokens: &[String], merges: &[String], types: &[i32]) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) == Some(&3))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// A GGUF model read into memory as a Hugging Face folder would hold it: F32 tensors by Hugging
/// Face name (q and k un-permuted), `config.json`, `tokenizer.json`, `tokenizer_config.json`.
pub struct GgufModel {
    pub tensors: HashMap<String, Tensor>,
    pub config: serde_json::Value,
    pub tokenizer: serde_json::Value,
    pub tokenizer_config: serde_json::Value,
}

/// Reads a LLaMA-architecture GGUF.
pub fn read(gguf: &Path) -> Result<GgufModel, ModelError> {
    let mut file = std::fs::File::open(gguf).map_err(|e| ModelError::io(gguf, e))?;
    let content = Content::read(&mut file).map_err(|e| ModelError::corrupt(gguf, e))?;
    let arch = meta(&content, "general.architecture", gguf)?.to_string().map_err(|e| ModelError::corrupt(gguf, e))?.clone();
    if arch != "llama" {
        return Err(ModelError::Invalid(format!("GGUF architecture \"{arch}\" is not supported (llama only)")));
    }
    let heads = meta_u(&content, "llama.attention.head_count", gguf)?;
    let kv_heads = meta_u(&content, "llama.attention.head_count_kv", gguf).unwrap_or(heads);
    let tokens = meta_strings(&content, "tokenizer.ggml.tokens", gguf)?;
    let merges = meta_strings(&content, "tokenizer.ggml.merges", gguf)?;
    let types: Vec<i32> = meta(&content, "tokenizer.ggml.token_type", gguf)?
        .to_vec()
        .map_err(|e| ModelError::corrupt(gguf, e))?
        .iter()
        .map(|v| v.to_i32().unwrap_or(1))
        .collect();
    let bos = meta_u(&content, "tokenizer.ggml.bos_token_id", gguf)?;
    let eos = meta_u(&content, "tokenizer.ggml.eos_token_id", gguf)?;
    let tied = !content.tensor_infos.contains_key("output.weight");

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let hf = hf_name(name).ok_or_else(|| ModelError::corrupt(gguf, format!("unexpected tensor {name}")))?;
        let q = content.tensor(&mut file, name, &Device::Cpu).map_err(|e| ModelError::corrupt(gguf, e))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if name.ends_with("attn_q.weight") {
            t = unpermute(&t, heads)?;
        } else if name.ends_with("attn_k.weight") {
            t = unpermute(&t, kv_heads)?;
        }
        tensors.insert(hf, t);
    }
    let embed = tensors.get("model.embed_tokens.weight").ok_or_else(|| ModelError::corrupt(gguf, "no token_embd.weight"))?;
    let (vocab, hidden) = embed.dims2()?;
    let intermediate = meta_u(&content, "llama.feed_forward_length", gguf)?;
    let context = meta_u(&content, "llama.context_length", gguf)?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": meta_u(&content, "llama.block_count", gguf)?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": meta_f(&content, "llama.attention.layer_norm_rms_epsilon", gguf)?,
        "rope_theta": meta_f(&content, "llama.rope.freq_base", gguf).unwrap_or(10000.0),
        "max_position_embeddings": context,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    let template = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok().cloned());
    let token = |id: usize| tokens.get(id).cloned().unwrap_or_default();
    let tokenizer_config = json!({"bos_token": token(bos), "eos_token": token(eos), "chat_template": template, "model_max_length": context});
    Ok(GgufModel { tensors, config, tokenizer: tokenizer_json(&tokens, &merges, &types), tokenizer_config })
}

/// Converts the LLaMA-family GGUF at `gguf` into a Hugging Face folder `dest` (F32 weights).
pub fn convert(gguf: &Path, dest: &Path) -> Result<(), ModelError> {
    let model = read(gguf)?;
    std::fs::create_dir_all(dest).map_err(|e| ModelError::io(dest, e))?;
    let weights = dest.join("model.safetensors");
    candle_core::safetensors::save(&model.tensors, &weights).map_err(|e| ModelError::Io { path: weights.clone(), detail: e.to_string() })?;
    write_json(&dest.join("config.json"), &model.config)?;
    write_json(&dest.join("tokenizer.json"), &model.tokenizer)?;
    write_json(&dest.join("tokenizer_config.json"), &model.tokenizer_config)?;
    // The tokenizer must load, or the folder is no use.
    tokenizers::Tokenizer::from_file(dest.join("tokenizer.json")).map_err(|e| ModelError::corrupt(&dest.join("tokenizer.json"), e))?;
    Ok(())
}

/// Greedy answer of the converted folder to one user message in ChatML, for checking a
/// conversion end to end (weights, un-permutation and tokenizer together).
pub fn greedy_answer(dir: &Path, question: &str, max_tokens: usize) -> Result<String, ModelError> {
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    let device = Device::Cpu;
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let config: LlamaConfig = serde_json::from_str(&text).map_err(|e| ModelError::corrupt(&config_path, e))?;
    let eos = config.eos_token_id.clone();
    let config = config.into_config(false);
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).map_err(|e| ModelError::io(&weights, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &device).map_err(|e| ModelError::corrupt(&weights, e))?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &device);
    let model = Llama::load(vb, &config).map_err(|e| ModelError::corrupt(&weights, e))?;
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let prompt = format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n");
    let mut ids = tokenizer.encode(prompt, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?.get_ids().to_vec();
    let mut cache = Cache::new(true, candle_core::DType::F32, &config, &device)?;
    let mut out = Vec::new();
    let mut pos = 0;
    for _ in 0..max_tokens {
        let input = Tensor::new(&ids[pos..], &device)?.unsqueeze(0)?;
        let logits = model.forward(&input, pos, &mut cache)?.squeeze(0)?;
        pos = ids.len();
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        let stop = match &eos {
            Some(candle_transformers::models::llama::LlamaEosToks::Single(e)) => next == *e,
            Some(candle_transformers::models::llama::LlamaEosToks::Multiple(es)) => es.contains(&next),
            None => false,
        };
        if stop {
            break;
        }
        ids.push(next);
        out.push(next);
    }
    tokenizer.decode(&out, true).map_err(|e| ModelError::Tokenizer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let (heads, d, inp) = (3usize, 8usize, 5usize);
        let w = Tensor::arange(0f32, (heads * d * inp) as f32, &Device::Cpu).unwrap().reshape((heads * d, inp)).unwrap();
        // llama.cpp: w.reshape(heads, 2, d/2, in).swapaxes(1, 2).reshape(out, in)
        let permuted =
            w.reshape((heads, 2, d / 2, inp)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((heads * d, inp)).unwrap();
        assert_ne!(permuted.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_eq!(unpermute(&permuted, heads).unwrap().to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(hf_name("blk.12.attn_k.weight").unwrap(), "model.layers.12.self_attn.k_proj.weight");
        assert_eq!(hf_name("blk.0.ffn_down.weight").unwrap(), "model.layers.0.mlp.down_proj.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf_name("blk.x.attn_k.weight").is_none());
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn a_byte_level_bpe_tokenizer_round_trips() {
        // bytes map to printable characters in GPT-2's byte-level alphabet: ' ' is 'Ġ'
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        let alphabet = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut letters: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
        letters.sort();
        tokens.extend(letters);
        tokens.extend(["he".to_string(), "ll".to_string(), "hell".to_string(), "hello".to_string(), "Ġw".to_string()]);
        let merges = vec!["h e".to_string(), "l l".to_string(), "he ll".to_string(), "hell o".to_string(), "Ġ w".to_string()];
        let types: Vec<i32> = tokens.iter().enumerate().map(|(i, _)| if i < 2 { 3 } else { 1 }).collect();
        let dir = std::env::temp_dir().join(format!("lorag-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        write_json(&path, &tokenizer_json(&tokens, &merges, &types)).unwrap();
        let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
        let enc = tok.encode("<|im_start|>hello world 42", false).unwrap();
        let pieces: Vec<&str> = enc.get_tokens().iter().map(String::as_str).collect();
        assert_eq!(&pieces[..3], &["<|im_start|>", "hello", "Ġw"]);
        assert!(pieces.contains(&"4") && pieces.contains(&"2"), "digits one by one: {pieces:?}");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "<|im_start|>hello world 42");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
