//! Models, with no PostgreSQL in them: loading Hugging Face model folders, the BERT sentence
//! embedder, text chunking on tokenizer tokens, device selection, and the model process that
//! serves every connection when lorag's worker is enabled (engine, protocol, serve).
//!
//! Everything returns [`ModelError`]; the extension turns it into an ERROR with an SQLSTATE
//! and a hint at its SQL boundary.

pub mod chunk;
pub mod cross;
pub mod device;
pub mod embed;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod lora;
pub mod onnx;
pub mod onnxrt;
mod q8;
pub mod rerank;
pub mod protocol;
pub mod serve;

pub use error::ModelError;
pub use {candle_core, lorag_lora, tokenizers};

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// The sha256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Resident memory of this process in bytes, from /proc (0 where it cannot be read).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}
