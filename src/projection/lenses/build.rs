//! Building a fresh lenses store from the log by sorting, not by updating.
//!
//! The incremental path ([`apply`](super::apply)) loads a pair's live
//! set, applies a batch and writes it back; over a whole log that rewrites
//! a popular pair once per batch and, because pairs are spread uniformly
//! over the key space, nearly every leaf of the tree once per transaction.
//! A fresh store does not need any of that: every recorded assertion is
//! gathered by pair with a [`Grouper`] (which keeps each pair's in log
//! order and sorts only the distinct pairs, not every row), then each
//! pair's events are replayed once into its live set and the pair is
//! appended in key order, so each page is written once.
//!
//! A retraction names an assertion id, not a pair: its pair is found by
//! merging the retractions, sorted by id, with the `owners` rows (id →
//! pair), which are sorted by id anyway to be appended to their table.
//! The routed retractions are sorted by `(pair, position)` and merged into
//! each pair's records as it is replayed. Rows are those the incremental
//! path writes, so verification cannot tell how a store was built.

use std::ops::Bound;

use redb::ReadableTable;
use serde_bytes::ByteBuf;

use super::{LensStore, META, OWNERS, PAIRS, e};
use crate::lens::{Definitions, LiveSet, Recorded};
use crate::model::{AssertionId, Event, LogRecord};
use crate::projection::chunked::Chunked;
use crate::projection::{BulkLoad, ProjectionError, check_continues, pair_key};
use crate::sort::{Grouper, Groups, Merge, Sorter};

/// A bulk load of an empty [`LensStore`]: see the module documentation.
pub(super) struct SortedBuild<'a> {
    store: &'a LensStore,
    first: Option<u64>,
    last: u64,
    /// pair → its recorded assertions, in log order.
    records: Grouper<Recorded>,
    /// id → (position, pair) of every recorded assertion.
    owners: Sorter<AssertionId, (u64, ByteBuf)>,
    /// (id, position) of every retraction.
    retractions: Sorter<(AssertionId, u64), ()>,
}

