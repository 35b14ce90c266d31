//! Splitting text into chunks of at most `max_tokens` embedder tokens, cut at sentence ends
//! where possible, consecutive chunks sharing about `overlap` tokens.
//!
//! The algorithm works on token offsets (byte ranges in the text), so it is independent of
//! the tokenizer and tested with a whitespace one.

use crate::ModelError;
use tokenizers::Tokenizer;

/// Byte offsets where a sentence ends (just after `.`, `!`, `?` followed by white space, or
/// after a blank line).
pub fn sentence_ends(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut ends = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        let next = bytes.get(i + 1).copied();
        let end_mark = matches!(b, b'.' | b'!' | b'?') && next.is_none_or(|c| c.is_ascii_whitespace());
        let blank_line = b == b'\n' && next == Some(b'\n');
        if end_mark || blank_line {
            ends.push(i + 1);
        }
    }
    ends
}

/// Chunk boundaries as token index ranges over `offsets` (each token's byte range).
pub fn plan(offsets: &[(usize, usize)], sentence_ends: &[usize], max_tokens: usize, overlap: usize) -> Vec<(usize, usize)> {
    let n = offsets.len();
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let hard_end = (start + max_tokens).min(n);
        let mut end = hard_end;
        if hard_end < n {
            // the last token before a sentence end inside the window, if one lies past the
            // middle (an earlier cut would make a short chunk)
            if let Some(cut) = (start + max_tokens / 2..hard_end).rev().find(|&t| ends_before_next(offsets, sentence_ends, t)) {
                end = cut + 1;
            }
        }
        out.push((start, end));
        if end >= n {
            break;
        }
        start = end.saturating_sub(overlap).max(start + 1);
    }
    out
}

/// True when a sentence end lies between token `t` and token `t + 1`.
fn ends_before_next(offsets: &[(usize, usize)], ends: &[usize], t: usize) -> bool {
    let (a, b) = (offsets[t].1, offsets.get(t + 1).map_or(usize::MAX, |o| o.0));
    let i = ends.partition_point(|&e| e < a);
    ends.get(i).is_some_and(|&e| e <= b)
}

/// The chunks of `text` for `tokenizer`.
pub fn chunk(tokenizer: &Tokenizer, text: &str, max_tokens: usize, overlap: usize) -> Result<Vec<String>, ModelError> {
    if max_tokens < 1 {
        return Err(ModelError::Invalid("max_tokens must be at least 1".into()));
    }
    if overlap >= max_tokens {
        return Err(ModelError::Invalid(format!("overlap ({overlap}) must be smaller than max_tokens ({max_tokens})")));
    }
    let enc = tokenizer.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let offsets: Vec<(usize, usize)> = enc.get_offsets().to_vec();
    if offsets.is_empty() {
        return Ok(if text.trim().is_empty() { Vec::new() } else { vec![text.trim().to_owned()] });
    }
    let ends = sentence_ends(text);
    Ok(plan(&offsets, &ends, max_tokens, overlap)
        .into_iter()
        .map(|(s, e)| text[offsets[s].0..offsets[e - 1].1].trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in text.char_indices() {
            match (c.is_whitespace(), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    out.push((s, i));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((s, text.len()));
        }
        out
    }

    fn chunks(text: &str, max: usize, overlap: usize) -> Vec<String> {
        let offsets = words(text);
        plan(&offsets, &sentence_ends(text), max, overlap)
            .into_iter()
            .map(|(s, e)| text[offsets[s].0..offsets[e - 1].1].to_owned())
            .collect()
    }

    #[test]
    fn cuts_at_sentence_ends_and_respects_the_limit() {
        let text = "One two three. Four five six seven. Eight nine ten eleven twelve. Thirteen.";
        let c = chunks(text, 8, 0);
        assert_eq!(c[0], "One two three. Four five six seven.");
        assert_eq!(c[1], "Eight nine ten eleven twelve. Thirteen.");
        assert!(c.iter().all(|c| c.split_whitespace().count() <= 8));
        let joined: Vec<&str> = c.iter().flat_map(|c| c.split_whitespace()).collect();
        assert_eq!(joined, text.split_whitespace().collect::<Vec<_>>(), "no overlap: every word once, in order");
    }

    #[test]
    fn overlapping_chunks_share_tokens() {
        let text = (0..100).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let c = chunks(&text, 10, 3);
        assert!(c.len() > 10);
        for pair in c.windows(2) {
            let a: Vec<&str> = pair[0].split_whitespace().collect();
            let b: Vec<&str> = pair[1].split_whitespace().collect();
            assert_eq!(&a[a.len() - 3..], &b[..3]);
        }
        assert!(c.last().unwrap().ends_with("w99"));
    }

    #[test]
    fn a_long_sentence_is_split_by_tokens() {
        let text = (0..25).map(|i| format!("x{i}")).collect::<Vec<_>>().join(" ") + ".";
        let c = chunks(&text, 10, 0);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|c| c.split_whitespace().count() <= 10));
    }

    #[test]
    fn sentence_end_detection() {
        assert_eq!(sentence_ends("A b. C d!\n\nE 3.5 f?"), vec![4, 9, 10, 19]);
    }
}
