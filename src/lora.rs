//! LoRA adapters in SQL: the row-streaming jobs behind `lora_train()` and `perplexity()`,
//! adapters for `generate()`, and the files of `lora_export()` / `lora_import()`.
//!
//! The SQL side (sql/lora.sql) reads the source with the caller's privileges and hands rows
//! over in batches; here they go to the model worker (or, without it, to a job in this
//! backend), one conversation per job: open, count, feed, finish. A transaction that aborts
//! mid-job drops the job. Training progress comes back after every step and is shown as a
//! NOTICE.

use crate::fmgr::sql_function;
use crate::guc::LORAG_ADAPTER_DIR;
use crate::models::{invalid, lookup, notice_in_backend, raise, report, text_arg, ENGINE};
use crate::worker;
use lorag_models::lora::{AdapterPayload, Job, JobRequest, JobResponse, JobSpec};
use lorag_models::lorag_lora::train::Progress;
use lorag_models::lorag_lora::{Adapter, LoraConfig, TrainConfig};
use lorag_models::protocol::{Request, Response};
use lorag_models::ModelError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{pg_sys, IntoDatum, JsonB, PgLogLevel, PgSqlErrorCode, Spi};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

thread_local! {
    /// The job this backend runs itself (no worker).
    static JOB: RefCell<Option<Job>> = const { RefCell::new(None) };
    /// The trained adapter's weights between `_job_finish()` and `_job_weights()`.
    static WEIGHTS: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
    static LAST_NOTICE: RefCell<Option<Instant>> = const { RefCell::new(None) };
}

fn unexpected(r: Response) -> ! {
    raise(ModelError::Runtime(format!("unexpected answer from the model worker: {r:?}")))
}

/// One NOTICE per training step (at most one every two seconds, and always the last).
fn notice_progress(p: &Progress) {
    let due = LAST_NOTICE.with(|l| {
        let mut l = l.borrow_mut();
        let due = p.done || l.is_none_or(|t| t.elapsed().as_secs_f64() >= 2.0);
        if due {
            *l = Some(Instant::now());
        }
        due
    });
    if !due {
        return;
    }
    let left = if p.eta_s >= 90.0 { format!("{:.0} min", p.eta_s / 60.0) } else { format!("{:.0} s", p.eta_s) };
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
        format!(
            "lora_train: step {}/{}, loss {:.4} (mean {:.4}), {:.0} tokens/s, {:.0} s elapsed, about {left} left",
            p.step, p.total_steps, p.loss, p.mean_loss, p.tokens_per_second, p.elapsed_s
        ),
        "lorag",
    )
    .report(PgLogLevel::NOTICE);
}

/// Sends one job request to the worker or runs it here.
fn job_call(request: Request) -> JobResponse {
    let mut progress = |p: &Progress| {
        if p.total_steps > 0 {
            notice_progress(p);
        }
        pgrx::check_for_interrupts!();
    };
    if worker::enabled() {
        return match worker::call_with_progress(&request, &mut progress) {
            Response::Job(r) => r,
            Response::Error(e) => raise(e),
            other => unexpected(other),
        };
    }
    notice_in_backend();
    let result = match request {
        Request::JobOpen(spec) => {
            JOB.with(|j| j.borrow_mut().take());
            let generator = ENGINE.with(|e| e.borrow_mut().generator(spec.model())).unwrap_or_else(|e| raise(e));
            Job::open(spec, generator).map(|(job, opened)| {
                JOB.with(|j| *j.borrow_mut() = Some(job));
                opened
            })
        }
        Request::Job(r) => {
            let last = matches!(r, JobRequest::Finish);
            let mut job = JOB.with(|j| j.borrow_mut().take())
                .unwrap_or_else(|| raise(ModelError::Invalid("no job is open in this session".into())));
            let result = job.handle(r, &mut |p| {
                progress(p);
                true
            });
            if !last && result.is_ok() {
                JOB.with(|j| *j.borrow_mut() = Some(job));
            }
            result
        }
        _ => unreachable!("only job requests come here"),
    };
    result.unwrap_or_else(|e| raise(e))
}

