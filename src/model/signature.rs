//! ed25519 signatures over assertion ids.
//!
//! An agent that names itself by its public key can prove authorship: it
//! signs the 32 raw bytes of the id (which already commit to every field).
//! The server only verifies; it never holds private keys.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};

use super::AssertionId;

/// Parses a 64-hex-char ed25519 public key, or `None` if `agent` is a plain name.
pub fn agent_key(agent: &str) -> Option<VerifyingKey> {
    if agent.len() != 64 {
        return None;
    }
    let mut raw = [0u8; 32];
    hex::decode_to_slice(agent, &mut raw).ok()?;
    VerifyingKey::from_bytes(&raw).ok()
}

/// Why a signature was refused; shown to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// Not 128 hex chars.
    #[error("a signature is 128 hex characters (64 bytes)")]
    Malformed,
    /// The agent is not a public key, so nothing can be verified.
    #[error("the agent is not a 64-hex-character ed25519 public key, so a signature cannot be verified")]
    AgentNotAKey,
    /// Verification failed.
    #[error("the signature does not verify against the agent's public key over the assertion id")]
    Invalid,
}

/// What a retraction's signature signs: BLAKE3 of
/// `"stemedb/retraction/v1" ‖ id`, so an assertion's own signature can never
/// be replayed as its retraction.
pub fn retraction_message(id: &AssertionId) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"stemedb/retraction/v1");
    h.update(id.as_bytes());
    *h.finalize().as_bytes()
}

/// Verifies `signature_hex` over the 32-byte `message` with the key `agent`.
pub fn verify(agent: &str, message: &[u8; 32], signature_hex: &str) -> Result<(), SignatureError> {
    let mut raw = [0u8; 64];
    if signature_hex.len() != 128 {
        return Err(SignatureError::Malformed);
    }
    hex::decode_to_slice(signature_hex, &mut raw).map_err(|_| SignatureError::Malformed)?;
    let key = agent_key(agent).ok_or(SignatureError::AgentNotAKey)?;
    let sig = Signature::from_bytes(&raw);
    key.verify(message, &sig).map_err(|_| SignatureError::Invalid)
}
