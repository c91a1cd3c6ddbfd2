//! Replays the checked-in corpus of the `frame_decode` fuzz target
//! (`fuzz/corpus/frame_decode/`) on stable, so CI runs every input the fuzzer
//! found interesting and every crash it ever found, without nightly.

use std::path::PathBuf;

#[test]
fn frame_decode_corpus_replays() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decode");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    for file in &files {
        let data = std::fs::read(file).expect("a corpus file reads");
        // A panic names the input that caused it.
        eprintln!("replaying {}", file.display());
        rustci_storage::fuzzing::frame_decode(&data);
    }
}
