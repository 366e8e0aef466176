//! How a control-plane request fails.

use crate::store::StoreError;

/// Why a control-plane request failed; the API maps each to a SPEC §6 error code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("not found")]
    NotFound,
    #[error("invalid claim code")]
    InvalidCode,
    #[error("device is claimed by another tenant")]
    AlreadyClaimed,
    #[error("{0}")]
    Conflict(String),
    #[error("tenant has reached max_devices")]
    QuotaExceeded,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}
