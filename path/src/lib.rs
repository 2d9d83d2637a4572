//! Request paths as the router and every later step see them: normalised, or refused with 400.
//! A crate of its own because two crates apply the same rules: the dataplane to each
//! request before routing, and the plugin host to a path a hook sets
//! (`request_set_path`).
//!
//! **Invariant:** no request reaches an upstream with a path that a lenient server would
//! resolve into a listen path other than the one the gateway routed and authenticated it
//! for. "Lenient" means a server that percent-decodes twice, reads `\` as `/`, drops
//! `;parameters` from segments, merges repeated slashes and resolves dot-segments. So the
//! gateway resolves what it safely can itself (unreserved escapes, dot-segments, repeated
//! slashes) and refuses whatever such a server could read differently from the gateway.
//! [`without_parameters`] is the one part of that view that needs the router: the chain
//! checks that a path routes to the same API with its `;parameters` dropped.
#![forbid(unsafe_code)]

use std::borrow::Cow;

use http::{Uri, uri::PathAndQuery};

macro_rules! path_errors {
    ($($(#[$doc:meta])* $name:ident => $msg:literal,)*) => {
        /// Why a request path was refused. Each message is also the 400 answer's JSON
        /// `error`, after `bad request path: `.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
        pub enum PathError {
            $($(#[$doc])* #[error($msg)] $name,)*
        }

        impl PathError {
            /// `{"error": "bad request path: <message>"}`; the messages hold no `"` or `\`.
            pub fn json(self) -> &'static str {
                match self {
                    $(Self::$name => concat!(r#"{"error":"bad request path: "#, $msg, r#""}"#),)*
                }
            }
        }
    };
}

path_errors! {
    /// Empty, `*` (`OPTIONS *`) or an authority-form target: nothing to route.
    NotAbsolute => "it does not start with /",
    /// `%` not followed by two hex digits (`%zz`, `%2`, `%u002e`).
    InvalidEscape => "a % is not followed by two hex digits",
    /// `%2F`, `%5C` or `%3B` in any case: servers disagree on whether they split segments.
    EncodedDelimiter => "it encodes a slash, backslash or semicolon (%2F, %5C or %3B)",
    /// A raw `\`, which some servers read as `/`.
    Backslash => "it contains a backslash",
    /// A byte below 0x20 or 0x7F, raw or percent-encoded (`%00`, `%0a`).
    ControlByte => "it contains a control character, raw or percent-encoded",
    /// `%25` followed by two hex digits: decoded twice it is another character (`%252e`).
    DoubleEncoded => "it contains an encoded % that starts another escape (%25 and two hex digits)",
    /// Percent-encoded bytes of 0x80 and above that do not form UTF-8 (overlong `%c0%ae`,
    /// lone continuation bytes, surrogates, or a sequence broken by a raw character).
    BadUtf8Escape => "its percent-encoded bytes are not valid UTF-8",
    /// More `..` segments than segments before them.
    AboveRoot => "its dot-segments climb above the root",
    /// A segment whose name before `;` is empty, `.` or `..` (`..;/`): a server that drops
    /// parameters reads it as an empty or dot segment.
    DotSegmentParameters => "a segment that is empty, . or .. carries ;parameters",
    /// With its `;parameters` dropped the path routes to another API (or none).
    ParametersChangeRoute => "without its ;parameters it would match another API",
    /// The normalised path could not be put back into the request URI; not expected.
    Unrepresentable => "the normalised path is not a valid URI path",
}

/// Normalises a request path (the path of the request-target, without `?query`).
///
/// In order:
/// 1. percent-encoded unreserved characters (RFC 3986 2.3: `A-Z a-z 0-9 - . _ ~`) are
///    decoded (`%2e` is `.`, `%41` is `A`); every other escape is kept as it is, hex case
///    included;
/// 2. empty segments are dropped, so repeated slashes merge (`//a` is `/a`), except that a
///    trailing slash stays;
/// 3. `.` and `..` segments are removed as RFC 3986 5.2.4 does (`/a/b/../c` is `/a/c`,
///    `/a/..` is `/`, `/a/.` is `/a/`), but a `..` with nothing left to remove is refused.
///
/// Refused ([`PathError`]): a path not starting with `/`; `%` without two hex digits;
/// encoded `/`, `\` or `;`; raw `\`; control bytes raw or encoded; `%25` followed by two
/// hex digits; encoded bytes that are not UTF-8; climbing above the root; `;parameters` on
/// an empty, `.` or `..` segment. Refusals are checked on the decoded path, so an escape
/// cannot hide them (`%25%32%65` decodes to `%252e` and is refused).
///
/// A path that is already normal comes back borrowed: one pass over the bytes and no
/// allocation. The result is itself normal: `normalise(normalise(p)) == normalise(p)`.
///
/// # Example
/// ```
/// use gatehouse_path::{PathError, normalise};
/// assert_eq!(normalise("/pub/%2e%2e/priv//x").unwrap(), "/priv/x");
/// assert_eq!(normalise("/pub/x").unwrap(), "/pub/x");
/// assert_eq!(normalise("/pub/..%2fpriv"), Err(PathError::EncodedDelimiter));
/// assert_eq!(normalise("/pub/../.."), Err(PathError::AboveRoot));
/// ```
pub fn normalise(path: &str) -> Result<Cow<'_, str>, PathError> {
    if check(path)? {
        return Ok(Cow::Borrowed(path));
    }
    let out = rewrite(path)?;
    // The rewrite removes everything `check` calls not normal; what is left is only
    // checked for refusals that decoding may have formed.
    let normal = check(&out)?;
    debug_assert!(normal, "rewrite left {out:?} not normal");
    Ok(Cow::Owned(out))
}

/// Normalises `uri`'s path in place, keeping its query (as sent), scheme and authority.
/// Leaves an already normal URI untouched, without allocating.
pub fn normalise_uri(uri: &mut Uri) -> Result<(), PathError> {
    let Cow::Owned(path) = normalise(uri.path())? else {
        return Ok(());
    };
    let mut parts = uri.clone().into_parts();
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| PathError::Unrepresentable)?);
    *uri = Uri::from_parts(parts).map_err(|_| PathError::Unrepresentable)?;
    Ok(())
}

/// The key a listen path is matched by: without its trailing slashes, so `/a/` owns `/a`,
/// `/a/` and `/a/b` but not `/ab`.
pub fn prefix_key(listen_path: &str) -> &str {
    listen_path.trim_end_matches('/')
}

/// The path as a server that drops `;parameters` reads it (`/a;x/b;y=1` is `/a/b`), or
/// `None` when it has none. For a path [`normalise`] returned: the result is normal too.
pub fn without_parameters(path: &str) -> Option<String> {
    if !path.contains(';') {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(seg.split(';').next().unwrap_or(""));
    }
    Some(out)
}

/// RFC 3986 2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte `%XX` at `at` stands for.
fn escape(b: &[u8], at: usize) -> Result<u8, PathError> {
    match (b.get(at + 1).copied().and_then(hex), b.get(at + 2).copied().and_then(hex)) {
        (Some(h), Some(l)) => Ok((h << 4) | l),
        _ => Err(PathError::InvalidEscape),
    }
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// Validates `path` and says whether it is already normal (no unreserved escape, no empty
/// segment but a trailing one, no `.` or `..` segment). One pass, no allocation.
fn check(path: &str) -> Result<bool, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut normal = true;
    let mut seg_start = 1;
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'/' => {
                normal &= segment(&b[seg_start..i], false)?;
                seg_start = i + 1;
                i += 1;
            }
            b'%' => match escape(b, i)? {
                b'/' | b'\\' | b';' => return Err(PathError::EncodedDelimiter),
                c if is_control(c) => return Err(PathError::ControlByte),
                b'%' if escape(b, i + 2).is_ok() => return Err(PathError::DoubleEncoded),
                c if c >= 0x80 => i = utf8_escapes(b, i, c)?,
                c => {
                    normal &= !is_unreserved(c);
                    i += 3;
                }
            },
            b'\\' => return Err(PathError::Backslash),
            c if is_control(c) => return Err(PathError::ControlByte),
            _ => i += 1,
        }
    }
    normal &= segment(&b[seg_start..], true)?;
    Ok(normal)
}

