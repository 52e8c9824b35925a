//! `cargo xtask vm-test`: the data-plane integration tests inside qemu VMs that boot
//! Debian's LTS cloud kernels (6.1, the oldest supported, and 6.12).
//!
//! Per kernel: the newest `linux-image-*-cloud-amd64` package that apt knows is fetched
//! with `apt-get download` (cached under `target/vm/cache/`) and unpacked with
//! `dpkg-deb -x`; the modules the tests need (veth, vxlan, bridge, clsact, cls_bpf) and
//! their dependencies (read from each module's `.modinfo`, as depmod does: the package
//! ships no `modules.dep`) go decompressed into an initramfs with busybox-static, the
//! static test binaries of `overlay-tests` and an `/init` that runs them and powers off.
//! qemu boots it under TCG (the PVM `/dev/kvm` here cannot boot stock kernels); the serial
//! console goes to `target/vm/<release>/console.log` and is parsed for libtest's
//! `test result:` lines. A guest that hangs past the timeout or panics is killed; qemu
//! never outlives xtask (it is killed on every exit path, and by the kernel through
//! `PR_SET_PDEATHSIG` if xtask itself is killed). After the suite, two more guests boot
//! the same initramfs for the virtio-net scenario of [`crate::vm_pair`].
use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{setup, step, test::count_before, workspace_root};

/// How long one guest may run, boot to power-off. A run takes well under a minute.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";
pub(crate) const QEMU: &str = "qemu-system-x86_64";
/// `no_timer_check`: under TCG on a loaded host the guest's IO-APIC timer check can miss
/// its window and panic the boot ("IO-APIC + timer doesn't work!"), as a loaded CI
/// machine showed; the check proves nothing about the programs under test.
pub(crate) const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet no_timer_check";

/// Kernel modules the tests need, with why. Their dependencies are added automatically.
const MODULES: &[(&str, &str)] = &[
    ("veth", "veth pairs for hosts, containers and the underlay"),
    ("bridge", "the simulated underlay switch"),
    ("vxlan", "the Linux vxlan device of the interop test"),
    (
        "sch_ingress",
        "clsact qdisc (TC attachment on kernels without TCX)",
    ),
    ("cls_bpf", "BPF classifier under clsact"),
    (
        "virtio_pci",
        "the virtio-net NIC of the two-guest test (crate::vm_pair)",
    ),
    (
        "virtio_net",
        "its driver, whose native XDP path the two-guest test exercises",
    ),
];

/// The guest program of the two-guest test and the kernel parameter that selects it
/// (tests/src/vm_pair.rs).
const PAIR_BINARY: &str = "overlay-vm-pair";
const PAIR_CMDLINE_PARAM: &str = "overlay.pair=";

/// busybox applets the init script uses. Deliberately no `ip`, `tc` or `ping`: the tests
/// must bring their own netlink and socket code.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "poweroff", "reboot", "echo", "cat", "ls", "sleep", "uname",
    "dmesg", "grep", "ifconfig",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// Debian 12's own kernel (the oldest supported: no TCX, TC attaches through clsact).
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's 6.12 kernel from bookworm-security (TCX).
    #[value(name = "6.12")]
    V6_12,
    /// Both, one after the other.
    All,
}

impl KernelChoice {
    fn families(self) -> Vec<&'static Family> {
        match self {
            KernelChoice::V6_1 => vec![&FAMILIES[0]],
            KernelChoice::V6_12 => vec![&FAMILIES[1]],
            KernelChoice::All => FAMILIES.iter().collect(),
        }
    }
}

/// A line of kernel packages: `{prefix}{N}{suffix}`, the newest N wins.
struct Family {
    label: &'static str,
    prefix: &'static str,
    suffix: &'static str,
    origin: &'static str,
}

const FAMILIES: [Family; 2] = [
    Family {
        label: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64",
        origin: "bookworm / bookworm-security",
    },
    Family {
        label: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-cloud-amd64",
        origin: "bookworm-security",
    },
];

impl Family {
    /// N of a package name in this family.
    fn abi(&self, package: &str) -> Option<u64> {
        let n = package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n.parse().ok()
    }
}

/// An unpacked kernel package.
pub(crate) struct Kernel {
    package: String,
    pub(crate) release: String,
    pub(crate) vmlinuz: PathBuf,
    modules_dir: PathBuf,
}

/// What one guest run produced.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    passed: u64,
    failed: u64,
    failed_tests: Vec<String>,
    /// Things that make the run fail besides failed tests: timeout, panic, no results...
    problems: Vec<String>,
    /// Whether the guest kernel has TCX (probed in the guest).
    tcx: Option<bool>,
    results_seen: usize,
    /// The guest reached the end of its test list.
    done: bool,
}

impl Outcome {
    fn total_failed(&self) -> u64 {
        self.failed + self.problems.len() as u64
    }

    fn ok(&self) -> bool {
        self.total_failed() == 0 && self.results_seen > 0
    }
}

/// Per-kernel result for the closing summary.
struct Report {
    label: &'static str,
    release: Option<String>,
    passed: u64,
    failed: u64,
    line: String,
}

