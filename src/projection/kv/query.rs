//! Reading the KV view: by id, filtered lists in log order, pair history,
//! and the position-for-time lookup used by `as_of`.

use serde::Serialize;

use redb::TableDefinition;

use super::apply::Chunk;
use super::snapshot::Snapshot;
use super::*;
use crate::projection::pair_key;

/// The public shape of one stored assertion (`GET /v1/assertions/{id}`).
#[derive(Clone, Debug, Serialize)]
pub struct StoredView {
    /// The id.
    pub id: AssertionId,
    /// Log position.
    pub position: u64,
    /// Server time of recording.
    pub recorded_at: String,
    /// As submitted.
    pub assertion: Assertion,
    /// Whether it has been retracted.
    pub retracted: bool,
    /// The retraction, if any.
    pub retraction: Option<StoredRetraction>,
    /// Ids of assertions that supersede it.
    pub superseded_by: Vec<AssertionId>,
}

impl StoredView {
    /// The public shape of a stored assertion; every endpoint that returns
    /// assertions (by id, lists, history, search hits) uses it.
    pub fn new(id: AssertionId, s: StoredAssertion) -> StoredView {
        StoredView {
            id,
            position: s.position,
            recorded_at: crate::model::time::format(&s.recorded_at),
            assertion: s.assertion,
            retracted: s.retraction.is_some(),
            retraction: s.retraction,
            superseded_by: s.superseded_by,
        }
    }
}

/// Filters of `GET /v1/assertions`.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Exact subject.
    pub subject: Option<String>,
    /// Exact predicate.
    pub predicate: Option<String>,
    /// Exact agent.
    pub agent: Option<String>,
    /// Only positions after this one (the cursor).
    pub after: u64,
    /// Most items.
    pub limit: usize,
}

/// What happened in a pair's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An assertion was recorded.
    AssertionRecorded,
    /// An assertion was retracted.
    AssertionRetracted,
}

/// One event of a pair's history.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryEvent {
    /// Position of this event.
    pub position: u64,
    /// Kind of event.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// When this event was recorded.
    #[serde(with = "crate::model::time::serde_normal")]
    pub recorded_at: DateTime<Utc>,
    /// The assertion concerned, in its current state.
    pub assertion: StoredView,
}

impl KvStore {
    /// The raw stored state of `id`.
    pub fn get_stored(&self, id: &AssertionId) -> Result<Option<StoredAssertion>, ProjectionError> {
        Snapshot::take(self)?.by_id(id)
    }

    /// One assertion with its state, and the position the answer reflects.
    pub fn get(&self, id: &AssertionId) -> Result<(Option<StoredView>, u64), ProjectionError> {
        let snap = Snapshot::take(self)?;
        Ok((snap.by_id(id)?.map(|s| StoredView::new(*id, s)), snap.position()))
    }

