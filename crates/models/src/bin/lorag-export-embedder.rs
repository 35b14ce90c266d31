//! Exports a BERT sentence-embedding folder (all-MiniLM-L6-v2 by default) to `model.onnx` in the
//! same folder, so that embed() runs on ONNX Runtime; with the library given, checks that ONNX
//! Runtime and candle embed a few sentences alike (cosine ≥ 0.9999).
//!     lorag-export-embedder MODEL_DIR [--onnxruntime LIBRARY]

use lorag_models::embed::Embedder;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 2 && !(args.len() == 4 && args[2] == "--onnxruntime") {
        eprintln!("usage: {} MODEL_DIR [--onnxruntime LIBRARY]", args[0]);
        return ExitCode::from(2);
    }
    let dir = PathBuf::from(&args[1]);
    let out = match lorag_models::cross::export_embedder(&dir) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("lorag-export-embedder: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(library) = args.get(3) {
        let sentences = [
            "The quick brown fox jumps over the lazy dog.",
            "PostgreSQL is an object-relational database system.",
            "hnsw",
            "Experimental investigation of the aerodynamics of a wing in a slipstream, measured at several angles of attack and flap settings.",
        ];
        let check = || -> Result<f32, lorag_models::ModelError> {
            let candle = Embedder::load(&dir, &lorag_models::candle_core::Device::Cpu)?.embed(&sentences)?;
            let onnx = Embedder::load_onnx(&dir, "cpu", library, None)?.embed(&sentences)?;
            Ok(candle.iter().zip(&onnx).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()).fold(1.0, f32::min))
        };
        match check() {
            Ok(cosine) if cosine >= 0.9999 => println!("check: ONNX Runtime and candle agree (lowest cosine {cosine:.6})"),
            Ok(cosine) => {
                eprintln!("lorag-export-embedder: check failed: lowest cosine between ONNX Runtime and candle {cosine:.6}");
                let _ = std::fs::remove_file(&out);
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("lorag-export-embedder: check failed: {e}");
                let _ = std::fs::remove_file(&out);
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{}", out.display());
    ExitCode::SUCCESS
}