/// `cargo xtask vm-test`: runs the suite on the chosen kernels, prints one line per
/// kernel and fails if any kernel failed or produced no test results.
pub fn command(kernel: KernelChoice, timeout: Duration, filter: Option<&str>) -> Result<()> {
    crate::setup_if_needed()?;
    let started = Instant::now();
    let reports = run_all(kernel, timeout, filter)?;
    println!();
    for report in &reports {
        println!("{}", report.line);
    }
    println!(
        "vm-test: {} kernel(s) in {:.0}s",
        reports.len(),
        started.elapsed().as_secs_f32()
    );
    let bad: Vec<String> = reports
        .iter()
        .filter(|r| r.failed > 0 || r.release.is_none())
        .map(|r| r.release.clone().unwrap_or_else(|| r.label.to_string()))
        .collect();
    if !bad.is_empty() {
        bail!("vm-test failed on {}", bad.join(", "));
    }
    Ok(())
}

/// Runs the VM suite on `kernel` (both kernels for [`KernelChoice::All`]) and returns the
/// summed (passed, failed). A kernel that could not be fetched, hung, panicked or gave
/// no results counts as failures; only a failed build of the test binaries is an error.
pub fn run_kernel(kernel: KernelChoice, filter: Option<&str>) -> Result<(u64, u64)> {
    let reports = run_all(kernel, DEFAULT_TIMEOUT, filter)?;
    Ok(reports
        .iter()
        .fold((0, 0), |(p, f), r| (p + r.passed, f + r.failed)))
}

fn vm_dir() -> PathBuf {
    workspace_root().join("target").join("vm")
}

fn run_all(choice: KernelChoice, timeout: Duration, filter: Option<&str>) -> Result<Vec<Report>> {
    let vm_dir = vm_dir();
    let cache = vm_dir.join("cache");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;

    // Kernels first: fast, and a kernel apt does not have is reported before the build.
    let mut kernels = Vec::new();
    let mut apt_updated = false;
    for family in choice.families() {
        let what = format!("fetch Debian's {} cloud kernel", family.label);
        match step(&what, || fetch_kernel(family, &cache, &mut apt_updated)) {
            Ok(kernel) => kernels.push((family, Ok(kernel))),
            Err(e) => {
                println!("vm-test {}: {e:#}", family.label);
                kernels.push((family, Err(e)));
            }
        }
    }
    let binaries = if kernels.iter().any(|(_, k)| k.is_ok()) {
        step("build static test binaries (overlay-tests)", || {
            build_test_binaries(&vm_dir)
        })?
    } else {
        TestBinaries {
            tests: Vec::new(),
            bins: Vec::new(),
        }
    };

    let mut reports = Vec::new();
    for (family, kernel) in kernels {
        let kernel = match kernel {
            Ok(kernel) => kernel,
            Err(e) => {
                reports.push(Report {
                    label: family.label,
                    release: None,
                    passed: 0,
                    failed: 1,
                    line: format!("vm-test {}: NOT RUN, no kernel ({e:#})", family.label),
                });
                continue;
            }
        };
        let mut initrd = None;
        let mut report = match run_guest(&kernel, &binaries, &vm_dir, timeout, filter) {
            Ok((outcome, details, built)) => {
                initrd = Some(built);
                let line = format!(
                    "vm-test {}: {} passed, {} failed",
                    kernel.release,
                    outcome.passed,
                    outcome.total_failed()
                );
                println!("{line}");
                println!("  {details}");
                for name in &outcome.failed_tests {
                    println!("  FAILED in the guest: {name}");
                }
                for problem in &outcome.problems {
                    println!("  PROBLEM: {problem}");
                }
                Report {
                    label: family.label,
                    release: Some(kernel.release.clone()),
                    passed: outcome.passed,
                    failed: outcome.total_failed(),
                    line,
                }
            }
            Err(e) => {
                let line = format!("vm-test {}: 0 passed, 1 failed ({e:#})", kernel.release);
                println!("{line}");
                Report {
                    label: family.label,
                    release: Some(kernel.release.clone()),
                    passed: 0,
                    failed: 1,
                    line,
                }
            }
        };
        // The two-guest virtio-net scenario, with the same initramfs.
        if let Some(initrd) = initrd.filter(|_| crate::vm_pair::selected(filter)) {
            let work = vm_dir.join(&kernel.release);
            let what = format!(
                "two guests on virtio-net, XDP on virtio_net ({})",
                kernel.release
            );
            println!("==> {what}");
            let pair = crate::vm_pair::run(&kernel, &initrd, &work);
            println!(
                "==> {what}: {} ({:.1}s)",
                if pair.failed() == 0 { "ok" } else { "FAILED" },
                pair.elapsed.as_secs_f32()
            );
            let line = format!(
                "vm-pair {}: {} passed, {} failed; {}",
                kernel.release,
                pair.passed(),
                pair.failed(),
                pair.xdp_line()
            );
            println!("{line}");
            for (name, result) in &pair.checks {
                match result {
                    Ok(details) => println!("  ok     {name}: {details}"),
                    Err(why) => println!("  FAILED {name}: {why}"),
                }
            }
            report.passed += pair.passed();
            report.failed += pair.failed();
            report.line = format!("{}\n{line}", report.line);
        }
        reports.push(report);
    }
    Ok(reports)
}

// ---------------------------------------------------------------------------------------
// Kernel packages

