//! The library's error type: one enum, every variant says what failed and where.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library, with enough context to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file or folder that the model layout requires does not exist.
    #[error("missing file: {}", path.display())]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
    },

    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON or TOML file could not be parsed or has unusable values.
    #[error("invalid config {}: {message}", path.display())]
    Config {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A weight in a checkpoint has a different shape than the architecture needs.
    #[error("tensor {name}: expected shape {expected:?}, found {found:?} in {}", file.display())]
    ShapeMismatch {
        /// Full tensor name, e.g. `down_blocks.0.attentions.0.proj_in.weight`.
        name: String,
        /// Shape the architecture (read from config.json) requires.
        expected: Vec<usize>,
        /// Shape stored in the file.
        found: Vec<usize>,
        /// The weights file (or folder) it came from.
        file: PathBuf,
    },

    /// A weight that the architecture needs is not in any of the checkpoint files.
    #[error("tensor {name} not found in {}", file.display())]
    MissingTensor {
        /// Full tensor name.
        name: String,
        /// The weights file (or folder) it was looked for in.
        file: PathBuf,
    },

    /// A safetensors file is corrupt or truncated.
    #[error("cannot read safetensors file {}: {message}", path.display())]
    Safetensors {
        /// The file concerned.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },

    /// The tokenizer could not be built or failed to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An image could not be decoded or encoded.
    #[error("image {}: {message}", path.display())]
    Image {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// A caller passed a value outside what the operation supports.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The model uses a feature this engine does not implement (named).
    #[error("unsupported model feature: {0}")]
    Unsupported(String),

    /// The PyTorch reference benchmark (`bench perf --vs-reference`) could not be run or its
    /// output not read.
    #[error("reference benchmark: {0}")]
    Reference(String),

    /// The caller's step callback asked the denoising loop to stop (a cancelled job).
    #[error("stopped by the caller after step {step} of {total}")]
    Stopped {
        /// Steps done.
        step: usize,
        /// Steps asked for.
        total: usize,
    },

    /// A LoRA file or adapter set is malformed or does not fit the model: keys that name no
    /// adapted layer, a down-projection without its up-projection, layers the UNet lacks.
    #[error("LoRA {origin}: {message}")]
    Lora {
        /// The file (path) or adapter set concerned.
        origin: String,
        /// What is wrong, naming the keys or layers.
        message: String,
    },
}

impl Error {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Wrap an I/O error on `path`: a missing file becomes [`Error::MissingFile`], anything else
    /// [`Error::Io`].
    pub fn from_io(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            Error::io(path, source)
        }
    }

    /// A config problem in `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Read a whole text file, naming it in the error (missing → [`Error::MissingFile`]).
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::from_io(path, e))
}
