//! lorag: the PostgreSQL side. This crate is glue only (STYLE.md §1): it adapts the pure crates
//! under `crates/` to PostgreSQL's function manager, types and errors.
//!
//! The `vector` type's SQL (type, casts, operators, opclasses, aggregates) is hand-written in
//! `sql/vector.sql`, because its on-disk layout and I/O functions must match pgvector's
//! exactly; the C-ABI functions it names are in [`vector`].


::pgrx::pg_module_magic!(name, version);

mod error;
mod fmgr;
mod guc;
pub mod hnsw;
mod lora;
mod models;
mod rerank;
pub mod vector;
mod worker;

pgrx::extension_sql_file!("../sql/vector.sql", name = "vector", bootstrap);
pgrx::extension_sql_file!("../sql/hnsw.sql", name = "hnsw", requires = ["vector"]);
pgrx::extension_sql_file!("../sql/models.sql", name = "models", requires = ["hnsw"]);
pgrx::extension_sql_file!("../sql/rag.sql", name = "rag", requires = ["models"]);
pgrx::extension_sql_file!("../sql/lora.sql", name = "lora", requires = ["rag"]);
pgrx::extension_sql_file!("../sql/rerank.sql", name = "rerank", requires = ["lora"]);

/// Runs when a process first loads lorag. Registers settings, index options and (under
/// shared_preload_libraries) the model worker only: it never loads a model or starts a thread
/// (forked backends would inherit them).
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    hnsw::init();
    // Safety: a flag PostgreSQL sets while it loads shared_preload_libraries, read in the main thread.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
