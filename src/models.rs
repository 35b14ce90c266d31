//! Models in SQL: the registry (`lorag.models`), `embed()`, `chunk()`, `generate()` and
//! `worker_status()`.
//!
//! The backend resolves which model a call means (registry lookup through SPI, with the
//! caller's privileges) into a [`ModelSpec`]. With lorag preloaded, the shared model worker
//! computes ([`crate::worker`]); without it, the same engine runs inside this backend, loaded on
//! first use and kept for the connection, after one NOTICE that says how to enable the worker.
//! `chunk()` only needs the tokenizer and always runs here.

use crate::fmgr::{arg_i32, arg_is_null, sql_function};
use crate::guc::{
    LORAG_DEVICE, LORAG_EMBEDDING_RUNTIME, LORAG_EMBEDDING_MODEL, LORAG_GENERATION_MODEL, LORAG_MAX_TOKENS, LORAG_MODEL_DIR, LORAG_ONNXRUNTIME_LIBRARY,
    LORAG_RERANKER_MODEL, LORAG_USE_WORKER,
};
use crate::worker;
use lorag_models::engine::{Engine, ModelSpec, BATCH};
use lorag_models::generate::{GenerateRequest, Generated};
use lorag_models::protocol::{Request, Response};
use lorag_models::tokenizers;
use lorag_models::ModelError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{pg_sys, IntoDatum, PgLogLevel, PgSqlErrorCode, Spi};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The command that puts the default models in place.
pub const FETCH_COMMAND: &str = "make models (scripts/fetch-models.sh)";

static REQUESTS: AtomicU64 = AtomicU64::new(0);
static NOTICE_GIVEN: AtomicBool = AtomicBool::new(false);

thread_local! {
    pub(crate) static ENGINE: std::cell::RefCell<Engine> = std::cell::RefCell::new(Engine::new());
    static TOKENIZERS: std::cell::RefCell<HashMap<String, Arc<tokenizers::Tokenizer>>> = std::cell::RefCell::new(HashMap::new());
}

pub(crate) fn report(code: PgSqlErrorCode, message: String, hint: Option<String>) -> ! {
    let mut r = ErrorReport::new(code, message, "lorag");
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!()
}

/// Raises a model error with its SQLSTATE and what the user can do.
pub(crate) fn raise(e: ModelError) -> ! {
    let (code, hint) = match &e {
        ModelError::Missing { .. } => (
            PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
            Some(format!("Fetch the default models with {FETCH_COMMAND} and point lorag.model_dir at that folder.")),
        ),
        ModelError::Corrupt { .. } | ModelError::Checksum { .. } => (
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            Some(format!("Fetch the model again with {FETCH_COMMAND}, or re-register it with the right file.")),
        ),
        ModelError::Io { .. } => (PgSqlErrorCode::ERRCODE_IO_ERROR, None),
        ModelError::Tokenizer(_) | ModelError::Runtime(_) => (PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, None),
        ModelError::Invalid(_) => (PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, None),
        ModelError::Refused { hint, .. } => (PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, Some(hint.clone())),
        ModelError::Setup { hint, .. } => (PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, Some(hint.clone())),
        ModelError::Unsuitable { hint, .. } => (PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, Some(hint.clone())),
        ModelError::WorkerDied(_) => (
            PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            Some("The worker starts a new model process at once; run the statement again. The server log says why it ended (a crash, or the OOM killer).".into()),
        ),
    };
    report(code, e.to_string(), hint)
}

