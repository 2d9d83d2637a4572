//! Durations (`500ms`, `1m30s`, ...): parsing never panics, accepts what the CRD pattern
//! accepts (up to 99999h), and what it accepts is written back in a form it reads as the same value.
#![no_main]

use gatehouse_crds::Duration;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let parsed = s.parse::<Duration>();
    match &parsed {
        Ok(_) => assert!(matches_pattern(s), "{s:?} parsed, but the CRD pattern refuses it"),
        // The one refusal the pattern cannot express: a total above 99999h.
        Err(e) if matches_pattern(s) => assert!(e.to_string().ends_with("at most 99999h"), "{s:?}: {e}"),
        Err(_) => {}
    }
    if let Ok(d) = parsed {
        let shown = d.to_string();
        assert_eq!(shown.parse::<Duration>(), Ok(d), "{s:?} is written as {shown:?}, which does not read back");
        assert!(matches_pattern(&shown), "{s:?} is written as {shown:?}, which the CRD pattern refuses");
    }
});

/// `^([0-9]{1,5}(h|m|s|ms)){1,4}$`, by hand: the fuzz build carries no regex engine.
fn matches_pattern(s: &str) -> bool {
    let mut rest = s.as_bytes();
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=5).contains(&digits) {
            return false;
        }
        rest = &rest[digits..];
        let unit = if rest.starts_with(b"ms") {
            2
        } else if matches!(rest.first(), Some(b'h' | b'm' | b's')) {
            1
        } else {
            0
        };
        if unit == 0 {
            return false;
        }
        rest = &rest[unit..];
        parts += 1;
    }
    (1..=4).contains(&parts)
}
