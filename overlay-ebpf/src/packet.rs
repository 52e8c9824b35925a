//! Bounds-checked access to packet bytes and the checksum arithmetic the programs share.
use aya_ebpf::programs::TcContext;

/// A pointer to a `T` at `offset` bytes past `data`, if the whole `T` lies before
/// `data_end`. The explicit comparison is what the verifier checks every access against.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    let start = data.checked_add(offset)?;
    let end = start.checked_add(core::mem::size_of::<T>())?;
    if end > data_end {
        return None;
    }
    Some(start as *mut T)
}

/// Makes the first `len` bytes of the frame (all of it, if shorter) linear, pulling only
/// when they are not already. Callers ask for headers only: payload pulled into an
/// skb's head (a kmalloc'ed one, once the skb is uncloned) stops the receiving TCP from
/// coalescing the segment with the one before it (`skb_try_coalesce` refuses a locked
/// head holding data). False when the kernel cannot pull bytes the frame has.
#[inline(always)]
pub fn make_linear(ctx: &TcContext, len: usize) -> bool {
    if ctx.data() + len <= ctx.data_end() {
        return true;
    }
    let frame_len = ctx.len();
    let len = if (len as u32) < frame_len {
        len as u32
    } else {
        frame_len
    };
    ctx.pull_data(len).is_ok()
}

/// Folds a 32-bit one's-complement sum into 16 bits and complements it.
#[inline(always)]
pub fn fold_checksum(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One's-complement sum of the 16-bit words of a 20-byte IPv4 header (no options).
#[inline(always)]
pub fn ipv4_header_sum(hdr: &crate::headers::Ipv4Hdr) -> u32 {
    // SAFETY: `Ipv4Hdr` is 20 bytes of plain data; reading it as ten u16 is valid.
    let words: &[u16; 10] = unsafe { &*(hdr as *const _ as *const [u16; 10]) };
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += words[i] as u32;
        i += 1;
    }
    sum
}