/// An adapter row as a payload, checked against `model` (the caller's choice, if any);
/// returns it with the base model's name.
pub(crate) fn adapter_payload(name: &str, model: Option<&str>) -> AdapterPayload {
    type Row = (Option<String>, Option<JsonB>, Option<String>, Option<Vec<u8>>);
    let row: Option<Row> = Spi::connect(|client| {
        let rows = client
            .select(
                "SELECT base_model, config, weights_sha256, weights FROM lorag.adapters WHERE name = $1",
                Some(1),
                &[name.into()],
            )
            .unwrap_or_else(|e| report(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string(), None));
        rows.into_iter().next().map(|r| (r.get(1).ok().flatten(), r.get(2).ok().flatten(), r.get(3).ok().flatten(), r.get(4).ok().flatten()))
    });
    let Some((Some(base), Some(config), Some(sha256), Some(weights))) = row else {
        report(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("adapter \"{name}\" does not exist"),
            Some("Train one with lora_train('table'), or import one with lora_import(); SELECT name FROM lorag.adapters lists them.".into()),
        );
    };
    if let Some(m) = model {
        if m != base {
            report(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("adapter \"{name}\" was trained for base model \"{base}\", not \"{m}\""),
                Some(format!("Leave model out to use \"{base}\", or use an adapter trained for \"{m}\".")),
            );
        }
    }
    let config = LoraConfig::from_peft(&config.0, &base).unwrap_or_else(|e| raise(e.into()));
    AdapterPayload { name: name.to_owned(), config, sha256, weights }
}

fn field<'a>(spec: &'a Value, key: &str) -> &'a Value {
    spec.get(key).unwrap_or(&Value::Null)
}

/// A number argument: `default` when absent (NULL), an ERROR when not a finite number (jsonb
/// turns NaN and Infinity into strings).
fn number(spec: &Value, key: &str, default: f64) -> f64 {
    match field(spec, key) {
        Value::Null => default,
        v => v.as_f64().filter(|f| f.is_finite()).unwrap_or_else(|| {
            invalid(format!("{key} must be a finite number, got {v}"), "See \\df lora_train for the arguments and their defaults.")
        }),
    }
}

fn int(spec: &Value, key: &str) -> Option<i64> {
    field(spec, key).as_i64().or_else(|| field(spec, key).as_f64().map(|f| f as i64))
}

/// A non-negative count argument, or an ERROR naming it.
fn count(spec: &Value, key: &str, default: usize) -> usize {
    match int(spec, key) {
        None => default,
        Some(v) if v >= 0 => v as usize,
        Some(v) => invalid(format!("{key} must not be negative, got {v}"), "See \\df lora_train for the arguments and their defaults."),
    }
}

// lorag._job_open(spec jsonb) → jsonb: opens a training or perplexity job.
sql_function!(lorag_job_open, pg_finfo_lorag_job_open, |fcinfo| {
    // Safety: argument 0 is jsonb.
    let spec = unsafe { pgrx::fcinfo::pg_getarg::<JsonB>(fcinfo, 0) }.map(|j| j.0).unwrap_or(Value::Null);
    let model_name = field(&spec, "model").as_str().map(str::to_owned);
    let adapter = field(&spec, "adapter").as_str().map(str::to_owned);
    let job = match field(&spec, "kind").as_str() {
        Some("train") => {
            let model = lookup(model_name, "generator");
            let lora = LoraConfig {
                rank: count(&spec, "rank", 8),
                alpha: number(&spec, "alpha", 16.0),
                target_modules: field(&spec, "target_modules")
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                    .unwrap_or_else(|| vec!["q_proj".into(), "v_proj".into()]),
                base_model: model.name.clone(),
            };
            let defaults = TrainConfig::default();
            let train = TrainConfig {
                epochs: count(&spec, "epochs", 1),
                max_steps: int(&spec, "max_steps").map(|v| if v < 1 { 0 } else { v as usize }),
                learning_rate: number(&spec, "learning_rate", defaults.learning_rate),
                seq_len: count(&spec, "seq_len", defaults.seq_len),
                batch_size: count(&spec, "batch_size", defaults.batch_size),
                seed: int(&spec, "seed").unwrap_or(0) as u64,
                ..defaults
            };
            // Safety: a plain read of this backend's pid.
            let pid = unsafe { pg_sys::MyProcPid };
            let user = Spi::get_one::<String>("SELECT current_user::text").ok().flatten().unwrap_or_default();
            JobSpec::Train { model, adapter: adapter.unwrap_or_default(), lora, train, backend_pid: pid, user }
        }
        Some("perplexity") => {
            let payload = adapter.as_deref().map(|a| adapter_payload(a, model_name.as_deref()));
            let model = lookup(payload.as_ref().map(|p| p.config.base_model.clone()).or(model_name), "generator");
            JobSpec::Perplexity { model, adapter: payload, seq_len: count(&spec, "seq_len", 256) }
        }
        _ => invalid("job spec without a known kind".into(), "This is an internal function; call lora_train() or perplexity()."),
    };
    let model = job.model().name.clone();
    // A transaction that ends in an error drops the job (and, with the worker, the connection it ran on).
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, close_job);
    let JobResponse::Opened { trainable_parameters, total_parameters } = job_call(Request::JobOpen(job)) else {
        raise(ModelError::Runtime("the job did not open".into()))
    };
    JsonB(json!({"model": model, "trainable_parameters": trainable_parameters, "total_parameters": total_parameters}))
        .into_datum()
        .expect("jsonb is never NULL")
});

