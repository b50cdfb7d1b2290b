//! The snapshot image format: a partition's live blobs as one checksummed
//! byte stream, for backup and restore, for moving a partition between
//! nodes, and later for Raft snapshot transfer. Export and install are in
//! `snapshot.rs`; this file alone encodes and decodes the bytes.
//!
//! ```text
//! header   "DNSNAP" 0x00 0x01 (magic and version), u64 partition id
//! entry*   u8 1, u16 key length, u32 value length, key, value,
//!          u32 CRC-32 of the entry's bytes before it
//! trailer  u8 2, u64 entry count, u32 CRC-32 of the header followed by
//!          every entry CRC (LE), in order
//! ```
//!
//! Little-endian throughout. An image is accepted only whole: a bad CRC, a
//! wrong count, a truncation or trailing bytes reject it.

use std::io::Read;

use bytes::{BufMut, Bytes, BytesMut};

use crate::blob::MAX_KEY_LEN;

const MAGIC: [u8; 8] = *b"DNSNAP\x00\x01";
const ENTRY: u8 = 1;
const END: u8 = 2;

/// Running state of an image being written: entry count and CRC of CRCs.
#[derive(Debug)]
pub struct ImageWriter {
    count: u64,
    crcs: crc32fast::Hasher,
}

impl ImageWriter {
    /// Starts an image of `partition`; returns the writer and the header
    /// bytes, which go first.
    pub fn new(partition: u64) -> (ImageWriter, Bytes) {
        let mut head = BytesMut::with_capacity(16);
        head.put_slice(&MAGIC);
        head.put_u64_le(partition);
        let mut crcs = crc32fast::Hasher::new();
        crcs.update(&head);
        (ImageWriter { count: 0, crcs }, head.freeze())
    }

    /// Encodes one entry.
    pub fn entry(&mut self, key: &[u8], value: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(11 + key.len() + value.len());
        out.put_u8(ENTRY);
        out.put_u16_le(key.len() as u16);
        out.put_u32_le(value.len() as u32);
        out.put_slice(key);
        out.put_slice(value);
        let crc = crc32fast::hash(&out);
        out.put_u32_le(crc);
        self.count += 1;
        self.crcs.update(&crc.to_le_bytes());
        out.freeze()
    }

    /// Encodes the trailer; the image is complete after it.
    pub fn trailer(self) -> Bytes {
        let mut out = BytesMut::with_capacity(13);
        out.put_u8(END);
        out.put_u64_le(self.count);
        out.put_u32_le(self.crcs.finalize());
        out.freeze()
    }
}

/// One blob of an image: key and value.
pub type ImageEntry = (Vec<u8>, Vec<u8>);

/// Why an image was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("snapshot image rejected: {0}")]
pub struct BadImage(pub String);

/// Reads an image entry by entry, verifying as it goes.
#[derive(Debug)]
pub struct ImageReader<R> {
    input: R,
    partition: u64,
    max_value: usize,
    count: u64,
    crcs: crc32fast::Hasher,
    done: bool,
}

impl<R: Read> ImageReader<R> {
    /// Checks the header; values larger than `max_value` are refused.
    pub fn new(mut input: R, max_value: usize) -> Result<ImageReader<R>, BadImage> {
        let mut head = [0u8; 16];
        read_exact(&mut input, &mut head)?;
        if head[..8] != MAGIC {
            return Err(BadImage("not a datanode snapshot (bad magic or version)".into()));
        }
        let mut crcs = crc32fast::Hasher::new();
        crcs.update(&head);
        let mut id = [0u8; 8];
        id.copy_from_slice(&head[8..]);
        Ok(ImageReader { input, partition: u64::from_le_bytes(id), max_value, count: 0, crcs, done: false })
    }

    /// The partition the image was exported from, as its header says (the
    /// trailer's checksum covers it, so it is trusted only once the whole
    /// image has been read).
    pub fn partition(&self) -> u64 {
        self.partition
    }

