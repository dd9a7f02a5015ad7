//! Property tests of the write-ahead log through the library API: the codec
//! round trip over many rolled segments, recovery from a torn or corrupt
//! tail, and refusal to start on damage anywhere else.
//!
//! Every test writes a random log (random groups of random events, small
//! segments so that many roll, `SyncMode::Never` for speed), damages it in a
//! random way, and checks the outcome against an independent model: the
//! frame boundaries are read from the bytes with the documented layout
//! (`len:u32le ‖ crc:u32le ‖ first_position:u64le ‖ count:u32le ‖ payload`),
//! not through the code under test.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::Index;

use stemedb::model::{Assertion, AssertionId, Event, LogRecord, Object, Retraction, Source, Tier};
use stemedb::wal::frame;
use stemedb::wal::recovery;
use stemedb::wal::segment;
use stemedb::wal::verify;
use stemedb::wal::{SyncMode, WalError, WalReader, WalWriter, WriterOptions};

// ---------------------------------------------------------------- strategies

/// Names: mostly ASCII, sometimes any Unicode scalar (controls included:
/// the log stores what it is given).
fn short_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z][a-z0-9:_./-]{0,24}",
        1 => vec(any::<char>(), 0..24).prop_map(String::from_iter),
        1 => "[αβγδ漢字🦀ü é\u{200d}\u{10ffff}]{1,12}",
    ]
}

/// Free text, occasionally long enough to fill most of a small segment.
fn long_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => vec(any::<char>(), 0..48).prop_map(String::from_iter),
        1 => vec(any::<char>(), 200..900).prop_map(String::from_iter),
    ]
}

fn arb_time() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..=253_402_300_799, 0u32..1_000_000_000).prop_map(|(s, n)| DateTime::from_timestamp(s, n).expect("in range"))
}

fn arb_id() -> impl Strategy<Value = AssertionId> {
    any::<[u8; 32]>().prop_map(AssertionId)
}

fn arb_object() -> impl Strategy<Value = Object> {
    prop_oneof![
        long_text().prop_map(Object::Text),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Object::Number),
        any::<i64>().prop_map(Object::Integer),
        any::<bool>().prop_map(Object::Boolean),
        short_text().prop_map(Object::Entity),
        arb_time().prop_map(Object::Time),
    ]
}

fn arb_source() -> impl Strategy<Value = Source> {
    (short_text(), option::of(prop::sample::select(Tier::ALL.to_vec())), option::of("[0-9a-f]{64}")).prop_map(|(uri, tier, hash)| Source {
        uri,
        tier,
        hash,
    })
}

fn arb_assertion() -> impl Strategy<Value = Assertion> {
    (
        short_text(),
        short_text(),
        arb_object(),
        option::of(0.0f64..=1.0),
        short_text(),
        option::of("[0-9a-f]{128}"),
        option::of(arb_source()),
        option::of(arb_time()),
        vec(arb_id(), 0..3),
    )
        .prop_map(|(subject, predicate, object, confidence, agent, signature, source, valid_time, mut supersedes)| {
            supersedes.sort();
            supersedes.dedup();
            Assertion { subject, predicate, object, confidence, agent, signature, source, valid_time, supersedes }
        })
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => arb_assertion().prop_map(|a| Event::AssertionRecorded { id: a.id(), assertion: a }),
        1 => (arb_id(), short_text(), long_text(), option::of("[0-9a-f]{128}"))
            .prop_map(|(id, agent, reason, signature)| Event::AssertionRetracted(Retraction { id, agent, reason, signature })),
    ]
}

/// Groups of events, each appended as one frame.
fn arb_groups(max_groups: usize) -> impl Strategy<Value = Vec<Vec<Event>>> {
    vec(vec(arb_event(), 1..6), 1..max_groups)
}

// ------------------------------------------------------------------- helpers

fn opts(segment_bytes: u64) -> WriterOptions {
    WriterOptions { segment_bytes, sync: SyncMode::Never }
}

/// What the test wrote, as the writer acknowledged it.
#[derive(Default)]
struct Written {
    records: Vec<LogRecord>,
    /// Last position of each group (frame), in order.
    group_ends: Vec<u64>,
}

