//! [`MacAddr`], the one MAC address type of the project: the store's endpoint records
//! carry it (as the text `aa:bb:cc:dd:ee:ff`, so the JSON is what it always was), the
//! planner and the map constructors take it, and the tests build frames with it.
//!
//! It lives here rather than in `overlay-ctl` because this crate is the one place both
//! sides of the map boundary already share: the map structs' constructors accept it, and
//! `overlay-ctl` (store, planner, plumbing) and the `tests` crate depend on this crate
//! anyway. It stays `no_std` (text handling uses `core` only); serde support comes with
//! the user-space `user` feature, so the kernel build pulls in nothing new.
use core::{fmt, str::FromStr};

/// A 48-bit Ethernet address.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    pub const fn new(octets: [u8; 6]) -> Self {
        Self(octets)
    }

    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Not a group (multicast or broadcast) address: the I/G bit is clear.
    pub const fn is_unicast(self) -> bool {
        self.0[0] & 1 == 0
    }

    pub const fn is_zero(self) -> bool {
        let o = self.0;
        o[0] | o[1] | o[2] | o[3] | o[4] | o[5] == 0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        Self(octets)
    }
}

impl From<MacAddr> for [u8; 6] {
    fn from(mac: MacAddr) -> Self {
        mac.0
    }
}

impl fmt::Display for MacAddr {
    /// Lower-case hex, colon-separated: `02:42:0a:64:00:02`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Text that is not six colon-separated hex bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseMacError;

impl fmt::Display for ParseMacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a MAC address (six hex bytes separated by colons)")
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    /// Accepts `02:42:0a:64:00:02` (either case).
    fn from_str(text: &str) -> Result<Self, ParseMacError> {
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut octets {
            let part = parts.next().ok_or(ParseMacError)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| ParseMacError)?;
        }
        match parts.next() {
            None => Ok(Self(octets)),
            Some(_) => Err(ParseMacError),
        }
    }
}

#[cfg(feature = "serde")]
mod serde_text {
    use core::fmt;

    use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

    use super::MacAddr;

    /// As its text, so records keep the JSON they always had.
    impl Serialize for MacAddr {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_str(self)
        }
    }

    impl<'de> Deserialize<'de> for MacAddr {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Text;
            impl de::Visitor<'_> for Text {
                type Value = MacAddr;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a MAC address such as \"02:42:0a:64:00:02\"")
                }

                fn visit_str<E: de::Error>(self, text: &str) -> Result<MacAddr, E> {
                    text.parse()
                        .map_err(|_| E::invalid_value(de::Unexpected::Str(text), &self))
                }
            }
            deserializer.deserialize_str(Text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        let mac = MacAddr::new([0x02, 0x42, 0x0a, 0x01, 0x00, 0xff]);
        let mut buf = [0u8; 17];
        let text = format_into(&mut buf, mac);
        assert_eq!(text, "02:42:0a:01:00:ff");
        assert_eq!(text.parse(), Ok(mac));
        assert_eq!("02:42:0A:01:00:FF".parse(), Ok(mac));
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "02:42:0a:01:00",
            "02:42:0a:01:00:02:03",
            "zz:42:0a:01:00:02",
            "",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(ParseMacError), "{bad}");
        }
    }

    #[test]
    fn unicast_and_zero() {
        assert!(MacAddr::new([2, 0, 0, 0, 0, 1]).is_unicast());
        assert!(!MacAddr::new([3, 0, 0, 0, 0, 1]).is_unicast());
        assert!(MacAddr::default().is_zero());
        assert!(!MacAddr::new([0, 0, 0, 0, 0, 1]).is_zero());
    }

    /// Formats without `alloc` (this crate is `no_std`).
    fn format_into(buf: &mut [u8; 17], mac: MacAddr) -> &str {
        struct Cursor<'a>(&'a mut [u8], usize);
        impl fmt::Write for Cursor<'_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                let end = self.1 + s.len();
                self.0
                    .get_mut(self.1..end)
                    .ok_or(fmt::Error)?
                    .copy_from_slice(s.as_bytes());
                self.1 = end;
                Ok(())
            }
        }
        let mut cursor = Cursor(buf, 0);
        fmt::write(&mut cursor, format_args!("{mac}")).unwrap();
        core::str::from_utf8(buf).unwrap()
    }
}
