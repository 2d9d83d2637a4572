//! Durations in the Gateway API form (`500ms`, `1s`, `1m30s`, `1h`).

use std::{fmt, str::FromStr};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as up to four `<number><unit>` parts, units `h`, `m`, `s`, `ms`:
/// the same form (and the same pattern) as the Gateway API's `Duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

pub const PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// The longest duration accepted: the pattern allows `99999h99999h`, but a duration is
/// written back as whole hours first (`199998h`), which the pattern refuses. Capping at the
/// largest hour count one part can hold keeps every accepted duration writable; nothing
/// Gatehouse times needs more than 11 years.
pub const MAX: std::time::Duration = std::time::Duration::from_secs(99_999 * 3600);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    pub fn as_std(self) -> std::time::Duration {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err =
            || ParseDurationError { input: s.to_owned(), reason: "expected parts like 500ms, 1s, 2m, 1h (e.g. 1m30s)" };
        let mut rest = s;
        let mut total = std::time::Duration::ZERO;
        let mut parts = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 5 {
                return Err(err());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (std::time::Duration::from_millis(1), 2)
            } else if rest.starts_with('h') {
                (std::time::Duration::from_secs(3600), 1)
            } else if rest.starts_with('m') {
                (std::time::Duration::from_secs(60), 1)
            } else if rest.starts_with('s') {
                (std::time::Duration::from_secs(1), 1)
            } else {
                return Err(err());
            };
            rest = &rest[len..];
            total += unit * u32::try_from(n).map_err(|_| err())?;
            parts += 1;
        }
        if parts == 0 || parts > 4 {
            return Err(err());
        }
        if total > MAX {
            return Err(ParseDurationError { input: s.to_owned(), reason: "at most 99999h" });
        }
        Ok(Self(total))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "maxLength": 32, "pattern": PATTERN })
    }
    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_forms() {
        for (s, ms) in [("500ms", 500), ("1s", 1000), ("2m", 120_000), ("1h", 3_600_000), ("1m30s", 90_000)] {
            assert_eq!(s.parse::<Duration>().map(|d| d.0.as_millis()), Ok(ms), "{s}");
        }
    }

    #[test]
    fn rejects_what_the_pattern_rejects() {
        for s in ["", "1", "s", "1x", "1.5s", "123456s", "1h1m1s1ms1s", "-1s", "1 s"] {
            assert!(s.parse::<Duration>().is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn longer_than_one_part_of_hours_is_refused_rather_than_written_unreadably() {
        // `99999h99999h` matched the pattern and parsed, but was written
        // back as `199998h`, which neither the parser nor the CRD pattern accepts.
        let err = "99999h99999h".parse::<Duration>().expect_err("above MAX");
        assert_eq!(err.to_string(), r#"invalid duration "99999h99999h": at most 99999h"#);
        for s in ["99999h", "99998h59m60s", "99999h0ms"] {
            let d: Duration = s.parse().expect("at most MAX");
            assert_eq!(d.to_string().parse::<Duration>(), Ok(d), "{s}");
        }
        assert!("99999h1ms".parse::<Duration>().is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in ["500ms", "1s", "1m30s", "1h", "1h0m1s"] {
            let d: Duration = s.parse().expect("valid");
            assert_eq!(d.to_string().parse::<Duration>(), Ok(d));
        }
    }
}