fn rows_arg(fcinfo: pg_sys::FunctionCallInfo) -> Vec<String> {
    // Safety: argument 0 is text[] (or NULL); NULL elements (NULL rows) are skipped.
    unsafe { pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 0) }.unwrap_or_default().into_iter().flatten().collect()
}

/// Drops this session's job: the one run here, and (by closing the connection) the worker's.
fn close_job() {
    JOB.with(|j| j.borrow_mut().take());
    WEIGHTS.with(|w| w.borrow_mut().take());
    worker::disconnect();
}

// lorag._job_close() → void: called by lora_train()/perplexity() when they fail, so an error
// caught by the caller (a subtransaction) leaves no job behind.
sql_function!(lorag_job_close, pg_finfo_lorag_job_close, |_fcinfo| {
    close_job();
    pg_sys::Datum::from(0)
});

// lorag._job_count(rows text[]) → bigint: tokens of these rows (training plans its steps).
sql_function!(lorag_job_count, pg_finfo_lorag_job_count, |fcinfo| {
    match job_call(Request::Job(JobRequest::Count(rows_arg(fcinfo)))) {
        JobResponse::Counted { tokens } => (tokens as i64).into_datum().expect("int8"),
        other => raise(ModelError::Runtime(format!("unexpected job answer {other:?}"))),
    }
});

fn progress_json(p: &Progress) -> Value {
    serde_json::to_value(p).expect("progress serialises")
}

// lorag._job_feed(rows text[]) → jsonb: trains on (or scores) these rows; the progress after.
sql_function!(lorag_job_feed, pg_finfo_lorag_job_feed, |fcinfo| {
    match job_call(Request::Job(JobRequest::Feed(rows_arg(fcinfo)))) {
        JobResponse::Fed(p) => JsonB(progress_json(&p)).into_datum().expect("jsonb"),
        other => raise(ModelError::Runtime(format!("unexpected job answer {other:?}"))),
    }
});

// lorag._job_finish() → jsonb: the result (a trained adapter's weights wait for _job_weights()).
sql_function!(lorag_job_finish, pg_finfo_lorag_job_finish, |_fcinfo| {
    let out = match job_call(Request::Job(JobRequest::Finish)) {
        JobResponse::Trained { summary, weights, sha256 } => {
            WEIGHTS.with(|w| *w.borrow_mut() = Some(weights));
            json!({"progress": progress_json(&summary.progress), "trainable_parameters": summary.trainable_parameters,
                   "total_parameters": summary.total_parameters, "weights_sha256": sha256})
        }
        JobResponse::Scored { nll, tokens } => json!({"nll": nll, "tokens": tokens}),
        other => raise(ModelError::Runtime(format!("unexpected job answer {other:?}"))),
    };
    JsonB(out).into_datum().expect("jsonb")
});

// lorag._job_weights() → bytea: the adapter _job_finish() trained (once).
sql_function!(lorag_job_weights, pg_finfo_lorag_job_weights, |fcinfo| {
    match WEIGHTS.with(|w| w.borrow_mut().take()) {
        Some(w) => w.into_datum().expect("bytea"),
        // Safety: returning SQL NULL.
        None => unsafe { pgrx::fcinfo::pg_return_null(fcinfo) },
    }
});

// lorag._training_progress() → jsonb: the training jobs the model worker runs now.
sql_function!(lorag_training_progress, pg_finfo_lorag_training_progress, |_fcinfo| {
    let jobs: Vec<Value> = if worker::enabled() {
        match worker::call(&Request::Status) {
            Response::Status(s) => s
                .trainings
                .iter()
                .map(|t| {
                    let mut v = progress_json(&t.progress);
                    v["adapter"] = t.adapter.clone().into();
                    v["model"] = t.model.clone().into();
                    v["pid"] = t.backend_pid.into();
                    v["usename"] = t.user.clone().into();
                    v
                })
                .collect(),
            other => unexpected(other),
        }
    } else {
        Vec::new()
    };
    JsonB(Value::Array(jobs)).into_datum().expect("jsonb")
});

