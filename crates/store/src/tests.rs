//! The store's test suite, run on both engines (`engine_tests!` instantiates every test per
//! engine).

use super::engine::{self, Batch, Kind};
use super::index::IndexBatch;
use super::*;
use serde_json::json;
use thali_doc::RevTree;

/// A directory removed at drop.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("thali-store-{tag}-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(dir: &Dir, kind: Kind) -> Store {
    Store::open(
        &dir.0,
        &Options {
            engine: Some(kind),
            cache_bytes: 8 << 20,
            ..Default::default()
        },
    )
    .unwrap()
}

fn info(seq: u64, rev: &str) -> DocInfo {
    let mut tree = RevTree::default();
    let (n, hash) = rev.split_once('-').unwrap();
    tree.merge_path(n.parse().unwrap(), &[hash.to_string()], false);
    DocInfo {
        tree,
        seq,
        current: Some((
            rev.to_string(),
            RevBody {
                body: json!({"n": seq}).as_object().unwrap().clone(),
                ..Default::default()
            },
        )),
    }
}

/// Writes documents `d000`..`d{n}` one batch each (seq = index + 1), durably.
async fn fill(db: &DbStore, n: u64) {
    for i in 0..n {
        let id = format!("d{i:03}");
        let inf = info(i + 1, "1-a");
        let mut b = WriteBatch::new();
        b.put_doc_info(&id, &inf);
        b.put_seq(i + 1, &SeqEntry::of(&id, &inf.tree));
        b.put_meta("update_seq", &(i + 1));
        let t = db.apply(b).unwrap();
        db.durable(t).await.unwrap();
    }
}

async fn documents_ranges_and_changes(kind: Kind) {
    let dir = Dir::new("docs");
    let store = open(&dir, kind);
    let db = store.open_database("db", true).unwrap().unwrap();
    fill(&db, 20).await;
    let ids = |it: Vec<(String, DocInfo)>| it.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
    let all: Vec<_> = db
        .docs(None, None, true, false)
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(all.len(), 20);
    assert_eq!(all[3].1.seq, 4);
    let some = db.docs(Some("d005"), Some("d008"), false, false);
    assert_eq!(
        ids(some.map(|r| r.unwrap()).collect()),
        ["d005", "d006", "d007"]
    );
    let desc = db.docs(Some("d008"), Some("d005"), true, true);
    assert_eq!(
        ids(desc.map(|r| r.unwrap()).collect()),
        ["d008", "d007", "d006", "d005"]
    );
    // An inverted range is empty, not an engine panic.
    assert_eq!(db.docs(Some("d009"), Some("d001"), true, false).count(), 0);
    let since: Vec<u64> = db.changes(17, false).map(|r| r.unwrap().0).collect();
    assert_eq!(since, [18, 19, 20]);
    let last = db.changes(0, true).next().unwrap().unwrap();
    assert_eq!((last.0, last.1.id.as_str()), (20, "d019"));
    assert_eq!(db.meta::<u64>("update_seq").unwrap(), Some(20));
    // Local documents by prefix, attachments by digest.
    let mut b = WriteBatch::new();
    b.put_local("\0peer/k/a", &json!({"x": 1}));
    b.put_local("plain", &json!({"y": 2}));
    b.put_att("md5-x", b"bytes");
    let t = db.apply(b).unwrap();
    db.durable(t).await.unwrap();
    assert_eq!(db.locals().count(), 2);
    assert_eq!(db.locals_with_prefix("\0peer/").count(), 1);
    assert_eq!(db.att("md5-x").unwrap().unwrap(), b"bytes");
    assert!(!db.has_att("md5-y").unwrap());
    drop(db);
    drop(store);
    // Everything acknowledged is there after reopening.
    let store = open(&dir, kind);
    let db = store.open_database("db", false).unwrap().unwrap();
    assert_eq!(db.docs(None, None, true, false).count(), 20);
    assert_eq!(db.local("plain").unwrap(), Some(json!({"y": 2})));
}