/// Where `recorded_at` comes from.
#[derive(Clone, Copy)]
enum Clock {
    /// `WalWriter::next_recorded_at` (wall clock, never backwards).
    Writer,
    /// A strictly increasing clock a year in the future, so that the time
    /// the writer recovers is distinguishable from "now".
    Future(DateTime<Utc>),
}

/// Appends `groups` one frame each, committing after group `i` when
/// `commit_after[i % len]` (and always at the end), and checks what the
/// writer reports along the way.
fn append_groups(w: &mut WalWriter, groups: &[Vec<Event>], commit_after: &[bool], clock: Clock, out: &mut Written) {
    for (i, g) in groups.iter().enumerate() {
        let at = match clock {
            Clock::Writer => w.next_recorded_at(),
            Clock::Future(base) => base + Duration::seconds(out.group_ends.len() as i64) + Duration::nanoseconds(i as i64 * 7919),
        };
        let first = w.next_position();
        let recs = w.append(g.clone(), at).expect("append");
        assert_eq!(recs.len(), g.len());
        for (k, r) in recs.iter().enumerate() {
            assert_eq!(r.position, first + k as u64, "append assigns consecutive positions");
            assert_eq!(r.recorded_at, at);
            assert_eq!(&r.event, &g[k]);
        }
        assert_eq!(w.next_position(), first + g.len() as u64);
        out.records.extend(recs);
        out.group_ends.push(w.next_position() - 1);
        if commit_after.is_empty() || commit_after[i % commit_after.len()] {
            assert_eq!(w.commit().expect("commit"), w.next_position() - 1);
        }
    }
    assert_eq!(w.commit().expect("commit"), w.next_position() - 1);
    assert_eq!(w.committed_position(), w.next_position() - 1);
}

/// A filler group of `n` small assertions.
fn filler(tag: usize, n: usize) -> Vec<Event> {
    (0..n)
        .map(|k| {
            let a = Assertion {
                subject: format!("filler:{tag}:{k}"),
                predicate: "p".into(),
                object: Object::Text("x".repeat(200)),
                confidence: None,
                agent: "filler".into(),
                signature: None,
                source: None,
                valid_time: None,
                supersedes: Vec::new(),
            };
            Event::AssertionRecorded { id: a.id(), assertion: a }
        })
        .collect()
}

/// Appends filler groups until the directory holds at least `n` segments.
fn ensure_segments(w: &mut WalWriter, dir: &Path, n: usize, clock: Clock, out: &mut Written) {
    let mut tag = 0;
    while segment::list(dir).expect("list").len() < n {
        append_groups(w, &[filler(tag, 3)], &[], clock, out);
        tag += 1;
    }
}

fn read_all(dir: &Path, from: u64) -> Result<Vec<LogRecord>, WalError> {
    WalReader::open(dir, from)?.collect()
}

/// One frame as laid out in the file, parsed independently of `wal::frame`.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
    first: u64,
    count: u64,
}

/// Frame boundaries of an intact segment file.
fn spans(path: &Path) -> Vec<Span> {
    let b = fs::read(path).expect("read segment");
    let mut out = Vec::new();
    let mut off = segment::HEADER_LEN as usize;
    while off < b.len() {
        let len = u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as usize;
        let first = u64::from_le_bytes(b[off + 8..off + 16].try_into().unwrap());
        let count = u32::from_le_bytes(b[off + 16..off + 20].try_into().unwrap()) as u64;
        let end = off + frame::HEADER_LEN + len;
        assert!(end <= b.len(), "intact segment {} has a frame past its end", path.display());
        out.push(Span { start: off as u64, end: end as u64, first, count });
        off = end;
    }
    out
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn truncate(path: &Path, len: u64) {
    OpenOptions::new().write(true).open(path).expect("open").set_len(len).expect("set_len");
}

fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let mut b = fs::read(path).expect("read");
    b[offset as usize] ^= 1 << bit;
    fs::write(path, b).expect("write");
}

/// Every file of `dir` with its bytes, to prove a failed recovery changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.clone(), fs::read(&p).unwrap())).collect();
    v.sort();
    v
}

