//! `lorag.train_reranker()`: a cross-encoder fine-tuned on a table's (query, passage, label)
//! rows, written as a Hugging Face folder with its ONNX export under the data directory, then
//! registered (sql/rerank.sql). Training runs in this backend, with a NOTICE every few seconds
//! and query cancel checked after every step; `rerank()` itself is in [`crate::models`].

use crate::fmgr::{arg_i32, sql_function};
use crate::models::{invalid, lookup, raise, text_arg};
use lorag_models::cross::{CrossEncoder, TrainSettings};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{pg_sys, IntoDatum, PgLogLevel, PgSqlErrorCode};
use std::path::PathBuf;
use std::time::Instant;

/// Where trained rerankers are written: `$PGDATA/lorag_models/<name>`.
fn output_dir(name: &str) -> PathBuf {
    // Safety: DataDir is set for the life of the backend.
    let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }.to_string_lossy().into_owned();
    PathBuf::from(data).join("lorag_models").join(name)
}

// lorag._train_reranker(name text, base_model text, queries text[], passages text[], labels real[],
//                       epochs int, learning_rate float8, batch_size int, max_tokens int, seed bigint)
//   → text[] (path, pairs, steps, mean loss of the last epoch, seconds, sha256 of model.onnx)
sql_function!(lorag_train_reranker, pg_finfo_lorag_train_reranker, |fcinfo| {
    let name = text_arg(fcinfo, 0).unwrap_or_else(|| invalid("the reranker needs a name".into(), "Pass name => 'my_reranker'."));
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) || name.starts_with('.') {
        invalid(
            format!("invalid reranker name \"{name}\""),
            "Use letters, digits, '_', '-' and '.', not starting with '.': the name is also a folder name.",
        );
    }
    let base = lookup(text_arg(fcinfo, 1), "embedding");
    // Safety: arguments 2-4 are text[], text[], real[] (the SQL wrapper never passes NULL).
    let (queries, passages, labels) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 2).unwrap_or_default(),
            pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 3).unwrap_or_default(),
            pgrx::fcinfo::pg_getarg::<Vec<Option<f32>>>(fcinfo, 4).unwrap_or_default(),
        )
    };
    // Safety: arguments 5, 7, 8 are int4, 6 float8, 9 int8 (never NULL: defaults in SQL).
    let (epochs, learning_rate, batch_size, max_tokens, seed) = unsafe {
        (
            arg_i32(fcinfo, 5),
            pgrx::fcinfo::pg_getarg::<f64>(fcinfo, 6).unwrap_or(5e-5),
            arg_i32(fcinfo, 7),
            arg_i32(fcinfo, 8),
            pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 9).unwrap_or(0),
        )
    };
    if !(1..=100).contains(&epochs) {
        invalid(format!("epochs must be between 1 and 100, got {epochs}"), "One or two epochs are usual for fine-tuning.");
    }
    if !(learning_rate.is_finite() && learning_rate > 0.0 && learning_rate <= 1e-2) {
        invalid(format!("learning_rate must be in (0, 0.01], got {learning_rate}"), "Fine-tuning BERT usually takes 2e-5 to 1e-4.");
    }
    if !(1..=256).contains(&batch_size) {
        invalid(format!("batch_size must be between 1 and 256, got {batch_size}"), "16 is a good start.");
    }
    if !(16..=512).contains(&max_tokens) {
        invalid(format!("max_tokens must be between 16 and 512, got {max_tokens}"), "Query and passage together are cut to this many tokens; 160 covers an abstract.");
    }
    let mut pairs = Vec::with_capacity(queries.len());
    for ((q, p), l) in queries.into_iter().zip(passages).zip(labels) {
        if let (Some(q), Some(p), Some(l)) = (q, p, l) {
            pairs.push((q, p, l));
        }
    }
    if pairs.len() < 2 {
        invalid(
            format!("{} usable training pairs: a reranker needs relevant and non-relevant pairs", pairs.len()),
            "Rows with a NULL query, passage or label are skipped.",
        );
    }
    if let Some((_, _, l)) = pairs.iter().find(|(_, _, l)| !(0.0..=1.0).contains(l)) {
        invalid(format!("labels must be between 0 (not relevant) and 1 (relevant), found {l}"), "Scale graded labels to [0, 1], e.g. grade / max_grade.");
    }
    if pairs.iter().all(|p| p.2 > 0.0) || pairs.iter().all(|p| p.2 == 0.0) {
        invalid("all labels are equal: nothing to learn".into(), "Add non-relevant pairs (label 0), e.g. the embedder's top results that are not relevant.");
    }

    let device = lorag_models::candle_core::Device::Cpu;
    let mut model = CrossEncoder::load(&base.path, max_tokens as usize, seed as u64, &device).unwrap_or_else(|e| raise(e));
    let settings = TrainSettings { epochs: epochs as usize, trainable_layers: None, learning_rate, batch_size: batch_size as usize, seed: seed as u64, weight_decay: 0.01 };
    let start = Instant::now();
    let mut last_notice: Option<Instant> = None;
    let mut steps = 0;
    let loss = model
        .train(&pairs, &settings, &mut |step, total, l, mean| {
            pgrx::check_for_interrupts!();
            steps = step;
            if last_notice.is_none_or(|t| t.elapsed().as_secs_f64() >= 2.0) || step == total {
                last_notice = Some(Instant::now());
                let elapsed = start.elapsed().as_secs_f64();
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
                    format!(
                        "reranker \"{name}\": step {step}/{total}, loss {l:.4}, mean {mean:.4}, {elapsed:.0} s elapsed, about {:.0} s left",
                        elapsed / step as f64 * (total - step) as f64
                    ),
                    "lorag",
                )
                .report(PgLogLevel::NOTICE);
            }
            true
        })
        .unwrap_or_else(|e| raise(e));
    let dir = output_dir(&name);
    model.save(&dir, &base.path).unwrap_or_else(|e| raise(e));
    // registered as the checksum: a model trained again under the same name is loaded anew
    let sha = lorag_models::sha256_file(&dir.join("model.onnx")).unwrap_or_else(|e| raise(e));
    vec![
        dir.display().to_string(),
        pairs.len().to_string(),
        steps.to_string(),
        format!("{loss}"),
        format!("{:.1}", start.elapsed().as_secs_f64()),
        sha,
    ]
    .into_datum()
    .expect("an array is never NULL")
});
