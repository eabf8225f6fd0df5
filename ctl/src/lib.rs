//! Operator client.
