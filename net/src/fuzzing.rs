//! The API request decoder's fuzz target, as a plain function so that `fuzz/`
//! (nightly, libFuzzer) and the stable corpus replay
//! (`net/tests/fuzz_corpus.rs`) run the very same code. Not part of the API.

use rustci_core::model::JobSpec;
use rustci_core::validate::validate_spec;

use crate::dto::SubmitRequest;

/// Decodes `data` as a `POST /v1/jobs` body the way the server does
/// (`serde_json::from_slice::<SubmitRequest>`, then `into_spec`). Panics only
/// if decoding panics or breaks an invariant:
/// - an accepted request re-serializes to JSON that decodes to a request
///   that serializes to the very same bytes (the roundtrip is stable) and
///   is accepted or refused exactly like the original;
/// - an accepted spec passes `validate_spec` and survives a JSON roundtrip.
pub fn submit_body(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<SubmitRequest>(data) else {
        return;
    };
    let json = serde_json::to_vec(&request).expect("a request serializes");
    let again: SubmitRequest = serde_json::from_slice(&json).expect("a serialized request decodes");
    assert_eq!(
        serde_json::to_vec(&again).expect("a request serializes"),
        json,
        "the JSON roundtrip of a request is not stable"
    );
    let spec = request.into_spec();
    assert_eq!(
        again.into_spec(),
        spec,
        "the roundtripped request was judged differently"
    );
    if let Ok(spec) = spec {
        if let Err(why) = validate_spec(&spec) {
            panic!("into_spec accepted a spec that validate_spec refuses: {why}");
        }
        let json = serde_json::to_vec(&spec).expect("a spec serializes");
        let back: JobSpec = serde_json::from_slice(&json).expect("a serialized spec decodes");
        assert_eq!(back, spec, "the JSON roundtrip changed the spec");
    }
}
