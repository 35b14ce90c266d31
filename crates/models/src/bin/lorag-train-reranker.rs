//! Trains lorag's default reranker from data at hand: a cross-encoder on the MiniLM encoder,
//! fine-tuned on Cranfield queries 1–150 (positives from the qrels, hard negatives from the
//! embedder's top results), saved as a Hugging Face folder with `model.onnx`; then nDCG@10 on
//! the held-out queries 151–225, the embedder alone against its top 50 reranked.
//!
//!   lorag-train-reranker BASE_DIR CRANFIELD_BEIR_DIR OUT_DIR [--epochs N] [--lr X] [--layers N]
//!                        [--max-tokens N] [--positives N] [--title-stride N] [--negatives N] [--onnxruntime LIBRARY] [--eval-only]

use lorag_models::cross::{CrossEncoder, TrainSettings};
use lorag_models::embed::Embedder;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

struct Cranfield {
    docs: Vec<(String, String)>,
    /// (title, body without the title) of every document
    titled: Vec<(String, String)>,
    queries: HashMap<String, String>,
    qrels: HashMap<String, HashMap<String, f32>>,
}

fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

fn load(dir: &std::path::Path) -> Cranfield {
    let s = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let corpus = read_jsonl(&dir.join("corpus.jsonl"));
    let docs = corpus.iter().map(|d| (s(d, "_id"), format!("{} {}", s(d, "title"), s(d, "text")).trim().to_string())).collect();
    let titled = corpus
        .iter()
        .map(|d| {
            let (title, text) = (s(d, "title"), s(d, "text"));
            let body = text.strip_prefix(title.as_str()).unwrap_or(&text).trim().to_string();
            (title, body)
        })
        .collect();
    let queries = read_jsonl(&dir.join("queries.jsonl")).iter().map(|q| (s(q, "_id"), s(q, "text"))).collect();
    let mut qrels: HashMap<String, HashMap<String, f32>> = HashMap::new();
    let text = std::fs::read_to_string(dir.join("qrels/test.tsv")).expect("qrels/test.tsv");
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if let [q, d, score] = f[..] {
            let score: f32 = score.parse().unwrap_or(0.0);
            if score > 0.0 {
                qrels.entry(q.to_string()).or_default().insert(d.to_string(), score);
            }
        }
    }
    Cranfield { docs, titled, queries, qrels }
}

fn ndcg10(ranked: &[&str], rel: &HashMap<String, f32>) -> f64 {
    let dcg: f64 = ranked.iter().take(10).enumerate().map(|(i, d)| rel.get(*d).copied().unwrap_or(0.0) as f64 / (i as f64 + 2.0).log2()).sum();
    let mut ideal: Vec<f32> = rel.values().copied().collect();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let idcg: f64 = ideal.iter().take(10).enumerate().map(|(i, g)| *g as f64 / (i as f64 + 2.0).log2()).sum();
    if idcg > 0.0 { dcg / idcg } else { 0.0 }
}

/// Keeps freed activations in the heap for the next step. glibc's defaults hand every block over
/// its mmap threshold (a few MB, which most of a batch's activations are) back to the kernel when
/// freed, and the next step maps it again and faults its pages in: profiled, page faults and
/// munmap took a quarter of the training's time. Measured on one 2-core machine, same command:
/// 6.1 s a step with the defaults, 3.8 s with these.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only sets allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's largest: every activation of a step
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

