//! A small JSON module with no dependencies, for function authors.
//!
//! * [`parse`] / [`from_slice`] read a JSON text (RFC 8259, strict: no
//!   comments, no trailing commas, no lone surrogates) into a [`Value`].
//! * Objects keep their keys in the order they were read; a key that occurs
//!   twice keeps its first position and its last value.
//! * Numbers keep their original text, so a value that passes through a
//!   function unchanged is written back exactly as it came (`21.50` stays
//!   `21.50`, big integers do not lose digits); [`Value::as_f64`],
//!   [`Value::as_i64`] and [`Value::as_u64`] read them.
//! * [`Value`]'s `Display` (so `to_string()`) writes compact JSON with
//!   correct string escaping.
//!
//! ```
//! use edgefn_sdk::json::{self, Value};
//!
//! let mut v = json::parse(r#"{"temp_c": 21.50, "id": 7}"#).unwrap();
//! let c = v.get("temp_c").and_then(Value::as_f64).unwrap();
//! let obj = v.as_object_mut().unwrap();
//! obj.insert("temp_f", Value::from(c * 9.0 / 5.0 + 32.0));
//! obj.insert("device", Value::from("pi-7"));
//! assert_eq!(v.to_string(), r#"{"temp_c":21.50,"id":7,"temp_f":70.7,"device":"pi-7"}"#);
//! ```

use std::fmt::{self, Write as _};

/// Deepest nesting of arrays and objects [`parse`] accepts.
pub const MAX_DEPTH: usize = 128;

// ---------------------------------------------------------------------------
// Values

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Value>),
    Object(Object),
}

impl Value {
    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub fn as_number(&self) -> Option<&Number> {
        match self {
            Value::Number(n) => Some(n),
            _ => None,
        }
    }

    /// The number as `f64`, if this is a number (see [`Number::as_f64`]).
    pub fn as_f64(&self) -> Option<f64> {
        self.as_number().map(Number::as_f64)
    }

    /// The number as `i64`, if this is a number written as an integer that
    /// fits (see [`Number::as_i64`]).
    pub fn as_i64(&self) -> Option<i64> {
        self.as_number().and_then(Number::as_i64)
    }

    /// The number as `u64`, if this is a number written as a non-negative
    /// integer that fits (see [`Number::as_u64`]).
    pub fn as_u64(&self) -> Option<u64> {
        self.as_number().and_then(Number::as_u64)
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The elements, if this is an array, for changing.
    pub fn as_array_mut(&mut self) -> Option<&mut Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The object, if this is one.
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The object, if this is one, for changing.
    pub fn as_object_mut(&mut self) -> Option<&mut Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The field `key`, if this is an object that has it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_object().and_then(|o| o.get(key))
    }

    /// The field `key`, if this is an object that has it, for changing.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.as_object_mut().and_then(|o| o.get_mut(key))
    }

    /// `"null"`, `"boolean"`, `"number"`, `"string"`, `"array"` or `"object"`:
    /// handy in log lines.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

/// A finite `f64` becomes a number; NaN and the infinities (which JSON
/// cannot write) become `null`.
impl From<f64> for Value {
    fn from(f: f64) -> Value {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

impl From<f32> for Value {
    fn from(f: f32) -> Value {
        Value::from(f as f64)
    }
}

macro_rules! from_integer {
    ($($t:ty)*) => {$(
        impl From<$t> for Value {
            fn from(i: $t) -> Value {
                Value::Number(Number { text: i.to_string() })
            }
        }
        impl From<$t> for Number {
            fn from(i: $t) -> Number {
                Number { text: i.to_string() }
            }
        }
    )*};
}

from_integer!(i8 i16 i32 i64 u8 u16 u32 u64 isize usize);

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}

impl From<Number> for Value {
    fn from(n: Number) -> Value {
        Value::Number(n)
    }
}

impl From<Vec<Value>> for Value {
    fn from(a: Vec<Value>) -> Value {
        Value::Array(a)
    }
}

impl From<Object> for Value {
    fn from(o: Object) -> Value {
        Value::Object(o)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Value {
        o.map_or(Value::Null, Into::into)
    }
}

/// Writes compact JSON (no spaces or newlines).
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(true) => f.write_str("true"),
            Value::Bool(false) => f.write_str("false"),
            Value::Number(n) => f.write_str(&n.text),
            Value::String(s) => write_quoted(f, s),
            Value::Array(a) => {
                f.write_char('[')?;
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        f.write_char(',')?;
                    }
                    fmt::Display::fmt(v, f)?;
                }
                f.write_char(']')
            }
            Value::Object(o) => fmt::Display::fmt(o, f),
        }
    }
}

