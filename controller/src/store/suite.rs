//! The store's test suite, written once and run against both backends: every test is a
//! generic function of a [`Place`] (where a store lives, so that it can be opened again), and
//! `suite!` instantiates it as `suite::redb::NAME` and `suite::postgres::NAME`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fleet_broker::metrics::Metrics;
use time::macros::datetime;
use time::OffsetDateTime;

use super::{Change, Store, StoreError};
use crate::audit::{verify_chain, AuditRecord, Outcome, GENESIS_PREV_HASH};
use crate::phone::Phone;
use crate::station::{Standing, Station};
use crate::whitelist::Whitelists;
use fleet_protocol::{Mac, Serial};

/// Where a store lives: a redb file in a temporary directory, or a PostgreSQL database of
/// its own. `open` again is a reopen: the same data, a new `Store`.
pub(super) trait Place {
    fn new() -> Self;
    fn open(&self) -> Store;
    /// Changes one stored audit record behind the store's back, as someone with the file or
    /// the database could.
    fn edit_audit(&self, store: &Store, seq: u64, edit: &dyn Fn(&mut AuditRecord));
    /// Removes one stored audit record behind the store's back.
    fn remove_audit(&self, store: &Store, seq: u64);
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(#[test]
            fn $name() {
                super::$name::<crate::store::redb::tests::RedbPlace>();
            })*
        }

        mod postgres {
            $(#[test]
            fn $name() {
                super::$name::<crate::store::postgres::tests::PgPlace>();
            })*
        }
    };
}

suite!(
    a_sighting_is_kept_across_a_reopen_and_deleted_with_its_station,
    commits_are_timed_once_asked_to_be_and_the_writer_is_alive,
    put_get_delete,
    apply_is_atomic,
    concurrent_applies_are_grouped_yet_each_is_atomic_and_chained,
    apply_async_answers_after_the_commit,
    a_callers_transaction_reads_its_own_writes_and_commits_once,
    a_dropped_transaction_leaves_nothing_and_frees_the_writer,
    reopen_keeps_everything_and_seq_keeps_rising,
    audit_is_per_tenant_newest_last_and_limited,
    audit_hashes_chain_across_transactions_and_reopen,
    tenants_have_independent_chains,
    audit_page_is_ascending_after_seq_and_limited,
    a_record_edited_behind_the_stores_back_is_detected,
    a_small_tenant_reads_its_own_records_through_the_index,
    a_mismatch_is_noted_on_the_stored_record_in_the_commit,
    pages_are_in_key_order_filtered_and_say_whether_more_follow,
    phones_put_get_list_delete,
    whitelists_default_then_round_trip,
    phone_changes_are_atomic_with_audit,
    reopen_keeps_phones_and_whitelists,
);

pub(super) const T0: OffsetDateTime = datetime!(2024-03-01 10:00:00 UTC);

pub(super) fn station(serial: &str) -> Station {
    Station {
        serial: Serial::parse(serial).unwrap(),
        model: "MC-6100".into(),
        firmware: "6.1.0".into(),
        mac_streaming: "001122334455".into(),
        mac_control: "001122334466".into(),
        fingerprint: Some(fleet_protocol::Fingerprint::from_bytes([7; 32])),
        standing: Standing::Unauthorized,
        created_at: T0,
        updated_at: T0,
        last_seen: Some(T0),
        ip: Some("192.0.2.1".into()),
        tenant: "default".into(),
        last_mismatch: None,
    }
}

pub(super) fn record(tenant: &str, action: &str) -> AuditRecord {
    AuditRecord::new(
        T0,
        tenant,
        "admin",
        Some("S1".into()),
        action,
        Outcome::Ok,
        None,
    )
}

pub(super) fn phone(mac: &str, tenant: &str) -> Phone {
    Phone::new(
        Mac::parse(mac).unwrap(),
        tenant.into(),
        "Yealink".into(),
        "T54W".into(),
        "Berlin".into(),
        crate::phone::Pap::parse("123456").unwrap(),
        T0,
    )
}

fn whitelists() -> Whitelists {
    let mut lists = Whitelists::default();
    lists.add_permanent(
        "default",
        crate::whitelist::WhitelistEntry::parse("203.0.113.0/24").unwrap(),
    );
    lists.grant_temporary(
        "default",
        "192.0.2.1".parse().unwrap(),
        T0,
        time::Duration::hours(8),
    );
    lists
}