fn main() {
    keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| -> usize {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |v| v.parse().expect("a number"))
    };
    let positional: Vec<&String> = args.iter().enumerate().filter(|(i, a)| !a.starts_with("--") && (*i == 0 || !args[i - 1].starts_with("--") || args[i - 1] == "--eval-only")).map(|(_, a)| a).collect();
    let [base, data, out] = positional[..] else {
        eprintln!("usage: lorag-train-reranker BASE_DIR CRANFIELD_BEIR_DIR OUT_DIR [--epochs N] [--lr X] [--layers N] [--max-tokens N] [--positives N] [--title-stride N] [--negatives N] [--onnxruntime LIBRARY] [--eval-only]");
        std::process::exit(2);
    };
    let (base, data, out) = (PathBuf::from(base), PathBuf::from(data), PathBuf::from(out));
    let epochs = flag("--epochs", 1);
    let learning_rate: f64 = args.iter().position(|a| a == "--lr").and_then(|i| args.get(i + 1)).map_or(8e-5, |v| v.parse().expect("a number"));
    let max_tokens = flag("--max-tokens", 128);
    let negatives = flag("--negatives", 3);
    let positives = flag("--positives", 6);
    let title_stride = flag("--title-stride", 1);
    let onnxruntime = args.iter().position(|a| a == "--onnxruntime").and_then(|i| args.get(i + 1)).cloned();
    let eval_only = args.iter().any(|a| a == "--eval-only");
    let device = candle_core::Device::Cpu;
    let t0 = Instant::now();
    let cran = load(&data);

    // the embedder's ranking of every query (exact cosine over the corpus), on ONNX Runtime when
    // the library is given and the base has its export (the same vectors, several times faster)
    let embedder = match &onnxruntime {
        Some(lib) if base.join("model.onnx").exists() => Embedder::load_onnx(&base, "cpu", lib, None),
        _ => Embedder::load(&base, &device),
    }
    .expect("the base embedder");
    let texts: Vec<&str> = cran.docs.iter().map(|(_, t)| t.as_str()).collect();
    let mut doc_vecs = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        doc_vecs.extend(embedder.embed(chunk).expect("embedding"));
    }
    let mut qids: Vec<&String> = cran.qrels.keys().collect();
    qids.sort_by_key(|q| q.parse::<u32>().unwrap_or(u32::MAX));
    let qtexts: Vec<&str> = qids.iter().map(|q| cran.queries[*q].as_str()).collect();
    let mut q_vecs = Vec::new();
    for chunk in qtexts.chunks(32) {
        q_vecs.extend(embedder.embed(chunk).expect("embedding"));
    }
    let ranking = |qv: &[f32]| -> Vec<usize> {
        let mut scored: Vec<(f32, usize)> = doc_vecs.iter().enumerate().map(|(i, dv)| (qv.iter().zip(dv).map(|(a, b)| a * b).sum(), i)).collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.into_iter().map(|(_, i)| i).collect()
    };
    let rankings: Vec<Vec<usize>> = q_vecs.iter().map(|v| ranking(v)).collect();
    eprintln!("embedded {} documents and {} queries in {:.1} s", texts.len(), qids.len(), t0.elapsed().as_secs_f64());
    let is_train = |q: &str| q.parse::<u32>().is_ok_and(|n| (1..=150).contains(&n));

    let model = if eval_only {
        CrossEncoder::load(&out, max_tokens, 0, &device).expect("a trained reranker")
    } else {
        // groups: each relevant document among the embedder's top 50 (what the reranker will
        // see), with 3 non-relevant documents drawn from the same top 50
        let mut groups = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut draw = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for (qi, q) in qids.iter().enumerate().filter(|(_, q)| is_train(q)) {
            let rel = &cran.qrels[*q];
            let top: Vec<usize> = rankings[qi].iter().copied().take(50).collect();
            let non: Vec<usize> = top.iter().copied().filter(|&di| !rel.contains_key(&cran.docs[di].0)).collect();
            for &di in top.iter().filter(|&&di| rel.contains_key(&cran.docs[di].0)).take(positives) {
                let mut picked: Vec<usize> = Vec::new();
                while picked.len() < negatives.min(non.len()) {
                    let n = non[draw(non.len())];
                    if !picked.contains(&n) {
                        picked.push(n);
                    }
                }
                let negs = picked.iter().map(|&n| cran.docs[n].1.clone()).collect();
                groups.push((cran.queries[*q].clone(), cran.docs[di].1.clone(), negs));
            }
        }
        // and pseudo-queries from the corpus itself (no labels of any query): a document's title
        // asks for its body, against three bodies from the embedder's top 50 for that title.
        // Every `title_stride`-th document; 0 = none.
        if title_stride > 0 {
            let picked: Vec<usize> = (0..cran.titled.len()).step_by(title_stride).filter(|&i| !cran.titled[i].0.is_empty() && !cran.titled[i].1.is_empty()).collect();
            let titles: Vec<&str> = picked.iter().map(|&i| cran.titled[i].0.as_str()).collect();
            let mut vecs = Vec::new();
            for chunk in titles.chunks(32) {
                vecs.extend(embedder.embed(chunk).expect("embedding"));
            }
            for (&i, v) in picked.iter().zip(&vecs) {
                let non: Vec<usize> = ranking(v).into_iter().take(50).filter(|&j| j != i).collect();
                let mut negs: Vec<String> = Vec::new();
                while negs.len() < negatives {
                    let body = &cran.titled[non[draw(non.len())]].1;
                    if !negs.contains(body) {
                        negs.push(body.clone());
                    }
                }
                groups.push((cran.titled[i].0.clone(), cran.titled[i].1.clone(), negs));
            }
        }
        let mut model = CrossEncoder::load(&base, max_tokens, 0, &device).expect("the base encoder");
        let trainable_layers = args.iter().position(|a| a == "--layers").and_then(|i| args.get(i + 1)).map(|v| v.parse().expect("a number"));
        let settings = TrainSettings { epochs, trainable_layers, learning_rate, batch_size: 16, seed: 0, weight_decay: 0.01 };
        let t = Instant::now();
        eprintln!(
            "training on {} groups of 1 relevant + {negatives} non-relevant ({} epochs, {max_tokens} tokens per pair, {learning_rate} learning rate)",
            groups.len(),
            epochs
        );
        let mut last = Instant::now();
        let loss = model
            .train_groups(&groups, &settings, &mut |step, total, l, mean| {
                if last.elapsed().as_secs_f64() > 10.0 || step == total {
                    eprintln!("step {step}/{total}: loss {l:.4}, mean {mean:.4}, {:.0} s", t.elapsed().as_secs_f64());
                    last = Instant::now();
                }
                true
            })
            .expect("training");
        model.save(&out, &base).expect("saving the reranker");
        eprintln!("trained in {:.0} s, last epoch's mean loss {loss:.4}; saved to {}", t.elapsed().as_secs_f64(), out.display());
        model
    };

    // held-out evaluation: queries 151-225, scored by ONNX Runtime on the exported model when
    // its library is given (the path rerank() takes), else by candle
    let onnx = onnxruntime.map(|lib| {
        let mut spec = lorag_models::engine::ModelSpec::new("eval", out.clone(), None, "cpu");
        spec.library = lib;
        lorag_models::rerank::reranker(&spec).expect("the exported model in ONNX Runtime")
    });
    let (mut base_sum, mut rr_sum, mut fused_sum, mut n) = (0.0, 0.0, 0.0, 0);
    let t = Instant::now();
    for (qi, q) in qids.iter().enumerate().filter(|(_, q)| !is_train(q)) {
        let rel = &cran.qrels[*q];
        let top: Vec<usize> = rankings[qi].iter().copied().take(50).collect();
        let ids: Vec<&str> = top.iter().map(|&i| cran.docs[i].0.as_str()).collect();
        base_sum += ndcg10(&ids, rel);
        let pairs: Vec<(&str, &str)> = top.iter().map(|&i| (cran.queries[*q].as_str(), cran.docs[i].1.as_str())).collect();
        let scores = match &onnx {
            Some(r) => r.score(&cran.queries[*q], &pairs.iter().map(|p| p.1).collect::<Vec<_>>(), &|| false).expect("scoring"),
            None => model.score(&pairs).expect("scoring"),
        };
        let ranked_by = |key: &[f32]| -> f64 {
            let mut order: Vec<usize> = (0..top.len()).collect();
            order.sort_by(|&a, &b| key[b].total_cmp(&key[a]).then(a.cmp(&b)));
            ndcg10(&order.iter().map(|&i| ids[i]).collect::<Vec<_>>(), rel)
        };
        rr_sum += ranked_by(&scores);
        // what rag_retrieve ranks by (lorag.rerank_weight 0.5): both scores standardised, averaged
        let similarity: Vec<f32> = top.iter().map(|&i| q_vecs[qi].iter().zip(&doc_vecs[i]).map(|(a, b)| a * b).sum()).collect();
        let (zr, zs) = (standardised(&scores), standardised(&similarity));
        fused_sum += ranked_by(&zr.iter().zip(&zs).map(|(r, s)| 0.5 * r + 0.5 * s).collect::<Vec<_>>());
        n += 1;
    }
    println!(
        "held-out Cranfield queries 151-225 ({n}): nDCG@10 embedder {:.4}; embedder top 50 + reranker alone {:.4} ({:+.4}); \
         + reranker fused with the embedder's similarity (lorag.rerank_weight 0.5, what rag_retrieve does) {:.4} ({:+.4}); scored in {:.0} s",
        base_sum / n as f64,
        rr_sum / n as f64,
        (rr_sum - base_sum) / n as f64,
        fused_sum / n as f64,
        (fused_sum - base_sum) / n as f64,
        t.elapsed().as_secs_f64()
    );
}

/// `v` minus its mean, over its (population) standard deviation; zeros when all values are equal.
fn standardised(v: &[f32]) -> Vec<f32> {
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
    v.iter().map(|x| if sd > 0.0 { (x - mean) / sd } else { 0.0 }).collect()
}
