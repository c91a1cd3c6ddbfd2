//! The snapshot codec: the reducer state at an index as bytes, and back.
//!
//! ```text
//! offset  size  field
//! 0       4     magic, b"RCSN" (a foreign file says so, not "bad checksum")
//! 4       1     snapshot format version, SNAPSHOT_FORMAT (1)
//! 5       8     payload length (u64, little endian)
//! 13      4     CRC-32 (IEEE, little endian) over the payload
//! 17      n     payload: rmp-serde (structs as arrays) of
//!               rustci_core::snapshot::StateImage
//! ```
//!
//! Decoding checks, in order, the length of the header, the magic, the
//! version, the payload length, the checksum, the payload, and that the
//! state it describes is consistent once every derived index is rebuilt
//! ([`rustci_core::state::State::from_image`]). Any failure is a
//! [`SnapshotError`]; decoding never panics, whatever the bytes.
//!
//! The image's field order is the format. A field added at the end of a
//! struct with `#[serde(default)]` keeps older snapshots readable; any other
//! change bumps [`SNAPSHOT_FORMAT`] and keeps a decoder for the old one.

use rustci_core::snapshot::{ImageError, StateImage};
use rustci_core::state::State;

use crate::frame::PAYLOAD_DEPTH_MAX;

/// First bytes of every snapshot.
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"RCSN";
/// The only snapshot layout this build writes and reads.
pub const SNAPSHOT_FORMAT: u8 = 1;
/// Magic, version, payload length, checksum.
pub const SNAPSHOT_HEADER_BYTES: usize = 4 + 1 + 8 + 4;
/// Largest snapshot accepted (encoded or decoded): a bound on what one
/// decode may allocate. 100,000 jobs take tens of MB (docs/storage.md).
pub const SNAPSHOT_BYTES_MAX: u64 = 4 << 30;

const _: () = assert!(SNAPSHOT_HEADER_BYTES == 17);

/// Why bytes are not a snapshot this build can load.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("snapshot is {len} bytes, shorter than its {SNAPSHOT_HEADER_BYTES}-byte header")]
    Truncated { len: usize },
    #[error("not a snapshot (its first bytes are {found:02x?}, not {SNAPSHOT_MAGIC:02x?})")]
    NotASnapshot { found: [u8; 4] },
    #[error("unknown snapshot format {format} (this build reads format {SNAPSHOT_FORMAT})")]
    Format { format: u8 },
    #[error("snapshot payload is {actual} bytes, but its header says {declared}")]
    Length { declared: u64, actual: u64 },
    #[error("snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("snapshot payload does not decode: {reason}")]
    Payload { reason: String },
    #[error("snapshot decodes to an impossible state: {0}")]
    Image(#[from] ImageError),
}

/// Encodes the fundamental fields of `state` (see [`rustci_core::snapshot`]).
pub fn encode_snapshot(state: &State) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + 64 * (1 + state.jobs.len()));
    bytes.extend_from_slice(&SNAPSHOT_MAGIC);
    bytes.push(SNAPSHOT_FORMAT);
    bytes.extend_from_slice(&[0; 8 + 4]);
    // Writing into a Vec cannot fail, and the image is plain data that
    // rmp-serde can always represent.
    rmp_serde::encode::write(&mut bytes, &state.image()).expect("rmp-serde encodes plain data");
    let payload_len = (bytes.len() - SNAPSHOT_HEADER_BYTES) as u64;
    let crc = crc32fast::hash(&bytes[SNAPSHOT_HEADER_BYTES..]);
    bytes[5..13].copy_from_slice(&payload_len.to_le_bytes());
    bytes[13..17].copy_from_slice(&crc.to_le_bytes());
    assert!(
        payload_len <= SNAPSHOT_BYTES_MAX,
        "snapshot of {payload_len} bytes"
    );
    bytes
}

/// Decodes a snapshot made by [`encode_snapshot`] into a whole state, its
/// derived indexes rebuilt and checked. Never panics, whatever the bytes.
pub fn decode_snapshot(bytes: &[u8]) -> Result<State, SnapshotError> {
    let payload = open_snapshot(bytes)?;
    let mut rest = payload;
    let mut de = rmp_serde::Deserializer::new(&mut rest);
    de.set_max_depth(PAYLOAD_DEPTH_MAX);
    let image: StateImage<'static> =
        serde::Deserialize::deserialize(&mut de).map_err(|e| SnapshotError::Payload {
            reason: e.to_string(),
        })?;
    // The checksum binds every byte, so bytes after the state mean a broken
    // encoder; still, they are refused rather than ignored.
    if !rest.is_empty() {
        return Err(SnapshotError::Payload {
            reason: format!("{} bytes after the state", rest.len()),
        });
    }
    Ok(State::from_image(image)?)
}

/// Checks the header and the checksum; returns the payload.
pub fn open_snapshot(bytes: &[u8]) -> Result<&[u8], SnapshotError> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES {
        return Err(SnapshotError::Truncated { len: bytes.len() });
    }
    let found = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if found != SNAPSHOT_MAGIC {
        return Err(SnapshotError::NotASnapshot { found });
    }
    if bytes[4] != SNAPSHOT_FORMAT {
        return Err(SnapshotError::Format { format: bytes[4] });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[5..13]);
    let declared = u64::from_le_bytes(len);
    let payload = &bytes[SNAPSHOT_HEADER_BYTES..];
    if declared != payload.len() as u64 {
        return Err(SnapshotError::Length {
            declared,
            actual: payload.len() as u64,
        });
    }
    let stored = u32::from_le_bytes([bytes[13], bytes[14], bytes[15], bytes[16]]);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    Ok(payload)
}
