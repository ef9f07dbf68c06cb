//! The soak's short run (the test command's): `thali-soak` for 60 s with samples every 10 s.
//! It exits non-zero on any unexpected answer, on nodes that do not converge, or on no samples;
//! its figures are printed (`cargo test --test soak -- --nocapture`). The 30-minute run is
//! `cargo run --release -p thali-tests --bin thali-soak`.

#[test]
fn a_short_soak_has_no_errors_and_converges() {
    // stderr is inherited: the nodes' logs go there, and a pipe they hold would keep
    // `wait_with_output` waiting if one outlived the soak.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thali-soak"))
        .args(["--seconds", "60", "--sample-secs", "10"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .and_then(|c| c.wait_with_output())
        .expect("run thali-soak");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "thali-soak failed:\n{text}");
    assert!(text.contains("identical"), "{text}");
    assert!(text.contains(" 0 unexpected answers"), "{text}");
}
