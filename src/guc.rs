//! Every GUC lorag defines, in one place (STYLE.md §6).

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;

/// `lorag.model_dir`: where registered model folders with relative paths live.
pub static LORAG_MODEL_DIR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `lorag.device`: auto | cpu | cuda:N.
pub static LORAG_DEVICE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"auto"));
/// `lorag.embedding_model`: the model `embed()` uses when none is named.
pub static LORAG_EMBEDDING_MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"all-MiniLM-L6-v2"));

/// `lorag.generation_model`: the registered model `generate()` and `rag_answer()` use by default.
pub static LORAG_GENERATION_MODEL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"SmolLM2-135M-Instruct"));
/// `lorag.reranker_model`: the cross-encoder `rerank()` and `rag_retrieve()` use by default.
pub static LORAG_RERANKER_MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"minilm-reranker"));
/// `lorag.rerank_weight`: how much the cross-encoder's score counts against the vector search's
/// similarity when a RAG call reranks its candidates (read by the SQL of `_rag_rerank`).
pub static LORAG_RERANK_WEIGHT: GucSetting<f64> = GucSetting::<f64>::new(0.5);
/// `lorag.onnxruntime_library`: the ONNX Runtime shared library rerankers and embedders run on.
pub static LORAG_ONNXRUNTIME_LIBRARY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `lorag.adapter_dir`: where `lora_export()` / `lora_import()` files live.
pub static LORAG_ADAPTER_DIR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// `lorag.max_tokens`: the most tokens one `generate()` may ask for.
pub static LORAG_MAX_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(1024);

/// `lorag.use_worker`: send model requests to the shared worker when lorag is preloaded.
pub static LORAG_USE_WORKER: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `hnsw.ef_search`: candidates kept per index scan batch.
pub static HNSW_EF_SEARCH: GucSetting<i32> = GucSetting::<i32>::new(lorag_hnsw::DEFAULT_EF_SEARCH as i32);
/// `hnsw.max_scan_tuples`: how many elements an iterative scan may visit.
pub static HNSW_MAX_SCAN_TUPLES: GucSetting<i32> = GucSetting::<i32>::new(20_000);
pub static HNSW_ITERATIVE_SCAN: GucSetting<IterativeScan> = GucSetting::<IterativeScan>::new(IterativeScan::Off);

/// `lorag.embedding_runtime`: which runtime computes embedders.
pub static LORAG_EMBEDDING_RUNTIME: GucSetting<EmbeddingRuntime> = GucSetting::<EmbeddingRuntime>::new(EmbeddingRuntime::Auto);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PostgresGucEnum)]
pub enum EmbeddingRuntime {
    #[name = c"auto"]
    Auto,
    #[name = c"candle"]
    Candle,
    #[name = c"onnxruntime"]
    Onnxruntime,
}

impl EmbeddingRuntime {
    pub fn name(self) -> &'static str {
        match self {
            EmbeddingRuntime::Auto => "auto",
            EmbeddingRuntime::Candle => "candle",
            EmbeddingRuntime::Onnxruntime => "onnxruntime",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PostgresGucEnum)]
pub enum IterativeScan {
    #[name = c"off"]
    Off,
    #[name = c"relaxed_order"]
    RelaxedOrder,
    #[name = c"strict_order"]
    StrictOrder,
}

pub fn init() {
    GucRegistry::define_int_guc(
        c"hnsw.ef_search",
        c"Size of the dynamic candidate list of an hnsw index scan.",
        c"Larger values find more of the true nearest neighbours (recall) and take longer.",
        &HNSW_EF_SEARCH,
        1,
        1000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"hnsw.iterative_scan",
        c"Whether an hnsw index scan continues past ef_search results.",
        c"With a selective WHERE clause, off may return fewer rows than LIMIT; relaxed_order and strict_order keep searching (strict_order never returns a row closer than one already returned).",
        &HNSW_ITERATIVE_SCAN,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"hnsw.max_scan_tuples",
        c"Most elements an iterative hnsw index scan visits.",
        c"Bounds the work of a query whose filter matches few rows.",
        &HNSW_MAX_SCAN_TUPLES,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"lorag.model_dir",
        c"Folder of the model folders registered with relative paths.",
        c"Filled by make models (scripts/fetch-models.sh). Only superusers may change it.",
        &LORAG_MODEL_DIR,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"lorag.device",
        c"Where models run: auto, cpu or cuda:N.",
        c"auto uses CUDA when this build and machine have it, else the CPU; lorag.worker_status() shows which runs.",
        &LORAG_DEVICE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"lorag.rerank_weight",
        c"Weight of the cross-encoder's score against the search's similarity when RAG calls rerank (0 to 1).",
        c"Candidates are ordered by weight * z(rerank score) + (1 - weight) * z(cosine similarity), z standardising over the candidates; 1 orders by the cross-encoder alone, 0 keeps the search's order.",
        &LORAG_RERANK_WEIGHT,
        0.0,
        1.0,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"lorag.embedding_runtime",
        c"Which runtime computes embeddings: auto, candle or onnxruntime.",
        c"auto runs a model folder's model.onnx on ONNX Runtime when lorag.onnxruntime_library is set (several times faster on the CPU), and model.safetensors on candle otherwise.",
        &LORAG_EMBEDDING_RUNTIME,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"lorag.embedding_model",
        c"The registered model embed() uses when none is named.",
        c"A name from lorag.models.",
        &LORAG_EMBEDDING_MODEL,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"lorag.generation_model",
        c"The registered model generate() and rag_answer() use when none is named.",
        c"A name from lorag.models of kind generator.",
        &LORAG_GENERATION_MODEL,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"lorag.reranker_model",
        c"The registered cross-encoder rerank() and rag_retrieve() use when none is named.",
        c"A name from lorag.models of kind reranker; empty turns reranking in rag_retrieve() and rag_answer() off.",
        &LORAG_RERANKER_MODEL,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"lorag.onnxruntime_library",
        c"Absolute path of the ONNX Runtime shared library (libonnxruntime.so) that rerankers run on.",
        c"make models puts the one of the onnxruntime 1.32 wheel under models/onnxruntime/. It is loaded once per process; only superusers may change it.",
        &LORAG_ONNXRUNTIME_LIBRARY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"lorag.max_tokens",
        c"The most new tokens one generate() or rag_answer() call may ask for.",
        c"Bounds the time and memory one call can take. Only superusers may change it.",
        &LORAG_MAX_TOKENS,
        1,
        32768,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"lorag.adapter_dir",
        c"The folder lora_export() writes to and lora_import() reads from.",
        c"Paths given to those functions are relative to it and cannot leave it. Empty: lorag_adapters in the data directory. Only superusers may change it.",
        &LORAG_ADAPTER_DIR,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"lorag.use_worker",
        c"Whether model requests go to the shared model worker.",
        c"Only has an effect when lorag is in shared_preload_libraries; off runs models inside the calling connection (its own copy). Only superusers may change it.",
        &LORAG_USE_WORKER,
        GucContext::Suset,
        GucFlags::default(),
    );
    // Safety: called from _PG_init, in the main thread.
    unsafe {
        pgrx::pg_sys::MarkGUCPrefixReserved(c"hnsw".as_ptr());
        pgrx::pg_sys::MarkGUCPrefixReserved(c"lorag".as_ptr());
    }
}
