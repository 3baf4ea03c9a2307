//! The Confluent wire format: byte 0 is the magic 0, bytes 1-4 the schema
//! id (big-endian), the rest the Avro body.

/// Why a message is not in the wire format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer than five bytes (the length given).
    #[error("message of {0} bytes is too short for the 5-byte Confluent header")]
    TooShort(usize),
    /// The first byte (given) is not the magic 0.
    #[error("message starts with byte {0:#04x}, not the Confluent magic byte 0x00")]
    BadMagic(u8),
}

/// The format's first byte.
pub const MAGIC: u8 = 0;

/// The message for `body` written with schema `schema_id`.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The schema id and the Avro body.
pub fn unframe(message: &[u8]) -> Result<(u32, &[u8]), WireError> {
    if message.len() < 5 {
        return Err(WireError::TooShort(message.len()));
    }
    if message[0] != MAGIC {
        return Err(WireError::BadMagic(message[0]));
    }
    let id = u32::from_be_bytes([message[1], message[2], message[3], message[4]]);
    Ok((id, &message[5..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_unframes() {
        let framed = frame(0x0102_0304, b"body");
        assert_eq!(framed, [0, 1, 2, 3, 4, b'b', b'o', b'd', b'y']);
        assert_eq!(unframe(&framed), Ok((0x0102_0304, &b"body"[..])));
        assert_eq!(unframe(&[0, 1]), Err(WireError::TooShort(2)));
        assert_eq!(unframe(&[7, 0, 0, 0, 1]), Err(WireError::BadMagic(7)));
    }
}
