//! Writes the hand-made seeds of the `frame_decode` fuzz target into
//! `fuzz/corpus/frame_decode/` (a tool, run by hand; CI replays the corpus).

use std::path::PathBuf;

/// Writes the hand-made seeds into the corpus (`seed-*` files): valid frames
/// of every event kind, their payloads (mode 1), truncated, bit-flipped,
/// misfiled and wrong-version frames, and hard-state frames. Run it with
/// `cargo run -p rustci-storage --example write_frame_seeds` after the
/// frame layout or the event vocabulary changes.
fn main() {
    use rustci_storage::encode_entry;
    use rustci_storage::fuzzing::seal;

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decode");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: String, selector: u8, rest: &[u8]| {
        let mut data = vec![selector];
        data.extend_from_slice(rest);
        std::fs::write(dir.join(name), data).unwrap();
    };
    // One entry of every event kind (tags 0..12 of the reducer's decoder,
    // with parameters that make the strings and options non-trivial).
    let mut bytes = Vec::new();
    for tag in 0u8..12 {
        bytes.extend_from_slice(&[tag, 0x35, 0x1d, 0x02, 0x07]);
    }
    let entries = rustci_core::fuzzing::entries_from_bytes(&bytes);
    for entry in entries.iter().filter(|e| e.index < 64) {
        let kind = entry.event.kind();
        let frame = encode_entry(entry);
        let selector = (entry.index as u8) << 2;
        write(format!("seed-frame-{kind}"), selector, &frame);
        write(format!("seed-payload-{kind}"), selector | 1, &frame[5..]);
    }
    let frame = encode_entry(&entries[1]);
    let selector = (entries[1].index as u8) << 2;
    for len in [0, 3, 5, 6, frame.len() / 2, frame.len() - 1] {
        write(format!("seed-truncated-{len}"), selector, &frame[..len]);
        if len > 5 {
            write(
                format!("seed-payload-truncated-{len}"),
                selector | 1,
                &frame[5..len],
            );
        }
    }
    for at in [0, 2, 5, frame.len() - 1] {
        let mut flipped = frame.clone();
        flipped[at] ^= 0x10;
        write(format!("seed-flipped-{at}"), selector, &flipped);
    }
    // Read under the wrong index: a checksum mismatch; sealed for the wrong
    // index: an index mismatch.
    write("seed-misfiled".into(), selector + 4, &frame);
    write(
        "seed-index-mismatch".into(),
        (selector + 4) | 1,
        &frame[5..],
    );
    let mut version = frame.clone();
    version[0] = 2;
    write("seed-version-2".into(), selector, &version);
    // Hard state {term 3, voted_for Some(2), commit 7} and with no vote.
    write("seed-hard-state".into(), 2, &seal(0, &[0x93, 3, 2, 7]));
    write("seed-hard-state-payload".into(), 3, &[0x93, 3, 0xc0, 7]);
    // Deep nesting and a huge declared length, sealed so they reach the decoder.
    write("seed-payload-deep".into(), 4 | 1, &[0x91; 200]);
    write(
        "seed-payload-huge-array".into(),
        4 | 1,
        &[0x94, 1, 1, 1, 0xdd, 0xff, 0xff, 0xff, 0xff],
    );
}