// ---------------------------------------------------------------------------
// Numbers

/// A JSON number, kept as the text it was read from (or written as).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Number {
    text: String,
}

impl Number {
    /// A number for a finite `f64`, written in the shortest form that reads
    /// back as the same `f64` (`77`, `68.9`, `1e-7`); `None` for NaN and the
    /// infinities.
    pub fn from_f64(f: f64) -> Option<Number> {
        if !f.is_finite() {
            return None;
        }
        let a = f.abs();
        let text = if a != 0.0 && !(1e-5..1e16).contains(&a) { format!("{:e}", f) } else { format!("{}", f) };
        Some(Number { text })
    }

    /// A number from its JSON text; `None` unless `text` is exactly a JSON
    /// number (`-0.5`, `12`, `1E+3`; not `+1`, `.5`, `01`, `NaN`).
    pub fn from_text(text: &str) -> Option<Number> {
        let mut p = Parser { s: text.as_bytes(), pos: 0, depth: 0 };
        match p.number() {
            Ok(n) if p.pos == text.len() => Some(n),
            _ => None,
        }
    }

    /// The text of the number, as read or written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The number as the nearest `f64` (a number beyond its range gives an
    /// infinity, e.g. `1e400`).
    pub fn as_f64(&self) -> f64 {
        // The text is a valid JSON number, which Rust's parser accepts.
        self.text.parse().unwrap_or(f64::NAN)
    }

    /// The number as `i64` if it is written as an integer (no fraction, no
    /// exponent) that fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.text.parse().ok()
    }

    /// The number as `u64` if it is written as a non-negative integer that
    /// fits.
    pub fn as_u64(&self) -> Option<u64> {
        self.text.parse().ok()
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

// ---------------------------------------------------------------------------
// Objects

/// A JSON object: fields in insertion order, keys unique.
///
/// Lookups are linear scans, which is the fast way for the small objects
/// sensors send. Equality compares the fields in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Object {
    fields: Vec<(String, Value)>,
}

impl Object {
    /// An empty object.
    pub fn new() -> Object {
        Object::default()
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    fn index(&self, key: &str) -> Option<usize> {
        self.fields.iter().position(|(k, _)| k == key)
    }

    /// The value of field `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index(key).map(|i| &self.fields[i].1)
    }

    /// The value of field `key`, for changing.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        match self.index(key) {
            Some(i) => Some(&mut self.fields[i].1),
            None => None,
        }
    }

    /// Whether field `key` exists.
    pub fn contains_key(&self, key: &str) -> bool {
        self.index(key).is_some()
    }

    /// Sets field `key`. An existing field keeps its position and gets the
    /// new value (the old one is returned); a new field goes at the end.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Option<Value> {
        let key = key.into();
        let value = value.into();
        match self.index(&key) {
            Some(i) => Some(std::mem::replace(&mut self.fields[i].1, value)),
            None => {
                self.fields.push((key, value));
                None
            }
        }
    }

    /// Removes field `key`, keeping the order of the others.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.index(key).map(|i| self.fields.remove(i).1)
    }

    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.fields.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The fields in order, values changeable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Value)> {
        self.fields.iter_mut().map(|(k, v)| (k.as_str(), v))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(k, _)| k.as_str())
    }
}

impl IntoIterator for Object {
    type Item = (String, Value);
    type IntoIter = std::vec::IntoIter<(String, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.fields.into_iter()
    }
}

impl<K: Into<String>, V: Into<Value>> FromIterator<(K, V)> for Object {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Object {
        let mut o = Object::new();
        for (k, v) in iter {
            o.insert(k, v);
        }
        o
    }
}

/// Writes compact JSON.
impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('{')?;
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_char(',')?;
            }
            write_quoted(f, k)?;
            f.write_char(':')?;
            fmt::Display::fmt(v, f)?;
        }
        f.write_char('}')
    }
}

// ---------------------------------------------------------------------------
// Writing strings

/// `s` as a JSON string literal, quotes included: `a"b` gives `"a\"b"`.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    write_quoted(&mut out, s).expect("writing to a String cannot fail");
    out
}

