//! One AFL++ binary for every target; `THALI_FUZZ_TARGET` names the one to run.
//! A target's panic (a broken promise) aborts, which AFL records as a crash.

fn main() {
    let name = std::env::var("THALI_FUZZ_TARGET").unwrap_or_default();
    let Some(target) = thali_fuzz::target(&name) else {
        eprintln!("set THALI_FUZZ_TARGET to one of: `thali-fuzz list`");
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        (target.run)(data);
    });
}
