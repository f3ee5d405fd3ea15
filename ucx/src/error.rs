//! Errors of the UCX layer. UCX failures carry the operation and UCX's own status text
//! (`ucs_status_string`), so a log line says both what we tried and why UCX refused.

use std::ffi::c_int;

use crate::ffi;

#[derive(Debug, thiserror::Error)]
pub enum UcxError {
    /// A UCX call returned an error status.
    #[error("{op}: {message} (ucs_status_t {status})")]
    Status {
        op: &'static str,
        status: i32,
        message: String,
    },
    /// The endpoint was closed (after a peer failure, an aborted transfer or an explicit close);
    /// a new one must be created (the [`crate::EndpointCache`] does this).
    #[error("endpoint is closed: {reason}")]
    EndpointClosed { reason: String },
    /// A get addressed bytes outside the remote region the rkey was advertised for. Checked before
    /// UCX sees the request: over cma and tcp UCX itself does not validate remote addresses.
    #[error(
        "remote range {remote_address:#x}+{length} is outside the advertised region \
         {region_address:#x}+{region_length}"
    )]
    OutOfRange {
        remote_address: u64,
        length: usize,
        region_address: u64,
        region_length: usize,
    },
    /// Transfers did not complete in time; they were aborted (the endpoint was force-closed).
    #[error("{op} did not complete within {timeout_ms} ms")]
    Timeout { op: &'static str, timeout_ms: u64 },
    /// Waiting on the worker's event file descriptor failed.
    #[error("waiting for UCX worker events: {0}")]
    EventFd(#[source] std::io::Error),
    /// A packed worker address or rkey that cannot be one (empty).
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

pub type Result<T, E = UcxError> = std::result::Result<T, E>;

/// Maps a shim status to `Ok` or a [`UcxError::Status`] naming `op`.
pub(crate) fn check(op: &'static str, status: c_int) -> Result<()> {
    if status == ffi::ok() {
        Ok(())
    } else {
        Err(status_error(op, status))
    }
}

pub(crate) fn status_error(op: &'static str, status: c_int) -> UcxError {
    UcxError::Status {
        op,
        status,
        message: ffi::status_string(status),
    }
}
