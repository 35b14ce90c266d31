//! LoRA training speed: tokens/second for SmolLM2-135M at rank 8 (q_proj, v_proj), seq_len 256,
//! batch 4, and the model-FLOPs utilisation against the f32 matrix-multiply peak candle reaches
//! on this machine, measured in the same run.
//!
//! FLOPs per trained token, as for any frozen-base adapter: forward 2·P (P = base parameters
//! used per token: every linear map and the output head) + backward through the activations
//! 2·P (no weight gradient for the frozen base) + attention (4·L·d per layer forward, twice that
//! backward) + the adapter's own (negligible). `cargo bench -p lorag-models --bench lora_train`

use lorag_lora::train::{CausalLm, Trainer};
use lorag_lora::{LoraConfig, TrainConfig};
use lorag_models::candle_core::{Device, Tensor};
use lorag_models::generate::Generator;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn matmul_peak() -> f64 {
    let dev = Device::Cpu;
    let mut best = 0f64;
    // the shapes training runs: (tokens × hidden) · (hidden × intermediate), and a square one
    for (m, k, n) in [(1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
        let _ = a.matmul(&b).unwrap();
        for _ in 0..5 {
            let t = Instant::now();
            let c = a.matmul(&b).unwrap();
            let _ = c.dims();
            let s = t.elapsed().as_secs_f64();
            best = best.max(2.0 * (m * k * n) as f64 / s);
        }
    }
    best
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct");
    let gen = Arc::new(Generator::load(&dir, &Device::Cpu).expect("make models first"));
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/cranfield/cran.all.1400"))
        .expect("../shared/data/cranfield");
    let rows: Vec<Vec<u32>> = text.split(".I ").skip(1).take(400).map(|d| gen.encode(d).unwrap()).collect();
    let steps: usize = std::env::var("STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let (seq_len, batch) = (256, 4);
    let peak = matmul_peak();
    let lora = LoraConfig { rank: 8, alpha: 16.0, target_modules: vec!["q_proj".into(), "v_proj".into()], base_model: "SmolLM2-135M-Instruct".into() };
    let train = TrainConfig { seq_len, batch_size: batch, max_steps: Some(steps + 1), ..TrainConfig::default() };
    let mut t = Trainer::new(gen.clone(), lora, train).unwrap();
    t.count(&rows);
    t.plan().unwrap();
    let mut times = Vec::new();
    let mut last = Instant::now();
    let _ = t.feed(&rows, &mut |p| {
        times.push(last.elapsed().as_secs_f64());
        last = Instant::now();
        eprintln!("step {} loss {:.3}", p.step, p.loss);
        true
    });
    // the first step warms caches up; the rest are measured
    let measured = &times[1..];
    let per_step = measured.iter().sum::<f64>() / measured.len() as f64;
    let tokens = (seq_len * batch) as f64;
    let c = &gen.model.config;
    let linear: usize = (0..7).map(|m| { let (i, o) = c.module_dims(m); i * o }).sum::<usize>() * c.num_hidden_layers + c.hidden_size * c.vocab_size;
    let attention = 4.0 * seq_len as f64 / 2.0 * c.hidden_size as f64 * c.num_hidden_layers as f64; // causal: half the positions
    let flops_per_token = 4.0 * linear as f64 + 3.0 * attention;
    let achieved = flops_per_token * tokens / per_step;
    println!("matmul peak (candle f32, 2 cores): {:.1} GFLOP/s", peak / 1e9);
    println!("training: {:.2} s/step, {:.1} tokens/s (rank 8, seq_len 256, batch 4, {} measured steps)", per_step, tokens / per_step, measured.len());
    println!("model FLOPs per token {:.2} GFLOP → {:.1} GFLOP/s achieved", flops_per_token / 1e9, achieved / 1e9);
    println!("MFU: {:.1} % of the matmul peak (aim ≥ 25 %)", 100.0 * achieved / peak);
    println!("trainable parameters {} of {} ({:.3} %)", t.trainable_parameters(), gen.parameters(), 100.0 * t.trainable_parameters() as f64 / gen.parameters() as f64);
}
