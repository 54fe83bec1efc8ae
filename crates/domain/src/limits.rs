//! Limits on what comes from the network, in one place. Each is checked before the value is
//! used or stored, and a value over its limit gets a clear error naming the field and the
//! limit. The user documentation lists them (docs/api.md, "Limits").

/// Bytes of a run ID as a client sends it (a UUID is 36).
pub const MAX_RUN_ID_LEN: usize = 64;
/// Bytes of an e-stop target (`site=aap`, a workflow name, `*`).
pub const MAX_ESTOP_TARGET_LEN: usize = 256;
/// Bytes of the reason given with an e-stop change or a cancel.
pub const MAX_REASON_LEN: usize = 1024;
/// Bytes of the actor a client names (`x-steward-actor`).
pub const MAX_ACTOR_LEN: usize = 128;
/// Nesting of mappings and lists in a workflow document (YAML or JSON), checked before parsing.
pub const MAX_SPEC_DEPTH: usize = 64;
/// Bytes of user input quoted back in an error message.
pub const MAX_ECHO_LEN: usize = 64;

/// The largest character boundary of `s` at or below `at`: where to cut `s` to at most `at`
/// bytes.
pub fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// `value` for an error message: as is when short, else its first [`MAX_ECHO_LEN`] bytes (on a
/// character boundary) and its length, so no error grows with its input.
pub fn clip(value: &str) -> String {
    if value.len() <= MAX_ECHO_LEN {
        return format!("{value:?}");
    }
    let mut end = MAX_ECHO_LEN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &value[..end], value.len())
}

/// `Err` naming `field` and the limit when `value` is longer than `max` bytes.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        Err(format!(
            "{field}: is {} bytes; the limit is {max}",
            value.len()
        ))
    } else {
        Ok(())
    }
}

/// Refuses a parsed document whose mappings and lists nest more than `max` levels deep,
/// with [`check_depth`]'s message. Walks without recursion.
pub fn check_value_depth(value: &serde_json::Value, max: usize) -> Result<(), String> {
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(a) => Box::new(a.iter()),
            serde_json::Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        if depth + 1 > max {
            return Err(format!(
                "nests mappings and lists more than {max} levels deep; the limit is {max}"
            ));
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    Ok(())
}

/// The deepest nesting of `{`/`[` in a YAML or JSON document, stopping as soon as it passes
/// `max` (so a hostile document costs one partial scan, never a parse).
///
/// Brackets inside quoted scalars do not count. A quote opens a scalar only where a token can
/// start (after a space, a bracket, `,` or `:`, or at the start of a line), as in YAML and
/// JSON; a `'` or `"` inside a plain scalar (`don't`) is literal. Block-style YAML nests by
/// indentation, which the size limit already bounds; each indentation step counts as one level
/// here too, measured in columns.
pub fn check_depth(text: &str, max: usize) -> Result<(), String> {
    let mut depth = 0usize;
    let mut at_token_start = true;
    let mut chars = text.chars().peekable();
    let mut line_start = true;
    let mut indent = 0usize;
    let too_deep =
        || format!("nests mappings and lists more than {max} levels deep; the limit is {max}");
    while let Some(c) = chars.next() {
        if line_start {
            if c == ' ' {
                indent += 1;
                continue;
            }
            line_start = false;
            // A block-style level takes at least one column of indentation.
            if depth + indent / 2 > max && c != '\n' && c != '#' {
                return Err(too_deep());
            }
        }
        match c {
            '\n' => {
                line_start = true;
                indent = 0;
                at_token_start = true;
                continue;
            }
            '#' if at_token_start => {
                // A comment runs to the end of the line.
                for n in chars.by_ref() {
                    if n == '\n' {
                        line_start = true;
                        indent = 0;
                        break;
                    }
                }
                at_token_start = true;
                continue;
            }
            '"' if at_token_start => {
                let mut escaped = false;
                for n in chars.by_ref() {
                    match (escaped, n) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        _ => {}
                    }
                }
            }
            '\'' if at_token_start => {
                while let Some(n) = chars.next() {
                    if n == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > max {
                    return Err(too_deep());
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at_token_start = matches!(c, ' ' | '\t' | '[' | '{' | ',' | ':' | '-' | '?');
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_outside_quoted_scalars() {
        assert!(check_depth("{a: [1, {b: 2}]}", 3).is_ok());
        assert!(check_depth("{a: [1, {b: [2]}]}", 3).is_err());
        assert!(check_depth(r#"{"a": "[[[[[[", "b": '{{{{''{{'}"#, 1).is_ok());
        assert!(check_depth("a: don't [x]", 1).is_ok());
        assert!(check_depth("# [[[[[[\na: 1", 0).is_ok());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(check_depth(&deep, 64).is_err());
        let deep_block: String = (0..200)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert!(check_depth(&deep_block, 64).is_err());
    }

    #[test]
    fn value_depth_counts_every_level_as_the_text_does() {
        let v: serde_json::Value = serde_json::from_str("{\"a\": [1, {\"b\": 2}]}").unwrap();
        assert!(check_value_depth(&v, 3).is_ok());
        assert!(check_value_depth(&v, 2).is_err());
        assert!(check_value_depth(&serde_json::json!(1), 0).is_ok());
    }

    #[test]
    fn yaml_aliases_cannot_nest_past_the_limit() {
        // Each anchor wraps the one before: 70 levels from 70 short lines.
        let mut text = String::from("name: x\nblocks: []\nlabels: {}\nx0: &b0 [1]\n");
        for i in 1..70 {
            text.push_str(&format!("x{i}: &b{i} [*b{}]\n", i - 1));
        }
        assert!(check_depth(&text, 64).is_ok(), "the text alone is shallow");
        let err = crate::WorkflowSpec::parse_unchecked(&text).unwrap_err();
        assert!(
            err.to_string()
                .contains("more than 64 levels deep; the limit is 64"),
            "{err}"
        );
    }

    #[test]
    fn clip_bounds_what_an_error_echoes() {
        assert_eq!(clip("abc"), "\"abc\"");
        let long = "é".repeat(1000);
        let c = clip(&long);
        assert!(c.len() < 100 && c.ends_with("(2000 bytes)"), "{c}");
    }
}