fn registered_names() -> String {
    let names: Vec<String> = Spi::connect(|client| {
        client
            .select("SELECT name FROM lorag.models ORDER BY name", None, &[])
            .map(|rows| rows.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
            .unwrap_or_default()
    });
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Looks a model up by name (the GUC's default when `None`) and resolves its folder.
pub(crate) fn lookup(name: Option<String>, kind: &str) -> ModelSpec {
    let name = name.unwrap_or_else(|| {
        let default = match kind {
            "generator" => &LORAG_GENERATION_MODEL,
            "reranker" => &LORAG_RERANKER_MODEL,
            _ => &LORAG_EMBEDDING_MODEL,
        };
        default.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
    });
    let row: Option<(Option<String>, Option<String>, Option<String>)> = Spi::connect(|client| {
        let rows = client
            .select("SELECT kind, path, checksum FROM lorag.models WHERE name = $1", Some(1), &[name.clone().into()])
            .unwrap_or_else(|e| report(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string(), None));
        rows.into_iter().next().map(|r| (r.get(1).ok().flatten(), r.get(2).ok().flatten(), r.get(3).ok().flatten()))
    });
    let Some((Some(found_kind), Some(path), checksum)) = row else {
        report(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("model \"{name}\" is not registered"),
            Some(format!("Registered models: {}. Register others with lorag.register_model().", registered_names())),
        );
    };
    if found_kind != kind {
        report(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("model \"{name}\" is registered as a model of kind {found_kind}, but this call needs a {kind} model"),
            Some(format!("Registered models: {}.", registered_names())),
        );
    }
    let path = PathBuf::from(&path);
    let path = if path.is_absolute() {
        path
    } else {
        let dir = LORAG_MODEL_DIR.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        if dir.is_empty() {
            report(
                PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
                "lorag.model_dir is not set".into(),
                Some(format!("Fetch the default models with {FETCH_COMMAND} and set lorag.model_dir to that folder.")),
            );
        }
        PathBuf::from(dir).join(path)
    };
    let device = LORAG_DEVICE.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    let mut spec = ModelSpec::new(&name, path, checksum, &device);
    spec.library = LORAG_ONNXRUNTIME_LIBRARY.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    if kind == "embedding" {
        spec.runtime = LORAG_EMBEDDING_RUNTIME.get().name().into();
    }
    spec
}

/// Says once per connection why models load here, and how to share them instead.
pub(crate) fn notice_in_backend() {
    if worker::preloaded() || NOTICE_GIVEN.swap(true, Ordering::Relaxed) {
        return;
    }
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
        "lorag's model worker is not running: models load inside this connection",
        "lorag",
    )
    .set_hint(
        "Add lorag to shared_preload_libraries in postgresql.conf and restart PostgreSQL: one worker then serves \
         every connection with one copy of each model, and batches their requests together.",
    )
    .report(PgLogLevel::NOTICE);
}

/// Embeds `texts` with `spec`: in the shared worker, or here batch by batch with a check for
/// cancel between batches.
fn embed_texts(spec: ModelSpec, texts: Vec<String>) -> Vec<Vec<f32>> {
    let n = texts.len();
    let vectors = if worker::enabled() {
        match worker::call(&Request::Embed { model: spec, texts }) {
            Response::Embeddings(v) if v.len() == n => v,
            Response::Error(e) => raise(e),
            other => raise(ModelError::Runtime(format!("unexpected answer from the model worker: {other:?}"))),
        }
    } else {
        notice_in_backend();
        let embedder = ENGINE.with(|e| e.borrow_mut().embedder(&spec)).unwrap_or_else(|e| raise(e));
        let mut out = Vec::with_capacity(n);
        for batch in texts.chunks(BATCH) {
            pgrx::check_for_interrupts!();
            let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
            out.extend(embedder.embed(&refs).unwrap_or_else(|e| raise(e)));
        }
        out
    };
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    vectors
}

pub(crate) fn text_arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<String> {
    // Safety: argument n is text (or NULL).
    unsafe { pgrx::fcinfo::pg_getarg::<String>(fcinfo, n) }
}

// embed(input text, model text DEFAULT NULL) → vector
sql_function!(lorag_embed, pg_finfo_lorag_embed, |fcinfo| {
    let Some(input) = text_arg(fcinfo, 0) else {
        // Safety: returning SQL NULL.
        return unsafe { pgrx::fcinfo::pg_return_null(fcinfo) };
    };
    let spec = lookup(text_arg(fcinfo, 1), "embedding");
    let v = embed_texts(spec, vec![input]).pop().expect("one input, one output");
    crate::vector::vector_datum(&v)
});

// embed(inputs text[], model text DEFAULT NULL) → vector[]
sql_function!(lorag_embed_array, pg_finfo_lorag_embed_array, |fcinfo| {
    // Safety: argument 0 is text[] (or NULL).
    let Some(inputs) = (unsafe { pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 0) }) else {
        // Safety: returning SQL NULL.
        return unsafe { pgrx::fcinfo::pg_return_null(fcinfo) };
    };
    let spec = lookup(text_arg(fcinfo, 1), "embedding");
    let present: Vec<String> = inputs.iter().flatten().cloned().collect();
    let mut vectors = embed_texts(spec, present).into_iter();
    let mut datums = Vec::with_capacity(inputs.len());
    let mut nulls = Vec::with_capacity(inputs.len());
    for input in &inputs {
        match input {
            Some(_) => {
                datums.push(crate::vector::vector_datum(&vectors.next().expect("one output per input")));
                nulls.push(false);
            }
            None => {
                datums.push(pg_sys::Datum::from(0usize));
                nulls.push(true);
            }
        }
    }
    // Safety: flinfo describes this call; the element type of vector[] is vector.
    unsafe {
        let array_type = pg_sys::get_fn_expr_rettype((*fcinfo).flinfo);
        let elem = pg_sys::get_element_type(array_type);
        let mut dims = [datums.len() as i32];
        let mut lbs = [1i32];
        let arr = pg_sys::construct_md_array(
            datums.as_mut_ptr(),
            nulls.as_mut_ptr(),
            1,
            dims.as_mut_ptr(),
            lbs.as_mut_ptr(),
            elem,
            -1,
            false,
            b'i' as std::ffi::c_char,
        );
        pg_sys::Datum::from(arr)
    }
});

// lorag._chunk(input text, max_tokens int, overlap int, model text) → text[]
sql_function!(lorag_chunk, pg_finfo_lorag_chunk, |fcinfo| {
    let Some(input) = text_arg(fcinfo, 0) else {
        // Safety: returning SQL NULL.
        return unsafe { pgrx::fcinfo::pg_return_null(fcinfo) };
    };
    // Safety: arguments 1 and 2 are int4.
    let (max_tokens, overlap) = unsafe {
        (
            if arg_is_null(fcinfo, 1) { 256 } else { arg_i32(fcinfo, 1) },
            if arg_is_null(fcinfo, 2) { 32 } else { arg_i32(fcinfo, 2) },
        )
    };
    if max_tokens < 1 || overlap < 0 || overlap >= max_tokens {
        report(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("chunk() needs max_tokens >= 1 and 0 <= overlap < max_tokens, got {max_tokens} and {overlap}"),
            Some("For example chunk(text, 256, 32).".into()),
        );
    }
    let row = lookup(text_arg(fcinfo, 3), "embedding");
    let key = row.path.display().to_string();
    let tokenizer = TOKENIZERS.with(|m| m.borrow().get(&key).cloned()).unwrap_or_else(|| {
        let t = Arc::new(lorag_models::embed::load_tokenizer(&row.path, None).unwrap_or_else(|e| raise(e)));
        TOKENIZERS.with(|m| m.borrow_mut().insert(key.clone(), t.clone()));
        t
    });
    let chunks = lorag_models::chunk::chunk(&tokenizer, &input, max_tokens as usize, overlap as usize).unwrap_or_else(|e| raise(e));
    chunks.into_datum().expect("an array is never NULL")
});

/// Runs `req` in the shared worker, or here step by step with a check for cancel between steps.
fn generate_text(req: GenerateRequest) -> Generated {
    let generated = if worker::enabled() {
        match worker::call(&Request::Generate(req)) {
            Response::Generated(g) => g,
            Response::Error(e) => raise(e),
            other => raise(ModelError::Runtime(format!("unexpected answer from the model worker: {other:?}"))),
        }
    } else {
        notice_in_backend();
        let (generator, adapter) = ENGINE
            .with(|e| {
                let mut e = e.borrow_mut();
                let g = e.generator(&req.model)?;
                let a = e.adapter(&req, &g)?;
                Ok((g, a))
            })
            .unwrap_or_else(|e| raise(e));
        generator.generate(&req, adapter, || { pgrx::check_for_interrupts!(); }).unwrap_or_else(|e| raise(e))
    };
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    generated
}

pub(crate) fn invalid(message: String, hint: &str) -> ! {
    report(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, Some(hint.into()))
}

// lorag._generate(prompt text, max_tokens int, temperature real, adapter text, model text,
//                 system text, context text[], top_p real, seed bigint)
//   → text[] (text, prompt_tokens, generated_tokens, context_tokens_cut, finish_reason,
//             time_to_first_token_ms, total_ms)
sql_function!(lorag_generate, pg_finfo_lorag_generate, |fcinfo| {
    let Some(prompt) = text_arg(fcinfo, 0) else {
        // Safety: returning SQL NULL.
        return unsafe { pgrx::fcinfo::pg_return_null(fcinfo) };
    };
    if prompt.trim().is_empty() {
        invalid("the prompt is empty".into(), "Pass the text the model should answer, e.g. generate('Explain VACUUM in one sentence.').");
    }
    // Safety: arguments 1, 2, 7, 8 are int4, float4, float4, int8 (or NULL).
    let (max_tokens, temperature, top_p, seed) = unsafe {
        (
            if arg_is_null(fcinfo, 1) { 256 } else { arg_i32(fcinfo, 1) },
            pgrx::fcinfo::pg_getarg::<f32>(fcinfo, 2).unwrap_or(0.0),
            pgrx::fcinfo::pg_getarg::<f32>(fcinfo, 7).unwrap_or(0.9),
            pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 8).unwrap_or(0),
        )
    };
    let cap = LORAG_MAX_TOKENS.get();
    if max_tokens < 1 {
        invalid(format!("max_tokens must be at least 1, got {max_tokens}"), "For example generate(prompt, max_tokens => 128).");
    }
    if max_tokens > cap {
        invalid(
            format!("max_tokens {max_tokens} is above the limit lorag.max_tokens = {cap}"),
            "Ask for fewer tokens, or have a superuser raise lorag.max_tokens.",
        );
    }
    if !temperature.is_finite() || temperature < 0.0 {
        invalid(format!("temperature must be 0 (greedy) or positive, got {temperature}"), "0 always picks the likeliest token; 0.7 is a common choice for varied text.");
    }
    if !top_p.is_finite() || top_p <= 0.0 || top_p > 1.0 {
        invalid(format!("top_p must be in (0, 1], got {top_p}"), "0.9 keeps the tokens that make up 90% of the probability.");
    }
    let adapter = text_arg(fcinfo, 3).map(|a| crate::lora::adapter_payload(&a, text_arg(fcinfo, 4).as_deref()));
    // an adapter brings its base model along
    let model = lookup(text_arg(fcinfo, 4).or_else(|| adapter.as_ref().map(|a| a.config.base_model.clone())), "generator");
    let system = text_arg(fcinfo, 5);
    // Safety: argument 6 is text[] (or NULL).
    let context: Vec<String> = unsafe { pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 6) }
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect();
    let g = generate_text(GenerateRequest {
        model,
        prompt,
        system,
        context,
        max_tokens: max_tokens as usize,
        temperature: f64::from(temperature),
        top_p: f64::from(top_p),
        seed: seed as u64,
        adapter,
    });
    vec![
        g.text,
        g.prompt_tokens.to_string(),
        g.generated_tokens.to_string(),
        g.context_tokens_cut.to_string(),
        g.finish_reason,
        format!("{:.1}", g.time_to_first_token_ms),
        format!("{:.1}", g.total_ms),
    ]
    .into_datum()
    .expect("an array is never NULL")
});

