//! rustci-core: the whole RustCI control plane as pure, sans-IO state machines.
//!
//! This crate does no IO and reads no clock. Time comes in as a value (`now`,
//! milliseconds on the caller's clock), randomness as an injected seeded RNG,
//! and every effect goes out as data for a driver to carry out. There are two
//! drivers: the production daemon (`bin`, `net`, `storage`) and the
//! deterministic simulator (`sim`); neither holds logic the other cannot see.
//!
//! Map:
//! - [`model`]: jobs, attempts, nodes, resources.
//! - [`event`]: the log's vocabulary, [`event::Entry`].
//! - [`state`]: the pure, total reducer `State::apply`.
//! - [`validate`]: limits and defaults of commands.
//! - [`scheduler`]: placement decisions as a function of state.
//! - [`sched_index`]: the scheduler's indexes, caches the reducer keeps in
//!   step (free capacity, nodes per constraint class, parked jobs).
//! - [`snapshot`]: the state's snapshot image (fundamental fields only) and
//!   its rebuild into a whole state; the bytes are storage's.
//! - [`replica`]: the sans-IO replica state machine and its driver contract.
//! - [`raft`]: sans-IO Raft consensus (elections, replication, commit,
//!   compaction and snapshots), which the replica runs on.
//! - [`protocol`]: the agent protocol's messages and the lease arithmetic.
//! - [`agent`]: the sans-IO agent state machine every worker node runs.
//! - `bugs`: planted bugs for the simulator's self-test; dormant data unless
//!   the `sim-bugs` feature compiles their code sites in.
//! - `fuzzing` (hidden): the reducer's fuzz target, shared by `fuzz/` and
//!   the stable corpus replay in `tests/fuzz_corpus.rs`.

#[macro_use]
pub mod bugs;
pub mod agent;
pub mod event;
#[doc(hidden)]
pub mod fuzzing;
pub mod model;
pub mod protocol;
pub mod raft;
pub mod replica;
pub mod sched_index;
pub mod scheduler;
pub mod snapshot;
pub mod state;
pub mod validate;
