//! The `vector` type's math, with no PostgreSQL in it.
//!
//! * [`kernels`]: distance kernels (dot product, squared L2, L1, cosine parts) with runtime CPU
//!   dispatch between AVX-512, AVX2+FMA and a scalar fallback. Never compiled with
//!   `-C target-cpu=native`: the same binary must run on every x86-64 CPU.
//! * [`text`]: pgvector's text form `[1,2,3]`, parsed and printed.
//! * [`ops`]: element-wise arithmetic, norms and comparisons with pgvector's semantics.
//! * [`VectorError`]: every way a vector operation can fail, with the SQLSTATE it maps to.

pub mod error;
pub mod kernels;
pub mod ops;
pub mod text;

pub use error::VectorError;

/// The largest number of dimensions a vector may have (pgvector's `VECTOR_MAX_DIM`).
pub const MAX_DIM: usize = 16000;

/// Checks that a vector of `dim` elements can exist.
pub fn check_dim(dim: usize) -> Result<(), VectorError> {
    if dim == 0 {
        Err(VectorError::Empty)
    } else if dim > MAX_DIM {
        Err(VectorError::TooManyDimensions(dim))
    } else {
        Ok(())
    }
}

/// Checks that every element is finite (no NaN, no infinity).
pub fn check_finite(values: &[f32]) -> Result<(), VectorError> {
    for &v in values {
        if v.is_nan() {
            return Err(VectorError::NaN);
        }
        if v.is_infinite() {
            return Err(VectorError::Infinite);
        }
    }
    Ok(())
}

/// Checks that two operands have the same number of dimensions.
pub fn check_same_dim(a: &[f32], b: &[f32]) -> Result<(), VectorError> {
    if a.len() == b.len() {
        Ok(())
    } else {
        Err(VectorError::DimensionMismatch(a.len(), b.len()))
    }
}

/// Checks a vector against a column's declared dimensions (`vector(n)`); `typmod < 0` means none.
pub fn check_typmod(dim: usize, typmod: i32) -> Result<(), VectorError> {
    if typmod >= 0 && dim != typmod as usize {
        Err(VectorError::ExpectedDimensions { expected: typmod as usize, actual: dim })
    } else {
        Ok(())
    }
}
