//! Fuzzes :fuzzing::frame_decode:the log frame decoder. The body lives in the crate
//! (`rustci_storage`) so the stable corpus replay runs the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rustci_storage(data);
});