fn fetch_kernel(family: &Family, cache: &Path, apt_updated: &mut bool) -> Result<Kernel> {
    let cached = newest_cached_deb(family, cache)?;
    let mut package = newest_available(family);
    if package.is_none() && cached.is_none() && !*apt_updated {
        println!(
            "apt does not list a {}N{} package; updating apt's lists",
            family.prefix, family.suffix
        );
        apt_update()?;
        *apt_updated = true;
        package = newest_available(family);
    }
    let deb = match (package, cached) {
        (Some(package), _) => match deb_in(cache, &package)? {
            Some(deb) => {
                println!("{package}: cached ({})", deb.display());
                deb
            }
            None => match download(&package, cache) {
                Ok(deb) => deb,
                // Stale lists point at files the mirror dropped: refresh once and retry.
                Err(e) if !*apt_updated => {
                    println!("download failed ({e:#}); updating apt's lists and retrying");
                    apt_update()?;
                    *apt_updated = true;
                    let package = newest_available(family).unwrap_or(package);
                    match deb_in(cache, &package)? {
                        Some(deb) => deb,
                        None => download(&package, cache)?,
                    }
                }
                Err(e) => return Err(e),
            },
        },
        (None, Some(deb)) => {
            println!(
                "apt lists no {} cloud kernel now; using the cached {}",
                family.label,
                deb.display()
            );
            deb
        }
        (None, None) => bail!(
            "Debian's {} cloud kernel is not available: apt knows no downloadable \
             {}N{} package (it comes from {}; is that suite in apt's sources?)",
            family.label,
            family.prefix,
            family.suffix,
            family.origin
        ),
    };
    unpack(&deb, cache)
}

/// The newest package of `family` that apt can download (has a candidate version).
fn newest_available(family: &Family) -> Option<String> {
    let output = Command::new("apt-cache")
        .args(["pkgnames", family.prefix])
        .output()
        .ok()?;
    let mut names: Vec<(u64, String)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|name| {
            family
                .abi(name.trim())
                .map(|n| (n, name.trim().to_string()))
        })
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    names.into_iter().map(|(_, name)| name).find(|name| {
        Command::new("apt-cache")
            .args(["madison", name])
            .output()
            .map(|out| out.status.success() && !out.stdout.is_empty())
            .unwrap_or(false)
    })
}

fn apt_update() -> Result<()> {
    if !setup::is_root() {
        bail!("apt's lists need updating (apt-get update), which needs root");
    }
    let status = Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get update failed ({status}): is Debian's package registry reachable?");
    }
    Ok(())
}

/// `apt-get download PACKAGE` into `cache` (through a scratch directory, so an
/// interrupted download never looks cached).
fn download(package: &str, cache: &Path) -> Result<PathBuf> {
    let scratch = cache.join("download.tmp");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    println!("downloading {package} (apt-get download)");
    let mut command = Command::new("apt-get");
    command.current_dir(&scratch).arg("download").arg("-q");
    if setup::is_root() {
        // Root's apt otherwise warns that its `_apt` sandbox user cannot write here.
        command.args(["-o", "APT::Sandbox::User=root"]);
    }
    let status = command
        .arg(package)
        .status()
        .context("cannot run apt-get (this needs a Debian machine)")?;
    if !status.success() {
        bail!("apt-get download {package} failed ({status})");
    }
    let deb = deb_in(&scratch, package)?
        .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
    let dest = cache.join(deb.file_name().unwrap());
    fs::rename(&deb, &dest)?;
    let _ = fs::remove_dir_all(&scratch);
    Ok(dest)
}

/// `dir/PACKAGE_*.deb`, if there is one.
fn deb_in(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    Ok(fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        }))
}

fn newest_cached_deb(family: &Family, cache: &Path) -> Result<Option<PathBuf>> {
    let mut debs: Vec<(u64, PathBuf)> = fs::read_dir(cache)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let package = name.strip_suffix(".deb")?.split('_').next()?;
            Some((family.abi(package)?, path))
        })
        .collect();
    debs.sort_unstable_by(|a, b| b.cmp(a));
    Ok(debs.into_iter().next().map(|(_, path)| path))
}

/// Unpacks `deb` once into `cache/PACKAGE/` and finds the kernel image and modules.
fn unpack(deb: &Path, cache: &Path) -> Result<Kernel> {
    let file_name = deb.file_name().unwrap().to_string_lossy().to_string();
    let package = file_name.split('_').next().unwrap().to_string();
    let dir = cache.join(&package);
    let marker = dir.join(".unpacked-from");
    if fs::read_to_string(&marker).ok().as_deref() != Some(file_name.as_str()) {
        let scratch = cache.join(format!("{package}.tmp"));
        let _ = fs::remove_dir_all(&scratch);
        let _ = fs::remove_dir_all(&dir);
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(&scratch)
            .status()
            .context("cannot run dpkg-deb")?;
        if !status.success() {
            bail!("dpkg-deb -x {} failed ({status})", deb.display());
        }
        fs::write(scratch.join(".unpacked-from"), &file_name)?;
        fs::rename(&scratch, &dir)?;
    }
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| dir.join(p))
        .find(|p| p.is_dir())
        .with_context(|| format!("{package} has no lib/modules"))?;
    let release = fs::read_dir(&modules_root)?
        .filter_map(|e| e.ok())
        .find(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .with_context(|| format!("{package} has no lib/modules/<release>"))?;
    let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{package} has no boot/vmlinuz-{release}");
    }
    Ok(Kernel {
        package,
        modules_dir: modules_root.join(&release),
        release,
        vmlinuz,
    })
}

