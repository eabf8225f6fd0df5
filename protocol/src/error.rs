//! The errors of operator commands as they travel (PROTOCOL §6): a machine-readable `code` and
//! a text naming what was wrong.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Machine-readable code of an operator command error (PROTOCOL §6), the `code` of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    InvalidArgument,
    WrongState,
    FingerprintMismatch,
    Forbidden,
    /// The operator sent more commands than its budget allows (`[limits]
    /// operator_commands_per_second`); the message says when to retry.
    RateLimited,
    /// The request's whole response would exceed `[limits] max_response_bytes`.
    TooLarge,
    Internal,
}

impl ErrorCode {
    /// The JSON name of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::FingerprintMismatch => "fingerprint_mismatch",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operator command that could not be carried out: the `error` text and `code` of a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CommandError {
        CommandError {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::NotFound, message)
    }

    pub fn invalid_argument(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::InvalidArgument, message)
    }

    pub fn wrong_state(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::WrongState, message)
    }

    pub fn fingerprint_mismatch(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::FingerprintMismatch, message)
    }

    pub fn forbidden(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::Forbidden, message)
    }

    pub fn internal(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::Internal, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_have_their_json_names() {
        for code in [
            ErrorCode::NotFound,
            ErrorCode::InvalidArgument,
            ErrorCode::WrongState,
            ErrorCode::FingerprintMismatch,
            ErrorCode::Forbidden,
            ErrorCode::Internal,
        ] {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::json!(code.as_str())
            );
        }
        let error = CommandError::wrong_state("station S1 is Rejected");
        assert_eq!(error.code, ErrorCode::WrongState);
        assert_eq!(error.to_string(), "station S1 is Rejected");
    }
}
