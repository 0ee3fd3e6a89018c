//! `pairstyle bench perf --vs-reference`: run the PyTorch reference
//! (`tools/reference/bench_reference.py`) as a child process, read its table, and print the
//! ratios ours/reference with the goals of the performance issue (issue 7).
//!
//! Both programs print the same markdown table (see [`super::perf_table`]):
//! `| case | s | × plain CFG step | peak RSS MiB | latent | GFLOP | GFLOP/s | % of peak |`, preceded by a
//! `# machine peak: X GFLOP/s …` line. Rows are matched by what they measure (training iteration,
//! plain CFG step, N-style step), not by their exact wording, since the reference describes its
//! style-guided steps differently.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// The header every `bench perf` table starts with (ours and the reference's).
pub const TABLE_HEADER: &str =
    "| case | s | × plain CFG step | peak RSS MiB | latent | GFLOP | GFLOP/s | % of peak |";

/// The same table on a GPU, where the memory column is peak device memory
/// ([`super::device_mem`]).
pub const TABLE_HEADER_DEVICE: &str =
    "| case | s | × plain CFG step | peak device MiB | latent | GFLOP | GFLOP/s | % of peak |";

/// The prefix of the line giving the measured machine peak.
pub const PEAK_PREFIX: &str = "# machine peak:";

/// One row of a `bench perf` table.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfRow {
    /// The case as printed.
    pub case: String,
    /// Median seconds.
    pub seconds: f64,
    /// Peak RSS in MiB (NaN if not given).
    pub peak_mib: f64,
    /// GFLOP the case needs, if printed.
    pub gflop: Option<f64>,
    /// Percentage of the machine peak achieved, if printed.
    pub percent_of_peak: Option<f64>,
}

/// A parsed `bench perf` output.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfReport {
    /// Measured machine peak in GFLOP/s, if printed.
    pub peak_gflops: Option<f64>,
    /// The table's rows in order.
    pub rows: Vec<PerfRow>,
}

/// What a row measures, for matching ours against the reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CaseKey {
    /// A training iteration (content + style step).
    Train,
    /// A plain CFG sampling step (batch 2).
    Plain,
    /// A style-guided step with this many styles.
    Styles(usize),
    /// The reference's optional one-forward PEFT mixed-adapter variant of an N-style step.
    StylesMixed(usize),
    /// Anything else (matched by exact text).
    Other(String),
}

/// Classify a case label.
pub fn case_key(case: &str) -> CaseKey {
    if case.starts_with("training") {
        return CaseKey::Train;
    }
    if case.contains("plain CFG") {
        return CaseKey::Plain;
    }
    if let Some(i) = case.find(" style(s)") {
        let digits: String = case[..i]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if let Ok(n) = digits.parse() {
            return if case.contains("mixed-adapter") {
                CaseKey::StylesMixed(n)
            } else {
                CaseKey::Styles(n)
            };
        }
    }
    CaseKey::Other(case.to_string())
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

fn number(cell: Option<&String>) -> Option<f64> {
    cell.and_then(|c| c.trim_end_matches('%').trim().parse::<f64>().ok())
}

/// Parse the first `| case | s | …` table of a `bench perf` (or older `bench cost`) output and
/// its `# machine peak:` line. Columns are found by their header names.
pub fn parse_report(text: &str) -> Result<PerfReport> {
    let mut peak_gflops = None;
    let mut header: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix(PEAK_PREFIX) {
            peak_gflops = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok());
            continue;
        }
        match &header {
            None => {
                if line.starts_with("| case | s |") {
                    header = Some(cells(line));
                }
            }
            Some(h) => {
                if !line.starts_with('|') {
                    break;
                }
                let c = cells(line);
                if c.first()
                    .is_some_and(|v| !v.is_empty() && v.chars().all(|x| x == '-'))
                {
                    continue;
                }
                let col = |name: &str| h.iter().position(|x| x == name).and_then(|i| c.get(i));
                let case = c.first().cloned().unwrap_or_default();
                let seconds = number(col("s")).ok_or_else(|| {
                    Error::Reference(format!("row {case:?} has no number in its `s` column"))
                })?;
                rows.push(PerfRow {
                    case,
                    seconds,
                    peak_mib: number(col("peak RSS MiB"))
                        .or_else(|| number(col("peak device MiB")))
                        .unwrap_or(f64::NAN),
                    gflop: number(col("GFLOP")),
                    percent_of_peak: number(col("% of peak")),
                });
            }
        }
    }
    if rows.is_empty() {
        return Err(Error::Reference(
            "no `| case | s | …` table with rows in the output".into(),
        ));
    }
    Ok(PerfReport { peak_gflops, rows })
}

