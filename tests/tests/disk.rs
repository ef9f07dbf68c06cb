//! A full disk. The node's data directory lives on a tmpfs of 256 MiB that the test mounts
//! (root, as the LAN test), a filler file takes all but a few MiB above the node's reserve
//! (`--min-free-space`), and the node is written to until it refuses: writes, attachments, a
//! view index build and a replication into it answer 507 `insufficient_storage` with a reason;
//! every write it acknowledged reads back (also after a restart); reads go on; and once the
//! filler is deleted the same process takes writes again, builds the view and lets the
//! replication catch up.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use thali_tests::mesh::wait_until;
use thali_tests::{Client, Node, TempDir};

const RESERVE: u64 = 32 << 20;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the full-disk test mounts a tmpfs and must run as root (tests/run-all.sh checks)"
        );
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs failed");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn free_bytes(p: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Leaves `leave` bytes free on the file system of `dir` (a filler file takes the rest).
fn fill_to(dir: &Path, filler: &Path, leave: u64) {
    let free = free_bytes(dir);
    let have = std::fs::metadata(filler).map(|m| m.len()).unwrap_or(0);
    let target = (have + free).saturating_sub(leave);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(filler)
        .unwrap();
    // tmpfs allocates on write, not on set_len: write the bytes.
    use std::io::{Seek, SeekFrom, Write};
    let mut f = f;
    f.seek(SeekFrom::Start(have)).unwrap();
    let chunk = vec![0x5a_u8; 1 << 20];
    let mut at = have;
    while at < target {
        let n = ((target - at) as usize).min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        at += n as u64;
    }
    f.sync_all().unwrap();
}

/// `len` characters that do not compress (the engines compress what they store).
fn noise(seed: usize, len: usize) -> String {
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect()
}

#[test]
fn a_full_disk_refuses_writes_with_507_keeps_reads_and_recovers_when_space_is_freed() {
    thali_tests::require!(thali_tests::needs::Need::Root);
    let tmp = TempDir::new("disk");
    let disk = Tmpfs::mount(&tmp.0.join("disk"), "256m");
    let data = disk.0.join("data");
    let filler = disk.0.join("filler");
    let reserve = RESERVE.to_string();
    let mut node = Node::start_with(&data, &["--min-free-space", &reserve]);
    // A source on the ordinary disk, to replicate into the full node.
    let src_dir = TempDir::new("disk-src");
    let src = Node::start(&src_dir.0);
    assert_eq!(src.put("/src", &json!({})).status, 201);
    let put_src = |from: usize| {
        for i in from..from + 20 {
            assert_eq!(src.put(&format!("/src/s{i}"), &json!({"i": i})).status, 201);
        }
    };
    put_src(0);

    assert_eq!(node.put("/d", &json!({})).status, 201);
    assert_eq!(node.put("/r", &json!({})).status, 201);
    let ddoc = json!({"views": {"v": {"map": "function(doc){ if (doc.i !== undefined) emit(doc.i, null); }"}}});
    assert_eq!(node.put("/d/_design/v", &ddoc).status, 201);
    // A continuous replication into the node, running before the disk fills.
    let live = node.post(
        "/_replicator",
        &json!({"_id": "live", "source": format!("{}/src", src.url()), "target": "r", "continuous": true}),
    );
    assert_eq!(live.status, 201, "{}", live.text());
    wait_until("the live replication's first 20 documents", || {
        node.get("/r").json()["doc_count"] == 20
    });

    // All but 6 MiB above the reserve taken: ~90 documents of 64 KiB fit.
    fill_to(&data, &filler, RESERVE + (6 << 20));
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..2000 {
        let r = node.put(
            &format!("/d/doc{i}"),
            &json!({"i": i, "pad": noise(i, 64 << 10)}),
        );
        if r.status == 201 {
            acked.push(i);
            continue;
        }
        refused = Some(r);
        break;
    }
    let refused = refused.expect("the node never refused a write on a full disk");
    refused.assert_error(507, "insufficient_storage");
    let reason = refused.json()["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("disk is full"), "{reason}");
    assert!(!acked.is_empty(), "nothing fit before the disk was full");
    println!(
        "{} documents of 64 KiB acknowledged before 507; reason: {reason}",
        acked.len()
    );

    // Every kind of write refuses the same way, and the view's index cannot be built.
    node.post(
        "/d/_bulk_docs",
        &json!({"docs": [{"_id": "b1", "pad": noise(9999, 64 << 10)}]}),
    )
    .assert_error(507, "insufficient_storage");
    node.raw(
        "PUT",
        "/d/att/file.bin",
        &[("Content-Type", "application/octet-stream")],
        Some(&vec![7u8; 1 << 20]),
    )
    .assert_error(507, "insufficient_storage");
    node.get("/d/_design/v/_view/v?limit=1")
        .assert_error(507, "insufficient_storage");
    // The replication target: what arrives now cannot be written; the job says why and
    // retries (backoff), it does not skip the documents.
    put_src(20);
    wait_until("the live replication to report the full disk", || {
        let jobs = node.get("/_scheduler/jobs").json();
        jobs.to_string().contains("disk is full")
    });
    assert_eq!(node.get("/r").json()["doc_count"], 20);
    // A new `_replicator` document is itself a write the full disk refuses.
    node.post(
        "/_replicator",
        &json!({"_id": "in", "source": format!("{}/src", src.url()), "target": "r2"}),
    )
    .assert_error(507, "insufficient_storage");

    // Reads go on: every acknowledged document is there, whole.
    let all = node.get("/d/_all_docs").json();
    assert_eq!(all["total_rows"], acked.len() + 1, "{}", all["total_rows"]);
    for i in &acked {
        let r = node.get(&format!("/d/doc{i}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["pad"].as_str(), Some(noise(*i, 64 << 10).as_str()));
    }
    assert_eq!(node.get("/d").status, 200);
    assert_eq!(node.get("/_up").status, 200);

    // A one-shot replication into the full node fails with the reason, not silently.
    let t = Instant::now();
    let one = node.post(
        "/_replicate",
        &json!({"source": format!("{}/src", src.url()), "target": "r", "max_attempts": 2}),
    );
    assert!(one.status >= 500, "{} {}", one.status, one.text());
    assert!(one.text().contains("disk is full"), "{}", one.text());
    assert_eq!(node.get("/r").json()["doc_count"], 20);
    println!(
        "one-shot replication into the full node failed after {:?}",
        t.elapsed()
    );

    // Space is freed: the same process takes writes again.
    std::fs::remove_file(&filler).unwrap();
    let r = node.put("/d/after", &json!({"i": -1}));
    assert_eq!(r.status, 201, "{}", r.text());
    let view = node.get("/d/_design/v/_view/v");
    assert_eq!(view.status, 200, "{}", view.text());
    assert_eq!(view.json()["total_rows"], acked.len() + 1);
    wait_until(
        "the live replication to catch up once space is freed",
        || node.get("/r").json()["doc_count"] == 40,
    );

    // Nothing acknowledged was lost: a restart reads every acknowledged document.
    node.stop();
    node.restart();
    let ids = acked
        .iter()
        .map(|i| format!("doc{i}"))
        .chain(["after".to_string()]);
    for id in ids {
        assert_eq!(node.get(&format!("/d/{id}")).status, 200, "{id}");
    }
    let info: Value = node.get("/d").json();
    assert_eq!(info["doc_count"], acked.len() + 2, "{info}");
}
