//! Reading `proxy.toml` into [`model::File`] with every problem serde finds, not just the first.
//!
//! serde stops at the first error, so the file is parsed once (with spans) and deserialized in
//! rounds: after each error, the entry at fault (an unknown key, a bad value, or a table missing
//! a required key) is taken out of the parsed table and the rest is deserialized again. The spans
//! stay those of the original text, since entries are only ever taken out. What a taken-out entry
//! leaves behind is its default, so a file whose only problem is one bad value still reaches
//! validation with everything else it says; a `[[route]]` without a usable `path` is left out.
//! Only a TOML syntax error stops reading at once: past it there is no table to read.

use std::ops::Range;

use toml_edit::{DocumentMut, ImDocument, Item, Table, TableLike};

use super::model::File;
use super::Problem;

/// Required top-level keys, and what stands in for one that is missing or unusable, so that the
/// rest of the file is still checked. A stand-in is never served: its absence is a problem.
const STAND_INS: &[(&str, &str)] = &[
    ("listen", "127.0.0.1:0"),
    ("upstream", "http://upstream.invalid"),
];

/// Deserialize `text`, collecting every problem. `None` when there is nothing left to validate
/// (a syntax error); otherwise the file as read without its faulty entries.
pub(super) fn read(text: &str) -> (Option<File>, Vec<Problem>) {
    let mut root = match ImDocument::parse(text) {
        Ok(doc) => doc.into_table(),
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let problem = Problem {
                key: super::key_at(text, span.start),
                span,
                message: e.message().to_string(),
            };
            return (None, vec![problem]);
        }
    };
    let root_span = root.span().unwrap_or(0..0);
    let mut problems = Vec::new();
    // (span of a table, key) for every entry taken out: the "missing field" error that taking out
    // a required key causes is a consequence, not a second problem.
    let mut taken: Vec<(Range<usize>, String)> = Vec::new();
    // Every round takes an entry out or stands in for a required key; the bound is a backstop.
    for _ in 0..=text.len() + STAND_INS.len() {
        let error = match toml_edit::de::from_document::<File>(DocumentMut::from(root.clone())) {
            Ok(file) => return (Some(file), problems),
            Err(e) => e,
        };
        let span = error.span().unwrap_or(0..0);
        let message = error.message().trim();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
            .map(str::to_string);
        let found = if span == root_span || span.is_empty() {
            Some(Found {
                path: Vec::new(),
                table: root_span.clone(),
            })
        } else {
            find_in(&root, root_span.clone(), &span)
        };
        // A missing key is reported at its table: the file's root, or the table at `span`.
        let table = match &found {
            Some(f) if f.path.is_empty() => root_span.clone(),
            _ => span.clone(),
        };
        let consequence = missing
            .as_ref()
            .is_some_and(|m| taken.iter().any(|(t, k)| *t == table && k == m));
        if !consequence {
            problems.push(Problem {
                // serde reports a missing key at its table; name the key from the message.
                key: missing
                    .clone()
                    .unwrap_or_else(|| super::key_at(text, span.start)),
                span: span.clone(),
                message: suggest(message),
            });
        }
        let Some(found) = found else {
            return (None, problems);
        };
        if found.path.is_empty() {
            // The file as a whole: only a missing required key can be stood in for.
            let stand_in = missing.as_deref().and_then(|m| {
                STAND_INS
                    .iter()
                    .find(|(k, _)| *k == m && !root.contains_key(k))
            });
            match stand_in {
                Some((key, value)) => {
                    root.insert(key, toml_edit::value(*value));
                }
                None => return (None, problems),
            }
            continue;
        }
        if let Some(Step::Key(k)) = found.path.last() {
            taken.push((found.table.clone(), k.clone()));
        }
        if !take_in(&mut root, &found.path) {
            return (None, problems);
        }
    }
    (None, problems)
}

/// One step down a TOML document: a key of a table, or an element of an array of tables.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The entry an error is about, and the span of the table holding it.
#[derive(Debug)]
struct Found {
    path: Vec<Step>,
    table: Range<usize>,
}

/// The innermost entry of `table` (span `table_span`) whose key or value holds the error at
/// `error`, or whose whole value is the table the error is about.
fn find_in(table: &dyn TableLike, table_span: Range<usize>, error: &Range<usize>) -> Option<Found> {
    let at = error.start;
    let holds = |s: Option<Range<usize>>| s.is_some_and(|s| s.contains(&at));
    for (k, item) in table.iter() {
        let here = || Found {
            path: vec![Step::Key(k.to_string())],
            table: table_span.clone(),
        };
        if item.span().as_ref() == Some(error) {
            return Some(here());
        }
        // Children first: a sub-table (`[route.auth]`) lies outside its parent's span.
        if let Some(mut found) = find_below(item, error) {
            found.path.insert(0, Step::Key(k.to_string()));
            return Some(found);
        }
        if holds(table.key(k).and_then(|key| key.span())) || holds(item.span()) {
            return Some(here());
        }
    }
    None
}

fn find_below(item: &Item, error: &Range<usize>) -> Option<Found> {
    if let Some(tables) = item.as_array_of_tables() {
        for (i, t) in tables.iter().enumerate() {
            let span = t.span().unwrap_or(0..0);
            if span == *error {
                return Some(Found {
                    path: vec![Step::Index(i)],
                    table: span,
                });
            }
            if let Some(mut found) = find_in(t, span.clone(), error) {
                found.path.insert(0, Step::Index(i));
                return Some(found);
            }
            if span.contains(&error.start) {
                return Some(Found {
                    path: vec![Step::Index(i)],
                    table: span,
                });
            }
        }
        return None;
    }
    let table = item.as_table_like()?;
    find_in(table, item.span().unwrap_or(0..0), error)
}