impl<'a> SortedBuild<'a> {
    /// A build into `store`, which must be empty; spills beside it.
    pub(super) fn new(store: &'a LensStore) -> SortedBuild<'a> {
        let dir = crate::projection::slot::sibling(&store.path, "sort");
        let budget = store.sort_budget;
        SortedBuild {
            store,
            first: None,
            last: 0,
            // Records carry the bulk of the data; owners are small rows.
            records: Grouper::new(&dir, "records", budget / 4 * 3),
            owners: Sorter::new(&dir, "owners", budget / 4),
            retractions: Sorter::new(&dir, "retractions", budget / 8),
        }
    }
}

fn io(x: std::io::Error) -> ProjectionError {
    e(format!("sorting: {x}"))
}

impl BulkLoad for SortedBuild<'_> {
    fn push(&mut self, records: &[LogRecord]) -> Result<(), ProjectionError> {
        let Some(first) = records.first().map(|r| r.position) else { return Ok(()) };
        check_continues(&mut self.first, self.last, first).map_err(e)?;
        for r in records {
            self.last = r.position;
            match &r.event {
                Event::AssertionRecorded { id, assertion: a } => {
                    let pk = pair_key(&a.subject, &a.predicate);
                    let bytes = std::mem::size_of::<Recorded>() + a.agent.len() + crate::projection::approx_bytes(a) / 2;
                    self.records.push_sized(&pk, Recorded::of(*id, r.position, r.recorded_at, a), bytes).map_err(io)?;
                    let owner_bytes = 96 + pk.len();
                    self.owners.push(*id, (r.position, ByteBuf::from(pk)), owner_bytes).map_err(io)?;
                }
                Event::AssertionRetracted(rt) => {
                    self.retractions.push((rt.id, r.position), (), 64).map_err(io)?;
                }
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<u64, ProjectionError> {
        let SortedBuild { store, first, last, records, owners, retractions } = *self;
        let Some(_) = first else {
            crate::projection::flush_redb(&store.db, e)?;
            return Ok(0);
        };
        let mut load = Chunked::begin(&store.db, store.sort_budget).map_err(e)?;
        if load.tx().open_table(META).map_err(e)?.get("checkpoint").map_err(e)?.is_some() {
            // `bulk_load` offers a sorted build only for an empty store.
            return Err(e("a sorted build needs an empty store"));
        }
        // Owners in id order, joined with the retractions to route each
        // one to its pair (as the incremental path does through the owners
        // table, retractions of unknown ids are ignored).
        let dir = crate::projection::slot::sibling(&store.path, "sort");
        let mut routed: Sorter<(ByteBuf, u64), AssertionId> = Sorter::new(&dir, "retractions-by-pair", store.sort_budget / 8);
        let mut retractions = retractions.finish().map_err(io)?;
        let mut owners = owners.finish().map_err(io)?;
        load = load.fill(
            |tx, limit| {
                let mut table = tx.open_table(OWNERS).map_err(e)?;
                let mut table = table.upper_bound_mut(Bound::<&[u8]>::Unbounded).map_err(e)?;
                let (mut written, mut more) = (0, false);
                for row in owners.by_ref() {
                    let (id, (position, pk)) = row.map_err(io)?;
                    table.insert_before(id.0.as_slice(), pk.as_slice()).map_err(e)?;
                    while let Some(r) = retractions.next_if_key(|(rid, _)| *rid <= id) {
                        let ((rid, at), ()) = r.map_err(io)?;
                        if rid == id && at > position {
                            routed.push((pk.clone(), at), rid, 96 + pk.len()).map_err(io)?;
                        }
                    }
                    written += 16 + pk.len() + 8;
                    if written >= limit {
                        more = true;
                        break;
                    }
                }
                table.close().map_err(e)?;
                Ok(more)
            },
            e,
        )?;
        // Whatever is left retracts ids never recorded; still, a damaged
        // run must fail the build, not pass unnoticed.
        for r in retractions {
            r.map_err(io)?;
        }
        load = load.rotate().map_err(e)?;
        // Pairs in key order, each replayed once from its records and
        // retractions. One thread merges the runs and replays each pair's
        // live set; the encoders summarize and encode (the heaviest part,
        // and the only one that parallelizes); this one appends. The other
        // projections of a rebuild often finish first, leaving the cores
        // to this.
        let records = records.finish().map_err(io)?;
        let routed = routed.finish().map_err(io)?;
        let defs = &store.defs;
        let workers = encoder_threads();
        let load = std::thread::scope(|scope| {
            // Batch k goes to encoder k mod n and comes back on its own
            // channel, so reading the outputs in turn restores key order.
            let (mut inputs, mut outputs, mut threads) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..workers {
                let (to_encoder, from_replay) = std::sync::mpsc::sync_channel::<Vec<ReplayedPair>>(4);
                let (to_appender, from_encoder) = std::sync::mpsc::sync_channel::<Vec<EncodedPair>>(4);
                threads.push(spawn(scope, format!("rebuild-lenses-encode-{i}"), move || encode_pairs(from_replay, defs, to_appender))?);
                inputs.push(to_encoder);
                outputs.push(from_encoder);
            }
            let batch = batch_pairs(store.sort_budget);
            threads.push(spawn(scope, "rebuild-lenses-replay".into(), move || replay_pairs(records, routed, batch, inputs))?);
            let appended = append_pairs(load, outputs);
            // On an append error the receivers are gone, which stops the
            // encoders, and with them the replay.
            let mut done = Ok(());
            for t in threads {
                let r = t.join().unwrap_or_else(|_| Err(e("a rebuild thread panicked")));
                done = done.and(r);
            }
            done.and(appended)
        })?;
        load.tx().open_table(META).map_err(e)?.insert("checkpoint", last).map_err(e)?;
        load.commit().map_err(e)?;
        Ok(last)
    }
}

/// Appends the encoded pairs, in the order received, rotating the
/// transaction as it fills; gives back the last one, still open.
fn append_pairs<'db>(
    load: Chunked<'db>,
    outputs: Vec<std::sync::mpsc::Receiver<Vec<EncodedPair>>>,
) -> Result<Chunked<'db>, ProjectionError> {
    // The encoders' outputs in turn, until the first one that is finished
    // (batches were dealt in turn, so every later one is finished too).
    let mut batches = outputs.iter().cycle().map_while(|o| o.recv().ok());
    load.fill(
        |tx, limit| {
            let mut table = tx.open_table(PAIRS).map_err(e)?;
            let mut pairs = table.upper_bound_mut(Bound::<&[u8]>::Unbounded).map_err(e)?;
            let (mut written, mut more) = (0, false);
            for batch in batches.by_ref() {
                for (pk, summary, live) in batch {
                    pairs.insert_before(pk.as_slice(), (summary.as_slice(), live.as_slice())).map_err(e)?;
                    written += pk.len() + summary.len() + live.len() + 16;
                }
                if written >= limit {
                    more = true;
                    break;
                }
            }
            pairs.close().map_err(e)?;
            Ok(more)
        },
        e,
    )
}

/// A pair's key, encoded summary and encoded live set.
type EncodedPair = (ByteBuf, Vec<u8>, Vec<u8>);

/// Starts a named thread of the build in `scope`.
fn spawn<'scope, F>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: String,
    f: F,
) -> Result<std::thread::ScopedJoinHandle<'scope, Result<(), ProjectionError>>, ProjectionError>
where
    F: FnOnce() -> Result<(), ProjectionError> + Send + 'scope,
{
    std::thread::Builder::new().name(name).spawn_scoped(scope, f).map_err(|x| e(format!("cannot start a rebuild thread: {x}")))
}

