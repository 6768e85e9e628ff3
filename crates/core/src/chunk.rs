//! insertAll chunking: at most `max_rows` rows and `max_bytes` of request body per call.
//! BigQuery's hard limit is 10 MB per request; we stay under ~9 MB to leave room for the
//! envelope and for what proxies add.

pub const MAX_ROWS: usize = 500;
pub const MAX_BYTES: usize = 9 * 1024 * 1024;
/// `{"rows":[` … `]}` plus the options we send.
pub const ENVELOPE_BYTES: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_rows: usize,
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_rows: MAX_ROWS,
            max_bytes: MAX_BYTES,
        }
    }
}

/// Split rows (given by their serialized size) into consecutive ranges that fit the limits.
/// Stops before the first row that cannot fit in a request on its own and returns its index:
/// such a row must not be sent, and nothing after it may be acknowledged before it is handled.
pub fn plan(sizes: &[usize], limits: Limits) -> (Vec<std::ops::Range<usize>>, Option<usize>) {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = ENVELOPE_BYTES;
    for (i, &size) in sizes.iter().enumerate() {
        let row = size + 1; // the comma
        if ENVELOPE_BYTES + row > limits.max_bytes {
            if start < i {
                out.push(start..i);
            }
            return (out, Some(i));
        }
        if i - start == limits.max_rows || bytes + row > limits.max_bytes {
            out.push(start..i);
            start = i;
            bytes = ENVELOPE_BYTES;
        }
        bytes += row;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_by_rows_and_bytes() {
        let l = Limits {
            max_rows: 3,
            max_bytes: 1000,
        };
        let (c, over) = plan(&[10; 7], l);
        assert_eq!(c, vec![0..3, 3..6, 6..7]);
        assert_eq!(over, None);
        // 128 envelope + 2 × 401 fits in 1000; a third 401 does not.
        let (c, _) = plan(&[400, 400, 400, 10], l);
        assert_eq!(c, vec![0..2, 2..4]);
    }

    #[test]
    fn stops_at_an_oversized_row() {
        let l = Limits {
            max_rows: 500,
            max_bytes: 1000,
        };
        let (c, over) = plan(&[10, 10, 5000, 10], l);
        assert_eq!(c, vec![0..2]);
        assert_eq!(over, Some(2));
        let (c, over) = plan(&[5000], l);
        assert!(c.is_empty());
        assert_eq!(over, Some(0));
    }

    #[test]
    fn every_chunk_respects_limits() {
        let sizes: Vec<usize> = (0..5000).map(|i| (i * 7919) % 20_000 + 1).collect();
        let l = Limits::default();
        let (c, over) = plan(&sizes, l);
        assert_eq!(over, None);
        assert_eq!(c.first().unwrap().start, 0);
        assert_eq!(c.last().unwrap().end, sizes.len());
        for w in c.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for r in c {
            assert!(r.len() <= l.max_rows);
            let bytes: usize = sizes[r].iter().map(|s| s + 1).sum::<usize>() + ENVELOPE_BYTES;
            assert!(bytes <= l.max_bytes);
        }
    }
}