// ---------------------------------------------------------------------------------------
// Modules

/// The modules in `names` that are not built in, with every dependency, in load order
/// (dependencies first), decompressed.
fn resolve_modules(modules_dir: &Path, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = HashMap::new();
    collect_modules(&modules_dir.join("kernel"), &mut files)?;
    let builtin: HashSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| module_name(line.rsplit('/').next()?))
        .collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in names {
        visit_module(&normalize(name), &files, &builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit_module(
    name: &str,
    files: &HashMap<String, PathBuf>,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<(String, Vec<u8>)>,
) -> Result<()> {
    if !seen.insert(name.to_string()) || builtin.contains(name) {
        return Ok(());
    }
    let path = files
        .get(name)
        .with_context(|| format!("module {name} is neither built in nor shipped as a module"))?;
    let bytes = read_module(path)?;
    let modinfo = elf_section(&bytes, ".modinfo")
        .with_context(|| format!("{} has no .modinfo section", path.display()))?;
    for dep in modinfo_depends(modinfo) {
        visit_module(&dep, files, builtin, seen, order)?;
    }
    order.push((name.to_string(), bytes));
    Ok(())
}

fn collect_modules(dir: &Path, files: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_modules(&path, files)?;
        } else if let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(module_name)
        {
            files.insert(name, path);
        }
    }
    Ok(())
}

/// `vxlan.ko.xz` -> `vxlan`; names use `_` where file names may use `-`.
fn module_name(file_name: &str) -> Option<String> {
    [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
        .map(normalize)
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("cannot read {name}"));
    };
    let output = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {tool} to decompress {name}"))?;
    if !output.status.success() {
        bail!("{tool} -dc {name} failed ({})", output.status);
    }
    Ok(output.stdout)
}

/// The `depends=` entry of a module's `.modinfo` (NUL-separated `key=value` strings).
fn modinfo_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(normalize)
                .collect::<Vec<_>>()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// ELF (64-bit little-endian only: x86_64 modules and executables)

fn le<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn le_u16(bytes: &[u8], at: usize) -> Option<usize> {
    le::<2>(bytes, at).map(|b| u16::from_le_bytes(b) as usize)
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    le::<4>(bytes, at).map(u32::from_le_bytes)
}

fn le_u64(bytes: &[u8], at: usize) -> Option<usize> {
    le::<8>(bytes, at).and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok())
}

fn is_elf64_le(bytes: &[u8]) -> bool {
    bytes.len() >= 64 && bytes[..4] == *b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1
}

/// The contents of section `wanted`.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if !is_elf64_le(elf) {
        return None;
    }
    let shoff = le_u64(elf, 0x28)?;
    let shentsize = le_u16(elf, 0x3a)?;
    let shnum = le_u16(elf, 0x3c)?;
    let shstrndx = le_u16(elf, 0x3e)?;
    // (name offset, file offset, size) of section `i`.
    let header = |i: usize| -> Option<(usize, usize, usize)> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            le_u32(elf, at)? as usize,
            le_u64(elf, at + 24)?,
            le_u64(elf, at + 32)?,
        ))
    };
    let (_, names_at, names_len) = header(shstrndx)?;
    let names = elf.get(names_at..names_at.checked_add(names_len)?)?;
    (0..shnum).find_map(|i| {
        let (name_at, at, len) = header(i)?;
        let name = names.get(name_at..)?;
        let name = &name[..name.iter().position(|&b| b == 0)?];
        if name == wanted.as_bytes() {
            elf.get(at..at.checked_add(len)?)
        } else {
            None
        }
    })
}

