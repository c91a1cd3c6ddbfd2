//! Fuzzes the `POST /v1/jobs` body decoder. The body lives in
//! `rustci_net::fuzzing::submit_body` so the stable corpus replay runs the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rustci_net::fuzzing::submit_body(data);
});
