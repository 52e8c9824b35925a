//! Traffic for the tests, from plain sockets (no external tools, so the same binaries run
//! inside minimal VMs): ICMP echo, bulk TCP with a digest, UDP datagrams.
use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use crate::frames::checksum;

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;

/// Sends one ICMP echo request to `dst` and waits up to `timeout` for the matching reply.
/// Call from a thread inside the sender's namespace. `payload_len` sets the size.
pub fn ping(dst: Ipv4Addr, seq: u16, payload_len: usize, timeout: Duration) -> bool {
    // SAFETY: a raw ICMP socket used only in this function and closed at its end.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    assert!(
        fd >= 0,
        "raw ICMP socket: {}",
        std::io::Error::last_os_error()
    );
    let id = (std::process::id() as u16) ^ seq.rotate_left(7);
    let mut packet = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend((0..payload_len).map(|i| i as u8));
    let c = checksum(&packet);
    packet[2..4].copy_from_slice(&c.to_be_bytes());
    let addr = sockaddr(dst);
    let deadline = Instant::now() + timeout;
    let mut got = false;
    // SAFETY: pointers to live buffers of the stated lengths.
    unsafe {
        let sent = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        if sent >= 0 {
            let mut buf = vec![0u8; 65536];
            while Instant::now() < deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                let tv = libc::timeval {
                    tv_sec: left.as_secs() as i64,
                    tv_usec: left.subsec_micros().max(1000) as i64,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if n <= 0 {
                    break;
                }
                let n = n as usize;
                let ihl = ((buf[0] & 0x0f) as usize) * 4;
                if n < ihl + 8 {
                    continue;
                }
                let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                let icmp = &buf[ihl..n];
                if src == dst
                    && icmp[0] == ICMP_ECHO_REPLY
                    && u16::from_be_bytes([icmp[4], icmp[5]]) == id
                    && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
                {
                    got = true;
                    break;
                }
            }
        }
        libc::close(fd);
    }
    got
}

/// Pings until one reply arrives or `timeout` passes (the first may wait for ARP).
pub fn ping_until_reply(dst: Ipv4Addr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut seq = 1;
    while Instant::now() < deadline {
        if ping(dst, seq, 56, Duration::from_millis(500)) {
            return true;
        }
        seq += 1;
    }
    false
}

/// Deterministic pseudo-random bytes (xorshift), so both ends can agree on content.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = crate::frames::Xorshift::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// FNV-1a, enough to tell corrupted or truncated streams from intact ones.
pub fn digest(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A TCP sink: accepts one connection, reads to EOF, returns (bytes, digest).
pub fn tcp_listen(addr: Ipv4Addr, port: u16) -> TcpListener {
    TcpListener::bind(SocketAddrV4::new(addr, port)).expect("bind TCP sink")
}

pub fn tcp_receive_all(listener: &TcpListener, timeout: Duration) -> (usize, u64) {
    receive_stream(listener, timeout).expect("receive the whole stream")
}

/// Accepts one connection and reads it to EOF; (bytes, digest).
pub fn receive_stream(listener: &TcpListener, timeout: Duration) -> io::Result<(usize, u64)> {
    let (mut stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(timeout))?;
    let mut data = Vec::new();
    stream.read_to_end(&mut data)?;
    Ok((data.len(), digest(&data)))
}

pub fn tcp_send_all(dst: Ipv4Addr, port: u16, data: &[u8], timeout: Duration) {
    let stream =
        TcpStream::connect_timeout(&SocketAddrV4::new(dst, port).into(), timeout).expect("connect");
    send_stream(stream, data, timeout).expect("send the whole stream");
}

/// Writes everything on a connected stream, half-closes it and waits for the peer's
/// close (all data acknowledged and read on the other side).
pub fn send_stream(mut stream: TcpStream, data: &[u8], timeout: Duration) -> io::Result<()> {
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(data)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.read_to_end(&mut Vec::new()).map(|_| ())
}

/// Sends `count` datagrams of `len` bytes from `src` to `dst`.
pub fn udp_send(src: Ipv4Addr, dst: SocketAddrV4, count: usize, len: usize) {
    let socket = UdpSocket::bind((src, 0)).unwrap();
    let payload = vec![0x5a; len];
    for _ in 0..count {
        socket.send_to(&payload, dst).unwrap();
    }
}

/// Sends `count` copies of `payload` over UDP from `src` to `dst`.
pub fn udp_send_payload(src: Ipv4Addr, dst: SocketAddrV4, payload: &[u8], count: usize) {
    let socket = UdpSocket::bind((src, 0)).unwrap();
    for _ in 0..count {
        socket.send_to(payload, dst).unwrap();
    }
}

/// Sends one UDP datagram with a hand-written IPv4 header (any source address).
pub fn raw_udp_send(src: Ipv4Addr, dst: Ipv4Addr, dst_port: u16, payload: &[u8]) {
    use overlay_common::proto::{IPPROTO_UDP, IPV4_FLAG_DF, UDP_HLEN};
    let mut packet = crate::frames::ipv4_header(
        src,
        dst,
        IPPROTO_UDP,
        UDP_HLEN + payload.len(),
        IPV4_FLAG_DF,
    );
    packet.extend(crate::frames::udp_header(40001, dst_port, payload.len()));
    packet.extend_from_slice(payload);
    let addr = sockaddr(dst);
    // SAFETY: a raw socket (IP_HDRINCL implied) used and closed here; live buffers.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        );
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let sent = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert!(sent >= 0, "raw send: {err}");
    }
}