fn write_quoted<W: fmt::Write>(w: &mut W, s: &str) -> fmt::Result {
    w.write_char('"')?;
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Every byte matched above is ASCII, so these are char boundaries.
        w.write_str(&s[start..i])?;
        if escape.is_empty() {
            write!(w, "\\u{:04x}", b)?;
        } else {
            w.write_str(escape)?;
        }
        start = i + 1;
    }
    w.write_str(&s[start..])?;
    w.write_char('"')
}

// ---------------------------------------------------------------------------
// Parsing

/// Why a text is not JSON, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    offset: usize,
    message: &'static str,
}

impl ParseError {
    /// The byte offset in the input where the problem was found.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// What is wrong, e.g. `expected ',' or '}'`.
    pub fn message(&self) -> &str {
        self.message
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)
    }
}

impl std::error::Error for ParseError {}

/// Parses a JSON text: one value, with optional whitespace around it.
pub fn parse(text: &str) -> Result<Value, ParseError> {
    let mut p = Parser { s: text.as_bytes(), pos: 0, depth: 0 };
    p.skip_ws();
    let v = p.value()?;
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err(p.err("trailing characters after the JSON value"));
    }
    Ok(v)
}

/// Parses a JSON text given as bytes (a message payload): it must be UTF-8.
pub fn from_slice(bytes: &[u8]) -> Result<Value, ParseError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(text),
        Err(e) => Err(ParseError { offset: e.valid_up_to(), message: "not valid UTF-8" }),
    }
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn err(&self, message: &'static str) -> ParseError {
        ParseError { offset: self.pos, message }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &'static str, value: Value) -> Result<Value, ParseError> {
        if self.s[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        match self.peek() {
            None => Err(self.err("unexpected end of input")),
            Some(b'n') => self.literal("null", Value::Null),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'"') => self.string().map(Value::String),
            Some(b'-' | b'0'..=b'9') => self.number().map(Value::Number),
            Some(b'[') => self.array(),
            Some(b'{') => self.object(),
            Some(_) => Err(self.err("expected a JSON value")),
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.pos += 1; // the '[' or '{'
        self.skip_ws();
        Ok(())
    }

    fn array(&mut self) -> Result<Value, ParseError> {
        self.enter()?;
        let mut items = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn object(&mut self) -> Result<Value, ParseError> {
        self.enter()?;
        let mut object = Object::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(Value::Object(object));
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a string key"));
            }
            let key = self.string()?;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.err("expected ':'"));
            }
            self.pos += 1;
            self.skip_ws();
            let value = self.value()?;
            object.insert(key, value);
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(Value::Object(object));
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Number, ParseError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.err("leading zero in a number"));
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("expected a digit")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.err("expected a digit after '.'"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("expected a digit in the exponent"));
            }
        }
        // The number's bytes are all ASCII.
        let text = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
        Ok(Number { text })
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let mut v = 0;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                _ => return Err(self.err("expected 4 hex digits after \\u")),
            };
            v = v * 16 + d as u32;
            self.pos += 1;
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.pos += 1; // the opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let start = self.pos;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.extend_from_slice(&self.s[start..self.pos]);
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    // The input is a &str and runs are cut at ASCII bytes, and
                    // escapes add whole characters, so this is valid UTF-8.
                    return String::from_utf8(out).map_err(|_| self.err("invalid UTF-8 in string"));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.pos += 1;
                            let at = self.pos;
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) {
                                if !self.s[self.pos..].starts_with(b"\\u") {
                                    return Err(ParseError { offset: at, message: "lone surrogate in \\u escape" });
                                }
                                self.pos += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(ParseError { offset: at, message: "lone surrogate in \\u escape" });
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return Err(ParseError { offset: at, message: "lone surrogate in \\u escape" });
                            } else {
                                hi
                            };
                            let c = char::from_u32(code).expect("not a surrogate");
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            continue;
                        }
                        _ => return Err(self.err("invalid escape")),
                    };
                    self.pos += 1;
                    out.push(c as u8);
                }
                Some(_) => return Err(self.err("control character in string")),
            }
        }
    }
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(text: &str) -> String {
        parse(text).unwrap_or_else(|e| panic!("{:?}: {}", text, e)).to_string()
    }

    #[test]
    fn scalars() {
        assert_eq!(parse("null"), Ok(Value::Null));
        assert_eq!(parse(" true "), Ok(Value::Bool(true)));
        assert_eq!(parse("false"), Ok(Value::Bool(false)));
        assert_eq!(parse("\"hi\""), Ok(Value::from("hi")));
        assert_eq!(parse("12").unwrap().as_i64(), Some(12));
        assert_eq!(parse("-0.5e1").unwrap().as_f64(), Some(-5.0));
    }

    #[test]
    fn numbers_keep_their_text() {
        for text in ["0", "-0", "21.50", "1E+3", "1e-7", "12345678901234567890123", "-0.0", "3.14159265358979323846"] {
            assert_eq!(roundtrip(text), text);
        }
        let n = parse("12345678901234567890123").unwrap();
        assert_eq!(n.as_i64(), None);
        assert_eq!(n.as_f64(), Some(12345678901234567890123.0));
        assert_eq!(parse("1e400").unwrap().as_f64(), Some(f64::INFINITY));
        assert_eq!(parse("2.0").unwrap().as_i64(), None);
        assert_eq!(parse("-3").unwrap().as_number().unwrap().as_u64(), None);
        assert_eq!(parse("42").unwrap().as_number().unwrap().as_u64(), Some(42));
        assert_eq!(parse("18446744073709551615").unwrap().as_u64(), Some(u64::MAX));
        assert_eq!(parse("-3").unwrap().as_u64(), None);
        assert_eq!(parse("1.0").unwrap().as_u64(), None);
        assert_eq!(parse("\"1\"").unwrap().as_u64(), None);
    }

    #[test]
    fn bad_numbers() {
        for text in ["01", "-", "1.", ".5", "+1", "1e", "1e+", "0x10", "NaN", "Infinity", "-01", "1.e3"] {
            assert!(parse(text).is_err(), "{} should not parse", text);
            assert_eq!(Number::from_text(text), None, "{}", text);
        }
        assert_eq!(Number::from_text("-1.5E-3").unwrap().as_f64(), -0.0015);
        assert_eq!(Number::from_text("1 "), None);
    }

    #[test]
    fn numbers_from_f64() {
        assert_eq!(Value::from(77.0).to_string(), "77");
        assert_eq!(Value::from(20.5 * 9.0 / 5.0 + 32.0).to_string(), (20.5f64 * 9.0 / 5.0 + 32.0).to_string());
        assert_eq!(Value::from(-40.0).to_string(), "-40");
        assert_eq!(Value::from(0.1 + 0.2).to_string(), "0.30000000000000004");
        assert_eq!(Value::from(1e21).to_string(), "1e21");
        assert_eq!(Value::from(1.5e-7).to_string(), "1.5e-7");
        assert_eq!(Value::from(-0.0).to_string(), "-0");
        assert_eq!(Value::from(f64::NAN), Value::Null);
        assert_eq!(Value::from(f64::INFINITY), Value::Null);
        for f in [1e21, 1.5e-7, 123.456, -9.999e300, 5e-324, f64::MAX, 1e15, 1e16] {
            let text = Value::from(f).to_string();
            assert_eq!(parse(&text).unwrap().as_f64(), Some(f), "{}", text);
        }
        assert_eq!(Value::from(-7i32).to_string(), "-7");
        assert_eq!(Value::from(u64::MAX).to_string(), "18446744073709551615");
    }

    #[test]
    fn objects_keep_order_and_replace_in_place() {
        let mut v = parse(r#"{ "b": 1, "a": [true, null], "c": {"x": "y"} }"#).unwrap();
        assert_eq!(v.to_string(), r#"{"b":1,"a":[true,null],"c":{"x":"y"}}"#);
        let o = v.as_object_mut().unwrap();
        assert_eq!(o.keys().collect::<Vec<_>>(), ["b", "a", "c"]);
        assert_eq!(o.insert("a", 2), Some(parse("[true,null]").unwrap()));
        assert_eq!(o.insert("d", "new"), None);
        assert_eq!(o.remove("b"), Some(Value::from(1)));
        assert_eq!(o.remove("zz"), None);
        assert!(o.contains_key("c"));
        *o.get_mut("c").unwrap().get_mut("x").unwrap() = Value::Null;
        assert_eq!(v.to_string(), r#"{"a":2,"c":{"x":null},"d":"new"}"#);
        assert_eq!(v.get("a").and_then(Value::as_i64), Some(2));
        assert_eq!(v.get("nope"), None);
        assert_eq!(Value::from(3).get("a"), None);
    }

    #[test]
    fn duplicate_keys_keep_first_position_last_value() {
        assert_eq!(roundtrip(r#"{"a":1,"b":2,"a":3}"#), r#"{"a":3,"b":2}"#);
    }

    #[test]
    fn object_building() {
        let o: Object = vec![("x", Value::from(1)), ("y", Value::from("z"))].into_iter().collect();
        assert_eq!(o.len(), 2);
        assert_eq!(Value::from(o.clone()).to_string(), r#"{"x":1,"y":"z"}"#);
        assert_eq!(o.to_string(), r#"{"x":1,"y":"z"}"#);
        assert_eq!(Object::new().to_string(), "{}");
        assert!(Object::new().is_empty());
        assert_eq!(Value::from(vec![Value::from(Some(1)), Value::from(None::<i32>)]).to_string(), "[1,null]");
        assert_eq!(roundtrip("[]"), "[]");
        assert_eq!(roundtrip("[ [ ] , { } ]"), "[[],{}]");
    }

    #[test]
    fn string_escapes() {
        let v = parse(r#""a\"b\\c\/d\b\f\n\r\t\u0041\u00e9\u20ac\ud83d\ude00""#).unwrap();
        assert_eq!(v.as_str(), Some("a\"b\\c/d\u{8}\u{c}\n\r\tAé€😀"));
        assert_eq!(v.to_string(), "\"a\\\"b\\\\c/d\\b\\f\\n\\r\\tAé€😀\"");
        assert_eq!(quote("\u{0}\u{1f}\u{7f}<>'"), "\"\\u0000\\u001f\u{7f}<>'\"");
        assert_eq!(roundtrip("\"naïve ☃\""), "\"naïve ☃\"");
        // Every control character survives a round trip.
        let all: String = (0u8..0x20).map(|b| b as char).collect();
        assert_eq!(parse(&quote(&all)).unwrap().as_str(), Some(all.as_str()));
    }

    #[test]
    fn bad_strings() {
        for text in [
            "\"abc",
            "\"a\nb\"",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\\ud800\"",
            "\"\\ud800\\u0041\"",
            "\"\\udc00\"",
            "\"\\",
            "'single'",
        ] {
            assert!(parse(text).is_err(), "{:?} should not parse", text);
        }
    }

    #[test]
    fn bad_documents() {
        for text in [
            "", " ", "{", "[1,]", "{\"a\":1,}", "{\"a\" 1}", "{a:1}", "[1 2]", "nul", "truex", "{} {}", "1 2",
            "// c\n1", "\u{feff}1", "[1]]",
        ] {
            assert!(parse(text).is_err(), "{:?} should not parse", text);
        }
        let e = parse("[1, 2, x]").unwrap_err();
        assert_eq!(e.offset(), 7);
        assert_eq!(e.to_string(), "expected a JSON value at byte 7");
        assert_eq!(from_slice(b"{\"a\":\xff}").unwrap_err().message(), "not valid UTF-8");
        assert_eq!(from_slice(b" {\"a\":1} ").unwrap().get("a").and_then(Value::as_i64), Some(1));
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(parse(&deep).unwrap_err().message(), "nesting too deep");
        let very_deep = "[{\"a\":".repeat(100_000);
        assert!(parse(&very_deep).is_err());
    }

    #[test]
    fn accessors() {
        let v = parse(r#"{"n":1.5,"s":"x","b":false,"a":[1],"z":null}"#).unwrap();
        assert_eq!(v.get("n").and_then(Value::as_f64), Some(1.5));
        assert_eq!(v.get("s").and_then(Value::as_f64), None);
        assert_eq!(v.get("s").and_then(Value::as_str), Some("x"));
        assert_eq!(v.get("b").and_then(Value::as_bool), Some(false));
        assert_eq!(v.get("a").and_then(Value::as_array).map(Vec::len), Some(1));
        assert!(v.get("z").unwrap().is_null());
        assert_eq!(v.get("a").unwrap().type_name(), "array");
        assert_eq!(v.type_name(), "object");
        let mut a = parse("[1]").unwrap();
        a.as_array_mut().unwrap().push(Value::from("two"));
        assert_eq!(a.to_string(), r#"[1,"two"]"#);
        let o = v.as_object().unwrap();
        let pairs: Vec<String> = o.iter().map(|(k, v)| format!("{}={}", k, v)).collect();
        assert_eq!(pairs, ["n=1.5", "s=\"x\"", "b=false", "a=[1]", "z=null"]);
    }
}
