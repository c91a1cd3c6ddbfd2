//! Fuzzes the log frame decoder (entries and the hard state). The body lives in
//! `rustci_storage::fuzzing::frame_decode` so the stable corpus replay runs the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rustci_storage::fuzzing::frame_decode(data);
});