/// A station record that cannot be encoded: RFC 3339 cannot write an offset with seconds.
fn unencodable(serial: &str) -> Station {
    let mut bad = station(serial);
    bad.updated_at = T0.to_offset(time::UtcOffset::from_hms(0, 0, 30).unwrap());
    bad
}

/// The whole chain of `tenant`, paged as fleetctl pages it.
pub(super) fn whole_chain(store: &Store, tenant: &str, page: usize) -> Vec<AuditRecord> {
    let mut records: Vec<AuditRecord> = Vec::new();
    loop {
        let after = records.last().map_or(0, |r| r.seq);
        let next = store.audit_page(tenant, after, page).unwrap();
        if next.is_empty() {
            return records;
        }
        records.extend(next);
    }
}

/// The store at `place` after `changes` were applied and it was closed and opened again.
fn reopened<P: Place>(place: &P, changes: Vec<Change>) -> Store {
    place.open().apply(changes).unwrap();
    place.open()
}

/// A store with ten audit records `a0`…`a9`, the even ones of `default`, the odd of `other`.
fn with_ten_audit_records<P: Place>(place: &P) -> Store {
    let store = place.open();
    let changes = (0..10)
        .map(|i| {
            let tenant = if i % 2 == 0 { "default" } else { "other" };
            Change::Audit(record(tenant, &format!("a{i}")))
        })
        .collect();
    store.apply(changes).unwrap();
    store
}

fn a_sighting_is_kept_across_a_reopen_and_deleted_with_its_station<P: Place>() {
    let place = P::new();
    let s1 = Serial::parse("S1").unwrap();
    let s2 = Serial::parse("S2").unwrap();
    let store = reopened(
        &place,
        vec![
            Change::PutStation(station("S1")),
            Change::PutStation(station("S2")),
            Change::Seen(s1.clone(), 1_700_000_000),
            Change::Seen(s2.clone(), 1_700_000_001),
            Change::Seen(s1.clone(), 1_700_000_060),
        ],
    );
    assert_eq!(
        store.sightings().unwrap(),
        [(s1.clone(), 1_700_000_060), (s2.clone(), 1_700_000_001)]
    );
    store
        .apply(vec![Change::DeleteStation(s1.clone())])
        .unwrap();
    assert_eq!(store.sightings().unwrap(), [(s2.clone(), 1_700_000_001)]);
    // An older sighting committed after a newer one does not move it back.
    store
        .apply(vec![Change::Seen(s2.clone(), 1_700_000_000)])
        .unwrap();
    assert_eq!(store.sightings().unwrap(), [(s2.clone(), 1_700_000_001)]);
    // A sighting of a station removed since (or never recorded) does not bring it back.
    store.apply(vec![Change::Seen(s1, 1_700_000_120)]).unwrap();
    assert_eq!(store.sightings().unwrap(), [(s2.clone(), 1_700_000_001)]);
    // A station put again keeps its sighting; a newer one moves it on.
    store
        .apply(vec![
            Change::PutStation(station("S2")),
            Change::Seen(s2.clone(), 1_700_000_200),
        ])
        .unwrap();
    assert_eq!(store.sightings().unwrap(), [(s2, 1_700_000_200)]);
}

fn commits_are_timed_once_asked_to_be_and_the_writer_is_alive<P: Place>() {
    let place = P::new();
    let store = place.open();
    let metrics = Arc::new(Metrics::new());
    store.time_commits(metrics.clone());
    assert!(store.writer_alive().load(Ordering::Relaxed));
    store
        .apply(vec![Change::PutStation(station("T1"))])
        .unwrap();
    let text = metrics.encode(&Default::default());
    assert!(
        text.lines()
            .any(|l| l == "fleetd_store_commit_seconds_count 1"),
        "{text}"
    );
    // A caller's transaction's commit is timed too.
    let mut txn = store.begin().unwrap();
    txn.apply(vec![Change::PutStation(station("T2"))]).unwrap();
    txn.commit().unwrap();
    let text = metrics.encode(&Default::default());
    assert!(
        text.lines()
            .any(|l| l == "fleetd_store_commit_seconds_count 2"),
        "{text}"
    );
    let alive = store.writer_alive();
    drop(store);
    assert!(
        !alive.load(Ordering::Relaxed),
        "the writer ended with the store"
    );
}

