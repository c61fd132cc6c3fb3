//! `Range: bytes=` parsing and resolution: never panics; a parsed range is well formed and
//! renders back to an equal range; a resolved range lies inside the blob.
//!
//! Input: the blob size (8 bytes, little-endian), then the header value. The header's first
//! bytes, read as two more u64s, also make raw (well-formed) ranges to resolve.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullthrough::blobs::ByteRange;

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fn check(range: ByteRange, size: u64) {
    match range.resolve(size) {
        Ok((a, b)) => {
            assert!(
                a <= b && b < size,
                "{range:?} in {size} resolved to {a}-{b}"
            );
            match range {
                ByteRange::From(start, end) => {
                    assert_eq!(a, start);
                    assert!(end.is_none_or(|e| b <= e));
                }
                ByteRange::Suffix(n) => assert_eq!(b - a + 1, n.min(size)),
            }
        }
        Err(_) => assert!(
            size == 0 || matches!(range, ByteRange::From(start, _) if start >= size),
            "{range:?} in {size} refused"
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let size = u64_at(data, 0);
    let header = String::from_utf8_lossy(data.get(8..).unwrap_or_default());
    if let Some(range) = ByteRange::parse(&header) {
        let rendered = match range {
            ByteRange::From(a, Some(b)) => {
                assert!(a <= b);
                format!("bytes={a}-{b}")
            }
            ByteRange::From(a, None) => format!("bytes={a}-"),
            ByteRange::Suffix(n) => {
                assert!(n > 0);
                format!("bytes=-{n}")
            }
        };
        assert_eq!(ByteRange::parse(&rendered), Some(range));
        check(range, size);
    }
    // `From(a, Some(b))` with b < a and `Suffix(0)` are never parsed; resolve assumes neither.
    let (a, b) = (u64_at(data, 8), u64_at(data, 16));
    let (a, b) = (a.min(b), a.max(b));
    check(ByteRange::From(a, Some(b)), size);
    check(ByteRange::From(a, None), size);
    check(ByteRange::Suffix(a.max(1)), size);
});