fn assert_non_decreasing(recs: &[LogRecord]) {
    for w in recs.windows(2) {
        assert!(w[0].recorded_at <= w[1].recorded_at, "recorded_at goes backwards from position {} to {}", w[0].position, w[1].position);
    }
}

fn assert_gap_free(recs: &[LogRecord], from: u64) {
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.position, from + i as u64, "positions are gap-free");
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, max_shrink_iters: 256, ..ProptestConfig::default() }
}

// --------------------------------------------------------------------- tests

proptest! {
    #![proptest_config(config(128))]

    /// Random groups written (with a reopen in the middle) read back exactly,
    /// from the start and from any position, across many rolled segments.
    #[test]
    fn codec_round_trip(
        groups in arb_groups(40),
        commit_after in vec(any::<bool>(), 1..8),
        reopen_at in any::<Index>(),
        segment_bytes in 4096u64..16384,
        starts in vec(any::<Index>(), 4),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let split = reopen_at.index(groups.len() + 1);
        let mut out = Written::default();
        {
            let (mut w, rec) = WalWriter::open(&dir, opts(segment_bytes)).unwrap();
            prop_assert_eq!(rec.next_position, 1);
            prop_assert!(rec.truncation.is_none());
            append_groups(&mut w, &groups[..split], &commit_after, Clock::Writer, &mut out);
        }
        {
            let (mut w, rec) = WalWriter::open(&dir, opts(segment_bytes)).unwrap();
            prop_assert_eq!(rec.next_position, out.records.len() as u64 + 1);
            prop_assert!(rec.truncation.is_none(), "a cleanly written log needs no truncation");
            prop_assert_eq!(rec.last_recorded_at, out.records.last().map(|r| r.recorded_at));
            append_groups(&mut w, &groups[split..], &commit_after, Clock::Writer, &mut out);
        }
        let n = out.records.len() as u64;

        let all = read_all(&dir, 1).unwrap();
        assert_gap_free(&all, 1);
        prop_assert_eq!(&all, &out.records);
        assert_non_decreasing(&all);

        for s in &starts {
            let k = s.index(n as usize + 3) as u64; // 0 ..= n + 2
            let mut r = WalReader::open(&dir, k).unwrap();
            prop_assert_eq!(r.next_position(), k.max(1));
            let got: Vec<LogRecord> = r.by_ref().collect::<Result<_, _>>().unwrap();
            let skip = (k.max(1) - 1).min(n) as usize;
            prop_assert_eq!(&got[..], &out.records[skip..], "reader from {}", k);
        }

        let segs = segment::list(&dir).unwrap();
        let report = verify::verify(&dir).unwrap();
        prop_assert_eq!(report.last_position, n);
        prop_assert_eq!(report.records, n);
        prop_assert_eq!(report.frames, out.group_ends.len() as u64);
        prop_assert_eq!(report.segments, segs.len());

        // Segment layout: named after their first position, contiguous, and
        // never over the size limit unless holding a single frame.
        let mut next = 1;
        for s in &segs {
            prop_assert_eq!(s.first_position, next);
            let sp = spans(&s.path);
            let len = fs::metadata(&s.path).unwrap().len();
            prop_assert!(len <= segment_bytes || sp.len() == 1, "{} is {} bytes with {} frames", s.path.display(), len, sp.len());
            for f in &sp {
                prop_assert_eq!(f.first, next);
                next += f.count;
            }
        }
        prop_assert_eq!(next, n + 1);
        // Frames are exactly the groups.
        let ends: Vec<u64> = segs.iter().flat_map(|s| spans(&s.path)).map(|f| f.first + f.count - 1).collect();
        prop_assert_eq!(ends, out.group_ends);
    }

    /// Cutting the last segment anywhere after its header keeps exactly the
    /// whole frames before the cut; appends then continue from there.
    #[test]
    fn torn_tail_keeps_longest_valid_prefix(
        groups in arb_groups(30),
        more in arb_groups(6),
        segment_bytes in 4096u64..16384,
        min_segments in 1usize..4,
        cut_mode in 0u8..3,
        cut in any::<Index>(),
        delta in 1u64..24,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let base = Utc::now() + Duration::days(365);
        let mut out = Written::default();
        {
            let (mut w, _) = WalWriter::open(&dir, opts(segment_bytes)).unwrap();
            append_groups(&mut w, &groups, &[true, false], Clock::Future(base), &mut out);
            ensure_segments(&mut w, &dir, min_segments, Clock::Future(base), &mut out);
        }
        let segs = segment::list(&dir).unwrap();
        let last = segs.last().unwrap().clone();
        let sp = spans(&last.path);
        let file_len = fs::metadata(&last.path).unwrap().len();
        let boundaries: Vec<u64> = std::iter::once(segment::HEADER_LEN).chain(sp.iter().map(|f| f.end)).collect();
        let cut = match cut_mode {
            // Anywhere after the header, the whole file included.
            0 => segment::HEADER_LEN + cut.index((file_len - segment::HEADER_LEN + 1) as usize) as u64,
            // Exactly between frames.
            1 => *cut.get(&boundaries),
            // Just past a boundary: a torn frame header or payload start.
            _ => (*cut.get(&boundaries) + delta).min(file_len),
        };
        truncate(&last.path, cut);

        let kept: Vec<&Span> = sp.iter().filter(|f| f.end <= cut).collect();
        let kept_end = kept.last().map_or(segment::HEADER_LEN, |f| f.end);
        let next = kept.last().map_or(last.first_position, |f| f.first + f.count);
        check_recovered_tail(&dir, &last.path, &out, kept_end, cut, next, &more, segment_bytes)?;
    }

    /// Bit flips after the header of the last segment drop the frame they
    /// hit and everything after it, nothing before.
    #[test]
    fn corrupt_tail_keeps_longest_valid_prefix(
        groups in arb_groups(30),
        more in arb_groups(6),
        segment_bytes in 4096u64..16384,
        min_segments in 1usize..4,
        flips in vec((any::<Index>(), 0u8..8), 1..4),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let base = Utc::now() + Duration::days(365);
        let mut out = Written::default();
        {
            let (mut w, _) = WalWriter::open(&dir, opts(segment_bytes)).unwrap();
            append_groups(&mut w, &groups, &[false, true, true], Clock::Future(base), &mut out);
            ensure_segments(&mut w, &dir, min_segments, Clock::Future(base), &mut out);
            // The last segment must hold a frame to flip bits in.
            if spans(&segment::list(&dir).unwrap().last().unwrap().path).is_empty() {
                append_groups(&mut w, &[filler(99, 1)], &[], Clock::Future(base), &mut out);
            }
        }
        let segs = segment::list(&dir).unwrap();
        let last = segs.last().unwrap().clone();
        let sp = spans(&last.path);
        let file_len = fs::metadata(&last.path).unwrap().len();
        let mut first_flip = u64::MAX;
        for (at, bit) in &flips {
            let off = segment::HEADER_LEN + at.index((file_len - segment::HEADER_LEN) as usize) as u64;
            flip_bit(&last.path, off, *bit);
            first_flip = first_flip.min(off);
        }
        // Two flips of the same bit cancel out; recompute what is damaged.
        let now = fs::read(&last.path).unwrap();
        let mut original = now.clone();
        for (at, bit) in &flips {
            let off = segment::HEADER_LEN + at.index((file_len - segment::HEADER_LEN) as usize) as u64;
            original[off as usize] ^= 1 << bit;
        }
        let first_diff = now.iter().zip(&original).position(|(a, b)| a != b).map(|p| p as u64);
        let Some(first_diff) = first_diff else {
            // Every flip undone: the log is intact.
            let (_, rec) = WalWriter::open(&dir, opts(segment_bytes)).unwrap();
            prop_assert!(rec.truncation.is_none());
            prop_assert_eq!(read_all(&dir, 1).unwrap(), out.records);
            return Ok(());
        };
        prop_assert!(first_diff >= first_flip);

        let kept: Vec<&Span> = sp.iter().filter(|f| f.end <= first_diff).collect();
        let kept_end = kept.last().map_or(segment::HEADER_LEN, |f| f.end);
        let next = kept.last().map_or(last.first_position, |f| f.first + f.count);
        check_recovered_tail(&dir, &last.path, &out, kept_end, file_len, next, &more, segment_bytes)?;
    }

    /// A bit flip or a cut anywhere in a sealed segment (header included)
    /// stops recovery with the file and offset, changes nothing on disk, and
    /// fails verification and reading too.
    #[test]
    fn damaged_sealed_segment_is_an_error(
        groups in arb_groups(20),
        segment_bytes in 4096u64..8192,
        min_segments in 2usize..5,
        which in any::<Index>(),
        at in any::<Index>(),
        bit in 0u8..8,
        cut_instead in any::<bool>(),
        cut_mode in 0u8..3,
        delta in 1u64..24,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let mut out = Written::default();
        {
            let (mut w, _) = WalWriter::open(&dir, opts(segment_bytes)).unwrap();
            append_groups(&mut w, &groups, &[true], Clock::Writer, &mut out);
            ensure_segments(&mut w, &dir, min_segments, Clock::Writer, &mut out);
        }
        let segs = segment::list(&dir).unwrap();
        let i = which.index(segs.len() - 1);
        let victim = segs[i].clone();
        let sp = spans(&victim.path);
        let len = fs::metadata(&victim.path).unwrap().len();
        // Where to flip a bit, or where to cut (dropping at least one byte).
        let boundaries: Vec<u64> = std::iter::once(segment::HEADER_LEN).chain(sp.iter().map(|f| f.end)).filter(|&b| b < len).collect();
        let off = match cut_mode {
            0 => at.index(len as usize) as u64,
            1 if cut_instead => *at.get(&boundaries),
            _ => (*at.get(&boundaries) + delta).min(len - 1),
        };
        if cut_instead { truncate(&victim.path, off) } else { flip_bit(&victim.path, off, bit) }
        let before = snapshot(&dir);

        let err = recovery::recover(&dir).expect_err("recovery must refuse a damaged sealed segment");
        let msg = err.to_string();
        prop_assert!(msg.contains("offset"), "error names an offset: {}", msg);
        let boundary_cut = cut_instead && (off == segment::HEADER_LEN || sp.iter().any(|f| f.end == off));
        if boundary_cut {
            // The segment is short by whole frames: indistinguishable from a
            // complete one by itself, so the gap shows at the next header.
            let kept_next = sp.iter().rfind(|f| f.end <= off).map_or(victim.first_position, |f| f.first + f.count);
            match &err {
                WalError::Gap { path, offset, expected, found } => {
                    prop_assert_eq!(path, &segs[i + 1].path);
                    prop_assert_eq!(*offset, 0);
                    prop_assert_eq!(*expected, kept_next);
                    prop_assert_eq!(*found, segs[i + 1].first_position);
                }
                other => prop_assert!(false, "expected a gap error, got {}", other),
            }
        } else {
            // The frame (or header) holding the damaged byte.
            let expected_offset = sp.iter().find(|f| f.end > off).filter(|_| off >= segment::HEADER_LEN).map_or(0, |f| f.start);
            prop_assert!(msg.contains(&file_name(&victim.path)), "error names {}: {}", victim.path.display(), msg);
            match &err {
                WalError::Corrupt { path, offset, .. } => {
                    prop_assert_eq!(path, &victim.path);
                    prop_assert_eq!(*offset, expected_offset, "{}", msg);
                }
                other => prop_assert!(false, "expected a corruption error, got {}", other),
            }
        }
        prop_assert!(snapshot(&dir) == before, "a failed recovery must not change the directory");
        prop_assert!(WalWriter::open(&dir, opts(segment_bytes)).is_err());
        prop_assert!(verify::verify(&dir).is_err(), "verify must fail too");
        prop_assert!(read_all(&dir, 1).is_err(), "reading through the damage must fail, not end early");
        prop_assert!(snapshot(&dir) == before);
    }

    /// A missing middle segment is a gap: recovery, verification and readers
    /// refuse it.
    #[test]
    fn missing_middle_segment_is_an_error(
        groups in arb_groups(20),
        segment_bytes in 4096u64..8192,
        min_segments in 3usize..6,
        which in any::<Index>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let mut out = Written::default();
        {
            let (mut w, _) = WalWriter::open(&dir, opts(segment_bytes)).unwrap();
            append_groups(&mut w, &groups, &[true], Clock::Writer, &mut out);
            ensure_segments(&mut w, &dir, min_segments, Clock::Writer, &mut out);
        }
        let segs = segment::list(&dir).unwrap();
        let i = 1 + which.index(segs.len() - 2); // neither the first nor the last
        fs::remove_file(&segs[i].path).unwrap();
        let before = snapshot(&dir);

        let err = recovery::recover(&dir).expect_err("recovery must refuse a gap");
        match &err {
            WalError::Gap { path, offset, expected, found } => {
                prop_assert_eq!(path, &segs[i + 1].path);
                prop_assert_eq!(*offset, 0);
                prop_assert_eq!(*expected, segs[i].first_position);
                prop_assert_eq!(*found, segs[i + 1].first_position);
            }
            other => prop_assert!(false, "expected a gap error, got {}", other),
        }
        let msg = err.to_string();
        prop_assert!(msg.contains(&file_name(&segs[i + 1].path)) && msg.contains("offset"), "{}", msg);
        prop_assert!(snapshot(&dir) == before);
        prop_assert!(verify::verify(&dir).is_err());
        prop_assert!(read_all(&dir, 1).is_err(), "a reader must not stop silently at the gap");
        // A reader starting after the gap reads on; one starting before fails.
        let after = segs[i + 1].first_position;
        prop_assert_eq!(read_all(&dir, after).unwrap(), out.records[after as usize - 1..].to_vec());
        prop_assert!(read_all(&dir, segs[i].first_position).is_err());
    }
}

