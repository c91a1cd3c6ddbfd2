//! The frame: how one log entry (or one meta value) is laid out as bytes.
//!
//! ```text
//! offset  size  field
//! 0       1     format version, FRAME_VERSION (1)
//! 1       4     CRC32 (crc32fast, little-endian) over key.to_le_bytes() ++ payload
//! 5       ..    payload: rmp-serde compact encoding (structs as arrays)
//! ```
//!
//! The key (the log index for entries) is folded into the checksum but not
//! stored: a frame copied under the wrong key fails its checksum, and a frame
//! whose checksum still matches must also decode to an entry with that index.

use rustci_core::event::Entry;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The only frame layout this build writes and reads.
pub const FRAME_VERSION: u8 = 1;
/// Version byte plus CRC32.
pub const FRAME_HEADER_BYTES: usize = 1 + 4;
/// Nesting depth the payload decoder accepts; our types nest a handful deep,
/// so anything deeper is garbage and is refused before it can recurse.
pub const PAYLOAD_DEPTH_MAX: usize = 32;

const _: () = assert!(FRAME_HEADER_BYTES == 5);

/// What is wrong with a frame. The index it was read under travels beside it
/// in [`FrameError`] and [`crate::ReadError::Corrupt`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameFault {
    #[error("frame is {len} bytes, shorter than its {FRAME_HEADER_BYTES}-byte header")]
    Truncated { len: usize },
    #[error("unknown frame version {version} (this build reads version {FRAME_VERSION})")]
    Version { version: u8 },
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("payload does not decode: {reason}")]
    Payload { reason: String },
    #[error("frame stored under index {index} holds entry {found}")]
    IndexMismatch { index: u64, found: u64 },
    /// A frame stored in parts (see `FRAME_PART_BYTES`) cannot be joined.
    #[error("frame stored in parts is incomplete: {reason}")]
    Parts { reason: String },
}

/// A frame that failed to decode, with the index (key) it was read under.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("log entry at index {index}: {fault}")]
pub struct FrameError {
    pub index: u64,
    pub fault: FrameFault,
}

/// Encodes `entry` as a frame keyed by its own index.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    encode_value(entry.index, entry)
}

/// Decodes the frame stored under `index`. Never panics, whatever the bytes.
pub fn decode_entry(index: u64, frame: &[u8]) -> Result<Entry, FrameError> {
    let entry: Entry = decode_value(index, frame)?;
    if entry.index != index {
        return Err(FrameError {
            index,
            fault: FrameFault::IndexMismatch {
                index,
                found: entry.index,
            },
        });
    }
    Ok(entry)
}

/// Frames any serde value under `key` (entries use their index; meta values
/// use key 0, which no log entry ever has).
pub(crate) fn encode_value<T: Serialize>(key: u64, value: &T) -> Vec<u8> {
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + 64);
    frame.push(FRAME_VERSION);
    frame.extend_from_slice(&[0; 4]);
    // Writing into a Vec cannot fail, and every type we frame is plain data
    // that rmp-serde can always represent.
    rmp_serde::encode::write(&mut frame, value).expect("rmp-serde encodes plain data");
    let crc = checksum(key, &frame[FRAME_HEADER_BYTES..]);
    frame[1..FRAME_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    debug_assert!(frame.len() > FRAME_HEADER_BYTES);
    frame
}

pub(crate) fn decode_value<T: DeserializeOwned>(key: u64, frame: &[u8]) -> Result<T, FrameError> {
    let fail = |fault| FrameError { index: key, fault };
    let payload = open_frame(key, frame)?;
    // Decoding straight from the slice (strings are copied once, into the
    // entry) is the fast path of replay. It does not report bytes after the
    // value; the checksum already binds them, so only a broken encoder could
    // put them there.
    let mut de = rmp_serde::Deserializer::from_read_ref(payload);
    de.set_max_depth(PAYLOAD_DEPTH_MAX);
    let value = T::deserialize(&mut de).map_err(|e| {
        fail(FrameFault::Payload {
            reason: e.to_string(),
        })
    })?;
    Ok(value)
}

/// Checks length, version and checksum; returns the payload.
pub(crate) fn open_frame(key: u64, frame: &[u8]) -> Result<&[u8], FrameError> {
    let fail = |fault| FrameError { index: key, fault };
    if frame.len() < FRAME_HEADER_BYTES {
        return Err(fail(FrameFault::Truncated { len: frame.len() }));
    }
    if frame[0] != FRAME_VERSION {
        return Err(fail(FrameFault::Version { version: frame[0] }));
    }
    let stored = u32::from_le_bytes([frame[1], frame[2], frame[3], frame[4]]);
    let payload = &frame[FRAME_HEADER_BYTES..];
    let computed = checksum(key, payload);
    if stored != computed {
        return Err(fail(FrameFault::Checksum { stored, computed }));
    }
    Ok(payload)
}

fn checksum(key: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&key.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}
