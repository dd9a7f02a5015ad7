//! The archive's object store: where `s3://bucket/prefix` points, and the
//! few operations the archive needs from it.
//!
//! Everything goes through the `object_store` crate, so any S3-compatible
//! server works (AWS, MinIO, s3s, moto...). Objects are only ever *created*
//! (`If-None-Match: *`) except the writer record: a shipped segment is never
//! overwritten, which is what makes two writers on one prefix detectable.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{Attribute, Attributes, ClientOptions, GetOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};

/// Object metadata key holding the BLAKE3 hex digest of the object's bytes.
pub const CHECKSUM_METADATA: &str = "blake3";

/// Why an archive operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive URL or endpoint is malformed.
    #[error("invalid archive location: {0}")]
    Config(String),
    /// The object store could not be reached or answered an error.
    #[error("object store error on {key}: {source}")]
    Store {
        /// The object (or prefix) concerned.
        key: String,
        /// What the store said.
        #[source]
        source: object_store::Error,
    },
    /// An object's content is not what the manifest or the log format says.
    #[error("{key}: {reason}")]
    Corrupt {
        /// The object concerned.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Another writer owns the prefix, or the prefix disagrees with the
    /// local log: shipping must stop rather than fork the history.
    #[error("{0}")]
    Conflict(String),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl ArchiveError {
    /// Wraps a local I/O error with its path.
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> ArchiveError {
        ArchiveError::Io { path: path.into(), source }
    }
}

/// Where the archive lives and how to reach it.
#[derive(Clone, Debug, Default)]
pub struct RemoteOptions {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); AWS when unset.
    pub endpoint: Option<String>,
    /// The region; `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Longest wait for one request; `None` for the default (60 s).
    pub timeout: Option<Duration>,
}

/// What a create-only put found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    /// The object did not exist and now holds our bytes.
    New,
    /// An object was already there (ours from an interrupted attempt, or
    /// someone else's): the caller compares checksums.
    AlreadyExists,
}

/// An object read back with the checksum recorded in its metadata.
pub struct Fetched {
    /// The object's bytes.
    pub bytes: bytes::Bytes,
    /// The `blake3` metadata, if the object has it.
    pub checksum: Option<String>,
}

/// A handle on `s3://bucket/prefix`. Cheap to clone.
#[derive(Clone)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

/// Splits `s3://bucket/some/prefix` into the bucket and the prefix
/// (without slashes at either end).
pub fn parse_url(url: &str) -> Result<(String, String), ArchiveError> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| ArchiveError::Config(format!("{url:?} is not an s3:// URL (expected s3://bucket/prefix)")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(ArchiveError::Config(format!("{url:?} names no bucket (expected s3://bucket/prefix)")));
    }
    let prefix = prefix.trim_matches('/').to_string();
    if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
        return Err(ArchiveError::Config(format!("{url:?}: the prefix must not contain empty, '.' or '..' parts")));
    }
    Ok((bucket.to_string(), prefix))
}