fn fmt(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        String::new()
    }
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| fmt(v, digits)).unwrap_or_default()
}

/// The ours/reference table with the goals, followed by `#` notes (machine peaks, and
/// whether the two FLOP counts agree).
pub fn ratio_table(ours: &PerfReport, reference: &PerfReport) -> String {
    let find = |k: &CaseKey| ours.rows.iter().find(|r| &case_key(&r.case) == k);
    let plain = find(&CaseKey::Plain).map(|r| r.seconds);
    let mut out = String::new();
    out.push_str("## ours / reference\n");
    out.push_str(
        "| case | ours s | reference s | time ours/ref | ours peak MiB | reference peak MiB \
         | memory ours/ref | ours % of peak | reference % of peak | goal (issue 7) |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let mut flop_notes = Vec::new();
    for r in &reference.rows {
        let key = case_key(&r.case);
        let ours_key = match &key {
            CaseKey::StylesMixed(n) => CaseKey::Styles(*n),
            k => k.clone(),
        };
        let Some(o) = find(&ours_key) else {
            out.push_str(&format!(
                "| {} | — | {:.3} | — | — | {} | — | — | {} | |\n",
                r.case,
                r.seconds,
                fmt(r.peak_mib, 0),
                opt(r.percent_of_peak, 1)
            ));
            continue;
        };
        let t = o.seconds / r.seconds;
        let mem = o.peak_mib / r.peak_mib;
        let goal = match &key {
            CaseKey::Train => format!(
                "time ≤ 1.0× and memory ≤ 1.0×: {}",
                if t <= 1.0 && mem <= 1.0 {
                    "met"
                } else {
                    "missed"
                }
            ),
            CaseKey::Plain => {
                format!("time ≤ 1.0×: {}", if t <= 1.0 { "met" } else { "missed" })
            }
            CaseKey::Styles(n) => match plain {
                Some(p) if p > 0.0 => {
                    let own = o.seconds / p;
                    let bound = (2 + n) as f64 / 2.0;
                    format!(
                        "ours {own:.2}× our plain CFG step ≤ {bound:.1}×: {}",
                        if own <= bound { "met" } else { "missed" }
                    )
                }
                _ => String::new(),
            },
            _ => String::new(),
        };
        let label = if matches!(key, CaseKey::StylesMixed(_)) {
            format!("{} [vs our batched step]", r.case)
        } else {
            r.case.clone()
        };
        out.push_str(&format!(
            "| {label} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} | {goal} |\n",
            o.seconds,
            r.seconds,
            fmt(t, 2),
            fmt(o.peak_mib, 0),
            fmt(r.peak_mib, 0),
            fmt(mem, 2),
            opt(o.percent_of_peak, 1),
            opt(r.percent_of_peak, 1),
        ));
        if let (Some(a), Some(b)) = (o.gflop, r.gflop) {
            if !matches!(key, CaseKey::StylesMixed(_)) {
                let rel = if a > 0.0 { (b - a).abs() / a } else { 0.0 };
                flop_notes.push((r.case.clone(), a, b, rel));
            }
        }
    }
    out.push_str(&format!(
        "# machine peak (f32 GEMM 1024³): ours {} GFLOP/s, reference {} GFLOP/s\n",
        opt(ours.peak_gflops, 1),
        opt(reference.peak_gflops, 1)
    ));
    if !flop_notes.is_empty() {
        let worst = flop_notes.iter().map(|n| n.3).fold(0.0f64, |a, b| a.max(b));
        if worst <= 0.005 {
            out.push_str(&format!(
                "# FLOPs: our analytic count and the reference's hook count agree within {:.2} % on every row\n",
                worst * 100.0
            ));
        } else {
            for (case, a, b, rel) in flop_notes.iter().filter(|n| n.3 > 0.005) {
                out.push_str(&format!(
                    "# FLOPs differ on {case}: ours {a:.3} GFLOP, reference counted {b:.3} GFLOP ({:.1} %)\n",
                    rel * 100.0
                ));
            }
        }
    }
    out
}

/// How to run the reference script.
#[derive(Debug, Clone)]
pub struct ReferenceCommand {
    /// The Python interpreter.
    pub python: PathBuf,
    /// `bench_reference.py`.
    pub script: PathBuf,
    /// Its arguments (`--model`/`--size`, `--latent`, …, `--threads N`).
    pub args: Vec<String>,
    /// Thread count, also put into `OMP_NUM_THREADS`/`MKL_NUM_THREADS`/`OPENBLAS_NUM_THREADS`.
    pub threads: usize,
}

/// Run the reference and return its standard output (its standard error goes to ours, so its
/// progress and warnings show). Errors name the missing interpreter or script, or the exit status.
pub fn run_reference(cmd: &ReferenceCommand) -> Result<String> {
    if !cmd.script.is_file() {
        return Err(Error::Reference(format!(
            "reference script {} not found (pass --reference-script PATH; it lives in \
             tools/reference/ of the source tree)",
            cmd.script.display()
        )));
    }
    let t = cmd.threads.to_string();
    let mut child = Command::new(&cmd.python)
        .arg(&cmd.script)
        .args(&cmd.args)
        .env("OMP_NUM_THREADS", &t)
        .env("MKL_NUM_THREADS", &t)
        .env("OPENBLAS_NUM_THREADS", &t)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            Error::Reference(format!(
                "cannot start the Python interpreter {}: {e} (pass --python PATH or set PYTHON; \
                 the reference needs the packages in tools/reference/requirements.txt)",
                cmd.python.display()
            ))
        })?;
    let mut stdout = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut stdout)
            .map_err(|e| Error::Reference(format!("reading the reference's output: {e}")))?;
    }
    let status = child
        .wait()
        .map_err(|e| Error::Reference(format!("waiting for the reference: {e}")))?;
    if !status.success() {
        return Err(Error::Reference(format!(
            "{} {} exited with {status} (its error output is above){}",
            cmd.python.display(),
            cmd.script.display(),
            if stdout.trim().is_empty() {
                String::new()
            } else {
                format!("; its output:\n{stdout}")
            }
        )));
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "\
# tiny; latent 8x8
# machine peak: 100.0 GFLOP/s (f32 GEMM 1024×1024×1024, candle, best of 10, 2 threads)
| case | s | × plain CFG step | peak RSS MiB | latent | GFLOP | GFLOP/s | % of peak |
|---|---|---|---|---|---|---|---|
| training iteration (content + style step), rank 4 | 2.000 |  | 800 | 8 | 10.000 | 5.0 | 5.0 |
| sampling step, plain CFG (batch 2) | 1.000 | 1.00 | 400 | 8 | 4.000 | 4.0 | 4.0 |
| sampling step, 2 style(s) (batch 4) | 2.500 | 2.50 | 500 | 8 | 8.100 | 3.2 | 3.2 |
";

    const REFERENCE: &str = "\
# reference
# machine peak: 200.0 GFLOP/s (f32 GEMM 1024×1024×1024, torch.matmul, best of 10, 2 threads)
| case | s | × plain CFG step | peak RSS MiB | latent | GFLOP | GFLOP/s | % of peak |
|---|---|---|---|---|---|---|---|
| training iteration (content + style step), rank 4 | 1.000 |  | 1000 | 8 | 10.000 | 10.0 | 5.0 |
| sampling step, plain CFG (batch 2) | 0.500 | 1.00 | 800 | 8 | 4.000 | 8.0 | 4.0 |
| sampling step, 2 style(s) (reference: batch-2 base pass + 2 batch-1 style pass(es)) | 1.000 | 2.00 | 800 | 8 | 8.100 | 8.1 | 4.1 |
| sampling step, 2 style(s) (batch 4, PEFT mixed-adapter batch, one forward) | 0.800 | 1.60 | 800 | 8 | 8.100 | 10.1 | 5.1 |

| case (memory detail) | RSS before case MiB | VmHWM since reset MiB | ru_maxrss MiB |
";

    #[test]
    fn keys_match_ours_and_the_reference_wording() {
        assert_eq!(
            case_key("training iteration (content + style step), rank 4"),
            CaseKey::Train
        );
        assert_eq!(
            case_key("sampling step, plain CFG (batch 2)"),
            CaseKey::Plain
        );
        assert_eq!(
            case_key("sampling step, 12 style(s) (batch 14)"),
            CaseKey::Styles(12)
        );
        assert_eq!(
            case_key("sampling step, 2 style(s) (batch 4, PEFT mixed-adapter batch, one forward)"),
            CaseKey::StylesMixed(2)
        );
    }

    #[test]
    fn parses_the_table_and_the_peak() {
        let r = parse_report(REFERENCE).expect("parses");
        assert_eq!(r.peak_gflops, Some(200.0));
        assert_eq!(r.rows.len(), 4, "stops at the end of the first table");
        assert_eq!(r.rows[1].seconds, 0.5);
        assert_eq!(r.rows[1].peak_mib, 800.0);
        assert_eq!(r.rows[2].gflop, Some(8.1));
        assert_eq!(r.rows[3].percent_of_peak, Some(5.1));
        assert!(parse_report("no table here\n").is_err());
        assert!(parse_report("| case | s |\n|---|---|\n| x | oops |\n").is_err());
    }

    #[test]
    fn ratios_and_goals() {
        let t = ratio_table(
            &parse_report(OURS).expect("ours"),
            &parse_report(REFERENCE).expect("reference"),
        );
        assert!(t.contains("| 2.000 | 1.000 | 2.00 | 800 | 1000 | 0.80 | 5.0 | 5.0 | time ≤ 1.0× and memory ≤ 1.0×: missed |"), "{t}");
        assert!(t.contains("time ≤ 1.0×: missed"), "{t}");
        assert!(
            t.contains("ours 2.50× our plain CFG step ≤ 2.0×: missed"),
            "{t}"
        );
        assert!(t.contains("[vs our batched step]"), "{t}");
        assert!(
            t.contains("ours 100.0 GFLOP/s, reference 200.0 GFLOP/s"),
            "{t}"
        );
        assert!(t.contains("agree within 0.00 %"), "{t}");
    }

    #[test]
    fn differing_flop_counts_are_reported() {
        let reference = REFERENCE.replace("| 4.000 | 8.0 |", "| 5.000 | 8.0 |");
        let t = ratio_table(
            &parse_report(OURS).expect("ours"),
            &parse_report(&reference).expect("reference"),
        );
        assert!(
            t.contains("# FLOPs differ on sampling step, plain CFG"),
            "{t}"
        );
    }

    #[test]
    fn a_missing_interpreter_or_script_is_a_clear_error() {
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let cmd = ReferenceCommand {
            python: "/nonexistent/python3".into(),
            script: here.join("tools/reference/bench_reference.py"),
            args: vec![],
            threads: 1,
        };
        let e = run_reference(&cmd).expect_err("no interpreter").to_string();
        assert!(
            e.contains("/nonexistent/python3") && e.contains("--python"),
            "{e}"
        );
        let cmd = ReferenceCommand {
            script: here.join("tools/reference/missing.py"),
            ..cmd
        };
        let e = run_reference(&cmd).expect_err("no script").to_string();
        assert!(
            e.contains("missing.py") && e.contains("--reference-script"),
            "{e}"
        );
    }
}
