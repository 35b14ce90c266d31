//! pgvector's text form: `[1,2,3]`, whitespace allowed around elements and brackets, elements
//! in any notation `strtof` accepts (`1e-3`, `.5`, `+2`), printed back in PostgreSQL's
//! shortest round-trip float4 form so that dumps restore bit-identically.

use crate::{check_dim, check_finite, VectorError};
use std::fmt::Write;

/// Parses `[1,2,3]`.
pub fn parse(input: &str) -> Result<Vec<f32>, VectorError> {
    let syntax = |detail: Option<&'static str>| VectorError::InvalidSyntax { input: input.to_owned(), detail };
    let s = input.trim_start_matches(is_space);
    let Some(mut rest) = s.strip_prefix('[') else {
        return Err(syntax(Some("Vector contents must start with \"[\".")));
    };
    let mut values = Vec::new();
    rest = rest.trim_start_matches(is_space);
    if let Some(after) = rest.strip_prefix(']') {
        if !after.trim_matches(is_space).is_empty() {
            return Err(syntax(Some("Junk after closing right brace.")));
        }
        return Err(VectorError::Empty);
    }
    loop {
        if values.len() >= crate::MAX_DIM {
            return Err(VectorError::TooManyDimensions(values.len() + 1));
        }
        rest = rest.trim_start_matches(is_space);
        let end = rest.find(|c: char| c == ',' || c == ']' || is_space(c)).unwrap_or(rest.len());
        let token = &rest[..end];
        if token.is_empty() {
            return Err(syntax(None));
        }
        let value = parse_element(token).ok_or_else(|| syntax(None))?;
        if value.is_infinite() && !names_infinity(token) {
            return Err(VectorError::OutOfRange(token.to_owned()));
        }
        values.push(value);
        rest = rest[end..].trim_start_matches(is_space);
        match rest.chars().next() {
            Some(',') => rest = &rest[1..],
            Some(']') => {
                rest = &rest[1..];
                break;
            }
            None => return Err(syntax(Some("Unexpected end of input."))),
            Some(_) => return Err(syntax(None)),
        }
    }
    if !rest.trim_matches(is_space).is_empty() {
        return Err(syntax(Some("Junk after closing right brace.")));
    }
    check_finite(&values)?;
    check_dim(values.len())?;
    Ok(values)
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// One element, as `strtof` reads it (decimal only).
fn parse_element(token: &str) -> Option<f32> {
    let lower = token.to_ascii_lowercase();
    let unsigned = lower.trim_start_matches(['+', '-']);
    if unsigned.len() + 1 < lower.len() {
        return None; // more than one sign
    }
    if !matches!(unsigned, "inf" | "infinity" | "nan")
        && !unsigned.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | '+' | '-'))
    {
        return None;
    }
    lower.parse::<f32>().ok()
}

fn names_infinity(token: &str) -> bool {
    let t = token.trim_start_matches(['+', '-']).to_ascii_lowercase();
    t == "inf" || t == "infinity"
}

/// Formats `[1,2,3]`.
pub fn format(values: &[f32]) -> String {
    let mut out = String::with_capacity(values.len() * 12 + 2);
    out.push('[');
    for (i, &v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_float4(&mut out, v);
    }
    out.push(']');
    out
}

/// PostgreSQL's float4 output with `extra_float_digits >= 1`: the shortest digits that read
/// back to the same float, in `%g`-like layout with precision 6 (exponent form when the decimal
/// exponent is below -4 or at least 6), exponent with a sign and at least two digits.
pub fn push_float4(out: &mut String, v: f32) {
    if v.is_nan() {
        out.push_str("NaN");
        return;
    }
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    // Rust's `{:e}` prints the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    out.push_str(sign);
    if v == 0.0 {
        out.push('0');
    } else if !(-4..6).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if exp < 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat('0').take((-exp - 1) as usize));
        out.push_str(&digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(&digits);
            out.extend(std::iter::repeat('0').take(int_len - digits.len()));
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgvector_text() {
        assert_eq!(parse("[1,2,3]").unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(parse("  [ 1 , 2.5 ,\t-3e2 ]  ").unwrap(), vec![1.0, 2.5, -300.0]);
        assert_eq!(parse("[.5,+1,1E-3,5.]").unwrap(), vec![0.5, 1.0, 0.001, 5.0]);
    }

    #[test]
    fn rejects_bad_text() {
        let syntax = |s: &str| matches!(parse(s), Err(VectorError::InvalidSyntax { .. }));
        for bad in ["[1,,2]", "[1,2", "abc", "[1,2]x", "[1 2]", "1,2]", "[,]", "[1,]", "[a]", "[1,2]]", "", "[0x10]", "[--1]"] {
            assert!(syntax(bad), "{bad:?} should be a syntax error: {:?}", parse(bad));
        }
        assert_eq!(parse("[]"), Err(VectorError::Empty));
        assert_eq!(parse("[ ]"), Err(VectorError::Empty));
        assert_eq!(parse("[NaN]"), Err(VectorError::NaN));
        assert_eq!(parse("[1,inf]"), Err(VectorError::Infinite));
        assert_eq!(parse("[-Infinity]"), Err(VectorError::Infinite));
        assert_eq!(parse("[1e39]"), Err(VectorError::OutOfRange("1e39".into())));
        let big = format!("[{}]", vec!["1"; 16001].join(","));
        assert!(matches!(parse(&big), Err(VectorError::TooManyDimensions(_))));
        let max = format!("[{}]", vec!["1"; 16000].join(","));
        assert_eq!(parse(&max).unwrap().len(), 16000);
    }

    #[test]
    fn prints_like_postgres_float4() {
        let cases: &[(f32, &str)] = &[
            (1.0, "1"),
            (-2.5, "-2.5"),
            (0.1, "0.1"),
            (123456.0, "123456"),
            (1234567.0, "1.234567e+06"),
            (1e7, "1e+07"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-30, "1.5e-30"),
            (3.4028235e38, "3.4028235e+38"),
            (0.0, "0"),
            (-0.0, "-0"),
            (100.0, "100"),
            (0.33333334, "0.33333334"),
        ];
        for &(v, want) in cases {
            let mut s = String::new();
            push_float4(&mut s, v);
            assert_eq!(s, want, "{v:e}");
        }
        assert_eq!(format(&[1.0, 2.0, 3.0]), "[1,2,3]");
    }

    #[test]
    fn text_round_trips_bit_exactly() {
        let mut x = 0x1234_5678u32;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if !v.is_finite() {
                continue;
            }
            let text = format(&[v]);
            assert_eq!(parse(&text).unwrap()[0].to_bits(), v.to_bits(), "{text}");
        }
    }
}