/// Checks one segment (between slashes, still encoded); whether it may stay as it is.
fn segment(seg: &[u8], last: bool) -> Result<bool, PathError> {
    let name_end = seg.iter().position(|&c| c == b';');
    if let Some(end) = name_end
        && matches!(&seg[..end], b"" | b"." | b"..")
    {
        return Err(PathError::DotSegmentParameters);
    }
    Ok(match seg {
        b"" => last,
        b"." | b".." => false,
        _ => true,
    })
}

/// Checks the UTF-8 sequence whose first, escaped byte `lead` is at `at`: every byte of it
/// must be escaped too, and together they must be one valid, shortest-form character.
/// Returns the index after the sequence.
fn utf8_escapes(b: &[u8], at: usize, lead: u8) -> Result<usize, PathError> {
    let width = match lead {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return Err(PathError::BadUtf8Escape),
    };
    let mut buf = [lead, 0, 0, 0];
    for (k, slot) in buf.iter_mut().enumerate().take(width).skip(1) {
        let pos = at + 3 * k;
        if b.get(pos) != Some(&b'%') {
            return Err(PathError::BadUtf8Escape);
        }
        *slot = escape(b, pos)?;
    }
    std::str::from_utf8(&buf[..width]).map_err(|_| PathError::BadUtf8Escape)?;
    Ok(at + 3 * width)
}

