//! Endpoint filters: Kaa's criteria language, a MongoDB query over the per-endpoint document
//!
//! ```json
//! {"application_version": "<app version name>",
//!  "metadata": [{"key": "<k>", "value": <json>}, ...]}
//! ```
//!
//! [`Filter::parse`] validates a query once, when the filter is created, and compiles it;
//! [`Filter::matches`] answers for one endpoint with MongoDB's `find` semantics, without
//! building that document. The supported subset, the type rules and every place where JSON
//! forced a choice MongoDB did not have to make are in `docs/filters.md`.

mod eval;
mod index;
mod parse;

pub use index::FilterSet;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use crate::ValidationError;
use serde_json::{Map, Value};

/// Nesting depth of objects and arrays in a query.
pub const MAX_DEPTH: usize = 32;
/// Field conditions, operators and elements of `$in`/`$nin`/`$all` in one query. Bounds the
/// work of one evaluation.
pub const MAX_OPERATORS: usize = 1_000;
/// Regular expressions in one query.
pub const MAX_REGEXES: usize = 64;
/// Length of one `$regex` pattern, in bytes.
pub const MAX_REGEX_LEN: usize = 4_096;
/// Compiled size (and lazy-DFA cache size) of one regular expression, in bytes.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// A validated, compiled endpoint filter query.
#[derive(Debug, Clone)]
pub struct Filter(eval::Expr);

impl Filter {
    /// Parses and validates a MongoDB query document (a JSON object). Errors name the
    /// offending element as `mongoQuery.<path in the query>` with a stable `rule`:
    /// `type`, `unsupported-operator`, `unknown-field`, `invalid-path`, `mixed-operators`,
    /// `invalid-operand`, `invalid-regex`, `order-dependent`, `max-depth`,
    /// `max-operators`, `max-regexes`.
    pub fn parse(query: &Value) -> Result<Filter, ValidationError> {
        parse::Parser::default()
            .parse_query(query, "mongoQuery")
            .map(Filter)
    }

    /// The metadata keys this filter reads, when that is a closed set: `Some(keys)` when every
    /// use of `metadata` is an `$elemMatch` that fixes `key` (possibly under `$and`, `$or`,
    /// `$nor`, `$not`), so the filter gives the same answer on the metadata restricted to
    /// `keys` (empty: the filter reads only the application version). `None` when it reads
    /// the metadata array as a whole (`$size`, `$exists`, a free `$elemMatch`, `metadata.key`
    /// paths, ...). Lets a scan parse only the parts of each endpoint's metadata it needs.
    pub fn metadata_keys(&self) -> Option<Vec<String>> {
        let mut keys = Vec::new();
        self.0.metadata_keys(&mut keys).then(|| {
            keys.sort();
            keys.dedup();
            keys
        })
    }

    /// Does an endpoint with this application version and metadata match?
    pub fn matches(&self, app_version: &str, metadata: &Map<String, Value>) -> bool {
        self.0.eval(eval::Elem::Root(app_version, metadata))
    }
}
