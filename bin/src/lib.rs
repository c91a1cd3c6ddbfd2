//! The `rustci` crate: the daemon (production driver), the CLI and the native
//! runner. A library too, so integration tests can reach its modules.

pub mod agent;
pub mod backup;
pub mod bench;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod driver_metrics;
pub mod logging;
pub mod memory;
pub mod procenv;
pub mod replay;
pub mod runner;
pub mod simcmd;
