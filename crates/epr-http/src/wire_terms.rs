//! serde's type errors say what the *Rust* type expected (`expected struct
//! AppVersionRef`, `expected u64`, `a sequence`); clients see JSON. This rewrites them in
//! JSON terms: the field, the JSON type it takes, and what was sent.

/// `"{field} must be <JSON type>, not <what was sent>"`, from serde's message.
pub fn type_error(field: &str, serde_msg: &str) -> String {
    // serde_json appends the position; the field already says where.
    let msg = serde_msg
        .rsplit_once(" at line ")
        .map_or(serde_msg, |(head, _)| head);
    let rewritten = if let Some(rest) = msg
        .strip_prefix("invalid type: ")
        .or_else(|| msg.strip_prefix("invalid value: "))
    {
        rest.split_once(", expected ")
            .map(|(got, expected)| {
                format!(
                    "{field} must be {}, not {}",
                    expected_json(expected),
                    got_json(got)
                )
            })
            .unwrap_or_else(|| format!("{field} has the wrong type"))
    } else if let Some(rest) = msg.strip_prefix("invalid length ") {
        let expected = rest.split_once(", expected ").map_or("", |(_, e)| e);
        format!("{field} has the wrong number of elements ({})", expected)
    } else if msg.starts_with("unknown variant ") {
        // `unknown variant `x`, expected one of `a`, `b``: the names are wire values.
        format!("{field}: {msg}")
    } else if let Some(name) = msg.strip_prefix("duplicate field ") {
        format!("{field}: the field {name} is given twice")
    } else {
        format!("{field}: {msg}")
    };
    if leaks_rust(&rewritten) {
        format!("{field} has the wrong type")
    } else {
        rewritten
    }
}

/// The JSON type a Rust expectation stands for.
fn expected_json(expected: &str) -> String {
    let e = expected.trim();
    let json = if e.starts_with("struct ") || e == "a map" || e.starts_with("map") {
        "a JSON object"
    } else if e.starts_with("internally tagged enum") || e.starts_with("enum ") {
        "a JSON object with an \"op\" member"
    } else if e == "a sequence" || e.starts_with("tuple") || e.starts_with("an array") {
        "a JSON array"
    } else if e == "a string" || e == "a borrowed string" || e == "a character" {
        "a string"
    } else if e == "a boolean" {
        "true or false"
    } else if (e.starts_with('u') && e[1..].chars().all(|c| c.is_ascii_digit())) || e == "usize" {
        "a non-negative integer"
    } else if (e.starts_with('i') && e[1..].chars().all(|c| c.is_ascii_digit())) || e == "isize" {
        "an integer"
    } else if e == "f32" || e == "f64" {
        "a number"
    } else if e == "unit" {
        "null"
    } else {
        return e.to_owned();
    };
    json.to_owned()
}

/// What was sent, in JSON words (`map` → `an object`).
fn got_json(got: &str) -> String {
    let g = got.trim();
    match g {
        "map" => "an object".to_owned(),
        "sequence" => "an array".to_owned(),
        "unit" | "null" => "null".to_owned(),
        // The string sent, as serde quotes it (JSON-escaped).
        _ if g.starts_with("string \"") => format!("the {g}"),
        // serde puts numbers and booleans in backticks; JSON needs no quoting.
        _ => g
            .replace("integer `", "the number `")
            .replace("floating point `", "the number `")
            .replace("boolean `", "`")
            .replace('`', ""),
    }
}

/// Whether a message still names a Rust type (then a plain message is used instead).
fn leaks_rust(msg: &str) -> bool {
    const RUST_WORDS: &[&str] = &[
        "struct ",
        "enum ",
        "Option",
        "Vec<",
        "String",
        "sequence",
        "u8",
        "u16",
        "u32",
        "u64",
        "usize",
        "i32",
        "i64",
        "f64",
        "tuple",
        "unit value",
        "newtype",
        "::",
    ];
    RUST_WORDS.iter().any(|w| msg.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_rust_expectations() {
        assert_eq!(
            type_error(
                "appVersion",
                "invalid type: integer `5`, expected struct AppVersionRef at line 1 column 16"
            ),
            "appVersion must be a JSON object, not the number 5"
        );
        assert_eq!(
            type_error("endpoints", "invalid type: map, expected a sequence"),
            "endpoints must be a JSON array, not an object"
        );
        assert_eq!(
            type_error("limit", "invalid type: string \"x\", expected u64"),
            "limit must be a non-negative integer, not the string \"x\""
        );
        assert_eq!(
            type_error(
                "[0]",
                "invalid type: integer `5`, expected internally tagged enum PatchOperation"
            ),
            "[0] must be a JSON object with an \"op\" member, not the number 5"
        );
        assert_eq!(
            type_error("x", "something about Option<Vec<String>>"),
            "x has the wrong type"
        );
    }
}
