//! `cargo xtask test`: every check the project has, in one command, with a closing
//! "N passed, M failed" line. Each check (fmt, clippy, eBPF build) counts as one test;
//! test binaries contribute their own counts.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{setup, setup_if_needed, step, workspace_root};

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
}

impl Tally {
    fn check(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => self.passed += 1,
            Err(e) => {
                self.failed += 1;
                self.failures.push(format!("{name}: {e:#}"));
            }
        }
    }
}

pub fn run(filter: Option<&str>, all_kernels: bool) -> Result<()> {
    if !setup::is_root() {
        bail!("the integration tests create network namespaces and load BPF: run as root (sudo -E cargo xtask test)");
    }
    setup_if_needed()?;
    let mut tally = Tally::default();

    let fmt = step("cargo fmt --check", || {
        crate::cargo(&["fmt", "--all", "--check"])
    });
    tally.check("cargo fmt --check", fmt);
    let ebpf = step("build eBPF programs", || {
        crate::ebpf_build::build_ebpf(&workspace_root())
            .map(|_| ())
            .map_err(anyhow::Error::msg)
    });
    tally.check("eBPF build", ebpf);
    let clippy = step("cargo clippy (warnings denied)", || {
        crate::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
    });
    tally.check("cargo clippy", clippy);

    step("unit and integration tests", || {
        let mut args = vec!["test", "--no-fail-fast"];
        if let Some(filter) = filter {
            args.extend(["--", filter]);
        }
        run_libtest(&args, &mut tally)
    })
    .ok();

    // The data plane on the oldest supported kernel (Debian's 6.1, no TCX) in a VM.
    let (kernel, what) = if all_kernels {
        (
            crate::vm::KernelChoice::All,
            "VM tests (Debian 6.1 and 6.12 kernels, qemu)",
        )
    } else {
        (
            crate::vm::KernelChoice::V6_1,
            "VM tests (Debian 6.1 kernel, qemu)",
        )
    };
    match step(what, || crate::vm::run_kernel(kernel, filter)) {
        Ok((passed, failed)) => {
            tally.passed += passed;
            tally.failed += failed;
            if failed > 0 {
                tally.failures.push(format!(
                    "VM tests: {failed} failed (guest console logs under target/vm/)"
                ));
            }
        }
        Err(e) => tally.check("VM tests", Err(e)),
    }

    println!();
    for failure in &tally.failures {
        println!("FAILED: {failure}");
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        bail!("{} failed", tally.failed);
    }
    Ok(())
}

/// Runs `cargo <args>`, echoing its output, and adds the counts of every libtest
/// "test result:" line to `tally`. A build failure counts as one failure.
fn run_libtest(args: &[&str], tally: &mut Tally) -> Result<()> {
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().unwrap();
    let mut saw_result = false;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            saw_result = true;
            tally.passed += count_before(rest, " passed");
            let failed = count_before(rest, " failed");
            tally.failed += failed;
        }
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            tally.failures.push(name.to_string());
        }
    }
    let status = child.wait()?;
    if !status.success() && !saw_result {
        tally.check(
            "cargo test (build)",
            Err(anyhow::anyhow!(
                "cargo test failed before running tests ({status})"
            )),
        );
    } else if !status.success() && tally.failed == 0 {
        tally.check(
            "cargo test",
            Err(anyhow::anyhow!("cargo test failed ({status})")),
        );
    }
    Ok(())
}

/// The number just before `suffix` in "ok. 3 passed; 0 failed; ...".
pub(crate) fn count_before(text: &str, suffix: &str) -> u64 {
    text.find(suffix)
        .and_then(|end| text[..end].rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn parses_libtest_result_counts() {
        let line = "FAILED. 12 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(count_before(line, " passed"), 12);
        assert_eq!(count_before(line, " failed"), 3);
        assert_eq!(count_before("ok. 0 passed; 0 failed", " passed"), 0);
    }
}