/// After damage to the last segment that leaves whole frames ending at
/// `kept_end` (the file being `damaged_len` bytes long), recovery must keep
/// exactly positions `..next`, report any dropped bytes, restore the last
/// `recorded_at`, and let appends continue at `next`.
#[allow(clippy::too_many_arguments)]
fn check_recovered_tail(
    dir: &Path,
    last: &Path,
    out: &Written,
    kept_end: u64,
    damaged_len: u64,
    next: u64,
    more: &[Vec<Event>],
    segment_bytes: u64,
) -> Result<(), TestCaseError> {
    // Atomic groups: what survives ends at a group boundary.
    prop_assert!(next == 1 || out.group_ends.contains(&(next - 1)), "position {} is not a group boundary", next - 1);
    let (mut w, rec) = WalWriter::open(dir, opts(segment_bytes)).unwrap();
    prop_assert_eq!(rec.next_position, next);
    prop_assert_eq!(w.next_position(), next);
    prop_assert_eq!(w.committed_position(), next - 1);
    prop_assert_eq!(&rec.active.path, &last.to_path_buf());
    prop_assert_eq!(rec.active_len, kept_end);
    if damaged_len > kept_end {
        let t = rec.truncation.as_ref().expect("dropped bytes are reported as a truncation");
        prop_assert_eq!(&t.path, &last.to_path_buf());
        prop_assert_eq!(t.offset, kept_end);
        prop_assert_eq!(t.bytes, damaged_len - kept_end);
        prop_assert_eq!(t.first_dropped_position, next);
    } else {
        prop_assert!(rec.truncation.is_none(), "a cut at a frame boundary leaves nothing to truncate");
    }
    prop_assert_eq!(fs::metadata(last).unwrap().len(), kept_end);

    let kept = &out.records[..(next - 1) as usize];
    let last_at = kept.last().map(|r| r.recorded_at);
    prop_assert_eq!(rec.last_recorded_at, last_at);
    // The kept records were stamped a year ahead: time must not go back.
    let t = w.next_recorded_at();
    if let Some(last_at) = last_at {
        prop_assert_eq!(t, last_at);
    }

    let mut cont = Written::default();
    append_groups(&mut w, more, &[true, false], Clock::Writer, &mut cont);
    drop(w);
    prop_assert_eq!(cont.records.first().map(|r| r.position), Some(next));
    let all = read_all(dir, 1).unwrap();
    let expected: Vec<LogRecord> = kept.iter().chain(&cont.records).cloned().collect();
    assert_gap_free(&all, 1);
    prop_assert_eq!(&all, &expected);
    assert_non_decreasing(&all);
    let report = verify::verify(dir).unwrap();
    prop_assert_eq!(report.last_position, expected.len() as u64);
    // A second recovery finds nothing more to do.
    let (_, again) = WalWriter::open(dir, opts(segment_bytes)).unwrap();
    prop_assert!(again.truncation.is_none());
    prop_assert_eq!(again.next_position, expected.len() as u64 + 1);
    Ok(())
}

