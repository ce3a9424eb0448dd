use thiserror::Error;

/// Everything the agent's library can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// The configuration file is unusable; `field` is the dotted path at fault.
    #[error("{path}: {field}: {reason}")]
    Config {
        path: String,
        field: String,
        reason: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