    /// The next verified `(key, value)`, or `None` after a valid trailer.
    pub fn next_entry(&mut self) -> Result<Option<ImageEntry>, BadImage> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        read_exact(&mut self.input, &mut tag)?;
        match tag[0] {
            ENTRY => {
                let mut lens = [0u8; 6];
                read_exact(&mut self.input, &mut lens)?;
                let key_len = u16::from_le_bytes([lens[0], lens[1]]) as usize;
                let value_len = u32::from_le_bytes([lens[2], lens[3], lens[4], lens[5]]) as usize;
                if key_len == 0 || key_len > MAX_KEY_LEN || value_len > self.max_value {
                    return Err(BadImage(format!("entry {} has impossible lengths", self.count)));
                }
                let mut body = vec![0u8; key_len + value_len];
                read_exact(&mut self.input, &mut body)?;
                let mut crc = [0u8; 4];
                read_exact(&mut self.input, &mut crc)?;
                let mut hasher = crc32fast::Hasher::new();
                hasher.update(&tag);
                hasher.update(&lens);
                hasher.update(&body);
                if hasher.finalize().to_le_bytes() != crc {
                    return Err(BadImage(format!("entry {} fails its checksum", self.count)));
                }
                self.count += 1;
                self.crcs.update(&crc);
                let value = body.split_off(key_len);
                Ok(Some((body, value)))
            }
            END => {
                let mut tail = [0u8; 12];
                read_exact(&mut self.input, &mut tail)?;
                let count = u64::from_le_bytes(tail[..8].try_into().unwrap_or_default());
                let crc = u32::from_le_bytes(tail[8..].try_into().unwrap_or_default());
                let expected = std::mem::replace(&mut self.crcs, crc32fast::Hasher::new()).finalize();
                if count != self.count || crc != expected {
                    return Err(BadImage("trailer does not match the entries".into()));
                }
                let mut extra = [0u8; 1];
                if self.input.read(&mut extra).map_err(|e| BadImage(e.to_string()))? != 0 {
                    return Err(BadImage("bytes after the trailer".into()));
                }
                self.done = true;
                Ok(None)
            }
            other => Err(BadImage(format!("unknown tag {other} after entry {}", self.count))),
        }
    }
}

fn read_exact(input: &mut impl Read, buf: &mut [u8]) -> Result<(), BadImage> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => BadImage("image is truncated".into()),
        _ => BadImage(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(entries: &[ImageEntry]) -> Vec<u8> {
        let (mut writer, head) = ImageWriter::new(7);
        let mut out = head.to_vec();
        for (key, value) in entries {
            out.extend_from_slice(&writer.entry(key, value));
        }
        out.extend_from_slice(&writer.trailer());
        out
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<ImageEntry>, BadImage> {
        let mut reader = ImageReader::new(bytes, 1 << 20)?;
        let mut out = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            out.push(entry);
        }
        Ok(out)
    }

    fn entries() -> impl Strategy<Value = Vec<ImageEntry>> {
        proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 1..40), proptest::collection::vec(any::<u8>(), 0..200)),
            0..20,
        )
    }

    proptest! {
        #[test]
        fn images_round_trip(entries in entries()) {
            prop_assert_eq!(read_all(&image(&entries)).unwrap(), entries);
        }

        #[test]
        fn any_changed_or_missing_byte_is_refused(
            entries in entries(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
            truncate in any::<bool>(),
        ) {
            let mut bytes = image(&entries);
            let at = at.index(bytes.len());
            if truncate {
                bytes.truncate(at);
            } else {
                bytes[at] ^= xor;
            }
            prop_assert!(read_all(&bytes).is_err());
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = image(&[(b"k".to_vec(), b"v".to_vec())]);
        bytes.push(0);
        assert!(read_all(&bytes).is_err());
    }
}