/// Whether an ELF executable is static (has no PT_INTERP program header).
fn elf_is_static(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if !is_elf64_le(elf) {
        return None;
    }
    let phoff = le_u64(elf, 0x20)?;
    let phentsize = le_u16(elf, 0x36)?;
    let phnum = le_u16(elf, 0x38)?;
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if le_u32(elf, at)? == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

fn check_static(path: &Path) -> Result<()> {
    let mut head = Vec::new();
    // Program headers follow the ELF header at the start of the file.
    fs::File::open(path)?
        .take(64 * 1024)
        .read_to_end(&mut head)?;
    match elf_is_static(&head) {
        Some(true) => Ok(()),
        Some(false) => bail!(
            "{} is dynamically linked (it has an ELF interpreter); the guest has no libc",
            path.display()
        ),
        None => bail!("{} is not a 64-bit ELF executable", path.display()),
    }
}

// ---------------------------------------------------------------------------------------
// Test binaries

/// Integration tests that need the host's userland and so run on the host only (in
/// `cargo xtask test`), never in the busybox guest, with why.
const HOST_ONLY_TESTS: &[(&str, &str)] = &[
    (
        "cluster",
        "runs agent and CLI processes with ping, sh and sleep; the kernel features it uses are the data plane's, covered by the guest's data-plane tests",
    ),
    (
        "hostile_store",
        "runs agent and CLI processes with ping and sleep against the dev server, like cluster",
    ),
    (
        "lifecycle",
        "like cluster: agent, CLI and Consul dev server processes with ping, sh and true",
    ),
    (
        "prometheus",
        "needs Debian's prometheus server, which the busybox guest does not have",
    ),
    (
        "cni",
        "chains Debian's CNI plugins (portmap needs iptables), which the busybox guest does not have",
    ),
    (
        "cni_containerd",
        "needs Debian's containerd, runc and CNI plugins, which the busybox guest does not have",
    ),
    (
        "docker",
        "needs Debian's docker.io (dockerd, containerd, runc), which the busybox guest does not have",
    ),
    (
        "control_socket",
        "runs agent and CLI processes like the cluster tests; nothing kernel-specific",
    ),
    (
        "mtu",
        "runs agent and CLI processes with iputils' ping -M do, like cluster",
    ),
    (
        "vxlan_port",
        "runs agent and CLI processes like cluster; the data plane's side of the port is in the guest's data-plane tests",
    ),
    (
        "egress",
        "the egress NAT is applied through Debian's nft, which the busybox guest does not have",
    ),
    (
        "consul_agent",
        "the Consul client against the dev server as a real agent behaves (TLS certificates made with Debian's openssl, which the busybox guest does not have); nothing kernel-specific",
    ),
    (
        "etcd_cluster",
        "agents and CLI processes against a 3-member Debian etcd, which the busybox guest does not have",
    ),
    (
        "dns",
        "the resolver is control-plane code (sockets, no eBPF), and its tests enter namespaces with `ip netns exec`, which the busybox guest does not have",
    ),
    (
        "etcd",
        "needs Debian's etcd, which the busybox guest does not have; the store client has nothing kernel-specific",
    ),
    (
        "feed",
        "the store feed against the dev server and Debian's etcd, which the busybox guest does not have; nothing kernel-specific",
    ),
];

/// The static executables a guest runs.
struct TestBinaries {
    /// (target name, path) of each integration test.
    tests: Vec<(String, PathBuf)>,
    /// The package's own binaries. Tests find them at the absolute path that
    /// `CARGO_BIN_EXE_<name>` compiled in, so the guest gets them at the same path.
    bins: Vec<PathBuf>,
}

/// Builds the integration tests of `overlay-tests` (and the binaries they may spawn) as
/// static executables in `target/vm/build` (its own target directory: other RUSTFLAGS
/// there would invalidate the normal build), found through cargo's JSON messages.
fn build_test_binaries(vm_dir: &Path) -> Result<TestBinaries> {
    let target_dir = vm_dir.join("build");
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        // `--test '*'`: every integration test target, no unit-test harnesses.
        .args(["test", "-p", "overlay-tests", "--test", "*", "--no-run"])
        .args(["--target", HOST_TARGET, "--message-format=json"])
        .arg("--target-dir")
        .arg(&target_dir)
        // With --target, RUSTFLAGS reach only target code, not build scripts and proc
        // macros. overlay-ctl's build.rs strips it for its nested eBPF build.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        // A build of its own, rarely repeated: incremental state would only take disk.
        .env("CARGO_INCREMENTAL", "0")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo")?;
    let mut binaries = TestBinaries {
        tests: Vec::new(),
        bins: Vec::new(),
    };
    let mut errors = 0;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match message["reason"].as_str() {
            // Integration tests only: unit tests of the library and binaries need no
            // particular kernel and already run on the host.
            Some("compiler-artifact")
                if message["profile"]["test"] == true && message["target"]["kind"][0] == "test" =>
            {
                if let (Some(name), Some(exe)) = (
                    message["target"]["name"].as_str(),
                    message["executable"].as_str(),
                ) {
                    binaries.tests.push((name.to_string(), PathBuf::from(exe)));
                }
            }
            Some("compiler-artifact") if message["target"]["kind"][0] == "bin" => {
                if let Some(exe) = message["executable"].as_str() {
                    binaries.bins.push(PathBuf::from(exe));
                }
            }
            Some("compiler-message") if message["message"]["level"] == "error" => {
                errors += 1;
                if let Some(rendered) = message["message"]["rendered"].as_str() {
                    eprint!("{rendered}");
                }
            }
            _ => {}
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building the static test binaries failed ({status}, {errors} compiler errors)");
    }
    if binaries.tests.is_empty() {
        bail!("cargo built no test executables for overlay-tests");
    }
    binaries.tests.retain(|(name, _)| {
        !HOST_ONLY_TESTS
            .iter()
            .any(|(host_only, _)| host_only == name)
    });
    binaries.tests.sort();
    for (name, path) in &binaries.tests {
        check_static(path)?;
        println!("static test binary {name}: {}", path.display());
    }
    for path in &binaries.bins {
        check_static(path)?;
        println!("static helper binary: {}", path.display());
    }
    Ok(binaries)
}

// ---------------------------------------------------------------------------------------
// Initramfs

fn find_busybox() -> Result<PathBuf> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("no busybox: install busybox-static (cargo xtask setup)")?;
    check_static(&busybox).context("the guest needs busybox-static's busybox")?;
    Ok(busybox)
}

