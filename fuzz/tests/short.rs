//! The short fuzz run of the test command: every target, its seeds and then mutated and
//! generated inputs from a fixed seed. A finding fails the test with its message and the
//! saved input (`fuzz/artifacts/<target>/`); `thali-fuzz <target> --seconds N` runs longer.

use thali_fuzz::driver::{run, Budget};
use thali_fuzz::targets::ALL;

/// Inputs per target: pure parsers take microseconds, HTTP targets about a millisecond.
fn inputs(name: &str) -> u64 {
    match name {
        "doc" | "rev" | "httpkey" | "selector" | "multipart" => 200_000,
        "design" => 1_000,
        _ => 10_000,
    }
}

#[test]
fn every_target_survives_its_short_run() {
    let mut failed = Vec::new();
    for t in ALL {
        let r = run(
            t,
            &Budget {
                inputs: Some(inputs(t.name)),
                time: None,
                seed: 20261202,
            },
        );
        println!("{}", r.line());
        assert!(r.inputs >= inputs(t.name) || !r.findings.is_empty());
        // The inputs reach the paths that accept them, not only the parsers' refusals.
        let answered: u64 = r.statuses.iter().sum();
        if answered > 0 {
            assert!(
                r.statuses[2] * 100 >= answered,
                "{}: too few inputs were accepted: {:?}",
                t.name,
                r.statuses
            );
            assert!(r.statuses[4] > 0, "{}: no input was refused", t.name);
        }
        for f in &r.findings {
            failed.push(format!(
                "{}: {} (input {:?}, saved in {:?})",
                t.name,
                f.message,
                String::from_utf8_lossy(&f.input),
                f.saved
            ));
        }
    }
    thali_fuzz::node::cleanup();
    assert!(failed.is_empty(), "findings:\n{}", failed.join("\n"));
}

/// The driver reports what a target does wrong (it is not a test that cannot fail).
#[test]
fn a_panicking_target_is_a_finding() {
    static BAD: thali_fuzz::Target = thali_fuzz::Target {
        name: "always-panics",
        run: |d| assert!(d.len() > 1_000_000, "too short"),
        seeds: || vec![b"x".to_vec()],
        json: false,
    };
    let r = run(
        &BAD,
        &Budget {
            inputs: Some(3),
            time: None,
            seed: 1,
        },
    );
    assert_eq!(r.findings.len(), 3);
    assert!(
        r.findings[0].message.contains("too short"),
        "{:?}",
        r.findings[0]
    );
}