fn put_get_delete<P: Place>() {
    let place = P::new();
    let store = place.open();
    let s1 = Serial::parse("S1").unwrap();
    assert_eq!(store.station(&s1).unwrap(), None);
    store
        .apply(vec![
            Change::PutStation(station("S2")),
            Change::PutStation(station("S1")),
        ])
        .unwrap();
    assert_eq!(store.station(&s1).unwrap(), Some(station("S1")));
    let serials: Vec<String> = store
        .stations()
        .unwrap()
        .iter()
        .map(|s| s.serial.to_string())
        .collect();
    assert_eq!(serials, ["S1", "S2"]);
    store
        .apply(vec![Change::DeleteStation(s1.clone())])
        .unwrap();
    assert_eq!(store.station(&s1).unwrap(), None);
    assert_eq!(store.stations().unwrap().len(), 1);
    // Deleting what is not there is no error.
    store.apply(vec![Change::DeleteStation(s1)]).unwrap();
}

fn apply_is_atomic<P: Place>() {
    let place = P::new();
    let store = place.open();
    let mut rejected = station("S1");
    rejected.standing = Standing::Rejected;
    let stored = store
        .apply(vec![
            Change::PutStation(station("S1")),
            Change::Audit(record("default", "auth_request")),
            Change::PutStation(rejected.clone()),
            Change::Audit(record("default", "rejectStation")),
        ])
        .unwrap();
    assert_eq!(stored.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(
        store.station(&rejected.serial).unwrap(),
        Some(rejected.clone())
    );

    // A batch with a record that cannot be encoded stores nothing at all.
    let result = store.apply(vec![
        Change::DeleteStation(rejected.serial.clone()),
        Change::Audit(record("default", "removeStation")),
        Change::PutStation(unencodable("S3")),
    ]);
    assert!(matches!(result, Err(StoreError::Encode(_))), "{result:?}");
    assert_eq!(store.station(&rejected.serial).unwrap(), Some(rejected));
    assert_eq!(store.audit("default", 10).unwrap().len(), 2);
    // The failed batch's sequence number is not lost: no gap.
    let next = store
        .apply(vec![Change::Audit(record("default", "x"))])
        .unwrap();
    assert_eq!(next[0].seq, 3);
}

fn concurrent_applies_are_grouped_yet_each_is_atomic_and_chained<P: Place>() {
    let place = P::new();
    let store = Arc::new(place.open());
    let bad = unencodable("BAD");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            let bad = bad.clone();
            std::thread::spawn(move || {
                let mut ok = 0;
                for i in 0..25 {
                    let serial = format!("T{t}N{i}");
                    let mut changes = vec![
                        Change::PutStation(station(&serial)),
                        Change::Audit(record("default", "auth_request")),
                    ];
                    // Every fifth request cannot be stored: it must fail alone.
                    if i % 5 == 4 {
                        changes.push(Change::PutStation(bad.clone()));
                    }
                    match store.apply(changes) {
                        Ok(records) => {
                            assert_eq!(records.len(), 1);
                            ok += 1;
                        }
                        Err(e) => assert!(matches!(e, StoreError::Encode(_)), "{e}"),
                    }
                }
                ok
            })
        })
        .collect();
    let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(ok, 8 * 20);
    let stations = store.stations().unwrap();
    assert_eq!(stations.len(), 8 * 20);
    assert!(stations
        .iter()
        .all(|s| !s.serial.as_str().starts_with("BAD")));
    for t in 0..8 {
        for i in 0..25 {
            let stored = store
                .station(&Serial::parse(&format!("T{t}N{i}")).unwrap())
                .unwrap();
            assert_eq!(stored.is_some(), i % 5 != 4, "T{t}N{i}");
        }
    }
    // One unbroken chain with gapless sequence numbers.
    let chain = whole_chain(&store, "default", 7);
    assert_eq!(chain.len(), 8 * 20);
    for (n, pair) in chain.windows(2).enumerate() {
        assert_eq!(pair[1].prev_hash, pair[0].hash, "record {n}");
        assert_eq!(pair[1].seq, pair[0].seq + 1);
    }
}

fn apply_async_answers_after_the_commit<P: Place>() {
    let place = P::new();
    let store = place.open();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pending: Vec<_> = (0..50)
            .map(|i| {
                store.apply_async(vec![
                    Change::PutStation(station(&format!("A{i}"))),
                    Change::Audit(record("default", "connect")),
                ])
            })
            .collect();
        let mut seqs = Vec::new();
        for p in pending {
            seqs.push(p.await.unwrap()[0].seq);
        }
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
        assert_eq!(store.stations().unwrap().len(), 50);
    });
}