async fn catalog_create_list_drop(kind: Kind) {
    let dir = Dir::new("catalog");
    let store = open(&dir, kind);
    assert!(store.open_database("a", false).unwrap().is_none());
    let a = store.open_database("a", true).unwrap().unwrap();
    store.open_database("b/c", true).unwrap().unwrap();
    fill(&a, 50).await;
    assert_eq!(store.list_databases().unwrap(), ["a", "b/c"]);
    assert!(store.database_exists("b/c").unwrap());
    a.index("sig1").unwrap();
    assert_eq!(a.index_sigs().unwrap(), ["sig1"]);
    drop(a);
    assert!(store.drop_database("a").unwrap());
    assert!(!store.drop_database("a").unwrap());
    assert_eq!(store.list_databases().unwrap(), ["b/c"]);
    // Nothing of `a` is left among the engine's keyspaces, its index included.
    let left = store.inner.engine.keyspaces().unwrap();
    assert!(left.iter().all(|k| !k.starts_with("db1.")), "{left:?}");
    // A database created again under the same name starts empty.
    let a = store.open_database("a", true).unwrap().unwrap();
    assert_eq!(a.docs(None, None, true, false).count(), 0);
    assert!(a.index_sigs().unwrap().is_empty());
}

async fn compaction_generations(kind: Kind) {
    let dir = Dir::new("gen");
    let store = open(&dir, kind);
    let old = store.open_database("db", true).unwrap().unwrap();
    fill(&old, 30).await;
    let next = old.next_generation().unwrap();
    let mut b = WriteBatch::new();
    b.put_doc_info("kept", &info(31, "2-b"));
    next.apply(b).unwrap();
    assert!(next.doc_info("kept").unwrap().is_some());
    let reader = old.clone();
    let new = next.commit(&old).unwrap();
    drop(old);
    // A reader holding the old generation keeps reading it until it lets go.
    assert_eq!(reader.docs(None, None, true, false).count(), 30);
    drop(reader);
    assert_eq!(new.docs(None, None, true, false).count(), 1);
    let names = store.inner.engine.keyspaces().unwrap();
    assert!(!names.contains(&"db1.g1".to_string()), "{names:?}");
    drop(new);
    drop(store);
    let store = open(&dir, kind);
    let db = store.open_database("db", false).unwrap().unwrap();
    assert_eq!(db.docs(None, None, true, false).count(), 1);
    // A generation abandoned half-way is dropped, not left behind.
    let next = db.next_generation().unwrap();
    next.apply(WriteBatch::new()).unwrap();
    drop(next);
    let names = store.inner.engine.keyspaces().unwrap();
    assert!(!names.contains(&"db1.g3".to_string()), "{names:?}");
}

async fn orphans_are_dropped_at_open(kind: Kind) {
    let dir = Dir::new("orphans");
    {
        let store = open(&dir, kind);
        store.open_database("db", true).unwrap().unwrap();
        // What a crash between the steps of a compaction or a deletion leaves.
        let e = &store.inner.engine;
        let stray = e.keyspace("db1.g7").unwrap();
        let gone = e.keyspace("db9.g1").unwrap();
        let mut b = Batch::default();
        b.put(&stray, b"k".to_vec(), b"v".to_vec());
        b.put(&gone, b"k".to_vec(), b"v".to_vec());
        e.commit(b).unwrap();
        e.persist().unwrap();
    }
    let store = open(&dir, kind);
    let mut names = store.inner.engine.keyspaces().unwrap();
    names.sort();
    assert_eq!(names, ["db1.g1", "node"]);
}

async fn batches_span_keyspaces_atomically(kind: Kind) {
    let dir = Dir::new("batch");
    let store = open(&dir, kind);
    let e = &store.inner.engine;
    let (x, y) = (e.keyspace("x").unwrap(), e.keyspace("y").unwrap());
    let mut b = Batch::default();
    b.put(&x, b"1".to_vec(), b"a".to_vec());
    b.put(&y, b"1".to_vec(), b"b".to_vec());
    b.del(&x, b"2".to_vec());
    e.commit(b).unwrap();
    assert_eq!(&*x.get(b"1").unwrap().unwrap(), b"a");
    assert_eq!(&*y.get(b"1").unwrap().unwrap(), b"b");
    let rev: Vec<Vec<u8>> = x
        .range(std::ops::Bound::Unbounded, std::ops::Bound::Unbounded, true)
        .map(|r| r.unwrap().0.to_vec())
        .collect();
    assert_eq!(rev, [b"1".to_vec()]);
}

