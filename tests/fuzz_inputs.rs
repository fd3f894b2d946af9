//! Property-based fuzzing of the parsers that face untrusted or hand-written input: the config
//! parser (arbitrary text and mutations of the shipped example) and the `Last-Event-ID` parser.
//! Each must return a value or a clear error, never panic; errors always carry a location.
//! (The diff has its own properties in `diff_props.rs`.)

use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../proxy.toml.example");

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn config_parser_never_panics_on_text(text in "\\PC{0,400}") {
        if let Err(e) = herald::config::parse(&text, "fuzz.toml") {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("fuzz.toml:"), "{}", msg);
        }
    }

    #[test]
    fn config_parser_never_panics_on_mutated_example(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..6, "\\PC{0,12}"), 1..6)
    ) {
        let mut text = EXAMPLE.to_string();
        for (at, kind, piece) in edits {
            let mut i = at.index(text.len().max(1));
            while i > 0 && !text.is_char_boundary(i) {
                i -= 1;
            }
            match kind {
                0 => text.insert_str(i, &piece),
                1 => { let end = (i + piece.len()).min(text.len()); if text.is_char_boundary(end) { text.replace_range(i..end, ""); } }
                2 => text.insert(i, '"'),
                3 => text.insert(i, '['),
                4 => text.insert_str(i, "\n= 1\n"),
                _ => text.insert_str(i, "\ninterval = \"0ms\"\n"),
            }
        }
        if let Err(e) = herald::config::parse(&text, "fuzz.toml") {
            let msg = e.to_string();
            for line in msg.lines() {
                prop_assert!(line.starts_with("fuzz.toml:"), "{}", line);
                let mut parts = line.splitn(4, ':');
                parts.next();
                let line_no: usize = parts.next().unwrap().parse().unwrap();
                prop_assert!(line_no >= 1 && line_no <= text.lines().count() + 1, "{}", line);
            }
        }
    }

    #[test]
    fn event_id_parser_never_panics(id in "\\PC{0,40}") {
        let _ = id.parse::<herald::hub::Position>().ok().map(|p| (p.epoch, p.seq));
    }

    #[test]
    fn event_ids_round_trip(inc in 1u32.., seq in 0u64..(1u64 << 60)) {
        let id = format!("{}-{}", b36(u64::from(inc)), b36(seq));
        prop_assert_eq!(id.parse::<herald::hub::Position>().ok().map(|p| (p.epoch, p.seq)), Some((inc, seq)));
    }
}

fn b36(mut n: u64) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}