fn a_callers_transaction_reads_its_own_writes_and_commits_once<P: Place>() {
    let place = P::new();
    let store = place.open();
    let mut txn = store.begin().unwrap();
    let serial = Serial::parse("S1").unwrap();
    txn.apply(vec![
        Change::PutStation(station("S1")),
        Change::Audit(record("default", "a")),
    ])
    .unwrap();
    assert!(txn.station(&serial).unwrap().is_some());
    assert_eq!(txn.stations().unwrap().len(), 1);
    assert_eq!(txn.audit("default", 10).unwrap().len(), 1);
    assert_eq!(txn.stations_page(None, 10, &|_| true).unwrap().0.len(), 1);
    // Nobody else sees it before the commit.
    assert!(store.station(&serial).unwrap().is_none());
    let records = txn.commit().unwrap();
    assert_eq!(records.len(), 1);
    assert!(store.station(&serial).unwrap().is_some());

    // A failed write poisons the transaction: nothing of it is committed.
    let mut txn = store.begin().unwrap();
    txn.apply(vec![Change::DeleteStation(serial.clone())])
        .unwrap();
    assert!(txn
        .apply(vec![Change::PutStation(unencodable("S2"))])
        .is_err());
    assert!(matches!(
        txn.apply(vec![Change::Audit(record("default", "b"))]),
        Err(StoreError::Poisoned(_))
    ));
    assert!(matches!(txn.commit(), Err(StoreError::Poisoned(_))));
    assert!(store.station(&serial).unwrap().is_some());
    assert_eq!(store.audit("default", 10).unwrap().len(), 1);

    // A transaction that wrote nothing commits nothing, and the next one chains on.
    let txn = store.begin().unwrap();
    assert!(txn.commit().unwrap().is_empty());
    let stored = store
        .apply(vec![Change::Audit(record("default", "c"))])
        .unwrap();
    assert_eq!(stored[0].seq, 2);
    assert_eq!(stored[0].prev_hash, records[0].hash);
}

fn a_dropped_transaction_leaves_nothing_and_frees_the_writer<P: Place>() {
    let place = P::new();
    let store = place.open();
    let mut txn = store.begin().unwrap();
    txn.apply(vec![
        Change::PutStation(station("S1")),
        Change::Audit(record("default", "a")),
    ])
    .unwrap();
    drop(txn);
    // The writer's transaction can be had again, and the number was not used.
    let stored = store
        .apply(vec![Change::Audit(record("default", "b"))])
        .unwrap();
    assert_eq!(stored[0].seq, 1);
    assert_eq!(stored[0].prev_hash, GENESIS_PREV_HASH);
    assert!(store.stations().unwrap().is_empty());
}

fn reopen_keeps_everything_and_seq_keeps_rising<P: Place>() {
    let place = P::new();
    let store = reopened(
        &place,
        vec![
            Change::PutStation(station("S1")),
            Change::Audit(record("default", "a")),
            Change::Audit(record("default", "b")),
        ],
    );
    assert_eq!(store.stations().unwrap(), vec![station("S1")]);
    let stored = store
        .apply(vec![Change::Audit(record("default", "c"))])
        .unwrap();
    assert_eq!(stored[0].seq, 3);
    let log = store.audit("default", 100).unwrap();
    assert_eq!(log.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(log[2].action, "c");
    assert_eq!(log[0].time, T0);
}

fn audit_is_per_tenant_newest_last_and_limited<P: Place>() {
    let place = P::new();
    let store = with_ten_audit_records(&place);
    let log = store.audit("default", 3).unwrap();
    let actions: Vec<&str> = log.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["a4", "a6", "a8"]);
    assert_eq!(store.audit("other", 100).unwrap().len(), 5);
    assert!(store.audit("nobody", 100).unwrap().is_empty());
    assert!(store.audit("default", 0).unwrap().is_empty());
}

