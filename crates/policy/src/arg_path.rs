//! Arg paths: which value inside a job's `args` a rule looks at.
//!
//! Syntax: an arg name (letters, digits, `_`, `-`), then any number of `[N]` (an array
//! element, counted from 0) or `.name` (a field of an object). Examples: `site`, `argv[3]`,
//! `target.host`, `hosts[0].name`.

use std::fmt;

use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ArgPath {
    text: String,
    /// The top-level arg name.
    name: String,
    rest: Vec<Step>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Field(String),
    Index(usize),
}

const SYNTAX: &str =
    "write an arg name, then optionally [index] or .field steps, e.g. site or argv[3]";

impl ArgPath {
    pub(crate) fn parse(text: &str) -> Result<ArgPath, String> {
        let bad = |why: &str| format!("{text:?} is not a valid arg path: {why}; {SYNTAX}");
        let (name, mut rest) = split_name(text);
        if name.is_empty() {
            return Err(bad("it must start with an arg name"));
        }
        let mut steps = Vec::new();
        while let Some(c) = rest.chars().next() {
            match c {
                '.' => {
                    let (field, after) = split_name(&rest[1..]);
                    if field.is_empty() {
                        return Err(bad("a field name must follow '.'"));
                    }
                    steps.push(Step::Field(field.to_owned()));
                    rest = after;
                }
                '[' => {
                    let Some(close) = rest.find(']') else {
                        return Err(bad("'[' without a closing ']'"));
                    };
                    let digits = &rest[1..close];
                    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad("an index must be a number, e.g. [3]"));
                    }
                    let index = digits
                        .parse::<usize>()
                        .map_err(|_| bad("the index is too large"))?;
                    steps.push(Step::Index(index));
                    rest = &rest[close + 1..];
                }
                _ => return Err(bad(&format!("unexpected {c:?}"))),
            }
        }
        Ok(ArgPath {
            text: text.to_owned(),
            name: name.to_owned(),
            rest: steps,
        })
    }

    /// The value at this path in `args`, if there is one. Does not allocate.
    pub(crate) fn resolve<'a>(&self, args: &'a Map<String, Value>) -> Option<&'a Value> {
        let mut value = args.get(&self.name)?;
        for step in &self.rest {
            value = match step {
                Step::Field(f) => value.as_object()?.get(f)?,
                Step::Index(i) => value.as_array()?.get(*i)?,
            };
        }
        Some(value)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ArgPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Splits off the leading run of name characters.
fn split_name(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(s.len());
    s.split_at(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves() {
        let args: Map<String, Value> = serde_json::from_str(
            r#"{"site": "aap", "argv": ["erase", "--machine", "aap01"], "t": {"hosts": [{"n": 1}]}}"#,
        )
        .unwrap();
        let get = |p: &str| ArgPath::parse(p).unwrap().resolve(&args).cloned();
        assert_eq!(get("site"), Some(Value::from("aap")));
        assert_eq!(get("argv[2]"), Some(Value::from("aap01")));
        assert_eq!(get("argv[3]"), None);
        assert_eq!(get("t.hosts[0].n"), Some(Value::from(1)));
        assert_eq!(get("site[0]"), None);
        assert_eq!(get("missing"), None);
    }

    #[test]
    fn rejects_bad_syntax() {
        for bad in [
            "", "[0]", "argv[", "argv[x]", "argv[]", "a.", "a b", "a..b", "argv[-1]",
        ] {
            let e = ArgPath::parse(bad).unwrap_err();
            assert!(e.contains("is not a valid arg path"), "{bad}: {e}");
        }
    }
}
