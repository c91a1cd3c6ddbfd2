//! The frame codec: roundtrip, every kind of damage named with its index,
//! and no panic on any input.

mod common;

use proptest::prelude::*;
use rustci_storage::{decode_entry, encode_entry, FrameFault, FRAME_VERSION};

proptest! {
    #[test]
    fn frame_roundtrips_every_event(entries in common::entries(1, 1..20)) {
        for entry in &entries {
            let frame = encode_entry(entry);
            prop_assert_eq!(frame[0], FRAME_VERSION);
            prop_assert_eq!(&decode_entry(entry.index, &frame).unwrap(), entry);
        }
    }

    #[test]
    fn decode_never_panics_on_random_bytes(
        index in any::<u64>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = decode_entry(index, &bytes);
    }

    #[test]
    fn decode_never_panics_on_a_valid_header_over_random_payload(
        index in any::<u64>(),
        payload in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        // Give random payloads a correct checksum so they reach the decoder.
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&index.to_le_bytes());
        hasher.update(&payload);
        let mut frame = vec![FRAME_VERSION];
        frame.extend_from_slice(&hasher.finalize().to_le_bytes());
        frame.extend_from_slice(&payload);
        let _ = decode_entry(index, &frame);
    }

    #[test]
    fn any_single_flipped_bit_is_detected(
        entries in common::entries(7, 1..2),
        position in any::<prop::sample::Index>(),
        bit in 0..8u8,
    ) {
        let entry = &entries[0];
        let mut frame = encode_entry(entry);
        let at = position.index(frame.len());
        frame[at] ^= 1 << bit;
        let error = decode_entry(entry.index, &frame).unwrap_err();
        prop_assert_eq!(error.index, 7);
    }
}

#[test]
fn frame_with_flipped_payload_byte_is_a_checksum_mismatch() {
    let entry = common::entry(42, 3);
    let mut frame = encode_entry(&entry);
    let last = frame.len() - 1;
    frame[last] ^= 0xff;
    let error = decode_entry(42, &frame).unwrap_err();
    assert_eq!(error.index, 42);
    assert!(matches!(error.fault, FrameFault::Checksum { .. }));
    assert!(error
        .to_string()
        .starts_with("log entry at index 42: checksum mismatch"));
}

#[test]
fn frame_with_unknown_version_is_refused() {
    let mut frame = encode_entry(&common::entry(5, 1));
    frame[0] = 2;
    let error = decode_entry(5, &frame).unwrap_err();
    assert_eq!(error.fault, FrameFault::Version { version: 2 });
}

#[test]
fn truncated_frame_is_refused() {
    let frame = encode_entry(&common::entry(5, 1));
    for len in 0..frame.len() {
        let error = decode_entry(5, &frame[..len]).unwrap_err();
        assert_eq!(error.index, 5, "prefix of {len} bytes");
    }
    let error = decode_entry(5, &frame[..3]).unwrap_err();
    assert_eq!(error.fault, FrameFault::Truncated { len: 3 });
}

#[test]
fn frame_read_under_the_wrong_index_fails_its_checksum() {
    let frame = encode_entry(&common::entry(5, 1));
    let error = decode_entry(6, &frame).unwrap_err();
    assert_eq!(error.index, 6);
    assert!(matches!(error.fault, FrameFault::Checksum { .. }));
}

#[test]
fn frame_whose_checksum_matches_but_holds_another_index_is_refused() {
    // Only a buggy writer could make this; the decoder still refuses it.
    let mut entry = common::entry(5, 1);
    let frame = encode_entry(&entry);
    entry.index = 9;
    let mut forged = encode_entry(&entry);
    // Re-key entry 9's payload under index 5.
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&5u64.to_le_bytes());
    hasher.update(&forged[5..]);
    forged[1..5].copy_from_slice(&hasher.finalize().to_le_bytes());
    assert_ne!(frame, forged);
    let error = decode_entry(5, &forged).unwrap_err();
    assert_eq!(
        error.fault,
        FrameFault::IndexMismatch { index: 5, found: 9 }
    );
}