/// The guest's `/init`. Its markers (`VMTEST-...`) are what [`parse_guest`] reads.
fn init_script(modules: &[String], filter: Option<&str>) -> String {
    let filter = filter
        .map(|f| format!(" '{}'", f.replace('\'', r"'\''")))
        .unwrap_or_default();
    format!(
        r#"#!/bin/sh
# Generated by `cargo xtask vm-test` (xtask/src/vm.rs).
export PATH=/bin
export RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /run
# /tmp stays on the (writable) initramfs root: a tmpfs there would hide the helper
# binaries when the workspace itself lives under /tmp (they keep their host paths).
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo "VMTEST-BOOTED $(uname -r)"
for m in {modules}; do
    insmod /lib/modules/$m.ko || echo "VMTEST-MODULE-FAILED $m"
done
ifconfig lo 127.0.0.1 up
if grep -q ' tcx_prog_attach$' /proc/kallsyms; then
    echo "VMTEST-TCX yes"
else
    echo "VMTEST-TCX no"
fi
cd /tmp
# One of the two guests of the virtio-net test (xtask/src/vm_pair.rs): the host drives
# overlay-vm-pair over this console instead of the test list.
if grep -q ' {pair_param}' /proc/cmdline; then
    /bin/overlay-vm-pair
    echo "VMPAIR-EXIT $?"
    poweroff -f
    echo o > /proc/sysrq-trigger
fi
for t in /tests/*; do
    echo "VMTEST-RUN ${{t##*/}}"
    "$t"{filter}
    echo "VMTEST-RESULT ${{t##*/}} $?"
done
echo "VMTEST-DONE"
poweroff -f
echo o > /proc/sysrq-trigger
"#,
        modules = modules.join(" "),
        pair_param = PAIR_CMDLINE_PARAM,
    )
}

/// Stages the guest's root in `dir` and packs it into `dir/../initrd.cpio.gz`.
fn build_initramfs(
    kernel: &Kernel,
    binaries: &TestBinaries,
    dir: &Path,
    filter: Option<&str>,
) -> Result<PathBuf> {
    let busybox = find_busybox()?;
    let names: Vec<&str> = MODULES.iter().map(|(name, _)| *name).collect();
    let modules = resolve_modules(&kernel.modules_dir, &names)?;
    let _ = fs::remove_dir_all(dir);
    for sub in [
        "bin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc",
        "tests",
        "lib/modules",
    ] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::copy(&busybox, dir.join("bin/busybox"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    let mut loaded = Vec::new();
    for (name, bytes) in &modules {
        fs::write(dir.join("lib/modules").join(format!("{name}.ko")), bytes)?;
        loaded.push(name.clone());
    }
    println!(
        "modules for {} (load order): {}",
        kernel.release,
        loaded.join(" ")
    );
    for (name, path) in &binaries.tests {
        install_executable(path, &dir.join("tests").join(name))?;
    }
    for path in &binaries.bins {
        let inside = path.strip_prefix("/").unwrap_or(path);
        install_executable(path, &dir.join(inside))?;
        if path.file_name().is_some_and(|n| n == PAIR_BINARY) {
            install_executable(path, &dir.join("bin").join(PAIR_BINARY))?;
        }
    }
    let init = dir.join("init");
    fs::write(&init, init_script(&loaded, filter))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let mut entries = Vec::new();
    list_tree(dir, dir, &mut entries)?;
    let cpio = dir.with_file_name("initrd.cpio");
    let mut child = Command::new(&busybox)
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&cpio)?)
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run busybox cpio")?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(entries.join("\n").as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("busybox cpio failed ({status})");
    }
    let status = Command::new("gzip")
        .args(["-1", "-f"])
        .arg(&cpio)
        .status()
        .context("cannot run gzip")?;
    if !status.success() {
        bail!("gzip {} failed ({status})", cpio.display());
    }
    Ok(cpio.with_extension("cpio.gz"))
}

