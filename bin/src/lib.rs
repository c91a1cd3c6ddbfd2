//! The `rustci` crate as a library, so integration tests can reach its modules.

pub mod runner;
