//! `pairstyle bench perf` on the tiny fixture: the table has its columns and sane positive
//! numbers (no timing assertions), and `--vs-reference` runs a reference, reads its table and
//! prints the ratios. These tests never need Python: the "reference" is a shell script that
//! prints a canned table and records the arguments it was given.

mod common;

use std::path::Path;

use pairstyle::bench::compare::{parse_report, TABLE_HEADER};

fn bin() -> std::process::Command {
    common::pairstyle_cmd("../../config/pairstyle.toml")
}

fn tiny_args(extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "bench".to_string(),
        "perf".to_string(),
        "--model".to_string(),
        common::fixture("tiny-sd15").display().to_string(),
        "--latent".to_string(),
        "8".to_string(),
        "--rank".to_string(),
        "2".to_string(),
        "--reps".to_string(),
        "1".to_string(),
        "--threads".to_string(),
        "1".to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn perf_table_has_every_column_with_positive_numbers() {
    let o = bin()
        .args(tiny_args(&["--styles", "0,2"]))
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains(TABLE_HEADER), "{stdout}");
    assert!(stdout.contains("threads 1"), "{stdout}");
    let report = parse_report(&stdout).expect("our own table parses");
    let peak = report.peak_gflops.expect("machine peak line");
    assert!(peak.is_finite() && peak > 0.0, "peak {peak}");
    assert_eq!(report.rows.len(), 3, "{stdout}");
    let cases: Vec<&str> = report.rows.iter().map(|r| r.case.as_str()).collect();
    assert!(cases[0].starts_with("training iteration"), "{cases:?}");
    assert!(cases[1].contains("plain CFG (batch 2)"), "{cases:?}");
    assert!(cases[2].contains("2 style(s) (batch 4)"), "{cases:?}");
    for r in &report.rows {
        assert!(r.seconds > 0.0, "{r:?}");
        assert!(r.peak_mib > 0.0, "{r:?}");
        let g = r.gflop.expect("GFLOP column");
        assert!(g > 0.0 && g < 10.0, "{r:?}");
        let p = r.percent_of_peak.expect("% of peak column");
        assert!(p > 0.0 && p.is_finite(), "{r:?}");
    }
    // Cost grows with the work: 4 branches need more than 2, training more than a forward.
    let g: Vec<f64> = report.rows.iter().filter_map(|r| r.gflop).collect();
    assert!(g[2] > g[1] && g[0] > g[1] / 2.0, "{g:?}");
    // The perf table comes first; the memory detail table after it repeats each case.
    let (perf, memory) = stdout
        .split_once("| case (memory detail) |")
        .expect("memory detail table follows the perf table");
    let is_case = |l: &&str| l.starts_with("| training") || l.starts_with("| sampling");
    for line in perf.lines().filter(is_case) {
        assert_eq!(line.matches('|').count(), 9, "8 columns: {line}");
        assert!(line.contains("| 8 |"), "latent column: {line}");
    }
    let memory_rows: Vec<&str> = memory.lines().filter(is_case).collect();
    assert_eq!(memory_rows.len(), 3, "one memory row per case: {memory}");
    for line in memory_rows {
        let cells: Vec<f64> = line
            .split('|')
            .skip(2)
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        assert_eq!(cells.len(), 3, "start, peak, peak above start: {line}");
        let (start, peak, above) = (cells[0], cells[1], cells[2]);
        assert!(start > 0.0 && peak >= start - 1.0, "{line}");
        assert!((peak - start - above).abs() <= 1.0, "{line}");
    }
}

#[test]
fn sampling_latent_and_no_train_are_honoured() {
    let o = bin()
        .args(tiny_args(&[
            "--styles",
            "0",
            "--no-train",
            "--sample-latent",
            "16",
        ]))
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = parse_report(&stdout).expect("parses");
    assert_eq!(report.rows.len(), 1, "{stdout}");
    assert!(stdout.contains("| 16 |"), "{stdout}");
    assert!(stdout.contains("(sampling 16x16)"), "{stdout}");
}

const CANNED: &str = "\
# reference (canned for the test)
# machine peak: 50.0 GFLOP/s (f32 GEMM 1024×1024×1024, torch.matmul, best of 10, 1 threads)
| case | s | × plain CFG step | peak RSS MiB | latent | GFLOP | GFLOP/s | % of peak |
|---|---|---|---|---|---|---|---|
| training iteration (content + style step), rank 2 | 0.010 |  | 700 | 8 | 0.080 | 8.0 | 16.0 |
| sampling step, plain CFG (batch 2) | 0.005 | 1.00 | 700 | 8 | 0.038 | 7.6 | 15.2 |
| sampling step, 1 style(s) (reference: batch-2 base pass + 1 batch-1 style pass(es)) | 0.008 | 1.60 | 700 | 8 | 0.057 | 7.1 | 14.2 |
";

fn fake_python(dir: &Path) -> std::path::PathBuf {
    let table = dir.join("canned.md");
    std::fs::write(&table, CANNED).expect("write table");
    let py = dir.join("fake-python");
    std::fs::write(
        &py,
        format!(
            "#!/bin/sh\necho \"$@\" > '{}'\necho \"OMP=$OMP_NUM_THREADS\" >> '{}'\ncat '{}'\n",
            dir.join("args.txt").display(),
            dir.join("args.txt").display(),
            table.display()
        ),
    )
    .expect("write script");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    py
}

#[cfg(unix)]
#[test]
fn vs_reference_runs_the_reference_and_prints_ratios() {
    let dir = common::scratch_dir("bench-perf", "vs-reference");
    let py = fake_python(&dir);
    let script = dir.join("bench_reference.py");
    std::fs::write(&script, "# stand-in; the fake interpreter ignores it\n").expect("write");
    let o = bin()
        .args(tiny_args(&["--styles", "0,1", "--vs-reference"]))
        .arg("--python")
        .arg(&py)
        .arg("--reference-script")
        .arg(&script)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    let args = std::fs::read_to_string(dir.join("args.txt")).expect("the reference ran");
    for want in [
        "--model",
        "--latent 8",
        "--sample-latent 8",
        "--rank 2",
        "--reps 1",
        "--styles 0,1",
        "--threads 1",
        "OMP=1",
    ] {
        assert!(args.contains(want), "{want} not passed: {args}");
    }
    assert!(stdout.contains("## ours / reference"), "{stdout}");
    for want in [
        "time ≤ 1.0× and memory ≤ 1.0×:",
        "time ≤ 1.0×:",
        "our plain CFG step ≤ 1.5×:",
        "reference 50.0 GFLOP/s",
    ] {
        assert!(stdout.contains(want), "{want} missing: {stdout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vs_reference_without_python_is_a_clear_error() {
    let o = bin()
        .args(tiny_args(&[
            "--vs-reference",
            "--python",
            "/nonexistent/python3",
        ]))
        .output()
        .expect("runs");
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("/nonexistent/python3") && stderr.contains("--python"),
        "{stderr}"
    );
}