/// Take the entry at `path` out of `table`; false if there is none.
fn take_in(table: &mut dyn TableLike, path: &[Step]) -> bool {
    match path {
        [Step::Key(k)] => table.remove(k).is_some(),
        [Step::Key(k), rest @ ..] => {
            let Some(child) = table.get_mut(k) else {
                return false;
            };
            let taken = take_below(child, rest);
            // An array of tables left empty goes too (as if it had never been written).
            if child.as_array_of_tables().is_some_and(|a| a.is_empty()) {
                table.remove(k);
            }
            taken
        }
        _ => false,
    }
}

fn take_below(item: &mut Item, path: &[Step]) -> bool {
    match path {
        [Step::Index(i), rest @ ..] => {
            let Some(tables) = item.as_array_of_tables_mut() else {
                return false;
            };
            if rest.is_empty() {
                if *i >= tables.len() {
                    return false;
                }
                tables.remove(*i);
                return true;
            }
            tables
                .get_mut(*i)
                .is_some_and(|t: &mut Table| take_in(t, rest))
        }
        _ => item.as_table_like_mut().is_some_and(|t| take_in(t, path)),
    }
}

/// serde's "unknown field `histroy`, expected one of `history`, …" (or "unknown variant") as
/// "unknown field `histroy` (did you mean `history`?)" when one expected name is close enough to
/// be the one meant; other messages as they are.
fn suggest(message: &str) -> String {
    let Some((head, expected)) = message.split_once(", expected ") else {
        return message.to_string();
    };
    let Some(written) = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| head.strip_prefix(p))
        .and_then(|rest| rest.strip_suffix('`'))
    else {
        return message.to_string();
    };
    let candidates = expected.split('`').skip(1).step_by(2);
    let mut best: Option<(usize, &str)> = None;
    let mut tied = false;
    for c in candidates {
        let d = distance(written, c);
        match best {
            Some((b, _)) if d > b => {}
            Some((b, _)) if d == b => tied = true,
            _ => {
                best = Some((d, c));
                tied = false;
            }
        }
    }
    match best {
        // Close: at most one edit for short names, two for longer ones (`histroy` → `history`).
        Some((d, c)) if !tied && d > 0 && d <= if c.len() <= 4 { 1 } else { 2 } => {
            format!("{head} (did you mean `{c}`?)")
        }
        _ => message.to_string(),
    }
}

/// Edit distance counting a swap of two neighbours as one edit (optimal string alignment).
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_one_close_name() {
        assert_eq!(
            suggest("unknown field `histroy`, expected one of `heartbeat`, `history`, `grace`"),
            "unknown field `histroy` (did you mean `history`?)"
        );
        assert_eq!(
            suggest("unknown field `intervall`, expected one of `path`, `interval`"),
            "unknown field `intervall` (did you mean `interval`?)"
        );
        assert_eq!(
            suggest("unknown field `uri`, expected `url`"),
            "unknown field `uri` (did you mean `url`?)"
        );
        assert_eq!(
            suggest("unknown variant `snapshots`, expected one of `json-patch`, `snapshot`"),
            "unknown variant `snapshots` (did you mean `snapshot`?)"
        );
        // Nothing close, or two equally close: the list stays.
        for m in [
            "unknown field `level`, expected one of `enabled`, `min_size`",
            "unknown field `ab`, expected one of `aa`, `bb`",
            "invalid type: string \"x\", expected usize",
        ] {
            assert_eq!(suggest(m), m);
        }
    }

    #[test]
    fn every_problem_of_every_table_is_read() {
        let text = "listen = \"nope\"\nupstream = \"http://u\"\nbogus = 1\n\
                    [sse]\nhistroy = 5\nheartbeat = 7\n\
                    [[route]]\npath = \"/a/{x}/{x}\"\ninterval = \"2x\"\n\
                    [[route]]\npath = \"/b\"\nintervall = \"1s\"\nauth = { url = \"/c\", cash = \"1s\" }\n\
                    [route.jwt]\nalg = \"XS256\"\n";
        let (file, problems) = read(text);
        let file = file.expect("read on past every problem");
        let messages: Vec<String> = problems
            .iter()
            .map(|p| format!("{} {}", &text[p.span.clone()], p.message))
            .collect();
        assert_eq!(problems.len(), 9, "{messages:#?}");
        for expect in [
            "\"nope\" invalid socket address",
            "bogus unknown field `bogus`",
            "histroy unknown field `histroy` (did you mean `history`?)",
            "7 invalid type: integer `7`",
            "\"/a/{x}/{x}\" invalid path",
            "\"2x\" invalid duration",
            "intervall unknown field `intervall` (did you mean `interval`?)",
            "cash unknown field `cash` (did you mean `cache`?)",
            "\"XS256\" unknown variant `XS256`",
        ] {
            assert!(
                messages.iter().any(|m| m.starts_with(expect)),
                "{expect} in {messages:#?}"
            );
        }
        // The route without a usable path is left out; the other keeps its good keys.
        assert_eq!(file.routes.len(), 1);
        let route = file.routes[0].get_ref();
        assert_eq!(route.path.get_ref().source, "/b");
        assert_eq!(route.auth.as_ref().unwrap().get_ref().url.get_ref(), "/c");
        assert!(route.jwt.is_none(), "its required alg was unusable");
    }

    #[test]
    fn syntax_errors_stop_reading() {
        let (file, problems) = read("this is not toml");
        assert!(file.is_none());
        assert_eq!(problems.len(), 1);
    }
}