/// Scores of `documents` against `query` with the reranker `spec`: in the shared worker, or
/// here, where query cancel terminates the run in progress.
pub(crate) fn rerank_scores(spec: ModelSpec, query: String, documents: Vec<String>) -> Vec<f32> {
    if documents.is_empty() {
        return Vec::new();
    }
    let n = documents.len();
    let scores = if worker::enabled() {
        match worker::call(&Request::Rerank { model: spec, query, documents }) {
            Response::Scores(s) if s.len() == n => s,
            Response::Error(e) => raise(e),
            other => raise(ModelError::Runtime(format!("unexpected answer from the model worker: {other:?}"))),
        }
    } else {
        notice_in_backend();
        let reranker = lorag_models::rerank::reranker(&spec).unwrap_or_else(|e| raise(e));
        let docs: Vec<&str> = documents.iter().map(String::as_str).collect();
        // The watcher thread only reads the flags the signal handlers set for query cancel,
        // statement_timeout and termination (it never calls PostgreSQL); the ERROR itself is
        // raised here, in the main thread.
        let pending = || {
            // Safety: sig_atomic_t flags that signal handlers set; plain volatile reads.
            unsafe {
                std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::QueryCancelPending)) != 0
                    || std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::ProcDiePending)) != 0
            }
        };
        let result = reranker.score(&query, &docs, &pending);
        pgrx::check_for_interrupts!();
        result.unwrap_or_else(|e| raise(e))
    };
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    scores
}

