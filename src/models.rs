//! Models in SQL: the registry (`lorag.models`), `embed()`, `chunk()` and `worker_status()`.
//!
//! Models run inside the calling backend, loaded on first use and cached for the life of the
//! connection (the shared model worker of DESIGN.md §2 is not built yet: each connection loads
//! its own copy). Data access (the registry lookup) happens here in the backend through SPI;
//! candle's compute threads never call PostgreSQL.

use crate::fmgr::{arg_i32, arg_is_null, sql_function};
use crate::guc::{LORAG_DEVICE, LORAG_EMBEDDING_MODEL, LORAG_MODEL_DIR};
use lorag_models::candle_core;
use lorag_models::device::DeviceChoice;
use lorag_models::tokenizers;
use lorag_models::embed::Embedder;
use lorag_models::ModelError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{pg_sys, IntoDatum, PgLogLevel, PgSqlErrorCode, Spi};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The command that puts the default models in place.
pub const FETCH_COMMAND: &str = "make models (scripts/fetch-models.sh)";
/// Inputs per forward pass; interrupts are checked between passes.
const BATCH: usize = 32;

static REQUESTS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static EMBEDDERS: std::cell::RefCell<HashMap<String, Arc<Embedder>>> = std::cell::RefCell::new(HashMap::new());
    static TOKENIZERS: std::cell::RefCell<HashMap<String, Arc<tokenizers::Tokenizer>>> = std::cell::RefCell::new(HashMap::new());
    static DEVICE_NAME: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

fn report(code: PgSqlErrorCode, message: String, hint: Option<String>) -> ! {
    let mut r = ErrorReport::new(code, message, "lorag");
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!()
}

/// Raises a model error with its SQLSTATE and what the user can do.
fn raise(e: ModelError) -> ! {
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
    };
    report(code, e.to_string(), hint)
}

/// A registered model.
struct ModelRow {
    name: String,
    path: PathBuf,
    checksum: Option<String>,
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
fn lookup(name: Option<String>, kind: &str) -> ModelRow {
    let name = name.unwrap_or_else(|| {
        LORAG_EMBEDDING_MODEL.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
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
            format!("model \"{name}\" is a {found_kind} model, not an {kind} model"),
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
    ModelRow { name, path, checksum }
}

fn device() -> candle_core::Device {
    let choice = LORAG_DEVICE.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    let (device, name) = DeviceChoice::parse(&choice).and_then(DeviceChoice::resolve).unwrap_or_else(|e| raise(e));
    DEVICE_NAME.with(|d| *d.borrow_mut() = Some(name));
    device
}

/// The embedder for `row`, loaded on first use in this backend.
fn embedder(row: &ModelRow) -> Arc<Embedder> {
    let key = format!("{}\u{0}{}", row.name, row.path.display());
    if let Some(e) = EMBEDDERS.with(|m| m.borrow().get(&key).cloned()) {
        return e;
    }
    if let Some(expected) = &row.checksum {
        let weights = row.path.join("model.safetensors");
        let actual = lorag_models::sha256_file(&weights).unwrap_or_else(|e| raise(e));
        if &actual != expected {
            raise(ModelError::Checksum { path: weights, expected: expected.clone(), actual });
        }
    }
    let e = Arc::new(Embedder::load(&row.path, &device()).unwrap_or_else(|e| raise(e)));
    EMBEDDERS.with(|m| m.borrow_mut().insert(key, e.clone()));
    e
}

/// Embeds `texts` batch by batch, checking for cancel between batches.
fn embed_all(e: &Embedder, texts: &[&str]) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(texts.len());
    for batch in texts.chunks(BATCH) {
        pgrx::check_for_interrupts!();
        out.extend(e.embed(batch).unwrap_or_else(|err| raise(err)));
    }
    REQUESTS.fetch_add(texts.len() as u64, Ordering::Relaxed);
    out
}

fn text_arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<String> {
    // Safety: argument n is text (or NULL).
    unsafe { pgrx::fcinfo::pg_getarg::<String>(fcinfo, n) }
}

// embed(input text, model text DEFAULT NULL) → vector
sql_function!(lorag_embed, pg_finfo_lorag_embed, |fcinfo| {
    let Some(input) = text_arg(fcinfo, 0) else {
        // Safety: returning SQL NULL.
        return unsafe { pgrx::fcinfo::pg_return_null(fcinfo) };
    };
    let row = lookup(text_arg(fcinfo, 1), "embedding");
    let e = embedder(&row);
    let v = embed_all(&e, &[input.as_str()]).pop().expect("one input, one output");
    crate::vector::vector_datum(&v)
});

// embed(inputs text[], model text DEFAULT NULL) → vector[]
sql_function!(lorag_embed_array, pg_finfo_lorag_embed_array, |fcinfo| {
    // Safety: argument 0 is text[] (or NULL).
    let Some(inputs) = (unsafe { pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 0) }) else {
        // Safety: returning SQL NULL.
        return unsafe { pgrx::fcinfo::pg_return_null(fcinfo) };
    };
    let row = lookup(text_arg(fcinfo, 1), "embedding");
    let e = embedder(&row);
    let present: Vec<&str> = inputs.iter().flatten().map(String::as_str).collect();
    let mut vectors = embed_all(&e, &present).into_iter();
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

/// Resident memory of this process, from /proc.
fn resident_bytes() -> i64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<i64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

// lorag._worker_status() → text[] (mode, device, models, memory, queue, requests)
sql_function!(lorag_worker_status, pg_finfo_lorag_worker_status, |_fcinfo| {
    let models: Vec<String> = EMBEDDERS.with(|m| m.borrow().keys().map(|k| k.split('\u{0}').next().unwrap_or("").to_owned()).collect());
    let device = DEVICE_NAME.with(|d| d.borrow().clone()).unwrap_or_else(|| "cpu (no model loaded yet)".into());
    let fields = vec![
        "in-backend: each connection loads its own models (no shared worker yet)".to_owned(),
        device,
        models.join(","),
        resident_bytes().to_string(),
        "0".to_owned(),
        REQUESTS.load(Ordering::Relaxed).to_string(),
    ];
    fields.into_datum().expect("an array is never NULL")
});
