//! Subscription filters: a CEL (Common Expression Language) expression over an event's
//! `topic` and `attributes`, compiled once per subscription and evaluated at fan-out, where
//! an event it does not match creates no delivery.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cel::{Context, Program, Value};

/// Longest filter accepted, in bytes: it bounds parsing and evaluation cost (the language has
/// no loops beyond its macros, which here can only range over an event's attributes).
pub const MAX_FILTER_BYTES: usize = 1024;

/// Deepest nesting of brackets accepted. The parser and the evaluator recurse per level, and
/// filters are evaluated on the threads that fan out (whose stacks are a few megabytes), so
/// depth is bounded, not only length.
pub const MAX_FILTER_NESTING: usize = 8;

/// Most operators accepted (each binary operator is a level of the evaluator's recursion).
pub const MAX_FILTER_OPERATORS: usize = 32;

/// Most field selections (`attributes.region`) accepted: each is a level too.
pub const MAX_FILTER_SELECTS: usize = 64;

/// Most comprehension macros (`all`, `exists`, ...) accepted: nested, each multiplies the
/// evaluation's cost by the size of what it ranges over (64 attributes at most).
pub const MAX_FILTER_COMPREHENSIONS: usize = 2;

/// The comprehension macros.
const COMPREHENSIONS: [&str; 5] = ["all", "exists", "exists_one", "map", "filter"];

/// Variables a filter may use.
const VARIABLES: [&str; 2] = ["topic", "attributes"];

/// A compiled filter.
#[derive(Clone)]
pub struct Filter {
    source: Arc<str>,
    program: Arc<Program>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_tuple("Filter").field(&self.source).finish()
    }
}

/// Why a filter was refused: a message for `INVALID_ARGUMENT`, with the position of a parse
/// error when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

