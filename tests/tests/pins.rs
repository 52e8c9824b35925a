//! An agent upgraded over the maps an older agent pinned: a map whose layout changed
//! (here NETWORKS, whose value gained the network's counter slot) is replaced at load
//! instead of making the programs fail to load against it; the others are reused.
use std::{ffi::CString, os::fd::RawFd, path::Path};

use aya::maps::MapInfo;
use overlay_common::map_names;
use overlay_ctl::dataplane::datapath::Datapath;
use overlay_tests::harness::*;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;

/// `bpf(cmd, attr)` with `attr` as the kernel's union (zeroed beyond what is set).
fn bpf(cmd: libc::c_long, attr: &[u64; 16]) -> i64 {
    // SAFETY: the attribute buffer is valid, 128 bytes, for the whole call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    }
}

/// A map as an older agent would have pinned it: `map_type`, key and value sizes,
/// capacity.
fn pin_map(path: &Path, map_type: u32, key: u32, value: u32, entries: u32) {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(map_type) | (u64::from(key) << 32);
    attr[1] = u64::from(value) | (u64::from(entries) << 32);
    let fd = bpf(BPF_MAP_CREATE, &attr);
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    attr[1] = fd as u64;
    let pinned = bpf(BPF_OBJ_PIN, &attr);
    assert!(
        pinned == 0,
        "BPF_OBJ_PIN: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: our own descriptor; the pin keeps the map.
    unsafe { libc::close(fd as RawFd) };
}

#[test]
fn maps_pinned_with_another_layout_are_replaced_at_load() {
    require_root();
    let pins = PinGuard::new();
    let maps = pins.path.join("maps");
    let networks = maps.join(map_names::NETWORKS);
    let endpoints = maps.join(map_names::ENDPOINTS);
    // A first load pins every map, as an agent does.
    drop(Datapath::load(&pins.path).expect("first load"));
    let wanted = MapInfo::from_pin(&networks).unwrap();
    let endpoints_id = MapInfo::from_pin(&endpoints).unwrap().id();
    // An older agent's NETWORKS: the same name and type, a value 4 bytes shorter.
    std::fs::remove_file(&networks).unwrap();
    pin_map(
        &networks,
        wanted.map_type().unwrap() as u32,
        wanted.key_size(),
        wanted.value_size() - 4,
        wanted.max_entries(),
    );
    let old = MapInfo::from_pin(&networks).unwrap();
    assert_eq!(old.value_size(), wanted.value_size() - 4);

    let _datapath = Datapath::load(&pins.path).expect("a load over an older agent's pins");
    let now = MapInfo::from_pin(&networks).unwrap();
    assert_eq!(
        now.value_size(),
        wanted.value_size(),
        "NETWORKS was replaced"
    );
    assert_ne!(now.id(), old.id());
    assert_eq!(
        MapInfo::from_pin(&endpoints).unwrap().id(),
        endpoints_id,
        "a map whose layout did not change is reused, entries and all"
    );
}