/// The connected socket's MSS (`TCP_MAXSEG`).
pub fn tcp_mss(stream: &TcpStream) -> u32 {
    let mut mss: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized out-parameter and its length, on a live socket.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mut mss as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    mss as u32
}

/// Sends one datagram of `len` bytes with DF clear (`IP_PMTUDISC_DONT`), whatever the
/// path MTU the socket's stack has learnt.
pub fn udp_send_no_df(src: Ipv4Addr, dst: SocketAddrV4, len: usize) {
    use std::os::fd::AsRawFd;
    let socket = UdpSocket::bind((src, 0)).unwrap();
    let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: setsockopt on a live socket with a correctly sized int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&dont as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "IP_MTU_DISCOVER: {}",
        std::io::Error::last_os_error()
    );
    socket.send_to(&vec![0x33; len], dst).unwrap();
}

/// A `sockaddr_in` for raw sockets (port unused).
fn sockaddr(dst: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// `TcpInCsumErrors` and `UdpInCsumErrors` of the calling thread's network namespace
/// (`/proc/net/snmp`): segments and datagrams the stack dropped for a bad checksum.
pub fn checksum_errors() -> (u64, u64) {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp");
    let table = parse_snmp(&snmp);
    let counter = |proto: &str| {
        let value = table
            .get(&(proto.to_string(), "InCsumErrors".to_string()))
            .unwrap_or_else(|| panic!("no {proto} InCsumErrors in /proc/net/snmp"));
        u64::try_from(*value).expect("a counter is never negative")
    };
    (counter("Tcp"), counter("Udp"))
}

/// TCP segments (skbs, so a GSO or GRO packet counts once) the calling thread's
/// namespace received (`Tcp` `InSegs` in `/proc/net/snmp`).
pub fn tcp_in_segments() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp");
    let value = parse_snmp(&snmp)
        .get(&("Tcp".to_string(), "InSegs".to_string()))
        .copied()
        .expect("no Tcp InSegs in /proc/net/snmp");
    u64::try_from(value).expect("a counter is never negative")
}

/// Received TCP segments the calling thread's namespace merged into the skb before them
/// in a socket's receive queue or backlog (`TcpExt` `TCPRcvCoalesce` plus
/// `TCPBacklogCoalesce` in `/proc/net/netstat`).
pub fn tcp_receive_coalesced() -> u64 {
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat").expect("read netstat");
    let table = parse_snmp(&netstat);
    ["TCPRcvCoalesce", "TCPBacklogCoalesce"]
        .iter()
        .map(|name| {
            let value = table
                .get(&("TcpExt".to_string(), name.to_string()))
                .unwrap_or_else(|| panic!("no TcpExt {name} in /proc/net/netstat"));
            u64::try_from(*value).expect("a counter is never negative")
        })
        .sum()
}

/// `/proc/net/snmp` as (protocol, counter) -> value: each protocol has a header line of
/// names and a line of values.
pub fn parse_snmp(text: &str) -> HashMap<(String, String), i64> {
    let mut table = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [header, values] = pair else { continue };
        let (Some((proto, names)), Some((proto2, numbers))) =
            (header.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        if proto != proto2 {
            continue;
        }
        for (name, number) in names.split_whitespace().zip(numbers.split_whitespace()) {
            if let Ok(n) = number.parse() {
                table.insert((proto.to_string(), name.to_string()), n);
            }
        }
    }
    table
}

/// Receives datagrams on `socket` until `count` arrived or `timeout` passed; returns the
/// number whose payload equalled `payload`.
pub fn udp_receive_matching(
    socket: &std::net::UdpSocket,
    payload: &[u8],
    count: usize,
    timeout: Duration,
) -> usize {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = vec![0u8; payload.len() + 1];
    let mut matching = 0;
    while matching < count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) if buf[..n] == *payload => matching += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    matching
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snmp() {
        let text = "Ip: Forwarding InReceives\nIp: 1 99\n\
                    Tcp: RtoAlgorithm InSegs InCsumErrors\nTcp: 1 1234 0\n\
                    Udp: InDatagrams InCsumErrors\nUdp: 7 3\n";
        let table = parse_snmp(text);
        assert_eq!(table[&("Tcp".into(), "InCsumErrors".into())], 0);
        assert_eq!(table[&("Udp".into(), "InCsumErrors".into())], 3);
        assert_eq!(table[&("Ip".into(), "InReceives".into())], 99);
    }
}
