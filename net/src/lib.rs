//! rustci-net: the HTTP API of the contract (JSON over hyper 1) and a small
//! client for it.
//!
//! This crate knows wire formats and HTTP; it holds no control-plane logic.
//! Commands and reads go to the replica's driver loop through
//! [`control::ControlPlane`]; what the answer means is decided in core.

pub mod agent_link;
pub mod client;
pub mod conns;
pub mod control;
pub mod disk;
pub mod dto;
pub mod events;
pub mod forward;
/// The request decoder's fuzz target (shared by `fuzz/` and `tests/fuzz_corpus.rs`).
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod peer;
pub mod server;