fn audit_hashes_chain_across_transactions_and_reopen<P: Place>() {
    let place = P::new();
    let first = {
        let store = place.open();
        let stored = store
            .apply(vec![
                Change::Audit(record("default", "a")),
                Change::PutStation(station("S1")),
                Change::Audit(record("default", "b")),
            ])
            .unwrap();
        assert_eq!(stored[0].prev_hash, GENESIS_PREV_HASH);
        assert_eq!(stored[1].prev_hash, stored[0].hash);
        store
            .apply(vec![Change::Audit(record("default", "c"))])
            .unwrap();
        stored
    };
    let store = place.open();
    let stored = store
        .apply(vec![Change::Audit(record("default", "d"))])
        .unwrap();
    let log = whole_chain(&store, "default", 2);
    assert_eq!(log.len(), 4);
    assert_eq!(log[..2], first[..]);
    assert_eq!(log[3], stored[0]);
    assert_eq!(log[3].prev_hash, log[2].hash);
    for record in &log {
        assert_eq!(record.hash, crate::audit::record_hash(record));
        assert_eq!(record.hash.len(), 64);
    }
    assert_eq!(verify_chain(&log, None), Ok(()));
    // What `audit` shows is the same records.
    assert_eq!(store.audit("default", 100).unwrap(), log);
}

fn tenants_have_independent_chains<P: Place>() {
    let place = P::new();
    let store = place.open();
    for i in 0..3 {
        store
            .apply(vec![
                Change::Audit(record("default", &format!("d{i}"))),
                Change::Audit(record("other", &format!("o{i}"))),
            ])
            .unwrap();
    }
    let default = whole_chain(&store, "default", 1000);
    let other = whole_chain(&store, "other", 1000);
    assert_eq!(default.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3, 5]);
    assert_eq!(other.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 4, 6]);
    assert_eq!(default[0].prev_hash, GENESIS_PREV_HASH);
    assert_eq!(other[0].prev_hash, GENESIS_PREV_HASH);
    assert_eq!(verify_chain(&default, None), Ok(()));
    assert_eq!(verify_chain(&other, None), Ok(()));
    // Removing a record of one tenant leaves the other's chain whole.
    place.remove_audit(&store, 3);
    assert_eq!(
        verify_chain(&whole_chain(&store, "other", 1000), None),
        Ok(())
    );
    let broken = verify_chain(&whole_chain(&store, "default", 1000), None);
    assert_eq!(broken.map_err(|b| b.seq), Err(5));
}

fn audit_page_is_ascending_after_seq_and_limited<P: Place>() {
    let place = P::new();
    let store = with_ten_audit_records(&place);
    let seqs = |after: u64, limit: usize| -> Vec<u64> {
        store
            .audit_page("default", after, limit)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    };
    assert_eq!(seqs(0, 100), [1, 3, 5, 7, 9]);
    assert_eq!(seqs(0, 2), [1, 3]);
    assert_eq!(seqs(3, 2), [5, 7]);
    assert_eq!(seqs(4, 100), [5, 7, 9]);
    assert!(seqs(9, 100).is_empty());
    assert!(seqs(u64::MAX, 100).is_empty());
    assert!(seqs(0, 0).is_empty());
    assert_eq!(seqs(0, usize::MAX), [1, 3, 5, 7, 9]);
    assert!(store.audit_page("nobody", 0, 100).unwrap().is_empty());
}

fn a_record_edited_behind_the_stores_back_is_detected<P: Place>() {
    let place = P::new();
    let store = place.open();
    for action in ["a", "b", "c", "d"] {
        store
            .apply(vec![Change::Audit(record("default", action))])
            .unwrap();
    }
    let verify =
        |store: &Store| verify_chain(&whole_chain(store, "default", 3), None).map_err(|b| b.seq);
    assert_eq!(verify(&store), Ok(()));
    place.edit_audit(&store, 2, &|r| r.outcome = Outcome::Refused);
    assert_eq!(verify(&store), Err(2));
    // Recomputing the edited record's hash moves the break to the next record.
    place.edit_audit(&store, 2, &|r| r.hash = crate::audit::record_hash(r));
    assert_eq!(verify(&store), Err(3));
}

fn a_small_tenant_reads_its_own_records_through_the_index<P: Place>() {
    let place = P::new();
    let store = place.open();
    let mut changes: Vec<Change> = (0..500)
        .map(|i| Change::Audit(record("big", &format!("b{i}"))))
        .collect();
    changes.insert(10, Change::Audit(record("small", "first")));
    changes.push(Change::Audit(record("small", "last")));
    store.apply(changes).unwrap();
    let small = store.audit("small", 10).unwrap();
    assert_eq!(
        small.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
        ["first", "last"]
    );
    assert_eq!(store.audit("big", 3).unwrap().len(), 3);
    assert_eq!(whole_chain(&store, "small", 1).len(), 2);
    // The index names (tenant, seq): a page after the tenant's first record starts at its
    // second, and nothing of another tenant is read in between.
    let first = small[0].seq;
    let page = store.audit_page("small", first, 10).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].action, "last");
    assert_eq!(verify_chain(&whole_chain(&store, "big", 64), None), Ok(()));
}

