//! Base types shared by every Walden crate: identifiers, hybrid timestamps and the stable error
//! codes that cross process boundaries.

pub mod code;
#[cfg(feature = "testing")]
pub mod test_host;
pub mod tick;

pub use code::{ErrorCode, HasErrorCode};
pub use tick::TimeTick;

use std::fmt;

/// The position of a message in one pchannel's log, assigned by the WAL storage.
///
/// Ids are dense and strictly increasing in append order within a pchannel; they are not
/// comparable across pchannels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId(pub u64);

impl MessageId {
    /// The id after this one.
    #[must_use]
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The incarnation number of a pchannel's writer. It only grows; a writer holding an older term is
/// fenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Term(pub u64);

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An error and its sources on one line (`a: b: c`), a source left out when the text before
/// already holds it (many errors repeat their source's message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// `s` quoted for an error message, cut to its first 64 characters (with its length) when
/// longer: error texts travel in gRPC headers, and a 100 KB name there broke the HTTP/2 stream
/// and reached the caller as a transport error.
pub fn quote_short(s: &str) -> String {
    const KEEP: usize = 64;
    match s.char_indices().nth(KEEP) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

/// Cuts an error text to at most `max` bytes (at a character boundary; `max` should exceed the
/// 9-byte marker), saying so.
pub fn truncate_message(mut s: String, max: usize) -> String {
    const CUT: &str = "... (cut)";
    if s.len() > max {
        // The marker counts toward `max` too.
        let mut cut = max.saturating_sub(CUT.len());
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(CUT);
    }
    s
}

/// Largest pchannel name accepted anywhere (it is written into segment headers and keys).
pub const MAX_PCHANNEL_NAME_LEN: usize = 255;

/// Checks a pchannel or vchannel name: non-empty, at most [`MAX_PCHANNEL_NAME_LEN`] bytes, and
/// only `[A-Za-z0-9_.-]`, so it is safe as a file name and an etcd key segment.
pub fn validate_channel_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("channel name is empty".into());
    }
    if name.len() > MAX_PCHANNEL_NAME_LEN {
        return Err(format!(
            "channel name is {} bytes, more than {MAX_PCHANNEL_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "channel name {} has the character {c:?}",
            quote_short(name)
        ));
    }
    if name.starts_with('.') {
        return Err(format!(
            "channel name {} starts with '.'",
            quote_short(name)
        ));
    }
    Ok(())
}

/// Checks a collection or partition name (`what` says which): 1 to 255 of `[A-Za-z0-9_-]`.
pub fn validate_object_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {} must be 1 to 255 of [A-Za-z0-9_-]",
            quote_short(name)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_that_are_unsafe_as_paths_are_refused() {
        assert!(validate_channel_name("walden-dml-0").is_ok());
        assert!(validate_channel_name("coll_1v0.x").is_ok());
        for bad in ["", "..", "a/b", "a b", ".hidden", &"x".repeat(256)] {
            assert!(validate_channel_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn errors_about_huge_names_quote_only_their_start() {
        let name = "x".repeat(100_000);
        let e = validate_object_name("collection", &name).unwrap_err();
        assert!(e.len() < 200, "{} bytes", e.len());
        assert!(e.contains("100000 bytes"), "{e}");
        let e = validate_channel_name(&format!("{name}/")).unwrap_err();
        assert!(e.len() < 200, "{} bytes", e.len());
        // At most `max` bytes, the marker included, cut at a character boundary.
        let cut = truncate_message("é".repeat(10), 14);
        assert_eq!(cut, "éé... (cut)");
        assert!(cut.len() <= 14);
        assert_eq!(truncate_message("short".into(), 14), "short");
    }
}
