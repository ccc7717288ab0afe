//! Typed rows: a [`Row`] reads columns by name into Rust types, and a whole
//! row deserializes into a `serde` struct (columns by name), a tuple
//! (columns in order) or, for one column, a plain value — which is what
//! [`crate::Sql::query_as`] and [`crate::Sql::query_first`] do.
//!
//! SQLite's types map onto serde's: `INTEGER` into any integer type (range
//! checked), `f64`, or `bool` (0 is false, anything else true); `REAL` into
//! floats; `TEXT` into strings, unit enum variants by name, or — for a
//! struct, map, vector or tuple field — JSON text, parsed; `BLOB` into
//! `Vec<u8>`; `NULL` into `Option::None` or `()`.

use crate::{Rows, Value};
use serde::de::value::{SeqDeserializer, StrDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;
use std::fmt;

/// One row of [`Rows`], its columns readable by name.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl<'a> Row<'a> {
    pub(crate) fn new(columns: &'a [String], values: &'a [Value]) -> Self {
        Row { columns, values }
    }

    /// The value of `column` as a `T`: a missing column or a value that
    /// does not fit `T` is an error naming the column.
    ///
    /// ```
    /// # use projector_sdk::{Context, Failure};
    /// # fn f(ctx: &Context) -> Result<(), Failure> {
    /// let rows = ctx.sql().query("SELECT email, age FROM users WHERE id = ?1", ("u1",))?;
    /// if let Some(row) = rows.row(0) {
    ///     let email: String = row.get("email")?;
    ///     let age: Option<i64> = row.get("age")?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn get<T: DeserializeOwned>(&self, column: &str) -> Result<T, RowError> {
        let value = self.value(column).ok_or_else(|| {
            RowError(format!("no column `{column}` in the row (columns: {})", self.columns.join(", ")))
        })?;
        T::deserialize(ValueDeserializer(value))
            .map_err(|err| RowError(format!("column `{column}`: {}", err.0)))
    }

    /// The raw value of `column`, if the row has one by that name.
    pub fn value(&self, column: &str) -> Option<&'a Value> {
        let index = self.columns.iter().position(|name| name == column)?;
        self.values.get(index)
    }

    /// The values, in column order.
    pub fn values(&self) -> &'a [Value] {
        self.values
    }

    /// The column names, in select order.
    pub fn columns(&self) -> &'a [String] {
        self.columns
    }

    /// The whole row as a `T`: a struct's fields by column name, a tuple's
    /// by column order, or a plain value when there is one column.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, RowError> {
        T::deserialize(RowDeserializer { row: *self }).map_err(|err| {
            if err.0.starts_with("no column") {
                RowError(format!("{} (columns: {})", err.0, self.columns.join(", ")))
            } else {
                err
            }
        })
    }
}

impl Rows {
    /// Row `index` (from 0), its columns readable by name.
    pub fn row(&self, index: usize) -> Option<Row<'_>> {
        self.rows_raw().get(index).map(|values| Row::new(self.columns(), values))
    }

    /// Every row, its columns readable by name.
    pub fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows_raw().iter().map(|values| Row::new(self.columns(), values))
    }

    /// Every row as a `T` (see [`Row::deserialize`]).
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<Vec<T>, RowError> {
        self.rows()
            .enumerate()
            .map(|(i, row)| row.deserialize().map_err(|err| RowError(format!("row {}: {}", i + 1, err.0))))
            .collect()
    }
}

/// A row or a column that did not fit the type asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError(String);

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RowError {}

impl de::Error for RowError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        RowError(msg.to_string())
    }
    fn missing_field(field: &'static str) -> Self {
        RowError(format!("no column `{field}` in the row"))
    }
}

impl From<RowError> for crate::Failure {
    fn from(err: RowError) -> Self {
        crate::Failure::Reject(err.0)
    }
}

impl From<RowError> for String {
    fn from(err: RowError) -> Self {
        err.0
    }
}

impl RowError {
    pub(crate) fn message(&self) -> &str {
        &self.0
    }
}

/// Deserializes one column value.
struct ValueDeserializer<'a>(&'a Value);