/// A pair's key and its replayed live set.
type ReplayedPair = (ByteBuf, LiveSet);

/// Threads that summarize and encode pairs: the cores, from two (so the
/// dealing is always exercised) up to four. They are a rebuild's last
/// step, usually alone on the machine (kv finishes first), and
/// summarizing is two thirds of it.
fn encoder_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4)
}

/// Pairs per batch dealt to an encoder: 256, fewer for a store given a
/// tiny sort budget (the tests'), so that many batches go round.
fn batch_pairs(sort_budget: usize) -> usize {
    (sort_budget / (256 * 1024)).clamp(1, 256)
}

/// Replays each pair's records (in key order, each pair's in log order)
/// and its retractions (sorted by pair, then position) into its live set,
/// and deals the sets, in key order, in batches of `size` to `encoders` in
/// turn; stops early if one is gone.
fn replay_pairs(
    records: Groups<Recorded>,
    mut retractions: Merge<(ByteBuf, u64), AssertionId>,
    size: usize,
    encoders: Vec<std::sync::mpsc::SyncSender<Vec<ReplayedPair>>>,
) -> Result<(), ProjectionError> {
    let mut batch = Vec::with_capacity(size);
    let mut turn = encoders.iter().cycle();
    for group in records {
        let (pk, records) = group.map_err(io)?;
        // A retraction is routed through a record's pair, so none can be
        // for a pair before this one; a damaged run could still say so.
        while let Some(r) = retractions.next_if_key(|(p, _)| p.as_slice() < pk.as_slice()) {
            r.map_err(io)?;
        }
        let mut set = LiveSet::default();
        for record in records {
            // Retractions of this pair logged before the record come first.
            while let Some(r) = retractions.next_if_key(|(p, at)| *p == pk && *at < record.position) {
                set.retract(&r.map_err(io)?.1);
            }
            set.add(record);
        }
        while let Some(r) = retractions.next_if_key(|(p, _)| *p == pk) {
            set.retract(&r.map_err(io)?.1);
        }
        batch.push((ByteBuf::from(pk), set));
        if batch.len() >= size {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(size));
            if turn.next().is_none_or(|to| to.send(full).is_err()) {
                return Ok(());
            }
        }
    }
    if !batch.is_empty()
        && let Some(to) = turn.next()
    {
        let _ = to.send(batch);
    }
    Ok(())
}

/// Summarizes and encodes each batch of replayed pairs, in the order
/// received; stops early if the appender is gone.
fn encode_pairs(
    from_replay: std::sync::mpsc::Receiver<Vec<ReplayedPair>>,
    defs: &Definitions,
    to_appender: std::sync::mpsc::SyncSender<Vec<EncodedPair>>,
) -> Result<(), ProjectionError> {
    for batch in from_replay {
        let mut encoded = Vec::with_capacity(batch.len());
        for (pk, set) in batch {
            let (mut summary, mut live) = (Vec::new(), Vec::new());
            super::encode_pair(&set, defs, &mut summary, &mut live)?;
            encoded.push((pk, summary, live));
        }
        if to_appender.send(encoded).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
