//! Single byte ranges (RFC 9110 §14): parsing a `Range` header and resolving it against a size.

/// A parsed single `Range: bytes=` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `a-b` or `a-`.
    From(u64, Option<u64>),
    /// `-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses a `Range` header; `None` for anything but one well-formed byte range (then the
    /// whole blob is served, as RFC 9110 allows).
    pub fn parse(value: &str) -> Option<ByteRange> {
        let spec = value.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() {
            return number(b).filter(|n| *n > 0).map(ByteRange::Suffix);
        }
        let start = number(a)?;
        if b.is_empty() {
            return Some(ByteRange::From(start, None));
        }
        let end = number(b)?;
        (end >= start).then_some(ByteRange::From(start, Some(end)))
    }

    /// Inclusive bounds within a blob of `size`; `None` when unsatisfiable (a 416).
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            ByteRange::From(start, Some(end)) if end < start => None,
            ByteRange::Suffix(0) => None,
            ByteRange::From(start, _) if start >= size => None,
            ByteRange::From(start, end) => Some((start, end.unwrap_or(u64::MAX).min(size - 1))),
            ByteRange::Suffix(_) if size == 0 => None,
            ByteRange::Suffix(n) => Some((size - n.min(size), size - 1)),
        }
    }
}

/// A `Content-Range` answer (RFC 9110 §14.4): `bytes <first>-<last>/<total>`, where the total
/// may be `*`, or `bytes */<total>` for a 416.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// First and last byte (inclusive), `first <= last`.
    pub range: Option<(u64, u64)>,
    /// The complete length, when given; larger than `last`.
    pub total: Option<u64>,
}

impl ContentRange {
    /// Parses a `Content-Range` value; `None` for anything malformed or self-contradictory.
    pub fn parse(value: &str) -> Option<ContentRange> {
        let spec = value.trim().strip_prefix("bytes")?.trim_start();
        let (range, total) = spec.split_once('/')?;
        let total = match total.trim() {
            "*" => None,
            t => Some(number(t)?),
        };
        let range = match range.trim() {
            "*" => None,
            r => {
                let (first, last) = r.split_once('-')?;
                let (first, last) = (number(first)?, number(last)?);
                if first > last || total.is_some_and(|t| last >= t) {
                    return None;
                }
                Some((first, last))
            }
        };
        if range.is_none() && total.is_none() {
            return None;
        }
        Some(ContentRange { range, total })
    }
}

/// A decimal number of digits only (no sign, no spaces inside), without overflow.
fn number(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_ranges() {
        let some = |a, b, t| {
            Some(ContentRange {
                range: Some((a, b)),
                total: t,
            })
        };
        let cases = [
            ("bytes 0-9/10", some(0, 9, Some(10))),
            ("bytes 5-9/*", some(5, 9, None)),
            (
                "bytes */10",
                Some(ContentRange {
                    range: None,
                    total: Some(10),
                }),
            ),
            ("bytes 0-10/10", None),
            ("bytes 9-5/10", None),
            ("bytes -1-5/10", None),
            ("bytes +1-5/10", None),
            ("bytes 0-99999999999999999999/*", None),
            ("bytes */*", None),
            ("items 0-1/2", None),
            ("bytes 0-1", None),
        ];
        for (input, want) in cases {
            assert_eq!(ContentRange::parse(input), want, "{input}");
        }
    }

    #[test]
    fn parses_and_resolves_ranges() {
        let cases = [
            ("bytes=0-9", Some(ByteRange::From(0, Some(9)))),
            ("bytes=5-", Some(ByteRange::From(5, None))),
            ("bytes=-3", Some(ByteRange::Suffix(3))),
            ("bytes=9-5", None),
            ("bytes=0-1,3-4", None),
            ("items=0-1", None),
            ("bytes=-0", None),
            ("bytes=a-b", None),
            ("bytes=+0-+9", None),
            ("bytes=-+3", None),
        ];
        for (input, want) in cases {
            assert_eq!(ByteRange::parse(input), want, "{input}");
        }
        assert_eq!(ByteRange::From(0, Some(99)).resolve(10).unwrap(), (0, 9));
        assert_eq!(ByteRange::Suffix(3).resolve(10).unwrap(), (7, 9));
        assert_eq!(ByteRange::Suffix(30).resolve(10).unwrap(), (0, 9));
        assert_eq!(ByteRange::From(10, None).resolve(10), None);
    }
}
