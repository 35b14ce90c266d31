use std::fmt;

/// The class of an error, which the SQL glue maps to an SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 22P02 invalid_text_representation
    InvalidTextRepresentation,
    /// 22003 numeric_value_out_of_range
    NumericValueOutOfRange,
    /// 22000 data_exception
    DataException,
    /// 54000 program_limit_exceeded
    ProgramLimitExceeded,
    /// 22004 null_value_not_allowed
    NullValueNotAllowed,
    /// 22023 invalid_parameter_value
    InvalidParameterValue,
    /// 22P03 invalid_binary_representation
    InvalidBinaryRepresentation,
}

impl ErrorClass {
    pub fn sqlstate(self) -> &'static str {
        match self {
            ErrorClass::InvalidTextRepresentation => "22P02",
            ErrorClass::NumericValueOutOfRange => "22003",
            ErrorClass::DataException => "22000",
            ErrorClass::ProgramLimitExceeded => "54000",
            ErrorClass::NullValueNotAllowed => "22004",
            ErrorClass::InvalidParameterValue => "22023",
            ErrorClass::InvalidBinaryRepresentation => "22P03",
        }
    }
}

/// Everything that can go wrong with a vector. Messages follow pgvector's wording so that
/// users (and their tests) see what they already know.
#[derive(Debug, Clone, PartialEq)]
pub enum VectorError {
    InvalidSyntax { input: String, detail: Option<&'static str> },
    OutOfRange(String),
    NaN,
    Infinite,
    Empty,
    TooManyDimensions(usize),
    DimensionMismatch(usize, usize),
    ExpectedDimensions { expected: usize, actual: usize },
    TypmodTooSmall,
    TypmodTooLarge,
    TypmodInvalid,
    Overflow,
    Underflow,
    NullElement,
    NotOneDimensional,
    UnsupportedArrayType(String),
    UnusedNotZero,
}

impl VectorError {
    pub fn class(&self) -> ErrorClass {
        use VectorError::*;
        match self {
            InvalidSyntax { .. } => ErrorClass::InvalidTextRepresentation,
            OutOfRange(_) | Overflow | Underflow => ErrorClass::NumericValueOutOfRange,
            NaN | Infinite | Empty | DimensionMismatch(..) | ExpectedDimensions { .. }
            | NotOneDimensional | UnsupportedArrayType(_) => ErrorClass::DataException,
            TooManyDimensions(_) => ErrorClass::ProgramLimitExceeded,
            TypmodTooSmall | TypmodTooLarge | TypmodInvalid => ErrorClass::InvalidParameterValue,
            NullElement => ErrorClass::NullValueNotAllowed,
            UnusedNotZero => ErrorClass::InvalidBinaryRepresentation,
        }
    }

    pub fn detail(&self) -> Option<String> {
        match self {
            VectorError::InvalidSyntax { detail, .. } => detail.map(str::to_owned),
            _ => None,
        }
    }

    /// What the user can do about it, when there is something.
    pub fn hint(&self) -> Option<String> {
        match self {
            VectorError::TooManyDimensions(_) => Some(format!(
                "Reduce the vector to at most {} dimensions, e.g. with subvector() or a smaller embedding model.",
                crate::MAX_DIM
            )),
            VectorError::ExpectedDimensions { expected, .. } => Some(format!(
                "The column is declared vector({expected}); pass a vector of that length or change the column type."
            )),
            VectorError::NullElement => {
                Some("Remove the NULL elements or replace them, e.g. with coalesce(x, 0).".into())
            }
            VectorError::NaN | VectorError::Infinite => {
                Some("Every element of a vector must be a finite number.".into())
            }
            _ => None,
        }
    }
}

impl fmt::Display for VectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use VectorError::*;
        match self {
            InvalidSyntax { input, .. } => write!(f, "invalid input syntax for type vector: \"{input}\""),
            OutOfRange(token) => write!(f, "\"{token}\" is out of range for type vector"),
            NaN => write!(f, "NaN not allowed in vector"),
            Infinite => write!(f, "infinite value not allowed in vector"),
            Empty => write!(f, "vector must have at least 1 dimension"),
            TooManyDimensions(_) => {
                write!(f, "vector cannot have more than {} dimensions", crate::MAX_DIM)
            }
            DimensionMismatch(a, b) => write!(f, "different vector dimensions {a} and {b}"),
            ExpectedDimensions { expected, actual } => {
                write!(f, "expected {expected} dimensions, not {actual}")
            }
            TypmodTooSmall => write!(f, "dimensions for type vector must be at least 1"),
            TypmodTooLarge => {
                write!(f, "dimensions for type vector cannot exceed {}", crate::MAX_DIM)
            }
            TypmodInvalid => write!(f, "invalid type modifier"),
            Overflow => write!(f, "value out of range: overflow"),
            Underflow => write!(f, "value out of range: underflow"),
            NullElement => write!(f, "array must not contain nulls"),
            NotOneDimensional => write!(f, "array must be 1-D"),
            UnsupportedArrayType(t) => write!(f, "unsupported array type {t}"),
            UnusedNotZero => write!(f, "expected unused to be 0"),
        }
    }
}

impl std::error::Error for VectorError {}