/// A text column's JSON, for a field that wants structure.
fn json(text: &str) -> serde_json::Deserializer<serde_json::de::StrRead<'_>> {
    serde_json::Deserializer::from_str(text)
}

fn json_error(err: serde_json::Error) -> RowError {
    RowError(format!("text is not the JSON expected: {err}"))
}

impl<'de> de::Deserializer<'de> for ValueDeserializer<'de> {
    type Error = RowError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Integer(n) => visitor.visit_i64(*n),
            Value::Real(x) => visitor.visit_f64(*x),
            Value::Text(s) => visitor.visit_str(s),
            Value::Blob(b) => visitor.visit_bytes(b),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        match self.0 {
            Value::Integer(n) => visitor.visit_bool(*n != 0),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, RowError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, RowError> {
        match self.0 {
            Value::Text(s) if s.trim_start().starts_with('{') => {
                de::Deserializer::deserialize_enum(&mut json(s), name, variants, visitor).map_err(json_error)
            }
            Value::Text(s) => visitor.visit_enum(StrDeserializer::<RowError>::new(s)),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        match self.0 {
            Value::Blob(b) => visitor.visit_seq(SeqDeserializer::<_, RowError>::new(b.iter().copied())),
            Value::Text(s) => de::Deserializer::deserialize_seq(&mut json(s), visitor).map_err(json_error),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, RowError> {
        match self.0 {
            Value::Text(s) => {
                de::Deserializer::deserialize_tuple(&mut json(s), len, visitor).map_err(json_error)
            }
            _ => self.deserialize_seq(visitor),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        match self.0 {
            Value::Text(s) => de::Deserializer::deserialize_map(&mut json(s), visitor).map_err(json_error),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, RowError> {
        match self.0 {
            Value::Text(s) => {
                de::Deserializer::deserialize_struct(&mut json(s), name, fields, visitor).map_err(json_error)
            }
            _ => self.deserialize_any(visitor),
        }
    }

    forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct tuple_struct identifier ignored_any
    }
}

/// Deserializes a whole row.
struct RowDeserializer<'a> {
    row: Row<'a>,
}

impl<'a> RowDeserializer<'a> {
    /// The one column a plain value is read from.
    fn single(&self) -> Result<ValueDeserializer<'a>, RowError> {
        match self.row.values {
            [value] => Ok(ValueDeserializer(value)),
            values => Err(RowError(format!(
                "the row has {} columns ({}) but one value was asked for: read it into a struct \
                 (columns by name) or a tuple (columns in order)",
                values.len(),
                self.row.columns.join(", ")
            ))),
        }
    }
}

macro_rules! single_column {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
            self.single()?.$method(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for RowDeserializer<'de> {
    type Error = RowError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        self.deserialize_map(visitor)
    }

    single_column! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf deserialize_option
        deserialize_unit deserialize_identifier
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, RowError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, RowError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        visitor.visit_seq(SeqDeserializer::new(self.row.values.iter().map(ValueDeserializer)))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, RowError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, RowError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        visitor.visit_map(ColumnsAccess { row: self.row, next: 0 })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, RowError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, RowError> {
        self.single()?.deserialize_enum(name, variants, visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        visitor.visit_unit()
    }
}

/// A row's columns as a map of name to value.
struct ColumnsAccess<'a> {
    row: Row<'a>,
    next: usize,
}

impl<'de> de::MapAccess<'de> for ColumnsAccess<'de> {
    type Error = RowError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, RowError> {
        match self.row.columns.get(self.next) {
            None => Ok(None),
            Some(name) => seed.deserialize(name.as_str().into_deserializer()).map(Some),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, RowError> {
        let index = self.next;
        self.next += 1;
        let value = self.row.values.get(index).unwrap_or(&Value::Null);
        seed.deserialize(ValueDeserializer(value))
            .map_err(|err| RowError(format!("column `{}`: {}", self.row.columns[index], err.0)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.row.columns.len() - self.next)
    }
}

impl<'de> IntoDeserializer<'de, RowError> for ValueDeserializer<'de> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}