/// A damaged header of the last segment is not a torn tail (segments are
/// created whole under a temporary name), so recovery refuses it.
#[test]
fn damaged_header_of_last_segment_is_an_error() {
    for (cut, flip) in [(Some(0u64), None), (Some(10), None), (Some(23), None), (None, Some(0u64)), (None, Some(13)), (None, Some(22))] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let mut out = Written::default();
        {
            let (mut w, _) = WalWriter::open(&dir, opts(4096)).unwrap();
            ensure_segments(&mut w, &dir, 2, Clock::Writer, &mut out);
        }
        let last = segment::list(&dir).unwrap().last().unwrap().clone();
        if let Some(c) = cut {
            truncate(&last.path, c);
        }
        if let Some(f) = flip {
            flip_bit(&last.path, f, 3);
        }
        let err = recovery::recover(&dir).expect_err("a damaged header is corruption");
        match &err {
            WalError::Corrupt { path, offset, .. } => {
                assert_eq!(path, &last.path);
                assert_eq!(*offset, 0);
            }
            other => panic!("expected corruption, got {other}"),
        }
        assert!(verify::verify(&dir).is_err());
    }
}

/// Leftover temporaries of an interrupted roll are removed, and an empty
/// directory gets its first segment.
#[test]
fn recovery_removes_temporaries_and_starts_empty_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let mut out = Written::default();
    {
        let (mut w, rec) = WalWriter::open(&dir, opts(4096)).unwrap();
        assert_eq!(rec.next_position, 1);
        assert_eq!(rec.last_recorded_at, None);
        ensure_segments(&mut w, &dir, 2, Clock::Writer, &mut out);
    }
    let n = out.records.len() as u64;
    let tmp_seg = dir.join(format!("{:020}.{}", n + 1, segment::TMP_EXT));
    fs::write(&tmp_seg, b"STEMEWAL half").unwrap();
    let (mut w, rec) = WalWriter::open(&dir, opts(4096)).unwrap();
    assert!(!tmp_seg.exists());
    assert!(rec.truncation.is_none());
    assert_eq!(rec.next_position, n + 1);
    append_groups(&mut w, &[filler(7, 2)], &[], Clock::Writer, &mut out);
    drop(w);
    assert_eq!(read_all(&dir, 1).unwrap(), out.records);
    assert_eq!(verify::verify(&dir).unwrap().last_position, n + 2);
}

