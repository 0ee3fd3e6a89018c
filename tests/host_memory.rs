//! `engine::device::keep_freed_host_memory`: a large buffer freed by a worker thread is kept for
//! the next one (no fresh, page-faulting pages), and `release_free_host_memory` still hands it
//! back. A plain `main` (harness = false): the allocator settings are process-wide and must come
//! before any thread starts, which the test harness's own threads would break. The same binary
//! re-runs itself with glibc's defaults as the control, so the test fails if the settings do
//! nothing.

use std::process::Command;

/// 128 MiB: above glibc's largest default mmap threshold (32 MiB) and a thread arena's 64 MiB.
const BUFFER: usize = 128 << 20;
const PAGES: i64 = (BUFFER / 4096) as i64;
const CONTROL_ENV: &str = "PAIRSTYLE_HOST_MEMORY_CONTROL";

fn minor_faults() -> i64 {
    // SAFETY: getrusage writes only into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    u.ru_minflt
}

/// Allocate, fill and free one buffer on a worker thread (as the daemon's jobs run); the minor
/// page faults it took.
fn one_job(fill: u8) -> i64 {
    std::thread::spawn(move || {
        let before = minor_faults();
        let buf = vec![fill; BUFFER];
        assert_eq!(buf[BUFFER - 1], fill);
        drop(buf);
        minor_faults() - before
    })
    .join()
    .expect("worker thread")
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    let control = std::env::var_os(CONTROL_ENV).is_some();
    if !control {
        assert!(
            pairstyle::engine::device::keep_freed_host_memory(),
            "glibc refused the settings"
        );
    }
    let _first = one_job(1);
    let second = one_job(2);
    if control {
        // Report to the parent: glibc's defaults map fresh pages for every job.
        println!("faults {second}");
        return;
    }
    let kept = pairstyle::bench::rss_mib();
    assert!(
        second < PAGES / 8,
        "the second job took {second} page faults for {PAGES} pages: the freed buffer was not reused"
    );
    assert!(pairstyle::engine::device::release_free_host_memory());
    let released = pairstyle::bench::rss_mib();
    assert!(
        kept - released >= 100.0,
        "RSS {kept:.0} → {released:.0} MiB: the kept 128 MiB were not handed back"
    );

    let out = Command::new(std::env::current_exe().expect("own path"))
        .env(CONTROL_ENV, "1")
        .output()
        .expect("control run");
    assert!(out.status.success(), "control run failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let control_faults: i64 = text
        .trim()
        .strip_prefix("faults ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("control printed {text:?}"));
    assert!(
        control_faults > PAGES / 2,
        "with glibc's defaults the second job took only {control_faults} faults: the test cannot tell"
    );
    println!(
        "host_memory: second job {second} page faults kept vs {control_faults} with glibc defaults; RSS {kept:.0} → {released:.0} MiB after release"
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    assert!(!pairstyle::engine::device::keep_freed_host_memory());
}
