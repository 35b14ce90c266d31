//! Converts a LLaMA-family GGUF (SmolLM2 by default) into a Hugging Face folder and checks it by
//! asking it one question greedily.
//!     lorag-convert-gguf MODEL.gguf DEST_DIR [--check "QUESTION" EXPECTED_WORD]

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 && !(args.len() == 6 && args[3] == "--check") {
        eprintln!("usage: {} MODEL.gguf DEST_DIR [--check QUESTION EXPECTED_WORD]", args[0]);
        return ExitCode::from(2);
    }
    let (gguf, dest) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    if let Err(e) = lorag_models::gguf::convert(&gguf, &dest) {
        eprintln!("lorag-convert-gguf: {e}");
        return ExitCode::FAILURE;
    }
    if args.len() == 6 {
        match lorag_models::gguf::greedy_answer(&dest, &args[4], 24) {
            Ok(answer) if answer.contains(args[5].as_str()) => println!("check: {:?} -> {:?}", args[4], answer),
            Ok(answer) => {
                eprintln!("lorag-convert-gguf: check failed: {:?} -> {:?} (expected {:?})", args[4], answer, args[5]);
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("lorag-convert-gguf: check failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
