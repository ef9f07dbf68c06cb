//! The mutating driver: runs a target on its seeds, then on mutated seeds and generated JSON,
//! for a number of inputs or seconds, catching panics as findings. Deterministic for a given
//! seed, so a finding in CI is found again here.

use crate::{gen, Target};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one input may take before it counts as a hang (the HTTP targets also time out
/// each request on their own).
const SLOW: Duration = Duration::from_secs(10);

pub struct Budget {
    pub inputs: Option<u64>,
    pub time: Option<Duration>,
    pub seed: u64,
}

#[derive(Debug)]
pub struct Finding {
    pub message: String,
    /// Where the input was written (`fuzz/artifacts/<target>/`), if it could be.
    pub saved: Option<PathBuf>,
    pub input: Vec<u8>,
}

#[derive(Debug)]
pub struct Report {
    pub target: &'static str,
    pub inputs: u64,
    pub elapsed: Duration,
    pub slowest: Duration,
    pub findings: Vec<Finding>,
    /// Answers of the in-process node by status class during the run (HTTP targets).
    pub statuses: [u64; 6],
}

impl Report {
    pub fn line(&self) -> String {
        format!(
            "{:<14} {:>8} inputs in {:>6.1} s ({:>6.0}/s), slowest {:>4} ms, {} findings{}",
            self.target,
            self.inputs,
            self.elapsed.as_secs_f64(),
            self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.slowest.as_millis(),
            self.findings.len(),
            if self.statuses.iter().any(|&n| n > 0) {
                format!(
                    "; answers 2xx {} 4xx {} 5xx {}",
                    self.statuses[2], self.statuses[4], self.statuses[5]
                )
            } else {
                String::new()
            }
        )
    }
}

/// The message of the last panic, from whichever thread it happened on.
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

thread_local! {
    /// Set while this thread runs inputs: its panics are findings, not printed as they happen.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// One process-wide hook (tests run in parallel, so swapping hooks per run would race): it
/// records every panic's message and prints those of threads not running inputs.
fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if let Ok(mut m) = LAST_PANIC.lock() {
                *m = info.to_string();
            }
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
}

pub fn run(target: &'static Target, budget: &Budget) -> Report {
    install_hook();
    QUIET.with(|q| q.set(true));
    let report = run_inner(target, budget);
    QUIET.with(|q| q.set(false));
    report
}

fn run_inner(target: &'static Target, budget: &Budget) -> Report {
    let mut rng = StdRng::seed_from_u64(budget.seed);
    let seeds = (target.seeds)();
    let before = crate::node::status_counts();
    let start = Instant::now();
    let mut report = Report {
        target: target.name,
        inputs: 0,
        elapsed: Duration::ZERO,
        slowest: Duration::ZERO,
        findings: Vec::new(),
        statuses: [0; 6],
    };
    loop {
        let done_inputs = budget.inputs.is_some_and(|n| report.inputs >= n);
        let done_time = budget.time.is_some_and(|t| start.elapsed() >= t);
        if done_inputs || done_time || report.findings.len() >= 5 {
            break;
        }
        let input = next_input(target, &seeds, report.inputs, &mut rng);
        let t = Instant::now();
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        let took = t.elapsed();
        report.slowest = report.slowest.max(took);
        report.inputs += 1;
        let message = match outcome {
            Err(_) => Some(
                LAST_PANIC
                    .lock()
                    .map(|m| m.clone())
                    .unwrap_or_else(|_| "panic".into()),
            ),
            Ok(()) if took > SLOW => Some(format!("took {took:?} (hang)")),
            Ok(()) => None,
        };
        if let Some(message) = message {
            let saved = save(target.name, &input);
            report.findings.push(Finding {
                message,
                saved,
                input,
            });
        }
    }
    report.elapsed = start.elapsed();
    let after = crate::node::status_counts();
    report.statuses = std::array::from_fn(|i| after[i] - before[i]);
    report
}

fn next_input(target: &Target, seeds: &[Vec<u8>], n: u64, rng: &mut StdRng) -> Vec<u8> {
    if let Some(seed) = seeds.get(n as usize) {
        return seed.clone();
    }
    let empty = Vec::new();
    let pick = |rng: &mut StdRng| seeds.choose(rng).unwrap_or(&empty).clone();
    let roll = rng.gen_range(0..10);
    if target.json && roll < 3 {
        let seed = pick(rng);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&seed) {
            return serde_json::to_vec(&gen::mutate_json(rng, &v)).unwrap_or(seed);
        }
    }
    if target.json && roll < 5 {
        let v = gen::json(rng, 5);
        let bytes = serde_json::to_vec(&v).unwrap_or_default();
        if roll == 3 {
            let other = pick(rng);
            return gen::mutate(rng, &bytes, &other);
        }
        return bytes;
    }
    let (a, b) = (pick(rng), pick(rng));
    gen::mutate(rng, &a, &b)
}

fn save(target: &str, input: &[u8]) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut h);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("artifacts")
        .join(target);
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("crash-{:016x}", h.finish()));
    std::fs::write(&path, input).ok()?;
    Some(path)
}
