//! Assertion ids: 32-byte BLAKE3 digests of the canonical encoding.
//!
//! Ids are content addresses, so they double as the idempotency key of the
//! write path and as the message that ed25519 signatures cover. On the wire
//! they are lowercase hex; in the log and in indexes they are raw bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 32-byte assertion id. Displays and (de)serializes as 64 lowercase hex chars.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssertionId(pub [u8; 32]);

impl AssertionId {
    /// The raw digest bytes, the exact message an ed25519 signature signs.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, the form clients see.
    pub fn to_hex(&self) -> String {
        self.hex_chars().as_str().to_string()
    }

    /// The hex form on the stack: ids are serialized into every lens and
    /// search answer, often dozens per response, so the hot path must not
    /// allocate a `String` per id.
    fn hex_chars(&self) -> HexChars {
        let mut out = [0u8; 64];
        // The output is exactly twice the input, so this cannot fail.
        let _ = hex::encode_to_slice(self.0, &mut out);
        HexChars(out)
    }
}

/// 64 lowercase hex digits, always valid ASCII.
struct HexChars([u8; 64]);

impl HexChars {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Why a string is not an assertion id; the message is shown to clients.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an assertion id is 64 lowercase hex characters")]
pub struct BadId;

impl FromStr for AssertionId {
    type Err = BadId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(BadId);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| BadId)?;
        Ok(AssertionId(out))
    }
}

impl fmt::Display for AssertionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex_chars().as_str())
    }
}

impl fmt::Debug for AssertionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AssertionId({})", self.hex_chars().as_str())
    }
}

impl Serialize for AssertionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(self.hex_chars().as_str()) } else { s.serialize_bytes(&self.0) }
    }
}

impl<'de> Deserialize<'de> for AssertionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let bytes: serde_bytes_compat::ByteBuf = Deserialize::deserialize(d)?;
            let arr: [u8; 32] = bytes.0.as_slice().try_into().map_err(|_| serde::de::Error::invalid_length(bytes.0.len(), &"32 bytes"))?;
            Ok(AssertionId(arr))
        }
    }
}

/// A minimal owned byte buffer that accepts both msgpack `bin` and arrays of
/// integers, so ids decode whichever way a writer encoded them.
mod serde_bytes_compat {
    use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
    use std::fmt;

    pub struct ByteBuf(pub Vec<u8>);

    impl<'de> Deserialize<'de> for ByteBuf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(32));
                    while let Some(b) = seq.next_element::<u8>()? {
                        out.push(b);
                    }
                    Ok(ByteBuf(out))
                }
            }
            d.deserialize_bytes(V)
        }
    }
}