/// Readers of a log whose last segment holds only its header (a fresh log,
/// or one just sealed) end cleanly instead of reopening that segment forever.
#[test]
fn empty_segments_read_as_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let (mut w, _) = WalWriter::open(&dir, opts(4096)).unwrap();
    assert_eq!(read_all(&dir, 1).unwrap(), Vec::new());
    assert_eq!(verify::verify(&dir).unwrap().last_position, 0);
    assert!(!w.seal_active().unwrap(), "an empty segment is not sealed");

    let mut out = Written::default();
    append_groups(&mut w, &[filler(1, 2), filler(2, 1)], &[], Clock::Writer, &mut out);
    assert!(w.seal_active().unwrap());
    assert_eq!(segment::list(&dir).unwrap().len(), 2);
    assert_eq!(read_all(&dir, 1).unwrap(), out.records);
    assert_eq!(read_all(&dir, 3).unwrap(), out.records[2..].to_vec());
    assert_eq!(read_all(&dir, 4).unwrap(), Vec::new());
    assert_eq!(verify::verify(&dir).unwrap().last_position, 3);
    drop(w);
    let (mut w, rec) = WalWriter::open(&dir, opts(4096)).unwrap();
    assert_eq!(rec.next_position, 4);
    assert_eq!(rec.active_len, segment::HEADER_LEN);
    assert_eq!(rec.last_recorded_at, out.records.last().map(|r| r.recorded_at));
    append_groups(&mut w, &[filler(3, 1)], &[], Clock::Writer, &mut out);
    assert_eq!(read_all(&dir, 1).unwrap(), out.records);
}
