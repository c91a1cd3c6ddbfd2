//! The frame decoder's fuzz target, as a plain function so that `fuzz/`
//! (nightly, libFuzzer) and the stable corpus replay
//! (`storage/tests/fuzz_corpus.rs`) run the very same code. Not part of the API.

use rustci_core::event::Entry;

use crate::frame::{self, decode_entry, encode_entry, FRAME_VERSION};
use crate::HardState;

/// Meta frames (the hard state) are keyed 0, like the store's.
const META_KEY: u64 = 0;

/// Input layout: one selector byte, then `rest`. `selector >> 2` is the key
/// (the log index, 0..=63) and `selector & 3` the mode:
/// - 0: `rest` is a whole entry frame, decoded as read from disk;
/// - 1: `rest` is an entry payload, sealed with a correct header and checksum
///   first, so that mutations reach the MessagePack decoder instead of dying
///   at the checksum;
/// - 2, 3: the same two for the hard-state meta frame (key 0).
///
/// Panics only if decoding panics or breaks an invariant: a decoded entry
/// has the index it was read under, and re-encoding it gives a frame that
/// decodes to the same entry and re-encodes byte for byte (encoding is a
/// function of the value; the input may use a non-canonical encoding).
pub fn frame_decode(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let index = u64::from(selector >> 2);
    let meta = selector & 2 != 0;
    let sealed;
    let frame = if selector & 1 == 1 {
        sealed = seal(if meta { META_KEY } else { index }, rest);
        &sealed[..]
    } else {
        rest
    };
    if !meta {
        if let Ok(entry) = decode_entry(index, frame) {
            check_entry(index, &entry);
        }
    } else if let Ok(hard) = frame::decode_value::<HardState>(META_KEY, frame) {
        let again = frame::encode_value(META_KEY, &hard);
        assert_eq!(frame::decode_value::<HardState>(META_KEY, &again), Ok(hard));
    }
}

fn check_entry(index: u64, entry: &Entry) {
    assert_eq!(entry.index, index, "decode_entry returned another index");
    let again = encode_entry(entry);
    let decoded = decode_entry(index, &again).expect("a re-encoded entry decodes");
    assert_eq!(&decoded, entry, "re-encoding changed the entry");
    assert_eq!(encode_entry(&decoded), again, "encoding is not a function");
}

/// A frame around `payload` with the right version and checksum for `key`.
pub fn seal(key: u64, payload: &[u8]) -> Vec<u8> {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&key.to_le_bytes());
    hasher.update(payload);
    let mut frame = Vec::with_capacity(frame::FRAME_HEADER_BYTES + payload.len());
    frame.push(FRAME_VERSION);
    frame.extend_from_slice(&hasher.finalize().to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}