/// `relative` inside lorag.adapter_dir: no absolute paths, no `..`, nothing odd.
fn adapter_path(relative: &str) -> PathBuf {
    let base = match LORAG_ADAPTER_DIR.get().map(|c| c.to_string_lossy().into_owned()).filter(|s| !s.is_empty()) {
        Some(b) => PathBuf::from(b),
        // Safety: DataDir is set for the life of the backend.
        None => PathBuf::from(unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }.to_string_lossy().into_owned()).join("lorag_adapters"),
    };
    let rel = Path::new(relative);
    let clean = !relative.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !clean {
        report(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("\"{relative}\" is not a folder inside lorag.adapter_dir"),
            Some(format!("Give a relative path without \"..\", e.g. 'my_adapter'; it is resolved under {}.", base.display())),
        );
    }
    base.join(rel)
}

fn io_error(path: &Path, e: std::io::Error) -> ! {
    let code = if e.kind() == std::io::ErrorKind::NotFound { PgSqlErrorCode::ERRCODE_UNDEFINED_FILE } else { PgSqlErrorCode::ERRCODE_IO_ERROR };
    report(code, format!("{}: {e}", path.display()), None)
}

// lorag._adapter_write(dir text, config jsonb, weights bytea) → text: writes a PEFT folder.
sql_function!(lorag_adapter_write, pg_finfo_lorag_adapter_write, |fcinfo| {
    let dir = adapter_path(&text_arg(fcinfo, 0).unwrap_or_default());
    // Safety: arguments 1 and 2 are jsonb and bytea.
    let (config, weights) = unsafe { (pgrx::fcinfo::pg_getarg::<JsonB>(fcinfo, 1), pgrx::fcinfo::pg_getarg::<Vec<u8>>(fcinfo, 2)) };
    let (Some(config), Some(weights)) = (config, weights) else { invalid("config and weights are required".into(), "") };
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| io_error(&dir, e));
    let cfg = dir.join("adapter_config.json");
    std::fs::write(&cfg, serde_json::to_vec_pretty(&config.0).expect("json")).unwrap_or_else(|e| io_error(&cfg, e));
    let st = dir.join("adapter_model.safetensors");
    std::fs::write(&st, weights).unwrap_or_else(|e| io_error(&st, e));
    dir.to_string_lossy().into_owned().into_datum().expect("text")
});

/// The registered model a PEFT config names as its base: the whole `base_model_name_or_path`,
/// or its last part (`HuggingFaceTB/SmolLM2-135M-Instruct` → `SmolLM2-135M-Instruct`).
fn registered_base(config: &Value) -> String {
    let named = field(config, "base_model_name_or_path").as_str().unwrap_or_default().to_owned();
    let last = named.rsplit('/').next().unwrap_or_default().to_owned();
    for candidate in [&named, &last] {
        let found = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM lorag.models WHERE name = $1)", &[candidate.as_str().into()]);
        if !candidate.is_empty() && found.ok().flatten() == Some(true) {
            return candidate.clone();
        }
    }
    report(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("the adapter's base model \"{named}\" is not registered"),
        Some("Pass base_model => the registered name of that model (SELECT name FROM lorag.models WHERE kind = 'generator').".into()),
    )
}

// lorag._adapter_read(dir text, model text) → jsonb {config, weights (hex)}: reads a PEFT
// folder and checks it against the base model (every tensor's name and shape).
sql_function!(lorag_adapter_read, pg_finfo_lorag_adapter_read, |fcinfo| {
    let dir = adapter_path(&text_arg(fcinfo, 0).unwrap_or_default());
    let cfg = dir.join("adapter_config.json");
    let text = std::fs::read(&cfg).unwrap_or_else(|e| io_error(&cfg, e));
    let config: Value = serde_json::from_slice(&text)
        .unwrap_or_else(|e| report(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION, format!("{}: {e}", cfg.display()), None));
    let st = dir.join("adapter_model.safetensors");
    let weights = std::fs::read(&st).unwrap_or_else(|e| io_error(&st, e));
    let model = lookup(Some(text_arg(fcinfo, 1).unwrap_or_else(|| registered_base(&config))), "generator");
    let lora = LoraConfig::from_peft(&config, &model.name).unwrap_or_else(|e| raise(e.into()));
    let mc = model.path.join("config.json");
    let mtext = std::fs::read_to_string(&mc).unwrap_or_else(|e| raise(ModelError::io(&mc, e)));
    let mconf: lorag_models::generate::Config = serde_json::from_str(&mtext).unwrap_or_else(|e| raise(ModelError::corrupt(&mc, e)));
    Adapter::from_safetensors(lora.clone(), &weights, mconf.num_hidden_layers, |m| mconf.module_dims(m), &lorag_models::candle_core::Device::Cpu)
        .unwrap_or_else(|e| raise(ModelError::Invalid(format!("{}: {e}", st.display()))));
    let hex: String = weights.iter().map(|b| format!("{b:02x}")).collect();
    JsonB(json!({"config": lora.to_peft(None), "base_model": model.name, "weights": hex})).into_datum().expect("jsonb")
});
