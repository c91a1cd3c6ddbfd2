//! Fuzzes :fuzzing::reducer_bytes:the reducer over an event sequence decoded from the bytes. The body lives in the crate
//! (`rustci_core`) so the stable corpus replay runs the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rustci_core(data);
});
