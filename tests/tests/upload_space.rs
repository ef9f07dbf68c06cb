//! Uploads that never become an attachment give their disk space back by themselves: one cut
//! halfway (the client goes away) and one refused after it arrived (a stale revision), 96 MiB
//! in all, leave the data directory near its size before them, without `_compact`.

use serde_json::json;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use thali_tests::servers::dir_bytes;
use thali_tests::{admin_auth, Client, Node, TempDir};

/// Bytes that do not compress (the store compresses each 256 KiB chunk on its own, so a
/// repeated MiB of them does not compress either).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn cut_and_refused_uploads_give_their_space_back() {
    let dir = TempDir::new("upload-space");
    let n = Node::start(&dir.0);
    n.put("/u", &json!({}));
    assert_eq!(n.put("/u/doc", &json!({"v": 1})).status, 201);
    std::thread::sleep(Duration::from_secs(1));
    let before = dir_bytes(&dir.0);

    // Cut: 48 MiB of a 64 MiB body, then the client goes away.
    let mut s = TcpStream::connect(n.addr).unwrap();
    write!(
        s,
        "PUT /u/cut/big.bin HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        n.addr,
        admin_auth(),
        64u64 << 20
    )
    .unwrap();
    let mib = noise(7, 1 << 20);
    for _ in 0..48 {
        s.write_all(&mib).unwrap();
    }
    drop(s);

    // Refused: 48 MiB that arrive whole for a revision that is not the document's.
    let body = mib.repeat(48);
    let r = n.raw(
        "PUT",
        "/u/doc/late.bin?rev=1-00000000000000000000000000000000",
        &[("Content-Type", "application/octet-stream")],
        Some(&body),
    );
    r.assert_error(409, "conflict");

    let peak = dir_bytes(&dir.0);
    println!(
        "data directory: {} MiB before, {} MiB after the uploads",
        before >> 20,
        peak >> 20
    );
    let waited = Instant::now();
    let deadline = waited + Duration::from_secs(90);
    loop {
        let now = dir_bytes(&dir.0);
        if now < before + (16 << 20) {
            println!(
                "back to {} MiB after {:.1} s",
                now >> 20,
                waited.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the data directory still holds {} MiB (it held {} MiB before the uploads)",
            now >> 20,
            before >> 20
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Nothing of either upload is readable, and the database is whole.
    assert_eq!(n.get("/u/cut").status, 404);
    assert_eq!(n.get("/u/doc/late.bin").status, 404);
    assert_eq!(n.get("/u/doc").json()["v"], 1);
}
