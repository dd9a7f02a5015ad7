//! The search definition (`projections/search.toml`) and the tantivy schema
//! it produces: one document per assertion.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tantivy::schema::{
    BytesOptions, DateOptions, DateTimePrecision, FAST, Field, INDEXED, IndexRecordOption, NumericOptions, STORED, STRING, Schema,
    TextFieldIndexing, TextOptions,
};
use tantivy::{DateTime as TDate, TantivyDocument};

use crate::model::{AssertionId, Object};
use crate::projection::kv::StoredAssertion;

/// The definition built into the binary.
pub const DEFAULT_SEARCH_TOML: &str = include_str!("../../../projections/search.toml");

/// Version of the document layout below; part of the definition hash, so a
/// change of layout in a new release marks old indexes stale.
const LAYOUT_VERSION: u32 = 1;

/// Tokenizers a definition may name (all built into tantivy).
pub const TOKENIZERS: [&str; 4] = ["en_stem", "default", "whitespace", "raw"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    index: RawIndex,
    #[serde(default)]
    commit: RawCommit,
    #[serde(default)]
    writer: RawWriter,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIndex {
    tokenizer: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommit {
    #[serde(default = "default_interval")]
    interval_ms: u64,
    #[serde(default = "default_docs")]
    max_docs: usize,
}

impl Default for RawCommit {
    fn default() -> Self {
        RawCommit { interval_ms: default_interval(), max_docs: default_docs() }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWriter {
    #[serde(default)]
    memory_mb: Option<usize>,
    #[serde(default)]
    threads: usize,
}

fn default_interval() -> u64 {
    500
}
fn default_docs() -> usize {
    50_000
}

/// The parsed search definition.
#[derive(Clone, Debug)]
pub struct SearchDefinition {
    /// Tokenizer of the text fields.
    pub tokenizer: String,
    /// Longest time between two commits while documents are pending.
    pub commit_interval: Duration,
    /// Most documents pending before a commit.
    pub commit_docs: usize,
    /// Indexing memory budget in bytes.
    pub writer_memory: usize,
    /// Indexing threads.
    pub writer_threads: usize,
    /// Hash of what the index layout depends on (tokenizer, layout version).
    pub hash: String,
}

impl SearchDefinition {
    /// Parses the text of a `search.toml`.
    pub fn parse(text: &str) -> Result<SearchDefinition, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| e.to_string())?;
        if !TOKENIZERS.contains(&raw.index.tokenizer.as_str()) {
            return Err(format!("index.tokenizer: {:?} is not one of {}", raw.index.tokenizer, TOKENIZERS.join(", ")));
        }
        if raw.commit.interval_ms == 0 || raw.commit.interval_ms > 3_600_000 {
            return Err("commit.interval_ms: must be 1 to 3600000".into());
        }
        if raw.commit.max_docs == 0 {
            return Err("commit.max_docs: must be at least 1".into());
        }
        let threads = match raw.writer.threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4),
            n => n.min(16),
        };
        let memory_mb = raw.writer.memory_mb.unwrap_or(256);
        // tantivy needs at least 15 MB per thread.
        if memory_mb < 16 * threads || memory_mb > 4096 {
            return Err(format!("writer.memory_mb: must be 16 × threads ({}) to 4096", 16 * threads));
        }
        let hash = blake3::hash(format!("layout={LAYOUT_VERSION};tokenizer={}", raw.index.tokenizer).as_bytes()).to_hex().to_string();
        Ok(SearchDefinition {
            tokenizer: raw.index.tokenizer,
            commit_interval: Duration::from_millis(raw.commit.interval_ms),
            commit_docs: raw.commit.max_docs,
            writer_memory: memory_mb << 20,
            writer_threads: threads,
            hash,
        })
    }

    /// Loads `search.toml` from `dir` (the embedded default when `dir` is
    /// `None` or has no `search.toml`).
    pub fn load(dir: Option<&Path>) -> Result<SearchDefinition, String> {
        match dir.map(|d| d.join("search.toml")) {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                SearchDefinition::parse(&text).map_err(|e| format!("{}: {e}", p.display()))
            }
            _ => SearchDefinition::parse(DEFAULT_SEARCH_TOML),
        }
    }
}

impl Default for SearchDefinition {
    fn default() -> Self {
        SearchDefinition::parse(DEFAULT_SEARCH_TOML).unwrap_or_else(|e| panic!("embedded projections/search.toml is invalid: {e}"))
    }
}

/// The fields of a search document.
#[derive(Clone, Copy, Debug)]
pub struct Fields {
    /// Hex id (exact, the key for updates).
    pub id: Field,
    /// Subject, exact.
    pub subject: Field,
    /// Subject, tokenized.
    pub subject_text: Field,
    /// Predicate, exact.
    pub predicate: Field,
    /// Predicate, tokenized.
    pub predicate_text: Field,
    /// Text and entity objects, tokenized.
    pub object_text: Field,
    /// Object type name.
    pub object_type: Field,
    /// Number and integer objects as f64.
    pub object_number: Field,
    /// Integer objects.
    pub object_integer: Field,
    /// Boolean objects.
    pub object_boolean: Field,
    /// Entity objects, exact.
    pub object_entity: Field,
    /// Time objects.
    pub object_time: Field,
    /// Agent, exact.
    pub agent: Field,
    /// Effective source tier.
    pub tier: Field,
    /// Source URI, exact.
    pub source_uri: Field,
    /// Effective confidence.
    pub confidence: Field,
    /// Effective valid time (recorded time when absent).
    pub valid_time: Field,
    /// Transaction time.
    pub recorded_at: Field,
    /// Log position of the assertion.
    pub position: Field,
    /// 1 if retracted.
    pub retracted: Field,
    /// 1 if superseded.
    pub superseded: Field,
    /// 1 if retracted or superseded (excluded by default).
    pub hidden: Field,
    /// msgpack [`StoredAssertion`], to answer with and to re-create the
    /// document when its flags change.
    pub stored: Field,
}