/// Copies an executable without its debug info (most of its size; symbols stay for
/// backtraces).
fn install_executable(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(from)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !stripped {
        fs::copy(from, to).with_context(|| format!("cannot copy {}", from.display()))?;
    }
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Paths under `root`, relative, parents before children (what `cpio -o` wants).
fn list_tree(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut children: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    children.sort();
    for path in children {
        out.push(path.strip_prefix(root)?.to_string_lossy().to_string());
        if path.is_dir() && !path.is_symlink() {
            list_tree(root, &path, out)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Booting

/// qemu, killed (and reaped) when this is dropped unless it already exited.
pub(crate) struct Guest(pub(crate) Child);

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Boots `kernel` with the test initramfs and returns the parsed outcome plus a line of
/// details (timings, TC attachment, log path).
fn run_guest(
    kernel: &Kernel,
    binaries: &TestBinaries,
    vm_dir: &Path,
    timeout: Duration,
    filter: Option<&str>,
) -> Result<(Outcome, String, PathBuf)> {
    let work = vm_dir.join(&kernel.release);
    fs::create_dir_all(&work)?;
    let initrd = step(&format!("initramfs for {}", kernel.release), || {
        build_initramfs(kernel, binaries, &work.join("root"), filter)
    })?;
    let log = work.join("console.log");
    let what = format!(
        "boot {} in qemu (TCG, timeout {}s) and run the tests",
        kernel.release,
        timeout.as_secs()
    );
    println!("==> {what}");
    let started = Instant::now();
    let (outcome, timings) = boot(kernel, &initrd, &log, timeout)?;
    println!(
        "==> {what}: {} ({:.1}s)",
        if outcome.ok() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f32()
    );
    let tc = match outcome.tcx {
        Some(true) => "TC attach: TCX links (kernel has TCX)",
        Some(false) => "TC attach: clsact qdisc + cls_bpf filter (no TCX before 6.6)",
        None => "TC attach: unknown (the guest did not get that far)",
    };
    let details = format!(
        "{tc}; {timings}; package {}; console log {}",
        kernel.package,
        log.display()
    );
    Ok((outcome, details, initrd))
}

fn boot(
    kernel: &Kernel,
    initrd: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(Outcome, String)> {
    let mut log_file =
        fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let parent = std::process::id();
    let mut command = Command::new(QEMU);
    command
        .args([
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "2",
        ])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", KERNEL_CMDLINE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // If xtask dies (Ctrl-C, SIGTERM, SIGKILL) the kernel kills qemu too.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("xtask exited before qemu started"));
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = command.spawn().with_context(|| {
        format!("cannot run {QEMU}: install qemu-system-x86 (cargo xtask setup)")
    })?;
    let (tx, rx) = mpsc::channel::<String>();
    for (stream, prefix) in [
        (
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            "",
        ),
        (Box::new(child.stderr.take().unwrap()), "qemu: "),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                let line = String::from_utf8_lossy(&buf);
                if tx.send(format!("{prefix}{}", line.trim_end())).is_err() {
                    break;
                }
                buf.clear();
            }
        });
    }
    drop(tx);
    let mut guest = Guest(child);

    let deadline = started + timeout;
    let mut lines = Vec::new();
    let mut booted_at = None;
    let mut panic_at: Option<Instant> = None;
    let mut done_at: Option<Instant> = None;
    let mut killed_for = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            killed_for = Some(format!(
                "the guest did not finish within {}s (hung?); qemu killed",
                timeout.as_secs()
            ));
            break;
        }
        if panic_at.is_some_and(|t| now - t > Duration::from_secs(5)) {
            killed_for = Some("qemu killed after the kernel panic".to_string());
            break;
        }
        if done_at.is_some_and(|t| now - t > Duration::from_secs(30)) {
            killed_for = Some("the guest did not power off after its tests; qemu killed".into());
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_secs(1))) {
            Ok(raw) => {
                let _ = writeln!(log_file, "{raw}");
                let line = clean(&raw);
                if booted_at.is_none() && line.contains("VMTEST-BOOTED") {
                    booted_at = Some(started.elapsed());
                }
                if line.contains("Kernel panic") && panic_at.is_none() {
                    panic_at = Some(Instant::now());
                }
                if line.contains("VMTEST-DONE") {
                    done_at = Some(Instant::now());
                }
                // Progress: the guest's own output, once its init runs (before that it is
                // firmware noise), and anything alarming from the kernel.
                if booted_at.is_some() || panic_at.is_some() || line.starts_with("qemu: ") {
                    println!("  | {line}");
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both streams closed: qemu exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if killed_for.is_some() {
        let _ = guest.0.kill();
    }
    let status = guest.0.wait()?;
    let elapsed = started.elapsed();
    drop(guest);

    let mut outcome = parse_guest(&lines);
    // One problem for what went wrong with the run as a whole, the most telling one.
    if let Some(why) = killed_for {
        outcome.problems.push(why);
    } else if booted_at.is_none() {
        outcome
            .problems
            .push(format!("the guest never reached /init (qemu {status})"));
    } else if !outcome.done {
        outcome.problems.push(format!(
            "the guest stopped before the end of its test list (qemu {status})"
        ));
    } else if outcome.results_seen == 0 {
        outcome
            .problems
            .push("the guest printed no libtest `test result:` line".into());
    }
    if !outcome.ok() {
        let from = lines
            .iter()
            .position(|l| l.contains("VMTEST-BOOTED"))
            .unwrap_or(0)
            .max(lines.len().saturating_sub(60));
        println!(
            "guest output tail ({} of {} lines; all of it in {}):",
            lines.len() - from,
            lines.len(),
            log.display()
        );
        for line in &lines[from..] {
            println!("  | {line}");
        }
    }
    let timings = match booted_at {
        Some(b) => format!(
            "/init after {:.1}s, whole run {:.1}s",
            b.as_secs_f32(),
            elapsed.as_secs_f32()
        ),
        None => format!("whole run {:.1}s", elapsed.as_secs_f32()),
    };
    Ok((outcome, timings))
}

/// A console line without escape sequences and control characters.
pub(crate) fn clean(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

/// Reads the guest's markers and libtest's lines.
fn parse_guest(lines: &[String]) -> Outcome {
    let mut outcome = Outcome::default();
    let mut current_failed: Option<u64> = None;
    for line in lines {
        if let Some(at) = line.find("test result: ") {
            let rest = &line[at..];
            let passed = count_before(rest, " passed");
            let failed = count_before(rest, " failed");
            outcome.passed += passed;
            outcome.failed += failed;
            outcome.results_seen += 1;
            current_failed = Some(failed);
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            outcome.failed_tests.push(name.to_string());
        } else if line.contains("VMTEST-RUN ") {
            current_failed = None;
        } else if let Some(at) = line.find("VMTEST-RESULT ") {
            let mut words = line[at..].split_whitespace().skip(1);
            let binary = words.next().unwrap_or("?");
            let code = words.next().unwrap_or("?");
            // Exited non-zero without reporting a failed test: crashed or could not start.
            if code != "0" && current_failed.unwrap_or(0) == 0 {
                outcome.failed += 1;
                outcome.failed_tests.push(format!(
                    "{binary} exited with {code} before its test summary"
                ));
            }
        } else if let Some(at) = line.find("VMTEST-MODULE-FAILED ") {
            outcome.problems.push(format!(
                "insmod {} failed in the guest",
                line[at..].split_whitespace().nth(1).unwrap_or("?")
            ));
        } else if let Some(at) = line.find("VMTEST-TCX ") {
            outcome.tcx = Some(line[at..].split_whitespace().nth(1) == Some("yes"));
        } else if line.contains("VMTEST-DONE") {
            outcome.done = true;
        } else if line.contains("Kernel panic") {
            outcome
                .problems
                .push(format!("kernel panic: {}", line.trim()));
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(clean).collect()
    }

    #[test]
    fn family_abi_numbers() {
        assert_eq!(
            FAMILIES[0].abi("linux-image-6.1.0-56-cloud-amd64"),
            Some(56)
        );
        assert_eq!(
            FAMILIES[0].abi("linux-image-6.1.0-56-cloud-amd64-dbg"),
            None
        );
        assert_eq!(FAMILIES[0].abi("linux-image-6.1.0-56-amd64"), None);
        assert_eq!(
            FAMILIES[1].abi("linux-image-6.12.117+deb12-cloud-amd64"),
            Some(117)
        );
        assert_eq!(FAMILIES[1].abi("linux-image-6.12-cloud-amd64"), None);
        assert_eq!(FAMILIES[1].abi("linux-image-6.12.117+deb12-amd64"), None);
    }

    #[test]
    fn cleans_console_escapes() {
        assert_eq!(
            clean("\x1bc\x1b[?7l\x1b[2JVMTEST-BOOTED 6.1.0-56-cloud-amd64\r"),
            "VMTEST-BOOTED 6.1.0-56-cloud-amd64"
        );
    }

    #[test]
    fn parses_a_passing_run() {
        let outcome = parse_guest(&lines(
            "SeaBIOS\nVMTEST-BOOTED 6.1.0\nVMTEST-TCX no\nVMTEST-RUN dataplane\n\
             test a ... ok\n\
             test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             VMTEST-RESULT dataplane 0\nVMTEST-RUN malformed\n\
             test result: ok. 2 passed; 0 failed; 0 ignored\n\
             VMTEST-RESULT malformed 0\nVMTEST-DONE",
        ));
        assert_eq!(outcome.passed, 10);
        assert_eq!(outcome.total_failed(), 0);
        assert_eq!(outcome.tcx, Some(false));
        assert!(outcome.done);
        assert!(outcome.ok());
    }

    #[test]
    fn counts_failures_crashes_and_hangs() {
        let outcome = parse_guest(&lines(
            "VMTEST-BOOTED 6.1.0\nVMTEST-RUN dataplane\ntest b ... FAILED\n\
             test result: FAILED. 7 passed; 1 failed; 0 ignored\n\
             VMTEST-RESULT dataplane 101\nVMTEST-RUN malformed\nVMTEST-RESULT malformed 139\n\
             VMTEST-RUN underlay",
        ));
        assert_eq!(outcome.passed, 7);
        assert_eq!(outcome.failed, 2);
        assert_eq!(
            outcome.failed_tests,
            ["b", "malformed exited with 139 before its test summary"]
        );
        assert!(!outcome.done);
        assert_eq!(outcome.total_failed(), 2);
        assert!(!parse_guest(&lines("VMTEST-BOOTED\nVMTEST-DONE")).ok());
        let panicked = parse_guest(&lines(
            "Kernel panic - not syncing: Attempted to kill init!",
        ));
        assert_eq!(panicked.problems.len(), 1);
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let modinfo = b"license=GPL\0depends=udp_tunnel,ip6_udp_tunnel\0retpoline=Y\0";
        assert_eq!(modinfo_depends(modinfo), ["udp_tunnel", "ip6_udp_tunnel"]);
        assert!(modinfo_depends(b"depends=\0name=veth\0").is_empty());
        assert_eq!(
            module_name("ip6_udp_tunnel.ko.xz").as_deref(),
            Some("ip6_udp_tunnel")
        );
        assert_eq!(module_name("nf-foo.ko").as_deref(), Some("nf_foo"));
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn reads_elf_headers_of_this_executable() {
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(elf_is_static(&me).is_some());
        assert!(elf_section(&me, ".text").is_some_and(|text| !text.is_empty()));
        assert!(elf_section(&me, ".no-such-section").is_none());
        assert_eq!(elf_is_static(b"not an elf"), None);
    }

    #[test]
    fn init_script_quotes_the_filter() {
        let script = init_script(&["llc".into(), "stp".into()], Some("it's"));
        assert!(script.contains("for m in llc stp; do"));
        assert!(script.contains(r#""$t" 'it'\''s'"#));
    }
}