impl Filter {
    /// Compiles `source`, refusing one that is too long or too deep, does not parse (the
    /// message names the line and column) or uses a variable other than `topic` and
    /// `attributes`.
    pub fn compile(source: &str) -> Result<Filter, FilterError> {
        if source.len() > MAX_FILTER_BYTES {
            return Err(FilterError(format!(
                "is {} bytes, longer than the {MAX_FILTER_BYTES} allowed",
                source.len()
            )));
        }
        if source.trim().is_empty() {
            return Err(FilterError("is empty; leave it unset for no filter".into()));
        }
        check_shape(source)?;
        let program = Program::compile(source).map_err(|errors| {
            let described: Vec<String> = errors
                .errors
                .iter()
                .map(|error| {
                    format!(
                        "line {} column {}: {}",
                        error.pos.0,
                        error.pos.1 + 1,
                        error.msg
                    )
                })
                .collect();
            FilterError(format!("does not parse: {}", described.join("; ")))
        })?;
        let references = program.references();
        let bound = comprehension_variables(source);
        let unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|name| {
                !VARIABLES.contains(name) && !bound.iter().any(|bound| bound.as_str() == *name)
            })
            .collect();
        if !unknown.is_empty() {
            return Err(FilterError(format!(
                "uses {}; a filter may use only `topic` and `attributes`",
                unknown
                    .iter()
                    .map(|name| format!("`{name}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(Filter {
            source: source.into(),
            program: Arc::new(program),
        })
    }

    /// Whether the event matches: the expression evaluates to `true`. Any other outcome (false,
    /// a value that is not a boolean, an error such as reading an attribute the event does
    /// not have without `has()`) is no match.
    pub fn matches(&self, event: &Bindings) -> bool {
        matches!(self.program.execute(&event.context), Ok(Value::Bool(true)))
    }
}

/// The filter's code: string literals and comments blanked out, so that what they contain
/// is not counted or taken for code.
fn code_of(source: &str) -> String {
    let mut code = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    let mut previous = ' ';
    while let Some(char) = chars.next() {
        match char {
            '"' | '\'' => {
                let raw = matches!(previous, 'r' | 'R');
                while let Some(inner) = chars.next() {
                    if inner == '\\' && !raw {
                        chars.next();
                    } else if inner == char {
                        break;
                    }
                }
                code.push_str(" \"\" ");
            }
            '/' if chars.peek() == Some(&'/') => {
                for inner in chars.by_ref() {
                    if inner == '\n' {
                        break;
                    }
                }
                code.push('\n');
            }
            _ => code.push(char),
        }
        previous = char;
    }
    code
}

/// Positions in `code` of the comprehension macros called on a value (`.all(`, ...), with
/// the text after the opening parenthesis.
fn comprehension_calls(code: &str) -> impl Iterator<Item = &str> {
    code.match_indices('.').filter_map(|(at, _)| {
        let after = code[at + 1..].trim_start();
        let name_end = after
            .find(|char: char| !(char.is_alphanumeric() || char == '_'))
            .unwrap_or(after.len());
        let (name, rest) = after.split_at(name_end);
        let arguments = rest.trim_start().strip_prefix('(')?;
        COMPREHENSIONS.contains(&name).then_some(arguments)
    })
}

/// Refuses a filter nested deeper than [`MAX_FILTER_NESTING`], with more than
/// [`MAX_FILTER_OPERATORS`] operators or [`MAX_FILTER_SELECTS`] field selections, or more than
/// [`MAX_FILTER_COMPREHENSIONS`] comprehensions, all counted in its code (not in its string
/// literals or comments).
fn check_shape(source: &str) -> Result<(), FilterError> {
    if source.contains("\"\"\"") || source.contains("\'\'\'") {
        return Err(FilterError(
            "uses a triple-quoted string; use a plain one".into(),
        ));
    }
    let code = code_of(source);
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut operators = 0usize;
    let mut selects = 0usize;
    let mut chars = code.chars().peekable();
    let mut previous = ' ';
    while let Some(char) = chars.next() {
        match char {
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '!' | '-' | '+' | '*' | '/' | '%' | '<' | '>' | '=' | '&' | '|' | '?' => {
                operators += 1;
                // `==`, `!=`, `<=`, `>=`, `&&` and `||` are one operator.
                let pair = chars.peek().is_some_and(|next| {
                    matches!(
                        (char, *next),
                        ('=' | '!' | '<' | '>', '=') | ('&', '&') | ('|', '|')
                    )
                });
                if pair {
                    chars.next();
                }
            }
            // Not the point of a number.
            '.' if !previous.is_ascii_digit() => selects += 1,
            _ => {}
        }
        previous = char;
    }
    // `in` is a binary operator too.
    operators += code
        .split(|char: char| !(char.is_alphanumeric() || char == '_'))
        .filter(|word| *word == "in")
        .count();
    if deepest > MAX_FILTER_NESTING {
        return Err(FilterError(format!(
            "nests {deepest} levels of brackets, more than the {MAX_FILTER_NESTING} allowed"
        )));
    }
    if operators > MAX_FILTER_OPERATORS {
        return Err(FilterError(format!(
            "has more than {MAX_FILTER_OPERATORS} operators"
        )));
    }
    if selects > MAX_FILTER_SELECTS {
        return Err(FilterError(format!(
            "selects more than {MAX_FILTER_SELECTS} fields"
        )));
    }
    let comprehensions = comprehension_calls(&code).count();
    if comprehensions > MAX_FILTER_COMPREHENSIONS {
        return Err(FilterError(format!(
            "uses {comprehensions} of the macros {}; at most {MAX_FILTER_COMPREHENSIONS} (each \
             multiplies the cost by the length of what it ranges over)",
            COMPREHENSIONS.join(", ")
        )));
    }
    Ok(())
}

/// The variables that comprehension macros bind (`k` in `attributes.all(k, ...)`).
fn comprehension_variables(source: &str) -> Vec<String> {
    let code = code_of(source);
    comprehension_calls(&code)
        .filter_map(|arguments| {
            let (first, _) = arguments.split_once(',')?;
            let first = first.trim();
            (!first.is_empty()
                && first
                    .chars()
                    .all(|char| char.is_alphanumeric() || char == '_'))
            .then(|| first.to_string())
        })
        .collect()
}

/// An event as filters see it: made once per event, used by every filter evaluated on it.
pub struct Bindings {
    context: Context<'static, 'static>,
}

impl Bindings {
    /// Binds `topic` and `attributes`.
    pub fn new(topic: &str, attributes: &BTreeMap<String, String>) -> Bindings {
        let mut context = Context::default();
        context.add_variable_from_value("topic", topic.to_string());
        let attributes: HashMap<&str, &str> = attributes
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        context.add_variable_from_value("attributes", attributes);
        Bindings { context }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(topic: &str, attributes: &BTreeMap<String, String>) -> Bindings {
        Bindings::new(topic, attributes)
    }

    #[test]
    fn filters_match_on_attributes_and_topic() {
        let eu: BTreeMap<String, String> = [("region".to_string(), "eu".to_string())].into();
        let us: BTreeMap<String, String> = [("region".to_string(), "us".to_string())].into();
        let none = BTreeMap::new();
        let filter = Filter::compile(r#"attributes.region == "eu""#).unwrap();
        assert!(filter.matches(&view("fin:purchase", &eu)));
        assert!(!filter.matches(&view("fin:purchase", &us)));
        // A missing attribute is an evaluation error: no match.
        assert!(!filter.matches(&view("fin:purchase", &none)));
        let guarded =
            Filter::compile(r#"!has(attributes.region) || attributes.region != "us""#).unwrap();
        assert!(guarded.matches(&view("t", &none)));
        assert!(!guarded.matches(&view("t", &us)));
        let by_topic = Filter::compile(r#"topic.startsWith("fin:")"#).unwrap();
        assert!(by_topic.matches(&view("fin:refund", &none)));
        assert!(!by_topic.matches(&view("user:new", &none)));
        let listed = Filter::compile(r#"attributes.region in ["eu", "uk"]"#).unwrap();
        assert!(listed.matches(&view("t", &eu)));
        assert!(!listed.matches(&view("t", &us)));
        // Not a boolean: no match.
        assert!(!Filter::compile("topic").unwrap().matches(&view("t", &none)));
    }

    #[test]
    fn bad_filters_are_refused_with_a_position_or_a_reason() {
        let error = Filter::compile(r#"attributes.region == "eu" &&"#).unwrap_err();
        assert!(
            error.0.starts_with("does not parse: line 1 column"),
            "{error}"
        );
        let error = Filter::compile("payload.size() > 3").unwrap_err();
        assert!(error.0.contains("`payload`"), "{error}");
        let long = format!("topic == \"{}\"", "x".repeat(MAX_FILTER_BYTES));
        assert!(
            Filter::compile(&long)
                .unwrap_err()
                .0
                .contains("longer than")
        );
        assert!(Filter::compile("  ").is_err());
        assert!(Filter::compile(r#"topic == """x""""#).is_err());
        let nested = "attributes.all(a, attributes.all(b, attributes.all(c, a != c)))";
        assert!(Filter::compile(nested).unwrap_err().0.contains("macros"));
        // Comments and strings hide nothing from the limits, and bind nothing.
        let commented =
            "// \"\nattributes.all(a, attributes.all(b, attributes.all(c, true))) // \"";
        assert!(Filter::compile(commented).unwrap_err().0.contains("macros"));
        let deep_comment = format!("// )))\n{}true{}", "(".repeat(9), ")".repeat(9));
        assert!(
            Filter::compile(&deep_comment)
                .unwrap_err()
                .0
                .contains("nests")
        );
        let quoted = r#"topic == "exists(payload," || payload == "x""#;
        assert!(Filter::compile(quoted).unwrap_err().0.contains("`payload`"));
        let keys = r#"has(attributes.all) && attributes.all == "1" && attributes.map == "x""#;
        assert!(Filter::compile(keys).is_ok(), "{:?}", Filter::compile(keys));
        let chain = format!("has(attributes{})", ".a".repeat(MAX_FILTER_SELECTS + 1));
        assert!(Filter::compile(&chain).unwrap_err().0.contains("selects"));
        assert!(Filter::compile("1.5 < 2.5 // a comment").is_ok());
        let two = r#"attributes.exists(k, k == "x") && attributes.all(k, k != "y")"#;
        assert!(Filter::compile(two).is_ok(), "{:?}", Filter::compile(two));
        let with_key = Filter::compile(two).unwrap();
        let attributes: BTreeMap<String, String> = [("x".to_string(), String::new())].into();
        assert!(with_key.matches(&view("t", &attributes)));
    }

    /// The largest filters accepted parse and evaluate on a thread with a 2 MiB stack (the
    /// default of Rust's threads and tokio's workers) in an unoptimized build, which takes
    /// far more stack per level than a release build.
    #[test]
    fn the_deepest_filters_accepted_fit_a_small_stack() {
        let nested = |open: &str, close: &str, inner: &str| {
            format!(
                "{}{inner}{}",
                open.repeat(MAX_FILTER_NESTING),
                close.repeat(MAX_FILTER_NESTING)
            )
        };
        let sum = format!("1{} == 3", "+1".repeat(MAX_FILTER_OPERATORS - 1));
        let nots = format!("{}true", "!".repeat(MAX_FILTER_OPERATORS));
        let worst = [
            nested("(", ")", &sum),
            format!("{} == [1]", nested("[", "]", "1")),
            nested("(", ")", &nots),
            format!(
                "{}.size() > 0",
                nested(
                    "[",
                    "]",
                    &format!("1{}", "+1".repeat(MAX_FILTER_OPERATORS - 2))
                )
            ),
            format!(
                "{}has(attributes{}){}{}",
                "(".repeat(MAX_FILTER_NESTING - 1),
                ".a".repeat(MAX_FILTER_SELECTS - 1),
                " || 1 > 2".repeat(MAX_FILTER_OPERATORS / 2 - 1),
                ")".repeat(MAX_FILTER_NESTING - 1)
            ),
            format!(
                "{}1{}{}.size() > 0",
                "{1:".repeat(MAX_FILTER_NESTING),
                "+1".repeat(MAX_FILTER_OPERATORS - 2),
                "}".repeat(MAX_FILTER_NESTING)
            ),
        ];
        for source in worst {
            Filter::compile(&source).unwrap_or_else(|error| panic!("{source}: {error}"));
            let handle = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    let filter = Filter::compile(&source).expect("accepted");
                    filter.matches(&Bindings::new("t", &BTreeMap::new()));
                })
                .unwrap();
            handle.join().unwrap();
        }
        let too_deep = nested("(", ")", "(true)");
        assert!(Filter::compile(&too_deep).unwrap_err().0.contains("nests"));
        let too_many = format!("1{} == 3", "+1".repeat(MAX_FILTER_OPERATORS));
        assert!(
            Filter::compile(&too_many)
                .unwrap_err()
                .0
                .contains("operators")
        );
        // Brackets and operators inside strings do not count.
        let quoted = format!(r#"attributes.x == "{}""#, "((((+-".repeat(20));
        assert!(Filter::compile(&quoted).is_ok());
    }
}