// lorag._rerank(query text, documents text[], model text) → real[] (NULL for NULL documents)
sql_function!(lorag_rerank, pg_finfo_lorag_rerank, |fcinfo| {
    let Some(query) = text_arg(fcinfo, 0) else {
        // Safety: returning SQL NULL.
        return unsafe { pgrx::fcinfo::pg_return_null(fcinfo) };
    };
    // Safety: argument 1 is text[] (or NULL).
    let Some(documents) = (unsafe { pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 1) }) else {
        // Safety: returning SQL NULL.
        return unsafe { pgrx::fcinfo::pg_return_null(fcinfo) };
    };
    let spec = lookup(text_arg(fcinfo, 2), "reranker");
    let present: Vec<String> = documents.iter().flatten().cloned().collect();
    let mut scores = rerank_scores(spec, query, present).into_iter();
    let out: Vec<Option<f32>> = documents.iter().map(|d| d.as_ref().map(|_| scores.next().expect("one score per document"))).collect();
    out.into_datum().expect("an array is never NULL")
});

/// "name: runtime" pairs as one comma-separated field.
fn runtimes_text(loaded: &[(String, String)]) -> String {
    loaded.iter().map(|(name, provider)| format!("{name}: {provider}")).collect::<Vec<_>>().join(",")
}