impl Remote {
    /// Builds the client. Credentials come from the usual `AWS_*`
    /// variables. Nothing is contacted yet.
    pub fn connect(opts: &RemoteOptions) -> Result<Remote, ArchiveError> {
        let (bucket, prefix) = parse_url(&opts.url)?;
        let region = opts.region.clone().or_else(|| std::env::var("AWS_REGION").ok()).unwrap_or_else(|| "us-east-1".into());
        // Requests fail fast so the shipper's own backoff (which never
        // blocks writes) decides what happens next, and a hung server is
        // noticed within `timeout` rather than never.
        let timeout = opts.timeout.unwrap_or(Duration::from_secs(60));
        let client = ClientOptions::new().with_connect_timeout(timeout.min(Duration::from_secs(5))).with_timeout(timeout);
        let retry = RetryConfig { max_retries: 3, retry_timeout: (timeout * 3).min(Duration::from_secs(60)), ..Default::default() };
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_region(region)
            .with_client_options(client)
            .with_retry(retry)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(ep) = &opts.endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(ArchiveError::Config(format!("endpoint {ep:?} must start with http:// or https://")));
            }
            b = b.with_endpoint(ep.trim_end_matches('/')).with_allow_http(ep.starts_with("http://"));
        }
        let store = b.build().map_err(|e| ArchiveError::Config(e.to_string()))?;
        Ok(Remote { store: Arc::new(store), prefix, url: opts.url.clone() })
    }

    /// The URL this handle points at, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full object path of `key` (relative to the prefix).
    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() { ObjectPath::from(key) } else { ObjectPath::from(format!("{}/{key}", self.prefix)) }
    }

    /// `key` relative to the prefix, from a full object path.
    fn relative(&self, p: &ObjectPath) -> String {
        let s = p.as_ref();
        if self.prefix.is_empty() { s.to_string() } else { s.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(s).to_string() }
    }

    fn err(&self, key: &str) -> impl FnOnce(object_store::Error) -> ArchiveError + use<> {
        let key = format!("{}/{key}", self.url.trim_end_matches('/'));
        move |source| ArchiveError::Store { key, source }
    }

    /// Creates `key` with `bytes` unless it exists; the BLAKE3 of the bytes
    /// goes into the object metadata so the object checks itself.
    pub async fn create(&self, key: &str, bytes: Vec<u8>) -> Result<Created, ArchiveError> {
        let checksum = blake3::hash(&bytes).to_hex().to_string();
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::Metadata(CHECKSUM_METADATA.into()), checksum.into());
        let opts = PutOptions { mode: PutMode::Create, attributes, ..Default::default() };
        match self.store.put_opts(&self.path(key), PutPayload::from(bytes), opts).await {
            Ok(_) => Ok(Created::New),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::AlreadyExists),
            Err(e) => Err(self.err(key)(e)),
        }
    }

    /// Replaces `key` unconditionally (only the writer record, on takeover).
    pub async fn overwrite(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        let checksum = blake3::hash(&bytes).to_hex().to_string();
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::Metadata(CHECKSUM_METADATA.into()), checksum.into());
        let opts = PutOptions { mode: PutMode::Overwrite, attributes, ..Default::default() };
        self.store.put_opts(&self.path(key), PutPayload::from(bytes), opts).await.map_err(self.err(key))?;
        Ok(())
    }

    /// Reads `key`; `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Fetched>, ArchiveError> {
        let r = match self.store.get_opts(&self.path(key), GetOptions::default()).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(key)(e)),
        };
        let checksum = r.attributes.get(&Attribute::Metadata(CHECKSUM_METADATA.into())).map(|v| v.to_string());
        let bytes = r.bytes().await.map_err(self.err(key))?;
        Ok(Some(Fetched { bytes, checksum }))
    }

    /// The checksum metadata of `key` without its body; `None` if absent.
    pub async fn head_checksum(&self, key: &str) -> Result<Option<Option<String>>, ArchiveError> {
        let opts = GetOptions { head: true, ..Default::default() };
        match self.store.get_opts(&self.path(key), opts).await {
            Ok(r) => Ok(Some(r.attributes.get(&Attribute::Metadata(CHECKSUM_METADATA.into())).map(|v| v.to_string()))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(key)(e)),
        }
    }

    /// The keys under `dir` (relative to the prefix) that sort after
    /// `after`, with their sizes, in key order.
    pub async fn list(&self, dir: &str, after: Option<&str>) -> Result<Vec<(String, u64)>, ArchiveError> {
        let dir_path = self.path(dir);
        let stream = match after {
            Some(a) => self.store.list_with_offset(Some(&dir_path), &self.path(a)),
            None => self.store.list(Some(&dir_path)),
        };
        let metas: Vec<_> = stream.try_collect().await.map_err(self.err(dir))?;
        let mut out: Vec<(String, u64)> = metas.iter().map(|m| (self.relative(&m.location), m.size)).collect();
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        assert_eq!(parse_url("s3://b/p/q/").unwrap(), ("b".into(), "p/q".into()));
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert!(parse_url("http://b/p").is_err());
        assert!(parse_url("s3:///p").is_err());
        assert!(parse_url("s3://b/a/../c").is_err());
    }
}
