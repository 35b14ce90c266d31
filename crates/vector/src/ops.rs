//! Element-wise arithmetic, norms, comparison and sub-vectors, with pgvector's semantics.

use crate::{check_same_dim, VectorError};
use std::cmp::Ordering;

fn elementwise(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Result<Vec<f32>, VectorError> {
    check_same_dim(a, b)?;
    let out: Vec<f32> = a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    if out.iter().any(|v| v.is_infinite()) {
        return Err(VectorError::Overflow);
    }
    Ok(out)
}

pub fn add(a: &[f32], b: &[f32]) -> Result<Vec<f32>, VectorError> {
    elementwise(a, b, |x, y| x + y)
}

pub fn sub(a: &[f32], b: &[f32]) -> Result<Vec<f32>, VectorError> {
    elementwise(a, b, |x, y| x - y)
}

/// Element-wise product; a product that rounds to zero from non-zero factors is an underflow.
pub fn mul(a: &[f32], b: &[f32]) -> Result<Vec<f32>, VectorError> {
    let out = elementwise(a, b, |x, y| x * y)?;
    for ((&x, &y), &r) in a.iter().zip(b).zip(&out) {
        if r == 0.0 && x != 0.0 && y != 0.0 {
            return Err(VectorError::Underflow);
        }
    }
    Ok(out)
}

/// `a || b`.
pub fn concat(a: &[f32], b: &[f32]) -> Result<Vec<f32>, VectorError> {
    crate::check_dim(a.len() + b.len())?;
    Ok(a.iter().chain(b).copied().collect())
}

/// The Euclidean norm, accumulated in double precision.
pub fn norm(a: &[f32]) -> f64 {
    a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// `a / ‖a‖`; a zero vector stays zero.
pub fn l2_normalize(a: &[f32]) -> Result<Vec<f32>, VectorError> {
    let n = norm(a);
    if n == 0.0 {
        return Ok(vec![0.0; a.len()]);
    }
    let out: Vec<f32> = a.iter().map(|&x| (x as f64 / n) as f32).collect();
    if out.iter().any(|v| v.is_infinite()) {
        return Err(VectorError::Overflow);
    }
    Ok(out)
}

/// Total order used by the btree opclass: element by element, then the shorter vector first.
pub fn compare(a: &[f32], b: &[f32]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        match x.partial_cmp(y) {
            Some(Ordering::Equal) | None => continue,
            Some(o) => return o,
        }
    }
    a.len().cmp(&b.len())
}

/// The elements at 1-based positions `start .. start + count`, clipped to the vector.
pub fn subvector(a: &[f32], start: i32, count: i32) -> Result<&[f32], VectorError> {
    if count < 1 {
        return Err(VectorError::Empty);
    }
    let end = start as i64 + count as i64; // exclusive, 1-based; i64 so it cannot overflow
    let first = (start as i64).max(1);
    let last = end.min(a.len() as i64 + 1);
    if last <= first {
        return Err(VectorError::Empty);
    }
    Ok(&a[(first - 1) as usize..(last - 1) as usize])
}

/// Running state of `avg(vector)`: the count followed by per-dimension sums, kept in double
/// precision as a `double precision[]` (pgvector's layout, so plans move across).
pub fn accumulate(state: &mut Vec<f64>, v: &[f32]) -> Result<(), VectorError> {
    if state.len() <= 1 {
        state.clear();
        state.push(0.0);
        state.extend(std::iter::repeat(0.0).take(v.len()));
    } else if state.len() - 1 != v.len() {
        return Err(VectorError::DimensionMismatch(state.len() - 1, v.len()));
    }
    state[0] += 1.0;
    for (s, &x) in state[1..].iter_mut().zip(v) {
        *s += x as f64;
        if s.is_infinite() {
            return Err(VectorError::Overflow);
        }
    }
    Ok(())
}

/// Merges two `avg` states (parallel aggregation).
pub fn combine(a: &[f64], b: &[f64]) -> Result<Vec<f64>, VectorError> {
    if a.len() <= 1 || a[0] == 0.0 {
        return Ok(b.to_vec());
    }
    if b.len() <= 1 || b[0] == 0.0 {
        return Ok(a.to_vec());
    }
    if a.len() != b.len() {
        return Err(VectorError::DimensionMismatch(a.len() - 1, b.len() - 1));
    }
    let out: Vec<f64> = a.iter().zip(b).map(|(x, y)| x + y).collect();
    if out.iter().any(|v| v.is_infinite()) {
        return Err(VectorError::Overflow);
    }
    Ok(out)
}

/// The final average; `None` when no row was seen (SQL NULL).
pub fn average(state: &[f64]) -> Result<Option<Vec<f32>>, VectorError> {
    if state.len() <= 1 || state[0] == 0.0 {
        return Ok(None);
    }
    let n = state[0];
    let out: Vec<f32> = state[1..].iter().map(|&s| (s / n) as f32).collect();
    crate::check_finite(&out).map_err(|_| VectorError::Overflow)?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_its_errors() {
        assert_eq!(add(&[1.0, 2.0], &[3.0, 4.0]).unwrap(), vec![4.0, 6.0]);
        assert_eq!(sub(&[1.0, 2.0], &[3.0, 4.0]).unwrap(), vec![-2.0, -2.0]);
        assert_eq!(mul(&[1.0, 2.0], &[3.0, 4.0]).unwrap(), vec![3.0, 8.0]);
        assert_eq!(add(&[1.0], &[1.0, 2.0]), Err(VectorError::DimensionMismatch(1, 2)));
        assert_eq!(add(&[3e38], &[3e38]), Err(VectorError::Overflow));
        assert_eq!(mul(&[1e-30], &[1e-30]), Err(VectorError::Underflow));
    }

    #[test]
    fn normalize_and_norm() {
        assert_eq!(norm(&[3.0, 4.0]), 5.0);
        assert_eq!(l2_normalize(&[3.0, 4.0]).unwrap(), vec![0.6, 0.8]);
        assert_eq!(l2_normalize(&[0.0, 0.0]).unwrap(), vec![0.0, 0.0]);
    }

    #[test]
    fn subvector_clips_like_pgvector() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(subvector(&v, 1, 3).unwrap(), &[1.0, 2.0, 3.0]);
        assert_eq!(subvector(&v, 3, 2).unwrap(), &[3.0, 4.0]);
        assert_eq!(subvector(&v, -1, 3).unwrap(), &[1.0]);
        assert_eq!(subvector(&v, 4, 10).unwrap(), &[4.0, 5.0]);
        assert_eq!(subvector(&v, 6, 1), Err(VectorError::Empty));
        assert_eq!(subvector(&v, 1, 0), Err(VectorError::Empty));
        assert_eq!(subvector(&v, i32::MAX, i32::MAX), Err(VectorError::Empty));
        assert_eq!(subvector(&v, i32::MIN, i32::MAX).unwrap_err(), VectorError::Empty);
    }

    #[test]
    fn ordering() {
        assert_eq!(compare(&[1.0, 2.0], &[1.0, 3.0]), Ordering::Less);
        assert_eq!(compare(&[1.0, 2.0], &[1.0, 2.0]), Ordering::Equal);
        assert_eq!(compare(&[1.0, 2.0], &[1.0, 2.0, 0.0]), Ordering::Less);
        assert_eq!(compare(&[2.0], &[1.0, 2.0]), Ordering::Greater);
    }

    #[test]
    fn average_state() {
        let mut s = vec![0.0];
        accumulate(&mut s, &[1.0, 2.0]).unwrap();
        accumulate(&mut s, &[3.0, 6.0]).unwrap();
        assert_eq!(average(&s).unwrap(), Some(vec![2.0, 4.0]));
        assert_eq!(accumulate(&mut s, &[1.0]), Err(VectorError::DimensionMismatch(2, 1)));
        let mut t = vec![0.0];
        accumulate(&mut t, &[5.0, 5.0]).unwrap();
        let c = combine(&s, &t).unwrap();
        assert_eq!(average(&c).unwrap(), Some(vec![3.0, 13.0 / 3.0]));
        assert_eq!(average(&[0.0]).unwrap(), None);
        assert_eq!(combine(&[0.0], &t).unwrap(), t);
    }
}
