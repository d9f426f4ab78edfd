//! SEV certificate-chain files, as `veil sev export-chain` (or `sevctl export --full`) writes
//! them: read for `--sev-trust-chain`, `--sev-target-chain` and `veil sev owner`.

use std::path::{Path, PathBuf};

use sev::certs::sev::Chain;
use sev::parser::Decoder;

/// Why a chain file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChainFileError {
    #[error("Cannot read the SEV certificate chain {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not an SEV certificate chain", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The chain in the file at `path`, decoded (not verified).
pub fn read_chain_file(path: &Path) -> Result<Chain, ChainFileError> {
    let bytes = std::fs::read(path).map_err(|source| ChainFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    Chain::decode(&mut bytes.as_slice(), ()).map_err(|source| ChainFileError::Decode {
        path: path.to_owned(),
        source,
    })
}