fn a_mismatch_is_noted_on_the_stored_record_in_the_commit<P: Place>() {
    let place = P::new();
    let store = place.open();
    let serial = Serial::parse("S1").unwrap();
    let at = T0 + time::Duration::minutes(5);
    let mut accepted = station("S1");
    accepted.standing = Standing::Authorized;
    store
        .apply(vec![Change::PutStation(station("S1"))])
        .unwrap();
    // The mismatch is noted on the record as it stands at the commit: here, after a change
    // queued before it in the same commit.
    store
        .apply(vec![
            Change::PutStation(accepted.clone()),
            Change::NoteMismatch {
                serial: serial.clone(),
                at,
            },
        ])
        .unwrap();
    let expected = crate::station::mismatch_noted(accepted, at);
    assert_eq!(store.station(&serial).unwrap(), Some(expected));
    // Nothing for a station that is gone.
    let gone = Serial::parse("S9").unwrap();
    store
        .apply(vec![Change::NoteMismatch {
            serial: gone.clone(),
            at,
        }])
        .unwrap();
    assert_eq!(store.station(&gone).unwrap(), None);
}

fn pages_are_in_key_order_filtered_and_say_whether_more_follow<P: Place>() {
    let place = P::new();
    let store = place.open();
    // More than one chunk of PostgreSQL's keyset reads, put in no particular order.
    let mut changes: Vec<Change> = (0..700)
        .rev()
        .map(|i| Change::PutStation(station(&format!("P{i:04}"))))
        .collect();
    changes.push(Change::PutStation(station("Q1")));
    store.apply(changes).unwrap();
    let serials =
        |page: &[Station]| -> Vec<String> { page.iter().map(|s| s.serial.to_string()).collect() };
    let (page, more) = store.stations_page(None, 3, &|_| true).unwrap();
    assert_eq!(serials(&page), ["P0000", "P0001", "P0002"]);
    assert!(more);
    let (page, more) = store.stations_page(Some("P0002"), 2, &|_| true).unwrap();
    assert_eq!(serials(&page), ["P0003", "P0004"]);
    assert!(more);
    // A filter that keeps few records reads past many: every hundredth, and Q1.
    let rare = |s: &Station| s.serial.as_str().ends_with("00") || s.serial.as_str() == "Q1";
    let (page, more) = store.stations_page(None, 7, &rare).unwrap();
    assert_eq!(
        serials(&page),
        ["P0000", "P0100", "P0200", "P0300", "P0400", "P0500", "P0600"]
    );
    assert!(more, "Q1 follows");
    let (page, more) = store.stations_page(Some("P0600"), 7, &rare).unwrap();
    assert_eq!(serials(&page), ["Q1"]);
    assert!(!more);
    let (page, more) = store.stations_page(None, 8, &rare).unwrap();
    assert_eq!(page.len(), 8);
    assert!(!more, "exactly the page");
    let (page, more) = store.stations_page(Some("Q1"), 10, &|_| true).unwrap();
    assert!(page.is_empty() && !more);
    let (page, more) = store.stations_page(None, 0, &|_| true).unwrap();
    assert!(page.is_empty() && more);

    store
        .apply(vec![
            Change::PutPhone(phone("000000000003", "other")),
            Change::PutPhone(phone("000000000001", "default")),
            Change::PutPhone(phone("000000000002", "default")),
        ])
        .unwrap();
    let (page, more) = store
        .phones_page(None, 1, &|p| p.tenant == "default")
        .unwrap();
    assert_eq!(page, [phone("000000000001", "default")]);
    assert!(more);
    let (page, more) = store
        .phones_page(Some("000000000001"), 5, &|p| p.tenant == "default")
        .unwrap();
    assert_eq!(page, [phone("000000000002", "default")]);
    assert!(!more);
}

