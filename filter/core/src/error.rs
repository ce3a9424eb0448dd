use thiserror::Error;

/// Everything that can go wrong in the filter's core. Each variant names the
/// input at fault so the one log line the filter writes is enough to fix it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// The plugin configuration is not valid; `field` is the JSON path at fault.
    #[error("invalid filter configuration: {field}: {reason}")]
    Config { field: String, reason: String },
    /// A sync response could not be used; the last good data stays.
    #[error("sync response rejected: {0}")]
    Sync(String),
    /// Writing to Envoy shared data failed.
    #[error("shared data write of {key} failed: {reason}")]
    SharedData { key: String, reason: String },
}