/// Decodes unreserved escapes and resolves empty and dot segments. Refusals that only
/// show on the result are left to the `check` that follows.
fn rewrite(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut segments = rest.split('/').peekable();
    while let Some(raw) = segments.next() {
        let last = segments.peek().is_none();
        let start = out.len();
        out.push('/');
        decode_unreserved(raw, &mut out)?;
        match &out[start + 1..] {
            "" | "." => out.truncate(start),
            ".." => {
                out.truncate(start);
                let parent = out.rfind('/').ok_or(PathError::AboveRoot)?;
                out.truncate(parent);
            }
            _ => continue,
        }
        // A path ending in an empty or dot segment names a directory: keep its slash.
        if last {
            out.push('/');
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Appends `seg` with its unreserved escapes decoded.
fn decode_unreserved(seg: &str, out: &mut String) -> Result<(), PathError> {
    let b = seg.as_bytes();
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            i += 1;
            continue;
        }
        let c = escape(b, i)?;
        if is_unreserved(c) {
            out.push_str(&seg[copied..i]);
            out.push(char::from(c));
            copied = i + 3;
        }
        i += 3;
    }
    out.push_str(&seg[copied..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{PathError::*, *};

    /// (input, normalised or refused)
    const TABLE: &[(&str, Result<&str, PathError>)] = &[
        // Already normal: borrowed.
        ("/", Ok("/")),
        ("/pub/x", Ok("/pub/x")),
        ("/pub/x/", Ok("/pub/x/")),
        ("/pub/a%20b", Ok("/pub/a%20b")),
        ("/pub/caf%C3%A9", Ok("/pub/caf%C3%A9")),
        ("/pub/café", Ok("/pub/café")),
        ("/pub/...", Ok("/pub/...")),
        ("/pub/.x/x./..x", Ok("/pub/.x/x./..x")),
        ("/pub/a;b=1/c", Ok("/pub/a;b=1/c")),
        ("/pub/100%25", Ok("/pub/100%25")),
        ("/pub/%25zz", Ok("/pub/%25zz")),
        ("/pub/%3f%23", Ok("/pub/%3f%23")),
        // Dot-segments and slashes.
        ("/pub/../priv/secret", Ok("/priv/secret")),
        ("/pub/./x", Ok("/pub/x")),
        ("/pub/x/.", Ok("/pub/x/")),
        ("/pub/x/..", Ok("/pub/")),
        ("/pub/..", Ok("/")),
        ("/pub/a/b/../../c", Ok("/pub/c")),
        ("//pub//x", Ok("/pub/x")),
        ("/pub//../priv", Ok("/priv")),
        ("/pub/x//", Ok("/pub/x/")),
        ("//", Ok("/")),
        ("/.", Ok("/")),
        ("/./", Ok("/")),
        // Unreserved escapes, any case.
        ("/pub/%2e%2e/priv", Ok("/priv")),
        ("/pub/%2E%2E/priv", Ok("/priv")),
        ("/pub/.%2e/priv", Ok("/priv")),
        ("/pub/%2e./priv", Ok("/priv")),
        ("/pub/%2e/x", Ok("/pub/x")),
        ("/p%75b/%41%7e%5f", Ok("/pub/A~_")),
        ("/pub/%41%20", Ok("/pub/A%20")),
        // Refused.
        ("", Err(NotAbsolute)),
        ("*", Err(NotAbsolute)),
        ("pub/x", Err(NotAbsolute)),
        ("/..", Err(AboveRoot)),
        ("/pub/../..", Err(AboveRoot)),
        ("/pub/../../priv", Err(AboveRoot)),
        ("/%2e%2e/x", Err(AboveRoot)),
        ("/pub/..%2fpriv", Err(EncodedDelimiter)),
        ("/pub/%2F", Err(EncodedDelimiter)),
        ("/pub/%5c..%5cpriv", Err(EncodedDelimiter)),
        ("/pub/%5C", Err(EncodedDelimiter)),
        ("/pub/a%3bb", Err(EncodedDelimiter)),
        ("/pub/..\\priv", Err(Backslash)),
        ("/pub/\\", Err(Backslash)),
        ("/pub/%00", Err(ControlByte)),
        ("/pub/%0a", Err(ControlByte)),
        ("/pub/%0D%0A", Err(ControlByte)),
        ("/pub/%7f", Err(ControlByte)),
        ("/pub/\0", Err(ControlByte)),
        ("/pub/a\tb", Err(ControlByte)),
        ("/pub/%zz", Err(InvalidEscape)),
        ("/pub/%2", Err(InvalidEscape)),
        ("/pub/%", Err(InvalidEscape)),
        ("/pub/%u002e", Err(InvalidEscape)),
        ("/pub/%2%65", Err(InvalidEscape)),
        ("/pub/%252e%252e/priv", Err(DoubleEncoded)),
        ("/pub/%252f", Err(DoubleEncoded)),
        ("/pub/%25%32%65", Err(DoubleEncoded)),
        ("/pub/%c0%ae%c0%ae/priv", Err(BadUtf8Escape)),
        ("/pub/%e0%80%ae", Err(BadUtf8Escape)),
        ("/pub/%80", Err(BadUtf8Escape)),
        ("/pub/%c3", Err(BadUtf8Escape)),
        ("/pub/%c3é", Err(BadUtf8Escape)),
        ("/pub/%ed%a0%80", Err(BadUtf8Escape)),
        ("/pub/%ff", Err(BadUtf8Escape)),
        ("/pub/..;/priv", Err(DotSegmentParameters)),
        ("/pub/.;x/y", Err(DotSegmentParameters)),
        ("/pub/;x/../priv", Err(DotSegmentParameters)),
        ("/pub/.%2e;/priv", Err(DotSegmentParameters)),
        ("/pub/%2e%2e;x", Err(DotSegmentParameters)),
    ];

    #[test]
    fn normalises_or_refuses_every_case_in_the_table() {
        for (input, want) in TABLE {
            let got = normalise(input);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "normalise({input:?})");
        }
    }

    #[test]
    fn normal_paths_come_back_borrowed_and_others_owned() {
        for (input, want) in TABLE {
            match (normalise(input), want) {
                (Ok(Cow::Borrowed(_)), Ok(w)) => assert_eq!(input, w, "{input:?} borrowed but changed"),
                (Ok(Cow::Owned(_)), Ok(w)) => assert_ne!(input, w, "{input:?} unchanged but allocated"),
                _ => {}
            }
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for (input, _) in TABLE {
            if let Ok(once) = normalise(input) {
                assert!(matches!(normalise(&once), Ok(Cow::Borrowed(p)) if p == once), "{input:?} → {once:?}");
            }
        }
    }

    #[test]
    fn uri_keeps_query_scheme_and_authority() {
        let mut u: Uri = "http://api.example.com:8080/pub/%2e%2e/priv//x?a=%2e%2e&b=/../".parse().expect("uri");
        normalise_uri(&mut u).expect("normal");
        assert_eq!(u.to_string(), "http://api.example.com:8080/priv/x?a=%2e%2e&b=/../");
        let mut u: Uri = "/x/./y".parse().expect("uri");
        normalise_uri(&mut u).expect("normal");
        assert_eq!(u.to_string(), "/x/y");
        let mut u: Uri = "/pub/..%2f".parse().expect("uri");
        assert_eq!(normalise_uri(&mut u), Err(EncodedDelimiter));
    }

    #[test]
    fn parameters_are_dropped_per_segment() {
        assert_eq!(without_parameters("/pub/x"), None);
        assert_eq!(without_parameters("/priv;x/secret;jsessionid=1").as_deref(), Some("/priv/secret"));
        assert_eq!(without_parameters("/a;b;c/").as_deref(), Some("/a/"));
    }

    #[test]
    fn error_bodies_are_json_naming_the_reason() {
        for e in [
            NotAbsolute,
            InvalidEscape,
            EncodedDelimiter,
            Backslash,
            ControlByte,
            DoubleEncoded,
            BadUtf8Escape,
            AboveRoot,
            DotSegmentParameters,
            ParametersChangeRoute,
            Unrepresentable,
        ] {
            let v: serde_json::Value = serde_json::from_str(e.json()).expect("json");
            assert_eq!(v["error"], format!("bad request path: {e}"));
        }
    }
}