    /// Assertions matching `f` in log order, and the cursor for the next page.
    pub fn list(&self, f: &ListFilter) -> Result<(Vec<StoredView>, Option<u64>), ProjectionError> {
        let snap = Snapshot::take(self)?;
        let tx = &snap.tx;
        let mut items = Vec::new();
        let mut next = None;
        let scan = Scan::for_filter(f);
        let mut consider = |position: u64| -> Result<bool, ProjectionError> {
            if items.len() == f.limit {
                next = Some(items.last().map(|v: &StoredView| v.position).unwrap_or(position));
                return Ok(false);
            }
            if let Some(s) = snap.state(position)? {
                let a = &s.assertion;
                let ok = f.subject.as_ref().is_none_or(|x| *x == a.subject)
                    && f.predicate.as_ref().is_none_or(|x| *x == a.predicate)
                    && f.agent.as_ref().is_none_or(|x| *x == a.agent);
                if ok {
                    items.push(StoredView::new(a.id(), s));
                }
            }
            Ok(true)
        };
        let mut more = true;
        match &scan {
            Scan::Pair(pk) => {
                let t = tx.open_table(BY_PAIR).map_err(kerr)?;
                let start = index_key(pk, f.after.saturating_add(1));
                let end = index_key(pk, u64::MAX);
                for row in t.range(start.as_slice()..=end.as_slice()).map_err(kerr)? {
                    let (k, v) = row.map_err(kerr)?;
                    if v.value().0 == KIND_ASSERTED && !consider(position_of(k.value()))? {
                        more = false;
                        break;
                    }
                }
            }
            Scan::Name(def, prefix, _) => {
                let t = tx.open_table(*def).map_err(kerr)?;
                let start = index_key(prefix, f.after.saturating_add(1));
                let end = index_key(prefix, u64::MAX);
                for row in t.range(start.as_slice()..=end.as_slice()).map_err(kerr)? {
                    let (k, _) = row.map_err(kerr)?;
                    if !consider(position_of(k.value()))? {
                        more = false;
                        break;
                    }
                }
            }
            Scan::Log => {
                let t = tx.open_table(LOG).map_err(kerr)?;
                for row in t.range(f.after.saturating_add(1)..).map_err(kerr)? {
                    let (k, v) = row.map_err(kerr)?;
                    if v.value().1 == KIND_ASSERTED && !consider(k.value())? {
                        more = false;
                        break;
                    }
                }
            }
        }
        // Staged positions all follow the committed ones: continue with
        // them, through the same index's staged rows.
        if more {
            'staged: for c in snap.staged() {
                let positions: Vec<u64> = match &scan {
                    Scan::Pair(pk) => {
                        c.pair_rows.iter().filter(|(k, v)| v.0 == KIND_ASSERTED && in_prefix(k, pk)).map(|(k, _)| position_of(k)).collect()
                    }
                    Scan::Name(_, prefix, rows_of) => rows_of(c).iter().filter(|k| in_prefix(k, prefix)).map(|k| position_of(k)).collect(),
                    Scan::Log => c.log_rows.iter().filter(|r| r.2 == KIND_ASSERTED).map(|r| r.0).collect(),
                };
                for p in positions.into_iter().filter(|p| *p > f.after) {
                    if !consider(p)? {
                        break 'staged;
                    }
                }
            }
        }
        Ok((items, next))
    }

    /// Every event about one pair, in log order, optionally only those
    /// recorded at or before `until_ns`, and the position the answer reflects.
    pub fn history(&self, subject: &str, predicate: &str, until_ns: Option<i64>) -> Result<(Vec<HistoryEvent>, u64), ProjectionError> {
        let snap = Snapshot::take(self)?;
        let by_pair = snap.tx.open_table(BY_PAIR).map_err(kerr)?;
        let pk = pair_key(subject, predicate);
        let start = index_key(&pk, 0);
        let end = index_key(&pk, u64::MAX);
        let mut out = Vec::new();
        let mut add = |position: u64, kind: u8, target: u64| -> Result<bool, ProjectionError> {
            let Some(s) = snap.state(target)? else { return Ok(true) };
            let id = s.assertion.id();
            let recorded_at = if kind == KIND_ASSERTED {
                s.recorded_at
            } else {
                match &s.retraction {
                    Some(r) if r.position == position => r.recorded_at,
                    // A repeated retraction is never appended, so this is the first.
                    _ => s.recorded_at,
                }
            };
            if until_ns.is_some_and(|u| ns(&recorded_at) > u) {
                return Ok(false); // recorded_at grows with position
            }
            out.push(HistoryEvent {
                position,
                kind: if kind == KIND_ASSERTED { EventKind::AssertionRecorded } else { EventKind::AssertionRetracted },
                recorded_at,
                assertion: StoredView::new(id, s),
            });
            Ok(true)
        };
        let mut more = true;
        for row in by_pair.range(start.as_slice()..=end.as_slice()).map_err(kerr)? {
            let (k, v) = row.map_err(kerr)?;
            let (kind, target) = v.value();
            if !add(position_of(k.value()), kind, target)? {
                more = false;
                break;
            }
        }
        if more {
            'staged: for c in snap.staged() {
                for (k, (kind, target)) in c.pair_rows.iter().filter(|(k, _)| in_prefix(k, &pk)) {
                    if !add(position_of(k), *kind, *target)? {
                        break 'staged;
                    }
                }
            }
        }
        Ok((out, snap.position()))
    }

    /// The last position recorded at or before `t_ns` (0 if none), among
    /// the applied ones. Binary search: `recorded_at` never decreases with
    /// position.
    pub fn position_at(&self, t_ns: i64) -> Result<u64, ProjectionError> {
        let snap = Snapshot::take(self)?;
        let staged = snap.staged().iter().flat_map(|c| &c.log_rows).take_while(|r| r.3 <= t_ns).last();
        if let Some(r) = staged {
            return Ok(r.0);
        }
        let log = snap.tx.open_table(LOG).map_err(kerr)?;
        let (mut lo, mut hi) = (0u64, snap.committed);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            let at = log.get(mid).map_err(kerr)?.map(|v| v.value().2).unwrap_or(i64::MAX);
            if at <= t_ns {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Ok(lo)
    }
}

/// The index a listing walks: the most selective one for its filters
/// (the other filters are checked per item), in the store and in the
/// staged chunks alike.
enum Scan {
    /// Subject and predicate: the pair index.
    Pair(Vec<u8>),
    /// One name index (subject, agent or predicate), its key, and the
    /// same index's rows in a staged chunk.
    Name(TableDefinition<'static, &'static [u8], ()>, Vec<u8>, fn(&Chunk) -> &Vec<Vec<u8>>),
    /// No filter: the log table.
    Log,
}

impl Scan {
    fn for_filter(f: &ListFilter) -> Scan {
        let name = |def, key: &String, rows| Scan::Name(def, key.as_bytes().to_vec(), rows);
        match (&f.subject, &f.predicate, &f.agent) {
            (Some(s), Some(p), _) => Scan::Pair(pair_key(s, p)),
            (Some(s), None, _) => name(BY_SUBJECT, s, |c| &c.subject_rows),
            (None, _, Some(a)) => name(BY_AGENT, a, |c| &c.agent_rows),
            (None, Some(p), None) => name(BY_PREDICATE, p, |c| &c.predicate_rows),
            (None, None, None) => Scan::Log,
        }
    }
}

/// Whether index key `key` is `prefix ‖ 0 ‖ position`.
fn in_prefix(key: &[u8], prefix: &[u8]) -> bool {
    key.len() == prefix.len() + 9 && key.starts_with(prefix) && key[prefix.len()] == 0
}

fn position_of(key: &[u8]) -> u64 {
    let n = key.len();
    let mut p = [0u8; 8];
    if n >= 8 {
        p.copy_from_slice(&key[n - 8..]);
    }
    u64::from_be_bytes(p)
}
