//! Fuzzes the reducer over an event sequence decoded from the bytes. The body lives in
//! `rustci_core::fuzzing::reducer_bytes` so the stable corpus replay runs the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rustci_core::fuzzing::reducer_bytes(data);
});