fn phones_put_get_list_delete<P: Place>() {
    let place = P::new();
    let store = place.open();
    let m1 = Mac::parse("000000000001").unwrap();
    assert_eq!(store.phone(&m1).unwrap(), None);
    assert!(store.phones(None).unwrap().is_empty());
    store
        .apply(vec![
            Change::PutPhone(phone("000000000003", "other")),
            Change::PutPhone(phone("000000000002", "default")),
            Change::PutPhone(phone("000000000001", "default")),
        ])
        .unwrap();
    assert_eq!(
        store.phone(&m1).unwrap(),
        Some(phone("000000000001", "default"))
    );
    let macs = |tenant: Option<&str>| -> Vec<String> {
        store
            .phones(tenant)
            .unwrap()
            .iter()
            .map(|p| p.mac.to_string())
            .collect()
    };
    assert_eq!(macs(None), ["000000000001", "000000000002", "000000000003"]);
    assert_eq!(macs(Some("default")), ["000000000001", "000000000002"]);
    assert_eq!(macs(Some("other")), ["000000000003"]);
    assert!(macs(Some("nobody")).is_empty());
    // A put replaces the record.
    let suspended = crate::phone::suspend(
        phone("000000000001", "default"),
        &crate::phone::PhonePolicy::default(),
        T0,
    );
    store
        .apply(vec![Change::PutPhone(suspended.clone())])
        .unwrap();
    assert_eq!(store.phone(&m1).unwrap(), Some(suspended));
    // A phone moved to another tenant is listed under that one only.
    let moved = phone("000000000002", "other");
    store.apply(vec![Change::PutPhone(moved)]).unwrap();
    assert_eq!(macs(Some("default")), ["000000000001"]);
    assert_eq!(macs(Some("other")), ["000000000002", "000000000003"]);
    store.apply(vec![Change::DeletePhone(m1.clone())]).unwrap();
    assert_eq!(store.phone(&m1).unwrap(), None);
    assert_eq!(macs(None).len(), 2);
    // Deleting what is not there is no error.
    store.apply(vec![Change::DeletePhone(m1)]).unwrap();
    // Stations and phones do not mix.
    assert!(store.stations().unwrap().is_empty());
}

fn whitelists_default_then_round_trip<P: Place>() {
    let place = P::new();
    let store = place.open();
    assert_eq!(store.whitelists().unwrap(), Whitelists::default());
    store
        .apply(vec![Change::PutWhitelists(whitelists())])
        .unwrap();
    assert_eq!(store.whitelists().unwrap(), whitelists());
    store
        .apply(vec![Change::PutWhitelists(Whitelists::default())])
        .unwrap();
    assert_eq!(store.whitelists().unwrap(), Whitelists::default());
}

fn phone_changes_are_atomic_with_audit<P: Place>() {
    let place = P::new();
    let store = place.open();
    let stored = store
        .apply(vec![
            Change::PutPhone(phone("000000000001", "default")),
            Change::PutWhitelists(whitelists()),
            Change::Audit(record("default", "createPhone")),
        ])
        .unwrap();
    assert_eq!(stored[0].seq, 1);

    // A batch with a phone that cannot be encoded stores nothing at all.
    let mut bad = phone("000000000002", "default");
    bad.updated_at = T0.to_offset(time::UtcOffset::from_hms(0, 0, 30).unwrap());
    let result = store.apply(vec![
        Change::DeletePhone(Mac::parse("000000000001").unwrap()),
        Change::PutWhitelists(Whitelists::default()),
        Change::Audit(record("default", "deletePhone")),
        Change::PutPhone(bad),
    ]);
    assert!(matches!(result, Err(StoreError::Encode(_))), "{result:?}");
    assert_eq!(
        store.phones(None).unwrap(),
        vec![phone("000000000001", "default")]
    );
    assert_eq!(store.whitelists().unwrap(), whitelists());
    assert_eq!(store.audit("default", 10).unwrap().len(), 1);
}

fn reopen_keeps_phones_and_whitelists<P: Place>() {
    let place = P::new();
    let store = reopened(
        &place,
        vec![
            Change::PutPhone(phone("000000000001", "default")),
            Change::PutWhitelists(whitelists()),
            Change::PutStation(station("S1")),
        ],
    );
    assert_eq!(
        store.phones(Some("default")).unwrap(),
        vec![phone("000000000001", "default")]
    );
    assert_eq!(store.whitelists().unwrap(), whitelists());
    assert_eq!(store.stations().unwrap(), vec![station("S1")]);
}