/// Fields searched by `q` when it names none.
pub const DEFAULT_TEXT_FIELDS: [&str; 3] = ["subject_text", "predicate_text", "object_text"];

/// The schema for `tokenizer`.
pub fn schema(tokenizer: &str) -> Schema {
    let mut b = Schema::builder();
    let text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default().set_tokenizer(tokenizer).set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let num = NumericOptions::default() | INDEXED | FAST;
    let date = DateOptions::default().set_indexed().set_fast().set_precision(DateTimePrecision::Nanoseconds);
    b.add_text_field("id", STRING | STORED);
    b.add_text_field("subject", STRING);
    b.add_text_field("subject_text", text.clone());
    b.add_text_field("predicate", STRING);
    b.add_text_field("predicate_text", text.clone());
    b.add_text_field("object_text", text);
    b.add_text_field("object_type", STRING);
    b.add_f64_field("object_number", num.clone());
    b.add_i64_field("object_integer", num.clone());
    b.add_bool_field("object_boolean", num.clone());
    b.add_text_field("object_entity", STRING);
    b.add_date_field("object_time", date.clone());
    b.add_text_field("agent", STRING);
    b.add_text_field("tier", STRING);
    b.add_text_field("source_uri", STRING);
    b.add_f64_field("confidence", num.clone());
    b.add_date_field("valid_time", date.clone());
    b.add_date_field("recorded_at", date);
    b.add_u64_field("position", num.clone());
    b.add_u64_field("retracted", num.clone());
    b.add_u64_field("superseded", num.clone());
    b.add_u64_field("hidden", num);
    b.add_bytes_field("stored", BytesOptions::default().set_stored());
    b.build()
}

impl Fields {
    /// Resolves the fields of an index's schema.
    pub fn of(schema: &Schema) -> Result<Fields, String> {
        let f = |n: &str| schema.get_field(n).map_err(|e| format!("the index has no field {n}: {e}"));
        Ok(Fields {
            id: f("id")?,
            subject: f("subject")?,
            subject_text: f("subject_text")?,
            predicate: f("predicate")?,
            predicate_text: f("predicate_text")?,
            object_text: f("object_text")?,
            object_type: f("object_type")?,
            object_number: f("object_number")?,
            object_integer: f("object_integer")?,
            object_boolean: f("object_boolean")?,
            object_entity: f("object_entity")?,
            object_time: f("object_time")?,
            agent: f("agent")?,
            tier: f("tier")?,
            source_uri: f("source_uri")?,
            confidence: f("confidence")?,
            valid_time: f("valid_time")?,
            recorded_at: f("recorded_at")?,
            position: f("position")?,
            retracted: f("retracted")?,
            superseded: f("superseded")?,
            hidden: f("hidden")?,
            stored: f("stored")?,
        })
    }

    /// The document of `s` (whose encoding is `bytes`).
    pub fn document(&self, id: &AssertionId, s: &StoredAssertion, bytes: &[u8]) -> TantivyDocument {
        let a = &s.assertion;
        let mut d = TantivyDocument::new();
        d.add_text(self.id, id.to_hex());
        d.add_text(self.subject, &a.subject);
        d.add_text(self.subject_text, &a.subject);
        d.add_text(self.predicate, &a.predicate);
        d.add_text(self.predicate_text, &a.predicate);
        d.add_text(self.object_type, a.object.type_name());
        match &a.object {
            Object::Text(t) => d.add_text(self.object_text, t),
            Object::Number(n) => d.add_f64(self.object_number, *n),
            Object::Integer(i) => {
                d.add_i64(self.object_integer, *i);
                d.add_f64(self.object_number, *i as f64);
            }
            Object::Boolean(b) => d.add_bool(self.object_boolean, *b),
            Object::Entity(e) => {
                d.add_text(self.object_entity, e);
                d.add_text(self.object_text, e);
            }
            Object::Time(t) => d.add_date(self.object_time, date(t)),
        }
        d.add_text(self.agent, &a.agent);
        d.add_text(self.tier, a.effective_tier().as_str());
        if let Some(src) = &a.source {
            d.add_text(self.source_uri, &src.uri);
        }
        d.add_f64(self.confidence, a.effective_confidence());
        d.add_date(self.valid_time, date(&a.valid_time.unwrap_or(s.recorded_at)));
        d.add_date(self.recorded_at, date(&s.recorded_at));
        d.add_u64(self.position, s.position);
        let retracted = s.retraction.is_some();
        let superseded = !s.superseded_by.is_empty();
        d.add_u64(self.retracted, retracted as u64);
        d.add_u64(self.superseded, superseded as u64);
        d.add_u64(self.hidden, (retracted || superseded) as u64);
        d.add_bytes(self.stored, bytes);
        d
    }
}

/// A chrono time as a tantivy date.
pub fn date(t: &chrono::DateTime<chrono::Utc>) -> TDate {
    TDate::from_timestamp_nanos(t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 { i64::MIN } else { i64::MAX }))
}
