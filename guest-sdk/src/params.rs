//! SQL parameters without ceremony: [`Params`] is what [`crate::Sql`]'s
//! methods take — a tuple of plain Rust values, [`crate::params!`], `()` for
//! none, or a slice of [`Value`]s — and [`ToParam`] is what a value must be
//! to sit in one. Parameters borrow the caller's values: no string or blob
//! is copied on its way to the host.
//!
//! ```
//! # use projector_sdk::{Context, Failure, params};
//! # fn f(ctx: &Context, user_id: &str, name: String, age: Option<i64>) -> Result<(), Failure> {
//! ctx.sql().execute("INSERT INTO users (id, name, age) VALUES (?1, ?2, ?3)", (user_id, &name, age))?;
//! ctx.sql().execute("UPDATE users SET name = ?2 WHERE id = ?1", params![user_id, name])?;
//! ctx.sql().execute("DELETE FROM users WHERE age IS NULL", ())?;
//! # Ok(()) }
//! ```

use crate::Value;
use std::borrow::Cow;

/// One SQL parameter, borrowed from the caller's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Param<'a> {
    /// SQL `NULL`.
    Null,
    /// A 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(&'a str),
    /// Bytes.
    Blob(&'a [u8]),
}

/// A value that can be an SQL parameter.
///
/// Integers up to `i64`/`u32`, `bool` (0 or 1), floats, text (`str`,
/// `String`, `Cow<str>`), bytes (`[u8]`, `Vec<u8>`: a blob), [`Value`], and
/// `Option` of any of them (`None` is `NULL`). `u64` and `usize` are not:
/// SQLite integers are signed 64-bit, so convert with `i64::try_from` and
/// decide what a value too large means.
pub trait ToParam {
    /// This value as a parameter.
    fn to_param(&self) -> Param<'_>;
}

macro_rules! int_params {
    ($($t:ty),*) => {$(
        impl ToParam for $t {
            fn to_param(&self) -> Param<'_> {
                Param::Integer(i64::from(*self))
            }
        }
    )*};
}
int_params!(i8, i16, i32, i64, u8, u16, u32, bool);

impl ToParam for f64 {
    fn to_param(&self) -> Param<'_> {
        Param::Real(*self)
    }
}
impl ToParam for f32 {
    fn to_param(&self) -> Param<'_> {
        Param::Real(f64::from(*self))
    }
}
impl ToParam for str {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}
impl ToParam for String {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}
impl ToParam for Cow<'_, str> {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}
impl ToParam for [u8] {
    fn to_param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}
impl ToParam for Vec<u8> {
    fn to_param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}
impl ToParam for Value {
    fn to_param(&self) -> Param<'_> {
        match self {
            Value::Null => Param::Null,
            Value::Integer(n) => Param::Integer(*n),
            Value::Real(x) => Param::Real(*x),
            Value::Text(s) => Param::Text(s),
            Value::Blob(b) => Param::Blob(b),
        }
    }
}
impl ToParam for Param<'_> {
    fn to_param(&self) -> Param<'_> {
        *self
    }
}
impl<T: ToParam> ToParam for Option<T> {
    fn to_param(&self) -> Param<'_> {
        self.as_ref().map_or(Param::Null, ToParam::to_param)
    }
}
impl<T: ToParam + ?Sized> ToParam for &T {
    fn to_param(&self) -> Param<'_> {
        (**self).to_param()
    }
}

/// The positional parameters (`?1`, `?2`, …) of one statement.
///
/// Implemented for tuples of up to 16 [`ToParam`] values, `()` for none,
/// the arrays [`crate::params!`] makes, and slices, arrays and vectors of
/// [`Value`]s (`&[]` is no parameters too).
pub trait Params {
    /// Call `f` with these parameters.
    fn with_params<R>(&self, f: impl FnOnce(&[Param<'_>]) -> R) -> R;
}

impl Params for () {
    fn with_params<R>(&self, f: impl FnOnce(&[Param<'_>]) -> R) -> R {
        f(&[])
    }
}

impl<const N: usize> Params for [Param<'_>; N] {
    fn with_params<R>(&self, f: impl FnOnce(&[Param<'_>]) -> R) -> R {
        f(self)
    }
}

impl Params for &[Param<'_>] {
    fn with_params<R>(&self, f: impl FnOnce(&[Param<'_>]) -> R) -> R {
        f(self)
    }
}

impl<const N: usize> Params for &[Value; N] {
    fn with_params<R>(&self, f: impl FnOnce(&[Param<'_>]) -> R) -> R {
        values(&self[..], f)
    }
}

impl Params for &[Value] {
    fn with_params<R>(&self, f: impl FnOnce(&[Param<'_>]) -> R) -> R {
        values(self, f)
    }
}

impl Params for Vec<Value> {
    fn with_params<R>(&self, f: impl FnOnce(&[Param<'_>]) -> R) -> R {
        values(self, f)
    }
}

impl Params for &Vec<Value> {
    fn with_params<R>(&self, f: impl FnOnce(&[Param<'_>]) -> R) -> R {
        values(self, f)
    }
}

fn values<R>(values: &[Value], f: impl FnOnce(&[Param<'_>]) -> R) -> R {
    let params: Vec<Param<'_>> = values.iter().map(ToParam::to_param).collect();
    f(&params)
}

macro_rules! tuple_params {
    ($($name:ident)+) => {
        impl<$($name: ToParam),+> Params for ($($name,)+) {
            #[allow(non_snake_case)]
            fn with_params<R>(&self, f: impl FnOnce(&[Param<'_>]) -> R) -> R {
                let ($($name,)+) = self;
                f(&[$($name.to_param()),+])
            }
        }
    };
}
tuple_params!(A);
tuple_params!(A B);
tuple_params!(A B C);
tuple_params!(A B C D);
tuple_params!(A B C D E);
tuple_params!(A B C D E F);
tuple_params!(A B C D E F G);
tuple_params!(A B C D E F G H);
tuple_params!(A B C D E F G H I);
tuple_params!(A B C D E F G H I J);
tuple_params!(A B C D E F G H I J K);
tuple_params!(A B C D E F G H I J K L);
tuple_params!(A B C D E F G H I J K L M);
tuple_params!(A B C D E F G H I J K L M N);
tuple_params!(A B C D E F G H I J K L M N O);
tuple_params!(A B C D E F G H I J K L M N O P);

/// Positional SQL parameters from plain values, any number of them:
/// `params![user_id, amount, note]` is `?1`, `?2`, `?3`. Each value is
/// borrowed ([`ToParam`]), so it stays usable afterwards.
///
/// ```
/// # use projector_sdk::{Context, Failure, params};
/// # fn f(ctx: &Context) -> Result<(), Failure> {
/// let (wallet, amount) = ("w-1".to_string(), 250_i64);
/// ctx.sql().execute("UPDATE wallets SET balance = balance + ?2 WHERE id = ?1", params![wallet, amount])?;
/// # Ok(()) }
/// ```
#[macro_export]
macro_rules! params {
    () => {
        ([] as [$crate::Param<'static>; 0])
    };
    ($($value:expr),+ $(,)?) => {
        [$($crate::ToParam::to_param(&$value)),+]
    };
}
