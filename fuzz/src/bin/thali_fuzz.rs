//! `thali-fuzz <target|all> [--seconds N | --inputs N] [--seed S]`: runs fuzz targets with the
//! mutating driver and prints inputs tried and findings per target. `thali-fuzz list` names
//! them; `thali-fuzz seeds DIR` writes each target's seeds to DIR/<target>/ (AFL's `-i`).

use std::time::Duration;
use thali_fuzz::driver::{self, Budget};
use thali_fuzz::targets::ALL;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: thali-fuzz <target|all|list|seeds DIR> [--seconds N] [--inputs N] [--seed S]";
    let Some(what) = args.first() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse::<u64>().unwrap_or_else(|_| {
                    eprintln!("{name} takes a number, not {v:?}");
                    std::process::exit(2)
                })
            })
    };
    match what.as_str() {
        "list" => {
            for t in ALL {
                println!("{}", t.name);
            }
            return;
        }
        "seeds" => {
            let Some(dir) = args.get(1) else {
                eprintln!("{usage}");
                std::process::exit(2);
            };
            for t in ALL {
                let d = std::path::Path::new(dir).join(t.name);
                std::fs::create_dir_all(&d).expect("create the seeds directory");
                for (i, s) in (t.seeds)().iter().enumerate() {
                    std::fs::write(d.join(format!("seed-{i}")), s).expect("write a seed");
                }
            }
            return;
        }
        _ => {}
    }
    let targets: Vec<_> = if what == "all" {
        ALL.iter().collect()
    } else {
        match thali_fuzz::target(what) {
            Some(t) => vec![t],
            None => {
                eprintln!("no target {what:?}; `thali-fuzz list` names them");
                std::process::exit(2);
            }
        }
    };
    let seconds = flag("--seconds");
    let budget = Budget {
        inputs: flag("--inputs"),
        time: seconds
            .or(if flag("--inputs").is_none() {
                Some(60)
            } else {
                None
            })
            .map(Duration::from_secs),
        seed: flag("--seed").unwrap_or(1),
    };
    let mut findings = 0;
    for t in targets {
        let r = driver::run(t, &budget);
        println!("{}", r.line());
        for f in &r.findings {
            println!("  finding: {}", f.message);
            if let Some(p) = &f.saved {
                println!("    input saved in {}", p.display());
            }
        }
        findings += r.findings.len();
    }
    thali_fuzz::node::cleanup();
    std::process::exit(if findings == 0 { 0 } else { 1 });
}
