//! Fuzzes :fuzzing::submit_body:the POST /v1/jobs body decoder. The body lives in the crate
//! (`rustci_net`) so the stable corpus replay runs the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rustci_net(data);
});
