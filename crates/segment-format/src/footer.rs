//! A bounded walk of a Parquet file's footer (Thrift compact protocol) before the Parquet crate
//! reads it. That crate skips a list of booleans one element at a time with no byte read for
//! each, so a 783-byte damaged footer declaring 2^31 of them held it for 7 s (found by the
//! `segment_files` fuzz target). Here every list and map element must take at least one byte,
//! nesting is bounded, and a footer that breaks either is damaged.

/// Deepest nesting walked (Parquet's own metadata nests a few levels).
const MAX_DEPTH: u32 = 64;

/// Checks the footer of `file`; `Err` names why it cannot be sound.
pub(crate) fn check(file: &[u8]) -> Result<(), String> {
    let n = file.len();
    if n < 12 || &file[n - 4..] != b"PAR1" {
        return Err("not a Parquet file (no PAR1 at the end)".into());
    }
    let len = u32::from_le_bytes([file[n - 8], file[n - 7], file[n - 6], file[n - 5]]) as usize;
    if len > n - 8 {
        return Err(format!("footer of {len} bytes in a {n}-byte file"));
    }
    let mut r = Reader {
        buf: &file[n - 8 - len..n - 8],
        at: 0,
    };
    r.skip(12, MAX_DEPTH)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.buf.len() - self.at
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.buf.get(self.at).ok_or("footer ends early")?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift.min(63);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn bytes(&mut self, k: usize) -> Result<(), String> {
        if k > self.left() {
            return Err("footer ends early".into());
        }
        self.at += k;
        Ok(())
    }

    /// Skips one value of compact type `t` (field types; in lists, a bool is one byte).
    fn skip(&mut self, t: u8, depth: u32) -> Result<(), String> {
        if depth == 0 {
            return Err("footer nested too deep".into());
        }
        match t {
            1 | 2 => Ok(()),
            3 => self.bytes(1),
            4..=6 => self.varint().map(|_| ()),
            7 => self.bytes(8),
            8 => {
                let k = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
                self.bytes(k)
            }
            9 | 10 => {
                let h = self.byte()?;
                let size = match h >> 4 {
                    15 => self.varint()?,
                    s => u64::from(s),
                };
                let elem = h & 0x0f;
                if size > self.left() as u64 {
                    return Err(format!("a list of {size} in {} bytes", self.left()));
                }
                for _ in 0..size {
                    if matches!(elem, 1 | 2) {
                        self.bytes(1)?;
                    } else {
                        self.skip(elem, depth - 1)?;
                    }
                }
                Ok(())
            }
            11 => {
                let size = self.varint()?;
                if size == 0 {
                    return Ok(());
                }
                let kv = self.byte()?;
                if size.saturating_mul(2) > self.left() as u64 {
                    return Err(format!("a map of {size} in {} bytes", self.left()));
                }
                for _ in 0..size {
                    for t in [kv >> 4, kv & 0x0f] {
                        if matches!(t, 1 | 2) {
                            self.bytes(1)?;
                        } else {
                            self.skip(t, depth - 1)?;
                        }
                    }
                }
                Ok(())
            }
            12 => loop {
                let h = self.byte()?;
                if h == 0 {
                    return Ok(());
                }
                if h >> 4 == 0 {
                    self.varint()?; // a long-form field id
                }
                self.skip(h & 0x0f, depth - 1)?;
            },
            13 => self.bytes(16),
            _ => Err(format!("unknown Thrift type {t}")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_footer_declaring_more_list_elements_than_bytes_is_refused_at_once() {
        let file = include_bytes!("../../../fuzz/corpus/segment_files/slow-bool-list");
        let started = std::time::Instant::now();
        let e = check(file).unwrap_err();
        assert!(
            e.contains("list") || e.contains("map") || e.contains("early"),
            "{e}"
        );
        let e = crate::decode(bytes::Bytes::from_static(file)).unwrap_err();
        assert!(e.to_string().contains("footer"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
    }
}