async fn view_indexes(kind: Kind) {
    let dir = Dir::new("index");
    let store = open(&dir, kind);
    let db = store.open_database("db", true).unwrap().unwrap();
    let idx = db.index("s").unwrap();
    let mut b = IndexBatch::default();
    let k1 = index::row_key(0, b"a", "d1", 0);
    let k2 = index::row_key(0, b"b", "d2", 0);
    b.put_row(&k1, b"[1]");
    b.put_row(&k2, b"[2]");
    b.set_doc_rows("d1", std::slice::from_ref(&k1));
    b.set_count(0, 2);
    b.set_seq(9);
    idx.apply(b).unwrap();
    idx.flush().unwrap();
    assert_eq!(idx.seq().unwrap(), 9);
    assert_eq!(idx.count(0).unwrap(), 2);
    assert_eq!(idx.doc_rows("d1").unwrap(), std::slice::from_ref(&k1));
    let lo = std::ops::Bound::Included(index::view_prefix(0));
    let hi = engine::prefix_end(&index::view_prefix(0));
    let rows: Vec<Vec<u8>> = idx
        .rows(lo.clone(), hi.clone(), true)
        .map(|r| r.unwrap().1.to_vec())
        .collect();
    assert_eq!(rows, [b"[2]".to_vec(), b"[1]".to_vec()]);
    assert_eq!(idx.count_range(lo, hi), 2);
    drop(idx);
    db.drop_index("s").unwrap();
    assert!(db.index_sigs().unwrap().is_empty());
    assert_eq!(db.index("s").unwrap().seq().unwrap(), 0);
}

async fn migrate_there_and_back(kind: Kind) {
    let other = match kind {
        Kind::Fjall => Kind::Sled,
        Kind::Sled => Kind::Fjall,
    };
    let dir = Dir::new("migrate");
    {
        let store = open(&dir, kind);
        store.set_node_meta("uuid", &"u-1").unwrap();
        let db = store.open_database("db", true).unwrap().unwrap();
        fill(&db, 40).await;
        let idx = db.index("s").unwrap();
        let mut b = IndexBatch::default();
        b.set_seq(40);
        idx.apply(b).unwrap();
        idx.flush().unwrap();
    }
    let r = migrate::migrate(&dir.0, other, 8 << 20).unwrap();
    assert_eq!(r.from, Some(kind));
    assert!(r.entries > 40 * 2, "{r:?}");
    assert_eq!(recorded_engine(&dir.0).unwrap(), Some(other));
    assert!(!dir.0.join(kind.name()).exists());
    // The old engine is refused by name; the new one opens with everything.
    let e = Store::open(
        &dir.0,
        &Options {
            engine: Some(kind),
            cache_bytes: 8 << 20,
            ..Default::default()
        },
    );
    assert!(matches!(e, Err(StoreError::Config(_))));
    let store = open(&dir, other);
    assert_eq!(
        store.node_meta::<String>("uuid").unwrap().as_deref(),
        Some("u-1")
    );
    let db = store.open_database("db", false).unwrap().unwrap();
    assert_eq!(db.docs(None, None, true, false).count(), 40);
    assert_eq!(db.changes(0, false).count(), 40);
    assert_eq!(db.index("s").unwrap().seq().unwrap(), 40);
    drop(db);
    drop(store);
    // And back again.
    migrate::migrate(&dir.0, kind, 8 << 20).unwrap();
    let store = open(&dir, kind);
    let db = store.open_database("db", false).unwrap().unwrap();
    assert_eq!(db.docs(None, None, true, false).count(), 40);
    // Migrating to the engine already in use is refused.
    drop(db);
    drop(store);
    assert!(migrate::migrate(&dir.0, kind, 8 << 20).is_err());
}

macro_rules! engine_tests {
    ($($name:ident),* $(,)?) => {
        mod fjall {
            $(#[tokio::test] async fn $name() { super::$name(super::Kind::Fjall).await })*
        }
        mod sled {
            $(#[tokio::test] async fn $name() { super::$name(super::Kind::Sled).await })*
        }
    };
}

engine_tests!(
    documents_ranges_and_changes,
    catalog_create_list_drop,
    compaction_generations,
    orphans_are_dropped_at_open,
    batches_span_keyspaces_atomically,
    view_indexes,
    migrate_there_and_back,
);

#[test]
fn a_data_directory_keeps_its_engine() {
    let dir = Dir::new("record");
    drop(open(&dir, Kind::Sled));
    // No engine asked: the recorded one.
    let s = Store::open(&dir.0, &Options::default()).unwrap();
    assert_eq!(s.engine_kind(), Kind::Sled);
    drop(s);
    match Store::open(
        &dir.0,
        &Options {
            engine: Some(Kind::Fjall),
            cache_bytes: 8 << 20,
            ..Default::default()
        },
    ) {
        Err(StoreError::Config(m)) => assert!(m.contains("thali migrate"), "{m}"),
        _ => panic!("opened a sled directory as fjall"),
    }
    // The layout of older versions is named, not misread.
    let old = Dir::new("legacy");
    std::fs::create_dir_all(old.0.join("dbs/db/g1")).unwrap();
    assert!(matches!(
        Store::open(&old.0, &Options::default()),
        Err(StoreError::Config(_))
    ));
}