// lorag._worker_status() → text[] (mode, device, models, memory, queue, requests, pid, batches,
// batched texts, decoding steps, decoded streams, rerankers, embedders)
sql_function!(lorag_worker_status, pg_finfo_lorag_worker_status, |_fcinfo| {
    let fields: Vec<Option<String>> = if worker::enabled() {
        let Response::Status(s) = worker::call(&Request::Status) else {
            raise(ModelError::Runtime("unexpected answer from the model worker".into()))
        };
        vec![
            Some("worker: one model process serves every connection".into()),
            Some(s.device.unwrap_or_else(|| "none yet (no model loaded)".into())),
            Some(s.models.join(",")),
            Some(s.memory_bytes.to_string()),
            Some(s.queue_depth.to_string()),
            Some(s.requests_served.to_string()),
            Some(s.pid.to_string()),
            Some(s.batches.to_string()),
            Some(s.batched_texts.to_string()),
            Some(s.decode_steps.to_string()),
            Some(s.decoded_streams.to_string()),
            Some(runtimes_text(&s.rerankers)),
            Some(runtimes_text(&s.embedders)),
        ]
    } else {
        let (device, models, embedders) = ENGINE.with(|e| {
            let e = e.borrow();
            (e.device().map(str::to_owned), e.loaded_models().to_vec(), e.runtimes().to_vec())
        });
        let mode = if worker::preloaded() && !LORAG_USE_WORKER.get() {
            "in-backend: lorag.use_worker is off in this session"
        } else {
            "in-backend: lorag is not in shared_preload_libraries, each connection loads its own models"
        };
        vec![
            Some(mode.into()),
            Some(device.unwrap_or_else(|| "none yet (no model loaded)".into())),
            Some(models.join(",")),
            Some(lorag_models::resident_bytes().to_string()),
            Some("0".into()),
            Some(REQUESTS.load(Ordering::Relaxed).to_string()),
            Some(std::process::id().to_string()),
            None,
            None,
            None,
            None,
            Some(runtimes_text(&lorag_models::rerank::loaded())),
            Some(runtimes_text(&embedders)),
        ]
    };
    fields.into_datum().expect("an array is never NULL")
});
