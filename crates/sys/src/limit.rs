//! Command-line limits: a number within bounds, so zero or an absurd value is refused by
//! `thali serve` and by `thali config check` alike (both parse through clap).

/// A clap value parser for a numeric limit that must lie in `min..=max`: zero or an absurd
/// value is refused by `thali serve` and by `thali config check` alike.
pub fn within<T>(min: T, max: T) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + Clone + 'static,
{
    move |s: &str| -> Result<T, String> {
        let v: T = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a whole number"))?;
        if v < min || v > max {
            return Err(format!("{v} is outside {min}..={max}"));
        }
        Ok(v)
    }
}
