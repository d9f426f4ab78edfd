//! Talks to a VMM's control API.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::protocol::{Request, Response};

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot connect to the API socket {} (is `veil run --api-socket` running?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Lost the connection to the VMM")]
    Io(#[from] io::Error),
    #[error("The VMM sent a response that is not valid")]
    BadResponse(#[source] serde_json::Error),
    #[error("The VMM closed the connection without answering")]
    NoResponse,
}

/// A connection to one VMM.
pub struct ApiClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ApiClient {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request and waits for its response.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(request).map_err(ClientError::BadResponse)?;
        line.push(b'\n');
        // A server that turns the client away says why and closes at once, possibly before
        // the request is written: its answer is still there to read.
        let written = self.writer.write_all(&line);
        let mut answer = String::new();
        let read = self.reader.read_line(&mut answer);
        if let (Err(e), Ok(0) | Err(_)) = (written, &read) {
            return Err(e.into());
        }
        if read? == 0 {
            return Err(ClientError::NoResponse);
        }
        serde_json::from_str(&answer).map_err(ClientError::BadResponse)
    }
}
