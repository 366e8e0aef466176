//! The scenarios of SPEC §11, one module each; each returns the [`crate::stats::Report`].

pub mod bridge;
pub mod claim;
pub mod connect;
pub mod idle;
pub mod storm;
